//! Assignments of any size (DESIGN, "Big fleets"): one job of 50,000 targets from a
//! file_sd file reaches one real agent through the real aggregator, in parts, without a
//! reconnect; and an assignment the agent cannot take is refused with its reason shown
//! on the aggregator, while the stream stays up and the agent keeps its previous checks.

use serde_json::Value;
use sonde_proto::pb::{
    self, AgentMessage, AggregatorMessage, agent_message, aggregator_message,
    fleet_client::FleetClient,
    fleet_server::{Fleet, FleetServer},
};
use sonde_tests::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const TARGETS: usize = 50_000;
const WAIT: Duration = Duration::from_secs(120);

/// The agent's entry in the aggregator's `/api/v1/agents`.
fn agent_entry(web: &str, id: &str) -> Result<Value, String> {
    let body = http_get_ok(&format!("{web}/api/v1/agents"))?;
    let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["data"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["agent"] == id))
        .cloned()
        .ok_or_else(|| format!("agent {id} not in {body}"))
}

fn reconnects(agent: &str) -> f64 {
    metric_sum(agent, "sonde_agent_stream_reconnects_total", &[]).unwrap_or(0.0)
}

#[test]
fn fifty_thousand_targets_reach_one_agent() {
    let mut scene = Scene::new("big-assignment");
    let nginx = start_nginx(&mut scene, "nginx");
    let targets_file = fleet_targets(&scene, nginx);
    let config = format!(
        r#"modules:
  http_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
jobs:
  - job_name: fleet
    module: http_2xx
    # Long enough for a loaded test machine: 50,000 probes spread over 10 minutes, some
    # 80 a second (a debug-build aggregator on two busy cores commits a few hundred).
    interval: 10m
    timeout: 5s
    file_sd_configs:
      - files: ["{}"]
fleet:
  limits:
    max_series: 5000000
    max_series_bytes: 2GiB
"#,
        targets_file.display()
    );
    let aggregator = start_aggregator(&mut scene, "aggregator", &config);
    let started = Instant::now();
    let agent = start_agent(
        &mut scene,
        "edge",
        &format!(
            "agent:\n  id: edge\naggregators:\n  - address: {}\n",
            aggregator.grpc
        ),
    );

    scene.wait_until(
        "the agent runs all 50,000 checks",
        WAIT,
        || match metric_sum(&agent, "sonde_agent_checks", &[])? {
            n if n as usize == TARGETS => Ok(()),
            n => Err(format!("{n} checks")),
        },
    );
    eprintln!(
        "50,000 checks running on the agent {:?} after it started",
        started.elapsed()
    );
    let web = aggregator.web.clone();
    let entry = scene.wait_until(
        "the aggregator to show the assignment applied",
        WAIT,
        || {
            let a = agent_entry(&web, "edge")?;
            if a["assignment"]["state"] == "applied" {
                Ok(a)
            } else {
                Err(a["assignment"].to_string())
            }
        },
    );
    assert_eq!(entry["assignment"]["checks"], TARGETS as u64, "{entry}");
    let text = entry["assignment"]["text"].as_str().unwrap_or_default();
    assert!(text.ends_with(": 50,000 checks applied"), "{text}");

    // Results of the job arrive and are committed: the aggregator acks them. (Its
    // `/api/v1/targets` lists all 50,000 targets, too much to poll here.)
    scene.wait_until(
        "results of the job committed by the aggregator",
        WAIT,
        || match metric_sum(&agent, "sonde_agent_results_acked_total", &[])? {
            n if n >= 20.0 => Ok(()),
            n => Err(format!("{n} results acked")),
        },
    );

    // One stream all along: no reconnect loop.
    assert_eq!(reconnects(&agent), 0.0);
    scene.hold_for(
        "the agent stays connected",
        Duration::from_secs(5),
        || match (
            reconnects(&agent),
            metric_sum(&agent, "sonde_agent_stream_connected", &[])?,
        ) {
            (0.0, 1.0) => Ok(()),
            other => Err(format!("(reconnects, connected) = {other:?}")),
        },
    );
    let log = scene.process("aggregator").log();
    assert!(!log.contains("h2 protocol error"), "{}", tail(&log, 40));
    assert!(
        !log.contains("cannot send the assignment"),
        "{}",
        tail(&log, 40)
    );
}

