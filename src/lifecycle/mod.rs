//! Key lifecycle operations shared by the management API and the offline `keygate keys`
//! commands: the rules of a new key and its creation with its durable write, listing with
//! pending usage merged in, revocation that reaches the cache before it is acknowledged,
//! rotation, changes in place, and the audit entry each change leaves.

use std::sync::Arc;

mod filter;
mod rules;

pub use filter::{KeyState, ListFilter};
pub use rules::{
    FieldErrors, MAX_GRACE_SECONDS, MAX_METADATA_BYTES, MAX_NAME_CHARS, MAX_SCOPES,
    MAX_TTL_SECONDS, add_error, check_patch, normalized_cidrs, validate_new_key,
};

use serde_json::{Map, Value};

use crate::clock::unix_now;
use crate::keys::{
    DEFAULT_NAME, KeyFormat, KeyHash, KeyPatch, KeyRecord, Quota, QuotaUsage, RateLimit, Usage,
    new_key_id,
};
use crate::store::{AuditEntry, KeyCache, KeyStore, KeyWithUsage, ListQuery, StoreError};
use crate::usage::UsageRecorder;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("validation failed")]
    Invalid(FieldErrors),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the operating system's random number generator failed")]
    Random,
}

/// A request for a new key, as a caller wrote it. `Lifecycle::create` validates it,
/// sorts and deduplicates the scopes and names it `default` when it has no name.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: Option<String>,
    pub owner: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<i64>,
    pub rate_limit: Option<RateLimit>,
    pub metadata: Option<Map<String, Value>>,
    /// CIDRs as written; `check` refuses malformed ones, `create` stores them normalised.
    pub allowed_ips: Vec<String>,
    pub quota: Option<Quota>,
}

impl NewKey {
    /// Adds every problem of this request to `errors` (which may already hold others).
    pub fn check(&self, errors: &mut FieldErrors) {
        let meta = self.metadata.as_ref();
        let (name, scopes) = (self.name.as_deref(), &self.scopes);
        validate_new_key(name, &self.owner, scopes, self.rate_limit, meta, errors);
        normalized_cidrs(&self.allowed_ips, errors);
    }
}

/// Who performed a management action, as recorded in the audit log.
#[derive(Debug, Clone)]
pub enum Actor {
    Admin,
    Key(String),
    Signup,
    Cli,
}

impl Actor {
    pub fn label(&self) -> String {
        match self {
            Actor::Admin => "admin".into(),
            Actor::Key(id) => format!("key:{id}"),
            Actor::Signup => "signup".into(),
            Actor::Cli => "cli".into(),
        }
    }
}

/// Who did what, and from where, for the audit log.
#[derive(Debug, Clone)]
pub struct Audit<'a> {
    pub actor: &'a Actor,
    /// `create`, `rotate`, `revoke`, `revoke_by_value`, `signup`, `update`.
    pub action: &'a str,
    pub client: Option<String>,
}

/// A key just created: its record and the raw key, which exists nowhere else.
#[derive(Debug)]
pub struct Created {
    pub record: KeyRecord,
    pub key: String,
}

/// Records removed per store call by `purge`.
const PURGE_BATCH: usize = 256;

/// Records read per store call while a filtered listing fills its page.
const FILTER_BATCH: usize = 500;

pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// The expiry `ttl_seconds` from now, or a reason it is out of bounds.
pub fn expiry_after(ttl_seconds: i64, now: i64) -> Result<i64, String> {
    if (1..=MAX_TTL_SECONDS).contains(&ttl_seconds) {
        Ok(now + ttl_seconds)
    } else {
        Err(format!("must be between 1 and {MAX_TTL_SECONDS}"))
    }
}

/// `items` fetched with one more than `limit`: the page and, when more follow, the cursor.
fn page<T>(mut items: Vec<T>, limit: usize, cursor_of: impl Fn(&T) -> String) -> Page<T> {
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(cursor_of)
    } else {
        None
    };
    Page { items, next_cursor }
}

/// Key operations over one store, its cache and the pending usage counters.
pub struct Lifecycle {
    cache: Arc<KeyCache>,
    usage: Arc<UsageRecorder>,
    format: KeyFormat,
}

