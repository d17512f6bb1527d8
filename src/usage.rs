//! Usage accounting off the request path: admitted requests bump in-memory counters (one
//! DashMap shard lock, no store call, no await); a background flusher moves the pending
//! deltas to the store in one batch every `usage_flush_interval_ms`, and a final flush runs
//! after the server stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::keys::{QuotaUsage, Usage};
use crate::metrics::Metrics;
use crate::store::{KeyStore, StoreError};

#[derive(Default)]
struct Pending {
    count: AtomicU64,
    last_used: AtomicI64,
    /// Only a key with a quota takes this lock.
    quota: parking_lot::Mutex<QuotaUsage>,
}

impl Pending {
    fn add(&self, now: i64, quota_stamp: Option<i64>) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.last_used.fetch_max(now, Ordering::Relaxed);
        if let Some(stamp) = quota_stamp {
            self.quota.lock().merge(QuotaUsage { stamp, used: 1 });
        }
    }

    fn take(self) -> Usage {
        Usage {
            count: self.count.into_inner(),
            last_used: self.last_used.into_inner(),
            quota: self.quota.into_inner(),
        }
    }

    fn peek(&self) -> Usage {
        Usage {
            count: self.count.load(Ordering::Relaxed),
            last_used: self.last_used.load(Ordering::Relaxed),
            quota: *self.quota.lock(),
        }
    }
}

/// Per-key usage not yet written to the store. Holds only keys used since the last flush.
pub struct UsageRecorder {
    /// ULID as u128 -> (id string for the store, pending counts).
    pending: DashMap<u128, (Arc<str>, Pending)>,
    /// Deltas taken out for a flush that failed, merged per key (so an outage of any
    /// length holds one entry a key): kept until a flush succeeds.
    retry: parking_lot::Mutex<HashMap<String, Usage>>,
    flush_lock: tokio::sync::Mutex<()>,
}

impl Default for UsageRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageRecorder {
    pub fn new() -> Self {
        UsageRecorder {
            pending: DashMap::new(),
            retry: parking_lot::Mutex::new(HashMap::new()),
            flush_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Counts one admitted request, and one spent of the key's quota in the period
    /// `quota_stamp` names, if it has one. A key already counted since the last flush
    /// takes only the shard's read lock (`get`); only a key new since then takes the write
    /// lock and copies its id string (`entry`).
    pub fn record(&self, id_number: u128, id: &str, now: i64, quota_stamp: Option<i64>) {
        if let Some(entry) = self.pending.get(&id_number) {
            entry.1.add(now, quota_stamp);
            return;
        }
        self.pending
            .entry(id_number)
            .or_insert_with(|| (Arc::from(id), Pending::default()))
            .1
            .add(now, quota_stamp);
    }

    /// Usage recorded but not yet durable, for one key (merged into management reads).
    pub fn pending_for(&self, id: &str) -> Usage {
        let mut usage = Usage::default();
        if let Ok(ulid) = ulid::Ulid::from_string(id)
            && let Some(entry) = self.pending.get(&u128::from(ulid))
        {
            usage.merge(entry.1.peek());
        }
        if let Some(delta) = self.retry.lock().get(id) {
            usage.merge(*delta);
        }
        usage
    }

    /// Keys with counts waiting to be written (a key both pending and held for a retry
    /// counts twice; this is a gauge, not a bill).
    pub fn pending_keys(&self) -> usize {
        self.pending.len() + self.retry.lock().len()
    }

    /// Takes every pending delta out of the map. Removal holds the shard's write lock, so a
    /// concurrent `record` lands either in the removed entry or in a fresh one: never lost.
    fn drain(&self) -> Vec<(String, Usage)> {
        let ids: Vec<u128> = self.pending.iter().map(|e| *e.key()).collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((_, (name, pending))) = self.pending.remove(&id) {
                out.push((name.to_string(), pending.take()));
            }
        }
        out
    }

    /// Writes all pending deltas to the store. On failure they are kept for the next try,
    /// so a store outage delays counts but loses none. Counting is at least once: a write
    /// that the store applied but reported as failed (a timeout after PostgreSQL's commit)
    /// is written again by the retry. Losing a count is worse than counting one twice for
    /// usage that bills or alerts, and the window is one flush.
    pub async fn flush(&self, store: &dyn KeyStore) -> Result<usize, StoreError> {
        let _one_flush_at_a_time = self.flush_lock.lock().await;
        let mut merged = std::mem::take(&mut *self.retry.lock());
        for (id, delta) in self.drain() {
            merged.entry(id).or_default().merge(delta);
        }
        if merged.is_empty() {
            return Ok(0);
        }
        let batch: Vec<(String, Usage)> = merged.into_iter().collect();
        match store.add_usage(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                let mut retry = self.retry.lock();
                for (id, delta) in batch {
                    retry.entry(id).or_default().merge(delta);
                }
                Err(e)
            }
        }
    }

