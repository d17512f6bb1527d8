//! Shared end-to-end test harness: a real upstream (hyper on tokio, recording what it
//! receives), the real `keygate` binary on free loopback ports with a generated config in a
//! temp dir, and helpers for the offline CLI.

pub(crate) mod browser;
pub(crate) mod cluster;
pub(crate) mod dns;
pub(crate) mod envelope;
pub(crate) mod keys;
pub(crate) mod management;
pub(crate) mod nginx;
pub(crate) mod pg;
pub(crate) mod raw;
pub(crate) mod redis;
pub(crate) mod tls;

pub(crate) use envelope::Reply;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// A loopback port that was free a moment ago, for a server a test starts. Taken below the
/// kernel's ephemeral range, where no client connection's source port (and no other
/// `bind(0)`) can land between this check and the server's bind; never the same port twice
/// in one test run; and from a starting point that differs per process, so that two test
/// runs on one machine rarely meet.
pub(crate) fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const LOWEST: usize = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_start.saturating_sub(LOWEST).max(1_000);
    let start = (std::process::id() as usize).wrapping_mul(7_919) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no free loopback port below {ephemeral_start}");
        let port = u16::try_from(LOWEST + (start + n) % span).expect("a port");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub(crate) fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// Every header value, as text, for "does the key appear anywhere" checks.
    pub(crate) fn all_header_text(&self) -> String {
        self.headers
            .iter()
            .map(|(n, v)| format!("{n}: {}\n", String::from_utf8_lossy(v)))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpstreamMode {
    /// 200 with body `upstream <name> <path>`.
    Ok,
    /// Accepts the request and never answers.
    Hang,
    /// Answers after one second.
    Slow,
    /// 503 to `GET /health` (a failing HTTP health check), 200 to everything else.
    FailingHealthPath,
}

/// A tiny HTTP/1.1 upstream on loopback that records every request it receives.
pub(crate) struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub(crate) async fn start(name: &str) -> Upstream {
        Self::start_with(name, UpstreamMode::Ok).await
    }

    pub(crate) async fn start_with(name: &str, mode: UpstreamMode) -> Upstream {
        Self::start_on(name, mode, "127.0.0.1:0".parse().expect("address")).await
    }

    /// On `addr` (any loopback address; port 0 for a free one).
    pub(crate) async fn start_on(name: &str, mode: UpstreamMode, addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let name_owned = name.to_string();
        let seen_task = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = Arc::clone(&seen_task);
                let name = name_owned.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let seen = Arc::clone(&seen);
                        let name = name.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let path_and_query = parts
                                .uri
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            seen.lock().expect("lock").push(Seen {
                                method: parts.method.to_string(),
                                path_and_query: path_and_query.clone(),
                                headers: parts
                                    .headers
                                    .iter()
                                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                                    .collect(),
                                body,
                            });
                            match mode {
                                UpstreamMode::Hang => {
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                }
                                UpstreamMode::Slow => {
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                }
                                _ => {}
                            }
                            let status = if mode == UpstreamMode::FailingHealthPath
                                && path_and_query == "/health"
                            {
                                503
                            } else {
                                200
                            };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("x-upstream", name.as_str())
                                    .body(Full::new(Bytes::from(format!(
                                        "upstream {name} {path_and_query}"
                                    ))))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, seen, task }
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub(crate) fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    /// Stops accepting: later connections are refused.
    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config file and store directory for one gateway, in a temp dir.
pub(crate) struct GatewayConfig {
    pub dir: tempfile::TempDir,
    pub listen: u16,
    pub admin: u16,
    /// Everything but [server] and [store]: routes, [keys], [management], ...
    pub extra: String,
    pub store_extra: String,
    pub server_extra: String,
    pub flush_interval_ms: u64,
}

impl GatewayConfig {
    /// One route "default" at "/" to `upstreams`, auth required.
    pub(crate) fn single_route(upstreams: &[SocketAddr]) -> Self {
        Self::with_routes(&format!(
            "[[routes]]\nname = \"default\"\npath_prefix = \"/\"\nupstreams = [{}]\nhealth_check_interval_ms = 200\n",
            quoted(upstreams)
        ))
    }

    /// One route "open" at "/" to `upstream`, no key needed.
    pub(crate) fn public_route(upstream: SocketAddr) -> Self {
        Self::with_routes(&format!(
            "[[routes]]\nname = \"open\"\npath_prefix = \"/\"\nupstreams = [\"{upstream}\"]\nauth = \"none\"\n"
        ))
    }

    pub(crate) fn with_routes(routes_toml: &str) -> Self {
        GatewayConfig {
            dir: tempfile::tempdir().expect("temp dir"),
            listen: free_port(),
            admin: free_port(),
            extra: routes_toml.to_string(),
            store_extra: String::new(),
            server_extra: String::new(),
            flush_interval_ms: 200,
        }
    }

    pub(crate) fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub(crate) fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().join("keygate.toml")
    }

    /// Writes the config file and returns its path.
    pub(crate) fn write(&self) -> PathBuf {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\nthreads = 2\nshutdown_grace_seconds = 0\naccess_log = \"{}\"\n{}\n\n[store]\nbackend = \"sled\"\npath = \"{}\"\nusage_flush_interval_ms = {}\n{}\n\n{}\n",
            self.listen,
            self.admin,
            self.access_log_path().display(),
            self.server_extra,
            self.store_path().display(),
            self.flush_interval_ms,
            self.store_extra,
            self.extra
        );
        let path = self.path();
        std::fs::write(&path, text).expect("write config");
        path
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.listen)
    }

    pub(crate) fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }
}

