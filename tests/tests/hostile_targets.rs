//! sonde-agent against hostile targets, through its `/probe` endpoint: a 10 GB body with
//! and without `body_size_limit` (streamed, never held), a server that sends one byte per
//! second, a redirect loop, a gzip bomb, DNS servers that answer garbage. Each probe must
//! fail cleanly (an answer with `probe_success 0` and a failure reason) within its
//! timeout, and the agent's peak memory must stay bounded.
//!
//! A brotli bomb (57 KB that stand for 64 GiB) must fail at the probe's deadline with
//! the CPU time of that deadline, while the agent goes on answering `/-/healthy` and
//! running the scheduled checks beside it on time.
//!
//! Also `/probe`'s allowlist: a target it does not allow, and a redirect to a refused
//! address, get 403 with the reason, and the refused server sees no connection at all;
//! and the module's credentials, which go to the target's host and never to another one
//! a redirect leads to.
//!
//! Every server here is a few lines of std Rust on 127.0.0.1 (and 127.0.0.2, also
//! loopback on Linux, for another host).

use sonde_tests::{Scene, http_get, metric_sum, parse_metrics, start_agent};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The agent's peak resident memory must stay under this, whatever the targets send.
const MAX_PEAK_RSS_KB: u64 = 128 * 1024;

const MODULES: &str = r#"modules:
  http_limited:
    prober: http
    timeout: 5s
    http:
      body_size_limit: 1MiB
  http_unlimited:
    prober: http
    timeout: 3s
  http_gzip_limited:
    prober: http
    timeout: 5s
    http:
      compression: gzip
      body_size_limit: 10MiB
  http_gzip_unlimited:
    prober: http
    timeout: 3s
    http:
      compression: gzip
      fail_if_body_matches_regexp: ["never there"]
  dns_udp:
    prober: dns
    timeout: 3s
    dns:
      query_name: hostile.test
      query_type: A
  dns_tcp:
    prober: dns
    timeout: 3s
    dns:
      query_name: hostile.test
      query_type: A
      transport_protocol: tcp
"#;

/// One `/probe` answer: status, metrics text, and how long it took.
struct Probe {
    status: u16,
    body: String,
    took: Duration,
}

impl Probe {
    fn value(&self, name: &str) -> Option<f64> {
        parse_metrics(&self.body)
            .into_iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value)
    }

    fn reason(&self) -> Option<String> {
        parse_metrics(&self.body)
            .into_iter()
            .find(|s| s.name == "probe_failure_info")
            .and_then(|s| s.labels.get("reason").cloned())
    }
}

fn probe(agent: &str, module: &str, target: &str) -> Probe {
    let started = Instant::now();
    let (status, body) = http_get(&format!("{agent}/probe?module={module}&target={target}"))
        .unwrap_or_else(|e| panic!("/probe {module} {target}: {e}"));
    Probe {
        status,
        body,
        took: started.elapsed(),
    }
}

