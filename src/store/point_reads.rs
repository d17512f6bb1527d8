//! Where the sled store's point reads run: inline on the calling worker, or on tokio's
//! blocking pool while the store writes and after a read that blocked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where point reads run. A read from sled's cache or the OS page cache takes microseconds;
/// handing it to the blocking pool and back costs two thread switches, which on a one-core
/// gateway made a cache miss 5-8% dearer (the load bench's `distinct` row). So reads
/// run inline, except:
/// - while the store's writer applies writes: a sled transaction holds sled's global lock
///   for its whole body, and a reader would wait it out on the worker (see `SledStore`);
/// - for `POOL_AFTER_BLOCKED` after an inline read that blocked: slower than `SLOW_READ`
///   with the thread put to sleep meanwhile (a voluntary context switch: a disk wait or a
///   lock; being preempted on a busy core is involuntary and changes nothing), or slower
///   than `VERY_SLOW_READ` whatever the cause.
///
/// Several workers may each be in a blocking read before the first one switches the reads
/// to the pool; after that, reads that block cost a worker at most one wait per
/// `POOL_AFTER_BLOCKED`.
pub(super) struct PointReads {
    started: Instant,
    /// Microseconds since `started` until which reads go to the pool.
    pool_until_us: AtomicU64,
}

/// A memory-resident read of a 1M-key store takes 5-12 µs (`cargo bench --bench verify`).
const SLOW_READ: Duration = Duration::from_micros(200);
const VERY_SLOW_READ: Duration = Duration::from_millis(5);
const POOL_AFTER_BLOCKED: Duration = Duration::from_secs(1);

/// What the kernel counted for the calling thread: voluntary context switches and block
/// reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct ThreadCounts {
    voluntary_switches: libc::c_long,
    blocks_read: libc::c_long,
}

impl ThreadCounts {
    /// The calling thread's counts (one `getrusage` call); None where the kernel does not
    /// keep them per thread.
    pub(super) fn now() -> Option<ThreadCounts> {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: `rusage` is plain integers, so all-zero is a valid value, and
            // getrusage writes only the struct it is given.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
                return None;
            }
            Some(ThreadCounts {
                voluntary_switches: usage.ru_nvcsw,
                blocks_read: usage.ru_inblock,
            })
        }
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// Whether the thread slept or read from a device since `self`.
    fn blocked_since(self, earlier: ThreadCounts) -> bool {
        self.voluntary_switches != earlier.voluntary_switches
            || self.blocks_read != earlier.blocks_read
    }
}

