//! What the connection of one stream saw on the wire, and what it means for the person
//! who has to fix the agent's `aggregators` entry: the libraries below tonic report a
//! wrong port, TLS against plaintext or a refused client certificate as "transport
//! error", "operation was canceled" or "h2 protocol error", if at all (a TLS alert the
//! aggregator sends after the handshake never reaches the request that fails).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How many of the server's first bytes are kept: enough to tell an HTTP/1 status line,
/// a TLS record and an HTTP/2 frame header apart.
const FIRST_BYTES: usize = 16;

/// What one connection attempt saw.
#[derive(Debug, Default)]
pub(super) struct Transcript {
    /// The TCP connection was established.
    pub tcp: bool,
    /// The TLS handshake completed (`https://` only).
    pub tls: bool,
    /// The server's first bytes, below TLS.
    pub first_bytes: Vec<u8>,
    /// The server closed the connection, or it failed under a read or a write.
    pub closed: bool,
    /// Bytes the server sent over the connection, above TLS for `https://`.
    pub app_bytes: usize,
    /// The first TLS error, in the handshake or after it (an alert from the server).
    pub tls_error: Option<rustls::Error>,
    /// A second connection, made after the server closed the first without a word,
    /// was answered in HTTP/1.
    pub answers_http1: bool,
}

/// The transcript of the connection being opened, shared with its I/O.
pub(super) type Seen = Arc<Mutex<Transcript>>;

pub(super) fn lock(seen: &Seen) -> std::sync::MutexGuard<'_, Transcript> {
    seen.lock().unwrap_or_else(|e| e.into_inner())
}

/// Passes I/O through and notes in the transcript what the server sent: its first bytes
/// and end (`raw`, on the TCP stream), or its TLS errors (on the TLS stream).
pub(super) struct Recorder<S> {
    pub inner: S,
    pub seen: Seen,
    pub raw: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                let mut seen = lock(&this.seen);
                if !this.raw {
                    seen.app_bytes += got.len();
                } else if got.is_empty() {
                    seen.closed = true;
                } else if seen.first_bytes.len() < FIRST_BYTES {
                    let room = FIRST_BYTES - seen.first_bytes.len();
                    seen.first_bytes
                        .extend_from_slice(&got[..got.len().min(room)]);
                }
            }
            Poll::Ready(Err(e)) => {
                if this.raw {
                    lock(&this.seen).closed = true;
                }
                note_tls_error(&this.seen, e);
            }
            Poll::Pending => {}
        }
        polled
    }
}

