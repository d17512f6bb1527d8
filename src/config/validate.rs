//! The raw file onto the typed `Config`, one function per section. Each records every
//! problem it finds (with its field path) and goes on with a stand-in value, so that one
//! mistake never hides the next.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{
    RawConfig, RawKeys, RawLimitBackend, RawManagement, RawServer, RawSignup, RawStore,
};
use super::resolve::load_ca_file;
use super::route::{SeenRoutes, validate_route};
use super::tls::validate_tls;
use super::{
    AccessLog, Config, ConfigProblem, ConsoleConfig, KeysConfig, LimitBackend, ManagementConfig,
    ManagementLimits, OnLimitError, ServerConfig, SignupConfig, StoreBackend, StoreConfig,
};

/// Longest scope, route name and key prefix, in bytes (all ASCII).
pub(super) const MAX_SCOPE_LEN: usize = 64;
pub(super) const MAX_ROUTE_NAME_LEN: usize = 64;
const MAX_KEY_PREFIX_LEN: usize = 16;
/// Bounds of the management and sign-up limits (calls per hour or per minute).
const MANAGEMENT_LIMIT: RangeInclusive<i64> = 1..=1_000_000;
/// Bounds of the second-counted server timeouts.
const SERVER_TIMEOUT_SECONDS: RangeInclusive<i64> = 1..=3600;
/// Bounds of the cache capacities and the cache lifetimes.
const CACHE_CAPACITY: RangeInclusive<i64> = 1..=100_000_000;
const CACHE_TTL_SECONDS: RangeInclusive<i64> = 1..=86_400;
/// Upper bound of the millisecond-counted intervals and timeouts: one hour.
pub(super) const MAX_INTERVAL_MS: i64 = 3_600_000;
/// A miss waiting longer than this for a store read slot is better answered 503.
const MAX_READ_WAIT_MS: i64 = 60_000;
const DEFAULT_SLED_READS: usize = 64;

/// The collector that reading and every section write their problems into.
#[derive(Debug, Default)]
pub(super) struct Problems {
    found: Vec<ConfigProblem>,
    /// Fields that could not be read (wrong type, missing). Validation sees a stand-in
    /// there, so nothing more is said about them or anything under them.
    unreadable: Vec<String>,
}

impl Problems {
    pub(super) fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        let path = path.into();
        if self
            .unreadable
            .iter()
            .any(|field| is_at_or_under(&path, field))
        {
            return;
        }
        self.found.push(ConfigProblem {
            path,
            reason: reason.into(),
        });
    }

    /// A field whose value could not be read: reported, and silenced from then on.
    pub(super) fn unreadable(&mut self, path: String, reason: impl Into<String>) {
        self.found.push(ConfigProblem {
            path: path.clone(),
            reason: reason.into(),
        });
        self.unreadable.push(path);
    }

    pub(super) fn into_vec(self) -> Vec<ConfigProblem> {
        self.found
    }

    /// `value` if it lies in `bounds`; otherwise a problem, and the lower bound (at least 0).
    pub(super) fn ranged(&mut self, path: &str, value: i64, bounds: RangeInclusive<i64>) -> u64 {
        let (min, max) = (*bounds.start(), *bounds.end());
        if bounds.contains(&value) {
            value as u64
        } else {
            self.add(
                path,
                format!("must be between {min} and {max}, got {value}"),
            );
            min.max(0) as u64
        }
    }

    fn socket_addr(&mut self, path: &str, value: &str) -> SocketAddr {
        match value.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                self.add(
                    path,
                    format!("`{value}` is not an IP address with a port, e.g. 127.0.0.1:8080"),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }
}

