//! `/api/v1/targets/history?job=&instance=[&window=24h]`: one target's state changes,
//! uptimes, timeline and response times, read from the history (see
//! [`crate::history`]) and the hub's current state. The per-target page and the badges
//! read the same [`TargetHistory`].

use crate::app::App;
use crate::fleet::now_ms;
use crate::history::{self, Durations, Gap, HistoryState, Segment, StoredBucket, StoredEvent};
use crate::hub::Snapshot;
use crate::merge;
use crate::storage::StoreError;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use sonde_proto::config::{DurationError, PromDuration};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The uptime windows every page shows.
pub const WINDOWS: [(&str, Duration); 4] = [
    ("1h", Duration::from_secs(3600)),
    ("24h", Duration::from_secs(86_400)),
    ("7d", Duration::from_secs(7 * 86_400)),
    ("30d", Duration::from_secs(30 * 86_400)),
];

/// Incidents (and recoveries) shown per target.
pub const EVENTS_SHOWN: usize = 50;

#[derive(Deserialize)]
pub struct TargetQuery {
    pub job: Option<String>,
    pub instance: Option<String>,
    pub window: Option<String>,
}

/// What is wrong with a history query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("give both job= and instance= (see /api/v1/targets for both)")]
    NoTarget,
    #[error("window={window:?}: {source}; use a duration such as 1h, 24h or 7d")]
    Window {
        window: String,
        source: DurationError,
    },
    #[error("window must be longer than 0")]
    EmptyWindow,
}

/// The history of a target cannot be read from the store.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the history: {0}")]
pub struct HistoryUnreadable(#[from] StoreError);

impl TargetQuery {
    /// (job, instance), or what is wrong with the query.
    pub fn target(&self) -> Result<(String, String), QueryError> {
        match (&self.job, &self.instance) {
            (Some(j), Some(i)) if !j.is_empty() && !i.is_empty() => Ok((j.clone(), i.clone())),
            _ => Err(QueryError::NoTarget),
        }
    }

    /// The window asked for (default 24h), at most the history's retention.
    pub fn window(&self, retention: Duration) -> Result<Duration, QueryError> {
        let w = match &self.window {
            None => Duration::from_secs(86_400),
            Some(w) => {
                w.parse::<PromDuration>()
                    .map_err(|source| QueryError::Window {
                        window: w.clone(),
                        source,
                    })?
                    .0
            }
        };
        if w.is_zero() {
            return Err(QueryError::EmptyWindow);
        }
        Ok(w.min(retention.max(Duration::from_secs(3600))))
    }

    /// [`TargetQuery::target`] and [`TargetQuery::window`], for the pages that need both.
    pub fn target_and_window(
        &self,
        retention: Duration,
    ) -> Result<((String, String), Duration), QueryError> {
        Ok((self.target()?, self.window(retention)?))
    }
}

/// One target's past, as the pages and the API show it.
pub struct TargetHistory {
    pub job: String,
    pub instance: String,
    pub state: HistoryState,
    /// Per window of [`WINDOWS`]: its name, its time per state and the uptime.
    pub uptimes: Vec<(&'static str, Durations, Option<f64>)>,
    pub window: Duration,
    /// Where the pictures start: the window's start, or the first thing known if that
    /// is later (a new target's timeline and chart are not a sliver at the right edge).
    pub from_ms: i64,
    pub timeline: Vec<Segment>,
    pub events: Vec<StoredEvent>,
    /// The times the aggregator was not running since the oldest of `events`, oldest
    /// first: nothing is known of the target then.
    pub gaps: Vec<Gap>,
    /// By agent: the stored buckets of the window, then the minute in progress.
    pub latency: Vec<(String, Vec<StoredBucket>)>,
    pub now_ms: i64,
}

/// The state the hub holds for a target now (missing when it has no entry).
pub fn current_state(snapshot: &Snapshot, key: &(String, String)) -> Option<HistoryState> {
    let known = snapshot.targets.contains_key(key) || snapshot.entries.contains_key(key);
    known.then(|| {
        snapshot
            .entries
            .get(key)
            .and_then(|e| e.merged.as_ref())
            .map_or(HistoryState::Missing, HistoryState::of)
    })
}

/// Reads a target's history; `Ok(None)` when the target is neither configured, nor
/// reported on, nor in the history.
pub fn load(
    app: &App,
    snapshot: &Snapshot,
    key: &(String, String),
    window: Duration,
) -> Result<Option<TargetHistory>, HistoryUnreadable> {
    let now = now_ms();
    let store = app.outputs.history();
    let longest = WINDOWS
        .iter()
        .map(|(_, d)| *d)
        .max()
        .unwrap_or(window)
        .max(window);
    let changes = store.state_changes(&key.0, &key.1, now - longest.as_millis() as i64)?;
    let gaps = store.gaps(now - longest.as_millis() as i64)?;
    let state = current_state(snapshot, key);
    if state.is_none() && changes.is_empty() {
        return Ok(None);
    }
    let from = |d: Duration| now - d.as_millis() as i64;
    // Maintenance counts neither for nor against uptime; the timeline still shows it.
    let excluded = history::excluded(
        &gaps,
        &snapshot.maintenance_intervals(key, from(longest), now),
    );
    let uptimes = WINDOWS
        .iter()
        .map(|(name, d)| {
            let durations = history::durations(&changes, &excluded, from(*d), now);
            (*name, durations, durations.uptime())
        })
        .collect();
    let events = store.events(&key.0, &key.1, EVENTS_SHOWN)?;
    let oldest_event = events.last().map_or(now, |e| e.event.timestamp_ms);
    let mut latency: BTreeMap<String, Vec<StoredBucket>> =
        store.latency(&key.0, &key.1, from(window))?;
    // The minute in progress is in memory only.
    if let Some(entry) = snapshot.entries.get(key) {
        for (agent, view) in &entry.views {
            if let Some(b) = view.bucket.filter(|b| b.probes > 0) {
                latency
                    .entry(agent.to_string())
                    .or_default()
                    .push(StoredBucket {
                        start_ms: b.start_ms,
                        width_ms: history::MINUTE_MS,
                        probes: b.probes,
                        successes: b.successes,
                        duration_avg_seconds: b.duration_sum / f64::from(b.probes),
                        duration_max_seconds: b.duration_max,
                    });
            }
        }
    }
    let first_known = changes
        .iter()
        .map(|(ts, _)| *ts)
        .chain(
            latency
                .values()
                .filter_map(|b| b.first().map(|b| b.start_ms)),
        )
        .min()
        .unwrap_or(now);
    let from_ms = from(window).max(first_known).min(now - 60_000);
    Ok(Some(TargetHistory {
        job: key.0.clone(),
        instance: key.1.clone(),
        state: state.unwrap_or(HistoryState::Missing),
        uptimes,
        window,
        from_ms,
        timeline: history::segments(&changes, &gaps, from_ms, now),
        events,
        gaps: gaps
            .into_iter()
            .filter(|g| g.to_ms > oldest_event)
            .collect(),
        latency: latency.into_iter().collect(),
        now_ms: now,
    }))
}

fn error(status: StatusCode, kind: &str, message: String) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(json!({"status": "error", "errorType": kind, "error": message})),
    )
}

