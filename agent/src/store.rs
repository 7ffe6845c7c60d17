//! The agent's store-and-forward buffer on disk: every result waits in SQLite
//! (`<storage.path>/agent.db`, WAL) from the moment it is produced until the aggregator
//! it is for acks it, so that neither a broken link nor a killed agent loses it.
//!
//! # Layout
//!
//! - `queue(aggregator, seq, bytes, body)`: one row per result *per aggregator* it is
//!   for. The alternative, one row per result plus per-aggregator ack marks, would store
//!   a shared result once instead of once per aggregator; but only local jobs and checks
//!   that several aggregators assigned (an HA pair) are shared at all, and with a row per
//!   aggregator every ack and every drop is one range delete on one aggregator's rows,
//!   no row's life depends on another aggregator's progress, and each aggregator's row
//!   can carry that aggregator's own assignment generation.
//! - `aggregators(id, address, acked_seq)`: each aggregator's cursor, keyed by address so
//!   that reordering the config keeps it.
//! - `meta('last_seq')`: the highest sequence number ever written, so numbering
//!   continues above it after a restart even when every result was acked.
//!
//! A body is a [`ProbeRecord`] in its own protobuf form ([`ProbeRecord::encode`]).
//!
//! # Writing
//!
//! One writer thread owns the write connection and commits whatever has queued up in
//! one transaction (group commit): probing tasks only hand their result to a channel,
//! and the tokio workers never wait for SQLite. A result becomes visible to the uplink
//! (`Store::pending_after`) only once its transaction has committed, so anything the
//! aggregator has seen is on disk. With WAL and `synchronous=NORMAL` a commit is in the
//! WAL file when it returns: a SIGKILL loses nothing committed; only a power cut can
//! lose the last transactions before a checkpoint (no fsync per commit, which would
//! wear the flash of small edge hosts for little gain).
//!
//! # Memory and the bound
//!
//! `max_bytes` bounds all aggregators' rows together (the file is what a user sizes),
//! counting each row's body plus [`ROW_OVERHEAD`]. When a commit takes the buffer past
//! it, the oldest rows go first, whichever aggregator they wait for (in practice the
//! one that is away), and never the newest result. In memory the store keeps, per
//! aggregator, an index of 16 bytes per buffered result (sequence number and size) and
//! the newest results in full up to [`CACHE_BYTES`], so a connected uplink never reads
//! back from disk; a backlog is read from SQLite in the uplink's batches.

use crate::buffer::{Buffer, BufferStats};
use crate::record::ProbeRecord;
use rusqlite::Connection;
use rusqlite::types::ValueRef;
use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The database's file name under `--storage.path`.
pub const DB_FILE: &str = "agent.db";
/// Held locked (`flock`) while an agent uses the directory, so two agents never share
/// one buffer and ack each other's results.
const LOCK_FILE: &str = "agent.lock";

const SCHEMA_VERSION: i64 = 2;
const SCHEMA: &str = "
CREATE TABLE aggregators (
    id INTEGER PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    acked_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE queue (
    aggregator INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (aggregator, seq)
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Schema 2: probes recorded per target, counted in the transaction that stores each
/// result, so `sonde_agent_probes_total` survives restarts and equals what was kept.
const SCHEMA_2: &str = "
CREATE TABLE probe_counts (
    job TEXT NOT NULL,
    instance TEXT NOT NULL,
    total INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    PRIMARY KEY (job, instance)
);
";

/// What a row costs on disk beyond its body, roughly: its key again in the primary-key
/// index, the cell headers, and the free space left in pages (measured with
/// `benches/buffer.rs`: ~150 bytes per row of an HTTP probe's ~900-byte body).
pub const ROW_OVERHEAD: usize = 150;
/// The newest results kept in full per aggregator, so the uplink of a connected
/// aggregator is fed from memory.
pub const CACHE_BYTES: usize = 4 << 20;
/// Operations waiting for the writer. Past this, a producer waits: that only happens
/// when the disk has stalled, and waiting then keeps memory bounded.
const CHANNEL_CAPACITY: usize = 65_536;
/// Operations per transaction at most, so a backlog is committed in steps that keep
/// each step's latency short.
const MAX_BATCH: usize = 8_192;
/// A repeated write error is logged at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Probes recorded for one target: ((job, instance), (total, failed)).
pub type ProbeCount = ((String, String), (u64, u64));

/// Which aggregators a result is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// A local job's result: every aggregator.
    All,
    /// An assigned check's result: the aggregator at this index in the config.
    One(usize),
    /// A check several aggregators assigned, run once: each of these aggregators (by
    /// index in the config, sorted, each once) with the generation of its own assignment,
    /// which the result carries in that aggregator's row.
    Each(Arc<[(usize, u64)]>),
}

/// One aggregator's row of a result: what that aggregator is sent.
struct Row {
    slot: usize,
    record: Arc<ProbeRecord>,
    body: Arc<[u8]>,
}

impl Route {
    /// The rows of `record` for the `n` configured aggregators, encoded: one encoding
    /// shared by every aggregator that gets the same record.
    fn rows(&self, record: &Arc<ProbeRecord>, n: usize) -> Vec<Row> {
        let body: Arc<[u8]> = record.encode().into();
        let row = |slot| Row {
            slot,
            record: record.clone(),
            body: body.clone(),
        };
        match self {
            Route::All => (0..n).map(row).collect(),
            Route::One(i) if *i < n => vec![row(*i)],
            Route::One(_) => Vec::new(),
            Route::Each(slots) => {
                let mut rows: Vec<Row> = Vec::with_capacity(slots.len());
                for &(slot, generation) in slots.iter().filter(|(slot, _)| *slot < n) {
                    if generation == record.generation {
                        rows.push(row(slot));
                    } else if let Some(same) =
                        rows.iter().find(|r| r.record.generation == generation)
                    {
                        rows.push(Row {
                            slot,
                            record: same.record.clone(),
                            body: same.body.clone(),
                        });
                    } else {
                        let record = Arc::new(ProbeRecord {
                            generation,
                            ..(**record).clone()
                        });
                        let body = record.encode().into();
                        rows.push(Row { slot, record, body });
                    }
                }
                rows
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open {path}: {source}; check --storage.path")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open {path}: {source}; check --storage.path")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error(
        "cannot open {path}: another sonde-agent is using it; give each agent its own --storage.path"
    )]
    Locked { path: String },
    #[error(
        "cannot open {path}: it was written by a newer sonde-agent (buffer schema {found}, this agent reads {SCHEMA_VERSION}); upgrade this agent or point --storage.path elsewhere"
    )]
    NewerSchema { path: String, found: i64 },
    #[error("aggregator {address} is listed twice under aggregators; list each aggregator once")]
    DuplicateAggregator { address: String },
}

