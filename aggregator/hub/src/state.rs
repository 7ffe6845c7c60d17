//! The aggregator's state machine: which agents are connected, what each last reported
//! for each target, which jobs are expected, and the series all of that turns into.
//!
//! No I/O and no locks: the ingest thread (see [`super`]) feeds it one input at a time,
//! and each input records what it produced in a [`Changes`]: the samples to write, the
//! durable changes to commit with them, and an undo log that puts the state back if the
//! commit fails. The rules themselves live in [`crate::merge`]; this module keeps state
//! and timestamps in order.

use crate::assignment;
use crate::budget::CheckBudget;
use crate::config::HubConfig;
use crate::history::{self, HistoryState};
use crate::labels::{self, TargetBase};
use crate::merge::{self, AgentView, Merged, TargetState};
use crate::model::{IncomingResult, SampleRef, Shape, Symbol, TargetKey, sample_weight, stale_nan};
use crate::placement;
use crate::refusals::{Reason, Refusals};
use crate::series::{Sample, SampleRow, Samples, Series};
use crate::targets::{Target, TargetSet};
use sonde_proto::config::{Labels, Quorum, ResolvedJob};
use sonde_proto::pb;
use sonde_proto::trace::Trace;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A merged series must be rewritten at least this often while its target is fresh, so
/// that it never falls out of Prometheus's 5-minute lookback, whatever the interval.
const MAX_REWRITE_PERIOD_MS: i64 = 60_000;

/// What an agent last reported for one target.
#[derive(Clone, Debug)]
pub struct LastResult {
    pub timestamp_ms: i64,
    pub success: bool,
    pub duration_seconds: f64,
    pub failure: String,
    pub trace: Option<Arc<Trace>>,
    /// Time between this result and the one before it from the same agent, for local
    /// jobs whose interval the aggregator does not know.
    pub spacing_ms: Option<i64>,
    /// The series the result's samples were written as, and their values (same order);
    /// shared with the samples handed to the outputs.
    pub series: Arc<[Series]>,
    pub values: Arc<[f64]>,
    /// What the samples' names and labels (job and instance included), and the trace,
    /// weigh (`fleet.limits.max_series_bytes`).
    pub bytes: usize,
    /// A result of a local job: it counts against the agent's fixed budget.
    pub local: bool,
    /// The result's shape when every sample of it was kept: a later result of the same
    /// shape under the same config (`config_epoch`) has the same series.
    shape: Option<Arc<Shape>>,
    config_epoch: u64,
    /// The target labels `series` were built with.
    base: TargetBase,
    /// This minute's probes, not yet in the history (written once the minute is over).
    pub bucket: Option<history::Bucket>,
}

/// The three merged series of a target, built once per label set.
#[derive(Debug)]
pub struct MergedSeries {
    pub up: Series,
    pub agents: Series,
    pub succeeding: Series,
}

impl MergedSeries {
    fn new(base: &TargetBase) -> Self {
        Self {
            up: base.merged("up"),
            agents: base.merged("sonde_target_agents"),
            succeeding: base.merged("sonde_target_agents_succeeding"),
        }
    }
}

#[derive(Clone)]
pub struct TargetEntry {
    /// (job, instance), shared with the undo log instead of copied into it.
    pub key: Arc<TargetKey>,
    pub views: BTreeMap<Arc<str>, Arc<LastResult>>,
    pub merged: Option<Merged>,
    last_written_ms: i64,
    /// True while an `up` sample is live in the receivers (so a staleness marker is owed
    /// when the target goes missing).
    up_live: bool,
    /// The state last recorded in the history.
    pub history_state: Option<HistoryState>,
    /// When the passing of time alone can next change what [`State::evaluate`] does for
    /// this target (a view going stale, the periodic rewrite); until then the
    /// once-a-second evaluation skips it. `i64::MIN`: at the next tick.
    next_evaluation_ms: i64,
    /// The target labels its series are written with, and those series' shared part.
    labels: Arc<Labels>,
    pub base: TargetBase,
    pub merged_series: Arc<MergedSeries>,
}

/// A result of a target refused, for the status page.
#[derive(Clone, Debug)]
pub struct RefusedNote {
    pub at_ms: i64,
    pub reason: Reason,
    pub detail: Arc<str>,
}

/// Agents whose refused results one target's row shows.
const MAX_REFUSED_NOTES: usize = 8;

/// Per target, the last result refused of each agent that had one refused since its
/// last accepted result there.
pub type RefusedNotes = BTreeMap<TargetKey, BTreeMap<Arc<str>, RefusedNote>>;

impl TargetEntry {
    /// The entry of `target` under `key` (the target's own job and instance, or for a
    /// local job the key its agent owns it under).
    fn new(key: Arc<TargetKey>, target: &Target) -> Self {
        let base = TargetBase::new(&target.job, &target.instance, &target.labels);
        Self {
            merged_series: Arc::new(MergedSeries::new(&base)),
            base,
            labels: Arc::new(target.labels.clone()),
            key,
            views: BTreeMap::new(),
            merged: None,
            last_written_ms: 0,
            up_live: false,
            history_state: None,
            next_evaluation_ms: i64::MIN,
        }
    }

    /// Follows a change of the target's labels (file_sd): later series carry the new ones.
    fn relabel(&mut self, target: &Target) {
        if *self.labels != target.labels {
            *self = Self {
                views: std::mem::take(&mut self.views),
                merged: self.merged,
                last_written_ms: self.last_written_ms,
                up_live: self.up_live,
                history_state: self.history_state,
                ..Self::new(self.key.clone(), target)
            };
        }
    }
}

/// What [`TargetEntry`] records about its last write, saved before a write so that a
/// failed commit can put it back.
#[derive(Clone)]
struct Written {
    merged: Option<Merged>,
    last_written_ms: i64,
    up_live: bool,
    history_state: Option<HistoryState>,
}

/// (target, agent, the view before).
type ViewBefore = (Arc<TargetKey>, Arc<str>, Option<Arc<LastResult>>);

/// How to put the state back as it was before a group whose commit failed: the
/// in-memory state may only show what the store holds.
#[derive(Default)]
pub struct Undo {
    /// (target, agent, the view before), in the order they were replaced.
    views: Vec<ViewBefore>,
    /// Entries created.
    created: Vec<Arc<TargetKey>>,
    written: Vec<(Arc<TargetKey>, Written)>,
    /// (agent, what it held before).
    series: Vec<(Arc<str>, Held)>,
    /// Local targets first seen.
    local_targets: Vec<(String, (String, String))>,
    /// (agent, committed sequence before).
    committed: Vec<(String, u64)>,
    last_meta_ms: Option<i64>,
    jobs_written: Option<BTreeSet<String>>,
    /// (agent, `series_staled` before).
    staled: Vec<(String, bool)>,
    forgotten: Vec<(String, AgentEntry)>,
    retired: Vec<((String, String), TargetEntry)>,
}

/// An agent as remembered across restarts.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredAgent {
    pub id: String,
    pub labels: Labels,
    pub local_jobs: Vec<String>,
    pub committed_seq: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// Counters for `/metrics`, counted by the inputs as they are applied.
#[derive(Default)]
pub struct HubCounters {
    pub results_received: AtomicU64,
    pub results_deduplicated: AtomicU64,
    pub results_unexpected: AtomicU64,
    pub agent_connects: AtomicU64,
    pub agents_refused: AtomicU64,
    /// Groups committed, and the commands they answered (group commit at work).
    pub commits: AtomicU64,
    pub committed_commands: AtomicU64,
}

/// Changes to the durable state that must commit together with a group's samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Durable {
    /// Agents to save (insert or replace), by id.
    pub agents: BTreeMap<String, StoredAgent>,
    /// Agents to delete.
    pub forgotten: Vec<String>,
    /// Every job and since when it is expected (replaces the table), when not empty.
    pub jobs: Vec<(String, i64)>,
    /// State changes and finished response-time buckets.
    pub history: history::Writes,
}

impl Durable {
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
            && self.forgotten.is_empty()
            && self.jobs.is_empty()
            && self.history.is_empty()
    }
}

