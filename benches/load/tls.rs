//! The edge rows of the load bench: HTTPS with HTTP/1.1 keep-alive (one request at a time
//! on each of the connections) and HTTP/2 (one connection, as many streams in flight as
//! the other rows have connections), both with one valid key; and nginx terminating TLS
//! the same ways with its `map` check, when it is installed (else those rows are skipped
//! with a message). The certificate is made here (rcgen); the client is hyper over
//! tokio-rustls, on the generator's core, and the servers are pinned as in the other rows.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;

use super::*;

/// A certificate for `localhost`, self-signed: (certificate file, key file, PEM).
fn self_signed(dir: &Path) -> (String, String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("certificate");
    let (cert_file, key_file) = (dir.join("edge.pem"), dir.join("edge-key.pem"));
    std::fs::write(&cert_file, cert.pem()).expect("write certificate");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    let shown = |p: &Path| p.display().to_string();
    (shown(&cert_file), shown(&key_file), cert.pem())
}

fn client_config(ca_pem: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.expect("PEM")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

async fn connect(
    target: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Option<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(target).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("localhost").ok()?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .ok()?;
    Some(TokioIo::new(tls))
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn get(&mut self, target: SocketAddr, key: &str) -> Option<u16> {
        let builder = http::Request::builder().header("x-api-key", key);
        let response = match self {
            Sender::H1(s) => {
                let request = builder
                    .uri("/x")
                    .header("host", "localhost")
                    .body(Empty::new())
                    .ok()?;
                s.ready().await.ok()?;
                s.send_request(request).await.ok()?
            }
            Sender::H2(s) => {
                let uri = format!("https://localhost:{}/x", target.port());
                let request = builder.uri(uri).body(Empty::new()).ok()?;
                s.ready().await.ok()?;
                s.send_request(request).await.ok()?
            }
        };
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    }
}

/// `connections` HTTP/1.1 connections, or one HTTP/2 connection with `connections`
/// streams in flight, for `seconds` after a warm-up.
async fn drive_tls(
    target: SocketAddr,
    ca_pem: &str,
    key: &str,
    h2: bool,
    connections: usize,
    seconds: u64,
) -> RowResult {
    let mut senders = Vec::new();
    if h2 {
        let io = connect(target, client_config(ca_pem, b"h2"))
            .await
            .expect("TLS connection");
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        senders.extend((0..connections).map(|_| Sender::H2(sender.clone())));
    } else {
        let config = client_config(ca_pem, b"http/1.1");
        for _ in 0..connections {
            let io = connect(target, Arc::clone(&config))
                .await
                .expect("TLS connection");
            let (sender, conn) = http1::handshake(io).await.expect("HTTP/1.1 handshake");
            tokio::spawn(conn);
            senders.push(Sender::H1(sender));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let warmup = Duration::from_millis(500);
    let started = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let (stop, key) = (Arc::clone(&stop), key.to_string());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(100_000);
                let mut statuses = std::collections::BTreeMap::new();
                let mut errors = 0u64;
                let mut served = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let Some(status) = sender.get(target, &key).await else {
                        errors += 1;
                        break;
                    };
                    served += 1;
                    if started.elapsed() > warmup {
                        latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        *statuses.entry(status).or_insert(0u64) += 1;
                    }
                }
                (latencies, statuses, errors, served)
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    let measured_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    RowResult::gather(measured_from.elapsed(), tasks).await
}

/// nginx terminating TLS (HTTP/1.1 and HTTP/2 by ALPN) with the same `map` check.
fn start_nginx_tls(dir: &Path, upstream: SocketAddr, listen: u16, key: &str) -> Option<Gateway> {
    let (cert_file, key_file, _) = self_signed(dir);
    let listen_tls = format!(
        "listen 127.0.0.1:{listen} ssl http2;\n    ssl_certificate {cert_file};\n    \
         ssl_certificate_key {key_file};\n    ssl_protocols TLSv1.2 TLSv1.3;"
    );
    let block = super::nginx_map_check(upstream, key, &listen_tls);
    super::spawn_nginx(dir, &block, listen, "nginx (TLS)")
}

/// What the edge rows need: the run's shape and the servers' placement.
pub(crate) struct EdgeRun<'a> {
    pub dir: &'a Path,
    pub upstream: SocketAddr,
    pub key: &'a str,
    pub threads: usize,
    pub cores: usize,
    pub server_core: usize,
    pub connections: usize,
    pub seconds: u64,
}

impl EdgeRun<'_> {
    /// The rows `wanted` names, each beside nginx's when nginx is there.
    pub(crate) fn measure(
        &self,
        runtime: &tokio::runtime::Runtime,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Vec<Measured> {
        let rows = [
            (
                "tls-valid",
                "keygate, HTTPS HTTP/1.1 keep-alive, one valid key",
                false,
            ),
            (
                "h2-valid",
                "keygate, HTTP/2 (one connection, many streams), one valid key",
                true,
            ),
        ];
        let nginx_rows = [
            (
                "nginx-tls-valid",
                "nginx map check, HTTPS HTTP/1.1 keep-alive, valid key",
                false,
            ),
            (
                "nginx-h2-valid",
                "nginx map check, HTTP/2 (one connection), valid key",
                true,
            ),
        ];
        let mut results = Vec::new();
        if rows.iter().any(|r| wanted(r.0)) {
            let tls_dir = self.dir.join("tls-gateway");
            std::fs::create_dir_all(&tls_dir).expect("tls dir");
            let format = KeyFormat::new("kg");
            let store = SledStore::open(&tls_dir.join("store")).expect("store");
            runtime
                .block_on(store.import(&[KeyRecord::for_key(&format, self.key, "bench", 0)]))
                .expect("import the key");
            drop(store);
            let (cert_file, key_file, pem) = self_signed(&tls_dir);
            let store = format!(
                "{}\n\n[server.tls]\ncert_file = \"{cert_file}\"\nkey_file = \"{key_file}\"",
                sled_store(&tls_dir)
            );
            let listen = free_port();
            let gateway = start_keygate(
                &tls_dir,
                &store,
                &[],
                self.upstream,
                listen,
                free_port(),
                self.threads,
            );
            if self.cores > 1 {
                pin(gateway.child.id(), self.server_core);
            }
            let target = ([127, 0, 0, 1], listen).into();
            for (name, label, h2) in rows.into_iter().filter(|r| wanted(r.0)) {
                results.push(self.row(runtime, name, label, target, &pem, h2));
            }
        }
        if nginx_rows.iter().any(|r| wanted(r.0)) {
            let nginx_dir = self.dir.join("nginx-tls");
            std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
            let listen = free_port();
            let Some(nginx) = start_nginx_tls(&nginx_dir, self.upstream, listen, self.key) else {
                println!("nginx is not installed: its HTTPS and HTTP/2 rows are skipped");
                return results;
            };
            if self.cores > 1 {
                pin(nginx.child.id(), self.server_core);
            }
            let pem = std::fs::read_to_string(nginx_dir.join("edge.pem")).expect("pem");
            let target = ([127, 0, 0, 1], listen).into();
            for (name, label, h2) in nginx_rows.into_iter().filter(|r| wanted(r.0)) {
                results.push(self.row(runtime, name, label, target, &pem, h2));
            }
        }
        results
    }

    fn row(
        &self,
        runtime: &tokio::runtime::Runtime,
        name: &'static str,
        label: &'static str,
        target: SocketAddr,
        pem: &str,
        h2: bool,
    ) -> Measured {
        let (r, cpu) = super::cores::measured(|| {
            runtime.block_on(drive_tls(
                target,
                pem,
                self.key,
                h2,
                self.connections,
                self.seconds,
            ))
        });
        let mut statuses: Vec<String> =
            r.statuses.iter().map(|(s, n)| format!("{s}×{n}")).collect();
        if r.errors > 0 {
            statuses.push(format!("errors×{}", r.errors));
        }
        (
            name,
            label,
            r.rps(),
            r.percentile(0.5),
            r.percentile(0.99),
            statuses.join(" "),
            cpu,
        )
    }
}

/// An edge row's rate over nginx's doing the same (`nginx-<name>`), when it ran.
pub(crate) fn nginx_ratio(results: &[Measured], name: &str, rps: f64) -> Option<f64> {
    let nginx = format!("nginx-{name}");
    results.iter().find(|r| r.0 == nginx).map(|r| rps / r.2)
}
