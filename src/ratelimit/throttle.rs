//! The per-client throttle on wrong credentials, and the address a per-client limit
//! counts against.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
