//! The agent after a stall and under its own connect policy, with the real binaries:
//!
//! - stopped (SIGSTOP) for longer than its interval and continued, as a paused VM or a
//!   swap storm stops it, an agent with thousands of checks catches up in bounded
//!   batches: its memory stays near its steady state, the slots past saving are
//!   skipped and counted, and every check is back on schedule one interval later;
//! - checks an aggregator assigns connect only where `assigned_modules.connect` of the
//!   agent's config allows: a denied address fails the check with the policy's reason
//!   and no connection reaches it, a cloud metadata address is refused by default, and
//!   an allowed address is probed as before.

use serde_json::Value;
use sonde_tests::{
    Netns, Scene, metric_sum, nginx_config, require_tool, start_agent, start_agent_in,
    start_aggregator_in,
};
use std::time::{Duration, Instant};

/// An HTTP server on 127.0.0.1 answering every request `200 ok` and closing, served by
/// a runtime of its own for the rest of the test process. Every connection is answered
/// at once, however many arrive together (nginx's test config takes 64).
fn http_responder() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the HTTP target");
    let port = listener.local_addr().expect("target address").port();
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the HTTP target's runtime");
        runtime.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                        )
                        .await;
                    let _ = conn.shutdown().await;
                });
            }
        });
    });
    port
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with the pid of a child this test started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

const CATCH_UP_TARGETS: usize = 2_000;
const CATCH_UP_INTERVAL: Duration = Duration::from_secs(10);
/// Longer than two intervals: every check has at least one slot more than an interval
/// past when it wakes.
const STALL: Duration = Duration::from_secs(25);

#[test]
fn a_stalled_agent_catches_up_in_bounded_batches_within_its_steady_memory() {
    let mut scene = Scene::new("catch-up");
    let port = http_responder();
    let targets: String = (0..CATCH_UP_TARGETS)
        .map(|i| format!("          - http://127.0.0.1:{port}/?t={i}\n"))
        .collect();
    let config = format!(
        r#"agent:
  id: stalled
modules:
  http_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
jobs:
  - job_name: many
    module: http_2xx
    interval: {}s
    timeout: 5s
    static_configs:
      - targets:
{targets}"#,
        CATCH_UP_INTERVAL.as_secs()
    );
    let web = start_agent(&mut scene, "agent", &config);
    let pid = scene.process("agent").pid();
    let probes = || metric_sum(&web, "sonde_agent_probes_total", &[("job", "many")]);
    let skipped_late = || {
        metric_sum(
            &web,
            "sonde_agent_probes_skipped_total",
            &[("reason", "late")],
        )
    };
    let n = CATCH_UP_TARGETS as f64;

    // Steady state: two rounds of every check, then the high-water mark of a third.
    scene.wait_until(
        "two rounds of probes",
        CATCH_UP_INTERVAL * 4,
        || match probes()? {
            p if p >= 2.0 * n => Ok(()),
            p => Err(format!("{p} probes")),
        },
    );
    std::thread::sleep(CATCH_UP_INTERVAL);
    let steady_hwm = status_kib(pid, "VmHWM");
    let steady_rss = status_kib(pid, "VmRSS");
    let skipped_before = skipped_late().unwrap_or(0.0);

    signal(pid, libc::SIGSTOP);
    std::thread::sleep(STALL);
    signal(pid, libc::SIGCONT);
    let continued = Instant::now();

    // The catch-up is over one interval after the stall (the slots not started by then
    // are skipped): its peak is the process's high-water mark. Its bound: the steady
    // state's own peak, half again for what the allocator keeps after the burst of
    // results, and 8 MiB for the catch-up's places (tens of probes' connections and
    // buffers, some tens of KiB each). Every due probe at once costs 2,000 probes' state:
    // some 60 MiB more here, about twice the agent's steady size.
    std::thread::sleep(CATCH_UP_INTERVAL.saturating_sub(continued.elapsed()));
    let peak = status_kib(pid, "VmHWM");
    let bound = steady_hwm * 3 / 2 + 8 * 1024;
    eprintln!(
        "steady VmRSS {steady_rss} KiB, VmHWM {steady_hwm} KiB; after the stall VmHWM {peak} KiB (bound {bound} KiB)"
    );
    assert!(
        peak <= bound,
        "the agent's memory peaked at {peak} KiB catching up after the stall, over {bound} KiB (1.5 x its steady peak of {steady_hwm} KiB + 8 MiB)"
    );

    // Every check woke more than an interval after at least one of its slots: each
    // skipped one at least, counted.
    let skipped_after_recovery = skipped_late().unwrap_or(0.0);
    assert!(
        skipped_after_recovery - skipped_before >= n,
        "{} slots skipped as late after the stall; every one of the {n} checks had one more than an interval past",
        skipped_after_recovery - skipped_before
    );
    // And every check is on schedule again: the next interval probes every target (a
    // margin for a loaded machine), and skips no more.
    let probes_after_recovery = probes().expect("the probe counts");
    scene.wait_until(
        "a whole round of probes in the interval after the recovery",
        CATCH_UP_INTERVAL + Duration::from_secs(3),
        || match probes()? - probes_after_recovery {
            p if p >= n => Ok(()),
            p => Err(format!("{p} probes")),
        },
    );
    assert_eq!(
        skipped_late().expect("the late skips"),
        skipped_after_recovery,
        "slots still skipped as late one interval after the stall"
    );
    scene.process("agent").terminate(Duration::from_secs(10));
}

