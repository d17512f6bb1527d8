//! WebSockets (contract section 9): forwarded only on `websocket = true` routes, with the
//! key checked as for any request; a tunnel counts once as usage and is closed within 1 s
//! of its key's revocation or expiry. Elsewhere upgrade headers are removed and the request
//! goes on as an ordinary one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::cluster::{self, Instance};
use crate::common::management::{Cred, Env, GENEROUS, id_of};
use crate::common::raw::read_response;
use crate::common::{GatewayConfig, Upstream, pg, scrape_metrics};

/// The headers of each accepted handshake, in order.
type Handshakes = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// A WebSocket echo server that records the headers of every handshake it accepts.
struct EchoUpstream {
    addr: SocketAddr,
    handshakes: Handshakes,
    /// Connections the server is serving right now.
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoUpstream {
    async fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&handshakes);
        let open = Arc::new(AtomicUsize::new(0));
        let serving = Arc::clone(&open);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                let serving = Arc::clone(&serving);
                serving.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    serve_echo(stream, seen).await;
                    serving.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        EchoUpstream {
            addr,
            handshakes,
            open,
            task,
        }
    }

    fn last_handshake_header(&self, name: &str) -> Option<String> {
        let handshakes = self.handshakes.lock().expect("handshakes");
        let last = handshakes.last()?;
        last.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// One echo connection: the handshake (recorded), then every data message sent back.
async fn serve_echo(stream: TcpStream, seen: Handshakes) {
    // The callback's signature is tungstenite's, large error type included.
    #[allow(clippy::result_large_err)]
    let record = |req: &Request, resp: Response| {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect();
        seen.lock().expect("handshakes").push(headers);
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gateway with route "chat" (`/chat`, WebSockets on) to `echo` and route "plain" (`/`,
/// WebSockets off) to an ordinary upstream.
async fn gateway(echo: &EchoUpstream) -> Env {
    let upstream = Upstream::start("plain").await;
    let mut config = GatewayConfig::with_routes(&format!(
        "{GENEROUS}\n[[routes]]\nname = \"chat\"\npath_prefix = \"/chat\"\nupstreams = [\"{}\"]\nwebsocket = true\n\n[[routes]]\nname = \"plain\"\npath_prefix = \"/\"\nupstreams = [\"{}\"]\n",
        echo.addr, upstream.addr
    ));
    config.flush_interval_ms = 100;
    Env::on(config, upstream).await
}

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `path` through the gateway on `port`, with `key` in `x-api-key`.
async fn open(port: u16, path: &str, key: Option<&str>) -> Result<Client, WsError> {
    let url = format!("ws://127.0.0.1:{port}{path}");
    let mut request = url.into_client_request().expect("request");
    if let Some(key) = key {
        request
            .headers_mut()
            .insert("x-api-key", key.parse().expect("header value"));
    }
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("the handshake timed out")?;
    Ok(ws)
}

async fn echo_round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    text: &str,
) {
    ws.send(Message::text(text)).await.expect("send");
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("no echo within 5 s")
        .expect("the tunnel ended")
        .expect("read");
    assert_eq!(answer, Message::text(text));
}

/// Waits (at most `limit`) for the tunnel to end, as a client sees it: the stream ends, a
/// read fails, or a close frame arrives. Returns how long that took.
async fn time_to_close<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    let ended = tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the tunnel was still open after {limit:?}");
    started.elapsed()
}

async fn metric(env: &Env, series: &str) -> f64 {
    scrape_metrics(&env.config.admin_url())
        .await
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_websocket_route_tunnels_with_a_valid_key_and_counts_the_tunnel_once() {
    let echo = EchoUpstream::start().await;
    let env = gateway(&echo).await;
    let (record, key) = env.admin_create("alice", &[]).await;
    let mut ws = open(env.config.listen, "/chat/room", Some(&key))
        .await
        .expect("upgrade");
    for text in ["one", "two", "three"] {
        echo_round_trip(&mut ws, text).await;
    }
    // Several sweeps pass over a valid key's tunnel without closing it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    echo_round_trip(&mut ws, "still open").await;
    assert_eq!(metric(&env, "keygate_websocket_tunnels ").await, 1.0);

    assert_eq!(
        echo.last_handshake_header("x-keygate-key-id"),
        Some(id_of(&record))
    );
    assert_eq!(echo.last_handshake_header("x-api-key"), None);
    ws.close(None).await.expect("close");
    drop(ws);

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counted = env.record(&id_of(&record)).await["usage_count"].as_u64();
        let open_tunnels = metric(&env, "keygate_websocket_tunnels ").await;
        if counted == Some(1) && open_tunnels == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage_count {counted:?} (want 1) and {open_tunnels} open tunnels (want 0)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_websocket_upgrade_without_a_valid_key_is_refused() {
    let echo = EchoUpstream::start().await;
    let env = gateway(&echo).await;
    for key in [None, Some(crate::common::management::foreign_key())] {
        match open(env.config.listen, "/chat", key.as_deref()).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), 401, "key {key:?}");
                let body = response.body().as_deref().unwrap_or_default();
                let body: serde_json::Value = serde_json::from_slice(body).expect("JSON body");
                let want = if key.is_some() {
                    "invalid_key"
                } else {
                    "missing_credentials"
                };
                assert_eq!(body["error"]["code"], want, "{body}");
            }
            other => panic!("key {key:?}: expected a 401, got {:?}", other.map(|_| ())),
        }
    }
    assert!(echo.handshakes.lock().expect("handshakes").is_empty());
}

