//! The key console (contract section 15): a page, its style sheet and its script, embedded
//! in the binary at build time and served under `<management.path>/console/` without
//! credentials. The page is a client of the management API like any other: it holds no
//! secret of its own and gets no privilege from being served here.

use http::header::{
    CONTENT_SECURITY_POLICY, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::session::respond::Reply;

/// One embedded file; `name` is its path below `console/` (`""` is the page itself).
struct Asset {
    name: &'static str,
    body: &'static [u8],
    content_type: &'static str,
}

const ASSETS: [Asset; 4] = [
    Asset {
        name: "",
        body: include_bytes!("index.html"),
        content_type: "text/html; charset=utf-8",
    },
    Asset {
        name: "console.css",
        body: include_bytes!("console.css"),
        content_type: "text/css; charset=utf-8",
    },
    Asset {
        name: "console.js",
        body: include_bytes!("console.js"),
        content_type: "text/javascript; charset=utf-8",
    },
    Asset {
        name: "favicon.svg",
        body: include_bytes!("favicon.svg"),
        content_type: "image/svg+xml",
    },
];

/// No inline script or style can run, nothing loads from another origin, no other site
/// may frame the page (clickjacking a revoke button).
pub(super) const CSP: &str = "default-src 'self'; frame-ancestors 'none'";

/// What every console answer carries, errors included.
const SECURITY_HEADERS: [(HeaderName, &str); 4] = [
    (CONTENT_SECURITY_POLICY, CSP),
    (X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (REFERRER_POLICY, "no-referrer"),
    // For browsers that predate `frame-ancestors`.
    (X_FRAME_OPTIONS, "DENY"),
];

/// The page's DOM holds keys and their data once signed in: `no-store` keeps it out of
/// every cache, the back-forward cache included. The script, style sheet and icon hold
/// no data: they may be kept, but are revalidated on each load (`no-cache` with an ETag),
/// so that a new binary's files are used at once although their URLs do not change.
const PAGE_CACHE: &str = "no-store";
const FILE_CACHE: &str = "no-cache";

pub(super) struct Console {
    enabled: bool,
    /// One per asset, in `ASSETS` order: a hash of the file's bytes.
    etags: Vec<HeaderValue>,
    /// Where `<path>/console` (no slash) is sent, so that the page's relative URLs resolve
    /// under `console/`; None if the mount path cannot be a header value.
    index_location: Option<HeaderValue>,
}

impl Console {
    pub(super) fn new(enabled: bool, mount: &str) -> Self {
        let etags = ASSETS
            .iter()
            .map(|asset| {
                let digest = Sha256::digest(asset.body);
                let tag = format!("\"{}\"", hex::encode(&digest[..12]));
                // Hex digits and quotes are always a valid header value.
                HeaderValue::try_from(tag).unwrap_or(HeaderValue::from_static("\"0\""))
            })
            .collect();
        Console {
            enabled,
            etags,
            index_location: HeaderValue::try_from(format!("{mount}/console/")).ok(),
        }
    }

    /// The answer to `method` on `file`, the path below `<path>/console` (`""`, `"/"`,
    /// `"/console.js"`, ...). Off: 404 for every method and file, as sign-up is when off.
    pub(super) fn answer(
        &self,
        file: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Reply, ApiError> {
        if !self.enabled {
            return Err(ApiError::NotFound);
        }
        if method != Method::GET {
            return Err(ApiError::MethodNotAllowed("GET"));
        }
        if file.is_empty() {
            let location = self.index_location.clone().ok_or(ApiError::NotFound)?;
            let reply = Reply {
                status: 308,
                body: bytes::Bytes::new(),
                content_type: "text/plain; charset=utf-8",
                headers: http::HeaderMap::new(),
            };
            return Ok(secured(reply, PAGE_CACHE).with_header(http::header::LOCATION, location));
        }
        let name = file.strip_prefix('/').unwrap_or(file);
        let index = ASSETS
            .iter()
            .position(|asset| asset.name == name)
            .ok_or(ApiError::NotFound)?;
        let (asset, etag) = (&ASSETS[index], &self.etags[index]);
        let cache = if asset.name.is_empty() {
            PAGE_CACHE
        } else {
            FILE_CACHE
        };
        let fresh = headers
            .get_all(http::header::IF_NONE_MATCH)
            .iter()
            .any(|value| matches_etag(value, etag));
        let reply = Reply {
            status: if fresh { 304 } else { 200 },
            body: if fresh {
                bytes::Bytes::new()
            } else {
                bytes::Bytes::from_static(asset.body)
            },
            content_type: asset.content_type,
            headers: http::HeaderMap::new(),
        };
        Ok(secured(reply, cache).with_header(http::header::ETAG, etag.clone()))
    }
}

/// `reply` with the console's security headers and `cache`.
fn secured(reply: Reply, cache: &'static str) -> Reply {
    with_security_headers(reply)
        .with_header(http::header::CACHE_CONTROL, HeaderValue::from_static(cache))
}

/// `reply` with the headers every console answer carries (an error under `console/` too).
pub(super) fn with_security_headers(reply: Reply) -> Reply {
    SECURITY_HEADERS.iter().fold(reply, |reply, (name, value)| {
        reply.with_header(name.clone(), HeaderValue::from_static(value))
    })
}

/// Whether an `If-None-Match` value (`"a", W/"b"` or `*`) names `etag`; weak tags match,
/// as RFC 9110 has them compared for GET.
fn matches_etag(value: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let etag = etag.as_bytes();
    value
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == etag)
}

#[cfg(test)]
mod tests;
