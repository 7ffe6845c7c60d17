//! The shipped alert rules and dashboard in the Prometheus a user already has: besides
//! sonde's remote write, it scrapes sonde's own `/metrics` (deploy/prometheus/scrape-sonde.yml)
//! and other jobs: a node exporter that is down (a closed loopback port) and an exporter
//! whose page has the `probe_*` names of blackbox_exporter. Those other jobs' `up` and
//! `probe_*` series are not sonde's: `SondeTargetDown` must not fire for the one that is
//! down, and no panel of deploy/grafana/sonde.json may count them. A target of sonde's
//! going down must still fire the alert and show on the dashboard.

use sonde_tests::{
    Labels, Scene, accepting_tcp_port, free_port, http_get, nginx_flip_file, prometheus_alerts,
    prometheus_expect, prometheus_query, repo_path, shipped_scrape_configs_with_file_sd,
    start_agent, start_aggregator, start_nginx, start_prometheus_scraping,
};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_secs(60);

/// The scrape jobs of the Prometheus that are not sonde's probing: their `up` is the
/// scrape's, their `probe_*` another exporter's.
const OTHER_JOBS: &[&str] = &["sonde-aggregator", "sonde-agent", "node", "blackbox"];

/// A metrics page with the series blackbox_exporter exposes for one probe, values a sonde
/// agent would never report (a failed probe of 5 s), served on a loopback port by a thread
/// for the rest of the test process.
fn start_other_exporter() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the exporter");
    let port = listener.local_addr().expect("exporter address").port();
    let body = "\
probe_success 0
probe_duration_seconds 5
probe_http_duration_seconds{phase=\"connect\"} 5
probe_http_duration_seconds{phase=\"processing\"} 5
probe_dns_duration_seconds{phase=\"resolve\"} 5
probe_ssl_earliest_cert_expiry 1.0e+09
";
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 2048];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn write_file_sd(file: &Path, target: &str) {
    let json = serde_json::json!([{ "targets": [target] }]);
    std::fs::write(file, json.to_string())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
}

/// A query's result: each series' labels and its value as Prometheus printed it, sorted.
type Exact = Vec<(Labels, String)>;

/// An instant query at `time` (unix seconds), sorted, so that two evaluations compare
/// exactly.
fn query_at(prom: &str, promql: &str, time: f64) -> Result<Exact, String> {
    let url = url::Url::parse_with_params(
        &format!("{prom}/api/v1/query"),
        &[("query", promql), ("time", &format!("{time:.3}"))],
    )
    .map_err(|e| e.to_string())?;
    let (status, body) = http_get(url.as_str())?;
    let json: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("{promql}: status {status}, not JSON ({e}): {body}"))?;
    if json["status"] != "success" {
        return Err(format!("{promql}: status {status}: {body}"));
    }
    let value = |v: &serde_json::Value| v[1].as_str().unwrap_or_default().to_string();
    let data = &json["data"];
    let mut out = match data["resultType"].as_str() {
        Some("scalar") => vec![(Labels::new(), value(&data["result"]))],
        Some("vector") => data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                (labels, value(&s["value"]))
            })
            .collect(),
        other => return Err(format!("{promql}: unexpected result type {other:?}")),
    };
    out.sort();
    Ok(out)
}

/// `promql` with every selector of `up` and of the `probe_*` metrics narrowed to the jobs
/// that are not in [`OTHER_JOBS`]: what the query returns where sonde is alone.
fn without_other_jobs(promql: &str) -> String {
    let matcher = format!("job!~\"{}\"", OTHER_JOBS.join("|"));
    let chars: Vec<char> = promql.chars().collect();
    let mut out = String::new();
    let (mut i, mut braces, mut quoted) = (0, 0, false);
    while i < chars.len() {
        let c = chars[i];
        if quoted {
            out.push(c);
            if c == '\\' && i + 1 < chars.len() {
                out.push(chars[i + 1]);
                i += 1;
            } else if c == '"' {
                quoted = false;
            }
            i += 1;
            continue;
        }
        match c {
            '"' => quoted = true,
            '{' => braces += 1,
            '}' => braces -= 1,
            _ => {}
        }
        let starts_word = (c.is_ascii_alphabetic() || c == '_')
            && (i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_'));
        if braces > 0 || !starts_word {
            out.push(c);
            i += 1;
            continue;
        }
        let end = (i..chars.len())
            .find(|&j| !(chars[j].is_ascii_alphanumeric() || chars[j] == '_' || chars[j] == ':'))
            .unwrap_or(chars.len());
        let word: String = chars[i..end].iter().collect();
        out.push_str(&word);
        i = end;
        if word == "up" || word.starts_with("probe_") {
            let next = (i..chars.len()).find(|&j| !chars[j].is_whitespace());
            match next.map(|j| chars[j]) {
                Some('(') => {} // a function, not a metric (none is named so, but be exact)
                Some('{') => {
                    let j = next.expect("checked");
                    out.extend(&chars[i..=j]);
                    out.push_str(&matcher);
                    out.push(',');
                    braces += 1;
                    i = j + 1;
                }
                _ => {
                    out.push('{');
                    out.push_str(&matcher);
                    out.push('}');
                }
            }
        }
    }
    out
}

/// Every query of every panel of deploy/grafana/sonde.json, as (panel title, query) with
/// the dashboard's variables at "All" (`.*`) and `$__rate_interval` at 1m.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_path("deploy/grafana/sonde.json"))
        .expect("read deploy/grafana/sonde.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a panel query");
            let query = expr
                .replace("$__rate_interval", "1m")
                .replace("$job", ".*")
                .replace("$region", ".*");
            assert!(
                !query.contains('$'),
                "panel {title:?}: a variable this test does not know: {expr}"
            );
            out.push((title.to_string(), query));
        }
    }
    assert!(out.len() >= 20, "too few panel queries: {out:?}");
    out
}

