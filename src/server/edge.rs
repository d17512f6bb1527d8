//! The proxy listener's connection stack, outermost first: the connection cap, then
//! whichever stack is in force (`LiveApp`): TLS termination, the header deadline, Pingora's
//! HTTP proxy with keygate's hooks. A reload that changes what that stack was built from
//! (timeouts, HTTP/2 limits, TLS on or off) builds a new one for new connections; open
//! connections finish on the stack they began on. The certificate and the cap change in
//! place.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::protocols::Stream;
use pingora::protocols::http::v2::server::H2Options;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;
use rustls::sign::CertifiedKey;

use super::conn_limits::{ConnectionCap, HeaderDeadline};
use super::proxy::KeygateProxy;
use super::tls::{CertResolver, TlsEdge, TlsTermination};
use crate::config::{ConfigProblem, ServerConfig, load_certificate};
use crate::gateway::Gateway;
use crate::management::Management;
use crate::metrics::Metrics;

type Stack = TlsTermination<HeaderDeadline<HttpProxy<KeygateProxy>>>;

/// Serves each new connection with the stack in force when it arrived.
pub(crate) struct LiveApp {
    current: Arc<ArcSwap<Stack>>,
}

#[async_trait]
impl ServerApp for LiveApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stack = self.current.load_full();
        stack.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        let stack = self.current.load_full();
        stack.cleanup().await;
    }
}

/// What a stack is built from: a reload that changes none of it keeps the stack, and with
/// it Pingora's pool of upstream connections.
#[derive(Clone, PartialEq)]
struct StackSettings {
    keepalive: std::time::Duration,
    header_timeout: std::time::Duration,
    h2_streams: u32,
    max_header_bytes: usize,
    tls: bool,
}

impl StackSettings {
    fn of(server: &ServerConfig) -> Self {
        StackSettings {
            keepalive: server.keepalive_timeout,
            header_timeout: server.header_read_timeout,
            h2_streams: server.h2_max_concurrent_streams,
            max_header_bytes: server.max_header_bytes,
            tls: server.tls.is_some(),
        }
    }
}

/// Builds, and on reload rebuilds, the proxy listener's stack.
pub(crate) struct Edge {
    parts: StackParts,
    current: Arc<ArcSwap<Stack>>,
    built_for: Mutex<StackSettings>,
    resolver: Mutex<Option<Arc<CertResolver>>>,
    connection_limit: Arc<AtomicUsize>,
}

/// What every stack is made with.
struct StackParts {
    conf: Arc<ServerConf>,
    gateway: Arc<Gateway>,
    management: Arc<Management>,
    metrics: Arc<Metrics>,
}

impl StackParts {
    fn build(
        &self,
        server: &ServerConfig,
        resolver: Option<&Arc<CertResolver>>,
    ) -> anyhow::Result<Stack> {
        let hooks = KeygateProxy {
            gateway: Arc::clone(&self.gateway),
            management: Arc::clone(&self.management),
        };
        let mut proxy = pingora::proxy::http_proxy(&self.conf, hooks);
        // Let CONNECT reach request_filter, which refuses it with keygate's own JSON 405
        // (Pingora's built-in refusal is a bare 405).
        let mut options = HttpServerOptions::default();
        options.allow_connect_method_proxying = true;
        // An idle HTTP/2 connection is closed as an idle HTTP/1.1 keep-alive one is.
        options.h2_idle_timeout = Some(server.keepalive_timeout);
        proxy.server_options = Some(options);
        proxy.h2_options = Some(h2_options(server));
        let deadline =
            HeaderDeadline::new(proxy, server.header_read_timeout, server.keepalive_timeout);
        let tls = match (&server.tls, resolver) {
            (Some(_), Some(resolver)) => Some(TlsEdge::new(
                Arc::clone(resolver),
                server.header_read_timeout,
                &self.metrics,
            )?),
            _ => None,
        };
        Ok(TlsTermination::new(deadline, tls))
    }
}

/// A reload's new edge, checked and built, not yet in force.
pub(crate) struct PreparedEdge {
    settings: StackSettings,
    certificate: Option<(Arc<CertifiedKey>, i64)>,
    /// A new stack, when the settings it is built from changed.
    stack: Option<(Stack, Option<Arc<CertResolver>>)>,
    max_connections: usize,
}

