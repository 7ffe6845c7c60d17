//! What the agent and the aggregator say when the connection between them is wrong or
//! goes wrong, with the real binaries: each misconfiguration of an agent's
//! `aggregators` entry (the web port, TLS against plaintext, no client certificate, a
//! foreign one, the wrong CA) gets one line naming the entry and what to fix; the
//! aggregator's refusal lines keep their reason whole, escaped once, and stay few when
//! refused peers spread over many addresses; a connection lost under a stream is named
//! so on both sides, and a stopped aggregator is noticed within the set-up bound.

use serde_json::Value;
use sonde_proto::pb::{self, AgentMessage, agent_message, fleet_client::FleetClient};
use sonde_tests::{
    Scene, TestDir, http_get_ok, make_pki, metric_sum, start_agent, start_aggregator,
};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The names the aggregator's certificate holds.
const SAN: &str = "DNS:localhost,IP:127.0.0.1";
/// Bound of each wait for a line or a state.
const WAIT: Duration = Duration::from_secs(60);
/// What both sides say when a connection dies under a stream.
const LOST: &str =
    "connection lost without a status: peer gone, network cut, or keepalive unanswered";

/// The aggregator config serving `fleet.tls` from `pki` (client certificates required),
/// with `extra` under `fleet:`.
fn tls_aggregator(pki: &Path, extra: &str) -> String {
    format!(
        "fleet:\n  tls:\n    cert_file: {p}/aggregator.pem\n    key_file: {p}/aggregator.key\n    client_ca_file: {p}/ca.pem\n{extra}",
        p = pki.display()
    )
}

/// An agent config for one aggregator at `address`, with `entry` added to its entry.
fn agent(id: &str, labels: &str, address: &str, entry: &str) -> String {
    format!("agent:\n  id: {id}\n{labels}aggregators:\n  - address: {address}\n{entry}")
}

/// `tls_config` lines of an aggregators entry.
fn tls_entry(ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let mut text = format!("    tls_config:\n      ca_file: {}\n", ca.display());
    if let Some((cert, key)) = client {
        text.push_str(&format!(
            "      cert_file: {}\n      key_file: {}\n",
            cert.display(),
            key.display()
        ));
    }
    text
}

/// The log of process `name` of the scene.
fn log_of(scene: &mut Scene, name: &str) -> PathBuf {
    scene.process(name).log_path().to_path_buf()
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Waits until the log at `path` has `count` lines containing every one of `needles`;
/// returns those lines.
fn wait_lines(
    scene: &mut Scene,
    path: &Path,
    needles: &[&str],
    count: usize,
    within: Duration,
) -> Vec<String> {
    scene.wait_until(
        &format!("{count} line(s) with {needles:?} in {}", path.display()),
        within,
        || {
            let log = read(path);
            let found: Vec<String> = log
                .lines()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
                .collect();
            if found.len() >= count {
                Ok(found)
            } else {
                Err(format!(
                    "{} found; log ends with:\n{}",
                    found.len(),
                    tail(&log)
                ))
            }
        },
    )
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// A logfmt line's pairs, unquoted and unescaped as a logfmt reader does.
fn logfmt(line: &str) -> BTreeMap<String, String> {
    let mut pairs = BTreeMap::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ' ')).collect();
        if key.is_empty() {
            return pairs;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'=').is_some() {
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some('t') => value.push('\t'),
                            Some('r') => value.push('\r'),
                            Some(other) => value.push(other),
                            None => break,
                        },
                        c => value.push(c),
                    }
                }
            } else {
                value = std::iter::from_fn(|| chars.next_if(|c| *c != ' ')).collect();
            }
        }
        pairs.insert(key, value);
    }
}

