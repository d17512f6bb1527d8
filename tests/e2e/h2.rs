//! HTTP/2 on the TLS listener (contract section 9): the request path's table of outcomes
//! sent once over HTTP/1.1 and once over HTTP/2 (hyper's client halves over tokio-rustls)
//! must come out the same, the upstream still gets HTTP/1.1 with the same headers, the
//! management API answers over HTTP/2, and one connection carries many streams.

use std::time::Duration;

use bytes::Bytes;

use crate::common::management::ADMIN;
use crate::common::tls::*;
use crate::common::*;

/// Routes: `/` needs a key, `/read` the scope `read`, `/limited` allows 2 a minute per
/// key, `/open` is public, `/hosted` is public for Host `localhost` only.
fn edge_routes(upstream: std::net::SocketAddr) -> String {
    let route = |name: &str, prefix: &str, extra: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstreams = [\"{upstream}\"]\n{extra}\n"
        )
    };
    [
        route("default", "/", ""),
        route("read", "/read", "scopes = [\"read\"]"),
        route(
            "limited",
            "/limited",
            "rate_limit = { requests = 2, window_seconds = 60 }",
        ),
        route("open", "/open", "auth = \"none\""),
        route("hosted", "/hosted", "host = \"localhost\"\nauth = \"none\""),
    ]
    .concat()
}

/// What a row of the table is checked on: status, error code, and the headers a refusal
/// or a limited key's answer must carry.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: u16,
    code: String,
    headers: Vec<(&'static str, Option<String>)>,
}

const CHECKED_HEADERS: [&str; 5] = [
    "www-authenticate",
    "retry-after",
    "ratelimit-limit",
    "ratelimit-remaining",
    "content-type",
];

fn outcome(answer: &Answer) -> Outcome {
    Outcome {
        status: answer.status,
        code: answer.code(),
        headers: CHECKED_HEADERS
            .iter()
            .map(|name| (*name, answer.header(name).map(str::to_string)))
            .collect(),
    }
}

struct Keys {
    alice: String,
    writer: String,
    expired: String,
    /// One per protocol, so that each run starts with a full rate-limit budget.
    limited: [String; 2],
}

/// A row: its name, the path, the request's headers.
type Row<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);

/// The table, sent on `client`; returns each row's name and outcome.
async fn table(client: &mut EdgeClient, keys: &Keys, limited: &str) -> Vec<(String, Outcome)> {
    let bad_checksum = crate::common::keys::with_char_changed(&keys.alice, 10);
    let unknown_body = format!("kg_{}", "7".repeat(43));
    let unknown = format!(
        "{unknown_body}{}",
        crate::common::keys::checksum(&unknown_body)
    );
    let rows: Vec<Row<'_>> = vec![
        ("valid", "/x", vec![("x-api-key", keys.alice.clone())]),
        (
            "bearer",
            "/x",
            vec![("authorization", format!("Bearer {}", keys.alice))],
        ),
        ("missing", "/x", vec![]),
        ("malformed", "/x", vec![("x-api-key", "kg_short".into())]),
        ("bad checksum", "/x", vec![("x-api-key", bad_checksum)]),
        ("unknown", "/x", vec![("x-api-key", unknown)]),
        ("expired", "/x", vec![("x-api-key", keys.expired.clone())]),
        (
            "conflicting",
            "/x",
            vec![
                ("x-api-key", keys.alice.clone()),
                ("key", keys.writer.clone()),
            ],
        ),
        (
            "scope held",
            "/read/x",
            vec![("x-api-key", keys.alice.clone())],
        ),
        (
            "scope missing",
            "/read/x",
            vec![("x-api-key", keys.writer.clone())],
        ),
        ("public", "/open/x", vec![]),
        // Public only on its host: routed elsewhere, it would need a key.
        ("host route", "/hosted/x", vec![]),
        ("dot segment", "/read/../x", vec![]),
        // Over `max_header_bytes` (64 KiB), under what the HTTP/2 layer itself refuses.
        (
            "header too large",
            "/x",
            vec![("x-big", "a".repeat(70 * 1024))],
        ),
        ("limited 1", "/limited", vec![("x-api-key", limited.into())]),
        ("limited 2", "/limited", vec![("x-api-key", limited.into())]),
        ("limited 3", "/limited", vec![("x-api-key", limited.into())]),
    ];
    let mut outcomes = Vec::new();
    for (name, path, headers) in rows {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let answer = client.get(path, &headers).await;
        assert!(
            answer.header("x-request-id").is_some(),
            "{name}: no x-request-id"
        );
        outcomes.push((name.to_string(), outcome(&answer)));
    }
    outcomes
}

