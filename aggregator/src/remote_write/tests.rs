use super::*;
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

#[tokio::test]
async fn sends_protocol_headers_auth_and_external_labels() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.headers
        .insert("X-Scope-OrgID".into(), "tenant-1".into());
    cfg.bearer_token = Some(config::Secret("s3cret".into()));
    let external: Labels = [("cluster", "eu1"), ("job", "ignored")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let writer = RemoteWriter::start(cfg, &external, memory()).unwrap();
    writer.push(vec![sample("up", 1000)]);
    eventually("the sample", || writer.status().sent_samples == 1).await;

    let (_, h, _) = rx.attempt(0);
    assert_eq!(h["content-encoding"], "snappy");
    assert_eq!(h["content-type"], "application/x-protobuf");
    assert_eq!(h["x-prometheus-remote-write-version"], "0.1.0");
    assert_eq!(
        h["user-agent"],
        format!("sonde/{}", env!("CARGO_PKG_VERSION")).as_str()
    );
    assert_eq!(h["authorization"], "Bearer s3cret");
    assert_eq!(h["x-scope-orgid"], "tenant-1");
    assert_eq!(h["host"], rx.addr.to_string().as_str());
    // The series' own job wins over the external one.
    assert_eq!(
        rx.accepted_samples(),
        vec![(
            labels(&[("__name__", "up"), ("cluster", "eu1"), ("job", "web")]),
            1000,
            100f64.to_bits()
        )]
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_sent_total", None),
        1.0
    );
    let sent = writer
        .families()
        .into_iter()
        .find(|f| f.name == "sonde_remote_write_samples_sent_total")
        .unwrap();
    assert_eq!(
        sent.samples[0].0,
        labels(&[("remote_name", "test"), ("url", &rx.url())])
    );
    let status = writer.status();
    assert_eq!((status.sent_samples, status.queued_samples), (1, 0));
    assert!(status.last_success.is_some() && !status.failing);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn batches_by_size_then_shutdown_flushes_the_rest() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_samples_per_send = 10;
    cfg.queue_config.batch_send_deadline = PromDuration::from_secs(3600);
    let writer = start(cfg);
    writer.push((1..=25).map(|t| sample("m", t)).collect());
    eventually("two full batches", || rx.accepted().len() == 2).await;
    // The last 5 wait for a full batch or the (hour-long) deadline.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sizes = |rx: &Receiver| -> Vec<usize> {
        rx.accepted()
            .iter()
            .map(|r| r.timeseries.iter().map(|ts| ts.samples.len()).sum())
            .collect()
    };
    assert_eq!(sizes(&rx), [10, 10]);
    assert_eq!(writer.status().queued_samples, 5);

    writer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(sizes(&rx), [10, 10, 5]);
    let want: Vec<Flat> = (1..=25).map(|t| flat("m", t)).collect();
    assert_eq!(rx.accepted_samples(), want);
}

