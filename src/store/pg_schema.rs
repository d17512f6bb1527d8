//! The PostgreSQL schema: its migrations, applied at start-up under an advisory lock so
//! that gateways starting together apply each exactly once.

use deadpool_postgres::Object;

use super::StoreError;

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
    // 2: what each key's quota has spent, in the period its stamp names (keys::quota).
    r#"
    ALTER TABLE usage
        ADD COLUMN quota_stamp bigint NOT NULL DEFAULT 0,
        ADD COLUMN quota_used bigint NOT NULL DEFAULT 0;
    "#,
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Applies every migration not applied yet, each in its own transaction holding the
/// migration advisory lock, so that instances starting at once wait for each other.
pub(super) async fn migrate(client: &mut Object) -> Result<(), StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one() {
        assert_eq!(SCHEMA_VERSION as usize, MIGRATIONS.len());
        assert!(MIGRATIONS.iter().all(|sql| !sql.trim().is_empty()));
    }
}
