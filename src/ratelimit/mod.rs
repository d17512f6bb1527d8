//! Rate limits and quotas: decided in this process (`gcra`, `quota`) or in Redis
//! (`redis`), shared by every gateway on it. `Limits` is the one door to both.

mod gcra;
mod quota;
mod redis;
mod throttle;

pub(crate) use gcra::ManagementLimiters;
pub(crate) use throttle::{FAILURE_WINDOW, FailureThrottle, client_bucket};

use std::sync::Arc;

use anyhow::Context;

use crate::config::LimitBackend;
use crate::error::GatewayError;
use crate::keys::{QuotaUsage, RateLimit};
use crate::metrics::Metrics;
use crate::store::{CachedKey, KeyWithUsage};
use gcra::KeyLimits;
use quota::QuotaCounters;
use redis::RedisLimits;

/// What a request with a key gets from the key's rate limit and quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `rate` for the `RateLimit-*` headers (None: no limit, or Redis could not say),
    /// `quota_remaining` after this request (None: no quota, or Redis could not say).
    Admitted {
        rate: Option<Decision>,
        quota_remaining: Option<u64>,
    },
    RateLimited(Decision),
    /// `retry_after`: seconds until the quota's period turns over; None for `total`.
    QuotaExhausted {
        retry_after: Option<u64>,
    },
    /// Redis could not decide and `on_error = "deny"`.
    Unavailable,
}

impl Verdict {
    const UNLIMITED: Verdict = Verdict::Admitted {
        rate: None,
        quota_remaining: None,
    };

    /// Ok for an admitted request, else the refusal.
    pub(crate) fn admitted(self) -> Result<(), GatewayError> {
        match self {
            Verdict::Admitted { .. } => Ok(()),
            Verdict::RateLimited(decision) => Err(GatewayError::RateLimited {
                retry_after: match decision {
                    Decision::Limited { retry_after, .. } => retry_after,
                    Decision::Allowed { .. } => 1,
                },
            }),
            Verdict::QuotaExhausted { retry_after } => {
                Err(GatewayError::QuotaExhausted { retry_after })
            }
            Verdict::Unavailable => Err(GatewayError::RateLimitUnavailable),
        }
    }
}

/// Where every limit and quota is decided: here, or in Redis (`[ratelimit]`).
pub(crate) struct Limits {
    keys: KeyLimits,
    quotas: QuotaCounters,
    redis: Option<RedisLimits>,
}

impl Limits {
    pub(crate) fn new(backend: &LimitBackend, metrics: &Arc<Metrics>) -> anyhow::Result<Self> {
        let redis = match backend {
            LimitBackend::Local => None,
            LimitBackend::Redis {
                url_env,
                timeout,
                on_error,
            } => {
                let url = crate::config::named_env("ratelimit.url_env", url_env)
                    .map_err(|problem| anyhow::anyhow!("{problem}"))?;
                let redis = RedisLimits::new(&url, *timeout, *on_error, Arc::clone(metrics))
                    .with_context(|| {
                        format!("{url_env} is not a Redis URL (redis://host:port/db)")
                    })?;
                Some(redis)
            }
        };
        Ok(Limits {
            keys: KeyLimits::default(),
            quotas: QuotaCounters::default(),
            redis,
        })
    }

    /// One request of `key` at `now`, against its rate limit (`limit`: its own or the
    /// route's, on that budget) and its quota. A key with neither never waits; with
    /// Redis, a limited key waits for one round trip, at most `timeout_ms`.
    pub(crate) async fn spend(
        &self,
        key: &CachedKey,
        limit: Option<(RateLimit, Budget)>,
        now: i64,
    ) -> Verdict {
        let quota = key.quota.zip(key.quota_stamp(now));
        if limit.is_none() && quota.is_none() {
            return Verdict::UNLIMITED;
        }
        if let Some(redis) = &self.redis {
            return redis.spend(key, limit, quota, now).await;
        }
        let rate = || limit.map(|(limit, budget)| self.keys.check(limit, key.id_number, budget));
        match quota {
            Some((quota, stamp)) => self.quotas.spend(key, quota, stamp, now, rate),
            None => match rate() {
                Some(limited @ Decision::Limited { .. }) => Verdict::RateLimited(limited),
                rate => Verdict::Admitted {
                    rate,
                    quota_remaining: None,
                },
            },
        }
    }

