//! The limits rows: a key's own rate limit and quota, what deciding them costs per request,
//! beside a key with neither. On a gateway deciding limits in its own process
//! (`backend = "local"`): `limits-none` (no limit, no quota: the baseline), `limits-local`
//! (a rate limit of `RATE_LIMIT` a second, never reached) and `quota-local` (a
//! `total` quota of `Quota::MAX_REQUESTS`, never spent). Then the same two limited keys on a
//! gateway deciding them in Redis (`limits-redis`, `quota-redis`): a throwaway
//! `redis-server` on a free loopback port, nothing saved, pinned to the generator's core so
//! that the gateway's core stays its own, stopped at the end; when it is not installed the
//! Redis rows are skipped with a message. `LOAD_ROWS=limits` runs the whole group.
//!
//! Every measured request has to be admitted (a 200 from the upstream): each row counts
//! what was not, and says so. The Redis gateway runs `on_error = "deny"`, so a decision
//! Redis did not give within `timeout_ms` shows as a 503 in its row instead of an admitted
//! request that skipped Redis; its /metrics (backend errors by reason, mean round trip)
//! are read after each row and at the end. The built-in generator drives these rows even
//! with LOAD_WRK=1 (wrk would not count the statuses).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use keygate::keys::{KeyFormat, KeyRecord, Quota, QuotaPeriod, RateLimit};
use keygate::store::SledStore;

use super::flood::cpu_seconds;
use super::{
    Gateway, Measured, RowResult, RowRun, drive, free_port, pin, request, sled_store,
    start_keygate, wait_for_port,
};

/// The row that names the whole group in LOAD_ROWS.
const GROUP: &str = "limits";
/// (name for LOAD_ROWS, label) of the rows on the local backend.
const LOCAL_ROWS: [(&str, &str); 3] = [
    (
        "limits-none",
        "keygate, limits local, key without rate limit or quota",
    ),
    (
        "limits-local",
        "keygate, limits local, key with a rate limit (never reached)",
    ),
    (
        "quota-local",
        "keygate, limits local, key with a quota (never spent)",
    ),
];
/// The same, on the Redis backend.
const REDIS_ROWS: [(&str, &str); 2] = [
    (
        "limits-redis",
        "keygate, limits in Redis, key with a rate limit (never reached)",
    ),
    (
        "quota-redis",
        "keygate, limits in Redis, key with a quota (never spent)",
    ),
];
const REDIS_BINARIES: [&str; 2] = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"];
/// The gateway's `[ratelimit]` on Redis: the default timeout, and failures refused (503)
/// so that they show in the row's statuses.
const REDIS_LIMITS: &str = "[ratelimit]\nbackend = \"redis\"\nurl_env = \"KEYGATE_REDIS_URL\"\n\
                            timeout_ms = 50\non_error = \"deny\"";
/// The rows' rate limit, per second: far above what one gateway core serves, so never
/// reached. Not `RateLimit::MAX_REQUESTS` (10⁹): the Redis script's emission interval
/// (window / requests, in ms) is then 10⁻⁶ ms, which vanishes when added to a Unix time in
/// ms (a double's step there is about 2.4·10⁻⁴ ms), and its `SET … PX` gets an expiry of 0,
/// which Redis refuses: every decision of such a key is a backend error. 10⁶ a second is a
/// 10⁻³ ms interval, four steps.
const RATE_LIMIT: u32 = 1_000_000;
/// The three keys the rows send, one per kind of limit.
struct Keys {
    none: String,
    rate: String,
    quota: String,
}

impl Keys {
    fn new(format: &KeyFormat) -> Keys {
        let key = || format.generate().expect("rng");
        Keys {
            none: key(),
            rate: key(),
            quota: key(),
        }
    }

    /// The key `row` sends.
    fn of(&self, row: &str) -> &str {
        match row {
            "limits-none" => &self.none,
            "limits-local" | "limits-redis" => &self.rate,
            _ => &self.quota,
        }
    }

    /// The keys' records in a fresh sled store under `dir`.
    fn seed(&self, runtime: &tokio::runtime::Runtime, format: &KeyFormat, dir: &Path) {
        let record = |key: &str, rate_limit, quota| KeyRecord {
            rate_limit,
            quota,
            ..KeyRecord::for_key(format, key, "bench-limits", 0)
        };
        let records = [
            record(&self.none, None, None),
            record(
                &self.rate,
                Some(RateLimit {
                    requests: RATE_LIMIT,
                    window_seconds: 1,
                }),
                None,
            ),
            record(
                &self.quota,
                None,
                Some(Quota {
                    requests: Quota::MAX_REQUESTS,
                    period: QuotaPeriod::Total,
                }),
            ),
        ];
        let store = SledStore::open(&dir.join("store")).expect("limits store");
        runtime
            .block_on(store.import(&records))
            .expect("import the limits keys");
    }
}

/// What the rows' gateways need: where they live and what they proxy to.
pub(crate) struct Group<'a> {
    dir: &'a Path,
    upstream: SocketAddr,
    threads: usize,
    cores: usize,
}

