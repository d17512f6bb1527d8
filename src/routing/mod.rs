//! Where a request goes: routes matched by longest prefix (and host), and each route's
//! upstream pool with its health checks, and the DNS names its upstreams may have.

mod dns;
mod health;
mod pool;
mod router;

pub(crate) use dns::unresolved_names;
pub(crate) use health::HealthChecks;
pub(crate) use pool::{RouteEnv, build_routes};
pub(crate) use router::{Route, Router};
