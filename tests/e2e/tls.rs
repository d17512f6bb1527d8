//! TLS on `listen` (`[server.tls]`, contract section 9): real TLS clients (tokio-rustls)
//! against the real binary, with a CA made in the test. What a client sees of a good
//! handshake, an untrusted CA, a wrong name, plain HTTP and silence on the TLS port;
//! `keygate check` on the certificate files; the certificate read again on SIGHUP.

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::tls::*;
use crate::common::*;

const FAILED: &str = "keygate_tls_handshake_errors_total{reason=\"failed\"}";
const PLAINTEXT: &str = "keygate_tls_handshake_errors_total{reason=\"plaintext\"}";
const TIMEOUT: &str = "keygate_tls_handshake_errors_total{reason=\"timeout\"}";

#[tokio::test]
async fn https_with_a_key_reaches_the_upstream_marked_https() {
    let upstream = Upstream::start("a").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    let ca = with_tls(&mut config);
    config.write();
    let (record, key) = create_key(&config.path(), "alice", &["read"], None);
    let _gateway = Gateway::start(&config).await;

    let mut client = EdgeClient::connect(config.listen, &ca.pem, Proto::H1).await;
    assert_eq!(client.negotiated.as_deref(), Some(&b"http/1.1"[..]));
    // Spoofed forwarding headers are replaced, whatever the client claims.
    let headers = [("x-api-key", key.as_str()), ("x-forwarded-proto", "http")];
    let answer = client.get("/hello?x=1", &headers).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = upstream.seen().pop().expect("upstream saw the request");
    assert_eq!(seen.path_and_query, "/hello?x=1");
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(format!("localhost:{}", config.listen))
    );
    assert_eq!(
        seen.header("x-keygate-key-id").as_deref(),
        record["id"].as_str()
    );
    assert!(
        !seen.all_header_text().contains(&key),
        "the key was forwarded"
    );

    // The same keep-alive connection: no key is 401 with its challenge.
    let answer = client.get("/hello", &[]).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.code(), "missing_credentials");
    assert_eq!(
        answer.header("www-authenticate"),
        Some("Bearer realm=\"keygate\"")
    );
    assert_eq!(upstream.count(), 1, "the refused request was forwarded");

    // A client offering both gets HTTP/2, the server's preference.
    let both = client_config(&ca.pem, &[b"h2", b"http/1.1"]);
    let tls = handshake(config.listen, "localhost", both)
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn an_untrusted_ca_or_a_wrong_name_fails_the_handshake() {
    let upstream = Upstream::start("a").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    let ca = with_tls(&mut config);
    let _gateway = Gateway::start(&config).await;

    let stranger = TestCa::new("some other CA");
    let untrusted = handshake(
        config.listen,
        "localhost",
        client_config(&stranger.pem, &[b"http/1.1"]),
    )
    .await
    .expect_err("a certificate from an unknown CA must be refused");
    assert!(
        format!("{untrusted:?}").contains("UnknownIssuer"),
        "{untrusted:?}"
    );
    let wrong_name = handshake(
        config.listen,
        "wrong.example",
        client_config(&ca.pem, &[b"http/1.1"]),
    )
    .await
    .expect_err("a certificate for another name must be refused");
    assert!(
        format!("{wrong_name:?}").contains("NotValidForName"),
        "{wrong_name:?}"
    );
    // keygate sees the client's alerts as failed handshakes, and keeps serving.
    let counted = eventually(Duration::from_secs(5), || async {
        metric(&config.admin_url(), FAILED).await >= 2.0
    })
    .await;
    assert!(counted, "{FAILED} did not count both refusals");
    let mut client = EdgeClient::connect(config.listen, &ca.pem, Proto::H1).await;
    assert_eq!(client.get("/", &[]).await.status, 401);
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_a_plain_400_and_serving_goes_on() {
    let upstream = Upstream::start("a").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    let ca = with_tls(&mut config);
    let _gateway = Gateway::start(&config).await;

    for request in [
        "GET / HTTP/1.1\r\nHost: localhost\r\nx-api-key: kg_x\r\n\r\n",
        // HTTP/2 with prior knowledge (h2c) is plain text too.
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let mut tcp = TcpStream::connect(("127.0.0.1", config.listen))
            .await
            .expect("connect");
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
            .await
            .expect("keygate closes after its answer")
            .expect("read the answer");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        assert_eq!(json["error"]["code"], "bad_request", "{text}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("https://")),
            "{text}"
        );
    }
    assert_eq!(metric(&config.admin_url(), PLAINTEXT).await, 2.0);
    assert_eq!(upstream.count(), 0);
    let mut client = EdgeClient::connect(config.listen, &ca.pem, Proto::H2).await;
    assert_eq!(client.get("/", &[]).await.status, 401);
}

#[tokio::test]
async fn a_client_silent_after_connecting_is_cut_off_at_the_header_deadline() {
    let upstream = Upstream::start("a").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    config.server_extra = "header_read_timeout_seconds = 1\n".into();
    let ca = with_tls(&mut config);
    let _gateway = Gateway::start(&config).await;

    let started = Instant::now();
    let mut tcp = TcpStream::connect(("127.0.0.1", config.listen))
        .await
        .expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte))
        .await
        .expect("keygate closes a silent connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(metric(&config.admin_url(), TIMEOUT).await, 1.0);
    let mut client = EdgeClient::connect(config.listen, &ca.pem, Proto::H1).await;
    assert_eq!(client.get("/", &[]).await.status, 401);
}

