//! The history as the web pages and `/api/v1/targets/history` read it: a handful of
//! read-only queries behind [`HistoryReader`], so that no page holds SQL or the store.
//!
//! The status page draws every target's last 24 hours and reloads itself every few
//! seconds, while the history changes only when some target changes state. So
//! [`StoredHistory`] keeps the last answer to [`HistoryReader::all_state_changes`] and
//! gives it again as long as no state change was written or removed since (checked by
//! the newest row id and the running byte total the triggers keep: two one-row reads).

use super::{Store, StoreError};
use crate::history::{ChangesByTarget, Event, Gap, HistoryState, StoredBucket, StoredEvent};
use rusqlite::{OptionalExtension, params};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Read-only queries of the history (see [`crate::history`] for what the rows mean).
pub trait HistoryReader: Send + Sync {
    /// The changes `(timestamp, state)` of one target from the last one before
    /// `from_ms` on, oldest first.
    fn state_changes(
        &self,
        job: &str,
        instance: &str,
        from_ms: i64,
    ) -> Result<Vec<(i64, HistoryState)>, StoreError>;

    /// Every target's changes from (at most) the last one before `from_ms` on, oldest
    /// first: what the status page's timelines need. A change older than that may come
    /// with them; it ends before `from_ms`, so it changes no timeline or uptime from
    /// `from_ms` on.
    fn all_state_changes(&self, from_ms: i64) -> Result<Arc<ChangesByTarget>, StoreError>;

    /// The newest `limit` state changes of one target, newest first.
    fn events(
        &self,
        job: &str,
        instance: &str,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// One target's response-time buckets since `from_ms`, by agent, oldest first.
    fn latency(
        &self,
        job: &str,
        instance: &str,
        from_ms: i64,
    ) -> Result<BTreeMap<String, Vec<StoredBucket>>, StoreError>;

    /// The times the aggregator was not running that end after `from_ms`, oldest first.
    fn gaps(&self, from_ms: i64) -> Result<Vec<Gap>, StoreError>;

    /// One target's changes, with the agents' views, that tell its states over
    /// `[from_ms, to_ms)`: the last one before `from_ms`, those inside, and the first
    /// one from `to_ms` on (when an incident open at the end ended); oldest first.
    fn changes_between(
        &self,
        job: &str,
        instance: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Event>, StoreError>;

    /// The targets the history has any change of, of `job` (or every job), sorted.
    fn targets_in_history(&self, job: Option<&str>) -> Result<Vec<(String, String)>, StoreError>;
}

/// The history in the aggregator's store, with the status page's timelines kept between
/// loads while nothing changes.
pub struct StoredHistory {
    store: Arc<Store>,
    timelines: Mutex<Option<Timelines>>,
}

/// The last answer to `all_state_changes`: for `from_ms`, while the state changes'
/// table was as `mark` says.
struct Timelines {
    mark: ChangesMark,
    from_ms: i64,
    changes: Arc<ChangesByTarget>,
}

/// The newest state change's row id and what the state changes weigh: an insert raises
/// the first, a removal lowers the second.
type ChangesMark = (Option<i64>, Option<i64>);

impl StoredHistory {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            timelines: Mutex::new(None),
        }
    }

    fn mark(&self) -> Result<ChangesMark, StoreError> {
        self.store
            .conn()
            .prepare_cached(
                "SELECT (SELECT MAX(rowid) FROM target_events),
                        (SELECT bytes FROM history_bytes WHERE part = 'events')",
            )
            .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
            .map_err(|e| self.store.failed(e))
    }
}

impl HistoryReader for StoredHistory {
    fn state_changes(
        &self,
        job: &str,
        instance: &str,
        from_ms: i64,
    ) -> Result<Vec<(i64, HistoryState)>, StoreError> {
        self.store
            .state_changes(job, instance, from_ms)
            .map_err(|e| self.store.failed(e))
    }

