//! Maintenance windows with the real binaries: an aggregator and an agent probing a real
//! HTTP server (nginx) that is taken down, writing to a real Prometheus loaded with the
//! shipped alert rules. During a window the target is still probed (`up 0` is written),
//! `sonde_target_in_maintenance` is 1 and `SondeTargetDown` stays quiet for it while it
//! fires for a target outside any window; the window's time is left out of uptime.
//! Windows added through the API need `--web.enable-lifecycle`, survive a restart of
//! the aggregator, and stop when deleted. A window of agents (`agents:`) keeps its
//! agents probing but leaves their results out of `up`, and keeps `SondeAgentDown` quiet
//! for them.

use sonde_tests::{
    RestartableAggregator, Scene, http_get_ok, nginx_flip_file, prometheus_alerts,
    prometheus_expect, prometheus_query, repo_path, start_agent, start_nginx, start_prometheus,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_secs(60);

/// Unix milliseconds as RFC 3339 (UTC, whole seconds), by Howard Hinnant's
/// days-to-civil algorithm.
fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn agent() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .proxy(None)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into()
    })
}

fn post_json(url: &str, body: &serde_json::Value) -> (u16, String) {
    let mut response = agent()
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_to_string().unwrap_or_default(),
    )
}

fn delete(url: &str) -> (u16, String) {
    let mut response = agent()
        .delete(url)
        .call()
        .unwrap_or_else(|e| panic!("DELETE {url}: {e}"));
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// The alerts firing: (alertname, job).
fn firing(prom: &str) -> Result<Vec<(String, String)>, String> {
    Ok(prometheus_alerts(prom)?
        .iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| {
            let label = |k: &str| a["labels"][k].as_str().unwrap_or("").to_string();
            (label("alertname"), label("job"))
        })
        .collect())
}

fn target_down_jobs(prom: &str) -> Result<Vec<String>, String> {
    let mut jobs: Vec<String> = firing(prom)?
        .into_iter()
        .filter(|(name, _)| name == "SondeTargetDown")
        .map(|(_, job)| job)
        .collect();
    jobs.sort();
    Ok(jobs)
}

/// `GET /api/v1/maintenance`: the windows listed.
fn windows(web: &str) -> Result<Vec<serde_json::Value>, String> {
    let body = http_get_ok(&format!("{web}/api/v1/maintenance"))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    Ok(v["data"].as_array().cloned().unwrap_or_default())
}

/// `in_maintenance` of the target of `job` in `/api/v1/targets`.
fn in_maintenance(web: &str, job: &str) -> Result<serde_json::Value, String> {
    let body = http_get_ok(&format!("{web}/api/v1/targets"))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["job"] == job)
        .map(|t| t["in_maintenance"].clone())
        .ok_or_else(|| format!("no target of job {job}: {body}"))
}

/// The history API's last-hour uptime and durations of the target of `job`.
fn last_hour(web: &str, job: &str, instance: &str) -> Result<serde_json::Value, String> {
    let url = url::Url::parse_with_params(
        &format!("{web}/api/v1/targets/history"),
        &[("job", job), ("instance", instance)],
    )
    .map_err(|e| e.to_string())?;
    let body = http_get_ok(url.as_str())?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "uptime": v["data"]["uptime"]["1h"],
        "durations": v["data"]["durations_ms"]["1h"],
    }))
}

