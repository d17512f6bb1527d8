//! PostgreSQL for tests: one server per test binary, one fresh database per test.
//!
//! `common::pg::fresh_database()` gives a connection URL to a new, empty, uniquely named
//! database (one per test keeps tests apart).
//!
//! The server is either
//! - the one `KEYGATE_TEST_DATABASE_URL` points at (its user must be allowed to
//!   `CREATE DATABASE`; the databases made there are left behind), or
//! - started on first use from Debian's `postgresql` package (`/usr/lib/postgresql/*/bin`,
//!   or `initdb`/`pg_ctl` on PATH): a cluster in a fresh temp dir, on a free loopback port,
//!   with its Unix socket in that dir too. PostgreSQL refuses to run as root, so as root the
//!   dir is chowned to `postgres` and the tools run through `runuser -u postgres`. Statics
//!   are never dropped, so a small watchdog process (in its own process group, so Ctrl-C
//!   does not take it down first) waits for the test process to exit, then stops the
//!   server and deletes the dir. Nothing stays bound to a port after the tests.
//!
//! The local cluster's default collation is ICU `en-US` where available (as on many
//! production databases), so that code relying on byte order must say so (`COLLATE "C"`).
//! Durability is off (`fsync=off`): these are throwaway clusters.
//!
//! `start_tls_server` starts another local cluster, always (whatever
//! `KEYGATE_TEST_DATABASE_URL` says), with `ssl = on`, the caller's certificate and
//! `pg_hba.conf`; `query` reads rows back (e.g. from `pg_stat_ssl`).
//!
//! Missing PostgreSQL binaries are a hard failure (run `.ci/setup`), never a silent skip.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Set to a URL (`postgres://user:password@host:port/db`) to use an existing server.
pub(crate) const DATABASE_URL_ENV: &str = "KEYGATE_TEST_DATABASE_URL";

struct Server {
    /// A database on the server to connect to for `CREATE DATABASE`.
    admin_url: String,
}

static SERVER: LazyLock<Server> = LazyLock::new(|| match std::env::var(DATABASE_URL_ENV) {
    Ok(url) if !url.trim().is_empty() => Server {
        admin_url: url.trim().to_string(),
    },
    _ => start_local_server(),
});

static DATABASES: AtomicU64 = AtomicU64::new(0);

/// Creates a new, empty database with a unique name and returns its connection URL.
/// Blocking (a few tens of ms; the first call also starts the server, about 2 s); fine to
/// call from inside a tokio test.
pub(crate) fn fresh_database() -> String {
    let server = &*SERVER;
    let name = format!(
        "kg_test_{}_{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    execute(&server.admin_url, &format!("CREATE DATABASE {name}"))
        .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    with_database(&server.admin_url, &name)
}

/// Runs SQL (simple protocol, several statements allowed) on its own connection. Blocking:
/// it runs on a helper thread with its own runtime, so it also works inside async tests.
pub(crate) fn execute(url: &str, sql: &str) -> Result<(), String> {
    let url = url.to_string();
    let sql = sql.to_string();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| chain(&e))?;
            let driver = tokio::spawn(connection);
            let outcome = client.batch_execute(&sql).await.map_err(|e| chain(&e));
            drop(client);
            let _ = driver.await;
            outcome
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the SQL helper thread panicked".to_string()))
}

/// Holds `table` locked (ACCESS EXCLUSIVE, in an open transaction, so that every read of
/// it waits) while `hold` runs, then rolls back. Blocking: call it on a thread of its own.
#[allow(dead_code)] // benches/load.rs includes this file
pub(crate) fn hold_lock(url: &str, table: &str, hold: impl FnOnce()) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| chain(&e))?;
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
            ))
            .await
            .map_err(|e| chain(&e))?;
        // Nothing needs driving meanwhile: the server keeps the lock for the transaction.
        hold();
        let outcome = client
            .batch_execute("ROLLBACK")
            .await
            .map_err(|e| chain(&e));
        drop(client);
        let _ = driver.await;
        outcome
    })
}

