//! Runs every check on its interval, each probe bounded by its timeout.
//!
//! Each check is one task. Checks are spread over their interval by a stable hash of
//! agent, job and target, so that a thousand checks on a 15 s interval do not all fire
//! in the same millisecond (and so each agent probes a target at its own phase). The
//! phases fall on a grid of 50 ms (`BATCH_GRID`) shared by every check of the agent,
//! so that the probes due within one step start together: run back to back, the probes
//! after the first find the code and data of a probe in the CPU's caches, where one
//! probe alone every few hundred microseconds finds them cold each time.
//!
//! The check tasks run on the agent's own probing threads (`sonde-probe-N`), each a
//! single-threaded Tokio runtime with its own timers and sockets: a probe's timer, its
//! I/O and the hand-over of its result happen on one thread, with no wake-up of another
//! thread on the way (a multi-threaded runtime would wake idle workers for every
//! timer). The gRPC streams, `/metrics` and `/probe` stay on the main runtime.
//!
//! Probes in flight are bounded ([`max_concurrent_probes`], from the open-file limit):
//! a probe whose slot comes while the bound is reached waits for a place. Each probe's
//! start is measured against its slot: `sonde_agent_probes_started_total{le}` (how late,
//! as a histogram's buckets), `sonde_agent_probes_late_total{reason}` (more than
//! [`LATE_AFTER`] late: `concurrency_limit` when it waited for a place, `busy` when the
//! probing thread was), and `sonde_agent_probes_skipped_total{reason="overrun"}` (slots
//! skipped because the check's previous probe, with its wait, still ran).
//!
//! A stall (the process stopped by SIGSTOP, a paused VM, a swap storm) wakes every check
//! whose slot passed meanwhile at the same instant. Catching up is bounded: a probe
//! that starts late waits for one of a few places, twice what the schedule starts in one
//! step of its grid, so a stalled agent holds about as many probes' state at once as its
//! steady state does (not every due probe's); and a slot more than one interval past is
//! skipped, not run late (`sonde_agent_probes_skipped_total{reason="late"}`): the check's
//! next slot has come, and a probe for the old one would only be a stale copy of it. A
//! late probe still waiting for a place when its check's next slot comes gives up the
//! same way, so every check is back on its schedule one interval after the stall.
//!
//! A check that several aggregators assign (an HA pair sends the same assignment twice)
//! is run once: one task, one probe per interval, and that one result (same sequence
//! number, timestamp and samples) goes to every aggregator that assigned it. Running it
//! once per aggregator would double the load on the agent and on the target, and the two
//! aggregators would write different samples for the same series, which no receiver's
//! deduplication can merge. Checks are the same when job, instance, the module's content,
//! interval, timeout and retries are; a local job is never merged with an assigned check
//! (its results go to every aggregator already, under the agent's own config).

use crate::buffer::{Buffer, Route};
use crate::metrics::{AgentMetrics, Late, ProbeCounts, Skip};
use crate::probe::policy::ConnectRules;
use crate::probe::{self, ProbeContext};
use sonde_proto::config::Module;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// A probe that starts more than this after its slot is counted as late.
pub const LATE_AFTER: Duration = Duration::from_millis(50);
/// One probe in this many is timed on its thread's CPU clock, for
/// `sonde_agent_probe_cpu_seconds_total`: the probing work alone, without the agent
/// around it. Sampled, because reading the clock costs a system call.
const CPU_SAMPLE_EVERY: u64 = 8;

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
    /// The `instance` label of the check's results.
    pub instance: String,
    /// What to probe when it is not the instance (an assigned check of a relabeled job).
    pub probe_target: Option<String>,
    pub module_name: String,
    pub module: Arc<Module>,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub generation: u64,
}

/// One running check and the sources that want it.
struct Task {
    /// Each source's own spec of the check: all run the same probe (see [`same_probe`]),
    /// but the module's name and the generation are the source's.
    members: Members,
    /// Where the task sends each result; replaced whole when sources come and go, so
    /// each result goes to a consistent set.
    route: Arc<Mutex<Route>>,
    handle: JoinHandle<()>,
    /// Tells tasks apart in tests: a task that keeps its id kept its schedule.
    #[cfg_attr(not(test), allow(dead_code))]
    id: u64,
}

