//! An agent's `ResultBatch` turned into results: the stream's symbol table, and every
//! check that needs nothing but the batch itself (sizes, names, labels). What needs the
//! aggregator's state (assignment, committed sequence, clock, target labels) is checked
//! by the hub.
//!
//! Two kinds of bad input: a batch that breaks the protocol (a symbol that was never
//! defined, sequence numbers out of order, too many results) ends the stream, since
//! nothing after it can be trusted to mean what it says; a result or sample that breaks
//! a rule is refused alone and counted, and the rest of the batch goes on (an honest
//! agent must never be stuck replaying a batch it cannot change).
//!
//! A result's samples are split into their [`Shape`] (names and labels) and their
//! values. Results of one kind (one module's probes, whatever the target) name the same
//! symbols in the same order, so a stream decodes and checks each shape once and every
//! later result of that kind shares it: per result, one hash of its symbol ids instead
//! of per-sample checks and reference counts, and the hub can tell by one pointer
//! comparison that a view's series are unchanged.

use crate::config::FleetLimits;
use crate::refusals::Reason;
pub use sonde_hub::model::{
    IncomingResult, NameAndLabels, ResultSamples, SampleRef, Shape, Symbol, sample_weight,
};
use sonde_proto::config::is_valid_label_name;
use sonde_proto::pb;
use sonde_proto::trace::Trace;
use std::collections::HashMap;
use std::sync::Arc;

/// Sequence numbers are stored as SQLite integers (i64): 2^63 and above cannot be.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// Bytes a symbol costs beyond its text: the `Arc` header and its slot in the table.
const SYMBOL_OVERHEAD: usize = 40;
/// Shapes a stream keeps (an agent sends a few: one per module and outcome); past it,
/// or past [`MAX_SHAPE_KEYS`] ids, the cache starts again. A hostile agent that sends a
/// new shape with every result only makes its own results slower to decode.
const MAX_SHAPES: usize = 1024;
const MAX_SHAPE_KEYS: usize = 1 << 18;

/// One stream's strings, in the order the agent defined them, and the shapes of its
/// results so far.
#[derive(Default)]
pub struct SymbolTable {
    /// `None`: the agent sent a string over `max_symbol_bytes`; samples that refer to
    /// it are refused.
    symbols: Vec<Option<Symbol>>,
    bytes: usize,
    /// Shapes by the symbol ids of their samples, as they came (see [`shape_key`]).
    shapes: HashMap<Box<[u32]>, Arc<Shape>, foldhash::fast::RandomState>,
    shape_keys: usize,
}

impl SymbolTable {
    /// What the table holds, overhead included (bounded by `max_symbol_table_bytes`).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn extend(&mut self, new: Vec<String>, limits: &FleetLimits) -> Result<(), ProtocolError> {
        let table_limit = limits.max_symbol_table_bytes.0 as usize;
        let symbol_limit = limits.max_symbol_bytes.0 as usize;
        for s in new {
            let kept = s.len() <= symbol_limit;
            let cost = SYMBOL_OVERHEAD + if kept { s.len() } else { 0 };
            if self.bytes + cost > table_limit {
                return Err(ProtocolError::SymbolTableFull {
                    bytes: self.bytes,
                    limit: table_limit,
                });
            }
            self.bytes += cost;
            self.symbols.push(kept.then(|| Symbol::from(s)));
        }
        Ok(())
    }

    fn get(&self, i: u32) -> Result<Option<&Symbol>, ProtocolError> {
        match self.symbols.get(i as usize) {
            Some(s) => Ok(s.as_ref()),
            None => Err(ProtocolError::UndefinedSymbol {
                symbol: i,
                defined: self.symbols.len(),
            }),
        }
    }
}

/// A decoded batch: its results (refused ones included, so that their sequence
/// numbers are acked), and the samples refused on the way, by reason.
#[derive(Debug, Default)]
pub struct Decoded {
    pub results: Vec<IncomingResult>,
    /// (reason, how many, one example).
    pub refused_samples: Vec<(Reason, u64, String)>,
}

impl Decoded {
    /// A result's trace, bounded and checked (`sonde_proto::trace`); a bad one is
    /// refused alone and counted, and its result goes on without it.
    fn trace(&mut self, t: pb::FailureTrace) -> Option<Arc<Trace>> {
        match Trace::from_pb(t) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                self.refuse(Reason::BadTrace, || e.to_string());
                None
            }
        }
    }

    fn refuse(&mut self, reason: Reason, example: impl FnOnce() -> String) {
        self.refuse_n(reason, 1, example);
    }

    fn refuse_n(&mut self, reason: Reason, n: u64, example: impl FnOnce() -> String) {
        match self.refused_samples.iter_mut().find(|(r, ..)| *r == reason) {
            Some((_, count, _)) => *count += n,
            None => self.refused_samples.push((reason, n, example())),
        }
    }
}

