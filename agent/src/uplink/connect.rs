//! Opening the gRPC channel to one aggregator (its address, TLS and client certificate),
//! and telling the user why a stream was refused.

use super::is_refusal;
use crate::config::AggregatorEndpoint;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Why no channel to an aggregator could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "invalid aggregator address {address:?}: {source}; write it as http://host:port or https://host:port"
    )]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    /// A file of the aggregator's `tls_config` (`option`) cannot be read.
    #[error("cannot read {option} {} of aggregator {address}: {source}", path.display())]
    TlsFile {
        address: String,
        option: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "TLS setup for {address}: {}; check its tls_config",
        sonde_cli::errors::describe(source)
    )]
    Tls {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("connect to {address}: {}", sonde_cli::errors::describe(source))]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
}

/// Opens the channel to `endpoint`: plain HTTP/2, or TLS for `https://` with the
/// endpoint's CA, client certificate and server name.
pub(super) async fn connect(endpoint: &AggregatorEndpoint) -> Result<Channel, ConnectError> {
    let address = &endpoint.address;
    let mut ep = Endpoint::from_shared(address.clone())
        .map_err(|source| ConnectError::Address {
            address: address.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if address.starts_with("https://") {
        let read = |option: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|source| ConnectError::TlsFile {
                address: address.clone(),
                option,
                path: path.clone(),
                source,
            })
        };
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(cfg) = &endpoint.tls_config {
            if let Some(ca) = &cfg.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read("ca_file", ca)?));
            }
            if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
                tls = tls.identity(Identity::from_pem(
                    read("cert_file", cert)?,
                    read("key_file", key)?,
                ));
            }
            if let Some(name) = &cfg.server_name {
                tls = tls.domain_name(name.clone());
            }
        }
        ep = ep.tls_config(tls).map_err(|source| ConnectError::Tls {
            address: address.clone(),
            source,
        })?;
    }
    ep.connect().await.map_err(|source| ConnectError::Connect {
        address: address.clone(),
        source,
    })
}

/// A status that ended a stream, for the log and `/metrics`; a refusal says what to
/// check.
pub(super) fn describe_status(code: tonic::Code, message: &str) -> String {
    match code {
        code if is_refusal(code) => format!(
            "refused ({code:?}): {message} (check token_file and the aggregator's fleet.auth.tokens)"
        ),
        code => format!("{code:?}: {message}"),
    }
}
