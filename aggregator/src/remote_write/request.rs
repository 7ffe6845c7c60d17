//! Request building, pure (no I/O, no clock): a series' labels encoded once as the
//! protobuf bytes a 1.0 `TimeSeries` carries them in, samples grouped by series, and the
//! 1.0 or 2.0 body compressed with snappy's block format.
//!
//! A 1.0 body is written by hand rather than through prost's structs: the labels of a
//! series are already protobuf (encoded once, when the series is first queued), so a
//! request is those bytes copied plus 12 bytes or so per sample. A 2.0 body interns
//! strings per request, so it goes through [`encode_v2`] with the labels decoded again.

use super::config::ProtobufMessage;
use super::encode::{EncodeError, Series};
use super::encode_v2;
use std::collections::HashMap;
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

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(i64, f64)> + Clone {
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

/// The range of the length-delimited field with one-byte `tag` at `pos`, which moves
/// past it; `None` if another tag is there or the field runs past `buf`.
fn length_delimited(buf: &[u8], pos: &mut usize, tag: u8) -> Option<std::ops::Range<usize>> {
    if *buf.get(*pos)? != tag {
        return None;
    }
    *pos += 1;
    let len = usize::try_from(get_varint(buf, pos)?).ok()?;
    let start = *pos;
    let end = start.checked_add(len).filter(|&e| e <= buf.len())?;
    *pos = end;
    Some(start..end)
}

/// The label pairs back from [`labels_pb`] bytes; `None` if they are not that encoding.
pub(crate) fn parse_labels_pb(pb: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < pb.len() {
        let label = &pb[length_delimited(pb, &mut pos, 0x0a)?];
        let mut at = 0;
        let name = std::str::from_utf8(&label[length_delimited(label, &mut at, 0x0a)?]).ok()?;
        let value = std::str::from_utf8(&label[length_delimited(label, &mut at, 0x12)?]).ok()?;
        if at != label.len() {
            return None;
        }
        out.push((name.to_string(), value.to_string()));
    }
    Some(out)
}

/// The bytes of one 1.0 `Sample` (value, timestamp), each field left out when zero as
/// protobuf writers do (a negative zero is kept: its sign is data).
fn sample_len(ts: i64, value: f64) -> usize {
    let value_len = if value.to_bits() == 0 { 0 } else { 9 };
    let ts_len = if ts == 0 {
        0
    } else {
        1 + varint_len(ts as u64)
    };
    value_len + ts_len
}

/// The bytes of a `TimeSeries` with `labels` and `samples`, without its own tag and length.
fn timeseries_len(labels: &[u8], samples: impl Iterator<Item = (i64, f64)>) -> usize {
    labels.len()
        + samples
            .map(|(ts, value)| {
                let n = sample_len(ts, value);
                1 + varint_len(n as u64) + n
            })
            .sum::<usize>()
}

/// Appends field 1 of a `WriteRequest`: one `TimeSeries` with `labels` and `samples`.
fn put_timeseries<I>(out: &mut Vec<u8>, labels: &[u8], samples: I)
where
    I: Iterator<Item = (i64, f64)> + Clone,
{
    out.push(0x0a);
    put_varint(out, timeseries_len(labels, samples.clone()) as u64);
    out.extend_from_slice(labels);
    for (ts, value) in samples {
        out.push(0x12);
        put_varint(out, sample_len(ts, value) as u64);
        if value.to_bits() != 0 {
            out.push(0x09);
            out.extend_from_slice(&value.to_bits().to_le_bytes());
        }
        if ts != 0 {
            out.push(0x10);
            put_varint(out, ts as u64);
        }
    }
}

/// The uncompressed 1.0 `WriteRequest` for `series`.
pub(crate) fn write_request_v1(series: &[SeriesBatch]) -> Vec<u8> {
    let total: usize = series
        .iter()
        .map(|s| {
            let n = timeseries_len(&s.labels, s.samples.iter().copied());
            1 + varint_len(n as u64) + n
        })
        .sum();
    let mut out = Vec::with_capacity(total);
    for s in series {
        put_timeseries(&mut out, &s.labels, s.samples.iter().copied());
    }
    out
}

/// Whole `TimeSeries` fields of a 1.0 `WriteRequest`, one per sample, back to back: the
/// form the queue's newest blocks wait in (see `tail`), so that a request made of them is
/// their bytes copied, and compressed. One series per sample is what Prometheus itself
/// sends; receivers take the samples of a series in the order of its fields.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct TimeSeriesFields {
    bytes: Vec<u8>,
    /// Where each field ends in `bytes`.
    ends: Vec<u32>,
}

