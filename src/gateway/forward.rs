//! Step 10 of the request path: the request as the upstream gets it. The key never travels
//! past keygate; spoofed identity and forwarding headers are dropped; the real identity and
//! keygate's own `X-Forwarded-For`, `-Proto` and `-Host` are added, and, on routes with
//! `forward_metadata`, the key's metadata as prepared in the cache.

use ipnet::IpNet;
use pingora::http::RequestHeader;

use super::ctx::RequestCtx;
use crate::http::{body, forwarded, upgrade};

pub(crate) fn prepare_upstream_request(
    req: &mut RequestHeader,
    ctx: &RequestCtx,
    trusted_proxies: &[IpNet],
) -> pingora::Result<()> {
    // Read before the client's forwarding headers go.
    let forwarded_for = ctx
        .peer
        .map(|peer| forwarded::forwarded_for(peer, &req.headers, trusted_proxies));
    for name in ctx.credential_sources.header_names() {
        req.remove_header(name);
    }
    // Collecting from an iterator that yields nothing allocates nothing.
    let stripped: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|name| forwarded::is_stripped(name.as_str()))
        .cloned()
        .collect();
    for name in &stripped {
        req.remove_header(name);
    }
    if let Some(value) = forwarded_for {
        req.insert_header("x-forwarded-for", value)?;
    }
    let proto = if ctx.https { "https" } else { "http" };
    req.insert_header("x-forwarded-proto", proto)?;
    if let Some(host) = req.headers.get(http::header::HOST).cloned() {
        req.insert_header("x-forwarded-host", host)?;
    }
    if let Some(key) = &ctx.key {
        req.insert_header("x-keygate-key-id", key.id_header.clone())?;
        req.insert_header("x-keygate-owner", key.owner_header.clone())?;
        req.insert_header("x-keygate-scopes", key.scopes_header.clone())?;
        let forward_metadata = ctx.route().is_some_and(|r| r.config.forward_metadata);
        if let Some(metadata) = key.metadata_header.as_ref().filter(|_| forward_metadata) {
            req.insert_header("x-keygate-metadata", metadata.clone())?;
        }
    }
    req.insert_header("x-request-id", ctx.request_id.as_str())?;
    if let Some(length) = ctx.buffered_body {
        body::frame_as_buffered(req, length)?;
    }
    if ctx.websocket {
        upgrade::unhold_empty_body(req);
    }
    if let Some(target) = ctx
        .route()
        .and_then(|route| route.upstream_target(req.raw_path()))
    {
        req.set_raw_path(&target)?;
    }
    Ok(())
}
