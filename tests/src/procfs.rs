//! What the bench programs (`fleet-sim`, `agent-bench`) read of a whole process: its CPU
//! from `/proc/PID/stat` (and its threads'), its memory from `/proc/PID/status`, and a
//! `/metrics` page of any size.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `getconf CLK_TCK`: the unit of the CPU times in `/proc/PID/stat`.
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (comm, utime + stime in ticks) of a `/proc/.../stat` file (a process's or a thread's).
pub fn stat_ticks(path: &Path) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (head, after) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Counted from the state field (the first after the command): utime 11, stime 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// The whole process's CPU (user + system), in seconds.
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Result<f64, String> {
    stat_ticks(Path::new(&format!("/proc/{pid}/stat")))
        .map(|(_, ticks)| ticks / ticks_per_second)
        .ok_or_else(|| format!("cannot read utime and stime from /proc/{pid}/stat"))
}

/// A field of `/proc/PID/status` as written (`kB` fields in kB, `Threads:` a count).
pub fn status_value(pid: u32, name: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| format!("{name} not in /proc/{pid}/status"))
}

/// A `kB` field of `/proc/PID/status` (`VmHWM:`, `VmRSS:`), in bytes.
pub fn status_bytes(pid: u32, name: &str) -> Result<u64, String> {
    status_value(pid, name).map(|kb| kb * 1024)
}

/// The lines of a `/metrics` page whose metric name is one of `names` (all of them when
/// `names` is empty), read as the page streams in: a page of any size (the aggregator's
/// lists a series per target, agent and sample: past 1 GiB at 12 million series) costs
/// this process only the lines kept.
pub fn metrics_page(web: &str, names: &[&str]) -> Result<String, String> {
    use std::io::BufRead;
    let url = format!("{web}/metrics");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let mut response = agent
        .get(&url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let reader = response.body_mut().with_config().limit(u64::MAX).reader();
    let mut kept = String::new();
    for line in std::io::BufReader::with_capacity(1 << 20, reader).lines() {
        let line = line.map_err(|e| format!("GET {url}: reading the body: {e}"))?;
        let name = &line[..line.find(['{', ' ']).unwrap_or(line.len())];
        if !line.starts_with('#') && (names.is_empty() || names.contains(&name)) {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    Ok(kept)
}