pub struct Store {
    shared: Arc<Shared>,
    input: Mutex<Input>,
    /// Reads of a backlog; in WAL they run beside the writer's transactions. The same
    /// connection as the writer's for an in-memory store.
    reader: Arc<Mutex<Connection>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    lock_file: Mutex<Option<File>>,
    location: String,
}

/// Numbering and handing over to the writer happen under one lock, so the writer sees
/// results in sequence order and each aggregator's rows arrive sorted.
struct Input {
    next_seq: u64,
    /// `None` once the store is closed.
    tx: Option<SyncSender<Op>>,
}

struct Shared {
    state: Mutex<State>,
    added: Vec<Arc<Notify>>,
    addresses: Vec<String>,
    /// Each aggregator's `aggregators.id`.
    ids: Vec<i64>,
    max_bytes: u64,
    cache_bytes: usize,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    /// Every aggregator's rows together: what `max_bytes` bounds.
    bytes: u64,
    write_errors: u64,
    /// The error of the last transaction, while the last one that wrote anything
    /// failed: what `/-/ready` reports.
    failing: Option<String>,
}

/// One aggregator's committed, unacked results.
#[derive(Default)]
struct Slot {
    /// All of them, in sequence order.
    index: VecDeque<Entry>,
    /// The newest of them in full: always a suffix of `index`.
    cache: VecDeque<Arc<ProbeRecord>>,
    cache_bytes: usize,
    bytes: u64,
    dropped: u64,
    acked_seq: u64,
    /// Everything at or below was acked or dropped. Rows the writer has not deleted yet
    /// may still be on disk; they must not be sent again.
    floor: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    seq: u64,
    bytes: u32,
}

enum Op {
    Append {
        record: Arc<ProbeRecord>,
        route: Route,
    },
    /// Acked (`acked`) or dropped: every row of the aggregator up to `up_to`.
    Delete {
        slot: usize,
        up_to: u64,
        acked: bool,
    },
    /// Answered once everything before it is committed and visible.
    Flush(std::sync::mpsc::Sender<()>),
}

impl Store {
    /// Opens (or creates) the buffer in `dir`, or an in-memory one for `None`, for the
    /// aggregators with these addresses in config order.
    pub fn open(
        dir: Option<&Path>,
        aggregators: &[String],
        max_bytes: u64,
    ) -> Result<Arc<Self>, StoreError> {
        Self::open_with_cache(dir, aggregators, max_bytes, CACHE_BYTES)
    }