#[test]
fn a_target_in_a_maintenance_window_is_probed_but_not_alerted_nor_counted_against_uptime() {
    // Built first (a no-op when up to date): the window's start below is counted from
    // now, and must come after the aggregator's first results.
    sonde_tests::sonde_bin("sonde-aggregator");
    let mut scene = Scene::new("maintenance-windows");
    let nginx = start_nginx(&mut scene, "nginx");
    let target = format!("http://127.0.0.1:{nginx}/flip");
    let prom = start_prometheus(
        &mut scene,
        "prometheus",
        &[repo_path("deploy/prometheus/sonde-alerts.yml")],
    );
    let p = prom.as_str();
    // The config's window opens a little after the start, so that some up time is
    // counted before it, and lasts an hour.
    let opens_ms = now_ms() + 20_000;
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
modules:
  http_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
jobs:
  - job_name: web
    module: http_2xx
    static_configs:
      - targets: ["{target}"]
  - job_name: shop
    module: http_2xx
    static_configs:
      - targets: ["{target}"]
remote_write:
  - url: {prom}/api/v1/write
    queue_config: {{batch_send_deadline: 100ms, min_backoff: 50ms, max_backoff: 500ms}}
maintenance:
  - name: web-upgrade
    match: {{job: web}}
    start: {start}
    duration: 1h
fleet:
  missing_after: 5s
"#,
        start = rfc3339(opens_ms),
    );
    let aggregator = RestartableAggregator::new(&scene, "aggregator", &config);
    let web = aggregator.web();
    aggregator.start(&mut scene, "aggregator-1", &[]);
    start_agent(
        &mut scene,
        "edge-eu",
        &format!(
            "agent:\n  id: edge-eu\naggregators:\n  - address: {}\n",
            aggregator.grpc()
        ),
    );

    // ---- without --web.enable-lifecycle the API only lists
    let window_body = serde_json::json!({
        "name": "shop-fix",
        "match": {"job": "shop"},
        "start": rfc3339(now_ms() - 1_000),
        "duration": "1h",
    });
    let (status, body) = post_json(&format!("{web}/api/v1/maintenance"), &window_body);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--web.enable-lifecycle"), "{body}");
    let (status, body) = delete(&format!("{web}/api/v1/maintenance/web-upgrade"));
    assert_eq!(status, 403, "{body}");
    let listed = windows(&web).expect("GET /api/v1/maintenance");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "web-upgrade");
    assert_eq!(listed[0]["source"], "config");

    // ---- before the window: selected (0), the other job has no such series
    scene.wait_until("both targets up in Prometheus", WAIT, || {
        prometheus_expect(p, r#"count(up{job=~"web|shop"} == 1)"#, 2.0)
    });
    if now_ms() < opens_ms - 3_000 {
        scene.wait_until(
            "sonde_target_in_maintenance 0 before the window",
            WAIT,
            || prometheus_expect(p, r#"sonde_target_in_maintenance{job="web"}"#, 0.0),
        );
    }
    assert!(
        prometheus_query(p, r#"sonde_target_in_maintenance{job="shop"}"#)
            .expect("query")
            .is_empty(),
        "a target no window selects has no sonde_target_in_maintenance"
    );

    // ---- in the window, the target goes down: probed (up 0), but no alert for it
    scene.wait_until(
        "sonde_target_in_maintenance 1 once the window opens",
        WAIT,
        || prometheus_expect(p, r#"sonde_target_in_maintenance{job="web"}"#, 1.0),
    );
    assert_eq!(in_maintenance(&web, "web").expect("targets"), "web-upgrade");
    assert_eq!(
        in_maintenance(&web, "shop").expect("targets"),
        serde_json::Value::Null
    );
    let active = windows(&web).expect("GET");
    assert_eq!(active[0]["active"], true, "{active:?}");
    // The status pages say so: the targets list beside the state, the target's own page.
    let list = http_get_ok(&format!("{web}/targets?job=web")).expect("/targets");
    assert!(list.contains("in maintenance"), "{list}");
    assert!(
        !http_get_ok(&format!("{web}/targets?job=shop"))
            .expect("/targets")
            .contains("in maintenance")
    );
    let mut page = url::Url::parse(&format!("{web}/target")).expect("url");
    page.query_pairs_mut()
        .append_pair("job", "web")
        .append_pair("instance", &target);
    let page = http_get_ok(page.as_str()).expect("/target");
    assert!(
        page.contains("MAINTENANCE") && page.contains("web-upgrade"),
        "{page}"
    );
    std::fs::write(nginx_flip_file(&scene, "nginx"), "down").expect("make /flip fail");
    scene.wait_until("up 0 written for both targets", WAIT, || {
        prometheus_expect(p, r#"count(up{job=~"web|shop"} == 0)"#, 2.0)
    });
    scene.wait_until(
        "SondeTargetDown for job shop",
        WAIT,
        || match target_down_jobs(p)?.as_slice() {
            [job] if job == "shop" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    scene.hold_for(
        "SondeTargetDown quiet for job web",
        Duration::from_secs(4),
        || match target_down_jobs(p)?.as_slice() {
            [job] if job == "shop" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // ---- uptime: the window's down time is left out for web, counted for shop
    scene.wait_until("uptimes", WAIT, || {
        let (web_h, shop_h) = (
            last_hour(&web, "web", &target)?,
            last_hour(&web, "shop", &target)?,
        );
        let down = |h: &serde_json::Value| h["durations"]["down"].as_i64().unwrap_or(-1);
        let up = |h: &serde_json::Value| h["durations"]["up"].as_i64().unwrap_or(-1);
        if down(&shop_h) >= 2_000 && up(&web_h) > 0 && down(&web_h) == 0 && web_h["uptime"] == 1.0 {
            Ok(())
        } else {
            Err(format!("web {web_h}, shop {shop_h}"))
        }
    });

    // ---- with --web.enable-lifecycle: a window added through the API takes effect
    scene.kill("aggregator-1");
    aggregator.start(&mut scene, "aggregator-2", &["--web.enable-lifecycle"]);
    let (status, body) = post_json(
        &format!("{web}/api/v1/maintenance"),
        &serde_json::json!({"name": "bad", "match": {"job": "shop"}, "start": "now", "duration": "1h"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("RFC 3339"), "{body}");
    let (status, body) = post_json(
        &format!("{web}/api/v1/maintenance"),
        &serde_json::json!({"name": "web-upgrade", "match": {"job": "shop"}, "start": rfc3339(now_ms()), "duration": "1h"}),
    );
    assert_eq!(status, 409, "a config window's name: {body}");
    let (status, body) = post_json(&format!("{web}/api/v1/maintenance"), &window_body);
    assert_eq!(status, 200, "{body}");
    scene.wait_until("sonde_target_in_maintenance 1 for shop", WAIT, || {
        prometheus_expect(p, r#"sonde_target_in_maintenance{job="shop"}"#, 1.0)
    });
    scene.wait_until(
        "SondeTargetDown quiet for both jobs",
        WAIT,
        || match target_down_jobs(p)?.as_slice() {
            [] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(
        prometheus_expect(p, r#"up{job="shop"}"#, 0.0).is_ok(),
        "probing goes on in the window"
    );
    let listed = windows(&web).expect("GET");
    let api: Vec<&serde_json::Value> = listed.iter().filter(|w| w["source"] == "api").collect();
    assert_eq!(api.len(), 1, "{listed:?}");
    assert_eq!(api[0]["name"], "shop-fix");
    assert_eq!(api[0]["active"], true);

    // ---- it survives a restart of the aggregator
    scene.kill("aggregator-2");
    aggregator.start(&mut scene, "aggregator-3", &["--web.enable-lifecycle"]);
    let listed = windows(&web).expect("GET after the restart");
    assert!(
        listed
            .iter()
            .any(|w| w["name"] == "shop-fix" && w["source"] == "api"),
        "{listed:?}"
    );
    scene.wait_until(
        "in_maintenance shop-fix after the restart",
        WAIT,
        || match in_maintenance(&web, "shop")? {
            v if v == "shop-fix" => Ok(()),
            other => Err(format!("{other}")),
        },
    );

    // ---- deleted: the alert fires again; a config window cannot be deleted here
    let (status, body) = delete(&format!("{web}/api/v1/maintenance/web-upgrade"));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("config file"), "{body}");
    let (status, body) = delete(&format!("{web}/api/v1/maintenance/shop-fix"));
    assert_eq!(status, 200, "{body}");
    let (status, _) = delete(&format!("{web}/api/v1/maintenance/shop-fix"));
    assert_eq!(status, 404);
    let listed = windows(&web).expect("GET after the delete");
    assert_eq!(listed.len(), 1, "{listed:?}");
    scene.wait_until(
        "SondeTargetDown for job shop again",
        WAIT,
        || match target_down_jobs(p)?.as_slice() {
            [job] if job == "shop" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(
        in_maintenance(&web, "shop").expect("targets"),
        serde_json::Value::Null
    );
    scene.check_running().expect("every process still running");
}

/// Every alert named `name`, pending or firing: (state, agent).
fn alerts_named(prom: &str, name: &str) -> Result<Vec<(String, String)>, String> {
    Ok(prometheus_alerts(prom)?
        .iter()
        .filter(|a| a["labels"]["alertname"] == name)
        .map(|a| {
            (
                a["state"].as_str().unwrap_or("").to_string(),
                a["labels"]["agent"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

/// `in_maintenance` of `agent` in `/api/v1/agents`.
fn agent_in_maintenance(web: &str, agent: &str) -> Result<serde_json::Value, String> {
    let body = http_get_ok(&format!("{web}/api/v1/agents"))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["agent"] == agent)
        .map(|a| a["in_maintenance"].clone())
        .ok_or_else(|| format!("no agent {agent}: {body}"))
}

#[test]
fn an_agent_in_a_maintenance_window_keeps_probing_but_does_not_count_nor_page() {
    sonde_tests::sonde_bin("sonde-aggregator");
    let mut scene = Scene::new("maintenance-agents");
    let nginx = start_nginx(&mut scene, "nginx");
    let target = format!("http://127.0.0.1:{nginx}/");
    let prom = start_prometheus(
        &mut scene,
        "prometheus",
        &[repo_path("deploy/prometheus/sonde-alerts.yml")],
    );
    let p = prom.as_str();
    // Site b's agent cannot reach the target (its connect policy refuses loopback), so
    // with quorum all the target is down until site b is in maintenance.
    let opens_ms = now_ms() + 15_000;
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
modules:
  http_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
jobs:
  - job_name: web
    module: http_2xx
    quorum: all
    static_configs:
      - targets: ["{target}"]
remote_write:
  - url: {prom}/api/v1/write
    queue_config: {{batch_send_deadline: 100ms, min_backoff: 50ms, max_backoff: 500ms}}
maintenance:
  - name: site-b-network
    agents: {{site: b}}
    start: {start}
    duration: 1h
fleet:
  missing_after: 3s
"#,
        start = rfc3339(opens_ms),
    );
    let aggregator = RestartableAggregator::new(&scene, "aggregator", &config);
    let web = aggregator.web();
    aggregator.start(&mut scene, "aggregator-1", &["--web.enable-lifecycle"]);
    for (id, site, policy) in [
        ("edge-a", "a", ""),
        (
            "edge-b",
            "b",
            "assigned_modules:\n  connect:\n    deny: [\"127.0.0.0/8\"]\n",
        ),
    ] {
        start_agent(
            &mut scene,
            id,
            &format!(
                "agent:\n  id: {id}\n  labels: {{site: {site}}}\naggregators:\n  - address: {}\n{policy}",
                aggregator.grpc()
            ),
        );
    }

    // ---- before the window: edge-b's failure counts, the target is down
    scene.wait_until("up 0 with both agents counted", WAIT, || {
        prometheus_expect(p, r#"up{job="web"} == 0 and sonde_target_agents == 2"#, 0.0)
    });
    if now_ms() < opens_ms - 3_000 {
        scene.wait_until(
            "sonde_agent_in_maintenance 0 before the window",
            WAIT,
            || prometheus_expect(p, r#"sonde_agent_in_maintenance{agent="edge-b"}"#, 0.0),
        );
        assert_eq!(
            agent_in_maintenance(&web, "edge-b").expect("agents"),
            serde_json::Value::Null
        );
    }

    // ---- in the window: edge-b probes on, its results do not count
    scene.wait_until(
        "sonde_agent_in_maintenance 1 once the window opens",
        WAIT,
        || prometheus_expect(p, r#"sonde_agent_in_maintenance{agent="edge-b"}"#, 1.0),
    );
    assert!(
        prometheus_query(p, r#"sonde_agent_in_maintenance{agent="edge-a"}"#)
            .expect("query")
            .is_empty(),
        "an agent no window selects has no sonde_agent_in_maintenance"
    );
    scene.wait_until("up 1 from edge-a alone", WAIT, || {
        prometheus_expect(p, r#"up{job="web"} == 1 and sonde_target_agents == 1"#, 1.0)
    });
    scene.wait_until("edge-b still probes (and fails)", WAIT, || {
        let before = prometheus_query(p, r#"timestamp(probe_success{agent="edge-b"} == 0)"#)?;
        let seen = before
            .first()
            .map(|(_, at)| *at)
            .ok_or("no failing probe_success of edge-b")?;
        if seen * 1000.0 > opens_ms as f64 + 2_000.0 {
            Ok(())
        } else {
            Err(format!("last failing result of edge-b at {seen}"))
        }
    });
    assert_eq!(
        agent_in_maintenance(&web, "edge-b").expect("agents"),
        "site-b-network"
    );
    assert_eq!(
        agent_in_maintenance(&web, "edge-a").expect("agents"),
        serde_json::Value::Null
    );
    let fleet = http_get_ok(&format!("{web}/fleet")).expect("/fleet");
    assert!(
        fleet.contains("IN MAINTENANCE") && fleet.contains("site-b-network"),
        "{fleet}"
    );
    let mut page = url::Url::parse(&format!("{web}/target")).expect("url");
    page.query_pairs_mut()
        .append_pair("job", "web")
        .append_pair("instance", &target);
    let page = http_get_ok(page.as_str()).expect("/target");
    assert!(
        page.contains(r#"data-agent="edge-b" data-result="NOT COUNTED""#)
            && page.contains(r#"data-agent="edge-a" data-result="OK""#),
        "{page}"
    );

    // ---- edge-b goes away: down, but its alert stays quiet (not even pending)
    scene.kill("edge-b");
    scene.wait_until("sonde_agent_up 0 for edge-b", WAIT, || {
        prometheus_expect(p, r#"sonde_agent_up{agent="edge-b"}"#, 0.0)
    });
    scene.hold_for(
        "SondeAgentDown neither pending nor firing",
        Duration::from_secs(4),
        || match alerts_named(p, "SondeAgentDown")?.as_slice() {
            [] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    scene.wait_until("no SondeTargetDown", WAIT, || {
        match target_down_jobs(p)?.as_slice() {
            [] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // ---- a window of agents through the API; one with both selectors is refused
    let (status, body) = post_json(
        &format!("{web}/api/v1/maintenance"),
        &serde_json::json!({"name": "both", "match": {"job": "web"}, "agents": {"site": "a"}, "start": rfc3339(now_ms()), "duration": "1h"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("both match: and agents:"), "{body}");
    let (status, body) = post_json(
        &format!("{web}/api/v1/maintenance"),
        &serde_json::json!({"name": "edge-a-upgrade", "agents": {"agent": "edge-a"}, "start": rfc3339(now_ms() - 1_000), "duration": "1h"}),
    );
    assert_eq!(status, 200, "{body}");
    scene.wait_until("sonde_agent_in_maintenance 1 for edge-a", WAIT, || {
        prometheus_expect(p, r#"sonde_agent_in_maintenance{agent="edge-a"}"#, 1.0)
    });
    // No agent counts now: the target is missing (no `up`), not down.
    scene.wait_until("the target has no counted view", WAIT, || {
        let body = http_get_ok(&format!("{web}/api/v1/targets"))?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        match v["data"][0]["state"].as_str() {
            Some("missing") => Ok(()),
            other => Err(format!("state {other:?}: {body}")),
        }
    });
    let (status, body) = delete(&format!("{web}/api/v1/maintenance/edge-a-upgrade"));
    assert_eq!(status, 200, "{body}");
    scene.wait_until("up 1 again from edge-a", WAIT, || {
        prometheus_expect(p, r#"up{job="web"} == 1 and sonde_target_agents == 1"#, 1.0)
    });
    scene.check_running().expect("every process still running");
}
