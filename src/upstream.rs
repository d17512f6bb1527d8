//! Routes and their upstream pools: longest-prefix matching, a round-robin Pingora load
//! balancer per route with TCP or HTTP health checks, and peers with every timeout set
//! (Pingora's default is none: a hung upstream would hang the request).

use std::sync::Arc;

use pingora::lb::LoadBalancer;
use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::prelude::HttpPeer;
use pingora::protocols::tls::CaType;
use pingora::utils::tls::{WrappedX509, parse_x509};

use crate::config::{AuthMode, RouteConfig};

pub struct Route {
    pub config: RouteConfig,
    pub balancer: Arc<LoadBalancer<RoundRobin>>,
    /// The route's own trust roots (`ca_file`), shared by every peer.
    trust: Option<Arc<CaType>>,
}

impl Route {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn is_public(&self) -> bool {
        self.config.auth == AuthMode::None
    }

    /// The next healthy upstream, round-robin, other than `avoid` (the one that just failed
    /// this request) when another is healthy; None when every upstream is down.
    pub fn select_peer(
        &self,
        avoid: Option<std::net::SocketAddr>,
    ) -> Option<(Box<HttpPeer>, std::net::SocketAddr)> {
        let backend = avoid
            .and_then(|failed| {
                self.balancer.select_with(b"", 256, |backend, healthy| {
                    healthy && backend.addr.as_inet() != Some(&failed)
                })
            })
            .or_else(|| self.balancer.select(b"", 256))?;
        let addr = *backend.addr.as_inet()?;
        let mut peer = HttpPeer::new(addr, self.config.tls, self.config.sni.clone());
        let options = &mut peer.options;
        options.connection_timeout = Some(self.config.connect_timeout);
        options.total_connection_timeout = Some(self.config.connect_timeout);
        options.read_timeout = Some(self.config.read_timeout);
        options.write_timeout = Some(self.config.write_timeout);
        options.idle_timeout = Some(std::time::Duration::from_secs(60));
        options.ca = self.trust.clone();
        Some((Box::new(peer), addr))
    }

    /// Health of each upstream as (configured name, healthy).
    pub fn upstream_health(&self) -> Vec<(String, bool)> {
        let backends = self.balancer.backends();
        let set = backends.get_backend();
        self.config
            .upstreams
            .iter()
            .map(|u| {
                let healthy = set
                    .iter()
                    .find(|b| b.addr.as_inet() == Some(&u.addr))
                    .is_some_and(|b| backends.ready(b));
                (u.name.clone(), healthy)
            })
            .collect()
    }

    /// What a `strip_prefix` route forwards of `path` (before a `/` is put in front of an
    /// empty or relative rest); None when the route forwards paths whole.
    pub fn stripped_rest<'p>(&self, path: &'p str) -> Option<&'p str> {
        path.strip_prefix(self.stripped_prefix()?)
    }

    /// The prefix a `strip_prefix` route removes; None when it forwards paths whole.
    fn stripped_prefix(&self) -> Option<&str> {
        (self.config.strip_prefix && self.config.path_prefix != "/")
            .then(|| self.config.path_prefix.trim_end_matches('/'))
    }

    /// The request target the upstream gets on a `strip_prefix` route, query kept (bytes:
    /// a target need not be UTF-8); None when the route forwards targets as they are.
    pub fn upstream_target(&self, target: &[u8]) -> Option<Vec<u8>> {
        let prefix = self.stripped_prefix()?.as_bytes();
        let (path, query) = crate::path::split_query(target);
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

/// Builds a route's balancer. The caller must also run it as a background service, or
/// its health checks never run.
pub fn build_route(config: RouteConfig) -> std::io::Result<Route> {
    // Each certificate was checked to parse when the config was loaded.
    let trust: Option<Arc<CaType>> = config.ca_certificates.as_ref().map(|certs| {
        certs
            .iter()
            .map(|der| WrappedX509::new(der.clone(), parse_x509))
            .collect::<Vec<_>>()
            .into()
    });
    let mut balancer =
        LoadBalancer::<RoundRobin>::try_from_iter(config.upstreams.iter().map(|u| u.addr))?;
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
            balancer.set_health_check(check);
        }
    }
    balancer.health_check_frequency = Some(config.health_check_interval);
    balancer.parallel_health_check = true;
    Ok(Route {
        config,
        balancer: Arc::new(balancer),
        trust,
    })
}

