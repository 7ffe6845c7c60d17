//! The remote writer against a scripted receiver: the harness here, the tests by what
//! they test in `sending` (batching, retries, refusals, shutdown), `queue` (the durable
//! queue as the writer uses it: order, bounds, restarts, transactions), `protocol_v2`
//! (remote write 2.0 and the fallback to 1.0) and `tls`.

mod protocol_v2;
mod queue;
mod sending;
mod tls;

use super::*;
use crate::remote_write::*;

use crate::series::{Sample as QSample, SeriesLabels};

use axum::extract::State;

use axum::http::{HeaderMap, StatusCode};

use axum::response::{IntoResponse, Response};

use bytes::Bytes;

use sonde_proto::config::{ByteSize, PromDuration};

use sonde_proto::prompb::{Label, Sample, TimeSeries, WriteRequest};

use std::collections::VecDeque;

use std::net::SocketAddr;

/// What the test receiver answers to one request.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
}

/// Which remote write messages the test receiver understands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Speaks {
    /// Reads every body as 1.0, whatever its Content-Type, and never sends the 2.0
    /// headers: Prometheus 2.42 and VictoriaMetrics 1.79 (a 2.0 body is then an
    /// empty request: 204, nothing stored).
    V1Lenient,
    /// 1.0 only, and says so: 415 for the 2.0 Content-Type.
    V1Strict,
    /// Both, by Content-Type, with the 2.0 `-Written` headers on 2.0 requests.
    Both,
}

struct Attempt {
    at: std::time::Instant,
    headers: HeaderMap,
    /// The request as 1.0 (2.0 requests converted), empty when nothing was read.
    request: WriteRequest,
    /// "1.0" or "2.0": how the receiver read the body.
    read_as: &'static str,
    status: u16,
}

struct Log {
    speaks: Speaks,
    /// Replies for the next requests, in order; then `fallback`, then 204.
    script: VecDeque<Reply>,
    fallback: Option<Reply>,
    /// Refuses (400) every request holding a series with this metric name.
    refuse_name: Option<String>,
    /// Pause before answering every request, to keep several in flight.
    delay: Duration,
    attempts: Vec<Attempt>,
    in_flight: usize,
    max_in_flight: usize,
}

/// A remote write receiver on 127.0.0.1 that decodes with our decoders and records
/// every request and the status it gave.
struct Receiver {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    server: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Flat = (Vec<(String, String)>, i64, u64);

impl Receiver {
    async fn start() -> Self {
        Self::start_with(None, Speaks::V1Lenient).await
    }

    async fn speaking(speaks: Speaks) -> Self {
        Self::start_with(None, speaks).await
    }

    /// Serves HTTPS with `tls` when given.
    async fn start_with(tls: Option<rustls::ServerConfig>, speaks: Speaks) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, tls, speaks)
    }

    fn serve(
        listener: tokio::net::TcpListener,
        tls: Option<rustls::ServerConfig>,
        speaks: Speaks,
    ) -> Self {
        let log = Arc::new(Mutex::new(Log {
            speaks,
            script: VecDeque::new(),
            fallback: None,
            refuse_name: None,
            delay: Duration::ZERO,
            attempts: Vec::new(),
            in_flight: 0,
            max_in_flight: 0,
        }));
        let app = axum::Router::new()
            .route("/api/v1/write", axum::routing::post(receive))
            .with_state(log.clone());
        let addr = listener.local_addr().unwrap();
        let server = match tls {
            None => tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            }),
            Some(tls) => {
                let listener = tls::TlsListener {
                    tcp: listener,
                    acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
                };
                tokio::spawn(async move {
                    axum::serve(listener, app).await.unwrap();
                })
            }
        };
        Self { addr, log, server }
    }

    fn url(&self) -> String {
        format!("http://{}/api/v1/write", self.addr)
    }

    fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.log.lock().unwrap().script.extend(replies);
    }

    fn set_fallback(&self, reply: Option<Reply>) {
        self.log.lock().unwrap().fallback = reply;
    }

    /// When request `i` arrived, its headers and its decoded body.
    fn attempt(&self, i: usize) -> (std::time::Instant, HeaderMap, WriteRequest) {
        let log = self.log.lock().unwrap();
        let a = &log.attempts[i];
        (a.at, a.headers.clone(), a.request.clone())
    }

    fn attempts(&self) -> usize {
        self.log.lock().unwrap().attempts.len()
    }

    /// (how the body was read, status) of every request so far.
    fn outcomes(&self) -> Vec<(&'static str, u16)> {
        self.log
            .lock()
            .unwrap()
            .attempts
            .iter()
            .map(|a| (a.read_as, a.status))
            .collect()
    }

    /// The requests answered with 2xx.
    fn accepted(&self) -> Vec<WriteRequest> {
        self.log
            .lock()
            .unwrap()
            .attempts
            .iter()
            .filter(|a| (200..300).contains(&a.status))
            .map(|a| a.request.clone())
            .collect()
    }

    /// Every accepted sample as (labels, timestamp, value bits), in arrival order.
    fn accepted_samples(&self) -> Vec<Flat> {
        flatten(&self.accepted())
    }
}

fn flatten(requests: &[WriteRequest]) -> Vec<Flat> {
    let mut out = Vec::new();
    for req in requests {
        for ts in &req.timeseries {
            let labels: Vec<(String, String)> = ts
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect();
            for s in &ts.samples {
                out.push((labels.clone(), s.timestamp, s.value.to_bits()));
            }
        }
    }
    out
}

