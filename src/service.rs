//! Key lifecycle operations shared by the management API and the offline `keygate keys`
//! commands: validation, creation with its durable write, listing with pending usage
//! merged in, revocation that reaches the cache before it is acknowledged, rotation.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::valid_scope;
use crate::gateway::unix_now;
use crate::keys::{KeyFormat, KeyHash, KeyRecord, RateLimit, Usage, new_key_id};
use crate::store::{AuditEntry, KeyIndex, KeyStore, KeyWithUsage, ListQuery, StoreError};
use crate::usage::UsageRecorder;

pub const MAX_SCOPES: usize = 32;
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_TTL_SECONDS: i64 = 10 * 365 * 86_400;
pub const MAX_GRACE_SECONDS: i64 = 604_800;
pub const DEFAULT_NAME: &str = "default";

/// Field -> reasons, for 422 `validation_failed` details.
pub type FieldErrors = BTreeMap<String, Vec<String>>;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("validation failed")]
    Invalid(FieldErrors),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the operating system's random number generator failed")]
    Random,
}

/// A validated request for a new key.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<i64>,
    pub rate_limit: Option<RateLimit>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
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

/// A key as the API and the CLI show it. `key` is set only in the response that creates it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub preview: String,
    pub owner: String,
    pub scopes: Vec<String>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub last_used: Option<String>,
    pub usage_count: u64,
    pub rate_limit: Option<RateLimit>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// RFC 3339 UTC with whole seconds, e.g. `2026-11-23T10:30:00Z`.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Parses an RFC 3339 time with any offset and fraction into Unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

impl KeyView {
    pub fn new(record: KeyRecord, usage: Usage) -> Self {
        KeyView {
            created_at: rfc3339(record.created_at),
            expires_at: record.expires_at.map(rfc3339),
            revoked_at: record.revoked_at.map(rfc3339),
            last_used: (usage.last_used > 0).then(|| rfc3339(usage.last_used)),
            usage_count: usage.count,
            id: record.id,
            name: record.name,
            preview: record.preview,
            owner: record.owner,
            scopes: record.scopes,
            rate_limit: record.rate_limit,
            metadata: record.metadata,
            rotated_from: record.rotated_from,
            key: None,
        }
    }
}

pub fn valid_owner(owner: &str) -> bool {
    (1..=128).contains(&owner.len())
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// Checks the fields of a new key; every bad field is named.
pub fn validate_new_key(
    name: Option<&str>,
    owner: &str,
    scopes: &[String],
    rate_limit: Option<RateLimit>,
    metadata: Option<&serde_json::Map<String, serde_json::Value>>,
    errors: &mut FieldErrors,
) {
    let mut bad = |field: &str, reason: &str| {
        errors
            .entry(field.to_string())
            .or_default()
            .push(reason.to_string())
    };
    if let Some(name) = name {
        let chars = name.chars().count();
        if !(1..=100).contains(&chars) {
            bad("name", "must be 1 to 100 characters");
        } else if name.chars().any(char::is_control) {
            bad("name", "must not contain control characters");
        }
    }
    if !valid_owner(owner) {
        bad("owner", "must be 1 to 128 characters of A-Za-z0-9._:@-");
    }
    if scopes.len() > MAX_SCOPES {
        bad("scopes", "at most 32 scopes");
    }
    if scopes.iter().any(|s| !valid_scope(s)) {
        bad("scopes", "each scope is 1 to 64 characters of a-z0-9:._-");
    }
    if let Some(rl) = rate_limit {
        if rl.requests == 0 || rl.requests > 1_000_000_000 {
            bad("rate_limit", "requests must be between 1 and 1000000000");
        }
        if rl.window_seconds == 0 || rl.window_seconds > 86_400 * 31 {
            bad("rate_limit", "window_seconds must be between 1 and 2678400");
        }
    }
    if let Some(meta) = metadata {
        let text = serde_json::to_string(meta).unwrap_or_default();
        if text.len() > MAX_METADATA_BYTES {
            bad("metadata", "must be at most 4096 bytes of JSON");
        }
        // PostgreSQL's jsonb cannot hold NUL; refuse it on every backend alike.
        if map_holds_nul(meta) {
            bad("metadata", "must not contain NUL characters");
        }
    }
}

/// Whether a NUL character is in any string of `value`, object keys included.
fn holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::Object(map) => map_holds_nul(map),
        _ => false,
    }
}

