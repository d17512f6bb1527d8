//! What each piece of state that every request writes costs when several cores write it
//! (issue 21, "scale past one core"): the same operation timed on one thread, then on two
//! threads at once (unpinned; on a two-core machine, one a core), each doing the full count
//! of operations. A cache line that two cores write moves between them on every write;
//! what that costs is the difference between the rows.
//!
//! The pieces, as the request path uses them: the configuration in force (`ArcSwap`,
//! `load_full` once a request), a route's Prometheus counter and request-duration histogram,
//! the usage record of one hot key, one hot key's GCRA cell (a rate limit), a sled read
//! (a cache miss: sled's process-wide lock) and a hit on one hot key in the moka key cache.
//!
//! `cargo bench --bench contention`. On a machine with more cores, `CONTENTION_THREADS`
//! sets the second row's thread count (default 2).

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use keygate::usage::UsageRecorder;

fn threads() -> usize {
    std::env::var("CONTENTION_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// `op` run `iters` times on each of `threads` threads started together: the time one
/// thread took for its `iters` operations (the slowest thread's), so that per-operation
/// time is comparable across thread counts.
fn timed(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Duration {
    let start = Barrier::new(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    let began = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    began.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .max()
            .unwrap_or_default()
    })
}

fn pair(c: &mut Criterion, name: &str, op: &(dyn Fn() + Sync)) {
    let mut group = c.benchmark_group(name);
    group.bench_function("1 thread", |b| b.iter_custom(|iters| timed(1, iters, op)));
    let n = threads();
    group.bench_function(format!("{n} threads"), |b| {
        b.iter_custom(|iters| timed(n, iters, op))
    });
    group.finish();
}

fn shared_state(c: &mut Criterion) {
    let live = ArcSwap::from_pointee(vec![0u8; 64]);
    pair(c, "config in force, ArcSwap::load_full", &|| {
        black_box(live.load_full());
    });
    pair(c, "config in force, ArcSwap::load (guard)", &|| {
        black_box(live.load().len());
    });

    let counter = prometheus::IntCounter::new("requests", "requests").expect("counter");
    pair(c, "route request counter (Prometheus IntCounter)", &|| {
        counter.inc()
    });
    let histogram =
        prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("duration", "duration"))
            .expect("histogram");
    pair(c, "route duration histogram (Prometheus)", &|| {
        histogram.observe(black_box(0.0012))
    });

    let usage = UsageRecorder::new();
    let id = "01JF3ZQ4M8S6V2K9T7X1B5N3C0";
    let id_number = 1u128;
    pair(c, "usage record, one hot key", &|| {
        usage.record(black_box(id_number), id, 1, None)
    });

    // Keyed, as the gateway's per-key limits are (`ratelimit/gcra.rs`): the DashMap shard
    // of the key is written too.
    let limit = governor::Quota::per_second(NonZeroU32::MAX);
    let limiter = governor::RateLimiter::dashmap(limit);
    pair(c, "GCRA cell, one hot key (governor, keyed)", &|| {
        black_box(limiter.check_key(&id_number).is_ok());
    });

    // A cache miss: every sled read takes sled's process-wide concurrency control, a lock
    // in read mode once any transaction has run (keygate's creates are transactions).
    let db = sled::Config::new()
        .temporary(true)
        .open()
        .expect("temporary sled");
    let tree = db.open_tree("keys").expect("tree");
    tree.insert(b"key", b"record".as_slice()).expect("insert");
    let _: Result<(), sled::transaction::TransactionError<()>> = tree.transaction(|tx| {
        tx.insert(b"other".as_slice(), b"record".as_slice())?;
        Ok(())
    });
    pair(c, "store read, one key (sled get)", &|| {
        black_box(tree.get(b"key").ok());
    });

    let cache: moka::sync::Cache<[u8; 32], Arc<String>> = moka::sync::Cache::new(100_000);
    cache.insert([7; 32], Arc::new("key".into()));
    pair(c, "key cache hit, one hot key (moka)", &|| {
        black_box(cache.get(&[7; 32]));
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = shared_state
}
criterion_main!(benches);
