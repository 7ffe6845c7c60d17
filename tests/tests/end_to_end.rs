//! The whole path with real processes: two sonde agents probe real servers (nginx for
//! HTTP, dnsmasq for DNS, a closed TCP port), stream to a sonde aggregator, which writes
//! through remote write into a real Prometheus evaluating deploy/prometheus/sonde-alerts.yml
//! (and the seed alerts of deploy/prometheus/compat/), which also scrapes the processes'
//! self-metrics as deploy/prometheus/scrape-sonde.yml says. Everything is checked the way a
//! user sees it: through Prometheus's HTTP API, and every query of the Grafana dashboard
//! (deploy/grafana/sonde.json) must return data there.

use sonde_tests::{
    Scene, find_samples, free_port, http_get, http_get_ok, make_pki, parse_metrics,
    prometheus_expect, prometheus_expect_empty, prometheus_query, prometheus_single, repo_path,
    shipped_scrape_configs_with_file_sd, start_agent, start_aggregator, start_dnsmasq,
    start_nginx_with_tls, start_prometheus_scraping,
};
use std::path::Path;
use std::time::Duration;

/// Bound of each wait for a state to show up in Prometheus.
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn agents_aggregator_prometheus() {
    let mut scene = Scene::new("e2e");

    // ---- the peers
    let rules = [
        repo_path("deploy/prometheus/sonde-alerts.yml"),
        repo_path("deploy/prometheus/compat/existing-alerts.yml"),
    ];
    // The shipped scrape configs, their targets read from files written once sonde runs.
    let aggregator_sd = scene.dir().join("scrape-aggregator.json");
    let agents_sd = scene.dir().join("scrape-agents.json");
    let scrape = shipped_scrape_configs_with_file_sd(&aggregator_sd, &agents_sd);
    let prom = start_prometheus_scraping(&mut scene, "prometheus", &rules, &scrape);
    // A certificate for 127.0.0.1 (make-certs.sh's aggregator certificate), so that an
    // HTTPS target reports probe_ssl_earliest_cert_expiry.
    let pki = make_pki(scene.dir(), "IP:127.0.0.1", &[]);
    let (nginx, https) = start_nginx_with_tls(
        &mut scene,
        "nginx",
        Some((&pki.join("aggregator.pem"), &pki.join("aggregator.key"))),
    );
    let https = https.expect("nginx's HTTPS port");
    let dns = start_dnsmasq(&mut scene, "dnsmasq");
    // Nothing listens here: the port was bound and released.
    let closed = free_port();

    let web_target = format!("http://127.0.0.1:{nginx}/");
    let missing_page = format!("http://127.0.0.1:{nginx}/missing");
    let tls_target = format!("https://127.0.0.1:{https}/");

    // ---- sonde
    let aggregator_config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
modules:
  http_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
  https_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
      fail_if_not_ssl: true
      tls_config:
        insecure_skip_verify: true
  tcp_connect:
    prober: tcp
    tcp:
      preferred_ip_protocol: ip4
  dns_a:
    prober: dns
    dns:
      query_name: example.test
      query_type: A
      preferred_ip_protocol: ip4
jobs:
  - job_name: web
    module: http_2xx
    static_configs:
      - targets: ["{web_target}"]
        labels:
          team: shop
  - job_name: tls
    module: https_2xx
    static_configs:
      - targets: ["{tls_target}"]
  - job_name: web_missing_page
    module: http_2xx
    static_configs:
      - targets: ["{missing_page}"]
  - job_name: closed_port
    module: tcp_connect
    static_configs:
      - targets: ["127.0.0.1:{closed}"]
  - job_name: dns
    module: dns_a
    static_configs:
      - targets: ["127.0.0.1:{dns}"]
  - job_name: alertmanager
    module: tcp_connect
    agents:
      region: mars
    static_configs:
      - targets: ["127.0.0.1:9093"]
remote_write:
  - url: {prom}/api/v1/write
    queue_config:
      batch_send_deadline: 1s
fleet:
  missing_after: 5s
  # Both agents declare the local job `degraded` for the same target (below): one target.
  shared_local_jobs: [degraded]
  limits:
    # Low enough to refuse one sample of the TLS probes (probe_ssl_last_chain_info has 5
    # labels), so that sonde_results_refused_total with reason too_many_labels has data.
    max_labels_per_sample: 4
"#
    );
    let aggregator = start_aggregator(&mut scene, "aggregator", &aggregator_config);
    // Both agents also run a local job `degraded` on the same target: edge-eu's module
    // succeeds and edge-us's fails, so the target is up (quorum any) but degraded.
    let agent_config = |id: &str, region: &str, body: &str| {
        format!(
            r#"agent:
  id: {id}
  labels:
    region: {region}
aggregators:
  - address: {}
modules:
  http_body:
    prober: http
    http:
      preferred_ip_protocol: ip4
      fail_if_body_not_matches_regexp: ["{body}"]
jobs:
  - job_name: degraded
    module: http_body
    interval: 1s
    timeout: 1s
    static_configs:
      - targets: ["{web_target}"]
"#,
            aggregator.grpc
        )
    };
    let edge_eu = start_agent(&mut scene, "edge-eu", &agent_config("edge-eu", "eu", "ok"));
    let edge_us = start_agent(
        &mut scene,
        "edge-us",
        &agent_config("edge-us", "us", "nope"),
    );
    let host_port = |url: &str| url.trim_start_matches("http://").to_string();
    write_file_sd(&aggregator_sd, &[host_port(&aggregator.web)]);
    write_file_sd(&agents_sd, &[host_port(&edge_eu), host_port(&edge_us)]);

    let p = prom.as_str();

    // ---- the three states of a target, as `up`
    scene.wait_until("up{job=web} = 1 (UP)", WAIT, || {
        prometheus_expect(p, r#"up{job="web"}"#, 1.0)
    });
    scene.wait_until("up{job=dns} = 1 (UP)", WAIT, || {
        prometheus_expect(p, r#"up{job="dns"}"#, 1.0)
    });
    scene.wait_until("up{job=web_missing_page} = 0 (DOWN: 404)", WAIT, || {
        prometheus_expect(p, r#"up{job="web_missing_page"}"#, 0.0)
    });
    scene.wait_until("up{job=closed_port} = 0 (DOWN: refused)", WAIT, || {
        prometheus_expect(p, r#"up{job="closed_port"}"#, 0.0)
    });
    scene.wait_until(
        "sonde_job_missing{job=alertmanager} = 1 (no agent in region mars)",
        WAIT,
        || prometheus_expect(p, r#"sonde_job_missing{job="alertmanager"}"#, 1.0),
    );
    prometheus_expect_empty(p, r#"up{job="alertmanager"}"#)
        .expect("a MISSING job has no up series");

    // The merged series carry the target's labels.
    prometheus_expect(p, r#"up{job="web",team="shop"}"#, 1.0)
        .expect("up carries the target's labels");

    // ---- blackbox series, per agent
    for agent in ["edge-eu", "edge-us"] {
        let q = format!(r#"probe_success{{job="web",agent="{agent}"}}"#);
        scene.wait_until(&format!("{q} = 1"), WAIT, || prometheus_expect(p, &q, 1.0));
    }
    scene.wait_until("sonde_target_agents{job=web} = 2", WAIT, || {
        prometheus_expect(p, r#"sonde_target_agents{job="web"}"#, 2.0)
    });
    scene.wait_until("probe_http_status_code 404 for /missing", WAIT, || {
        let series = prometheus_query(p, r#"probe_http_status_code{job="web_missing_page"}"#)?;
        if !series.is_empty() && series.iter().all(|(_, v)| *v == 404.0) {
            Ok(())
        } else {
            Err(format!("{series:?}"))
        }
    });
    scene.wait_until("probe_dns_answer_rrs{job=dns} = 1", WAIT, || {
        let series = prometheus_query(p, r#"probe_dns_answer_rrs{job="dns"}"#)?;
        if !series.is_empty() && series.iter().all(|(_, v)| *v == 1.0) {
            Ok(())
        } else {
            Err(format!("{series:?}"))
        }
    });
    for agent in ["edge-eu", "edge-us"] {
        let q = format!(r#"sonde_agent_up{{agent="{agent}"}}"#);
        scene.wait_until(&format!("{q} = 1"), WAIT, || prometheus_expect(p, &q, 1.0));
    }

    // ---- the users' existing alerts fire on what sonde writes
    for alert in [
        "PrometheusTargetMissing",
        "PrometheusAlertmanagerJobMissing",
    ] {
        let q = format!(r#"ALERTS{{alertname="{alert}",alertstate="firing"}}"#);
        scene.wait_until(
            &format!("{alert} firing"),
            WAIT,
            || match prometheus_query(p, &q)? {
                series if !series.is_empty() => Ok(()),
                _ => Err(format!("{q}: no series")),
            },
        );
    }
    let target_missing = prometheus_query(
        p,
        r#"ALERTS{alertname="PrometheusTargetMissing",alertstate="firing"}"#,
    )
    .expect("query ALERTS");
    let jobs: Vec<&str> = target_missing
        .iter()
        .filter_map(|(labels, _)| labels.get("job").map(String::as_str))
        .collect();
    assert!(
        !jobs.contains(&"web") && !jobs.contains(&"dns"),
        "PrometheusTargetMissing fires for an UP job: {target_missing:?}"
    );

    // ---- the agent counts its probes per target
    for (name, web) in [("edge-eu", &edge_eu), ("edge-us", &edge_us)] {
        scene.wait_until(
            &format!("{name} /metrics sonde_agent_probes_total{{job=web}} > 0"),
            WAIT,
            || {
                let body = http_get_ok(&format!("{web}/metrics"))?;
                let samples = parse_metrics(&body);
                let found = find_samples(
                    &samples,
                    "sonde_agent_probes_total",
                    &[("job", "web"), ("instance", &web_target)],
                );
                match found.as_slice() {
                    [s] if s.value > 0.0 => Ok(()),
                    _ => Err(format!(
                        "sonde_agent_probes_total{{job=\"web\",instance=\"{web_target}\"}}: {found:?}"
                    )),
                }
            },
        );
        http_get_ok(&format!("{web}/-/ready")).expect("agent /-/ready");
    }

    // ---- the aggregator's own endpoints
    let a = aggregator.web.as_str();
    http_get_ok(&format!("{a}/-/healthy")).expect("aggregator /-/healthy");
    scene.wait_until("aggregator /-/ready", WAIT, || {
        http_get_ok(&format!("{a}/-/ready")).map(drop)
    });
    let targets = http_get_ok(&format!("{a}/api/v1/targets")).expect("/api/v1/targets");
    let json: serde_json::Value = serde_json::from_str(&targets)
        .unwrap_or_else(|e| panic!("/api/v1/targets is not JSON ({e}): {targets}"));
    assert!(
        json.to_string()
            .contains(&serde_json::Value::from(web_target.clone()).to_string()),
        "/api/v1/targets does not list {web_target}: {targets}"
    );
    let status_page = http_get(&format!("{a}/")).expect("status page");
    assert_eq!(status_page.0, 200, "GET / : {}", status_page.1);
    let metrics = http_get_ok(&format!("{a}/metrics")).expect("aggregator /metrics");
    let samples = parse_metrics(&metrics);
    let up_web = find_samples(&samples, "up", &[("job", "web"), ("instance", &web_target)]);
    assert!(
        matches!(up_web.as_slice(), [s] if s.value == 1.0),
        "aggregator /metrics should expose up{{job=\"web\"}} 1, found {up_web:?}"
    );

    // ---- the default alerts: one alert per job with DOWN targets, nothing for the rest
    scene.wait_until("SondeTargetDown firing for closed_port", WAIT, || {
        prometheus_expect(
            p,
            r#"count(ALERTS{alertname="SondeTargetDown",alertstate="firing",job="closed_port"})"#,
            1.0,
        )
    });
    prometheus_expect_empty(
        p,
        r#"ALERTS{alertname="SondeTargetDown",job=~"web|dns|tls|degraded"}"#,
    )
    .expect("SondeTargetDown fires only for jobs with DOWN targets");

    // ---- every panel of the Grafana dashboard has data
    check_dashboard(&mut scene, p);

    // ---- an agent dies: an agent problem, not a target problem
    scene.kill("edge-us");
    scene.wait_until("sonde_agent_up{agent=edge-us} = 0", WAIT, || {
        prometheus_expect(p, r#"sonde_agent_up{agent="edge-us"}"#, 0.0)
    });
    scene.hold_for(
        "up{job=web} stays 1 and fresh through edge-eu alone",
        Duration::from_secs(10),
        || {
            prometheus_expect(p, r#"up{job="web"}"#, 1.0)?;
            // Still being written, not just Prometheus's 5-minute lookback.
            let age = prometheus_single(p, r#"time() - timestamp(up{job="web"})"#)?;
            if age < 10.0 {
                Ok(())
            } else {
                Err(format!("the last up{{job=\"web\"}} sample is {age}s old"))
            }
        },
    );
    prometheus_expect(p, r#"sonde_agent_up{agent="edge-eu"}"#, 1.0).expect("edge-eu is still up");
    scene.wait_until("sonde_target_agents{job=web} = 1", WAIT, || {
        prometheus_expect(p, r#"sonde_target_agents{job="web"}"#, 1.0)
    });

    // ---- the target dies: DOWN
    scene.kill("nginx");
    scene.wait_until("up{job=web} = 0 after nginx stops", WAIT, || {
        prometheus_expect(p, r#"up{job="web"}"#, 0.0)
    });
}

/// Writes a Prometheus file_sd file (JSON) with `targets` (host:port).
fn write_file_sd(file: &Path, targets: &[String]) {
    let json = serde_json::json!([{ "targets": targets }]);
    std::fs::write(file, json.to_string())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
}

/// Every query of every panel of deploy/grafana/sonde.json, with the dashboard's
/// variables set to "All" (`$job`, `$region` → `.*`) and Grafana's `$__rate_interval` to
/// 1m, returns data from the real Prometheus; and every sonde or blackbox metric a query
/// names has series there, so that `... or vector(0)` cannot hide a misspelt metric.
fn check_dashboard(scene: &mut Scene, prometheus: &str) {
    let text = std::fs::read_to_string(repo_path("deploy/grafana/sonde.json"))
        .expect("read deploy/grafana/sonde.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("deploy/grafana/sonde.json is JSON");
    let mut queries = Vec::new();
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            queries.push((title.to_string(), expr.to_string()));
        }
    }
    assert!(queries.len() >= 20, "too few panel queries: {queries:?}");
    let mut metrics = std::collections::BTreeSet::new();
    for (title, expr) in &queries {
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", ".*")
            .replace("$region", ".*");
        assert!(
            !query.contains('$'),
            "panel {title:?}: a variable this test does not know in {expr}"
        );
        scene.wait_until(
            &format!("panel {title:?}: {query} to return data"),
            WAIT,
            || match prometheus_query(prometheus, &query)? {
                series if series.is_empty() => Err("no data".to_string()),
                _ => Ok(()),
            },
        );
        for word in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("sonde_") || word.starts_with("probe_") {
                metrics.insert(word.to_string());
            }
        }
    }
    for metric in metrics {
        let query = format!("count({metric})");
        scene.wait_until(&format!("series of {metric}"), WAIT, || {
            prometheus_single(prometheus, &query).map(drop)
        });
    }
}
