//! What the pages and the JSON API show of the hub's state: typed views made once per
//! request from a [`Snapshot`], serialized as `/api/v1/jobs`, `/api/v1/targets` and
//! `/api/v1/agents` and rendered by the status page from the same fields, so that a
//! field renamed in one place is renamed (or fails to compile) in the other.

use crate::fleet::assignment::AssignmentStatus;
use crate::history::HistoryState;
use crate::hub::{AgentSummary, Snapshot};
use crate::merge::{self, TargetState};
use serde::{Serialize, Serializer};
use sonde_proto::config::{Labels, PromDuration};
use sonde_proto::trace::Trace;

/// One job (an entry of `/api/v1/jobs`).
#[derive(Debug, Serialize)]
pub struct JobView<'a> {
    pub job: &'a str,
    /// What the config says of it; `None` for an agent-local job.
    #[serde(flatten)]
    pub settings: Option<JobSettings<'a>>,
    pub targets: usize,
    pub missing: bool,
    /// `ok`, `degraded`, `down`, `missing` or `no data` (see [`job_status`]).
    pub status: &'static str,
    pub why: String,
    pub local: bool,
}

/// A configured job's settings, as the API shows them.
#[derive(Debug, Serialize)]
pub struct JobSettings<'a> {
    pub module: &'a str,
    pub prober: &'static str,
    pub interval: String,
    pub timeout: String,
    pub quorum: String,
    pub retries: u32,
    /// The agent selector (empty: every agent).
    pub agents: &'a Labels,
}

/// One target (an entry of `/api/v1/targets`): its merged state and every agent's view.
#[derive(Debug, Serialize)]
pub struct TargetView<'a> {
    pub job: &'a str,
    pub instance: &'a str,
    pub labels: Labels,
    pub state: TargetState,
    pub history_state: HistoryState,
    pub agents: u32,
    pub succeeding: u32,
    pub views: Vec<ResultView<'a>>,
    pub refused: Vec<RefusalView<'a>>,
    /// The maintenance window covering the target now, if any.
    pub in_maintenance: Option<String>,
}

/// One agent's last result for a target.
#[derive(Debug, Serialize)]
pub struct ResultView<'a> {
    pub agent: &'a str,
    pub success: bool,
    pub timestamp_ms: i64,
    pub age_seconds: f64,
    /// Whether it is recent enough to count toward `up`; `None` for an agent-local
    /// job's target.
    pub fresh: Option<bool>,
    /// The maintenance window its agent is in: then it does not count toward `up`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_in_maintenance: Option<String>,
    pub duration_seconds: f64,
    pub failure: &'a str,
    pub trace: Option<&'a Trace>,
}

/// One agent's last refused result for a target.
#[derive(Debug, Serialize)]
pub struct RefusalView<'a> {
    pub agent: &'a str,
    pub reason: &'static str,
    pub detail: &'a str,
    pub age_seconds: f64,
}

/// One agent (an entry of `/api/v1/agents`).
#[derive(Debug, Serialize)]
pub struct AgentView<'a> {
    pub agent: &'a str,
    pub labels: &'a Labels,
    pub version: &'a str,
    pub connected: bool,
    pub up: bool,
    pub last_seen_ms: i64,
    pub first_seen_ms: i64,
    pub assignment_generation: u64,
    pub checks: usize,
    #[serde(serialize_with = "assignment_json")]
    pub assignment: &'a AssignmentStatus,
    pub local_jobs: &'a [String],
    pub committed_seq: u64,
    /// The maintenance window it is in (its views do not count toward `up`).
    pub in_maintenance: Option<String>,
}

fn assignment_json<S: Serializer>(a: &&AssignmentStatus, s: S) -> Result<S::Ok, S::Error> {
    a.json().serialize(s)
}

/// Every job, by name.
pub fn jobs(state: &Snapshot, now: i64) -> Vec<JobView<'_>> {
    state
        .jobs
        .iter()
        .map(|(name, job)| {
            let (status, why) = job_status(state, name, now);
            JobView {
                job: name,
                settings: job.config.as_ref().map(|c| JobSettings {
                    module: &c.module_name,
                    prober: c.module.prober.as_str(),
                    interval: PromDuration(c.interval).to_string(),
                    timeout: PromDuration(c.timeout).to_string(),
                    quorum: c.quorum.to_string(),
                    retries: c.retries,
                    agents: &c.config.agents,
                }),
                targets: state.job_target_count(name),
                missing: job.missing,
                status,
                why,
                local: job.config.is_none(),
            }
        })
        .collect()
}

