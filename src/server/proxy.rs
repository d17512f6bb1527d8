//! The Pingora `ProxyHttp` implementation. Hooks only delegate: decisions live in
//! `gateway`, the management API in `management`, response writing in `session::respond`.

use std::sync::Arc;

use async_trait::async_trait;
use http::HeaderValue;
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::protocols::UniqueID;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};

use crate::error::GatewayError;
use crate::gateway::{self, Admission, Gateway, RequestCtx};
use crate::http::body;
use crate::http::target::RequestId;
use crate::management::Management;
use crate::session::respond::{self, Reply};

const NO_HEALTHY_UPSTREAM: &str = "no_healthy_upstream";

pub(crate) struct KeygateProxy {
    pub gateway: Arc<Gateway>,
    pub management: Arc<Management>,
}

/// Answers with a refusal (from the request path or a failed proxy attempt), its
/// `RateLimit-*` headers included.
async fn refuse(
    session: &mut Session,
    ctx: &mut RequestCtx,
    refusal: GatewayError,
) -> pingora::Result<()> {
    ctx.error_code = Some(refusal.code());
    let mut reply =
        Reply::gateway_error(refusal, ctx.request_id.as_str()).with_rate_limit(ctx.rate_limit);
    if ctx.forward_auth {
        // A proxy in front must not reuse a refusal for later requests.
        reply = reply.with_header(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
    }
    respond::send(session, reply, &ctx.request_id).await
}

/// A WebSocket upgrade the upstream accepted: from now on the connection is a tunnel that
/// the sweep closes when its key is revoked or expires.
fn watch_tunnel(gateway: &Gateway, session: &Session, ctx: &mut RequestCtx) {
    let (true, Some(key)) = (ctx.websocket, &ctx.key) else {
        return;
    };
    if let Some(stream) = session.downstream_session.stream() {
        // On Unix a stream's unique id is its socket descriptor.
        let socket = UniqueID::id(&**stream);
        ctx.tunnel = Some(gateway.shared.tunnels.register(key, socket));
    }
}

/// Maps a proxying failure to what the client is told; None when the client is gone.
fn classify(error: &Error) -> Option<GatewayError> {
    match error.etype() {
        ErrorType::Custom(NO_HEALTHY_UPSTREAM) => Some(GatewayError::NoHealthyUpstream),
        ErrorType::ConnectTimedout
        | ErrorType::ReadTimedout
        | ErrorType::WriteTimedout
        | ErrorType::TLSHandshakeTimedout => Some(GatewayError::UpstreamTimeout),
        _ => match error.esource() {
            ErrorSource::Upstream => Some(GatewayError::UpstreamUnavailable),
            ErrorSource::Downstream => match error.etype() {
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => None,
                _ => Some(GatewayError::MalformedRequest),
            },
            ErrorSource::Internal | ErrorSource::Unset => Some(GatewayError::Internal),
        },
    }
}

/// The error as Pingora will log it: one line naming the route, the upstream and the root
/// cause, instead of the peer's whole option set.
fn upstream_error(error: &Error, ctx: &RequestCtx) -> Box<Error> {
    let route = ctx.route().map_or(gateway::NO_ROUTE_LABEL, |r| r.name());
    let upstream = ctx.upstream.map(|u| u.to_string()).unwrap_or_default();
    let reason = error.root_cause().to_string();
    let mut short = Error::explain(
        error.etype().clone(),
        format!("route {route}, upstream {upstream}: {reason}"),
    );
    short.esource = error.esource().clone();
    short.retry = error.retry;
    short
}

#[async_trait]
impl ProxyHttp for KeygateProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        let shared = &self.gateway.shared;
        RequestCtx::new(shared.drain.enter(), shared.live())
    }

    /// None. Pingora's default adds its response compression module, disabled, which still
    /// allocates a context and runs its filters on every request; keygate compresses
    /// nothing (it forwards what the upstream sent).
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        super::conn_limits::header_parsed();
        ctx.https = super::tls::is_tls(session);
        super::tls::h2_request_seen(session);
        let keepalive_off = session.get_keepalive().is_none();
        ctx.framed_both_ways = body::framed_both_ways(session.req_header(), keepalive_off);
        // Where Pingora has already decided to close (HTTP/1.0, `Connection: close`, both
        // `Transfer-Encoding` and `Content-Length`: a smuggling attempt), that stands.
        // Otherwise it keeps the connection with no timeout of its own (`Some(0)`): the
        // header deadline closes an idle one after `keepalive_timeout_seconds`
        // (`conn_limits::HeaderDeadline`), where Pingora's keep-alive timeout would register
        // a timer for every read of the connection.
        if self.gateway.shared.drain.is_draining() {
            // Stopping: this response is the connection's last.
            session.set_keepalive(None);
        } else if session.get_keepalive().is_some() {
            session.set_keepalive(Some(0));
        }
        // Without this Pingora answers the first of pipelined requests and drops the rest.
        // Not for an upgrade: its idle read would take a tunnel's first bytes for the
        // next pipelined request.
        let upgrade = session
            .req_header()
            .headers
            .contains_key(http::header::UPGRADE);
        session.downstream_session.set_pipelining_enabled(!upgrade);
        Ok(())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.request_id = RequestId::of(&session.req_header().headers);
        match self.gateway.admit(session, ctx).await {
            Ok(Admission::Forward) => Ok(false),
            Ok(Admission::Management) => {
                self.management.serve(session, ctx).await?;
                Ok(true)
            }
            Ok(Admission::Decided) => {
                let reply = gateway::admitted_decision(ctx);
                respond::send(session, reply, &ctx.request_id).await?;
                Ok(true)
            }
            Err(error) => {
                if error.ends_connection() {
                    session.set_keepalive(None);
                }
                ctx.outcome = error.outcome();
                refuse(session, ctx, error).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        ctx.peer_attempts += 1;
        let avoid = ctx.failed_upstream;
        let selected = ctx.route().and_then(|route| route.select_peer(avoid));
        match selected {
            Some((peer, upstream)) => {
                ctx.upstream = Some(upstream);
                Ok(peer)
            }
            None => Err(Error::explain(
                ErrorType::Custom(NO_HEALTHY_UPSTREAM),
                "every upstream of the route is unhealthy",
            )),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        error: Box<Error>,
    ) -> Box<Error> {
        let mut error = upstream_error(&error, ctx);
        // A refused or failed connect sent nothing upstream: try the route's next upstream,
        // each at most once, before giving up.
        let upstreams = ctx.route().map_or(0, |r| r.upstream_addresses());
        error.set_retry(ctx.peer_attempts < upstreams);
        ctx.failed_upstream = ctx.upstream;
        error
    }

    /// Pingora's own retry rule (idempotent requests whose body is still buffered, on a
    /// reused connection), plus: the retry avoids the upstream that just failed.
    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        error: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut error = upstream_error(&error, ctx);
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            error.set_retry(false);
        } else {
            error.retry.decide_reuse(client_reused);
        }
        ctx.failed_upstream = ctx.upstream;
        error
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let ctx: &RequestCtx = ctx;
        let proxies = &ctx.live.config.server.trusted_proxies;
        gateway::prepare_upstream_request(upstream_request, ctx, proxies)
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        ctx.upstream_status = Some(upstream_response.status.as_u16());
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            watch_tunnel(&self.gateway, session, ctx);
        }
        gateway::prepare_client_response(upstream_response, ctx)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let Some(refusal) = classify(error) else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        if ctx.request_id.is_empty() {
            ctx.request_id = RequestId::of(&session.req_header().headers);
        }
        if refusal == GatewayError::MalformedRequest {
            ctx.outcome = refusal.outcome();
        }
        // Pingora drops the connection after a failed proxy attempt (the request body may be
        // half-sent): say so, or a pooling client would reuse a dead connection.
        session.set_keepalive(None);
        let written = refuse(session, ctx, refusal).await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "could not send the error response");
        }
        FailToProxy {
            error_code: refusal.status(),
            can_reuse_downstream: false,
        }
    }

    /// What Pingora's own error log says about a request: never the query string, where a
    /// key may have been put by mistake.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!(
            "{} {} (request {})",
            req.method,
            req.uri.path(),
            ctx.request_id
        )
    }

    async fn logging(&self, session: &mut Session, _error: Option<&Error>, ctx: &mut RequestCtx) {
        // Before Pingora closes the client socket the tunnel sweep may shut down.
        ctx.tunnel = None;
        super::conn_limits::request_done();
        super::access::record(&self.gateway, session, ctx);
    }
}
