//! A gateway on PostgreSQL while the database goes away and comes back: cached keys keep
//! working, everything that needs the store answers 503 `store_unavailable` (and /readyz
//! says not ready), and all of it recovers once the database is back.
//!
//! `tests/pg` does not expose its server's data directory (it cannot be stopped from
//! outside), so each test here starts and stops its own throwaway cluster with the same
//! recipe (`initdb`/`pg_ctl` from Debian's package, through `runuser -u postgres` as root).

mod common;
mod pg;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const ADMIN: &str = "outage-admin-token";

/// A PostgreSQL cluster of this test alone, in a temp dir, on a free loopback port.
struct PgServer {
    bin: PathBuf,
    as_postgres: bool,
    dir: PathBuf,
    port: u16,
}

impl PgServer {
    fn start_new() -> PgServer {
        let bin = find_bin_dir().expect(
            "PostgreSQL server binaries (initdb, pg_ctl) are needed: run .ci/setup (Debian's \
             postgresql package)",
        );
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
        let dir = std::env::temp_dir().join(format!(
            "keygate-outage-pg-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("PostgreSQL temp dir");
        if as_postgres {
            run(
                Command::new("chown").arg("postgres:postgres").arg(&dir),
                "chown",
            );
        }
        let server = PgServer {
            bin,
            as_postgres,
            dir,
            port: free_port(),
        };
        server.spawn_watchdog();
        run(
            server
                .tool("initdb")
                .arg("-D")
                .arg(server.data())
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
                .arg("--locale=C.UTF-8"),
            "initdb",
        );
        server.start();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        command
    }

    /// Starts (or restarts) the server on its port and waits until it accepts connections.
    fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        run(
            self.tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("log"))
                .args(["-w", "-t", "30", "-o", &options, "start"]),
            "pg_ctl start",
        );
    }

    /// A fast shutdown: clients are disconnected, the port closes; waits until it is down.
    fn stop(&self) {
        run(
            self.tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "fast", "-w", "-t", "30", "stop"]),
            "pg_ctl stop",
        );
    }

    /// Stops the server and removes the dir once this test process has exited, even if it
    /// is killed (Drop does it earlier on a normal or panicking end).
    fn spawn_watchdog(&self) {
        let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
        let pg_ctl = quote(&self.bin.join("pg_ctl"));
        let stop = if self.as_postgres {
            format!("runuser -u postgres -- {pg_ctl}")
        } else {
            pg_ctl
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
             {stop} -D {data} -m immediate -w -t 30 stop; rm -rf {dir}",
            pid = std::process::id(),
            data = quote(&self.data()),
            dir = quote(&self.dir),
        );
        #[allow(clippy::zombie_processes)]
        let _watchdog = Command::new("sh")
            .args(["-c", &script])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawning the PostgreSQL clean-up watchdog");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has_tools(dir))
}

