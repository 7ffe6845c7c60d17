//! The fleet stream over mutual TLS (`fleet.tls` on the aggregator, `https://` with
//! `tls_config` on the agent): an agent with a certificate from the configured CA gets its
//! assignment and delivers results; one without a client certificate is refused.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use sonde_agent::config::{AgentConfig, AggregatorEndpoint, ClientTlsConfig};
use sonde_agent::runtime::AgentRuntime;
use sonde_aggregator::app::App;
use sonde_aggregator::config::AggregatorConfig;
use sonde_aggregator::merge::TargetState;
use sonde_proto::config::from_yaml_str;
use std::path::Path;
use std::time::Duration;

fn write_pki(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sonde fleet test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let issue = |names: Vec<String>, ip: bool, prefix: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        if ip {
            params
                .subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        params.distinguished_name.push(DnType::CommonName, prefix);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{prefix}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{prefix}.key")), key.serialize_pem()).unwrap();
    };
    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
    issue(vec!["localhost".into()], true, "server");
    issue(vec!["edge-1".into()], false, "client");
}

fn agent(grpc: std::net::SocketAddr, dir: &Path, with_client_cert: bool) -> AgentConfig {
    let mut agent = AgentConfig::minimal("edge-1".into());
    let file = |n: &str| Some(dir.join(n));
    agent.aggregators.push(AggregatorEndpoint {
        address: format!("https://localhost:{}", grpc.port()),
        token_file: None,
        tls_config: Some(ClientTlsConfig {
            ca_file: file("ca.crt"),
            cert_file: if with_client_cert {
                file("client.crt")
            } else {
                None
            },
            key_file: if with_client_cert {
                file("client.key")
            } else {
                None
            },
            server_name: None,
        }),
        allow_plaintext_token: false,
    });
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_agents_with_a_certificate() {
    let dir = std::env::temp_dir().join(format!("sonde-fleet-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_pki(&dir);
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let acceptor = tokio::spawn(async move {
        while let Ok((s, _)) = target.accept().await {
            drop(s);
        }
    });
    let text = format!(
        "global: {{scrape_interval: 1s, scrape_timeout: 500ms}}\nmodules:\n  tcp: {{prober: tcp, tcp: {{preferred_ip_protocol: ip4}}}}\njobs:\n  - job_name: tcp\n    module: tcp\n    static_configs: [{{targets: [\"{target_addr}\"]}}]\nfleet:\n  tls: {{cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt}}\n"
    );
    let path = dir.join("aggregator.yml");
    let config = AggregatorConfig::from_file(&path, from_yaml_str(&path, &text).unwrap()).unwrap();
    let app = App::start(config, None, None).await.unwrap();
    let running = sonde_aggregator::server::start(
        app.clone(),
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();

    let anonymous = AgentRuntime::start(agent(running.grpc_address, &dir, false), None).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        app.hub.snapshot().await.agents.is_empty(),
        "an agent without a client certificate got in"
    );
    let error = anonymous
        .metrics
        .uplinks
        .lock()
        .unwrap()
        .values()
        .find_map(|u| u.last_error.clone());
    assert!(error.is_some(), "the refused agent should report why");
    anonymous.shutdown(Duration::ZERO).await;

    let agent = AgentRuntime::start(agent(running.grpc_address, &dir, true), None).unwrap();
    let mut up = false;
    for _ in 0..100 {
        let state = app
            .hub
            .snapshot()
            .await
            .entries
            .values()
            .find_map(|e| e.merged)
            .map(|m| m.state);
        if state == Some(TargetState::Up) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "no result arrived over mutual TLS within 10s");
    agent.shutdown(Duration::from_secs(1)).await;
    running.shutdown(Duration::from_secs(1)).await;
    acceptor.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits up to `secs` for `id` to be connected to the hub.
async fn connected(app: &App, id: &str, secs: u64) -> bool {
    for _ in 0..secs * 10 {
        if app
            .hub
            .snapshot()
            .await
            .agents
            .get(id)
            .is_some_and(|a| a.connected)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_read_again_on_reload() {
    let dir = std::env::temp_dir().join(format!("sonde-fleet-tls-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_pki(&dir);
    std::fs::copy(dir.join("ca.crt"), dir.join("old-ca.crt")).unwrap();
    let text =
        "fleet:\n  tls: {cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt}\n";
    let path = dir.join("aggregator.yml");
    std::fs::write(&path, text).unwrap();
    let app = App::start(
        AggregatorConfig::load(&path).unwrap(),
        Some(path.clone()),
        None,
    )
    .await
    .unwrap();
    let running = sonde_aggregator::server::start(
        app.clone(),
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let first = AgentRuntime::start(agent(running.grpc_address, &dir, true), None).unwrap();
    assert!(
        connected(&app, "edge-1", 10).await,
        "the first agent connects"
    );
    first.shutdown(Duration::ZERO).await;

    // A new CA, server and client certificate, written over the old files; then reload.
    write_pki(&dir);
    app.reload()
        .await
        .expect("the reload reads the new certificates");
    app.hub.disconnect_all(0).await;

    // An agent that still trusts only the old CA cannot verify the new server certificate.
    let mut stale = agent(running.grpc_address, &dir, true);
    stale.id = "stale".into();
    stale.aggregators[0].tls_config.as_mut().unwrap().ca_file = Some(dir.join("old-ca.crt"));
    let stale = AgentRuntime::start(stale, None).unwrap();
    assert!(
        !connected(&app, "stale", 3).await,
        "the server still presents the old certificate"
    );
    stale.shutdown(Duration::ZERO).await;
    let fresh = AgentRuntime::start(agent(running.grpc_address, &dir, true), None).unwrap();
    assert!(
        connected(&app, "edge-1", 10).await,
        "an agent with the new CA and client certificate connects"
    );
    fresh.shutdown(Duration::ZERO).await;

    // A reload with a broken key file fails and keeps the running certificates.
    std::fs::write(dir.join("server.key"), "not a key").unwrap();
    let e = app.reload().await.unwrap_err().to_string();
    assert!(e.contains("key_file"), "{e}");
    running.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
