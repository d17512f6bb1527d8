//! GCRA limits in this process (the `governor` crate): a burst of at most `requests`,
//! refilled evenly over `window_seconds`, so no window boundary ever admits 2N.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use super::{Budget, Decision, ManagementBudget};
use crate::config::ManagementLimits;
use crate::keys::RateLimit;

/// `requests` per `window_seconds`, burst `requests`.
pub(crate) fn quota(requests: u32, window_seconds: u32) -> Option<Quota> {
    let burst = NonZeroU32::new(requests)?;
    let window = Duration::from_secs(u64::from(window_seconds.max(1)));
    Quota::with_period(window / requests).map(|q| q.allow_burst(burst))
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// One limiter per key of type `K`, all with the same quota.
pub(crate) struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: RateLimiter<K, DashMapStateStore<K>, DefaultClock, StateInformationMiddleware>,
    limit: u32,
    window: Duration,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub(crate) fn new(requests: u32, window_seconds: u32) -> Option<Self> {
        let quota = quota(requests, window_seconds)?;
        Some(KeyedLimiter {
            limiter: RateLimiter::dashmap(quota).with_middleware::<StateInformationMiddleware>(),
            limit: requests,
            window: Duration::from_secs(u64::from(window_seconds.max(1))),
            clock: DefaultClock::default(),
        })
    }

    pub(crate) fn check(&self, key: &K) -> Decision {
        match self.limiter.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let used = self.limit.saturating_sub(remaining);
                let reset = ceil_secs(self.window.mul_f64(f64::from(used) / f64::from(self.limit)));
                Decision::Allowed {
                    limit: self.limit,
                    remaining,
                    reset,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Decision::Limited {
                    limit: self.limit,
                    retry_after: ceil_secs(wait).clamp(1, self.window.as_secs().max(1)),
                    reset: ceil_secs(self.window),
                }
            }
        }
    }

    /// Drops state of keys whose limit has fully recovered, bounding memory.
    pub(crate) fn forget_idle(&self) {
        self.limiter.retain_recent();
    }
}

/// Per-key limits where each key may carry its own quota: one keyed limiter per distinct
/// quota (there are few), each keyed by (key, budget) so that no two keys share a budget.
#[derive(Default)]
pub(crate) struct KeyLimits {
    by_quota: dashmap::DashMap<QuotaKey, Arc<KeyedLimiter<(u128, Budget)>>>,
}

/// (requests, window_seconds)
type QuotaKey = (u32, u32);

impl KeyLimits {
    pub(crate) fn check(&self, limit: RateLimit, key: u128, budget: Budget) -> Decision {
        let quota_key = (limit.requests, limit.window_seconds);
        let limiter = match self.by_quota.get(&quota_key) {
            Some(limiter) => Arc::clone(&limiter),
            None => match KeyedLimiter::new(limit.requests, limit.window_seconds) {
                Some(limiter) => Arc::clone(
                    &self
                        .by_quota
                        .entry(quota_key)
                        .or_insert_with(|| Arc::new(limiter)),
                ),
                // A zero quota is refused by config and API validation; admit if one slips by.
                None => {
                    return Decision::Allowed {
                        limit: limit.requests,
                        remaining: limit.requests,
                        reset: 0,
                    };
                }
            },
        };
        limiter.check(&(key, budget))
    }

    pub(crate) fn forget_idle(&self) {
        for limiter in self.by_quota.iter() {
            limiter.forget_idle();
        }
    }
}

/// Per-owner limits on management calls; the admin is exempt.
pub(crate) struct ManagementLimiters {
    create: Option<KeyedLimiter<String>>,
    list: Option<KeyedLimiter<String>>,
    revoke: Option<KeyedLimiter<String>>,
    signup: Option<KeyedLimiter<String>>,
}

impl ManagementLimiters {
    pub(crate) fn new(limits: &ManagementLimits, signup_per_hour: u32) -> Self {
        ManagementLimiters {
            create: KeyedLimiter::new(limits.create_per_hour, 3600),
            list: KeyedLimiter::new(limits.list_per_minute, 60),
            revoke: KeyedLimiter::new(limits.revoke_per_minute, 60),
            signup: KeyedLimiter::new(signup_per_hour, 3600),
        }
    }

    fn limiter(&self, budget: ManagementBudget) -> Option<&KeyedLimiter<String>> {
        match budget {
            ManagementBudget::Create => self.create.as_ref(),
            ManagementBudget::List => self.list.as_ref(),
            ManagementBudget::Revoke => self.revoke.as_ref(),
            ManagementBudget::Signup => self.signup.as_ref(),
        }
    }

    /// The limit on `budget`; None when it has none (configured as 0).
    pub(crate) fn limit_of(&self, budget: ManagementBudget) -> Option<RateLimit> {
        self.limiter(budget).map(|l| RateLimit {
            requests: l.limit,
            window_seconds: u32::try_from(l.window.as_secs()).unwrap_or(u32::MAX),
        })
    }

    /// Spends one call of `who`'s `budget`; `Err(retry_after)` when it is spent.
    pub(crate) fn check(&self, budget: ManagementBudget, who: &str) -> Result<(), u64> {
        match self.limiter(budget).map(|l| l.check(&who.to_string())) {
            Some(Decision::Limited { retry_after, .. }) => Err(retry_after),
            _ => Ok(()),
        }
    }

    pub(crate) fn forget_idle(&self) {
        for limiter in [&self.create, &self.list, &self.revoke, &self.signup]
            .into_iter()
            .flatten()
        {
            limiter.forget_idle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_n_then_refusal() {
        let limiter = KeyedLimiter::new(3, 60).expect("quota");
        for expected_remaining in [2, 1, 0] {
            match limiter.check(&"a") {
                Decision::Allowed {
                    remaining, limit, ..
                } => {
                    assert_eq!(limit, 3);
                    assert_eq!(remaining, expected_remaining);
                }
                other => panic!("expected allowed, got {other:?}"),
            }
        }
        match limiter.check(&"a") {
            Decision::Limited { retry_after, .. } => assert!((1..=60).contains(&retry_after)),
            other => panic!("expected limited, got {other:?}"),
        }
        assert!(matches!(limiter.check(&"b"), Decision::Allowed { .. }));
    }

    #[test]
    fn zero_requests_is_no_quota() {
        assert!(quota(0, 10).is_none());
    }
}
