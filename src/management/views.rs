//! What the management API and the CLI show: keys (masked, with usage), pages, audit
//! entries, revocations. The raw key appears only in the view of a key just created.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::clock::{rfc3339, unix_now};
use crate::keys::{KeyRecord, Quota, RateLimit, Usage};
use crate::lifecycle::{Created, Page};
use crate::store::{AuditEntry, KeyWithUsage};

/// A key as the API and the CLI show it. `key` is set only in the response that creates it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct KeyView {
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
    pub quota: Option<Quota>,
    /// What is left of `quota` in its current period; null without a quota.
    pub quota_remaining: Option<u64>,
    pub metadata: Option<Map<String, Value>>,
    /// CIDRs the key is admitted from; empty: anywhere.
    pub allowed_ips: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
    /// Whether a rotation replaced this key (it lives out its grace period at most): the
    /// console's "rotated" state, which nothing else in the record tells.
    pub rotated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl KeyView {
    pub(crate) fn new(record: KeyRecord, usage: Usage) -> Self {
        let stamp = record.quota_stamp(unix_now());
        let quota_remaining = record
            .quota
            .zip(stamp)
            .map(|(quota, stamp)| quota.requests.saturating_sub(usage.quota.used_in(stamp)));
        KeyView {
            quota: record.quota,
            quota_remaining,
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
            allowed_ips: record.allowed_ips,
            rotated_from: record.rotated_from,
            rotated: record.superseded,
            key: None,
        }
    }

    /// The one view that shows the key itself.
    pub(crate) fn created(created: Created) -> Self {
        KeyView {
            key: Some(created.key),
            ..KeyView::new(created.record, Usage::default())
        }
    }
}

impl From<KeyWithUsage> for KeyView {
    fn from(key: KeyWithUsage) -> Self {
        KeyView::new(key.record, key.usage)
    }
}

/// `{"data": [...], "next_cursor": null | "..."}`
#[derive(Debug, Serialize)]
pub(crate) struct PageBody<T: Serialize> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T: Serialize> PageBody<T> {
    pub(crate) fn of<S: Into<T>>(page: Page<S>) -> Self {
        PageBody {
            data: page.items.into_iter().map(Into::into).collect(),
            next_cursor: page.next_cursor,
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct AuditView {
    pub actor: String,
    pub action: String,
    pub key_id: Option<String>,
    pub at: String,
    pub client: Option<String>,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> Self {
        AuditView {
            actor: e.actor,
            action: e.action,
            key_id: e.key_id,
            at: rfc3339(e.at),
            client: e.client,
        }
    }
}

/// `{"id", "revoked": true, "revoked_at"}`
#[derive(Debug, Serialize)]
pub(crate) struct RevokeResult {
    pub id: String,
    pub revoked: bool,
    pub revoked_at: Option<String>,
}

impl From<KeyRecord> for RevokeResult {
    fn from(record: KeyRecord) -> Self {
        RevokeResult {
            revoked_at: record.revoked_at.map(rfc3339),
            id: record.id,
            revoked: true,
        }
    }
}
