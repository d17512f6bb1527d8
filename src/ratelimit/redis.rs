//! Limits and quotas decided in Redis, so that every gateway on one Redis admits together
//! what one gateway would. Each decision is one Lua script (GCRA for rates, a counter per
//! quota period), run by `EVALSHA` (the `redis` crate loads it on the first `NOSCRIPT`)
//! over one multiplexed connection that reconnects by itself. Every key written expires:
//! a rate budget once it has refilled, a quota count an hour after its period ends (a
//! `total` quota's after 30 idle days; it is then counted again from the store).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::{Budget, Decision, ManagementBudget, Verdict};
use crate::config::OnLimitError;
use crate::keys::{Quota, QuotaPeriod, RateLimit};
use crate::metrics::Metrics;
use crate::store::CachedKey;

/// One decision: the quota first (a spent quota refuses without touching the rate), then
/// the rate, then the quota is spent, all or nothing. Redis's own clock times the rates,
/// so gateways with skewed clocks still agree.
const DECIDE: &str = r"
-- KEYS[1]: a rate budget's theoretical arrival time (µs); KEYS[2]: a quota period's count
-- ARGV: has_rate, interval_us, window_us, has_quota, quota_requests, quota_seed, quota_ttl_s
-- Times are µs since 1970 in doubles (exact to a fraction of a µs): the interval of the
-- fastest limit keygate accepts with Redis, 10^6 a second, is 1 µs.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local used = 0
if ARGV[4] == '1' then
  used = tonumber(redis.call('GET', KEYS[2]) or ARGV[6])
  if used >= tonumber(ARGV[5]) then
    return {2, used, 0, 0}
  end
