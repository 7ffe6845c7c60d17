//! What happened to each target: its state changes (with the agents' views and their
//! failure reasons at that moment) and a compact record of its response times and
//! availability per agent, kept in the aggregator's SQLite for `history.retention`.
//!
//! The hub decides what to record (see `hub::state`); this module holds the records'
//! shapes, the SQL that stores, compacts and prunes them, the queries the web pages and
//! `/api/v1/targets/history` read, and the pure arithmetic of uptime over a window.
//!
//! **Sizes.** A state change is one row. Response times are kept per target and agent
//! in one-minute buckets for [`MINUTE_BUCKETS_FOR`], then folded into one-hour buckets,
//! so a target probed by three agents costs about 3 × (2,880 + 720) rows over 30 days,
//! whatever its interval. `history.max_size` bounds the whole in bytes: triggers keep a
//! running total of what each row weighs (its text, counted twice where an index repeats
//! it, plus a fixed overhead), so a row with a megabyte of reasons weighs a megabyte;
//! past the bound, the oldest rows go first (see [`Store::prune_history`]).
//!
//! **The aggregator's own gaps.** Each start of the aggregator is a row of
//! `aggregator_runs`, and a running one marks itself alive every few seconds; the time
//! between one run's last mark and the next run's start is a [`Gap`]. A gap is not a
//! change of the targets' states: the state a target comes back in is recorded only if
//! it differs from the last one stored, and the gap's time counts neither for nor
//! against uptime.

use crate::store::Store;
use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;
use std::time::Duration;

mod size;
pub use size::{HistoryBytes, SCHEMA_BYTES};
use size::{history_bytes, remove_oldest_buckets, remove_oldest_events};

pub use sonde_hub::history::MINUTE_MS;
/// Width of a compacted bucket.
pub const HOUR_MS: i64 = 3_600_000;
/// One-minute buckets are folded into hours once they are this old.
pub const MINUTE_BUCKETS_FOR: Duration = Duration::from_secs(48 * 3600);
/// What a row weighs beyond its text, for `history.max_size`: integers, record and
/// cell headers, index entries' own keys, free space left in pages. The text columns
/// count at their length in bytes, twice where an index repeats them; `SCHEMA_BYTES`
/// has the same figures. Measured by the database's page count over 20,000 rows of
/// typical size: a state change took 228 bytes and is counted as 234, a bucket 144 and
/// is counted as 155.
pub const EVENT_ROW_OVERHEAD: u64 = 64;
pub const BUCKET_ROW_OVERHEAD: u64 = 80;
pub const RUN_ROW_BYTES: u64 = 48;
/// The aggregator's starts kept, newest first (a crash loop does not fill the history).
const MAX_RUNS_KEPT: i64 = 1_000;

pub use sonde_hub::history::{Bucket, Event, EventView, HistoryState, Writes};

/// Stores a group's history rows, inside its transaction.
pub trait ApplyWrites {
    fn apply(&self, tx: &Transaction<'_>) -> rusqlite::Result<()>;
}

impl ApplyWrites for Writes {
    fn apply(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        if !self.events.is_empty() {
            let mut insert = tx.prepare_cached(
                "INSERT INTO target_events (job, instance, ts_ms, state, agents, succeeding, views)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut last_state = tx.prepare_cached(
                "SELECT state FROM target_events WHERE job = ?1 AND instance = ?2
                 ORDER BY ts_ms DESC, rowid DESC LIMIT 1",
            )?;
            for ((job, instance), e) in &self.events {
                // The hub starts knowing no target's state: after a restart, its first
                // finding for a target is no change if the history already says it.
                let last: Option<String> = last_state
                    .query_row(params![job, instance], |r| r.get(0))
                    .optional()?;
                if last.as_deref() == Some(e.state.as_str()) {
                    continue;
                }
                let views = serde_json::to_string(&e.views).unwrap_or_else(|_| "[]".into());
                insert.execute(params![
                    job,
                    instance,
                    e.timestamp_ms,
                    e.state.as_str(),
                    e.agents,
                    e.succeeding,
                    views
                ])?;
            }
        }
        if !self.buckets.is_empty() {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO target_latency
                   (job, instance, agent, width_ms, bucket_ms, probes, successes, duration_sum, duration_max)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (job, instance, agent, width_ms, bucket_ms) DO UPDATE SET
                   probes = probes + excluded.probes,
                   successes = successes + excluded.successes,
                   duration_sum = duration_sum + excluded.duration_sum,
                   duration_max = MAX(duration_max, excluded.duration_max)",
            )?;
            for ((job, instance), agent, b) in &self.buckets {
                upsert.execute(params![
                    job,
                    instance,
                    agent,
                    MINUTE_MS,
                    b.start_ms,
                    b.probes,
                    b.successes,
                    b.duration_sum,
                    b.duration_max
                ])?;
            }
        }
        Ok(())
    }
}

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

