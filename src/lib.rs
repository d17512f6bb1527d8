//! keygate: an API-key authentication gateway built on Pingora.
//!
//! Layout:
//! - `cli`      the `keygate` command line (serve, check, offline key commands)
//! - `app`      assembles store, cache, routes and Pingora services; runs and stops them
//! - `config`   TOML as written -> validated, typed configuration
//! - `proxy`    the Pingora `ProxyHttp` hooks; they only delegate
//! - `guard`    connection cap and header deadline around the proxy service
//! - `gateway`  the request path, top to bottom: route, credentials, key, scope, usage
//! - `path`     request paths as routed, and as a lenient upstream may read them
//! - `auth`     credential extraction from headers (pure functions)
//! - `body`     chunked request bodies, read whole before they are forwarded
//! - `keys`     key format, generation, hashing, the persisted record
//! - `store`    the `KeyStore` trait, the sled store, the moka-cached key index
//! - `service`  key lifecycle operations shared by the API and the CLI
//! - `api`      the management API handlers
//! - `ratelimit` GCRA limits (per key, per route, management calls)
//! - `usage`    in-memory usage counters and their flusher
//! - `metrics`  Prometheus families in keygate's own registry
//! - `admin`    the admin listener: /metrics, /healthz, /readyz
//! - `upstream` routes, load balancers, health checks, peers
//! - `respond`  the one writer of keygate's own responses
//! - `access`   per-request metrics and the access log
//! - `logging`  log set-up
//! - `error`    the request path's refusals and the JSON error body

pub mod access;
pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod body;
pub mod cli;
pub mod config;
pub mod error;
pub mod gateway;
pub mod guard;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod ratelimit;
pub mod respond;
pub mod service;
pub mod store;
pub mod upstream;
pub mod usage;
