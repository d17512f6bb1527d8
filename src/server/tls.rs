//! TLS termination on `listen` (`[server.tls]`), done by keygate rather than by Pingora's
//! listener: Pingora's gives a handshake 60 s, outside the connection cap, and only logs
//! its failures. Here the handshake runs inside the cap, within
//! `header_read_timeout_seconds`, every failure is counted
//! (`keygate_tls_handshake_errors_total`), and plain HTTP sent to the TLS port gets a
//! plain-HTTP 400 instead of a silent close. ALPN offers `h2` then `http/1.1`; Pingora
//! then serves either on the TLS stream. The certificate sits behind a resolver so that a
//! reload swaps it for new handshakes, keeping the old one when the new files are bad.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::RwLock;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{ALPN, Peek, Stream};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout_at};

use crate::config::{CertificateProblem, TlsConfig, load_certificate};
use crate::metrics::Metrics;

/// The first byte of every TLS connection: a handshake record (RFC 8446 5.1).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// How long a refused plain-HTTP client gets to read its 400 before the socket closes.
const PLAINTEXT_LINGER: Duration = Duration::from_secs(1);

/// Whether the request came over TLS.
pub(crate) fn is_tls(session: &Session) -> bool {
    session
        .digest()
        .is_some_and(|digest| digest.ssl_digest.is_some())
}

/// HTTP/2 connections still waiting for their first request, by the address of their TLS
/// digest, which every stream of the connection shares (the entry holds the digest, so the
/// address cannot be reused while it is there). Pingora's HTTP/2 handshake has no
/// deadline: without this a client could finish TLS, never send its preface, and hold a
/// connection slot for ever.
type Waiting = DashMap<usize, (Arc<SslDigest>, oneshot::Sender<()>)>;
static FIRST_REQUEST: LazyLock<Waiting> = LazyLock::new(DashMap::new);

/// Marks an HTTP/2 connection as past its first request (from `early_request_filter`).
pub(crate) fn h2_request_seen(session: &Session) {
    if !session.is_http2() || FIRST_REQUEST.is_empty() {
        return;
    }
    let Some(digest) = session.digest().and_then(|d| d.ssl_digest.as_ref()) else {
        return;
    };
    if let Some((_, (_, seen))) = FIRST_REQUEST.remove(&(Arc::as_ptr(digest) as usize)) {
        let _ = seen.send(());
    }
}

/// The listener's certificate, swapped whole on reload.
#[derive(Debug)]
pub(crate) struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    pub(crate) fn load(config: &TlsConfig) -> Result<Self, CertificateProblem> {
        let loaded = load_certificate(&config.cert_file, &config.key_file)?;
        Ok(CertResolver::new(loaded.key))
    }

    pub(crate) fn new(key: Arc<CertifiedKey>) -> Self {
        CertResolver {
            current: RwLock::new(key),
        }
    }

    /// New handshakes get `key`; open connections keep the certificate they were given.
    pub(crate) fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write() = key;
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read()))
    }
}

/// TLS 1.2 and 1.3 only, rustls' (ring's) suites: AEAD ciphers with forward secrecy.
fn server_config(resolver: Arc<CertResolver>) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The handshake failure counters, resolved once.
struct HandshakeErrors {
    failed: IntCounter,
    timeout: IntCounter,
    plaintext: IntCounter,
}

/// What terminating TLS needs: the acceptor and its deadline.
pub(crate) struct TlsEdge {
    acceptor: Acceptor,
    handshake_timeout: Duration,
    errors: HandshakeErrors,
}

impl TlsEdge {
    pub(crate) fn new(
        resolver: Arc<CertResolver>,
        handshake_timeout: Duration,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let config = server_config(resolver)?;
        let counter = |reason: &str| metrics.tls_handshake_errors.with_label_values(&[reason]);
        Ok(TlsEdge {
            acceptor: Acceptor::from_server_config(Arc::new(config)),
            handshake_timeout,
            errors: HandshakeErrors {
                failed: counter("failed"),
                timeout: counter("timeout"),
                plaintext: counter("plaintext"),
            },
        })
    }

    /// The TLS stream, or None when the connection is done with (counted unless the client
    /// just closed without a byte, as TCP health checks do).
    async fn terminate(&self, stream: Stream) -> Option<Stream> {
        let Ok(l4) = stream.into_any().downcast::<L4Stream>() else {
            tracing::error!("TLS listener got a connection that is not a TCP stream");
            return None;
        };
        let mut l4 = *l4;
        let deadline = Instant::now() + self.handshake_timeout;
        let mut first = [0u8; 1];
        match timeout_at(deadline, l4.try_peek(&mut first)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return None,
            Err(_) => {
                self.errors.timeout.inc();
                return None;
            }
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            self.errors.plaintext.inc();
            refuse_plaintext(l4).await;
            return None;
        }
        match timeout_at(deadline, self.acceptor.tls_handshake(l4)).await {
            Ok(Ok(tls)) => Some(Box::new(tls)),
            Ok(Err(e)) => {
                self.errors.failed.inc();
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.errors.timeout.inc();
                None
            }
        }
    }
}

/// Plain HTTP on the TLS port: a readable 400 (as nginx answers it), then a lingering
/// close so that the unread request does not turn the close into a reset that hides it.
async fn refuse_plaintext(mut stream: L4Stream) {
    let request_id = crate::keys::new_ulid().to_string();
    let body = crate::error::error_body(
        "bad_request",
        "this port speaks HTTPS only: send the request with https://",
        &request_id,
        None,
    );
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let written = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await?;
        AsyncWriteExt::shutdown(&mut stream).await
    };
    if written.await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(PLAINTEXT_LINGER, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The proxy behind TLS when `[server.tls]` is set, as is otherwise.
pub(crate) struct TlsTermination<A> {
    inner: Arc<A>,
    edge: Option<TlsEdge>,
}

impl<A> TlsTermination<A> {
    pub(crate) fn new(inner: A, edge: Option<TlsEdge>) -> Self {
        TlsTermination {
            inner: Arc::new(inner),
            edge,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for TlsTermination<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(edge) = &self.edge else {
            return self.inner.process_new(stream, shutdown).await;
        };
        let tls = edge.terminate(stream).await?;
        let digest = tls.get_ssl_digest();
        let waiting = match digest {
            Some(digest) if matches!(tls.selected_alpn_proto(), Some(ALPN::H2)) => {
                let (seen, first) = oneshot::channel();
                let key = Arc::as_ptr(&digest) as usize;
                FIRST_REQUEST.insert(key, (digest, seen));
                Some((key, first))
            }
            _ => None,
        };
        // Pingora would hand a returned stream back to `process_new`, which would then
        // try a second handshake on it; the HTTP layer has served all it will anyway.
        let work = self.inner.process_new(tls, shutdown);
        let Some((key, first)) = waiting else {
            work.await;
            return None;
        };
        tokio::pin!(work);
        tokio::select! {
            biased;
            _ = &mut work => {}
            _ = first => {
                work.await;
            }
            // Dropping the connection's future closes it.
            _ = tokio::time::sleep(edge.handshake_timeout) => edge.errors.timeout.inc(),
        }
        FIRST_REQUEST.remove(&key);
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}
