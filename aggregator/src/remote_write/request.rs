//! Request building, pure (no I/O, no clock): a series' labels encoded once as the
//! protobuf bytes a 1.0 `TimeSeries` carries them in, samples grouped by series, and the
//! 1.0 or 2.0 body compressed with snappy's block format.
//!
//! A 1.0 body is written by hand rather than through prost's structs: the labels of a
//! series are already protobuf (encoded once, when the series is first queued), so a
//! request is those bytes copied plus 12 bytes or so per sample. A 2.0 body interns
//! strings per request, so it goes through [`encode_v2`] with the labels decoded again.

use super::encode::{EncodeError, Series};
use super::encode_v2;
use std::sync::Arc;

/// The labels of one series as they sit inside a 1.0 `TimeSeries`: field 1 (`Label`)
/// repeated, each `Label` with its `name` (1) and `value` (2). Names in byte order.
pub(crate) type LabelsPb = Arc<[u8]>;

/// One series of a request and its samples `(timestamp ms, value)`, in queue order.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SeriesBatch {
    pub labels: LabelsPb,
    pub samples: Samples,
}

/// A series' samples in one request. A request nearly always holds one sample per
/// series (the hub writes a series once per evaluation), so the first is kept inline:
/// no allocation per series.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Samples {
    first: Option<(i64, f64)>,
    rest: Vec<(i64, f64)>,
}

