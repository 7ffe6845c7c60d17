//! Series in, remote write 2.0 request body out, and back: protobuf
//! `io.prometheus.write.v2.Request` compressed with snappy's block format.
//!
//! The messages are declared here with prost's derive, field by field from the spec's
//! `types.proto` (`tests/rw2/types.proto` is that file, compiled by another protobuf
//! implementation in the interop test), keeping only what a float-sample sender writes:
//! no histograms, no exemplars. A 2.0 request interns every string in one `symbols`
//! table whose first entry is the empty string; series point into it with
//! `labels_refs` (name, value, name, value, ...), and carry their metric's metadata
//! (type, help, unit) by reference too. No I/O here, so the exact bytes are unit-tested.

use super::encode::{DecodeError, EncodeError, MAX_DECODED_LEN, Series, normalize_labels};
use prost::Message;
use std::collections::HashMap;

/// The request's `Content-Type`, as the spec spells it.
pub const CONTENT_TYPE_V2: &str = "application/x-protobuf;proto=io.prometheus.write.v2.Request";
/// `X-Prometheus-Remote-Write-Version` of a 2.0 request.
pub const VERSION_V2: &str = "2.0.0";

/// `io.prometheus.write.v2.Request`. Fields 1 to 3 are reserved by the spec (they were
/// 1.0's), so a 2.0 body read as a 1.0 `WriteRequest` is an empty request, which is what
/// a 1.0-only receiver stores: nothing.
#[derive(Clone, PartialEq, Message)]
pub struct Request {
    #[prost(string, repeated, tag = "4")]
    pub symbols: Vec<String>,
    #[prost(message, repeated, tag = "5")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TimeSeries {
    /// Pairs of indices into `symbols`: name, value, name, value, ... in label order.
    #[prost(uint32, repeated, tag = "1")]
    pub labels_refs: Vec<u32>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
    #[prost(message, optional, tag = "5")]
    pub metadata: Option<Metadata>,
    #[prost(int64, tag = "6")]
    pub created_timestamp: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Metadata {
    /// A [`MetricType`] value.
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(uint32, tag = "3")]
    pub help_ref: u32,
    #[prost(uint32, tag = "4")]
    pub unit_ref: u32,
}

/// `io.prometheus.write.v2.Metadata.MetricType`, the values sonde writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum MetricType {
    Unspecified = 0,
    Counter = 1,
    Gauge = 2,
}

/// Type and help of the series sonde writes: every one is a gauge (`up` and the probe
/// series as blackbox_exporter exposes them, and sonde's own merged series). `None` for
/// a name sonde does not write.
pub fn metric_metadata(name: &str) -> Option<(MetricType, &'static str)> {
    sonde_proto::help::series_help(name).map(|help| (MetricType::Gauge, help))
}

/// Interns strings: `symbols[0]` is always `""`, as the spec requires.
struct Symbols {
    table: Vec<String>,
    index: HashMap<String, u32>,
}

impl Symbols {
    fn new() -> Self {
        let mut s = Self {
            table: Vec::new(),
            index: HashMap::new(),
        };
        s.intern("");
        s
    }

    fn intern(&mut self, text: &str) -> u32 {
        if let Some(&i) = self.index.get(text) {
            return i;
        }
        let i = self.table.len() as u32;
        self.table.push(text.to_string());
        self.index.insert(text.to_string(), i);
        i
    }
}

/// The 2.0 `Request` for `series`: labels normalized (empty values dropped, names in byte
/// order), strings interned in order of first use, one `TimeSeries` per entry with its
/// metadata when sonde knows the metric.
pub fn request(series: &[Series]) -> Request {
    let mut symbols = Symbols::new();
    let timeseries = series
        .iter()
        .map(|s| {
            let mut labels = s.labels.clone();
            normalize_labels(&mut labels);
            let mut labels_refs = Vec::with_capacity(labels.len() * 2);
            let mut name = "";
            for (k, v) in &labels {
                labels_refs.push(symbols.intern(k));
                labels_refs.push(symbols.intern(v));
                if k == "__name__" {
                    name = v;
                }
            }
            let metadata = metric_metadata(name).map(|(kind, help)| Metadata {
                r#type: kind as i32,
                help_ref: symbols.intern(help),
                unit_ref: 0,
            });
            TimeSeries {
                labels_refs,
                samples: s
                    .samples
                    .iter()
                    .map(|&(timestamp, value)| Sample { value, timestamp })
                    .collect(),
                metadata,
                created_timestamp: 0,
            }
        })
        .collect();
    Request {
        symbols: symbols.table,
        timeseries,
    }
}

/// The request body for `series`: the snappy block-compressed 2.0 `Request`.
pub fn encode(series: &[Series]) -> Result<Vec<u8>, EncodeError> {
    let raw = request(series).encode_to_vec();
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .map_err(|_| EncodeError::TooLarge { len: raw.len() })
}

/// Decodes a 2.0 body, refusing bodies that inflate past [`MAX_DECODED_LEN`].
pub fn decode(body: &[u8]) -> Result<Request, DecodeError> {
    let len = snap::raw::decompress_len(body)?;
    if len > MAX_DECODED_LEN {
        return Err(DecodeError::TooLarge {
            len,
            max: MAX_DECODED_LEN,
        });
    }
    let raw = snap::raw::Decoder::new().decompress_vec(body)?;
    Ok(Request::decode(raw.as_slice())?)
}

/// Why a request's label references cannot be looked up.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ResolveError {
    #[error("symbol reference {0} out of range")]
    OutOfRange(u32),
    #[error("labels_refs has an odd length")]
    OddLabelRefs,
}

