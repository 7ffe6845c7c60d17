//! The aggregator's state: which agents are connected, what each last reported for each
//! target, which jobs are expected, and the series all of that turns into.
//!
//! The fleet service feeds it (hello, results, heartbeats, disconnects), a ticker asks it
//! to re-evaluate freshness, and it hands every series it produces to the outputs
//! (remote-write queues and the `/metrics` view). The rules themselves live in
//! [`crate::merge`]; this module only keeps state and timestamps in order.

use crate::config::AggregatorConfig;
use crate::merge::{self, AgentView, Merged, TargetState};
use crate::remote_write::encode::{STALE_NAN_BITS, SeriesSample};
use crate::targets::{FileSd, Target, TargetSet};
use sonde_proto::config::{Labels, Quorum, ResolvedJob};
use sonde_proto::pb::{self, AggregatorMessage, Check, aggregator_message};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Where the stream to one connected agent can be written.
pub type AgentSender = mpsc::Sender<Result<AggregatorMessage, tonic::Status>>;

/// A merged series must be rewritten at least this often while its target is fresh, so
/// that it never falls out of Prometheus's 5-minute lookback, whatever the interval.
const MAX_REWRITE_PERIOD_MS: i64 = 60_000;

/// A probe sample: metric name, labels, value.
pub type ProbeSample = (String, Vec<(String, String)>, f64);

/// One probe result as the fleet service decoded it.
#[derive(Clone, Debug, PartialEq)]
pub struct IncomingResult {
    pub seq: u64,
    pub job: String,
    pub instance: String,
    pub timestamp_ms: i64,
    pub success: bool,
    pub duration_seconds: f64,
    pub failure: String,
    pub samples: Vec<ProbeSample>,
}

/// What an agent last reported for one target.
#[derive(Clone, Debug)]
pub struct LastResult {
    pub timestamp_ms: i64,
    pub success: bool,
    pub duration_seconds: f64,
    pub failure: String,
    /// Time between this result and the one before it from the same agent, for local
    /// jobs whose interval the aggregator does not know.
    pub spacing_ms: Option<i64>,
    /// The result's samples, for `/metrics` scrapes.
    pub samples: Vec<ProbeSample>,
}

#[derive(Default)]
pub struct TargetEntry {
    /// (job, instance).
    pub key: (String, String),
    pub views: BTreeMap<String, LastResult>,
    pub merged: Option<Merged>,
    last_written_ms: i64,
    /// True while an `up` sample is live in the receivers (so a staleness marker is owed
    /// when the target goes missing).
    up_live: bool,
    /// The target labels the merged series were last written with.
    written_labels: Labels,
}

pub struct AgentEntry {
    pub labels: Labels,
    pub version: String,
    pub local_jobs: Vec<String>,
    pub connection: Option<u64>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub committed_seq: u64,
    pub generation: u64,
    pub checks: usize,
    /// True once the agent's series got staleness markers for being gone.
    series_staled: bool,
    sender: Option<AgentSender>,
    last_assignment: Vec<Check>,
}

impl AgentEntry {
    /// `sonde_agent_up`: connected, or heard from within `grace`.
    pub fn is_up(&self, now_ms: i64, grace: Duration) -> bool {
        merge::agent_up(self.connection.is_some(), self.last_seen_ms, now_ms, grace)
    }

    /// `sonde_agent_last_seen_timestamp_seconds`, in ms: now while connected.
    pub fn last_seen_at(&self, now_ms: i64) -> i64 {
        if self.connection.is_some() {
            now_ms
        } else {
            self.last_seen_ms
        }
    }
}

pub struct JobEntry {
    pub expected_since_ms: i64,
    /// `None` for a job that only exists as an agent's local job.
    pub config: Option<ResolvedJob>,
    pub missing: bool,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct HubCounters {
    pub results_received: AtomicU64,
    pub results_deduplicated: AtomicU64,
    pub results_unexpected: AtomicU64,
    pub samples_invalid: AtomicU64,
    pub agent_connects: AtomicU64,
    pub agents_refused: AtomicU64,
}

pub struct State {
    pub config: Arc<AggregatorConfig>,
    pub targets: TargetSet,
    pub entries: BTreeMap<(String, String), TargetEntry>,
    pub agents: BTreeMap<String, AgentEntry>,
    pub jobs: BTreeMap<String, JobEntry>,
    file_sd: FileSd,
    generation: u64,
    next_connection: u64,
    /// Last timestamp written per merged series key, so each write is strictly later.
    last_meta_ms: i64,
}

/// Changes to the durable state that must commit together with a batch of samples.
pub type StateChange<'a> = &'a dyn Fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>;

/// Where the series the hub produces go. `commit` stores `samples` in every output
/// queue and applies `change` in one transaction: all of it, or none of it.
pub trait Output: Send + Sync {
    fn commit(&self, samples: &[SeriesSample], change: StateChange<'_>) -> Result<(), String>;
}

fn no_change(_: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    Ok(())
}

pub struct Hub {
    state: std::sync::Mutex<State>,
    output: Arc<dyn Output>,
    pub counters: HubCounters,
    pub storage: crate::health::StorageHealth,
}

fn stale_nan() -> f64 {
    f64::from_bits(STALE_NAN_BITS)
}

impl Hub {
    pub fn new(config: Arc<AggregatorConfig>, output: Arc<dyn Output>, now_ms: i64) -> Self {
        let mut state = State {
            config: config.clone(),
            targets: TargetSet::new(),
            entries: BTreeMap::new(),
            agents: BTreeMap::new(),
            jobs: BTreeMap::new(),
            file_sd: FileSd::default(),
            generation: 0,
            next_connection: 1,
            last_meta_ms: 0,
        };
        state.apply_config(config, now_ms);
        Self {
            state: std::sync::Mutex::new(state),
            output,
            counters: HubCounters::default(),
            storage: crate::health::StorageHealth::default(),
        }
    }