pub async fn handler(
    State(app): State<Arc<App>>,
    Query(q): Query<TargetQuery>,
) -> (StatusCode, Json<Value>) {
    let retention = app.hub.config().history.retention;
    let (key, window) = match q.target_and_window(retention) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_data", e.to_string()),
    };
    let snapshot = app.hub.snapshot().await;
    let found = {
        let app = app.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || load(&app, &snapshot, &key, window)).await
    };
    match found {
        Ok(Ok(Some(h))) => (
            StatusCode::OK,
            Json(json!({"status": "success", "data": to_json(&h)})),
        ),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no target job={:?} instance={:?}: it is not configured and has no history",
                key.0, key.1
            ),
        ),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

pub fn to_json(h: &TargetHistory) -> Value {
    let uptime: serde_json::Map<String, Value> = h
        .uptimes
        .iter()
        .map(|(name, _, u)| (name.to_string(), json!(u)))
        .collect();
    let durations: serde_json::Map<String, Value> = h
        .uptimes
        .iter()
        .map(|(name, d, _)| (name.to_string(), json!(d)))
        .collect();
    let latency: serde_json::Map<String, Value> = h
        .latency
        .iter()
        .map(|(agent, b)| (agent.clone(), json!(b)))
        .collect();
    let events: Vec<Value> = h
        .events
        .iter()
        .map(|e| {
            let mut v = json!(e);
            v["reasons"] = json!(e.event.reasons());
            v
        })
        .collect();
    json!({
        "job": h.job,
        "instance": h.instance,
        "state": h.state,
        "uptime": uptime,
        "durations_ms": durations,
        "window": PromDuration(h.window).to_string(),
        "from_ms": h.from_ms,
        "timeline": h.timeline,
        "events": events,
        "aggregator_gaps": h.gaps,
        "latency": latency,
        "now_ms": h.now_ms,
    })
}

/// The freshness window of a target's job (the configured one, or the default for
/// agents' local jobs).
pub fn freshness(snapshot: &Snapshot, job: &str) -> Duration {
    snapshot
        .jobs
        .get(job)
        .and_then(|j| j.config.as_ref())
        .map_or(snapshot.config.scrape_interval * 3, |c| c.freshness)
}

/// True when an agent's view of a target is still counted.
pub fn is_fresh(snapshot: &Snapshot, job: &str, timestamp_ms: i64, now: i64) -> bool {
    merge::is_fresh(timestamp_ms, now, freshness(snapshot, job))
}
