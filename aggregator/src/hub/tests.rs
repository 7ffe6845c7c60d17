//! The hub and the threads that run it, together: inputs through [`Hub`], series and
//! durable changes as the store receives them.

use crate::config::AggregatorConfig;
use crate::history::HistoryState;
use crate::hub::{AgentSender, Hub, Kick, Output, ResultsError};
use crate::merge::TargetState;
use crate::refusals::Reason;
use crate::series::{Sample, Samples};
use sonde_hub::budget::CheckBudget;
use sonde_hub::model::STALE_NAN_BITS;
use sonde_hub::model::{IncomingResult, sample_weight};
use sonde_hub::state::*;
use sonde_proto::config::from_yaml_str;
use sonde_proto::pb;
use sonde_proto::pb::{AggregatorMessage, aggregator_message};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;

struct Recorder(
    std::sync::Mutex<Vec<Sample>>,
    crate::store::Store,
    std::sync::atomic::AtomicBool,
);

impl Default for Recorder {
    fn default() -> Self {
        Self(
            Default::default(),
            crate::store::Store::in_memory().unwrap(),
            Default::default(),
        )
    }
}

impl Output for Recorder {
    fn commit(&self, samples: &Samples, durable: &Durable) -> Result<(), crate::store::StoreError> {
        if self.2.load(Ordering::Relaxed) {
            return Err(crate::store::StoreError::Sqlite {
                location: "the test's store".into(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                    Some("injected: database or disk is full".into()),
                ),
            });
        }
        self.1
            .transaction(|tx| crate::store::apply_durable(tx, durable))?;
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

#[test]
fn local_job_timestamps_far_apart_do_not_overflow() {
    // A hostile agent's local-job results, a negative timestamp then the largest one:
    // their spacing used to overflow (a panic with overflow checks, a wrapped negative
    // spacing without). Found by fuzz/fleet_batch. Both are now refused outright; the
    // spacing of what is accepted saturates all the same.
    let (hub, _rec, _rx) = setup();
    let (tx, _rx2) = mpsc::channel(16);
    let mut h = hello("edge", "eu");
    h.local_jobs = vec!["local".into()];
    connect(&hub, &h, None, tx, T0);
    let batch = [
        result(1, "local", "127.0.0.1:22", -10, true),
        result(2, "local", "127.0.0.1:22", i64::MAX, true),
        result(3, "local", "127.0.0.1:22", 0, true),
        result(4, "local", "127.0.0.1:22", T0, true),
    ];
    assert_eq!(results(&hub, "edge", &batch, T0).ok(), Some(Some(4)));
    assert_eq!(refused(&hub, "future_timestamp"), 2);
    let state = hub.snapshot_blocking();
    let entry = &state.entries[&("local".to_string(), owned_instance("127.0.0.1:22", "edge"))];
    assert_eq!(entry.views["edge"].spacing_ms, Some(T0));
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

#[test]
fn agents_per_target_places_each_target_on_k_agents_and_moves_them_when_one_is_gone() {
    let targets: Vec<String> = (0..40).map(|i| format!("\"10.0.0.{i}:80\"")).collect();
    let text = format!(
        "global: {{scrape_interval: 10s, scrape_timeout: 5s}}\nmodules: {{tcp: {{prober: tcp}}}}\njobs:\n  - job_name: spread\n    module: tcp\n    agents_per_target: 2\n    static_configs: [{{targets: [{}]}}]\nfleet: {{missing_after: 30s}}\n",
        targets.join(", ")
    );
    let hub = Hub::new(config(&text), Arc::new(Recorder::default()), T0);
    let mut streams = Vec::new();
    for i in 1..=5 {
        let (tx, rx) = mpsc::channel(64);
        let h = hello(&format!("edge-{i}"), "eu");
        let (connection, _) = connect(&hub, &h, None, tx, T0);
        streams.push((format!("edge-{i}"), connection, rx));
    }
    // Each got a plan as it connected; the ones before it are re-planned once, at
    // the next tick.
    hub.tick(T0 + 1).wait();
    let mut assigned: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for (id, _, rx) in &mut streams {
        assigned.insert(id.clone(), last_assignment(rx).unwrap_or_default());
    }
    let per_target = |assigned: &BTreeMap<String, BTreeSet<(String, String)>>| {
        let mut n: BTreeMap<(String, String), usize> = BTreeMap::new();
        for checks in assigned.values() {
            for c in checks {
                *n.entry(c.clone()).or_default() += 1;
            }
        }
        n
    };
    let counts = per_target(&assigned);
    assert_eq!(counts.len(), 40);
    assert!(counts.values().all(|n| *n == 2), "{counts:?}");
    let before = assigned.clone();

    // edge-3 goes away: nothing moves within missing_after, everything it had
    // moves after it, and nothing else moves.
    hub.disconnect("edge-3", streams[2].1, T0 + 1_000);
    hub.tick(T0 + 20_000).wait();
    for (id, _, rx) in &mut streams {
        assert!(
            last_assignment(rx).is_none(),
            "{id} reassigned within the grace"
        );
    }
    hub.tick(T0 + 32_000).wait();
    let mut after = before.clone();
    after.remove("edge-3");
    for (id, _, rx) in &mut streams {
        if id != "edge-3"
            && let Some(checks) = last_assignment(rx)
        {
            assert!(
                checks.is_superset(&before[id.as_str()]),
                "{id} lost a target"
            );
            after.insert(id.clone(), checks);
        }
    }
    let counts = per_target(&after);
    assert_eq!(counts.len(), 40);
    assert!(counts.values().all(|n| *n == 2), "{counts:?}");

    // It comes back and takes back exactly what it had.
    let (tx, mut rx) = mpsc::channel(64);
    let h = hello("edge-3", "eu");
    connect(&hub, &h, None, tx, T0 + 40_000);
    assert_eq!(last_assignment(&mut rx).unwrap(), before["edge-3"]);
    for (id, _, rx) in &mut streams {
        if id != "edge-3"
            && let Some(checks) = last_assignment(rx)
        {
            assert_eq!(checks, before[id.as_str()], "{id} after edge-3 came back");
        }
    }
}

#[test]
fn assignment_follows_the_selector() {
    let (_hub, _rec, mut rx) = setup();
    let Ok(AggregatorMessage {
        msg: Some(aggregator_message::Msg::Assignment(a)),
    }) = rx.try_recv().unwrap()
    else {
        panic!("expected an assignment first");
    };
    let jobs: Vec<_> = a.checks.iter().map(|c| c.job.as_str()).collect();
    assert_eq!(
        jobs,
        ["slow", "web"],
        "alertmanager selects region=mars only"
    );
    assert!(a.last, "a small assignment is one part");
    let module: sonde_proto::config::Module =
        serde_json::from_str(&a.modules[a.checks[0].module as usize].json).unwrap();
    assert_eq!(module.prober, sonde_proto::config::Prober::Tcp);
    assert_eq!(a.checks[0].interval_ms, 300_000);
}

#[test]
fn the_history_keeps_each_change_with_its_reasons_and_the_minutes_response_times() {
    let (hub, rec, _rx) = setup();
    let key = ("web", "127.0.0.1:80");
    let mut failed = result(2, key.0, key.1, T0 + 10_000, false);
    failed.failure = "connect: connection refused".into();
    for (batch, now) in [
        (result(1, key.0, key.1, T0, true), T0 + 5),
        (failed, T0 + 10_005),
        (result(3, key.0, key.1, T0 + 20_000, true), T0 + 20_005),
        // The next minute: the first minute's bucket is handed over.
        (result(4, key.0, key.1, T0 + 60_000, true), T0 + 60_005),
    ] {
        results(&hub, "eu-1", &[batch], now).unwrap();
    }
    let store = &rec.1;
    let events = store.events(key.0, key.1, 10).unwrap();
    let states: Vec<_> = events.iter().rev().map(|e| e.event.state).collect();
    assert_eq!(
        states,
        [HistoryState::Up, HistoryState::Down, HistoryState::Up]
    );
    let down = &events[1];
    assert_eq!(down.previous, Some(HistoryState::Up));
    assert_eq!(down.event.reasons(), ["connect: connection refused"]);
    assert_eq!(down.event.views[0].agent, "eu-1");
    let buckets = &store.latency(key.0, key.1, 0).unwrap()["eu-1"];
    assert_eq!(buckets.len(), 1, "the current minute is not written yet");
    assert_eq!((buckets[0].probes, buckets[0].successes), (3, 2));
    // A tick past the minute writes it even though no result came since.
    hub.tick(T0 + 125_000).wait();
    let buckets = &store.latency(key.0, key.1, 0).unwrap()["eu-1"];
    assert_eq!(buckets.len(), 2);
    // Gone quiet: the target becomes missing, and that is a change too.
    hub.tick(T0 + 200_000).wait();
    let newest = &store.events(key.0, key.1, 1).unwrap()[0];
    assert_eq!(newest.event.state, HistoryState::Missing);
    assert!(!newest.event.views[0].fresh);
}

#[test]
fn results_become_per_agent_series_and_up() {
    let (hub, rec, _rx) = setup();
    assert_eq!(
        results(
            &hub,
            "eu-1",
            &[result(1, "web", "127.0.0.1:80", T0, true)],
            T0 + 5
        )
        .ok(),
        Some(Some(1))
    );
    let out = rec.take();
    assert_eq!(
        value_of(
            &out,
            "probe_success",
            &[("agent", "eu-1"), ("team", "shop"), ("job", "web")]
        ),
        [1.0]
    );
    assert_eq!(
        value_of(
            &out,
            "up",
            &[
                ("job", "web"),
                ("instance", "127.0.0.1:80"),
                ("team", "shop")
            ]
        ),
        [1.0]
    );
    assert!(
        value_of(&out, "up", &[("agent", "eu-1")]).is_empty(),
        "up carries no agent label"
    );
    assert_eq!(
        value_of(&out, "sonde_target_agents", &[("job", "web")]),
        [1.0]
    );

    // A replay of what is committed is acked again but writes nothing.
    assert_eq!(
        results(
            &hub,
            "eu-1",
            &[result(1, "web", "127.0.0.1:80", T0, true)],
            T0 + 6
        )
        .ok(),
        Some(Some(1))
    );
    assert!(rec.take().is_empty());
    assert_eq!(hub.counters.results_deduplicated.load(Ordering::Relaxed), 1);

    // A result for a target nobody assigned is acked and dropped.
    assert_eq!(
        results(&hub, "eu-1", &[result(2, "nope", "x", T0, true)], T0 + 7).ok(),
        Some(Some(2))
    );
    assert!(value_of(&rec.take(), "probe_success", &[("job", "nope")]).is_empty());
}

#[test]
fn a_result_of_the_same_shape_reuses_the_series_and_a_reload_checks_it_again() {
    let (hub, rec, _rx) = setup();
    let mut one = result(1, "web", "127.0.0.1:80", T0, true);
    one.samples.push((
        "probe_http_duration_seconds".into(),
        vec![("phase".into(), "tls".into())],
        0.1,
    ));
    let next = |r: &IncomingResult, seq: u64, ts: i64, value: f64| {
        let mut r = r.clone();
        (r.seq, r.timestamp_ms) = (seq, ts);
        r.samples.values[1] = value;
        r
    };
    let phase = |out: &[Sample]| {
        out.iter()
            .find(|s| s.series.name() == "probe_http_duration_seconds")
            .map(|s| (s.series.clone(), s.value))
    };
    results(&hub, "eu-1", &[one.clone()], T0).unwrap();
    let (first, _) = phase(&rec.take()).unwrap();
    let two = next(&one, 2, T0 + 1000, 0.2);
    assert!(Arc::ptr_eq(&one.samples.shape, &two.samples.shape));
    results(&hub, "eu-1", std::slice::from_ref(&two), T0 + 1000).unwrap();
    let (second, value) = phase(&rec.take()).unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(value, 0.2, "the new result's value, not the old one's");
    // An external label named like the sample's label: the same shape is checked
    // again, and the sample refused.
    let with_phase = CONFIG.replace(
        "scrape_timeout: 5s}",
        "scrape_timeout: 5s, external_labels: {phase: global}}",
    );
    hub.reload(config(&with_phase), T0 + 1500).wait();
    rec.take();
    results(&hub, "eu-1", &[next(&two, 3, T0 + 2000, 0.3)], T0 + 2000).unwrap();
    assert_eq!(phase(&rec.take()), None);
    assert_eq!(refused(&hub, "reserved_label"), 1);
}

#[test]
fn a_series_is_built_once_and_shared_by_its_later_samples() {
    let (hub, rec, _rx) = setup();
    let with_phase = |seq: u64, ts: i64, phase: &str| {
        let mut r = result(seq, "web", "127.0.0.1:80", ts, true);
        r.samples.push((
            "probe_http_duration_seconds".into(),
            vec![("phase".into(), phase.into())],
            0.1,
        ));
        r
    };
    results(&hub, "eu-1", &[with_phase(1, T0, "tls")], T0).unwrap();
    let first = rec.take();
    results(&hub, "eu-1", &[with_phase(2, T0 + 1000, "tls")], T0 + 1000).unwrap();
    let second = rec.take();
    let of = |out: &[Sample], name: &str| {
        out.iter()
            .find(|s| s.series.name() == name && s.series.get("agent").is_some())
            .map(|s| s.series.clone())
            .unwrap()
    };
    for name in ["probe_success", "probe_http_duration_seconds"] {
        assert!(
            Arc::ptr_eq(&of(&first, name), &of(&second, name)),
            "{name}: the second result must reuse the first one's series"
        );
    }
    // Other labels: another series, with exactly its own labels.
    results(
        &hub,
        "eu-1",
        &[with_phase(3, T0 + 2000, "connect")],
        T0 + 2000,
    )
    .unwrap();
    let third = of(&rec.take(), "probe_http_duration_seconds");
    assert!(!Arc::ptr_eq(
        &third,
        &of(&second, "probe_http_duration_seconds")
    ));
    assert_eq!(third.get("phase"), Some("connect"));
    assert_eq!(third.get("team"), Some("shop"));
}

#[test]
fn stale_target_gets_one_staleness_marker() {
    let (hub, rec, _rx) = setup();
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", T0, false)],
        T0,
    )
    .unwrap();
    assert_eq!(value_of(&rec.take(), "up", &[("job", "web")]), [0.0]);
    // Window: 2 × 10s + 5s = 25s.
    hub.tick(T0 + 24_000).wait();
    assert!(
        value_of(&rec.take(), "up", &[("job", "web")])
            .iter()
            .all(|v| *v == 0.0)
    );
    hub.tick(T0 + 25_000).wait();
    let up = value_of(&rec.take(), "up", &[("job", "web")]);
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].to_bits(), STALE_NAN_BITS);
    hub.tick(T0 + 26_000).wait();
    assert!(
        value_of(&rec.take(), "up", &[("job", "web")]).is_empty(),
        "the marker is written once"
    );
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

#[test]
fn up_is_rewritten_within_a_minute_for_slow_jobs() {
    let (hub, rec, _rx) = after_one_slow_result();
    let mut writes = Vec::new();
    for s in 1..=180 {
        hub.tick(T0 + s * 1000).wait();
        if !value_of(&rec.take(), "up", &[("job", "slow")]).is_empty() {
            writes.push(s);
        }
    }
    assert!(!writes.is_empty());
    let mut last = 0;
    for w in writes {
        assert!(w - last <= 60, "gap of {}s between up samples", w - last);
        last = w;
    }
    assert!(180 - last <= 60);
}

#[test]
fn a_repeated_verdict_skips_the_merge_only_until_another_view_goes_stale() {
    // `web`: every 10 s, timeout 5 s, so a view is fresh for 25 s.
    let (hub, rec, _rx) = setup();
    let (tx, _rx2) = mpsc::channel(16);
    let eu2 = hello("eu-2", "eu");
    connect(&hub, &eu2, None, tx, T0);
    let target = "127.0.0.1:80";
    results(&hub, "eu-1", &[result(1, "web", target, T0, true)], T0).unwrap();
    results(&hub, "eu-2", &[result(1, "web", target, T0, true)], T0).unwrap();
    let agents = |out: &[Sample]| value_of(out, "sonde_target_agents", &[("job", "web")]);
    assert_eq!(agents(&rec.take()).last(), Some(&2.0));
    // The same verdict again, nothing due: the merge stands, nothing is written.
    results(
        &hub,
        "eu-1",
        &[result(2, "web", target, T0 + 5_000, true)],
        T0 + 5_000,
    )
    .unwrap();
    assert!(agents(&rec.take()).is_empty());
    // eu-2's view is stale from T0 + 25 s. eu-1's next result with the same verdict,
    // without a tick in between, must merge again and count one agent.
    results(
        &hub,
        "eu-1",
        &[result(3, "web", target, T0 + 26_000, true)],
        T0 + 26_000,
    )
    .unwrap();
    assert_eq!(agents(&rec.take()), [1.0]);
    // A changed verdict merges at once.
    results(
        &hub,
        "eu-1",
        &[result(4, "web", target, T0 + 27_000, false)],
        T0 + 27_000,
    )
    .unwrap();
    let out = rec.take();
    assert_eq!(value_of(&out, "up", &[("job", "web")]), [0.0]);
}

#[test]
fn a_target_is_evaluated_when_time_can_change_it_and_after_a_reload() {
    // `slow` (every 5 minutes): fresh for 2 × 5 min + 5 s, `up` rewritten every 30 s.
    let (hub, rec, _rx) = after_one_slow_result();
    for s in 1..=29 {
        hub.tick(T0 + s * 1000).wait();
    }
    assert!(value_of(&rec.take(), "up", &[("job", "slow")]).is_empty());
    hub.tick(T0 + 30_000).wait();
    assert_eq!(value_of(&rec.take(), "up", &[("job", "slow")]), [1.0]);
    // A reload that makes the job fast makes its view stale 25 s after it was taken:
    // the next evaluation is not the one worked out under the old window.
    let fast = CONFIG.replace("    interval: 5m\n", "");
    hub.reload(config(&fast), T0 + 30_500).wait();
    rec.take();
    hub.tick(T0 + 31_000).wait();
    let up = value_of(&rec.take(), "up", &[("job", "slow")]);
    assert_eq!(up.len(), 1);
    assert_eq!(
        up[0].to_bits(),
        STALE_NAN_BITS,
        "stale at once, not at the old deadline"
    );
}

#[test]
fn job_without_agents_is_missing_after_grace() {
    let (hub, rec, _rx) = setup();
    hub.tick(T0 + 10_000).wait();
    assert_eq!(
        value_of(&rec.take(), "sonde_job_missing", &[("job", "alertmanager")]),
        [0.0]
    );
    hub.tick(T0 + 31_000).wait();
    let out = rec.take();
    assert_eq!(
        value_of(&out, "sonde_job_missing", &[("job", "alertmanager")]),
        [1.0]
    );
    assert!(value_of(&out, "up", &[("job", "alertmanager")]).is_empty());
}

#[test]
fn a_job_is_missing_as_soon_as_its_last_target_is() {
    let (hub, rec, _rx) = setup();
    // Past the start-up grace (fleet.missing_after, 30 s) before the last result.
    let last = T0 + 40_000;
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", last, true)],
        last,
    )
    .unwrap();
    let (mut target_missing, mut job_missing) = (None, None);
    for s in 41..=200 {
        let now = T0 + s * 1000;
        hub.tick(now).wait();
        let out = rec.take();
        let up = value_of(&out, "up", &[("job", "web")]);
        if target_missing.is_none() && up.iter().any(|v| v.is_nan()) {
            target_missing = Some(now);
        }
        if job_missing.is_none() && value_of(&out, "sonde_job_missing", &[("job", "web")]) == [1.0]
        {
            job_missing = Some(now);
        }
    }
    let (t, j) = (target_missing.unwrap(), job_missing.unwrap());
    // The freshness window is 2 × 10 s + 5 s.
    assert_eq!(t, last + 25_000);
    assert!(
        j >= t && j - t <= 1_000,
        "target missing at {t}, job at {j}"
    );
}

