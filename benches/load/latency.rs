//! Latency at a fixed rate (issue 21, "p99 with a valid key"): at saturation, as in the
//! other rows, a p99 is queueing behind 32 connections and moves with the rate; what a key
//! check adds to a request's latency shows at a load the gateway carries with room to
//! spare. `LOAD_ROWS=latency`: `auth = "none"`, then a valid key, twice alternating, each
//! at `LOAD_LATENCY_RATE` requests a second (default 10 000) spread over 16 connections.
//!
//! Latency counts from the moment a request is sent. tokio's timer ticks by the
//! millisecond, so the connections' requests leave in bursts at each tick, as traffic from
//! many clients does; a tick missed while a connection still waits for an answer is
//! skipped (the rate printed beside each row says what was sent).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{RowRun, cores, env_or, percentile, read_response, request};

const CONNECTIONS: u64 = 16;
const DEFAULT_RATE: u64 = 10_000;

/// What a paced run saw.
pub(crate) struct Paced {
    /// Microseconds from each request's sending to its response, sorted (the warm-up's
    /// left out).
    pub(crate) latencies_us: Vec<u32>,
    pub(crate) errors: u64,
}

/// Sends `rate` requests a second over `connections` for `seconds` (after a 0.5 s warm-up,
/// as `drive`), cycling through `requests`. A tick missed while a connection waits for
/// its answer is skipped, as a steady client would.
pub(crate) async fn drive_paced(
    target: SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    rate: u64,
    seconds: u64,
    connections: u64,
) -> Paced {
    let interval = Duration::from_secs_f64(connections as f64 / rate.max(1) as f64);
    let warmup = Duration::from_millis(500);
    let started = Instant::now();
    let end = started + warmup + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let requests = Arc::clone(&requests);
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0u64);
                let Ok(mut stream) = TcpStream::connect(target).await else {
                    return (latencies, 1);
                };
                let _ = stream.set_nodelay(true);
                // Connections start spread over one interval, not all at once.
                let offset = interval.mul_f64(c as f64 / connections as f64);
                let mut ticker = tokio::time::interval_at((started + offset).into(), interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let (mut buf, mut i) = (Vec::with_capacity(4096), c as usize * 7919);
                loop {
                    let due = ticker.tick().await.into_std();
                    if due >= end {
                        break;
                    }
                    let sent = Instant::now();
                    if stream
                        .write_all(&requests[i % requests.len()])
                        .await
                        .is_err()
                        || read_response(&mut stream, &mut buf).await.is_none()
                    {
                        errors += 1;
                        break;
                    }
                    i += 1;
                    if due.duration_since(started) > warmup {
                        let us = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                        latencies.push(us);
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut paced = Paced {
        latencies_us: Vec::new(),
        errors: 0,
    };
    for task in tasks {
        if let Ok((latencies, errors)) = task.await {
            paced.latencies_us.extend(latencies);
            paced.errors += errors;
        }
    }
    paced.latencies_us.sort_unstable();
    paced
}

/// Runs and prints the latency rows when `wanted`.
pub(crate) fn run_if(
    wanted: bool,
    runtime: &tokio::runtime::Runtime,
    keygate: SocketAddr,
    run: &RowRun,
) {
    if !wanted {
        return;
    }
    let (valid_key, seconds) = (run.valid_key, run.seconds);
    let rate: u64 = env_or("LOAD_LATENCY_RATE", DEFAULT_RATE);
    let none = Arc::new(vec![request("/open/x", &[])]);
    let valid = Arc::new(vec![request("/x", &[("x-api-key", valid_key)])]);
    println!(
        "\n| latency at {rate} requests/s, {CONNECTIONS} connections | answered/s | p50 µs | p99 µs | p99.9 µs | errors | CPU during the row |\n|---|---:|---:|---:|---:|---:|---|"
    );
    let mut p99s = Vec::new();
    for round in 1..=2 {
        for (name, request) in [("auth = \"none\"", &none), ("one valid key", &valid)] {
            let (paced, cpu, _) = cores::measured_with_seconds(|| {
                let requests = Arc::clone(request);
                runtime.block_on(drive_paced(keygate, requests, rate, seconds, CONNECTIONS))
            });
            let answered = paced.latencies_us.len() as f64 / seconds as f64;
            println!(
                "| keygate, {name} (round {round}) | {answered:.0} | {:.0} | {:.0} | {:.0} | {} | {cpu} |",
                percentile(&paced.latencies_us, 0.5),
                percentile(&paced.latencies_us, 0.99),
                percentile(&paced.latencies_us, 0.999),
                paced.errors
            );
            p99s.push(percentile(&paced.latencies_us, 0.99));
        }
    }
    let added: Vec<String> = p99s
        .chunks(2)
        .map(|pair| format!("{:+.0} µs", pair[1] - pair[0]))
        .collect();
    println!(
        "\np99 of a valid key over auth = \"none\", each round: {}",
        added.join(", ")
    );
}
