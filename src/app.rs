//! Assembling and running the gateway: store, cache, routes, Pingora services, signals,
//! and the final usage flush after the server has stopped.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, GenBackgroundService};
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::{Config, StoreBackend};
use crate::gateway::Gateway;
use crate::guard::{ConnectionCap, HeaderDeadline};
use crate::metrics::Metrics;
use crate::proxy::KeygateProxy;
use crate::store::{CacheSettings, KeyIndex, KeyStore, PgStore, SledStore};
use crate::upstream::{Router, build_route};
use crate::usage::UsageRecorder;

/// The PostgreSQL connection string, from the environment variable the config names (never
/// from the file: it may hold a password).
pub fn database_url(url_env: &str) -> anyhow::Result<String> {
    std::env::var(url_env)
        .ok()
        .filter(|url| !url.is_empty())
        .with_context(|| {
            format!("store.url_env names {url_env}, but that environment variable is not set")
        })
}

/// Opens the store the configuration names.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn KeyStore>> {
    match &config.store.backend {
        StoreBackend::Sled { path } => {
            let store = SledStore::open(path)
                .with_context(|| format!("cannot open the sled store at {}", path.display()))?;
            Ok(Arc::new(store))
        }
        StoreBackend::Postgres {
            url_env,
            pool_size,
            connect_timeout,
        } => {
            let url = database_url(url_env)?;
            let store = PgStore::connect(&url, *pool_size, *connect_timeout)
                .await
                .context("cannot open the postgres store")?;
            Ok(Arc::new(store))
        }
    }
}

pub fn key_index(config: &Config, store: Arc<dyn KeyStore>) -> Arc<KeyIndex> {
    Arc::new(KeyIndex::new(
        store,
        CacheSettings {
            capacity: config.store.cache_capacity,
            ttl: config.store.cache_ttl,
            negative_capacity: config.store.negative_cache_capacity,
            negative_ttl: config.store.negative_cache_ttl,
        },
    ))
}

/// SIGTERM and SIGINT both stop gracefully (Pingora treats SIGINT as a fast shutdown);
/// either way `main` then writes the pending usage counts.
struct StopSignals;

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
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = quit.recv() => {}
        }
        tracing::info!("stop signal received, shutting down");
        ShutdownSignal::GracefulTerminate
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
struct InvalidationListener {
    url: String,
    index: Arc<KeyIndex>,
}

#[async_trait]
impl BackgroundService for InvalidationListener {
    async fn start(&self, shutdown: ShutdownWatch) {
        crate::store::postgres::run_invalidation_listener(
            self.url.clone(),
            Arc::clone(&self.index),
            shutdown,
        )
        .await;
    }
}

/// Drops the state of rate limits that have fully recovered, bounding their memory.
struct Housekeeping {
    gateway: Arc<Gateway>,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.gateway.rate_limits.forget_idle();
                    self.gateway.management_limiters.forget_idle();
                }
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

pub fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = Arc::new(Config::load(config_path).map_err(|errors| {
        anyhow::anyhow!("invalid configuration {}:\n{errors}", config_path.display())
    })?);
    let _log_guard = crate::logging::init(&config.server.access_log)?;
    check_port_free("server.listen", config.server.listen)?;
    check_port_free("server.admin_listen", config.server.admin_listen)?;

    let store = {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a runtime")?;
        runtime.block_on(open_store(&config))?
    };
    let index = key_index(&config, Arc::clone(&store));
    let usage = Arc::new(UsageRecorder::new());
    let metrics = Arc::new(Metrics::new());
    let admin_token = config
        .management
        .admin_token_env
        .as_deref()
        .and_then(|name| std::env::var(name).ok())
        .filter(|token| !token.is_empty())
        .map(String::into_bytes);
    if admin_token.is_none() {
        tracing::info!("no admin token set: the management API accepts keys:manage keys only");
    }

    let routes = config
        .routes
        .iter()
        .cloned()
        .map(build_route)
        .collect::<Result<Vec<_>, _>>()
        .context("cannot build the upstream pools")?;
    let router = Router::new(routes);

    let mut server_conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    server_conf.upstream_keepalive_pool_size = 256;
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();

    let gateway = Arc::new(Gateway::new(
        Arc::clone(&config),
        router,
        Arc::clone(&index),
        Arc::clone(&usage),
        Arc::clone(&metrics),
        admin_token,
    ));

    for route in gateway.router.routes() {
        let checks = GenBackgroundService::new(
            format!("health checks of route {}", route.name()),
            Arc::clone(&route.balancer),
        );
        server.add_service(checks);
    }
    server.add_service(GenBackgroundService::new(
        "usage flusher".to_string(),
        Arc::new(UsageFlusher {
            usage: Arc::clone(&usage),
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            interval: config.store.usage_flush_interval,
        }),
    ));

    if let StoreBackend::Postgres { url_env, .. } = &config.store.backend {
        server.add_service(GenBackgroundService::new(
            "cache invalidation listener".to_string(),
            Arc::new(InvalidationListener {
                url: database_url(url_env)?,
                index: Arc::clone(&index),
            }),
        ));
    }
    server.add_service(GenBackgroundService::new(
        "housekeeping".to_string(),
        Arc::new(Housekeeping {
            gateway: Arc::clone(&gateway),
        }),
    ));

    let mut proxy = pingora::proxy::http_proxy(
        &server.configuration,
        KeygateProxy {
            gateway: Arc::clone(&gateway),
        },
    );
    // Let CONNECT reach request_filter, which refuses it with keygate's own JSON 405
    // (Pingora's built-in refusal is a bare 405).
    let mut options = pingora::apps::HttpServerOptions::default();
    options.allow_connect_method_proxying = true;
    proxy.server_options = Some(options);
    let mut proxy = Service::new(
        "keygate proxy".to_string(),
        ConnectionCap::new(
            HeaderDeadline::new(
                proxy,
                config.server.header_read_timeout,
                config.server.keepalive_timeout,
            ),
            config.server.max_connections,
        ),
    );
    proxy.add_tcp(&config.server.listen.to_string());
    server.add_service(proxy);

    let mut admin = Service::new(
        "keygate admin".to_string(),
        AdminApp {
            gateway: Arc::clone(&gateway),
        },
    );
    admin.add_tcp(&config.server.admin_listen.to_string());
    server.add_service(admin);

    tracing::info!(
        listen = %config.server.listen,
        admin_listen = %config.server.admin_listen,
        routes = config.routes.len(),
        "keygate started"
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(StopSignals),
    });

    final_flush(&usage, store.as_ref(), &metrics)?;
    tracing::info!("keygate stopped");
    Ok(())
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
