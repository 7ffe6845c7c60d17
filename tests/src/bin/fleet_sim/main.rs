//! fleet-sim: a simulated fleet against the real `sonde-aggregator` binary, beside the
//! same load through the ingest floor and through vmagent, all writing into one
//! receiver (a real VictoriaMetrics, or a sink that costs next to nothing).
//!
//! Phase 1 (aggregator): N simulated agents, each on its own gRPC connection, stream
//! `sonde.v1` results for M targets × S samples every interval (on a schedule like a
//! real agent's, interned through the symbol table, in batches with strictly increasing
//! seq) to an aggregator that remote-writes to the receiver. Halfway through, every
//! agent reports one target as failed, and the time until `up == 0` reaches the
//! receiver is measured.
//!
//! Phase 2 (floor): the same with `ingest-floor` in the aggregator's place, the least
//! work the same load needs through the same protocols (when its binary is found).
//!
//! Phase 3 (anchor): the same schedule, the same samples with the same label sets (plus
//! `sim="anchor"`), pushed as Prometheus remote write 1.0 to vmagent, which forwards to
//! the same receiver.
//!
//! The phases run one after the other so that they do not compete for the CPU. Each
//! process's CPU (utime + stime) over its phase is divided by the rows the receiver took
//! in that phase, and by the probe samples sent; the aggregator's is also divided by
//! the floor's and vmagent's of the same run. A second figure starts once the first
//! interval is over, when every series exists: the steady state a long-running process
//! pays per sample, without the one-off cost of new series. Run `fleet-sim --help` for
//! the options; docs/benchmarks.md has the figures and the exact commands.

mod agents;
mod load;
mod phases;
mod receiver;
mod report;
mod sink;

use anyhow::{Context, anyhow};
use clap::Parser;
use load::{Batching, Load, Preset};
use phases::Bench;
use receiver::{Receiver, ReceiverKind};
use report::Report;
use sonde_proto::config::PromDuration;
use sonde_tests::procfs::clock_ticks_per_second;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longer than vmagent's flush interval (1 s): a phase's rows are all in once the
/// receiver's count has not moved for this long.
const SETTLE_QUIET: Duration = Duration::from_secs(3);
const WAIT_START: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(
    name = "fleet-sim",
    about = "Simulated sonde agents against the real aggregator, beside the ingest floor and vmagent, all into one remote-write receiver"
)]
struct Args {
    /// A predefined load; the other flags override its parts. `real`: what a real fleet
    /// sends, 1,000 agents × 100 targets at 60 s for 2 minutes, each agent batching as
    /// the real one does (about one result per batch; `--targets 1000` for the full
    /// shape). `goal`: 1,000 agents × 1,000 targets at 60 s for 3 minutes on the 250 ms
    /// flush. `big-job`: one job of 50,000 targets probed by 3 agents at 60 s for 2
    /// minutes.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Simulated agents, each with its own gRPC connection [default: 10].
    #[arg(long)]
    agents: Option<usize>,
    /// Targets, all probed by every agent [default: 1000].
    #[arg(long)]
    targets: Option<usize>,
    /// Jobs the targets are split into [default: 1].
    #[arg(long)]
    jobs: Option<usize>,
    /// Samples per result; 12 is an HTTP probe's set [default: 12].
    #[arg(long)]
    samples: Option<usize>,
    /// Probe interval of every target [default: 5s].
    #[arg(long)]
    interval: Option<PromDuration>,
    /// Length of each phase [default: 30s].
    #[arg(long)]
    duration: Option<PromDuration>,
    /// Most results in one batch (further capped by --batch-samples).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Most samples in one batch; 5000 is what the real agent sends at most.
    #[arg(long, default_value_t = 5000)]
    batch_samples: usize,
    /// When an agent sends: `flush`, everything due on a fixed ticker (--flush); `agent`,
    /// as the real agent (50 ms grid, 100 ms linger after the first ready result)
    /// [default: agent with --preset real, else flush].
    #[arg(long, value_enum)]
    batching: Option<Batching>,
    /// With `--batching flush`: how often an agent sends what its schedule has produced
    /// since the last send.
    #[arg(long, default_value = "250ms")]
    flush: PromDuration,
    /// Where every phase remote-writes: `victoria-metrics`, a real database; `sink`, an
    /// HTTP/1.1 receiver in this process that counts rows and answers 204 (its CPU is
    /// reported apart).
    #[arg(long, value_enum, default_value = "victoria-metrics")]
    receiver: ReceiverKind,
    /// The sonde-aggregator binary [default: next to this program, else
    /// target/release/sonde-aggregator].
    #[arg(long)]
    aggregator: Option<PathBuf>,
    /// The ingest-floor binary its phase runs [default: next to this program, else
    /// target/release/ingest-floor; the phase is left out when neither exists].
    #[arg(long)]
    floor: Option<PathBuf>,
    /// Skip the ingest floor's phase.
    #[arg(long)]
    no_floor: bool,
    #[arg(long, default_value = "/usr/bin/victoria-metrics")]
    victoria_metrics: PathBuf,
    #[arg(long, default_value = "/usr/bin/vmagent")]
    vmagent: PathBuf,
    /// Skip the vmagent phase.
    #[arg(long)]
    no_anchor: bool,
    /// Record the aggregator with `perf record -g` during its phase, into this file.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the working directory (configs, logs, data) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// Run the process under test (the aggregator, the floor, then vmagent) alone on
    /// CPU 0, and the simulator and the receiver on CPU 1. On a two-core machine runs
    /// then vary far less (see docs/benchmarks.md); use it to compare two builds.
    #[arg(long)]
    pin: bool,
}

