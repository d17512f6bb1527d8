//! Live reconfiguration (contract section 10): `POST /-/reload` and SIGHUP against the real
//! binary, with keep-alive clients busy through the reloads, a name server the test
//! controls, and certificates renewed in place.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::dns::TestDns;
use crate::common::raw::read_response;
use crate::common::tls::{EdgeClient, Proto, TestCa, metric, with_tls};
use crate::common::*;

async fn reload(config: &GatewayConfig) -> (u16, Value) {
    let resp = client()
        .post(format!("{}/-/reload", config.admin_url()))
        .send()
        .await
        .expect("reload");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Writes `routes` as the config's routes and reloads; the reload must succeed.
async fn reload_routes(config: &mut GatewayConfig, routes: String) {
    config.extra = routes;
    config.write();
    let (status, body) = reload(config).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reloaded"], true, "{body}");
    assert_eq!(body["restart_required"], serde_json::json!([]), "{body}");
}

fn route(name: &str, prefix: &str, upstream: SocketAddr) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstreams = [\"{upstream}\"]\nhealth_check_interval_ms = 200\n"
    )
}

/// The upstream that answered, from the test upstream's body (`upstream <name> <path>`).
async fn answered_by(url: &str, key: &str) -> (u16, String) {
    let resp = client()
        .get(url)
        .header("x-api-key", key)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    let name = body.split(' ').nth(1).unwrap_or_default().to_string();
    (status, if status == 200 { name } else { body })
}

/// Polls until `check` holds; returns how long that took, or fails after `within`.
async fn within<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The reload counters (successes, failures) and whether the last reload was applied.
async fn assert_reloads(admin: &str, counts: (f64, f64), last_successful: f64) {
    let count = |result: &str| format!("keygate_config_reloads_total{{result=\"{result}\"}}");
    assert_eq!(metric(admin, &count("success")).await, counts.0);
    assert_eq!(metric(admin, &count("failure")).await, counts.1);
    assert_eq!(
        metric(admin, "keygate_config_last_reload_successful").await,
        last_successful
    );
}

/// What the keep-alive clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
}

/// One keep-alive connection sending valid-key requests back to back until `stop`.
async fn busy_connection(port: u16, key: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request = format!("GET /work HTTP/1.1\r\nHost: keygate.test\r\nx-api-key: {key}\r\n\r\n");
    while !stop.load(Ordering::Relaxed) {
        if stream.write_all(request.as_bytes()).await.is_err() {
            tally.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match read_response(&mut stream).await {
            Ok(resp) if resp.status == 200 => tally.ok.fetch_add(1, Ordering::Relaxed),
            Ok(_) => tally.failed.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                tally.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
    }
}

#[tokio::test]
async fn twenty_reloads_under_load_fail_no_request_drop_no_connection_and_apply_within_a_second() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut config = GatewayConfig::with_routes(&route("main", "/", a.addr));
    config.write();
    let (_, key) = create_key(&config.path(), "alice", &[], None);
    let _gateway = Gateway::start(&config).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(busy_connection(
                config.listen,
                key.clone(),
                Arc::clone(&stop),
                Arc::clone(&tally),
            ))
        })
        .collect();

    let base = config.base_url();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let adding = i % 2 == 0;
        let (main_to, expect_main) = if adding { (b.addr, "b") } else { (a.addr, "a") };
        let mut routes = route("main", "/", main_to);
        if adding {
            routes.push_str(&route("extra", "/extra", b.addr));
        }
        // A changed server timeout builds a new connection stack: the busy connections
        // stay on the one they began on.
        config.server_extra = format!("header_read_timeout_seconds = {}\n", 10 + i % 2);
        reload_routes(&mut config, routes).await;
        let took = within(Duration::from_secs(1), &format!("reload {i}"), || async {
            let extra = answered_by(&format!("{base}/extra/x"), &key).await;
            // Without the extra route, /extra/x falls to the main route.
            let extra_ok = if adding {
                extra == (200, "b".to_string())
            } else {
                extra == (200, expect_main.to_string())
            };
            extra_ok
                && answered_by(&format!("{base}/work"), &key).await == (200, expect_main.into())
        })
        .await;
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("worker");
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failed requests");
    assert_eq!(
        tally.dropped.load(Ordering::Relaxed),
        0,
        "dropped connections"
    );
    assert!(ok > 100, "the clients kept busy: {ok} requests");
    assert_reloads(&config.admin_url(), (20.0, 0.0), 1.0).await;
    eprintln!("{ok} requests over 20 reloads; slowest change visible after {slowest:?}");
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_the_route_a_reload_removed() {
    let slow = Upstream::start_with("slow", UpstreamMode::Slow).await;
    let a = Upstream::start("a").await;
    let mut config = GatewayConfig::with_routes(&format!(
        "{}{}",
        route("main", "/", a.addr),
        route("slow", "/slow", slow.addr)
    ));
    config.write();
    let (_, key) = create_key(&config.path(), "alice", &[], None);
    let _gateway = Gateway::start(&config).await;
    let url = format!("{}/slow/x", config.base_url());
    let in_flight = tokio::spawn({
        let key = key.clone();
        async move { answered_by(&url, &key).await }
    });
    within(
        Duration::from_secs(2),
        "the slow request upstream",
        || async { slow.count() == 1 },
    )
    .await;
    reload_routes(&mut config, route("main", "/", a.addr)).await;
    assert_eq!(
        answered_by(&format!("{}/slow/x", config.base_url()), &key).await,
        (200, "a".into()),
        "new requests no longer reach the removed route"
    );
    assert_eq!(
        in_flight.await.expect("request"),
        (200, "slow".into()),
        "the request in flight finished on its route"
    );
}

