//! A tonic connector that hands tonic a connection opened beforehand, once. The gRPC
//! prober and the uplink both open their connection themselves (the prober to time each
//! phase, the uplink to tell what went wrong on the way), then let tonic speak HTTP/2
//! over it; a second connection is never made under them.

use std::sync::Mutex;
use std::task::{Context, Poll};

pub struct OneConnection<T> {
    io: Mutex<Option<T>>,
    /// What the error says when tonic asks for a second connection.
    gone: &'static str,
}

impl<T> OneConnection<T> {
    pub fn new(io: T, gone: &'static str) -> Self {
        Self {
            io: Mutex::new(Some(io)),
            gone,
        }
    }
}

impl<T> tower_service::Service<http::Uri> for OneConnection<T> {
    type Response = hyper_util::rt::TokioIo<T>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let io = self.io.lock().unwrap_or_else(|e| e.into_inner()).take();
        std::future::ready(
            io.map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, self.gone)),
        )
    }
}
