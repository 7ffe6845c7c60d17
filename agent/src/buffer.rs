//! The results waiting for one aggregator's ack.
//!
//! Every result stays here from the moment it is produced until the aggregator says it
//! is durably committed; a reconnect, or a restart of the agent, replays everything
//! still here, in sequence order. A `Buffer` is one aggregator's view of the agent's
//! [`Store`], which keeps the results on disk and bounds them by bytes: when full, the
//! oldest results are dropped (and counted), never the newest, and probing goes on.

use crate::record::ProbeRecord;
use crate::store::{Route, Store};
use std::sync::Arc;
use tokio::sync::Notify;

pub struct Buffer {
    store: Arc<Store>,
    /// This aggregator's position in the config.
    slot: usize,
    /// Woken whenever results become available (committed), so the uplink sends
    /// without polling.
    pub added: Arc<Notify>,
}

/// A snapshot of the buffer for metrics and the status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    pub results: usize,
    /// What the results take on disk.
    pub bytes: usize,
    pub dropped: u64,
    pub acked_seq: u64,
}

impl Buffer {
    pub(crate) fn new(store: Arc<Store>, slot: usize, added: Arc<Notify>) -> Self {
        Self { store, slot, added }
    }

    /// Adds a result for this aggregator only. Its sequence number must be above every
    /// number used before (the outbox numbers results; see [`Store::append`]). It can
    /// be sent once it is committed, which wakes `added`.
    pub fn push(&self, record: Arc<ProbeRecord>) {
        self.store.push_numbered(record, Route::One(self.slot));
    }

    /// Up to `max` results with a sequence number above `after`, oldest first. Only
    /// committed results: whatever is sent survives a crash of the agent.
    pub fn pending_after(&self, after: u64, max: usize) -> Vec<Arc<ProbeRecord>> {
        self.store.pending_after(self.slot, after, max)
    }

    /// How many buffered results have a sequence number at or below `seq`.
    pub fn count_up_to(&self, seq: u64) -> usize {
        self.store.count_up_to(self.slot, seq)
    }

    /// Forgets every result up to and including `seq`: the aggregator has committed
    /// them. Returns how many were forgotten.
    pub fn ack(&self, seq: u64) -> usize {
        self.store.ack(self.slot, seq)
    }

    pub fn stats(&self) -> BufferStats {
        self.store.stats(self.slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> Arc<ProbeRecord> {
        Arc::new(ProbeRecord {
            seq,
            job: "j".into(),
            instance: "i".into(),
            timestamp_ms: seq as i64,
            success: true,
            duration_seconds: 0.1,
            samples: Vec::new(),
            generation: 1,
            failure: None,
        })
    }

    fn seqs(v: Vec<Arc<ProbeRecord>>) -> Vec<u64> {
        v.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn replays_unacked_in_order() {
        let store = Store::open(None, &["http://a:1".into()], 1 << 20).unwrap();
        let b = store.buffers().remove(0).1;
        for seq in [3, 5, 9] {
            b.push(record(seq));
        }
        store.flush();
        assert_eq!(seqs(b.pending_after(0, 10)), [3, 5, 9]);
        assert_eq!(seqs(b.pending_after(3, 1)), [5]);
        assert_eq!(b.ack(5), 2);
        assert_eq!(seqs(b.pending_after(0, 10)), [9]);
        assert_eq!(b.stats().acked_seq, 5);
        assert_eq!(
            store.next_seq(),
            10,
            "numbering goes on above pushed results"
        );
        b.push(record(4));
        store.flush();
        assert_eq!(
            seqs(b.pending_after(5, 10)),
            [9, 10],
            "a result numbered out of order is renumbered, not lost"
        );
    }

    #[test]
    fn full_buffer_drops_oldest_and_counts() {
        let one = {
            let s = Store::open(None, &["http://a:1".into()], 1 << 20).unwrap();
            let b = s.buffers().remove(0).1;
            b.push(record(1));
            s.flush();
            b.stats().bytes
        };
        let store = Store::open(None, &["http://a:1".into()], (one * 3) as u64).unwrap();
        let b = store.buffers().remove(0).1;
        for seq in 1..=10 {
            b.push(record(seq));
            // Committed one by one, as results trickle in from probes.
            store.flush();
        }
        let stats = b.stats();
        assert_eq!(stats.results, 3);
        assert_eq!(stats.dropped, 7);
        assert_eq!(b.pending_after(0, 10)[0].seq, 8, "the newest are kept");
    }

    #[tokio::test]
    async fn added_wakes_once_a_result_is_committed() {
        let store = Store::open(None, &["http://a:1".into()], 1 << 20).unwrap();
        let b = store.buffers().remove(0).1;
        let added = b.added.notified();
        b.push(record(1));
        tokio::time::timeout(std::time::Duration::from_secs(5), added)
            .await
            .expect("woken");
        assert_eq!(seqs(b.pending_after(0, 10)), [1]);
    }
}
