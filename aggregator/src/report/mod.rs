//! SLO reports: what one target's history says about a window of time, counted the way
//! [`COUNTING`] states (and every report repeats), with the error budget against the
//! job's objective and the incidents with their reasons.
//!
//! Pure arithmetic: the history's state changes (merged `up` at each evaluation, held
//! until the next change; see [`crate::history`]), the aggregator's own gaps, the
//! maintenance windows as unix-second intervals and the objective go in; a
//! [`TargetReport`] comes out. The web layer reads the inputs and renders the result as
//! JSON, CSV ([`csv`]) or a printable page.
//!
//! **The partition.** Every millisecond of the window is in exactly one of: maintenance
//! (whatever the state then), no data (before the target's history starts, after the
//! time of the report, or while the aggregator was not running), missing (no agent had
//! a fresh result: the target's state was unknown), up (degraded included) or down. So
//! `window = maintenance + no_data + missing + up + down`, and `counted = up + down`.

pub mod csv;
pub mod slo;
pub mod time;

use crate::history::{self, Gap, HistoryState, Segment};
use serde::Serialize;

/// How a report counts, in the words every report carries.
pub const COUNTING: &str = "availability = up / (up + down), over the counted time. The state is the merged up of the target's agents at each evaluation, held until the next change. Degraded (up by the job's quorum while some agents fail) counts as up. Left out of the counted time, and shown apart: time inside a maintenance window (whatever the state, maintenance comes first), time the target was missing (no agent had a fresh result: neither up nor down), and time without data (before the target's history starts, after the time of the report, or while the aggregator was not running). error budget = (1 - objective) x counted time; used = down time; burned = used / budget.";

/// Where the reports learn a target's maintenance windows.
pub trait MaintenanceIntervals: Send + Sync {
    /// The windows of (`job`, `instance`) that overlap `[from_s, to_s)`, as `[start, end)`
    /// unix-second intervals in any order.
    fn intervals(&self, job: &str, instance: &str, from_s: i64, to_s: i64) -> Vec<(i64, i64)>;
}

/// No maintenance windows at all.
pub struct NoMaintenance;

impl MaintenanceIntervals for NoMaintenance {
    fn intervals(&self, _: &str, _: &str, _: i64, _: i64) -> Vec<(i64, i64)> {
        Vec::new()
    }
}

/// A state change as the report reads it: when, to what, and the failure reasons the
/// history kept of the agents' views at that moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub at_ms: i64,
    pub state: HistoryState,
    pub reasons: Vec<String>,
}

/// What a report of one target is computed from.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// Oldest first; the first may lie before the window (the state it opens in).
    pub changes: &'a [Change],
    /// The aggregator's gaps (nothing is known of any target then).
    pub gaps: &'a [Gap],
    /// Maintenance windows of this target, `[start, end)` in unix seconds, in any
    /// order, overlapping or not.
    pub maintenance: &'a [(i64, i64)],
    /// Nothing is known after this (the time of the report).
    pub known_until_ms: i64,
    /// The job's objective in percent, if `slo:` gives one.
    pub objective: Option<f64>,
}

/// `[from_ms, to_ms)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Window {
    pub from_ms: i64,
    pub to_ms: i64,
}

/// How much of an incident fell inside maintenance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InMaintenance {
    None,
    Partly,
    Entirely,
}

/// A stretch of `down`, as far as it lies inside the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Incident {
    /// When the target went down (may be before the window).
    pub start_ms: i64,
    /// When it came back (to up, degraded or missing); `None` while still down.
    pub end_ms: Option<i64>,
    /// Wall-clock time of the incident inside the window.
    pub duration_ms: i64,
    /// The part of it that counted as down: outside maintenance and the aggregator's
    /// gaps.
    pub counted_down_ms: i64,
    pub in_maintenance_ms: i64,
    pub maintenance: InMaintenance,
    pub started_before_window: bool,
    /// Still down at the end of the window (or at the time of the report).
    pub ongoing_at_window_end: bool,
    /// The failure reasons of the agents' views when it went down.
    pub reasons: Vec<String>,
}

/// The error budget against the objective.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ErrorBudget {
    pub objective_percent: f64,
    /// `(1 - objective) × counted`.
    pub allowed_ms: f64,
    pub used_ms: i64,
    /// Negative once overspent.
    pub remaining_ms: f64,
    /// `used / allowed`, in percent; `None` when nothing was counted.
    pub burned_percent: Option<f64>,
}

/// One target's report over a window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetReport {
    pub window: Window,
    /// The first change the history keeps, when it is inside the window: the time
    /// before it is no data, not up.
    pub data_starts_ms: Option<i64>,
    pub window_ms: i64,
    pub counted_ms: i64,
    /// Up, degraded included.
    pub up_ms: i64,
    /// The part of `up_ms` that was degraded.
    pub degraded_ms: i64,
    pub down_ms: i64,
    pub missing_ms: i64,
    pub maintenance_ms: i64,
    pub no_data_ms: i64,
    /// `up / counted` in percent; `None` when nothing was counted.
    pub availability_percent: Option<f64>,
    pub error_budget: Option<ErrorBudget>,
    pub incidents: Vec<Incident>,
}

