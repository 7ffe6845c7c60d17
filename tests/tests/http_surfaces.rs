//! The HTTP endpoints of both binaries hold against slow, many and
//! greedy callers, against the real binaries on loopback.
//!
//! - a connection that never finishes its request headers is closed after the header
//!   read timeout (10 s by default), on the aggregator and on the agent;
//! - past `--web.max-connections`, a new connection waits for a slot instead of being
//!   served, and is served once one frees: the server stays responsive;
//! - `/probe` past `probe_endpoint.max_concurrent_probes` answers 503 at once, its probes
//!   are capped at `probe_endpoint.max_timeout`, and no `X-Prometheus-Scrape-Timeout-Seconds`
//!   value can take the agent down;
//! - `POST /-/reload` is 403 without `--web.enable-lifecycle` and 200 with it;
//! - `/-/ready` answers 200 "Ready." on both.

use sonde_tests::{Scene, free_port, http_get, http_post, sonde_bin, start_agent};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);
/// The servers' default header read timeout.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 8;

/// Starts `sonde-aggregator` on free loopback ports with an empty config and `extra`
/// flags; waits for `/-/healthy`. Returns its web address.
fn start_aggregator(scene: &mut Scene, name: &str, extra: &[&str]) -> SocketAddr {
    let web_port = free_port();
    let config = scene.dir().write(&format!("{name}.yml"), "{}\n");
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .arg(format!("--grpc.listen-address=127.0.0.1:{}", free_port()))
        .arg(format!(
            "--storage.path={}",
            scene.dir().join(&format!("{name}-data")).display()
        ))
        .arg("--log.level=debug")
        .args(extra);
    scene.spawn(name, cmd);
    let addr = SocketAddr::from(([127, 0, 0, 1], web_port));
    scene.wait_until(&format!("{name} /-/healthy"), WAIT, || healthy(addr));
    addr
}

/// `/-/healthy` over a connection of its own, closed after the answer: unlike the
/// harness's pooled client, it leaves no idle keep-alive connection holding a slot.
fn healthy(addr: SocketAddr) -> Result<(), String> {
    let answer = raw_request(
        addr,
        b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )?;
    if answer.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(answer)
    }
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// Sends `request` on a new connection and reads the answer until the server closes it.
fn raw_request(addr: SocketAddr, request: &[u8]) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(request).map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Blocks until the server closes `s`; how long that took from `since`.
fn closed_by_server(mut s: TcpStream, since: Instant) -> Duration {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the server kept an unfinished request open for 60s")
            }
            // A reset is a close too.
            Err(_) => return since.elapsed(),
        }
    }
}