#[tokio::test]
async fn revoking_a_key_closes_its_open_tunnel_within_a_second() {
    let echo = EchoUpstream::start().await;
    let env = gateway(&echo).await;
    let (record, key) = env.admin_create("alice", &[]).await;
    let (_, other_key) = env.admin_create("bob", &[]).await;
    let mut ws = open(env.config.listen, "/chat", Some(&key))
        .await
        .expect("upgrade");
    let mut other = open(env.config.listen, "/chat", Some(&other_key))
        .await
        .expect("upgrade");
    echo_round_trip(&mut ws, "before").await;

    env.delete(&format!("/keys/{}", id_of(&record)), Cred::Admin)
        .await
        .ok(200);
    let took = time_to_close(&mut ws, Duration::from_secs(1)).await;
    eprintln!("tunnel closed {took:?} after the revoke's answer");

    // Only the revoked key's tunnel is closed, on both sides.
    echo_round_trip(&mut other, "unaffected").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while echo.open.load(Ordering::SeqCst) != 1 {
        assert!(
            Instant::now() < deadline,
            "the upstream still serves {} tunnels (want 1)",
            echo.open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(
            &env,
            "keygate_websocket_tunnels_closed_total{reason=\"revoked\"}"
        )
        .await,
        1.0
    );
    assert!(open(env.config.listen, "/chat", Some(&key)).await.is_err());
}

#[tokio::test]
async fn a_tunnel_is_closed_within_a_second_of_its_key_expiring() {
    let echo = EchoUpstream::start().await;
    let env = gateway(&echo).await;
    let (_, key) = env
        .create(Cred::Admin, json!({"owner": "alice", "ttl_seconds": 2}))
        .await;
    let mut ws = open(env.config.listen, "/chat", Some(&key))
        .await
        .expect("upgrade");
    echo_round_trip(&mut ws, "before").await;
    let took = time_to_close(&mut ws, Duration::from_secs(4)).await;
    // The key expires 1 to 2 s after creation (whole seconds); closing may take 1 s more.
    assert!(took <= Duration::from_secs(3), "closed after {took:?}");
    assert_eq!(
        metric(
            &env,
            "keygate_websocket_tunnels_closed_total{reason=\"expired\"}"
        )
        .await,
        1.0
    );
}

/// Sends `request` over a fresh connection and returns the response's status.
async fn raw_status(port: u16, request: &str) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    tokio::time::timeout(Duration::from_secs(10), read_response(&mut stream))
        .await
        .expect("no response within 10 s")
        .expect("a response")
        .status
}

#[tokio::test]
async fn upgrades_elsewhere_lose_their_upgrade_headers_and_go_on_as_ordinary_requests() {
    let echo = EchoUpstream::start().await;
    let env = gateway(&echo).await;
    let (_, key) = env.admin_create("alice", &[]).await;
    let port = env.config.listen;
    let upgrade = "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let request = format!(
        "GET /plain HTTP/1.1\r\nHost: gateway\r\nx-api-key: {key}\r\n{upgrade}Connection: close\r\n\r\n"
    );
    assert_eq!(raw_status(port, &request).await, 200);
    let seen = env.upstream.seen();
    let seen = seen.last().expect("forwarded");
    assert!(!seen.has_header("upgrade"), "{}", seen.all_header_text());
    let connection = seen.header("connection").unwrap_or_default();
    assert!(
        !connection.to_ascii_lowercase().contains("upgrade"),
        "connection: {connection}"
    );

    // On a WebSocket route, an upgrade to anything but WebSocket is not forwarded either:
    // the echo server, seeing no WebSocket handshake, refuses the request.
    let h2c = format!(
        "GET /chat HTTP/1.1\r\nHost: gateway\r\nx-api-key: {key}\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    );
    assert_ne!(raw_status(port, &h2c).await, 101);
    assert!(echo.handshakes.lock().expect("handshakes").is_empty());

    // The management API never upgrades.
    let management = format!(
        "GET /_keygate/keys HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\n{upgrade}\r\n",
        crate::common::management::ADMIN
    );
    assert_eq!(raw_status(port, &management).await, 200);
}

