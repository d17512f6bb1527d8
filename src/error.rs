//! The refusals keygate answers itself on the request path, each with its status, code
//! and metrics outcome, and the JSON body every keygate-made response carries.

use bytes::Bytes;

use crate::metrics::Outcome;

/// Every `error.code` keygate answers with, spelled once.
pub(crate) mod code {
    pub(crate) const BAD_REQUEST: &str = "bad_request";
    pub(crate) const CONFLICTING_CREDENTIALS: &str = "conflicting_credentials";
    pub(crate) const HEADER_TOO_LARGE: &str = "header_too_large";
    pub(crate) const INSUFFICIENT_SCOPE: &str = "insufficient_scope";
    pub(crate) const INTERNAL_ERROR: &str = "internal_error";
    pub(crate) const INVALID_CONFIG: &str = "invalid_config";
    pub(crate) const INVALID_JSON: &str = "invalid_json";
    pub(crate) const INVALID_KEY: &str = "invalid_key";
    pub(crate) const INVALID_PATH: &str = "invalid_path";
    pub(crate) const IP_NOT_ALLOWED: &str = "ip_not_allowed";
    pub(crate) const KEY_EXPIRED: &str = "key_expired";
    pub(crate) const KEY_REVOKED: &str = "key_revoked";
    pub(crate) const KEY_ROTATED: &str = "key_rotated";
    pub(crate) const NO_QUOTA: &str = "no_quota";
    pub(crate) const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    pub(crate) const MISSING_CREDENTIALS: &str = "missing_credentials";
    pub(crate) const NO_HEALTHY_UPSTREAM: &str = "no_healthy_upstream";
    pub(crate) const NO_ROUTE: &str = "no_route";
    pub(crate) const NOT_FOUND: &str = "not_found";
    pub(crate) const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub(crate) const QUOTA_EXHAUSTED: &str = "quota_exhausted";
    pub(crate) const RATE_LIMITED: &str = "rate_limited";
    pub(crate) const RATE_LIMIT_UNAVAILABLE: &str = "rate_limit_unavailable";
    pub(crate) const REQUEST_TIMEOUT: &str = "request_timeout";
    pub(crate) const STORE_UNAVAILABLE: &str = "store_unavailable";
    pub(crate) const UPSTREAM_TIMEOUT: &str = "upstream_timeout";
    pub(crate) const UPSTREAM_UNAVAILABLE: &str = "upstream_unavailable";
    pub(crate) const VALIDATION_FAILED: &str = "validation_failed";
}

/// Why the gateway answered a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub(crate) enum GatewayError {
    NoRoute,
    InvalidPath,
    AmbiguousPath,
    InvalidTarget,
    MissingHost,
    InvalidHost,
    MissingCredentials,
    ConflictingCredentials,
    InvalidKey,
    KeyExpired,
    InsufficientScope,
    IpNotAllowed,
    RateLimited {
        retry_after: u64,
    },
    QuotaExhausted {
        /// None for a `total` quota, which never resets.
        retry_after: Option<u64>,
    },
    RateLimitUnavailable,
    StoreUnavailable,
    NoHealthyUpstream,
    UpstreamUnavailable,
    UpstreamTimeout,
    MalformedRequest,
    MalformedBody,
    ChunkedBodyTooLarge,
    BodyTimeout,
    UnsupportedTransferCoding,
    ConflictingFraming,
    ConnectNotAllowed,
    HeaderTooLarge,
    ConflictingOriginal,
    InvalidOriginal,
    Internal,
}

