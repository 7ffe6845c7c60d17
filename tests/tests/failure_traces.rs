//! What the agent saw, against real processes in network
//! namespaces the test builds:
//!
//! ```text
//!  agent ns: sonde-agent, sonde-aggregator, dnsmasq   10.201.1.2 ── 10.201.1.1  router ns
//!  target ns: nginx on 10.201.2.2 (+ .3, and 10.201.3.2)  10.201.2.2 ── 10.201.2.1  (forwards)
//! ```
//!
//! Targets break in each way (a name without an address, a refused port, a certificate
//! the agent does not trust, HTTP 500, a body that fails its regexp, a route the router
//! drops) and the test finds the matching trace in `/api/v1/targets` and on the
//! per-target page; the dropped route's path ends at the router. A `per_address` module
//! probes both addresses of one name: per-agent series with an `ip` label, one `up`.

use serde_json::Value;
use sonde_tests::{Netns, Scene, start_agent_in, start_aggregator_in};
use std::process::Command;
use std::time::Duration;

const AGENT_ADDR: &str = "10.201.1.2";
const ROUTER_AGENT_SIDE: &str = "10.201.1.1";
const ROUTER_TARGET_SIDE: &str = "10.201.2.1";
const TARGET_ADDR: &str = "10.201.2.2";
/// A second address of the target host where nothing listens (per_address).
const TARGET_SILENT: &str = "10.201.2.3";
/// The address behind the route the router drops.
const FAR_ADDR: &str = "10.201.3.2";

/// The three namespaces and the links between them; everything is deleted on drop.
struct Topology {
    agent: Netns,
    router: Netns,
    target: Netns,
}

impl Topology {
    fn build() -> Self {
        let agent = Netns::new("tr-agent");
        let router = Netns::new("tr-router");
        let target = Netns::new("tr-target");
        // Interface names are per namespace; made in the agent's, then moved.
        agent.exec(&[
            "ip", "link", "add", "a0", "type", "veth", "peer", "name", "r0",
        ]);
        agent.exec(&["ip", "link", "set", "r0", "netns", router.name()]);
        router.exec(&[
            "ip", "link", "add", "r1", "type", "veth", "peer", "name", "t0",
        ]);
        router.exec(&["ip", "link", "set", "t0", "netns", target.name()]);
        let a = format!("{AGENT_ADDR}/24");
        agent.exec(&["ip", "addr", "add", &a, "dev", "a0"]);
        agent.exec(&["ip", "link", "set", "a0", "up"]);
        agent.exec(&["ip", "route", "add", "default", "via", ROUTER_AGENT_SIDE]);
        let r0 = format!("{ROUTER_AGENT_SIDE}/24");
        let r1 = format!("{ROUTER_TARGET_SIDE}/24");
        router.exec(&["ip", "addr", "add", &r0, "dev", "r0"]);
        router.exec(&["ip", "addr", "add", &r1, "dev", "r1"]);
        router.exec(&["ip", "link", "set", "r0", "up"]);
        router.exec(&["ip", "link", "set", "r1", "up"]);
        router.exec(&["ip", "route", "add", "10.201.3.0/24", "via", TARGET_ADDR]);
        router.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        // Every ICMP error the test expects, not one per second per peer.
        router.exec(&["sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0"]);
        target.exec(&["sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0"]);
        for addr in [TARGET_ADDR, TARGET_SILENT] {
            let a = format!("{addr}/24");
            target.exec(&["ip", "addr", "add", &a, "dev", "t0"]);
        }
        let far = format!("{FAR_ADDR}/32");
        target.exec(&["ip", "addr", "add", &far, "dev", "lo"]);
        target.exec(&["ip", "link", "set", "t0", "up"]);
        target.exec(&["ip", "route", "add", "default", "via", ROUTER_TARGET_SIDE]);
        Self {
            agent,
            router,
            target,
        }
    }
}

