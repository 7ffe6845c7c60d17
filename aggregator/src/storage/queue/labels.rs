//! The enqueue side's memory: each series as this endpoint queues it (its final labels,
//! id, shard, weight and last timestamp), found through the hub's series without hashing
//! in the common case, and what the last enqueue staged, to undo if it rolled back.

use crate::remote_write::config::fnv1a64;
use crate::remote_write::request::{self, LabelsPb};
use crate::series::{Series, SeriesLabels};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// How long an epoch of the label dictionary lasts (see the module docs).
pub(super) const EPOCH_LENGTH: Duration = Duration::from_secs(600);
/// The series cache is pruned of entries nobody else holds once it has this many
/// (or twice as many as after the last pruning).
pub(super) const CACHE_PRUNE_MIN: usize = 65_536;
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

/// One series as this endpoint queues it (its final labels: external labels added).
pub(super) struct Entry {
    /// Names the series in blocks and the dictionary; never given to other labels.
    pub(super) id: u64,
    pub(super) labels: LabelsPb,
    pub(super) weight: u64,
    pub(super) shard: usize,
    pub(super) last_ts: i64,
    /// The epoch whose dictionary holds the labels (written or staged); -1 for none.
    pub(super) dict_epoch: i64,
    /// The enqueue that last staged this entry.
    pub(super) staged_by: u64,
}

/// What the last enqueue changed, to undo if it rolled back: (the entry's index, its
/// id, last_ts before, dict_epoch before). An index reused since is told apart by the id.
pub(super) type Staged = Vec<(u32, u64, i64, i64)>;

/// A slot of the cache's table: the hub's series it was last met as (which keeps the
/// series' address, and so its `queue_slots`, alive), and its entry (`None`: labels no
/// receiver accepts).
pub(super) type Slot = Option<(Series, Option<Entry>)>;

/// A map keyed by a series' final labels, hashed with foldhash: SipHash over ~150 bytes
/// of labels was a tenth of the storage thread's time while new series arrive.
pub(super) type LabelsMap<V> = HashMap<LabelsPb, V, foldhash::fast::RandomState>;

/// Tells the caches of different queues apart in a series' `queue_slots`.
pub(super) static NEXT_TOKEN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// The enqueue side's memory: series → entry, and what the last enqueue staged.
pub(super) struct Cache {
    /// Entries by index; a series finds its index in its own `queue_slots` (one load,
    /// no hashing), or, met under a new `Arc`, through `by_labels`.
    pub(super) slots: Vec<Slot>,
    pub(super) free: Vec<u32>,
    /// This cache's mark in `queue_slots`.
    pub(super) token: u32,
    /// Final labels → the index of their entry. A hub series met again under a new
    /// `Arc` (or two hub series with the same final labels) takes the entry over, so
    /// the order check and the id follow the labels, not the `Arc`.
    pub(super) by_labels: LabelsMap<u32>,
    /// Last timestamps of the series found queued at start.
    pub(super) restored: LabelsMap<i64>,
    pub(super) next_id: u64,
    pub(super) epoch: i64,
    pub(super) epoch_started: Instant,
    /// [`EPOCH_LENGTH`] (tests shorten it).
    pub(super) epoch_length: Duration,
    pub(super) staged: Staged,
    /// `rw_endpoints.enqueues` as the last enqueue left it.
    pub(super) staged_mark: Option<i64>,
    pub(super) generation: u64,
    pub(super) prune_at: usize,
}

impl Cache {
    pub(super) fn new(restored: LabelsMap<i64>, next_id: u64, epoch: i64, now: Instant) -> Self {
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
    pub(super) fn resolve(&mut self, enqueues: i64) {
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
    pub(super) fn index_of(&self, series: &Series) -> Option<u32> {
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
    pub(super) fn mark(&self, series: &Series, index: u32) {
        let v = (u64::from(self.token) << 32) | u64::from(index);
        let slots = &series.queue_slots;
        let at = slots
            .iter()
            .position(|s| (s.load(Ordering::Relaxed) >> 32) as u32 == self.token)
            .or_else(|| slots.iter().position(|s| s.load(Ordering::Relaxed) == 0))
            .unwrap_or(self.token as usize % slots.len());
        slots[at].store(v, Ordering::Relaxed);
    }

    pub(super) fn take_index(&mut self) -> u32 {
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
    pub(super) fn entry(
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

    pub(super) fn insert(
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

    pub(super) fn prune(&mut self) {
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

pub(super) type Invalid = (&'static str, Vec<(String, String)>);

/// The labels a series is queued under: its own, plus the external labels it lacks,
/// names in byte order. Refuses what receivers refuse outright (a missing metric name,
/// an empty or repeated label name), since one such sample would get its whole request
/// rejected.
pub(super) fn final_labels<'a>(
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
}
