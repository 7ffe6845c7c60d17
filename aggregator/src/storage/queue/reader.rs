//! A shard's side: its oldest samples read as a batch (copied from the tail in request
//! form, or read back from the database and grouped by series), then settled once the
//! receiver answered: the cursor moved past them, finished blocks deleted.

use super::block;
use super::{BLOCKS_PER_READ, Shared, lock};
use crate::remote_write::request::{self, LabelsPb, SeriesBatch, TimeSeriesFields};
use crate::remote_write::tail::TailBlock;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tokio::time::Instant;

/// The dictionaries the shards read, by epoch: the last row id loaded and the labels by
/// series id.
pub(super) type DictCache = HashMap<i64, (i64, block::IdMap<LabelsPb>)>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Part of a block read for a request: its samples `from..to`.
pub(super) struct Span {
    pub(super) block: i64,
    pub(super) epoch: i64,
    pub(super) from: u32,
    pub(super) to: u32,
    /// The weight of each sample `from..to`.
    pub(super) weights: Vec<u64>,
}

/// A block's row without its data.
pub(super) struct BlockRow {
    pub(super) id: i64,
    pub(super) epoch: i64,
    /// The shard's cursor in it.
    pub(super) first: u32,
    pub(super) samples: u32,
}

/// Samples of a shard about to be sent.
pub(crate) struct Batch {
    pub(super) spans: Vec<Span>,
    /// The samples to send, grouped by series in order of first appearance (read from
    /// the database)...
    pub(crate) series: Vec<SeriesBatch>,
    /// ... or in request form (from the tail); one of the two is empty.
    pub(crate) fields: TimeSeriesFields,
    /// Samples read, including those dropped on reading.
    pub(crate) scanned: u64,
    pub(super) too_old: u64,
    pub(super) damaged: u64,
}

/// What became of a batch's samples once settled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Stored by the receiver.
    pub sent: u64,
    /// Refused for good (4xx other than 429).
    pub refused: u64,
    /// Impossible to encode.
    pub too_large: u64,
    /// Compressed bytes of the accepted requests.
    pub bytes: u64,
}

impl std::ops::Add for Tally {
    type Output = Tally;
    fn add(self, o: Tally) -> Tally {
        Tally {
            sent: self.sent + o.sent,
            refused: self.refused + o.refused,
            too_large: self.too_large + o.too_large,
            bytes: self.bytes + o.bytes,
        }
    }
}

