//! The hub's per-result work at a real fleet's shape: 1,000 agents each probing the same
//! 100 targets every 60 s with a plain HTTP probe's 12 samples, every result in a batch
//! of its own (what an agent at that interval sends), the once-a-second tick between,
//! and a group commit's worth of changes dropped every 64 results. No I/O, one thread:
//! what this measures is [`State::results`] and [`State::tick`], nothing around them.
//! One target starts failing in the second interval, so every agent's verdict changes
//! on it once.
//!
//! Run: `cargo bench -p sonde-hub --bench results` (`-- --agents N --targets N
//! --rounds N` to change the shape). Prints ns per result for the first interval (every
//! view new) and for the following ones (every view replaced), wall and thread CPU.

use sonde_hub::HubCounters;
use sonde_hub::config::HubConfig;
use sonde_hub::limits::FleetLimits;
use sonde_hub::model::{IncomingResult, ResultSamples, Shape, Symbol};
use sonde_hub::refusals::Refusals;
use sonde_hub::state::{Changes, State};
use sonde_hub::targets::{Target, TargetSet};
use sonde_proto::config::{JobConfig, Labels, Module, Quorum, ResolvedJob, from_yaml_str};
use sonde_proto::pb;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const T0: i64 = 1_700_000_000_000;
const INTERVAL_MS: i64 = 60_000;
const COMMIT_EVERY: usize = 64;

const SAMPLES: [(&str, Option<(&str, &str)>); 12] = [
    ("probe_success", None),
    ("probe_duration_seconds", None),
    ("probe_http_status_code", None),
    ("probe_http_duration_seconds", Some(("phase", "resolve"))),
    ("probe_http_duration_seconds", Some(("phase", "connect"))),
    ("probe_http_duration_seconds", Some(("phase", "tls"))),
    ("probe_http_duration_seconds", Some(("phase", "processing"))),
    ("probe_http_duration_seconds", Some(("phase", "transfer"))),
    ("probe_ip_protocol", None),
    ("probe_http_version", None),
    ("probe_http_content_length", None),
    ("probe_http_redirects", None),
];

/// User + system CPU of the calling thread, from /proc/thread-self/stat.
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn config(targets: usize) -> (Arc<HubConfig>, TargetSet) {
    let file = Path::new("bench.yml");
    let module: Module = from_yaml_str(file, "prober: http\n").expect("module");
    let job: JobConfig =
        from_yaml_str(file, "job_name: web\nmodule: http_2xx\n").expect("job config");
    let interval = Duration::from_millis(INTERVAL_MS as u64);
    let timeout = Duration::from_secs(5);
    let resolved = ResolvedJob {
        name: "web".into(),
        module_name: "http_2xx".into(),
        module,
        interval,
        timeout,
        quorum: Quorum::AtLeast(1),
        retries: 0,
        freshness: interval * 2 + timeout,
        config: job,
    };
    let set: TargetSet = (0..targets)
        .map(|i| {
            let instance = format!("https://site-{i}.example.com/health");
            let target = Target {
                job: "web".into(),
                instance: instance.clone(),
                probe_target: None,
                labels: Labels::from([("team".to_string(), "web".to_string())]),
            };
            (("web".to_string(), instance), Arc::new(target))
        })
        .collect();
    let config = HubConfig {
        scrape_interval: Duration::from_secs(15),
        external_labels: Labels::new(),
        jobs: vec![resolved],
        tokens: HashMap::new(),
        auth_required: false,
        missing_after: Duration::from_secs(30),
        forget_after: Duration::from_secs(3600),
        max_clock_skew: Duration::from_secs(60),
        limits: FleetLimits {
            max_agents: 100_000,
            ..FleetLimits::default()
        },
        shared_local_jobs: BTreeSet::new(),
    };
    (Arc::new(config), set)
}

