//! The store-read flood rows (issue 16, item 9): valid-key throughput alone, then with a
//! flood of distinct well-formed unknown keys (valid checksum) side by side, on the same
//! gateway, the connections split evenly between the two. Distinct keys beyond the
//! negative cache's capacity, so that without the filter of stored hashes every flood
//! request would be a store read.

use std::net::SocketAddr;
use std::sync::Arc;

use keygate::keys::KeyFormat;

use super::{Gateway, RowResult, drive, env_or, request};

/// More than the negative cache holds (10 000 by default), so it cannot absorb them.
const FLOOD_KEYS: usize = 200_000;

/// CPU seconds (user + system) a process has used so far, from /proc (0 if unreadable).
fn cpu_seconds(pid: u32) -> f64 {
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

struct FloodResult {
    alone: RowResult,
    valid: RowResult,
    flood: RowResult,
    /// CPU seconds of the gateway and of this process (generator and upstream), per pass.
    cpu_alone: (f64, f64),
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
    let alone = runtime.block_on(drive(target, Arc::clone(&valid), half, seconds));
    let after_alone = cpu();
    let (valid, flood) = runtime.block_on(async {
        tokio::join!(
            drive(target, valid, half, seconds),
            drive(target, flood, half, seconds)
        )
    });
    let after_flood = cpu();
    FloodResult {
        alone,
        valid,
        flood,
        cpu_alone: spent(before, after_alone),
        cpu_flood: spent(after_alone, after_flood),
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
        "| valid key + flood of unknown keys | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} / {} |",
        result.valid.rps(),
        result.flood.rps(),
        result.valid.percentile(0.99),
        result.cpu_flood.0,
        result.cpu_flood.1,
        statuses(&result.valid),
        statuses(&result.flood)
    );
    println!(
        "\nvalid-key throughput with the flood / alone: {:.2} ({seconds} s per pass, each pass's \
         CPU includes its 0.5 s warm-up)",
        result.valid.rps() / result.alone.rps()
    );
}
