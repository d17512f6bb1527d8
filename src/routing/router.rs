//! Routes and longest-prefix matching on whole path segments, with or without ASCII case.

use std::sync::Arc;

use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use pingora::protocols::tls::CaType;

use std::time::Duration;

use super::dns::NameResolver;
use crate::config::{AuthMode, RouteConfig};
use crate::http::path;
use crate::metrics::RouteMetrics;

/// One configured route with its upstream pool (built in `pool`).
pub(crate) struct Route {
    pub config: RouteConfig,
    pub balancer: Arc<LoadBalancer<RoundRobin>>,
    /// The route's counters, resolved once.
    pub metrics: RouteMetrics,
    /// The route's own trust roots (`ca_file`), shared by every peer.
    pub(super) trust: Option<Arc<CaType>>,
    /// From the route's name: keeps its pooled upstream connections to itself (see
    /// `select_peer`) and its default rate limit's budgets across reloads.
    pub id: u64,
    /// Round-robin position among several upstreams (`select_peer`).
    pub(super) next_upstream: std::sync::atomic::AtomicUsize,
    /// How the route's upstream names were resolved.
    pub(super) resolver: NameResolver,
    pub(super) dns_refresh: Duration,
}

impl Route {
    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    pub(crate) fn is_public(&self) -> bool {
        self.config.auth == AuthMode::None
    }

    /// What a `strip_prefix` route forwards of `path` (before a `/` is put in front of an
    /// empty or relative rest); None when the route forwards paths whole.
    pub(crate) fn stripped_rest<'p>(&self, path: &'p str) -> Option<&'p str> {
        path.strip_prefix(self.stripped_prefix()?)
    }

    /// The prefix a `strip_prefix` route removes; None when it forwards paths whole.
    fn stripped_prefix(&self) -> Option<&str> {
        (self.config.strip_prefix && self.config.path_prefix != "/")
            .then(|| self.config.path_prefix.trim_end_matches('/'))
    }

    /// The request target the upstream gets on a `strip_prefix` route, query kept (bytes:
    /// a target need not be UTF-8); None when the route forwards targets as they are.
    pub(crate) fn upstream_target(&self, target: &[u8]) -> Option<Vec<u8>> {
        let prefix = self.stripped_prefix()?.as_bytes();
        let (path, query) = path::split_query(target);
        let rest = path.strip_prefix(prefix).unwrap_or(path);
        let mut stripped = Vec::with_capacity(rest.len() + query.len() + 1);
        if !rest.starts_with(b"/") {
            stripped.push(b'/');
        }
        stripped.extend_from_slice(rest);
        stripped.extend_from_slice(query);
        Some(stripped)
    }
}

/// Longest-prefix routing. A prefix matches whole path segments: `/api` matches `/api` and
/// `/api/x`, not `/apix`. Among equal prefixes, a route with a matching `host` wins.
pub(crate) struct Router {
    /// Sorted by prefix length, longest first; host-bound routes first among equals.
    routes: Vec<Arc<Route>>,
    host_bound: bool,
    uppercase_prefixes: bool,
}

impl Router {
    pub(crate) fn new(mut routes: Vec<Arc<Route>>) -> Self {
        routes.sort_by(|a, b| {
            b.config
                .path_prefix
                .len()
                .cmp(&a.config.path_prefix.len())
                .then(b.config.host.is_some().cmp(&a.config.host.is_some()))
        });
        Router {
            host_bound: routes.iter().any(|r| r.config.host.is_some()),
            uppercase_prefixes: routes
                .iter()
                .any(|r| r.config.path_prefix.bytes().any(|b| b.is_ascii_uppercase())),
            routes,
        }
    }

    /// Whether any route is bound to a host (else the Host header does not matter).
    pub(crate) fn has_host_routes(&self) -> bool {
        self.host_bound
    }

    /// Whether any route prefix has an upper-case letter.
    pub(crate) fn has_uppercase_prefixes(&self) -> bool {
        self.uppercase_prefixes
    }

    pub(crate) fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The matching route and its index in `routes()`.
    pub(crate) fn find(&self, host: Option<&str>, path: &str) -> Option<(usize, &Arc<Route>)> {
        self.find_by(host, path, <[u8]>::starts_with)
    }

