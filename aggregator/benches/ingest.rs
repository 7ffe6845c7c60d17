//! Aggregator ingest throughput over the real gRPC stream on loopback.
//!
//! Starts the aggregator's servers in-process (no remote write, so this measures the
//! fleet service, decoding, dedupe, merge and series production), connects one client
//! speaking sonde.v1 like an agent, streams batches of results for 1000 targets and
//! waits for the final ack. Prints results/s and aggregator-process CPU per result.
//!
//! Run: `cargo bench -p sonde-aggregator --bench ingest`

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

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(false));
    rt.block_on(run(true));
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
