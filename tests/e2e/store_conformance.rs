//! One behaviour suite for every `KeyStore` backend: each check below is written once, as
//! an async function over `Arc<dyn KeyStore>`, and `conformance!` runs it against a
//! `SledStore` in a temp dir (`sled_backend::*`) and a `PgStore` on a fresh PostgreSQL
//! database (`postgres_backend::*`). `postgres_only` adds what only a shared store can do:
//! several instances on one database, and cross-instance cache invalidation.

use std::sync::Arc;
use std::time::Duration;

use keygate::keys::{
    KeyFormat, KeyHash, KeyPatch, KeyRecord, Quota, QuotaPeriod, QuotaUsage, RateLimit, Usage,
    new_key_id,
};
use keygate::store::{
    AuditEntry, KeyStore, KeyWithUsage, ListQuery, PgStore, StoreError, warm_set_list,
};

const POOL_SIZE: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh record (new ULID id, hash of a freshly generated key) for `owner`.
fn record(owner: &str) -> KeyRecord {
    let format = KeyFormat::new("kg");
    let raw = format.generate().expect("os rng");
    KeyRecord::for_key(&format, &raw, owner, 1_700_000_000)
}

fn record_with_id(id: &str, owner: &str) -> KeyRecord {
    KeyRecord {
        id: id.to_string(),
        ..record(owner)
    }
}

fn hash_of(record: &KeyRecord) -> KeyHash {
    record.key_hash().expect("a valid hash")
}

fn ids(list: &[KeyWithUsage]) -> Vec<&str> {
    list.iter().map(|k| k.record.id.as_str()).collect()
}

fn query<'a>(owner: Option<&'a str>, after: Option<&'a str>, limit: usize) -> ListQuery<'a> {
    ListQuery {
        owner,
        after,
        limit,
    }
}

async fn pg_store(url: &str) -> PgStore {
    PgStore::connect(url, POOL_SIZE, CONNECT_TIMEOUT)
        .await
        .expect("connecting to the test database")
}

/// Runs one check with a deadline, so that a store that hangs fails the test instead of
/// the whole run. (Seen once, before `SledStore` stopped using `flush_async`: two sled
/// checks stuck for 20 minutes in sled 0.34's known flush deadlock, spacejam/sled#1308.)
async fn bounded(name: &str, check: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(CHECK_DEADLINE, check).await.is_err() {
        panic!("{name} did not finish within {CHECK_DEADLINE:?}: the store hangs");
    }
}

const CHECK_DEADLINE: Duration = Duration::from_secs(120);

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sled_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("a temp dir");
                    let store = keygate::store::SledStore::open(dir.path()).expect("opening sled");
                    super::bounded(stringify!($name), super::$name(std::sync::Arc::new(store)))
                        .await;
                }
            )*
        }

        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let url = crate::common::pg::fresh_database();
                    let store = super::pg_store(&url).await;
                    super::bounded(stringify!($name), super::$name(std::sync::Arc::new(store)))
                        .await;
                }
            )*
        }
    };
}

conformance!(
    insert_get_and_find_by_hash_round_trip,
    duplicate_id_or_hash_is_refused,
    revoke_keeps_the_first_time,
    retire_marks_superseded_and_only_moves_expiry_earlier,
    list_orders_by_id_filters_by_owner_and_pages,
    add_usage_sums_counts_and_keeps_latest_use,
    quota_counts_add_within_a_period_and_restart_in_a_later_one,
    concurrent_add_usage_loses_nothing,
    count_counts_key_records,
    stored_hashes_are_every_stored_key_once,
    audit_is_newest_first_and_pages_with_before,
    ping_succeeds,
    update_applies_a_patch_in_place,
    update_leaves_revoked_and_rotated_keys_alone,
    purge_removes_only_long_dead_keys_in_batches,
    warm_set_is_live_keys_most_recently_used_first_then_newest,
);

async fn insert_get_and_find_by_hash_round_trip(store: Arc<dyn KeyStore>) {
    let mut full = record("alice");
    full.name = "CI – deploy ключ 🚀 \"quoted\"".to_string();
    full.scopes = vec!["read".to_string(), "write:all".to_string()];
    full.expires_at = Some(2_000_000_000);
    full.rate_limit = Some(RateLimit {
        requests: 10,
        window_seconds: 60,
    });
    full.metadata = serde_json::json!({
        "team": "core",
        "n": 3,
        "big": 9_007_199_254_740_993_u64,
        "nested": { "list": [1, 2.5, null, true, "x"] },
        "escaped-looking \\u0000": "C:\\u0000\\dir"
    })
    .as_object()
    .cloned();
    full.rotated_from = Some(new_key_id());
    let minimal = record("bob");

    store.insert(&full).await.expect("insert");
    store.insert(&minimal).await.expect("insert");

    for r in [&full, &minimal] {
        let got = store.get(&r.id).await.expect("get").expect("present");
        assert_eq!(
            got,
            KeyWithUsage {
                record: r.clone(),
                usage: Usage::default()
            }
        );
        let by_hash = store.find_by_hash(&hash_of(r)).await.expect("find");
        assert_eq!(by_hash.as_ref(), Some(r));
    }
    assert_eq!(store.get("no-such-id").await.expect("get"), None);
    assert_eq!(
        store
            .find_by_hash(&KeyHash::of(b"kg_never_issued"))
            .await
            .expect("find"),
        None
    );
}

