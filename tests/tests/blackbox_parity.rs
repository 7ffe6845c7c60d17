//! sonde-agent's `/probe` side by side with Debian's prometheus-blackbox-exporter: the same
//! blackbox.yml `modules:` section loaded by both, the same real targets (nginx over HTTP,
//! HTTPS with HTTP/2, gzip, a self-signed and an expired certificate, SMTP with STARTTLS
//! and a DNS-over-TLS front; dnsmasq; small servers written here), and for every case:
//! - the same `probe_success`, and the one this case is written to expect;
//! - every metric name blackbox_exporter returns is in sonde's answer too;
//! - the same values for the metrics that do not depend on timing (status code,
//!   redirects, TLS, HTTP version, lengths, RR counts, regex failure, certificate expiry,
//!   ...), and the same labels on `probe_tls_version_info` and `probe_ssl_last_chain_info`.
//!
//! Only 127.0.0.1 is used. A missing peer program fails the test, naming its package.

use sonde_tests::parity::{Case, Certs, assert_cases_agree, make_certs, start_blackbox};
use sonde_tests::{
    Scene, dns_query_a, free_port, free_tcp_udp_port, http_get, require_tool, run, start_agent,
};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The expiry of the expired certificate: 2021-01-01T00:00:00Z.
const EXPIRED_NOT_AFTER: f64 = 1_609_459_200.0;

#[test]
fn blackbox_exporter_and_sonde_agent_agree() {
    let mut scene = Scene::new("parity");
    let dir = scene.dir().path().to_path_buf();

    // ---- certificates, made with the openssl CLI
    let certs = make_certs(&dir);

    // ---- peers
    let dns_port = start_dns(&mut scene);
    let servfail_port = servfail_server();
    let line_port = line_server();
    let silent_port = silent_server();
    let closed_port = free_port();
    let nginx = start_nginx_full(&mut scene, &certs, dns_port);

    // ---- the same modules for both
    let modules = modules_yaml(&certs);
    let bb = start_blackbox(&mut scene, &modules);
    let agent_config = format!(
        "agent:\n  id: parity\naggregators: []\n{modules}probe_endpoint:\n  enabled: true\n  allowed_targets: [\"127.0.0.1:*\", \"localhost:*\"]\n"
    );
    let agent = start_agent(&mut scene, "sonde-agent", &agent_config);

    // ---- the cases
    let h = |path: &str| format!("http://127.0.0.1:{}{path}", nginx.http);
    let tls = |port: u16| format!("https://127.0.0.1:{port}/");
    let local = |port: u16| format!("127.0.0.1:{port}");
    let case = |module: &'static str, target: String, success: bool| Case {
        module,
        target,
        success,
    };
    let cases = vec![
        // http: status codes, redirects, methods and bodies
        case("http_2xx", h("/"), true),
        case("http_2xx", h("/missing"), false),
        case("http_404_ok", h("/missing"), true),
        case("http_2xx", h("/redirect"), true),
        case("http_no_follow", h("/redirect"), false),
        case("http_no_follow_302_ok", h("/redirect"), true),
        case("http_post", h("/post"), true),
        case("http_2xx", h("/post"), false),
        // regexes on body and headers
        case("http_body_matches", h("/body"), true),
        case("http_body_forbidden", h("/body"), false),
        case("http_header_matches", h("/headers"), true),
        case("http_header_forbidden", h("/headers"), false),
        case("http_header_missing", h("/body"), false),
        case("http_header_missing_allowed", h("/body"), true),
        // versions, TLS requirements, sizes, compression, credentials
        case("http_v11", h("/"), true),
        case("http_v2_only", h("/"), false),
        case("http_fail_if_not_ssl", h("/"), false),
        case("http_body_size_limit", h("/body"), false),
        case("http_gzip", h("/static/big.txt"), true),
        case("http_basic_auth", h("/basic"), true),
        case("http_2xx", h("/basic"), false),
        case("http_authorization", h("/bearer"), true),
        case(
            "http_2xx",
            format!("http://127.0.0.1:{closed_port}/"),
            false,
        ),
        case(
            "http_2xx_fast",
            format!("http://127.0.0.1:{silent_port}/"),
            false,
        ),
        // https: trusted with HTTP/2, HTTP/1.1 only, self-signed, expired, versions
        case("https_trusted", tls(nginx.https), true),
        case("https_trusted_http1", tls(nginx.https), true),
        case("http_fail_if_ssl", tls(nginx.https), false),
        case("https_tls13", tls(nginx.https), true),
        case("https_tls12", tls(nginx.https), true),
        case("http_2xx", tls(nginx.self_signed), false),
        case("https_insecure", tls(nginx.self_signed), true),
        case("http_2xx", tls(nginx.expired), false),
        case("https_insecure", tls(nginx.expired), true),
        // tcp: connect, TLS, query_response with and without STARTTLS, timeouts
        case("tcp_connect", local(nginx.http), true),
        case("tcp_connect", local(closed_port), false),
        case("tcp_tls", local(nginx.https), true),
        case("tcp_tls", local(nginx.self_signed), false),
        case("tcp_line", local(line_port), true),
        case("tcp_line_closed_early", local(line_port), false),
        case("smtp_starttls", local(nginx.smtp), true),
        case("tcp_expect_silent", local(silent_port), false),
        // dns over UDP, TCP and TLS with the validators, rcodes and record types
        case("dns_a", local(dns_port), true),
        case("dns_a_tcp", local(dns_port), true),
        case("dns_a_dot", local(nginx.dot), true),
        case("dns_validators_pass", local(dns_port), true),
        case("dns_answer_forbidden", local(dns_port), false),
        case("dns_answer_not_matching", local(dns_port), false),
        case("dns_authority_required", local(dns_port), false),
        case("dns_additional_none", local(dns_port), true),
        case("dns_nxdomain", local(dns_port), false),
        case("dns_nxdomain_ok", local(dns_port), true),
        case("dns_a", local(servfail_port), false),
        case("dns_servfail_ok", local(servfail_port), true),
        case("dns_soa", local(dns_port), true),
        case("dns_mx", local(dns_port), true),
        case("dns_txt", local(dns_port), true),
        case("dns_chaos", local(dns_port), true),
        case("dns_no_recursion", local(dns_port), true),
        case("dns_any", local(dns_port), true),
    ];
    assert!(cases.len() >= 30);

    assert_cases_agree(&bb, &agent, &cases, &http_get);

    // The scrape-timeout header bounds the probe on both sides alike: a 1.5 s scrape
    // timeout leaves a 1 s probe for the silent server, far below the module's 3 s.
    let timed = Instant::now();
    let body = get_with_timeout_header(
        &format!("{agent}/probe?module=tcp_expect_silent&target=127.0.0.1:{silent_port}"),
        "1.5",
    );
    let took = timed.elapsed();
    assert!(body.contains("probe_success 0"), "{body}");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert!(
        body.contains("probe_failure_info{reason=\"timeout\"} 1"),
        "{body}"
    );
}