/// Each source's spec of one running check, sorted by source: a small vector, since a
/// check has one source or two (an HA pair), and a map's node would cost every check of
/// a 50,000-check agent far more.
struct Members(Vec<(Source, CheckSpec)>);

impl Members {
    fn get(&self, source: &Source) -> Option<&CheckSpec> {
        self.0.iter().find(|(s, _)| s == source).map(|(_, c)| c)
    }

    fn contains_key(&self, source: &Source) -> bool {
        self.get(source).is_some()
    }

    fn insert(&mut self, source: Source, spec: CheckSpec) {
        match self.0.binary_search_by(|(s, _)| s.cmp(&source)) {
            Ok(i) => self.0[i].1 = spec,
            Err(i) => self.0.insert(i, (source, spec)),
        }
    }

    fn remove(&mut self, source: &Source) {
        self.0.retain(|(s, _)| s != source);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (&Source, &CheckSpec)> {
        self.0.iter().map(|(s, c)| (s, c))
    }

    fn values(&self) -> impl Iterator<Item = &CheckSpec> {
        self.0.iter().map(|(_, c)| c)
    }

    #[cfg(test)]
    fn keys(&self) -> impl Iterator<Item = &Source> {
        self.0.iter().map(|(s, _)| s)
    }
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

    fn refresh_route(&self, aggregators: usize) {
        *lock(&self.route) = route(
            self.members
                .iter()
                .map(|(source, spec)| (*source, spec.generation)),
            aggregators,
        );
    }
}

/// Where a check's results go: every aggregator for a local job; for assigned checks,
/// each aggregator (of the `aggregators` configured) that assigned it, with the
/// generation of its own assignment. An aggregator index from another config is left
/// out: nobody would ack it.
pub fn route(sources: impl Iterator<Item = (Source, u64)>, aggregators: usize) -> Route {
    let mut slots = Vec::new();
    for (source, generation) in sources {
        match source {
            Source::Local => return Route::All,
            Source::Aggregator(i) if i < aggregators => slots.push((i, generation)),
            Source::Aggregator(_) => {}
        }
    }
    slots.sort_unstable();
    slots.dedup_by_key(|(i, _)| *i);
    Route::To(slots.into())
}

pub struct Scheduler {
    agent_id: String,
    /// Where the phases' grid starts: every check's slots are this plus a multiple of
    /// [`BATCH_GRID`] (while its interval is one too).
    epoch: tokio::time::Instant,
    ctx: Arc<ProbeContext>,
    buffer: Arc<Buffer>,
    metrics: Arc<AgentMetrics>,
    /// Aggregators configured, for [`route`].
    aggregators: usize,
    probers: Probers,
    /// Probes in flight, across every probing thread.
    limit: Arc<Semaphore>,
    /// [`max_concurrent_probes`], what `limit` started with.
    max_in_flight: usize,
    /// Places for probes that start late.
    catch_up: CatchUp,
    /// `assigned_modules.connect`: where assigned checks may connect. Read at each
    /// probe, so that a reload applies to the checks already running.
    assigned_policy: Arc<RwLock<Arc<ConnectRules>>>,
    /// The running checks by (job, instance); more than one only when sources disagree
    /// on the probe (module, interval, timeout, retries), or a local job has the same
    /// job and instance as an assigned check.
    running: Mutex<Running>,
    /// The last probes of each target, for `/logs`.
    pub logs: Arc<crate::probe_logs::ProbeLogs>,
}

#[derive(Default)]
struct Running {
    tasks: HashMap<(String, String), Vec<Task>>,
    next_id: u64,
}

/// The probing threads cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(
        "cannot start probing thread {thread}'s runtime: {source}; check the process's limits on threads and memory (ulimit -u, the container's pids limit)"
    )]
    Runtime {
        thread: usize,
        source: std::io::Error,
    },
    #[error(
        "cannot start probing thread {thread}: {source}; check the process's limits on threads and memory (ulimit -u, the container's pids limit)"
    )]
    Thread {
        thread: usize,
        source: std::io::Error,
    },
}

