//! The agent's buffer: it numbers every probe result and keeps it, on disk, from the
//! moment the probe ends until each aggregator it is for acks it, so that neither a
//! broken link nor a killed agent loses it. A reconnect, or a restart of the agent,
//! replays everything still here in sequence order.
//!
//! One type, [`Buffer`], for the whole agent: the scheduler hands it each result with
//! its [`Route`] (which aggregators want it, under which assignment generation), and each
//! aggregator's uplink reads its own results from it, in order, and acks them. The
//! SQLite side (schema, loading, the writer thread) is in `disk`.
//!
//! # Batches, not results
//!
//! Results move in batches end to end, and no thread is woken per result:
//!
//! - a probing task hands its result over by pushing it on the writer's channel, which
//!   costs no system call while the writer is not waiting on the channel;
//! - the writer thread wakes for the first operation after an idle spell, then lingers
//!   [`LINGER`] for more, and commits everything that came meanwhile (up to
//!   8,192 operations) in one transaction, with prepared statements (group
//!   commit). A flush (shutdown, tests) cuts the linger short, and a backlog (a full
//!   batch already waiting) is committed without one;
//! - the uplinks are woken once per commit, and send what it made visible in as few
//!   `ResultBatch`es as the protocol's bounds allow;
//! - an ack removes every result up to its sequence number, in memory at once and on
//!   disk as one range delete (`DELETE ... WHERE seq <= ?`) in the writer's next
//!   transaction.
//!
//! # Guarantees
//!
//! A result becomes visible to the uplinks ([`Buffer::pending_after`]) only once its
//! transaction has committed, so anything an aggregator has seen is on disk. With WAL
//! and `synchronous=NORMAL` a commit is in the WAL file when it returns: a SIGKILL loses
//! nothing committed, and what it loses (results of the last [`LINGER`] at most, which no
//! aggregator has seen) is not counted in `sonde_agent_probes_total` after the restart
//! either, because the per-target counts are committed in the same transaction as the
//! results. Only a power cut can lose the last transactions before a checkpoint (no
//! fsync per commit, which would wear the flash of small edge hosts for little gain).
//!
//! # Memory and the bound
//!
//! `max_bytes` bounds all aggregators' rows together (the file is what a user sizes),
//! counting each row's body plus [`ROW_OVERHEAD`]. When a commit takes the buffer past
//! it, the oldest rows go first, whichever aggregator they wait for (in practice the
//! one that is away), and never the newest result; they are counted as dropped. In
//! memory the buffer keeps, per aggregator, an index of 16 bytes per buffered result
//! (sequence number and size) and the newest results in full up to [`CACHE_BYTES`], so
//! a connected uplink never reads back from disk; a backlog is read from SQLite in the
//! uplink's batches.

mod disk;
#[cfg(test)]
mod tests;

pub use disk::DB_FILE;

use crate::probe::ProbeOutcome;
use crate::record::ProbeRecord;
use rusqlite::Connection;
use rusqlite::types::ValueRef;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::Notify;

/// What a row costs on disk beyond its body, roughly: its key again in the primary-key
/// index, the cell headers, and the free space left in pages (measured with
/// `benches/buffer.rs`: ~150 bytes per row of an HTTP probe's ~900-byte body).
pub const ROW_OVERHEAD: usize = 150;
/// The newest results kept in full per aggregator, so the uplink of a connected
/// aggregator is fed from memory.
pub const CACHE_BYTES: usize = 4 << 20;
/// How long the writer waits, after the first operation of an idle spell, for more to
/// commit with it. Results reach the aggregator this much later at most; in exchange
/// one transaction, one uplink wake-up and one message carry every result of the spell.
pub const LINGER: Duration = Duration::from_millis(100);
/// Operations waiting for the writer. Past this, a producer waits: that only happens
/// when the disk has stalled, and waiting then keeps memory bounded.
const CHANNEL_CAPACITY: usize = 65_536;
/// Operations per transaction at most, so a backlog is committed in steps that keep
/// each step's latency short.
const MAX_BATCH: usize = 8_192;

/// Probes recorded for one target: ((job, instance), (total, failed)).
pub type ProbeCount = ((String, String), (u64, u64));

/// Which aggregators a result is for, and under which assignment generation each gets
/// it: the one routing type of the agent, computed by the scheduler whenever the sources
/// of a check change, and carried with each result into the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// A local job's result: every aggregator, generation 0.
    All,
    /// An assigned check's result: these aggregators (by index in the config, sorted,
    /// each once), each with the generation of its own assignment. A check several
    /// aggregators assigned (an HA pair) runs once, and its one result (one number, one
    /// timestamp) goes to each. Empty: nobody wants it.
    To(Arc<[(usize, u64)]>),
}

impl Route {
    /// Nobody would take a result on this route.
    pub fn is_empty(&self) -> bool {
        matches!(self, Route::To(slots) if slots.is_empty())
    }

