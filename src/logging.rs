//! Log set-up: application logs to stderr; the access log (one JSON line a request) to
//! stdout or a file through a non-blocking writer, so the request path never waits on I/O.
//! The access log's destination is swapped by a reload (`AccessLogSink`); a file is opened
//! again on every reload, so that a rotated file is let go.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

use crate::config::AccessLog;

/// Where access-log lines go now; None: nowhere (`access_log = "off"`).
#[derive(Clone, Default)]
struct SwappableWriter {
    current: Arc<ArcSwapOption<NonBlocking>>,
}

/// One line's writer: the non-blocking queue in force when the line was made, or a sink.
enum LineWriter {
    To(NonBlocking),
    Nowhere,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LineWriter::To(writer) => writer.write(buf),
            LineWriter::Nowhere => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LineWriter::To(writer) => writer.flush(),
            LineWriter::Nowhere => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for SwappableWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        match self.current.load_full() {
            Some(writer) => LineWriter::To((*writer).clone()),
            None => LineWriter::Nowhere,
        }
    }
}

/// The access log's destination, which a reload may change. Dropping it flushes the
/// lines still queued.
pub(crate) struct AccessLogSink {
    writer: SwappableWriter,
    guard: Mutex<Option<WorkerGuard>>,
}

/// An access-log destination opened and ready to take over (see `AccessLogSink::open`).
pub(crate) struct OpenedAccessLog(Option<(NonBlocking, WorkerGuard)>);

impl AccessLogSink {
    /// Opens `access_log` without using it yet: a reload opens first and fails whole when
    /// the file cannot be opened.
    pub(crate) fn open(access_log: &AccessLog) -> Result<OpenedAccessLog, String> {
        let opened = match access_log {
            AccessLog::Off => None,
            AccessLog::Stdout => Some(tracing_appender::non_blocking(std::io::stdout())),
            AccessLog::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open the access log {}: {e}", path.display()))?;
                Some(tracing_appender::non_blocking(file))
            }
        };
        Ok(OpenedAccessLog(opened))
    }

    /// From now on, lines go to `opened`; the lines queued for the old one are written.
    pub(crate) fn switch_to(&self, opened: OpenedAccessLog) {
        let (writer, guard) = opened.0.map_or((None, None), |(w, g)| (Some(w), Some(g)));
        self.writer.current.store(writer.map(Arc::new));
        let old = std::mem::replace(&mut *self.guard.lock(), guard);
        drop(old);
    }
}

pub(crate) fn init(access_log: &AccessLog) -> anyhow::Result<AccessLogSink> {
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

    let sink = AccessLogSink {
        writer: SwappableWriter::default(),
        guard: Mutex::new(None),
    };
    sink.switch_to(AccessLogSink::open(access_log).map_err(anyhow::Error::msg)?);
    let access_layer = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_level(false)
        .with_writer(sink.writer.clone())
        .with_filter(Targets::new().with_target(crate::server::access::TARGET, LevelFilter::INFO));
    tracing_subscriber::registry()
        .with(app_layer)
        .with(access_layer)
        .try_init()
        .ok();
    Ok(sink)
}
