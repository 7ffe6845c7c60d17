//! The results waiting for one aggregator's ack.
//!
//! Every result stays here from the moment it is produced until the aggregator says it
//! is durably committed; a reconnect replays everything still here, in sequence order.
//! The buffer is bounded by bytes: when full, the oldest results are dropped (and
//! counted), never the newest, and probing goes on.

use crate::record::ProbeRecord;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use tokio::sync::Notify;

pub struct Buffer {
    inner: Mutex<Inner>,
    max_bytes: usize,
    /// Woken whenever a result is added, so the uplink sends without polling.
    pub added: Notify,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Arc<ProbeRecord>>,
    bytes: usize,
    dropped: u64,
    acked_seq: u64,
}

/// A snapshot of the buffer for metrics and the status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    pub results: usize,
    pub bytes: usize,
    pub dropped: u64,
    pub acked_seq: u64,
}

impl Buffer {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            added: Notify::new(),
        }
    }

    /// Adds a result, dropping the oldest ones while the buffer is over its limit.
    pub fn push(&self, record: Arc<ProbeRecord>) {
        {
            let mut inner = self.lock();
            inner.bytes += record.approx_bytes();
            inner.queue.push_back(record);
            while inner.bytes > self.max_bytes && inner.queue.len() > 1 {
                if let Some(old) = inner.queue.pop_front() {
                    inner.bytes -= old.approx_bytes();
                    inner.dropped += 1;
                }
            }
        }
        self.added.notify_waiters();
    }

    /// Up to `max` results with a sequence number above `after`, oldest first.
    pub fn pending_after(&self, after: u64, max: usize) -> Vec<Arc<ProbeRecord>> {
        let inner = self.lock();
        let start = inner.queue.partition_point(|r| r.seq <= after);
        inner.queue.iter().skip(start).take(max).cloned().collect()
    }

    /// How many buffered results have a sequence number at or below `seq`.
    pub fn count_up_to(&self, seq: u64) -> usize {
        self.lock().queue.partition_point(|r| r.seq <= seq)
    }

    /// Forgets every result up to and including `seq`: the aggregator has committed them.
    pub fn ack(&self, seq: u64) -> usize {
        let mut inner = self.lock();
        let mut removed = 0;
        while inner.queue.front().is_some_and(|r| r.seq <= seq) {
            if let Some(r) = inner.queue.pop_front() {
                inner.bytes -= r.approx_bytes();
                removed += 1;
            }
        }
        inner.acked_seq = inner.acked_seq.max(seq);
        removed
    }

    pub fn stats(&self) -> BufferStats {
        let inner = self.lock();
        BufferStats {
            results: inner.queue.len(),
            bytes: inner.bytes,
            dropped: inner.dropped,
            acked_seq: inner.acked_seq,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the queue half-updated in a way
        // that matters more than losing the agent, so recover the guard.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
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

    #[test]
    fn replays_unacked_in_order() {
        let b = Buffer::new(1 << 20);
        for seq in [3, 5, 9] {
            b.push(record(seq));
        }
        let seqs = |v: Vec<Arc<ProbeRecord>>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(b.pending_after(0, 10)), [3, 5, 9]);
        assert_eq!(seqs(b.pending_after(3, 1)), [5]);
        assert_eq!(b.ack(5), 2);
        assert_eq!(seqs(b.pending_after(0, 10)), [9]);
        assert_eq!(b.stats().acked_seq, 5);
    }

    #[test]
    fn full_buffer_drops_oldest_and_counts() {
        let one = record(1).approx_bytes();
        let b = Buffer::new((one * 3) as u64);
        for seq in 1..=10 {
            b.push(record(seq));
        }
        let stats = b.stats();
        assert_eq!(stats.results, 3);
        assert_eq!(stats.dropped, 7);
        assert_eq!(b.pending_after(0, 10)[0].seq, 8, "the newest are kept");
    }
}