#[tokio::test]
async fn a_broken_file_changes_nothing_and_names_every_problem() {
    let a = Upstream::start("a").await;
    let mut config = GatewayConfig::with_routes(&route("main", "/", a.addr));
    config.write();
    let (_, key) = create_key(&config.path(), "alice", &[], None);
    let _gateway = Gateway::start(&config).await;
    let admin = config.admin_url();
    let before = metric(
        &admin,
        "keygate_config_last_reload_success_timestamp_seconds",
    )
    .await;
    assert!(before > 0.0);

    config.extra = format!(
        "{}colour = \"red\"\n[[routes]]\nname = \"bad\"\npath_prefix = \"/b\"\nupstreams = [\"nonsense\"]\n{}",
        route("main", "/", a.addr),
        route("twin", "/", a.addr)
    );
    config.write();
    let (status, body) = reload(&config).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config", "{body}");
    let details = body["error"]["details"].as_object().expect("details");
    for path in [
        "routes[0].colour",
        "routes[1].upstreams[0]",
        "routes[2].path_prefix",
    ] {
        let reasons = details.get(path).and_then(Value::as_array);
        assert!(
            reasons.is_some_and(|r| !r.is_empty()),
            "{path} missing: {body}"
        );
    }
    assert_eq!(
        answered_by(&format!("{}/work", config.base_url()), &key).await,
        (200, "a".to_string()),
        "the old routes keep serving"
    );
    assert_reloads(&admin, (0.0, 1.0), 0.0).await;
    assert_eq!(
        metric(
            &admin,
            "keygate_config_last_reload_success_timestamp_seconds"
        )
        .await,
        before
    );

    reload_routes(&mut config, route("main", "/", a.addr)).await;
    assert_reloads(&admin, (1.0, 1.0), 1.0).await;
}

#[tokio::test]
async fn a_changed_listen_is_named_and_waits_for_a_restart() {
    let a = Upstream::start("a").await;
    let mut config = GatewayConfig::public_route(a.addr);
    let _gateway = Gateway::start(&config).await;
    let old = config.listen;
    config.listen = free_port();
    config.write();
    let (status, body) = reload(&config).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["restart_required"],
        serde_json::json!(["server.listen"])
    );
    let resp = client()
        .get(format!("http://127.0.0.1:{old}/x"))
        .send()
        .await
        .expect("the old address still serves");
    assert_eq!(resp.status(), 200);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", config.listen)).is_err(),
        "the new address is not listened on before a restart"
    );
}