fn get_with_timeout_header(url: &str, seconds: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .header("X-Prometheus-Scrape-Timeout-Seconds", seconds)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    response.body_mut().read_to_string().unwrap()
}

// ---------------------------------------------------------------------------------------
// The modules, in blackbox.yml syntax, loaded verbatim by both exporters

fn modules_yaml(certs: &Certs) -> String {
    let ca = certs.ca.display();
    format!(
        r#"modules:
  http_2xx:
    prober: http
    timeout: 3s
    http:
      preferred_ip_protocol: ip4
  http_2xx_fast:
    prober: http
    timeout: 1s
  http_404_ok:
    prober: http
    timeout: 3s
    http:
      valid_status_codes: [404]
  http_no_follow:
    prober: http
    timeout: 3s
    http:
      follow_redirects: false
  http_no_follow_302_ok:
    prober: http
    timeout: 3s
    http:
      no_follow_redirects: true
      valid_status_codes: [302]
  http_post:
    prober: http
    timeout: 3s
    http:
      method: POST
      headers:
        Content-Type: application/json
      body: '{{"probe": "sonde"}}'
  http_body_matches:
    prober: http
    timeout: 3s
    http:
      fail_if_body_not_matches_regexp: ["hello sonde", "parity body\n$"]
  http_body_forbidden:
    prober: http
    timeout: 3s
    http:
      fail_if_body_matches_regexp: ["par+ity"]
  http_header_matches:
    prober: http
    timeout: 3s
    http:
      fail_if_header_not_matches:
        - header: X-Sonde
          regexp: '^parity$'
  http_header_forbidden:
    prober: http
    timeout: 3s
    http:
      fail_if_header_matches:
        - header: x-sonde
          regexp: 'par'
  http_header_missing:
    prober: http
    timeout: 3s
    http:
      fail_if_header_not_matches:
        - header: X-Sonde
          regexp: '.*'
  http_header_missing_allowed:
    prober: http
    timeout: 3s
    http:
      fail_if_header_matches:
        - header: X-Sonde
          regexp: '.*'
          allow_missing: true
  http_v11:
    prober: http
    timeout: 3s
    http:
      valid_http_versions: ["HTTP/1.1"]
  http_v2_only:
    prober: http
    timeout: 3s
    http:
      valid_http_versions: ["HTTP/2.0"]
  http_fail_if_not_ssl:
    prober: http
    timeout: 3s
    http:
      fail_if_not_ssl: true
  http_fail_if_ssl:
    prober: http
    timeout: 3s
    http:
      fail_if_ssl: true
      tls_config:
        ca_file: {ca}
        server_name: localhost
  http_body_size_limit:
    prober: http
    timeout: 3s
    http:
      body_size_limit: 10B
  http_gzip:
    prober: http
    timeout: 3s
    http:
      compression: gzip
      headers:
        Accept-Encoding: gzip
      fail_if_body_not_matches_regexp: ["^(sonde parity gzip line\n)+$"]
  http_basic_auth:
    prober: http
    timeout: 3s
    http:
      basic_auth:
        username: user
        password: pass
  http_authorization:
    prober: http
    timeout: 3s
    http:
      authorization:
        type: Bearer
        credentials: tok3n
  https_trusted:
    prober: http
    timeout: 3s
    http:
      valid_http_versions: ["HTTP/2.0"]
      fail_if_not_ssl: true
      tls_config:
        ca_file: {ca}
        server_name: localhost
  https_trusted_http1:
    prober: http
    timeout: 3s
    http:
      enable_http2: false
      valid_http_versions: ["HTTP/1.1"]
      tls_config:
        ca_file: {ca}
        server_name: localhost
  https_tls13:
    prober: http
    timeout: 3s
    http:
      tls_config:
        ca_file: {ca}
        server_name: localhost
        min_version: TLS13
  https_tls12:
    prober: http
    timeout: 3s
    http:
      tls_config:
        ca_file: {ca}
        server_name: localhost
        max_version: TLS12
  https_insecure:
    prober: http
    timeout: 3s
    http:
      tls_config:
        insecure_skip_verify: true
  tcp_connect:
    prober: tcp
    timeout: 3s
  tcp_tls:
    prober: tcp
    timeout: 3s
    tcp:
      tls: true
      tls_config:
        ca_file: {ca}
        server_name: localhost
  tcp_line:
    prober: tcp
    timeout: 3s
    tcp:
      query_response:
        - expect: "^220 ([a-z-]+) ready$"
          send: "HELO ${{1}}\r"
        - expect: "^250 hello (.+)$"
          send: "QUIT from ${{1}}\r"
        - expect: "^221 "
  tcp_line_closed_early:
    prober: tcp
    timeout: 3s
    tcp:
      query_response:
        - expect: "^220 "
          send: "QUIT\r"
        - expect: "^250 "
  tcp_expect_silent:
    prober: tcp
    timeout: 3s
    tcp:
      query_response:
        - expect: "^220 "
  smtp_starttls:
    prober: tcp
    timeout: 3s
    tcp:
      tls_config:
        ca_file: {ca}
        server_name: localhost
      query_response:
        - expect: "^220 ([^ ]+) ESMTP (.+)$"
        - send: "EHLO prober\r"
        - expect: "^250[ -]STARTTLS"
        - send: "STARTTLS\r"
        - expect: "^220"
        - starttls: true
        - send: "EHLO prober\r"
        - expect: "^250[ -]"
        - send: "QUIT\r"
  dns_a:
    prober: dns
    timeout: 3s
    dns:
      query_name: www.sonde.test
      query_type: A
  dns_a_tcp:
    prober: dns
    timeout: 3s
    dns:
      transport_protocol: tcp
      query_name: www.sonde.test
      query_type: A
  dns_a_dot:
    prober: dns
    timeout: 3s
    dns:
      transport_protocol: tcp
      dns_over_tls: true
      tls_config:
        ca_file: {ca}
        server_name: localhost
      query_name: www.sonde.test
      query_type: A
      validate_answer_rrs:
        fail_if_not_matches_regexp: ["www\\.sonde\\.test\\.\t.*\tIN\tA\t127\\.0\\.0\\.10"]
  dns_validators_pass:
    prober: dns
    timeout: 3s
    dns:
      query_name: www.sonde.test
      query_type: A
      validate_answer_rrs:
        fail_if_matches_regexp: ["192\\.0\\.2\\."]
        fail_if_not_matches_regexp: ["^www\\.sonde\\.test\\.\t"]
        fail_if_all_match_regexp: ["\tA\t"]
        fail_if_none_matches_regexp: ["127\\.0\\.0\\.10$"]
      validate_authority_rrs:
        fail_if_matches_regexp: [".*"]
      validate_additional_rrs:
        fail_if_matches_regexp: [".*"]
  dns_answer_forbidden:
    prober: dns
    timeout: 3s
    dns:
      query_name: www.sonde.test
      query_type: A
      validate_answer_rrs:
        fail_if_matches_regexp: ["127\\.0\\.0\\.10"]
  dns_answer_not_matching:
    prober: dns
    timeout: 3s
    dns:
      query_name: www.sonde.test
      query_type: A
      validate_answer_rrs:
        fail_if_none_matches_regexp: ["192\\.0\\.2\\.1$"]
  dns_authority_required:
    prober: dns
    timeout: 3s
    dns:
      query_name: www.sonde.test
      query_type: A
      validate_authority_rrs:
        fail_if_not_matches_regexp: ["SOA"]
  dns_additional_none:
    prober: dns
    timeout: 3s
    dns:
      query_name: sonde.test
      query_type: MX
      validate_additional_rrs:
        fail_if_none_matches_regexp: []
        fail_if_matches_regexp: ["192\\.0\\.2\\."]
  dns_nxdomain:
    prober: dns
    timeout: 3s
    dns:
      query_name: nope.sonde.test
      query_type: A
  dns_nxdomain_ok:
    prober: dns
    timeout: 3s
    dns:
      query_name: nope.sonde.test
      query_type: A
      valid_rcodes: [NXDOMAIN]
  dns_servfail_ok:
    prober: dns
    timeout: 3s
    dns:
      query_name: www.sonde.test
      query_type: A
      valid_rcodes: [SERVFAIL]
  dns_soa:
    prober: dns
    timeout: 3s
    dns:
      query_name: sonde.test
      query_type: SOA
  dns_mx:
    prober: dns
    timeout: 3s
    dns:
      query_name: sonde.test
      query_type: MX
      validate_answer_rrs:
        fail_if_not_matches_regexp: ["\tMX\t10 mail\\.sonde\\.test\\.$"]
  dns_txt:
    prober: dns
    timeout: 3s
    dns:
      query_name: txt.sonde.test
      query_type: TXT
      validate_answer_rrs:
        fail_if_none_matches_regexp: ["\"v=sonde1\""]
  dns_chaos:
    prober: dns
    timeout: 3s
    dns:
      query_name: version.bind
      query_type: TXT
      query_class: CH
  dns_no_recursion:
    prober: dns
    timeout: 3s
    dns:
      query_name: www.sonde.test
      query_type: A
      recursion_desired: false
  dns_any:
    prober: dns
    timeout: 3s
    dns:
      query_name: www.sonde.test
"#
    )
}

