//! Opening the connection of one stream to an aggregator: TCP, then TLS for `https://`
//! (its CA, client certificate and server name), then HTTP/2, each step watched by a
//! [`diagnose::Transcript`] so that a failure says what is wrong and what to fix; and telling the
//! user why a stream was refused.

use super::diagnose::{self, Entry, Recorder, Seen, lock};
use super::is_refusal;
use crate::config::AggregatorEndpoint;
use crate::one_connection::OneConnection;
use rustls::pki_types::ServerName;
use sonde_cli::errors::{CONNECTION_LOST, connection_lost, describe};
use sonde_proto::tls::{read_certificates, read_private_key};
use std::error::Error;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

/// The bound on opening a stream: TCP connect, TLS handshake, HTTP/2 handshake, and the
/// aggregator's answer to the Hello. An aggregator that accepts connections but answers
/// nothing (stopped, swapping, deadlocked) costs each attempt this long, no more.
pub(super) const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The bound on the second look at a server that closed the connection without a word.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why no connection to an aggregator could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "invalid aggregator address {address:?}: {why}; write it as http://host:port or https://host:port"
    )]
    Address { address: String, why: String },
    /// The aggregator's `tls_config` gives no TLS client (a file unreadable, a key that
    /// does not fit the certificate).
    #[error("TLS setup for {address}: {why}; check its tls_config")]
    Tls { address: String, why: String },
    /// The connection failed; the text names the entry, what is wrong and, when the
    /// transcript shows it, what to fix.
    #[error("{0}")]
    Transport(String),
}

/// One attempt's plan: where to connect, and how.
pub(super) struct Dial {
    pub entry: Entry,
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    endpoint: Endpoint,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

impl Dial {
    /// Reads the entry `index` of `aggregators` and its TLS files (again for every
    /// stream, so renewed certificates are used at the next reconnect).
    pub fn new(index: usize, endpoint: &AggregatorEndpoint) -> Result<Self, ConnectError> {
        let address = endpoint.address.clone();
        let bad = |why: &str| ConnectError::Address {
            address: address.clone(),
            why: why.to_string(),
        };
        let uri: http::Uri = address.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let cfg = endpoint.tls_config.clone().unwrap_or_default();
        let server_name = cfg.server_name.clone().unwrap_or_else(|| host.clone());
        let entry = Entry {
            index,
            address: address.clone(),
            tls,
            ca_file: cfg.ca_file.clone(),
            client_cert: cfg.cert_file.is_some() && cfg.key_file.is_some(),
            server_name: server_name.clone(),
        };
        let tls = match tls {
            false => None,
            true => {
                let setup = |why: String| ConnectError::Tls {
                    address: address.clone(),
                    why,
                };
                let config = client_config(&cfg).map_err(setup)?;
                let name =
                    ServerName::try_from(server_name.clone()).map_err(|_| ConnectError::Tls {
                        address: address.clone(),
                        why: format!("{server_name:?} is not a valid server name"),
                    })?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
        };
        // tonic gets the connection already open (and TLS done), so it is told http://;
        // the requests still carry the address as written.
        let origin: http::Uri = address.parse().map_err(|_| bad("not a URL"))?;
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| bad(&e.to_string()))?
            .origin(origin)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Self {
            entry,
            host,
            port,
            tls,
            endpoint,
        })
    }

