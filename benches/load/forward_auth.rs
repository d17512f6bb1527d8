//! The forward-auth row (issue 19): nginx in front with `auth_request` asking keygate about
//! every request, configured by the shipped recipe (`config/nginx-forward-auth.conf`),
//! beside keygate proxying by itself and nginx's own `map` check. nginx and keygate both
//! run on the server core, so the row shows what the extra hop costs on one core.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use super::{Gateway, free_port, pin, wait_for_port};

/// nginx with the shipped recipe, pointed at `keygate` and `upstream` (and pinned to core
/// `pin_to`); None when nginx is not installed.
pub(crate) fn start(
    dir: &Path,
    keygate: SocketAddr,
    upstream: SocketAddr,
    pin_to: Option<usize>,
) -> Option<(Gateway, SocketAddr)> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
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
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         {recipe}\n}}\n"
    );
    std::fs::create_dir_all(dir).ok()?;
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).ok()?;
    let child = Command::new(nginx)
        .args([
            "-p",
            dir.to_str()?,
            "-c",
            path.to_str()?,
            "-g",
            "daemon off;",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()?;
    wait_for_port(listen, "nginx (auth_request)");
    if let Some(core) = pin_to {
        pin(child.id(), core);
    }
    Some((Gateway { child }, ([127, 0, 0, 1], listen).into()))
}