impl GatewayError {
    /// What the client is told, a constant: the error body writes it without formatting.
    pub(crate) fn message(self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no route matches this request",
            GatewayError::InvalidPath => {
                "the request path contains dot segments, backslashes or a malformed %-escape; send a normalized path"
            }
            GatewayError::AmbiguousPath => {
                "the path leads elsewhere once its encoded slashes, repeated slashes or ;parameters are read as an upstream may read them; send it plainly"
            }
            GatewayError::InvalidTarget => {
                "the request target must be a path (or an http or https URL)"
            }
            GatewayError::MissingHost => "an HTTP/1.1 request needs a Host header",
            GatewayError::InvalidHost => {
                "the Host header must be a host name or IP address, with an optional port"
            }
            GatewayError::MissingCredentials => {
                "no API key: send it in the `x-api-key`, `key` or `Authorization: Bearer` header"
            }
            GatewayError::ConflictingCredentials => "the request carries two different API keys",
            GatewayError::InvalidKey => "the API key is not valid",
            GatewayError::KeyExpired => "the API key has expired",
            GatewayError::InsufficientScope => "the API key lacks a scope this route requires",
            GatewayError::IpNotAllowed => "the API key may not be used from this client address",
            GatewayError::RateLimited { .. } => {
                "rate limit exceeded; retry after the time in Retry-After"
            }
            GatewayError::QuotaExhausted { .. } => {
                "the API key's quota is spent; retry after the time in Retry-After, if any"
            }
            GatewayError::RateLimitUnavailable => {
                "the rate-limit backend cannot answer; try again shortly"
            }
            GatewayError::StoreUnavailable => "the key store is unavailable; try again shortly",
            GatewayError::NoHealthyUpstream => "no healthy upstream for this route",
            GatewayError::UpstreamUnavailable => "the upstream could not be reached",
            GatewayError::UpstreamTimeout => "the upstream did not answer in time",
            GatewayError::MalformedRequest => "the request is malformed",
            GatewayError::MalformedBody => "the chunked request body is malformed or ended early",
            GatewayError::ChunkedBodyTooLarge => {
                "a chunked request body may be at most 64 KiB; send a larger body with Content-Length"
            }
            GatewayError::BodyTimeout => "the request body did not arrive in time",
            GatewayError::UnsupportedTransferCoding => {
                "only the chunked transfer coding is accepted"
            }
            GatewayError::ConflictingFraming => {
                "a request may carry Content-Length or Transfer-Encoding, not both"
            }
            GatewayError::ConnectNotAllowed => "CONNECT tunnels are not served",
            GatewayError::HeaderTooLarge => "the request header is too large",
            GatewayError::ConflictingOriginal => {
                "the original request is named differently by two of X-Forwarded-Uri, X-Original-URI and the path after /authorize (or their methods, or a header sent twice)"
            }
            GatewayError::InvalidOriginal => {
                "the original request's method, URI or host is malformed"
            }
            GatewayError::Internal => "the request could not be processed",
        }
    }

    pub(crate) fn status(self) -> u16 {
        match self {
            GatewayError::NoRoute => 404,
            GatewayError::InvalidPath
            | GatewayError::AmbiguousPath
            | GatewayError::InvalidTarget
            | GatewayError::MissingHost
            | GatewayError::InvalidHost
            | GatewayError::UnsupportedTransferCoding
            | GatewayError::ConflictingFraming
            | GatewayError::ConflictingCredentials
            | GatewayError::MalformedRequest
            | GatewayError::ConflictingOriginal
            | GatewayError::InvalidOriginal
            | GatewayError::MalformedBody => 400,
            GatewayError::BodyTimeout => 408,
            GatewayError::ChunkedBodyTooLarge => 413,
            GatewayError::ConnectNotAllowed => 405,
            GatewayError::HeaderTooLarge => 431,
            GatewayError::MissingCredentials
            | GatewayError::InvalidKey
            | GatewayError::KeyExpired => 401,
            GatewayError::InsufficientScope | GatewayError::IpNotAllowed => 403,
            GatewayError::RateLimited { .. } | GatewayError::QuotaExhausted { .. } => 429,
            GatewayError::StoreUnavailable
            | GatewayError::RateLimitUnavailable
            | GatewayError::NoHealthyUpstream => 503,
            GatewayError::UpstreamUnavailable => 502,
            GatewayError::UpstreamTimeout => 504,
            GatewayError::Internal => 500,
        }
    }

    pub(crate) fn code(self) -> &'static str {
        match self {
            GatewayError::NoRoute => code::NO_ROUTE,
            GatewayError::InvalidPath | GatewayError::AmbiguousPath => code::INVALID_PATH,
            GatewayError::MissingCredentials => code::MISSING_CREDENTIALS,
            GatewayError::ConflictingCredentials => code::CONFLICTING_CREDENTIALS,
            GatewayError::InvalidKey => code::INVALID_KEY,
            GatewayError::KeyExpired => code::KEY_EXPIRED,
            GatewayError::InsufficientScope => code::INSUFFICIENT_SCOPE,
            GatewayError::IpNotAllowed => code::IP_NOT_ALLOWED,
            GatewayError::RateLimited { .. } => code::RATE_LIMITED,
            GatewayError::QuotaExhausted { .. } => code::QUOTA_EXHAUSTED,
            GatewayError::RateLimitUnavailable => code::RATE_LIMIT_UNAVAILABLE,
            GatewayError::StoreUnavailable => code::STORE_UNAVAILABLE,
            GatewayError::NoHealthyUpstream => code::NO_HEALTHY_UPSTREAM,
            GatewayError::UpstreamUnavailable => code::UPSTREAM_UNAVAILABLE,
            GatewayError::UpstreamTimeout => code::UPSTREAM_TIMEOUT,
            GatewayError::MalformedRequest
            | GatewayError::MalformedBody
            | GatewayError::ConflictingOriginal
            | GatewayError::InvalidOriginal
            | GatewayError::InvalidTarget
            | GatewayError::MissingHost
            | GatewayError::InvalidHost
            | GatewayError::UnsupportedTransferCoding
            | GatewayError::ConflictingFraming => code::BAD_REQUEST,
            GatewayError::ChunkedBodyTooLarge => code::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout => code::REQUEST_TIMEOUT,
            GatewayError::ConnectNotAllowed => code::METHOD_NOT_ALLOWED,
            GatewayError::HeaderTooLarge => code::HEADER_TOO_LARGE,
            GatewayError::Internal => code::INTERNAL_ERROR,
        }
    }

    /// Refusals after which the connection cannot carry another request: a CONNECT's
    /// framing is not a normal request's, and a refused chunked body was not read to its end.
    pub(crate) fn ends_connection(self) -> bool {
        matches!(
            self,
            GatewayError::ConnectNotAllowed
                | GatewayError::MalformedBody
                | GatewayError::ChunkedBodyTooLarge
                | GatewayError::BodyTimeout
                | GatewayError::UnsupportedTransferCoding
                | GatewayError::ConflictingFraming
        )
    }

    /// The `outcome` label of `keygate_requests_total`. Upstream failures happen after the
    /// request was admitted, so they count as `allowed` (their status shows in the upstream
    /// metrics and the access log).
    pub(crate) fn outcome(self) -> Outcome {
        match self {
            GatewayError::NoRoute => Outcome::NoRoute,
            GatewayError::InvalidPath
            | GatewayError::AmbiguousPath
            | GatewayError::InvalidTarget
            | GatewayError::MissingHost
            | GatewayError::InvalidHost
            | GatewayError::UnsupportedTransferCoding
            | GatewayError::ConflictingFraming
            | GatewayError::ConflictingCredentials
            | GatewayError::MalformedRequest
            | GatewayError::ConflictingOriginal
            | GatewayError::InvalidOriginal
            | GatewayError::MalformedBody
            | GatewayError::ChunkedBodyTooLarge
            | GatewayError::BodyTimeout
            | GatewayError::ConnectNotAllowed
            | GatewayError::HeaderTooLarge => Outcome::BadRequest,
            GatewayError::MissingCredentials => Outcome::MissingCredentials,
            GatewayError::InvalidKey => Outcome::InvalidKey,
            GatewayError::KeyExpired => Outcome::KeyExpired,
            GatewayError::InsufficientScope => Outcome::InsufficientScope,
            GatewayError::IpNotAllowed => Outcome::IpNotAllowed,
            GatewayError::RateLimited { .. } => Outcome::RateLimited,
            GatewayError::QuotaExhausted { .. } => Outcome::QuotaExhausted,
            GatewayError::RateLimitUnavailable => Outcome::RateLimitUnavailable,
            GatewayError::StoreUnavailable => Outcome::StoreUnavailable,
            GatewayError::NoHealthyUpstream
            | GatewayError::UpstreamUnavailable
            | GatewayError::UpstreamTimeout
            | GatewayError::Internal => Outcome::Allowed,
        }
    }
}

