//! The configuration file as written: one serde struct per TOML table, each field
//! defaulted, so a file naming only some fields still reads. Nothing here is checked;
//! `validate` maps these onto the typed `Config`.

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) store: RawStore,
    pub(super) keys: RawKeys,
    pub(super) management: RawManagement,
    pub(super) signup: RawSignup,
    pub(super) routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
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
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawStore {
    pub(super) backend: String,
    pub(super) path: String,
    pub(super) url_env: Option<String>,
    pub(super) pool_size: i64,
    pub(super) connect_timeout_seconds: i64,
    pub(super) cache_capacity: i64,
    pub(super) cache_ttl_seconds: i64,
    pub(super) negative_cache_capacity: i64,
    pub(super) negative_cache_ttl_seconds: i64,
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
            cache_capacity: 100_000,
            cache_ttl_seconds: 300,
            negative_cache_capacity: 10_000,
            negative_cache_ttl_seconds: 30,
            usage_flush_interval_ms: 1000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawKeys {
    pub(super) prefix: String,
}

impl Default for RawKeys {
    fn default() -> Self {
        RawKeys {
            prefix: "kg".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
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

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawManagementLimits {
    pub(super) create_per_hour: i64,
    pub(super) list_per_minute: i64,
    pub(super) revoke_per_minute: i64,
}

impl Default for RawManagementLimits {
    fn default() -> Self {
        RawManagementLimits {
            create_per_hour: 5,
            list_per_minute: 100,
            revoke_per_minute: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
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

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawRoute {
    pub(super) name: String,
    pub(super) path_prefix: String,
    pub(super) host: Option<String>,
    pub(super) upstreams: Vec<String>,
    pub(super) auth: String,
    pub(super) scopes: Vec<String>,
    pub(super) strip_prefix: bool,
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
            upstreams: Vec::new(),
            auth: "required".into(),
            scopes: Vec::new(),
            strip_prefix: false,
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

#[derive(Debug, Deserialize)]
pub(super) struct RawRateLimit {
    pub(super) requests: i64,
    pub(super) window_seconds: i64,
}
