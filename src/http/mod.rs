//! Pure request logic, no Pingora session: the request target, paths as routed and as a
//! lenient upstream may read them, the Host, credentials, forwarding headers, body framing,
//! upgrades, the original request of a forward-auth call.

pub(crate) mod body;
pub mod credentials;
pub(crate) mod forwarded;
pub(crate) mod host;
pub(crate) mod names;
pub(crate) mod original;
pub mod path;
pub(crate) mod target;
pub(crate) mod upgrade;