// ---------------------------------------------------------------------------------------
// Peers

struct NginxPorts {
    http: u16,
    https: u16,
    self_signed: u16,
    expired: u16,
    dot: u16,
    smtp: u16,
}

/// The nginx modules the test needs beyond nginx-light, with their Debian packages.
fn require_nginx_module(file: &str, package: &str) -> PathBuf {
    let path = PathBuf::from("/usr/lib/nginx/modules").join(file);
    assert!(
        path.exists(),
        "{} is missing: install the Debian package `{package}` (apt-get install -y {package}), or run `bash scripts/test.sh`",
        path.display()
    );
    path
}

/// One nginx serving every HTTP(S) target, a DNS-over-TLS front to dnsmasq (stream
/// module) and SMTP with STARTTLS (mail module).
fn start_nginx_full(scene: &mut Scene, certs: &Certs, dns_port: u16) -> NginxPorts {
    let nginx = require_tool("nginx", "nginx-light");
    let stream = require_nginx_module("ngx_stream_module.so", "libnginx-mod-stream");
    let mail = require_nginx_module("ngx_mail_module.so", "libnginx-mod-mail");
    let ports = NginxPorts {
        http: free_port(),
        https: free_port(),
        self_signed: free_port(),
        expired: free_port(),
        dot: free_port(),
        smtp: free_port(),
    };
    let dir = scene.dir().join("nginx");
    std::fs::create_dir_all(dir.join("www/static")).unwrap();
    std::fs::write(
        dir.join("www/static/big.txt"),
        "sonde parity gzip line\n".repeat(400),
    )
    .unwrap();
    let d = dir.display();
    let (leaf, leaf_key) = (certs.leaf.display(), certs.leaf_key.display());
    let (ss, ss_key) = (certs.self_signed.display(), certs.self_signed_key.display());
    let (ex, ex_key) = (certs.expired.display(), certs.expired_key.display());
    let p = &ports;
    let config = format!(
        r#"load_module {stream};
load_module {mail};
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    types {{ text/plain txt; }}
    default_type text/plain;
    gzip on;
    gzip_types text/plain;
    gzip_min_length 1;
    ssl_protocols TLSv1.2 TLSv1.3;
    server {{
        listen 127.0.0.1:{http};
        root {d}/www;
        location = / {{ return 200 "ok\n"; }}
        location = /missing {{ return 404; }}
        location = /redirect {{ return 302 /; }}
        location = /post {{
            if ($request_method != POST) {{ return 405; }}
            return 200 "posted\n";
        }}
        location = /body {{ return 200 "hello sonde parity body\n"; }}
        location = /headers {{ add_header X-Sonde parity; return 200 "headers\n"; }}
        location = /basic {{
            if ($http_authorization != "Basic dXNlcjpwYXNz") {{ return 401; }}
            return 200 "welcome\n";
        }}
        location = /bearer {{
            if ($http_authorization != "Bearer tok3n") {{ return 401; }}
            return 200 "welcome\n";
        }}
        location /static/ {{ }}
    }}
    server {{
        listen 127.0.0.1:{https} ssl http2;
        ssl_certificate {leaf};
        ssl_certificate_key {leaf_key};
        location / {{ return 200 "secure\n"; }}
    }}
    server {{
        listen 127.0.0.1:{self_signed} ssl;
        ssl_certificate {ss};
        ssl_certificate_key {ss_key};
        location / {{ return 200 "self-signed\n"; }}
    }}
    server {{
        listen 127.0.0.1:{expired} ssl;
        ssl_certificate {ex};
        ssl_certificate_key {ex_key};
        location / {{ return 200 "expired\n"; }}
    }}
}}
stream {{
    server {{
        listen 127.0.0.1:{dot} ssl;
        ssl_certificate {leaf};
        ssl_certificate_key {leaf_key};
        proxy_pass 127.0.0.1:{dns_port};
    }}
}}
mail {{
    server_name mail.sonde.test;
    auth_http 127.0.0.1:1/auth;
    ssl_certificate {leaf};
    ssl_certificate_key {leaf_key};
    ssl_protocols TLSv1.2 TLSv1.3;
    server {{
        listen 127.0.0.1:{smtp};
        protocol smtp;
        starttls on;
        smtp_auth none;
    }}
}}
"#,
        stream = stream.display(),
        mail = mail.display(),
        http = p.http,
        https = p.https,
        self_signed = p.self_signed,
        expired = p.expired,
        dot = p.dot,
        smtp = p.smtp,
    );
    let config_path = scene.dir().write("nginx/nginx.conf", &config);
    let mut cmd = Command::new(nginx);
    cmd.arg("-c")
        .arg(&config_path)
        .arg("-p")
        .arg(&dir)
        .args(["-e", "stderr"]);
    scene.spawn("nginx", cmd);
    let url = format!("http://127.0.0.1:{}/", p.http);
    scene.wait_until(
        "nginx to serve /",
        Duration::from_secs(30),
        || match http_get(&url)? {
            (200, body) if body == "ok\n" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    for port in [p.https, p.self_signed, p.expired, p.dot, p.smtp] {
        scene.wait_until(
            &format!("nginx to listen on {port}"),
            Duration::from_secs(10),
            || {
                TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        );
    }
    ports
}

/// dnsmasq answering for sonde.test (A, MX, TXT, SOA as an authoritative zone; NXDOMAIN
/// for other names under it) and CHAOS version.bind.
fn start_dns(scene: &mut Scene) -> u16 {
    let dnsmasq = require_tool("dnsmasq", "dnsmasq-base");
    let port = free_tcp_udp_port();
    let pid = scene.dir().join("dnsmasq.pid");
    let mut cmd = Command::new(dnsmasq);
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--conf-file=/dev/null",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--local=/sonde.test/",
        "--host-record=www.sonde.test,127.0.0.10",
        "--txt-record=txt.sonde.test,v=sonde1",
        "--mx-host=sonde.test,mail.sonde.test,10",
        "--auth-server=ns.sonde.test",
        "--auth-zone=sonde.test",
        "--auth-soa=2024010101,hostmaster.sonde.test",
        "--log-facility=-",
    ])
    .arg(format!("--port={port}"))
    .arg(format!("--pid-file={}", pid.display()));
    scene.spawn("dnsmasq", cmd);
    let server = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    scene.wait_until(
        "dnsmasq to answer",
        Duration::from_secs(30),
        || match dns_query_a(server, "www.sonde.test")? {
            addrs if addrs == [Ipv4Addr::new(127, 0, 0, 10)] => Ok(()),
            addrs => Err(format!("answered {addrs:?}")),
        },
    );
    port
}

