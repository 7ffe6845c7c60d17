//! The durable queue of one endpoint, in the aggregator's SQLite database: blocks of
//! samples in order, a dictionary of series labels, a cursor per shard.
//!
//! **Tables** (created here, shared by every endpoint, keyed by a small endpoint id):
//! - `rw_endpoints`: one row per endpoint name, with the shard count its blocks are laid
//!   out for, the queue's size (samples and bytes) kept exact in the same transactions
//!   that add and remove samples, and a count of enqueues (see *Rollbacks* below);
//! - `rw_blocks`: the samples one enqueue adds to one shard (at most
//!   `max_samples_per_send` per block), encoded by [`block`]: a few bytes of series id
//!   and timestamp delta plus the value's 8 bytes per sample. `first` is the shard's
//!   cursor inside its oldest block: the samples before it are done with (sent, refused
//!   or dropped), and `bytes` is what the rest weigh against `max_queue_bytes`;
//! - `rw_dict`: series labels (protobuf, ready to copy into a request) by series id, one
//!   row per enqueue that met series new to the current **epoch**. An epoch lasts
//!   [`EPOCH_LENGTH`]; a series' labels are written once per epoch, and an epoch's rows
//!   go once no block of that epoch or an older one is left. So the labels cost a
//!   series once per ten minutes, not once per sample, and nothing keeps a row per
//!   series forever.
//!
//! **Writing**: [`Shared::enqueue`] runs inside the caller's transaction, so a batch of
//! results and the samples it adds to every endpoint commit together or not at all. It
//! never touches the network: per sample it is a hash lookup keyed by the hub's
//! [`Series`] (the external labels, the protobuf labels, the shard and the weight are
//! worked out once per series and cached), a timestamp check and ~11 bytes appended to
//! the shard's block; per enqueue, one row per shard touched, maybe a dictionary row,
//! and one update of `rw_endpoints`.
//!
//! **Order**: per series, a sample at or before the last timestamp queued for it is
//! dropped (`out_of_order`): the receiver would refuse the whole request for it. The
//! check is in memory, keyed by the series' final labels, and lasts as long as the hub
//! holds the series or the cache holds it (bounded, pruned of series nobody holds);
//! on start it is seeded with the last timestamp of every series still queued. It is not
//! kept across restarts for series whose samples were all sent: the hub orders
//! timestamps per series and commits what it acked with the samples, so a restart does
//! not hand the same sample twice, and a series' next sample is newer anyway.
//!
//! **Rollbacks**: the in-memory state an enqueue changes (last timestamps, which series'
//! labels are in the current epoch's dictionary) is staged. Every enqueue bumps
//! `rw_endpoints.enqueues` in the caller's transaction and remembers the value; the
//! next enqueue reads it back first: if it is not what the previous one wrote, that
//! transaction rolled back, and its staged changes are undone. Transactions on the store
//! are serialized, so this is exact.
//!
//! **Reading** (the shard tasks in `sender`): a shard reads which blocks it holds from
//! its cursor on; a block still in the `tail` (the newest ones, kept in memory in request
//! form) is copied from there, any other is read back, its series ids resolved through
//! the dictionary (cached per epoch). After the receiver stored (2xx) or refused for good
//! (4xx) the request, the shard moves its cursor past them in one small transaction,
//! deleting blocks it has finished (and dropping them from the tail). Blocks are per shard
//! and a series always hashes to the same shard, so its samples leave in order.
//!
//! **Bound**: past `max_queue_bytes` the oldest samples (lowest block id, across shards)
//! are dropped inside the enqueue's transaction and counted; those of a request on the
//! wire count as sent if it lands, dropped if it has to be redone.

use super::block::{self, BlockBuilder};
use super::config::{ProtobufMessage, QueueConfig, RemoteWriteError, fnv1a64};
use super::request::{self, LabelsPb, SeriesBatch, TimeSeriesFields};
use super::tail::{Tail, TailBlock};
use crate::series::{SampleSource, Series, SeriesLabels};
use crate::store::{Store, StoreError};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use sonde_proto::exposition::Family;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long an epoch of the label dictionary lasts (see the module docs).
const EPOCH_LENGTH: Duration = Duration::from_secs(600);
/// Arrival records kept per shard (for batch_send_deadline); past it the newest merge.
const ARRIVALS_KEPT: usize = 256;
/// The series cache is pruned of entries nobody else holds once it has this many
/// (or twice as many as after the last pruning).
const CACHE_PRUNE_MIN: usize = 65_536;
/// Blocks fetched per query when reading or evicting.
const BLOCKS_PER_READ: i64 = 8;
/// Samples per block when old-format rows are converted.
const MIGRATED_BLOCK: usize = 2000;

/// A new block, nothing of it done yet (`first` 0).
const INSERT_BLOCK: &str =
    "INSERT INTO rw_blocks (endpoint, shard, epoch, first, samples, bytes, data)
     VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6)";