#[tokio::test]
async fn every_outcome_over_http2_is_the_outcome_over_http1() {
    let upstream = Upstream::start("a").await;
    let mut config = GatewayConfig::with_routes(&edge_routes(upstream.addr));
    let ca = with_tls(&mut config);
    config.write();
    let path = config.path();
    let (_, alice) = create_key(&path, "alice", &["read"], None);
    let (_, writer) = create_key(&path, "bob", &["write"], None);
    let (_, expired) = create_key(&path, "carol", &[], Some(1));
    let limited = [
        create_key(&path, "dave", &[], None).1,
        create_key(&path, "erin", &[], None).1,
    ];
    let keys = Keys {
        alice,
        writer,
        expired,
        limited,
    };
    let _gateway = Gateway::start(&config).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let mut h1 = EdgeClient::connect(config.listen, &ca.pem, Proto::H1).await;
    let over_h1 = table(&mut h1, &keys, &keys.limited[0]).await;
    let h1_seen = upstream.seen();
    let mut h2 = EdgeClient::connect(config.listen, &ca.pem, Proto::H2).await;
    assert_eq!(h2.negotiated.as_deref(), Some(&b"h2"[..]));
    let over_h2 = table(&mut h2, &keys, &keys.limited[1]).await;
    let h2_seen = upstream.seen().split_off(h1_seen.len());

    let expected: Vec<(&str, u16, &str)> = vec![
        ("valid", 200, ""),
        ("bearer", 200, ""),
        ("missing", 401, "missing_credentials"),
        ("malformed", 401, "invalid_key"),
        ("bad checksum", 401, "invalid_key"),
        ("unknown", 401, "invalid_key"),
        ("expired", 401, "key_expired"),
        ("conflicting", 400, "conflicting_credentials"),
        ("scope held", 200, ""),
        ("scope missing", 403, "insufficient_scope"),
        ("public", 200, ""),
        ("host route", 200, ""),
        ("dot segment", 400, "invalid_path"),
        ("header too large", 431, "header_too_large"),
        ("limited 1", 200, ""),
        ("limited 2", 200, ""),
        ("limited 3", 429, "rate_limited"),
    ];
    for ((name, status, code), (row, got)) in expected.iter().zip(&over_h1) {
        assert_eq!(name, row);
        assert_eq!((got.status, got.code.as_str()), (*status, *code), "{name}");
    }
    for ((name, h1_outcome), (_, h2_outcome)) in over_h1.iter().zip(&over_h2) {
        assert_eq!(
            h1_outcome, h2_outcome,
            "{name}: HTTP/2 differs from HTTP/1.1"
        );
    }
    let limited_3 = &over_h2[16].1;
    assert!(
        limited_3
            .headers
            .iter()
            .any(|(n, v)| *n == "retry-after" && v.is_some()),
        "{limited_3:?}"
    );

    assert_same_upstream_requests(&h1_seen, &h2_seen, config.listen, &keys.alice);

    let admin = config.admin_url();
    assert!(metric(&admin, "keygate_downstream_requests_total{protocol=\"h2\"}").await >= 17.0);
    assert!(
        metric(
            &admin,
            "keygate_downstream_requests_total{protocol=\"http/1.1\"}"
        )
        .await
            >= 17.0
    );
    let log = std::fs::read_to_string(config.access_log_path()).expect("access log");
    assert!(log.contains("\"protocol\":\"h2\""), "{log}");
}

