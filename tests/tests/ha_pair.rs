//! An HA pair with the real binaries: two sonde aggregators with the same config, every
//! agent streaming to both, each aggregator writing everything it receives.
//!
//! - VictoriaMetrics: both write with identical labels into one VictoriaMetrics that
//!   deduplicates with `-dedup.minScrapeInterval=1ms`, which collapses identical timestamps
//!   and never two distinct probes. One aggregator is SIGKILLed and started again on the
//!   same storage; at the end, VictoriaMetrics holds exactly one sample per probe each
//!   agent ran (its `sonde_agent_probes_total`), and each agent probed each target once
//!   per interval, not once per aggregator.
//! - Mimir/Cortex: each writes with `external_labels: {cluster: c1, __replica__: a|b}` to
//!   a receiver of the test's own that decodes every request: each request carries one
//!   replica on all its series, every series has the cluster, and the two replicas' probe
//!   samples are the same samples (labels but `__replica__`, timestamps, values).

use prost::Message;
use sonde_proto::prompb::WriteRequest;
use sonde_tests::{
    RestartableAggregator, Scene, free_port, http_get_ok, metric_sum, prometheus_single, sonde_bin,
    start_nginx, start_victoria_metrics,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);
/// The probe interval of the job: each agent should probe each target this often.
const INTERVAL: Duration = Duration::from_secs(1);

/// The aggregators' config: one HTTP job over `targets` at [`INTERVAL`], written to
/// `remote_write_url` with `external_labels`.
fn aggregator_config(targets: &[String], remote_write_url: &str, external_labels: &str) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 800ms
  external_labels: {external_labels}
modules:
  http_2xx:
    prober: http
    http: {{preferred_ip_protocol: ip4}}
jobs:
  - job_name: web
    module: http_2xx
    static_configs:
      - targets: [{}]
remote_write:
  - url: {remote_write_url}
    queue_config: {{batch_send_deadline: 500ms, min_backoff: 50ms, max_backoff: 1s}}
fleet: {{missing_after: 1m}}
"#,
        targets.join(", ")
    )
}

fn agent_config(id: &str, aggregators: &[String]) -> String {
    let mut config = format!("agent: {{id: {id}}}\nbuffer: {{max_bytes: 64MiB}}\naggregators:");
    if aggregators.is_empty() {
        config.push_str(" []\n");
    }
    for address in aggregators {
        config.push_str(&format!("\n  - address: {address}"));
    }
    config.push('\n');
    config
}

/// Ok once `agent` runs `checks` checks and its streams to `aggregators` are all open.
fn agent_running(agent: &str, aggregators: &[String], checks: f64) -> Result<(), String> {
    let running = metric_sum(agent, "sonde_agent_checks", &[])?;
    if running != checks {
        return Err(format!("sonde_agent_checks = {running}, want {checks}"));
    }
    for address in aggregators {
        let open = metric_sum(
            agent,
            "sonde_agent_stream_connected",
            &[("aggregator", address)],
        )?;
        if open != 1.0 {
            return Err(format!("the stream to {address} is not open"));
        }
    }
    Ok(())
}

/// Ok once every remote-write queue of the aggregator at `web` is empty.
fn queues_empty(web: &str) -> Result<(), String> {
    match metric_sum(web, "sonde_remote_write_queue_samples", &[])? {
        0.0 => Ok(()),
        n => Err(format!("{n} samples still queued at {web}")),
    }
}

/// Starts `sonde-agent` as process `process` with `config` and its storage in
/// `<scene>/<id>-data` (the same for every run of one agent), and returns its web base URL
/// once it is healthy.
fn start_agent_as(scene: &mut Scene, process: &str, id: &str, config: &str) -> String {
    let web_port = free_port();
    let config_path = scene.dir().write(&format!("{process}.yml"), config);
    let mut cmd = Command::new(sonde_bin("sonde-agent"));
    cmd.arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .arg(format!(
            "--storage.path={}",
            scene.dir().join(&format!("{id}-data")).display()
        ))
        .arg("--log.level=info");
    scene.spawn(process, cmd);
    let web = format!("http://127.0.0.1:{web_port}");
    scene.wait_until(&format!("{process} /-/healthy"), WAIT, || {
        http_get_ok(&format!("{web}/-/healthy")).map(drop)
    });
    web
}

