//! Limits shared by several gateways on one Redis, and quotas per key (contract section
//! 12): two real gateways on one PostgreSQL and one Redis admit together what one would;
//! Redis stopped and started again under `on_error = "allow"` and `"deny"`; a quota on one
//! gateway across a graceful restart, a rotation and a top-up.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::cluster::{ADMIN, Instance};
use crate::common::management::{Cred, Env, GENEROUS};
use crate::common::redis::RedisServer;
use crate::common::*;

const REDIS_URL_ENV: &str = "KEYGATE_REDIS_URL";

fn ratelimit_section(on_error: &str) -> String {
    format!(
        "[ratelimit]\nbackend = \"redis\"\nurl_env = \"{REDIS_URL_ENV}\"\ntimeout_ms = 200\non_error = \"{on_error}\"\n\n[management.limits]\ncreate_per_hour = 3\n\n[signup]\nenabled = true\nper_client_per_hour = 2\n"
    )
}

/// Two gateways on one PostgreSQL database and `redis`, each with `on_error` of its own;
/// creates limited to 3 an hour per owner, sign-ups to 2 an hour per client.
async fn pair(redis: &RedisServer, upstream: &Upstream, on_error: [&str; 2]) -> [Instance; 2] {
    let db = pg::fresh_database();
    let url = redis.url();
    let env = [(REDIS_URL_ENV, url.as_str())];
    let [first, second] = on_error.map(ratelimit_section);
    let one = Instance::start_full(&db, upstream.addr, "", &first, &env).await;
    let two = Instance::start_full(&db, upstream.addr, "", &second, &env).await;
    [one, two]
}

/// POST /_keygate/keys with `auth` (`Ok(admin)` or a key); (status, body).
async fn create(instance: &Instance, auth: Result<(), &str>, body: Value) -> (u16, Value) {
    let request = client().post(format!("{}/_keygate/keys", instance.base()));
    let request = match auth {
        Ok(()) => request.bearer_auth(ADMIN),
        Err(key) => request.header("x-api-key", key),
    };
    let resp = request.json(&body).send().await.expect("create");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

async fn created_key(instance: &Instance, body: Value) -> (String, String) {
    let (status, record) = create(instance, Ok(()), body).await;
    assert_eq!(status, 201, "create: {record}");
    let field = |name: &str| record[name].as_str().expect("string field").to_string();
    (field("id"), field("key"))
}

/// One proxied request: (status, error code or "", whether it carried RateLimit-*,
/// Retry-After).
async fn call(instance: &Instance, key: &str) -> (u16, String, bool, Option<u64>) {
    let resp = client()
        .get(format!("{}/work", instance.base()))
        .header("x-api-key", key)
        .send()
        .await
        .expect("proxied request");
    let limited = resp.headers().contains_key("ratelimit-limit");
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let (status, code) = error_code(resp).await;
    (status, code, limited, retry_after)
}

/// The value of the series `series` (name and labels as /metrics writes them).
async fn metric(instance: &Instance, series: &str) -> f64 {
    let text = scrape_metrics(&instance.gateway.admin).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test]
async fn two_gateways_on_one_redis_admit_together_what_one_would() {
    let upstream = Upstream::start("api").await;
    let redis = RedisServer::start();
    let gateways = pair(&redis, &upstream, ["allow", "allow"]).await;

    let limited = json!({"owner": "alice", "rate_limit": {"requests": 10, "window_seconds": 60}});
    let (_, limited) = created_key(&gateways[0], limited).await;
    let budget = json!({"owner": "alice", "quota": {"requests": 5, "period": "total"}});
    let (budget_id, budget) = created_key(&gateways[1], budget).await;
    let (mut admitted, mut spent) = (0, 0);
    for i in 0..30 {
        let gateway = &gateways[i % 2];
        match call(gateway, &limited).await {
            (200, _, true, _) => admitted += 1,
            (429, code, true, Some(_)) if code == "rate_limited" => {}
            other => panic!("rate-limited key, request {i}: {other:?}"),
        }
        match call(gateway, &budget).await {
            (200, _, false, _) => spent += 1,
            (429, code, false, None) if code == "quota_exhausted" => {}
            other => panic!("quota key, request {i}: {other:?}"),
        }
    }
    assert_eq!(admitted, 10, "10 a minute across both gateways");
    assert_eq!(spent, 5, "a total quota of 5 across both gateways");
    for gateway in &gateways {
        let record = gateway.get_key(&budget_id).await;
        assert_eq!(record["quota_remaining"], 0, "{record}");
        assert_eq!(record["quota"], json!({"requests": 5, "period": "total"}));
    }
    let outcome = "keygate_requests_total{outcome=\"quota_exhausted\",route=\"default\"}";
    let refused = metric(&gateways[0], outcome).await + metric(&gateways[1], outcome).await;
    assert_eq!(refused, 25.0);

    // The per-owner create limit (3 an hour) holds across both as well.
    let manager = json!({"owner": "bob", "scopes": ["keys:manage"]});
    let (_, manager) = created_key(&gateways[0], manager).await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let (status, body) = create(&gateways[i % 2], Err(&manager), json!({})).await;
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [201, 201, 201, 429, 429, 429]);

    // So does the sign-up limit per client address (2 an hour).
    let mut statuses = Vec::new();
    for i in 0..4 {
        let resp = client()
            .post(format!("{}/_keygate/signup", gateways[i % 2].base()))
            .json(&json!({}))
            .send()
            .await
            .expect("signup");
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [201, 201, 429, 429]);
}