/// The job's status in the aggregator's `/api/v1/jobs`: (status, why).
fn job_status(web: &str, job: &str) -> Result<(String, String), String> {
    let body = http_get_ok(&format!("{web}/api/v1/jobs"))?;
    let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let j = v["data"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["job"] == job))
        .ok_or_else(|| format!("job {job} not in {body}"))?;
    Ok((
        j["status"].as_str().unwrap_or_default().to_string(),
        j["why"].as_str().unwrap_or_default().to_string(),
    ))
}

/// An nginx answering `/` with 200 whatever the query, with room for the probes of
/// 50,000 targets (the harness's has 64 connections), closing each connection after its
/// answer (a probe's connection is of no further use).
fn start_busy_nginx(scene: &mut Scene) -> u16 {
    let nginx = require_tool("nginx", "nginx-light");
    let port = free_port();
    let dir = scene.dir().join("nginx");
    std::fs::create_dir_all(&dir).expect("create nginx dir");
    let config = replace_once(
        &nginx_config(
            &dir,
            &format!(
                "    server {{\n        listen 127.0.0.1:{port};\n        keepalive_timeout 0;\n        location = / {{ return 200 \"ok\\n\"; }}\n    }}\n"
            ),
        ),
        "worker_connections 64;",
        "worker_connections 1000;",
    );
    let config_path = scene.dir().write("nginx/nginx.conf", &config);
    let mut cmd = std::process::Command::new(nginx);
    cmd.arg("-c")
        .arg(&config_path)
        .arg("-p")
        .arg(&dir)
        .args(["-e", "stderr"]);
    scene.spawn("nginx", cmd);
    let url = format!("http://127.0.0.1:{port}/?target=0");
    scene.wait_until(
        "nginx to serve /",
        Duration::from_secs(30),
        || match http_get(&url)? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    port
}

/// Every setting of the aggregator at its default: the one agent of a 50,000-target job
/// gets all of them up in the first round, and the aggregator refuses none of the results of the checks it
/// assigned (they bring their own series budget, whatever `fleet.limits.max_series`).
#[test]
fn one_agent_gets_all_fifty_thousand_targets_up_at_the_default_limits() {
    let mut scene = Scene::new("big-job-defaults");
    let nginx = start_busy_nginx(&mut scene);
    let targets_file = fleet_targets(&scene, nginx);
    let config = format!(
        r#"modules:
  http_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
jobs:
  - job_name: fleet
    module: http_2xx
    # 400 probes a second: what a debug build on a loaded two-core machine keeps up with.
    interval: 2m
    timeout: 10s
    file_sd_configs:
      - files: ["{}"]
"#,
        targets_file.display()
    );
    let aggregator = start_aggregator(&mut scene, "aggregator", &config);
    let started = Instant::now();
    start_agent(
        &mut scene,
        "edge",
        &format!(
            "agent:\n  id: edge\naggregators:\n  - address: {}\n",
            aggregator.grpc
        ),
    );
    let web = aggregator.web.clone();
    let want = format!("{TARGETS} of {TARGETS} targets up");
    scene.wait_until(
        "all 50,000 targets up",
        Duration::from_secs(420),
        || match job_status(&web, "fleet")? {
            (status, why) if status == "ok" && why == want => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    eprintln!(
        "50,000 targets up {:?} after the agent started",
        started.elapsed()
    );
    // `/metrics` is too large to read here; the first refusal of an agent is always
    // logged.
    let log = scene.process("aggregator").log();
    assert!(!log.contains("refused from an agent"), "{}", tail(&log, 20));
}

/// A stand-in aggregator that sends each stream a scripted sequence of assignment parts
/// and records the agent's reports, to make the real agent meet what no honest
/// aggregator sends.
#[derive(Clone, Default)]
struct Scripted {
    script: Arc<Vec<AggregatorMessage>>,
    sessions: Arc<AtomicUsize>,
    reports: Arc<Mutex<Vec<pb::AssignmentReport>>>,
}

#[tonic::async_trait]
impl Fleet for Scripted {
    type SessionStream = ReceiverStream<Result<AggregatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        for m in self.script.iter() {
            tx.try_send(Ok(m.clone()))
                .expect("the script fits the channel");
        }
        let reports = self.reports.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                match message.msg {
                    Some(agent_message::Msg::AssignmentReport(r)) => {
                        reports.lock().unwrap().push(r)
                    }
                    Some(agent_message::Msg::Results(batch)) => {
                        if let Some(acked_seq) = batch.results.iter().map(|r| r.seq).max() {
                            let ack = AggregatorMessage {
                                msg: Some(aggregator_message::Msg::Ack(pb::Ack { acked_seq })),
                            };
                            let _ = tx.send(Ok(ack)).await;
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn part(generation: u64, part: u32, last: bool, checks: Vec<pb::Check>) -> AggregatorMessage {
    AggregatorMessage {
        msg: Some(aggregator_message::Msg::Assignment(pb::Assignment {
            generation,
            checks,
            part,
            last,
            modules: if part == 0 {
                vec![pb::AssignedModule {
                    name: "tcp_connect".into(),
                    json: r#"{"prober":"tcp"}"#.into(),
                }]
            } else {
                vec![]
            },
        })),
    }
}

fn tcp_check(port: u16, module: u32) -> pb::Check {
    pb::Check {
        job: "scripted".into(),
        instance: format!("127.0.0.1:{port}"),
        interval_ms: 1_000,
        timeout_ms: 1_000,
        retries: 0,
        module,
        target: String::new(),
    }
}

#[test]
fn the_agent_refuses_what_it_cannot_take_and_stays_connected() {
    let mut scene = Scene::new("refused-assignment");
    let port = accepting_tcp_port();
    let other = accepting_tcp_port();
    let fake = Scripted {
        script: Arc::new(vec![
            // Applied: one check.
            part(1, 0, true, vec![tcp_check(port, 0)]),
            // Part 1 skipped: refused whole.
            part(2, 0, false, vec![tcp_check(other, 0)]),
            part(2, 2, true, vec![tcp_check(other, 0)]),
            // A module that is not in the table: refused whole.
            part(3, 0, true, vec![tcp_check(other, 7)]),
        ]),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(FleetServer::new(fake.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let agent = start_agent(
        &mut scene,
        "edge",
        &format!("agent:\n  id: edge\naggregators:\n  - address: {address}\n"),
    );
    let reports = scene.wait_until("the agent's three reports", WAIT, || {
        let r = fake.reports.lock().unwrap().clone();
        if r.len() >= 3 {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    });
    let summary: Vec<(u64, bool)> = reports.iter().map(|r| (r.generation, r.applied)).collect();
    assert_eq!(summary, [(1, true), (2, false), (3, false)]);
    assert!(reports[1].error.contains("part 2"), "{}", reports[1].error);
    assert!(
        reports[2].error.contains("refers to module 7"),
        "{}",
        reports[2].error
    );
    // The first assignment's check keeps running, and results of it arrive.
    scene.wait_until("results of the applied assignment", WAIT, || {
        metric_sum(
            &agent,
            "sonde_agent_probes_total",
            &[("instance", &format!("127.0.0.1:{port}"))],
        )
        .and_then(|n| {
            if n >= 2.0 {
                Ok(())
            } else {
                Err(format!("{n}"))
            }
        })
    });
    assert_eq!(metric_sum(&agent, "sonde_agent_checks", &[]).unwrap(), 1.0);
    assert!(
        metric_sum(
            &agent,
            "sonde_agent_probes_total",
            &[("instance", &format!("127.0.0.1:{other}"))]
        )
        .is_err(),
        "no check of a refused assignment ran"
    );
    assert_eq!(
        fake.sessions.load(Ordering::SeqCst),
        1,
        "one stream all along"
    );
    assert_eq!(reconnects(&agent), 0.0);
    let log = scene.process("edge").log();
    assert!(log.contains("refused the assignment"), "{}", tail(&log, 20));
    assert_eq!(
        log.matches("refused the assignment").count(),
        2,
        "once per refused generation: {}",
        tail(&log, 20)
    );
}

#[test]
fn the_aggregator_shows_what_the_agent_refused() {
    let mut scene = Scene::new("assignment-report");
    let port = accepting_tcp_port();
    let config = format!(
        r#"modules:
  tcp_connect:
    prober: tcp
  http_body:
    prober: http
    http:
      method: POST
      body_file: /etc/hostname
jobs:
  - job_name: plain
    module: tcp_connect
    interval: 1s
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
  - job_name: with_file
    module: http_body
    interval: 1s
    static_configs: [{{targets: ["http://127.0.0.1:{port}/"]}}]
"#
    );
    let aggregator = start_aggregator(&mut scene, "aggregator", &config);
    let web = aggregator.web.clone();
    // A real agent without assigned_modules.allowed_file_paths: the module naming a file
    // is refused, the other check runs.
    let agent = start_agent(
        &mut scene,
        "edge",
        &format!(
            "agent:\n  id: edge\naggregators:\n  - address: {}\n",
            aggregator.grpc
        ),
    );
    let entry = scene.wait_until("the agent's report on the aggregator", WAIT, || {
        let a = agent_entry(&web, "edge")?;
        if a["assignment"]["state"] == "applied" {
            Ok(a)
        } else {
            Err(a["assignment"].to_string())
        }
    });
    let text = entry["assignment"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.contains(": 1 check applied; 1 refused (file_not_allowed: "),
        "{text}"
    );
    assert!(text.contains("/etc/hostname"), "{text}");
    assert_eq!(
        entry["assignment"]["refused"][0]["reason"],
        "file_not_allowed"
    );
    let page = http_get_ok(&format!("{web}/")).unwrap();
    assert!(page.contains("1 refused (file_not_allowed"), "status page");

    // An assignment refused whole, as an agent reports it (here a raw client speaking for
    // an agent whose bounds it exceeded): shown with the agent's reason, escaped.
    // Multi-threaded: the stream must keep moving between the test's blocking waits.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let grpc = aggregator.grpc.clone();
    let (tx, generation) = runtime.block_on(async {
        let mut client = FleetClient::connect(grpc).await.unwrap();
        let (tx, rx) = mpsc::channel(16);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(pb::Hello {
                protocol_version: sonde_proto::PROTOCOL_VERSION,
                agent_id: "tiny".into(),
                labels: Default::default(),
                version: "test".into(),
                local_jobs: vec![],
                last_acked_seq: 0,
            })),
        })
        .await
        .unwrap();
        let mut inbound = client
            .session(Request::new(ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        let generation = loop {
            match inbound.message().await.unwrap() {
                Some(AggregatorMessage {
                    msg: Some(aggregator_message::Msg::Assignment(a)),
                }) if a.last => break a.generation,
                Some(_) => continue,
                None => panic!("stream ended before the assignment"),
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        (tx, generation)
    });
    let report = |error: &str| AgentMessage {
        msg: Some(agent_message::Msg::AssignmentReport(pb::AssignmentReport {
            generation,
            applied: false,
            error: error.into(),
            checks: 0,
            refused: vec![],
        })),
    };
    runtime.block_on(async {
        tx.send(report("assignment has more than 1000000 checks <b>\n"))
            .await
            .unwrap();
        // Repeated: logged once.
        tx.send(report("again")).await.unwrap();
    });
    let entry = scene.wait_until("the refusal on the aggregator", WAIT, || {
        let a = agent_entry(&web, "tiny")?;
        if a["assignment"]["state"] == "refused" && a["assignment"]["error"] == "again" {
            Ok(a)
        } else {
            Err(a["assignment"].to_string())
        }
    });
    assert_eq!(
        entry["assignment"]["text"],
        format!("assignment {generation} refused: again")
    );
    let page = http_get_ok(&format!("{web}/")).unwrap();
    assert!(page.contains("REFUSED"), "status page");
    let log = scene.process("aggregator").log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the agent refused its assignment"))
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains(r"checks <b>\\n") || warned[0].contains(r"checks <b>\n"),
        "escaped: {}",
        warned[0]
    );
    assert_eq!(reconnects(&agent), 0.0);
    drop(tx);
}

/// The file_sd file of [`TARGETS`] distinct instances on one server: nginx answers `/`
/// whatever the query.
fn fleet_targets(scene: &Scene, nginx: u16) -> std::path::PathBuf {
    let mut targets = String::from("- targets:\n");
    for n in 0..TARGETS {
        targets.push_str(&format!("    - http://127.0.0.1:{nginx}/?target={n}\n"));
    }
    scene.dir().write("targets/fleet.yml", &targets)
}