fn run(command: &mut Command, what: &str) {
    let out = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One `keygate serve` on the PostgreSQL store at `db_url` (process handling from
/// `common::Gateway`; our own config text, since the common one always writes sled).
struct Instance {
    config: GatewayConfig,
    gateway: Gateway,
}

impl Instance {
    async fn start(db_url: &str, upstream: SocketAddr) -> Instance {
        let config = GatewayConfig::single_route(&[upstream]);
        let text = format!(
            "[server]\n\
             listen = \"127.0.0.1:{listen}\"\n\
             admin_listen = \"127.0.0.1:{admin}\"\n\
             threads = 2\n\
             shutdown_grace_seconds = 0\n\
             access_log = \"{log}\"\n\
             \n\
             [store]\n\
             backend = \"postgres\"\n\
             url_env = \"KEYGATE_DATABASE_URL\"\n\
             pool_size = 4\n\
             connect_timeout_seconds = 1\n\
             usage_flush_interval_ms = 200\n\
             \n\
             [management]\n\
             admin_token_env = \"KEYGATE_ADMIN_TOKEN\"\n\
             \n\
             [[routes]]\n\
             name = \"default\"\n\
             path_prefix = \"/\"\n\
             upstreams = [\"{upstream}\"]\n\
             health_check_interval_ms = 200\n",
            listen = config.listen,
            admin = config.admin,
            log = config.access_log_path().display(),
        );
        let path = config.path();
        std::fs::write(&path, text).expect("write config");
        let child = Command::new(BIN)
            .args(["serve", "--config", path.to_str().expect("utf-8 path")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(config.dir.path().join("stderr.log")).expect("log file"),
            ))
            .env("KEYGATE_DATABASE_URL", db_url)
            .env("KEYGATE_ADMIN_TOKEN", ADMIN)
            .spawn()
            .expect("spawn keygate");
        let mut instance = Instance {
            gateway: Gateway {
                child: Some(child),
                base: config.base_url(),
                admin: config.admin_url(),
            },
            config,
        };
        instance.wait_ready().await;
        instance
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.config.dir.path().join("stderr.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let client = client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.gateway.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "keygate exited during start-up ({status}); stderr:\n{}",
                    self.stderr()
                );
            }
            let healthz = client
                .get(format!("{}/healthz", self.gateway.admin))
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            if let Ok(resp) = healthz {
                let body = resp.text().await.unwrap_or_default();
                if body.contains("keygate")
                    && std::net::TcpStream::connect(("127.0.0.1", self.config.listen)).is_ok()
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "keygate did not become ready; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn base(&self) -> &str {
        &self.gateway.base
    }

    /// POST /_keygate/keys as the admin; (status, body).
    async fn try_create_key(&self, owner: &str) -> (u16, serde_json::Value) {
        let resp = client()
            .post(format!("{}/_keygate/keys", self.base()))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"owner": owner}))
            .send()
            .await
            .expect("create request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }

    /// Creates a key; returns the raw key.
    async fn create_key(&self, owner: &str) -> String {
        let (status, body) = self.try_create_key(owner).await;
        assert_eq!(status, 201, "create answered {status}: {body}");
        body["key"].as_str().expect("key").to_string()
    }

    /// One proxied request with `key`; (status, error code or "").
    async fn call(&self, key: &str) -> (u16, String) {
        let resp = client()
            .get(format!("{}/work", self.base()))
            .header("x-api-key", key)
            .send()
            .await
            .expect("proxied request");
        error_code(resp).await
    }

    /// GET /readyz on the admin listener; (status, body).
    async fn readyz(&self) -> (u16, String) {
        let resp = client()
            .get(format!("{}/readyz", self.gateway.admin))
            .send()
            .await
            .expect("readyz request");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    async fn cache_hits(&self) -> u64 {
        let text = client()
            .get(format!("{}/metrics", self.gateway.admin))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find(|line| {
                line.starts_with("keygate_key_cache_lookups_total")
                    && line.contains("result=\"hit\"")
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
            .map_or(0, |value| value as u64)
    }
}

/// A fresh cluster with a `keygate` database, a gateway on it, and an upstream.
async fn setup() -> (PgServer, Upstream, Instance) {
    let server = PgServer::start_new();
    pg::execute(&server.url("postgres"), "CREATE DATABASE keygate").expect("create database");
    let upstream = Upstream::start("up").await;
    let gateway = Instance::start(&server.url("keygate"), upstream.addr).await;
    (server, upstream, gateway)
}

#[tokio::test]
async fn cached_keys_keep_working_while_the_database_is_down() {
    let started = Instant::now();
    let (server, _upstream, gateway) = setup().await;
    let k1 = gateway.create_key("alice").await;
    assert_eq!(gateway.call(&k1).await, (200, String::new()));
    let hits = gateway.cache_hits().await;
    assert_eq!(gateway.call(&k1).await, (200, String::new()));
    assert!(
        gateway.cache_hits().await > hits,
        "K1 is not served from the cache"
    );

    server.stop();
    // Over a second or so, long enough for the gateway to notice the lost connections.
    for attempt in 0..8 {
        assert_eq!(
            gateway.call(&k1).await,
            (200, String::new()),
            "cached key refused {attempt} checks after the database stopped; stderr:\n{}",
            gateway.stderr()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    server.start();
    assert!(
        eventually(Duration::from_secs(15), || async {
            gateway.readyz().await.0 == 200
        })
        .await,
        "not ready again after the database came back"
    );
    assert_eq!(gateway.call(&k1).await, (200, String::new()));
    println!("cached-key outage test took {:?}", started.elapsed());
}

#[tokio::test]
async fn the_store_is_unavailable_while_the_database_is_down_and_recovers() {
    let started = Instant::now();
    let (server, _upstream, gateway) = setup().await;
    let k1 = gateway.create_key("alice").await;
    let k2 = gateway.create_key("bob").await;
    assert_eq!(gateway.call(&k1).await, (200, String::new()));
    assert_eq!(gateway.readyz().await.0, 200);

    server.stop();
    let down_at = Instant::now();

    // A key never seen before cannot be checked: 503, not 401 (and not a hang).
    assert_eq!(
        gateway.call(&k2).await,
        (503, "store_unavailable".to_string()),
        "uncached key while the database is down"
    );
    // A management write cannot be made durable.
    let (status, body) = gateway.try_create_key("carol").await;
    assert_eq!(status, 503, "create while the database is down: {body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    let (status, body) = gateway.readyz().await;
    assert_eq!(status, 503, "readyz while the database is down: {body}");
    // The refusals were not remembered as "unknown key".
    assert_eq!(gateway.call(&k2).await.0, 503);
    assert!(
        down_at.elapsed() < Duration::from_secs(10),
        "answers during the outage took {:?}",
        down_at.elapsed()
    );

    server.start();
    let back_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(15), || async {
            gateway.call(&k2).await.0 == 200
        })
        .await,
        "K2 still refused after the database came back: {:?}; stderr:\n{}",
        gateway.call(&k2).await,
        gateway.stderr()
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            gateway.readyz().await.0 == 200
        })
        .await,
        "readyz not 200 after the database came back: {:?}",
        gateway.readyz().await
    );
    println!(
        "recovered {:?} after the database restarted",
        back_at.elapsed()
    );
    assert_eq!(gateway.call(&k1).await, (200, String::new()));
    let (status, body) = gateway.try_create_key("carol").await;
    assert_eq!(status, 201, "create after recovery: {body}");
    println!("store-outage test took {:?}", started.elapsed());
}
