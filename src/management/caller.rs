//! Who is calling the management API: the admin (its token, compared in constant time) or
//! a key, and what each may touch.

use std::sync::Arc;

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::auth::Authenticator;
use crate::error::GatewayError;
use crate::http::credentials::bearer_token;
use crate::keys::KeyRecord;
use crate::lifecycle::Actor;
use crate::store::CachedKey;

/// The scope that lets a key manage its owner's keys.
pub(super) const MANAGE_SCOPE: &str = "keys:manage";

pub(super) enum Caller {
    Admin,
    Key(Arc<CachedKey>),
}

impl Caller {
    /// The admin token (`Authorization: Bearer`) or a valid key.
    pub(super) async fn authenticate(
        headers: &HeaderMap,
        admin_token: Option<&[u8]>,
        auth: &Authenticator,
    ) -> Result<Caller, ApiError> {
        if let Some(expected) = admin_token {
            let presented = headers
                .get_all(http::header::AUTHORIZATION)
                .iter()
                .filter_map(|v| bearer_token(v.as_bytes()))
                .any(|token| tokens_equal(token, expected));
            if presented {
                return Ok(Caller::Admin);
            }
        }
        match auth.authenticate(headers).await {
            Ok((key, _)) => Ok(Caller::Key(key)),
            Err(GatewayError::MissingCredentials) => Err(hint_for(headers)),
            Err(GatewayError::InvalidKey) => Err(ApiError::Unauthenticated(
                GatewayError::InvalidKey,
                "the API key is not valid (the management API takes a key holding keys:manage, or the admin token)",
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn actor(&self) -> Actor {
        match self {
            Caller::Admin => Actor::Admin,
            Caller::Key(key) => Actor::Key(key.id.clone()),
        }
    }

    /// The owner a key acts for; None for the admin, who acts for all.
    pub(super) fn owner(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Key(key) => Some(&key.owner),
        }
    }

    pub(super) fn key(&self) -> Option<&Arc<CachedKey>> {
        match self {
            Caller::Admin => None,
            Caller::Key(key) => Some(key),
        }
    }

    pub(super) fn can_manage(&self) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Key(key) => key.scopes.iter().any(|s| s == MANAGE_SCOPE),
        }
    }

    /// Whether the caller may see and change `record`: the admin any, a key its owner's.
    pub(super) fn may_touch(&self, record: &KeyRecord) -> bool {
        self.owner().is_none_or(|owner| owner == record.owner)
    }
}

/// What a caller without a usable credential probably meant. The same answers whether or
/// not an admin token is configured, so they tell nothing about it.
fn hint_for(headers: &HeaderMap) -> ApiError {
    let authorization = headers.get_all(http::header::AUTHORIZATION);
    let (refusal, hint) = if authorization
        .iter()
        .any(|v| bearer_token(v.as_bytes()).is_some())
    {
        // A Bearer token that is neither a key nor the admin token.
        (
            GatewayError::InvalidKey,
            "the Bearer token is neither the admin token nor an API key",
        )
    } else if authorization.iter().next().is_some() {
        (
            GatewayError::MissingCredentials,
            "send the admin token as `Authorization: Bearer <token>` (the Bearer scheme is required)",
        )
    } else if headers.contains_key("x-api-key") || headers.contains_key("key") {
        (
            GatewayError::MissingCredentials,
            "the x-api-key or key header holds no API key; the admin token goes in `Authorization: Bearer <token>`",
        )
    } else {
        (
            GatewayError::MissingCredentials,
            "send a key holding keys:manage in x-api-key, or the admin token as `Authorization: Bearer <token>`",
        )
    };
    ApiError::Unauthenticated(refusal, hint)
}

/// Constant-time comparison; hashing first makes it independent of the lengths too.
fn tokens_equal(presented: &[u8], expected: &[u8]) -> bool {
    let a = Sha256::digest(presented);
    let b = Sha256::digest(expected);
    a.as_slice().ct_eq(b.as_slice()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(tokens_equal(b"secret", b"secret"));
        assert!(!tokens_equal(b"secret", b"secreT"));
        assert!(!tokens_equal(b"", b"secret"));
    }
}
