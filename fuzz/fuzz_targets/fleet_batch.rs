//! The fleet message path: bytes an agent (or anyone reaching the gRPC port) sends,
//! decoded as a stream of `AgentMessage`s (length-delimited, as gRPC frames them), each
//! batch resolved by `fleet::decode_batch` and ingested by an in-memory hub.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sonde_aggregator::config::AggregatorConfig;
use sonde_aggregator::hub::{Hub, Output, StateChange};
use sonde_aggregator::remote_write::SeriesSample;
use sonde_proto::pb::{self, AgentMessage, agent_message::Msg};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};

const CONFIG: &str = r#"
global: {scrape_interval: 10s, scrape_timeout: 5s}
modules:
  tcp: {prober: tcp}
  web: {prober: http}
jobs:
  - job_name: web
    module: web
    static_configs: [{targets: ["http://127.0.0.1:80"], labels: {team: shop}}]
  - job_name: tcp
    module: tcp
    quorum: majority
    static_configs: [{targets: ["127.0.0.1:81", "127.0.0.1:82"]}]
  - job_name: mars
    module: tcp
    agents: {region: mars}
    static_configs: [{targets: ["127.0.0.1:9093"]}]
fleet: {missing_after: 30s}
"#;

static CONFIG_PARSED: LazyLock<Arc<AggregatorConfig>> = LazyLock::new(|| {
    let path = Path::new("/nonexistent/sonde-fuzz/aggregator.yml");
    let raw = sonde_proto::config::from_yaml_str(path, CONFIG).expect("fuzz config parses");
    Arc::new(AggregatorConfig::from_file(path, raw).expect("fuzz config is valid"))
});

/// Accepts every commit and keeps nothing.
struct Discard;

impl Output for Discard {
    fn commit(&self, _: &[SeriesSample], _: StateChange<'_>) -> Result<(), String> {
        Ok(())
    }
}

const T0: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let hub = Hub::new(CONFIG_PARSED.clone(), Arc::new(Discard), T0);
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let mut agent = "eu-1".to_string();
    let hello = pb::Hello {
        protocol_version: 1,
        agent_id: agent.clone(),
        labels: [("region".to_string(), "eu".to_string())].into(),
        version: "fuzz".into(),
        local_jobs: vec![],
        last_acked_seq: 0,
    };
    hub.connect(&hello, tx.clone(), T0);
    let invalid = AtomicU64::new(0);
    let mut symbols = Vec::new();
    let mut now = T0;
    let mut input = data;
    while let Ok(message) = AgentMessage::decode_length_delimited(&mut input) {
        now += 1000;
        match message.msg {
            Some(Msg::Hello(hello)) => {
                agent = hello.agent_id.clone();
                symbols.clear();
                hub.connect(&hello, tx.clone(), now);
            }
            Some(Msg::Results(batch)) => {
                let Ok(results) =
                    sonde_aggregator::fleet::decode_batch(&mut symbols, batch, &invalid)
                else {
                    break; // the stream ends on a malformed batch
                };
                if hub.results(&agent, results, now).is_err() {
                    break;
                }
            }
            Some(Msg::Heartbeat(_)) => hub.heartbeat(&agent, now),
            None => {}
        }
        hub.tick(now);
    }
    hub.tick(now + 3_600_000);
});