impl<'a> Group<'a> {
    /// Gateways under `dir`, to `upstream`, with `threads` each, on a machine of `cores`.
    pub(crate) fn new(dir: &'a Path, upstream: SocketAddr, threads: usize, cores: usize) -> Self {
        Group {
            dir,
            upstream,
            threads,
            cores,
        }
    }

    /// The rows `wanted` names (all of them for `limits`), local ones first.
    pub(crate) fn measure(
        &self,
        run: &RowRun<'_>,
        runtime: &tokio::runtime::Runtime,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Vec<Measured> {
        let wanted = |row: &str| wanted(GROUP) || wanted(row);
        let local: Vec<_> = LOCAL_ROWS.into_iter().filter(|r| wanted(r.0)).collect();
        let redis: Vec<_> = REDIS_ROWS.into_iter().filter(|r| wanted(r.0)).collect();
        if local.is_empty() && redis.is_empty() {
            return Vec::new();
        }
        let format = KeyFormat::new("kg");
        let keys = Keys::new(&format);
        let mut results = Vec::new();
        if !local.is_empty() {
            let dir = self.gateway_dir("limits-local");
            keys.seed(runtime, &format, &dir);
            let (gateway, target, _) = self.start(&dir, "", &[]);
            for row in local {
                results.push(measure_row(run, runtime, row, target, keys.of(row.0), None).0);
            }
            drop(gateway);
        }
        if !redis.is_empty() {
            let dir = self.gateway_dir("limits-redis");
            keys.seed(runtime, &format, &dir);
            results.extend(self.redis_rows(run, runtime, &redis, &keys, &dir));
        }
        print_relative(&results);
        results
    }

    fn gateway_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).expect("limits gateway dir");
        dir
    }

    /// A gateway on the sled store in `dir` with `extra` config after its `[store]`,
    /// pinned to the server core: (it, its listener, its admin port).
    fn start(&self, dir: &Path, extra: &str, env: &[(&str, &str)]) -> (Gateway, SocketAddr, u16) {
        let (listen, admin) = (free_port(), free_port());
        let store = format!("{}\n\n{extra}", sled_store(dir));
        let gateway = start_keygate(dir, &store, env, self.upstream, listen, admin, self.threads);
        if self.cores > 1 {
            pin(gateway.child.id(), self.server_core());
        }
        (gateway, ([127, 0, 0, 1], listen).into(), admin)
    }

    fn server_core(&self) -> usize {
        super::cores::plan().server[0]
    }

    /// The Redis rows, on a gateway whose limits are decided in a throwaway Redis; none
    /// (and why) when redis-server is not installed.
    fn redis_rows(
        &self,
        run: &RowRun<'_>,
        runtime: &tokio::runtime::Runtime,
        rows: &[(&'static str, &'static str)],
        keys: &Keys,
        dir: &Path,
    ) -> Vec<Measured> {
        let Some(redis) = self.start_redis(&dir.join("redis")) else {
            println!(
                "redis-server is not installed (looked for {}): the rows {} are skipped \
                 (install Debian's redis-server: bash .ci/setup)",
                REDIS_BINARIES.join(", "),
                rows.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
            );
            return Vec::new();
        };
        let url = format!("redis://127.0.0.1:{}/0", redis.port);
        let (gateway, target, admin) =
            self.start(dir, REDIS_LIMITS, &[("KEYGATE_REDIS_URL", url.as_str())]);
        let mut results = Vec::new();
        let mut before = RedisMetrics::scrape(admin);
        for &row in rows {
            let (measured, requests) =
                measure_row(run, runtime, row, target, keys.of(row.0), Some(redis.pid()));
            let after = RedisMetrics::scrape(admin);
            println!(
                "{}: {}",
                row.0,
                after.since(&before).describe(Some(requests))
            );
            results.push(measured);
            before = after;
        }
        println!(
            "redis gateway at the end (both rows and their warm-ups): {}",
            before.describe(None)
        );
        drop(gateway);
        drop(redis);
        results
    }

    /// redis-server on a free loopback port, nothing saved, its files in `dir`, pinned to
    /// the generator's core; None when it is not installed.
    fn start_redis(&self, dir: &Path) -> Option<Redis> {
        let binary = REDIS_BINARIES.into_iter().find(|p| Path::new(p).exists())?;
        std::fs::create_dir_all(dir).expect("redis dir");
        let port = free_port();
        let child = std::process::Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        let server = Redis {
            process: Gateway { child },
            port,
        };
        wait_for_port(port, "redis-server");
        if self.cores > 1 {
            pin(server.pid(), super::cores::plan().generator[0]);
        }
        Some(server)
    }
}

/// The throwaway Redis: stopped (SIGTERM, then SIGKILL) when dropped.
struct Redis {
    process: Gateway,
    port: u16,
}

impl Redis {
    fn pid(&self) -> u32 {
        self.process.child.id()
    }
}