/// Whether agent `id` has a stream to the aggregator at `web`.
fn connected(web: &str, id: &str) -> Result<(), String> {
    let body = http_get_ok(&format!("{web}/api/v1/agents"))?;
    let json: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    let entry = json["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["agent"] == id);
    match entry {
        Some(a) if a["connected"] == true => Ok(()),
        other => Err(format!("{id}: {other:?}")),
    }
}

fn signal(scene: &mut Scene, name: &str, signal: &str) {
    let pid = scene.process(name).pid().to_string();
    let status = Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {name}");
}

/// The `ts=` of a logfmt line.
fn timestamp(line: &str) -> String {
    logfmt(line).remove("ts").unwrap_or_default()
}

/// Seconds between two RFC 3339 UTC timestamps of the same day (`…THH:MM:SS.mmmZ`).
fn seconds_between(from: &str, to: &str) -> f64 {
    let secs = |ts: &str| -> f64 {
        let time = ts.split('T').nth(1).unwrap_or("").trim_end_matches('Z');
        let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap_or(0.0)).collect();
        parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
    };
    secs(to) - secs(from)
}

#[test]
fn each_misconfigured_aggregator_entry_says_what_to_fix() {
    let mut scene = Scene::new("transport-errors");
    let pki = make_pki(scene.dir(), SAN, &["edge-1"]);
    // Another CA, with a certificate of the same name: the wrong CA, a foreign client.
    let elsewhere = TestDir::new("transport-errors-other-ca");
    let other = make_pki(&elsewhere, SAN, &["edge-1"]);
    let tls = start_aggregator(&mut scene, "aggregator", &tls_aggregator(&pki, ""));
    let plain = start_aggregator(&mut scene, "plaintext", "");
    let tls_grpc = tls.grpc.replace("http://", "https://");
    let tls_web = tls.web.replace("http://", "https://");
    let plain_grpc_over_tls = plain.grpc.replace("http://", "https://");
    let ca = pki.join("ca.pem");
    let (cert, key) = (pki.join("edge-1.pem"), pki.join("edge-1.key"));
    let (foreign_cert, foreign_key) = (other.join("edge-1.pem"), other.join("edge-1.key"));
    let cases: Vec<(&str, String, String, Vec<&str>)> = vec![
        (
            "web-port",
            tls.web.clone(),
            String::new(),
            vec!["the server answered HTTP/1", "web port"],
        ),
        (
            "web-port-tls",
            tls_web.clone(),
            tls_entry(&ca, Some((&cert, &key))),
            vec!["the server answered HTTP/1", "web port"],
        ),
        (
            "http-to-tls",
            tls.grpc.clone(),
            String::new(),
            vec![
                "the server speaks TLS",
                "write https://",
                "tls_config.ca_file",
            ],
        ),
        (
            "https-to-plaintext",
            plain_grpc_over_tls.clone(),
            tls_entry(&ca, None),
            vec!["the server does not speak TLS", "write http://"],
        ),
        (
            "no-client-certificate",
            tls_grpc.clone(),
            tls_entry(&ca, None),
            vec![
                "the aggregator requires a client certificate",
                "set tls_config.cert_file and key_file",
            ],
        ),
        (
            "foreign-client-certificate",
            tls_grpc.clone(),
            tls_entry(&ca, Some((&foreign_cert, &foreign_key))),
            vec![
                "refused this agent's client certificate",
                "fleet.tls.client_ca_file",
            ],
        ),
        (
            "wrong-ca",
            tls_grpc.clone(),
            tls_entry(&other.join("ca.pem"), Some((&cert, &key))),
            vec!["not signed by tls_config.ca_file"],
        ),
    ];
    for (name, address, entry, _) in &cases {
        start_agent(&mut scene, name, &agent("edge-1", "", address, entry));
    }
    for (name, address, _, wanted) in &cases {
        let log = log_of(&mut scene, name);
        let prefix = format!("aggregators[0].address {address}: ");
        let mut needles = vec!["cannot reach the aggregator", prefix.as_str()];
        needles.extend(wanted.iter().copied());
        let lines = wait_lines(&mut scene, &log, &needles, 1, WAIT);
        let error = logfmt(&lines[0]).remove("error").unwrap_or_default();
        for vague in [
            "transport error",
            "operation was canceled",
            "h2 protocol error",
        ] {
            assert!(!error.contains(vague), "{name}: {error}");
        }
        eprintln!("{name}: {error}");
        scene.kill(name);
    }
    // The one entry that is right connects.
    let good = agent(
        "edge-1",
        "",
        &tls_grpc,
        &tls_entry(&ca, Some((&cert, &key))),
    );
    start_agent(&mut scene, "right", &good);
    scene.wait_until("the right agent connected", WAIT, || {
        connected(&tls.web, "edge-1")
    });
}

