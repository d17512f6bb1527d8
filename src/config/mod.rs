//! Configuration: the TOML file as written (`raw`, read field by field by `read`) mapped
//! onto a validated, typed `Config` (`validate`, with the DNS and file reads it needs in
//! `resolve`). Reading and validation collect every problem (wrong types, unknown fields,
//! bad values) with its field path instead of stopping at the first, so `keygate check`
//! can report them all at once.

mod raw;
mod read;
mod reload;
mod resolve;
mod route;
mod tls;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::keys::RateLimit;

pub use tls::{CertificateProblem, LoadedCertificate, TlsConfig, load_certificate};

use raw::RawConfig;
use read::Fields;
use validate::Problems;

/// One configuration problem: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// The shortest admin token accepted: guessing one must be hopeless.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub keys: KeysConfig,
    pub management: ManagementConfig,
    pub signup: SignupConfig,
    pub console: ConsoleConfig,
    pub ratelimit: LimitBackend,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    pub shutdown_grace: Duration,
    pub access_log: AccessLog,
    /// Idle time allowed on a keep-alive connection: its next request header must be
    /// complete within this of the previous response.
    pub keepalive_timeout: Duration,
    /// Time a client gets to send a connection's first request header whole.
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Largest request line + header block accepted (431 beyond; Pingora itself stops
    /// reading at 1 MiB).
    pub max_header_bytes: usize,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Streams a client may have open at once on one HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// When set, `listen` speaks TLS only (HTTP/2 and HTTP/1.1 by ALPN).
    pub tls: Option<TlsConfig>,
    /// How often upstream host names are resolved again.
    pub dns_refresh: Duration,
    /// Name servers asked for upstream host names; empty: the system's resolver (which
    /// also reads /etc/hosts).
    pub resolver: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreBackend {
    Sled {
        path: PathBuf,
    },
    Postgres {
        url_env: String,
        pool_size: usize,
        connect_timeout: Duration,
        /// Every statement is cancelled by the server past this.
        statement_timeout: Duration,
        /// DER certificates of `store.ca_file`, trusted for the database's certificate under
        /// `sslmode=verify-ca`/`verify-full` instead of the system's roots.
        ca_certificates: Option<Vec<Vec<u8>>>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub cache_capacity: u64,
    pub cache_ttl: Duration,
    pub negative_cache_capacity: u64,
    pub negative_cache_ttl: Duration,
    /// Keys put in the cache at start, most recently used first (0: none).
    pub cache_warm_keys: u64,
    /// Cache misses reading the store at once; kept below the PostgreSQL pool so that the
    /// usage flusher and management calls keep connections under a flood.
    pub max_concurrent_reads: usize,
    /// How long a miss waits for one of those before it is answered 503.
    pub read_wait: Duration,
    pub usage_flush_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeysConfig {
    pub prefix: String,
    /// Revoked and expired keys are deleted this long after; None: kept.
    pub purge_revoked_after: Option<std::time::Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManagementConfig {
    pub path: String,
    pub admin_token_env: Option<String>,
    pub limits: ManagementLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagementLimits {
    pub create_per_hour: u32,
    pub list_per_minute: u32,
    pub revoke_per_minute: u32,
    /// Wrong admin tokens or keys a client may present to the management API in a
    /// minute before its further calls are refused for the rest of the minute.
    pub auth_failures_per_minute: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SignupConfig {
    pub enabled: bool,
    pub per_client_per_hour: u32,
}

/// Where limits and quotas are decided (contract section 12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitBackend {
    /// In this process: exact for one gateway.
    Local,
    /// In Redis, shared by every gateway on it.
    Redis {
        /// The environment variable holding `redis://host:port/db` (never the file: it
        /// may hold a password).
        url_env: String,
        /// A decision Redis has not answered within this is an error.
        timeout: Duration,
        on_error: OnLimitError,
    },
}

/// What a limited key gets when Redis cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimitError {
    /// Admitted, without `RateLimit-*` headers.
    Allow,
    /// 503 `rate_limit_unavailable`.
    Deny,
}

/// The key console under `<management.path>/console/` (contract section 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub enabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Required,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    /// As written in the file, for logs, metrics labels and the default SNI.
    pub name: String,
    pub host: UpstreamHost,
}

/// Where an upstream is: an address as written, or a host name resolved at start and again
/// every `server.dns_refresh_seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamHost {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    pub host: Option<String>,
    pub upstreams: Vec<UpstreamAddr>,
    pub auth: AuthMode,
    pub scopes: Vec<String>,
    pub strip_prefix: bool,
    /// Whether `Upgrade: websocket` is forwarded (otherwise upgrade headers are removed).
    pub websocket: bool,
    /// Whether admitted requests carry the key's metadata in `x-keygate-metadata`.
    pub forward_metadata: bool,
    /// How long a proxy may cache an admitted forward-auth decision (0: `no-store`).
    pub decision_cache_seconds: u32,
    pub tls: bool,
    pub sni: String,
    /// DER certificates to trust for this route's upstreams instead of the system roots.
    pub ca_certificates: Option<Vec<Vec<u8>>>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub health_check_path: Option<String>,
    pub health_check_interval: Duration,
    pub rate_limit: Option<RateLimit>,
}

impl ManagementConfig {
    /// The admin token from the environment variable the config names: None when it is
    /// not named, unset or empty (no admin); a problem when it is too short to be safe.
    pub fn admin_token(&self) -> Result<Option<Vec<u8>>, ConfigProblem> {
        let Some(name) = self.admin_token_env.as_deref() else {
            return Ok(None);
        };
        let token = std::env::var(name).unwrap_or_default();
        if token.is_empty() {
            return Ok(None);
        }
        let chars = token.chars().count();
        if chars < MIN_ADMIN_TOKEN_CHARS {
            return Err(ConfigProblem {
                path: "management.admin_token_env".into(),
                reason: format!(
                    "the admin token in {name} has {chars} characters; at least {MIN_ADMIN_TOKEN_CHARS} are required (e.g. `head -c 32 /dev/urandom | base64`)"
                ),
            });
        }
        Ok(Some(token.into_bytes()))
    }
}

/// The value of environment variable `var`, which config field `field` names (connection
/// strings are read from the environment, never from the file: they may hold a password).
pub fn named_env(field: &str, var: &str) -> Result<String, ConfigProblem> {
    std::env::var(var)
        .ok()
        .filter(|value| !value.is_empty())
        .ok_or_else(|| ConfigProblem {
            path: field.to_string(),
            reason: format!("names {var}, but that environment variable is not set"),
        })
}

impl Config {
    /// Problems of the environment this configuration reads at start-up (the admin
    /// token), for `keygate check` and `keygate serve` alike.
    pub fn environment_problems(&self) -> Vec<ConfigProblem> {
        let mut problems: Vec<ConfigProblem> =
            self.management.admin_token().err().into_iter().collect();
        if let LimitBackend::Redis { url_env, .. } = &self.ratelimit {
            problems.extend(named_env("ratelimit.url_env", url_env).err());
        }
        problems
    }

    /// What does not stop the start but will hurt: a certificate expired or not valid yet.
    pub fn warnings(&self, now: i64) -> Vec<ConfigProblem> {
        self.server
            .tls
            .as_ref()
            .map(|tls| tls::validity_warnings(tls, now))
            .unwrap_or_default()
    }

    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigProblem {
                path: path.display().to_string(),
                reason: format!("cannot read the file: {e}"),
            }])
        })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let table: toml::Table = text
            .parse()
            .map_err(|e| ConfigErrors(vec![read::syntax_error(text, &e)]))?;
        let mut problems = Problems::default();
        let mut fields = Fields::root(table, &mut problems);
        let raw = RawConfig::read(&mut fields);
        fields.finish();
        let config = validate::validate(raw, &mut problems);
        let problems = problems.into_vec();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(problems))
        }
    }
}

#[cfg(test)]
mod tests;
