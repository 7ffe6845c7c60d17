//! A Prometheus blackbox scrape job, pasted into the aggregator's `jobs:` as it is (the
//! job of blackbox_exporter's README: `metrics_path`, `params: {module: [http_2xx]}` and
//! the `__address__` → `__param_target` → `instance` relabeling), probes real loopback
//! HTTP targets, and the series sonde writes carry the `instance` labels Prometheus gives
//! the same job scraping the real blackbox_exporter; a job whose relabeling rewrites
//! `instance` apart from the probed URL still probes the URL.

use sonde_tests::parity::start_blackbox;
use sonde_tests::{
    Scene, prometheus_query, run, sonde_bin, start_agent, start_aggregator, start_nginx,
    start_prometheus_scraping,
};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// blackbox_exporter's README job, with `NAME`, `TARGETS` and `EXPORTER` to fill in.
const README_JOB: &str = r#"  - job_name: NAME
    metrics_path: /probe
    params:
      module: [http_2xx]  # Look for a HTTP 200 response.
    static_configs:
      - targets: [TARGETS]
    relabel_configs:
      - source_labels: [__address__]
        target_label: __param_target
      - source_labels: [__param_target]
        target_label: instance
      - target_label: __address__
        replacement: EXPORTER  # The blackbox exporter's real hostname:port.
"#;

fn readme_job(name: &str, targets: &[String], exporter: &str) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
    README_JOB
        .replace("NAME", name)
        .replace("TARGETS", &targets.join(", "))
        .replace("EXPORTER", exporter)
}

/// `instance` → value of the series `promql` selects.
fn by_instance(prom: &str, promql: &str) -> Result<BTreeMap<String, f64>, String> {
    Ok(prometheus_query(prom, promql)?
        .into_iter()
        .map(|(labels, value)| (labels.get("instance").cloned().unwrap_or_default(), value))
        .collect())
}

#[test]
fn a_prometheus_blackbox_job_gives_the_instances_prometheus_gives() {
    let mut scene = Scene::new("scrape-jobs");
    let nginx = start_nginx(&mut scene, "nginx");
    let targets = vec![
        format!("http://127.0.0.1:{nginx}/"),
        format!("http://127.0.0.1:{nginx}/missing"),
    ];
    let modules = "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n    http:\n      preferred_ip_protocol: ip4\n";

    // Prometheus runs the job against the real blackbox_exporter, and receives sonde's series.
    let exporter = start_blackbox(&mut scene, modules);
    let exporter_address = exporter.trim_start_matches("http://").to_string();
    let prom = start_prometheus_scraping(
        &mut scene,
        "prometheus",
        &[],
        &readme_job("blackbox_in_prometheus", &targets, &exporter_address),
    );

    // The same job in sonde, and one whose instance is a name apart from the URL it probes.
    let renamed = r#"  - job_name: renamed
    params: {module: [http_2xx]}
    static_configs:
      - targets: [TARGETS]
    relabel_configs:
      - {source_labels: [__address__], target_label: __param_target}
      - {source_labels: [__address__], regex: 'http://[^/]+(/.*)', replacement: 'nginx$1', target_label: instance}
      - {target_label: __address__, replacement: 127.0.0.1:9115}
"#
    .replace(
        "TARGETS",
        &targets
            .iter()
            .map(|t| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n{modules}jobs:\n{}{renamed}remote_write:\n  - url: {prom}/api/v1/write\n    queue_config: {{batch_send_deadline: 1s}}\n",
        readme_job("blackbox", &targets, "127.0.0.1:9115"),
    );

    // check-config accepts it as it is, with nothing to warn about; a field Prometheus has
    // and sonde does not use is a warning, never a refusal.
    let file = scene.dir().write("sonde.yml", &config);
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg("check-config").arg(&file);
    let out = run(cmd, scene.dir().path(), WAIT);
    assert!(out.status.success(), "{}", out.combined());
    assert!(!out.stderr.contains("warning"), "{}", out.combined());
    let with_ignored = scene.dir().write(
        "sonde-ignored.yml",
        &config.replace(
            "  - job_name: renamed\n",
            "  - job_name: renamed\n    scheme: https\n",
        ),
    );
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg("check-config").arg(&with_ignored);
    let out = run(cmd, scene.dir().path(), WAIT);
    assert!(out.status.success(), "{}", out.combined());
    assert!(
        out.stderr
            .contains("warning: job \"renamed\": field scheme is ignored: "),
        "{}",
        out.combined()
    );

    let aggregator = start_aggregator(&mut scene, "aggregator", &config);
    start_agent(
        &mut scene,
        "agent",
        &format!(
            "agent:\n  id: edge-1\naggregators:\n  - address: {}\n",
            aggregator.grpc
        ),
    );

    let expected: BTreeMap<String, f64> =
        BTreeMap::from([(targets[0].clone(), 1.0), (targets[1].clone(), 0.0)]);
    scene.wait_until("Prometheus's own probes", WAIT, || {
        let got = by_instance(&prom, r#"probe_success{job="blackbox_in_prometheus"}"#)?;
        (got == expected).then_some(()).ok_or(format!("{got:?}"))
    });
    scene.wait_until("sonde's series, as Prometheus gives them", WAIT, || {
        let up = by_instance(&prom, r#"up{job="blackbox"}"#)?;
        let probes = by_instance(&prom, r#"probe_success{job="blackbox"}"#)?;
        (up == expected && probes == expected)
            .then_some(())
            .ok_or(format!("up {up:?}, probe_success {probes:?}"))
    });
    // Only a probe of the URL can tell the page from the missing one: `nginx/` itself is no
    // address at all.
    let renamed_expected = BTreeMap::from([
        ("nginx/".to_string(), 1.0),
        ("nginx/missing".to_string(), 0.0),
    ]);
    scene.wait_until("the renamed instances, probed at their URLs", WAIT, || {
        let up = by_instance(&prom, r#"up{job="renamed"}"#)?;
        let status = by_instance(&prom, r#"probe_http_status_code{job="renamed"}"#)?;
        let want_status = BTreeMap::from([
            ("nginx/".to_string(), 200.0),
            ("nginx/missing".to_string(), 404.0),
        ]);
        (up == renamed_expected && status == want_status)
            .then_some(())
            .ok_or(format!("up {up:?}, probe_http_status_code {status:?}"))
    });
    // No label that relabeling used along the way reaches a series.
    let leaked = prometheus_query(
        &prom,
        r#"{job=~"blackbox|renamed", __param_target!=""} or {job=~"blackbox|renamed", __address__!=""}"#,
    )
    .expect("query");
    assert!(leaked.is_empty(), "{leaked:?}");
    scene.stop();
}
