//! The HTTP server both binaries put their endpoints behind (`--web.listen-address`).
//!
//! Every caller of the HTTP endpoints is untrusted (DESIGN, "Trust model"), so the
//! server bounds what one caller can hold:
//!
//! - **a header read timeout**: a connection that does not finish sending a request's
//!   headers within [`Limits::header_read_timeout`] is closed. hyper runs this timer
//!   whenever it waits for a request head, so it covers a slowloris client that never
//!   finishes its headers *and* a keep-alive connection that sits idle between requests:
//!   neither holds a connection slot for longer than the timeout;
//! - **a connection limit**: at most [`Limits::max_connections`] connections are served
//!   at once. Past it the server stops accepting; new connections wait in the kernel's
//!   listen backlog (and are refused by the kernel once that is full) until a slot frees,
//!   so the connections already open stay served;
//! - **a write stall timeout**: a client that stops reading its response (so that the
//!   server's writes make no progress) for [`Limits::write_stall_timeout`] is
//!   disconnected, so "slow read" clients cannot hold slots either.
//!
//! Shutdown is graceful: the server stops accepting, lets each connection finish the
//! request it is serving (an idle one closes at once), and gives up on those still busy
//! after [`SHUTDOWN_GRACE`].

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// How long a shutting-down server waits for connections still serving a request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What one HTTP server allows its callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time a client has to send a request's headers, counted from when the server
    /// starts waiting for them (a new connection, or the end of the previous response on
    /// a keep-alive connection). Default 10 s: far more than any honest client needs,
    /// short enough that idle or slowloris connections do not pile up.
    pub header_read_timeout: Duration,
    /// Connections served at once. Default 1024: many times what a few Prometheus
    /// servers and browsers keep open, while bounding the file descriptors and memory
    /// that callers of the HTTP endpoints can hold.
    pub max_connections: usize,
    /// How long a write to a client may make no progress before the connection is
    /// dropped. Default 30 s: a client that reads at all never comes near it.
    pub write_stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            write_stall_timeout: Duration::from_secs(30),
        }
    }
}

/// The `--web.*` flags both binaries share, as Prometheus spells them.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct WebFlags {
    /// Maximum number of simultaneous HTTP connections; past it, new connections wait
    /// until one closes.
    #[arg(long = "web.max-connections", default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
}

impl WebFlags {
    /// The limits these flags ask for, the others at their defaults.
    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections.max(1),
            ..Limits::default()
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then shuts
/// down gracefully (see the module documentation).
///
/// Errors accepting a connection (too many open files, for one) are logged and retried
/// after a pause rather than ending the server.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        // A slot first: past the limit, connections wait in the listen backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    drop(slot);
                    tracing::warn!(error = %e, "cannot accept a web connection; retrying in 1s");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        // Finished connections are reaped as we go, so the set stays as small as the
        // number of open connections.
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let service = TowerToHyperService::new(router.clone());
        let mut stopping = stopping.clone();
        connections.spawn(async move {
            let _slot = slot;
            let io = WriteStall::new(stream, limits.write_stall_timeout);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "web connection ended with an error");
                    }
                    return;
                }
                _ = stopping.wait_for(|s| *s) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "web connections still busy after {SHUTDOWN_GRACE:?}; closing them"
        );
        connections.shutdown().await;
    }
}

/// A stream whose writes fail once one has made no progress for `timeout`.
struct WriteStall<T> {
    io: T,
    timeout: Duration,
    /// Armed while a write (or flush, or shutdown) is pending.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteStall<T> {
    fn new(io: T, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            stalled: None,
        }
    }

    /// What a pending write becomes: still pending, or an error once the stall has
    /// lasted `timeout`.
    fn on_pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn guard<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.on_pending(cx),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStall<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStall<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.guard(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.guard(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.guard(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.guard(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/big", get(|| async { "x".repeat(64 << 20) }));
        let (tx, mut rx) = watch::channel(false);
        tokio::spawn(serve(listener, router, limits, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        (addr, tx)
    }

    async fn get_root(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Reads until the peer closes; returns how long that took.
    async fn closed_after(mut s: TcpStream) -> Duration {
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    }

    #[tokio::test]
    async fn unfinished_headers_and_idle_keep_alive_are_closed_after_the_timeout() {
        let (addr, _stop) = start(Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 8,
            ..Limits::default()
        })
        .await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let took = closed_after(slow).await;
        assert!(took < Duration::from_secs(3), "{took:?}");

        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let took = closed_after(idle).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn past_the_limit_connections_wait_for_a_slot() {
        let (addr, _stop) = start(Limits {
            header_read_timeout: Duration::from_millis(500),
            max_connections: 2,
            ..Limits::default()
        })
        .await;
        let a = TcpStream::connect(addr).await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Both slots are held by silent connections: a third is not served yet...
        let third = tokio::spawn(get_root(addr));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!third.is_finished());
        // ...and is once the header timeout has closed them.
        let out = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("served once a slot freed")
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        drop((a, b));
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_dropped_and_frees_its_slot() {
        let (addr, _stop) = start(Limits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 1,
            write_stall_timeout: Duration::from_millis(500),
        })
        .await;
        let mut greedy = TcpStream::connect(addr).await.unwrap();
        greedy
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // It never reads; the one slot is its until the stall timeout drops it.
        let started = tokio::time::Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(5), get_root(addr))
            .await
            .expect("served once the stalled client was dropped");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(started.elapsed() >= Duration::from_millis(400));
        drop(greedy);
    }

    #[tokio::test]
    async fn shutdown_stops_accepting() {
        let (addr, stop) = start(Limits::default()).await;
        assert!(get_root(addr).await.starts_with("HTTP/1.1 200"));
        stop.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
