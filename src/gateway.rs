//! The request path, top to bottom: request target and path checks, route, credentials,
//! key format, cache (or one store read), expiry, scope, rate limit, a chunked body read
//! whole, usage. Everything the proxy hooks do is decided here.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use pingora::http::RequestHeader;
use pingora::http::authority::{RawTargetAuthority, raw_target_authority};
use pingora::proxy::Session;

use crate::api::ManagementLimiters;
use crate::auth::{self, CredentialSources};
use crate::body;
use crate::config::Config;
use crate::error::{GatewayError, Outcome};
use crate::keys::{KeyFormat, KeyHash};
use crate::metrics::{CacheMetrics, Metrics, RouteMetrics};
use crate::path;
use crate::ratelimit::{Decision, KEY_OWN_LIMIT, KeyLimits};
use crate::service::KeyService;
use crate::store::{CachedKey, KeyIndex, LookupSource};
use crate::upstream::{Route, Router, request_host};
use crate::usage::UsageRecorder;

/// Metrics label for requests that matched no route, and for management calls.
pub const NO_ROUTE_LABEL: &str = "_none";
pub const MANAGEMENT_LABEL: &str = "_management";

pub struct Gateway {
    pub config: Arc<Config>,
    pub format: KeyFormat,
    pub router: Router,
    pub index: Arc<KeyIndex>,
    pub usage: Arc<UsageRecorder>,
    pub metrics: Arc<Metrics>,
    pub service: KeyService,
    pub management_limiters: ManagementLimiters,
    pub rate_limits: KeyLimits,
    /// The admin token's bytes; None = no admin access.
    pub admin_token: Option<Vec<u8>>,
    /// Whether a route prefix or the management path has an upper-case letter (then every
    /// path is also compared regardless of case; otherwise only paths with one).
    case_matters: bool,
    route_metrics: Vec<RouteMetrics>,
    no_route_metrics: RouteMetrics,
    management_metrics: RouteMetrics,
    cache_metrics: CacheMetrics,
}

/// Per-request state shared by the proxy hooks.
pub struct RequestCtx {
    pub started: Instant,
    pub request_id: String,
    pub route: Option<Arc<Route>>,
    route_index: Option<usize>,
    pub outcome: Outcome,
    pub key: Option<Arc<CachedKey>>,
    pub credential_sources: CredentialSources,
    pub management: bool,
    pub upstream: Option<std::net::SocketAddr>,
    /// The upstream whose connection failed this request, avoided on the retry.
    pub failed_upstream: Option<std::net::SocketAddr>,
    pub upstream_status: Option<u16>,
    pub peer_attempts: usize,
    /// The rate-limit verdict, for the `RateLimit-*` response headers.
    pub rate_limit: Option<Decision>,
    pub error_code: Option<&'static str>,
    /// The length of a chunked body read whole before forwarding (see `body`).
    pub buffered_body: Option<usize>,
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx {
            started: Instant::now(),
            request_id: String::new(),
            route: None,
            route_index: None,
            outcome: Outcome::Allowed,
            key: None,
            credential_sources: CredentialSources::default(),
            management: false,
            upstream: None,
            failed_upstream: None,
            upstream_status: None,
            peer_attempts: 0,
            rate_limit: None,
            error_code: None,
            buffered_body: None,
        }
    }
}

/// What a path means to keygate. Routes compare by index.
enum Destination<'a> {
    Management,
    Route(usize, &'a Arc<Route>),
    NoRoute,
}

impl Destination<'_> {
    fn same_as(&self, other: &Destination<'_>) -> bool {
        match (self, other) {
            (Destination::Management, Destination::Management)
            | (Destination::NoRoute, Destination::NoRoute) => true,
            (Destination::Route(a, _), Destination::Route(b, _)) => a == b,
            _ => false,
        }
    }
}

