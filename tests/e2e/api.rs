//! End-to-end tests of the management API (contract sections 3, 5, 6 and 7): the real
//! binary, a real upstream, real HTTP, the admin token from `KEYGATE_ADMIN_TOKEN`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::keys::{assert_key_format, with_char_changed};
use crate::common::management::*;
use crate::common::*;

/// The fields every record carries (contract section 5).
const RECORD_FIELDS: &[&str] = &[
    "id",
    "name",
    "preview",
    "owner",
    "scopes",
    "created_at",
    "expires_at",
    "revoked_at",
    "last_used",
    "usage_count",
    "rate_limit",
    "metadata",
];

// ---------------------------------------------------------------- 1. create

#[tokio::test]
async fn admin_creates_a_key_whose_record_follows_the_contract_and_which_works() {
    let env = Env::start(GENEROUS).await;
    let before = now();
    let reply = env
        .post(
            "/keys",
            Cred::Admin,
            json!({
                "owner": "alice",
                "scopes": ["read", "write"],
                "rate_limit": {"requests": 100, "window_seconds": 60},
                "metadata": {"team": "payments", "n": 3}
            }),
        )
        .await;
    let record = reply.ok(201).clone();
    let after = now();
    let obj = record.as_object().expect("record object");
    for field in RECORD_FIELDS.iter().chain(&["key"]) {
        assert!(obj.contains_key(*field), "no {field} in {record}");
    }
    assert!(
        !obj.keys().any(|k| k.contains("hash")),
        "a hash field in {record}"
    );
    let key = record["key"].as_str().expect("key").to_string();
    assert_key_format(&key);

    let id = id_of(&record);
    assert!(
        !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "id {id:?} is not URL-safe"
    );
    assert!(!key.contains(&id), "the id appears in the key");
    assert_eq!(record["name"], "default");
    assert_eq!(
        record["preview"].as_str(),
        Some(format!("kg_{}…{}", &key[3..7], &key[key.len() - 4..]).as_str())
    );
    assert_eq!(record["owner"], "alice");
    assert_eq!(record["scopes"], json!(["read", "write"]));
    let created = whole_second_utc(&record["created_at"], "created_at");
    assert!(
        (before - 1..=after + 1).contains(&created),
        "created_at {created} not between {before} and {after}"
    );
    assert_eq!(record["expires_at"], Value::Null);
    assert_eq!(record["revoked_at"], Value::Null);
    assert_eq!(record["last_used"], Value::Null);
    assert_eq!(record["usage_count"], 0);
    assert_eq!(
        record["rate_limit"],
        json!({"requests": 100, "window_seconds": 60})
    );
    assert_eq!(record["metadata"], json!({"team": "payments", "n": 3}));

    // GET shows the same record, without the key.
    let got = env.record(&id).await;
    assert!(got.get("key").is_none(), "GET shows the key: {got}");
    assert_eq!(got["preview"], record["preview"]);
    assert_eq!(got["usage_count"], 0);

    // The key works through the proxy, and its use is counted.
    env.assert_admitted(&key, "the new key").await;
    let seen = env.upstream.seen().pop().expect("upstream saw the request");
    assert_eq!(
        seen.header("x-keygate-key-id").as_deref(),
        Some(id.as_str())
    );
    assert_eq!(seen.header("x-keygate-owner").as_deref(), Some("alice"));
    let got = env.record(&id).await;
    assert!(
        got["usage_count"].as_u64().is_some_and(|n| n >= 1),
        "usage not counted: {got}"
    );
    let last_used = whole_second_utc(&got["last_used"], "last_used");
    assert!(last_used >= created && last_used <= now() + 1, "{got}");
}

// ---------------------------------------------------------------- 2. create validation

#[tokio::test]
async fn create_validates_expiry_name_scopes_metadata_and_rate_limit() {
    let env = Env::start(GENEROUS).await;

    creates_at_the_bounds(&env).await;

    let cases = [invalid_create_fields(), invalid_create_values()].concat();
    for (what, body, fields) in cases {
        let reply = env.post("/keys", Cred::Admin, body).await;
        assert_eq!(reply.status, 422, "{what}: {}", reply.text);
        reply.invalid(fields);
    }

    // Both expires_at and ttl_seconds: 422 naming one of them.
    let reply = env
        .post(
            "/keys",
            Cred::Admin,
            json!({"owner": "alice", "ttl_seconds": 60, "expires_at": "2031-01-01T00:00:00Z"}),
        )
        .await;
    let details = reply.err(422, "validation_failed")["details"].clone();
    assert!(
        details.get("expires_at").is_some() || details.get("ttl_seconds").is_some(),
        "both expiry fields: details {details}"
    );

    // None of the refused calls created a key: alice has exactly the three made above.
    let list = env.get("/keys?owner=alice", Cred::Admin).await;
    assert_eq!(
        list.ok(200)["data"].as_array().map(Vec::len),
        Some(3),
        "{}",
        list.text
    );
}

/// ttl_seconds, an expires_at with an offset and a fraction, and a 100-character name are
/// accepted (three keys for alice).
async fn creates_at_the_bounds(env: &Env) {
    // ttl_seconds
    let t0 = now();
    let (record, _) = env
        .create(Cred::Admin, json!({"owner": "alice", "ttl_seconds": 3600}))
        .await;
    let expires = whole_second_utc(&record["expires_at"], "expires_at from ttl");
    assert!(
        (t0 + 3600 - 1..=now() + 3600 + 1).contains(&expires),
        "ttl 3600 gave expires_at {expires}, now {t0}"
    );

    // expires_at with an offset and a fraction comes back as UTC whole seconds.
    let (record, key) = env
        .create(
            Cred::Admin,
            json!({"owner": "alice", "expires_at": "2031-03-04T05:06:07.891+02:00"}),
        )
        .await;
    assert_eq!(record["expires_at"], "2031-03-04T03:06:07Z");
    assert_eq!(
        env.record(&id_of(&record)).await["expires_at"],
        "2031-03-04T03:06:07Z"
    );
    env.assert_admitted(&key, "a key expiring in 2031").await;

    // A 100-character name is fine; 101 is not.
    let (record, _) = env
        .create(
            Cred::Admin,
            json!({"owner": "alice", "name": "n".repeat(100)}),
        )
        .await;
    assert_eq!(record["name"].as_str().map(str::len), Some(100));
}