#[tokio::test]
async fn batches_by_deadline() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.queue_config.batch_send_deadline = PromDuration::from_millis(300);
    // One shard: both series in the same request.
    cfg.queue_config.max_shards = 1;
    let writer = start(cfg);
    let pushed = std::time::Instant::now();
    writer.push(vec![sample("a", 1), sample("b", 1)]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    writer.push(vec![sample("a", 2)]);
    eventually("the deadline batch", || rx.accepted().len() == 1).await;
    let (at, _, req) = rx.attempt(0);
    let waited = at - pushed;
    assert!(
        waited >= Duration::from_millis(300),
        "sent after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "sent after {waited:?}");
    // One request with every due sample, each series' in time order.
    let got = flatten(std::slice::from_ref(&req));
    assert_eq!(got.len(), 3);
    let of = |name: &str| -> Vec<i64> {
        got.iter()
            .filter(|(labels, _, _)| labels.iter().any(|(k, v)| k == "__name__" && v == name))
            .map(|(_, ts, _)| *ts)
            .collect()
    };
    assert_eq!((of("a"), of("b")), (vec![1, 2], vec![1]));
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn retries_500_and_429_without_losing_or_doubling() {
    let rx = Receiver::start().await;
    rx.script([Reply::status(500), Reply::status(429), Reply::status(503)]);
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_shards = 1;
    let writer = start(cfg);
    let mut want = Vec::new();
    let mut batch = Vec::new();
    for t in 1..=10 {
        batch.push(sample("a", t));
        batch.push(sample("b", t));
        want.push(flat("a", t));
        want.push(flat("b", t));
    }
    writer.push(batch);
    eventually("the retried batch", || writer.status().sent_samples == 20).await;
    assert_eq!(rx.attempts(), 4);
    let mut got = rx.accepted_samples();
    got.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    want.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    assert_eq!(got, want);
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_sent_total", None),
        20.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_retried_total", None),
        60.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_requests_failed_total", None),
        3.0
    );
    let status = writer.status();
    assert!(!status.failing);
    assert_eq!(
        status.last_error.as_deref(),
        Some("HTTP 503 Service Unavailable")
    );
    assert_eq!(status.dropped_samples, 0);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn honours_retry_after_up_to_max_backoff() {
    let rx = Receiver::start().await;
    let mut retry_after = Reply::status(429);
    retry_after.headers.push(("retry-after", "1".into()));
    rx.script([retry_after.clone()]);
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_backoff = PromDuration::from_secs(5);
    let writer = start(cfg);
    writer.push(vec![sample("a", 1)]);
    eventually("the retry", || rx.accepted().len() == 1).await;
    let gap = {
        let log = rx.log.lock().unwrap();
        log.attempts[1].at - log.attempts[0].at
    };
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
    writer.shutdown(Duration::from_secs(1)).await;

    // An hour-long Retry-After is cut to max_backoff (40ms here).
    let rx = Receiver::start().await;
    retry_after.headers = vec![("retry-after", "3600".into())];
    rx.script([retry_after]);
    let writer = start(config(&rx.url()));
    writer.push(vec![sample("a", 1)]);
    eventually("the capped retry", || rx.accepted().len() == 1).await;
    let gap = {
        let log = rx.log.lock().unwrap();
        log.attempts[1].at - log.attempts[0].at
    };
    assert!(gap < Duration::from_secs(2), "retried after {gap:?}");
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn drops_a_batch_refused_with_400_and_counts_it() {
    let rx = Receiver::start().await;
    let mut refused = Reply::status(400);
    refused.body = "out of bounds\n".into();
    rx.script([refused]);
    let writer = start(config(&rx.url()));
    writer.push((1..=3).map(|t| sample("a", t)).collect());
    eventually("the refused request", || rx.attempts() == 1).await;
    eventually("the drop", || writer.status().dropped_samples == 3).await;
    writer.push(vec![sample("a", 4), sample("a", 5)]);
    eventually("the next batch", || rx.accepted().len() == 1).await;
    // Not retried: the refused samples were sent once and never again.
    assert_eq!(rx.attempts(), 2);
    assert_eq!(rx.accepted_samples(), vec![flat("a", 4), flat("a", 5)]);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("http_4xx")
        ),
        3.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_retried_total", None),
        0.0
    );
    assert_eq!(
        writer.status().last_error.as_deref(),
        Some("HTTP 400: out of bounds")
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn drops_samples_not_newer_than_their_series() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_shards = 1;
    let writer = start(cfg);
    writer.push(vec![
        sample("a", 1000),
        sample("a", 2000),
        sample("a", 1500),
        sample("b", 1500),
        sample("a", 2000),
        sample("a", 3000),
    ]);
    eventually("the batch", || rx.accepted_samples().len() == 4).await;
    // The series' last timestamp is remembered after sending too.
    writer.push(vec![sample("a", 2500), sample("a", 4000)]);
    eventually("the second batch", || rx.accepted_samples().len() == 5).await;
    let got = per_series(&rx);
    assert_eq!(got["a"], [1000, 2000, 3000, 4000]);
    assert_eq!(got["b"], [1500]);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("out_of_order")
        ),
        3.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn drops_samples_with_invalid_labels() {
    let rx = Receiver::start().await;
    let writer = start(config(&rx.url()));
    writer.push(vec![
        QSample::from_pairs(&[("job", "no-name")], 1, 1.0),
        sample("ok", 1),
    ]);
    eventually("the valid sample", || rx.accepted_samples().len() == 1).await;
    assert_eq!(rx.accepted_samples(), vec![flat("ok", 1)]);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("invalid_labels")
        ),
        1.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn queue_bound_drops_the_oldest_while_the_endpoint_is_down() {
    let rx = Receiver::start().await;
    rx.set_fallback(Some(Reply::status(503)));
    let one = queue::labels::sample_bytes(&sample("m", 1).series.to_pairs());
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_samples_per_send = 10;
    cfg.queue_config.max_queue_bytes = ByteSize(50 * one);
    let writer = start(cfg);
    writer.push((1..=50).map(|t| sample("m", t)).collect());
    // The first batch (1..=10) is now being retried.
    eventually("a few failed attempts", || rx.attempts() >= 3).await;
    writer.push((51..=100).map(|t| sample("m", t)).collect());
    assert_eq!(writer.status().queued_samples, 50);
    rx.set_fallback(None);
    eventually("the queue to drain", || writer.status().queued_samples == 0).await;

    let want: Vec<Flat> = (51..=100).map(|t| flat("m", t)).collect();
    assert_eq!(rx.accepted_samples(), want);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("queue_full")
        ),
        50.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_sent_total", None),
        50.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_queue_bytes", None),
        0.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn samples_evicted_while_their_request_succeeds_count_as_sent_only() {
    let rx = Receiver::start().await;
    let mut slow = Reply::status(204);
    slow.delay = Duration::from_millis(500);
    rx.script([slow]);
    let one = queue::labels::sample_bytes(&sample("m", 1).series.to_pairs());
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_samples_per_send = 10;
    cfg.queue_config.max_queue_bytes = ByteSize(50 * one);
    let writer = start(cfg);
    writer.push((1..=10).map(|t| sample("m", t)).collect());
    eventually("the slow request", || rx.attempts() == 1).await;
    // Pushes 1..=10, which are in flight, out of the queue.
    writer.push((11..=60).map(|t| sample("m", t)).collect());
    eventually("everything", || writer.status().sent_samples == 60).await;
    let want: Vec<Flat> = (1..=60).map(|t| flat("m", t)).collect();
    assert_eq!(rx.accepted_samples(), want);
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_sent_total", None),
        60.0
    );
    assert_eq!(writer.status().dropped_samples, 0);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_gives_up_at_the_deadline() {
    let rx = Receiver::start().await;
    rx.set_fallback(Some(Reply::status(503)));
    let writer = start(config(&rx.url()));
    writer.push(vec![sample("a", 1)]);
    eventually("a failed attempt", || rx.attempts() >= 1).await;
    let started = std::time::Instant::now();
    writer.shutdown(Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_millis(1200), "{took:?}");
    assert!(rx.accepted().is_empty());
}

#[tokio::test]
async fn a_dead_endpoint_blocks_neither_push_nor_the_others() {
    // Accepts connections and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = black_hole.local_addr().unwrap();
    let hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            held.push(socket);
        }
    });
    let rx = Receiver::start().await;
    let mut dead = config(&format!("http://{dead_addr}/api/v1/write"));
    dead.name = Some("dead".into());
    let live = config(&rx.url());
    let writers = RemoteWriters::start(&[dead, live], &no_labels(), memory()).unwrap();

    let started = std::time::Instant::now();
    for chunk in 0..10 {
        writers.push(
            (0..1000)
                .map(|i| sample("m", chunk * 1000 + i + 1))
                .collect(),
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    eventually("the live endpoint", || {
        writers.status()[1].sent_samples == 10_000
    })
    .await;
    assert_eq!(rx.accepted_samples().len(), 10_000);
    let status = writers.status();
    assert_eq!(status[0].name, "dead");
    assert_eq!(status[0].sent_samples, 0);
    assert_eq!(status[0].queued_samples, 10_000);
    assert_eq!(status[1].sent_samples, 10_000);

    // One family per metric, a sample per endpoint.
    let families = writers.families();
    let sent = families
        .iter()
        .find(|f| f.name == "sonde_remote_write_samples_sent_total")
        .unwrap();
    assert_eq!(sent.samples.len(), 2);
    assert_eq!(
        families
            .iter()
            .filter(|f| f.name == "sonde_remote_write_samples_sent_total")
            .count(),
        1
    );

    let started = std::time::Instant::now();
    writers.shutdown(Duration::from_millis(200)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    hole.abort();
}

#[tokio::test]
async fn start_refuses_invalid_config() {
    let err = RemoteWriter::start(RemoteWriteConfig::new("ftp://x/"), &no_labels(), memory())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("http:// or https://"), "{err}");
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
            Err(crate::store::StoreError::Locked(_)) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other.unwrap(),
        }
    }
}

