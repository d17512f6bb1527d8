//! The embedded store: sled, one directory, one process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::point_reads::{PointReads, ThreadCounts};
use super::{AuditEntry, KeyStore, KeyWithUsage, ListQuery, StoreError, WarmSink};
use crate::keys::{KeyHash, KeyPatch, KeyRecord, QuotaUsage, Usage};

#[cfg(test)]
mod tests;
mod warm;

const KEY_COUNT: &[u8] = b"key_count";
/// sled's own page cache (its default is 1 GiB). The request path reads through moka; sled
/// serves its misses, the warm-up and the management API, and a scan such as the warm-up's
/// would otherwise leave every page it read in memory.
const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// The embedded store. A point read (by hash or id) runs on the calling worker while the
/// store is not writing and such reads do not block, and on tokio's blocking pool otherwise
/// (see `PointReads`): a memory-fast read costs less than handing it to another thread,
/// but a read that waits on the disk, or on sled's global lock behind a transaction, must
/// not stall every request on a proxy worker. Scans (listings, the filter's rebuild) always
/// run on the pool. Writes run one at a time on one writer thread: sled 0.34 can deadlock
/// when transactions run concurrently with flushes (sled issues #1308, #1241), and a stuck
/// sled write must never occupy a proxy worker thread. A write is acknowledged only after a
/// flush that covers it; writes that queue up while one is running share the next flush
/// (group commit), so concurrent creates do not each pay a whole flush.
pub struct SledStore {
    path: PathBuf,
    trees: Arc<Trees>,
    point_reads: PointReads,
    jobs: Option<std::sync::mpsc::Sender<WriteJob>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SledStore {
    /// Lets the writer finish what is queued and release the database, so that the
    /// directory can be opened again as soon as the store is gone.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Told whether the flush covering its write succeeded; sends the caller its answer.
type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A write: runs against the trees, then waits for the flush.
type WriteJob = Box<dyn FnOnce(&Trees) -> Completion + Send>;

/// How long `reopen` waits for sled to release a database this process has just closed.
const REOPEN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes applied before one flush, at most.
const MAX_GROUP: usize = 256;

/// The writer thread: takes a write, then every write already queued behind it (up to
/// `MAX_GROUP`), applies them in order, flushes once and answers them all.
fn run_writer(trees: Arc<Trees>, jobs: std::sync::mpsc::Receiver<WriteJob>) {
    let apply = |job: WriteJob| {
        // A panicking write drops its completion: that caller gets an error, others go on.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&trees))).ok()
    };
    while let Ok(first) = jobs.recv() {
        // Point reads keep off the workers meanwhile: a transaction holds sled's global lock.
        trees.writing.store(true, Ordering::SeqCst);
        let mut completions: Vec<Completion> = apply(first).into_iter().collect();
        for _ in 1..MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => completions.extend(apply(job)),
                Err(_) => break,
            }
        }
        let flushed =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| trees.db.flush())) {
                Ok(flushed) => flushed.map(drop).map_err(StoreError::from),
                Err(_) => Err(StoreError::Io("the store flush failed unexpectedly".into())),
            };
        trees.writing.store(false, Ordering::SeqCst);
        for complete in completions {
            complete(flushed.clone());
        }
    }
}

struct Trees {
    /// Set while the writer applies and flushes a group of writes.
    writing: AtomicBool,
    db: sled::Db,
    /// id -> JSON `KeyRecord`
    keys: sled::Tree,
    /// SHA-256 (32 bytes) -> id
    hashes: sled::Tree,
    /// owner 0x00 id -> (), for per-owner listings in id order
    owners: sled::Tree,
    /// id -> count (u64 BE) ++ last_used (i64 BE), written only by merges
    usage: sled::Tree,
    /// ULID -> JSON `AuditEntry`
    audit: sled::Tree,
    /// counters kept in step with the trees they count, inside the same transactions
    meta: sled::Tree,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
            other => StoreError::Io(other.to_string()),
        }
    }
}

/// count, last_used, quota stamp, quota used: big-endian, 8 bytes each. Values written
/// before quotas existed hold only the first two.
fn encode_usage(usage: Usage) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&usage.count.to_be_bytes());
    out[8..16].copy_from_slice(&usage.last_used.to_be_bytes());
    out[16..24].copy_from_slice(&usage.quota.stamp.to_be_bytes());
    out[24..].copy_from_slice(&usage.quota.used.to_be_bytes());
    out
}

fn decode_usage(bytes: &[u8]) -> Usage {
    let word = |at: usize| -> [u8; 8] {
        bytes
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .unwrap_or_default()
    };
    Usage {
        count: u64::from_be_bytes(word(0)),
        last_used: i64::from_be_bytes(word(8)),
        quota: QuotaUsage {
            stamp: i64::from_be_bytes(word(16)),
            used: u64::from_be_bytes(word(24)),
        },
    }
}

