//! Assembling and running the gateway: store, cache, routes, Pingora services, signals,
//! and the final usage flush after the server has stopped.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, GenBackgroundService};
use pingora::services::listening::Service;
use prometheus::IntGauge;
use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};

use crate::config::{Config, StoreBackend};
use crate::drain::Drain;
use crate::gateway::Gateway;
use crate::management::Management;
use crate::metrics::Metrics;
use crate::routing::{Router, build_route};
use crate::server::conn_limits::{ConnectionCap, HeaderDeadline};
use crate::server::ops::OpsApp;
use crate::server::proxy::KeygateProxy;
use crate::server::tls::{CertResolver, TlsEdge, TlsTermination};
use crate::state::Shared;
use crate::store::{self, KeyCache, KeyStore, PgOptions};
use crate::usage::UsageRecorder;

/// Pooled keep-alive connections to upstreams, per proxy thread.
const UPSTREAM_KEEPALIVE_POOL: usize = 256;
/// How often recovered rate-limit state is dropped.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(60);
/// How often long-dead keys are purged (also once at start).
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// SIGTERM, SIGINT and SIGQUIT all stop gracefully: new connections are closed and the
/// process stops once no request is in flight, within `shutdown_grace_seconds` (see
/// `drain`); `main` then writes the pending usage counts. Pingora is told to stop fast
/// because the drain has already happened (its graceful stop would sleep the whole grace).
struct StopSignals {
    drain: &'static Drain,
    grace: Duration,
    /// Set by a stop signal that came before `recv` first ran: Pingora starts listening
    /// before it listens for signals, and in between a signal's default action would kill
    /// the process without the final usage flush.
    early: Arc<AtomicUsize>,
}

/// From here on a stop signal is recorded instead of killing the process at once.
fn catch_early_stop_signals() -> anyhow::Result<Arc<AtomicUsize>> {
    let early = Arc::new(AtomicUsize::new(0));
    for signal in [SIGTERM, SIGINT, SIGQUIT] {
        let value = usize::try_from(signal).unwrap_or(1);
        signal_hook::flag::register_usize(signal, Arc::clone(&early), value)
            .context("cannot install signal handlers")?;
    }
    Ok(early)
}

fn signal_name(signal: usize) -> &'static str {
    match i32::try_from(signal) {
        Ok(SIGINT) => "SIGINT",
        Ok(SIGQUIT) => "SIGQUIT",
        _ => "SIGTERM",
    }
}

#[async_trait]
impl ShutdownSignalWatch for StopSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        let name = match self.early.load(Ordering::SeqCst) {
            0 => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = quit.recv() => "SIGQUIT",
            },
            early => signal_name(early),
        };
        let in_flight = self.drain.in_flight();
        tracing::info!(
            signal = name,
            in_flight,
            grace_seconds = self.grace.as_secs(),
            "{name} received: finishing the requests in flight, then stopping"
        );
        let left = self.drain.drain(self.grace).await;
        if left > 0 {
            tracing::warn!(left, "the grace period ended with requests still in flight");
        }
        ShutdownSignal::FastShutdown
    }
}

struct UsageFlusher {
    usage: Arc<UsageRecorder>,
    store: Arc<dyn KeyStore>,
    metrics: Arc<Metrics>,
    interval: Duration,
}

#[async_trait]
impl BackgroundService for UsageFlusher {
    async fn start(&self, shutdown: ShutdownWatch) {
        Arc::clone(&self.usage)
            .run_flusher(
                Arc::clone(&self.store),
                Arc::clone(&self.metrics),
                self.interval,
                shutdown,
            )
            .await;
    }
}

/// Keeps this instance's cache coherent with revokes and rotations made by other instances
/// on the same database (LISTEN/NOTIFY; the cache is cleared whenever the listener
/// reconnects, so a missed notification cannot keep a revoked key alive).
/// Connects as the pool does (`sslmode`, `store.ca_file`, statement timeout); its state is
/// `keygate_invalidation_listener_connected`.
struct InvalidationListener {
    url: String,
    options: PgOptions,
    cache: Arc<KeyCache>,
    connected: IntGauge,
}

