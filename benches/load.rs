//! End-to-end load, side by side, measured in one run:
//!
//!   direct to the upstream | keygate, auth = "none" | keygate, one valid key |
//!   keygate, random invalid keys | keygate, 100k distinct valid keys, the cache warmed at
//!   start (`distinct`) and with the warm-up off (`distinct-cold`: every first use a miss) |
//!   keygate on PostgreSQL (valid key, warm cache), when PostgreSQL is installed |
//!   keygate, valid key alone and beside a flood of distinct unknown well-formed keys
//!   (row `flood`, `benches/load/flood.rs`) |
//!   nginx with a `map $http_x_api_key` check (valid key, and its 401 to invalid keys),
//!   when nginx is installed | HTTPS HTTP/1.1 and HTTP/2 with a valid key, keygate and
//!   nginx each terminating TLS (`load/tls.rs`) | keygate, a key with a rate limit or a
//!   quota (never reached) beside one with neither, limits decided in the gateway or in a
//!   throwaway Redis when redis-server is installed (rows `limits-*`, `quota-*`; all of
//!   them: `LOAD_ROWS=limits`; `load/limits.rs`) | latency at a fixed rate, `auth = "none"`
//!   against a valid key (`LOAD_ROWS=latency`, `load/latency.rs`)
//!
//! `cargo bench --bench load` builds the release gateway (bench profile) and runs it from
//! `CARGO_BIN_EXE_keygate`; nothing is built by hand. HTTP/1.1 keep-alive, a fixed number
//! of connections, a fixed time per row. The gateway (and nginx) run pinned to the last
//! core; the load generator and the upstream to the first.
//!
//! Environment: LOAD_SECONDS (default 5), LOAD_CONNECTIONS (default 32),
//! LOAD_ROWS (comma-separated row names to run; default all), LOAD_WRK=1 to drive the
//! single-header rows with wrk instead (when wrk is installed), LOAD_SCALE=1 for the scale
//! check instead (1 million keys, or LOAD_SCALE_KEYS: start-up, RSS, durable creates),
//! LOAD_GATEWAY_CORES and LOAD_GENERATOR_CORES (taskset lists, e.g. `4-7` and `0-3`; default
//! the last core and the first) to give the servers and the generator cores of their own,
//! LOAD_GATEWAY_THREADS (default: one per gateway core), LOAD_KEYGATE_BIN (another keygate
//! binary to measure, for before/after pairs), LOAD_CALLGRIND=1 (instructions a request
//! instead of rates: `load/instructions.rs`), LOAD_ROUNDS (default 1: run the request-path
//! rows that many times, the distinct ones once, and print each round's ratios and their
//! medians).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keygate::keys::{KeyFormat, KeyRecord};
use keygate::store::{KeyStore, PgStore, SledStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "../tests/pg/mod.rs"]
mod pg;
#[path = "load/tls.rs"]
mod tls;

#[path = "load/bare.rs"]
mod bare;
#[path = "load/cores.rs"]
mod cores;
#[path = "load/flood.rs"]
mod flood;
#[path = "load/forward_auth.rs"]
mod forward_auth;
#[path = "load/instructions.rs"]
mod instructions;
#[path = "load/latency.rs"]
mod latency;
#[path = "load/limits.rs"]
mod limits;
#[path = "load/reload.rs"]
mod reload;

// The bare Pingora row runs in this binary: it gets the allocator keygate runs with.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DISTINCT_KEYS: usize = 100_000;
const UPSTREAM_BODY: &str = "{\"ok\":true,\"from\":\"upstream\"}";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins a process, every thread of it and every process it has started (nginx's workers,
/// forked before this runs, would otherwise keep the generator's core) to one core (best
/// effort: `taskset` may be missing).
fn pin(pid: u32, core: usize) {
    let cores = cores::list(cores::plan().group_of(core));
    let _ = Command::new("taskset")
        .args(["-a", "-cp", &cores, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    for child in children(pid) {
        pin(child, core);
    }
}

/// The processes `pid` started, from /proc (empty where it cannot be read).
fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A minimal keep-alive HTTP/1.1 upstream answering every request with a small JSON body.
async fn run_upstream(listener: TcpListener) {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{UPSTREAM_BODY}",
        UPSTREAM_BODY.len()
    );
    let response: Arc<[u8]> = Arc::from(response.into_bytes());
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let response = Arc::clone(&response);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut filled = 0;
            loop {
                match stream.read(&mut buf[filled..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => filled += n,
                }
                // Answer every complete request header in the buffer (no bodies are sent).
                while let Some(end) = find(&buf[..filled], b"\r\n\r\n") {
                    if stream.write_all(&response).await.is_err() {
                        return;
                    }
                    buf.copy_within(end + 4..filled, 0);
                    filled -= end + 4;
                }
                if filled == buf.len() {
                    return;
                }
            }
        });
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response (headers + Content-Length body); returns its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).ok()?;
            let status: u16 = head.get(9..12)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(status);
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct RowResult {
    requests: u64,
    /// Every response, the warm-up's included: what the server did during the row.
    served: u64,
    errors: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

/// What one connection of a row saw: latencies (µs), statuses, errors, and every response
/// (the warm-up's too).
type ConnectionResult = (Vec<u32>, std::collections::BTreeMap<u16, u64>, u64, u64);

impl RowResult {
    /// The row's result from its connections' tasks, over `elapsed` of measured time.
    async fn gather(
        elapsed: Duration,
        tasks: Vec<tokio::task::JoinHandle<ConnectionResult>>,
    ) -> RowResult {
        let mut result = RowResult {
            requests: 0,
            served: 0,
            errors: 0,
            statuses: Default::default(),
            elapsed,
            latencies_us: Vec::new(),
        };
        for task in tasks {
            if let Ok((latencies, statuses, errors, served)) = task.await {
                result.requests += latencies.len() as u64;
                result.served += served;
                result.latencies_us.extend(latencies);
                result.errors += errors;
                for (s, n) in statuses {
                    *result.statuses.entry(s).or_insert(0) += n;
                }
            }
        }
        result.latencies_us.sort_unstable();
        result
    }

    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p)
    }
}