#[test]
fn disconnected_agent_is_down_after_grace() {
    let (hub, rec, _rx) = setup();
    hub.disconnect("eu-1", 1, T0 + 1_000);
    hub.tick(T0 + 20_000).wait();
    assert_eq!(
        value_of(&rec.take(), "sonde_agent_up", &[("agent", "eu-1")]),
        [1.0]
    );
    hub.tick(T0 + 31_000).wait();
    let out = rec.take();
    assert_eq!(
        value_of(&out, "sonde_agent_up", &[("agent", "eu-1")]),
        [0.0]
    );
    assert_eq!(
        value_of(
            &out,
            "sonde_agent_info",
            &[("agent", "eu-1"), ("region", "eu")]
        ),
        [1.0]
    );
}

#[test]
fn removed_job_gets_staleness_markers_on_reload() {
    let (hub, rec, _rx) = setup();
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", T0, true)],
        T0,
    )
    .unwrap();
    // The job's own series are written (live) before it is removed.
    hub.tick(T0 + 500).wait();
    rec.take();
    let without_web = CONFIG.replace("  - job_name: web\n    module: tcp\n    static_configs: [{targets: [\"127.0.0.1:80\"], labels: {team: shop}}]\n", "");
    hub.reload(config(&without_web), T0 + 1000).wait();
    let out = rec.take();
    let up = value_of(&out, "up", &[("job", "web"), ("team", "shop")]);
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].to_bits(), STALE_NAN_BITS);
    for name in ["sonde_job_missing", "sonde_job_targets"] {
        let v = value_of(&out, name, &[("job", "web")]);
        assert_eq!(v.len(), 1, "{name}");
        assert_eq!(v[0].to_bits(), STALE_NAN_BITS, "{name}");
    }
    // Once: the next periodic write leaves it out.
    hub.tick(T0 + 60_000).wait();
    assert!(value_of(&rec.take(), "sonde_job_missing", &[("job", "web")]).is_empty());
}

