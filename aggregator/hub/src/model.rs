//! The types the fleet decoder and the hub share: a result as the fleet service decoded
//! it, its samples split into a shared shape and their values, the stream's symbols, a
//! target's key, and the staleness marker. Neither side owns them, so neither imports the
//! other.

use crate::refusals::Reason;
use sonde_proto::trace::Trace;
use std::sync::Arc;

/// The value Prometheus writes as a staleness marker: a NaN with this exact bit pattern.
/// PromQL tells it from an ordinary NaN by the bits, so they must survive encoding.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// A staleness marker's value.
pub fn stale_nan() -> f64 {
    f64::from_bits(STALE_NAN_BITS)
}

/// (job, instance).
pub type TargetKey = (String, String);

/// A probe sample: metric name, labels, value; the strings are the stream's symbols.
pub type ProbeSample = (Symbol, Vec<(Symbol, Symbol)>, f64);

/// One probe result as the fleet service decoded it.
#[derive(Clone, Debug, PartialEq)]
pub struct IncomingResult {
    pub seq: u64,
    pub job: String,
    pub instance: String,
    pub timestamp_ms: i64,
    pub success: bool,
    pub duration_seconds: f64,
    pub failure: String,
    /// What the agent saw, on a failure (already bounded and checked).
    pub trace: Option<Arc<Trace>>,
    pub samples: ResultSamples,
    /// Set when the result was refused while decoding: its sequence number is
    /// acknowledged, nothing else of it is kept.
    pub refused: Option<Reason>,
}

/// An interned string, shared by every sample that refers to it.
pub type Symbol = Arc<str>;

/// What a sample's name and labels weigh against `fleet.limits.max_series_bytes`.
pub fn sample_weight(name: &str, labels: &[(Symbol, Symbol)]) -> usize {
    name.len() + labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

/// A sample's name and labels.
pub type NameAndLabels = (Symbol, Vec<(Symbol, Symbol)>);
/// A sample of a [`ResultSamples`]: name, labels, value.
pub type SampleRef<'a> = (&'a Symbol, &'a [(Symbol, Symbol)], f64);

/// A result's kept samples without their values: names and labels, as the stream's
/// symbols, and what the checks refused of it. Shared by every result of one stream
/// whose samples name the same symbols in the same order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shape {
    /// (name, labels) of each kept sample, in the result's order.
    pub samples: Vec<NameAndLabels>,
    /// The index among the result's samples of each kept one; `None`: all are kept.
    pub kept: Option<Vec<u32>>,
    /// Samples refused by the checks, by reason: (reason, how many, one example).
    pub refused: Vec<(Reason, u64, String)>,
    /// What the kept samples' names and labels weigh (`fleet.limits.max_series_bytes`).
    pub bytes: usize,
}

/// A result's samples: their shape and their values (one per kept sample, same order).
#[derive(Clone, Debug, PartialEq)]
pub struct ResultSamples {
    pub shape: Arc<Shape>,
    pub values: Vec<f64>,
}

impl Default for ResultSamples {
    fn default() -> Self {
        Self {
            shape: Arc::new(Shape::default()),
            values: Vec::new(),
        }
    }
}

impl ResultSamples {
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// (name, labels, value) of each sample.
    pub fn iter(&self) -> impl Iterator<Item = SampleRef<'_>> {
        self.shape
            .samples
            .iter()
            .zip(&self.values)
            .map(|((name, labels), v)| (name, labels.as_slice(), *v))
    }

    /// Adds a sample (tests, and producers other than the fleet service); the shape is
    /// this result's own from then on.
    pub fn push(&mut self, (name, labels, value): ProbeSample) {
        let shape = Arc::make_mut(&mut self.shape);
        shape.bytes += sample_weight(&name, &labels);
        shape.samples.push((name, labels));
        self.values.push(value);
    }
}

impl From<Vec<ProbeSample>> for ResultSamples {
    fn from(samples: Vec<ProbeSample>) -> Self {
        let mut out = Self::default();
        for s in samples {
            out.push(s);
        }
        out
    }
}