/// A refused create's body, and the fields its 422 must name.
type InvalidCreate = (&'static str, Value, &'static [&'static str]);

/// Bad expiry, name, scopes and metadata.
fn invalid_create_fields() -> Vec<InvalidCreate> {
    vec![
        (
            "expires_at in the past",
            json!({"owner": "alice", "expires_at": "2020-01-01T00:00:00Z"}),
            &["expires_at"],
        ),
        (
            "expires_at not a time",
            json!({"owner": "alice", "expires_at": "tomorrow"}),
            &["expires_at"],
        ),
        (
            "name of 101 characters",
            json!({"owner": "alice", "name": "n".repeat(101)}),
            &["name"],
        ),
        (
            "empty name",
            json!({"owner": "alice", "name": ""}),
            &["name"],
        ),
        (
            "scope with capitals and a space",
            json!({"owner": "alice", "scopes": ["Read All"]}),
            &["scopes"],
        ),
        (
            "scope of 65 characters",
            json!({"owner": "alice", "scopes": ["s".repeat(65)]}),
            &["scopes"],
        ),
        (
            "33 scopes",
            json!({"owner": "alice", "scopes": (0..33).map(|i| format!("s{i}")).collect::<Vec<_>>()}),
            &["scopes"],
        ),
        (
            "metadata over 4 KiB",
            json!({"owner": "alice", "metadata": {"blob": "x".repeat(4200)}}),
            &["metadata"],
        ),
        (
            "metadata not an object",
            json!({"owner": "alice", "metadata": [1, 2]}),
            &["metadata"],
        ),
    ]
}

/// Bad rate limits, ttl, owner and unknown fields.
fn invalid_create_values() -> Vec<InvalidCreate> {
    vec![
        (
            "rate_limit as a number",
            json!({"owner": "alice", "rate_limit": 100}),
            &["rate_limit"],
        ),
        (
            "rate_limit without window_seconds",
            json!({"owner": "alice", "rate_limit": {"requests": 10}}),
            &["rate_limit"],
        ),
        (
            "rate_limit with a string",
            json!({"owner": "alice", "rate_limit": {"requests": "ten", "window_seconds": 60}}),
            &["rate_limit"],
        ),
        (
            "rate_limit of zero requests",
            json!({"owner": "alice", "rate_limit": {"requests": 0, "window_seconds": 60}}),
            &["rate_limit"],
        ),
        (
            "ttl_seconds zero",
            json!({"owner": "alice", "ttl_seconds": 0}),
            &["ttl_seconds"],
        ),
        (
            "ttl_seconds a string",
            json!({"owner": "alice", "ttl_seconds": "60"}),
            &["ttl_seconds"],
        ),
        ("admin without owner", json!({"name": "x"}), &["owner"]),
        (
            "bad owner charset",
            json!({"owner": "alice smith!"}),
            &["owner"],
        ),
        (
            "unknown field",
            json!({"owner": "alice", "colour": "red"}),
            &["colour"],
        ),
        (
            "several bad fields at once",
            json!({
                "owner": "alice",
                "name": "",
                "scopes": ["NOPE"],
                "rate_limit": {"requests": 1},
                "metadata": "text",
                "bogus": true
            }),
            &["name", "scopes", "rate_limit", "metadata", "bogus"],
        ),
    ]
}

// ---------------------------------------------------------------- 3. auth and routing

#[tokio::test]
async fn every_path_checks_credentials_and_routing_answers_404_and_405() {
    let env = Env::start(GENEROUS).await;
    let (plain, plain_key) = env.admin_create("alice", &["read"]).await;
    let plain_id = id_of(&plain);

    refuses_missing_and_wrong_credentials(&env).await;

    refuses_keys_without_keys_manage(&env, &plain_id, &plain_key).await;

    answers_unknown_paths_404_and_wrong_methods_405(&env, &plain_id).await;

    // The admin token and keys:manage keys get in, with the key in any of the three headers.
    env.get("/keys", Cred::Admin).await.ok(200);
    let (_, manager) = env.admin_create("alice", &["keys:manage"]).await;
    env.get("/keys", Cred::Key(&manager)).await.ok(200);
    env.get("/keys", Cred::KeyHeader(&manager)).await.ok(200);
    env.get("/keys", Cred::Bearer(&manager)).await.ok(200);

    // openapi.json needs no credentials.
    let reply = env.get("/openapi.json", Cred::None).await;
    let doc = reply.ok(200);
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "openapi: {}",
        doc["openapi"]
    );
    assert!(doc["paths"].is_object(), "no paths in the OpenAPI document");
}

/// Authenticated: an unknown path or id is 404 `not_found`; a known path with the wrong method
/// 405 `method_not_allowed` with `Allow`.
async fn answers_unknown_paths_404_and_wrong_methods_405(env: &Env, plain_id: &str) {
    // Authenticated, unknown path: 404 not_found.
    for path in ["/nope", "/keys/a/b/c", "/keys/x/rotate/more"] {
        env.get(path, Cred::Admin).await.err(404, "not_found");
    }
    // An unknown id: 404.
    env.get("/keys/01ARZ3NDEKTSV4RRFFQ69G5FAV", Cred::Admin)
        .await
        .err(404, "not_found");

    // Known path, wrong method: 405 with Allow.
    let reply = env
        .send(Method::PUT, "/keys", Cred::Admin, Body::None)
        .await;
    reply.err(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("GET, POST"));
    let reply = env.get("/keys/revoke", Cred::Admin).await;
    reply.err(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("POST"));
    let reply = env
        .send(
            Method::GET,
            &format!("/keys/{plain_id}/rotate"),
            Cred::Admin,
            Body::None,
        )
        .await;
    reply.err(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("POST"));
    let reply = env.delete("/audit", Cred::Admin).await;
    reply.err(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("GET"));
}

/// A valid key without `keys:manage`: 403 `insufficient_scope` everywhere, and nothing happens
/// to it.
async fn refuses_keys_without_keys_manage(env: &Env, plain_id: &str, plain_key: &str) {
    // A valid key without keys:manage: 403 insufficient_scope.
    env.get("/keys", Cred::Key(plain_key))
        .await
        .err(403, "insufficient_scope");
    env.get(&format!("/keys/{plain_id}"), Cred::Key(plain_key))
        .await
        .err(403, "insufficient_scope");
    env.post("/keys", Cred::Key(plain_key), json!({}))
        .await
        .err(403, "insufficient_scope");
    env.post(
        &format!("/keys/{plain_id}/rotate"),
        Cred::Key(plain_key),
        json!({}),
    )
    .await
    .err(403, "insufficient_scope");
    env.delete(&format!("/keys/{plain_id}"), Cred::Key(plain_key))
        .await
        .err(403, "insufficient_scope");
    env.get("/audit", Cred::Key(plain_key))
        .await
        .err(403, "insufficient_scope");
    // ... and nothing happened to it.
    env.assert_admitted(plain_key, "the key after its refused calls")
        .await;
}

/// Without credentials 401 `missing_credentials` (with a challenge), with a wrong admin token
/// or an unknown key 401 `invalid_key`, on known and unknown paths.
async fn refuses_missing_and_wrong_credentials(env: &Env) {
    // Without credentials: 401 missing_credentials, whatever the path and method.
    let paths: &[(Method, &str)] = &[
        (Method::GET, "/keys"),
        (Method::POST, "/keys"),
        (Method::GET, "/keys/xyz"),
        (Method::DELETE, "/keys/xyz"),
        (Method::POST, "/keys/xyz/rotate"),
        (Method::POST, "/keys/revoke"),
        (Method::GET, "/audit"),
        (Method::GET, "/nope"),
        (Method::PUT, "/keys"),
        (Method::GET, ""),
    ];
    for (method, path) in paths {
        let reply = env.send(method.clone(), path, Cred::None, Body::None).await;
        reply.err(401, "missing_credentials");
        assert!(
            reply
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "{}: no WWW-Authenticate",
            reply.what
        );
    }

    // A wrong admin token, or an unknown key: 401 invalid_key, on known and unknown paths.
    let unknown = foreign_key();
    for path in ["/keys", "/keys/xyz", "/audit", "/nope"] {
        env.get(path, Cred::Bearer("not-the-admin-token"))
            .await
            .err(401, "invalid_key");
        env.get(path, Cred::Key(&unknown))
            .await
            .err(401, "invalid_key");
    }
    env.get("/keys", Cred::Bearer(&format!("{ADMIN}x")))
        .await
        .err(401, "invalid_key");
}

// ---------------------------------------------------------------- 4. owner isolation

#[tokio::test]
async fn a_key_sees_and_touches_only_its_own_owners_keys() {
    let env = Env::start(GENEROUS).await;
    let (alice_mgr, alice_key) = env.admin_create("alice", &["keys:manage", "read"]).await;
    let (bob, bob_key) = env.admin_create("bob", &["read"]).await;
    let (bob_mgr, _) = env.admin_create("bob", &["keys:manage"]).await;
    let bob_id = id_of(&bob);
    let a = Cred::Key(&alice_key);

    env.get(&format!("/keys/{bob_id}"), a)
        .await
        .err(404, "not_found");
    env.delete(&format!("/keys/{bob_id}"), a)
        .await
        .err(404, "not_found");
    env.post(
        &format!("/keys/{bob_id}/rotate"),
        a,
        json!({"grace_seconds": 0}),
    )
    .await
    .err(404, "not_found");
    env.post("/keys/revoke", a, json!({"key": bob_key}))
        .await
        .err(404, "not_found");
    // The 404 for another owner's key is the 404 for a key that does not exist.
    env.get("/keys/01ARZ3NDEKTSV4RRFFQ69G5FAV", a)
        .await
        .err(404, "not_found");

    // Bob's key is untouched.
    env.assert_admitted(&bob_key, "bob's key after alice's attempts")
        .await;
    let record = env.record(&bob_id).await;
    assert_eq!(record["revoked_at"], Value::Null, "{record}");
    assert_eq!(record["expires_at"], Value::Null, "{record}");

    // Alice's listing shows only alice's keys, even when she asks for bob's.
    for path in ["/keys", "/keys?owner=bob"] {
        let list = env.get(path, a).await;
        let data = list.ok(200)["data"].as_array().expect("data").clone();
        assert_eq!(ids(&data), vec![id_of(&alice_mgr)], "{path}: {}", list.text);
    }
    // Alice can read her own record.
    env.get(&format!("/keys/{}", id_of(&alice_mgr)), a)
        .await
        .ok(200);

    // The admin sees everyone; ?owner= filters.
    let all = env.get("/keys", Cred::Admin).await;
    let all_ids: HashSet<String> = ids(all.ok(200)["data"].as_array().expect("data"))
        .into_iter()
        .collect();
    let expected: HashSet<String> = [id_of(&alice_mgr), bob_id.clone(), id_of(&bob_mgr)]
        .into_iter()
        .collect();
    assert_eq!(all_ids, expected);
    let bobs = env.get("/keys?owner=bob", Cred::Admin).await;
    let data = bobs.ok(200)["data"].as_array().expect("data").clone();
    assert!(data.iter().all(|r| r["owner"] == "bob"), "{}", bobs.text);
    let bob_ids: HashSet<String> = ids(&data).into_iter().collect();
    assert_eq!(
        bob_ids,
        [bob_id.clone(), id_of(&bob_mgr)].into_iter().collect()
    );
    let nobody = env.get("/keys?owner=carol", Cred::Admin).await;
    assert_eq!(nobody.ok(200)["data"], json!([]));
}

// ---------------------------------------------------------------- 5. escalation

#[tokio::test]
async fn a_manager_key_cannot_escalate_scopes_or_change_owner_and_its_keys_inherit() {
    let env = Env::start(GENEROUS).await;
    let (mgr, mgr_key) = env
        .admin_create("alice", &["keys:manage", "read", "write"])
        .await;
    let m = Cred::Key(&mgr_key);

    // A scope it does not hold: 403.
    for scopes in [json!(["admin"]), json!(["read", "billing"])] {
        env.post("/keys", m, json!({"scopes": scopes}))
            .await
            .err(403, "insufficient_scope");
    }
    // Another owner: 422 naming owner.
    env.post("/keys", m, json!({"owner": "bob"}))
        .await
        .invalid(&["owner"]);
    // Nothing was created for bob or for alice.
    let bobs = env.get("/keys?owner=bob", Cred::Admin).await;
    assert_eq!(bobs.ok(200)["data"], json!([]));
    let alices = env.get("/keys?owner=alice", Cred::Admin).await;
    assert_eq!(
        ids(alices.ok(200)["data"].as_array().expect("data")),
        vec![id_of(&mgr)]
    );

    // By default the new key inherits owner and every scope.
    let (child, child_key) = env.create(m, json!({})).await;
    assert_eq!(child["owner"], "alice");
    let mut scopes: Vec<String> = serde_json::from_value(child["scopes"].clone()).expect("scopes");
    scopes.sort();
    assert_eq!(scopes, ["keys:manage", "read", "write"]);
    env.assert_admitted(&child_key, "the inherited key").await;

    // A subset of its scopes, and its own owner named explicitly, are fine.
    let (narrow, narrow_key) = env
        .create(
            m,
            json!({"owner": "alice", "scopes": ["read"], "name": "reader"}),
        )
        .await;
    assert_eq!(narrow["owner"], "alice");
    assert_eq!(narrow["scopes"], json!(["read"]));
    assert_eq!(narrow["name"], "reader");
    // The narrow key holds no keys:manage, so it cannot create keys itself.
    env.post("/keys", Cred::Key(&narrow_key), json!({}))
        .await
        .err(403, "insufficient_scope");
    // A key with keys:manage and nothing else cannot grant "read".
    let (_, bare_mgr) = env.create(m, json!({"scopes": ["keys:manage"]})).await;
    env.post("/keys", Cred::Key(&bare_mgr), json!({"scopes": ["read"]}))
        .await
        .err(403, "insufficient_scope");
}

// ---------------------------------------------------------------- 6. no raw keys in listings

#[tokio::test]
async fn listings_and_records_never_contain_raw_keys_or_hashes() {
    let env = Env::start(GENEROUS).await;
    let mut raw = Vec::new();
    let mut records = Vec::new();
    for (owner, scopes) in [
        ("alice", vec!["keys:manage"]),
        ("alice", vec!["read"]),
        ("bob", vec![]),
        ("carol", vec!["read", "write"]),
    ] {
        let (record, key) = env.admin_create(owner, &scopes).await;
        raw.push(key);
        records.push(record);
    }
    // A rotated key too.
    let rotated = env
        .post(
            &format!("/keys/{}/rotate", id_of(&records[1])),
            Cred::Admin,
            json!({"grace_seconds": 60}),
        )
        .await;
    raw.push(rotated.ok(201)["key"].as_str().expect("key").to_string());

    let check = |what: &str, reply: &Reply| {
        for key in &raw {
            assert!(
                !reply.text.contains(key.as_str()) && !reply.text.contains(&key[3..]),
                "{what} contains a raw key: {}",
                reply.text
            );
        }
        assert!(
            !reply.text.contains("\"hash\"") && !reply.text.contains("hash\""),
            "{what} contains a hash field: {}",
            reply.text
        );
        assert!(
            !reply.text.contains("\"key\""),
            "{what} contains a key field: {}",
            reply.text
        );
    };

    let list = env.get("/keys", Cred::Admin).await;
    let data = list.ok(200)["data"].as_array().expect("data").clone();
    assert_eq!(data.len(), 5, "{}", list.text);
    for record in &data {
        let obj = record.as_object().expect("record");
        for field in RECORD_FIELDS {
            assert!(obj.contains_key(*field), "no {field} in listed {record}");
        }
        assert!(obj.get("key").is_none() && !obj.keys().any(|k| k.contains("hash")));
    }
    check("GET /keys (admin)", &list);
    check(
        "GET /keys?owner=alice",
        &env.get("/keys?owner=alice", Cred::Admin).await,
    );
    check(
        "GET /keys?limit=1",
        &env.get("/keys?limit=1", Cred::Admin).await,
    );
    check(
        "GET /keys (alice's manager key)",
        &env.get("/keys", Cred::Key(&raw[0])).await,
    );
    for record in &records {
        let path = format!("/keys/{}", id_of(record));
        check(&format!("GET {path}"), &env.get(&path, Cred::Admin).await);
    }
}

// ---------------------------------------------------------------- 7. revoke by id

#[tokio::test]
async fn revoke_takes_effect_at_once_and_is_idempotent() {
    let env = Env::start(GENEROUS).await;
    let (record, key) = env.admin_create("alice", &["read"]).await;
    let id = id_of(&record);
    // Used once, so it sits in the cache.
    env.assert_admitted(&key, "before the revoke").await;
    env.assert_admitted(&key, "before the revoke, cached").await;

    let before = now();
    let reply = env.delete(&format!("/keys/{id}"), Cred::Admin).await;
    let body = reply.ok(200).clone();
    assert_eq!(body["id"].as_str(), Some(id.as_str()), "{body}");
    assert_eq!(body["revoked"], true, "{body}");
    let revoked_at = whole_second_utc(&body["revoked_at"], "revoked_at");
    assert!(
        (before - 1..=now() + 1).contains(&revoked_at),
        "revoked_at {revoked_at}"
    );
    // Refused from the moment the revoke was answered.
    assert_eq!(env.proxied(&key).await, (401, "invalid_key".to_string()));
    // And by the management API too.
    env.get("/keys", Cred::Key(&key))
        .await
        .err(401, "invalid_key");

    // Revoking again, a second later: 200 with the first revoked_at.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = env.delete(&format!("/keys/{id}"), Cred::Admin).await;
    let again = again.ok(200);
    assert_eq!(again["revoked"], true);
    assert_eq!(again["id"], body["id"]);
    assert_eq!(
        again["revoked_at"], body["revoked_at"],
        "revoked_at changed"
    );

    // The record shows it; listings keep the revoked key.
    let got = env.record(&id).await;
    assert_eq!(got["revoked_at"], body["revoked_at"], "{got}");
    let list = env.get("/keys?owner=alice", Cred::Admin).await;
    let data = list.ok(200)["data"].as_array().expect("data").clone();
    let listed = data
        .iter()
        .find(|r| r["id"] == id.as_str())
        .expect("revoked key listed");
    assert_eq!(listed["revoked_at"], body["revoked_at"]);

    // A revoked key cannot be rotated.
    env.post(&format!("/keys/{id}/rotate"), Cred::Admin, json!({}))
        .await
        .err(409, "key_revoked");
    // An unknown id: 404.
    env.delete("/keys/01ARZ3NDEKTSV4RRFFQ69G5FAV", Cred::Admin)
        .await
        .err(404, "not_found");
    assert_eq!(env.proxied(&key).await, (401, "invalid_key".to_string()));
}

// ---------------------------------------------------------------- 8. rotation

#[tokio::test]
async fn rotation_keeps_the_old_key_for_the_grace_period_only() {
    let env = Env::start(GENEROUS).await;
    let (old, old_key) = env
        .create(
            Cred::Admin,
            json!({
                "owner": "alice",
                "name": "ci",
                "scopes": ["read"],
                "rate_limit": {"requests": 1000, "window_seconds": 60},
                "metadata": {"env": "prod"}
            }),
        )
        .await;
    let old_id = id_of(&old);
    env.assert_admitted(&old_key, "old key before rotation")
        .await;

    let reply = env
        .post(
            &format!("/keys/{old_id}/rotate"),
            Cred::Admin,
            json!({"grace_seconds": 2}),
        )
        .await;
    let new = reply.ok(201).clone();
    let new_key = new["key"].as_str().expect("key").to_string();
    assert_key_format(&new_key);
    assert_ne!(new_key, old_key);
    assert_ne!(id_of(&new), old_id);
    assert_eq!(new["rotated_from"].as_str(), Some(old_id.as_str()), "{new}");
    // Same settings.
    for field in [
        "name",
        "owner",
        "scopes",
        "rate_limit",
        "metadata",
        "expires_at",
    ] {
        assert_eq!(new[field], old[field], "{field} differs after rotation");
    }
    assert_eq!(new["usage_count"], 0);
    assert_eq!(new["revoked_at"], Value::Null);

    // Both work right away.
    env.assert_admitted(&old_key, "old key inside the grace period")
        .await;
    env.assert_admitted(&new_key, "new key").await;
    // The old record now expires within the grace period.
    let old_record = env.record(&old_id).await;
    let expires = whole_second_utc(&old_record["expires_at"], "old key's expires_at");
    assert!(expires <= now() + 2, "old key expires at {expires}");

    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, code) = env.proxied(&old_key).await;
    assert!(
        status == 401 && (code == "key_expired" || code == "invalid_key"),
        "old key after the grace period: {status} {code}"
    );
    env.assert_admitted(&new_key, "new key after the grace period")
        .await;

    rotation_grace_zero_default_and_bounds(&env).await;
}