#[tokio::test]
async fn sighup_reloads_and_rate_limits_and_health_survive_reloads() {
    let a = Upstream::start("a").await;
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let limited = "[[routes]]\nname = \"main\"\npath_prefix = \"/\"\nrate_limit = { requests = 3, window_seconds = 3600 }\n";
    let pair = format!(
        "[[routes]]\nname = \"pair\"\npath_prefix = \"/pair\"\nupstreams = [\"{}\", \"{dead}\"]\nhealth_check_interval_ms = 100\n",
        a.addr
    );
    let mut config =
        GatewayConfig::with_routes(&format!("{limited}upstreams = [\"{}\"]\n{pair}", a.addr));
    config.write();
    let (_, key) = create_key(&config.path(), "alice", &[], None);
    let mut gateway = Gateway::start(&config).await;
    let (base, admin) = (config.base_url(), config.admin_url());
    for _ in 0..3 {
        assert_eq!(answered_by(&format!("{base}/x"), &key).await.0, 200);
    }
    let dead_series = format!("keygate_upstream_healthy{{route=\"pair\",upstream=\"{dead}\"}}");
    within(
        Duration::from_secs(5),
        "the dead upstream marked down",
        || async {
            metric(&admin, &dead_series).await == 0.0
                && metric(
                    &admin,
                    &format!(
                        "keygate_upstream_healthy{{route=\"pair\",upstream=\"{}\"}}",
                        a.addr
                    ),
                )
                .await
                    == 1.0
        },
    )
    .await;

    // The limited route changes (a timeout), another is added; by SIGHUP.
    config.extra = format!(
        "{limited}upstreams = [\"{}\"]\nread_timeout_ms = 9000\n{pair}{}",
        a.addr,
        route("more", "/more", a.addr)
    );
    config.write();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    within(
        Duration::from_secs(2),
        "the route added by SIGHUP",
        || async {
            metric(&admin, "keygate_config_reloads_total{result=\"success\"}").await == 1.0
        },
    )
    .await;
    // The kept route kept its health: no fresh balancer that thinks the dead one is up.
    assert_eq!(metric(&admin, &dead_series).await, 0.0);
    let (status, _) = answered_by(&format!("{base}/x"), &key).await;
    assert_eq!(status, 429, "the route's budget outlived the reload");
    assert!(gateway.stop(), "a clean stop after reloads");
}

#[tokio::test]
async fn signup_and_the_access_log_change_live() {
    let a = Upstream::start("a").await;
    let mut config = GatewayConfig::public_route(a.addr);
    let _gateway = Gateway::start(&config).await;
    let signup = format!("{}/_keygate/signup", config.base_url());
    let sign_up = || async {
        let body = serde_json::json!({"name": "mine"});
        let resp = client().post(&signup).json(&body).send().await;
        resp.expect("signup").status()
    };
    assert_eq!(sign_up().await, 404, "sign-up is off");

    let new_log = config.dir.path().join("second.log");
    config.server_extra = format!("access_log = \"{}\"\n", new_log.display());
    config.extra.push_str("\n[signup]\nenabled = true\n");
    config.write();
    let text = std::fs::read_to_string(config.path()).expect("config");
    // The harness writes its own access_log first; the later one must be the only one.
    let text = text.replacen(
        &format!("access_log = \"{}\"\n", config.access_log_path().display()),
        "",
        1,
    );
    std::fs::write(config.path(), text).expect("config");
    let (status, body_seen) = reload(&config).await;
    assert_eq!(status, 200, "{body_seen}");
    assert_eq!(sign_up().await, 201, "sign-up is on after the reload");
    client()
        .get(format!("{}/logged", config.base_url()))
        .send()
        .await
        .expect("request");
    within(
        Duration::from_secs(3),
        "the line in the new access log",
        || async { std::fs::read_to_string(&new_log).is_ok_and(|t| t.contains("/logged")) },
    )
    .await;
}