/// The CPU the process under test runs on with `--pin`, and the one the rest shares.
const CPU_UNDER_TEST: usize = 0;
const CPU_FOR_THE_REST: usize = 1;

/// Binds the calling thread, and the threads and processes it starts from then on, to
/// `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the call reads `set` only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// With `--pin`, `cmd`'s process runs on [`CPU_UNDER_TEST`] only.
fn pin_under_test(cmd: &mut Command, pin: bool) {
    use std::os::unix::process::CommandExt;
    if pin {
        // SAFETY: sched_setaffinity is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| pin_to(CPU_UNDER_TEST));
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The load average (1, 5 and 15 minutes) as `/proc/loadavg` gives it.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The working directory, removed at the end unless `--keep`.
struct World {
    dir: PathBuf,
    keep: bool,
}

impl Drop for World {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("fleet-sim: files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn require(path: &Path, package: &str) -> anyhow::Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(anyhow!(
            "{} not found; install the Debian package {package} or pass its path",
            path.display()
        ))
    }
}

/// The floor binary of the floor phase, unless it is left out: asked for with
/// `--no-floor`, not found, or already the process under test.
fn floor_binary(args: &Args, aggregator: &Path) -> anyhow::Result<Option<PathBuf>> {
    if args.no_floor {
        return Ok(None);
    }
    let under_test_is_floor = aggregator
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("ingest-floor"));
    if under_test_is_floor {
        return Ok(None);
    }
    match sonde_tests::bench::find_release_bin(args.floor.as_deref(), "ingest-floor") {
        Ok(path) => Ok(Some(path)),
        Err(e) if args.floor.is_some() => Err(anyhow!(e)),
        Err(e) => {
            eprintln!("fleet-sim: no ingest-floor phase: {e}");
            Ok(None)
        }
    }
}

fn run(args: Args) -> anyhow::Result<Report> {
    let load = Load::from_args(&args)?;
    let aggregator_bin =
        sonde_tests::bench::find_release_bin(args.aggregator.as_deref(), "sonde-aggregator")
            .map_err(anyhow::Error::msg)?;
    let floor_bin = floor_binary(&args, &aggregator_bin)?;
    if args.receiver == ReceiverKind::VictoriaMetrics {
        require(&args.victoria_metrics, "victoria-metrics")?;
    }
    if !args.no_anchor {
        require(&args.vmagent, "vmagent")?;
    }
    if args.pin {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus <= CPU_FOR_THE_REST {
            return Err(anyhow!(
                "--pin needs two CPUs (the process under test on one, the rest on the other); this machine offers {cpus}"
            ));
        }
        // Before any thread or process is started: they all inherit it.
        pin_to(CPU_FOR_THE_REST).with_context(|| {
            format!("--pin: cannot bind the simulator to CPU {CPU_FOR_THE_REST}")
        })?;
    }
    let loadavg_start = loadavg();
    let dir = std::env::temp_dir().join(format!("fleet-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let world = World {
        dir: dir.clone(),
        keep: args.keep,
    };
    eprintln!("fleet-sim: {}", load.describe());
    eprintln!("fleet-sim: working in {}", world.dir.display());

    let mut receiver = Receiver::start(args.receiver, &args.victoria_metrics, &dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    let bench = Bench {
        args: &args,
        load: &load,
        dir: &dir,
        ticks: clock_ticks_per_second(),
        receiver: &receiver,
        runtime: &runtime,
        local: &local,
    };
    let (aggregator, raised) = bench.server_phase(
        "sonde-aggregator",
        &aggregator_bin,
        "sim_http",
        args.perf.as_deref(),
    )?;
    let floor = match &floor_bin {
        Some(floor_bin) => {
            receiver.settle(SETTLE_QUIET)?;
            Some(
                bench
                    .server_phase("ingest floor", floor_bin, "floor_http", None)?
                    .0,
            )
        }
        None => None,
    };
    let anchor = if args.no_anchor {
        None
    } else {
        Some(bench.anchor_phase()?)
    };
    receiver.check_running()?;
    let mut report = Report {
        load,
        raised,
        pinned: args.pin,
        receiver: args.receiver,
        loadavg: (loadavg_start, loadavg()),
        aggregator,
        floor,
        anchor,
    };
    report.aggregator.errors.extend(
        receiver
            .errors()
            .into_iter()
            .map(|e| format!("receiver: {e}")),
    );
    Ok(report)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let json_path = args.json.clone();
    match run(args) {
        Ok(report) => sonde_tests::bench::finish(
            "fleet-sim",
            json_path.as_deref(),
            &report.markdown(),
            &report.json(),
            &report.problems(),
        ),
        Err(e) => {
            eprintln!("fleet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
