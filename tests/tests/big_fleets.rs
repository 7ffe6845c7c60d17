//! `agents_per_target` with real processes: five sonde agents, a job whose targets each
//! go to two of them, one agent SIGKILLed. After `fleet.missing_after`, every target again
//! has two fresh views, none from the dead agent; when it comes back, it takes back what
//! it had. Checked through the aggregator's `/api/v1/targets`, as an operator would.

use sonde_tests::{Scene, http_get_ok, start_agent, start_aggregator, start_nginx};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const AGENTS: usize = 5;
const TARGETS: usize = 12;
const K: usize = 2;

/// target → the agents with a fresh view of it, for the job `spread`.
fn fresh_views(web: &str) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let body = http_get_ok(&format!("{web}/api/v1/targets"))?;
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for t in json["data"].as_array().ok_or("no data")? {
        if t["job"] != "spread" {
            continue;
        }
        let fresh: BTreeSet<String> = t["views"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["fresh"] == true && v["success"] == true)
            .filter_map(|v| v["agent"].as_str().map(str::to_string))
            .collect();
        out.insert(t["instance"].as_str().unwrap_or("").to_string(), fresh);
    }
    Ok(out)
}

/// Ok when every one of the `TARGETS` targets has exactly `K` fresh views, none of them
/// from `not`.
fn placed(views: &BTreeMap<String, BTreeSet<String>>, not: Option<&str>) -> Result<(), String> {
    if views.len() != TARGETS {
        return Err(format!("{} targets: {views:?}", views.len()));
    }
    for (target, agents) in views {
        if agents.len() != K || not.is_some_and(|n| agents.contains(n)) {
            return Err(format!("{target}: {agents:?}"));
        }
    }
    Ok(())
}

#[test]
fn each_target_keeps_k_fresh_views_when_an_agent_dies() {
    let mut scene = Scene::new("big-fleets");
    let nginx = start_nginx(&mut scene, "nginx");
    let targets: Vec<String> = (0..TARGETS)
        .map(|i| format!("\"http://127.0.0.1:{nginx}/?target={i}\""))
        .collect();
    let aggregator = start_aggregator(
        &mut scene,
        "aggregator",
        &format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 500ms}}\n\
             modules: {{http_2xx: {{prober: http}}}}\n\
             jobs:\n  - job_name: spread\n    module: http_2xx\n    agents_per_target: {K}\n    \
             static_configs: [{{targets: [{}]}}]\n\
             fleet: {{missing_after: 4s}}\n",
            targets.join(", ")
        ),
    );
    let agent_config = |id: &str| {
        format!(
            "agent: {{id: {id}, labels: {{region: eu}}}}\naggregators:\n  - address: {}\n",
            aggregator.grpc
        )
    };
    for i in 1..=AGENTS {
        let id = format!("edge-{i}");
        start_agent(&mut scene, &id, &agent_config(&id));
    }

    let web = aggregator.web.clone();
    let before = scene.wait_until(
        "every target probed by exactly two agents",
        Duration::from_secs(60),
        || {
            let views = fresh_views(&web)?;
            placed(&views, None).map(|()| views)
        },
    );
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for agents in before.values() {
        for a in agents {
            *load.entry(a).or_default() += 1;
        }
    }
    assert!(
        load.len() >= 4,
        "rendezvous hashing should spread {TARGETS} targets over most of {AGENTS} agents: {load:?}"
    );
    let victim = load
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(a, _)| a.to_string())
        .expect("some agent has targets");

    scene.kill(&victim);
    let after = scene.wait_until(
        &format!("{victim}'s targets to move to other agents after missing_after"),
        Duration::from_secs(30),
        || {
            let views = fresh_views(&web)?;
            placed(&views, Some(&victim)).map(|()| views)
        },
    );
    for (target, agents) in &before {
        if !agents.contains(&victim) {
            assert_eq!(
                &after[target], agents,
                "{target} was not {victim}'s and must not move"
            );
        }
    }

    // It comes back (same id, same storage) and takes exactly its targets back.
    let name = format!("{victim}-again");
    start_agent(&mut scene, &name, &agent_config(&victim));
    scene.wait_until(
        &format!("{victim} to take its targets back"),
        Duration::from_secs(30),
        || {
            let views = fresh_views(&web)?;
            if views == before {
                Ok(())
            } else {
                Err(format!("{views:?}"))
            }
        },
    );
}