/// Every target, configured or reported by an agent's local job, by (job, instance).
pub fn targets(state: &Snapshot, now: i64) -> Vec<TargetView<'_>> {
    let mut keys: Vec<&(String, String)> = state.targets.keys().collect();
    for k in state.entries.keys() {
        if !state.targets.contains_key(k) {
            keys.push(k);
        }
    }
    keys.sort();
    keys.into_iter()
        .map(|key| target(state, key, now))
        .collect()
}

/// One target's view (see [`targets`]).
pub fn target<'a>(state: &'a Snapshot, key: &'a (String, String), now: i64) -> TargetView<'a> {
    let labels = state
        .targets
        .get(key)
        .map(|t| t.labels.clone())
        .unwrap_or_default();
    let entry = state.entries.get(key);
    let merged = entry.and_then(|e| e.merged);
    let window = state
        .jobs
        .get(&key.0)
        .and_then(|j| j.config.as_ref())
        .map(|c| c.freshness);
    let views = entry
        .map(|e| {
            e.views
                .iter()
                .map(|(agent, v)| ResultView {
                    agent,
                    success: v.success,
                    timestamp_ms: v.timestamp_ms,
                    age_seconds: (now - v.timestamp_ms) as f64 / 1000.0,
                    fresh: window.map(|w| merge::is_fresh(v.timestamp_ms, now, w)),
                    agent_in_maintenance: state.agent_maintenance(agent, now),
                    duration_seconds: v.duration_seconds,
                    failure: &v.failure,
                    trace: v.trace.as_deref(),
                })
                .collect()
        })
        .unwrap_or_default();
    let refused = state
        .refused
        .get(key)
        .into_iter()
        .flatten()
        .map(|(agent, note)| RefusalView {
            agent,
            reason: note.reason.as_str(),
            detail: &note.detail,
            age_seconds: (now - note.at_ms) as f64 / 1000.0,
        })
        .collect();
    let in_maintenance = state
        .maintenance
        .active(
            &crate::maintenance::target_labels(&key.0, &key.1, &labels),
            now,
        )
        .map(str::to_string);
    TargetView {
        job: &key.0,
        instance: &key.1,
        in_maintenance,
        labels,
        state: merged.map_or(TargetState::Missing, |m| m.state),
        history_state: merged
            .as_ref()
            .map_or(HistoryState::Missing, HistoryState::of),
        agents: merged.map_or(0, |m| m.agents),
        succeeding: merged.map_or(0, |m| m.succeeding),
        views,
        refused,
    }
}

/// Every agent seen, by id.
pub fn agents(state: &Snapshot, now: i64) -> Vec<AgentView<'_>> {
    let grace = state.config.missing_after;
    state
        .agents
        .iter()
        .map(|(id, a): (&String, &AgentSummary)| AgentView {
            agent: id,
            labels: &a.labels,
            version: &a.version,
            connected: a.connected,
            up: a.is_up(now, grace),
            last_seen_ms: a.last_seen_ms,
            first_seen_ms: a.first_seen_ms,
            assignment_generation: a.generation,
            checks: a.checks,
            assignment: &a.assignment_status,
            local_jobs: &a.local_jobs,
            committed_seq: a.committed_seq,
            in_maintenance: state.agent_maintenance(id, now),
        })
        .collect()
}

/// A job's state for people: `missing` (with why), `no data` (not missing yet: in its
/// start-up grace), `down` / `degraded` when some targets are, `ok` only when every
/// target is up.
pub fn job_status(state: &Snapshot, name: &str, now: i64) -> (&'static str, String) {
    let Some(job) = state.jobs.get(name) else {
        return ("missing", "not configured".into());
    };
    let mut counts = [0usize; 4];
    let mut targets = 0usize;
    for (key, _) in state.targets.range((name.to_string(), String::new())..) {
        if key.0 != name {
            break;
        }
        targets += 1;
        let s = state
            .entries
            .get(key)
            .and_then(|e| e.merged.as_ref())
            .map_or(HistoryState::Missing, HistoryState::of);
        counts[s as usize] += 1;
    }
    if job.config.is_none() {
        // A local job: its targets are the ones its agents report.
        for (key, e) in state.entries.range((name.to_string(), String::new())..) {
            if key.0 != name {
                break;
            }
            targets += 1;
            let s = e
                .merged
                .as_ref()
                .map_or(HistoryState::Missing, HistoryState::of);
            counts[s as usize] += 1;
        }
    }
    let [up, degraded, down, missing] = counts;
    if job.missing {
        return ("missing", why_missing(state, name, targets, now));
    }
    if up + degraded + down == 0 {
        return (
            "no data",
            format!(
                "no fresh result yet; the job is flagged missing if none comes within fleet.missing_after ({}) of it being configured",
                PromDuration(state.config.missing_after)
            ),
        );
    }
    let of = |n: usize, what: &str| format!("{n} of {targets} targets {what}");
    if down > 0 {
        ("down", of(down, "down"))
    } else if degraded > 0 {
        (
            "degraded",
            of(degraded, "degraded (up, some agents failing)"),
        )
    } else if missing > 0 {
        ("degraded", of(missing, "without a fresh result"))
    } else {
        ("ok", of(up, "up"))
    }
}