/// Grace 0 refuses the old key at once, an empty body means grace 0, and grace_seconds out
/// of bounds or of the wrong type is 422 (the upper bound itself is accepted).
async fn rotation_grace_zero_default_and_bounds(env: &Env) {
    // Grace 0: the old key is refused at once (the new one keeps working).
    let (second, second_key) = env.admin_create("alice", &["read"]).await;
    env.assert_admitted(&second_key, "second key before rotation")
        .await;
    let reply = env
        .post(
            &format!("/keys/{}/rotate", id_of(&second)),
            Cred::Admin,
            json!({"grace_seconds": 0}),
        )
        .await;
    let replacement = reply.ok(201)["key"].as_str().expect("key").to_string();
    let (status, code) = env.proxied(&second_key).await;
    assert!(
        status == 401 && (code == "key_expired" || code == "invalid_key"),
        "old key after rotation with grace 0: {status} {code}"
    );
    env.assert_admitted(&replacement, "replacement key").await;

    // The default grace is 0 too (empty body).
    let (third, third_key) = env.admin_create("alice", &["read"]).await;
    let reply = env
        .send(
            Method::POST,
            &format!("/keys/{}/rotate", id_of(&third)),
            Cred::Admin,
            Body::None,
        )
        .await;
    reply.ok(201);
    assert_eq!(env.proxied(&third_key).await.0, 401, "default grace");

    // Out of bounds or wrong type: 422 naming grace_seconds; the key is not rotated.
    let (fourth, fourth_key) = env.admin_create("alice", &["read"]).await;
    for grace in [json!(604_801), json!(-1), json!("10")] {
        env.post(
            &format!("/keys/{}/rotate", id_of(&fourth)),
            Cred::Admin,
            json!({"grace_seconds": grace}),
        )
        .await
        .invalid(&["grace_seconds"]);
    }
    env.assert_admitted(&fourth_key, "key after refused rotations")
        .await;
    // The upper bound itself is accepted.
    env.post(
        &format!("/keys/{}/rotate", id_of(&fourth)),
        Cred::Admin,
        json!({"grace_seconds": 604_800}),
    )
    .await
    .ok(201);
    env.assert_admitted(&fourth_key, "key with a week of grace")
        .await;
}

