//! Live reconfiguration (contract section 10): SIGHUP and `POST /-/reload` read the file the
//! gateway started with, check all of it, build what it needs (routes, the listener's
//! stack, the certificate, the access log), and only then put it in force, all at once; a
//! file with any problem changes nothing. Requests in flight keep the configuration they
//! arrived under (`state::Live`), and open connections keep their stack.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::clock::unix_now;
use crate::config::{Config, ConfigErrors, ConfigProblem};
use crate::logging::AccessLogSink;
use crate::management::Management;
use crate::routing::{HealthChecks, RouteEnv, Router, build_routes};
use crate::server::edge::Edge;
use crate::server::ops::Reload;
use crate::state::{Live, Shared};

pub(crate) struct Reloader {
    pub path: PathBuf,
    pub shared: Arc<Shared>,
    pub management: Arc<Management>,
    pub edge: Arc<Edge>,
    pub access_log: Arc<AccessLogSink>,
    pub health: Arc<HealthChecks>,
    /// Reloads run one at a time: two at once could each build from the same running
    /// routes and the later commit would drop the earlier's.
    pub serial: tokio::sync::Mutex<()>,
}

fn one(problem: ConfigProblem) -> ConfigErrors {
    ConfigErrors(vec![problem])
}

impl Reloader {
    async fn try_reload(&self) -> Result<Vec<&'static str>, ConfigErrors> {
        let running = self.shared.live();
        let read = Config::load(&self.path)?;
        let restart_required = read.restart_required(&running.config);
        let config = read.keeping_restart_fields(&running.config);
        for warning in config.warnings(unix_now()) {
            tracing::warn!(%warning, "configuration warning");
        }
        let env = RouteEnv::new(&config.server, &self.shared.metrics);
        let routes = build_routes(&config.routes, &env, running.router.routes())
            .await
            .map_err(one)?;
        let edge = self.edge.prepare(&config.server).map_err(one)?;
        let access_log = AccessLogSink::open(&config.server.access_log).map_err(|reason| {
            one(ConfigProblem {
                path: "server.access_log".into(),
                reason,
            })
        })?;

        let router = Router::new(routes);
        self.health.follow(router.routes());
        let config = Arc::new(config);
        self.management.apply(&config);
        self.shared.put_live(Live {
            config: Arc::clone(&config),
            router,
        });
        self.edge.commit(edge);
        self.access_log.switch_to(access_log);
        Ok(restart_required)
    }
}

#[async_trait]
impl Reload for Reloader {
    async fn reload(&self) -> Result<Vec<&'static str>, ConfigErrors> {
        let _one_at_a_time = self.serial.lock().await;
        let outcome = self.try_reload().await;
        self.shared
            .metrics
            .count_reload(outcome.is_ok(), unix_now());
        match &outcome {
            Ok(restart_required) if restart_required.is_empty() => {
                tracing::info!(path = %self.path.display(), "configuration reloaded");
            }
            Ok(restart_required) => tracing::warn!(
                path = %self.path.display(),
                ?restart_required,
                "configuration reloaded; these fields take effect at the next start: {}",
                restart_required.join(", ")
            ),
            Err(errors) => tracing::error!(
                path = %self.path.display(),
                "configuration not reloaded (the running one stays in force):\n{errors}"
            ),
        }
        outcome
    }
}

/// SIGHUP reloads. `hangup_seen` is set by a SIGHUP that came before this service listened
/// (from the first moment of the process, so that an early one cannot kill it).
pub(crate) struct Hangups {
    pub reloader: Arc<Reloader>,
    pub hangup_seen: Arc<AtomicBool>,
}

#[async_trait]
impl BackgroundService for Hangups {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler; reload with POST /-/reload");
            return;
        };
        if self.hangup_seen.swap(false, Ordering::SeqCst) {
            let _ = self.reloader.reload().await;
        }
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    let _ = self.reloader.reload().await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
