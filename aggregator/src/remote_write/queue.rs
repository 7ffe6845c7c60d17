//! The durable queue of one endpoint, in the aggregator's SQLite database, and the shard
//! tasks that drain it.
//!
//! **Tables** (created here, shared by every endpoint, keyed by a small endpoint id):
//! - `rw_endpoints`: one row per endpoint name, with the shard count its rows are laid out
//!   for and the queue's size (samples and bytes), kept exact in the same transactions
//!   that add and remove rows;
//! - `rw_series`: every series the endpoint has queued, with the last timestamp queued
//!   and the last timestamp done with (sent, refused or dropped). The first makes
//!   [`Shared::enqueue`] drop a sample not newer than its series' last one, across
//!   restarts; the second makes the sender drop one not newer than what was already sent;
//! - `rw_queue`: the samples, numbered by a per-endpoint sequence (the order they were
//!   queued in), each with its series' shard.
//!
//! **Writing**: [`Shared::enqueue`] runs inside the caller's transaction, so a batch of
//! results and the samples it adds to every endpoint commit together or not at all. It
//! never touches the network. Everything it decides reads the database (not a cache that a
//! rolled-back transaction could leave ahead of it), except the label set → series id
//! map, whose entries are immutable facts. Only hints (how many rows each shard has, since
//! when) and self-metrics are kept in memory.
//!
//! **Sending**: one task per shard; a series always hashes to the same shard, so its
//! samples leave in the order they were queued, while a slow series' shard does not hold
//! up the others. A task reads its shard's oldest rows, sends them as one request, and
//! deletes them only when the receiver stored them (2xx) or refused them for good (other
//! 4xx: dropped, counted, the receiver's message logged once). 5xx, 429 and connection
//! errors are retried with capped exponential backoff (or `Retry-After`) for as long as it
//! takes, re-reading the batch each time so that the byte bound, which drops the oldest
//! rows, is respected meanwhile. A 400 on a request with several series is split in two
//! and each half sent again, a few times, so one series the receiver refuses (out of
//! order, out of bounds) does not take the others down with it.

use super::client::{Client, SendError};
use super::config::{ProtobufMessage, QueueConfig, fnv1a64};
use super::encode::{self, Series, SeriesSample};
use super::encode_v2;
use crate::store::Store;
use bytes::Bytes;
use rusqlite::{OptionalExtension, Transaction, params};
use sonde_proto::exposition::Family;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// A normalized label set, shared by the series maps and the rows of a batch.
type LabelSet = Arc<[(String, String)]>;

