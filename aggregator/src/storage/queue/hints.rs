//! Each shard's idea of how much waits in its part of the queue, and since when.

use super::{Shared, lock};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

/// Arrival records kept per shard (for batch_send_deadline); past it the newest merge.
pub(super) const ARRIVALS_KEPT: usize = 256;
/// A shard's idea of how much waits in its part of the queue, and since when. Only a
/// hint for when to read (batch full, or its oldest sample's batch_send_deadline passed):
/// every read corrects it.
#[derive(Default)]
pub(crate) struct ShardHint {
    /// (samples, when they were queued), oldest first.
    pub(crate) arrivals: VecDeque<(u64, Instant)>,
    /// The request on the wire: from (block, sample) up to (block, sample), exclusive.
    pub(super) in_flight: Option<((i64, u32), (i64, u32))>,
    /// Samples of the request on the wire that the byte bound removed meanwhile: sent if
    /// the request lands, dropped (queue_full) if it has to be redone.
    pub(super) evicted_in_flight: u64,
    /// The dictionary epoch of the shard's last read.
    pub(super) epoch: Option<i64>,
}

impl ShardHint {
    pub(crate) fn pending(&self) -> u64 {
        self.arrivals.iter().map(|(n, _)| n).sum()
    }

    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.arrivals.front().map(|(_, t)| *t)
    }

    pub(super) fn add(&mut self, n: u64, at: Instant) {
        if self.arrivals.len() >= ARRIVALS_KEPT
            && let Some(last) = self.arrivals.back_mut()
        {
            last.0 += n;
            return;
        }
        self.arrivals.push_back((n, at));
    }

    /// Takes `n` samples off the front (sent, dropped or evicted).
    pub(super) fn consume(&mut self, mut n: u64) {
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
    pub(super) fn resync(&mut self, n: u64, now: Instant) {
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
    pub(super) fn in_flight_among(&self, id: i64, from: u32, to: u32) -> u64 {
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

impl Shared {
    /// When `shard` should read next: `None` for now (a batch is full, its oldest
    /// sample's `batch_send_deadline` has passed, or `stopping`), else the time its
    /// oldest sample is due (an hour when it holds none).
    pub(crate) fn next_read(&self, shard: usize, now: Instant, stopping: bool) -> Option<Instant> {
        let hint = lock(&self.shards[shard].hint);
        let pending = hint.pending();
        let due = hint.oldest().map(|t| t + self.queue.batch_send_deadline.0);
        let max = self.queue.max_samples_per_send as u64;
        if stopping || pending >= max || (pending > 0 && due.is_none_or(|d| now >= d)) {
            None
        } else {
            Some(due.unwrap_or(now + Duration::from_secs(3600)))
        }
    }

    /// A read found `shard` empty: what arrived up to `read_at` was all read.
    pub(crate) fn read_all_until(&self, shard: usize, read_at: Instant) {
        lock(&self.shards[shard].hint)
            .arrivals
            .retain(|(_, at)| *at > read_at);
    }

    /// Completes when an enqueue added to the queue (see [`Shared::wake`]).
    pub(crate) fn woken(&self, shard: usize) -> Notified<'_> {
        self.shards[shard].wake.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
