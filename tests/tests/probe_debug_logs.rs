//! The agent's `/probe?debug=true` and `/logs`, as blackbox_exporter answers them, from
//! the real `sonde-agent` binary:
//! - `/probe?debug=true` answers the probe's step-by-step log, then the metrics that
//!   would have been returned, then the module as YAML, for a succeeding and a failing
//!   target;
//! - `/logs?target=` answers the last probe of a target, from `/probe` requests and from
//!   the agent's scheduled checks; `/logs?id=` the one listed on `/`;
//! - the module's credentials (an Authorization header, a bearer token) reach the target
//!   but never a log, a debug output or the index page.

use sonde_tests::{Scene, http_get, start_agent};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

const SECRET: &str = "s3cret-bearer-token";

/// An HTTP/1.1 server on loopback that answers 200 "hello" to a request carrying
/// `Authorization: Bearer SECRET`, 401 to any other, and closes each connection.
fn http_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the target");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream);
            let mut authorized = false;
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if line.to_ascii_lowercase().trim_end()
                    == format!("authorization: bearer {SECRET}").to_ascii_lowercase()
                {
                    authorized = true;
                }
                if line == "\r\n" {
                    break;
                }
            }
            let answer = if authorized {
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
            } else {
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let _ = reader.get_mut().write_all(answer.as_bytes());
        }
    });
    addr
}

/// A loopback port nothing listens on.
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// The debug output's three sections, in blackbox_exporter's order and spelling.
fn sections(text: &str) -> (&str, &str, &str) {
    let logs = text
        .strip_prefix("Logs for the probe:\n")
        .unwrap_or_else(|| panic!("no log section first:\n{text}"));
    let (logs, rest) = logs
        .split_once("\n\n\nMetrics that would have been returned:\n")
        .unwrap_or_else(|| panic!("no metrics section after the log:\n{text}"));
    let (metrics, module) = rest
        .split_once("\n\n\nModule configuration:\n")
        .unwrap_or_else(|| panic!("no module section after the metrics:\n{text}"));
    (logs, metrics, module)
}

#[track_caller]
fn assert_has_in_order(text: &str, fragments: &[&str]) {
    let mut from = 0;
    for f in fragments {
        match text[from..].find(f) {
            Some(at) => from += at + f.len(),
            None => panic!("{f:?} missing (in order) from:\n{text}"),
        }
    }
}