/// Whether `path` names `field` or something inside it (`field.x`, `field[0]`).
fn is_at_or_under(path: &str, field: &str) -> bool {
    path.strip_prefix(field)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

pub(super) fn validate(raw: RawConfig, p: &mut Problems) -> Config {
    let server = validate_server(raw.server, p);
    let store = validate_store(raw.store, p);
    let keys = validate_keys(raw.keys, p);
    let management = validate_management(raw.management, p);
    let signup = validate_signup(raw.signup, p);
    let console = ConsoleConfig {
        enabled: raw.console.enabled,
    };
    let ratelimit = validate_limit_backend(raw.ratelimit, p);
    if raw.routes.is_empty() {
        p.add("routes", "at least one [[routes]] entry is needed");
    }
    let mut seen = SeenRoutes::default();
    let routes = raw
        .routes
        .into_iter()
        .enumerate()
        .map(|(i, route)| validate_route(i, route, &mut seen, p))
        .collect();
    Config {
        server,
        store,
        keys,
        management,
        signup,
        console,
        ratelimit,
        routes,
    }
}

fn validate_limit_backend(raw: RawLimitBackend, p: &mut Problems) -> LimitBackend {
    let on_error = match raw.on_error.as_str() {
        "allow" => OnLimitError::Allow,
        "deny" => OnLimitError::Deny,
        other => {
            p.add(
                "ratelimit.on_error",
                format!("must be \"allow\" or \"deny\", got \"{other}\""),
            );
            OnLimitError::Allow
        }
    };
    let timeout =
        Duration::from_millis(p.ranged("ratelimit.timeout_ms", raw.timeout_ms, 1..=10_000));
    match raw.backend.as_str() {
        "local" => LimitBackend::Local,
        "redis" => {
            if raw.url_env.trim().is_empty() {
                p.add(
                    "ratelimit.url_env",
                    "the redis backend needs the name of the environment variable holding redis://host:port/db",
                );
            }
            LimitBackend::Redis {
                url_env: raw.url_env,
                timeout,
                on_error,
            }
        }
        other => {
            p.add(
                "ratelimit.backend",
                format!("must be \"local\" or \"redis\", got \"{other}\""),
            );
            LimitBackend::Local
        }
    }
}

fn validate_server(raw: RawServer, p: &mut Problems) -> ServerConfig {
    let listen = p.socket_addr("server.listen", &raw.listen);
    let admin_listen = p.socket_addr("server.admin_listen", &raw.admin_listen);
    if listen == admin_listen && listen.port() != 0 {
        p.add("server.admin_listen", "must differ from server.listen");
    }
    ServerConfig {
        listen,
        admin_listen,
        threads: p.ranged("server.threads", raw.threads, 1..=256) as usize,
        shutdown_grace: Duration::from_secs(p.ranged(
            "server.shutdown_grace_seconds",
            raw.shutdown_grace_seconds,
            0..=3600,
        )),
        access_log: match raw.access_log.as_str() {
            "off" => AccessLog::Off,
            "stdout" => AccessLog::Stdout,
            "" => {
                p.add(
                    "server.access_log",
                    "must be \"stdout\", \"off\" or a file path",
                );
                AccessLog::Off
            }
            path => AccessLog::File(PathBuf::from(path)),
        },
        keepalive_timeout: Duration::from_secs(p.ranged(
            "server.keepalive_timeout_seconds",
            raw.keepalive_timeout_seconds,
            SERVER_TIMEOUT_SECONDS,
        )),
        header_read_timeout: Duration::from_secs(p.ranged(
            "server.header_read_timeout_seconds",
            raw.header_read_timeout_seconds,
            SERVER_TIMEOUT_SECONDS,
        )),
        max_connections: p.ranged("server.max_connections", raw.max_connections, 1..=1_000_000)
            as usize,
        max_header_bytes: p.ranged(
            "server.max_header_bytes",
            raw.max_header_bytes,
            1024..=1024 * 1024,
        ) as usize,
        trusted_proxies: trusted_proxies(&raw.trusted_proxies, p),
        h2_max_concurrent_streams: p.ranged(
            "server.h2_max_concurrent_streams",
            raw.h2_max_concurrent_streams,
            1..=10_000,
        ) as u32,
        tls: validate_tls(raw.tls, p),
        dns_refresh: Duration::from_secs(p.ranged(
            "server.dns_refresh_seconds",
            raw.dns_refresh_seconds,
            1..=86_400,
        )),
        resolver: name_servers(&raw.resolver, p),
    }
}

/// `ip` or `ip:port` (port 53 by default).
fn name_servers(raw: &[String], p: &mut Problems) -> Vec<SocketAddr> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                text.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            if parsed.is_none() {
                p.add(
                    format!("server.resolver[{i}]"),
                    format!(
                        "`{text}` is not a name server address such as 127.0.0.53 or 10.0.0.2:53"
                    ),
                );
            }
            parsed
        })
        .collect()
}

