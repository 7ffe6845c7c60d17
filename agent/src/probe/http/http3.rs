//! `enable_http3`: every hop of the probe over HTTP/3, on a QUIC connection of its own
//! (quinn, with the module's TLS client held to TLS 1.3 and ALPN `h3`), never TCP and
//! never a fallback, as blackbox_exporter's `http3.Transport` does.
//!
//! What blackbox_exporter reports with it, kept here: an `http://` target is probed as
//! `https://`; `connect` and `tls` are both the QUIC handshake (one exchange, which Go's
//! trace hooks open and close together); `processing` runs from the established
//! connection to the response's headers and `transfer` to the body's end;
//! `probe_http_version` is 3 and `valid_http_versions` names it `HTTP/3.0`. A redirect
//! to `http://` cannot be followed (HTTP/3 needs TLS). Unlike blackbox_exporter, the
//! connection goes to the address the agent resolved (so `preferred_ip_protocol` and the
//! connect policy hold), and each hop names its own host in SNI.

use super::body::ReadError;
use super::conn::{ConnFuture, drive};
use super::redirect::Hop;
use super::{DURATION, HopEnd, RequestError, Session};
use crate::probe::net::PendingConnect;
use crate::probe::tls::{TlsClient, TlsSetupError};
use crate::probe::tls_samples::TlsFacts;
use crate::probe::{Because, Failure, ProbeContext, Reason, Samples, Stage, io_reason};
use bytes::{Buf, Bytes};
use h3::error::StreamError;
use http::{Request, Uri, Version};
use http_body_util::Full;
use hyper::body::Frame;
use rustls::pki_types::CertificateDer;
use sonde_proto::config::module::HttpProbe;
use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use url::Url;

/// The target as blackbox_exporter probes it over HTTP/3: `https://`, whatever scheme
/// (or none) it was written with.
pub(super) fn https_target(target: &str) -> Cow<'_, str> {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    if lower.starts_with("https://") {
        Cow::Borrowed(target)
    } else if lower.starts_with("http://") {
        Cow::Owned(format!("https://{}", &target[7..]))
    } else {
        Cow::Owned(format!("https://{target}"))
    }
}

/// The module's TLS client for QUIC: TLS 1.3 only (QUIC carries no other), ALPN `h3`.
pub(super) fn tls_client(ctx: &ProbeContext, cfg: &HttpProbe) -> Result<TlsClient, TlsSetupError> {
    let mut tls = cfg.tls_config.clone();
    tls.min_version = Some("TLS13".to_string());
    TlsClient::new(ctx, &tls, &[b"h3"])
}

/// A redirect (or a target) that would need plain HTTP, which HTTP/3 cannot carry.
pub(super) fn not_https(url: &Url) -> Failure {
    Failure::new(
        Reason::Config,
        format!(
            "{url}: enable_http3 makes every request over QUIC, which needs https; set follow_redirects: false to stop at a redirect to http://"
        ),
    )
}

impl Session<'_> {
    /// One hop over HTTP/3 to `addr`, already resolved and allowed by the policy.
    pub(super) async fn exchange_h3(
        &mut self,
        hop: &Hop,
        addr: SocketAddr,
        request: Request<Full<Bytes>>,
        redirects: u32,
        out: &mut Samples,
    ) -> Result<HopEnd, Failure> {
        let Some(client) = &self.tls else {
            return Err(not_https(&hop.url));
        };
        let uri = h3_uri(hop);
        let uri = uri
            .parse::<Uri>()
            .map_err(|error| RequestError::Uri { uri, error })
            .because(Reason::Config)?;
        let (mut parts, _) = request.into_parts();
        parts.uri = uri;
        parts.version = Version::HTTP_3;
        let request = Request::from_parts(parts, ());

        out.stage = Stage::Connect;
        let (_endpoint, conn) = handshake(self.ctx, client, addr, &hop.sni, out).await?;
        out.stage = Stage::Exchange;
        let certs = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .map(|certs| *certs)
            .unwrap_or_default();
        let facts = TlsFacts::of_quic(self.ctx, &certs, client);

        let ready = Instant::now();
        let (mut driver, mut sender) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| Failure::new(Reason::Protocol, format!("HTTP/3 connection: {e}")))?;
        let driver: ConnFuture = Box::pin(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let body = hop.body.clone();
        let work = async {
            let failed =
                |e: StreamError| Failure::new(Reason::Protocol, format!("HTTP/3 request: {e}"));
            let stream = sender.send_request(request).await.map_err(failed)?;
            let (mut send, mut recv) = stream.split();
            if let Some(body) = body {
                send.send_data(body).await.map_err(failed)?;
            }
            send.finish().await.map_err(failed)?;
            let resp = recv
                .recv_response()
                .await
                .map_err(|e| Failure::new(Reason::Protocol, format!("HTTP/3 response: {e}")))?;
            let first_byte = Instant::now();
            out.add_with(
                DURATION,
                &[("phase", "processing")],
                first_byte.duration_since(ready).as_secs_f64(),
            );
            let resp = resp.map(|()| ResponseBody(recv));
            self.respond(resp, hop, Some(facts), redirects, first_byte, out)
                .await
        };
        let result = drive(driver, work).await;
        conn.close(0u32.into(), b"");
        result
    }
}