async fn duplicate_id_or_hash_is_refused(store: Arc<dyn KeyStore>) {
    let original = record("alice");
    store.insert(&original).await.expect("insert");

    let same_id = record_with_id(&original.id, "bob");
    let result = store.insert(&same_id).await;
    assert!(matches!(result, Err(StoreError::Duplicate)), "{result:?}");

    let same_hash = KeyRecord {
        hash: original.hash.clone(),
        ..record("bob")
    };
    let result = store.insert(&same_hash).await;
    assert!(matches!(result, Err(StoreError::Duplicate)), "{result:?}");

    // Nothing of the refused records was written.
    assert_eq!(store.count().await.expect("count"), 1);
    let kept = store
        .get(&original.id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(kept.record, original);
    assert_eq!(store.get(&same_hash.id).await.expect("get"), None);
    assert!(
        store
            .list(query(Some("bob"), None, 10))
            .await
            .expect("list")
            .is_empty()
    );

    let no_hash = KeyRecord {
        hash: "not a hash".to_string(),
        ..record("carol")
    };
    let result = store.insert(&no_hash).await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    assert_eq!(store.count().await.expect("count"), 1);
}

/// PATCH's store half: each field set, optional ones removed with `Some(None)`, the rest
/// kept; the record read back by id and by hash is the one returned; usage untouched.
const MONTHLY: Quota = Quota {
    requests: 10_000,
    period: QuotaPeriod::Month,
};

async fn update_applies_a_patch_in_place(store: Arc<dyn KeyStore>) {
    let mut key = record("alice");
    key.expires_at = Some(2_000_000_000);
    key.metadata = serde_json::json!({"team": "core"}).as_object().cloned();
    store.insert(&key).await.expect("insert");
    let other = record("alice");
    store.insert(&other).await.expect("insert");
    let usage = Usage {
        count: 3,
        last_used: 1_700_000_100,
        ..Default::default()
    };
    store
        .add_usage(&[(key.id.clone(), usage)])
        .await
        .expect("usage");

    let patch = KeyPatch {
        name: Some("renamed ключ".into()),
        scopes: Some(vec!["read".into(), "write".into()]),
        metadata: Some(
            serde_json::json!({"plan": "pro", "n": 1})
                .as_object()
                .cloned(),
        ),
        rate_limit: Some(Some(RateLimit {
            requests: 5,
            window_seconds: 10,
        })),
        expires_at: Some(None),
        allowed_ips: Some(vec!["10.0.0.0/8".into(), "2001:db8::/32".into()]),
        quota: Some(Some(MONTHLY)),
        refill_quota: false,
    };
    let updated = store
        .update(&key.id, &patch)
        .await
        .expect("update")
        .expect("present");
    let mut expected = key.clone();
    assert!(expected.apply(&patch));
    assert_eq!(updated, expected);
    assert_eq!(updated.name, "renamed ключ");
    assert_eq!(updated.expires_at, None);
    assert_eq!(updated.allowed_ips, ["10.0.0.0/8", "2001:db8::/32"]);
    assert_eq!((updated.quota, updated.quota_revision), (Some(MONTHLY), 1));
    let stored = store.get(&key.id).await.expect("get").expect("present");
    assert_eq!((stored.record, stored.usage), (expected.clone(), usage));
    let by_hash = store.find_by_hash(&hash_of(&key)).await.expect("find");
    assert_eq!(by_hash, Some(expected.clone()));

    // Removals, and a field left out is kept.
    let removal = KeyPatch {
        metadata: Some(None),
        rate_limit: Some(None),
        allowed_ips: Some(Vec::new()),
        ..KeyPatch::default()
    };
    let removed = store
        .update(&key.id, &removal)
        .await
        .expect("update")
        .expect("present");
    assert_eq!(
        (
            removed.metadata,
            removed.rate_limit,
            removed.allowed_ips.len()
        ),
        (None, None, 0)
    );
    assert_eq!(removed.name, "renamed ключ");
    assert_eq!(removed.scopes, ["read", "write"]);

    let untouched = store.get(&other.id).await.expect("get").expect("present");
    assert_eq!(untouched.record, other);
    assert_eq!(
        store.update("no-such-id", &patch).await.expect("update"),
        None
    );
    let with_nul = format!("{}\0", key.id);
    assert_eq!(store.update(&with_nul, &patch).await.expect("update"), None);
    assert_eq!(store.count().await.expect("count"), 2);
}

/// A revoked or rotated key is returned as it stands, unchanged, so that the caller can
/// answer 409 even when the revoke raced the patch.
async fn update_leaves_revoked_and_rotated_keys_alone(store: Arc<dyn KeyStore>) {
    let patch = KeyPatch {
        name: Some("changed".into()),
        scopes: Some(vec!["admin".into()]),
        ..KeyPatch::default()
    };
    let revoked = record("alice");
    store.insert(&revoked).await.expect("insert");
    let revoked_now = store.revoke(&revoked.id, 50).await.expect("revoke");
    let answer = store.update(&revoked.id, &patch).await.expect("update");
    assert_eq!(answer, revoked_now);
    let stored = store.get(&revoked.id).await.expect("get").expect("present");
    assert_eq!(
        (stored.record.name.as_str(), stored.record.scopes.len()),
        ("default", 0)
    );

    let rotated = record("alice");
    store.insert(&rotated).await.expect("insert");
    let retired = store.retire(&rotated.id, 60).await.expect("retire");
    let answer = store.update(&rotated.id, &patch).await.expect("update");
    assert_eq!(answer, retired);
    assert!(answer.is_some_and(|r| r.superseded && r.name == "default"));
}

/// Keys revoked or expired before the cut-off go, with their usage, a batch at a time;
/// live keys, keys that died later and the audit log stay.
async fn purge_removes_only_long_dead_keys_in_batches(store: Arc<dyn KeyStore>) {
    let live = record("alice");
    let revoked_early = record("alice");
    let expired_early = KeyRecord {
        expires_at: Some(200),
        ..record("bob")
    };
    let revoked_late = record("alice");
    let expires_later = KeyRecord {
        expires_at: Some(5_000),
        ..record("bob")
    };
    for key in [
        &live,
        &revoked_early,
        &expired_early,
        &revoked_late,
        &expires_later,
    ] {
        store.insert(key).await.expect("insert");
    }
    store.revoke(&revoked_early.id, 100).await.expect("revoke");
    store.revoke(&revoked_late.id, 5_000).await.expect("revoke");
    let usage = Usage {
        count: 1,
        last_used: 150,
        ..Default::default()
    };
    store
        .add_usage(&[(revoked_early.id.clone(), usage)])
        .await
        .expect("usage");
    let entry = AuditEntry {
        id: new_key_id(),
        actor: "admin".into(),
        action: "revoke".into(),
        key_id: Some(revoked_early.id.clone()),
        at: 100,
        client: None,
    };
    store.append_audit(&entry).await.expect("audit");

    let first = store.purge(1_000, 1).await.expect("purge");
    let second = store.purge(1_000, 1).await.expect("purge");
    let third = store.purge(1_000, 1).await.expect("purge");
    let mut purged = [first, second].concat();
    purged.sort_by_key(|h| h.0);
    let mut expected = vec![hash_of(&revoked_early), hash_of(&expired_early)];
    expected.sort_by_key(|h| h.0);
    assert_eq!(purged, expected);
    assert!(third.is_empty());
    for gone in [&revoked_early, &expired_early] {
        assert_eq!(store.get(&gone.id).await.expect("get"), None);
        assert_eq!(
            store.find_by_hash(&hash_of(gone)).await.expect("find"),
            None
        );
    }
    let left = store.list(query(None, None, 100)).await.expect("list");
    let mut want = vec![
        live.id.as_str(),
        revoked_late.id.as_str(),
        expires_later.id.as_str(),
    ];
    want.sort();
    assert_eq!(ids(&left), want);
    assert_eq!(store.count().await.expect("count"), 3);
    assert_eq!(store.stored_hashes().await.expect("hashes").len(), 3);
    assert_eq!(store.list_audit(None, 10).await.expect("audit"), [entry]);
    // The id is free again, and a re-inserted record starts without the old usage.
    store.insert(&revoked_early).await.expect("insert again");
    let again = store
        .get(&revoked_early.id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(again.usage, Usage::default());
}

async fn revoke_keeps_the_first_time(store: Arc<dyn KeyStore>) {
    let key = record("alice");
    let other = record("alice");
    store.insert(&key).await.expect("insert");
    store.insert(&other).await.expect("insert");

    let first = store.revoke(&key.id, 100).await.expect("revoke");
    let expected = KeyRecord {
        revoked_at: Some(100),
        ..key.clone()
    };
    assert_eq!(first.as_ref(), Some(&expected));

    let second = store.revoke(&key.id, 200).await.expect("revoke again");
    assert_eq!(
        second.as_ref(),
        Some(&expected),
        "the first revoked_at stays"
    );

    let stored = store.get(&key.id).await.expect("get").expect("present");
    assert_eq!(stored.record, expected);
    assert_eq!(
        store.find_by_hash(&hash_of(&key)).await.expect("find"),
        Some(expected)
    );
    let untouched = store.get(&other.id).await.expect("get").expect("present");
    assert_eq!(untouched.record.revoked_at, None);

    assert_eq!(store.revoke("no-such-id", 1).await.expect("revoke"), None);
    // Ids from the outside (URL paths) may hold anything, NUL included.
    let with_nul = format!("{}\0", key.id);
    assert_eq!(store.revoke(&with_nul, 1).await.expect("revoke"), None);
    assert_eq!(store.get(&with_nul).await.expect("get"), None);
    assert_eq!(store.retire(&with_nul, 1).await.expect("expire"), None);
    assert_eq!(store.count().await.expect("count"), 2);
}

async fn retire_marks_superseded_and_only_moves_expiry_earlier(store: Arc<dyn KeyStore>) {
    let open_ended = record("alice");
    let dated = KeyRecord {
        expires_at: Some(1_000),
        ..record("alice")
    };
    store.insert(&open_ended).await.expect("insert");
    store.insert(&dated).await.expect("insert");

    let expiry = |r: Option<KeyRecord>| r.expect("known key").expires_at;
    assert_eq!(
        expiry(store.retire(&open_ended.id, 500).await.expect("e")),
        Some(500)
    );
    assert_eq!(
        expiry(store.retire(&open_ended.id, 600).await.expect("e")),
        Some(500),
        "never later"
    );
    assert_eq!(
        expiry(store.retire(&open_ended.id, 400).await.expect("e")),
        Some(400)
    );
    assert_eq!(
        expiry(store.retire(&open_ended.id, 400).await.expect("e")),
        Some(400)
    );
    assert_eq!(
        expiry(store.retire(&dated.id, 2_000).await.expect("e")),
        Some(1_000)
    );
    // Retiring marks the key superseded, durably, even when its expiry was already earlier.
    let stored = store.get(&dated.id).await.expect("get").expect("record");
    assert!(stored.record.superseded);
    assert_eq!(stored.record.expires_at, Some(1_000));
    assert_eq!(
        expiry(store.retire(&dated.id, 999).await.expect("e")),
        Some(999)
    );

    let stored = store
        .get(&open_ended.id)
        .await
        .expect("get")
        .expect("present");
    assert_eq!(
        stored.record,
        KeyRecord {
            expires_at: Some(400),
            superseded: true,
            ..open_ended.clone()
        }
    );

    // Expiry and revocation are independent.
    store.revoke(&dated.id, 50).await.expect("revoke");
    let both = store
        .retire(&dated.id, 10)
        .await
        .expect("e")
        .expect("known");
    assert_eq!((both.expires_at, both.revoked_at), (Some(10), Some(50)));

    assert_eq!(store.retire("no-such-id", 1).await.expect("e"), None);
}

async fn list_orders_by_id_filters_by_owner_and_pages(store: Arc<dyn KeyStore>) {
    // Ids chosen so that byte order differs from most human collations ("K-_" < "K-a",
    // "K-B" < "K-a", "K-10" < "K-9"), and owners that are prefixes of each other.
    let layout = [
        ("alice", "K-a"),
        ("bob", "K-B"),
        ("alice", "K-A"),
        ("alice", "K-_"),
        ("ali", "K-0"),
        ("bob", "K-b"),
        ("alice", "K-10"),
        ("alice", "K-9"),
        ("alicee", "K-Z"),
        ("bob", "K-~"),
    ];
    let mut records = Vec::new();
    for (owner, id) in layout {
        let r = record_with_id(id, owner);
        store.insert(&r).await.expect("insert");
        records.push(r);
    }

    store
        .add_usage(&[(
            "K-A".to_string(),
            Usage {
                count: 4,
                last_used: 77,
                ..Default::default()
            },
        )])
        .await
        .expect("usage");

    let all = store.list(query(None, None, 100)).await.expect("list");
    assert_eq!(ids(&all), sorted_ids(&records, None));
    for entry in &all {
        let original = records
            .iter()
            .find(|r| r.id == entry.record.id)
            .expect("known");
        assert_eq!(&entry.record, original);
        let expected_usage = if entry.record.id == "K-A" {
            Usage {
                count: 4,
                last_used: 77,
                ..Default::default()
            }
        } else {
            Usage::default()
        };
        assert_eq!(entry.usage, expected_usage, "{}", entry.record.id);
    }

    assert_owner_filter(&*store, &records).await;

    assert_pages_match(&*store, &records).await;

    assert_cursors_compare_as_bytes(&*store, &records).await;
}

/// The ids of `records` of `owner` (all with None), in byte order.
fn sorted_ids<'a>(records: &'a [KeyRecord], owner: Option<&str>) -> Vec<&'a str> {
    let mut ids: Vec<&str> = records
        .iter()
        .filter(|r| owner.is_none_or(|o| r.owner == o))
        .map(|r| r.id.as_str())
        .collect();
    ids.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    ids
}