end
local remaining, reset = 0, 0
if ARGV[1] == '1' then
  local interval = tonumber(ARGV[2])
  local window = tonumber(ARGV[3])
  local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
  if tat < now then tat = now end
  local next_tat = tat + interval
  local allow_at = next_tat - window
  if allow_at > now then
    return {1, used, math.ceil(allow_at - now), math.ceil(tat - now)}
  end
  local keep_ms = math.max(1, math.ceil((next_tat - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%.1f', next_tat), 'PX', keep_ms)
  remaining = math.floor((now - allow_at) / interval + 1e-6)
  reset = math.ceil(next_tat - now)
end
if ARGV[4] == '1' then
  used = used + 1
  redis.call('SET', KEYS[2], used, 'EX', ARGV[7])
end
return {0, used, remaining, reset}
";

/// A quota count outlives its period by this much, so that a gateway whose clock is a
/// little behind still finds it.
const QUOTA_TTL_SLACK: i64 = 3600;
/// A `total` quota's count expires after this long unused.
const TOTAL_QUOTA_TTL: i64 = 30 * 86_400;

pub(crate) struct RedisLimits {
    client: redis::Client,
    /// Made on first use, on the runtime of a request: the connection's tasks must live
    /// on a runtime that lives as long as the gateway (the start-up one does not).
    connection: OnceLock<ConnectionManager>,
    decide: Script,
    timeout: Duration,
    on_error: OnLimitError,
    metrics: Arc<Metrics>,
    /// The second of the last error logged.
    last_logged: AtomicI64,
}

/// A rate to check: the limit and the Redis key of its budget.
struct RateCheck {
    limit: RateLimit,
    budget_key: String,
}

/// A quota to spend: its Redis key and what the count starts from if Redis has none.
struct QuotaCheck {
    quota: Quota,
    count_key: String,
    seed: u64,
    ttl: i64,
}

/// Why Redis gave no decision.
enum Failure {
    Timeout,
    Error(RedisError),
}

impl RedisLimits {
    /// Connects lazily: a gateway starts while Redis is down, and its limited keys get
    /// `on_error` until Redis answers.
    pub(crate) fn new(
        url: &str,
        timeout: Duration,
        on_error: OnLimitError,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RedisError> {
        Ok(RedisLimits {
            client: redis::Client::open(url)?,
            connection: OnceLock::new(),
            decide: Script::new(DECIDE),
            timeout,
            on_error,
            metrics,
            last_logged: AtomicI64::new(0),
        })
    }

    fn connection(&self) -> Result<ConnectionManager, Failure> {
        if let Some(connection) = self.connection.get() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(self.timeout))
            .set_max_delay(Duration::from_secs(1));
        let made = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(Failure::Error)?;
        Ok(self.connection.get_or_init(|| made).clone())
    }

    /// The key's rate limit on `budget` and its quota (at `stamp`), in one round trip.
    pub(crate) async fn spend(
        &self,
        key: &CachedKey,
        limit: Option<(RateLimit, Budget)>,
        quota: Option<(Quota, i64)>,
        now: i64,
    ) -> Verdict {
        let rate = limit.map(|(limit, budget)| RateCheck {
            limit,
            budget_key: format!(
                "kg:r:{}:{}:{}/{}",
                key.id,
                budget_tag(budget),
                limit.requests,
                limit.window_seconds
            ),
        });
        let quota = quota.map(|(quota, stamp)| QuotaCheck {
            quota,
            count_key: count_key(&key.id, stamp),
            seed: key.quota_seed.used_in(stamp),
            ttl: quota_ttl(quota.period, now),
        });
        match self.run(rate.as_ref(), quota.as_ref()).await {
            Ok(answer) => verdict(answer, rate.as_ref(), quota.as_ref(), now),
            Err(failure) => self.failed(failure),
        }
    }

    /// One call of `who`'s management `budget`: Ok to go ahead, else the refusal.
    pub(crate) async fn spend_management(
        &self,
        budget: ManagementBudget,
        limit: RateLimit,
        who: &str,
    ) -> Verdict {
        let rate = RateCheck {
            limit,
            budget_key: format!("kg:m:{}:{who}", budget.label()),
        };
        match self.run(Some(&rate), None).await {
            Ok(answer) => verdict(answer, Some(&rate), None, 0),
            Err(failure) => self.failed(failure),
        }
    }

    /// The counts Redis holds for `count_keys` (None where it holds none).
    pub(crate) async fn quota_counts(&self, count_keys: &[String]) -> Option<Vec<Option<u64>>> {
        if count_keys.is_empty() {
            return Some(Vec::new());
        }
        let mut connection = match self.connection() {
            Ok(connection) => connection,
            Err(failure) => {
                self.failed(failure);
                return None;
            }
        };
        let mut mget = redis::cmd("MGET");
        mget.arg(count_keys);
        let read = mget.query_async::<Vec<Option<u64>>>(&mut connection);
        match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(counts)) if counts.len() == count_keys.len() => Some(counts),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                self.failed(Failure::Error(e));
                None
            }
            Err(_) => {
                self.failed(Failure::Timeout);
                None
            }
        }
    }

    async fn run(
        &self,
        rate: Option<&RateCheck>,
        quota: Option<&QuotaCheck>,
    ) -> Result<[i64; 4], Failure> {
        // Both slots always name a key (Redis scripts declare what they touch); an unused
        // one repeats the other.
        let (rate_key, count_key) = match (rate, quota) {
            (Some(r), Some(q)) => (r.budget_key.as_str(), q.count_key.as_str()),
            (Some(r), None) => (r.budget_key.as_str(), r.budget_key.as_str()),
            (None, Some(q)) => (q.count_key.as_str(), q.count_key.as_str()),
            (None, None) => return Ok([0; 4]),
        };
        let (interval_us, window_us) = rate.map_or((0.0, 0.0), |r| {
            let window = f64::from(r.limit.window_seconds.max(1)) * 1_000_000.0;
            // Below 1 µs an interval is lost in a double of µs since 1970: limits faster
            // than 10^6 a second are held to 10^6 a second.
            let interval = (window / f64::from(r.limit.requests.max(1))).max(1.0);
            (interval, window)
        });
        let mut invocation = self.decide.key(rate_key);
        invocation
            .key(count_key)
            .arg(u8::from(rate.is_some()))
            .arg(interval_us)
            .arg(window_us)
            .arg(u8::from(quota.is_some()))
            .arg(quota.map_or(0, |q| q.quota.requests))
            .arg(quota.map_or(0, |q| q.seed))
            .arg(quota.map_or(1, |q| q.ttl));
        let mut connection = self.connection()?;
        let started = Instant::now();
        let answer = tokio::time::timeout(
            self.timeout,
            invocation.invoke_async::<(i64, i64, i64, i64)>(&mut connection),
        )
        .await;
        self.metrics
            .ratelimit_backend_duration
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok((status, used, a, b))) => Ok([status, used, a, b]),
            Ok(Err(e)) => Err(Failure::Error(e)),
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// Counts the failure and decides by `on_error`.
    fn failed(&self, failure: Failure) -> Verdict {
        let reason = match failure {
            Failure::Timeout => "timeout",
            Failure::Error(e) => {
                // At most one line a second: an outage fails every limited request.
                let second = crate::clock::unix_now();
                if self.last_logged.swap(second, Ordering::Relaxed) != second {
                    tracing::warn!(error = %e, "Redis did not decide a limit (logged once a second)");
                }
                "error"
            }
        };
        self.metrics
            .ratelimit_backend_errors
            .with_label_values(&[reason])
            .inc();
        match self.on_error {
            OnLimitError::Allow => Verdict::Admitted {
                rate: None,
                quota_remaining: None,
            },
            OnLimitError::Deny => Verdict::Unavailable,
        }
    }
}