    fn open_with_cache(
        dir: Option<&Path>,
        aggregators: &[String],
        max_bytes: u64,
        cache_bytes: usize,
    ) -> Result<Arc<Self>, StoreError> {
        for (i, address) in aggregators.iter().enumerate() {
            if aggregators[..i].contains(address) {
                return Err(StoreError::DuplicateAggregator {
                    address: address.clone(),
                });
            }
        }
        let (writer_conn, reader, lock_file, location) = match dir {
            Some(dir) => {
                let location = dir.join(DB_FILE).display().to_string();
                std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                    path: dir.display().to_string(),
                    source,
                })?;
                let lock = lock_dir(dir)?;
                let sql = |source| StoreError::Sqlite {
                    path: location.clone(),
                    source,
                };
                let path = dir.join(DB_FILE);
                make_private(dir).map_err(|source| StoreError::Io {
                    path: location.clone(),
                    source,
                })?;
                let writer = Connection::open(&path).map_err(sql)?;
                configure(&writer, true).map_err(sql)?;
                let reader = Connection::open(&path).map_err(sql)?;
                configure(&reader, false).map_err(sql)?;
                (
                    Arc::new(Mutex::new(writer)),
                    Arc::new(Mutex::new(reader)),
                    Some(lock),
                    location,
                )
            }
            None => {
                let location = "the in-memory agent buffer".to_string();
                let conn = Connection::open_in_memory().map_err(|source| StoreError::Sqlite {
                    path: location.clone(),
                    source,
                })?;
                let conn = Arc::new(Mutex::new(conn));
                (conn.clone(), conn, None, location)
            }
        };
        let loaded = load(&mut lock(&writer_conn), aggregators, &location)?;
        let mut state = State {
            bytes: loaded.slots.iter().map(|s| s.bytes).sum(),
            slots: loaded.slots,
            write_errors: 0,
            failing: None,
        };
        // A smaller max_bytes than last time applies to what is already buffered.
        let newest = state
            .slots
            .iter()
            .filter_map(|s| s.index.back().map(|e| e.seq))
            .max()
            .unwrap_or(0);
        let cuts = state.enforce(max_bytes, newest);
        if !cuts.is_empty() {
            delete_cuts(&mut lock(&writer_conn), &loaded.ids, &cuts).map_err(|source| {
                StoreError::Sqlite {
                    path: location.clone(),
                    source,
                }
            })?;
        }
        let buffered: usize = state.slots.iter().map(|s| s.index.len()).sum();
        if buffered > 0 {
            tracing::info!(buffer = %location, results = buffered, "results from an earlier run are waiting to be sent");
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            added: aggregators
                .iter()
                .map(|_| Arc::new(Notify::new()))
                .collect(),
            addresses: aggregators.to_vec(),
            ids: loaded.ids,
            max_bytes,
            cache_bytes,
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_CAPACITY);
        let writer = {
            let shared = shared.clone();
            let thread_location = location.clone();
            std::thread::Builder::new()
                .name("sonde-buffer".into())
                .spawn(move || run_writer(writer_conn, rx, shared, thread_location))
                .map_err(|source| StoreError::Io {
                    path: location.clone(),
                    source,
                })?
        };
        Ok(Arc::new(Self {
            shared,
            input: Mutex::new(Input {
                next_seq: loaded.last_seq + 1,
                tx: Some(tx),
            }),
            reader,
            writer: Mutex::new(Some(writer)),
            lock_file: Mutex::new(lock_file),
            location,
        }))
    }

    /// One handle per aggregator, in config order, with its address.
    pub fn buffers(self: &Arc<Self>) -> Vec<(String, Arc<Buffer>)> {
        self.shared
            .addresses
            .iter()
            .enumerate()
            .map(|(slot, address)| {
                let added = self.shared.added[slot].clone();
                (
                    address.clone(),
                    Arc::new(Buffer::new(self.clone(), slot, added)),
                )
            })
            .collect()
    }

    /// Numbers a result and queues it for the aggregators of `route`; the uplinks see
    /// it once it is committed. `None` when the store is closed.
    pub fn append(&self, route: Route, build: impl FnOnce(u64) -> ProbeRecord) -> Option<u64> {
        let mut input = lock(&self.input);
        input.tx.as_ref()?;
        let record = Arc::new(build(input.next_seq));
        self.queue(&mut input, record, route)
    }

    /// Queues a result numbered by the caller. Sequence numbers must rise: one at or
    /// below a number already used is renumbered, because the uplink relies on each
    /// aggregator's results arriving in order.
    pub(crate) fn push_numbered(&self, record: Arc<ProbeRecord>, route: Route) {
        let mut input = lock(&self.input);
        let record = if record.seq >= input.next_seq {
            record
        } else {
            tracing::warn!(
                seq = record.seq,
                next = input.next_seq,
                "a result numbered out of order is renumbered"
            );
            Arc::new(ProbeRecord {
                seq: input.next_seq,
                ..(*record).clone()
            })
        };
        self.queue(&mut input, record, route);
    }

    /// Hands a result to the writer; called with the input lock held so that the
    /// writer sees results in sequence order.
    fn queue(&self, input: &mut Input, record: Arc<ProbeRecord>, route: Route) -> Option<u64> {
        let tx = input.tx.as_ref()?;
        let seq = record.seq;
        if tx.send(Op::Append { record, route }).is_err() {
            tracing::error!(buffer = %self.location, "the buffer's writer has stopped; a result is lost");
            return None;
        }
        input.next_seq = seq + 1;
        Some(seq)
    }

    /// Numbers from here on are at least `seq`.
    pub fn raise_next_seq(&self, seq: u64) {
        let mut input = lock(&self.input);
        input.next_seq = input.next_seq.max(seq);
    }

    /// The number the next result gets.
    pub fn next_seq(&self) -> u64 {
        lock(&self.input).next_seq
    }

    /// Waits until everything queued so far is committed and visible. Blocks.
    /// Probes recorded per (job, instance) over the life of this storage: (total, failed).
    pub fn probe_counts(&self) -> Vec<ProbeCount> {
        let conn = lock(&self.reader);
        let read = || -> rusqlite::Result<Vec<ProbeCount>> {
            let mut stmt = conn.prepare("SELECT job, instance, total, failed FROM probe_counts")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    (r.get(0)?, r.get(1)?),
                    (r.get::<_, i64>(2)? as u64, r.get::<_, i64>(3)? as u64),
                ))
            })?;
            rows.collect()
        };
        read().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the probe counts; sonde_agent_probes_total starts from 0");
            Vec::new()
        })
    }

    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.send(Op::Flush(tx)) {
            let _ = rx.recv();
        }
    }

    /// Commits what is queued, stops the writer and releases the directory. Blocks.
    /// Later results are not kept.
    pub fn close(&self) {
        drop(lock(&self.input).tx.take());
        if let Some(writer) = lock(&self.writer).take()
            && writer.join().is_err()
        {
            tracing::error!(buffer = %self.location, "the buffer's writer thread panicked");
        }
        drop(lock(&self.lock_file).take());
    }

    /// `Err` with the reason while the buffer cannot take results: it is closed (the
    /// agent is stopping), or its last write failed (disk full, I/O error) and no write
    /// has succeeded since.
    pub fn health(&self) -> Result<(), String> {
        if lock(&self.input).tx.is_none() {
            return Err(format!("the buffer {} is closed", self.location));
        }
        match &self.shared.lock().failing {
            Some(e) => Err(format!(
                "the buffer {} cannot be written ({e}); results are dropped until it can, check free space and permissions under --storage.path",
                self.location
            )),
            None => Ok(()),
        }
    }

    /// Where the buffer lives, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Transactions that failed, each losing the results in it (also counted as
    /// dropped).
    pub fn write_errors(&self) -> u64 {
        self.shared.lock().write_errors
    }

    /// Rows on disk, all aggregators together.
    pub fn disk_rows(&self) -> Result<u64, rusqlite::Error> {
        lock(&self.reader).query_row("SELECT COUNT(*) FROM queue", [], |r| {
            r.get::<_, i64>(0).map(|n| n as u64)
        })
    }

    pub(crate) fn pending_after(
        &self,
        slot: usize,
        after: u64,
        max: usize,
    ) -> Vec<Arc<ProbeRecord>> {
        let floor = {
            let state = self.shared.lock();
            let s = &state.slots[slot];
            let floor = after.max(s.floor);
            let start = s.index.partition_point(|e| e.seq <= floor);
            let Some(first) = s.index.get(start) else {
                return Vec::new();
            };
            if s.cache.front().is_some_and(|c| c.seq <= first.seq) {
                let from = s.cache.partition_point(|r| r.seq <= floor);
                return s.cache.iter().skip(from).take(max).cloned().collect();
            }
            floor
        };
        let mut records = self.read(slot, floor, max);
        // An ack or a drop may have come in while reading.
        let floor = self.shared.lock().slots[slot].floor;
        records.retain(|r| r.seq > floor);
        records
    }

    fn read(&self, slot: usize, floor: u64, max: usize) -> Vec<Arc<ProbeRecord>> {
        let conn = lock(&self.reader);
        let mut records = Vec::new();
        let result = (|| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, body FROM queue WHERE aggregator = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let mut rows = stmt.query((
                self.shared.ids[slot],
                floor as i64,
                max.min(i64::MAX as usize) as i64,
            ))?;
            while let Some(row) = rows.next()? {
                let seq = row.get::<_, i64>(0)? as u64;
                let body = match row.get_ref(1)? {
                    ValueRef::Blob(b) => b,
                    _ => &[],
                };
                match ProbeRecord::decode(seq, body) {
                    Ok(r) => records.push(Arc::new(r)),
                    // Skipped: an ack past it deletes it like any other row.
                    Err(e) => tracing::error!(
                        buffer = %self.location, seq, error = %e,
                        "a buffered result cannot be read back and is skipped"
                    ),
                }
            }
            Ok::<_, rusqlite::Error>(())
        })();
        if let Err(e) = result {
            tracing::error!(buffer = %self.location, error = %e, "cannot read buffered results; will retry");
        }
        records
    }

    pub(crate) fn count_up_to(&self, slot: usize, seq: u64) -> usize {
        self.shared.lock().slots[slot]
            .index
            .partition_point(|e| e.seq <= seq)
    }

    pub(crate) fn ack(&self, slot: usize, seq: u64) -> usize {
        let (removed, advanced) = {
            let mut state = self.shared.lock();
            let s = &mut state.slots[slot];
            let advanced = seq > s.acked_seq;
            s.acked_seq = s.acked_seq.max(seq);
            let (removed, bytes) = s.remove_up_to(seq);
            state.bytes -= bytes;
            (removed, advanced)
        };
        // Sent outside the state lock: the writer takes that lock after each commit.
        if advanced {
            self.send(Op::Delete {
                slot,
                up_to: seq,
                acked: true,
            });
        }
        removed
    }

    pub(crate) fn stats(&self, slot: usize) -> BufferStats {
        let state = self.shared.lock();
        let s = &state.slots[slot];
        BufferStats {
            results: s.index.len(),
            bytes: s.bytes as usize,
            dropped: s.dropped,
            acked_seq: s.acked_seq,
        }
    }

    fn send(&self, op: Op) -> bool {
        let tx = lock(&self.input).tx.clone();
        tx.is_some_and(|tx| tx.send(op).is_ok())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl State {
    /// Drops the oldest rows, whichever aggregator they wait for, until the buffer fits
    /// in `max_bytes`; never a row at or above `newest`. Returns, per aggregator that
    /// lost rows, the highest sequence number dropped.
    fn enforce(&mut self, max_bytes: u64, newest: u64) -> Vec<(usize, u64)> {
        let mut cuts: Vec<(usize, u64)> = Vec::new();
        while self.bytes > max_bytes {
            let oldest = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.index.front().map(|e| (e.seq, i)))
                .filter(|&(seq, _)| seq < newest)
                .min();
            let Some((seq, i)) = oldest else { break };
            let slot = &mut self.slots[i];
            let (n, bytes) = slot.remove_up_to(seq);
            slot.dropped += n as u64;
            self.bytes -= bytes;
            match cuts.iter_mut().find(|(s, _)| *s == i) {
                Some(cut) => cut.1 = seq,
                None => cuts.push((i, seq)),
            }
        }
        cuts
    }
}

