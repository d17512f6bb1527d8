//! Keys changed in place (contract section 14): `PATCH /_keygate/keys/{id}` field by
//! field, its bounds and the caller's rights, and a change that holds for every request
//! sent after its answer, on one gateway and across two on PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::management::*;
use crate::common::*;

/// Two routes: "/" needs the scope `read`, "/meta" forwards the key's metadata.
fn routes(upstream: &Upstream) -> String {
    format!(
        "[[routes]]\nname = \"default\"\npath_prefix = \"/\"\nupstreams = [\"{up}\"]\nscopes = [\"read\"]\nhealth_check_interval_ms = 200\n\n\
         [[routes]]\nname = \"meta\"\npath_prefix = \"/meta\"\nupstreams = [\"{up}\"]\nforward_metadata = true\nhealth_check_interval_ms = 200\n",
        up = upstream.addr
    )
}

pub(crate) async fn env_with_routes(server_extra: &str) -> Env {
    let upstream = Upstream::start("api").await;
    let mut config = GatewayConfig::with_routes(&format!("{GENEROUS}\n{}", routes(&upstream)));
    config.server_extra = server_extra.to_string();
    Env::on(config, upstream).await
}

async fn patch(env: &Env, id: &str, cred: Cred<'_>, body: Value) -> Reply {
    env.send(
        Method::PATCH,
        &format!("/keys/{id}"),
        cred,
        Body::Json(body),
    )
    .await
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .expect("time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

/// Every field set, then every nullable one removed with `null`; fields left out are kept,
/// the key itself keeps working, and each change is audited as `update`.
#[tokio::test]
async fn each_field_changes_in_place_and_null_removes_it() {
    let env = env_with_routes("").await;
    let (created, key) = env
        .create(
            Cred::Admin,
            json!({"owner": "alice", "scopes": ["read"], "metadata": {"a": 1}}),
        )
        .await;
    let id = id_of(&created);
    let expires = now() + 86_400;
    let changed = patch(
        &env,
        &id,
        Cred::Admin,
        json!({
            "name": "renamed",
            "scopes": ["write", "read", "read"],
            "metadata": {"plan": "pro"},
            "rate_limit": {"requests": 50, "window_seconds": 60},
            "expires_at": rfc3339(expires),
            "allowed_ips": ["127.0.0.1", "10.1.2.3/8"]
        }),
    )
    .await;
    let record = changed.ok(200).clone();
    assert_eq!(record["name"], "renamed");
    assert_eq!(record["scopes"], json!(["read", "write"]));
    assert_eq!(record["metadata"], json!({"plan": "pro"}));
    assert_eq!(
        record["rate_limit"],
        json!({"requests": 50, "window_seconds": 60})
    );
    assert_eq!(
        whole_second_utc(&record["expires_at"], "expires_at"),
        expires
    );
    assert_eq!(record["allowed_ips"], json!(["10.0.0.0/8", "127.0.0.1/32"]));
    assert_eq!(record["preview"], created["preview"]);
    assert!(record.get("key").is_none(), "a patch never shows the key");
    assert_eq!(env.record(&id).await, record);
    env.assert_admitted(&key, "the same key after the patch")
        .await;

    let only_name = patch(&env, &id, Cred::Admin, json!({"name": "again"})).await;
    assert_eq!(only_name.ok(200)["scopes"], json!(["read", "write"]));

    let removed = patch(
        &env,
        &id,
        Cred::Admin,
        json!({"metadata": null, "rate_limit": null, "expires_at": null, "allowed_ips": null}),
    )
    .await;
    let removed = removed.ok(200);
    for field in ["metadata", "rate_limit", "expires_at"] {
        assert_eq!(removed[field], Value::Null, "{field}");
    }
    assert_eq!(removed["allowed_ips"], json!([]));
    assert_eq!(removed["name"], "again");
    assert_eq!(removed["usage_count"], 1, "usage is kept");

    let audit = env.get("/audit?limit=10", Cred::Admin).await;
    let updates = audit.ok(200)["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|e| e["action"] == "update" && e["key_id"] == id.as_str())
        .count();
    assert_eq!(updates, 3);
}

/// Every bad field in one 422, the record untouched; `null` where the field cannot be
/// removed, an unknown field and a malformed `quota` are named too.
#[tokio::test]
async fn bad_fields_are_all_named_and_nothing_changes() {
    let env = env_with_routes("").await;
    let (created, _) = env.admin_create("alice", &["read"]).await;
    let id = id_of(&created);
    let too_many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
    let bad = patch(
        &env,
        &id,
        Cred::Admin,
        json!({
            "name": "",
            "scopes": ["UPPER"],
            "metadata": "text",
            "rate_limit": {"requests": 0, "window_seconds": 60},
            "expires_at": "2001-01-01T00:00:00Z",
            "allowed_ips": ["10.0.0.0/33", "example.com"],
            "quota": {"requests": 10, "period": "week"},
            "bogus": 1
        }),
    )
    .await;
    bad.invalid(&[
        "name",
        "scopes",
        "metadata",
        "rate_limit",
        "expires_at",
        "allowed_ips",
        "quota",
        "bogus",
    ]);
    let reasons = bad.json["error"]["details"]["quota"].to_string();
    assert!(reasons.contains("\\\"month\\\""), "{reasons}");
    let reasons = bad.json["error"]["details"]["allowed_ips"].to_string();
    assert!(
        reasons.contains("example.com") && reasons.contains("10.0.0.0/33"),
        "{reasons}"
    );
    patch(&env, &id, Cred::Admin, json!({"allowed_ips": too_many}))
        .await
        .invalid(&["allowed_ips"]);
    patch(
        &env,
        &id,
        Cred::Admin,
        json!({"name": null, "scopes": null}),
    )
    .await
    .invalid(&["name", "scopes"]);
    let big = "x".repeat(5000);
    patch(&env, &id, Cred::Admin, json!({"metadata": {"pad": big}}))
        .await
        .invalid(&["metadata"]);
    let raw = Body::Raw(b"[1]".to_vec(), "application/json");
    let path = format!("/keys/{id}");
    env.send(Method::PATCH, &path, Cred::Admin, raw)
        .await
        .err(400, "invalid_json");
    let mut unchanged = env.record(&id).await;
    unchanged["usage_count"] = created["usage_count"].clone();
    let mut expected = created.clone();
    expected.as_object_mut().expect("record").remove("key");
    assert_eq!(unchanged, expected);
}

/// A `keys:manage` key changes keys only within its own scopes, expiry and rate limit, and
/// cannot remove an expiry or a rate limit while it has one.
#[tokio::test]
async fn a_manager_key_is_bounded_by_its_own_rights() {
    let env = env_with_routes("").await;
    let cap = now() + 3600;
    let (_, manager) = env
        .create(
            Cred::Admin,
            json!({
                "owner": "alice",
                "scopes": ["keys:manage", "read"],
                "expires_at": rfc3339(cap),
                "rate_limit": {"requests": 100, "window_seconds": 60}
            }),
        )
        .await;
    let (child, _) = env
        .create(Cred::Key(&manager), json!({"scopes": ["read"]}))
        .await;
    let child = id_of(&child);
    let as_manager = Cred::Key(&manager);

    patch(
        &env,
        &child,
        as_manager,
        json!({"scopes": ["read", "admin"]}),
    )
    .await
    .err(403, "insufficient_scope");
    let (stronger, _) = env.admin_create("alice", &["admin"]).await;
    patch(
        &env,
        &id_of(&stronger),
        as_manager,
        json!({"name": "mine now"}),
    )
    .await
    .err(403, "insufficient_scope");
    patch(
        &env,
        &child,
        as_manager,
        json!({
            "expires_at": rfc3339(cap + 60),
            "rate_limit": {"requests": 100, "window_seconds": 1}
        }),
    )
    .await
    .invalid(&["expires_at", "rate_limit"]);
    patch(
        &env,
        &child,
        as_manager,
        json!({"expires_at": null, "rate_limit": null}),
    )
    .await
    .invalid(&["expires_at", "rate_limit"]);
    let within = patch(
        &env,
        &child,
        as_manager,
        json!({
            "name": "ok",
            "expires_at": rfc3339(cap - 60),
            "rate_limit": {"requests": 50, "window_seconds": 60},
            "scopes": ["keys:manage"]
        }),
    )
    .await;
    assert_eq!(within.ok(200)["scopes"], json!(["keys:manage"]));
}

/// Another owner's key and an unknown id are 404; a revoked key is 409 `key_revoked`, one a
/// rotation replaced 409 `key_rotated`.
#[tokio::test]
async fn unknown_revoked_and_rotated_keys_are_refused() {
    let env = env_with_routes("").await;
    let (_, manager) = env.admin_create("alice", &["keys:manage", "read"]).await;
    let as_manager = Cred::Key(&manager);
    let (foreign, _) = env.admin_create("bob", &["read"]).await;
    patch(&env, &id_of(&foreign), as_manager, json!({"name": "x"}))
        .await
        .err(404, "not_found");
    patch(
        &env,
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        Cred::Admin,
        json!({"name": "x"}),
    )
    .await
    .err(404, "not_found");
    let (revoked, _) = env.admin_create("alice", &["read"]).await;
    let revoked = id_of(&revoked);
    env.delete(&format!("/keys/{revoked}"), Cred::Admin)
        .await
        .ok(200);
    patch(&env, &revoked, Cred::Admin, json!({"name": "x"}))
        .await
        .err(409, "key_revoked");
    let (rotated, _) = env.admin_create("alice", &["read"]).await;
    let rotated = id_of(&rotated);
    env.post(&format!("/keys/{rotated}/rotate"), Cred::Admin, json!({}))
        .await
        .ok(201);
    patch(&env, &rotated, Cred::Admin, json!({"expires_at": null}))
        .await
        .err(409, "key_rotated");
}

/// (started, status) of every request a traffic task sent.
type Sent = Vec<(Instant, u16)>;

/// Requests with `key`, back to back on two tasks, until `stop`.
fn traffic(env: &Env, key: &str, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Sent>> {
    (0..2)
        .map(|_| {
            let (http, url) = (client(), format!("{}/resource", env.config.base_url()));
            let (key, stop) = (key.to_string(), Arc::clone(stop));
            tokio::spawn(async move {
                let mut sent = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let resp = http.get(&url).header("x-api-key", &key).send().await;
                    sent.push((started, resp.expect("request").status().as_u16()));
                }
                sent
            })
        })
        .collect()
}

async fn stop_traffic(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<Sent>>) -> Sent {
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("traffic task"));
    }
    all
}

/// While requests keep coming, scopes are taken away and given back, then the rate limit
/// tightened: no request sent after an answer is judged by the settings before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_sent_after_the_answer_sees_the_old_settings() {
    let env = env_with_routes("").await;
    let (created, key) = env.admin_create("alice", &["read"]).await;
    let id = id_of(&created);
    for round in 0..6 {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = traffic(&env, &key, &stop);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let (scopes, wanted) = if round % 2 == 0 {
            (json!(["other"]), 403)
        } else {
            (json!(["read"]), 200)
        };
        patch(&env, &id, Cred::Admin, json!({"scopes": scopes}))
            .await
            .ok(200);
        let answered = Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sent = stop_traffic(&stop, tasks).await;
        let after: Vec<u16> = sent
            .iter()
            .filter(|(at, _)| *at > answered)
            .map(|(_, status)| *status)
            .collect();
        assert!(
            !after.is_empty(),
            "round {round}: no traffic after the answer"
        );
        assert!(
            after.iter().all(|s| *s == wanted),
            "round {round}: after the answer {after:?}, wanted only {wanted}"
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&env, &key, &stop);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let tight = json!({"rate_limit": {"requests": 1, "window_seconds": 3600}});
    patch(&env, &id, Cred::Admin, tight).await.ok(200);
    let answered = Instant::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sent = stop_traffic(&stop, tasks).await;
    let after: Vec<u16> = sent
        .iter()
        .filter(|(at, _)| *at > answered)
        .map(|(_, s)| *s)
        .collect();
    let admitted = after.iter().filter(|s| **s == 200).count();
    assert!(after.len() > 2, "traffic after the answer: {after:?}");
    assert!(admitted <= 1, "the new limit admits 1 an hour: {after:?}");
    assert!(after.iter().all(|s| *s == 200 || *s == 429), "{after:?}");
}

/// `GET /keys` filters: state, exact name and scope, paginated as before.
#[tokio::test]
async fn listings_filter_by_state_name_and_scope() {
    let env = env_with_routes("").await;
    let mut active = Vec::new();
    for i in 0..5 {
        let name = if i % 2 == 0 { "ci" } else { "deploy" };
        let scope = if i < 3 { "read" } else { "write" };
        let body = json!({"owner": "alice", "name": name, "scopes": [scope]});
        let (record, _) = env.create(Cred::Admin, body).await;
        active.push(id_of(&record));
    }
    let revoked = active.remove(4);
    env.delete(&format!("/keys/{revoked}"), Cred::Admin)
        .await
        .ok(200);
    let (expired, _) = env
        .create(
            Cred::Admin,
            json!({"owner": "alice", "name": "ci", "ttl_seconds": 1}),
        )
        .await;
    let expired = id_of(&expired);
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let listed = |path: &'static str| {
        let env = &env;
        async move { ids(&env.all_pages(path, Cred::Admin, 1).await.0) }
    };
    assert_eq!(listed("/keys?state=active").await, active);
    assert_eq!(listed("/keys?state=revoked").await, vec![revoked.clone()]);
    assert_eq!(listed("/keys?state=expired").await, vec![expired.clone()]);
    assert_eq!(
        listed("/keys?name=ci").await,
        [
            active[0].clone(),
            active[2].clone(),
            revoked.clone(),
            expired.clone()
        ]
    );
    assert_eq!(
        listed("/keys?name=ci&state=active").await,
        [active[0].clone(), active[2].clone()]
    );
    assert_eq!(listed("/keys?scope=read").await, active[..3].to_vec());
    assert_eq!(
        listed("/keys?scope=write&owner=alice").await,
        [active[3].clone(), revoked]
    );
    assert!(listed("/keys?name=nobody").await.is_empty());
    env.get("/keys?state=gone", Cred::Admin)
        .await
        .invalid(&["state"]);
    env.get("/keys?name=&scope=", Cred::Admin)
        .await
        .invalid(&["name", "scope"]);
}

