//! The PostgreSQL store's connection security (contract section 13): the connection
//! string's `sslmode` with TLS by rustls, `[store] ca_file`, `[store] statement_timeout_ms`,
//! and `keygate_invalidation_listener_connected`.
//!
//! The TLS tests share one PostgreSQL server of their own (`pg::start_tls_server`) with
//! `ssl = on`, a certificate for `localhost` and 127.0.0.1 from a CA made here with rcgen,
//! and a `pg_hba.conf` that takes TCP clients over TLS only (`hostssl`): a plain
//! connection is refused. Each test gets its own database on it and runs the real
//! `keygate serve`. The statement-timeout and gauge tests use the shared plain server.

use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::pg;
use crate::common::*;

const ADMIN: &str = "pg-tls-admin-token-padded-to-32-chars";
const LISTENER_APP: &str = "keygate-invalidation-listener";
const GAUGE: &str = "keygate_invalidation_listener_connected";

/// TCP clients must use TLS; the harness itself comes in over the Unix socket.
const HOSTSSL_ONLY: &str = "local all all trust\nhostssl all all 127.0.0.1/32 trust\n";

/// The TLS server, and the PEM of the CA that signed its certificate.
struct TlsDatabase {
    admin_url: String,
    port: u16,
    ca_pem: String,
}

/// A CA (`rcgen`), self-signed: its certificate PEM and the issuer to sign with.
fn new_ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), rcgen::Issuer::new(params, key))
}

static TLS_DATABASE: LazyLock<TlsDatabase> = LazyLock::new(|| {
    let (ca_pem, issuer) = new_ca("keygate test database CA");
    let key = rcgen::KeyPair::generate().expect("server key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    let (admin_url, port) = pg::start_tls_server(&pg::ServerTls {
        cert_pem: &cert.pem(),
        key_pem: &key.serialize_pem(),
        hba: HOSTSSL_ONLY,
    });
    TlsDatabase {
        admin_url,
        port,
        ca_pem,
    }
});

/// A new database on the TLS server; returns its name.
fn tls_database() -> String {
    static DATABASES: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "kg_tls_{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed)
    );
    pg::execute(&TLS_DATABASE.admin_url, &format!("CREATE DATABASE {name}"))
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    name
}

/// A URL for `database` on the TLS server over TCP, with `query` (e.g. `sslmode=...`).
fn tls_url(database: &str, host: &str, query: &str) -> String {
    let port = TLS_DATABASE.port;
    format!("postgres://postgres@{host}:{port}/{database}?{query}")
}

/// Whether every connection of `application_name` to `database` uses TLS; None while
/// there is none.
fn all_tls(admin_url: &str, database: &str, application_name: &str) -> Option<bool> {
    let rows = pg::query(
        admin_url,
        &format!(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = '{database}' AND a.application_name = '{application_name}'"
        ),
    )
    .expect("pg_stat_ssl");
    (!rows.is_empty()).then(|| rows.iter().all(|row| row[0] == "t"))
}

/// `keygate serve` on a PostgreSQL store, one route "/" to an upstream.
struct PgGateway {
    config: GatewayConfig,
    gateway: Gateway,
    _upstream: Upstream,
}