impl Slot {
    fn append(&mut self, record: &Arc<ProbeRecord>, bytes: u32, cache_bytes: usize) {
        let entry = Entry {
            seq: record.seq,
            bytes,
        };
        self.bytes += u64::from(bytes);
        if self.index.back().is_none_or(|e| e.seq < record.seq) {
            self.index.push_back(entry);
            self.cache_bytes += record.approx_bytes();
            self.cache.push_back(record.clone());
            while self.cache_bytes > cache_bytes
                && let Some(old) = self.cache.pop_front()
            {
                self.cache_bytes -= old.approx_bytes();
            }
        } else {
            // Not reached: results are numbered and queued under one lock. Should it
            // happen, keep the index sorted and let reads go to disk, which is ordered.
            let at = self.index.partition_point(|e| e.seq < record.seq);
            self.index.insert(at, entry);
            self.cache.clear();
            self.cache_bytes = 0;
        }
    }

    /// Forgets every result up to `seq`; returns how many and their bytes.
    fn remove_up_to(&mut self, seq: u64) -> (usize, u64) {
        self.floor = self.floor.max(seq);
        let mut removed = 0;
        let mut bytes = 0;
        while let Some(e) = self.index.front().filter(|e| e.seq <= seq) {
            bytes += u64::from(e.bytes);
            removed += 1;
            self.index.pop_front();
        }
        self.bytes -= bytes;
        while let Some(r) = self.cache.front().filter(|r| r.seq <= seq) {
            self.cache_bytes -= r.approx_bytes();
            self.cache.pop_front();
        }
        (removed, bytes)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding a lock leaves nothing half-updated that matters
    // more than keeping the agent running; recover the guard.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The database and its `-wal` and `-shm` files: what [`make_private`] keeps 0600.
const DB_FILES: [&str; 3] = [DB_FILE, "agent.db-wal", "agent.db-shm"];

/// Creates the database file readable and writable by its owner only (0600), and
/// narrows an existing one (and its `-wal` and `-shm` files) that is wider: results
/// carry target names, labels and failure messages that are nobody else's business.
/// SQLite creates the `-wal` and `-shm` files with the database file's permissions, so
/// those follow.
fn make_private(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(DB_FILE))
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        for name in DB_FILES {
            let path = dir.join(name);
            let mode = match std::fs::metadata(&path) {
                Ok(m) => m.permissions().mode(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if mode & 0o077 != 0 {
                tracing::info!(file = %path.display(), mode = format!("{:o}", mode & 0o777), "narrowing the buffer file's permissions to 0600");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut options = File::options();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: dir.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

fn configure(conn: &Connection, writer: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    if writer {
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(journal_mode = %mode, "the agent buffer's file system does not support WAL; writes will be slower");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The WAL file is truncated back to this after a checkpoint.
        conn.pragma_update(None, "journal_size_limit", 16i64 << 20)?;
    }
    Ok(())
}

struct Loaded {
    ids: Vec<i64>,
    slots: Vec<Slot>,
    last_seq: u64,
}

/// Creates or checks the schema and reads back each aggregator's cursor and index.
fn load(
    conn: &mut Connection,
    aggregators: &[String],
    location: &str,
) -> Result<Loaded, StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: location.to_string(),
        source,
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: location.to_string(),
            found: version,
        });
    }
    let tx = conn.transaction().map_err(sql)?;
    if version == 0 {
        tx.execute_batch(SCHEMA).map_err(sql)?;
    }
    if version < 2 {
        tx.execute_batch(SCHEMA_2).map_err(sql)?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql)?;
    }
    let mut ids = Vec::with_capacity(aggregators.len());
    let mut slots: Vec<Slot> = Vec::with_capacity(aggregators.len());
    for address in aggregators {
        tx.execute(
            "INSERT INTO aggregators (address) VALUES (?1) ON CONFLICT(address) DO NOTHING",
            [address],
        )
        .map_err(sql)?;
        let (id, acked): (i64, i64) = tx
            .query_row(
                "SELECT id, acked_seq FROM aggregators WHERE address = ?1",
                [address],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(sql)?;
        ids.push(id);
        slots.push(Slot {
            acked_seq: acked as u64,
            floor: acked as u64,
            ..Slot::default()
        });
    }
    // Results for an aggregator no longer configured would never be acked and would
    // hold their space for good.
    let counts: Vec<(i64, String, i64)> = {
        let mut stmt = tx
            .prepare(
                "SELECT q.aggregator, a.address, COUNT(*) FROM queue q
                 JOIN aggregators a ON a.id = q.aggregator GROUP BY q.aggregator",
            )
            .map_err(sql)?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sql)?
            .collect::<Result<_, _>>()
            .map_err(sql)?
    };
    for (id, address, count) in counts {
        if !ids.contains(&id) {
            tracing::warn!(
                buffer = %location, aggregator = %address, results = count,
                "dropping buffered results for an aggregator that is no longer configured"
            );
            tx.execute("DELETE FROM queue WHERE aggregator = ?1", [id])
                .map_err(sql)?;
        }
    }
    tx.execute(
        "DELETE FROM queue WHERE seq <= (SELECT acked_seq FROM aggregators a WHERE a.id = queue.aggregator)",
        [],
    )
    .map_err(sql)?;
    {
        let mut stmt = tx
            .prepare("SELECT aggregator, seq, bytes FROM queue ORDER BY aggregator, seq")
            .map_err(sql)?;
        let mut rows = stmt.query([]).map_err(sql)?;
        while let Some(row) = rows.next().map_err(sql)? {
            let id: i64 = row.get(0).map_err(sql)?;
            let Some(slot) = ids.iter().position(|&i| i == id) else {
                continue;
            };
            let seq = row.get::<_, i64>(1).map_err(sql)? as u64;
            let bytes = row.get::<_, i64>(2).map_err(sql)?.clamp(0, u32::MAX.into()) as u32;
            let s = &mut slots[slot];
            s.index.push_back(Entry { seq, bytes });
            s.bytes += u64::from(bytes);
        }
    }
    let last_seq: i64 = tx
        .query_row(
            "SELECT MAX(COALESCE((SELECT value FROM meta WHERE key = 'last_seq'), 0),
                        COALESCE((SELECT MAX(seq) FROM queue), 0))",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    tx.commit().map_err(sql)?;
    Ok(Loaded {
        ids,
        slots,
        last_seq: last_seq.max(0) as u64,
    })
}

fn row_bytes(body: &[u8]) -> u32 {
    (body.len() + ROW_OVERHEAD).min(u32::MAX as usize) as u32
}

fn delete_cuts(conn: &mut Connection, ids: &[i64], cuts: &[(usize, u64)]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut delete =
            tx.prepare_cached("DELETE FROM queue WHERE aggregator = ?1 AND seq <= ?2")?;
        for &(slot, up_to) in cuts {
            delete.execute((ids[slot], up_to as i64))?;
        }
    }
    tx.commit()
}

