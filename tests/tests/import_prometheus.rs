//! `sonde-aggregator import-prometheus` end to end: a prometheus.yml with a blackbox scrape
//! job, run by the real Prometheus against the real blackbox_exporter, and the same file
//! converted and run by sonde (aggregator and agent, writing to a second Prometheus): both
//! probe the same loopback targets, with the same `instance` and target labels and the
//! same `probe_success`, for a job with the usual relabeling and one with rules of its own.
//!
//! Only 127.0.0.1 is used. A missing peer program fails the test, naming its package.

use sonde_tests::parity::start_blackbox;
use sonde_tests::{
    Labels, Scene, free_port, prometheus_query, run, sonde_bin, start_agent, start_aggregator,
    start_prometheus, start_prometheus_with,
};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

/// Serves `200 OK` to every request on a loopback port, for as long as the test runs.
fn http_ok_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            });
        }
    });
    port
}

/// `probe_success` of `job` in the Prometheus at `base`: instance → (team label, value),
/// once there is a sample for each of `want` instances.
fn probe_success_by_instance(
    scene: &mut Scene,
    base: &str,
    job: &str,
    want: usize,
) -> BTreeMap<String, (String, f64)> {
    let query = format!("probe_success{{job=\"{job}\"}}");
    scene.wait_until(
        &format!("{want} instances of {query} in {base}"),
        Duration::from_secs(90),
        || {
            let series = prometheus_query(base, &query)?;
            let by_instance: BTreeMap<String, (String, f64)> = series
                .iter()
                .map(|(labels, value): &(Labels, f64)| {
                    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
                    (get("instance"), (get("team"), *value))
                })
                .collect();
            // Every target probed, and each settled (a first probe may still be in flight).
            if by_instance.len() == want && series.len() == want {
                Ok(by_instance)
            } else {
                Err(format!("{series:?}"))
            }
        },
    )
}

#[test]
fn converted_blackbox_job_probes_the_same_targets_with_the_same_instances() {
    let mut scene = Scene::new("import-prometheus");
    let up_a = http_ok_server();
    let up_b = http_ok_server();
    let closed = free_port();
    let targets = [
        format!("http://127.0.0.1:{up_a}/"),
        format!("http://127.0.0.1:{up_b}/health"),
        format!("127.0.0.1:{closed}"),
    ];

    let blackbox = start_blackbox(
        &mut scene,
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 1s\n    http:\n      preferred_ip_protocol: ip4\n",
    );
    let blackbox_config = scene.dir().join("blackbox.yml");
    let exporter = blackbox.trim_start_matches("http://");

    // The README's job, as a user runs it, beside a job that is not a blackbox job.
    let scrape_configs = format!(
        r#"scrape_configs:
  - job_name: blackbox
    metrics_path: /probe
    params:
      module: [http_2xx]
    static_configs:
      - targets: ["{}", "{}", "{}"]
        labels:
          team: web
    relabel_configs:
      - source_labels: [__address__]
        target_label: __param_target
      - source_labels: [__param_target]
        target_label: instance
      - target_label: __address__
        replacement: {exporter}
  # Relabeling of its own: a target dropped, the probed URL and a label made from the
  # address and the target's labels.
  - job_name: blackbox_relabel
    metrics_path: /probe
    params:
      module: [http_2xx]
    static_configs:
      - targets: ["127.0.0.1:{up_a}", "127.0.0.1:{up_b}", "127.0.0.1:{closed}"]
        labels:
          tier: front
    relabel_configs:
      - source_labels: [__address__]
        regex: "127.0.0.1:{closed}"
        action: drop
      - source_labels: [__address__]
        target_label: __param_target
        replacement: http://$1/
      - source_labels: [__param_target]
        target_label: instance
      - target_label: __address__
        replacement: {exporter}
      - source_labels: [tier]
        target_label: team
        replacement: web-$1
  - job_name: prometheus_itself
    static_configs:
      - targets: ["127.0.0.1:9"]
"#,
        targets[0], targets[1], targets[2],
    );
    let prometheus = start_prometheus_with(&mut scene, "prometheus", &[], &scrape_configs);
    let prometheus_yml = scene.dir().join("prometheus/prometheus.yml");

    // ---- the conversion
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg("import-prometheus")
        .arg(&prometheus_yml)
        .arg(format!("--blackbox.config={}", blackbox_config.display()));
    let converted = run(cmd, scene.dir().path(), Duration::from_secs(30));
    assert!(
        converted.status.success(),
        "import-prometheus failed:\n{}",
        converted.combined()
    );
    assert!(
        converted
            .stderr
            .contains("job \"prometheus_itself\": not a blackbox job"),
        "{}",
        converted.stderr
    );
    assert!(
        converted
            .stdout
            .contains(&format!("modules_file: {}\n", blackbox_config.display())),
        "{}",
        converted.stdout
    );
    assert!(!converted.stdout.contains("prometheus_itself"));

    // It loads as it is.
    let sonde_yml = scene.dir().write("converted.yml", &converted.stdout);
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg("check-config").arg(&sonde_yml);
    let checked = run(cmd, scene.dir().path(), Duration::from_secs(30));
    assert!(
        checked.status.success(),
        "check-config refused the output:\n{}\n{}",
        checked.combined(),
        converted.stdout
    );

    // ---- sonde running it, writing to a Prometheus of its own
    let sonde_prometheus = start_prometheus(&mut scene, "prometheus-sonde", &[]);
    let aggregator_config = format!(
        "{}remote_write:\n  - url: {sonde_prometheus}/api/v1/write\n    queue_config:\n      batch_send_deadline: 1s\n",
        converted.stdout
    );
    let aggregator = start_aggregator(&mut scene, "aggregator", &aggregator_config);
    start_agent(
        &mut scene,
        "agent",
        &format!(
            "agent:\n  id: edge\naggregators:\n  - address: {}\n",
            aggregator.grpc
        ),
    );

    let by_prometheus = probe_success_by_instance(&mut scene, &prometheus, "blackbox", 3);
    let by_sonde = probe_success_by_instance(&mut scene, &sonde_prometheus, "blackbox", 3);
    let expected: BTreeMap<String, (String, f64)> = [
        (targets[0].clone(), ("web".to_string(), 1.0)),
        (targets[1].clone(), ("web".to_string(), 1.0)),
        (targets[2].clone(), ("web".to_string(), 0.0)),
    ]
    .into_iter()
    .collect();
    assert_eq!(by_prometheus, expected, "Prometheus + blackbox_exporter");
    assert_eq!(by_sonde, expected, "sonde with the converted config");

    let by_prometheus = probe_success_by_instance(&mut scene, &prometheus, "blackbox_relabel", 2);
    let by_sonde = probe_success_by_instance(&mut scene, &sonde_prometheus, "blackbox_relabel", 2);
    let expected: BTreeMap<String, (String, f64)> = [up_a, up_b]
        .into_iter()
        .map(|port| {
            (
                format!("http://127.0.0.1:{port}/"),
                ("web-front".to_string(), 1.0),
            )
        })
        .collect();
    assert_eq!(by_prometheus, expected, "Prometheus + blackbox_exporter");
    assert_eq!(by_sonde, expected, "sonde with the converted config");
    scene.stop();
}
