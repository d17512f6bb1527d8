//! The shared store: PostgreSQL through a deadpool pool of tokio-postgres connections, so
//! that several gateway instances can serve one set of keys.
//!
//! Semantics are exactly those of `SledStore` (`tests/store_conformance.rs` runs one suite
//! against both):
//! - ids, owners and audit ids are `COLLATE "C"` columns, so listings and cursors use byte
//!   order exactly as sled does, whatever the database's default collation;
//! - usage is added by one batched upsert (`count = count + delta`, `last_used = GREATEST`),
//!   never a read-modify-write, so concurrent flushes from many instances lose nothing;
//! - revokes, expiry changes and patches notify `keygate_invalidate` with the key's hash in the same
//!   transaction, and `run_invalidation_listener` turns those notifications into cache
//!   invalidations on every other instance;
//! - inserts notify `keygate_key_created` with the new key's hash, so that every other
//!   instance's key filter learns it within milliseconds.
//!
//! The schema is created and upgraded at start-up by `pg_schema`'s migrations, under an
//! advisory lock, so that instances starting together apply each migration exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use futures_util::StreamExt;
use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};

use super::pg_connection::{Connector, with_tls_hint};
pub use super::pg_schema::SCHEMA_VERSION;
use super::pg_schema::migrate;
use super::{
    AuditEntry, KeyStore, KeyWithUsage, ListQuery, PgOptions, StoreError, WARM_CHUNK, WarmSink,
};
use crate::keys::{KeyHash, KeyPatch, KeyRecord, QuotaUsage, Usage};

/// The channel revokes and expiry changes notify, with the key's hash in hex as payload.
pub const INVALIDATION_CHANNEL: &str = "keygate_invalidate";

/// The channel inserts notify, with the new key's hash in hex as payload. A channel of its
/// own: builds that predate the key filter read any unexpected payload on
/// `keygate_invalidate` as "clear the whole cache", which every create would then do.
pub const CREATED_CHANNEL: &str = "keygate_key_created";

pub struct PgStore {
    pool: Pool,
}

/// An error with its whole chain of causes: tokio-postgres's own `Display` says only
/// "db error" and keeps the server's message in the source. None of these texts carry the
/// connection string (which may hold a password).
pub(super) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Io(format!("PostgreSQL: {}", describe(&e)))
    }
}

impl From<PoolError> for StoreError {
    fn from(e: PoolError) -> Self {
        let text = match &e {
            PoolError::Backend(inner) => describe(inner),
            other => other.to_string(),
        };
        StoreError::Io(format!("PostgreSQL connection pool: {text}"))
    }
}

fn decode_record(row: &Row, column: usize) -> Result<KeyRecord, StoreError> {
    row.try_get::<_, Json<KeyRecord>>(column)
        .map(|json| json.0)
        .map_err(|e| StoreError::corrupt(format!("stored key record: {}", describe(&e))))
}

/// The `count`, `last_used`, `quota_stamp` and `quota_used` columns of a LEFT JOIN with
/// `usage` from column `first` on (NULL = never used).
fn decode_usage(row: &Row, first: usize) -> Result<Usage, StoreError> {
    let column = |at: usize| -> Result<i64, StoreError> {
        let value: Option<i64> = row.try_get(first + at).map_err(StoreError::corrupt)?;
        Ok(value.unwrap_or(0))
    };
    let unsigned = |at: usize| u64::try_from(column(at)?).map_err(StoreError::corrupt);
    Ok(Usage {
        count: unsigned(0)?,
        last_used: column(1)?,
        quota: QuotaUsage {
            stamp: column(2)?,
            used: unsigned(3)?,
        },
    })
}

fn decode_key_with_usage(row: &Row) -> Result<KeyWithUsage, StoreError> {
    Ok(KeyWithUsage {
        record: decode_record(row, 0)?,
        usage: decode_usage(row, 1)?,
    })
}

/// PostgreSQL text cannot hold NUL, so no stored id, owner or audit id contains one. Look-ups
/// by such a value find nothing (as in sled) instead of failing.
fn has_nul(text: &str) -> bool {
    text.contains('\0')
}

