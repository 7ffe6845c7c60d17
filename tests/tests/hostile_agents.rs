//! The aggregator against a hostile agent, an anonymous client and a stolen token, as an
//! attacker would try it: a raw `sonde.v1` client (not the agent) performs every attack
//! of DESIGN's trust model against the real `sonde-aggregator` binary, while an honest
//! real `sonde-agent` probes a target that is down. The aggregator must live, its memory
//! and log stay within the bounds docs/security.md states, the honest agent's target keep its
//! true `up`, and the counters show every refusal.

use sonde_proto::pb::{
    self, AgentMessage, AggregatorMessage, agent_message, aggregator_message,
    fleet_client::FleetClient,
};
use sonde_tests::*;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

const MIB: u64 = 1 << 20;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Starts the aggregator at `--log.level=info` (what an operator runs), with the
/// lifecycle API on. Returns (web, grpc, pid).
fn start_aggregator_info(scene: &mut Scene, config: &str) -> (String, String, u32) {
    let web_port = free_port();
    let grpc_port = free_port();
    let config_path = scene.dir().write("aggregator.yml", config);
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .arg(format!("--grpc.listen-address=127.0.0.1:{grpc_port}"))
        .arg(format!(
            "--storage.path={}",
            scene.dir().join("aggregator-data").display()
        ))
        .arg("--log.level=info");
    scene.spawn("aggregator", cmd);
    let web = format!("http://127.0.0.1:{web_port}");
    scene.wait_until("aggregator /-/healthy", Duration::from_secs(60), || {
        http_get_ok(&format!("{web}/-/healthy")).map(drop)
    });
    let pid = scene.process("aggregator").pid();
    (web, format!("http://127.0.0.1:{grpc_port}"), pid)
}

/// (VmRSS, VmHWM) of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("{name} not in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A raw stream, as an attacker holds it.
struct RawStream {
    tx: mpsc::Sender<AgentMessage>,
    inbound: Streaming<AggregatorMessage>,
}

fn hello(id: &str, labels: &[(&str, &str)]) -> pb::Hello {
    pb::Hello {
        protocol_version: sonde_proto::PROTOCOL_VERSION,
        agent_id: id.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        version: "mallory".into(),
        local_jobs: vec![],
        last_acked_seq: 0,
    }
}

async fn open(grpc: &str, token: Option<&str>, hello: pb::Hello) -> Result<RawStream, Status> {
    let mut client = FleetClient::connect(grpc.to_string())
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(16);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(hello)),
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let inbound = client.session(request).await?.into_inner();
    Ok(RawStream { tx, inbound })
}

impl RawStream {
    async fn send(&self, batch: pb::ResultBatch) {
        let _ = self
            .tx
            .send(AgentMessage {
                msg: Some(agent_message::Msg::Results(batch)),
            })
            .await;
    }

    /// The next message, skipping nothing; Err(status) once the aggregator ends the stream.
    async fn next(&mut self) -> Result<Option<AggregatorMessage>, Status> {
        match tokio::time::timeout(Duration::from_secs(30), self.inbound.message()).await {
            Ok(r) => r,
            Err(_) => panic!("no message from the aggregator within 30s"),
        }
    }

    async fn assignment(&mut self) -> pb::Assignment {
        loop {
            match self.next().await {
                Ok(Some(AggregatorMessage {
                    msg: Some(aggregator_message::Msg::Assignment(a)),
                })) => return a,
                Ok(Some(_)) => continue,
                other => panic!("expected an assignment, got {other:?}"),
            }
        }
    }

    /// Waits for an ack of at least `seq`.
    async fn acked(&mut self, seq: u64) {
        loop {
            match self.next().await {
                Ok(Some(AggregatorMessage {
                    msg: Some(aggregator_message::Msg::Ack(a)),
                })) if a.acked_seq >= seq => return,
                Ok(Some(_)) => continue,
                other => panic!("expected an ack of {seq}, got {other:?}"),
            }
        }
    }