#[test]
fn merged_timestamps_strictly_increase() {
    let (hub, rec, _rx) = setup();
    let (tx, _rx2) = mpsc::channel(16);
    connect(&hub, &hello("eu-2", "eu"), None, tx, T0);
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", T0, true)],
        T0,
    )
    .unwrap();
    results(
        &hub,
        "eu-2",
        &[result(1, "web", "127.0.0.1:80", T0, true)],
        T0,
    )
    .unwrap();
    let ts: Vec<i64> = rec
        .take()
        .into_iter()
        .filter(|s| s.series.name() == "up")
        .map(|s| s.timestamp_ms)
        .collect();
    assert_eq!(ts.len(), 2);
    assert!(ts[1] > ts[0]);
}

#[test]
fn gone_agent_series_get_staleness_markers_once() {
    let (hub, rec, _rx) = setup();
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", T0, true)],
        T0,
    )
    .unwrap();
    hub.disconnect("eu-1", 1, T0 + 1_000);
    rec.take();
    hub.tick(T0 + 20_000).wait();
    assert!(value_of(&rec.take(), "probe_success", &[("agent", "eu-1")]).is_empty());
    hub.tick(T0 + 31_000).wait();
    let marks = value_of(
        &rec.take(),
        "probe_success",
        &[("agent", "eu-1"), ("team", "shop")],
    );
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0].to_bits(), STALE_NAN_BITS);
    hub.tick(T0 + 45_000).wait();
    assert!(value_of(&rec.take(), "probe_success", &[("agent", "eu-1")]).is_empty());
}