/// A UDP DNS server that answers every query with SERVFAIL (and the question echoed).
fn servfail_server() -> u16 {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = socket.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            let mut reply = buf[..n].to_vec();
            // QR=1, opcode 0, RD copied; RA=1, rcode 2 (SERVFAIL); no answers.
            reply[2] = 0x80 | (buf[2] & 0x01);
            reply[3] = 0x80 | 0x02;
            reply[6..12].fill(0);
            let _ = socket.send_to(&reply, peer);
        }
    });
    port
}

/// A line protocol server: `220 sonde-line ready`, `HELO x` → `250 hello x`, `QUIT...`
/// → `221 bye` and close; anything else is ignored.
fn line_server() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut writer = stream.try_clone().unwrap();
                let _ = writer.write_all(b"220 sonde-line ready\r\n");
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    let line = line.trim_end_matches('\r');
                    if let Some(name) = line.strip_prefix("HELO ") {
                        let _ = writer.write_all(format!("250 hello {name}\r\n").as_bytes());
                    } else if line.starts_with("QUIT") {
                        let _ = writer.write_all(b"221 bye\r\n");
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A server that accepts connections and never sends a byte.
fn silent_server() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
            // Bounded: the oldest are closed once many are held.
            if held.len() > 256 {
                held.remove(0);
            }
        }
    });
    port
}

