//! The on-disk form of a block: the samples one commit adds to one shard of one
//! endpoint, pure encoding (no I/O), decoded defensively (a damaged row is refused,
//! never a panic).
//!
//! A block names its series by id; their labels are written once per epoch in the
//! endpoint's dictionary (see the queue's module docs), so a sample costs about 11 bytes on disk.
//!
//! Layout, before compression: the series table (count, then per series its id and its
//! weight against `max_queue_bytes`), then the samples (count, then per sample its
//! series' index in the table, its timestamp as a zigzag delta from the previous
//! sample's, and its value's 8 bytes little-endian). The stored blob is one format byte
//! then the body: [`RAW`] or [`SNAPPY`] (snappy's block format).
//!
//! A dictionary row is a list of `(series id, labels)`: [`encode_dict`], [`decode_dict`].

use crate::remote_write::request::{LabelsPb, get_varint, put_varint};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes a series id or a series' address with one multiplication: keys are ours, not
/// an attacker's, and SipHash would be most of a block's per-sample cost.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        // The high half folded down: the table indexes by the low bits, and a product's
        // low bits only see the key's low bits (all zero in an aligned address).
        let h = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }
}

/// A map keyed by series id.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Format byte: the body follows as is.
pub(crate) const RAW: u8 = 1;
/// Format byte: the body follows snappy block-compressed.
pub(crate) const SNAPPY: u8 = 2;

/// A block's series and samples, in the order they were queued.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Block {
    /// `(series id, weight)`.
    pub series: Vec<(u64, u64)>,
    /// `(index into series, timestamp ms, value)`.
    pub samples: Vec<(u32, i64, f64)>,
}

impl Block {
    pub(crate) fn weight(&self, sample: usize) -> u64 {
        self.samples
            .get(sample)
            .and_then(|&(s, _, _)| self.series.get(s as usize))
            .map_or(0, |(_, w)| *w)
    }
}

/// Builds one block; a series' labels go in once however many samples it has.
#[derive(Default)]
pub(crate) struct BlockBuilder {
    /// Series id to its index in this block's table.
    index: IdMap<u32>,
    series: Vec<u8>,
    series_count: u32,
    samples: Vec<u8>,
    sample_count: u32,
    prev_ts: i64,
    /// Sum of the samples' weights.
    pub bytes: u64,
}

impl BlockBuilder {
    /// A builder sized for about `samples` samples of as many series.
    pub(crate) fn with_capacity(samples: usize) -> Self {
        Self {
            index: IdMap::with_capacity_and_hasher(samples, Default::default()),
            series: Vec::with_capacity(samples * 4),
            samples: Vec::with_capacity(samples * 11),
            ..Self::default()
        }
    }

    pub(crate) fn push(&mut self, id: u64, weight: u64, ts: i64, value: f64) {
        let next = self.series_count;
        let index = *self.index.entry(id).or_insert_with(|| {
            put_varint(&mut self.series, id);
            put_varint(&mut self.series, weight);
            self.series_count += 1;
            next
        });
        put_varint(&mut self.samples, u64::from(index));
        let delta = ts.wrapping_sub(self.prev_ts);
        put_varint(&mut self.samples, ((delta << 1) ^ (delta >> 63)) as u64);
        self.prev_ts = ts;
        self.samples
            .extend_from_slice(&value.to_bits().to_le_bytes());
        self.sample_count += 1;
        self.bytes += weight;
    }

    pub(crate) fn len(&self) -> usize {
        self.sample_count as usize
    }

    /// The blob to store, compressed when `compress`.
    pub(crate) fn finish(self, compress: bool) -> Vec<u8> {
        let mut body = Vec::with_capacity(
            self.series.len() + self.samples.len() + 10 + usize::from(!compress),
        );
        if !compress {
            body.push(RAW);
        }
        put_varint(&mut body, u64::from(self.series_count));
        body.extend_from_slice(&self.series);
        put_varint(&mut body, u64::from(self.sample_count));
        body.extend_from_slice(&self.samples);
        if !compress {
            return body;
        }
        let mut out = vec![0; 1 + snap::raw::max_compress_len(body.len())];
        out[0] = SNAPPY;
        match snap::raw::Encoder::new().compress(&body, &mut out[1..]) {
            Ok(n) => {
                out.truncate(1 + n);
                out
            }
            // Only past snappy's 4 GiB input limit, which a block never nears; stored raw.
            Err(_) => {
                let mut raw = Vec::with_capacity(body.len() + 1);
                raw.push(RAW);
                raw.extend_from_slice(&body);
                raw
            }
        }
    }
}