// ---------------------------------------------------------------- 9. revoke by value

#[tokio::test]
async fn revoke_by_value_for_the_key_itself_its_manager_and_the_admin() {
    let env = Env::start(GENEROUS).await;
    let (own, own_key) = env.admin_create("alice", &["read"]).await;
    let (sibling, sibling_key) = env.admin_create("alice", &["read"]).await;
    let (_, mgr_key) = env.admin_create("alice", &["keys:manage", "read"]).await;

    // A key without keys:manage cannot revoke a sibling by value.
    let reply = env
        .post(
            "/keys/revoke",
            Cred::Key(&own_key),
            json!({"key": sibling_key}),
        )
        .await;
    assert!(
        matches!(reply.status, 403 | 404),
        "revoking a sibling without keys:manage: {} {}",
        reply.status,
        reply.text
    );
    env.assert_admitted(&sibling_key, "sibling after the refused revoke")
        .await;

    // The key revokes itself, without keys:manage.
    let reply = env
        .post("/keys/revoke", Cred::Key(&own_key), json!({"key": own_key}))
        .await;
    let body = reply.ok(200).clone();
    assert_eq!(body["id"].as_str(), Some(id_of(&own).as_str()), "{body}");
    assert_eq!(body["revoked"], true);
    whole_second_utc(&body["revoked_at"], "revoked_at");
    assert_eq!(
        env.proxied(&own_key).await,
        (401, "invalid_key".to_string())
    );

    // Already revoked: 200 again with the first revoked_at, from its manager and the admin.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for cred in [Cred::Key(&mgr_key), Cred::Admin] {
        let again = env
            .post("/keys/revoke", cred, json!({"key": own_key}))
            .await;
        let again = again.ok(200);
        assert_eq!(again["id"], body["id"]);
        assert_eq!(again["revoked"], true);
        assert_eq!(again["revoked_at"], body["revoked_at"]);
    }
    assert_eq!(
        env.record(&id_of(&own)).await["revoked_at"],
        body["revoked_at"]
    );

    revoke_by_value_refuses_unknown_keys(&env, &mgr_key, &sibling_key).await;

    // The admin revokes by value.
    let reply = env
        .post("/keys/revoke", Cred::Admin, json!({"key": sibling_key}))
        .await;
    let body = reply.ok(200);
    assert_eq!(body["id"].as_str(), Some(id_of(&sibling).as_str()));
    assert_eq!(body["revoked"], true);
    whole_second_utc(&body["revoked_at"], "revoked_at");
    assert_eq!(
        env.proxied(&sibling_key).await,
        (401, "invalid_key".to_string())
    );

    a_manager_revokes_its_owners_key_by_value(&env, &mgr_key).await;
}

