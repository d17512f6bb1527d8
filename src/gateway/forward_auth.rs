//! Forward authentication (contract section 11): `<management.path>/authorize[/<path>]`
//! answers the request path's own decision for the original request that another proxy
//! (nginx `auth_request`, Traefik `ForwardAuth`, Envoy `ext_authz`, Caddy `forward_auth`)
//! names, and forwards nothing. The original goes through the same target and path checks,
//! route selection, key, scopes, rate limit and usage count as a proxied request, so an
//! authorize call can never admit a request the request path would refuse.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use pingora::proxy::Session;

use super::destination::{Destination, Destinations, management_rest};
use super::{Admission, Gateway, RequestCtx};
use crate::error::GatewayError;
use crate::http::names::{X_KEYGATE_KEY_ID, X_KEYGATE_METADATA, X_KEYGATE_OWNER, X_KEYGATE_SCOPES};
use crate::http::{original, target};
use crate::session::respond::Reply;

const AUTHORIZE: &str = "/authorize";

/// What an authorize call's path has after `/authorize` (`""` for none), or None when the
/// path is not an authorize call.
pub(super) fn authorize_suffix<'p>(management_path: &str, path: &'p str) -> Option<&'p str> {
    let rest = management_rest(management_path, path, false)?;
    let suffix = rest.strip_prefix(AUTHORIZE)?;
    (suffix.is_empty() || suffix.starts_with('/')).then_some(suffix)
}

impl Gateway {
    /// Decides for the original request the call names; the credentials are the call's own
    /// (the proxy passes the client's headers).
    pub(super) async fn decide(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        suffix: &str,
    ) -> Result<Admission, GatewayError> {
        ctx.forward_auth = true;
        let mut original = original::original_request(session.req_header(), suffix)?;
        target::normalize_target(&mut original)?;
        let live = Arc::clone(&ctx.live);
        let route = match Destinations::of(&live).destination_of(&original)? {
            Destination::Route(_, route) => Arc::clone(route),
            // The management API authenticates its own calls: no route decides for it.
            Destination::Management | Destination::NoRoute => return Err(GatewayError::NoRoute),
        };
        ctx.original_path = Some(original.uri.path().to_string());
        self.admit_to_route(session.req_header(), ctx, route)
            .await?;
        self.count_usage(ctx);
        Ok(Admission::Decided)
    }
}

/// The answer to an admitted authorize call: 200, no body, the identity headers (none on a
/// public route) and the rate-limit headers. A proxy may cache it for the route's
/// `decision_cache_seconds`, unless a rate limit or a quota applies (even one Redis could
/// not decide just now): a cached yes would let the key past it.
pub(crate) fn admitted(ctx: &RequestCtx) -> Reply {
    let mut reply = Reply::json(200, Bytes::new()).with_rate_limit(ctx.rate_limit);
    if let Some(key) = &ctx.key {
        reply = reply
            .with_header(X_KEYGATE_KEY_ID, key.id_header.clone())
            .with_header(X_KEYGATE_OWNER, key.owner_header.clone())
            .with_header(X_KEYGATE_SCOPES, key.scopes_header.clone());
        let forward_metadata = ctx.route().is_some_and(|r| r.config.forward_metadata);
        if let Some(metadata) = key.metadata_header.as_ref().filter(|_| forward_metadata) {
            reply = reply.with_header(X_KEYGATE_METADATA, metadata.clone());
        }
    }
    let cache_for = ctx.route().map_or(0, |r| r.config.decision_cache_seconds);
    let key_limited = ctx
        .key
        .as_ref()
        .is_some_and(|key| key.rate_limit.is_some() || key.quota.is_some());
    let route_limited = ctx.route().is_some_and(|r| r.config.rate_limit.is_some());
    let limited = key_limited || route_limited;
    let cache_control = if cache_for > 0 && !limited {
        HeaderValue::from_str(&format!("private, max-age={cache_for}"))
            .unwrap_or(HeaderValue::from_static("no-store"))
    } else {
        HeaderValue::from_static("no-store")
    };
    reply.with_header(http::header::CACHE_CONTROL, cache_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorize_calls_are_the_path_and_what_follows_it_on_whole_segments() {
        let base = "/_keygate";
        assert_eq!(authorize_suffix(base, "/_keygate/authorize"), Some(""));
        assert_eq!(
            authorize_suffix(base, "/_keygate/authorize/api/x"),
            Some("/api/x")
        );
        assert_eq!(authorize_suffix(base, "/_keygate/authorize/"), Some("/"));
        assert_eq!(authorize_suffix(base, "/_keygate/authorized"), None);
        assert_eq!(authorize_suffix(base, "/_keygate/keys"), None);
        assert_eq!(authorize_suffix(base, "/authorize"), None);
    }
}
