//! The forward-auth row (issue 19): nginx in front with `auth_request` asking keygate about
//! every request, configured by the shipped recipe (`config/nginx-forward-auth.conf`),
//! beside keygate proxying by itself and nginx's own `map` check. nginx and keygate both
//! run on the server core, so the row shows what the extra hop costs on one core.

use std::net::SocketAddr;
use std::path::Path;

use super::{Gateway, free_port, pin, spawn_nginx};

/// nginx with the shipped recipe, pointed at `keygate` and `upstream` (and pinned to core
/// `pin_to`); None when nginx is not installed.
pub(crate) fn start(
    dir: &Path,
    keygate: SocketAddr,
    upstream: SocketAddr,
    pin_to: Option<usize>,
) -> Option<(Gateway, SocketAddr)> {
    let recipe = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/nginx-forward-auth.conf"
    ))
    .ok()?;
    let listen = free_port();
    let recipe = recipe
        .replace("127.0.0.1:8080", &keygate.to_string())
        .replace("127.0.0.1:3000", &upstream.to_string())
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{listen}"))
        // The bench's connections make 10⁸ requests each at most.
        .replace(
            "listen 127.0.0.1",
            "keepalive_requests 100000000;\n    listen 127.0.0.1",
        );
    let gateway = spawn_nginx(dir, &recipe, listen, "nginx (auth_request)")?;
    if let Some(core) = pin_to {
        pin(gateway.child.id(), core);
    }
    Some((gateway, ([127, 0, 0, 1], listen).into()))
}
