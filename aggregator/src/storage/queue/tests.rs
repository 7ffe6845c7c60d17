//! The queue's tests: enqueue, read, settle and reopen against an in-memory or
//! on-disk store.

use super::block;
use super::labels::sample_bytes;
use super::reader::{Batch, load_dict};
use super::*;
use crate::remote_write::config::fnv1a64;
use crate::remote_write::request;
use crate::series::Sample;
use std::collections::HashMap;
use std::collections::HashSet;
use std::time::Duration;

fn sample(name: &str, ts: i64) -> Sample {
    Sample::from_pairs(&[("__name__", name)], ts, ts as f64)
}

fn open(store: &Arc<Store>, q: &QueueConfig) -> Shared {
    Shared::open(
        "t".into(),
        "http://x/".into(),
        Vec::new(),
        q,
        ProtobufMessage::WriteRequestV1,
        store.clone(),
    )
    .unwrap()
}

type Queued = (usize, Vec<(String, String)>, i64);

/// What is queued, shard by shard in block order: (shard, labels, timestamp).
fn queued(store: &Store) -> Vec<Queued> {
    let conn = store.conn();
    let (_, dict) = load_dict(&conn, 1, None).unwrap();
    let rows: Vec<(i64, i64, i64, Vec<u8>)> = conn
        .prepare("SELECT shard, epoch, first, data FROM rw_blocks ORDER BY shard, id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = Vec::new();
    for (shard, epoch, first, data) in rows {
        let block = block::decode(&data).unwrap();
        for &(s, ts, _) in block.samples.iter().skip(first as usize) {
            let labels = &dict[&epoch][&block.series[s as usize].0];
            out.push((
                shard as usize,
                request::parse_labels_pb(labels).unwrap(),
                ts,
            ));
        }
    }
    out
}

fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn enqueue_drops_out_of_order_and_bounds_bytes() {
    let store = Arc::new(Store::in_memory().unwrap());
    let mut q = QueueConfig::default();
    let one = sample_bytes(&[("__name__", "m")]);
    q.max_queue_bytes = sonde_proto::config::ByteSize(one * 3);
    let shared = open(&store, &q);
    let m = sample("m", 0).series;
    let at = |ts: i64| Sample {
        series: m.clone(),
        timestamp_ms: ts,
        value: 1.0,
    };
    let push = |samples: Vec<Sample>| {
        store
            .transaction(|tx| shared.enqueue(tx, &samples))
            .unwrap();
    };
    push(vec![at(10), at(10), at(5)]);
    // Another Arc with the same labels shares the order check.
    push(vec![sample("m", 10)]);
    push((11..=15).map(at).collect());
    let snap = shared.snapshot();
    assert_eq!(snap.counters.dropped_out_of_order, 3);
    assert_eq!(snap.counters.dropped_queue_full, 3);
    assert_eq!(snap.queued_samples, 3);
    assert_eq!(snap.queued_bytes, one * 3);
    let ts: Vec<i64> = queued(&store).into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(ts, [13, 14, 15]);
}

#[test]
fn a_rolled_back_enqueue_leaves_nothing_behind() {
    let store = Arc::new(Store::in_memory().unwrap());
    let shared = open(&store, &QueueConfig::default());
    let (m, new) = (sample("m", 10), sample("new", 10));
    store
        .transaction(|tx| shared.enqueue(tx, std::slice::from_ref(&m)))
        .unwrap();
    let m11 = Sample {
        timestamp_ms: 11,
        ..m.clone()
    };
    let r = store.transaction(|tx| {
        shared.enqueue(tx, &[m11.clone(), new.clone()])?;
        tx.execute("INSERT INTO nonexistent VALUES (1)", [])?;
        Ok(())
    });
    assert!(r.is_err());
    assert_eq!(queued(&store).len(), 1);
    // The replay of the same samples is accepted: nothing remembered them, and the
    // new series' labels are written again (the rolled-back dictionary row is gone).
    store
        .transaction(|tx| shared.enqueue(tx, &[m11.clone(), new.clone()]))
        .unwrap();
    let mut got: Vec<(String, i64)> = queued(&store)
        .into_iter()
        .map(|(_, l, t)| (l[0].1.clone(), t))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("m".to_string(), 10),
            ("m".to_string(), 11),
            ("new".to_string(), 10)
        ]
    );
    assert_eq!(shared.snapshot().counters.dropped_out_of_order, 0);
    assert_eq!(shared.snapshot().queued_samples, 3);
}

/// A sample as a request carries it: labels, timestamp, the value's bits.
type Sent = (Vec<(String, String)>, i64, u64);

