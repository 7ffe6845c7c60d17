//! Runs every check on its interval, each probe bounded by its timeout.
//!
//! Each check is one task. Checks are spread over their interval by a stable hash of
//! agent, job and target, so that a thousand checks on a 15 s interval do not all fire
//! in the same millisecond (and so each agent probes a target at its own phase).

use crate::outbox::Outbox;
use crate::probe::{self, ProbeContext};
use sonde_proto::config::Module;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// Where a check comes from, which is also where its results go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The agent's own config.
    Local,
    /// The assignment of the aggregator at this index of the config.
    Aggregator(usize),
}

/// One check to run.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckSpec {
    pub job: String,
    pub instance: String,
    pub module_name: String,
    pub module: Arc<Module>,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub generation: u64,
}

type CheckKey = (Source, String, String);

pub struct Scheduler {
    agent_id: String,
    ctx: Arc<ProbeContext>,
    outbox: Arc<Outbox>,
    running: Mutex<HashMap<CheckKey, (CheckSpec, JoinHandle<()>)>>,
}

impl Scheduler {
    pub fn new(agent_id: String, ctx: Arc<ProbeContext>, outbox: Arc<Outbox>) -> Self {
        Self {
            agent_id,
            ctx,
            outbox,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Replaces every check of `source` with `checks`: new ones start, removed ones
    /// stop, changed ones restart, unchanged ones keep their phase.
    pub fn set_checks(&self, source: Source, checks: Vec<CheckSpec>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: HashMap<CheckKey, CheckSpec> = checks
            .into_iter()
            .map(|c| ((source, c.job.clone(), c.instance.clone()), c))
            .collect();
        running.retain(|key, (spec, handle)| {
            if key.0 != source {
                return true;
            }
            let keep = wanted.get(key).is_some_and(|w| same_probe(w, spec));
            if !keep {
                handle.abort();
            }
            keep
        });
        for (key, spec) in wanted {
            match running.get_mut(&key) {
                // Same probe, new generation: results of the running task keep the old
                // generation number until it restarts, which is harmless; refresh it.
                Some((old, _)) => old.generation = spec.generation,
                None => {
                    let handle = tokio::spawn(run_check(
                        self.ctx.clone(),
                        self.outbox.clone(),
                        source,
                        spec.clone(),
                        spread(&self.agent_id, &spec),
                    ));
                    running.insert(key, (spec, handle));
                }
            }
        }
    }

    pub fn check_count(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The checks being run, sorted, for the status page and API.
    pub fn checks(&self) -> Vec<(Source, CheckSpec)> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = running.iter().map(|(k, (s, _))| (k.0, s.clone())).collect();
        v.sort_by(|a, b| (a.0, &a.1.job, &a.1.instance).cmp(&(b.0, &b.1.job, &b.1.instance)));
        v
    }

    /// Stops every check; a probe in flight is abandoned, not recorded.
    pub fn stop(&self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (_, handle)) in running.drain() {
            handle.abort();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn same_probe(a: &CheckSpec, b: &CheckSpec) -> bool {
    a.module_name == b.module_name
        && a.module == b.module
        && a.interval == b.interval
        && a.timeout == b.timeout
        && a.retries == b.retries
}

/// The check's phase within its interval: stable for an agent, job and target.
fn spread(agent_id: &str, spec: &CheckSpec) -> Duration {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (agent_id, &spec.job, &spec.instance).hash(&mut h);
    let interval_ms = spec.interval.as_millis().max(1) as u64;
    Duration::from_millis(h.finish() % interval_ms)
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn run_check(
    ctx: Arc<ProbeContext>,
    outbox: Arc<Outbox>,
    source: Source,
    spec: CheckSpec,
    phase: Duration,
) {
    let start = tokio::time::Instant::now() + phase;
    let mut ticker = tokio::time::interval_at(start, spec.interval);
    // A probe that overran its slot is not made up for with a burst.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let tick = ticker.tick().await;
        let started_at = SystemTime::now();
        let mut outcome = probe::run(&ctx, &spec.instance, &spec.module, spec.timeout).await;
        let mut retries_used = 0;
        while !outcome.success && retries_used < spec.retries {
            // Retry only while a whole attempt still fits before the next tick.
            let backoff = Duration::from_millis(100 * (1 << retries_used.min(4)));
            if tick.elapsed() + backoff + spec.timeout > spec.interval {
                break;
            }
            tokio::time::sleep(backoff).await;
            retries_used += 1;
            outcome = probe::run(&ctx, &spec.instance, &spec.module, spec.timeout).await;
        }
        if spec.retries > 0 {
            outcome.samples.push(probe::Sample {
                name: "probe_retries",
                labels: Vec::new(),
                value: f64::from(retries_used),
            });
        }
        outbox.record(
            source,
            &spec.job,
            &spec.instance,
            spec.generation,
            unix_ms(started_at),
            outcome,
        );
    }
}
