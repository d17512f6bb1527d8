//! Per-key IP allowlists and metadata for the backend (contract section 14): `allowed_ips`
//! checked after the key and before scopes, against the client address of section 9
//! (trusted proxies), 403 `ip_not_allowed` with its own outcome label; and
//! `x-keygate-metadata` on routes with `forward_metadata = true`.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::management::*;
use crate::common::*;
use crate::patch::env_with_routes;

/// A proxied GET of `path` with `key` and extra headers: (status, error code or "").
async fn call(env: &Env, path: &str, key: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = env
        .http
        .get(format!("{}{path}", env.config.base_url()))
        .header("x-api-key", key);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    error_code(req.send().await.expect("request")).await
}

async fn allow(env: &Env, id: &str, cidrs: Value) {
    env.send(
        Method::PATCH,
        &format!("/keys/{id}"),
        Cred::Admin,
        Body::Json(json!({ "allowed_ips": cidrs })),
    )
    .await
    .ok(200);
}

fn refused() -> (u16, String) {
    (403, "ip_not_allowed".to_string())
}

fn admitted() -> (u16, String) {
    (200, String::new())
}

/// `keygate_requests_total{route="default",outcome="ip_not_allowed"}`.
async fn ip_refusals(env: &Env) -> f64 {
    let text = scrape_metrics(&env.config.admin_url()).await;
    text.lines()
        .find(|l| {
            l.starts_with("keygate_requests_total{")
                && l.contains("outcome=\"ip_not_allowed\"")
                && l.contains("route=\"default\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ip_not_allowed series:\n{text}"))
}

/// Without trusted proxies the peer (127.0.0.1) is the client: an IPv4 CIDR holding it
/// admits, one that does not refuses (before scopes, after the key), and a forged
/// `X-Forwarded-For` changes nothing.
#[tokio::test]
async fn the_peer_is_the_client_and_forwarding_headers_are_ignored() {
    let env = env_with_routes("").await;
    let (record, key) = env.admin_create("alice", &["read"]).await;
    let id = id_of(&record);
    let (weak_record, weak) = env.admin_create("alice", &[]).await;
    assert_eq!(
        ip_refusals(&env).await,
        0.0,
        "the series exists from the start"
    );

    allow(&env, &id, json!(["127.0.0.0/8"])).await;
    assert_eq!(call(&env, "/x", &key, &[]).await, admitted());
    allow(&env, &id, json!(["10.0.0.0/8", "2001:db8::/32"])).await;
    assert_eq!(call(&env, "/x", &key, &[]).await, refused());
    let forged = [("x-forwarded-for", "10.1.2.3"), ("x-real-ip", "10.1.2.3")];
    assert_eq!(call(&env, "/x", &key, &forged).await, refused());
    // The allowlist comes before scopes: a key lacking the route's scope, from outside
    // its allowlist, hears about the address.
    allow(&env, &id_of(&weak_record), json!(["10.0.0.0/8"])).await;
    assert_eq!(call(&env, "/x", &weak, &[]).await, refused());
    // ... and after the key: an unknown key is still just invalid.
    let (status, code) = call(&env, "/x", &foreign_key(), &[]).await;
    assert_eq!((status, code.as_str()), (401, "invalid_key"));
    assert_eq!(ip_refusals(&env).await, 3.0);
    assert_eq!(
        env.upstream.count(),
        1,
        "only the admitted request was forwarded"
    );

    // A manager key's allowlist holds on the management API too.
    let (manager_record, manager) = env.admin_create("alice", &["keys:manage"]).await;
    allow(&env, &id_of(&manager_record), json!(["10.0.0.0/8"])).await;
    env.get("/keys", Cred::Key(&manager))
        .await
        .err(403, "ip_not_allowed");
    let (_, other) = env.admin_create("alice", &[]).await;
    env.post("/keys/revoke", Cred::Key(&manager), json!({"key": other}))
        .await
        .err(403, "ip_not_allowed");
    // ... but a leaked key can always be revoked by whoever holds it, from anywhere.
    let revoked = env
        .post("/keys/revoke", Cred::Key(&manager), json!({"key": manager}))
        .await;
    assert_eq!(revoked.ok(200)["revoked"], true);
    // Removing the allowlist lets the key in from anywhere again.
    allow(&env, &id, json!([])).await;
    assert_eq!(call(&env, "/x", &key, &forged).await, admitted());
}

/// Behind a trusted proxy (127.0.0.1 here) the client is the nearest untrusted address of
/// `X-Forwarded-For`: IPv4 and IPv6 CIDRs are matched against it.
#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_checked() {
    let env = env_with_routes("trusted_proxies = [\"127.0.0.1/32\"]").await;
    let (record, key) = env.admin_create("alice", &["read"]).await;
    let id = id_of(&record);
    allow(&env, &id, json!(["203.0.113.0/24", "2001:db8::/32"])).await;
    let from = |chain: &'static str| [("x-forwarded-for", chain)];
    assert_eq!(
        call(&env, "/x", &key, &from("203.0.113.9")).await,
        admitted()
    );
    assert_eq!(
        call(&env, "/x", &key, &from("2001:db8::77")).await,
        admitted()
    );
    assert_eq!(
        call(&env, "/x", &key, &from("198.51.100.1, 2001:db8::1")).await,
        admitted(),
        "the nearest address is the client"
    );
    assert_eq!(
        call(&env, "/x", &key, &from("2001:db9::1")).await,
        refused()
    );
    assert_eq!(
        call(&env, "/x", &key, &from("198.51.100.1")).await,
        refused()
    );
    assert_eq!(
        call(&env, "/x", &key, &[]).await,
        refused(),
        "the proxy itself is not in the list"
    );
    let seen = env.upstream.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[0].header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
}