/// Every sample a batch would send, in request order.
fn batch_samples(batch: &Batch) -> Vec<Sent> {
    let body = if batch.fields.is_empty() {
        request::write_request_v1(&batch.series)
    } else {
        batch.fields.write_request().to_vec()
    };
    let request: sonde_proto::prompb::WriteRequest = prost::Message::decode(&body[..]).unwrap();
    request
        .timeseries
        .iter()
        .flat_map(|ts| {
            let labels: Vec<(String, String)> = ts
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect();
            ts.samples
                .iter()
                .map(move |s| (labels.clone(), s.timestamp, s.value.to_bits()))
        })
        .collect()
}

fn one_shard() -> QueueConfig {
    QueueConfig {
        max_shards: 1,
        ..QueueConfig::default()
    }
}

#[test]
fn a_shard_that_keeps_up_sends_from_the_tail_what_the_database_holds() {
    let store = Arc::new(Store::in_memory().unwrap());
    // One block per request: two blocks of the same series in one request would be
    // read from the database (see the next test).
    let q = QueueConfig {
        max_samples_per_send: 30,
        ..one_shard()
    };
    let shared = open(&store, &q);
    let wave = |ts: i64| -> Vec<Sample> {
        (0..30)
            .map(|i| {
                Sample::from_pairs(
                    &[
                        ("__name__", "probe_success"),
                        ("instance", &format!("t{i}")),
                    ],
                    ts,
                    if i % 3 == 0 { -0.0 } else { i as f64 / 7.0 },
                )
            })
            .collect()
    };
    store
        .transaction(|tx| shared.enqueue(tx, &wave(1000)))
        .unwrap();
    shared.wake();
    store
        .transaction(|tx| shared.enqueue(tx, &wave(0)))
        .unwrap();
    shared.wake();
    store
        .transaction(|tx| shared.enqueue(tx, &wave(2000)))
        .unwrap();
    shared.wake();
    assert_eq!(
        shared.tail.len(),
        2,
        "two blocks (the wave at 0 is out of order)"
    );

    let from_tail = shared.read_batch(0).unwrap();
    assert!(from_tail.series.is_empty() && from_tail.fields.len() == 30);
    // The same samples, read back from the database by a queue that has no tail yet.
    let from_disk = open(&store, &q).read_batch(0).unwrap();
    assert!(from_disk.fields.is_empty() && from_disk.series.len() == 30);
    assert_eq!(batch_samples(&from_tail), batch_samples(&from_disk));

    shared.settle(0, &from_tail, Tally::default()).unwrap();
    assert_eq!(shared.tail.len(), 1, "a settled block leaves the tail");
    let second = shared.read_batch(0).unwrap();
    assert_eq!(second.fields.len(), 30);
    assert!(batch_samples(&second).iter().all(|(_, ts, _)| *ts == 2000));
    shared.settle(0, &second, Tally::default()).unwrap();
    assert_eq!(shared.tail.len(), 0);
    assert_eq!(shared.read_batch(0).unwrap().scanned, 0);
}

#[test]
fn a_series_twice_in_a_request_from_the_tail_is_a_timeseries_per_sample() {
    let store = Arc::new(Store::in_memory().unwrap());
    let shared = open(&store, &one_shard());
    for ts in [1, 2] {
        store
            .transaction(|tx| shared.enqueue(tx, &[sample("a", ts), sample("b", ts)]))
            .unwrap();
        shared.wake();
    }
    let batch = shared.read_batch(0).unwrap();
    assert!(batch.series.is_empty());
    assert_eq!(batch.fields.len(), 4, "as Prometheus sends them");
    let ts: Vec<i64> = batch_samples(&batch).iter().map(|s| s.1).collect();
    assert_eq!(ts, [1, 1, 2, 2]);
    // Split by series when refused.
    let request::Payload::Series(series) = request::Payload::Fields(batch.fields).grouped() else {
        panic!("not grouped")
    };
    assert_eq!(series.len(), 2);
    assert!(series.iter().all(|s| s.samples.len() == 2));
}

#[test]
fn the_tail_holds_only_committed_blocks() {
    let store = Arc::new(Store::in_memory().unwrap());
    let shared = open(&store, &one_shard());
    let r = store.transaction(|tx| {
        shared.enqueue(tx, &[sample("gone", 1)])?;
        tx.execute("INSERT INTO nonexistent VALUES (1)", [])?;
        Ok(())
    });
    assert!(r.is_err());
    // The rolled-back block's id is the next block's: the tail must not mix them up.
    store
        .transaction(|tx| shared.enqueue(tx, &[sample("kept", 2)]))
        .unwrap();
    shared.wake();
    let batch = shared.read_batch(0).unwrap();
    let got = batch_samples(&batch);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, l(&[("__name__", "kept")]));
    assert_eq!(shared.tail.len(), 1);
}