/// nginx in the target namespace: `/` 200 "ok", `/error` 500, `/body` 200 with a page
/// that fails `^ok`; the same over HTTPS with a self-signed certificate.
fn start_target_nginx(scene: &mut Scene, ns: &Netns) {
    let nginx = sonde_tests::require_tool("nginx", "nginx-light");
    let openssl = sonde_tests::require_tool("openssl", "openssl");
    let dir = scene.dir().join("nginx");
    std::fs::create_dir_all(&dir).expect("create nginx dir");
    let (cert, key) = (dir.join("self.pem"), dir.join("self.key"));
    let made = Command::new(openssl)
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:P-256")
        .args(["-nodes", "-days", "2", "-subj", "/CN=ok.sonde.test"])
        .args(["-addext", "subjectAltName=DNS:ok.sonde.test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let locations = r#"location = / { return 200 "ok\n"; }
        location = /error { return 500 "broken\n"; }
        location = /body { default_type text/html; return 200 "<html>maintenance window</html>\n"; }"#;
    let servers = format!(
        r#"    server {{
        listen {TARGET_ADDR}:80;
        listen {FAR_ADDR}:80;
        {locations}
    }}
    server {{
        listen {TARGET_ADDR}:443 ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        {locations}
    }}
"#,
        cert = cert.display(),
        key = key.display(),
    );
    let config = sonde_tests::nginx_config(&dir, &servers);
    let path = scene.dir().write("nginx/nginx.conf", &config);
    let mut cmd = ns.command(nginx);
    cmd.arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(&dir)
        .args(["-e", "stderr"]);
    scene.spawn("nginx", cmd);
}

/// dnsmasq in the agent namespace on 127.0.0.1:53, the namespace's resolver:
/// `ok.sonde.test` is the target, `multi.sonde.test` has two addresses, every other
/// name under `sonde.test` has none.
fn start_resolver(scene: &mut Scene, ns: &Netns) {
    let dnsmasq = sonde_tests::require_tool("dnsmasq", "dnsmasq-base");
    let hosts = scene.dir().write(
        "dns/hosts",
        &format!(
            "{TARGET_ADDR} ok.sonde.test\n{TARGET_ADDR} multi.sonde.test\n{TARGET_SILENT} multi.sonde.test\n"
        ),
    );
    let mut cmd = ns.command(dnsmasq);
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--conf-file=/dev/null",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--port=53",
        "--local=/sonde.test/",
        "--log-facility=-",
        "--log-queries",
    ])
    .arg(format!("--addn-hosts={}", hosts.display()))
    .arg(format!(
        "--pid-file={}",
        scene.dir().join("dns/dnsmasq.pid").display()
    ));
    ns.set_nameserver("127.0.0.1");
    scene.spawn("dnsmasq", cmd);
}

const JOBS: &[(&str, &str, &str)] = &[
    ("no_dns", "http_2xx", "http://gone.sonde.test/"),
    ("refused", "http_2xx", "http://ok.sonde.test:81/"),
    ("tls", "http_2xx", "https://ok.sonde.test/"),
    ("http_500", "http_2xx", "http://ok.sonde.test/error"),
    ("regexp", "http_ok_body", "http://ok.sonde.test/body"),
    ("route", "http_2xx", "http://10.201.3.2/"),
    (
        "each_ip_all",
        "http_each_ip_all",
        "http://multi.sonde.test/",
    ),
    (
        "each_ip_any",
        "http_each_ip_any",
        "http://multi.sonde.test/",
    ),
];

fn aggregator_config() -> String {
    let mut jobs = String::new();
    for (job, module, target) in JOBS {
        jobs.push_str(&format!(
            "  - job_name: {job}\n    module: {module}\n    static_configs: [{{targets: [\"{target}\"]}}]\n"
        ));
    }
    format!(
        r#"global: {{scrape_interval: 2s, scrape_timeout: 1500ms}}
modules:
  http_2xx: {{prober: http, http: {{preferred_ip_protocol: ip4}}}}
  http_ok_body:
    prober: http
    http: {{preferred_ip_protocol: ip4, fail_if_body_not_matches_regexp: ["^ok"]}}
  http_each_ip_all:
    prober: http
    http: {{preferred_ip_protocol: ip4, ip_protocol_fallback: false}}
    per_address: {{max_addresses: 4, must_succeed: all}}
  http_each_ip_any:
    prober: http
    http: {{preferred_ip_protocol: ip4, ip_protocol_fallback: false}}
    per_address: {{must_succeed: any}}
jobs:
{jobs}"#
    )
}

/// The view of the only agent of `job`'s target in `/api/v1/targets`.
fn view(ns: &Netns, web: &str, job: &str) -> Result<Value, String> {
    let (status, body) = ns.http_get(&format!("{web}/api/v1/targets"))?;
    if status != 200 {
        return Err(format!("/api/v1/targets: {status}"));
    }
    let all: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let target = all["data"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["job"] == job))
        .ok_or_else(|| format!("no target of job {job}"))?;
    target["views"][0]
        .as_object()
        .map(|v| Value::Object(v.clone()))
        .ok_or_else(|| format!("no view of job {job} yet"))
}