/// The `p` quantile (0..=1) of sorted latencies; 0 when there are none.
fn percentile(sorted_us: &[u32], p: f64) -> f64 {
    let Some(last) = sorted_us.len().checked_sub(1) else {
        return 0.0;
    };
    f64::from(sorted_us[(last as f64 * p).round() as usize])
}

/// Drives `connections` keep-alive connections for `seconds`, cycling through `requests`
/// (pre-rendered request bytes).
async fn drive(
    target: SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    connections: usize,
    seconds: u64,
) -> RowResult {
    let stop = Arc::new(AtomicBool::new(false));
    let warmup = Duration::from_millis(500);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let requests = Arc::clone(&requests);
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut statuses = std::collections::BTreeMap::new();
            let mut errors = 0u64;
            let mut served = 0u64;
            let mut buf = Vec::with_capacity(16 * 1024);
            let mut i = c * 7919;
            'connect: while !stop.load(Ordering::Relaxed) {
                let Ok(mut stream) = TcpStream::connect(target).await else {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                while !stop.load(Ordering::Relaxed) {
                    let request = &requests[i % requests.len()];
                    i += 1;
                    let sent = Instant::now();
                    if stream.write_all(request).await.is_err() {
                        errors += 1;
                        continue 'connect;
                    }
                    match read_response(&mut stream, &mut buf).await {
                        Some(status) => {
                            served += 1;
                            if started.elapsed() > warmup {
                                latencies.push(
                                    sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32,
                                );
                                *statuses.entry(status).or_insert(0u64) += 1;
                            }
                        }
                        None => {
                            errors += 1;
                            continue 'connect;
                        }
                    }
                }
            }
            (latencies, statuses, errors, served)
        }));
    }
    tokio::time::sleep(warmup).await;
    let measured_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    RowResult::gather(measured_from.elapsed(), tasks).await
}