/// Peak and current resident memory of a process, in KiB (from /proc/<pid>/status).
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn hostile_targets_fail_cleanly_with_bounded_memory() {
    let started = Instant::now();
    let mut scene = Scene::new("hostile");
    let config = format!(
        "agent:\n  id: hostile\naggregators: []\n{MODULES}probe_endpoint:\n  enabled: true\n  allowed_targets: [\"127.0.0.1:*\"]\n"
    );
    let agent = start_agent(&mut scene, "sonde-agent", &config);
    let pid = scene.process("sonde-agent").pid();
    let (baseline, _) = rss_kb(pid);

    let huge = HttpServer::start(Reply::HugeBody);
    let slow = HttpServer::start(Reply::OneBytePerSecond);
    let looping = HttpServer::start(Reply::RedirectLoop);
    let bomb = HttpServer::start(Reply::GzipBomb);
    let dns_udp = garbage_dns_udp();
    let dns_tcp = garbage_dns_tcp();

    // A 10 GB body with a 1 MiB limit: stops at the limit, at once.
    let p = probe(&agent, "http_limited", &huge.url("/"));
    assert_fails(&p, "body_size", Duration::from_secs(5));
    assert_eq!(
        p.value("probe_http_uncompressed_body_length"),
        Some(1048576.0)
    );
    assert_eq!(p.value("probe_http_content_length"), Some(10737418240.0));

    // Without a limit: read and dropped as it comes. Over loopback 10 GB may well fit in
    // the 3 s deadline (then the probe succeeds, as blackbox_exporter's would); if not,
    // the deadline ends it. Either way in time and in bounded memory.
    let p = probe(&agent, "http_unlimited", &huge.url("/"));
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(p.took < Duration::from_millis(4500), "took {:?}", p.took);
    let read = p.value("probe_http_uncompressed_body_length").unwrap();
    match p.value("probe_success") {
        Some(1.0) => assert_eq!(read, 10737418240.0),
        _ => {
            assert_eq!(p.reason().as_deref(), Some("timeout"), "{}", p.body);
            assert!(read < 10737418240.0, "{read}");
        }
    }
    assert!(
        huge.sent.load(Ordering::SeqCst) > 1 << 30,
        "the body was streamed"
    );

    // One byte per second: the deadline ends it.
    let p = probe(&agent, "http_unlimited", &slow.url("/"));
    assert_fails(&p, "timeout", Duration::from_secs(3));

    // A redirect loop: stopped after 10 redirects, as Go's client does.
    let p = probe(&agent, "http_unlimited", &looping.url("/loop"));
    assert_fails(&p, "http_status", Duration::from_secs(3));
    assert_eq!(p.value("probe_http_redirects"), Some(11.0));
    assert_eq!(p.value("probe_http_status_code"), Some(302.0));
    assert!(p.took < Duration::from_secs(2), "{:?}", p.took);

    // A gzip bomb: with a limit it stops at 10 MiB of output; without one it inflates
    // until the deadline, in bounded memory.
    let p = probe(&agent, "http_gzip_limited", &bomb.url("/"));
    assert_fails(&p, "body_size", Duration::from_secs(5));
    assert_eq!(
        p.value("probe_http_uncompressed_body_length"),
        Some(10.0 * 1048576.0)
    );
    let p = probe(&agent, "http_gzip_unlimited", &bomb.url("/"));
    assert_fails(&p, "timeout", Duration::from_secs(3));
    assert!(p.value("probe_http_uncompressed_body_length").unwrap() > 10.0 * 1048576.0);

    // DNS servers answering garbage, over UDP and TCP.
    let p = probe(&agent, "dns_udp", &format!("127.0.0.1:{dns_udp}"));
    assert_fails(&p, "protocol", Duration::from_secs(3));
    assert_eq!(p.value("probe_dns_query_succeeded"), Some(0.0));
    let p = probe(&agent, "dns_tcp", &format!("127.0.0.1:{dns_tcp}"));
    assert_fails(&p, "protocol", Duration::from_secs(3));

    let (peak, now) = rss_kb(pid);
    eprintln!(
        "agent memory: baseline peak {baseline} KiB, peak after the hostile targets {peak} KiB, now {now} KiB; took {:?}",
        started.elapsed()
    );
    assert!(
        peak < MAX_PEAK_RSS_KB,
        "the agent's peak RSS reached {peak} KiB (baseline {baseline} KiB), over {MAX_PEAK_RSS_KB} KiB"
    );
    scene.check_running().unwrap();
}

fn assert_fails(p: &Probe, reason: &str, timeout: Duration) {
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.value("probe_success"), Some(0.0), "{}", p.body);
    assert_eq!(p.reason().as_deref(), Some(reason), "{}", p.body);
    // Within its timeout, plus the time to answer.
    assert!(
        p.took < timeout + Duration::from_millis(1500),
        "took {:?}, timeout {timeout:?}",
        p.took
    );
}