pub enum Admission {
    /// Forward to the route's upstreams.
    Forward,
    /// A management API call; the API authenticates it itself.
    Management,
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        router: Router,
        index: Arc<KeyIndex>,
        usage: Arc<UsageRecorder>,
        metrics: Arc<Metrics>,
        admin_token: Option<Vec<u8>>,
    ) -> Self {
        let format = KeyFormat::new(&config.keys.prefix);
        let route_metrics = router
            .routes()
            .iter()
            .map(|r| RouteMetrics::new(&metrics, r.name()))
            .collect();
        Gateway {
            service: KeyService::new(Arc::clone(&index), Arc::clone(&usage), format.clone()),
            management_limiters: ManagementLimiters::new(
                &config.management.limits,
                config.signup.per_client_per_hour,
            ),
            no_route_metrics: RouteMetrics::new(&metrics, NO_ROUTE_LABEL),
            management_metrics: RouteMetrics::new(&metrics, MANAGEMENT_LABEL),
            cache_metrics: CacheMetrics::new(&metrics),
            rate_limits: KeyLimits::default(),
            case_matters: router.has_uppercase_prefixes()
                || config
                    .management
                    .path
                    .bytes()
                    .any(|b| b.is_ascii_uppercase()),
            route_metrics,
            format,
            config,
            router,
            index,
            usage,
            metrics,
            admin_token,
        }
    }

    /// Decides what happens to a request. On `Err`, the caller answers with the error.
    pub async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Admission, GatewayError> {
        let req = session.req_header();
        if req.method == http::Method::CONNECT {
            return Err(GatewayError::ConnectNotAllowed);
        }
        if header_size(req) > self.config.server.max_header_bytes {
            return Err(GatewayError::HeaderTooLarge);
        }
        normalize_target(session.req_header_mut())?;
        let req = session.req_header();
        if req.version == http::Version::HTTP_11 && !req.headers.contains_key(http::header::HOST) {
            return Err(GatewayError::MissingHost);
        }
        let path = req.uri.path();
        // Without host-bound routes the Host header decides nothing here.
        let host = if self.router.has_host_routes() {
            request_host(req).map_err(|_| GatewayError::InvalidHost)?
        } else {
            None
        };
        let lenient = path::lenient_reading(path).map_err(|_| GatewayError::InvalidPath)?;
        let as_read = lenient.as_deref().unwrap_or(path);
        // `//x/...` is a URL with host `x` to some upstream parsers.
        if path.contains('\\') || path::leads_with_authority(path) || path::has_dot_segment(as_read)
        {
            return Err(GatewayError::InvalidPath);
        }
        let destination = self.destination(host, path, false);
        let elsewhere = |read: &str, ignore_case| {
            !self
                .destination(host, read, ignore_case)
                .same_as(&destination)
        };
        // Where no route takes the path as sent, nothing is forwarded: 404 whatever the
        // other readings say.
        // The lenient reading can make letters of escapes (`%2541` reads as `A`).
        let compare_case = self.case_matters || as_read.bytes().any(|b| b.is_ascii_uppercase());
        if !matches!(destination, Destination::NoRoute)
            && (lenient
                .as_deref()
                .is_some_and(|read| elsewhere(read, false))
                || (compare_case && elsewhere(as_read, true)))
        {
            return Err(GatewayError::AmbiguousPath);
        }
        let (index, route) = match destination {
            Destination::Management => {
                ctx.management = true;
                return Ok(Admission::Management);
            }
            Destination::NoRoute => return Err(GatewayError::NoRoute),
            Destination::Route(index, route) => (index, route),
        };
        // On a strip_prefix route the upstream sees only the rest: it must not look like
        // an authority either (`/api//evil.example/x`).
        if route
            .stripped_rest(path)
            .is_some_and(path::leads_with_authority)
        {
            return Err(GatewayError::InvalidPath);
        }
        ctx.route = Some(Arc::clone(route));
        ctx.route_index = Some(index);

        if route.is_public() {
            ctx.outcome = Outcome::Public;
        } else {
            let auth_started = Instant::now();
            let authenticated = self.authenticate(&req.headers).await;
            self.metrics
                .auth_duration
                .observe(auth_started.elapsed().as_secs_f64());
            let (key, sources) = authenticated?;
            if !auth::has_scopes(&key.scopes, &route.config.scopes) {
                return Err(GatewayError::InsufficientScope);
            }
            let limit = match (key.rate_limit, route.config.rate_limit) {
                (Some(own), _) => Some((own, KEY_OWN_LIMIT)),
                (None, Some(route_default)) => Some((route_default, index as u32)),
                (None, None) => None,
            };
            if let Some((limit, scope)) = limit {
                let decision = self.rate_limits.check(
                    limit.requests,
                    limit.window_seconds,
                    key.id_number,
                    scope,
                );
                ctx.rate_limit = Some(decision);
                if let Decision::Limited { retry_after, .. } = decision {
                    ctx.key = Some(key);
                    return Err(GatewayError::RateLimited { retry_after });
                }
            }
            ctx.key = Some(key);
            ctx.credential_sources = sources;
        }

        // Only an admitted request gets its chunked body read, and only a request whose
        // body checks out is counted and forwarded.
        if body::framing(req)? == body::Framing::Chunked {
            let deadline = self.config.server.header_read_timeout;
            ctx.buffered_body = Some(body::buffer_chunked(session, deadline).await?);
        }
        if let Some(key) = &ctx.key {
            self.usage.record(key.id_number, &key.id, unix_now());
        }
        Ok(Admission::Forward)
    }

    /// Finds and checks the request's key: present, well-formed, known, not revoked, not
    /// expired. Only a key missing from the cache costs a store read.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<(Arc<CachedKey>, CredentialSources), GatewayError> {
        let credential = auth::extract(headers, &self.format)
            .map_err(|_| GatewayError::ConflictingCredentials)?
            .ok_or(GatewayError::MissingCredentials)?;
        self.format
            .check(credential.value)
            .map_err(|_| GatewayError::InvalidKey)?;
        let hash = KeyHash::of(credential.value);
        let resolved = self.index.resolve(&hash).await.map_err(|e| {
            tracing::warn!(error = %e, "key store read failed");
            GatewayError::StoreUnavailable
        })?;
        match resolved.source {
            LookupSource::Hit => self.cache_metrics.hit.inc(),
            LookupSource::NegativeHit => self.cache_metrics.negative_hit.inc(),
            LookupSource::Miss => {
                self.cache_metrics.miss.inc();
                self.metrics.store_reads.inc();
            }
        }
        let key = resolved.key.ok_or(GatewayError::InvalidKey)?;
        if key.is_expired(unix_now()) {
            return Err(GatewayError::KeyExpired);
        }
        Ok((key, credential.sources))
    }

    /// Where `path` leads: the management API, a route, or nowhere; with `ignore_case`,
    /// where it leads for an upstream that compares paths regardless of case.
    fn destination(&self, host: Option<&str>, path: &str, ignore_case: bool) -> Destination<'_> {
        if self.is_management_path(path, ignore_case) {
            return Destination::Management;
        }
        let found = if ignore_case {
            self.router.find_ignoring_case(host, path)
        } else {
            self.router.find(host, path)
        };
        match found {
            Some((index, route)) => Destination::Route(index, route),
            None => Destination::NoRoute,
        }
    }

    fn is_management_path(&self, path: &str, ignore_case: bool) -> bool {
        let base = self.config.management.path.as_bytes();
        let Some(head) = path.as_bytes().get(..base.len()) else {
            return false;
        };
        let rest = &path.as_bytes()[base.len()..];
        let same = if ignore_case {
            head.eq_ignore_ascii_case(base)
        } else {
            head == base
        };
        same && (rest.is_empty() || rest.starts_with(b"/"))
    }

    /// Rewrites the request for the upstream: the key never travels past keygate, spoofed
    /// identity headers are dropped, the real identity is added.
    pub fn prepare_upstream_request(
        &self,
        req: &mut RequestHeader,
        ctx: &RequestCtx,
    ) -> pingora::Result<()> {
        for name in ctx.credential_sources.header_names() {
            req.remove_header(name);
        }
        let spoofed: Vec<http::HeaderName> = req
            .headers
            .keys()
            .filter(|name| name.as_str().starts_with("x-keygate-"))
            .cloned()
            .collect();
        for name in &spoofed {
            req.remove_header(name);
        }
        if let Some(key) = &ctx.key {
            req.insert_header("x-keygate-key-id", key.id_header.clone())?;
            req.insert_header("x-keygate-owner", key.owner_header.clone())?;
            req.insert_header("x-keygate-scopes", key.scopes_header.clone())?;
        }
        req.insert_header("x-request-id", ctx.request_id.as_str())?;
        if let Some(length) = ctx.buffered_body {
            body::frame_as_buffered(req, length)?;
        }
        if let Some(target) = ctx
            .route
            .as_ref()
            .and_then(|route| route.upstream_target(req.raw_path()))
        {
            req.set_raw_path(&target)?;
        }
        Ok(())
    }

    /// The metrics of the request's route (or of the no-route / management pseudo routes).
    pub fn route_metrics(&self, ctx: &RequestCtx) -> &RouteMetrics {
        if ctx.management {
            return &self.management_metrics;
        }
        ctx.route_index
            .and_then(|i| self.route_metrics.get(i))
            .unwrap_or(&self.no_route_metrics)
    }
}

