//! The tcp prober: connect to `host:port`, optionally complete a TLS handshake, then
//! run the `query_response` dialogue (expect a line or bytes, send a line, upgrade with
//! STARTTLS), as blackbox_exporter's `tcp` module.
//!
//! This file also owns the two pieces the other probers share: the TCP connect and the
//! TLS client (trust roots, `insecure_skip_verify`, client certificates, version bounds)
//! with the `probe_ssl_*` / `probe_tls_*` samples it reads from a handshake.

use super::{
    Because, Env, Failure, ProbeContext, Reason, Samples, Stage, io_reason, resolve_target,
    split_host_port,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use sonde_proto::config::Module;
use sonde_proto::config::module::{QueryResponse, TlsConfig, tls_version_number};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// Go's `bufio.Scanner` gives up on lines longer than this (`MaxScanTokenSize`), and so
/// does the `query_response` reader: a peer cannot make the agent buffer more.
const MAX_LINE: usize = 64 * 1024;

pub async fn probe(
    ctx: &Env<'_>,
    target: &str,
    module: &Module,
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.tcp;
    // Registered before dialing, as blackbox_exporter 0.23 does; stays 0 unless an
    // `expect` or `expect_bytes` step fails on the content.
    out.set("probe_failed_due_to_regex", 0.0);
    out.set("probe_failed_due_to_bytes", 0.0);
    let (host, port) = split_host_port(target).because(Reason::Config)?;
    let port = parse_port(port, target).because(Reason::Config)?;
    let source = parse_source_ip(cfg.source_ip_address.as_deref()).because(Reason::Config)?;
    // Built before dialing so that a bad ca_file fails the probe without touching the
    // target, as blackbox_exporter does.
    let needs_tls = cfg.tls || cfg.query_response.iter().any(|qr| qr.starttls);
    let tls = if needs_tls {
        Some(TlsClient::new(ctx, &cfg.tls_config, &[]).because(Reason::Config)?)
    } else {
        None
    };
    let (ip, _) = resolve_target(
        ctx,
        host,
        cfg.preferred_ip_protocol,
        cfg.ip_protocol_fallback,
        out,
    )
    .await?;
    let addr = SocketAddr::new(ip, port);
    ctx.allow(host, addr)?;
    out.stage = Stage::Connect;
    let stream = connect(addr, source).await?;
    out.stage = Stage::Exchange;
    let server_name = cfg.tls_config.server_name.as_deref().unwrap_or(host);
    let io: Io = match (&tls, cfg.tls) {
        (Some(client), true) => {
            let stream = client.handshake(ctx, server_name, stream, out).await?;
            TlsFacts::read(ctx, stream.get_ref().1, client).record(out, false);
            Box::new(stream)
        }
        _ => Box::new(stream),
    };
    query_responses(ctx, io, &cfg.query_response, tls.as_ref(), server_name, out).await
}

/// A connection the dialogue runs over, plain or TLS, before or after STARTTLS.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub(crate) type Io = Box<dyn Stream>;

/// blackbox_exporter's query_response loop, step by step.
async fn query_responses(
    ctx: &Env<'_>,
    io: Io,
    steps: &[QueryResponse],
    tls: Option<&TlsClient>,
    server_name: &str,
    out: &mut Samples,
) -> Result<(), Failure> {
    let mut conn = BufReader::with_capacity(8 * 1024, io);
    for (i, step) in steps.iter().enumerate() {
        let mut send = step.send.clone().unwrap_or_default().into_bytes();
        if let Some(pattern) = &step.expect {
            let re = ctx.regex(pattern).because(Reason::Config)?;
            // Lines are read until one matches; the connection ending first is a failed
            // expectation, as Go's Scanner reports it.
            let line = loop {
                match read_line(&mut conn).await? {
                    None => {
                        out.set("probe_failed_due_to_regex", 1.0);
                        return Err(Failure::new(
                            Reason::Regex,
                            format!(
                                "query_response[{i}]: connection closed before a line matched {pattern:?}"
                            ),
                        ));
                    }
                    Some(line) if re.is_match(&line) => break line,
                    Some(_) => {}
                }
            };
            out.set("probe_failed_due_to_regex", 0.0);
            let caps = re
                .captures(&line)
                .ok_or_else(|| Failure::new(Reason::Regex, "regex matched then did not"))?;
            let mut expanded = Vec::new();
            caps.expand(&send, &mut expanded);
            send = expanded;
            if !step.labels.is_empty() {
                let mut labels: Vec<(&'static str, String)> = Vec::new();
                for label in &step.labels {
                    let Some(name) = ctx.label_name(&label.name) else {
                        continue;
                    };
                    let mut value = Vec::new();
                    caps.expand(label.value.as_bytes(), &mut value);
                    labels.push((name, String::from_utf8_lossy(&value).into_owned()));
                }
                out.items.push(super::Sample {
                    name: "probe_expect_info",
                    labels,
                    value: 1.0,
                });
            }
        }
        if let Some(want) = &step.expect_bytes {
            let mut got = vec![0u8; want.len()];
            conn.read_exact(&mut got).await.map_err(|e| {
                Failure::new(
                    Reason::Protocol,
                    format!(
                        "query_response[{i}]: reading {} expected bytes: {}",
                        want.len(),
                        io_reason(&e)
                    ),
                )
            })?;
            if got != want.as_bytes() {
                out.set("probe_failed_due_to_bytes", 1.0);
                return Err(Failure::new(
                    Reason::Bytes,
                    format!(
                        "query_response[{i}]: read {:?}, expected {want:?}",
                        String::from_utf8_lossy(&got)
                    ),
                ));
            }
            out.set("probe_failed_due_to_bytes", 0.0);
        }
        if !send.is_empty() {
            send.push(b'\n');
            conn.write_all(&send).await.map_err(|e| {
                Failure::new(
                    Reason::Protocol,
                    format!("query_response[{i}]: send: {}", io_reason(&e)),
                )
            })?;
            conn.flush().await.map_err(|e| {
                Failure::new(
                    Reason::Protocol,
                    format!("query_response[{i}]: send: {}", io_reason(&e)),
                )
            })?;
        }
        if step.starttls {
            let client = tls.ok_or_else(|| {
                Failure::new(
                    Reason::Config,
                    "starttls without a TLS client configuration",
                )
            })?;
            // Whatever the peer sent after its "go ahead" line and before the handshake
            // is dropped, as Go's tls.Client over the raw connection does.
            let raw = conn.into_inner();
            let stream = client.handshake(ctx, server_name, raw, out).await?;
            TlsFacts::read(ctx, stream.get_ref().1, client).record(out, false);
            conn = BufReader::with_capacity(8 * 1024, Box::new(stream) as Io);
        }
    }
    Ok(())
}

/// One line without its `\n` (and `\r`), as Go's `bufio.ScanLines`; `None` at the end of
/// the stream. A line longer than [`MAX_LINE`] fails the probe.
async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, Failure> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await.map_err(|e| {
            Failure::new(
                Reason::Protocol,
                format!("query_response: reading: {}", io_reason(&e)),
            )
        })?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then(|| strip_cr(line)));
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE + 1 {
            return Err(Failure::new(
                Reason::Protocol,
                format!("query_response: a line longer than {MAX_LINE} bytes"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            return Ok(Some(strip_cr(line)));
        }
    }
}

fn strip_cr(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    line
}

pub(crate) fn parse_port(port: &str, target: &str) -> Result<u16, String> {
    port.parse::<u16>()
        .map_err(|_| format!("target {target:?}: {port:?} is not a port number"))
}

pub(crate) fn parse_source_ip(source: Option<&str>) -> Result<Option<IpAddr>, String> {
    source
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("source_ip_address {s:?} is not an IP address"))
        })
        .transpose()
}