#[tokio::test]
async fn redis_down_allow_admits_and_counts_deny_refuses_and_both_resume_when_it_is_back() {
    let upstream = Upstream::start("api").await;
    let mut redis = RedisServer::start();
    let [allow, deny] = pair(&redis, &upstream, ["allow", "deny"]).await;
    let limit = json!({"owner": "alice", "rate_limit": {"requests": 3, "window_seconds": 3600}});
    let (_, limited) = created_key(&allow, limit).await;
    let (_, free) = created_key(&allow, json!({"owner": "alice"})).await;
    let budget = json!({"owner": "alice", "quota": {"requests": 100, "period": "month"}});
    let (_, budgeted) = created_key(&allow, budget).await;
    assert_eq!(
        call(&allow, &limited).await,
        (200, String::new(), true, None)
    );
    assert_eq!(
        call(&deny, &limited).await,
        (200, String::new(), true, None)
    );

    redis.stop();
    let errors = "keygate_ratelimit_backend_errors_total";
    for _ in 0..3 {
        assert_eq!(
            call(&allow, &limited).await,
            (200, String::new(), false, None),
            "allow: admitted, without RateLimit-* headers"
        );
        let (status, code, _, _) = call(&deny, &limited).await;
        assert_eq!((status, code.as_str()), (503, "rate_limit_unavailable"));
        assert_eq!(
            call(&allow, &budgeted).await.0,
            200,
            "allow: a quota key too"
        );
        let (status, code, _, _) = call(&deny, &budgeted).await;
        assert_eq!((status, code.as_str()), (503, "rate_limit_unavailable"));
        for gateway in [&allow, &deny] {
            let (status, _, limited, _) = call(gateway, &free).await;
            assert_eq!(
                (status, limited),
                (200, false),
                "a key without limits never asks Redis"
            );
        }
    }
    for gateway in [&allow, &deny] {
        let counted = metric(gateway, &format!("{errors}{{reason=\"error\"}}")).await
            + metric(gateway, &format!("{errors}{{reason=\"timeout\"}}")).await;
        assert!(counted >= 6.0, "{counted} errors counted");
    }

    // Redis back (empty: its counts were lost with it): limits resume without a restart.
    redis.resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while call(&deny, &limited).await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "deny never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut answers = Vec::new();
    for gateway in [&allow, &deny, &allow] {
        let (status, _, limited, _) = call(gateway, &limited).await;
        answers.push((status, limited));
    }
    assert_eq!(answers, [(200, true), (200, true), (429, true)]);
}