#[async_trait]
impl BackgroundService for InvalidationListener {
    async fn start(&self, shutdown: ShutdownWatch) {
        store::invalidation::run_listener_with(
            self.url.clone(),
            &self.options,
            Arc::clone(&self.cache),
            Some(self.connected.clone()),
            shutdown,
        )
        .await;
    }
}

/// Builds the filter of stored hashes whenever it is asked for one: at start on sled, each
/// time the invalidation listener (re)starts LISTENing on PostgreSQL, and when the key count
/// outgrows the filter. Until the first build is in, every cache miss reads the store.
struct KeyFilterBuilder {
    cache: Arc<KeyCache>,
}

#[async_trait]
impl BackgroundService for KeyFilterBuilder {
    async fn start(&self, shutdown: ShutdownWatch) {
        let store = Arc::clone(self.cache.store());
        self.cache
            .filter()
            .run_rebuilds(store.as_ref(), shutdown)
            .await;
    }
}

/// Drops the state of rate limits that have fully recovered, bounding their memory, and,
/// with `keys.purge_revoked_after_days`, deletes long-dead keys (hourly, in batches, on
/// this background task: the request path never waits for it).
struct Housekeeping {
    shared: Arc<Shared>,
    management: Arc<Management>,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticker = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        let mut purges = tokio::time::interval(PURGE_INTERVAL);
        purges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.shared.rate_limits.forget_idle();
                    self.management.forget_idle_limits();
                }
                _ = purges.tick(), if self.shared.config.keys.purge_revoked_after.is_some() => {
                    self.management.purge_dead_keys().await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Closes WebSocket tunnels whose key was revoked or expired (see `tunnels`).
struct TunnelSweep {
    shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for TunnelSweep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticker = tokio::time::interval(crate::tunnels::SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.shared.tunnels.sweep(&self.shared.cache).await,
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// SIGHUP reads the listener's certificate files again (until live reconfiguration
/// re-reads the whole file on it); a bad file keeps the certificate in use.
struct CertificateReload {
    resolver: Arc<CertResolver>,
    expiry: IntGauge,
}

#[async_trait]
impl BackgroundService for CertificateReload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler; certificates load at start only");
            return;
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => match self.resolver.reload() {
                    Ok(not_after) => {
                        self.expiry.set(not_after);
                        tracing::info!("SIGHUP: the TLS certificate was read again");
                    }
                    Err(problem) => tracing::error!(
                        %problem,
                        "SIGHUP: the TLS certificate could not be read again; the one in use stays"
                    ),
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Fails early, with a clear message, when a listen address is taken: Pingora would retry
/// for 30 s and then let that listener die silently.
fn check_port_free(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

pub(crate) fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(config_path).map_err(|errors| {
        anyhow::anyhow!("invalid configuration {}:\n{errors}", config_path.display())
    })?);
    let _log_guard = crate::logging::init(&config.server.access_log)?;
    let early = catch_early_stop_signals()?;
    for warning in config.warnings(crate::clock::unix_now()) {
        tracing::warn!(%warning, "configuration warning");
    }
    check_port_free("server.listen", config.server.listen)?;
    check_port_free("server.admin_listen", config.server.admin_listen)?;

    let admin_token = admin_token(&config)?;
    let (shared, store) = build_state(Arc::clone(&config))?;
    let management = Arc::new(Management::new(Arc::clone(&shared), admin_token));
    let stop = StopSignals {
        drain: shared.drain,
        grace: config.server.shutdown_grace,
        early,
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf(&config));
    server.bootstrap();
    add_background_services(&mut server, &shared, &store, &management)?;
    let tls = tls_edge(&mut server, &shared)?;
    server.add_service(proxy_service(&server, &shared, management, tls));
    server.add_service(ops_service(&shared));

    tracing::info!(
        listen = %config.server.listen,
        tls = config.server.tls.is_some(),
        admin_listen = %config.server.admin_listen,
        routes = config.routes.len(),
        "keygate started"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(stop),
    });

    final_flush(&shared.usage, store.as_ref(), &shared.metrics)?;
    tracing::info!("keygate stopped");
    Ok(())
}

/// The store (opened on a runtime of its own: Pingora's do not exist yet), the cache in
/// front of it, the routes and everything else the services share.
///
/// deadpool spawns the first PostgreSQL connection's driver on that throw-away runtime; it
/// dies with it, and the pool replaces the closed connection on first use
/// (`RecyclingMethod::Fast` checks `is_closed`).
fn build_state(config: Arc<Config>) -> anyhow::Result<(Arc<Shared>, Arc<dyn KeyStore>)> {
    let store = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?
        .block_on(store::open(&config.store))?;
    let cache = store::cache_for(&config.store, Arc::clone(&store));
    let routes = config
        .routes
        .iter()
        .cloned()
        .map(build_route)
        .collect::<Result<Vec<_>, _>>()
        .context("cannot build the upstream pools")?;
    let shared = Shared::new(
        config,
        Router::new(routes),
        cache,
        Arc::new(UsageRecorder::new()),
        Arc::new(Metrics::new()),
    );
    Ok((Arc::new(shared), store))
}

/// The admin token; None = no admin. A token too short to be safe stops the start.
fn admin_token(config: &Config) -> anyhow::Result<Option<Vec<u8>>> {
    let token = config
        .management
        .admin_token()
        .map_err(|problem| anyhow::anyhow!("{problem}"))?;
    if token.is_none() {
        tracing::info!("no admin token set: the management API accepts keys:manage keys only");
    }
    Ok(token)
}

fn server_conf(config: &Config) -> ServerConf {
    ServerConf {
        threads: config.server.threads,
        // Stops are drained by keygate itself (`StopSignals`) and then fast for Pingora.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        upstream_keepalive_pool_size: UPSTREAM_KEEPALIVE_POOL,
        ..ServerConf::default()
    }
}

/// Health checks of every route, the usage flusher, the key filter, the invalidation
/// listener (on PostgreSQL) and housekeeping.
fn add_background_services(
    server: &mut Server,
    shared: &Arc<Shared>,
    store: &Arc<dyn KeyStore>,
    management: &Arc<Management>,
) -> anyhow::Result<()> {
    for route in shared.router.routes() {
        let name = format!("health checks of route {}", route.name());
        server.add_service(GenBackgroundService::new(name, Arc::clone(&route.balancer)));
    }
    let flusher = UsageFlusher {
        usage: Arc::clone(&shared.usage),
        store: Arc::clone(store),
        metrics: Arc::clone(&shared.metrics),
        interval: shared.config.store.usage_flush_interval,
    };
    server.add_service(GenBackgroundService::new(
        "usage flusher".to_string(),
        Arc::new(flusher),
    ));
    server.add_service(GenBackgroundService::new(
        "key filter".to_string(),
        Arc::new(KeyFilterBuilder {
            cache: Arc::clone(&shared.cache),
        }),
    ));
    let backend = &shared.config.store.backend;
    if matches!(backend, StoreBackend::Sled { .. }) {
        // One process owns a sled store: nothing is created behind its back.
        shared.cache.filter().request_rebuild();
    }
    if let (StoreBackend::Postgres { url_env, .. }, Some(options)) =
        (backend, store::postgres_options(backend))
    {
        let listener = InvalidationListener {
            url: store::database_url(url_env)?,
            options,
            cache: Arc::clone(&shared.cache),
            connected: shared.metrics.invalidation_listener_connected.clone(),
        };
        server.add_service(GenBackgroundService::new(
            "cache invalidation listener".to_string(),
            Arc::new(listener),
        ));
    }
    let housekeeping = Housekeeping {
        shared: Arc::clone(shared),
        management: Arc::clone(management),
    };
    server.add_service(GenBackgroundService::new(
        "housekeeping".to_string(),
        Arc::new(housekeeping),
    ));
    let sweep = TunnelSweep {
        shared: Arc::clone(shared),
    };
    server.add_service(GenBackgroundService::new(
        "WebSocket tunnel sweep".to_string(),
        Arc::new(sweep),
    ));
    Ok(())
}

/// With `[server.tls]`: the certificate (a bad one stops the start), its SIGHUP reload
/// and the acceptor; the handshake shares the header's deadline.
fn tls_edge(server: &mut Server, shared: &Arc<Shared>) -> anyhow::Result<Option<TlsEdge>> {
    let Some(config) = &shared.config.server.tls else {
        return Ok(None);
    };
    let resolver = Arc::new(CertResolver::load(config).map_err(|p| anyhow::anyhow!("{p}"))?);
    let metrics = &shared.metrics;
    metrics.tls_certificate_expiry.set(config.not_after);
    let reload = CertificateReload {
        resolver: Arc::clone(&resolver),
        expiry: metrics.tls_certificate_expiry.clone(),
    };
    server.add_service(GenBackgroundService::new(
        "certificate reload".to_string(),
        Arc::new(reload),
    ));
    let timeout = shared.config.server.header_read_timeout;
    Ok(Some(TlsEdge::new(resolver, timeout, metrics)?))
}

/// HTTP/2's counterparts of the HTTP/1.1 limits: streams per connection, the header block
/// (Pingora's 64 KiB default, or twice `max_header_bytes` when larger, so that a header
/// between the two still gets keygate's JSON 431; HPACK counts 32 bytes a field more).
fn h2_options(
    server: &crate::config::ServerConfig,
) -> pingora::protocols::http::v2::server::H2Options {
    let mut options = pingora::protocols::http::v2::server::default_h2_options();
    options.max_concurrent_streams(server.h2_max_concurrent_streams);
    let header_list = (2 * server.max_header_bytes).max(64 * 1024);
    options.max_header_list_size(u32::try_from(header_list).unwrap_or(u32::MAX));
    options
}

/// The proxy on `listen`, inside the connection cap, TLS when configured, and the
/// per-request header deadline.
fn proxy_service(
    server: &Server,
    shared: &Arc<Shared>,
    management: Arc<Management>,
    tls: Option<TlsEdge>,
) -> impl pingora::services::Service + 'static {
    let hooks = KeygateProxy {
        gateway: Arc::new(Gateway::new(Arc::clone(shared))),
        management,
    };
    let mut proxy = pingora::proxy::http_proxy(&server.configuration, hooks);
    // Let CONNECT reach request_filter, which refuses it with keygate's own JSON 405
    // (Pingora's built-in refusal is a bare 405).
    let mut options = pingora::apps::HttpServerOptions::default();
    options.allow_connect_method_proxying = true;
    let server_config = &shared.config.server;
    // An idle HTTP/2 connection is closed as an idle HTTP/1.1 keep-alive one is.
    options.h2_idle_timeout = Some(server_config.keepalive_timeout);
    proxy.server_options = Some(options);
    proxy.h2_options = Some(h2_options(server_config));
    let deadline = HeaderDeadline::new(
        proxy,
        server_config.header_read_timeout,
        server_config.keepalive_timeout,
    );
    let terminated = TlsTermination::new(deadline, tls);
    let capped = ConnectionCap::new(terminated, server_config.max_connections, shared.drain);
    let mut service = Service::new("keygate proxy".to_string(), capped);
    service.add_tcp(&server_config.listen.to_string());
    service
}

/// `/metrics`, `/healthz` and `/readyz` on `admin_listen`.
fn ops_service(shared: &Arc<Shared>) -> impl pingora::services::Service + 'static {
    let ops = OpsApp {
        shared: Arc::clone(shared),
    };
    let mut service = Service::new("keygate ops".to_string(), ops);
    service.add_tcp(&shared.config.server.admin_listen.to_string());
    service
}

/// After the server stops: every pending count is written before the process exits.
fn final_flush(
    usage: &UsageRecorder,
    store: &dyn KeyStore,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the final flush")?;
    runtime.block_on(async {
        for attempt in 1..=5 {
            match usage.flush(store).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    metrics.usage_flush_errors.inc();
                    tracing::error!(error = %e, attempt, "final usage flush failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        bail!(
            "usage counts could not be written; {} keys' counts lost",
            usage.pending_keys()
        )
    })
}
