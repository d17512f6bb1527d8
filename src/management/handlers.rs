//! One handler per call. Each reads its request, applies the caller's rights, and leaves
//! the rules of keys to `keys::lifecycle`.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::caller::{Caller, MANAGE_SCOPE};
use super::error::ApiError;
use super::fields::{self, CreateKey};
use super::views::{AuditView, KeyView, PageBody, RevokeResult};
use crate::clock::unix_now;
use crate::error::GatewayError;
use crate::keys::scope::{has_scopes, valid_owner};
use crate::keys::{KeyPatch, KeyRecord, Quota, RateLimit, new_key_id};
use crate::lifecycle::{
    Actor, Audit, FieldErrors, KeyState, Lifecycle, ListFilter, NewKey, add_error, check_patch,
};
use crate::ratelimit::{ManagementBudget, ManagementLimiters};
use crate::session::respond::Reply;
use crate::state::Shared;
use crate::store::{CachedKey, KeyWithUsage};

pub(super) type ApiResult = Result<Reply, ApiError>;

/// What every authenticated handler knows of its call.
pub(super) struct Request<'a> {
    pub shared: &'a Shared,
    pub keys: &'a Lifecycle,
    pub limiters: &'a ManagementLimiters,
    pub caller: &'a Caller,
    pub actor: Actor,
    pub client: Option<String>,
    pub query: HashMap<String, String>,
    pub body: Map<String, Value>,
}

impl Request<'_> {
    fn audit<'a>(&'a self, action: &'a str) -> Audit<'a> {
        Audit {
            actor: &self.actor,
            action,
            client: self.client.clone(),
        }
    }

    /// The key `id` if the caller may see it; another owner's key is "not found".
    async fn owned_key(&self, id: &str) -> Result<KeyWithUsage, ApiError> {
        match self.keys.get(id).await? {
            Some(key) if self.caller.may_touch(&key.record) => Ok(key),
            _ => Err(ApiError::NotFound),
        }
    }
}

pub(super) fn json_reply(status: u16, value: &impl serde::Serialize) -> ApiResult {
    serde_json::to_vec(value)
        .map(|body| Reply::json(status, Bytes::from(body)))
        .map_err(|_| GatewayError::Internal.into())
}

pub(super) async fn create(mut request: Request<'_>) -> ApiResult {
    let body = std::mem::take(&mut request.body);
    let (create, mut f) = CreateKey::read(body, unix_now());
    let owner = match (request.caller, create.owner) {
        (Caller::Admin, Some(owner)) => owner,
        (Caller::Admin, None) => {
            f.bad("owner", "required when the admin creates a key");
            String::new()
        }
        (Caller::Key(key), Some(owner)) if owner != key.owner => {
            f.bad("owner", "only the admin may create keys for another owner");
            key.owner.clone()
        }
        (Caller::Key(key), _) => key.owner.clone(),
    };
    let scopes = match (request.caller, create.scopes) {
        (_, Some(scopes)) => scopes,
        (Caller::Key(key), None) => key.scopes.clone(),
        (Caller::Admin, None) => Vec::new(),
    };
    let new = NewKey {
        name: create.name,
        owner,
        scopes,
        expires_at: create.expires_at,
        rate_limit: create.rate_limit,
        metadata: create.metadata,
        allowed_ips: create.allowed_ips,
        quota: create.quota,
    };
    new.check(&mut f.errors);
    f.finish()?;
    let mut new = new;
    if let Caller::Key(key) = request.caller {
        if !has_scopes(&key.scopes, &new.scopes) {
            return Err(ApiError::Forbidden(
                "a key can only grant scopes it holds itself",
            ));
        }
        let mut errors = FieldErrors::new();
        if outlives(new.expires_at, key.expires_at) {
            add_error(
                &mut errors,
                "expires_at",
                "a key can only create keys that expire no later than itself",
            );
        }
        if looser(new.rate_limit, key.rate_limit) {
            add_error(
                &mut errors,
                "rate_limit",
                "a key can only create keys whose rate limit is no looser than its own",
            );
        }
        if quota_looser(new.quota, key.quota) {
            add_error(
                &mut errors,
                "quota",
                "a key can only create keys whose quota is no looser than its own (the same period, no more requests)",
            );
        }
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        new.expires_at = new.expires_at.or(key.expires_at);
        new.rate_limit = new.rate_limit.or(key.rate_limit);
        new.quota = new.quota.or(key.quota);
    }
    let created = request.keys.create(new, request.audit("create")).await?;
    json_reply(201, &KeyView::created(created))
}

