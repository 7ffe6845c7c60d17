//! The icmp and grpc probers side by side with Debian's prometheus-blackbox-exporter (the
//! same `modules:` loaded by both, the same cases through both `/probe` endpoints,
//! compared by [`sonde_tests::parity::compare`]), the three ways the agent can get an
//! ICMP socket, and whole `blackbox.yml` files (blackbox_exporter's own example and
//! Debian's) loaded unchanged and run.
//!
//! Addresses: 127.0.0.1 and ::1, and 10.200.0.0/24 and fd00:200::/64 inside network
//! namespaces these tests create. Root is needed for the namespaces and raw sockets: a
//! test that is not root fails under CI and says so.

use sonde_tests::netns::{Netns, require_root};
use sonde_tests::parity::{
    Case, Certs, assert_cases_agree, make_certs, start_blackbox, start_blackbox_with, wait_healthy,
};
use sonde_tests::{
    Scene, TestDir, free_port, http_get, repo_path, run, sonde_bin, start_agent, start_agent_with,
};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// icmp

const ICMP_MODULES: &str = r#"modules:
  icmp:
    prober: icmp
    timeout: 3s
  icmp_ip4:
    prober: icmp
    timeout: 3s
    icmp:
      preferred_ip_protocol: ip4
  icmp_ip4_only:
    prober: icmp
    timeout: 3s
    icmp:
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
  icmp_payload:
    prober: icmp
    timeout: 3s
    icmp:
      preferred_ip_protocol: ip4
      payload_size: 1400
  icmp_payload_df:
    prober: icmp
    timeout: 3s
    icmp:
      preferred_ip_protocol: ip4
      payload_size: 1400
      dont_fragment: true
  icmp_ttl5:
    prober: icmp
    timeout: 3s
    icmp:
      ttl: 5
  icmp_source:
    prober: icmp
    timeout: 3s
    icmp:
      preferred_ip_protocol: ip4
      source_ip_address: 127.0.0.1
  icmp_wrong_source:
    prober: icmp
    timeout: 3s
    icmp:
      preferred_ip_protocol: ip4
      source_ip_address: "::1"
  icmp_short:
    prober: icmp
    timeout: 1s
    icmp:
      preferred_ip_protocol: ip4
"#;

fn agent_config(modules: &str) -> String {
    format!(
        "agent:\n  id: parity\naggregators: []\n{modules}probe_endpoint:\n  enabled: true\n  allowed_targets: [\"127.0.0.1\", \"localhost:*\", \"[::1]\", \"10.200.0.0/24\", \"[fd00:200::/64]\"]\n"
    )
}

#[test]
fn icmp_side_by_side_on_loopback() {
    require_root("icmp_side_by_side_on_loopback");
    let mut scene = Scene::new("parity-icmp");
    let bb = start_blackbox(&mut scene, ICMP_MODULES);
    let agent = start_agent(&mut scene, "sonde-agent", &agent_config(ICMP_MODULES));
    let cases = vec![
        Case::new("icmp", "127.0.0.1", true),
        Case::new("icmp", "::1", true),
        Case::new("icmp_ip4", "localhost", true),
        Case::new("icmp_ip4", "::1", true),
        Case::new("icmp_ip4_only", "::1", false),
        Case::new("icmp_payload", "127.0.0.1", true),
        Case::new("icmp_payload_df", "127.0.0.1", true),
        Case::new("icmp_ttl5", "127.0.0.1", true),
        Case::new("icmp_ttl5", "::1", true),
        Case::new("icmp_source", "127.0.0.1", true),
        Case::new("icmp_wrong_source", "127.0.0.1", false),
    ];
    assert_cases_agree(&bb, &agent, &cases, &http_get);
}

