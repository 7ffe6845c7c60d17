//! Side by side with Debian's prometheus-blackbox-exporter: the same `modules:` section
//! loaded by both exporters, the same cases probed through both `/probe` endpoints, and
//! their answers compared ([`compare`]). Used by `tests/tests/blackbox_parity*.rs`.

use crate::{MetricSample, Scene, free_port, parse_metrics, require_tool, run};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The metrics whose values must be equal: they describe the target, not the timing.
pub const DETERMINISTIC: &[&str] = &[
    "probe_success",
    "probe_http_status_code",
    "probe_http_redirects",
    "probe_http_ssl",
    "probe_http_version",
    "probe_http_content_length",
    "probe_http_uncompressed_body_length",
    "probe_failed_due_to_regex",
    "probe_ssl_earliest_cert_expiry",
    "probe_ssl_last_chain_expiry_timestamp_seconds",
    "probe_dns_answer_rrs",
    "probe_dns_authority_rrs",
    "probe_dns_additional_rrs",
    "probe_dns_query_succeeded",
    "probe_dns_serial",
    "probe_ip_protocol",
    "probe_ip_addr_hash",
    "probe_grpc_status_code",
    "probe_grpc_ssl",
    "probe_icmp_reply_hop_limit",
];

/// Metrics compared by their label sets (blackbox_exporter's labels must all be in ours).
pub const LABELLED: &[&str] = &[
    "probe_tls_version_info",
    "probe_ssl_last_chain_info",
    "probe_grpc_healthcheck_response",
];

/// One probe both exporters run: a module of the shared `modules:` section, a target,
/// and the `probe_success` the case is written to expect.
pub struct Case {
    pub module: &'static str,
    pub target: String,
    pub success: bool,
}

impl Case {
    pub fn new(module: &'static str, target: impl Into<String>, success: bool) -> Self {
        Self {
            module,
            target: target.into(),
            success,
        }
    }
}

/// How a case's `/probe` is fetched: [`crate::http_get`], or the same from inside a
/// network namespace.
pub type Get<'a> = &'a (dyn Fn(&str) -> Result<(u16, String), String> + Sync);

/// Runs every case against both exporters at once and fails the test, with both answers
/// of each case that differs, unless they all agree ([`compare`]).
pub fn assert_cases_agree(bb: &str, agent: &str, cases: &[Case], http_get: Get<'_>) {
    let started = Instant::now();
    let mut report = String::new();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let (theirs, ours) = probe_both(bb, agent, c, http_get);
        let problems = compare(c, &theirs, &ours);
        let _ = writeln!(
            report,
            "#{i:02} {:<28} {:<32} {}",
            c.module,
            c.target,
            if problems.is_empty() {
                "agree"
            } else {
                "DIFFER"
            }
        );
        if !problems.is_empty() {
            failures.push(format!(
                "case #{i} module={} target={}:\n  {}\n--- blackbox_exporter:\n{}\n--- sonde-agent:\n{}",
                c.module,
                c.target,
                problems.join("\n  "),
                render(&theirs),
                render(&ours)
            ));
        }
    }
    eprintln!(
        "{} side-by-side cases in {:?}:\n{report}",
        cases.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// Both exporters' answers to one case, fetched at the same time.
pub fn probe_both(
    bb: &str,
    agent: &str,
    c: &Case,
    http_get: Get<'_>,
) -> (Vec<MetricSample>, Vec<MetricSample>) {
    let query = format!("/probe?module={}&target={}", c.module, urlencode(&c.target));
    let get = |base: &str| -> Vec<MetricSample> {
        match http_get(&format!("{base}{query}")) {
            Ok((200, body)) => parse_metrics(&body),
            other => panic!("GET {base}{query}: {other:?}"),
        }
    };
    std::thread::scope(|s| {
        let theirs = s.spawn(|| get(bb));
        let ours = s.spawn(|| get(agent));
        (theirs.join().unwrap(), ours.join().unwrap())
    })
}

pub fn value(samples: &[MetricSample], name: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.is_empty())
        .map(|s| s.value)
}

/// What differs between blackbox_exporter's answer (`theirs`) and sonde's to one case:
/// - the same `probe_success`, and the one the case is written to expect;
/// - every metric name blackbox_exporter returns is in sonde's answer too;
/// - the same values for [`DETERMINISTIC`] metrics, and blackbox_exporter's label sets of
///   [`LABELLED`] metrics among sonde's;
/// - sonde's `probe_failure_info` on every failed probe, and only then.
///
/// One difference is sonde's on purpose (docs/probers.md, "Beyond blackbox_exporter"): a failed
/// probe that saw a certificate reports its expiry where blackbox_exporter reports 0.
pub fn compare(c: &Case, theirs: &[MetricSample], ours: &[MetricSample]) -> Vec<String> {
    let mut problems = Vec::new();
    let want = if c.success { 1.0 } else { 0.0 };
    if value(theirs, "probe_success") != Some(want) {
        problems.push(format!(
            "blackbox_exporter's probe_success is {:?}, the case expects {want}: the test target is not what the case says",
            value(theirs, "probe_success")
        ));
    }
    let names =
        |s: &[MetricSample]| -> BTreeSet<String> { s.iter().map(|m| m.name.clone()).collect() };
    let missing: Vec<String> = names(theirs).difference(&names(ours)).cloned().collect();
    if !missing.is_empty() {
        problems.push(format!("metrics missing from sonde: {missing:?}"));
    }
    for name in DETERMINISTIC {
        let (a, b) = (value(theirs, name), value(ours, name));
        let certificate_seen_on_failure = *name == "probe_ssl_earliest_cert_expiry"
            && !c.success
            && a == Some(0.0)
            && b.is_some_and(|b| b > 0.0);
        if a.is_some() && a != b && !certificate_seen_on_failure {
            problems.push(format!("{name}: blackbox_exporter {a:?}, sonde {b:?}"));
        }
    }
    for name in LABELLED {
        for sample in theirs.iter().filter(|s| s.name == *name) {
            let found = ours.iter().any(|o| {
                o.name == *name
                    && o.value == sample.value
                    && sample
                        .labels
                        .iter()
                        .all(|(k, v)| o.labels.get(k) == Some(v))
            });
            if !found {
                problems.push(format!(
                    "{name}{:?} {} has no match in sonde's answer",
                    sample.labels, sample.value
                ));
            }
        }
    }
    // sonde's own addition: one failure reason on every failed probe, none on success.
    let reasons = ours
        .iter()
        .filter(|s| s.name == "probe_failure_info")
        .count();
    if reasons != usize::from(!c.success) {
        problems.push(format!(
            "probe_failure_info: {reasons} samples on a probe with success {}",
            c.success
        ));
    }
    problems
}

