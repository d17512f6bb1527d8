//! One `[[routes]]` entry onto a `RouteConfig`: name, prefix, host, upstreams, auth and
//! scopes, TLS, timeouts, health checks and the default rate limit.

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::raw::{RawRateLimit, RawRoute};
use super::resolve::{load_ca_file, upstream_host};
use super::validate::{MAX_INTERVAL_MS, MAX_ROUTE_NAME_LEN, MAX_SCOPE_LEN, Problems};
use super::{AuthMode, RouteConfig, UpstreamAddr};
use crate::keys::RateLimit;
use crate::keys::scope::valid_scope;

/// An hour: a cached decision outlives a revoke by up to this long.
const MAX_DECISION_CACHE_SECONDS: u32 = 3600;

/// What the routes validated so far have claimed: names, and (path prefix, host) matchers.
#[derive(Default)]
pub(super) struct SeenRoutes {
    names: HashSet<String>,
    matchers: HashSet<(String, Option<String>)>,
}

pub(super) fn validate_route(
    i: usize,
    route: RawRoute,
    seen: &mut SeenRoutes,
    p: &mut Problems,
) -> RouteConfig {
    let at = |field: &str| format!("routes[{i}].{field}");
    check_route_name(&route.name, &at("name"), &mut seen.names, p);
    check_path_prefix(&route.path_prefix, &at("path_prefix"), p);
    let host = route_host(route.host.as_deref(), &at("host"), p);
    // Prefixes differing only in case would make every request to either one
    // ambiguous (see `path`).
    if !seen
        .matchers
        .insert((route.path_prefix.to_ascii_lowercase(), host.clone()))
    {
        p.add(
            at("path_prefix"),
            "another route already has this path_prefix (ignoring case) and host",
        );
    }
    let upstreams = route_upstreams(i, route.upstreams.as_deref(), p);
    let auth = route_auth(i, &route, p);
    let sni = route_sni(&route, &at("sni"), p);
    let ca_certificates = route_ca_certificates(&route, &at("ca_file"), p);
    if let Some(path) = &route.health_check_path
        && !path.starts_with('/')
    {
        p.add(at("health_check_path"), "must start with '/'");
    }
    let rate_limit = route
        .rate_limit
        .map(|rl| route_rate_limit(&at("rate_limit"), rl, p));
    let mut millis = |field: &str, value: i64, bounds: RangeInclusive<i64>| {
        Duration::from_millis(p.ranged(&at(field), value, bounds))
    };
    RouteConfig {
        connect_timeout: millis("connect_timeout_ms", route.connect_timeout_ms, 1..=600_000),
        read_timeout: millis(
            "read_timeout_ms",
            route.read_timeout_ms,
            1..=MAX_INTERVAL_MS,
        ),
        write_timeout: millis(
            "write_timeout_ms",
            route.write_timeout_ms,
            1..=MAX_INTERVAL_MS,
        ),
        health_check_interval: millis(
            "health_check_interval_ms",
            route.health_check_interval_ms,
            100..=MAX_INTERVAL_MS,
        ),
        name: route.name,
        path_prefix: route.path_prefix,
        host,
        upstreams,
        auth,
        scopes: route.scopes,
        strip_prefix: route.strip_prefix,
        websocket: route.websocket,
        forward_metadata: route.forward_metadata,
        decision_cache_seconds: u32::try_from(route.decision_cache_seconds)
            .ok()
            .filter(|s| *s <= MAX_DECISION_CACHE_SECONDS)
            .unwrap_or_else(|| {
                p.add(
                    at("decision_cache_seconds"),
                    format!("must be 0 to {MAX_DECISION_CACHE_SECONDS}"),
                );
                0
            }),
        tls: route.tls,
        sni,
        ca_certificates,
        health_check_path: route.health_check_path,
        rate_limit,
    }
}

