//! Prometheus metrics in a registry keygate owns (not the crate's global one), so that
//! `/metrics` shows exactly keygate's families. Labels are bounded: route names, outcomes,
//! status classes; never a key, a key id or a raw path.

use prometheus::core::Collector;
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
    pub invalidation_listener_connected: IntGauge,
    pub websocket_tunnels: IntGauge,
    pub websocket_tunnels_closed: IntCounterVec,
    pub key_filter_ready: IntGauge,
    pub tls_handshake_errors: IntCounterVec,
    pub tls_certificate_expiry: IntGauge,
    pub downstream_requests: IntCounterVec,
    /// `downstream_requests`' series, resolved once (they are counted per request).
    pub by_protocol: [IntCounter; PROTOCOLS.len()],
    pub build_info: IntGaugeVec,
    pub dns_failures: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_successful: IntGauge,
    pub config_last_reload_success: IntGauge,
    pub ratelimit_backend_errors: IntCounterVec,
    pub ratelimit_backend_duration: Histogram,
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

/// Name and help text of each family.
type Family = (&'static str, &'static str);

const REQUESTS: Family = (
    "keygate_requests_total",
    "Requests by route and auth outcome",
);
const REQUEST_DURATION: Family = (
    "keygate_request_duration_seconds",
    "Time from request to response, per route",
);
const AUTH_DURATION: Family = (
    "keygate_auth_duration_seconds",
    "Time spent deciding whether a request's key is admitted",
);
const UPSTREAM_RESPONSES: Family = (
    "keygate_upstream_responses_total",
    "Upstream responses by route and status class",
);
const UPSTREAM_HEALTHY: Family = (
    "keygate_upstream_healthy",
    "1 when the upstream passes its health check",
);
const CACHE_LOOKUPS: Family = (
    "keygate_key_cache_lookups_total",
    "Key cache look-ups by result",
);
const STORE_READS: Family = (
    "keygate_store_reads_total",
    "Key look-ups that reached the store (cache misses)",
);
const KEYS: Family = ("keygate_keys", "Keys in the store, revoked ones included");
const USAGE_PENDING: Family = (
    "keygate_usage_pending",
    "Keys with usage counts not yet written to the store",
);
const USAGE_FLUSH_DURATION: Family = (
    "keygate_usage_flush_duration_seconds",
    "Duration of successful usage flushes",
);
const USAGE_FLUSH_ERRORS: Family = (
    "keygate_usage_flush_errors_total",
    "Usage flushes that failed (their counts are retried)",
);
const MANAGEMENT_REQUESTS: Family = (
    "keygate_management_requests_total",
    "Management API calls by operation and status",
);
const INVALIDATION_LISTENER_CONNECTED: Family = (
    "keygate_invalidation_listener_connected",
    "1 while the cache invalidation listener LISTENs on PostgreSQL, else 0 (always 0 on sled). \
     A silently dead connection is noticed within 10 s (heartbeat 5 s + its timeout 5 s); \
     revokes made meanwhile by other instances reach this cache when it reconnects",
);
const WEBSOCKET_TUNNELS: Family = (
    "keygate_websocket_tunnels",
    "WebSocket tunnels open through keygate",
);
const WEBSOCKET_TUNNELS_CLOSED: Family = (
    "keygate_websocket_tunnels_closed_total",
    "WebSocket tunnels keygate closed because their key was revoked or expired",
);
const KEY_FILTER_READY: Family = (
    "keygate_key_filter_ready",
    "1 while the filter of stored key hashes is trusted to refuse unknown keys without a \
     store read; 0 until it is built and while it is rebuilt after missed notifications",
);
const TLS_HANDSHAKE_ERRORS: Family = (
    "keygate_tls_handshake_errors_total",
    "Connections to a TLS listener that never completed a handshake, by reason: `failed` \
     (the client or keygate refused the other's parameters or certificate), `timeout` (not \
     complete within header_read_timeout_seconds), `plaintext` (plain HTTP sent to the TLS port)",
);
const TLS_CERTIFICATE_EXPIRY: Family = (
    "keygate_tls_certificate_expiry_timestamp_seconds",
    "When the certificate `listen` serves expires (Unix seconds); 0 without [server.tls]. \
     Unchanged after a reload means the reload kept the old certificate",
);
const DOWNSTREAM_REQUESTS: Family = (
    "keygate_downstream_requests_total",
    "Requests on the proxy listener by client protocol (`http/1.0`, `http/1.1`, `h2`)",
);
/// The `reason` values of `keygate_tls_handshake_errors_total`.
pub(crate) const HANDSHAKE_ERROR_REASONS: [&str; 3] = ["failed", "timeout", "plaintext"];
/// The `protocol` values of `keygate_downstream_requests_total`.
pub(crate) const PROTOCOLS: [&str; 3] = ["http/1.0", "http/1.1", "h2"];
const BUILD_INFO: Family = ("keygate_build_info", "Build information");
const DNS_FAILURES: Family = (
    "keygate_upstream_dns_failures_total",
    "Resolutions of an upstream host name that failed; the upstream kept its last addresses",
);
const CONFIG_RELOADS: Family = (
    "keygate_config_reloads_total",
    "Configuration reloads (SIGHUP or POST /-/reload) by result (`success`, `failure`)",
);
const CONFIG_LAST_RELOAD_SUCCESSFUL: Family = (
    "keygate_config_last_reload_successful",
    "1 when the last reload applied the file (or none was tried yet), 0 when it was refused",
);
const CONFIG_LAST_RELOAD_SUCCESS: Family = (
    "keygate_config_last_reload_success_timestamp_seconds",
    "When the configuration in force was applied (Unix seconds): the start, or the last good reload",
);
const RATELIMIT_BACKEND_ERRORS: Family = (
    "keygate_ratelimit_backend_errors_total",
    "Limit and quota decisions Redis did not answer, by reason (`timeout`: not within \
     ratelimit.timeout_ms; `error`: down, refused or failed); on_error decided them",
);
const RATELIMIT_BACKEND_DURATION: Family = (
    "keygate_ratelimit_redis_duration_seconds",
    "Round trips to Redis for limit and quota decisions, answered or not",
);
/// The `reason` values of `keygate_ratelimit_backend_errors_total`.
pub(crate) const BACKEND_ERROR_REASONS: [&str; 2] = ["timeout", "error"];
/// The `result` values of `keygate_config_reloads_total`.
pub(crate) const RELOAD_RESULTS: [&str; 2] = ["success", "failure"];