/// The request's URI: HTTP/3 names the authority (the Host header's value) in it.
fn h3_uri(hop: &Hop) -> String {
    let path = match hop.url.query() {
        Some(q) => format!("{}?{q}", hop.url.path()),
        None => hop.url.path().to_string(),
    };
    format!("https://{}{path}", hop.host_header)
}

/// The QUIC handshake with `addr`, noted in the trace like a TCP connect, and timed as
/// both the `connect` and the `tls` phase. The endpoint (the UDP socket) is returned
/// with the connection: it must live as long as the connection does.
async fn handshake(
    ctx: &ProbeContext,
    client: &TlsClient,
    addr: SocketAddr,
    server_name: &str,
    out: &mut Samples,
) -> Result<(quinn::Endpoint, quinn::Connection), Failure> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client.config())
        .map_err(|e| Failure::new(Reason::Config, format!("tls_config for QUIC: {e}")))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| {
        Failure::new(
            Reason::ConnectError,
            format!("QUIC: no UDP socket on {bind}: {}", io_reason(&e)),
        )
    })?;
    let bare = server_name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(server_name);
    client.forget_presented();
    let connecting = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr, bare)
        .map_err(|e| Failure::new(Reason::Config, format!("QUIC connect to {addr}: {e}")))?;

    let pending = PendingConnect::note(
        out,
        addr,
        "no answer to the QUIC handshake before the deadline",
    );
    crate::probe_log!(out.log, Debug, "Dialing QUIC", address = addr);
    let started = Instant::now();
    let result = connecting.await;
    let seconds = started.elapsed().as_secs_f64();
    let failure = result
        .as_ref()
        .err()
        .map(|e| handshake_failure(ctx, client, e, out));
    // A handshake the server answered, even with a TLS error, is a connection made and
    // timed; one that got no answer (or broke at the QUIC layer) is not.
    let answered = failure.as_ref().is_none_or(|f| f.reason == Reason::Tls);
    pending.settle(
        out,
        answered,
        failure
            .as_ref()
            .filter(|_| !answered)
            .map(|f| f.message.clone()),
        seconds,
    );
    if answered {
        out.add_with(DURATION, &[("phase", "connect")], seconds);
        out.add_with(DURATION, &[("phase", "tls")], seconds);
    }
    match (result, failure) {
        (Ok(conn), _) => Ok((endpoint, conn)),
        (Err(_), Some(failure)) => Err(failure),
        (Err(e), None) => Err(Failure::new(
            Reason::ConnectError,
            format!("QUIC handshake: {e}"),
        )),
    }
}

/// QUIC carries TLS alerts as "crypto" errors, codes 0x100 to 0x1ff (RFC 9001 §4.8).
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

fn handshake_failure(
    ctx: &ProbeContext,
    client: &TlsClient,
    e: &quinn::ConnectionError,
    out: &mut Samples,
) -> Failure {
    use quinn::ConnectionError as E;
    match e {
        // The agent's own TLS refused the server (its certificate, its name, ...).
        E::TransportError(t) if is_crypto(t.code) => {
            client.handshake_failed(ctx, out, t.reason.clone())
        }
        // The server's TLS refused the agent (no `h3`, a client certificate, ...).
        E::ConnectionClosed(close) if is_crypto(close.error_code) => {
            client.handshake_failed(ctx, out, format!("the server ended the handshake: {close}"))
        }
        E::TimedOut => Failure::new(
            Reason::ConnectTimeout,
            "QUIC handshake: no answer (nothing listens on that UDP port, or a firewall drops it)",
        ),
        E::VersionMismatch => Failure::new(
            Reason::Protocol,
            "QUIC handshake: the server speaks no QUIC version the agent does (version 1)",
        ),
        other => Failure::new(Reason::Protocol, format!("QUIC handshake: {other}")),
    }
}

/// The body of an HTTP/3 response, read frame by frame like a hyper body.
struct ResponseBody(h3::client::RequestStream<h3_quinn::RecvStream, Bytes>);

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        match self.0.poll_recv_data(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(mut data))) => {
                Poll::Ready(Some(Ok(Frame::data(data.copy_to_bytes(data.remaining())))))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl ReadError for StreamError {
    fn describe(&self) -> String {
        self.to_string()
    }
}

#[cfg(test)]
#[path = "http3_tests.rs"]
mod tests;
