//! Per-key rate limits and flood resistance, end to end.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::keys::with_char_changed;
use crate::common::*;

const ADMIN: &str = "limits-admin-token-padded-to-32-";

async fn create_via_api(base: &str, body: serde_json::Value) -> (String, String) {
    let resp = client()
        .post(format!("{base}/_keygate/keys"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .expect("create");
    assert_eq!(resp.status(), 201);
    let record: serde_json::Value = resp.json().await.expect("JSON");
    (
        record["id"].as_str().expect("id").to_string(),
        record["key"].as_str().expect("key").to_string(),
    )
}

fn header_u64(resp: &reqwest::Response, name: &str) -> u64 {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .to_str()
        .expect("ascii")
        .parse()
        .expect("integer")
}

#[tokio::test]
async fn a_key_gets_its_burst_then_429_then_recovers() {
    let upstream = Upstream::start("u").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    let gateway = Gateway::start_with_env(&config, &[("KEYGATE_ADMIN_TOKEN", ADMIN)]).await;
    let (_, key) = create_via_api(
        &gateway.base,
        serde_json::json!({"owner": "alice", "rate_limit": {"requests": 5, "window_seconds": 2}}),
    )
    .await;
    let (_, other) = create_via_api(
        &gateway.base,
        serde_json::json!({"owner": "alice", "rate_limit": {"requests": 5, "window_seconds": 2}}),
    )
    .await;
    let c = client();
    let url = format!("{}/x", gateway.base);
    for expected_remaining in (0..5).rev() {
        let resp = c
            .get(&url)
            .header("x-api-key", &key)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        assert_eq!(header_u64(&resp, "ratelimit-limit"), 5);
        assert_eq!(header_u64(&resp, "ratelimit-remaining"), expected_remaining);
        assert!(header_u64(&resp, "ratelimit-reset") <= 2);
    }
    let refused = c
        .get(&url)
        .header("x-api-key", &key)
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 429);
    let retry_after = header_u64(&refused, "retry-after");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(header_u64(&refused, "ratelimit-remaining"), 0);
    assert_eq!(error_code(refused).await, (429, "rate_limited".to_string()));
    assert_eq!(
        upstream.count(),
        5,
        "the refused request never reached the upstream"
    );

    // Keys do not share limits.
    let resp = c
        .get(&url)
        .header("x-api-key", &other)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);

    // After the window the burst is available again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = c
        .get(&url)
        .header("x-api-key", &key)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);

    // A refused request is not counted as usage.
    let values = sorted_usage_counts(&c, &gateway.base).await;
    assert_eq!(values, vec![1, 6]);
}

/// The usage_count of each of alice's keys, sorted.
async fn sorted_usage_counts(c: &reqwest::Client, base: &str) -> Vec<u64> {
    let record: serde_json::Value = c
        .get(format!("{base}/_keygate/keys?owner=alice"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("JSON");
    let counts: BTreeMap<String, u64> = record["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| {
            (
                r["preview"].as_str().expect("preview").to_string(),
                r["usage_count"].as_u64().expect("count"),
            )
        })
        .collect();
    let mut values: Vec<u64> = counts.values().copied().collect();
    values.sort();
    values
}

#[tokio::test]
async fn a_route_default_applies_to_keys_without_their_own_limit() {
    let upstream = Upstream::start("u").await;
    let a = upstream.addr;
    let config = GatewayConfig::with_routes(&format!(
        "[[routes]]\nname = \"limited\"\npath_prefix = \"/\"\nupstreams = [\"{a}\"]\nrate_limit = {{ requests = 3, window_seconds = 60 }}\n"
    ));
    let gateway = Gateway::start_with_env(&config, &[("KEYGATE_ADMIN_TOKEN", ADMIN)]).await;
    let (_, plain) = create_via_api(&gateway.base, serde_json::json!({"owner": "a"})).await;
    let (_, own) = create_via_api(
        &gateway.base,
        serde_json::json!({"owner": "a", "rate_limit": {"requests": 10, "window_seconds": 60}}),
    )
    .await;
    let c = client();
    let url = format!("{}/x", gateway.base);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            c.get(&url)
                .header("x-api-key", &plain)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    // The key's own, larger limit wins over the route default.
    for _ in 0..6 {
        let resp = c
            .get(&url)
            .header("x-api-key", &own)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        assert_eq!(header_u64(&resp, "ratelimit-limit"), 10);
    }
}

async fn store_reads(admin: &str) -> f64 {
    scrape_metrics(admin)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("keygate_store_reads_total "))
        .and_then(|v| v.parse().ok())
        .expect("keygate_store_reads_total")
}