    /// As `find`, with prefixes compared regardless of ASCII case: the route a
    /// case-insensitive upstream (IIS, some Spring set-ups) would see the path under.
    pub(crate) fn find_ignoring_case(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Option<(usize, &Arc<Route>)> {
        self.find_by(host, path, |path, prefix| {
            path.get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        })
    }

    fn find_by(
        &self,
        host: Option<&str>,
        path: &str,
        starts_with: impl Fn(&[u8], &[u8]) -> bool,
    ) -> Option<(usize, &Arc<Route>)> {
        self.routes.iter().enumerate().find(|(_, route)| {
            let host_ok = match (&route.config.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            host_ok && prefix_matches(&route.config.path_prefix, path, &starts_with)
        })
    }
}

fn prefix_matches(prefix: &str, path: &str, starts_with: impl Fn(&[u8], &[u8]) -> bool) -> bool {
    let (prefix, path) = (prefix.as_bytes(), path.as_bytes());
    if !starts_with(path, prefix) {
        return false;
    }
    prefix.ends_with(b"/") || path.len() == prefix.len() || path[prefix.len()] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::routing::{RouteEnv, build_routes};

    fn router(toml: &str) -> Router {
        let config = Config::parse(toml).expect("valid");
        let metrics = Metrics::new();
        let env = RouteEnv::new(&config.server, &metrics);
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        Router::new(
            runtime
                .block_on(build_routes(&config.routes, &env, &[]))
                .expect("routes"),
        )
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let r = router(
            r#"
[[routes]]
name = "root"
upstreams = ["127.0.0.1:1"]
[[routes]]
name = "api"
path_prefix = "/api"
upstreams = ["127.0.0.1:2"]
[[routes]]
name = "api-admin"
path_prefix = "/api/admin"
upstreams = ["127.0.0.1:3"]
[[routes]]
name = "api-host"
path_prefix = "/api"
host = "special.example"
upstreams = ["127.0.0.1:4"]
"#,
        );
        let name = |host, path| r.find(host, path).map(|(_, x)| x.name().to_string());
        assert_eq!(name(None, "/").as_deref(), Some("root"));
        assert_eq!(name(None, "/api").as_deref(), Some("api"));
        assert_eq!(name(None, "/api/x").as_deref(), Some("api"));
        assert_eq!(name(None, "/apix").as_deref(), Some("root"));
        assert_eq!(name(None, "/api/admin/users").as_deref(), Some("api-admin"));
        assert_eq!(
            name(Some("special.example"), "/api/x").as_deref(),
            Some("api-host")
        );
        assert_eq!(
            name(Some("SPECIAL.example"), "/api").as_deref(),
            Some("api-host")
        );
    }

    #[test]
    fn case_insensitive_matching_finds_the_route_a_lenient_upstream_would() {
        let r = router(
            "[[routes]]\nname = \"root\"\nupstreams = [\"127.0.0.1:1\"]\n\
             [[routes]]\nname = \"admin\"\npath_prefix = \"/admin\"\nupstreams = [\"127.0.0.1:2\"]\n",
        );
        let exact = |path| r.find(None, path).map(|(_, x)| x.name().to_string());
        let folded = |path| {
            r.find_ignoring_case(None, path)
                .map(|(_, x)| x.name().to_string())
        };
        assert_eq!(exact("/ADMIN/x").as_deref(), Some("root"));
        assert_eq!(folded("/ADMIN/x").as_deref(), Some("admin"));
        assert_eq!(folded("/Adminx").as_deref(), Some("root"));
    }

    #[test]
    fn strip_prefix_works_on_bytes() {
        let r = router(
            "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nstrip_prefix = true\nupstreams = [\"127.0.0.1:1\"]\n",
        );
        let route = &r.routes()[0];
        assert_eq!(
            route.upstream_target(b"/api/caf\xe9?q=\xff"),
            Some(b"/caf\xe9?q=\xff".to_vec())
        );
        assert_eq!(route.upstream_target(b"/api"), Some(b"/".to_vec()));
        assert_eq!(route.upstream_target(b"/api?x"), Some(b"/?x".to_vec()));
    }

    #[test]
    fn no_match_without_root_route() {
        let r = router(
            "[[routes]]\nname = \"a\"\npath_prefix = \"/a\"\nupstreams = [\"127.0.0.1:1\"]\n",
        );
        assert!(r.find(None, "/b").is_none());
    }
}