/// Series that exist from the start (at 0), so rate() works before the first call.
const MANAGEMENT_SERIES: [(&str, &str); 13] = [
    ("create", "201"),
    ("list", "200"),
    ("get", "200"),
    ("revoke", "200"),
    ("revoke_by_value", "200"),
    ("rotate", "201"),
    ("update", "200"),
    ("refill_quota", "200"),
    ("audit", "200"),
    ("signup", "201"),
    ("openapi", "200"),
    ("verify", "200"),
    // The console's files: loaded without credentials, never an API call.
    ("console", "200"),
];

/// Registers `metric` in `registry`. The names are literals of this file, so a failure is
/// a programming error that the first test building `Metrics` catches.
fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn counter(registry: &Registry, family: Family) -> IntCounter {
    register(registry, IntCounter::with_opts(opts(family)))
}

fn counter_vec(registry: &Registry, family: Family, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(opts(family), labels))
}

fn gauge(registry: &Registry, family: Family) -> IntGauge {
    register(registry, IntGauge::with_opts(opts(family)))
}

fn gauge_vec(registry: &Registry, family: Family, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(opts(family), labels))
}

fn opts((name, help): Family) -> Opts {
    Opts::new(name, help)
}

fn histogram_opts((name, help): Family, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let downstream_requests: IntCounterVec =
            counter_vec(&r, DOWNSTREAM_REQUESTS, &["protocol"]);
        let by_protocol = PROTOCOLS.map(|p| downstream_requests.with_label_values(&[p]));
        let metrics = Metrics {
            requests: counter_vec(&r, REQUESTS, &["route", "outcome"]),
            request_duration: register(
                &r,
                HistogramVec::new(
                    histogram_opts(REQUEST_DURATION, LATENCY_BUCKETS),
                    &["route"],
                ),
            ),
            auth_duration: register(
                &r,
                Histogram::with_opts(histogram_opts(AUTH_DURATION, AUTH_BUCKETS)),
            ),
            upstream_responses: counter_vec(&r, UPSTREAM_RESPONSES, &["route", "status_class"]),
            upstream_healthy: gauge_vec(&r, UPSTREAM_HEALTHY, &["route", "upstream"]),
            cache_lookups: counter_vec(&r, CACHE_LOOKUPS, &["result"]),
            store_reads: counter(&r, STORE_READS),
            keys: gauge(&r, KEYS),
            usage_pending: gauge(&r, USAGE_PENDING),
            usage_flush_duration: register(
                &r,
                Histogram::with_opts(histogram_opts(USAGE_FLUSH_DURATION, LATENCY_BUCKETS)),
            ),
            usage_flush_errors: counter(&r, USAGE_FLUSH_ERRORS),
            management_requests: counter_vec(&r, MANAGEMENT_REQUESTS, &["operation", "status"]),
            invalidation_listener_connected: gauge(&r, INVALIDATION_LISTENER_CONNECTED),
            websocket_tunnels: gauge(&r, WEBSOCKET_TUNNELS),
            websocket_tunnels_closed: counter_vec(&r, WEBSOCKET_TUNNELS_CLOSED, &["reason"]),
            key_filter_ready: gauge(&r, KEY_FILTER_READY),
            tls_handshake_errors: counter_vec(&r, TLS_HANDSHAKE_ERRORS, &["reason"]),
            tls_certificate_expiry: gauge(&r, TLS_CERTIFICATE_EXPIRY),
            downstream_requests,
            by_protocol,
            build_info: gauge_vec(&r, BUILD_INFO, &["version"]),
            dns_failures: counter_vec(&r, DNS_FAILURES, &["route", "upstream"]),
            config_reloads: counter_vec(&r, CONFIG_RELOADS, &["result"]),
            config_last_reload_successful: gauge(&r, CONFIG_LAST_RELOAD_SUCCESSFUL),
            config_last_reload_success: gauge(&r, CONFIG_LAST_RELOAD_SUCCESS),
            ratelimit_backend_errors: counter_vec(&r, RATELIMIT_BACKEND_ERRORS, &["reason"]),
            ratelimit_backend_duration: register(
                &r,
                Histogram::with_opts(histogram_opts(RATELIMIT_BACKEND_DURATION, AUTH_BUCKETS)),
            ),
            registry: r,
        };
        metrics.start_series();
        metrics
    }

    /// Series that exist from the start (at 0), so that rate() works before the first event.
    fn start_series(&self) {
        let metrics = self;
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for reason in [CloseReason::Revoked, CloseReason::Expired] {
            metrics
                .websocket_tunnels_closed
                .with_label_values(&[reason.label()]);
        }
        for reason in HANDSHAKE_ERROR_REASONS {
            metrics.tls_handshake_errors.with_label_values(&[reason]);
        }
        for (operation, status) in MANAGEMENT_SERIES {
            metrics
                .management_requests
                .with_label_values(&[operation, status]);
        }
        for reason in BACKEND_ERROR_REASONS {
            metrics
                .ratelimit_backend_errors
                .with_label_values(&[reason]);
        }
        for result in RELOAD_RESULTS {
            metrics.config_reloads.with_label_values(&[result]);
        }
        metrics.config_last_reload_successful.set(1);
    }

    /// Counts a reload; a good one also dates the configuration in force.
    pub(crate) fn count_reload(&self, applied: bool, now: i64) {
        self.config_reloads
            .with_label_values(&[RELOAD_RESULTS[usize::from(!applied)]])
            .inc();
        self.config_last_reload_successful.set(i64::from(applied));
        if applied {
            self.config_last_reload_success.set(now);
        }
    }

    /// Counts a request on the proxy listener by its HTTP version; returns the label.
    pub(crate) fn count_protocol(&self, version: http::Version) -> &'static str {
        let index = match version {
            http::Version::HTTP_2 => 2,
            http::Version::HTTP_10 | http::Version::HTTP_09 => 0,
            _ => 1,
        };
        self.by_protocol[index].inc();
        PROTOCOLS[index]
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// A route's counters resolved once at start-up, so the request path never looks up a
/// label set (which takes the metric family's lock and hashes the labels).
pub(crate) struct RouteMetrics {
    outcomes: [IntCounter; OUTCOMES.len()],
    pub duration: Histogram,
    status_classes: [IntCounter; 5],
}

