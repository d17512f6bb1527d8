//! Configuration: the TOML file as written (`Raw*`, serde) mapped onto a validated, typed
//! `Config`. Validation collects every problem with its field path instead of stopping at
//! the first, so `keygate check` can report them all at once.

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::keys::RateLimit;
use crate::keys::scope::valid_scope;

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

// ---------------------------------------------------------------- raw, as written

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    server: RawServer,
    store: RawStore,
    keys: RawKeys,
    management: RawManagement,
    signup: RawSignup,
    routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawServer {
    listen: String,
    admin_listen: String,
    threads: i64,
    shutdown_grace_seconds: i64,
    access_log: String,
    keepalive_timeout_seconds: i64,
    header_read_timeout_seconds: i64,
    max_connections: i64,
    max_header_bytes: i64,
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
struct RawStore {
    backend: String,
    path: String,
    url_env: Option<String>,
    pool_size: i64,
    connect_timeout_seconds: i64,
    cache_capacity: i64,
    cache_ttl_seconds: i64,
    negative_cache_capacity: i64,
    negative_cache_ttl_seconds: i64,
    usage_flush_interval_ms: i64,
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
struct RawKeys {
    prefix: String,
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
struct RawManagement {
    path: String,
    admin_token_env: Option<String>,
    limits: RawManagementLimits,
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
struct RawManagementLimits {
    create_per_hour: i64,
    list_per_minute: i64,
    revoke_per_minute: i64,
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
struct RawSignup {
    enabled: bool,
    per_client_per_hour: i64,
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
struct RawRoute {
    name: String,
    path_prefix: String,
    host: Option<String>,
    upstreams: Vec<String>,
    auth: String,
    scopes: Vec<String>,
    strip_prefix: bool,
    tls: bool,
    sni: Option<String>,
    ca_file: Option<String>,
    connect_timeout_ms: i64,
    read_timeout_ms: i64,
    write_timeout_ms: i64,
    health_check_path: Option<String>,
    health_check_interval_ms: i64,
    rate_limit: Option<RawRateLimit>,
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
struct RawRateLimit {
    requests: i64,
    window_seconds: i64,
}

// ---------------------------------------------------------------- validated

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub keys: KeysConfig,
    pub management: ManagementConfig,
    pub signup: SignupConfig,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub threads: usize,
    pub shutdown_grace: Duration,
    pub access_log: AccessLog,
    pub keepalive_timeout: Duration,
    /// Time a client gets to send a whole request header (after any keep-alive idle time).
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Largest request line + header block accepted (431 beyond; Pingora itself stops
    /// reading at 1 MiB).
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub enum StoreBackend {
    Sled {
        path: PathBuf,
    },
    Postgres {
        url_env: String,
        pool_size: usize,
        connect_timeout: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub cache_capacity: u64,
    pub cache_ttl: Duration,
    pub negative_cache_capacity: u64,
    pub negative_cache_ttl: Duration,
    pub usage_flush_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct KeysConfig {
    pub prefix: String,
}

#[derive(Debug, Clone)]
pub struct ManagementConfig {
    pub path: String,
    pub admin_token_env: Option<String>,
    pub limits: ManagementLimits,
}

#[derive(Debug, Clone, Copy)]
pub struct ManagementLimits {
    pub create_per_hour: u32,
    pub list_per_minute: u32,
    pub revoke_per_minute: u32,
}

#[derive(Debug, Clone)]
pub struct SignupConfig {
    pub enabled: bool,
    pub per_client_per_hour: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Required,
    None,
}

#[derive(Debug, Clone)]
pub struct UpstreamAddr {
    /// As written in the file, for logs, metrics labels and the default SNI.
    pub name: String,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    pub host: Option<String>,
    pub upstreams: Vec<UpstreamAddr>,
    pub auth: AuthMode,
    pub scopes: Vec<String>,
    pub strip_prefix: bool,
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

impl Config {
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
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![ConfigProblem {
                path: "(file)".into(),
                reason: format!("not valid TOML: {}", e.message()),
            }])
        })?;
        let mut problems = Vec::new();
        let raw: Result<RawConfig, _> =
            serde_ignored::deserialize(toml::Value::Table(table), |path| {
                problems.push(ConfigProblem {
                    path: render_path(&path),
                    reason: "unknown field".into(),
                })
            });
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                problems.push(ConfigProblem {
                    path: "(file)".into(),
                    reason: e.to_string(),
                });
                return Err(ConfigErrors(problems));
            }
        };
        let config = validate(raw, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(problems))
        }
    }
}

fn render_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", render_path(parent)),
        P::Map { parent, key } => {
            let head = render_path(parent);
            if head.is_empty() {
                key.clone()
            } else {
                format!("{head}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            render_path(parent)
        }
    }
}

struct Problems<'a>(&'a mut Vec<ConfigProblem>);

impl Problems<'_> {
    fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            reason: reason.into(),
        });
    }

    fn ranged(&mut self, path: &str, value: i64, min: i64, max: i64) -> u64 {
        if value < min || value > max {
            self.add(
                path,
                format!("must be between {min} and {max}, got {value}"),
            );
            min.max(0) as u64
        } else {
            value as u64
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

fn validate(raw: RawConfig, problems: &mut Vec<ConfigProblem>) -> Config {
    let mut p = Problems(problems);

    let listen = p.socket_addr("server.listen", &raw.server.listen);
    let admin_listen = p.socket_addr("server.admin_listen", &raw.server.admin_listen);
    if listen == admin_listen && listen.port() != 0 {
        p.add("server.admin_listen", "must differ from server.listen");
    }
    let server = ServerConfig {
        listen,
        admin_listen,
        threads: p.ranged("server.threads", raw.server.threads, 1, 256) as usize,
        shutdown_grace: Duration::from_secs(p.ranged(
            "server.shutdown_grace_seconds",
            raw.server.shutdown_grace_seconds,
            0,
            3600,
        )),
        access_log: match raw.server.access_log.as_str() {
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
            raw.server.keepalive_timeout_seconds,
            1,
            3600,
        )),
        header_read_timeout: Duration::from_secs(p.ranged(
            "server.header_read_timeout_seconds",
            raw.server.header_read_timeout_seconds,
            1,
            3600,
        )),
        max_connections: p.ranged(
            "server.max_connections",
            raw.server.max_connections,
            1,
            1_000_000,
        ) as usize,
        max_header_bytes: p.ranged(
            "server.max_header_bytes",
            raw.server.max_header_bytes,
            1024,
            1024 * 1024,
        ) as usize,
    };

    let backend = match raw.store.backend.as_str() {
        "sled" => {
            if raw.store.path.trim().is_empty() {
                p.add("store.path", "must name a directory for the sled store");
            }
            StoreBackend::Sled {
                path: PathBuf::from(&raw.store.path),
            }
        }
        "postgres" => {
            let url_env = raw.store.url_env.clone().unwrap_or_default();
            if url_env.is_empty() {
                p.add(
                    "store.url_env",
                    "the postgres backend needs the name of the environment variable holding the connection string",
                );
            }
            StoreBackend::Postgres {
                url_env,
                pool_size: p.ranged("store.pool_size", raw.store.pool_size, 1, 1024) as usize,
                connect_timeout: Duration::from_secs(p.ranged(
                    "store.connect_timeout_seconds",
                    raw.store.connect_timeout_seconds,
                    1,
                    600,
                )),
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
    };
    if raw.store.url_env.is_some() && raw.store.backend == "sled" {
        p.add("store.url_env", "only used by the postgres backend");
    }
    let store = StoreConfig {
        backend,
        cache_capacity: p.ranged(
            "store.cache_capacity",
            raw.store.cache_capacity,
            1,
            100_000_000,
        ),
        cache_ttl: Duration::from_secs(p.ranged(
            "store.cache_ttl_seconds",
            raw.store.cache_ttl_seconds,
            1,
            86_400,
        )),
        negative_cache_capacity: p.ranged(
            "store.negative_cache_capacity",
            raw.store.negative_cache_capacity,
            1,
            100_000_000,
        ),
        negative_cache_ttl: Duration::from_secs(p.ranged(
            "store.negative_cache_ttl_seconds",
            raw.store.negative_cache_ttl_seconds,
            1,
            86_400,
        )),
        usage_flush_interval: Duration::from_millis(p.ranged(
            "store.usage_flush_interval_ms",
            raw.store.usage_flush_interval_ms,
            10,
            3_600_000,
        )),
    };

    let prefix = raw.keys.prefix;
    if prefix.is_empty() || prefix.len() > 16 || !prefix.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        p.add("keys.prefix", "must be 1 to 16 characters of A-Za-z0-9");
    }

    let mgmt_path = raw.management.path;
    if !mgmt_path.starts_with('/')
        || mgmt_path.len() < 2
        || mgmt_path.ends_with('/')
        || !mgmt_path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b))
        || mgmt_path.split('/').any(|s| s == "." || s == "..")
    {
        p.add(
            "management.path",
            "must start with '/', not end with '/', and hold only A-Za-z0-9/_-. (e.g. \"/_keygate\")",
        );
    }
    if let Some(env) = &raw.management.admin_token_env
        && env.is_empty()
    {
        p.add(
            "management.admin_token_env",
            "must not be empty; omit it to disable the admin",
        );
    }
    let limits = ManagementLimits {
        create_per_hour: p.ranged(
            "management.limits.create_per_hour",
            raw.management.limits.create_per_hour,
            1,
            1_000_000,
        ) as u32,
        list_per_minute: p.ranged(
            "management.limits.list_per_minute",
            raw.management.limits.list_per_minute,
            1,
            1_000_000,
        ) as u32,
        revoke_per_minute: p.ranged(
            "management.limits.revoke_per_minute",
            raw.management.limits.revoke_per_minute,
            1,
            1_000_000,
        ) as u32,
    };
    let management = ManagementConfig {
        path: mgmt_path,
        admin_token_env: raw.management.admin_token_env,
        limits,
    };
    let signup = SignupConfig {
        enabled: raw.signup.enabled,
        per_client_per_hour: p.ranged(
            "signup.per_client_per_hour",
            raw.signup.per_client_per_hour,
            1,
            1_000_000,
        ) as u32,
    };

    if raw.routes.is_empty() {
        p.add("routes", "at least one [[routes]] entry is needed");
    }
    let mut names = HashSet::new();
    let mut matchers = HashSet::new();
    let routes = raw
        .routes
        .into_iter()
        .enumerate()
        .map(|(i, route)| {
            let at = |field: &str| format!("routes[{i}].{field}");
            if route.name.is_empty() {
                p.add(at("name"), "every route needs a name");
            } else if !route
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                || route.name.len() > 64
            {
                p.add(at("name"), "must be 1 to 64 characters of A-Za-z0-9_-.");
            } else if !names.insert(route.name.clone()) {
                p.add(
                    at("name"),
                    format!("duplicate route name \"{}\"", route.name),
                );
            }
            if !route.path_prefix.starts_with('/') {
                p.add(at("path_prefix"), "must start with '/'");
            } else if route.path_prefix.split('/').any(|s| s == "." || s == "..") {
                p.add(at("path_prefix"), "must not contain . or .. segments");
            } else if !route.path_prefix.bytes().all(is_plain_path_byte)
                || route.path_prefix.contains("//")
            {
                // Requests are routed on their decoded, unambiguous path (see `path`): a
                // prefix with escapes, `;` or `//` would never match one.
                p.add(
                    at("path_prefix"),
                    "must be a plain path: letters, digits, / and -._~!$&'()*+,=:@ (no %-escapes, ';' or '//')",
                );
            }
            // Hosts are matched without case and without a fully qualified name's root dot.
            let host = route
                .host
                .map(|h| h.strip_suffix('.').unwrap_or(&h).to_ascii_lowercase());
            if let Some(h) = &host
                && !crate::http::host::is_host_name(h)
            {
                p.add(
                    at("host"),
                    "must be a host name such as api.example.com (no port; requests match on the host alone)",
                );
            }
            // Prefixes differing only in case would make every request to either one
            // ambiguous (see `path`).
            if !matchers.insert((route.path_prefix.to_ascii_lowercase(), host.clone())) {
                p.add(
                    at("path_prefix"),
                    "another route already has this path_prefix (ignoring case) and host",
                );
            }
            if route.upstreams.is_empty() {
                p.add(at("upstreams"), "needs at least one upstream address");
            }
            let upstreams: Vec<UpstreamAddr> = route
                .upstreams
                .iter()
                .enumerate()
                .filter_map(|(j, name)| match resolve(name) {
                    Ok(addr) => Some(UpstreamAddr {
                        name: name.clone(),
                        addr,
                    }),
                    Err(reason) => {
                        p.add(format!("routes[{i}].upstreams[{j}]"), reason);
                        None
                    }
                })
                .collect();
            let auth = match route.auth.as_str() {
                "required" => AuthMode::Required,
                "none" => AuthMode::None,
                other => {
                    p.add(
                        at("auth"),
                        format!("must be \"required\" or \"none\", got \"{other}\""),
                    );
                    AuthMode::Required
                }
            };
            for (j, scope) in route.scopes.iter().enumerate() {
                if !valid_scope(scope) {
                    p.add(
                        format!("routes[{i}].scopes[{j}]"),
                        "a scope is 1 to 64 characters of a-z0-9:._-",
                    );
                }
            }
            if auth == AuthMode::None && !route.scopes.is_empty() {
                p.add(
                    at("scopes"),
                    "a route with auth = \"none\" cannot require scopes",
                );
            }
            // `tls = true` needs no build check: keygate always builds Pingora with rustls
            // (Cargo.toml), so a TLS peer never silently connects to nothing.
            let sni = match (&route.sni, route.tls) {
                (Some(_), false) => {
                    p.add(at("sni"), "only used when tls = true");
                    String::new()
                }
                (Some(sni), true) if sni.is_empty() => {
                    p.add(at("sni"), "must not be empty");
                    String::new()
                }
                (Some(sni), true) => sni.clone(),
                (None, true) => route
                    .upstreams
                    .first()
                    .and_then(|u| u.rsplit_once(':'))
                    .map(|(host, _)| host.trim_matches(['[', ']']).to_string())
                    .unwrap_or_default(),
                (None, false) => String::new(),
            };
            let ca_certificates = match (&route.ca_file, route.tls) {
                (Some(_), false) => {
                    p.add(at("ca_file"), "only used when tls = true");
                    None
                }
                (Some(path), true) => match load_ca_file(path) {
                    Ok(certs) => Some(certs),
                    Err(reason) => {
                        p.add(at("ca_file"), reason);
                        None
                    }
                },
                (None, _) => None,
            };
            if let Some(path) = &route.health_check_path
                && !path.starts_with('/')
            {
                p.add(at("health_check_path"), "must start with '/'");
            }
            let rate_limit = route.rate_limit.map(|rl| RateLimit {
                requests: p.ranged(&at("rate_limit.requests"), rl.requests, 1, 1_000_000_000)
                    as u32,
                window_seconds: p.ranged(
                    &at("rate_limit.window_seconds"),
                    rl.window_seconds,
                    1,
                    86_400 * 31,
                ) as u32,
            });
            RouteConfig {
                connect_timeout: Duration::from_millis(p.ranged(
                    &at("connect_timeout_ms"),
                    route.connect_timeout_ms,
                    1,
                    600_000,
                )),
                read_timeout: Duration::from_millis(p.ranged(
                    &at("read_timeout_ms"),
                    route.read_timeout_ms,
                    1,
                    3_600_000,
                )),
                write_timeout: Duration::from_millis(p.ranged(
                    &at("write_timeout_ms"),
                    route.write_timeout_ms,
                    1,
                    3_600_000,
                )),
                health_check_interval: Duration::from_millis(p.ranged(
                    &at("health_check_interval_ms"),
                    route.health_check_interval_ms,
                    100,
                    3_600_000,
                )),
                name: route.name,
                path_prefix: route.path_prefix,
                host,
                upstreams,
                auth,
                scopes: route.scopes,
                strip_prefix: route.strip_prefix,
                tls: route.tls,
                sni,
                ca_certificates,
                health_check_path: route.health_check_path,
                rate_limit,
            }
        })
        .collect();

    Config {
        server,
        store,
        keys: KeysConfig { prefix },
        management,
        signup,
        routes,
    }
}

