//! A Bloom filter of every stored key hash, in front of the store. The key checksum is
//! public, so anyone can mint well-formed unknown keys without end; each would otherwise
//! cost a store read. The filter answers almost all of them from memory.
//!
//! A "no" is only trusted while the filter holds every stored hash. So it is "not ready"
//! (every miss goes to the store) until its first build, and again whenever additions may
//! have been missed (PostgreSQL's listener lost its connection), until a rebuild that
//! started after that point is swapped in.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use fastbloom::AtomicBloomFilter;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use super::{KeyStore, StoreError};
use crate::keys::KeyHash;

/// About one unknown key in a hundred passes the filter (and then the negative cache).
const FALSE_POSITIVE_RATE: f64 = 0.01;
/// The smallest filter: about 80 KiB, so small stores never rebuild for growth.
const MIN_CAPACITY: usize = 65_536;
/// Room to grow before a rebuild: twice the keys stored when it was built.
const HEADROOM: usize = 2;
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

struct Bloom {
    bits: AtomicBloomFilter,
    capacity: usize,
    items: AtomicUsize,
}

impl Bloom {
    fn with_capacity(capacity: usize) -> Self {
        Bloom {
            bits: AtomicBloomFilter::with_false_pos(FALSE_POSITIVE_RATE).expected_items(capacity),
            capacity,
            items: AtomicUsize::new(0),
        }
    }

    /// Adds `hash`; true when the filter now holds more than it was sized for.
    fn add(&self, hash: &KeyHash) -> bool {
        self.bits.insert_hash(source_hash(hash));
        self.items.fetch_add(1, Ordering::Relaxed) + 1 > self.capacity
    }
}

/// A SHA-256 is already uniform: its first 8 bytes serve as the filter's hash, saving a
/// second hashing of every key. (Nobody can aim those bits without a preimage.)
fn source_hash(hash: &KeyHash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.0[..8]);
    u64::from_le_bytes(first)
}

#[derive(Default)]
pub struct KeyFilter {
    /// None while not ready.
    current: ArcSwapOption<Bloom>,
    /// The filter a rebuild is filling. Additions go here too, so that a key stored while
    /// the rebuild reads the store is in it whether the read saw the key or not.
    building: ArcSwapOption<Bloom>,
    /// Counts the moments additions may have been missed; a rebuild that started before
    /// the latest one is not swapped in. Held (briefly) by additions and by the start and
    /// end of a rebuild, never by a look-up.
    missed: Mutex<u64>,
    rebuild_wanted: Notify,
}

impl KeyFilter {
    /// True when `hash` is certainly not stored. Lock-free; false while not ready.
    pub fn rules_out(&self, hash: &KeyHash) -> bool {
        match &*self.current.load() {
            Some(bloom) => !bloom.bits.contains_hash(source_hash(hash)),
            None => false,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }

    /// A key just stored (here, or on another gateway): call once its insert has
    /// committed, before the create is answered.
    pub fn add(&self, hash: &KeyHash) {
        // Under the lock, a rebuild either has not published `building` yet (then its read
        // of the store starts after our insert committed, and sees it) or has (then we add
        // to it): either way the key is in the next filter.
        let outgrown = {
            let _rebuild_start_or_end = self.missed.lock();
            let mut outgrown = false;
            if let Some(bloom) = &*self.current.load() {
                outgrown = bloom.add(hash);
            }
            if let Some(bloom) = &*self.building.load() {
                bloom.add(hash);
            }
            outgrown
        };
        if outgrown {
            // The old filter stays in use (more false positives, never a wrong "no").
            self.rebuild_wanted.notify_one();
        }
    }

    /// Additions may have been missed from now on: stop trusting the filter.
    pub fn mark_stale(&self) {
        let mut missed = self.missed.lock();
        *missed += 1;
        self.current.store(None);
    }

    /// Asks the rebuild task for a fresh filter (read from the store after this call).
    pub fn request_rebuild(&self) {
        self.rebuild_wanted.notify_one();
    }

    /// Builds a filter from the store each time one is requested, until `shutdown`.
    pub async fn run_rebuilds(&self, store: &dyn KeyStore, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.rebuild_wanted.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            if let Err(e) = self.rebuild(store).await {
                tracing::warn!(error = %e, "key filter rebuild failed; every cache miss reads the store until it succeeds");
                self.rebuild_wanted.notify_one();
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER_FAILURE) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        }
    }