    /// Takes back what the store remembers from before a restart: agents (disconnected
    /// until they say hello again, with their committed sequence numbers) and when each
    /// job started being expected.
    pub fn restore(&self, agents: Vec<crate::store::StoredAgent>, jobs: Vec<(String, i64)>) {
        let mut state = self.lock();
        for a in agents {
            for job in &a.local_jobs {
                state.jobs.entry(job.clone()).or_insert(JobEntry {
                    expected_since_ms: a.first_seen_ms,
                    config: None,
                    missing: false,
                });
            }
            state.agents.insert(
                a.id.clone(),
                AgentEntry {
                    labels: a.labels,
                    version: String::new(),
                    local_jobs: a.local_jobs,
                    connection: None,
                    first_seen_ms: a.first_seen_ms,
                    last_seen_ms: a.last_seen_ms,
                    committed_seq: a.committed_seq,
                    generation: 0,
                    checks: 0,
                    series_staled: false,
                    sender: None,
                    last_assignment: Vec::new(),
                },
            );
        }
        for (name, since) in jobs {
            if let Some(job) = state.jobs.get_mut(&name) {
                job.expected_since_ms = job.expected_since_ms.min(since);
            }
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> Arc<AggregatorConfig> {
        self.lock().config.clone()
    }

    /// An agent said hello: register it, send its assignment, and return its connection
    /// id (a newer connection of the same agent replaces the older one).
    pub fn connect(&self, hello: &pb::Hello, sender: AgentSender, now_ms: i64) -> u64 {
        self.counters.agent_connects.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        let mut state = self.lock();
        let connection = state.next_connection;
        state.next_connection += 1;
        let labels: Labels = hello.labels.clone().into_iter().collect();
        let info_changed;
        {
            let entry = state
                .agents
                .entry(hello.agent_id.clone())
                .or_insert_with(|| AgentEntry {
                    labels: labels.clone(),
                    version: String::new(),
                    local_jobs: Vec::new(),
                    connection: None,
                    first_seen_ms: now_ms,
                    last_seen_ms: now_ms,
                    committed_seq: 0,
                    generation: 0,
                    checks: 0,
                    series_staled: false,
                    sender: None,
                    last_assignment: Vec::new(),
                });
            if entry.connection.is_some() {
                tracing::warn!(agent = %hello.agent_id, "agent connected again; the newer stream replaces the older one");
            }
            info_changed = entry.labels != labels;
            entry.labels = labels;
            entry.version = hello.version.clone();
            entry.local_jobs = hello.local_jobs.clone();
            entry.connection = Some(connection);
            entry.series_staled = false;
            entry.last_seen_ms = now_ms;
            entry.sender = Some(sender);
            // A fresh stream must receive its assignment even if it equals the last one.
            entry.last_assignment.clear();
        }
        for job in &hello.local_jobs {
            state.jobs.entry(job.clone()).or_insert(JobEntry {
                expected_since_ms: now_ms,
                config: None,
                missing: false,
            });
        }
        state.send_assignments(Some(&hello.agent_id));
        if info_changed {
            state.write_meta(now_ms, &mut out);
        }
        let stored = state.stored_agent(&hello.agent_id);
        let save = |tx: &rusqlite::Transaction<'_>| match &stored {
            Some(a) => crate::store::save_agent(tx, a),
            None => Ok(()),
        };
        self.commit(&out, &save);
        connection
    }

    /// The stream of `connection` ended.
    pub fn disconnect(&self, agent: &str, connection: u64, now_ms: i64) {
        let mut state = self.lock();
        if let Some(entry) = state.agents.get_mut(agent)
            && entry.connection == Some(connection)
        {
            entry.connection = None;
            entry.sender = None;
            entry.last_seen_ms = now_ms;
        }
    }

    /// Forgets every stream (at shutdown).
    pub fn disconnect_all(&self, now_ms: i64) {
        for entry in self.lock().agents.values_mut() {
            if entry.connection.take().is_some() {
                entry.sender = None;
                entry.last_seen_ms = now_ms;
            }
        }
    }

    pub fn heartbeat(&self, agent: &str, now_ms: i64) {
        if let Some(entry) = self.lock().agents.get_mut(agent) {
            entry.last_seen_ms = now_ms;
        }
    }

    /// Takes a batch of results from `agent` and returns the sequence number to ack.
    /// Results at or below what was already committed are replays and are dropped.
    ///
    /// The samples the batch produces and the agent's new committed sequence number are
    /// committed in one transaction before the ack is returned; `Err` means nothing was
    /// committed and nothing may be acked (the agent will send the batch again).
    pub fn results(
        &self,
        agent: &str,
        batch: Vec<IncomingResult>,
        now_ms: i64,
    ) -> Result<Option<u64>, String> {
        let mut out = Vec::new();
        let mut state = self.lock();
        let Some(committed) = state.agents.get(agent).map(|a| a.committed_seq) else {
            return Ok(None);
        };
        let mut last = committed;
        let mut ack = None;
        for result in batch {
            self.counters
                .results_received
                .fetch_add(1, Ordering::Relaxed);
            if result.seq <= last {
                self.counters
                    .results_deduplicated
                    .fetch_add(1, Ordering::Relaxed);
                ack = Some(ack.unwrap_or(last).max(committed));
                continue;
            }
            if !state.accept(agent, &result, now_ms, &mut out) {
                self.counters
                    .results_unexpected
                    .fetch_add(1, Ordering::Relaxed);
            }
            last = result.seq;
            ack = Some(result.seq);
        }
        if last > committed {
            let id = agent.to_string();
            let change =
                |tx: &rusqlite::Transaction<'_>| crate::store::commit_seq(tx, &id, last, now_ms);
            self.try_commit(&out, &change)?;
            if let Some(a) = state.agents.get_mut(agent) {
                a.committed_seq = last;
                a.last_seen_ms = now_ms;
            }
        }
        Ok(ack)
    }

    /// Re-evaluates freshness and missing jobs and agents; call about once a second.
    pub fn tick(&self, now_ms: i64) {
        let mut out = Vec::new();
        let mut state = self.lock();
        let targets_changed = state.rediscover();
        if targets_changed {
            state.send_assignments(None);
        }
        state.evaluate_all(now_ms, &mut out);
        let meta_every = state.config.scrape_interval.as_millis() as i64;
        let mut forgotten = Vec::new();
        let mut jobs = Vec::new();
        if now_ms - state.last_meta_ms >= meta_every {
            forgotten = state.write_meta(now_ms, &mut out);
            jobs = state
                .jobs
                .iter()
                .map(|(n, j)| (n.clone(), j.expected_since_ms))
                .collect();
        }
        let change = |tx: &rusqlite::Transaction<'_>| {
            for id in &forgotten {
                crate::store::forget_agent(tx, id)?;
            }
            if !jobs.is_empty() {
                crate::store::save_jobs(tx, &jobs)?;
            }
            Ok(())
        };
        self.commit(&out, &change);
    }