struct Encoded {
    record: Arc<ProbeRecord>,
    rows: Vec<Row>,
}

/// Commits one batch of appends and deletes in one transaction.
fn write_batch(
    conn: &mut Connection,
    ids: &[i64],
    appends: &[Encoded],
    deletes: &[(usize, u64, bool)],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO queue (aggregator, seq, bytes, body) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut count = tx.prepare_cached(
            "INSERT INTO probe_counts (job, instance, total, failed) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT(job, instance) DO UPDATE SET total = total + 1, failed = failed + excluded.failed",
        )?;
        let mut last_seq = None;
        for a in appends {
            for row in &a.rows {
                let bytes = i64::from(row_bytes(&row.body));
                insert.execute((ids[row.slot], a.record.seq as i64, bytes, &row.body[..]))?;
            }
            count.execute((
                &a.record.job,
                &a.record.instance,
                i64::from(!a.record.success),
            ))?;
            last_seq = Some(a.record.seq);
        }
        if let Some(seq) = last_seq {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('last_seq', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                [seq as i64],
            )?;
        }
        let mut delete =
            tx.prepare_cached("DELETE FROM queue WHERE aggregator = ?1 AND seq <= ?2")?;
        let mut cursor = tx.prepare_cached(
            "UPDATE aggregators SET acked_seq = MAX(acked_seq, ?2) WHERE id = ?1",
        )?;
        for &(slot, up_to, acked) in deletes {
            delete.execute((ids[slot], up_to as i64))?;
            if acked {
                cursor.execute((ids[slot], up_to as i64))?;
            }
        }
    }
    tx.commit()
}