/// The key a result's shape is cached under: per sample, its name's id, its label count,
/// then its label ids (the count keeps `a{x=y}` `b` apart from `a` `b{x=y}`).
fn shape_key(samples: &[pb::Sample], out: &mut Vec<u32>) {
    out.clear();
    for s in samples {
        out.push(s.name);
        out.push(s.labels.len() as u32);
        out.extend_from_slice(&s.labels);
    }
}

/// Decodes and checks the names and labels of `samples`, a result's.
fn decode_shape(
    symbols: &SymbolTable,
    samples: &[pb::Sample],
    limits: &FleetLimits,
) -> Result<Shape, ProtocolError> {
    let mut refusals = Decoded::default();
    let mut shape = Shape::default();
    let mut kept = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        if let Some((name, labels)) = decode_sample(symbols, s, limits, &mut refusals)? {
            shape.bytes += sample_weight(&name, &labels);
            shape.samples.push((name, labels));
            kept.push(i as u32);
        }
    }
    if kept.len() < samples.len() {
        shape.kept = Some(kept);
    }
    shape.refused = refusals.refused_samples;
    Ok(shape)
}

/// A batch that breaks the protocol: nothing after it can be trusted to mean what it
/// says, so the stream ends (the agent reconnects and starts a new symbol table).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{results} results in one batch; fleet.limits.max_results_per_batch is {limit}")]
    TooManyResults { results: usize, limit: usize },
    #[error("{samples} samples in one batch; fleet.limits.max_samples_per_batch is {limit}")]
    TooManySamples { samples: usize, limit: usize },
    #[error(
        "the stream's symbol table is full ({bytes} bytes, fleet.limits.max_symbol_table_bytes {limit}); open a new stream to start a new table"
    )]
    SymbolTableFull { bytes: usize, limit: usize },
    #[error("symbol {symbol} is not defined (the table has {defined})")]
    UndefinedSymbol { symbol: u32, defined: usize },
    #[error("sample labels must come in name/value pairs")]
    OddLabels,
    #[error("sequence numbers must increase within a batch ({seq} after {after})")]
    SequenceOrder { seq: u64, after: u64 },
    #[error("sequence number {seq} is past 2^63-1, the largest the aggregator stores")]
    SequenceTooLarge { seq: u64 },
}

/// Label names a sample may not carry whatever the target: the aggregator sets them.
pub fn is_reserved_label(name: &str) -> bool {
    matches!(name, "job" | "instance" | "agent") || name.starts_with("__")
}

/// Decodes `batch` against the stream's `symbols`. `Err` is a protocol error: the
/// stream must end.
pub fn decode_batch(
    symbols: &mut SymbolTable,
    batch: pb::ResultBatch,
    limits: &FleetLimits,
) -> Result<Decoded, ProtocolError> {
    if batch.results.len() > limits.max_results_per_batch {
        return Err(ProtocolError::TooManyResults {
            results: batch.results.len(),
            limit: limits.max_results_per_batch,
        });
    }
    let samples: usize = batch.results.iter().map(|r| r.samples.len()).sum();
    if samples > limits.max_samples_per_batch {
        return Err(ProtocolError::TooManySamples {
            samples,
            limit: limits.max_samples_per_batch,
        });
    }
    symbols.extend(batch.new_symbols, limits)?;
    let mut decoded = Decoded {
        results: Vec::with_capacity(batch.results.len()),
        refused_samples: Vec::new(),
    };
    let mut last_seq = 0;
    let mut key = Vec::new();
    for r in batch.results {
        if r.seq <= last_seq {
            return Err(ProtocolError::SequenceOrder {
                seq: r.seq,
                after: last_seq,
            });
        }
        if r.seq > MAX_SEQ {
            return Err(ProtocolError::SequenceTooLarge { seq: r.seq });
        }
        last_seq = r.seq;
        let mut refused = None;
        let mut samples = ResultSamples::default();
        if r.samples.len() > limits.max_samples_per_result {
            refused = Some(Reason::TooManySamples);
        } else if !r.samples.is_empty() {
            shape_key(&r.samples, &mut key);
            let shape = match symbols.shapes.get(&key[..]) {
                Some(shape) => shape.clone(),
                None => {
                    let shape = Arc::new(decode_shape(symbols, &r.samples, limits)?);
                    if symbols.shapes.len() >= MAX_SHAPES
                        || symbols.shape_keys + key.len() > MAX_SHAPE_KEYS
                    {
                        symbols.shapes.clear();
                        symbols.shape_keys = 0;
                    }
                    symbols.shape_keys += key.len();
                    symbols.shapes.insert(key.as_slice().into(), shape.clone());
                    shape
                }
            };
            for (reason, n, example) in &shape.refused {
                decoded.refuse_n(*reason, *n, || example.clone());
            }
            let values = match &shape.kept {
                None => r.samples.iter().map(|s| s.value).collect(),
                Some(kept) => kept.iter().map(|&i| r.samples[i as usize].value).collect(),
            };
            samples = ResultSamples { shape, values };
        }
        let trace = r.trace.and_then(|t| decoded.trace(t));
        decoded.results.push(IncomingResult {
            seq: r.seq,
            job: r.job,
            instance: r.instance,
            timestamp_ms: r.timestamp_ms,
            success: r.success,
            duration_seconds: r.duration_seconds,
            failure: r.failure,
            trace,
            samples,
            refused,
        });
    }
    Ok(decoded)
}

