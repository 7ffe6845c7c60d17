//! The gRPC port's connections, before gRPC sees them: at most
//! `fleet.limits.max_connections` open at once (the rest wait in the kernel's backlog),
//! TLS handshakes bounded by `fleet.limits.tls_handshake_timeout`, and a TLS
//! configuration that a reload swaps (certificates are re-read on every reload; a
//! connection keeps the configuration it was accepted with).

use crate::config::ServerTlsConfig;
use crate::refusals::Refusals;
use sonde_proto::tls::{PemError, read_certificates, read_private_key};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The TLS configuration new connections get; `None` serves plain HTTP/2.
#[derive(Default)]
pub struct FleetTls {
    current: RwLock<Option<Arc<rustls::ServerConfig>>>,
}

impl FleetTls {
    /// Reads the certificate, key and client CA of `config` (all of them, or nothing
    /// changes) and makes them the ones new connections get.
    pub fn load(&self, config: Option<&ServerTlsConfig>) -> Result<(), FleetTlsError> {
        let next = config.map(server_config).transpose()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    fn current(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Why `fleet.tls` cannot be used; nothing of it is, and the files stay as they were.
#[derive(Debug, thiserror::Error)]
pub enum FleetTlsError {
    /// `file` (cert_file, key_file or client_ca_file) gives no certificate or no key.
    #[error("fleet.tls.{file}: {source}")]
    Unreadable {
        file: &'static str,
        #[source]
        source: PemError,
    },
    /// rustls refused what the files hold (a client CA it cannot use, a certificate
    /// and key that do not make a pair).
    #[error("fleet.tls: {what}: {source}")]
    Refused {
        what: String,
        #[source]
        source: rustls::Error,
    },
    #[error("fleet.tls: client_ca_file {}: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// A rustls server configuration from `fleet.tls`, speaking HTTP/2 only.
pub fn server_config(tls: &ServerTlsConfig) -> Result<Arc<rustls::ServerConfig>, FleetTlsError> {
    let unreadable = |file| move |source| FleetTlsError::Unreadable { file, source };
    let certs = read_certificates(&tls.cert_file).map_err(unreadable("cert_file"))?;
    let key = read_private_key(&tls.key_file).map_err(unreadable("key_file"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| FleetTlsError::Refused {
            what: "the protocol versions".into(),
            source,
        })?;
    let builder = match &tls.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certificates(ca).map_err(unreadable("client_ca_file"))? {
                roots.add(cert).map_err(|source| FleetTlsError::Refused {
                    what: format!("client_ca_file {}", ca.display()),
                    source,
                })?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|source| FleetTlsError::ClientCa {
                        path: ca.clone(),
                        source,
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config =
        builder
            .with_single_cert(certs, key)
            .map_err(|source| FleetTlsError::Refused {
                what: format!(
                    "cert_file {} and key_file {} do not make a usable pair",
                    tls.cert_file.display(),
                    tls.key_file.display()
                ),
                source,
            })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// An accepted connection, plain or TLS, holding its slot until it closes.
pub struct Connection {
    io: Io,
    info: TcpConnectInfo,
    _slot: OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts connections until the returned stream is dropped: each waits for a free slot
/// before it is accepted, then gets its TLS handshake (if configured) within
/// `handshake_timeout`. Handshakes run side by side, so a slow one delays nobody.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<FleetTls>,
    max_connections: usize,
    handshake_timeout: Duration,
    refusals: Arc<Refusals>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(s) => s,
                    Err(_) => return,
                },
                _ = tx.closed() => return,
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "gRPC port: cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let info = TcpConnectInfo {
                local_addr: tcp.local_addr().ok(),
                remote_addr: Some(peer),
            };
            let config = tls.current();
            let tx = tx.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let io = match config {
                    None => Io::Plain(tcp),
                    Some(config) => match handshake(tcp, config, handshake_timeout).await {
                        Ok(s) => Io::Tls(Box::new(s)),
                        Err(why) => {
                            refusals.refuse_connection(Some(peer.ip()), None, &why);
                            return;
                        }
                    },
                };
                let _ = tx
                    .send(Ok(Connection {
                        io,
                        info,
                        _slot: slot,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The TLS handshake with a new connection; `Err` says why it failed, the reason first
/// (the peer's address is logged beside it).
async fn handshake(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, String> {
    match tokio::time::timeout(timeout, TlsAcceptor::from(config).accept(tcp)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(handshake_failure(&e)),
        Err(_) => Err(format!(
            "TLS handshake took longer than fleet.limits.tls_handshake_timeout ({timeout:?})"
        )),
    }
}

/// Why a handshake failed, with what the peer must change when rustls says.
fn handshake_failure(e: &io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return format!("TLS handshake failed: {e}");
    };
    let hint = match tls {
        rustls::Error::NoCertificatesPresented => {
            " (fleet.tls.client_ca_file requires a client certificate: the agent's tls_config.cert_file and key_file)"
        }
        rustls::Error::InvalidCertificate(_) => {
            " (the agent's client certificate must be signed by fleet.tls.client_ca_file)"
        }
        rustls::Error::InvalidMessage(_) => {
            " (the peer does not speak TLS: an agent with http:// for this aggregator's https:// port?)"
        }
        _ => "",
    };
    format!("TLS handshake failed: {tls}{hint}")
}