/// A proxied request with `key` is refused 429 `quota_exhausted`, with Retry-After the
/// seconds left until UTC midnight.
async fn assert_refused_until_utc_midnight(env: &Env, key: &str) {
    let resp = env
        .http
        .get(format!("{}/resource", env.config.base_url()))
        .header("x-api-key", key)
        .send()
        .await
        .expect("request");
    let retry_after: i64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("Retry-After on a day quota");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let to_midnight = 86_400 - now.rem_euclid(86_400);
    assert!(
        (retry_after - to_midnight).abs() <= 2,
        "Retry-After {retry_after}, {to_midnight} s to UTC midnight"
    );
    assert_eq!(error_code(resp).await, (429, "quota_exhausted".to_string()));
}

async fn verify(env: &Env, key: &str) -> Value {
    env.post("/keys/verify", Cred::Admin, json!({"key": key}))
        .await
        .ok(200)
        .clone()
}

/// One gateway on sled with the local backend: a quota is exact across a graceful restart
/// (the last flush keeps what was spent), a rotation hands on what is left, a PATCH with a
/// quota tops it up, and verification spends and reports it.
#[tokio::test]
async fn a_quota_holds_across_a_restart_a_rotation_and_a_top_up() {
    let mut env = Env::start(GENEROUS).await;
    let daily = json!({"requests": 5, "period": "day"});
    let (record, key) = env
        .create(Cred::Admin, json!({"owner": "alice", "quota": daily}))
        .await;
    let id = record["id"].as_str().expect("id").to_string();
    assert_eq!(record["quota_remaining"], 5);
    for _ in 0..3 {
        env.assert_admitted(&key, "within the quota").await;
    }
    assert_eq!(env.record(&id).await["quota_remaining"], 2);

    assert!(env.gateway.stop(), "graceful stop");
    env.gateway = Env::start_gateway(&env.config).await;
    assert_eq!(
        env.record(&id).await["quota_remaining"],
        2,
        "after the restart"
    );
    env.assert_admitted(&key, "4th").await;

    // Rotation: the new key starts with what is left (1), the old one is gone at once.
    let rotated = env
        .post(&format!("/keys/{id}/rotate"), Cred::Admin, json!({}))
        .await
        .ok(201)
        .clone();
    assert_eq!(rotated["quota_remaining"], 1, "{rotated}");
    assert_eq!(rotated["quota"], daily);
    let new_key = rotated["key"].as_str().expect("key").to_string();
    let new_id = rotated["id"].as_str().expect("id").to_string();
    env.assert_admitted(&new_key, "the one left").await;
    assert_refused_until_utc_midnight(&env, &new_key).await;
    let verified = verify(&env, &new_key).await;
    assert_eq!(
        (
            &verified["valid"],
            &verified["code"],
            &verified["quota_remaining"]
        ),
        (&json!(false), &json!("quota_exhausted"), &json!(0))
    );

    // A bigger quota of the same period keeps what was spent (5 of 5): 2 left of 7.
    let patched = patch(
        &env,
        &new_id,
        Cred::Admin,
        json!({"quota": {"requests": 7, "period": "day"}}),
    )
    .await;
    assert_eq!(patched.ok(200)["quota_remaining"], 2);
    // The admin's top-up counts from zero again.
    let refilled = env
        .post(
            &format!("/keys/{new_id}/quota/refill"),
            Cred::Admin,
            json!({}),
        )
        .await
        .ok(200)
        .clone();
    assert_eq!(refilled["quota_remaining"], 7, "{refilled}");
    let verified = verify(&env, &new_key).await;
    assert_eq!(
        (&verified["valid"], &verified["quota_remaining"]),
        (&json!(true), &json!(6))
    );
    env.assert_admitted(&new_key, "after the top-up").await;
    assert_eq!(env.record(&new_id).await["quota_remaining"], 5);
}

