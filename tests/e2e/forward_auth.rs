//! Forward authentication (contract section 11): `<management.path>/authorize` decides for
//! the original request another proxy names, exactly as the request path would, and
//! forwards nothing. The Traefik/Caddy and Envoy conventions are tested over HTTP; nginx's
//! `auth_request` with a real nginx running the shipped recipe
//! (`config/nginx-forward-auth.conf`).

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::json;

use crate::common::management::{Cred, Env, GENEROUS, id_of};
use crate::common::nginx::Nginx;
use crate::common::{GatewayConfig, Upstream, client, scrape_metrics};

/// Routes for decisions only (`upstreams = []`): `/public` (no key), `/api` (scope `api`),
/// `/admin` (scope `admin`), `/limited` (2 per minute), `/cached` (decisions cacheable
/// for 30 s); and `/svc`, proxied to `upstream`, for the nginx tests.
fn routes(upstream: &Upstream) -> String {
    format!(
        "{GENEROUS}
[[routes]]
name = \"public\"
path_prefix = \"/public\"
upstreams = []
auth = \"none\"

[[routes]]
name = \"api\"
path_prefix = \"/api\"
upstreams = []
scopes = [\"api\"]

[[routes]]
name = \"admin\"
path_prefix = \"/admin\"
upstreams = []
scopes = [\"admin\"]

[[routes]]
name = \"limited\"
path_prefix = \"/limited\"
upstreams = []
rate_limit = {{ requests = 2, window_seconds = 60 }}

[[routes]]
name = \"cached\"
path_prefix = \"/cached\"
upstreams = []
decision_cache_seconds = 30

[[routes]]
name = \"svc\"
path_prefix = \"/svc\"
upstreams = [\"{}\"]
scopes = [\"api\"]
",
        upstream.addr
    )
}

async fn gateway() -> Env {
    let upstream = Upstream::start("backend").await;
    let config = GatewayConfig::with_routes(&routes(&upstream));
    Env::on(config, upstream).await
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn code(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// An authorize call to `path` (below the gateway's root) with `headers`.
async fn authorize(env: &Env, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = client().get(format!("{}{path}", env.config.base_url()));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.expect("authorize call");
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap_or_default(),
    }
}

/// Traefik's and Caddy's convention: the original in `X-Forwarded-*`, the key as sent.
async fn traefik(env: &Env, uri: &str, key: Option<&str>) -> Answer {
    let mut headers = vec![
        ("x-forwarded-method", "GET"),
        ("x-forwarded-uri", uri),
        ("x-forwarded-host", "api.example"),
    ];
    if let Some(key) = key {
        headers.push(("x-api-key", key));
    }
    authorize(env, "/_keygate/authorize", &headers).await
}

fn assert_refused(answer: &Answer, status: u16, code: &str, what: &str) {
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (status, code),
        "{what}: {}",
        answer.body
    );
    assert_eq!(answer.header("cache-control"), Some("no-store"), "{what}");
    assert_eq!(answer.header("x-keygate-owner"), None, "{what}");
}

#[tokio::test]
async fn each_outcome_of_the_request_path_is_the_decision() {
    let env = gateway().await;
    let (record, key) = env.admin_create("alice", &["api"]).await;
    let (_, no_scope) = env.admin_create("bob", &[]).await;

    let admitted = traefik(&env, "/api/items?page=2", Some(&key)).await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    assert_eq!(admitted.body, "");
    assert_eq!(
        admitted.header("x-keygate-key-id"),
        Some(id_of(&record).as_str())
    );
    assert_eq!(admitted.header("x-keygate-owner"), Some("alice"));
    assert_eq!(admitted.header("x-keygate-scopes"), Some("api"));
    assert_eq!(admitted.header("cache-control"), Some("no-store"));

    let public = traefik(&env, "/public/page", None).await;
    assert_eq!(public.status, 200);
    assert_eq!(public.header("x-keygate-owner"), None);

    let missing = traefik(&env, "/api/items", None).await;
    assert_refused(&missing, 401, "missing_credentials", "no key");
    assert_eq!(
        missing.header("www-authenticate"),
        Some("Bearer realm=\"keygate\"")
    );
    let foreign = crate::common::management::foreign_key();
    let invalid = traefik(&env, "/api/items", Some(&foreign)).await;
    assert_refused(&invalid, 401, "invalid_key", "unknown key");
    let scope = traefik(&env, "/admin/users", Some(&key)).await;
    assert_refused(&scope, 403, "insufficient_scope", "missing scope");
    let unscoped = traefik(&env, "/api/items", Some(&no_scope)).await;
    assert_refused(&unscoped, 403, "insufficient_scope", "key without scopes");
    let nowhere = traefik(&env, "/elsewhere", Some(&key)).await;
    assert_refused(&nowhere, 404, "no_route", "no route");
    // The management API decides for itself: no route may say yes for it.
    let management = traefik(&env, "/_keygate/keys", Some(&key)).await;
    assert_refused(&management, 404, "no_route", "management path");

    let (_, expiring) = env
        .create(
            Cred::Admin,
            json!({"owner": "carol", "scopes": ["api"], "ttl_seconds": 1}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = traefik(&env, "/api/items", Some(&expiring)).await;
    assert_refused(&expired, 401, "key_expired", "expired key");

    env.delete(&format!("/keys/{}", id_of(&record)), Cred::Admin)
        .await
        .ok(200);
    let revoked = traefik(&env, "/api/items", Some(&key)).await;
    assert_refused(
        &revoked,
        401,
        "invalid_key",
        "revoked key, from the revoke's answer on",
    );
}

#[tokio::test]
async fn the_original_path_gets_every_check_of_a_proxied_one() {
    let env = gateway().await;
    let (_, key) = env.admin_create("alice", &["api"]).await;
    for (uri, code) in [
        ("/public/..%2fadmin", "invalid_path"),
        ("/public/../admin", "invalid_path"),
        ("/public/%2e%2e/admin", "invalid_path"),
        ("/public%2F..%2Fadmin", "invalid_path"),
        ("/PUBLIC/x", "no_route"),
        ("//evil.example/api", "invalid_path"),
        ("/api\\items", "invalid_path"),
    ] {
        let answer = traefik(&env, uri, Some(&key)).await;
        assert_eq!(
            answer.code(),
            code,
            "{uri}: {} {}",
            answer.status,
            answer.body
        );
        assert_ne!(answer.status, 200, "{uri}");
    }
    // An absolute URL is read as its path (as the request path does).
    let absolute = traefik(&env, "http://api.example/api/x", Some(&key)).await;
    assert_eq!(absolute.status, 200, "{}", absolute.body);
}

#[tokio::test]
async fn conflicting_conventions_are_refused_not_guessed() {
    let env = gateway().await;
    let (_, key) = env.admin_create("alice", &["api"]).await;
    // A client of nginx adding Traefik's header to reach a public route's decision.
    let injected = authorize(
        &env,
        "/_keygate/authorize",
        &[
            ("x-original-uri", "/admin/users"),
            ("x-forwarded-uri", "/public/x"),
            ("x-api-key", &key),
        ],
    )
    .await;
    assert_refused(&injected, 400, "bad_request", "two different originals");
    let against_suffix = authorize(
        &env,
        "/_keygate/authorize/admin/users",
        &[("x-forwarded-uri", "/public/x"), ("x-api-key", &key)],
    )
    .await;
    assert_refused(
        &against_suffix,
        400,
        "bad_request",
        "suffix and header disagree",
    );
    let bad_method = authorize(
        &env,
        "/_keygate/authorize",
        &[("x-forwarded-method", "GE T"), ("x-api-key", &key)],
    )
    .await;
    assert_refused(&bad_method, 400, "bad_request", "malformed method");
}

#[tokio::test]
async fn envoys_path_suffix_names_the_original() {
    let env = gateway().await;
    let (_, key) = env.admin_create("alice", &["api"]).await;
    let admitted = authorize(
        &env,
        "/_keygate/authorize/api/items?x=1",
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    assert_eq!(admitted.header("x-keygate-owner"), Some("alice"));
    let scope = authorize(&env, "/_keygate/authorize/admin", &[("x-api-key", &key)]).await;
    assert_refused(
        &scope,
        403,
        "insufficient_scope",
        "envoy form, missing scope",
    );
    let dots = authorize(
        &env,
        "/_keygate/authorize/public/..%2fadmin",
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(dots.code(), "invalid_path", "{}", dots.body);
    // Nothing named at all: the original is `/`, which no route takes.
    let bare = authorize(&env, "/_keygate/authorize", &[("x-api-key", &key)]).await;
    assert_refused(&bare, 404, "no_route", "no original");
}

#[tokio::test]
async fn rate_limits_and_caching_follow_the_route() {
    let env = gateway().await;
    let (_, key) = env.admin_create("alice", &[]).await;
    for remaining in ["1", "0"] {
        let admitted = traefik(&env, "/limited/x", Some(&key)).await;
        assert_eq!(admitted.status, 200, "{}", admitted.body);
        assert_eq!(admitted.header("ratelimit-limit"), Some("2"));
        assert_eq!(admitted.header("ratelimit-remaining"), Some(remaining));
        // A cached yes would let the key past its limit.
        assert_eq!(admitted.header("cache-control"), Some("no-store"));
    }
    let limited = traefik(&env, "/limited/x", Some(&key)).await;
    assert_refused(&limited, 429, "rate_limited", "third call");
    let retry_after: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(limited.header("ratelimit-remaining"), Some("0"));

    let cacheable = traefik(&env, "/cached/x", Some(&key)).await;
    assert_eq!(cacheable.status, 200);
    assert_eq!(
        cacheable.header("cache-control"),
        Some("private, max-age=30")
    );
    let refused = traefik(&env, "/cached/x", None).await;
    assert_refused(
        &refused,
        401,
        "missing_credentials",
        "refusal on a cached route",
    );
    // A key with a quota is never cached either: each yes spends one.
    let quota = json!({"owner": "alice", "quota": {"requests": 100, "period": "day"}});
    let (_, budgeted) = env.create(Cred::Admin, quota).await;
    let admitted = traefik(&env, "/cached/x", Some(&budgeted)).await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    assert_eq!(admitted.header("cache-control"), Some("no-store"));
}

#[tokio::test]
async fn decisions_count_as_usage_and_in_the_route_metrics_and_decision_routes_proxy_nothing() {
    let env = gateway().await;
    let (record, key) = env.admin_create("alice", &["api"]).await;
    for _ in 0..3 {
        assert_eq!(traefik(&env, "/api/x", Some(&key)).await.status, 200);
    }
    assert_eq!(traefik(&env, "/admin/x", Some(&key)).await.status, 403);
    // A proxied request to a decision-only route has nowhere to go.
    let proxied = client()
        .get(format!("{}/api/x", env.config.base_url()))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("proxied request");
    assert_eq!(proxied.status(), 503);
    let body: serde_json::Value = proxied.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "no_healthy_upstream");
    assert_eq!(env.upstream.count(), 0);

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let used = env.record(&id_of(&record)).await["usage_count"].as_u64();
        // Three decisions and the proxied request were admitted; the 403 was not.
        if used == Some(4) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "usage_count {used:?}, want 4"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = scrape_metrics(&env.config.admin_url()).await;
    let series = |labels: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("keygate_requests_total{{{labels}}} "))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    assert_eq!(
        series("outcome=\"allowed\",route=\"api\""),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        series("outcome=\"insufficient_scope\",route=\"admin\""),
        1.0
    );
}

/// The shipped nginx recipe, pointed at this test's gateway and upstream.
fn nginx_in_front(env: &Env) -> Nginx {
    let recipe = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/nginx-forward-auth.conf"
    ))
    .expect("read the shipped recipe");
    let recipe = recipe
        .replace(
            "127.0.0.1:8080",
            &format!("127.0.0.1:{}", env.config.listen),
        )
        .replace("127.0.0.1:3000", &env.upstream.addr.to_string())
        .replace("127.0.0.1:8000", "127.0.0.1:{port}");
    Nginx::start(&recipe)
}

async fn through(nginx: &Nginx, path: &str, key: Option<&str>) -> (u16, HeaderMap, String) {
    let mut req = client().get(format!("{}{path}", nginx.base_url()));
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    let resp = req.send().await.expect("request through nginx");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap_or_default())
}

#[tokio::test]
async fn nginx_auth_request_with_the_shipped_recipe() {
    let env = gateway().await;
    let nginx = nginx_in_front(&env);
    let (record, key) = env.admin_create("alice", &["api"]).await;
    let (_, no_scope) = env.admin_create("bob", &[]).await;

    let (status, _, body) = through(&nginx, "/svc/items", Some(&key)).await;
    assert_eq!(status, 200, "{body}\n{}", nginx.log());
    let seen = env.upstream.seen();
    let seen = seen.last().expect("the upstream got the request");
    assert_eq!(seen.header("x-keygate-owner").as_deref(), Some("alice"));
    assert_eq!(seen.header("x-keygate-key-id"), Some(id_of(&record)));
    assert!(
        !seen.all_header_text().contains(&key),
        "the key reached the backend"
    );

    assert_eq!(through(&nginx, "/svc/items", None).await.0, 401);
    assert_eq!(through(&nginx, "/svc/items", Some(&no_scope)).await.0, 403);
    assert_eq!(
        env.upstream.count(),
        1,
        "a refused request reached the upstream"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while env.record(&id_of(&record)).await["usage_count"].as_u64() != Some(1) {
        assert!(std::time::Instant::now() < deadline, "usage_count is not 1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    env.delete(&format!("/keys/{}", id_of(&record)), Cred::Admin)
        .await
        .ok(200);
    assert_eq!(through(&nginx, "/svc/items", Some(&key)).await.0, 401);
    assert_eq!(env.upstream.count(), 1);
}

#[tokio::test]
async fn nginx_passes_a_rate_limited_key_on_as_429_with_retry_after() {
    let env = gateway().await;
    let nginx = nginx_in_front(&env);
    let (_, key) = env
        .create(
            Cred::Admin,
            json!({"owner": "alice", "scopes": ["api"], "rate_limit": {"requests": 1, "window_seconds": 60}}),
        )
        .await;
    assert_eq!(through(&nginx, "/svc/a", Some(&key)).await.0, 200);
    let (status, headers, body) = through(&nginx, "/svc/a", Some(&key)).await;
    assert_eq!(status, 429, "{body}\n{}", nginx.log());
    let retry_after: u64 = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("Retry-After through nginx");
    assert!((1..=60).contains(&retry_after));
    assert_eq!(env.upstream.count(), 1);
}

/// `POST /keys/verify` as `caller`, which must answer 200; its body.
async fn verify(env: &Env, caller: &str, body: serde_json::Value) -> serde_json::Value {
    env.post("/keys/verify", Cred::Key(caller), body)
        .await
        .ok(200)
        .clone()
}

#[tokio::test]
async fn verify_tells_whether_a_key_is_good_and_whose_it_is() {
    let env = gateway().await;
    let (_, verifier) = env.admin_create("alice", &["keys:verify"]).await;
    let (record, key) = env
        .create(
            Cred::Admin,
            json!({"owner": "alice", "scopes": ["api"], "metadata": {"plan": "gold"},
                   "rate_limit": {"requests": 2, "window_seconds": 60}}),
        )
        .await;
    let good = verify(&env, &verifier, json!({"key": key, "scopes": ["api"]})).await;
    assert_eq!(good["valid"], true, "{good}");
    assert_eq!(good["code"], "valid");
    assert_eq!(good["id"], id_of(&record).as_str());
    assert_eq!(good["owner"], "alice");
    assert_eq!(good["scopes"], json!(["api"]));
    assert_eq!(good["metadata"], json!({"plan": "gold"}));
    assert_eq!(
        good["rate_limit"],
        json!({"limit": 2, "remaining": 1, "reset": good["rate_limit"]["reset"]})
    );
    assert!(good["quota_remaining"].is_null());

    let scope = verify(&env, &verifier, json!({"key": key, "scopes": ["admin"]})).await;
    assert_eq!(
        (scope["valid"].clone(), scope["code"].clone()),
        (json!(false), json!("insufficient_scope"))
    );
    // The second valid verification spends the last of the limit; the third is limited.
    assert_eq!(
        verify(&env, &verifier, json!({"key": key})).await["valid"],
        true
    );
    let limited = verify(&env, &verifier, json!({"key": key})).await;
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    assert_eq!(limited["rate_limit"]["remaining"], 0);

    let foreign = crate::common::management::foreign_key();
    let unknown = verify(&env, &verifier, json!({"key": foreign})).await;
    assert_eq!(unknown, json!({"valid": false, "code": "invalid_key"}));
    let malformed = verify(&env, &verifier, json!({"key": "not-a-key"})).await;
    assert_eq!(malformed["code"], "invalid_key");

    // Two valid verifications counted as uses, and the verifier's own calls as its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while env.record(&id_of(&record)).await["usage_count"].as_u64() != Some(2) {
        assert!(std::time::Instant::now() < deadline, "usage_count is not 2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn verify_answers_expired_and_revoked_keys_and_who_may_ask() {
    let env = gateway().await;
    let (_, verifier) = env.admin_create("alice", &["keys:verify"]).await;
    let (_, all_verifier) = env.admin_create("platform", &["keys:verify:all"]).await;
    let (_, manager) = env.admin_create("alice", &["keys:manage"]).await;
    let (bob_record, bobs) = env.admin_create("bob", &[]).await;
    let (_, expiring) = env
        .create(Cred::Admin, json!({"owner": "alice", "ttl_seconds": 1}))
        .await;

    env.post("/keys/verify", Cred::Key(&manager), json!({"key": bobs}))
        .await
        .err(403, "insufficient_scope");

    // Another owner's key is unknown to a tenant's verifier, known to the platform's.
    let tenant = env
        .post("/keys/verify", Cred::Key(&verifier), json!({"key": bobs}))
        .await;
    assert_eq!(
        tenant.ok(200).clone(),
        json!({"valid": false, "code": "invalid_key"})
    );
    let platform = env
        .post(
            "/keys/verify",
            Cred::Key(&all_verifier),
            json!({"key": bobs}),
        )
        .await;
    assert_eq!(platform.ok(200)["owner"], "bob");
    let admin = env
        .post("/keys/verify", Cred::Admin, json!({"key": bobs}))
        .await;
    assert_eq!(admin.ok(200)["valid"], true);

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = env
        .post(
            "/keys/verify",
            Cred::Key(&verifier),
            json!({"key": expiring}),
        )
        .await;
    let expired = expired.ok(200);
    assert_eq!(
        (expired["valid"].clone(), expired["code"].clone()),
        (json!(false), json!("key_expired"))
    );
    assert!(expired["expires_at"].is_string());

    env.delete(&format!("/keys/{}", id_of(&bob_record)), Cred::Admin)
        .await
        .ok(200);
    let revoked = env
        .post("/keys/verify", Cred::Admin, json!({"key": bobs}))
        .await;
    assert_eq!(
        revoked.ok(200).clone(),
        json!({"valid": false, "code": "invalid_key"})
    );

    let missing = env.post("/keys/verify", Cred::Admin, json!({})).await;
    missing.invalid(&["key"]);
}