/// A cursor need not be an existing id; it is compared as bytes; limits 0 and usize::MAX.
async fn assert_cursors_compare_as_bytes(store: &dyn KeyStore, records: &[KeyRecord]) {
    // A cursor need not be an existing id; it is compared as bytes.
    let after_gap = store
        .list(query(None, Some("K-1"), 100))
        .await
        .expect("list");
    let expected: Vec<&str> = sorted_ids(records, None)
        .into_iter()
        .filter(|id| id.as_bytes() > b"K-1".as_slice())
        .collect();
    assert_eq!(ids(&after_gap), expected);
    // A cursor with NUL: "K-\0" sorts before every "K-..." id, "K-A\0" right after "K-A".
    let after_nul = store
        .list(query(None, Some("K-\0"), 100))
        .await
        .expect("list");
    assert_eq!(ids(&after_nul), sorted_ids(records, None));
    let after_a_nul = store
        .list(query(Some("alice"), Some("K-A\0"), 100))
        .await
        .expect("list");
    assert_eq!(ids(&after_a_nul), ["K-_", "K-a"]);
    let after_alice = store
        .list(query(Some("alice"), Some("K-B"), 100))
        .await
        .expect("list");
    assert_eq!(ids(&after_alice), ["K-_", "K-a"]);
    assert!(
        store
            .list(query(Some("alice"), Some("K-a"), 100))
            .await
            .expect("list")
            .is_empty()
    );
    assert!(
        store
            .list(query(None, Some("K-~"), 100))
            .await
            .expect("list")
            .is_empty()
    );
    assert!(
        store
            .list(query(None, None, 0))
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(
        store
            .list(query(None, None, usize::MAX))
            .await
            .expect("list")
            .len(),
        records.len()
    );
}

/// Paging with every limit gives the same sequence, each page full but the last.
async fn assert_pages_match(store: &dyn KeyStore, records: &[KeyRecord]) {
    // Paging with every limit gives the same sequence, each page full but the last.
    for owner in [None, Some("alice"), Some("bob")] {
        let expected = sorted_ids(records, owner);
        for limit in [1, 2, 3, 4, 100] {
            let mut seen: Vec<String> = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = store
                    .list(query(owner, after.as_deref(), limit))
                    .await
                    .expect("page");
                assert!(page.len() <= limit);
                if page.is_empty() {
                    break;
                }
                let full = page.len() == limit;
                seen.extend(page.iter().map(|k| k.record.id.clone()));
                after = seen.last().cloned();
                if !full {
                    break;
                }
            }
            assert_eq!(seen, expected, "owner {owner:?}, limit {limit}");
        }
    }
}

