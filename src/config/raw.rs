//! The configuration file as written: one struct per TOML table, each field defaulted, so
//! a file naming only some fields still reads, and each read field by field (`read`), so a
//! wrong type or an unknown name is reported without hiding the rest. Nothing here is
//! checked; `validate` maps these onto the typed `Config`.

use super::read::Fields;

#[derive(Debug, Default)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) store: RawStore,
    pub(super) keys: RawKeys,
    pub(super) management: RawManagement,
    pub(super) signup: RawSignup,
    pub(super) console: RawConsole,
    pub(super) ratelimit: RawLimitBackend,
    pub(super) routes: Vec<RawRoute>,
}

impl RawConfig {
    pub(super) fn read(f: &mut Fields<'_>) -> Self {
        RawConfig {
            server: f.table("server", RawServer::read).unwrap_or_default(),
            store: f.table("store", RawStore::read).unwrap_or_default(),
            keys: f.table("keys", RawKeys::read).unwrap_or_default(),
            management: f
                .table("management", RawManagement::read)
                .unwrap_or_default(),
            signup: f.table("signup", RawSignup::read).unwrap_or_default(),
            console: f.table("console", RawConsole::read).unwrap_or_default(),
            ratelimit: f
                .table("ratelimit", RawLimitBackend::read)
                .unwrap_or_default(),
            routes: f.tables("routes", RawRoute::read),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawServer {
    pub(super) listen: String,
    pub(super) admin_listen: String,
    pub(super) threads: i64,
    pub(super) shutdown_grace_seconds: i64,
    pub(super) access_log: String,
    pub(super) keepalive_timeout_seconds: i64,
    pub(super) header_read_timeout_seconds: i64,
    pub(super) max_connections: i64,
    pub(super) max_header_bytes: i64,
    pub(super) trusted_proxies: Vec<String>,
    pub(super) h2_max_concurrent_streams: i64,
    pub(super) tls: Option<RawTls>,
    pub(super) dns_refresh_seconds: i64,
    pub(super) resolver: Vec<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9180".into(),
            threads: 2,
            shutdown_grace_seconds: 5,
            access_log: "stdout".into(),
            keepalive_timeout_seconds: 60,
            header_read_timeout_seconds: 10,
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            trusted_proxies: Vec::new(),
            h2_max_concurrent_streams: 100,
            tls: None,
            dns_refresh_seconds: 30,
            resolver: Vec::new(),
        }
    }
}

impl RawServer {
    fn read(f: &mut Fields<'_>) -> Self {
        let d = Self::default();
        RawServer {
            listen: f.string("listen", d.listen),
            admin_listen: f.string("admin_listen", d.admin_listen),
            threads: f.int("threads", d.threads),
            shutdown_grace_seconds: f.int("shutdown_grace_seconds", d.shutdown_grace_seconds),
            access_log: f.string("access_log", d.access_log),
            keepalive_timeout_seconds: f
                .int("keepalive_timeout_seconds", d.keepalive_timeout_seconds),
            header_read_timeout_seconds: f
                .int("header_read_timeout_seconds", d.header_read_timeout_seconds),
            max_connections: f.int("max_connections", d.max_connections),
            max_header_bytes: f.int("max_header_bytes", d.max_header_bytes),
            trusted_proxies: f.strings("trusted_proxies"),
            h2_max_concurrent_streams: f
                .int("h2_max_concurrent_streams", d.h2_max_concurrent_streams),
            tls: f.table("tls", RawTls::read),
            dns_refresh_seconds: f.int("dns_refresh_seconds", d.dns_refresh_seconds),
            resolver: f.strings("resolver"),
        }
    }
}

/// `[server.tls]`: both files are required once the table is there.
#[derive(Debug, Default)]
pub(super) struct RawTls {
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
}

impl RawTls {
    fn read(f: &mut Fields<'_>) -> Self {
        RawTls {
            cert_file: f.opt_string("cert_file"),
            key_file: f.opt_string("key_file"),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawStore {
    pub(super) backend: String,
    pub(super) path: String,
    pub(super) url_env: Option<String>,
    pub(super) pool_size: i64,
    pub(super) connect_timeout_seconds: i64,
    pub(super) statement_timeout_ms: i64,
    pub(super) ca_file: Option<String>,
    pub(super) cache_capacity: i64,
    pub(super) cache_ttl_seconds: i64,
    pub(super) negative_cache_capacity: i64,
    pub(super) negative_cache_ttl_seconds: i64,
    /// None: `cache_capacity`.
    pub(super) cache_warm_keys: Option<i64>,
    /// None: half of `pool_size` on PostgreSQL (at least 1), 64 on sled.
    pub(super) max_concurrent_reads: Option<i64>,
    pub(super) read_wait_ms: i64,
    pub(super) usage_flush_interval_ms: i64,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            backend: "sled".into(),
            path: "data/keygate".into(),
            url_env: None,
            pool_size: 8,
            connect_timeout_seconds: 5,
            statement_timeout_ms: 5000,
            ca_file: None,
            cache_capacity: 100_000,
            cache_ttl_seconds: 300,
            negative_cache_capacity: 10_000,
            negative_cache_ttl_seconds: 30,
            cache_warm_keys: None,
            max_concurrent_reads: None,
            read_wait_ms: 500,
            usage_flush_interval_ms: 1000,
        }
    }
}

impl RawStore {
    fn read(f: &mut Fields<'_>) -> Self {
        let d = Self::default();
        RawStore {
            backend: f.string("backend", d.backend),
            path: f.string("path", d.path),
            url_env: f.opt_string("url_env").or(d.url_env),
            pool_size: f.int("pool_size", d.pool_size),
            connect_timeout_seconds: f.int("connect_timeout_seconds", d.connect_timeout_seconds),
            statement_timeout_ms: f.int("statement_timeout_ms", d.statement_timeout_ms),
            ca_file: f.opt_string("ca_file").or(d.ca_file),
            cache_capacity: f.int("cache_capacity", d.cache_capacity),
            cache_ttl_seconds: f.int("cache_ttl_seconds", d.cache_ttl_seconds),
            negative_cache_capacity: f.int("negative_cache_capacity", d.negative_cache_capacity),
            negative_cache_ttl_seconds: f
                .int("negative_cache_ttl_seconds", d.negative_cache_ttl_seconds),
            cache_warm_keys: f.opt_int("cache_warm_keys"),
            max_concurrent_reads: f.opt_int("max_concurrent_reads"),
            read_wait_ms: f.int("read_wait_ms", d.read_wait_ms),
            usage_flush_interval_ms: f.int("usage_flush_interval_ms", d.usage_flush_interval_ms),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawKeys {
    pub(super) prefix: String,
    pub(super) purge_revoked_after_days: Option<i64>,
}

impl Default for RawKeys {
    fn default() -> Self {
        RawKeys {
            prefix: "kg".into(),
            purge_revoked_after_days: None,
        }
    }
}

impl RawKeys {
    fn read(f: &mut Fields<'_>) -> Self {
        let d = Self::default();
        RawKeys {
            prefix: f.string("prefix", d.prefix),
            purge_revoked_after_days: f
                .has("purge_revoked_after_days")
                .then(|| f.int("purge_revoked_after_days", 0)),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawManagement {
    pub(super) path: String,
    pub(super) admin_token_env: Option<String>,
    pub(super) limits: RawManagementLimits,
}

impl Default for RawManagement {
    fn default() -> Self {
        RawManagement {
            path: "/_keygate".into(),
            admin_token_env: Some("KEYGATE_ADMIN_TOKEN".into()),
            limits: RawManagementLimits::default(),
        }
    }
}

impl RawManagement {
    fn read(f: &mut Fields<'_>) -> Self {
        let d = Self::default();
        RawManagement {
            path: f.string("path", d.path),
            admin_token_env: f.opt_string("admin_token_env").or(d.admin_token_env),
            limits: f
                .table("limits", RawManagementLimits::read)
                .unwrap_or(d.limits),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawManagementLimits {
    pub(super) create_per_hour: i64,
    pub(super) list_per_minute: i64,
    pub(super) revoke_per_minute: i64,
    pub(super) auth_failures_per_minute: i64,
}

impl Default for RawManagementLimits {
    fn default() -> Self {
        RawManagementLimits {
            create_per_hour: 5,
            list_per_minute: 100,
            revoke_per_minute: 10,
            auth_failures_per_minute: 30,
        }
    }
}

impl RawManagementLimits {
    fn read(f: &mut Fields<'_>) -> Self {
        let d = Self::default();
        RawManagementLimits {
            create_per_hour: f.int("create_per_hour", d.create_per_hour),
            list_per_minute: f.int("list_per_minute", d.list_per_minute),
            revoke_per_minute: f.int("revoke_per_minute", d.revoke_per_minute),
            auth_failures_per_minute: f.int("auth_failures_per_minute", d.auth_failures_per_minute),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawSignup {
    pub(super) enabled: bool,
    pub(super) per_client_per_hour: i64,
}

impl Default for RawSignup {
    fn default() -> Self {
        RawSignup {
            enabled: false,
            per_client_per_hour: 5,
        }
    }
}

impl RawSignup {
    fn read(f: &mut Fields<'_>) -> Self {
        let d = Self::default();
        RawSignup {
            enabled: f.bool("enabled", d.enabled),
            per_client_per_hour: f.int("per_client_per_hour", d.per_client_per_hour),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawLimitBackend {
    pub(super) backend: String,
    pub(super) url_env: String,
    pub(super) timeout_ms: i64,
    pub(super) on_error: String,
}

impl Default for RawLimitBackend {
    fn default() -> Self {
        RawLimitBackend {
            backend: "local".into(),
            url_env: "KEYGATE_REDIS_URL".into(),
            timeout_ms: 50,
            on_error: "allow".into(),
        }
    }
}

impl RawLimitBackend {
    fn read(f: &mut Fields<'_>) -> Self {
        let d = Self::default();
        RawLimitBackend {
            backend: f.string("backend", d.backend),
            url_env: f.string("url_env", d.url_env),
            timeout_ms: f.int("timeout_ms", d.timeout_ms),
            on_error: f.string("on_error", d.on_error),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawConsole {
    pub(super) enabled: bool,
}

impl Default for RawConsole {
    fn default() -> Self {
        RawConsole { enabled: true }
    }
}

impl RawConsole {
    fn read(f: &mut Fields<'_>) -> Self {
        RawConsole {
            enabled: f.bool("enabled", Self::default().enabled),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawRoute {
    pub(super) name: String,
    pub(super) path_prefix: String,
    pub(super) host: Option<String>,
    /// None when the field is missing (an error); `Some([])` for a decision-only route.
    pub(super) upstreams: Option<Vec<String>>,
    pub(super) auth: String,
    pub(super) scopes: Vec<String>,
    pub(super) strip_prefix: bool,
    pub(super) websocket: bool,
    pub(super) forward_metadata: bool,
    pub(super) decision_cache_seconds: i64,
    pub(super) tls: bool,
    pub(super) sni: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) connect_timeout_ms: i64,
    pub(super) read_timeout_ms: i64,
    pub(super) write_timeout_ms: i64,
    pub(super) health_check_path: Option<String>,
    pub(super) health_check_interval_ms: i64,
    pub(super) rate_limit: Option<RawRateLimit>,
}

impl Default for RawRoute {
    fn default() -> Self {
        RawRoute {
            name: String::new(),
            path_prefix: "/".into(),
            host: None,
            upstreams: None,
            auth: "required".into(),
            scopes: Vec::new(),
            strip_prefix: false,
            websocket: false,
            forward_metadata: false,
            decision_cache_seconds: 0,
            tls: false,
            sni: None,
            ca_file: None,
            connect_timeout_ms: 2_000,
            read_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            health_check_path: None,
            health_check_interval_ms: 2_000,
            rate_limit: None,
        }
    }
}

impl RawRoute {
    fn read(f: &mut Fields<'_>) -> Self {
        let d = Self::default();
        RawRoute {
            name: f.string("name", d.name),
            path_prefix: f.string("path_prefix", d.path_prefix),
            host: f.opt_string("host"),
            upstreams: if f.has("upstreams") {
                Some(f.strings("upstreams"))
            } else {
                None
            },
            auth: f.string("auth", d.auth),
            scopes: f.strings("scopes"),
            strip_prefix: f.bool("strip_prefix", d.strip_prefix),
            websocket: f.bool("websocket", d.websocket),
            forward_metadata: f.bool("forward_metadata", d.forward_metadata),
            decision_cache_seconds: f.int("decision_cache_seconds", d.decision_cache_seconds),
            tls: f.bool("tls", d.tls),
            sni: f.opt_string("sni"),
            ca_file: f.opt_string("ca_file"),
            connect_timeout_ms: f.int("connect_timeout_ms", d.connect_timeout_ms),
            read_timeout_ms: f.int("read_timeout_ms", d.read_timeout_ms),
            write_timeout_ms: f.int("write_timeout_ms", d.write_timeout_ms),
            health_check_path: f.opt_string("health_check_path"),
            health_check_interval_ms: f.int("health_check_interval_ms", d.health_check_interval_ms),
            rate_limit: f.table("rate_limit", RawRateLimit::read).flatten(),
        }
    }
}

#[derive(Debug)]
pub(super) struct RawRateLimit {
    pub(super) requests: i64,
    pub(super) window_seconds: i64,
}

impl RawRateLimit {
    /// Both fields are required: `None` when either is missing or not an integer.
    fn read(f: &mut Fields<'_>) -> Option<Self> {
        let requests = f.required_int("requests");
        let window_seconds = f.required_int("window_seconds");
        Some(RawRateLimit {
            requests: requests?,
            window_seconds: window_seconds?,
        })
    }
}