/// Whether an inline read that took `elapsed` should send reads to the pool; `blocked` says
/// whether the thread slept meanwhile (None: unknown, then a slow read counts as blocked).
fn blocked_read(elapsed: Duration, blocked: Option<bool>) -> bool {
    elapsed > VERY_SLOW_READ || (elapsed > SLOW_READ && blocked.unwrap_or(true))
}

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

    /// An inline read begun at `began`, with the thread's counts then, has just finished.
    pub(super) fn finished(&self, began: Instant, counts_before: Option<ThreadCounts>) {
        let now = Instant::now();
        let elapsed = now.duration_since(began);
        if elapsed <= SLOW_READ {
            return;
        }
        let blocked = counts_before
            .zip(ThreadCounts::now())
            .map(|(before, after)| after.blocked_since(before));
        if blocked_read(elapsed, blocked) {
            self.send_to_pool(now);
        }
    }

    fn send_to_pool(&self, now: Instant) {
        let until = Self::micros(now.duration_since(self.started) + POOL_AFTER_BLOCKED);
        self.pool_until_us.fetch_max(until, Ordering::Relaxed);
        tracing::debug!(
            "a store read blocked its worker: reads go to the blocking pool for a second"
        );
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::{Duration, Instant};

    use super::{
        POOL_AFTER_BLOCKED, PointReads, SLOW_READ, ThreadCounts, VERY_SLOW_READ, blocked_read,
    };

    #[test]
    fn only_reads_that_blocked_send_reads_to_the_pool() {
        let slow = SLOW_READ + Duration::from_micros(1);
        assert!(!blocked_read(Duration::from_micros(10), Some(true)), "fast");
        assert!(!blocked_read(slow, Some(false)), "slow but preempted");
        assert!(blocked_read(slow, Some(true)), "slow and slept");
        assert!(blocked_read(slow, None), "slow, counts unknown");
        let very_slow = VERY_SLOW_READ + Duration::from_micros(1);
        assert!(blocked_read(very_slow, Some(false)), "very slow");
    }

    #[test]
    fn a_read_that_sleeps_sends_reads_to_the_pool_for_a_while() {
        let reads = PointReads::new();
        assert!(reads.inline_now(Instant::now()), "inline from the start");
        let (began, counts) = (Instant::now(), ThreadCounts::now());
        reads.finished(began, counts);
        assert!(
            reads.inline_now(Instant::now()),
            "a fast read changes nothing"
        );
        let (began, counts) = (Instant::now(), ThreadCounts::now());
        // Sleeping is a voluntary context switch, as a disk wait or a lock wait is.
        std::thread::sleep(SLOW_READ * 2);
        reads.finished(began, counts);
        assert!(
            !reads.inline_now(Instant::now()),
            "the pool after a blocked read"
        );
        let later = Instant::now() + POOL_AFTER_BLOCKED + Duration::from_millis(1);
        assert!(
            reads.inline_now(later),
            "inline again once the while is over"
        );
    }

    #[test]
    fn a_busy_slow_read_keeps_reads_inline() {
        let spin = |length: Duration| {
            let began = Instant::now();
            while began.elapsed() < length {
                std::hint::spin_loop();
            }
        };
        // The first spin pages this code in; a loaded machine may stretch a spin past the
        // very-slow bound, which would rightly switch: try again then.
        spin(SLOW_READ * 2);
        for _ in 0..5 {
            let reads = PointReads::new();
            let (began, counts) = (Instant::now(), ThreadCounts::now());
            spin(SLOW_READ * 2);
            if began.elapsed() >= VERY_SLOW_READ {
                continue;
            }
            reads.finished(began, counts);
            assert!(
                reads.inline_now(Instant::now()),
                "computing is not blocking"
            );
            return;
        }
        panic!("five busy spins of 0.4 ms each took over 5 ms: the machine is too loaded");
    }

    fn on_tmpfs(path: &std::path::Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: a valid C string and a zeroed struct statfs fills in.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } == 0;
        // `f_type` is an i32 on some targets, an i64 on this one.
        #[allow(clippy::useless_conversion)]
        let f_type = i64::from(stat.f_type);
        ok && f_type == TMPFS_MAGIC
    }

    #[test]
    fn a_device_read_counts_as_blocking() {
        // Under target/: a temporary directory may be tmpfs, which serves O_DIRECT from
        // memory.
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/target");
        std::fs::create_dir_all(root).expect("target dir");
        let dir = tempfile::tempdir_in(root).expect("dir");
        let path = dir.path().join("block");
        std::fs::write(&path, vec![7u8; 1 << 16]).expect("write");
        if on_tmpfs(dir.path()) {
            eprintln!(
                "target/ is on tmpfs, which serves O_DIRECT from memory: no device read to show"
            );
            return;
        }
        let before = ThreadCounts::now().expect("per-thread counts on Linux");
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        let mut file = match opened {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("this filesystem has no O_DIRECT: no device read to show");
                return;
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        };
        let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("layout");
        // SAFETY: a zeroed, 4096-aligned buffer of 4096 bytes, freed below.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        if buf.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let read = std::io::Read::read(&mut file, unsafe {
            std::slice::from_raw_parts_mut(buf, 4096)
        });
        unsafe { std::alloc::dealloc(buf, layout) };
        read.expect("O_DIRECT read");
        let after = ThreadCounts::now().expect("counts");
        assert!(
            after.blocked_since(before),
            "a read from the device: {before:?} -> {after:?}"
        );
    }
}