impl Samples {
    pub(crate) fn push(&mut self, sample: (i64, f64)) {
        if self.first.is_none() {
            self.first = Some(sample);
        } else {
            self.rest.push(sample);
        }
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(i64, f64)> {
        self.first.iter().chain(self.rest.iter())
    }
}

impl From<&[(i64, f64)]> for Samples {
    fn from(samples: &[(i64, f64)]) -> Self {
        let mut out = Self::default();
        for s in samples {
            out.push(*s);
        }
        out
    }
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Reads a varint at `*pos`; `None` past the end or on more than 10 bytes.
pub(crate) fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

fn put_field_bytes(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The protobuf form of `labels` (already normalized: names unique, in byte order, no
/// empty value).
pub(crate) fn labels_pb<K: AsRef<str>, V: AsRef<str>>(labels: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut label = Vec::new();
    for (name, value) in labels {
        label.clear();
        put_field_bytes(&mut label, 0x0a, name.as_ref().as_bytes());
        put_field_bytes(&mut label, 0x12, value.as_ref().as_bytes());
        put_field_bytes(&mut out, 0x0a, &label);
    }
    out
}

/// The label pairs back from [`labels_pb`] bytes; `None` if they are not that encoding.
pub(crate) fn parse_labels_pb(pb: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    let field = |buf: &[u8], pos: &mut usize, tag: u8| -> Option<std::ops::Range<usize>> {
        if *buf.get(*pos)? != tag {
            return None;
        }
        *pos += 1;
        let len = usize::try_from(get_varint(buf, pos)?).ok()?;
        let start = *pos;
        let end = start.checked_add(len).filter(|&e| e <= buf.len())?;
        *pos = end;
        Some(start..end)
    };
    while pos < pb.len() {
        let label = &pb[field(pb, &mut pos, 0x0a)?];
        let mut at = 0;
        let name = std::str::from_utf8(&label[field(label, &mut at, 0x0a)?]).ok()?;
        let value = std::str::from_utf8(&label[field(label, &mut at, 0x12)?]).ok()?;
        if at != label.len() {
            return None;
        }
        out.push((name.to_string(), value.to_string()));
    }
    Some(out)
}

/// The uncompressed 1.0 `WriteRequest` for `series`.
pub(crate) fn write_request_v1(series: &[SeriesBatch]) -> Vec<u8> {
    // A sample is (0x09 + 8 bytes value) + (0x10 + varint timestamp), each left out when
    // zero as protobuf writers do (a negative zero is kept: its sign is data).
    let sample_len = |ts: i64, value: f64| {
        let value_len = if value.to_bits() == 0 { 0 } else { 9 };
        let ts_len = if ts == 0 {
            0
        } else {
            1 + varint_len(ts as u64)
        };
        value_len + ts_len
    };
    let series_len = |s: &SeriesBatch| {
        s.labels.len()
            + s.samples
                .iter()
                .map(|&(ts, value)| {
                    let n = sample_len(ts, value);
                    1 + varint_len(n as u64) + n
                })
                .sum::<usize>()
    };
    let total: usize = series
        .iter()
        .map(|s| {
            let n = series_len(s);
            1 + varint_len(n as u64) + n
        })
        .sum();
    let mut out = Vec::with_capacity(total);
    for s in series {
        out.push(0x0a);
        put_varint(&mut out, series_len(s) as u64);
        out.extend_from_slice(&s.labels);
        for &(ts, value) in s.samples.iter() {
            out.push(0x12);
            put_varint(&mut out, sample_len(ts, value) as u64);
            if value.to_bits() != 0 {
                out.push(0x09);
                out.extend_from_slice(&value.to_bits().to_le_bytes());
            }
            if ts != 0 {
                out.push(0x10);
                put_varint(&mut out, ts as u64);
            }
        }
    }
    out
}

fn compress(raw: &[u8]) -> Result<Vec<u8>, EncodeError> {
    snap::raw::Encoder::new()
        .compress_vec(raw)
        .map_err(|_| EncodeError::TooLarge { len: raw.len() })
}

/// The 1.0 body: `WriteRequest`, snappy block-compressed.
pub(crate) fn encode_v1(series: &[SeriesBatch]) -> Result<Vec<u8>, EncodeError> {
    compress(&write_request_v1(series))
}

/// The series with their labels as string pairs (for 2.0, and for tests).
pub(crate) fn to_series(series: &[SeriesBatch]) -> Vec<Series> {
    series
        .iter()
        .map(|s| Series {
            labels: parse_labels_pb(&s.labels).unwrap_or_default(),
            samples: s.samples.iter().copied().collect(),
        })
        .collect()
}

/// The 2.0 body: `io.prometheus.write.v2.Request`, snappy block-compressed.
pub(crate) fn encode_v2(series: &[SeriesBatch]) -> Result<Vec<u8>, EncodeError> {
    encode_v2::encode(&to_series(series))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(pairs: &[(&str, &str)], samples: &[(i64, f64)]) -> SeriesBatch {
        SeriesBatch {
            labels: labels_pb(pairs).into(),
            samples: Samples::from(samples),
        }
    }

    #[test]
    fn labels_are_the_bytes_of_a_timeseries_labels() {
        // `Label{name: "job", value: "a"}` is 0a 03 "job" 12 01 "a", 8 bytes, inside
        // field 1 of the TimeSeries: 0a 08.
        let mut want = vec![0x0a, 8, 0x0a, 3];
        want.extend_from_slice(b"job");
        want.extend_from_slice(&[0x12, 1, b'a']);
        assert_eq!(labels_pb(&[("job", "a")]), want);
        assert_eq!(
            parse_labels_pb(&want).unwrap(),
            vec![("job".to_string(), "a".to_string())]
        );
        assert_eq!(parse_labels_pb(&want[..want.len() - 1]), None);
        assert_eq!(parse_labels_pb(&[0x12, 0]), None);
    }

    #[test]
    fn v1_body_is_what_prost_writes() {
        let series = vec![
            batch(
                &[("__name__", "up"), ("job", "a")],
                &[
                    (1000, 1.0),
                    (2000, f64::from_bits(super::super::STALE_NAN_BITS)),
                ],
            ),
            batch(
                &[("__name__", "x")],
                &[(-5, -0.5), (i64::MAX, 0.0), (0, 2.0)],
            ),
            batch(&[("__name__", "empty")], &[]),
        ];
        let want = super::super::encode::write_request(&to_series(&series));
        assert_eq!(
            write_request_v1(&series),
            prost::Message::encode_to_vec(&want)
        );
        let body = encode_v1(&series).unwrap();
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        assert_eq!(raw, write_request_v1(&series));
    }

    #[test]
    fn v2_body_round_trips() {
        let series = vec![batch(&[("__name__", "up"), ("job", "a")], &[(1000, 1.0)])];
        let request = encode_v2::decode(&encode_v2(&series).unwrap()).unwrap();
        assert_eq!(encode_v2::resolve(&request).unwrap(), to_series(&series));
    }

    proptest! {
        #[test]
        fn v1_matches_prost_for_any_series(
            series in proptest::collection::vec(
                (
                    proptest::collection::btree_map("[a-zA-Z_][a-z0-9_]{0,8}", "\\PC{1,12}", 1..5),
                    proptest::collection::vec((any::<i64>(), any::<f64>()), 0..5),
                ),
                0..5,
            )
        ) {
            let batches: Vec<SeriesBatch> = series
                .iter()
                .map(|(labels, samples)| {
                    let pairs: Vec<(&str, &str)> =
                        labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    batch(&pairs, samples)
                })
                .collect();
            // Decoded, the body gives back every label and every value's exact bits.
            let body = write_request_v1(&batches);
            let got = <sonde_proto::prompb::WriteRequest as prost::Message>::decode(&body[..]).unwrap();
            prop_assert_eq!(got.timeseries.len(), batches.len());
            for (ts, b) in got.timeseries.iter().zip(&batches) {
                let pairs: Vec<(String, String)> =
                    ts.labels.iter().map(|l| (l.name.clone(), l.value.clone())).collect();
                prop_assert_eq!(pairs, parse_labels_pb(&b.labels).unwrap());
                let samples: Vec<(i64, u64)> =
                    ts.samples.iter().map(|s| (s.timestamp, s.value.to_bits())).collect();
                let want: Vec<(i64, u64)> =
                    b.samples.iter().map(|&(t, v)| (t, v.to_bits())).collect();
                prop_assert_eq!(samples, want);
            }
            for (b, (labels, _)) in batches.iter().zip(&series) {
                let pairs: Vec<(String, String)> =
                    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                prop_assert_eq!(parse_labels_pb(&b.labels).unwrap(), pairs);
            }
        }

        #[test]
        fn hostile_label_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_labels_pb(&bytes);
        }
    }
}
