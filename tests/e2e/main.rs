//! keygate's integration tests, as one test binary (linked once instead of once per file).
//!
//! Most modules run the real `keygate` binary against real upstreams over real HTTP, with
//! the shared harness in `common`; `store_conformance` and `usage` also drive the library's
//! stores directly. Run one module with e.g. `cargo test --test e2e proxy::`.

mod common;

mod allowlist;
mod api;
mod cluster;
mod cluster_outage;
mod console;
mod first_hour;
mod flood;
mod forward_auth;
mod h2;
mod hardening;
mod layout;
mod limits;
mod observability;
mod openapi;
mod patch;
mod pg_tls;
mod proxy;
mod quotas;
mod reload;
mod scan;
mod security;
mod store_conformance;
mod store_faults;
mod tls;
mod usage;
mod warm;
mod websocket;