    /// Opens the connection: TCP, TLS for `https://`, HTTP/2. What the server sent is
    /// noted in `seen`, for [`Dial::explain`] if a later step fails.
    pub async fn connect(&self, seen: &Seen) -> Result<Channel, ConnectError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                let what = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => "nothing listens there \
                        (connection refused): is the aggregator running, and is this its \
                        --grpc.listen-address?"
                        .to_string(),
                    _ => format!("TCP connect: {e}"),
                };
                ConnectError::Transport(self.entry.says(what))
            })?;
        let _ = tcp.set_nodelay(true);
        lock(seen).tcp = true;
        let raw = Recorder {
            inner: tcp,
            seen: seen.clone(),
            raw: true,
        };
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(raw),
            Some((connector, name)) => {
                let stream = match connector.connect(name.clone(), raw).await {
                    Ok(s) => s,
                    Err(e) => {
                        diagnose::note_tls_error(seen, &e);
                        return Err(ConnectError::Transport(self.explain(seen, &e, false).await));
                    }
                };
                lock(seen).tls = true;
                Box::new(Recorder {
                    inner: stream,
                    seen: seen.clone(),
                    raw: false,
                })
            }
        };
        match self
            .endpoint
            .connect_with_connector(OneConnection::new(
                io,
                "this stream's connection is gone; the uplink opens a new one",
            ))
            .await
        {
            Ok(channel) => Ok(channel),
            Err(e) => Err(ConnectError::Transport(self.explain(seen, &e, false).await)),
        }
    }

    /// What went wrong with this entry's connection, `error` being the failure as the
    /// libraries saw it: the transcript's explanation when it has one, a lost connection
    /// (of a stream that was `established`) said as such, or else `error` and its causes.
    pub async fn explain(
        &self,
        seen: &Seen,
        error: &(dyn Error + Send + Sync + 'static),
        established: bool,
    ) -> String {
        let closed_without_a_word = {
            let s = lock(seen);
            !self.entry.tls && s.tcp && s.closed && s.first_bytes.is_empty()
        };
        if closed_without_a_word && self.answers_http1().await {
            lock(seen).answers_http1 = true;
        }
        if let Some(what) = diagnose::explain(&self.entry, &lock(seen)) {
            return self.entry.says(what);
        }
        if established && connection_lost(error) {
            return self.entry.says(CONNECTION_LOST);
        }
        if established {
            return self.entry.says(describe(error));
        }
        self.entry.says(format!(
            "the connection failed before the stream was open: {}",
            describe(error)
        ))
    }

    /// Why the stream set-up took longer than [`SETUP_TIMEOUT`], from how far it got.
    pub fn does_not_answer(&self, seen: &Seen) -> String {
        let s = lock(seen);
        let stage = if !s.tcp {
            "the TCP connection was not accepted"
        } else if self.entry.tls && !s.tls {
            "connected, but no TLS handshake"
        } else if s.first_bytes.is_empty() {
            "connected, but nothing came back"
        } else {
            "connected, but no answer to the stream's Hello"
        };
        self.entry.says(format!(
            "the aggregator does not answer: no stream within {SETUP_TIMEOUT:?} ({stage}); \
             it may be stopped, overloaded, or behind a firewall that drops packets"
        ))
    }

    /// Whether the server answers an HTTP/1 request: a web server (the aggregator's web
    /// port) closes an HTTP/2 connection without a word.
    async fn answers_http1(&self) -> bool {
        let look = async {
            let mut tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
            tcp.write_all(b"GET /-/healthy HTTP/1.0\r\n\r\n").await?;
            let mut answer = [0u8; 5];
            tcp.read_exact(&mut answer).await?;
            Ok::<_, std::io::Error>(&answer == b"HTTP/")
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, look).await,
            Ok(Ok(true))
        )
    }
}

/// The TLS client of an aggregator's `tls_config`: its `ca_file` alone when set (the
/// fleet's CA), the Mozilla roots otherwise; its client certificate; HTTP/2 by ALPN.
fn client_config(cfg: &crate::config::ClientTlsConfig) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(ca) => {
            let certs = read_certificates(ca).map_err(|e| format!("tls_config.ca_file: {e}"))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("tls_config.ca_file {}: {e}", ca.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let chain =
                read_certificates(cert).map_err(|e| format!("tls_config.cert_file: {e}"))?;
            let key = read_private_key(key).map_err(|e| format!("tls_config.key_file: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("tls_config.cert_file and key_file: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
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