#[test]
fn probe_refuses_what_the_allowlist_does_not_allow() {
    let mut scene = Scene::new("refusals");
    // A server on 127.0.0.2, which the allowlist does not admit, counting connections.
    let refused = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0)).unwrap();
    refused.set_nonblocking(true).unwrap();
    let refused_port = refused.local_addr().unwrap().port();
    // An allowed server that redirects there, and one that redirects to the metadata
    // service.
    let to_refused = HttpServer::start(Reply::RedirectTo(format!(
        "http://127.0.0.2:{refused_port}/"
    )));
    let to_metadata = HttpServer::start(Reply::RedirectTo(
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ));
    let config = format!(
        "agent:\n  id: refusals\naggregators: []\nmodules:\n  http_2xx:\n    prober: http\n    timeout: 3s\n  tcp_connect:\n    prober: tcp\n    timeout: 3s\n  secret:\n    prober: tcp\nprobe_endpoint:\n  enabled: true\n  allowed_targets: [\"127.0.0.1:{}\", \"127.0.0.1:{}\", \"10.0.0.0/8:*\"]\n  allowed_modules: [http_2xx, tcp_connect]\n",
        to_refused.port, to_metadata.port
    );
    let agent = start_agent(&mut scene, "sonde-agent", &config);

    let forbidden = |module: &str, target: &str, why: &str| {
        let (status, body) =
            http_get(&format!("{agent}/probe?module={module}&target={target}")).unwrap();
        assert_eq!(status, 403, "{module} {target}: {body}");
        assert!(body.contains(why), "{module} {target}: {body}");
    };
    forbidden(
        "tcp_connect",
        &format!("127.0.0.2:{refused_port}"),
        "matches no pattern of probe_endpoint.allowed_targets",
    );
    forbidden(
        "http_2xx",
        &format!("http://127.0.0.2:{refused_port}/"),
        "matches no pattern",
    );
    forbidden(
        "http_2xx",
        "http://169.254.169.254/latest/meta-data/",
        "metadata",
    );
    forbidden(
        "secret",
        &format!("127.0.0.1:{}", to_refused.port),
        "allowed_modules",
    );
    // A redirect from an allowed target to a refused one: refused at the hop, before
    // connecting there.
    forbidden(
        "http_2xx",
        &format!("http://127.0.0.1:{}/", to_refused.port),
        "matches no pattern",
    );
    forbidden(
        "http_2xx",
        &format!("http://127.0.0.1:{}/", to_metadata.port),
        "169.254.169.254",
    );
    assert_eq!(to_refused.requests.load(Ordering::SeqCst), 1);
    // The refused server never saw a connection.
    match refused.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the refused server was connected to: {other:?}"),
    }
    // An allowed target is still probed.
    let (status, body) = http_get(&format!(
        "{agent}/probe?module=tcp_connect&target=127.0.0.1:{}",
        to_refused.port
    ))
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("probe_success 1"), "{body}");
}

/// CPU time (user and system, all threads) a process has used, from /proc/<pid>/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime and stime fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Polls `url` every 20 ms from a thread of its own until dropped: the slowest answer
/// (a failure counts as the time it took).
struct Poller {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Duration, usize)>>,
}

