//! SLO reports from a real run: an aggregator and an agent probe a real HTTP server on
//! loopback, which is stopped (connection refused) for a few seconds and started again.
//! The JSON report counts about as much down time as the test saw, with one incident
//! and its reason; the CSV tables parse and carry the same figures; the printable page
//! shows the table, the figures and how they were counted; bad queries get a 400 that
//! says why.

use sonde_tests::{Scene, free_port, http_get, start_agent, start_aggregator};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An HTTP server answering 200 to everything, that can be stopped (its port then
/// refuses connections) and started again on the same port.
struct Target {
    port: u16,
    running: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Target {
    fn new() -> Self {
        let mut t = Self {
            port: free_port(),
            running: None,
        };
        t.start();
        t
    }

    fn start(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind the target");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        self.running = Some((stop, handle));
    }

    fn stop(&mut self) {
        if let Some((stop, handle)) = self.running.take() {
            stop.store(true, Ordering::SeqCst);
            // Wake the accept loop so that it sees the flag and drops the listener.
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            handle.join().expect("the target's thread ends");
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The target's merged state, from the history API.
fn state(web: &str, instance: &str) -> Result<String, String> {
    let url = format!(
        "{web}/api/v1/targets/history?job=shop&instance={}",
        encode(instance)
    );
    match http_get(&url)? {
        (200, body) => {
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            Ok(v["data"]["state"].as_str().unwrap_or_default().to_string())
        }
        other => Err(format!("{other:?}")),
    }
}

/// RFC 4180 CSV: rows of fields, quotes undone.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        !quoted && field.is_empty() && row.is_empty(),
        "CSV ends with a line break"
    );
    rows
}

/// The named column of a CSV row.
fn column<'a>(rows: &'a [Vec<String>], row: usize, name: &str) -> &'a str {
    let at = rows[0]
        .iter()
        .position(|c| c == name)
        .unwrap_or_else(|| panic!("no column {name} in {:?}", rows[0]));
    &rows[row][at]
}

fn number(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_report_counts_the_outage_the_test_caused_in_json_csv_and_print() {
    let mut scene = Scene::new("slo-reports");
    let mut target = Target::new();
    let instance = format!("http://127.0.0.1:{}/", target.port);
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
      - targets: ["{instance}"]
slo:
  - {{job: shop, objective: 99.9}}
fleet:
  missing_after: 5s
"#
        ),
    );
    let from = now_s().floor() as i64;
    start_agent(
        &mut scene,
        "edge",
        &format!(
            "agent:\n  id: edge\naggregators:\n  - address: {}\n",
            aggregator.grpc
        ),
    );
    let web = aggregator.web.clone();
    let is = |want: &'static str| {
        let web = web.clone();
        let instance = instance.clone();
        move || match state(&web, &instance)? {
            s if s == want => Ok(()),
            s => Err(s),
        }
    };
    scene.wait_until("the target up", Duration::from_secs(60), is("up"));
    std::thread::sleep(Duration::from_secs(3));

    target.stop();
    let stopped = now_s();
    scene.wait_until("the target down", Duration::from_secs(30), is("down"));
    std::thread::sleep(Duration::from_secs(5));
    target.start();
    scene.wait_until("the target up again", Duration::from_secs(30), is("up"));
    let back = now_s();
    std::thread::sleep(Duration::from_secs(2));
    let to = now_s().ceil() as i64;
    // Every report below is asked once `to` has passed, so each knows the whole window
    // and all give the same figures.
    while now_s() < to as f64 + 0.2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    scene.check_running().expect("every process still running");
    let outage = back - stopped;

    // ---- JSON
    let query = format!("job=shop&from={from}&to={to}");
    let (status, body) = http_get(&format!("{web}/api/v1/report?{query}")).expect("report");
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let data = &report["data"];
    assert!(
        data["counting"]
            .as_str()
            .unwrap()
            .starts_with("availability = up / (up + down)"),
        "{data}"
    );
    let targets = data["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 1, "{data}");
    let t = &targets[0];
    assert_eq!(t["instance"], instance.as_str());
    let down = number(&t["down_seconds"]);
    let up = number(&t["up_seconds"]);
    let counted = number(&t["counted_seconds"]);
    let window = number(&t["window_seconds"]);
    assert_eq!(window, (to - from) as f64);
    // Down from the first failed probe to the first good one: about what the test saw
    // between stopping the server and seeing it up again, less the time the agent and
    // the merge took to notice each change (a probe each second, a poll each 0.1 s).
    assert!(
        down > outage - 4.0 && down <= outage + 1.0,
        "down {down} s for an outage of {outage:.1} s: {t}"
    );
    assert!((counted - (up + down)).abs() < 1e-6, "{t}");
    let parts = counted
        + number(&t["missing_seconds"])
        + number(&t["maintenance_seconds"])
        + number(&t["no_data_seconds"]);
    assert!(
        (parts - window).abs() < 1e-6,
        "the window is partitioned: {t}"
    );
    assert!(
        t["data_starts_at"].is_string(),
        "the history starts inside the window: {t}"
    );
    let availability = number(&t["availability_percent"]);
    assert!(
        (availability - 100.0 * up / counted).abs() < 1e-6 && availability < 100.0,
        "{t}"
    );
    let budget = &t["error_budget"];
    assert_eq!(t["objective_percent"], 99.9);
    assert!(
        (number(&budget["allowed_seconds"]) - 0.001 * counted).abs() < 1e-3,
        "{budget}"
    );
    assert_eq!(number(&budget["used_seconds"]), down);
    assert!(number(&budget["burned_percent"]) > 100.0, "{budget}");
    let incidents = t["incidents"].as_array().expect("incidents");
    assert_eq!(incidents.len(), 1, "{t}");
    let incident = &incidents[0];
    assert_eq!(number(&incident["duration_seconds"]), down, "{incident}");
    assert_eq!(incident["maintenance"], "none");
    assert_eq!(incident["ongoing_at_window_end"], false);
    assert!(
        incident["reasons"]
            .to_string()
            .to_lowercase()
            .contains("refused"),
        "the reason the agent saw: {incident}"
    );

    // ---- CSV: the same figures
    let (status, csv) = http_get(&format!("{web}/api/v1/report?{query}&format=csv")).expect("CSV");
    assert_eq!(status, 200, "{csv}");
    let rows = parse_csv(&csv);
    assert_eq!(rows.len(), 2, "{csv}");
    assert_eq!(column(&rows, 1, "instance"), instance);
    for (name, json) in [
        ("down_seconds", down),
        ("up_seconds", up),
        ("counted_seconds", counted),
        ("window_seconds", window),
        ("budget_used_seconds", down),
    ] {
        let v: f64 = column(&rows, 1, name).parse().expect(name);
        assert_eq!(v, json, "{name}: {csv}");
    }
    let csv_availability: f64 = column(&rows, 1, "availability_percent").parse().unwrap();
    assert!((csv_availability - availability).abs() < 1e-5, "{csv}");
    assert_eq!(column(&rows, 1, "incidents"), "1");
    let (status, csv) = http_get(&format!(
        "{web}/api/v1/report?{query}&format=csv&incidents=1"
    ))
    .expect("incidents CSV");
    assert_eq!(status, 200, "{csv}");
    let rows = parse_csv(&csv);
    assert_eq!(rows.len(), 2, "{csv}");
    assert_eq!(
        column(&rows, 1, "duration_seconds").parse::<f64>().unwrap(),
        down
    );
    assert!(
        column(&rows, 1, "reasons")
            .to_lowercase()
            .contains("refused"),
        "{csv}"
    );

    // ---- the printable page
    let (status, page) = http_get(&format!("{web}/report?{query}")).expect("page");
    assert_eq!(status, 200, "{page}");
    for needle in [
        "<table id=\"targets\">",
        "<table id=\"incidents\">",
        "How this is counted.",
        "@media print",
        &format!("<code>{instance}</code>"),
        &format!("data-seconds=\"{}\"", t["down_seconds"]),
        "refused",
    ] {
        assert!(page.contains(needle), "the page has {needle:?}:\n{page}");
    }

    // ---- bad queries
    for (query, says) in [
        ("from=last+week", "is not a time"),
        (&format!("from={to}&to={from}") as &str, "is not after from"),
        ("job=nope", "is configured, reported or in the history"),
        ("job=shop&instance=http://elsewhere/", "has no target"),
        ("format=xml", "use json or csv"),
    ] {
        let (status, body) = http_get(&format!("{web}/api/v1/report?{query}")).expect(query);
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
}
