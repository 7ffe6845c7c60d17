//! Aggregator ingest throughput over the real gRPC stream on loopback.
//!
//! Starts the aggregator's servers in-process (no remote write, so this measures the
//! fleet service, decoding, dedupe, merge and series production), connects one client
//! speaking sonde.v1 like an agent, streams batches of results for 1000 targets and
//! waits for the final ack. Prints results/s and aggregator-process CPU per result.
//!
//! A second part measures the remote-write queue alone: one endpoint, samples of 8000
//! stable series enqueued in commits of 4000 (as the hub commits a batch of 500 results),
//! sent to a local receiver that only counts bytes. It prints the process CPU per sample
//! (enqueue + encode + compress + send, the receiver's share included) and the CPU of the
//! thread that enqueues (enqueue inside the transaction + commit).
//!
//! Run: `cargo bench -p sonde-aggregator --bench ingest` (`-- queue` for the queue part
//! only, `-- queue-v1` or `-- queue-v2` for one protocol, `-- ingest` for the ingest
//! part only).

use sonde_aggregator::app::App;
use sonde_aggregator::config::AggregatorConfig;
use sonde_proto::config::from_yaml_str;
use sonde_proto::pb::{
    self, AgentMessage, agent_message, aggregator_message, fleet_client::FleetClient,
};
use std::path::Path;
use std::time::{Duration, Instant};

const TARGETS: usize = 1000;
const BATCH: usize = 500;
const BATCHES: usize = 400;

/// User + system CPU of this process, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command: state is 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// User + system CPU of the calling thread, from /proc/thread-self/stat.
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    use sonde_aggregator::remote_write::ProtobufMessage;
    if wants("queue") || wants("queue-v1") {
        queue_only(&rt, ProtobufMessage::WriteRequestV1);
    }
    if wants("queue") || wants("queue-v2") {
        queue_only(&rt, ProtobufMessage::RequestV2);
    }
    if wants("ingest") {
        rt.block_on(run(false));
        rt.block_on(run(true));
    }
}

const QUEUE_SERIES: usize = 8000;
const QUEUE_COMMIT: usize = 4000;
const QUEUE_COMMITS: usize = 200;

