//! The aggregator's state machine: which agents are connected, what each last reported
//! for each target, which jobs are expected, and the series all of that turns into.
//!
//! No I/O and no locks: the caller (the aggregator's ingest thread) feeds it one input
//! at a time, and each input records what it produced in a [`Changes`]: the samples to
//! write, the durable changes to commit with them, the messages to send and streams to
//! end ([`Outgoing`]), and an undo log that puts the state back if the commit fails. The
//! rules themselves live in [`crate::merge`]; this module keeps state and timestamps in
//! order. Each target keeps its views' fresh counts as they change ([`crate::tally`]), so
//! a result touches the target's shared state (merged series, history) only when its
//! agent's vote changes, and then without walking the other agents' views.
//!
//! The types live here; the inputs, by concern, in `agents.rs` (hello, heartbeats,
//! disconnection), `results.rs` (the accept path), `targets.rs` (views, merge,
//! staleness), `jobs.rs` (the periodic series, missing jobs), `assignments.rs`
//! (placement and the assignments to send) and `undo.rs` (rollback of a failed commit).

mod agents;
mod assignments;
mod jobs;
mod maintenance;
mod results;
mod targets;
#[cfg(test)]
mod tests;
mod undo;

pub use results::owned_instance;

use assignments::selects;
use jobs::sample;
use targets::stale_agent_series;

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
use crate::tally::Tally;
use crate::targets::{Target, TargetSet};
use sonde_proto::config::{Labels, Quorum, ResolvedJob};
use sonde_proto::pb;
use sonde_proto::trace::Trace;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

#[derive(Clone)]
pub struct TargetEntry {
    /// (job, instance), shared with the undo log instead of copied into it.
    pub key: Arc<TargetKey>,
    /// Each agent's latest result here. Changed only through `TargetEntry::set_view`,
    /// which keeps `tally` counting them.
    pub views: BTreeMap<Arc<str>, Arc<LastResult>>,
    /// The views' fresh counts, kept as they change (see [`crate::tally`]).
    tally: Tally,
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
    committed: Vec<(Arc<str>, u64)>,
    last_meta_ms: Option<i64>,
    jobs_written: Option<BTreeSet<String>>,
    /// (agent, `series_staled` before).
    staled: Vec<(String, bool)>,
    forgotten: Vec<(String, AgentEntry)>,
    retired: Vec<((String, String), TargetEntry)>,
    /// `State::maintenance_written` before the group.
    maintenance_written: Option<BTreeMap<(String, String), maintenance::WrittenFlag>>,
    /// `State::agents_in_maintenance` before the group (every tally is rebuilt).
    agents_in_maintenance: Option<BTreeSet<Arc<str>>>,
    /// `State::agent_flags_written` before the group.
    agent_flags_written: Option<BTreeMap<String, i64>>,
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

/// What an agent's views hold: all of them, and of those its local jobs'.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub series: usize,
    pub bytes: usize,
    pub local_series: usize,
    pub local_bytes: usize,
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
    /// The configured job's freshness window (`None` for a local job's target).
    freshness: Option<Duration>,
    /// For a local job's target, the result's own (job, instance), which counts against
    /// `fleet.limits.max_local_targets`.
    local_target: Option<TargetKey>,
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
    /// The maintenance windows in force (the config's and the API's).
    pub maintenance: Arc<crate::maintenance::Windows>,
    /// Targets whose `sonde_target_in_maintenance` is live in the receivers: those some
    /// window selects (only they have the series, so 50,000 targets without a window
    /// cost nothing).
    maintenance_written: BTreeMap<(String, String), maintenance::WrittenFlag>,
    /// When some window next starts or ends (`i64::MAX`: none will).
    maintenance_next_change_ms: i64,
    /// Agents an active window selects: their views do not count toward `up` (no
    /// target's tally holds them).
    agents_in_maintenance: BTreeSet<Arc<str>>,
    /// Agents whose `sonde_agent_in_maintenance` is live in the receivers, with the
    /// timestamp it was last written at.
    agent_flags_written: BTreeMap<String, i64>,
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
            maintenance: Default::default(),
            maintenance_written: BTreeMap::new(),
            maintenance_next_change_ms: i64::MAX,
            agents_in_maintenance: BTreeSet::new(),
            agent_flags_written: BTreeMap::new(),
            buckets_flushed_ms: now_ms.div_euclid(history::MINUTE_MS) * history::MINUTE_MS,
        };
        state.apply_config(config, targets, now_ms);
        state
    }
}