/// Why a stored block cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("damaged remote write queue block: {0}")]
pub(crate) struct BlockError(&'static str);

/// Bodies larger than this are refused before inflating (a block holds at most
/// `max_samples_per_send` samples, far below it).
const MAX_BODY: usize = 256 << 20;

pub(crate) fn decode(blob: &[u8]) -> Result<Block, BlockError> {
    let inflated;
    let body = match blob.split_first() {
        Some((&RAW, rest)) => rest,
        Some((&SNAPPY, rest)) => {
            let len = snap::raw::decompress_len(rest).map_err(|_| BlockError("bad snappy"))?;
            if len > MAX_BODY {
                return Err(BlockError("inflates too large"));
            }
            inflated = snap::raw::Decoder::new()
                .decompress_vec(rest)
                .map_err(|_| BlockError("bad snappy"))?;
            &inflated[..]
        }
        _ => return Err(BlockError("unknown format")),
    };
    let mut pos = 0;
    let short = || BlockError("truncated");
    let series_count = get_varint(body, &mut pos).ok_or_else(short)? as usize;
    // Every series takes at least two bytes: a count that exceeds that is damage.
    if series_count > body.len() / 2 {
        return Err(BlockError("series count past the end"));
    }
    let mut series = Vec::with_capacity(series_count);
    for _ in 0..series_count {
        let id = get_varint(body, &mut pos).ok_or_else(short)?;
        let weight = get_varint(body, &mut pos).ok_or_else(short)?;
        series.push((id, weight));
    }
    let sample_count = get_varint(body, &mut pos).ok_or_else(short)? as usize;
    if sample_count > body.len() / 10 {
        return Err(BlockError("sample count past the end"));
    }
    let mut samples = Vec::with_capacity(sample_count);
    let mut ts = 0i64;
    for _ in 0..sample_count {
        let index = get_varint(body, &mut pos).ok_or_else(short)?;
        if index >= series.len() as u64 {
            return Err(BlockError("sample of an unknown series"));
        }
        let zigzag = get_varint(body, &mut pos).ok_or_else(short)?;
        ts = ts.wrapping_add(((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64));
        let bits = body.get(pos..pos + 8).ok_or_else(short)?;
        pos += 8;
        let value = f64::from_bits(u64::from_le_bytes(bits.try_into().map_err(|_| short())?));
        samples.push((index as u32, ts, value));
    }
    if pos != body.len() {
        return Err(BlockError("trailing bytes"));
    }
    Ok(Block { series, samples })
}

/// A dictionary row: `(series id, labels)` pairs.
pub(crate) fn encode_dict(entries: &[(u64, LabelsPb)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, labels) in entries {
        put_varint(&mut out, *id);
        put_varint(&mut out, labels.len() as u64);
        out.extend_from_slice(labels);
    }
    out
}

pub(crate) fn decode_dict(blob: &[u8]) -> Result<Vec<(u64, LabelsPb)>, BlockError> {
    let mut out = Vec::new();
    let mut pos = 0;
    let short = || BlockError("truncated dictionary");
    while pos < blob.len() {
        let id = get_varint(blob, &mut pos).ok_or_else(short)?;
        let len = get_varint(blob, &mut pos).ok_or_else(short)? as usize;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= blob.len())
            .ok_or_else(short)?;
        out.push((id, blob[pos..end].into()));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    #[test]
    fn round_trips_raw_and_compressed() {
        let (a, b) = (7u64, 300u64);
        for compress in [false, true] {
            let mut builder = BlockBuilder::default();
            builder.push(a, 30, 1000, 1.0);
            builder.push(
                b,
                20,
                999,
                f64::from_bits(crate::remote_write::STALE_NAN_BITS),
            );
            builder.push(a, 30, i64::MIN, -0.0);
            builder.push(a, 30, i64::MAX, 2.5);
            assert_eq!(builder.bytes, 110);
            let blob = builder.finish(compress);
            let block = decode(&blob).unwrap();
            assert_eq!(block.series, vec![(a, 30), (b, 20)]);
            let got: Vec<(u32, i64, u64)> = block
                .samples
                .iter()
                .map(|&(s, t, v)| (s, t, v.to_bits()))
                .collect();
            assert_eq!(
                got,
                vec![
                    (0, 1000, 1.0f64.to_bits()),
                    (1, 999, crate::remote_write::STALE_NAN_BITS),
                    (0, i64::MIN, (-0.0f64).to_bits()),
                    (0, i64::MAX, 2.5f64.to_bits()),
                ]
            );
            assert_eq!(block.weight(1), 20);
        }
    }

    #[test]
    fn damage_is_refused() {
        let mut builder = BlockBuilder::default();
        builder.push(1, 1, 5, 1.0);
        let blob = builder.finish(false);
        for cut in 0..blob.len() {
            assert!(decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = blob.clone();
        extra.push(0);
        assert!(decode(&extra).is_err());
        assert!(decode(&[9, 0, 0]).is_err());
    }

    #[test]
    fn dictionary_round_trips_and_refuses_damage() {
        let entries: Vec<(u64, LabelsPb)> =
            vec![(1, Arc::from(&b"abc"[..])), (1 << 40, Arc::from(&b""[..]))];
        let blob = encode_dict(&entries);
        assert_eq!(decode_dict(&blob).unwrap(), entries);
        assert!(decode_dict(&blob[..blob.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn hostile_blobs_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let mut snappy = vec![SNAPPY];
            snappy.extend(snap::raw::Encoder::new().compress_vec(&bytes).unwrap());
            let _ = decode(&snappy);
            let _ = decode_dict(&bytes);
        }
    }
}