impl Poller {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut slowest, mut answers) = (Duration::ZERO, 0);
            while !stopped.load(Ordering::SeqCst) {
                let started = Instant::now();
                if let Ok((200, _)) = http_get(&url) {
                    answers += 1;
                }
                slowest = slowest.max(started.elapsed());
                std::thread::sleep(Duration::from_millis(20));
            }
            (slowest, answers)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// (the slowest answer, how many 200s came).
    fn finish(mut self) -> (Duration, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_brotli_bomb_costs_its_deadline_and_holds_no_thread() {
    let mut scene = Scene::new("brotli-bomb");
    let bomb = HttpServer::start(Reply::BrotliBomb);
    let fine = HttpServer::start(Reply::Ok);
    // One agent runs the bomb as a scheduled check beside 39 others on its probing
    // thread; another serves it through /probe, on its web thread.
    const BESIDE: usize = 39;
    let beside: Vec<String> = (0..BESIDE)
        .map(|i| format!("\"{}\"", fine.url(&format!("/{i}"))))
        .collect();
    let scheduled = start_agent(
        &mut scene,
        "scheduled",
        &format!(
            "agent:\n  id: scheduled\naggregators: []\nmodules:\n  http_br:\n    prober: http\n    http:\n      compression: br\n  http_2xx:\n    prober: http\njobs:\n  - job_name: bomb\n    module: http_br\n    interval: 2s\n    timeout: 1500ms\n    static_configs: [{{targets: [\"{}\"]}}]\n  - job_name: beside\n    module: http_2xx\n    interval: 1s\n    timeout: 900ms\n    static_configs: [{{targets: [{}]}}]\n",
            bomb.url("/"),
            beside.join(", ")
        ),
    );
    let web = start_agent(
        &mut scene,
        "web",
        "agent:\n  id: web\naggregators: []\nmodules:\n  http_br:\n    prober: http\n    timeout: 1500ms\n    http:\n      compression: br\nprobe_endpoint:\n  enabled: true\n  allowed_targets: [\"127.0.0.1:*\"]\n",
    );
    let web_pid = scene.process("web").pid();

    let count = |name: &str, job: &str| metric_sum(&scheduled, name, &[("job", job)]);
    let skipped = || metric_sum(&scheduled, "sonde_agent_probes_skipped_total", &[]);
    scene.wait_until(
        "every check beside the bomb has run",
        Duration::from_secs(20),
        || match count("sonde_agent_probes_total", "beside")? {
            n if n >= BESIDE as f64 => Ok(()),
            n => Err(format!("{n} probes")),
        },
    );
    let window = Instant::now();
    let beside_before = count("sonde_agent_probes_total", "beside").unwrap();
    let beside_failed_before = count("sonde_agent_probe_failures_total", "beside").unwrap();
    let bomb_before = count("sonde_agent_probes_total", "bomb").unwrap_or(0.0);
    let bomb_failed_before = count("sonde_agent_probe_failures_total", "bomb").unwrap_or(0.0);
    let skipped_before = skipped().unwrap();

    // Through /probe, twice, while /-/healthy is asked every 20 ms.
    let healthy = Poller::start(format!("{web}/-/healthy"));
    let deadline = Duration::from_millis(1500);
    for _ in 0..2 {
        let cpu_before = cpu_time(web_pid);
        let started = Instant::now();
        let answer = http_get(&format!(
            "{web}/probe?module=http_br&target={}",
            bomb.url("/")
        ));
        let (took, cpu) = (started.elapsed(), cpu_time(web_pid) - cpu_before);
        eprintln!("brotli bomb through /probe: {took:?} wall, {cpu:?} of the agent's CPU");
        let (status, body) = answer.unwrap_or_else(|e| panic!("/probe after {took:?}: {e}"));
        let p = Probe { status, body, took };
        assert_fails(&p, "timeout", deadline);
        assert!(took < deadline + Duration::from_secs(1), "took {took:?}");
        assert!(
            cpu < deadline + Duration::from_millis(500),
            "{cpu:?} of CPU"
        );
        // It was decompressing until the deadline: the count is of the output so far.
        let length = p.value("probe_http_uncompressed_body_length").unwrap();
        assert!(length > 16.0 * 1048576.0, "{length}");
    }
    let (slowest, answers) = healthy.finish();
    eprintln!("/-/healthy meanwhile: {answers} answers, the slowest in {slowest:?}");
    assert!(answers >= 20, "{answers} answers from /-/healthy");
    assert!(
        slowest < Duration::from_secs(1),
        "/-/healthy took {slowest:?}"
    );

    // The scheduled side, over at least 6 s: the bomb failed at each of its slots, and
    // the checks beside it ran at each of theirs, none skipped, none failed.
    if let Some(rest) = Duration::from_secs(6).checked_sub(window.elapsed()) {
        std::thread::sleep(rest);
    }
    let seconds = window.elapsed().as_secs_f64();
    let beside_ran = count("sonde_agent_probes_total", "beside").unwrap() - beside_before;
    let beside_failed =
        count("sonde_agent_probe_failures_total", "beside").unwrap() - beside_failed_before;
    let bomb_ran = count("sonde_agent_probes_total", "bomb").unwrap_or(0.0) - bomb_before;
    let bomb_failed =
        count("sonde_agent_probe_failures_total", "bomb").unwrap_or(0.0) - bomb_failed_before;
    let skipped = skipped().unwrap() - skipped_before;
    eprintln!(
        "in {seconds:.1} s: {beside_ran} probes beside the bomb ({beside_failed} failed), {bomb_ran} of the bomb ({bomb_failed} failed), {skipped} slots skipped"
    );
    assert_eq!(skipped, 0.0, "slots skipped beside the bomb");
    assert_eq!(beside_failed, 0.0, "probes beside the bomb failed");
    assert!(
        beside_ran >= BESIDE as f64 * (seconds - 2.0),
        "{beside_ran} probes beside the bomb in {seconds:.1} s"
    );
    assert!(bomb_ran >= 2.0, "{bomb_ran} probes of the bomb");
    assert_eq!(bomb_failed, bomb_ran, "every probe of the bomb fails");
    scene.check_running().unwrap();
}

#[test]
fn credentials_never_follow_a_redirect_to_another_host() {
    let mut scene = Scene::new("redirect-credentials");
    let elsewhere = Ipv4Addr::new(127, 0, 0, 2);
    // Another host (127.0.0.2); the target's host on another port; the target, which
    // redirects to each, or to itself; and a round trip through the other host back
    // to the target's.
    let other_host = HttpServer::start_on(elsewhere, Reply::Ok);
    let other_port = HttpServer::start(Reply::Ok);
    let to_other_host = HttpServer::start(Reply::RedirectTo(other_host.url("/landing")));
    let to_other_port = HttpServer::start(Reply::RedirectTo(other_port.url("/landing")));
    let to_itself = HttpServer::start(Reply::RedirectTo("/landing".to_string()));
    let back_home = HttpServer::start_on(elsewhere, Reply::RedirectTo(other_port.url("/landing")));
    let away_and_back = HttpServer::start(Reply::RedirectTo(back_home.url("/")));

    let token_file = scene.dir().write("bearer.token", "s3cret-bearer-file\n");
    let modules = [
        (
            "basic_auth",
            "basic_auth: {username: prober, password: s3cret-basic}".to_string(),
        ),
        (
            "authorization",
            "authorization: {type: Bearer, credentials: s3cret-authorization}".to_string(),
        ),
        (
            "bearer_token_file",
            format!("bearer_token_file: {}", token_file.display()),
        ),
        (
            "headers",
            "headers: {Authorization: Token s3cret-header}".to_string(),
        ),
    ];
    let mut config = "agent:\n  id: credentials\naggregators: []\nmodules:\n".to_string();
    for (name, http) in &modules {
        config.push_str(&format!(
            "  {name}:\n    prober: http\n    timeout: 3s\n    http:\n      {http}\n"
        ));
    }
    config.push_str(
        "probe_endpoint:\n  enabled: true\n  allowed_targets: [\"127.0.0.1:*\", \"127.0.0.2:*\"]\n",
    );
    let agent = start_agent(&mut scene, "sonde-agent", &config);

    for (module, _) in &modules {
        // Probes `first` and returns the request heads each server in `seen` got.
        let follow = |first: &HttpServer, seen: &[&HttpServer]| -> Vec<Vec<String>> {
            let before: Vec<usize> = seen.iter().map(|s| s.heads().len()).collect();
            let p = probe(&agent, module, &first.url("/start"));
            assert_eq!(p.value("probe_success"), Some(1.0), "{module}: {}", p.body);
            seen.iter()
                .zip(before)
                .map(|(s, n)| s.heads()[n..].to_vec())
                .collect()
        };
        let authorized = |heads: &[String]| -> Vec<bool> {
            heads.iter().map(|h| authorization(h).is_some()).collect()
        };
        // A redirect to itself, or to its own host on another port (Go compares host
        // names): the credentials go along.
        let heads = follow(&to_itself, &[&to_itself]);
        assert_eq!(authorized(&heads[0]), [true, true], "{module}: {heads:?}");
        let heads = follow(&to_other_port, &[&to_other_port, &other_port]);
        assert_eq!(authorized(&heads[0]), [true], "{module}: {heads:?}");
        assert_eq!(authorized(&heads[1]), [true], "{module}: {heads:?}");
        // To another host: the target had them, the other host never sees them.
        let heads = follow(&to_other_host, &[&to_other_host, &other_host]);
        assert_eq!(authorized(&heads[0]), [true], "{module}: {heads:?}");
        assert_eq!(authorized(&heads[1]), [false], "{module}: {heads:?}");
        // Nor does the target's host once the chain has left it.
        let heads = follow(&away_and_back, &[&away_and_back, &back_home, &other_port]);
        assert_eq!(authorized(&heads[0]), [true], "{module}: {heads:?}");
        assert_eq!(authorized(&heads[1]), [false], "{module}: {heads:?}");
        assert_eq!(authorized(&heads[2]), [false], "{module}: {heads:?}");
    }
    // And no secret reached the other host in any other header.
    for head in other_host.heads().iter().chain(back_home.heads().iter()) {
        assert!(!head.contains("s3cret"), "{head}");
        assert_eq!(authorization(head), None, "{head}");
    }
    scene.check_running().unwrap();
}

/// The Authorization header of a request head, if any.
fn authorization(head: &str) -> Option<&str> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim())
    })
}

