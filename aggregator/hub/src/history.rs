//! What the hub hands the history to record: a target's state changes (with the agents'
//! views at that moment) and its response times per agent in one-minute buckets. The
//! aggregator stores them with the group's commit.

use crate::merge::{Merged, TargetState};
use serde::Serialize;

/// Width of a fresh response-time bucket.
pub const MINUTE_MS: i64 = 60_000;
/// The most views kept in one event: a target probed by a thousand agents keeps the
/// failing ones first, then the others.
const MAX_EVENT_VIEWS: usize = 64;

/// A target's state as the history and the status page tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryState {
    Up,
    /// Up by the job's quorum, but some fresh agents fail.
    Degraded,
    Down,
    Missing,
}

impl HistoryState {
    pub fn of(merged: &Merged) -> Self {
        match merged.state {
            TargetState::Missing => Self::Missing,
            TargetState::Down => Self::Down,
            TargetState::Up if merged.succeeding < merged.agents => Self::Degraded,
            TargetState::Up => Self::Up,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Degraded => "degraded",
            Self::Down => "down",
            Self::Missing => "missing",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "up" => Self::Up,
            "degraded" => Self::Degraded,
            "down" => Self::Down,
            "missing" => Self::Missing,
            _ => return None,
        })
    }

    /// Counts as available for uptime.
    pub fn is_available(self) -> bool {
        matches!(self, Self::Up | Self::Degraded)
    }
}

/// One agent's view at the moment of a state change.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct EventView {
    pub agent: String,
    pub success: bool,
    pub fresh: bool,
    pub timestamp_ms: i64,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub failure: String,
}

/// A state change of one target.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub timestamp_ms: i64,
    pub state: HistoryState,
    pub agents: u32,
    pub succeeding: u32,
    pub views: Vec<EventView>,
}

impl Event {
    /// Keeps at most `MAX_EVENT_VIEWS` (64) views, failing ones first.
    pub fn bounded(mut self) -> Self {
        if self.views.len() > MAX_EVENT_VIEWS {
            self.views.sort_by_key(|v| (v.success, !v.fresh));
            self.views.truncate(MAX_EVENT_VIEWS);
        }
        self
    }

    /// The failure reasons of the failing views, each once, in agent order.
    pub fn reasons(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for v in &self.views {
            if !v.success && !v.failure.is_empty() && !out.contains(&v.failure) {
                out.push(v.failure.clone());
            }
        }
        out
    }
}

/// Probes of one target by one agent within one bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bucket {
    pub start_ms: i64,
    pub probes: u32,
    pub successes: u32,
    pub duration_sum: f64,
    pub duration_max: f64,
}

impl Bucket {
    pub fn starting(timestamp_ms: i64) -> Self {
        Self {
            start_ms: timestamp_ms.div_euclid(MINUTE_MS) * MINUTE_MS,
            ..Self::default()
        }
    }

    pub fn add(&mut self, success: bool, duration_seconds: f64) {
        self.probes += 1;
        self.successes += u32::from(success);
        let d = if duration_seconds.is_finite() && duration_seconds >= 0.0 {
            duration_seconds
        } else {
            0.0
        };
        self.duration_sum += d;
        self.duration_max = self.duration_max.max(d);
    }

    pub fn covers(&self, timestamp_ms: i64) -> bool {
        timestamp_ms.div_euclid(MINUTE_MS) * MINUTE_MS == self.start_ms
    }
}

/// History rows to write with a group's commit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Writes {
    /// ((job, instance), event).
    pub events: Vec<((String, String), Event)>,
    /// ((job, instance), agent, a finished one-minute bucket).
    pub buckets: Vec<((String, String), String, Bucket)>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.buckets.is_empty()
    }
}