/// The upstream got the same requests with the same headers, over HTTP/1.1 (its server
/// speaks nothing else), whatever the client spoke.
fn assert_same_upstream_requests(h1_seen: &[Seen], h2_seen: &[Seen], listen: u16, key: &str) {
    assert_eq!(h1_seen.len(), 7, "{h1_seen:?}");
    assert_eq!(h2_seen.len(), h1_seen.len());
    for (a, b) in h1_seen.iter().zip(h2_seen) {
        assert_eq!(a.path_and_query, b.path_and_query);
        let names = |seen: &Seen| {
            let mut names: Vec<String> = seen
                .headers
                .iter()
                .map(|(n, _)| n.clone())
                .filter(|n| n != "x-keygate-key-id" && n != "x-keygate-owner")
                .collect();
            names.sort_unstable();
            names
        };
        assert_eq!(names(a), names(b), "{}", a.path_and_query);
        for name in [
            "host",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-keygate-scopes",
        ] {
            assert_eq!(a.header(name), b.header(name), "{name}");
        }
        assert_eq!(b.header("x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(b.header("host"), Some(format!("localhost:{listen}")));
        assert!(!b.all_header_text().contains(key));
    }
}

#[tokio::test]
async fn the_management_api_answers_over_http2() {
    let upstream = Upstream::start("a").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    let ca = with_tls(&mut config);
    let _gateway = Gateway::start_with_env(&config, &[("KEYGATE_ADMIN_TOKEN", ADMIN)]).await;
    let mut h2 = EdgeClient::connect(config.listen, &ca.pem, Proto::H2).await;
    let bearer = format!("Bearer {ADMIN}");
    let admin = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];

    let body = Bytes::from_static(br#"{"owner": "alice", "scopes": ["read"]}"#);
    let created = h2.send("POST", "/_keygate/keys", &admin, body).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let record = created.json();
    let key = record["key"].as_str().expect("key").to_string();
    let id = record["id"].as_str().expect("id").to_string();

    let listed = h2.get("/_keygate/keys?owner=alice", &admin).await;
    assert_eq!(listed.status, 200);
    assert!(String::from_utf8_lossy(&listed.body).contains(&id));
    assert_eq!(h2.get("/x", &[("x-api-key", &key)]).await.status, 200);

    let no_admin = h2.get("/_keygate/keys", &[]).await;
    assert_eq!(no_admin.status, 401);
    assert_eq!(no_admin.code(), "missing_credentials");

    let revoke_path = format!("/_keygate/keys/{id}");
    let revoked = h2.send("DELETE", &revoke_path, &admin, Bytes::new()).await;
    assert_eq!(revoked.status, 200, "{:?}", revoked.body);
    let refused = h2.get("/x", &[("x-api-key", &key)]).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (401, "invalid_key")
    );
}

#[tokio::test]
async fn one_http2_connection_carries_many_streams_and_bodies() {
    let upstream = Upstream::start("a").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    let ca = with_tls(&mut config);
    config.write();
    let (_, key) = create_key(&config.path(), "alice", &[], None);
    let _gateway = Gateway::start(&config).await;
    let h2 = EdgeClient::connect(config.listen, &ca.pem, Proto::H2).await;

    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut stream = h2.stream().expect("an HTTP/2 connection");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(format!("body {i} ").repeat(1000));
            let answer = stream
                .send("POST", &format!("/s/{i}"), &[("x-api-key", &key)], body)
                .await;
            answer.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("stream task"), 200);
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 64);
    for request in &seen {
        let i: usize = request
            .path_and_query
            .trim_start_matches("/s/")
            .parse()
            .expect("index");
        assert_eq!(request.body, format!("body {i} ").repeat(1000).into_bytes());
    }
}