/// Stores `block` as the newest block of `shard` with [`INSERT_BLOCK`].
fn insert_block(
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
const SCHEMA: &str = "
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
fn migrate_rows(tx: &Transaction<'_>) -> rusqlite::Result<()> {
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

/// What a sample counts toward `max_queue_bytes`: its uncompressed size as sent, labels
/// included (label name and value plus protobuf framing, 16 bytes of timestamp and value).
/// The queue really uses less, since a series' labels are stored once per epoch, so the
/// bound is a conservative one.
pub(crate) fn sample_bytes<K: AsRef<str>, V: AsRef<str>>(labels: &[(K, V)]) -> u64 {
    16 + labels
        .iter()
        .map(|(n, v)| (n.as_ref().len() + v.as_ref().len() + 4) as u64)
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
    /// Blocks of the queue's store that no longer decode (or name series missing from
    /// its dictionary): damage to the file, never the samples' fault.
    pub dropped_damaged: u64,
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
            + self.dropped_damaged
            + self.dropped_too_large
            + self.dropped_too_old
    }
}

/// Self-metrics and the status page's view. In memory: they restart from zero with the
/// process (Prometheus counters may reset), except the queue size, read from the database.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) counters: Counters,
    queued_samples: u64,
    queued_bytes: u64,
    pub(crate) failing: bool,
    pub(crate) last_error: Option<(String, SystemTime)>,
    pub(crate) last_success: Option<SystemTime>,
    warned_invalid: bool,
    pub(crate) warned_partial: bool,
}

/// One series as this endpoint queues it (its final labels: external labels added).
struct Entry {
    /// Names the series in blocks and the dictionary; never given to other labels.
    id: u64,
    labels: LabelsPb,
    weight: u64,
    shard: usize,
    last_ts: i64,
    /// The epoch whose dictionary holds the labels (written or staged); -1 for none.
    dict_epoch: i64,
    /// The enqueue that last staged this entry.
    staged_by: u64,
}

/// What the last enqueue changed, to undo if it rolled back: (the entry's index, its
/// id, last_ts before, dict_epoch before). An index reused since is told apart by the id.
type Staged = Vec<(u32, u64, i64, i64)>;

/// A slot of the cache's table: the hub's series it was last met as (which keeps the
/// series' address, and so its `queue_slots`, alive), and its entry (`None`: labels no
/// receiver accepts).
type Slot = Option<(Series, Option<Entry>)>;

/// A map keyed by a series' final labels, hashed with foldhash: SipHash over ~150 bytes
/// of labels was a tenth of the storage thread's time while new series arrive.
type LabelsMap<V> = HashMap<LabelsPb, V, foldhash::fast::RandomState>;

/// The dictionaries the shards read, by epoch: the last row id loaded and the labels by
/// series id.
type DictCache = HashMap<i64, (i64, block::IdMap<LabelsPb>)>;

/// Tells the caches of different queues apart in a series' `queue_slots`.
static NEXT_TOKEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// The enqueue side's memory: series → entry, and what the last enqueue staged.
struct Cache {
    /// Entries by index; a series finds its index in its own `queue_slots` (one load,
    /// no hashing), or, met under a new `Arc`, through `by_labels`.
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// This cache's mark in `queue_slots`.
    token: u32,
    /// Final labels → the index of their entry. A hub series met again under a new
    /// `Arc` (or two hub series with the same final labels) takes the entry over, so
    /// the order check and the id follow the labels, not the `Arc`.
    by_labels: LabelsMap<u32>,
    /// Last timestamps of the series found queued at start.
    restored: LabelsMap<i64>,
    next_id: u64,
    epoch: i64,
    epoch_started: Instant,
    /// [`EPOCH_LENGTH`] (tests shorten it).
    epoch_length: Duration,
    staged: Staged,
    /// `rw_endpoints.enqueues` as the last enqueue left it.
    staged_mark: Option<i64>,
    generation: u64,
    prune_at: usize,
}

