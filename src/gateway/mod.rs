//! The request path, top to bottom, one named step per line of `admit` (the README's
//! "The request path" lists the same steps): the request line and target, the path's
//! destination, credentials and key, scopes and rate limit, a chunked body read whole,
//! usage. Everything the proxy hooks decide is decided here.

mod ctx;
mod destination;
mod forward;
mod forward_auth;

pub(crate) use ctx::{RequestCtx, Target};
pub(crate) use destination::management_rest;
pub(crate) use forward::{prepare_client_response, prepare_upstream_request};
pub(crate) use forward_auth::admitted as admitted_decision;

use std::sync::Arc;
use std::time::Instant;

use pingora::http::RequestHeader;
use pingora::proxy::Session;

use crate::clock::unix_now;
use crate::error::GatewayError;
use crate::http::upgrade::{self, UpgradeRequest};
use crate::http::{body, forwarded, target};
use crate::keys::scope::has_scopes;
use crate::metrics::{Outcome, RouteMetrics};
use crate::ratelimit::{Budget, Verdict};
use crate::routing::Route;
use crate::state::Shared;
use crate::store::CachedKey;
use destination::{Destination, Destinations};

/// Metrics label for requests that matched no route, and for management calls.
pub(crate) const NO_ROUTE_LABEL: &str = "_none";
pub(crate) const MANAGEMENT_LABEL: &str = "_management";

pub(crate) enum Admission {
    /// Forward to the route's upstreams.
    Forward,
    /// A management API call; the API authenticates it itself.
    Management,
    /// A forward-auth call whose original request is admitted: answered, not forwarded.
    Decided,
}

pub(crate) struct Gateway {
    pub shared: Arc<Shared>,
    no_route_metrics: RouteMetrics,
    management_metrics: RouteMetrics,
}