pub(crate) fn quoted(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `keygate` with `args` and returns its output.
pub(crate) fn keygate(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run keygate")
}

/// Creates a key with the offline CLI; returns (record JSON, raw key).
pub(crate) fn create_key(
    config: &Path,
    owner: &str,
    scopes: &[&str],
    ttl: Option<i64>,
) -> (serde_json::Value, String) {
    let config_str = config.to_str().expect("utf-8 path");
    let mut args = vec!["keys", "create", "--config", config_str, "--owner", owner];
    for scope in scopes {
        args.push("--scope");
        args.push(scope);
    }
    let ttl_text;
    if let Some(ttl) = ttl {
        ttl_text = ttl.to_string();
        args.push("--ttl-seconds");
        args.push(&ttl_text);
    }
    let out = keygate(&args);
    assert!(
        out.status.success(),
        "keys create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON record");
    let key = record["key"].as_str().expect("key in record").to_string();
    (record, key)
}

/// A running gateway process; stopped with SIGTERM (or killed) on drop.
pub(crate) struct Gateway {
    pub child: Option<Child>,
    pub base: String,
    pub admin: String,
}

impl Gateway {
    /// Starts `keygate serve` and waits until both listeners answer as keygate.
    pub(crate) async fn start(config: &GatewayConfig) -> Gateway {
        Self::start_with_env(config, &[]).await
    }

    pub(crate) async fn start_with_env(config: &GatewayConfig, env: &[(&str, &str)]) -> Gateway {
        let path = config.write();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config", path.to_str().expect("utf-8 path")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(config.dir.path().join("stderr.log")).expect("log file"),
            ))
            .env_remove("KEYGATE_ADMIN_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn keygate");
        let mut gateway = Gateway {
            child: Some(child),
            base: config.base_url(),
            admin: config.admin_url(),
        };
        gateway.wait_ready(config).await;
        gateway
    }

    /// Waits until the admin listener answers /healthz as keygate and the proxy listener
    /// accepts connections; fails early, with its stderr, if the process exits.
    pub(crate) async fn wait_ready(&mut self, config: &GatewayConfig) {
        let stderr =
            || std::fs::read_to_string(config.dir.path().join("stderr.log")).unwrap_or_default();
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "keygate exited during start-up ({status}); stderr:\n{}",
                    stderr()
                );
            }
            let healthz = client
                .get(format!("{}/healthz", self.admin))
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            if let Ok(resp) = healthz {
                let body = resp.text().await.unwrap_or_default();
                if body.contains("keygate")
                    && std::net::TcpStream::connect(("127.0.0.1", config.listen)).is_ok()
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "keygate did not become ready; stderr:\n{}",
                stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// SIGTERM, then waits for exit; returns whether it exited successfully.
    pub(crate) fn stop(&mut self) -> bool {
        self.signal_and_wait("-TERM")
    }

    pub(crate) fn kill9(&mut self) {
        self.signal_and_wait("-KILL");
    }

    fn signal_and_wait(&mut self, signal: &str) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A client with no connection reuse surprises: short timeouts, no proxies.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A client that opens a new connection for every request.
pub(crate) fn unpooled_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// `GET <management>/keys/{id}` as the admin: the key's record (usage included).
pub(crate) async fn key_record(base: &str, admin_token: &str, id: &str) -> serde_json::Value {
    let resp = client()
        .get(format!("{base}/_keygate/keys/{id}"))
        .bearer_auth(admin_token)
        .send()
        .await
        .expect("get record");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("record JSON")
}

/// The status of a GET of `url` with `key` in `x-api-key`.
pub(crate) async fn status_with_key(client: &reqwest::Client, url: &str, key: &str) -> u16 {
    client
        .get(url)
        .header("x-api-key", key)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

/// The status and `error.code` of a response; from 400 up it must be keygate's JSON error
/// (`envelope::error_envelope`, else a panic), below that the code is "".
pub(crate) async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let what = format!("{} {}", resp.url().path(), resp.status());
    let reply = Reply::read(what, resp).await;
    (reply.status, envelope::code_of(&reply.what, &reply))
}

/// Polls `check` until it returns true or `timeout` passes.
pub(crate) async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// An upstream that accepts only until the gateway's first health check has connected,
/// then refuses connections: with a long health-check interval, the gateway still thinks it
/// healthy (see `dead_upstream_is_502` in tests/e2e/proxy.rs).
pub(crate) struct RefusesAfterFirstCheck {
    pub addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RefusesAfterFirstCheck {
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let accepted_task = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted_task.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        RefusesAfterFirstCheck {
            addr,
            accepted,
            task,
        }
    }

    /// Call once the gateway runs: waits for its first health check, then closes the port.
    pub(crate) async fn close_after_first_check(self) {
        let accepted = Arc::clone(&self.accepted);
        assert!(
            eventually(Duration::from_secs(5), || async {
                accepted.load(Ordering::SeqCst) >= 1
            })
            .await,
            "the first health check never connected"
        );
        self.task.abort();
        let _ = self.task.await;
        let addr = self.addr;
        assert!(
            eventually(Duration::from_secs(5), || async {
                tokio::net::TcpStream::connect(addr).await.is_err()
            })
            .await,
            "the upstream port still accepts connections"
        );
    }
}

/// Every file below `dir`, recursively (for "no secret anywhere on disk" checks).
pub(crate) fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                files_under(&path, out);
            } else {
                out.push(path);
            }
        }
    }
}

/// The Prometheus text of a gateway's `/metrics`.
pub(crate) async fn scrape_metrics(admin: &str) -> String {
    client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("metrics text")
}