impl Lifecycle {
    pub fn new(cache: Arc<KeyCache>, usage: Arc<UsageRecorder>, format: KeyFormat) -> Self {
        Lifecycle {
            cache,
            usage,
            format,
        }
    }

    fn store(&self) -> &Arc<dyn KeyStore> {
        self.cache.store()
    }

    /// Validates and creates a key, then records who did it; answered only once durable.
    pub async fn create(&self, new: NewKey, audit: Audit<'_>) -> Result<Created, LifecycleError> {
        let created = self.insert(new, None).await?;
        self.audit(audit, Some(&created.record.id)).await?;
        Ok(created)
    }

    async fn insert(
        &self,
        mut new: NewKey,
        rotated_from: Option<String>,
    ) -> Result<Created, LifecycleError> {
        let mut errors = FieldErrors::new();
        new.check(&mut errors);
        if !errors.is_empty() {
            return Err(LifecycleError::Invalid(errors));
        }
        new.scopes.sort();
        new.scopes.dedup();
        let allowed_ips = normalized_cidrs(&new.allowed_ips, &mut errors);
        let raw = self.format.generate().map_err(|_| LifecycleError::Random)?;
        let record = KeyRecord {
            name: new.name.unwrap_or_else(|| DEFAULT_NAME.to_string()),
            scopes: new.scopes,
            expires_at: new.expires_at,
            rate_limit: new.rate_limit,
            metadata: new.metadata,
            allowed_ips,
            rotated_from,
            quota: new.quota,
            ..KeyRecord::for_key(&self.format, &raw, &new.owner, unix_now())
        };
        self.store().insert(&record).await?;
        self.cache.key_created(&KeyHash::of(raw.as_bytes()));
        Ok(Created { record, key: raw })
    }

    /// One key with its usage, pending counts included.
    pub async fn get(&self, id: &str) -> Result<Option<KeyWithUsage>, LifecycleError> {
        Ok(self.store().get(id).await?.map(|k| self.with_pending(k)))
    }

    /// The record of a raw key, if it is well-formed and stored.
    pub async fn find_by_key(&self, raw: &str) -> Result<Option<KeyRecord>, LifecycleError> {
        if self.format.check(raw.as_bytes()).is_err() {
            return Ok(None);
        }
        Ok(self
            .store()
            .find_by_hash(&KeyHash::of(raw.as_bytes()))
            .await?)
    }

    fn with_pending(&self, mut key: KeyWithUsage) -> KeyWithUsage {
        key.usage.merge(self.usage.pending_for(&key.record.id));
        key
    }