    /// Applies a new config: new jobs and targets, new assignments; what disappeared
    /// gets staleness markers so `absent()` fires at once.
    pub fn reload(&self, config: Arc<AggregatorConfig>, now_ms: i64) {
        let mut out = Vec::new();
        let mut state = self.lock();
        let removed = state.apply_config(config, now_ms);
        for key in removed {
            let Some(entry) = state.entries.remove(&key) else {
                continue;
            };
            for (agent, view) in &entry.views {
                stale_agent_series(&entry, agent, view, now_ms, &mut out);
            }
            if entry.up_live {
                // The markers must carry exactly the labels the series were written with.
                let target = Target {
                    job: key.0.clone(),
                    instance: key.1.clone(),
                    labels: entry.written_labels.clone(),
                };
                state.write_merged(&target, None, now_ms, entry.last_written_ms, &mut out);
            }
        }
        state.send_assignments(None);
        state.write_meta(now_ms, &mut out);
        self.commit(&out, &no_change);
    }

    /// Commits series that no agent waits an ack for (merged series, staleness markers,
    /// job and agent series). A failure is logged; the next tick writes fresh values.
    fn commit(&self, out: &[SeriesSample], change: StateChange<'_>) {
        if let Err(e) = self.try_commit(out, change) {
            tracing::error!(error = %e, samples = out.len(), "cannot commit series to the store");
        }
    }