/// Upstream addresses are resolved once, at load: Pingora's peers resolve with blocking DNS
/// and unwrap the result, which must never happen on the request path.
fn resolve(name: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = name.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !name.contains(':') {
        return Err(format!("`{name}` needs a port, e.g. 127.0.0.1:3000"));
    }
    match name.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("`{name}` resolves to no address")),
        Err(e) => Err(format!("`{name}` cannot be resolved: {e}")),
    }
}

/// Reads PEM certificates and checks each parses as X.509 (Pingora's TLS layer would panic
/// on one that does not).
fn load_ca_file(path: &str) -> Result<Vec<Vec<u8>>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut reader = std::io::BufReader::new(file);
    let mut certs = Vec::new();
    for cert in rustls_pemfile::certs(&mut reader) {
        let der = cert.map_err(|e| format!("{path} is not valid PEM: {e}"))?;
        x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("{path} holds a certificate that does not parse: {e}"))?;
        certs.push(der.as_ref().to_vec());
    }
    if certs.is_empty() {
        return Err(format!("{path} holds no PEM certificate"));
    }
    Ok(certs)
}

/// Scope grammar of the contract: `[a-z0-9:._-]{1,64}`.
/// RFC 3986 path characters other than `%` (escapes) and `;` (parameters).
fn is_plain_path_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"/-._~!$&'()*+,=:@".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[routes]]
name = "default"
path_prefix = "/"
upstreams = ["127.0.0.1:3000"]
"#;

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match Config::parse(text) {
            Ok(_) => Vec::new(),
            Err(ConfigErrors(p)) => p,
        }
    }

    fn has(problems: &[ConfigProblem], path: &str) -> bool {
        problems.iter().any(|p| p.path == path)
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.admin_listen.to_string(), "127.0.0.1:9180");
        assert_eq!(config.keys.prefix, "kg");
        assert_eq!(config.management.path, "/_keygate");
        assert_eq!(config.routes[0].auth, AuthMode::Required);
        assert!(!config.signup.enabled);
    }

    #[test]
    fn shipped_config_is_valid() {
        let text = include_str!("../config/keygate.toml");
        Config::parse(text).expect("config/keygate.toml must validate");
    }

    #[test]
    fn shipped_postgres_config_is_valid() {
        let text = include_str!("../config/keygate-postgres.toml");
        let config = Config::parse(text).expect("config/keygate-postgres.toml must validate");
        assert!(matches!(
            config.store.backend,
            StoreBackend::Postgres { .. }
        ));
    }

    #[test]
    fn every_unknown_field_is_reported_with_its_path() {
        let p = problems(
            r#"
[server]
listne = "127.0.0.1:1"
[store]
colour = 1
[[routes]]
name = "a"
upstreams = ["127.0.0.1:3000"]
weight = 3
"#,
        );
        assert!(has(&p, "server.listne"), "{p:?}");
        assert!(has(&p, "store.colour"), "{p:?}");
        assert!(has(&p, "routes[0].weight"), "{p:?}");
        assert!(p.iter().all(|x| x.reason == "unknown field"));
    }

    #[test]
    fn semantic_problems_are_all_collected() {
        let p = problems(
            r#"
[server]
listen = "not-an-address"
threads = 0
[keys]
prefix = "k_g"
[management]
path = "_keygate/"
[[routes]]
name = "a"
upstreams = []
auth = "maybe"
scopes = ["UPPER"]
[[routes]]
name = "a"
path_prefix = "/x"
upstreams = ["127.0.0.1"]
sni = "example.com"
"#,
        );
        for path in [
            "server.listen",
            "server.threads",
            "keys.prefix",
            "management.path",
            "routes[0].upstreams",
            "routes[0].auth",
            "routes[0].scopes[0]",
            "routes[1].name",
            "routes[1].upstreams[0]",
            "routes[1].sni",
        ] {
            assert!(has(&p, path), "missing {path} in {p:?}");
        }
    }

    #[test]
    fn no_routes_and_bad_types_are_errors() {
        assert!(has(&problems("[server]\nthreads = 2\n"), "routes"));
        let p = problems("[server]\nthreads = \"two\"\n");
        assert!(!p.is_empty());
        let p = problems("this is = = not toml");
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn postgres_without_url_env_is_reported() {
        let text = format!("[store]\nbackend = \"postgres\"\n{MINIMAL}");
        assert!(has(&problems(&text), "store.url_env"));
        let text = format!("[store]\nbackend = \"etcd\"\n{MINIMAL}");
        assert!(has(&problems(&text), "store.backend"));
    }

    #[test]
    fn ca_file_problems_are_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here").expect("write");
        let route = |extra: &str| {
            format!("[[routes]]\nname = \"a\"\nupstreams = [\"127.0.0.1:1\"]\n{extra}\n")
        };
        for extra in [
            "ca_file = \"/no/such/file.pem\"\ntls = true".to_string(),
            format!("ca_file = \"{}\"\ntls = true", garbage.display()),
            format!("ca_file = \"{}\"\ntls = true", empty.display()),
            format!("ca_file = \"{}\"", empty.display()),
        ] {
            assert!(
                has(&problems(&route(&extra)), "routes[0].ca_file"),
                "{extra}"
            );
        }
    }

    #[test]
    fn path_prefixes_must_be_plain_and_hosts_lose_their_root_dot() {
        let route = |extra: &str| {
            format!("[[routes]]\nname = \"a\"\nupstreams = [\"127.0.0.1:1\"]\n{extra}\n")
        };
        for prefix in ["/%61dmin", "/a;b", "/a//b", "/a b", "/a\\\\b"] {
            assert!(
                has(
                    &problems(&route(&format!("path_prefix = \"{prefix}\""))),
                    "routes[0].path_prefix"
                ),
                "{prefix}"
            );
        }
        for prefix in ["/", "/api/v1", "/a-b_c.d~e", "/users/@me", "/x:y"] {
            let text = route(&format!("path_prefix = \"{prefix}\""));
            assert!(Config::parse(&text).is_ok(), "{prefix}");
        }
        for host in ["api.example:8080", "[::1]", "a..b", "", "a b", "a/b"] {
            assert!(
                has(
                    &problems(&route(&format!("host = \"{host}\""))),
                    "routes[0].host"
                ),
                "{host}"
            );
        }
        let config = Config::parse(&route("host = \"API.Example.\"")).expect("valid");
        assert_eq!(config.routes[0].host.as_deref(), Some("api.example"));
    }

    #[test]
    fn duplicate_route_matchers_are_reported() {
        let text =
            format!("{MINIMAL}\n[[routes]]\nname = \"b\"\nupstreams = [\"127.0.0.1:3001\"]\n");
        assert!(has(&problems(&text), "routes[1].path_prefix"));
        let text = "[[routes]]\nname = \"a\"\npath_prefix = \"/api\"\nupstreams = [\"127.0.0.1:1\"]\n\
                    [[routes]]\nname = \"b\"\npath_prefix = \"/API\"\nupstreams = [\"127.0.0.1:2\"]\n";
        assert!(has(&problems(text), "routes[1].path_prefix"));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,200}") {
            let _ = Config::parse(&text);
        }

        #[test]
        fn parse_never_panics_on_toml_shaped_input(
            section in proptest::sample::select(vec!["server", "store", "keys", "management", "signup"]),
            field in "[a-z_]{1,24}",
            value in proptest::sample::select(vec!["1", "-1", "\"x\"", "true", "[]", "99999999999999", "\"/\"", "{}"]),
        ) {
            let text = format!("[{section}]\n{field} = {value}\n{MINIMAL}");
            let _ = Config::parse(&text);
        }
    }
}
