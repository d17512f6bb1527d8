//! Step 10 of the request path: the request as the upstream gets it. The key never travels
//! past keygate, spoofed identity headers are dropped, the real identity is added.

use pingora::http::RequestHeader;

use super::ctx::RequestCtx;
use crate::http::body;

pub(crate) fn prepare_upstream_request(
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
        .route()
        .and_then(|route| route.upstream_target(req.raw_path()))
    {
        req.set_raw_path(&target)?;
    }
    Ok(())
}
