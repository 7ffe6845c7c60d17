//! `http_sd_configs` and `dns_sd_configs` end to end: the real aggregator discovers its
//! targets from a real HTTP server (hyper, on loopback, answering what the test sets)
//! and from dnsmasq, and follows targets appearing, changing and disappearing; a
//! failing server keeps the last good list and counts the failures.

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sonde_tests::{
    Scene, free_tcp_udp_port, http_get_ok, metric_sum, require_tool, start_aggregator,
};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the test's HTTP server answers: status, Content-Type, body.
type Answer = Arc<Mutex<(u16, &'static str, String)>>;

/// A hyper server on loopback answering every request with the current [`Answer`].
fn start_http_sd_server(runtime: &tokio::runtime::Runtime, answer: Answer) -> u16 {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the http_sd server");
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    let (status, content_type, body) = answer.lock().unwrap().clone();
                    async move {
                        hyper::Response::builder()
                            .status(status)
                            .header("Content-Type", content_type)
                            .body(Full::new(Bytes::from(body)))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// The aggregator's targets of `job`: instance → labels.
fn targets_of(web: &str, job: &str) -> Result<BTreeMap<String, BTreeMap<String, String>>, String> {
    let body = http_get_ok(&format!("{web}/api/v1/targets"))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let list = v["data"].as_array().ok_or(format!("no data in {body}"))?;
    Ok(list
        .iter()
        .filter(|t| t["job"] == job)
        .map(|t| {
            let labels = t["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            (
                t["instance"].as_str().unwrap_or_default().to_string(),
                labels,
            )
        })
        .collect())
}

fn expect_instances(
    scene: &mut Scene,
    web: &str,
    job: &str,
    want: &[&str],
) -> BTreeMap<String, BTreeMap<String, String>> {
    scene.wait_until(
        &format!("job {job} to have targets {want:?}"),
        Duration::from_secs(30),
        || {
            let got = targets_of(web, job)?;
            let names: Vec<&str> = got.keys().map(String::as_str).collect();
            if names == want {
                Ok(got)
            } else {
                Err(format!("{names:?}"))
            }
        },
    )
}

/// Asserts that job `job` keeps exactly the targets `want` for three seconds.
fn hold_instances(scene: &mut Scene, web: &str, job: &str, want: &[&str]) {
    scene.hold_for(
        &format!("job {job} keeps targets {want:?}"),
        Duration::from_secs(3),
        || {
            let got = targets_of(web, job)?;
            let names: Vec<&str> = got.keys().map(String::as_str).collect();
            if names == want {
                Ok(())
            } else {
                Err(format!("{names:?}"))
            }
        },
    );
}

fn failures(web: &str, mechanism: &str) -> f64 {
    metric_sum(
        web,
        "sonde_sd_refresh_failures_total",
        &[("mechanism", mechanism)],
    )
    .unwrap_or(0.0)
}

const MODULES: &str =
    "global: {scrape_interval: 10s, scrape_timeout: 5s}\nmodules:\n  tcp: {prober: tcp}\n";

#[test]
fn http_sd_follows_the_server_and_keeps_the_last_list_when_it_fails() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answer: Answer = Arc::new(Mutex::new((
        200,
        "application/json",
        r#"[{"targets": ["127.0.0.1:7001"], "labels": {"team": "a"}}]"#.to_string(),
    )));
    let port = start_http_sd_server(&runtime, answer.clone());
    let mut scene = Scene::new("http-sd");
    let aggregator = start_aggregator(
        &mut scene,
        "aggregator",
        &format!(
            "{MODULES}jobs:\n  - job_name: from_http\n    module: tcp\n    http_sd_configs:\n      - url: http://127.0.0.1:{port}/targets\n        refresh_interval: 1s\n"
        ),
    );
    let web = aggregator.web.clone();
    let set = |status: u16, content_type: &'static str, body: &str| {
        *answer.lock().unwrap() = (status, content_type, body.to_string());
    };

    let t = expect_instances(&mut scene, &web, "from_http", &["127.0.0.1:7001"]);
    assert_eq!(t["127.0.0.1:7001"]["team"], "a");
    assert!(
        !t["127.0.0.1:7001"].contains_key("__meta_url"),
        "meta labels are dropped without relabeling: {t:?}"
    );

    // A target appears, the first one's labels change.
    set(
        200,
        "application/json; charset=utf-8",
        r#"[{"targets": ["127.0.0.1:7001"], "labels": {"team": "b"}}, {"targets": ["127.0.0.1:7002"]}]"#,
    );
    scene.wait_until("the new labels", Duration::from_secs(30), || {
        let t = targets_of(&web, "from_http")?;
        match t.get("127.0.0.1:7001").and_then(|l| l.get("team")) {
            Some(team) if team == "b" && t.contains_key("127.0.0.1:7002") => Ok(()),
            _ => Err(format!("{t:?}")),
        }
    });

    // Errors keep the last good list, and are counted.
    for (status, content_type, body) in [
        (500, "application/json", "[]"),
        (200, "application/json", "[{\"targets\": [unclosed"),
        (200, "text/plain", "[]"),
    ] {
        let before = failures(&web, "http");
        set(status, content_type, body);
        scene.wait_until(
            &format!("a failure counted for {status} {content_type} {body:?}"),
            Duration::from_secs(30),
            || match failures(&web, "http") {
                n if n > before => Ok(()),
                n => Err(format!("{n}")),
            },
        );
        // Discovery passes run once a second: an emptied list would show within this.
        hold_instances(
            &mut scene,
            &web,
            "from_http",
            &["127.0.0.1:7001", "127.0.0.1:7002"],
        );
    }

    // A target disappears.
    set(
        200,
        "application/json",
        r#"[{"targets": ["127.0.0.1:7002"]}]"#,
    );
    expect_instances(&mut scene, &web, "from_http", &["127.0.0.1:7002"]);
    scene.stop();
}

/// dnsmasq answering `records` (its config lines) for names under `sd.test`, nothing else.
fn start_dnsmasq_with(scene: &mut Scene, name: &str, port: u16, records: &str) {
    let dnsmasq = require_tool("dnsmasq", "dnsmasq-base");
    let conf = scene.dir().write(&format!("{name}.conf"), records);
    let mut cmd = Command::new(dnsmasq);
    cmd.arg("--keep-in-foreground")
        .arg("--no-resolv")
        .arg("--no-hosts")
        .arg("--no-poll")
        .arg(format!("--conf-file={}", conf.display()))
        .arg("--local=/sd.test/")
        .arg("--listen-address=127.0.0.1")
        .arg("--bind-interfaces")
        .arg(format!("--port={port}"))
        .arg(format!(
            "--pid-file={}",
            scene.dir().path().join(format!("{name}.pid")).display()
        ))
        .arg("--log-facility=-")
        .arg("--log-queries");
    scene.spawn(name, cmd);
}

#[test]
fn dns_sd_follows_srv_and_a_records_and_keeps_the_last_list_when_the_server_fails() {
    let mut scene = Scene::new("dns-sd");
    let port = free_tcp_udp_port();
    let first = "srv-host=_web._tcp.sd.test,web1.sd.test,8080\nhost-record=web1.sd.test,127.0.0.11\nhost-record=db.sd.test,127.0.0.21\n";
    start_dnsmasq_with(&mut scene, "dns-1", port, first);
    let aggregator = start_aggregator(
        &mut scene,
        "aggregator",
        &format!(
            "{MODULES}jobs:
  - job_name: from_srv
    module: tcp
    dns_sd_configs:
      - names: [_web._tcp.sd.test]
        refresh_interval: 1s
        nameservers: ['127.0.0.1:{port}']
  - job_name: from_a
    module: tcp
    dns_sd_configs:
      - names: [db.sd.test]
        type: A
        port: 5432
        refresh_interval: 1s
        nameservers: ['127.0.0.1:{port}']
"
        ),
    );
    let web = aggregator.web.clone();
    expect_instances(&mut scene, &web, "from_srv", &["web1.sd.test:8080"]);
    expect_instances(&mut scene, &web, "from_a", &["127.0.0.21:5432"]);

    // A record appears (SRV and A), a port and an address change.
    scene.kill("dns-1");
    let second = "srv-host=_web._tcp.sd.test,web1.sd.test,8081\nsrv-host=_web._tcp.sd.test,web2.sd.test,8080\nhost-record=db.sd.test,127.0.0.22\nhost-record=db.sd.test,127.0.0.23\n";
    start_dnsmasq_with(&mut scene, "dns-2", port, second);
    expect_instances(
        &mut scene,
        &web,
        "from_srv",
        &["web1.sd.test:8081", "web2.sd.test:8080"],
    );
    expect_instances(
        &mut scene,
        &web,
        "from_a",
        &["127.0.0.22:5432", "127.0.0.23:5432"],
    );

    // The server stops answering: the lists stay, the failures are counted.
    scene.kill("dns-2");
    let before = failures(&web, "dns");
    scene.wait_until(
        "dns failures counted",
        Duration::from_secs(60),
        || match failures(&web, "dns") {
            n if n >= before + 2.0 => Ok(()),
            n => Err(format!("{n}")),
        },
    );
    hold_instances(
        &mut scene,
        &web,
        "from_srv",
        &["web1.sd.test:8081", "web2.sd.test:8080"],
    );
    hold_instances(
        &mut scene,
        &web,
        "from_a",
        &["127.0.0.22:5432", "127.0.0.23:5432"],
    );

    // Records disappear: an SRV name with one record left, an A name gone (NXDOMAIN).
    let third = "srv-host=_web._tcp.sd.test,web2.sd.test,8080\n";
    start_dnsmasq_with(&mut scene, "dns-3", port, third);
    expect_instances(&mut scene, &web, "from_srv", &["web2.sd.test:8080"]);
    expect_instances(&mut scene, &web, "from_a", &[]);
    scene.stop();
}