/// The part before the first NUL. For strings without NUL, `s > cursor` holds exactly when
/// `s > before_nul(cursor)`, and `s < cursor` exactly when `s <= before_nul(cursor)`.
fn before_nul(text: &str) -> &str {
    text.split('\0').next().unwrap_or_default()
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Connects a pool of up to `pool_size` connections with the default statement timeout
    /// and CA (the system roots), and brings the schema up to date.
    pub async fn connect(
        url: &str,
        pool_size: usize,
        connect_timeout: Duration,
    ) -> Result<PgStore, StoreError> {
        Self::connect_with(url, &PgOptions::new(pool_size, connect_timeout)).await
    }

    /// Connects a pool as `options` say and brings the schema up to date.
    /// `options.connect_timeout` bounds connecting and waiting for a free pooled connection.
    pub async fn connect_with(url: &str, options: &PgOptions) -> Result<PgStore, StoreError> {
        let connector = Connector::new(url, options, "keygate")?;
        if options.ca_certificates.is_some() && !connector.mode.checks_certificates() {
            tracing::warn!(
                sslmode = connector.mode.name(),
                "store.ca_file is set but the connection string's sslmode does not check \
                 certificates: use sslmode=verify-full (or verify-ca)"
            );
        }
        let Connector {
            mut config,
            tls,
            mode,
        } = connector;
        let connect_timeout = options.connect_timeout;
        config.connect_timeout(connect_timeout);
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(connect_timeout))
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(connect_timeout))
            .build()
            .map_err(|e| StoreError::Io(format!("PostgreSQL connection pool: {e}")))?;
        let store = PgStore { pool };
        let mut client = store.client().await.map_err(|e| with_tls_hint(e, mode))?;
        migrate(&mut client).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Rewrites one record under a row lock; `change` returns false to leave it as is. In
    /// the same transaction, notifies `keygate_invalidate` with the key's hash, so that other
    /// instances drop their cached copy exactly when the change commits. The notification
    /// is sent whenever the key exists, changed or not: harmless, and it also flushes a
    /// cache that should not have held the key.
    async fn update_record<F>(&self, id: &str, change: F) -> Result<Option<KeyRecord>, StoreError>
    where
        F: Fn(&mut KeyRecord) -> bool + Send,
    {
        if has_nul(id) {
            return Ok(None);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // NO KEY UPDATE, not UPDATE: it does not wait for usage upserts holding KEY SHARE
        // locks on the row through the foreign key.
        let select = tx
            .prepare_cached("SELECT record, hash FROM keys WHERE id = $1 FOR NO KEY UPDATE")
            .await?;
        let Some(row) = tx.query_opt(&select, &[&id]).await? else {
            tx.commit().await?;
            return Ok(None);
        };
        let mut record = decode_record(&row, 0)?;
        let hash_bytes: &[u8] = row.try_get(1).map_err(StoreError::corrupt)?;
        let hash = KeyHash(
            hash_bytes
                .try_into()
                .map_err(|_| StoreError::corrupt("stored key hash is not 32 bytes"))?,
        );
        if change(&mut record) {
            let update = tx
                .prepare_cached("UPDATE keys SET record = $2 WHERE id = $1")
                .await?;
            tx.execute(&update, &[&id, &Json(&record)]).await?;
        }
        let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
        tx.execute(&notify, &[&INVALIDATION_CHANNEL, &hash.to_hex()])
            .await?;
        tx.commit().await?;
        Ok(Some(record))
    }
}

const SELECT_WITH_USAGE: &str = "SELECT k.record, u.count, u.last_used, u.quota_stamp, u.quota_used \
     FROM keys k LEFT JOIN usage u ON u.key_id = k.id";