    /// The flusher loop: runs until `shutdown` fires; the final flush is the caller's.
    pub async fn run_flusher(
        self: Arc<Self>,
        store: Arc<dyn KeyStore>,
        metrics: Arc<Metrics>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.flush_once(store.as_ref(), &metrics).await;
        }
    }

    /// One flush with its metrics and logging.
    pub async fn flush_once(&self, store: &dyn KeyStore, metrics: &Metrics) {
        let started = Instant::now();
        match self.flush(store).await {
            Ok(_) => {
                metrics
                    .usage_flush_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                metrics.usage_flush_errors.inc();
                tracing::warn!(error = %e, "usage flush failed; counts kept for the next flush");
            }
        }
        metrics.usage_pending.set(self.pending_keys() as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use async_trait::async_trait;

    use super::*;
    use crate::keys::{KeyHash, KeyPatch, KeyRecord};
    use crate::store::{AuditEntry, KeyWithUsage, ListQuery, WarmSink};

    /// A store whose usage writes fail while `down` is set, and which records the batches
    /// it accepts. Nothing else of it is used.
    #[derive(Default)]
    struct FlakyUsageStore {
        down: AtomicBool,
        written: parking_lot::Mutex<Vec<Vec<(String, Usage)>>>,
    }

    fn unused<T>() -> Result<T, StoreError> {
        Err(StoreError::Io("not used by this test".into()))
    }

    #[async_trait]
    impl KeyStore for FlakyUsageStore {
        async fn insert(&self, _: &KeyRecord) -> Result<(), StoreError> {
            unused()
        }
        async fn get(&self, _: &str) -> Result<Option<KeyWithUsage>, StoreError> {
            unused()
        }
        async fn find_by_hash(&self, _: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
            unused()
        }
        async fn stored_hashes(&self) -> Result<Vec<KeyHash>, StoreError> {
            unused()
        }
        async fn warm_set(&self, _: i64, _: usize, _: WarmSink) -> Result<(), StoreError> {
            unused()
        }
        async fn list(&self, _: ListQuery<'_>) -> Result<Vec<KeyWithUsage>, StoreError> {
            unused()
        }
        async fn revoke(&self, _: &str, _: i64) -> Result<Option<KeyRecord>, StoreError> {
            unused()
        }
        async fn retire(&self, _: &str, _: i64) -> Result<Option<KeyRecord>, StoreError> {
            unused()
        }
        async fn update(&self, _: &str, _: &KeyPatch) -> Result<Option<KeyRecord>, StoreError> {
            unused()
        }
        async fn purge(&self, _: i64, _: usize) -> Result<Vec<KeyHash>, StoreError> {
            unused()
        }
        async fn add_usage(&self, deltas: &[(String, Usage)]) -> Result<(), StoreError> {
            if self.down.load(Ordering::Relaxed) {
                return Err(StoreError::Io("down".into()));
            }
            self.written.lock().push(deltas.to_vec());
            Ok(())
        }
        async fn count(&self) -> Result<u64, StoreError> {
            unused()
        }
        async fn append_audit(&self, _: &AuditEntry) -> Result<(), StoreError> {
            unused()
        }
        async fn list_audit(
            &self,
            _: Option<&str>,
            _: usize,
        ) -> Result<Vec<AuditEntry>, StoreError> {
            unused()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            unused()
        }
    }

    #[tokio::test]
    async fn an_outage_holds_one_merged_entry_a_key_and_loses_nothing() {
        let store = FlakyUsageStore::default();
        store.down.store(true, Ordering::Relaxed);
        let usage = UsageRecorder::new();
        let id = crate::keys::new_key_id();
        let number = u128::from(ulid::Ulid::from_string(&id).expect("ulid"));
        for second in 1..=100 {
            usage.record(number, &id, second, None);
            assert!(usage.flush(&store).await.is_err());
        }
        assert_eq!(usage.retry.lock().len(), 1);
        let expected = Usage {
            count: 100,
            last_used: 100,
            ..Default::default()
        };
        assert_eq!(usage.pending_for(&id), expected);
        store.down.store(false, Ordering::Relaxed);
        assert_eq!(usage.flush(&store).await.expect("flush"), 1);
        assert_eq!(*store.written.lock(), vec![vec![(id.clone(), expected)]]);
        assert_eq!(usage.pending_for(&id), Usage::default());
    }
}
