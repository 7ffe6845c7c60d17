//! Series in, remote write 1.0 request body out, and back: protobuf `WriteRequest`
//! compressed with snappy's **block** format (the spec forbids the framed one).
//! No I/O here, so the exact bytes are unit-tested.

use prost::Message;
use sonde_proto::prompb::{Label, Sample, TimeSeries, WriteRequest};

/// The value Prometheus writes as a staleness marker (defined with the hub's model).
pub use sonde_hub::model::STALE_NAN_BITS;

/// The largest body [`decode`] inflates. Prometheus's own receiver has no smaller limit in
/// practice (a full batch is a few hundred KiB), and the cap is checked against snappy's
/// header before any allocation, so a tiny hostile body cannot ask for gigabytes.
pub const MAX_DECODED_LEN: usize = 32 << 20;

/// One series and its samples, in the order they are to be written.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Label pairs including `__name__`; any order, empty values allowed (they are dropped).
    pub labels: Vec<(String, String)>,
    /// `(timestamp in ms since the epoch, value)`.
    pub samples: Vec<(i64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(
        "the request is too large to compress ({len} bytes); lower queue_config.max_samples_per_send"
    )]
    TooLarge { len: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the body inflates to {len} bytes, more than the {max} bytes accepted")]
    TooLarge { len: usize, max: usize },
    #[error("the body is not snappy block-compressed: {0}")]
    Snappy(#[from] snap::Error),
    #[error("the body is not a prometheus.WriteRequest: {0}")]
    Protobuf(#[from] prost::DecodeError),
}

/// Puts a label set in the form the remote write spec requires: empty values dropped
/// (an empty label is the same as no label) and names sorted in byte order.
///
/// Byte order puts `__name__` first whenever the other names start with a lowercase
/// letter, but an uppercase name (`Zone`) sorts before it. Receivers check the byte order
/// (Mimir rejects unsorted labels), so byte order wins over "`__name__` first".
pub fn normalize_labels(labels: &mut Vec<(String, String)>) {
    labels.retain(|(_, value)| !value.is_empty());
    labels.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
}

/// The `WriteRequest` for `series`, labels normalized, one `TimeSeries` per entry.
pub fn write_request(series: &[Series]) -> WriteRequest {
    WriteRequest {
        timeseries: series
            .iter()
            .map(|s| {
                let mut labels = s.labels.clone();
                normalize_labels(&mut labels);
                TimeSeries {
                    labels: labels
                        .into_iter()
                        .map(|(name, value)| Label { name, value })
                        .collect(),
                    samples: s
                        .samples
                        .iter()
                        .map(|&(timestamp, value)| Sample { value, timestamp })
                        .collect(),
                }
            })
            .collect(),
        metadata: Vec::new(),
    }
}

/// The request body for `series`: the snappy block-compressed `WriteRequest`.
pub fn encode(series: &[Series]) -> Result<Vec<u8>, EncodeError> {
    encode_request(&write_request(series))
}

pub fn encode_request(request: &WriteRequest) -> Result<Vec<u8>, EncodeError> {
    let raw = request.encode_to_vec();
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .map_err(|_| EncodeError::TooLarge { len: raw.len() })
}

/// Decodes a remote write 1.0 body, refusing bodies that inflate past [`MAX_DECODED_LEN`].
pub fn decode(body: &[u8]) -> Result<WriteRequest, DecodeError> {
    decode_with_limit(body, MAX_DECODED_LEN)
}

pub fn decode_with_limit(body: &[u8], max_len: usize) -> Result<WriteRequest, DecodeError> {
    let len = snap::raw::decompress_len(body)?;
    if len > max_len {
        return Err(DecodeError::TooLarge { len, max: max_len });
    }
    let raw = snap::raw::Decoder::new().decompress_vec(body)?;
    Ok(WriteRequest::decode(raw.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `up{job="a"} π @1000`, written out field by field from the .proto.
    fn expected_protobuf() -> Vec<u8> {
        let mut label_name = vec![0x0a, 8];
        label_name.extend_from_slice(b"__name__");
        label_name.extend_from_slice(&[0x12, 2]);
        label_name.extend_from_slice(b"up");
        assert_eq!(label_name.len(), 14);

        let mut label_job = vec![0x0a, 3];
        label_job.extend_from_slice(b"job");
        label_job.extend_from_slice(&[0x12, 1]);
        label_job.extend_from_slice(b"a");
        assert_eq!(label_job.len(), 8);

        // value: field 1, wire type 1 (64-bit) = tag 0x09, little-endian IEEE 754;
        // timestamp: field 2, varint = tag 0x10, 1000 = 0xe8 0x07.
        let mut sample = vec![0x09];
        sample.extend_from_slice(&std::f64::consts::PI.to_bits().to_le_bytes());
        sample.extend_from_slice(&[0x10, 0xe8, 0x07]);
        assert_eq!(sample.len(), 12);

        let mut series = vec![0x0a, 14];
        series.extend(label_name);
        series.extend_from_slice(&[0x0a, 8]);
        series.extend(label_job);
        series.extend_from_slice(&[0x12, 12]);
        series.extend(sample);
        assert_eq!(series.len(), 40);

        let mut request = vec![0x0a, 40];
        request.extend(series);
        request
    }

    fn tiny() -> Vec<Series> {
        vec![Series {
            labels: labels(&[("job", "a"), ("__name__", "up"), ("empty", "")]),
            samples: vec![(1000, std::f64::consts::PI)],
        }]
    }

    #[test]
    fn exact_protobuf_bytes() {
        let body = encode(&tiny()).unwrap();
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        assert_eq!(raw, expected_protobuf());
    }

    #[test]
    fn exact_snappy_block_bytes() {
        // 42 bytes without a repeated 4-byte run compress to the varint length (0x2a)
        // and one literal of 42 bytes: tag (42 - 1) << 2 = 0xa4. A framed stream would
        // start with the 0xff "sNaPpY" chunk instead.
        let mut expected = vec![0x2a, 0xa4];
        expected.extend(expected_protobuf());
        assert_eq!(encode(&tiny()).unwrap(), expected);
    }

    #[test]
    fn labels_sorted_in_byte_order_and_empty_dropped() {
        let req = write_request(&[Series {
            labels: labels(&[
                ("zone", "z"),
                ("instance", "i"),
                ("blank", ""),
                ("__name__", "m"),
                ("agent", "x"),
            ]),
            samples: vec![(1, 1.0)],
        }]);
        let names: Vec<&str> = req.timeseries[0]
            .labels
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["__name__", "agent", "instance", "zone"]);

        // Uppercase sorts before '_' (0x5f): the spec's byte order, not __name__ first.
        let req = write_request(&[Series {
            labels: labels(&[("__name__", "m"), ("Zone", "z"), ("a", "1")]),
            samples: vec![(1, 1.0)],
        }]);
        let names: Vec<&str> = req.timeseries[0]
            .labels
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["Zone", "__name__", "a"]);
    }

    #[test]
    fn staleness_marker_bits_survive() {
        let stale = f64::from_bits(STALE_NAN_BITS);
        let body = encode(&[Series {
            labels: labels(&[("__name__", "up")]),
            samples: vec![(5, stale), (6, f64::NAN)],
        }])
        .unwrap();
        let back = decode(&body).unwrap();
        let samples = &back.timeseries[0].samples;
        assert_eq!(samples[0].value.to_bits(), STALE_NAN_BITS);
        assert_eq!(samples[1].value.to_bits(), f64::NAN.to_bits());
        assert_ne!(samples[1].value.to_bits(), STALE_NAN_BITS);
    }

    #[test]
    fn decode_refuses_large_and_garbage() {
        // A 5-byte snappy header that claims 3 GB: refused before any allocation.
        let mut bomb = Vec::new();
        let mut n: u64 = 3_000_000_000;
        while n >= 0x80 {
            bomb.push((n as u8) | 0x80);
            n >>= 7;
        }
        bomb.push(n as u8);
        assert!(matches!(decode(&bomb), Err(DecodeError::TooLarge { .. })));
        assert!(matches!(
            decode_with_limit(&encode(&tiny()).unwrap(), 10),
            Err(DecodeError::TooLarge { len: 42, max: 10 })
        ));
        assert!(matches!(decode(b"\x05\x01"), Err(DecodeError::Snappy(_))));
        let not_proto = snap::raw::Encoder::new().compress_vec(b"\xff\xff").unwrap();
        assert!(matches!(decode(&not_proto), Err(DecodeError::Protobuf(_))));
    }

    fn arb_series() -> impl Strategy<Value = Series> {
        (
            "[a-z]{1,8}",
            prop::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,6}", "[ -~]{0,8}", 0..5),
            prop::collection::vec((any::<i64>(), any::<u64>()), 0..6),
        )
            .prop_map(|(name, extra, samples)| {
                let mut labels: Vec<(String, String)> =
                    extra.into_iter().filter(|(k, _)| k != "__name__").collect();
                labels.push(("__name__".to_string(), name));
                Series {
                    labels,
                    samples: samples
                        .into_iter()
                        .map(|(t, bits)| (t, f64::from_bits(bits)))
                        .collect(),
                }
            })
    }

    proptest! {
        #[test]
        fn round_trip(series in prop::collection::vec(arb_series(), 0..8)) {
            let back = decode(&encode(&series).unwrap()).unwrap();
            prop_assert_eq!(back.timeseries.len(), series.len());
            for (got, want) in back.timeseries.iter().zip(&series) {
                let mut labels = want.labels.clone();
                normalize_labels(&mut labels);
                let got_labels: Vec<(String, String)> = got
                    .labels
                    .iter()
                    .map(|l| (l.name.clone(), l.value.clone()))
                    .collect();
                prop_assert_eq!(got_labels, labels);
                // Compare bits so NaN payloads count.
                let got_samples: Vec<(i64, u64)> =
                    got.samples.iter().map(|s| (s.timestamp, s.value.to_bits())).collect();
                let want_samples: Vec<(i64, u64)> =
                    want.samples.iter().map(|&(t, v)| (t, v.to_bits())).collect();
                prop_assert_eq!(got_samples, want_samples);
            }
        }
    }
}