/// Whether a key expiring at `asked` (None: never) would outlive a creator expiring at
/// `cap`. A key with no expiry asked for gets its creator's, so it outlives nothing.
fn outlives(asked: Option<i64>, cap: Option<i64>) -> bool {
    matches!((asked, cap), (Some(asked), Some(cap)) if asked > cap)
}

/// Whether `asked` allows more than `cap`: a bigger burst or a faster rate. No limit asked
/// for gets the creator's.
fn looser(asked: Option<RateLimit>, cap: Option<RateLimit>) -> bool {
    let (Some(asked), Some(cap)) = (asked, cap) else {
        return false;
    };
    let rate =
        |rl: RateLimit, other: RateLimit| u64::from(rl.requests) * u64::from(other.window_seconds);
    asked.requests > cap.requests || rate(asked, cap) > rate(cap, asked)
}

/// Whether quota `asked` allows more than `cap`: another period or more requests. No quota
/// asked for gets the creator's.
fn quota_looser(asked: Option<Quota>, cap: Option<Quota>) -> bool {
    matches!((asked, cap), (Some(asked), Some(cap)) if asked.period != cap.period || asked.requests > cap.requests)
}

/// The settings a rotation by a key hands on: the old key's, capped at the caller's own
/// expiry and rate limit (a short-lived key must not mint a long-lived successor).
fn capped_for(caller: &Caller, mut old: KeyRecord) -> KeyRecord {
    if let Caller::Key(key) = caller {
        if outlives(old.expires_at, key.expires_at) || old.expires_at.is_none() {
            old.expires_at = key.expires_at.or(old.expires_at);
        }
        if looser(old.rate_limit, key.rate_limit) || old.rate_limit.is_none() {
            old.rate_limit = key.rate_limit.or(old.rate_limit);
        }
        if quota_looser(old.quota, key.quota) || old.quota.is_none() {
            old.quota = key.quota.or(old.quota);
        }
    }
    old
}

/// `?limit=` (1 to 1000, default 100) and `?cursor=` (an id this API returned).
fn page_params(query: &HashMap<String, String>) -> Result<(usize, Option<&str>), ApiError> {
    let mut errors = FieldErrors::new();
    let limit = match query.get("limit").map(|text| text.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            add_error(&mut errors, "limit", "must be an integer from 1 to 1000");
            100
        }
    };
    let cursor = query.get("cursor").map(String::as_str);
    if cursor.is_some_and(|c| ulid::Ulid::from_string(c).is_err()) {
        add_error(&mut errors, "cursor", "is not a cursor this API returned");
    }
    if errors.is_empty() {
        Ok((limit, cursor))
    } else {
        Err(ApiError::Validation(errors))
    }
}

/// `?state=active|revoked|expired`, `?name=` (exact) and `?scope=`; an empty value is
/// refused (contract section 13).
fn list_filter(query: &HashMap<String, String>) -> Result<ListFilter, ApiError> {
    let mut errors = FieldErrors::new();
    let state = match query.get("state").map(String::as_str) {
        None => None,
        Some("active") => Some(KeyState::Active),
        Some("revoked") => Some(KeyState::Revoked),
        Some("expired") => Some(KeyState::Expired),
        Some(_) => {
            add_error(&mut errors, "state", "must be active, revoked or expired");
            None
        }
    };
    for field in ["name", "scope"] {
        if query.get(field).is_some_and(String::is_empty) {
            add_error(
                &mut errors,
                field,
                "must not be empty; leave it out instead",
            );
        }
    }
    if errors.is_empty() {
        Ok(ListFilter {
            state,
            name: query.get("name").cloned(),
            scope: query.get("scope").cloned(),
        })
    } else {
        Err(ApiError::Validation(errors))
    }
}

