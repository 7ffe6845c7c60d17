//! agent-bench: what the real `sonde-agent` costs as a whole process, per probe.
//!
//! It starts a real nginx, the real `sonde-aggregator` (release build) with one job of N
//! HTTP targets (`http://127.0.0.1:PORT/?t=i`, all the same nginx) assigned to one agent,
//! and the real `sonde-agent` release binary streaming to it. After a warm-up (every
//! check has started and the agent's memory has settled) it measures a steady window:
//!
//! - whole-process CPU (utime + stime of `/proc/PID/stat`) over the window divided by
//!   the probes run in it (`sonde_agent_probes_total` from the agent's `/metrics`);
//! - beside it, the probing work alone, measured in the same run by the agent itself
//!   (`sonde_agent_probe_cpu_seconds_total` over `sonde_agent_probe_cpu_probes_total`:
//!   the CPU time of the thread that polls a probe, around every poll of a sample of the
//!   probes), when the agent exposes it;
//! - the CPU of each kind of thread (`/proc/PID/task/*/stat`, grouped by thread name);
//! - peak RSS (`VmHWM`), RSS at the end, open file descriptors and threads;
//! - schedule accuracy: the probe rate against targets ÷ interval, and the start delay
//!   of each probe after its slot (`sonde_agent_probes_started_total{le}`), and
//!   the probes the agent counted as late or skipped, when it exposes them.
//!
//! Then, unless `--no-floor`, with the agent stopped (SIGSTOP) so that the two do not
//! compete, the floor of those probes in the same run (`floor.rs`): a C loop doing each
//! target's exchange on a fresh connection (socket, connect, GET, read to the end, close)
//! against the same nginx and URLs, at the same rate, for a window of the same length;
//! its whole-process CPU per exchange, and the agent's CPU per probe divided by it.
//!
//! Run `agent-bench --help` for the options; docs/benchmarks.md has the figures and the
//! exact commands.

mod floor;

