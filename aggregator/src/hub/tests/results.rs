//! The accept path: what an agent may report, and what its results may weigh.

use super::*;
use crate::refusals::Reason;
use sonde_hub::budget::CheckBudget;
use sonde_hub::model::sample_weight;

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