    /// Commits through the output and keeps [`Hub::storage`] up to date.
    fn try_commit(&self, out: &[SeriesSample], change: StateChange<'_>) -> Result<(), String> {
        match self.output.commit(out, change) {
            Ok(()) => {
                self.storage.succeeded();
                Ok(())
            }
            Err(e) => {
                self.storage.failed(&e);
                Err(e)
            }
        }
    }
}

impl State {
    /// Targets the config (static and file_sd) gives `job`.
    fn configured_targets(&self, job: &str) -> usize {
        self.targets
            .range((job.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == job)
            .count()
    }

    /// `sonde_job_targets`: the configured targets, or for an agent-local job the
    /// targets its results name.
    pub fn job_target_count(&self, job: &str) -> usize {
        let seen = self
            .entries
            .range((job.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == job)
            .count();
        self.configured_targets(job).max(seen)
    }

    fn stored_agent(&self, id: &str) -> Option<crate::store::StoredAgent> {
        self.agents.get(id).map(|a| crate::store::StoredAgent {
            id: id.to_string(),
            labels: a.labels.clone(),
            local_jobs: a.local_jobs.clone(),
            committed_seq: a.committed_seq,
            first_seen_ms: a.first_seen_ms,
            last_seen_ms: a.last_seen_ms,
        })
    }

    /// Installs `config`; returns the targets that no longer exist.
    fn apply_config(
        &mut self,
        config: Arc<AggregatorConfig>,
        now_ms: i64,
    ) -> Vec<(String, String)> {
        self.config = config;
        let configured: BTreeSet<String> =
            self.config.jobs.iter().map(|j| j.name.clone()).collect();
        let local: BTreeSet<String> = self
            .agents
            .values()
            .flat_map(|a| a.local_jobs.iter().cloned())
            .collect();
        self.jobs
            .retain(|name, _| configured.contains(name) || local.contains(name));
        for job in &self.config.jobs {
            let entry = self.jobs.entry(job.name.clone()).or_insert(JobEntry {
                expected_since_ms: now_ms,
                config: None,
                missing: false,
            });
            entry.config = Some(job.clone());
        }
        for (name, entry) in self.jobs.iter_mut() {
            if !configured.contains(name) {
                entry.config = None;
            }
        }
        self.rediscover();
        let removed: Vec<_> = self
            .entries
            .keys()
            .filter(|k| !self.targets.contains_key(*k) && !self.is_local_job(&k.0))
            .cloned()
            .collect();
        removed
    }

    fn is_local_job(&self, job: &str) -> bool {
        self.jobs.get(job).is_some_and(|j| j.config.is_none())
    }

    /// Re-reads file_sd files; true when the target set changed.
    fn rediscover(&mut self) -> bool {
        let config = self.config.clone();
        let targets = self.file_sd.targets(&config.jobs);
        if targets != self.targets {
            self.targets = targets;
            true
        } else {
            false
        }
    }

    /// Sends each connected agent (or just `only`) its assignment when it changed.
    fn send_assignments(&mut self, only: Option<&str>) {
        let jobs: BTreeMap<&str, &ResolvedJob> = self
            .config
            .jobs
            .iter()
            .map(|j| (j.name.as_str(), j))
            .collect();
        let mut module_json: BTreeMap<&str, String> = BTreeMap::new();
        for job in jobs.values() {
            module_json
                .entry(job.name.as_str())
                .or_insert_with(|| serde_json::to_string(&job.module).unwrap_or_default());
        }
        let mut generation = self.generation;
        for (id, agent) in self.agents.iter_mut() {
            if only.is_some_and(|o| o != id) || agent.sender.is_none() {
                continue;
            }
            let checks: Vec<Check> = self
                .targets
                .values()
                .filter_map(|t| {
                    let job = jobs.get(t.job.as_str())?;
                    job.config.selects(&agent.labels).then(|| Check {
                        job: t.job.clone(),
                        instance: t.instance.clone(),
                        module_name: job.module_name.clone(),
                        module_json: module_json.get(t.job.as_str()).cloned().unwrap_or_default(),
                        interval_ms: job.interval.as_millis() as u64,
                        timeout_ms: job.timeout.as_millis() as u64,
                        retries: job.retries,
                    })
                })
                .collect();
            if checks == agent.last_assignment {
                continue;
            }
            generation += 1;
            agent.generation = generation;
            agent.checks = checks.len();
            agent.last_assignment = checks.clone();
            let message = AggregatorMessage {
                msg: Some(aggregator_message::Msg::Assignment(pb::Assignment {
                    generation,
                    checks,
                })),
            };
            if let Some(sender) = &agent.sender
                && sender.try_send(Ok(message)).is_err()
            {
                // The stream is gone or hopelessly behind: drop it; the agent
                // reconnects and gets a fresh assignment with its hello.
                tracing::warn!(agent = %id, "cannot send the assignment; closing the stream");
                agent.sender = None;
                agent.connection = None;
            }
        }
        self.generation = generation;
    }

    /// Records one result; false when it belongs to no known target.
    fn accept(
        &mut self,
        agent: &str,
        r: &IncomingResult,
        now_ms: i64,
        out: &mut Vec<SeriesSample>,
    ) -> bool {
        let key = (r.job.clone(), r.instance.clone());
        let target = match self.targets.get(&key) {
            Some(t) => t.clone(),
            None if self.is_local_job(&r.job) => Target {
                job: r.job.clone(),
                instance: r.instance.clone(),
                labels: Labels::new(),
            },
            None => return false,
        };
        let entry = self
            .entries
            .entry(key.clone())
            .or_insert_with(|| TargetEntry {
                key: key.clone(),
                written_labels: target.labels.clone(),
                ..TargetEntry::default()
            });
        let previous = entry.views.get(agent).map(|v| v.timestamp_ms);
        if previous.is_some_and(|p| r.timestamp_ms <= p) {
            // Older than what this agent already reported: it cannot change the present.
            return true;
        }
        entry.views.insert(
            agent.to_string(),
            LastResult {
                timestamp_ms: r.timestamp_ms,
                success: r.success,
                duration_seconds: r.duration_seconds,
                failure: r.failure.clone(),
                // Saturating: both timestamps come from the agent (found by fuzz/fleet_batch).
                spacing_ms: previous.map(|p| r.timestamp_ms.saturating_sub(p)),
                samples: r.samples.clone(),
            },
        );
        for (name, labels, value) in &r.samples {
            out.push(SeriesSample {
                labels: agent_series_labels(
                    &target.labels,
                    &target.job,
                    &target.instance,
                    agent,
                    name,
                    labels,
                ),
                timestamp_ms: r.timestamp_ms,
                value: *value,
            });
        }
        self.evaluate(&key, now_ms, true, out);
        true
    }

    fn evaluate_all(&mut self, now_ms: i64, out: &mut Vec<SeriesSample>) {
        let keys: Vec<_> = self.entries.keys().cloned().collect();
        for key in keys {
            self.evaluate(&key, now_ms, false, out);
        }
    }

    /// The quorum and freshness window that apply to a target's job.
    fn rules(&self, job: &str, entry: &TargetEntry) -> (Quorum, Duration) {
        match self.jobs.get(job).and_then(|j| j.config.as_ref()) {
            Some(c) => (c.quorum, c.freshness),
            None => {
                // A local job: the aggregator knows its rhythm only from the results.
                let spacing = entry
                    .views
                    .values()
                    .filter_map(|v| v.spacing_ms)
                    .max()
                    .map_or(self.config.scrape_interval, |ms| {
                        Duration::from_millis(ms.max(1) as u64)
                    });
                (Quorum::AtLeast(1), spacing * 2 + spacing / 2)
            }
        }
    }

    /// Merges one target and writes its merged series when they changed, when a new
    /// result arrived, or when they were last written too long ago.
    fn evaluate(
        &mut self,
        key: &(String, String),
        now_ms: i64,
        new_result: bool,
        out: &mut Vec<SeriesSample>,
    ) {
        let Some(entry) = self.entries.get(key) else {
            return;
        };
        let (quorum, window) = self.rules(&key.0, entry);
        let merged = merge::merge(
            entry
                .views
                .values()
                .map(|v| AgentView {
                    timestamp_ms: v.timestamp_ms,
                    success: v.success,
                })
                .collect::<Vec<_>>()
                .iter(),
            quorum,
            now_ms,
            window,
        );
        let changed = entry.merged.map(|m| m.state) != Some(merged.state)
            || entry.merged.map(|m| (m.agents, m.succeeding))
                != Some((merged.agents, merged.succeeding));
        let period = window.as_millis().min(MAX_REWRITE_PERIOD_MS as u128) as i64 / 2;
        let due =
            merged.state != TargetState::Missing && now_ms - entry.last_written_ms >= period.max(1);
        let must_write = new_result || changed || due;
        let up_live = entry.up_live;
        let last = entry.last_written_ms;
        if !must_write || (merged.state == TargetState::Missing && !up_live && !changed) {
            if let Some(e) = self.entries.get_mut(key) {
                e.merged = Some(merged);
            }
            return;
        }
        let target = self.targets.get(key).cloned().unwrap_or_else(|| Target {
            job: key.0.clone(),
            instance: key.1.clone(),
            labels: Labels::new(),
        });
        let written_at = self.write_merged(&target, Some(merged), now_ms, last, out);
        if let Some(e) = self.entries.get_mut(key) {
            e.merged = Some(merged);
            e.last_written_ms = written_at;
            e.up_live = merged.state != TargetState::Missing;
            e.written_labels = target.labels.clone();
        }
    }

    /// Writes `up`, `sonde_target_agents` and `sonde_target_agents_succeeding` for a
    /// target; `None` (target removed) or a missing state writes staleness markers for
    /// `up`. Returns the timestamp used, always after `last_ms`.
    fn write_merged(
        &self,
        target: &Target,
        merged: Option<Merged>,
        now_ms: i64,
        last_ms: i64,
        out: &mut Vec<SeriesSample>,
    ) -> i64 {
        let ts = now_ms.max(last_ms + 1);
        let labels = target_labels(target);
        let with_name = |name: &str| {
            let mut l = labels.clone();
            l.push(("__name__".into(), name.to_string()));
            l
        };
        let (up, agents, succeeding) = match merged {
            Some(m) => (
                m.state.up_value().unwrap_or_else(stale_nan),
                f64::from(m.agents),
                f64::from(m.succeeding),
            ),
            None => (stale_nan(), stale_nan(), stale_nan()),
        };
        out.push(SeriesSample {
            labels: with_name("up"),
            timestamp_ms: ts,
            value: up,
        });
        out.push(SeriesSample {
            labels: with_name("sonde_target_agents"),
            timestamp_ms: ts,
            value: agents,
        });
        out.push(SeriesSample {
            labels: with_name("sonde_target_agents_succeeding"),
            timestamp_ms: ts,
            value: succeeding,
        });
        ts
    }

    /// Per-job and per-agent series: missing jobs, target counts, agent liveness.
    /// Returns the agents forgotten (gone for longer than `forget_after`).
    fn write_meta(&mut self, now_ms: i64, out: &mut Vec<SeriesSample>) -> Vec<String> {
        let ts = now_ms.max(self.last_meta_ms + 1);
        self.last_meta_ms = ts;
        let grace = self.config.missing_after;
        let forget = self.config.forget_after;
        // Agents gone for longer than forget_after are dropped, their series staled.
        let forgotten: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| {
                a.connection.is_none() && now_ms - a.last_seen_ms >= forget.as_millis() as i64
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &forgotten {
            if let Some(agent) = self.agents.remove(id) {
                tracing::info!(agent = %id, "agent forgotten after forget_after");
                for name in ["sonde_agent_up", "sonde_agent_last_seen_timestamp_seconds"] {
                    out.push(sample(name, &[("agent", id)], ts, stale_nan()));
                }
                out.push(SeriesSample {
                    labels: info_labels(id, &agent.labels),
                    timestamp_ms: ts,
                    value: stale_nan(),
                });
            }
        }
        let local: BTreeSet<String> = self
            .agents
            .values()
            .flat_map(|a| a.local_jobs.iter().cloned())
            .collect();
        self.jobs
            .retain(|name, j| j.config.is_some() || local.contains(name));
        let job_names: Vec<String> = self.jobs.keys().cloned().collect();
        for name in job_names {
            let states: Vec<TargetState> = self
                .entries
                .range((name.clone(), String::new())..)
                .take_while(|(k, _)| k.0 == name)
                .map(|(_, e)| e.merged.map_or(TargetState::Missing, |m| m.state))
                .collect();
            let configured_targets = self.configured_targets(&name);
            let target_count = configured_targets.max(states.len());
            let Some(job) = self.jobs.get_mut(&name) else {
                continue;
            };
            // Configured targets with no entry yet have no fresh result either.
            let missing = merge::job_missing(
                states.iter().copied().chain(std::iter::repeat_n(
                    TargetState::Missing,
                    configured_targets.saturating_sub(states.len()),
                )),
                job.expected_since_ms,
                now_ms,
                grace,
            );
            if missing != job.missing {
                tracing::warn!(job = %name, missing, "job missing state changed");
            }
            job.missing = missing;
            out.push(sample(
                "sonde_job_missing",
                &[("job", &name)],
                ts,
                f64::from(u8::from(missing)),
            ));
            out.push(sample(
                "sonde_job_targets",
                &[("job", &name)],
                ts,
                target_count as f64,
            ));
        }
        for (id, agent) in &self.agents {
            let up = agent.is_up(now_ms, grace);
            out.push(sample(
                "sonde_agent_up",
                &[("agent", id)],
                ts,
                f64::from(u8::from(up)),
            ));
            out.push(sample(
                "sonde_agent_last_seen_timestamp_seconds",
                &[("agent", id)],
                ts,
                agent.last_seen_at(now_ms) as f64 / 1000.0,
            ));
            out.push(SeriesSample {
                labels: info_labels(id, &agent.labels),
                timestamp_ms: ts,
                value: 1.0,
            });
        }
        // An agent gone past missing_after: its per-target series end now, so that
        // dashboards and absent() see it at once rather than after 5 minutes.
        let gone: Vec<String> = self
            .agents
            .iter_mut()
            .filter_map(|(id, a)| {
                let up = a.is_up(now_ms, grace);
                let newly_gone = !up && !a.series_staled;
                a.series_staled = !up;
                newly_gone.then(|| id.clone())
            })
            .collect();
        for id in &gone {
            for entry in self.entries.values() {
                if let Some(view) = entry.views.get(id) {
                    stale_agent_series(entry, id, view, now_ms, out);
                }
            }
        }
        forgotten
    }
}

/// Staleness markers for every series one agent wrote for one target.
fn stale_agent_series(
    entry: &TargetEntry,
    agent: &str,
    view: &LastResult,
    now_ms: i64,
    out: &mut Vec<SeriesSample>,
) {
    let ts = now_ms.max(view.timestamp_ms + 1);
    for (name, labels, _) in &view.samples {
        out.push(SeriesSample {
            labels: agent_series_labels(
                &entry.written_labels,
                &entry.key.0,
                &entry.key.1,
                agent,
                name,
                labels,
            ),
            timestamp_ms: ts,
            value: stale_nan(),
        });
    }
}

/// The labels of a per-agent probe series: target labels, `job`, `instance`, `agent`,
/// the sample's own labels (which cannot override those three), and `__name__`.
fn agent_series_labels(
    target_labels: &Labels,
    job: &str,
    instance: &str,
    agent: &str,
    name: &str,
    sample_labels: &[(String, String)],
) -> Vec<(String, String)> {
    let mut series: Vec<(String, String)> = target_labels
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "job" | "instance" | "agent"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    series.push(("job".into(), job.to_string()));
    series.push(("instance".into(), instance.to_string()));
    series.push(("agent".into(), agent.to_string()));
    for (k, v) in sample_labels {
        if !matches!(k.as_str(), "job" | "instance" | "agent") {
            series.retain(|(x, _)| x != k);
            series.push((k.clone(), v.clone()));
        }
    }
    series.push(("__name__".into(), name.to_string()));
    series
}

fn sample(name: &str, labels: &[(&str, &str)], ts: i64, value: f64) -> SeriesSample {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.push(("__name__".into(), name.to_string()));
    SeriesSample {
        labels: l,
        timestamp_ms: ts,
        value,
    }
}

fn info_labels(agent: &str, labels: &Labels) -> Vec<(String, String)> {
    let mut l = agent_info_labels(agent, labels);
    l.push(("__name__".into(), "sonde_agent_info".into()));
    l
}

/// The labels of `sonde_agent_info`: the agent's own labels, then `agent`, which wins.
pub fn agent_info_labels(agent: &str, labels: &Labels) -> Vec<(String, String)> {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != "agent")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    l.push(("agent".into(), agent.to_string()));
    l
}

/// A target's labels: its group labels, then `job` and `instance`, which win.
fn target_labels(target: &Target) -> Vec<(String, String)> {
    let mut l: Vec<(String, String)> = target
        .labels
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "job" | "instance"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    l.push(("job".into(), target.job.clone()));
    l.push(("instance".into(), target.instance.clone()));
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_proto::config::from_yaml_str;
    use std::path::Path;

    struct Recorder(std::sync::Mutex<Vec<SeriesSample>>, crate::store::Store);

    impl Default for Recorder {
        fn default() -> Self {
            Self(
                Default::default(),
                crate::store::Store::in_memory().unwrap(),
            )
        }
    }

    impl Output for Recorder {
        fn commit(&self, samples: &[SeriesSample], change: StateChange<'_>) -> Result<(), String> {
            self.1.with_tx(|tx| change(tx))?;
            self.0.lock().unwrap().extend_from_slice(samples);
            Ok(())
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<SeriesSample> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn value_of(samples: &[SeriesSample], name: &str, pairs: &[(&str, &str)]) -> Vec<f64> {
        samples
            .iter()
            .filter(|s| {
                s.labels.iter().any(|(k, v)| k == "__name__" && v == name)
                    && pairs
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
            .collect()
    }

    const T0: i64 = 1_700_000_000_000;

    fn config(text: &str) -> Arc<AggregatorConfig> {
        let path = Path::new("t.yml");
        Arc::new(AggregatorConfig::from_file(path, from_yaml_str(path, text).unwrap()).unwrap())
    }

    const CONFIG: &str = r#"
global: {scrape_interval: 10s, scrape_timeout: 5s}
modules:
  tcp: {prober: tcp}
jobs:
  - job_name: web
    module: tcp
    static_configs: [{targets: ["127.0.0.1:80"], labels: {team: shop}}]
  - job_name: slow
    module: tcp
    interval: 5m
    static_configs: [{targets: ["127.0.0.1:81"]}]
  - job_name: alertmanager
    module: tcp
    agents: {region: mars}
    static_configs: [{targets: ["127.0.0.1:9093"]}]
fleet: {missing_after: 30s}
"#;

    fn hello(id: &str, region: &str) -> pb::Hello {
        pb::Hello {
            protocol_version: 1,
            agent_id: id.into(),
            labels: [("region".to_string(), region.to_string())]
                .into_iter()
                .collect(),
            version: "test".into(),
            local_jobs: vec![],
            last_acked_seq: 0,
        }
    }

    fn result(seq: u64, job: &str, instance: &str, ts: i64, success: bool) -> IncomingResult {
        IncomingResult {
            seq,
            job: job.into(),
            instance: instance.into(),
            timestamp_ms: ts,
            success,
            duration_seconds: 0.01,
            failure: String::new(),
            samples: vec![("probe_success".into(), vec![], f64::from(u8::from(success)))],
        }
    }

    fn setup() -> (
        Hub,
        Arc<Recorder>,
        mpsc::Receiver<Result<AggregatorMessage, tonic::Status>>,
    ) {
        let rec = Arc::new(Recorder::default());
        let hub = Hub::new(config(CONFIG), rec.clone(), T0);
        let (tx, rx) = mpsc::channel(16);
        hub.connect(&hello("eu-1", "eu"), tx, T0);
        (hub, rec, rx)
    }

    #[test]
    fn local_job_timestamps_far_apart_do_not_overflow() {
        // A hostile agent's local-job results, a negative timestamp then the largest one:
        // their spacing used to overflow (a panic with overflow checks, a wrapped negative
        // spacing without). Found by fuzz/fleet_batch.
        let (hub, _rec, _rx) = setup();
        let (tx, _rx2) = mpsc::channel(16);
        let mut h = hello("edge", "eu");
        h.local_jobs = vec!["local".into()];
        hub.connect(&h, tx, T0);
        let batch = vec![
            result(1, "local", "127.0.0.1:22", -10, true),
            result(2, "local", "127.0.0.1:22", i64::MAX, true),
        ];
        assert_eq!(hub.results("edge", batch, T0), Ok(Some(2)));
        let state = hub.lock();
        let entry = &state.entries[&("local".to_string(), "127.0.0.1:22".to_string())];
        assert_eq!(entry.views["edge"].spacing_ms, Some(i64::MAX));
    }

    #[test]
    fn assignment_follows_the_selector() {
        let (_hub, _rec, mut rx) = setup();
        let Ok(AggregatorMessage {
            msg: Some(aggregator_message::Msg::Assignment(a)),
        }) = rx.try_recv().unwrap()
        else {
            panic!("expected an assignment first");
        };
        let jobs: Vec<_> = a.checks.iter().map(|c| c.job.as_str()).collect();
        assert_eq!(
            jobs,
            ["slow", "web"],
            "alertmanager selects region=mars only"
        );
        let module: sonde_proto::config::Module =
            serde_json::from_str(&a.checks[0].module_json).unwrap();
        assert_eq!(module.prober, sonde_proto::config::Prober::Tcp);
        assert_eq!(a.checks[0].interval_ms, 300_000);
    }

    #[test]
    fn results_become_per_agent_series_and_up() {
        let (hub, rec, _rx) = setup();
        assert_eq!(
            hub.results(
                "eu-1",
                vec![result(1, "web", "127.0.0.1:80", T0, true)],
                T0 + 5
            ),
            Ok(Some(1))
        );
        let out = rec.take();
        assert_eq!(
            value_of(
                &out,
                "probe_success",
                &[("agent", "eu-1"), ("team", "shop"), ("job", "web")]
            ),
            [1.0]
        );
        assert_eq!(
            value_of(
                &out,
                "up",
                &[
                    ("job", "web"),
                    ("instance", "127.0.0.1:80"),
                    ("team", "shop")
                ]
            ),
            [1.0]
        );
        assert!(
            value_of(&out, "up", &[("agent", "eu-1")]).is_empty(),
            "up carries no agent label"
        );
        assert_eq!(
            value_of(&out, "sonde_target_agents", &[("job", "web")]),
            [1.0]
        );

        // A replay of what is committed is acked again but writes nothing.
        assert_eq!(
            hub.results(
                "eu-1",
                vec![result(1, "web", "127.0.0.1:80", T0, true)],
                T0 + 6
            ),
            Ok(Some(1))
        );
        assert!(rec.take().is_empty());
        assert_eq!(hub.counters.results_deduplicated.load(Ordering::Relaxed), 1);

        // A result for a target nobody assigned is acked and dropped.
        assert_eq!(
            hub.results("eu-1", vec![result(2, "nope", "x", T0, true)], T0 + 7),
            Ok(Some(2))
        );
        assert!(value_of(&rec.take(), "probe_success", &[("job", "nope")]).is_empty());
    }

    #[test]
    fn stale_target_gets_one_staleness_marker() {
        let (hub, rec, _rx) = setup();
        hub.results(
            "eu-1",
            vec![result(1, "web", "127.0.0.1:80", T0, false)],
            T0,
        )
        .unwrap();
        assert_eq!(value_of(&rec.take(), "up", &[("job", "web")]), [0.0]);
        // Window: 2 × 10s + 5s = 25s.
        hub.tick(T0 + 24_000);
        assert!(
            value_of(&rec.take(), "up", &[("job", "web")])
                .iter()
                .all(|v| *v == 0.0)
        );
        hub.tick(T0 + 25_000);
        let up = value_of(&rec.take(), "up", &[("job", "web")]);
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].to_bits(), STALE_NAN_BITS);
        hub.tick(T0 + 26_000);
        assert!(
            value_of(&rec.take(), "up", &[("job", "web")]).is_empty(),
            "the marker is written once"
        );
    }

    #[test]
    fn up_is_rewritten_within_a_minute_for_slow_jobs() {
        let (hub, rec, _rx) = setup();
        hub.results(
            "eu-1",
            vec![result(1, "slow", "127.0.0.1:81", T0, true)],
            T0,
        )
        .unwrap();
        rec.take();
        let mut writes = Vec::new();
        for s in 1..=180 {
            hub.tick(T0 + s * 1000);
            if !value_of(&rec.take(), "up", &[("job", "slow")]).is_empty() {
                writes.push(s);
            }
        }
        assert!(!writes.is_empty());
        let mut last = 0;
        for w in writes {
            assert!(w - last <= 60, "gap of {}s between up samples", w - last);
            last = w;
        }
        assert!(180 - last <= 60);
    }

    #[test]
    fn job_without_agents_is_missing_after_grace() {
        let (hub, rec, _rx) = setup();
        hub.tick(T0 + 10_000);
        assert_eq!(
            value_of(&rec.take(), "sonde_job_missing", &[("job", "alertmanager")]),
            [0.0]
        );
        hub.tick(T0 + 31_000);
        let out = rec.take();
        assert_eq!(
            value_of(&out, "sonde_job_missing", &[("job", "alertmanager")]),
            [1.0]
        );
        assert!(value_of(&out, "up", &[("job", "alertmanager")]).is_empty());
    }

    #[test]
    fn disconnected_agent_is_down_after_grace() {
        let (hub, rec, _rx) = setup();
        hub.disconnect("eu-1", 1, T0 + 1_000);
        hub.tick(T0 + 20_000);
        assert_eq!(
            value_of(&rec.take(), "sonde_agent_up", &[("agent", "eu-1")]),
            [1.0]
        );
        hub.tick(T0 + 31_000);
        let out = rec.take();
        assert_eq!(
            value_of(&out, "sonde_agent_up", &[("agent", "eu-1")]),
            [0.0]
        );
        assert_eq!(
            value_of(
                &out,
                "sonde_agent_info",
                &[("agent", "eu-1"), ("region", "eu")]
            ),
            [1.0]
        );
    }

    #[test]
    fn removed_job_gets_staleness_markers_on_reload() {
        let (hub, rec, _rx) = setup();
        hub.results("eu-1", vec![result(1, "web", "127.0.0.1:80", T0, true)], T0)
            .unwrap();
        rec.take();
        let without_web = CONFIG.replace("  - job_name: web\n    module: tcp\n    static_configs: [{targets: [\"127.0.0.1:80\"], labels: {team: shop}}]\n", "");
        hub.reload(config(&without_web), T0 + 1000);
        let up = value_of(&rec.take(), "up", &[("job", "web"), ("team", "shop")]);
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].to_bits(), STALE_NAN_BITS);
    }

    #[test]
    fn merged_timestamps_strictly_increase() {
        let (hub, rec, _rx) = setup();
        let (tx, _rx2) = mpsc::channel(16);
        hub.connect(&hello("eu-2", "eu"), tx, T0);
        hub.results("eu-1", vec![result(1, "web", "127.0.0.1:80", T0, true)], T0)
            .unwrap();
        hub.results("eu-2", vec![result(1, "web", "127.0.0.1:80", T0, true)], T0)
            .unwrap();
        let ts: Vec<i64> = rec
            .take()
            .into_iter()
            .filter(|s| s.labels.iter().any(|(k, v)| k == "__name__" && v == "up"))
            .map(|s| s.timestamp_ms)
            .collect();
        assert_eq!(ts.len(), 2);
        assert!(ts[1] > ts[0]);
    }

    #[test]
    fn gone_agent_series_get_staleness_markers_once() {
        let (hub, rec, _rx) = setup();
        hub.results("eu-1", vec![result(1, "web", "127.0.0.1:80", T0, true)], T0)
            .unwrap();
        hub.disconnect("eu-1", 1, T0 + 1_000);
        rec.take();
        hub.tick(T0 + 20_000);
        assert!(value_of(&rec.take(), "probe_success", &[("agent", "eu-1")]).is_empty());
        hub.tick(T0 + 31_000);
        let marks = value_of(
            &rec.take(),
            "probe_success",
            &[("agent", "eu-1"), ("team", "shop")],
        );
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].to_bits(), STALE_NAN_BITS);
        hub.tick(T0 + 45_000);
        assert!(value_of(&rec.take(), "probe_success", &[("agent", "eu-1")]).is_empty());
    }