/// Stops agent `id` (process `id`) with SIGTERM, which sends what it has buffered first,
/// then starts it again on the same storage with no aggregator, which probes nothing, and
/// returns its `sonde_agent_probes_total{job="web"}` per instance: every probe it ran and
/// kept. Fails if anything was still buffered at the stop (the restart without those
/// aggregators would drop it, and says so in its log).
fn probes_after_stop(scene: &mut Scene, id: &str, instances: &[String]) -> BTreeMap<String, f64> {
    scene.process(id).terminate(Duration::from_secs(30));
    let counting = format!("{id}-counting");
    let web = start_agent_as(scene, &counting, id, &agent_config(id, &[]));
    let log = scene.process(&counting).log();
    assert!(
        !log.contains("dropping buffered results"),
        "{id} stopped with results not yet acked:\n{}",
        sonde_tests::tail(&log, 20)
    );
    let probes = instances
        .iter()
        .map(|instance| {
            let labels = [("job", "web"), ("instance", instance.as_str())];
            let n = metric_sum(&web, "sonde_agent_probes_total", &labels)
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            (instance.clone(), n)
        })
        .collect();
    scene.process(&counting).terminate(Duration::from_secs(30));
    probes
}

#[test]
fn victoria_metrics_holds_one_sample_per_probe_through_a_crash_of_one_aggregator() {
    let mut scene = Scene::new("ha-vm");
    // Samples of one series less than 1 ms apart are one (two aggregators writing the
    // same probe write the same timestamp), and two probes are never that close.
    let vm = start_victoria_metrics(
        &mut scene,
        "victoria-metrics",
        &["-dedup.minScrapeInterval=1ms"],
    );
    let nginx = start_nginx(&mut scene, "nginx");
    // Three targets on one server: nginx answers `/` whatever the query string.
    let targets: Vec<String> = (1..=3)
        .map(|i| format!("http://127.0.0.1:{nginx}/?target={i}"))
        .collect();
    let config = aggregator_config(&targets, &format!("{vm}/api/v1/write"), "{cluster: c1}");
    let a = RestartableAggregator::new(&scene, "aggregator-a", &config);
    let b = RestartableAggregator::new(&scene, "aggregator-b", &config);
    a.start(&mut scene, "aggregator-a", &["--log.level=info"]);
    b.start(&mut scene, "aggregator-b", &["--log.level=info"]);
    let pair = [a.grpc(), b.grpc()];
    let agents = ["edge-1", "edge-2"];
    let started = Instant::now();
    let webs: Vec<String> = agents
        .iter()
        .map(|id| start_agent_as(&mut scene, id, id, &agent_config(id, &pair)))
        .collect();
    // Both aggregators assign the three checks; each agent runs three, not six.
    for web in &webs {
        scene.wait_until(
            &format!("{web} to run 3 checks, both streams open"),
            WAIT,
            || agent_running(web, &pair, targets.len() as f64),
        );
    }
    for agent in agents {
        let series = format!(
            r#"probe_success{{agent="{agent}",instance="{}"}}"#,
            targets[0]
        );
        scene.wait_until(
            &format!("{series} in VictoriaMetrics"),
            WAIT,
            || match prometheus_single(&vm, &series)? {
                1.0 => Ok(()),
                v => Err(format!("{series} = {v}")),
            },
        );
    }

    // ---- aggregator B crashes; the agents buffer its results meanwhile
    scene.kill("aggregator-b");
    let crashed = Instant::now();
    for web in &webs {
        scene.wait_until(&format!("{web} to buffer results for B"), WAIT, || {
            let n = metric_sum(
                web,
                "sonde_agent_buffer_results",
                &[("aggregator", &pair[1])],
            )?;
            if n >= 10.0 && crashed.elapsed() >= Duration::from_secs(5) {
                Ok(())
            } else {
                Err(format!("{n} results buffered for B"))
            }
        });
        // A lost nothing meanwhile: it still gets every result, and acks it.
        agent_running(web, &pair[..1], targets.len() as f64).expect("still running for A");
    }
    b.start(&mut scene, "aggregator-b-again", &["--log.level=info"]);
    for web in &webs {
        scene.wait_until(&format!("{web} to replay its backlog to B"), WAIT, || {
            agent_running(web, &pair, targets.len() as f64)?;
            match metric_sum(
                web,
                "sonde_agent_buffer_results",
                &[("aggregator", &pair[1])],
            )? {
                n if n < 6.0 => Ok(()),
                n => Err(format!("{n} results buffered for B")),
            }
        });
    }
    // A few more probes with both up again.
    std::thread::sleep(Duration::from_secs(3));

    // ---- stop the agents, let everything drain, compare
    let mut probes = BTreeMap::new();
    let mut elapsed = Duration::ZERO;
    for agent in agents {
        let counted = probes_after_stop(&mut scene, agent, &targets);
        elapsed = started.elapsed();
        probes.insert(agent, counted);
    }
    for web in [a.web(), b.web()] {
        scene.wait_until(
            &format!("{web}'s remote-write queues to drain"),
            WAIT,
            || queues_empty(&web),
        );
        let sent =
            metric_sum(&web, "sonde_remote_write_samples_sent_total", &[]).expect("samples sent");
        assert!(sent > 0.0, "{web} wrote nothing");
        for reason in ["http_4xx", "queue_full", "too_old"] {
            let dropped = metric_sum(
                &web,
                "sonde_remote_write_samples_dropped_total",
                &[("reason", reason)],
            )
            .unwrap_or(0.0);
            assert_eq!(dropped, 0.0, "{web} dropped samples ({reason})");
        }
    }
    // Once per interval, not once per aggregator: at most one probe per check per second
    // of the agent's life (plus the first), and not far below it.
    let most = elapsed.as_secs_f64() / INTERVAL.as_secs_f64() + 1.0;
    for (agent, counted) in &probes {
        for (instance, &n) in counted {
            assert!(
                n <= most && n >= most / 2.0,
                "{agent} probed {instance} {n} times in {elapsed:?} at a {INTERVAL:?} interval"
            );
            let query = format!(
                r#"count_over_time(probe_success{{job="web",agent="{agent}",instance="{instance}"}}[10m])"#
            );
            scene.wait_until(
                &format!("VictoriaMetrics to hold exactly {agent}'s {n} probes of {instance}"),
                Duration::from_secs(30),
                || {
                    let stored = prometheus_single(&vm, &query)?;
                    if stored == n {
                        Ok(())
                    } else {
                        Err(format!("{query} = {stored}, {agent} ran {n}"))
                    }
                },
            );
        }
    }
    eprintln!("probes per agent and target in {elapsed:?}: {probes:?}");
}

