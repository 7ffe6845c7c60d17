//! The durable queue of one remote-write endpoint, in the aggregator's SQLite database:
//! blocks of samples in order, a dictionary of series labels, a cursor per shard.
//!
//! Split by role, as a disk buffer is into ledger, writer and reader:
//! - [`schema`]: the tables, the conversion of the first format, the report of queues
//!   no endpoint sends any more;
//! - [`labels`]: the enqueue side's cache of series (final labels, id, shard, weight,
//!   last timestamp) and its staging for rollbacks;
//! - [`hints`]: each shard's idea of what waits in its part, for when to read;
//! - [`writer`]: the enqueue, inside the caller's transaction, and the byte bound;
//! - [`reader`]: a shard's batch, read from the tail or the database, and its
//!   settlement;
//! - [`metrics`]: the counters and the self-metrics' families;
//! - `open`: opening an endpoint's queue (restoring the order check, laying the blocks
//!   out again for a new shard count).
//!
//! The remote-write sender uses it through [`Shared`]: `enqueue`/`wake` on the commit
//! path, `read_batch`/`settle`/`release_in_flight` per shard, `snapshot`/`families` for
//! the pages and `/metrics`.
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
//!   [`labels::EPOCH_LENGTH`]; a series' labels are written once per epoch, and an epoch's rows
//!   go once no block of that epoch or an older one is left. So the labels cost a
//!   series once per ten minutes, not once per sample, and nothing keeps a row per
//!   series forever.
//!
//! **Writing**: [`Shared::enqueue`] runs inside the caller's transaction, so a batch of
//! results and the samples it adds to every endpoint commit together or not at all. It
//! never touches the network: per sample it is a hash lookup keyed by the hub's
//! [`Series`](crate::series::Series) (the external labels, the protobuf labels, the shard and the weight are
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
//! **Reading** (the shard tasks in `remote_write::sender`): a shard reads which blocks it holds from
//! its cursor on; a block still in the tail (`remote_write::tail` (the newest ones, kept in memory in request
//! form) is copied from there, any other is read back, its series ids resolved through
//! the dictionary (cached per epoch). After the receiver stored (2xx) or refused for good
//! (4xx) the request, the shard moves its cursor past them in one small transaction,
//! deleting blocks it has finished (and dropping them from the tail). Blocks are per shard
//! and a series always hashes to the same shard, so its samples leave in order.
//!
//! **Bound**: past `max_queue_bytes` the oldest samples (lowest block id, across shards)
//! are dropped inside the enqueue's transaction and counted; those of a request on the
//! wire count as sent if it lands, dropped if it has to be redone.

pub(crate) mod block;
mod hints;
pub(crate) mod labels;
mod metrics;
mod open;
mod reader;
pub(crate) mod schema;
#[cfg(test)]
mod tests;
mod writer;

use hints::ShardHint;
use metrics::Stats;
pub(crate) use reader::Tally;
pub(crate) use schema::report_unconfigured;

use crate::remote_write::config::{ProtobufMessage, QueueConfig};
use crate::remote_write::tail::Tail;
use crate::storage::{Store, StoreError};
use labels::Cache;
use reader::DictCache;
use rusqlite::Transaction;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Blocks fetched per query when reading or evicting.
const BLOCKS_PER_READ: i64 = 8;

/// One shard's part of the queue: what it expects to find, and its wake-up.
pub(crate) struct Shard {
    hint: Mutex<ShardHint>,
    wake: Notify,
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
    shards: Vec<Shard>,
    stats: Mutex<Stats>,
    /// The configured message, and whether 2.0 is still in use (false once the receiver
    /// showed it does not speak it).
    configured: ProtobufMessage,
    v2: AtomicBool,
    /// The newest blocks in request form (see `tail`).
    tail: Tail,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every section below restores its invariants before it can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
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

    /// After the commit of the transaction the last enqueue ran in: its blocks join the
    /// tail, and the shard tasks look at what was queued.
    pub(crate) fn wake(&self) {
        self.tail.publish();
        for shard in &self.shards {
            shard.wake.notify_one();
        }
    }

    /// The configured message (before any fallback).
    pub(crate) fn configured_message(&self) -> ProtobufMessage {
        self.configured
    }
}
