//! `/api/v1/status[?since=<version>]`: the summary of every target and job, and what
//! changed since a version, so that an open status page stays current by asking for a
//! few hundred bytes every few seconds instead of reloading itself whole.
//!
//! The hub keeps no versions: [`Live`] remembers the last state it saw of each target
//! and job, and numbers each round of changes it finds when asked. Versions start at
//! the time this aggregator started (in ms), so a page served by an earlier run asks
//! for a version this run never had and is told to reload (`truncated`).

use super::view::{self, Summary};
use crate::app::App;
use crate::fleet::now_ms;
use crate::history::HistoryState;
use crate::hub::Snapshot;
use axum::Json;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// More changes than this since a version: the answer lists none and says `truncated`
/// (the page is better reloaded whole than patched row by row).
pub const MAX_CHANGES: usize = 500;

/// The last state seen of each target and job, and the version each last changed at.
pub struct Live {
    first_version: u64,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    version: u64,
    targets: HashMap<(String, String), (HistoryState, u64)>,
    jobs: HashMap<String, (JobState, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct JobState {
    status: &'static str,
    why: String,
}

/// A target whose state changed.
#[derive(Debug, Serialize)]
pub struct TargetChange {
    pub job: String,
    pub instance: String,
    pub state: HistoryState,
}

/// A job whose state (or the sentence saying why) changed.
#[derive(Debug, Serialize)]
pub struct JobChange {
    pub job: String,
    pub status: &'static str,
    pub why: String,
}

/// The answer of `/api/v1/status`.
#[derive(Debug, Serialize)]
pub struct StatusDelta {
    /// Ask again with `since=` this.
    pub version: u64,
    pub headline: &'static str,
    pub summary: Summary,
    /// Jobs and targets changed since the version asked for (none without `since`).
    pub jobs: Vec<JobChange>,
    pub targets: Vec<TargetChange>,
    /// True when the changes are not listed: too many, or a version this aggregator
    /// never gave (it restarted); read `/api/v1/targets` or reload the page.
    pub truncated: bool,
}

impl Default for Live {
    fn default() -> Self {
        Self::starting_at(now_ms().max(1) as u64)
    }
}

impl Live {
    fn starting_at(first_version: u64) -> Self {
        Self {
            first_version,
            seen: Mutex::new(Seen {
                version: first_version,
                ..Seen::default()
            }),
        }
    }

    /// Compares `snapshot` with what was seen last; returns the version that now
    /// describes it, and what changed since `since`.
    pub fn observe(
        &self,
        snapshot: &Snapshot,
        states: &[(&(String, String), HistoryState)],
        since: Option<u64>,
        now: i64,
    ) -> StatusDelta {
        let summary = Summary::of(snapshot, states);
        let jobs_now: Vec<(&String, JobState)> = snapshot
            .jobs
            .keys()
            .map(|name| {
                let (status, why) = view::job_status(snapshot, name, now);
                (name, JobState { status, why })
            })
            .collect();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let next = seen.version + 1;
        let mut changed = false;
        for (key, state) in states {
            match seen.targets.get_mut(*key) {
                Some((s, _)) if s == state => {}
                Some(slot) => {
                    *slot = (*state, next);
                    changed = true;
                }
                None => {
                    seen.targets.insert((*key).clone(), (*state, next));
                    changed = true;
                }
            }
        }
        if seen.targets.len() > states.len() {
            let keep: std::collections::HashSet<&(String, String)> =
                states.iter().map(|(k, _)| *k).collect();
            seen.targets.retain(|k, _| keep.contains(k));
        }
        for (name, state) in &jobs_now {
            match seen.jobs.get_mut(*name) {
                Some((s, _)) if s == state => {}
                Some(slot) => {
                    *slot = (state.clone(), next);
                    changed = true;
                }
                None => {
                    seen.jobs.insert((*name).clone(), (state.clone(), next));
                    changed = true;
                }
            }
        }
        if seen.jobs.len() > jobs_now.len() {
            seen.jobs
                .retain(|k, _| snapshot.jobs.contains_key(k.as_str()));
        }
        if changed {
            seen.version = next;
        }
        let version = seen.version;
        let mut delta = StatusDelta {
            version,
            headline: summary.headline(),
            summary,
            jobs: Vec::new(),
            targets: Vec::new(),
            truncated: false,
        };
        let Some(since) = since else {
            return delta;
        };
        if since < self.first_version || since > version {
            delta.truncated = true;
            return delta;
        }
        for (name, (state, at)) in &seen.jobs {
            if *at > since {
                delta.jobs.push(JobChange {
                    job: name.clone(),
                    status: state.status,
                    why: state.why.clone(),
                });
            }
        }
        for ((job, instance), (state, at)) in &seen.targets {
            if *at > since {
                if delta.targets.len() == MAX_CHANGES {
                    delta.targets.clear();
                    delta.truncated = true;
                    break;
                }
                delta.targets.push(TargetChange {
                    job: job.clone(),
                    instance: instance.clone(),
                    state: *state,
                });
            }
        }
        delta.jobs.sort_by(|a, b| a.job.cmp(&b.job));
        delta
            .targets
            .sort_by(|a, b| (&a.job, &a.instance).cmp(&(&b.job, &b.instance)));
        delta
    }
}

#[derive(Deserialize)]
pub struct SinceQuery {
    since: Option<String>,
}

pub async fn handler(
    State(app): State<Arc<App>>,
    Extension(live): Extension<Arc<Live>>,
    Query(q): Query<SinceQuery>,
) -> (StatusCode, Json<Value>) {
    let since = match q.since.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({
                    "status": "error",
                    "errorType": "bad_data",
                    "error": format!("since={:?} is not a version: give the `version` of an earlier answer (a whole number), or leave since= out", q.since.unwrap_or_default()),
                })),
            );
        }
    };
    let snapshot = app.hub.snapshot().await;
    let states = view::target_states(&snapshot);
    let delta = live.observe(&snapshot, &states, since, now_ms());
    (
        StatusCode::OK,
        Json(json!({"status": "success", "data": delta})),
    )
}
