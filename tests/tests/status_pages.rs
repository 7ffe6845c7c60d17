//! The status pages as people see them, rendered by headless Chromium.
//!
//! - A real aggregator and two real agents probe a real nginx that goes down (HTTP 503)
//!   and comes back: the incident with its reason, the timeline's down stretch, both
//!   agents side by side, the response-time lines on a round sub-millisecond axis,
//!   uptimes below 100 %, the half-hour bars, and the badges.
//! - Every page (`/`, `/targets`, `/target`, `/fleet`) at phone (390×844) and desktop
//!   (1366×900) widths, light and dark (Chromium's `--force-dark-mode` sets the
//!   browser's `prefers-color-scheme`): no horizontal overflow, the summary header on
//!   the status pages, the dark palette when dark is preferred.
//! - `status_page.public`: no config path, no API links, no agent names in the HTML,
//!   no fleet page; the JSON API still names the agents.
//! - At 50,000 targets: `/` under 200 KB, rendered by Chromium in under 300 ms, the
//!   targets a page of 100 at a time, and the delta endpoint's answer small when
//!   nothing changed.
//!
//! Screenshots go to `target/screenshots/`: `status-{desktop,phone}-{light,dark}.png`
//! (`/` of the aggregator with the incident), the same with `-public` (the published
//! page), `status-{targets,target,fleet}-{desktop,phone}-{light,dark}.png`, and
//! `status-scale-desktop-light.png` (`/` at 50,000 targets).
//!
//! Chromium's headless window is at least 500 px wide whatever `--window-size` says, so
//! each page is loaded in an iframe of the exact size inside a small wrapper page, which
//! writes what it measured of it into its own DOM for `--dump-dom`. The wrapper must be
//! of the page's origin to read it: a small proxy in the test serves it and passes
//! every other request on to the aggregator.

use sonde_tests::{
    Scene, http_get, nginx_flip_file, require_tool, start_agent, start_aggregator, start_nginx,
    workspace_root,
};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The screen sizes every page is checked at.
const PHONE: (u32, u32) = (390, 844);
const DESKTOP: (u32, u32) = (1366, 900);

/// Headless Chromium, each run with a fresh profile in the scene's directory.
struct Browser {
    exe: PathBuf,
    scratch: PathBuf,
    runs: AtomicUsize,
    /// By upstream base URL, the address of its same-origin proxy.
    proxies: Mutex<HashMap<String, String>>,
}

/// The wrapper page: `src` (a path of the proxied origin) in an iframe of `w`×`h`.
fn wrapper_page(src: &str, w: &str, h: &str) -> String {
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><style>body{{margin:0}}iframe{{border:0;display:block}}</style></head><body>
<iframe id="f" width="{w}" height="{h}" src="{src}"></iframe><pre id="result"></pre>
<script>
var f=document.getElementById('f');
f.addEventListener('load',function(){{var o={{}};try{{var d=f.contentDocument,w=f.contentWindow,n=w.performance.getEntriesByType('navigation')[0];
o.scrollWidth=d.documentElement.scrollWidth;o.clientWidth=d.documentElement.clientWidth;o.summary=!!d.getElementById('overall');
o.background=w.getComputedStyle(d.body).backgroundColor;o.dark=w.matchMedia('(prefers-color-scheme: dark)').matches;
o.responseEnd=n?n.responseEnd-n.startTime:-1;o.load=n?(n.loadEventStart||w.performance.now())-n.startTime:-1;}}catch(e){{o.error=String(e)}}
document.getElementById('result').textContent='MEASURED'+JSON.stringify(o)+'END';}});
</script></body></html>"#,
        src = src.replace('&', "&amp;").replace('"', "&quot;"),
    )
}

