//! Rate limiting by GCRA (the `governor` crate): a burst of at most `requests`, refilled
//! evenly over `window_seconds`, so no window boundary ever admits 2N.

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::ManagementLimits;
use crate::keys::RateLimit;

/// The verdict on one request, with what the `RateLimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Allowed {
        limit: u32,
        remaining: u32,
        /// Seconds until the full burst is available again.
        reset: u64,
    },
    Limited {
        limit: u32,
        /// Whole seconds until a request would be admitted, at least 1.
        retry_after: u64,
        reset: u64,
    },
}

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

/// Which budget a request spends: the key's own `rate_limit` (across all routes), or a
/// route's default limit (per route, identified by the route's index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Budget {
    Key,
    /// A route's default limit, by the route's id (from its name, so it survives reloads).
    Route(u64),
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

/// The management API's budgets, per owner (per client address for sign-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ManagementBudget {
    /// Creates and rotations.
    Create,
    /// Lists and gets.
    List,
    /// Revokes, by id and by value.
    Revoke,
    Signup,
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

    /// Spends one call of `who`'s `budget`; `Err(retry_after)` when it is spent.
    pub(crate) fn check(&self, budget: ManagementBudget, who: &str) -> Result<(), u64> {
        let limiter = match budget {
            ManagementBudget::Create => &self.create,
            ManagementBudget::List => &self.list,
            ManagementBudget::Revoke => &self.revoke,
            ManagementBudget::Signup => &self.signup,
        };
        match limiter.as_ref().map(|l| l.check(&who.to_string())) {
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

/// The address a per-client limit counts against: an IPv4 address, or an IPv6 address's
/// /64 (one host holds a whole /64 and can rotate through it at will).
pub(crate) fn client_bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
    }
}

/// Slows down guessing: a client (by `client_bucket`) that presented more than `max`
/// wrong credentials within a minute is refused until that minute is over.
pub(crate) struct FailureThrottle {
    failures: moka::sync::Cache<IpAddr, Arc<std::sync::atomic::AtomicU32>>,
    max: u32,
}

/// The throttle's window: counts start at a client's first failure and last this long.
pub(crate) const FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl FailureThrottle {
    pub(crate) fn new(max_per_minute: u32) -> Self {
        FailureThrottle {
            failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FAILURE_WINDOW)
                .build(),
            max: max_per_minute,
        }
    }

    /// Whether `client` is refused for now.
    pub(crate) fn is_blocked(&self, client: IpAddr) -> bool {
        self.failures
            .get(&client_bucket(client))
            .is_some_and(|count| count.load(std::sync::atomic::Ordering::Relaxed) >= self.max)
    }

    pub(crate) fn record_failure(&self, client: IpAddr) {
        self.failures
            .get_with(client_bucket(client), Default::default)
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` for a decision.
pub(crate) fn headers(decision: Decision) -> [(&'static str, http::HeaderValue); 3] {
    let (limit, remaining, reset) = match decision {
        Decision::Allowed {
            limit,
            remaining,
            reset,
        } => (limit, remaining, reset),
        Decision::Limited { limit, reset, .. } => (limit, 0, reset),
    };
    [
        ("ratelimit-limit", http::HeaderValue::from(limit)),
        ("ratelimit-remaining", http::HeaderValue::from(remaining)),
        ("ratelimit-reset", http::HeaderValue::from(reset)),
    ]
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
    fn ipv6_clients_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().expect("ip");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(client_bucket(a), client_bucket(b));
        assert_ne!(client_bucket(a), client_bucket(other));
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        assert_eq!(client_bucket(v4), v4);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(client_bucket(mapped), v4);
    }

    #[test]
    fn failures_block_a_client_past_the_budget() {
        let throttle = FailureThrottle::new(3);
        let client: IpAddr = "2001:db8::1".parse().expect("ip");
        let neighbour: IpAddr = "2001:db8::2".parse().expect("ip");
        for _ in 0..3 {
            assert!(!throttle.is_blocked(client));
            throttle.record_failure(client);
        }
        assert!(throttle.is_blocked(client));
        assert!(throttle.is_blocked(neighbour), "the same /64");
        assert!(!throttle.is_blocked("192.0.2.1".parse().expect("ip")));
    }

    #[test]
    fn zero_requests_is_no_quota() {
        assert!(quota(0, 10).is_none());
    }
}
