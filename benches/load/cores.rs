//! Which cores the servers and the load generator run on, and how busy each core was during
//! a row, from `/proc/stat`, so that every figure says which process was the limit: a row
//! counts as the proxy's rate only when the server cores (the proxy under test, alone on
//! them) are the saturated ones.
//!
//! `LOAD_GATEWAY_CORES` and `LOAD_GENERATOR_CORES` (taskset lists: `1`, `2-7`, `0,2`) give
//! each side its cores, on machines that have them; by default the servers get the last
//! core and the generator (with the upstream) the first.

use std::sync::OnceLock;

/// The cores of each side.
pub(crate) struct Plan {
    pub(crate) generator: Vec<usize>,
    pub(crate) server: Vec<usize>,
}

impl Plan {
    /// The side `core` belongs to: pinning "to a core" pins to all of that side's cores.
    pub(crate) fn group_of(&self, core: usize) -> &[usize] {
        if self.server.contains(&core) {
            &self.server
        } else {
            &self.generator
        }
    }
}

/// `2-4,7` -> [2, 3, 4, 7]; None when malformed or empty.
fn parse_list(text: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        match part.split_once('-') {
            Some((a, b)) => out.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => out.push(part.parse().ok()?),
        }
    }
    (!out.is_empty()).then_some(out)
}

fn from_env(name: &str, default: Vec<usize>) -> Vec<usize> {
    match std::env::var(name) {
        Ok(text) => parse_list(&text).unwrap_or_else(|| panic!("{name}={text}: not a core list")),
        Err(_) => default,
    }
}

pub(crate) fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    PLAN.get_or_init(|| {
        let last = super::cores().saturating_sub(1);
        Plan {
            generator: from_env("LOAD_GENERATOR_CORES", vec![0]),
            server: from_env("LOAD_GATEWAY_CORES", vec![last]),
        }
    })
}

/// A taskset list: `2,3,4`.
pub(crate) fn list(cores: &[usize]) -> String {
    cores
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// (busy, total) jiffies per core.
pub(crate) struct CoreTimes(Vec<(u64, u64)>);

/// A core this busy or more is taken as saturated.
const SATURATED: f64 = 0.9;

impl CoreTimes {
    pub(crate) fn now() -> CoreTimes {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let cores = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .map(|line| {
                let fields: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                let total: u64 = fields.iter().sum();
                // idle and iowait are the 4th and 5th fields.
                let idle =
                    fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
                (total.saturating_sub(idle), total)
            })
            .collect();
        CoreTimes(cores)
    }

    /// Each core's busy share since `earlier`.
    pub(crate) fn busy_since(&self, earlier: &CoreTimes) -> Vec<f64> {
        self.0
            .iter()
            .zip(&earlier.0)
            .map(|((busy, total), (busy0, total0))| {
                let total = total.saturating_sub(*total0).max(1) as f64;
                busy.saturating_sub(*busy0) as f64 / total
            })
            .collect()
    }
}

/// `core0 62% core1 100%: server core saturated` (or which side was the limit instead).
/// With several server cores, their mean is what must be saturated.
pub(crate) fn describe(busy: &[f64]) -> String {
    let servers = &plan().server;
    let shares = busy
        .iter()
        .enumerate()
        .map(|(i, b)| format!("core{i} {:.0}%", b * 100.0))
        .collect::<Vec<_>>()
        .join(" ");
    let server = servers
        .iter()
        .map(|c| busy.get(*c).copied().unwrap_or(0.0))
        .sum::<f64>()
        / servers.len().max(1) as f64;
    let others_saturated = busy
        .iter()
        .enumerate()
        .any(|(i, b)| !servers.contains(&i) && *b >= SATURATED);
    let verdict = if server >= SATURATED && others_saturated {
        "server AND generator cores saturated: a lower bound of the proxy's rate"
    } else if server >= SATURATED {
        "server core saturated"
    } else if others_saturated {
        "GENERATOR/UPSTREAM-BOUND: not the proxy's rate"
    } else {
        "no core saturated"
    };
    format!("{shares}: {verdict}")
}

/// Runs `row`, returning its result and how busy the cores were meanwhile.
pub(crate) fn measured<T>(row: impl FnOnce() -> T) -> (T, String) {
    let (result, cpu, _) = measured_with_seconds(row);
    (result, cpu)
}

/// `measured`, and the CPU seconds the server cores spent meanwhile (busy jiffies at
/// Linux's USER_HZ of 100 a second): with the requests served, the CPU a request costs,
/// a figure the generator's own speed does not move.
pub(crate) fn measured_with_seconds<T>(row: impl FnOnce() -> T) -> (T, String, f64) {
    let before = CoreTimes::now();
    let result = row();
    let after = CoreTimes::now();
    let busy = after.busy_since(&before);
    let server_seconds = plan()
        .server
        .iter()
        .filter_map(|c| Some(after.0.get(*c)?.0.saturating_sub(before.0.get(*c)?.0)))
        .sum::<u64>() as f64
        / 100.0;
    (result, describe(&busy), server_seconds)
}
