//! The results of one stream as `ResultBatch`es: each metric or label name and value
//! interned once per stream, every message and the stream's symbol table kept within
//! what the aggregator accepts.

use crate::record::ProbeRecord;
use prost::Message;
use sonde_proto::assignment::cut;
use sonde_proto::pb;
use std::collections::HashMap;
use std::sync::Arc;

/// The longest symbol (label value, metric or label name) the aggregator accepts.
pub const MAX_SYMBOL_BYTES: usize = 16 << 10;
/// The aggregator's default bound on the bytes of one stream's symbol table.
pub const MAX_TABLE_BYTES: usize = 8 << 20;
/// The aggregator's bound on the number of symbols of one stream.
pub const MAX_TABLE_SYMBOLS: usize = 1 << 20;
/// What the aggregator counts for each symbol beyond its bytes (its slot and header),
/// so that both sides agree on a table's size.
pub const SYMBOL_OVERHEAD: usize = 40;
/// Samples in one batch: half the aggregator's default `max_samples_per_batch`.
pub const MAX_BATCH_SAMPLES: usize = 5_000;
/// The stream's symbol table: each metric or label name and value is sent once per
/// stream, then referred to by its index.
///
/// Symbols are cut to [`MAX_SYMBOL_BYTES`]; the table's bytes and symbols are counted
/// so that it never exceeds [`MAX_TABLE_BYTES`] or [`MAX_TABLE_SYMBOLS`] (see
/// [`Built::table_full`]).
#[derive(Default)]
pub(super) struct Symbols {
    index: HashMap<String, u32>,
    /// The bytes of every symbol in `index`, with [`SYMBOL_OVERHEAD`] each.
    pub(super) bytes: usize,
}

/// One batch, as [`Symbols::batch`] built it from a prefix of the pending results.
pub(super) struct Built {
    pub(super) batch: pb::ResultBatch,
    /// The last result handled (sent in `batch`, or dropped as oversized): the stream's
    /// new `sent_up_to`. `None` when nothing was.
    pub(super) last_seq: Option<u64>,
    /// The next result would take the symbol table past [`MAX_TABLE_BYTES`] or
    /// [`MAX_TABLE_SYMBOLS`]: end this stream and send it on a new one.
    pub(super) table_full: bool,
    /// Results that alone exceed what one message or one symbol table may hold; dropped.
    pub(super) oversized: u64,
    /// Symbols cut to [`MAX_SYMBOL_BYTES`].
    pub(super) truncated: u64,
}