use anyhow::{Context, anyhow};
use clap::Parser;
use sonde_proto::config::PromDuration;
use sonde_tests::bench::{PerfRecord, RunArgs, WorkDir, find_release_bin, start_nginx, wait_for};
use sonde_tests::procfs::{
    clock_ticks_per_second, metrics_page, stat_ticks, status_bytes, status_value,
};
use sonde_tests::{Process, free_port, http_get_ok};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "agent-bench",
    about = "The real sonde-agent against a real aggregator and nginx: whole-process CPU per probe, RSS, schedule accuracy"
)]
struct Args {
    /// HTTP targets, all assigned to the one agent.
    #[arg(long, default_value_t = 1000)]
    targets: usize,
    /// Probe interval of every target.
    #[arg(long, default_value = "5s")]
    interval: PromDuration,
    /// Probe timeout [default: the interval, at most 10s].
    #[arg(long)]
    timeout: Option<PromDuration>,
    /// Time between the assignment and the window: every check starts within one
    /// interval [default: one interval + 10s].
    #[arg(long)]
    warmup: Option<PromDuration>,
    /// The measured window, rounded up to a whole number of intervals [default: 30s].
    #[arg(long, default_value = "30s")]
    duration: PromDuration,
    /// The sonde-agent binary [default: next to this program, else target/release].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The sonde-aggregator binary [default: next to this program, else target/release].
    #[arg(long)]
    aggregator: Option<PathBuf>,
    /// Record the agent with `perf record -g` over the window, into this file.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Skip the floor (the C exchange loop run after the agent's window).
    #[arg(long)]
    no_floor: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// The aggregator's `fleet.limits` that one agent with many HTTP targets needs raised:
/// an HTTP probe has up to ~20 series, with their label values.
fn limits(targets: usize) -> String {
    let series = (targets * 24).max(250_000);
    let bytes = (targets * 2048).max(32 << 20);
    format!("fleet:\n  limits:\n    max_series: {series}\n    max_series_bytes: {bytes}\n")
}

fn aggregator_config(args: &Args, nginx: u16) -> String {
    let interval = args.interval.0;
    let timeout = args
        .timeout
        .map(|t| t.0)
        .unwrap_or_else(|| interval.min(Duration::from_secs(10)));
    let mut text = format!(
        "# Written by agent-bench\nglobal:\n  scrape_interval: {}ms\n  scrape_timeout: {}ms\nmodules:\n  http_2xx:\n    prober: http\n    http:\n      preferred_ip_protocol: ip4\njobs:\n  - job_name: bench\n    module: http_2xx\n    static_configs:\n      - targets:\n",
        interval.as_millis(),
        timeout.as_millis()
    );
    for i in 0..args.targets {
        let _ = writeln!(text, "          - \"http://127.0.0.1:{nginx}/?t={i}\"");
    }
    text.push_str(&limits(args.targets));
    text
}

/// The floor's warm-up at its rate before its window: connections to nginx warm again
/// after the agent's stop.
const FLOOR_WARMUP: Duration = Duration::from_secs(3);

fn agent_config(grpc: &str) -> String {
    format!("agent:\n  id: bench-agent\naggregators:\n  - address: {grpc}\n")
}

// ---------------------------------------------------------------------------------------
// Measuring the agent

/// The process's CPU in seconds, and per thread name (threads of one name summed). A
/// thread that ended within the window takes its CPU with it from the per-thread
/// figures (not from the process's).
struct Cpu {
    process: f64,
    threads: BTreeMap<String, f64>,
}

fn cpu(pid: u32, ticks: f64) -> anyhow::Result<Cpu> {
    let (_, process) = stat_ticks(Path::new(&format!("/proc/{pid}/stat")))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let mut threads = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in dir.flatten() {
            if let Some((comm, t)) = stat_ticks(&task.path().join("stat")) {
                *threads.entry(comm).or_insert(0.0) += t / ticks;
            }
        }
    }
    Ok(Cpu {
        process: process / ticks,
        threads,
    })
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// What the bench reads of the agent's `/metrics`: sums by metric name, and by name and
/// one label's value for the few labelled families it needs.
#[derive(Default, Debug, Clone)]
struct Scrape {
    sums: BTreeMap<String, f64>,
    /// (name, label value) → value, for `le` and `reason`.
    by_label: BTreeMap<(String, String), f64>,
    /// When the page was read: the middle of the request.
    at: Option<Instant>,
}

impl Scrape {
    fn read(web: &str) -> anyhow::Result<Self> {
        let before = Instant::now();
        let text = metrics_page(web, &[]).map_err(anyhow::Error::msg)?;
        let after = Instant::now();
        let mut scrape = Scrape {
            at: Some(before + (after - before) / 2),
            ..Scrape::default()
        };
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            *scrape.sums.entry(name.to_string()).or_insert(0.0) += value;
            for label in ["le=\"", "reason=\""] {
                if let Some(start) = line.find(label) {
                    let rest = &line[start + label.len()..];
                    if let Some(end) = rest.find('"') {
                        *scrape
                            .by_label
                            .entry((name.to_string(), rest[..end].to_string()))
                            .or_insert(0.0) += value;
                    }
                }
            }
        }
        Ok(scrape)
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.sums.get(name).copied()
    }

    fn labelled(&self, name: &str) -> BTreeMap<String, f64> {
        self.by_label
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, l), v)| (l.clone(), *v))
            .collect()
    }
}

/// The `p` quantile of a cumulative histogram's increase between two scrapes, as the
/// upper bound of the bucket it falls in (so "≤ this"), in seconds.
fn bucket_quantile(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    p: f64,
) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(le, v)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, v - before.get(le).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= p * total)
        .map(|(bound, _)| *bound)
}

// ---------------------------------------------------------------------------------------
// The run

struct Report {
    args_line: String,
    label: String,
    targets: usize,
    interval: Duration,
    window: f64,
    probes: f64,
    expected_rate: f64,
    rate: f64,
    failures: f64,
    cpu: f64,
    cpu_per_probe_us: f64,
    prober_us: Option<f64>,
    threads: Vec<(String, f64)>,
    peak_rss: u64,
    rss: u64,
    fds_max: usize,
    threads_count: u64,
    delay_p50: Option<f64>,
    delay_p99: Option<f64>,
    late: BTreeMap<String, f64>,
    skipped: BTreeMap<String, f64>,
    acked: Option<f64>,
    backlog: Option<f64>,
    aggregator_cpu: f64,
    floor: Option<floor::Floor>,
}

