//! The dns prober's `dnssec: {validate: true}` against zones signed for real with bind9's
//! `dnssec-keygen` and `dnssec-signzone`, served by bind9's `named` on loopback, and asked
//! both directly (the agent's own validation, no AD flag) and through `unbound`, a
//! validating resolver trusting the same anchor (which sets AD).
//!
//! The chain is local: a signed `test.` (the trust anchor, as DS or DNSKEY) delegates to
//! - `ok.test.`, signed, with its DS in `test.`: valid;
//! - `expired.test.`, signed with signatures that ended ten days ago: expired_signature;
//! - `nods.test.`, signed, without a DS in `test.`: missing_ds;
//! - `badds.test.`, signed, with a DS in `test.` whose digest matches no key: bogus.
//!
//! No root hints and no network: named is authoritative only, unbound has a stub zone for
//! `test.` pointing at named.

use sonde_tests::{
    Scene, dns_query_a, free_tcp_udp_port, http_get, require_tool, run, sonde_bin, start_agent,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DAY: u64 = 86_400;

/// The signed zones and the two servers.
struct Lab {
    /// named, authoritative for every zone.
    named: u16,
    /// unbound, validating with the DS of `test.` as its trust anchor.
    unbound: u16,
    /// The end of `ok.test.`'s signatures (the earliest on its chain), unix seconds.
    ok_expiry: u64,
    /// The end of `expired.test.`'s signatures, in the past.
    expired_end: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// A unix time as dnssec-signzone takes it: `YYYYMMDDHHMMSS`, UTC.
fn signzone_time(scene: &Scene, unix: u64) -> String {
    let mut cmd = Command::new("date");
    cmd.args(["-u", "-d", &format!("@{unix}"), "+%Y%m%d%H%M%S"]);
    let out = run(cmd, scene.dir().path(), Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.combined());
    out.stdout.trim().to_string()
}

/// Runs a bind9 tool in `dir`, failing the test with its output if it fails.
fn tool(program: &Path, args: &[&str], dir: &Path) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(dir);
    let out = run(cmd, dir, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        out.combined()
    );
    out.stdout
}

/// Makes a key for `zone` (one ECDSA P-256 key signing everything, as `-z` signs with a
/// KSK alone) and returns its file's base name (`Kzone.+013+tag`).
fn keygen(keygen: &Path, zone: &str, dir: &Path) -> String {
    tool(
        keygen,
        &["-q", "-a", "ECDSAP256SHA256", "-f", "KSK", "-K", ".", zone],
        dir,
    )
    .trim()
    .to_string()
}

fn zone_text(apex_extra: &str, key: &str) -> String {
    format!(
        "$TTL 300\n@ SOA ns.test. admin.test. 1 3600 600 86400 300\n@ NS ns.test.\n{apex_extra}$INCLUDE {key}.key\n"
    )
}

fn setup(scene: &mut Scene) -> Lab {
    let named = require_tool("named", "bind9");
    let unbound = require_tool("unbound", "unbound");
    let keygen_bin = require_tool("dnssec-keygen", "bind9-utils");
    let signzone = require_tool("dnssec-signzone", "bind9-utils");
    let dsfromkey = require_tool("dnssec-dsfromkey", "bind9-utils");
    let dir = scene.dir().join("zones");
    std::fs::create_dir_all(&dir).expect("create the zones directory");

    let t = now();
    let ok_expiry = (t + 10 * DAY) / 60 * 60;
    let test_expiry = (t + 30 * DAY) / 60 * 60;
    let expired_end = (t - 10 * DAY) / 60 * 60;
    let recent = signzone_time(scene, t - 3600);
    let sign = |zone: &str, start: &str, end: u64, verify: bool| {
        let end = signzone_time(scene, end);
        let out = format!("{zone}.signed");
        let mut args = vec!["-q", "-K", ".", "-z", "-s", start, "-e", &end, "-o", zone];
        if zone == "n3.test" {
            // NSEC3 (no salt, no extra iterations, as RFC 9276 asks) instead of NSEC.
            args.extend(["-3", "-", "-H", "0"]);
        }
        if !verify {
            // dnssec-signzone checks its own output, which with expired signatures fails.
            args.push("-P");
        }
        args.extend(["-f", &out, zone]);
        tool(&signzone, &args, &dir);
    };
    let mut ds_lines = String::new();
    for child in [
        "ok.test",
        "n3.test",
        "expired.test",
        "nods.test",
        "badds.test",
    ] {
        let key = keygen(&keygen_bin, child, &dir);
        std::fs::write(dir.join(child), zone_text("", &key) + "www A 192.0.2.10\n")
            .expect("write a child zone");
        let ds = tool(&dsfromkey, &["-a", "SHA-256", &format!("{key}.key")], &dir);
        match child {
            "nods.test" => {}
            // The right key tag and algorithm, a digest of nothing.
            "badds.test" => {
                let (head, digest) = ds.trim().rsplit_once(' ').expect("a DS record");
                ds_lines += &format!("{head} {}\n", "0".repeat(digest.len()));
            }
            _ => ds_lines += &ds,
        }
    }
    sign("ok.test", &recent, ok_expiry, true);
    sign("n3.test", &recent, ok_expiry, true);
    sign("nods.test", &recent, ok_expiry, true);
    sign("badds.test", &recent, ok_expiry, true);
    let long_ago = signzone_time(scene, t - 20 * DAY);
    sign("expired.test", &long_ago, expired_end, false);

    let key = keygen(&keygen_bin, "test", &dir);
    let delegations: String = ["ok", "n3", "expired", "nods", "badds"]
        .iter()
        .map(|child| format!("{child} NS ns.test.\n"))
        .collect();
    std::fs::write(
        dir.join("test"),
        zone_text(&format!("ns A 127.0.0.1\n{delegations}{ds_lines}"), &key),
    )
    .expect("write the parent zone");
    sign("test", &recent, test_expiry, true);
    std::fs::copy(dir.join(format!("{key}.key")), dir.join("anchor.dnskey"))
        .expect("copy the DNSKEY anchor");
    std::fs::write(
        dir.join("anchor.ds"),
        tool(&dsfromkey, &["-a", "SHA-256", &format!("{key}.key")], &dir),
    )
    .expect("write the DS anchor");

    let named_port = free_tcp_udp_port();
    let zones: String = [
        "test",
        "ok.test",
        "n3.test",
        "expired.test",
        "nods.test",
        "badds.test",
    ]
    .iter()
    .map(|z| format!("zone \"{z}\" {{ type primary; file \"{z}.signed\"; }};\n"))
    .collect();
    let conf = dir.join("named.conf");
    std::fs::write(
        &conf,
        format!(
            "options {{\n  directory \"{dir}\";\n  pid-file \"{dir}/named.pid\";\n  \
             listen-on port {named_port} {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n  \
             recursion no;\n  dnssec-validation no;\n  notify no;\n}};\ncontrols {{ }};\n{zones}",
            dir = dir.display()
        ),
    )
    .expect("write named.conf");
    let mut cmd = Command::new(named);
    cmd.arg("-g").arg("-c").arg(&conf);
    scene.spawn("named", cmd);

    let unbound_port = free_tcp_udp_port();
    let conf = dir.join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  interface: 127.0.0.1\n  port: {unbound_port}\n  do-ip6: no\n  \
             username: \"\"\n  chroot: \"\"\n  directory: \"{dir}\"\n  pidfile: \"{dir}/unbound.pid\"\n  \
             use-syslog: no\n  logfile: \"\"\n  verbosity: 1\n  val-log-level: 2\n  \
             do-not-query-localhost: no\n  root-hints: \"\"\n  local-zone: \"test.\" nodefault\n  \
             trust-anchor-file: \"{dir}/anchor.ds\"\n  module-config: \"validator iterator\"\n\
             remote-control:\n  control-enable: no\n\
             stub-zone:\n  name: \"test\"\n  stub-addr: 127.0.0.1@{named_port}\n",
            dir = dir.display()
        ),
    )
    .expect("write unbound.conf");
    let mut cmd = Command::new(unbound);
    cmd.arg("-d").arg("-c").arg(&conf);
    scene.spawn("unbound", cmd);

    for (name, port) in [("named", named_port), ("unbound", unbound_port)] {
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        scene.wait_until(
            &format!("{name} to answer A www.ok.test"),
            Duration::from_secs(30),
            || match dns_query_a(server, "www.ok.test")? {
                addrs if addrs == [Ipv4Addr::new(192, 0, 2, 10)] => Ok(()),
                addrs => Err(format!("answered {addrs:?}")),
            },
        );
    }
    Lab {
        named: named_port,
        unbound: unbound_port,
        ok_expiry,
        expired_end,
    }
}