/// A manager key revokes a key of its own owner by value.
async fn a_manager_revokes_its_owners_key_by_value(env: &Env, mgr_key: &str) {
    // A manager revokes a key of its own owner by value.
    let (third, third_key) = env.admin_create("alice", &["read"]).await;
    let reply = env
        .post(
            "/keys/revoke",
            Cred::Key(mgr_key),
            json!({"key": third_key}),
        )
        .await;
    assert_eq!(reply.ok(200)["id"].as_str(), Some(id_of(&third).as_str()));
    assert_eq!(
        env.proxied(&third_key).await,
        (401, "invalid_key".to_string())
    );
}

/// Revoking malformed (bad checksum, bad shape) and unknown keys by value is 404, without a
/// `key` field 422; the sibling key still works.
async fn revoke_by_value_refuses_unknown_keys(env: &Env, mgr_key: &str, sibling_key: &str) {
    // Malformed (bad checksum, bad shape) and unknown keys: 404.
    let foreign = foreign_key();
    for cred in [Cred::Key(mgr_key), Cred::Admin] {
        for bad in [
            with_char_changed(sibling_key, 10),
            "kg_short".to_string(),
            "not-a-key".to_string(),
            foreign.clone(),
        ] {
            env.post("/keys/revoke", cred, json!({"key": bad}))
                .await
                .err(404, "not_found");
        }
        // No key field: 422.
        env.post("/keys/revoke", cred, json!({}))
            .await
            .invalid(&["key"]);
    }
    env.assert_admitted(sibling_key, "sibling after the 404s")
        .await;
}

// ---------------------------------------------------------------- 10. pagination

