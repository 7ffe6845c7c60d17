//! Remote write against real receivers, with real processes: a sonde agent probes a TCP
//! port every second and streams to a sonde aggregator, which writes to
//! - a real Prometheus 2.42 (`--web.enable-remote-write-receiver`) configured with
//!   `protobuf_message: io.prometheus.write.v2.Request`: Prometheus 2.42 does not speak
//!   2.0 (it answers 204 and stores nothing), so the aggregator must notice (no
//!   `X-Prometheus-Remote-Write-*-Written` headers), fall back to 1.0 once, and resend;
//! - a real VictoriaMetrics (Debian's `victoria-metrics`) with remote write 1.0.
//!
//! Then Prometheus is stopped (SIGTERM) for two minutes and started again on the same
//! data directory. Meanwhile VictoriaMetrics must keep receiving (a dead endpoint holds up
//! no other), and afterwards both must hold exactly the samples the agent says it took:
//! the agent's own `sonde_agent_probes_total` equals `count_over_time(probe_success[1h])`
//! in each receiver, with no out-of-order or out-of-bounds rejection in Prometheus's log.

use sonde_tests::{
    Scene, accepting_tcp_port, free_port, http_get_ok, metric_sum, prometheus_query,
    prometheus_single, require_tool, sonde_bin, start_victoria_metrics,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(90);
/// How long Prometheus stays down (two minutes).
const OUTAGE: Duration = Duration::from_secs(120);

/// Starts Prometheus as process `name` on `port` with its TSDB in `data` (so that a
/// restart finds its data again) and waits until it is ready.
fn start_prometheus_at(scene: &mut Scene, name: &str, port: u16, data: &Path) -> String {
    let prometheus = require_tool("prometheus", "prometheus");
    let config = scene.dir().write(
        "prometheus.yml",
        "global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\n",
    );
    let mut cmd = Command::new(prometheus);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--web.enable-remote-write-receiver")
        .arg("--log.level=info");
    scene.spawn(name, cmd);
    let base = format!("http://127.0.0.1:{port}");
    scene.wait_until(&format!("{name} to be ready"), WAIT, || {
        http_get_ok(&format!("{base}/-/ready")).map(drop)
    });
    base
}

/// Stops process `name` with SIGTERM, as an operator would, waits until it has exited
/// and reaps it (so that the scene does not take it for a crash).
fn terminate(scene: &mut Scene, name: &str) {
    let pid = scene.process(name).pid();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {name} ({pid}) failed");
    sonde_tests::wait_until(&format!("{name} to exit"), WAIT, || {
        // Exited and not yet reaped: a zombie.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                Ok(())
            }
            Ok(_) => Err("still running".to_string()),
            Err(_) => Ok(()),
        }
    });
    // Reaps it and marks it stopped on purpose.
    scene.kill(name);
}

fn agent_config(grpc: &str, target: u16, probing: bool) -> String {
    let jobs = if probing {
        format!(
            "jobs:\n  - job_name: tcp\n    module: tcp\n    interval: 1s\n    timeout: 500ms\n    static_configs: [{{targets: [\"127.0.0.1:{target}\"]}}]\n"
        )
    } else {
        "jobs: []\n".to_string()
    };
    format!(
        "agent: {{id: edge-a}}\naggregators: [{{address: \"{grpc}\"}}]\nbuffer: {{max_bytes: 256MiB}}\nmodules:\n  tcp: {{prober: tcp, tcp: {{preferred_ip_protocol: ip4}}}}\n{jobs}"
    )
}