impl Scheduler {
    /// Starts the probing threads; checks run once [`Scheduler::set_checks`] gives
    /// them, their results kept in `buffer`.
    pub fn new(
        agent_id: String,
        ctx: Arc<ProbeContext>,
        buffer: Arc<Buffer>,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Self, SchedulerError> {
        let limit = max_concurrent_probes();
        metrics.set_probe_limit(limit);
        Ok(Self {
            agent_id,
            epoch: tokio::time::Instant::now(),
            ctx,
            aggregators: buffer.aggregators().len(),
            buffer,
            metrics,
            probers: Probers::start(probing_threads())?,
            limit: Arc::new(Semaphore::new(limit)),
            max_in_flight: limit,
            catch_up: CatchUp::default(),
            assigned_policy: Arc::new(RwLock::new(Arc::new(ConnectRules::assigned_default()))),
            running: Mutex::new(Running::default()),
            logs: Arc::default(),
        })
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
                task.refresh_route(self.aggregators);
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
                task.refresh_route(self.aggregators);
                continue;
            }
            let route = route([(source, spec.generation)].into_iter(), self.aggregators);
            let route = Arc::new(Mutex::new(route));
            let check = Check {
                ctx: self.ctx.clone(),
                buffer: self.buffer.clone(),
                logs: self.logs.clone(),
                metrics: self.metrics.clone(),
                counts: self.metrics.probe_counts(&spec.job, &spec.instance),
                limit: self.limit.clone(),
                catch_up: self.catch_up.places.clone(),
                // A task is either the agent's own or assigned, never both (`Task::takes`).
                policy: (source != Source::Local).then(|| self.assigned_policy.clone()),
                route: route.clone(),
                first_slot: first_slot(
                    self.epoch,
                    tokio::time::Instant::now(),
                    spread(&self.agent_id, &spec),
                    spec.interval,
                ),
                spec: spec.clone(),
            };
            let handle = self.probers.spawn(check.run());
            tasks.push(Task {
                members: Members(vec![(source, spec)]),
                route,
                handle,
                id,
            });
            running.next_id += 1;
        }
        let intervals = running
            .tasks
            .values()
            .flatten()
            .filter_map(|t| t.members.values().next().map(|c| c.interval));
        self.catch_up
            .resize(catch_up_places(intervals, self.max_in_flight));
    }

    /// Puts assigned checks under `rules` (`assigned_modules.connect`), from their next
    /// probe on. The agent's own jobs never are: its config is trusted with them.
    pub fn set_assigned_connect_policy(&self, rules: ConnectRules) {
        *self
            .assigned_policy
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
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
        && a.probe_target == b.probe_target
        && a.module == b.module
        && a.interval == b.interval
        && a.timeout == b.timeout
        && a.retries == b.retries
}

/// The step of the grid the checks' phases fall on. 50 ms: at 10,000 targets every
/// 15 s some 33 probes start together (20 ms, 13 together, cost 8 % more CPU per probe
/// in docs/benchmarks.md); a probe starts at most one step away from where an even
/// spread would start it, well within its interval.
const BATCH_GRID: Duration = Duration::from_millis(50);

/// Places for late probes, when fewer would do: a catch-up that small still costs
/// nothing worth counting (a few probes' buffers), and a lone check is not held back by
/// another's wait.
const MIN_CATCH_UP: usize = 8;

/// How many late probes may be in flight at once for checks on these intervals: twice
/// what the schedule starts in one step of [`BATCH_GRID`] on average (the hash spreads
/// checks unevenly over the steps, and the fullest step holds about twice the average),
/// at least [`MIN_CATCH_UP`], at most `max_in_flight`. At 10,000 checks every 15 s that
/// is 67 (33 start together in steady state); at 50,000, 334.
fn catch_up_places(intervals: impl Iterator<Item = Duration>, max_in_flight: usize) -> usize {
    let per_step: f64 = intervals
        .map(|interval| {
            BATCH_GRID.as_secs_f64() / interval.as_secs_f64().max(BATCH_GRID.as_secs_f64())
        })
        .sum();
    ((2.0 * per_step).ceil() as usize).clamp(MIN_CATCH_UP.min(max_in_flight), max_in_flight)
}

