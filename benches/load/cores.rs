//! How busy each core was during a row, from `/proc/stat`, so that every figure says which
//! process was the limit: a row counts as the proxy's rate only when the server core (the
//! proxy under test, alone on it) is the saturated one.

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
pub(crate) fn describe(busy: &[f64], server_core: usize) -> String {
    let shares = busy
        .iter()
        .enumerate()
        .map(|(i, b)| format!("core{i} {:.0}%", b * 100.0))
        .collect::<Vec<_>>()
        .join(" ");
    let server = busy.get(server_core).copied().unwrap_or(0.0);
    let others_saturated = busy
        .iter()
        .enumerate()
        .any(|(i, b)| i != server_core && *b >= SATURATED);
    let verdict = if server >= SATURATED {
        "server core saturated"
    } else if others_saturated {
        "GENERATOR/UPSTREAM-BOUND: not the proxy's rate"
    } else {
        "no core saturated"
    };
    format!("{shares}: {verdict}")
}

/// Runs `row`, returning its result and how busy the cores were meanwhile.
pub(crate) fn measured<T>(server_core: usize, row: impl FnOnce() -> T) -> (T, String) {
    let before = CoreTimes::now();
    let result = row();
    let busy = CoreTimes::now().busy_since(&before);
    (result, describe(&busy, server_core))
}
