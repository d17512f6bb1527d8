//! Test support: a real `SledStore` whose hash and warm-set reads stop after reading, until
//! the test lets them go, so that races with a read in flight can be played step by step.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc};

use super::{AuditEntry, KeyStore, KeyWithUsage, ListQuery, SledStore, StoreError, WarmSink};
use crate::keys::{KeyHash, KeyPatch, KeyRecord, Usage};

pub(crate) struct GatedStore {
    pub(crate) inner: SledStore,
    /// `find_by_hash`, `stored_hashes` and `warm_set` calls that read the store.
    pub(crate) reads: AtomicUsize,
    /// One message per read that has read and now waits.
    parked: mpsc::UnboundedSender<()>,
    release: Semaphore,
}

pub(crate) struct Gate {
    parked: mpsc::UnboundedReceiver<()>,
}

impl Gate {
    /// Waits until one more read has read the store and stopped.
    pub(crate) async fn parked(&mut self) {
        self.parked.recv().await.expect("the store is alive");
    }
}

impl GatedStore {
    pub(crate) fn new(inner: SledStore) -> (Self, Gate) {
        let (parked, receiver) = mpsc::unbounded_channel();
        let store = GatedStore {
            inner,
            reads: AtomicUsize::new(0),
            parked,
            release: Semaphore::new(0),
        };
        (store, Gate { parked: receiver })
    }

    /// Lets `n` stopped (or future) reads finish.
    pub(crate) fn release(&self, n: usize) {
        self.release.add_permits(n);
    }

    async fn stop_here(&self) {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let _ = self.parked.send(());
        if let Ok(permit) = self.release.acquire().await {
            permit.forget();
        }
    }
}

#[async_trait]
impl KeyStore for GatedStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await
    }
    async fn get(&self, id: &str) -> Result<Option<KeyWithUsage>, StoreError> {
        self.inner.get(id).await
    }
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let record = self.inner.find_by_hash(hash).await;
        self.stop_here().await;
        record
    }
    async fn stored_hashes(&self) -> Result<Vec<KeyHash>, StoreError> {
        let hashes = self.inner.stored_hashes().await;
        self.stop_here().await;
        hashes
    }
    /// Reads the whole set, stops, then delivers it: a read that an invalidation overtakes.
    async fn warm_set(&self, now: i64, limit: usize, out: WarmSink) -> Result<(), StoreError> {
        let keys = super::warm_set_list(&self.inner, now, limit).await;
        self.stop_here().await;
        for chunk in keys?.chunks(super::WARM_CHUNK) {
            if out.send(chunk.to_vec()).await.is_err() {
                break;
            }
        }
        Ok(())
    }
    async fn list(&self, query: ListQuery<'_>) -> Result<Vec<KeyWithUsage>, StoreError> {
        self.inner.list(query).await
    }
    async fn revoke(&self, id: &str, at: i64) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.revoke(id, at).await
    }
    async fn retire(&self, id: &str, expires_at: i64) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.retire(id, expires_at).await
    }
    async fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.update(id, patch).await
    }
    async fn purge(&self, before: i64, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        self.inner.purge(before, limit).await
    }
    async fn add_usage(&self, deltas: &[(String, Usage)]) -> Result<(), StoreError> {
        self.inner.add_usage(deltas).await
    }
    async fn count(&self) -> Result<u64, StoreError> {
        self.inner.count().await
    }
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.inner.append_audit(entry).await
    }
    async fn list_audit(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.list_audit(before, limit).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
