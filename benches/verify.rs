//! The hot path in pieces and whole: credential extraction, key check, SHA-256, cache hit
//! and usage record per header kind; a cache-miss look-up in a sled store of 1 million
//! keys; key generation; the management create path with its durable write.
//!
//! `cargo bench --bench verify`. The 1M-key store is built once under target/ and reused.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use keygate::http::credentials as auth;
use keygate::keys::{KeyFormat, KeyHash, KeyRecord};
use keygate::lifecycle::{Actor, Audit, Lifecycle, NewKey};
use keygate::store::{CacheSettings, KeyCache, KeyStore, SledStore};
use keygate::usage::UsageRecorder;

const MILLION: usize = 1_000_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn settings() -> CacheSettings {
    CacheSettings {
        capacity: 100_000,
        ttl: Duration::from_secs(300),
        negative_capacity: 10_000,
        negative_ttl: Duration::from_secs(30),
        max_store_reads: 16,
        store_read_wait: Duration::from_millis(100),
    }
}

/// The request-path steps of an admitted request on a cache hit, as `Gateway::authenticate`
/// and `Gateway::admit` run them (the async resolve returns from the cache without awaiting).
fn hot_path(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn KeyStore> = Arc::new(SledStore::open(&dir.path().join("s")).expect("open"));
    let format = KeyFormat::new("kg");
    let key = format.generate().expect("rng");
    let record = KeyRecord::for_key(&format, &key, "alice", 0);
    rt.block_on(store.insert(&record)).expect("insert");
    let index = KeyCache::new(Arc::clone(&store), settings());
    let hash = KeyHash::of(key.as_bytes());
    rt.block_on(index.resolve(&hash)).expect("warm the cache");
    let usage = UsageRecorder::new();

    let mut group = c.benchmark_group("hot_path");
    for (name, header, value) in [
        ("x-api-key", "x-api-key", key.clone()),
        ("key", "key", key.clone()),
        ("bearer", "authorization", format!("Bearer {key}")),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("api.example.com"));
        headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        headers.insert(header, HeaderValue::from_str(&value).expect("header"));
        group.bench_function(format!("verify_cache_hit/{name}"), |b| {
            b.iter(|| {
                let credential = auth::extract(black_box(&headers), &format)
                    .expect("no conflict")
                    .expect("credential");
                format.check(credential.value).expect("well-formed");
                let hash = KeyHash::of(credential.value);
                let resolved = index.cached(&hash).expect("cached");
                let key = resolved.key.expect("known key");
                assert!(!key.is_expired(1));
                usage.record(key.id_number, &key.id, 1, None);
                black_box(key);
            })
        });
    }
    group.bench_function("steps/extract", |b| {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_str(&key).expect("header"));
        b.iter(|| black_box(auth::extract(black_box(&headers), &format)))
    });
    group.bench_function("steps/check_format", |b| {
        b.iter(|| black_box(format.check(black_box(key.as_bytes()))))
    });
    group.bench_function("steps/sha256", |b| {
        b.iter(|| black_box(KeyHash::of(black_box(key.as_bytes()))))
    });
    group.bench_function("steps/cache_hit", |b| {
        b.iter(|| black_box(index.cached(black_box(&hash))))
    });
    let id_number = u128::from(ulid::Ulid::from_string(&record.id).expect("ulid"));
    group.bench_function("steps/usage_record", |b| {
        b.iter(|| usage.record(black_box(id_number), &record.id, 1, None))
    });
    group.bench_function("reject_bad_checksum", |b| {
        let mut bad = key.clone().into_bytes();
        bad[20] = if bad[20] == b'a' { b'b' } else { b'a' };
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_bytes(&bad).expect("header"));
        b.iter(|| {
            let credential = auth::extract(black_box(&headers), &format)
                .expect("no conflict")
                .expect("credential");
            black_box(format.check(credential.value).is_err())
        })
    });
    group.finish();
}

/// A sled store holding a million keys, built once (bulk import) and kept under target/.
fn million_key_store() -> (PathBuf, Vec<String>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-store-1m");
    let keys_file = dir.join("sample-keys.txt");
    if let Ok(text) = std::fs::read_to_string(&keys_file) {
        return (
            dir.join("store"),
            text.lines().map(str::to_string).collect(),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let rt = runtime();
    let store = SledStore::open(&dir.join("store")).expect("open");
    let format = KeyFormat::new("kg");
    let mut sample = Vec::new();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..MILLION {
        let key = format.generate().expect("rng");
        batch.push(KeyRecord::for_key(
            &format,
            &key,
            &format!("owner{}", i % 1000),
            0,
        ));
        if i % 1000 == 0 {
            sample.push(key);
        }
        if batch.len() == 10_000 {
            rt.block_on(store.import(&batch)).expect("import");
            batch.clear();
        }
    }
    rt.block_on(store.import(&batch)).expect("import");
    drop(store);
    std::fs::write(&keys_file, sample.join("\n")).expect("sample keys");
    (dir.join("store"), sample)
}

fn store_lookups(c: &mut Criterion) {
    let (path, sample) = million_key_store();
    let rt = runtime();
    let store: Arc<dyn KeyStore> = Arc::new(SledStore::open(&path).expect("open 1M store"));
    let hashes: Vec<KeyHash> = sample.iter().map(|k| KeyHash::of(k.as_bytes())).collect();
    let mut group = c.benchmark_group("store_1m");
    let mut i = 0usize;
    group.bench_function("cache_miss_lookup", |b| {
        b.iter_batched(
            // A fresh index each time: the look-up always misses the cache.
            || {
                i = (i + 1) % hashes.len();
                (KeyCache::new(Arc::clone(&store), settings()), hashes[i])
            },
            |(index, hash)| {
                let resolved = rt.block_on(index.resolve(&hash)).expect("lookup");
                assert!(resolved.key.is_some());
                // Returned, so the cache is dropped outside the timed part.
                index
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("find_by_hash", |b| {
        let mut j = 0usize;
        b.iter(|| {
            j = (j + 1) % hashes.len();
            black_box(rt.block_on(store.find_by_hash(&hashes[j])).expect("lookup"))
        })
    });
    group.finish();
}

fn generation_and_create(c: &mut Criterion) {
    let format = KeyFormat::new("kg");
    c.bench_function("key_generation", |b| {
        b.iter(|| black_box(format.generate().expect("rng")))
    });

    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn KeyStore> = Arc::new(SledStore::open(&dir.path().join("s")).expect("open"));
    let keys = Lifecycle::new(
        Arc::new(KeyCache::new(store, settings())),
        Arc::new(UsageRecorder::new()),
        format,
    );
    let mut group = c.benchmark_group("management");
    group.sample_size(50);
    group.bench_function("create_durable", |b| {
        b.iter(|| {
            let audit = Audit {
                actor: &Actor::Cli,
                action: "create",
                client: None,
            };
            let new = NewKey {
                name: Some("bench".into()),
                owner: "alice".into(),
                scopes: vec!["read".into()],
                expires_at: None,
                rate_limit: None,
                metadata: None,
                allowed_ips: Vec::new(),
                quota: None,
            };
            let created = rt.block_on(keys.create(new, audit)).expect("create");
            black_box(created)
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path, store_lookups, generation_and_create);
criterion_main!(benches);
