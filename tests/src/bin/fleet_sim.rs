//! fleet-sim: a simulated fleet against the real `sonde-aggregator` binary, and the same
//! load through vmagent as an anchor, both writing into one real VictoriaMetrics.
//!
//! Phase 1 (aggregator): N simulated agents, each on its own gRPC connection, stream
//! `sonde.v1` results for M targets × S samples every interval (spread over the interval
//! like a real agent's schedule, interned through the symbol table, in batches with
//! strictly increasing seq) to an aggregator that remote-writes to VictoriaMetrics.
//! Halfway through, every agent reports one target as failed, and the time until
//! `up == 0` is visible in VictoriaMetrics is measured.
//!
//! Phase 2 (anchor): the same schedule, the same samples with the same label sets (plus
//! `sim="anchor"`), pushed as Prometheus remote write 1.0 to vmagent, which forwards to
//! the same VictoriaMetrics.
//!
//! The phases run one after the other so that they do not compete for the CPU. Each
//! process's CPU (utime + stime) over its phase is divided by the rows VictoriaMetrics
//! inserted in that phase, and by the probe samples sent. A second figure starts once
//! the first interval is over, when every series exists: the steady state a
//! long-running process pays per sample, without the one-off cost of new series. Run
//! `fleet-sim --help` for the options; docs/benchmarks.md has the figures and the exact
//! commands.

use anyhow::{Context, anyhow};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prost::Message;
use sonde_proto::config::PromDuration;
use sonde_proto::pb::{
    self, AgentMessage, AggregatorMessage, agent_message, aggregator_message,
    fleet_client::FleetClient,
};
use sonde_proto::prompb;
use sonde_tests::procfs::{clock_ticks_per_second, cpu_seconds, metrics_page, status_bytes};
use sonde_tests::{Process, free_port, http_get_ok, metric_sum, prometheus_query};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Unacked results a real agent holds in flight before it stops sending
/// (`IN_FLIGHT_MAX` in agent/src/uplink/mod.rs); the simulated agents wait the same way.
const IN_FLIGHT_MAX: usize = 20_000;
/// The real agent's heartbeat period (`HEARTBEAT_EVERY` in agent/src/uplink/mod.rs).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// The aggregator's default `fleet.limits` this load must fit, or the generated config
/// raises them (and the report says so).
const DEFAULT_MAX_RESULTS_PER_BATCH: usize = 1000;
const DEFAULT_MAX_SAMPLES_PER_BATCH: usize = 10_000;
const DEFAULT_MAX_SAMPLES_PER_RESULT: usize = 256;
const DEFAULT_MAX_SERIES: usize = 250_000;
const DEFAULT_MAX_SERIES_BYTES: usize = 32 << 20;
const DEFAULT_MAX_AGENTS: usize = 1000;
/// How often the failed target's `up` is looked up in VictoriaMetrics.
const DETECT_POLL: Duration = Duration::from_millis(50);
/// Longer than vmagent's flush interval (1 s): the anchor phase's rows are all in once
/// VictoriaMetrics's count has not moved for this long.
const SETTLE_QUIET: Duration = Duration::from_secs(3);
const WAIT_START: Duration = Duration::from_secs(60);
/// How long after its phase the aggregator's remote-write queue may take to empty.
const DRAIN_MAX: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(
    name = "fleet-sim",
    about = "Simulated sonde agents against the real aggregator, with vmagent as the anchor, both into a real VictoriaMetrics"
)]
struct Args {
    /// A predefined load; the other flags override its parts. `goal`: the aggregator's goal shape,
    /// 1,000 agents × 1,000 targets at a 60 s interval for 3 minutes. `big-job`: one job
    /// of 50,000 targets probed by 3 agents at 60 s for 2 minutes.
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
    /// How often an agent sends what its schedule has produced since the last send.
    #[arg(long, default_value = "250ms")]
    flush: PromDuration,
    /// The sonde-aggregator binary [default: next to this program, else
    /// target/release/sonde-aggregator].
    #[arg(long)]
    aggregator: Option<PathBuf>,
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
    /// Run the process under test (the aggregator, then vmagent) alone on CPU 0, and the
    /// simulator and VictoriaMetrics on CPU 1. On a two-core machine runs then vary far
    /// less (see docs/benchmarks.md); use it to compare two builds.
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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    Goal,
    BigJob,
}

/// The load both phases carry.
#[derive(Clone, Debug)]
struct Load {
    agents: usize,
    targets: usize,
    jobs: usize,
    samples: usize,
    interval: Duration,
    duration: Duration,
    /// Results per batch, after the samples cap.
    batch: usize,
    flush: Duration,
}

impl Load {
    fn from_args(args: &Args) -> anyhow::Result<Self> {
        let (agents, targets, jobs, interval, duration) = match args.preset {
            None => (10, 1000, 1, 5, 30),
            Some(Preset::Goal) => (1000, 1000, 1, 60, 180),
            Some(Preset::BigJob) => (3, 50_000, 1, 60, 120),
        };
        let load = Self {
            agents: args.agents.unwrap_or(agents),
            targets: args.targets.unwrap_or(targets),
            jobs: args.jobs.unwrap_or(jobs),
            samples: args.samples.unwrap_or(12),
            interval: args.interval.map_or(Duration::from_secs(interval), |d| d.0),
            duration: args.duration.map_or(Duration::from_secs(duration), |d| d.0),
            batch: args
                .batch
                .min(args.batch_samples / args.samples.unwrap_or(12).max(1))
                .max(1),
            flush: args.flush.0,
        };
        if load.agents == 0 || load.targets == 0 || load.samples == 0 {
            return Err(anyhow!(
                "--agents, --targets and --samples must be at least 1"
            ));
        }
        if load.jobs == 0 || load.jobs > load.targets {
            return Err(anyhow!(
                "--jobs {} must be between 1 and the number of targets ({})",
                load.jobs,
                load.targets
            ));
        }
        if load.interval < Duration::from_millis(100) {
            return Err(anyhow!("--interval must be at least 100ms"));
        }
        if load.flush.is_zero() || load.flush > load.interval {
            return Err(anyhow!("--flush must be above 0 and at most --interval"));
        }
        if load.duration < 2 * load.interval.min(Duration::from_secs(5)) {
            return Err(anyhow!(
                "--duration {:?} is too short: give at least two intervals (or 10s)",
                load.duration
            ));
        }
        Ok(load)
    }

    fn results_per_second(&self) -> f64 {
        (self.agents * self.targets) as f64 / self.interval.as_secs_f64()
    }

    fn describe(&self) -> String {
        format!(
            "{} agents × {} targets ({} job{}) × {} samples every {:?} for {:?} per phase ({:.0} results/s, {:.0} samples/s offered), batches of ≤ {} results, sent every {:?}",
            self.agents,
            self.targets,
            self.jobs,
            if self.jobs == 1 { "" } else { "s" },
            self.samples,
            self.interval,
            self.duration,
            self.results_per_second(),
            self.results_per_second() * self.samples as f64,
            self.batch,
            self.flush
        )
    }
}

// ---------------------------------------------------------------------------------------
// What the simulated agents report

/// One series shape of a probe result: metric name and its own labels.
#[derive(Clone, Debug)]
struct Shape {
    name: String,
    labels: Vec<(String, String)>,
}

