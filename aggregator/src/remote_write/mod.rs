//! Prometheus remote write 1.0 sender.
//!
//! - `config`: the `remote_write` block, its defaults and validation;
//! - `encode`: series to snappy-compressed `WriteRequest` and back (pure);
//! - `client`: the HTTP exchange and the sorting of responses;
//! - `queue`: one bounded queue and one sending task per endpoint.
//!
//! [`RemoteWriter`] is one endpoint; [`RemoteWriters`] fans the same samples out to every
//! configured endpoint. Endpoints are independent: each has its own queue and task, so a
//! slow or dead one delays neither the producers nor the others.

pub mod client;
pub mod config;
pub mod encode;
mod queue;

pub use client::SendError;
pub use config::{RemoteWriteConfig, validate_all};
pub use encode::{STALE_NAN_BITS, Series, SeriesSample, decode, encode};

use sonde_proto::config::Labels;
use sonde_proto::exposition::Family;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One endpoint's queue as the status page shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueStatus {
    pub name: String,
    pub url: String,
    pub queued_samples: usize,
    pub queued_bytes: u64,
    pub max_queue_bytes: u64,
    pub sent_samples: u64,
    /// Every reason together; `/metrics` has them apart.
    pub dropped_samples: u64,
    /// True from a failed request until the next success.
    pub failing: bool,
    pub last_error: Option<String>,
    pub last_error_time: Option<SystemTime>,
    pub last_success: Option<SystemTime>,
}

/// The sender for one remote write endpoint: a bounded in-memory queue and the task
/// that drains it.
pub struct RemoteWriter {
    shared: Arc<queue::Shared>,
    max_queue_bytes: u64,
    stop: watch::Sender<Option<Instant>>,
    /// Taken by `shutdown`; aborted on drop, so the task never outlives its writer.
    task: Mutex<Option<JoinHandle<()>>>,
}

