//! The load every phase carries: how many agents, targets and samples, when each agent
//! probes each target, what a result holds, and when an agent sends what it has.

use crate::Args;
use anyhow::anyhow;
use clap::ValueEnum;
use std::sync::Arc;
use std::time::Duration;

/// The real agent's scheduling grid: every check's phase within its interval is a
/// multiple of it, so the probes due within one step start together (`BATCH_GRID` in
/// agent/src/schedule.rs).
pub const AGENT_GRID: Duration = Duration::from_millis(50);
/// How long the real agent's buffer writer waits after the first result of an idle
/// spell before committing what came meanwhile; each commit wakes the uplink, which
/// sends what it made visible (`LINGER` in agent/src/buffer/mod.rs).
pub const AGENT_LINGER: Duration = Duration::from_millis(100);
/// Slot → result ready: what an HTTP probe on the simulated targets takes (the
/// simulated `probe_duration_seconds` is 20–30 ms).
pub const PROBE_TIME: Duration = Duration::from_millis(25);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// The aggregator's goal shape: 1,000 agents × 1,000 targets at 60 s for 3 minutes,
    /// sent on the 250 ms flush.
    Goal,
    /// One job of 50,000 targets probed by 3 agents at 60 s for 2 minutes.
    BigJob,
    /// What a real fleet sends: 1,000 agents × 100 targets at 60 s for 2 minutes, each
    /// agent batching as the real one does (`--batching agent`).
    Real,
}

/// When a simulated agent sends what its schedule produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Batching {
    /// On a fixed ticker (`--flush`), everything due since the last tick; targets
    /// spread evenly over the interval.
    Flush,
    /// As the real agent: checks phased on its 50 ms grid by a hash of agent and
    /// target; a result is ready a probe's time after its slot; the first ready result
    /// of an idle spell opens a 100 ms window (the buffer writer's linger), and what is
    /// ready when it closes goes out at once, in batches of at most `--batch` results.
    Agent,
}

/// The load every phase carries.
#[derive(Clone, Debug)]
pub struct Load {
    pub agents: usize,
    pub targets: usize,
    pub jobs: usize,
    pub samples: usize,
    pub interval: Duration,
    pub duration: Duration,
    /// Results per batch, after the samples cap.
    pub batch: usize,
    pub batching: Batching,
    pub flush: Duration,
}