/// The series of a decoded request with their labels looked up, for receivers and tests.
/// Err when a reference points outside `symbols` or `labels_refs` has an odd length.
pub fn resolve(request: &Request) -> Result<Vec<Series>, ResolveError> {
    let sym = |i: u32| -> Result<String, ResolveError> {
        request
            .symbols
            .get(i as usize)
            .cloned()
            .ok_or(ResolveError::OutOfRange(i))
    };
    request
        .timeseries
        .iter()
        .map(|ts| {
            if ts.labels_refs.len() % 2 != 0 {
                return Err(ResolveError::OddLabelRefs);
            }
            let labels = ts
                .labels_refs
                .chunks(2)
                .map(|p| Ok((sym(p[0])?, sym(p[1])?)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Series {
                labels,
                samples: ts.samples.iter().map(|s| (s.timestamp, s.value)).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn tiny() -> Vec<Series> {
        vec![Series {
            labels: labels(&[("job", "a"), ("__name__", "up"), ("empty", "")]),
            samples: vec![(1000, std::f64::consts::PI)],
        }]
    }

    fn string_field(tag: u8, text: &str) -> Vec<u8> {
        assert!(text.len() < 128);
        let mut out = vec![tag, text.len() as u8];
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// `up{job="a"} π @1000`, written out field by field from the spec's .proto.
    fn expected_protobuf() -> Vec<u8> {
        let (_, help) = metric_metadata("up").unwrap();
        // symbols (field 4, length-delimited: tag 0x22), in order of first use.
        let mut out = Vec::new();
        for s in ["", "__name__", "up", "job", "a", help] {
            out.extend(string_field(0x22, s));
        }
        // labels_refs (field 1, packed varints: tag 0x0a): __name__=up, job=a.
        let mut series = vec![0x0a, 4, 1, 2, 3, 4];
        // samples (field 2: tag 0x12): value (field 1, 64-bit: 0x09), timestamp
        // (field 2, varint: 0x10) 1000 = 0xe8 0x07.
        let mut sample = vec![0x09];
        sample.extend_from_slice(&std::f64::consts::PI.to_bits().to_le_bytes());
        sample.extend_from_slice(&[0x10, 0xe8, 0x07]);
        series.extend_from_slice(&[0x12, sample.len() as u8]);
        series.extend(sample);
        // metadata (field 5: tag 0x2a): type GAUGE (field 1: 0x08, 2), help_ref
        // (field 3: 0x18) = 5; unit_ref 0 is the default and not written.
        series.extend_from_slice(&[0x2a, 4, 0x08, 2, 0x18, 5]);
        // timeseries (field 5, length-delimited: tag 0x2a).
        out.extend_from_slice(&[0x2a, series.len() as u8]);
        out.extend(series);
        out
    }

    #[test]
    fn exact_protobuf_bytes() {
        let body = encode(&tiny()).unwrap();
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        assert_eq!(raw, expected_protobuf());
    }

    #[test]
    fn snappy_block_format() {
        // The block format starts with the varint length of the raw message; the framed
        // format (which remote write forbids) would start with the 0xff stream identifier.
        let raw = expected_protobuf();
        let body = encode(&tiny()).unwrap();
        let mut len = 0usize;
        let mut shift = 0;
        let mut at = 0;
        loop {
            let b = body[at];
            len |= ((b & 0x7f) as usize) << shift;
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        assert_eq!(len, raw.len());
        assert_ne!(body[0], 0xff);
        assert_eq!(
            snap::raw::Decoder::new().decompress_vec(&body).unwrap(),
            raw
        );
    }

    #[test]
    fn symbols_are_shared_and_start_empty() {
        let series = vec![
            Series {
                labels: labels(&[("__name__", "probe_success"), ("job", "web")]),
                samples: vec![(1, 1.0), (2, 0.0)],
            },
            Series {
                labels: labels(&[("__name__", "probe_success"), ("job", "dns")]),
                samples: vec![(1, 1.0)],
            },
            Series {
                labels: labels(&[("__name__", "other"), ("job", "web")]),
                samples: vec![(1, 1.0)],
            },
        ];
        let req = request(&series);
        assert_eq!(req.symbols[0], "");
        let mut unique = req.symbols.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), req.symbols.len(), "{:?}", req.symbols);
        // The help text is interned once for both probe_success series.
        assert_eq!(
            req.timeseries[0].metadata.as_ref().unwrap().help_ref,
            req.timeseries[1].metadata.as_ref().unwrap().help_ref
        );
        assert_eq!(req.timeseries[0].metadata.as_ref().unwrap().r#type, 2);
        // A metric sonde does not know gets no metadata.
        assert_eq!(req.timeseries[2].metadata, None);
        let back = resolve(&decode(&encode(&series).unwrap()).unwrap()).unwrap();
        assert_eq!(back, series);
    }

    #[test]
    fn a_v2_body_is_an_empty_v1_request() {
        // What a 1.0-only receiver (Prometheus 2.42) makes of a 2.0 body: nothing to store.
        let body = encode(&tiny()).unwrap();
        let v1 = super::super::encode::decode(&body).unwrap();
        assert!(v1.timeseries.is_empty() && v1.metadata.is_empty());
    }

    #[test]
    fn resolve_refuses_bad_references() {
        let mut req = request(&tiny());
        req.timeseries[0].labels_refs.push(99);
        assert_eq!(resolve(&req).unwrap_err(), ResolveError::OddLabelRefs);
        req.timeseries[0].labels_refs.push(100);
        assert!(matches!(
            resolve(&req).unwrap_err(),
            ResolveError::OutOfRange(_)
        ));
    }
}