// ---------------------------------------------------------------------------------------
// The Mimir/Cortex convention, checked on the wire

/// A remote-write receiver of the test's own: keeps every request it decodes, answers 204.
struct Capture {
    url: String,
    requests: Arc<Mutex<Vec<WriteRequest>>>,
    /// What it could not take: any entry fails the test.
    errors: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the capture receiver");
        let port = listener.local_addr().expect("receiver address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (r, e) = (requests.clone(), errors.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (r, e) = (r.clone(), e.clone());
                std::thread::spawn(move || {
                    if let Err(why) = serve(conn, &r) {
                        e.lock().unwrap().push(why);
                    }
                });
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}/api/v1/write"),
            requests,
            errors,
        }
    }

    fn requests(&self) -> Vec<WriteRequest> {
        let errors = self.errors.lock().unwrap();
        assert!(errors.is_empty(), "the receiver refused: {errors:?}");
        self.requests.lock().unwrap().clone()
    }
}

/// Serves one keep-alive connection: HTTP/1.1 POSTs with a Content-Length, each body a
/// snappy (block format) protobuf `WriteRequest`. Ok when the client closes it.
fn serve(conn: TcpStream, requests: &Mutex<Vec<WriteRequest>>) -> Result<(), String> {
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut length = None;
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return if first {
                    Ok(())
                } else {
                    Err("connection closed inside the headers".into())
                };
            }
            if first && !line.starts_with("POST ") {
                return Err(format!("not a POST: {line:?}"));
            }
            first = false;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let length = length.ok_or("a request without Content-Length")?;
        let mut body = vec![0; length];
        reader.read_exact(&mut body).map_err(|e| e.to_string())?;
        let raw = snap::raw::Decoder::new()
            .decompress_vec(&body)
            .map_err(|e| format!("not snappy: {e}"))?;
        let request =
            WriteRequest::decode(&raw[..]).map_err(|e| format!("not a WriteRequest: {e}"))?;
        requests.lock().unwrap().push(request);
        writer
            .write_all(
                b"HTTP/1.1 204 No Content
Content-Length: 0

",
            )
            .map_err(|e| e.to_string())?;
    }
}

/// Labels of a series as a sorted map.
type Series = BTreeMap<String, String>;

