//! Prometheus metrics in a registry keygate owns (not the crate's global one), so that
//! `/metrics` shows exactly keygate's families. Labels are bounded: route names, outcomes,
//! status classes; never a key, a key id or a raw path.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub auth_duration: Histogram,
    pub upstream_responses: IntCounterVec,
    pub upstream_healthy: IntGaugeVec,
    pub cache_lookups: IntCounterVec,
    pub store_reads: IntCounter,
    pub keys: IntGauge,
    pub usage_pending: IntGauge,
    pub usage_flush_duration: Histogram,
    pub usage_flush_errors: IntCounter,
    pub management_requests: IntCounterVec,
    pub build_info: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const AUTH_BUCKETS: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.005,
    0.01,
    0.05,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };

        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_request_duration_seconds",
                "Time from request to response, per route",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_duration.clone()))
            .expect("unique metric");

        let metrics = Metrics {
            requests: counter_vec(
                "keygate_requests_total",
                "Requests by route and auth outcome",
                &["route", "outcome"],
            ),
            request_duration,
            auth_duration: histogram(
                "keygate_auth_duration_seconds",
                "Time spent deciding whether a request's key is admitted",
                AUTH_BUCKETS,
            ),
            upstream_responses: counter_vec(
                "keygate_upstream_responses_total",
                "Upstream responses by route and status class",
                &["route", "status_class"],
            ),
            upstream_healthy: gauge_vec(
                "keygate_upstream_healthy",
                "1 when the upstream passes its health check",
                &["route", "upstream"],
            ),
            cache_lookups: counter_vec(
                "keygate_key_cache_lookups_total",
                "Key cache look-ups by result",
                &["result"],
            ),
            store_reads: counter(
                "keygate_store_reads_total",
                "Key look-ups that reached the store (cache misses)",
            ),
            keys: gauge("keygate_keys", "Keys in the store, revoked ones included"),
            usage_pending: gauge(
                "keygate_usage_pending",
                "Keys with usage counts not yet written to the store",
            ),
            usage_flush_duration: histogram(
                "keygate_usage_flush_duration_seconds",
                "Duration of successful usage flushes",
                LATENCY_BUCKETS,
            ),
            usage_flush_errors: counter(
                "keygate_usage_flush_errors_total",
                "Usage flushes that failed (their counts are retried)",
            ),
            management_requests: counter_vec(
                "keygate_management_requests_total",
                "Management API calls by operation and status",
                &["operation", "status"],
            ),
            build_info: gauge_vec("keygate_build_info", "Build information", &["version"]),
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Series exist from the start (at 0), so rate() works before the first call.
        for (operation, status) in [
            ("create", "201"),
            ("list", "200"),
            ("get", "200"),
            ("revoke", "200"),
            ("revoke_by_value", "200"),
            ("rotate", "201"),
            ("audit", "200"),
            ("signup", "201"),
            ("openapi", "200"),
        ] {
            metrics
                .management_requests
                .with_label_values(&[operation, status]);
        }
        metrics
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// `2xx`, `3xx`, ... for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// A route's counters resolved once at start-up, so the request path never looks up a
/// label set (which takes the metric family's lock and hashes the labels).
pub struct RouteMetrics {
    outcomes: [IntCounter; OUTCOMES.len()],
    pub duration: Histogram,
    status_classes: [IntCounter; 5],
}

const OUTCOMES: [Outcome; 10] = [
    Outcome::Allowed,
    Outcome::MissingCredentials,
    Outcome::InvalidKey,
    Outcome::KeyExpired,
    Outcome::InsufficientScope,
    Outcome::RateLimited,
    Outcome::StoreUnavailable,
    Outcome::BadRequest,
    Outcome::NoRoute,
    Outcome::Public,
];

use crate::error::Outcome;

impl RouteMetrics {
    pub fn new(metrics: &Metrics, route: &str) -> Self {
        RouteMetrics {
            outcomes: OUTCOMES.map(|o| metrics.requests.with_label_values(&[route, o.label()])),
            duration: metrics.request_duration.with_label_values(&[route]),
            status_classes: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
                metrics
                    .upstream_responses
                    .with_label_values(&[route, class])
            }),
        }
    }

    pub fn count(&self, outcome: Outcome) {
        let index = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
        self.outcomes[index].inc();
    }

    pub fn upstream_status(&self, status: u16) {
        let index = usize::from((status / 100).clamp(1, 5) - 1);
        self.status_classes[index].inc();
    }
}

/// Cache look-up counters, resolved once.
pub struct CacheMetrics {
    pub hit: IntCounter,
    pub miss: IntCounter,
    pub negative_hit: IntCounter,
}

impl CacheMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        CacheMetrics {
            hit: metrics.cache_lookups.with_label_values(&["hit"]),
            miss: metrics.cache_lookups.with_label_values(&["miss"]),
            negative_hit: metrics.cache_lookups.with_label_values(&["negative_hit"]),
        }
    }
}