/// CIDRs (`10.0.0.0/8`) or single addresses (`10.1.2.3`).
fn trusted_proxies(raw: &[String], p: &mut Problems) -> Vec<ipnet::IpNet> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => Some(net.trunc()),
                Err(_) => {
                    let reason = format!("`{text}` is not an IP address or CIDR, e.g. 10.0.0.0/8");
                    p.add(format!("server.trusted_proxies[{i}]"), reason);
                    None
                }
            }
        })
        .collect()
}

fn validate_store(raw: RawStore, p: &mut Problems) -> StoreConfig {
    let backend = store_backend(&raw, p);
    if raw.backend == "sled" {
        if raw.url_env.is_some() {
            p.add("store.url_env", "only used by the postgres backend");
        }
        if raw.ca_file.is_some() {
            p.add("store.ca_file", "only used by the postgres backend");
        }
    }
    let max_concurrent_reads = max_concurrent_reads(&raw, &backend, p);
    let cache_capacity = p.ranged("store.cache_capacity", raw.cache_capacity, CACHE_CAPACITY);
    StoreConfig {
        max_concurrent_reads,
        read_wait: Duration::from_millis(p.ranged(
            "store.read_wait_ms",
            raw.read_wait_ms,
            1..=MAX_READ_WAIT_MS,
        )),
        backend,
        cache_warm_keys: cache_warm_keys(raw.cache_warm_keys, cache_capacity, p),
        cache_capacity,
        cache_ttl: Duration::from_secs(p.ranged(
            "store.cache_ttl_seconds",
            raw.cache_ttl_seconds,
            CACHE_TTL_SECONDS,
        )),
        negative_cache_capacity: p.ranged(
            "store.negative_cache_capacity",
            raw.negative_cache_capacity,
            CACHE_CAPACITY,
        ),
        negative_cache_ttl: Duration::from_secs(p.ranged(
            "store.negative_cache_ttl_seconds",
            raw.negative_cache_ttl_seconds,
            CACHE_TTL_SECONDS,
        )),
        usage_flush_interval: Duration::from_millis(p.ranged(
            "store.usage_flush_interval_ms",
            raw.usage_flush_interval_ms,
            10..=MAX_INTERVAL_MS,
        )),
    }
}

/// More than the cache holds would only evict what the warm-up itself put in.
fn cache_warm_keys(value: Option<i64>, cache_capacity: u64, p: &mut Problems) -> u64 {
    let Some(value) = value else {
        return cache_capacity;
    };
    let max = i64::try_from(cache_capacity).unwrap_or(i64::MAX);
    if (0..=max).contains(&value) {
        value as u64
    } else {
        p.add(
            "store.cache_warm_keys",
            format!("must be between 0 and store.cache_capacity ({cache_capacity}), got {value}"),
        );
        0
    }
}

/// The default leaves PostgreSQL half its pool for the usage flusher and management calls;
/// sled has no pool, and its reads only occupy threads of the blocking pool.
fn max_concurrent_reads(raw: &RawStore, backend: &StoreBackend, p: &mut Problems) -> usize {
    let pool_size = match backend {
        StoreBackend::Postgres { pool_size, .. } => Some(*pool_size),
        StoreBackend::Sled { .. } => None,
    };
    let Some(value) = raw.max_concurrent_reads else {
        return pool_size.map_or(DEFAULT_SLED_READS, |pool| (pool / 2).max(1));
    };
    let reads = p.ranged("store.max_concurrent_reads", value, 1..=1024) as usize;
    if let Some(pool) = pool_size.filter(|pool| *pool > 1 && reads >= *pool) {
        p.add(
            "store.max_concurrent_reads",
            format!(
                "must be below store.pool_size ({pool}), so that usage flushes and management \
                 calls keep connections while cache misses wait"
            ),
        );
    }
    reads
}