fn merge_usage(_key: &[u8], old: Option<&[u8]>, delta: &[u8]) -> Option<Vec<u8>> {
    let mut total = old.map(decode_usage).unwrap_or_default();
    total.merge(decode_usage(delta));
    Some(encode_usage(total).to_vec())
}

fn owner_index_key(owner: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 1 + id.len());
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn decode_u64(bytes: Option<sled::IVec>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // No background flusher: every write flushes before it is acknowledged, and a flush
        // racing a transaction is what deadlocks.
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(|e| match e {
                // sled takes an exclusive lock on its directory; a second process fails to.
                // sled 0.34 reports that as `ErrorKind::Other` with this text, the lock's
                // own `WouldBlock` only in the message (sled `config.rs`, `try_lock`).
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().starts_with("could not acquire lock") =>
                {
                    StoreError::Locked(path.display().to_string())
                }
                e => StoreError::from(e),
            })?;
        let usage = db.open_tree("usage")?;
        usage.set_merge_operator(merge_usage);
        let trees = Arc::new(Trees {
            writing: AtomicBool::new(false),
            keys: db.open_tree("keys")?,
            hashes: db.open_tree("hashes")?,
            owners: db.open_tree("owners")?,
            audit: db.open_tree("audit")?,
            meta: db.open_tree("meta")?,
            usage,
            db,
        });
        let (jobs, queue) = std::sync::mpsc::channel();
        let writer_trees = Arc::clone(&trees);
        let writer = std::thread::Builder::new()
            .name("keygate-sled-writer".into())
            .spawn(move || run_writer(writer_trees, queue))
            .map_err(|e| StoreError::Io(format!("cannot start the store writer: {e}")))?;
        Ok(SledStore {
            path: path.to_path_buf(),
            trees,
            point_reads: PointReads::new(),
            jobs: Some(jobs),
            writer: Some(writer),
        })
    }

    /// Runs `op` on the writer thread and answers once a flush covers it. A cancelled
    /// caller does not cancel the write (it is queued), only the wait for its answer.
    async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: WriteJob = Box::new(move |trees| {
            let out = op(trees);
            Box::new(move |flushed| {
                let _ = answer.send(flushed.and(out));
            })
        });
        let stopped = || StoreError::Io("the store writer stopped".into());
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send(job).map_err(|_| stopped())?;
        // A dropped answer means the write panicked (the writer goes on with the others).
        answered
            .await
            .map_err(|_| StoreError::Io("the store write failed unexpectedly".into()))?
    }

    /// Runs a point read inline or on the blocking pool (see `PointReads`).
    async fn point_read<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let began = Instant::now();
        if self.trees.writing.load(Ordering::SeqCst) || !self.point_reads.inline_now(began) {
            return self.read(op).await;
        }
        let counts = ThreadCounts::now();
        // As on the pool, a read that panics is an error for its caller, not a dead task.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(&self.trees)))
            .unwrap_or_else(|_| Err(StoreError::Io("a store read failed unexpectedly".into())));
        self.point_reads.finished(began, counts);
        out
    }

    /// Runs a read on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let trees = Arc::clone(&self.trees);
        tokio::task::spawn_blocking(move || op(&trees))
            .await
            .map_err(|_| StoreError::Io("a store read failed unexpectedly".into()))?
    }

    /// Closes the store and opens its directory once more, for the end of a bulk load: sled
    /// writes its snapshot only when it opens a database, so without this the next start
    /// (the gateway's) replays the whole load from the log before it can listen.
    pub fn checkpoint(self) -> Result<(), StoreError> {
        let path = self.path.clone();
        drop(self);
        drop(SledStore::reopen(&path)?);
        Ok(())
    }

    /// Opens a store this process has just closed: sled's own I/O threads may hold the
    /// database file (and its lock) for a moment after the last handle is gone, so a
    /// `Locked` directory is tried again for a few seconds. Anything else fails at once.
    pub fn reopen(path: &Path) -> Result<Self, StoreError> {
        let started = std::time::Instant::now();
        loop {
            match SledStore::open(path) {
                Err(StoreError::Locked(_)) if started.elapsed() < REOPEN_LOCK_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                opened => return opened,
            }
        }
    }

    /// Inserts many records with one flush at the end (bulk loads, benchmarks). Same checks
    /// as `insert`; on error, the records before the failing one are kept.
    pub async fn import(&self, records: &[KeyRecord]) -> Result<(), StoreError> {
        let records = records.to_vec();
        self.write(move |trees| {
            for record in &records {
                trees.insert(record)?;
            }
            Ok(())
        })
        .await
    }
}

