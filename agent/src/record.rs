//! What the agent keeps of one probe between running it and the aggregator's ack, and
//! the form it takes in the on-disk buffer.

use crate::probe::Sample;
use sonde_proto::trace::Trace;
use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

/// One probe result, numbered for delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeRecord {
    /// Agent-wide, strictly increasing, never reused.
    pub seq: u64,
    pub job: String,
    pub instance: String,
    pub timestamp_ms: i64,
    pub success: bool,
    pub duration_seconds: f64,
    pub samples: Vec<Sample>,
    /// Assignment generation the check came from; 0 for a local job.
    pub generation: u64,
    pub failure: Option<String>,
    /// What the probe saw, on a failure: kept on disk with the result, so that a
    /// restart does not lose it.
    pub trace: Option<Trace>,
}

impl ProbeRecord {
    /// An estimate of the memory the record holds, for the buffer's in-memory cache.
    pub fn approx_bytes(&self) -> usize {
        let samples: usize = self
            .samples
            .iter()
            .map(|s| {
                std::mem::size_of::<Sample>()
                    + s.labels.iter().map(|(_, v)| 24 + v.len()).sum::<usize>()
            })
            .sum();
        std::mem::size_of::<Self>()
            + self.job.len()
            + self.instance.len()
            + self.failure.as_ref().map_or(0, String::len)
            + self.trace.as_ref().map_or(0, trace_bytes)
            + samples
    }

    /// The record's content for the buffer's `body` column; the sequence number is the
    /// row's key and not repeated here.
    ///
    /// Protobuf rather than the wire's `pb::ProbeResult`: the wire form refers to the
    /// stream's symbol table, so it cannot be read back on its own after a restart. A
    /// protobuf message of our own is self-contained, and a later agent can add fields
    /// and still read what an earlier one buffered.
    pub fn encode(&self) -> Vec<u8> {
        use prost::Message;
        StoredRecord {
            job: self.job.clone(),
            instance: self.instance.clone(),
            timestamp_ms: self.timestamp_ms,
            success: self.success,
            duration_seconds: self.duration_seconds,
            generation: self.generation,
            failure: self.failure.clone(),
            trace: self.trace.as_ref().map(Trace::to_pb),
            samples: self
                .samples
                .iter()
                .map(|s| StoredSample {
                    name: s.name.to_string(),
                    labels: s
                        .labels
                        .iter()
                        .flat_map(|(k, v)| [k.to_string(), v.clone()])
                        .collect(),
                    value: s.value,
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Reads back what [`ProbeRecord::encode`] wrote, numbered `seq`.
    pub fn decode(seq: u64, body: &[u8]) -> Result<Self, DecodeError> {
        use prost::Message;
        let stored = StoredRecord::decode(body)?;
        let mut samples = Vec::with_capacity(stored.samples.len());
        for s in stored.samples {
            if s.labels.len() % 2 != 0 {
                return Err(DecodeError::OddLabels(s.name));
            }
            let mut labels = Vec::with_capacity(s.labels.len() / 2);
            let mut it = s.labels.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                labels.push((static_name(&k)?, v));
            }
            samples.push(Sample {
                name: static_name(&s.name)?,
                labels,
                value: s.value,
            });
        }
        Ok(Self {
            seq,
            job: stored.job,
            instance: stored.instance,
            timestamp_ms: stored.timestamp_ms,
            success: stored.success,
            duration_seconds: stored.duration_seconds,
            samples,
            generation: stored.generation,
            failure: stored.failure,
            // The agent wrote it: a trace that does not read back is a damaged row,
            // and the result is still worth sending without it.
            trace: stored.trace.and_then(|t| Trace::from_pb(t).ok()),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a buffered probe result: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("sample {0:?} has a label name without a value")]
    OddLabels(String),
    #[error("more than {MAX_NAMES} distinct metric and label names")]
    TooManyNames,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredRecord {
    #[prost(string, tag = "1")]
    job: String,
    #[prost(string, tag = "2")]
    instance: String,
    #[prost(int64, tag = "3")]
    timestamp_ms: i64,
    #[prost(bool, tag = "4")]
    success: bool,
    #[prost(double, tag = "5")]
    duration_seconds: f64,
    #[prost(uint64, tag = "6")]
    generation: u64,
    #[prost(string, optional, tag = "7")]
    failure: Option<String>,
    #[prost(message, repeated, tag = "8")]
    samples: Vec<StoredSample>,
    #[prost(message, optional, tag = "9")]
    trace: Option<sonde_proto::pb::FailureTrace>,
}

/// What a trace weighs in memory, roughly: its encoded size is close enough.
fn trace_bytes(trace: &Trace) -> usize {
    use prost::Message;
    std::mem::size_of::<Trace>() + trace.to_pb().encoded_len()
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredSample {
    #[prost(string, tag = "1")]
    name: String,
    /// Label name, value, name, value, ...
    #[prost(string, repeated, tag = "2")]
    labels: Vec<String>,
    #[prost(double, tag = "3")]
    value: f64,
}

/// Metric and label names are `&'static str` in a [`Sample`] because the probers only
/// ever use literals. Names read back from disk are leaked once each and reused: they
/// come from the same few dozen literals, so this stays small. The cap only guards
/// against a damaged file making it grow.
const MAX_NAMES: usize = 10_000;

fn static_name(name: &str) -> Result<&'static str, DecodeError> {
    static NAMES: LazyLock<Mutex<HashSet<&'static str>>> =
        LazyLock::new(|| Mutex::new(HashSet::new()));
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&known) = names.get(name) {
        return Ok(known);
    }
    if names.len() >= MAX_NAMES {
        return Err(DecodeError::TooManyNames);
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.insert(leaked);
    Ok(leaked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_keeps_every_field() {
        let record = ProbeRecord {
            seq: 42,
            job: "web".into(),
            instance: "https://example.com/".into(),
            timestamp_ms: 1_700_000_000_123,
            success: false,
            duration_seconds: 0.25,
            samples: vec![
                Sample {
                    name: "probe_success",
                    labels: vec![],
                    value: 0.0,
                },
                Sample {
                    name: "probe_http_duration_seconds",
                    labels: vec![("phase", "connect".into()), ("extra", String::new())],
                    value: f64::NAN,
                },
            ],
            generation: 7,
            failure: Some("connection refused".into()),
            trace: Some(Trace {
                steps: vec![sonde_proto::trace::Step::Connect {
                    address: "127.0.0.1:9".parse().unwrap(),
                    ok: false,
                    error: Some("connection refused".into()),
                    seconds: 0.001,
                }],
                path: None,
            }),
        };
        let back = ProbeRecord::decode(42, &record.encode()).unwrap();
        assert_eq!(back.samples[1].labels, record.samples[1].labels);
        assert!(back.samples[1].value.is_nan());
        let without_nan = |mut r: ProbeRecord| {
            r.samples[1].value = 0.0;
            r
        };
        assert_eq!(without_nan(back), without_nan(record.clone()));

        let mut ok = record;
        ok.failure = None;
        ok.trace = None;
        let back = ProbeRecord::decode(42, &ok.encode()).unwrap();
        assert_eq!((back.failure, back.trace), (None, None));
    }

    #[test]
    fn damaged_body_is_an_error() {
        assert!(ProbeRecord::decode(1, &[0xff, 0xff, 0xff]).is_err());
    }
}