/// The same server and credentials, another database.
pub(crate) fn with_database(url: &str, database: &str) -> String {
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let (main, query) = match rest.split_once('?') {
                Some((main, query)) => (main, Some(query)),
                None => (rest, None),
            };
            let authority = main
                .split_once('/')
                .map_or(main, |(authority, _)| authority);
            let mut out = format!("{scheme}{authority}/{database}");
            if let Some(query) = query {
                out.push('?');
                out.push_str(query);
            }
            return out;
        }
    }
    // key=value form: a later dbname overrides an earlier one.
    format!("{url} dbname={database}")
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

const SETUP_HINT: &str = "PostgreSQL server binaries (initdb, pg_ctl) are needed for these tests: \
     run .ci/setup (it installs Debian's postgresql package), or set KEYGATE_TEST_DATABASE_URL \
     to a server where the user may CREATE DATABASE";

/// `/usr/lib/postgresql/<newest>/bin`, else a PATH directory holding both tools.
/// The newest PostgreSQL server binaries (`initdb`, `pg_ctl`) installed, if any.
pub(crate) fn find_bin_dir() -> Option<PathBuf> {
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

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A PostgreSQL tool, as the `postgres` user when we are root.
fn tool(bin: &Path, name: &str, as_postgres: bool, dir: &Path) -> Command {
    let program = bin.join(name);
    let mut command = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    // The tools complain when they cannot read the current directory.
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .env_remove("PGHOST");
    command
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    let out = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn start_local_server() -> Server {
    let cluster = Cluster::init();
    let port = cluster.start("");
    Server {
        admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    }
}

/// The certificate and key (PEM) a TLS server presents, and the `pg_hba.conf` it uses.
#[allow(dead_code)] // benches/load.rs includes this file and uses none of the TLS helpers
pub(crate) struct ServerTls<'a> {
    pub(crate) cert_pem: &'a str,
    pub(crate) key_pem: &'a str,
    pub(crate) hba: &'a str,
}

/// A local server of its own with `ssl = on`, apart from the shared one (whose clients
/// connect without TLS). Returns the admin URL, over the Unix socket (so that a `hba`
/// allowing only `hostssl` on TCP still lets the harness in: give it a `local` line), and
/// the TCP port on 127.0.0.1. Missing PostgreSQL binaries are a hard failure.
#[allow(dead_code)] // benches/load.rs includes this file and uses none of the TLS helpers
pub(crate) fn start_tls_server(tls: &ServerTls<'_>) -> (String, u16) {
    let cluster = Cluster::init();
    let data = cluster.dir.join("data");
    for (name, text) in [
        ("server.crt", tls.cert_pem),
        ("server.key", tls.key_pem),
        ("pg_hba.conf", tls.hba),
    ] {
        let path = data.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
        if cluster.as_postgres {
            run(
                Command::new("chown").arg("postgres:postgres").arg(&path),
                "chown of a TLS file",
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        // PostgreSQL refuses a key readable by others.
        run(
            Command::new("chmod").arg("600").arg(&path),
            "chmod of a TLS file",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let port = cluster.start("-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
    let admin_url = format!(
        "host={} port={port} user=postgres dbname=postgres",
        cluster.dir.display()
    );
    (admin_url, port)
}

/// Runs one query (simple protocol) on its own connection and returns its rows, every
/// value as text (NULL as ""). Blocking, like `execute`.
#[allow(dead_code)] // benches/load.rs includes this file and uses none of the TLS helpers
pub(crate) fn query(url: &str, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let url = url.to_string();
    let sql = sql.to_string();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| chain(&e))?;
            let driver = tokio::spawn(connection);
            let outcome = client.simple_query(&sql).await.map_err(|e| chain(&e));
            drop(client);
            let _ = driver.await;
            Ok(outcome?
                .into_iter()
                .filter_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|i| row.get(i).unwrap_or_default().to_string())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect())
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the SQL helper thread panicked".to_string()))
}

/// A fresh cluster (`initdb` done) in its own temp dir, removed with the server when this
/// process exits.
struct Cluster {
    bin: PathBuf,
    as_postgres: bool,
    dir: PathBuf,
}

impl Cluster {
    fn init() -> Cluster {
        let Some(bin) = find_bin_dir() else {
            panic!("{SETUP_HINT}");
        };
        let as_postgres = is_root();
        if as_postgres
            && Command::new("id")
                .arg("postgres")
                .output()
                .map_or(true, |o| !o.status.success())
        {
            panic!(
                "running as root but there is no `postgres` user to run PostgreSQL as. {SETUP_HINT}"
            );
        }
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keygate-pg-{}-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("creating the PostgreSQL temp dir");
        if as_postgres {
            run(
                Command::new("chown").arg("postgres:postgres").arg(&dir),
                "chown of the PostgreSQL temp dir",
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let cluster = Cluster {
            bin,
            as_postgres,
            dir,
        };
        // From here on the dir (and later the server) is cleaned up when this process exits.
        spawn_watchdog(
            &cluster.bin,
            as_postgres,
            &cluster.dir,
            &cluster.dir.join("data"),
        );
        if let Err(icu_error) = cluster.initdb(true) {
            let _ = std::fs::remove_dir_all(cluster.dir.join("data"));
            cluster
                .initdb(false)
                .unwrap_or_else(|e| panic!("{e}\n(with ICU first: {icu_error})"));
        }
        cluster
    }

    fn initdb(&self, icu: bool) -> Result<(), String> {
        let mut command = tool(&self.bin, "initdb", self.as_postgres, &self.dir);
        command.arg("-D").arg(self.dir.join("data")).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        if icu {
            command.args([
                "--locale=C.UTF-8",
                "--locale-provider=icu",
                "--icu-locale=en-US",
            ]);
        } else {
            command.arg("--locale=C.UTF-8");
        }
        run(&mut command, "initdb")
    }

    /// Starts the server on a free loopback port (with `extra` server options) and returns
    /// the port.
    fn start(&self, extra: &str) -> u16 {
        let (data, log) = (self.dir.join("data"), self.dir.join("log"));
        let mut last_error = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 \
                 -c fsync=off -c synchronous_commit=off -c full_page_writes=off {extra}",
                self.dir.display()
            );
            let started = run(
                tool(&self.bin, "pg_ctl", self.as_postgres, &self.dir)
                    .arg("-D")
                    .arg(&data)
                    .arg("-l")
                    .arg(&log)
                    .args(["-w", "-t", "60", "-o", &options, "start"]),
                "pg_ctl start",
            );
            match started {
                Ok(()) => {
                    eprintln!(
                        "test PostgreSQL ({}) at 127.0.0.1:{port}, data in {}",
                        self.bin.display(),
                        self.dir.display()
                    );
                    return port;
                }
                Err(e) => {
                    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                    last_error = format!("{e}\nserver log:\n{log_text}");
                    // Someone took the port between our probe and the server's bind: retry.
                    if !log_text.contains("could not bind") && !log_text.contains("already in use")
                    {
                        break;
                    }
                }
            }
        }
        panic!("could not start the test PostgreSQL server: {last_error}");
    }
}

/// A shell that polls for this process, then stops the server and removes `dir`.
fn spawn_watchdog(bin: &Path, as_postgres: bool, dir: &Path, data: &Path) {
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let pg_ctl = quote(&bin.join("pg_ctl"));
    let stop = if as_postgres {
        format!("runuser -u postgres -- {pg_ctl}")
    } else {
        pg_ctl
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
         {stop} -D {data} -m immediate -w -t 30 stop; rm -rf {dir}",
        pid = std::process::id(),
        data = quote(data),
        dir = quote(dir),
    );
    // Deliberately not waited for: it must outlive this process to clean up after it.
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