#[tokio::test]
async fn unknown_keys_reach_the_store_once_and_junk_never() {
    let upstream = Upstream::start("u").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    config.write();
    let (_, valid) = create_key(&config.path(), "alice", &[], None);
    let gateway = Gateway::start(&config).await;
    let format = keygate::keys::KeyFormat::new("kg");
    let distinct: Vec<String> = (0..500).map(|_| format.generate().expect("rng")).collect();
    let before = store_reads(&gateway.admin).await;

    // Each unknown well-formed key four times, over several connections.
    let mut tasks = Vec::new();
    for chunk in distinct.chunks(125) {
        let keys = chunk.to_vec();
        let url = format!("{}/x", gateway.base);
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..4 {
                for key in &keys {
                    let resp = c
                        .get(&url)
                        .header("x-api-key", key)
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(resp.status(), 401);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let after_unknown = store_reads(&gateway.admin).await;
    assert!(
        after_unknown - before <= distinct.len() as f64,
        "{} store reads for {} distinct unknown keys",
        after_unknown - before,
        distinct.len()
    );

    // Malformed, bad-checksum and oversized values never reach the store.
    let c = client();
    let bad_checksum = with_char_changed(&valid, 10);
    let junk = [
        "kg_".to_string(),
        "kg_short".to_string(),
        bad_checksum,
        format!("kg_{}", "A".repeat(4000)),
        format!("{}!", &valid[..51]),
    ];
    for value in junk.iter().cycle().take(1000) {
        let resp = c
            .get(format!("{}/x", gateway.base))
            .header("x-api-key", value)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 401);
    }
    assert_eq!(store_reads(&gateway.admin).await, after_unknown);
    assert_eq!(upstream.count(), 0);

    // The valid key still works: the negative cache did not push it out.
    let resp = c
        .get(format!("{}/x", gateway.base))
        .header("x-api-key", &valid)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
}

/// Sends a request header for `path` one byte every 200 ms, never finishing it, until the
/// gateway closes the connection (or 15 s pass); returns how long that took.
async fn trickle_header(stream: &mut tokio::net::TcpStream, path: &str) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let started = std::time::Instant::now();
    let header = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nX-Padding: {}",
        "a".repeat(60)
    );
    for byte in header.bytes().cycle() {
        if stream.write_all(&[byte]).await.is_err() {
            break;
        }
        // A closed connection shows as EOF on read (or a failed write).
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
            && n == 0
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(15) {
            break;
        }
    }
    started.elapsed()
}

/// A client sending its header one byte at a time is cut off by the header deadline, while
/// other clients are served throughout; past `max_connections`, new connections are closed.
#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = Upstream::start("u").await;
    let mut config = GatewayConfig::public_route(upstream.addr);
    config.server_extra = "header_read_timeout_seconds = 2\nmax_connections = 8".to_string();
    let gateway = Gateway::start(&config).await;

    // The slow client: one header byte every 200 ms, never finishing.
    let port = config.listen;
    let slow = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        trickle_header(&mut stream, "/slow").await
    });

    // Meanwhile other clients are served.
    let c = client();
    for _ in 0..10 {
        let resp = c
            .get(format!("{}/fast", gateway.base))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = slow.await.expect("slow client");
    assert!(
        held >= Duration::from_millis(1500) && held < Duration::from_secs(10),
        "the slow client was cut off after {held:?}, expected about 2 s"
    );
    assert!(
        !upstream.seen().iter().any(|s| s.path_and_query == "/slow"),
        "the incomplete request never reached the upstream"
    );

    // Eight idle connections take every slot; the ninth is closed without an answer.
    let mut held_open = Vec::new();
    for _ in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        stream.write_all(b"GET /h").await.expect("partial header");
        held_open.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ninth = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let _ = ninth.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), ninth.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "over the cap the connection is closed unanswered: {:?}",
        String::from_utf8_lossy(&buf)
    );
    drop(held_open);
}

/// A gateway with a public route to `upstream`, a one-second header time and
/// `keepalive_seconds` of keep-alive, and a connection that has had one request answered.
async fn kept_alive_after_one_request(
    upstream: &Upstream,
    keepalive_seconds: u64,
) -> (Gateway, tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;

    let mut config = GatewayConfig::public_route(upstream.addr);
    config.server_extra =
        format!("header_read_timeout_seconds = 1\nkeepalive_timeout_seconds = {keepalive_seconds}");
    let gateway = Gateway::start(&config).await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", config.listen))
        .await
        .expect("connect");
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let first = crate::common::raw::read_next_response(&mut stream, &mut Vec::new())
        .await
        .expect("first response");
    assert_eq!(first.status, 200);
    (gateway, stream)
}

