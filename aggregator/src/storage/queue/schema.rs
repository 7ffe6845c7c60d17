//! The queue's tables (shared by every endpoint, keyed by a small endpoint id), the
//! conversion of the first format's rows, and the report of queues left on disk by
//! endpoints no longer configured.

use super::block::{self, BlockBuilder};
use crate::remote_write::config::RemoteWriteError;
use crate::remote_write::request::{self, LabelsPb};
use crate::storage::Store;
use rusqlite::{Transaction, params};
use std::collections::HashMap;

/// Samples per block when old-format rows are converted.
const MIGRATED_BLOCK: usize = 2000;

/// A new block, nothing of it done yet (`first` 0).
pub(super) const INSERT_BLOCK: &str =
    "INSERT INTO rw_blocks (endpoint, shard, epoch, first, samples, bytes, data)
     VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6)";

/// Stores `block` as the newest block of `shard` with [`INSERT_BLOCK`].
pub(super) fn insert_block(
    insert: &mut rusqlite::CachedStatement<'_>,
    endpoint: i64,
    shard: usize,
    epoch: i64,
    block: BlockBuilder,
) -> rusqlite::Result<i64> {
    let (n, bytes) = (block.len() as i64, block.bytes as i64);
    insert.insert(params![
        endpoint,
        shard as i64,
        epoch,
        n,
        bytes,
        block.finish(false)
    ])
}

