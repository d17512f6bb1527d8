//! Usage accounting end to end: exact counts while running, across a graceful stop, within
//! one flush interval across SIGKILL, and kept through store write failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use keygate::keys::{KeyFormat, KeyHash, KeyPatch, KeyRecord, Usage};
use keygate::store::{
    AuditEntry, KeyStore, KeyWithUsage, ListQuery, SledStore, StoreError, WarmSink,
};
use keygate::usage::UsageRecorder;

const ADMIN: &str = "test-admin-token-padded-to-32-ch";

/// Sends `total` requests with `key` over `connections` concurrent clients; returns the
/// completion time of each request.
async fn hammer(base: &str, key: &str, total: usize, connections: usize) -> Vec<Instant> {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let share = total / connections + usize::from(c < total % connections);
        let url = format!("{base}/work");
        let key = key.to_string();
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut done = Vec::with_capacity(share);
            for _ in 0..share {
                let resp = client
                    .get(&url)
                    .header("x-api-key", &key)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(resp.status(), 200);
                done.push(Instant::now());
            }
            done
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await.expect("client task"));
    }
    all
}

fn usage_via_cli(config: &GatewayConfig, id: &str) -> u64 {
    let out = keygate(&[
        "keys",
        "list",
        "--config",
        config.path().to_str().expect("path"),
    ]);
    assert!(
        out.status.success(),
        "store did not open cleanly: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON list");
    records
        .iter()
        .find(|r| r["id"] == id)
        .and_then(|r| r["usage_count"].as_u64())
        .expect("record with usage_count")
}

#[tokio::test]
async fn counts_are_exact_and_visible_at_once() {
    let upstream = Upstream::start("u").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    config.write();
    let (record, key) = create_key(&config.path(), "alice", &[], None);
    let id = record["id"].as_str().expect("id").to_string();
    let gateway = Gateway::start_with_env(&config, &[("KEYGATE_ADMIN_TOKEN", ADMIN)]).await;

    let n = 3000;
    let started = std::time::SystemTime::now();
    hammer(&gateway.base, &key, n, 8).await;
    let record = key_record(&gateway.base, ADMIN, &id).await;
    assert_eq!(record["usage_count"], n as u64);
    let last_used = record["last_used"].as_str().expect("last_used set");
    let last_used =
        time::OffsetDateTime::parse(last_used, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339");
    let started = time::OffsetDateTime::from(started);
    assert!(last_used >= started - Duration::from_secs(1));
    assert!(last_used <= time::OffsetDateTime::now_utc() + Duration::from_secs(1));
    assert_eq!(upstream.count(), n);
}

#[tokio::test]
async fn graceful_stop_writes_every_count() {
    let upstream = Upstream::start("u").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    // A flush interval far longer than the test: only the final flush can write the counts.
    config.flush_interval_ms = 600_000;
    config.write();
    let (record, key) = create_key(&config.path(), "alice", &[], None);
    let id = record["id"].as_str().expect("id").to_string();

    let mut gateway = Gateway::start(&config).await;
    let n = 1500;
    hammer(&gateway.base, &key, n, 4).await;
    assert!(gateway.stop(), "SIGTERM stop must exit 0");
    assert_eq!(usage_via_cli(&config, &id), n as u64);

    // And again with SIGINT, adding to the same key.
    let mut gateway = Gateway::start(&config).await;
    hammer(&gateway.base, &key, 500, 2).await;
    let pid = gateway.pid().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status();
    assert!(gateway.stop(), "SIGINT stop must exit 0");
    assert_eq!(usage_via_cli(&config, &id), (n + 500) as u64);
}

#[tokio::test]
async fn sigkill_loses_at_most_one_flush_interval() {
    let upstream = Upstream::start("u").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    config.write();
    let (record, key) = create_key(&config.path(), "alice", &[], None);
    let id = record["id"].as_str().expect("id").to_string();
    let flush_interval = Duration::from_millis(200);

    let mut gateway = Gateway::start(&config).await;
    let n = 2000;
    let done = hammer(&gateway.base, &key, n, 4).await;
    let killed_at = Instant::now();
    gateway.kill9();

    // Requests answered more than two intervals before the kill had a full flush after
    // them (one interval to the next tick, one for the flush itself to finish).
    let surely_flushed = done
        .iter()
        .filter(|t| killed_at.duration_since(**t) > flush_interval * 2)
        .count() as u64;
    let count = usage_via_cli(&config, &id);
    assert!(
        count <= n as u64,
        "counted {count} of {n}: never more than sent"
    );
    assert!(
        count >= surely_flushed,
        "counted {count}, but {surely_flushed} requests were older than two flush intervals"
    );

    // The store opens cleanly and the gateway serves again on it.
    let gateway = Gateway::start(&config).await;
    let resp = client()
        .get(format!("{}/again", gateway.base))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
}

/// A real sled store whose usage writes fail while `failing` is set: the flusher's error
/// path, driven by an injected writer error.
struct FlakyStore {
    inner: SledStore,
    failing: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl KeyStore for FlakyStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(record).await
    }
    async fn get(&self, id: &str) -> Result<Option<KeyWithUsage>, StoreError> {
        self.inner.get(id).await
    }
    async fn find_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.find_by_hash(hash).await
    }
    async fn stored_hashes(&self) -> Result<Vec<KeyHash>, StoreError> {
        self.inner.stored_hashes().await
    }
    async fn warm_set(&self, now: i64, limit: usize, out: WarmSink) -> Result<(), StoreError> {
        self.inner.warm_set(now, limit, out).await
    }
    async fn list(&self, query: ListQuery<'_>) -> Result<Vec<KeyWithUsage>, StoreError> {
        self.inner.list(query).await
    }
    async fn revoke(&self, id: &str, at: i64) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.revoke(id, at).await
    }
    async fn retire(&self, id: &str, at: i64) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.retire(id, at).await
    }
    async fn update(&self, id: &str, patch: &KeyPatch) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.update(id, patch).await
    }
    async fn purge(&self, before: i64, limit: usize) -> Result<Vec<KeyHash>, StoreError> {
        self.inner.purge(before, limit).await
    }
    async fn add_usage(&self, deltas: &[(String, Usage)]) -> Result<(), StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io("injected write failure".into()));
        }
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

