//! What the request path keeps of a key in the cache: everything it reads while admitting
//! a request, prepared once per cache fill (header values, the parsed allowlist, the
//! metadata as a header) so that admitting a request allocates and serialises nothing.

use std::net::IpAddr;

use http::HeaderValue;
use ipnet::IpNet;

use super::StoreError;
use crate::keys::{KeyHash, KeyRecord, Quota, QuotaUsage, RateLimit, parse_cidr, quota_stamp};

#[derive(Debug)]
pub struct CachedKey {
    pub id: String,
    /// The ULID of `id` as a number: the usage counters' map key.
    pub id_number: u128,
    /// What the key is cached under: WebSocket tunnels look their key up again by it.
    pub hash: KeyHash,
    pub owner: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<i64>,
    pub rate_limit: Option<RateLimit>,
    pub quota: Option<Quota>,
    pub quota_revision: u32,
    /// The quota's count as the store had it when the key was cached: where a gateway
    /// that has not counted this key itself starts from.
    pub quota_seed: QuotaUsage,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Where the key is admitted from; empty: anywhere.
    pub allowed_ips: Vec<IpNet>,
    pub id_header: HeaderValue,
    pub owner_header: HeaderValue,
    pub scopes_header: HeaderValue,
    /// `x-keygate-metadata` for routes with `forward_metadata`; None without metadata.
    pub metadata_header: Option<HeaderValue>,
}

impl CachedKey {
    pub fn from_record(record: &KeyRecord) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("key {} has {what}", record.id));
        let header = |text: &str| {
            HeaderValue::from_str(text).map_err(|_| corrupt("a field unfit for a header"))
        };
        let allowed_ips = record
            .allowed_ips
            .iter()
            .map(|text| parse_cidr(text).ok_or_else(|| corrupt("a malformed allowed_ips entry")))
            .collect::<Result<Vec<_>, _>>()?;
        let metadata_header = match &record.metadata {
            Some(meta) if !meta.is_empty() => Some(header(&ascii_json(meta))?),
            _ => None,
        };
        Ok(CachedKey {
            id_number: ulid::Ulid::from_string(&record.id)
                .map(u128::from)
                .map_err(|_| StoreError::Corrupt(format!("key id {} is not a ULID", record.id)))?,
            hash: KeyHash::from_hex(&record.hash).ok_or_else(|| corrupt("a malformed hash"))?,
            id_header: header(&record.id)?,
            owner_header: header(&record.owner)?,
            scopes_header: header(&record.scopes.join(" "))?,
            metadata_header,
            allowed_ips,
            id: record.id.clone(),
            owner: record.owner.clone(),
            scopes: record.scopes.clone(),
            expires_at: record.expires_at,
            rate_limit: record.rate_limit,
            quota: record.quota,
            quota_revision: record.quota_revision,
            quota_seed: QuotaUsage::default(),
            metadata: record.metadata.clone(),
        })
    }

    /// The stamp of the quota count that a request at `now` spends; None without a quota.
    pub fn quota_stamp(&self, now: i64) -> Option<i64> {
        self.quota
            .map(|quota| quota_stamp(self.quota_revision, quota.period, now))
    }

    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether a request from `client` may use the key: always without an allowlist; with
    /// one, only from an address inside it (an unknown address is not inside).
    pub fn admits_from(&self, client: Option<IpAddr>) -> bool {
        if self.allowed_ips.is_empty() {
            return true;
        }
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let client = client.map(|ip| ip.to_canonical());
        client.is_some_and(|ip| self.allowed_ips.iter().any(|net| net.contains(&ip)))
    }
}

/// Compact JSON with every character outside printable ASCII written as a `\u` escape:
/// still the same JSON value, and always a valid header value (raw UTF-8 is not, to many
/// HTTP stacks).
fn ascii_json(meta: &serde_json::Map<String, serde_json::Value>) -> String {
    let text = serde_json::to_string(meta).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut units = [0u16; 2];
    for ch in text.chars() {
        if ch.is_ascii() && !ch.is_ascii_control() {
            out.push(ch);
        } else {
            // Outside strings JSON has only ASCII, and serde_json escapes control
            // characters itself, so every character here is inside a string.
            for unit in ch.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
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
    fn metadata_becomes_ascii_json_of_the_same_value() {
        let meta = serde_json::json!({"team": "Zürich ✓", "emoji": "🚀", "del": "\u{7f}", "n": 3});
        let mut key = record();
        key.metadata = meta.as_object().cloned();
        let cached = CachedKey::from_record(&key).expect("cached");
        let header = cached.metadata_header.expect("a header");
        let text = header.to_str().expect("visible ASCII");
        assert!(
            !text.contains("\": ") && !text.contains(", \""),
            "compact: {text}"
        );
        let back: serde_json::Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(back, meta);
        let mut empty = record();
        empty.metadata = Some(serde_json::Map::new());
        assert!(
            CachedKey::from_record(&empty)
                .expect("cached")
                .metadata_header
                .is_none()
        );
    }

    #[test]
    fn the_allowlist_admits_only_addresses_inside_it() {
        let mut key = record();
        let anywhere = CachedKey::from_record(&key).expect("cached");
        assert!(anywhere.admits_from(None));
        key.allowed_ips = vec!["10.0.0.0/8".into(), "2001:db8::/32".into()];
        let cached = CachedKey::from_record(&key).expect("cached");
        let ip = |text: &str| Some(text.parse::<IpAddr>().expect("ip"));
        assert!(cached.admits_from(ip("10.9.8.7")));
        assert!(cached.admits_from(ip("::ffff:10.9.8.7")));
        assert!(cached.admits_from(ip("2001:db8::5")));
        assert!(!cached.admits_from(ip("11.0.0.1")));
        assert!(!cached.admits_from(ip("2001:db9::1")));
        assert!(!cached.admits_from(None));
    }
}
