//! A newcomer's first hour: the README's walk-through pastes top to bottom, `keygate
//! check` reports every problem, a stop takes only as long as the requests in flight, and
//! mistakes get messages that say what to do.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::envelope::Reply;
use crate::common::management::{ADMIN, Body, Cred, Env};
use crate::common::*;

/// A config with every kind of mistake: a type error, unknown fields (one a near miss),
/// bad values in several sections and routes.
const EIGHT_MISTAKES: &str = r#"
[server]
listen = "127.0.0.1:8080"
shutdown_grace_seconds = "5"
threads = 0
listne = "x"

[keys]
prefix = "k_g"

[[routes]]
name = "a"
upstreams = ["127.0.0.1"]
scope = ["read"]
auth = "maybe"
"#;

#[test]
fn check_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, EIGHT_MISTAKES).expect("write");
    let out = keygate(&["check", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "server.shutdown_grace_seconds: expected an integer, got a string",
        "server.threads: must be between 1 and 256",
        "server.listne: unknown field; did you mean \"listen\"?",
        "keys.prefix",
        "routes[0].upstreams[0]",
        "routes[0].scope: unknown field; did you mean \"scopes\"?",
        "routes[0].auth",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    std::fs::write(&path, "[server]\nthreads = 2\nlisten = = 3\n").expect("write");
    let out = keygate(&["check", "--config", path.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("at line 3, column"), "{stderr}");
}

#[test]
fn a_short_admin_token_is_refused_by_check_and_serve() {
    let config = GatewayConfig::public_route("127.0.0.1:9".parse().expect("addr"));
    let path = config.write();
    let path = path.to_str().expect("utf-8");
    let out = Command::new(BIN)
        .args(["check", "--config", path])
        .env("KEYGATE_ADMIN_TOKEN", "short-token")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("management.admin_token_env") && stderr.contains("at least 32"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("short-token"),
        "the token is echoed: {stderr}"
    );
    let out = Command::new(BIN)
        .args(["serve", "--config", path])
        .env("KEYGATE_ADMIN_TOKEN", "short-token")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32"));
}

/// An upstream that answers each request after `delay`.
async fn slow_upstream(delay: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                if stream.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                tokio::time::sleep(delay).await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow";
                let _ = stream.write_all(answer).await;
            });
        }
    });
    addr
}

/// Starts the binary on `config` with a grace period of `grace_seconds`.
fn spawn_with_grace(config: &GatewayConfig, grace_seconds: u64) -> std::process::Child {
    let path = config.write();
    let text = std::fs::read_to_string(&path).expect("read config");
    let text = text.replace(
        "shutdown_grace_seconds = 0",
        &format!("shutdown_grace_seconds = {grace_seconds}"),
    );
    std::fs::write(&path, text).expect("write config");
    Command::new(BIN)
        .args(["serve", "--config", path.to_str().expect("utf-8")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(config.dir.path().join("stderr.log")).expect("log"),
        ))
        .spawn()
        .expect("spawn")
}

