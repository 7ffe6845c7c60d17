//! What the history weighs in bytes, for `history.max_size`: the running total the
//! triggers of [`SCHEMA_BYTES`] keep, and the removal of the oldest rows by weight.

use super::{BUCKET_ROW_OVERHEAD, EVENT_ROW_OVERHEAD};
use rusqlite::{Transaction, params};

/// What the history weighs, by table, as the triggers of [`SCHEMA_BYTES`] keep it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryBytes {
    pub events: u64,
    pub buckets: u64,
    pub runs: u64,
}

impl HistoryBytes {
    pub fn total(&self) -> u64 {
        self.events + self.buckets + self.runs
    }
}

pub(super) fn history_bytes(conn: &rusqlite::Connection) -> rusqlite::Result<HistoryBytes> {
    let mut out = HistoryBytes::default();
    let mut stmt = conn.prepare_cached("SELECT part, bytes FROM history_bytes")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (part, bytes) = row?;
        let bytes = bytes.max(0) as u64;
        match part.as_str() {
            "events" => out.events = bytes,
            "buckets" => out.buckets = bytes,
            "runs" => out.runs = bytes,
            _ => {}
        }
    }
    Ok(out)
}

/// Deletes the oldest state changes until at least `bytes` are gone (or none is left).
pub(super) fn remove_oldest_events(tx: &Transaction<'_>, bytes: u64) -> rusqlite::Result<u64> {
    let last: Option<(i64, i64)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT ts_ms, rowid, 2 * (octet_length(job) + octet_length(instance))
                    + octet_length(state) + octet_length(views)
             FROM target_events ORDER BY ts_ms, rowid",
        )?;
        let mut rows = stmt.query([])?;
        let (mut gone, mut last) = (0u64, None);
        while gone < bytes
            && let Some(row) = rows.next()?
        {
            last = Some((row.get(0)?, row.get(1)?));
            gone += row.get::<_, i64>(2)?.max(0) as u64 + EVENT_ROW_OVERHEAD;
        }
        last
    };
    let Some((ts, rowid)) = last else {
        return Ok(0);
    };
    Ok(tx.execute(
        "DELETE FROM target_events WHERE ts_ms < ?1 OR (ts_ms = ?1 AND rowid <= ?2)",
        params![ts, rowid],
    )? as u64)
}

/// Deletes the oldest response-time buckets, whole bucket times at once, until at least
/// `bytes` are gone (or none is left).
pub(super) fn remove_oldest_buckets(tx: &Transaction<'_>, bytes: u64) -> rusqlite::Result<u64> {
    let last: Option<i64> = {
        let mut stmt = tx.prepare_cached(
            "SELECT bucket_ms, 2 * (octet_length(job) + octet_length(instance) + octet_length(agent))
             FROM target_latency ORDER BY bucket_ms",
        )?;
        let mut rows = stmt.query([])?;
        let (mut gone, mut last) = (0u64, None);
        while gone < bytes
            && let Some(row) = rows.next()?
        {
            last = Some(row.get(0)?);
            gone += row.get::<_, i64>(1)?.max(0) as u64 + BUCKET_ROW_OVERHEAD;
        }
        last
    };
    let Some(cut) = last else {
        return Ok(0);
    };
    Ok(tx.execute(
        "DELETE FROM target_latency WHERE bucket_ms <= ?1",
        params![cut],
    )? as u64)
}

/// The aggregator's starts and signs of life (its [`Gap`](super::Gap)s), and the
/// running total of what the history weighs. The fixed weights written here are
/// `EVENT_ROW_OVERHEAD`, `BUCKET_ROW_OVERHEAD` and `RUN_ROW_BYTES`, plus the text.
pub const SCHEMA_BYTES: &str = "
CREATE TABLE aggregator_runs (
    started_ms INTEGER PRIMARY KEY,
    alive_ms INTEGER NOT NULL
);
CREATE TABLE history_bytes (
    part TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
);
INSERT INTO history_bytes (part, bytes) VALUES
    ('events', (SELECT COALESCE(SUM(2 * (octet_length(job) + octet_length(instance))
        + octet_length(state) + octet_length(views) + 64), 0) FROM target_events)),
    ('buckets', (SELECT COALESCE(SUM(2 * (octet_length(job) + octet_length(instance)
        + octet_length(agent)) + 80), 0) FROM target_latency)),
    ('runs', 0);
CREATE TRIGGER target_events_bytes_added AFTER INSERT ON target_events BEGIN
    UPDATE history_bytes SET bytes = bytes + 2 * (octet_length(NEW.job) + octet_length(NEW.instance))
        + octet_length(NEW.state) + octet_length(NEW.views) + 64 WHERE part = 'events';
END;
CREATE TRIGGER target_events_bytes_removed AFTER DELETE ON target_events BEGIN
    UPDATE history_bytes SET bytes = bytes - 2 * (octet_length(OLD.job) + octet_length(OLD.instance))
        - octet_length(OLD.state) - octet_length(OLD.views) - 64 WHERE part = 'events';
END;
CREATE TRIGGER target_latency_bytes_added AFTER INSERT ON target_latency BEGIN
    UPDATE history_bytes SET bytes = bytes + 2 * (octet_length(NEW.job) + octet_length(NEW.instance)
        + octet_length(NEW.agent)) + 80 WHERE part = 'buckets';
END;
CREATE TRIGGER target_latency_bytes_removed AFTER DELETE ON target_latency BEGIN
    UPDATE history_bytes SET bytes = bytes - 2 * (octet_length(OLD.job) + octet_length(OLD.instance)
        + octet_length(OLD.agent)) - 80 WHERE part = 'buckets';
END;
CREATE TRIGGER aggregator_runs_bytes_added AFTER INSERT ON aggregator_runs BEGIN
    UPDATE history_bytes SET bytes = bytes + 48 WHERE part = 'runs';
END;
CREATE TRIGGER aggregator_runs_bytes_removed AFTER DELETE ON aggregator_runs BEGIN
    UPDATE history_bytes SET bytes = bytes - 48 WHERE part = 'runs';
END;
";