const OUTCOMES: [Outcome; 13] = [
    Outcome::Allowed,
    Outcome::MissingCredentials,
    Outcome::InvalidKey,
    Outcome::KeyExpired,
    Outcome::InsufficientScope,
    Outcome::IpNotAllowed,
    Outcome::RateLimited,
    Outcome::QuotaExhausted,
    Outcome::RateLimitUnavailable,
    Outcome::StoreUnavailable,
    Outcome::BadRequest,
    Outcome::NoRoute,
    Outcome::Public,
];

impl RouteMetrics {
    pub(crate) fn new(metrics: &Metrics, route: &str) -> Self {
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

    pub(crate) fn count(&self, outcome: Outcome) {
        let index = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
        self.outcomes[index].inc();
    }

    pub(crate) fn upstream_status(&self, status: u16) {
        let index = usize::from((status / 100).clamp(1, 5) - 1);
        self.status_classes[index].inc();
    }
}

/// Cache look-up counters, resolved once.
pub(crate) struct CacheMetrics {
    pub hit: IntCounter,
    pub miss: IntCounter,
    pub negative_hit: IntCounter,
}

impl CacheMetrics {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        CacheMetrics {
            hit: metrics.cache_lookups.with_label_values(&["hit"]),
            miss: metrics.cache_lookups.with_label_values(&["miss"]),
            negative_hit: metrics.cache_lookups.with_label_values(&["negative_hit"]),
        }
    }
}

/// The `outcome` label values of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Outcome {
    #[default]
    Allowed,
    MissingCredentials,
    InvalidKey,
    KeyExpired,
    InsufficientScope,
    IpNotAllowed,
    RateLimited,
    QuotaExhausted,
    RateLimitUnavailable,
    StoreUnavailable,
    BadRequest,
    NoRoute,
    Public,
}

impl Outcome {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::MissingCredentials => "missing_credentials",
            Outcome::InvalidKey => "invalid_key",
            Outcome::KeyExpired => "key_expired",
            Outcome::InsufficientScope => "insufficient_scope",
            Outcome::IpNotAllowed => "ip_not_allowed",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExhausted => "quota_exhausted",
            Outcome::RateLimitUnavailable => "rate_limit_unavailable",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::BadRequest => "bad_request",
            Outcome::NoRoute => "no_route",
            Outcome::Public => "public",
        }
    }
}

/// Why keygate closed a WebSocket tunnel (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    Revoked,
    Expired,
}

impl CloseReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            CloseReason::Revoked => "revoked",
            CloseReason::Expired => "expired",
        }
    }
}