impl Report {
    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "agent-bench {}: `{}`", self.label, self.args_line);
        let _ = writeln!(
            s,
            "{} HTTP targets every {:?}, window {:.0} s\n",
            self.targets, self.interval, self.window
        );
        let _ = writeln!(s, "| | |\n|---|---:|");
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "| {k} | {v} |");
        };
        row(
            &mut s,
            "probes in the window",
            format!("{:.0}", self.probes),
        );
        row(
            &mut s,
            "probe rate / expected (targets ÷ interval)",
            format!(
                "{:.1} / {:.1} ({:+.2} %)",
                self.rate,
                self.expected_rate,
                (self.rate / self.expected_rate - 1.0) * 100.0
            ),
        );
        row(&mut s, "failed probes", format!("{:.0}", self.failures));
        row(&mut s, "agent CPU, s", format!("{:.2}", self.cpu));
        row(
            &mut s,
            "**whole-process CPU per probe, µs**",
            format!("**{:.1}**", self.cpu_per_probe_us),
        );
        row(
            &mut s,
            "prober-only CPU per probe, µs (same run)",
            self.prober_us
                .map_or("not exposed by this agent".into(), |v| format!("{v:.1}")),
        );
        match &self.floor {
            Some(f) => {
                row(
                    &mut s,
                    "floor: C exchange loop, CPU per exchange, µs (same nginx, URLs, rate, window)",
                    format!("{:.1}", f.cpu_per_exchange_us()),
                );
                row(
                    &mut s,
                    "floor: exchanges, rate achieved / expected",
                    format!(
                        "{} in {:.0} s, {:.1} / {:.1}",
                        f.exchanges,
                        f.window,
                        f.rate(),
                        self.expected_rate
                    ),
                );
                row(
                    &mut s,
                    "**agent ÷ floor**",
                    format!(
                        "**{:.2}×**",
                        self.cpu_per_probe_us / f.cpu_per_exchange_us()
                    ),
                );
                if let Some(p) = self.prober_us {
                    row(
                        &mut s,
                        "prober-only ÷ floor",
                        format!("{:.2}×", p / f.cpu_per_exchange_us()),
                    );
                }
            }
            None => row(&mut s, "floor", "not measured (--no-floor)".into()),
        }
        for (name, cpu) in &self.threads {
            row(
                &mut s,
                &format!("  thread `{name}`, µs per probe"),
                format!("{:.1}", cpu / self.probes * 1e6),
            );
        }
        row(
            &mut s,
            "peak RSS (VmHWM) / RSS at the end, MiB",
            format!(
                "{:.1} / {:.1}",
                self.peak_rss as f64 / 1048576.0,
                self.rss as f64 / 1048576.0
            ),
        );
        row(
            &mut s,
            "open fds (max seen) / threads",
            format!("{} / {}", self.fds_max, self.threads_count),
        );
        let ms = |v: Option<f64>| {
            v.map_or("not exposed by this agent".into(), |v| {
                format!("≤ {:.0} ms", v * 1000.0)
            })
        };
        row(&mut s, "start delay p50", ms(self.delay_p50));
        row(&mut s, "start delay p99", ms(self.delay_p99));
        let counts = |m: &BTreeMap<String, f64>| {
            if m.is_empty() {
                "—".to_string()
            } else {
                m.iter()
                    .map(|(k, v)| format!("{k}: {v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        row(&mut s, "probes late, by reason", counts(&self.late));
        row(&mut s, "slots skipped, by reason", counts(&self.skipped));
        row(
            &mut s,
            "results acked in the window / buffered at the end",
            format!(
                "{} / {}",
                self.acked.map_or("?".into(), |v| format!("{v:.0}")),
                self.backlog.map_or("?".into(), |v| format!("{v:.0}"))
            ),
        );
        row(
            &mut s,
            "aggregator CPU per probe, µs (for reference)",
            format!("{:.1}", self.aggregator_cpu / self.probes * 1e6),
        );
        s
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "command": self.args_line,
            "targets": self.targets,
            "interval_s": self.interval.as_secs_f64(),
            "window_s": self.window,
            "probes": self.probes,
            "rate": self.rate,
            "expected_rate": self.expected_rate,
            "failures": self.failures,
            "cpu_s": self.cpu,
            "cpu_per_probe_us": self.cpu_per_probe_us,
            "prober_only_us": self.prober_us,
            "threads_cpu_s": self.threads.iter().cloned().collect::<BTreeMap<_, _>>(),
            "peak_rss_bytes": self.peak_rss,
            "rss_bytes": self.rss,
            "fds_max": self.fds_max,
            "threads": self.threads_count,
            "start_delay_p50_s": self.delay_p50,
            "start_delay_p99_s": self.delay_p99,
            "late": self.late,
            "skipped": self.skipped,
            "acked": self.acked,
            "backlog": self.backlog,
            "aggregator_cpu_s": self.aggregator_cpu,
            "floor": self.floor.as_ref().map(|f| serde_json::json!({
                "exchanges": f.exchanges,
                "window_s": f.window,
                "cpu_s": f.cpu_seconds,
                "cpu_per_exchange_us": f.cpu_per_exchange_us(),
                "rate": f.rate(),
                "agent_to_floor": self.cpu_per_probe_us / f.cpu_per_exchange_us(),
                "prober_only_to_floor": self.prober_us.map(|p| p / f.cpu_per_exchange_us()),
            })),
        })
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if (self.rate / self.expected_rate - 1.0).abs() > 0.02 {
            p.push(format!(
                "the probe rate {:.1}/s is more than 2 % off {:.1}/s",
                self.rate, self.expected_rate
            ));
        }
        if self.failures > 0.0 {
            p.push(format!("{:.0} probes failed", self.failures));
        }
        if let Some(f) = &self.floor
            && (f.rate() / self.expected_rate - 1.0).abs() > 0.02
        {
            p.push(format!(
                "the floor's loop ran {:.1} exchanges/s, more than 2 % off {:.1}/s: its CPU per exchange is not comparable",
                f.rate(),
                self.expected_rate
            ));
        }
        p
    }
}