impl TimeSeriesFields {
    pub(crate) fn with_capacity(fields: usize, bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(fields),
        }
    }

    /// Appends the field of one sample of the series with `labels` ([`labels_pb`]).
    pub(crate) fn push(&mut self, labels: &[u8], ts: i64, value: f64) {
        put_timeseries(&mut self.bytes, labels, std::iter::once((ts, value)));
        self.ends.push(self.bytes.len() as u32);
    }

    /// Appends the fields `range` of `other`.
    pub(crate) fn extend_from(&mut self, other: &TimeSeriesFields, range: std::ops::Range<usize>) {
        if range.is_empty() {
            return;
        }
        let start = other.start(range.start);
        let end = other.ends[range.end - 1] as usize;
        let shift = self.bytes.len() as i64 - start as i64;
        self.bytes.extend_from_slice(&other.bytes[start..end]);
        self.ends.extend(
            other.ends[range]
                .iter()
                .map(|&e| (i64::from(e) + shift) as u32),
        );
    }

    fn start(&self, field: usize) -> usize {
        if field == 0 {
            0
        } else {
            self.ends[field - 1] as usize
        }
    }

    /// The number of fields (samples).
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// What the fields hold on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * 4
    }

    /// Splits off the fields from `at` on.
    fn split_off(&mut self, at: usize) -> Self {
        let mut right = Self::default();
        right.extend_from(self, at..self.len());
        self.bytes.truncate(self.start(at));
        self.ends.truncate(at);
        right
    }

    /// The uncompressed 1.0 `WriteRequest` of these fields: their bytes.
    pub(crate) fn write_request(&self) -> &[u8] {
        &self.bytes
    }

    /// The same samples grouped by series, in order of first appearance; `None` if a
    /// field is not what [`TimeSeriesFields::push`] writes.
    pub(crate) fn to_series(&self) -> Option<Vec<SeriesBatch>> {
        let mut out: Vec<SeriesBatch> = Vec::new();
        let mut index: HashMap<&[u8], usize> = HashMap::new();
        for i in 0..self.len() {
            let field = &self.bytes[self.start(i)..self.ends[i] as usize];
            let (labels, sample) = split_field(field)?;
            let at = *index.entry(labels).or_insert_with(|| {
                out.push(SeriesBatch {
                    labels: labels.into(),
                    samples: Samples::default(),
                });
                out.len() - 1
            });
            out[at].samples.push(sample);
        }
        Some(out)
    }
}

/// A field [`TimeSeriesFields::push`] wrote: its labels' bytes and its one sample.
fn split_field(field: &[u8]) -> Option<(&[u8], (i64, f64))> {
    let body = &field[length_delimited(field, &mut 0, 0x0a)?];
    // The labels (field 1, repeated), then the sample (field 2).
    let mut at = 0;
    while body.get(at) == Some(&0x0a) {
        length_delimited(body, &mut at, 0x0a)?;
    }
    let labels = &body[..at];
    let sample = &body[length_delimited(body, &mut at, 0x12)?];
    let (mut ts, mut value) = (0i64, 0f64);
    let mut p = 0;
    while p < sample.len() {
        match sample[p] {
            0x09 => {
                let bits: [u8; 8] = sample.get(p + 1..p + 9)?.try_into().ok()?;
                value = f64::from_bits(u64::from_le_bytes(bits));
                p += 9;
            }
            0x10 => {
                p += 1;
                ts = get_varint(sample, &mut p)? as i64;
            }
            _ => return None,
        }
    }
    Some((labels, (ts, value)))
}

/// The samples of one request, in one of the two forms a shard reads them in.
#[derive(Debug, PartialEq)]
pub(crate) enum Payload {
    /// Grouped by series: read back from the database, for either message.
    Series(Vec<SeriesBatch>),
    /// In request form already (from the queue's tail in memory); 1.0 only.
    Fields(TimeSeriesFields),
}