/// The steps of a failing view's trace, once it has one.
fn failed_steps(ns: &Netns, web: &str, job: &str) -> Result<Vec<Value>, String> {
    let v = view(ns, web, job)?;
    if v["success"] != false {
        return Err(format!("{job} has not failed yet: {v}"));
    }
    v["trace"]["steps"]
        .as_array()
        .cloned()
        .ok_or_else(|| format!("{job}: no trace in {v}"))
}

fn target_page(ns: &Netns, web: &str, job: &str, instance: &str) -> String {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let url = format!("{web}/target?job={}&instance={}", enc(job), enc(instance));
    match ns.http_get(&url) {
        Ok((200, body)) => body,
        other => panic!("GET {url}: {other:?}"),
    }
}

fn kind<'a>(steps: &'a [Value], kind: &str) -> Option<&'a Value> {
    steps.iter().find(|s| s["kind"] == kind)
}

#[test]
fn each_broken_target_shows_what_the_agent_saw() {
    let mut scene = Scene::new("failure-traces");
    let net = Topology::build();
    start_target_nginx(&mut scene, &net.target);
    start_resolver(&mut scene, &net.agent);
    let agg = start_aggregator_in(
        &mut scene,
        Some(&net.agent),
        "aggregator",
        &aggregator_config(),
    );
    start_agent_in(
        &mut scene,
        Some(&net.agent),
        "agent",
        &format!(
            "agent: {{id: edge-1}}\naggregators: [{{address: \"{}\"}}]\n",
            agg.grpc
        ),
    );
    let (ns, web) = (&net.agent, agg.web.as_str());
    let wait = Duration::from_secs(60);

    // The route works first: the path to it is fine.
    scene.wait_until("the far target to be up", wait, || {
        match view(ns, web, "route")?["success"].as_bool() {
            Some(true) => Ok(()),
            other => Err(format!("success {other:?}")),
        }
    });

    let steps = scene.wait_until("no_dns's trace", wait, || failed_steps(ns, web, "no_dns"));
    let dns = kind(&steps, "dns").expect("a dns step");
    assert_eq!(dns["name"], "gone.sonde.test");
    assert_eq!(dns["addresses"], serde_json::json!([]));
    assert!(
        dns["error"].as_str().unwrap().contains("no address"),
        "{dns}"
    );
    assert!(
        kind(&steps, "connect").is_none(),
        "nothing to connect to: {steps:?}"
    );

    let steps = scene.wait_until("refused's trace", wait, || failed_steps(ns, web, "refused"));
    assert_eq!(kind(&steps, "dns").unwrap()["addresses"][0], TARGET_ADDR);
    let connect = kind(&steps, "connect").expect("a connect step");
    assert_eq!(connect["address"], format!("{TARGET_ADDR}:81"));
    assert_eq!(connect["ok"], false);
    assert_eq!(connect["error"], "connection refused");

    let steps = scene.wait_until("tls's trace", wait, || failed_steps(ns, web, "tls"));
    assert_eq!(kind(&steps, "connect").unwrap()["ok"], true);
    let tls = kind(&steps, "tls").expect("a tls step");
    assert!(
        tls["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid peer certificate"),
        "the self-signed certificate is not trusted: {tls}"
    );

    let steps = scene.wait_until("http_500's trace", wait, || {
        failed_steps(ns, web, "http_500")
    });
    assert_eq!(
        kind(&steps, "http_status").unwrap()["line"],
        "HTTP/1.1 500 Internal Server Error"
    );

    let steps = scene.wait_until("regexp's trace", wait, || failed_steps(ns, web, "regexp"));
    assert_eq!(
        kind(&steps, "http_status").unwrap()["line"],
        "HTTP/1.1 200 OK"
    );
    let body = kind(&steps, "body").expect("a body step");
    assert_eq!(body["regexp"], "^ok");
    assert_eq!(body["excerpt"], "<html>maintenance window</html>\\n");

    // The router loses its route to the far network: it answers "net unreachable".
    net.router
        .exec(&["ip", "route", "del", "10.201.3.0/24", "via", TARGET_ADDR]);
    let route = scene.wait_until("route's trace with its path", wait, || {
        let v = view(ns, web, "route")?;
        match (&v["success"], v["trace"]["path"].is_object()) {
            (Value::Bool(false), true) => Ok(v),
            _ => Err(format!("not failed with a path yet: {v}")),
        }
    });
    let steps = route["trace"]["steps"].as_array().unwrap();
    let connect = kind(steps, "connect").unwrap();
    assert_eq!(connect["address"], format!("{FAR_ADDR}:80"));
    assert_eq!(connect["ok"], false);
    let path = &route["trace"]["path"];
    println!("the dropped route's path: {path}");
    assert_eq!(path["destination"], FAR_ADDR);
    assert_eq!(path["reached"], false);
    let hops = path["hops"].as_array().unwrap();
    let last = hops.iter().rev().find(|h| !h["address"].is_null()).unwrap();
    assert_eq!(
        last["address"], ROUTER_AGENT_SIDE,
        "the path ends at the router that dropped the route: {path}"
    );
    assert_eq!(last["icmp"], "net unreachable", "{path}");
    assert_eq!(hops[0]["address"], ROUTER_AGENT_SIDE, "{path}");

    // The same on the per-target pages, escaped where the agent's text could inject.
    let page = target_page(ns, web, "no_dns", "http://gone.sonde.test/");
    assert!(page.contains(r#"data-kind="dns""#) && page.contains("no address"));
    let page = target_page(ns, web, "refused", "http://ok.sonde.test:81/");
    assert!(page.contains("10.201.2.2:81: connection refused"), "{page}");
    let page = target_page(ns, web, "tls", "https://ok.sonde.test/");
    assert!(page.contains(r#"data-kind="tls""#) && page.contains("invalid peer certificate"));
    let page = target_page(ns, web, "http_500", "http://ok.sonde.test/error");
    assert!(
        page.contains("HTTP/1.1 500 Internal Server Error"),
        "{page}"
    );
    let page = target_page(ns, web, "regexp", "http://ok.sonde.test/body");
    assert!(
        page.contains("&quot;&lt;html&gt;maintenance window&lt;/html&gt;\\n&quot;"),
        "the body excerpt, escaped: {page}"
    );
    assert!(!page.contains("<html>maintenance"), "never raw: {page}");
    let page = target_page(ns, web, "route", "http://10.201.3.2/");
    let last_row = page
        .split(r#"data-last="true">"#)
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no last hop on the page: {page}"));
    assert!(
        last_row.contains(&format!("<td>{ROUTER_AGENT_SIDE}</td>")),
        "the path's last hop is the router: {last_row}"
    );

    // per_address: one address answers, one refuses.
    let each_all = scene.wait_until("each_ip_all to fail", wait, || {
        let v = view(ns, web, "each_ip_all")?;
        match v["success"] {
            Value::Bool(false) => Ok(v),
            _ => Err(format!("{v}")),
        }
    });
    assert!(
        each_all["failure"]
            .as_str()
            .unwrap()
            .starts_with("1 of 2 addresses succeeded, per_address.must_succeed is all"),
        "{each_all}"
    );
    let connect = kind(each_all["trace"]["steps"].as_array().unwrap(), "connect").unwrap();
    assert_eq!(connect["address"], format!("{TARGET_SILENT}:80"));
    scene.wait_until("each_ip_any to succeed", wait, || {
        match view(ns, web, "each_ip_any")?["success"] {
            Value::Bool(true) => Ok(()),
            ref other => Err(format!("{other}")),
        }
    });
    let (_, metrics) = ns.http_get(&format!("{web}/metrics")).unwrap();
    for job in ["each_ip_all", "each_ip_any"] {
        let line = |name: &str, ip: &str| {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!("{name}{{"))
                        && l.contains(&format!("job=\"{job}\""))
                        && l.contains(&format!("ip=\"{ip}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(line("probe_success", TARGET_ADDR).as_deref(), Some("1"));
        assert_eq!(line("probe_success", TARGET_SILENT).as_deref(), Some("0"));
        let ups: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("up{") && l.contains(&format!("job=\"{job}\"")))
            .collect();
        assert_eq!(ups.len(), 1, "one up per target: {ups:?}");
    }
    assert!(
        metrics.lines().any(|l| l.starts_with("up{")
            && l.contains("job=\"each_ip_any\"")
            && l.ends_with(" 1")),
        "any: one address is enough"
    );
}
