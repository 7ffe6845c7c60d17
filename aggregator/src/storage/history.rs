//! The history's SQL: the rows a commit writes, the queries the web pages and
//! `/api/v1/targets/history` read (through [`HistoryReader`](super::HistoryReader)), and the folding and pruning
//! that keep it within `history.retention` and `history.max_size`.

use super::Store;
pub use super::history_size::{
    BUCKET_ROW_OVERHEAD, EVENT_ROW_OVERHEAD, HistoryBytes, RUN_ROW_BYTES,
};
use super::history_size::{history_bytes, remove_oldest_buckets, remove_oldest_events};
use crate::history::{
    ChangesByTarget, Event, Gap, HOUR_MS, HistoryState, Limits, MINUTE_BUCKETS_FOR, MINUTE_MS,
    StoredBucket, StoredEvent, Writes,
};
use rusqlite::{OptionalExtension, Transaction, params};

/// The aggregator's starts kept, newest first (a crash loop does not fill the history).
const MAX_RUNS_KEPT: i64 = 1_000;

/// Writes `writes` in the caller's transaction (a group's commit).
pub fn save(tx: &Transaction<'_>, writes: &Writes) -> rusqlite::Result<()> {
    if !writes.events.is_empty() {
        let mut insert = tx.prepare_cached(
            "INSERT INTO target_events (job, instance, ts_ms, state, agents, succeeding, views)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut last_state = tx.prepare_cached(
            "SELECT state FROM target_events WHERE job = ?1 AND instance = ?2
                 ORDER BY ts_ms DESC, rowid DESC LIMIT 1",
        )?;
        for ((job, instance), e) in &writes.events {
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
    if !writes.buckets.is_empty() {
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
        for ((job, instance), agent, b) in &writes.buckets {
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

/// [`save`] as a method of the hub's [`Writes`].
pub trait ApplyWrites {
    /// Writes these rows in the caller's transaction.
    fn apply(&self, tx: &Transaction<'_>) -> rusqlite::Result<()>;
}

impl ApplyWrites for Writes {
    fn apply(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        save(tx, self)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Bucket, EventView, Segment, durations, segments};
    use HistoryState::*;
    use std::time::Duration;

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
}
