//! The delivery guarantee, with real processes and real SIGKILLs: every probe a
//! sonde agent runs reaches Prometheus exactly once, with its original timestamp, through
//! aggregator crashes and partitions; a removed job's `up` disappears at once.
//!
//! The check is the one a user can make: each agent's own `sonde_agent_probes_total` for a
//! target equals the number of `probe_success` samples Prometheus stored for that agent
//! and target.

use sonde_tests::{
    RestartableAggregator, Scene, accepting_tcp_port, free_port, http_get_ok, http_post,
    metric_sum, prometheus_query, prometheus_single, sonde_bin, start_prometheus,
};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// One test reloads with POST /-/reload.
const DELIVERY_FLAGS: &[&str] = &["--web.enable-lifecycle", "--log.level=debug"];

const WAIT: Duration = Duration::from_secs(90);

fn agent_config(id: &str, grpc: &str, target: u16, local_job: bool, max_bytes: &str) -> String {
    let jobs = if local_job {
        format!(
            "jobs:\n  - job_name: tcp\n    module: tcp\n    interval: 1s\n    timeout: 500ms\n    static_configs: [{{targets: [\"127.0.0.1:{target}\"]}}]\n"
        )
    } else {
        "jobs: []\n".to_string()
    };
    format!(
        "agent: {{id: {id}, labels: {{region: {id}}}}}\naggregators: [{{address: \"{grpc}\"}}]\nbuffer: {{max_bytes: {max_bytes}}}\nmodules:\n  tcp: {{prober: tcp, tcp: {{preferred_ip_protocol: ip4}}}}\n{jobs}"
    )
}

/// Starts an agent whose local job probes `target` every second.
fn start_agent(
    scene: &mut Scene,
    id: &str,
    grpc: &str,
    target: u16,
    max_bytes: &str,
) -> (String, PathBuf) {
    spawn_agent(scene, id, id, grpc, target, max_bytes)
}