/// The script's answer `[status, quota used, a, b]` as a verdict: status 0 admitted (a:
/// rate remaining, b: µs to a full burst), 1 rate-limited (a: µs until admitted, b: µs to
/// a full burst), 2 quota spent.
fn verdict(
    [status, used, a, b]: [i64; 4],
    rate: Option<&RateCheck>,
    quota: Option<&QuotaCheck>,
    now: i64,
) -> Verdict {
    let seconds = |us: i64| u64::try_from(us).unwrap_or(0).div_ceil(1_000_000);
    let limit = rate.map_or(0, |r| r.limit.requests);
    match status {
        2 => Verdict::QuotaExhausted {
            retry_after: quota.and_then(|q| super::quota::retry_after(q.quota.period, now)),
        },
        1 => Verdict::RateLimited(Decision::Limited {
            limit,
            retry_after: seconds(a).max(1),
            reset: seconds(b),
        }),
        _ => Verdict::Admitted {
            rate: rate.map(|_| Decision::Allowed {
                limit,
                remaining: u32::try_from(a).unwrap_or(0),
                reset: seconds(b),
            }),
            quota_remaining: quota.map(|q| {
                q.quota
                    .requests
                    .saturating_sub(u64::try_from(used).unwrap_or(0))
            }),
        },
    }
}

fn budget_tag(budget: Budget) -> String {
    match budget {
        Budget::Key => "k".to_string(),
        Budget::Route(id) => format!("r{id:x}"),
    }
}

/// Seconds a quota count at `now` is kept.
fn quota_ttl(period: QuotaPeriod, now: i64) -> i64 {
    period
        .end(now)
        .map_or(TOTAL_QUOTA_TTL, |end| end - now + QUOTA_TTL_SLACK)
}