/// The places for probes that start late (more than [`LATE_AFTER`] after their slot),
/// sized by [`catch_up_places`] for the checks running. On-time probes never take one.
///
/// Without it, a stall wakes every check whose slot passed at once, and each starts its
/// probe: 10,000 HTTP checks every 15 s, stopped for 15 s, had thousands of probes in
/// flight together, each with its connection and buffers, and the agent went from 52 to
/// 213 MiB. With it, what a catch-up holds at once is what the steady state does.
struct CatchUp {
    places: Arc<Semaphore>,
    /// The places the semaphore has in all, taken or not: resizing down can only forget
    /// the free ones, and the rest are forgotten at the next resize.
    total: Mutex<usize>,
}

impl Default for CatchUp {
    fn default() -> Self {
        Self {
            places: Arc::new(Semaphore::new(0)),
            total: Mutex::new(0),
        }
    }
}

impl CatchUp {
    fn resize(&self, wanted: usize) {
        let mut total = lock(&self.total);
        if wanted > *total {
            self.places.add_permits(wanted - *total);
            *total = wanted;
        } else {
            *total -= self.places.forget_permits(*total - wanted);
        }
    }
}

/// How many whole intervals fit in `span`.
fn whole_intervals(span: Duration, interval: Duration) -> u64 {
    (span.as_nanos() / interval.as_nanos().max(1))
        .try_into()
        .unwrap_or(u64::MAX)
}

/// `slot` moved on by `n` intervals.
fn slots_later(slot: tokio::time::Instant, interval: Duration, n: u64) -> tokio::time::Instant {
    slot + interval.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
}

/// The check's phase within its interval, a multiple of [`BATCH_GRID`]: stable for an
/// agent, job and target.
fn spread(agent_id: &str, spec: &CheckSpec) -> Duration {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (agent_id, &spec.job, &spec.instance).hash(&mut h);
    let steps = (spec.interval.as_nanos() / BATCH_GRID.as_nanos()).max(1) as u64;
    BATCH_GRID * (h.finish() % steps) as u32
}