impl Cache {
    fn new(restored: LabelsMap<i64>, next_id: u64, epoch: i64, now: Instant) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            token: NEXT_TOKEN.fetch_add(1, Ordering::Relaxed),
            by_labels: LabelsMap::default(),
            restored,
            next_id,
            epoch,
            epoch_started: now,
            epoch_length: EPOCH_LENGTH,
            staged: Vec::new(),
            staged_mark: None,
            generation: 0,
            prune_at: CACHE_PRUNE_MIN,
        }
    }

    /// Undoes the last enqueue's staged changes if its transaction did not commit.
    fn resolve(&mut self, enqueues: i64) {
        if let Some(mark) = self.staged_mark.take()
            && mark != enqueues
        {
            let mut staged = std::mem::take(&mut self.staged);
            for (index, id, ts, epoch) in staged.drain(..).rev() {
                let entry = match self.slots.get_mut(index as usize) {
                    Some(Some((_, Some(e)))) if e.id == id => Some(e),
                    // Moved since: found by id (rare).
                    _ => self
                        .slots
                        .iter_mut()
                        .filter_map(|s| s.as_mut().and_then(|(_, e)| e.as_mut()))
                        .find(|e| e.id == id),
                };
                if let Some(e) = entry {
                    e.last_ts = ts;
                    e.dict_epoch = epoch;
                }
            }
            self.staged = staged;
        }
        self.staged.clear();
    }

    /// The index `series` carries for this cache, if it still holds this series.
    fn index_of(&self, series: &Series) -> Option<u32> {
        series.queue_slots.iter().find_map(|slot| {
            let v = slot.load(Ordering::Relaxed);
            let index = v as u32;
            ((v >> 32) as u32 == self.token
                && matches!(self.slots.get(index as usize), Some(Some((s, _))) if Arc::ptr_eq(s, series)))
            .then_some(index)
        })
    }

    /// Marks `series` as kept at `index`: in a free slot, else in the slot of the
    /// queue whose token has this one's parity.
    fn mark(&self, series: &Series, index: u32) {
        let v = (u64::from(self.token) << 32) | u64::from(index);
        let slots = &series.queue_slots;
        let at = slots
            .iter()
            .position(|s| (s.load(Ordering::Relaxed) >> 32) as u32 == self.token)
            .or_else(|| slots.iter().position(|s| s.load(Ordering::Relaxed) == 0))
            .unwrap_or(self.token as usize % slots.len());
        slots[at].store(v, Ordering::Relaxed);
    }

    fn take_index(&mut self) -> u32 {
        match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// The entry for `series` and its index, created (or taken over from an earlier
    /// series with the same final labels) on a miss; `None` for labels no receiver
    /// accepts.
    fn entry(
        &mut self,
        series: &Series,
        external: &[(String, String)],
        shard_count: usize,
        warn: impl FnOnce(&str, &[(String, String)]),
    ) -> Option<(u32, &mut Entry)> {
        let index = match self.index_of(series) {
            Some(i) => i,
            None => self.insert(series, external, shard_count, warn),
        };
        match self.slots.get_mut(index as usize) {
            Some(Some((_, Some(e)))) => Some((index, e)),
            _ => None,
        }
    }

    fn insert(
        &mut self,
        series: &Series,
        external: &[(String, String)],
        shard_count: usize,
        warn: impl FnOnce(&str, &[(String, String)]),
    ) -> u32 {
        let index = match final_labels(series, external) {
            Err((problem, labels)) => {
                warn(problem, &labels);
                let index = self.take_index();
                self.slots[index as usize] = Some((series.clone(), None));
                index
            }
            Ok(labels) => {
                let pb: LabelsPb = request::labels_pb(&labels).into();
                let taken =
                    self.by_labels.get(&pb).copied().filter(|&i| {
                        matches!(self.slots.get(i as usize), Some(Some((_, Some(_)))))
                    });
                match taken {
                    Some(index) => {
                        if let Some((held, _)) = &mut self.slots[index as usize] {
                            *held = series.clone();
                        }
                        index
                    }
                    None => {
                        let id = self.next_id;
                        self.next_id += 1;
                        let entry = Entry {
                            id,
                            weight: sample_bytes(&labels),
                            shard: (fnv1a64(&pb) % shard_count as u64) as usize,
                            last_ts: self.restored.remove(&pb).unwrap_or(i64::MIN),
                            labels: pb.clone(),
                            dict_epoch: -1,
                            staged_by: 0,
                        };
                        let index = self.take_index();
                        self.slots[index as usize] = Some((series.clone(), Some(entry)));
                        self.by_labels.insert(pb, index);
                        index
                    }
                }
            }
        };
        self.mark(series, index);
        index
    }

    fn prune(&mut self) {
        let live = self.slots.len() - self.free.len();
        if live <= self.prune_at {
            return;
        }
        // Series only the cache holds: the hub has let them go. Their entries go too; a
        // series met again starts afresh (new id, no order check).
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some((series, entry)) = slot
                && Arc::strong_count(series) == 1
            {
                if let Some(e) = entry
                    && self.by_labels.get(&e.labels) == Some(&(i as u32))
                {
                    self.by_labels.remove(&e.labels);
                }
                *slot = None;
                self.free.push(i as u32);
            }
        }
        let live = self.slots.len() - self.free.len();
        self.prune_at = CACHE_PRUNE_MIN.max(2 * live);
    }
}

/// A shard's idea of how much waits in its part of the queue, and since when. Only a
/// hint for when to read (batch full, or its oldest sample's batch_send_deadline passed):
/// every read corrects it.
#[derive(Default)]
pub(crate) struct ShardHint {
    /// (samples, when they were queued), oldest first.
    pub(crate) arrivals: VecDeque<(u64, Instant)>,
    /// The request on the wire: from (block, sample) up to (block, sample), exclusive.
    in_flight: Option<((i64, u32), (i64, u32))>,
    /// Samples of the request on the wire that the byte bound removed meanwhile: sent if
    /// the request lands, dropped (queue_full) if it has to be redone.
    evicted_in_flight: u64,
    /// The dictionary epoch of the shard's last read.
    epoch: Option<i64>,
}

impl ShardHint {
    pub(crate) fn pending(&self) -> u64 {
        self.arrivals.iter().map(|(n, _)| n).sum()
    }

