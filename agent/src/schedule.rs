//! Runs every check on its interval, each probe bounded by its timeout.
//!
//! Each check is one task. Checks are spread over their interval by a stable hash of
//! agent, job and target, so that a thousand checks on a 15 s interval do not all fire
//! in the same millisecond (and so each agent probes a target at its own phase).
//!
//! A check that several aggregators assign (an HA pair sends the same assignment twice)
//! is run once: one task, one probe per interval, and that one result (same sequence
//! number, timestamp and samples) goes to every aggregator that assigned it. Running it
//! once per aggregator would double the load on the agent and on the target, and the two
//! aggregators would write different samples for the same series, which no receiver's
//! deduplication can merge. Checks are the same when job, instance, the module's content,
//! interval, timeout and retries are; a local job is never merged with an assigned check
//! (its results go to every aggregator already, under the agent's own config).

use crate::outbox::Outbox;
use crate::probe::{self, ProbeContext};
use sonde_proto::config::Module;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
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

/// The sources a running check's results go to, each with the generation of the
/// assignment it came from (0 for a local job). Swapped whole when sources come and go,
/// so the task reads a consistent set for each result.
pub type Destinations = Arc<[(Source, u64)]>;

/// One running check and the sources that want it.
struct Task {
    /// Each source's own spec of the check: all run the same probe (see [`same_probe`]),
    /// but the module's name and the generation are the source's.
    members: BTreeMap<Source, CheckSpec>,
    /// Read by the task at each result.
    destinations: Arc<Mutex<Destinations>>,
    handle: JoinHandle<()>,
    /// Tells tasks apart in tests: a task that keeps its id kept its schedule.
    #[cfg_attr(not(test), allow(dead_code))]
    id: u64,
}

impl Task {
    fn is_local(&self) -> bool {
        self.members.contains_key(&Source::Local)
    }

    /// Whether `spec` from `source` is this very check, so it can join it.
    fn takes(&self, source: Source, spec: &CheckSpec) -> bool {
        self.is_local() == (source == Source::Local)
            && self
                .members
                .values()
                .next()
                .is_some_and(|m| same_probe(m, spec))
    }

    fn refresh_destinations(&self) {
        let to: Destinations = self
            .members
            .iter()
            .map(|(source, spec)| (*source, spec.generation))
            .collect();
        *lock(&self.destinations) = to;
    }
}

pub struct Scheduler {
    agent_id: String,
    ctx: Arc<ProbeContext>,
    outbox: Arc<Outbox>,
    /// The running checks by (job, instance); more than one only when sources disagree
    /// on the probe (module, interval, timeout, retries), or a local job has the same
    /// job and instance as an assigned check.
    running: Mutex<Running>,
}

#[derive(Default)]
struct Running {
    tasks: HashMap<(String, String), Vec<Task>>,
    next_id: u64,
}

impl Scheduler {
    pub fn new(agent_id: String, ctx: Arc<ProbeContext>, outbox: Arc<Outbox>) -> Self {
        Self {
            agent_id,
            ctx,
            outbox,
            running: Mutex::new(Running::default()),
        }
    }

    /// Replaces every check of `source` with `checks`: new ones start (or join the same
    /// check another source already runs), removed ones stop (unless another source
    /// still wants them), changed ones restart, and unchanged ones keep their phase.
    /// A check's schedule never restarts because another source added or removed it.
    pub fn set_checks(&self, source: Source, checks: Vec<CheckSpec>) {
        let mut running = lock(&self.running);
        let mut wanted: HashMap<(String, String), CheckSpec> = checks
            .into_iter()
            .map(|c| ((c.job.clone(), c.instance.clone()), c))
            .collect();
        // Leave the checks `source` no longer wants as they are; refresh the others.
        for (key, tasks) in running.tasks.iter_mut() {
            for task in tasks.iter_mut() {
                let Some(old) = task.members.get(&source) else {
                    continue;
                };
                match wanted.get(key) {
                    Some(new) if same_probe(new, old) => {
                        let new = wanted.remove(key).unwrap_or_else(|| old.clone());
                        task.members.insert(source, new);
                    }
                    _ => {
                        task.members.remove(&source);
                    }
                }
                task.refresh_destinations();
            }
            tasks.retain(|task| {
                let keep = !task.members.is_empty();
                if !keep {
                    task.handle.abort();
                }
                keep
            });
        }
        running.tasks.retain(|_, tasks| !tasks.is_empty());
        // Join the same check run for another source, or start it.
        for (key, spec) in wanted {
            let id = running.next_id;
            let tasks = running.tasks.entry(key).or_default();
            if let Some(task) = tasks.iter_mut().find(|t| t.takes(source, &spec)) {
                task.members.insert(source, spec);
                task.refresh_destinations();
                continue;
            }
            let destinations: Destinations = Arc::from([(source, spec.generation)]);
            let destinations = Arc::new(Mutex::new(destinations));
            let handle = tokio::spawn(run_check(
                self.ctx.clone(),
                self.outbox.clone(),
                destinations.clone(),
                spec.clone(),
                spread(&self.agent_id, &spec),
            ));
            tasks.push(Task {
                members: BTreeMap::from([(source, spec)]),
                destinations,
                handle,
                id,
            });
            running.next_id += 1;
        }
    }