// ---------------------------------------------------------------------------------------
// Hostile servers

enum Reply {
    /// `Content-Length: 10737418240`, then zeros for as long as the client reads.
    HugeBody,
    /// A valid response, one byte per second.
    OneBytePerSecond,
    /// `302 Location: /loop` forever.
    RedirectLoop,
    /// `Content-Encoding: gzip` and an endless deflate stream of zeros (158:1).
    GzipBomb,
    /// `Content-Encoding: br` and 57 KB of brotli that stand for 64 GiB of zeros.
    BrotliBomb,
    /// `302 Location: <this>`, except for `/landing`, which answers 200.
    RedirectTo(String),
    /// 200 `ok`.
    Ok,
}

struct HttpServer {
    ip: IpAddr,
    port: u16,
    sent: Arc<AtomicU64>,
    requests: Arc<AtomicUsize>,
    /// Every request head received, in order.
    heads: Arc<Mutex<Vec<String>>>,
}

impl HttpServer {
    fn start(reply: Reply) -> Self {
        Self::start_on(Ipv4Addr::LOCALHOST, reply)
    }

    fn start_on(ip: Ipv4Addr, reply: Reply) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let reply = Arc::new(reply);
        let (s, r, h) = (sent.clone(), requests.clone(), heads.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (reply, sent, requests, heads) =
                    (reply.clone(), s.clone(), r.clone(), h.clone());
                std::thread::spawn(move || {
                    if let Some(head) = read_head(&stream) {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let path = head.split(' ').nth(1).unwrap_or("").to_string();
                        heads.lock().unwrap().push(head);
                        serve(stream, &reply, &path, &sent);
                    }
                });
            }
        });
        Self {
            ip: ip.into(),
            port,
            sent,
            requests,
            heads,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.ip, self.port)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Reads a request head (bounded), when one arrived.
