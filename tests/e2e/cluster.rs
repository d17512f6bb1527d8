//! Several gateways on one PostgreSQL database: keys created on one instance work on the
//! others, revokes and rotations made on one reach the others' caches (LISTEN/NOTIFY)
//! within seconds, and usage counted by all of them adds up exactly.
//!
//! Every test gets a fresh database (`pg::fresh_database`) and its own gateway processes.

use std::time::{Duration, Instant};

use crate::common::cluster::{ADMIN, Instance};
use crate::common::pg;
use crate::common::*;

/// Generous bound for cross-instance propagation; the contract wants it "at once".
const PROPAGATION_LIMIT: Duration = Duration::from_secs(5);

/// Polls `instance` with `key` until it is refused with 401; returns when that happened
/// and its error code, or None if it was still admitted after `limit` (+ a margin).
async fn first_refusal(
    instance: &Instance,
    key: &str,
    limit: Duration,
) -> Option<(Instant, String)> {
    let deadline = Instant::now() + limit + Duration::from_secs(2);
    let client = client();
    while Instant::now() < deadline {
        let resp = client
            .get(format!("{}/work", instance.base()))
            .header("x-api-key", key)
            .send()
            .await
            .expect("proxied request");
        let at = Instant::now();
        let (status, code) = error_code(resp).await;
        match status {
            200 => {}
            401 => return Some((at, code)),
            other => panic!("unexpected {other} {code} while waiting for a refusal"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[tokio::test]
async fn a_key_created_on_one_instance_works_on_another() {
    let db = pg::fresh_database();
    let upstream = Upstream::start("up").await;
    let a = Instance::start(&db, upstream.addr).await;
    let b = Instance::start(&db, upstream.addr).await;

    let (id, key) = a.create_key("alice").await;
    assert_eq!(
        b.call(&key).await,
        (200, String::new()),
        "B must admit A's key"
    );
    let seen = upstream.seen();
    let last = seen.last().expect("the upstream saw the request");
    assert_eq!(
        last.header("x-keygate-key-id").as_deref(),
        Some(id.as_str())
    );
    assert_eq!(last.header("x-keygate-owner").as_deref(), Some("alice"));

    // And the other way round, plus an unknown key is still refused on both.
    let (_, key_b) = b.create_key("bob").await;
    assert_eq!(a.call(&key_b).await.0, 200, "A must admit B's key");
    // A well-formed key that exists nowhere is still refused.
    let unknown = keygate::keys::KeyFormat::new("kg").generate().expect("rng");
    assert_eq!(b.call(&unknown).await, (401, "invalid_key".to_string()));
}

#[tokio::test]
async fn a_revoke_on_one_instance_reaches_the_cache_of_another() {
    let db = pg::fresh_database();
    let upstream = Upstream::start("up").await;
    let a = Instance::start(&db, upstream.addr).await;
    let b = Instance::start(&db, upstream.addr).await;

    let (id, key) = a.create_key("alice").await;
    // B loads the key into its cache, and the second request is served from it (so the
    // refusal below can only come from the cross-instance invalidation).
    assert_eq!(b.call(&key).await.0, 200);
    let hits = b.cache_hits().await;
    assert_eq!(b.call(&key).await.0, 200);
    assert!(
        b.cache_hits().await > hits,
        "B did not serve the key from its cache"
    );

    let resp = client()
        .delete(format!("{}/_keygate/keys/{id}", a.base()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("revoke request");
    let revoked_at = Instant::now();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_eq!(status, 200, "revoke answered {status}: {body}");
    assert_eq!(body["revoked"], true);
    // A itself refuses at once.
    assert_eq!(a.call(&key).await, (401, "invalid_key".to_string()));

    let refused = first_refusal(&b, &key, PROPAGATION_LIMIT).await;
    let Some((at, code)) = refused else {
        panic!(
            "B still admitted the key {:?} after A's revoke; B stderr:\n{}",
            revoked_at.elapsed(),
            b.stderr()
        );
    };
    let propagation = at.saturating_duration_since(revoked_at);
    println!("revoke propagation A -> B: {propagation:?}");
    assert_eq!(code, "invalid_key");
    assert!(
        propagation < PROPAGATION_LIMIT,
        "revoke took {propagation:?} to reach B"
    );
    // And it stays refused.
    for _ in 0..5 {
        assert_eq!(b.call(&key).await, (401, "invalid_key".to_string()));
    }
}

#[tokio::test]
async fn usage_counted_on_two_instances_adds_up_exactly_across_a_graceful_stop() {
    const TOTAL: usize = 1000;
    const CLIENTS: usize = 4;
    let db = pg::fresh_database();
    let upstream = Upstream::start("up").await;
    let mut a = Instance::start(&db, upstream.addr).await;
    let mut b = Instance::start(&db, upstream.addr).await;
    let (id, key) = a.create_key("alice").await;

    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        // Clients 0 and 2 on A, 1 and 3 on B: half the requests each.
        let base = if c % 2 == 0 { a.base() } else { b.base() }.to_string();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let client = client();
            for _ in 0..TOTAL / CLIENTS {
                let resp = client
                    .get(format!("{base}/work"))
                    .header("x-api-key", &key)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(resp.status(), 200);
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    assert_eq!(upstream.count(), TOTAL);

    assert!(
        a.stop(),
        "A did not exit 0 on SIGTERM; stderr:\n{}",
        a.stderr()
    );
    assert!(
        b.stop(),
        "B did not exit 0 on SIGTERM; stderr:\n{}",
        b.stderr()
    );

    let c = Instance::start(&db, upstream.addr).await;
    let record = c.get_key(&id).await;
    assert_eq!(
        record["usage_count"].as_u64(),
        Some(TOTAL as u64),
        "usage after both instances stopped: {record}"
    );
    assert!(record["last_used"].is_string(), "{record}");
}

#[tokio::test]
async fn a_rotation_on_one_instance_retires_the_old_key_on_another() {
    let db = pg::fresh_database();
    let upstream = Upstream::start("up").await;
    let a = Instance::start(&db, upstream.addr).await;
    let b = Instance::start(&db, upstream.addr).await;

    let (id, old_key) = a.create_key("alice").await;
    assert_eq!(b.call(&old_key).await.0, 200, "B caches the old key");
    let hits = b.cache_hits().await;
    assert_eq!(b.call(&old_key).await.0, 200);
    assert!(
        b.cache_hits().await > hits,
        "B did not serve the key from its cache"
    );

    let resp = client()
        .post(format!("{}/_keygate/keys/{id}/rotate", a.base()))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"grace_seconds": 0}))
        .send()
        .await
        .expect("rotate request");
    let rotated_at = Instant::now();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_eq!(status, 201, "rotate answered {status}: {body}");
    assert_eq!(body["rotated_from"].as_str(), Some(id.as_str()), "{body}");
    let new_id = body["id"].as_str().expect("new id").to_string();
    let new_key = body["key"].as_str().expect("new key").to_string();
    assert_ne!(new_key, old_key);

    let refused = first_refusal(&b, &old_key, PROPAGATION_LIMIT).await;
    let Some((at, code)) = refused else {
        panic!(
            "B still admitted the old key {:?} after the rotation; B stderr:\n{}",
            rotated_at.elapsed(),
            b.stderr()
        );
    };
    let propagation = at.saturating_duration_since(rotated_at);
    println!("rotation (grace 0) propagation A -> B: {propagation:?} ({code})");
    assert!(
        code == "key_expired" || code == "invalid_key",
        "old key refused with {code}"
    );
    assert!(
        propagation < PROPAGATION_LIMIT,
        "rotation took {propagation:?} to reach B"
    );

    assert_eq!(
        b.call(&new_key).await,
        (200, String::new()),
        "B admits the new key"
    );
    assert_eq!(
        upstream
            .seen()
            .last()
            .and_then(|s| s.header("x-keygate-key-id")),
        Some(new_id)
    );
    assert_eq!(a.call(&old_key).await.0, 401, "A refuses the old key too");
}

/// The offline `keygate keys` commands work on a PostgreSQL store while gateways run on it
/// (no lock to take): a key made offline is admitted by a running instance, one revoked
/// offline is refused by it (the revoke's notification reaches its cache), and the listing
/// shows both.
#[tokio::test]
async fn offline_commands_share_the_database_with_running_instances() {
    let db = pg::fresh_database();
    let upstream = Upstream::start("up").await;
    let a = Instance::start(&db, upstream.addr).await;
    let config = a.config.path();
    let config = config.to_str().expect("utf-8 path");
    let offline = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env("KEYGATE_DATABASE_URL", &db)
            .output()
            .expect("run keygate");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON output")
    };

    let created = offline(&["keys", "create", "--config", config, "--owner", "ops"]);
    let key = created["key"].as_str().expect("key").to_string();
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(
        a.call(&key).await,
        (200, String::new()),
        "an offline key works"
    );

    let revoked = offline(&["keys", "revoke", "--config", config, &id]);
    assert_eq!(revoked["revoked"], true);
    let refused = eventually(PROPAGATION_LIMIT, || {
        let a = &a;
        let key = key.clone();
        async move { a.call(&key).await == (401, "invalid_key".to_string()) }
    })
    .await;
    assert!(
        refused,
        "an offline revoke reaches the running instance's cache"
    );

    let listed = offline(&["keys", "list", "--config", config, "--owner", "ops"]);
    let records = listed.as_array().expect("array");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["id"], id.as_str());
    assert!(records[0]["revoked_at"].is_string());
    assert!(
        records[0].get("key").is_none(),
        "listings never show the key"
    );
}