fn record(id: &str) -> KeyRecord {
    let format = KeyFormat::new("kg");
    let raw = format.generate().expect("rng");
    KeyRecord {
        id: id.to_string(),
        ..KeyRecord::for_key(&format, &raw, "alice", 1)
    }
}

#[tokio::test]
async fn failed_flushes_keep_counts_until_the_store_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(FlakyStore {
        inner: SledStore::open(&dir.path().join("store")).expect("open"),
        failing: std::sync::atomic::AtomicBool::new(false),
    });
    let id = keygate::keys::new_key_id();
    let id_number = u128::from(ulid::Ulid::from_string(&id).expect("ulid"));
    store.insert(&record(&id)).await.expect("insert");
    let usage = UsageRecorder::new();

    for _ in 0..10 {
        usage.record(id_number, &id, 1_000, None);
    }
    store
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(usage.flush(store.as_ref()).await.is_err());
    // Counted while the store is down, then a second failed flush.
    for _ in 0..5 {
        usage.record(id_number, &id, 2_000, None);
    }
    assert!(usage.flush(store.as_ref()).await.is_err());
    assert_eq!(
        usage.pending_for(&id).count,
        15,
        "nothing lost while failing"
    );
    let stored = store.get(&id).await.expect("get").expect("record");
    assert_eq!(stored.usage.count, 0, "nothing written while failing");

    store
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    usage
        .flush(store.as_ref())
        .await
        .expect("flush after recovery");
    assert_eq!(usage.pending_for(&id).count, 0);
    let stored = store.get(&id).await.expect("get").expect("record");
    assert_eq!(stored.usage.count, 15, "written once, not doubled");
    assert_eq!(stored.usage.last_used, 2_000);

    // Another flush with nothing pending changes nothing.
    usage.flush(store.as_ref()).await.expect("empty flush");
    let stored = store.get(&id).await.expect("get").expect("record");
    assert_eq!(stored.usage.count, 15);
}

#[tokio::test]
async fn concurrent_recording_loses_nothing_across_flushes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<SledStore> = Arc::new(SledStore::open(&dir.path().join("s")).expect("open"));
    let id = keygate::keys::new_key_id();
    let id_number = u128::from(ulid::Ulid::from_string(&id).expect("ulid"));
    store.insert(&record(&id)).await.expect("insert");
    let usage = Arc::new(UsageRecorder::new());

    let writers: Vec<_> = (0..4)
        .map(|_| {
            let usage = Arc::clone(&usage);
            let id = id.clone();
            std::thread::spawn(move || {
                for i in 0..50_000 {
                    usage.record(id_number, &id, i, None);
                }
            })
        })
        .collect();
    // Flush repeatedly while the writers run.
    while writers.iter().any(|w| !w.is_finished()) {
        usage.flush(store.as_ref()).await.expect("flush");
    }
    for w in writers {
        w.join().expect("writer");
    }
    usage.flush(store.as_ref()).await.expect("final flush");
    let stored = store.get(&id).await.expect("get").expect("record");
    assert_eq!(stored.usage.count, 200_000);
    assert_eq!(stored.usage.last_used, 49_999);
}