/// The writer thread: runs until the store is closed, committing what has queued up.
fn run_writer(
    conn: Arc<Mutex<Connection>>,
    rx: Receiver<Op>,
    shared: Arc<Shared>,
    location: String,
) {
    let mut errors = Throttle::default();
    let mut ops = Vec::new();
    while let Ok(first) = rx.recv() {
        ops.push(first);
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut appends = Vec::new();
        let mut deletes = Vec::new();
        let mut flushes = Vec::new();
        for op in ops.drain(..) {
            match op {
                Op::Append { record, route } => {
                    // Encoded here rather than by the probing task, to keep that cheap.
                    let rows = route.rows(&record, shared.ids.len());
                    appends.push(Encoded { record, rows });
                }
                Op::Delete { slot, up_to, acked } => deletes.push((slot, up_to, acked)),
                Op::Flush(reply) => flushes.push(reply),
            }
        }
        let written = write_batch(&mut lock(&conn), &shared.ids, &appends, &deletes);
        let n = shared.ids.len();
        let mut touched = vec![false; n];
        match written {
            Ok(()) => {
                let cuts = {
                    let mut state = shared.lock();
                    if !appends.is_empty() || !deletes.is_empty() {
                        state.failing = None;
                    }
                    let mut newest = 0;
                    for a in &appends {
                        for row in &a.rows {
                            let bytes = row_bytes(&row.body);
                            state.slots[row.slot].append(&row.record, bytes, shared.cache_bytes);
                            state.bytes += u64::from(bytes);
                            touched[row.slot] = true;
                        }
                        newest = newest.max(a.record.seq);
                    }
                    state.enforce(shared.max_bytes, newest)
                };
                if !cuts.is_empty()
                    && let Err(e) = delete_cuts(&mut lock(&conn), &shared.ids, &cuts)
                {
                    // They stay on disk until the next delete of that aggregator's rows,
                    // which covers them; the bound is kept in memory meanwhile.
                    errors.log(&location, &e, "cannot delete dropped results");
                }
            }
            Err(e) => {
                let lost = {
                    let mut state = shared.lock();
                    state.write_errors += 1;
                    state.failing = Some(e.to_string());
                    let mut lost = 0;
                    for a in &appends {
                        for row in &a.rows {
                            state.slots[row.slot].dropped += 1;
                            lost += 1;
                        }
                    }
                    lost
                };
                errors.log(
                    &location,
                    &e,
                    &format!(
                        "cannot write to the buffer, {lost} results dropped; check free space and permissions under --storage.path"
                    ),
                );
            }
        }
        for (slot, touched) in touched.into_iter().enumerate() {
            if touched {
                shared.added[slot].notify_waiters();
            }
        }
        for reply in flushes {
            let _ = reply.send(());
        }
    }
}

