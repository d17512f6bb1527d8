//! TLS for the edge tests: a CA and a `localhost` certificate made here with rcgen (no key
//! ships in the repository), a gateway config serving them, and a client speaking
//! HTTP/1.1 or HTTP/2 (by ALPN) over tokio-rustls with hyper's client halves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::GatewayConfig;

/// A CA's PEM and the issuer that signs with it.
pub(crate) struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub(crate) fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `localhost` and 127.0.0.1 valid from `not_before` to `not_after`
    /// (Unix seconds), written as `<stem>.pem` (leaf then CA: the chain) and
    /// `<stem>-key.pem` under `dir`.
    pub(crate) fn issue(&self, dir: &Path, stem: &str, validity: (i64, i64)) -> CertFiles {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("leaf params");
        params.not_before = time::OffsetDateTime::from_unix_timestamp(validity.0).expect("time");
        params.not_after = time::OffsetDateTime::from_unix_timestamp(validity.1).expect("time");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let files = CertFiles {
            cert_file: dir.join(format!("{stem}.pem")),
            key_file: dir.join(format!("{stem}-key.pem")),
        };
        std::fs::write(&files.cert_file, format!("{}{}", cert.pem(), self.pem)).expect("cert");
        std::fs::write(&files.key_file, key.serialize_pem()).expect("key");
        files
    }

    /// A leaf valid from an hour ago for a year.
    pub(crate) fn issue_current(&self, dir: &Path, stem: &str) -> CertFiles {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.issue(dir, stem, (now - 3600, now + 365 * 86_400))
    }
}

pub(crate) struct CertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl CertFiles {
    pub(crate) fn toml(&self) -> String {
        format!(
            "\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.cert_file.display(),
            self.key_file.display()
        )
    }
}

/// `config` serving a fresh certificate from a fresh CA; returns the CA.
pub(crate) fn with_tls(config: &mut GatewayConfig) -> TestCa {
    let ca = TestCa::new("keygate edge test CA");
    let files = ca.issue_current(config.dir.path(), "edge");
    config.server_extra.push_str(&files.toml());
    ca
}

/// Which protocol the client offers by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    H1,
    H2,
}

/// A rustls client trusting `ca_pem` only, offering `alpn`.
pub(crate) fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the gateway on `port`, naming `server_name` by SNI.
pub(crate) async fn handshake(
    port: u16,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    TlsConnector::from(config).connect(name, tcp).await
}

/// A response read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The code of keygate's error envelope, or "" for any other body.
    pub(crate) fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One connection to the gateway, HTTP/1.1 keep-alive or HTTP/2 (cloned for concurrent
/// streams).
pub(crate) struct EdgeClient {
    sender: Sender,
    port: u16,
    pub negotiated: Option<Vec<u8>>,
}

impl EdgeClient {
    pub(crate) async fn connect(port: u16, ca_pem: &str, proto: Proto) -> EdgeClient {
        let alpn: &[&[u8]] = match proto {
            Proto::H1 => &[b"http/1.1"],
            Proto::H2 => &[b"h2"],
        };
        let tls = handshake(port, "localhost", client_config(ca_pem, alpn))
            .await
            .expect("TLS handshake with keygate");
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        let sender = match proto {
            Proto::H1 => {
                let (sender, conn) = http1::handshake(io).await.expect("HTTP/1.1 handshake");
                tokio::spawn(conn);
                Sender::H1(sender)
            }
            Proto::H2 => {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("HTTP/2 handshake");
                tokio::spawn(conn);
                Sender::H2(sender)
            }
        };
        EdgeClient {
            sender,
            port,
            negotiated,
        }
    }

    /// Another handle on the same HTTP/2 connection (a new stream per request).
    pub(crate) fn stream(&self) -> Option<EdgeClient> {
        match &self.sender {
            Sender::H2(sender) => Some(EdgeClient {
                sender: Sender::H2(sender.clone()),
                port: self.port,
                negotiated: self.negotiated.clone(),
            }),
            Sender::H1(_) => None,
        }
    }

    pub(crate) async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send("GET", path, headers, Bytes::new()).await
    }

    pub(crate) async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Answer {
        let authority = format!("localhost:{}", self.port);
        let mut builder = http::Request::builder().method(method);
        builder = match self.sender {
            // HTTP/2 names scheme and authority as pseudo-headers, from an absolute URI.
            Sender::H2(_) => builder.uri(format!("https://{authority}{path}")),
            Sender::H1(_) => builder.uri(path).header("host", &authority),
        };
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(body)).expect("request");
        let response = tokio::time::timeout(Duration::from_secs(10), async {
            match &mut self.sender {
                Sender::H1(sender) => {
                    sender.ready().await?;
                    sender.send_request(request).await
                }
                Sender::H2(sender) => {
                    sender.ready().await?;
                    sender.send_request(request).await
                }
            }
        })
        .await
        .expect("an answer within 10 s")
        .expect("a response");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }
}

/// The value of one series, named exactly as `/metrics` prints it (labels included).
pub(crate) async fn metric(admin: &str, series: &str) -> f64 {
    super::scrape_metrics(admin)
        .await
        .lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .filter_map(|value| value.trim().parse::<f64>().ok())
        .sum()
}
