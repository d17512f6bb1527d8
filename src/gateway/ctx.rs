//! Per-request state shared by the proxy hooks, from the first hook to the access log.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::drain::InFlight;
use crate::http::credentials::CredentialSources;
use crate::http::target::RequestId;
use crate::metrics::Outcome;
use crate::ratelimit::Decision;
use crate::routing::Route;
use crate::state::Live;
use crate::store::CachedKey;
use crate::tunnels::TunnelGuard;

/// Where the request path sent a request.
#[derive(Default)]
pub(crate) enum Target {
    /// Refused before a destination was known (or no route matched).
    #[default]
    Undecided,
    Management,
    Route {
        route: Arc<Route>,
    },
}

pub(crate) struct RequestCtx {
    pub started: Instant,
    pub request_id: RequestId,
    pub target: Target,
    pub outcome: Outcome,
    pub key: Option<Arc<CachedKey>>,
    pub credential_sources: CredentialSources,
    /// The TCP peer, and the client as `X-Forwarded-For` from a trusted proxy names it
    /// (the peer itself otherwise): the address of the access log, the audit log and the
    /// per-client limits.
    pub peer: Option<IpAddr>,
    pub client: Option<IpAddr>,
    pub upstream: Option<SocketAddr>,
    /// The upstream whose connection failed this request, avoided on the retry.
    pub failed_upstream: Option<SocketAddr>,
    pub upstream_status: Option<u16>,
    pub peer_attempts: usize,
    /// The rate-limit verdict, for the `RateLimit-*` response headers.
    pub rate_limit: Option<Decision>,
    /// The quota count an admitted request spent (see `keys::quota_stamp`), for usage.
    pub quota_stamp: Option<i64>,
    pub error_code: Option<&'static str>,
    /// The length of a chunked body read whole before forwarding (see `http::body`).
    pub buffered_body: Option<usize>,
    /// The body was framed both with `Content-Length` and `Transfer-Encoding` (found in
    /// the first hook, before keygate changes the connection's keep-alive).
    pub framed_both_ways: bool,
    /// A forward-auth call (`<management.path>/authorize`), and the path of the original
    /// request it named once known.
    pub forward_auth: bool,
    pub original_path: Option<String>,
    /// A WebSocket upgrade this route forwards (`websocket = true`).
    pub websocket: bool,
    /// Set once the upstream accepted the upgrade: the tunnel is watched until logging.
    pub tunnel: Option<TunnelGuard>,
    /// The client reached keygate over TLS (`X-Forwarded-Proto: https`).
    pub https: bool,
    /// The configuration and routes in force when the request arrived, kept to its end.
    pub live: Arc<Live>,
    /// Counts this request as in flight until the context is dropped, after logging.
    _in_flight: InFlight,
}

impl RequestCtx {
    /// A request that has just arrived (the clock starts now).
    pub(crate) fn new(in_flight: InFlight, live: Arc<Live>) -> Self {
        RequestCtx {
            started: Instant::now(),
            request_id: RequestId::none(),
            target: Target::Undecided,
            outcome: Outcome::Allowed,
            key: None,
            credential_sources: CredentialSources::default(),
            peer: None,
            client: None,
            upstream: None,
            failed_upstream: None,
            upstream_status: None,
            peer_attempts: 0,
            rate_limit: None,
            quota_stamp: None,
            error_code: None,
            buffered_body: None,
            framed_both_ways: false,
            forward_auth: false,
            original_path: None,
            websocket: false,
            tunnel: None,
            https: false,
            live,
            _in_flight: in_flight,
        }
    }

    pub(crate) fn route(&self) -> Option<&Arc<Route>> {
        match &self.target {
            Target::Route { route, .. } => Some(route),
            _ => None,
        }
    }
}