    /// One management call of `who` on `budget`.
    pub(crate) async fn spend_management(
        &self,
        limiters: &ManagementLimiters,
        budget: ManagementBudget,
        who: &str,
    ) -> Verdict {
        match (&self.redis, limiters.limit_of(budget)) {
            (_, None) => Verdict::UNLIMITED,
            (Some(redis), Some(limit)) => redis.spend_management(budget, limit, who).await,
            (None, Some(_)) => match limiters.check(budget, who) {
                Ok(()) => Verdict::UNLIMITED,
                Err(retry_after) => Verdict::RateLimited(Decision::Limited {
                    limit: 0,
                    retry_after,
                    reset: retry_after,
                }),
            },
        }
    }

    /// Sets each key's quota count to the live one at `now`: this process's count, or
    /// Redis's, where either has one; the store's (flushed and pending usage) otherwise.
    pub(crate) async fn settle_quotas(&self, keys: &mut [KeyWithUsage], now: i64) {
        let stamps: Vec<Option<i64>> = keys.iter().map(|k| k.record.quota_stamp(now)).collect();
        let live: Vec<Option<u64>> = match &self.redis {
            Some(redis) => {
                let with_quota: Vec<(usize, String)> = keys
                    .iter()
                    .zip(&stamps)
                    .enumerate()
                    .filter_map(|(i, (k, stamp))| {
                        stamp.map(|stamp| (i, redis::count_key(&k.record.id, stamp)))
                    })
                    .collect();
                let names: Vec<String> = with_quota.iter().map(|(_, n)| n.clone()).collect();
                let mut live = vec![None; keys.len()];
                if let Some(counts) = redis.quota_counts(&names).await {
                    for ((i, _), count) in with_quota.iter().zip(counts) {
                        live[*i] = count;
                    }
                }
                live
            }
            None => keys
                .iter()
                .zip(&stamps)
                .map(|(k, stamp)| {
                    let id_number = ulid::Ulid::from_string(&k.record.id).ok()?;
                    self.quotas.used(u128::from(id_number), (*stamp)?)
                })
                .collect(),
        };
        for ((key, stamp), live) in keys.iter_mut().zip(stamps).zip(live) {
            if let (Some(stamp), Some(used)) = (stamp, live) {
                key.usage.quota = QuotaUsage { stamp, used };
            }
        }
    }

    /// `settle_quotas` for one key.
    pub(crate) async fn settle_quota(&self, key: &mut KeyWithUsage, now: i64) {
        self.settle_quotas(std::slice::from_mut(key), now).await;
    }

    /// Drops state of local limits that have fully recovered, bounding memory.
    pub(crate) fn forget_idle(&self) {
        self.keys.forget_idle();
    }
}

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

/// Which budget a request spends: the key's own `rate_limit` (across all routes), or a
/// route's default limit (per route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Budget {
    Key,
    /// A route's default limit, by the route's id (from its name, so it survives reloads).
    Route(u64),
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

impl ManagementBudget {
    pub(crate) fn label(self) -> &'static str {
        match self {
            ManagementBudget::Create => "create",
            ManagementBudget::List => "list",
            ManagementBudget::Revoke => "revoke",
            ManagementBudget::Signup => "signup",
        }
    }
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` for a decision.
pub(crate) fn headers(decision: Decision) -> [(http::HeaderName, http::HeaderValue); 3] {
    use crate::http::names::{RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET};
    let (limit, remaining, reset) = match decision {
        Decision::Allowed {
            limit,
            remaining,
            reset,
        } => (limit, remaining, reset),
        Decision::Limited { limit, reset, .. } => (limit, 0, reset),
    };
    [
        (RATELIMIT_LIMIT, http::HeaderValue::from(limit)),
        (RATELIMIT_REMAINING, http::HeaderValue::from(remaining)),
        (RATELIMIT_RESET, http::HeaderValue::from(reset)),
    ]
}
