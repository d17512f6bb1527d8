//! Pure request logic, no Pingora session: the request target, paths as routed and as a
//! lenient upstream may read them, the Host, credentials, body framing.

pub mod body;
pub mod credentials;
pub mod host;
pub mod path;
pub mod target;