    pub(crate) fn oldest(&self) -> Option<Instant> {
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

    /// The shard holds exactly `n` samples (a read reached its end): keeps the newest
    /// arrival records that account for them.
    fn resync(&mut self, n: u64, now: Instant) {
        let pending = self.pending();
        if pending > n {
            self.consume(pending - n);
        } else if pending < n {
            // Samples the hints never saw (queued before this process started): due now.
            self.arrivals
                .push_front((n - pending, now - Duration::from_secs(86400)));
        }
    }

    /// How many of the samples `from..to` of block `id` are on the wire.
    fn in_flight_among(&self, id: i64, from: u32, to: u32) -> u64 {
        let Some(((lo_block, lo), (hi_block, hi))) = self.in_flight else {
            return 0;
        };
        if id < lo_block || id > hi_block {
            return 0;
        }
        let start = if id == lo_block { from.max(lo) } else { from };
        let end = if id == hi_block { to.min(hi) } else { to };
        u64::from(end.saturating_sub(start))
    }
}

pub(crate) struct Shard {
    pub(crate) hint: Mutex<ShardHint>,
    pub(crate) wake: Notify,
    /// The query for the shard's blocks, its endpoint and shard written in: SQLite
    /// (built with STAT4) prepares a statement again whenever a value bound for an
    /// indexed column changes, and one statement shared by the shards did so on every
    /// read.
    select: String,
}

/// What the producers and the shard tasks of one endpoint share.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) url: String,
    endpoint_id: i64,
    /// Added to every series that does not have the label itself.
    external_labels: Vec<(String, String)>,
    store: Arc<Store>,
    pub(crate) queue: QueueConfig,
    cache: Mutex<Cache>,
    /// The epoch enqueues write in, for the dictionary's clean-up.
    epoch: AtomicI64,
    /// Series labels by epoch and id, for the shard tasks, with the last dictionary row
    /// read of each epoch.
    dict: Mutex<DictCache>,
    pub(crate) shards: Vec<Shard>,
    pub(crate) stats: Mutex<Stats>,
    /// The configured message, and whether 2.0 is still in use (false once the receiver
    /// showed it does not speak it).
    configured: ProtobufMessage,
    v2: AtomicBool,
    /// The newest blocks in request form (see `tail`).
    tail: Tail,
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every section below restores its invariants before it can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Part of a block read for a request: its samples `from..to`.
struct Span {
    block: i64,
    epoch: i64,
    from: u32,
    to: u32,
    /// The weight of each sample `from..to`.
    weights: Vec<u64>,
}

/// A block's row without its data.
struct BlockRow {
    id: i64,
    epoch: i64,
    /// The shard's cursor in it.
    first: u32,
    samples: u32,
}

/// Samples of a shard about to be sent.
pub(crate) struct Batch {
    spans: Vec<Span>,
    /// The samples to send, grouped by series in order of first appearance (read from
    /// the database)...
    pub(crate) series: Vec<SeriesBatch>,
    /// ... or in request form (from the tail); one of the two is empty.
    pub(crate) fields: TimeSeriesFields,
    /// Samples read, including those dropped on reading.
    pub(crate) scanned: u64,
    too_old: u64,
    damaged: u64,
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

/// A block an enqueue is filling, and the same samples in request form for the tail.
struct OpenBlock {
    block: BlockBuilder,
    tail: Option<TailBlock>,
}

struct Eviction {
    per_shard: Vec<u64>,
    in_flight: Vec<u64>,
    dropped: u64,
}

type Invalid = (&'static str, Vec<(String, String)>);

/// The labels a series is queued under: its own, plus the external labels it lacks,
/// names in byte order. Refuses what receivers refuse outright (a missing metric name,
/// an empty or repeated label name), since one such sample would get its whole request
/// rejected.
fn final_labels<'a>(
    series: &'a SeriesLabels,
    external: &'a [(String, String)],
) -> Result<Vec<(&'a str, &'a str)>, Invalid> {
    let mut labels: Vec<(&str, &str)> = series
        .labels()
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (&**k, &**v))
        .collect();
    let own = labels.len();
    for (name, value) in external {
        if !value.is_empty() && !labels[..own].iter().any(|(n, _)| *n == name.as_str()) {
            labels.push((name, value));
        }
    }
    labels.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let owned = |labels: &[(&str, &str)]| {
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    if !labels.iter().any(|(n, _)| *n == "__name__") {
        return Err(("no __name__ label", owned(&labels)));
    }
    if labels.iter().any(|(n, _)| n.is_empty()) {
        return Err(("an empty label name", owned(&labels)));
    }
    if labels.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(("a label name given twice", owned(&labels)));
    }
    Ok(labels)
}

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

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub(crate) fn max_queue_bytes(&self) -> u64 {
        self.queue.max_queue_bytes.0
    }