/// The samples of an HTTP probe, as blackbox_exporter (and sonde's agent) name them;
/// past the 12 of a plain HTTP probe, those of an HTTPS probe, then numbered extras.
fn shapes(n: usize) -> Vec<Shape> {
    let plain = |name: &str| Shape {
        name: name.into(),
        labels: vec![],
    };
    let labelled = |name: &str, k: &str, v: &str| Shape {
        name: name.into(),
        labels: vec![(k.into(), v.into())],
    };
    let mut all = vec![
        plain("probe_success"),
        plain("probe_duration_seconds"),
        plain("probe_http_status_code"),
        labelled("probe_http_duration_seconds", "phase", "resolve"),
        labelled("probe_http_duration_seconds", "phase", "connect"),
        labelled("probe_http_duration_seconds", "phase", "tls"),
        labelled("probe_http_duration_seconds", "phase", "processing"),
        labelled("probe_http_duration_seconds", "phase", "transfer"),
        plain("probe_ip_protocol"),
        plain("probe_http_version"),
        plain("probe_http_content_length"),
        plain("probe_http_redirects"),
        plain("probe_http_ssl"),
        plain("probe_http_uncompressed_body_length"),
        plain("probe_dns_lookup_time_seconds"),
        plain("probe_ip_addr_hash"),
        plain("probe_failed_due_to_regex"),
        plain("probe_http_last_modified_timestamp_seconds"),
        plain("probe_ssl_earliest_cert_expiry"),
        labelled("probe_tls_version_info", "version", "TLS 1.3"),
    ];
    let mut extra = 0;
    while all.len() < n {
        all.push(labelled("probe_sim_extra", "n", &extra.to_string()));
        extra += 1;
    }
    all.truncate(n);
    all
}

/// The value of sample `shape` in the `i`-th result an agent produces: plausible and
/// varying, so that VictoriaMetrics compresses it as it would real data.
fn value(shape: &Shape, success: bool, i: u64) -> f64 {
    let jitter = ((i.wrapping_mul(2_654_435_761) >> 7) % 1000) as f64 / 1000.0;
    let phase = shape.labels.first().map(|(_, v)| v.as_str());
    match (shape.name.as_str(), phase) {
        ("probe_success", _) => f64::from(u8::from(success)),
        ("probe_duration_seconds", _) => probe_duration(i),
        ("probe_http_status_code", _) => {
            if success {
                200.0
            } else {
                0.0
            }
        }
        ("probe_http_duration_seconds", Some("connect")) => 0.001 + 0.001 * jitter,
        ("probe_http_duration_seconds", Some("processing")) => 0.010 + 0.008 * jitter,
        ("probe_http_duration_seconds", Some("transfer")) => 0.0002 * jitter,
        ("probe_http_duration_seconds", _) => 0.0,
        ("probe_ip_protocol", _) => 4.0,
        ("probe_http_version", _) => 1.1,
        ("probe_http_content_length", _) => 5120.0,
        ("probe_http_uncompressed_body_length", _) => 5120.0,
        ("probe_ssl_earliest_cert_expiry", _) => 1.8e9,
        ("probe_http_last_modified_timestamp_seconds", _) => 1.7e9,
        ("probe_ip_addr_hash", _) => 3_405_691_582.0,
        ("probe_tls_version_info", _) | ("probe_http_ssl", _) => 1.0,
        _ => jitter,
    }
}

fn probe_duration(i: u64) -> f64 {
    0.020 + 0.010 * ((i.wrapping_mul(2_654_435_761) >> 7) % 1000) as f64 / 1000.0
}

/// The targets, split into jobs; the simulator knows them because it wrote the config.
struct Targets {
    /// (job, instance) of every target, in the order the schedule walks them.
    all: Vec<(Arc<str>, Arc<str>)>,
}

impl Targets {
    fn new(load: &Load) -> Self {
        let per_job = load.targets.div_ceil(load.jobs);
        let all = (0..load.targets)
            .map(|k| {
                let job = format!("sim_http_{}", k / per_job);
                let instance = format!("https://t{k:05}.sim.example/health");
                (Arc::from(job), Arc::from(instance))
            })
            .collect();
        Self { all }
    }

    fn jobs(&self) -> Vec<(&str, Vec<&str>)> {
        let mut jobs: Vec<(&str, Vec<&str>)> = Vec::new();
        for (job, instance) in &self.all {
            match jobs.last_mut() {
                Some((j, list)) if *j == &**job => list.push(instance),
                _ => jobs.push((&**job, vec![&**instance])),
            }
        }
        jobs
    }
}

/// One result the schedule produced.
#[derive(Clone, Copy, Debug)]
struct Due {
    /// Index into [`Targets::all`].
    target: usize,
    timestamp_ms: i64,
    success: bool,
    /// Running number of the agent's results (varies the values).
    i: u64,
}

/// What every agent shares in a phase: the load, the targets, when the phase started
/// and when the failing target starts failing.
struct Plan {
    load: Load,
    targets: Targets,
    shapes: Vec<Shape>,
    start: tokio::time::Instant,
    start_ms: i64,
    /// Offset from `start` at which target 0 fails for every agent.
    fail_at: Duration,
}

/// The failing target: the first one of the first job.
const FAILING: usize = 0;

/// Walks one agent's probe schedule: every target once per interval, spread evenly over
/// it, and the agents staggered against each other (as real agents, started at
/// different times, are).
struct Schedule {
    offset_ms: f64,
    step_ms: f64,
    next: u64,
    end_ms: f64,
    fail_at_ms: f64,
    fail_reported: bool,
}

impl Schedule {
    fn new(plan: &Plan, agent: usize) -> Self {
        let interval_ms = plan.load.interval.as_secs_f64() * 1000.0;
        Self {
            offset_ms: interval_ms * agent as f64 / plan.load.agents as f64,
            step_ms: interval_ms / plan.load.targets as f64,
            next: 0,
            end_ms: plan.load.duration.as_secs_f64() * 1000.0,
            fail_at_ms: plan.fail_at.as_secs_f64() * 1000.0,
            fail_reported: false,
        }
    }

    fn due_ms(&self, i: u64) -> f64 {
        self.offset_ms + i as f64 * self.step_ms
    }

    fn done(&self) -> bool {
        self.due_ms(self.next) >= self.end_ms
    }

    /// Appends what is due by `now_ms` (since the phase start) to `out`. At the failure
    /// instant, the agent also reports the failing target at once, as a probe that has
    /// just failed would.
    fn take(&mut self, plan: &Plan, now_ms: f64, out: &mut Vec<Due>) {
        let targets = plan.load.targets as u64;
        while !self.done() && self.due_ms(self.next) <= now_ms {
            let due = self.due_ms(self.next);
            let target = (self.next % targets) as usize;
            out.push(Due {
                target,
                timestamp_ms: plan.start_ms + due as i64,
                success: !(target == FAILING && due >= self.fail_at_ms),
                i: self.next,
            });
            self.next += 1;
        }
        if !self.fail_reported && now_ms >= self.fail_at_ms {
            self.fail_reported = true;
            out.push(Due {
                target: FAILING,
                timestamp_ms: plan.start_ms + now_ms as i64,
                success: false,
                i: self.next,
            });
        }
    }
}

// ---------------------------------------------------------------------------------------
// Delivery: to the aggregator over sonde.v1, or to vmagent over remote write

/// What one agent saw of its deliveries.
#[derive(Default)]
struct AgentStats {
    /// Batch sent → its acknowledgement, in microseconds.
    latencies_us: Vec<u32>,
    results_sent: u64,
    /// Of those, sent once the first interval was over: every series exists by then.
    results_sent_warm: u64,
    results_acked: u64,
    batches: u64,
    /// Times the agent had to wait because IN_FLIGHT_MAX results were unacked.
    stalls: u64,
    /// Times the connection was found closed and opened again.
    reconnects: u64,
    errors: Vec<String>,
    /// When (since the phase start) it sent the failed result of the failing target.
    failure_sent: Option<Duration>,
}

/// The sonde.v1 side of one simulated agent: the outgoing half of its stream, and the
/// batches awaiting their ack.
struct GrpcAgent {
    tx: mpsc::Sender<AgentMessage>,
    seq: u64,
    /// Symbol indexes of each shape: (name, [label name, label value]...).
    interned: Vec<(u32, Vec<u32>)>,
    /// Symbols not yet sent (the whole table, before the first batch).
    unsent_symbols: Vec<String>,
    window: Arc<AckWindow>,
    reader: tokio::task::JoinHandle<()>,
}