pub(super) async fn list(request: Request<'_>) -> ApiResult {
    let (limit, cursor) = page_params(&request.query)?;
    let owner = match request.caller {
        Caller::Admin => request.query.get("owner").map(String::as_str),
        Caller::Key(key) => Some(key.owner.as_str()),
    };
    if let Some(owner) = owner
        && !valid_owner(owner)
    {
        let mut errors = FieldErrors::new();
        add_error(
            &mut errors,
            "owner",
            "must be 1 to 128 characters of A-Za-z0-9._:@-",
        );
        return Err(ApiError::Validation(errors));
    }
    let filter = list_filter(&request.query)?;
    let mut page = request
        .keys
        .list_matching(owner, cursor, limit, &filter)
        .await?;
    let limits = &request.shared.limits;
    limits.settle_quotas(&mut page.items, unix_now()).await;
    json_reply(200, &PageBody::<KeyView>::of(page))
}

pub(super) async fn get(request: Request<'_>, id: &str) -> ApiResult {
    let mut key = request.owned_key(id).await?;
    request
        .shared
        .limits
        .settle_quota(&mut key, unix_now())
        .await;
    json_reply(200, &KeyView::from(key))
}

async fn revoke_owned(request: &Request<'_>, id: &str, action: &str) -> ApiResult {
    let record = request
        .keys
        .revoke(id, request.audit(action))
        .await?
        .ok_or(ApiError::NotFound)?;
    json_reply(200, &RevokeResult::from(record))
}

pub(super) async fn revoke(request: Request<'_>, id: &str) -> ApiResult {
    let key = request.owned_key(id).await?;
    revoke_owned(&request, &key.record.id, "revoke").await
}

/// The admin, a `keys:manage` key of the same owner, or the key itself; any other key is
/// told "not found", as for an unknown one. A key's every attempt spends that key's own
/// revoke budget (so junk attempts wear out only the key that makes them); a revoke of
/// another key of the owner's also spends the owner's budget, and only then.
pub(super) async fn revoke_by_value(mut request: Request<'_>) -> ApiResult {
    let raw = fields::read_revoke_by_value(std::mem::take(&mut request.body))?;
    if let Caller::Key(own) = request.caller {
        let who = format!("key:{}", own.id);
        spend(
            request.shared,
            request.limiters,
            ManagementBudget::Revoke,
            &who,
        )
        .await?;
    }
    let record = request
        .keys
        .find_by_key(&raw)
        .await?
        .ok_or(ApiError::NotFound)?;
    match request.caller {
        Caller::Admin => {}
        Caller::Key(own) if own.id == record.id => {}
        Caller::Key(own) if request.caller.can_manage() && own.owner == record.owner => {
            let client = request.client.as_deref().and_then(|c| c.parse().ok());
            if !own.admits_from(client) {
                return Err(GatewayError::IpNotAllowed.into());
            }
            let limiters = request.limiters;
            spend(
                request.shared,
                limiters,
                ManagementBudget::Revoke,
                &own.owner,
            )
            .await?;
        }
        Caller::Key(_) => return Err(ApiError::NotFound),
    }
    revoke_owned(&request, &record.id, "revoke_by_value").await
}

/// Spends one call of `who`'s `budget` (here, or in Redis with `[ratelimit] backend =
/// "redis"`): 429 `rate_limited` once it is spent.
pub(super) async fn spend(
    shared: &Shared,
    limiters: &ManagementLimiters,
    budget: ManagementBudget,
    who: &str,
) -> Result<(), ApiError> {
    let verdict = shared.limits.spend_management(limiters, budget, who).await;
    verdict.admitted().map_err(ApiError::from)
}