pub fn render(samples: &[MetricSample]) -> String {
    let mut out = String::new();
    for s in samples {
        let labels: BTreeMap<_, _> = s.labels.iter().collect();
        let _ = writeln!(out, "  {}{labels:?} {}", s.name, s.value);
    }
    out
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts blackbox_exporter on a free loopback port with `modules` as its config file;
/// returns its base URL once it is healthy. A missing program fails the test, naming
/// its Debian package.
pub fn start_blackbox(scene: &mut Scene, modules: &str) -> String {
    let bb = start_blackbox_with(scene, modules, &[]);
    wait_healthy(scene, "blackbox_exporter", &bb, &crate::http_get);
    bb
}

/// [`start_blackbox`] with the command prefixed by `wrapper` (`ip netns exec NS`),
/// without waiting: see [`wait_healthy`].
pub fn start_blackbox_with(scene: &mut Scene, modules: &str, wrapper: &[&str]) -> String {
    let blackbox = require_tool(
        "prometheus-blackbox-exporter",
        "prometheus-blackbox-exporter",
    );
    let bb_config = scene.dir().write("blackbox.yml", modules);
    let bb_port = free_port();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(&blackbox);
            cmd
        }
        None => Command::new(&blackbox),
    };
    cmd.arg(format!("--config.file={}", bb_config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{bb_port}"));
    scene.spawn("blackbox_exporter", cmd);
    format!("http://127.0.0.1:{bb_port}")
}

/// Waits until `base`'s `/-/healthy` answers through `http_get`.
pub fn wait_healthy(scene: &mut Scene, name: &str, base: &str, http_get: Get<'_>) {
    scene.wait_until(
        &format!("{name} /-/healthy"),
        Duration::from_secs(60),
        || match http_get(&format!("{base}/-/healthy")) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}

/// The files [`make_certs`] made.
pub struct Certs {
    pub ca: PathBuf,
    pub leaf: PathBuf,
    pub leaf_key: PathBuf,
    pub self_signed: PathBuf,
    pub self_signed_key: PathBuf,
    pub expired: PathBuf,
    pub expired_key: PathBuf,
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let openssl = require_tool("openssl", "openssl");
    let mut cmd = Command::new(openssl);
    cmd.current_dir(dir).args(args);
    let out = run(cmd, dir, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        out.combined()
    );
}

/// A CA and a leaf it signs for localhost/127.0.0.1; a self-signed leaf; a self-signed
/// leaf that expired on 2021-01-01. EC P-256 keys throughout.
pub fn make_certs(dir: &Path) -> Certs {
    let dir = dir.join("pki");
    std::fs::create_dir_all(&dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let san = "subjectAltName=DNS:localhost,IP:127.0.0.1";
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "3650",
        "-subj",
        "/CN=sonde parity CA",
    ]);
    openssl(&dir, &args);
    let mut args = vec!["req", "-new"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/O=sonde/CN=localhost",
        "-addext",
        san,
    ]);
    openssl(&dir, &args);
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "825",
            "-copy_extensions",
            "copy",
            "-out",
            "leaf.pem",
        ],
    );
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "self.key",
        "-out",
        "self.pem",
        "-days",
        "365",
        "-subj",
        "/CN=localhost",
        "-addext",
        san,
    ]);
    openssl(&dir, &args);
    // An expired certificate needs dates in the past: `openssl ca` takes them.
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "1000\n").unwrap();
    let d = dir.display();
    std::fs::write(
        dir.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = d\n[d]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\nserial = {d}/serial\ndefault_md = sha256\npolicy = p\ncopy_extensions = copy\nunique_subject = no\n[p]\ncommonName = supplied\n"
        ),
    )
    .unwrap();
    let mut args = vec!["req", "-new"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "expired.key",
        "-out",
        "expired.csr",
        "-subj",
        "/CN=localhost",
        "-addext",
        san,
    ]);
    openssl(&dir, &args);
    openssl(
        &dir,
        &[
            "ca",
            "-batch",
            "-notext",
            "-config",
            "ca.cnf",
            "-selfsign",
            "-keyfile",
            "expired.key",
            "-in",
            "expired.csr",
            "-out",
            "expired.pem",
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20210101000000Z",
        ],
    );
    Certs {
        ca: dir.join("ca.pem"),
        leaf: dir.join("leaf.pem"),
        leaf_key: dir.join("leaf.key"),
        self_signed: dir.join("self.pem"),
        self_signed_key: dir.join("self.key"),
        expired: dir.join("expired.pem"),
        expired_key: dir.join("expired.key"),
    }
}