/// The agent's modules: one per zone with the DS anchor, one with the DNSKEY anchor, signed
/// negative answers (NXDOMAIN and NODATA, with NSEC and with NSEC3), one without
/// validation.
fn agent_config(zones: &Path) -> String {
    let ds = zones.join("anchor.ds");
    let key = zones.join("anchor.dnskey");
    let module = |name: &str, query: &str, anchor: &Path, extra: &str| {
        format!(
            "  {name}:\n    prober: dns\n    timeout: 5s\n    dns:\n      query_name: {query}\n      \
             query_type: A\n      preferred_ip_protocol: ip4\n      \
             dnssec: {{validate: true, trust_anchor_file: {}}}\n{extra}",
            anchor.display()
        )
    };
    let mut config = String::from(
        "probe_endpoint:\n  enabled: true\n  allowed_targets: ['127.0.0.1:*']\nmodules:\n",
    );
    for (name, query) in [
        ("ok", "www.ok.test"),
        ("expired", "www.expired.test"),
        ("nods", "www.nods.test"),
        ("badds", "www.badds.test"),
    ] {
        config += &module(name, query, &ds, "");
    }
    config += &module("ok_dnskey_anchor", "www.ok.test", &key, "");
    config += &module(
        "ok_tcp",
        "www.ok.test",
        &ds,
        "      transport_protocol: tcp\n",
    );
    for (name, query) in [
        ("nxdomain", "missing.ok.test"),
        ("nxdomain_nsec3", "missing.n3.test"),
    ] {
        config += &module(name, query, &ds, "      valid_rcodes: [NXDOMAIN]\n");
    }
    for (name, query) in [("nodata", "www.ok.test"), ("nodata_nsec3", "www.n3.test")] {
        // www has an A record only: TXT is NODATA.
        config += &module(name, query, &ds, "").replace("query_type: A", "query_type: TXT");
    }

    config += "  plain:\n    prober: dns\n    timeout: 5s\n    dns:\n      query_name: www.ok.test\n      \
               query_type: A\n      preferred_ip_protocol: ip4\n";
    config
}

