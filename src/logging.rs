//! Log set-up: application logs to stderr; the access log (one JSON line a request) to
//! stdout or a file through a non-blocking writer, so the request path never waits on I/O.

use std::io::IsTerminal;

use anyhow::Context;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::prelude::*;

use crate::config::AccessLog;

/// Keep the returned guard alive: dropping it flushes the access log.
pub(crate) fn init(access_log: &AccessLog) -> anyhow::Result<Option<WorkerGuard>> {
    // Pingora's logs are held at these levels whatever RUST_LOG says. Below info, Pingora
    // logs a malformed request's raw bytes, keys included; its server module tells of
    // signals in words that keygate's drained stops make wrong; its load balancer writes
    // every peer option when an upstream goes down. keygate logs stops and health itself.
    const PINGORA_LEVELS: [&str; 4] = [
        "pingora_core=info",
        "pingora_core::server=warn",
        "pingora_proxy=info",
        "pingora_load_balancing=error",
    ];
    let mut app_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let access_off = format!("{}=off", crate::server::access::TARGET);
    for directive in PINGORA_LEVELS.iter().copied().chain([access_off.as_str()]) {
        app_filter = app_filter.add_directive(directive.parse().context("log filter")?);
    }
    let app_layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(app_filter);

    let (writer, guard) = match access_log {
        AccessLog::Off => {
            tracing_subscriber::registry()
                .with(app_layer)
                .try_init()
                .ok();
            return Ok(None);
        }
        AccessLog::Stdout => tracing_appender::non_blocking(std::io::stdout()),
        AccessLog::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the access log {}", path.display()))?;
            tracing_appender::non_blocking(file)
        }
    };
    let access_layer = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_level(false)
        .with_writer(writer)
        .with_filter(Targets::new().with_target(crate::server::access::TARGET, LevelFilter::INFO));
    tracing_subscriber::registry()
        .with(app_layer)
        .with(access_layer)
        .try_init()
        .ok();
    Ok(Some(guard))
}