impl Shared {
    /// The dictionary with `epoch`'s part loaded (again, if one of `ids` is newer than
    /// what was loaded); held locked while the caller looks labels up in it.
    pub(super) fn dictionary(
        &self,
        epoch: i64,
        mut ids: impl Iterator<Item = u64>,
    ) -> rusqlite::Result<MutexGuard<'_, DictCache>> {
        let mut dict = lock(&self.dict);
        let missing = match dict.get(&epoch) {
            None => true,
            Some((_, m)) => ids.any(|id| !m.contains_key(&id)),
        };
        if missing {
            let after = dict.get(&epoch).map_or(0, |(row, _)| *row);
            let conn = self.store.conn();
            let (row, loaded) = load_dict(&conn, self.endpoint_id, Some((epoch, after)))?;
            drop(conn);
            let entry = dict.entry(epoch).or_default();
            entry.0 = entry.0.max(row);
            entry.1.extend(loaded.into_values().flatten());
            // Epochs older than every shard's last read are done with.
            let oldest = self
                .shards
                .iter()
                .filter_map(|s| lock(&s.hint).epoch)
                .min()
                .unwrap_or(epoch)
                .min(epoch);
            dict.retain(|e, _| *e >= oldest);
        }
        Ok(dict)
    }

    /// The shard's oldest samples, at most `max_samples_per_send`, marked in flight.
    /// Samples older than `sample_age_limit` and those of damaged blocks are counted and
    /// left out (dropped when the batch is settled).
    pub(crate) fn read_batch(&self, shard: usize) -> rusqlite::Result<Batch> {
        let limit = self.queue.max_samples_per_send.max(1) as u64;
        let age_limit = self.queue.sample_age_limit.0;
        let cutoff = if age_limit.is_zero() {
            i64::MIN
        } else {
            now_ms() - age_limit.as_millis() as i64
        };
        let mut batch = Batch {
            spans: Vec::new(),
            series: Vec::new(),
            fields: TimeSeriesFields::default(),
            scanned: 0,
            too_old: 0,
            damaged: 0,
        };
        // Grouped by series id: ids are never reused for other labels, and hashing an
        // id is far cheaper than hashing the labels.
        let mut index: block::IdMap<usize> = block::IdMap::default();
        let mut after = i64::MIN;
        let mut reached_end = false;
        let mut last_epoch = None;
        // A batch is in one form, set by its first block with samples left: request form
        // from the tail, or grouped by series from the database.
        let mut from_tail: Option<bool> = None;
        let use_tail = !self.v2.load(Ordering::Relaxed);
        'read: while batch.scanned < limit {
            type Row = (i64, i64, i64, i64);
            let rows: Vec<Row> = {
                let conn = self.store.conn();
                let mut select = conn.prepare_cached(&self.shards[shard].select)?;
                select
                    .query_map(params![after, BLOCKS_PER_READ], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect::<Result<_, _>>()?
            };
            let fetched = rows.len() as i64;
            for (id, epoch, first, samples) in rows {
                let (first, samples) = (first.max(0) as u32, samples.max(0) as u32);
                if first < samples {
                    let tail = use_tail
                        .then(|| self.tail.get(id))
                        .flatten()
                        .filter(|t| t.len() == samples as usize);
                    match from_tail {
                        None => from_tail = Some(tail.is_some()),
                        // The rest is on disk only: the next batch reads it.
                        Some(true) if tail.is_none() => break 'read,
                        Some(_) => {}
                    }
                    let want = (limit - batch.scanned).min(u64::from(samples - first)) as u32;
                    let row = BlockRow {
                        id,
                        epoch,
                        first,
                        samples,
                    };
                    let span = match tail {
                        Some(tail) if from_tail == Some(true) => {
                            Self::take_from_tail(&mut batch, &tail, &row, want, cutoff)
                        }
                        _ => self.take_from_disk(&mut batch, &mut index, &row, want, cutoff)?,
                    };
                    batch.spans.push(span);
                }
                after = id;
                last_epoch = Some(epoch);
                if batch.scanned >= limit {
                    break 'read;
                }
            }
            if fetched < BLOCKS_PER_READ {
                reached_end = true;
                break;
            }
        }
        if batch.damaged > 0 {
            tracing::error!(remote_name = %self.name, samples = batch.damaged, "remote write queue: damaged blocks (or labels missing from the dictionary); their samples are dropped and counted in sonde_remote_write_samples_dropped_total{{reason=\"damaged\"}}");
        }
        let mut hint = lock(&self.shards[shard].hint);
        if reached_end {
            hint.resync(batch.scanned, Instant::now());
        }
        hint.in_flight = match (batch.spans.first(), batch.spans.last()) {
            (Some(a), Some(b)) => Some(((a.block, a.from), (b.block, b.to))),
            _ => None,
        };
        hint.evicted_in_flight = 0;
        if last_epoch.is_some() {
            hint.epoch = last_epoch;
        }
        Ok(batch)
    }

    /// `want` samples of a block from its cursor on, copied from the tail in request
    /// form (those older than `cutoff` left out).
    pub(super) fn take_from_tail(
        batch: &mut Batch,
        tail: &TailBlock,
        row: &BlockRow,
        want: u32,
        cutoff: i64,
    ) -> Span {
        let (from, to) = (row.first, row.first + want);
        let (from_i, to_i) = (from as usize, to as usize);
        if batch.fields.is_empty() {
            let per_sample = tail.fields.write_request().len() / tail.len().max(1);
            batch.fields =
                TimeSeriesFields::with_capacity(to_i - from_i, per_sample * (to_i - from_i) * 2);
        }
        let mut run = from_i;
        for i in from_i..to_i {
            if tail.timestamps[i] < cutoff {
                batch.fields.extend_from(&tail.fields, run..i);
                run = i + 1;
                batch.too_old += 1;
            }
        }
        batch.fields.extend_from(&tail.fields, run..to_i);
        batch.scanned += u64::from(want);
        Span {
            block: row.id,
            epoch: row.epoch,
            from,
            to,
            weights: tail.weights[from_i..to_i].to_vec(),
        }
    }

    /// `want` samples of a block from its cursor on, read from the database and grouped
    /// by series into `batch.series` (`index`: series id → its place there); all of a
    /// damaged block.
    pub(super) fn take_from_disk(
        &self,
        batch: &mut Batch,
        index: &mut block::IdMap<usize>,
        row: &BlockRow,
        want: u32,
        cutoff: i64,
    ) -> rusqlite::Result<Span> {
        let &BlockRow {
            id,
            epoch,
            first,
            samples,
        } = row;
        let data: Vec<u8> = self
            .store
            .conn()
            .prepare_cached("SELECT data FROM rw_blocks WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))?;
        let Ok(block) = block::decode(&data) else {
            // Unreadable: all of it goes (its weights unknown, the settlement charges the
            // block's bytes).
            let n = u64::from(samples - first);
            batch.scanned += n;
            batch.damaged += n;
            return Ok(Span {
                block: id,
                epoch,
                from: first,
                to: samples,
                weights: Vec::new(),
            });
        };
        let dict = self.dictionary(epoch, block.series.iter().map(|(id, _)| *id))?;
        let labels_of = |id: u64| dict.get(&epoch).and_then(|(_, m)| m.get(&id));
        let to = first + want;
        let mut span = Span {
            block: id,
            epoch,
            from: first,
            to,
            weights: Vec::with_capacity(want as usize),
        };
        for i in first..to {
            batch.scanned += 1;
            let Some(&(s, ts, value)) = block.samples.get(i as usize) else {
                batch.damaged += 1;
                span.weights.push(0);
                continue;
            };
            let (id, weight) = block.series[s as usize];
            span.weights.push(weight);
            // A series already in the batch has its labels; a new one is looked up once.
            let at = match index.get(&id) {
                Some(&at) => Some(at),
                None => match labels_of(id) {
                    None => {
                        batch.damaged += 1;
                        continue;
                    }
                    Some(_) if ts < cutoff => None,
                    Some(labels) => {
                        batch.series.push(SeriesBatch {
                            labels: labels.clone(),
                            samples: request::Samples::default(),
                        });
                        index.insert(id, batch.series.len() - 1);
                        Some(batch.series.len() - 1)
                    }
                },
            };
            match at {
                Some(at) if ts >= cutoff => batch.series[at].samples.push((ts, value)),
                _ => batch.too_old += 1,
            }
        }
        Ok(span)
    }

    /// A request is no longer on the wire: its samples evicted meanwhile are dropped.
    pub(crate) fn release_in_flight(&self, shard: usize) {
        let evicted = {
            let mut hint = lock(&self.shards[shard].hint);
            hint.in_flight = None;
            std::mem::take(&mut hint.evicted_in_flight)
        };
        if evicted > 0 {
            lock(&self.stats).counters.dropped_queue_full += evicted;
        }
    }

    /// Moves the shard's cursor past a settled batch (deleting the blocks it finished,
    /// minding what the bound removed meanwhile) and books the outcome.
    pub(crate) fn settle(&self, shard: usize, batch: &Batch, tally: Tally) -> rusqlite::Result<()> {
        let endpoint = self.endpoint_id;
        let (mut count, mut sum) = (0i64, 0i64);
        {
            let mut conn = self.store.conn();
            let tx = conn.transaction()?;
            let mut deleted_old = false;
            {
                let mut select =
                    tx.prepare_cached("SELECT first, samples, bytes FROM rw_blocks WHERE id = ?1")?;
                let mut delete = tx.prepare_cached("DELETE FROM rw_blocks WHERE id = ?1")?;
                let mut advance =
                    tx.prepare_cached("UPDATE rw_blocks SET first = ?2, bytes = ?3 WHERE id = ?1")?;
                let current = self.epoch.load(Ordering::Relaxed);
                for span in &batch.spans {
                    let row: Option<(i64, i64, i64)> = select
                        .query_row(params![span.block], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })
                        .optional()?;
                    let Some((first, samples, bytes)) = row else {
                        continue;
                    };
                    let from = (first.max(0) as u32).max(span.from);
                    if from >= span.to {
                        continue;
                    }
                    if span.weights.is_empty() {
                        // A damaged block: all of it goes.
                        count += (samples - i64::from(from)).max(0);
                        sum += bytes;
                        self.tail.remove(span.block);
                        delete.execute(params![span.block])?;
                        deleted_old |= span.epoch < current;
                        continue;
                    }
                    let weight = span.weights[(from - span.from) as usize..]
                        .iter()
                        .sum::<u64>() as i64;
                    count += i64::from(span.to - from);
                    sum += weight;
                    if i64::from(span.to) >= samples {
                        self.tail.remove(span.block);
                        delete.execute(params![span.block])?;
                        deleted_old |= span.epoch < current;
                    } else {
                        advance.execute(params![span.block, i64::from(span.to), bytes - weight])?;
                    }
                }
            }
            if deleted_old {
                self.gc_dict(&tx)?;
            }
            let (q_samples, q_bytes): (i64, i64) = tx
                .prepare_cached(
                    "UPDATE rw_endpoints SET queued_samples = queued_samples - ?2, queued_bytes = queued_bytes - ?3
                     WHERE id = ?1 RETURNING queued_samples, queued_bytes",
                )?
                .query_row(params![endpoint, count, sum], |r| Ok((r.get(0)?, r.get(1)?)))?;
            tx.commit()?;
            let mut stats = lock(&self.stats);
            stats.queued_samples = q_samples.max(0) as u64;
            stats.queued_bytes = q_bytes.max(0) as u64;
        }
        {
            let mut hint = lock(&self.shards[shard].hint);
            hint.consume(count as u64);
            hint.in_flight = None;
            // Samples evicted while in flight are in `sent` or `refused` like the others.
            hint.evicted_in_flight = 0;
        }
        let mut stats = lock(&self.stats);
        stats.counters.sent += tally.sent;
        stats.counters.bytes_sent += tally.bytes;
        stats.counters.dropped_http_4xx += tally.refused;
        stats.counters.dropped_too_large += tally.too_large;
        stats.counters.dropped_too_old += batch.too_old;
        stats.counters.dropped_damaged += batch.damaged;
        if tally.sent > 0 {
            stats.last_success = Some(SystemTime::now());
            if stats.failing {
                stats.failing = false;
                tracing::info!(
                    remote_name = %self.name,
                    url = %self.url,
                    "remote write endpoint accepts samples again"
                );
            }
        }
        Ok(())
    }
}

/// Labels by epoch then series id: the dictionary of `endpoint`, all of it or one
/// epoch's rows after a row id; with the last row id read.
pub(super) type Dict = HashMap<i64, block::IdMap<LabelsPb>>;

pub(super) fn load_dict(
    conn: &Connection,
    endpoint: i64,
    epoch_after: Option<(i64, i64)>,
) -> rusqlite::Result<(i64, Dict)> {
    let mut out: Dict = HashMap::new();
    let mut last_row = 0i64;
    let (epoch, after) = epoch_after.map_or((None, 0), |(e, a)| (Some(e), a));
    let mut stmt = conn.prepare_cached(
        "SELECT id, epoch, data FROM rw_dict
         WHERE endpoint = ?1 AND (?2 IS NULL OR epoch = ?2) AND id > ?3 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![endpoint, epoch, after], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    for row in rows {
        let (id, epoch, data) = row?;
        last_row = last_row.max(id);
        let map = out.entry(epoch).or_default();
        match block::decode_dict(&data) {
            Ok(entries) => map.extend(entries),
            Err(e) => {
                tracing::error!(error = %e, "remote write queue: a damaged dictionary row is ignored")
            }
        }
    }
    Ok((last_row, out))
}