pub(super) async fn rotate(mut request: Request<'_>, id: &str) -> ApiResult {
    let old = request.owned_key(id).await?.record;
    let grace = fields::read_rotate(std::mem::take(&mut request.body))?;
    let conflict = |code, message| Err(ApiError::Conflict { code, message });
    if old.is_revoked() {
        return conflict(
            crate::error::code::KEY_REVOKED,
            "a revoked key cannot be rotated",
        );
    }
    if old.superseded {
        return conflict(
            crate::error::code::KEY_ROTATED,
            "this key was already rotated; rotate its successor",
        );
    }
    if old.expires_at.is_some_and(|at| at <= unix_now()) {
        return conflict(
            crate::error::code::KEY_EXPIRED,
            "an expired key cannot be rotated",
        );
    }
    // Rotation mints a key with the old one's scopes: the same rule as creation applies.
    if let Caller::Key(key) = request.caller
        && !has_scopes(&key.scopes, &old.scopes)
    {
        return Err(ApiError::Forbidden(
            "a key can only rotate keys whose scopes it holds itself",
        ));
    }
    let settings = capped_for(request.caller, old.clone());
    let created = request
        .keys
        .rotate(&settings, grace, request.audit("rotate"))
        .await?;
    let spent = hand_on_quota(&request, &old, &created.record).await?;
    let mut view = KeyView::created(created);
    view.quota_remaining = view.quota.map(|quota| quota.requests.saturating_sub(spent));
    json_reply(201, &view)
}

/// What the old key spent of its quota in the current period, read once the rotation has
/// retired it (with no grace it spends no more here), and written as the new key's count
/// so far: the new key inherits what is left. Nothing is handed on to a quota of another
/// period (capped by a key caller's own).
async fn hand_on_quota(
    request: &Request<'_>,
    old: &KeyRecord,
    new: &KeyRecord,
) -> Result<u64, ApiError> {
    let same_period = matches!((old.quota, new.quota), (Some(a), Some(b)) if a.period == b.period);
    let now = unix_now();
    let (true, Some(old_stamp), Some(new_stamp)) =
        (same_period, old.quota_stamp(now), new.quota_stamp(now))
    else {
        return Ok(0);
    };
    let mut retired = request.owned_key(&old.id).await?;
    request.shared.limits.settle_quota(&mut retired, now).await;
    let spent = retired.usage.quota.used_in(old_stamp);
    request.keys.seed_quota(&new.id, new_stamp, spent).await?;
    Ok(spent)
}

/// `PATCH /keys/{id}`: the fields checked as create checks them (every bad one named),
/// then the caller's rights, then one store update that the cache sees before the answer.
pub(super) async fn update(mut request: Request<'_>, id: &str) -> ApiResult {
    let current = request.owned_key(id).await?;
    let (mut patch, mut f) = fields::read_patch(std::mem::take(&mut request.body), unix_now());
    check_patch(&mut patch, &mut f.errors);
    if let Caller::Key(key) = request.caller {
        bound_by_caller(&patch, key, &mut f.errors);
    }
    f.finish()?;
    refuse_unchangeable(&current.record)?;
    if let Caller::Key(key) = request.caller {
        let scopes = patch.scopes.as_ref().unwrap_or(&current.record.scopes);
        if !has_scopes(&key.scopes, scopes) {
            return Err(ApiError::Forbidden(
                "a key can only change keys whose scopes, after the change, it holds itself",
            ));
        }
    }
    let record = request
        .keys
        .update(id, &patch, request.audit("update"))
        .await?
        .ok_or(ApiError::NotFound)?;
    // Revoked or rotated meanwhile: the store left it as it was.
    refuse_unchangeable(&record)?;
    let mut updated = KeyWithUsage {
        record,
        usage: current.usage,
    };
    request
        .shared
        .limits
        .settle_quota(&mut updated, unix_now())
        .await;
    json_reply(200, &KeyView::from(updated))
}

/// `POST /keys/{id}/quota/refill` (the admin only): the key's quota counts from zero again
/// from now, on every gateway (a new quota revision, which the stores, Redis and every
/// gateway's cache see as a new count).
pub(super) async fn refill_quota(request: Request<'_>, id: &str) -> ApiResult {
    let current = request.owned_key(id).await?;
    refuse_unchangeable(&current.record)?;
    if current.record.quota.is_none() {
        return Err(ApiError::Conflict {
            code: crate::error::code::NO_QUOTA,
            message: "this key has no quota to refill; set one with PATCH",
        });
    }
    let patch = KeyPatch {
        refill_quota: true,
        ..KeyPatch::default()
    };
    let record = request
        .keys
        .update(id, &patch, request.audit("refill_quota"))
        .await?
        .ok_or(ApiError::NotFound)?;
    refuse_unchangeable(&record)?;
    let refilled = KeyWithUsage {
        record,
        usage: current.usage,
    };
    json_reply(200, &KeyView::from(refilled))
}