/// What `/probe?debug=true` answered: its log and its metrics.
struct Probe {
    log: String,
    metrics: String,
}

impl Probe {
    fn value(&self, series: &str) -> Option<f64> {
        self.metrics.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    #[track_caller]
    fn expect(&self, series: &str, want: f64) {
        assert_eq!(
            self.value(series),
            Some(want),
            "{series}\n{}\n{}",
            self.log,
            self.metrics
        );
    }
}

fn probe(agent: &str, module: &str, port: u16) -> Probe {
    let (status, body) = http_get(&format!(
        "{agent}/probe?module={module}&target=127.0.0.1:{port}&debug=true"
    ))
    .expect("/probe?debug=true");
    assert_eq!(status, 200, "{body}");
    let rest = body
        .strip_prefix("Logs for the probe:\n")
        .unwrap_or_else(|| panic!("no log section:\n{body}"));
    let (log, rest) = rest
        .split_once("\n\n\nMetrics that would have been returned:\n")
        .unwrap_or_else(|| panic!("no metrics section:\n{body}"));
    let metrics = rest
        .split_once("\n\n\nModule configuration:\n")
        .map_or(rest, |(m, _)| m);
    Probe {
        log: log.to_string(),
        metrics: metrics.to_string(),
    }
}

#[test]
fn dnssec_chains_validate_and_broken_links_are_named() {
    let mut scene = Scene::new("dnssec-probe");
    let lab = setup(&mut scene);
    let zones = scene.dir().join("zones");
    let agent = start_agent(&mut scene, "agent", &agent_config(&zones));

    // Valid, through the validating resolver (AD set) and straight from the
    // authoritative server (no AD: the agent's own validation alone).
    for (port, ad) in [(lab.unbound, 1.0), (lab.named, 0.0)] {
        for module in ["ok", "ok_dnskey_anchor", "ok_tcp"] {
            let p = probe(&agent, module, port);
            p.expect("probe_success", 1.0);
            p.expect("probe_dns_dnssec_valid", 1.0);
            p.expect("probe_dns_dnssec_ad", ad);
            p.expect(
                "probe_dns_rrsig_expiry_timestamp_seconds",
                lab.ok_expiry as f64,
            );
            assert!(
                p.log.contains(
                    "msg=\"Validated the DNSSEC chain of trust\" zones=\"test. ok.test.\""
                ),
                "{module} at {port}: {}",
                p.log
            );
        }
        // Signed NXDOMAIN and NODATA: their SOA and NSEC or NSEC3 records are signed along
        // the same chain, and prove the name (or the type) absent.
        for module in ["nxdomain", "nxdomain_nsec3", "nodata", "nodata_nsec3"] {
            let p = probe(&agent, module, port);
            p.expect("probe_success", 1.0);
            p.expect("probe_dns_dnssec_valid", 1.0);
            p.expect("probe_dns_dnssec_ad", ad);
        }
    }

    // Broken links, both ways; unbound hands the records over (CD) without AD.
    let expired_at = signzone_time(&scene, lab.expired_end);
    for port in [lab.unbound, lab.named] {
        for (module, reason) in [
            (
                "expired",
                format!(
                    "dnssec: expired_signature on expired.test. DNSKEY: the RRSIG expired at {expired_at}"
                ),
            ),
            (
                "nods",
                "dnssec: missing_ds on nods.test. DS: the parent zone has no DS record for it"
                    .to_string(),
            ),
            (
                "badds",
                "dnssec: bogus on badds.test. DNSKEY: no DNSKEY of the zone".to_string(),
            ),
        ] {
            let p = probe(&agent, module, port);
            p.expect("probe_success", 0.0);
            p.expect("probe_dns_dnssec_valid", 0.0);
            p.expect("probe_dns_dnssec_ad", 0.0);
            p.expect("probe_failure_info{reason=\"dnssec\"}", 1.0);
            assert!(
                p.log.contains("msg=\"Probe failed\" reason=dnssec")
                    && p.log.contains(&format!("err=\"{reason}")),
                "{module} at {port}: want {reason:?} in\n{}",
                p.log
            );
        }
    }
    // The expired chain still tells when its signatures ended.
    let p = probe(&agent, "expired", lab.named);
    p.expect(
        "probe_dns_rrsig_expiry_timestamp_seconds",
        // test.'s DS for expired.test. is valid; the earliest is the child's, expired.
        lab.expired_end as f64,
    );

    // Without dnssec, none of its series (blackbox_exporter's set alone).
    let p = probe(&agent, "plain", lab.unbound);
    p.expect("probe_success", 1.0);
    assert_eq!(p.value("probe_dns_dnssec_valid"), None, "{}", p.metrics);
    assert_eq!(
        p.value("probe_dns_rrsig_expiry_timestamp_seconds"),
        None,
        "{}",
        p.metrics
    );
    scene.stop();
}

#[test]
fn a_bad_trust_anchor_file_is_refused_at_load_with_its_line() {
    let scene = Scene::new("dnssec-anchor-file");
    let anchor = scene.dir().write(
        "root.key",
        "; the root's DS, its digest cut short by a stray character\n. IN DS 20326 8 2 E06D44B8Z\n",
    );
    let config = scene.dir().write(
        "agent.yml",
        &format!(
            "modules:\n  signed:\n    prober: dns\n    dns:\n      query_name: example.com\n      \
             dnssec: {{validate: true, trust_anchor_file: {}}}\n",
            anchor.display()
        ),
    );
    let mut cmd = Command::new(sonde_bin("sonde-agent"));
    cmd.arg("check-config").arg(&config);
    let out = run(cmd, scene.dir().path(), Duration::from_secs(60));
    assert!(!out.status.success(), "{}", out.combined());
    let want = format!(
        "dns.dnssec.trust_anchor_file {}:2: the DS digest \"E06D44B8Z\" is not hex",
        anchor.display()
    );
    assert!(out.combined().contains(&want), "{}", out.combined());

    // Fixed, it loads.
    std::fs::write(
        &anchor,
        ". IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n",
    )
    .unwrap();
    let mut cmd = Command::new(sonde_bin("sonde-agent"));
    cmd.arg("check-config").arg(&config);
    let out = run(cmd, scene.dir().path(), Duration::from_secs(60));
    assert!(out.status.success(), "{}", out.combined());
}
