//! Issue 16, item 9: the store-read flood. The key checksum is public, so an attacker can
//! mint endless well-formed unknown keys; the filter of stored hashes answers them from
//! memory, and store reads of cache misses are bounded (503 `store_unavailable` past the
//! bound, after a short wait) instead of queueing without limit.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::cluster::Instance;
use crate::common::management::{Cred, Env};
use crate::common::*;

/// The sum of the series of `name` whose labels contain `labels` (all of them if empty).
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split([' ', '{']).next() == Some(name) && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!values.is_empty(), "no {name}{{{labels}}} in /metrics");
    values.iter().sum()
}

async fn filter_ready(admin: &str) -> bool {
    metric(&scrape_metrics(admin).await, "keygate_key_filter_ready", "") == 1.0
}

async fn wait_for_filter(admin: &str) {
    assert!(
        eventually(Duration::from_secs(10), || filter_ready(admin)).await,
        "the key filter did not become ready"
    );
}

/// `n` distinct well-formed keys (valid checksum) that no store holds.
fn unknown_keys(n: usize) -> Vec<String> {
    let format = keygate::keys::KeyFormat::new("kg");
    (0..n).map(|_| format.generate().expect("rng")).collect()
}

#[tokio::test]
async fn a_flood_of_unknown_keys_does_not_read_the_store_per_key() {
    let upstream = Upstream::start("u").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    config.write();
    let (_, valid) = create_key(&config.path(), "alice", &[], None);
    let gateway = Gateway::start(&config).await;
    wait_for_filter(&gateway.admin).await;
    let before = scrape_metrics(&gateway.admin).await;
    let url = format!("{}/x", gateway.base);

    let flood = unknown_keys(2000);
    let mut tasks = Vec::new();
    for chunk in flood.chunks(250) {
        let (keys, url) = (chunk.to_vec(), url.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for key in &keys {
                assert_eq!(status_with_key(&c, &url, key).await, 401);
            }
        }));
    }
    // Valid-key traffic side by side with the flood.
    let valid_traffic = {
        let (valid, url) = (valid.clone(), url.clone());
        tokio::spawn(async move {
            let c = client();
            for _ in 0..200 {
                assert_eq!(status_with_key(&c, &url, &valid).await, 200);
            }
        })
    };
    for task in tasks {
        task.await.expect("flood task");
    }
    valid_traffic.await.expect("valid traffic");

    let after = scrape_metrics(&gateway.admin).await;
    let delta =
        |name: &str, labels: &str| metric(&after, name, labels) - metric(&before, name, labels);
    let reads = delta("keygate_store_reads_total", "");
    // About 1% of unknown keys pass a filter sized for a 1% false-positive rate.
    assert!(
        reads <= 100.0,
        "{reads} store reads for {} distinct unknown keys",
        flood.len()
    );
    assert!(delta("keygate_key_cache_lookups_total", "result=\"negative_hit\"") >= 1900.0);
    assert_eq!(
        delta("keygate_requests_total", "outcome=\"invalid_key\""),
        flood.len() as f64
    );
    assert_eq!(
        upstream.count(),
        200,
        "only the valid key's requests are forwarded"
    );
}

#[tokio::test]
async fn a_key_created_after_start_is_accepted_at_once() {
    let env = Env::start("").await;
    wait_for_filter(&env.gateway.admin).await;
    // Before the create: not in the filter. Right after its answer: admitted.
    for n in 0..20 {
        let (_, key) = env
            .create(Cred::Admin, json!({"owner": format!("owner{n}")}))
            .await;
        env.assert_admitted(&key, "a key created after the filter was built")
            .await;
    }
    let (record, rotated_key) = env.admin_create("rotating", &[]).await;
    let id = record["id"].as_str().expect("id");
    let rotated = env
        .post(&format!("/keys/{id}/rotate"), Cred::Admin, json!({}))
        .await;
    let new_key = rotated.ok(201)["key"].as_str().expect("key").to_string();
    env.assert_admitted(&new_key, "a rotated key").await;
    assert_eq!(env.proxied(&rotated_key).await.0, 401);
}

/// Gateway B's filter learns keys created on gateway A from A's NOTIFY, within a second.
#[tokio::test]
async fn a_key_created_on_one_gateway_passes_the_others_filter_within_a_second() {
    let db = crate::common::pg::fresh_database();
    let upstream = Upstream::start("up").await;
    let a = Instance::start(&db, upstream.addr).await;
    let b = Instance::start(&db, upstream.addr).await;
    wait_for_filter(&b.gateway.admin).await;
    for owner in ["alice", "bob", "carol"] {
        let (_, key) = a.create_key(owner).await;
        let created = Instant::now();
        let accepted = eventually(Duration::from_secs(1), || async {
            b.call(&key).await == (200, String::new())
        })
        .await;
        assert!(accepted, "B refused A's new key for a second");
        assert!(created.elapsed() < Duration::from_secs(1));
    }
    let text = scrape_metrics(&b.gateway.admin).await;
    assert_eq!(metric(&text, "keygate_key_filter_ready", ""), 1.0);
}

/// With the store stalled (a test connection holds an exclusive lock on the keys table),
/// cache misses beyond `max_concurrent_reads` are answered 503 `store_unavailable` after
/// `read_wait_ms`, instead of queueing on the pool; a cached key keeps working.
#[tokio::test]
async fn misses_beyond_the_read_bound_get_503_while_the_store_stalls() {
    let db = crate::common::pg::fresh_database();
    let upstream = Upstream::start("up").await;
    let gateway = Instance::start_with(
        &db,
        upstream.addr,
        "max_concurrent_reads = 1\nread_wait_ms = 100\nstatement_timeout_ms = 20000\n",
    )
    .await;
    let (_, cached) = gateway.create_key("alice").await;
    assert_eq!(gateway.call(&cached).await.0, 200);
    let (_, first) = gateway.create_key("bob").await;
    let (_, second) = gateway.create_key("carol").await;

    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (unlock_tx, unlock_rx) = std::sync::mpsc::channel::<()>();
    let db_for_lock = db.clone();
    let locker = std::thread::spawn(move || {
        crate::common::pg::hold_lock(&db_for_lock, "keys", || {
            locked_tx.send(()).expect("report lock");
            let _ = unlock_rx.recv_timeout(Duration::from_secs(30));
        })
    });
    locked_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the lock was taken");

    // Holds the only read slot, waiting on the lock.
    let stalled = {
        let (base, key) = (gateway.base().to_string(), first.clone());
        tokio::spawn(async move { status_with_key(&client(), &format!("{base}/work"), &key).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(
        gateway.call(&second).await,
        (503, "store_unavailable".to_string())
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the refusal waited {:?}",
        started.elapsed()
    );
    assert_eq!(gateway.call(&cached).await.0, 200, "a cached key stalled");

    unlock_tx.send(()).expect("unlock");
    locker.join().expect("locker").expect("lock held");
    assert_eq!(stalled.await.expect("stalled request"), 200);
    assert_eq!(gateway.call(&second).await.0, 200);
}