#[tokio::test]
async fn listing_pages_chain_without_duplicates_or_gaps() {
    let env = Env::start(GENEROUS).await;
    let mut created = Vec::new();
    for i in 0..7 {
        let (record, _) = env
            .create(
                Cred::Admin,
                json!({"owner": "pager", "name": format!("k{i}")}),
            )
            .await;
        created.push(id_of(&record));
        // Another owner's keys interleaved: the filter must skip them.
        env.admin_create("other", &[]).await;
    }
    let expected: HashSet<String> = created.iter().cloned().collect();

    let (items, sizes) = env.all_pages("/keys?owner=pager", Cred::Admin, 3).await;
    assert_eq!(sizes, vec![3, 3, 1]);
    let seen = ids(&items);
    assert_eq!(seen.len(), 7);
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), expected);
    assert!(items.iter().all(|r| r["owner"] == "pager"));

    // A key created between page fetches neither duplicates nor hides earlier keys.
    let first = env.get("/keys?owner=pager&limit=3", Cred::Admin).await;
    let first = first.ok(200).clone();
    let mut seen = ids(first["data"].as_array().expect("data"));
    let mut cursor = first["next_cursor"]
        .as_str()
        .expect("a next_cursor after page 1")
        .to_string();
    let (extra, _) = env
        .create(Cred::Admin, json!({"owner": "pager", "name": "late"}))
        .await;
    loop {
        let page = env
            .get(
                &format!("/keys?owner=pager&limit=3&cursor={cursor}"),
                Cred::Admin,
            )
            .await;
        let page = page.ok(200).clone();
        seen.extend(ids(page["data"].as_array().expect("data")));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "duplicates across pages: {seen:?}"
    );
    assert!(
        expected.is_subset(&unique),
        "an earlier key was skipped: {seen:?}"
    );
    let allowed: HashSet<String> = expected.iter().cloned().chain([id_of(&extra)]).collect();
    assert!(unique.is_subset(&allowed), "a foreign key listed: {seen:?}");

    // Admin without a filter: every key, paged.
    let (all, _) = env.all_pages("/keys", Cred::Admin, 4).await;
    assert_eq!(all.len(), 15);
    assert_eq!(ids(&all).into_iter().collect::<HashSet<_>>().len(), 15);

    // Bad parameters: 422.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=%00%01", "cursor"),
    ] {
        env.get(&format!("/keys?{query}"), Cred::Admin)
            .await
            .invalid(&[field]);
    }
    // The bounds themselves are fine.
    env.get("/keys?limit=1", Cred::Admin).await.ok(200);
    let reply = env.get("/keys?limit=1000", Cred::Admin).await;
    assert_eq!(reply.ok(200)["data"].as_array().map(Vec::len), Some(15));
    assert_eq!(reply.json["next_cursor"], Value::Null);
}

// ---------------------------------------------------------------- 11. management limits

#[tokio::test]
async fn per_owner_management_limits_apply_to_keys_but_not_the_admin() {
    let env = Env::start(
        "[management.limits]\ncreate_per_hour = 2\nlist_per_minute = 3\nrevoke_per_minute = 1\n",
    )
    .await;
    // The admin is exempt: four creates for alice.
    let (_, mgr_key) = env.admin_create("alice", &["keys:manage", "read"]).await;
    let (victim1, _) = env.admin_create("alice", &["read"]).await;
    let (victim2, victim2_key) = env.admin_create("alice", &["read"]).await;
    let (_, bob_mgr) = env.admin_create("bob", &["keys:manage"]).await;
    let m = Cred::Key(&mgr_key);

    env.create(m, json!({"name": "one"})).await;
    env.create(m, json!({"name": "two"})).await;
    let reply = env.post("/keys", m, json!({"name": "three"})).await;
    reply.err(429, "rate_limited");
    let wait = retry_after(&reply);
    assert!((1..=3600).contains(&wait), "Retry-After {wait}");
    // The refused create created nothing.
    let list = env.get("/keys?owner=alice", Cred::Admin).await;
    assert_eq!(list.ok(200)["data"].as_array().map(Vec::len), Some(5));
    // Another owner has its own budget.
    env.create(Cred::Key(&bob_mgr), json!({})).await;
    // The admin still creates for alice.
    for _ in 0..3 {
        env.admin_create("alice", &[]).await;
    }

    // Revokes: one a minute for alice's keys.
    env.delete(&format!("/keys/{}", id_of(&victim1)), m)
        .await
        .ok(200);
    let reply = env.delete(&format!("/keys/{}", id_of(&victim2)), m).await;
    reply.err(429, "rate_limited");
    let wait = retry_after(&reply);
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    env.assert_admitted(&victim2_key, "key whose revoke was refused")
        .await;
    // Revoke by value counts against the same budget.
    env.post("/keys/revoke", m, json!({"key": victim2_key}))
        .await
        .err(429, "rate_limited");
    // The admin is not limited.
    env.delete(&format!("/keys/{}", id_of(&victim2)), Cred::Admin)
        .await
        .ok(200);
    assert_eq!(env.proxied(&victim2_key).await.0, 401);

    // Lists and gets: three a minute for alice's keys, none for the admin.
    env.get("/keys", m).await.ok(200);
    env.get(&format!("/keys/{}", id_of(&victim1)), m)
        .await
        .ok(200);
    env.get("/keys", m).await.ok(200);
    let reply = env.get("/keys", m).await;
    reply.err(429, "rate_limited");
    assert!((1..=60).contains(&retry_after(&reply)));
    for _ in 0..5 {
        env.get("/keys?owner=alice", Cred::Admin).await.ok(200);
    }
}

// ---------------------------------------------------------------- 12. sign-up

#[tokio::test]
async fn signup_is_off_by_default_and_limited_per_client_when_on() {
    // Off (the default): 404 to everyone.
    let off = Env::start(GENEROUS).await;
    let (_, key) = off.admin_create("alice", &["keys:manage"]).await;
    for cred in [Cred::None, Cred::Admin, Cred::Key(&key)] {
        off.post("/signup", cred, json!({"name": "mine"}))
            .await
            .err(404, "not_found");
    }
    off.send(Method::GET, "/signup", Cred::None, Body::None)
        .await
        .err(404, "not_found");
    let list = off.get("/keys", Cred::Admin).await;
    assert_eq!(list.ok(200)["data"].as_array().map(Vec::len), Some(1));
    drop(off);

    // On, two an hour per client.
    let env = Env::start(&format!(
        "{GENEROUS}\n[signup]\nenabled = true\nper_client_per_hour = 2\n"
    ))
    .await;
    let reply = env
        .post("/signup", Cred::None, json!({"name": "mine"}))
        .await;
    let record = reply.ok(201).clone();
    let key = record["key"].as_str().expect("key").to_string();
    assert_key_format(&key);
    assert_eq!(record["scopes"], json!(["keys:manage"]));
    assert_eq!(record["name"], "mine");
    let owner = record["owner"].as_str().expect("owner").to_string();
    assert!(!owner.is_empty());
    for field in RECORD_FIELDS {
        assert!(record.get(*field).is_some(), "no {field} in {record}");
    }

    // The new key lists its owner's keys: exactly itself.
    let list = env.get("/keys", Cred::Key(&key)).await;
    let data = list.ok(200)["data"].as_array().expect("data").clone();
    assert_eq!(ids(&data), vec![id_of(&record)], "{}", list.text);
    // And can make keys for its owner.
    let (child, _) = env.create(Cred::Key(&key), json!({})).await;
    assert_eq!(child["owner"].as_str(), Some(owner.as_str()));

    // A second sign-up is a different owner; the body may be empty.
    let reply = env
        .send(Method::POST, "/signup", Cred::None, Body::None)
        .await;
    let second = reply.ok(201).clone();
    assert_ne!(second["owner"].as_str(), Some(owner.as_str()));
    assert_eq!(second["name"], "default");
    // The third from the same client: 429.
    let reply = env
        .post("/signup", Cred::None, json!({"name": "again"}))
        .await;
    reply.err(429, "rate_limited");
    assert!(retry_after(&reply) >= 1);
    // Exactly two sign-ups created owners (plus the child key).
    let all = env.get("/keys", Cred::Admin).await;
    assert_eq!(all.ok(200)["data"].as_array().map(Vec::len), Some(3));
}

