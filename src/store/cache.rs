//! The key cache the request path reads: a moka cache of hashes in front of the store, a
//! separate bounded negative cache for unknown hashes (so junk keys can neither reach the
//! store twice nor evict valid keys), a filter of stored hashes (so unknown keys rarely
//! reach it at all), and revocation that can never be undone by a concurrent cache fill.
//!
//! Store reads on a miss are bounded in number (a semaphore well below the PostgreSQL
//! pool, waited on for a short time, then 503) and concurrent misses of one hash share
//! one read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use moka::sync::Cache;
use parking_lot::RwLock;
use tokio::sync::{Notify, OnceCell, Semaphore};

use super::cached_key::CachedKey;
use super::filter::KeyFilter;
use super::{KeyStore, KeyWithUsage, StoreError};
use crate::keys::{KeyHash, QuotaUsage, Usage};

/// Where a resolution was answered from, for the cache metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupSource {
    Hit,
    NegativeHit,
    /// The filter of stored hashes ruled the key out: no store read.
    Filtered,
    /// Not cached: this look-up read the store.
    Miss,
    /// Not cached: another look-up of the same hash was reading it, and shared its answer.
    SharedMiss,
}

pub struct Resolved {
    pub key: Option<Arc<CachedKey>>,
    pub source: LookupSource,
}

/// A key a rotation made, with a quota, whose inherited spend may not be written yet.
fn awaits_inherited_quota(stored: &KeyWithUsage) -> bool {
    stored.record.rotated_from.is_some()
        && stored.record.quota.is_some()
        && stored.usage == Usage::default()
}

/// Reads of the warm set before a warm-up gives up on invalidations racing it.
const WARM_ATTEMPTS: usize = 3;

/// What a store read found, shared by every look-up that waited for it.
type Fill = Result<Option<Arc<CachedKey>>, StoreError>;

/// A store read in flight, joined by later misses of the same hash. `generation` is the
/// invalidation generation it started after: a look-up that began after a later
/// invalidation must not take its answer, which may predate that invalidation.
struct InFlight {
    generation: u64,
    fill: Arc<OnceCell<Fill>>,
}

pub struct KeyCache {
    store: Arc<dyn KeyStore>,
    positive: Cache<KeyHash, Arc<CachedKey>>,
    negative: Cache<KeyHash, ()>,
    filter: KeyFilter,
    /// Bumped by every invalidation. A fill whose store read raced with one is dropped, so
    /// a revoked key can never be re-inserted from a read that predates the revoke.
    generation: AtomicU64,
    /// Bumped by `invalidate` and `clear` only (not by creates): what a warm-up, whose
    /// records may have been read before one of them, must not have missed.
    invalidations: AtomicU64,
    /// Makes "the generation is unchanged, insert" one step as seen by an invalidation:
    /// fills take it shared, invalidations exclusively. Only misses and invalidations
    /// take it; a cache hit never does.
    fill_guard: RwLock<()>,
    in_flight: DashMap<KeyHash, InFlight>,
    /// Store reads of the request path at once; the rest wait up to `read_wait`.
    reads: Semaphore,
    read_wait: Duration,
    /// Set when the cache is cold: at start on sled, after each LISTEN on PostgreSQL (which
    /// clears the cache).
    warm_wanted: Notify,
}

pub struct CacheSettings {
    pub capacity: u64,
    pub ttl: Duration,
    pub negative_capacity: u64,
    pub negative_ttl: Duration,
    /// Concurrent store reads on cache misses.
    pub max_store_reads: usize,
    /// How long a miss waits for a read slot before it is answered `StoreError::Busy`.
    pub store_read_wait: Duration,
}

/// Ends a look-up's part in a shared read (also when the look-up is cancelled): the first
/// to leave removes the entry, so no answer outlives its read in the map.
struct LeaveRead<'a> {
    in_flight: &'a DashMap<KeyHash, InFlight>,
    hash: KeyHash,
    fill: Arc<OnceCell<Fill>>,
}

