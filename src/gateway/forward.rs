//! Step 10 of the request path: the request as the upstream gets it. The key never travels
//! past keygate; spoofed identity and forwarding headers are dropped; the real identity and
//! keygate's own `X-Forwarded-For`, `-Proto` and `-Host` are added, and, on routes with
//! `forward_metadata`, the key's metadata as prepared in the cache.
//!
//! The headers are edited as a plain `http::HeaderMap`, out of Pingora's `RequestHeader`:
//! that type keeps a second, case-preserving map of names, and each insert through it
//! parses the name, copies it twice and grows both maps; out of it, a name is a constant
//! and the map grows once. The price: header names reach the upstream in lowercase
//! (standard ones, such as `Host` and `Content-Type`, titled by Pingora), as behind
//! HAProxy or Envoy. Names are case-insensitive (RFC 9110 §5.1).

use http::header::{CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use pingora::http::{RequestHeader, ResponseHeader};

use super::ctx::RequestCtx;
use crate::http::names::{
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_KEYGATE_KEY_ID, X_KEYGATE_METADATA,
    X_KEYGATE_OWNER, X_KEYGATE_SCOPES, X_REQUEST_ID,
};
use crate::http::{forwarded, upgrade};
use crate::ratelimit;

/// Headers keygate may add: forwarding (3), identity (4), request id, body length.
const ADDED_AT_MOST: usize = 9;

pub(crate) fn prepare_upstream_request(
    req: &mut RequestHeader,
    ctx: &RequestCtx,
    trusted_proxies: &[IpNet],
) -> pingora::Result<()> {
    let target = ctx
        .route()
        .and_then(|route| route.upstream_target(req.raw_path()));
    let send_end_stream = req.send_end_stream();
    // The target is origin-form by now (`normalize_target`), which the URI carries whole.
    let mut parts = http::request::Parts::from(std::mem::replace(req, placeholder()));
    let edited = edit_headers(&mut parts.headers, ctx, trusted_proxies);
    *req = RequestHeader::from(parts);
    edited?;
    if let Some(send_end_stream) = send_end_stream {
        req.set_send_end_stream(send_end_stream);
    }
    if let Some(target) = target {
        req.set_raw_path(&target)?;
    }
    Ok(())
}

fn edit_headers(
    headers: &mut HeaderMap,
    ctx: &RequestCtx,
    trusted_proxies: &[IpNet],
) -> pingora::Result<()> {
    // Read before the client's forwarding headers go.
    let forwarded_for = ctx
        .peer
        .map(|peer| forwarded::forwarded_for(peer, headers, trusted_proxies));
    for name in ctx.credential_sources.header_names() {
        headers.remove(name);
    }
    // Collecting from an iterator that yields nothing allocates nothing.
    let stripped: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| forwarded::is_stripped(name.as_str()))
        .cloned()
        .collect();
    for name in &stripped {
        headers.remove(name);
    }
    headers.reserve(ADDED_AT_MOST);
    if let Some(addresses) = forwarded_for {
        insert(headers, X_FORWARDED_FOR, value(addresses)?)?;
    }
    let proto = if ctx.https { "https" } else { "http" };
    insert(headers, X_FORWARDED_PROTO, HeaderValue::from_static(proto))?;
    if let Some(host) = headers.get(HOST).cloned() {
        insert(headers, X_FORWARDED_HOST, host)?;
    }
    if let Some(key) = &ctx.key {
        insert(headers, X_KEYGATE_KEY_ID, key.id_header.clone())?;
        insert(headers, X_KEYGATE_OWNER, key.owner_header.clone())?;
        insert(headers, X_KEYGATE_SCOPES, key.scopes_header.clone())?;
        let forward_metadata = ctx.route().is_some_and(|r| r.config.forward_metadata);
        if let Some(metadata) = key.metadata_header.as_ref().filter(|_| forward_metadata) {
            insert(headers, X_KEYGATE_METADATA, metadata.clone())?;
        }
    }
    insert(headers, X_REQUEST_ID, ctx.request_id.header_value())?;
    if let Some(length) = ctx.buffered_body {
        // keygate has read the body and answered any `Expect` itself.
        headers.remove(TRANSFER_ENCODING);
        headers.remove(EXPECT);
        insert(headers, CONTENT_LENGTH, HeaderValue::from(length))?;
    }
    if ctx.websocket {
        upgrade::unhold_empty_body(headers);
    }
    Ok(())
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: HeaderValue) -> pingora::Result<()> {
    headers
        .try_insert(name, value)
        .map_err(|_| invalid_header("too many headers"))?;
    Ok(())
}

/// A header value from text a client or the store supplied.
fn value<T>(text: T) -> pingora::Result<HeaderValue>
where
    HeaderValue: TryFrom<T>,
{
    HeaderValue::try_from(text).map_err(|_| invalid_header("invalid header value"))
}

fn invalid_header(what: &'static str) -> Box<pingora::Error> {
    pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, what)
}

/// The upstream's response as the client gets it: with the request id, unless the
/// upstream set its own, and a rate-limited key's `RateLimit-*` headers. Edited out of
/// Pingora's `ResponseHeader` for the reason the request is.
pub(crate) fn prepare_client_response(
    resp: &mut ResponseHeader,
    ctx: &RequestCtx,
) -> pingora::Result<()> {
    let add_request_id = !resp.headers.contains_key(X_REQUEST_ID);
    if !add_request_id && ctx.rate_limit.is_none() {
        return Ok(());
    }
    // `From<ResponseHeader>` keeps no reason phrase: an upstream's own one is put back.
    let reason = resp
        .get_reason_phrase()
        .filter(|reason| Some(*reason) != resp.status.canonical_reason())
        .map(str::to_string);
    let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = http::response::Parts::from(std::mem::replace(resp, placeholder));
    let edited = add_response_headers(&mut parts.headers, ctx, add_request_id);
    *resp = ResponseHeader::from(parts);
    edited?;
    if reason.is_some() {
        resp.set_reason_phrase(reason.as_deref())?;
    }
    Ok(())
}

fn add_response_headers(
    headers: &mut HeaderMap,
    ctx: &RequestCtx,
    add_request_id: bool,
) -> pingora::Result<()> {
    headers.reserve(4);
    if add_request_id {
        insert(headers, X_REQUEST_ID, ctx.request_id.header_value())?;
    }
    if let Some(decision) = ctx.rate_limit {
        for (name, value) in ratelimit::headers(decision) {
            insert(headers, name, value)?;
        }
    }
    Ok(())
}

/// What the request's place holds while its parts are edited: no allocation.
fn placeholder() -> RequestHeader {
    RequestHeader::from(http::Request::new(()).into_parts().0)
}