/// The shape one agent's stream interns for every result it sends.
fn shape() -> Arc<Shape> {
    let sym = |s: &str| -> Symbol { Arc::from(s) };
    let mut samples = ResultSamples::default();
    for (name, label) in SAMPLES {
        let labels = label.map_or_else(Vec::new, |(k, v)| vec![(sym(k), sym(v))]);
        samples.push((sym(name), labels, 0.0));
    }
    samples.shape
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let agents = arg("--agents", 1000);
    let targets = arg("--targets", 100);
    let rounds = arg("--rounds", 4).max(2);
    let (config, set) = config(targets);
    let instances: Vec<String> = set.keys().map(|(_, i)| i.clone()).collect();
    let mut state = State::new(config, set, T0);
    let (counters, refusals) = (HubCounters::default(), Refusals::default());
    let ids: Vec<String> = (0..agents).map(|a| format!("agent-{a:04}")).collect();
    let shapes: Vec<Arc<Shape>> = (0..agents).map(|_| shape()).collect();
    let mut ch = Changes::default();
    for id in &ids {
        let hello = pb::Hello {
            protocol_version: sonde_proto::PROTOCOL_VERSION,
            agent_id: id.clone(),
            ..Default::default()
        };
        state
            .connect(&hello, Labels::new(), None, T0, &mut ch)
            .expect("connect");
    }
    let per_round = agents * targets;
    let mut seq = vec![0u64; agents];
    let mut next_tick = T0 + 1_000;
    let mut pending = 0;
    let mut samples_out = 0usize;
    let mut first = (0.0, 0.0);
    let mut rest = (0.0, 0.0);
    // Wall time in (tick, results, dropping a group's changes), first interval and later.
    let mut split = [(0.0, 0.0, 0.0); 2];
    for round in 0..rounds {
        let (wall, cpu) = (Instant::now(), thread_cpu_seconds());
        let start = T0 + round as i64 * INTERVAL_MS;
        for i in 0..per_round {
            // Spread over the interval as the agents' schedules spread their probes.
            let now = start + (i as i64 * INTERVAL_MS) / per_round as i64;
            while next_tick <= now {
                let at = Instant::now();
                state.tick(next_tick, &mut ch);
                split[usize::from(round > 0)].0 += at.elapsed().as_secs_f64();
                next_tick += 1_000;
            }
            let agent = i % agents;
            let target = (i / agents + agent) % targets;
            let success = !(target == 0 && round >= 1);
            seq[agent] += 1;
            let result = IncomingResult {
                seq: seq[agent],
                job: "web".into(),
                instance: instances[target].clone(),
                timestamp_ms: now - 20,
                success,
                duration_seconds: 0.05,
                failure: if success {
                    String::new()
                } else {
                    "connection refused".into()
                },
                trace: None,
                samples: ResultSamples {
                    shape: shapes[agent].clone(),
                    values: (0..SAMPLES.len()).map(|s| s as f64 + 0.5).collect(),
                },
                refused: None,
            };
            let at = Instant::now();
            state.results(
                &ids[agent],
                std::slice::from_ref(&result),
                now,
                &mut ch,
                &counters,
                &refusals,
            );
            split[usize::from(round > 0)].1 += at.elapsed().as_secs_f64();
            pending += 1;
            if pending == COMMIT_EVERY {
                samples_out += ch.out.len();
                let at = Instant::now();
                ch = Changes::default();
                split[usize::from(round > 0)].2 += at.elapsed().as_secs_f64();
                pending = 0;
            }
        }
        let took = (wall.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu);
        if round == 0 {
            first = took;
        } else {
            rest = (rest.0 + took.0, rest.1 + took.1);
        }
    }
    let refused = refusals.counts();
    assert!(
        refused.is_empty(),
        "the bench's results were refused: {refused:?}"
    );
    let ns = |s: f64, n: usize| s * 1e9 / n as f64;
    let later = per_round * (rounds - 1);
    println!(
        "{agents} agents x {targets} targets, one result per batch, {rounds} intervals, {} samples written",
        samples_out + ch.out.len()
    );
    println!(
        "first interval (new views): {:.0} ns/result wall, {:.0} ns/result thread CPU",
        ns(first.0, per_round),
        ns(first.1, per_round)
    );
    println!(
        "later intervals (views replaced): {:.0} ns/result wall, {:.0} ns/result thread CPU",
        ns(rest.0, later),
        ns(rest.1, later)
    );
    for (name, (tick, results, drop), n) in [
        ("first interval", split[0], per_round),
        ("later intervals", split[1], later),
    ] {
        println!(
            "  {name}, wall ns/result in: State::results {:.0}, State::tick {:.0}, dropping the changes {:.0}",
            ns(results, n),
            ns(tick, n),
            ns(drop, n)
        );
    }
}
