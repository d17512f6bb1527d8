//! Assembling and running the gateway: store, cache, routes, Pingora services, signals,
//! and the final usage flush after the server has stopped.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, GenBackgroundService};
use pingora::services::listening::Service;
use prometheus::IntGauge;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};

use crate::config::{Config, StoreBackend};
use crate::gateway::Gateway;
use crate::management::Management;
use crate::metrics::Metrics;
use crate::ratelimit::Limits;
use crate::reload::{Hangups, Reloader};
use crate::routing::{HealthChecks, RouteEnv, Router, build_routes};
use crate::server::edge::Edge;
use crate::server::ops::OpsApp;
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
    shared: Arc<Shared>,
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
        let drain = self.shared.drain;
        let grace = self.shared.live().config.server.shutdown_grace;
        let in_flight = drain.in_flight();
        tracing::info!(
            signal = name,
            in_flight,
            grace_seconds = grace.as_secs(),
            "{name} received: finishing the requests in flight, then stopping"
        );
        let left = drain.drain(grace).await;
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

/// Fills the key cache whenever it is cold (at start on sled; after each LISTEN on
/// PostgreSQL, which clears it), most recently used keys first (`store.cache_warm_keys`),
/// so that traffic after a restart finds its keys cached instead of reading the store on
/// the request path, one miss at a time.
struct CacheWarmUp {
    cache: Arc<KeyCache>,
    keys: usize,
}