fn check_route_name(name: &str, at: &str, names: &mut HashSet<String>, p: &mut Problems) {
    if name.is_empty() {
        p.add(at, "every route needs a name");
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        || name.len() > MAX_ROUTE_NAME_LEN
    {
        p.add(
            at,
            format!("must be 1 to {MAX_ROUTE_NAME_LEN} characters of A-Za-z0-9_-."),
        );
    } else if !names.insert(name.to_string()) {
        p.add(at, format!("duplicate route name \"{name}\""));
    }
}

fn check_path_prefix(prefix: &str, at: &str, p: &mut Problems) {
    if !prefix.starts_with('/') {
        p.add(at, "must start with '/'");
    } else if prefix.split('/').any(|s| s == "." || s == "..") {
        p.add(at, "must not contain . or .. segments");
    } else if prefix.len() > 1 && prefix.ends_with('/') {
        // `/admin/` would leave `/admin` itself to a shorter prefix, while Express and
        // Spring serve `/admin` and `/admin/` alike.
        p.add(
            at,
            "must not end with '/' (write \"/admin\": it matches /admin and /admin/...)",
        );
    } else if !prefix.bytes().all(is_plain_path_byte) || prefix.contains("//") {
        // Requests are routed on their decoded, unambiguous path (see `path`): a
        // prefix with escapes, `;` or `//` would never match one.
        p.add(
            at,
            "must be a plain path: letters, digits, / and -._~!$&'()*+,=:@ (no %-escapes, ';' or '//')",
        );
    }
}

/// Hosts are matched without case and without a fully qualified name's root dot.
fn route_host(host: Option<&str>, at: &str, p: &mut Problems) -> Option<String> {
    let host = host.map(|h| h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase());
    if let Some(h) = &host
        && !crate::http::host::is_host_name(h)
    {
        p.add(
            at,
            "must be a host name such as api.example.com (no port; requests match on the host alone)",
        );
    }
    host
}

/// The route's upstreams: required, and `[]` only on purpose (a route for forward-auth
/// decisions only).
fn route_upstreams(i: usize, names: Option<&[String]>, p: &mut Problems) -> Vec<UpstreamAddr> {
    let Some(names) = names else {
        p.add(
            format!("routes[{i}].upstreams"),
            "needs upstream addresses (`upstreams = []` for a route that only answers forward-auth decisions)",
        );
        return Vec::new();
    };
    names
        .iter()
        .enumerate()
        .filter_map(|(j, name)| match upstream_host(name) {
            Ok(host) => Some(UpstreamAddr {
                name: name.clone(),
                host,
            }),
            Err(reason) => {
                p.add(format!("routes[{i}].upstreams[{j}]"), reason);
                None
            }
        })
        .collect()
}

/// The route's `auth`, with its `scopes` checked against it.
fn route_auth(i: usize, route: &RawRoute, p: &mut Problems) -> AuthMode {
    let auth = match route.auth.as_str() {
        "required" => AuthMode::Required,
        "none" => AuthMode::None,
        other => {
            p.add(
                format!("routes[{i}].auth"),
                format!("must be \"required\" or \"none\", got \"{other}\""),
            );
            AuthMode::Required
        }
    };
    for (j, scope) in route.scopes.iter().enumerate() {
        if !valid_scope(scope) {
            p.add(
                format!("routes[{i}].scopes[{j}]"),
                format!("a scope is 1 to {MAX_SCOPE_LEN} characters of a-z0-9:._-"),
            );
        }
    }
    if auth == AuthMode::None && !route.scopes.is_empty() {
        p.add(
            format!("routes[{i}].scopes"),
            "a route with auth = \"none\" cannot require scopes",
        );
    }
    auth
}

/// The name sent as TLS SNI: `sni`, or the first upstream's host.
fn route_sni(route: &RawRoute, at: &str, p: &mut Problems) -> String {
    // `tls = true` needs no build check: keygate always builds Pingora with rustls
    // (Cargo.toml), so a TLS peer never silently connects to nothing.
    match (&route.sni, route.tls) {
        (Some(_), false) => {
            p.add(at, "only used when tls = true");
            String::new()
        }
        (Some(sni), true) if sni.is_empty() => {
            p.add(at, "must not be empty");
            String::new()
        }
        (Some(sni), true) => sni.clone(),
        (None, true) => route
            .upstreams
            .iter()
            .flatten()
            .next()
            .and_then(|u| u.rsplit_once(':'))
            .map(|(host, _)| host.trim_matches(['[', ']']).to_string())
            .unwrap_or_default(),
        (None, false) => String::new(),
    }
}

fn route_ca_certificates(route: &RawRoute, at: &str, p: &mut Problems) -> Option<Vec<Vec<u8>>> {
    match (&route.ca_file, route.tls) {
        (Some(_), false) => {
            p.add(at, "only used when tls = true");
            None
        }
        (Some(path), true) => match load_ca_file(path) {
            Ok(certs) => Some(certs),
            Err(reason) => {
                p.add(at, reason);
                None
            }
        },
        (None, _) => None,
    }
}

fn route_rate_limit(at: &str, raw: RawRateLimit, p: &mut Problems) -> RateLimit {
    RateLimit {
        requests: p.ranged(
            &format!("{at}.requests"),
            raw.requests,
            1..=i64::from(RateLimit::MAX_REQUESTS),
        ) as u32,
        window_seconds: p.ranged(
            &format!("{at}.window_seconds"),
            raw.window_seconds,
            1..=i64::from(RateLimit::MAX_WINDOW_SECONDS),
        ) as u32,
    }
}

/// RFC 3986 path characters other than `%` (escapes) and `;` (parameters).
fn is_plain_path_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"/-._~!$&'()*+,=:@".contains(&byte)
}