/// Why a job has no fresh result: no target, no agent its selector matches, matching
/// agents not connected, or matching agents that say nothing.
fn why_missing(state: &Snapshot, name: &str, targets: usize, now: i64) -> String {
    let Some(config) = state.jobs.get(name).and_then(|j| j.config.as_ref()) else {
        return "an agent-local job: none of the agents that declare it has sent a fresh result"
            .into();
    };
    if targets == 0 {
        return "it has no targets (static_configs empty, or discovery found none)".into();
    }
    let selector = &config.config.agents;
    let shown = if selector.is_empty() {
        "every agent".to_string()
    } else {
        selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let matching: Vec<(&String, &AgentSummary)> = state
        .agents
        .iter()
        .filter(|(_, a)| config.config.selects(&a.labels))
        .collect();
    if matching.is_empty() {
        return if selector.is_empty() {
            "no agent has connected".into()
        } else {
            format!("no agent matches {shown}")
        };
    }
    let grace = state.config.missing_after;
    let up: Vec<&str> = matching
        .iter()
        .filter(|(_, a)| a.is_up(now, grace))
        .map(|(id, _)| id.as_str())
        .collect();
    if up.is_empty() {
        let ids: Vec<&str> = matching.iter().map(|(id, _)| id.as_str()).collect();
        return format!(
            "the agents matching {shown} ({}) are not connected",
            ids.join(", ")
        );
    }
    format!(
        "the connected agents matching {shown} ({}) sent no result within the freshness window ({})",
        up.join(", "),
        PromDuration(config.freshness)
    )
}

/// Every target's state now, by (job, instance): the configured ones, then the ones
/// agents report in their local jobs (the same set as [`targets`], without the views).
pub fn target_states(state: &Snapshot) -> Vec<(&(String, String), HistoryState)> {
    let of = |key: &(String, String)| {
        state
            .entries
            .get(key)
            .and_then(|e| e.merged.as_ref())
            .map_or(HistoryState::Missing, HistoryState::of)
    };
    let mut out: Vec<_> = state.targets.keys().map(|k| (k, of(k))).collect();
    out.extend(
        state
            .entries
            .keys()
            .filter(|k| !state.targets.contains_key(k))
            .map(|k| (k, of(k))),
    );
    out
}

/// The status page's header and the summary of `/api/v1/status`: how many targets are
/// in each state, how many jobs are missing, and the one word for all of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// `up` (every target up, no job missing), `down` (some target down) or
    /// `degraded` (anything else short of all up).
    pub overall: &'static str,
    pub targets: usize,
    pub up: usize,
    pub degraded: usize,
    pub down: usize,
    pub missing: usize,
    pub jobs: usize,
    pub jobs_missing: usize,
}

impl Summary {
    pub fn of(state: &Snapshot, targets: &[(&(String, String), HistoryState)]) -> Self {
        let mut s = Summary {
            targets: targets.len(),
            jobs: state.jobs.len(),
            jobs_missing: state.jobs.values().filter(|j| j.missing).count(),
            ..Summary::default()
        };
        for (_, t) in targets {
            match t {
                HistoryState::Up => s.up += 1,
                HistoryState::Degraded => s.degraded += 1,
                HistoryState::Down => s.down += 1,
                HistoryState::Missing => s.missing += 1,
            }
        }
        s.overall = if s.down > 0 {
            "down"
        } else if s.degraded + s.missing + s.jobs_missing > 0 {
            "degraded"
        } else {
            "up"
        };
        s
    }

    /// The header's sentence.
    pub fn headline(&self) -> &'static str {
        match self.overall {
            "up" => "All systems up",
            "down" => "Some targets are down",
            _ => "Degraded",
        }
    }
}
