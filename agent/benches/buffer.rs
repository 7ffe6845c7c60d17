//! Agent buffer throughput: how many probe results per second the SQLite
//! store-and-forward buffer takes in, and hands out and forgets on acks.
//!
//! Three phases on one store in a fresh directory under the system temp dir:
//! 1. *append*: 4 threads record results as fast as they can (as probing tasks would,
//!    all at once); the clock stops when the last one is committed. The longest single
//!    `append` call is what a probing task (a tokio worker) can be held up.
//! 2. *drain*: an uplink-like loop reads the backlog in batches of 500 from disk
//!    (`pending_after`) and acks each batch, until the buffer is empty and the deletes
//!    are committed.
//! 3. *steady*: append and ack interleaved, in batches of 500, as with a connected
//!    aggregator: batches are served from the in-memory cache.
//! 4. *paced*: 4 threads append 20 000 results/s in all (far more than an agent
//!    probes) for 2 s; the latency of each `append` call is what a probing task waits
//!    when the writer keeps up.
//!
//! Each result is an HTTP probe's: 20 samples, 6 of them with a `phase` label.
//!
//! Run: `cargo bench -p sonde-agent --bench buffer` (optionally `-- 500000` results).

use sonde_agent::buffer::{Buffer, Route};
use sonde_agent::probe::Sample;
use sonde_agent::record::ProbeRecord;
use std::time::{Duration, Instant};

const PRODUCERS: u64 = 4;
const BATCH: usize = 500;

fn main() {
    let results: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let dir = std::env::temp_dir().join(format!("sonde-bench-buffer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Buffer::open(Some(&dir), &["http://aggregator:9451".into()], 1 << 30)
        .expect("open the buffer");
    let body = record(1).encode().len();
    println!(
        "{results} results of {body} bytes encoded, buffer in {}",
        dir.display()
    );

    // 1. append
    let start = Instant::now();
    let slowest: Duration = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PRODUCERS)
            .map(|_| {
                let store = store.clone();
                s.spawn(move || {
                    let mut slowest = Duration::ZERO;
                    for _ in 0..results / PRODUCERS {
                        let t = Instant::now();
                        store.append(&Route::All, record);
                        slowest = slowest.max(t.elapsed());
                    }
                    slowest
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    });
    store.flush();
    let appended = (results / PRODUCERS) * PRODUCERS;
    report("append (4 threads, committed)", appended, start.elapsed());
    println!("  longest single append call: {slowest:?}");
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len()) as f64;
    println!(
        "  on disk: agent.db {:.1} MiB + wal {:.1} MiB; the buffer counts {:.1} MiB",
        size("agent.db") / 1048576.0,
        size("agent.db-wal") / 1048576.0,
        store.stats(0).bytes as f64 / 1048576.0
    );

    // 2. drain
    let start = Instant::now();
    let mut sent = store.stats(0).acked_seq;
    let mut drained = 0u64;
    loop {
        let batch = store.pending_after(0, sent, BATCH);
        let Some(last) = batch.last() else { break };
        sent = last.seq;
        drained += batch.len() as u64;
        store.ack(0, sent);
    }
    store.flush();
    report(
        "drain (read back from disk + ack)",
        drained,
        start.elapsed(),
    );
    assert_eq!(drained, appended, "every result came back");
    assert_eq!(store.disk_rows().unwrap(), 0);

    // 3. steady
    let start = Instant::now();
    let mut steady = 0u64;
    while steady < results {
        for _ in 0..BATCH {
            store.append(&Route::All, record);
        }
        store.flush();
        let batch = store.pending_after(0, sent, BATCH);
        if let Some(last) = batch.last() {
            sent = last.seq;
            steady += batch.len() as u64;
            store.ack(0, sent);
        }
    }
    store.flush();
    report("steady (append + ack, connected)", steady, start.elapsed());

    // 4. paced
    let rate = 20_000u64;
    let start = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let store = store.clone();
                s.spawn(move || {
                    let every = Duration::from_secs(1) * PRODUCERS as u32 / rate as u32;
                    let mut latencies = Vec::new();
                    for i in 0..rate * 2 / PRODUCERS {
                        let due = start + every * i as u32 + every * p as u32 / PRODUCERS as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let t = Instant::now();
                        store.append(&Route::All, record);
                        latencies.push(t.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    store.flush();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "paced: {} results at {rate}/s over 4 threads: append call p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );

    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

fn report(what: &str, n: u64, took: Duration) {
    println!(
        "{what:<40} {n:>8} results in {:>6.2} s = {:>9.0} results/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
}

fn record(seq: u64) -> ProbeRecord {
    let mut samples = Vec::new();
    for (name, value) in [
        ("probe_success", 1.0),
        ("probe_duration_seconds", 0.0213),
        ("probe_http_status_code", 200.0),
        ("probe_http_content_length", 1256.0),
        ("probe_http_uncompressed_body_length", 1256.0),
        ("probe_http_redirects", 0.0),
        ("probe_http_ssl", 1.0),
        ("probe_http_version", 1.1),
        ("probe_ip_protocol", 4.0),
        ("probe_ip_addr_hash", 3_735_928_559.0),
        ("probe_dns_lookup_time_seconds", 0.0012),
        ("probe_failed_due_to_regex", 0.0),
        ("probe_http_last_modified_timestamp_seconds", 1.7e9),
        ("probe_ssl_earliest_cert_expiry", 1.8e9),
    ] {
        samples.push(Sample {
            name,
            labels: Vec::new(),
            value,
        });
    }
    for phase in [
        "resolve",
        "connect",
        "tls",
        "processing",
        "transfer",
        "redirect",
    ] {
        samples.push(Sample {
            name: "probe_http_duration_seconds",
            labels: vec![("phase", phase.to_string())],
            value: 0.003,
        });
    }
    ProbeRecord {
        seq,
        job: "web".into(),
        instance: "https://shop.example.com/healthz".into(),
        timestamp_ms: 1_790_000_000_000 + seq as i64,
        success: true,
        duration_seconds: 0.0213,
        samples,
        generation: 12,
        failure: None,
        trace: None,
    }
}
