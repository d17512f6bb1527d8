//! The shared store: PostgreSQL through a deadpool pool of tokio-postgres connections, so
//! that several gateway instances can serve one set of keys.
//!
//! Semantics are exactly those of `SledStore` (`tests/store_conformance.rs` runs one suite
//! against both):
//! - ids, owners and audit ids are `COLLATE "C"` columns, so listings and cursors use byte
//!   order exactly as sled does, whatever the database's default collation;
//! - usage is added by one batched upsert (`count = count + delta`, `last_used = GREATEST`),
//!   never a read-modify-write, so concurrent flushes from many instances lose nothing;
//! - revoke and expiry changes notify `keygate_invalidate` with the key's hash in the same
//!   transaction, and `run_invalidation_listener` turns those notifications into cache
//!   invalidations on every other instance.
//!
//! The schema is created and upgraded by `MIGRATIONS` at start-up, under an advisory lock,
//! so that instances starting together apply each migration exactly once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{AuditEntry, KeyStore, KeyWithUsage, ListQuery, StoreError};
use crate::keys::{KeyHash, KeyRecord, Usage};

/// The channel revokes and expiry changes notify, with the key's hash in hex as payload.
pub const INVALIDATION_CHANNEL: &str = "keygate_invalidate";

/// Advisory lock key held while migrating ("keygate" in ASCII).
const MIGRATION_LOCK: i64 = 0x006b_6579_6761_7465;