impl Store {
    /// The changes of one target from the last one before `from_ms` on, oldest first.
    pub fn state_changes(
        &self,
        job: &str,
        instance: &str,
        from_ms: i64,
    ) -> rusqlite::Result<Vec<(i64, HistoryState)>> {
        let conn = self.conn();
        let before: Option<(i64, String)> = conn
            .prepare_cached(
                "SELECT ts_ms, state FROM target_events WHERE job = ?1 AND instance = ?2 AND ts_ms < ?3
                 ORDER BY ts_ms DESC LIMIT 1",
            )?
            .query_row(params![job, instance, from_ms], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let mut stmt = conn.prepare_cached(
            "SELECT ts_ms, state FROM target_events WHERE job = ?1 AND instance = ?2 AND ts_ms >= ?3
             ORDER BY ts_ms",
        )?;
        let rows = stmt.query_map(params![job, instance, from_ms], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in before.into_iter().map(Ok).chain(rows) {
            let (ts, state) = row?;
            if let Some(s) = HistoryState::parse(&state) {
                out.push((ts, s));
            }
        }
        Ok(out)
    }

    /// Every target's changes from the last one before `from_ms` on, by target, oldest
    /// first (the status page's timeline bars).
    pub fn all_state_changes(&self, from_ms: i64) -> rusqlite::Result<ChangesByTarget> {
        let conn = self.conn();
        let mut out = ChangesByTarget::new();
        // The state each target was in when the window opened (SQLite picks the row of
        // the maximum for the bare columns).
        let mut before = conn.prepare_cached(
            "SELECT job, instance, MAX(ts_ms), state FROM target_events WHERE ts_ms < ?1
             GROUP BY job, instance",
        )?;
        let mut inside = conn.prepare_cached(
            "SELECT job, instance, ts_ms, state FROM target_events WHERE ts_ms >= ?1
             ORDER BY ts_ms",
        )?;
        for stmt in [&mut before, &mut inside] {
            let rows = stmt.query_map(params![from_ms], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            for row in rows {
                let (job, instance, ts, state) = row?;
                if let Some(s) = HistoryState::parse(&state) {
                    out.entry((job, instance)).or_default().push((ts, s));
                }
            }
        }
        Ok(out)
    }

    /// The newest `limit` state changes of one target, newest first.
    pub fn events(
        &self,
        job: &str,
        instance: &str,
        limit: usize,
    ) -> rusqlite::Result<Vec<StoredEvent>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT ts_ms, state, agents, succeeding, views FROM target_events
             WHERE job = ?1 AND instance = ?2 ORDER BY ts_ms DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![job, instance, (limit + 1) as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut events: Vec<Event> = Vec::new();
        for row in rows {
            let (ts, state, agents, succeeding, views) = row?;
            let Some(state) = HistoryState::parse(&state) else {
                continue;
            };
            events.push(Event {
                timestamp_ms: ts,
                state,
                agents,
                succeeding,
                views: serde_json::from_str(&views).unwrap_or_default(),
            });
        }
        let previous: Vec<Option<HistoryState>> = (0..events.len())
            .map(|i| events.get(i + 1).map(|e| e.state))
            .collect();
        Ok(events
            .into_iter()
            .zip(previous)
            .take(limit)
            .map(|(event, previous)| StoredEvent { event, previous })
            .collect())
    }

    /// One target's response-time buckets since `from_ms`, by agent, oldest first; the
    /// minute buckets where they exist, hour buckets before.
    pub fn latency(
        &self,
        job: &str,
        instance: &str,
        from_ms: i64,
    ) -> rusqlite::Result<std::collections::BTreeMap<String, Vec<StoredBucket>>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT agent, bucket_ms, width_ms, probes, successes, duration_sum, duration_max
             FROM target_latency WHERE job = ?1 AND instance = ?2 AND bucket_ms >= ?3
             ORDER BY agent, bucket_ms, width_ms",
        )?;
        let rows = stmt.query_map(params![job, instance, from_ms], |r| {
            Ok((
                r.get::<_, String>(0)?,
                StoredBucket {
                    start_ms: r.get(1)?,
                    width_ms: r.get(2)?,
                    probes: r.get(3)?,
                    successes: r.get(4)?,
                    duration_avg_seconds: {
                        let (sum, n): (f64, f64) = (r.get(5)?, r.get::<_, f64>(3)?);
                        if n > 0.0 { sum / n } else { 0.0 }
                    },
                    duration_max_seconds: r.get(6)?,
                },
            ))
        })?;
        let mut out: std::collections::BTreeMap<String, Vec<StoredBucket>> = Default::default();
        for row in rows {
            let (agent, b) = row?;
            out.entry(agent).or_default().push(b);
        }
        Ok(out)
    }

    /// Records a start of the aggregator at `now_ms`; returns the run's key for
    /// [`Store::mark_alive`] (`now_ms`, or just after the last run's if the clock is
    /// behind it).
    pub fn begin_run(&self, now_ms: i64) -> rusqlite::Result<i64> {
        let conn = self.conn();
        let last: Option<i64> =
            conn.query_row("SELECT MAX(started_ms) FROM aggregator_runs", [], |r| {
                r.get(0)
            })?;
        let started = last.map_or(now_ms, |l| now_ms.max(l + 1));
        conn.execute(
            "INSERT INTO aggregator_runs (started_ms, alive_ms) VALUES (?1, ?1)",
            params![started],
        )?;
        Ok(started)
    }

    /// The running aggregator (the run `started_ms`) was alive at `now_ms`.
    pub fn mark_alive(&self, started_ms: i64, now_ms: i64) -> rusqlite::Result<()> {
        self.conn()
            .prepare_cached(
                "UPDATE aggregator_runs SET alive_ms = MAX(alive_ms, ?2) WHERE started_ms = ?1",
            )?
            .execute(params![started_ms, now_ms])?;
        Ok(())
    }

    /// The times the aggregator was not running that end after `from_ms`, oldest first.
    pub fn gaps(&self, from_ms: i64) -> rusqlite::Result<Vec<Gap>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT alive_ms, next FROM
               (SELECT alive_ms, LEAD(started_ms) OVER (ORDER BY started_ms) AS next
                FROM aggregator_runs)
             WHERE next IS NOT NULL AND next > ?1 ORDER BY next",
        )?;
        let rows = stmt.query_map(params![from_ms], |r| {
            Ok(Gap {
                from_ms: r.get(0)?,
                to_ms: r.get(1)?,
            })
        })?;
        let mut out = Vec::new();
        for gap in rows {
            let gap = gap?;
            // A run stopped as soon as it started, and the next one at once: no gap.
            if gap.to_ms > gap.from_ms {
                out.push(gap);
            }
        }
        Ok(out)
    }

    /// What the history weighs now (the running total `history.max_size` bounds).
    pub fn history_bytes(&self) -> rusqlite::Result<HistoryBytes> {
        history_bytes(&self.conn())
    }

    /// Folds minute buckets older than [`MINUTE_BUCKETS_FOR`] into hours, drops what is
    /// older than the retention, then the oldest rows while the history weighs more
    /// than `max_size` bytes. Returns the rows removed.
    pub fn prune_history(&self, limits: Limits, now_ms: i64) -> rusqlite::Result<u64> {
        let fold_before =
            (now_ms - MINUTE_BUCKETS_FOR.as_millis() as i64).div_euclid(HOUR_MS) * HOUR_MS;
        let keep_from = now_ms.saturating_sub(limits.retention.as_millis() as i64);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO target_latency
               (job, instance, agent, width_ms, bucket_ms, probes, successes, duration_sum, duration_max)
             SELECT job, instance, agent, ?2, (bucket_ms / ?2) * ?2,
                    SUM(probes), SUM(successes), SUM(duration_sum), MAX(duration_max)
             FROM target_latency WHERE width_ms = ?1 AND bucket_ms < ?3
             GROUP BY job, instance, agent, (bucket_ms / ?2)
             ON CONFLICT (job, instance, agent, width_ms, bucket_ms) DO UPDATE SET
               probes = probes + excluded.probes,
               successes = successes + excluded.successes,
               duration_sum = duration_sum + excluded.duration_sum,
               duration_max = MAX(duration_max, excluded.duration_max)",
            params![MINUTE_MS, HOUR_MS, fold_before],
        )?;
        let mut removed = tx.execute(
            "DELETE FROM target_latency WHERE width_ms = ?1 AND bucket_ms < ?2",
            params![MINUTE_MS, fold_before],
        )? as u64;
        removed += tx.execute(
            "DELETE FROM target_latency WHERE bucket_ms < ?1",
            params![keep_from],
        )? as u64;
        // Keep the last change before the window of each target: it says what state
        // the window starts in.
        removed += tx.execute(
            "DELETE FROM target_events WHERE ts_ms < ?1 AND rowid NOT IN
               (SELECT MAX(rowid) FROM target_events WHERE ts_ms < ?1 GROUP BY job, instance)",
            params![keep_from],
        )? as u64;
        removed += tx.execute(
            "DELETE FROM aggregator_runs WHERE alive_ms < ?1 OR started_ms NOT IN
               (SELECT started_ms FROM aggregator_runs ORDER BY started_ms DESC LIMIT ?2)",
            params![keep_from, MAX_RUNS_KEPT],
        )? as u64;
        let parts = history_bytes(&tx)?;
        let total = parts.total();
        if total > limits.max_size {
            // Down to 90 % of the bound, oldest first, each table its share of the
            // excess, so that the next few minutes do not prune again.
            let excess = total - limits.max_size * 9 / 10;
            let share = |part: u64| (excess as u128 * part as u128 / total as u128) as u64 + 1;
            removed += remove_oldest_events(&tx, share(parts.events))?;
            removed += remove_oldest_buckets(&tx, share(parts.buckets))?;
        }
        tx.commit()?;
        Ok(removed)
    }
}

