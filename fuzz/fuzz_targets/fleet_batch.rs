//! The fleet message path: bytes an agent (or anyone reaching the gRPC port) sends,
//! decoded as a stream of `AgentMessage`s (length-delimited, as gRPC frames them), each
//! batch resolved by `fleet::decode_batch` with the default `fleet.limits` and applied to
//! the hub's state machine, whose commits fail now and then (rolled back, then applied
//! again, as the ingest thread does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sonde_aggregator::config::AggregatorConfig;
use sonde_aggregator::fleet::decode::{SymbolTable, decode_batch};
use sonde_aggregator::hub::state::Changes;
use sonde_aggregator::hub::{HubCounters, State};
use sonde_aggregator::refusals::Refusals;
use sonde_aggregator::targets::Discovery;
use sonde_proto::pb::{self, AgentMessage, agent_message::Msg};
use std::path::Path;
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

const T0: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let config = CONFIG_PARSED.clone();
    let targets = Discovery::default().targets(&config.jobs);
    let mut state = State::new(Arc::new(config.hub()), targets, T0);
    let counters = HubCounters::default();
    let refusals = Refusals::default();
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
    // The first agent of an empty fleet is never refused.
    let _ = state.connect(&hello, labels(&hello), None, T0, &mut Changes::default());
    let mut symbols = SymbolTable::default();
    let mut now = T0;
    let mut input = data;
    while let Ok(message) = AgentMessage::decode_length_delimited(&mut input) {
        now += 1000;
        match message.msg {
            Some(Msg::Hello(hello)) => {
                agent = hello.agent_id.clone();
                symbols = SymbolTable::default();
                let connected =
                    state.connect(&hello, labels(&hello), None, now, &mut Changes::default());
                if connected.is_err() {
                    break; // a refused Hello ends the stream, as the server does
                }
            }
            Some(Msg::Results(batch)) => {
                let Ok(decoded) = decode_batch(&mut symbols, batch, &config.limits) else {
                    break; // the stream ends on a malformed batch
                };
                let mut changes = Changes::default();
                let ack = state.results(
                    &agent,
                    &decoded.results,
                    now,
                    &mut changes,
                    &counters,
                    &refusals,
                );
                // A failed commit must leave the state as it was, so the same batch is
                // taken whole, with the same ack, once the store recovers.
                if decoded.results.len() % 3 == 1 {
                    state.rollback(changes.undo);
                    let mut again = Changes::default();
                    let retried = state.results(
                        &agent,
                        &decoded.results,
                        now,
                        &mut again,
                        &counters,
                        &refusals,
                    );
                    assert_eq!(
                        ack, retried,
                        "a rolled-back batch acks the same when taken again"
                    );
                    assert_eq!(
                        changes.out.len(),
                        again.out.len(),
                        "and writes the same samples"
                    );
                }
            }
            Some(Msg::Heartbeat(beat)) => state.heartbeat(&agent, beat.timestamp_ms, now),
            Some(Msg::AssignmentReport(report)) => state.assignment_report(&agent, &report),
            None => {}
        }
        state.tick(now, &mut Changes::default());
    }
    state.tick(now + 3_600_000, &mut Changes::default());
});
