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
use tokio::sync::{OnceCell, Semaphore};

use super::cached_key::CachedKey;
use super::filter::KeyFilter;
use super::{KeyStore, StoreError};
use crate::keys::{KeyHash, QuotaUsage};

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
    /// Makes "the generation is unchanged, insert" one step as seen by an invalidation:
    /// fills take it shared, invalidations exclusively. Only misses and invalidations
    /// take it; a cache hit never does.
    fill_guard: RwLock<()>,
    in_flight: DashMap<KeyHash, InFlight>,
    /// Store reads of the request path at once; the rest wait up to `read_wait`.
    reads: Semaphore,
    read_wait: Duration,
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
            fill_guard: RwLock::new(()),
            in_flight: DashMap::new(),
            reads: Semaphore::new(settings.max_store_reads.max(1)),
            read_wait: settings.store_read_wait,
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
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use moka::notification::RemovalCause;

    use super::*;
    use crate::keys::{KeyFormat, KeyRecord};
    use crate::store::SledStore;
    use crate::store::gated::{Gate, GatedStore};

    fn settings(max_store_reads: usize, store_read_wait: Duration) -> CacheSettings {
        CacheSettings {
            capacity: 1000,
            ttl: Duration::from_secs(60),
            negative_capacity: 1000,
            negative_ttl: Duration::from_secs(60),
            max_store_reads,
            store_read_wait,
        }
    }

    /// A sled store holding one key, behind a gate that stops every read after reading.
    async fn gated_store(dir: &std::path::Path) -> (Arc<GatedStore>, Gate, KeyRecord, KeyHash) {
        let sled = SledStore::open(dir).expect("sled");
        let format = KeyFormat::new("kg");
        let raw = format.generate().expect("rng");
        let record = KeyRecord::for_key(&format, &raw, "alice", 0);
        sled.insert(&record).await.expect("insert");
        let (store, gate) = GatedStore::new(sled);
        (Arc::new(store), gate, record, KeyHash::of(raw.as_bytes()))
    }

    fn resolving(cache: &Arc<KeyCache>, hash: KeyHash) -> tokio::task::JoinHandle<Resolved> {
        let cache = Arc::clone(cache);
        tokio::spawn(async move { cache.resolve(&hash).await.expect("resolve") })
    }

    /// Issue 16, item 14, played step by step: a fill reads the live record, a revoke and
    /// its invalidation complete, then the fill goes on. The record must never enter the
    /// positive cache, not even for a moment: the old code inserted it and then took it out
    /// again (an explicit removal), and a request sent after the revoke's answer could be
    /// admitted in between.
    #[tokio::test]
    async fn a_fill_that_read_before_a_revoke_never_enters_the_cache() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, mut gate, record, hash) = gated_store(dir.path()).await;
        let mut cache = KeyCache::new(store.clone(), settings(4, Duration::from_secs(5)));
        let removed = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&removed);
        cache.positive = Cache::builder()
            .max_capacity(1000)
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Explicit {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            })
            .build();
        let cache = Arc::new(cache);

        let fill = resolving(&cache, hash);
        gate.parked().await;
        store.revoke(&record.id, 1).await.expect("revoke");
        cache.invalidate(&hash);
        store.release(1);
        fill.await.expect("fill");

        assert_eq!(
            removed.load(Ordering::SeqCst),
            0,
            "the record read before the revoke entered the positive cache"
        );
        assert!(cache.cached(&hash).is_none());
    }

    /// Concurrent misses of one hash share one store read.
    #[tokio::test]
    async fn concurrent_misses_of_one_hash_share_one_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, mut gate, _, hash) = gated_store(dir.path()).await;
        let cache = Arc::new(KeyCache::new(
            store.clone(),
            settings(4, Duration::from_secs(5)),
        ));
        let look_ups: Vec<_> = (0..8).map(|_| resolving(&cache, hash)).collect();
        gate.parked().await;
        // Each waiting look-up holds two handles on the shared read, the map one.
        let joined = || {
            cache
                .in_flight
                .get(&hash)
                .map_or(0, |entry| Arc::strong_count(&entry.fill))
        };
        while joined() < 1 + 2 * look_ups.len() {
            tokio::task::yield_now().await;
        }
        store.release(1);
        let mut sources = Vec::new();
        for look_up in look_ups {
            let resolved = look_up.await.expect("look-up");
            assert!(resolved.key.is_some());
            sources.push(resolved.source);
        }
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        let read = sources.iter().filter(|s| **s == LookupSource::Miss).count();
        let shared = sources
            .iter()
            .filter(|s| **s == LookupSource::SharedMiss)
            .count();
        assert_eq!((read, shared), (1, 7), "{sources:?}");
        assert!(cache.in_flight.is_empty());
    }

    /// A look-up that starts after an invalidation does not take the answer of a read that
    /// started before it: it reads again, and sees the revoke.
    #[tokio::test]
    async fn a_miss_after_an_invalidation_does_not_join_an_older_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, mut gate, record, hash) = gated_store(dir.path()).await;
        let cache = Arc::new(KeyCache::new(
            store.clone(),
            settings(4, Duration::from_secs(5)),
        ));
        let before = resolving(&cache, hash);
        gate.parked().await;
        store.revoke(&record.id, 1).await.expect("revoke");
        cache.invalidate(&hash);
        let after = resolving(&cache, hash);
        gate.parked().await;
        store.release(2);
        assert!(
            before.await.expect("look-up").key.is_some(),
            "read before the revoke"
        );
        let after = after.await.expect("look-up");
        assert!(
            after.key.is_none(),
            "a look-up after the revoke got the old record"
        );
        assert_eq!(after.source, LookupSource::Miss);
        assert!(cache.cached(&hash).is_none_or(|r| r.key.is_none()));
    }

    /// Past `max_store_reads`, a miss waits `store_read_wait` and is refused.
    #[tokio::test]
    async fn misses_beyond_the_read_bound_are_refused_after_the_wait() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, mut gate, _, hash) = gated_store(dir.path()).await;
        let wait = Duration::from_millis(50);
        let cache = Arc::new(KeyCache::new(store.clone(), settings(1, wait)));
        let holding = resolving(&cache, hash);
        gate.parked().await;
        let started = std::time::Instant::now();
        let refused = cache.resolve(&KeyHash::of(b"kg_other")).await;
        assert!(matches!(refused, Err(StoreError::Busy)));
        assert!(started.elapsed() >= wait);
        store.release(2);
        assert!(holding.await.expect("look-up").key.is_some());
        let later = cache
            .resolve(&KeyHash::of(b"kg_other"))
            .await
            .expect("read");
        assert_eq!(
            (later.key.is_none(), later.source),
            (true, LookupSource::Miss)
        );
    }

    /// Once the filter is built, unknown keys are answered without a store read, and a key
    /// created afterwards is found at once.
    #[tokio::test]
    async fn the_filter_keeps_unknown_keys_from_the_store_but_not_new_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, _gate, _, hash) = gated_store(dir.path()).await;
        let cache = Arc::new(KeyCache::new(
            store.clone(),
            settings(4, Duration::from_secs(5)),
        ));
        store.release(100);
        cache
            .filter()
            .rebuild(store.as_ref())
            .await
            .expect("filter");
        let reads = store.reads.load(Ordering::SeqCst);
        let mut filtered = 0;
        for i in 0..200u32 {
            let resolved = cache
                .resolve(&KeyHash::of(&i.to_be_bytes()))
                .await
                .expect("resolve");
            assert!(resolved.key.is_none());
            filtered += usize::from(resolved.source == LookupSource::Filtered);
        }
        assert!(
            filtered >= 190,
            "only {filtered} of 200 unknown keys filtered"
        );
        assert_eq!(store.reads.load(Ordering::SeqCst) - reads, 200 - filtered);
        assert!(cache.resolve(&hash).await.expect("resolve").key.is_some());

        let format = KeyFormat::new("kg");
        let raw = format.generate().expect("rng");
        store
            .insert(&KeyRecord::for_key(&format, &raw, "bob", 0))
            .await
            .expect("insert");
        let new = KeyHash::of(raw.as_bytes());
        cache.key_created(&new);
        assert!(cache.resolve(&new).await.expect("resolve").key.is_some());
    }

    /// A revoke races cache fills that read the record just before it: once `invalidate`
    /// has returned, no look-up may see the key again. (Filling first and checking for an
    /// invalidation after left a window in which a look-up could; that window is too
    /// short for this stress test to hit reliably, so it guards the rule, not the old bug.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn no_look_up_after_an_invalidation_sees_the_revoked_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn KeyStore> = Arc::new(SledStore::open(dir.path()).expect("sled"));
        let cache = Arc::new(KeyCache::new(
            Arc::clone(&store),
            settings(4, Duration::from_secs(5)),
        ));
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