    /// Waits for the aggregator to end the stream; returns its status.
    async fn ended(&mut self) -> Status {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Status::ok("closed"),
                Err(status) => return status,
            }
        }
    }
}

fn result(
    seq: u64,
    job: &str,
    instance: &str,
    ts: i64,
    samples: Vec<pb::Sample>,
) -> pb::ProbeResult {
    pb::ProbeResult {
        seq,
        job: job.into(),
        instance: instance.into(),
        timestamp_ms: ts,
        success: true,
        duration_seconds: 0.001,
        samples,
        generation: 1,
        failure: String::new(),
        trace: None,
    }
}

fn sample(name: u32, labels: Vec<u32>) -> pb::Sample {
    pb::Sample {
        name,
        labels,
        value: 1.0,
    }
}

/// Refusals counted on the aggregator's `/metrics` for `agent` and `reason`.
fn refused(web: &str, agent: &str, reason: &str) -> f64 {
    metric_sum(
        web,
        "sonde_results_refused_total",
        &[("agent", agent), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// `/metrics`, however large (the harness's HTTP client stops at 10 MB).
fn curl_metrics(web: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "300"])
        .arg(format!("{web}/metrics"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 exposition")
}

/// Every sample line of an exposition whose labels name one label twice.
fn lines_with_repeated_labels(text: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(open) = line.find('{') else { continue };
        let mut names = Vec::new();
        let mut in_value = false;
        let mut escaped = false;
        let mut name = String::new();
        for c in line[open + 1..].chars() {
            if in_value {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_value = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '=' => names.push(std::mem::take(&mut name)),
                '"' => in_value = true,
                ',' => {}
                '}' => break,
                c => name.push(c),
            }
        }
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != names.len() {
            bad.push(line.to_string());
        }
    }
    bad
}

fn config(closed: u16, open_port: u16, tokens: &str, extra_fleet: &str) -> String {
    format!(
        r#"
global: {{scrape_interval: 2s, scrape_timeout: 1s}}
modules:
  tcp: {{prober: tcp}}
jobs:
  - job_name: eu_web
    module: tcp
    agents: {{region: eu}}
    static_configs: [{{targets: ["127.0.0.1:{closed}"], labels: {{team: shop}}}}]
  - job_name: us_web
    module: tcp
    agents: {{region: us}}
    static_configs: [{{targets: ["127.0.0.1:{open_port}"]}}]
fleet:
  missing_after: 10s
  auth:
    tokens:
{tokens}
{extra_fleet}
"#
    )
}

#[test]
fn a_hostile_agent_cannot_move_another_target_nor_exhaust_the_aggregator() {
    let mut scene = Scene::new("hostile-agents");
    let closed = free_port();
    let open_port = accepting_tcp_port();
    let honest_token = scene.dir().write("honest.token", "honest-secret\n");
    let mallory_token = scene.dir().write("mallory.token", "mallory-secret\n");
    let tokens = format!(
        "      - {{agent: honest, token_file: {}, labels: {{region: eu}}}}\n      - {{agent: mallory, token_file: {}, labels: {{region: us}}}}",
        honest_token.display(),
        mallory_token.display()
    );
    let aggregator_config = config(closed, open_port, &tokens, "");
    let (web, grpc, pid) = start_aggregator_info(&mut scene, &aggregator_config);
    start_agent(
        &mut scene,
        "honest",
        &format!(
            "agent: {{id: honest, labels: {{region: eu}}}}\naggregators: [{{address: \"{grpc}\", token_file: {}}}]\n",
            honest_token.display()
        ),
    );
    // The honest agent sees the truth: the eu target is down.
    scene.wait_until(
        "up{job=eu_web} == 0",
        Duration::from_secs(60),
        || match metric_sum(&web, "up", &[("job", "eu_web")])? {
            0.0 => Ok(()),
            v => Err(format!("up is {v}")),
        },
    );
    let (rss_before, _) = memory(pid);
    let log_before = scene.process("aggregator").log().len();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // 1. Anonymous and wrong-token clients, each with a 3.5 MB Hello: refused from the
    // headers alone, the Hello never read, the refusals logged at a bounded rate.
    let huge_id = "A".repeat(3_500_000);
    rt.block_on(async {
        for i in 0..100 {
            let token = (i % 2 == 0).then_some("not-a-token");
            let e = open(&grpc, token, hello(&huge_id, &[]))
                .await
                .err()
                .expect("refused");
            assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        }
    });
    let refused_connections = metric_sum(&web, "sonde_agents_refused_total", &[]).unwrap();
    assert!(refused_connections >= 100.0, "{refused_connections}");
    let log = scene.process("aggregator").log();
    let log_growth = log.len() - log_before;
    let per_connection = log_growth as f64 / 100.0;
    println!(
        "log bytes for 100 refused 3.5 MB Hellos: {log_growth} ({per_connection:.1} per connection)"
    );
    assert!(
        log_growth < 4096,
        "100 refused connections wrote {log_growth} bytes of log"
    );
    assert!(
        log.lines().all(|l| l.len() < 2048),
        "a log line is too long"
    );

    // 2. A stolen token: the Hello cannot claim another id, nor another region.
    rt.block_on(async {
        let e = open(
            &grpc,
            Some("mallory-secret"),
            hello("honest", &[("region", "eu")]),
        )
        .await
        .err()
        .expect("refused");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = open(
            &grpc,
            Some("mallory-secret"),
            hello("mallory", &[("region", "eu")]),
        )
        .await
        .err()
        .expect("refused");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    });

    // 3. Mallory as the token allows: it receives only its own region's checks.
    rt.block_on(async {
        let mut s = open(&grpc, Some("mallory-secret"), hello("mallory", &[]))
            .await
            .expect("mallory connects with its own id");
        let a = s.assignment().await;
        let jobs: Vec<&str> = a.checks.iter().map(|c| c.job.as_str()).collect();
        assert_eq!(jobs, ["us_web"], "a us token gets the us jobs only");

        let eu = format!("127.0.0.1:{closed}");
        let us = format!("127.0.0.1:{open_port}");
        let mb = "M".repeat(1 << 20);
        let symbols = vec![
            "probe_success".to_string(), // 0
            "up".into(),                 // 1
            "job".into(),                // 2
            "x".into(),                  // 3
            "instance".into(),           // 4
            "team".into(),               // 5
            mb,                          // 6: a 1 MB string
            "phase".into(),              // 7
        ];
        let day = 86_400_000;
        let batch = pb::ResultBatch {
            new_symbols: symbols,
            results: vec![
                // Success for a target assigned to someone else.
                result(1, "eu_web", &eu, now_ms(), vec![sample(0, vec![])]),
                // Its own target, stamped a day ahead to stay fresh forever.
                result(2, "us_web", &us, now_ms() + day, vec![sample(0, vec![])]),
                // A metric the probers never produce, and reserved labels.
                result(
                    3,
                    "us_web",
                    &us,
                    now_ms(),
                    vec![
                        sample(1, vec![]),
                        sample(0, vec![2, 3, 4, 3]),
                        sample(0, vec![5, 3]),
                    ],
                ),
                // One 1 MB string referred to 2,000 times.
                result(
                    4,
                    "us_web",
                    &us,
                    now_ms() + 1,
                    (0..200).map(|_| sample(0, vec![7, 6])).collect(),
                ),
            ],
        };
        s.send(batch).await;
        s.acked(4).await;
        for seq in 5..=14 {
            let r = result(
                seq,
                "us_web",
                &us,
                now_ms() + seq as i64,
                (0..200).map(|_| sample(0, vec![7, 6])).collect(),
            );
            s.send(pb::ResultBatch {
                new_symbols: vec![],
                results: vec![r],
            })
            .await;
        }
        s.acked(14).await;

        // A sequence number the store cannot hold ends the stream.
        s.send(pb::ResultBatch {
            new_symbols: vec![],
            results: vec![result(1 << 63, "us_web", &us, now_ms(), vec![])],
        })
        .await;
        let e = s.ended().await;
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

        // Filling the symbol table: the stream ends at its byte bound.
        let mut s = open(&grpc, Some("mallory-secret"), hello("mallory", &[]))
            .await
            .unwrap();
        s.assignment().await;
        let big = "S".repeat(16 << 10);
        let mut status = None;
        for round in 0..100 {
            let chunk: Vec<String> = (0..200)
                .map(|i| format!("{round}-{i}-{big}")[..16 << 10].to_string())
                .collect();
            s.send(pb::ResultBatch {
                new_symbols: chunk,
                results: vec![],
            })
            .await;
            match tokio::time::timeout(Duration::from_millis(300), s.inbound.message()).await {
                Ok(Err(e)) => {
                    status = Some(e);
                    break;
                }
                Ok(Ok(None)) => panic!("the stream closed without a status"),
                Ok(Ok(Some(_))) | Err(_) => {}
            }
        }
        let status = status.expect("the stream ends before 100 × 3.2 MB of symbols");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("symbol table is full"),
            "{status:?}"
        );
    });

    // The honest view stands; the attacks are counted.
    scene.hold_for(
        "up{job=eu_web} stays 0",
        Duration::from_secs(5),
        || match metric_sum(&web, "up", &[("job", "eu_web")])? {
            0.0 => Ok(()),
            v => Err(format!("up is {v}")),
        },
    );
    for reason in [
        "unassigned",
        "future_timestamp",
        "unknown_metric",
        "reserved_label",
        "symbol_too_long",
        "malformed",
    ] {
        assert!(
            refused(&web, "mallory", reason) >= 1.0,
            "sonde_results_refused_total{{agent=mallory,reason={reason}}}"
        );
    }
    assert!(refused(&web, "mallory", "symbol_too_long") >= 2000.0);
    let metrics = http_get_ok(&format!("{web}/metrics")).unwrap();
    let repeated = lines_with_repeated_labels(&metrics);
    assert!(
        repeated.is_empty(),
        "/metrics repeats a label: {repeated:?}"
    );
    assert!(
        !metrics.contains("MMMMMMMM"),
        "the 1 MB string reached /metrics"
    );
    // The future-stamped result does not keep us_web fresh: with its honest results
    // gone stale (2 × 2s + 1s), us_web is missing, not up.
    scene.wait_until(
        "us_web is not up",
        Duration::from_secs(30),
        || match metric_sum(&web, "up", &[("job", "us_web")]) {
            Err(_) => Ok(()),
            Ok(v) => Err(format!("up is {v}")),
        },
    );

    let (rss_after, hwm) = memory(pid);
    println!(
        "aggregator RSS before the attacks {} MiB, after {} MiB, peak {} MiB",
        rss_before / MIB,
        rss_after / MIB,
        hwm / MIB
    );
    assert!(
        hwm < rss_before + 96 * MIB,
        "the attacks raised the aggregator's peak memory from {} to {} MiB",
        rss_before / MIB,
        hwm / MIB
    );

    // 4. The token is revoked: mallory's stream ends within seconds of the reload.
    rt.block_on(async {
        let mut s = open(&grpc, Some("mallory-secret"), hello("mallory", &[]))
            .await
            .unwrap();
        s.assignment().await;
        let honest_only = format!(
            "      - {{agent: honest, token_file: {}, labels: {{region: eu}}}}",
            honest_token.display()
        );
        scene.dir().write(
            "aggregator.yml",
            &config(closed, open_port, &honest_only, ""),
        );
        let kill = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let start = std::time::Instant::now();
        let status = s.ended().await;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        let e = open(&grpc, Some("mallory-secret"), hello("mallory", &[]))
            .await
            .err()
            .expect("the revoked token is refused");
        assert_eq!(e.code(), Code::Unauthenticated);
    });

    // The aggregator lives and the honest agent is still connected and right.
    scene.check_running().unwrap();
    assert_eq!(
        metric_sum(&web, "sonde_agent_up", &[("agent", "honest")]).unwrap(),
        1.0
    );
    assert_eq!(metric_sum(&web, "up", &[("job", "eu_web")]).unwrap(), 0.0);
    let skew = metric_sum(
        &web,
        "sonde_agent_clock_skew_seconds",
        &[("agent", "honest")],
    )
    .unwrap();
    assert!(skew.abs() < 5.0, "the honest agent's clock skew is {skew}s");
}

#[test]
fn an_anonymous_aggregator_on_a_public_address_refuses_to_start() {
    let scene = Scene::new("hostile-anonymous");
    let config = scene.dir().write("aggregator.yml", "jobs: []\n");
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{}", free_port()))
        // Never bound: the check runs before the listeners open.
        .arg("--grpc.listen-address=0.0.0.0:1")
        .arg(format!(
            "--storage.path={}",
            scene.dir().join("data").display()
        ));
    let out = run(cmd, scene.dir().path(), Duration::from_secs(30));
    assert!(!out.status.success());
    let text = out.combined();
    assert!(text.contains("fleet.auth"), "{text}");
    assert!(text.contains("allow_anonymous"), "{text}");
}

/// The most one agent can make the aggregator hold with the default `fleet.limits`:
/// `max_series` live series of its local jobs (the bound on what an agent declares
/// itself) with `max_labels_per_sample` labels each (tiny ones, so that
/// `max_series_bytes` does not stop them first), sent in batches of
/// `max_samples_per_batch`; then the same with label values that fill
/// `max_sample_label_bytes` (stopped by `max_series_bytes`); on a stream whose symbol
/// table is full; with `/metrics` scraped meanwhile. The figure in docs/security.md comes from
/// this test's output.
#[test]
fn one_agent_at_the_default_limits_costs_bounded_memory() {
    let mut scene = Scene::new("hostile-worst-case");
    let token = scene.dir().write("mallory.token", "mallory-secret\n");
    let targets: Vec<String> = (0..1000)
        .map(|i| format!("\"127.0.0.1:{}\"", 20000 + i))
        .collect();
    let config = format!(
        "global: {{scrape_interval: 60s, scrape_timeout: 10s}}\nmodules: {{tcp: {{prober: tcp}}}}\njobs:\n  - job_name: big\n    module: tcp\n    static_configs: [{{targets: [{}]}}]\nfleet:\n  auth: {{tokens: [{{agent: mallory, token_file: {}}}]}}\n",
        targets.join(", "),
        token.display()
    );
    let (web, grpc, pid) = start_aggregator_info(&mut scene, &config);
    std::thread::sleep(Duration::from_secs(2));
    let (rss_before, _) = memory(pid);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let labels_per_sample = 8u32;
    let samples_per_result = 256usize;
    let results_per_batch = 10_000 / samples_per_result;
    rt.block_on(async {
        let mut h = hello("mallory", &[]);
        h.local_jobs = vec!["mine".into()];
        let mut s = open(&grpc, Some("mallory-secret"), h).await.unwrap();
        let assignment = s.assignment().await;
        assert_eq!(assignment.checks.len(), 1000);
        let local: Vec<String> = (0..1000).map(|i| format!("target-{i}")).collect();
        // Symbols: the metric; 8 one-letter label names; one one-letter value; 8
        // values of 500 bytes (4 KiB of labels a sample).
        let n = labels_per_sample;
        let mut symbols = vec!["probe_http_duration_seconds".to_string()];
        symbols.extend((0..n).map(|i| char::from(b'a' + i as u8).to_string()));
        symbols.push("x".into());
        symbols.extend((0..n).map(|i| format!("{i:0>500}")));
        let tiny: Vec<u32> = (0..n).flat_map(|i| [1 + i, 1 + n]).collect();
        let heavy: Vec<u32> = (0..n).flat_map(|i| [1 + i, 2 + n + i]).collect();
        let mut first = Some(symbols);
        let mut seq = 0;
        for labels in [tiny, heavy] {
            let now = now_ms();
            for chunk in local.chunks(results_per_batch) {
                let results = chunk
                    .iter()
                    .map(|instance| {
                        seq += 1;
                        let samples = (0..samples_per_result)
                            .map(|_| sample(0, labels.clone()))
                            .collect();
                        result(seq, "mine", instance, now, samples)
                    })
                    .collect();
                s.send(pb::ResultBatch {
                    new_symbols: first.take().unwrap_or_default(),
                    results,
                })
                .await;
            }
            s.acked(seq).await;
            // A scrape of /metrics, as Prometheus would make one, timed.
            let started = std::time::Instant::now();
            let size = curl_metrics(&web).len() as u64;
            println!("/metrics: {} MiB in {:?}", size / MIB, started.elapsed());
        }
        // And a full symbol table on top, held for as long as the stream lives.
        let big = "S".repeat(16 << 10);
        for round in 0..10 {
            let chunk: Vec<String> = (0..100)
                .map(|i| format!("{round}-{i}-{big}")[..16 << 10].to_string())
                .collect();
            s.send(pb::ResultBatch {
                new_symbols: chunk,
                results: vec![],
            })
            .await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let metrics = curl_metrics(&web);
        let series_refused: f64 = find_samples(
            &parse_metrics(&metrics),
            "sonde_results_refused_total",
            &[("agent", "mallory"), ("reason", "series_limit")],
        )
        .iter()
        .map(|s| s.value)
        .sum();
        let (rss, hwm) = memory(pid);
        println!(
            "one agent at the default limits: RSS {} MiB → {} MiB (+{} MiB held), peak {} MiB (+{} MiB); {} results refused at max_series",
            rss_before / MIB,
            rss / MIB,
            rss.saturating_sub(rss_before) / MIB,
            hwm / MIB,
            hwm.saturating_sub(rss_before) / MIB,
            series_refused
        );
        assert!(series_refused >= 1.0, "max_series was reached");
        assert!(
            hwm.saturating_sub(rss_before) < 256 * MIB,
            "one agent raised the peak by {} MiB",
            hwm.saturating_sub(rss_before) / MIB
        );
        drop(s);
    });
    scene.check_running().unwrap();
}

/// The aggregator with a token for `honest` and one for `mallory`, no job of its own.
/// Returns (web, grpc, pid, honest's token file).
fn start_with_two_tokens(scene: &mut Scene, extra_fleet: &str) -> (String, String, u32, String) {
    let honest = scene.dir().write("honest.token", "honest-secret\n");
    let mallory = scene.dir().write("mallory.token", "mallory-secret\n");
    let config = format!(
        "global: {{scrape_interval: 2s, scrape_timeout: 1s}}\nfleet:\n  missing_after: 10s\n  auth:\n    tokens:\n      - {{agent: honest, token_file: {}}}\n      - {{agent: mallory, token_file: {}}}\n{extra_fleet}",
        honest.display(),
        mallory.display()
    );
    let (web, grpc, pid) = start_aggregator_info(scene, &config);
    (web, grpc, pid, honest.display().to_string())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A local job's result may not carry an instance of any length: 100 results with a
/// 1 MB instance each are refused (`instance_too_long`), and the aggregator's memory does
/// not follow them.
#[test]
fn a_local_jobs_instance_is_bounded_in_length() {
    let mut scene = Scene::new("hostile-long-instance");
    let (web, grpc, pid, _) = start_with_two_tokens(&mut scene, "");
    std::thread::sleep(Duration::from_secs(1));
    let (rss_before, _) = memory(pid);
    runtime().block_on(async {
        let mut h = hello("mallory", &[]);
        h.local_jobs = vec!["mine".into()];
        let mut s = open(&grpc, Some("mallory-secret"), h).await.unwrap();
        let symbols = vec!["probe_success".to_string()];
        let mut first = Some(symbols);
        let mut seq = 0;
        // Three 1 MB results a message (max_message_bytes is 4 MiB).
        for batch in 0..34 {
            let results = (0..3)
                .filter(|i| batch * 3 + i < 100)
                .map(|i| {
                    seq += 1;
                    let instance = format!("{}-{}", batch * 3 + i, "i".repeat(1_000_000));
                    result(seq, "mine", &instance, now_ms(), vec![sample(0, vec![])])
                })
                .collect();
            s.send(pb::ResultBatch {
                new_symbols: first.take().unwrap_or_default(),
                results,
            })
            .await;
        }
        s.acked(seq).await;
        assert_eq!(seq, 100);
    });
    let (rss, hwm) = memory(pid);
    println!(
        "100 results with a 1 MB instance: RSS {} MiB → {} MiB, peak {} MiB",
        rss_before / MIB,
        rss / MIB,
        hwm / MIB
    );
    assert_eq!(refused(&web, "mallory", "instance_too_long"), 100.0);
    assert!(
        rss.saturating_sub(rss_before) < 64 * MIB,
        "RSS grew by {} MiB",
        rss.saturating_sub(rss_before) / MIB
    );
    let (status, page) = http_get(&format!("{web}/")).unwrap();
    assert_eq!(status, 200);
    assert!(
        page.len() < (1 << 20),
        "status page of {} bytes",
        page.len()
    );
    scene.check_running().unwrap();
}

/// A local job's target belongs to the agent that declares it: mallory declaring the
/// honest agent's local job and instance, and reporting it up, gets a target of its own
/// and cannot hold the honest agent's failing target at `up 1`.
#[test]
fn another_agent_cannot_hold_up_an_agents_local_target() {
    let mut scene = Scene::new("hostile-local-job");
    let (web, grpc, _pid, honest_token) = start_with_two_tokens(&mut scene, "");
    let closed = free_port();
    let instance = format!("127.0.0.1:{closed}");
    start_agent(
        &mut scene,
        "honest",
        &format!(
            "agent: {{id: honest}}\naggregators: [{{address: \"{grpc}\", token_file: {honest_token}}}]\nmodules: {{tcp: {{prober: tcp, timeout: 1s}}}}\njobs:\n  - job_name: node\n    module: tcp\n    interval: 1s\n    static_configs: [{{targets: [\"{instance}\"]}}]\n"
        ),
    );
    let honest_up = |web: &str| {
        metric_sum(
            web,
            "up",
            &[
                ("job", "node"),
                ("instance", &instance),
                ("agent", "honest"),
            ],
        )
    };
    scene.wait_until(
        "the honest agent's local target is down",
        Duration::from_secs(60),
        || match honest_up(&web)? {
            0.0 => Ok(()),
            v => Err(format!("up is {v}")),
        },
    );
    let rt = runtime();
    let mut h = hello("mallory", &[]);
    h.local_jobs = vec!["node".into()];
    let s = rt.block_on(open(&grpc, Some("mallory-secret"), h)).unwrap();
    let mut seq = 0;
    let mut send_success = |first: bool| {
        seq += 1;
        rt.block_on(s.send(pb::ResultBatch {
            new_symbols: if first {
                vec!["probe_success".into()]
            } else {
                vec![]
            },
            results: vec![result(
                seq,
                "node",
                &instance,
                now_ms(),
                vec![sample(0, vec![])],
            )],
        }));
    };
    send_success(true);
    let all_up = |web: &str| -> Result<Vec<(String, f64)>, String> {
        let text = http_get_ok(&format!("{web}/metrics"))?;
        Ok(find_samples(
            &parse_metrics(&text),
            "up",
            &[("job", "node"), ("instance", &instance)],
        )
        .iter()
        .map(|s| (s.labels.get("agent").cloned().unwrap_or_default(), s.value))
        .collect())
    };
    // Mallory's claim is a target of its own...
    scene.wait_until(
        "mallory's own target is up",
        Duration::from_secs(30),
        || {
            send_success(false);
            let ups = all_up(&web)?;
            if ups.iter().any(|(a, v)| a == "mallory" && *v == 1.0) {
                Ok(())
            } else {
                Err(format!("{ups:?}"))
            }
        },
    );
    // ...and every other `up` of that job and instance stays the honest agent's 0.
    scene.hold_for(
        "the honest agent's target stays down",
        Duration::from_secs(5),
        || {
            send_success(false);
            let ups = all_up(&web)?;
            let others: Vec<_> = ups.iter().filter(|(a, _)| a != "mallory").collect();
            if !others.is_empty() && others.iter().all(|(a, v)| a == "honest" && *v == 0.0) {
                Ok(())
            } else {
                Err(format!("{ups:?}"))
            }
        },
    );
    drop(s);
    scene.check_running().unwrap();
}

/// Without tokens, made-up agent ids cost the aggregator only up to
/// `fleet.limits.max_agents` (1000 by default) and their local jobs up to
/// `max_anonymous_local_jobs` (1024 names): 20 ids declaring 64 made-up local jobs each
/// leave 16 of them known, then 1,100 more ids leave 1,000 known in all; the other Hellos
/// are refused, counted, and logged at the rate limit.
#[test]
fn made_up_agent_ids_are_bounded_without_tokens() {
    let mut scene = Scene::new("hostile-made-up-ids");
    let (web, grpc, pid) = start_aggregator_info(
        &mut scene,
        "global: {scrape_interval: 2s, scrape_timeout: 1s}\n",
    );
    std::thread::sleep(Duration::from_secs(1));
    let (rss_before, _) = memory(pid);
    let log_before = scene.process("aggregator").log().len();
    let started = std::time::Instant::now();
    let (refused_for_jobs, refused_for_agents) = runtime().block_on(async {
        let mut refused = [0, 0];
        let ids = (0..20)
            .map(|i| (format!("jobs-{i}"), i))
            .chain((0..1100).map(|i| (format!("made-up-{i}"), 0)));
        for (id, jobs_of) in ids {
            let mut h = hello(&id, &[]);
            h.local_jobs = (0..64).map(|j| format!("job-{jobs_of}-{j}")).collect();
            match open(&grpc, None, h).await {
                Ok(mut s) => {
                    s.assignment().await;
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    if e.message().contains("max_anonymous_local_jobs") {
                        refused[0] += 1;
                    } else {
                        assert!(e.message().contains("max_agents"), "{e:?}");
                        refused[1] += 1;
                    }
                }
            }
        }
        (refused[0], refused[1])
    });
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let (rss, hwm) = memory(pid);
    let agents = http_get_ok(&format!("{web}/api/v1/agents")).unwrap();
    let known = serde_json::from_str::<serde_json::Value>(&agents).unwrap()["data"]
        .as_array()
        .map_or(0, Vec::len);
    let jobs = http_get_ok(&format!("{web}/api/v1/jobs")).unwrap();
    let jobs = serde_json::from_str::<serde_json::Value>(&jobs).unwrap()["data"]
        .as_array()
        .map_or(0, Vec::len);
    let log = scene.process("aggregator").log();
    let refusal_lines = log[log_before..]
        .lines()
        .filter(|l| l.contains("agent refused"))
        .count();
    let (_, page) = http_get(&format!("{web}/")).unwrap();
    println!(
        "20 + 1,100 made-up ids with 64 local jobs each in {elapsed:?}: {known} agents and {jobs} jobs known, {refused_for_jobs} + {refused_for_agents} refused; RSS {} MiB → {} MiB (peak {} MiB); status page {} KiB; {refusal_lines} log lines of refusals",
        rss_before / MIB,
        rss / MIB,
        hwm / MIB,
        page.len() / 1024
    );
    assert_eq!((refused_for_jobs, refused_for_agents), (4, 116));
    assert_eq!(known, 1000);
    assert_eq!(jobs, 1024);
    assert!(
        metric_sum(&web, "sonde_agents_refused_total", &[]).unwrap() >= 120.0,
        "refused Hellos are counted"
    );
    assert!(refusal_lines <= 10, "{refusal_lines} log lines");
    scene.check_running().unwrap();
}