impl Trees {
    fn decode_record(bytes: &[u8]) -> Result<KeyRecord, StoreError> {
        serde_json::from_slice(bytes).map_err(StoreError::corrupt)
    }

    fn with_usage(&self, record: KeyRecord) -> Result<KeyWithUsage, StoreError> {
        let usage = self
            .usage
            .get(record.id.as_bytes())?
            .map(|b| decode_usage(&b))
            .unwrap_or_default();
        Ok(KeyWithUsage { record, usage })
    }

    /// Rewrites one record under a transaction; `change` returns false to leave it as is.
    fn update_record(
        &self,
        id: &str,
        change: impl Fn(&mut KeyRecord) -> bool,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let outcome = self.keys.transaction(|tx| {
            let Some(bytes) = tx.get(id.as_bytes())? else {
                return Ok(None);
            };
            let mut record =
                Self::decode_record(&bytes).map_err(ConflictableTransactionError::Abort)?;
            if change(&mut record) {
                let encoded = serde_json::to_vec(&record)
                    .map_err(|e| ConflictableTransactionError::Abort(StoreError::corrupt(e)))?;
                tx.insert(id.as_bytes(), encoded)?;
            }
            Ok(Some(record))
        });
        flatten(outcome)
    }

    fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let hash = record
            .key_hash()
            .ok_or_else(|| StoreError::corrupt("record without a valid hash"))?;
        let encoded = serde_json::to_vec(record).map_err(StoreError::corrupt)?;
        let owner_key = owner_index_key(&record.owner, &record.id);
        let outcome = (&self.keys, &self.hashes, &self.owners, &self.meta).transaction(
            |(keys, hashes, owners, meta)| {
                if keys.get(record.id.as_bytes())?.is_some() || hashes.get(hash.0)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(StoreError::Duplicate));
                }
                keys.insert(record.id.as_bytes(), encoded.as_slice())?;
                hashes.insert(&hash.0[..], record.id.as_bytes())?;
                owners.insert(owner_key.as_slice(), &[][..])?;
                let count = decode_u64(meta.get(KEY_COUNT)?);
                meta.insert(KEY_COUNT, &(count + 1).to_be_bytes()[..])?;
                Ok(())
            },
        );
        flatten(outcome)
    }
}

impl Trees {
    /// Removes a purgeable record with its indexes, count and usage; None when it is gone
    /// or no longer purgeable (it was read outside this transaction).
    fn remove(&self, record: &KeyRecord, before: i64) -> Result<Option<KeyHash>, StoreError> {
        let Some(hash) = record.key_hash() else {
            return Err(StoreError::corrupt("record without a valid hash"));
        };
        let owner_key = owner_index_key(&record.owner, &record.id);
        let outcome = (&self.keys, &self.hashes, &self.owners, &self.meta).transaction(
            |(keys, hashes, owners, meta)| {
                let Some(bytes) = keys.get(record.id.as_bytes())? else {
                    return Ok(None);
                };
                let stored =
                    Self::decode_record(&bytes).map_err(ConflictableTransactionError::Abort)?;
                if !stored.purgeable(before) {
                    return Ok(None);
                }
                keys.remove(record.id.as_bytes())?;
                hashes.remove(&hash.0[..])?;
                owners.remove(owner_key.as_slice())?;
                let count = decode_u64(meta.get(KEY_COUNT)?);
                meta.insert(KEY_COUNT, &count.saturating_sub(1).to_be_bytes()[..])?;
                Ok(Some(hash))
            },
        );
        let removed = flatten(outcome)?;
        if removed.is_some() {
            self.usage.remove(record.id.as_bytes())?;
        }
        Ok(removed)
    }
}