/// Two namespaces joined by a veth pair with an MTU of 1280: the probers in one, the
/// target in the other, which answers with a TTL (hop limit) of 33 so that the reported
/// one is seen to come from the reply.
#[test]
fn icmp_side_by_side_across_a_veth_pair() {
    require_root("icmp_side_by_side_across_a_veth_pair");
    let probers = Netns::new("icmp-p");
    let target = Netns::new("icmp-t");
    target.sysctl("net.ipv4.ip_default_ttl", "33");
    target.sysctl("net.ipv6.conf.default.hop_limit", "33");
    target.sysctl("net.ipv6.conf.all.hop_limit", "33");
    probers.link_to(
        &target,
        1280,
        &["10.200.0.1/24", "fd00:200::1/64"],
        &["10.200.0.2/24", "fd00:200::2/64"],
    );
    let mut scene = Scene::new("parity-icmp-veth");
    let wrapper = probers.wrapper();
    let wrapper_ref: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let get = |url: &str| probers.http_get(url);
    let bb = start_blackbox_with(&mut scene, ICMP_MODULES, &wrapper_ref);
    wait_healthy(&mut scene, "blackbox_exporter", &bb, &get);
    let agent = start_agent_with(
        &mut scene,
        "sonde-agent",
        &agent_config(ICMP_MODULES),
        &wrapper,
    );
    wait_healthy(&mut scene, "sonde-agent", &agent, &get);
    let cases = vec![
        Case::new("icmp", "10.200.0.2", true),
        Case::new("icmp", "fd00:200::2", true),
        Case::new("icmp_ttl5", "fd00:200::2", true),
        // 1428 bytes of ICMP over a 1280-byte link: fragmented, unless DF forbids it.
        Case::new("icmp_payload", "10.200.0.2", true),
        Case::new("icmp_payload_df", "10.200.0.2", false),
        // Nobody answers ARP for .9: no reply before the deadline.
        Case::new("icmp_short", "10.200.0.9", false),
    ];
    assert_cases_agree(&bb, &agent, &cases, &get);
    let (_, body) = get(&format!("{agent}/probe?module=icmp&target=fd00:200::2")).unwrap();
    assert!(body.contains("probe_icmp_reply_hop_limit 33"), "{body}");
}

/// The three ways to an ICMP socket, each in a namespace of its own
/// (`net.ipv4.ping_group_range` is per namespace): an unprivileged user allowed by the
/// sysctl gets a datagram socket; root outside the range gets a raw one; an
/// unprivileged user outside it gets neither, and an error that names the sysctl.
#[test]
fn icmp_unprivileged_raw_and_neither() {
    require_root("icmp_unprivileged_raw_and_neither");
    let setpriv = sonde_tests::require_tool("setpriv", "util-linux");
    let as_nobody = |ns: &Netns| -> Vec<String> {
        let mut w = ns.wrapper();
        w.extend(
            [
                setpriv.display().to_string().as_str(),
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ]
            .map(String::from),
        );
        w
    };
    let mut scene = Scene::new("icmp-sockets");
    let config = agent_config(ICMP_MODULES);

    // An unprivileged user inside the range: the datagram socket, IPv4 and IPv6.
    let allowed = Netns::new("icmp-dgram");
    allowed.sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let dgram = start_agent_with(&mut scene, "agent-dgram", &config, &as_nobody(&allowed));
    let get = |url: &str| allowed.http_get(url);
    wait_healthy(&mut scene, "agent-dgram", &dgram, &get);
    for target in ["127.0.0.1", "::1"] {
        let (_, body) = get(&format!("{dgram}/probe?module=icmp&target={target}")).unwrap();
        assert!(body.contains("probe_success 1"), "{target}: {body}");
        assert!(
            body.contains("probe_icmp_reply_hop_limit 64"),
            "{target}: {body}"
        );
    }
    assert_eq!(pid_uid(&mut scene, "agent-dgram"), 65534);
    let log = scene.process("agent-dgram").log();
    assert!(
        log.contains("socket=datagram") && !log.contains("socket=raw"),
        "{log}"
    );

    // Root outside the range: the raw socket.
    let closed = Netns::new("icmp-raw");
    closed.sysctl("net.ipv4.ping_group_range", "1 0");
    let raw = start_agent_with(&mut scene, "agent-raw", &config, &closed.wrapper());
    let get_closed = |url: &str| closed.http_get(url);
    wait_healthy(&mut scene, "agent-raw", &raw, &get_closed);
    for target in ["127.0.0.1", "::1"] {
        let (_, body) = get_closed(&format!("{raw}/probe?module=icmp&target={target}")).unwrap();
        assert!(body.contains("probe_success 1"), "{target}: {body}");
    }
    let log = scene.process("agent-raw").log();
    assert!(
        log.contains("socket=raw") && !log.contains("socket=datagram"),
        "{log}"
    );

    // An unprivileged user outside the range: neither, and the reason.
    let neither = start_agent_with(&mut scene, "agent-neither", &config, &as_nobody(&closed));
    wait_healthy(&mut scene, "agent-neither", &neither, &get_closed);
    let (_, body) = get_closed(&format!(
        "{neither}/probe?module=icmp&target=127.0.0.1&debug=true"
    ))
    .unwrap();
    assert!(body.contains("probe_success 0"), "{body}");
    assert!(
        body.contains("net.ipv4.ping_group_range")
            && body.contains("CAP_NET_RAW")
            && body.contains("group 65534"),
        "the error names the sysctl, the capability and the group: {body}"
    );
    assert!(
        body.contains("probe_failure_info{reason=\"config\"} 1"),
        "{body}"
    );
}