/// One row with the built-in generator: its `Measured` line and how many requests were
/// measured. With `redis` (its pid), the CPU column also says how much of a core Redis
/// took, and that the generator's core is Redis's too.
fn measure_row(
    run: &RowRun<'_>,
    runtime: &tokio::runtime::Runtime,
    (name, label): (&'static str, &'static str),
    target: SocketAddr,
    key: &str,
    redis: Option<u32>,
) -> (Measured, u64) {
    let requests = Arc::new(vec![request("/x", &[("x-api-key", key)])]);
    let (started, redis_cpu) = (Instant::now(), redis.map(cpu_seconds));
    let (r, mut cpu) = super::cores::measured(|| {
        runtime.block_on(drive(target, requests, run.connections, run.seconds))
    });
    if let (Some(pid), Some(from)) = (redis, redis_cpu) {
        let share = (cpu_seconds(pid) - from) / started.elapsed().as_secs_f64();
        cpu = cpu.replace("GENERATOR/UPSTREAM-BOUND", "GENERATOR/UPSTREAM/REDIS-BOUND");
        cpu.push_str(&format!(
            "; redis-server {:.0}% of a core (on the generator's cores, {})",
            share * 100.0,
            super::cores::list(&super::cores::plan().generator)
        ));
    }
    let statuses = statuses(&r);
    println!("{name}: {statuses}");
    let measured = (
        name,
        label,
        r.rps(),
        r.percentile(0.5),
        r.percentile(0.99),
        statuses,
        cpu,
    );
    (measured, r.requests)
}

/// `200×N, non-200: 0`, or what else came back and that the row is not clean.
fn statuses(r: &RowResult) -> String {
    let mut seen: Vec<String> = r.statuses.iter().map(|(s, n)| format!("{s}×{n}")).collect();
    if r.errors > 0 {
        seen.push(format!("errors×{}", r.errors));
    }
    let refused: u64 = r
        .statuses
        .iter()
        .filter(|(s, _)| **s != 200)
        .map(|(_, n)| n)
        .sum();
    let verdict = if refused + r.errors == 0 && r.requests > 0 {
        "non-200: 0".to_string()
    } else {
        format!(
            "non-200: {refused}, connection errors: {}: NOT EVERY REQUEST ADMITTED",
            r.errors
        )
    };
    format!("{}, {verdict}", seen.join(" "))
}

/// Each row's rate over `limits-none`'s, when it ran.
fn print_relative(results: &[Measured]) {
    let Some(baseline) = results.iter().find(|r| r.0 == "limits-none").map(|r| r.2) else {
        return;
    };
    let ratios: Vec<String> = results
        .iter()
        .filter(|r| r.0 != "limits-none")
        .map(|r| format!("{} {:.2}", r.0, r.2 / baseline))
        .collect();
    if !ratios.is_empty() {
        println!(
            "limits rows, requests/s over limits-none's: {}",
            ratios.join(", ")
        );
    }
}

/// The Redis gateway's limit-backend figures from its /metrics.
#[derive(Default)]
struct RedisMetrics {
    timeouts: f64,
    errors: f64,
    /// Round trips to Redis, and the seconds they took in all.
    round_trips: f64,
    seconds: f64,
}

impl RedisMetrics {
    /// From the admin listener on `admin`; zeros (and a message) if it did not answer.
    fn scrape(admin: u16) -> RedisMetrics {
        let Some(text) = get_metrics(admin) else {
            println!("the redis gateway's /metrics did not answer on 127.0.0.1:{admin}");
            return RedisMetrics::default();
        };
        let value = |series: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(series)?
                        .strip_prefix(' ')?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(f64::NAN)
        };
        RedisMetrics {
            timeouts: value("keygate_ratelimit_backend_errors_total{reason=\"timeout\"}"),
            errors: value("keygate_ratelimit_backend_errors_total{reason=\"error\"}"),
            round_trips: value("keygate_ratelimit_redis_duration_seconds_count"),
            seconds: value("keygate_ratelimit_redis_duration_seconds_sum"),
        }
    }

    fn since(&self, earlier: &RedisMetrics) -> RedisMetrics {
        RedisMetrics {
            timeouts: self.timeouts - earlier.timeouts,
            errors: self.errors - earlier.errors,
            round_trips: self.round_trips - earlier.round_trips,
            seconds: self.seconds - earlier.seconds,
        }
    }

    /// The errors by reason and the mean round trip; with `measured` (the requests the
    /// row measured), the round trips per measured request (above 1: the warm-up's).
    fn describe(&self, measured: Option<u64>) -> String {
        let mean_us = self.seconds / self.round_trips * 1e6;
        let per_request = measured.map_or(String::new(), |n| {
            format!(
                " ({:.2} per measured request, warm-up included)",
                self.round_trips / n.max(1) as f64
            )
        });
        format!(
            "keygate_ratelimit_backend_errors_total timeout {:.0}, error {:.0}; \
             keygate_ratelimit_redis_duration_seconds mean {mean_us:.0} µs (sum/count) over \
             {:.0} round trips{per_request}",
            self.timeouts, self.errors, self.round_trips
        )
    }
}

/// `GET /metrics` on the admin listener: the body, None if it did not answer 200.
fn get_metrics(admin: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}
