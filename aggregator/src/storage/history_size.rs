//! What the history weighs in bytes, for `history.max_size`: the running total the
//! triggers of `schema::HISTORY_BYTES` keep, and the removal of the oldest rows by weight.

use rusqlite::{Transaction, params};

/// What a row weighs beyond its text, for `history.max_size`: integers, record and
/// cell headers, index entries' own keys, free space left in pages. The text columns
/// count at their length in bytes, twice where an index repeats them; `schema::HISTORY_BYTES`
/// has the same figures. Measured by the database's page count over 20,000 rows of
/// typical size: a state change took 228 bytes and is counted as 234, a bucket 144 and
/// is counted as 155.
pub const EVENT_ROW_OVERHEAD: u64 = 64;
pub const BUCKET_ROW_OVERHEAD: u64 = 80;
pub const RUN_ROW_BYTES: u64 = 48;

/// What the history weighs, by table, as the triggers of `schema::HISTORY_BYTES` keep it.
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