#[async_trait]
impl KeyStore for PgStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let hash = record
            .key_hash()
            .ok_or_else(|| StoreError::corrupt("record without a valid hash"))?;
        if has_nul(&record.id) || has_nul(&record.owner) {
            return Err(StoreError::Io(
                "PostgreSQL cannot store a NUL character in a key id or owner".to_string(),
            ));
        }
        let client = self.client().await?;
        // Without a conflict target, DO NOTHING covers both the id and the hash. One
        // statement, so the notification is sent exactly when the row commits.
        let insert = client
            .prepare_cached(
                "WITH inserted AS (INSERT INTO keys (id, hash, owner, record) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING hash) \
                 SELECT pg_notify($5, encode(hash, 'hex')) FROM inserted",
            )
            .await?;
        let inserted = client
            .query(
                &insert,
                &[
                    &record.id,
                    &&hash.0[..],
                    &record.owner,
                    &Json(record),
                    &CREATED_CHANNEL,
                ],
            )
            .await?;
        if inserted.is_empty() {
            return Err(StoreError::Duplicate);
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<KeyWithUsage>, StoreError> {
        if has_nul(id) {
            return Ok(None);
        }
        let client = self.client().await?;
        let select = client
            .prepare_cached(&format!("{SELECT_WITH_USAGE} WHERE k.id = $1"))
            .await?;
        match client.query_opt(&select, &[&id]).await? {
            Some(row) => Ok(Some(decode_key_with_usage(&row)?)),
            None => Ok(None),
        }
    }

    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let client = self.client().await?;
        let select = client
            .prepare_cached("SELECT record FROM keys WHERE hash = $1")
            .await?;
        match client.query_opt(&select, &[&&hash.0[..]]).await? {
            Some(row) => Ok(Some(decode_record(&row, 0)?)),
            None => Ok(None),
        }
    }

    async fn stored_hashes(&self) -> Result<Vec<KeyHash>, StoreError> {
        let client = self.client().await?;
        let select = client.prepare_cached("SELECT hash FROM keys").await?;
        client
            .query(&select, &[])
            .await?
            .iter()
            .map(|row| {
                let hash: &[u8] = row.try_get(0).map_err(StoreError::corrupt)?;
                <[u8; 32]>::try_from(hash)
                    .map(KeyHash)
                    .map_err(|_| StoreError::corrupt("a stored key hash is not 32 bytes"))
            })
            .collect()
    }

    async fn warm_set(&self, now: i64, limit: usize, out: WarmSink) -> Result<(), StoreError> {
        if limit == 0 {
            return Ok(());
        }
        let client = self.client().await?;
        let select = client
            .prepare_cached(&format!(
                "{SELECT_WITH_USAGE} WHERE k.record->>'revoked_at' IS NULL \
                 AND (k.record->>'expires_at' IS NULL OR (k.record->>'expires_at')::bigint > $1) \
                 ORDER BY u.last_used DESC NULLS LAST, k.id DESC LIMIT $2"
            ))
            .await?;
        let params: [&(dyn ToSql + Sync); 2] = [&now, &sql_limit(limit)];
        let rows = client.query_raw(&select, params).await?;
        futures_util::pin_mut!(rows);
        let mut chunk = Vec::with_capacity(WARM_CHUNK);
        while let Some(row) = rows.next().await {
            // A record that does not decode is left for the request path, which reports it.
            let Ok(key) = decode_key_with_usage(&row?) else {
                continue;
            };
            chunk.push(key);
            if chunk.len() == WARM_CHUNK {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(WARM_CHUNK));
                if out.send(full).await.is_err() {
                    return Ok(());
                }
            }
        }
        if !chunk.is_empty() {
            let _ = out.send(chunk).await;
        }
        Ok(())
    }

    async fn list(&self, query: ListQuery<'_>) -> Result<Vec<KeyWithUsage>, StoreError> {
        if query.limit == 0 || query.owner.is_some_and(has_nul) {
            return Ok(Vec::new());
        }
        let limit = sql_limit(query.limit);
        let after = query.after.map(before_nul);
        // One statement per shape rather than `$1 IS NULL OR ...`, so that each plan can
        // use the (owner, id) index or the primary key.
        let (sql, params): (String, Vec<&(dyn ToSql + Sync)>) = match (&query.owner, &after) {
            (Some(owner), Some(after)) => (
                format!(
                    "{SELECT_WITH_USAGE} WHERE k.owner = $1 AND k.id > $2 ORDER BY k.id LIMIT $3"
                ),
                vec![owner, after, &limit],
            ),
            (Some(owner), None) => (
                format!("{SELECT_WITH_USAGE} WHERE k.owner = $1 ORDER BY k.id LIMIT $2"),
                vec![owner, &limit],
            ),
            (None, Some(after)) => (
                format!("{SELECT_WITH_USAGE} WHERE k.id > $1 ORDER BY k.id LIMIT $2"),
                vec![after, &limit],
            ),
            (None, None) => (
                format!("{SELECT_WITH_USAGE} ORDER BY k.id LIMIT $1"),
                vec![&limit],
            ),
        };
        let client = self.client().await?;
        let select = client.prepare_cached(&sql).await?;
        client
            .query(&select, &params)
            .await?
            .iter()
            .map(decode_key_with_usage)
            .collect()
    }

    async fn revoke(&self, id: &str, at: i64) -> Result<Option<KeyRecord>, StoreError> {
        self.update_record(id, move |record| record.revoke(at))
            .await
    }

    async fn retire(&self, id: &str, expires_at: i64) -> Result<Option<KeyRecord>, StoreError> {
        self.update_record(id, move |record| record.retire(expires_at))
            .await
    }

    async fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<KeyRecord>, StoreError> {
        self.update_record(id, |record| record.apply(patch)).await
    }

    async fn purge(&self, before: i64, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The same rule as `KeyRecord::purgeable`, on the JSON record. SKIP LOCKED: several
        // gateways purging at once share the work instead of waiting on each other.
        let select = tx
            .prepare_cached(
                "SELECT id FROM keys WHERE (record->>'revoked_at')::bigint < $1 \
                 OR (record->>'expires_at')::bigint < $1 \
                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
            )
            .await?;
        let ids: Vec<String> = tx
            .query(&select, &[&before, &sql_limit(limit)])
            .await?
            .iter()
            .map(|row| row.try_get(0).map_err(StoreError::corrupt))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let usage = tx
            .prepare_cached("DELETE FROM usage WHERE key_id = ANY($1)")
            .await?;
        tx.execute(&usage, &[&ids]).await?;
        let keys = tx
            .prepare_cached("DELETE FROM keys WHERE id = ANY($1) RETURNING hash")
            .await?;
        let rows = tx.query(&keys, &[&ids]).await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                let hash: &[u8] = row.try_get(0).map_err(StoreError::corrupt)?;
                <[u8; 32]>::try_from(hash)
                    .map(KeyHash)
                    .map_err(|_| StoreError::corrupt("a stored key hash is not 32 bytes"))
            })
            .collect()
    }

    async fn add_usage(&self, deltas: &[(String, Usage)]) -> Result<(), StoreError> {
        // Deltas of one id are merged first (an upsert may touch a row only once, and a
        // quota count merges by stamp, which SQL's sum cannot), and sent in id order, so
        // that concurrent batches lock rows in the same order and never deadlock.
        let mut merged: BTreeMap<&str, Usage> = BTreeMap::new();
        // A key id with NUL cannot exist: like any unknown key's, its delta is dropped.
        for (id, delta) in deltas.iter().filter(|(id, _)| !has_nul(id)) {
            merged.entry(id.as_str()).or_default().merge(*delta);
        }
        if merged.is_empty() {
            return Ok(());
        }
        let out_of_range =
            |id: &str| StoreError::corrupt(format!("usage delta for {id} out of range"));
        let mut ids = Vec::with_capacity(merged.len());
        let mut counts = Vec::with_capacity(merged.len());
        let mut last_used = Vec::with_capacity(merged.len());
        let mut quota_stamps = Vec::with_capacity(merged.len());
        let mut quota_used = Vec::with_capacity(merged.len());
        for (id, delta) in merged {
            ids.push(id);
            counts.push(i64::try_from(delta.count).map_err(|_| out_of_range(id))?);
            last_used.push(delta.last_used);
            quota_stamps.push(delta.quota.stamp);
            quota_used.push(i64::try_from(delta.quota.used).map_err(|_| out_of_range(id))?);
        }
        let client = self.client().await?;
        // One statement, one transaction; deltas of unknown keys are dropped (the foreign
        // key would refuse them; sled keeps them where nothing ever reads them).
        let upsert = client
            .prepare_cached(
                "INSERT INTO usage (key_id, count, last_used, quota_stamp, quota_used) \
                 SELECT d.key_id, d.count, d.last_used, d.quota_stamp, d.quota_used \
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[]) \
                 AS d(key_id, count, last_used, quota_stamp, quota_used) \
                 WHERE EXISTS (SELECT 1 FROM keys k WHERE k.id = d.key_id) \
                 ORDER BY d.key_id COLLATE \"C\" \
                 ON CONFLICT (key_id) DO UPDATE SET \
                 count = usage.count + EXCLUDED.count, \
                 last_used = GREATEST(usage.last_used, EXCLUDED.last_used), \
                 quota_used = CASE \
                   WHEN EXCLUDED.quota_stamp > usage.quota_stamp THEN EXCLUDED.quota_used \
                   WHEN EXCLUDED.quota_stamp = usage.quota_stamp \
                     THEN usage.quota_used + EXCLUDED.quota_used \
                   ELSE usage.quota_used END, \
                 quota_stamp = GREATEST(usage.quota_stamp, EXCLUDED.quota_stamp)",
            )
            .await?;
        client
            .execute(
                &upsert,
                &[&ids, &counts, &last_used, &quota_stamps, &quota_used],
            )
            .await?;
        Ok(())
    }

    async fn count(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let select = client.prepare_cached("SELECT count(*) FROM keys").await?;
        let count: i64 = client
            .query_one(&select, &[])
            .await?
            .try_get(0)
            .map_err(StoreError::corrupt)?;
        u64::try_from(count).map_err(StoreError::corrupt)
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let client = self.client().await?;
        // Same id again replaces the entry, as sled's insert does.
        let insert = client
            .prepare_cached(
                "INSERT INTO audit (id, entry) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET entry = EXCLUDED.entry",
            )
            .await?;
        client.execute(&insert, &[&entry.id, &Json(entry)]).await?;
        Ok(())
    }

    async fn list_audit(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = sql_limit(limit);
        let client = self.client().await?;
        let rows = match before {
            Some(before) if has_nul(before) => {
                let select = client
                    .prepare_cached(
                        "SELECT entry FROM audit WHERE id <= $1 ORDER BY id DESC LIMIT $2",
                    )
                    .await?;
                client
                    .query(&select, &[&before_nul(before), &limit])
                    .await?
            }
            Some(before) => {
                let select = client
                    .prepare_cached(
                        "SELECT entry FROM audit WHERE id < $1 ORDER BY id DESC LIMIT $2",
                    )
                    .await?;
                client.query(&select, &[&before, &limit]).await?
            }
            None => {
                let select = client
                    .prepare_cached("SELECT entry FROM audit ORDER BY id DESC LIMIT $1")
                    .await?;
                client.query(&select, &[&limit]).await?
            }
        };
        rows.iter()
            .map(|row| {
                row.try_get::<_, Json<AuditEntry>>(0)
                    .map(|json| json.0)
                    .map_err(|e| {
                        StoreError::corrupt(format!("stored audit entry: {}", describe(&e)))
                    })
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.batch_execute("SELECT 1").await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connection_errors_do_not_reveal_the_url() {
        // Nothing listens on port 1: the error is about connecting, not about the URL.
        let url = "postgres://keygate:sup3rs3cret@127.0.0.1:1/keygate_db";
        let Err(error) = PgStore::connect(url, 2, Duration::from_secs(2)).await else {
            panic!("connected to port 1");
        };
        let text = error.to_string();
        assert!(matches!(error, StoreError::Io(_)), "{text}");
        assert!(!text.contains("sup3rs3cret"), "{text}");
        assert!(!text.contains("keygate_db"), "{text}");
        assert!(text.contains("connect"), "{text}");
    }

    #[tokio::test]
    async fn malformed_urls_do_not_echo_their_values() {
        let url = "postgres://keygate:sup3rs3cret@127.0.0.1:notaport/db";
        let Err(error) = PgStore::connect(url, 2, Duration::from_secs(2)).await else {
            panic!("accepted a malformed URL");
        };
        let text = error.to_string();
        assert!(!text.contains("sup3rs3cret"), "{text}");
        assert!(text.contains("port"), "{text}");
    }
}