/// Each owner lists exactly its keys (owners that are prefixes of each other included); other
/// owners, near misses among them, list nothing.
async fn assert_owner_filter(store: &dyn KeyStore, records: &[KeyRecord]) {
    for owner in ["alice", "bob", "ali", "alicee"] {
        let listed = store
            .list(query(Some(owner), None, 100))
            .await
            .expect("list");
        assert_eq!(
            ids(&listed),
            sorted_ids(records, Some(owner)),
            "owner {owner}"
        );
        assert!(listed.iter().all(|k| k.record.owner == owner));
    }
    for owner in ["nobody", "", "al", "ALICE", "alice\u{0}"] {
        let listed = store
            .list(query(Some(owner), None, 100))
            .await
            .expect("list");
        assert!(listed.is_empty(), "owner {owner:?} got {:?}", ids(&listed));
    }
}

/// What a key's quota spent is kept per stamp (period and revision): deltas of one stamp
/// add up, a later stamp starts again, an earlier one (a late flush from yesterday) is
/// dropped; within one batch too.
async fn quota_counts_add_within_a_period_and_restart_in_a_later_one(store: Arc<dyn KeyStore>) {
    let key = record("alice");
    store.insert(&key).await.expect("insert");
    let spent = |stamp, used| Usage {
        count: used,
        last_used: 1,
        quota: QuotaUsage { stamp, used },
    };
    let usage_of = || {
        let store = Arc::clone(&store);
        let id = key.id.clone();
        async move { store.get(&id).await.expect("get").expect("present").usage }
    };
    let add = |deltas: Vec<Usage>| {
        let store = Arc::clone(&store);
        let batch: Vec<(String, Usage)> = deltas.into_iter().map(|d| (key.id.clone(), d)).collect();
        async move { store.add_usage(&batch).await.expect("usage") }
    };
    add(vec![spent(7, 3)]).await;
    add(vec![spent(7, 2)]).await;
    assert_eq!(usage_of().await.quota, QuotaUsage { stamp: 7, used: 5 });
    add(vec![spent(8, 1)]).await;
    assert_eq!(usage_of().await.quota, QuotaUsage { stamp: 8, used: 1 });
    add(vec![spent(7, 9)]).await;
    assert_eq!(
        usage_of().await.quota,
        QuotaUsage { stamp: 8, used: 1 },
        "a late flush of an older period"
    );
    add(vec![spent(9, 4), spent(8, 100), spent(9, 1)]).await;
    assert_eq!(usage_of().await.quota, QuotaUsage { stamp: 9, used: 5 });
    let usage = usage_of().await;
    assert_eq!(
        usage.count,
        3 + 2 + 1 + 9 + 4 + 100 + 1,
        "counts still add up"
    );
}