/// A receiver that answers 204 (with the 2.0 written-headers) and counts body bytes, so
/// that its own cost stays small beside the sender's.
async fn counting_receiver() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let bytes = std::sync::Arc::new(AtomicU64::new(0));
    let counter = bytes.clone();
    let app = axum::Router::new().route(
        "/api/v1/write",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(body.len() as u64, Ordering::Relaxed);
                (
                    axum::http::StatusCode::NO_CONTENT,
                    [
                        ("X-Prometheus-Remote-Write-Samples-Written", "1"),
                        ("X-Prometheus-Remote-Write-Histograms-Written", "0"),
                        ("X-Prometheus-Remote-Write-Exemplars-Written", "0"),
                    ],
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/api/v1/write"), bytes)
}

fn queue_only(
    rt: &tokio::runtime::Runtime,
    message: sonde_aggregator::remote_write::ProtobufMessage,
) {
    use sonde_aggregator::delivery::RemoteWriter;
    use sonde_aggregator::remote_write::RemoteWriteConfig;
    let _guard = rt.enter();
    let (url, bytes) = rt.block_on(counting_receiver());
    let dir = std::env::temp_dir().join(format!("sonde-queue-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = std::sync::Arc::new(sonde_aggregator::storage::Store::open(&dir).expect("store"));
    let mut cfg = RemoteWriteConfig::new(url);
    cfg.protobuf_message = message;
    cfg.queue_config.batch_send_deadline =
        sonde_proto::config::PromDuration(Duration::from_millis(100));
    let external: sonde_proto::config::Labels = [("cluster".to_string(), "bench".to_string())]
        .into_iter()
        .collect();
    let writer = RemoteWriter::start(cfg, &external, store.clone()).expect("writer");
    let series = bench_series();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Prepared before the clock starts: what the hub hands over is not the queue's cost.
    let commits: Vec<_> = (0..QUEUE_COMMITS)
        .map(|c| {
            let first = (c * QUEUE_COMMIT) % QUEUE_SERIES;
            let round = (c * QUEUE_COMMIT / QUEUE_SERIES) as i64;
            bench_commit(&series[first..first + QUEUE_COMMIT], now + round * 1000)
        })
        .collect();
    let total = (QUEUE_COMMIT * QUEUE_COMMITS) as u64;
    let cpu0 = cpu_seconds();
    let thread0 = thread_cpu_seconds();
    let started = Instant::now();
    for samples in &commits {
        store
            .transaction(|tx| writer.enqueue(tx, samples))
            .expect("enqueue");
        writer.wake();
    }
    let enqueued = started.elapsed();
    let thread = thread_cpu_seconds() - thread0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while (writer.status().sent_samples) < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds() - cpu0;
    let status = writer.status();
    let db = std::fs::metadata(dir.join("aggregator.db")).map_or(0, |m| m.len())
        + std::fs::metadata(dir.join("aggregator.db-wal")).map_or(0, |m| m.len());
    println!(
        "queue, {}: {total} samples ({QUEUE_COMMITS} commits of {QUEUE_COMMIT}, {QUEUE_SERIES} series) \
         enqueued in {:.2}s, sent {} in {:.2}s; enqueuing thread CPU {:.2}s = {:.0} ns/sample; \
         process CPU {:.2}s = {:.0} ns/sample (receiver included); {} request bytes; database + WAL {} bytes",
        message.as_str(),
        enqueued.as_secs_f64(),
        status.sent_samples,
        elapsed.as_secs_f64(),
        thread,
        thread * 1e9 / total as f64,
        cpu,
        cpu * 1e9 / total as f64,
        bytes.load(std::sync::atomic::Ordering::Relaxed),
        db,
    );
    rt.block_on(writer.shutdown(Duration::from_secs(1)));
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Label sets like the hub's: per-agent probe series and merged ones, each an `Arc` the
/// hub would hand for every sample of the series.
fn bench_series() -> Vec<sonde_aggregator::series::Series> {
    let names = [
        "probe_success",
        "probe_duration_seconds",
        "probe_ip_protocol",
        "probe_dns_lookup_time_seconds",
        "probe_ip_addr_hash",
        "up",
        "sonde_probe_agents_up",
        "sonde_probe_agents",
    ];
    (0..QUEUE_SERIES)
        .map(|i| {
            let target = i / names.len();
            std::sync::Arc::new(sonde_aggregator::series::SeriesLabels::from_pairs(&[
                ("__name__", names[i % names.len()].to_string()),
                ("job", "bench".to_string()),
                (
                    "instance",
                    format!("http://target-{target}.example.com:8080/health"),
                ),
                ("agent", "edge-eu-west-1".to_string()),
            ]))
        })
        .collect()
}

fn bench_commit(
    series: &[sonde_aggregator::series::Series],
    ts: i64,
) -> Vec<sonde_aggregator::series::Sample> {
    series
        .iter()
        .map(|s| sonde_aggregator::series::Sample {
            series: s.clone(),
            timestamp_ms: ts,
            value: 1.0,
        })
        .collect()
}

/// A remote-write receiver on loopback that decodes every request and answers 204,
/// counting the samples it received.
async fn receiver() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let app = axum::Router::new().route(
        "/api/v1/write",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counter = counter.clone();
            async move {
                if let Ok(req) = sonde_aggregator::remote_write::decode(&body) {
                    let n: usize = req.timeseries.iter().map(|t| t.samples.len()).sum();
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/api/v1/write"), received)
}

async fn run(with_remote_write: bool) {
    let targets: Vec<String> = (0..TARGETS)
        .map(|i| format!("'127.0.0.1:{}'", 10_000 + i))
        .collect();
    let mut text = format!(
        "global: {{scrape_interval: 15s, scrape_timeout: 10s}}\nmodules:\n  tcp: {{prober: tcp}}\njobs:\n  - job_name: bench\n    module: tcp\n    static_configs: [{{targets: [{}]}}]\n",
        targets.join(", ")
    );
    let mut received = None;
    if with_remote_write {
        let (url, counter) = receiver().await;
        text.push_str(&format!(
            "remote_write:\n  - url: {url}\n    queue_config: {{batch_send_deadline: 100ms}}\n"
        ));
        received = Some(counter);
    }
    let store_dir = std::env::temp_dir().join(format!("sonde-ingest-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store_dir);
    let path = Path::new("bench.yml");
    let config = AggregatorConfig::from_file(path, from_yaml_str(path, &text).expect("yaml"))
        .expect("config");
    let app = App::start(config, None, Some(&store_dir))
        .await
        .expect("app");
    let running = sonde_aggregator::server::start(
        app,
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("servers");
    let mut client = FleetClient::connect(format!("http://{}", running.grpc_address))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(16);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(pb::Hello {
            protocol_version: sonde_proto::PROTOCOL_VERSION,
            agent_id: "bench".into(),
            labels: Default::default(),
            version: "bench".into(),
            local_jobs: vec![],
            last_acked_seq: 0,
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    // The assignment comes first.
    let first = inbound
        .message()
        .await
        .expect("assignment")
        .expect("assignment");
    assert!(matches!(
        first.msg,
        Some(aggregator_message::Msg::Assignment(_))
    ));

    let symbols = vec![
        "probe_success".to_string(),
        "probe_duration_seconds".to_string(),
        "probe_ip_protocol".to_string(),
        "probe_dns_lookup_time_seconds".to_string(),
        "probe_ip_addr_hash".to_string(),
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let total = (BATCH * BATCHES) as u64;
    let sender = tokio::spawn(async move {
        let mut seq = 0u64;
        for b in 0..BATCHES {
            let results = (0..BATCH)
                .map(|_| {
                    seq += 1;
                    let target = (seq as usize) % TARGETS;
                    pb::ProbeResult {
                        seq,
                        job: "bench".into(),
                        instance: format!("127.0.0.1:{}", 10_000 + target),
                        timestamp_ms: now + (seq / TARGETS as u64) as i64,
                        success: !seq.is_multiple_of(7),
                        duration_seconds: 0.001,
                        samples: (0..5u32)
                            .map(|name| pb::Sample {
                                name,
                                labels: vec![],
                                value: 1.0,
                            })
                            .collect(),
                        generation: 1,
                        failure: String::new(),
                        trace: None,
                    }
                })
                .collect();
            let batch = pb::ResultBatch {
                new_symbols: if b == 0 { symbols.clone() } else { vec![] },
                results,
            };
            if tx
                .send(AgentMessage {
                    msg: Some(agent_message::Msg::Results(batch)),
                })
                .await
                .is_err()
            {
                break;
            }
        }
        tx
    });
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), inbound.message()).await {
            Ok(Ok(Some(pb::AggregatorMessage {
                msg: Some(aggregator_message::Msg::Ack(ack)),
            }))) => {
                if ack.acked_seq >= total {
                    break;
                }
            }
            Ok(Ok(Some(_))) => {}
            other => panic!("stream ended before the last ack: {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds() - cpu0;
    let _tx = sender.await;
    let mode = if with_remote_write {
        "with one remote-write endpoint (durable queue)"
    } else {
        "no remote write"
    };
    println!(
        "ingest, {mode}: {total} results ({BATCHES} batches of {BATCH}, 5 samples each, {TARGETS} targets) acked in {:.2}s = {:.0} results/s; process CPU {:.2}s = {:.1} µs/result (client and receiver included)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        cpu,
        cpu * 1e6 / total as f64
    );
    if let Some(received) = received {
        // Every result makes 5 per-agent samples plus the target's 3 merged ones.
        let want = total * 8;
        let deadline = Instant::now() + Duration::from_secs(600);
        while received.load(std::sync::atomic::Ordering::Relaxed) < want
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let delivered = started.elapsed();
        let got = received.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "  delivered {got} samples (want {want} from the results, plus job and agent series) to the receiver {:.2}s after the first batch = {:.0} samples/s end to end",
            delivered.as_secs_f64(),
            got as f64 / delivered.as_secs_f64()
        );
    }
    running.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&store_dir);
}