fn read_head(mut stream: &TcpStream) -> Option<String> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

fn serve(mut stream: TcpStream, reply: &Reply, path: &str, sent: &AtomicU64) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    match reply {
        Reply::HugeBody => {
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 10737418240\r\n\r\n",
            );
            let chunk = vec![0u8; 64 * 1024];
            let mut left: u64 = 10 << 30;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if stream.write_all(&chunk[..n]).is_err() {
                    return;
                }
                left -= n as u64;
                sent.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
        Reply::OneBytePerSecond => {
            for b in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" {
                if stream.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Reply::RedirectLoop => {
            let _ = stream.write_all(
                b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        Reply::Ok => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
        Reply::RedirectTo(_) if path == "/landing" => serve(stream, &Reply::Ok, path, sent),
        Reply::RedirectTo(location) => {
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            );
        }
        Reply::BrotliBomb => {
            let (head, unit, end) = brotli_zeros();
            let mut body = head;
            for _ in 0..4096 {
                body.extend_from_slice(&unit);
            }
            body.extend_from_slice(&end);
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            if stream.write_all(&body).is_ok() {
                sent.fetch_add(body.len() as u64, Ordering::SeqCst);
            }
        }
        Reply::GzipBomb => {
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
            );
            let (head, period) = deflate_zeros();
            let mut gzip = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
            gzip.extend_from_slice(&head);
            if stream.write_all(&gzip).is_err() {
                return;
            }
            let block = period.repeat(5000);
            loop {
                if stream.write_all(&block).is_err() {
                    return;
                }
                sent.fetch_add(block.len() as u64, Ordering::SeqCst);
            }
        }
    }
}

