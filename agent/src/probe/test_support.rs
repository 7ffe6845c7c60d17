//! What the probers' tests share: a module and context, sample lookups, and a test
//! PKI with TLS servers that present it.

use super::{ProbeContext, ProbeOutcome};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sonde_proto::config::{Module, Prober};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

pub(crate) fn module(prober: Prober) -> Module {
    serde_json::from_value(serde_json::json!({ "prober": prober.as_str() })).unwrap()
}

/// A module of `prober` with `options` (its section, as JSON), validated.
pub(crate) fn module_with(prober: Prober, options: serde_json::Value) -> Module {
    let m: Module = serde_json::from_value(
        serde_json::json!({ "prober": prober.as_str(), prober.as_str(): options }),
    )
    .unwrap();
    m.validate().unwrap();
    m
}

pub(crate) fn ctx() -> ProbeContext {
    ProbeContext::from_system().unwrap()
}

pub(crate) fn sample(o: &ProbeOutcome, name: &str) -> Option<f64> {
    o.samples
        .iter()
        .find(|s| s.name == name && s.labels.is_empty())
        .map(|s| s.value)
}

pub(crate) fn labelled(o: &ProbeOutcome, name: &str) -> Vec<(Vec<(&'static str, String)>, f64)> {
    o.samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| (s.labels.clone(), s.value))
        .collect()
}

/// The one sample of `metric` labelled `phase="name"` (the probers' duration phases).
pub(crate) fn phase_of(o: &ProbeOutcome, metric: &str, name: &str) -> f64 {
    let found: Vec<f64> = labelled(o, metric)
        .into_iter()
        .filter(|(l, _)| l == &vec![("phase", name.to_string())])
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "one {metric}{{phase={name:?}}} sample");
    found[0]
}

/// What a TLS 1.3 handshake with [`tls_server`]'s leaf reports, whatever the prober:
/// the leaf's expiry, `chain_expiry` for the verified chain (Go's zero time when it was
/// not verified), and the version.
pub(crate) fn assert_handshake_samples(o: &ProbeOutcome, chain_expiry: f64) {
    assert_eq!(
        sample(o, "probe_ssl_earliest_cert_expiry"),
        Some(LEAF_NOT_AFTER)
    );
    assert_eq!(
        sample(o, "probe_ssl_last_chain_expiry_timestamp_seconds"),
        Some(chain_expiry)
    );
    assert_eq!(
        labelled(o, "probe_tls_version_info"),
        vec![(vec![("version", "TLS 1.3".to_string())], 1.0)]
    );
}

/// A certificate authority and a leaf it signed for `localhost` and 127.0.0.1, with
/// known expiry dates so the samples can be checked exactly.
pub(crate) struct TestPki {
    pub(crate) ca_pem: String,
    pub(crate) ca_der: Vec<u8>,
    pub(crate) leaf_der: Vec<u8>,
    pub(crate) leaf_key_der: Vec<u8>,
}

/// 2030-06-01T00:00:00Z and 2031-01-01T00:00:00Z.
pub(crate) const LEAF_NOT_AFTER: f64 = 1_906_502_400.0;
pub(crate) const CA_NOT_AFTER: f64 = 1_924_992_000.0;

pub(crate) fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sonde test CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "sonde, tests");
    ca.not_after = rcgen::date_time_ymd(2031, 1, 1);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.not_after = rcgen::date_time_ymd(2030, 6, 1);
    leaf.serial_number = Some(vec![0x00, 0x8f, 0x01].into());
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().to_vec(),
        leaf_der: leaf_cert.der().to_vec(),
        leaf_key_der: leaf_key.serialize_der(),
    }
}

/// A TLS acceptor with the test PKI's leaf (and CA) offering `alpn`, TLS 1.3 only
/// when `tls13_only`.
pub(crate) fn acceptor(
    pki: &TestPki,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> tokio_rustls::TlsAcceptor {
    let chain = vec![
        CertificateDer::from(pki.leaf_der.clone()),
        CertificateDer::from(pki.ca_der.clone()),
    ];
    let key = PrivateKeyDer::Pkcs8(pki.leaf_key_der.clone().into());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS server on 127.0.0.1 that completes handshakes (offering `alpn`) and then
/// hands each connection to `serve`.
pub(crate) async fn tls_server<F, Fut>(pki: &TestPki, alpn: &[&[u8]], serve: F) -> SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = acceptor(pki, alpn, false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let serve = serve.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}

fn write_temp(name: &str, contents: &str) -> String {
    let dir = std::env::temp_dir().join(format!("sonde-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_string_lossy().into_owned()
}

pub(crate) fn ca_file(pki: &TestPki) -> String {
    write_temp(&format!("ca-{}.pem", rand::random::<u64>()), &pki.ca_pem)
}

/// Runs one probe with its step-by-step log on; the outcome and the log as text.
pub(crate) async fn run_with_log(target: &str, module: &Module) -> (ProbeOutcome, String) {
    let o = crate::probe::run_logged(
        &ctx(),
        None,
        target,
        module,
        std::time::Duration::from_secs(5),
        crate::probe::ProbeLog::on(),
    )
    .await;
    let mut text = String::new();
    o.log.render(&[], &mut text);
    (o, text)
}

/// Asserts that `log` has each of `lines`' fragments, in that order.
#[track_caller]
pub(crate) fn assert_log_has(log: &str, lines: &[&str]) {
    let mut from = 0;
    for fragment in lines {
        match log[from..].find(fragment) {
            Some(at) => from += at + fragment.len(),
            None => panic!("{fragment:?} missing (in order) from the log:\n{log}"),
        }
    }
}