impl Gateway {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let metrics = &shared.metrics;
        Gateway {
            no_route_metrics: RouteMetrics::new(metrics, NO_ROUTE_LABEL),
            management_metrics: RouteMetrics::new(metrics, MANAGEMENT_LABEL),
            shared,
        }
    }

    /// Decides what happens to a request. On `Err`, the caller answers with the error.
    pub(crate) async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Admission, GatewayError> {
        // 1: who is asking; the request line, its framing, target and Host.
        self.identify_client(session, ctx);
        self.check_request_line(session.req_header(), ctx)?;
        target::normalize_target(session.req_header_mut())?;
        check_host_present(session.req_header())?;
        // 2-3: where the path leads, read every way an upstream might read it; whether an
        // upgrade may go there.
        let live = Arc::clone(&ctx.live);
        let route = match Destinations::of(&live).destination_of(session.req_header())? {
            Destination::Management => {
                settle_upgrade(session.req_header_mut(), false);
                let management_path = &live.config.management.path;
                let path = session.req_header().uri.path();
                if let Some(suffix) = forward_auth::authorize_suffix(management_path, path) {
                    let suffix = suffix.to_string();
                    return self.decide(session, ctx, &suffix).await;
                }
                ctx.target = Target::Management;
                return Ok(Admission::Management);
            }
            Destination::NoRoute => return Err(GatewayError::NoRoute),
            Destination::Route(_, route) => Arc::clone(route),
        };
        ctx.websocket = settle_upgrade(session.req_header_mut(), route.config.websocket);
        // 4-7: the key, and what it may do here.
        self.admit_to_route(session.req_header(), ctx, route)
            .await?;
        // 8-9: a chunked body read whole; usage counted. Step 10, the request as the
        // upstream gets it, is `prepare_upstream_request`.
        self.read_chunked_body(session, ctx).await?;
        self.count_usage(ctx);
        if ctx.websocket {
            upgrade::hold_empty_body(session.req_header_mut())
                .map_err(|_| GatewayError::Internal)?;
        }
        Ok(Admission::Forward)
    }

    /// Steps 4 to 7 on the route a request (or a forward-auth call's original) selected:
    /// nothing on a public route, else the key (from `req`'s headers) and its rights.
    async fn admit_to_route(
        &self,
        req: &RequestHeader,
        ctx: &mut RequestCtx,
        route: Arc<Route>,
    ) -> Result<(), GatewayError> {
        ctx.target = Target::Route {
            route: Arc::clone(&route),
        };
        if route.is_public() {
            ctx.outcome = Outcome::Public;
            return Ok(());
        }
        let key = self.authenticate(req, ctx).await?;
        self.authorize(key, &route, ctx).await
    }

    /// The peer, and the client behind it when the peer is a trusted proxy.
    fn identify_client(&self, session: &Session, ctx: &mut RequestCtx) {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let proxies = &ctx.live.config.server.trusted_proxies;
        let headers = &session.req_header().headers;
        ctx.peer = peer;
        ctx.client = peer.map(|ip| forwarded::client_address(ip, headers, proxies));
    }

    /// CONNECT is not served; a body is framed one way only (`http::body::framed_both_ways`);
    /// the request line and headers must fit `max_header_bytes`.
    fn check_request_line(
        &self,
        req: &RequestHeader,
        ctx: &RequestCtx,
    ) -> Result<(), GatewayError> {
        if req.method == http::Method::CONNECT {
            return Err(GatewayError::ConnectNotAllowed);
        }
        if ctx.framed_both_ways {
            return Err(GatewayError::ConflictingFraming);
        }
        if target::header_size(req) > ctx.live.config.server.max_header_bytes {
            return Err(GatewayError::HeaderTooLarge);
        }
        Ok(())
    }

    /// Steps 4 to 6: credentials, key format, cache or store, expiry.
    async fn authenticate(
        &self,
        req: &RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Arc<CachedKey>, GatewayError> {
        let started = Instant::now();
        let authenticated = self.shared.auth.authenticate(&req.headers).await;
        let metrics = &self.shared.metrics;
        metrics
            .auth_duration
            .observe(started.elapsed().as_secs_f64());
        let (key, sources) = authenticated?;
        ctx.credential_sources = sources;
        Ok(key)
    }

    /// Step 7: the key's allowlist (the client as `identify_client` found it), the route's
    /// scopes, then the key's rate limit (its own, else the route's) and its quota, decided
    /// together (here, or in one Redis round trip).
    async fn authorize(
        &self,
        key: Arc<CachedKey>,
        route: &Route,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        if !key.admits_from(ctx.client) {
            return Err(GatewayError::IpNotAllowed);
        }
        if !has_scopes(&key.scopes, &route.config.scopes) {
            return Err(GatewayError::InsufficientScope);
        }
        let limit = match (key.rate_limit, route.config.rate_limit) {
            (Some(own), _) => Some((own, Budget::Key)),
            (None, Some(route_default)) => Some((route_default, Budget::Route(route.id))),
            (None, None) => None,
        };
        let now = unix_now();
        let verdict = self.shared.limits.spend(&key, limit, now).await;
        if let Verdict::RateLimited(decision)
        | Verdict::Admitted {
            rate: Some(decision),
            ..
        } = verdict
        {
            ctx.rate_limit = Some(decision);
        }
        ctx.quota_stamp = key.quota_stamp(now);
        ctx.key = Some(key);
        verdict.admitted()
    }

    /// Step 8: only an admitted request gets its chunked body read, and only a request
    /// whose body checks out is counted and forwarded.
    async fn read_chunked_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        if body::framing(session.req_header())? == body::Framing::Chunked {
            let deadline = ctx.live.config.server.header_read_timeout;
            let length = crate::session::body::buffer_chunked(session, deadline).await?;
            ctx.buffered_body = Some(length);
        }
        Ok(())
    }

    /// Step 9: usage is counted in memory; the flusher writes it later.
    fn count_usage(&self, ctx: &RequestCtx) {
        if let Some(key) = &ctx.key {
            let usage = &self.shared.usage;
            usage.record(key.id_number, &key.id, unix_now(), ctx.quota_stamp);
        }
    }

    /// The metrics of the request's route (or of the no-route / management pseudo routes).
    pub(crate) fn route_metrics<'a>(&'a self, ctx: &'a RequestCtx) -> &'a RouteMetrics {
        match ctx.target {
            Target::Management => &self.management_metrics,
            Target::Route { ref route, .. } => &route.metrics,
            Target::Undecided => &self.no_route_metrics,
        }
    }
}

/// Step 3: an upgrade goes through only to WebSocket, on a route that allows it; any other
/// loses its upgrade headers and is forwarded as an ordinary request. True for a WebSocket
/// upgrade that goes through.
fn settle_upgrade(req: &mut RequestHeader, route_allows_websocket: bool) -> bool {
    match upgrade::classify(req) {
        UpgradeRequest::None => false,
        UpgradeRequest::WebSocket if route_allows_websocket => true,
        UpgradeRequest::WebSocket | UpgradeRequest::Other => {
            upgrade::strip(req);
            false
        }
    }
}

/// An HTTP/1.1 request needs a Host (RFC 9112 3.2).
fn check_host_present(req: &RequestHeader) -> Result<(), GatewayError> {
    if req.version == http::Version::HTTP_11 && !req.headers.contains_key(http::header::HOST) {
        return Err(GatewayError::MissingHost);
    }
    Ok(())
}