/// Starts agent `id` as process `name`; its storage is always `<id>-data`, so starting
/// it again under another name is a restart on the same buffer.
fn spawn_agent(
    scene: &mut Scene,
    name: &str,
    id: &str,
    grpc: &str,
    target: u16,
    max_bytes: &str,
) -> (String, PathBuf) {
    let config = scene.dir().write(
        &format!("{id}.yml"),
        &agent_config(id, grpc, target, true, max_bytes),
    );
    let port = free_port();
    let mut cmd = Command::new(sonde_bin("sonde-agent"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!(
            "--storage.path={}",
            scene.dir().join(&format!("{id}-data")).display()
        ))
        .arg("--log.level=debug");
    scene.spawn(name, cmd);
    let web = format!("http://127.0.0.1:{port}");
    scene.wait_until(&format!("{name} /-/healthy"), WAIT, || {
        http_get_ok(&format!("{web}/-/healthy")).map(drop)
    });
    (web, config)
}

fn signal(scene: &mut Scene, name: &str, sig: &str) {
    let pid = scene.process(name).pid();
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {name} ({pid}) failed");
}

#[allow(clippy::too_many_arguments)] // one call per test, each a different world
/// Stops the agent's local probing (reload with no jobs) and waits until everything it
/// recorded has been acked, the aggregator's queue is empty and Prometheus has it all;
/// returns the agent's final probe count for the target.
fn drain(
    scene: &mut Scene,
    process: &str,
    id: &str,
    web: &str,
    config: &PathBuf,
    grpc: &str,
    target: u16,
    agg_web: &str,
    prom: &str,
) -> f64 {
    std::fs::write(config, agent_config(id, grpc, target, false, "256MiB"))
        .expect("rewrite the agent config");
    signal(scene, process, "HUP");
    let instance = format!("127.0.0.1:{target}");
    let probes = scene.wait_until(&format!("{id} to stop probing"), WAIT, || {
        let a = metric_sum(
            web,
            "sonde_agent_probes_total",
            &[("job", "tcp"), ("instance", &instance)],
        )?;
        std::thread::sleep(Duration::from_millis(1500));
        let b = metric_sum(
            web,
            "sonde_agent_probes_total",
            &[("job", "tcp"), ("instance", &instance)],
        )?;
        if a == b {
            Ok(b)
        } else {
            Err(format!("still probing: {a} then {b}"))
        }
    });
    scene.wait_until(
        &format!("{id}'s buffer to be acked"),
        WAIT,
        || match metric_sum(web, "sonde_agent_buffer_results", &[])? {
            0.0 => Ok(()),
            n => Err(format!("{n} results unacked")),
        },
    );
    scene.wait_until(
        "the aggregator's queue to drain",
        WAIT,
        || match metric_sum(agg_web, "sonde_remote_write_queue_samples", &[])? {
            0.0 => Ok(()),
            n => Err(format!("{n} samples queued")),
        },
    );
    // Results dropped from a full buffer never reach anyone; they are counted instead.
    let dropped = metric_sum(web, "sonde_agent_buffer_dropped_total", &[]).unwrap_or(0.0);
    let expected = probes - dropped;
    let query = format!(
        "count_over_time(probe_success{{job=\"tcp\",instance=\"{instance}\",agent=\"{id}\"}}[1h])"
    );
    scene.wait_until(
        &format!("Prometheus to hold {expected} samples of {id}"),
        WAIT,
        || {
            let stored = prometheus_single(prom, &query)?;
            if stored == expected {
                Ok(())
            } else {
                Err(format!(
                    "{query} = {stored}, the agent ran {probes} and dropped {dropped}"
                ))
            }
        },
    );
    probes
}

/// The timestamps (ms) Prometheus stored for a series, in order.
fn stored_timestamps(prom: &str, selector: &str) -> Vec<i64> {
    let url = format!("{prom}/api/v1/query");
    let text = sonde_tests::http_get_ok(&format!(
        "{url}?query={}",
        urlencode(&format!("{selector}[1h]"))
    ))
    .expect("range selector query");
    let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    json["data"]["result"][0]["values"]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| (v[0].as_f64().unwrap_or(0.0) * 1000.0).round() as i64)
                .collect()
        })
        .unwrap_or_default()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn aggregator_config(prom: &str, extra_jobs: &str) -> String {
    format!(
        r#"global: {{scrape_interval: 1s, scrape_timeout: 500ms}}
modules:
  tcp: {{prober: tcp, tcp: {{preferred_ip_protocol: ip4}}}}
jobs:
{extra_jobs}
remote_write:
  - url: {prom}/api/v1/write
    queue_config: {{batch_send_deadline: 500ms, min_backoff: 50ms, max_backoff: 1s}}
fleet: {{missing_after: 10m}}
"#
    )
}

fn assert_no_rejections(scene: &mut Scene, prometheus: &str) {
    let log = scene.process(prometheus).log();
    for bad in ["out of order", "out of bounds", "duplicate sample"] {
        assert!(
            !log.to_lowercase().contains(bad),
            "Prometheus logged {bad:?}:\n{}",
            sonde_tests::tail(&log, 40)
        );
    }
}