/// Batches sent and not yet acked, shared by the sending half and the stream reader.
#[derive(Default)]
struct AckWindow {
    /// (last seq of the batch, sent at, results in it), oldest first.
    pending: Mutex<VecDeque<(u64, Instant, usize)>>,
    unacked: AtomicUsize,
    acked: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    assignments: AtomicU64,
    ended: Mutex<Option<String>>,
    closed: AtomicBool,
}

impl AckWindow {
    fn ack(&self, acked_seq: u64) {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap();
        let mut latencies = self.latencies_us.lock().unwrap();
        while let Some(&(last, sent, n)) = pending.front() {
            if last > acked_seq {
                break;
            }
            pending.pop_front();
            latencies.push(now.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
            self.unacked.fetch_sub(n, Ordering::Relaxed);
            self.acked.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

fn hello(agent_id: &str) -> pb::Hello {
    pb::Hello {
        protocol_version: sonde_proto::PROTOCOL_VERSION,
        agent_id: agent_id.to_string(),
        labels: [("site".to_string(), "sim".to_string())].into(),
        version: "fleet-sim".into(),
        local_jobs: vec![],
        last_acked_seq: 0,
    }
}

fn agent_id(agent: usize) -> String {
    format!("sim-{agent:04}")
}

impl GrpcAgent {
    /// Connects, says Hello and waits for the first Assignment (without reading it: the
    /// simulator knows the targets from the config it wrote).
    async fn connect(grpc: &str, agent: usize, shapes: &[Shape]) -> anyhow::Result<Self> {
        let id = agent_id(agent);
        let mut client = FleetClient::connect(grpc.to_string())
            .await
            .with_context(|| format!("{id}: cannot connect to the aggregator at {grpc}"))?
            // An assignment lists every target of the agent; the agent accepts 64 MiB.
            .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(64);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(hello(&id))),
        })
        .await
        .map_err(|_| anyhow!("{id}: stream closed before Hello"))?;
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .with_context(|| format!("{id}: the aggregator refused the stream"))?
            .into_inner();
        match tokio::time::timeout(WAIT_START, inbound.message()).await {
            Ok(Ok(Some(AggregatorMessage {
                msg: Some(aggregator_message::Msg::Assignment(_)),
            }))) => {}
            Ok(other) => {
                return Err(anyhow!("{id}: expected an Assignment first, got {other:?}"));
            }
            Err(_) => return Err(anyhow!("{id}: no Assignment within {WAIT_START:?}")),
        }
        let window = Arc::new(AckWindow::default());
        window.assignments.fetch_add(1, Ordering::Relaxed);
        let reader = tokio::spawn(read_stream(inbound, window.clone()));
        tokio::spawn(heartbeats(tx.downgrade()));

        let mut symbols: Vec<String> = Vec::new();
        let mut intern = |s: &str| -> u32 {
            match symbols.iter().position(|x| x == s) {
                Some(i) => i as u32,
                None => {
                    symbols.push(s.to_string());
                    (symbols.len() - 1) as u32
                }
            }
        };
        let interned = shapes
            .iter()
            .map(|s| {
                let name = intern(&s.name);
                let labels = s
                    .labels
                    .iter()
                    .flat_map(|(k, v)| [intern(k), intern(v)])
                    .collect();
                (name, labels)
            })
            .collect();
        Ok(Self {
            tx,
            seq: 0,
            interned,
            unsent_symbols: symbols,
            window,
            reader,
        })
    }

    async fn send(&mut self, plan: &Plan, dues: &[Due], stats: &mut AgentStats) {
        while self.window.unacked.load(Ordering::Relaxed) >= IN_FLIGHT_MAX {
            stats.stalls += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let results: Vec<pb::ProbeResult> = dues
            .iter()
            .map(|d| {
                self.seq += 1;
                let (job, instance) = &plan.targets.all[d.target];
                pb::ProbeResult {
                    seq: self.seq,
                    job: job.to_string(),
                    instance: instance.to_string(),
                    timestamp_ms: d.timestamp_ms,
                    success: d.success,
                    duration_seconds: probe_duration(d.i),
                    samples: plan
                        .shapes
                        .iter()
                        .zip(&self.interned)
                        .map(|(shape, (name, labels))| pb::Sample {
                            name: *name,
                            labels: labels.clone(),
                            value: value(shape, d.success, d.i),
                        })
                        .collect(),
                    generation: 1,
                    failure: if d.success {
                        String::new()
                    } else {
                        "simulated outage".into()
                    },
                    trace: None,
                }
            })
            .collect();
        let batch = pb::ResultBatch {
            new_symbols: std::mem::take(&mut self.unsent_symbols),
            results,
        };
        self.window.unacked.fetch_add(dues.len(), Ordering::Relaxed);
        self.window
            .pending
            .lock()
            .unwrap()
            .push_back((self.seq, Instant::now(), dues.len()));
        stats.batches += 1;
        stats.results_sent += dues.len() as u64;
        if plan.start.elapsed() >= plan.load.interval {
            stats.results_sent_warm += dues.len() as u64;
        }
        let message = AgentMessage {
            msg: Some(agent_message::Msg::Results(batch)),
        };
        if self.tx.send(message).await.is_err() && stats.errors.is_empty() {
            let why = self.window.ended.lock().unwrap().clone();
            stats.errors.push(format!(
                "the stream ended while sending: {}",
                why.unwrap_or_else(|| "no reason given".into())
            ));
        }
    }

    /// Waits (bounded) for every batch to be acked, then closes the stream.
    async fn finish(self, stats: &mut AgentStats) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.window.unacked.load(Ordering::Relaxed) > 0
            && !self.window.closed.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let unacked = self.window.unacked.load(Ordering::Relaxed);
        if unacked > 0 {
            stats.errors.push(format!(
                "{unacked} results never acked ({})",
                self.window
                    .ended
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_else(|| "waited 120s".into())
            ));
        }
        drop(self.tx);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.reader).await;
        stats.results_acked = self.window.acked.load(Ordering::Relaxed);
        stats.latencies_us = std::mem::take(&mut self.window.latencies_us.lock().unwrap());
    }
}

/// Sends a Heartbeat every [`HEARTBEAT_EVERY`] as the real agent does, from the Hello on
/// (an agent whose first slot is late in the interval would otherwise look silent and
/// be dropped), until the stream's sender is dropped.
async fn heartbeats(tx: mpsc::WeakSender<AgentMessage>) {
    let mut ticker = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        ticker.tick().await;
        let Some(tx) = tx.upgrade() else { return };
        let beat = AgentMessage {
            msg: Some(agent_message::Msg::Heartbeat(pb::Heartbeat {
                timestamp_ms: now_ms(),
            })),
        };
        if tx.send(beat).await.is_err() {
            return;
        }
    }
}

/// Reads the aggregator's side of the stream continuously: acks close batches,
/// assignments are counted and otherwise ignored.
async fn read_stream(mut inbound: tonic::Streaming<AggregatorMessage>, window: Arc<AckWindow>) {
    let why = loop {
        match inbound.message().await {
            Ok(Some(AggregatorMessage {
                msg: Some(aggregator_message::Msg::Ack(a)),
            })) => window.ack(a.acked_seq),
            Ok(Some(AggregatorMessage {
                msg: Some(aggregator_message::Msg::Assignment(_)),
            })) => {
                window.assignments.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(_)) => {}
            Ok(None) => break "the aggregator closed the stream".to_string(),
            Err(status) => break format!("stream error: {status}"),
        }
    };
    *window.ended.lock().unwrap() = Some(why);
    window.closed.store(true, Ordering::Relaxed);
}