#[test]
fn restored_agents_keep_their_committed_sequence() {
    let rec = Arc::new(Recorder::default());
    let hub = Hub::new(config(CONFIG), rec.clone(), T0);
    hub.restore(
        vec![crate::store::StoredAgent {
            id: "eu-1".into(),
            labels: [("region".to_string(), "eu".to_string())]
                .into_iter()
                .collect(),
            local_jobs: vec![],
            committed_seq: 10,
            first_seen_ms: T0 - 1000,
            last_seen_ms: T0 - 500,
        }],
        vec![],
    );
    let (tx, _rx) = mpsc::channel(16);
    connect(&hub, &hello("eu-1", "eu"), None, tx, T0);
    rec.take();
    let ack = results(
        &hub,
        "eu-1",
        &[result(10, "web", "127.0.0.1:80", T0, true)],
        T0,
    )
    .unwrap();
    assert_eq!(
        ack,
        Some(10),
        "a replay of a committed result is acked again"
    );
    assert!(rec.take().is_empty(), "and writes nothing");
    let ack = results(
        &hub,
        "eu-1",
        &[result(11, "web", "127.0.0.1:80", T0, true)],
        T0,
    )
    .unwrap();
    assert_eq!(ack, Some(11));
    assert_eq!(
        value_of(&rec.take(), "probe_success", &[("agent", "eu-1")]),
        [1.0]
    );
}