fn request(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: keygate-load\r\n");
    for (name, value) in headers {
        r.push_str(&format!("{name}: {value}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// Random base62 bodies: well-shaped but with a wrong checksum (rejected before any look-up).
fn invalid_keys(n: usize) -> Vec<String> {
    const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let format = KeyFormat::new("kg");
    (0..n)
        .map(|_| {
            let body: String = (0..49)
                .map(|_| char::from(B62[rand::random_range(0..62)]))
                .collect();
            format!("kg_{body}")
        })
        .filter(|k| format.check(k.as_bytes()).is_err())
        .collect()
}

struct Gateway {
    child: Child,
}

impl Drop for Gateway {
    /// SIGTERM first: SIGKILL on nginx's master would orphan its workers.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(instructions::start_seconds());
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The [store] table of a sled gateway whose store lives in `dir`.
fn sled_store(dir: &Path) -> String {
    format!("path = \"{}\"", dir.join("store").display())
}

fn start_keygate(
    dir: &Path,
    store: &str,
    env: &[(&str, &str)],
    upstream: SocketAddr,
    listen: u16,
    admin: u16,
    threads: usize,
) -> Gateway {
    let config = format!(
        r#"[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
threads = {threads}
shutdown_grace_seconds = 0
access_log = "off"

[store]
{store}

[[routes]]
name = "open"
path_prefix = "/open"
upstreams = ["{upstream}"]
auth = "none"

[[routes]]
name = "api"
path_prefix = "/"
upstreams = ["{upstream}"]
"#
    );
    let path = dir.join("keygate.toml");
    std::fs::write(&path, config).expect("config");
    // LOAD_KEYGATE_BIN runs another build (an A/B pair of commits) under the same bench.
    let program = std::env::var("LOAD_KEYGATE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_keygate").to_string());
    let child = instructions::server_command(&program)
        .args(["serve", "--config", path.to_str().expect("path")])
        .env("RUST_LOG", "error")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start keygate");
    wait_for_port(admin, "keygate admin");
    wait_for_port(listen, "keygate");
    instructions::register(listen, child.id());
    Gateway { child }
}

fn start_nginx(dir: &Path, upstream: SocketAddr, listen: u16, valid_key: &str) -> Option<Gateway> {
    let block = nginx_map_check(upstream, valid_key, &format!("listen 127.0.0.1:{listen};"));
    spawn_nginx(dir, &block, listen, "nginx")
}

/// nginx's side of the comparison: a `map` of `x-api-key` to the one valid key, a 401 in
/// keygate's words otherwise, and a keep-alive proxy to `upstream`; `listen` holds the
/// server's listen (and TLS) directives.
fn nginx_map_check(upstream: SocketAddr, valid_key: &str, listen: &str) -> String {
    format!(
        r#"  map_hash_bucket_size 128;
  map $http_x_api_key $api_key_ok {{ default 0; "{valid_key}" 1; }}
  upstream backend {{ server {upstream}; keepalive 64; }}
  server {{
    {listen}
    keepalive_requests 100000000;
    location / {{
      default_type application/json;
      if ($api_key_ok = 0) {{
        return 401 '{{"error":{{"code":"invalid_key","message":"the API key is not valid"}}}}';
      }}
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Api-Key "";
      proxy_pass http://backend;
    }}
  }}"#
    )
}

/// nginx (one worker, no access log, its temp files under `dir`) with `http_block` inside
/// `http {}`, once it accepts connections on `listen`; None when nginx is not installed.
fn spawn_nginx(dir: &Path, http_block: &str, listen: u16, what: &str) -> Option<Gateway> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    std::fs::create_dir_all(dir).ok()?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         {http_block}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).ok()?;
    let child = Command::new(nginx)
        .args([
            "-p",
            dir.to_str()?,
            "-c",
            path.to_str()?,
            "-g",
            "daemon off;",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()?;
    wait_for_port(listen, what);
    Some(Gateway { child })
}

fn wrk_available() -> bool {
    std::env::var("LOAD_WRK").is_ok_and(|v| v == "1")
        && Command::new("wrk").arg("--version").output().is_ok()
}

/// Runs wrk for a single-header row; returns (requests/s, p50 µs, p99 µs).
fn drive_wrk(
    url: &str,
    header: Option<(&str, &str)>,
    connections: usize,
    seconds: u64,
) -> Option<(f64, f64, f64)> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0", "wrk", "--latency", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"));
    if let Some((name, value)) = header {
        cmd.arg("-H").arg(format!("{name}: {value}"));
    }
    let out = cmd.arg(url).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let value = |prefix: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.trim_start().starts_with(prefix))?;
        let raw = line.split_whitespace().nth(1)?;
        let (number, unit) =
            raw.split_at(raw.find(|c: char| c.is_alphabetic()).unwrap_or(raw.len()));
        let n: f64 = number.parse().ok()?;
        Some(match unit {
            "us" => n,
            "ms" => n * 1000.0,
            "s" => n * 1_000_000.0,
            _ => n,
        })
    };
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((rps, value("50%")?, value("99%")?))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Bulk-imports `keys` keys into a sled store under `dir`; returns one of them.
fn import_scale_keys(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    format: &KeyFormat,
    keys: usize,
) -> String {
    let mut sample = String::new();
    let store = SledStore::open(&dir.join("store")).expect("store");
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..keys {
        let key = format.generate().expect("rng");
        if i == keys / 2 {
            sample = key.clone();
        }
        batch.push(KeyRecord::for_key(
            format,
            &key,
            &format!("owner{}", i % 1000),
            0,
        ));
        if batch.len() == batch.capacity() {
            runtime.block_on(store.import(&batch)).expect("import");
            batch.clear();
        }
    }
    runtime.block_on(store.import(&batch)).expect("import");
    let imported = started.elapsed();
    store.checkpoint().expect("checkpoint");
    println!(
        "imported {keys} keys in {:.1} s, then a checkpoint in {:.1} s (sled's snapshot: the \
         gateway's first start replays none of the load)",
        imported.as_secs_f64(),
        (started.elapsed() - imported).as_secs_f64()
    );
    sample
}