impl Payload {
    /// The samples it carries.
    pub(crate) fn samples(&self) -> u64 {
        match self {
            Payload::Series(series) => series.iter().map(|s| s.samples.len() as u64).sum(),
            Payload::Fields(fields) => fields.len() as u64,
        }
    }

    /// The units a refused request is split into: series, or fields.
    pub(crate) fn parts(&self) -> usize {
        match self {
            Payload::Series(series) => series.len(),
            Payload::Fields(fields) => fields.len(),
        }
    }

    /// Grouped by series: a refused request is split by series, so that one bad
    /// series with several samples is isolated once, not once per sample.
    pub(crate) fn grouped(self) -> Payload {
        match self {
            Payload::Fields(fields) => match fields.to_series() {
                Some(series) => Payload::Series(series),
                None => Payload::Fields(fields),
            },
            series => series,
        }
    }

    /// Splits off the parts from `at` on.
    pub(crate) fn split_off(&mut self, at: usize) -> Payload {
        match self {
            Payload::Series(series) => Payload::Series(series.split_off(at)),
            Payload::Fields(fields) => Payload::Fields(fields.split_off(at)),
        }
    }

    /// The compressed body and the message it is. Fields are always 1.0: they are made
    /// only while the endpoint speaks 1.0, and a 2.0 endpoint never goes back to it.
    pub(crate) fn encode(
        &self,
        message: ProtobufMessage,
    ) -> Result<(Vec<u8>, ProtobufMessage), EncodeError> {
        match (self, message) {
            (Payload::Series(series), ProtobufMessage::WriteRequestV1) => {
                Ok((encode_v1(series)?, message))
            }
            (Payload::Series(series), ProtobufMessage::RequestV2) => {
                Ok((encode_v2(series)?, message))
            }
            (Payload::Fields(fields), _) => Ok((
                compress(fields.write_request())?,
                ProtobufMessage::WriteRequestV1,
            )),
        }
    }
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

    #[test]
    fn fields_are_the_request_of_one_sample_per_series_and_split_anywhere() {
        let series: Vec<SeriesBatch> = (0..7)
            .map(|i| {
                batch(
                    &[("__name__", "up"), ("instance", &format!("t{i}"))],
                    &[(1000 + i, i as f64 - 3.0)],
                )
            })
            .collect();
        let mut fields = TimeSeriesFields::default();
        for s in &series {
            let &(ts, value) = s.samples.iter().next().unwrap();
            fields.push(&s.labels, ts, value);
        }
        assert_eq!(fields.write_request(), write_request_v1(&series));
        for at in 0..=series.len() {
            let mut left = Payload::Fields(fields.clone());
            let right = left.split_off(at);
            let (Payload::Fields(l), Payload::Fields(r)) = (&left, &right) else {
                unreachable!()
            };
            assert_eq!(l.write_request(), write_request_v1(&series[..at]));
            assert_eq!(r.write_request(), write_request_v1(&series[at..]));
            assert_eq!(left.samples() + right.samples(), 7);
        }
        let mut some = TimeSeriesFields::default();
        some.extend_from(&fields, 2..4);
        some.extend_from(&fields, 5..7);
        let want: Vec<SeriesBatch> = [&series[2..4], &series[5..7]].concat();
        assert_eq!(some.write_request(), write_request_v1(&want));
        let mut twice = fields.clone();
        twice.extend_from(&fields, 0..7);
        let Payload::Series(grouped) = Payload::Fields(twice).grouped() else {
            panic!("fields our own push wrote are grouped")
        };
        assert_eq!(grouped.len(), 7);
        for (g, s) in grouped.iter().zip(&series) {
            assert_eq!(g.labels, s.labels);
            let one = *s.samples.iter().next().unwrap();
            assert_eq!(g.samples.iter().copied().collect::<Vec<_>>(), [one, one]);
        }
        let (body, message) = Payload::Fields(some)
            .encode(ProtobufMessage::RequestV2)
            .unwrap();
        assert_eq!(
            message,
            ProtobufMessage::WriteRequestV1,
            "fields are always 1.0"
        );
        assert_eq!(
            snap::raw::Decoder::new().decompress_vec(&body).unwrap(),
            write_request_v1(&want)
        );
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