#[test]
fn probe_debug_answers_the_log_the_metrics_and_the_module_and_logs_keep_them() {
    let mut scene = Scene::new("probe-debug-logs");
    let site = http_target();
    let closed = closed_port();
    let agent = start_agent(
        &mut scene,
        "agent",
        &format!(
            "agent: {{id: edge-debug}}\n\
             modules:\n  \
               http_auth:\n    prober: http\n    timeout: 5s\n    http:\n      \
                 headers: {{Authorization: 'Bearer {SECRET}', X-Probe: visible}}\n      \
                 fail_if_body_not_matches_regexp: [hello]\n  \
               http_token:\n    prober: http\n    timeout: 2s\n    http:\n      \
                 bearer_token: {SECRET}\n\
             jobs:\n  \
               - job_name: scheduled\n    module: http_token\n    interval: 1s\n    timeout: 1s\n    \
                 static_configs: [{{targets: ['http://{closed}/scheduled']}}]\n\
             probe_endpoint:\n  enabled: true\n  allowed_targets: ['127.0.0.1:*']\n"
        ),
    );

    // A succeeding probe: its steps, its metrics, its module, and no secret.
    let target = format!("http://{site}/");
    let (status, text) = http_get(&format!(
        "{agent}/probe?module=http_auth&debug=true&target={target}"
    ))
    .expect("/probe?debug=true");
    assert_eq!(status, 200, "{text}");
    let (logs, metrics, module) = sections(&text);
    assert_has_in_order(
        logs,
        &[
            "level=info module=http_auth",
            &format!("target={target} msg=\"Beginning probe\" probe=http"),
            "msg=\"Target is an IP address, not resolved\" ip=127.0.0.1",
            &format!("msg=\"Dialing TCP\" address={site}"),
            &format!("msg=\"Successfully dialed\" address={site}"),
            &format!("msg=\"Making HTTP request\" method=GET url={target}"),
            "msg=\"Request header\" name=authorization value=<secret>",
            "msg=\"Received HTTP response\" status_line=\"HTTP/1.1 200 OK\"",
            "msg=\"Checked the body against fail_if_body_not_matches_regexp\" regexp=hello matched=true",
            "level=info",
            "msg=\"Probe succeeded\"",
        ],
    );
    assert!(logs.lines().all(|l| l.starts_with("ts=20")), "{logs}");
    assert!(
        metrics.contains("# TYPE probe_success gauge\nprobe_success 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("probe_http_status_code 200\n"),
        "{metrics}"
    );
    for line in [
        "prober: http",
        "timeout: 5s",
        "Authorization: <secret>",
        "X-Probe: visible",
    ] {
        assert!(
            module.contains(line),
            "{line:?} missing from the module:\n{module}"
        );
    }
    assert!(!text.contains(SECRET), "{text}");

    // A failing probe: why it failed, in the log and the metrics.
    let failing = format!("http://{closed}/");
    let (status, text) = http_get(&format!(
        "{agent}/probe?module=http_auth&debug=true&target={failing}"
    ))
    .expect("/probe?debug=true of a closed port");
    assert_eq!(status, 200, "{text}");
    let (logs, metrics, _) = sections(&text);
    assert_has_in_order(
        logs,
        &[
            "msg=\"Beginning probe\" probe=http",
            &format!(
                "level=error module=http_auth target={failing} msg=\"Error dialing\" address={closed} err=\"connection refused\""
            ),
            "msg=\"Probe failed\" reason=connect_refused err=\"connect: connection refused\"",
        ],
    );
    assert!(metrics.contains("probe_success 0\n"), "{metrics}");
    assert!(
        metrics.contains("probe_failure_info{reason=\"connect_refused\"} 1\n"),
        "{metrics}"
    );
    assert!(!text.contains(SECRET), "{text}");

    // The last probe of a /probe target, as it was answered.
    let (status, kept) = http_get(&format!("{agent}/logs?target={failing}")).expect("/logs");
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept, text);
    let (status, kept) =
        http_get(&format!("{agent}/logs?target={target}&module=http_auth")).expect("/logs");
    assert_eq!(status, 200, "{kept}");
    assert!(kept.contains("msg=\"Probe succeeded\""), "{kept}");

    // A /probe without debug is kept too, from what it produced anyway.
    let (status, body) =
        http_get(&format!("{agent}/probe?module=http_auth&target={target}")).expect("/probe");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("probe_success 1"), "{body}");
    let (_, kept) = http_get(&format!("{agent}/logs?target={target}")).expect("/logs");
    let (logs, metrics, module) = sections(&kept);
    assert!(logs.contains("msg=\"Probe succeeded\""), "{kept}");
    assert!(metrics.contains("probe_success 1\n"), "{kept}");
    assert!(module.contains("prober: http"), "{kept}");
    assert!(!kept.contains(SECRET), "{kept}");

    // A scheduled check's last probe, with the failure trace it recorded.
    let scheduled = format!("http://{closed}/scheduled");
    let kept = scene.wait_until(
        "the scheduled check's probe in /logs",
        Duration::from_secs(30),
        || match http_get(&format!("{agent}/logs?target={scheduled}"))? {
            (200, body) => Ok(body),
            (status, body) => Err(format!("{status}: {body}")),
        },
    );
    let (logs, metrics, module) = sections(&kept);
    assert_has_in_order(
        logs,
        &[
            &format!(
                "level=error module=http_token target={scheduled} msg=\"Error dialing\" address={closed} err=\"connection refused\""
            ),
            "msg=\"Probe failed\" err=\"connect: connection refused\"",
        ],
    );
    assert!(metrics.contains("probe_success 0\n"), "{kept}");
    assert!(module.contains("bearer_token: <secret>"), "{module}");
    assert!(!kept.contains(SECRET), "{kept}");

    // The index lists what is kept, by id; each id answers its probe.
    let (_, index) = http_get(&format!("{agent}/")).expect("/");
    assert!(!index.contains(SECRET), "{index}");
    let line = index
        .lines()
        .find(|l| l.contains(&format!("target={scheduled}")) && l.contains("/logs?id="))
        .unwrap_or_else(|| panic!("no listed probe of {scheduled}:\n{index}"));
    assert!(
        line.contains("job=scheduled") && line.contains("FAILURE"),
        "{line}"
    );
    let id = line
        .trim()
        .trim_start_matches("/logs?id=")
        .split('\t')
        .next()
        .unwrap();
    let (status, by_id) = http_get(&format!("{agent}/logs?id={id}")).expect("/logs?id=");
    assert_eq!(status, 200, "{by_id}");
    assert!(by_id.contains(&format!("target={scheduled}")), "{by_id}");

    // What is not there says so.
    let (status, body) = http_get(&format!("{agent}/logs?target=http://nowhere.invalid/")).unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not found"), "{body}");
    let (status, body) = http_get(&format!("{agent}/logs?id=x")).unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = http_get(&format!("{agent}/logs")).unwrap();
    assert_eq!(status, 400, "{body}");

    scene.stop();
}
