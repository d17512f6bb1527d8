//! `POST /keys/verify` (contract section 11): for backends that check keys themselves,
//! whether a key is good and whose it is. The same decision as the request path (revoked,
//! expired, scopes, the key's own rate limit), with no route: a verification that answers
//! `valid: true` counts as one use of the key and spends its rate limit.
//!
//! Who may verify which keys: the admin any key; a key holding `keys:verify` the keys of
//! its own owner; a key holding `keys:verify:all` any owner's (a backend serving many
//! tenants). Another owner's key is answered as an unknown one, so that a tenant's key
//! learns nothing of other tenants' keys.

use serde::Serialize;
use serde_json::{Map, Value};

use super::caller::Caller;
use super::fields;
use super::handlers::{ApiResult, Request, json_reply};
use crate::clock::{rfc3339, unix_now};
use crate::error::{GatewayError, code};
use crate::keys::scope::has_scopes;
use crate::ratelimit::{Budget, Decision, Verdict as LimitVerdict};
use crate::store::CachedKey;

pub(super) const VERIFY_SCOPE: &str = "keys:verify";
pub(super) const VERIFY_ALL_SCOPE: &str = "keys:verify:all";

pub(super) fn may_verify(caller: &Caller) -> bool {
    match caller {
        Caller::Admin => true,
        Caller::Key(key) => key
            .scopes
            .iter()
            .any(|s| s == VERIFY_SCOPE || s == VERIFY_ALL_SCOPE),
    }
}

/// Whether `caller` may learn about `key`.
fn may_see(caller: &Caller, key: &CachedKey) -> bool {
    match caller {
        Caller::Admin => true,
        Caller::Key(own) => {
            own.owner == key.owner || own.scopes.iter().any(|s| s == VERIFY_ALL_SCOPE)
        }
    }
}

#[derive(Serialize)]
struct Verdict<'a> {
    valid: bool,
    code: &'static str,
    #[serde(flatten)]
    known: Option<KnownKey<'a>>,
}

/// What a verification tells of a key the caller may see.
#[derive(Serialize)]
struct KnownKey<'a> {
    id: &'a str,
    owner: &'a str,
    scopes: &'a [String],
    expires_at: Option<String>,
    metadata: Option<&'a Map<String, Value>>,
    rate_limit: Option<RateLimitState>,
    /// Quotas do not exist yet: always null.
    quota_remaining: Option<u64>,
}

#[derive(Serialize)]
struct RateLimitState {
    limit: u32,
    remaining: u32,
    reset: u64,
}

impl From<Decision> for RateLimitState {
    fn from(decision: Decision) -> Self {
        match decision {
            Decision::Allowed {
                limit,
                remaining,
                reset,
            } => RateLimitState {
                limit,
                remaining,
                reset,
            },
            Decision::Limited { limit, reset, .. } => RateLimitState {
                limit,
                remaining: 0,
                reset,
            },
        }
    }
}

pub(super) async fn verify(mut request: Request<'_>) -> ApiResult {
    let (raw, wanted) = fields::read_verify(std::mem::take(&mut request.body))?;
    let shared = request.shared;
    let found = shared.auth.find(raw.as_bytes()).await?;
    let Some(key) = found.filter(|key| may_see(request.caller, key)) else {
        return json_reply(
            200,
            &Verdict {
                valid: false,
                code: code::INVALID_KEY,
                known: None,
            },
        );
    };
    let mut rate_limit = None;
    let mut quota_remaining = None;
    let now = unix_now();
    let code = if key.is_expired(now) {
        code::KEY_EXPIRED
    } else if !has_scopes(&key.scopes, &wanted) {
        code::INSUFFICIENT_SCOPE
    } else {
        let limit = key.rate_limit.map(|limit| (limit, Budget::Key));
        match shared.limits.spend(&key, limit, now).await {
            LimitVerdict::Admitted {
                rate,
                quota_remaining: left,
            } => {
                rate_limit = rate.map(RateLimitState::from);
                quota_remaining = left;
                let stamp = key.quota_stamp(now);
                shared.usage.record(key.id_number, &key.id, now, stamp);
                "valid"
            }
            LimitVerdict::RateLimited(decision) => {
                rate_limit = Some(RateLimitState::from(decision));
                code::RATE_LIMITED
            }
            LimitVerdict::QuotaExhausted { .. } => {
                quota_remaining = Some(0);
                code::QUOTA_EXHAUSTED
            }
            LimitVerdict::Unavailable => return Err(GatewayError::RateLimitUnavailable.into()),
        }
    };
    let known = KnownKey {
        id: &key.id,
        owner: &key.owner,
        scopes: &key.scopes,
        expires_at: key.expires_at.map(rfc3339),
        metadata: key.metadata.as_ref(),
        rate_limit,
        quota_remaining,
    };
    json_reply(
        200,
        &Verdict {
            valid: code == "valid",
            code,
            known: Some(known),
        },
    )
}