// ---------------------------------------------------------------- 13. audit log

#[tokio::test]
async fn audit_log_records_management_actions_newest_first() {
    let env = Env::start(&format!(
        "{GENEROUS}\n[signup]\nenabled = true\nper_client_per_hour = 10\n"
    ))
    .await;
    let (mgr, mgr_key) = env.admin_create("alice", &["keys:manage", "read"]).await;
    let mgr_id = id_of(&mgr);
    let m = Cred::Key(&mgr_key);
    let (k1, k1_key) = env.create(m, json!({"scopes": ["read"]})).await;
    let k1_id = id_of(&k1);
    let rotated = env
        .post(
            &format!("/keys/{k1_id}/rotate"),
            m,
            json!({"grace_seconds": 600}),
        )
        .await;
    let k2_id = id_of(rotated.ok(201));
    env.delete(&format!("/keys/{k2_id}"), Cred::Admin)
        .await
        .ok(200);
    env.post("/keys/revoke", m, json!({"key": k1_key}))
        .await
        .ok(200);
    let signed = env.post("/signup", Cred::None, json!({})).await;
    let signup_id = id_of(signed.ok(201));
    // Reads are not audited.
    env.get("/keys", Cred::Admin).await.ok(200);
    env.get(&format!("/keys/{k1_id}"), m).await.ok(200);

    let key_actor = format!("key:{mgr_id}");
    let expected: Vec<(&str, &str, &str)> = vec![
        ("signup", "signup", &signup_id),
        (&key_actor, "revoke_by_value", &k1_id),
        ("admin", "revoke", &k2_id),
        (&key_actor, "rotate", &k1_id),
        (&key_actor, "create", &k1_id),
        ("admin", "create", &mgr_id),
    ];

    let t_end = now();
    let reply = env.get("/audit", Cred::Admin).await;
    let body = reply.ok(200).clone();
    assert_eq!(body["next_cursor"], Value::Null, "{body}");
    let data = body["data"].as_array().expect("data").clone();
    let got: Vec<(String, String, String)> = data
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or_default().to_string(),
                e["action"].as_str().unwrap_or_default().to_string(),
                e["key_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, want, "audit log: {}", reply.text);
    let mut previous = i64::MAX;
    for entry in &data {
        let at = whole_second_utc(&entry["at"], "audit at");
        assert!(at <= previous, "not newest first: {}", reply.text);
        assert!(at <= t_end + 1 && at >= t_end - 60, "at {at}");
        previous = at;
        assert_eq!(entry["client"], "127.0.0.1", "{entry}");
        assert!(
            !entry.to_string().contains("kg_"),
            "a key in the audit log: {entry}"
        );
    }

    // Paged two at a time: the same entries in the same order.
    let (items, sizes) = env.all_pages("/audit", Cred::Admin, 2).await;
    assert_eq!(sizes, vec![2, 2, 2]);
    assert_eq!(items, data);

    // Bad paging parameters: 422; keys:manage is not enough.
    env.get("/audit?limit=0", Cred::Admin)
        .await
        .invalid(&["limit"]);
    env.get("/audit?cursor=nope", Cred::Admin)
        .await
        .invalid(&["cursor"]);
    env.get("/audit", m).await.err(403, "insufficient_scope");
}

// ---------------------------------------------------------------- 14. bodies

#[tokio::test]
async fn bodies_are_json_objects_of_at_most_64_kib_whatever_the_content_type() {
    let env = Env::start(GENEROUS).await;

    let key = bodies_over_64_kib_are_refused(&env).await;

    bodies_are_read_as_json_objects(&env).await;

    // An empty body is `{}`: a manager key creates a key with its defaults.
    let (_, mgr) = env.admin_create("alice", &["keys:manage"]).await;
    let reply = env
        .send(Method::POST, "/keys", Cred::Key(&mgr), Body::None)
        .await;
    let record = reply.ok(201);
    assert_eq!(record["owner"], "alice");
    assert_eq!(record["name"], "default");
    // ... and for the admin it lacks the owner.
    env.send(Method::POST, "/keys", Cred::Admin, Body::None)
        .await
        .invalid(&["owner"]);

    // Unknown fields are named.
    env.post(
        "/keys",
        Cred::Admin,
        json!({"owner": "alice", "nmae": "typo", "scope": ["read"]}),
    )
    .await
    .invalid(&["nmae", "scope"]);
    env.post(
        &format!("/keys/{}/rotate", id_of(record)),
        Cred::Admin,
        json!({"grace": 5}),
    )
    .await
    .invalid(&["grace"]);
    env.post(
        "/keys/revoke",
        Cred::Admin,
        json!({"key": key, "reason": "leaked"}),
    )
    .await
    .invalid(&["reason"]);
    env.assert_admitted(&key, "key after a refused revoke")
        .await;
}

/// Malformed JSON and non-objects are 400 `invalid_json`; a body is read as JSON whatever its
/// Content-Type.
async fn bodies_are_read_as_json_objects(env: &Env) {
    // Malformed JSON and non-objects: 400 invalid_json.
    for bad in [
        "{",
        "[1,2]",
        "\"text\"",
        "42",
        "null",
        "{\"owner\": }",
        "owner=alice",
    ] {
        let reply = env
            .send(
                Method::POST,
                "/keys",
                Cred::Admin,
                Body::Raw(bad.as_bytes().to_vec(), "application/json"),
            )
            .await;
        assert_eq!(reply.status, 400, "{bad:?}: {}", reply.text);
        reply.err(400, "invalid_json");
    }

    // Read as JSON whatever the Content-Type.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let reply = env
            .send(
                Method::POST,
                "/keys",
                Cred::Admin,
                Body::Raw(
                    br#"{"owner": "alice", "name": "plain"}"#.to_vec(),
                    content_type,
                ),
            )
            .await;
        let record = reply.ok(201);
        assert_eq!(record["name"], "plain", "{content_type}");
        assert_eq!(record["owner"], "alice", "{content_type}");
    }
}