/// The first slot of a check started at `now`: the first `epoch + phase + k × interval`
/// not before `now`, so that every check's slots stay on the grid that starts at the
/// scheduler's `epoch`, whenever the check started.
fn first_slot(
    epoch: tokio::time::Instant,
    now: tokio::time::Instant,
    phase: Duration,
    interval: Duration,
) -> tokio::time::Instant {
    let since = now.saturating_duration_since(epoch);
    if since <= phase || interval.is_zero() {
        return epoch + phase;
    }
    let intervals = (since - phase).as_nanos().div_ceil(interval.as_nanos());
    epoch + phase + interval * u32::try_from(intervals).unwrap_or(u32::MAX)
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One check's task and everything it needs.
struct Check {
    ctx: Arc<ProbeContext>,
    buffer: Arc<Buffer>,
    logs: Arc<crate::probe_logs::ProbeLogs>,
    metrics: Arc<AgentMetrics>,
    /// This target's `sonde_agent_probes_total`, looked up once.
    counts: Arc<ProbeCounts>,
    limit: Arc<Semaphore>,
    /// [`CatchUp`]'s places.
    catch_up: Arc<Semaphore>,
    /// The connect policy of assigned checks; `None` for the agent's own jobs.
    policy: Option<Arc<RwLock<Arc<ConnectRules>>>>,
    route: Arc<Mutex<Route>>,
    /// When the first probe is due ([`first_slot`]); the next ones every interval.
    first_slot: tokio::time::Instant,
    spec: CheckSpec,
}

impl Check {
    async fn run(self) {
        let spec = &self.spec;
        let interval = spec.interval;
        let mut slot = self.first_slot;
        loop {
            tokio::time::sleep_until(slot).await;
            // Woken more than an interval after the slot (the process was stopped or
            // starved): the slots since are past saving, the latest one is not.
            let missed = whole_intervals(slot.elapsed(), interval);
            if missed > 0 {
                self.metrics.probes_skipped(Skip::Late, missed);
                slot = slots_later(slot, interval, missed);
            }
            let mut waited = false;
            let _catching_up = if slot.elapsed() > LATE_AFTER {
                let place = match self.catch_up.clone().try_acquire_owned() {
                    Ok(place) => Ok(place),
                    Err(_) => {
                        waited = true;
                        let next = slot + interval;
                        match tokio::time::timeout_at(next, self.catch_up.clone().acquire_owned())
                            .await
                        {
                            Ok(Ok(place)) => Ok(place),
                            // Never closed.
                            Ok(Err(_)) => return,
                            Err(_) => Err(next),
                        }
                    }
                };
                match place {
                    Ok(place) => Some(place),
                    Err(next) => {
                        // The next slot came first: that one runs, on time.
                        self.metrics.probes_skipped(Skip::Late, 1);
                        slot = next;
                        continue;
                    }
                }
            } else {
                None
            };
            let (_permit, waited) = match self.limit.clone().try_acquire_owned() {
                Ok(permit) => (permit, waited),
                Err(_) => match self.limit.clone().acquire_owned().await {
                    Ok(permit) => (permit, true),
                    // Never closed.
                    Err(_) => return,
                },
            };
            let delay = slot.elapsed();
            let late = (delay > LATE_AFTER).then_some(if waited {
                Late::ConcurrencyLimit
            } else {
                Late::Busy
            });
            self.metrics.probe_started(delay, late);
            let started_at = SystemTime::now();
            let mut outcome = self.probe().await;
            let mut retries_used = 0;
            while !outcome.success && retries_used < spec.retries {
                // Retry only while a whole attempt still fits before the next tick.
                let backoff = Duration::from_millis(100 * (1 << retries_used.min(4)));
                if slot.elapsed() + backoff + spec.timeout > spec.interval {
                    break;
                }
                tokio::time::sleep(backoff).await;
                retries_used += 1;
                outcome = self.probe().await;
            }
            if spec.retries > 0 {
                outcome.samples.push(probe::Sample {
                    name: "probe_retries",
                    labels: Vec::new(),
                    value: f64::from(retries_used),
                });
            }
            if let Some(trace) = &mut outcome.trace
                && let Some(addr) = trace.last_connect_address()
            {
                // What the network looked like on the way to the address that failed.
                trace.path = self.ctx.tracer.path_to(addr.ip()).await;
            }
            // Whoever wants the check when the probe ends gets its result. A check removed
            // while its probe ran has nobody left to take it: the result is neither kept
            // nor counted, so that `sonde_agent_probes_total` stays the number of results
            // the aggregators see.
            self.logs.keep_outcome(
                &spec.instance,
                &spec.module_name,
                &spec.module,
                crate::probe_logs::Origin::Check {
                    job: spec.job.clone(),
                },
                started_at,
                &outcome,
            );
            let route = lock(&self.route).clone();
            if !route.is_empty() {
                self.counts.ran(outcome.success);
                self.buffer.record(
                    &route,
                    &spec.job,
                    &spec.instance,
                    unix_ms(started_at),
                    outcome,
                );
            }
            // The slots that passed while this probe (with its wait) ran are skipped but
            // the latest, which starts at once, late.
            let mut next = slot + interval;
            let overran = whole_intervals(next.elapsed(), interval);
            if overran > 0 {
                self.metrics.probes_skipped(Skip::Overrun, overran);
                next = slots_later(next, interval, overran);
            }
            slot = next;
        }
    }

    /// One probe; one in [`CPU_SAMPLE_EVERY`] timed on the thread's CPU clock.
    async fn probe(&self) -> probe::ProbeOutcome {
        let spec = &self.spec;
        let policy = self
            .policy
            .as_ref()
            .map(|p| p.read().unwrap_or_else(|e| e.into_inner()).clone());
        // Boxed: a probe's state (connection, TLS, parser) is large, and held inline it
        // would take that room in every idle check's task for good, not only while the
        // probe runs.
        let mut run = Box::pin(probe::run_with_policy(
            &self.ctx,
            policy.as_deref().map(|p| p as &dyn probe::ConnectPolicy),
            spec.probe_target.as_deref().unwrap_or(&spec.instance),
            &spec.module,
            spec.timeout,
        ));
        if !self.metrics.sample_probe_cpu(CPU_SAMPLE_EVERY) {
            return run.await;
        }
        let mut spent = Duration::ZERO;
        let outcome = std::future::poll_fn(|cx| {
            let before = thread_cpu_time();
            let polled = run.as_mut().poll(cx);
            spent += thread_cpu_time().saturating_sub(before);
            polled
        })
        .await;
        self.metrics.probe_cpu(spent);
        outcome
    }
}

/// The CPU time the calling thread has used (user and system).
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always
    // supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Probes in flight at most: half the open-file limit (a probe holds a socket, and a DNS
/// lookup on the way another), less what the rest of the agent needs, within 16..4096.
pub fn max_concurrent_probes() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    let files = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    let files = usize::try_from(files).unwrap_or(usize::MAX);
    (files.saturating_sub(256) / 2).clamp(16, 4096)
}

