//! The `keygate` command line: `serve`, `check`, and the offline `keys` commands, which
//! work on the store directly through the same `KeyService` the management API uses.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::app::{key_index, open_store};
use crate::config::Config;
use crate::gateway::unix_now;
use crate::keys::KeyFormat;
use crate::service::{
    Actor, DEFAULT_NAME, FieldErrors, KeyService, KeyView, MAX_TTL_SECONDS, NewKey,
    validate_new_key,
};
use crate::usage::UsageRecorder;

const DEFAULT_CONFIG: &str = "config/keygate.toml";

#[derive(Parser)]
#[command(name = "keygate", version, about = "API-key authentication gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration; print every problem and exit non-zero if there are any.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Manage keys offline, in the store the configuration names (the gateway must be stopped).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print its record, the key itself included (shown only this once).
    Create {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        owner: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long)]
        ttl_seconds: Option<i64>,
    },
    /// Print key records as JSON.
    List {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        owner: Option<String>,
    },
    /// Revoke a key by id.
    Revoke {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        id: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => crate::app::serve(&config),
        Command::Check { config } => return check(&config),
        Command::Keys { command } => keys(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: {} problem(s)", path.display(), errors.0.len());
            for problem in &errors.0 {
                eprintln!("  {problem}");
            }
            ExitCode::from(2)
        }
    }
}

async fn offline_service(config_path: &Path) -> anyhow::Result<KeyService> {
    let config = Config::load(config_path).map_err(|errors| {
        anyhow::anyhow!("invalid configuration {}:\n{errors}", config_path.display())
    })?;
    let store = open_store(&config).await?;
    let index = key_index(&config, store);
    Ok(KeyService::new(
        index,
        Arc::new(UsageRecorder::new()),
        KeyFormat::new(&config.keys.prefix),
    ))
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn describe(errors: &FieldErrors) -> String {
    errors
        .iter()
        .map(|(field, reasons)| format!("{field}: {}", reasons.join("; ")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime.block_on(async move {
        match command {
            KeysCommand::Create {
                config,
                owner,
                name,
                scopes,
                ttl_seconds,
            } => {
                let mut errors = FieldErrors::new();
                validate_new_key(name.as_deref(), &owner, &scopes, None, None, &mut errors);
                if let Some(ttl) = ttl_seconds
                    && !(1..=MAX_TTL_SECONDS).contains(&ttl)
                {
                    errors
                        .entry("ttl_seconds".into())
                        .or_default()
                        .push(format!("must be between 1 and {MAX_TTL_SECONDS}"));
                }
                if !errors.is_empty() {
                    bail!("invalid key settings:\n{}", describe(&errors));
                }
                let service = offline_service(&config).await?;
                let mut scopes = scopes;
                scopes.sort();
                scopes.dedup();
                let view = service
                    .create(
                        NewKey {
                            name: name.unwrap_or_else(|| DEFAULT_NAME.to_string()),
                            owner,
                            scopes,
                            expires_at: ttl_seconds.map(|ttl| unix_now() + ttl),
                            rate_limit: None,
                            metadata: None,
                        },
                        None,
                    )
                    .await?;
                service
                    .audit(&Actor::Cli, "create", Some(&view.id), None)
                    .await?;
                print_json(&view)
            }
            KeysCommand::List { config, owner } => {
                let service = offline_service(&config).await?;
                let mut all = Vec::new();
                let mut cursor: Option<String> = None;
                loop {
                    let page = service
                        .list(owner.as_deref(), cursor.as_deref(), 1000)
                        .await?;
                    all.extend(
                        page.items
                            .into_iter()
                            .map(|k| KeyView::new(k.record, k.usage)),
                    );
                    match page.next_cursor {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
                print_json(&all)
            }
            KeysCommand::Revoke { config, id } => {
                let service = offline_service(&config).await?;
                let Some(record) = service.revoke(&id).await? else {
                    bail!("no key with id {id}");
                };
                service
                    .audit(&Actor::Cli, "revoke", Some(&id), None)
                    .await?;
                print_json(&serde_json::json!({
                    "id": record.id,
                    "revoked": true,
                    "revoked_at": record.revoked_at.map(crate::service::rfc3339),
                }))
            }
        }
    })
}