fn run(args: &Args) -> anyhow::Result<Report> {
    let agent_bin =
        find_release_bin(args.agent.as_deref(), "sonde-agent").map_err(anyhow::Error::msg)?;
    let aggregator_bin = find_release_bin(args.aggregator.as_deref(), "sonde-aggregator")
        .map_err(anyhow::Error::msg)?;
    let interval = args.interval.0;
    let window_intervals = (args.duration.0.as_secs_f64() / interval.as_secs_f64())
        .ceil()
        .max(1.0);
    let window = interval.mul_f64(window_intervals);
    let warmup = args
        .warmup
        .map(|w| w.0)
        .unwrap_or(interval + Duration::from_secs(10));
    let ticks = clock_ticks_per_second();

    let work = WorkDir::create("agent-bench", args.run.keep).map_err(anyhow::Error::msg)?;
    let dir = work.path.clone();
    // Compiled first, so that a missing gcc fails the run before the long part.
    let floor_program = if args.no_floor {
        None
    } else {
        Some(floor::build(&dir).map_err(anyhow::Error::msg)?)
    };
    let (mut nginx, nginx_port) = start_nginx(&dir).map_err(anyhow::Error::msg)?;

    // aggregator
    let agg_web = free_port();
    let agg_grpc = free_port();
    let agg_conf = dir.join("aggregator.yml");
    std::fs::write(&agg_conf, aggregator_config(args, nginx_port))
        .with_context(|| format!("write {}", agg_conf.display()))?;
    let mut cmd = Command::new(&aggregator_bin);
    cmd.arg(format!("--config.file={}", agg_conf.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{agg_web}"))
        .arg(format!("--grpc.listen-address=127.0.0.1:{agg_grpc}"))
        .arg(format!(
            "--storage.path={}",
            dir.join("aggregator-data").display()
        ));
    let mut aggregator = Process::start("aggregator", cmd, &dir);
    let agg_url = format!("http://127.0.0.1:{agg_web}");
    wait_for(
        "the aggregator",
        Duration::from_secs(120),
        &mut [&mut aggregator],
        || {
            http_get_ok(&format!("{agg_url}/-/ready"))
                .map(drop)
                .map_err(anyhow::Error::msg)
        },
    )
    .map_err(anyhow::Error::msg)?;

    // agent
    let agent_web = free_port();
    let agent_conf = dir.join("agent.yml");
    std::fs::write(
        &agent_conf,
        agent_config(&format!("http://127.0.0.1:{agg_grpc}")),
    )
    .with_context(|| format!("write {}", agent_conf.display()))?;
    let mut cmd = Command::new(&agent_bin);
    cmd.arg(format!("--config.file={}", agent_conf.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{agent_web}"))
        .arg(format!(
            "--storage.path={}",
            dir.join("agent-data").display()
        ));
    let mut agent = Process::start("agent", cmd, &dir);
    let pid = agent.pid();
    let web = format!("http://127.0.0.1:{agent_web}");
    let targets = args.targets as f64;
    eprintln!(
        "agent-bench: nginx :{nginx_port}, aggregator {agg_url} (pid {}), agent {web} (pid {pid}); waiting for the assignment",
        aggregator.pid()
    );
    wait_for(
        "the agent to run every check",
        Duration::from_secs(300),
        &mut [&mut nginx, &mut aggregator, &mut agent],
        || {
            let s = Scrape::read(&web)?;
            match s.get("sonde_agent_checks") {
                Some(n) if n >= targets => Ok(()),
                other => Err(anyhow!("sonde_agent_checks {other:?}")),
            }
        },
    )
    .map_err(anyhow::Error::msg)?;
    eprintln!(
        "agent-bench: {} checks running; warming up for {warmup:?}",
        args.targets
    );
    let sleep_checked =
        |d: Duration, procs: &mut [&mut Process], fds: &mut usize| -> anyhow::Result<()> {
            let end = Instant::now() + d;
            while Instant::now() < end {
                for p in procs.iter_mut() {
                    p.check_running().map_err(anyhow::Error::msg)?;
                }
                *fds = (*fds).max(open_fds(pid));
                std::thread::sleep(
                    Duration::from_secs(1).min(end.saturating_duration_since(Instant::now())),
                );
            }
            Ok(())
        };
    let mut fds_max = 0;
    sleep_checked(
        warmup,
        &mut [&mut nginx, &mut aggregator, &mut agent],
        &mut fds_max,
    )?;

    // The window: CPU from the end of the first scrape to the start of the last, so that
    // rendering `/metrics` (a series per target) is not counted; probes between the
    // two pages' snapshot times.
    fds_max = 0;
    let first = Scrape::read(&web)?;
    let cpu0 = cpu(pid, ticks)?;
    let agg0 = cpu(aggregator.pid(), ticks)?.process;
    let t0 = Instant::now();
    let perf = args
        .perf
        .as_deref()
        .map(|path| PerfRecord::start(pid, path))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    eprintln!("agent-bench: measuring for {window:?}");
    sleep_checked(
        window,
        &mut [&mut nginx, &mut aggregator, &mut agent],
        &mut fds_max,
    )?;
    if let Some(perf) = perf {
        perf.stop();
    }
    let cpu1 = cpu(pid, ticks)?;
    let agg1 = cpu(aggregator.pid(), ticks)?.process;
    let measured = t0.elapsed().as_secs_f64();
    let last = Scrape::read(&web)?;
    let peak_rss = status_bytes(pid, "VmHWM:").map_err(anyhow::Error::msg)?;
    let rss = status_bytes(pid, "VmRSS:").map_err(anyhow::Error::msg)?;
    let threads_count = status_value(pid, "Threads:").map_err(anyhow::Error::msg)?;

    let delta =
        |name: &str| -> Option<f64> { Some(last.get(name)? - first.get(name).unwrap_or(0.0)) };
    let probes = delta("sonde_agent_probes_total").context("no sonde_agent_probes_total")?;
    let between = match (first.at, last.at) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => measured,
    };
    let cpu_s = cpu1.process - cpu0.process;
    let prober_us = match (
        delta("sonde_agent_probe_cpu_seconds_total"),
        delta("sonde_agent_probe_cpu_probes_total"),
    ) {
        (Some(s), Some(n)) if n > 0.0 => Some(s / n * 1e6),
        _ => None,
    };
    let mut threads: Vec<(String, f64)> = cpu1
        .threads
        .iter()
        .map(|(k, v)| (k.clone(), v - cpu0.threads.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    let bucket = "sonde_agent_probes_started_total";
    let (b0, b1) = (first.labelled(bucket), last.labelled(bucket));
    let diff = |name: &str| -> BTreeMap<String, f64> {
        let (a, b) = (first.labelled(name), last.labelled(name));
        b.iter()
            .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
            .collect()
    };
    let floor = match floor_program {
        Some(program) => {
            // SIGSTOP rather than SIGTERM: a stopping agent would flush its buffer and
            // close its streams during the floor's window; a stopped one costs nothing.
            // The agent is killed with the rest of the run.
            // SAFETY: kill(2) with a pid of this program's own child and a valid signal.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) } != 0 {
                return Err(anyhow!(
                    "cannot stop the agent (pid {pid}) for the floor: {}",
                    std::io::Error::last_os_error()
                ));
            }
            eprintln!(
                "agent-bench: agent stopped; the floor: {:.1} exchanges/s for {window:?}",
                targets / interval.as_secs_f64()
            );
            let floor = floor::run(
                &program,
                nginx_port,
                args.targets,
                targets / interval.as_secs_f64(),
                FLOOR_WARMUP,
                window,
                ticks,
            )
            .map_err(|e| anyhow!("the floor: {e}"))?;
            nginx.check_running().map_err(anyhow::Error::msg)?;
            Some(floor)
        }
        None => None,
    };
    let args_line = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    Ok(Report {
        args_line,
        label: args.run.label.clone(),
        targets: args.targets,
        interval,
        window: between,
        probes,
        expected_rate: targets / interval.as_secs_f64(),
        rate: probes / between,
        failures: delta("sonde_agent_probe_failures_total").unwrap_or(0.0),
        cpu: cpu_s,
        cpu_per_probe_us: cpu_s / probes * 1e6,
        prober_us,
        threads,
        peak_rss,
        rss,
        fds_max,
        threads_count,
        delay_p50: bucket_quantile(&b0, &b1, 0.5),
        delay_p99: bucket_quantile(&b0, &b1, 0.99),
        late: diff("sonde_agent_probes_late_total"),
        skipped: diff("sonde_agent_probes_skipped_total"),
        acked: delta("sonde_agent_results_acked_total"),
        backlog: last.get("sonde_agent_buffer_results"),
        aggregator_cpu: agg1 - agg0,
        floor,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => args.run.finish(
            "agent-bench",
            &report.markdown(),
            &report.json(),
            &report.problems(),
        ),
        Err(e) => {
            eprintln!("agent-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_of_the_increase_between_two_scrapes() {
        let m = |v: &[(&str, f64)]| -> BTreeMap<String, f64> {
            v.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let before = m(&[
            ("0.001", 10.0),
            ("0.01", 10.0),
            ("0.1", 10.0),
            ("+Inf", 10.0),
        ]);
        let after = m(&[
            ("0.001", 60.0),
            ("0.01", 108.0),
            ("0.1", 110.0),
            ("+Inf", 110.0),
        ]);
        assert_eq!(bucket_quantile(&before, &after, 0.5), Some(0.001));
        assert_eq!(bucket_quantile(&before, &after, 0.98), Some(0.01));
        assert_eq!(bucket_quantile(&before, &after, 0.99), Some(0.1));
        assert_eq!(bucket_quantile(&after, &after, 0.99), None);
    }

    #[test]
    fn the_config_lists_every_target_once() {
        let args = Args::parse_from(["agent-bench", "--targets", "3", "--interval", "15s"]);
        let text = aggregator_config(&args, 8080);
        assert_eq!(text.matches("http://127.0.0.1:8080/?t=").count(), 3);
        assert!(text.contains("scrape_timeout: 10000ms"));
        assert!(text.contains("max_series: 250000"));
    }
}
