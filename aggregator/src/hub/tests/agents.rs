//! Agents: admission without tokens, heartbeats, revoked tokens, agents gone and restored.

use super::*;
use sonde_hub::model::STALE_NAN_BITS;
use std::time::Duration;

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
        vec![crate::storage::StoredAgent {
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