/// The cache warm-up's set: used keys by latest use, then never-used keys by id (newest
/// first), revoked and expired keys left out, cut at the limit, each with its usage.
async fn warm_set_is_live_keys_most_recently_used_first_then_newest(store: Arc<dyn KeyStore>) {
    const NOW: i64 = 1_800_000_000;
    let key = |id: &str, expires_at: Option<i64>| KeyRecord {
        expires_at,
        ..record_with_id(id, "alice")
    };
    let records = [
        key("k1-oldest-unused", Some(NOW + 60)),
        key("k2-used-long-ago", None),
        key("k3-used-lately", None),
        key("k4-revoked", None),
        key("k5-expired", Some(NOW - 1)),
        key("k6-unused", None),
        key("k7-newest-unused", None),
    ];
    for r in &records {
        store.insert(r).await.expect("insert");
    }
    let usage = |count, last_used| Usage {
        count,
        last_used,
        ..Default::default()
    };
    store
        .add_usage(&[
            ("k2-used-long-ago".into(), usage(7, NOW - 5000)),
            ("k3-used-lately".into(), usage(2, NOW - 10)),
            ("k4-revoked".into(), usage(9, NOW - 1)),
            ("k5-expired".into(), usage(1, NOW - 2)),
        ])
        .await
        .expect("usage");
    store.revoke("k4-revoked", NOW - 1).await.expect("revoke");

    let all = warm_set_list(store.as_ref(), NOW, 100)
        .await
        .expect("warm set");
    assert_eq!(
        ids(&all),
        [
            "k3-used-lately",
            "k2-used-long-ago",
            "k7-newest-unused",
            "k6-unused",
            "k1-oldest-unused"
        ]
    );
    assert_eq!(all[0].usage, usage(2, NOW - 10));
    assert_eq!(all[1].usage, usage(7, NOW - 5000));
    assert_eq!(all[2].usage, Usage::default());
    assert_eq!(all[0].record, records[2], "the record as stored");

    let first = warm_set_list(store.as_ref(), NOW, 1)
        .await
        .expect("warm set");
    assert_eq!(ids(&first), ["k3-used-lately"]);
    let three = warm_set_list(store.as_ref(), NOW, 3)
        .await
        .expect("warm set");
    assert_eq!(
        ids(&three),
        ["k3-used-lately", "k2-used-long-ago", "k7-newest-unused"]
    );
    assert!(
        warm_set_list(store.as_ref(), NOW, 0)
            .await
            .expect("warm set")
            .is_empty()
    );
    assert_eq!(
        ids(&warm_set_list(store.as_ref(), NOW + 61, 100)
            .await
            .expect("warm set")),
        [
            "k3-used-lately",
            "k2-used-long-ago",
            "k7-newest-unused",
            "k6-unused"
        ],
        "a key is left out once it has expired"
    );
}

async fn add_usage_sums_counts_and_keeps_latest_use(store: Arc<dyn KeyStore>) {
    let a = record("alice");
    let b = record("alice");
    let idle = record("alice");
    for r in [&a, &b, &idle] {
        store.insert(r).await.expect("insert");
    }
    let usage = |count, last_used| Usage {
        count,
        last_used,
        ..Default::default()
    };
    let usage_of = |id: String| {
        let store = Arc::clone(&store);
        async move { store.get(&id).await.expect("get").expect("present").usage }
    };

    store
        .add_usage(&[(a.id.clone(), usage(3, 100)), (b.id.clone(), usage(1, 50))])
        .await
        .expect("usage");
    assert_eq!(usage_of(a.id.clone()).await, usage(3, 100));
    assert_eq!(usage_of(b.id.clone()).await, usage(1, 50));

    store
        .add_usage(&[(a.id.clone(), usage(2, 90))])
        .await
        .expect("usage");
    assert_eq!(
        usage_of(a.id.clone()).await,
        usage(5, 100),
        "an older last_used does not win"
    );

    store
        .add_usage(&[(a.id.clone(), usage(0, 200))])
        .await
        .expect("usage");
    assert_eq!(usage_of(a.id.clone()).await, usage(5, 200));

    // The same id twice in one batch, and a delta for a key that does not exist.
    store
        .add_usage(&[
            (a.id.clone(), usage(1, 10)),
            ("no-such-id".to_string(), usage(7, 7)),
            (a.id.clone(), usage(1, 300)),
        ])
        .await
        .expect("usage");
    assert_eq!(usage_of(a.id.clone()).await, usage(7, 300));
    assert_eq!(store.get("no-such-id").await.expect("get"), None);

    store.add_usage(&[]).await.expect("an empty batch");
    store
        .add_usage(&[(format!("{}\0", a.id), usage(1, 999))])
        .await
        .expect("a delta for an impossible id");

    assert_eq!(usage_of(b.id.clone()).await, usage(1, 50));
    assert_eq!(usage_of(idle.id.clone()).await, Usage::default());
    let listed = store
        .list(query(Some("alice"), None, 10))
        .await
        .expect("list");
    let listed_usage = |id: &str| {
        listed
            .iter()
            .find(|k| k.record.id == id)
            .map(|k| k.usage)
            .expect("listed")
    };
    assert_eq!(listed_usage(&a.id), usage(7, 300));
    assert_eq!(listed_usage(&b.id), usage(1, 50));
    assert_eq!(listed_usage(&idle.id), Usage::default());

    // Usage does not touch the record.
    assert_eq!(
        store
            .get(&a.id)
            .await
            .expect("get")
            .expect("present")
            .record,
        a
    );
}

