//! The management API's calls, parsed once from the path below the mount and the method.

use http::Method;

use super::error::ApiError;
use crate::ratelimit::ManagementBudget;

/// A call as parsed: the two answered without credentials, or one that needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Call {
    OpenApi,
    Signup,
    /// A file of the key console: the path below `console`, for any method (the console
    /// answers 404 to every one while it is off).
    Console(String),
    Keyed(KeyedCall),
}

/// A call made by the admin or a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeyedCall {
    Create,
    List,
    Get(String),
    Revoke(String),
    RevokeByValue,
    Rotate(String),
    Update(String),
    /// The admin's top-up: the key's quota counts from zero again.
    RefillQuota(String),
    Audit,
    Verify,
}

impl Call {
    /// The call that `rest` (the path below the mount) and `method` name; 404 for an
    /// unknown path (or sign-up while it is off), 405 for a method the path does not take.
    pub(super) fn parse(
        rest: &str,
        method: &Method,
        signup_enabled: bool,
    ) -> Result<Call, ApiError> {
        if let Some(file) = rest.strip_prefix("/console")
            && (file.is_empty() || file.starts_with('/'))
        {
            return Ok(Call::Console(file.to_string()));
        }
        let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        let only = |allowed: &'static str, call: Call| {
            if method.as_str() == allowed {
                Ok(call)
            } else {
                Err(ApiError::MethodNotAllowed(allowed))
            }
        };
        use KeyedCall as K;
        let keyed = match segments.as_slice() {
            ["openapi.json"] => return only("GET", Call::OpenApi),
            ["signup"] if signup_enabled => return only("POST", Call::Signup),
            ["keys"] => match *method {
                Method::POST => K::Create,
                Method::GET => K::List,
                _ => return Err(ApiError::MethodNotAllowed("GET, POST")),
            },
            ["keys", "revoke"] => return only("POST", Call::Keyed(K::RevokeByValue)),
            ["keys", "verify"] => return only("POST", Call::Keyed(K::Verify)),
            ["keys", id] if !id.is_empty() => match *method {
                Method::GET => K::Get(id.to_string()),
                Method::DELETE => K::Revoke(id.to_string()),
                Method::PATCH => K::Update(id.to_string()),
                _ => return Err(ApiError::MethodNotAllowed("GET, DELETE, PATCH")),
            },
            ["keys", id, "rotate"] if !id.is_empty() => {
                return only("POST", Call::Keyed(K::Rotate(id.to_string())));
            }
            ["keys", id, "quota", "refill"] if !id.is_empty() => {
                return only("POST", Call::Keyed(K::RefillQuota(id.to_string())));
            }
            ["audit"] => return only("GET", Call::Keyed(K::Audit)),
            _ => return Err(ApiError::NotFound),
        };
        Ok(Call::Keyed(keyed))
    }

    /// Whether a path is answered without credentials (the document and sign-up), so that
    /// its 404 or 405 needs none either. (Console paths always parse, and answer their own
    /// 404 and 405.)
    pub(super) fn is_public_path(rest: &str) -> bool {
        matches!(rest, "/openapi.json" | "/signup")
    }

    /// The `operation` label of `keygate_management_requests_total`.
    pub(super) fn label(&self) -> &'static str {
        match self {
            Call::OpenApi => "openapi",
            Call::Signup => "signup",
            Call::Console(_) => "console",
            Call::Keyed(KeyedCall::Create) => "create",
            Call::Keyed(KeyedCall::List) => "list",
            Call::Keyed(KeyedCall::Get(_)) => "get",
            Call::Keyed(KeyedCall::Revoke(_)) => "revoke",
            Call::Keyed(KeyedCall::RevokeByValue) => "revoke_by_value",
            Call::Keyed(KeyedCall::Rotate(_)) => "rotate",
            Call::Keyed(KeyedCall::Update(_)) => "update",
            Call::Keyed(KeyedCall::RefillQuota(_)) => "refill_quota",
            Call::Keyed(KeyedCall::Audit) => "audit",
            Call::Keyed(KeyedCall::Verify) => "verify",
        }
    }
}

impl KeyedCall {
    /// Which per-owner budget a key's call spends before it runs (the admin's spend none).
    /// A revoke by value spends its budgets in its handler, once it knows whose key it is.
    pub(super) fn budget(&self) -> Option<ManagementBudget> {
        match self {
            KeyedCall::Create | KeyedCall::Rotate(_) => Some(ManagementBudget::Create),
            KeyedCall::List | KeyedCall::Get(_) => Some(ManagementBudget::List),
            // A change in place spends the budget of changes to existing keys.
            KeyedCall::Revoke(_) | KeyedCall::Update(_) => Some(ManagementBudget::Revoke),
            KeyedCall::RevokeByValue
            | KeyedCall::Audit
            | KeyedCall::Verify
            | KeyedCall::RefillQuota(_) => None,
        }
    }

    /// Whether the call reads a JSON body.
    pub(super) fn takes_body(&self) -> bool {
        matches!(
            self,
            KeyedCall::Create
                | KeyedCall::RevokeByValue
                | KeyedCall::Rotate(_)
                | KeyedCall::Update(_)
                | KeyedCall::Verify
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
        assert!(matches!(
            parse("/keys", Method::POST),
            Ok(Call::Keyed(KeyedCall::Create))
        ));
        assert!(matches!(
            parse("/keys", Method::GET),
            Ok(Call::Keyed(KeyedCall::List))
        ));
        assert!(matches!(
            parse("/keys", Method::PUT),
            Err(ApiError::MethodNotAllowed("GET, POST"))
        ));
        assert!(matches!(
            parse("/keys/revoke", Method::POST),
            Ok(Call::Keyed(KeyedCall::RevokeByValue))
        ));
        assert!(matches!(
            parse("/keys/abc", Method::DELETE),
            Ok(Call::Keyed(KeyedCall::Revoke(_)))
        ));
        assert!(matches!(
            parse("/keys/abc", Method::PATCH),
            Ok(Call::Keyed(KeyedCall::Update(_)))
        ));
        assert!(matches!(
            parse("/keys/abc", Method::PUT),
            Err(ApiError::MethodNotAllowed("GET, DELETE, PATCH"))
        ));
        assert!(matches!(
            parse("/keys/abc/rotate", Method::POST),
            Ok(Call::Keyed(KeyedCall::Rotate(_)))
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
    fn console_paths_take_any_method_and_only_whole_segments() {
        for (rest, file) in [
            ("/console", ""),
            ("/console/", "/"),
            ("/console/x.js", "/x.js"),
        ] {
            for method in [Method::GET, Method::POST, Method::DELETE] {
                let call = parse(rest, method);
                assert!(
                    matches!(&call, Ok(Call::Console(f)) if f == file),
                    "{call:?}"
                );
            }
        }
        assert!(matches!(
            parse("/consoles", Method::GET),
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