/// Per series carrying `agent` whose name starts with `probe_`, without `__replica__`:
/// its samples as (timestamp, value bits), sorted and without repeats (a resend after a
/// crash or a retry repeats samples; the receiver keeps one).
fn probe_samples(requests: &[WriteRequest]) -> BTreeMap<Series, BTreeSet<(i64, u64)>> {
    let mut out: BTreeMap<Series, BTreeSet<(i64, u64)>> = BTreeMap::new();
    for request in requests {
        for ts in &request.timeseries {
            let labels: Series = ts
                .labels
                .iter()
                .filter(|l| l.name != "__replica__")
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect();
            let is_probe = labels
                .get("__name__")
                .is_some_and(|n| n.starts_with("probe_"));
            if !is_probe || !labels.contains_key("agent") {
                continue;
            }
            out.entry(labels)
                .or_default()
                .extend(ts.samples.iter().map(|s| (s.timestamp, s.value.to_bits())));
        }
    }
    out
}

#[test]
fn mimir_replicas_write_the_same_probe_samples_each_under_its_replica_label() {
    let mut scene = Scene::new("ha-mimir");
    let nginx = start_nginx(&mut scene, "nginx");
    let targets: Vec<String> = (1..=2)
        .map(|i| format!("http://127.0.0.1:{nginx}/?target={i}"))
        .collect();
    let captures = [Capture::start(), Capture::start()];
    let replicas = ["a", "b"];
    let aggregators: Vec<RestartableAggregator> = replicas
        .iter()
        .zip(&captures)
        .map(|(replica, capture)| {
            let config = aggregator_config(
                &targets,
                &capture.url,
                &format!("{{cluster: c1, __replica__: {replica}}}"),
            );
            RestartableAggregator::new(&scene, &format!("aggregator-{replica}"), &config)
        })
        .collect();
    for (replica, aggregator) in replicas.iter().zip(&aggregators) {
        aggregator.start(
            &mut scene,
            &format!("aggregator-{replica}"),
            &["--log.level=info"],
        );
    }
    let pair: Vec<String> = aggregators
        .iter()
        .map(RestartableAggregator::grpc)
        .collect();
    let web = start_agent_as(
        &mut scene,
        "edge-1",
        "edge-1",
        &agent_config("edge-1", &pair),
    );
    scene.wait_until("edge-1 to run 2 checks, both streams open", WAIT, || {
        agent_running(&web, &pair, targets.len() as f64)
    });
    scene.wait_until("five probes of each target", WAIT, || {
        for instance in &targets {
            let labels = [("job", "web"), ("instance", instance.as_str())];
            let n = metric_sum(&web, "sonde_agent_probes_total", &labels)?;
            if n < 5.0 {
                return Err(format!("{n} probes of {instance}"));
            }
        }
        Ok(())
    });
    // SIGTERM: the agent stops probing and sends what it has buffered to both.
    scene.process("edge-1").terminate(Duration::from_secs(30));
    for aggregator in &aggregators {
        let web = aggregator.web();
        scene.wait_until(&format!("{web}'s queue to drain"), WAIT, || {
            queues_empty(&web)
        });
    }

    let mut per_replica = Vec::new();
    for (replica, capture) in replicas.iter().zip(&captures) {
        let requests = capture.requests();
        assert!(!requests.is_empty(), "replica {replica} wrote nothing");
        for (i, request) in requests.iter().enumerate() {
            let mut seen = BTreeSet::new();
            for ts in &request.timeseries {
                let values: Vec<&str> = ts
                    .labels
                    .iter()
                    .filter(|l| l.name == "__replica__")
                    .map(|l| l.value.as_str())
                    .collect();
                assert_eq!(
                    values,
                    [*replica],
                    "request {i} to replica {replica}: a series with __replica__ {values:?}: {:?}",
                    ts.labels
                );
                seen.insert(values[0].to_string());
                assert!(
                    ts.labels
                        .iter()
                        .any(|l| l.name == "cluster" && l.value == "c1"),
                    r#"request {i} to replica {replica}: a series without cluster="c1": {:?}"#,
                    ts.labels
                );
            }
            assert!(seen.len() <= 1, "request {i} mixes replicas {seen:?}");
        }
        let samples = probe_samples(&requests);
        let success = samples
            .iter()
            .filter(|(labels, _)| labels["__name__"] == "probe_success")
            .map(|(_, s)| s.len())
            .sum::<usize>();
        assert!(
            success >= 5 * targets.len(),
            "replica {replica} got only {success} probe_success samples"
        );
        per_replica.push(samples);
    }
    let (a, b) = (&per_replica[0], &per_replica[1]);
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the replicas wrote different probe series"
    );
    for (series, samples) in a {
        assert_eq!(
            samples, &b[series],
            "the replicas wrote different samples for {series:?}"
        );
    }
}