/// The dashboard's query variables (`label_values(METRIC, LABEL)`), as (name, metric, label).
fn dashboard_variables() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo_path("deploy/grafana/sonde.json")).expect("read");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let mut out = Vec::new();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        if variable["type"] != "query" {
            continue;
        }
        let name = variable["name"].as_str().expect("a variable name");
        let definition = variable["definition"]
            .as_str()
            .expect("a query variable's definition");
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!("variable {name}: {definition} is not label_values(METRIC, LABEL)")
            });
        let (metric, label) = inner
            .split_once(',')
            .unwrap_or_else(|| panic!("variable {name}: {definition}"));
        out.push((
            name.to_string(),
            metric.trim().to_string(),
            label.trim().to_string(),
        ));
    }
    out
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Every panel query returns, at the same instant, exactly what it returns with the other
/// jobs' `up` and `probe_*` series left out; the fleet overview counts sonde's targets;
/// each variable offers only sonde's values.
fn check_dashboard(scene: &mut Scene, prom: &str, up: usize, down: usize, jobs: &[&str]) {
    let queries = dashboard_queries();
    let find = |title: &str| {
        queries
            .iter()
            .find(|(t, _)| t == title)
            .map(|(_, q)| q.clone())
            .unwrap_or_else(|| panic!("no panel {title:?}"))
    };
    for (title, want) in [("Targets up", up), ("Targets down", down)] {
        let query = find(title);
        scene.wait_until(&format!("panel {title:?} = {want}"), WAIT, || {
            prometheus_expect(prom, &query, want as f64)
        });
    }
    let at = now_seconds() - 1.0;
    for (title, query) in &queries {
        let alone = without_other_jobs(query);
        let shared = query_at(prom, query, at).unwrap_or_else(|e| panic!("panel {title:?}: {e}"));
        let sonde_only =
            query_at(prom, &alone, at).unwrap_or_else(|e| panic!("panel {title:?}: {e}"));
        assert_eq!(
            shared, sonde_only,
            "panel {title:?} counts series that are not sonde's:\n  {query}\nreturns what\n  {alone}\ndoes not"
        );
    }
    for (name, metric, label) in dashboard_variables() {
        let url = url::Url::parse_with_params(
            &format!("{prom}/api/v1/label/{label}/values"),
            &[("match[]", metric.as_str())],
        )
        .expect("URL");
        let (_, body) = http_get(url.as_str()).expect("label values");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let values: Vec<&str> = json["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        let want: Vec<&str> = match name.as_str() {
            "job" => jobs.to_vec(),
            "region" => vec!["eu"],
            other => panic!("a variable this test does not know: {other}"),
        };
        assert_eq!(
            values, want,
            "the dashboard's variable {name} ({metric}, {label})"
        );
    }
}

/// (alertname, job, value) of the alerts firing in Prometheus.
fn firing(prom: &str) -> Result<Vec<(String, String, f64)>, String> {
    Ok(prometheus_alerts(prom)?
        .iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| {
            let label = |k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
            let value = a["value"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            (label("alertname"), label("job"), value)
        })
        .collect())
}

