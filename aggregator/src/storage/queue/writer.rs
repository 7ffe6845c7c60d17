//! The enqueue: inside the caller's transaction, a batch's samples appended as one block
//! per shard, their series' labels to the dictionary once per epoch, and the byte bound
//! enforced by dropping the oldest samples.

use super::block::{self, BlockBuilder};
use super::hints::ShardHint;
use super::schema::{INSERT_BLOCK, insert_block};
use super::{BLOCKS_PER_READ, Shared, lock};
use crate::remote_write::request::LabelsPb;
use crate::remote_write::tail::TailBlock;
use crate::series::SampleSource;
use rusqlite::{Transaction, params};
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// A block an enqueue is filling, and the same samples in request form for the tail.
pub(super) struct OpenBlock {
    pub(super) block: BlockBuilder,
    pub(super) tail: Option<TailBlock>,
}

pub(super) struct Eviction {
    pub(super) per_shard: Vec<u64>,
    pub(super) in_flight: Vec<u64>,
    pub(super) dropped: u64,
}

impl Shared {
    /// Inside the caller's transaction: external labels applied, samples not newer than
    /// their series' last queued one dropped (counted), the rest appended as one block
    /// per shard, the byte bound enforced by dropping the oldest (counted). Call
    /// [`Shared::wake`] after the commit.
    pub(crate) fn enqueue<S: SampleSource + ?Sized>(
        &self,
        tx: &Transaction<'_>,
        samples: &S,
    ) -> rusqlite::Result<()> {
        self.tail.discard_staged();
        if samples.sample_count() == 0 {
            return Ok(());
        }
        let endpoint = self.endpoint_id;
        let shard_count = self.shards.len();
        let per_block = self.queue.max_samples_per_send.max(1);
        let (mut q_samples, mut q_bytes, enqueues): (i64, i64, i64) = tx
            .prepare_cached(
                "SELECT queued_samples, queued_bytes, enqueues FROM rw_endpoints WHERE id = ?1",
            )?
            .query_row(params![endpoint], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let mut invalid = 0u64;
        let mut out_of_order = 0u64;
        let mut added = vec![0u64; shard_count];
        let mut cache = lock(&self.cache);
        cache.resolve(enqueues);
        // What `enqueues` reads once this transaction commits: set before anything is
        // staged, so that an enqueue failing half-way is undone like a rolled-back one.
        cache.staged_mark = Some(enqueues + 1);
        cache.generation += 1;
        if cache.epoch_started.elapsed() >= cache.epoch_length {
            cache.epoch += 1;
            cache.epoch_started = Instant::now();
            self.epoch.store(cache.epoch, Ordering::Relaxed);
        }
        let generation = cache.generation;
        let epoch = cache.epoch;
        let expected = (samples.sample_count() / shard_count + 1).min(per_block);
        // The blocks in request form too, while the endpoint speaks 1.0 and the tail has
        // room.
        let tail = !self.v2.load(Ordering::Relaxed) && self.tail.has_room();
        let new_block = || OpenBlock {
            block: BlockBuilder::with_capacity(expected),
            tail: tail.then(|| TailBlock::with_capacity(expected)),
        };
        let mut open: Vec<OpenBlock> = (0..shard_count).map(|_| new_block()).collect();
        let mut full: Vec<(usize, OpenBlock)> = Vec::new();
        let mut dict: Vec<(u64, LabelsPb)> = Vec::new();
        for (series, timestamp_ms, value) in samples.each() {
            let Some((index, entry)) = cache.entry(
                series,
                &self.external_labels,
                shard_count,
                |problem, labels| self.warn_invalid(problem, labels),
            ) else {
                invalid += 1;
                continue;
            };
            // A second sample at the same or an earlier time would make the receiver
            // refuse the whole request (HTTP 400), losing good samples with it.
            if timestamp_ms <= entry.last_ts {
                out_of_order += 1;
                continue;
            }
            let undo = (entry.staged_by != generation).then_some((
                entry.id,
                entry.last_ts,
                entry.dict_epoch,
            ));
            entry.staged_by = generation;
            entry.last_ts = timestamp_ms;
            if entry.dict_epoch != epoch {
                dict.push((entry.id, entry.labels.clone()));
                entry.dict_epoch = epoch;
            }
            let (shard, weight) = (entry.shard, entry.weight);
            let builder = &mut open[shard];
            builder.block.push(entry.id, weight, timestamp_ms, value);
            if let Some(tail) = &mut builder.tail {
                tail.push(&entry.labels, weight, timestamp_ms, value);
            }
            if builder.block.len() >= per_block {
                full.push((shard, std::mem::replace(builder, new_block())));
            }
            added[shard] += 1;
            q_samples += 1;
            q_bytes += weight as i64;
            if let Some((id, ts, in_dict)) = undo {
                cache.staged.push((index, id, ts, in_dict));
            }
        }
        if !dict.is_empty() {
            tx.prepare_cached("INSERT INTO rw_dict (endpoint, epoch, data) VALUES (?1, ?2, ?3)")?
                .execute(params![endpoint, epoch, block::encode_dict(&dict)])?;
        }
        {
            let mut insert = tx.prepare_cached(INSERT_BLOCK)?;
            let last = open
                .into_iter()
                .enumerate()
                .filter(|(_, b)| b.block.len() > 0);
            for (shard, b) in full.into_iter().chain(last) {
                let id = insert_block(&mut insert, endpoint, shard, epoch, b.block)?;
                if let Some(tail) = b.tail {
                    self.tail.stage(id, tail);
                }
            }
        }
        let evicted = if q_bytes as u64 > self.queue.max_queue_bytes.0 {
            self.evict(tx, &mut q_samples, &mut q_bytes)?
        } else {
            Eviction {
                per_shard: vec![0; shard_count],
                in_flight: vec![0; shard_count],
                dropped: 0,
            }
        };
        tx.prepare_cached(
            "UPDATE rw_endpoints SET queued_samples = ?2, queued_bytes = ?3, enqueues = ?4
             WHERE id = ?1",
        )?
        .execute(params![endpoint, q_samples, q_bytes, enqueues + 1])?;
        cache.prune();
        drop(cache);

        let now = Instant::now();
        for (i, shard) in self.shards.iter().enumerate() {
            if evicted.per_shard[i] == 0 && evicted.in_flight[i] == 0 && added[i] == 0 {
                continue;
            }
            let mut hint = lock(&shard.hint);
            if evicted.per_shard[i] > 0 {
                hint.consume(evicted.per_shard[i]);
            }
            hint.evicted_in_flight += evicted.in_flight[i];
            if added[i] > 0 {
                hint.add(added[i], now);
            }
        }
        let mut stats = lock(&self.stats);
        stats.counters.dropped_invalid_labels += invalid;
        stats.counters.dropped_out_of_order += out_of_order;
        stats.counters.dropped_queue_full += evicted.dropped;
        stats.queued_samples = q_samples.max(0) as u64;
        stats.queued_bytes = q_bytes.max(0) as u64;
        Ok(())
    }

    pub(super) fn warn_invalid(&self, problem: &str, labels: &[(String, String)]) {
        let mut stats = lock(&self.stats);
        if !stats.warned_invalid {
            stats.warned_invalid = true;
            tracing::warn!(
                remote_name = %self.name,
                url = %self.url,
                ?labels,
                "dropping samples whose labels no receiver accepts ({problem}); \
                 counted in sonde_remote_write_samples_dropped_total{{reason=\"invalid_labels\"}}, \
                 logged once"
            );
        }
    }

    /// Drops the oldest samples until the queue fits `max_queue_bytes`.
    pub(super) fn evict(
        &self,
        tx: &Transaction<'_>,
        q_samples: &mut i64,
        q_bytes: &mut i64,
    ) -> rusqlite::Result<Eviction> {
        let endpoint = self.endpoint_id;
        let max = self.queue.max_queue_bytes.0 as i64;
        let hints: Vec<MutexGuard<'_, ShardHint>> =
            self.shards.iter().map(|s| lock(&s.hint)).collect();
        let mut out = Eviction {
            per_shard: vec![0; self.shards.len()],
            in_flight: vec![0; self.shards.len()],
            dropped: 0,
        };
        let mut select = tx.prepare_cached(
            "SELECT id, shard, epoch, first, samples, bytes, data FROM rw_blocks
             WHERE endpoint = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM rw_blocks WHERE id = ?1")?;
        let mut advance =
            tx.prepare_cached("UPDATE rw_blocks SET first = ?2, bytes = ?3 WHERE id = ?1")?;
        let mut after = i64::MIN;
        let mut deleted_epoch: Option<i64> = None;
        'outer: while *q_bytes > max {
            type Row = (i64, i64, i64, i64, i64, i64, Vec<u8>);
            let rows: Vec<Row> = select
                .query_map(params![endpoint, after, BLOCKS_PER_READ], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            if rows.is_empty() {
                break;
            }
            for (id, shard, epoch, first, samples, bytes, data) in rows {
                if *q_bytes <= max {
                    break 'outer;
                }
                after = id;
                let shard = (shard.max(0) as usize).min(self.shards.len() - 1);
                let (first, samples) = (first.max(0) as u32, samples.max(0) as u32);
                let cut = if *q_bytes - bytes >= max {
                    *q_bytes -= bytes;
                    samples
                } else {
                    // Part of this block is enough: drop its samples one by one.
                    let Ok(block) = block::decode(&data) else {
                        *q_bytes -= bytes;
                        *q_samples -= i64::from(samples.saturating_sub(first));
                        out.dropped += u64::from(samples.saturating_sub(first));
                        self.tail.remove(id);
                        delete.execute(params![id])?;
                        continue;
                    };
                    let mut i = first;
                    let mut gone = 0i64;
                    while *q_bytes > max && i < samples {
                        let w = block.weight(i as usize) as i64;
                        *q_bytes -= w;
                        gone += w;
                        i += 1;
                    }
                    if i < samples {
                        advance.execute(params![id, i64::from(i), bytes - gone])?;
                    }
                    i
                };
                if cut >= samples {
                    self.tail.remove(id);
                    delete.execute(params![id])?;
                    deleted_epoch = Some(deleted_epoch.map_or(epoch, |e: i64| e.min(epoch)));
                }
                let n = u64::from(cut.saturating_sub(first));
                *q_samples -= n as i64;
                let flying = hints[shard].in_flight_among(id, first, cut);
                out.per_shard[shard] += n;
                out.in_flight[shard] += flying;
                out.dropped += n - flying;
            }
        }
        drop(hints);
        if deleted_epoch.is_some() {
            self.gc_dict(tx)?;
        }
        Ok(out)
    }

    /// Deletes the dictionary rows of epochs no block needs any more (never the
    /// current one: enqueues count on its rows).
    pub(super) fn gc_dict(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let current = self.epoch.load(Ordering::Relaxed);
        tx.prepare_cached(
            "DELETE FROM rw_dict WHERE endpoint = ?1 AND epoch < MIN(?2,
               COALESCE((SELECT MIN(epoch) FROM rw_blocks WHERE endpoint = ?1), ?2))",
        )?
        .execute(params![self.endpoint_id, current])?;
        Ok(())
    }
}