#[test]
fn prometheus_with_2_0_fallback_and_outage_and_victoria_metrics() {
    let mut scene = Scene::new("rw-receivers");
    let target = accepting_tcp_port();
    let instance = format!("127.0.0.1:{target}");
    let series = format!("probe_success{{job=\"tcp\",instance=\"{instance}\",agent=\"edge-a\"}}");
    let count = format!("count_over_time({series}[1h])");

    // ---- the receivers
    let prom_port = free_port();
    let prom_data: PathBuf = scene.dir().join("prometheus-data");
    let prom = start_prometheus_at(&mut scene, "prometheus-1", prom_port, &prom_data);
    let vm = start_victoria_metrics(&mut scene, "victoria-metrics", &[]);

    // ---- sonde
    let web_port = free_port();
    let grpc_port = free_port();
    let agg_web = format!("http://127.0.0.1:{web_port}");
    let grpc = format!("http://127.0.0.1:{grpc_port}");
    let agg_config = scene.dir().write(
        "aggregator.yml",
        &format!(
            r#"global: {{scrape_interval: 1s, scrape_timeout: 500ms}}
modules:
  tcp: {{prober: tcp, tcp: {{preferred_ip_protocol: ip4}}}}
jobs: []
remote_write:
  - url: {prom}/api/v1/write
    name: prometheus
    protobuf_message: io.prometheus.write.v2.Request
    queue_config: {{batch_send_deadline: 500ms, min_backoff: 50ms, max_backoff: 2s}}
  - url: {vm}/api/v1/write
    name: victoriametrics
    queue_config: {{batch_send_deadline: 500ms, min_backoff: 50ms, max_backoff: 2s}}
fleet: {{missing_after: 10m}}
"#
        ),
    );
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg(format!("--config.file={}", agg_config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .arg(format!("--grpc.listen-address=127.0.0.1:{grpc_port}"))
        .arg(format!(
            "--storage.path={}",
            scene.dir().join("aggregator-data").display()
        ))
        .arg("--log.level=info");
    scene.spawn("aggregator", cmd);
    scene.wait_until("aggregator /-/ready", WAIT, || {
        http_get_ok(&format!("{agg_web}/-/ready")).map(drop)
    });
    let agent_file = scene
        .dir()
        .write("edge-a.yml", &agent_config(&grpc, target, true));
    let agent_port = free_port();
    let agent_web = format!("http://127.0.0.1:{agent_port}");
    let mut cmd = Command::new(sonde_bin("sonde-agent"));
    cmd.arg(format!("--config.file={}", agent_file.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{agent_port}"))
        .arg(format!(
            "--storage.path={}",
            scene.dir().join("edge-a-data").display()
        ))
        .arg("--log.level=info");
    scene.spawn("edge-a", cmd);

    // ---- (a) Prometheus 2.42 and 2.0: the fallback happens, the data arrives
    scene.wait_until(
        "probe_success in Prometheus",
        WAIT,
        || match prometheus_single(&prom, &series)? {
            1.0 => Ok(()),
            v => Err(format!("{series} = {v}")),
        },
    );
    let fallbacks = metric_sum(
        &agg_web,
        "sonde_remote_write_protocol_fallbacks_total",
        &[("remote_name", "prometheus")],
    )
    .expect("fallback counter");
    assert_eq!(fallbacks, 1.0, "the endpoint fell back {fallbacks} times");
    metric_sum(
        &agg_web,
        "sonde_remote_write_protocol_info",
        &[
            ("remote_name", "prometheus"),
            ("protobuf_message", "prometheus.WriteRequest"),
        ],
    )
    .expect("the Prometheus endpoint now sends 1.0");
    let logged = scene
        .process("aggregator")
        .log()
        .matches("does not speak remote write 2.0")
        .count();
    assert_eq!(logged, 1, "the fallback must be logged exactly once");

    // ---- (b) VictoriaMetrics and 1.0: the data arrives
    scene.wait_until(
        "probe_success in VictoriaMetrics",
        WAIT,
        || match prometheus_single(&vm, &series)? {
            1.0 => Ok(()),
            v => Err(format!("{series} = {v}")),
        },
    );
    assert_eq!(
        metric_sum(
            &agg_web,
            "sonde_remote_write_protocol_fallbacks_total",
            &[("remote_name", "victoriametrics")],
        )
        .expect("fallback counter"),
        0.0
    );

    // ---- (c) Prometheus stopped for two minutes, then started on the same data
    terminate(&mut scene, "prometheus-1");
    let down = Instant::now();
    let vm_before = prometheus_single(&vm, &count).expect("count in VictoriaMetrics");
    // VictoriaMetrics keeps receiving while Prometheus is down.
    scene.wait_until(
        "VictoriaMetrics to keep receiving during the outage",
        Duration::from_secs(60),
        || {
            let now = prometheus_single(&vm, &count)?;
            if now >= vm_before + 20.0 {
                Ok(())
            } else {
                Err(format!("{count} went from {vm_before} to {now}"))
            }
        },
    );
    std::thread::sleep(OUTAGE.saturating_sub(down.elapsed()));
    let queued = metric_sum(
        &agg_web,
        "sonde_remote_write_queue_samples",
        &[("remote_name", "prometheus")],
    )
    .expect("queue gauge");
    assert!(
        queued >= 100.0,
        "only {queued} samples queued for Prometheus after a 2-minute outage"
    );
    let prom = start_prometheus_at(&mut scene, "prometheus-2", prom_port, &prom_data);

    // ---- the end: stop probing, let everything drain, compare counts
    std::fs::write(&agent_file, agent_config(&grpc, target, false))
        .expect("rewrite the agent config");
    let pid = scene.process("edge-a").pid();
    let status = Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -HUP edge-a failed");
    let probes = scene.wait_until("the agent to stop probing", WAIT, || {
        let labels = [("job", "tcp"), ("instance", instance.as_str())];
        let a = metric_sum(&agent_web, "sonde_agent_probes_total", &labels)?;
        std::thread::sleep(Duration::from_millis(1500));
        let b = metric_sum(&agent_web, "sonde_agent_probes_total", &labels)?;
        if a == b {
            Ok(b)
        } else {
            Err(format!("still probing: {a} then {b}"))
        }
    });
    assert!(
        probes >= 100.0,
        "the agent ran only {probes} probes in the run"
    );
    scene.wait_until("the agent's buffer to be acked", WAIT, || match metric_sum(
        &agent_web,
        "sonde_agent_buffer_results",
        &[],
    )? {
        0.0 => Ok(()),
        n => Err(format!("{n} results unacked")),
    });
    scene.wait_until(
        "the aggregator's queues to drain",
        WAIT,
        || match metric_sum(&agg_web, "sonde_remote_write_queue_samples", &[])? {
            0.0 => Ok(()),
            n => Err(format!("{n} samples queued")),
        },
    );
    let dropped = metric_sum(&agent_web, "sonde_agent_buffer_dropped_total", &[]).unwrap_or(0.0);
    assert_eq!(dropped, 0.0, "the agent dropped results from its buffer");
    for (receiver, base) in [("Prometheus", &prom), ("VictoriaMetrics", &vm)] {
        scene.wait_until(
            &format!("{receiver} to hold exactly the agent's {probes} probes"),
            WAIT,
            || {
                let stored = prometheus_single(base, &count)?;
                if stored == probes {
                    Ok(())
                } else {
                    Err(format!("{count} = {stored}, the agent ran {probes}"))
                }
            },
        );
    }
    for reason in ["http_4xx", "queue_full", "too_old"] {
        let dropped = metric_sum(
            &agg_web,
            "sonde_remote_write_samples_dropped_total",
            &[("reason", reason)],
        )
        .expect("drop counter");
        assert_eq!(dropped, 0.0, "the aggregator dropped samples ({reason})");
    }
    for name in ["prometheus-1", "prometheus-2"] {
        let log = scene.process(name).log().to_lowercase();
        for bad in ["out of order", "out of bounds", "duplicate sample"] {
            assert!(
                !log.contains(bad),
                "{name} logged {bad:?}:\n{}",
                sonde_tests::tail(&log, 40)
            );
        }
    }
    // Sanity of the query itself: it is not empty in either receiver.
    assert!(!prometheus_query(&prom, &series).unwrap().is_empty());
}