fn map_holds_nul(map: &serde_json::Map<String, serde_json::Value>) -> bool {
    map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v))
}

/// Key operations over one store, its cache and the pending usage counters.
pub struct KeyService {
    index: Arc<KeyIndex>,
    usage: Arc<UsageRecorder>,
    format: KeyFormat,
}

pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl KeyService {
    pub fn new(index: Arc<KeyIndex>, usage: Arc<UsageRecorder>, format: KeyFormat) -> Self {
        KeyService {
            index,
            usage,
            format,
        }
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        self.index.store()
    }

    pub fn format(&self) -> &KeyFormat {
        &self.format
    }

    /// Creates a key; answered only once durable. Returns the view with `key` set.
    pub async fn create(
        &self,
        new: NewKey,
        rotated_from: Option<String>,
    ) -> Result<KeyView, ServiceError> {
        let raw = self.format.generate().map_err(|_| ServiceError::Random)?;
        let record = KeyRecord {
            name: new.name,
            scopes: new.scopes,
            expires_at: new.expires_at,
            rate_limit: new.rate_limit,
            metadata: new.metadata,
            rotated_from,
            ..KeyRecord::for_key(&self.format, &raw, &new.owner, unix_now())
        };
        let hash = KeyHash::of(raw.as_bytes());
        self.store().insert(&record).await?;
        self.index.forget_negative(&hash);
        let mut view = KeyView::new(record, Usage::default());
        view.key = Some(raw);
        Ok(view)
    }

    /// One key with its usage, pending counts included.
    pub async fn get(&self, id: &str) -> Result<Option<KeyWithUsage>, ServiceError> {
        Ok(self.store().get(id).await?.map(|k| self.with_pending(k)))
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
    ) -> Result<Page<KeyWithUsage>, ServiceError> {
        // One extra tells whether another page follows.
        let mut items = self
            .store()
            .list(ListQuery {
                owner,
                after,
                limit: limit + 1,
            })
            .await?;
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|k| k.record.id.clone())
        } else {
            None
        };
        Ok(Page {
            items: items.into_iter().map(|k| self.with_pending(k)).collect(),
            next_cursor,
        })
    }

    /// Revokes a key. Returns once the revoke is durable and the cache refuses the key.
    pub async fn revoke(&self, id: &str) -> Result<Option<KeyRecord>, ServiceError> {
        let record = self.store().revoke(id, unix_now()).await?;
        if let Some(hash) = record.as_ref().and_then(KeyRecord::key_hash) {
            self.index.invalidate(&hash);
        }
        Ok(record)
    }

    /// A new key with the old one's settings; the old one stops working after `grace`.
    pub async fn rotate(
        &self,
        old: &KeyRecord,
        grace_seconds: i64,
    ) -> Result<KeyView, ServiceError> {
        let new = NewKey {
            name: old.name.clone(),
            owner: old.owner.clone(),
            scopes: old.scopes.clone(),
            expires_at: old.expires_at,
            rate_limit: old.rate_limit,
            metadata: old.metadata.clone(),
        };
        let view = self.create(new, Some(old.id.clone())).await?;
        let updated = self
            .store()
            .retire(&old.id, unix_now() + grace_seconds)
            .await?;
        if let Some(hash) = updated.as_ref().and_then(KeyRecord::key_hash) {
            self.index.invalidate(&hash);
        }
        Ok(view)
    }

    pub async fn audit(
        &self,
        actor: &Actor,
        action: &str,
        key_id: Option<&str>,
        client: Option<String>,
    ) -> Result<(), ServiceError> {
        let entry = AuditEntry {
            id: new_key_id(),
            actor: actor.label(),
            action: action.to_string(),
            key_id: key_id.map(str::to_string),
            at: unix_now(),
            client,
        };
        self.store().append_audit(&entry).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_whole_second_utc() {
        assert_eq!(rfc3339(1_795_429_800), "2026-11-23T10:30:00Z");
        assert_eq!(
            parse_rfc3339("2026-11-23T11:30:00.75+01:00"),
            Some(1_795_429_800)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

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
}
