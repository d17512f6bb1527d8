//! What keygate reads from and writes to a Pingora session below the hooks: request bodies
//! it must see whole, and its own responses.

pub(crate) mod body;
pub(crate) mod respond;