/// Two gateways on one database: a change made through one is in force on the other
/// within a second (LISTEN/NOTIFY), here an allowlist that shuts the key out.
#[tokio::test]
async fn a_change_on_one_gateway_holds_on_the_other_within_a_second() {
    use crate::common::cluster::{ADMIN as CLUSTER_ADMIN, Instance};

    let db = crate::common::pg::fresh_database();
    let upstream = Upstream::start("api").await;
    let one = Instance::start(&db, upstream.addr).await;
    let two = Instance::start(&db, upstream.addr).await;
    let (id, key) = one.create_key("alice").await;
    assert_eq!(two.call(&key).await.0, 200, "cached on the other gateway");
    assert_eq!(two.call(&key).await.0, 200);
    let resp = client()
        .patch(format!("{}/_keygate/keys/{id}", one.base()))
        .bearer_auth(CLUSTER_ADMIN)
        .json(&json!({"allowed_ips": ["192.0.2.0/24"], "metadata": {"tier": "gold"}}))
        .send()
        .await
        .expect("patch");
    assert_eq!(resp.status(), 200);
    let answered = Instant::now();
    assert_eq!(one.call(&key).await, (403, "ip_not_allowed".to_string()));
    loop {
        let (status, code) = two.call(&key).await;
        if status == 403 {
            assert_eq!(code, "ip_not_allowed");
            break;
        }
        assert_eq!(status, 200, "{code}");
        assert!(
            answered.elapsed() < Duration::from_secs(1),
            "the other gateway still admits the key a second after the change"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "the other gateway saw the change {:?} after the answer",
        answered.elapsed()
    );
    assert_eq!(two.get_key(&id).await["metadata"], json!({"tier": "gold"}));
}

/// `[keys] purge_revoked_after_days`: the housekeeping task (which runs once at start,
/// then hourly) deletes keys revoked or expired that long ago; their audit entries stay,
/// and keys that died more recently stay.
#[tokio::test]
async fn long_dead_keys_are_purged_by_housekeeping() {
    use keygate::keys::{KeyFormat, KeyRecord, new_key_id};
    use keygate::store::{AuditEntry, KeyStore, SledStore};

    let upstream = Upstream::start("api").await;
    let mut config = Env::config(GENEROUS, &upstream);
    config.extra = format!("[keys]\npurge_revoked_after_days = 2\n\n{}", config.extra);
    let format = KeyFormat::new("kg");
    let fresh = |owner: &str| {
        let raw = format.generate().expect("rng");
        KeyRecord::for_key(&format, &raw, owner, now() - 10 * 86_400)
    };
    let old_revoked = KeyRecord {
        revoked_at: Some(now() - 3 * 86_400),
        ..fresh("alice")
    };
    let old_expired = KeyRecord {
        expires_at: Some(now() - 5 * 86_400),
        ..fresh("alice")
    };
    let recently_revoked = KeyRecord {
        revoked_at: Some(now() - 86_400),
        ..fresh("alice")
    };
    let live = fresh("alice");
    {
        let store = SledStore::open(&config.store_path()).expect("sled");
        for key in [&old_revoked, &old_expired, &recently_revoked, &live] {
            store.insert(key).await.expect("insert");
        }
        let entry = AuditEntry {
            id: new_key_id(),
            actor: "admin".into(),
            action: "revoke".into(),
            key_id: Some(old_revoked.id.clone()),
            at: now() - 3 * 86_400,
            client: None,
        };
        store.append_audit(&entry).await.expect("audit");
    }
    let env = Env::on(config, upstream).await;
    let mut left = Vec::new();
    for _ in 0..100 {
        left = ids(&env.all_pages("/keys", Cred::Admin, 100).await.0);
        if left.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut want = vec![recently_revoked.id.clone(), live.id.clone()];
    want.sort();
    assert_eq!(left, want, "only the long-dead keys are purged");
    env.get(&format!("/keys/{}", old_revoked.id), Cred::Admin)
        .await
        .err(404, "not_found");
    let audit = env.get("/audit", Cred::Admin).await;
    let kept = audit.ok(200)["data"]
        .as_array()
        .expect("data")
        .iter()
        .any(|e| e["key_id"] == old_revoked.id.as_str());
    assert!(kept, "the purged key's audit entries are kept");
}
