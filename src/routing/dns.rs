//! Upstreams written as host names: resolved when a route is built and again every
//! `server.dns_refresh_seconds` by the route's balancer (Pingora's service discovery). A
//! name that stops resolving keeps the addresses it last had, so a DNS outage never takes
//! an upstream away; each such failure is logged and counted.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use parking_lot::Mutex;
use pingora::lb::Backend;
use pingora::lb::discovery::ServiceDiscovery;
use prometheus::IntCounter;

use crate::config::{Config, ConfigProblem, UpstreamAddr, UpstreamHost};
use crate::metrics::Metrics;

/// How long one name server gets to answer.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Who is asked for host names: the system (getaddrinfo, so /etc/hosts and `localhost`
/// work as everywhere else) or the name servers of `server.resolver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NameResolver {
    System,
    Servers(Vec<SocketAddr>),
}

impl NameResolver {
    pub(crate) fn new(servers: &[SocketAddr]) -> Self {
        if servers.is_empty() {
            NameResolver::System
        } else {
            NameResolver::Servers(servers.to_vec())
        }
    }

    /// Every address `host` has now, with `port`.
    pub(crate) async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = match self {
            NameResolver::System => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| e.to_string())?
                .collect(),
            NameResolver::Servers(servers) => {
                // A resolver per lookup: refreshes are seconds apart, its cache would only
                // hide changes, and its connections would belong to whichever runtime
                // happened to build it (routes are first built before Pingora's start).
                let resolver = hickory(servers).map_err(|e| e.to_string())?;
                let fqdn = format!("{}.", host.trim_end_matches('.'));
                resolver
                    .lookup_ip(fqdn.as_str())
                    .await
                    .map_err(|e| e.to_string())?
                    .iter()
                    .map(|ip: IpAddr| SocketAddr::new(ip, port))
                    .collect()
            }
        };
        if addrs.is_empty() {
            return Err("no address".into());
        }
        Ok(addrs)
    }
}

fn hickory(
    servers: &[SocketAddr],
) -> Result<Resolver<TokioRuntimeProvider>, hickory_resolver::net::NetError> {
    let name_servers = servers
        .iter()
        .map(|server| {
            let mut config = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut config.connections {
                connection.port = server.port();
            }
            config
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.timeout = LOOKUP_TIMEOUT;
    options.attempts = 1;
    options.cache_size = 0;
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(name_servers),
        TokioRuntimeProvider::default(),
    )
    .with_options(options)
    .build()
}

/// Which configured upstream a backend came from (its `ext`), for health by upstream.
#[derive(Debug, Clone, Copy)]
pub(super) struct UpstreamIndex(pub usize);

/// A route's upstreams as Pingora's service discovery: addresses as they are, names as
/// they resolve now or, failing that, as they last resolved.
pub(super) struct UpstreamDiscovery {
    route: String,
    upstreams: Vec<UpstreamAddr>,
    resolver: NameResolver,
    last_good: Mutex<HashMap<usize, Vec<SocketAddr>>>,
    failures: Vec<IntCounter>,
}

impl UpstreamDiscovery {
    pub(super) fn new(
        route: &str,
        upstreams: &[UpstreamAddr],
        resolver: NameResolver,
        metrics: &Metrics,
    ) -> Self {
        UpstreamDiscovery {
            route: route.to_string(),
            failures: upstreams
                .iter()
                .map(|u| {
                    metrics
                        .dns_failures
                        .with_label_values(&[route, u.name.as_str()])
                })
                .collect(),
            upstreams: upstreams.to_vec(),
            resolver,
            last_good: Mutex::new(HashMap::new()),
        }
    }

    /// Whether any upstream is a name (then the balancer refreshes).
    pub(super) fn has_names(upstreams: &[UpstreamAddr]) -> bool {
        upstreams
            .iter()
            .any(|u| matches!(u.host, UpstreamHost::Name { .. }))
    }

    async fn addresses(&self, index: usize, upstream: &UpstreamAddr) -> Vec<SocketAddr> {
        let (host, port) = match &upstream.host {
            UpstreamHost::Addr(addr) => return vec![*addr],
            UpstreamHost::Name { host, port } => (host, *port),
        };
        match self.resolver.lookup(host, port).await {
            Ok(addrs) => {
                self.last_good.lock().insert(index, addrs.clone());
                addrs
            }
            Err(problem) => {
                if let Some(counter) = self.failures.get(index) {
                    counter.inc();
                }
                let kept = self
                    .last_good
                    .lock()
                    .get(&index)
                    .cloned()
                    .unwrap_or_default();
                tracing::warn!(
                    route = %self.route,
                    upstream = %upstream.name,
                    %problem,
                    kept = kept.len(),
                    "upstream {} of route {} does not resolve ({problem}); keeping its last {} addresses",
                    upstream.name,
                    self.route,
                    kept.len()
                );
                kept
            }
        }
    }
}

#[async_trait]
impl ServiceDiscovery for UpstreamDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let mut backends = BTreeSet::new();
        for (index, upstream) in self.upstreams.iter().enumerate() {
            for addr in self.addresses(index, upstream).await {
                let mut backend = Backend::new(&addr.to_string())?;
                backend.ext.insert(UpstreamIndex(index));
                backends.insert(backend);
            }
        }
        Ok((backends, HashMap::new()))
    }
}

/// A warning for each upstream name of `config` that does not resolve now (`keygate
/// check`): a gateway would still start, and resolve it again every refresh.
pub(crate) async fn unresolved_names(config: &Config) -> Vec<ConfigProblem> {
    let resolver = NameResolver::new(&config.server.resolver);
    let mut warnings = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        for (j, upstream) in route.upstreams.iter().enumerate() {
            let UpstreamHost::Name { host, port } = &upstream.host else {
                continue;
            };
            if let Err(problem) = resolver.lookup(host, *port).await {
                warnings.push(ConfigProblem {
                    path: format!("routes[{i}].upstreams[{j}]"),
                    reason: format!(
                        "`{}` does not resolve now ({problem}); the gateway will keep trying every server.dns_refresh_seconds",
                        upstream.name
                    ),
                });
            }
        }
    }
    warnings
}
