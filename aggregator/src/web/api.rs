//! `/api/v1/jobs`, `/api/v1/targets`, `/api/v1/agents`: JSON in Prometheus's API
//! envelope (`{"status":"success","data":...}`).

use crate::app::App;
use crate::fleet::now_ms;
use crate::history::HistoryState;
use crate::hub::Snapshot;
use crate::merge::{self, TargetState};
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use sonde_proto::config::PromDuration;
use std::sync::Arc;

fn envelope(data: Value) -> Json<Value> {
    Json(json!({"status": "success", "data": data}))
}

pub async fn jobs(State(app): State<Arc<App>>) -> Json<Value> {
    envelope(jobs_json(&*app.hub.snapshot().await))
}

pub async fn targets(State(app): State<Arc<App>>) -> Json<Value> {
    envelope(targets_json(&*app.hub.snapshot().await))
}

pub async fn agents(State(app): State<Arc<App>>) -> Json<Value> {
    envelope(agents_json(&*app.hub.snapshot().await))
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
        return "it has no targets (static_configs empty, or file_sd found none)".into();
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
    let matching: Vec<(&String, &crate::hub::AgentSummary)> = state
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

pub fn jobs_json(state: &Snapshot) -> Value {
    let now = now_ms();
    let jobs: Vec<Value> = state
        .jobs
        .iter()
        .map(|(name, job)| {
            let targets = state.job_target_count(name);
            let (status, why) = job_status(state, name, now);
            match &job.config {
                Some(c) => json!({
                    "job": name,
                    "module": c.module_name,
                    "prober": c.module.prober.as_str(),
                    "interval": PromDuration(c.interval).to_string(),
                    "timeout": PromDuration(c.timeout).to_string(),
                    "quorum": c.quorum.to_string(),
                    "retries": c.retries,
                    "agents": c.config.agents,
                    "targets": targets,
                    "missing": job.missing,
                    "status": status,
                    "why": why,
                    "local": false,
                }),
                None => json!({
                    "job": name,
                    "targets": targets,
                    "missing": job.missing,
                    "status": status,
                    "why": why,
                    "local": true,
                }),
            }
        })
        .collect();
    Value::Array(jobs)
}

pub fn targets_json(state: &Snapshot) -> Value {
    let now = now_ms();
    let mut keys: Vec<_> = state.targets.keys().cloned().collect();
    for k in state.entries.keys() {
        if !state.targets.contains_key(k) {
            keys.push(k.clone());
        }
    }
    keys.sort();
    let targets: Vec<Value> = keys
        .iter()
        .map(|key| {
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
            let views: Vec<Value> = entry
                .map(|e| {
                    e.views
                        .iter()
                        .map(|(agent, v)| {
                            json!({
                                "agent": &**agent,
                                "success": v.success,
                                "timestamp_ms": v.timestamp_ms,
                                "age_seconds": (now - v.timestamp_ms) as f64 / 1000.0,
                                "fresh": window.map(|w| merge::is_fresh(v.timestamp_ms, now, w)),
                                "duration_seconds": v.duration_seconds,
                                "failure": v.failure,
                                "trace": v.trace.as_deref(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let refused: Vec<Value> = state
                .refused
                .get(key)
                .into_iter()
                .flatten()
                .map(|(agent, note)| {
                    json!({
                        "agent": &**agent,
                        "reason": note.reason.as_str(),
                        "detail": &*note.detail,
                        "age_seconds": (now - note.at_ms) as f64 / 1000.0,
                    })
                })
                .collect();
            json!({
                "job": key.0,
                "instance": key.1,
                "labels": labels,
                "state": merged.map_or(TargetState::Missing, |m| m.state),
                "history_state": merged.as_ref().map_or(HistoryState::Missing, HistoryState::of),
                "agents": merged.map_or(0, |m| m.agents),
                "succeeding": merged.map_or(0, |m| m.succeeding),
                "views": views,
                "refused": refused,
            })
        })
        .collect();
    Value::Array(targets)
}

pub fn agents_json(state: &Snapshot) -> Value {
    let now = now_ms();
    let grace = state.config.missing_after;
    let agents: Vec<Value> = state
        .agents
        .iter()
        .map(|(id, a)| {
            json!({
                "agent": id,
                "labels": a.labels,
                "version": a.version,
                "connected": a.connected,
                "up": a.is_up(now, grace),
                "last_seen_ms": a.last_seen_ms,
                "first_seen_ms": a.first_seen_ms,
                "assignment_generation": a.generation,
                "checks": a.checks,
                "assignment": a.assignment_status.json(),
                "local_jobs": a.local_jobs,
                "committed_seq": a.committed_seq,
            })
        })
        .collect();
    Value::Array(agents)
}
