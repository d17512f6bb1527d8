//! Instructions a request, counted (issue 21): this VM has no hardware counters, so
//! `perf stat` cannot give them; with `LOAD_CALLGRIND=1` the bench starts keygate and the
//! bare Pingora server under valgrind's callgrind instead, instrumenting nothing until a row
//! starts, and each request-path row reads the instructions its server executed during the
//! row (warm-up included) over the responses it served. Exact and repeatable where the
//! rates move by a third between runs; the rates themselves are meaningless in this mode
//! (valgrind runs the server tens of times slower), only the counts are.
//!
//! The dumps, with per-function costs for `callgrind_annotate`, stay in the directory the
//! bench prints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// Which server process listens on which port, for the rows to find their server.
static SERVERS: Mutex<Vec<(u16, u32)>> = Mutex::new(Vec::new());

fn enabled() -> bool {
    std::env::var("LOAD_CALLGRIND").is_ok_and(|v| v == "1")
}

fn out_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("keygate-load-callgrind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("callgrind output directory");
        println!("callgrind dumps in {}", dir.display());
        dir
    })
}

/// The command that starts `program`: under callgrind when counting.
pub(crate) fn server_command(program: &str) -> Command {
    if !enabled() {
        return Command::new(program);
    }
    let found = Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "LOAD_CALLGRIND=1 needs valgrind (apt-get install valgrind)"
    );
    let mut command = Command::new("valgrind");
    command.args([
        "--tool=callgrind",
        "--instr-atstart=no",
        &format!("--callgrind-out-file={}/callgrind.%p", out_dir().display()),
        program,
    ]);
    command
}

/// Valgrind runs a server tens of times slower: how long to wait for it to listen.
pub(crate) fn start_seconds() -> u64 {
    if enabled() { 300 } else { 30 }
}

/// Remembers that `pid` serves `port`.
pub(crate) fn register(port: u16, pid: u32) {
    if enabled() {
        SERVERS.lock().expect("servers").push((port, pid));
    }
}

fn control(pid: u32, args: &[&str]) {
    let ok = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "callgrind_control {args:?} {pid} failed");
}

/// The first figure of the newest dump of `pid`: instructions executed (Ir).
fn newest_total(pid: u32) -> Option<u64> {
    let prefix = format!("callgrind.{pid}.");
    let newest = std::fs::read_dir(out_dir())
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let part: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((part, entry.path()))
        })
        .max()?;
    let text = std::fs::read_to_string(newest.1).ok()?;
    // `summary:` is the figure of the parts dumped before; `totals:` this part's.
    text.lines()
        .find_map(|line| line.strip_prefix("totals:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether the server behind `target` runs under callgrind.
pub(crate) fn counts(target: SocketAddr) -> bool {
    server_of(target).is_some()
}

fn server_of(target: SocketAddr) -> Option<u32> {
    SERVERS
        .lock()
        .expect("servers")
        .iter()
        .find(|(port, _)| *port == target.port())
        .map(|(_, pid)| *pid)
}

/// Runs `row` with the counting of `target`'s server on: the row's result and the
/// instructions the server executed meanwhile (None when not counting).
pub(crate) fn counted<T>(target: SocketAddr, row: impl FnOnce() -> T) -> (T, Option<u64>) {
    let Some(pid) = server_of(target) else {
        return (row(), None);
    };
    control(pid, &["-z"]);
    control(pid, &["-i", "on"]);
    let result = row();
    control(pid, &["-i", "off"]);
    control(pid, &["-d"]);
    (result, newest_total(pid))
}