/// Fills every connection slot of the server at `addr` with connections whose headers
/// never end, and checks that (1) a further request waits rather than being served,
/// (2) the server closes the slow connections after the header read timeout, and
/// (3) the waiting request is then served, as are new ones.
fn slowloris_and_connection_limit(addr: SocketAddr, what: &str) {
    let started = Instant::now();
    let slow: Vec<TcpStream> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .expect("write part of the headers");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let answer = raw_request(
            addr,
            b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        let _ = tx.send((answer, Instant::now()));
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(2)).is_err(),
        "{what}: a request past --web.max-connections={MAX_CONNECTIONS} was served while every slot was held"
    );
    let closes: Vec<Duration> = slow
        .into_iter()
        .map(|s| closed_by_server(s, started))
        .collect();
    for took in &closes {
        assert!(
            *took >= HEADER_TIMEOUT - Duration::from_secs(1)
                && *took <= HEADER_TIMEOUT + Duration::from_secs(5),
            "{what}: an unfinished request was closed after {took:?}, not after the {HEADER_TIMEOUT:?} header read timeout"
        );
    }
    let (answer, at) = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: the waiting request was not served once slots freed"));
    let answer = answer.unwrap_or_else(|e| panic!("{what}: the waiting request failed: {e}"));
    assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
    assert!(
        at.duration_since(started) < HEADER_TIMEOUT + Duration::from_secs(5),
        "{what}: the waiting request was served only after {:?}",
        at.duration_since(started)
    );
    // Responsive afterwards.
    for _ in 0..3 * MAX_CONNECTIONS {
        healthy(addr).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

#[test]
fn slow_and_many_connections_do_not_take_either_server_down() {
    let mut scene = Scene::new("http-surfaces-limits");
    let limit = format!("--web.max-connections={MAX_CONNECTIONS}");
    let aggregator = start_aggregator(&mut scene, "aggregator", &[&limit]);
    let agent_web = {
        let port = free_port();
        let config = scene.dir().write("agent.yml", "agent: {id: edge-limits}\n");
        let mut cmd = Command::new(sonde_bin("sonde-agent"));
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(&limit)
            .arg(format!(
                "--storage.path={}",
                scene.dir().join("agent-data").display()
            ));
        scene.spawn("agent", cmd);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        scene.wait_until("agent /-/healthy", WAIT, || healthy(addr));
        addr
    };
    // Both at once: each takes the header timeout.
    let agent_check =
        std::thread::spawn(move || slowloris_and_connection_limit(agent_web, "agent"));
    slowloris_and_connection_limit(aggregator, "aggregator");
    agent_check.join().expect("the agent's check");
    scene.check_running().expect("both still running");
}

#[test]
fn reload_needs_the_lifecycle_flag_and_ready_tells_the_truth() {
    let mut scene = Scene::new("http-surfaces-lifecycle");
    let plain = start_aggregator(&mut scene, "plain", &[]);
    let (status, body) = http_post(&url(plain, "/-/reload")).expect("POST /-/reload");
    assert_eq!(
        (status, body.as_str()),
        (403, "Lifecycle API is not enabled.\n")
    );
    assert_eq!(
        http_get(&url(plain, "/-/ready")).expect("/-/ready"),
        (200, "Ready.\n".to_string())
    );
    let lifecycle = start_aggregator(&mut scene, "lifecycle", &["--web.enable-lifecycle"]);
    let (status, body) = http_post(&url(lifecycle, "/-/reload")).expect("POST /-/reload");
    assert_eq!(status, 200, "{body}");
    let agent = start_agent(&mut scene, "agent", "agent: {id: edge-ready}\n");
    assert_eq!(
        http_get(&format!("{agent}/-/ready")).expect("/-/ready"),
        (200, "Ready.\n".to_string())
    );
}

#[test]
fn a_failed_reload_is_visible_and_a_good_one_says_what_changed() {
    let mut scene = Scene::new("http-surfaces-reload");
    let web = start_aggregator(&mut scene, "aggregator", &["--web.enable-lifecycle"]);
    let metric = |name: &str| {
        let page = http_get(&url(web, "/metrics")).expect("/metrics").1;
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
            .unwrap_or_else(|| panic!("{name} on /metrics"))
    };
    assert_eq!(metric("sonde_config_last_reload_successful"), "1");
    let started: f64 = metric("sonde_config_last_reload_success_timestamp_seconds")
        .parse()
        .expect("a timestamp");
    let config = scene.dir().join("aggregator.yml");
    std::fs::write(&config, "jobs: [{job_name: broken}]\n").expect("write a broken config");
    let (status, body) = http_post(&url(web, "/-/reload")).expect("POST /-/reload");
    assert_ne!(status, 200, "{body}");
    assert_eq!(metric("sonde_config_last_reload_successful"), "0");
    let page = http_get(&url(web, "/")).expect("status page").1;
    assert!(page.contains(r#"id="reload-failed""#), "a banner says so");
    assert!(page.contains("aggregator.yml"), "and names the file");

    std::fs::write(
        &config,
        "modules: {tcp: {prober: tcp}}\njobs:\n  - {job_name: db, module: tcp, static_configs: [{targets: ['127.0.0.1:5432']}]}\n",
    )
    .expect("write a good config");
    let (status, body) = http_post(&url(web, "/-/reload")).expect("POST /-/reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(metric("sonde_config_last_reload_successful"), "1");
    let reloaded: f64 = metric("sonde_config_last_reload_success_timestamp_seconds")
        .parse()
        .expect("a timestamp");
    assert!(reloaded >= started);
    let page = http_get(&url(web, "/")).expect("status page").1;
    assert!(
        !page.contains(r#"id="reload-failed""#),
        "the banner is gone"
    );
    let log = scene.process("aggregator").log();
    assert!(
        log.lines()
            .any(|l| l.contains("config reloaded") && l.contains("jobs added: db")),
        "the reload logs what changed: {log}"
    );

    // The agent reports its own reloads (SIGHUP) the same way.
    let agent = start_agent(&mut scene, "agent", "agent: {id: edge-reload}\n");
    let agent_metric = |name: &str| {
        let page = http_get(&format!("{agent}/metrics")).expect("/metrics").1;
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
            .unwrap_or_else(|| panic!("{name} on the agent's /metrics"))
    };
    assert_eq!(agent_metric("sonde_config_last_reload_successful"), "1");
    std::fs::write(
        scene.dir().join("agent.yml"),
        "agent: {id: [not, a, string]}\n",
    )
    .expect("write a broken agent config");
    let pid = scene.process("agent").pid();
    let hup = |pid: u32| {
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill -HUP")
    };
    assert!(hup(pid).success());
    scene.wait_until("the agent's failed reload", WAIT, || {
        match agent_metric("sonde_config_last_reload_successful").as_str() {
            "0" => Ok(()),
            v => Err(v.to_string()),
        }
    });
    std::fs::write(scene.dir().join("agent.yml"), "agent: {id: edge-reload}\n")
        .expect("write the agent config back");
    assert!(hup(pid).success());
    scene.wait_until("the agent's good reload", WAIT, || {
        match agent_metric("sonde_config_last_reload_successful").as_str() {
            "1" => Ok(()),
            v => Err(v.to_string()),
        }
    });
}

/// A target that accepts connections and never answers; counts them.
fn silent_target() -> (SocketAddr, mpsc::Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if tx.send(stream).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

#[test]
fn probe_is_bounded_in_concurrency_and_time_and_survives_any_timeout_header() {
    let mut scene = Scene::new("http-surfaces-probe");
    let agent = start_agent(
        &mut scene,
        "agent",
        "agent: {id: edge-probe}\n\
         modules:\n  http_2xx: {prober: http, timeout: 60s}\n\
         probe_endpoint:\n  enabled: true\n  allowed_targets: ['127.0.0.1:*']\n  \
         max_concurrent_probes: 2\n  max_timeout: 4s\n",
    );
    let agent_addr: SocketAddr = agent.trim_start_matches("http://").parse().unwrap();
    let (silent, accepted) = silent_target();
    let probe_url = format!("{agent}/probe?module=http_2xx&target=http://{silent}/");

    // Two probes of a target that never answers hold both slots...
    let started = Instant::now();
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let u = probe_url.clone();
            std::thread::spawn(move || (http_get(&u), started.elapsed()))
        })
        .collect();
    let mut held = Vec::new();
    while held.len() < 2 {
        held.push(
            accepted
                .recv_timeout(Duration::from_secs(10))
                .expect("both probes reach the target"),
        );
    }
    // ...so a third is answered 503 at once.
    let asked = Instant::now();
    let (status, body) = http_get(&probe_url).expect("third /probe");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("max_concurrent_probes"), "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    // The held probes end at max_timeout (4s), not the module's 60s, as failures.
    for h in holders {
        let (answer, took) = h.join().unwrap();
        let (status, body) = answer.expect("held /probe");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("probe_success 0"), "{body}");
        assert!(took < Duration::from_secs(8), "a probe took {took:?}");
    }
    drop(held);

    // Slots are released: probes run again. Hostile timeout headers, over the wire
    // exactly as written (one is not UTF-8), never take the agent down.
    let target = format!("http://{agent_addr}/-/healthy");
    let values: [&[u8]; 12] = [
        b"NaN",
        b"inf",
        b"-inf",
        b"-1",
        b"0",
        b"1e309",
        b"1e300",
        b"18446744073709551616",
        b"99999999999999999999999999",
        b"ten",
        b"",
        b"\xff\xfe10",
    ];
    for value in values {
        let mut request =
            format!("GET /probe?module=http_2xx&target={target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Prometheus-Scrape-Timeout-Seconds: ").into_bytes();
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n\r\n");
        let answer = raw_request(agent_addr, &request)
            .unwrap_or_else(|e| panic!("header {:?}: {e}", String::from_utf8_lossy(value)));
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("probe_success 1"),
            "header {:?}: {answer}",
            String::from_utf8_lossy(value)
        );
        scene
            .check_running()
            .unwrap_or_else(|e| panic!("header {:?}: {e}", String::from_utf8_lossy(value)));
    }
}