#[tokio::test]
async fn a_revoke_on_another_gateway_closes_the_tunnel_within_a_second() {
    let db = pg::fresh_database();
    let echo = EchoUpstream::start().await;
    let a = Instance::start(&db, echo.addr).await;
    let b = Instance::start(&db, echo.addr).await;
    let (id, key) = a.create_key("alice").await;
    let mut ws = open(b.config.listen, "/chat", Some(&key))
        .await
        .expect("upgrade on B");
    echo_round_trip(&mut ws, "before").await;

    let revoked = crate::common::client()
        .delete(format!("{}/_keygate/keys/{id}", a.base()))
        .bearer_auth(cluster::ADMIN)
        .send()
        .await
        .expect("revoke on A");
    assert_eq!(revoked.status(), 200);
    let took = time_to_close(&mut ws, Duration::from_secs(1)).await;
    eprintln!("B closed the tunnel {took:?} after A answered the revoke");
}

/// An upstream that answers 101 the moment it accepts a connection, before the request has
/// even arrived, then skips the request's header and echoes every byte after it: the
/// ordering in which Pingora 0.9.1 ends a fresh tunnel (cloudflare/pingora#946).
async fn eager_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                if stream.write_all(switching).await.is_err() {
                    return;
                }
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if let Some(end) = crate::common::raw::find(&seen, b"\r\n\r\n") {
                        let rest = seen.split_off(end + 4);
                        if stream.write_all(&rest).await.is_err() {
                            return;
                        }
                        break;
                    }
                }
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_fresh_tunnel_survives_an_upstream_that_switches_at_once() {
    use tokio::io::AsyncReadExt;
    let (addr, upstream_task) = eager_upstream().await;
    let upstream = Upstream::start("unused").await;
    let config = GatewayConfig::with_routes(&format!(
        "[[routes]]\nname = \"chat\"\npath_prefix = \"/\"\nupstreams = [\"{addr}\"]\nwebsocket = true\nauth = \"none\"\n"
    ));
    let env = Env::on(config, upstream).await;
    for attempt in 0..20 {
        let mut stream = TcpStream::connect(("127.0.0.1", env.config.listen))
            .await
            .expect("connect");
        let handshake = "GET /chat HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        stream.write_all(handshake.as_bytes()).await.expect("write");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("no 101 within 5 s")
                .expect("read");
            assert!(n > 0, "attempt {attempt}: closed before the 101");
            seen.extend_from_slice(&buf[..n]);
            if let Some(end) = crate::common::raw::find(&seen, b"\r\n\r\n") {
                break end + 4;
            }
        };
        assert!(seen.starts_with(b"HTTP/1.1 101"), "attempt {attempt}");
        let mut echoed = seen.split_off(head_end);
        stream
            .write_all(b"ping through the tunnel")
            .await
            .expect("write");
        while echoed.len() < b"ping through the tunnel".len() {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("no echo within 5 s")
                .expect("read");
            assert!(
                n > 0,
                "attempt {attempt}: the tunnel ended right after its 101"
            );
            echoed.extend_from_slice(&buf[..n]);
        }
        assert_eq!(echoed, b"ping through the tunnel", "attempt {attempt}");
    }
    upstream_task.abort();
}

/// Over TLS (`wss://`): the tunnel goes through keygate's TLS termination, and a revoke
/// still closes it (the sweep shuts down the TCP socket under the TLS session).
#[tokio::test]
async fn a_tunnel_over_tls_closes_on_revoke_too() {
    use crate::common::tls::{EdgeClient, Proto, client_config, handshake, with_tls};
    let echo = EchoUpstream::start().await;
    let mut config = GatewayConfig::with_routes(&format!(
        "[[routes]]\nname = \"chat\"\npath_prefix = \"/chat\"\nupstreams = [\"{}\"]\nwebsocket = true\n",
        echo.addr
    ));
    let ca = with_tls(&mut config);
    config.write();
    let (record, key) = crate::common::create_key(&config.path(), "alice", &[], None);
    let _gateway = crate::common::management::Env::start_gateway(&config).await;

    let tls = handshake(
        config.listen,
        "localhost",
        client_config(&ca.pem, &[b"http/1.1"]),
    )
    .await
    .expect("TLS handshake");
    let mut request = format!("wss://localhost:{}/chat", config.listen)
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("x-api-key", key.parse().expect("header value"));
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, tls),
    )
    .await
    .expect("the handshake timed out")
    .expect("upgrade over TLS");
    echo_round_trip(&mut ws, "over tls").await;
    assert_eq!(
        echo.last_handshake_header("x-forwarded-proto").as_deref(),
        Some("https")
    );

    let mut admin = EdgeClient::connect(config.listen, &ca.pem, Proto::H1).await;
    let id = record["id"].as_str().expect("id");
    let bearer = format!("Bearer {}", crate::common::management::ADMIN);
    let revoked = admin
        .send(
            "DELETE",
            &format!("/_keygate/keys/{id}"),
            &[("authorization", bearer.as_str())],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(revoked.status, 200);
    time_to_close(&mut ws, Duration::from_secs(1)).await;
}