#[tokio::test]
async fn queue_survives_a_restart_and_delivers_exactly_once_in_order() {
    let dir = temp_dir("restart");
    // Nothing listens here yet: the receiver is down.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = config(&format!("http://{addr}/api/v1/write"));
    {
        let store = Arc::new(Store::open(&dir).unwrap());
        let writer = RemoteWriter::start(cfg.clone(), &no_labels(), store.clone()).unwrap();
        for t in 1..=100 {
            writer.push(wave(5, t));
        }
        eventually("a failed attempt", || writer.status().failing).await;
        assert_eq!(writer.status().queued_samples, 500);
        // Gone without a shutdown, like a SIGKILL: nothing flushed, nothing sent.
        drop(writer);
    }
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let rx = Receiver::serve(listener, None, Speaks::V1Lenient);
    let store = Arc::new(reopen(&dir).await);
    let writer = RemoteWriter::start(cfg, &no_labels(), store).unwrap();
    assert_eq!(writer.status().queued_samples, 500);
    // The last queued timestamp of each series survived: an older sample is refused.
    writer.push(vec![sample("m0", 50), sample("m0", 101)]);
    eventually("everything", || writer.status().sent_samples == 501).await;
    let got = per_series(&rx);
    assert_eq!(got.len(), 5);
    for (name, ts) in &got {
        let mut want: Vec<i64> = (1..=100).collect();
        if name == "m0" {
            want.push(101);
        }
        assert_eq!(ts, &want, "{name}: exactly once, in order");
    }
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("out_of_order")
        ),
        1.0
    );
    assert_eq!(writer.status().queued_samples, 0);
    assert_eq!(writer.status().queued_bytes, 0);
    writer.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shutdown_leaves_what_it_could_not_send_for_the_next_start() {
    let dir = temp_dir("shutdown");
    let rx = Receiver::start().await;
    rx.set_fallback(Some(Reply::status(503)));
    let cfg = config(&rx.url());
    {
        let store = Arc::new(Store::open(&dir).unwrap());
        let writer = RemoteWriter::start(cfg.clone(), &no_labels(), store).unwrap();
        writer.push((1..=10).map(|t| sample("a", t)).collect());
        eventually("a failed attempt", || rx.attempts() >= 1).await;
        writer.shutdown(Duration::from_millis(100)).await;
    }
    rx.set_fallback(None);
    let store = Arc::new(reopen(&dir).await);
    let writer = RemoteWriter::start(cfg, &no_labels(), store).unwrap();
    eventually("the rest", || writer.status().sent_samples == 10).await;
    let want: Vec<Flat> = (1..=10).map(|t| flat("a", t)).collect();
    assert_eq!(rx.accepted_samples(), want);
    writer.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shards_send_in_parallel_and_keep_each_series_in_order() {
    let rx = Receiver::start().await;
    rx.log.lock().unwrap().delay = Duration::from_millis(20);
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_samples_per_send = 7;
    cfg.queue_config.max_shards = 4;
    cfg.queue_config.batch_send_deadline = PromDuration::from_millis(5);
    let writer = start(cfg);
    for t in 1..=30 {
        writer.push(wave(40, t));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eventually("every sample", || writer.status().sent_samples == 1200).await;
    let got = per_series(&rx);
    assert_eq!(got.len(), 40);
    let want: Vec<i64> = (1..=30).collect();
    for (name, ts) in got {
        assert_eq!(ts, want, "{name}");
    }
    let concurrent = rx.log.lock().unwrap().max_in_flight;
    assert!(concurrent > 1, "at most {concurrent} request(s) in flight");
    assert!(
        concurrent <= 4,
        "{concurrent} requests in flight with 4 shards"
    );
    assert_eq!(writer.status().shards, 4);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn enqueue_commits_and_rolls_back_with_the_callers_transaction() {
    let rx = Receiver::start().await;
    let store = memory();
    let writer = RemoteWriter::start(config(&rx.url()), &no_labels(), store.clone()).unwrap();
    let failed = store.transaction(|tx| {
        writer.enqueue(tx, &[sample("a", 1), sample("a", 2)])?;
        tx.execute("INSERT INTO nonexistent VALUES (1)", [])?;
        Ok(())
    });
    assert!(failed.is_err());
    writer.wake();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.attempts(), 0, "a rolled-back sample was sent");
    // The caller replays the batch (the agent was never acked): accepted.
    store
        .transaction(|tx| writer.enqueue(tx, &[sample("a", 1), sample("a", 2)]))
        .unwrap();
    writer.wake();
    eventually("the replayed batch", || writer.status().sent_samples == 2).await;
    assert_eq!(rx.accepted_samples(), vec![flat("a", 1), flat("a", 2)]);
    assert_eq!(writer.status().dropped_samples, 0);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_refused_series_does_not_take_its_batch_down() {
    let rx = Receiver::start().await;
    rx.log.lock().unwrap().refuse_name = Some("bad".into());
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_shards = 1;
    cfg.queue_config.batch_send_deadline = PromDuration::from_millis(200);
    let writer = start(cfg);
    let mut batch = wave(20, 1);
    batch.push(sample("bad", 1));
    batch.extend(wave(20, 2));
    batch.push(sample("bad", 2));
    writer.push(batch);
    eventually("the batch settled", || writer.status().queued_samples == 0).await;
    let got = per_series(&rx);
    assert_eq!(got.len(), 20, "{got:?}");
    assert!(got.values().all(|ts| ts == &[1, 2]));
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("http_4xx")
        ),
        2.0
    );
    // Isolating one series among 21 takes a few requests, not 21.
    assert!(rx.attempts() <= 12, "{} requests", rx.attempts());
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn samples_older_than_sample_age_limit_are_dropped() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.queue_config.sample_age_limit = PromDuration::from_secs(3600);
    let writer = start(cfg);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    writer.push(vec![sample("a", now - 2 * 3_600_000), sample("a", now)]);
    eventually("the recent sample", || writer.status().sent_samples == 1).await;
    assert_eq!(rx.accepted_samples(), vec![flat("a", now)]);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("too_old")
        ),
        1.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

fn v2_config(url: &str) -> RemoteWriteConfig {
    let mut cfg = config(url);
    cfg.protobuf_message = ProtobufMessage::RequestV2;
    cfg
}

#[tokio::test]
async fn sends_remote_write_2_to_a_receiver_that_speaks_it() {
    let rx = Receiver::speaking(Speaks::Both).await;
    let writer = start(v2_config(&rx.url()));
    writer.push(vec![sample("up", 1000), sample("probe_success", 1000)]);
    eventually("the samples", || writer.status().sent_samples == 2).await;
    let (_, h, _) = rx.attempt(0);
    assert_eq!(
        h["content-type"],
        "application/x-protobuf;proto=io.prometheus.write.v2.Request"
    );
    assert_eq!(h["x-prometheus-remote-write-version"], "2.0.0");
    assert_eq!(h["content-encoding"], "snappy");
    assert!(
        rx.outcomes().iter().all(|o| *o == ("2.0", 204)),
        "{:?}",
        rx.outcomes()
    );
    let mut got = rx.accepted_samples();
    got.sort();
    assert_eq!(got, vec![flat("probe_success", 1000), flat("up", 1000)]);
    let status = writer.status();
    assert_eq!(status.protobuf_message, "io.prometheus.write.v2.Request");
    assert_eq!(
        counter(&writer, "sonde_remote_write_protocol_fallbacks_total", None),
        0.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

/// Everything the receiver stored, sorted, and that it was stored once.
fn assert_stored_once(rx: &Receiver, want: &[Flat]) {
    let mut got = rx.accepted_samples();
    got.sort();
    let mut want = want.to_vec();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn falls_back_to_1_0_on_415() {
    let rx = Receiver::speaking(Speaks::V1Strict).await;
    let writer = start(v2_config(&rx.url()));
    let mut want = Vec::new();
    for t in 1..=3 {
        writer.push(wave(8, t));
        want.extend((0..8).map(|i| flat(&format!("m{i}"), t)));
    }
    eventually("the samples", || writer.status().sent_samples == 24).await;
    assert_stored_once(&rx, &want);
    let outcomes = rx.outcomes();
    let first_ok = outcomes.iter().position(|o| o.1 == 204).unwrap();
    assert!(first_ok >= 1, "{outcomes:?}");
    assert!(
        outcomes[..first_ok].iter().all(|o| o.1 == 415),
        "{outcomes:?}"
    );
    assert!(
        outcomes[first_ok..].iter().all(|o| o.1 == 204),
        "{outcomes:?}"
    );
    // Every request after the fallback is 1.0.
    for i in first_ok..rx.attempts() {
        let (_, h, _) = rx.attempt(i);
        assert_eq!(h["content-type"], "application/x-protobuf");
        assert_eq!(h["x-prometheus-remote-write-version"], "0.1.0");
    }
    assert_eq!(writer.status().protobuf_message, "prometheus.WriteRequest");
    assert_eq!(
        counter(&writer, "sonde_remote_write_protocol_fallbacks_total", None),
        1.0
    );
    assert_eq!(writer.status().dropped_samples, 0);
    assert_eq!(writer.configured_message(), ProtobufMessage::RequestV2);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn falls_back_to_1_0_on_2xx_without_the_written_headers() {
    // Like Prometheus 2.42: reads the 2.0 body as 1.0, finds nothing, answers 204.
    let rx = Receiver::speaking(Speaks::V1Lenient).await;
    let writer = start(v2_config(&rx.url()));
    let mut want = Vec::new();
    for t in 1..=3 {
        writer.push(wave(8, t));
        want.extend((0..8).map(|i| flat(&format!("m{i}"), t)));
    }
    eventually("the samples", || writer.status().sent_samples == 24).await;
    assert_stored_once(&rx, &want);
    let empty = rx
        .accepted()
        .iter()
        .filter(|r| r.timeseries.is_empty())
        .count();
    assert!(empty >= 1, "no 2.0 request reached the receiver");
    assert_eq!(writer.status().protobuf_message, "prometheus.WriteRequest");
    assert_eq!(
        counter(&writer, "sonde_remote_write_protocol_fallbacks_total", None),
        1.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

/// The 2.0 body read by another implementation: the spec's types.proto compiled by
/// grpcio-tools' protoc, parsed by the `protobuf` package, snappy by `cramjam`
/// (`tests/rw2/decode.py`). Fails, never skips, when they are missing.
#[test]
fn remote_write_2_body_decodes_with_an_independent_implementation() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let script = root.join("tests/rw2/decode.py");
    let stale = f64::from_bits(STALE_NAN_BITS);
    let series = vec![
        Series {
            labels: labels(&[
                ("__name__", "probe_success"),
                ("job", "web"),
                ("instance", "http://127.0.0.1:8080/"),
                ("agent", "edge-1"),
                ("cluster", "eu1"),
            ]),
            samples: vec![
                (1_700_000_000_000, 1.0),
                (1_700_000_001_000, 0.0),
                (1_700_000_002_000, stale),
            ],
        },
        Series {
            labels: labels(&[
                ("__name__", "probe_http_duration_seconds"),
                ("job", "web"),
                ("phase", "connect"),
                ("empty", ""),
            ]),
            samples: vec![(1_700_000_000_000, 0.000_25)],
        },
        Series {
            labels: labels(&[("__name__", "up"), ("job", "web")]),
            samples: vec![(1_700_000_000_000, 1.0)],
        },
        Series {
            labels: labels(&[("__name__", "sonde_job_missing"), ("job", "dns")]),
            samples: vec![(-5, 0.0)],
        },
    ];
    let body = encode_v2::encode(&series).unwrap();
    let dir = temp_dir("rw2");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("request.bin");
    std::fs::write(&file, &body).unwrap();
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg(&file)
        .output();
    let install = "install them with `python3 -m pip install grpcio-tools protobuf cramjam` \
                   (bash scripts/test.sh does it)";
    let output = match output {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run python3 ({e}): the remote write 2.0 interop test needs python3 with \
             the PyPI packages grpcio-tools, protobuf and cramjam; {install}"
        ),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}): {stderr}\nIf a package is missing, {install}.",
        script.display(),
        output.status
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "decode.py printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(
        json["symbols"][0], "",
        "symbols[0] must be the empty string"
    );
    let got = json["timeseries"].as_array().unwrap();
    assert_eq!(got.len(), series.len());
    for (got, want) in got.iter().zip(&series) {
        let mut want_labels = want.labels.clone();
        encode::normalize_labels(&mut want_labels);
        let got_labels: Vec<(String, String)> =
            serde_json::from_value(got["labels"].clone()).unwrap();
        assert_eq!(got_labels, want_labels);
        let got_samples: Vec<(i64, u64)> = serde_json::from_value(got["samples"].clone()).unwrap();
        let want_samples: Vec<(i64, u64)> = want
            .samples
            .iter()
            .map(|&(t, v)| (t, v.to_bits()))
            .collect();
        assert_eq!(got_samples, want_samples);
        let name = &want_labels.iter().find(|(k, _)| k == "__name__").unwrap().1;
        let (_, help) = encode_v2::metric_metadata(name).unwrap();
        assert_eq!(got["metadata"]["type"], "METRIC_TYPE_GAUGE", "{name}");
        assert_eq!(got["metadata"]["help"], help, "{name}");
        assert_eq!(got["metadata"]["unit"], "", "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Not a pass/fail bound, a figure for the report: samples queued per second through
/// `enqueue` (one transaction per 100 samples, as a busy hub would commit).
#[test]
fn enqueue_throughput() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let dir = temp_dir("throughput");
    let store = Arc::new(Store::open(&dir).unwrap());
    // Nothing listens: the samples stay queued.
    let writer = RemoteWriter::start(
        config("http://127.0.0.1:9/api/v1/write"),
        &no_labels(),
        store.clone(),
    )
    .unwrap();
    // The hub hands the same series (`Arc`) for every sample of a series.
    let series: Vec<Arc<SeriesLabels>> = (0..100)
        .map(|i| {
            Arc::new(SeriesLabels::from_pairs(&[
                ("__name__", "probe_success"),
                ("job", "web"),
                ("instance", &format!("http://target-{i}.example:8080/")),
                ("agent", "edge-1"),
            ]))
        })
        .collect();
    let started = std::time::Instant::now();
    let mut n = 0;
    for t in 1..=100 {
        let batch: Vec<QSample> = series
            .iter()
            .map(|s| QSample {
                series: s.clone(),
                timestamp_ms: t,
                value: 1.0,
            })
            .collect();
        n += batch.len();
        store.transaction(|tx| writer.enqueue(tx, &batch)).unwrap();
    }
    let took = started.elapsed();
    eprintln!(
        "enqueue: {n} samples in {took:?} = {:.0} samples/s (this build's profile)",
        n as f64 / took.as_secs_f64()
    );
    assert_eq!(writer.status().queued_samples, n);
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

/// HTTPS against a receiver whose certificate (for `receiver.test` only) and client
/// CA are the test CA below, made once with openssl (ECDSA P-256, valid until 2126).
mod tls {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::path::PathBuf;

    const CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBmDCCAT2gAwIBAgIUJfadg34WhMbO1ztYmq3kV+O4nw4wCgYIKoZIzj0EAwIw\n\
GDEWMBQGA1UEAwwNc29uZGUgdGVzdCBDQTAgFw0yNjExMjIwMDAzMzFaGA8yMTI2\n\
MTAyOTAwMDMzMVowGDEWMBQGA1UEAwwNc29uZGUgdGVzdCBDQTBZMBMGByqGSM49\n\
AgEGCCqGSM49AwEHA0IABLsotNooCkzWpY/gcJIh7+cp3mxjr70tvYN2mA3kz5RJ\n\
JjYhLc8j3GovsYvqggz//QGBS7IuQ0PobiwxtLfrVdajYzBhMB0GA1UdDgQWBBTk\n\
oqlujJ077MrvZu+wtnjCrssFGzAfBgNVHSMEGDAWgBTkoqlujJ077MrvZu+wtnjC\n\
rssFGzAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAKBggqhkjOPQQD\n\
AgNJADBGAiEA564S3Oy2SDkmacW05P1S6ngJn5zFISlqKgKLMrMGrucCIQDn0/Tr\n\
GwjHd5b4l8gooW/sJDweM7KvPG/dYf9+2C75fQ==\n\
-----END CERTIFICATE-----\n\
";
    const SERVER_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBwTCCAWigAwIBAgIUcBkeEH97edo9yG/RV8RLm0dLK9MwCgYIKoZIzj0EAwIw\n\
GDEWMBQGA1UEAwwNc29uZGUgdGVzdCBDQTAgFw0yNjExMjIwMDAzMzFaGA8yMTI2\n\
MTAyOTAwMDMzMVowGDEWMBQGA1UEAwwNcmVjZWl2ZXIudGVzdDBZMBMGByqGSM49\n\
AgEGCCqGSM49AwEHA0IABDdZdBgVibELwyoaMmNQiQoZjjjeXvUroIH6ncSz/U79\n\
g/p7VjbnVBFOHwNhD4qkrd7yXLJe4Z4nyTFGlMBzZdqjgY0wgYowCQYDVR0TBAIw\n\
ADAOBgNVHQ8BAf8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwGAYDVR0RBBEw\n\
D4INcmVjZWl2ZXIudGVzdDAdBgNVHQ4EFgQUzHb+DzP4BQLtc3pnGu2gyCupej0w\n\
HwYDVR0jBBgwFoAU5KKpboydO+zK72bvsLZ4wq7LBRswCgYIKoZIzj0EAwIDRwAw\n\
RAIgfAiS16EuQ7/HJMHIB/RzMsl3CtbMFKxP8pGwqZFeJKcCIEYOD3+QBaWWhZAG\n\
7icdYVUVTal8qez/L3qKM/YXx+X+\n\
-----END CERTIFICATE-----\n\
";
    const SERVER_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgzLqr0cDI3zeLM7Rw\n\
d3yo2ssA7QQrm5gt/5nw7K09K82hRANCAAQ3WXQYFYmxC8MqGjJjUIkKGY443l71\n\
K6CB+p3Es/1O/YP6e1Y251QRTh8DYQ+KpK3e8lyyXuGeJ8kxRpTAc2Xa\n\
-----END PRIVATE KEY-----\n\
";
    const CLIENT_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBqjCCAU+gAwIBAgIUcBkeEH97edo9yG/RV8RLm0dLK9QwCgYIKoZIzj0EAwIw\n\
GDEWMBQGA1UEAwwNc29uZGUgdGVzdCBDQTAgFw0yNjExMjIwMDAzMzFaGA8yMTI2\n\
MTAyOTAwMDMzMVowGzEZMBcGA1UEAwwQc29uZGUtYWdncmVnYXRvcjBZMBMGByqG\n\
SM49AgEGCCqGSM49AwEHA0IABNjW8v1eth8MpHAAINKipTQv/HTZ+x4LqcNnkuRD\n\
I9TwuYaq18fN32Eg6+9mArH0tDDY6hlC0bZT9eoCL9cS8c2jcjBwMAkGA1UdEwQC\n\
MAAwDgYDVR0PAQH/BAQDAgeAMBMGA1UdJQQMMAoGCCsGAQUFBwMCMB0GA1UdDgQW\n\
BBTcu/L6SgVI0TR+K0VVYJKoFkTx6zAfBgNVHSMEGDAWgBTkoqlujJ077MrvZu+w\n\
tnjCrssFGzAKBggqhkjOPQQDAgNJADBGAiEA/1LSakOws59LqxvH4h4xq63nx/XU\n\
fmUwWBbOzNjAf10CIQCQDZaSqwryzOZj0BJtvnsxHZnWIPpKatt+uKGsuNtsLg==\n\
-----END CERTIFICATE-----\n\
";
    const CLIENT_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgPI/cVH1kj5YmDAQ4\n\
/p97yoLKNgH67GNbjUiMi8jyg/ehRANCAATY1vL9XrYfDKRwACDSoqU0L/x02fse\n\
C6nDZ5LkQyPU8LmGqtfHzd9hIOvvZgKx9LQw2OoZQtG2U/XqAi/XEvHN\n\
-----END PRIVATE KEY-----\n\
";

    pub(super) struct TlsListener {
        pub tcp: tokio::net::TcpListener,
        pub acceptor: tokio_rustls::TlsAcceptor,
    }

    impl axum::serve::Listener for TlsListener {
        type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((tcp, addr)) = self.tcp.accept().await else {
                    continue;
                };
                // A client that refuses the certificate is simply not served.
                if let Ok(tls) = self.acceptor.accept(tcp).await {
                    return (tls, addr);
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }

    fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    fn server_config(require_client_cert: bool) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(certs(CA_PEM));
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        builder
            .with_single_cert(
                certs(SERVER_PEM),
                PrivateKeyDer::from_pem_slice(SERVER_KEY.as_bytes()).unwrap(),
            )
            .unwrap()
    }

    /// The test PEM files in a directory of their own, removed on drop.
    struct Files(PathBuf);

    impl Files {
        fn new(test: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("sonde-rw-tls-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for (name, text) in [
                ("ca.pem", CA_PEM),
                ("client.pem", CLIENT_PEM),
                ("client.key", CLIENT_KEY),
            ] {
                std::fs::write(dir.join(name), text).unwrap();
            }
            Self(dir)
        }

        fn path(&self, name: &str) -> Option<PathBuf> {
            Some(self.0.join(name))
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn https_config(rx: &Receiver, tls: config::TlsConfig) -> RemoteWriteConfig {
        let mut cfg = config(&format!("https://{}/api/v1/write", rx.addr));
        cfg.tls_config = Some(tls);
        cfg
    }

    async fn delivers(cfg: RemoteWriteConfig, rx: &Receiver) {
        let writer = start(cfg);
        writer.push(vec![sample("up", 1)]);
        eventually("the sample over TLS", || writer.status().sent_samples == 1).await;
        assert_eq!(rx.accepted_samples(), vec![flat("up", 1)]);
        writer.shutdown(Duration::from_secs(1)).await;
    }

    /// Starts a writer and returns its first error once a request has failed.
    async fn first_error(cfg: RemoteWriteConfig) -> String {
        let writer = start(cfg);
        writer.push(vec![sample("up", 1)]);
        eventually("a failed request", || writer.status().failing).await;
        let error = writer.status().last_error.unwrap();
        writer.shutdown(Duration::from_millis(50)).await;
        error
    }

    #[tokio::test]
    async fn https_with_ca_file_and_server_name() {
        let files = Files::new("ca");
        let rx = Receiver::start_with(Some(server_config(false)), Speaks::V1Lenient).await;
        let tls = config::TlsConfig {
            ca_file: files.path("ca.pem"),
            server_name: Some("receiver.test".into()),
            ..Default::default()
        };
        delivers(https_config(&rx, tls), &rx).await;
    }

    #[tokio::test]
    async fn https_refuses_unverified_certificates() {
        let files = Files::new("refuse");
        let rx = Receiver::start_with(Some(server_config(false)), Speaks::V1Lenient).await;
        // The public roots do not know the test CA.
        let error = first_error(https_config(&rx, config::TlsConfig::default())).await;
        assert!(error.contains("TLS handshake failed"), "{error}");
        // The CA is known but the certificate is not for 127.0.0.1.
        let tls = config::TlsConfig {
            ca_file: files.path("ca.pem"),
            ..Default::default()
        };
        let error = first_error(https_config(&rx, tls)).await;
        assert!(error.contains("TLS handshake failed"), "{error}");
        assert_eq!(rx.attempts(), 0);
    }

    #[tokio::test]
    async fn https_insecure_skip_verify() {
        let rx = Receiver::start_with(Some(server_config(false)), Speaks::V1Lenient).await;
        let tls = config::TlsConfig {
            insecure_skip_verify: true,
            ..Default::default()
        };
        delivers(https_config(&rx, tls), &rx).await;
    }

    #[tokio::test]
    async fn https_client_certificate() {
        let files = Files::new("mtls");
        let rx = Receiver::start_with(Some(server_config(true)), Speaks::V1Lenient).await;
        let tls = config::TlsConfig {
            ca_file: files.path("ca.pem"),
            cert_file: files.path("client.pem"),
            key_file: files.path("client.key"),
            server_name: Some("receiver.test".into()),
            ..Default::default()
        };
        delivers(https_config(&rx, tls.clone()), &rx).await;
        let without = config::TlsConfig {
            cert_file: None,
            key_file: None,
            ..tls
        };
        let error = first_error(https_config(&rx, without)).await;
        assert!(!error.is_empty());
        assert_eq!(rx.attempts(), 1);
    }
}