    /// Checks being run: a check several sources share counts once.
    pub fn check_count(&self) -> usize {
        lock(&self.running).tasks.values().map(Vec::len).sum()
    }

    /// The checks each source wants, sorted, for the status page and API.
    pub fn checks(&self) -> Vec<(Source, CheckSpec)> {
        let running = lock(&self.running);
        let mut v: Vec<_> = running
            .tasks
            .values()
            .flatten()
            .flat_map(|t| t.members.iter().map(|(s, c)| (*s, c.clone())))
            .collect();
        v.sort_by(|a, b| (a.0, &a.1.job, &a.1.instance).cmp(&(b.0, &b.1.job, &b.1.instance)));
        v
    }

    /// Stops every check; a probe in flight is abandoned, not recorded.
    pub fn stop(&self) {
        let mut running = lock(&self.running);
        for (_, tasks) in running.tasks.drain() {
            for task in tasks {
                task.handle.abort();
            }
        }
    }

    /// The running tasks' ids with their sources, sorted by id.
    #[cfg(test)]
    fn tasks(&self) -> Vec<(u64, Vec<Source>)> {
        let running = lock(&self.running);
        let mut v: Vec<_> = running
            .tasks
            .values()
            .flatten()
            .map(|t| (t.id, t.members.keys().copied().collect()))
            .collect();
        v.sort();
        v
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether two specs run the same probe. The module's name is not part of it: two
/// aggregators may name the same module differently, and the results do not carry it.
fn same_probe(a: &CheckSpec, b: &CheckSpec) -> bool {
    a.job == b.job
        && a.instance == b.instance
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
    destinations: Arc<Mutex<Destinations>>,
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
        // Whoever wants the check when the probe ends gets its result.
        let to = lock(&destinations).clone();
        outbox.record(&to, &spec.job, &spec.instance, unix_ms(started_at), outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::AgentMetrics;
    use crate::store::Store;

    const A: Source = Source::Aggregator(0);
    const B: Source = Source::Aggregator(1);

    fn scheduler(store: Arc<Store>) -> Scheduler {
        let outbox = Arc::new(Outbox::new(store, Arc::new(AgentMetrics::default())));
        let ctx = Arc::new(ProbeContext::from_system().unwrap());
        Scheduler::new("edge-1".into(), ctx, outbox)
    }

    fn two_aggregators() -> Arc<Store> {
        Store::open(None, &["http://a:1".into(), "http://b:1".into()], 1 << 20).unwrap()
    }

    fn module(json: &str) -> Arc<Module> {
        Arc::new(serde_json::from_str(json).unwrap())
    }

    fn check(instance: &str, interval_ms: u64, generation: u64) -> CheckSpec {
        CheckSpec {
            job: "web".into(),
            instance: instance.into(),
            module_name: "tcp".into(),
            module: module(r#"{"prober":"tcp"}"#),
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(500),
            retries: 0,
            generation,
        }
    }

    #[tokio::test]
    async fn the_same_check_from_two_aggregators_is_one_task() {
        let s = scheduler(two_aggregators());
        s.set_checks(A, vec![check("127.0.0.1:9", 3_600_000, 1)]);
        // B names the module differently; its content is what counts.
        let mut renamed = check("127.0.0.1:9", 3_600_000, 5);
        renamed.module_name = "tcp_connect".into();
        s.set_checks(B, vec![renamed]);
        assert_eq!(s.check_count(), 1);
        assert_eq!(s.tasks(), [(0, vec![A, B])]);
        let listed: Vec<_> = s
            .checks()
            .into_iter()
            .map(|(src, c)| (src, c.module_name, c.generation))
            .collect();
        assert_eq!(
            listed,
            [(A, "tcp".to_string(), 1), (B, "tcp_connect".to_string(), 5)]
        );
    }

    #[tokio::test]
    async fn checks_that_differ_in_any_setting_are_run_apart() {
        let s = scheduler(two_aggregators());
        let base = check("127.0.0.1:9", 3_600_000, 1);
        let variants = [
            CheckSpec {
                interval: Duration::from_secs(1800),
                ..base.clone()
            },
            CheckSpec {
                timeout: Duration::from_secs(1),
                ..base.clone()
            },
            CheckSpec {
                retries: 2,
                ..base.clone()
            },
            CheckSpec {
                module: module(r#"{"prober":"tcp","tcp":{"preferred_ip_protocol":"ip4"}}"#),
                ..base.clone()
            },
        ];
        for variant in variants {
            s.set_checks(A, vec![base.clone()]);
            s.set_checks(B, vec![variant.clone()]);
            assert_eq!(s.check_count(), 2, "{variant:?}");
        }
        // A local job is its own check even when it is the same probe.
        s.set_checks(B, vec![base.clone()]);
        assert_eq!(s.check_count(), 1);
        s.set_checks(Source::Local, vec![base]);
        assert_eq!(s.check_count(), 2);
    }

    #[tokio::test]
    async fn a_source_leaving_or_changing_keeps_the_others_schedule() {
        let s = scheduler(two_aggregators());
        s.set_checks(A, vec![check("127.0.0.1:9", 3_600_000, 1)]);
        s.set_checks(B, vec![check("127.0.0.1:9", 3_600_000, 1)]);
        assert_eq!(s.tasks(), [(0, vec![A, B])]);
        // A drops it: the task B still wants runs on, not restarted.
        s.set_checks(A, Vec::new());
        assert_eq!(s.tasks(), [(0, vec![B])]);
        // A adds it again: it joins the running task.
        s.set_checks(A, vec![check("127.0.0.1:9", 3_600_000, 2)]);
        assert_eq!(s.tasks(), [(0, vec![A, B])]);
        // A changes the interval: a check of its own; B's goes on.
        s.set_checks(A, vec![check("127.0.0.1:9", 1_800_000, 3)]);
        assert_eq!(s.tasks(), [(0, vec![B]), (1, vec![A])]);
        // B moves to A's interval: B's old check stops, B joins A's.
        s.set_checks(B, vec![check("127.0.0.1:9", 1_800_000, 3)]);
        assert_eq!(s.tasks(), [(1, vec![A, B])]);
        s.set_checks(A, Vec::new());
        s.set_checks(B, Vec::new());
        assert_eq!(s.check_count(), 0);
    }

    /// Real probes to a listening port: one run, one result, to whoever wants it.
    #[tokio::test]
    async fn one_probe_one_result_for_each_aggregator_that_wants_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        });
        let store = two_aggregators();
        let metrics = Arc::new(AgentMetrics::default());
        let outbox = Arc::new(Outbox::new(store.clone(), metrics.clone()));
        let ctx = Arc::new(ProbeContext::from_system().unwrap());
        let s = Scheduler::new("edge-1".into(), ctx, outbox.clone());
        let buffer = |i: usize| outbox.buffers[i].1.clone();
        let results = |i: usize| {
            buffer(i)
                .pending_after(0, 1000)
                .iter()
                .map(|r| (r.seq, r.timestamp_ms, r.generation, r.success))
                .collect::<Vec<_>>()
        };
        let wait_for = |i: usize, n: usize| {
            let store = store.clone();
            let b = buffer(i);
            async move {
                for _ in 0..200 {
                    let s = store.clone();
                    tokio::task::spawn_blocking(move || s.flush())
                        .await
                        .unwrap();
                    if b.stats().results >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("fewer than {n} results for aggregator {i}");
            }
        };
        s.set_checks(A, vec![check(&target, 100, 7)]);
        s.set_checks(B, vec![check(&target, 100, 2)]);
        wait_for(1, 3).await;
        s.set_checks(A, Vec::new());
        let shared = results(0).len();
        wait_for(1, shared + 3).await;
        s.stop();
        let s2 = store.clone();
        tokio::task::spawn_blocking(move || s2.flush())
            .await
            .unwrap();
        let (a, b) = (results(0), results(1));
        assert!(a.len() >= 3, "{a:?}");
        // What A got, B got too: the same results, each with its own generation.
        for (ra, rb) in a.iter().zip(&b) {
            assert_eq!((ra.0, ra.1, ra.3), (rb.0, rb.1, rb.3));
            assert_eq!((ra.2, rb.2), (7, 2));
        }
        assert!(b.len() > a.len(), "after A left, only B gets results");
        assert!(b.iter().all(|r| r.3), "{b:?}");
        // One probe per result, counted once.
        let probes: u64 = store.probe_counts().iter().map(|(_, (t, _))| t).sum();
        assert_eq!(probes as usize, b.len());
    }
}
