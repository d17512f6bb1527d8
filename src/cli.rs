//! The `keygate` command line: `serve`, `check`, and the offline `keys` commands, which
//! work on the store directly through the same `keys::lifecycle` the management API uses.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::clock::unix_now;
use crate::config::Config;
use crate::keys::KeyFormat;
use crate::lifecycle::{
    Actor, Audit, FieldErrors, Lifecycle, LifecycleError, NewKey, add_error, expiry_after,
};
use crate::management::views::{KeyView, RevokeResult};
use crate::store;
use crate::usage::UsageRecorder;

mod scan;

const DEFAULT_CONFIG: &str = "config/keygate.toml";

#[derive(Parser)]
#[command(name = "keygate", version, about = "API-key authentication gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config`, shared by every command.
#[derive(clap::Args)]
struct ConfigArg {
    /// The TOML configuration file (see the README's "Configuration").
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: the proxy on `server.listen`, /metrics, /healthz and /readyz on
    /// `server.admin_listen`. Stops gracefully on SIGTERM or SIGINT.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the configuration: print every problem as `field.path: reason` and exit 2,
    /// or print `PATH: ok` and exit 0.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Manage keys offline, in the store the configuration names. A sled store must not be
    /// in use by a running gateway; use the management API then.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print its record as JSON, the key itself included in `key` (shown
    /// only this once: store it now).
    Create {
        #[command(flatten)]
        config: ConfigArg,
        /// Who the key belongs to: 1 to 128 characters of A-Za-z0-9._:@-.
        #[arg(long)]
        owner: String,
        /// A name for people (1 to 100 characters); default "default".
        #[arg(long)]
        name: Option<String>,
        /// A scope the key holds (a-z0-9:._-, up to 64 characters); repeat the option for
        /// several: `--scope read --scope write`.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// The key expires this many seconds from now (1 to 315360000); default never.
        #[arg(long, value_name = "SECONDS")]
        ttl_seconds: Option<i64>,
    },
    /// Print every key record (masked, with usage) as one JSON array.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this owner's keys.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Look for keys in files, directories (recursively; binary files and .git are
    /// skipped) or standard input (no PATH, or `-`), e.g. in a pre-commit hook. Prints
    /// `path:line: preview` for each well-formed key with a valid checksum, never the key.
    /// Exits 1 when it found any, 0 when not, 2 when a path could not be read.
    Scan {
        #[command(flatten)]
        config: ConfigArg,
        /// The key prefix to look for; default: `keys.prefix` of the configuration, or
        /// "kg" when that file does not exist.
        #[arg(long)]
        prefix: Option<String>,
        /// Files or directories to scan.
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Revoke a key at once; print `{"id", "revoked": true, "revoked_at"}`.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// The key's id (from `keys list` or the create answer), not the key itself.
        id: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => crate::app::serve(&config.config),
        Command::Check { config } => return check(&config.config),
        Command::Keys {
            command:
                KeysCommand::Scan {
                    config,
                    prefix,
                    paths,
                },
        } => return scan_command(&config.config, prefix, &paths),
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

fn scan_command(config: &Path, prefix: Option<String>, paths: &[PathBuf]) -> ExitCode {
    let prefix = match prefix {
        Some(prefix) => prefix,
        None if !config.exists() => "kg".to_string(),
        None => match Config::load(config) {
            Ok(config) => config.keys.prefix.clone(),
            Err(errors) => {
                eprintln!(
                    "keygate: invalid configuration {}:\n{errors}",
                    config.display()
                );
                return ExitCode::from(2);
            }
        },
    };
    scan::run(&prefix, paths)
}

fn check(path: &Path) -> ExitCode {
    let (problems, warnings) = match Config::load(path) {
        Ok(config) => {
            let mut warnings = config.warnings(unix_now());
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    warnings.extend(runtime.block_on(crate::routing::unresolved_names(&config)));
                }
                Err(e) => eprintln!("warning: upstream names not checked: {e}"),
            }
            (config.environment_problems(), warnings)
        }
        Err(errors) => (errors.0, Vec::new()),
    };
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    eprintln!("{}: {} problem(s)", path.display(), problems.len());
    for problem in &problems {
        eprintln!("  {problem}");
    }
    ExitCode::from(2)
}

/// The lifecycle over the configured store, for a command that runs without a gateway.
async fn offline_keys(config_path: &Path) -> anyhow::Result<Lifecycle> {
    let config = Config::load(config_path).map_err(|errors| {
        anyhow::anyhow!("invalid configuration {}:\n{errors}", config_path.display())
    })?;
    let store = store::open(&config.store).await?;
    let cache = store::cache_for(&config.store, store);
    let format = KeyFormat::new(&config.keys.prefix);
    Ok(Lifecycle::new(
        cache,
        Arc::new(UsageRecorder::new()),
        format,
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

/// Field errors as the CLI reports them; anything else as it is.
fn cli_error(e: LifecycleError) -> anyhow::Error {
    match e {
        LifecycleError::Invalid(errors) => {
            anyhow::anyhow!("invalid key settings:\n{}", describe(&errors))
        }
        e => e.into(),
    }
}

const CLI_ACTOR: &Actor = &Actor::Cli;

fn cli_audit(action: &str) -> Audit<'_> {
    Audit {
        actor: CLI_ACTOR,
        action,
        client: None,
    }
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
            } => create(&config.config, owner, name, scopes, ttl_seconds).await,
            KeysCommand::List { config, owner } => list(&config.config, owner.as_deref()).await,
            KeysCommand::Revoke { config, id } => revoke(&config.config, &id).await,
            // Needs no store and no runtime: `main` runs it.
            KeysCommand::Scan { .. } => Ok(()),
        }
    })
}

async fn create(
    config: &Path,
    owner: String,
    name: Option<String>,
    scopes: Vec<String>,
    ttl_seconds: Option<i64>,
) -> anyhow::Result<()> {
    let mut errors = FieldErrors::new();
    let expires_at = ttl_seconds.and_then(|ttl| {
        expiry_after(ttl, unix_now())
            .map_err(|reason| add_error(&mut errors, "ttl_seconds", reason))
            .ok()
    });
    let new = NewKey {
        name,
        owner,
        scopes,
        expires_at,
        rate_limit: None,
        metadata: None,
        allowed_ips: Vec::new(),
        quota: None,
    };
    // Checked before the store is opened: a typo is reported without touching it.
    new.check(&mut errors);
    if !errors.is_empty() {
        bail!("invalid key settings:\n{}", describe(&errors));
    }
    let keys = offline_keys(config).await?;
    let created = keys
        .create(new, cli_audit("create"))
        .await
        .map_err(cli_error)?;
    print_json(&KeyView::created(created))
}

async fn list(config: &Path, owner: Option<&str>) -> anyhow::Result<()> {
    let keys = offline_keys(config).await?;
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = keys.list(owner, cursor.as_deref(), 1000).await?;
        all.extend(page.items.into_iter().map(KeyView::from));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    print_json(&all)
}

async fn revoke(config: &Path, id: &str) -> anyhow::Result<()> {
    let keys = offline_keys(config).await?;
    let Some(record) = keys.revoke(id, cli_audit("revoke")).await? else {
        bail!("no key with id {id}");
    };
    print_json(&RevokeResult::from(record))
}