/// The anchor's side of one simulated agent: remote write 1.0 to vmagent on a
/// keep-alive HTTP/1.1 connection.
struct RemoteWriteAgent {
    id: String,
    address: String,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl RemoteWriteAgent {
    async fn connect(address: &str, agent: usize) -> anyhow::Result<Self> {
        Ok(Self {
            id: agent_id(agent),
            address: address.to_string(),
            sender: Self::open(address).await?,
        })
    }

    async fn open(
        address: &str,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .with_context(|| format!("cannot connect to vmagent at {address}"))?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .with_context(|| format!("HTTP handshake with vmagent at {address}"))?;
        tokio::spawn(connection);
        Ok(sender)
    }

    async fn send(&mut self, plan: &Plan, dues: &[Due], stats: &mut AgentStats) {
        let label = |name: &str, value: &str| prompb::Label {
            name: name.into(),
            value: value.into(),
        };
        let mut timeseries = Vec::with_capacity(dues.len() * plan.shapes.len());
        for d in dues {
            let (job, instance) = &plan.targets.all[d.target];
            for shape in &plan.shapes {
                let mut labels = vec![
                    label("__name__", &shape.name),
                    label("agent", &self.id),
                    label("instance", instance),
                    label("job", job),
                    label("sim", "anchor"),
                ];
                labels.extend(shape.labels.iter().map(|(k, v)| label(k, v)));
                labels.sort_by(|a, b| a.name.cmp(&b.name));
                timeseries.push(prompb::TimeSeries {
                    labels,
                    samples: vec![prompb::Sample {
                        value: value(shape, d.success, d.i),
                        timestamp: d.timestamp_ms,
                    }],
                });
            }
        }
        let body = prompb::WriteRequest {
            timeseries,
            metadata: vec![],
        }
        .encode_to_vec();
        let body = match snap::raw::Encoder::new().compress_vec(&body) {
            Ok(b) => b,
            Err(e) => {
                stats.errors.push(format!("snappy: {e}"));
                return;
            }
        };
        let body = Bytes::from(body);
        stats.batches += 1;
        stats.results_sent += dues.len() as u64;
        if plan.start.elapsed() >= plan.load.interval {
            stats.results_sent_warm += dues.len() as u64;
        }
        let sent = Instant::now();
        let mut outcome = self.post(body.clone()).await;
        if outcome.is_err() && self.sender.is_closed() {
            // vmagent closed the keep-alive connection: connect again and resend, as a
            // remote-write client does.
            stats.reconnects += 1;
            outcome = match Self::open(&self.address).await {
                Ok(sender) => {
                    self.sender = sender;
                    self.post(body).await
                }
                Err(e) => Err(e),
            };
        }
        match outcome {
            Ok(()) => {
                stats
                    .latencies_us
                    .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                stats.results_acked += dues.len() as u64;
            }
            Err(e) => {
                if stats.errors.len() < 5 {
                    stats.errors.push(format!("{e:#}"));
                }
            }
        }
    }

    async fn post(&mut self, body: Bytes) -> anyhow::Result<()> {
        let request = http::Request::post("/api/v1/write")
            .header("Host", &self.address)
            .header("Content-Type", "application/x-protobuf")
            .header("Content-Encoding", "snappy")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(Full::new(body))
            .context("building the request")?;
        self.sender.ready().await.context("connection to vmagent")?;
        let response = self
            .sender
            .send_request(request)
            .await
            .context("POST to vmagent")?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading vmagent's answer")?
            .to_bytes();
        if status.is_success() {
            Ok(())
        } else {
            Err(anyhow!(
                "vmagent answered {status}: {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }
}

enum Link {
    Grpc(Box<GrpcAgent>),
    RemoteWrite(Box<RemoteWriteAgent>),
}

/// Runs one agent's schedule to the end of the phase over `link`.
async fn drive(plan: Arc<Plan>, agent: usize, mut link: Link) -> AgentStats {
    let mut stats = AgentStats::default();
    let mut schedule = Schedule::new(&plan, agent);
    let mut ticker = tokio::time::interval_at(plan.start, plan.load.flush);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dues = Vec::new();
    while !schedule.done() {
        ticker.tick().await;
        let now_ms = plan.start.elapsed().as_secs_f64() * 1000.0;
        let had_failure = schedule.fail_reported;
        schedule.take(&plan, now_ms, &mut dues);
        if !had_failure && schedule.fail_reported {
            stats.failure_sent = Some(plan.start.elapsed());
        }
        for chunk in dues.chunks(plan.load.batch) {
            match &mut link {
                Link::Grpc(a) => a.send(&plan, chunk, &mut stats).await,
                Link::RemoteWrite(a) => a.send(&plan, chunk, &mut stats).await,
            }
        }
        dues.clear();
    }
    if let Link::Grpc(a) = link {
        a.finish(&mut stats).await;
    }
    stats
}

// ---------------------------------------------------------------------------------------
// Measuring processes and VictoriaMetrics

/// utime + stime of a process, in seconds.
/// (VmHWM, VmRSS) of a process, in bytes.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    Ok((
        status_bytes(pid, "VmHWM:").map_err(anyhow::Error::msg)?,
        status_bytes(pid, "VmRSS:").map_err(anyhow::Error::msg)?,
    ))
}

/// `sonde_results_refused_total` over every agent and reason (0 before any refusal,
/// when the counter has no series yet).
fn refused_results(samples: &[sonde_tests::MetricSample]) -> f64 {
    sonde_tests::find_samples(samples, "sonde_results_refused_total", &[])
        .iter()
        .map(|s| s.value)
        .sum::<f64>()
        + 0.0
}

fn vm_rows(vm: &str) -> anyhow::Result<f64> {
    metric_sum(vm, "vm_rows_inserted_total", &[]).map_err(anyhow::Error::msg)
}

/// Waits until VictoriaMetrics's inserted-rows count has not moved for `quiet`
/// (bounded); returns the count. Only for phases after the aggregator has stopped: a
/// running aggregator rewrites `up` and its own series every few seconds.
fn settle(vm: &str, quiet: Duration) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = vm_rows(vm)?;
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = vm_rows(vm)?;
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return Ok(now);
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "VictoriaMetrics at {vm} kept inserting rows for 300s after the phase"
            ));
        }
    }
}