/// Raises the open-file limit to what the system allows the process (the hard limit), as
/// Go programs do at start: the default soft limit of 1,024 is a relic that would bound
/// an agent with many targets for no reason. Returns the new limit.
pub fn raise_open_file_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit; setrlimit only reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// Probing threads: one per two cores, at least one, at most four. One thread runs tens
/// of thousands of HTTP probes a second; more threads would only wake more often.
fn probing_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.div_ceil(2).clamp(1, 4)
}

/// The probing threads, each a current-thread Tokio runtime; checks are spread over
/// them in turn. Each thread runs until the scheduler is dropped; dropping its runtime
/// drops the checks still on it.
struct Probers {
    handles: Vec<tokio::runtime::Handle>,
    next: AtomicUsize,
    /// Dropped to stop the threads.
    stop: Option<tokio::sync::watch::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probers {
    fn start(n: usize) -> Result<Self, SchedulerError> {
        let (stop, stopped) = tokio::sync::watch::channel(());
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| SchedulerError::Runtime { thread: i, source })?;
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sonde-probe-{i}"))
                .spawn(move || {
                    runtime.block_on(async move { while stopped.changed().await.is_ok() {} });
                })
                .map_err(|source| SchedulerError::Thread { thread: i, source })?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            stop: Some(stop),
            threads,
        })
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, task: F) -> JoinHandle<()> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(task)
    }
}

