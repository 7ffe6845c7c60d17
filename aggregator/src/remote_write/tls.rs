//! An endpoint's TLS options and the rustls setup built from them: built once when the
//! config is checked (so a missing or broken file is found before the first send) and
//! again by the client.

use super::setting::{SettingError, invalid};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificates (PEM) that replace the built-in web PKI roots, as in Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Name sent in SNI and checked against the certificate, instead of the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// The rustls setup for `tls`, ring as the crypto provider. Reading every file here
/// means that config validation finds a missing or broken file before the first send.
pub(crate) fn tls_client_config(tls: &TlsConfig) -> Result<rustls::ClientConfig, SettingError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("tls_config: {e}")))?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(sonde_proto::tls::SkipVerify::new(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca_file {
            // As in Prometheus, a ca_file replaces the public roots: a private receiver
            // is then trusted only through the CA that the user named.
            Some(path) => {
                let certs = read_certs("tls_config.ca_file", path)?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(invalid(format!(
                        "tls_config.ca_file: no usable CA certificate in {}",
                        path.display()
                    )));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let certs = read_certs("tls_config.cert_file", cert)?;
            let key = sonde_proto::tls::read_private_key(key)
                .map_err(|e| invalid(format!("tls_config.key_file: {e}")))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                invalid(format!(
                    "tls_config: cert_file and key_file do not fit: {e}"
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(invalid(
                "tls_config: cert_file is set without key_file; set both or neither".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "tls_config: key_file is set without cert_file; set both or neither".into(),
            ));
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certs(option: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, SettingError> {
    sonde_proto::tls::read_certificates(path).map_err(|e| invalid(format!("{option}: {e}")))
}