/// What the caller must do on an agent's stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Outgoing {
    /// Send the agent its new assignment, in parts, on stream `connection`. If the
    /// stream cannot take them, the caller drops it and tells [`State::stream_lost`].
    Assignment {
        agent: String,
        connection: u64,
        parts: Vec<pb::AggregatorMessage>,
    },
    /// End stream `connection` of the agent, for `reason` (a newer stream of the same
    /// agent, a revoked token).
    End {
        agent: String,
        connection: u64,
        reason: String,
    },
}

/// What the inputs applied since the last commit produced.
#[derive(Default)]
pub struct Changes {
    pub out: Samples,
    pub durable: Durable,
    pub undo: Undo,
    /// What to send or end on the agents' streams; not undone by a failed commit (the
    /// assignment generations it carries stay counted).
    pub outgoing: Vec<Outgoing>,
}

pub struct AgentEntry {
    pub labels: Labels,
    pub version: String,
    pub local_jobs: Vec<String>,
    pub connection: Option<u64>,
    /// The token the current stream authenticated with (`None`: anonymous).
    credential: Option<String>,
    /// The stream the agent last connected on, until it ends: what a newer stream of
    /// the same agent, or a revoked token, ends ([`Outgoing::End`]).
    open_stream: Option<u64>,
    /// Agent clock minus ours, from the last heartbeat.
    pub clock_skew_ms: Option<i64>,
    /// The `last_acked_seq` of the current stream's Hello: by the agent's own account
    /// everything up to it was acked, so it cannot send it again as new.
    hello_acked_seq: u64,
    /// Samples held in this agent's latest results.
    pub series: usize,
    /// What their names and labels weigh.
    pub series_bytes: usize,
    /// Of those, the samples and bytes of its local jobs' results: what
    /// `fleet.limits.max_series` and `max_series_bytes` bound.
    local_series: usize,
    local_bytes: usize,
    /// Distinct targets of this agent's local jobs (`fleet.limits.max_local_targets`).
    local_targets: HashSet<(String, String)>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub committed_seq: u64,
    pub generation: u64,
    pub checks: usize,
    /// True once the agent's series got staleness markers for being gone.
    series_staled: bool,
    /// A fingerprint of the last assignment sent on the current stream (`None`: none
    /// yet), so that an unchanged plan is not sent again; a hash rather than a copy, as
    /// a thousand agents with a thousand checks each would hold a million checks.
    last_assignment: Option<u64>,
    /// What the agent reported doing with its latest assignment.
    pub assignment_status: assignment::AssignmentStatus,
    /// The agent id as the views key it.
    id: Arc<str>,
}

impl AgentEntry {
    /// An agent as known from its labels, jobs, times and committed sequence: not
    /// connected, nothing held yet.
    fn known(
        id: &str,
        labels: Labels,
        local_jobs: Vec<String>,
        first_seen_ms: i64,
        last_seen_ms: i64,
        committed_seq: u64,
    ) -> Self {
        Self {
            labels,
            version: String::new(),
            local_jobs,
            connection: None,
            credential: None,
            open_stream: None,
            clock_skew_ms: None,
            hello_acked_seq: 0,
            series: 0,
            series_bytes: 0,
            local_series: 0,
            local_bytes: 0,
            local_targets: HashSet::new(),
            first_seen_ms,
            last_seen_ms,
            committed_seq,
            generation: 0,
            checks: 0,
            series_staled: false,
            last_assignment: None,
            assignment_status: assignment::AssignmentStatus::None,
            id: Arc::from(id),
        }
    }

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

    fn held(&self) -> Held {
        Held {
            series: self.series,
            bytes: self.series_bytes,
            local_series: self.local_series,
            local_bytes: self.local_bytes,
        }
    }

    fn set_held(&mut self, held: Held) {
        self.series = held.series;
        self.series_bytes = held.bytes;
        self.local_series = held.local_series;
        self.local_bytes = held.local_bytes;
    }

    /// Stops counting `view`, gone.
    fn release(&mut self, view: &LastResult) {
        let mut held = self.held();
        held.take(view);
        self.set_held(held);
    }

    fn stored(&self) -> StoredAgent {
        StoredAgent {
            id: self.id.to_string(),
            labels: self.labels.clone(),
            local_jobs: self.local_jobs.clone(),
            committed_seq: self.committed_seq,
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
        }
    }
}

/// What an agent's views hold: all of them, and of those its local jobs'.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub series: usize,
    pub bytes: usize,
    pub local_series: usize,
    pub local_bytes: usize,
}

impl Held {
    /// Stops counting `view`.
    fn take(&mut self, view: &LastResult) {
        self.series = self.series.saturating_sub(view.values.len());
        self.bytes = self.bytes.saturating_sub(view.bytes);
        if view.local {
            self.local_series = self.local_series.saturating_sub(view.values.len());
            self.local_bytes = self.local_bytes.saturating_sub(view.bytes);
        }
    }

    /// Counts a view of `series` samples weighing `bytes`.
    fn add(&mut self, series: usize, bytes: usize, local: bool) {
        self.series += series;
        self.bytes += bytes;
        if local {
            self.local_series += series;
            self.local_bytes += bytes;
        }
    }
}

/// Where a result is recorded, as [`State::admissible`] found it.
struct Admitted {
    target: Arc<Target>,
    /// The key of its entry: the result's job and instance, or for a local job that is
    /// not shared, a key of the declaring agent's own (see [`owned_instance`]).
    key: TargetKey,
    /// What a result of an assigned check may weigh; `None` for a local job's, which
    /// weighs against the agent's fixed budget.
    budget: Option<CheckBudget>,
}

/// The entry key's instance of a local job's target owned by `agent`: the agent's id,
/// quoted as Rust quotes strings (so that no other (instance, agent) gives the same
/// key: a quoted string ends at its first unescaped quote), after the instance.
pub fn owned_instance(instance: &str, agent: &str) -> String {
    format!("{instance} @{agent:?}")
}

#[derive(Clone)]
pub struct JobEntry {
    pub expected_since_ms: i64,
    /// `None` for a job that only exists as an agent's local job.
    pub config: Option<ResolvedJob>,
    pub missing: bool,
}

pub struct State {
    pub config: Arc<HubConfig>,
    pub targets: Arc<TargetSet>,
    pub entries: BTreeMap<(String, String), TargetEntry>,
    pub agents: BTreeMap<String, AgentEntry>,
    pub jobs: BTreeMap<String, JobEntry>,
    generation: u64,
    next_connection: u64,
    /// Last timestamp written per merged series key, so each write is strictly later.
    last_meta_ms: i64,
    /// Each job's agent selector before the last reload: results for checks assigned
    /// under it may still be in flight.
    previous_selectors: BTreeMap<String, Labels>,
    /// Targets removed by a reload whose staleness markers are not committed yet.
    retired: BTreeMap<(String, String), TargetEntry>,
    /// Agents that may be given targets of a job with `agents_per_target`: connected,
    /// or gone for less than `fleet.missing_after`.
    placeable: BTreeSet<String>,
    /// Every agent's assignment is due again (at the next tick).
    replan: bool,
    /// The minute up to which finished response-time buckets were handed to the history.
    buckets_flushed_ms: i64,
    /// Jobs whose `sonde_job_*` series are live in the receivers: a job that leaves
    /// gets staleness markers for them, as its targets' `up` does.
    jobs_written: BTreeSet<String>,
    /// Counts the configs applied: a view's series are reused for a result of the same
    /// shape only under the config they were checked against.
    config_epoch: u64,
    /// What was last refused of each known target, per agent, for the status page.
    pub refused_notes: RefusedNotes,
}

impl State {
    pub fn new(config: Arc<HubConfig>, targets: TargetSet, now_ms: i64) -> Self {
        let mut state = State {
            config: config.clone(),
            targets: Arc::new(TargetSet::new()),
            entries: BTreeMap::new(),
            agents: BTreeMap::new(),
            jobs: BTreeMap::new(),
            generation: 0,
            next_connection: 1,
            last_meta_ms: 0,
            previous_selectors: BTreeMap::new(),
            retired: BTreeMap::new(),
            placeable: BTreeSet::new(),
            replan: false,
            jobs_written: BTreeSet::new(),
            config_epoch: 0,
            refused_notes: BTreeMap::new(),
            buckets_flushed_ms: now_ms.div_euclid(history::MINUTE_MS) * history::MINUTE_MS,
        };
        state.apply_config(config, targets, now_ms);
        state
    }