impl Drop for LeaveRead<'_> {
    fn drop(&mut self) {
        self.in_flight
            .remove_if(&self.hash, |_, entry| Arc::ptr_eq(&entry.fill, &self.fill));
    }
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
            filter: KeyFilter::default(),
            generation: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            fill_guard: RwLock::new(()),
            in_flight: DashMap::new(),
            reads: Semaphore::new(settings.max_store_reads.max(1)),
            read_wait: settings.store_read_wait,
            warm_wanted: Notify::new(),
        }
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The filter of stored hashes (not ready until its first build: see `KeyFilter`).
    pub fn filter(&self) -> &KeyFilter {
        &self.filter
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

    /// Cache first, then the filter; on a miss, one store read that fills the cache,
    /// shared with concurrent misses of the same hash.
    pub async fn resolve(&self, hash: &KeyHash) -> Result<Resolved, StoreError> {
        if let Some(resolved) = self.cached(hash) {
            return Ok(resolved);
        }
        if self.filter.rules_out(hash) {
            return Ok(Resolved {
                key: None,
                source: LookupSource::Filtered,
            });
        }
        let seen = self.generation.load(Ordering::SeqCst);
        let (generation, fill) = self.join_read(hash, seen);
        let _leave = LeaveRead {
            in_flight: &self.in_flight,
            hash: *hash,
            fill: Arc::clone(&fill),
        };
        let mut read_here = false;
        let key = fill
            .get_or_init(|| {
                read_here = true;
                self.read_and_fill(hash, generation)
            })
            .await
            .clone()?;
        Ok(Resolved {
            key,
            source: if read_here {
                LookupSource::Miss
            } else {
                LookupSource::SharedMiss
            },
        })
    }

    /// The read in flight for `hash` that started no earlier than generation `seen` (so
    /// after every invalidation this look-up must respect), or a new one.
    fn join_read(&self, hash: &KeyHash, seen: u64) -> (u64, Arc<OnceCell<Fill>>) {
        let fresh = || InFlight {
            generation: seen,
            fill: Arc::new(OnceCell::new()),
        };
        let entry = match self.in_flight.entry(*hash) {
            Entry::Occupied(entry) if entry.get().generation >= seen => entry.into_ref(),
            Entry::Occupied(mut entry) => {
                entry.insert(fresh());
                entry.into_ref()
            }
            Entry::Vacant(entry) => entry.insert(fresh()),
        };
        (entry.generation, Arc::clone(&entry.fill))
    }

    /// One bounded store read, and the cache fill from it unless an invalidation ran since
    /// `generation`.
    async fn read_and_fill(&self, hash: &KeyHash, generation: u64) -> Fill {
        let key = {
            let _slot = tokio::time::timeout(self.read_wait, self.reads.acquire())
                .await
                .map_err(|_| StoreError::Busy)?
                .map_err(|_| StoreError::Busy)?;
            match self.store.find_by_hash(hash).await? {
                Some(record) if !record.is_revoked() => {
                    let mut key = CachedKey::from_record(&record)?;
                    if record.quota.is_some() {
                        key.quota_seed = self.stored_quota_count(&record.id).await?;
                    }
                    Some(Arc::new(key))
                }
                _ => None,
            }
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
        Ok(key)
    }

    /// What a key's quota has spent as the store holds it (usage flushed so far). Only keys
    /// with a quota pay this second read, once per cache fill.
    async fn stored_quota_count(&self, id: &str) -> Result<QuotaUsage, StoreError> {
        Ok(self
            .store
            .get(id)
            .await?
            .map(|stored| stored.usage.quota)
            .unwrap_or_default())
    }

    /// Asks the warm-up (if `store.cache_warm_keys` runs one) to fill the cache again.
    pub fn request_warm(&self) {
        self.warm_wanted.notify_one();
    }

    /// Returns once a warm-up was asked for since the last return.
    pub async fn warm_requested(&self) {
        self.warm_wanted.notified().await;
    }

    /// Fills the cache from the store's `warm_set` (up to `limit` keys, most recently used
    /// first), so that a key's first use after a start is a hit rather than a store read on
    /// the request path. Returns how many keys it cached.
    ///
    /// The set is read before it is cached, so an invalidation may come in between: keys
    /// cached before it were removed by it if they had to be, and none is cached after it
    /// from the old read. The set is then read again, at most `WARM_ATTEMPTS` times in all.
    pub async fn warm(&self, now: i64, limit: usize) -> Result<usize, StoreError> {
        let mut cached = 0;
        for _ in 0..WARM_ATTEMPTS {
            let seen = self.invalidations.load(Ordering::SeqCst);
            let (out, chunks) = tokio::sync::mpsc::channel::<Vec<KeyWithUsage>>(2);
            let fill = async move {
                let mut chunks = chunks;
                let mut added = 0;
                while let Some(chunk) = chunks.recv().await {
                    match self.cache_warm_chunk(&chunk, seen) {
                        Some(n) => added += n,
                        // Dropping `chunks` ends the store's read.
                        None => return Err(added),
                    }
                    tokio::task::yield_now().await;
                }
                Ok(added)
            };
            let (read, filled) = tokio::join!(self.store.warm_set(now, limit, out), fill);
            read?;
            match filled {
                Ok(added) => return Ok(cached + added),
                Err(added) => cached += added,
            }
        }
        Ok(cached)
    }

    /// Caches one chunk of a warm set under one hold of the fill guard (an invalidation
    /// waits for a chunk at most); None, caching nothing, once an invalidation since `seen`
    /// has run.
    fn cache_warm_chunk(&self, chunk: &[KeyWithUsage], seen: u64) -> Option<usize> {
        // A record that cannot be cached is left for the request path, which reports it.
        // So is a rotated key with a quota and no usage yet: the quota it inherits is
        // written after its record (`Lifecycle::seed_quota`, before the key is handed out),
        // and caching it in between would start its quota from nothing.
        let entries: Vec<Arc<CachedKey>> = chunk
            .iter()
            .filter(|stored| !awaits_inherited_quota(stored))
            .filter_map(|stored| {
                let mut key = CachedKey::from_record(&stored.record).ok()?;
                key.quota_seed = stored.usage.quota;
                Some(Arc::new(key))
            })
            .collect();
        let _no_invalidation_meanwhile = self.fill_guard.read();
        if self.invalidations.load(Ordering::SeqCst) != seen {
            return None;
        }
        let mut cached = 0;
        for key in entries {
            if !self.positive.contains_key(&key.hash) {
                self.positive.insert(key.hash, key);
                cached += 1;
            }
        }
        Some(cached)
    }

    /// Makes every later look-up of `hash` miss the positive cache. Call after the change
    /// (revoke, expiry) is durable in the store.
    pub fn invalidate(&self, hash: &KeyHash) {
        let _no_fill_meanwhile = self.fill_guard.write();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.positive.invalidate(hash);
    }

    /// Drops every cached entry (e.g. when cross-instance invalidations may have been missed).
    pub fn clear(&self) {
        let _no_fill_meanwhile = self.fill_guard.write();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.positive.invalidate_all();
        self.negative.invalidate_all();
    }

    /// A key just stored (here or, on PostgreSQL, on another gateway): the filter learns
    /// it and any negative entry for its hash is forgotten. Call after the insert has
    /// committed and before the create is answered.
    pub fn key_created(&self, hash: &KeyHash) {
        self.filter.add(hash);
        // A fill that read "unknown" before the key was stored must not put that back.
        let _no_fill_meanwhile = self.fill_guard.write();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.negative.invalidate(hash);
    }
}

#[cfg(test)]
mod tests;