    /// Runs `f` in a transaction of the store this queue lives in.
    pub(crate) fn store_transaction<R>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        self.store.transaction(f)
    }

    /// The message requests are encoded as now.
    pub(crate) fn message(&self) -> ProtobufMessage {
        if self.v2.load(Ordering::Relaxed) {
            ProtobufMessage::RequestV2
        } else {
            ProtobufMessage::WriteRequestV1
        }
    }

    /// The receiver does not speak 2.0: 1.0 from now on, logged once.
    pub(crate) fn fall_back(&self, why: &str) {
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

    /// Drops the oldest samples until the queue fits `max_queue_bytes`.
    fn evict(
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
    fn gc_dict(&self, tx: &Transaction<'_>) -> rusqlite::Result<()> {
        let current = self.epoch.load(Ordering::Relaxed);
        tx.prepare_cached(
            "DELETE FROM rw_dict WHERE endpoint = ?1 AND epoch < MIN(?2,
               COALESCE((SELECT MIN(epoch) FROM rw_blocks WHERE endpoint = ?1), ?2))",
        )?
        .execute(params![self.endpoint_id, current])?;
        Ok(())
    }

    /// After the commit of the transaction the last enqueue ran in: its blocks join the
    /// tail, and the shard tasks look at what was queued.
    pub(crate) fn wake(&self) {
        self.tail.publish();
        for shard in &self.shards {
            shard.wake.notify_one();
        }
    }

    /// The dictionary with `epoch`'s part loaded (again, if one of `ids` is newer than
    /// what was loaded); held locked while the caller looks labels up in it.
    fn dictionary(
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
    fn take_from_tail(
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
    fn take_from_disk(
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
                "Samples never to be sent: refused by the endpoint (http_4xx), pushed out of the full queue (queue_full), not newer than the last sample of their series (out_of_order), with labels no receiver accepts (invalid_labels), in a block of the queue's store that no longer decodes (damaged), in a request too large to encode (too_large), or older than queue_config.sample_age_limit when their turn came (too_old).",
            )
            .with(with("reason", "http_4xx"), c.dropped_http_4xx as f64)
            .with(with("reason", "queue_full"), c.dropped_queue_full as f64)
            .with(with("reason", "out_of_order"), c.dropped_out_of_order as f64)
            .with(with("reason", "invalid_labels"), c.dropped_invalid_labels as f64)
            .with(with("reason", "damaged"), c.dropped_damaged as f64)
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

/// Labels by epoch then series id: the dictionary of `endpoint`, all of it or one
/// epoch's rows after a row id; with the last row id read.
type Dict = HashMap<i64, block::IdMap<LabelsPb>>;

fn load_dict(
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

struct Restored {
    last: LabelsMap<i64>,
    max_epoch: Option<i64>,
    damaged: u64,
}

/// Reads every block of `endpoint`: the last timestamp queued per series, and, with
/// `relayout`, the blocks written again for its shard count (per series order kept:
/// a series' samples all come from one old shard, read in order).
fn restore_blocks(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::Sample;
    use std::collections::HashSet;

    fn sample(name: &str, ts: i64) -> Sample {
        Sample::from_pairs(&[("__name__", name)], ts, ts as f64)
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

    type Queued = (usize, Vec<(String, String)>, i64);

    /// What is queued, shard by shard in block order: (shard, labels, timestamp).
    fn queued(store: &Store) -> Vec<Queued> {
        let conn = store.conn();
        let (_, dict) = load_dict(&conn, 1, None).unwrap();
        let rows: Vec<(i64, i64, i64, Vec<u8>)> = conn
            .prepare("SELECT shard, epoch, first, data FROM rw_blocks ORDER BY shard, id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut out = Vec::new();
        for (shard, epoch, first, data) in rows {
            let block = block::decode(&data).unwrap();
            for &(s, ts, _) in block.samples.iter().skip(first as usize) {
                let labels = &dict[&epoch][&block.series[s as usize].0];
                out.push((
                    shard as usize,
                    request::parse_labels_pb(labels).unwrap(),
                    ts,
                ));
            }
        }
        out
    }

    fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_get_external_labels_unless_present() {
        let ext = l(&[("cluster", "eu1"), ("job", "ext")]);
        let final_of = |pairs: &[(&str, &str)], ext: &[(String, String)]| {
            let series = SeriesLabels::from_pairs(pairs);
            final_labels(&series, ext).map(|l| {
                l.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            final_of(&[("job", "web"), ("__name__", "up"), ("x", "")], &ext).unwrap(),
            l(&[("__name__", "up"), ("cluster", "eu1"), ("job", "web")])
        );
        // An empty value is no label, so the external one applies.
        assert_eq!(
            final_of(&[("__name__", "up"), ("cluster", "")], &ext).unwrap(),
            l(&[("__name__", "up"), ("cluster", "eu1"), ("job", "ext")])
        );
        // Byte order: an uppercase name sorts before __name__.
        assert_eq!(
            final_of(&[("__name__", "up"), ("Zone", "z")], &[]).unwrap(),
            l(&[("Zone", "z"), ("__name__", "up")])
        );
        assert!(final_of(&[("job", "web")], &[]).is_err());
        assert!(final_of(&[("__name__", "up"), ("", "1")], &[]).is_err());
        assert!(final_of(&[("__name__", "up")], &l(&[("", "x")])).is_err());
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
    fn in_flight_ranges_span_blocks() {
        let mut h = ShardHint {
            in_flight: Some(((10, 5), (12, 3))),
            ..ShardHint::default()
        };
        assert_eq!(h.in_flight_among(9, 0, 100), 0);
        assert_eq!(h.in_flight_among(10, 0, 8), 3);
        assert_eq!(h.in_flight_among(11, 2, 9), 7);
        assert_eq!(h.in_flight_among(12, 0, 9), 3);
        assert_eq!(h.in_flight_among(12, 4, 9), 0);
        assert_eq!(h.in_flight_among(13, 0, 9), 0);
        h.in_flight = None;
        assert_eq!(h.in_flight_among(11, 0, 9), 0);
    }

    #[test]
    fn enqueue_drops_out_of_order_and_bounds_bytes() {
        let store = Arc::new(Store::in_memory().unwrap());
        let mut q = QueueConfig::default();
        let one = sample_bytes(&[("__name__", "m")]);
        q.max_queue_bytes = sonde_proto::config::ByteSize(one * 3);
        let shared = open(&store, &q);
        let m = sample("m", 0).series;
        let at = |ts: i64| Sample {
            series: m.clone(),
            timestamp_ms: ts,
            value: 1.0,
        };
        let push = |samples: Vec<Sample>| {
            store
                .transaction(|tx| shared.enqueue(tx, &samples))
                .unwrap();
        };
        push(vec![at(10), at(10), at(5)]);
        // Another Arc with the same labels shares the order check.
        push(vec![sample("m", 10)]);
        push((11..=15).map(at).collect());
        let snap = shared.snapshot();
        assert_eq!(snap.counters.dropped_out_of_order, 3);
        assert_eq!(snap.counters.dropped_queue_full, 3);
        assert_eq!(snap.queued_samples, 3);
        assert_eq!(snap.queued_bytes, one * 3);
        let ts: Vec<i64> = queued(&store).into_iter().map(|(_, _, t)| t).collect();
        assert_eq!(ts, [13, 14, 15]);
    }

    #[test]
    fn a_rolled_back_enqueue_leaves_nothing_behind() {
        let store = Arc::new(Store::in_memory().unwrap());
        let shared = open(&store, &QueueConfig::default());
        let (m, new) = (sample("m", 10), sample("new", 10));
        store
            .transaction(|tx| shared.enqueue(tx, std::slice::from_ref(&m)))
            .unwrap();
        let m11 = Sample {
            timestamp_ms: 11,
            ..m.clone()
        };
        let r = store.transaction(|tx| {
            shared.enqueue(tx, &[m11.clone(), new.clone()])?;
            tx.execute("INSERT INTO nonexistent VALUES (1)", [])?;
            Ok(())
        });
        assert!(r.is_err());
        assert_eq!(queued(&store).len(), 1);
        // The replay of the same samples is accepted: nothing remembered them, and the
        // new series' labels are written again (the rolled-back dictionary row is gone).
        store
            .transaction(|tx| shared.enqueue(tx, &[m11.clone(), new.clone()]))
            .unwrap();
        let mut got: Vec<(String, i64)> = queued(&store)
            .into_iter()
            .map(|(_, l, t)| (l[0].1.clone(), t))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("m".to_string(), 10),
                ("m".to_string(), 11),
                ("new".to_string(), 10)
            ]
        );
        assert_eq!(shared.snapshot().counters.dropped_out_of_order, 0);
        assert_eq!(shared.snapshot().queued_samples, 3);
    }

    /// A sample as a request carries it: labels, timestamp, the value's bits.
    type Sent = (Vec<(String, String)>, i64, u64);

    /// Every sample a batch would send, in request order.
    fn batch_samples(batch: &Batch) -> Vec<Sent> {
        let body = if batch.fields.is_empty() {
            request::write_request_v1(&batch.series)
        } else {
            batch.fields.write_request().to_vec()
        };
        let request: sonde_proto::prompb::WriteRequest = prost::Message::decode(&body[..]).unwrap();
        request
            .timeseries
            .iter()
            .flat_map(|ts| {
                let labels: Vec<(String, String)> = ts
                    .labels
                    .iter()
                    .map(|l| (l.name.clone(), l.value.clone()))
                    .collect();
                ts.samples
                    .iter()
                    .map(move |s| (labels.clone(), s.timestamp, s.value.to_bits()))
            })
            .collect()
    }

    fn one_shard() -> QueueConfig {
        QueueConfig {
            max_shards: 1,
            ..QueueConfig::default()
        }
    }

    #[test]
    fn a_shard_that_keeps_up_sends_from_the_tail_what_the_database_holds() {
        let store = Arc::new(Store::in_memory().unwrap());
        // One block per request: two blocks of the same series in one request would be
        // read from the database (see the next test).
        let q = QueueConfig {
            max_samples_per_send: 30,
            ..one_shard()
        };
        let shared = open(&store, &q);
        let wave = |ts: i64| -> Vec<Sample> {
            (0..30)
                .map(|i| {
                    Sample::from_pairs(
                        &[
                            ("__name__", "probe_success"),
                            ("instance", &format!("t{i}")),
                        ],
                        ts,
                        if i % 3 == 0 { -0.0 } else { i as f64 / 7.0 },
                    )
                })
                .collect()
        };
        store
            .transaction(|tx| shared.enqueue(tx, &wave(1000)))
            .unwrap();
        shared.wake();
        store
            .transaction(|tx| shared.enqueue(tx, &wave(0)))
            .unwrap();
        shared.wake();
        store
            .transaction(|tx| shared.enqueue(tx, &wave(2000)))
            .unwrap();
        shared.wake();
        assert_eq!(
            shared.tail.len(),
            2,
            "two blocks (the wave at 0 is out of order)"
        );

        let from_tail = shared.read_batch(0).unwrap();
        assert!(from_tail.series.is_empty() && from_tail.fields.len() == 30);
        // The same samples, read back from the database by a queue that has no tail yet.
        let from_disk = open(&store, &q).read_batch(0).unwrap();
        assert!(from_disk.fields.is_empty() && from_disk.series.len() == 30);
        assert_eq!(batch_samples(&from_tail), batch_samples(&from_disk));

        shared.settle(0, &from_tail, Tally::default()).unwrap();
        assert_eq!(shared.tail.len(), 1, "a settled block leaves the tail");
        let second = shared.read_batch(0).unwrap();
        assert_eq!(second.fields.len(), 30);
        assert!(batch_samples(&second).iter().all(|(_, ts, _)| *ts == 2000));
        shared.settle(0, &second, Tally::default()).unwrap();
        assert_eq!(shared.tail.len(), 0);
        assert_eq!(shared.read_batch(0).unwrap().scanned, 0);
    }

    #[test]
    fn a_series_twice_in_a_request_from_the_tail_is_a_timeseries_per_sample() {
        let store = Arc::new(Store::in_memory().unwrap());
        let shared = open(&store, &one_shard());
        for ts in [1, 2] {
            store
                .transaction(|tx| shared.enqueue(tx, &[sample("a", ts), sample("b", ts)]))
                .unwrap();
            shared.wake();
        }
        let batch = shared.read_batch(0).unwrap();
        assert!(batch.series.is_empty());
        assert_eq!(batch.fields.len(), 4, "as Prometheus sends them");
        let ts: Vec<i64> = batch_samples(&batch).iter().map(|s| s.1).collect();
        assert_eq!(ts, [1, 1, 2, 2]);
        // Split by series when refused.
        let request::Payload::Series(series) = request::Payload::Fields(batch.fields).grouped()
        else {
            panic!("not grouped")
        };
        assert_eq!(series.len(), 2);
        assert!(series.iter().all(|s| s.samples.len() == 2));
    }

    #[test]
    fn the_tail_holds_only_committed_blocks() {
        let store = Arc::new(Store::in_memory().unwrap());
        let shared = open(&store, &one_shard());
        let r = store.transaction(|tx| {
            shared.enqueue(tx, &[sample("gone", 1)])?;
            tx.execute("INSERT INTO nonexistent VALUES (1)", [])?;
            Ok(())
        });
        assert!(r.is_err());
        // The rolled-back block's id is the next block's: the tail must not mix them up.
        store
            .transaction(|tx| shared.enqueue(tx, &[sample("kept", 2)]))
            .unwrap();
        shared.wake();
        let batch = shared.read_batch(0).unwrap();
        let got = batch_samples(&batch);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, l(&[("__name__", "kept")]));
        assert_eq!(shared.tail.len(), 1);
    }

    #[test]
    fn a_block_evicted_by_its_own_enqueue_never_reaches_the_tail() {
        let store = Arc::new(Store::in_memory().unwrap());
        let q = QueueConfig {
            max_shards: 1,
            max_queue_bytes: sonde_proto::config::ByteSize(1),
            ..QueueConfig::default()
        };
        let shared = open(&store, &q);
        store
            .transaction(|tx| shared.enqueue(tx, &[sample("a", 1)]))
            .unwrap();
        shared.wake();
        assert_eq!(shared.tail.len(), 0);
        assert_eq!(shared.snapshot().counters.dropped_queue_full, 1);
    }

    #[test]
    fn the_order_check_survives_reopening_and_shards_relayout() {
        let dir = std::env::temp_dir().join(format!("sonde-rw-queue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut q = QueueConfig {
            max_shards: 2,
            ..QueueConfig::default()
        };
        {
            let store = Arc::new(Store::open(&dir).unwrap());
            let shared = open(&store, &q);
            for t in [100, 101] {
                store
                    .transaction(|tx| {
                        shared.enqueue(
                            tx,
                            &(0..20)
                                .map(|i| sample(&format!("m{i}"), t))
                                .collect::<Vec<_>>(),
                        )
                    })
                    .unwrap();
            }
        }
        q.max_shards = 3;
        let store = Arc::new(Store::open(&dir).unwrap());
        let shared = open(&store, &q);
        assert_eq!(shared.snapshot().queued_samples, 40);
        store
            .transaction(|tx| shared.enqueue(tx, &[sample("m1", 101), sample("m1", 102)]))
            .unwrap();
        assert_eq!(shared.snapshot().counters.dropped_out_of_order, 1);
        // Every sample sits in the shard its series hashes to for 3 shards, in order.
        let rows = queued(&store);
        assert_eq!(rows.len(), 41);
        let shards: HashSet<usize> = rows.iter().map(|(s, _, _)| *s).collect();
        assert!(shards.len() > 1, "{shards:?}");
        let mut last: HashMap<Vec<(String, String)>, i64> = HashMap::new();
        for (shard, labels, ts) in rows {
            let pb = request::labels_pb(&labels);
            assert_eq!(shard as u64, fnv1a64(&pb) % 3);
            let before = last.insert(labels, ts);
            assert!(before.is_none_or(|b| b < ts));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rows_of_the_first_format_become_blocks() {
        let store = Store::in_memory().unwrap();
        store
            .conn()
            .execute_batch(
                r#"
                CREATE TABLE rw_endpoints (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                    url TEXT NOT NULL, shards INTEGER NOT NULL,
                    queued_samples INTEGER NOT NULL DEFAULT 0, queued_bytes INTEGER NOT NULL DEFAULT 0);
                CREATE TABLE rw_series (endpoint INTEGER NOT NULL, id INTEGER NOT NULL,
                    labels TEXT NOT NULL, last_queued_ms INTEGER NOT NULL,
                    last_done_ms INTEGER NOT NULL, PRIMARY KEY (endpoint, id)) WITHOUT ROWID;
                CREATE TABLE rw_queue (endpoint INTEGER NOT NULL, shard INTEGER NOT NULL,
                    seq INTEGER NOT NULL, series INTEGER NOT NULL, ts INTEGER NOT NULL,
                    bits INTEGER NOT NULL, bytes INTEGER NOT NULL,
                    PRIMARY KEY (endpoint, shard, seq)) WITHOUT ROWID;
                INSERT INTO rw_endpoints VALUES (1, 't', 'http://x/', 4, 3, 78);
                INSERT INTO rw_series VALUES (1, 0, '[["__name__","a"]]', 2, 0);
                INSERT INTO rw_series VALUES (1, 1, '[["__name__","b"]]', 1, 0);
                INSERT INTO rw_queue VALUES (1, 0, 1, 0, 1, 0, 26), (1, 2, 2, 1, 1, 0, 26),
                    (1, 0, 3, 0, 2, 0, 26);
                "#,
            )
            .unwrap();
        let store = Arc::new(store);
        let shared = open(&store, &QueueConfig::default());
        assert_eq!(shared.snapshot().queued_samples, 3);
        assert_eq!(shared.snapshot().queued_bytes, 78);
        let rows = queued(&store);
        for (shard, labels, _) in &rows {
            assert_eq!(*shard as u64, fnv1a64(&request::labels_pb(labels)) % 4);
        }
        let mut got: Vec<(String, i64)> = rows
            .into_iter()
            .map(|(_, l, t)| (l[0].1.clone(), t))
            .collect();
        got.sort();
        assert_eq!(got, [("a".into(), 1), ("a".into(), 2), ("b".into(), 1)]);
        // Their order check came along.
        store
            .transaction(|tx| shared.enqueue(tx, &[sample("a", 2), sample("b", 2)]))
            .unwrap();
        assert_eq!(shared.snapshot().counters.dropped_out_of_order, 1);
    }

    fn dict_epochs(store: &Store) -> Vec<i64> {
        store
            .conn()
            .prepare("SELECT epoch FROM rw_dict ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn labels_go_once_per_epoch_and_leave_with_their_blocks() {
        let store = Arc::new(Store::in_memory().unwrap());
        let q = QueueConfig {
            max_shards: 1,
            ..QueueConfig::default()
        };
        let shared = open(&store, &q);
        let m = sample("m", 1).series;
        let at = |ts: i64| Sample {
            series: m.clone(),
            timestamp_ms: ts,
            value: 1.0,
        };
        store
            .transaction(|tx| shared.enqueue(tx, &[at(1), at(2)]))
            .unwrap();
        store
            .transaction(|tx| shared.enqueue(tx, &[at(3)]))
            .unwrap();
        assert_eq!(dict_epochs(&store), [0]);
        lock(&shared.cache).epoch_length = Duration::ZERO;
        store
            .transaction(|tx| shared.enqueue(tx, &[at(4)]))
            .unwrap();
        assert_eq!(dict_epochs(&store), [0, 1]);

        let batch = shared.read_batch(0).unwrap();
        assert_eq!(batch.series.len(), 1);
        let ts: Vec<i64> = batch.series[0].samples.iter().map(|s| s.0).collect();
        assert_eq!(ts, [1, 2, 3, 4]);
        let sent = Tally {
            sent: 4,
            ..Tally::default()
        };
        shared.settle(0, &batch, sent).unwrap();
        // Epoch 0 has no block left; the current epoch's labels stay for the enqueues.
        assert_eq!(dict_epochs(&store), [1]);
        assert!(queued(&store).is_empty());
        let snap = shared.snapshot();
        assert_eq!((snap.queued_samples, snap.queued_bytes), (0, 0));
        assert_eq!(snap.counters.sent, 4);
    }

    #[test]
    fn a_partly_sent_block_keeps_its_cursor() {
        let store = Arc::new(Store::in_memory().unwrap());
        let q = QueueConfig {
            max_shards: 1,
            max_samples_per_send: 3,
            ..QueueConfig::default()
        };
        let shared = open(&store, &q);
        let samples: Vec<Sample> = (0..5).map(|i| sample(&format!("m{i}"), 1)).collect();
        store
            .transaction(|tx| shared.enqueue(tx, &samples))
            .unwrap();
        let sent = |n| Tally {
            sent: n,
            ..Tally::default()
        };
        // Blocks hold at most max_samples_per_send: 3 then 2.
        let first = shared.read_batch(0).unwrap();
        assert_eq!(first.scanned, 3);
        shared.settle(0, &first, sent(3)).unwrap();
        let rest = shared.read_batch(0).unwrap();
        let names: Vec<String> = rest
            .series
            .iter()
            .map(|s| request::parse_labels_pb(&s.labels).unwrap()[0].1.clone())
            .collect();
        assert_eq!(names, ["m3", "m4"]);
        // Settling the same batch twice (a retry after a lost commit) moves nothing.
        shared.settle(0, &rest, sent(2)).unwrap();
        shared.settle(0, &rest, Tally::default()).unwrap();
        assert_eq!(shared.snapshot().queued_samples, 0);
        assert_eq!(shared.read_batch(0).unwrap().scanned, 0);
    }

    #[test]
    fn a_damaged_block_is_dropped_and_counted() {
        let store = Arc::new(Store::in_memory().unwrap());
        let q = QueueConfig {
            max_shards: 1,
            ..QueueConfig::default()
        };
        let shared = open(&store, &q);
        store
            .transaction(|tx| shared.enqueue(tx, &[sample("a", 1), sample("b", 1)]))
            .unwrap();
        store
            .conn()
            .execute("UPDATE rw_blocks SET data = x'01ff'", [])
            .unwrap();
        let batch = shared.read_batch(0).unwrap();
        assert!(batch.series.is_empty());
        assert_eq!(batch.scanned, 2);
        shared.settle(0, &batch, Tally::default()).unwrap();
        let snap = shared.snapshot();
        assert_eq!(snap.counters.dropped_damaged, 2);
        assert_eq!(snap.counters.dropped_invalid_labels, 0);
        assert_eq!((snap.queued_samples, snap.queued_bytes), (0, 0));
    }
}