/// One sample's name and labels; `Ok(None)` when it is refused (and counted in
/// `decoded`).
fn decode_sample(
    symbols: &SymbolTable,
    s: &pb::Sample,
    limits: &FleetLimits,
    decoded: &mut Decoded,
) -> Result<Option<NameAndLabels>, ProtocolError> {
    // References are resolved first: one past the table is a protocol error even on a
    // sample that would be refused anyway.
    let name = symbols.get(s.name)?;
    if !s.labels.len().is_multiple_of(2) {
        return Err(ProtocolError::OddLabels);
    }
    let mut labels = Vec::with_capacity(s.labels.len() / 2);
    let mut too_long = name.is_none();
    for pair in s.labels.chunks_exact(2) {
        match (symbols.get(pair[0])?, symbols.get(pair[1])?) {
            (Some(k), Some(v)) => labels.push((k.clone(), v.clone())),
            _ => too_long = true,
        }
    }
    if too_long {
        decoded.refuse(Reason::SymbolTooLong, || {
            format!(
                "a string longer than fleet.limits.max_symbol_bytes ({})",
                limits.max_symbol_bytes
            )
        });
        return Ok(None);
    }
    let Some(name) = name else { return Ok(None) };
    if !sonde_proto::help::is_probe_metric(name) {
        decoded.refuse(Reason::UnknownMetric, || {
            format!(
                "metric {:?} is not one the probers produce",
                crate::refusals::loggable(name)
            )
        });
        return Ok(None);
    }
    let label_bytes: usize = labels.iter().map(|(k, v)| k.len() + v.len()).sum();
    if labels.len() > limits.max_labels_per_sample
        || label_bytes > limits.max_sample_label_bytes.0 as usize
    {
        decoded.refuse(Reason::TooManyLabels, || {
            format!(
                "{name} with {} labels of {label_bytes} bytes; fleet.limits.max_labels_per_sample is {}, max_sample_label_bytes {}",
                labels.len(),
                limits.max_labels_per_sample,
                limits.max_sample_label_bytes
            )
        });
        return Ok(None);
    }
    for (i, (k, _)) in labels.iter().enumerate() {
        if !is_valid_label_name(k) || is_reserved_label(k) {
            decoded.refuse(Reason::ReservedLabel, || {
                format!(
                    "{name} with label {:?}, which the aggregator sets itself or is not a label name",
                    crate::refusals::loggable(k)
                )
            });
            return Ok(None);
        }
        if labels[..i].iter().any(|(other, _)| other == k) {
            decoded.refuse(Reason::DuplicateLabel, || {
                format!("{name} with label {k:?} twice")
            });
            return Ok(None);
        }
    }
    Ok(Some((name.clone(), labels)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_proto::config::ByteSize;

    fn result(seq: u64, samples: Vec<pb::Sample>) -> pb::ProbeResult {
        pb::ProbeResult {
            seq,
            job: "j".into(),
            instance: "i".into(),
            timestamp_ms: 1,
            success: true,
            duration_seconds: 0.1,
            samples,
            generation: 1,
            failure: String::new(),
            trace: None,
        }
    }

    fn sample(name: u32, labels: Vec<u32>) -> pb::Sample {
        pb::Sample {
            name,
            labels,
            value: 1.0,
        }
    }

    fn batch(symbols: &[&str], results: Vec<pb::ProbeResult>) -> pb::ResultBatch {
        pb::ResultBatch {
            new_symbols: symbols.iter().map(|s| s.to_string()).collect(),
            results,
        }
    }

    #[test]
    fn symbols_resolve_across_batches_and_are_shared() {
        let limits = FleetLimits::default();
        let mut table = SymbolTable::default();
        let first = batch(
            &["probe_success", "phase", "connect"],
            vec![result(1, vec![sample(0, vec![])])],
        );
        decode_batch(&mut table, first, &limits).unwrap();
        let second = batch(
            &["probe_http_duration_seconds"],
            vec![result(
                2,
                vec![sample(3, vec![1, 2]), sample(3, vec![1, 2])],
            )],
        );
        let d = decode_batch(&mut table, second, &limits).unwrap();
        let samples = &d.results[0].samples.shape.samples;
        assert_eq!(&*samples[0].0, "probe_http_duration_seconds");
        assert_eq!(&*samples[0].1[0].0, "phase");
        assert!(
            Arc::ptr_eq(&samples[0].1[0].1, &samples[1].1[0].1),
            "a reference shares the table's string, never copies it"
        );
    }

    #[test]
    fn results_of_one_kind_share_a_shape_and_keep_their_values_and_refusals() {
        let limits = FleetLimits::default();
        let mut table = SymbolTable::default();
        let with = |seq, value: f64, name| {
            let mut r = result(seq, vec![sample(0, vec![1, 2]), sample(name, vec![])]);
            r.samples[0].value = value;
            r.samples[1].value = value * 2.0;
            r
        };
        let symbols = ["probe_success", "phase", "connect", "up"];
        let d = decode_batch(
            &mut table,
            batch(
                &symbols,
                vec![with(1, 1.0, 0), with(2, 3.0, 0), with(3, 5.0, 3)],
            ),
            &limits,
        )
        .unwrap();
        let [a, b, c] = &d.results[..] else {
            panic!("three results")
        };
        assert!(Arc::ptr_eq(&a.samples.shape, &b.samples.shape));
        assert_eq!(a.samples.values, [1.0, 2.0]);
        assert_eq!(b.samples.values, [3.0, 6.0]);
        // `up` is not a probe metric: refused, and counted again for each result of
        // that shape; the kept sample keeps its own value.
        assert!(!Arc::ptr_eq(&a.samples.shape, &c.samples.shape));
        assert_eq!(c.samples.values, [5.0]);
        let again = decode_batch(&mut table, batch(&[], vec![with(4, 7.0, 3)]), &limits).unwrap();
        assert!(Arc::ptr_eq(
            &again.results[0].samples.shape,
            &c.samples.shape
        ));
        assert_eq!(again.results[0].samples.values, [7.0]);
        assert_eq!(again.refused_samples[0].0, Reason::UnknownMetric);
        assert_eq!(again.refused_samples[0].1, 1);
        // A label moved to another sample is another shape.
        let moved = result(5, vec![sample(0, vec![]), sample(0, vec![1, 2])]);
        let d = decode_batch(&mut table, batch(&[], vec![moved]), &limits).unwrap();
        assert!(!Arc::ptr_eq(&d.results[0].samples.shape, &a.samples.shape));
    }

    #[test]
    fn protocol_errors_end_the_stream() {
        let limits = FleetLimits::default();
        let bad_ref = batch(&[], vec![result(1, vec![sample(7, vec![])])]);
        assert!(decode_batch(&mut SymbolTable::default(), bad_ref, &limits).is_err());
        let odd = batch(
            &["probe_success"],
            vec![result(1, vec![sample(0, vec![0])])],
        );
        assert!(decode_batch(&mut SymbolTable::default(), odd, &limits).is_err());
        let order = batch(&[], vec![result(5, vec![]), result(5, vec![])]);
        assert!(decode_batch(&mut SymbolTable::default(), order, &limits).is_err());
        let huge_seq = batch(&[], vec![result(1 << 63, vec![])]);
        assert!(decode_batch(&mut SymbolTable::default(), huge_seq, &limits).is_err());
        let many = batch(
            &[],
            (1..=limits.max_results_per_batch as u64 + 1)
                .map(|s| result(s, vec![]))
                .collect(),
        );
        assert!(decode_batch(&mut SymbolTable::default(), many, &limits).is_err());
        let per_result = limits.max_samples_per_result;
        let results = limits.max_samples_per_batch / per_result + 1;
        let heavy = batch(
            &["probe_success"],
            (1..=results as u64)
                .map(|s| result(s, (0..per_result).map(|_| sample(0, vec![])).collect()))
                .collect(),
        );
        let e = decode_batch(&mut SymbolTable::default(), heavy, &limits).unwrap_err();
        assert!(matches!(e, ProtocolError::TooManySamples { .. }), "{e}");
    }

    #[test]
    fn a_bad_trace_is_refused_alone() {
        let limits = FleetLimits::default();
        let step = |address: &str| pb::TraceStep {
            step: Some(pb::trace_step::Step::Connect(pb::ConnectAttempt {
                address: address.into(),
                ok: false,
                error: "connection refused".into(),
                seconds: 0.001,
            })),
        };
        let mut good = result(1, vec![]);
        good.trace = Some(pb::FailureTrace {
            steps: vec![step("127.0.0.1:9")],
            path: None,
        });
        let mut bad = result(2, vec![]);
        bad.trace = Some(pb::FailureTrace {
            steps: vec![step("<b>not an address</b>")],
            path: None,
        });
        let d = decode_batch(
            &mut SymbolTable::default(),
            batch(&[], vec![good, bad]),
            &limits,
        )
        .unwrap();
        assert_eq!(d.results[0].trace.as_ref().unwrap().steps.len(), 1);
        assert_eq!(d.results[1].trace, None);
        assert_eq!(d.results[1].refused, None, "the result itself stands");
        assert_eq!(d.refused_samples[0].0, Reason::BadTrace);
    }

    #[test]
    fn the_symbol_table_is_bounded_in_bytes() {
        let limits = FleetLimits {
            max_symbol_bytes: ByteSize(1 << 20),
            max_symbol_table_bytes: ByteSize(3 << 20),
            ..FleetLimits::default()
        };
        let mut table = SymbolTable::default();
        let mb = "x".repeat(1 << 20);
        decode_batch(&mut table, batch(&[&mb, &mb], vec![]), &limits).unwrap();
        assert!(table.bytes() < 3 << 20);
        let e = decode_batch(&mut table, batch(&[&mb], vec![]), &limits).unwrap_err();
        assert!(matches!(e, ProtocolError::SymbolTableFull { .. }), "{e}");
    }

    #[test]
    fn bad_samples_are_refused_alone() {
        let limits = FleetLimits {
            max_symbol_bytes: ByteSize(100),
            max_labels_per_sample: 2,
            max_sample_label_bytes: ByteSize(150),
            max_samples_per_result: 16,
            ..FleetLimits::default()
        };
        let long = "v".repeat(101);
        let wide = "w".repeat(90);
        let symbols = [
            "probe_success", // 0
            "up",            // 1
            "job",           // 2
            "x",             // 3
            "phase",         // 4
            "__name__",      // 5
            &long,           // 6
            "a",             // 7
            "b",             // 8
            "bad-name",      // 9
            &wide,           // 10
        ];
        let samples = vec![
            sample(0, vec![4, 3]),             // kept
            sample(1, vec![]),                 // unknown metric
            sample(0, vec![2, 3]),             // job is reserved
            sample(0, vec![5, 3]),             // __name__ is reserved
            sample(0, vec![4, 3, 4, 7]),       // duplicate
            sample(0, vec![4, 6]),             // too long
            sample(0, vec![4, 3, 7, 3, 8, 3]), // too many labels
            sample(0, vec![9, 3]),             // not a label name
            sample(0, vec![4, 10, 7, 10]),     // over max_sample_label_bytes
        ];
        let too_many = (0..17).map(|_| sample(0, vec![])).collect();
        let d = decode_batch(
            &mut SymbolTable::default(),
            batch(&symbols, vec![result(1, samples), result(2, too_many)]),
            &limits,
        )
        .unwrap();
        assert_eq!(d.results[0].samples.len(), 1);
        assert_eq!(d.results[0].refused, None);
        assert_eq!(d.results[1].refused, Some(Reason::TooManySamples));
        let count = |reason| {
            d.refused_samples
                .iter()
                .find(|(r, ..)| *r == reason)
                .map_or(0, |(_, n, _)| *n)
        };
        assert_eq!(count(Reason::UnknownMetric), 1);
        assert_eq!(count(Reason::ReservedLabel), 3);
        assert_eq!(count(Reason::DuplicateLabel), 1);
        assert_eq!(count(Reason::SymbolTooLong), 1);
        assert_eq!(count(Reason::TooManyLabels), 2);
    }
}