#[test]
fn refusal_lines_keep_the_reason_whole_and_escaped_once() {
    let mut scene = Scene::new("refusal-lines");
    let pki = make_pki(scene.dir(), SAN, &["edge-1"]);
    let tls = start_aggregator(&mut scene, "mtls", &tls_aggregator(&pki, ""));
    let token = scene.dir().write("edge-1.token", "s3cret-token\n");
    let auth = format!(
        "fleet:\n  auth:\n    tokens:\n      - agent: edge-1\n        token_file: {}\n        labels: {{region: eu}}\n",
        token.display()
    );
    let tokens = start_aggregator(&mut scene, "tokens", &auth);

    // No client certificate: the reason is rustls' whole sentence.
    let tls_grpc = tls.grpc.replace("http://", "https://");
    let no_cert = agent(
        "edge-1",
        "",
        &tls_grpc,
        &tls_entry(&pki.join("ca.pem"), None),
    );
    start_agent(&mut scene, "no-cert", &no_cert);
    // Labels the token does not bind, quoted: the reason quotes them once.
    let entry = format!("    token_file: {}\n", token.display());
    let labels = "  labels:\n    region: \"us'x\"\n";
    start_agent(
        &mut scene,
        "wrong-labels",
        &agent("edge-1", labels, &tokens.grpc, &entry),
    );

    let mtls_log = log_of(&mut scene, "mtls");
    let line = wait_lines(&mut scene, &mtls_log, &["agent refused"], 1, WAIT).remove(0);
    let msg = logfmt(&line).remove("msg").unwrap_or_default();
    assert!(
        msg.starts_with("agent refused: TLS handshake failed: peer sent no certificates"),
        "the reason is cut or not first: {line}"
    );

    let tokens_log = log_of(&mut scene, "tokens");
    let line = wait_lines(&mut scene, &tokens_log, &["agent refused"], 1, WAIT).remove(0);
    let msg = logfmt(&line).remove("msg").unwrap_or_default();
    assert_eq!(
        msg,
        r#"agent refused: this agent's token binds region="eu", the agent says region="us'x"; fix agent.labels in the agent's config"#,
        "{line}"
    );
    // And the agent reads the same sentence, escaped once by its own log.
    let agent_log = log_of(&mut scene, "wrong-labels");
    let line = wait_lines(&mut scene, &agent_log, &["refused this agent"], 1, WAIT).remove(0);
    let reason = logfmt(&line).remove("reason").unwrap_or_default();
    assert!(
        reason.contains(r#"the agent says region="us'x"; fix agent.labels"#),
        "{line}"
    );
}

/// A tonic connector whose connections come from `source`.
#[derive(Clone, Copy)]
struct FromAddress {
    source: Ipv4Addr,
    target: SocketAddr,
}

impl tonic::codegen::Service<http::Uri> for FromAddress {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let FromAddress { source, target } = *self;
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((source, 0)))?;
            Ok(hyper_util::rt::TokioIo::new(socket.connect(target).await?))
        })
    }
}