async fn patch(env: &Env, id: &str, cred: Cred<'_>, body: Value) -> crate::common::Reply {
    let body = crate::common::management::Body::Json(body);
    env.send(reqwest::Method::PATCH, &format!("/keys/{id}"), cred, body)
        .await
}

/// A `keys:manage` key with a quota hands it on and cannot loosen, remove or refill it,
/// neither on the keys it makes nor on itself.
#[tokio::test]
async fn a_managing_key_is_bound_by_its_own_quota() {
    let env = Env::start(GENEROUS).await;
    let daily = json!({"requests": 5, "period": "day"});
    let body = json!({"owner": "alice", "scopes": ["keys:manage"], "quota": daily});
    let (manager, manager_key) = env.create(Cred::Admin, body).await;
    let manager_id = manager["id"].as_str().expect("id").to_string();
    let me = Cred::Key(&manager_key);
    let (child, _) = env.create(me, json!({})).await;
    assert_eq!(child["quota"], daily, "inherited");
    for looser in [
        json!({"requests": 6, "period": "day"}),
        json!({"requests": 3, "period": "month"}),
    ] {
        env.post("/keys", me, json!({"quota": looser}))
            .await
            .invalid(&["quota"]);
    }
    patch(&env, &manager_id, me, json!({"quota": null}))
        .await
        .invalid(&["quota"]);
    let refill = format!("/keys/{manager_id}/quota/refill");
    let refused = env.post(&refill, me, json!({})).await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    // Its own quota set again (or lowered) keeps what it spent.
    let before = env.record(&manager_id).await["quota_remaining"].clone();
    let same = patch(&env, &manager_id, me, json!({"quota": daily})).await;
    assert_eq!(same.ok(200)["quota_remaining"], before);
    let plain = json!({"owner": "alice"});
    let (plain, _) = env.create(Cred::Admin, plain).await;
    let plain_refill = format!("/keys/{}/quota/refill", plain["id"].as_str().expect("id"));
    let none = env.post(&plain_refill, Cred::Admin, json!({})).await;
    assert_eq!(
        (none.status, none.json["error"]["code"].as_str()),
        (409, Some("no_quota"))
    );
}

#[tokio::test]
async fn a_malformed_quota_is_named() {
    let env = Env::start(GENEROUS).await;
    for quota in [
        json!({"requests": 0, "period": "day"}),
        json!({"requests": 5, "period": "week"}),
        json!({"requests": 5}),
        json!({"requests": 5, "period": "day", "burst": 1}),
        json!("5/day"),
    ] {
        let reply = env
            .post(
                "/keys",
                Cred::Admin,
                json!({"owner": "alice", "quota": quota}),
            )
            .await;
        reply.invalid(&["quota"]);
    }
}

/// `keygate check` and `serve` name a Redis backend whose URL variable is not set, before
/// anything starts.
#[tokio::test]
async fn a_redis_backend_without_its_url_is_named_by_check_and_serve() {
    let upstream = Upstream::start("api").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    config.extra = format!(
        "[ratelimit]\nbackend = \"redis\"\nurl_env = \"KEYGATE_TEST_UNSET_REDIS_URL\"\n\n{}",
        config.extra
    );
    let path = config.write();
    let path = path.to_str().expect("utf-8 path");
    let check = keygate(&["check", "--config", path]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "check passed: {stderr}");
    assert!(
        stderr.contains("ratelimit.url_env") && stderr.contains("KEYGATE_TEST_UNSET_REDIS_URL"),
        "{stderr}"
    );
    let serve = std::process::Command::new(BIN)
        .args(["serve", "--config", path])
        .output()
        .expect("run serve");
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert!(!serve.status.success(), "serve started: {stderr}");
    assert!(stderr.contains("KEYGATE_TEST_UNSET_REDIS_URL"), "{stderr}");
}