#[tokio::test]
async fn upstream_names_resolve_and_a_refresh_moves_traffic() {
    let port = free_port();
    let a = Upstream::start_on(
        "a",
        UpstreamMode::Ok,
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
    .await;
    let b = Upstream::start_on(
        "b",
        UpstreamMode::Ok,
        SocketAddr::from(([127, 0, 0, 2], port)),
    )
    .await;
    let dns = TestDns::start(&[Ipv4Addr::new(127, 0, 0, 1)]).await;
    let mut config = GatewayConfig::with_routes(&format!(
        "[[routes]]\nname = \"named\"\npath_prefix = \"/\"\nauth = \"none\"\nupstreams = [\"svc.keygate.test:{port}\"]\n\
         [[routes]]\nname = \"local\"\npath_prefix = \"/local\"\nauth = \"none\"\nupstreams = [\"localhost:{}\"]\n",
        a.addr.port()
    ));
    config.server_extra = format!("resolver = [\"{}\"]\ndns_refresh_seconds = 1\n", dns.addr);
    let _gateway = Gateway::start(&config).await;
    let base = config.base_url();
    assert_eq!(
        answered_by(&format!("{base}/x"), "").await,
        (200, "a".into())
    );
    assert_eq!(
        answered_by(&format!("{base}/local/x"), "").await,
        (200, "a".into()),
        "`localhost` resolves through the system resolver"
    );

    dns.set(&[Ipv4Addr::new(127, 0, 0, 2)]);
    within(
        Duration::from_secs(5),
        "traffic moved to the new address",
        || async { answered_by(&format!("{base}/x"), "").await == (200, "b".into()) },
    )
    .await;

    dns.fail();
    let admin = config.admin_url();
    let series = format!(
        "keygate_upstream_dns_failures_total{{route=\"named\",upstream=\"svc.keygate.test:{port}\"}}"
    );
    within(
        Duration::from_secs(8),
        "the failed refresh counted",
        || async { metric(&admin, &series).await >= 1.0 },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            answered_by(&format!("{base}/x"), "").await,
            (200, "b".into()),
            "the name kept its last address"
        );
    }
    drop((a, b));
}

#[tokio::test]
async fn check_warns_about_names_that_do_not_resolve() {
    let config = GatewayConfig::with_routes(
        "[[routes]]\nname = \"n\"\npath_prefix = \"/\"\nupstreams = [\"no-such-host.invalid:80\"]\n",
    );
    let path = config.write();
    let out = keygate(&["check", "--config", path.to_str().expect("path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning, not an error: {stderr}");
    assert!(
        stderr.contains("routes[0].upstreams[0]") && stderr.contains("does not resolve"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_renewed_certificate_reaches_new_connections_while_open_ones_keep_working() {
    let a = Upstream::start("a").await;
    let mut config = GatewayConfig::public_route(a.addr);
    let old_ca = with_tls(&mut config);
    let _gateway = Gateway::start(&config).await;
    let mut open = EdgeClient::connect(config.listen, &old_ca.pem, Proto::H1).await;
    assert_eq!(open.get("/before", &[]).await.status, 200);

    // Renewed in place: same file names, a certificate from another CA.
    let new_ca = TestCa::new("renewed CA");
    new_ca.issue_current(config.dir.path(), "edge");
    let new_roots = crate::common::tls::client_config(&new_ca.pem, &[b"http/1.1"]);
    let before =
        crate::common::tls::handshake(config.listen, "localhost", Arc::clone(&new_roots)).await;
    assert!(
        before.is_err(),
        "the new certificate is not served before the reload"
    );
    let (status, body) = reload(&config).await;
    assert_eq!(status, 200, "{body}");

    let mut renewed = EdgeClient::connect(config.listen, &new_ca.pem, Proto::H1).await;
    assert_eq!(renewed.get("/after", &[]).await.status, 200);
    assert_eq!(
        open.get("/still", &[]).await.status,
        200,
        "the connection opened before the reload keeps working"
    );
}

#[tokio::test]
async fn reload_takes_post_only() {
    let a = Upstream::start("a").await;
    let config = GatewayConfig::public_route(a.addr);
    let _gateway = Gateway::start(&config).await;
    let resp = client()
        .get(format!("{}/-/reload", config.admin_url()))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 405);
}

#[test]
fn the_systemd_unit_verifies() {
    let out = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .expect(
            "systemd-analyze is not installed: install Debian's systemd package (bash .ci/setup)",
        );
    assert!(out.status.success());
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/keygate.service"
    ))
    .expect("config/keygate.service");
    // Verified as shipped, except that ExecStart names the binary just built.
    let dir = tempfile::tempdir().expect("dir");
    let unit = unit.replace("/usr/local/bin/keygate", BIN);
    let path = dir.path().join("keygate.service");
    std::fs::write(&path, unit).expect("unit");
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", path.to_str().expect("path")])
        .output()
        .expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let own: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("keygate.service"))
        .collect();
    assert!(out.status.success() && own.is_empty(), "{stderr}");
}