/// Opens a stream from `source` with a token the aggregator does not know; the status
/// it got.
async fn bad_token_stream(grpc: &str, source: Ipv4Addr) -> tonic::Status {
    let target: SocketAddr = grpc.trim_start_matches("http://").parse().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(grpc.to_string())
        .unwrap()
        .connect_with_connector(FromAddress { source, target })
        .await
        .unwrap_or_else(|e| panic!("connect from {source}: {e}"));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(pb::Hello {
            protocol_version: sonde_proto::PROTOCOL_VERSION,
            agent_id: "edge-1".into(),
            version: "test".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", "Bearer not-a-token".parse().unwrap());
    match FleetClient::new(channel).session(request).await {
        Ok(_) => panic!("a stream with an unknown token from {source} was accepted"),
        Err(status) => status,
    }
}

#[test]
fn refused_connections_spread_over_many_networks_write_few_lines() {
    const CONNECTIONS: usize = 200;
    const MAX_LINES: usize = 20;
    let mut scene = Scene::new("refusal-spread");
    let token = scene.dir().write("edge-1.token", "s3cret-token\n");
    let auth = format!(
        "fleet:\n  auth:\n    tokens:\n      - agent: edge-1\n        token_file: {}\n",
        token.display()
    );
    let aggregator = start_aggregator(&mut scene, "aggregator", &auth);
    let log = log_of(&mut scene, "aggregator");
    let before = std::fs::metadata(&log).unwrap().len() as usize;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // 127.1.0.1, 127.2.0.1, ...: each connection from another /24.
    let started = Instant::now();
    runtime.block_on(async {
        for n in 0..CONNECTIONS {
            let source = Ipv4Addr::new(127, 1 + n as u8, 0, 1);
            let status = bad_token_stream(&aggregator.grpc, source).await;
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        }
    });
    let burst = started.elapsed();
    scene.wait_until("every refusal counted", WAIT, || {
        match metric_sum(&aggregator.web, "sonde_agents_refused_total", &[])? {
            n if n >= CONNECTIONS as f64 => Ok(()),
            n => Err(format!("sonde_agents_refused_total {n}")),
        }
    });
    let text = read(&log);
    let added = &text[before..];
    let lines: Vec<&str> = added
        .lines()
        .filter(|l| l.contains("agent refused"))
        .collect();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    eprintln!(
        "{CONNECTIONS} refused connections from {CONNECTIONS} networks in {burst:?}: {} log lines, {bytes} bytes ({:.1} bytes per refused connection)",
        lines.len(),
        bytes as f64 / CONNECTIONS as f64
    );
    assert!(
        lines.len() <= MAX_LINES,
        "{} refusal lines for {CONNECTIONS} refused connections:\n{}",
        lines.len(),
        lines.join("\n")
    );
    // What was held back is counted in the next line that passes: a refusal after the
    // limits' period.
    std::thread::sleep(Duration::from_secs(11));
    runtime.block_on(bad_token_stream(
        &aggregator.grpc,
        Ipv4Addr::new(127, 250, 0, 1),
    ));
    let all = wait_lines(
        &mut scene,
        &log,
        &["agent refused", "peer=127.250.0.1"],
        1,
        WAIT,
    );
    let text = read(&log);
    let lines: Vec<&str> = text[before..]
        .lines()
        .filter(|l| l.contains("agent refused"))
        .collect();
    let suppressed: usize = lines
        .iter()
        .map(|l| {
            logfmt(l)
                .remove("suppressed")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(
        suppressed + lines.len(),
        CONNECTIONS + 1,
        "every refused connection is either logged or counted as suppressed:\n{}\n{}",
        lines.join("\n"),
        all.join("\n")
    );
}

#[test]
fn a_stopped_aggregator_is_noticed_within_the_set_up_bound() {
    let mut scene = Scene::new("stopped-aggregator");
    let aggregator = start_aggregator(&mut scene, "aggregator", "");
    start_agent(
        &mut scene,
        "agent",
        &agent("edge-1", "", &aggregator.grpc, ""),
    );
    scene.wait_until("the agent connected", WAIT, || {
        connected(&aggregator.web, "edge-1")
    });
    let log = log_of(&mut scene, "agent");
    signal(&mut scene, "aggregator", "-STOP");
    // The stream dies by keepalive (10 s + 10 s), and is said to be lost.
    let lost = wait_lines(
        &mut scene,
        &log,
        &["stream to the aggregator ended", LOST],
        1,
        Duration::from_secs(45),
    );
    // Each attempt after it ends within the set-up bound (10 s) plus its backoff,
    // saying the aggregator does not answer.
    let attempts = wait_lines(
        &mut scene,
        &log,
        &[
            "cannot reach the aggregator",
            "the aggregator does not answer",
        ],
        2,
        Duration::from_secs(45),
    );
    let first = seconds_between(&timestamp(&lost[0]), &timestamp(&attempts[0]));
    let second = seconds_between(&timestamp(&attempts[0]), &timestamp(&attempts[1]));
    eprintln!("attempts after the loss ended after {first:.1}s and {second:.1}s");
    assert!(first < 15.0 && second < 15.0, "{attempts:?}");
    signal(&mut scene, "aggregator", "-CONT");
    scene.wait_until("the agent connected again", WAIT, || {
        connected(&aggregator.web, "edge-1")
    });
}

#[test]
fn lost_connections_are_named_on_both_sides() {
    let mut scene = Scene::new("lost-connections");
    let aggregator = start_aggregator(&mut scene, "aggregator", "");
    for id in ["stopped", "killed", "survivor"] {
        start_agent(&mut scene, id, &agent(id, "", &aggregator.grpc, ""));
    }
    for id in ["stopped", "killed", "survivor"] {
        scene.wait_until(&format!("{id} connected"), WAIT, || {
            connected(&aggregator.web, id)
        });
    }
    let aggregator_log = log_of(&mut scene, "aggregator");
    // A stopped agent: the aggregator's keepalive ends its stream, and says so.
    signal(&mut scene, "stopped", "-STOP");
    // A killed one: its connection is gone at once.
    scene.kill("killed");
    let killed = wait_lines(
        &mut scene,
        &aggregator_log,
        &["agent disconnected", "agent=killed"],
        1,
        WAIT,
    );
    assert!(killed[0].contains(LOST), "{}", killed[0]);
    let stopped = wait_lines(
        &mut scene,
        &aggregator_log,
        &["agent disconnected", "agent=stopped"],
        1,
        WAIT,
    );
    assert!(
        stopped[0].contains(LOST) && stopped[0].contains("nothing from the agent for"),
        "{}",
        stopped[0]
    );
    assert!(
        !stopped[0].contains("closed by the agent"),
        "{}",
        stopped[0]
    );
    signal(&mut scene, "stopped", "-CONT");
    // A killed aggregator: the agent says the connection was lost.
    let survivor_log = log_of(&mut scene, "survivor");
    scene.kill("aggregator");
    wait_lines(
        &mut scene,
        &survivor_log,
        &["stream to the aggregator ended", LOST],
        1,
        WAIT,
    );
}

#[test]
fn a_scene_stops_its_agents_before_their_aggregator() {
    let mut scene = Scene::new("stop-order");
    let aggregator = start_aggregator(&mut scene, "aggregator", "");
    start_agent(
        &mut scene,
        "agent",
        &agent("edge-1", "", &aggregator.grpc, ""),
    );
    scene.wait_until("the agent connected", WAIT, || {
        connected(&aggregator.web, "edge-1")
    });
    let agent_log = log_of(&mut scene, "agent");
    let aggregator_log = log_of(&mut scene, "aggregator");
    scene.stop();
    let agent_text = read(&agent_log);
    assert!(!agent_text.contains(LOST), "{}", tail(&agent_text));
    assert!(
        !agent_text.contains("stream to the aggregator ended"),
        "{}",
        tail(&agent_text)
    );
    let aggregator_text = read(&aggregator_log);
    let ended = aggregator_text
        .lines()
        .rfind(|l| l.contains("agent disconnected"))
        .unwrap_or_else(|| panic!("no disconnect logged:\n{}", tail(&aggregator_text)));
    assert!(ended.contains("stream closed by the agent"), "{ended}");
}
