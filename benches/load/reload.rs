//! The reload rows (issue 18): the valid-key row measured twice back to back on the same
//! gateway, once as it is and once while the configuration file is reloaded every
//! `LOAD_RELOAD_MS` (100 ms by default) through `POST /-/reload`, each reload adding or
//! removing a route so that every one of them changes the routes in force.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::{Measured, RowRun, env_or, request};

const EXTRA_ROUTE: &str = "\n[[routes]]\nname = \"reloaded\"\npath_prefix = \"/reloaded\"\nupstreams = [\"127.0.0.1:9\"]\n";

/// One `POST /-/reload`; whether it answered 200.
fn post_reload(admin: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
        return false;
    };
    let request =
        "POST /-/reload HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

/// Reloads every `every` until `stop`, alternating the file with and without a route;
/// counts the reloads that answered 200 and those that did not.
fn reload_loop(
    config: &Path,
    admin: u16,
    every: Duration,
    stop: &AtomicBool,
    done: &AtomicUsize,
    failed: &AtomicUsize,
) {
    let base = std::fs::read_to_string(config).unwrap_or_default();
    let mut with_extra = false;
    while !stop.load(Ordering::Relaxed) {
        with_extra = !with_extra;
        let text = if with_extra {
            format!("{base}{EXTRA_ROUTE}")
        } else {
            base.clone()
        };
        let counter = if std::fs::write(config, text).is_ok() && post_reload(admin) {
            done
        } else {
            failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(every);
    }
    let _ = std::fs::write(config, base);
    post_reload(admin);
}

/// The gateway the rows measure: its listener, its admin port and its config file.
pub(crate) struct Target {
    keygate: SocketAddr,
    admin: u16,
    config: PathBuf,
}

impl Target {
    /// The gateway `start_keygate` started in `dir`.
    pub(crate) fn new(keygate: SocketAddr, admin: u16, dir: &Path) -> Self {
        Target {
            keygate,
            admin,
            config: dir.join("keygate.toml"),
        }
    }

    /// The two rows, when `wanted`.
    pub(crate) fn measure(
        &self,
        run: &RowRun<'_>,
        runtime: &tokio::runtime::Runtime,
        wanted: bool,
    ) -> Vec<Measured> {
        if wanted {
            measure(run, runtime, self.keygate, self.admin, &self.config)
        } else {
            Vec::new()
        }
    }
}

fn measure(
    run: &RowRun<'_>,
    runtime: &tokio::runtime::Runtime,
    keygate: SocketAddr,
    admin: u16,
    config: &Path,
) -> Vec<Measured> {
    let every = Duration::from_millis(env_or("LOAD_RELOAD_MS", 100));
    let row = |name, label| {
        vec![(
            name,
            label,
            keygate,
            vec![request("/x", &[("x-api-key", run.valid_key)])],
        )]
    };
    let mut results = run.measure_rows(
        runtime,
        row("reload-off", "keygate, one valid key, no reloads"),
        &|_| true,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let reloader = {
        let (config, stop, done, failed) = (
            config.to_path_buf(),
            Arc::clone(&stop),
            Arc::clone(&done),
            Arc::clone(&failed),
        );
        std::thread::spawn(move || reload_loop(&config, admin, every, &stop, &done, &failed))
    };
    results.extend(run.measure_rows(
        runtime,
        row(
            "reload-on",
            "keygate, one valid key, a reload every LOAD_RELOAD_MS",
        ),
        &|_| true,
    ));
    stop.store(true, Ordering::Relaxed);
    let _ = reloader.join();
    println!(
        "reload rows: {} reloads applied during the row, {} failed, one every {every:?}",
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    results
}
