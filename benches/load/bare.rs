//! The framework's floor (issue 21): a bare Pingora passthrough, built from the same
//! Pingora version and the server options keygate uses (its thread count, no grace period,
//! upstream keep-alive pool of 256, mimalloc), with no keygate code at all. Every keygate
//! row reads against it.
//!
//! It runs as this bench binary started again with
//! `LOAD_BARE_PINGORA=<listen>,<upstream>,<threads>`
//! (a process of its own, pinned to the server core like the gateway).

use std::net::SocketAddr;
use std::process::Stdio;

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::Server;
use pingora::server::configuration::ServerConf;

use super::{Gateway, Row, free_port, pin, request, wait_for_port};

const ENV: &str = "LOAD_BARE_PINGORA";

struct Passthrough {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

/// When this process was started as the bare server: serves until killed, never returns.
pub(crate) fn serve_if_asked() {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    let mut parts = spec.split(',');
    let mut next = || {
        parts
            .next()
            .expect("LOAD_BARE_PINGORA=listen,upstream,threads")
    };
    let (listen, upstream, threads) = (next(), next(), next());
    let upstream: SocketAddr = upstream.parse().expect("upstream address");
    // As keygate's own process: the floor must not pay a cost keygate avoids.
    keygate::without_transparent_huge_pages();
    let conf = ServerConf {
        threads: threads.parse().expect("threads"),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        upstream_keepalive_pool_size: 256,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service =
        pingora::proxy::http_proxy_service(&server.configuration, Passthrough { upstream });
    service.add_tcp(listen);
    server.add_service(service);
    server.run_forever();
}

/// The row: the same request as keygate's `auth = "none"` row.
pub(crate) fn row(bare: SocketAddr) -> Row {
    (
        "bare",
        "bare Pingora passthrough (no keygate code)",
        bare,
        vec![request("/open/x", &[])],
    )
}

/// The bare server in front of `upstream`, pinned to `server_core` when there are cores
/// to spare; None when it was not asked for.
pub(crate) fn start(
    wanted: bool,
    upstream: SocketAddr,
    threads: usize,
    cores: usize,
    server_core: usize,
) -> Option<(Gateway, SocketAddr)> {
    if !wanted {
        return None;
    }
    let port = free_port();
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let exe = std::env::current_exe().expect("the bench's own path");
    let exe = exe.to_str().expect("the bench's path is UTF-8");
    let child = super::instructions::server_command(exe)
        .env(ENV, format!("{listen},{upstream},{threads}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the bare Pingora server");
    wait_for_port(port, "the bare Pingora server");
    super::instructions::register(port, child.id());
    // Once it listens, every thread it will serve with exists: all of them are pinned.
    if cores > 1 {
        pin(child.id(), server_core);
    }
    Some((Gateway { child }, listen))
}