fn flatten<T>(result: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    match result {
        Ok(v) => Ok(v),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

#[async_trait]
impl KeyStore for SledStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.write(move |trees| trees.insert(&record)).await
    }

    async fn get(&self, id: &str) -> Result<Option<KeyWithUsage>, StoreError> {
        let id = id.to_string();
        self.point_read(move |trees| match trees.keys.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(trees.with_usage(Trees::decode_record(&bytes)?)?)),
            None => Ok(None),
        })
        .await
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let hash = *hash;
        self.point_read(move |trees| {
            let Some(id) = trees.hashes.get(hash.0)? else {
                return Ok(None);
            };
            match trees.keys.get(&id)? {
                Some(bytes) => Ok(Some(Trees::decode_record(&bytes)?)),
                None => Err(StoreError::corrupt("hash index points at a missing key")),
            }
        })
        .await
    }

    async fn stored_hashes(&self) -> Result<Vec<KeyHash>, StoreError> {
        self.read(|trees| {
            trees
                .hashes
                .iter()
                .keys()
                .map(|hash| {
                    let hash = hash?;
                    <[u8; 32]>::try_from(hash.as_ref())
                        .map(KeyHash)
                        .map_err(|_| StoreError::corrupt("a stored key hash is not 32 bytes"))
                })
                .collect()
        })
        .await
    }

    async fn warm_set(&self, now: i64, limit: usize, out: WarmSink) -> Result<(), StoreError> {
        self.read(move |trees| trees.warm_set(now, limit, &out))
            .await
    }

    async fn list(&self, query: ListQuery<'_>) -> Result<Vec<KeyWithUsage>, StoreError> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let mut out = Vec::with_capacity(query.limit.min(1024));
        match query.owner {
            Some(owner) => {
                let prefix = owner_index_key(owner, "");
                let start = match query.after {
                    Some(after) => Excluded(owner_index_key(owner, after)),
                    None => Included(prefix.clone()),
                };
                for entry in self.trees.owners.range::<Vec<u8>, _>((start, Unbounded)) {
                    let (index_key, _) = entry?;
                    if !index_key.starts_with(&prefix) || out.len() >= query.limit {
                        break;
                    }
                    let id = &index_key[prefix.len()..];
                    if let Some(bytes) = self.trees.keys.get(id)? {
                        out.push(self.trees.with_usage(Trees::decode_record(&bytes)?)?);
                    }
                }
            }
            None => {
                let start = match query.after {
                    Some(after) => Excluded(after.as_bytes().to_vec()),
                    None => Unbounded,
                };
                for entry in self.trees.keys.range::<Vec<u8>, _>((start, Unbounded)) {
                    if out.len() >= query.limit {
                        break;
                    }
                    let (_, bytes) = entry?;
                    out.push(self.trees.with_usage(Trees::decode_record(&bytes)?)?);
                }
            }
        }
        Ok(out)
    }

    async fn revoke(&self, id: &str, at: i64) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_string();
        self.write(move |trees| trees.update_record(&id, |record| record.revoke(at)))
            .await
    }

    async fn retire(&self, id: &str, expires_at: i64) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_string();
        self.write(move |trees| trees.update_record(&id, |record| record.retire(expires_at)))
            .await
    }

    async fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<KeyRecord>, StoreError> {
        let (id, patch) = (id.to_string(), patch.clone());
        self.write(move |trees| trees.update_record(&id, |record| record.apply(&patch)))
            .await
    }

    async fn purge(&self, before: i64, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        // Found on the blocking pool, removed on the writer thread, one flush for the batch.
        let doomed: Vec<KeyRecord> = self
            .read(move |trees| {
                let mut doomed = Vec::new();
                for entry in trees.keys.iter() {
                    if doomed.len() >= limit {
                        break;
                    }
                    let (_, bytes) = entry?;
                    let record = Trees::decode_record(&bytes)?;
                    if record.purgeable(before) {
                        doomed.push(record);
                    }
                }
                Ok(doomed)
            })
            .await?;
        if doomed.is_empty() {
            return Ok(Vec::new());
        }
        self.write(move |trees| {
            let mut removed = Vec::with_capacity(doomed.len());
            for record in &doomed {
                if let Some(hash) = trees.remove(record, before)? {
                    removed.push(hash);
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn add_usage(&self, deltas: &[(String, Usage)]) -> Result<(), StoreError> {
        let deltas = deltas.to_vec();
        self.write(move |trees| {
            for (id, delta) in &deltas {
                trees.usage.merge(id.as_bytes(), encode_usage(*delta))?;
            }
            Ok(())
        })
        .await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        Ok(decode_u64(self.trees.meta.get(KEY_COUNT)?))
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let encoded = serde_json::to_vec(entry).map_err(StoreError::corrupt)?;
        let id = entry.id.clone();
        self.write(move |trees| {
            trees.audit.insert(id.as_bytes(), encoded)?;
            Ok(())
        })
        .await
    }

    async fn list_audit(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let iter = match before {
            Some(before) => self.trees.audit.range(..before.as_bytes().to_vec()),
            None => self.trees.audit.range::<Vec<u8>, _>(..),
        };
        iter.rev()
            .take(limit)
            .map(|entry| {
                let (_, bytes) = entry?;
                serde_json::from_slice(&bytes).map_err(StoreError::corrupt)
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.writer.as_ref().is_none_or(|w| w.is_finished()) {
            return Err(StoreError::Io("the store writer stopped".into()));
        }
        self.trees.meta.get(KEY_COUNT)?;
        Ok(())
    }
}