fn refused(hub: &Hub, reason: &str) -> u64 {
    hub.refusals
        .counts()
        .iter()
        .filter(|(_, r, _)| *r == reason)
        .map(|(.., n)| n)
        .sum()
}

#[test]
fn results_for_targets_not_assigned_are_refused_and_acked() {
    let (hub, rec, _rx) = setup();
    // alertmanager selects region=mars; eu-1 is in eu.
    let ack = results(
        &hub,
        "eu-1",
        &[
            result(1, "alertmanager", "127.0.0.1:9093", T0, true),
            result(2, "web", "127.0.0.1:1", T0, true),
        ],
        T0,
    )
    .unwrap();
    assert_eq!(
        ack,
        Some(2),
        "refused results are acked: resending cannot help"
    );
    assert!(
        rec.take()
            .iter()
            .all(|s| { s.series.get("job") != Some("alertmanager") })
    );
    assert_eq!(refused(&hub, "unassigned"), 2);
    // A local job of another agent is not this agent's either.
    let mut other = hello("eu-2", "eu");
    other.local_jobs = vec!["mine".into()];
    let (tx, _rx2) = mpsc::channel(16);
    connect(&hub, &other, None, tx, T0);
    results(&hub, "eu-1", &[result(3, "mine", "x", T0, true)], T0).unwrap();
    assert_eq!(refused(&hub, "unassigned"), 3);
    results(&hub, "eu-2", &[result(1, "mine", "x", T0, true)], T0).unwrap();
    assert_eq!(refused(&hub, "unassigned"), 3, "its own local job is fine");
}

