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

pub fn jobs_json(state: &Snapshot) -> Value {
    let jobs: Vec<Value> = state
        .jobs
        .iter()
        .map(|(name, job)| {
            let targets = state.job_target_count(name);
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
                    "local": false,
                }),
                None => json!({
                    "job": name,
                    "targets": targets,
                    "missing": job.missing,
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
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "job": key.0,
                "instance": key.1,
                "labels": labels,
                "state": merged.map_or(TargetState::Missing, |m| m.state),
                "history_state": merged.as_ref().map_or(HistoryState::Missing, HistoryState::of),
                "agents": merged.map_or(0, |m| m.agents),
                "succeeding": merged.map_or(0, |m| m.succeeding),
                "views": views,
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
