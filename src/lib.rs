//! keygate: an API-key authentication gateway built on Pingora.
//!
//! Layout (each module uses only those listed above it, except `cli` and `app` on top):
//! - `clock`      Unix time and RFC 3339
//! - `hint`       the nearest known name for a mistyped one
//! - `metrics`    Prometheus families in keygate's own registry; the `outcome` label
//! - `error`      the request path's refusals, the error codes, the JSON error body
//! - `keys`       key format, hash, ids, scope grammar, the persisted record and its rules,
//!   patches, finding keys in text (scan)
//! - `http`       pure request logic: target, path readings, host, credentials, body framing,
//!   upgrades
//! - `config`     TOML as written -> validated, typed configuration (folder: raw, validate,
//!   resolve, route, tls: the listener's certificate read and checked)
//! - `store`      the `KeyStore` trait, sled and PostgreSQL stores, the moka key cache,
//!   PostgreSQL's invalidation listener
//! - `ratelimit`  rate limits (GCRA) and quotas, per key, route and management budget, decided
//!   in this process or in Redis
//! - `usage`      in-memory usage counters and their flusher
//! - `routing`    routes, longest-prefix matching, upstream pools and health checks
//! - `lifecycle`  create, list (filtered), revoke, rotate, change in place, purge, audit: the
//!   rules of keys over store and cache
//! - `auth`       who a request's key belongs to (credentials, format, cache, expiry)
//! - `drain`      requests in flight, and a stop that waits for them and no longer
//! - `tunnels`    open WebSocket tunnels, closed when their key is revoked or expires
//! - `state`      `Shared`: what the request path, the management API and the ops listener share
//! - `session`    what keygate reads from and writes to a Pingora session: bodies, responses
//! - `gateway`    the request path, top to bottom, and the per-request context
//! - `management` the management API: calls, caller, fields, handlers, views, OpenAPI
//! - `server`     Pingora's traits: proxy hooks, connection limits, TLS termination, ops
//!   listener, access log
//! - `logging`    log set-up; the access log's destination, which reloads swap
//! - `reload`     live reconfiguration: read, check and build everything, then swap it in
//! - `app`        assembles the state and the Pingora services; runs and stops them
//! - `cli`        the `keygate` command line (serve, check, offline key commands, key scan)

mod app;
mod auth;
pub mod cli;
mod clock;
pub mod config;
mod drain;
mod error;
mod gateway;
mod hint;
pub mod http;
pub mod keys;
pub mod lifecycle;
mod logging;
mod management;
mod metrics;
mod ratelimit;
mod reload;
mod routing;
mod server;
mod session;
mod state;
pub mod store;
mod tunnels;
pub mod usage;

pub use app::without_transparent_huge_pages;
