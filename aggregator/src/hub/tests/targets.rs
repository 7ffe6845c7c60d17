//! Views, the merge into `up`, staleness markers, and the history.

use super::*;
use crate::history::HistoryState;
use sonde_hub::model::STALE_NAN_BITS;

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
fn a_maintenance_window_writes_in_maintenance_for_the_targets_it_selects_only() {
    use crate::maintenance::Windows;
    let (hub, rec, _rx) = setup();
    for (seq, (job, instance)) in [("web", "127.0.0.1:80"), ("slow", "127.0.0.1:81")]
        .into_iter()
        .enumerate()
    {
        results(
            &hub,
            "eu-1",
            &[result(seq as u64 + 1, job, instance, T0, true)],
            T0 + 5,
        )
        .unwrap();
    }
    rec.take();
    // From T0 + 20 s for 30 s, on the targets of team shop (job web only).
    set_one_window(
        &hub,
        "shop-upgrade",
        &[("team", "shop")],
        &[],
        (T0 + 20_000, "30s"),
        T0 + 10_000,
    );
    let flag = |out: &[Sample], job: &str| {
        value_of(
            out,
            "sonde_target_in_maintenance",
            &[("job", job), ("team", "shop")],
        )
    };
    let out = rec.take();
    assert_eq!(flag(&out, "web"), [0.0], "selected, not yet active");
    assert!(
        value_of(&out, "sonde_target_in_maintenance", &[("job", "slow")]).is_empty(),
        "a target no window selects has no series"
    );
    // The tick at which the window starts writes 1 at once (not at the next periodic
    // write), and the one at which it ends writes 0.
    hub.tick(T0 + 20_000).wait();
    assert_eq!(flag(&rec.take(), "web"), [1.0]);
    hub.tick(T0 + 21_000).wait();
    assert!(flag(&rec.take(), "web").is_empty(), "nothing new to say");
    hub.tick(T0 + 50_000).wait();
    assert_eq!(flag(&rec.take(), "web"), [0.0]);
    // Without the window the series goes stale.
    hub.set_maintenance(Arc::new(Windows::default()), T0 + 51_000)
        .wait();
    let out = rec.take();
    let stale = value_of(&out, "sonde_target_in_maintenance", &[("job", "web")]);
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].to_bits(), STALE_NAN_BITS);
    assert_eq!(
        hub.snapshot_blocking().maintenance.live().count(),
        0,
        "the snapshot shows the windows in force"
    );
}

#[test]
fn an_agent_in_maintenance_keeps_its_view_but_it_does_not_count_toward_up() {
    use crate::maintenance::Windows;
    let (hub, rec, _rx) = setup();
    let (tx, _rx_us) = mpsc::channel(16);
    connect(&hub, &hello("us-1", "us"), None, tx, T0);
    let target = ("web", "127.0.0.1:80");
    // eu-1 succeeds, us-1 fails: with the default quorum (any) the target is up.
    results(
        &hub,
        "eu-1",
        &[result(1, target.0, target.1, T0, true)],
        T0 + 5,
    )
    .unwrap();
    results(
        &hub,
        "us-1",
        &[result(1, target.0, target.1, T0, false)],
        T0 + 6,
    )
    .unwrap();
    // The last value written in a batch of samples.
    let merged = |out: &[Sample], name: &str| value_of(out, name, &[("job", "web")]).pop();
    assert_eq!(merged(&rec.take(), "up"), Some(1.0));
    // From T0 + 5 s for 20 s, the agents of region eu.
    set_one_window(
        &hub,
        "eu-network",
        &[],
        &[("region", "eu")],
        (T0 + 5_000, "20s"),
        T0 + 1_000,
    );
    let out = rec.take();
    let flag = |out: &[Sample], agent: &str| {
        value_of(out, "sonde_agent_in_maintenance", &[("agent", agent)])
    };
    assert_eq!(flag(&out, "eu-1"), [0.0], "selected, not yet active");
    assert!(
        flag(&out, "us-1").is_empty(),
        "an agent no window selects has no series"
    );
    assert!(
        value_of(&out, "sonde_target_in_maintenance", &[]).is_empty(),
        "a window of agents puts no target in maintenance"
    );
    // The window opens: eu-1's success no longer counts, so us-1's failure decides.
    hub.tick(T0 + 5_000).wait();
    let out = rec.take();
    assert_eq!(flag(&out, "eu-1"), [1.0]);
    assert_eq!(merged(&out, "up"), Some(0.0));
    assert_eq!(merged(&out, "sonde_target_agents"), Some(1.0));
    let snapshot = hub.snapshot_blocking();
    let key = (target.0.to_string(), target.1.to_string());
    assert!(
        snapshot.entries[&key].views.contains_key("eu-1"),
        "its view is kept, for the pages"
    );
    // Its new results are recorded (per-agent series) but still do not count.
    results(
        &hub,
        "eu-1",
        &[result(2, target.0, target.1, T0 + 10_000, true)],
        T0 + 10_005,
    )
    .unwrap();
    let out = rec.take();
    assert_eq!(value_of(&out, "probe_success", &[("agent", "eu-1")]), [1.0]);
    hub.tick(T0 + 10_010).wait();
    assert!(
        merged(&rec.take(), "up").is_none_or(|v| v == 0.0),
        "still down"
    );
    // The window ends: eu-1's fresh view counts again.
    results(
        &hub,
        "us-1",
        &[result(2, target.0, target.1, T0 + 20_000, false)],
        T0 + 20_005,
    )
    .unwrap();
    results(
        &hub,
        "eu-1",
        &[result(3, target.0, target.1, T0 + 20_000, true)],
        T0 + 20_006,
    )
    .unwrap();
    rec.take();
    hub.tick(T0 + 25_000).wait();
    let out = rec.take();
    assert_eq!(flag(&out, "eu-1"), [0.0]);
    assert_eq!(merged(&out, "up"), Some(1.0));
    assert_eq!(merged(&out, "sonde_target_agents"), Some(2.0));
    // Without the window the flag goes stale.
    hub.set_maintenance(Arc::new(Windows::default()), T0 + 26_000)
        .wait();
    let stale = flag(&rec.take(), "eu-1");
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].to_bits(), STALE_NAN_BITS);
}
