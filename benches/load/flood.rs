//! The store-read flood rows (issue 16, item 9): valid-key throughput alone, then beside a
//! paced flood (`LOAD_FLOOD_RATE` distinct well-formed unknown keys a second, valid
//! checksums), then beside an unpaced flood on half the connections (which shows the
//! gateway's one core shared, not store reads), on the same gateway. Distinct keys beyond the
//! negative cache's capacity, so that without the filter of stored hashes every flood
//! request would be a store read.

use std::net::SocketAddr;
use std::sync::Arc;

use keygate::keys::KeyFormat;

use super::latency::drive_paced;
use super::{Gateway, RowResult, drive, env_or, request};

/// More than the negative cache holds (10 000 by default), so it cannot absorb them.
const FLOOD_KEYS: usize = 200_000;

/// CPU seconds (user + system) a process has used so far, from /proc (0 if unreadable).
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5): 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Flood requests per second in the paced pass (`LOAD_FLOOD_RATE`): an attacker's steady
/// stream, each request of which would be a store read without the filter.
const DEFAULT_FLOOD_RATE: u64 = 5_000;
/// Connections the paced flood spreads its rate over.
const FLOOD_CONNECTIONS: u64 = 8;

struct FloodResult {
    alone: RowResult,
    /// Valid keys beside a paced flood, and the flood's measured rate.
    paced_valid: RowResult,
    paced_rate: f64,
    valid: RowResult,
    flood: RowResult,
    /// CPU seconds of the gateway and of this process (generator and upstream), per pass.
    cpu_alone: (f64, f64),
    cpu_paced: (f64, f64),
    cpu_flood: (f64, f64),
}

fn run(
    runtime: &tokio::runtime::Runtime,
    (target, gateway_pid): (SocketAddr, u32),
    valid_key: &str,
    connections: usize,
    seconds: u64,
) -> FloodResult {
    let half = (connections / 2).max(1);
    let valid = Arc::new(vec![request("/x", &[("x-api-key", valid_key)])]);
    let format = KeyFormat::new("kg");
    let flood: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..FLOOD_KEYS)
            .map(|_| {
                let key = format.generate().expect("rng");
                request("/x", &[("x-api-key", &key)])
            })
            .collect(),
    );
    let me = std::process::id();
    let cpu = || (cpu_seconds(gateway_pid), cpu_seconds(me));
    let spent = |from: (f64, f64), to: (f64, f64)| (to.0 - from.0, to.1 - from.1);

    let before = cpu();
    let alone = runtime.block_on(drive(target, Arc::clone(&valid), connections, seconds));
    let after_alone = cpu();
    let rate = env_or("LOAD_FLOOD_RATE", DEFAULT_FLOOD_RATE);
    let (paced_valid, paced) = runtime.block_on(async {
        tokio::join!(
            drive(target, Arc::clone(&valid), connections, seconds),
            drive_paced(target, Arc::clone(&flood), rate, seconds, FLOOD_CONNECTIONS)
        )
    });
    let after_paced = cpu();
    let (valid, flood) = runtime.block_on(async {
        tokio::join!(
            drive(target, valid, half, seconds),
            drive(target, flood, half, seconds)
        )
    });
    let after_flood = cpu();
    FloodResult {
        alone,
        paced_valid,
        paced_rate: paced.latencies_us.len() as f64 / seconds as f64,
        valid,
        flood,
        cpu_alone: spent(before, after_alone),
        cpu_paced: spent(after_alone, after_paced),
        cpu_flood: spent(after_paced, after_flood),
    }
}

/// Runs and prints the flood rows when `wanted`, with LOAD_CONNECTIONS and LOAD_SECONDS.
pub(super) fn run_if(
    wanted: bool,
    runtime: &tokio::runtime::Runtime,
    target: SocketAddr,
    gateway: &Gateway,
    valid_key: &str,
) {
    if !wanted {
        return;
    }
    let seconds: u64 = env_or("LOAD_SECONDS", 5);
    let connections: usize = env_or("LOAD_CONNECTIONS", 32);
    let result = run(
        runtime,
        (target, gateway.child.id()),
        valid_key,
        connections,
        seconds,
    );
    print(&result, seconds);
}

fn print(result: &FloodResult, seconds: u64) {
    let statuses = |r: &RowResult| {
        r.statuses
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "\n| flood rows | valid-key requests/s | flood requests/s | p99 µs (valid) | gateway CPU s | generator+upstream CPU s | statuses |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    println!(
        "| valid key alone | {:.0} | | {:.0} | {:.1} | {:.1} | {} |",
        result.alone.rps(),
        result.alone.percentile(0.99),
        result.cpu_alone.0,
        result.cpu_alone.1,
        statuses(&result.alone)
    );
    println!(
        "| valid key + a paced flood of unknown keys ({:.0}/s) | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} |",
        result.paced_rate,
        result.paced_valid.rps(),
        result.paced_rate,
        result.paced_valid.percentile(0.99),
        result.cpu_paced.0,
        result.cpu_paced.1,
        statuses(&result.paced_valid)
    );
    println!(
        "| valid key (half the connections) + an unpaced flood (the other half) | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} / {} |",
        result.valid.rps(),
        result.flood.rps(),
        result.valid.percentile(0.99),
        result.cpu_flood.0,
        result.cpu_flood.1,
        statuses(&result.valid),
        statuses(&result.flood)
    );
    println!(
        "\nvalid-key throughput with the paced flood / alone: {:.2}; with the unpaced flood: {:.2} \
         (the gateway's one core then serves both: see its CPU) ({seconds} s per pass, each pass's \
         CPU includes its 0.5 s warm-up)",
        result.paced_valid.rps() / result.alone.rps(),
        result.valid.rps() / result.alone.rps()
    );
}
