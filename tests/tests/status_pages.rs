//! The status pages as people see them: a real aggregator and two real agents probe a
//! real nginx that goes down (HTTP 503) and comes back; headless Chromium renders the
//! main page, the target's page and the fleet page. The test keeps the screenshots
//! (`target/screenshots/`) and asserts on the rendered DOM: the incident with its reason,
//! the timeline's down stretch, both agents side by side, the response-time lines,
//! uptimes below 100 %, and the badges.

use sonde_tests::{
    Scene, http_get, nginx_flip_file, require_tool, start_agent, start_aggregator, start_nginx,
    workspace_root,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The DOM Chromium renders for `url` (after its scripts, of which there are none).
fn dom(chromium: &Path, url: &str) -> String {
    let out = Command::new(chromium)
        .args(chromium_flags())
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium --dump-dom {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screenshot(chromium: &Path, url: &str, file: &Path) {
    let out = Command::new(chromium)
        .args(chromium_flags())
        .arg("--window-size=1400,1800")
        .arg(format!("--screenshot={}", file.display()))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success() && file.exists(),
        "chromium --screenshot {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("screenshot of {url}: {}", file.display());
}

fn chromium_flags() -> Vec<String> {
    // Tests run as root in CI: Chromium's sandbox refuses root.
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--virtual-time-budget=2000",
    ]
    .map(String::from)
    .to_vec()
}

fn screenshots_dir() -> PathBuf {
    let dir = workspace_root().join("target").join("screenshots");
    std::fs::create_dir_all(&dir).expect("create target/screenshots");
    dir
}

fn history(web: &str, job: &str, instance: &str) -> Result<serde_json::Value, String> {
    let url = format!(
        "{web}/api/v1/targets/history?job={}&instance={}",
        encode(job),
        encode(instance)
    );
    match http_get(&url)? {
        (200, body) => serde_json::from_str::<serde_json::Value>(&body)
            .map(|v| v["data"].clone())
            .map_err(|e| e.to_string()),
        other => Err(format!("{other:?}")),
    }
}

#[test]
fn a_target_that_goes_down_and_comes_back_shows_its_incident_timeline_and_charts() {
    let chromium = require_tool("chromium", "chromium");
    let mut scene = Scene::new("status-pages");
    let nginx = start_nginx(&mut scene, "nginx");
    let target = format!("http://127.0.0.1:{nginx}/flip");
    let aggregator = start_aggregator(
        &mut scene,
        "aggregator",
        &format!(
            r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
modules:
  http_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
jobs:
  - job_name: shop
    module: http_2xx
    static_configs:
      - targets: ["{target}"]
  - job_name: apac
    module: http_2xx
    agents:
      region: apac
    static_configs:
      - targets: ["{target}"]
fleet:
  missing_after: 5s
"#
        ),
    );
    let agent = |id: &str, region: &str, site: &str| {
        format!(
            "agent:\n  id: {id}\n  labels:\n    region: {region}\n    site: {site}\naggregators:\n  - address: {}\n",
            aggregator.grpc
        )
    };
    start_agent(&mut scene, "edge-eu", &agent("edge-eu", "eu", "fra"));
    start_agent(&mut scene, "edge-us", &agent("edge-us", "us", "iad"));
    let web = aggregator.web.clone();
    let state = |want: &'static str| {
        let web = web.clone();
        let target = target.clone();
        move || {
            let h = history(&web, "shop", &target)?;
            match h["state"].as_str() {
                Some(s) if s == want => Ok(h),
                other => Err(format!("state {other:?}")),
            }
        }
    };

    scene.wait_until("the target up", Duration::from_secs(60), state("up"));
    // Let both agents report a while, so the chart has points of each.
    std::thread::sleep(Duration::from_secs(3));
    let flip = nginx_flip_file(&scene, "nginx");
    std::fs::write(&flip, "down").expect("flip nginx down");
    let down = scene.wait_until("the target down", Duration::from_secs(30), state("down"));
    std::thread::sleep(Duration::from_secs(3));
    std::fs::remove_file(&flip).expect("flip nginx up");
    let up = scene.wait_until("the target up again", Duration::from_secs(30), state("up"));
    scene.check_running().expect("every process still running");

    // ---- the API
    let events = up["events"].as_array().expect("events");
    let states: Vec<&str> = events.iter().filter_map(|e| e["state"].as_str()).collect();
    // Newest first. The agents see the change a moment apart, so the target may pass
    // through degraded (up by quorum, one agent failing) on the way.
    let down_at = states.iter().position(|s| *s == "down");
    assert!(
        states.first() == Some(&"up")
            && states.last() == Some(&"up")
            && down_at.is_some_and(|i| states[..i].iter().all(|s| *s != "missing")),
        "up, (degraded,) down, (degraded,) up: {states:?}"
    );
    let incident = events
        .iter()
        .find(|e| e["state"] == "down")
        .expect("the down event");
    let reasons = incident["reasons"].to_string();
    assert!(
        reasons.contains("503"),
        "the reason names the status: {reasons}"
    );
    assert!(
        incident["previous"] == "up" || incident["previous"] == "degraded",
        "{incident}"
    );
    let uptime_1h = up["uptime"]["1h"].as_f64().expect("1h uptime");
    assert!(
        uptime_1h > 0.0 && uptime_1h < 1.0,
        "1h uptime counts the down time: {uptime_1h}"
    );
    assert_eq!(down["state"], "down");
    let latency = up["latency"].as_object().expect("latency by agent");
    assert!(
        latency.contains_key("edge-eu") && latency.contains_key("edge-us"),
        "{latency:?}"
    );

    // ---- what Chromium renders
    let shots = screenshots_dir();
    let target_url = format!("{web}/target?job=shop&instance={}", encode(&target));
    let page = dom(&chromium, &target_url);
    screenshot(&chromium, &target_url, &shots.join("status-target.png"));
    assert!(
        page.contains(r#"id="state" data-state="up""#),
        "the target page shows it up now"
    );
    let down_row = page
        .split(r#"<tr class="event""#)
        .find(|row| row.starts_with(r#" data-state="down""#))
        .expect("an incident row for the down state");
    assert!(
        down_row.contains("503"),
        "the incident's reason: {down_row}"
    );
    assert!(
        page.contains(r#"class="seg-down""#),
        "the timeline has a down stretch"
    );
    assert!(page.contains(r#"class="seg-up""#), "and up stretches");
    for agent in ["edge-eu", "edge-us"] {
        assert!(
            page.contains(&format!(r#"class="view" data-agent="{agent}""#)),
            "{agent}'s view is on the page"
        );
        let line = page
            .split(&format!(r#"data-agent="{agent}" data-points=""#))
            .nth(1)
            .unwrap_or_else(|| panic!("{agent} has a response-time line"));
        let points: u32 = line.split('"').next().unwrap_or("0").parse().unwrap_or(0);
        assert!(points >= 1, "{agent}'s line has points");
    }
    let uptime_cell = page
        .split(r#"data-window="1h""#)
        .nth(1)
        .expect("the 1h uptime cell");
    assert!(
        !uptime_cell
            .split('<')
            .next()
            .unwrap_or("")
            .contains(">100%"),
        "1h uptime is below 100 %: {}",
        &uptime_cell[..uptime_cell.len().min(200)]
    );

    let main = dom(&chromium, &format!("{web}/"));
    screenshot(
        &chromium,
        &format!("{web}/"),
        &shots.join("status-main.png"),
    );
    let row = main
        .split(r#"<tr class="target""#)
        .find(|r| r.contains(r#"data-job="shop""#))
        .expect("the target's row on the main page");
    assert!(row.contains(r#"data-state="up""#), "{row}");
    assert!(
        row.contains(r#"class="seg-down""#),
        "its 24 h timeline shows the incident"
    );
    assert!(
        row.contains("/target?job=shop"),
        "it links to the target page"
    );

    // Jobs say why they are missing, and are OK only with every target up.
    assert!(
        main.contains("no agent matches region=apac"),
        "the missing job says why"
    );
    let jobs = http_get(&format!("{web}/api/v1/jobs")).expect("jobs").1;
    let jobs: serde_json::Value = serde_json::from_str(&jobs).expect("jobs JSON");
    let status = |job: &str| {
        jobs["data"]
            .as_array()
            .and_then(|a| a.iter().find(|j| j["job"] == job))
            .map(|j| (j["status"].clone(), j["why"].clone()))
    };
    assert_eq!(status("apac").map(|s| s.0), Some("missing".into()));
    assert_eq!(status("shop").map(|s| s.0), Some("ok".into()));

    let fleet = dom(&chromium, &format!("{web}/fleet"));
    screenshot(
        &chromium,
        &format!("{web}/fleet"),
        &shots.join("status-fleet.png"),
    );
    for (region, agent) in [("eu", "edge-eu"), ("us", "edge-us")] {
        assert!(fleet.contains(&format!(r#"data-region="{region}""#)));
        assert!(
            fleet.contains(&format!(r#"data-agent="{agent}" data-state="CONNECTED""#)),
            "{agent} is a connected tile"
        );
    }

    // ---- badges
    let q = format!("job=shop&instance={}", encode(&target));
    let (code, badge) = http_get(&format!("{web}/badge/status.svg?{q}")).expect("status badge");
    assert_eq!(code, 200);
    assert!(badge.contains("status: up"), "{badge}");
    let (code, badge) =
        http_get(&format!("{web}/badge/uptime.svg?{q}&window=1h")).expect("uptime badge");
    assert_eq!(code, 200);
    assert!(
        badge.contains("uptime 1h: ") && !badge.contains("uptime 1h: 100%"),
        "{badge}"
    );
    let (code, _) = http_get(&format!("{web}/badge/status.svg?job=shop&instance=nope"))
        .expect("unknown target badge");
    assert_eq!(code, 404);
}
