//! A gateway on PostgreSQL while the database goes away and comes back: cached keys keep
//! working, everything that needs the store answers 503 `store_unavailable` (and /readyz
//! says not ready), and all of it recovers once the database is back.
//!
//! `common::pg` does not expose its server's data directory (it cannot be stopped from
//! outside), so each test here starts and stops its own throwaway cluster with the same
//! recipe (`initdb`/`pg_ctl` from Debian's package, through `runuser -u postgres` as root).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::cluster::Instance;
use crate::common::pg;
use crate::common::*;

/// A PostgreSQL cluster of this test alone, in a temp dir, on a free loopback port.
struct PgServer {
    bin: PathBuf,
    as_postgres: bool,
    dir: PathBuf,
    port: u16,
}

impl PgServer {
    fn start_new() -> PgServer {
        let bin = pg::find_bin_dir().expect(
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
    let (_, k1) = gateway.create_key("alice").await;
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
    let (_, k1) = gateway.create_key("alice").await;
    let (_, k2) = gateway.create_key("bob").await;
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