/// The header deadline holds for every request on a keep-alive connection, not only the
/// first: a second request whose header comes a byte at a time is cut off within
/// `keepalive_timeout_seconds` of the first response (the time a reused connection's next
/// header has to be complete in).
#[tokio::test]
async fn slow_headers_on_a_reused_connection_are_cut_off() {
    let upstream = Upstream::start("u").await;
    let (_gateway, mut stream) = kept_alive_after_one_request(&upstream, 2).await;
    let held = trickle_header(&mut stream, "/second").await;
    // The deadline is the first response plus 2 s; before 0ef285f it was 3 s.
    assert!(
        held < Duration::from_millis(2800),
        "the second, trickled header held the connection for {held:?}; expected about 2 s"
    );
    assert!(
        !upstream
            .seen()
            .iter()
            .any(|s| s.path_and_query == "/second"),
        "the incomplete request never reached the upstream"
    );
}

/// An idle keep-alive connection is closed once `keepalive_timeout_seconds` pass after its
/// last response with no new request (keygate's header deadline does it; Pingora is told
/// to keep connections without a timer of its own), and not before.
#[tokio::test]
async fn an_idle_keepalive_connection_is_closed_after_the_keepalive_time() {
    use tokio::io::AsyncReadExt;

    let upstream = Upstream::start("u").await;
    let (_gateway, mut stream) = kept_alive_after_one_request(&upstream, 3).await;
    let answered = std::time::Instant::now();
    let mut rest = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut rest))
        .await
        .expect("the idle connection is closed within 10 s");
    let idle = answered.elapsed();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the gateway closed the connection without sending anything more: {read:?}"
    );
    assert!(
        idle >= Duration::from_millis(2500) && idle < Duration::from_millis(3800),
        "closed after {idle:?} idle; keepalive_timeout_seconds is 3 (4 s would be the old \
         keep-alive plus header time)"
    );
}

/// A request refused before its body is read (a 401 to a POST without a key) ends its
/// connection after the answer instead of keeping it alive: Pingora closes a connection
/// answered before its request was read whole, so no refused body is drained into the
/// next request's keep-alive time (README, Decisions).
#[tokio::test]
async fn a_request_refused_before_its_body_is_read_closes_its_connection() {
    let upstream = Upstream::start("u").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    let _gateway = Gateway::start(&config).await;
    // Room for a second response: a kept-alive connection would leave the read waiting
    // (past the helper's 10 s) instead of ending at the refusal.
    let request = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    let (responses, closed) = crate::common::raw::pipelined(config.listen, request, 2).await;
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].status, 401);
    assert_eq!(responses[0].header("connection"), Some("close"));
    assert!(closed, "the connection ends after the refusal");
    assert_eq!(
        upstream.count(),
        0,
        "the refused request never reached the upstream"
    );
}

/// `max_header_bytes` bounds the request line plus headers: 431 `header_too_large` beyond
/// it, before any key check or forwarding.
#[tokio::test]
async fn oversized_headers_are_refused_with_431() {
    let upstream = Upstream::start("u").await;
    let mut config = GatewayConfig::public_route(upstream.addr);
    config.server_extra = "max_header_bytes = 4096".to_string();
    let gateway = Gateway::start(&config).await;
    let c = client();
    let resp = c
        .get(format!("{}/x", gateway.base))
        .header("x-padding", "p".repeat(3 * 1024))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let resp = c
        .get(format!("{}/x", gateway.base))
        .header("x-padding", "p".repeat(5 * 1024))
        .send()
        .await
        .expect("request");
    assert_eq!(
        error_code(resp).await,
        (431, "header_too_large".to_string())
    );
    assert_eq!(
        upstream.count(),
        1,
        "the oversized request never reached the upstream"
    );
}

/// The header deadline is for headers only: a request whose upstream takes longer than
/// `header_read_timeout_seconds` (here 2.5 s against 1 s, so the connection's deadline
/// timer fires twice while it is served) is answered, and the same connection, left idle
/// for 1.5 s (longer than the header time, well within the keep-alive time of 3 s), then
/// serves another request.
#[tokio::test]
async fn a_slow_answer_outlives_the_header_deadline_on_its_connection() {
    use tokio::io::AsyncWriteExt;

    let (upstream_addr, _seen) = crate::common::raw::raw_upstream(|head| {
        let delay = if head.starts_with("GET /slow") {
            Duration::from_millis(2500)
        } else {
            Duration::ZERO
        };
        (delay, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    })
    .await;
    let mut config = GatewayConfig::public_route(upstream_addr);
    config.server_extra = "header_read_timeout_seconds = 1\nkeepalive_timeout_seconds = 3".into();
    let _gateway = Gateway::start(&config).await;

    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", config.listen))
        .await
        .expect("connect");
    let mut buf = Vec::new();
    for path in ["/slow", "/after"] {
        if path == "/after" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            crate::common::raw::read_next_response(&mut stream, &mut buf),
        )
        .await
        .unwrap_or_else(|_| panic!("{path}: no response"))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.body, b"ok", "{path}");
    }
}
