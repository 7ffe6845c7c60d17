//! What happened to each target: its state changes (with the agents' views and their
//! failure reasons at that moment) and a compact record of its response times and
//! availability per agent, kept in the aggregator's SQLite for `history.retention`.
//!
//! The hub decides what to record (see `hub::state`); this module holds the records'
//! shapes and the pure arithmetic of uptime over a window. The SQL that stores,
//! compacts, prunes and reads them is in `storage::history`.
//!
//! **Sizes.** A state change is one row. Response times are kept per target and agent
//! in one-minute buckets for [`MINUTE_BUCKETS_FOR`], then folded into one-hour buckets,
//! so a target probed by three agents costs about 3 × (2,880 + 720) rows over 30 days,
//! whatever its interval. `history.max_size` bounds the whole in bytes: triggers keep a
//! running total of what each row weighs (its text, counted twice where an index repeats
//! it, plus a fixed overhead), so a row with a megabyte of reasons weighs a megabyte;
//! past the bound, the oldest rows go first (see `storage::history`).
//!
//! **The aggregator's own gaps.** Each start of the aggregator is a row of
//! `aggregator_runs`, and a running one marks itself alive every few seconds; the time
//! between one run's last mark and the next run's start is a [`Gap`]. A gap is not a
//! change of the targets' states: the state a target comes back in is recorded only if
//! it differs from the last one stored, and the gap's time counts neither for nor
//! against uptime.

use serde::Serialize;
use std::time::Duration;

pub use sonde_hub::history::{Bucket, Event, EventView, HistoryState, MINUTE_MS, Writes};
/// Width of a compacted bucket.
pub const HOUR_MS: i64 = 3_600_000;
/// One-minute buckets are folded into hours once they are this old.
pub const MINUTE_BUCKETS_FOR: Duration = Duration::from_secs(48 * 3600);

/// Time spent in each state within a window, in ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Durations {
    pub up: i64,
    pub degraded: i64,
    pub down: i64,
    pub missing: i64,
}

impl Durations {
    fn add(&mut self, state: HistoryState, ms: i64) {
        match state {
            HistoryState::Up => self.up += ms,
            HistoryState::Degraded => self.degraded += ms,
            HistoryState::Down => self.down += ms,
            HistoryState::Missing => self.missing += ms,
        }
    }

    /// Available time over the time the state was known (up, degraded or down);
    /// `None` when it never was. Missing time says nothing about the target.
    pub fn uptime(&self) -> Option<f64> {
        let known = self.up + self.degraded + self.down;
        (known > 0).then(|| (self.up + self.degraded) as f64 / known as f64)
    }
}

/// A time the aggregator was not running, `[from_ms, to_ms)`: from its last sign of life
/// to its next start. Nothing is known of any target's state then.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub from_ms: i64,
    pub to_ms: i64,
}

/// A stretch of one state: `[from_ms, to_ms)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Segment {
    pub from_ms: i64,
    pub to_ms: i64,
    pub state: HistoryState,
}

/// The stretches of `[from_ms, to_ms)` given the changes `(timestamp, state)` in time
/// order, the first of which may lie before `from_ms` (the state the window starts
/// in). Time before the first known change and the aggregator's `gaps` are left out.
pub fn segments(
    changes: &[(i64, HistoryState)],
    gaps: &[Gap],
    from_ms: i64,
    to_ms: i64,
) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in known_segments(changes, from_ms, to_ms) {
        let mut rest = Some(s);
        for g in gaps {
            let Some(s) = rest else { break };
            if g.to_ms <= s.from_ms || g.from_ms >= s.to_ms {
                continue;
            }
            if g.from_ms > s.from_ms {
                out.push(Segment {
                    to_ms: g.from_ms,
                    ..s
                });
            }
            rest = (g.to_ms < s.to_ms).then_some(Segment {
                from_ms: g.to_ms,
                ..s
            });
        }
        out.extend(rest);
    }
    out
}

/// [`segments`] before the gaps are cut out.
fn known_segments(changes: &[(i64, HistoryState)], from_ms: i64, to_ms: i64) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for (i, &(at, state)) in changes.iter().enumerate() {
        let end = changes
            .get(i + 1)
            .map_or(to_ms, |&(next, _)| next)
            .min(to_ms);
        let start = at.max(from_ms);
        if end <= start {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.state == state && last.to_ms == start => last.to_ms = end,
            _ => out.push(Segment {
                from_ms: start,
                to_ms: end,
                state,
            }),
        }
    }
    out
}

/// Time per state within `[from_ms, to_ms)` (see [`segments`]).
pub fn durations(
    changes: &[(i64, HistoryState)],
    gaps: &[Gap],
    from_ms: i64,
    to_ms: i64,
) -> Durations {
    let mut d = Durations::default();
    for s in segments(changes, gaps, from_ms, to_ms) {
        d.add(s.state, s.to_ms - s.from_ms);
    }
    d
}

/// What uptime leaves out for one target: the aggregator's `gaps` and the target's
/// maintenance intervals `[from, to)` (each list in time order), merged into one list in
/// time order, as [`durations`] takes gaps.
pub fn excluded(gaps: &[Gap], maintenance: &[(i64, i64)]) -> Vec<Gap> {
    let mut all: Vec<Gap> = gaps
        .iter()
        .copied()
        .chain(
            maintenance
                .iter()
                .map(|&(from_ms, to_ms)| Gap { from_ms, to_ms }),
        )
        .filter(|g| g.from_ms < g.to_ms)
        .collect();
    all.sort_unstable_by_key(|g| (g.from_ms, g.to_ms));
    let mut out: Vec<Gap> = Vec::with_capacity(all.len());
    for g in all {
        match out.last_mut() {
            Some(last) if g.from_ms <= last.to_ms => last.to_ms = last.to_ms.max(g.to_ms),
            _ => out.push(g),
        }
    }
    out
}