/// The schema, one entry per version (version = index + 1). Append only: an applied
/// migration is never edited, a change is a new entry.
const MIGRATIONS: &[&str] = &[
    // 1: keys (the record as JSON, plus the columns look-ups and listings need), usage
    // totals, the audit log. Only the SHA-256 of a key is ever stored, never the key.
    r#"
    CREATE TABLE keys (
        id text COLLATE "C" PRIMARY KEY,
        hash bytea NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
        owner text COLLATE "C" NOT NULL,
        record jsonb NOT NULL
    );
    CREATE INDEX keys_owner_id ON keys (owner, id);
    CREATE TABLE usage (
        key_id text COLLATE "C" PRIMARY KEY REFERENCES keys (id),
        count bigint NOT NULL,
        last_used bigint NOT NULL
    );
    CREATE TABLE audit (
        id text COLLATE "C" PRIMARY KEY,
        entry jsonb NOT NULL
    );
    "#,
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

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

/// `count` and `last_used` columns of a LEFT JOIN with `usage` (NULL = never used).
fn decode_usage(row: &Row, count: usize, last_used: usize) -> Result<Usage, StoreError> {
    let stored_count: Option<i64> = row.try_get(count).map_err(StoreError::corrupt)?;
    let stored_last: Option<i64> = row.try_get(last_used).map_err(StoreError::corrupt)?;
    Ok(Usage {
        count: u64::try_from(stored_count.unwrap_or(0)).map_err(StoreError::corrupt)?,
        last_used: stored_last.unwrap_or(0),
    })
}

fn decode_key_with_usage(row: &Row) -> Result<KeyWithUsage, StoreError> {
    Ok(KeyWithUsage {
        record: decode_record(row, 0)?,
        usage: decode_usage(row, 1, 2)?,
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

/// Applies every migration not applied yet, each in its own transaction holding the
/// migration advisory lock, so that instances starting at once wait for each other.
async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let version = index as i32 + 1;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS keygate_schema_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
        let applied = tx
            .query_opt(
                "SELECT 1 FROM keygate_schema_migrations WHERE version = $1",
                &[&version],
            )
            .await?
            .is_some();
        if !applied {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO keygate_schema_migrations (version, applied_at) VALUES ($1, now())",
                &[&version],
            )
            .await?;
            tracing::info!(version, "applied PostgreSQL schema migration");
        }
        tx.commit().await?;
    }
    let newest: Option<i32> = client
        .query_one("SELECT max(version) FROM keygate_schema_migrations", &[])
        .await?
        .try_get(0)
        .map_err(StoreError::corrupt)?;
    if newest.is_some_and(|v| v > SCHEMA_VERSION) {
        tracing::warn!(
            database = newest,
            known = SCHEMA_VERSION,
            "the PostgreSQL schema is newer than this build knows; running on it anyway"
        );
    }
    Ok(())
}

const SELECT_WITH_USAGE: &str = "SELECT k.record, u.count, u.last_used \
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
        // Without a conflict target, DO NOTHING covers both the id and the hash.
        let insert = client
            .prepare_cached(
                "INSERT INTO keys (id, hash, owner, record) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        let inserted = client
            .execute(
                &insert,
                &[&record.id, &&hash.0[..], &record.owner, &Json(record)],
            )
            .await?;
        if inserted == 0 {
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

    async fn add_usage(&self, deltas: &[(String, Usage)]) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(deltas.len());
        let mut counts = Vec::with_capacity(deltas.len());
        let mut last_used = Vec::with_capacity(deltas.len());
        // A key id with NUL cannot exist: like any unknown key's, its delta is dropped.
        for (id, delta) in deltas.iter().filter(|(id, _)| !has_nul(id)) {
            ids.push(id.as_str());
            counts.push(
                i64::try_from(delta.count).map_err(|_| {
                    StoreError::corrupt(format!("usage delta for {id} out of range"))
                })?,
            );
            last_used.push(delta.last_used);
        }
        if ids.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        // One statement, one transaction. Deltas of one id are summed first (an upsert may
        // touch a row only once), rows are locked in id order (no deadlock between
        // concurrent batches), and deltas of unknown keys are dropped (the foreign key
        // would refuse them; sled keeps them where nothing ever reads them).
        let upsert = client
            .prepare_cached(
                "INSERT INTO usage (key_id, count, last_used) \
                 SELECT d.key_id, sum(d.count)::bigint, max(d.last_used) \
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[]) \
                 AS d(key_id, count, last_used) \
                 WHERE EXISTS (SELECT 1 FROM keys k WHERE k.id = d.key_id) \
                 GROUP BY d.key_id \
                 ORDER BY d.key_id COLLATE \"C\" \
                 ON CONFLICT (key_id) DO UPDATE SET \
                 count = usage.count + EXCLUDED.count, \
                 last_used = GREATEST(usage.last_used, EXCLUDED.last_used)",
            )
            .await?;
        client
            .execute(&upsert, &[&ids, &counts, &last_used])
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

// ---------------------------------------------------------------------------------------
// Connecting: the options keygate adds to the connection string, `sslmode` and TLS. The
// pool and the invalidation listener connect through the same `Connector`.

/// What a statement gets before PostgreSQL cancels it, unless the config says otherwise.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How keygate connects to PostgreSQL beyond what the connection string says (`[store]`).
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub pool_size: usize,
    /// Bounds connecting and waiting for a free pooled connection.
    pub connect_timeout: Duration,
    /// Sent as `-c statement_timeout=<ms>` at connection start-up: every statement of every
    /// connection (pool and listener) is cancelled by the server past it.
    pub statement_timeout: Duration,
    /// DER certificates of the database's CA for `verify-ca`/`verify-full`; None = the
    /// system's roots.
    pub ca_certificates: Option<Vec<Vec<u8>>>,
}

impl PgOptions {
    /// The default statement timeout and the system's CA roots.
    pub fn new(pool_size: usize, connect_timeout: Duration) -> PgOptions {
        PgOptions {
            pool_size,
            connect_timeout,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            ca_certificates: None,
        }
    }
}

/// The defaults of `[store]`: 8 connections, 5 s to connect, 5 s per statement.
impl Default for PgOptions {
    fn default() -> Self {
        PgOptions::new(8, Duration::from_secs(5))
    }
}

/// The connection string's `sslmode`, with libpq's meanings (libpq's `allow` is not
/// supported). tokio-postgres knows only the first three and leaves certificate checks to
/// the TLS connector: keygate reads the mode itself, gives tokio-postgres the matching one
/// of its three, and checks certificates in its rustls verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, else plain; no certificate check (libpq's default).
    Prefer,
    /// TLS or no connection, but no certificate check: it encrypts, yet does not stop a man
    /// in the middle, who can present any certificate.
    Require,
    /// TLS, and the certificate chain must lead to the CA; the host name is not checked.
    VerifyCa,
    /// TLS, the chain must lead to the CA and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<SslMode, StoreError> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.name() == value)
            .ok_or_else(|| {
                StoreError::Io(format!(
                    "PostgreSQL connection URL: sslmode `{value}` is not supported (use \
                     disable, prefer, require, verify-ca or verify-full)"
                ))
            })
    }

    pub fn checks_certificates(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    fn transport(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Transport;
        match self {
            SslMode::Disable => Transport::Disable,
            SslMode::Prefer => Transport::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Transport::Require,
        }
    }
}

/// A refused certificate is most often the wrong `store.ca_file` or host name: say so.
fn with_tls_hint(error: StoreError, mode: SslMode) -> StoreError {
    match error {
        StoreError::Io(text) if mode.checks_certificates() && text.contains("certificate") => {
            StoreError::Io(format!(
                "{text} (sslmode={}: store.ca_file must hold the CA that signed the database's \
                 certificate{})",
                mode.name(),
                if mode == SslMode::VerifyFull {
                    ", and the certificate must name the host of the connection string"
                } else {
                    ""
                }
            ))
        }
        other => other,
    }
}

/// A parsed connection string with keygate's options applied, and the TLS connector its
/// `sslmode` asks for.
pub(super) struct Connector {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: MakeRustlsConnect,
    pub(super) mode: SslMode,
}

impl Connector {
    /// `application_name` is used unless the connection string names one.
    pub(super) fn new(
        url: &str,
        options: &PgOptions,
        application_name: &str,
    ) -> Result<Connector, StoreError> {
        let (rest, mode) = take_sslmode(url);
        let mode = mode
            .as_deref()
            .map_or(Ok(SslMode::Prefer), SslMode::parse)?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| StoreError::Io(format!("PostgreSQL connection URL: {}", describe(&e))))?;
        config.ssl_mode(mode.transport());
        if config.get_application_name().is_none() {
            config.application_name(application_name);
        }
        // After any `options` of the connection string, so that the configured bound wins.
        let timeout = format!(
            "-c statement_timeout={}",
            options.statement_timeout.as_millis()
        );
        let startup_options = match config.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {timeout}"),
            _ => timeout,
        };
        config.options(&startup_options);
        let tls = MakeRustlsConnect::new(tls_config(mode, options.ca_certificates.as_deref())?);
        Ok(Connector { config, tls, mode })
    }
}