    /// The generation the result carries in the first aggregator's row.
    fn generation(&self) -> u64 {
        match self {
            Route::All => 0,
            Route::To(slots) => slots.first().map_or(0, |s| s.1),
        }
    }

    /// The rows of `record` for the `n` configured aggregators, encoded: one encoding
    /// shared by every aggregator that gets the same generation.
    fn rows(&self, record: &Arc<ProbeRecord>, n: usize) -> Vec<Row> {
        let body: Arc<[u8]> = record.encode().into();
        let row = |slot| Row {
            slot,
            record: record.clone(),
            body: body.clone(),
        };
        match self {
            Route::All => (0..n).map(row).collect(),
            Route::To(slots) => {
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

/// One aggregator's row of a result: what that aggregator is sent.
struct Row {
    slot: usize,
    record: Arc<ProbeRecord>,
    body: Arc<[u8]>,
}

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
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
    /// Another process holds the directory (or it cannot be locked).
    #[error(transparent)]
    Locked(#[from] sonde_cli::storage_lock::LockError),
    #[error(
        "cannot open {path}: it was written by a newer sonde-agent (buffer schema {found}, this agent reads {}); upgrade this agent or point --storage.path elsewhere",
        disk::SCHEMA_VERSION
    )]
    NewerSchema { path: String, found: i64 },
    #[error("aggregator {address} is listed twice under aggregators; list each aggregator once")]
    DuplicateAggregator { address: String },
}

/// Why the buffer cannot take results now ([`Buffer::health`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BufferUnhealthy {
    #[error("the buffer {location} is closed")]
    Closed { location: String },
    #[error(
        "the buffer {location} cannot be written ({error}); results are dropped until it can, check free space and permissions under --storage.path"
    )]
    WriteFailing { location: String, error: String },
}

/// A snapshot of one aggregator's part of the buffer, for metrics and the status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    pub results: usize,
    /// What the results take on disk.
    pub bytes: usize,
    pub dropped: u64,
    pub acked_seq: u64,
}

pub struct Buffer {
    shared: Arc<Shared>,
    input: Mutex<Input>,
    /// Reads of a backlog; in WAL they run beside the writer's transactions. The same
    /// connection as the writer's for an in-memory buffer.
    reader: Arc<Mutex<Connection>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    lock_file: Mutex<Option<sonde_cli::storage_lock::StorageLock>>,
    location: String,
}

/// Numbering and handing over to the writer happen under one lock, so the writer sees
/// results in sequence order and each aggregator's rows arrive sorted.
struct Input {
    next_seq: u64,
    /// `None` once the buffer is closed.
    tx: Option<SyncSender<Op>>,
}

struct Shared {
    state: Mutex<State>,
    /// Per aggregator: woken after each commit that added results for it.
    committed: Vec<Notify>,
    addresses: Vec<String>,
    /// Each aggregator's `aggregators.id`.
    ids: Vec<i64>,
    max_bytes: u64,
    cache_bytes: usize,
    /// Set by a flush or a close: the writer commits at once instead of lingering.
    urgent: AtomicBool,
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

impl Buffer {
    /// Opens (or creates) the buffer in `dir`, or an in-memory one for `None`, for the
    /// aggregators with these addresses in config order.
    pub fn open(
        dir: Option<&Path>,
        aggregators: &[String],
        max_bytes: u64,
    ) -> Result<Arc<Self>, BufferError> {
        Self::open_with_cache(dir, aggregators, max_bytes, CACHE_BYTES)
    }

