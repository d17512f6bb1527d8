//! Health checks and DNS refreshes for whatever routes are in force: one task per route's
//! balancer, started when a route appears and stopped when a reload drops it. A route a
//! reload keeps keeps its task, and so its upstreams' health.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Route;

pub(crate) struct HealthChecks {
    routes: watch::Sender<Vec<Arc<Route>>>,
}

impl HealthChecks {
    pub(crate) fn new(routes: &[Arc<Route>]) -> Self {
        HealthChecks {
            routes: watch::Sender::new(routes.to_vec()),
        }
    }

    /// From now on, checks exactly these routes.
    pub(crate) fn follow(&self, routes: &[Arc<Route>]) {
        self.routes.send_replace(routes.to_vec());
    }
}

/// A route's identity is its allocation: a rebuilt route is a new one.
fn identity(route: &Arc<Route>) -> usize {
    Arc::as_ptr(route) as usize
}

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut wanted = self.routes.subscribe();
        let mut running: HashMap<usize, (Arc<Route>, JoinHandle<()>)> = HashMap::new();
        loop {
            let routes = wanted.borrow_and_update().clone();
            for route in &routes {
                running.entry(identity(route)).or_insert_with(|| {
                    let balancer = Arc::clone(&route.balancer);
                    let stop = shutdown.clone();
                    let task = tokio::spawn(async move { balancer.run(stop, None).await });
                    (Arc::clone(route), task)
                });
            }
            running.retain(|id, (_, task)| {
                let keep = routes.iter().any(|r| identity(r) == *id);
                if !keep {
                    task.abort();
                }
                keep
            });
            tokio::select! {
                changed = wanted.changed() => if changed.is_err() { break },
                _ = shutdown.changed() => break,
            }
        }
        for (_, task) in running.into_values() {
            task.abort();
        }
    }
}
