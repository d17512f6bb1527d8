//! Everything that implements Pingora's traits: the proxy hooks, the connection limits
//! and TLS termination around the proxy service (the `edge`, rebuilt by reloads), the ops listener, and the access log the
//! last hook writes.

pub(crate) mod access;
pub(crate) mod conn_limits;
pub(crate) mod edge;
pub(crate) mod ops;
pub(crate) mod proxy;
pub(crate) mod tls;
