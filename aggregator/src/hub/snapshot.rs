//! A read-only copy of the hub's state for the web handlers (status page, API,
//! `/metrics`), taken between groups and published once everything in it is committed.
//! Views are shared (`Arc`), so a copy costs a map of pointers, not the samples.

use super::state::{JobEntry, RefusedNotes, State, TargetEntry};
use crate::config::AggregatorConfig;
use crate::merge;
use crate::targets::TargetSet;
use sonde_proto::config::Labels;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What the web handlers show of one agent.
#[derive(Clone, Debug)]
pub struct AgentSummary {
    pub labels: Labels,
    pub version: String,
    pub local_jobs: Vec<String>,
    pub connected: bool,
    pub clock_skew_ms: Option<i64>,
    pub series: usize,
    pub series_bytes: usize,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub committed_seq: u64,
    pub generation: u64,
    pub checks: usize,
    pub assignment_status: sonde_hub::assignment::AssignmentStatus,
    /// An active maintenance window selects it: its views do not count toward `up`.
    pub in_maintenance: bool,
}

impl AgentSummary {
    /// `sonde_agent_up`: connected, or heard from within `grace`.
    pub fn is_up(&self, now_ms: i64, grace: Duration) -> bool {
        merge::agent_up(self.connected, self.last_seen_ms, now_ms, grace)
    }

    /// `sonde_agent_last_seen_timestamp_seconds`, in ms: now while connected.
    pub fn last_seen_at(&self, now_ms: i64) -> i64 {
        if self.connected {
            now_ms
        } else {
            self.last_seen_ms
        }
    }
}

pub struct Snapshot {
    pub config: Arc<AggregatorConfig>,
    pub targets: Arc<TargetSet>,
    pub entries: BTreeMap<(String, String), TargetEntry>,
    pub agents: BTreeMap<String, AgentSummary>,
    pub jobs: BTreeMap<String, JobEntry>,
    job_targets: BTreeMap<String, usize>,
    /// Per target, each agent's last refused result (since its last accepted one).
    pub refused: RefusedNotes,
    /// The maintenance windows in force.
    pub maintenance: Arc<sonde_hub::maintenance::Windows>,
}

impl Snapshot {
    /// The name of the window that keeps `agent` in maintenance (`None`: its views
    /// count). The hub decides; the windows name it (at a window's edge, for the
    /// second until the hub's next tick, "maintenance").
    pub fn agent_maintenance(&self, agent: &str, now_ms: i64) -> Option<String> {
        let a = self.agents.get(agent).filter(|a| a.in_maintenance)?;
        Some(
            self.maintenance
                .active_for_agent(agent, &a.labels, now_ms)
                .unwrap_or("maintenance")
                .to_string(),
        )
    }

    /// A copy of `state`, which runs under `config`.
    pub(super) fn of(state: &State, config: Arc<AggregatorConfig>) -> Self {
        Self {
            config,
            targets: state.targets.clone(),
            entries: state.entries.clone(),
            agents: state
                .agents
                .iter()
                .map(|(id, a)| {
                    (
                        id.clone(),
                        AgentSummary {
                            labels: a.labels.clone(),
                            version: a.version.clone(),
                            local_jobs: a.local_jobs.clone(),
                            connected: a.connection.is_some(),
                            clock_skew_ms: a.clock_skew_ms,
                            series: a.series,
                            series_bytes: a.series_bytes,
                            first_seen_ms: a.first_seen_ms,
                            last_seen_ms: a.last_seen_ms,
                            committed_seq: a.committed_seq,
                            generation: a.generation,
                            checks: a.checks,
                            assignment_status: a.assignment_status.clone(),
                            in_maintenance: state.agent_in_maintenance(id),
                        },
                    )
                })
                .collect(),
            jobs: state.jobs.clone(),
            job_targets: state
                .jobs
                .keys()
                .map(|j| (j.clone(), state.job_target_count(j)))
                .collect(),
            refused: state.refused_notes.clone(),
            maintenance: state.maintenance.clone(),
        }
    }

    /// An empty state under `config` (when the hub has stopped).
    pub fn empty(config: Arc<AggregatorConfig>) -> Self {
        Self {
            config,
            targets: Arc::default(),
            entries: BTreeMap::new(),
            agents: BTreeMap::new(),
            jobs: BTreeMap::new(),
            job_targets: BTreeMap::new(),
            refused: BTreeMap::new(),
            maintenance: Arc::default(),
        }
    }

    /// The times within `[from_ms, to_ms)` the target `key` spent in maintenance, merged
    /// (see [`sonde_hub::maintenance::Windows::intervals_ms`]).
    pub fn maintenance_intervals(
        &self,
        key: &(String, String),
        from_ms: i64,
        to_ms: i64,
    ) -> Vec<(i64, i64)> {
        let labels = match self.entries.get(key) {
            Some(e) => e.base.clone(),
            None => sonde_hub::labels::TargetBase::new(
                &key.0,
                &key.1,
                self.targets.get(key).map_or(&Labels::new(), |t| &t.labels),
            ),
        };
        self.maintenance.intervals_ms(&labels, from_ms, to_ms)
    }

    /// `sonde_job_targets`: the configured targets, or for an agent-local job the
    /// targets its results name.
    pub fn job_target_count(&self, job: &str) -> usize {
        self.job_targets.get(job).copied().unwrap_or(0)
    }
}