/// Over 64 KiB a body is refused with 413 (create, revoke by value, rotate), and just under it
/// is read. Returns the key made meanwhile.
async fn bodies_over_64_kib_are_refused(env: &Env) -> String {
    // 70 KiB: 413, and the client reads the answer.
    let big = format!(
        "{{\"owner\": \"alice\", \"metadata\": {{\"pad\": \"{}\"}}}}",
        "x".repeat(70 * 1024)
    );
    let reply = env
        .send(
            Method::POST,
            "/keys",
            Cred::Admin,
            Body::Raw(big.into_bytes(), "application/json"),
        )
        .await;
    reply.err(413, "payload_too_large");
    // The same on rotate and revoke by value.
    let (record, key) = env.admin_create("alice", &[]).await;
    let padding = format!("{{\"key\": \"{}\"}}", "y".repeat(70 * 1024));
    env.send(
        Method::POST,
        "/keys/revoke",
        Cred::Admin,
        Body::Raw(padding.clone().into_bytes(), "application/json"),
    )
    .await
    .err(413, "payload_too_large");
    env.send(
        Method::POST,
        &format!("/keys/{}/rotate", id_of(&record)),
        Cred::Admin,
        Body::Raw(padding.into_bytes(), "application/json"),
    )
    .await
    .err(413, "payload_too_large");
    env.assert_admitted(&key, "key after the refused bodies")
        .await;

    // Just under 64 KiB is read (and then refused for its metadata, not its size).
    let near = format!(
        "{{\"owner\": \"alice\", \"metadata\": {{\"pad\": \"{}\"}}}}",
        "x".repeat(60 * 1024)
    );
    env.send(
        Method::POST,
        "/keys",
        Cred::Admin,
        Body::Raw(near.into_bytes(), "application/json"),
    )
    .await
    .invalid(&["metadata"]);
    key
}

// ---------------------------------------------------------------- 15. durability

#[tokio::test]
async fn create_and_revoke_survive_a_kill_9_right_after_the_answer() {
    let upstream = Upstream::start("api").await;
    let config = Env::config(GENEROUS, &upstream);
    config.write();
    // Keys made offline, to be revoked and rotated through the API.
    let (doomed, doomed_key) = create_key(&config.path(), "alice", &["read"], None);
    let doomed_id = doomed["id"].as_str().expect("id").to_string();
    let (rotating, rotating_key) = create_key(&config.path(), "alice", &["read"], None);
    let rotating_id = rotating["id"].as_str().expect("id").to_string();
    let mut env = Env::on(config, upstream).await;
    env.assert_admitted(&doomed_key, "offline key").await;
    env.assert_admitted(&rotating_key, "offline key").await;

    // Round 1: a rotation, then a create, then kill -9 straight after the create's answer.
    let reply = env
        .post(
            &format!("/keys/{rotating_id}/rotate"),
            Cred::Admin,
            json!({"grace_seconds": 0}),
        )
        .await;
    let rotated_key = reply.ok(201)["key"].as_str().expect("key").to_string();
    let (created, created_key) = env.admin_create("alice", &["read"]).await;
    env.gateway.kill9();

    env.gateway = Env::start_gateway(&env.config).await;
    env.assert_admitted(&created_key, "created key after kill -9")
        .await;
    env.assert_admitted(&rotated_key, "rotated key after kill -9")
        .await;
    let (status, code) = env.proxied(&rotating_key).await;
    assert!(
        status == 401 && (code == "key_expired" || code == "invalid_key"),
        "key rotated with grace 0, after kill -9: {status} {code}"
    );

    // Round 2: a revoke, then kill -9 straight after its answer.
    env.delete(&format!("/keys/{doomed_id}"), Cred::Admin)
        .await
        .ok(200);
    env.gateway.kill9();

    env.gateway = Env::start_gateway(&env.config).await;
    assert_eq!(
        env.proxied(&doomed_key).await,
        (401, "invalid_key".to_string()),
        "revoked key after kill -9"
    );
    env.assert_admitted(&created_key, "created key after two kills")
        .await;
    let record = env.record(&id_of(&created)).await;
    assert_eq!(record["revoked_at"], Value::Null);
    let record = env.record(&doomed_id).await;
    whole_second_utc(&record["revoked_at"], "revoked_at after kill -9");
}

// ---------------------------------------------------------------- 16. unflushed usage

#[tokio::test]
async fn get_reflects_usage_not_yet_written() {
    // A minute between flushes: nothing is written during the test.
    let env = Env::start_with(GENEROUS, |c| c.flush_interval_ms = 60_000).await;
    let (record, key) = env.admin_create("alice", &["read"]).await;
    let id = id_of(&record);
    let started = Instant::now();
    for i in 0..50 {
        assert_eq!(env.proxied(&key).await, (200, String::new()), "request {i}");
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    let got = env.record(&id).await;
    assert_eq!(got["usage_count"], 50, "{got}");
    whole_second_utc(&got["last_used"], "last_used");
    // The listing agrees.
    let list = env.get("/keys?owner=alice", Cred::Admin).await;
    let data = list.ok(200)["data"].as_array().expect("data").clone();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["usage_count"], 50, "{}", list.text);
    assert_eq!(env.upstream.count(), 50);

    // Management calls a key is admitted for count too.
    let (mgr, mgr_key) = env.admin_create("alice", &["keys:manage"]).await;
    for _ in 0..4 {
        env.get("/keys", Cred::Key(&mgr_key)).await.ok(200);
    }
    let got = env.record(&id_of(&mgr)).await;
    assert_eq!(got["usage_count"], 4, "{got}");
    whole_second_utc(&got["last_used"], "manager key's last_used");
}

// ---------------------------------------------------------------- 5b. escalation by rotation

#[tokio::test]
async fn rotation_by_a_manager_key_cannot_mint_scopes_it_lacks() {
    let env = Env::start(GENEROUS).await;
    let (_, mgr_key) = env.admin_create("alice", &["keys:manage", "read"]).await;
    let (strong, strong_key) = env.admin_create("alice", &["read", "billing"]).await;
    let reply = env
        .post(
            &format!("/keys/{}/rotate", id_of(&strong)),
            Cred::Key(&mgr_key),
            json!({"grace_seconds": 60}),
        )
        .await;
    reply.err(403, "insufficient_scope");
    env.assert_admitted(&strong_key, "the key whose rotation was refused")
        .await;
    let record = env.record(&id_of(&strong)).await;
    assert_eq!(record["expires_at"], Value::Null, "{record}");
}

/// A key already replaced by a rotation cannot be rotated again (its successor can): a
/// second rotation would otherwise inherit the first one's grace cut-off as its expiry.
#[tokio::test]
async fn a_superseded_key_cannot_be_rotated_again() {
    let env = Env::start(GENEROUS).await;
    let (record, _) = env.admin_create("alice", &["read"]).await;
    let id = id_of(&record);
    let first = env
        .post(
            &format!("/keys/{id}/rotate"),
            Cred::Admin,
            serde_json::json!({"grace_seconds": 600}),
        )
        .await;
    let first = first.ok(201).clone();
    let again = env
        .post(
            &format!("/keys/{id}/rotate"),
            Cred::Admin,
            serde_json::json!({"grace_seconds": 600}),
        )
        .await;
    again.err(409, "key_rotated");
    // The successor rotates normally, and keeps no expiry (the original had none).
    let successor = id_of(&first);
    assert!(first["expires_at"].is_null(), "{first}");
    env.post(
        &format!("/keys/{successor}/rotate"),
        Cred::Admin,
        serde_json::json!({"grace_seconds": 0}),
    )
    .await
    .ok(201);
}