impl PgGateway {
    /// Starts the gateway on `db_url` with `store_extra` lines in `[store]` (may name
    /// `{dir}`, the gateway's temp dir, e.g. for a CA file written there by `files`).
    /// Ok once it serves; Err(its stderr) if it exits first.
    async fn start(
        db_url: &str,
        store_extra: &str,
        files: &[(&str, &str)],
    ) -> Result<PgGateway, String> {
        let upstream = Upstream::start("up").await;
        let config = GatewayConfig::single_route(&[upstream.addr]);
        for (name, text) in files {
            std::fs::write(config.dir.path().join(name), text).expect("write file");
        }
        let store_extra = store_extra.replace("{dir}", &config.dir.path().display().to_string());
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             threads = 2\nshutdown_grace_seconds = 0\naccess_log = \"off\"\n\n\
             [store]\nbackend = \"postgres\"\nurl_env = \"KEYGATE_DATABASE_URL\"\n\
             pool_size = 2\nconnect_timeout_seconds = 2\n{store_extra}\n\n\
             [management]\nadmin_token_env = \"KEYGATE_ADMIN_TOKEN\"\n\n{routes}",
            listen = config.listen,
            admin = config.admin,
            routes = config.extra,
        );
        std::fs::write(config.path(), text).expect("write config");
        let stderr_path = config.dir.path().join("stderr.log");
        let child = Command::new(BIN)
            .args(["serve", "--config", config.path().to_str().expect("utf-8")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(&stderr_path).expect("log file"),
            ))
            .env("KEYGATE_DATABASE_URL", db_url)
            .env("KEYGATE_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("spawn keygate");
        let mut gateway = PgGateway {
            gateway: Gateway {
                child: Some(child),
                base: config.base_url(),
                admin: config.admin_url(),
            },
            config,
            _upstream: upstream,
        };
        match gateway.wait_ready().await {
            Ok(()) => Ok(gateway),
            Err(status) => {
                let stderr = gateway.stderr();
                eprintln!("keygate exited ({status}): {stderr}");
                Err(format!("exited {status}: {stderr}"))
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.config.dir.path().join("stderr.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.gateway.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(status);
            }
            let healthz = client()
                .get(format!("{}/healthz", self.gateway.admin))
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            if let Ok(resp) = healthz
                && resp.text().await.unwrap_or_default().contains("keygate")
                && std::net::TcpStream::connect(("127.0.0.1", self.config.listen)).is_ok()
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "keygate neither served nor exited; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// POST /_keygate/keys as the admin: (status, body).
    async fn create_key(&self) -> (u16, serde_json::Value) {
        let resp = client()
            .post(format!("{}/_keygate/keys", self.gateway.base))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"owner": "alice"}))
            .send()
            .await
            .expect("create request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    /// Creates a key through the API and uses it through the proxy.
    async fn assert_serves_keys(&self) {
        let (status, body) = self.create_key().await;
        assert_eq!(status, 201, "create answered {status}: {body}");
        let key = body["key"].as_str().expect("key");
        let resp = client()
            .get(format!("{}/work", self.gateway.base))
            .header("x-api-key", key)
            .send()
            .await
            .expect("proxied request");
        assert_eq!(error_code(resp).await, (200, String::new()));
    }

    /// The value of the listener gauge, None while it is not exported.
    async fn listener_gauge(&self) -> Option<i64> {
        scrape_metrics(&self.gateway.admin)
            .await
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{GAUGE} ")))
            .and_then(|value| value.trim().parse().ok())
    }

    async fn wait_gauge(&self, want: i64, within: Duration) -> bool {
        eventually(within, || async {
            self.listener_gauge().await == Some(want)
        })
        .await
    }
}

fn ca_file(pem: &str) -> [(&str, &str); 1] {
    [("db-ca.pem", pem)]
}

const CA_FILE: &str = "ca_file = \"{dir}/db-ca.pem\"";

#[tokio::test]
async fn verify_full_with_the_database_ca_serves_keys_over_tls() {
    let database = tls_database();
    let url = tls_url(&database, "127.0.0.1", "sslmode=verify-full");
    let gateway = PgGateway::start(&url, CA_FILE, &ca_file(&TLS_DATABASE.ca_pem))
        .await
        .unwrap_or_else(|stderr| panic!("verify-full with the right CA must start: {stderr}"));
    gateway.assert_serves_keys().await;
    assert!(
        gateway.wait_gauge(1, Duration::from_secs(10)).await,
        "the invalidation listener must connect over TLS too; stderr:\n{}",
        gateway.stderr()
    );
    // Every connection the gateway holds, pool and listener, is encrypted (the server takes
    // no other, but say so from the server's side).
    let admin = &TLS_DATABASE.admin_url;
    assert_eq!(all_tls(admin, &database, "keygate"), Some(true));
    assert_eq!(all_tls(admin, &database, LISTENER_APP), Some(true));

    // The host name as a DNS name (`localhost`) is checked as well as the IP address.
    let by_name = tls_url(&tls_database(), "localhost", "sslmode=verify-full");
    let named = PgGateway::start(&by_name, CA_FILE, &ca_file(&TLS_DATABASE.ca_pem))
        .await
        .unwrap_or_else(|stderr| panic!("verify-full for localhost must start: {stderr}"));
    named.assert_serves_keys().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_start() {
    let (other_ca, _) = new_ca("some other CA");
    for mode in ["verify-full", "verify-ca"] {
        let url = tls_url(&tls_database(), "127.0.0.1", &format!("sslmode={mode}"));
        let Err(stderr) = PgGateway::start(&url, CA_FILE, &ca_file(&other_ca)).await else {
            panic!("sslmode={mode} accepted a certificate its CA file did not sign");
        };
        assert!(
            stderr.contains("cannot open the postgres store")
                && stderr.contains("invalid peer certificate")
                && stderr.contains("UnknownIssuer"),
            "sslmode={mode}: the refusal must say the certificate's issuer is unknown: {stderr}"
        );
    }
    // Without ca_file, verify-full checks against the system's roots, which do not know
    // this test CA either.
    let url = tls_url(&tls_database(), "127.0.0.1", "sslmode=verify-full");
    let Err(stderr) = PgGateway::start(&url, "", &[]).await else {
        panic!("verify-full trusted a private CA through the system roots");
    };
    assert!(
        stderr.contains("UnknownIssuer") || stderr.contains("CA certificates"),
        "{stderr}"
    );
}

#[tokio::test]
async fn verify_ca_ignores_the_host_name_and_verify_full_does_not() {
    // The TCP connection goes to 127.0.0.1 (`hostaddr`); the certificate is checked against
    // `host`, a name it does not carry.
    let query = |mode: &str| format!("hostaddr=127.0.0.1&sslmode={mode}");
    let url = tls_url(&tls_database(), "db.invalid", &query("verify-full"));
    let Err(stderr) = PgGateway::start(&url, CA_FILE, &ca_file(&TLS_DATABASE.ca_pem)).await else {
        panic!("verify-full accepted a certificate for another host name");
    };
    assert!(
        stderr.contains("invalid peer certificate") && stderr.contains("db.invalid"),
        "the refusal must name the host the certificate is not valid for: {stderr}"
    );

    let url = tls_url(&tls_database(), "db.invalid", &query("verify-ca"));
    let gateway = PgGateway::start(&url, CA_FILE, &ca_file(&TLS_DATABASE.ca_pem))
        .await
        .unwrap_or_else(|stderr| panic!("verify-ca checks the chain only: {stderr}"));
    gateway.assert_serves_keys().await;
}

#[tokio::test]
async fn disable_is_refused_by_a_hostssl_server_where_prefer_and_require_encrypt() {
    let database = tls_database();
    let url = tls_url(&database, "127.0.0.1", "sslmode=disable");
    let Err(stderr) = PgGateway::start(&url, "", &[]).await else {
        panic!("a plain connection got past a hostssl-only pg_hba.conf");
    };
    assert!(
        stderr.contains("no pg_hba.conf entry") && stderr.contains("no encryption"),
        "sslmode=disable must reach the server in plain text and be refused there: {stderr}"
    );

    // prefer (also the default, without sslmode) and require use TLS when the server offers
    // it, and check no certificate: nothing on this machine trusts the test CA. (So neither
    // stops a man in the middle: use verify-full for that.)
    for query in ["", "sslmode=prefer", "sslmode=require"] {
        let database = tls_database();
        let url = tls_url(&database, "127.0.0.1", query);
        let gateway = PgGateway::start(&url, "", &[])
            .await
            .unwrap_or_else(|stderr| panic!("`{query}` must connect over TLS: {stderr}"));
        gateway.assert_serves_keys().await;
        let admin = &TLS_DATABASE.admin_url;
        assert_eq!(all_tls(admin, &database, "keygate"), Some(true), "{query}");
    }
}

#[tokio::test]
async fn statement_timeout_bounds_every_statement_of_the_pool() {
    let db = pg::fresh_database();
    let gateway = PgGateway::start(&db, "statement_timeout_ms = 300", &[])
        .await
        .unwrap_or_else(|stderr| panic!("gateway: {stderr}"));
    let (status, body) = gateway.create_key().await;
    assert_eq!(status, 201, "{body}");

    // Another session holds the keys table: the gateway's INSERT waits for the lock until
    // the server cancels it, 300 ms in.
    let (holder, connection) = tokio_postgres::connect(&db, tokio_postgres::NoTls)
        .await
        .expect("a direct connection");
    let driver = tokio::spawn(connection);
    holder
        .batch_execute("BEGIN; LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock keys");
    let started = Instant::now();
    let (status, body) = gateway.create_key().await;
    let took = started.elapsed();
    assert_eq!(status, 503, "a create stuck on a lock is cut short: {body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "answered after {took:?}, not about 300 ms"
    );
    assert!(
        gateway
            .stderr()
            .contains("canceling statement due to statement timeout"),
        "the server cancelled the statement; stderr:\n{}",
        gateway.stderr()
    );

    holder.batch_execute("ROLLBACK").await.expect("unlock");
    drop(holder);
    let _ = driver.await;
    let (status, body) = gateway.create_key().await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn the_listener_gauge_shows_whether_it_listens() {
    let db = pg::fresh_database();
    let gateway = PgGateway::start(&db, "", &[])
        .await
        .unwrap_or_else(|stderr| panic!("gateway: {stderr}"));
    assert!(
        gateway.wait_gauge(1, Duration::from_secs(10)).await,
        "{GAUGE} must be 1 once the listener LISTENs"
    );
    let metrics = scrape_metrics(&gateway.gateway.admin).await;
    assert!(
        metrics.contains(&format!("# TYPE {GAUGE} gauge"))
            && metrics
                .lines()
                .any(|l| l.starts_with(&format!("# HELP {GAUGE}")) && l.contains("within 10 s")),
        "the gauge states how long a dead connection can go unnoticed:\n{metrics}"
    );

    // Keep the listener out: no new connection to the database, and its own one is ended.
    let database = db
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .expect("database name")
        .to_string();
    let other = pg::with_database(&db, "postgres");
    pg::execute(
        &other,
        &format!(
            "ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{database}' AND application_name = '{LISTENER_APP}'"
        ),
    )
    .expect("shut the listener out");
    assert!(
        gateway.wait_gauge(0, Duration::from_secs(5)).await,
        "{GAUGE} must drop to 0 when the listening connection is lost"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        gateway.listener_gauge().await,
        Some(0),
        "it stays 0 while the listener cannot reconnect"
    );

    pg::execute(
        &other,
        &format!("ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true"),
    )
    .expect("let the listener back in");
    assert!(
        gateway.wait_gauge(1, Duration::from_secs(10)).await,
        "{GAUGE} must return to 1 once the listener LISTENs again"
    );
}
