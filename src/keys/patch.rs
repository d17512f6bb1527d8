//! A change to a key in place (`PATCH /keys/{id}`), and the CIDR lists that a key's
//! `allowed_ips` hold. Every store applies a patch with `KeyRecord::apply`, inside the
//! transaction that rewrites the record.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::{KeyRecord, Quota, RateLimit};

/// At most this many CIDRs in a key's `allowed_ips`.
pub const MAX_ALLOWED_IPS: usize = 64;

/// The fields a patch sets. The outer `None` leaves a field alone; `Some(None)` removes an
/// optional one. An empty `allowed_ips` removes the allowlist.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub metadata: Option<Option<Map<String, Value>>>,
    pub rate_limit: Option<Option<RateLimit>>,
    pub expires_at: Option<Option<i64>>,
    pub allowed_ips: Option<Vec<String>>,
    /// A new quota of the same period keeps what was spent of it; another period, or a
    /// quota where there was none, counts from zero.
    pub quota: Option<Option<Quota>>,
    /// Starts the quota's count again (`POST /keys/{id}/quota/refill`, the admin's top-up).
    pub refill_quota: bool,
}

impl KeyRecord {
    /// Applies `patch`, unless the key is revoked or was replaced by a rotation (those are
    /// refused, and the caller tells which from the record). Returns whether it changed
    /// anything. Every store applies this same rule.
    pub fn apply(&mut self, patch: &KeyPatch) -> bool {
        if self.is_revoked() || self.superseded {
            return false;
        }
        let before = self.clone();
        if let Some(name) = &patch.name {
            self.name.clone_from(name);
        }
        if let Some(scopes) = &patch.scopes {
            self.scopes.clone_from(scopes);
        }
        if let Some(metadata) = &patch.metadata {
            self.metadata.clone_from(metadata);
        }
        if let Some(rate_limit) = patch.rate_limit {
            self.rate_limit = rate_limit;
        }
        if let Some(expires_at) = patch.expires_at {
            self.expires_at = expires_at;
        }
        if let Some(allowed_ips) = &patch.allowed_ips {
            self.allowed_ips.clone_from(allowed_ips);
        }
        if let Some(quota) = patch.quota {
            let same_period =
                matches!((self.quota, quota), (Some(old), Some(new)) if old.period == new.period);
            self.quota = quota;
            if !same_period {
                self.quota_revision = self.quota_revision.wrapping_add(1);
            }
        }
        if patch.refill_quota && self.quota.is_some() {
            self.quota_revision = self.quota_revision.wrapping_add(1);
        }
        *self != before
    }
}

/// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a single address (read as /32 or /128), with
/// the host bits cleared; None if it is neither.
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .ok()
        .map(|net| net.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyFormat;

    fn record() -> KeyRecord {
        let format = KeyFormat::new("kg");
        let raw = format.generate().expect("rng");
        KeyRecord::for_key(&format, &raw, "alice", 0)
    }

    #[test]
    fn a_patch_sets_and_removes_fields_and_leaves_the_rest() {
        let mut key = record();
        key.expires_at = Some(100);
        let patch = KeyPatch {
            name: Some("renamed".into()),
            expires_at: Some(None),
            allowed_ips: Some(vec!["10.0.0.0/8".into()]),
            ..KeyPatch::default()
        };
        assert!(key.apply(&patch));
        assert_eq!(key.name, "renamed");
        assert_eq!(key.expires_at, None);
        assert_eq!(key.allowed_ips, ["10.0.0.0/8"]);
        assert!(!key.apply(&patch), "applying it again changes nothing");
        assert!(key.apply(&KeyPatch {
            allowed_ips: Some(Vec::new()),
            ..KeyPatch::default()
        }));
        assert!(key.allowed_ips.is_empty());
    }

    #[test]
    fn a_quota_of_the_same_period_keeps_its_count_and_a_refill_or_another_period_does_not() {
        use crate::keys::{Quota, QuotaPeriod};
        let quota = |requests, period| Quota { requests, period };
        let mut key = record();
        let set = |q| KeyPatch {
            quota: Some(q),
            ..KeyPatch::default()
        };
        assert!(key.apply(&set(Some(quota(10, QuotaPeriod::Day)))));
        assert_eq!(key.quota_revision, 1, "a first quota counts from zero");
        assert!(key.apply(&set(Some(quota(20, QuotaPeriod::Day)))));
        assert_eq!(key.quota_revision, 1, "a bigger quota keeps what was spent");
        assert!(key.apply(&set(Some(quota(20, QuotaPeriod::Month)))));
        assert_eq!(key.quota_revision, 2, "another period counts from zero");
        let refill = KeyPatch {
            refill_quota: true,
            ..KeyPatch::default()
        };
        assert!(key.apply(&refill));
        assert_eq!(key.quota_revision, 3);
        let mut without = record();
        assert!(!without.apply(&refill), "nothing to refill");
    }

    #[test]
    fn revoked_and_rotated_keys_are_not_patched() {
        let patch = KeyPatch {
            name: Some("x".into()),
            ..KeyPatch::default()
        };
        let mut revoked = record();
        revoked.revoke(5);
        assert!(!revoked.apply(&patch));
        assert_eq!(revoked.name, "default");
        let mut rotated = record();
        rotated.retire(5);
        assert!(!rotated.apply(&patch));
    }

    #[test]
    fn cidrs_and_addresses() {
        assert_eq!(
            parse_cidr("10.1.2.3/8").map(|n| n.to_string()).as_deref(),
            Some("10.0.0.0/8")
        );
        assert_eq!(
            parse_cidr("2001:db8::1").map(|n| n.to_string()).as_deref(),
            Some("2001:db8::1/128")
        );
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("example.com").is_none());
    }
}
