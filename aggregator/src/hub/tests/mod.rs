//! The hub and the threads that run it, together: inputs through [`Hub`], series and
//! durable changes as the store receives them. The helpers are here; the tests, by
//! concern, in the files named like the state's own (`sonde_hub::state`).

mod agents;
mod assignments;
mod groups;
mod jobs;
mod results;
mod targets;
mod undo;

use crate::config::AggregatorConfig;
use crate::hub::{AgentSender, Hub, Kick, Output, ResultsError};
use crate::series::{Sample, Samples};
use sonde_hub::model::IncomingResult;
use sonde_hub::state::*;
use sonde_proto::config::from_yaml_str;
use sonde_proto::pb;
use sonde_proto::pb::{AggregatorMessage, aggregator_message};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

struct Recorder(
    std::sync::Mutex<Vec<Sample>>,
    crate::storage::Store,
    std::sync::atomic::AtomicBool,
);

impl Default for Recorder {
    fn default() -> Self {
        Self(
            Default::default(),
            crate::storage::Store::in_memory().unwrap(),
            Default::default(),
        )
    }
}

impl Output for Recorder {
    fn commit(
        &self,
        samples: &Samples,
        durable: &Durable,
    ) -> Result<(), crate::storage::StoreError> {
        if self.2.load(Ordering::Relaxed) {
            return Err(crate::storage::StoreError::Sqlite {
                location: "the test's store".into(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                    Some("injected: database or disk is full".into()),
                ),
            });
        }
        self.1
            .transaction(|tx| crate::storage::apply_durable(tx, durable))?;
        self.0.lock().unwrap().extend(samples.to_vec());
        Ok(())
    }
}

impl Recorder {
    fn take(&self) -> Vec<Sample> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn value_of(samples: &[Sample], name: &str, pairs: &[(&str, &str)]) -> Vec<f64> {
    samples
        .iter()
        .filter(|s| {
            s.series.name() == name && pairs.iter().all(|(k, v)| s.series.get(k) == Some(*v))
        })
        .map(|s| s.value)
        .collect()
}

fn results(
    hub: &Hub,
    agent: &str,
    batch: &[IncomingResult],
    now_ms: i64,
) -> Result<Option<u64>, ResultsError> {
    hub.results(agent, batch.to_vec().into(), now_ms).wait()
}

/// Connects the agent of `hello` with the labels it says it has.
fn connect(
    hub: &Hub,
    hello: &pb::Hello,
    credential: Option<String>,
    sender: AgentSender,
    now_ms: i64,
) -> (u64, Arc<Kick>) {
    let labels = hello.labels.clone().into_iter().collect();
    let c = hub
        .connect(hello, labels, credential, sender, now_ms)
        .wait()
        .expect("connect");
    (c.connection, c.kick)
}

const T0: i64 = 1_700_000_000_000;

fn config(text: &str) -> Arc<AggregatorConfig> {
    let path = Path::new("t.yml");
    Arc::new(AggregatorConfig::from_file(path, from_yaml_str(path, text).unwrap()).unwrap())
}

const CONFIG: &str = r#"
global: {scrape_interval: 10s, scrape_timeout: 5s}
modules:
  tcp: {prober: tcp}
jobs:
  - job_name: web
    module: tcp
    static_configs: [{targets: ["127.0.0.1:80"], labels: {team: shop}}]
  - job_name: slow
    module: tcp
    interval: 5m
    static_configs: [{targets: ["127.0.0.1:81"]}]
  - job_name: alertmanager
    module: tcp
    agents: {region: mars}
    static_configs: [{targets: ["127.0.0.1:9093"]}]
fleet: {missing_after: 30s}
"#;

fn hello(id: &str, region: &str) -> pb::Hello {
    pb::Hello {
        protocol_version: 1,
        agent_id: id.into(),
        labels: [("region".to_string(), region.to_string())]
            .into_iter()
            .collect(),
        version: "test".into(),
        local_jobs: vec![],
        last_acked_seq: 0,
    }
}

fn result(seq: u64, job: &str, instance: &str, ts: i64, success: bool) -> IncomingResult {
    IncomingResult {
        seq,
        job: job.into(),
        instance: instance.into(),
        timestamp_ms: ts,
        success,
        duration_seconds: 0.01,
        failure: String::new(),
        trace: None,
        samples: vec![("probe_success".into(), vec![], f64::from(u8::from(success)))].into(),
        refused: None,
    }
}

/// Installs one maintenance window (as the API would) at `now_ms`: from `start_ms` for
/// `duration`, on the targets of `matchers` or the agents of `agents`.
fn set_one_window(
    hub: &Hub,
    name: &str,
    matchers: &[(&str, &str)],
    agents: &[(&str, &str)],
    (start_ms, duration): (i64, &str),
    now_ms: i64,
) {
    use crate::maintenance::{Source, WindowSpec, Windows, format_rfc3339_ms};
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let window = WindowSpec {
        name: name.into(),
        matchers: labels(matchers),
        agents: labels(agents),
        start: format_rfc3339_ms(start_ms),
        duration: duration.parse().unwrap(),
        every: None,
    }
    .check(Source::Api)
    .unwrap();
    hub.set_maintenance(Arc::new(Windows::new(vec![window])), now_ms)
        .wait();
}

fn setup() -> (
    Hub,
    Arc<Recorder>,
    mpsc::Receiver<Result<AggregatorMessage, tonic::Status>>,
) {
    let rec = Arc::new(Recorder::default());
    let hub = Hub::new(config(CONFIG), rec.clone(), T0);
    let (tx, rx) = mpsc::channel(16);
    connect(&hub, &hello("eu-1", "eu"), None, tx, T0);
    (hub, rec, rx)
}

fn refused(hub: &Hub, reason: &str) -> u64 {
    hub.refusals
        .counts()
        .iter()
        .filter(|(_, r, _)| *r == reason)
        .map(|(.., n)| n)
        .sum()
}

/// The checks of the last assignment in `rx`, as (job, instance).
fn last_assignment(
    rx: &mut mpsc::Receiver<Result<AggregatorMessage, tonic::Status>>,
) -> Option<BTreeSet<(String, String)>> {
    let mut last = None;
    while let Ok(Ok(AggregatorMessage {
        msg: Some(aggregator_message::Msg::Assignment(a)),
    })) = rx.try_recv()
    {
        last = Some(
            a.checks
                .iter()
                .map(|c| (c.job.clone(), c.instance.clone()))
                .collect(),
        );
    }
    last
}

/// [`setup`], then one result of job `slow` at T0, its samples taken.
fn after_one_slow_result() -> (
    Hub,
    Arc<Recorder>,
    mpsc::Receiver<Result<AggregatorMessage, tonic::Status>>,
) {
    let (hub, rec, rx) = setup();
    results(
        &hub,
        "eu-1",
        &[result(1, "slow", "127.0.0.1:81", T0, true)],
        T0,
    )
    .unwrap();
    rec.take();
    (hub, rec, rx)
}

/// A result of `job`/`instance` with `n` samples.
fn result_with(seq: u64, job: &str, instance: &str, n: usize) -> IncomingResult {
    let mut r = result(seq, job, instance, T0 + seq as i64, true);
    for i in 1..n {
        r.samples.push((
            "probe_http_duration_seconds".into(),
            vec![("phase".into(), i.to_string().into())],
            0.1,
        ));
    }
    r
}