/// `forward_metadata = true` sends the key's metadata as compact JSON (non-ASCII as `\u`
/// escapes, the same JSON value); absent without metadata and on other routes; a
/// client's own header is dropped; a patch is seen by the next request.
#[tokio::test]
async fn metadata_reaches_the_backend_on_routes_that_ask_for_it() {
    let env = env_with_routes("").await;
    let metadata =
        json!({"team": "Zürich ✓", "plan": "pro", "limits": {"seats": 3}, "🚀": [1, null]});
    let (record, key) = env
        .create(
            Cred::Admin,
            json!({"owner": "alice", "scopes": ["read"], "metadata": metadata}),
        )
        .await;
    let (_, bare) = env.admin_create("alice", &["read"]).await;
    let spoof = [("x-keygate-metadata", "{\"plan\":\"free\"}")];
    assert_eq!(call(&env, "/meta/a", &key, &spoof).await, admitted());
    assert_eq!(call(&env, "/meta/b", &bare, &spoof).await, admitted());
    assert_eq!(call(&env, "/other", &key, &[]).await, admitted());
    let seen = env.upstream.seen();
    let header = seen[0]
        .header("x-keygate-metadata")
        .expect("metadata forwarded");
    assert!(
        header.is_ascii() && !header.contains(": ") && !header.contains(", "),
        "{header}"
    );
    assert!(header.contains("\\u00fc"), "non-ASCII escaped: {header}");
    let value: Value = serde_json::from_str(&header).expect("JSON");
    assert_eq!(value, metadata);
    assert!(
        !seen[1].has_header("x-keygate-metadata"),
        "a key without metadata"
    );
    assert!(
        !seen[2].has_header("x-keygate-metadata"),
        "a route without forward_metadata"
    );
    // A forward-auth decision for such a route hands the header to the proxy too.
    let decision = env
        .http
        .get(format!("{}/_keygate/authorize", env.config.base_url()))
        .header("x-forwarded-uri", "/meta/d")
        .header("x-api-key", &key)
        .send()
        .await
        .expect("authorize");
    assert_eq!(decision.status(), 200);
    let from_decision = decision
        .headers()
        .get("x-keygate-metadata")
        .map(|v| v.as_bytes().to_vec());
    assert_eq!(from_decision, Some(header.clone().into_bytes()));

    env.send(
        Method::PATCH,
        &format!("/keys/{}", id_of(&record)),
        Cred::Admin,
        Body::Json(json!({"metadata": {"plan": "enterprise"}})),
    )
    .await
    .ok(200);
    assert_eq!(call(&env, "/meta/c", &key, &[]).await, admitted());
    let seen = env.upstream.seen();
    assert_eq!(
        seen[3].header("x-keygate-metadata").as_deref(),
        Some("{\"plan\":\"enterprise\"}")
    );
}