/// Waits until the aggregator's remote-write queue is empty (bounded): every row of the
/// phase has then been accepted by VictoriaMetrics. Returns the page it saw last, and why
/// it stopped waiting if the queue never emptied (the phase's figures then count only
/// the rows that got in, and the report lists it as a problem).
///
/// The aggregator's `/metrics` page lists series per target, so rendering it costs the
/// aggregator CPU that would count in the phase: it is read only once VictoriaMetrics
/// receives rows at under 2% of the phase's rate (the aggregator's own periodic
/// rewrites of `up`), then every 2 s until the queue is empty.
fn drain_aggregator(
    web: &str,
    vm: &str,
    rows_before: f64,
    phase: Duration,
) -> anyhow::Result<(Vec<sonde_tests::MetricSample>, Option<String>)> {
    let deadline = Instant::now() + DRAIN_MAX;
    let step = Duration::from_millis(500);
    let mut last = vm_rows(vm)?;
    let slow = ((last - rows_before) / phase.as_secs_f64() * step.as_secs_f64() * 0.02).max(1.0);
    loop {
        std::thread::sleep(step);
        let now = vm_rows(vm)?;
        let delta = now - last;
        last = now;
        if delta <= slow || Instant::now() > deadline {
            break;
        }
    }
    loop {
        let page = metrics_page(
            web,
            &[
                "sonde_remote_write_queue_samples",
                "sonde_results_refused_total",
            ],
        )
        .map_err(anyhow::Error::msg)?;
        let samples = sonde_tests::parse_metrics(&page);
        let queues = sonde_tests::find_samples(&samples, "sonde_remote_write_queue_samples", &[]);
        if queues.is_empty() {
            return Err(anyhow!(
                "sonde_remote_write_queue_samples is not on {web}/metrics: cannot tell when remote write is done"
            ));
        }
        let queued: f64 = queues.iter().map(|s| s.value).sum();
        if queued == 0.0 {
            return Ok((samples, None));
        }
        if Instant::now() > deadline {
            let why = format!(
                "the aggregator's remote-write queue still held {queued} samples {}s after the phase ({web}/metrics)",
                DRAIN_MAX.as_secs()
            );
            return Ok((samples, Some(why)));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn wait_healthy(what: &str, url: &str, process: &mut Process) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if http_get_ok(url).is_ok() {
            return Ok(());
        }
        process.check_running().map_err(anyhow::Error::msg)?;
        if start.elapsed() > WAIT_START {
            return Err(anyhow!(
                "{what} not healthy at {url} after {WAIT_START:?}\n{}",
                process.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------
// The phases

/// What one phase measured.
#[derive(Default, Debug)]
struct PhaseReport {
    name: String,
    elapsed_s: f64,
    results_sent: u64,
    results_acked: u64,
    samples_sent: u64,
    batches: u64,
    stalls: u64,
    reconnects: u64,
    rows_inserted: f64,
    cpu_s: f64,
    /// Samples sent, and the CPU spent, from the end of the first interval (every series
    /// exists) until the phase's rows are all in: the steady state.
    samples_sent_warm: u64,
    cpu_warm_s: Option<f64>,
    hwm_bytes: u64,
    rss_bytes: u64,
    latency_ms: Option<(f64, f64, f64)>,
    /// Failure instant → `up == 0` visible in VictoriaMetrics.
    detection_ms: Option<f64>,
    /// Failure instant → the last agent had sent its failed result.
    failure_sent_spread_ms: Option<f64>,
    refused: Option<f64>,
    errors: Vec<String>,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

fn plan_for(load: &Load) -> Plan {
    let flush = load.flush.as_secs_f64();
    // On a flush tick, so that every agent reports the failure at the same instant.
    let half = (load.duration.as_secs_f64() / 2.0 / flush).round() * flush;
    // The agents connect first; the phase starts once all are in.
    Plan {
        load: load.clone(),
        targets: Targets::new(load),
        shapes: shapes(load.samples),
        start: tokio::time::Instant::now(),
        start_ms: now_ms(),
        fail_at: Duration::from_secs_f64(half),
    }
}

/// Polls VictoriaMetrics for the failing target's `up == 0` from the failure instant
/// on; returns how long after that instant it was first visible.
fn detect(vm: String, job: String, instance: String, fail_at: Instant) -> Option<f64> {
    let query = format!("up{{job=\"{job}\",instance=\"{instance}\"}} == 0");
    std::thread::sleep(fail_at.saturating_duration_since(Instant::now()));
    let deadline = fail_at + Duration::from_secs(120);
    while Instant::now() < deadline {
        if prometheus_query(&vm, &query).is_ok_and(|r| !r.is_empty()) {
            return Some(fail_at.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(DETECT_POLL);
    }
    None
}

/// Runs the schedule of every agent over links `connect` opens; returns the merged
/// agent stats and the phase's own start instant.
async fn run_agents<F, Fut>(
    load: &Load,
    connect: F,
    vm: &str,
    detect_up: bool,
    before_start: impl FnOnce() -> anyhow::Result<()>,
    cpu_now: impl FnOnce() -> Option<f64> + Send + 'static,
) -> anyhow::Result<(Vec<AgentStats>, Arc<Plan>, Option<f64>, f64, Option<f64>)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Link>> + 'static,
{
    let mut links = Vec::with_capacity(load.agents);
    // A few at a time: a thousand simultaneous handshakes are not what is measured.
    let mut next = 0;
    while next < load.agents {
        let upto = (next + 50).min(load.agents);
        let batch = futures_join((next..upto).map(&connect)).await;
        for link in batch {
            links.push(link?);
        }
        next = upto;
    }
    if links.len() != load.agents {
        return Err(anyhow!(
            "only {} of {} agents could connect",
            links.len(),
            load.agents
        ));
    }
    before_start()?;
    let mut plan = plan_for(load);
    plan.start = tokio::time::Instant::now();
    plan.start_ms = now_ms();
    let plan = Arc::new(plan);
    let wall_start = Instant::now();
    let detector = detect_up.then(|| {
        let (job, instance) = plan.targets.all[FAILING].clone();
        let vm = vm.to_string();
        let fail_at = wall_start + plan.fail_at;
        std::thread::spawn(move || detect(vm, job.to_string(), instance.to_string(), fail_at))
    });
    // The process's CPU once the first interval is over, when every series exists: the
    // steady state a long-running process pays is measured from there.
    let warm_at = wall_start + load.interval;
    let warm = std::thread::spawn(move || {
        std::thread::sleep(warm_at.saturating_duration_since(Instant::now()));
        cpu_now()
    });
    let tasks: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(agent, link)| tokio::spawn(drive(plan.clone(), agent, link)))
        .collect();
    let mut stats = Vec::with_capacity(tasks.len());
    for task in tasks {
        stats.push(task.await.context("an agent task failed")?);
    }
    let elapsed = wall_start.elapsed().as_secs_f64();
    let detection = match detector {
        Some(d) => tokio::task::spawn_blocking(move || d.join().ok().flatten())
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let warm_cpu = tokio::task::spawn_blocking(move || warm.join().ok().flatten())
        .await
        .ok()
        .flatten();
    Ok((stats, plan, detection, elapsed, warm_cpu))
}

/// Awaits every future (they run concurrently on the runtime).
async fn futures_join<T: 'static, Fut: std::future::Future<Output = T> + 'static>(
    futures: impl Iterator<Item = Fut>,
) -> Vec<T> {
    let mut out = Vec::new();
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futures.enumerate() {
        // Spawned on the current thread's set, in order; results are re-ordered below.
        set.spawn_local(async move { (i, f.await) });
    }
    while let Some(Ok(item)) = set.join_next().await {
        out.push(item);
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, v)| v).collect()
}

fn summarize(name: &str, stats: &[AgentStats], plan: &Plan, elapsed: f64) -> PhaseReport {
    let (samples, fail_at) = (plan.load.samples, plan.fail_at);
    let mut report = PhaseReport {
        name: name.into(),
        elapsed_s: elapsed,
        ..PhaseReport::default()
    };
    let mut latencies: Vec<u32> = Vec::new();
    let mut failure_sent: Option<Duration> = None;
    for s in stats {
        report.results_sent += s.results_sent;
        report.results_acked += s.results_acked;
        report.samples_sent_warm += s.results_sent_warm * samples as u64;
        report.batches += s.batches;
        report.stalls += s.stalls;
        report.reconnects += s.reconnects;
        latencies.extend(&s.latencies_us);
        if let Some(t) = s.failure_sent {
            failure_sent = Some(failure_sent.map_or(t, |f| f.max(t)));
        }
        for e in &s.errors {
            if report.errors.len() < 10 {
                report.errors.push(e.clone());
            }
        }
    }
    report.samples_sent = report.results_sent * samples as u64;
    latencies.sort_unstable();
    if !latencies.is_empty() {
        report.latency_ms = Some((
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            f64::from(*latencies.last().unwrap_or(&0)) / 1000.0,
        ));
    }
    report.failure_sent_spread_ms =
        failure_sent.map(|t| t.saturating_sub(fail_at).as_secs_f64() * 1000.0);
    report
}

/// The aggregator's config: every target in static jobs that select every agent,
/// remote write to VictoriaMetrics, and `fleet.limits` raised where the defaults would
/// refuse this load. Returns the YAML and what was raised.
fn aggregator_config(load: &Load, targets: &Targets, vm: &str) -> (String, Vec<String>) {
    let mut raised = Vec::new();
    let mut limits = String::new();
    let per_batch_samples = load.batch * load.samples;
    if load.batch > DEFAULT_MAX_RESULTS_PER_BATCH {
        let _ = writeln!(limits, "    max_results_per_batch: {}", load.batch);
        raised.push(format!("max_results_per_batch {}", load.batch));
    }
    if per_batch_samples > DEFAULT_MAX_SAMPLES_PER_BATCH {
        let _ = writeln!(limits, "    max_samples_per_batch: {per_batch_samples}");
        raised.push(format!("max_samples_per_batch {per_batch_samples}"));
    }
    if load.samples > DEFAULT_MAX_SAMPLES_PER_RESULT {
        let _ = writeln!(limits, "    max_samples_per_result: {}", load.samples);
        raised.push(format!("max_samples_per_result {}", load.samples));
    }
    let series = load.targets * load.samples;
    if series > DEFAULT_MAX_SERIES {
        let _ = writeln!(limits, "    max_series: {series}");
        raised.push(format!("max_series {series}"));
    }
    let shape_bytes: usize = shapes(load.samples)
        .iter()
        .map(|s| {
            s.name.len()
                + s.labels
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        })
        .sum();
    let series_bytes = shape_bytes * load.targets;
    if series_bytes > DEFAULT_MAX_SERIES_BYTES {
        // With room: the bound is on bytes held, and this is the exact need.
        let bytes = series_bytes + series_bytes / 4;
        let _ = writeln!(limits, "    max_series_bytes: {bytes}");
        raised.push(format!("max_series_bytes {bytes}"));
    }
    if load.agents > DEFAULT_MAX_AGENTS {
        // The simulated agents connect without tokens.
        let _ = writeln!(limits, "    max_agents: {}", load.agents);
        raised.push(format!("max_agents {}", load.agents));
    }
    let interval_s = load.interval.as_secs_f64();
    let mut text = format!(
        "# Written by fleet-sim: {}\nglobal:\n  scrape_interval: {}ms\n  scrape_timeout: {}ms\nmodules:\n  http_2xx:\n    prober: http\n    http:\n      preferred_ip_protocol: ip4\njobs:\n",
        load.describe(),
        load.interval.as_millis(),
        (interval_s * 1000.0 * 0.8).min(10_000.0) as u64
    );
    for (job, instances) in targets.jobs() {
        let _ = writeln!(text, "  - job_name: {job}\n    module: http_2xx");
        let _ = writeln!(text, "    static_configs:\n      - targets:");
        for instance in instances {
            let _ = writeln!(text, "          - \"{instance}\"");
        }
    }
    let _ = writeln!(
        text,
        "remote_write:\n  - url: {vm}/api/v1/write\n    name: victoriametrics"
    );
    if !limits.is_empty() {
        let _ = write!(text, "fleet:\n  limits:\n{limits}");
    }
    (text, raised)
}

struct World {
    dir: PathBuf,
    keep: bool,
    ticks: f64,
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

fn run(args: Args) -> anyhow::Result<Report> {
    let load = Load::from_args(&args)?;
    let aggregator_bin =
        sonde_tests::bench::find_release_bin(args.aggregator.as_deref(), "sonde-aggregator")
            .map_err(anyhow::Error::msg)?;
    require(&args.victoria_metrics, "victoria-metrics")?;
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
    let dir = std::env::temp_dir().join(format!("fleet-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let world = World {
        dir: dir.clone(),
        keep: args.keep,
        ticks: clock_ticks_per_second(),
    };
    eprintln!("fleet-sim: {}", load.describe());
    eprintln!("fleet-sim: working in {}", dir.display());

    let vm_port = free_port();
    let mut vm_cmd = Command::new(&args.victoria_metrics);
    vm_cmd
        .arg(format!("-httpListenAddr=127.0.0.1:{vm_port}"))
        .arg(format!(
            "-storageDataPath={}",
            dir.join("vm-data").display()
        ))
        .arg("-search.latencyOffset=0s")
        .arg("-dedup.minScrapeInterval=1ms")
        .arg("-search.disableCache")
        .arg("-loggerLevel=WARN");
    let mut vm_process = Process::start("victoria-metrics", vm_cmd, &dir);
    let vm = format!("http://127.0.0.1:{vm_port}");
    wait_healthy("VictoriaMetrics", &format!("{vm}/health"), &mut vm_process)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let local = tokio::task::LocalSet::new();

    // Phase 1: the aggregator.
    let targets = Targets::new(&load);
    let (config, raised) = aggregator_config(&load, &targets, &vm);
    let config_path = dir.join("aggregator.yml");
    std::fs::write(&config_path, config)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let web_port = free_port();
    let grpc_port = free_port();
    let mut cmd = Command::new(&aggregator_bin);
    cmd.arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .arg(format!("--grpc.listen-address=127.0.0.1:{grpc_port}"))
        .arg(format!(
            "--storage.path={}",
            dir.join("aggregator-data").display()
        ))
        .arg("--log.level=info");
    pin_under_test(&mut cmd, args.pin);
    let mut aggregator = Process::start("aggregator", cmd, &dir);
    let web = format!("http://127.0.0.1:{web_port}");
    wait_healthy(
        "the aggregator",
        &format!("{web}/-/healthy"),
        &mut aggregator,
    )?;
    let pid = aggregator.pid();
    let grpc = format!("http://127.0.0.1:{grpc_port}");
    eprintln!(
        "fleet-sim: aggregator {} (pid {pid}) at {web}, gRPC {grpc}; fleet.limits raised: {}",
        aggregator_bin.display(),
        if raised.is_empty() {
            "none".to_string()
        } else {
            raised.join(", ")
        }
    );

    let rows_before = std::cell::Cell::new(0.0);
    let cpu_before = std::cell::Cell::new(0.0);
    let mut perf: Option<std::process::Child> = None;
    let ticks = world.ticks;
    let (stats, plan, detection, elapsed, warm_cpu) = local.block_on(&runtime, async {
        let shapes = shapes(load.samples);
        let grpc = grpc.clone();
        run_agents(
            &load,
            |agent| {
                let grpc = grpc.clone();
                let shapes = shapes.clone();
                async move {
                    GrpcAgent::connect(&grpc, agent, &shapes)
                        .await
                        .map(|a| Link::Grpc(Box::new(a)))
                }
            },
            &vm,
            true,
            || {
                cpu_before.set(cpu_seconds(pid, world.ticks).map_err(anyhow::Error::msg)?);
                rows_before.set(vm_rows(&vm)?);
                if let Some(path) = &args.perf {
                    perf = Some(
                        Command::new("perf")
                            .args(["record", "-g", "-o"])
                            .arg(path)
                            .args(["-p", &pid.to_string()])
                            .stdout(std::process::Stdio::null())
                            .stderr(std::process::Stdio::null())
                            .spawn()
                            .context("cannot run perf")?,
                    );
                }
                eprintln!(
                    "fleet-sim: {} agents connected; aggregator phase starts",
                    load.agents
                );
                Ok(())
            },
            move || cpu_seconds(pid, ticks).ok(),
        )
        .await
    })?;
    if let Some(mut perf) = perf.take() {
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    let (hwm, rss) = memory(pid)?;
    let (page, undrained) = drain_aggregator(&web, &vm, rows_before.get(), load.duration)?;
    let rows_after = vm_rows(&vm)?;
    let cpu_after = cpu_seconds(pid, world.ticks).map_err(anyhow::Error::msg)?;
    let refused = refused_results(&page);
    aggregator.check_running().map_err(anyhow::Error::msg)?;
    let mut phase1 = summarize("sonde-aggregator", &stats, &plan, elapsed);
    phase1.rows_inserted = rows_after - rows_before.get();
    phase1.cpu_s = cpu_after - cpu_before.get();
    phase1.cpu_warm_s = warm_cpu.map(|w| cpu_after - w);
    phase1.hwm_bytes = hwm;
    phase1.rss_bytes = rss;
    phase1.detection_ms = detection;
    phase1.refused = Some(refused);
    phase1.errors.extend(undrained);
    aggregator.terminate(Duration::from_secs(60));
    eprintln!("fleet-sim: aggregator phase done");

    // Phase 2: the anchor.
    let phase2 = if args.no_anchor {
        None
    } else {
        let port = free_port();
        let mut cmd = Command::new(&args.vmagent);
        cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-remoteWrite.url={vm}/api/v1/write"))
            .arg(format!(
                "-remoteWrite.tmpDataPath={}",
                dir.join("vmagent-data").display()
            ))
            .arg("-loggerLevel=WARN");
        pin_under_test(&mut cmd, args.pin);
        let mut vmagent = Process::start("vmagent", cmd, &dir);
        wait_healthy(
            "vmagent",
            &format!("http://127.0.0.1:{port}/health"),
            &mut vmagent,
        )?;
        let pid = vmagent.pid();
        let rows_before = settle(&vm, SETTLE_QUIET)?;
        let cpu_before = std::cell::Cell::new(0.0);
        let address = format!("127.0.0.1:{port}");
        let (stats, plan, _, elapsed, warm_cpu) = local.block_on(&runtime, async {
            run_agents(
                &load,
                |agent| {
                    let address = address.clone();
                    async move {
                        RemoteWriteAgent::connect(&address, agent)
                            .await
                            .map(|a| Link::RemoteWrite(Box::new(a)))
                    }
                },
                &vm,
                false,
                || {
                    cpu_before.set(cpu_seconds(pid, world.ticks).map_err(anyhow::Error::msg)?);
                    eprintln!("fleet-sim: anchor phase starts (vmagent pid {pid})");
                    Ok(())
                },
                move || cpu_seconds(pid, ticks).ok(),
            )
            .await
        })?;
        let (hwm, rss) = memory(pid)?;
        let rows_after = settle(&vm, SETTLE_QUIET)?;
        let cpu_after = cpu_seconds(pid, world.ticks).map_err(anyhow::Error::msg)?;
        vmagent.check_running().map_err(anyhow::Error::msg)?;
        let mut phase2 = summarize("vmagent (anchor)", &stats, &plan, elapsed);
        phase2.rows_inserted = rows_after - rows_before;
        phase2.cpu_s = cpu_after - cpu_before.get();
        phase2.cpu_warm_s = warm_cpu.map(|w| cpu_after - w);
        phase2.hwm_bytes = hwm;
        phase2.rss_bytes = rss;
        vmagent.terminate(Duration::from_secs(30));
        Some(phase2)
    };
    vm_process.check_running().map_err(anyhow::Error::msg)?;
    Ok(Report {
        load,
        raised,
        pinned: args.pin,
        aggregator: phase1,
        anchor: phase2,
    })
}

// ---------------------------------------------------------------------------------------
// The report

struct Report {
    load: Load,
    raised: Vec<String>,
    /// `--pin`: the process under test had CPU 0 to itself.
    pinned: bool,
    aggregator: PhaseReport,
    anchor: Option<PhaseReport>,
}

impl Report {
    /// Series the aggregator holds and writes: one per agent, target and sample, plus
    /// the merged `up`, `sonde_target_agents` and `sonde_target_agents_succeeding` of
    /// every target.
    fn active_series(&self) -> u64 {
        let l = &self.load;
        (l.agents * l.targets * l.samples + 3 * l.targets) as u64
    }

    fn markdown(&self) -> String {
        let a = &self.aggregator;
        let b = self.anchor.as_ref();
        let mut out = String::new();
        let _ = writeln!(out, "Load: {}.", self.load.describe());
        if self.pinned {
            let _ = writeln!(
                out,
                "Pinned (`--pin`): the process under test on CPU {CPU_UNDER_TEST}, the simulator and VictoriaMetrics on CPU {CPU_FOR_THE_REST}."
            );
        }
        let _ = writeln!(
            out,
            "Aggregator `fleet.limits` raised: {}.\n",
            if self.raised.is_empty() {
                "none (the defaults take this load)".to_string()
            } else {
                self.raised.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "| | sonde-aggregator | vmagent (anchor) | aggregator / vmagent |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|");
        let row = |out: &mut String,
                   name: &str,
                   f: &dyn Fn(&PhaseReport) -> Option<f64>,
                   fmt: &dyn Fn(f64) -> String,
                   ratio: bool| {
            let va = f(a);
            let vb = b.and_then(f);
            let cell = |v: Option<f64>| v.map_or("—".to_string(), fmt);
            let r = match (ratio, va, vb) {
                (true, Some(x), Some(y)) if y > 0.0 => format!("{:.2}×", x / y),
                _ => String::new(),
            };
            let _ = writeln!(out, "| {name} | {} | {} | {r} |", cell(va), cell(vb));
        };
        let int = |v: f64| format!("{v:.0}");
        let one = |v: f64| format!("{v:.1}");
        let two = |v: f64| format!("{v:.2}");
        let mib = |v: f64| format!("{:.1}", v / f64::from(1 << 20));
        let _ = writeln!(
            out,
            "| results sent / acked | {} / {} | {} | |",
            a.results_sent,
            a.results_acked,
            b.map_or("—".into(), |b| format!(
                "{} / {}",
                b.results_sent, b.results_acked
            ))
        );
        row(
            &mut out,
            "results/s",
            &|p: &PhaseReport| Some(p.results_sent as f64 / p.elapsed_s),
            &int,
            false,
        );
        row(
            &mut out,
            "samples/s",
            &|p: &PhaseReport| Some(p.samples_sent as f64 / p.elapsed_s),
            &int,
            false,
        );
        row(
            &mut out,
            "rows VictoriaMetrics inserted",
            &|p: &PhaseReport| Some(p.rows_inserted),
            &int,
            true,
        );
        row(
            &mut out,
            "CPU s (utime+stime, whole process)",
            &|p: &PhaseReport| Some(p.cpu_s),
            &two,
            true,
        );
        row(
            &mut out,
            "CPU µs per row inserted",
            &|p: &PhaseReport| (p.rows_inserted > 0.0).then(|| p.cpu_s * 1e6 / p.rows_inserted),
            &two,
            true,
        );
        row(
            &mut out,
            "CPU µs per probe sample sent",
            &|p: &PhaseReport| (p.samples_sent > 0).then(|| p.cpu_s * 1e6 / p.samples_sent as f64),
            &two,
            true,
        );
        row(
            &mut out,
            "CPU µs per probe sample sent after the first interval (steady state)",
            &|p: &PhaseReport| {
                p.cpu_warm_s
                    .filter(|_| p.samples_sent_warm > 0)
                    .map(|c| c * 1e6 / p.samples_sent_warm as f64)
            },
            &two,
            true,
        );
        row(
            &mut out,
            "peak RSS (VmHWM), MiB",
            &|p: &PhaseReport| Some(p.hwm_bytes as f64),
            &mib,
            true,
        );
        row(
            &mut out,
            "RSS at the end (VmRSS), MiB",
            &|p: &PhaseReport| Some(p.rss_bytes as f64),
            &mib,
            true,
        );
        let series = self.active_series() as f64;
        row(
            &mut out,
            &format!(
                "peak RSS per active series ({} series), bytes",
                self.active_series()
            ),
            &|p: &PhaseReport| Some(p.hwm_bytes as f64 / series),
            &one,
            true,
        );
        row(
            &mut out,
            "ack latency p50, ms",
            &|p: &PhaseReport| p.latency_ms.map(|l| l.0),
            &two,
            false,
        );
        row(
            &mut out,
            "ack latency p99, ms",
            &|p: &PhaseReport| p.latency_ms.map(|l| l.1),
            &two,
            false,
        );
        row(
            &mut out,
            "ack latency max, ms",
            &|p: &PhaseReport| p.latency_ms.map(|l| l.2),
            &two,
            false,
        );
        row(
            &mut out,
            "batches",
            &|p: &PhaseReport| Some(p.batches as f64),
            &int,
            false,
        );
        row(
            &mut out,
            "waits on a full in-flight window",
            &|p: &PhaseReport| Some(p.stalls as f64),
            &int,
            false,
        );
        row(
            &mut out,
            "reconnects (connection found closed)",
            &|p: &PhaseReport| Some(p.reconnects as f64),
            &int,
            false,
        );
        let _ = writeln!(
            out,
            "| target failed → `up == 0` visible in VictoriaMetrics, ms | {} | — | |",
            a.detection_ms
                .map_or("not seen within 120s".into(), |v| format!("{v:.0}"))
        );
        let _ = writeln!(
            out,
            "| (of which: the agents' failed results all sent after, ms) | {} | — | |",
            a.failure_sent_spread_ms
                .map_or("—".into(), |v| format!("{v:.0}"))
        );
        let _ = writeln!(
            out,
            "| results refused (`sonde_results_refused_total`) | {} | — | |",
            a.refused.map_or("—".into(), |v| format!("{:.0}", v + 0.0))
        );
        for p in std::iter::once(a).chain(b) {
            for e in &p.errors {
                let _ = writeln!(out, "\n**{} error**: {e}", p.name);
            }
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let phase = |p: &PhaseReport| {
            serde_json::json!({
                "elapsed_s": p.elapsed_s,
                "results_sent": p.results_sent,
                "results_acked": p.results_acked,
                "samples_sent": p.samples_sent,
                "results_per_s": p.results_sent as f64 / p.elapsed_s,
                "samples_per_s": p.samples_sent as f64 / p.elapsed_s,
                "batches": p.batches,
                "in_flight_waits": p.stalls,
                "reconnects": p.reconnects,
                "rows_inserted": p.rows_inserted,
                "cpu_s": p.cpu_s,
                "cpu_us_per_row": if p.rows_inserted > 0.0 { p.cpu_s * 1e6 / p.rows_inserted } else { f64::NAN },
                "cpu_us_per_sample": if p.samples_sent > 0 { p.cpu_s * 1e6 / p.samples_sent as f64 } else { f64::NAN },
                "cpu_us_per_sample_steady": match p.cpu_warm_s {
                    Some(c) if p.samples_sent_warm > 0 => c * 1e6 / p.samples_sent_warm as f64,
                    _ => f64::NAN,
                },
                "peak_rss_bytes": p.hwm_bytes,
                "rss_bytes": p.rss_bytes,
                "ack_latency_ms": p.latency_ms.map(|(p50, p99, max)| serde_json::json!({"p50": p50, "p99": p99, "max": max})),
                "up_zero_visible_ms": p.detection_ms,
                "failed_results_sent_within_ms": p.failure_sent_spread_ms,
                "refused": p.refused,
                "errors": p.errors,
            })
        };
        let l = &self.load;
        serde_json::json!({
            "load": {
                "agents": l.agents, "targets": l.targets, "jobs": l.jobs, "samples": l.samples,
                "interval_s": l.interval.as_secs_f64(), "duration_s": l.duration.as_secs_f64(),
                "batch": l.batch, "flush_s": l.flush.as_secs_f64(),
            },
            "limits_raised": self.raised,
            "pinned": self.pinned,
            "active_series": self.active_series(),
            "aggregator": phase(&self.aggregator),
            "anchor": self.anchor.as_ref().map(phase),
        })
    }

    /// The run failed its own bar: something refused, unacked or in error.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let a = &self.aggregator;
        if a.refused.is_some_and(|r| r > 0.0) {
            out.push(format!(
                "the aggregator refused {} results",
                a.refused.unwrap_or(0.0)
            ));
        }
        if a.results_acked < a.results_sent {
            out.push(format!(
                "{} of {} results were never acked",
                a.results_sent - a.results_acked,
                a.results_sent
            ));
        }
        if a.detection_ms.is_none() {
            out.push("the failed target's up == 0 never showed in VictoriaMetrics".into());
        }
        for p in std::iter::once(a).chain(self.anchor.as_ref()) {
            if !p.errors.is_empty() {
                out.push(format!("{}: {} errors", p.name, p.errors.len()));
            }
        }
        out
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(agents: usize, targets: usize, interval_ms: u64, duration_ms: u64) -> Load {
        Load {
            agents,
            targets,
            jobs: 1,
            samples: 12,
            interval: Duration::from_millis(interval_ms),
            duration: Duration::from_millis(duration_ms),
            batch: 416,
            flush: Duration::from_millis(250),
        }
    }

    #[test]
    fn every_agent_reports_every_target_once_per_interval() {
        let plan = plan_for(&load(4, 100, 1000, 3000));
        for agent in 0..4 {
            let mut schedule = Schedule::new(&plan, agent);
            let mut dues = Vec::new();
            // In steps, as the flush ticks take them.
            let mut now = 0.0;
            while !schedule.done() {
                now += 250.0;
                schedule.take(&plan, now, &mut dues);
            }
            let mut per_target = vec![0; 100];
            for d in &dues {
                per_target[d.target] += 1;
            }
            // Besides its slots, the failing target is reported once at the failure instant.
            per_target[FAILING] -= 1;
            // Three intervals; an agent starting late in the interval misses at most one
            // round of the targets it would have reached last.
            assert!(
                per_target.iter().all(|&n| n == 2 || n == 3),
                "{per_target:?}"
            );
            // The failure instant's extra result is the only one out of order.
            let extra = dues
                .iter()
                .filter(|d| d.target == FAILING && !d.success)
                .map(|d| d.timestamp_ms)
                .min()
                .unwrap();
            assert!(extra >= plan.start_ms + plan.fail_at.as_millis() as i64 - 250);
            for d in &dues {
                let after_failure =
                    d.timestamp_ms >= plan.start_ms + plan.fail_at.as_millis() as i64;
                if d.target != FAILING {
                    assert!(d.success);
                } else if !after_failure {
                    assert!(d.success, "{d:?} fails before the failure instant");
                }
            }
        }
    }

    #[test]
    fn agents_are_staggered_over_the_interval() {
        let plan = plan_for(&load(10, 1000, 5000, 30_000));
        let first: Vec<f64> = (0..10).map(|a| Schedule::new(&plan, a).due_ms(0)).collect();
        assert_eq!(first[0], 0.0);
        assert!(first.windows(2).all(|w| w[1] - w[0] == 500.0), "{first:?}");
    }

    #[test]
    fn shapes_are_an_http_probe_and_distinct() {
        let twelve = shapes(12);
        assert_eq!(twelve.len(), 12);
        assert_eq!(twelve[0].name, "probe_success");
        assert_eq!(
            twelve
                .iter()
                .filter(|s| s.name == "probe_http_duration_seconds")
                .count(),
            5
        );
        let many = shapes(40);
        let mut keys: Vec<(String, Vec<(String, String)>)> = many
            .iter()
            .map(|s| (s.name.clone(), s.labels.clone()))
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 40, "every series shape is distinct");
        assert_eq!(shapes(3).len(), 3);
    }

    #[test]
    fn limits_are_raised_only_when_the_load_needs_it() {
        let small = load(10, 1000, 5000, 30_000);
        let (text, raised) = aggregator_config(&small, &Targets::new(&small), "http://vm");
        assert!(raised.is_empty(), "{raised:?}");
        assert!(!text.contains("fleet:"));
        assert_eq!(text.matches("sim.example").count(), 1000);

        let big = load(3, 50_000, 60_000, 120_000);
        let (text, raised) = aggregator_config(&big, &Targets::new(&big), "http://vm");
        assert_eq!(raised, vec!["max_series 600000".to_string()]);
        assert!(
            text.contains("fleet:\n  limits:\n    max_series: 600000\n"),
            "{text}"
        );
    }

    #[test]
    fn jobs_split_the_targets() {
        let mut l = load(1, 10, 1000, 3000);
        l.jobs = 3;
        let targets = Targets::new(&l);
        let jobs = targets.jobs();
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs.iter().map(|(_, t)| t.len()).sum::<usize>(), 10);
    }
}