/// A stored response-time bucket, as the pages and the API read it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredBucket {
    pub start_ms: i64,
    pub width_ms: i64,
    pub probes: u32,
    pub successes: u32,
    pub duration_avg_seconds: f64,
    pub duration_max_seconds: f64,
}

/// A stored state change.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredEvent {
    #[serde(flatten)]
    pub event: Event,
    /// The state before; `None` for the first one kept.
    pub previous: Option<HistoryState>,
}

/// State changes `(timestamp, state)` by (job, instance), oldest first.
pub type ChangesByTarget = std::collections::BTreeMap<(String, String), Vec<(i64, HistoryState)>>;

/// Retention and size, as configured (`history:`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub retention: Duration,
    pub max_size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{Merged, TargetState};
    use HistoryState::*;

    #[test]
    fn segments_start_with_the_state_the_window_opens_in() {
        let changes = [(0, Up), (100, Down), (150, Up), (180, Up), (300, Missing)];
        assert_eq!(
            segments(&changes, &[], 50, 250),
            vec![
                Segment {
                    from_ms: 50,
                    to_ms: 100,
                    state: Up
                },
                Segment {
                    from_ms: 100,
                    to_ms: 150,
                    state: Down
                },
                Segment {
                    from_ms: 150,
                    to_ms: 250,
                    state: Up
                },
            ]
        );
        let d = durations(&changes, &[], 50, 250);
        assert_eq!((d.up, d.down, d.missing), (150, 50, 0));
        assert_eq!(d.uptime(), Some(0.75));
    }

    #[test]
    fn missing_time_and_unknown_time_do_not_count_against_uptime() {
        let changes = [(100, Missing), (200, Degraded), (300, Down)];
        let d = durations(&changes, &[], 0, 400);
        assert_eq!((d.missing, d.degraded, d.down, d.up), (100, 100, 100, 0));
        assert_eq!(d.uptime(), Some(0.5));
        assert_eq!(durations(&[], &[], 0, 10).uptime(), None);
        assert_eq!(durations(&[(0, Missing)], &[], 0, 10).uptime(), None);
    }

    #[test]
    fn degraded_is_up_with_some_fresh_agents_failing() {
        let m = |state, agents, succeeding| Merged {
            state,
            agents,
            succeeding,
        };
        assert_eq!(HistoryState::of(&m(TargetState::Up, 3, 3)), Up);
        assert_eq!(HistoryState::of(&m(TargetState::Up, 3, 2)), Degraded);
        assert_eq!(HistoryState::of(&m(TargetState::Down, 3, 1)), Down);
        assert_eq!(HistoryState::of(&m(TargetState::Missing, 0, 0)), Missing);
    }

    #[test]
    fn buckets_are_minutes_and_ignore_nonsense_durations() {
        let mut b = Bucket::starting(125_000);
        assert_eq!(b.start_ms, 120_000);
        assert!(b.covers(179_999) && !b.covers(180_000));
        b.add(true, 0.5);
        b.add(false, f64::NAN);
        b.add(true, -1.0);
        assert_eq!((b.probes, b.successes), (3, 2));
        assert_eq!((b.duration_sum, b.duration_max), (0.5, 0.5));
    }

    #[test]
    fn maintenance_is_left_out_of_uptime_like_a_gap() {
        use HistoryState::*;
        // Up 0–10, down 10–20 (a planned outage from 10 to 20), up 20–40.
        let changes = [(0, Up), (10, Down), (20, Up)];
        assert_eq!(durations(&changes, &[], 0, 40).uptime(), Some(0.75));
        let gaps = [Gap {
            from_ms: 35,
            to_ms: 38,
        }];
        let out = excluded(&gaps, &[(10, 20), (18, 22)]);
        assert_eq!(
            out,
            [
                Gap {
                    from_ms: 10,
                    to_ms: 22
                },
                Gap {
                    from_ms: 35,
                    to_ms: 38
                }
            ]
        );
        let d = durations(&changes, &out, 0, 40);
        assert_eq!((d.up, d.down), (10 + 13 + 2, 0));
        assert_eq!(d.uptime(), Some(1.0));
        // Down only inside the window: nothing known remains against it.
        assert_eq!(
            durations(&[(0, Down)], &excluded(&[], &[(0, 40)]), 0, 40).uptime(),
            None
        );
    }

    #[test]
    fn gaps_cut_segments_anywhere() {
        let changes = [(0, Up), (100, Down)];
        let gaps = [
            Gap {
                from_ms: 10,
                to_ms: 20,
            },
            Gap {
                from_ms: 90,
                to_ms: 110,
            },
            Gap {
                from_ms: 150,
                to_ms: 300,
            },
        ];
        let cut = segments(&changes, &gaps, 0, 200);
        let spans: Vec<_> = cut.iter().map(|s| (s.from_ms, s.to_ms, s.state)).collect();
        assert_eq!(spans, [(0, 10, Up), (20, 90, Up), (110, 150, Down)]);
    }
}