/// The address every cloud's metadata service answers on.
const METADATA: &str = "169.254.169.254";
/// A loopback address the agent's config denies to assigned checks.
const DENIED: &str = "127.0.0.77";

/// The aggregator's view of `job`'s only target, from inside `ns`.
fn view(ns: &Netns, web: &str, job: &str) -> Result<Value, String> {
    let (status, body) = ns.http_get(&format!("{web}/api/v1/targets"))?;
    if status != 200 {
        return Err(format!("/api/v1/targets: {status}"));
    }
    let all: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    all["data"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["job"] == job))
        .and_then(|t| t["views"][0].as_object().cloned())
        .map(Value::Object)
        .ok_or_else(|| format!("no view of job {job} yet"))
}

/// The failure message of `job`'s check once it has failed.
fn failure(ns: &Netns, web: &str, job: &str) -> Result<(String, Value), String> {
    let v = view(ns, web, job)?;
    match (&v["success"], v["failure"].as_str()) {
        (Value::Bool(false), Some(why)) => Ok((why.to_string(), v.clone())),
        _ => Err(format!("{job} has not failed yet: {v}")),
    }
}

fn access_log_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// In a network namespace of its own (so that no probe leaves it), with the metadata
/// address on a veth interface and a name resolving to it: nginx answers on the
/// metadata address, on a loopback address the agent's config denies, and on 127.0.0.1;
/// the aggregator assigns a check of each to the agent.
#[test]
fn assigned_checks_connect_only_where_the_agents_config_allows() {
    let mut scene = Scene::new("assigned-connect");
    let ns = Netns::new("connect");
    // A veth pair inside the namespace (kernels without the dummy driver have veth).
    ns.exec(&[
        "ip", "link", "add", "meta0", "type", "veth", "peer", "name", "meta1",
    ]);
    let metadata_net = format!("{METADATA}/32");
    ns.exec(&["ip", "addr", "add", &metadata_net, "dev", "meta0"]);
    ns.exec(&["ip", "link", "set", "meta1", "up"]);
    ns.exec(&["ip", "link", "set", "meta0", "up"]);
    // `ip netns exec` mounts the namespace's own /etc/hosts for what it runs.
    let etc = std::path::Path::new("/etc/netns").join(ns.name());
    std::fs::create_dir_all(&etc).expect("create /etc/netns/<name>");
    std::fs::write(
        etc.join("hosts"),
        format!("127.0.0.1 localhost\n{METADATA} metadata.google.internal\n"),
    )
    .expect("write the namespace's /etc/hosts");

    let nginx = require_tool("nginx", "nginx-light");
    let dir = scene.dir().join("nginx");
    std::fs::create_dir_all(&dir).expect("create nginx dir");
    let log = |name: &str| dir.join(format!("{name}.log"));
    let server = |listen: &str, name: &str| {
        format!(
            "    server {{\n        listen {listen};\n        access_log {};\n        location / {{ return 200 \"secret-token\\n\"; }}\n    }}\n",
            log(name).display()
        )
    };
    let servers = [
        server(&format!("{METADATA}:80"), "metadata"),
        server(&format!("{DENIED}:80"), "denied"),
        server("127.0.0.1:8080", "allowed"),
    ]
    .concat();
    let config = scene
        .dir()
        .write("nginx/nginx.conf", &nginx_config(&dir, &servers));
    let mut cmd = ns.command(nginx);
    cmd.arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(&dir)
        .args(["-e", "stderr"]);
    scene.spawn("nginx", cmd);
    scene.wait_until(
        "nginx to answer on 127.0.0.1:8080",
        Duration::from_secs(30),
        || match ns.http_get("http://127.0.0.1:8080/")? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let served_before = access_log_lines(&log("allowed"));

    let aggregator = start_aggregator_in(
        &mut scene,
        Some(&ns),
        "aggregator",
        &format!(
            r#"modules:
  http_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
  tcp_connect:
    prober: tcp
    tcp:
      preferred_ip_protocol: ip4
jobs:
  - job_name: allowed
    module: http_2xx
    interval: 1s
    timeout: 1s
    static_configs:
      - targets: ["http://127.0.0.1:8080/"]
  - job_name: denied_http
    module: http_2xx
    interval: 1s
    timeout: 1s
    static_configs:
      - targets: ["http://{DENIED}/"]
  - job_name: denied_tcp
    module: tcp_connect
    interval: 1s
    timeout: 1s
    static_configs:
      - targets: ["{DENIED}:80"]
  - job_name: metadata
    module: http_2xx
    interval: 1s
    timeout: 1s
    static_configs:
      - targets: ["http://{METADATA}/latest/meta-data/iam/security-credentials/"]
  - job_name: metadata_by_name
    module: http_2xx
    interval: 1s
    timeout: 1s
    static_configs:
      - targets: ["http://metadata.google.internal/computeMetadata/v1/"]
"#
        ),
    );
    start_agent_in(
        &mut scene,
        Some(&ns),
        "agent",
        &format!(
            r#"agent:
  id: edge
aggregators:
  - address: {}
assigned_modules:
  connect:
    deny: ["{DENIED}/32"]
"#,
            aggregator.grpc
        ),
    );
    let web = &aggregator.web;
    let wait = Duration::from_secs(60);

    scene.wait_until("the allowed check to succeed", wait, || {
        match view(&ns, web, "allowed")?["success"] {
            Value::Bool(true) => Ok(()),
            ref other => Err(format!("success {other}")),
        }
    });
    let denied = format!(
        "{DENIED} is in {DENIED}/32, which assigned_modules.connect.deny refuses; remove that entry from the agent's config to allow it"
    );
    let metadata = format!(
        "{METADATA} is a link-local or cloud metadata address; list it in assigned_modules.connect.allow explicitly (like {METADATA}/32) to allow it"
    );
    for (job, want) in [
        ("denied_http", &denied),
        ("denied_tcp", &denied),
        ("metadata", &metadata),
        ("metadata_by_name", &metadata),
    ] {
        let (why, view) =
            scene.wait_until(&format!("{job} to fail"), wait, || failure(&ns, web, job));
        assert_eq!(&why, want, "{job}: {view}");
        // Refused before connecting: the trace has no connection attempt.
        let steps = view["trace"]["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            steps.iter().all(|s| s["kind"] != "connect"),
            "{job} tried to connect: {view}"
        );
    }
    // A few more rounds of every check: nothing ever reached the refused servers, while
    // the allowed one keeps being probed.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        access_log_lines(&log("metadata")),
        0,
        "a probe reached the metadata address"
    );
    assert_eq!(
        access_log_lines(&log("denied")),
        0,
        "a probe reached {DENIED}"
    );
    assert!(
        access_log_lines(&log("allowed")) > served_before,
        "the allowed check's requests are logged"
    );
}
