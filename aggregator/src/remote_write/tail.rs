//! The queue's newest blocks, kept in memory in request form, so that a shard that keeps
//! up with its endpoint sends what was just committed without reading it back from the
//! database: no blob read, no decoding, no dictionary lookups, no per-series grouping —
//! a request is the blocks' bytes copied and compressed.
//!
//! The database stays the truth. A shard still reads which blocks it holds, and where its
//! cursor is, from `rw_blocks`; a block found here is taken from here, any other from
//! the database. So the tail can drop anything at any time (it is bounded by
//! [`TAIL_MAX_BYTES`]: while a receiver is down the newest blocks go to disk only), and
//! after a restart it starts empty.
//!
//! A block enters in two steps, because its id exists only inside the enqueue's
//! transaction: the enqueue **stages** it, and [`Tail::publish`] (called after the
//! commit) makes it visible. Staged blocks of a transaction that did not commit are
//! discarded by the next enqueue, before their ids can be given to other blocks. A
//! block leaves when the queue deletes its row (sent, refused, evicted), in the same
//! step, so an id reused by SQLite never finds a stale block here.
//!
//! Only 1.0 requests are made this way (`TimeSeries` fields, one per sample); an
//! endpoint speaking 2.0 reads from the database as before.

use super::request::TimeSeriesFields;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Memory the tail of one endpoint may hold: a few seconds of a large fleet's samples
/// (about 200 bytes each). Past it, new blocks are read back from the database.
pub(crate) const TAIL_MAX_BYTES: u64 = 32 << 20;

/// One block in request form.
#[derive(Debug, Default)]
pub(crate) struct TailBlock {
    /// Sample `i`'s `TimeSeries` field.
    pub fields: TimeSeriesFields,
    /// Sample `i`'s timestamp (for `sample_age_limit`).
    pub timestamps: Vec<i64>,
    /// Sample `i`'s weight against `max_queue_bytes`.
    pub weights: Vec<u64>,
}

impl TailBlock {
    pub(crate) fn with_capacity(samples: usize) -> Self {
        Self {
            fields: TimeSeriesFields::with_capacity(samples, samples * 200),
            timestamps: Vec::with_capacity(samples),
            weights: Vec::with_capacity(samples),
        }
    }

    pub(crate) fn push(&mut self, labels: &[u8], weight: u64, ts: i64, value: f64) {
        self.fields.push(labels, ts, value);
        self.timestamps.push(ts);
        self.weights.push(weight);
    }

    pub(crate) fn len(&self) -> usize {
        self.timestamps.len()
    }

    fn heap_bytes(&self) -> u64 {
        (self.fields.heap_bytes() + (self.timestamps.capacity() + self.weights.capacity()) * 8)
            as u64
    }
}

#[derive(Default)]
struct Blocks {
    by_id: HashMap<i64, Arc<TailBlock>>,
    /// Staged by the current transaction's enqueue: (block id, block).
    staged: Vec<(i64, Arc<TailBlock>)>,
}

/// The tail of one endpoint's queue.
#[derive(Default)]
pub(crate) struct Tail {
    blocks: Mutex<Blocks>,
    /// What the published blocks hold.
    bytes: AtomicU64,
}

impl Tail {
    fn blocks(&self) -> MutexGuard<'_, Blocks> {
        // Every section restores the tail's invariants before it can panic.
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a new block would fit (checked before building one, so that a full tail
    /// costs the enqueue nothing).
    pub(crate) fn has_room(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) < TAIL_MAX_BYTES
    }

    /// Inside the enqueue's transaction: `block` is the row `id` if the transaction
    /// commits.
    pub(crate) fn stage(&self, id: i64, block: TailBlock) {
        self.blocks().staged.push((id, Arc::new(block)));
    }

    /// Before an enqueue: what an earlier enqueue staged was never published, so its
    /// transaction did not commit.
    pub(crate) fn discard_staged(&self) {
        self.blocks().staged.clear();
    }

    /// After the commit of the transaction the last enqueue ran in: its blocks are rows.
    pub(crate) fn publish(&self) {
        let mut blocks = self.blocks();
        let staged = std::mem::take(&mut blocks.staged);
        for (id, block) in staged {
            let weight = block.heap_bytes();
            if self.bytes.load(Ordering::Relaxed) + weight > TAIL_MAX_BYTES {
                continue;
            }
            self.bytes.fetch_add(weight, Ordering::Relaxed);
            if let Some(old) = blocks.by_id.insert(id, block) {
                // Not expected (rows leave here when deleted); keeps the count exact.
                self.bytes.fetch_sub(old.heap_bytes(), Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn get(&self, id: i64) -> Option<Arc<TailBlock>> {
        self.blocks().by_id.get(&id).cloned()
    }

    /// The row `id` is being deleted (perhaps by the very transaction that staged it:
    /// the byte bound can evict a block as soon as it is queued).
    pub(crate) fn remove(&self, id: i64) {
        let mut blocks = self.blocks();
        blocks.staged.retain(|(staged, _)| *staged != id);
        if let Some(old) = blocks.by_id.remove(&id) {
            self.bytes.fetch_sub(old.heap_bytes(), Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.blocks().by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: usize) -> TailBlock {
        let mut b = TailBlock::with_capacity(n);
        for i in 0..n {
            b.push(b"\x0a\x00", 10, i as i64 + 1, 1.0);
        }
        b
    }

    #[test]
    fn staged_blocks_show_only_once_published() {
        let tail = Tail::default();
        tail.stage(7, block(3));
        assert!(tail.get(7).is_none());
        tail.publish();
        assert_eq!(tail.get(7).unwrap().len(), 3);
        tail.remove(7);
        assert!(tail.get(7).is_none());
        assert_eq!(tail.bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_block_deleted_before_its_commit_is_never_published() {
        let tail = Tail::default();
        tail.stage(7, block(3));
        tail.stage(8, block(3));
        tail.remove(7);
        tail.publish();
        assert!(tail.get(7).is_none());
        assert!(tail.get(8).is_some());
    }

    #[test]
    fn a_transaction_that_did_not_commit_leaves_nothing() {
        let tail = Tail::default();
        tail.stage(7, block(3));
        // The next enqueue: the previous one was never published.
        tail.discard_staged();
        tail.publish();
        assert!(tail.get(7).is_none());
        assert_eq!(tail.len(), 0);
    }

    #[test]
    fn the_tail_is_bounded() {
        let tail = Tail::default();
        let mut id = 0;
        loop {
            id += 1;
            let held = tail.len();
            tail.stage(id, block(2000));
            tail.publish();
            if tail.len() == held {
                break;
            }
            assert!(id < 10_000, "the bound never held");
        }
        assert!(id > 10, "a few blocks fit");
        assert!(
            tail.get(id).is_none(),
            "the block past the bound is not kept"
        );
        assert!(tail.bytes.load(Ordering::Relaxed) <= TAIL_MAX_BYTES);
    }
}