/// Longest-prefix routing. A prefix matches whole path segments: `/api` matches `/api` and
/// `/api/x`, not `/apix`. Among equal prefixes, a route with a matching `host` wins.
pub struct Router {
    /// Sorted by prefix length, longest first; host-bound routes first among equals.
    routes: Vec<Arc<Route>>,
    host_bound: bool,
    uppercase_prefixes: bool,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        let mut routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
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
    pub fn has_host_routes(&self) -> bool {
        self.host_bound
    }

    /// Whether any route prefix has an upper-case letter.
    pub fn has_uppercase_prefixes(&self) -> bool {
        self.uppercase_prefixes
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The matching route and its index in `routes()`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<(usize, &Arc<Route>)> {
        self.find_by(host, path, <[u8]>::starts_with)
    }

    /// As `find`, with prefixes compared regardless of ASCII case: the route a
    /// case-insensitive upstream (IIS, some Spring set-ups) would see the path under.
    pub fn find_ignoring_case(
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

/// A Host header that is not a plain host name or IP literal (with an optional port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidHost;

/// The request's host from its Host header (which `gateway` fills in from an absolute-form
/// URL that came without one): without port, brackets or a fully qualified name's root dot
/// (`api.example.` is `api.example` to every upstream). Anything but a plain name, an IPv4
/// address or a bracketed IPv6 address is refused: `[public.example]junk` must not be
/// routed as `public.example` while the upstream reads something else.
pub fn request_host(req: &pingora::http::RequestHeader) -> Result<Option<&str>, InvalidHost> {
    let Some(value) = req.headers.get(http::header::HOST) else {
        return Ok(None);
    };
    let raw = value.to_str().map_err(|_| InvalidHost)?;
    // An empty Host is allowed for a target without an authority (RFC 9112 3.2).
    if raw.is_empty() {
        return Ok(None);
    }
    let (host, port) = match raw.strip_prefix('[') {
        Some(bracketed) => {
            let (literal, after) = bracketed.split_once(']').ok_or(InvalidHost)?;
            literal
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| InvalidHost)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(InvalidHost)?),
            };
            (literal, port)
        }
        None => match raw.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, None),
        },
    };
    // RFC 3986 allows an empty port (`example.com:`).
    if port.is_some_and(|p| !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err(InvalidHost);
    }
    if raw.starts_with('[') {
        return Ok(Some(host));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if !is_host_name(name) {
        return Err(InvalidHost);
    }
    Ok(Some(name))
}

/// Dot-separated labels of letters, digits, `-` and `_` (an IPv4 address is such a name).
pub fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(toml: &str) -> Router {
        let config = Config::parse(toml).expect("valid");
        Router::new(
            config
                .routes
                .into_iter()
                .map(|r| build_route(r).expect("route"))
                .collect(),
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
    fn hosts_lose_port_brackets_and_root_dot() {
        let host_of = |header: &str| {
            let mut req = pingora::http::RequestHeader::build("GET", b"/", None).expect("req");
            if !header.is_empty() {
                req.insert_header("host", header).expect("host");
            }
            request_host(&req).map(|h| h.map(str::to_string))
        };
        for (header, host) in [
            ("api.example:8080", "api.example"),
            ("api.example.", "api.example"),
            ("api.example.:443", "api.example"),
            ("API.example", "API.example"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[::1]:80", "::1"),
            ("[::1]", "::1"),
            ("api.example:", "api.example"),
        ] {
            assert_eq!(host_of(header), Ok(Some(host.to_string())), "{header}");
        }
        assert_eq!(host_of(""), Ok(None));
        let mut empty = pingora::http::RequestHeader::build("GET", b"/", None).expect("req");
        empty.insert_header("host", "").expect("host");
        assert_eq!(request_host(&empty), Ok(None));
        for bad in [
            "[public.example]",
            "[public.example]junk",
            "[::1]junk",
            "api.example:80x",
            "a..b",
            ".",
            "api example",
            "api.example:80:81",
            "user@api.example",
        ] {
            assert_eq!(host_of(bad), Err(InvalidHost), "{bad}");
        }
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
