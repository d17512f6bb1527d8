//! After every request (answered locally, proxied or failed): the request metrics and one
//! structured access-log line. The path is logged without its query string, where a key
//! may have been put by mistake; the key itself never appears.

use pingora::proxy::Session;

use crate::config::AccessLog;
use crate::gateway::{Gateway, MANAGEMENT_LABEL, NO_ROUTE_LABEL, RequestCtx, Target};

/// The tracing target of access-log lines; the logging set-up routes it to its own sink.
pub(crate) const TARGET: &str = "keygate::access";

pub(crate) fn record(gateway: &Gateway, session: &Session, ctx: &RequestCtx) {
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let elapsed = ctx.started.elapsed();
    let route_metrics = gateway.route_metrics(ctx);
    route_metrics.count(ctx.outcome);
    route_metrics.duration.observe(elapsed.as_secs_f64());
    if let Some(upstream_status) = ctx.upstream_status {
        route_metrics.upstream_status(upstream_status);
    }

    let req = session.req_header();
    let protocol = gateway.shared.metrics.count_protocol(req.version);
    if ctx.live.config.server.access_log == AccessLog::Off {
        return;
    }
    let route = match &ctx.target {
        Target::Management => MANAGEMENT_LABEL,
        Target::Route { route, .. } => route.name(),
        Target::Undecided => NO_ROUTE_LABEL,
    };
    tracing::info!(
        target: TARGET,
        request_id = %ctx.request_id,
        route,
        method = %req.method,
        protocol,
        path = req.uri.path(),
        original_path = ctx.original_path.as_deref(),
        status,
        outcome = ctx.outcome.label(),
        error = ctx.error_code,
        key_id = ctx.key.as_ref().map(|k| k.id.as_str()),
        owner = ctx.key.as_ref().map(|k| k.owner.as_str()),
        upstream = ctx.upstream.map(|u| u.to_string()).as_deref(),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        client = ctx.client.map(|ip| ip.to_string()).as_deref(),
    );
}
