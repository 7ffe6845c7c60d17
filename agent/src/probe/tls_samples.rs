//! The `probe_ssl_*` and `probe_tls_*` samples: what a handshake (or the certificates
//! of one that failed verification) tells, in blackbox_exporter's names and formats.

use super::tls::TlsClient;
use super::{ProbeContext, Samples, x509};
use rustls::ClientConnection;
use rustls::pki_types::CertificateDer;

/// What Go's zero `time.Time` gives as Unix seconds: blackbox_exporter reports it when
/// there is no certificate date to report (no verified chain with insecure_skip_verify).
pub(crate) const GO_ZERO_TIME: f64 = -62_135_596_800.0;

/// The facts a finished handshake gives for the `probe_ssl_*` and `probe_tls_*` samples.
#[derive(Debug, Clone)]
pub(crate) struct TlsFacts {
    earliest_expiry: f64,
    last_chain_expiry: f64,
    version: &'static str,
    cipher: String,
    /// `probe_ssl_last_chain_info`'s labels, from the leaf certificate.
    leaf: Option<LeafInfo>,
}

/// `probe_ssl_earliest_cert_expiry`: the first expiry among the certificates the
/// server presented, or Go's zero time when it presented none that parse.
fn earliest_expiry(presented: &[x509::Cert<'_>]) -> f64 {
    presented
        .iter()
        .map(|c| c.not_after())
        .min()
        .map_or(GO_ZERO_TIME, |t| t as f64)
}

#[derive(Debug, Clone)]
struct LeafInfo {
    fingerprint_sha256: String,
    subject: String,
    issuer: String,
    subject_alternative: String,
    serial: String,
}

impl TlsFacts {
    pub(crate) fn read(ctx: &ProbeContext, conn: &ClientConnection, client: &TlsClient) -> Self {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
            _ => "unknown",
        };
        // Go's names: rustls spells the TLS 1.3 suites "TLS13_...", Go "TLS_...".
        let cipher = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .map(|s| match s.strip_prefix("TLS13_") {
                Some(rest) => format!("TLS_{rest}"),
                None => s.to_string(),
            })
            .unwrap_or_else(|| "unknown".to_string());
        let certs = conn.peer_certificates().unwrap_or(&[]);
        Self::of_handshake(ctx, certs, client, version, cipher)
    }

    /// The facts of a QUIC handshake (always TLS 1.3). quinn does not tell which cipher
    /// suite was negotiated, so there is none to report: `cipher` stays empty.
    pub(crate) fn of_quic(
        ctx: &ProbeContext,
        certs: &[CertificateDer<'static>],
        client: &TlsClient,
    ) -> Self {
        Self::of_handshake(ctx, certs, client, "TLS 1.3", String::new())
    }

    fn of_handshake(
        ctx: &ProbeContext,
        certs: &[CertificateDer<'_>],
        client: &TlsClient,
        version: &'static str,
        cipher: String,
    ) -> Self {
        let presented: Vec<x509::Cert<'_>> =
            certs.iter().filter_map(|c| x509::Cert::parse(c)).collect();
        let earliest_expiry = earliest_expiry(&presented);
        let last_chain_expiry = if client.verified {
            let roots: Vec<x509::Cert<'_>> = client
                .ca_certs
                .iter()
                .filter_map(|c| x509::Cert::parse(c))
                .collect();
            x509::chain_expiry(&presented, &roots).map_or(GO_ZERO_TIME, |t| t as f64)
        } else {
            GO_ZERO_TIME
        };
        let leaf = certs
            .first()
            .zip(presented.first())
            .map(|(der, cert)| LeafInfo::of(ctx, der, cert));
        Self {
            earliest_expiry,
            last_chain_expiry,
            version,
            cipher,
            leaf,
        }
    }

    /// What the certificates of a handshake that failed verification tell: their
    /// earliest expiry and the leaf, nothing about the (unestablished) session.
    pub(crate) fn from_certs(ctx: &ProbeContext, certs: &[CertificateDer<'static>]) -> Self {
        let parsed: Vec<x509::Cert<'_>> =
            certs.iter().filter_map(|c| x509::Cert::parse(c)).collect();
        let earliest_expiry = earliest_expiry(&parsed);
        let leaf = certs
            .first()
            .zip(parsed.first())
            .map(|(der, cert)| LeafInfo::of(ctx, der, cert));
        Self {
            earliest_expiry,
            last_chain_expiry: GO_ZERO_TIME,
            version: "unknown",
            cipher: String::new(),
            leaf,
        }
    }

    /// The samples of a failed handshake: no version, cipher or verified chain.
    pub(crate) fn record_unverified(&self, out: &mut Samples) {
        out.set("probe_ssl_earliest_cert_expiry", self.earliest_expiry);
        self.record_leaf(out);
    }

    fn record_leaf(&self, out: &mut Samples) {
        if let Some(leaf) = &self.leaf {
            out.items.retain(|s| s.name != "probe_ssl_last_chain_info");
            out.gauge_with(
                "probe_ssl_last_chain_info",
                &[
                    ("fingerprint_sha256", &leaf.fingerprint_sha256),
                    ("subject", &leaf.subject),
                    ("issuer", &leaf.issuer),
                    ("subjectalternative", &leaf.subject_alternative),
                    ("serialnumber", &leaf.serial),
                ],
                1.0,
            );
        }
    }

    /// The http prober also reports the cipher, the tcp prober does not (as blackbox).
    pub(crate) fn record(&self, out: &mut Samples, with_cipher: bool) {
        out.set("probe_ssl_earliest_cert_expiry", self.earliest_expiry);
        out.set(
            "probe_ssl_last_chain_expiry_timestamp_seconds",
            self.last_chain_expiry,
        );
        // One of each: a STARTTLS upgrade or a later hop replaces the earlier values.
        out.items
            .retain(|s| s.name != "probe_tls_version_info" && s.name != "probe_tls_cipher_info");
        out.gauge_with("probe_tls_version_info", &[("version", self.version)], 1.0);
        if with_cipher && !self.cipher.is_empty() {
            out.gauge_with("probe_tls_cipher_info", &[("cipher", &self.cipher)], 1.0);
        }
        self.record_leaf(out);
    }
}

impl LeafInfo {
    fn of(ctx: &ProbeContext, der: &[u8], cert: &x509::Cert<'_>) -> Self {
        LeafInfo {
            fingerprint_sha256: sha256_hex(ctx, der),
            subject: cert.subject(),
            issuer: cert.issuer(),
            subject_alternative: cert.dns_names().join(","),
            serial: cert.serial_hex(),
        }
    }
}

/// SHA-256 from the TLS provider (ring), which the agent already carries.
fn sha256_hex(ctx: &ProbeContext, data: &[u8]) -> String {
    let sha256 = ctx
        .crypto
        .cipher_suites
        .iter()
        .filter_map(|s| s.tls13())
        .map(|s| s.common.hash_provider)
        .find(|h| h.algorithm() == rustls::crypto::hash::HashAlgorithm::SHA256);
    match sha256 {
        Some(h) => h
            .hash(data)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        None => String::new(),
    }
}
