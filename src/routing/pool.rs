//! Each route's upstream pool: a round-robin Pingora load balancer with TCP or HTTP health
//! checks, and peers with every timeout set (Pingora's default is none: a hung upstream
//! would hang the request).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pingora::lb::LoadBalancer;
use pingora::lb::health_check::{
    HealthObserve, HealthObserveCallback, HttpHealthCheck, TcpHealthCheck,
};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends};
use pingora::prelude::HttpPeer;
use pingora::protocols::tls::CaType;
use pingora::utils::tls::{WrappedX509, parse_x509};

use super::Route;
use super::dns::{NameResolver, UpstreamDiscovery, UpstreamIndex};
use crate::config::{ConfigProblem, RouteConfig, ServerConfig};
use crate::metrics::{Metrics, RouteMetrics};

/// Idle pooled upstream connections are closed after this.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Route {
    /// The next healthy upstream, round-robin, other than `avoid` (the one that just failed
    /// this request) when another is healthy; None when every upstream is down.
    ///
    /// Walks Pingora's backend set itself rather than through `LoadBalancer::select`, whose
    /// iterator clones each candidate (its extensions map allocated anew) and hashes it
    /// twice, once to skip repeats: about 1,300 instructions a request. A route with one
    /// upstream writes no shared counter.
    pub(crate) fn select_peer(
        &self,
        avoid: Option<SocketAddr>,
    ) -> Option<(Box<HttpPeer>, SocketAddr)> {
        let backends = self.balancer.backends();
        let set = backends.get_backend();
        let start = match set.len() {
            0 => return None,
            1 => 0,
            count => self.next_upstream.fetch_add(1, Ordering::Relaxed) % count,
        };
        let mut avoided = None;
        let candidates = set.iter().cycle().skip(start).take(set.len());
        for (skipped, backend) in candidates.enumerate() {
            let Some(&addr) = backend.addr.as_inet() else {
                continue;
            };
            if !backends.ready(backend) {
                continue;
            }
            if avoid == Some(addr) {
                avoided = Some(addr);
                continue;
            }
            // The next request starts after this one, not at a skipped one: otherwise the
            // upstream after a down one would take its share too.
            if skipped > 0 {
                self.next_upstream.fetch_add(skipped, Ordering::Relaxed);
            }
            return Some(self.peer(addr));
        }
        avoided.map(|addr| self.peer(addr))
    }

    fn peer(&self, addr: SocketAddr) -> (Box<HttpPeer>, SocketAddr) {
        let mut peer = HttpPeer::new(addr, self.config.tls, self.config.sni.clone());
        let options = &mut peer.options;
        options.connection_timeout = Some(self.config.connect_timeout);
        options.total_connection_timeout = Some(self.config.connect_timeout);
        options.read_timeout = Some(self.config.read_timeout);
        options.write_timeout = Some(self.config.write_timeout);
        options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        options.ca = self.trust.clone();
        // Pingora pools upstream connections by address, SNI and verification flags, not
        // by trust roots: without a key of its own, a route could reuse a connection that
        // was verified against another route's `ca_file`.
        peer.group_key = self.id;
        (Box::new(peer), addr)
    }

    /// Health of each upstream as (configured name, healthy): a name is healthy while
    /// any of its addresses is.
    pub(crate) fn upstream_health(&self) -> Vec<(String, bool)> {
        let backends = self.balancer.backends();
        let set = backends.get_backend();
        self.config
            .upstreams
            .iter()
            .enumerate()
            .map(|(index, u)| {
                let healthy = set
                    .iter()
                    .filter(|b| b.ext.get::<UpstreamIndex>().is_some_and(|i| i.0 == index))
                    .any(|b| backends.ready(b));
                (u.name.clone(), healthy)
            })
            .collect()
    }

    /// The addresses the route's upstreams have now (a name may have several).
    pub(crate) fn upstream_addresses(&self) -> usize {
        self.balancer.backends().get_backend().len()
    }

    /// Whether `config`, built with `env`, would give this very route: then a reload keeps
    /// it, with its balancer's health state and pooled connections.
    pub(crate) fn is_built_from(&self, config: &RouteConfig, env: &RouteEnv<'_>) -> bool {
        self.config == *config
            && (!UpstreamDiscovery::has_names(&config.upstreams)
                || (self.resolver == env.resolver && self.dns_refresh == env.dns_refresh))
    }
}

/// Logs an upstream's health changes as one line naming its route (Pingora's own line
/// spells out every peer option; the default log filter hides it).
struct HealthLog {
    route: String,
}

