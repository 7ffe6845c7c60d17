//! The fleet message path: bytes an agent (or anyone reaching the gRPC port) sends,
//! decoded as a stream of `AgentMessage`s (length-delimited, as gRPC frames them), each
//! batch resolved by `fleet::decode_batch` with the default `fleet.limits` and ingested by
//! an in-memory hub whose store fails now and then.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sonde_aggregator::config::AggregatorConfig;
use sonde_aggregator::fleet::decode::{SymbolTable, decode_batch};
use sonde_aggregator::hub::{Hub, Output, StateChange};
use sonde_aggregator::remote_write::SeriesSample;
use sonde_proto::pb::{self, AgentMessage, agent_message::Msg};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Keeps nothing; fails the commits while `failing` is set, so that the hub's
/// rollback (nothing of a failed batch may stay in memory) is fuzzed too.
#[derive(Default)]
struct Flaky {
    failing: AtomicBool,
}

impl Output for Flaky {
    fn commit(&self, _: &[SeriesSample], _: StateChange<'_>) -> Result<(), String> {
        if self.failing.load(Ordering::Relaxed) {
            Err("injected: database or disk is full".into())
        } else {
            Ok(())
        }
    }
}

const T0: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let output = Arc::new(Flaky::default());
    let config = CONFIG_PARSED.clone();
    let hub = Hub::new(config.clone(), output.clone(), T0);
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let mut agent = "eu-1".to_string();
    let hello = pb::Hello {
        protocol_version: sonde_proto::PROTOCOL_VERSION,
        agent_id: agent.clone(),
        labels: [("region".to_string(), "eu".to_string())].into(),
        version: "fuzz".into(),
        local_jobs: vec!["local".into()],
        last_acked_seq: 0,
    };
    let labels = |h: &pb::Hello| h.labels.clone().into_iter().collect();
    hub.connect(&hello, labels(&hello), None, tx.clone(), T0);
    let mut symbols = SymbolTable::default();
    let mut now = T0;
    let mut input = data;
    while let Ok(message) = AgentMessage::decode_length_delimited(&mut input) {
        now += 1000;
        match message.msg {
            Some(Msg::Hello(hello)) => {
                agent = hello.agent_id.clone();
                symbols = SymbolTable::default();
                hub.connect(&hello, labels(&hello), None, tx.clone(), now);
            }
            Some(Msg::Results(batch)) => {
                let Ok(decoded) = decode_batch(&mut symbols, batch, &config.limits) else {
                    break; // the stream ends on a malformed batch
                };
                // A failed commit must leave the hub as it was, so the same batch is
                // taken whole once the store recovers.
                output
                    .failing
                    .store(decoded.results.len() % 3 == 1, Ordering::Relaxed);
                if hub.results(&agent, &decoded.results, now).is_err() {
                    output.failing.store(false, Ordering::Relaxed);
                    hub.results(&agent, &decoded.results, now)
                        .expect("the batch is taken once the store recovers");
                }
            }
            Some(Msg::Heartbeat(beat)) => hub.heartbeat(&agent, beat.timestamp_ms, now),
            Some(Msg::AssignmentReport(report)) => hub.assignment_report(&agent, &report),
            None => {}
        }
        hub.tick(now);
    }
    output.failing.store(false, Ordering::Relaxed);
    hub.tick(now + 3_600_000);
});