#[test]
fn the_expired_certificate_is_what_the_cases_assume() {
    let dir = sonde_tests::TestDir::new("parity-certs");
    let certs = make_certs(dir.path());
    let openssl = require_tool("openssl", "openssl");
    let mut cmd = Command::new(openssl);
    cmd.args(["x509", "-noout", "-enddate", "-in"])
        .arg(&certs.expired);
    let out = run(cmd, dir.path(), Duration::from_secs(30));
    assert!(
        out.stdout.contains("Jan  1 00:00:00 2021 GMT"),
        "{}",
        out.combined()
    );
    assert_eq!(EXPIRED_NOT_AFTER, 1_609_459_200.0);
}

#[test]
fn the_modules_section_is_loaded_strictly() {
    let dir = sonde_tests::TestDir::new("parity-strict");
    let agent = sonde_tests::sonde_bin("sonde-agent");
    let bad = "modules:\n  smtp:\n    prober: tcp\n    tcp:\n      query_response:\n        - expect: \"^220\"\n          expekt: \"typo\"\n";
    let path = dir.write("agent.yml", bad);
    let mut cmd = Command::new(&agent);
    cmd.arg("check-config").arg(&path);
    let out = run(cmd, dir.path(), Duration::from_secs(60));
    assert!(!out.status.success(), "{}", out.combined());
    let text = out.combined();
    assert!(
        text.contains(&format!("{}:7:", path.display())) && text.contains("expekt"),
        "the error names the file, line and key: {text}"
    );
    // The same file, fixed, passes.
    let good = bad.replace(
        "          expekt: \"typo\"\n",
        "          send: \"QUIT\\r\"\n",
    );
    let path = dir.write("agent-good.yml", &good);
    let mut cmd = Command::new(&agent);
    cmd.arg("check-config").arg(&path);
    let out = run(cmd, dir.path(), Duration::from_secs(60));
    assert!(out.status.success(), "{}", out.combined());
}