#[async_trait::async_trait]
impl HealthObserve for HealthLog {
    async fn observe(&self, target: &Backend, healthy: bool) {
        let upstream = target.addr.to_string();
        if healthy {
            tracing::info!(route = %self.route, %upstream, "upstream {upstream} of route {} is healthy again", self.route);
        } else {
            tracing::warn!(route = %self.route, %upstream, "upstream {upstream} of route {} failed its health check", self.route);
        }
    }
}

fn observer(config: &RouteConfig) -> HealthObserveCallback {
    Box::new(HealthLog {
        route: config.name.clone(),
    })
}

/// What building a route needs besides its own configuration.
pub(crate) struct RouteEnv<'a> {
    pub metrics: &'a Metrics,
    pub resolver: NameResolver,
    pub dns_refresh: Duration,
}

impl<'a> RouteEnv<'a> {
    pub(crate) fn new(server: &ServerConfig, metrics: &'a Metrics) -> Self {
        RouteEnv {
            metrics,
            resolver: NameResolver::new(&server.resolver),
            dns_refresh: server.dns_refresh,
        }
    }
}

/// Builds a route's balancer, its upstream names resolved. The caller must also run the
/// balancer (`health::HealthChecks`), or its health checks and DNS refreshes never run.
async fn build_route(config: RouteConfig, env: &RouteEnv<'_>) -> std::io::Result<Route> {
    // Each certificate was checked to parse when the config was loaded.
    let trust: Option<Arc<CaType>> = config.ca_certificates.as_ref().map(|certs| {
        certs
            .iter()
            .map(|der| WrappedX509::new(der.clone(), parse_x509))
            .collect::<Vec<_>>()
            .into()
    });
    let discovery = UpstreamDiscovery::new(
        &config.name,
        &config.upstreams,
        env.resolver.clone(),
        env.metrics,
    );
    let mut balancer =
        LoadBalancer::<RoundRobin>::from_backends(Backends::new(Box::new(discovery)));
    balancer
        .update()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if UpstreamDiscovery::has_names(&config.upstreams) {
        balancer.update_frequency = Some(env.dns_refresh);
    }
    match &config.health_check_path {
        Some(path) => {
            let host = config
                .upstreams
                .first()
                .map(|u| u.name.clone())
                .unwrap_or_default();
            let mut check = HttpHealthCheck::new(&host, config.tls);
            if config.tls {
                check.peer_template.sni = config.sni.clone();
                check.peer_template.options.ca = trust.clone();
            }
            check.peer_template.options.connection_timeout = Some(config.connect_timeout);
            let mut req = pingora::http::RequestHeader::build("GET", path.as_bytes(), None)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            req.insert_header("Host", host.as_str())
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            req.insert_header("User-Agent", "keygate-health-check")
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            check.req = req;
            check.health_changed_callback = Some(observer(&config));
            balancer.set_health_check(Box::new(check));
        }
        None => {
            let mut check = if config.tls {
                TcpHealthCheck::new_tls(&config.sni)
            } else {
                TcpHealthCheck::new()
            };
            check.peer_template.options.connection_timeout = Some(config.connect_timeout);
            check.peer_template.options.ca = trust.clone();
            check.health_changed_callback = Some(observer(&config));
            balancer.set_health_check(check);
        }
    }
    balancer.health_check_frequency = Some(config.health_check_interval);
    balancer.parallel_health_check = true;
    let id = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        config.name.hash(&mut hasher);
        hasher.finish()
    };
    Ok(Route {
        metrics: RouteMetrics::new(env.metrics, &config.name),
        balancer: Arc::new(balancer),
        trust,
        id,
        next_upstream: AtomicUsize::new(0),
        resolver: env.resolver.clone(),
        dns_refresh: env.dns_refresh,
        config,
    })
}

/// The routes of `configs` in order, each either kept from `running` (when unchanged, see
/// `Route::is_built_from`) or built anew; the field path of the first that cannot be built.
pub(crate) async fn build_routes(
    configs: &[RouteConfig],
    env: &RouteEnv<'_>,
    running: &[Arc<Route>],
) -> Result<Vec<Arc<Route>>, ConfigProblem> {
    let mut routes = Vec::with_capacity(configs.len());
    for (i, config) in configs.iter().enumerate() {
        let kept = running.iter().find(|r| r.is_built_from(config, env));
        let route = match kept {
            Some(route) => Arc::clone(route),
            None => {
                Arc::new(
                    build_route(config.clone(), env)
                        .await
                        .map_err(|e| ConfigProblem {
                            path: format!("routes[{i}]"),
                            reason: format!("cannot build the upstream pool: {e}"),
                        })?,
                )
            }
        };
        routes.push(route);
    }
    Ok(routes)
}