    fn all_state_changes(&self, from_ms: i64) -> Result<Arc<ChangesByTarget>, StoreError> {
        let mark = self.mark()?;
        let mut kept = self.timelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = kept.as_ref()
            && t.mark == mark
            && t.from_ms <= from_ms
        {
            return Ok(t.changes.clone());
        }
        let changes = Arc::new(
            self.store
                .all_state_changes(from_ms)
                .map_err(|e| self.store.failed(e))?,
        );
        *kept = Some(Timelines {
            mark,
            from_ms,
            changes: changes.clone(),
        });
        Ok(changes)
    }

    fn events(
        &self,
        job: &str,
        instance: &str,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.store
            .events(job, instance, limit)
            .map_err(|e| self.store.failed(e))
    }

    fn latency(
        &self,
        job: &str,
        instance: &str,
        from_ms: i64,
    ) -> Result<BTreeMap<String, Vec<StoredBucket>>, StoreError> {
        self.store
            .latency(job, instance, from_ms)
            .map_err(|e| self.store.failed(e))
    }

    fn gaps(&self, from_ms: i64) -> Result<Vec<Gap>, StoreError> {
        self.store.gaps(from_ms).map_err(|e| self.store.failed(e))
    }

    fn changes_between(
        &self,
        job: &str,
        instance: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Event>, StoreError> {
        self.store
            .changes_between(job, instance, from_ms, to_ms)
            .map_err(|e| self.store.failed(e))
    }

    fn targets_in_history(&self, job: Option<&str>) -> Result<Vec<(String, String)>, StoreError> {
        self.store
            .targets_in_history(job)
            .map_err(|e| self.store.failed(e))
    }
}

/// The reports' reads (see [`HistoryReader::changes_between`]).
impl Store {
    fn changes_between(
        &self,
        job: &str,
        instance: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> rusqlite::Result<Vec<Event>> {
        const COLUMNS: &str = "ts_ms, state, agents, succeeding, views";
        let conn = self.conn();
        let row = |r: &rusqlite::Row<'_>| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, String>(4)?,
            ))
        };
        let before = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM target_events WHERE job = ?1 AND instance = ?2 AND ts_ms < ?3
                 ORDER BY ts_ms DESC, rowid DESC LIMIT 1"
            ))?
            .query_row(params![job, instance, from_ms], row)
            .optional()?;
        let after = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM target_events WHERE job = ?1 AND instance = ?2 AND ts_ms >= ?3
                 ORDER BY ts_ms, rowid LIMIT 1"
            ))?
            .query_row(params![job, instance, to_ms.max(from_ms)], row)
            .optional()?;
        let mut inside = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM target_events WHERE job = ?1 AND instance = ?2
               AND ts_ms >= ?3 AND ts_ms < ?4 ORDER BY ts_ms, rowid"
        ))?;
        let inside = inside
            .query_map(params![job, instance, from_ms, to_ms], row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut out = Vec::new();
        for (ts, state, agents, succeeding, views) in before.into_iter().chain(inside).chain(after)
        {
            let Some(state) = HistoryState::parse(&state) else {
                continue;
            };
            out.push(Event {
                timestamp_ms: ts,
                state,
                agents,
                succeeding,
                views: serde_json::from_str(&views).unwrap_or_default(),
            });
        }
        Ok(out)
    }

    fn targets_in_history(&self, job: Option<&str>) -> rusqlite::Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT job, instance FROM target_events WHERE ?1 IS NULL OR job = ?1
             ORDER BY job, instance",
        )?;
        let rows = stmt.query_map(params![job], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Event, EventView, Limits, Writes, segments};
    use crate::storage::history::ApplyWrites;
    use HistoryState::*;
    use std::time::Duration;

    fn change(ts: i64, state: HistoryState) -> Writes {
        Writes {
            events: vec![(
                ("j".to_string(), "i".to_string()),
                Event {
                    timestamp_ms: ts,
                    state,
                    agents: 1,
                    succeeding: u32::from(state == Up),
                    views: vec![EventView {
                        agent: "a".into(),
                        success: state == Up,
                        fresh: true,
                        timestamp_ms: ts,
                        failure: String::new(),
                    }],
                },
            )],
            buckets: Vec::new(),
        }
    }

    /// What the status page draws for the target from `from` to `to`.
    fn timeline(changes: &ChangesByTarget, from: i64, to: i64) -> Vec<crate::history::Segment> {
        let key = ("j".to_string(), "i".to_string());
        segments(
            changes.get(&key).map_or(&[][..], Vec::as_slice),
            &[],
            from,
            to,
        )
    }

    #[test]
    fn a_report_reads_the_changes_that_bound_its_window() {
        let store = Arc::new(Store::in_memory().unwrap());
        let reader = StoredHistory::new(store.clone());
        for (ts, state) in [
            (1_000, Up),
            (2_000, Down),
            (3_000, Up),
            (4_000, Down),
            (5_000, Up),
        ] {
            store.transaction(|tx| change(ts, state).apply(tx)).unwrap();
        }
        let at = |events: Vec<Event>| events.iter().map(|e| e.timestamp_ms).collect::<Vec<_>>();
        assert_eq!(
            at(reader.changes_between("j", "i", 2_500, 3_500).unwrap()),
            [2_000, 3_000, 4_000]
        );
        assert_eq!(
            at(reader.changes_between("j", "i", 0, 500).unwrap()),
            [1_000]
        );
        assert_eq!(
            at(reader.changes_between("j", "i", 9_000, 9_500).unwrap()),
            [5_000]
        );
        assert!(
            reader
                .changes_between("j", "x", 0, 9_000)
                .unwrap()
                .is_empty()
        );
        let all = reader.targets_in_history(None).unwrap();
        assert_eq!(all, [("j".to_string(), "i".to_string())]);
        assert_eq!(reader.targets_in_history(Some("j")).unwrap(), all);
        assert!(reader.targets_in_history(Some("k")).unwrap().is_empty());
    }

    #[test]
    fn the_timelines_show_every_change_as_soon_as_it_is_committed() {
        let store = Arc::new(Store::in_memory().unwrap());
        let reader = StoredHistory::new(store.clone());
        store.transaction(|tx| change(1_000, Up).apply(tx)).unwrap();
        let first = reader.all_state_changes(0).unwrap();
        assert_eq!(first[&("j".to_string(), "i".to_string())], [(1_000, Up)]);

        // Later loads, the window moved on: what a fresh query draws.
        for from in [500, 1_500, 3_000] {
            let kept = reader.all_state_changes(from).unwrap();
            let fresh = store.all_state_changes(from).unwrap();
            assert_eq!(
                timeline(&kept, from, 10_000),
                timeline(&fresh, from, 10_000)
            );
        }

        // A change committed since the last load is on the next one.
        store
            .transaction(|tx| change(4_000, Down).apply(tx))
            .unwrap();
        let after = reader.all_state_changes(3_000).unwrap();
        assert_eq!(
            timeline(&after, 3_000, 10_000),
            timeline(&store.all_state_changes(3_000).unwrap(), 3_000, 10_000)
        );
        assert_eq!(timeline(&after, 3_000, 10_000).last().unwrap().state, Down);

        // And so is a removal: the size bound takes the oldest changes.
        let limits = Limits {
            retention: Duration::from_secs(86_400),
            max_size: 1,
        };
        store.prune_history(limits, 5_000).unwrap();
        let pruned = reader.all_state_changes(3_000).unwrap();
        assert_eq!(pruned, Arc::new(store.all_state_changes(3_000).unwrap()));

        // An earlier window than the one kept is read afresh.
        let earlier = reader.all_state_changes(0).unwrap();
        assert_eq!(earlier, Arc::new(store.all_state_changes(0).unwrap()));
    }
}