impl Edge {
    /// The edge for `server`, and the service that listens on `server.listen` with it.
    pub(crate) fn start(
        conf: &Arc<ServerConf>,
        gateway: Arc<Gateway>,
        management: Arc<Management>,
        server: &ServerConfig,
    ) -> anyhow::Result<(Arc<Edge>, Service<ConnectionCap<LiveApp>>)> {
        let metrics = Arc::clone(&gateway.shared.metrics);
        let drain = gateway.shared.drain;
        let resolver = match &server.tls {
            Some(tls) => {
                let resolver = CertResolver::load(tls).map_err(|p| anyhow::anyhow!("{p}"))?;
                metrics.tls_certificate_expiry.set(tls.not_after);
                Some(Arc::new(resolver))
            }
            None => None,
        };
        let parts = StackParts {
            conf: Arc::clone(conf),
            gateway,
            management,
            metrics,
        };
        let stack = parts.build(server, resolver.as_ref())?;
        let edge = Edge {
            parts,
            current: Arc::new(ArcSwap::from_pointee(stack)),
            built_for: Mutex::new(StackSettings::of(server)),
            resolver: Mutex::new(resolver),
            connection_limit: Arc::new(AtomicUsize::new(server.max_connections)),
        };
        let app = LiveApp {
            current: Arc::clone(&edge.current),
        };
        let capped = ConnectionCap::new(app, Arc::clone(&edge.connection_limit), drain);
        let mut service = Service::new("keygate proxy".to_string(), capped);
        service.add_tcp(&server.listen.to_string());
        Ok((Arc::new(edge), service))
    }

    /// Reads the certificate files again (always: the names may be unchanged while the
    /// files were renewed) and builds a new stack if one is needed. Nothing changes yet.
    pub(crate) fn prepare(&self, server: &ServerConfig) -> Result<PreparedEdge, ConfigProblem> {
        let problem = |reason: String| ConfigProblem {
            path: "server.tls".into(),
            reason,
        };
        let certificate = match &server.tls {
            Some(tls) => {
                let loaded = load_certificate(&tls.cert_file, &tls.key_file)
                    .map_err(|p| problem(p.to_string()))?;
                Some((loaded.key, loaded.not_after))
            }
            None => None,
        };
        let settings = StackSettings::of(server);
        let stack = if *self.built_for.lock() == settings {
            None
        } else {
            let running = self.resolver.lock().clone();
            let resolver = match (&certificate, running) {
                (Some(_), Some(running)) => Some(running),
                (Some((key, _)), None) => Some(Arc::new(CertResolver::new(Arc::clone(key)))),
                (None, _) => None,
            };
            let stack = self
                .parts
                .build(server, resolver.as_ref())
                .map_err(|e| problem(e.to_string()))?;
            Some((stack, resolver))
        };
        Ok(PreparedEdge {
            settings,
            certificate,
            stack,
            max_connections: server.max_connections,
        })
    }

    /// Puts `prepared` in force for new connections and handshakes.
    pub(crate) fn commit(&self, prepared: PreparedEdge) {
        let mut resolver = self.resolver.lock();
        if let Some((stack, new_resolver)) = prepared.stack {
            if new_resolver.is_some() {
                *resolver = new_resolver;
            }
            self.current.store(Arc::new(stack));
            *self.built_for.lock() = prepared.settings;
        }
        let expiry = &self.parts.metrics.tls_certificate_expiry;
        match (prepared.certificate, resolver.as_ref()) {
            (Some((key, not_after)), Some(resolver)) => {
                resolver.set(key);
                expiry.set(not_after);
            }
            _ => expiry.set(0),
        }
        self.connection_limit
            .store(prepared.max_connections, Ordering::Relaxed);
    }
}

/// HTTP/2's counterparts of the HTTP/1.1 limits: streams per connection, the header block
/// (Pingora's 64 KiB default, or twice `max_header_bytes` when larger, so that a header
/// between the two still gets keygate's JSON 431; HPACK counts 32 bytes a field more).
fn h2_options(server: &ServerConfig) -> H2Options {
    let mut options = pingora::protocols::http::v2::server::default_h2_options();
    options.max_concurrent_streams(server.h2_max_concurrent_streams);
    let header_list = (2 * server.max_header_bytes).max(64 * 1024);
    options.max_header_list_size(u32::try_from(header_list).unwrap_or(u32::MAX));
    options
}