#[async_trait]
impl BackgroundService for CacheWarmUp {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = self.cache.warm_requested() => {}
                _ = shutdown.changed() => return,
            }
            let began = std::time::Instant::now();
            tokio::select! {
                warmed = self.cache.warm(crate::clock::unix_now(), self.keys) => match warmed {
                    Ok(keys) => tracing::info!(
                        keys,
                        ms = began.elapsed().as_millis() as u64,
                        "key cache warmed"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "the key cache warm-up failed; keys are cached on first use"
                    ),
                },
                _ = shutdown.changed() => return,
            }
        }
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
                    self.shared.limits.forget_idle();
                    self.management.forget_idle_limits();
                }
                _ = purges.tick(), if self.shared.live().config.keys.purge_revoked_after.is_some() => {
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

/// Fails early, with a clear message, when a listen address is taken: Pingora would retry
/// for 30 s and then let that listener die silently.
fn check_port_free(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

pub(crate) fn serve(config_path: &Path) -> anyhow::Result<()> {
    without_transparent_huge_pages();
    let config = Arc::new(Config::load(config_path).map_err(|errors| {
        anyhow::anyhow!("invalid configuration {}:\n{errors}", config_path.display())
    })?);
    let access_log = Arc::new(crate::logging::init(&config.server.access_log)?);
    let early = catch_early_stop_signals()?;
    let hangup_seen = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGHUP, Arc::clone(&hangup_seen))
        .context("cannot install the SIGHUP handler")?;
    for warning in config.warnings(crate::clock::unix_now()) {
        tracing::warn!(%warning, "configuration warning");
    }
    check_port_free("server.listen", config.server.listen)?;
    check_port_free("server.admin_listen", config.server.admin_listen)?;

    let admin_token = admin_token(&config)?;
    let (shared, store) = build_state(Arc::clone(&config))?;
    let management = Arc::new(Management::new(Arc::clone(&shared), admin_token));
    let stop = StopSignals {
        shared: Arc::clone(&shared),
        early,
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf(&config));
    server.bootstrap();
    let health = Arc::new(HealthChecks::new(shared.live().router.routes()));
    server.add_service(GenBackgroundService::new(
        "health checks and DNS refreshes".to_string(),
        Arc::clone(&health),
    ));
    add_background_services(&mut server, &shared, &store, &management)?;
    let gateway = Arc::new(Gateway::new(Arc::clone(&shared)));
    let (edge, proxy) = Edge::start(
        &server.configuration,
        gateway,
        Arc::clone(&management),
        &config.server,
    )?;
    server.add_service(proxy);
    let reloader = Arc::new(Reloader {
        path: config_path.to_path_buf(),
        shared: Arc::clone(&shared),
        management,
        edge,
        access_log,
        health,
        serial: tokio::sync::Mutex::new(()),
    });
    server.add_service(GenBackgroundService::new(
        "SIGHUP reloads".to_string(),
        Arc::new(Hangups {
            reloader: Arc::clone(&reloader),
            hangup_seen,
        }),
    ));
    server.add_service(ops_service(&shared, reloader));
    shared
        .metrics
        .config_last_reload_success
        .set(crate::clock::unix_now());

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
/// front of it, the routes (their upstream names resolved on that runtime too) and
/// everything else the services share.
///
/// deadpool spawns the first PostgreSQL connection's driver on that throw-away runtime; it
/// dies with it, and the pool replaces the closed connection on first use
/// (`RecyclingMethod::Fast` checks `is_closed`).
fn build_state(config: Arc<Config>) -> anyhow::Result<(Arc<Shared>, Arc<dyn KeyStore>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let store = runtime.block_on(store::open(&config.store))?;
    let cache = store::cache_for(&config.store, Arc::clone(&store));
    let metrics = Arc::new(Metrics::new());
    let env = RouteEnv::new(&config.server, &metrics);
    let routes = runtime
        .block_on(build_routes(&config.routes, &env, &[]))
        .map_err(|problem| anyhow::anyhow!("cannot build the upstream pools: {problem}"))?;
    let limits = Limits::new(&config.ratelimit, &metrics)?;
    let shared = Shared::new(
        config,
        Router::new(routes),
        cache,
        Arc::new(UsageRecorder::new()),
        metrics,
        limits,
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

/// Turns transparent huge pages off for this process. mimalloc asks for them on its arenas
/// and hands freed memory back to the OS within milliseconds, so a busy gateway keeps
/// faulting 2 MiB pages back in, each zeroed whole: on a 2-core VM that made bare Pingora
/// 2× slower a request and was half of keygate's first start on a 1M-key store (README,
/// "Decisions"). A kernel that refuses leaves things as they were.
pub fn without_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
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

/// The usage flusher, the key filter, the cache warm-up, the invalidation listener (on
/// PostgreSQL) and housekeeping.
fn add_background_services(
    server: &mut Server,
    shared: &Arc<Shared>,
    store: &Arc<dyn KeyStore>,
    management: &Arc<Management>,
) -> anyhow::Result<()> {
    let config = shared.live().config.clone();
    let flusher = UsageFlusher {
        usage: Arc::clone(&shared.usage),
        store: Arc::clone(store),
        metrics: Arc::clone(&shared.metrics),
        interval: config.store.usage_flush_interval,
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
    if config.store.cache_warm_keys > 0 {
        server.add_service(GenBackgroundService::new(
            "key cache warm-up".to_string(),
            Arc::new(CacheWarmUp {
                cache: Arc::clone(&shared.cache),
                keys: usize::try_from(config.store.cache_warm_keys).unwrap_or(usize::MAX),
            }),
        ));
    }
    let backend = &config.store.backend;
    if matches!(backend, StoreBackend::Sled { .. }) {
        // One process owns a sled store: nothing is created behind its back.
        shared.cache.filter().request_rebuild();
        shared.cache.request_warm();
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

/// `/metrics`, `/healthz`, `/readyz` and `POST /-/reload` on `admin_listen`.
fn ops_service(
    shared: &Arc<Shared>,
    reload: Arc<Reloader>,
) -> impl pingora::services::Service + 'static {
    let ops = OpsApp {
        shared: Arc::clone(shared),
        reload,
    };
    let mut service = Service::new("keygate ops".to_string(), ops);
    service.add_tcp(&shared.live().config.server.admin_listen.to_string());
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
