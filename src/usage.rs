//! Usage accounting off the request path: admitted requests bump in-memory counters (one
//! DashMap shard lock, no store call, no await); a background flusher moves the pending
//! deltas to the store in one batch every `usage_flush_interval_ms`, and a final flush runs
//! after the server stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::keys::Usage;
use crate::metrics::Metrics;
use crate::store::{KeyStore, StoreError};

#[derive(Default)]
struct Pending {
    count: AtomicU64,
    last_used: AtomicI64,
}

/// Per-key usage not yet written to the store. Holds only keys used since the last flush.
pub struct UsageRecorder {
    /// ULID as u128 -> (id string for the store, pending counts).
    pending: DashMap<u128, (Arc<str>, Pending)>,
    /// Deltas taken out for a flush that failed: kept until a flush succeeds.
    retry: parking_lot::Mutex<Vec<(String, Usage)>>,
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
            retry: parking_lot::Mutex::new(Vec::new()),
            flush_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Counts one admitted request. A key already counted since the last flush takes only
    /// the shard's read lock (`get`); only a key new since then takes the write lock and
    /// copies its id string (`entry`).
    pub fn record(&self, id_number: u128, id: &str, now: i64) {
        if let Some(entry) = self.pending.get(&id_number) {
            entry.1.count.fetch_add(1, Ordering::Relaxed);
            entry.1.last_used.fetch_max(now, Ordering::Relaxed);
            return;
        }
        let entry = self
            .pending
            .entry(id_number)
            .or_insert_with(|| (Arc::from(id), Pending::default()));
        entry.1.count.fetch_add(1, Ordering::Relaxed);
        entry.1.last_used.fetch_max(now, Ordering::Relaxed);
    }

    /// Usage recorded but not yet durable, for one key (merged into management reads).
    pub fn pending_for(&self, id: &str) -> Usage {
        let mut usage = Usage::default();
        if let Ok(ulid) = ulid::Ulid::from_string(id)
            && let Some(entry) = self.pending.get(&u128::from(ulid))
        {
            usage.merge(Usage {
                count: entry.1.count.load(Ordering::Relaxed),
                last_used: entry.1.last_used.load(Ordering::Relaxed),
            });
        }
        for (retry_id, delta) in self.retry.lock().iter() {
            if retry_id == id {
                usage.merge(*delta);
            }
        }
        usage
    }

    /// Keys with counts waiting to be written.
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
                out.push((
                    name.to_string(),
                    Usage {
                        count: pending.count.into_inner(),
                        last_used: pending.last_used.into_inner(),
                    },
                ));
            }
        }
        out
    }

    /// Writes all pending deltas to the store. On failure they are kept for the next try,
    /// so a store outage delays counts but loses or doubles none.
    pub async fn flush(&self, store: &dyn KeyStore) -> Result<usize, StoreError> {
        let _one_flush_at_a_time = self.flush_lock.lock().await;
        let mut batch = std::mem::take(&mut *self.retry.lock());
        batch.extend(self.drain());
        if batch.is_empty() {
            return Ok(0);
        }
        match store.add_usage(&batch).await {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                self.retry.lock().extend(batch);
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
