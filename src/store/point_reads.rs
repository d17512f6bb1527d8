//! Where the sled store's point reads run: inline on the calling worker, or on tokio's
//! blocking pool after one of them waited on the disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where point reads run. A read from sled's cache or the OS page cache takes microseconds;
/// on a one-core gateway, handing it to the blocking pool and back costs about a third of a
/// cache miss (two thread switches, measured with the load bench's `distinct` row). So
/// reads run inline, and each is timed: one slower than `SLOW_READ` during which this
/// thread read from a block device has waited on the disk, and for the next
/// `POOL_AFTER_SLOW` every point read goes to the pool, where disk waits overlap without
/// holding a worker. A cold store thus costs each worker one disk read per
/// `POOL_AFTER_SLOW`, not one per miss. A read that was only slow because the thread was
/// preempted (a busy core) changes nothing.
pub(super) struct PointReads {
    started: Instant,
    /// Microseconds since `started` until which reads go to the pool.
    pool_until_us: AtomicU64,
}

/// A memory-resident read of a 1M-key store takes 5-12 µs (`cargo bench --bench verify`).
const SLOW_READ: Duration = Duration::from_micros(500);
const POOL_AFTER_SLOW: Duration = Duration::from_secs(1);

impl PointReads {
    pub(super) fn new() -> Self {
        PointReads {
            started: Instant::now(),
            pool_until_us: AtomicU64::new(0),
        }
    }

    fn micros(since: Duration) -> u64 {
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
    }

    pub(super) fn inline_now(&self, now: Instant) -> bool {
        let now_us = Self::micros(now.duration_since(self.started));
        now_us >= self.pool_until_us.load(Ordering::Relaxed)
    }

    /// An inline read begun at `began` has just finished.
    pub(super) fn finished(&self, began: Instant) {
        let now = Instant::now();
        if now.duration_since(began) > SLOW_READ && read_from_disk_lately() {
            self.send_to_pool(now);
        }
    }

    fn send_to_pool(&self, now: Instant) {
        let until = Self::micros(now.duration_since(self.started) + POOL_AFTER_SLOW);
        self.pool_until_us.store(until, Ordering::Relaxed);
        tracing::debug!(
            "a store read waited on the disk: reads go to the blocking pool for a second"
        );
    }
}

/// Whether this thread has read from a block device since the last time it asked (the
/// kernel's per-thread count; asked only after a slow read, so it costs the fast ones
/// nothing). Reads between two asks that did not wait cannot have gone to the disk.
#[cfg(target_os = "linux")]
fn read_from_disk_lately() -> bool {
    thread_local! {
        static BLOCKS_READ: std::cell::Cell<libc::c_long> = const { std::cell::Cell::new(0) };
    }
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return true;
    }
    let blocks = usage.ru_inblock;
    BLOCKS_READ.with(|seen| seen.replace(blocks) != blocks)
}

/// Without a per-thread count, a slow read is taken as a disk read.
#[cfg(not(target_os = "linux"))]
fn read_from_disk_lately() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{POOL_AFTER_SLOW, PointReads, SLOW_READ, read_from_disk_lately};

    #[test]
    fn point_reads_go_to_the_pool_for_a_while_after_a_disk_read() {
        let reads = PointReads::new();
        assert!(reads.inline_now(Instant::now()), "inline from the start");
        reads.finished(Instant::now());
        assert!(
            reads.inline_now(Instant::now()),
            "a fast read changes nothing"
        );
        let slow_start = Instant::now()
            .checked_sub(SLOW_READ + Duration::from_millis(1))
            .expect("a monotonic clock older than a millisecond");
        // The first ask only learns the thread's count; nothing was read meanwhile.
        let _ = read_from_disk_lately();
        reads.finished(slow_start);
        assert!(
            reads.inline_now(Instant::now()),
            "slow but not from the disk: preempted"
        );
        reads.send_to_pool(Instant::now());
        assert!(
            !reads.inline_now(Instant::now()),
            "the pool after a disk read"
        );
        let later = Instant::now() + POOL_AFTER_SLOW + Duration::from_millis(1);
        assert!(
            reads.inline_now(later),
            "inline again once the while is over"
        );
    }

    #[test]
    fn a_read_that_goes_to_the_disk_is_noticed() {
        let _ = read_from_disk_lately();
        assert!(!read_from_disk_lately(), "nothing read since the last ask");
        // O_DIRECT bypasses the page cache: the read must come from the device.
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("block");
        std::fs::write(&path, vec![7u8; 1 << 16]).expect("write");
        let read_direct = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)?;
            let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("layout");
            // SAFETY: a fresh 4096-aligned buffer, freed below.
            let buf = unsafe { std::alloc::alloc(layout) };
            let read = std::io::Read::read(&mut file, unsafe {
                std::slice::from_raw_parts_mut(buf, 4096)
            });
            unsafe { std::alloc::dealloc(buf, layout) };
            read.map(drop)
        };
        match read_direct() {
            Ok(()) => assert!(
                read_from_disk_lately(),
                "a direct read counts as a disk read"
            ),
            // tmpfs has no O_DIRECT: nothing to show there.
            Err(e) => eprintln!("O_DIRECT unavailable here ({e}): only the quiet case checked"),
        }
    }
}