#[test]
fn aggregator_killed_five_times_loses_and_doubles_nothing() {
    let mut scene = Scene::new("delivery-agg-kill");
    let prom = start_prometheus(&mut scene, "prometheus", &[]);
    let target = accepting_tcp_port();
    let agg = RestartableAggregator::new(&scene, "aggregator", &aggregator_config(&prom, "  []"));
    agg.start(&mut scene, "aggregator-0", DELIVERY_FLAGS);
    let (web_a, config_a) = start_agent(&mut scene, "edge-a", &agg.grpc(), target, "256MiB");
    let (web_b, config_b) = start_agent(&mut scene, "edge-b", &agg.grpc(), target, "256MiB");

    // About two minutes of probing every second, with five SIGKILLs of the aggregator.
    let started = Instant::now();
    for round in 1..=5 {
        std::thread::sleep(Duration::from_secs(20));
        scene.kill(&format!("aggregator-{}", round - 1));
        std::thread::sleep(Duration::from_secs(2));
        agg.start(&mut scene, &format!("aggregator-{round}"), DELIVERY_FLAGS);
    }
    std::thread::sleep(Duration::from_secs(
        120u64.saturating_sub(started.elapsed().as_secs()).min(20),
    ));

    let grpc = agg.grpc();
    let web = agg.web();
    for (id, agent_web, config) in [("edge-a", &web_a, &config_a), ("edge-b", &web_b, &config_b)] {
        let probes = drain(
            &mut scene, id, id, agent_web, config, &grpc, target, &web, &prom,
        );
        assert!(
            probes >= 100.0,
            "{id} ran only {probes} probes in ~2 minutes"
        );
        let ts = stored_timestamps(
            &prom,
            &format!("probe_success{{job=\"tcp\",agent=\"{id}\"}}"),
        );
        assert_eq!(ts.len() as f64, probes);
        assert!(
            ts.windows(2).all(|w| w[0] < w[1]),
            "{id}: timestamps not strictly increasing"
        );
    }
    // No check of Prometheus's log here: a SIGKILL between a receiver's 2xx and the
    // queue's delete makes the aggregator send that batch again (at-least-once on the
    // wire), which Prometheus may answer with "out of order" for samples it already has.
    // The counts above show nothing was lost or doubled.
}

#[test]
fn partition_is_buffered_and_replayed_with_original_timestamps() {
    let mut scene = Scene::new("delivery-partition");
    let prom = start_prometheus(&mut scene, "prometheus", &[]);
    let target = accepting_tcp_port();
    let agg = RestartableAggregator::new(&scene, "aggregator", &aggregator_config(&prom, "  []"));
    agg.start(&mut scene, "aggregator-0", DELIVERY_FLAGS);
    let (web_a, config_a) = start_agent(&mut scene, "edge-a", &agg.grpc(), target, "256MiB");
    std::thread::sleep(Duration::from_secs(10));

    // The link is cut: the aggregator is stopped (SIGTERM) for two minutes.
    scene
        .process("aggregator-0")
        .terminate(Duration::from_secs(30));
    let cut_at = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_secs(120));
    let buffered = metric_sum(&web_a, "sonde_agent_buffer_results", &[]).expect("buffer gauge");
    assert!(
        buffered >= 100.0,
        "the agent buffered only {buffered} results during a 2-minute partition"
    );
    agg.start(&mut scene, "aggregator-1", DELIVERY_FLAGS);

    let probes = drain(
        &mut scene,
        "edge-a",
        "edge-a",
        &web_a,
        &config_a,
        &agg.grpc(),
        target,
        &agg.web(),
        &prom,
    );
    // Samples from inside the partition arrived with the time they were taken.
    let cut_ms = cut_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ts = stored_timestamps(&prom, "probe_success{job=\"tcp\",agent=\"edge-a\"}");
    assert_eq!(ts.len() as f64, probes);
    let inside = ts
        .iter()
        .filter(|t| **t > cut_ms + 5_000 && **t < cut_ms + 115_000)
        .count();
    assert!(
        inside >= 100,
        "only {inside} samples carry a timestamp from inside the partition"
    );
    assert!(ts.windows(2).all(|w| w[0] < w[1]));
    assert_no_rejections(&mut scene, "prometheus");
}

