//! The load: a closed loop of HTTP/1.1 GETs over keep-alive connections, each
//! connection sending its next request as soon as it has read the previous answer (what
//! `wrk -c N` does), every answer checked.
//!
//! It runs on one thread of the bench process, so its CPU is never in the figures of the
//! server under load, which is another process.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// What makes an answer a success.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    /// 200, whatever the body.
    Ok,
    /// 200 with a `probe_success 1` line.
    ProbeSuccess,
}

/// The requests of one run and what came back.
#[derive(Debug, Default)]
pub struct Tally {
    pub requests: u64,
    /// Answers that were not a success, and requests that got no answer.
    pub failures: u64,
    pub first_failure: Option<String>,
    pub elapsed: Duration,
}

/// The request every connection sends.
#[derive(Clone, Debug)]
pub struct Target {
    /// Path and query.
    pub path: String,
    pub expect: Expect,
}

/// Keep-alive connections to one server, on a current-thread runtime of their own.
pub struct LoadGenerator {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    senders: Vec<SendRequest<Empty<Bytes>>>,
}

/// The scrape timeout every request carries, as Prometheus sends it: both servers derive
/// the probe's deadline from it.
const SCRAPE_TIMEOUT_SECONDS: &str = "10";

impl LoadGenerator {
    pub fn connect(addr: SocketAddr, connections: usize) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the load generator's runtime: {e}"))?;
        let senders = runtime.block_on(async {
            let mut senders = Vec::with_capacity(connections);
            for _ in 0..connections {
                senders.push(open(addr).await?);
            }
            Ok::<_, String>(senders)
        })?;
        Ok(Self {
            runtime,
            addr,
            senders,
        })
    }

    /// Sends `target`'s request on every connection, over and over, for `duration`; then
    /// waits for the answers still due, so that every request counted has been served.
    pub fn run(&mut self, target: &Target, duration: Duration) -> Tally {
        let addr = self.addr;
        let senders = std::mem::take(&mut self.senders);
        let (senders, tally) = self.runtime.block_on(async move {
            let started = Instant::now();
            let until = started + duration;
            let mut workers = JoinSet::new();
            for sender in senders {
                let target = target.clone();
                workers.spawn(async move { worker(addr, sender, &target, until).await });
            }
            let mut tally = Tally::default();
            let mut senders = Vec::new();
            while let Some(done) = workers.join_next().await {
                let (sender, worker_tally) = match done {
                    Ok(done) => done,
                    Err(e) => (None, failed_tally(format!("a load worker panicked: {e}"))),
                };
                senders.extend(sender);
                tally.requests += worker_tally.requests;
                tally.failures += worker_tally.failures;
                if tally.first_failure.is_none() {
                    tally.first_failure = worker_tally.first_failure;
                }
            }
            tally.elapsed = started.elapsed();
            (senders, tally)
        });
        self.senders = senders;
        tally
    }
}

fn failed_tally(why: String) -> Tally {
    Tally {
        failures: 1,
        first_failure: Some(why),
        ..Tally::default()
    }
}

async fn open(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One connection's loop. Returns the connection (`None` once it broke) and its tally. A
/// connection the server closed is reopened; a request that got no answer counts as a
/// failure and ends this connection's loop.
async fn worker(
    addr: SocketAddr,
    mut sender: SendRequest<Empty<Bytes>>,
    target: &Target,
    until: Instant,
) -> (Option<SendRequest<Empty<Bytes>>>, Tally) {
    let mut tally = Tally::default();
    let host = addr.to_string();
    while Instant::now() < until {
        if sender.is_closed() {
            match open(addr).await {
                Ok(s) => sender = s,
                Err(e) => {
                    tally.failures += 1;
                    tally.first_failure.get_or_insert(e);
                    return (None, tally);
                }
            }
        }
        tally.requests += 1;
        match request(&mut sender, &host, target).await {
            Ok(()) => {}
            Err(Failed::Answer(why)) => {
                tally.failures += 1;
                tally.first_failure.get_or_insert(why);
            }
            Err(Failed::Connection(why)) => {
                tally.failures += 1;
                tally.first_failure.get_or_insert(why);
                return (None, tally);
            }
        }
    }
    (Some(sender), tally)
}

enum Failed {
    /// An answer came, and it was not a success.
    Answer(String),
    /// No answer: the connection is unusable.
    Connection(String),
}

async fn request(
    sender: &mut SendRequest<Empty<Bytes>>,
    host: &str,
    target: &Target,
) -> Result<(), Failed> {
    let request = http::Request::get(target.path.as_str())
        .header(http::header::HOST, host)
        .header(
            "X-Prometheus-Scrape-Timeout-Seconds",
            SCRAPE_TIMEOUT_SECONDS,
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failed::Connection(format!("GET {}: {e}", target.path)))?;
    sender
        .ready()
        .await
        .map_err(|e| Failed::Connection(format!("GET {}: {e}", target.path)))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failed::Connection(format!("GET {}: {e}", target.path)))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| Failed::Connection(format!("GET {}: reading the body: {e}", target.path)))?
        .to_bytes();
    let success = status == http::StatusCode::OK
        && match target.expect {
            Expect::Ok => true,
            Expect::ProbeSuccess => body.split(|&b| b == b'\n').any(|l| l == b"probe_success 1"),
        };
    if success {
        Ok(())
    } else {
        Err(Failed::Answer(format!(
            "GET {}: {status}: {}",
            target.path,
            String::from_utf8_lossy(&body[..body.len().min(2000)])
        )))
    }
}