/// The SondeTargetDown rule is loaded and evaluates without error.
fn target_down_rule_healthy(prom: &str) -> Result<(), String> {
    let (_, body) = http_get(&format!("{prom}/api/v1/rules"))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let rule = v["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .find(|r| r["name"] == "SondeTargetDown")
        .ok_or("SondeTargetDown is not loaded")?;
    match (rule["health"].as_str(), rule["lastError"].as_str()) {
        (Some("ok"), _) => Ok(()),
        (health, error) => Err(format!(
            "SondeTargetDown: health {health:?}, error {error:?}"
        )),
    }
}

#[test]
fn alerts_and_dashboard_count_only_sondes_targets_among_other_scrape_jobs() {
    let mut scene = Scene::new("shared-prometheus");
    let nginx = start_nginx(&mut scene, "nginx");
    let tcp = accepting_tcp_port();
    // Nothing listens here: a node exporter that is down.
    let node_exporter = free_port();
    let exporter = start_other_exporter();

    let aggregator_sd = scene.dir().join("scrape-aggregator.json");
    let agent_sd = scene.dir().join("scrape-agent.json");
    let mut scrape = shipped_scrape_configs_with_file_sd(&aggregator_sd, &agent_sd);
    scrape.push_str(&format!(
        "\n- job_name: node\n  static_configs:\n    - targets: [\"127.0.0.1:{node_exporter}\"]\n\
         - job_name: blackbox\n  static_configs:\n    - targets: [\"127.0.0.1:{exporter}\"]\n"
    ));
    let prom = start_prometheus_scraping(
        &mut scene,
        "prometheus",
        &[repo_path("deploy/prometheus/sonde-alerts.yml")],
        &scrape,
    );

    let flip = format!("http://127.0.0.1:{nginx}/flip");
    let aggregator = start_aggregator(
        &mut scene,
        "aggregator",
        &format!(
            r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
modules:
  http_2xx: {{prober: http, http: {{preferred_ip_protocol: ip4}}}}
  tcp_connect: {{prober: tcp, tcp: {{preferred_ip_protocol: ip4}}}}
jobs:
  - job_name: web
    module: http_2xx
    static_configs: [{{targets: ["http://127.0.0.1:{nginx}/", "{flip}"]}}]
  - job_name: tcp
    module: tcp_connect
    static_configs: [{{targets: ["127.0.0.1:{tcp}"]}}]
remote_write:
  - url: {prom}/api/v1/write
    queue_config:
      batch_send_deadline: 1s
"#
        ),
    );
    let agent = start_agent(
        &mut scene,
        "edge-eu",
        &format!(
            "agent:\n  id: edge-eu\n  labels: {{region: eu}}\naggregators:\n  - address: {}\n",
            aggregator.grpc
        ),
    );
    let host_port = |url: &str| url.trim_start_matches("http://").to_string();
    write_file_sd(&aggregator_sd, &host_port(&aggregator.web));
    write_file_sd(&agent_sd, &host_port(&agent));
    let p = prom.as_str();

    // ---- everything of sonde's up; one of the other scrape jobs down
    scene.wait_until("sonde's 3 targets up in Prometheus", WAIT, || {
        prometheus_expect(p, r#"count(up{job=~"web|tcp"} == 1)"#, 3.0)
    });
    for (job, value) in [
        ("node", 0.0),
        ("blackbox", 1.0),
        ("sonde-aggregator", 1.0),
        ("sonde-agent", 1.0),
    ] {
        scene.wait_until(&format!("the scrape job {job} at up {value}"), WAIT, || {
            prometheus_expect(p, &format!("up{{job=\"{job}\"}}"), value)
        });
    }
    scene.wait_until("probe_* series of the other exporter", WAIT, || {
        prometheus_expect(
            p,
            r#"count(probe_http_duration_seconds{job="blackbox"})"#,
            2.0,
        )
    });
    scene.wait_until(
        "sonde's probe_http_duration_seconds",
        WAIT,
        || match prometheus_query(p, r#"probe_http_duration_seconds{agent="edge-eu"}"#)? {
            s if s.is_empty() => Err("none yet".into()),
            _ => Ok(()),
        },
    );
    scene.wait_until("SondeTargetDown loaded and evaluated", WAIT, || {
        target_down_rule_healthy(p)
    });
    // Rules are evaluated every second: a few evaluations with the node exporter down.
    scene.hold_for(
        "no SondeTargetDown for the node exporter's scrape job",
        Duration::from_secs(5),
        || {
            let alerts = firing(p)?;
            match alerts.iter().find(|(name, _, _)| name == "SondeTargetDown") {
                Some(alert) => Err(format!("{alert:?} fires; sonde's targets are all up")),
                None => Ok(()),
            }
        },
    );
    check_dashboard(&mut scene, p, 3, 0, &["tcp", "web"]);

    // ---- a target of sonde's goes down: the alert fires, for it alone
    std::fs::write(nginx_flip_file(&scene, "nginx"), "down").expect("make /flip fail");
    scene.wait_until("SondeTargetDown firing for job web", WAIT, || {
        let alerts = firing(p)?;
        let down: Vec<_> = alerts
            .iter()
            .filter(|(name, _, _)| name == "SondeTargetDown")
            .collect();
        match down.as_slice() {
            [(_, job, value)] if job == "web" && *value == 1.0 => Ok(()),
            _ => Err(format!("{alerts:?}")),
        }
    });
    check_dashboard(&mut scene, p, 2, 1, &["tcp", "web"]);
    let not_up = dashboard_queries()
        .into_iter()
        .find(|(title, _)| title == "Targets not up")
        .expect("the panel Targets not up")
        .1;
    let rows = prometheus_query(p, &not_up).expect("Targets not up");
    let instances: Vec<&str> = rows
        .iter()
        .filter_map(|(labels, _)| labels.get("instance").map(String::as_str))
        .collect();
    assert_eq!(instances, [flip.as_str()], "Targets not up: {rows:?}");
    scene.check_running().expect("every process still running");
}