async fn wait_listening(port: u16) {
    let ok = eventually(Duration::from_secs(20), || async move {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(ok, "the gateway did not start listening");
}

fn signal(child: &std::process::Child, name: &str) {
    let status = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits for exit and returns how long it took and whether it was a success.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> (Duration, bool) {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return (started.elapsed(), status.success());
        }
        assert!(started.elapsed() < limit, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_stop_waits_for_the_requests_in_flight_and_no_longer() {
    let upstream = slow_upstream(Duration::from_millis(1500)).await;
    let config = GatewayConfig::public_route(upstream);
    let mut child = spawn_with_grace(&config, 30);
    wait_listening(config.listen).await;
    let url = format!("{}/slow", config.base_url());
    let in_flight = tokio::spawn(async move { client().get(url).send().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "-INT");
    let (took, success) = tokio::task::spawn_blocking(move || {
        let result = wait_exit(&mut child, Duration::from_secs(25));
        (result, child)
    })
    .await
    .map(|(result, _)| result)
    .expect("wait");
    let answer = in_flight
        .await
        .expect("task")
        .expect("the request in flight was answered");
    assert_eq!(answer.status(), 200);
    assert!(success, "exit status");
    // The request had ~1.2 s to go; the ceiling was 30 s.
    assert!(
        took >= Duration::from_millis(900),
        "stopped before the request ended: {took:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "waited out the grace period: {took:?}"
    );
    let log = std::fs::read_to_string(config.dir.path().join("stderr.log")).expect("log");
    assert!(log.contains("SIGINT received"), "{log}");
    assert!(!log.contains("SIGTERM"), "{log}");
}

#[tokio::test]
async fn an_idle_gateway_stops_at_once_and_names_the_signal() {
    let config = GatewayConfig::public_route("127.0.0.1:9".parse().expect("addr"));
    let mut child = spawn_with_grace(&config, 30);
    wait_listening(config.listen).await;
    signal(&child, "-TERM");
    let (took, success) = wait_exit(&mut child, Duration::from_secs(25));
    assert!(success);
    assert!(took < Duration::from_secs(5), "{took:?}");
    let log = std::fs::read_to_string(config.dir.path().join("stderr.log")).expect("log");
    assert!(log.contains("SIGTERM received"), "{log}");
}

#[tokio::test]
async fn a_locked_store_is_reported_in_a_sentence() {
    let upstream = Upstream::start("api").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    let _gateway = Gateway::start(&config).await;
    let out = keygate(&[
        "keys",
        "list",
        "--config",
        config.path().to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is locked by another process: is a gateway running on it?"),
        "{stderr}"
    );
    for debug_text in ["Os {", "WouldBlock", "kind:"] {
        assert!(!stderr.contains(debug_text), "{stderr}");
    }
}

#[test]
fn every_cli_option_is_documented() {
    for command in [
        vec!["serve"],
        vec!["check"],
        vec!["keys", "create"],
        vec!["keys", "list"],
        vec!["keys", "revoke"],
    ] {
        let mut args = command.clone();
        args.push("--help");
        let out = keygate(&args);
        assert!(out.status.success(), "{command:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        for line in help.lines().filter(|l| l.trim_start().starts_with("--")) {
            let option = line.split_whitespace().next().unwrap_or_default();
            if option == "--help" {
                continue;
            }
            // `--name <VALUE>  Description`: text after the value placeholder.
            let described = line
                .split("  ")
                .map(str::trim)
                .filter(|part| !part.is_empty())
                .count()
                >= 2;
            assert!(
                described,
                "{command:?}: {option} has no help text: {line:?}"
            );
        }
    }
    let create = keygate(&["keys", "create", "--help"]);
    let help = String::from_utf8_lossy(&create.stdout);
    assert!(help.contains("repeat the option"), "{help}");
    assert!(help.contains("seconds from now"), "{help}");
}

fn message_of(reply: &Reply) -> String {
    reply.json["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// What a caller sends when it has the admin token but puts it in the wrong place.
async fn token_mistakes(env: &Env, token: &str) -> Vec<(u16, String, String)> {
    let mut answers = Vec::new();
    for cred in [
        Cred::Key(token),
        Cred::KeyHeader(token),
        Cred::Bearer("not-the-token-0123456789abcdef0123456789"),
        Cred::None,
    ] {
        let reply = env.send(Method::GET, "/keys", cred, Body::None).await;
        let code = reply.json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        answers.push((reply.status, code, message_of(&reply)));
    }
    let unprefixed = client()
        .get(format!("{}/_keygate/keys", env.gateway.base))
        .header("authorization", token)
        .send()
        .await
        .expect("send");
    let reply = Reply::read("GET /keys with a bare token", unprefixed).await;
    let code = reply.json["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    answers.push((reply.status, code, message_of(&reply)));
    answers
}

#[tokio::test]
async fn admin_token_mistakes_are_told_what_was_meant() {
    let env = Env::start("").await;
    let answers = token_mistakes(&env, ADMIN).await;
    let [in_x_api_key, in_key, wrong, none, bare] = answers.as_slice() else {
        panic!("{answers:?}");
    };
    for answer in [in_x_api_key, in_key, none, bare] {
        assert_eq!(
            (answer.0, answer.1.as_str()),
            (401, "missing_credentials"),
            "{answer:?}"
        );
    }
    assert!(
        in_x_api_key.2.contains("Authorization: Bearer"),
        "{in_x_api_key:?}"
    );
    assert!(bare.2.contains("Bearer scheme"), "{bare:?}");
    assert_eq!((wrong.0, wrong.1.as_str()), (401, "invalid_key"));
    assert!(
        wrong.2.contains("neither the admin token nor an API key"),
        "{wrong:?}"
    );
}

#[tokio::test]
async fn answers_do_not_tell_whether_an_admin_token_is_set() {
    let with_token = Env::start("").await;
    let upstream = Upstream::start("api").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    let without_token = Gateway::start(&config).await;
    let shadow = Env {
        upstream,
        config,
        gateway: without_token,
        http: client(),
    };
    let a: Vec<(u16, String, String)> = token_mistakes(&with_token, ADMIN).await;
    let b: Vec<(u16, String, String)> = token_mistakes(&shadow, ADMIN).await;
    assert_eq!(a, b);
}

#[tokio::test]
async fn an_unknown_field_in_the_api_names_the_nearest_one() {
    let env = Env::start("").await;
    let reply = env
        .post(
            "/keys",
            Cred::Admin,
            json!({"owner": "alice", "scope": ["read"]}),
        )
        .await;
    let details = reply.invalid(&["scope"]);
    let reasons = details["scope"].to_string();
    assert!(reasons.contains("did you mean \\\"scopes\\\""), "{reasons}");
}

fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn failed_management_calls_are_counted_by_what_they_were() {
    let env = Env::start("").await;
    let (_, plain_key) = env.admin_create("bob", &["read"]).await;
    env.get("/nope", Cred::Admin).await.err(404, "not_found");
    env.post("/keys", Cred::Admin, json!({"owner": 5}))
        .await
        .err(422, "validation_failed");
    env.get("/keys", Cred::Key(&plain_key))
        .await
        .err(403, "insufficient_scope");
    env.get("/keys", Cred::None)
        .await
        .err(401, "missing_credentials");
    env.get("/keys", Cred::Admin).await.ok(200);
    // A call is counted in Pingora's logging hook, just after its answer has gone out.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = scrape_metrics(&env.gateway.admin).await;
        let allowed = "keygate_requests_total{outcome=\"allowed\",route=\"_management\"} 2";
        if metrics.lines().any(|l| l == allowed) || std::time::Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let series = |outcome: &str| {
        counter(
            &metrics,
            &format!("keygate_requests_total{{outcome=\"{outcome}\",route=\"_management\"}}"),
        )
    };
    assert_eq!(series("bad_request"), 2, "{metrics}");
    assert_eq!(series("insufficient_scope"), 1);
    assert_eq!(series("missing_credentials"), 1);
    // The create and the list.
    assert_eq!(series("allowed"), 2);
}

/// The README's walk-through, pasted into bash as a person would, on free ports.
#[tokio::test]
async fn the_readme_walk_through_pastes_top_to_bottom() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let from = readme
        .find("## Walk-through")
        .expect("walk-through section");
    let block = &readme[from..];
    let start = block.find("```sh\n").expect("code block") + "```sh\n".len();
    let script = &block[start..start + block[start..].find("```").expect("block end")];
    let backend = free_port();
    let token = "walkthrough-admin-token-0123456789abcdef";
    assert!(script.contains(token), "the README's token changed");
    let mut config = GatewayConfig::with_routes(&format!(
        "[[routes]]\nname = \"default\"\npath_prefix = \"/\"\nupstreams = [\"127.0.0.1:{backend}\"]\nhealth_check_interval_ms = 200\n"
    ));
    config.flush_interval_ms = 200;
    let _gateway = Gateway::start_with_env(&config, &[("KEYGATE_ADMIN_TOKEN", token)]).await;
    let demo = config.dir.path().join("demo");
    let script = script
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", config.listen))
        .replace("127.0.0.1:9180", &format!("127.0.0.1:{}", config.admin))
        .replace("http.server 3000", &format!("http.server {backend}"))
        .replace("/tmp/keygate-demo", demo.to_str().expect("utf-8"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args(["-c", &script])
            .output()
            .expect("bash")
    })
    .await
    .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("kg_")),
        "{stdout}"
    );
    assert_eq!(lines.iter().filter(|l| **l == "200").count(), 2, "{stdout}");
    for expected in [
        "\"code\":\"missing_credentials\"",
        "\"usage_count\":2",
        "\"revoked\":true",
        "\"code\":\"invalid_key\"",
        "\"status\":\"ready\"",
        "keygate_requests_total{outcome=\"allowed\",route=\"default\"} 2",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    let raw_key = lines[0];
    assert_eq!(stdout.matches(raw_key).count(), 1, "the key is shown once");
}
