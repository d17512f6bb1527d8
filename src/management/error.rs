//! The management API's refusals. Those it shares with the request path (a bad or missing
//! credential, a spent limit, the store away, an internal error) are `GatewayError`s, with
//! their codes, statuses and headers defined once, there.

use http::HeaderValue;
use serde_json::json;

use crate::error::{GatewayError, code, error_body};
use crate::http::body::MANAGEMENT_BODY_LIMIT;
use crate::lifecycle::{FieldErrors, LifecycleError};
use crate::metrics::Outcome;
use crate::session::respond::Reply;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    /// A refusal the request path gives too.
    #[error("{0}")]
    Refused(GatewayError),
    /// A 401 whose message says what the caller probably meant.
    #[error("{1}")]
    Unauthenticated(GatewayError, &'static str),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("the body is too large")]
    PayloadTooLarge,
    #[error("{0}")]
    InvalidJson(String),
    #[error("validation failed")]
    Validation(FieldErrors),
    /// 403 `insufficient_scope`, with why.
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: &'static str,
    },
}

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        ApiError::Refused(e)
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::Invalid(details) => ApiError::Validation(details),
            LifecycleError::Store(StoreError::Duplicate) | LifecycleError::Random => {
                tracing::error!(error = %e, "key creation failed");
                ApiError::Refused(GatewayError::Internal)
            }
            LifecycleError::Store(e) => {
                tracing::error!(error = %e, "store operation failed");
                ApiError::Refused(GatewayError::StoreUnavailable)
            }
        }
    }
}

impl ApiError {
    /// The `error.code` of the answer (also logged in the access log).
    pub(super) fn code(&self) -> &'static str {
        match self {
            ApiError::Refused(e) | ApiError::Unauthenticated(e, _) => e.code(),
            ApiError::NotFound => code::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => code::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => code::PAYLOAD_TOO_LARGE,
            ApiError::InvalidJson(_) => code::INVALID_JSON,
            ApiError::Validation(_) => code::VALIDATION_FAILED,
            ApiError::Forbidden(_) => code::INSUFFICIENT_SCOPE,
            ApiError::Conflict { code, .. } => code,
        }
    }

    /// Whether the caller presented a credential that is wrong (not one that is missing).
    pub(super) fn is_wrong_credential(&self) -> bool {
        matches!(
            self,
            ApiError::Refused(GatewayError::InvalidKey)
                | ApiError::Unauthenticated(GatewayError::InvalidKey, _)
        )
    }

    /// The `outcome` label of `keygate_requests_total` (route `_management`): refusals
    /// shared with the request path count as there; a 403 as `insufficient_scope`; every
    /// other mistake of the caller's (404, 405, 400, 409, 413, 422) as `bad_request`.
    pub(super) fn outcome(&self) -> Outcome {
        match self {
            ApiError::Refused(e) | ApiError::Unauthenticated(e, _) => e.outcome(),
            ApiError::Forbidden(_) => Outcome::InsufficientScope,
            ApiError::NotFound
            | ApiError::MethodNotAllowed(_)
            | ApiError::PayloadTooLarge
            | ApiError::InvalidJson(_)
            | ApiError::Validation(_)
            | ApiError::Conflict { .. } => Outcome::BadRequest,
        }
    }

    pub(super) fn reply(&self, request_id: &str) -> Reply {
        let code = self.code();
        let plain = |status, message: &str| {
            Reply::json(status, error_body(code, message, request_id, None))
        };
        match self {
            ApiError::Refused(e) => Reply::gateway_error(*e, request_id),
            ApiError::Unauthenticated(e, message) => Reply::refusal(*e, message, request_id),
            ApiError::NotFound => plain(404, "no such resource"),
            ApiError::MethodNotAllowed(allow) => plain(405, &format!("this path accepts {allow}"))
                .with_header(http::header::ALLOW, HeaderValue::from_static(allow)),
            ApiError::PayloadTooLarge => plain(
                413,
                &format!(
                    "the request body exceeds {} KiB",
                    MANAGEMENT_BODY_LIMIT / 1024
                ),
            ),
            ApiError::InvalidJson(why) => plain(400, why),
            ApiError::Validation(details) => {
                let details = json!(details);
                let message = "some fields are invalid; see details";
                Reply::json(422, error_body(code, message, request_id, Some(&details)))
            }
            ApiError::Forbidden(why) => plain(403, why),
            ApiError::Conflict { message, .. } => plain(409, message),
        }
    }
}
