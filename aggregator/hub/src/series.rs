//! A series the aggregator writes: its label set, built once and shared by every sample
//! of that series, and the samples themselves.
//!
//! The hub keeps each series it writes as a [`Series`] (an `Arc`), so a sample costs a
//! pointer, a timestamp and a value, however many labels its series has; the label
//! strings themselves are `Arc<str>` shared with the fleet's symbol tables and the
//! config. Outputs (the remote-write queues, `/metrics`) read the labels from here.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// A label: name and value.
pub type Label = (Arc<str>, Arc<str>);

/// A series' labels, `__name__` included: names unique, sorted in byte order (the
/// order remote write requires), no empty values (an empty label is no label).
#[derive(Debug)]
pub struct SeriesLabels {
    labels: Box<[Label]>,
    hash: u64,
    /// Where up to two remote-write queues keep this series (`queue::Cache`): a queue's
    /// token in the high half, its entry's index in the low half; 0 for none. Saves the
    /// queue a hash lookup per sample; a queue that finds another's token here looks
    /// the series up by its labels instead.
    /// Only the remote-write queues touch it.
    pub queue_slots: [AtomicU64; 2],
}

impl PartialEq for SeriesLabels {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.labels == other.labels
    }
}

impl Eq for SeriesLabels {}

/// A shared series; its address is stable for as long as someone holds it.
pub type Series = Arc<SeriesLabels>;

impl SeriesLabels {
    /// Normalises `labels`: empty values dropped, sorted by name; of two labels with
    /// the same name the first given wins.
    pub fn new(mut labels: Vec<Label>) -> Self {
        labels.retain(|(_, v)| !v.is_empty());
        // Stable: among equal names the first given stays first, and dedup keeps it.
        labels.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        labels.dedup_by(|later, first| later.0 == first.0);
        let hash = hash_labels(&labels);
        Self {
            labels: labels.into_boxed_slice(),
            hash,
            queue_slots: Default::default(),
        }
    }

    /// From string pairs (tests, and producers outside the hub).
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Self {
        Self::new(
            pairs
                .iter()
                .map(|(k, v)| (Arc::from(k.as_ref()), Arc::from(v.as_ref())))
                .collect(),
        )
    }

    pub fn labels(&self) -> &[Label] {
        &self.labels
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.labels
            .binary_search_by(|(k, _)| k.as_bytes().cmp(name.as_bytes()))
            .ok()
            .map(|i| &*self.labels[i].1)
    }

    /// The metric name (`__name__`), empty when there is none.
    pub fn name(&self) -> &str {
        self.get("__name__").unwrap_or("")
    }

    /// A hash of the labels, the same in every process of the same build (used to
    /// spread series over remote-write shards).
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The labels as owned string pairs.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        self.labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// What the names and values weigh, in bytes.
    pub fn bytes(&self) -> usize {
        self.labels.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

impl Hash for SeriesLabels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// FNV-1a over names and values with separators: stable, cheap, good enough to spread
/// series (not a defence against chosen collisions; nothing keys a map on it alone).
fn hash_labels(labels: &[Label]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (k, v) in labels {
        eat(k.as_bytes());
        eat(&[0xff]);
        eat(v.as_bytes());
        eat(&[0xfe]);
    }
    h
}

/// One sample of a series.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub series: Series,
    pub timestamp_ms: i64,
    pub value: f64,
}

impl Sample {
    /// A sample of a series given as string pairs (tests, producers outside the hub).
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(
        pairs: &[(K, V)],
        timestamp_ms: i64,
        value: f64,
    ) -> Self {
        Self {
            series: Arc::new(SeriesLabels::from_pairs(pairs)),
            timestamp_ms,
            value,
        }
    }
}

/// The samples of one probe result as the hub keeps them: one timestamp, the result's
/// series (shared with the agent's latest view, so a result costs two reference counts,
/// not one per sample) and a value for each.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRow {
    pub series: Arc<[Series]>,
    pub timestamp_ms: i64,
    pub values: Arc<[f64]>,
}

/// Samples on their way to the outputs: single ones (merged and periodic series,
/// staleness markers) and whole results.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples {
    pub single: Vec<Sample>,
    pub rows: Vec<SampleRow>,
    /// Samples in `rows`.
    in_rows: usize,
}

impl Samples {
    pub fn push(&mut self, sample: Sample) {
        self.single.push(sample);
    }

    pub fn push_row(&mut self, row: SampleRow) {
        self.in_rows += row.series.len().min(row.values.len());
        self.rows.push(row);
    }

    pub fn len(&self) -> usize {
        self.single.len() + self.in_rows
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every sample as (series, timestamp, value): the single ones first, then the rows.
    pub fn iter(&self) -> impl Iterator<Item = (&Series, i64, f64)> {
        self.single
            .iter()
            .map(|s| (&s.series, s.timestamp_ms, s.value))
            .chain(self.rows.iter().flat_map(|r| {
                r.series
                    .iter()
                    .zip(r.values.iter())
                    .map(move |(s, v)| (s, r.timestamp_ms, *v))
            }))
    }

    /// Every sample as an owned [`Sample`] (tests, and outputs that keep them).
    pub fn to_vec(&self) -> Vec<Sample> {
        self.iter()
            .map(|(series, timestamp_ms, value)| Sample {
                series: series.clone(),
                timestamp_ms,
                value,
            })
            .collect()
    }
}

/// What an output can take samples from: a slice of [`Sample`]s or [`Samples`].
pub trait SampleSource {
    fn sample_count(&self) -> usize;
    fn each(&self) -> impl Iterator<Item = (&Series, i64, f64)>;
}

impl SampleSource for [Sample] {
    fn sample_count(&self) -> usize {
        self.len()
    }
    fn each(&self) -> impl Iterator<Item = (&Series, i64, f64)> {
        self.iter().map(|s| (&s.series, s.timestamp_ms, s.value))
    }
}

impl SampleSource for Vec<Sample> {
    fn sample_count(&self) -> usize {
        self.len()
    }
    fn each(&self) -> impl Iterator<Item = (&Series, i64, f64)> {
        self.as_slice().each()
    }
}

impl<const N: usize> SampleSource for [Sample; N] {
    fn sample_count(&self) -> usize {
        N
    }
    fn each(&self) -> impl Iterator<Item = (&Series, i64, f64)> {
        self.as_slice().each()
    }
}

impl SampleSource for Samples {
    fn sample_count(&self) -> usize {
        self.len()
    }
    fn each(&self) -> impl Iterator<Item = (&Series, i64, f64)> {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_sorted_deduplicated_and_without_empty_values() {
        let s = SeriesLabels::from_pairs(&[
            ("job", "a"),
            ("__name__", "up"),
            ("Zone", "z"),
            ("empty", ""),
            ("job", "b"),
        ]);
        let names: Vec<&str> = s.labels().iter().map(|(k, _)| &**k).collect();
        assert_eq!(names, ["Zone", "__name__", "job"]);
        assert_eq!(s.get("job"), Some("a"));
        assert_eq!(s.name(), "up");
        assert_eq!(s.get("empty"), None);
    }

    #[test]
    fn equal_label_sets_hash_alike() {
        let a = SeriesLabels::from_pairs(&[("a", "1"), ("b", "2")]);
        let b = SeriesLabels::from_pairs(&[("b", "2"), ("a", "1")]);
        let c = SeriesLabels::from_pairs(&[("a", "12"), ("b", "")]);
        assert_eq!(a, b);
        assert_eq!(a.hash(), b.hash());
        assert_ne!(a.hash(), c.hash());
    }
}
