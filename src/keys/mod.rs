//! API keys: their format, hash and ids, the scope grammar, and the persisted record with
//! the rules every store applies to it (revoke, retire, patch).

mod format;
mod hash;
mod id;
mod patch;
mod quota;
pub mod scan;
pub(crate) mod scope;

pub use format::{KeyFormat, KeyFormatError};
pub use hash::KeyHash;
pub use id::{new_key_id, new_ulid};
pub use patch::{KeyPatch, MAX_ALLOWED_IPS, parse_cidr};
pub use quota::{Quota, QuotaPeriod, QuotaUsage, quota_stamp};

use serde::{Deserialize, Serialize};

/// The name a key gets when none is given.
pub const DEFAULT_NAME: &str = "default";

/// Rate limit attached to a key or a route: `requests` per `window_seconds`, burst up to
/// `requests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    pub window_seconds: u32,
}

impl RateLimit {
    pub const MAX_REQUESTS: u32 = 1_000_000_000;
    /// 31 days.
    pub const MAX_WINDOW_SECONDS: u32 = 86_400 * 31;
}

/// A key as persisted: never the raw key, only its hash. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub preview: String,
    pub hash: String,
    pub scopes: Vec<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub rate_limit: Option<RateLimit>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub rotated_from: Option<String>,
    /// Set when a rotation replaced this key: it only lives out its grace period.
    #[serde(default)]
    pub superseded: bool,
    /// CIDRs the key is admitted from; empty: from anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// Bumped by a refill and by a change of the quota's period: the count starts again
    /// (`quota_stamp`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub quota_revision: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl KeyRecord {
    /// A fresh record for `raw_key`, with defaults for everything optional; only the key's
    /// hash and preview are kept.
    pub fn for_key(format: &KeyFormat, raw_key: &str, owner: &str, created_at: i64) -> Self {
        KeyRecord {
            id: new_key_id(),
            name: DEFAULT_NAME.to_string(),
            owner: owner.to_string(),
            preview: format.preview(raw_key),
            hash: KeyHash::of(raw_key.as_bytes()).to_hex(),
            scopes: Vec::new(),
            created_at,
            expires_at: None,
            revoked_at: None,
            rate_limit: None,
            metadata: None,
            rotated_from: None,
            superseded: false,
            allowed_ips: Vec::new(),
            quota: None,
            quota_revision: 0,
        }
    }

    /// The stamp of the quota count a request at `now` spends; None without a quota.
    pub fn quota_stamp(&self, now: i64) -> Option<i64> {
        self.quota
            .map(|quota| quota_stamp(self.quota_revision, quota.period, now))
    }

    pub fn key_hash(&self) -> Option<KeyHash> {
        KeyHash::from_hex(&self.hash)
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    /// Whether a purge that removes keys dead before `before` removes this one: revoked, or
    /// expired, before then. Every store applies this same rule.
    pub fn purgeable(&self, before: i64) -> bool {
        self.revoked_at.is_some_and(|at| at < before)
            || self.expires_at.is_some_and(|at| at < before)
    }

    /// Marks the key revoked at `at`; a key revoked before keeps its first `revoked_at`.
    /// Returns whether anything changed. Every store applies this same rule.
    pub fn revoke(&mut self, at: i64) -> bool {
        if self.revoked_at.is_some() {
            return false;
        }
        self.revoked_at = Some(at);
        true
    }

    /// Marks the key replaced by a rotation, with its expiry brought forward to `cutoff`
    /// (never later than it was). Returns whether anything changed. Every store applies
    /// this same rule.
    pub fn retire(&mut self, cutoff: i64) -> bool {
        let mut changed = !self.superseded;
        self.superseded = true;
        if self.expires_at.is_none_or(|at| at > cutoff) {
            self.expires_at = Some(cutoff);
            changed = true;
        }
        changed
    }
}

/// Usage totals of one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub count: u64,
    /// Unix seconds of the latest admitted request; 0 = never used.
    pub last_used: i64,
    /// What the key's quota has spent, if it has one.
    pub quota: QuotaUsage,
}

impl Usage {
    pub fn merge(&mut self, other: Usage) {
        self.count += other.count;
        self.last_used = self.last_used.max(other.last_used);
        self.quota.merge(other.quota);
    }
}
