//! Certificate and key files that are not what their option wants, in each place sonde
//! reads PEM with its one reader: the aggregator's `fleet.tls` (at start), a remote-write
//! `tls_config` (`check-config`), and a probe module's `tls_config` on the agent
//! (`/probe?debug=true`). Each error names the option and the file and says what the file
//! holds instead, or what to do with it.

use sonde_tests::{
    Scene, TestDir, accepting_tcp_port, free_port, http_get, make_pki, require_tool, run,
    sonde_bin, start_agent,
};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const SAN: &str = "DNS:localhost,IP:127.0.0.1";

/// How long a binary that must refuse its config may take to exit.
const EXIT: Duration = Duration::from_secs(30);

/// What [`sonde_proto::tls`] says of a file without a certificate that holds a PKCS#8 key.
fn no_certificate(path: &Path) -> String {
    format!(
        "no certificate in {} (a PEM block -----BEGIN CERTIFICATE-----); it holds PRIVATE KEY",
        path.display()
    )
}

/// What it says of a file without a private key that holds a certificate.
fn no_private_key(path: &Path) -> String {
    format!(
        "{} holds no private key (PKCS#8, PKCS#1 or SEC1: a PEM block -----BEGIN PRIVATE KEY-----, \
         -----BEGIN RSA PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----); it holds CERTIFICATE",
        path.display()
    )
}

/// `fleet.tls` with the key where the certificate goes, then the certificate where the key
/// goes: the aggregator does not start, and says which file holds what.
#[test]
fn aggregator_fleet_tls_files_swapped() {
    let scratch = TestDir::new("pem-fleet-tls");
    let pki = make_pki(&scratch, SAN, &[]);
    let (cert, key) = (pki.join("aggregator.pem"), pki.join("aggregator.key"));
    for (option, cert_file, key_file, expected) in [
        ("cert_file", &key, &key, no_certificate(&key)),
        ("key_file", &cert, &cert, no_private_key(&cert)),
    ] {
        let config = scratch.write(
            &format!("aggregator-{option}.yml"),
            &format!(
                "fleet:\n  tls:\n    cert_file: {}\n    key_file: {}\n",
                cert_file.display(),
                key_file.display()
            ),
        );
        let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{}", free_port()))
            .arg(format!("--grpc.listen-address=127.0.0.1:{}", free_port()))
            .arg(format!(
                "--storage.path={}",
                scratch.join(&format!("data-{option}")).display()
            ));
        let out = run(cmd, scratch.path(), EXIT);
        assert!(
            !out.status.success(),
            "{option}: started:\n{}",
            out.combined()
        );
        let wanted = format!("fleet.tls.{option}: {expected}");
        assert!(
            out.combined().contains(&wanted),
            "{option}: expected {wanted:?} in:\n{}",
            out.combined()
        );
    }
}

/// A remote-write `tls_config` with the key as `cert_file`: `check-config` names the option
/// and the file.
#[test]
fn remote_write_tls_cert_file_holding_a_key() {
    let scratch = TestDir::new("pem-remote-write");
    let pki = make_pki(&scratch, SAN, &[]);
    let (cert, key) = (pki.join("aggregator.pem"), pki.join("aggregator.key"));
    let config = scratch.write(
        "aggregator.yml",
        &format!(
            "remote_write:\n  - url: https://127.0.0.1:{}/api/v1/write\n    tls_config:\n      \
             cert_file: {}\n      key_file: {}\n",
            free_port(),
            key.display(),
            cert.display()
        ),
    );
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg("check-config").arg(&config);
    let out = run(cmd, scratch.path(), EXIT);
    assert!(!out.status.success(), "accepted:\n{}", out.combined());
    let wanted = format!("tls_config.cert_file: {}", no_certificate(&key));
    assert!(
        out.combined().contains(&wanted),
        "expected {wanted:?} in:\n{}",
        out.combined()
    );
}

/// A probe module whose client key is encrypted, and one whose key file is the certificate:
/// the probe fails as a config error that names the file and says what to do.
#[test]
fn probe_module_client_key_encrypted_or_missing() {
    let openssl = require_tool("openssl", "openssl");
    let mut scene = Scene::new("pem-probe-module");
    let pki = make_pki(scene.dir(), SAN, &["edge"]);
    let (cert, key) = (pki.join("edge.pem"), pki.join("edge.key"));
    let encrypted = pki.join("edge-encrypted.key");
    let mut cmd = Command::new(openssl);
    cmd.args(["pkey", "-aes256", "-passout", "pass:sonde", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&encrypted);
    let out = run(cmd, scene.dir().path(), EXIT);
    assert!(out.status.success(), "openssl pkey:\n{}", out.combined());
    let module = |name: &str, key_file: &Path| {
        format!(
            "  {name}:\n    prober: tcp\n    timeout: 3s\n    tcp:\n      tls: true\n      \
             tls_config:\n        cert_file: {}\n        key_file: {}\n",
            cert.display(),
            key_file.display()
        )
    };
    let config = format!(
        "agent:\n  id: pem\naggregators: []\nmodules:\n{}{}probe_endpoint:\n  enabled: true\n  \
         allowed_targets: [\"127.0.0.1:*\"]\n",
        module("encrypted", &encrypted),
        module("swapped", &cert)
    );
    let web = start_agent(&mut scene, "agent", &config);
    let target = format!("127.0.0.1:{}", accepting_tcp_port());
    for (module, expected) in [
        (
            "encrypted",
            format!(
                "tls_config.key_file: {} holds an encrypted private key, and sonde reads only \
                 unencrypted ones",
                encrypted.display()
            ),
        ),
        (
            "swapped",
            format!("tls_config.key_file: {}", no_private_key(&cert)),
        ),
    ] {
        let (status, body) = http_get(&format!(
            "{web}/probe?module={module}&target={target}&debug=true"
        ))
        .unwrap();
        assert_eq!(status, 200, "{module}: {body}");
        assert!(body.contains("probe_success 0"), "{module}: {body}");
        assert!(
            body.contains(&expected),
            "{module}: expected {expected:?} in:\n{body}"
        );
    }
}