/// A series whose samples have all been sent and that has had no new one for this long is
/// forgotten (its row and its map entries). A sample older than its forgotten last one
/// would be a day late, which no receiver with a head block accepts anyway.
const SERIES_TTL_MS: i64 = 24 * 3600 * 1000;
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Distinct rejection messages remembered so that each is logged once.
const REJECTIONS_REMEMBERED: usize = 100;
/// Arrival records kept per shard (for batch_send_deadline); past it the newest merge.
const ARRIVALS_KEPT: usize = 256;
/// After a database error the shard task waits this long before trying again.
const DB_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The tables of every endpoint's queue, created on first use.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rw_endpoints (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    shards INTEGER NOT NULL,
    queued_samples INTEGER NOT NULL DEFAULT 0,
    queued_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rw_series (
    endpoint INTEGER NOT NULL,
    id INTEGER NOT NULL,
    labels TEXT NOT NULL,
    last_queued_ms INTEGER NOT NULL,
    last_done_ms INTEGER NOT NULL,
    PRIMARY KEY (endpoint, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS rw_series_labels ON rw_series (endpoint, labels);
CREATE TABLE IF NOT EXISTS rw_queue (
    endpoint INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    series INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    bits INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (endpoint, shard, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rw_queue_age ON rw_queue (endpoint, seq);
";

/// Creates the queue tables if they are missing.
pub(crate) fn ensure_schema(store: &Store) -> Result<(), String> {
    store
        .conn()
        .execute_batch(SCHEMA)
        .map_err(|e| format!("remote write queue tables: {e}"))
}

/// Endpoints with queued samples on disk whose name is not in `configured`: logged once
/// at start. Their rows are kept (not sent, not counted against any bound), so that
/// configuring the endpoint again under the same name sends them.
pub(crate) fn report_unconfigured(store: &Store, configured: &[String]) -> Result<(), String> {
    ensure_schema(store)?;
    let conn = store.conn();
    let mut stmt = conn
        .prepare("SELECT name, url, queued_samples, queued_bytes FROM rw_endpoints WHERE queued_samples > 0")
        .map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .map_err(|e| e.to_string())?;
    for row in rows {
        let (name, url, samples, bytes) = row.map_err(|e| e.to_string())?;
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

/// What a sample counts toward `max_queue_bytes`: its uncompressed size as sent, labels
/// included (label name and value plus protobuf framing, 16 bytes of timestamp and value).
/// The queue really uses less, since a series' labels are stored once, so the bound is a
/// conservative one.
pub(crate) fn sample_bytes(labels: &[(String, String)]) -> u64 {
    16 + labels
        .iter()
        .map(|(n, v)| (n.len() + v.len() + 4) as u64)
        .sum::<u64>()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub sent: u64,
    pub bytes_sent: u64,
    pub retried: u64,
    pub requests_failed: u64,
    pub dropped_http_4xx: u64,
    pub dropped_queue_full: u64,
    pub dropped_out_of_order: u64,
    pub dropped_invalid_labels: u64,
    pub dropped_too_large: u64,
    pub dropped_too_old: u64,
    pub fallbacks: u64,
}

impl Counters {
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped_http_4xx
            + self.dropped_queue_full
            + self.dropped_out_of_order
            + self.dropped_invalid_labels
            + self.dropped_too_large
            + self.dropped_too_old
    }
}

/// Self-metrics and the status page's view. In memory: they restart from zero with the
/// process (Prometheus counters may reset), except the queue size, read from the database.
#[derive(Default)]
struct Stats {
    counters: Counters,
    queued_samples: u64,
    queued_bytes: u64,
    failing: bool,
    last_error: Option<(String, SystemTime)>,
    last_success: Option<SystemTime>,
    warned_invalid: bool,
    warned_partial: bool,
}

/// What is known of a series besides its id.
struct SeriesInfo {
    labels: LabelSet,
    shard: usize,
    bytes: u64,
}

/// Label set ↔ series id. Entries never change meaning: an id, once given to a label
/// set, is never given to another (ids only grow), so a map entry is true even when the
/// transaction that created the series' row was rolled back (the row is then re-created).
#[derive(Default)]
struct SeriesIndex {
    by_labels: HashMap<LabelSet, i64>,
    by_id: HashMap<i64, SeriesInfo>,
    next_id: i64,
}

/// A shard's idea of how much waits in its part of the queue, and since when. Only a
/// hint for when to read (batch full, or its oldest sample's batch_send_deadline passed):
/// every read corrects it.
#[derive(Default)]
struct ShardHint {
    /// (samples, when they were queued), oldest first.
    arrivals: VecDeque<(u64, Instant)>,
    /// The sequence numbers (first, last) of the request on the wire.
    in_flight: Option<(i64, i64)>,
    /// Rows of the request on the wire that the byte bound removed meanwhile: sent if the
    /// request lands, dropped (queue_full) if it has to be redone.
    evicted_in_flight: u64,
}

impl ShardHint {
    fn pending(&self) -> u64 {
        self.arrivals.iter().map(|(n, _)| n).sum()
    }

    fn oldest(&self) -> Option<Instant> {
        self.arrivals.front().map(|(_, t)| *t)
    }

    fn add(&mut self, n: u64, at: Instant) {
        if self.arrivals.len() >= ARRIVALS_KEPT
            && let Some(last) = self.arrivals.back_mut()
        {
            last.0 += n;
            return;
        }
        self.arrivals.push_back((n, at));
    }

    /// Takes `n` samples off the front (sent, dropped or evicted).
    fn consume(&mut self, mut n: u64) {
        while n > 0 {
            let Some(front) = self.arrivals.front_mut() else {
                return;
            };
            if front.0 > n {
                front.0 -= n;
                return;
            }
            n -= front.0;
            self.arrivals.pop_front();
        }
    }

    /// The shard holds exactly `n` samples (a read found fewer rows than it asked for):
    /// keeps the newest arrival records that account for them.
    fn resync(&mut self, n: u64, now: Instant) {
        let pending = self.pending();
        if pending > n {
            self.consume(pending - n);
        } else if pending < n {
            // Rows the hints never saw (queued before this process started): due now.
            self.arrivals
                .push_front((n - pending, now - Duration::from_secs(86400)));
        }
    }
}

struct Shard {
    hint: Mutex<ShardHint>,
    wake: Notify,
}

/// What the producers and the shard tasks of one endpoint share.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) url: String,
    endpoint_id: i64,
    /// Added to every series that does not have the label itself.
    external_labels: Vec<(String, String)>,
    store: Arc<Store>,
    queue: QueueConfig,
    series: Mutex<SeriesIndex>,
    /// The next row's sequence number; taken under the database lock, so rows commit in
    /// sequence order.
    next_seq: AtomicI64,
    shards: Vec<Shard>,
    stats: Mutex<Stats>,
    /// The configured message, and whether 2.0 is still in use (false once the receiver
    /// showed it does not speak it).
    configured: ProtobufMessage,
    v2: AtomicBool,
}

/// A point-in-time view of the queue for the status page and metrics.
pub(crate) struct Snapshot {
    pub queued_samples: u64,
    pub queued_bytes: u64,
    pub counters: Counters,
    pub failing: bool,
    pub last_error: Option<(String, SystemTime)>,
    pub last_success: Option<SystemTime>,
    pub message: ProtobufMessage,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every section below restores its invariants before it can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn labels_key(labels: &[(String, String)]) -> String {
    serde_json::to_string(labels).unwrap_or_default()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Shared {
    /// Opens the endpoint's queue in `store` (creating its rows on first use), loads its
    /// series, and lays the queued rows out again if the shard count changed.
    pub(crate) fn open(
        name: String,
        url: String,
        external_labels: Vec<(String, String)>,
        queue: &QueueConfig,
        message: ProtobufMessage,
        store: Arc<Store>,
    ) -> Result<Self, String> {
        ensure_schema(&store)?;
        let fail = |e: rusqlite::Error| format!("remote_write {name:?}: queue database: {e}");
        let shard_count = queue.max_shards.max(1);
        let mut index = SeriesIndex::default();
        let (endpoint_id, next_seq, queued_samples, queued_bytes) = {
            let mut conn = store.conn();
            let tx = conn.transaction().map_err(fail)?;
            tx.execute(
                "INSERT INTO rw_endpoints (name, url, shards) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET url = excluded.url",
                params![name, url, shard_count as i64],
            )
            .map_err(fail)?;
            let (id, stored_shards, samples, bytes): (i64, i64, i64, i64) = tx
                .query_row(
                    "SELECT id, shards, queued_samples, queued_bytes FROM rw_endpoints WHERE name = ?1",
                    params![name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .map_err(fail)?;
            {
                let mut stmt = tx
                    .prepare("SELECT id, labels FROM rw_series WHERE endpoint = ?1")
                    .map_err(fail)?;
                let rows = stmt
                    .query_map(params![id], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                    })
                    .map_err(fail)?;
                for row in rows {
                    let (sid, text) = row.map_err(fail)?;
                    let labels: Vec<(String, String)> =
                        serde_json::from_str(&text).unwrap_or_default();
                    index.insert(sid, labels, shard_count);
                    index.next_id = index.next_id.max(sid + 1);
                }
            }
            let max_seq: i64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(seq), 0) FROM rw_queue WHERE endpoint = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .map_err(fail)?;
            if stored_shards != shard_count as i64 {
                relayout(&tx, id, &index).map_err(fail)?;
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
            tx.commit().map_err(fail)?;
            (id, max_seq + 1, samples.max(0) as u64, bytes.max(0) as u64)
        };
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
            .map(|_| {
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
                }
            })
            .collect();
        Ok(Self {
            name,
            url,
            endpoint_id,
            external_labels,
            store,
            queue: queue.clone(),
            series: Mutex::new(index),
            next_seq: AtomicI64::new(next_seq),
            shards,
            stats: Mutex::new(Stats {
                queued_samples,
                queued_bytes,
                ..Stats::default()
            }),
            configured: message,
            v2: AtomicBool::new(message == ProtobufMessage::RequestV2),
        })
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub(crate) fn max_queue_bytes(&self) -> u64 {
        self.queue.max_queue_bytes.0
    }

    /// Runs `f` in a transaction of the store this queue lives in.
    pub(crate) fn store_with_tx<R>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<R>,
    ) -> Result<R, String> {
        self.store.with_tx(f)
    }

    /// The message requests are encoded as now.
    fn message(&self) -> ProtobufMessage {
        if self.v2.load(Ordering::Relaxed) {
            ProtobufMessage::RequestV2
        } else {
            ProtobufMessage::WriteRequestV1
        }
    }

    /// The receiver does not speak 2.0: 1.0 from now on, logged once.
    fn fall_back(&self, why: &str) {
        if self.v2.swap(false, Ordering::Relaxed) {
            lock(&self.stats).counters.fallbacks += 1;
            tracing::warn!(
                remote_name = %self.name,
                url = %self.url,
                reason = why,
                "the remote write receiver does not speak remote write 2.0 \
                 (protobuf_message: io.prometheus.write.v2.Request); falling back to 1.0 \
                 (prometheus.WriteRequest) for this endpoint and resending the request"
            );
        }
    }

    /// Inside the caller's transaction: external labels applied, samples not newer than
    /// their series' last queued one dropped (counted), the rest appended, the byte bound
    /// enforced by dropping the oldest (counted). Call [`Shared::wake`] after the commit.
    pub(crate) fn enqueue(
        &self,
        tx: &Transaction<'_>,
        samples: &[SeriesSample],
    ) -> rusqlite::Result<()> {
        if samples.is_empty() {
            return Ok(());
        }
        let endpoint = self.endpoint_id;
        let shard_count = self.shards.len();
        let mut invalid = 0u64;
        let mut out_of_order = 0u64;
        let mut added = vec![0u64; shard_count];
        let (mut q_samples, mut q_bytes): (i64, i64) = tx
            .prepare_cached("SELECT queued_samples, queued_bytes FROM rw_endpoints WHERE id = ?1")?
            .query_row(params![endpoint], |r| Ok((r.get(0)?, r.get(1)?)))?;
        {
            let mut index = lock(&self.series);
            // Per series in this call: (last queued timestamp, changed).
            let mut last: HashMap<i64, (i64, bool)> = HashMap::new();
            let mut select_series = tx.prepare_cached(
                "SELECT last_queued_ms FROM rw_series WHERE endpoint = ?1 AND id = ?2",
            )?;
            let mut insert_series = tx.prepare_cached(
                "INSERT INTO rw_series (endpoint, id, labels, last_queued_ms, last_done_ms)
                 VALUES (?1, ?2, ?3, ?4, ?4)",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO rw_queue (endpoint, shard, seq, series, ts, bits, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for sample in samples {
                let labels = match series_labels(sample.labels.clone(), &self.external_labels) {
                    Ok(l) => l,
                    Err((problem, labels)) => {
                        invalid += 1;
                        self.warn_invalid(problem, &labels);
                        continue;
                    }
                };
                let id = match index.by_labels.get(labels.as_slice()) {
                    Some(&id) => id,
                    None => {
                        let id = index.next_id;
                        index.next_id += 1;
                        index.insert(id, labels, shard_count);
                        id
                    }
                };
                let entry = match last.get_mut(&id) {
                    Some(e) => e,
                    None => {
                        let stored: Option<i64> = select_series
                            .query_row(params![endpoint, id], |r| r.get(0))
                            .optional()?;
                        let stored = match stored {
                            Some(t) => t,
                            None => {
                                let key = labels_key(&index.by_id[&id].labels);
                                insert_series.execute(params![endpoint, id, key, i64::MIN])?;
                                i64::MIN
                            }
                        };
                        last.entry(id).or_insert((stored, false))
                    }
                };
                // A second sample at the same or an earlier time would make the receiver
                // refuse the whole request (HTTP 400), losing good samples with it.
                if sample.timestamp_ms <= entry.0 {
                    out_of_order += 1;
                    continue;
                }
                *entry = (sample.timestamp_ms, true);
                let info = &index.by_id[&id];
                let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                insert.execute(params![
                    endpoint,
                    info.shard as i64,
                    seq,
                    id,
                    sample.timestamp_ms,
                    sample.value.to_bits() as i64,
                    info.bytes as i64
                ])?;
                q_samples += 1;
                q_bytes += info.bytes as i64;
                added[info.shard] += 1;
            }
            drop(index);
            let mut update_series = tx.prepare_cached(
                "UPDATE rw_series SET last_queued_ms = ?3 WHERE endpoint = ?1 AND id = ?2",
            )?;
            for (id, (ts, changed)) in last {
                if changed {
                    update_series.execute(params![endpoint, id, ts])?;
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
            "UPDATE rw_endpoints SET queued_samples = ?2, queued_bytes = ?3 WHERE id = ?1",
        )?
        .execute(params![endpoint, q_samples, q_bytes])?;

        let now = Instant::now();
        for (i, shard) in self.shards.iter().enumerate() {
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

    fn warn_invalid(&self, problem: &str, labels: &[(String, String)]) {
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

    /// Deletes the oldest rows until the queue fits `max_queue_bytes`.
    fn evict(
        &self,
        tx: &Transaction<'_>,
        q_samples: &mut i64,
        q_bytes: &mut i64,
    ) -> rusqlite::Result<Eviction> {
        let endpoint = self.endpoint_id;
        let max = self.queue.max_queue_bytes.0 as i64;
        let in_flight: Vec<Option<(i64, i64)>> = self
            .shards
            .iter()
            .map(|s| lock(&s.hint).in_flight)
            .collect();
        let mut out = Eviction {
            per_shard: vec![0; self.shards.len()],
            in_flight: vec![0; self.shards.len()],
            dropped: 0,
        };
        let mut done: HashMap<i64, i64> = HashMap::new();
        let mut cut: Option<i64> = None;
        let mut select = tx.prepare_cached(
            "SELECT shard, seq, series, ts, bytes FROM rw_queue
             WHERE endpoint = ?1 AND seq > ?2 ORDER BY seq LIMIT 1024",
        )?;
        let mut after = i64::MIN;
        'outer: while *q_bytes > max {
            let rows: Vec<(i64, i64, i64, i64, i64)> = select
                .query_map(params![endpoint, after], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Result<_, _>>()?;
            if rows.is_empty() {
                break;
            }
            for (shard, seq, series, ts, bytes) in rows {
                if *q_bytes <= max {
                    break 'outer;
                }
                *q_bytes -= bytes;
                *q_samples -= 1;
                after = seq;
                cut = Some(seq);
                let d = done.entry(series).or_insert(ts);
                *d = (*d).max(ts);
                let shard = (shard as usize).min(self.shards.len() - 1);
                out.per_shard[shard] += 1;
                if in_flight[shard].is_some_and(|(lo, hi)| (lo..=hi).contains(&seq)) {
                    out.in_flight[shard] += 1;
                } else {
                    out.dropped += 1;
                }
            }
        }
        if let Some(cut) = cut {
            tx.prepare_cached("DELETE FROM rw_queue WHERE endpoint = ?1 AND seq <= ?2")?
                .execute(params![endpoint, cut])?;
            let mut update = tx.prepare_cached(
                "UPDATE rw_series SET last_done_ms = MAX(last_done_ms, ?3) WHERE endpoint = ?1 AND id = ?2",
            )?;
            for (series, ts) in done {
                update.execute(params![endpoint, series, ts])?;
            }
        }
        Ok(out)
    }

    /// After the caller's commit: lets the shard tasks look at what was queued.
    pub(crate) fn wake(&self) {
        for shard in &self.shards {
            shard.wake.notify_one();
        }
    }

    /// Forgets series with nothing queued and no sample for [`SERIES_TTL_MS`].
    fn prune(&self) -> rusqlite::Result<usize> {
        let cutoff = now_ms() - SERIES_TTL_MS;
        let mut conn = self.store.conn();
        let tx = conn.transaction()?;
        let ids: Vec<i64> = tx
            .prepare(
                "SELECT id FROM rw_series WHERE endpoint = ?1
                 AND last_queued_ms <= last_done_ms AND last_queued_ms < ?2",
            )?
            .query_map(params![self.endpoint_id, cutoff], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        {
            let mut delete = tx.prepare("DELETE FROM rw_series WHERE endpoint = ?1 AND id = ?2")?;
            for id in &ids {
                delete.execute(params![self.endpoint_id, id])?;
            }
        }
        tx.commit()?;
        let mut index = lock(&self.series);
        for id in &ids {
            if let Some(info) = index.by_id.remove(id) {
                index.by_labels.remove(&info.labels);
            }
        }
        Ok(ids.len())
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let stats = lock(&self.stats);
        Snapshot {
            queued_samples: stats.queued_samples,
            queued_bytes: stats.queued_bytes,
            counters: stats.counters,
            failing: stats.failing,
            last_error: stats.last_error.clone(),
            last_success: stats.last_success,
            message: self.message(),
        }
    }

    pub(crate) fn families(&self) -> Vec<Family> {
        let snap = self.snapshot();
        let c = snap.counters;
        let id = || {
            vec![
                ("remote_name".to_string(), self.name.clone()),
                ("url".to_string(), self.url.clone()),
            ]
        };
        let with = |name: &str, value: &str| {
            let mut labels = id();
            labels.push((name.to_string(), value.to_string()));
            labels
        };
        let unix = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64())
        };
        vec![
            Family::counter(
                "sonde_remote_write_samples_sent_total",
                "Samples the remote write endpoint accepted.",
            )
            .with(id(), c.sent as f64),
            Family::counter(
                "sonde_remote_write_samples_retried_total",
                "Samples sent again after a failed request (5xx, 429, connection error, timeout).",
            )
            .with(id(), c.retried as f64),
            Family::counter(
                "sonde_remote_write_samples_dropped_total",
                "Samples never to be sent: refused by the endpoint (http_4xx), pushed out of the full queue (queue_full), not newer than the last sample of their series (out_of_order), with labels no receiver accepts (invalid_labels), in a request too large to encode (too_large), or older than queue_config.sample_age_limit when their turn came (too_old).",
            )
            .with(with("reason", "http_4xx"), c.dropped_http_4xx as f64)
            .with(with("reason", "queue_full"), c.dropped_queue_full as f64)
            .with(with("reason", "out_of_order"), c.dropped_out_of_order as f64)
            .with(with("reason", "invalid_labels"), c.dropped_invalid_labels as f64)
            .with(with("reason", "too_large"), c.dropped_too_large as f64)
            .with(with("reason", "too_old"), c.dropped_too_old as f64),
            Family::counter(
                "sonde_remote_write_requests_failed_total",
                "Remote write requests that did not succeed, retried or not.",
            )
            .with(id(), c.requests_failed as f64),
            Family::counter(
                "sonde_remote_write_sent_bytes_total",
                "Compressed request bytes the remote write endpoint accepted.",
            )
            .with(id(), c.bytes_sent as f64),
            Family::counter(
                "sonde_remote_write_protocol_fallbacks_total",
                "Times the endpoint was found not to speak remote write 2.0 and sonde fell back to 1.0.",
            )
            .with(id(), c.fallbacks as f64),
            Family::gauge(
                "sonde_remote_write_queue_samples",
                "Samples waiting in the durable queue, including the requests in flight.",
            )
            .with(id(), snap.queued_samples as f64),
            Family::gauge(
                "sonde_remote_write_queue_bytes",
                "Size of the waiting samples as counted against queue_config.max_queue_bytes.",
            )
            .with(id(), snap.queued_bytes as f64),
            Family::gauge(
                "sonde_remote_write_queue_max_bytes",
                "queue_config.max_queue_bytes: past it the oldest samples are dropped.",
            )
            .with(id(), self.queue.max_queue_bytes.0 as f64),
            Family::gauge(
                "sonde_remote_write_shards",
                "Requests the endpoint may have in flight at once (queue_config.max_shards).",
            )
            .with(id(), self.shards.len() as f64),
            Family::gauge(
                "sonde_remote_write_protocol_info",
                "1 for the message the endpoint is sent now (protobuf_message, or 1.0 after a fallback).",
            )
            .with(with("protobuf_message", snap.message.as_str()), 1.0),
            Family::gauge(
                "sonde_remote_write_last_send_timestamp_seconds",
                "Unix time of the last request the endpoint accepted, 0 before the first.",
            )
            .with(id(), unix(snap.last_success)),
        ]
    }

    /// The configured message (before any fallback).
    pub(crate) fn configured_message(&self) -> ProtobufMessage {
        self.configured
    }
}

/// Lays the queued rows of `endpoint` out for the shard count of `index`'s entries.
fn relayout(tx: &Transaction<'_>, endpoint: i64, index: &SeriesIndex) -> rusqlite::Result<()> {
    let rows: Vec<(i64, i64, i64)> = tx
        .prepare("SELECT shard, seq, series FROM rw_queue WHERE endpoint = ?1")?
        .query_map(params![endpoint], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut update = tx.prepare(
        "UPDATE rw_queue SET shard = ?4 WHERE endpoint = ?1 AND shard = ?2 AND seq = ?3",
    )?;
    for (shard, seq, series) in rows {
        // A row whose series is unknown is left where it is; the sender drops it.
        if let Some(info) = index.by_id.get(&series)
            && info.shard as i64 != shard
        {
            update.execute(params![endpoint, shard, seq, info.shard as i64])?;
        }
    }
    Ok(())
}

impl SeriesIndex {
    fn insert(&mut self, id: i64, labels: Vec<(String, String)>, shard_count: usize) {
        let key = labels_key(&labels);
        let shard = (fnv1a64(key.as_bytes()) % shard_count as u64) as usize;
        let bytes = sample_bytes(&labels);
        let labels: LabelSet = Arc::from(labels);
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(
            id,
            SeriesInfo {
                labels,
                shard,
                bytes,
            },
        );
    }
}

struct Eviction {
    per_shard: Vec<u64>,
    in_flight: Vec<u64>,
    dropped: u64,
}

type Invalid = (&'static str, Vec<(String, String)>);

/// The label set a sample is queued under: empty values dropped, external labels added
/// where the series lacks them, names in byte order. Refuses what receivers refuse
/// outright (a missing metric name, a repeated or empty label name), since one such
/// sample would get its whole request rejected.
fn series_labels(
    mut labels: Vec<(String, String)>,
    external: &[(String, String)],
) -> Result<Vec<(String, String)>, Invalid> {
    labels.retain(|(_, v)| !v.is_empty());
    for (name, value) in external {
        if !labels.iter().any(|(n, _)| n == name) {
            labels.push((name.clone(), value.clone()));
        }
    }
    encode::normalize_labels(&mut labels);
    if !labels.iter().any(|(n, _)| n == "__name__") {
        return Err(("no __name__ label", labels));
    }
    if labels.iter().any(|(n, _)| n.is_empty()) {
        return Err(("an empty label name", labels));
    }
    if labels.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(("a label name given twice", labels));
    }
    Ok(labels)
}

/// The pause before retry number `attempt` (1 for the first retry): the receiver's
/// `Retry-After` when it gave one, capped at `max_backoff`; otherwise `min_backoff`
/// doubled per attempt up to `max_backoff`, with jitter so that many senders cut off
/// together do not come back in lockstep. Always within `[min_backoff, max_backoff]`.
pub fn backoff(
    min: Duration,
    max: Duration,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    if let Some(after) = retry_after.filter(|d| !d.is_zero()) {
        return after.clamp(min, max);
    }
    let base = min
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(30))
        .min(max);
    base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
        .clamp(min, max)
}

/// Runs `fut` until it finishes or the shutdown deadline (once one is set) passes;
/// `None` when the deadline won.
async fn until_stop<F: Future>(
    stop: &mut watch::Receiver<Option<Instant>>,
    fut: F,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        let deadline = *stop.borrow_and_update();
        match deadline {
            Some(deadline) => return tokio::time::timeout_at(deadline, &mut fut).await.ok(),
            None => tokio::select! {
                out = &mut fut => return Some(out),
                changed = stop.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            },
        }
    }
}

/// One row of a batch read from the queue.
struct Row {
    seq: i64,
    series: i64,
    labels: LabelSet,
    ts: i64,
    value: f64,
}

/// Rows of a shard about to be sent.
struct Batch {
    rows: Vec<Row>,
    /// Rows read from the database, including those dropped on reading.
    scanned: usize,
}

/// What became of a batch's samples once settled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    /// Stored by the receiver.
    sent: u64,
    /// Refused for good (4xx other than 429).
    refused: u64,
    /// Impossible to encode.
    too_large: u64,
    /// Compressed bytes of the accepted requests.
    bytes: u64,
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

/// How a request (or the requests a 400 was split into) ended.
enum Delivered {
    Done(Tally),
    /// A retryable failure of the whole batch: read it again after this pause.
    Retry(Option<Duration>),
    /// The shutdown deadline passed.
    Stopped,
}

/// How a batch ended, for the shard loop.
enum BatchEnd {
    /// The shard had nothing to send.
    Empty,
    Done,
    Stopped,
}

/// The sending task of one shard. `stop` carries the shutdown deadline: once set, the
/// task sends what its shard holds without waiting for full batches and returns when the
/// shard is empty or the deadline has passed (what is left stays on disk).
pub(crate) async fn run_shard(
    shared: Arc<Shared>,
    shard: usize,
    mut client: Client,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let mut sender = ShardSender {
        shared: shared.clone(),
        shard,
        rejections_logged: HashSet::new(),
        next_prune: Instant::now() + PRUNE_EVERY,
    };
    let deadline = shared.queue.batch_send_deadline.0;
    let max = shared.queue.max_samples_per_send as u64;
    loop {
        sender.maybe_prune();
        let stopping = stop.borrow_and_update().is_some();
        let now = Instant::now();
        let wait_until = {
            let hint = lock(&shared.shards[shard].hint);
            let pending = hint.pending();
            let due = hint.oldest().map(|t| t + deadline);
            if stopping || pending >= max || (pending > 0 && due.is_none_or(|d| now >= d)) {
                None
            } else {
                let idle = now + Duration::from_secs(3600);
                Some(due.unwrap_or(idle).min(sender.next_prune))
            }
        };
        if let Some(until) = wait_until {
            tokio::select! {
                _ = shared.shards[shard].wake.notified() => {}
                _ = tokio::time::sleep_until(until) => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            continue;
        }
        let read_at = Instant::now();
        match sender.send_batch(&mut client, &mut stop).await {
            BatchEnd::Done => {}
            BatchEnd::Empty => {
                if stopping {
                    return;
                }
                // Samples queued since the read keep their hint: they are not read yet.
                lock(&shared.shards[shard].hint)
                    .arrivals
                    .retain(|(_, at)| *at > read_at);
            }
            BatchEnd::Stopped => return,
        }
    }
}

struct ShardSender {
    shared: Arc<Shared>,
    shard: usize,
    rejections_logged: HashSet<String>,
    next_prune: Instant,
}

impl ShardSender {
    /// Shard 0 forgets quiet series now and then.
    fn maybe_prune(&mut self) {
        let now = Instant::now();
        if self.shard != 0 || now < self.next_prune {
            return;
        }
        self.next_prune = now + PRUNE_EVERY;
        match self.shared.prune() {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(remote_name = %self.shared.name, series = n, "forgot quiet series")
            }
            Err(e) => {
                tracing::error!(remote_name = %self.shared.name, error = %e, "remote write queue: pruning series failed")
            }
        }
    }

    /// Reads the shard's oldest rows and sends them until they are settled (stored,
    /// refused, or evicted while the receiver was failing).
    async fn send_batch(
        &mut self,
        client: &mut Client,
        stop: &mut watch::Receiver<Option<Instant>>,
    ) -> BatchEnd {
        let mut attempt = 0u32;
        loop {
            let batch = match self.read_batch() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(remote_name = %self.shared.name, error = %e, "remote write queue: reading a batch failed; retrying");
                    if until_stop(stop, tokio::time::sleep(DB_ERROR_PAUSE))
                        .await
                        .is_none()
                    {
                        return BatchEnd::Stopped;
                    }
                    continue;
                }
            };
            if batch.scanned == 0 {
                return if attempt == 0 {
                    BatchEnd::Empty
                } else {
                    BatchEnd::Done
                };
            }
            if batch.rows.is_empty() {
                // Everything read was dropped on reading (too old): read on.
                continue;
            }
            let series = group(&batch.rows);
            let mut budget = split_budget(series.len());
            match self.deliver(client, stop, series, true, &mut budget).await {
                Delivered::Stopped => {
                    self.release_in_flight();
                    return BatchEnd::Stopped;
                }
                Delivered::Retry(retry_after) => {
                    self.release_in_flight();
                    attempt = attempt.saturating_add(1);
                    let pause = backoff(
                        self.shared.queue.min_backoff.0,
                        self.shared.queue.max_backoff.0,
                        attempt,
                        retry_after,
                    );
                    if until_stop(stop, tokio::time::sleep(pause)).await.is_none() {
                        return BatchEnd::Stopped;
                    }
                }
                Delivered::Done(tally) => {
                    if let Err(e) = self.settle(&batch, tally) {
                        // The rows stay and are sent again: a duplicate, never a loss.
                        tracing::error!(remote_name = %self.shared.name, error = %e, "remote write queue: removing a sent batch failed");
                        self.release_in_flight();
                    }
                    return BatchEnd::Done;
                }
            }
        }
    }

    /// The shard's oldest rows, at most `max_samples_per_send`, marked in flight. Rows
    /// not newer than their series' last sent sample, and rows older than
    /// `sample_age_limit`, are deleted and counted instead.
    fn read_batch(&self) -> rusqlite::Result<Batch> {
        let shared = &self.shared;
        let endpoint = shared.endpoint_id;
        let limit = shared.queue.max_samples_per_send;
        let age_limit = shared.queue.sample_age_limit.0;
        let cutoff = if age_limit.is_zero() {
            i64::MIN
        } else {
            now_ms() - age_limit.as_millis() as i64
        };
        let mut conn = shared.store.conn();
        let tx = conn.transaction()?;
        let raw: Vec<(i64, i64, i64, i64, i64, Option<i64>)> = tx
            .prepare_cached(
                "SELECT q.seq, q.series, q.ts, q.bits, q.bytes, s.last_done_ms
                 FROM rw_queue q LEFT JOIN rw_series s ON s.endpoint = q.endpoint AND s.id = q.series
                 WHERE q.endpoint = ?1 AND q.shard = ?2 ORDER BY q.seq LIMIT ?3",
            )?
            .query_map(params![endpoint, self.shard as i64, limit as i64], |r| {
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
        let scanned = raw.len();
        let mut rows = Vec::with_capacity(raw.len());
        let (mut unknown, mut out_of_order, mut too_old) = (0u64, 0u64, 0u64);
        let (mut gone_samples, mut gone_bytes) = (0i64, 0i64);
        let mut done: HashMap<i64, i64> = HashMap::new();
        {
            let index = lock(&shared.series);
            let mut delete = tx.prepare_cached(
                "DELETE FROM rw_queue WHERE endpoint = ?1 AND shard = ?2 AND seq = ?3",
            )?;
            for (seq, series, ts, bits, bytes, last_done) in raw {
                let labels = index.by_id.get(&series).map(|i| i.labels.clone());
                let drop_reason = match (&labels, last_done) {
                    (None, _) | (_, None) => Some(&mut unknown),
                    (_, Some(d)) if ts <= d => Some(&mut out_of_order),
                    _ if ts < cutoff => Some(&mut too_old),
                    _ => None,
                };
                match (drop_reason, labels) {
                    (Some(counter), _) => {
                        *counter += 1;
                        delete.execute(params![endpoint, self.shard as i64, seq])?;
                        gone_samples += 1;
                        gone_bytes += bytes;
                        let d = done.entry(series).or_insert(ts);
                        *d = (*d).max(ts);
                    }
                    (None, Some(labels)) => rows.push(Row {
                        seq,
                        series,
                        labels,
                        ts,
                        value: f64::from_bits(bits as u64),
                    }),
                    (None, None) => {}
                }
            }
        }
        let mut queued = None;
        if gone_samples > 0 {
            let mut update = tx.prepare_cached(
                "UPDATE rw_series SET last_done_ms = MAX(last_done_ms, ?3) WHERE endpoint = ?1 AND id = ?2",
            )?;
            for (series, ts) in &done {
                update.execute(params![endpoint, series, ts])?;
            }
            queued = Some(tx.prepare_cached(
                "UPDATE rw_endpoints SET queued_samples = queued_samples - ?2, queued_bytes = queued_bytes - ?3
                 WHERE id = ?1 RETURNING queued_samples, queued_bytes",
            )?
            .query_row(params![endpoint, gone_samples, gone_bytes], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })?);
        }
        tx.commit()?;
        drop(conn);
        {
            let mut hint = lock(&shared.shards[self.shard].hint);
            if scanned < limit {
                hint.resync(scanned as u64 - gone_samples as u64, Instant::now());
            } else if gone_samples > 0 {
                hint.consume(gone_samples as u64);
            }
            hint.in_flight = match (rows.first(), rows.last()) {
                (Some(a), Some(b)) => Some((a.seq, b.seq)),
                _ => None,
            };
            hint.evicted_in_flight = 0;
        }
        if gone_samples > 0 {
            let mut stats = lock(&shared.stats);
            stats.counters.dropped_out_of_order += out_of_order;
            stats.counters.dropped_too_old += too_old;
            stats.counters.dropped_invalid_labels += unknown;
            if let Some((s, b)) = queued {
                stats.queued_samples = s.max(0) as u64;
                stats.queued_bytes = b.max(0) as u64;
            }
        }
        if unknown > 0 {
            tracing::error!(remote_name = %shared.name, samples = unknown, "remote write queue: dropped queued samples of an unknown series");
        }
        Ok(Batch { rows, scanned })
    }

    /// A request is no longer on the wire: its rows evicted meanwhile are dropped.
    fn release_in_flight(&self) {
        let evicted = {
            let mut hint = lock(&self.shared.shards[self.shard].hint);
            hint.in_flight = None;
            std::mem::take(&mut hint.evicted_in_flight)
        };
        if evicted > 0 {
            lock(&self.shared.stats).counters.dropped_queue_full += evicted;
        }
    }

    /// Deletes a settled batch's rows (those the bound has not already removed) and books
    /// the outcome.
    fn settle(&self, batch: &Batch, tally: Tally) -> rusqlite::Result<()> {
        let shared = &self.shared;
        let endpoint = shared.endpoint_id;
        let (Some(first), Some(last)) = (batch.rows.first(), batch.rows.last()) else {
            return Ok(());
        };
        let (lo, hi) = (first.seq, last.seq);
        let mut done: HashMap<i64, i64> = HashMap::new();
        for row in &batch.rows {
            let d = done.entry(row.series).or_insert(row.ts);
            *d = (*d).max(row.ts);
        }
        let mut conn = shared.store.conn();
        let tx = conn.transaction()?;
        let (count, sum): (i64, i64) = tx
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM rw_queue
                 WHERE endpoint = ?1 AND shard = ?2 AND seq BETWEEN ?3 AND ?4",
            )?
            .query_row(params![endpoint, self.shard as i64, lo, hi], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        tx.prepare_cached(
            "DELETE FROM rw_queue WHERE endpoint = ?1 AND shard = ?2 AND seq BETWEEN ?3 AND ?4",
        )?
        .execute(params![endpoint, self.shard as i64, lo, hi])?;
        {
            let mut update = tx.prepare_cached(
                "UPDATE rw_series SET last_done_ms = MAX(last_done_ms, ?3) WHERE endpoint = ?1 AND id = ?2",
            )?;
            for (series, ts) in &done {
                update.execute(params![endpoint, series, ts])?;
            }
        }
        let (q_samples, q_bytes): (i64, i64) = tx
            .prepare_cached(
                "UPDATE rw_endpoints SET queued_samples = queued_samples - ?2, queued_bytes = queued_bytes - ?3
                 WHERE id = ?1 RETURNING queued_samples, queued_bytes",
            )?
            .query_row(params![endpoint, count, sum], |r| Ok((r.get(0)?, r.get(1)?)))?;
        tx.commit()?;
        drop(conn);
        {
            let mut hint = lock(&shared.shards[self.shard].hint);
            hint.consume(count as u64);
            hint.in_flight = None;
            // Rows evicted while in flight are in `sent` or `refused` like the others.
            hint.evicted_in_flight = 0;
        }
        let mut stats = lock(&shared.stats);
        stats.queued_samples = q_samples.max(0) as u64;
        stats.queued_bytes = q_bytes.max(0) as u64;
        stats.counters.sent += tally.sent;
        stats.counters.bytes_sent += tally.bytes;
        stats.counters.dropped_http_4xx += tally.refused;
        stats.counters.dropped_too_large += tally.too_large;
        if tally.sent > 0 {
            stats.last_success = Some(SystemTime::now());
            if stats.failing {
                stats.failing = false;
                tracing::info!(
                    remote_name = %shared.name,
                    url = %shared.url,
                    "remote write endpoint accepts samples again"
                );
            }
        }
        Ok(())
    }

    /// Sends `series` until it is stored or refused. A retryable failure of the whole
    /// batch (`top`) goes back to the caller, which reads the batch again after the pause;
    /// the halves of a split batch are retried here. An HTTP 400 on several series splits
    /// them while `budget` lasts: the receiver refuses a whole request for one bad sample.
    fn deliver<'a>(
        &'a mut self,
        client: &'a mut Client,
        stop: &'a mut watch::Receiver<Option<Instant>>,
        mut series: Vec<Series>,
        top: bool,
        budget: &'a mut u32,
    ) -> Pin<Box<dyn Future<Output = Delivered> + Send + 'a>> {
        Box::pin(async move {
            let n: u64 = series.iter().map(|s| s.samples.len() as u64).sum();
            let mut attempt = 0u32;
            loop {
                let message = self.shared.message();
                let encoded = match message {
                    ProtobufMessage::WriteRequestV1 => encode::encode(&series),
                    ProtobufMessage::RequestV2 => encode_v2::encode(&series),
                };
                let body = match encoded {
                    Ok(body) => Bytes::from(body),
                    Err(e) => {
                        self.record_error(e.to_string());
                        tracing::error!(remote_name = %self.shared.name, url = %self.shared.url, error = %e, "dropping a batch that cannot be encoded");
                        return Delivered::Done(Tally {
                            too_large: n,
                            ..Tally::default()
                        });
                    }
                };
                let Some(result) = until_stop(stop, client.send(body.clone(), message)).await
                else {
                    return Delivered::Stopped;
                };
                match result {
                    Ok(written) => {
                        if message == ProtobufMessage::RequestV2 && !written.any() {
                            self.shared.fall_back(
                                "a 2xx response without X-Prometheus-Remote-Write-*-Written headers (nothing stored)",
                            );
                            continue;
                        }
                        if let Some(w) = written.samples
                            && w < n
                        {
                            self.warn_partial(w, n);
                        }
                        return Delivered::Done(Tally {
                            sent: n,
                            bytes: body.len() as u64,
                            ..Tally::default()
                        });
                    }
                    Err(SendError::Rejected { status: 415, .. })
                        if message == ProtobufMessage::RequestV2 =>
                    {
                        self.shared
                            .fall_back("HTTP 415 Unsupported Media Type for the 2.0 message");
                        continue;
                    }
                    Err(SendError::Rejected { status, message }) => {
                        let error = format!("HTTP {status}: {message}");
                        self.record_error(error.clone());
                        if status == 400 && series.len() > 1 && *budget >= 2 {
                            *budget -= 2;
                            tracing::debug!(remote_name = %self.shared.name, series = series.len(), error = %error, "request refused; splitting it to isolate the refused series");
                            let right = series.split_off(series.len() / 2);
                            let a = self.deliver(client, stop, series, false, budget).await;
                            let b = match a {
                                Delivered::Stopped => return Delivered::Stopped,
                                _ => self.deliver(client, stop, right, false, budget).await,
                            };
                            return match (a, b) {
                                (Delivered::Done(x), Delivered::Done(y)) => Delivered::Done(x + y),
                                _ => Delivered::Stopped,
                            };
                        }
                        self.log_refusal(&error, n);
                        return Delivered::Done(Tally {
                            refused: n,
                            ..Tally::default()
                        });
                    }
                    Err(SendError::Retryable {
                        message,
                        retry_after,
                    }) => {
                        self.record_retry(message, n);
                        if top {
                            return Delivered::Retry(retry_after);
                        }
                        attempt = attempt.saturating_add(1);
                        let pause = backoff(
                            self.shared.queue.min_backoff.0,
                            self.shared.queue.max_backoff.0,
                            attempt,
                            retry_after,
                        );
                        if until_stop(stop, tokio::time::sleep(pause)).await.is_none() {
                            return Delivered::Stopped;
                        }
                    }
                }
            }
        })
    }

    fn record_error(&self, error: String) {
        let mut stats = lock(&self.shared.stats);
        stats.counters.requests_failed += 1;
        stats.last_error = Some((error, SystemTime::now()));
    }

    fn record_retry(&self, message: String, n: u64) {
        let first = {
            let mut stats = lock(&self.shared.stats);
            stats.counters.retried += n;
            stats.counters.requests_failed += 1;
            stats.last_error = Some((message.clone(), SystemTime::now()));
            !std::mem::replace(&mut stats.failing, true)
        };
        if first {
            tracing::warn!(
                remote_name = %self.shared.name,
                url = %self.shared.url,
                error = %message,
                "remote write failed; retrying with backoff until it succeeds (the queue is on disk)"
            );
        } else {
            tracing::debug!(remote_name = %self.shared.name, error = %message, "remote write retry failed");
        }
    }

    fn log_refusal(&mut self, error: &str, n: u64) {
        if self.rejections_logged.len() >= REJECTIONS_REMEMBERED {
            self.rejections_logged.clear();
        }
        if self.rejections_logged.insert(error.to_string()) {
            tracing::warn!(
                remote_name = %self.shared.name,
                url = %self.shared.url,
                samples = n,
                error = %error,
                "remote write endpoint refused a request; its samples are dropped \
                 (each distinct refusal is logged once)"
            );
        }
    }

    fn warn_partial(&self, written: u64, sent: u64) {
        let mut stats = lock(&self.shared.stats);
        if !std::mem::replace(&mut stats.warned_partial, true) {
            tracing::warn!(
                remote_name = %self.shared.name,
                url = %self.shared.url,
                written,
                sent,
                "the remote write 2.0 receiver answered 2xx but reports fewer samples written than sent (logged once)"
            );
        }
    }
}

/// Requests a refused batch of `series` series may be split into: enough to isolate a
/// few bad series by halving (two requests per level), not one request per series.
fn split_budget(series: usize) -> u32 {
    let levels = usize::BITS - series.leading_zeros();
    4 * levels + 2
}

/// One `Series` per label set, in order of first appearance, samples in queue order —
/// which is timestamp order, since the queue only accepts increasing timestamps per series.
fn group(rows: &[Row]) -> Vec<Series> {
    let mut index: HashMap<i64, usize> = HashMap::new();
    let mut out: Vec<Series> = Vec::new();
    for row in rows {
        let i = *index.entry(row.series).or_insert_with(|| {
            out.push(Series {
                labels: row.labels.to_vec(),
                samples: Vec::new(),
            });
            out.len() - 1
        });
        out[i].samples.push((row.ts, row.value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_get_external_labels_unless_present() {
        let ext = l(&[("cluster", "eu1"), ("job", "ext")]);
        let got = series_labels(l(&[("job", "web"), ("__name__", "up"), ("x", "")]), &ext);
        assert_eq!(
            got.unwrap(),
            l(&[("__name__", "up"), ("cluster", "eu1"), ("job", "web")])
        );
        // An empty value is no label, so the external one applies.
        let got = series_labels(l(&[("__name__", "up"), ("cluster", "")]), &ext).unwrap();
        assert_eq!(
            got,
            l(&[("__name__", "up"), ("cluster", "eu1"), ("job", "ext")])
        );
        assert!(series_labels(l(&[("job", "web")]), &[]).is_err());
        assert!(series_labels(l(&[("__name__", "up"), ("a", "1"), ("a", "2")]), &[]).is_err());
        assert!(series_labels(l(&[("__name__", "up"), ("", "1")]), &[]).is_err());
    }

    #[test]
    fn backoff_bounds() {
        let min = Duration::from_millis(30);
        let max = Duration::from_secs(5);
        for attempt in 1..40 {
            let d = backoff(min, max, attempt, None);
            assert!(d >= min && d <= max, "attempt {attempt}: {d:?}");
        }
        // Doubling: by attempt 3 the base is 120ms, jittered into [60ms, 120ms].
        for _ in 0..100 {
            let d = backoff(min, max, 3, None);
            assert!(
                d >= Duration::from_millis(60) && d <= Duration::from_millis(120),
                "{d:?}"
            );
        }
        assert!(backoff(min, max, 40, None) >= Duration::from_millis(2500));
        assert_eq!(
            backoff(min, max, 1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(backoff(min, max, 1, Some(Duration::from_secs(3600))), max);
        assert!(backoff(min, max, 1, Some(Duration::ZERO)) <= min);
    }

    #[test]
    fn groups_by_series_in_order() {
        let a: LabelSet = Arc::from(l(&[("__name__", "a")]));
        let b: LabelSet = Arc::from(l(&[("__name__", "b")]));
        let row = |seq, series, labels: &LabelSet, ts, value| Row {
            seq,
            series,
            labels: labels.clone(),
            ts,
            value,
        };
        let rows = vec![
            row(1, 1, &a, 1, 1.0),
            row(2, 2, &b, 1, 2.0),
            row(3, 1, &a, 2, 3.0),
            row(4, 1, &a, 3, 4.0),
        ];
        let got = group(&rows);
        assert_eq!(
            got,
            vec![
                Series {
                    labels: a.to_vec(),
                    samples: vec![(1, 1.0), (2, 3.0), (3, 4.0)]
                },
                Series {
                    labels: b.to_vec(),
                    samples: vec![(1, 2.0)]
                },
            ]
        );
    }

    #[test]
    fn hints_track_arrivals() {
        let t0 = Instant::now();
        let mut h = ShardHint::default();
        h.add(3, t0);
        h.add(2, t0 + Duration::from_secs(1));
        assert_eq!(h.pending(), 5);
        h.consume(4);
        assert_eq!(h.pending(), 1);
        assert_eq!(h.oldest(), Some(t0 + Duration::from_secs(1)));
        h.resync(3, t0);
        assert_eq!(h.pending(), 3);
        h.resync(0, t0);
        assert_eq!(h.pending(), 0);
        assert_eq!(h.oldest(), None);
        for i in 0..(ARRIVALS_KEPT as u64 + 10) {
            h.add(1, t0 + Duration::from_millis(i));
        }
        assert_eq!(h.arrivals.len(), ARRIVALS_KEPT);
        assert_eq!(h.pending(), ARRIVALS_KEPT as u64 + 10);
    }

    #[test]
    fn split_budget_isolates_a_few_series() {
        assert_eq!(split_budget(1), 6);
        // 2000 series: 11 halvings reach one series; enough for two bad ones.
        assert!(split_budget(2000) >= 2 * 2 * 11);
        assert!(split_budget(2000) < 100);
    }

    fn sample(name: &str, ts: i64) -> SeriesSample {
        SeriesSample {
            labels: l(&[("__name__", name)]),
            timestamp_ms: ts,
            value: ts as f64,
        }
    }

    fn open(store: &Arc<Store>, q: &QueueConfig) -> Shared {
        Shared::open(
            "t".into(),
            "http://x/".into(),
            Vec::new(),
            q,
            ProtobufMessage::WriteRequestV1,
            store.clone(),
        )
        .unwrap()
    }

    fn queued(store: &Store) -> Vec<(String, i64)> {
        let conn = store.conn();
        let mut stmt = conn
            .prepare(
                "SELECT s.labels, q.ts FROM rw_queue q JOIN rw_series s
                 ON s.endpoint = q.endpoint AND s.id = q.series ORDER BY q.seq",
            )
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn enqueue_drops_out_of_order_and_bounds_bytes() {
        let store = Arc::new(Store::in_memory().unwrap());
        let mut q = QueueConfig::default();
        let one = sample_bytes(&l(&[("__name__", "m")]));
        q.max_queue_bytes = sonde_proto::config::ByteSize(one * 3);
        let shared = open(&store, &q);
        let push = |samples: Vec<SeriesSample>| {
            store.with_tx(|tx| shared.enqueue(tx, &samples)).unwrap();
        };
        push(vec![sample("m", 10), sample("m", 10), sample("m", 5)]);
        push((11..=15).map(|t| sample("m", t)).collect());
        let snap = shared.snapshot();
        assert_eq!(snap.counters.dropped_out_of_order, 2);
        assert_eq!(snap.counters.dropped_queue_full, 3);
        assert_eq!(snap.queued_samples, 3);
        assert_eq!(snap.queued_bytes, one * 3);
        let ts: Vec<i64> = queued(&store).into_iter().map(|(_, t)| t).collect();
        assert_eq!(ts, [13, 14, 15]);
    }

    #[test]
    fn a_rolled_back_enqueue_leaves_nothing_behind() {
        let store = Arc::new(Store::in_memory().unwrap());
        let shared = open(&store, &QueueConfig::default());
        let r = store.with_tx(|tx| {
            shared.enqueue(tx, &[sample("m", 10), sample("new", 10)])?;
            tx.execute("INSERT INTO nonexistent VALUES (1)", [])?;
            Ok(())
        });
        assert!(r.is_err());
        assert!(queued(&store).is_empty());
        // The replay of the same samples is accepted: nothing remembered them.
        store
            .with_tx(|tx| shared.enqueue(tx, &[sample("m", 10), sample("new", 10)]))
            .unwrap();
        assert_eq!(queued(&store).len(), 2);
        assert_eq!(shared.snapshot().counters.dropped_out_of_order, 0);
    }

    #[test]
    fn last_queued_survives_reopening_and_shards_relayout() {
        let dir = std::env::temp_dir().join(format!("sonde-rw-queue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut q = QueueConfig {
            max_shards: 2,
            ..QueueConfig::default()
        };
        {
            let store = Arc::new(Store::open(&dir).unwrap());
            let shared = open(&store, &q);
            store
                .with_tx(|tx| {
                    shared.enqueue(
                        tx,
                        &(0..20)
                            .map(|i| sample(&format!("m{i}"), 100))
                            .collect::<Vec<_>>(),
                    )
                })
                .unwrap();
        }
        q.max_shards = 3;
        let store = Arc::new(Store::open(&dir).unwrap());
        let shared = open(&store, &q);
        assert_eq!(shared.snapshot().queued_samples, 20);
        store
            .with_tx(|tx| shared.enqueue(tx, &[sample("m1", 100), sample("m1", 101)]))
            .unwrap();
        assert_eq!(shared.snapshot().counters.dropped_out_of_order, 1);
        // Every row sits in the shard its series hashes to for 3 shards.
        let conn = store.conn();
        let mut stmt = conn
            .prepare("SELECT q.shard, s.labels FROM rw_queue q JOIN rw_series s ON s.endpoint = q.endpoint AND s.id = q.series")
            .unwrap();
        let rows: Vec<(i64, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows.len(), 21);
        let shards: HashSet<i64> = rows.iter().map(|(s, _)| *s).collect();
        assert!(shards.len() > 1, "{shards:?}");
        for (shard, key) in rows {
            assert_eq!(shard as u64, fnv1a64(key.as_bytes()) % 3);
        }
        drop(stmt);
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