    pub async fn list(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<KeyWithUsage>, LifecycleError> {
        self.list_matching(owner, after, limit, &ListFilter::default())
            .await
    }

    /// A page of the keys that match `filter`, in id order. The store is read in batches
    /// until the page is full, so a page may cost several reads when few keys match.
    pub async fn list_matching(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: usize,
        filter: &ListFilter,
    ) -> Result<Page<KeyWithUsage>, LifecycleError> {
        let now = unix_now();
        let batch = if filter.is_empty() {
            limit + 1
        } else {
            FILTER_BATCH
        };
        let mut items = Vec::new();
        let mut cursor = after.map(str::to_string);
        loop {
            let query = ListQuery {
                owner,
                after: cursor.as_deref(),
                limit: batch,
            };
            let read = self.store().list(query).await?;
            let exhausted = read.len() < batch;
            cursor = read.last().map(|k| k.record.id.clone());
            items.extend(read.into_iter().filter(|k| filter.matches(&k.record, now)));
            if exhausted || items.len() > limit {
                break;
            }
        }
        let mut page = page(items, limit, |k| k.record.id.clone());
        page.items = page
            .items
            .into_iter()
            .map(|k| self.with_pending(k))
            .collect();
        Ok(page)
    }

    /// Revokes a key. Returns once the revoke is durable, audited, and the cache refuses it.
    pub async fn revoke(
        &self,
        id: &str,
        audit: Audit<'_>,
    ) -> Result<Option<KeyRecord>, LifecycleError> {
        let Some(record) = self.store().revoke(id, unix_now()).await? else {
            return Ok(None);
        };
        if let Some(hash) = record.key_hash() {
            self.cache.invalidate(&hash);
        }
        self.audit(audit, Some(id)).await?;
        Ok(Some(record))
    }

    /// Changes a key in place (`patch` already checked by `check_patch`). Returns once the
    /// change is durable, the cache no longer holds the old record (here, and on
    /// PostgreSQL on every gateway, by the notification the update commits with) and, if
    /// it changed anything, audited. A revoked or rotated key comes back unchanged.
    pub async fn update(
        &self,
        id: &str,
        patch: &KeyPatch,
        audit: Audit<'_>,
    ) -> Result<Option<KeyRecord>, LifecycleError> {
        let Some(record) = self.store().update(id, patch).await? else {
            return Ok(None);
        };
        if let Some(hash) = record.key_hash() {
            self.cache.invalidate(&hash);
        }
        if !record.is_revoked() && !record.superseded {
            self.audit(audit, Some(id)).await?;
        }
        Ok(Some(record))
    }

    /// A new key with the old one's settings; the old one stops working after `grace`.
    /// Not atomic: should retiring the old key fail, the call fails after minting a key
    /// nobody received, which is harmless (it is never shown).
    pub async fn rotate(
        &self,
        old: &KeyRecord,
        grace_seconds: i64,
        audit: Audit<'_>,
    ) -> Result<Created, LifecycleError> {
        let new = NewKey {
            name: Some(old.name.clone()),
            owner: old.owner.clone(),
            scopes: old.scopes.clone(),
            expires_at: old.expires_at,
            rate_limit: old.rate_limit,
            metadata: old.metadata.clone(),
            allowed_ips: old.allowed_ips.clone(),
            quota: old.quota,
        };
        let created = self.insert(new, Some(old.id.clone())).await?;
        let retired = self
            .store()
            .retire(&old.id, unix_now() + grace_seconds)
            .await?;
        if let Some(hash) = retired.as_ref().and_then(KeyRecord::key_hash) {
            self.cache.invalidate(&hash);
        }
        self.audit(audit, Some(&old.id)).await?;
        Ok(created)
    }

    /// Writes `used` as what key `id`'s quota has spent in the period `stamp` names (a
    /// rotated key's inheritance), durably, before the key is handed out.
    pub async fn seed_quota(&self, id: &str, stamp: i64, used: u64) -> Result<(), LifecycleError> {
        if used == 0 {
            return Ok(());
        }
        let spent = Usage {
            quota: QuotaUsage { stamp, used },
            ..Usage::default()
        };
        self.store().add_usage(&[(id.to_string(), spent)]).await?;
        Ok(())
    }

    /// Removes every key revoked or expired before `before`, `PURGE_BATCH` at a time (each
    /// batch one store call, so the store is never held long); their audit entries stay.
    /// Returns how many went.
    pub async fn purge(&self, before: i64) -> Result<usize, LifecycleError> {
        let mut purged = 0;
        loop {
            let hashes = self.store().purge(before, PURGE_BATCH).await?;
            for hash in &hashes {
                self.cache.invalidate(hash);
            }
            purged += hashes.len();
            if hashes.len() < PURGE_BATCH {
                return Ok(purged);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Records a management action.
    async fn audit(&self, audit: Audit<'_>, key_id: Option<&str>) -> Result<(), LifecycleError> {
        let entry = AuditEntry {
            id: new_key_id(),
            actor: audit.actor.label(),
            action: audit.action.to_string(),
            key_id: key_id.map(str::to_string),
            at: unix_now(),
            client: audit.client,
        };
        self.store().append_audit(&entry).await?;
        Ok(())
    }

    /// Audit entries, newest first, before the cursor.
    pub async fn audit_log(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Page<AuditEntry>, LifecycleError> {
        let entries = self.store().list_audit(before, limit + 1).await?;
        Ok(page(entries, limit, |e| e.id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds() {
        assert_eq!(expiry_after(10, 100), Ok(110));
        assert!(expiry_after(0, 100).is_err());
        assert!(expiry_after(MAX_TTL_SECONDS + 1, 100).is_err());
    }

    #[test]
    fn pages_carry_a_cursor_only_when_more_follow() {
        let full = page(vec![1, 2, 3], 2, |n| n.to_string());
        assert_eq!(
            (full.items, full.next_cursor),
            (vec![1, 2], Some("2".into()))
        );
        let last = page(vec![1, 2], 2, |n| n.to_string());
        assert_eq!((last.items, last.next_cursor), (vec![1, 2], None));
    }
}