async fn concurrent_add_usage_loses_nothing(store: Arc<dyn KeyStore>) {
    const TASKS: i64 = 8;
    const CALLS: i64 = 100;
    let a = record("alice");
    let b = record("alice");
    store.insert(&a).await.expect("insert");
    store.insert(&b).await.expect("insert");

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        let (a, b) = (a.id.clone(), b.id.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..CALLS {
                let mut batch = vec![
                    (
                        a.clone(),
                        Usage {
                            count: 1,
                            last_used: t * 1_000 + i,
                            ..Default::default()
                        },
                    ),
                    (
                        b.clone(),
                        Usage {
                            count: 2,
                            last_used: i,
                            ..Default::default()
                        },
                    ),
                ];
                // Half the tasks name the keys in the other order: no deadlocks either way.
                if t % 2 == 1 {
                    batch.reverse();
                }
                store.add_usage(&batch).await.expect("usage");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }

    let total = |id: String| {
        let store = Arc::clone(&store);
        async move { store.get(&id).await.expect("get").expect("present").usage }
    };
    assert_eq!(
        total(a.id.clone()).await,
        Usage {
            count: (TASKS * CALLS) as u64,
            last_used: (TASKS - 1) * 1_000 + CALLS - 1,
            ..Default::default()
        }
    );
    assert_eq!(
        total(b.id.clone()).await,
        Usage {
            count: (2 * TASKS * CALLS) as u64,
            last_used: CALLS - 1,
            ..Default::default()
        }
    );
}

async fn count_counts_key_records(store: Arc<dyn KeyStore>) {
    assert_eq!(store.count().await.expect("count"), 0);
    let mut first = None;
    for _ in 0..5 {
        let r = record("alice");
        store.insert(&r).await.expect("insert");
        first.get_or_insert(r);
    }
    assert_eq!(store.count().await.expect("count"), 5);
    let first = first.expect("inserted");
    assert!(store.insert(&first).await.is_err());
    store.revoke(&first.id, 1).await.expect("revoke");
    store.retire(&first.id, 1).await.expect("expire");
    store
        .add_usage(&[(
            first.id.clone(),
            Usage {
                count: 1,
                last_used: 1,
                ..Default::default()
            },
        )])
        .await
        .expect("usage");
    store
        .append_audit(&AuditEntry {
            id: new_key_id(),
            actor: "admin".to_string(),
            action: "revoke".to_string(),
            key_id: Some(first.id.clone()),
            at: 1,
            client: None,
        })
        .await
        .expect("audit");
    assert_eq!(store.count().await.expect("count"), 5);
}

/// What the key filter is built from: every key, revoked and retired ones included.
async fn stored_hashes_are_every_stored_key_once(store: Arc<dyn KeyStore>) {
    assert!(store.stored_hashes().await.expect("hashes").is_empty());
    let records: Vec<KeyRecord> = (0..25)
        .map(|i| record(if i % 2 == 0 { "alice" } else { "bob" }))
        .collect();
    for r in &records {
        store.insert(r).await.expect("insert");
    }
    store.revoke(&records[0].id, 1).await.expect("revoke");
    store.retire(&records[1].id, 1).await.expect("retire");
    assert!(store.insert(&records[2]).await.is_err(), "a duplicate");
    let mut stored = store.stored_hashes().await.expect("hashes");
    stored.sort();
    let mut expected: Vec<KeyHash> = records.iter().map(hash_of).collect();
    expected.sort();
    assert_eq!(stored, expected);
}

async fn audit_is_newest_first_and_pages_with_before(store: Arc<dyn KeyStore>) {
    let entry = |i: usize| AuditEntry {
        id: format!("A{i:04}"),
        actor: if i.is_multiple_of(2) {
            "admin".to_string()
        } else {
            format!("key:K{i}")
        },
        action: ["create", "revoke", "rotate"][i % 3].to_string(),
        key_id: (!i.is_multiple_of(3)).then(|| format!("K{i}")),
        at: 1_700_000_000 + i as i64,
        client: (i % 2 == 1).then(|| "203.0.113.7".to_string()),
    };
    assert!(store.list_audit(None, 10).await.expect("audit").is_empty());
    // Appended out of order: listing goes by id, not by arrival.
    for i in [3, 0, 9, 1, 4, 8, 2, 7, 5, 6] {
        store.append_audit(&entry(i)).await.expect("append");
    }
    let newest_first: Vec<AuditEntry> = (0..10).rev().map(entry).collect();

    assert_eq!(
        store.list_audit(None, 100).await.expect("audit"),
        newest_first
    );
    assert_eq!(
        store.list_audit(None, 3).await.expect("audit"),
        newest_first[..3]
    );

    for limit in [1, 3, 4, 10] {
        let mut seen = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let page = store
                .list_audit(before.as_deref(), limit)
                .await
                .expect("page");
            assert!(page.len() <= limit);
            if page.is_empty() {
                break;
            }
            before = page.last().map(|e| e.id.clone());
            seen.extend(page);
        }
        assert_eq!(seen, newest_first, "limit {limit}");
    }

    assert_eq!(
        store.list_audit(Some("A0005"), 100).await.expect("audit"),
        newest_first[5..]
    );
    assert_eq!(
        store.list_audit(Some("B"), 2).await.expect("audit"),
        newest_first[..2]
    );
    assert_eq!(
        store.list_audit(Some("A0005\0"), 100).await.expect("audit"),
        newest_first[4..],
        "A0005 < A0005\\0"
    );
    assert!(
        store
            .list_audit(Some("A0000"), 10)
            .await
            .expect("audit")
            .is_empty()
    );
    assert!(store.list_audit(None, 0).await.expect("audit").is_empty());

    // Both backends: an id appended again replaces its entry.
    let replacement = AuditEntry {
        action: "replaced".to_string(),
        ..entry(4)
    };
    store.append_audit(&replacement).await.expect("append");
    let listed = store.list_audit(Some("A0005"), 1).await.expect("audit");
    assert_eq!(listed, [replacement]);
    assert_eq!(store.list_audit(None, 100).await.expect("audit").len(), 10);
}

async fn ping_succeeds(store: Arc<dyn KeyStore>) {
    store.ping().await.expect("ping");
}

mod postgres_only {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use keygate::keys::{KeyHash, KeyRecord, Usage};
    use keygate::store::invalidation::run_listener as run_invalidation_listener;
    use keygate::store::postgres::SCHEMA_VERSION;
    use keygate::store::{CacheSettings, KeyCache, KeyStore, LookupSource, PgStore};
    use tokio::sync::watch;
    use tokio::task::JoinHandle;

    use super::{hash_of, pg_store, record};

    async fn sql_client(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("a direct connection");
        tokio::spawn(connection);
        client
    }

