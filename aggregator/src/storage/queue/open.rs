//! Opening an endpoint's queue: its row, the order check seeded with what is queued,
//! the blocks laid out again when the shard count changed.

use super::block::{self, BlockBuilder};
use super::hints::ShardHint;
use super::labels::{Cache, LabelsMap};
use super::metrics::{Counters, Stats};
use super::reader::{Dict, load_dict};
use super::schema::{INSERT_BLOCK, ensure_schema, insert_block};
use super::{Shard, Shared};
use crate::remote_write::config::{ProtobufMessage, QueueConfig, RemoteWriteError, fnv1a64};
use crate::remote_write::tail::Tail;
use crate::storage::Store;
use rusqlite::{Transaction, params};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

impl Shared {
    /// Opens the endpoint's queue in `store` (creating its rows on first use), seeds the
    /// order check with what is queued, and lays the blocks out again if the shard count
    /// changed.
    pub(crate) fn open(
        name: String,
        url: String,
        external_labels: Vec<(String, String)>,
        queue: &QueueConfig,
        message: ProtobufMessage,
        store: Arc<Store>,
    ) -> Result<Self, RemoteWriteError> {
        ensure_schema(&store)?;
        let fail = |source| RemoteWriteError::Queue {
            what: format!("{name:?}"),
            source,
        };
        let shard_count = queue.max_shards.max(1);
        let restored: LabelsMap<i64>;
        let (endpoint_id, queued_samples, queued_bytes, max_id, max_epoch, damaged) = {
            let mut conn = store.conn();
            let tx = conn.transaction().map_err(fail)?;
            tx.execute(
                "INSERT INTO rw_endpoints (name, url, shards) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET url = excluded.url",
                params![name, url, shard_count as i64],
            )
            .map_err(fail)?;
            let (id, stored_shards): (i64, i64) = tx
                .query_row(
                    "SELECT id, shards FROM rw_endpoints WHERE name = ?1",
                    params![name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(fail)?;
            let (_, dict) = load_dict(&tx, id, None).map_err(fail)?;
            let max_id = dict.values().flat_map(|m| m.keys()).max().copied();
            let relayout = stored_shards != shard_count as i64;
            let restore =
                restore_blocks(&tx, id, &dict, relayout.then_some(queue)).map_err(fail)?;
            restored = restore.last;
            if relayout {
                tx.execute(
                    "UPDATE rw_endpoints SET shards = ?2 WHERE id = ?1",
                    params![id, shard_count as i64],
                )
                .map_err(fail)?;
                tracing::info!(
                    remote_name = %name,
                    from = stored_shards,
                    to = shard_count,
                    "remote write queue laid out again for a new queue_config.max_shards"
                );
            }
            let (samples, bytes): (i64, i64) = tx
                .query_row(
                    "SELECT queued_samples, queued_bytes FROM rw_endpoints WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(fail)?;
            tx.commit().map_err(fail)?;
            let max_epoch = dict.keys().copied().chain(restore.max_epoch).max();
            (
                id,
                samples.max(0) as u64,
                bytes.max(0) as u64,
                max_id,
                max_epoch,
                restore.damaged,
            )
        };
        if damaged > 0 {
            tracing::error!(remote_name = %name, samples = damaged, "remote write queue: dropped damaged blocks found on start; counted in sonde_remote_write_samples_dropped_total{{reason=\"damaged\"}}");
        }
        if queued_samples > 0 {
            tracing::info!(
                remote_name = %name,
                url = %url,
                samples = queued_samples,
                bytes = queued_bytes,
                "resuming the remote write queue kept on disk"
            );
        }
        let now = Instant::now();
        let shards = (0..shard_count)
            .map(|i| {
                let mut hint = ShardHint::default();
                if queued_samples > 0 {
                    // Unknown split across shards: every shard reads once, which corrects it.
                    hint.add(
                        queue.max_samples_per_send as u64,
                        now - Duration::from_secs(86400),
                    );
                }
                Shard {
                    hint: Mutex::new(hint),
                    wake: Notify::new(),
                    select: format!(
                        "SELECT id, epoch, first, samples FROM rw_blocks
                         WHERE endpoint = {endpoint_id} AND shard = {i} AND id > ?1
                         ORDER BY id LIMIT ?2"
                    ),
                }
            })
            .collect();
        let epoch = max_epoch.map_or(0, |e| e + 1);
        Ok(Self {
            name,
            url,
            endpoint_id,
            external_labels,
            store,
            queue: queue.clone(),
            cache: Mutex::new(Cache::new(
                restored,
                max_id.map_or(0, |m| m + 1),
                epoch,
                now,
            )),
            epoch: AtomicI64::new(epoch),
            dict: Mutex::new(HashMap::new()),
            shards,
            stats: Mutex::new(Stats {
                queued_samples,
                queued_bytes,
                counters: Counters {
                    dropped_damaged: damaged,
                    ..Counters::default()
                },
                ..Stats::default()
            }),
            configured: message,
            v2: AtomicBool::new(message == ProtobufMessage::RequestV2),
            tail: Tail::default(),
        })
    }
}

pub(super) struct Restored {
    pub(super) last: LabelsMap<i64>,
    pub(super) max_epoch: Option<i64>,
    pub(super) damaged: u64,
}

/// Reads every block of `endpoint`: the last timestamp queued per series, and, with
/// `relayout`, the blocks written again for its shard count (per series order kept:
/// a series' samples all come from one old shard, read in order).
pub(super) fn restore_blocks(
    tx: &Transaction<'_>,
    endpoint: i64,
    dict: &Dict,
    relayout: Option<&QueueConfig>,
) -> rusqlite::Result<Restored> {
    let mut out = Restored {
        last: LabelsMap::default(),
        max_epoch: None,
        damaged: 0,
    };
    let rows: Vec<(i64, i64, i64, i64, i64, Vec<u8>)> = tx
        .prepare(
            "SELECT id, epoch, first, samples, bytes, data FROM rw_blocks
             WHERE endpoint = ?1 ORDER BY shard, id",
        )?
        .query_map(params![endpoint], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let shard_count = relayout.map_or(1, |q| q.max_shards.max(1));
    let per_block = relayout.map_or(usize::MAX, |q| q.max_samples_per_send.max(1));
    let mut rebuilt: BTreeMap<(i64, usize), Vec<BlockBuilder>> = BTreeMap::new();
    let (mut lost_samples, mut lost_bytes) = (0i64, 0i64);
    for (id, epoch, first, samples, bytes, data) in rows {
        out.max_epoch = Some(out.max_epoch.map_or(epoch, |m| m.max(epoch)));
        let labels = dict.get(&epoch);
        let block = block::decode(&data).ok().filter(|b| {
            b.series
                .iter()
                .all(|(sid, _)| labels.is_some_and(|m| m.contains_key(sid)))
        });
        let Some(block) = block else {
            let n = (samples - first).max(0);
            out.damaged += n as u64;
            lost_samples += n;
            lost_bytes += bytes;
            tx.execute("DELETE FROM rw_blocks WHERE id = ?1", params![id])?;
            continue;
        };
        let labels = labels.expect("checked above");
        for &(s, ts, value) in block.samples.iter().skip(first.max(0) as usize) {
            let (sid, weight) = block.series[s as usize];
            let pb = &labels[&sid];
            let last = out.last.entry(pb.clone()).or_insert(ts);
            *last = (*last).max(ts);
            if relayout.is_some() {
                let shard = (fnv1a64(pb) % shard_count as u64) as usize;
                let builders = rebuilt.entry((epoch, shard)).or_default();
                if builders.last().is_none_or(|b| b.len() >= per_block) {
                    builders.push(BlockBuilder::default());
                }
                if let Some(b) = builders.last_mut() {
                    b.push(sid, weight, ts, value);
                }
            }
        }
    }
    if relayout.is_some() {
        tx.execute(
            "DELETE FROM rw_blocks WHERE endpoint = ?1",
            params![endpoint],
        )?;
        let mut insert = tx.prepare_cached(INSERT_BLOCK)?;
        // Epoch by epoch, so that within a shard the blocks keep their order.
        for ((epoch, shard), builders) in rebuilt {
            for b in builders {
                insert_block(&mut insert, endpoint, shard, epoch, b)?;
            }
        }
    }
    if lost_samples > 0 {
        tx.execute(
            "UPDATE rw_endpoints SET queued_samples = queued_samples - ?2, queued_bytes = queued_bytes - ?3 WHERE id = ?1",
            params![endpoint, lost_samples, lost_bytes],
        )?;
    }
    Ok(out)
}