/// Serves `/__wrapper?w=&h=&src=` itself and every other GET from `upstream`, on a
/// loopback port of its own; returns its base URL. Its thread ends with the test.
fn same_origin_proxy(upstream: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let addr = format!("http://{}", listener.local_addr().expect("proxy address"));
    let upstream = upstream.to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone the connection"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    return;
                }
                // The headers, up to the blank line.
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
                let (status, body, kind) = if let Some(query) = path.strip_prefix("/__wrapper?") {
                    let q: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
                        .into_owned()
                        .collect();
                    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
                    (
                        200,
                        wrapper_page(&get("src"), &get("w"), &get("h")),
                        "text/html",
                    )
                } else {
                    let (status, body) =
                        http_get(&format!("{upstream}{path}")).unwrap_or_else(|e| (502, e));
                    let kind = if path.starts_with("/api/") {
                        "application/json"
                    } else if path.starts_with("/badge/") {
                        "image/svg+xml"
                    } else {
                        "text/html; charset=utf-8"
                    };
                    (status, body, kind)
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// What the wrapper page measured of the page in its iframe.
#[derive(Debug)]
struct Measured {
    scroll_width: i64,
    client_width: i64,
    summary: bool,
    dark: bool,
    background: String,
    /// From the navigation's start to the end of the response, and to the load event,
    /// in ms (the iframe's `PerformanceNavigationTiming`).
    response_end_ms: f64,
    load_ms: f64,
}

impl Browser {
    fn new(scene: &Scene) -> Self {
        Self {
            exe: require_tool("chromium", "chromium"),
            scratch: scene.dir().join("chromium"),
            runs: AtomicUsize::new(0),
            proxies: Mutex::new(HashMap::new()),
        }
    }

    fn command(&self, dark: bool) -> Command {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let profile = self.scratch.join(format!("profile-{n}"));
        let mut cmd = Command::new(&self.exe);
        // Tests run as root in CI: Chromium's sandbox refuses root. Without the
        // background-networking flags it dials out, and a closed network refuses it.
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
        if dark {
            cmd.arg("--force-dark-mode");
        }
        cmd
    }

    fn run(&self, mut cmd: Command, what: &str) -> String {
        // One Chromium at a time across this file's tests: two at once on two cores
        // would measure each other, not the page.
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let out = cmd.output().expect("run chromium");
        drop(one);
        assert!(
            out.status.success(),
            "chromium {what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The DOM Chromium renders for `url`.
    fn dom(&self, url: &str) -> String {
        let mut cmd = self.command(false);
        cmd.arg("--virtual-time-budget=2000")
            .arg("--dump-dom")
            .arg(url);
        self.run(cmd, &format!("--dump-dom {url}"))
    }

    /// The wrapper of `url` (`http://host:port/path`) at `w`×`h`, on the proxy of its
    /// origin.
    fn wrapper(&self, url: &str, w: u32, h: u32) -> String {
        let rest = url.strip_prefix("http://").expect("an http:// URL");
        let split = rest.find('/').unwrap_or(rest.len());
        let (base, path) = (format!("http://{}", &rest[..split]), &rest[split..]);
        let proxy = self
            .proxies
            .lock()
            .expect("proxies")
            .entry(base.clone())
            .or_insert_with(|| same_origin_proxy(&base))
            .clone();
        format!(
            "{proxy}/__wrapper?w={w}&h={h}&src={}",
            encode(if path.is_empty() { "/" } else { path })
        )
    }

    /// Loads `url` at `size`, light or dark, and reads what the wrapper measured.
    fn measure(&self, url: &str, size: (u32, u32), dark: bool) -> Measured {
        let wrapper = self.wrapper(url, size.0, size.1);
        let mut cmd = self.command(dark);
        cmd.arg(format!(
            "--window-size={},{}",
            size.0.max(500),
            size.1 + 100
        ))
        .arg("--dump-dom")
        .arg(wrapper);
        let dom = self.run(cmd, &format!("--dump-dom of a wrapper of {url}"));
        let json = dom
            .split("MEASURED")
            .nth(1)
            .and_then(|r| r.split("END").next())
            .unwrap_or_else(|| panic!("the wrapper of {url} measured nothing: {dom}"));
        let v: serde_json::Value = serde_json::from_str(&json.replace("&quot;", "\""))
            .unwrap_or_else(|e| panic!("{e}: {json}"));
        assert!(v.get("error").is_none(), "{url}: {v}");
        Measured {
            scroll_width: v["scrollWidth"].as_i64().unwrap_or(-1),
            client_width: v["clientWidth"].as_i64().unwrap_or(-1),
            summary: v["summary"] == true,
            dark: v["dark"] == true,
            background: v["background"].as_str().unwrap_or("").to_string(),
            response_end_ms: v["responseEnd"].as_f64().unwrap_or(-1.0),
            load_ms: v["load"].as_f64().unwrap_or(-1.0),
        }
    }

    /// A screenshot of `url` at `size` (the page's first 1,600 px down).
    fn screenshot(&self, url: &str, size: (u32, u32), dark: bool, file: &Path) {
        let wrapper = self.wrapper(url, size.0, 1600);
        let mut cmd = self.command(dark);
        cmd.arg(format!("--window-size={},1600", size.0))
            .arg(format!("--screenshot={}", file.display()))
            .arg("--virtual-time-budget=2000")
            .arg(wrapper);
        self.run(cmd, &format!("--screenshot of {url}"));
        assert!(
            file.exists(),
            "no screenshot of {url} in {}",
            file.display()
        );
        println!("screenshot of {url}: {}", file.display());
    }

    /// Checks `url` at phone and desktop widths, light and dark: no horizontal overflow,
    /// the summary header when `summary`, the palette the browser prefers; screenshots
    /// named `{name}-{desktop,phone}-{light,dark}{suffix}.png`.
    fn check_everywhere(&self, url: &str, summary: bool, name: &str, suffix: &str) {
        let shots = screenshots_dir();
        for (size, width_name) in [(DESKTOP, "desktop"), (PHONE, "phone")] {
            for dark in [false, true] {
                let m = self.measure(url, size, dark);
                let at = format!("{url} at {width_name}, dark={dark}");
                assert!(
                    m.scroll_width <= m.client_width && m.client_width == size.0 as i64,
                    "{at}: no horizontal overflow ({} px of content in {} px): {m:?}",
                    m.scroll_width,
                    m.client_width
                );
                assert!(!summary || m.summary, "{at}: the summary header: {m:?}");
                assert_eq!(m.dark, dark, "{at}: the browser's preference: {m:?}");
                let want = if dark {
                    "rgb(13, 17, 23)"
                } else {
                    "rgb(255, 255, 255)"
                };
                assert_eq!(m.background, want, "{at}: the palette");
                let scheme = if dark { "dark" } else { "light" };
                self.screenshot(
                    url,
                    size,
                    dark,
                    &shots.join(format!("{name}-{width_name}-{scheme}{suffix}.png")),
                );
            }
        }
    }
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
    let mut scene = Scene::new("status-pages");
    let browser = Browser::new(&scene);
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
    let target_url = format!("{web}/target?job=shop&instance={}", encode(&target));
    let page = browser.dom(&target_url);
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
    // nginx on loopback answers in well under a millisecond: the axis still reads as
    // round, distinct values in one unit, from 0 up.
    let ticks: Vec<&str> = page
        .split(r#"class="axis tick""#)
        .skip(1)
        .filter_map(|t| t.split('>').nth(1)?.split('<').next())
        .collect();
    let mut distinct = ticks.clone();
    distinct.dedup();
    assert!(
        ticks.len() >= 3 && distinct == ticks && ticks[0].starts_with('0'),
        "response-time axis: {ticks:?}"
    );
    let unit = ticks[0].rsplit(' ').next().unwrap_or("");
    assert!(
        ["µs", "ms", "s"].contains(&unit) && ticks.iter().all(|t| t.ends_with(&format!(" {unit}"))),
        "one unit on the axis: {ticks:?}"
    );
    assert!(
        page.contains(r#"<svg class="latency chart" viewBox="#)
            && !page.contains(r#"class="latency chart" width="#),
        "the chart takes the page's width"
    );
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

    // `/`: the summary says degraded (the apac job has no agent), and the problem list
    // holds the apac target, not the shop one, which is up.
    let main = browser.dom(&format!("{web}/"));
    assert!(
        main.contains(r#"id="overall" class="summary degraded" data-overall="degraded""#),
        "the summary header says degraded"
    );
    assert!(
        main.contains(r#"<b data-count="jobs_missing">1</b>"#)
            && main.contains(r#"<b data-count="up">1</b>"#)
            && main.contains(r#"<b data-count="missing">1</b>"#),
        "the header counts one target up, one missing, one job missing"
    );
    let problems = main
        .split(r#"<table id="problems">"#)
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .expect("the problem list");
    assert!(
        problems.contains(r#"data-job="apac""#) && !problems.contains(r#"data-job="shop""#),
        "{problems}"
    );
    assert!(
        main.contains("no agent matches region=apac"),
        "the missing job says why"
    );
    assert!(
        !main.contains(r#"http-equiv="refresh""#) && main.contains("/api/v1/status?since="),
        "`/` asks for changes instead of reloading itself"
    );
    assert!(
        main.contains("edge-eu"),
        "an operator's page lists the agents"
    );

    // `/targets`: the shop target's row, with its half-hour bars showing the incident.
    let list = browser.dom(&format!("{web}/targets?job=shop"));
    let row = list
        .split(r#"<tr class="target""#)
        .find(|r| r.contains(r#"data-job="shop""#))
        .expect("the target's row on /targets");
    assert!(row.contains(r#"data-state="up""#), "{row}");
    assert!(
        row.contains(r#"class="hb-down""#),
        "its last 24 h show the incident: {row}"
    );
    assert!(
        row.contains("/target?job=shop"),
        "it links to the target page"
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

    let fleet = browser.dom(&format!("{web}/fleet"));
    for (region, agent) in [("eu", "edge-eu"), ("us", "edge-us")] {
        assert!(fleet.contains(&format!(r#"data-region="{region}""#)));
        assert!(
            fleet.contains(&format!(r#"data-agent="{agent}" data-state="CONNECTED""#)),
            "{agent} is a connected tile"
        );
    }

    // Every page at both widths, light and dark.
    browser.check_everywhere(&format!("{web}/"), true, "status", "");
    browser.check_everywhere(&format!("{web}/targets"), true, "status-targets", "");
    browser.check_everywhere(&target_url, false, "status-target", "");
    browser.check_everywhere(&format!("{web}/fleet"), false, "status-fleet", "");

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

/// `/api/v1/status`'s answer, and its size in bytes.
fn status_delta(web: &str, since: Option<u64>) -> Result<(serde_json::Value, usize), String> {
    let url = match since {
        Some(v) => format!("{web}/api/v1/status?since={v}"),
        None => format!("{web}/api/v1/status"),
    };
    match http_get(&url)? {
        (200, body) => serde_json::from_str::<serde_json::Value>(&body)
            .map(|v| (v["data"].clone(), body.len()))
            .map_err(|e| e.to_string()),
        other => Err(format!("{other:?}")),
    }
}

#[test]
fn a_public_status_page_names_no_agent_and_links_no_api() {
    let mut scene = Scene::new("status-public");
    let browser = Browser::new(&scene);
    let nginx = start_nginx(&mut scene, "nginx");
    let target = format!("http://127.0.0.1:{nginx}/");
    let aggregator = start_aggregator(
        &mut scene,
        "aggregator",
        &format!(
            r#"global: {{scrape_interval: 1s, scrape_timeout: 1s}}
modules:
  http_2xx: {{prober: http, http: {{preferred_ip_protocol: ip4}}}}
jobs:
  - job_name: shop
    module: http_2xx
    static_configs: [{{targets: ["{target}"]}}]
status_page:
  public: true
  title: Example Shop Status
"#
        ),
    );
    let agent = "secret-edge-7";
    start_agent(
        &mut scene,
        agent,
        &format!(
            "agent:\n  id: {agent}\n  labels: {{region: hidden-region}}\naggregators:\n  - address: {}\n",
            aggregator.grpc
        ),
    );
    let web = aggregator.web.clone();
    let (up, _) = scene.wait_until(
        "the target up",
        Duration::from_secs(60),
        || match status_delta(&web, None)? {
            (d, n) if d["summary"]["overall"] == "up" => Ok((d, n)),
            (d, _) => Err(d.to_string()),
        },
    );
    assert_eq!(up["summary"]["up"], 1, "{up}");

    // Within its first minute the target's last-24-h bars show it up, the rest unknown.
    let (_, list) = http_get(&format!("{web}/targets")).expect("/targets");
    let row = list
        .split(r#"<tr class="target""#)
        .nth(1)
        .expect("the target's row");
    assert!(
        row.contains(r#"class="hb-up""#) && row.contains(r#"class="hb-unknown""#),
        "the bar in progress shows up, the time before is unknown: {row}"
    );

    let config_path = scene.dir().join("aggregator.yml").display().to_string();
    let target_url = format!("{web}/target?job=shop&instance={}", encode(&target));
    for url in [
        format!("{web}/"),
        format!("{web}/targets"),
        target_url.clone(),
    ] {
        let (code, html) = http_get(&url).expect("a page");
        assert_eq!(code, 200, "{url}");
        assert!(
            url.contains("/target?") || html.contains("Example Shop Status"),
            "{url}: the title"
        );
        for hidden in [
            agent,
            "hidden-region",
            config_path.as_str(),
            "href=\"/api",
            "href=\"/metrics",
            "href=\"/fleet",
        ] {
            assert!(!html.contains(hidden), "{url} shows {hidden:?}");
        }
        // What Chromium renders (after the page's script) names no agent either.
        let dom = browser.dom(&url);
        assert!(
            !dom.contains(agent) && !dom.contains(&config_path),
            "{url} rendered"
        );
    }
    let (_, target_page) = http_get(&target_url).expect("the target page");
    assert!(
        target_page.contains(r#"data-agent="vantage point 1""#),
        "the target page numbers its vantage points"
    );
    let (code, _) = http_get(&format!("{web}/fleet")).expect("/fleet");
    assert_eq!(code, 404, "no fleet page when public");
    // The JSON API is the same as on an operator's aggregator.
    let (_, agents) = http_get(&format!("{web}/api/v1/agents")).expect("agents");
    assert!(agents.contains(agent), "{agents}");

    browser.check_everywhere(&format!("{web}/"), true, "status", "-public");
    browser.check_everywhere(&format!("{web}/targets"), true, "status-targets", "-public");
    browser.check_everywhere(&target_url, false, "status-target", "-public");
}

/// One job of this many static targets (no agent probes them: they are all missing).
const SCALE_TARGETS: usize = 50_000;
/// The first page's bound at that size, in bytes.
const FIRST_PAGE_MAX_BYTES: usize = 200_000;
/// Chromium's time from the end of the response to the load event, in ms, at that size.
const FIRST_PAGE_MAX_RENDER_MS: f64 = 300.0;

#[test]
fn fifty_thousand_targets_make_a_small_fast_first_page_and_small_deltas() {
    let mut scene = Scene::new("status-scale");
    let browser = Browser::new(&scene);
    let targets = (0..SCALE_TARGETS)
        .map(|i| format!("\"http://127.0.0.1:9/t{i}\""))
        .collect::<Vec<_>>()
        .join(",\n        ");
    let aggregator = start_aggregator(
        &mut scene,
        "aggregator",
        &format!(
            r#"global: {{scrape_interval: 15s}}
modules:
  http_2xx: {{prober: http}}
jobs:
  - job_name: big
    module: http_2xx
    static_configs:
      - targets: [
        {targets}]
fleet:
  missing_after: 1s
"#
        ),
    );
    let web = aggregator.web.clone();
    let (settled, _) = scene.wait_until(
        "50,000 targets known, the job missing",
        Duration::from_secs(120),
        || match status_delta(&web, None)? {
            (d, n)
                if d["summary"]["targets"] == SCALE_TARGETS
                    && d["summary"]["jobs_missing"] == 1 =>
            {
                Ok((d, n))
            }
            (d, _) => Err(d["summary"].to_string()),
        },
    );
    assert_eq!(settled["summary"]["missing"], SCALE_TARGETS, "{settled}");

    let (code, first) = http_get(&format!("{web}/")).expect("/");
    assert_eq!(code, 200);
    println!(
        "first page at {SCALE_TARGETS} targets: {} bytes",
        first.len()
    );
    assert!(
        first.len() < FIRST_PAGE_MAX_BYTES,
        "`/` is {} bytes at {SCALE_TARGETS} targets",
        first.len()
    );
    assert!(first.contains(&format!(r#"<b data-count="missing">{SCALE_TARGETS}</b>"#)));
    assert!(
        first.contains("href=\"/targets?state=problems\""),
        "the rest is a click away"
    );

    // Three loads, the median: what Chromium spends from the last byte to the load
    // event, and from the request on (which includes the aggregator making the page).
    let mut runs: Vec<(f64, f64)> = (0..3)
        .map(|_| {
            let m = browser.measure(&format!("{web}/"), DESKTOP, false);
            (m.load_ms - m.response_end_ms, m.load_ms)
        })
        .collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (render, total) = runs[1];
    println!(
        "first page at {SCALE_TARGETS} targets in Chromium: rendered in {render:.1} ms after its last byte, loaded {total:.1} ms after the request (median of 3: {runs:?})"
    );
    assert!(
        render < FIRST_PAGE_MAX_RENDER_MS,
        "Chromium took {render:.1} ms to render `/` at {SCALE_TARGETS} targets"
    );
    browser.screenshot(
        &format!("{web}/"),
        DESKTOP,
        false,
        &screenshots_dir().join("status-scale-desktop-light.png"),
    );

    // Every target a page of 100 away, and by search.
    let (_, page) = http_get(&format!("{web}/targets?page=2")).expect("/targets?page=2");
    assert!(
        page.contains(&format!(
            r#"data-found="{SCALE_TARGETS}" data-page="2" data-pages="500""#
        )),
        "page 2 of 500"
    );
    assert_eq!(page.matches(r#"<tr class="target""#).count(), 100);
    println!("a page of 100 targets: {} bytes", page.len());
    let (_, found) = http_get(&format!("{web}/targets?q=t49999")).expect("search");
    assert!(found.contains(r#"data-found="1""#) && found.contains("127.0.0.1:9/t49999"));

    // Nothing changes: the delta is the summary and no row.
    let (now, _) = status_delta(&web, None).expect("status");
    let version = now["version"].as_u64().expect("version");
    let (delta, bytes) = status_delta(&web, Some(version)).expect("delta");
    println!("delta with nothing changed: {bytes} bytes: {delta}");
    assert!(
        delta["targets"].as_array().is_some_and(Vec::is_empty) && delta["truncated"] == false,
        "{delta}"
    );
    assert!(bytes < 1_000, "{bytes} bytes when nothing changed: {delta}");
    // A version this aggregator never gave (a page from an earlier run): reload.
    let (stale, _) = status_delta(&web, Some(1)).expect("old version");
    assert_eq!(stale["truncated"], true, "{stale}");
}