    fn index_over(store: PgStore) -> Arc<KeyCache> {
        Arc::new(KeyCache::new(
            Arc::new(store),
            CacheSettings {
                capacity: 10_000,
                ttl: Duration::from_secs(600),
                negative_capacity: 10_000,
                negative_ttl: Duration::from_secs(600),
                max_store_reads: 4,
                store_read_wait: Duration::from_secs(5),
            },
        ))
    }

    fn is_cached(index: &KeyCache, hash: &KeyHash) -> bool {
        index.cached(hash).is_some_and(|r| r.key.is_some())
    }

    /// Resolves `hash` through `index` until it is a cache hit. A fill that races with any
    /// invalidation (a late notification for an earlier key, the clear after a LISTEN) is
    /// undone by design, so one resolve is not always enough.
    async fn cache(index: &KeyCache, hash: &KeyHash) {
        for _ in 0..100 {
            let resolved = index.resolve(hash).await.expect("resolve");
            assert!(resolved.key.is_some(), "a live key resolves");
            if resolved.source == LookupSource::Hit {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the key never stayed in the cache");
    }

    /// Polls (yielding, not sleeping: timer granularity is 1 ms) until `hash` has left the
    /// cache; returns when that was seen, or None after `limit`.
    async fn wait_uncached(index: &KeyCache, hash: &KeyHash, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !is_cached(index, hash) {
                return Some(Instant::now());
            }
            tokio::task::yield_now().await;
        }
        None
    }

    /// Proves the listener is subscribed: a probe key cached in `index` and revoked through
    /// `writer` disappears. (If the revoke came before the LISTEN, the clear that follows
    /// every LISTEN removes it: either way the listener is live afterwards.)
    async fn wait_until_listening(writer: &dyn KeyStore, index: &KeyCache) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = record("probe");
            writer.insert(&probe).await.expect("insert probe");
            cache(index, &hash_of(&probe)).await;
            writer.revoke(&probe.id, 1).await.expect("revoke probe");
            if wait_uncached(index, &hash_of(&probe), Duration::from_millis(500))
                .await
                .is_some()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the invalidation listener never started"
            );
        }
    }

    fn spawn_listener(url: &str, index: &Arc<KeyCache>) -> (watch::Sender<bool>, JoinHandle<()>) {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run_invalidation_listener(
            url.to_string(),
            Arc::clone(index),
            stopped,
        ));
        (stop, task)
    }

    async fn stop_listener(stop: watch::Sender<bool>, task: JoinHandle<()>) {
        stop.send(true).expect("listener alive");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the listener stops promptly on shutdown")
            .expect("the listener does not panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_started_together_share_one_schema_and_see_each_others_writes() {
        let url = crate::common::pg::fresh_database();
        // Three instances migrating at once: the advisory lock makes that safe.
        let (one, two, three) = tokio::join!(pg_store(&url), pg_store(&url), pg_store(&url));
        let client = sql_client(&url).await;
        let versions: Vec<i32> = client
            .query(
                "SELECT version FROM keygate_schema_migrations ORDER BY version",
                &[],
            )
            .await
            .expect("migrations table")
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        // A fourth start with everything applied changes nothing.
        let _again = pg_store(&url).await;

        let key = record("alice");
        one.insert(&key).await.expect("insert");
        assert_eq!(
            two.get(&key.id).await.expect("get").map(|k| k.record),
            Some(key.clone())
        );
        assert!(matches!(
            three.insert(&key).await,
            Err(keygate::store::StoreError::Duplicate)
        ));

        two.revoke(&key.id, 42).await.expect("revoke");
        assert_eq!(
            one.find_by_hash(&hash_of(&key))
                .await
                .expect("find")
                .and_then(|r| r.revoked_at),
            Some(42)
        );

        // Usage flushed by several instances at once adds up exactly.
        let stores: Vec<Arc<PgStore>> = vec![Arc::new(one), Arc::new(two), Arc::new(three)];
        let mut tasks = Vec::new();
        for (n, store) in stores.iter().enumerate() {
            let store = Arc::clone(store);
            let id = key.id.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    store
                        .add_usage(&[(
                            id.clone(),
                            Usage {
                                count: 1,
                                last_used: (n as i64) * 100 + i,
                                ..Default::default()
                            },
                        )])
                        .await
                        .expect("usage");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        for store in &stores {
            let usage = store
                .get(&key.id)
                .await
                .expect("get")
                .expect("present")
                .usage;
            assert_eq!(
                usage,
                Usage {
                    count: 150,
                    last_used: 249,
                    ..Default::default()
                }
            );
            assert_eq!(store.count().await.expect("count"), 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn revoke_on_one_instance_invalidates_the_cache_of_another() {
        let url = crate::common::pg::fresh_database();
        let writer = pg_store(&url).await;
        let index = index_over(pg_store(&url).await);
        let (stop, task) = spawn_listener(&url, &index);
        wait_until_listening(&writer, &index).await;

        // Revokes: time from the revoke call to the entry leaving the other cache.
        let mut latencies = Vec::new();
        for _ in 0..20 {
            let key = record("alice");
            writer.insert(&key).await.expect("insert");
            cache(&index, &hash_of(&key)).await;
            let started = Instant::now();
            writer.revoke(&key.id, 7).await.expect("revoke");
            let committed = Instant::now();
            let gone = wait_uncached(&index, &hash_of(&key), Duration::from_secs(5))
                .await
                .expect("the revoke reaches the other instance's cache");
            latencies.push((gone - started, gone.saturating_duration_since(committed)));
            // The next read goes to the store and sees the revoke.
            let resolved = index.resolve(&hash_of(&key)).await.expect("resolve");
            assert!(resolved.key.is_none(), "a revoked key never resolves again");
        }
        let mut from_call: Vec<Duration> = latencies.iter().map(|l| l.0).collect();
        let mut from_return: Vec<Duration> = latencies.iter().map(|l| l.1).collect();
        from_call.sort();
        from_return.sort();
        let n = from_call.len();
        println!(
            "invalidation latency over {n} revokes: from the revoke() call min {:?}, median \
             {:?}, max {:?}; from its return min {:?}, median {:?}, max {:?}",
            from_call[0],
            from_call[n / 2],
            from_call[n - 1],
            from_return[0],
            from_return[n / 2],
            from_return[n - 1],
        );

        // Bringing expiry forward invalidates too, and the refill sees the new expiry.
        let key = record("alice");
        writer.insert(&key).await.expect("insert");
        cache(&index, &hash_of(&key)).await;
        writer.retire(&key.id, 1_234).await.expect("expire");
        wait_uncached(&index, &hash_of(&key), Duration::from_secs(5))
            .await
            .expect("retire reaches the other instance's cache");
        let refilled = index.resolve(&hash_of(&key)).await.expect("resolve");
        assert_eq!(refilled.key.expect("still valid").expires_at, Some(1_234));

        // A patch invalidates too, and the refill sees the new scopes and allowlist.
        let key = record("alice");
        writer.insert(&key).await.expect("insert");
        cache(&index, &hash_of(&key)).await;
        let patch = keygate::keys::KeyPatch {
            scopes: Some(vec!["write".into()]),
            allowed_ips: Some(vec!["10.0.0.0/8".into()]),
            ..keygate::keys::KeyPatch::default()
        };
        writer.update(&key.id, &patch).await.expect("update");
        wait_uncached(&index, &hash_of(&key), Duration::from_secs(5))
            .await
            .expect("a patch reaches the other instance's cache");
        let refilled = index.resolve(&hash_of(&key)).await.expect("resolve");
        let refilled = refilled.key.expect("still valid");
        assert_eq!(refilled.scopes, ["write"]);
        assert_eq!(refilled.allowed_ips.len(), 1);

        // A payload that is not a key hash clears everything rather than guessing.
        let bystander = record("alice");
        writer.insert(&bystander).await.expect("insert");
        cache(&index, &hash_of(&bystander)).await;
        sql_client(&url)
            .await
            .batch_execute("NOTIFY keygate_invalidate, 'not-a-hash'")
            .await
            .expect("notify");
        wait_uncached(&index, &hash_of(&bystander), Duration::from_secs(5))
            .await
            .expect("an unreadable notification clears the cache");

        stop_listener(stop, task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listener_clears_the_cache_when_its_connection_drops_and_resubscribes() {
        let url = crate::common::pg::fresh_database();
        let writer = pg_store(&url).await;
        let index = index_over(pg_store(&url).await);
        let (stop, task) = spawn_listener(&url, &index);
        wait_until_listening(&writer, &index).await;

        let untouched: KeyRecord = record("alice");
        writer.insert(&untouched).await.expect("insert");
        cache(&index, &hash_of(&untouched)).await;

        let killed = Instant::now();
        // The listener's connection is the one whose last statement was its LISTEN or its
        // heartbeat (the stores' pooled connections ran other statements; the URL may set
        // application_name, so that cannot tell them apart).
        let terminated: i64 = sql_client(&url)
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() \
                 AND (query LIKE 'LISTEN keygate_invalidate%' OR query = 'SELECT 1')",
                &[],
            )
            .await
            .expect("terminate")
            .get(0);
        assert_eq!(terminated, 1, "exactly one listener connection");
        // Nothing was revoked, yet the entry goes: notifications may have been missed.
        let cleared = wait_uncached(&index, &hash_of(&untouched), Duration::from_secs(5))
            .await
            .expect("the cache is cleared once the listener is back after a connection loss");
        println!(
            "cache cleared {:?} after the listener's connection was killed",
            cleared - killed
        );

        // It reconnects and invalidations flow again.
        wait_until_listening(&writer, &index).await;
        println!("listener back {:?} after the kill", killed.elapsed());
        let key = record("alice");
        writer.insert(&key).await.expect("insert");
        cache(&index, &hash_of(&key)).await;
        writer.revoke(&key.id, 9).await.expect("revoke");
        wait_uncached(&index, &hash_of(&key), Duration::from_secs(5))
            .await
            .expect("invalidations work after reconnecting");

        stop_listener(stop, task).await;
    }

    /// Keys created through another instance reach this one's key filter by NOTIFY; when
    /// the listener loses its connection the filter stops refusing (creates may have been
    /// missed) until a rebuild after the reconnect.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_key_filter_learns_other_instances_keys_and_is_rebuilt_after_a_drop() {
        let url = crate::common::pg::fresh_database();
        let writer = pg_store(&url).await;
        let index = index_over(pg_store(&url).await);
        let (stop, task) = spawn_listener(&url, &index);
        let rebuilds = {
            let (index, stopped) = (Arc::clone(&index), stop.subscribe());
            tokio::spawn(async move {
                let store = Arc::clone(index.store());
                index.filter().run_rebuilds(store.as_ref(), stopped).await;
            })
        };
        wait_until_listening(&writer, &index).await;
        let ready = |want: bool| {
            let index = Arc::clone(&index);
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while index.filter().is_ready() != want {
                    assert!(
                        Instant::now() < deadline,
                        "the filter never became ready={want}"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        ready(true).await;

        for _ in 0..20 {
            let key = record("alice");
            writer.insert(&key).await.expect("insert");
            let hash = hash_of(&key);
            let deadline = Instant::now() + Duration::from_secs(1);
            while index.filter().rules_out(&hash) {
                assert!(
                    Instant::now() < deadline,
                    "another instance's key is refused"
                );
                tokio::task::yield_now().await;
            }
            assert!(index.resolve(&hash).await.expect("resolve").key.is_some());
        }

        let terminated: i64 = sql_client(&url)
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() \
                 AND (query LIKE 'LISTEN keygate_invalidate%' OR query = 'SELECT 1')",
                &[],
            )
            .await
            .expect("terminate")
            .get(0);
        assert_eq!(terminated, 1, "exactly one listener connection");
        ready(false).await;
        ready(true).await;

        stop_listener(stop, task).await;
        rebuilds.await.expect("the rebuild task does not panic");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listener_retries_an_unreachable_server_and_still_stops_on_shutdown() {
        // Nothing listens on port 1.
        let url = "postgres://keygate@127.0.0.1:1/keygate".to_string();
        let index = index_over(pg_store(&crate::common::pg::fresh_database()).await);
        let (stop, task) = spawn_listener(&url, &index);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!task.is_finished(), "it keeps retrying");
        stop_listener(stop, task).await;
    }
}
