//! The key cache the request path reads: a moka cache of hashes in front of the store, a
//! separate bounded negative cache for unknown hashes (so a flood of junk keys can neither
//! reach the store twice nor evict valid keys), and revocation that can never be undone by
//! a concurrent cache fill.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderValue;
use moka::sync::Cache;
use parking_lot::RwLock;

use super::{KeyStore, StoreError};
use crate::keys::{KeyHash, KeyRecord, RateLimit};

/// What the request path needs of a key, prepared once per cache fill so that admitting a
/// request allocates nothing for it.
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
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub id_header: HeaderValue,
    pub owner_header: HeaderValue,
    pub scopes_header: HeaderValue,
}

impl CachedKey {
    pub fn from_record(record: &KeyRecord) -> Result<Self, StoreError> {
        let header = |text: &str| {
            HeaderValue::from_str(text).map_err(|_| {
                StoreError::Corrupt(format!("key {} has a field unfit for a header", record.id))
            })
        };
        Ok(CachedKey {
            id_number: ulid::Ulid::from_string(&record.id)
                .map(u128::from)
                .map_err(|_| StoreError::Corrupt(format!("key id {} is not a ULID", record.id)))?,
            hash: KeyHash::from_hex(&record.hash).ok_or_else(|| {
                StoreError::Corrupt(format!("key {} has a malformed hash", record.id))
            })?,
            id_header: header(&record.id)?,
            owner_header: header(&record.owner)?,
            scopes_header: header(&record.scopes.join(" "))?,
            id: record.id.clone(),
            owner: record.owner.clone(),
            scopes: record.scopes.clone(),
            expires_at: record.expires_at,
            rate_limit: record.rate_limit,
            metadata: record.metadata.clone(),
        })
    }

    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Where a resolution was answered from, for the cache metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupSource {
    Hit,
    NegativeHit,
    /// Not cached: the store was read.
    Miss,
}

pub struct Resolved {
    pub key: Option<Arc<CachedKey>>,
    pub source: LookupSource,
}

pub struct KeyCache {
    store: Arc<dyn KeyStore>,
    positive: Cache<KeyHash, Arc<CachedKey>>,
    negative: Cache<KeyHash, ()>,
    /// Bumped by every invalidation. A fill whose store read raced with one is dropped, so
    /// a revoked key can never be re-inserted from a read that predates the revoke.
    generation: AtomicU64,
    /// Makes "the generation is unchanged, insert" one step as seen by an invalidation:
    /// fills take it shared, invalidations exclusively. Only misses and invalidations
    /// take it; a cache hit never does.
    fill_guard: RwLock<()>,
}

pub struct CacheSettings {
    pub capacity: u64,
    pub ttl: Duration,
    pub negative_capacity: u64,
    pub negative_ttl: Duration,
}

impl KeyCache {
    pub fn new(store: Arc<dyn KeyStore>, settings: CacheSettings) -> Self {
        KeyCache {
            store,
            positive: Cache::builder()
                .max_capacity(settings.capacity)
                .time_to_live(settings.ttl)
                .build(),
            negative: Cache::builder()
                .max_capacity(settings.negative_capacity)
                .time_to_live(settings.negative_ttl)
                .build(),
            generation: AtomicU64::new(0),
            fill_guard: RwLock::new(()),
        }
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The cache alone: no store access, no await.
    pub fn cached(&self, hash: &KeyHash) -> Option<Resolved> {
        if let Some(key) = self.positive.get(hash) {
            return Some(Resolved {
                key: Some(key),
                source: LookupSource::Hit,
            });
        }
        if self.negative.contains_key(hash) {
            return Some(Resolved {
                key: None,
                source: LookupSource::NegativeHit,
            });
        }
        None
    }

    /// Cache first; on a miss, one store read that fills the cache.
    pub async fn resolve(&self, hash: &KeyHash) -> Result<Resolved, StoreError> {
        if let Some(resolved) = self.cached(hash) {
            return Ok(resolved);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let record = self.store.find_by_hash(hash).await?;
        let key = match record {
            Some(record) if !record.is_revoked() => {
                Some(Arc::new(CachedKey::from_record(&record)?))
            }
            _ => None,
        };
        {
            let _no_invalidation_meanwhile = self.fill_guard.read();
            // An invalidation that ran while we read may postdate our record: keep it out.
            if self.generation.load(Ordering::SeqCst) == generation {
                match &key {
                    Some(key) => self.positive.insert(*hash, Arc::clone(key)),
                    None => self.negative.insert(*hash, ()),
                }
            }
        }
        Ok(Resolved {
            key,
            source: LookupSource::Miss,
        })
    }

    /// Makes every later look-up of `hash` miss the positive cache. Call after the change
    /// (revoke, expiry) is durable in the store.
    pub fn invalidate(&self, hash: &KeyHash) {
        let _no_fill_meanwhile = self.fill_guard.write();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.positive.invalidate(hash);
    }

    /// Drops every cached entry (e.g. when cross-instance invalidations may have been missed).
    pub fn clear(&self) {
        let _no_fill_meanwhile = self.fill_guard.write();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.positive.invalidate_all();
        self.negative.invalidate_all();
    }

    /// A key just created: forget any negative entry for its hash.
    pub fn forget_negative(&self, hash: &KeyHash) {
        // A fill that read "unknown" before the key was stored must not put that back.
        let _no_fill_meanwhile = self.fill_guard.write();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.negative.invalidate(hash);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::keys::{KeyFormat, KeyRecord};
    use crate::store::SledStore;

    /// A revoke races cache fills that read the record just before it: once `invalidate`
    /// has returned, no look-up may see the key again. (Filling first and checking for an
    /// invalidation after left a window in which a look-up could; that window is too
    /// short for this stress test to hit reliably, so it guards the rule, not the old bug.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn no_look_up_after_an_invalidation_sees_the_revoked_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn KeyStore> = Arc::new(SledStore::open(dir.path()).expect("sled"));
        let settings = CacheSettings {
            capacity: 1000,
            ttl: Duration::from_secs(60),
            negative_capacity: 1000,
            negative_ttl: Duration::from_secs(60),
        };
        let cache = Arc::new(KeyCache::new(Arc::clone(&store), settings));
        let format = KeyFormat::new("kg");
        for round in 0..40 {
            let raw = format.generate().expect("rng");
            let record = KeyRecord::for_key(&format, &raw, "alice", 0);
            store.insert(&record).await.expect("insert");
            let hash = KeyHash::of(raw.as_bytes());
            let stop = Arc::new(AtomicBool::new(false));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let (cache, stop) = (Arc::clone(&cache), Arc::clone(&stop));
                    tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let _ = cache.resolve(&hash).await;
                            // A cache hit never awaits: let the revoking task run too.
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_micros(300)).await;
            store.revoke(&record.id, 1).await.expect("revoke");
            cache.invalidate(&hash);
            for _ in 0..20_000 {
                let seen = cache.cached(&hash).and_then(|r| r.key);
                assert!(seen.is_none(), "round {round}: the revoked key was served");
            }
            stop.store(true, Ordering::Relaxed);
            for reader in readers {
                reader.await.expect("reader");
            }
        }
    }
}
