//! The management API's calls, parsed once from the path below the mount and the method.

use http::Method;

use super::error::ApiError;
use crate::ratelimit::ManagementBudget;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Call {
    Create,
    List,
    Get(String),
    Revoke(String),
    RevokeByValue,
    Rotate(String),
    Audit,
    Signup,
    OpenApi,
}

impl Call {
    /// The call that `rest` (the path below the mount) and `method` name; 404 for an
    /// unknown path (or sign-up while it is off), 405 for a method the path does not take.
    pub(super) fn parse(
        rest: &str,
        method: &Method,
        signup_enabled: bool,
    ) -> Result<Call, ApiError> {
        let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        let only = |allowed: &'static str, call: Call| {
            if method.as_str() == allowed {
                Ok(call)
            } else {
                Err(ApiError::MethodNotAllowed(allowed))
            }
        };
        match segments.as_slice() {
            ["openapi.json"] => only("GET", Call::OpenApi),
            ["signup"] if signup_enabled => only("POST", Call::Signup),
            ["keys"] => match *method {
                Method::POST => Ok(Call::Create),
                Method::GET => Ok(Call::List),
                _ => Err(ApiError::MethodNotAllowed("GET, POST")),
            },
            ["keys", "revoke"] => only("POST", Call::RevokeByValue),
            ["keys", id] if !id.is_empty() => match *method {
                Method::GET => Ok(Call::Get(id.to_string())),
                Method::DELETE => Ok(Call::Revoke(id.to_string())),
                _ => Err(ApiError::MethodNotAllowed("GET, DELETE")),
            },
            ["keys", id, "rotate"] if !id.is_empty() => only("POST", Call::Rotate(id.to_string())),
            ["audit"] => only("GET", Call::Audit),
            _ => Err(ApiError::NotFound),
        }
    }

    /// Whether a path is answered without credentials (the document and sign-up), so that
    /// its 404 or 405 needs none either.
    pub(super) fn is_public_path(rest: &str) -> bool {
        matches!(rest, "/openapi.json" | "/signup")
    }

    /// The `operation` label of `keygate_management_requests_total`.
    pub(super) fn label(&self) -> &'static str {
        match self {
            Call::Create => "create",
            Call::List => "list",
            Call::Get(_) => "get",
            Call::Revoke(_) => "revoke",
            Call::RevokeByValue => "revoke_by_value",
            Call::Rotate(_) => "rotate",
            Call::Audit => "audit",
            Call::Signup => "signup",
            Call::OpenApi => "openapi",
        }
    }

    /// Which per-owner budget a key's call spends (the admin's spend none).
    pub(super) fn budget(&self) -> Option<ManagementBudget> {
        match self {
            Call::Create | Call::Rotate(_) => Some(ManagementBudget::Create),
            Call::List | Call::Get(_) => Some(ManagementBudget::List),
            Call::Revoke(_) | Call::RevokeByValue => Some(ManagementBudget::Revoke),
            Call::Audit | Call::Signup | Call::OpenApi => None,
        }
    }

    /// Whether the call reads a JSON body.
    pub(super) fn takes_body(&self) -> bool {
        matches!(
            self,
            Call::Create | Call::RevokeByValue | Call::Rotate(_) | Call::Signup
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(rest: &str, method: Method) -> Result<Call, ApiError> {
        Call::parse(rest, &method, true)
    }

    #[test]
    fn routes_and_methods() {
        assert!(matches!(parse("/keys", Method::POST), Ok(Call::Create)));
        assert!(matches!(parse("/keys", Method::GET), Ok(Call::List)));
        assert!(matches!(
            parse("/keys", Method::PUT),
            Err(ApiError::MethodNotAllowed("GET, POST"))
        ));
        assert!(matches!(
            parse("/keys/revoke", Method::POST),
            Ok(Call::RevokeByValue)
        ));
        assert!(matches!(
            parse("/keys/abc", Method::DELETE),
            Ok(Call::Revoke(_))
        ));
        assert!(matches!(
            parse("/keys/abc/rotate", Method::POST),
            Ok(Call::Rotate(_))
        ));
        assert!(matches!(
            parse("/keys/abc/rotate", Method::GET),
            Err(ApiError::MethodNotAllowed("POST"))
        ));
        assert!(matches!(
            parse("/nope", Method::GET),
            Err(ApiError::NotFound)
        ));
        assert!(matches!(parse("", Method::GET), Err(ApiError::NotFound)));
        assert!(matches!(
            parse("/keys//rotate", Method::POST),
            Err(ApiError::NotFound)
        ));
    }

    #[test]
    fn signup_is_not_found_while_off() {
        let off = Call::parse("/signup", &Method::POST, false);
        assert!(matches!(off, Err(ApiError::NotFound)));
        assert!(matches!(
            parse("/signup", Method::GET),
            Err(ApiError::MethodNotAllowed("POST"))
        ));
    }
}