    /// Takes back what the store remembers from before a restart: agents (disconnected
    /// until they say hello again, with their committed sequence numbers) and when each
    /// job started being expected.
    pub fn restore(&mut self, agents: Vec<StoredAgent>, jobs: Vec<(String, i64)>) {
        for a in agents {
            for job in &a.local_jobs {
                self.jobs.entry(job.clone()).or_insert(JobEntry {
                    expected_since_ms: a.first_seen_ms,
                    config: None,
                    missing: false,
                });
            }
            self.agents.insert(
                a.id.clone(),
                AgentEntry::known(
                    &a.id,
                    a.labels,
                    a.local_jobs,
                    a.first_seen_ms,
                    a.last_seen_ms,
                    a.committed_seq,
                ),
            );
        }
        for (name, since) in jobs {
            if let Some(job) = self.jobs.get_mut(&name) {
                job.expected_since_ms = job.expected_since_ms.min(since);
            }
        }
    }

    /// An agent said hello (already authenticated, with `labels` the ones it may have):
    /// register it, queue its assignment in `ch.outgoing`, and return its connection id.
    /// A newer connection of the same agent replaces the older one, which is ended.
    /// Without tokens, a new agent id past `fleet.limits.max_agents`, or local jobs past
    /// `max_anonymous_local_jobs`, are refused (`Err`: why), so that made-up ids cannot
    /// grow the aggregator without bound.
    pub fn connect(
        &mut self,
        hello: &pb::Hello,
        labels: Labels,
        credential: Option<String>,
        now_ms: i64,
        ch: &mut Changes,
    ) -> Result<u64, String> {
        let max_agents = self.config.limits.max_agents;
        if !self.config.auth_required
            && self.agents.len() >= max_agents
            && !self.agents.contains_key(&hello.agent_id)
        {
            return Err(format!(
                "fleet.limits.max_agents ({max_agents}) reached: this aggregator knows {} agents without tokens, each until fleet.forget_after ({}) after it was last seen; raise max_agents, or give each agent a token (fleet.auth)",
                self.agents.len(),
                sonde_proto::config::PromDuration(self.config.forget_after)
            ));
        }
        let configured: BTreeSet<&str> = self.config.jobs.iter().map(|j| j.name.as_str()).collect();
        // A local job cannot take over a configured one: its results would count for
        // targets the agent was never assigned.
        let mut local_jobs: Vec<String> = hello
            .local_jobs
            .iter()
            .filter(|j| !configured.contains(j.as_str()))
            .cloned()
            .collect();
        local_jobs.sort();
        local_jobs.dedup();
        if !self.config.auth_required {
            let max = self.config.limits.max_anonymous_local_jobs;
            let new = local_jobs
                .iter()
                .filter(|j| !self.jobs.contains_key(*j))
                .count();
            let known = self.jobs.values().filter(|j| j.config.is_none()).count();
            if new > 0 && known + new > max {
                return Err(format!(
                    "fleet.limits.max_anonymous_local_jobs ({max}) reached: agents without tokens declare {known} local jobs, this one {new} more; raise it, or give each agent a token (fleet.auth)"
                ));
            }
        }
        let connection = self.next_connection;
        self.next_connection += 1;
        let info_changed;
        {
            let entry = self
                .agents
                .entry(hello.agent_id.clone())
                .or_insert_with(|| {
                    AgentEntry::known(
                        &hello.agent_id,
                        labels.clone(),
                        Vec::new(),
                        now_ms,
                        now_ms,
                        0,
                    )
                });
            if entry.connection.is_some() {
                tracing::warn!(agent = %crate::refusals::loggable(&hello.agent_id), "agent connected again; the newer stream replaces the older one");
            }
            if let Some(old) = entry.open_stream.take() {
                ch.outgoing.push(Outgoing::End {
                    agent: hello.agent_id.clone(),
                    connection: old,
                    reason: "replaced by a newer stream of the same agent".into(),
                });
            }
            info_changed = entry.labels != labels;
            entry.labels = labels;
            entry.version = hello.version.chars().take(64).collect();
            entry.local_jobs = local_jobs.clone();
            entry.connection = Some(connection);
            entry.credential = credential;
            entry.open_stream = Some(connection);
            entry.hello_acked_seq = hello.last_acked_seq;
            if hello.last_acked_seq > entry.committed_seq && entry.committed_seq > 0 {
                tracing::warn!(
                    agent = %crate::refusals::loggable(&hello.agent_id),
                    agent_says = hello.last_acked_seq,
                    committed = entry.committed_seq,
                    "the agent says more was acked than this aggregator committed (was its store replaced?)"
                );
            }
            entry.series_staled = false;
            entry.last_seen_ms = now_ms;
            // A fresh stream must receive its assignment even if it equals the last one.
            entry.last_assignment = None;
            ch.durable
                .agents
                .insert(hello.agent_id.clone(), entry.stored());
        }
        for job in &local_jobs {
            self.jobs.entry(job.clone()).or_insert(JobEntry {
                expected_since_ms: now_ms,
                config: None,
                missing: false,
            });
        }
        if (self.update_placeable(now_ms) || info_changed) && self.has_spread_jobs() {
            // Its arrival (or new labels) moves targets of other agents to it: their
            // new assignments go out with the next tick, so that a thousand agents
            // connecting at once cost one plan per second, not one each.
            self.replan = true;
        }
        self.send_assignments(Some(&hello.agent_id), ch);
        if info_changed {
            self.write_meta(now_ms, ch);
        }
        Ok(connection)
    }

    /// Stream `connection` of `agent` could not take its assignment (gone, or hopelessly
    /// behind) and was dropped: the agent counts as disconnected, and gets a fresh
    /// assignment with its next hello.
    pub fn stream_lost(&mut self, agent: &str, connection: u64) {
        if let Some(entry) = self.agents.get_mut(agent)
            && entry.connection == Some(connection)
        {
            tracing::warn!(agent = %crate::refusals::loggable(agent), "cannot send the assignment; closing the stream");
            entry.connection = None;
        }
    }

    /// The stream of `connection` ended.
    pub fn disconnect(&mut self, agent: &str, connection: u64, now_ms: i64) {
        if let Some(entry) = self.agents.get_mut(agent)
            && entry.connection == Some(connection)
        {
            entry.connection = None;
            entry.open_stream = None;
            entry.credential = None;
            entry.last_seen_ms = now_ms;
        }
    }

    /// What `agent` reports doing with an assignment. A report on another generation
    /// than the one last sent (a late report of an older one) is ignored. A refusal is
    /// logged once per agent and generation.
    pub fn assignment_report(&mut self, agent: &str, report: &pb::AssignmentReport) {
        let Some(entry) = self.agents.get_mut(agent) else {
            return;
        };
        if report.generation != entry.generation {
            return;
        }
        let status = assignment::AssignmentStatus::from_report(report);
        // Only the first report on a generation is logged: an agent repeating (or
        // varying) its reports cannot fill the log.
        let first = matches!(
            entry.assignment_status,
            assignment::AssignmentStatus::Sent { .. }
        );
        match &status {
            _ if !first => {}
            assignment::AssignmentStatus::Refused { generation, error } => {
                tracing::warn!(agent = %crate::refusals::loggable(agent), generation, reason = %error, "the agent refused its assignment and keeps running its previous checks");
            }
            assignment::AssignmentStatus::Applied { refused, .. } if !refused.is_empty() => {
                tracing::info!(agent = %crate::refusals::loggable(agent), "{}", status.text());
            }
            _ => {}
        }
        entry.assignment_status = status;
    }

    /// Forgets every stream (at shutdown).
    pub fn disconnect_all(&mut self, now_ms: i64) {
        for entry in self.agents.values_mut() {
            if entry.connection.take().is_some() {
                entry.open_stream = None;
                entry.last_seen_ms = now_ms;
            }
        }
    }