impl Drop for Probers {
    fn drop(&mut self) {
        drop(self.stop.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Source = Source::Aggregator(0);
    const B: Source = Source::Aggregator(1);

    #[test]
    fn phases_fall_on_the_batch_grid_and_first_slots_stay_on_it() {
        let spec = |instance: &str, interval_ms: u64| check(instance, interval_ms, 1);
        for i in 0..200 {
            let phase = spread("edge-1", &spec(&format!("t{i}"), 15_000));
            assert!(phase < Duration::from_secs(15));
            assert!(
                phase.as_nanos().is_multiple_of(BATCH_GRID.as_nanos()),
                "{phase:?}"
            );
        }
        // An interval shorter than the grid: every check at phase 0.
        assert_eq!(spread("edge-1", &spec("t", 5)), Duration::ZERO);

        let epoch = tokio::time::Instant::now();
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Started before its phase: the phase itself.
        assert_eq!(
            first_slot(epoch, epoch + ms(30), ms(40), s(15)),
            epoch + ms(40)
        );
        assert_eq!(
            first_slot(epoch, epoch + ms(40), ms(40), s(15)),
            epoch + ms(40)
        );
        // Started later: the next slot on the grid, never one in the past.
        assert_eq!(
            first_slot(epoch, epoch + ms(41), ms(40), s(15)),
            epoch + ms(15_040)
        );
        assert_eq!(
            first_slot(epoch, epoch + s(100), ms(40), s(15)),
            epoch + ms(105_040)
        );
    }

    #[test]
    fn catch_up_places_follow_the_schedules_start_batch() {
        let every = |n: usize, secs: u64| std::iter::repeat_n(Duration::from_secs(secs), n);
        // 10,000 checks every 15 s start 33 a step: twice that, rounded up.
        assert_eq!(catch_up_places(every(10_000, 15), 4096), 67);
        assert_eq!(catch_up_places(every(50_000, 15), 4096), 334);
        // Few checks: the floor; many: the bound on probes in flight.
        assert_eq!(catch_up_places(every(3, 60), 4096), MIN_CATCH_UP);
        assert_eq!(catch_up_places(every(0, 60), 4096), MIN_CATCH_UP);
        assert_eq!(catch_up_places(every(1_000_000, 1), 4096), 4096);
        assert_eq!(catch_up_places(every(3, 60), 4), 4);
        // An interval under the grid's step counts as one start a step.
        assert_eq!(
            catch_up_places(std::iter::repeat_n(Duration::from_millis(1), 10), 4096),
            20
        );
    }

    #[tokio::test]
    async fn catch_up_places_resize_without_losing_count() {
        let catch_up = CatchUp::default();
        catch_up.resize(10);
        assert_eq!(catch_up.places.available_permits(), 10);
        let taken = catch_up.places.clone().acquire_many_owned(6).await.unwrap();
        // Down to 2 while 6 are taken: the 4 free ones go now, the rest at the next resize.
        catch_up.resize(2);
        assert_eq!(catch_up.places.available_permits(), 0);
        drop(taken);
        assert_eq!(catch_up.places.available_permits(), 6);
        catch_up.resize(2);
        assert_eq!(catch_up.places.available_permits(), 2);
        catch_up.resize(5);
        assert_eq!(catch_up.places.available_permits(), 5);
    }

    #[test]
    fn whole_intervals_count_the_slots_passed() {
        let s = Duration::from_secs;
        assert_eq!(whole_intervals(s(0), s(15)), 0);
        assert_eq!(whole_intervals(s(14), s(15)), 0);
        assert_eq!(whole_intervals(s(15), s(15)), 1);
        assert_eq!(whole_intervals(s(31), s(15)), 2);
    }

    fn scheduler_with(buffer: Arc<Buffer>, metrics: Arc<AgentMetrics>) -> Scheduler {
        let ctx = Arc::new(ProbeContext::from_system().unwrap());
        Scheduler::new("edge-1".into(), ctx, buffer, metrics).unwrap()
    }

    fn scheduler(buffer: Arc<Buffer>) -> Scheduler {
        scheduler_with(buffer, Arc::new(AgentMetrics::default()))
    }

    fn two_aggregators() -> Arc<Buffer> {
        Buffer::open(None, &["http://a:1".into(), "http://b:1".into()], 1 << 20).unwrap()
    }

    #[test]
    fn each_check_is_routed_to_the_sources_that_want_it() {
        let route = |sources: &[(Source, u64)]| route(sources.iter().copied(), 3);
        let to = |slots: &[(usize, u64)]| Route::To(Arc::from(slots));
        assert_eq!(route(&[(Source::Aggregator(7), 1)]), to(&[]));
        assert!(route(&[(Source::Aggregator(7), 1)]).is_empty());
        assert_eq!(route(&[(Source::Local, 0)]), Route::All);
        assert_eq!(route(&[(B, 4)]), to(&[(1, 4)]));
        // Sorted, each aggregator with its own generation, other configs' left out.
        assert_eq!(
            route(&[
                (Source::Aggregator(2), 9),
                (Source::Aggregator(7), 1),
                (A, 3)
            ]),
            to(&[(0, 3), (2, 9)])
        );
    }

    fn module(json: &str) -> Arc<Module> {
        Arc::new(serde_json::from_str(json).unwrap())
    }

    fn check(instance: &str, interval_ms: u64, generation: u64) -> CheckSpec {
        CheckSpec {
            job: "web".into(),
            instance: instance.into(),
            probe_target: None,
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
                probe_target: Some("127.0.0.1:10".into()),
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
        let s = scheduler_with(store.clone(), metrics.clone());
        let results = |i: usize| {
            store
                .pending_after(i, 0, 1000)
                .iter()
                .map(|r| (r.seq, r.timestamp_ms, r.generation, r.success))
                .collect::<Vec<_>>()
        };
        let wait_for = |i: usize, n: usize| {
            let store = store.clone();
            async move {
                for _ in 0..200 {
                    let s = store.clone();
                    tokio::task::spawn_blocking(move || s.flush())
                        .await
                        .unwrap();
                    if store.stats(i).results >= n {
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
        let families = metrics.families(&[], 0, 0);
        let started = families
            .iter()
            .find(|f| f.name == "sonde_agent_probes_started_total")
            .unwrap();
        let all = started.samples.last().unwrap();
        assert_eq!(all.0, [("le".to_string(), "+Inf".to_string())]);
        assert!(all.1 >= b.len() as f64, "{started:?}");
    }
}
