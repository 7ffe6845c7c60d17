//! Placement and assignments.

use super::*;
use std::collections::BTreeMap;

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