    /// A heartbeat stamped `agent_time_ms` by the agent's clock.
    pub fn heartbeat(&mut self, agent: &str, agent_time_ms: i64, now_ms: i64) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.last_seen_ms = now_ms;
            entry.clock_skew_ms = Some(agent_time_ms.saturating_sub(now_ms));
        }
    }

    /// Takes a batch of results from `agent` and returns the sequence number to ack
    /// once `ch` is committed. Results at or below what was already committed are
    /// replays and are dropped; results the agent may not send (see DESIGN's trust
    /// model) are refused, counted, and acked, since sending them again cannot make them
    /// acceptable.
    pub fn results(
        &mut self,
        agent: &str,
        batch: &[IncomingResult],
        now_ms: i64,
        ch: &mut Changes,
        counters: &HubCounters,
        refusals: &Refusals,
    ) -> Option<u64> {
        let mut refused: BTreeMap<Reason, (u64, String)> = BTreeMap::new();
        let (committed, hello_acked) = self
            .agents
            .get(agent)
            .map(|a| (a.committed_seq, a.hello_acked_seq))?;
        let skew = self.config.max_clock_skew.as_millis() as i64;
        let mut last = committed;
        let mut ack = None;
        for result in batch {
            counters.results_received.fetch_add(1, Ordering::Relaxed);
            if result.seq <= last {
                counters
                    .results_deduplicated
                    .fetch_add(1, Ordering::Relaxed);
                ack = Some(ack.unwrap_or(last).max(committed));
                continue;
            }
            last = result.seq;
            ack = Some(result.seq);
            let verdict = match result.refused {
                Some(reason) => Err((reason, format!("result for {}", describe(result)))),
                None if result.seq <= hello_acked => Err((
                    Reason::BadSequence,
                    format!(
                        "result {} for {}, at or below the last_acked_seq {hello_acked} of the agent's Hello",
                        result.seq,
                        describe(result)
                    ),
                )),
                None if result.timestamp_ms < 0
                    || result.timestamp_ms > now_ms.saturating_add(skew) =>
                {
                    Err((
                        Reason::FutureTimestamp,
                        format!(
                            "result for {} stamped {} ms, now is {now_ms} ms (fleet.max_clock_skew {skew} ms)",
                            describe(result),
                            result.timestamp_ms
                        ),
                    ))
                }
                None => self.accept(agent, result, now_ms, ch, &mut refused),
            };
            if let Err((reason, detail)) = verdict {
                self.note_refused(agent, result, reason, &detail, now_ms);
                let e = refused.entry(reason).or_insert((0, detail));
                e.0 += 1;
            }
        }
        if last > committed
            && let Some(a) = self.agents.get_mut(agent)
        {
            ch.undo.committed.push((agent.to_string(), a.committed_seq));
            a.committed_seq = last;
            a.last_seen_ms = now_ms;
            ch.durable.agents.insert(agent.to_string(), a.stored());
        }
        for (reason, (n, detail)) in refused {
            counters.results_unexpected.fetch_add(
                u64::from(reason == Reason::Unassigned) * n,
                Ordering::Relaxed,
            );
            refusals.refuse(agent, reason, n, || detail);
        }
        ack
    }

    /// Keeps `detail` for the status page's row of the target `r` names, when the
    /// target is known (configured, or one an agent's results made): a hostile agent's
    /// made-up targets get no row.
    fn note_refused(
        &mut self,
        agent: &str,
        r: &IncomingResult,
        reason: Reason,
        detail: &str,
        now_ms: i64,
    ) {
        let key = (r.job.clone(), r.instance.clone());
        let key = if self.targets.contains_key(&key) || self.entries.contains_key(&key) {
            key
        } else {
            let owned = (r.job.clone(), owned_instance(&r.instance, agent));
            if !self.entries.contains_key(&owned) {
                return;
            }
            owned
        };
        let notes = self.refused_notes.entry(key).or_default();
        if !notes.contains_key(agent)
            && notes.len() >= MAX_REFUSED_NOTES
            && let Some(oldest) = notes
                .iter()
                .min_by_key(|(_, n)| n.at_ms)
                .map(|(a, _)| a.clone())
        {
            notes.remove(&oldest);
        }
        notes.insert(
            Arc::from(agent),
            RefusedNote {
                at_ms: now_ms,
                reason,
                detail: Arc::from(detail),
            },
        );
    }

    /// Re-evaluates freshness and missing jobs and agents; call about once a second.
    pub fn tick(&mut self, now_ms: i64, ch: &mut Changes) {
        if self.update_placeable(now_ms) && self.has_spread_jobs() {
            self.replan = true;
        }
        if std::mem::take(&mut self.replan) {
            self.send_assignments(None, ch);
        }
        self.write_retired(now_ms, ch);
        self.evaluate_all(now_ms, ch);
        let minute = now_ms.div_euclid(history::MINUTE_MS) * history::MINUTE_MS;
        if minute > self.buckets_flushed_ms {
            self.flush_buckets(minute, ch);
            self.buckets_flushed_ms = minute;
        }
        let meta_every = self.config.scrape_interval.as_millis() as i64;
        // A job's missing signal follows its targets' at once, not at the next periodic
        // write: `sonde_job_missing` turns 1 on the tick its last target goes missing.
        let job_changed = self
            .jobs
            .iter()
            .any(|(name, j)| self.job_is_missing(name, now_ms).0 != j.missing);
        if now_ms - self.last_meta_ms >= meta_every || job_changed {
            let forgotten = self.write_meta(now_ms, ch);
            ch.durable.forgotten.extend(forgotten);
            ch.durable.jobs = self
                .jobs
                .iter()
                .map(|(n, j)| (n.clone(), j.expected_since_ms))
                .collect();
        }
    }

    /// Applies a new config and the targets discovered under it: new jobs and targets,
    /// new assignments; what disappeared gets staleness markers so `absent()` fires at
    /// once. Streams whose token the new config no longer accepts (removed, or bound to
    /// other labels) are ended.
    pub fn reload(
        &mut self,
        config: Arc<HubConfig>,
        targets: TargetSet,
        now_ms: i64,
        ch: &mut Changes,
    ) {
        let removed = self.apply_config(config, targets, now_ms);
        for key in removed {
            if let Some(entry) = self.entries.remove(&key) {
                self.retired.insert(key, entry);
            }
        }
        self.write_retired(now_ms, ch);
        self.forget_refusals_of_gone_targets();
        self.revoke_credentials(ch);
        self.update_placeable(now_ms);
        self.replan = false;
        self.send_assignments(None, ch);
        self.write_meta(now_ms, ch);
    }

    /// Targets discovered anew (file_sd) under the current config (the caller drops
    /// what was discovered under a config a reload has replaced meanwhile).
    pub fn discovered(&mut self, targets: TargetSet, ch: &mut Changes) {
        if *self.targets == targets {
            return;
        }
        self.targets = Arc::new(targets);
        self.forget_refusals_of_gone_targets();
        self.send_assignments(None, ch);
    }

    fn forget_refusals_of_gone_targets(&mut self) {
        let (targets, entries) = (&self.targets, &self.entries);
        self.refused_notes
            .retain(|k, _| targets.contains_key(k) || entries.contains_key(k));
    }

    /// Installs `config`; returns the targets that no longer exist.
    fn apply_config(
        &mut self,
        config: Arc<HubConfig>,
        targets: TargetSet,
        now_ms: i64,
    ) -> Vec<(String, String)> {
        self.previous_selectors = self
            .config
            .jobs
            .iter()
            .map(|j| (j.name.clone(), j.config.agents.clone()))
            .collect();
        self.config = config;
        self.config_epoch += 1;
        // Freshness windows and quorums may have changed.
        self.evaluate_every_target();
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
        self.targets = Arc::new(targets);
        let removed: Vec<_> = self
            .entries
            .keys()
            .filter(|k| !self.targets.contains_key(*k) && !self.is_local_job(&k.0))
            .cloned()
            .collect();
        removed
    }

    /// Configured targets (static and file_sd) of `job`.
    fn configured_targets(&self, job: &str) -> usize {
        self.targets
            .range((job.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == job)
            .count()
    }

    fn is_local_job(&self, job: &str) -> bool {
        self.jobs.get(job).is_some_and(|j| j.config.is_none())
    }

    /// True when a job spreads its targets (`agents_per_target`), so that which agents
    /// are placeable decides assignments.
    fn has_spread_jobs(&self) -> bool {
        self.config
            .jobs
            .iter()
            .any(|j| j.config.agents_per_target.is_some())
    }

    /// Recomputes which agents may be given targets; true when that changed.
    fn update_placeable(&mut self, now_ms: i64) -> bool {
        let grace = self.config.missing_after;
        let placeable: BTreeSet<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.is_up(now_ms, grace))
            .map(|(id, _)| id.clone())
            .collect();
        if placeable == self.placeable {
            return false;
        }
        self.placeable = placeable;
        true
    }

    /// Every agent's checks, as (index of the job in the config, target): each job's
    /// targets to every agent its selector matches, or with `agents_per_target: K` to
    /// the K chosen among the placeable ones.
    fn plan(&self, only: Option<&str>) -> BTreeMap<String, Vec<(usize, Arc<Target>)>> {
        let mut plan: BTreeMap<String, Vec<(usize, Arc<Target>)>> = self
            .agents
            .iter()
            .filter(|(id, a)| a.connection.is_some() && only.is_none_or(|o| o == id.as_str()))
            .map(|(id, _)| (id.clone(), Vec::new()))
            .collect();
        if plan.is_empty() {
            return plan;
        }
        for (index, job) in self.config.jobs.iter().enumerate() {
            let targets = self
                .targets
                .range((job.name.clone(), String::new())..)
                .take_while(|(k, _)| k.0 == job.name)
                .map(|(_, t)| t);
            match job.config.agents_per_target {
                None => {
                    let receivers: Vec<String> = plan
                        .keys()
                        .filter(|id| {
                            self.agents
                                .get(*id)
                                .is_some_and(|a| job.config.selects(&a.labels))
                        })
                        .cloned()
                        .collect();
                    if receivers.is_empty() {
                        continue;
                    }
                    for t in targets {
                        for id in &receivers {
                            if let Some(v) = plan.get_mut(id) {
                                v.push((index, t.clone()));
                            }
                        }
                    }
                }
                Some(k) => {
                    let candidates: Vec<&str> = self
                        .placeable
                        .iter()
                        .filter(|id| {
                            self.agents
                                .get(*id)
                                .is_some_and(|a| job.config.selects(&a.labels))
                        })
                        .map(String::as_str)
                        .collect();
                    for t in targets {
                        for id in placement::choose(&t.job, &t.instance, &candidates, k as usize) {
                            if let Some(v) = plan.get_mut(id) {
                                v.push((index, t.clone()));
                            }
                        }
                    }
                }
            }
        }
        plan
    }

    /// Queues for each connected agent (or just `only`) its assignment when it changed,
    /// in parts under [`assignment::PART_BUDGET`] each.
    fn send_assignments(&mut self, only: Option<&str>, ch: &mut Changes) {
        let plan = self.plan(only);
        let config = self.config.clone();
        let planner = assignment::Planner::new(&config.jobs);
        let mut generation = self.generation;
        for (id, mut checks) in plan {
            checks.sort_by(|a, b| (&a.1.job, &a.1.instance).cmp(&(&b.1.job, &b.1.instance)));
            let Some(agent) = self.agents.get_mut(&id) else {
                continue;
            };
            let planned = planner.plan(checks.iter().map(|(j, t)| (&config.jobs[*j], &**t)));
            let fingerprint = fingerprint(&planned);
            if agent.last_assignment == Some(fingerprint) {
                continue;
            }
            let parts = match assignment::encode(generation + 1, &planned, assignment::PART_BUDGET)
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(agent = %crate::refusals::loggable(&id), error = %e, "cannot send this agent its assignment; it keeps its previous one");
                    continue;
                }
            };
            generation += 1;
            agent.generation = generation;
            agent.checks = planned.checks.len();
            agent.assignment_status = assignment::AssignmentStatus::Sent {
                generation,
                checks: planned.checks.len(),
            };
            agent.last_assignment = Some(fingerprint);
            if let Some(connection) = agent.connection {
                ch.outgoing.push(Outgoing::Assignment {
                    agent: id.clone(),
                    connection,
                    parts,
                });
            }
        }
        self.generation = generation;
    }

    /// The target a result of `agent` may report on: a target of a job whose selector
    /// (current, or until the next reload previous) matches the agent, or a target of
    /// one of its own local jobs. With `agents_per_target`, any matching agent may
    /// report: one that was moved off a target still delivers what it probed before.
    fn admissible(&self, agent: &str, key: &TargetKey) -> Result<Admitted, Reason> {
        let job = key.0.as_str();
        let Some(a) = self.agents.get(agent) else {
            return Err(Reason::Unassigned);
        };
        if let Some(target) = self.targets.get(key) {
            let config = self.jobs.get(job).and_then(|j| j.config.as_ref());
            let selected = config.is_some_and(|j| j.config.selects(&a.labels))
                || self
                    .previous_selectors
                    .get(job)
                    .is_some_and(|selector| selects(selector, &a.labels));
            return match config {
                Some(config) if selected => Ok(Admitted {
                    target: target.clone(),
                    key: key.clone(),
                    budget: Some(CheckBudget::of(&config.module, &self.config.limits)),
                }),
                _ => Err(Reason::Unassigned),
            };
        }
        if a.local_jobs.iter().any(|j| j == job) && self.is_local_job(job) {
            if key.1.len() > self.config.limits.max_instance_bytes.0 as usize {
                return Err(Reason::InstanceTooLong);
            }
            if !a.local_targets.contains(key)
                && a.local_targets.len() >= self.config.limits.max_local_targets
            {
                return Err(Reason::LocalLimit);
            }
            let shared = self.config.shared_local_jobs.contains(job);
            let (entry_key, labels) = if shared {
                (key.clone(), Labels::new())
            } else {
                (
                    (key.0.clone(), owned_instance(&key.1, agent)),
                    Labels::from([("agent".to_string(), agent.to_string())]),
                )
            };
            return Ok(Admitted {
                target: Arc::new(Target {
                    job: key.0.clone(),
                    instance: key.1.clone(),
                    labels,
                }),
                key: entry_key,
                budget: None,
            });
        }
        Err(Reason::Unassigned)
    }

    /// Records one result, or says why it is refused. Every change is noted in `ch.undo`.
    fn accept(
        &mut self,
        agent: &str,
        r: &IncomingResult,
        now_ms: i64,
        ch: &mut Changes,
        refused: &mut BTreeMap<Reason, (u64, String)>,
    ) -> Result<(), (Reason, String)> {
        let result_key = (r.job.clone(), r.instance.clone());
        let Admitted {
            target,
            key,
            budget,
        } = self.admissible(agent, &result_key).map_err(|reason| {
            let why = match reason {
                Reason::LocalLimit => format!(
                    "result for {}: the agent's local jobs already have fleet.limits.max_local_targets ({}) targets",
                    describe(r),
                    self.config.limits.max_local_targets
                ),
                Reason::InstanceTooLong => format!(
                    "result for {} (an instance of {} bytes): a local job's instance is at most fleet.limits.max_instance_bytes ({})",
                    describe(r),
                    r.instance.len(),
                    self.config.limits.max_instance_bytes
                ),
                _ => format!(
                    "result for {}, which is not assigned to this agent nor one of its local jobs",
                    describe(r)
                ),
            };
            (reason, why)
        })?;
        let local = budget.is_none();
        let previous = self
            .entries
            .get(&key)
            .and_then(|e| e.views.get(agent))
            .cloned();
        if previous
            .as_ref()
            .is_some_and(|p| r.timestamp_ms <= p.timestamp_ms)
        {
            // Older than what this agent already reported: it cannot change the present.
            return Ok(());
        }
        // The common case: the result has the shape of the view's last one (the same
        // symbols, so the same names and labels), which every check below passed under
        // the same config. Its series are then the previous result's.
        let same_shape = previous.as_ref().is_some_and(|p| {
            p.config_epoch == self.config_epoch
                && p.shape
                    .as_ref()
                    .is_some_and(|shape| Arc::ptr_eq(shape, &r.samples.shape))
        });
        // Otherwise: labels the aggregator sets on the series, a sample may not bring.
        let kept: Vec<SampleRef> = if same_shape {
            Vec::new()
        } else {
            let taken = |name: &str| {
                target.labels.contains_key(name) || self.config.external_labels.contains_key(name)
            };
            let kept: Vec<_> = r
                .samples
                .iter()
                .filter(|(_, labels, _)| !labels.iter().any(|(k, _)| taken(k)))
                .collect();
            if kept.len() < r.samples.len() {
                // Counted as refused samples; the result itself stands.
                let n = (r.samples.len() - kept.len()) as u64;
                let e = refused.entry(Reason::ReservedLabel).or_insert((
                    0,
                    format!(
                        "{n} samples of {} carry a label named like a target or external label",
                        describe(r)
                    ),
                ));
                e.0 += n;
            }
            kept
        };
        // The shape a later result may match: only one whose samples were all kept.
        let shape = (same_shape || kept.len() == r.samples.len()).then(|| r.samples.shape.clone());
        let (sample_count, names_weigh) = if same_shape {
            (r.samples.len(), r.samples.shape.bytes)
        } else {
            (
                kept.len(),
                kept.iter()
                    .map(|(name, labels, _)| sample_weight(name, labels))
                    .sum(),
            )
        };
        // Every series of the target carries its job and instance; a trace weighs
        // against the same bound as the series it comes with.
        let key_bytes = r.job.len() + r.instance.len();
        let samples_weigh =
            names_weigh + sample_count * key_bytes + r.trace.as_ref().map_or(0, |t| t.weight());
        let limits = self.config.limits;
        let module = self
            .jobs
            .get(&r.job)
            .and_then(|j| j.config.as_ref())
            .map_or("", |c| c.module_name.as_str());
        let Some(a) = self.agents.get_mut(agent) else {
            return Err((Reason::Unassigned, "result from an unknown agent".into()));
        };
        let mut held = a.held();
        if let Some(p) = &previous {
            held.take(p);
        }
        held.add(sample_count, samples_weigh, local);
        match budget {
            // A check the aggregator assigned brings its own budget: what its module
            // can produce. Only a result no honest prober sends goes past it.
            Some(budget) if !budget.allows(sample_count, samples_weigh, key_bytes) => {
                return Err((
                    Reason::SeriesLimit,
                    format!(
                        "result for {} has {sample_count} samples of {samples_weigh} bytes; a check of module {module:?} produces at most {} samples of {} bytes",
                        describe(r),
                        budget.samples,
                        budget.weight(key_bytes)
                    ),
                ));
            }
            Some(_) => {}
            None if held.local_series > limits.max_series
                || held.local_bytes as u64 > limits.max_series_bytes.0 =>
            {
                return Err((
                    Reason::SeriesLimit,
                    format!(
                        "result for {} would make the agent's local jobs hold {} series of {} bytes; fleet.limits.max_series is {}, max_series_bytes {}",
                        describe(r),
                        held.local_series,
                        held.local_bytes,
                        limits.max_series,
                        limits.max_series_bytes
                    ),
                ));
            }
            None => {}
        }
        ch.undo.series.push((a.id.clone(), a.held()));
        a.set_held(held);
        if local && a.local_targets.insert(result_key.clone()) {
            ch.undo
                .local_targets
                .push((agent.to_string(), result_key.clone()));
        }
        let agent_id = a.id.clone();
        if !self.entries.contains_key(&key) {
            let entry = TargetEntry::new(Arc::new(key.clone()), &target);
            ch.undo.created.push(entry.key.clone());
            self.entries.insert(key.clone(), entry);
        }
        let Some(entry) = self.entries.get_mut(&key) else {
            return Ok(());
        };
        entry.relabel(&target);
        if let Some(notes) = self.refused_notes.get_mut(&key) {
            notes.remove(&agent_id);
            if notes.is_empty() {
                self.refused_notes.remove(&key);
            }
        }
        let same_base = previous.as_ref().is_some_and(|p| p.base.same(&entry.base));
        let (series, values): (Arc<[Series]>, Arc<[f64]>) = match &previous {
            Some(p) if same_shape && same_base => {
                (p.series.clone(), r.samples.values.as_slice().into())
            }
            _ => {
                let samples: Vec<SampleRef> = if same_shape {
                    r.samples.iter().collect()
                } else {
                    kept
                };
                // The series of the previous result are reused where the sample is the
                // same: no label set is built for an unchanged sample.
                let base_len = entry.base.label_count();
                let reusable = |i: usize, name: &str, labels: &[(Symbol, Symbol)]| {
                    previous
                        .as_ref()
                        .filter(|_| same_base)
                        .and_then(|p| p.series.get(i))
                        .filter(|s| is_probe_series(s, base_len, name, labels))
                };
                let series = samples
                    .iter()
                    .enumerate()
                    .map(|(i, (name, labels, _))| match reusable(i, name, labels) {
                        Some(s) => s.clone(),
                        None => entry.base.probe(&agent_id, name, labels),
                    })
                    .collect();
                (series, samples.iter().map(|(_, _, v)| *v).collect())
            }
        };
        ch.out.push_row(SampleRow {
            series: series.clone(),
            timestamp_ms: r.timestamp_ms,
            values: values.clone(),
        });
        let previous_ts = previous.as_ref().map(|p| p.timestamp_ms);
        let mut bucket = match previous.as_ref().and_then(|p| p.bucket) {
            Some(b) if b.covers(r.timestamp_ms) => b,
            finished => {
                if let Some(b) = finished {
                    ch.durable
                        .history
                        .buckets
                        .push((key.clone(), agent_id.to_string(), b));
                }
                history::Bucket::starting(r.timestamp_ms)
            }
        };
        bucket.add(r.success, r.duration_seconds);
        // Merging walks every view of the target: with a thousand agents on each target,
        // doing it at every result made the merge O(agents²) per interval, most of the
        // ingest thread's time at that scale. A result that repeats its agent's fresh
        // verdict changes no count, and no other view has gone stale or come due for a
        // rewrite before `next_evaluation_ms`: the merge is then the one already written,
        // and is not redone. (A later timestamp only moves this view's staleness later,
        // so `next_evaluation_ms` stays a safe bound.)
        let merge_unchanged = previous.as_ref().is_some_and(|p| {
            p.success == r.success
                && entry.merged.is_some()
                && entry.last_written_ms != 0
                && now_ms < entry.next_evaluation_ms
                && self
                    .jobs
                    .get(&key.0)
                    .and_then(|j| j.config.as_ref())
                    .is_some_and(|c| merge::is_fresh(p.timestamp_ms, now_ms, c.freshness))
        });
        let before = entry.views.insert(
            agent_id.clone(),
            Arc::new(LastResult {
                timestamp_ms: r.timestamp_ms,
                success: r.success,
                duration_seconds: r.duration_seconds,
                failure: r.failure.chars().take(MAX_FAILURE_CHARS).collect(),
                trace: r.trace.clone(),
                // Saturating: both timestamps come from the agent (found by fuzz/fleet_batch).
                spacing_ms: previous_ts.map(|p| r.timestamp_ms.saturating_sub(p)),
                series,
                values,
                bytes: samples_weigh,
                local,
                shape,
                config_epoch: self.config_epoch,
                base: entry.base.clone(),
                bucket: Some(bucket),
            }),
        );
        ch.undo.views.push((entry.key.clone(), agent_id, before));
        if !merge_unchanged {
            self.evaluate(&key, now_ms, true, ch);
        }
        Ok(())
    }

    /// Puts back what `undo` recorded, newest change first.
    pub fn rollback(&mut self, undo: Undo) {
        self.evaluate_every_target();
        for (key, agent, before) in undo.views.into_iter().rev() {
            if let Some(entry) = self.entries.get_mut(&*key) {
                match before {
                    Some(view) => {
                        entry.views.insert(agent, view);
                    }
                    None => {
                        entry.views.remove(&agent);
                    }
                }
            }
        }
        for (key, written) in undo.written.into_iter().rev() {
            if let Some(e) = self.entries.get_mut(&*key) {
                e.merged = written.merged;
                e.last_written_ms = written.last_written_ms;
                e.up_live = written.up_live;
                e.history_state = written.history_state;
            }
        }
        for key in undo.created {
            self.entries.remove(&*key);
        }
        for (agent, held) in undo.series.into_iter().rev() {
            if let Some(a) = self.agents.get_mut(&*agent) {
                a.set_held(held);
            }
        }
        for (agent, key) in undo.local_targets {
            if let Some(a) = self.agents.get_mut(&agent) {
                a.local_targets.remove(&key);
            }
        }
        for (agent, seq) in undo.committed.into_iter().rev() {
            if let Some(a) = self.agents.get_mut(&agent) {
                a.committed_seq = seq;
            }
        }
        if let Some(ms) = undo.last_meta_ms {
            self.last_meta_ms = ms;
        }
        if let Some(jobs) = undo.jobs_written {
            self.jobs_written = jobs;
        }
        for (agent, staled) in undo.staled {
            if let Some(a) = self.agents.get_mut(&agent) {
                a.series_staled = staled;
            }
        }
        for (id, agent) in undo.forgotten {
            self.agents.insert(id, agent);
        }
        self.retired.extend(undo.retired);
    }

    /// Hands the response-time buckets of minutes before `minute` to the history, for
    /// views whose agent has not reported since (the others were handed over by their
    /// next result).
    fn flush_buckets(&mut self, minute: i64, ch: &mut Changes) {
        for entry in self.entries.values_mut() {
            for (agent, view) in entry.views.iter_mut() {
                let Some(b) = view.bucket.filter(|b| b.start_ms < minute) else {
                    continue;
                };
                ch.durable.history.buckets.push((
                    (entry.key.0.clone(), entry.key.1.clone()),
                    agent.to_string(),
                    b,
                ));
                let flushed = Arc::new(LastResult {
                    bucket: None,
                    ..(**view).clone()
                });
                let before = std::mem::replace(view, flushed);
                ch.undo
                    .views
                    .push((entry.key.clone(), agent.clone(), Some(before)));
            }
        }
    }

    /// Staleness markers for targets a reload removed; on success they are gone.
    fn write_retired(&mut self, now_ms: i64, ch: &mut Changes) {
        let retired = std::mem::take(&mut self.retired);
        for (key, entry) in retired {
            for view in entry.views.values() {
                stale_agent_series(view, now_ms, &mut ch.out);
            }
            if entry.up_live {
                write_merged(
                    &entry.merged_series,
                    None,
                    now_ms,
                    entry.last_written_ms,
                    &mut ch.out,
                );
            }
            for (agent, view) in &entry.views {
                if let Some(a) = self.agents.get_mut(&**agent) {
                    ch.undo.series.push((a.id.clone(), a.held()));
                    a.release(view);
                }
            }
            ch.undo.retired.push((key, entry));
        }
    }

    /// Ends the streams whose token the config no longer accepts as it was.
    fn revoke_credentials(&mut self, ch: &mut Changes) {
        let config = self.config.clone();
        for (id, agent) in self.agents.iter_mut() {
            let Some(stream) = agent.open_stream else {
                continue;
            };
            let still = match &agent.credential {
                None => !config.auth_required,
                Some(token) => config.tokens.get(token).is_some_and(|grant| {
                    grant.agent == *id && grant.labels.as_ref().is_none_or(|l| *l == agent.labels)
                }),
            };
            if !still {
                tracing::warn!(agent = %crate::refusals::loggable(id), "the reloaded config no longer accepts this agent's token as it was; ending its stream");
                ch.outgoing.push(Outgoing::End {
                    agent: id.clone(),
                    connection: stream,
                    reason: "the aggregator's fleet.auth no longer accepts this agent's token"
                        .into(),
                });
                agent.open_stream = None;
                agent.connection = None;
                agent.credential = None;
            }
        }
    }

    /// Makes the next tick evaluate every target (after a reload or a rollback, which
    /// change what the targets' next evaluations were worked out from).
    fn evaluate_every_target(&mut self) {
        for entry in self.entries.values_mut() {
            entry.next_evaluation_ms = i64::MIN;
        }
    }

    fn evaluate_all(&mut self, now_ms: i64, ch: &mut Changes) {
        // Only the targets whose merge the passing time can change by now: with 50,000
        // targets probed every 2 minutes, evaluating each every second was most of the
        // aggregator's work.
        let keys: Vec<Arc<TargetKey>> = self
            .entries
            .values()
            .filter(|e| e.next_evaluation_ms <= now_ms)
            .map(|e| e.key.clone())
            .collect();
        for key in keys {
            self.evaluate(&key, now_ms, false, ch);
        }
    }

    /// Merges one target and writes its merged series when they changed, when a new
    /// result arrived, or when they were last written too long ago.
    fn evaluate(
        &mut self,
        key: &(String, String),
        now_ms: i64,
        new_result: bool,
        ch: &mut Changes,
    ) {
        let Some(entry) = self.entries.get(key) else {
            return;
        };
        let (quorum, window) = rules(&self.config, &self.jobs, &key.0, entry);
        let merged = merge::merge(
            entry.views.values().map(|v| AgentView {
                timestamp_ms: v.timestamp_ms,
                success: v.success,
            }),
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
        // A new result that changes nothing merged writes nothing: with ten agents on a
        // target, rewriting `up` at each of their results would add three rows to every
        // twelve. The periodic rewrite (`due`) keeps it live in the receivers.
        let must_write = changed || due || (new_result && entry.last_written_ms == 0);
        let write =
            must_write && !(merged.state == TargetState::Missing && !entry.up_live && !changed);
        // The history records every change of state, but not a target's first being
        // missing (it never had a result then).
        let state = HistoryState::of(&merged);
        let event = (entry.history_state != Some(state)
            && (entry.history_state.is_some() || state != HistoryState::Missing))
            .then(|| {
                history::Event {
                    timestamp_ms: now_ms,
                    state,
                    agents: merged.agents,
                    succeeding: merged.succeeding,
                    views: entry
                        .views
                        .iter()
                        .map(|(agent, v)| history::EventView {
                            agent: agent.to_string(),
                            success: v.success,
                            fresh: merge::is_fresh(v.timestamp_ms, now_ms, window),
                            timestamp_ms: v.timestamp_ms,
                            failure: v.failure.clone(),
                        })
                        .collect(),
                }
                .bounded()
            });
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        if write || event.is_some() {
            ch.undo.written.push((
                e.key.clone(),
                Written {
                    merged: e.merged,
                    last_written_ms: e.last_written_ms,
                    up_live: e.up_live,
                    history_state: e.history_state,
                },
            ));
        }
        if let Some(event) = event {
            ch.durable
                .history
                .events
                .push(((key.0.clone(), key.1.clone()), event));
            e.history_state = Some(state);
        }
        if write {
            e.last_written_ms = write_merged(
                &e.merged_series,
                Some(merged),
                now_ms,
                e.last_written_ms,
                &mut ch.out,
            );
            e.up_live = merged.state != TargetState::Missing;
        }
        e.merged = Some(merged);
        // The merge changes with time only when a fresh view goes stale; the rewrite is
        // due a period after the last write.
        let window_ms = window.as_millis().min(i64::MAX as u128) as i64;
        let stale_next = e
            .views
            .values()
            .map(|v| v.timestamp_ms.saturating_add(window_ms))
            .filter(|&at| at > now_ms)
            .min();
        let rewrite_next = (merged.state != TargetState::Missing)
            .then(|| e.last_written_ms.saturating_add(period.max(1)));
        e.next_evaluation_ms = stale_next
            .into_iter()
            .chain(rewrite_next)
            .min()
            .unwrap_or(i64::MAX)
            .max(now_ms.saturating_add(1));
    }

    /// Whether job `name` is missing now (see [`merge::job_missing`]), and how many
    /// targets it has (configured, or seen for local jobs).
    fn job_is_missing(&self, name: &str, now_ms: i64) -> (bool, usize) {
        let entries = || {
            self.entries
                .range((name.to_string(), String::new())..)
                .take_while(|(k, _)| k.0 == name)
        };
        let with_entry = entries().count();
        let configured_targets = self.configured_targets(name);
        let expected_since = self.jobs.get(name).map_or(now_ms, |j| j.expected_since_ms);
        // Configured targets with no entry yet have no fresh result either.
        let missing = merge::job_missing(
            entries()
                .map(|(_, e)| e.merged.map_or(TargetState::Missing, |m| m.state))
                .chain(std::iter::repeat_n(
                    TargetState::Missing,
                    configured_targets.saturating_sub(with_entry),
                )),
            expected_since,
            now_ms,
            self.config.missing_after,
        );
        (missing, configured_targets.max(with_entry))
    }

    /// Per-job and per-agent series: missing jobs, target counts, agent liveness.
    /// Returns the agents forgotten (gone for longer than `forget_after`).
    fn write_meta(&mut self, now_ms: i64, ch: &mut Changes) -> Vec<String> {
        let out = &mut ch.out;
        let undo = &mut ch.undo;
        let ts = now_ms.max(self.last_meta_ms + 1);
        undo.last_meta_ms.get_or_insert(self.last_meta_ms);
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
                for name in [
                    "sonde_agent_up",
                    "sonde_agent_last_seen_timestamp_seconds",
                    "sonde_agent_clock_skew_seconds",
                ] {
                    out.push(sample(labels::agent(name, id), ts, stale_nan()));
                }
                out.push(sample(
                    labels::agent_info(id, &agent.labels),
                    ts,
                    stale_nan(),
                ));
                undo.forgotten.push((id.clone(), agent));
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
        let gone: Vec<String> = self
            .jobs_written
            .iter()
            .filter(|name| !self.jobs.contains_key(*name))
            .cloned()
            .collect();
        for name in &gone {
            for series in ["sonde_job_missing", "sonde_job_targets"] {
                out.push(sample(labels::job(series, name), ts, stale_nan()));
            }
        }
        let written: BTreeSet<String> = job_names.iter().cloned().collect();
        if written != self.jobs_written {
            let before = std::mem::replace(&mut self.jobs_written, written);
            undo.jobs_written.get_or_insert(before);
        }
        for name in job_names {
            let (missing, target_count) = self.job_is_missing(&name, now_ms);
            let Some(job) = self.jobs.get_mut(&name) else {
                continue;
            };
            if missing != job.missing {
                tracing::warn!(job = %name, missing, "job missing state changed");
            }
            job.missing = missing;
            out.push(sample(
                labels::job("sonde_job_missing", &name),
                ts,
                f64::from(u8::from(missing)),
            ));
            out.push(sample(
                labels::job("sonde_job_targets", &name),
                ts,
                target_count as f64,
            ));
        }
        for (id, agent) in &self.agents {
            let up = agent.is_up(now_ms, grace);
            out.push(sample(
                labels::agent("sonde_agent_up", id),
                ts,
                f64::from(u8::from(up)),
            ));
            out.push(sample(
                labels::agent("sonde_agent_last_seen_timestamp_seconds", id),
                ts,
                agent.last_seen_at(now_ms) as f64 / 1000.0,
            ));
            if let Some(skew) = agent.clock_skew_ms {
                out.push(sample(
                    labels::agent("sonde_agent_clock_skew_seconds", id),
                    ts,
                    skew as f64 / 1000.0,
                ));
            }
            out.push(sample(labels::agent_info(id, &agent.labels), ts, 1.0));
        }
        // An agent gone past missing_after: its per-target series end now, so that
        // dashboards and absent() see it at once rather than after 5 minutes.
        let gone: Vec<String> = self
            .agents
            .iter_mut()
            .filter_map(|(id, a)| {
                let up = a.is_up(now_ms, grace);
                let newly_gone = !up && !a.series_staled;
                if a.series_staled == up {
                    undo.staled.push((id.clone(), a.series_staled));
                }
                a.series_staled = !up;
                newly_gone.then(|| id.clone())
            })
            .collect();
        for id in &gone {
            for entry in self.entries.values() {
                if let Some(view) = entry.views.get(id.as_str()) {
                    stale_agent_series(view, now_ms, out);
                }
            }
        }
        forgotten
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
}

/// The quorum and freshness window that apply to a target's job.
fn rules(
    config: &HubConfig,
    jobs: &BTreeMap<String, JobEntry>,
    job: &str,
    entry: &TargetEntry,
) -> (Quorum, Duration) {
    match jobs.get(job).and_then(|j| j.config.as_ref()) {
        Some(c) => (c.quorum, c.freshness),
        None => {
            // A local job: the aggregator knows its rhythm only from the results.
            let spacing = entry
                .views
                .values()
                .filter_map(|v| v.spacing_ms)
                .max()
                .map_or(config.scrape_interval, |ms| {
                    Duration::from_millis(ms.max(1) as u64)
                });
            (Quorum::AtLeast(1), spacing * 2 + spacing / 2)
        }
    }
}

/// Writes `up`, `sonde_target_agents` and `sonde_target_agents_succeeding` for a
/// target; `None` (target removed) or a missing state writes staleness markers for
/// `up`. Returns the timestamp used, always after `last_ms`.
fn write_merged(
    series: &MergedSeries,
    merged: Option<Merged>,
    now_ms: i64,
    last_ms: i64,
    out: &mut Samples,
) -> i64 {
    let ts = now_ms.max(last_ms + 1);
    let (up, agents, succeeding) = match merged {
        Some(m) => (
            m.state.up_value().unwrap_or_else(stale_nan),
            f64::from(m.agents),
            f64::from(m.succeeding),
        ),
        None => (stale_nan(), stale_nan(), stale_nan()),
    };
    out.push(sample(series.up.clone(), ts, up));
    out.push(sample(series.agents.clone(), ts, agents));
    out.push(sample(series.succeeding.clone(), ts, succeeding));
    ts
}

/// Staleness markers for every series one agent wrote for one target.
fn stale_agent_series(view: &LastResult, now_ms: i64, out: &mut Samples) {
    let ts = now_ms.max(view.timestamp_ms + 1);
    for s in view.series.iter() {
        out.push(sample(s.clone(), ts, stale_nan()));
    }
}

/// A fingerprint of a plan: equal plans, equal fingerprints (and different ones differ,
/// but for a 2^-64 chance, which at worst skips sending an unchanged-looking plan).
fn fingerprint(planned: &assignment::Planned) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for m in &planned.modules {
        (&m.name, &m.json).hash(&mut h);
    }
    planned.checks.len().hash(&mut h);
    for c in &planned.checks {
        (
            &c.job,
            &c.instance,
            c.interval_ms,
            c.timeout_ms,
            c.retries,
            c.module,
        )
            .hash(&mut h);
    }
    h.finish()
}