/// A 2.0 request in 1.0's shape, for the same assertions.
fn as_v1(series: Vec<Series>) -> WriteRequest {
    WriteRequest {
        timeseries: series
            .into_iter()
            .map(|s| TimeSeries {
                labels: s
                    .labels
                    .into_iter()
                    .map(|(name, value)| Label { name, value })
                    .collect(),
                samples: s
                    .samples
                    .into_iter()
                    .map(|(timestamp, value)| Sample { value, timestamp })
                    .collect(),
            })
            .collect(),
        metadata: Vec::new(),
    }
}

async fn receive(State(log): State<Arc<Mutex<Log>>>, headers: HeaderMap, body: Bytes) -> Response {
    let is_v2 = headers.get("content-type").is_some_and(|v| {
        v.to_str()
            .unwrap_or_default()
            .contains("io.prometheus.write.v2")
    });
    let (speaks, refuse_name, delay) = {
        let mut log = log.lock().unwrap();
        log.in_flight += 1;
        log.max_in_flight = log.max_in_flight.max(log.in_flight);
        (log.speaks, log.refuse_name.clone(), log.delay)
    };
    tokio::time::sleep(delay).await;
    let (request, read_as) = if is_v2 && speaks == Speaks::Both {
        match encode_v2::decode(&body)
            .map_err(|e| e.to_string())
            .and_then(|r| encode_v2::resolve(&r).map_err(|e| e.to_string()))
        {
            Ok(series) => (as_v1(series), "2.0"),
            Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
        }
    } else {
        match decode(&body) {
            Ok(r) => (r, "1.0"),
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        }
    };
    let refused = refuse_name.is_some_and(|name| {
        request.timeseries.iter().any(|ts| {
            ts.labels
                .iter()
                .any(|l| l.name == "__name__" && l.value == name)
        })
    });
    let samples: usize = request.timeseries.iter().map(|t| t.samples.len()).sum();
    let reply = {
        let mut log = log.lock().unwrap();
        log.in_flight -= 1;
        let reply = if is_v2 && speaks == Speaks::V1Strict {
            Reply::status(415)
        } else if refused {
            let mut r = Reply::status(400);
            r.body = "out of order sample".into();
            r
        } else {
            log.script
                .pop_front()
                .or_else(|| log.fallback.clone())
                .unwrap_or_else(|| Reply::status(204))
        };
        let stored = (200..300).contains(&reply.status);
        log.attempts.push(Attempt {
            at: std::time::Instant::now(),
            headers,
            request,
            read_as,
            status: reply.status,
        });
        let mut reply = reply;
        if read_as == "2.0" {
            let written = if stored { samples } else { 0 };
            reply.headers.push((
                "x-prometheus-remote-write-samples-written",
                written.to_string(),
            ));
            reply
                .headers
                .push(("x-prometheus-remote-write-histograms-written", "0".into()));
            reply
                .headers
                .push(("x-prometheus-remote-write-exemplars-written", "0".into()));
        }
        reply
    };
    tokio::time::sleep(reply.delay).await;
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn config(url: &str) -> RemoteWriteConfig {
    let mut cfg = RemoteWriteConfig::new(url);
    cfg.name = Some("test".into());
    cfg.queue_config.batch_send_deadline = PromDuration::from_millis(50);
    cfg.queue_config.min_backoff = PromDuration::from_millis(10);
    cfg.queue_config.max_backoff = PromDuration::from_millis(40);
    cfg
}

fn memory() -> Arc<Store> {
    Arc::new(Store::in_memory().unwrap())
}

/// A writer on a throwaway in-memory store, without external labels.
fn start(cfg: RemoteWriteConfig) -> RemoteWriter {
    RemoteWriter::start(cfg, &no_labels(), memory()).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sample(name: &str, ts: i64) -> QSample {
    QSample::from_pairs(&[("__name__", name), ("job", "web")], ts, ts as f64 / 10.0)
}

fn flat(name: &str, ts: i64) -> Flat {
    let s = sample(name, ts);
    (s.series.to_pairs(), ts, s.value.to_bits())
}

fn counter(writer: &RemoteWriter, name: &str, reason: Option<&str>) -> f64 {
    let families = writer.families();
    let family = families
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no family {name}"));
    family
        .samples
        .iter()
        .find(|(l, _)| reason.is_none_or(|r| l.iter().any(|(k, v)| k == "reason" && v == r)))
        .map(|(_, v)| *v)
        .unwrap()
}

fn no_labels() -> Labels {
    Labels::new()
}

/// Series `m0..m{n}` at timestamp `t`.
fn wave(series: usize, t: i64) -> Vec<QSample> {
    (0..series).map(|i| sample(&format!("m{i}"), t)).collect()
}

/// Accepted timestamps per metric name, in arrival order.
fn per_series(rx: &Receiver) -> std::collections::BTreeMap<String, Vec<i64>> {
    let mut out: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for (labels, ts, _) in rx.accepted_samples() {
        let name = labels
            .iter()
            .find(|(k, _)| k == "__name__")
            .unwrap()
            .1
            .clone();
        out.entry(name).or_default().push(ts);
    }
    out
}

fn temp_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sonde-rw-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `Store::open` on a directory whose previous store the writer's tasks, aborted when
/// it was dropped, may hold for a moment more (a new process never sees this).
async fn reopen(dir: &std::path::Path) -> Store {
    let mut tries = 0;
    loop {
        match Store::open(dir) {
            Err(crate::storage::StoreError::Locked(_)) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other.unwrap(),
        }
    }
}