/// Removes `sslmode` from a connection string (URL or `key=value` form) and returns the
/// rest and the last value given. Splits exactly where tokio-postgres's parsers do; a
/// string they would reject is returned whole, for them to report.
fn take_sslmode(url: &str) -> (String, Option<String>) {
    let split = match ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
    {
        Some(rest) => take_url_sslmode(url, rest),
        None => take_keyword_sslmode(url),
    };
    split.unwrap_or_else(|| (url.to_string(), None))
}

/// URL form: the query starts at the first `?` after the credentials (up to the first
/// `@`) and the host (up to the next `/` or `?`); parameters are `key=value` joined by `&`.
fn take_url_sslmode(url: &str, rest: &str) -> Option<(String, Option<String>)> {
    let after_credentials = rest.find('@').map_or(0, |at| at + 1);
    let tail = &rest[after_credentials..];
    let Some(question) = tail.find('?') else {
        return Some((url.to_string(), None));
    };
    let query_start = url.len() - tail.len() + question;
    let mut query = &url[query_start + 1..];
    let mut kept = Vec::new();
    let mut mode = None;
    while !query.is_empty() {
        let equals = query.find('=')?;
        let value_end = query[equals..]
            .find('&')
            .map_or(query.len(), |i| equals + i);
        if percent_decoded(&query[..equals]) == "sslmode" {
            mode = Some(percent_decoded(&query[equals + 1..value_end]));
        } else {
            kept.push(&query[..value_end]);
        }
        query = query.get(value_end + 1..).unwrap_or_default();
    }
    let mut out = url[..query_start].to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    Some((out, mode))
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key = value` form, values bare or in single quotes, `\` escaping the next character.
fn take_keyword_sslmode(text: &str) -> Option<(String, Option<String>)> {
    let mut chars = text.char_indices().peekable();
    let mut out = String::new();
    let mut mode = None;
    let mut kept_until = 0;
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        while chars
            .next_if(|(_, c)| !c.is_whitespace() && *c != '=')
            .is_some()
        {}
        let keyword_end = chars.peek().map_or(text.len(), |(i, _)| *i);
        if keyword_end == start {
            return None;
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        chars.next_if(|(_, c)| *c == '=')?;
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        loop {
            match chars.peek().map(|(_, c)| *c) {
                None if quoted => return None,
                None => break,
                Some('\'') if quoted => {
                    chars.next();
                    break;
                }
                Some(c) if c.is_whitespace() && !quoted => break,
                Some('\\') => {
                    chars.next();
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                Some(c) => {
                    chars.next();
                    value.push(c);
                }
            }
        }
        if value.is_empty() && !quoted {
            return None;
        }
        let end = chars.peek().map_or(text.len(), |(i, _)| *i);
        if &text[start..keyword_end] == "sslmode" {
            out.push_str(&text[kept_until..start]);
            kept_until = end;
            mode = Some(value);
        }
    }
    out.push_str(&text[kept_until..]);
    Some((out, mode))
}

/// rustls on ring (as Pingora's), with the verifier `mode` needs. Only `verify-ca` and
/// `verify-full` read roots: `ca_certificates`, else the system's.
fn tls_config(
    mode: SslMode,
    ca_certificates: Option<&[Vec<u8>]>,
) -> Result<rustls::ClientConfig, StoreError> {
    let tls_error = |e: rustls::Error| StoreError::Io(format!("PostgreSQL TLS set-up: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(LenientVerifier {
            roots: None,
            algorithms,
        }),
        SslMode::VerifyCa => Arc::new(LenientVerifier {
            roots: Some(root_store(ca_certificates)?),
            algorithms,
        }),
        SslMode::VerifyFull => {
            WebPkiServerVerifier::builder_with_provider(root_store(ca_certificates)?, provider)
                .build()
                .map_err(|e| StoreError::Io(format!("PostgreSQL TLS set-up: {e}")))?
        }
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What PostgreSQL 17 requires for `sslnegotiation=direct`; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

fn root_store(ca_certificates: Option<&[Vec<u8>]>) -> Result<Arc<RootCertStore>, StoreError> {
    let mut roots = RootCertStore::empty();
    match ca_certificates {
        Some(certificates) => {
            for der in certificates {
                roots
                    .add(CertificateDer::from(der.clone()))
                    .map_err(|e| StoreError::Io(format!("store.ca_file: {e}")))?;
            }
        }
        None => {
            let system = rustls_native_certs::load_native_certs().map_err(|e| {
                StoreError::Io(format!("cannot read the system's CA certificates: {e}"))
            })?;
            let (_added, _ignored) = roots.add_parsable_certificates(system);
        }
    }
    if roots.is_empty() {
        return Err(StoreError::Io(
            "sslmode verify-ca/verify-full needs CA certificates: none found on the system; \
             set store.ca_file"
                .to_string(),
        ));
    }
    Ok(Arc::new(roots))
}

/// `prefer` and `require` (no roots: any certificate is accepted) and `verify-ca` (the chain
/// must lead to a root; the name is not checked). Either way the server must prove it holds
/// the key of the certificate it shows.
#[derive(Debug)]
struct LenientVerifier {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for LenientVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one() {
        assert_eq!(SCHEMA_VERSION as usize, MIGRATIONS.len());
        assert!(MIGRATIONS.iter().all(|sql| !sql.trim().is_empty()));
    }

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

    #[test]
    fn sslmode_is_taken_out_of_both_forms_of_connection_string() {
        let cases = [
            ("postgres://u:p@h:5/db", "postgres://u:p@h:5/db", None),
            (
                "postgres://u:p@h:5/db?sslmode=verify-full",
                "postgres://u:p@h:5/db",
                Some("verify-full"),
            ),
            (
                "postgresql://h/db?application_name=a&sslmode=verify%2Dca&connect_timeout=3",
                "postgresql://h/db?application_name=a&connect_timeout=3",
                Some("verify-ca"),
            ),
            // A `?` or `sslmode=` inside the password is not the query.
            (
                "postgres://u:a?sslmode=x@h?sslmode=require",
                "postgres://u:a?sslmode=x@h",
                Some("require"),
            ),
            (
                "host=h sslmode=verify-full dbname=db",
                "host=h  dbname=db",
                Some("verify-full"),
            ),
            (
                "host=h password='a sslmode=x \\' b' sslmode = 'disable'",
                "host=h password='a sslmode=x \\' b' ",
                Some("disable"),
            ),
            ("host=h dbname=db", "host=h dbname=db", None),
            // Malformed: left whole for tokio-postgres to report.
            (
                "host=h sslmode='verify-full",
                "host=h sslmode='verify-full",
                None,
            ),
        ];
        for (url, rest, mode) in cases {
            assert_eq!(
                take_sslmode(url),
                (rest.to_string(), mode.map(str::to_string)),
                "{url}"
            );
        }
    }

    #[test]
    fn every_connection_gets_the_mode_and_the_statement_timeout() {
        use tokio_postgres::config::SslMode as Transport;
        let mut options = PgOptions::new(1, Duration::from_secs(1));
        options.statement_timeout = Duration::from_millis(1234);
        for (query, mode, transport) in [
            ("", SslMode::Prefer, Transport::Prefer),
            ("&sslmode=disable", SslMode::Disable, Transport::Disable),
            ("&sslmode=prefer", SslMode::Prefer, Transport::Prefer),
            ("&sslmode=require", SslMode::Require, Transport::Require),
            ("&sslmode=verify-ca", SslMode::VerifyCa, Transport::Require),
            (
                "&sslmode=verify-full",
                SslMode::VerifyFull,
                Transport::Require,
            ),
        ] {
            let url = format!("postgres://u@h/db?options=-c%20work_mem%3D4MB{query}");
            let connector = Connector::new(&url, &options, "test").expect("valid");
            assert_eq!(connector.mode, mode, "{url}");
            assert_eq!(connector.config.get_ssl_mode(), transport, "{url}");
            assert_eq!(
                connector.config.get_options(),
                Some("-c work_mem=4MB -c statement_timeout=1234"),
                "{url}"
            );
            assert_eq!(connector.config.get_application_name(), Some("test"));
        }
    }

    #[test]
    fn unsupported_sslmodes_are_refused_by_name() {
        let options = PgOptions::default();
        for mode in ["allow", "verify_full", ""] {
            let url = format!("postgres://u:sup3rs3cret@h/db?sslmode={mode}");
            let Err(error) = Connector::new(&url, &options, "test") else {
                panic!("accepted sslmode={mode}");
            };
            let text = error.to_string();
            assert!(text.contains("sslmode"), "{text}");
            assert!(!text.contains("sup3rs3cret"), "{text}");
        }
    }
}