/// 409 for a key that can no longer change: revoked, or replaced by a rotation.
fn refuse_unchangeable(record: &KeyRecord) -> Result<(), ApiError> {
    let conflict = |code, message| Err(ApiError::Conflict { code, message });
    if record.is_revoked() {
        return conflict(
            crate::error::code::KEY_REVOKED,
            "a revoked key cannot be changed",
        );
    }
    if record.superseded {
        return conflict(
            crate::error::code::KEY_ROTATED,
            "this key was rotated; change its successor",
        );
    }
    Ok(())
}

/// A `keys:manage` key may not patch a key past its own expiry or rate limit (section 13),
/// nor remove either where it has one itself.
fn bound_by_caller(patch: &KeyPatch, key: &CachedKey, errors: &mut FieldErrors) {
    match patch.expires_at {
        Some(None) if key.expires_at.is_some() => add_error(
            errors,
            "expires_at",
            "a key that expires cannot remove another key's expiry",
        ),
        Some(asked) if outlives(asked, key.expires_at) => add_error(
            errors,
            "expires_at",
            "a key can only set expiries no later than its own",
        ),
        _ => {}
    }
    match patch.rate_limit {
        Some(None) if key.rate_limit.is_some() => add_error(
            errors,
            "rate_limit",
            "a rate-limited key cannot remove another key's rate limit",
        ),
        Some(asked) if looser(asked, key.rate_limit) => add_error(
            errors,
            "rate_limit",
            "a key can only set rate limits no looser than its own",
        ),
        _ => {}
    }
    match patch.quota {
        Some(None) if key.quota.is_some() => add_error(
            errors,
            "quota",
            "a key with a quota cannot remove another key's quota",
        ),
        Some(asked) if quota_looser(asked, key.quota) => add_error(
            errors,
            "quota",
            "a key can only set quotas no looser than its own",
        ),
        _ => {}
    }
}

pub(super) async fn audit(request: Request<'_>) -> ApiResult {
    let (limit, cursor) = page_params(&request.query)?;
    let page = request.keys.audit_log(cursor, limit).await?;
    json_reply(200, &PageBody::<AuditView>::of(page))
}

/// A new owner and its first key, holding `keys:manage`. The caller's per-address budget
/// was spent before this.
pub(super) async fn signup(
    keys: &Lifecycle,
    client: Option<String>,
    body: Map<String, Value>,
) -> ApiResult {
    let (name, mut f) = fields::read_signup(body);
    let new = NewKey {
        name,
        owner: format!("user-{}", new_key_id().to_ascii_lowercase()),
        scopes: vec![MANAGE_SCOPE.to_string()],
        expires_at: None,
        rate_limit: None,
        metadata: None,
        allowed_ips: Vec::new(),
        quota: None,
    };
    new.check(&mut f.errors);
    f.finish()?;
    let audit = Audit {
        actor: &Actor::Signup,
        action: "signup",
        client,
    };
    let created = keys.create(new, audit).await?;
    json_reply(201, &KeyView::created(created))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(requests: u32, window_seconds: u32) -> Option<RateLimit> {
        Some(RateLimit {
            requests,
            window_seconds,
        })
    }

    #[test]
    fn delegated_limits_are_no_looser_than_the_creators() {
        assert!(!outlives(Some(10), Some(20)));
        assert!(outlives(Some(30), Some(20)));
        assert!(!outlives(None, Some(20)));
        assert!(!outlives(Some(30), None));
        assert!(!looser(rl(10, 60), rl(10, 60)));
        assert!(!looser(rl(5, 60), rl(10, 60)));
        assert!(looser(rl(11, 60), rl(10, 60)));
        // 10 a second is faster than 10 a minute, though the burst is the same.
        assert!(looser(rl(10, 1), rl(10, 60)));
        assert!(!looser(None, rl(10, 60)));
        assert!(!looser(rl(1000, 1), None));
    }
}