/// The tables of every endpoint's queue, created on first use.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rw_endpoints (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    shards INTEGER NOT NULL,
    queued_samples INTEGER NOT NULL DEFAULT 0,
    queued_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rw_blocks (
    id INTEGER PRIMARY KEY,
    endpoint INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    first INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS rw_blocks_shard ON rw_blocks (endpoint, shard);
CREATE INDEX IF NOT EXISTS rw_blocks_age ON rw_blocks (endpoint);
CREATE TABLE IF NOT EXISTS rw_dict (
    id INTEGER PRIMARY KEY,
    endpoint INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS rw_dict_epoch ON rw_dict (endpoint, epoch);
";

/// Creates the queue tables if they are missing, and converts the rows of the queue's
/// first format (one row per sample) to blocks.
pub(crate) fn ensure_schema(store: &Store) -> Result<(), RemoteWriteError> {
    let mut conn = store.conn();
    let fail = |source| RemoteWriteError::Queue {
        what: "tables".into(),
        source,
    };
    let tx = conn.transaction().map_err(fail)?;
    tx.execute_batch(SCHEMA).map_err(fail)?;
    let has_enqueues: bool = tx
        .query_row(
            "SELECT COUNT(*) FROM pragma_table_info('rw_endpoints') WHERE name = 'enqueues'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(fail)?
        > 0;
    if !has_enqueues {
        tx.execute_batch("ALTER TABLE rw_endpoints ADD COLUMN enqueues INTEGER NOT NULL DEFAULT 0")
            .map_err(fail)?;
    }
    migrate_rows(&tx).map_err(fail)?;
    tx.commit().map_err(fail)
}

/// The first format kept a row per sample (`rw_queue`) and per series (`rw_series`,
/// labels as JSON): its rows become blocks of epoch 0, in the same shards and order,
/// and the endpoint is marked for a new layout (series hash to shards differently now),
/// which its next start does.
pub(super) fn migrate_rows(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let exists = |table: &str| -> rusqlite::Result<bool> {
        tx.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            params![table],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    if !exists("rw_queue")? || !exists("rw_series")? {
        return Ok(());
    }
    let series: Vec<(i64, i64, String)> = tx
        .prepare("SELECT endpoint, id, labels FROM rw_series")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut dicts: HashMap<i64, Vec<(u64, LabelsPb)>> = HashMap::new();
    for (endpoint, id, json) in series {
        let labels: Vec<(String, String)> = serde_json::from_str(&json).unwrap_or_default();
        dicts
            .entry(endpoint)
            .or_default()
            .push((id.max(0) as u64, request::labels_pb(&labels).into()));
    }
    for (endpoint, entries) in &dicts {
        tx.execute(
            "INSERT INTO rw_dict (endpoint, epoch, data) VALUES (?1, 0, ?2)",
            params![endpoint, block::encode_dict(entries)],
        )?;
    }
    let mut rows = 0u64;
    {
        let mut select = tx.prepare(
            "SELECT q.endpoint, q.shard, q.series, q.ts, q.bits, q.bytes FROM rw_queue q
             JOIN rw_series s ON s.endpoint = q.endpoint AND s.id = q.series
             ORDER BY q.endpoint, q.shard, q.seq",
        )?;
        let mut insert = tx.prepare(
            "INSERT INTO rw_blocks (endpoint, shard, epoch, first, samples, bytes, data)
             VALUES (?1, ?2, 0, 0, ?3, ?4, ?5)",
        )?;
        let mut current: Option<(i64, i64, BlockBuilder)> = None;
        let mut flush = |current: &mut Option<(i64, i64, BlockBuilder)>| -> rusqlite::Result<()> {
            if let Some((endpoint, shard, b)) = current.take() {
                let (n, bytes) = (b.len() as i64, b.bytes as i64);
                insert.execute(params![endpoint, shard, n, bytes, b.finish(false)])?;
            }
            Ok(())
        };
        let mut query = select.query([])?;
        while let Some(r) = query.next()? {
            let (endpoint, shard, series, ts, bits, bytes): (i64, i64, i64, i64, i64, i64) = (
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            );
            if current
                .as_ref()
                .is_some_and(|(e, s, b)| *e != endpoint || *s != shard || b.len() >= MIGRATED_BLOCK)
            {
                flush(&mut current)?;
            }
            let (_, _, b) =
                current.get_or_insert_with(|| (endpoint, shard, BlockBuilder::default()));
            b.push(
                series.max(0) as u64,
                bytes.max(0) as u64,
                ts,
                f64::from_bits(bits as u64),
            );
            rows += 1;
        }
        flush(&mut current)?;
    }
    tx.execute_batch(
        "DROP TABLE rw_queue;
         DROP TABLE rw_series;
         UPDATE rw_endpoints SET
           shards = 0,
           queued_samples = (SELECT COALESCE(SUM(samples - first), 0) FROM rw_blocks b WHERE b.endpoint = rw_endpoints.id),
           queued_bytes = (SELECT COALESCE(SUM(bytes), 0) FROM rw_blocks b WHERE b.endpoint = rw_endpoints.id);",
    )?;
    tracing::info!(
        samples = rows,
        "remote write queue converted to blocks (the format of this version)"
    );
    Ok(())
}

/// Endpoints with queued samples on disk whose name is not in `configured`: logged once
/// at start. Their blocks are kept (not sent, not counted against any bound), so that
/// configuring the endpoint again under the same name sends them.
pub(crate) fn report_unconfigured(
    store: &Store,
    configured: &[String],
) -> Result<(), RemoteWriteError> {
    ensure_schema(store)?;
    let conn = store.conn();
    let fail = |source| RemoteWriteError::Queue {
        what: "tables".into(),
        source,
    };
    let mut stmt = conn
        .prepare("SELECT name, url, queued_samples, queued_bytes FROM rw_endpoints WHERE queued_samples > 0")
        .map_err(fail)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .map_err(fail)?;
    for row in rows {
        let (name, url, samples, bytes) = row.map_err(fail)?;
        if !configured.contains(&name) {
            tracing::warn!(
                remote_name = %name,
                url = %url,
                samples,
                bytes,
                "samples queued on disk for a remote_write endpoint that is no longer configured \
                 are kept but not sent; configure an endpoint with this name again to send them"
            );
        }
    }
    Ok(())
}
