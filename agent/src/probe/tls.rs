//! The TLS client the probers share: trust roots (`ca_file` or the Mozilla roots),
//! `insecure_skip_verify`, client certificates and version bounds from a module's
//! `tls_config`, and a handshake that still reports what the server showed when it
//! fails verification.

use super::tls_samples::TlsFacts;
use super::{Failure, ProbeContext, Reason, Samples, io_reason};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use sonde_proto::config::module::{TlsConfig, tls_version_number};
use sonde_proto::tls::{PemError, SkipVerify, read_certificates, read_private_key};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};

/// Why a module's `tls_config` gives no TLS client; each message names the option.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsSetupError {
    #[error(
        "tls_config: no TLS version between min_version {min} and max_version {max} that the agent speaks (TLS12, TLS13)"
    )]
    NoVersion { min: String, max: String },
    #[error("tls: {0}")]
    Versions(rustls::Error),
    #[error("tls_config.{what}: {error}")]
    Pem { what: &'static str, error: PemError },
    #[error("tls_config.ca_file {path}: {error}")]
    BadCa { path: String, error: rustls::Error },
    #[error("tls_config: {0}")]
    Verifier(rustls::client::VerifierBuilderError),
    #[error("tls_config.cert_file: {0}")]
    ClientCert(rustls::Error),
}

/// A TLS client for one probe, built from a module's `tls_config`.
pub(crate) struct TlsClient {
    config: Arc<ClientConfig>,
    /// False with `insecure_skip_verify`: nothing was verified, so there is no verified
    /// chain to report an expiry for.
    pub(super) verified: bool,
    /// The `ca_file` roots, kept whole so that their expiry counts in the chain's.
    pub(super) ca_certs: Vec<CertificateDer<'static>>,
    /// The certificates the server showed in the last handshake, kept by the verifier
    /// so that a handshake that fails verification still reports their expiry.
    presented: Arc<Mutex<Vec<CertificateDer<'static>>>>,
}

impl TlsClient {
    /// `alpn` is offered in order (`h2`, `http/1.1` for the http prober).
    pub(crate) fn new(
        ctx: &ProbeContext,
        cfg: &TlsConfig,
        alpn: &[&[u8]],
    ) -> Result<Self, TlsSetupError> {
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
            return Err(TlsSetupError::NoVersion {
                min: cfg.min_version.as_deref().unwrap_or("TLS12").to_string(),
                max: cfg.max_version.as_deref().unwrap_or("TLS13").to_string(),
            });
        }
        let builder = ClientConfig::builder_with_provider(ctx.crypto.clone())
            .with_protocol_versions(&versions)
            .map_err(TlsSetupError::Versions)?;
        let mut ca_certs = Vec::new();
        let verified = !cfg.insecure_skip_verify;
        let presented = Arc::new(Mutex::new(Vec::new()));
        let roots = if cfg.insecure_skip_verify {
            None
        } else if let Some(path) = &cfg.ca_file {
            ca_certs = read_pem(read_certificates, path, "ca_file")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in &ca_certs {
                roots
                    .add(cert.clone())
                    .map_err(|error| TlsSetupError::BadCa {
                        path: path.clone(),
                        error,
                    })?;
            }
            Some(Arc::new(roots))
        } else {
            Some(ctx.web_roots.clone())
        };
        let inner: Arc<dyn ServerCertVerifier> = match roots {
            None => Arc::new(SkipVerify::new(ctx.crypto.clone())),
            Some(roots) => WebPkiServerVerifier::builder_with_provider(roots, ctx.crypto.clone())
                .build()
                .map_err(TlsSetupError::Verifier)?,
        };
        let verifier = Arc::new(Capturing {
            inner,
            presented: presented.clone(),
        });
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&cfg.cert_file, &cfg.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_pem(read_certificates, cert, "cert_file")?;
                let key = read_pem(read_private_key, key, "key_file")?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(TlsSetupError::ClientCert)?
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
        self.forget_presented();
        crate::probe_log!(out.log, Debug, "Starting TLS handshake", server_name = bare);
        let result = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await;
        if out.log.is_on()
            && let Ok(stream) = &result
        {
            let conn = stream.get_ref().1;
            crate::probe_log!(
                out.log,
                Debug,
                "TLS handshake done",
                version = conn
                    .protocol_version()
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown"),
                cipher = conn
                    .negotiated_cipher_suite()
                    .and_then(|c| c.suite().as_str())
                    .unwrap_or("unknown"),
                alpn = conn
                    .alpn_protocol()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
            );
        }
        result.map_err(|e| {
            let error = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(tls) => tls.to_string(),
                None => io_reason(&e),
            };
            self.handshake_failed(ctx, out, error)
        })
    }

    /// The rustls configuration, for a QUIC connection (which runs the handshake itself).
    pub(crate) fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Forgets the certificates of an earlier handshake, before the next one.
    pub(crate) fn forget_presented(&self) {
        self.presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// A handshake that failed with `error`: what the server presented is still
    /// reported, the error goes in the trace.
    pub(crate) fn handshake_failed(
        &self,
        ctx: &ProbeContext,
        out: &mut Samples,
        error: String,
    ) -> Failure {
        let presented = self
            .presented
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !presented.is_empty() {
            TlsFacts::from_certs(ctx, &presented).record_unverified(out);
        }
        out.note(sonde_proto::trace::Step::Tls {
            error: error.clone(),
        });
        Failure::new(Reason::Tls, format!("tls: {error}"))
    }
}

/// A verifier (webpki against the configured roots, or [`SkipVerify`] for
/// `insecure_skip_verify`), noting what the server presented before judging it.
#[derive(Debug)]
struct Capturing {
    inner: Arc<dyn ServerCertVerifier>,
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

/// `read` (certificates or a key) of the file at `path`, named by `what` in the error.
fn read_pem<T>(
    read: fn(&std::path::Path) -> Result<T, PemError>,
    path: &str,
    what: &'static str,
) -> Result<T, TlsSetupError> {
    read(std::path::Path::new(path)).map_err(|error| TlsSetupError::Pem { what, error })
}