/// Redis's key for a quota count of key `id` at `stamp`.
pub(crate) fn count_key(id: &str, stamp: i64) -> String {
    format!("kg:q:{id}:{stamp}")
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command, Stdio};

    use super::*;
    use crate::keys::{KeyFormat, KeyRecord, QuotaUsage, quota_stamp};

    const MIDNIGHT: i64 = 1_796_083_200; // 2026-12-01T00:00:00Z

    /// A throwaway redis-server on a free loopback port; killed on drop.
    struct Server(Child, u16);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start_redis() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: run `bash .ci/setup`");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Server(child, port)
    }

    fn limits(server: &Server) -> RedisLimits {
        let url = format!("redis://127.0.0.1:{}/0", server.1);
        let metrics = Arc::new(Metrics::new());
        RedisLimits::new(&url, Duration::from_secs(2), OnLimitError::Deny, metrics).expect("url")
    }

    fn key_with(quota: Option<Quota>, seed: QuotaUsage) -> CachedKey {
        let format = KeyFormat::new("kg");
        let raw = format.generate().expect("rng");
        let mut record = KeyRecord::for_key(&format, &raw, "alice", 0);
        record.quota = quota;
        let mut key = CachedKey::from_record(&record).expect("cached");
        key.quota_seed = seed;
        key
    }

    /// The period is the caller's clock (`now`), so a day's end is tested without waiting
    /// for it: the count of the day before midnight is not the count after it.
    #[tokio::test]
    async fn a_day_quota_in_redis_starts_from_the_seed_and_is_full_again_after_utc_midnight() {
        let server = start_redis();
        let redis = limits(&server);
        let quota = Quota {
            requests: 3,
            period: QuotaPeriod::Day,
        };
        let before = MIDNIGHT - 10;
        let stamp = |now| quota_stamp(0, QuotaPeriod::Day, now);
        let seed = QuotaUsage {
            stamp: stamp(before),
            used: 1,
        };
        let key = key_with(Some(quota), seed);
        let spend = |now: i64| redis.spend(&key, None, Some((quota, stamp(now))), now);
        for left in [1, 0] {
            let admitted = Verdict::Admitted {
                rate: None,
                quota_remaining: Some(left),
            };
            assert_eq!(spend(before).await, admitted);
        }
        let spent = Verdict::QuotaExhausted {
            retry_after: Some(10),
        };
        assert_eq!(spend(before).await, spent);
        let admitted = Verdict::Admitted {
            rate: None,
            quota_remaining: Some(2),
        };
        assert_eq!(spend(MIDNIGHT).await, admitted, "a new day, no seed for it");
    }

    #[tokio::test]
    async fn a_rate_in_redis_admits_its_burst_then_refuses_with_a_retry_after() {
        let server = start_redis();
        let redis = limits(&server);
        let key = key_with(None, QuotaUsage::default());
        let limit = RateLimit {
            requests: 3,
            window_seconds: 60,
        };
        for remaining in [2, 1, 0] {
            match redis.spend(&key, Some((limit, Budget::Key)), None, 0).await {
                Verdict::Admitted {
                    rate:
                        Some(Decision::Allowed {
                            limit: 3,
                            remaining: r,
                            reset,
                        }),
                    quota_remaining: None,
                } => assert_eq!((r, reset <= 60), (remaining, true)),
                other => panic!("expected admitted, got {other:?}"),
            }
        }
        match redis.spend(&key, Some((limit, Budget::Key)), None, 0).await {
            Verdict::RateLimited(Decision::Limited { retry_after, .. }) => {
                assert!((1..=20).contains(&retry_after), "{retry_after}");
            }
            other => panic!("expected limited, got {other:?}"),
        }
        let fastest = RateLimit {
            requests: RateLimit::MAX_REQUESTS,
            window_seconds: 1,
        };
        for _ in 0..3 {
            let verdict = redis
                .spend(&key, Some((fastest, Budget::Key)), None, 0)
                .await;
            assert!(
                matches!(verdict, Verdict::Admitted { rate: Some(_), .. }),
                "{verdict:?}"
            );
        }
        let route = Budget::Route(7);
        let other_budget = redis.spend(&key, Some((limit, route)), None, 0).await;
        assert!(
            matches!(other_budget, Verdict::Admitted { .. }),
            "a route's budget is its own"
        );
    }
}