/// An endless DEFLATE stream of zeros: one fixed-Huffman block holding a literal 0 and
/// then copies of 258 bytes at distance 1, forever (13 bits per 258 bytes). Eight copies
/// are 104 bits, a whole number of bytes, so past its first two bytes the stream repeats
/// every 13 bytes: returns (the first two bytes, the 13-byte period).
fn deflate_zeros() -> (Vec<u8>, Vec<u8>) {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, value: u32, count: u32) {
            for i in 0..count {
                self.acc |= ((value >> i) & 1) << self.n;
                self.n += 1;
                if self.n == 8 {
                    self.out.push(self.acc as u8);
                    self.acc = 0;
                    self.n = 0;
                }
            }
        }
        /// Huffman codes go most significant bit first.
        fn code(&mut self, code: u32, len: u32) {
            for i in (0..len).rev() {
                self.put((code >> i) & 1, 1);
            }
        }
    }
    let mut bits = Bits {
        out: Vec::new(),
        acc: 0,
        n: 0,
    };
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE = 01, fixed Huffman
    bits.code(0b0011_0000, 8); // literal 0
    for _ in 0..8 * 3 {
        bits.code(0b1100_0101, 8); // length 258 (code 285)
        bits.code(0, 5); // distance 1
    }
    let bytes = bits.out;
    assert_eq!(bytes[2..15], bytes[15..28], "the stream is periodic");
    (bytes[..2].to_vec(), bytes[2..15].to_vec())
}

/// A brotli stream of zeros in 16 MiB meta-blocks, 14 bytes each: returns (the stream
/// header, one meta-block, the end). Each meta-block is one command (a literal 0, then
/// a copy of 16 MiB - 1 at distance 1) under prefix codes of one symbol, which take no
/// bits; an empty metadata block after each aligns the next to a byte, so that the
/// meta-block can be repeated as it is. RFC 7932, sections 9.1 to 9.3.
fn brotli_zeros() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    #[derive(Default)]
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        /// Least significant bit first.
        fn put(&mut self, value: u64, count: u32) {
            for i in 0..count {
                self.acc |= ((value >> i) & 1) << self.n;
                self.n += 1;
                if self.n == 8 {
                    self.out.push(self.acc as u8);
                    (self.acc, self.n) = (0, 0);
                }
            }
        }
        /// ISLAST 0, MNIBBLES 0 (metadata), reserved, MSKIPBYTES 0; then to a byte.
        fn empty_metadata(mut self) -> Vec<u8> {
            self.put(0b0110, 6);
            if self.n > 0 {
                self.put(0, 8 - self.n);
            }
            self.out
        }
    }
    const UNIT: u64 = 1 << 24;
    let mut head = Bits::default();
    head.put(0, 1); // WBITS: a 64 KiB window
    let mut unit = Bits::default();
    unit.put(0, 1); // ISLAST
    unit.put(2, 2); // MNIBBLES: 6
    unit.put(UNIT - 1, 24); // MLEN - 1
    unit.put(0, 1); // ISUNCOMPRESSED
    unit.put(0, 3); // one block type for literals, commands and distances
    unit.put(0, 6); // NPOSTFIX, NDIRECT
    unit.put(0, 2); // the literal context mode
    unit.put(0, 2); // one literal and one distance prefix code
    // Simple prefix codes of one symbol: literal 0; command 399 (insert code 1: one
    // literal; copy code 23: 2118 + 24 extra bits); distance code 16 (1 + 1 extra bit).
    for (symbol, width) in [(0, 8), (399, 10), (16, 6)] {
        unit.put(1, 2);
        unit.put(0, 2);
        unit.put(symbol, width);
    }
    unit.put(UNIT - 1 - 2118, 24);
    unit.put(0, 1);
    // ISLAST, ISLASTEMPTY.
    (head.empty_metadata(), unit.empty_metadata(), vec![0b11])
}

/// UDP: answers with our id and then nonsense (a header claiming records that are not
/// there, and junk).
fn garbage_dns_udp() -> u16 {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = socket.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            if n < 2 {
                continue;
            }
            let mut reply = buf[..2].to_vec();
            reply.extend_from_slice(&[0x81, 0x80, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 0]);
            reply.extend((0..400u32).map(|i| (i * 37 % 251) as u8));
            let _ = socket.send_to(&reply, peer);
        }
    });
    port
}

/// TCP: a length prefix promising 65535 bytes, a few bytes of junk, then the connection
/// closes.
fn garbage_dns_tcp() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut query = [0u8; 512];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = stream.read(&mut query);
            let _ = stream.write_all(&[0xff, 0xff, query[2], query[3], 0xde, 0xad, 0xbe, 0xef]);
        }
    });
    port
}