impl Load {
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        let (agents, targets, jobs, interval, duration, batching) = match args.preset {
            None => (10, 1000, 1, 5, 30, Batching::Flush),
            Some(Preset::Goal) => (1000, 1000, 1, 60, 180, Batching::Flush),
            Some(Preset::BigJob) => (3, 50_000, 1, 60, 120, Batching::Flush),
            Some(Preset::Real) => (1000, 100, 1, 60, 120, Batching::Agent),
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
            batching: args.batching.unwrap_or(batching),
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

    pub fn results_per_second(&self) -> f64 {
        (self.agents * self.targets) as f64 / self.interval.as_secs_f64()
    }

    pub fn describe(&self) -> String {
        let sent = match self.batching {
            Batching::Flush => format!("sent every {:?}", self.flush),
            Batching::Agent => format!(
                "sent as the real agent does ({:?} grid, {:?} linger)",
                AGENT_GRID, AGENT_LINGER
            ),
        };
        format!(
            "{} agents × {} targets ({} job{}) × {} samples every {:?} for {:?} per phase ({:.0} results/s, {:.0} samples/s offered), batches of ≤ {} results, {sent}",
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
        )
    }
}

// ---------------------------------------------------------------------------------------
// What the simulated agents report

/// One series shape of a probe result: metric name and its own labels.
#[derive(Clone, Debug)]
pub struct Shape {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// The samples of an HTTP probe, as blackbox_exporter (and sonde's agent) name them;
/// past the 12 of a plain HTTP probe, those of an HTTPS probe, then numbered extras.
pub fn shapes(n: usize) -> Vec<Shape> {
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
pub fn value(shape: &Shape, success: bool, i: u64) -> f64 {
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

pub fn probe_duration(i: u64) -> f64 {
    0.020 + 0.010 * ((i.wrapping_mul(2_654_435_761) >> 7) % 1000) as f64 / 1000.0
}

/// The targets, split into jobs; the simulator knows them because it wrote the config.
pub struct Targets {
    /// (job, instance) of every target, in the order the schedule walks them.
    pub all: Vec<(Arc<str>, Arc<str>)>,
}

impl Targets {
    /// The jobs are named `<prefix>_<n>`: each phase writing `up` under its own jobs, a
    /// phase never finds the previous one's `up == 0` in a shared receiver.
    pub fn new(load: &Load, prefix: &str) -> Self {
        let per_job = load.targets.div_ceil(load.jobs);
        let all = (0..load.targets)
            .map(|k| {
                let job = format!("{prefix}_{}", k / per_job);
                let instance = format!("https://t{k:05}.sim.example/health");
                (Arc::from(job), Arc::from(instance))
            })
            .collect();
        Self { all }
    }

    pub fn jobs(&self) -> Vec<(&str, Vec<&str>)> {
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
pub struct Due {
    /// Index into [`Targets::all`].
    pub target: usize,
    pub timestamp_ms: i64,
    pub success: bool,
    /// Running number of the agent's results (varies the values).
    pub i: u64,
}

/// What every agent shares in a phase: the load, the targets, when the phase started
/// and when the failing target starts failing.
pub struct Plan {
    pub load: Load,
    pub targets: Targets,
    pub shapes: Vec<Shape>,
    pub start: tokio::time::Instant,
    pub start_ms: i64,
    /// Offset from `start` at which target 0 fails for every agent.
    pub fail_at: Duration,
}

/// The failing target: the first one of the first job.
pub const FAILING: usize = 0;

/// A phase's plan; its start is set again once every agent has connected.
pub fn plan_for(load: &Load, job_prefix: &str) -> Plan {
    let flush = load.flush.as_secs_f64();
    // On a flush tick, so that every agent reports the failure at the same instant.
    let half = (load.duration.as_secs_f64() / 2.0 / flush).round() * flush;
    Plan {
        load: load.clone(),
        targets: Targets::new(load, job_prefix),
        shapes: shapes(load.samples),
        start: tokio::time::Instant::now(),
        start_ms: crate::now_ms(),
        fail_at: Duration::from_secs_f64(half),
    }
}

/// A stable, well-mixed hash of (agent, target): the real agent phases its checks by a
/// hash of agent, job and target.
fn mix(agent: usize, target: usize) -> u64 {
    let mut z = ((agent as u64) << 32 ^ target as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Walks one agent's probe schedule: every target once per interval, at a phase of its
/// own, the agents staggered against each other (as real agents, started at different
/// times, are).
pub struct Schedule {
    /// (phase since the phase start in ms, target), by phase; all within one interval.
    slots: Vec<(f64, usize)>,
    interval_ms: f64,
    pub next: u64,
    end_ms: f64,
    fail_at_ms: f64,
    pub fail_reported: bool,
}

impl Schedule {
    pub fn new(plan: &Plan, agent: usize) -> Self {
        let load = &plan.load;
        let interval_ms = load.interval.as_secs_f64() * 1000.0;
        let slots = match load.batching {
            // Evenly over the interval, target by target, each agent starting a fraction
            // of the interval after the previous one.
            Batching::Flush => {
                let offset_ms = interval_ms * agent as f64 / load.agents as f64;
                let step_ms = interval_ms / load.targets as f64;
                (0..load.targets)
                    .map(|k| (offset_ms + k as f64 * step_ms, k))
                    .collect()
            }
            // On the agent's own 50 ms grid, which starts where the agent started.
            Batching::Agent => {
                let grid_ms = AGENT_GRID.as_secs_f64() * 1000.0;
                let steps = (interval_ms / grid_ms).floor().max(1.0) as u64;
                let epoch_ms = (mix(agent, usize::MAX) % 1000) as f64 / 1000.0 * grid_ms;
                let mut slots: Vec<(f64, usize)> = (0..load.targets)
                    .map(|k| (epoch_ms + (mix(agent, k) % steps) as f64 * grid_ms, k))
                    .collect();
                slots.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                slots
            }
        };
        Self {
            slots,
            interval_ms,
            next: 0,
            end_ms: load.duration.as_secs_f64() * 1000.0,
            fail_at_ms: plan.fail_at.as_secs_f64() * 1000.0,
            fail_reported: false,
        }
    }

    /// When (ms since the phase start) the `i`-th probe of this agent is due, and its
    /// target.
    fn slot(&self, i: u64) -> (f64, usize) {
        let n = self.slots.len() as u64;
        let (phase, target) = self.slots[(i % n) as usize];
        ((i / n) as f64 * self.interval_ms + phase, target)
    }

    pub fn due_ms(&self, i: u64) -> f64 {
        self.slot(i).0
    }

    pub fn done(&self) -> bool {
        self.due_ms(self.next) >= self.end_ms
    }

    /// With `--batching agent`: when (ms since the phase start) the agent next sends,
    /// the linger after the next result becomes ready (or after the failure instant,
    /// when the failing target's failed probe comes first).
    pub fn next_send_ms(&self) -> f64 {
        let probe_ms = PROBE_TIME.as_secs_f64() * 1000.0;
        let mut ready = self.due_ms(self.next) + probe_ms;
        if !self.fail_reported {
            ready = ready.min(self.fail_at_ms + probe_ms);
        }
        ready + AGENT_LINGER.as_secs_f64() * 1000.0
    }

    /// Appends what is due by `now_ms` (since the phase start) to `out`. At the failure
    /// instant, the agent also reports the failing target at once, as a probe that has
    /// just failed would.
    pub fn take(&mut self, plan: &Plan, now_ms: f64, out: &mut Vec<Due>) {
        while !self.done() && self.due_ms(self.next) <= now_ms {
            let (due, target) = self.slot(self.next);
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

    /// The results the agent sends at `now_ms`: with `--batching flush`, what is due by
    /// then; with `--batching agent`, what is ready (a probe's time after its slot).
    pub fn take_ready(&mut self, plan: &Plan, now_ms: f64, out: &mut Vec<Due>) {
        match plan.load.batching {
            Batching::Flush => self.take(plan, now_ms, out),
            Batching::Agent => self.take(plan, now_ms - PROBE_TIME.as_secs_f64() * 1000.0, out),
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn load(agents: usize, targets: usize, interval_ms: u64, duration_ms: u64) -> Load {
        Load {
            agents,
            targets,
            jobs: 1,
            samples: 12,
            interval: Duration::from_millis(interval_ms),
            duration: Duration::from_millis(duration_ms),
            batch: 416,
            batching: Batching::Flush,
            flush: Duration::from_millis(250),
        }
    }

    fn every_target_once_per_interval(l: &Load) {
        let plan = plan_for(l, "sim_http");
        for agent in 0..l.agents {
            let mut schedule = Schedule::new(&plan, agent);
            let mut dues = Vec::new();
            // In steps, as the flush ticks take them.
            let mut now = 0.0;
            while !schedule.done() {
                now += 250.0;
                schedule.take(&plan, now, &mut dues);
            }
            let mut per_target = vec![0; l.targets];
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
    fn every_agent_reports_every_target_once_per_interval() {
        every_target_once_per_interval(&load(4, 100, 1000, 3000));
        let mut like_agents = load(4, 100, 1000, 3000);
        like_agents.batching = Batching::Agent;
        every_target_once_per_interval(&like_agents);
    }

    #[test]
    fn agents_are_staggered_over_the_interval() {
        let plan = plan_for(&load(10, 1000, 5000, 30_000), "sim_http");
        let first: Vec<f64> = (0..10).map(|a| Schedule::new(&plan, a).due_ms(0)).collect();
        assert_eq!(first[0], 0.0);
        assert!(first.windows(2).all(|w| w[1] - w[0] == 500.0), "{first:?}");
    }

    /// Sizes of the batches one agent sends over the phase, as `drive` sends them with
    /// `--batching agent`.
    fn agent_batches(plan: &Plan, agent: usize) -> Vec<usize> {
        let mut schedule = Schedule::new(plan, agent);
        let mut sizes = Vec::new();
        let mut dues = Vec::new();
        while !schedule.done() {
            let at = schedule.next_send_ms();
            schedule.take_ready(plan, at, &mut dues);
            for chunk in dues.chunks(plan.load.batch) {
                sizes.push(chunk.len());
            }
            dues.clear();
        }
        sizes
    }

    #[test]
    fn the_real_preset_sends_about_one_result_per_batch_at_60s() {
        // 100 checks every 60 s on a 50 ms grid: 1,200 steps, a result every 600 ms on
        // average, so a 100 ms linger rarely finds a second one.
        let mut real = load(50, 100, 60_000, 120_000);
        real.batching = Batching::Agent;
        let plan = plan_for(&real, "sim_http");
        let (mut batches, mut results, mut single) = (0, 0, 0);
        for agent in 0..real.agents {
            let sizes = agent_batches(&plan, agent);
            batches += sizes.len();
            results += sizes.iter().sum::<usize>();
            single += sizes.iter().filter(|&&n| n == 1).count();
            // Two intervals, and the failing target's failed probe.
            assert!(
                (200..=202).contains(&sizes.iter().sum::<usize>()),
                "{sizes:?}"
            );
        }
        let per_batch = results as f64 / batches as f64;
        assert!((1.0..1.4).contains(&per_batch), "{per_batch}");
        assert!(single * 10 >= batches * 7, "{single} of {batches}");

        // 1,000 checks every 60 s: a few results per batch, as the real agent sends them.
        let mut full = load(10, 1000, 60_000, 120_000);
        full.batching = Batching::Agent;
        let plan = plan_for(&full, "sim_http");
        let sizes = agent_batches(&plan, 3);
        let per_batch = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        assert!((1.5..4.0).contains(&per_batch), "{per_batch}");

        // The default load on its 250 ms ticker: 10 agents × 1,000 targets at 5 s is 50
        // results a tick.
        let default = load(10, 1000, 5000, 30_000);
        let plan = plan_for(&default, "sim_http");
        let mut schedule = Schedule::new(&plan, 0);
        let mut dues = Vec::new();
        schedule.take_ready(&plan, 1000.0, &mut dues);
        assert_eq!(dues.len(), 201, "{} results due by 1 s", dues.len());
    }

    #[test]
    fn the_real_preset_is_1000_agents_by_100_targets_at_60s_as_agents_batch() {
        use clap::Parser;
        let args = Args::parse_from(["fleet-sim", "--preset", "real"]);
        let l = Load::from_args(&args).unwrap();
        assert_eq!((l.agents, l.targets, l.samples), (1000, 100, 12));
        assert_eq!(l.interval, Duration::from_secs(60));
        assert_eq!(l.batching, Batching::Agent);
        let args = Args::parse_from(["fleet-sim", "--preset", "real", "--targets", "1000"]);
        assert_eq!(Load::from_args(&args).unwrap().targets, 1000);
        let args = Args::parse_from(["fleet-sim"]);
        let l = Load::from_args(&args).unwrap();
        assert_eq!(
            (l.agents, l.targets, l.batching),
            (10, 1000, Batching::Flush)
        );
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
    fn jobs_split_the_targets() {
        let mut l = load(1, 10, 1000, 3000);
        l.jobs = 3;
        let targets = Targets::new(&l, "sim_http");
        let jobs = targets.jobs();
        assert_eq!(jobs.len(), 3);
        assert_eq!(jobs.iter().map(|(_, t)| t.len()).sum::<usize>(), 10);
    }
}