/// Bytes of one length-delimited protobuf field holding `len` bytes.
fn field_len(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

impl Symbols {
    /// A batch of the longest prefix of `records` that fits in `budget` bytes and in the
    /// symbol table.
    pub(super) fn batch(&mut self, records: &[Arc<ProbeRecord>], budget: usize) -> Built {
        let mut built = Built {
            batch: pb::ResultBatch::default(),
            last_seq: None,
            table_full: false,
            oversized: 0,
            truncated: 0,
        };
        let mut size = 0;
        let mut samples = 0;
        for record in records {
            if samples > 0 && samples + record.samples.len() > MAX_BATCH_SAMPLES {
                break;
            }
            let (symbols_before, bytes_before) = (built.batch.new_symbols.len(), self.bytes);
            let table_was_empty = self.index.is_empty();
            let mut truncated = 0;
            let result = self.result(record, &mut built.batch.new_symbols, &mut truncated);
            let added: usize = built.batch.new_symbols[symbols_before..]
                .iter()
                .map(|s| field_len(s.len()))
                .sum();
            let cost = field_len(result.encoded_len()) + added;
            let table_over = self.bytes > MAX_TABLE_BYTES || self.index.len() > MAX_TABLE_SYMBOLS;
            if cost <= budget.saturating_sub(size) && !table_over {
                size += cost;
                samples += record.samples.len();
                built.truncated += truncated;
                built.last_seq = Some(record.seq);
                built.batch.results.push(result);
                continue;
            }
            // Take back what this result interned: it is not sent here.
            for symbol in built.batch.new_symbols.drain(symbols_before..) {
                self.index.remove(&symbol);
            }
            self.bytes = bytes_before;
            if cost > budget || (table_over && table_was_empty) {
                // No message or table could ever hold it.
                built.oversized += 1;
                built.last_seq = Some(record.seq);
                continue;
            }
            built.table_full = table_over;
            break;
        }
        built
    }

    fn result(
        &mut self,
        r: &ProbeRecord,
        new_symbols: &mut Vec<String>,
        truncated: &mut u64,
    ) -> pb::ProbeResult {
        let mut intern = |s: &str| -> u32 {
            let cut = cut(s, MAX_SYMBOL_BYTES);
            if cut.len() < s.len() {
                *truncated += 1;
            }
            if let Some(&i) = self.index.get(cut) {
                return i;
            }
            let i = (self.index.len()) as u32;
            self.index.insert(cut.to_string(), i);
            self.bytes += cut.len() + SYMBOL_OVERHEAD;
            new_symbols.push(cut.to_string());
            i
        };
        pb::ProbeResult {
            seq: r.seq,
            job: r.job.clone(),
            instance: r.instance.clone(),
            timestamp_ms: r.timestamp_ms,
            success: r.success,
            duration_seconds: r.duration_seconds,
            generation: r.generation,
            failure: r
                .failure
                .as_deref()
                .map(|f| cut(f, MAX_SYMBOL_BYTES).to_string())
                .unwrap_or_default(),
            samples: r
                .samples
                .iter()
                .map(|s| pb::Sample {
                    name: intern(s.name),
                    labels: s
                        .labels
                        .iter()
                        .flat_map(|(k, v)| [intern(k), intern(v)])
                        .collect(),
                    value: s.value,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::probe::Sample;
    use crate::uplink::{BATCH_BUDGET, MAX_ENCODE_BYTES};
    use sonde_proto::pb::{AgentMessage, agent_message};

    fn record_with(seq: u64, samples: Vec<Sample>) -> Arc<ProbeRecord> {
        Arc::new(ProbeRecord {
            seq,
            job: "j".into(),
            instance: "i".into(),
            timestamp_ms: 1,
            success: true,
            duration_seconds: 0.1,
            samples,
            generation: 1,
            failure: None,
        })
    }

    /// A record with `n` samples, each with a label value of `len` bytes unique to it.
    pub(in crate::uplink) fn big_record(seq: u64, n: usize, len: usize) -> Arc<ProbeRecord> {
        record_with(
            seq,
            (0..n)
                .map(|i| Sample {
                    name: "probe_ssl_last_chain_info",
                    labels: vec![("subject", format!("{seq}-{i}-{}", "x".repeat(len)))],
                    value: 1.0,
                })
                .collect(),
        )
    }

    pub(in crate::uplink) fn encoded(batch: &pb::ResultBatch) -> usize {
        AgentMessage {
            msg: Some(agent_message::Msg::Results(batch.clone())),
        }
        .encoded_len()
    }

    #[test]
    fn symbols_are_sent_once_per_stream() {
        let record = |seq| {
            record_with(
                seq,
                vec![
                    Sample {
                        name: "probe_success",
                        labels: vec![],
                        value: 1.0,
                    },
                    Sample {
                        name: "probe_http_duration_seconds",
                        labels: vec![("phase", "connect".into())],
                        value: 0.01,
                    },
                ],
            )
        };
        let mut symbols = Symbols::default();
        let first = symbols.batch(&[record(1)], BATCH_BUDGET);
        assert_eq!(
            first.batch.new_symbols,
            [
                "probe_success",
                "probe_http_duration_seconds",
                "phase",
                "connect"
            ]
        );
        assert_eq!(first.batch.results[0].samples[1].labels, [2, 3]);
        assert_eq!(first.last_seq, Some(1));
        let second = symbols.batch(&[record(2)], BATCH_BUDGET);
        assert!(second.batch.new_symbols.is_empty());
        assert_eq!(second.batch.results[0].samples[1].name, 1);
    }

    #[test]
    fn long_label_values_are_cut_to_the_symbol_limit() {
        let long = format!("{}é", "a".repeat(MAX_SYMBOL_BYTES - 1)); // é straddles the cut
        let r = record_with(
            1,
            vec![Sample {
                name: "probe_expect_info",
                labels: vec![("banner", long.clone())],
                value: 1.0,
            }],
        );
        let mut symbols = Symbols::default();
        let built = symbols.batch(&[r], BATCH_BUDGET);
        assert_eq!(built.truncated, 1);
        assert!(
            built
                .batch
                .new_symbols
                .iter()
                .all(|s| s.len() <= MAX_SYMBOL_BYTES)
        );
        assert_eq!(built.batch.new_symbols[2], "a".repeat(MAX_SYMBOL_BYTES - 1));
        assert_eq!(built.batch.results.len(), 1);
    }

    #[test]
    fn batches_stay_under_the_message_limit() {
        // 200 results of 20 distinct 10 KiB values each: ~40 MiB in all.
        let records: Vec<_> = (1..=200).map(|seq| big_record(seq, 20, 10 << 10)).collect();
        let mut symbols = Symbols::default();
        let mut rest = &records[..];
        let mut batches = 0;
        while !rest.is_empty() {
            let built = symbols.batch(rest, BATCH_BUDGET);
            assert!(
                encoded(&built.batch) <= MAX_ENCODE_BYTES,
                "{}",
                encoded(&built.batch)
            );
            assert!(!built.batch.results.is_empty());
            assert_eq!(built.oversized, 0);
            let last = built.last_seq.unwrap();
            rest = &rest[rest.iter().position(|r| r.seq == last).unwrap() + 1..];
            batches += 1;
            if built.table_full {
                symbols = Symbols::default();
            }
        }
        assert!(batches >= 10, "{batches}");
    }

    #[test]
    fn batches_stay_under_the_sample_limit() {
        let records: Vec<_> = (1..=500).map(|seq| big_record(seq, 30, 1)).collect();
        let built = Symbols::default().batch(&records, BATCH_BUDGET);
        let samples: usize = built.batch.results.iter().map(|r| r.samples.len()).sum();
        assert!(samples <= MAX_BATCH_SAMPLES, "{samples}");
        assert_eq!(built.batch.results.len(), MAX_BATCH_SAMPLES / 30);
    }

    #[test]
    fn a_full_symbol_table_ends_the_batch_and_a_new_table_takes_the_rest() {
        let mut symbols = Symbols::default();
        // Each record adds 100 KiB of new symbols; the table holds 8 MiB.
        let records: Vec<_> = (1..=100).map(|seq| big_record(seq, 10, 10 << 10)).collect();
        let mut sent = 0;
        let mut rest = &records[..];
        loop {
            let built = symbols.batch(rest, BATCH_BUDGET);
            assert!(symbols.bytes <= MAX_TABLE_BYTES);
            sent += built.batch.results.len();
            let last = built.last_seq.unwrap();
            rest = &rest[rest.iter().position(|r| r.seq == last).unwrap() + 1..];
            if built.table_full {
                break;
            }
        }
        assert!((70..=84).contains(&sent), "{sent}");
        // The stream ends; the next one starts a new table and takes the rest.
        let mut fresh = Symbols::default();
        let built = fresh.batch(rest, BATCH_BUDGET);
        assert!(!built.table_full);
        assert_eq!(built.last_seq, Some(100));
    }

    #[test]
    fn the_symbol_count_is_bounded_too() {
        let mut symbols = Symbols::default();
        // Short symbols: the count, not the bytes, fills the table.
        for i in 0..MAX_TABLE_SYMBOLS - 1 {
            symbols.index.insert(i.to_string(), i as u32);
        }
        let built = symbols.batch(&[big_record(1, 1, 1), big_record(2, 5, 1)], BATCH_BUDGET);
        assert!(built.table_full);
        assert!(symbols.index.len() <= MAX_TABLE_SYMBOLS);
    }

    #[test]
    fn a_result_no_message_could_hold_is_dropped_and_counted() {
        // 300 distinct 16 KiB values: ~4.8 MiB in one result.
        let records = [
            big_record(1, 1, 10),
            big_record(2, 300, MAX_SYMBOL_BYTES),
            big_record(3, 1, 10),
        ];
        let mut symbols = Symbols::default();
        let built = symbols.batch(&records, BATCH_BUDGET);
        assert_eq!(built.oversized, 1);
        assert_eq!(built.last_seq, Some(3));
        let seqs: Vec<_> = built.batch.results.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 3]);
        // What it interned was taken back: every symbol sent is referred to.
        assert_eq!(symbols.index.len(), built.batch.new_symbols.len());
        assert!(encoded(&built.batch) <= MAX_ENCODE_BYTES);
    }
}