/// `{"error": {"code", "message", "request_id"[, "details"]}}`: the keys written as they
/// are, only the values through serde_json (which escapes them): serializing the envelope
/// as a struct cost a 401 twice the instructions, escaping the keys every time.
pub(crate) fn error_body(
    code: &str,
    message: &str,
    request_id: &str,
    details: Option<&serde_json::Value>,
) -> Bytes {
    // Room for the envelope up front: growing the buffer cost a 401 three reallocations.
    let mut body = Vec::with_capacity(96 + code.len() + message.len() + request_id.len());
    body.extend_from_slice(br#"{"error":{"code":"#);
    // Serializing strings and a JSON value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut body, code);
    body.extend_from_slice(br#","message":"#);
    let _ = serde_json::to_writer(&mut body, message);
    body.extend_from_slice(br#","request_id":"#);
    let _ = serde_json::to_writer(&mut body, request_id);
    if let Some(details) = details {
        body.extend_from_slice(br#","details":"#);
        let _ = serde_json::to_writer(&mut body, details);
    }
    body.extend_from_slice(b"}}");
    Bytes::from(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parsed(body: &Bytes) -> serde_json::Value {
        serde_json::from_slice(body).expect("the error body is JSON")
    }

    proptest! {
        /// Whatever the strings hold (quotes, backslashes, control characters, non-ASCII),
        /// the body is the JSON envelope with exactly those values.
        #[test]
        fn the_body_is_the_envelope_of_its_values(
            code in any::<String>(),
            message in any::<String>(),
            request_id in any::<String>(),
            detail in proptest::option::of(any::<String>()),
        ) {
            let details = detail.map(|d| serde_json::json!({"field": d, "n": [1, 2]}));
            let body = error_body(&code, &message, &request_id, details.as_ref());
            let mut expected = serde_json::json!({"error": {
                "code": code, "message": message, "request_id": request_id,
            }});
            if let Some(details) = details {
                expected["error"]["details"] = details;
            }
            prop_assert_eq!(parsed(&body), expected);
        }
    }

    #[test]
    fn a_refusal_body_carries_its_code_message_and_request_id() {
        let error = GatewayError::InvalidKey;
        let body = error_body(error.code(), error.message(), "req-\"1\"", None);
        assert_eq!(
            std::str::from_utf8(&body).expect("utf-8"),
            r#"{"error":{"code":"invalid_key","message":"the API key is not valid","request_id":"req-\"1\""}}"#
        );
        assert_eq!(error.to_string(), error.message());
    }
}