/// True when an agent with `labels` matches the job selector `selector`.
fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A result's target, made safe to log.
fn describe(r: &IncomingResult) -> String {
    format!(
        "job {:?} instance {:?}",
        crate::refusals::loggable(&r.job),
        crate::refusals::loggable(&r.instance)
    )
}

/// True when `series` (built by [`TargetBase::probe`] over a base of `base_len` labels
/// for the same agent) is the series of a sample named `name` with `labels`. A sample's
/// labels can collide with none of the base's (the fleet service and
/// [`State::accept`] refuse those), so having each of them and exactly that many labels
/// in all means having no others; a target label named `agent` makes the count differ
/// and the series is built again, which is only slower.
fn is_probe_series(
    series: &crate::series::SeriesLabels,
    base_len: usize,
    name: &str,
    labels: &[(Symbol, Symbol)],
) -> bool {
    series.labels().len() == base_len + 2 + labels.len()
        && series.name() == name
        && labels.iter().all(|(k, v)| series.get(k) == Some(&**v))
}

/// A failure reason is kept for the status page; longer ones are cut.
const MAX_FAILURE_CHARS: usize = 512;

fn sample(series: Series, timestamp_ms: i64, value: f64) -> Sample {
    Sample {
        series,
        timestamp_ms,
        value,
    }
}
