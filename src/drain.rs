//! Stopping without dropping a request and without waiting longer than needed: on a stop
//! signal new connections are closed, connections close after their current response, and
//! the process stops as soon as no request is in flight (`shutdown_grace_seconds` is the
//! ceiling). Pingora's own graceful stop always sleeps the whole grace period.
//!
//! Requests in flight are counted per shard (a cache line each, the shard chosen per
//! thread), so counting them is no shared atomic written by every request on every core.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const SHARDS: usize = 64;

#[repr(align(128))]
#[derive(Default)]
struct Shard(AtomicUsize);

pub(crate) struct Drain {
    draining: AtomicBool,
    shards: [Shard; SHARDS],
}

/// One request in flight, from its first hook to the end of its logging.
pub(crate) struct InFlight {
    drain: &'static Drain,
    shard: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.drain.shards[self.shard]
            .0
            .fetch_sub(1, Ordering::Release);
    }
}

fn shard_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

impl Drain {
    /// The one drain of this process (the request contexts hold it by reference, so that
    /// counting a request clones no `Arc`).
    pub(crate) fn leak() -> &'static Drain {
        Box::leak(Box::new(Drain {
            draining: AtomicBool::new(false),
            shards: std::array::from_fn(|_| Shard::default()),
        }))
    }

    pub(crate) fn enter(&'static self) -> InFlight {
        let shard = shard_of_this_thread();
        self.shards[shard].0.fetch_add(1, Ordering::Acquire);
        InFlight { drain: self, shard }
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Acquire))
            .fold(0usize, usize::wrapping_add)
    }

    /// Starts draining and waits until no request is in flight or `ceiling` has passed.
    /// Returns how many requests were still in flight at the end.
    pub(crate) async fn drain(&self, ceiling: Duration) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let started = Instant::now();
        loop {
            let left = self.in_flight();
            if left == 0 || started.elapsed() >= ceiling {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drains_once_the_last_request_ends() {
        let drain = Drain::leak();
        let first = drain.enter();
        let second = drain.enter();
        assert_eq!(drain.in_flight(), 2);
        assert!(!drain.is_draining());
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(first);
            drop(second);
        });
        assert_eq!(drain.drain(Duration::from_secs(10)).await, 0);
        assert!(drain.is_draining());
        release.await.expect("release");
    }

    #[tokio::test]
    async fn the_ceiling_ends_a_drain() {
        let drain = Drain::leak();
        let stuck = drain.enter();
        assert_eq!(drain.drain(Duration::from_millis(30)).await, 1);
        drop(stuck);
        assert_eq!(drain.in_flight(), 0);
    }
}