/// Durable creates through the management API, 8 clients for 3 s.
fn durable_creates(runtime: &tokio::runtime::Runtime, listen: u16, admin_token: &str, pid: u32) {
    let body = "{\"owner\":\"scale\"}";
    let create = format!(
        "POST /_keygate/keys HTTP/1.1\r\nHost: bench.local\r\nAuthorization: Bearer {admin_token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let target: SocketAddr = ([127, 0, 0, 1], listen).into();
    let result = runtime.block_on(drive(target, Arc::new(vec![create]), 8, 3));
    println!(
        "durable creates: {:.0}/s with 8 clients (p50 {:.0} µs, p99 {:.0} µs), statuses {:?}; RSS after: {} MiB",
        result.rps(),
        result.percentile(0.5),
        result.percentile(0.99),
        result.statuses,
        rss_kib(pid) / 1024
    );
}

/// `LOAD_SCALE=1`: a gateway on a sled store of 1 million keys: time from start to a
/// healthy admin endpoint, RSS, one look-up; then durable creates through the API.
fn scale_check() {
    let keys: usize = env_or("LOAD_SCALE_KEYS", 1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let format = KeyFormat::new("kg");
    let sample = import_scale_keys(&runtime, dir.path(), &format, keys);
    let upstream = start_upstream(&runtime);
    let (listen, admin) = (free_port(), free_port());
    let admin_token = "scale-check-admin-token-of-32-chars-or-more";
    let started = Instant::now();
    // LOAD_STORE_EXTRA: [store] lines to try, e.g. `cache_warm_keys = 0`.
    let store = format!(
        "{}\n{}",
        sled_store(dir.path()),
        std::env::var("LOAD_STORE_EXTRA").unwrap_or_default()
    );
    let start = || {
        start_keygate(
            dir.path(),
            &store,
            &[("KEYGATE_ADMIN_TOKEN", admin_token)],
            upstream,
            listen,
            admin,
            2,
        )
    };
    let gateway = start();
    let startup = started.elapsed();
    let rss_at_start = rss_kib(gateway.child.id());
    let status = runtime.block_on(async {
        let mut stream = TcpStream::connect(("127.0.0.1", listen))
            .await
            .expect("connect");
        let mut buf = Vec::new();
        stream
            .write_all(&request("/x", &[("x-api-key", &sample)]))
            .await
            .expect("write");
        read_response(&mut stream, &mut buf).await
    });
    println!(
        "{keys} keys: start-up to listening {:.0} ms, RSS {} MiB; a look-up of a stored key: {:?}",
        startup.as_secs_f64() * 1000.0,
        rss_at_start / 1024,
        status
    );

    durable_creates(&runtime, listen, admin_token, gateway.child.id());

    // A restart of the same store: what the first start costs beside a start with nothing
    // to recover (the creates above are in the log since the last snapshot).
    drop(gateway);
    for attempt in ["restart", "second restart"] {
        let started = Instant::now();
        let gateway = start();
        println!(
            "{attempt}: start-up to listening {:.0} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
        drop(gateway);
    }
}

/// 100k valid keys, bulk-imported into the gateway's store before it starts, and the same
/// store copied for the gateway without a warm-up (`cold` under `dir`).
fn import_bench_keys(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    format: &KeyFormat,
) -> Vec<String> {
    let valid: Vec<String> = (0..DISTINCT_KEYS)
        .map(|_| format.generate().expect("rng"))
        .collect();
    let store = SledStore::open(&dir.join("store")).expect("store");
    let records: Vec<KeyRecord> = valid
        .iter()
        .map(|k| KeyRecord::for_key(format, k, "bench", 0))
        .collect();
    runtime
        .block_on(store.import(&records))
        .expect("import keys");
    store.checkpoint().expect("checkpoint");
    std::fs::create_dir_all(dir.join("cold")).expect("cold dir");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(dir.join("store"))
        .arg(dir.join("cold"))
        .status()
        .expect("cp");
    assert!(copied.success(), "copying the store failed");
    valid
}

/// A gateway on a fresh PostgreSQL database holding `valid_key`.
fn start_pg_gateway(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    format: &KeyFormat,
    valid_key: &str,
    upstream: SocketAddr,
    threads: usize,
) -> (Gateway, SocketAddr) {
    let pg_port = free_port();
    let pg_dir = dir.join("pg-gateway");
    std::fs::create_dir_all(&pg_dir).expect("pg gateway dir");
    let url = pg::fresh_database();
    runtime.block_on(async {
        let store = PgStore::connect(&url, 2, Duration::from_secs(5))
            .await
            .expect("connect to PostgreSQL");
        store
            .insert(&KeyRecord::for_key(format, valid_key, "bench", 0))
            .await
            .expect("insert the valid key");
    });
    let gateway = start_keygate(
        &pg_dir,
        "backend = \"postgres\"\nurl_env = \"KEYGATE_DATABASE_URL\"",
        &[("KEYGATE_DATABASE_URL", url.as_str())],
        upstream,
        pg_port,
        free_port(),
        threads,
    );
    (gateway, ([127, 0, 0, 1], pg_port).into())
}

/// Where each row's requests go.
struct Targets {
    upstream: SocketAddr,
    bare: Option<SocketAddr>,
    keygate: SocketAddr,
    /// The same gateway and store with `cache_warm_keys = 0`.
    cold: Option<SocketAddr>,
    postgres: Option<SocketAddr>,
    nginx: Option<SocketAddr>,
    nginx_auth: Option<SocketAddr>,
}

/// (name for LOAD_ROWS, label, target, the requests its connections cycle through)
type Row = (&'static str, &'static str, SocketAddr, Vec<Vec<u8>>);

/// Every stored key once in turn: with the cache warmed at start, and (when wanted) on a
/// gateway of the same store without the warm-up, where each first use is a miss.
fn distinct_rows(targets: &Targets, valid: &[String]) -> Vec<Row> {
    let requests = || {
        valid
            .iter()
            .map(|k| request("/x", &[("x-api-key", k)]))
            .collect()
    };
    let mut rows: Vec<Row> = vec![(
        "distinct",
        "keygate, 100k distinct valid keys (mostly first use; cache warmed at start)",
        targets.keygate,
        requests(),
    )];
    if let Some(cold) = targets.cold {
        rows.push((
            "distinct-cold",
            "keygate, 100k distinct valid keys (mostly first use; warm-up off: cache misses)",
            cold,
            requests(),
        ));
    }
    rows
}

fn bench_rows(targets: &Targets, valid: &[String], invalid: &[String]) -> Vec<Row> {
    let mut rows: Vec<Row> = vec![
        (
            "direct",
            "direct to the upstream",
            targets.upstream,
            vec![request("/", &[])],
        ),
        (
            "none",
            "keygate, auth = \"none\"",
            targets.keygate,
            vec![request("/open/x", &[])],
        ),
        (
            "valid",
            "keygate, one valid key",
            targets.keygate,
            vec![request("/x", &[("x-api-key", &valid[0])])],
        ),
        (
            "invalid",
            "keygate, random invalid keys",
            targets.keygate,
            invalid
                .iter()
                .map(|k| request("/x", &[("x-api-key", k)]))
                .collect(),
        ),
    ];
    rows.extend(distinct_rows(targets, valid));
    if let Some(bare) = targets.bare.map(bare::row) {
        rows.insert(1, bare);
    }
    if let Some(pg_addr) = targets.postgres {
        rows.push((
            "postgres",
            "keygate on PostgreSQL, one valid key (warm cache)",
            pg_addr,
            vec![request("/x", &[("x-api-key", &valid[0])])],
        ));
    }
    if let Some(nginx_addr) = targets.nginx {
        rows.push((
            "nginx-valid",
            "nginx map check, valid key",
            nginx_addr,
            vec![request("/x", &[("x-api-key", &valid[0])])],
        ));
        rows.push((
            "nginx-invalid",
            "nginx map check, invalid keys (401)",
            nginx_addr,
            invalid
                .iter()
                .map(|k| request("/x", &[("x-api-key", k)]))
                .collect(),
        ));
    }
    if let Some(addr) = targets.nginx_auth {
        rows.push((
            "nginx-auth",
            "nginx auth_request -> keygate (both on the server core), valid key",
            addr,
            vec![request("/x", &[("x-api-key", &valid[0])])],
        ));
    }
    rows
}

/// (name, label, requests/s, p50 µs, p99 µs, statuses)
/// (name, label, requests/s, p50 µs, p99 µs, statuses, per-core CPU and which core was
/// the limit)
type Measured = (&'static str, &'static str, f64, f64, f64, String, String);

/// How one row is driven: wrk for single-request rows when it is installed, else the
/// built-in generator.
struct RowRun<'a> {
    use_wrk: bool,
    valid_key: &'a str,
    connections: usize,
    seconds: u64,
}

impl RowRun<'_> {
    /// The request-path rows, then again `LOAD_ROUNDS` − 1 times, but for the distinct
    /// rows, whose keys are no longer first uses after the first round.
    fn measure_rounds(
        &self,
        runtime: &tokio::runtime::Runtime,
        targets: &Targets,
        valid: &[String],
        wanted: &dyn Fn(&str) -> bool,
    ) -> (Vec<Measured>, Vec<Vec<Measured>>) {
        let invalid = invalid_keys(10_000);
        let first = self.measure_rows(runtime, bench_rows(targets, valid, &invalid), wanted);
        let rounds: usize = env_or("LOAD_ROUNDS", 1);
        let again = |name: &str| wanted(name) && !name.starts_with("distinct");
        let later = (2..=rounds)
            .map(|round| {
                println!("round {round} of {rounds} (the request-path rows but the distinct ones)");
                self.measure_rows(runtime, bench_rows(targets, valid, &invalid), &again)
            })
            .collect();
        (first, later)
    }

    /// Every row of `rows` that `wanted` names, in order.
    fn measure_rows(
        &self,
        runtime: &tokio::runtime::Runtime,
        rows: Vec<Row>,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Vec<Measured> {
        rows.into_iter()
            .filter(|row| wanted(row.0))
            .map(|(name, label, target, requests)| {
                // Uncounted (and outside the CPU window): connections, pools and lazy state
                // settle first; not for rows of many keys, which would spend keys meant to
                // be new.
                if requests.len() == 1 && instructions::counts(target) {
                    let warm_up = RowRun {
                        seconds: 1,
                        ..*self
                    };
                    warm_up.measure(runtime, name, target, requests.clone());
                }
                let (((rps, p50, p99, statuses, served), instructions), mut cpu, server_seconds) =
                    cores::measured_with_seconds(|| {
                        instructions::counted(target, || {
                            self.measure(runtime, name, target, requests)
                        })
                    });
                // wrk counts no warm-up: its half second is estimated at the row's rate.
                let served = served.unwrap_or(rps * (self.seconds as f64 + 0.5));
                if served > 0.0 {
                    let per_request = server_seconds / served * 1e6;
                    cpu.push_str(&format!(
                        "; {per_request:.1} µs of server-core CPU a request"
                    ));
                    if let Some(total) = instructions {
                        let per_request = total as f64 / served;
                        cpu.push_str(&format!("; {per_request:.0} instructions a request"));
                    }
                }
                (name, label, rps, p50, p99, statuses, cpu)
            })
            .collect()
    }

    fn measure(
        &self,
        runtime: &tokio::runtime::Runtime,
        name: &str,
        target: SocketAddr,
        requests: Vec<Vec<u8>>,
    ) -> (f64, f64, f64, String, Option<f64>) {
        let single = requests.len() == 1;
        let wrk_result = if self.use_wrk && single {
            let path = if name == "none" { "/open/x" } else { "/x" };
            let header = name
                .contains("valid")
                .then_some(("x-api-key", self.valid_key));
            drive_wrk(
                &format!("http://{target}{path}"),
                header,
                self.connections,
                self.seconds,
            )
        } else {
            None
        };
        match wrk_result {
            Some((rps, p50, p99)) => (rps, p50, p99, "(wrk)".to_string(), None),
            None => {
                let r = runtime.block_on(drive(
                    target,
                    Arc::new(requests),
                    self.connections,
                    self.seconds,
                ));
                let statuses = r
                    .statuses
                    .iter()
                    .map(|(s, n)| format!("{s}×{n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
                    + &if r.errors > 0 {
                        format!(" errors×{}", r.errors)
                    } else {
                        String::new()
                    };
                let served = Some(r.served as f64);
                (
                    r.rps(),
                    r.percentile(0.5),
                    r.percentile(0.99),
                    statuses,
                    served,
                )
            }
        }
    }
}

/// Each later round's table, then every round's ratios.
fn print_later_rounds(first: &[Measured], later: &[Vec<Measured>]) {
    if later.is_empty() {
        return;
    }
    for (round, measured) in later.iter().enumerate() {
        println!("\nround {}:", round + 2);
        print_rows(measured);
    }
    let all: Vec<&[Measured]> = std::iter::once(first)
        .chain(later.iter().map(Vec::as_slice))
        .collect();
    print_round_ratios(&all);
}

/// The ratios the request-path rows are read by, in each round (`LOAD_ROUNDS`) and their
/// median: on a noisy machine single rows move by a third between runs, the median of
/// several rounds much less.
fn print_round_ratios(rounds: &[&[Measured]]) {
    let rate = |round: &[Measured], name: &str| round.iter().find(|r| r.0 == name).map(|r| r.2);
    let ratios: [(&str, &str, &str); 5] = [
        ("auth = \"none\" ÷ bare Pingora", "none", "bare"),
        ("one valid key ÷ bare Pingora", "valid", "bare"),
        ("random invalid keys ÷ one valid key", "invalid", "valid"),
        (
            "100k distinct keys ÷ one valid key (first round only)",
            "distinct",
            "valid",
        ),
        ("bare Pingora ÷ nginx, valid key", "bare", "nginx-valid"),
    ];
    let mut out = std::io::stdout().lock();
    let heads: String = (1..=rounds.len())
        .map(|r| format!(" round {r} |"))
        .collect();
    let rules: String = rounds.iter().map(|_| "---:|").collect();
    let _ = writeln!(out, "\n| ratio |{heads} median |\n|---|{rules}---:|");
    for (label, over, under) in ratios {
        let values: Vec<Option<f64>> = rounds
            .iter()
            .map(|round| Some(rate(round, over)? / rate(round, under)?))
            .collect();
        let mut present: Vec<f64> = values.iter().flatten().copied().collect();
        if present.is_empty() {
            continue;
        }
        present.sort_by(f64::total_cmp);
        let middle = present.len() / 2;
        let median = if present.len().is_multiple_of(2) {
            (present[middle - 1] + present[middle]) / 2.0
        } else {
            present[middle]
        };
        let cells: String = values
            .iter()
            .map(|v| v.map_or(" |".to_string(), |v| format!(" {v:.2} |")))
            .collect();
        let _ = writeln!(out, "| {label} |{cells} {median:.2} |");
    }
}

/// The results as a Markdown table, with ratios to `auth = "none"` and to nginx.
fn print_table(results: &[Measured], rss_kib: u64) {
    print_rows(results);
    println!("\nkeygate RSS after the run: {} MiB", rss_kib / 1024);
}

/// One round's rows, with their ratios to `auth = "none"`, bare Pingora and nginx.
fn print_rows(results: &[Measured]) {
    let baseline = results
        .iter()
        .find(|r| r.0 == "none")
        .map(|r| r.2)
        .unwrap_or(f64::NAN);
    let bare = results.iter().find(|r| r.0 == "bare").map(|r| r.2);
    let nginx_valid = results.iter().find(|r| r.0 == "nginx-valid").map(|r| r.2);
    let nginx_invalid = results.iter().find(|r| r.0 == "nginx-invalid").map(|r| r.2);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\n| row | requests/s | p50 µs | p99 µs | × auth=none | × bare Pingora | × nginx | CPU per core during the row | statuses |\n|---|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for (name, label, rps, p50, p99, statuses, cpu) in results {
        let vs_nginx = match *name {
            "valid" | "distinct" | "distinct-cold" | "postgres" | "nginx-auth" => {
                nginx_valid.map(|n| rps / n)
            }
            "invalid" => nginx_invalid.map(|n| rps / n),
            "tls-valid" | "h2-valid" => tls::nginx_ratio(results, name, *rps),
            _ => None,
        }
        .map_or("".to_string(), |r| format!("{r:.2}"));
        let vs_bare = bare.map_or("".to_string(), |b| format!("{:.2}", rps / b));
        let _ = writeln!(
            out,
            "| {label} | {rps:.0} | {p50:.0} | {p99:.0} | {:.2} | {vs_bare} | {vs_nginx} | {cpu} | {statuses} |",
            rps / baseline
        );
    }
}

/// What the run is: connections, duration, threads, cores, generator.
fn print_header(connections: usize, seconds: u64, threads: usize, cores: usize, use_wrk: bool) {
    println!(
        "load: {connections} keep-alive connections, {seconds} s per row, gateway threads = {threads}, \
         {cores} cores (servers pinned to cores {}, generator to {}), generator = {}",
        cores::list(&cores::plan().server),
        cores::list(&cores::plan().generator),
        if use_wrk {
            "wrk (single-header rows)"
        } else {
            "built-in"
        }
    );
}

/// The `distinct-cold` gateway's store settings.
const COLD: &str = "cache_warm_keys = 0";

/// The gateway under test, on the sled store under `dir`, pinned to `server_core`.
fn start_pinned_keygate(
    dir: &Path,
    store_extra: &str,
    upstream: SocketAddr,
    threads: usize,
    cores: usize,
    server_core: usize,
) -> (Gateway, SocketAddr, u16) {
    let (listen, admin) = (free_port(), free_port());
    let store = format!("{}\n{store_extra}", sled_store(dir));
    let gateway = start_keygate(dir, &store, &[], upstream, listen, admin, threads);
    if cores > 1 {
        pin(gateway.child.id(), server_core);
    }
    (gateway, ([127, 0, 0, 1], listen).into(), admin)
}

/// The same gateway on PostgreSQL, when the server binaries are installed (.ci/setup),
/// pinned to `pin_to`.
fn start_pinned_pg(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    valid_key: &str,
    upstream: SocketAddr,
    threads: usize,
    pin_to: Option<usize>,
) -> Option<(Gateway, SocketAddr)> {
    pg::find_bin_dir()?;
    let format = KeyFormat::new("kg");
    let started = start_pg_gateway(runtime, dir, &format, valid_key, upstream, threads);
    pin_to.inspect(|core| pin(started.0.child.id(), *core));
    Some(started)
}

/// nginx with its `map` check, when wanted and installed, pinned to `server_core`.
fn start_pinned_nginx(
    wanted: bool,
    dir: &Path,
    upstream: SocketAddr,
    valid_key: &str,
    cores: usize,
    server_core: usize,
) -> (Option<Gateway>, SocketAddr) {
    let nginx_port = free_port();
    let nginx_dir = dir.join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx = if wanted {
        start_nginx(&nginx_dir, upstream, nginx_port, valid_key)
    } else {
        None
    };
    if let Some(n) = &nginx
        && cores > 1
    {
        pin(n.child.id(), server_core);
    }
    (nginx, ([127, 0, 0, 1], nginx_port).into())
}

/// The rows `LOAD_ROWS` names (comma-separated; all when unset).
fn wanted_rows() -> impl Fn(&str) -> bool {
    let only: Option<Vec<String>> = std::env::var("LOAD_ROWS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    move |row| only.as_ref().is_none_or(|o| o.iter().any(|r| r == row))
}

/// Pins this process (the generator and the upstream) to the first core; returns the
/// number of cores and the one the servers get.
fn pin_generator() -> (usize, usize) {
    let cores = cores();
    let plan = cores::plan();
    if cores > 1 {
        pin(std::process::id(), plan.generator[0]);
    }
    (cores, plan.server[0])
}

/// The upstream every row ends at, served on the generator's runtime.
fn start_upstream(runtime: &tokio::runtime::Runtime) -> SocketAddr {
    let listener = runtime
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("upstream");
    let upstream = listener.local_addr().expect("addr");
    runtime.spawn(run_upstream(listener));
    upstream
}

/// The load generator's runtime: one worker thread, on the core the bench is pinned to.
fn generator_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores::plan().generator.len())
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    bare::serve_if_asked();
    if std::env::var("LOAD_SCALE").is_ok_and(|v| v == "1") {
        scale_check();
        return;
    }
    // `cargo bench` passes --bench; any other argument is ignored.
    let seconds: u64 = env_or("LOAD_SECONDS", 5);
    let connections: usize = env_or("LOAD_CONNECTIONS", 32);
    let wanted = wanted_rows();
    let (cores, server_core) = pin_generator();

    let runtime = generator_runtime();
    let dir = tempfile::tempdir().expect("temp dir");

    let valid = import_bench_keys(&runtime, dir.path(), &KeyFormat::new("kg"));

    let upstream = start_upstream(&runtime);

    let threads: usize = env_or("LOAD_GATEWAY_THREADS", cores::plan().server.len());
    let start = |dir: &Path, store_extra| {
        start_pinned_keygate(dir, store_extra, upstream, threads, cores, server_core)
    };
    let (gateway, keygate_addr, keygate_admin) = start(dir.path(), "");
    let cold = wanted("distinct-cold").then(|| start(&dir.path().join("cold"), COLD));
    let nginx_wanted = wanted("nginx-valid") || wanted("nginx-invalid");
    let (nginx, nginx_addr) = start_pinned_nginx(
        nginx_wanted,
        dir.path(),
        upstream,
        &valid[0],
        cores,
        server_core,
    );

    let pin_to = (cores > 1).then_some(server_core);
    let pg_gateway = wanted("postgres")
        .then(|| start_pinned_pg(&runtime, dir.path(), &valid[0], upstream, threads, pin_to))
        .flatten();
    let nginx_auth = wanted("nginx-auth")
        .then(|| {
            forward_auth::start(
                &dir.path().join("nginx-auth"),
                keygate_addr,
                upstream,
                pin_to,
            )
        })
        .flatten();
    let bare = bare::start(wanted("bare"), upstream, threads, cores, server_core);
    let targets = Targets {
        upstream,
        bare: bare.as_ref().map(|(_, addr)| *addr),
        keygate: keygate_addr,
        cold: cold.as_ref().map(|(_, addr, _)| *addr),
        postgres: pg_gateway.as_ref().map(|(_, addr)| *addr),
        nginx: nginx.is_some().then_some(nginx_addr),
        nginx_auth: nginx_auth.as_ref().map(|(_, addr)| *addr),
    };
    let use_wrk = wrk_available();
    print_header(connections, seconds, threads, cores, use_wrk);
    let run = RowRun {
        use_wrk,
        valid_key: &valid[0],
        connections,
        seconds,
    };
    let (mut results, later_rounds) = run.measure_rounds(&runtime, &targets, &valid, &wanted);

    flood::run_if(wanted("flood"), &runtime, keygate_addr, &gateway, &valid[0]);
    latency::run_if(wanted("latency"), &runtime, keygate_addr, &run);
    let edge = tls::EdgeRun {
        dir: dir.path(),
        upstream,
        key: &valid[0],
        threads,
        cores,
        server_core,
        connections,
        seconds,
    };
    results.extend(edge.measure(&runtime, &wanted));
    let reloads = reload::Target::new(keygate_addr, keygate_admin, dir.path());
    results.extend(reloads.measure(&run, &runtime, wanted("reload")));
    let limits = limits::Group::new(dir.path(), upstream, threads, cores);
    results.extend(limits.measure(&run, &runtime, &wanted));
    print_table(&results, rss_kib(gateway.child.id()));
    print_later_rounds(&results, &later_rounds);
    // The servers stop as they go out of scope, the gateway last.
}