#[test]
fn removed_job_disappears_at_once() {
    let mut scene = Scene::new("delivery-stale");
    let prom = start_prometheus(&mut scene, "prometheus", &[]);
    let target = accepting_tcp_port();
    let job = format!(
        "  - job_name: doomed\n    module: tcp\n    interval: 1s\n    timeout: 500ms\n    static_configs: [{{targets: [\"127.0.0.1:{target}\"]}}]\n"
    );
    let agg = RestartableAggregator::new(&scene, "aggregator", &aggregator_config(&prom, &job));
    agg.start(&mut scene, "aggregator", DELIVERY_FLAGS);
    let grpc = agg.grpc();
    let config = scene.dir().write(
        "edge-a.yml",
        &format!("agent: {{id: edge-a}}\naggregators: [{{address: \"{grpc}\"}}]\n"),
    );
    let port = free_port();
    let mut cmd = Command::new(sonde_bin("sonde-agent"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!(
            "--storage.path={}",
            scene.dir().join("edge-a-data").display()
        ));
    scene.spawn("edge-a", cmd);

    scene.wait_until(
        "up{job=doomed} = 1 in Prometheus",
        WAIT,
        || match prometheus_single(&prom, "up{job=\"doomed\"}")? {
            1.0 => Ok(()),
            v => Err(format!("up = {v}")),
        },
    );
    std::fs::write(&agg.config, aggregator_config(&prom, "  []")).expect("rewrite the config");
    let (status, body) = http_post(&format!("{}/-/reload", agg.web())).expect("POST /-/reload");
    assert_eq!(status, 200, "reload: {body}");
    let reloaded = Instant::now();
    // Prometheus evaluates `absent()` on what it stored: with the staleness marker the
    // series ends now, not after the 5-minute lookback.
    scene.wait_until(
        "absent(up{job=doomed}) in Prometheus",
        Duration::from_secs(10),
        || match prometheus_query(&prom, "absent(up{job=\"doomed\"})")?.as_slice() {
            [(_, v)] if *v == 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(
        reloaded.elapsed() < Duration::from_secs(5),
        "absent() took {:?} to turn true",
        reloaded.elapsed()
    );
    // And the per-agent series of the removed target end too.
    scene.wait_until(
        "probe_success{job=doomed} gone",
        Duration::from_secs(10),
        || {
            let r = prometheus_query(&prom, "probe_success{job=\"doomed\"}")?;
            if r.is_empty() {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
}

#[test]
fn agent_killed_mid_batch_loses_and_doubles_nothing() {
    let mut scene = Scene::new("delivery-agent-kill");
    let prom = start_prometheus(&mut scene, "prometheus", &[]);
    let target = accepting_tcp_port();
    let agg = RestartableAggregator::new(&scene, "aggregator", &aggregator_config(&prom, "  []"));
    agg.start(&mut scene, "aggregator", DELIVERY_FLAGS);
    let grpc = agg.grpc();
    let (_, _) = start_agent(&mut scene, "edge-a", &grpc, target, "256MiB");
    // Three SIGKILLs, each restarting the agent on the same storage: what it had recorded
    // but not yet had acked is replayed, what was acked is not sent again.
    let mut agent = None;
    for round in 1..=3 {
        std::thread::sleep(Duration::from_secs(10));
        let name = if round == 1 {
            "edge-a".to_string()
        } else {
            format!("edge-a-{}", round - 1)
        };
        scene.kill(&name);
        agent = Some(spawn_agent(
            &mut scene,
            &format!("edge-a-{round}"),
            "edge-a",
            &grpc,
            target,
            "256MiB",
        ));
    }
    std::thread::sleep(Duration::from_secs(10));
    let (web, config) = agent.expect("restarted agent");
    let probes = drain(
        &mut scene,
        "edge-a-3",
        "edge-a",
        &web,
        &config,
        &grpc,
        target,
        &agg.web(),
        &prom,
    );
    assert!(probes >= 30.0, "only {probes} probes");
    let ts = stored_timestamps(&prom, "probe_success{job=\"tcp\",agent=\"edge-a\"}");
    assert_eq!(ts.len() as f64, probes);
    assert!(ts.windows(2).all(|w| w[0] < w[1]));
    assert_no_rejections(&mut scene, "prometheus");
}

#[test]
fn full_buffer_drops_the_oldest_and_keeps_probing() {
    let mut scene = Scene::new("delivery-buffer-full");
    let prom = start_prometheus(&mut scene, "prometheus", &[]);
    let target = accepting_tcp_port();
    let agg = RestartableAggregator::new(&scene, "aggregator", &aggregator_config(&prom, "  []"));
    // The aggregator is away while the agent probes with a tiny buffer.
    let (web, config) = start_agent(&mut scene, "edge-a", &agg.grpc(), target, "8KiB");
    std::thread::sleep(Duration::from_secs(30));
    let dropped =
        metric_sum(&web, "sonde_agent_buffer_dropped_total", &[]).expect("dropped counter");
    let bytes = metric_sum(&web, "sonde_agent_buffer_bytes", &[]).expect("bytes gauge");
    assert!(dropped > 0.0, "nothing dropped from a 8KiB buffer in 30s");
    assert!(
        bytes <= 8.0 * 1024.0,
        "buffer holds {bytes} bytes, over its 8KiB bound"
    );
    http_get_ok(&format!("{web}/-/healthy")).expect("the agent stays up");
    let pid = scene.process("edge-a").pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    assert!(rss_kib < 100.0 * 1024.0, "agent RSS {rss_kib} KiB");

    // The aggregator comes: what the buffer kept (the newest) arrives; the dropped never do.
    agg.start(&mut scene, "aggregator", DELIVERY_FLAGS);
    let grpc = agg.grpc();
    let probes = drain(
        &mut scene,
        "edge-a",
        "edge-a",
        &web,
        &config,
        &grpc,
        target,
        &agg.web(),
        &prom,
    );
    let dropped =
        metric_sum(&web, "sonde_agent_buffer_dropped_total", &[]).expect("dropped counter");
    let query = "count_over_time(probe_success{job=\"tcp\",agent=\"edge-a\"}[1h])";
    let stored = prometheus_single(&prom, query).expect("stored count");
    assert_eq!(
        stored,
        probes - dropped,
        "stored + dropped must equal probes run"
    );
}

/// A tmpfs of `size` mounted on `dir` for the life of the guard: a filesystem the test
/// can fill. Needs root (CI runs as root); without it the test fails, never skips.
struct SmallFilesystem {
    dir: PathBuf,
}

impl SmallFilesystem {
    fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs on {} (this test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    /// Writes a file until the filesystem is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// How a test breaks the aggregator's store, and mends it.
trait StoreFault {
    /// Called with the aggregator's storage directory, once it runs.
    fn break_store(&mut self, data: &std::path::Path);
    fn mend(&mut self);
}

impl StoreFault for SmallFilesystem {
    fn break_store(&mut self, _: &std::path::Path) {
        self.fill();
    }

    fn mend(&mut self) {
        std::fs::remove_file(self.dir.join("filler")).expect("free the disk");
    }
}

/// Another process holds the database's write lock (`BEGIN EXCLUSIVE` from Python's
/// sqlite3): every commit of the aggregator fails once its busy timeout passes.
#[derive(Default)]
struct LockedDatabase {
    holder: Option<std::process::Child>,
}

impl StoreFault for LockedDatabase {
    fn break_store(&mut self, data: &std::path::Path) {
        let db = data.join("aggregator.db");
        let script = "import sqlite3, sys, time\n\
            c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n\
            c.execute('BEGIN EXCLUSIVE')\n\
            print('locked', flush=True)\n\
            sys.stdin.read()\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .arg(&db)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(
            line.trim(),
            "locked",
            "python3 could not lock {}",
            db.display()
        );
        self.holder = Some(child);
    }

    fn mend(&mut self) {
        if let Some(mut child) = self.holder.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

impl Drop for LockedDatabase {
    fn drop(&mut self) {
        if let Some(mut child) = self.holder.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Breaks the aggregator's store under a running agent, checks that acks stop, the
/// stream stays, `/-/ready` says not ready and the failure is counted, mends it, and
/// checks that Prometheus ends up with exactly the agent's probe count.
fn store_fault_loses_nothing(
    mut scene: Scene,
    prometheus: &str,
    fault: &mut dyn StoreFault,
    setup: &RestartableAggregator,
) {
    let target = accepting_tcp_port();
    setup.start(&mut scene, "aggregator", DELIVERY_FLAGS);
    let agg = setup.web();
    let (web, config) = start_agent(&mut scene, "edge-a", &setup.grpc(), target, "256MiB");
    let instance = format!("127.0.0.1:{target}");
    let query =
        format!("count_over_time(probe_success{{agent=\"edge-a\",instance=\"{instance}\"}}[1h])");
    scene.wait_until(
        "first samples in Prometheus",
        WAIT,
        || match prometheus_single(prometheus, &query)? {
            n if n >= 3.0 => Ok(()),
            n => Err(format!("{n} samples")),
        },
    );

    let probes_at_fault = metric_sum(&web, "sonde_agent_probes_total", &[]).unwrap();
    fault.break_store(&setup.data);
    scene.wait_until(
        "/-/ready to say not ready",
        WAIT,
        || match sonde_tests::http_get(&format!("{agg}/-/ready"))? {
            (503, _) => Ok(()),
            (status, body) => Err(format!("{status} {body}")),
        },
    );
    scene.wait_until(
        "the aggregator to count the failure",
        WAIT,
        || match metric_sum(&agg, "sonde_storage_errors_total", &[])? {
            n if n >= 1.0 => Ok(()),
            _ => Err("no storage error yet".into()),
        },
    );
    // Meanwhile the agent keeps probing into its own buffer, on the same stream: no
    // reconnect loop.
    let reconnects = metric_sum(&web, "sonde_agent_stream_reconnects_total", &[]).unwrap_or(0.0);
    let buffered_before = metric_sum(&web, "sonde_agent_buffer_results", &[]).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let buffered_after = metric_sum(&web, "sonde_agent_buffer_results", &[]).unwrap();
    assert!(
        buffered_after > buffered_before,
        "unacked results pile up in the agent ({buffered_before} then {buffered_after})"
    );
    assert_eq!(
        metric_sum(&web, "sonde_agent_stream_reconnects_total", &[]).unwrap_or(0.0),
        reconnects,
        "the agent did not reconnect while the aggregator's store failed"
    );

    fault.mend();
    scene.wait_until("/-/ready to recover", WAIT, || {
        http_get_ok(&format!("{agg}/-/ready")).map(drop)
    });
    let probes = drain(
        &mut scene,
        "edge-a",
        "edge-a",
        &web,
        &config,
        &setup.grpc(),
        target,
        &agg,
        prometheus,
    );
    assert!(
        probes >= probes_at_fault + 5.0,
        "probes run while the store failed reached Prometheus too ({probes_at_fault} before, {probes} in all)"
    );
}

#[test]
fn a_full_disk_holds_the_acks_and_loses_nothing() {
    let mut scene = Scene::new("delivery-full-disk");
    let prometheus = start_prometheus(&mut scene, "prometheus", &[]);
    let setup = RestartableAggregator::new(
        &scene,
        "aggregator",
        &aggregator_config(&prometheus, "  []"),
    );
    let mut disk = SmallFilesystem::mount(setup.data.clone(), "8m");
    store_fault_loses_nothing(scene, &prometheus, &mut disk, &setup);
}

#[test]
fn a_failing_commit_holds_the_acks_and_loses_nothing() {
    let mut scene = Scene::new("delivery-locked-store");
    let prometheus = start_prometheus(&mut scene, "prometheus", &[]);
    let setup = RestartableAggregator::new(
        &scene,
        "aggregator",
        &aggregator_config(&prometheus, "  []"),
    );
    store_fault_loses_nothing(scene, &prometheus, &mut LockedDatabase::default(), &setup);
}