    /// Reads every stored hash into a new filter and swaps it in, unless additions may
    /// have been missed meanwhile (then the next requested rebuild will do it).
    pub async fn rebuild(&self, store: &dyn KeyStore) -> Result<(), StoreError> {
        let stored = usize::try_from(store.count().await?).unwrap_or(usize::MAX);
        let bloom = Arc::new(Bloom::with_capacity(
            stored.saturating_mul(HEADROOM).max(MIN_CAPACITY),
        ));
        let started = {
            let missed = self.missed.lock();
            self.building.store(Some(Arc::clone(&bloom)));
            *missed
        };
        let hashes = store.stored_hashes().await;
        let hashes = match hashes {
            Ok(hashes) => hashes,
            Err(e) => {
                self.building.store(None);
                return Err(e);
            }
        };
        let mut outgrown = false;
        for hash in &hashes {
            outgrown |= bloom.add(hash);
        }
        let missed = self.missed.lock();
        self.building.store(None);
        if *missed == started {
            self.current.store(Some(bloom));
            tracing::info!(keys = hashes.len(), "key filter ready");
        }
        drop(missed);
        if outgrown {
            self.rebuild_wanted.notify_one();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyFormat, KeyRecord};
    use crate::store::SledStore;
    use crate::store::gated::GatedStore;

    async fn store_with_key(dir: &std::path::Path) -> (SledStore, KeyHash) {
        let store = SledStore::open(dir).expect("sled");
        let format = KeyFormat::new("kg");
        let raw = format.generate().expect("rng");
        store
            .insert(&KeyRecord::for_key(&format, &raw, "alice", 0))
            .await
            .expect("insert");
        (store, KeyHash::of(raw.as_bytes()))
    }

    #[tokio::test]
    async fn rules_out_only_when_ready_and_never_a_stored_or_added_hash() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, stored) = store_with_key(dir.path()).await;
        let filter = KeyFilter::default();
        let unknown = KeyHash::of(b"kg_unknown");
        assert!(
            !filter.rules_out(&unknown),
            "not ready: nothing is ruled out"
        );
        filter.rebuild(&store).await.expect("rebuild");
        assert!(filter.is_ready());
        assert!(!filter.rules_out(&stored));
        let ruled_out = (0..1000u32)
            .filter(|i| filter.rules_out(&KeyHash::of(&i.to_be_bytes())))
            .count();
        assert!(
            ruled_out >= 950,
            "only {ruled_out} of 1000 unknown hashes ruled out"
        );
        let added = KeyHash::of(b"kg_added");
        filter.add(&added);
        assert!(!filter.rules_out(&added));
        filter.mark_stale();
        assert!(!filter.is_ready() && !filter.rules_out(&unknown));
    }

    /// A rebuild that was running when additions may have been missed is not swapped in;
    /// a key added while it reads the store is in the filter it swaps in.
    #[tokio::test]
    async fn rebuilds_keep_additions_and_are_dropped_when_overtaken() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, _) = store_with_key(dir.path()).await;
        let (store, mut gate) = GatedStore::new(store);
        let (store, filter) = (Arc::new(store), Arc::new(KeyFilter::default()));
        let rebuild = |store: &Arc<GatedStore>, filter: &Arc<KeyFilter>| {
            let (store, filter) = (Arc::clone(store), Arc::clone(filter));
            tokio::spawn(async move { filter.rebuild(store.as_ref()).await })
        };

        let first = rebuild(&store, &filter);
        gate.parked().await;
        filter.mark_stale();
        store.release(1);
        first.await.expect("task").expect("rebuild");
        assert!(
            !filter.is_ready(),
            "a rebuild older than the staleness was trusted"
        );

        let second = rebuild(&store, &filter);
        gate.parked().await;
        let added_meanwhile = KeyHash::of(b"kg_added_while_reading");
        filter.add(&added_meanwhile);
        store.release(1);
        second.await.expect("task").expect("rebuild");
        assert!(filter.is_ready());
        assert!(!filter.rules_out(&added_meanwhile));
    }
}