/// Sorted, merged `[from, to)` intervals in ms, clipped to the window.
fn maintenance_ms(maintenance: &[(i64, i64)], window: Window) -> Vec<(i64, i64)> {
    let mut v: Vec<(i64, i64)> = maintenance
        .iter()
        .map(|&(s, e)| {
            (
                s.saturating_mul(1000).max(window.from_ms),
                e.saturating_mul(1000).min(window.to_ms),
            )
        })
        .filter(|(s, e)| e > s)
        .collect();
    v.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// How much of `[from, to)` the merged intervals cover.
fn covered(from: i64, to: i64, intervals: &[(i64, i64)]) -> i64 {
    intervals
        .iter()
        .map(|&(s, e)| (e.min(to) - s.max(from)).max(0))
        .sum()
}

/// The report of one target over `window`.
pub fn target_report(input: Input<'_>, window: Window) -> TargetReport {
    let to_ms = window.to_ms.max(window.from_ms);
    let window = Window {
        from_ms: window.from_ms,
        to_ms,
    };
    let known_to = to_ms.min(input.known_until_ms).max(window.from_ms);
    let states: Vec<(i64, HistoryState)> =
        input.changes.iter().map(|c| (c.at_ms, c.state)).collect();
    let segments = history::segments(&states, input.gaps, window.from_ms, known_to);
    let maintenance = maintenance_ms(input.maintenance, window);

    let mut r = TargetReport {
        window,
        data_starts_ms: input
            .changes
            .first()
            .map(|c| c.at_ms)
            .filter(|&at| at > window.from_ms && at < to_ms),
        window_ms: to_ms - window.from_ms,
        counted_ms: 0,
        up_ms: 0,
        degraded_ms: 0,
        down_ms: 0,
        missing_ms: 0,
        maintenance_ms: covered(window.from_ms, to_ms, &maintenance),
        no_data_ms: 0,
        availability_percent: None,
        error_budget: None,
        incidents: Vec::new(),
    };
    let mut known_outside_maintenance = 0;
    for s in &segments {
        let ms = (s.to_ms - s.from_ms) - covered(s.from_ms, s.to_ms, &maintenance);
        known_outside_maintenance += ms;
        match s.state {
            HistoryState::Up => r.up_ms += ms,
            HistoryState::Degraded => {
                r.up_ms += ms;
                r.degraded_ms += ms;
            }
            HistoryState::Down => r.down_ms += ms,
            HistoryState::Missing => r.missing_ms += ms,
        }
    }
    r.no_data_ms = r.window_ms - r.maintenance_ms - known_outside_maintenance;
    r.counted_ms = r.up_ms + r.down_ms;
    if r.counted_ms > 0 {
        r.availability_percent = Some(100.0 * r.up_ms as f64 / r.counted_ms as f64);
    }
    r.error_budget = input.objective.map(|objective| {
        let allowed = (1.0 - objective / 100.0) * r.counted_ms as f64;
        ErrorBudget {
            objective_percent: objective,
            allowed_ms: allowed,
            used_ms: r.down_ms,
            remaining_ms: allowed - r.down_ms as f64,
            burned_percent: (allowed > 0.0).then(|| 100.0 * r.down_ms as f64 / allowed),
        }
    });
    r.incidents = incidents(input.changes, &segments, &maintenance, window, known_to);
    r
}

/// The down stretches of `changes` that reach into `[window.from_ms, known_to)`.
fn incidents(
    changes: &[Change],
    segments: &[Segment],
    maintenance: &[(i64, i64)],
    window: Window,
    known_to: i64,
) -> Vec<Incident> {
    let mut out = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        if c.state != HistoryState::Down {
            continue;
        }
        let end_ms = changes.get(i + 1).map(|n| n.at_ms);
        let from = c.at_ms.max(window.from_ms);
        let to = end_ms.unwrap_or(known_to).min(known_to);
        if to <= from {
            continue;
        }
        let in_maintenance_ms = covered(from, to, maintenance);
        let counted_down_ms = segments
            .iter()
            .filter(|s| s.state == HistoryState::Down)
            .map(|s| {
                let (f, t) = (s.from_ms.max(from), s.to_ms.min(to));
                if t > f {
                    (t - f) - covered(f, t, maintenance)
                } else {
                    0
                }
            })
            .sum();
        let duration_ms = to - from;
        out.push(Incident {
            start_ms: c.at_ms,
            end_ms,
            duration_ms,
            counted_down_ms,
            in_maintenance_ms,
            maintenance: match in_maintenance_ms {
                0 => InMaintenance::None,
                m if m >= duration_ms => InMaintenance::Entirely,
                _ => InMaintenance::Partly,
            },
            started_before_window: c.at_ms < window.from_ms,
            ongoing_at_window_end: end_ms.is_none_or(|e| e > known_to),
            reasons: c.reasons.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests;