impl RemoteWriter {
    /// Validates `cfg` and starts the endpoint's sending task (so it must be called
    /// inside a Tokio runtime). `external_labels` go on every series that does not carry
    /// the label itself.
    pub fn start(cfg: RemoteWriteConfig, external_labels: &Labels) -> Result<Self, String> {
        cfg.validate()?;
        let name = cfg.name();
        let client =
            client::Client::new(&cfg).map_err(|e| format!("remote_write {name:?}: {e}"))?;
        let shared = Arc::new(queue::Shared::new(
            name,
            cfg.url.clone(),
            external_labels
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            &cfg.queue_config,
        ));
        let (stop, stop_rx) = watch::channel(None);
        let task = tokio::spawn(queue::run(
            shared.clone(),
            client,
            cfg.queue_config.clone(),
            stop_rx,
        ));
        Ok(Self {
            shared,
            max_queue_bytes: cfg.queue_config.max_queue_bytes.0,
            stop,
            task: Mutex::new(Some(task)),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// Queues samples for sending. Never waits on the network. Samples that are not newer
    /// than the last queued sample of their series, or whose labels no receiver accepts,
    /// are dropped and counted; when the queue is over `max_queue_bytes`, the oldest are.
    pub fn push(&self, samples: Vec<SeriesSample>) {
        self.shared.push(samples);
    }

    /// Sends what is queued, without waiting for full batches, until the queue is empty
    /// or `deadline` has passed; then stops the task. Samples still queued are lost (and
    /// logged): the queue lives in memory. Takes `&self` so that a writer shared behind
    /// an `Arc` can be flushed too; samples pushed afterwards are never sent.
    pub async fn shutdown(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        self.stop.send_replace(Some(until));
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task {
            // The task stops by itself at the deadline; the margin only guards against
            // one stuck where nothing can interrupt it.
            let margin = until + Duration::from_secs(1);
            if tokio::time::timeout_at(margin, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
    }

    /// Self-metrics, labelled with `remote_name` and `url` like Prometheus's own.
    pub fn families(&self) -> Vec<Family> {
        self.shared.families()
    }

    pub fn status(&self) -> QueueStatus {
        let snap = self.shared.snapshot();
        QueueStatus {
            name: self.shared.name.clone(),
            url: self.shared.url.clone(),
            queued_samples: snap.queued_samples,
            queued_bytes: snap.queued_bytes,
            max_queue_bytes: self.max_queue_bytes,
            sent_samples: snap.counters.sent,
            dropped_samples: snap.counters.dropped(),
            failing: snap.failing,
            last_error: snap.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_time: snap.last_error.as_ref().map(|(_, t)| *t),
            last_success: snap.last_success,
        }
    }
}

impl Drop for RemoteWriter {
    fn drop(&mut self) {
        let task = self
            .task
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

/// Every configured endpoint, each fed the same samples.
pub struct RemoteWriters {
    writers: Vec<RemoteWriter>,
}

impl RemoteWriters {
    /// Validates all `configs` (including that their names differ) and starts one
    /// writer per endpoint.
    pub fn start(configs: &[RemoteWriteConfig], external_labels: &Labels) -> Result<Self, String> {
        validate_all(configs)?;
        let writers = configs
            .iter()
            .map(|cfg| RemoteWriter::start(cfg.clone(), external_labels))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { writers })
    }

    pub fn is_empty(&self) -> bool {
        self.writers.is_empty()
    }

    pub fn writers(&self) -> &[RemoteWriter] {
        &self.writers
    }

    /// Queues `samples` on every endpoint; never waits on the network.
    pub fn push(&self, samples: Vec<SeriesSample>) {
        if let Some((last, rest)) = self.writers.split_last() {
            for writer in rest {
                writer.push(samples.clone());
            }
            last.push(samples);
        }
    }

    /// Shuts every endpoint down at once, all within the same `deadline`.
    pub async fn shutdown(&self, deadline: Duration) {
        futures::future::join_all(self.writers.iter().map(|w| w.shutdown(deadline))).await;
    }

    /// The self-metrics of every endpoint, one family per metric name.
    pub fn families(&self) -> Vec<Family> {
        let mut merged: Vec<Family> = Vec::new();
        for writer in &self.writers {
            for family in writer.families() {
                match merged.iter_mut().find(|f| f.name == family.name) {
                    Some(f) => f.samples.extend(family.samples),
                    None => merged.push(family),
                }
            }
        }
        merged
    }

    pub fn status(&self) -> Vec<QueueStatus> {
        self.writers.iter().map(RemoteWriter::status).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use bytes::Bytes;
    use sonde_proto::config::{ByteSize, PromDuration};
    use sonde_proto::prompb::WriteRequest;
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

    struct Attempt {
        at: std::time::Instant,
        headers: HeaderMap,
        request: WriteRequest,
        status: u16,
    }

    #[derive(Default)]
    struct Log {
        /// Replies for the next requests, in order; then `fallback`, then 204.
        script: VecDeque<Reply>,
        fallback: Option<Reply>,
        attempts: Vec<Attempt>,
    }

    /// A remote write receiver on 127.0.0.1 that decodes with [`decode`] and records
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
            Self::start_with(None).await
        }

        /// Serves HTTPS with `tls` when given.
        async fn start_with(tls: Option<rustls::ServerConfig>) -> Self {
            let log = Arc::new(Mutex::new(Log::default()));
            let app = axum::Router::new()
                .route("/api/v1/write", axum::routing::post(receive))
                .with_state(log.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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

    async fn receive(
        State(log): State<Arc<Mutex<Log>>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let request = match decode(&body) {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        };
        let reply = {
            let mut log = log.lock().unwrap();
            let reply = log
                .script
                .pop_front()
                .or_else(|| log.fallback.clone())
                .unwrap_or_else(|| Reply::status(204));
            log.attempts.push(Attempt {
                at: std::time::Instant::now(),
                headers,
                request,
                status: reply.status,
            });
            reply
        };
        tokio::time::sleep(reply.delay).await;
        let mut response =
            (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
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

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sample(name: &str, ts: i64) -> SeriesSample {
        SeriesSample {
            labels: labels(&[("__name__", name), ("job", "web")]),
            timestamp_ms: ts,
            value: ts as f64 / 10.0,
        }
    }

    fn flat(name: &str, ts: i64) -> Flat {
        let s = sample(name, ts);
        (s.labels, ts, s.value.to_bits())
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
        let writer = RemoteWriter::start(cfg, &external).unwrap();
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
        let writer = RemoteWriter::start(cfg, &no_labels()).unwrap();
        writer.push((1..=25).map(|t| sample("m", t)).collect());
        eventually("two full batches", || rx.accepted().len() == 2).await;
        // The last 5 wait for a full batch or the (hour-long) deadline.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sizes: Vec<usize> = rx
            .accepted()
            .iter()
            .map(|r| r.timeseries[0].samples.len())
            .collect();
        assert_eq!(sizes, [10, 10]);
        assert_eq!(writer.status().queued_samples, 5);

        writer.shutdown(Duration::from_secs(5)).await;
        let sizes: Vec<usize> = rx
            .accepted()
            .iter()
            .map(|r| r.timeseries[0].samples.len())
            .collect();
        assert_eq!(sizes, [10, 10, 5]);
        let want: Vec<Flat> = (1..=25).map(|t| flat("m", t)).collect();
        assert_eq!(rx.accepted_samples(), want);
    }

    #[tokio::test]
    async fn batches_by_deadline() {
        let rx = Receiver::start().await;
        let mut cfg = config(&rx.url());
        cfg.queue_config.batch_send_deadline = PromDuration::from_millis(300);
        let writer = RemoteWriter::start(cfg, &no_labels()).unwrap();
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
        // One request, one TimeSeries per series, samples in time order.
        assert_eq!(req.timeseries.len(), 2);
        let a: Vec<i64> = req.timeseries[0]
            .samples
            .iter()
            .map(|s| s.timestamp)
            .collect();
        assert_eq!(a, [1, 2]);
        writer.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn retries_500_and_429_without_losing_or_doubling() {
        let rx = Receiver::start().await;
        rx.script([Reply::status(500), Reply::status(429), Reply::status(503)]);
        let writer = RemoteWriter::start(config(&rx.url()), &no_labels()).unwrap();
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
        let writer = RemoteWriter::start(cfg, &no_labels()).unwrap();
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
        let writer = RemoteWriter::start(config(&rx.url()), &no_labels()).unwrap();
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
        let writer = RemoteWriter::start(config(&rx.url()), &no_labels()).unwrap();
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
        let writer = RemoteWriter::start(config(&rx.url()), &no_labels()).unwrap();
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
        assert_eq!(
            rx.accepted_samples(),
            vec![
                flat("a", 1000),
                flat("a", 2000),
                flat("a", 3000),
                flat("b", 1500),
                flat("a", 4000)
            ]
        );
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
        let writer = RemoteWriter::start(config(&rx.url()), &no_labels()).unwrap();
        writer.push(vec![
            SeriesSample {
                labels: labels(&[("job", "no-name")]),
                timestamp_ms: 1,
                value: 1.0,
            },
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
        let one = queue::sample_bytes(&sample("m", 1).labels);
        let mut cfg = config(&rx.url());
        cfg.queue_config.max_samples_per_send = 10;
        cfg.queue_config.max_queue_bytes = ByteSize(50 * one);
        let writer = RemoteWriter::start(cfg, &no_labels()).unwrap();
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
        let one = queue::sample_bytes(&sample("m", 1).labels);
        let mut cfg = config(&rx.url());
        cfg.queue_config.max_samples_per_send = 10;
        cfg.queue_config.max_queue_bytes = ByteSize(50 * one);
        let writer = RemoteWriter::start(cfg, &no_labels()).unwrap();
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
        let writer = RemoteWriter::start(config(&rx.url()), &no_labels()).unwrap();
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
        let writers = RemoteWriters::start(&[dead, live], &no_labels()).unwrap();

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
        let err = RemoteWriter::start(RemoteWriteConfig::new("ftp://x/"), &no_labels())
            .err()
            .unwrap();
        assert!(err.contains("http:// or https://"), "{err}");
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
                let dir = std::env::temp_dir()
                    .join(format!("sonde-rw-tls-{}-{test}", std::process::id()));
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
            let writer = RemoteWriter::start(cfg, &no_labels()).unwrap();
            writer.push(vec![sample("up", 1)]);
            eventually("the sample over TLS", || writer.status().sent_samples == 1).await;
            assert_eq!(rx.accepted_samples(), vec![flat("up", 1)]);
            writer.shutdown(Duration::from_secs(1)).await;
        }

        /// Starts a writer and returns its first error once a request has failed.
        async fn first_error(cfg: RemoteWriteConfig) -> String {
            let writer = RemoteWriter::start(cfg, &no_labels()).unwrap();
            writer.push(vec![sample("up", 1)]);
            eventually("a failed request", || writer.status().failing).await;
            let error = writer.status().last_error.unwrap();
            writer.shutdown(Duration::from_millis(50)).await;
            error
        }

        #[tokio::test]
        async fn https_with_ca_file_and_server_name() {
            let files = Files::new("ca");
            let rx = Receiver::start_with(Some(server_config(false))).await;
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
            let rx = Receiver::start_with(Some(server_config(false))).await;
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
            let rx = Receiver::start_with(Some(server_config(false))).await;
            let tls = config::TlsConfig {
                insecure_skip_verify: true,
                ..Default::default()
            };
            delivers(https_config(&rx, tls), &rx).await;
        }

        #[tokio::test]
        async fn https_client_certificate() {
            let files = Files::new("mtls");
            let rx = Receiver::start_with(Some(server_config(true))).await;
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
}
