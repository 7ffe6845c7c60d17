//! An agent and an aggregator in one process, over the real gRPC stream on loopback:
//! assignment, probing, results, acks, token authentication, and reconnection after
//! the aggregator restarts.

use sonde_agent::config::{AgentConfig, AggregatorEndpoint};
use sonde_agent::runtime::AgentRuntime;
use sonde_aggregator::app::App;
use sonde_aggregator::config::AggregatorConfig;
use sonde_aggregator::merge::TargetState;
use sonde_proto::config::from_yaml_str;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sonde-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn aggregator_config(dir: &Path, target: SocketAddr) -> AggregatorConfig {
    std::fs::write(dir.join("edge.token"), "s3cret\n").unwrap();
    let text = format!(
        r#"
global: {{scrape_interval: 1s, scrape_timeout: 500ms}}
modules:
  tcp_connect: {{prober: tcp, tcp: {{preferred_ip_protocol: ip4}}}}
jobs:
  - job_name: tcp
    module: tcp_connect
    static_configs: [{{targets: ["{target}"]}}]
fleet:
  auth:
    tokens: [{{agent: edge-1, token_file: edge.token}}]
  missing_after: 5s
"#
    );
    let path = dir.join("aggregator.yml");
    AggregatorConfig::from_file(&path, from_yaml_str(&path, &text).unwrap()).unwrap()
}

fn agent_config(id: &str, grpc: SocketAddr, token_file: PathBuf) -> AgentConfig {
    let mut agent = AgentConfig::minimal(id.into());
    agent.aggregators.push(AggregatorEndpoint {
        address: format!("http://{grpc}"),
        token_file: Some(token_file),
        tls_config: None,
        allow_plaintext_token: false,
    });
    agent
}

fn target_state(app: &App, job: &str) -> Option<TargetState> {
    let state = tokio::task::block_in_place(|| app.hub.snapshot_blocking());
    state
        .entries
        .iter()
        .find(|(k, _)| k.0 == job)
        .and_then(|(_, e)| e.merged)
        .map(|m| m.state)
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after 10s waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_probes_what_it_is_assigned_and_survives_an_aggregator_restart() {
    let dir = temp_dir("roundtrip");
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    // Accept and drop connections so the TCP probe succeeds.
    let acceptor = tokio::spawn(async move {
        while let Ok((s, _)) = target.accept().await {
            drop(s);
        }
    });

    let app = App::start(aggregator_config(&dir, target_addr), None, None)
        .await
        .unwrap();
    let running = sonde_aggregator::server::start(
        app.clone(),
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let grpc = running.grpc_address;

    // A wrong token is refused and the agent is never registered.
    std::fs::write(dir.join("wrong.token"), "nope").unwrap();
    let intruder = AgentRuntime::start(
        agent_config("edge-1", grpc, dir.join("wrong.token")),
        Some(&dir.join("intruder")),
    )
    .unwrap();
    // The right token bound to another agent id is refused too.
    let impostor = AgentRuntime::start(
        agent_config("edge-2", grpc, dir.join("edge.token")),
        Some(&dir.join("impostor")),
    )
    .unwrap();
    wait_for("two refusals", || {
        app.hub.counters.agents_refused.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert!(app.hub.snapshot().await.agents.is_empty());
    intruder.shutdown(Duration::ZERO).await;
    impostor.shutdown(Duration::ZERO).await;

    let agent = AgentRuntime::start(
        agent_config("edge-1", grpc, dir.join("edge.token")),
        Some(&dir.join("edge-1")),
    )
    .unwrap();
    wait_for("the target to be up", || {
        target_state(&app, "tcp") == Some(TargetState::Up)
    })
    .await;
    wait_for("results acked", || agent.buffer.stats(0).acked_seq > 0).await;

    // Restart the aggregator on the same port: the agent reconnects by itself, the new
    // aggregator assigns the check again, and results flow.
    running.shutdown(Duration::from_secs(1)).await;
    let app2 = App::start(aggregator_config(&dir, target_addr), None, None)
        .await
        .unwrap();
    let mut running2 = None;
    for _ in 0..50 {
        match sonde_aggregator::server::start(app2.clone(), "127.0.0.1:0".parse().unwrap(), grpc)
            .await
        {
            Ok(r) => {
                running2 = Some(r);
                break;
            }
            // The old listener's port can take a moment to be free again.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let running2 = running2.expect("the aggregator restarts on its port");
    wait_for("the target up at the restarted aggregator", || {
        target_state(&app2, "tcp") == Some(TargetState::Up)
    })
    .await;
    let reconnects = agent
        .metrics
        .uplinks
        .lock()
        .unwrap()
        .values()
        .map(|u| u.connects)
        .sum::<u64>();
    assert!(reconnects >= 2, "agent connected {reconnects} times");

    agent.shutdown(Duration::from_secs(1)).await;
    running2.shutdown(Duration::from_secs(1)).await;
    acceptor.abort();
    let _ = std::fs::remove_dir_all(&dir);
    let _: Arc<App> = app;
}

#[tokio::test]
async fn a_bad_reload_keeps_the_running_config() {
    let dir = temp_dir("reload");
    let path = dir.join("aggregator.yml");
    let good = "modules: {tcp: {prober: tcp}}\njobs:\n  - {job_name: a, module: tcp, static_configs: [{targets: ['127.0.0.1:1']}]}\n";
    std::fs::write(&path, good).unwrap();
    let config = AggregatorConfig::load(&path).unwrap();
    let app = App::start(config, Some(path.clone()), None).await.unwrap();

    std::fs::write(
        &path,
        "modules: {tcp: {prober: tcp}}\njobs:\n  - {job_name: b, module: nope}\n",
    )
    .unwrap();
    let err = app.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("aggregator.yml:3:"),
        "the error names file and line: {err}"
    );
    assert_eq!(
        app.hub.config().jobs[0].name,
        "a",
        "the running config stays"
    );

    std::fs::write(&path, good.replace("job_name: a", "job_name: c")).unwrap();
    app.reload().await.unwrap();
    assert_eq!(app.hub.config().jobs[0].name, "c");
    let _ = std::fs::remove_dir_all(&dir);
}