fn store_backend(raw: &RawStore, p: &mut Problems) -> StoreBackend {
    match raw.backend.as_str() {
        "sled" => {
            if raw.path.trim().is_empty() {
                p.add("store.path", "must name a directory for the sled store");
            }
            StoreBackend::Sled {
                path: PathBuf::from(&raw.path),
            }
        }
        "postgres" => {
            let url_env = raw.url_env.clone().unwrap_or_default();
            if url_env.is_empty() {
                p.add(
                    "store.url_env",
                    "the postgres backend needs the name of the environment variable holding the connection string",
                );
            }
            StoreBackend::Postgres {
                url_env,
                pool_size: p.ranged("store.pool_size", raw.pool_size, 1..=1024) as usize,
                connect_timeout: Duration::from_secs(p.ranged(
                    "store.connect_timeout_seconds",
                    raw.connect_timeout_seconds,
                    1..=600,
                )),
                statement_timeout: Duration::from_millis(p.ranged(
                    "store.statement_timeout_ms",
                    raw.statement_timeout_ms,
                    1..=MAX_INTERVAL_MS,
                )),
                ca_certificates: store_ca_certificates(raw, p),
            }
        }
        other => {
            p.add(
                "store.backend",
                format!("must be \"sled\" or \"postgres\", got \"{other}\""),
            );
            StoreBackend::Sled {
                path: PathBuf::new(),
            }
        }
    }
}

fn validate_keys(raw: RawKeys, p: &mut Problems) -> KeysConfig {
    let prefix = raw.prefix;
    if prefix.is_empty()
        || prefix.len() > MAX_KEY_PREFIX_LEN
        || !prefix.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        p.add(
            "keys.prefix",
            format!("must be 1 to {MAX_KEY_PREFIX_LEN} characters of A-Za-z0-9"),
        );
    }
    let purge_revoked_after = raw.purge_revoked_after_days.map(|days| {
        let days = p.ranged("keys.purge_revoked_after_days", days, 1..=36_500);
        std::time::Duration::from_secs(days * 86_400)
    });
    KeysConfig {
        prefix,
        purge_revoked_after,
    }
}

fn validate_management(raw: RawManagement, p: &mut Problems) -> ManagementConfig {
    let path = raw.path;
    if !path.starts_with('/')
        || path.len() < 2
        || path.ends_with('/')
        || !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b))
        || path.split('/').any(|s| s == "." || s == "..")
    {
        p.add(
            "management.path",
            "must start with '/', not end with '/', and hold only A-Za-z0-9/_-. (e.g. \"/_keygate\")",
        );
    }
    if let Some(env) = &raw.admin_token_env
        && env.is_empty()
    {
        p.add(
            "management.admin_token_env",
            "must not be empty; omit it to disable the admin",
        );
    }
    let mut limit = |field: &str, value: i64| {
        p.ranged(
            &format!("management.limits.{field}"),
            value,
            MANAGEMENT_LIMIT,
        ) as u32
    };
    let limits = ManagementLimits {
        create_per_hour: limit("create_per_hour", raw.limits.create_per_hour),
        list_per_minute: limit("list_per_minute", raw.limits.list_per_minute),
        revoke_per_minute: limit("revoke_per_minute", raw.limits.revoke_per_minute),
        auth_failures_per_minute: limit(
            "auth_failures_per_minute",
            raw.limits.auth_failures_per_minute,
        ),
    };
    ManagementConfig {
        path,
        admin_token_env: raw.admin_token_env,
        limits,
    }
}

fn validate_signup(raw: RawSignup, p: &mut Problems) -> SignupConfig {
    SignupConfig {
        enabled: raw.enabled,
        per_client_per_hour: p.ranged(
            "signup.per_client_per_hour",
            raw.per_client_per_hour,
            MANAGEMENT_LIMIT,
        ) as u32,
    }
}

/// The database's CA (`store.ca_file`), read and parsed now so that a bad file stops
/// `keygate check` rather than the first connection.
fn store_ca_certificates(raw: &RawStore, p: &mut Problems) -> Option<Vec<Vec<u8>>> {
    let path = raw.ca_file.as_deref()?;
    match load_ca_file(path) {
        Ok(certs) => Some(certs),
        Err(reason) => {
            p.add("store.ca_file", reason);
            None
        }
    }
}
