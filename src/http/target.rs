//! The request target as keygate routes and forwards it: origin-form with unreserved
//! escapes decoded, the header block's size, the request id.

use http::{HeaderMap, HeaderValue};
use pingora::http::RequestHeader;
use pingora::http::authority::{RawTargetAuthority, raw_target_authority};

use crate::error::GatewayError;
use crate::http::path;

/// Bytes of the request line and header block, as received (give or take separators).
pub(crate) fn header_size(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    req.headers.iter().fold(line + 12, |total, (name, value)| {
        total + name.as_str().len() + value.len() + 4
    })
}

/// A request's id, kept as the header value it travels in: the request, the response
/// and the access log share it without a copy (a client's id is a slice of the buffer
/// Pingora parsed the request from).
#[derive(Clone, Debug)]
pub(crate) struct RequestId(HeaderValue);

impl RequestId {
    /// No id yet: the request failed before its header was read.
    pub(crate) fn none() -> Self {
        RequestId(HeaderValue::from_static(""))
    }

    /// The client's `x-request-id` when it is sane (1–128 visible ASCII characters), else
    /// a fresh ULID.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let sane = headers.get(super::names::X_REQUEST_ID).filter(|v| {
            let v = v.as_bytes();
            !v.is_empty() && v.len() <= 128 && v.iter().all(u8::is_ascii_graphic)
        });
        match sane {
            Some(value) => RequestId(value.clone()),
            None => {
                let mut text = [0u8; ulid::ULID_LEN];
                let ulid = crate::keys::new_ulid().array_to_str(&mut text);
                // A ULID is Crockford base32: always a valid header value.
                RequestId(HeaderValue::from_str(ulid).unwrap_or(HeaderValue::from_static("")))
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn as_str(&self) -> &str {
        // Visible ASCII by construction (`of`), which `to_str` accepts.
        self.0.to_str().unwrap_or_default()
    }

    pub(crate) fn header_value(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Puts the request target in origin-form with its unreserved escapes decoded, which is
/// how it is routed and forwarded (see `path`). An absolute-form target (`GET
/// http://host/p`) becomes `/p`, with `Host` taken from the URL when the client sent none
/// (Pingora has already refused a different one). Any other form is refused: Pingora
/// would route it as `/` but forward it as sent, for the upstream to read as it likes.
pub(crate) fn normalize_target(req: &mut RequestHeader) -> Result<(), GatewayError> {
    host_from_authority(req)?;
    let target = req.raw_path();
    // Pingora routes on a lossy UTF-8 reading of the target but forwards its raw bytes.
    if std::str::from_utf8(target).is_err() {
        return Err(GatewayError::InvalidPath);
    }
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

/// An HTTP/2 request names its host in `:authority`, usually without a `Host` header
/// (RFC 9113 8.3.1); routing, `X-Forwarded-Host` and the upstream's HTTP/1.1 request all
/// read `Host`, so it is set from the authority (Pingora has refused the two differing).
fn host_from_authority(req: &mut RequestHeader) -> Result<(), GatewayError> {
    if req.version != http::Version::HTTP_2 || req.headers.contains_key(http::header::HOST) {
        return Ok(());
    }
    let Some(authority) = req.uri.authority() else {
        return Ok(());
    };
    let host =
        HeaderValue::from_str(authority.as_str()).map_err(|_| GatewayError::InvalidTarget)?;
    req.insert_header(http::header::HOST, host)
        .map_err(|_| GatewayError::InvalidTarget)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(RequestId::of(&h).as_str(), "abc-123");
        for insane in ["has space", "", "caf\u{e9}"] {
            h.insert(
                "x-request-id",
                HeaderValue::from_str(insane).expect("value"),
            );
            let generated = RequestId::of(&h);
            assert_eq!(generated.as_str().len(), 26, "{insane:?}");
            assert!(ulid::Ulid::from_string(generated.as_str()).is_ok());
        }
        h.insert(
            "x-request-id",
            HeaderValue::from_str(&"a".repeat(129)).expect("value"),
        );
        assert_eq!(RequestId::of(&h).as_str().len(), 26);
        assert_eq!(RequestId::of(&HeaderMap::new()).as_str().len(), 26);
        assert!(RequestId::none().is_empty());
    }

    #[test]
    fn an_h2_authority_becomes_the_host() {
        let mut req = RequestHeader::build("GET", b"/p?q=1", None).expect("req");
        req.set_version(http::Version::HTTP_2);
        req.set_uri("https://api.example:8443/p?q=1".parse().expect("uri"));
        normalize_target(&mut req).expect("normalized");
        assert_eq!(req.headers["host"], "api.example:8443");
        let mut h1 = RequestHeader::build("GET", b"/p", None).expect("req");
        normalize_target(&mut h1).expect("normalized");
        assert!(!h1.headers.contains_key("host"), "HTTP/1.1 is left alone");
    }
}