    fn open_with_cache(
        dir: Option<&Path>,
        aggregators: &[String],
        max_bytes: u64,
        cache_bytes: usize,
    ) -> Result<Arc<Self>, BufferError> {
        for (i, address) in aggregators.iter().enumerate() {
            if aggregators[..i].contains(address) {
                return Err(BufferError::DuplicateAggregator {
                    address: address.clone(),
                });
            }
        }
        let opened = disk::open(dir)?;
        let location = opened.location;
        let writer_conn = opened.writer;
        let loaded = disk::load(&mut lock(&writer_conn), aggregators, &location)?;
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
            disk::delete_cuts(&mut lock(&writer_conn), &loaded.ids, &cuts).map_err(|source| {
                BufferError::Sqlite {
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
            committed: aggregators.iter().map(|_| Notify::new()).collect(),
            addresses: aggregators.to_vec(),
            ids: loaded.ids,
            max_bytes,
            cache_bytes,
            urgent: AtomicBool::new(false),
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_CAPACITY);
        let writer = {
            let shared = shared.clone();
            let thread_location = location.clone();
            std::thread::Builder::new()
                .name("sonde-buffer".into())
                .spawn(move || disk::run_writer(writer_conn, rx, shared, thread_location))
                .map_err(|source| BufferError::Io {
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
            reader: opened.reader,
            writer: Mutex::new(Some(writer)),
            lock_file: Mutex::new(opened.lock_file),
            location,
        }))
    }

    /// The aggregators' addresses, in config order; an aggregator's index here is its
    /// slot in every per-aggregator method.
    pub fn aggregators(&self) -> &[String] {
        &self.shared.addresses
    }

    /// Keeps the result of one probe for the aggregators of `route`, numbered once:
    /// `None` when nobody takes it (no aggregator, an empty route, a closed buffer).
    pub fn record(
        &self,
        route: &Route,
        job: &str,
        instance: &str,
        timestamp_ms: i64,
        outcome: ProbeOutcome,
    ) -> Option<u64> {
        if self.shared.addresses.is_empty() || route.is_empty() {
            return None;
        }
        self.append(route, |seq| ProbeRecord {
            seq,
            job: job.to_string(),
            instance: instance.to_string(),
            timestamp_ms,
            success: outcome.success,
            duration_seconds: outcome.duration.as_secs_f64(),
            samples: outcome.samples,
            generation: route.generation(),
            failure: outcome.failure,
            trace: outcome.trace,
        })
    }

    /// Numbers a record and queues it for the aggregators of `route`; the uplinks see
    /// it once it is committed. `None` when the buffer is closed.
    pub fn append(&self, route: &Route, build: impl FnOnce(u64) -> ProbeRecord) -> Option<u64> {
        let mut input = lock(&self.input);
        let tx = input.tx.as_ref()?;
        let record = Arc::new(build(input.next_seq));
        let seq = record.seq;
        let op = Op::Append {
            record,
            route: route.clone(),
        };
        if tx.send(op).is_err() {
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
    #[cfg(test)]
    pub(crate) fn next_seq(&self) -> u64 {
        lock(&self.input).next_seq
    }

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

    /// Waits until everything queued so far is committed and visible. Blocks.
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.send(Op::Flush(tx)) {
            self.hurry();
            let _ = rx.recv();
        }
    }

    /// Cuts the writer's linger short.
    fn hurry(&self) {
        self.shared.urgent.store(true, Ordering::Release);
        if let Some(writer) = lock(&self.writer).as_ref() {
            writer.thread().unpark();
        }
    }

    /// Commits what is queued, stops the writer and releases the directory. Blocks.
    /// Later results are not kept.
    pub fn close(&self) {
        drop(lock(&self.input).tx.take());
        self.hurry();
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
    pub fn health(&self) -> Result<(), BufferUnhealthy> {
        if lock(&self.input).tx.is_none() {
            return Err(BufferUnhealthy::Closed {
                location: self.location.clone(),
            });
        }
        match &self.shared.lock().failing {
            Some(e) => Err(BufferUnhealthy::WriteFailing {
                location: self.location.clone(),
                error: e.clone(),
            }),
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

    /// Rows on disk, all aggregators together (for tests and `benches/buffer.rs`).
    pub fn disk_rows(&self) -> Result<u64, rusqlite::Error> {
        lock(&self.reader).query_row("SELECT COUNT(*) FROM queue", [], |r| {
            r.get::<_, i64>(0).map(|n| n as u64)
        })
    }

    /// Woken after each commit that made results for aggregator `slot` visible. Create
    /// it before looking at [`Buffer::pending_after`], so that no commit goes unnoticed.
    pub fn committed(&self, slot: usize) -> tokio::sync::futures::Notified<'_> {
        self.shared.committed[slot].notified()
    }

    /// Up to `max` results for aggregator `slot` with a sequence number above `after`,
    /// oldest first. Only committed results: whatever is sent survives a crash of the
    /// agent.
    pub fn pending_after(&self, slot: usize, after: u64, max: usize) -> Vec<Arc<ProbeRecord>> {
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

    /// How many of aggregator `slot`'s results have a sequence number at or below `seq`.
    pub fn count_up_to(&self, slot: usize, seq: u64) -> usize {
        self.shared.lock().slots[slot]
            .index
            .partition_point(|e| e.seq <= seq)
    }

    /// Forgets every result of aggregator `slot` up to and including `seq`: the
    /// aggregator has committed them. Returns how many were forgotten.
    pub fn ack(&self, slot: usize, seq: u64) -> usize {
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
        // Not hurried: the range delete rides with the next commit.
        if advanced {
            self.send(Op::Delete {
                slot,
                up_to: seq,
                acked: true,
            });
        }
        removed
    }

    pub fn stats(&self, slot: usize) -> BufferStats {
        let state = self.shared.lock();
        let s = &state.slots[slot];
        BufferStats {
            results: s.index.len(),
            bytes: s.bytes as usize,
            dropped: s.dropped,
            acked_seq: s.acked_seq,
        }
    }

    /// Every aggregator's stats with its address, in config order.
    pub fn all_stats(&self) -> Vec<(String, BufferStats)> {
        (0..self.shared.addresses.len())
            .map(|slot| (self.shared.addresses[slot].clone(), self.stats(slot)))
            .collect()
    }

    fn send(&self, op: Op) -> bool {
        let tx = lock(&self.input).tx.clone();
        tx.is_some_and(|tx| tx.send(op).is_ok())
    }
}

impl Drop for Buffer {
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