/// The failure reason of a connect error.
pub(crate) fn connect_failure(e: &std::io::Error) -> Failure {
    let reason = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Reason::ConnectRefused,
        std::io::ErrorKind::TimedOut => Reason::ConnectTimeout,
        _ => Reason::ConnectError,
    };
    Failure::new(reason, format!("connect: {}", io_reason(e)))
}

/// Opens a TCP connection, from `source` when given. Nagle is off, as in Go's dialer.
pub(crate) async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, Failure> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| connect_failure(&e))?;
    if let Some(src) = source {
        socket.bind(SocketAddr::new(src, 0)).map_err(|e| {
            Failure::new(
                Reason::ConnectError,
                format!("bind {src}: {}", io_reason(&e)),
            )
        })?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| connect_failure(&e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A TLS client for one probe, built from a module's `tls_config`.
pub(crate) struct TlsClient {
    config: Arc<ClientConfig>,
    /// False with `insecure_skip_verify`: nothing was verified, so there is no verified
    /// chain to report an expiry for.
    verified: bool,
    /// The `ca_file` roots, kept whole so that their expiry counts in the chain's.
    ca_certs: Vec<CertificateDer<'static>>,
    /// The certificates the server showed in the last handshake, kept by the verifier
    /// so that a handshake that fails verification still reports their expiry.
    presented: Arc<Mutex<Vec<CertificateDer<'static>>>>,
}

impl TlsClient {
    /// `alpn` is offered in order (`h2`, `http/1.1` for the http prober).
    pub(crate) fn new(ctx: &ProbeContext, cfg: &TlsConfig, alpn: &[&[u8]]) -> Result<Self, String> {
        let min = cfg
            .min_version
            .as_deref()
            .and_then(tls_version_number)
            .unwrap_or(12);
        let max = cfg
            .max_version
            .as_deref()
            .and_then(tls_version_number)
            .unwrap_or(13);
        let versions: Vec<&'static rustls::SupportedProtocolVersion> =
            [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
                .into_iter()
                .filter(|(v, _)| (min..=max).contains(v))
                .map(|(_, p)| p)
                .collect();
        if versions.is_empty() {
            return Err(format!(
                "tls_config: no TLS version between min_version {} and max_version {} that the agent speaks (TLS12, TLS13)",
                cfg.min_version.as_deref().unwrap_or("TLS12"),
                cfg.max_version.as_deref().unwrap_or("TLS13")
            ));
        }
        let builder = ClientConfig::builder_with_provider(ctx.crypto.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| format!("tls: {e}"))?;
        let mut ca_certs = Vec::new();
        let verified = !cfg.insecure_skip_verify;
        let presented = Arc::new(Mutex::new(Vec::new()));
        let roots = if cfg.insecure_skip_verify {
            None
        } else if let Some(path) = &cfg.ca_file {
            ca_certs = read_certs(path, "ca_file")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in &ca_certs {
                roots
                    .add(cert.clone())
                    .map_err(|e| format!("tls_config.ca_file {path}: {e}"))?;
            }
            Some(Arc::new(roots))
        } else {
            Some(ctx.web_roots.clone())
        };
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            None => Arc::new(SkipVerify(ctx.crypto.clone(), presented.clone())),
            Some(roots) => {
                let inner = WebPkiServerVerifier::builder_with_provider(roots, ctx.crypto.clone())
                    .build()
                    .map_err(|e| format!("tls_config: {e}"))?;
                Arc::new(Capturing {
                    inner,
                    presented: presented.clone(),
                })
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "cert_file")?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("tls_config.key_file {key}: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("tls_config.cert_file: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Every probe is a full handshake, as in blackbox_exporter, so `tls` timings and
        // certificate samples are never those of a resumed session.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
            verified,
            ca_certs,
            presented,
        })
    }

    /// Completes a handshake over `stream`. When it fails after the server showed its
    /// certificates (an expired or untrusted one), their expiry and the leaf's details
    /// are still reported: `probe_ssl_earliest_cert_expiry` and
    /// `probe_ssl_last_chain_info` (blackbox_exporter reports nothing then, #1119).
    pub(crate) async fn handshake<S>(
        &self,
        ctx: &ProbeContext,
        server_name: &str,
        stream: S,
        out: &mut Samples,
    ) -> Result<tokio_rustls::client::TlsStream<S>, Failure>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let bare = server_name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(server_name);
        let name = ServerName::try_from(bare.to_string()).map_err(|_| {
            Failure::new(
                Reason::Config,
                format!("tls: {server_name:?} is not a valid server name"),
            )
        })?;
        self.presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let result = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await;
        result.map_err(|e| {
            let presented = self
                .presented
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if !presented.is_empty() {
                TlsFacts::from_certs(ctx, &presented).record_unverified(out);
            }
            let message = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(tls) => format!("tls: {tls}"),
                None => format!("tls: {}", io_reason(&e)),
            };
            Failure::new(Reason::Tls, message)
        })
    }
}