    #[test]
    fn restored_agents_keep_their_committed_sequence() {
        let rec = Arc::new(Recorder::default());
        let hub = Hub::new(config(CONFIG), rec.clone(), T0);
        hub.restore(
            vec![crate::store::StoredAgent {
                id: "eu-1".into(),
                labels: [("region".to_string(), "eu".to_string())]
                    .into_iter()
                    .collect(),
                local_jobs: vec![],
                committed_seq: 10,
                first_seen_ms: T0 - 1000,
                last_seen_ms: T0 - 500,
            }],
            vec![],
        );
        let (tx, _rx) = mpsc::channel(16);
        hub.connect(&hello("eu-1", "eu"), tx, T0);
        rec.take();
        let ack = hub
            .results(
                "eu-1",
                vec![result(10, "web", "127.0.0.1:80", T0, true)],
                T0,
            )
            .unwrap();
        assert_eq!(
            ack,
            Some(10),
            "a replay of a committed result is acked again"
        );
        assert!(rec.take().is_empty(), "and writes nothing");
        let ack = hub
            .results(
                "eu-1",
                vec![result(11, "web", "127.0.0.1:80", T0, true)],
                T0,
            )
            .unwrap();
        assert_eq!(ack, Some(11));
        assert_eq!(
            value_of(&rec.take(), "probe_success", &[("agent", "eu-1")]),
            [1.0]
        );
    }
}
