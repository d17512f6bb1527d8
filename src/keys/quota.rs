//! A key's quota (contract section 12): `requests` per calendar `period` in UTC, or in
//! total, and the count spent of it as the stores keep it. Every function takes the time
//! it decides at, so that a period's end can be tested without waiting for midnight.

use serde::{Deserialize, Serialize};
use time::{Date, Month, OffsetDateTime};

/// A key's budget of requests per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub requests: u64,
    pub period: QuotaPeriod,
}

impl Quota {
    pub const MAX_REQUESTS: u64 = 1_000_000_000_000;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Day,
    Month,
    Total,
}

impl QuotaPeriod {
    pub const NAMES: [&'static str; 3] = ["day", "month", "total"];

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "day" => Some(QuotaPeriod::Day),
            "month" => Some(QuotaPeriod::Month),
            "total" => Some(QuotaPeriod::Total),
            _ => None,
        }
    }

    /// The number of the period holding `now`: days or months since 1970 (UTC), 0 for
    /// `total`. Later periods have larger numbers.
    pub fn index(self, now: i64) -> i64 {
        match self {
            QuotaPeriod::Day => now.div_euclid(86_400),
            QuotaPeriod::Month => {
                let date = utc_date(now);
                (i64::from(date.year()) - 1970) * 12 + i64::from(u8::from(date.month())) - 1
            }
            QuotaPeriod::Total => 0,
        }
    }

    /// Unix seconds at which the period holding `now` ends; None for `total`.
    pub fn end(self, now: i64) -> Option<i64> {
        match self {
            QuotaPeriod::Day => Some((now.div_euclid(86_400) + 1) * 86_400),
            QuotaPeriod::Month => {
                let date = utc_date(now);
                let (year, month) = match date.month() {
                    Month::December => (date.year() + 1, Month::January),
                    month => (date.year(), month.next()),
                };
                Date::from_calendar_date(year, month, 1)
                    .ok()
                    .map(|first| first.midnight().assume_utc().unix_timestamp())
            }
            QuotaPeriod::Total => None,
        }
    }
}

fn utc_date(now: i64) -> Date {
    OffsetDateTime::from_unix_timestamp(now)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        .date()
}

/// Which count a quota spends: the period (low 32 bits) within the key's quota revision
/// (high 32 bits; a `PATCH` that sets `quota` starts a new revision, with a fresh count).
/// A larger stamp is always a later count.
pub fn quota_stamp(revision: u32, period: QuotaPeriod, now: i64) -> i64 {
    (i64::from(revision) << 32) | (period.index(now) & 0xffff_ffff)
}

/// The count of a key's quota spent in the period `stamp` names. Adding two counts of one
/// stamp sums them; a later stamp replaces an earlier one (the period turned over).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    pub stamp: i64,
    pub used: u64,
}

impl QuotaUsage {
    pub fn merge(&mut self, other: QuotaUsage) {
        if other.stamp > self.stamp {
            *self = other;
        } else if other.stamp == self.stamp {
            self.used += other.used;
        }
    }

    /// What was spent in the period `stamp` names: nothing if this count is of another.
    pub fn used_in(self, stamp: i64) -> u64 {
        if self.stamp == stamp { self.used } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV_30_2026_23_59_59: i64 = 1_796_083_199;

    #[test]
    fn a_day_ends_at_utc_midnight_and_a_month_on_the_first() {
        let now = NOV_30_2026_23_59_59;
        assert_eq!(QuotaPeriod::Day.end(now), Some(now + 1));
        assert_eq!(QuotaPeriod::Month.end(now), Some(now + 1));
        assert_eq!(
            QuotaPeriod::Day.index(now) + 1,
            QuotaPeriod::Day.index(now + 1)
        );
        assert_eq!(
            QuotaPeriod::Month.index(now) + 1,
            QuotaPeriod::Month.index(now + 1)
        );
        assert_eq!(QuotaPeriod::Month.index(0), 0);
        assert_eq!(QuotaPeriod::Month.index(now), (2026 - 1970) * 12 + 10);
        assert_eq!(QuotaPeriod::Total.end(now), None);
        assert_eq!(QuotaPeriod::Total.index(now), QuotaPeriod::Total.index(0));
        let dec_31 = now + 31 * 86_400;
        assert_eq!(QuotaPeriod::Month.end(dec_31), Some(dec_31 + 1));
    }

    #[test]
    fn a_later_stamp_replaces_and_the_same_stamp_adds() {
        let day1 = quota_stamp(0, QuotaPeriod::Day, 0);
        let day2 = quota_stamp(0, QuotaPeriod::Day, 86_400);
        let revised = quota_stamp(1, QuotaPeriod::Day, 0);
        assert!(day2 > day1 && revised > day2);
        let mut usage = QuotaUsage {
            stamp: day1,
            used: 3,
        };
        usage.merge(QuotaUsage {
            stamp: day1,
            used: 2,
        });
        assert_eq!(usage.used_in(day1), 5);
        usage.merge(QuotaUsage {
            stamp: day2,
            used: 1,
        });
        assert_eq!((usage.used_in(day1), usage.used_in(day2)), (0, 1));
        usage.merge(QuotaUsage {
            stamp: day1,
            used: 9,
        });
        assert_eq!(usage.used_in(day2), 1, "an older period's count is dropped");
    }
}