#[test]
fn a_block_evicted_by_its_own_enqueue_never_reaches_the_tail() {
    let store = Arc::new(Store::in_memory().unwrap());
    let q = QueueConfig {
        max_shards: 1,
        max_queue_bytes: sonde_proto::config::ByteSize(1),
        ..QueueConfig::default()
    };
    let shared = open(&store, &q);
    store
        .transaction(|tx| shared.enqueue(tx, &[sample("a", 1)]))
        .unwrap();
    shared.wake();
    assert_eq!(shared.tail.len(), 0);
    assert_eq!(shared.snapshot().counters.dropped_queue_full, 1);
}

#[test]
fn the_order_check_survives_reopening_and_shards_relayout() {
    let dir = std::env::temp_dir().join(format!("sonde-rw-queue-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut q = QueueConfig {
        max_shards: 2,
        ..QueueConfig::default()
    };
    {
        let store = Arc::new(Store::open(&dir).unwrap());
        let shared = open(&store, &q);
        for t in [100, 101] {
            store
                .transaction(|tx| {
                    shared.enqueue(
                        tx,
                        &(0..20)
                            .map(|i| sample(&format!("m{i}"), t))
                            .collect::<Vec<_>>(),
                    )
                })
                .unwrap();
        }
    }
    q.max_shards = 3;
    let store = Arc::new(Store::open(&dir).unwrap());
    let shared = open(&store, &q);
    assert_eq!(shared.snapshot().queued_samples, 40);
    store
        .transaction(|tx| shared.enqueue(tx, &[sample("m1", 101), sample("m1", 102)]))
        .unwrap();
    assert_eq!(shared.snapshot().counters.dropped_out_of_order, 1);
    // Every sample sits in the shard its series hashes to for 3 shards, in order.
    let rows = queued(&store);
    assert_eq!(rows.len(), 41);
    let shards: HashSet<usize> = rows.iter().map(|(s, _, _)| *s).collect();
    assert!(shards.len() > 1, "{shards:?}");
    let mut last: HashMap<Vec<(String, String)>, i64> = HashMap::new();
    for (shard, labels, ts) in rows {
        let pb = request::labels_pb(&labels);
        assert_eq!(shard as u64, fnv1a64(&pb) % 3);
        let before = last.insert(labels, ts);
        assert!(before.is_none_or(|b| b < ts));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rows_of_the_first_format_become_blocks() {
    let store = Store::in_memory().unwrap();
    store
        .conn()
        .execute_batch(
            r#"
            CREATE TABLE rw_endpoints (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                url TEXT NOT NULL, shards INTEGER NOT NULL,
                queued_samples INTEGER NOT NULL DEFAULT 0, queued_bytes INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE rw_series (endpoint INTEGER NOT NULL, id INTEGER NOT NULL,
                labels TEXT NOT NULL, last_queued_ms INTEGER NOT NULL,
                last_done_ms INTEGER NOT NULL, PRIMARY KEY (endpoint, id)) WITHOUT ROWID;
            CREATE TABLE rw_queue (endpoint INTEGER NOT NULL, shard INTEGER NOT NULL,
                seq INTEGER NOT NULL, series INTEGER NOT NULL, ts INTEGER NOT NULL,
                bits INTEGER NOT NULL, bytes INTEGER NOT NULL,
                PRIMARY KEY (endpoint, shard, seq)) WITHOUT ROWID;
            INSERT INTO rw_endpoints VALUES (1, 't', 'http://x/', 4, 3, 78);
            INSERT INTO rw_series VALUES (1, 0, '[["__name__","a"]]', 2, 0);
            INSERT INTO rw_series VALUES (1, 1, '[["__name__","b"]]', 1, 0);
            INSERT INTO rw_queue VALUES (1, 0, 1, 0, 1, 0, 26), (1, 2, 2, 1, 1, 0, 26),
                (1, 0, 3, 0, 2, 0, 26);
            "#,
        )
        .unwrap();
    let store = Arc::new(store);
    let shared = open(&store, &QueueConfig::default());
    assert_eq!(shared.snapshot().queued_samples, 3);
    assert_eq!(shared.snapshot().queued_bytes, 78);
    let rows = queued(&store);
    for (shard, labels, _) in &rows {
        assert_eq!(*shard as u64, fnv1a64(&request::labels_pb(labels)) % 4);
    }
    let mut got: Vec<(String, i64)> = rows
        .into_iter()
        .map(|(_, l, t)| (l[0].1.clone(), t))
        .collect();
    got.sort();
    assert_eq!(got, [("a".into(), 1), ("a".into(), 2), ("b".into(), 1)]);
    // Their order check came along.
    store
        .transaction(|tx| shared.enqueue(tx, &[sample("a", 2), sample("b", 2)]))
        .unwrap();
    assert_eq!(shared.snapshot().counters.dropped_out_of_order, 1);
}

fn dict_epochs(store: &Store) -> Vec<i64> {
    store
        .conn()
        .prepare("SELECT epoch FROM rw_dict ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn labels_go_once_per_epoch_and_leave_with_their_blocks() {
    let store = Arc::new(Store::in_memory().unwrap());
    let q = QueueConfig {
        max_shards: 1,
        ..QueueConfig::default()
    };
    let shared = open(&store, &q);
    let m = sample("m", 1).series;
    let at = |ts: i64| Sample {
        series: m.clone(),
        timestamp_ms: ts,
        value: 1.0,
    };
    store
        .transaction(|tx| shared.enqueue(tx, &[at(1), at(2)]))
        .unwrap();
    store
        .transaction(|tx| shared.enqueue(tx, &[at(3)]))
        .unwrap();
    assert_eq!(dict_epochs(&store), [0]);
    lock(&shared.cache).epoch_length = Duration::ZERO;
    store
        .transaction(|tx| shared.enqueue(tx, &[at(4)]))
        .unwrap();
    assert_eq!(dict_epochs(&store), [0, 1]);

    let batch = shared.read_batch(0).unwrap();
    assert_eq!(batch.series.len(), 1);
    let ts: Vec<i64> = batch.series[0].samples.iter().map(|s| s.0).collect();
    assert_eq!(ts, [1, 2, 3, 4]);
    let sent = Tally {
        sent: 4,
        ..Tally::default()
    };
    shared.settle(0, &batch, sent).unwrap();
    // Epoch 0 has no block left; the current epoch's labels stay for the enqueues.
    assert_eq!(dict_epochs(&store), [1]);
    assert!(queued(&store).is_empty());
    let snap = shared.snapshot();
    assert_eq!((snap.queued_samples, snap.queued_bytes), (0, 0));
    assert_eq!(snap.counters.sent, 4);
}

#[test]
fn a_partly_sent_block_keeps_its_cursor() {
    let store = Arc::new(Store::in_memory().unwrap());
    let q = QueueConfig {
        max_shards: 1,
        max_samples_per_send: 3,
        ..QueueConfig::default()
    };
    let shared = open(&store, &q);
    let samples: Vec<Sample> = (0..5).map(|i| sample(&format!("m{i}"), 1)).collect();
    store
        .transaction(|tx| shared.enqueue(tx, &samples))
        .unwrap();
    let sent = |n| Tally {
        sent: n,
        ..Tally::default()
    };
    // Blocks hold at most max_samples_per_send: 3 then 2.
    let first = shared.read_batch(0).unwrap();
    assert_eq!(first.scanned, 3);
    shared.settle(0, &first, sent(3)).unwrap();
    let rest = shared.read_batch(0).unwrap();
    let names: Vec<String> = rest
        .series
        .iter()
        .map(|s| request::parse_labels_pb(&s.labels).unwrap()[0].1.clone())
        .collect();
    assert_eq!(names, ["m3", "m4"]);
    // Settling the same batch twice (a retry after a lost commit) moves nothing.
    shared.settle(0, &rest, sent(2)).unwrap();
    shared.settle(0, &rest, Tally::default()).unwrap();
    assert_eq!(shared.snapshot().queued_samples, 0);
    assert_eq!(shared.read_batch(0).unwrap().scanned, 0);
}

#[test]
fn a_damaged_block_is_dropped_and_counted() {
    let store = Arc::new(Store::in_memory().unwrap());
    let q = QueueConfig {
        max_shards: 1,
        ..QueueConfig::default()
    };
    let shared = open(&store, &q);
    store
        .transaction(|tx| shared.enqueue(tx, &[sample("a", 1), sample("b", 1)]))
        .unwrap();
    store
        .conn()
        .execute("UPDATE rw_blocks SET data = x'01ff'", [])
        .unwrap();
    let batch = shared.read_batch(0).unwrap();
    assert!(batch.series.is_empty());
    assert_eq!(batch.scanned, 2);
    shared.settle(0, &batch, Tally::default()).unwrap();
    let snap = shared.snapshot();
    assert_eq!(snap.counters.dropped_damaged, 2);
    assert_eq!(snap.counters.dropped_invalid_labels, 0);
    assert_eq!((snap.queued_samples, snap.queued_bytes), (0, 0));
}