#[test]
fn results_from_the_future_are_refused() {
    let (hub, rec, _rx) = setup();
    let day = 86_400_000;
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", T0 + day, true)],
        T0,
    )
    .unwrap();
    assert!(value_of(&rec.take(), "up", &[("job", "web")]).is_empty());
    assert_eq!(refused(&hub, "future_timestamp"), 1);
    // Within fleet.max_clock_skew (1m by default) is fine.
    results(
        &hub,
        "eu-1",
        &[result(2, "web", "127.0.0.1:80", T0 + 30_000, true)],
        T0,
    )
    .unwrap();
    assert_eq!(value_of(&rec.take(), "up", &[("job", "web")]), [1.0]);
}

#[test]
fn a_sample_cannot_take_a_target_label() {
    let (hub, rec, _rx) = setup();
    let mut r = result(1, "web", "127.0.0.1:80", T0, true);
    r.samples.push((
        "probe_http_status_code".into(),
        vec![("team".into(), "evil".into())],
        200.0,
    ));
    results(&hub, "eu-1", &[r], T0).unwrap();
    let out = rec.take();
    assert_eq!(value_of(&out, "probe_success", &[("team", "shop")]), [1.0]);
    assert!(value_of(&out, "probe_http_status_code", &[]).is_empty());
    assert_eq!(refused(&hub, "reserved_label"), 1);
}

#[test]
fn a_failed_commit_changes_nothing_and_the_replay_writes_everything() {
    let (hub, rec, _rx) = setup();
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", T0, true)],
        T0,
    )
    .unwrap();
    rec.take();
    rec.2.store(true, Ordering::Relaxed);
    let batch = [
        result(2, "web", "127.0.0.1:80", T0 + 10_000, false),
        result(3, "slow", "127.0.0.1:81", T0 + 10_000, true),
    ];
    assert!(results(&hub, "eu-1", &batch, T0 + 10_000).is_err());
    assert!(hub.storage.failing().is_some());
    assert_eq!(hub.storage.errors(), 1);
    {
        let state = hub.snapshot_blocking();
        assert_eq!(state.agents["eu-1"].committed_seq, 1);
        let web = &state.entries[&("web".to_string(), "127.0.0.1:80".to_string())];
        assert!(web.views["eu-1"].success, "the view is the committed one");
        assert_eq!(web.merged.unwrap().state, TargetState::Up);
        assert!(
            !state
                .entries
                .contains_key(&("slow".to_string(), "127.0.0.1:81".to_string()))
        );
    }
    // A failing tick keeps nothing either: the staleness marker stays owed.
    hub.tick(T0 + 40_000).wait();
    rec.2.store(false, Ordering::Relaxed);
    assert_eq!(
        results(&hub, "eu-1", &batch, T0 + 10_500).unwrap(),
        Some(3),
        "the same batch, offered again, is taken whole"
    );
    assert!(hub.storage.failing().is_none());
    let out = rec.take();
    assert_eq!(value_of(&out, "up", &[("job", "web")]), [0.0]);
    assert_eq!(value_of(&out, "probe_success", &[("job", "slow")]), [1.0]);
    hub.tick(T0 + 40_000).wait();
    let up = value_of(&rec.take(), "up", &[("job", "web")]);
    assert_eq!(up.len(), 1);
    assert_eq!(
        up[0].to_bits(),
        STALE_NAN_BITS,
        "the marker comes once it can"
    );
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

#[test]
fn the_series_of_an_agents_local_jobs_are_bounded() {
    let text = CONFIG.replace(
        "fleet: {missing_after: 30s}",
        "fleet: {missing_after: 30s, limits: {max_series: 3}}",
    );
    let rec = Arc::new(Recorder::default());
    let hub = Hub::new(config(&text), rec.clone(), T0);
    let (tx, _rx) = mpsc::channel(16);
    let mut h = hello("eu-1", "eu");
    h.local_jobs = vec!["mine".into()];
    connect(&hub, &h, None, tx, T0);
    let mut big = result_with(1, "mine", "a", 3);
    results(&hub, "eu-1", &[big.clone()], T0 + 10).unwrap();
    results(&hub, "eu-1", &[result_with(2, "mine", "b", 2)], T0 + 10).unwrap();
    assert_eq!(refused(&hub, "series_limit"), 1);
    // Replacing a target's result frees what the old one held.
    big.seq = 3;
    big.timestamp_ms = T0 + 3;
    results(&hub, "eu-1", &[big], T0 + 10).unwrap();
    assert_eq!(refused(&hub, "series_limit"), 1);
    assert_eq!(hub.snapshot_blocking().agents["eu-1"].series, 3);
}

