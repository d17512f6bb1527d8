//! The refusals keygate answers itself on the request path, each with its status, code
//! and metrics outcome, and the JSON body every keygate-made response carries.

use bytes::Bytes;
use serde::Serialize;

/// Why the gateway answered a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches this request")]
    NoRoute,
    #[error(
        "the request path contains dot segments, backslashes or a malformed %-escape; send a normalized path"
    )]
    InvalidPath,
    #[error(
        "the path leads elsewhere once its encoded slashes, repeated slashes or ;parameters are read as an upstream may read them; send it plainly"
    )]
    AmbiguousPath,
    #[error("the request target must be a path (or an http or https URL)")]
    InvalidTarget,
    #[error("an HTTP/1.1 request needs a Host header")]
    MissingHost,
    #[error("the Host header must be a host name or IP address, with an optional port")]
    InvalidHost,
    #[error("no API key: send it in the `x-api-key`, `key` or `Authorization: Bearer` header")]
    MissingCredentials,
    #[error("the request carries two different API keys")]
    ConflictingCredentials,
    #[error("the API key is not valid")]
    InvalidKey,
    #[error("the API key has expired")]
    KeyExpired,
    #[error("the API key lacks a scope this route requires")]
    InsufficientScope,
    #[error("rate limit exceeded; retry after the time in Retry-After")]
    RateLimited { retry_after: u64 },
    #[error("the key store is unavailable; try again shortly")]
    StoreUnavailable,
    #[error("no healthy upstream for this route")]
    NoHealthyUpstream,
    #[error("the upstream could not be reached")]
    UpstreamUnavailable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the request is malformed")]
    MalformedRequest,
    #[error("the chunked request body is malformed or ended early")]
    MalformedBody,
    #[error("a chunked request body may be at most 64 KiB; send a larger body with Content-Length")]
    ChunkedBodyTooLarge,
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("only the chunked transfer coding is accepted")]
    UnsupportedTransferCoding,
    #[error("CONNECT tunnels are not served")]
    ConnectNotAllowed,
    #[error("the request header is too large")]
    HeaderTooLarge,
    #[error("the request could not be processed")]
    Internal,
}

impl GatewayError {
    pub fn status(self) -> u16 {
        match self {
            GatewayError::NoRoute => 404,
            GatewayError::InvalidPath
            | GatewayError::AmbiguousPath
            | GatewayError::InvalidTarget
            | GatewayError::MissingHost
            | GatewayError::InvalidHost
            | GatewayError::UnsupportedTransferCoding
            | GatewayError::ConflictingCredentials
            | GatewayError::MalformedRequest
            | GatewayError::MalformedBody => 400,
            GatewayError::BodyTimeout => 408,
            GatewayError::ChunkedBodyTooLarge => 413,
            GatewayError::ConnectNotAllowed => 405,
            GatewayError::HeaderTooLarge => 431,
            GatewayError::MissingCredentials
            | GatewayError::InvalidKey
            | GatewayError::KeyExpired => 401,
            GatewayError::InsufficientScope => 403,
            GatewayError::RateLimited { .. } => 429,
            GatewayError::StoreUnavailable | GatewayError::NoHealthyUpstream => 503,
            GatewayError::UpstreamUnavailable => 502,
            GatewayError::UpstreamTimeout => 504,
            GatewayError::Internal => 500,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no_route",
            GatewayError::InvalidPath | GatewayError::AmbiguousPath => "invalid_path",
            GatewayError::MissingCredentials => "missing_credentials",
            GatewayError::ConflictingCredentials => "conflicting_credentials",
            GatewayError::InvalidKey => "invalid_key",
            GatewayError::KeyExpired => "key_expired",
            GatewayError::InsufficientScope => "insufficient_scope",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::StoreUnavailable => "store_unavailable",
            GatewayError::NoHealthyUpstream => "no_healthy_upstream",
            GatewayError::UpstreamUnavailable => "upstream_unavailable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::MalformedRequest
            | GatewayError::MalformedBody
            | GatewayError::InvalidTarget
            | GatewayError::MissingHost
            | GatewayError::InvalidHost
            | GatewayError::UnsupportedTransferCoding => "bad_request",
            GatewayError::ChunkedBodyTooLarge => "payload_too_large",
            GatewayError::BodyTimeout => "request_timeout",
            GatewayError::ConnectNotAllowed => "method_not_allowed",
            GatewayError::HeaderTooLarge => "header_too_large",
            GatewayError::Internal => "internal_error",
        }
    }

    /// Refusals after which the connection cannot carry another request: a CONNECT's
    /// framing is not a normal request's, and a refused chunked body was not read to its end.
    pub fn ends_connection(self) -> bool {
        matches!(
            self,
            GatewayError::ConnectNotAllowed
                | GatewayError::MalformedBody
                | GatewayError::ChunkedBodyTooLarge
                | GatewayError::BodyTimeout
                | GatewayError::UnsupportedTransferCoding
        )
    }

    /// The `outcome` label of `keygate_requests_total`. Upstream failures happen after the
    /// request was admitted, so they count as `allowed` (their status shows in the upstream
    /// metrics and the access log).
    pub fn outcome(self) -> Outcome {
        match self {
            GatewayError::NoRoute => Outcome::NoRoute,
            GatewayError::InvalidPath
            | GatewayError::AmbiguousPath
            | GatewayError::InvalidTarget
            | GatewayError::MissingHost
            | GatewayError::InvalidHost
            | GatewayError::UnsupportedTransferCoding
            | GatewayError::ConflictingCredentials
            | GatewayError::MalformedRequest
            | GatewayError::MalformedBody
            | GatewayError::ChunkedBodyTooLarge
            | GatewayError::BodyTimeout
            | GatewayError::ConnectNotAllowed
            | GatewayError::HeaderTooLarge => Outcome::BadRequest,
            GatewayError::MissingCredentials => Outcome::MissingCredentials,
            GatewayError::InvalidKey => Outcome::InvalidKey,
            GatewayError::KeyExpired => Outcome::KeyExpired,
            GatewayError::InsufficientScope => Outcome::InsufficientScope,
            GatewayError::RateLimited { .. } => Outcome::RateLimited,
            GatewayError::StoreUnavailable => Outcome::StoreUnavailable,
            GatewayError::NoHealthyUpstream
            | GatewayError::UpstreamUnavailable
            | GatewayError::UpstreamTimeout
            | GatewayError::Internal => Outcome::Allowed,
        }
    }
}

/// The `outcome` label values of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    #[default]
    Allowed,
    MissingCredentials,
    InvalidKey,
    KeyExpired,
    InsufficientScope,
    RateLimited,
    StoreUnavailable,
    BadRequest,
    NoRoute,
    Public,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::MissingCredentials => "missing_credentials",
            Outcome::InvalidKey => "invalid_key",
            Outcome::KeyExpired => "key_expired",
            Outcome::InsufficientScope => "insufficient_scope",
            Outcome::RateLimited => "rate_limited",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::BadRequest => "bad_request",
            Outcome::NoRoute => "no_route",
            Outcome::Public => "public",
        }
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a serde_json::Value>,
}

/// `{"error": {"code", "message", "request_id"[, "details"]}}`
pub fn error_body(
    code: &str,
    message: &str,
    request_id: &str,
    details: Option<&serde_json::Value>,
) -> Bytes {
    let envelope = ErrorEnvelope {
        error: ErrorBody {
            code,
            message,
            request_id,
            details,
        },
    };
    // Serializing plain strings and a JSON value cannot fail.
    Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
}
