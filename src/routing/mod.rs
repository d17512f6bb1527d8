//! Where a request goes: routes matched by longest prefix (and host), and each route's
//! upstream pool with its health checks.

mod pool;
mod router;

pub(crate) use pool::build_route;
pub(crate) use router::{Route, Router};
