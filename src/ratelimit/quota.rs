//! Quotas counted in this process: exact for one gateway. Each key's count starts from
//! what the store held when the key was cached (`CachedKey::quota_seed`, flushed usage),
//! so a graceful restart, which flushes last, loses nothing.

use dashmap::DashMap;
use parking_lot::Mutex;

use super::{Decision, Verdict};
use crate::keys::{Quota, QuotaPeriod, QuotaUsage};
use crate::store::CachedKey;

/// Seconds until `period` turns over after `now` (at least 1); None for `total`.
pub(crate) fn retry_after(period: QuotaPeriod, now: i64) -> Option<u64> {
    period
        .end(now)
        .map(|end| u64::try_from(end - now).unwrap_or(0).max(1))
}

/// Each key's count in its current period, by key id number. Only keys with a quota that
/// were used since the start have an entry (one small lock each, never a shared one).
#[derive(Default)]
pub(crate) struct QuotaCounters {
    counts: DashMap<u128, Mutex<QuotaUsage>>,
}

impl QuotaCounters {
    /// Spends one of `key`'s `quota` at `now` if there is one left and `rate` (the key's
    /// rate limit, checked only then) admits the request: refused requests spend nothing.
    pub(crate) fn spend(
        &self,
        key: &CachedKey,
        quota: Quota,
        stamp: i64,
        now: i64,
        rate: impl FnOnce() -> Option<Decision>,
    ) -> Verdict {
        let cell = match self.counts.get(&key.id_number) {
            Some(cell) => cell,
            None => self
                .counts
                .entry(key.id_number)
                .or_insert_with(|| Mutex::new(key.quota_seed))
                .downgrade(),
        };
        let mut count = cell.lock();
        if count.stamp < stamp {
            // A new period or a new quota: what the store holds of it, if anything.
            *count = QuotaUsage {
                stamp,
                used: key.quota_seed.used_in(stamp),
            };
        }
        if count.used >= quota.requests {
            return Verdict::QuotaExhausted {
                retry_after: retry_after(quota.period, now),
            };
        }
        let rate = rate();
        if let Some(limited @ Decision::Limited { .. }) = rate {
            return Verdict::RateLimited(limited);
        }
        count.used += 1;
        Verdict::Admitted {
            rate,
            quota_remaining: Some(quota.requests - count.used),
        }
    }

    /// What key `id_number` has spent in the period `stamp` names, if this process counted
    /// it; None when it has not (the store's count is then the whole count).
    pub(crate) fn used(&self, id_number: u128, stamp: i64) -> Option<u64> {
        let cell = self.counts.get(&id_number)?;
        let count = cell.lock();
        (count.stamp >= stamp).then(|| count.used_in(stamp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyFormat, KeyRecord, quota_stamp};

    const MIDNIGHT: i64 = 1_796_083_200; // 2026-12-01T00:00:00Z

    fn key_with(quota: Quota, seed: QuotaUsage) -> CachedKey {
        let format = KeyFormat::new("kg");
        let raw = format.generate().expect("rng");
        let mut record = KeyRecord::for_key(&format, &raw, "alice", 0);
        record.quota = Some(quota);
        let mut key = CachedKey::from_record(&record).expect("cached");
        key.quota_seed = seed;
        key
    }

    fn spend(counters: &QuotaCounters, key: &CachedKey, now: i64) -> Verdict {
        let quota = key.quota.expect("a quota");
        let stamp = quota_stamp(key.quota_revision, quota.period, now);
        counters.spend(key, quota, stamp, now, || None)
    }

    #[test]
    fn a_day_quota_is_spent_then_refused_until_utc_midnight_then_full_again() {
        let quota = Quota {
            requests: 3,
            period: QuotaPeriod::Day,
        };
        let before = MIDNIGHT - 10;
        let seed = QuotaUsage {
            stamp: quota_stamp(0, QuotaPeriod::Day, before),
            used: 1,
        };
        let key = key_with(quota, seed);
        let counters = QuotaCounters::default();
        for left in [1, 0] {
            assert_eq!(
                spend(&counters, &key, before),
                Verdict::Admitted {
                    rate: None,
                    quota_remaining: Some(left)
                }
            );
        }
        assert_eq!(
            spend(&counters, &key, before),
            Verdict::QuotaExhausted {
                retry_after: Some(10)
            }
        );
        assert_eq!(
            spend(&counters, &key, MIDNIGHT),
            Verdict::Admitted {
                rate: None,
                quota_remaining: Some(2)
            },
            "the seed is of yesterday: today starts full"
        );
        let today = quota_stamp(0, QuotaPeriod::Day, MIDNIGHT);
        assert_eq!(counters.used(key.id_number, today), Some(1));
    }

    #[test]
    fn a_rate_limited_request_spends_no_quota_and_a_total_quota_never_resets() {
        let quota = Quota {
            requests: 1,
            period: QuotaPeriod::Total,
        };
        let key = key_with(quota, QuotaUsage::default());
        let counters = QuotaCounters::default();
        let stamp = quota_stamp(0, QuotaPeriod::Total, 0);
        let limited = Decision::Limited {
            limit: 1,
            retry_after: 5,
            reset: 5,
        };
        assert_eq!(
            counters.spend(&key, quota, stamp, 0, || Some(limited)),
            Verdict::RateLimited(limited)
        );
        assert_eq!(counters.used(key.id_number, stamp), Some(0));
        assert!(matches!(
            spend(&counters, &key, 0),
            Verdict::Admitted { .. }
        ));
        assert_eq!(
            spend(&counters, &key, 400 * 86_400),
            Verdict::QuotaExhausted { retry_after: None }
        );
    }
}