impl<S> Recorder<S> {
    /// A write that fails means the connection is gone (the server closed or reset it).
    fn note_write(&self, polled: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Err(e)) = polled {
            if self.raw {
                lock(&self.seen).closed = true;
            }
            note_tls_error(&self.seen, e);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Keeps the first TLS error `e` carries (tokio-rustls wraps rustls' errors in I/O ones).
pub(super) fn note_tls_error(seen: &Seen, e: &io::Error) {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        let mut seen = lock(seen);
        if seen.tls_error.is_none() {
            seen.tls_error = Some(tls.clone());
        }
    }
}

/// The aggregators entry a message is about, as the user wrote it.
pub(super) struct Entry {
    pub index: usize,
    pub address: String,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub client_cert: bool,
    /// The name the aggregator's certificate must hold.
    pub server_name: String,
}

impl Entry {
    /// `what` about this entry, prefixed with where it is in the config.
    pub fn says(&self, what: impl std::fmt::Display) -> String {
        format!(
            "aggregators[{}].address {}: {what}",
            self.index, self.address
        )
    }
}

/// What is wrong and what to fix, when the transcript and the error show it.
pub(super) fn explain(entry: &Entry, seen: &Transcript) -> Option<String> {
    let bytes = &seen.first_bytes;
    if bytes.starts_with(b"HTTP/") || seen.answers_http1 {
        return Some(
            "the server answered HTTP/1: is this the aggregator's web port \
             (--web.listen-address, 9450 by default) instead of its gRPC port \
             (--grpc.listen-address, 9451)?"
                .into(),
        );
    }
    let tls_record = bytes.len() >= 2 && (0x14..=0x17).contains(&bytes[0]) && bytes[1] == 0x03;
    if !entry.tls && tls_record {
        return Some(
            "the server speaks TLS: write https:// and set tls_config.ca_file to the CA \
             that signed the aggregator's certificate"
                .into(),
        );
    }
    // An HTTP/2 frame header: a 3-byte length, then SETTINGS (4) or GOAWAY (7).
    let http2_frame = bytes.len() >= 4 && matches!(bytes[3], 0x04 | 0x07);
    if let Some(error) = &seen.tls_error {
        return Some(explain_tls(entry, error, http2_frame));
    }
    // After a TLS 1.3 handshake the server judges the client certificate, and says so
    // in an alert that a failed write can leave unread: a server that closes the
    // connection right after the handshake, before a byte of HTTP/2, did that.
    if entry.tls && seen.tls && seen.app_bytes == 0 && seen.closed {
        return Some(if entry.client_cert {
            "the aggregator closed the connection right after the TLS handshake: it refused \
             this agent's client certificate, most likely: tls_config.cert_file must be \
             current and signed by the CA in the aggregator's fleet.tls.client_ca_file"
                .into()
        } else {
            "the aggregator closed the connection right after the TLS handshake: it requires \
             a client certificate, most likely (fleet.tls.client_ca_file): set \
             tls_config.cert_file and key_file"
                .into()
        });
    }
    if entry.tls && seen.tcp && !seen.tls && seen.closed {
        return Some(
            "the server closed the connection during the TLS handshake: if the aggregator \
             has no fleet.tls, write http://"
                .into(),
        );
    }
    None
}

fn explain_tls(entry: &Entry, error: &rustls::Error, http2_frame: bool) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as E};
    match error {
        E::InvalidMessage(_) if http2_frame => "the server does not speak TLS (it answered \
             plain HTTP/2): write http://, or give the aggregator fleet.tls"
            .into(),
        E::InvalidMessage(m) => format!(
            "the server does not speak TLS (its answer is not a TLS record: {m:?}): write \
             http:// if the aggregator has no fleet.tls, and check the port"
        ),
        E::AlertReceived(Alert::CertificateRequired) => "the aggregator requires a client \
             certificate (its fleet.tls.client_ca_file): set tls_config.cert_file and key_file"
            .into(),
        E::AlertReceived(Alert::HandshakeFailure) if !entry.client_cert => "the aggregator \
             refused the TLS handshake; if it requires a client certificate (fleet.tls.\
             client_ca_file), set tls_config.cert_file and key_file"
            .into(),
        E::AlertReceived(
            alert @ (Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
            | Alert::DecryptError
            | Alert::AccessDenied),
        ) => format!(
            "the aggregator refused this agent's client certificate (TLS alert {alert:?}): \
             tls_config.cert_file must be current and signed by the CA in the aggregator's \
             fleet.tls.client_ca_file"
        ),
        E::InvalidCertificate(why @ (Cert::UnknownIssuer | Cert::BadSignature)) => {
            let why = match why {
                Cert::UnknownIssuer => "unknown issuer",
                _ => "bad signature: a CA of that name, but not the one that signed it",
            };
            match &entry.ca_file {
                Some(ca) => format!(
                    "the aggregator's certificate is not signed by tls_config.ca_file {} \
                     ({why}): set ca_file to the CA that signed the aggregator's \
                     fleet.tls.cert_file",
                    ca.display()
                ),
                None => format!(
                    "the aggregator's certificate is not signed by a CA this agent trusts \
                     ({why}): set tls_config.ca_file to the CA that signed it"
                ),
            }
        }
        E::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            format!(
                "the aggregator's certificate is not valid for {:?}: dial a name of its \
                 subjectAltName, or set tls_config.server_name to one",
                entry.server_name
            )
        }
        E::InvalidCertificate(
            Cert::Expired
            | Cert::ExpiredContext { .. }
            | Cert::NotValidYet
            | Cert::NotValidYetContext { .. },
        ) => format!(
            "the aggregator's certificate is expired or not yet valid ({error}): renew it, \
             or check this machine's clock"
        ),
        E::AlertReceived(alert) => format!("the aggregator ended the TLS handshake ({alert:?})"),
        other => format!("TLS: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tls: bool) -> Entry {
        Entry {
            index: 0,
            address: "https://127.0.0.1:9451".into(),
            tls,
            ca_file: Some("/etc/sonde/ca.pem".into()),
            client_cert: false,
            server_name: "127.0.0.1".into(),
        }
    }

    fn seen(first_bytes: &[u8], tls_error: Option<rustls::Error>) -> Transcript {
        Transcript {
            tcp: true,
            first_bytes: first_bytes.to_vec(),
            tls_error,
            ..Transcript::default()
        }
    }

    #[test]
    fn what_the_server_sent_names_the_mistake() {
        let http1 = explain(&entry(true), &seen(b"HTTP/1.1 400 Bad", None)).unwrap();
        assert!(http1.contains("web port"), "{http1}");
        let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32];
        let tls = explain(&entry(false), &seen(&alert, None)).unwrap();
        assert!(
            tls.contains("use https://") || tls.contains("write https://"),
            "{tls}"
        );
        let settings = [0, 0, 0x12, 0x04, 0, 0, 0, 0, 0];
        let corrupt = rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
        let plain = explain(&entry(true), &seen(&settings, Some(corrupt))).unwrap();
        assert!(plain.contains("write http://"), "{plain}");
        let required = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let cert = explain(&entry(true), &seen(&[], Some(required))).unwrap();
        assert!(cert.contains("cert_file and key_file"), "{cert}");
        let issuer = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let ca = explain(&entry(true), &seen(&[], Some(issuer))).unwrap();
        assert!(ca.contains("not signed by tls_config.ca_file"), "{ca}");
        assert!(explain(&entry(true), &seen(&[], None)).is_none());
    }
}