#[test]
fn assigned_checks_are_never_refused_for_the_fixed_budget_only_past_their_modules() {
    // max_series 1 and max_series_bytes 1 byte: the fixed budget holds nothing, and
    // assigned checks bring their own.
    let text = CONFIG.replace(
        "fleet: {missing_after: 30s}",
        "fleet: {missing_after: 30s, limits: {max_series: 1, max_series_bytes: 1}}",
    );
    let rec = Arc::new(Recorder::default());
    let hub = Hub::new(config(&text), rec.clone(), T0);
    let (tx, _rx) = mpsc::channel(16);
    connect(&hub, &hello("eu-1", "eu"), None, tx, T0);
    let budget = CheckBudget::of(
        &sonde_proto::config::Module {
            prober: sonde_proto::config::Prober::Tcp,
            ..serde_json::from_str(r#"{"prober":"tcp"}"#).unwrap()
        },
        &crate::config::FleetLimits::default(),
    );
    let batch = [
        result_with(1, "web", "127.0.0.1:80", budget.samples),
        result_with(2, "slow", "127.0.0.1:81", 3),
    ];
    results(&hub, "eu-1", &batch, T0 + 10).unwrap();
    assert_eq!(refused(&hub, "series_limit"), 0);
    let state = hub.snapshot_blocking();
    assert_eq!(state.agents["eu-1"].series, budget.samples + 3);
    // One sample more than a tcp check produces: refused, and shown on the row.
    let over = result_with(3, "slow", "127.0.0.1:81", budget.samples + 1);
    results(&hub, "eu-1", &[over], T0 + 10).unwrap();
    assert_eq!(refused(&hub, "series_limit"), 1);
    let state = hub.snapshot_blocking();
    let key = ("slow".to_string(), "127.0.0.1:81".to_string());
    let note = &state.refused[&key]["eu-1"];
    assert_eq!(note.reason, Reason::SeriesLimit);
    assert!(note.detail.contains("module \"tcp\""), "{}", note.detail);
    // The next result accepted clears it.
    results(
        &hub,
        "eu-1",
        &[result_with(4, "slow", "127.0.0.1:81", 2)],
        T0 + 10,
    )
    .unwrap();
    assert!(!hub.snapshot_blocking().refused.contains_key(&key));
}

#[test]
fn job_and_instance_weigh_on_every_sample_and_a_local_instance_is_bounded() {
    let text = CONFIG.replace(
        "fleet: {missing_after: 30s}",
        "fleet: {missing_after: 30s, limits: {max_instance_bytes: 100}}",
    );
    let rec = Arc::new(Recorder::default());
    let hub = Hub::new(config(&text), rec.clone(), T0);
    let (tx, _rx) = mpsc::channel(16);
    let mut h = hello("eu-1", "eu");
    h.local_jobs = vec!["mine".into()];
    connect(&hub, &h, None, tx, T0);
    let batch = [
        result_with(1, "mine", &"i".repeat(100), 2),
        result_with(2, "mine", &"i".repeat(101), 2),
    ];
    results(&hub, "eu-1", &batch, T0 + 10).unwrap();
    assert_eq!(refused(&hub, "instance_too_long"), 1);
    let state = hub.snapshot_blocking();
    let names = sample_weight("probe_success", &[])
        + sample_weight(
            "probe_http_duration_seconds",
            &[("phase".into(), "1".into())],
        );
    assert_eq!(state.agents["eu-1"].series_bytes, names + 2 * (4 + 100));
}

#[test]
fn a_local_jobs_targets_belong_to_the_agent_that_declares_them_unless_shared() {
    for shared in [false, true] {
        let text = if shared {
            CONFIG.replace(
                "fleet: {missing_after: 30s}",
                "fleet: {missing_after: 30s, shared_local_jobs: [node]}",
            )
        } else {
            CONFIG.to_string()
        };
        let rec = Arc::new(Recorder::default());
        let hub = Hub::new(config(&text), rec.clone(), T0);
        let mut receivers = Vec::new();
        for id in ["honest", "mallory"] {
            let (tx, rx) = mpsc::channel(16);
            receivers.push(rx);
            let mut h = hello(id, "eu");
            h.local_jobs = vec!["node".into()];
            connect(&hub, &h, None, tx, T0);
        }
        results(
            &hub,
            "honest",
            &[result(1, "node", "localhost:9100", T0, false)],
            T0,
        )
        .unwrap();
        results(
            &hub,
            "mallory",
            &[result(1, "node", "localhost:9100", T0, true)],
            T0,
        )
        .unwrap();
        hub.tick(T0 + 1).wait();
        let out = rec.take();
        let ups = |agent: Option<&str>| {
            let mut pairs = vec![("job", "node"), ("instance", "localhost:9100")];
            pairs.extend(agent.map(|a| ("agent", a)));
            value_of(&out, "up", &pairs).last().copied()
        };
        if shared {
            // One target: quorum any, mallory's success holds it up.
            assert_eq!(ups(None), Some(1.0));
            assert_eq!(hub.snapshot_blocking().entries.len(), 1);
        } else {
            assert_eq!(ups(Some("honest")), Some(0.0));
            assert_eq!(ups(Some("mallory")), Some(1.0));
            let state = hub.snapshot_blocking();
            let key = (
                "node".to_string(),
                owned_instance("localhost:9100", "honest"),
            );
            assert_eq!(
                state.entries[&key]
                    .views
                    .keys()
                    .map(|a| &**a)
                    .collect::<Vec<_>>(),
                ["honest"]
            );
        }
    }
}

#[test]
fn owned_instances_of_different_agents_never_meet() {
    // The quoted id ends at its first unescaped quote, whatever the instance holds.
    let pairs = [
        ("a @\"b\"", "c"),
        ("a", "b\" @\"c"),
        ("a @\"b", "c"),
        ("a", "b @c"),
        ("a @", "b"),
    ];
    let keys: BTreeSet<String> = pairs.iter().map(|(i, a)| owned_instance(i, a)).collect();
    assert_eq!(keys.len(), pairs.len(), "{keys:?}");
}

#[test]
fn without_tokens_new_agents_past_max_agents_are_refused() {
    let text = CONFIG.replace(
        "fleet: {missing_after: 30s}",
        "fleet: {missing_after: 30s, limits: {max_agents: 2}}",
    );
    let rec = Arc::new(Recorder::default());
    let hub = Hub::new(config(&text), rec.clone(), T0);
    let mut receivers = Vec::new();
    let mut connect_as = |id: &str| {
        let (tx, rx) = mpsc::channel(16);
        receivers.push(rx);
        let h = hello(id, "eu");
        let labels = h.labels.clone().into_iter().collect();
        hub.connect(&h, labels, None, tx, T0).wait()
    };
    assert!(connect_as("a").is_ok());
    assert!(connect_as("b").is_ok());
    let refused = connect_as("c").err().expect("a third agent is refused");
    assert!(refused.contains("max_agents"), "{refused}");
    // An agent it knows still comes back.
    assert!(connect_as("a").is_ok());
    assert_eq!(hub.snapshot_blocking().agents.len(), 2);
}

#[test]
fn without_tokens_local_job_names_are_bounded_over_all_agents() {
    let text = CONFIG.replace(
        "fleet: {missing_after: 30s}",
        "fleet: {missing_after: 30s, limits: {max_anonymous_local_jobs: 3}}",
    );
    let rec = Arc::new(Recorder::default());
    let hub = Hub::new(config(&text), rec.clone(), T0);
    let mut receivers = Vec::new();
    let mut connect_with = |id: &str, jobs: &[&str]| {
        let (tx, rx) = mpsc::channel(16);
        receivers.push(rx);
        let mut h = hello(id, "eu");
        h.local_jobs = jobs.iter().map(|j| j.to_string()).collect();
        let labels = h.labels.clone().into_iter().collect();
        hub.connect(&h, labels, None, tx, T0).wait()
    };
    assert!(connect_with("a", &["x", "y"]).is_ok());
    // Names already declared cost nothing more; a configured job's name is not local.
    assert!(connect_with("b", &["x", "y", "web"]).is_ok());
    assert!(connect_with("c", &["z"]).is_ok());
    let refused = connect_with("d", &["x", "w"]).err().expect("a fourth name");
    assert!(refused.contains("max_anonymous_local_jobs"), "{refused}");
    assert!(!hub.snapshot_blocking().agents.contains_key("d"));
}

#[test]
fn heartbeats_give_the_agent_clock_skew() {
    let (hub, rec, _rx) = setup();
    hub.heartbeat("eu-1", T0 + 2_500, T0 + 500);
    hub.tick(T0 + 20_000).wait();
    assert_eq!(
        value_of(
            &rec.take(),
            "sonde_agent_clock_skew_seconds",
            &[("agent", "eu-1")]
        ),
        [2.0]
    );
    hub.heartbeat("eu-1", i64::MIN, T0 + 21_000);
    assert!(
        hub.snapshot_blocking().agents["eu-1"]
            .clock_skew_ms
            .unwrap()
            < -1_000_000_000_000_000,
        "an absurd clock is reported, not a panic"
    );
}

#[test]
fn a_revoked_token_ends_the_stream_on_reload() {
    let with_tokens = |tokens: &str| {
        config(&CONFIG.replace(
            "fleet: {missing_after: 30s}",
            &format!("fleet: {{missing_after: 30s, auth: {{tokens: [{tokens}]}}}}"),
        ))
    };
    let rec = Arc::new(Recorder::default());
    let hub = Hub::new(
        with_tokens("{agent: eu-1, token: a}, {agent: eu-2, token: b}"),
        rec,
        T0,
    );
    let connect = |id: &str, token: &str| {
        let (tx, rx) = mpsc::channel(16);
        let h = hello(id, "eu");
        let (_, kick) = connect(&hub, &h, Some(token.into()), tx, T0);
        (kick, rx)
    };
    let (kick_1, _rx1) = connect("eu-1", "a");
    let (kick_2, _rx2) = connect("eu-2", "b");
    hub.reload(with_tokens("{agent: eu-2, token: b}"), T0 + 1000)
        .wait();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let why = tokio::time::timeout(Duration::from_secs(1), kick_1.kicked())
            .await
            .expect("eu-1's stream is told to end");
        assert!(why.contains("token"), "{why}");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), kick_2.kicked())
                .await
                .is_err(),
            "eu-2's token still stands"
        );
    });
    assert!(!hub.snapshot_blocking().agents["eu-1"].connected);
}