/// Bytes of the request line and header block, as received (give or take separators).
fn header_size(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    req.headers.iter().fold(line + 12, |total, (name, value)| {
        total + name.as_str().len() + value.len() + 4
    })
}

/// The client's `x-request-id` when it is sane (1–128 visible ASCII characters), else a
/// fresh ULID.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| crate::keys::new_ulid().to_string(), str::to_string)
}

/// Puts the request target in origin-form with its unreserved escapes decoded, which is
/// how it is routed and forwarded (see `path`). An absolute-form target (`GET
/// http://host/p`) becomes `/p`, with `Host` taken from the URL when the client sent none
/// (Pingora has already refused a different one). Any other form is refused: Pingora
/// would route it as `/` but forward it as sent, for the upstream to read as it likes.
fn normalize_target(req: &mut RequestHeader) -> Result<(), GatewayError> {
    let target = req.raw_path();
    let (origin, authority) = if target.first() == Some(&b'/') || target == b"*" {
        (target, None)
    } else {
        match raw_target_authority(target) {
            RawTargetAuthority::Absolute {
                scheme,
                authority,
                path_and_query,
            } if scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https") => {
                (path_and_query, Some(authority))
            }
            _ => return Err(GatewayError::InvalidTarget),
        }
    };
    let (path, query) = path::split_query(origin);
    let decoded = path::decode_unreserved(path).map_err(|_| GatewayError::InvalidPath)?;
    if authority.is_none() && decoded.is_none() {
        return Ok(());
    }
    let path = decoded.as_deref().unwrap_or(path);
    let mut rewritten = Vec::with_capacity(path.len() + query.len() + 1);
    if !path.starts_with(b"/") && path != b"*" {
        rewritten.push(b'/');
    }
    rewritten.extend_from_slice(path);
    rewritten.extend_from_slice(query);
    let authority = authority.map(<[u8]>::to_vec);
    if let Some(authority) = authority
        && !req.headers.contains_key(http::header::HOST)
    {
        let host = HeaderValue::from_bytes(&authority).map_err(|_| GatewayError::InvalidTarget)?;
        req.insert_header(http::header::HOST, host)
            .map_err(|_| GatewayError::InvalidTarget)?;
    }
    req.set_raw_path(&rewritten)
        .map_err(|_| GatewayError::InvalidPath)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_eq!(request_id(&h).len(), 26);
        assert_eq!(request_id(&HeaderMap::new()).len(), 26);
    }
}