/// The uid a scene's process runs as (from /proc), to show that `setpriv` took.
fn pid_uid(scene: &mut Scene, name: &str) -> u32 {
    // `ip netns exec` execs setpriv, which execs the agent: the same pid throughout.
    let pid = scene.process(name).pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no effective uid in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------------------------
// grpc

/// tonic-health servers: plaintext on 127.0.0.1 and on ::1, TLS (the parity PKI's leaf,
/// for localhost and 127.0.0.1) on 127.0.0.1. The server as a whole and `service1` are
/// SERVING, `down` is NOT_SERVING, any other service is unknown (NOT_FOUND).
struct HealthServers {
    plain: u16,
    plain_v6: u16,
    tls: u16,
    _runtime: tokio::runtime::Runtime,
}

fn start_health_servers(certs: &Certs) -> HealthServers {
    use tonic::transport::{Identity, Server, ServerTlsConfig};
    use tonic_health::ServingStatus;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime for the health servers");
    let identity = Identity::from_pem(
        std::fs::read(&certs.leaf).unwrap(),
        std::fs::read(&certs.leaf_key).unwrap(),
    );
    let (plain, plain_v6, tls) = runtime.block_on(async move {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("service1", ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("down", ServingStatus::NotServing)
            .await;
        let listen = |addr: &'static str| async move {
            let l = tokio::net::TcpListener::bind(addr).await.unwrap();
            let port = l.local_addr().unwrap().port();
            (tokio_stream::wrappers::TcpListenerStream::new(l), port)
        };
        let (l4, plain) = listen("127.0.0.1:0").await;
        let (l6, plain_v6) = listen("[::1]:0").await;
        let (lt, tls) = listen("127.0.0.1:0").await;
        let s = service.clone();
        tokio::spawn(Server::builder().add_service(s).serve_with_incoming(l4));
        let s = service.clone();
        tokio::spawn(Server::builder().add_service(s).serve_with_incoming(l6));
        let with_tls = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .expect("the TLS server's configuration")
            .add_service(service)
            .serve_with_incoming(lt);
        tokio::spawn(with_tls);
        // The statuses live as long as the runtime.
        tokio::spawn(async move {
            let _reporter = reporter;
            std::future::pending::<()>().await
        });
        (plain, plain_v6, tls)
    });
    HealthServers {
        plain,
        plain_v6,
        tls,
        _runtime: runtime,
    }
}

fn grpc_modules(ca: &std::path::Path) -> String {
    let ca = ca.display();
    format!(
        r#"modules:
  grpc_plain:
    prober: grpc
    grpc:
      tls: false
      service: "service1"
  grpc_server:
    prober: grpc
    timeout: 3s
    grpc:
      preferred_ip_protocol: ip4
  grpc_any_family:
    prober: grpc
    timeout: 3s
  grpc_down:
    prober: grpc
    timeout: 3s
    grpc:
      service: down
      preferred_ip_protocol: ip4
  grpc_unknown:
    prober: grpc
    timeout: 3s
    grpc:
      service: nope
      preferred_ip_protocol: ip4
  grpc_tls:
    prober: grpc
    timeout: 3s
    grpc:
      tls: true
      tls_config:
        ca_file: {ca}
      preferred_ip_protocol: ip4
  grpc_tls_by_name:
    prober: grpc
    timeout: 3s
    grpc:
      tls: true
      tls_config:
        ca_file: {ca}
        server_name: localhost
      preferred_ip_protocol: ip4
  grpc_tls_untrusted:
    prober: grpc
    timeout: 3s
    grpc:
      tls: true
      preferred_ip_protocol: ip4
  grpc_tls_insecure:
    prober: grpc
    timeout: 3s
    grpc:
      tls: true
      tls_config:
        insecure_skip_verify: true
      preferred_ip_protocol: ip4
  grpc_tls_unknown:
    prober: grpc
    timeout: 3s
    grpc:
      tls: true
      service: nope
      tls_config:
        ca_file: {ca}
      preferred_ip_protocol: ip4
"#
    )
}

#[test]
fn grpc_side_by_side_with_a_tonic_health_server() {
    let mut scene = Scene::new("parity-grpc");
    let certs = make_certs(scene.dir().path());
    let servers = start_health_servers(&certs);
    let closed = free_port();
    let modules = grpc_modules(&certs.ca);
    let bb = start_blackbox(&mut scene, &modules);
    let agent = start_agent(&mut scene, "sonde-agent", &agent_config(&modules));
    let plain = format!("127.0.0.1:{}", servers.plain);
    let tls = format!("127.0.0.1:{}", servers.tls);
    let cases = vec![
        Case::new("grpc_server", plain.clone(), true),
        Case::new("grpc_server", format!("http://{plain}"), true),
        Case::new("grpc_server", format!("localhost:{}", servers.plain), true),
        Case::new("grpc_plain", plain.clone(), true),
        Case::new("grpc_down", plain.clone(), false),
        Case::new("grpc_unknown", plain.clone(), false),
        Case::new("grpc_server", format!("127.0.0.1:{closed}"), false),
        Case::new("grpc_tls", tls.clone(), true),
        Case::new("grpc_tls_by_name", tls.clone(), true),
        Case::new("grpc_tls_insecure", tls.clone(), true),
        Case::new("grpc_tls_untrusted", tls.clone(), false),
        Case::new("grpc_tls_unknown", tls.clone(), false),
        Case::new("grpc_tls", plain.clone(), false),
        Case::new("grpc_server", tls.clone(), false),
    ];
    assert_cases_agree(&bb, &agent, &cases, &http_get);

    // The values behind the agreement, on sonde's side.
    let probe = |module: &str, target: &str| {
        let (status, body) =
            http_get(&format!("{agent}/probe?module={module}&target={target}")).unwrap();
        assert_eq!(status, 200, "{body}");
        body
    };
    let body = probe("grpc_tls", &tls);
    for line in [
        "probe_grpc_ssl 1",
        "probe_grpc_status_code 0",
        "probe_grpc_healthcheck_response{serving_status=\"SERVING\"} 1",
        "probe_tls_version_info{version=\"TLS 1.3\"} 1",
    ] {
        assert!(body.contains(line), "{line} in\n{body}");
    }
    let body = probe("grpc_unknown", &plain);
    assert!(body.contains("probe_grpc_status_code 5"), "{body}");
    assert!(
        body.contains("probe_failure_info{reason=\"grpc_status\"} 1"),
        "{body}"
    );
    let body = probe("grpc_down", &plain);
    assert!(
        body.contains("probe_grpc_healthcheck_response{serving_status=\"NOT_SERVING\"} 1"),
        "{body}"
    );
    let body = probe("grpc_server", &format!("127.0.0.1:{closed}"));
    assert!(body.contains("probe_grpc_status_code 14"), "{body}");

    // An IPv6 literal: blackbox_exporter (0.23 to 0.28) dials `::1:PORT`, host and port
    // joined without brackets, and fails; sonde reaches the server.
    let v6 = format!("[::1]:{}", servers.plain_v6);
    let (theirs, ours) = sonde_tests::parity::probe_both(
        &bb,
        &agent,
        &Case::new("grpc_any_family", v6.clone(), true),
        &http_get,
    );
    let value = sonde_tests::parity::value;
    assert_eq!(value(&theirs, "probe_grpc_status_code"), Some(14.0));
    assert_eq!(value(&ours, "probe_success"), Some(1.0), "{v6}");
    assert_eq!(value(&ours, "probe_ip_protocol"), Some(6.0));
}

// ---------------------------------------------------------------------------------------
// A whole blackbox.yml, unchanged

/// blackbox_exporter's example.yml (every module) and the blackbox.yml Debian's package
/// installs load unchanged: `sonde-agent check-config` accepts an agent config naming
/// each as its `modules_file`. A module the agent cannot run is refused, with the
/// module, the option and what to do. Then a few of their modules run.
#[test]
fn whole_blackbox_files_load_unchanged_and_run() {
    let dir = TestDir::new("blackbox-files");
    let example = repo_path("tests/fixtures/blackbox/example-v0.23.0.yml");
    let debian = std::path::PathBuf::from("/etc/prometheus/blackbox.yml");
    if !debian.exists() {
        sonde_tests::require_tool(
            "prometheus-blackbox-exporter",
            "prometheus-blackbox-exporter",
        );
        panic!(
            "{} is missing: reinstall the Debian package prometheus-blackbox-exporter",
            debian.display()
        );
    }
    let check = |modules_file: &std::path::Path, name: &str| {
        let config = dir.write(
            &format!("agent-{name}.yml"),
            &format!(
                "aggregators: []\nmodules_file: {}\n",
                modules_file.display()
            ),
        );
        let mut cmd = Command::new(sonde_bin("sonde-agent"));
        cmd.arg("check-config").arg(&config);
        run(cmd, dir.path(), Duration::from_secs(60))
    };
    for (file, name) in [(&example, "example"), (&debian, "debian")] {
        let out = check(file, name);
        assert!(
            out.status.success(),
            "{} does not load:\n{}",
            file.display(),
            out.combined()
        );
    }

    // An option the agent cannot honour is refused at load, naming the module and the
    // option, with what to do instead.
    let text = std::fs::read_to_string(&example).unwrap();
    let tls10 = text.replacen(
        "        ca_file: \"/certs/my_cert.crt\"\n",
        "        ca_file: \"/certs/my_cert.crt\"\n        max_version: TLS10\n",
        1,
    );
    assert_ne!(tls10, text, "the fixture changed: update this test");
    let changed = dir.write("example-tls10.yml", &tls10);
    let out = check(&changed, "example-tls10");
    assert!(!out.status.success(), "{}", out.combined());
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains(": modules."))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.combined());
    assert!(
        errors[0].contains("modules.http_custom_ca_example: http.tls_config.max_version")
            && errors[0].contains("use TLS12 or TLS13"),
        "{}",
        errors[0]
    );

    // They run: Debian's icmp, icmp_ttl5, tcp_connect and grpc_plain, and the example's
    // icmp_example and tcp_connect_example, against loopback peers.
    let mut scene = Scene::new("blackbox-files-run");
    let certs = make_certs(scene.dir().path());
    let servers = start_health_servers(&certs);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp: SocketAddr = listener.local_addr().unwrap();
    let endpoint =
        "probe_endpoint:\n  enabled: true\n  allowed_targets: [\"127.0.0.1\", \"[::1]\"]\n";
    let debian_agent = start_agent(
        &mut scene,
        "agent-debian",
        &format!(
            "aggregators: []\nmodules_file: {}\n{endpoint}",
            debian.display()
        ),
    );
    let example_agent = start_agent(
        &mut scene,
        "agent-example",
        &format!(
            "aggregators: []\nmodules_file: {}\n{endpoint}",
            example.display()
        ),
    );
    // Every module of both files is in the running agent: `/probe` knows it (a target
    // outside the allowlist gets 403, with no connection made; an unknown module 400).
    for (agent, file) in [(&debian_agent, &debian), (&example_agent, &example)] {
        let text = std::fs::read_to_string(file).unwrap();
        let names = module_names(&text);
        assert!(names.len() >= 10, "{}: {names:?}", file.display());
        for name in names {
            let (status, body) = http_get(&format!(
                "{agent}/probe?module={name}&target=not-allowed.invalid:1"
            ))
            .unwrap();
            assert_eq!(status, 403, "{}: module {name}: {body}", file.display());
        }
    }
    let (status, _) = http_get(&format!(
        "{debian_agent}/probe?module=no_such_module&target=127.0.0.1"
    ))
    .unwrap();
    assert_eq!(status, 400);

    let mut runs = vec![
        (&debian_agent, "tcp_connect", tcp.to_string()),
        (
            &debian_agent,
            "grpc_plain",
            format!("127.0.0.1:{}", servers.plain),
        ),
        (&example_agent, "tcp_connect_example", tcp.to_string()),
    ];
    let icmp_runs = [
        (&debian_agent, "icmp", "127.0.0.1".to_string()),
        (&debian_agent, "icmp_ttl5", "::1".to_string()),
        (&example_agent, "icmp_example", "127.0.0.1".to_string()),
    ];
    require_root("whole_blackbox_files_load_unchanged_and_run (icmp)");
    runs.extend(icmp_runs);
    for (agent, module, target) in runs {
        let (status, body) =
            http_get(&format!("{agent}/probe?module={module}&target={target}")).unwrap();
        assert_eq!(status, 200, "{module}: {body}");
        assert!(
            body.contains("probe_success 1"),
            "{module} {target}:\n{body}"
        );
    }
}

/// The names under `modules:` (two-space indented keys), in file order.
fn module_names(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| !l.starts_with(' ') && !l.starts_with('#'))
        .filter_map(|l| l.strip_suffix(':'))
        .collect()
}
