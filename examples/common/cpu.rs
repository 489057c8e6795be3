//! CPU time from `/proc`, for the benchmarks (`examples/bench.rs`, `examples/keys_bench.rs`):
//! a few lines each, where procfs or sysinfo would be a dev-dependency of the library.

/// User + system CPU seconds of this process so far (10 ms clock ticks).
pub fn cpu_seconds() -> f64 {
    // utime and stime are the 14th and 15th fields.
    stat_seconds(14, 15)
}

/// User + system CPU seconds of this process's children that have been waited for: the
/// `cutime` and `cstime` of `/proc/self/stat`, in clock ticks (10 ms).
pub fn children_cpu_seconds() -> f64 {
    stat_seconds(16, 17)
}

/// The sum of two clock-tick fields of `/proc/self/stat` (numbered from 1 as in proc(5)), in
/// seconds (10 ms ticks).
fn stat_seconds(a: usize, b: usize) -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the ")" that closes the command name, which is the 2nd: the 3rd is first.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(a) + ticks(b)) / 100.0
}

/// User + system CPU of every thread of process `pid` (`"self"` for this one), in seconds,
/// to the nanosecond: the sum of `/proc/PID/task/*/schedstat` (time on a CPU). `None` when
/// no thread's schedstat could be read.
pub fn tasks_cpu_seconds(pid: &str) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(v) = s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            ns += v;
            any = true;
        }
    }
    any.then(|| ns as f64 / 1e9)
}

/// [`tasks_cpu_seconds`] of this process; [`cpu_seconds`]'s clock ticks (10 ms), too coarse
/// for runs of a few hundred ms of CPU, when schedstat is missing.
#[allow(dead_code)] // Not every benchmark that includes this file calls it.
pub fn cpu_seconds_precise() -> f64 {
    tasks_cpu_seconds("self").unwrap_or_else(cpu_seconds)
}
