//! Key storage: the `KeyStore` trait every backend implements (sled embedded, PostgreSQL
//! shared), the moka cache the request path reads through, and, on PostgreSQL, the
//! listener that keeps every gateway's cache coherent.

mod cache;
mod cached_key;
mod filter;
#[cfg(test)]
mod gated;
pub mod invalidation;
mod pg_connection;
mod pg_schema;
mod point_reads;
pub mod postgres;
mod sled_store;

pub use cache::{CacheSettings, KeyCache, LookupSource, Resolved};
pub use cached_key::CachedKey;
pub use filter::KeyFilter;
pub use pg_connection::{PgOptions, SslMode};
pub use postgres::PgStore;
pub use sled_store::SledStore;

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{StoreBackend, StoreConfig};
use crate::keys::{KeyHash, KeyPatch, KeyRecord, Usage};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {0} is locked by another process: is a gateway running on it?")]
    Locked(String),
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("a key with this id already exists")]
    Duplicate,
    /// Too many cache misses are reading the store at once (see `store.max_concurrent_reads`).
    #[error("too many key look-ups are waiting for the store")]
    Busy,
}

impl StoreError {
    pub fn corrupt(e: impl std::fmt::Display) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// A key record with its usage totals, as listings and look-ups by id return it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyWithUsage {
    pub record: KeyRecord,
    pub usage: Usage,
}

/// Which records a listing returns: one owner's or all, in id (= creation) order.
#[derive(Debug, Clone, Copy)]
pub struct ListQuery<'a> {
    pub owner: Option<&'a str>,
    /// Return records with ids strictly greater than this cursor.
    pub after: Option<&'a str>,
    pub limit: usize,
}

/// One management action, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: String,
    /// `admin` or `key:<id>` or `signup` or `cli`.
    pub actor: String,
    pub action: String,
    pub key_id: Option<String>,
    pub at: i64,
    pub client: Option<String>,
}

/// Storage of key records, usage totals and the audit log. Writes return only once they
/// are durable: a crash right after an acknowledged write must not lose it.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Persists a new key; `Duplicate` if the id or hash exists already.
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    async fn get(&self, id: &str) -> Result<Option<KeyWithUsage>, StoreError>;
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError>;
    /// The hash of every stored key, revoked ones included, in no particular order: what
    /// the key filter is built from (about 32 bytes a key, all in memory at once).
    async fn stored_hashes(&self) -> Result<Vec<KeyHash>, StoreError>;
    async fn list(&self, query: ListQuery<'_>) -> Result<Vec<KeyWithUsage>, StoreError>;
    /// Up to `limit` live keys (neither revoked nor expired at `now`) with their usage, to
    /// fill a cold cache: the most recently used first, then never-used keys, newest first.
    /// Sent to `out` `WARM_CHUNK` at a time, so that a large set is never all in memory at
    /// once; ends early, without an error, when `out` is closed.
    async fn warm_set(&self, now: i64, limit: usize, out: WarmSink) -> Result<(), StoreError>;
    /// Marks a key revoked at `at`; a key revoked before keeps its first `revoked_at`.
    async fn revoke(&self, id: &str, at: i64) -> Result<Option<KeyRecord>, StoreError>;
    /// Retires a key a rotation replaced: marks it superseded and brings its expiry forward
    /// to `expires_at` (never later than it already was).
    async fn retire(&self, id: &str, expires_at: i64) -> Result<Option<KeyRecord>, StoreError>;
    /// Changes a key in place by `KeyRecord::apply` (a revoked or rotated key is left as
    /// is); returns the record as it now stands.
    async fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<KeyRecord>, StoreError>;
    /// Deletes up to `limit` records revoked before `before` or expired before it (their
    /// usage totals too; audit entries stay), oldest ids first; returns their hashes. A
    /// caller purges everything due by calling again until fewer than `limit` come back.
    async fn purge(&self, before: i64, limit: usize) -> Result<Vec<KeyHash>, StoreError>;
    /// Adds usage deltas: counts are summed, `last_used` keeps the latest. Never a
    /// read-modify-write visible to other writers, so concurrent flushes cannot lose counts.
    async fn add_usage(&self, deltas: &[(String, Usage)]) -> Result<(), StoreError>;
    async fn count(&self) -> Result<u64, StoreError>;
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    /// Newest first; entries with ids strictly smaller than `before`.
    async fn list_audit(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError>;
    /// Whether the store is usable right now (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Where `KeyStore::warm_set` sends its keys.
pub type WarmSink = tokio::sync::mpsc::Sender<Vec<KeyWithUsage>>;
/// Keys in one message of a warm set.
pub const WARM_CHUNK: usize = 1024;

/// A whole warm set in one list (for tests, and stores known to be small).
pub async fn warm_set_list(
    store: &dyn KeyStore,
    now: i64,
    limit: usize,
) -> Result<Vec<KeyWithUsage>, StoreError> {
    let (out, mut chunks) = tokio::sync::mpsc::channel(2);
    let gather = async move {
        let mut all = Vec::new();
        while let Some(chunk) = chunks.recv().await {
            all.extend(chunk);
        }
        all
    };
    let (read, all) = tokio::join!(store.warm_set(now, limit, out), gather);
    read.map(|()| all)
}

/// The PostgreSQL connection string, from the environment variable the config names (never
/// from the file: it may hold a password).
pub fn database_url(url_env: &str) -> anyhow::Result<String> {
    crate::config::named_env("store.url_env", url_env)
        .map_err(|problem| anyhow::anyhow!("{problem}"))
}

/// Opens the store the configuration names.
pub async fn open(config: &StoreConfig) -> anyhow::Result<Arc<dyn KeyStore>> {
    match &config.backend {
        StoreBackend::Sled { path } => {
            let store = SledStore::open(path)
                .with_context(|| format!("cannot open the sled store at {}", path.display()))?;
            Ok(Arc::new(store))
        }
        StoreBackend::Postgres { url_env, .. } => {
            let url = database_url(url_env)?;
            let options = postgres_options(&config.backend).unwrap_or_default();
            let store = PgStore::connect_with(&url, &options)
                .await
                .context("cannot open the postgres store")?;
            Ok(Arc::new(store))
        }
    }
}

/// How the PostgreSQL backend connects (the pool and the invalidation listener alike);
/// None for sled.
pub fn postgres_options(backend: &StoreBackend) -> Option<PgOptions> {
    match backend {
        StoreBackend::Sled { .. } => None,
        StoreBackend::Postgres {
            url_env: _,
            pool_size,
            connect_timeout,
            statement_timeout,
            ca_certificates,
        } => Some(PgOptions {
            pool_size: *pool_size,
            connect_timeout: *connect_timeout,
            statement_timeout: *statement_timeout,
            ca_certificates: ca_certificates.clone(),
        }),
    }
}

/// The cache the configuration asks for, in front of `store`.
pub fn cache_for(config: &StoreConfig, store: Arc<dyn KeyStore>) -> Arc<KeyCache> {
    Arc::new(KeyCache::new(
        store,
        CacheSettings {
            capacity: config.cache_capacity,
            ttl: config.cache_ttl,
            negative_capacity: config.negative_cache_capacity,
            negative_ttl: config.negative_cache_ttl,
            max_store_reads: config.max_concurrent_reads,
            store_read_wait: config.read_wait,
        },
    ))
}