/// The platform verifier (webpki against the configured roots), noting what the server
/// presented before judging it.
#[derive(Debug)]
struct Capturing {
    inner: Arc<WebPkiServerVerifier>,
    presented: Arc<Mutex<Vec<CertificateDer<'static>>>>,
}

fn note_presented(
    into: &Mutex<Vec<CertificateDer<'static>>>,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) {
    // Bounded: a hostile server cannot make the agent keep a long chain.
    const MAX_CERTS: usize = 16;
    let mut seen = into.lock().unwrap_or_else(|e| e.into_inner());
    seen.clear();
    seen.push(end_entity.clone().into_owned());
    seen.extend(
        intermediates
            .iter()
            .take(MAX_CERTS - 1)
            .map(|c| c.clone().into_owned()),
    );
}

impl ServerCertVerifier for Capturing {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        note_presented(&self.presented, end_entity, intermediates);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn read_certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls_config.{what} {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_config.{what} {path}: no PEM certificate in it"
        ));
    }
    Ok(certs)
}

/// `insecure_skip_verify`: any certificate for any name, as Go's InsecureSkipVerify.
/// The handshake signatures are still checked, so the peer must hold the key of the
/// certificate it shows.
#[derive(Debug)]
struct SkipVerify(
    Arc<rustls::crypto::CryptoProvider>,
    Arc<Mutex<Vec<CertificateDer<'static>>>>,
);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        note_presented(&self.1, end_entity, intermediates);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

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
        let presented: Vec<x509::Cert<'_>> = conn
            .peer_certificates()
            .unwrap_or(&[])
            .iter()
            .filter_map(|c| x509::Cert::parse(c))
            .collect();
        let earliest_expiry = presented
            .iter()
            .map(|c| c.not_after)
            .min()
            .map_or(GO_ZERO_TIME, |t| t as f64);
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
        let leaf = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
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
        let earliest_expiry = parsed
            .iter()
            .map(|c| c.not_after)
            .min()
            .map_or(GO_ZERO_TIME, |t| t as f64);
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
        if with_cipher {
            out.gauge_with("probe_tls_cipher_info", &[("cipher", &self.cipher)], 1.0);
        }
        self.record_leaf(out);
    }
}

impl LeafInfo {
    fn of(ctx: &ProbeContext, der: &[u8], cert: &x509::Cert<'_>) -> Self {
        LeafInfo {
            fingerprint_sha256: sha256_hex(ctx, der),
            subject: x509::name_string(cert.subject),
            issuer: x509::name_string(cert.issuer),
            subject_alternative: cert.dns_names.join(","),
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

/// Just enough X.509 (DER) reading for the samples blackbox_exporter derives from the
/// certificates: validity end, issuer and subject names, serial, DNS names. Input is the
/// peer's and hostile: every read is bounds-checked and a malformed certificate is
/// skipped, never a panic.
pub(crate) mod x509 {
    /// One DER element: (tag, content, the whole element, what follows it).
    type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

    fn tlv(input: &[u8]) -> Option<Tlv<'_>> {
        let tag = *input.first()?;
        if tag & 0x1f == 0x1f {
            return None; // multi-byte tags never occur in the parts read here
        }
        let first = *input.get(1)?;
        let (len, header) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let bytes = input.get(2..2 + n)?;
            let len = bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, 2 + n)
        };
        let end = header.checked_add(len)?;
        let whole = input.get(..end)?;
        Some((tag, &whole[header..], whole, &input[end..]))
    }

    fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8], &[u8])> {
        let (t, content, whole, rest) = tlv(input)?;
        (t == tag).then_some((content, whole, rest))
    }

    const SEQUENCE: u8 = 0x30;

    #[derive(Debug)]
    pub(crate) struct Cert<'a> {
        pub(crate) serial: &'a [u8],
        /// The encoded Name, compared byte for byte to link a chain.
        pub(crate) issuer: &'a [u8],
        pub(crate) subject: &'a [u8],
        pub(crate) not_after: i64,
        pub(crate) dns_names: Vec<String>,
    }

    impl<'a> Cert<'a> {
        pub(crate) fn parse(der: &'a [u8]) -> Option<Self> {
            let (cert, _, _) = expect(der, SEQUENCE)?;
            let (tbs, _, _) = expect(cert, SEQUENCE)?;
            let mut rest = tbs;
            if let Some((0xa0, _, _, after)) = tlv(rest) {
                rest = after; // explicit version
            }
            let (serial, _, rest) = expect(rest, 0x02)?;
            let (_, _, rest) = expect(rest, SEQUENCE)?; // signature algorithm
            let (_, issuer, rest) = expect(rest, SEQUENCE)?;
            let (validity, _, rest) = expect(rest, SEQUENCE)?;
            let (_, _, _, after_not_before) = tlv(validity)?;
            let (time_tag, not_after, _, _) = tlv(after_not_before)?;
            let not_after = parse_time(time_tag, not_after)?;
            let (_, subject, rest) = expect(rest, SEQUENCE)?;
            let (_, _, mut rest) = expect(rest, SEQUENCE)?; // public key
            let mut dns_names = Vec::new();
            while let Some((tag, content, _, after)) = tlv(rest) {
                if tag == 0xa3 {
                    dns_names = san_dns_names(content).unwrap_or_default();
                }
                rest = after;
            }
            Some(Self {
                serial,
                issuer,
                subject,
                not_after,
                dns_names,
            })
        }

        /// As Go's `fmt.Sprintf("%x", serial.Bytes())`: big-endian, no leading zeros.
        pub(crate) fn serial_hex(&self) -> String {
            let start = self
                .serial
                .iter()
                .position(|b| *b != 0)
                .unwrap_or(self.serial.len());
            self.serial[start..]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        }
    }

    /// The dNSName entries of the subjectAltName extension (2.5.29.17).
    fn san_dns_names(explicit: &[u8]) -> Option<Vec<String>> {
        const SAN: &[u8] = &[0x55, 0x1d, 0x11];
        let (mut exts, _, _) = expect(explicit, SEQUENCE)?;
        while let Some((ext, _, rest)) = expect(exts, SEQUENCE) {
            exts = rest;
            let (oid, _, mut fields) = expect(ext, 0x06)?;
            if oid != SAN {
                continue;
            }
            if let Some((0x01, _, _, after)) = tlv(fields) {
                fields = after; // critical flag
            }
            let (value, _, _) = expect(fields, 0x04)?;
            let (mut names, _, _) = expect(value, SEQUENCE)?;
            let mut out = Vec::new();
            while let Some((tag, content, _, rest)) = tlv(names) {
                names = rest;
                if tag == 0x82 {
                    out.push(String::from_utf8_lossy(content).into_owned());
                }
            }
            return Some(out);
        }
        Some(Vec::new())
    }

    /// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix seconds.
    fn parse_time(tag: u8, text: &[u8]) -> Option<i64> {
        let digits = |s: &[u8]| -> Option<i64> {
            s.iter().try_fold(0i64, |acc, b| {
                b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
            })
        };
        let (year, rest) = match tag {
            0x17 => {
                let yy = digits(text.get(..2)?)?;
                (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
            }
            0x18 => (digits(text.get(..4)?)?, text.get(4..)?),
            _ => return None,
        };
        if rest.len() != 11 || rest[10] != b'Z' {
            return None;
        }
        let field = |i: usize| digits(&rest[i..i + 2]);
        super::super::unix_time(year, field(0)?, field(2)?, field(4)?, field(6)?, field(8)?)
    }

    /// The chain blackbox_exporter's `probe_ssl_last_chain_expiry_timestamp_seconds`
    /// looks at: from the leaf, each issuer among the presented certificates (and the
    /// `ca_file` roots), to the end; the earliest expiry on it. The built-in roots have
    /// no date on them here, and they outlive the certificates they sign.
    pub(crate) fn chain_expiry(presented: &[Cert<'_>], roots: &[Cert<'_>]) -> Option<i64> {
        let mut current = presented.first()?;
        let mut earliest = current.not_after;
        let mut used = vec![false; presented.len()];
        used[0] = true;
        for _ in 0..presented.len() + 1 {
            if current.issuer == current.subject {
                break;
            }
            let next = presented
                .iter()
                .enumerate()
                .find(|(i, c)| !used[*i] && c.subject == current.issuer)
                .map(|(i, c)| {
                    used[i] = true;
                    c
                })
                .or_else(|| roots.iter().find(|c| c.subject == current.issuer));
            match next {
                Some(next) => {
                    earliest = earliest.min(next.not_after);
                    current = next;
                }
                None => break,
            }
        }
        Some(earliest)
    }

    /// A distinguished name as Go's `pkix.Name.String()` writes it: the well-known
    /// attributes in Go's fixed order (then reversed, RFC 2253 style), other attributes
    /// as `OID=#hex`, values escaped as Go does.
    pub(crate) fn name_string(name: &[u8]) -> String {
        // Go's ToRDNSequence order; the output is that sequence reversed.
        const ORDER: [(u8, &str); 9] = [
            (6, "C"),
            (8, "ST"),
            (7, "L"),
            (9, "STREET"),
            (17, "POSTALCODE"),
            (10, "O"),
            (11, "OU"),
            (3, "CN"),
            (5, "SERIALNUMBER"),
        ];
        let Some((mut rdns, _, _)) = expect(name, SEQUENCE) else {
            return String::new();
        };
        let mut known: Vec<(u8, String)> = Vec::new();
        let mut others: Vec<String> = Vec::new();
        while let Some((0x31, set, _, rest)) = tlv(rdns) {
            rdns = rest;
            let mut atvs = set;
            while let Some((atv, _, rest)) = expect(atvs, SEQUENCE) {
                atvs = rest;
                let Some((oid, _, value)) = expect(atv, 0x06) else {
                    continue;
                };
                let Some((vtag, vcontent, vwhole, _)) = tlv(value) else {
                    continue;
                };
                match oid {
                    [0x55, 0x04, attr] if ORDER.iter().any(|(a, _)| a == attr) => {
                        if let Some(text) = decode_string(vtag, vcontent) {
                            known.push((*attr, text));
                        }
                    }
                    _ => others.push(format!(
                        "{}=#{}",
                        oid_string(oid),
                        hex(&go_marshal(vtag, vcontent, vwhole))
                    )),
                }
            }
        }
        let mut parts: Vec<String> = others;
        for (attr, label) in ORDER {
            let values: Vec<&String> = known
                .iter()
                .filter(|(a, _)| *a == attr)
                .map(|(_, v)| v)
                .collect();
            // Go keeps only the last CommonName and SerialNumber, every value of the rest.
            let values = match attr {
                3 | 5 => values.last().map(|v| vec![*v]).unwrap_or_default(),
                _ => values,
            };
            if values.is_empty() {
                continue;
            }
            let rdn: Vec<String> = values
                .iter()
                .map(|v| format!("{label}={}", escape(v)))
                .collect();
            parts.push(rdn.join("+"));
        }
        parts.reverse();
        parts.join(",")
    }

    fn decode_string(tag: u8, content: &[u8]) -> Option<String> {
        match tag {
            // UTF8String, PrintableString, IA5String, T61String (Go reads it as Latin-1)
            0x0c | 0x13 | 0x16 => std::str::from_utf8(content).ok().map(str::to_string),
            0x14 => Some(content.iter().map(|b| char::from(*b)).collect()),
            // BMPString: UTF-16BE
            0x1e if content.len().is_multiple_of(2) => {
                let units: Vec<u16> = content
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16(&units).ok()
            }
            _ => None,
        }
    }

    /// Go re-encodes an unknown attribute's string value with `asn1.Marshal`: as a
    /// PrintableString when every character allows it, else a UTF8String.
    fn go_marshal(tag: u8, content: &[u8], whole: &[u8]) -> Vec<u8> {
        let Some(text) = decode_string(tag, content) else {
            return whole.to_vec();
        };
        let printable = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" '()+,-./:=?*".contains(&b));
        let bytes = text.as_bytes();
        let mut out = vec![if printable { 0x13 } else { 0x0c }];
        if bytes.len() < 0x80 {
            out.push(bytes.len() as u8);
        } else {
            let len = bytes.len().to_be_bytes();
            let skip = len.iter().position(|b| *b != 0).unwrap_or(len.len() - 1);
            out.push(0x80 | (len.len() - skip) as u8);
            out.extend_from_slice(&len[skip..]);
        }
        out.extend_from_slice(bytes);
        out
    }

    fn oid_string(oid: &[u8]) -> String {
        let mut arcs: Vec<u64> = Vec::new();
        let mut acc: u64 = 0;
        for b in oid {
            acc = (acc << 7) | u64::from(b & 0x7f);
            if b & 0x80 == 0 {
                if arcs.is_empty() {
                    let first = (acc / 40).min(2);
                    arcs.push(first);
                    arcs.push(acc - first * 40);
                } else {
                    arcs.push(acc);
                }
                acc = 0;
            }
        }
        arcs.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(".")
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Go's RDNSequence escaping.
    fn escape(value: &str) -> String {
        let count = value.chars().count();
        let mut out = String::with_capacity(value.len());
        for (i, c) in value.chars().enumerate() {
            let needs = match c {
                ',' | '+' | '"' | '\\' | '<' | '>' | ';' => true,
                ' ' => i == 0 || i + 1 == count,
                '#' => i == 0,
                _ => false,
            };
            if needs {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::probe::{ProbeOutcome, Reason, run};
    use sonde_proto::config::Prober;
    use std::time::Duration;
    use tokio::net::TcpListener;

    pub(crate) fn module(prober: Prober) -> Module {
        serde_json::from_value(serde_json::json!({ "prober": prober.as_str() })).unwrap()
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

    pub(crate) fn labelled(
        o: &ProbeOutcome,
        name: &str,
    ) -> Vec<(Vec<(&'static str, String)>, f64)> {
        o.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| (s.labels.clone(), s.value))
            .collect()
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

    #[tokio::test]
    async fn probe_tcp_connects_to_an_open_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = module(Prober::Tcp);
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_success"), Some(1.0));
        assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
        assert_eq!(
            sample(&o, "probe_ip_addr_hash"),
            Some(f64::from(crate::probe::ip_hash(addr.ip())))
        );
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));
        assert!(sample(&o, "probe_duration_seconds").unwrap() > 0.0);
        assert!(sample(&o, "probe_ssl_earliest_cert_expiry").is_none());
    }

    #[tokio::test]
    async fn probe_tcp_resolves_localhost_with_ip4() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut m = module(Prober::Tcp);
        m.tcp.preferred_ip_protocol = sonde_proto::config::module::IpProtocol::Ip4;
        m.tcp.ip_protocol_fallback = false;
        let o = run(
            &ctx(),
            &format!("localhost:{port}"),
            &m,
            Duration::from_secs(2),
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
    }

    #[tokio::test]
    async fn probe_tcp_closed_port_fails_with_a_reason() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let o = run(
            &ctx(),
            &format!("127.0.0.1:{port}"),
            &module(Prober::Tcp),
            Duration::from_secs(2),
        )
        .await;
        assert!(!o.success);
        assert_eq!(o.failure.as_deref(), Some("connect: connection refused"));
        assert_eq!(sample(&o, "probe_success"), Some(0.0));
        // Resolution happened before the failure and is still reported.
        assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
        // Registered before dialing, as blackbox_exporter 0.23 does.
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));
        assert_eq!(o.failure_reason, Some(crate::probe::Reason::ConnectRefused));
        assert_eq!(
            labelled(&o, "probe_failure_info"),
            vec![(vec![("reason", "connect_refused".to_string())], 1.0)]
        );
    }

    #[tokio::test]
    async fn probe_tcp_bad_targets_fail_cleanly() {
        let c = ctx();
        let m = module(Prober::Tcp);
        for target in [
            "127.0.0.1",
            "127.0.0.1:notaport",
            "::1:80",
            "[::1",
            ":80",
            "127.0.0.1:99999",
        ] {
            let o = run(&c, target, &m, Duration::from_secs(1)).await;
            assert!(!o.success, "{target}");
            assert!(o.failure.is_some(), "{target}");
        }
    }

    #[tokio::test]
    async fn probe_tcp_source_ip_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.unwrap().1 });
        let mut m = module(Prober::Tcp);
        m.tcp.source_ip_address = Some("127.0.0.1".to_string());
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(accept.await.unwrap().ip(), addr.ip());
        m.tcp.source_ip_address = Some("not-an-ip".to_string());
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.failure.clone().unwrap().contains("source_ip_address"));
    }

    #[tokio::test]
    async fn probe_tcp_tls_strict_fails_on_an_unknown_issuer() {
        let pki = test_pki();
        let addr = tls_server(&pki, &[], |_s| async {}).await;
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(!o.success);
        let reason = o.failure.clone().unwrap();
        assert!(
            reason.starts_with("tls: invalid peer certificate"),
            "{reason}"
        );
        assert_eq!(o.failure_reason, Some(crate::probe::Reason::Tls));
        // Beyond blackbox_exporter: the untrusted certificate's expiry is still reported.
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
        let info = labelled(&o, "probe_ssl_last_chain_info");
        assert_eq!(info.len(), 1);
        assert!(labelled(&o, "probe_tls_version_info").is_empty());
    }

    #[tokio::test]
    async fn probe_tcp_tls_with_ca_file_reports_certificate_dates() {
        let pki = test_pki();
        let addr = tls_server(&pki, &[], |_s| async {}).await;
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        m.tcp.tls_config.ca_file = Some(ca_file(&pki));
        m.tcp.tls_config.server_name = Some("localhost".to_string());
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
        assert_eq!(
            sample(&o, "probe_ssl_last_chain_expiry_timestamp_seconds"),
            Some(LEAF_NOT_AFTER)
        );
        assert_eq!(
            labelled(&o, "probe_tls_version_info"),
            vec![(vec![("version", "TLS 1.3".to_string())], 1.0)]
        );
        let info = labelled(&o, "probe_ssl_last_chain_info");
        assert_eq!(info.len(), 1);
        let labels: std::collections::HashMap<_, _> = info[0].0.iter().cloned().collect();
        assert_eq!(labels["subject"], "CN=localhost");
        assert_eq!(labels["issuer"], "CN=sonde test CA,O=sonde\\, tests");
        assert_eq!(labels["subjectalternative"], "localhost");
        assert_eq!(labels["serialnumber"], "8f01");
        assert_eq!(labels["fingerprint_sha256"].len(), 64);
        // The tcp prober has no cipher sample, as in blackbox_exporter.
        assert!(labelled(&o, "probe_tls_cipher_info").is_empty());

        // The wrong name is a failure even with the right CA.
        m.tcp.tls_config.server_name = Some("other.example".to_string());
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(
            o.failure
                .clone()
                .unwrap()
                .starts_with("tls: invalid peer certificate")
        );
    }

    #[tokio::test]
    async fn probe_tcp_tls_insecure_skip_verify() {
        let pki = test_pki();
        let addr = tls_server(&pki, &[], |_s| async {}).await;
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        m.tcp.tls_config.insecure_skip_verify = true;
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
        // No verified chain: Go's zero time, as blackbox_exporter reports.
        assert_eq!(
            sample(&o, "probe_ssl_last_chain_expiry_timestamp_seconds"),
            Some(GO_ZERO_TIME)
        );
    }

    #[tokio::test]
    async fn probe_tcp_tls_against_a_plain_server_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            }
        });
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        m.tcp.tls_config.insecure_skip_verify = true;
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(!o.success);
        assert!(o.failure.clone().unwrap().starts_with("tls: "));
    }

    #[tokio::test]
    async fn probe_tcp_missing_ca_file_fails_before_connecting() {
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        m.tcp.tls_config.ca_file = Some("/nonexistent/ca.pem".to_string());
        let o = run(&ctx(), "127.0.0.1:1", &m, Duration::from_secs(1)).await;
        assert!(
            o.failure
                .clone()
                .unwrap()
                .contains("ca_file /nonexistent/ca.pem")
        );
        assert!(sample(&o, "probe_ip_protocol").is_none());
    }

    /// A line server: greets, answers `PING <x>` with `PONG <x>`, `STARTTLS` with
    /// `GO` and a TLS handshake, `BIN` with raw bytes, and `QUIT` by closing.
    async fn line_server(pki: &TestPki) -> SocketAddr {
        let acceptor = acceptor(pki, &[], false);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut io: Io = Box::new(stream);
                    let _ = io
                        .write_all(b"noise before the greeting\r\n* OK line-7 ready\r\n")
                        .await;
                    let mut reader = BufReader::new(io);
                    loop {
                        let Ok(Some(line)) = read_line(&mut reader).await else {
                            return;
                        };
                        let line = String::from_utf8_lossy(&line).into_owned();
                        let reply: Vec<u8> = if let Some(x) = line.strip_prefix("PING ") {
                            format!("PONG {x}\r\n").into_bytes()
                        } else if line == "BIN" {
                            b"\x00\x01SONDE".to_vec()
                        } else if line == "LONG" {
                            vec![b'x'; MAX_LINE + 10]
                        } else if line == "STARTTLS" {
                            let _ = reader.write_all(b"GO\r\n").await;
                            let raw = reader.into_inner();
                            let Ok(tls) = acceptor.accept(raw).await else {
                                return;
                            };
                            reader = BufReader::new(Box::new(tls) as Io);
                            let _ = reader.write_all(b"* OK secure\r\n").await;
                            let _ = reader.flush().await;
                            continue;
                        } else {
                            return;
                        };
                        let _ = reader.write_all(&reply).await;
                        let _ = reader.flush().await;
                    }
                });
            }
        });
        addr
    }

    fn qr_module(json: serde_json::Value) -> Module {
        serde_json::from_value(serde_json::json!({"prober": "tcp", "tcp": json})).unwrap()
    }

    #[tokio::test]
    async fn probe_tcp_query_response_substitutes_captures_and_labels() {
        let pki = test_pki();
        let addr = line_server(&pki).await;
        let m = qr_module(serde_json::json!({"query_response": [
            {"expect": "^\\* OK (?P<name>[a-z]+)-(\\d+) ready$",
             "send": "PING ${name}${2}",
             "labels": [{"name": "server", "value": "${name}"}, {"name": "build", "value": "v$2"}]},
            {"expect": "^PONG line7$"},
            {"send": "BIN"},
            {"expect_bytes": "\u{0}\u{1}SONDE", "send": "QUIT"},
        ]}));
        m.validate().unwrap();
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));
        assert_eq!(sample(&o, "probe_failed_due_to_bytes"), Some(0.0));
        assert_eq!(
            labelled(&o, "probe_expect_info"),
            vec![(
                vec![("server", "line".to_string()), ("build", "v7".to_string())],
                1.0
            )]
        );
    }

    #[tokio::test]
    async fn probe_tcp_query_response_failures() {
        let pki = test_pki();
        let addr = line_server(&pki).await;
        let cases = [
            (
                // No line matches and the server stays open: the deadline ends it, and
                // like blackbox_exporter that is not counted as a regex failure.
                serde_json::json!([{"expect": "^\\* OK", "send": "PING a"}, {"expect": "^PONG b$"}]),
                Reason::Timeout,
                ("probe_failed_due_to_regex", 0.0),
            ),
            (
                serde_json::json!([{"send": "BIN"}, {"expect_bytes": "\u{0}\u{1}OTHER"}]),
                Reason::Bytes,
                ("probe_failed_due_to_bytes", 1.0),
            ),
            (
                serde_json::json!([{"send": "LONG"}, {"expect": "never"}]),
                Reason::Protocol,
                ("probe_failed_due_to_regex", 0.0),
            ),
        ];
        for (steps, reason, (metric, value)) in cases {
            let m = qr_module(serde_json::json!({ "query_response": steps }));
            let o = run(&ctx(), &addr.to_string(), &m, Duration::from_millis(500)).await;
            assert!(!o.success, "{steps}");
            assert_eq!(o.failure_reason, Some(reason), "{steps}: {:?}", o.failure);
            assert_eq!(sample(&o, metric), Some(value), "{steps}");
        }
        // The server closes on QUIT: a later expect fails as a regex failure, as Go's
        // Scanner ends without a match.
        let m =
            qr_module(serde_json::json!({"query_response": [{"send": "QUIT"}, {"expect": "bye"}]}));
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert_eq!(o.failure_reason, Some(Reason::Regex));
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(1.0));
    }

    #[tokio::test]
    async fn probe_tcp_starttls_upgrades_and_reports_the_certificate() {
        let pki = test_pki();
        let addr = line_server(&pki).await;
        let steps = serde_json::json!([
            {"expect": "ready$", "send": "STARTTLS"},
            {"expect": "^GO$", "starttls": true},
            {"expect": "^\\* OK secure$", "send": "PING tls"},
            {"expect": "^PONG tls$", "send": "QUIT"},
        ]);
        let m = qr_module(serde_json::json!({
            "query_response": steps,
            "tls_config": {"ca_file": ca_file(&pki), "server_name": "localhost"},
        }));
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
        assert_eq!(labelled(&o, "probe_tls_version_info").len(), 1);
        // Without the CA the upgrade fails as a TLS failure, with the expiry reported.
        let m = qr_module(serde_json::json!({ "query_response": steps }));
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert_eq!(o.failure_reason, Some(Reason::Tls), "{:?}", o.failure);
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
    }

    #[tokio::test]
    async fn probe_tcp_tls_version_bounds() {
        let pki = test_pki();
        let acceptor = acceptor(&pki, &[], true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(s).await;
                });
            }
        });
        let tls = |cfg: serde_json::Value| {
            let mut c = serde_json::json!({"insecure_skip_verify": true});
            c.as_object_mut()
                .unwrap()
                .extend(cfg.as_object().unwrap().clone());
            qr_module(serde_json::json!({"tls": true, "tls_config": c}))
        };
        let o = run(
            &ctx(),
            &addr.to_string(),
            &tls(serde_json::json!({"min_version": "TLS13"})),
            Duration::from_secs(2),
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        let o = run(
            &ctx(),
            &addr.to_string(),
            &tls(serde_json::json!({"min_version": "TLS10"})),
            Duration::from_secs(2),
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        let m = tls(serde_json::json!({"max_version": "TLS12"}));
        m.validate().unwrap();
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert_eq!(o.failure_reason, Some(Reason::Tls), "{:?}", o.failure);
        assert!(
            tls(serde_json::json!({"max_version": "TLS11"}))
                .validate()
                .is_err()
        );
        assert!(
            tls(serde_json::json!({"min_version": "SSL3"}))
                .validate()
                .is_err()
        );
    }

    struct RefuseAll;
    impl crate::probe::ConnectPolicy for RefuseAll {
        fn check_host(&self, _: &str, _: u16) -> Result<(), String> {
            Ok(())
        }
        fn check_addr(&self, addr: SocketAddr) -> Result<(), String> {
            Err(format!("{addr} is not allowed"))
        }
    }

    #[tokio::test]
    async fn probe_tcp_policy_refuses_before_connecting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let o = crate::probe::run_with_policy(
            &ctx(),
            Some(&RefuseAll),
            &addr.to_string(),
            &module(Prober::Tcp),
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(o.failure_reason, Some(Reason::RefusedByPolicy));
        // Nothing connected: the listener has no pending connection.
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "the probe connected despite the policy");
    }

    #[test]
    fn x509_reads_the_test_certificates() {
        let pki = test_pki();
        let leaf = x509::Cert::parse(&pki.leaf_der).unwrap();
        let ca = x509::Cert::parse(&pki.ca_der).unwrap();
        assert_eq!(leaf.not_after as f64, LEAF_NOT_AFTER);
        assert_eq!(ca.not_after as f64, CA_NOT_AFTER);
        assert_eq!(leaf.issuer, ca.subject);
        assert_eq!(leaf.dns_names, vec!["localhost".to_string()]);
        assert_eq!(
            x509::chain_expiry(&[leaf], &[ca]),
            Some(LEAF_NOT_AFTER as i64)
        );
    }

    #[test]
    fn x509_never_panics_on_garbage() {
        let pki = test_pki();
        for cut in 0..pki.leaf_der.len() {
            let _ = x509::Cert::parse(&pki.leaf_der[..cut]);
        }
        let mut flipped = pki.leaf_der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            if let Some(c) = x509::Cert::parse(&flipped) {
                let _ = x509::name_string(c.subject);
                let _ = c.serial_hex();
            }
            flipped[i] ^= 0xff;
        }
        assert!(x509::Cert::parse(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        let _ = x509::name_string(&[0x30, 0x03, 0x31, 0x01, 0x30]);
    }

    #[test]
    fn x509_name_strings_follow_go() {
        // SEQUENCE { SET { C=US } SET { O=Acme+ } SET { CN=" a" } SET { email } }
        let atv = |oid: &[u8], tag: u8, v: &[u8]| {
            let mut inner = vec![0x06, oid.len() as u8];
            inner.extend_from_slice(oid);
            inner.extend_from_slice(&[tag, v.len() as u8]);
            inner.extend_from_slice(v);
            let mut seq = vec![0x30, inner.len() as u8];
            seq.extend(inner);
            let mut set = vec![0x31, seq.len() as u8];
            set.extend(seq);
            set
        };
        let mut body = Vec::new();
        body.extend(atv(&[0x55, 4, 6], 0x13, b"US"));
        body.extend(atv(&[0x55, 4, 10], 0x0c, b"Acme+"));
        body.extend(atv(&[0x55, 4, 3], 0x0c, b" a"));
        body.extend(atv(
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
            0x16,
            b"a@b",
        ));
        let mut name = vec![0x30, body.len() as u8];
        name.extend(body);
        assert_eq!(
            x509::name_string(&name),
            "CN=\\ a,O=Acme\\+,C=US,1.2.840.113549.1.9.1=#0c03614062"
        );
    }
}