#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    fn log(&mut self, location: &str, error: &rusqlite::Error, what: &str) {
        if self.last.is_some_and(|t| t.elapsed() < ERROR_LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::error!(buffer = %location, error = %error, similar_errors_not_logged = self.suppressed, "{what}");
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Sample;
    use std::path::PathBuf;

    /// `Store::open` on a directory this test process used a moment ago. Another test
    /// of the process may be forking a child right then, whose copy of the lock file's
    /// descriptor holds the `flock` until it execs: wait that out (a real restart is a
    /// new process and never sees this).
    fn reopen(dir: &Path, addresses: &[String], max_bytes: u64) -> Result<Arc<Store>, StoreError> {
        let mut tries = 0;
        loop {
            match Store::open(Some(dir), addresses, max_bytes) {
                Err(StoreError::Locked { .. }) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sonde-agent-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn record(seq: u64, job: &str) -> ProbeRecord {
        ProbeRecord {
            seq,
            job: job.into(),
            instance: "http://target:8080/".into(),
            timestamp_ms: 1_700_000_000_000 + seq as i64,
            success: !seq.is_multiple_of(3),
            duration_seconds: 0.01 * seq as f64,
            samples: vec![
                Sample {
                    name: "probe_success",
                    labels: vec![],
                    value: 1.0,
                },
                Sample {
                    name: "probe_http_duration_seconds",
                    labels: vec![("phase", "connect".into())],
                    value: 0.002,
                },
            ],
            generation: 3,
            failure: seq.is_multiple_of(3).then(|| "connection refused".into()),
        }
    }

    fn append(store: &Store, route: Route, job: &str) -> u64 {
        store
            .append(route, |seq| record(seq, job))
            .expect("store open")
    }

    fn seqs(records: &[Arc<ProbeRecord>]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    const A: &str = "http://a:9451";
    const B: &str = "http://b:9451";

    #[test]
    fn probe_counts_survive_a_restart() {
        let dir = temp_dir("counts");
        {
            let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
            for _ in 0..3 {
                append(&store, Route::All, "web");
            }
            store.flush();
        }
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        let counts = store.probe_counts();
        assert_eq!(counts.len(), 1, "{counts:?}");
        assert_eq!(counts[0].0.0, "web");
        assert_eq!(counts[0].1.0, 3);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn results_survive_a_restart_in_order_and_numbering_continues() {
        let dir = temp_dir("restart");
        let appended: Vec<u64>;
        let next;
        {
            let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
            let buffers = store.buffers();
            appended = (0..5).map(|_| append(&store, Route::All, "web")).collect();
            store.flush();
            assert_eq!(buffers[0].1.ack(appended[1]), 2);
            next = store.next_seq();
            // Everything dropped without a word, as when the process ends.
        }
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        let buffer = store.buffers().remove(0).1;
        assert_eq!(buffer.stats().acked_seq, appended[1]);
        assert_eq!(buffer.stats().results, 3);
        let pending = buffer.pending_after(buffer.stats().acked_seq, 100);
        assert_eq!(seqs(&pending), appended[2..]);
        for r in &pending {
            assert_eq!(**r, record(r.seq, "web"), "the full content comes back");
        }
        assert_eq!(
            store.next_seq(),
            next,
            "numbering continues above the old ones"
        );
        let newer = append(&store, Route::All, "web");
        store.flush();
        assert!(newer > appended[4]);
        assert_eq!(
            seqs(&buffer.pending_after(appended[1], 100)),
            [&appended[2..], &[newer]].concat(),
            "replayed results come before new ones"
        );

        // With everything acked the queue is empty, and numbering still continues.
        buffer.ack(newer);
        store.flush();
        drop(buffer);
        drop(store);
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        assert_eq!(store.disk_rows().unwrap(), 0);
        assert_eq!(store.next_seq(), newer + 1);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ack_deletes_only_up_to_the_acked_seq_and_replay_starts_after_it() {
        let dir = temp_dir("ack");
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        let buffer = store.buffers().remove(0).1;
        let s: Vec<u64> = (0..10).map(|_| append(&store, Route::All, "web")).collect();
        store.flush();
        // The uplink sends everything in two batches; the aggregator acks part of it.
        assert_eq!(seqs(&buffer.pending_after(0, 4)), s[..4]);
        assert_eq!(seqs(&buffer.pending_after(s[3], 100)), s[4..]);
        assert_eq!(buffer.count_up_to(s[9]), 10);
        assert_eq!(buffer.ack(s[5]), 6);
        store.flush();
        assert_eq!(store.disk_rows().unwrap(), 4);
        assert_eq!(buffer.count_up_to(s[9]), 4);
        // After a reconnect the uplink starts again from the last ack.
        let from = buffer.stats().acked_seq;
        assert_eq!(from, s[5]);
        assert_eq!(seqs(&buffer.pending_after(from, 100)), s[6..]);
        // A stale, smaller ack changes nothing.
        assert_eq!(buffer.ack(s[2]), 0);
        assert_eq!(buffer.stats().acked_seq, s[5]);
        drop(buffer);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_counts_them_and_keeps_the_newest() {
        let dir = temp_dir("full");
        let row = u64::from(row_bytes(&record(1000, "web").encode()));
        let store = reopen(&dir, &[A.into()], row * 3 + row / 2).unwrap();
        let buffer = store.buffers().remove(0).1;
        let mut last = 0;
        for round in 0..20 {
            for _ in 0..500 {
                last = append(&store, Route::All, "web");
            }
            store.flush();
            assert!(
                store.disk_rows().unwrap() <= 3,
                "round {round}: rows on disk stay within the bound"
            );
        }
        let stats = buffer.stats();
        assert_eq!(stats.results, 3);
        assert_eq!(stats.dropped, 10_000 - 3);
        assert!(stats.bytes as u64 <= row * 3 + row / 2);
        assert_eq!(
            seqs(&buffer.pending_after(0, 10)),
            [last - 2, last - 1, last],
            "the newest are kept"
        );
        let size = std::fs::metadata(dir.join(DB_FILE)).unwrap().len();
        assert!(size < 1 << 20, "the file stays small: {size} bytes");

        // Reopened with a smaller limit, the buffer shrinks to it at once, newest kept.
        drop(buffer);
        drop(store);
        let store = reopen(&dir, &[A.into()], 1).unwrap();
        let buffer = store.buffers().remove(0).1;
        assert_eq!(seqs(&buffer.pending_after(0, 10)), [last]);
        assert_eq!(buffer.stats().dropped, 2);
        assert_eq!(store.disk_rows().unwrap(), 1);
        drop(buffer);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_aggregators_each_get_their_results_and_their_own_acks() {
        let dir = temp_dir("two");
        let store = reopen(&dir, &[A.into(), B.into()], 1 << 20).unwrap();
        let buffers = store.buffers();
        let (a, b) = (&buffers[0].1, &buffers[1].1);
        let local1 = append(&store, Route::All, "local");
        let to_a = append(&store, Route::One(0), "assigned-a");
        let to_b = append(&store, Route::One(1), "assigned-b");
        let local2 = append(&store, Route::All, "local");
        store.flush();
        assert_eq!(seqs(&a.pending_after(0, 10)), [local1, to_a, local2]);
        assert_eq!(seqs(&b.pending_after(0, 10)), [local1, to_b, local2]);
        assert_eq!(a.pending_after(0, 10)[1].job, "assigned-a");

        assert_eq!(a.ack(local2), 3);
        store.flush();
        assert_eq!(a.stats().results, 0);
        assert_eq!(b.stats().results, 3, "A's ack leaves B's results alone");
        assert_eq!(b.stats().acked_seq, 0);
        assert_eq!(store.disk_rows().unwrap(), 3);
        assert_eq!(b.ack(local1), 1);
        store.flush();
        drop(buffers);
        drop(store);

        // Cursors follow the address, not the position in the config; an aggregator
        // that left the config takes its results with it.
        let c = "http://c:9451".to_string();
        let store = reopen(&dir, &[B.into(), A.into()], 1 << 20).unwrap();
        let buffers = store.buffers();
        assert_eq!(buffers[0].0, B);
        assert_eq!(seqs(&buffers[0].1.pending_after(0, 10)), [to_b, local2]);
        assert_eq!(buffers[0].1.stats().acked_seq, local1);
        assert_eq!(buffers[1].1.stats().acked_seq, local2);
        drop(buffers);
        drop(store);
        let store = reopen(&dir, &[A.into(), c], 1 << 20).unwrap();
        assert_eq!(store.disk_rows().unwrap(), 0);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_shared_result_is_one_number_with_each_aggregators_generation_after_a_restart() {
        let dir = temp_dir("each");
        let c = "http://c:9451".to_string();
        let aggregators = [A.into(), B.into(), c];
        let shared = {
            let store = reopen(&dir, &aggregators, 1 << 20).unwrap();
            // `record` carries generation 3: A's row keeps it, B and C get theirs.
            let route = Route::Each(Arc::from([(0, 3), (1, 8), (2, 8), (9, 1)]));
            let shared = append(&store, route, "shared");
            store.flush();
            let buffers = store.buffers();
            let generations: Vec<_> = buffers
                .iter()
                .map(|(_, b)| b.pending_after(0, 10)[0].generation)
                .collect();
            assert_eq!(generations, [3, 8, 8], "from memory");
            assert_eq!(store.disk_rows().unwrap(), 3, "none for index 9");
            shared
        };
        let store = reopen(&dir, &aggregators, 1 << 20).unwrap();
        let read: Vec<_> = store
            .buffers()
            .iter()
            .map(|(_, b)| {
                let r = b.pending_after(0, 10)[0].clone();
                (r.seq, r.generation, r.timestamp_ms, r.samples.clone())
            })
            .collect();
        let expected = record(shared, "shared");
        for (i, generation) in [3, 8, 8].into_iter().enumerate() {
            assert_eq!(
                read[i],
                (
                    shared,
                    generation,
                    expected.timestamp_ms,
                    expected.samples.clone()
                ),
                "from disk, aggregator {i}"
            );
        }
        let counts = store.probe_counts();
        assert_eq!(
            counts[0].1,
            (1, u64::from(!expected.success)),
            "counted once"
        );
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_backlog_beyond_the_cache_is_read_back_from_disk_in_order() {
        let dir = temp_dir("backlog");
        let store = Store::open_with_cache(
            Some(&dir),
            &[A.into()],
            1 << 30,
            4 * record(1, "web").approx_bytes(),
        )
        .unwrap();
        let buffer = store.buffers().remove(0).1;
        let all: Vec<u64> = (0..1000)
            .map(|_| append(&store, Route::All, "web"))
            .collect();
        store.flush();
        let mut sent = Vec::new();
        let mut after = 0;
        loop {
            let batch = buffer.pending_after(after, 64);
            let Some(last) = batch.last() else { break };
            after = last.seq;
            for r in &batch {
                assert_eq!(**r, record(r.seq, "web"));
            }
            sent.extend(seqs(&batch));
        }
        assert_eq!(sent, all);
        drop(buffer);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_result_is_on_disk_before_the_uplink_can_see_it() {
        let dir = temp_dir("visible");
        let store = reopen(&dir, &[A.into()], 1 << 30).unwrap();
        let buffer = store.buffers().remove(0).1;
        let check = Connection::open(dir.join(DB_FILE)).unwrap();
        let mut seen = 0;
        for _ in 0..2000 {
            append(&store, Route::All, "web");
            for r in buffer.pending_after(seen, 1000) {
                let on_disk: i64 = check
                    .query_row(
                        "SELECT COUNT(*) FROM queue WHERE seq = ?1",
                        [r.seq as i64],
                        |row| row.get(0),
                    )
                    .unwrap();
                assert_eq!(on_disk, 1, "result {} was visible before its commit", r.seq);
                seen = r.seq;
            }
        }
        drop(check);
        drop(buffer);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A real SIGKILL: a child process (this test binary, running only
    /// `crash_child`) appends and reports every result the uplink could have sent; the
    /// parent kills it mid-stream and finds every reported result on disk.
    #[test]
    fn results_the_uplink_saw_survive_a_sigkill() {
        use std::io::{BufRead, BufReader};
        let dir = temp_dir("sigkill");
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "store::tests::crash_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SONDE_STORE_CRASH_DIR", &dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut seen = Vec::new();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines {
            let line = line.unwrap();
            if let Some(seq) = line.strip_prefix("sent ") {
                seen.push(seq.parse::<u64>().unwrap());
                if seen.len() >= 3000 {
                    break;
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            seen.len() >= 3000,
            "the child reported {} results",
            seen.len()
        );

        let store = reopen(&dir, &[A.into()], 1 << 30).unwrap();
        let buffer = store.buffers().remove(0).1;
        let mut on_disk = Vec::new();
        let mut after = 0;
        loop {
            let batch = buffer.pending_after(after, 10_000);
            let Some(last) = batch.last() else { break };
            after = last.seq;
            on_disk.extend(seqs(&batch));
        }
        for seq in &seen {
            assert!(on_disk.binary_search(seq).is_ok(), "result {seq} was lost");
        }
        assert!(store.next_seq() > *seen.last().unwrap());
        drop(buffer);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Only does something when started by `results_the_uplink_saw_survive_a_sigkill`.
    #[test]
    fn crash_child() {
        use std::io::Write;
        let Some(dir) = std::env::var_os("SONDE_STORE_CRASH_DIR") else {
            return;
        };
        let store = Store::open(Some(Path::new(&dir)), &[A.into()], 1 << 30).unwrap();
        let buffer = store.buffers().remove(0).1;
        let mut out = std::io::stdout().lock();
        let mut sent = 0;
        loop {
            for _ in 0..20 {
                append(&store, Route::All, "web");
            }
            for r in buffer.pending_after(sent, 1000) {
                writeln!(out, "sent {}", r.seq).unwrap();
                sent = r.seq;
            }
            out.flush().unwrap();
        }
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[cfg(unix)]
    #[test]
    fn the_database_files_are_private() {
        let dir = temp_dir("private");
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        append(&store, Route::All, "web");
        store.flush();
        for name in DB_FILES.iter().chain([&LOCK_FILE]) {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        store.close();
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn wider_database_files_are_narrowed_to_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("narrowed");
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        append(&store, Route::All, "web");
        store.flush();
        // As an older agent (or a umask of 0) left them, the -wal and -shm still there.
        for name in DB_FILES {
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        drop(store);
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        append(&store, Route::All, "web");
        store.flush();
        for name in DB_FILES {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        assert_eq!(store.buffers()[0].1.stats().results, 2);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_closed_buffer_is_not_healthy() {
        let store = Store::open(None, &[A.into()], 1 << 20).unwrap();
        assert!(store.health().is_ok());
        store.close();
        assert!(store.health().unwrap_err().contains("closed"));
    }

    #[test]
    fn a_second_agent_on_the_same_path_is_refused() {
        let dir = temp_dir("locked");
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        let err = reopen(&dir, &[A.into()], 1 << 20)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&dir.display().to_string()), "{err}");
        assert!(err.contains("another sonde-agent"), "{err}");
        drop(store);
        // Released when the first one closes.
        drop(reopen(&dir, &[A.into()], 1 << 20).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unusable_path_is_named_in_the_error() {
        let file = temp_dir("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let err = Store::open(Some(&file), &[A.into()], 1 << 20)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(&format!("cannot open {}", file.display())),
            "{err}"
        );
        assert!(err.ends_with("check --storage.path"), "{err}");
        std::fs::remove_file(&file).unwrap();

        let err = Store::open(None, &[A.into(), A.into()], 1 << 20)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("listed twice"), "{err}");
    }
}