/// The tables, created by the store's schema migrations.
pub const SCHEMA: &str = "
CREATE TABLE target_events (
    job TEXT NOT NULL,
    instance TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    agents INTEGER NOT NULL,
    succeeding INTEGER NOT NULL,
    views TEXT NOT NULL
);
CREATE INDEX target_events_target ON target_events (job, instance, ts_ms);
CREATE INDEX target_events_age ON target_events (ts_ms);
CREATE TABLE target_latency (
    job TEXT NOT NULL,
    instance TEXT NOT NULL,
    agent TEXT NOT NULL,
    width_ms INTEGER NOT NULL,
    bucket_ms INTEGER NOT NULL,
    probes INTEGER NOT NULL,
    successes INTEGER NOT NULL,
    duration_sum REAL NOT NULL,
    duration_max REAL NOT NULL,
    PRIMARY KEY (job, instance, agent, width_ms, bucket_ms)
) WITHOUT ROWID;
CREATE INDEX target_latency_age ON target_latency (bucket_ms);
";

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

    fn store() -> Store {
        Store::in_memory().unwrap()
    }

    fn event(ts: i64, state: HistoryState, failure: &str) -> Event {
        Event {
            timestamp_ms: ts,
            state,
            agents: 2,
            succeeding: u32::from(state == Up) * 2,
            views: vec![EventView {
                agent: "a".into(),
                success: state == Up,
                fresh: true,
                timestamp_ms: ts,
                failure: failure.into(),
            }],
        }
    }

    #[test]
    fn events_and_buckets_round_trip_and_fold_into_hours() {
        let s = store();
        let key = ("j".to_string(), "i".to_string());
        let hour = 1_000 * HOUR_MS;
        let w = Writes {
            events: vec![
                (key.clone(), event(hour, Up, "")),
                (key.clone(), event(hour + 5, Down, "connection refused")),
            ],
            buckets: (0..3)
                .map(|m| {
                    let mut b = Bucket::starting(hour + m * MINUTE_MS);
                    b.add(m != 1, 0.1 * (m + 1) as f64);
                    (key.clone(), "a".to_string(), b)
                })
                .collect(),
        };
        s.transaction(|tx| w.apply(tx)).unwrap();
        let events = s.events("j", "i", 10).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event.state, Down);
        assert_eq!(events[0].previous, Some(Up));
        assert_eq!(events[0].event.reasons(), vec!["connection refused"]);
        assert_eq!(events[1].previous, None);
        assert_eq!(
            s.state_changes("j", "i", hour + 1).unwrap(),
            vec![(hour, Up), (hour + 5, Down)]
        );
        assert_eq!(s.latency("j", "i", 0).unwrap()["a"].len(), 3);
        // Three days later the minutes are one hour bucket.
        let limits = Limits {
            retention: Duration::from_secs(30 * 86_400),
            max_size: u64::MAX,
        };
        s.prune_history(limits, hour + 72 * HOUR_MS).unwrap();
        let folded = &s.latency("j", "i", 0).unwrap()["a"];
        assert_eq!(folded.len(), 1);
        assert_eq!(
            (folded[0].width_ms, folded[0].probes, folded[0].successes),
            (HOUR_MS, 3, 2)
        );
        assert!((folded[0].duration_avg_seconds - 0.2).abs() < 1e-9);
        assert!((folded[0].duration_max_seconds - 0.3).abs() < 1e-9);
        // Past the retention: the buckets go, the last change stays (it says what state
        // the window opens in).
        s.prune_history(limits, hour + 40 * 24 * HOUR_MS).unwrap();
        assert!(s.latency("j", "i", 0).unwrap().is_empty());
        assert_eq!(s.events("j", "i", 10).unwrap().len(), 1);
    }

    /// What the history's text and fixed overheads add up to, counted from the rows
    /// (what the triggers' running total must equal).
    fn recount(s: &Store) -> HistoryBytes {
        let conn = s.conn();
        let sum = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64;
        HistoryBytes {
            events: sum(&format!(
                "SELECT COALESCE(SUM(2 * (octet_length(job) + octet_length(instance))
                    + octet_length(state) + octet_length(views) + {EVENT_ROW_OVERHEAD}), 0)
                 FROM target_events"
            )),
            buckets: sum(&format!(
                "SELECT COALESCE(SUM(2 * (octet_length(job) + octet_length(instance)
                    + octet_length(agent)) + {BUCKET_ROW_OVERHEAD}), 0) FROM target_latency"
            )),
            runs: sum(&format!(
                "SELECT COUNT(*) * {RUN_ROW_BYTES} FROM aggregator_runs"
            )),
        }
    }

    fn flapping(key: &(String, String), n: i64, failure: &str) -> Writes {
        Writes {
            events: (0..n)
                .map(|i| {
                    (
                        key.clone(),
                        event(i, if i % 2 == 0 { Up } else { Down }, failure),
                    )
                })
                .collect(),
            buckets: Vec::new(),
        }
    }

    #[test]
    fn the_size_bound_removes_the_oldest_rows() {
        let s = store();
        let key = ("j".to_string(), "i".to_string());
        s.transaction(|tx| flapping(&key, 100, "").apply(tx))
            .unwrap();
        let one = s.history_bytes().unwrap().events / 100;
        let limits = Limits {
            retention: Duration::from_secs(86_400),
            max_size: 50 * one,
        };
        assert!(s.prune_history(limits, 1_000).unwrap() >= 50);
        let left = s.events("j", "i", 1000).unwrap();
        assert!(left.len() <= 45, "{}", left.len());
        assert_eq!(left[0].event.timestamp_ms, 99, "the newest stay");
        assert_eq!(s.history_bytes().unwrap(), recount(&s));
    }

    #[test]
    fn big_reasons_and_names_count_at_their_size() {
        let s = store();
        let big = ("j".repeat(10_000), "i".repeat(50_000));
        let reason = "r".repeat(100_000);
        // 40 changes of a target whose name and reasons weigh ~250 KB each: 10 MB
        // of history, where 40 rows once counted as 6.4 KB.
        s.transaction(|tx| flapping(&big, 40, &reason).apply(tx))
            .unwrap();
        let mut buckets = Writes::default();
        for m in 0..20 {
            let mut b = Bucket::starting(m * MINUTE_MS);
            b.add(true, 0.1);
            buckets.buckets.push((big.clone(), "a".repeat(1_000), b));
        }
        s.transaction(|tx| buckets.apply(tx)).unwrap();
        let weight = s.history_bytes().unwrap();
        assert_eq!(weight, recount(&s));
        assert!(weight.events > 40 * 200_000, "{weight:?}");
        assert!(weight.buckets > 20 * 100_000, "{weight:?}");
        let limits = Limits {
            retention: Duration::from_secs(86_400),
            max_size: 2_000_000,
        };
        s.prune_history(limits, 30 * MINUTE_MS).unwrap();
        let left = s.history_bytes().unwrap();
        assert_eq!(left, recount(&s));
        assert!(left.total() <= limits.max_size, "{left:?}");
        assert!(
            !s.events(&big.0, &big.1, 100).unwrap().is_empty(),
            "the newest changes stay"
        );
        // The file follows: what is left, not what was, once SQLite reuses the pages.
        let conn = s.conn();
        let used: i64 = conn
            .query_row(
                "SELECT (page_count - freelist_count) * page_size
                 FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            (used as u64) < 2 * limits.max_size,
            "{used} bytes of pages in use"
        );
    }

    #[test]
    fn the_running_total_follows_folding_and_retention() {
        let s = store();
        let key = ("j".to_string(), "i".to_string());
        let hour = 1_000 * HOUR_MS;
        let mut w = flapping(&key, 4, "refused");
        for m in 0..120 {
            let mut b = Bucket::starting(hour + m * MINUTE_MS);
            b.add(true, 0.1);
            w.buckets.push((key.clone(), "a".to_string(), b));
        }
        s.transaction(|tx| w.apply(tx)).unwrap();
        s.begin_run(hour).unwrap();
        assert_eq!(s.history_bytes().unwrap(), recount(&s));
        let limits = Limits {
            retention: Duration::from_secs(30 * 86_400),
            max_size: u64::MAX,
        };
        s.prune_history(limits, hour + 72 * HOUR_MS).unwrap();
        assert_eq!(s.history_bytes().unwrap(), recount(&s));
        s.prune_history(limits, hour + 40 * 24 * HOUR_MS).unwrap();
        assert_eq!(s.history_bytes().unwrap(), recount(&s));
    }

    #[test]
    fn a_restart_is_a_gap_not_a_change() {
        let s = store();
        let key = ("j".to_string(), "i".to_string());
        let first = s.begin_run(1_000).unwrap();
        s.transaction(|tx| flapping(&key, 1, "").apply(tx)).unwrap();
        s.mark_alive(first, 5_000).unwrap();
        // Killed; started again at 9 s, where the hub finds the target up as before.
        let second = s.begin_run(9_000).unwrap();
        let again = Writes {
            events: vec![(key.clone(), event(9_500, Up, ""))],
            buckets: Vec::new(),
        };
        s.transaction(|tx| again.apply(tx)).unwrap();
        assert_eq!(s.events("j", "i", 10).unwrap().len(), 1, "no up from up");
        let gaps = s.gaps(0).unwrap();
        assert_eq!(
            gaps,
            [Gap {
                from_ms: 5_000,
                to_ms: 9_000
            }]
        );
        // A change after the gap is recorded, from the state before it.
        let down = Writes {
            events: vec![(key.clone(), event(12_000, Down, "refused"))],
            buckets: Vec::new(),
        };
        s.transaction(|tx| down.apply(tx)).unwrap();
        let events = s.events("j", "i", 10).unwrap();
        assert_eq!(
            (events[0].event.state, events[0].previous),
            (Down, Some(Up))
        );
        s.mark_alive(second, 20_000).unwrap();
        // Uptime leaves the gap out: 5 s up before it, 3 s up and 8 s down after.
        let changes = s.state_changes("j", "i", 0).unwrap();
        let d = durations(&changes, &gaps, 0, 20_000);
        assert_eq!((d.up, d.down, d.missing), (5_000 + 3_000, 8_000, 0));
        assert_eq!(
            segments(&changes, &gaps, 0, 20_000),
            [
                Segment {
                    from_ms: 0,
                    to_ms: 5_000,
                    state: Up
                },
                Segment {
                    from_ms: 9_000,
                    to_ms: 12_000,
                    state: Up
                },
                Segment {
                    from_ms: 12_000,
                    to_ms: 20_000,
                    state: Down
                },
            ]
        );
        assert!(s.gaps(9_000).unwrap().is_empty(), "ended before the window");
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
