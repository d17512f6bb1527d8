//! The one place that writes keygate's own responses to a Pingora session: JSON bodies,
//! always with Content-Length (without it Pingora closes the connection under a misleading
//! keep-alive), `x-request-id`, and the headers a refusal needs.

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::error::{GatewayError, error_body};
use crate::http::names::X_REQUEST_ID;
use crate::http::target::RequestId;
use crate::ratelimit::{self, Decision};

pub(crate) struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub content_type: &'static str,
    /// The reply's own headers; `send` adds the framing ones and `x-request-id` to the
    /// same map, and Pingora then adds `Date` and `Connection`.
    pub headers: HeaderMap,
}

/// Headers `send` and Pingora add to a reply's: `Content-Type`, `Content-Length`,
/// `x-request-id`, `Date`, `Connection`.
const ADDED_TO_EVERY_REPLY: usize = 5;

impl Reply {
    pub(crate) fn json(status: u16, body: Bytes) -> Self {
        Reply {
            status,
            body,
            content_type: "application/json",
            headers: HeaderMap::new(),
        }
    }

    pub(crate) fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        if self.headers.is_empty() {
            // Room for everything the reply will carry, reserved once.
            self.headers.reserve(ADDED_TO_EVERY_REPLY + 1);
        }
        self.headers.append(name, value);
        self
    }

    /// With the `RateLimit-*` headers of a rate-limited key's request.
    pub(crate) fn with_rate_limit(mut self, decision: Option<Decision>) -> Self {
        if let Some(decision) = decision {
            for (name, value) in ratelimit::headers(decision) {
                self = self.with_header(name, value);
            }
        }
        self
    }

    /// The JSON error for a refusal, with `WWW-Authenticate` on 401 and `Retry-After` on 429.
    pub(crate) fn gateway_error(error: GatewayError, request_id: &str) -> Self {
        Reply::refusal(error, error.message(), request_id)
    }

    /// As `gateway_error`, with a message of the caller's (the same code and headers).
    pub(crate) fn refusal(error: GatewayError, message: &str, request_id: &str) -> Self {
        let reply = Reply::json(
            error.status(),
            error_body(error.code(), message, request_id, None),
        );
        match error {
            GatewayError::MissingCredentials => reply.with_header(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keygate\""),
            ),
            GatewayError::InvalidKey | GatewayError::KeyExpired => reply.with_header(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keygate\", error=\"invalid_token\""),
            ),
            GatewayError::ConnectNotAllowed => reply.with_header(
                ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            ),
            GatewayError::RateLimited { retry_after }
            | GatewayError::QuotaExhausted {
                retry_after: Some(retry_after),
            } => reply.with_header(RETRY_AFTER, HeaderValue::from(retry_after)),
            _ => reply,
        }
    }
}

/// Writes `reply` as the whole response.
pub(crate) async fn send(
    session: &mut Session,
    reply: Reply,
    request_id: &RequestId,
) -> pingora::Result<()> {
    // Built as plain parts, without Pingora's case map: keygate's own header names need no
    // case kept, and each name given to `insert_header` as a string is parsed and copied.
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = StatusCode::from_u16(reply.status)
        .map_err(|_| pingora::Error::explain(pingora::ErrorType::InternalError, "reply status"))?;
    parts.headers = reply.headers;
    let headers = &mut parts.headers;
    headers.reserve(ADDED_TO_EVERY_REPLY);
    if !reply.body.is_empty() {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    }
    // A 304 has no body, and a Content-Length there would describe the cached file's.
    if reply.status != 304 {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(reply.body.len()));
    }
    headers.insert(X_REQUEST_ID, request_id.header_value());
    let header = ResponseHeader::from(parts);
    session
        .write_response_header(Box::new(header), reply.body.is_empty())
        .await?;
    if !reply.body.is_empty() {
        session.write_response_body(Some(reply.body), true).await?;
    }
    Ok(())
}
