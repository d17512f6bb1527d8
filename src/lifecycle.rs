//! Key lifecycle operations shared by the management API and the offline `keygate keys`
//! commands: the rules of a new key and its creation with its durable write, listing with
//! pending usage merged in, revocation that reaches the cache before it is acknowledged,
//! rotation, and the audit entry each change leaves.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::clock::unix_now;
use crate::keys::scope::{valid_owner, valid_scope};
use crate::keys::{DEFAULT_NAME, KeyFormat, KeyHash, KeyRecord, RateLimit, new_key_id};
use crate::store::{AuditEntry, KeyCache, KeyStore, KeyWithUsage, ListQuery, StoreError};
use crate::usage::UsageRecorder;

pub const MAX_SCOPES: usize = 32;
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_TTL_SECONDS: i64 = 10 * 365 * 86_400;
pub const MAX_GRACE_SECONDS: i64 = 604_800;
pub const MAX_NAME_CHARS: usize = 100;

/// Field -> reasons, for 422 `validation_failed` details.
pub type FieldErrors = BTreeMap<String, Vec<String>>;

/// Adds `reason` to `field`'s reasons.
pub fn add_error(errors: &mut FieldErrors, field: &str, reason: impl Into<String>) {
    errors
        .entry(field.to_string())
        .or_default()
        .push(reason.into());
}

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
}

impl NewKey {
    /// Adds every problem of this request to `errors` (which may already hold others).
    pub fn check(&self, errors: &mut FieldErrors) {
        let meta = self.metadata.as_ref();
        let (name, scopes) = (self.name.as_deref(), &self.scopes);
        validate_new_key(name, &self.owner, scopes, self.rate_limit, meta, errors);
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
    /// `create`, `rotate`, `revoke`, `revoke_by_value`, `signup`.
    pub action: &'a str,
    pub client: Option<String>,
}

/// A key just created: its record and the raw key, which exists nowhere else.
#[derive(Debug)]
pub struct Created {
    pub record: KeyRecord,
    pub key: String,
}

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

/// Checks the fields of a new key; every bad field is named.
pub fn validate_new_key(
    name: Option<&str>,
    owner: &str,
    scopes: &[String],
    rate_limit: Option<RateLimit>,
    metadata: Option<&Map<String, Value>>,
    errors: &mut FieldErrors,
) {
    if let Some(name) = name {
        let chars = name.chars().count();
        if !(1..=MAX_NAME_CHARS).contains(&chars) {
            add_error(
                errors,
                "name",
                format!("must be 1 to {MAX_NAME_CHARS} characters"),
            );
        } else if name.chars().any(char::is_control) {
            add_error(errors, "name", "must not contain control characters");
        }
    }
    // An owner already found missing is not also reported malformed.
    if !errors.contains_key("owner") && !valid_owner(owner) {
        add_error(
            errors,
            "owner",
            "must be 1 to 128 characters of A-Za-z0-9._:@-",
        );
    }
    if scopes.len() > MAX_SCOPES {
        add_error(errors, "scopes", format!("at most {MAX_SCOPES} scopes"));
    }
    if scopes.iter().any(|s| !valid_scope(s)) {
        add_error(
            errors,
            "scopes",
            "each scope is 1 to 64 characters of a-z0-9:._-",
        );
    }
    if let Some(rl) = rate_limit {
        validate_rate_limit(rl, errors);
    }
    if let Some(meta) = metadata {
        validate_metadata(meta, errors);
    }
}

fn validate_rate_limit(rl: RateLimit, errors: &mut FieldErrors) {
    if rl.requests == 0 || rl.requests > RateLimit::MAX_REQUESTS {
        let max = RateLimit::MAX_REQUESTS;
        add_error(
            errors,
            "rate_limit",
            format!("requests must be between 1 and {max}"),
        );
    }
    if rl.window_seconds == 0 || rl.window_seconds > RateLimit::MAX_WINDOW_SECONDS {
        let max = RateLimit::MAX_WINDOW_SECONDS;
        let reason = format!("window_seconds must be between 1 and {max}");
        add_error(errors, "rate_limit", reason);
    }
}

fn validate_metadata(meta: &Map<String, Value>, errors: &mut FieldErrors) {
    let text = serde_json::to_string(meta).unwrap_or_default();
    if text.len() > MAX_METADATA_BYTES {
        let reason = format!("must be at most {MAX_METADATA_BYTES} bytes of JSON");
        add_error(errors, "metadata", reason);
    }
    // PostgreSQL's jsonb cannot hold NUL; refuse it on every backend alike.
    if map_holds_nul(meta) {
        add_error(errors, "metadata", "must not contain NUL characters");
    }
}

/// Whether a NUL character is in any string of `value`, object keys included.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map_holds_nul(map),
        _ => false,
    }
}

fn map_holds_nul(map: &Map<String, Value>) -> bool {
    map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v))
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
        let raw = self.format.generate().map_err(|_| LifecycleError::Random)?;
        let record = KeyRecord {
            name: new.name.unwrap_or_else(|| DEFAULT_NAME.to_string()),
            scopes: new.scopes,
            expires_at: new.expires_at,
            rate_limit: new.rate_limit,
            metadata: new.metadata,
            rotated_from,
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
        let query = ListQuery {
            owner,
            after,
            limit: limit + 1,
        };
        let items = self.store().list(query).await?;
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
    fn nul_in_metadata_is_refused() {
        for meta in [
            serde_json::json!({"note": "a\u{0}b"}),
            serde_json::json!({"a\u{0}": 1}),
            serde_json::json!({"deep": [1, {"x": ["\u{0}"]}]}),
        ] {
            let mut errors = FieldErrors::new();
            validate_new_key(None, "alice", &[], None, meta.as_object(), &mut errors);
            assert!(errors.contains_key("metadata"), "{meta}: {errors:?}");
        }
    }

    /// The text `\u0000` (a backslash, then `u0000`) is not a NUL character: it used to be
    /// refused because the check searched the escaped JSON text.
    #[test]
    fn escaped_looking_text_in_metadata_is_kept() {
        let mut errors = FieldErrors::new();
        let meta = serde_json::json!({"path": "C:\\u0000\\dir", "\\u0000": "key"});
        validate_new_key(None, "alice", &[], None, meta.as_object(), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn validation_names_every_bad_field() {
        let mut errors = FieldErrors::new();
        validate_new_key(
            Some(""),
            "bad owner!",
            &["UPPER".to_string()],
            Some(RateLimit {
                requests: 0,
                window_seconds: 1,
            }),
            None,
            &mut errors,
        );
        let fields: Vec<&str> = errors.keys().map(String::as_str).collect();
        assert_eq!(fields, ["name", "owner", "rate_limit", "scopes"]);
    }

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