#[tokio::test]
async fn an_http2_client_that_never_sends_a_request_is_cut_off_too() {
    let upstream = Upstream::start("a").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    config.server_extra = "header_read_timeout_seconds = 1\n".into();
    let ca = with_tls(&mut config);
    let _gateway = Gateway::start(&config).await;

    // TLS done, `h2` agreed, then nothing: not even the connection preface.
    let mut silent = handshake(config.listen, "localhost", client_config(&ca.pem, &[b"h2"]))
        .await
        .expect("handshake");
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let started = Instant::now();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut sink))
        .await
        .expect("keygate closes a silent HTTP/2 connection");
    // Closed: an end of stream, or a reset (the TLS close_notify may not come).
    drop(read);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(metric(&config.admin_url(), TIMEOUT).await, 1.0);

    // A connection that does send a request in time is not cut off later.
    let mut client = EdgeClient::connect(config.listen, &ca.pem, Proto::H2).await;
    assert_eq!(client.get("/", &[]).await.status, 401);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(client.get("/", &[]).await.status, 401);
    assert_eq!(metric(&config.admin_url(), TIMEOUT).await, 1.0);
}

/// `keygate check` on `[server.tls]`: (stderr, exit code).
fn check(config: &GatewayConfig) -> (String, i32) {
    let path = config.write();
    let out = keygate(&["check", "--config", path.to_str().expect("utf-8")]);
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

#[tokio::test]
async fn check_reads_the_certificate_files() {
    let mut config = GatewayConfig::single_route(&["127.0.0.1:9".parse().expect("addr")]);
    let dir = config.dir.path().to_path_buf();
    let ca = TestCa::new("check CA");
    let good = ca.issue_current(&dir, "good");
    let other = ca.issue_current(&dir, "other");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expired = ca.issue(&dir, "expired", (now - 2 * 86_400, now - 86_400));

    config.server_extra = good.toml();
    assert_eq!(check(&config), (String::new(), 0));

    let missing = CertFiles {
        cert_file: dir.join("missing.pem"),
        key_file: good.key_file.clone(),
    };
    config.server_extra = missing.toml();
    let (stderr, code) = check(&config);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("server.tls.cert_file: cannot read"),
        "{stderr}"
    );

    let mismatched = CertFiles {
        cert_file: good.cert_file.clone(),
        key_file: other.key_file.clone(),
    };
    config.server_extra = mismatched.toml();
    let (stderr, code) = check(&config);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("server.tls.key_file: ") && stderr.contains("is not the key of"),
        "{stderr}"
    );

    std::fs::write(dir.join("garbage.pem"), "not a key").expect("write");
    config.server_extra = format!(
        "\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        good.cert_file.display(),
        dir.join("garbage.pem").display()
    );
    let (stderr, code) = check(&config);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("server.tls.key_file: "), "{stderr}");

    config.server_extra = "\n[server.tls]\ncert_file = \"x.pem\"\n".into();
    let (stderr, code) = check(&config);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("server.tls.key_file: required"), "{stderr}");

    // Expired: a warning with its field path, not an error.
    config.server_extra = expired.toml();
    let (stderr, code) = check(&config);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning: server.tls.cert_file: ") && stderr.contains("expired"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sighup_reads_the_certificate_again_and_a_bad_one_keeps_the_old() {
    let upstream = Upstream::start("a").await;
    let mut config = GatewayConfig::single_route(&[upstream.addr]);
    let dir = config.dir.path().to_path_buf();
    let first = TestCa::new("first CA");
    let files = first.issue_current(&dir, "edge");
    config.server_extra = files.toml();
    let gateway = Gateway::start(&config).await;
    let expiry = "keygate_tls_certificate_expiry_timestamp_seconds";
    let first_expiry = metric(&config.admin_url(), expiry).await;
    assert!(first_expiry > 0.0);

    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &gateway.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    // The same paths, new contents: a certificate from another CA, valid a day less.
    let second = TestCa::new("second CA");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    second.issue(&dir, "edge", (now - 3600, now + 300 * 86_400));
    hup();
    let second_served = eventually(Duration::from_secs(5), || async {
        handshake(
            config.listen,
            "localhost",
            client_config(&second.pem, &[b"http/1.1"]),
        )
        .await
        .is_ok()
    })
    .await;
    assert!(
        second_served,
        "the new certificate was not served after SIGHUP"
    );
    assert!(
        handshake(
            config.listen,
            "localhost",
            client_config(&first.pem, &[b"http/1.1"])
        )
        .await
        .is_err(),
        "the old certificate is still served"
    );
    let second_expiry = metric(&config.admin_url(), expiry).await;
    assert!(
        second_expiry < first_expiry,
        "{second_expiry} {first_expiry}"
    );

    // A broken key file: the certificate in use stays.
    std::fs::write(&files.key_file, "-----BEGIN PRIVATE KEY-----\nbroken\n").expect("write");
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut client = EdgeClient::connect(config.listen, &second.pem, Proto::H2).await;
    assert_eq!(client.get("/", &[]).await.status, 401);
    assert_eq!(metric(&config.admin_url(), expiry).await, second_expiry);
}
