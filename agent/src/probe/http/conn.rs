//! The HTTP connection of one hop, driven by the prober itself: the HTTP/1.1 or HTTP/2
//! handshake over an already connected (and maybe TLS) stream, the request sender,
//! and the connection task run alongside the request so that nothing outlives the
//! probe.

use crate::probe::{Failure, Reason};
use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};

pub(super) fn version_number(v: Version) -> f64 {
    match v {
        Version::HTTP_09 => 0.9,
        Version::HTTP_10 => 1.0,
        Version::HTTP_11 => 1.1,
        Version::HTTP_2 => 2.0,
        Version::HTTP_3 => 3.0,
        _ => 0.0,
    }
}

/// As Go's `Response.Proto`, which `valid_http_versions` lists.
pub(super) fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

pub(super) fn hyper_reason(e: &hyper::Error) -> String {
    use std::error::Error as _;
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        match s.downcast_ref::<std::io::Error>() {
            Some(io) => {
                reason = format!("{reason}: {}", crate::probe::io_reason(io));
                break;
            }
            None => reason = format!("{reason}: {s}"),
        }
        source = s.source();
    }
    reason
}

pub(super) type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

pub(super) enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    pub(super) async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

pub(super) async fn handshake<S>(io: S, h2: bool) -> Result<(Sender, ConnFuture), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let reason = |e: hyper::Error| {
        Failure::new(
            Reason::Protocol,
            format!("http handshake: {}", hyper_reason(&e)),
        )
    };
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(reason)?;
        Ok((
            Sender::H2(sender),
            Box::pin(async move {
                let _ = conn.await;
            }),
        ))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(reason)?;
        Ok((
            Sender::H1(sender),
            Box::pin(async move {
                let _ = conn.await;
            }),
        ))
    }
}

/// Runs `work` while driving the connection in the same task, so that dropping the
/// probe (its deadline) drops the connection too: nothing is left running behind it.
pub(super) async fn drive<T>(mut conn: ConnFuture, work: impl Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    tokio::select! {
        biased;
        t = &mut work => return t,
        () = &mut conn => {}
    }
    // The connection ended (closed or failed); the request observes that itself.
    work.await
}
