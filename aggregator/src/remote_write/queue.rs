//! The queue of one endpoint and the task that drains it.
//!
//! Producers call [`Shared::push`], which never waits on the network: it only takes a
//! mutex that the sending task holds for short, I/O-free sections. The task sends the
//! oldest samples first, one request at a time, so the samples of a series arrive in
//! order; it retries a failed request without a time limit while the byte bound of the
//! queue drops the oldest samples, so a dead receiver costs bounded memory.

use super::client::{Client, SendError};
use super::config::QueueConfig;
use super::encode::{self, Series, SeriesSample};
use bytes::Bytes;
use sonde_proto::exposition::Family;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// A normalized label set, shared by the series map and every queued sample of the series
/// so that the labels are stored once however many samples wait.
type LabelSet = Arc<[(String, String)]>;

/// How long a series may go without a sample before its last timestamp is forgotten. A
/// sample older than a forgotten one would be older than an hour, which Prometheus
/// rejects anyway (it is outside the head block); forgetting keeps memory bounded when
/// targets come and go.
const SERIES_TTL: Duration = Duration::from_secs(3600);
const PRUNE_EVERY: Duration = Duration::from_secs(300);
/// Distinct rejection messages remembered so that each is logged once.
const REJECTIONS_REMEMBERED: usize = 100;

/// What a sample counts toward `max_queue_bytes`: its uncompressed size as sent, labels
/// included (label name and value plus protobuf framing, 16 bytes of timestamp and value).
/// The queue really uses less, since a series' labels are stored once, so the bound is a
/// conservative one.
pub(crate) fn sample_bytes(labels: &[(String, String)]) -> u64 {
    16 + labels
        .iter()
        .map(|(n, v)| (n.len() + v.len() + 4) as u64)
        .sum::<u64>()
}

struct Entry {
    labels: LabelSet,
    timestamp_ms: i64,
    value: f64,
    bytes: u64,
    /// When it was queued, in ms since `Shared::epoch`: a sample waits at most
    /// batch_send_deadline for a full batch, counted from its own arrival.
    queued_ms: u64,
}

struct SeriesState {
    labels: LabelSet,
    last_timestamp_ms: i64,
    touched: Instant,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub sent: u64,
    pub bytes_sent: u64,
    pub retried: u64,
    pub requests_failed: u64,
    pub dropped_http_4xx: u64,
    pub dropped_queue_full: u64,
    pub dropped_out_of_order: u64,
    pub dropped_invalid_labels: u64,
    pub dropped_too_large: u64,
}

impl Counters {
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped_http_4xx
            + self.dropped_queue_full
            + self.dropped_out_of_order
            + self.dropped_invalid_labels
            + self.dropped_too_large
    }
}

struct State {
    queue: VecDeque<Entry>,
    queue_bytes: u64,
    /// Sequence number of `queue.front()`; queued samples are numbered consecutively, so a
    /// request is a range of numbers that stays meaningful while the bound drops samples.
    front_seq: u64,
    /// While a request is out, the end (exclusive) of the numbers it carries.
    in_flight_end: Option<u64>,
    /// Samples of the request in flight that the bound dropped from the queue meanwhile.
    /// They count as sent if the request lands, as dropped if it has to be redone.
    in_flight_evicted: u64,
    series: HashMap<LabelSet, SeriesState>,
    counters: Counters,
    failing: bool,
    last_error: Option<(String, SystemTime)>,
    last_success: Option<SystemTime>,
    warned_invalid: bool,
}

/// What the producers and the sending task share.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) url: String,
    /// Added to every series that does not have the label itself.
    external_labels: Vec<(String, String)>,
    max_samples_per_send: usize,
    max_queue_bytes: u64,
    epoch: Instant,
    state: Mutex<State>,
    /// Wakes the task when a batch may have become ready.
    wake: Notify,
}

/// A point-in-time view of the queue for the status page and metrics.
pub(crate) struct Snapshot {
    pub queued_samples: usize,
    pub queued_bytes: u64,
    pub counters: Counters,
    pub failing: bool,
    pub last_error: Option<(String, SystemTime)>,
    pub last_success: Option<SystemTime>,
}

impl Shared {
    pub(crate) fn new(
        name: String,
        url: String,
        external_labels: Vec<(String, String)>,
        queue: &QueueConfig,
    ) -> Self {
        Self {
            name,
            url,
            external_labels,
            max_samples_per_send: queue.max_samples_per_send,
            max_queue_bytes: queue.max_queue_bytes.0,
            epoch: Instant::now(),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queue_bytes: 0,
                front_seq: 0,
                in_flight_end: None,
                in_flight_evicted: 0,
                series: HashMap::new(),
                counters: Counters::default(),
                failing: false,
                last_error: None,
                last_success: None,
                warned_invalid: false,
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves the queue consistent enough to
        // keep sending: every section below restores its invariants before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push(&self, samples: Vec<SeriesSample>) {
        if samples.is_empty() {
            return;
        }
        // Normalizing is the costly part; do it before taking the lock.
        let prepared: Vec<_> = samples
            .into_iter()
            .map(|s| {
                let labels = series_labels(s.labels, &self.external_labels);
                (labels, s.timestamp_ms, s.value)
            })
            .collect();
        let now = Instant::now();
        let queued_ms = now.duration_since(self.epoch).as_millis() as u64;
        let mut st = self.lock();
        let was_empty = st.queue.is_empty();
        for (labels, timestamp_ms, value) in prepared {
            let labels = match labels {
                Ok(l) => l,
                Err((problem, labels)) => {
                    st.counters.dropped_invalid_labels += 1;
                    if !st.warned_invalid {
                        st.warned_invalid = true;
                        tracing::warn!(
                            remote_name = %self.name,
                            url = %self.url,
                            ?labels,
                            "dropping samples whose labels no receiver accepts ({problem}); \
                             counted in sonde_remote_write_samples_dropped_total{{reason=\"invalid_labels\"}}, \
                             logged once"
                        );
                    }
                    continue;
                }
            };
            let set = match st.series.get_mut(labels.as_slice()) {
                Some(series) => {
                    // A second sample at the same or an earlier time would make the
                    // receiver refuse the whole request (HTTP 400), losing good samples.
                    if timestamp_ms <= series.last_timestamp_ms {
                        st.counters.dropped_out_of_order += 1;
                        continue;
                    }
                    series.last_timestamp_ms = timestamp_ms;
                    series.touched = now;
                    series.labels.clone()
                }
                None => {
                    let set: LabelSet = Arc::from(labels);
                    st.series.insert(
                        set.clone(),
                        SeriesState {
                            labels: set.clone(),
                            last_timestamp_ms: timestamp_ms,
                            touched: now,
                        },
                    );
                    set
                }
            };
            let bytes = sample_bytes(&set);
            st.queue_bytes += bytes;
            st.queue.push_back(Entry {
                labels: set,
                timestamp_ms,
                value,
                bytes,
                queued_ms,
            });
        }
        while st.queue_bytes > self.max_queue_bytes {
            let Some(entry) = st.queue.pop_front() else {
                break;
            };
            st.queue_bytes -= entry.bytes;
            if st.in_flight_end.is_some_and(|end| st.front_seq < end) {
                st.in_flight_evicted += 1;
            } else {
                st.counters.dropped_queue_full += 1;
            }
            st.front_seq += 1;
        }
        let wake = was_empty || st.queue.len() >= self.max_samples_per_send;
        drop(st);
        if wake {
            self.wake.notify_one();
        }
    }

    fn forget_quiet_series(&self, now: Instant) {
        self.lock()
            .series
            .retain(|_, s| now.saturating_duration_since(s.touched) < SERIES_TTL);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        Snapshot {
            queued_samples: st.queue.len(),
            queued_bytes: st.queue_bytes,
            counters: st.counters,
            failing: st.failing,
            last_error: st.last_error.clone(),
            last_success: st.last_success,
        }
    }

    pub(crate) fn families(&self) -> Vec<Family> {
        let snap = self.snapshot();
        let c = snap.counters;
        let id = || {
            vec![
                ("remote_name".to_string(), self.name.clone()),
                ("url".to_string(), self.url.clone()),
            ]
        };
        let with_reason = |reason: &str| {
            let mut labels = id();
            labels.push(("reason".to_string(), reason.to_string()));
            labels
        };
        let unix = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64())
        };
        vec![
            Family::counter(
                "sonde_remote_write_samples_sent_total",
                "Samples the remote write endpoint accepted.",
            )
            .with(id(), c.sent as f64),
            Family::counter(
                "sonde_remote_write_samples_retried_total",
                "Samples sent again after a failed request (5xx, 429, connection error, timeout).",
            )
            .with(id(), c.retried as f64),
            Family::counter(
                "sonde_remote_write_samples_dropped_total",
                "Samples never to be sent: refused by the endpoint (http_4xx), pushed out of the full queue (queue_full), not newer than the last sample of their series (out_of_order), with labels no receiver accepts (invalid_labels), or in a request too large to encode (too_large).",
            )
            .with(with_reason("http_4xx"), c.dropped_http_4xx as f64)
            .with(with_reason("queue_full"), c.dropped_queue_full as f64)
            .with(with_reason("out_of_order"), c.dropped_out_of_order as f64)
            .with(with_reason("invalid_labels"), c.dropped_invalid_labels as f64)
            .with(with_reason("too_large"), c.dropped_too_large as f64),
            Family::counter(
                "sonde_remote_write_requests_failed_total",
                "Remote write requests that did not succeed, retried or not.",
            )
            .with(id(), c.requests_failed as f64),
            Family::counter(
                "sonde_remote_write_sent_bytes_total",
                "Compressed request bytes the remote write endpoint accepted.",
            )
            .with(id(), c.bytes_sent as f64),
            Family::gauge(
                "sonde_remote_write_queue_samples",
                "Samples waiting to be sent, including the request in flight.",
            )
            .with(id(), snap.queued_samples as f64),
            Family::gauge(
                "sonde_remote_write_queue_bytes",
                "Size of the waiting samples as counted against queue_config.max_queue_bytes.",
            )
            .with(id(), snap.queued_bytes as f64),
            Family::gauge(
                "sonde_remote_write_queue_max_bytes",
                "queue_config.max_queue_bytes: past it the oldest samples are dropped.",
            )
            .with(id(), self.max_queue_bytes as f64),
            Family::gauge(
                "sonde_remote_write_last_send_timestamp_seconds",
                "Unix time of the last request the endpoint accepted, 0 before the first.",
            )
            .with(id(), unix(snap.last_success)),
        ]
    }
}

type Invalid = (&'static str, Vec<(String, String)>);

/// The label set a sample is queued under: empty values dropped, external labels added
/// where the series lacks them, names in byte order. Refuses what receivers refuse
/// outright (a missing metric name, a repeated or empty label name), since one such
/// sample would get its whole request rejected.
fn series_labels(
    mut labels: Vec<(String, String)>,
    external: &[(String, String)],
) -> Result<Vec<(String, String)>, Invalid> {
    labels.retain(|(_, v)| !v.is_empty());
    for (name, value) in external {
        if !labels.iter().any(|(n, _)| n == name) {
            labels.push((name.clone(), value.clone()));
        }
    }
    encode::normalize_labels(&mut labels);
    if !labels.iter().any(|(n, _)| n == "__name__") {
        return Err(("no __name__ label", labels));
    }
    if labels.iter().any(|(n, _)| n.is_empty()) {
        return Err(("an empty label name", labels));
    }
    if labels.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(("a label name given twice", labels));
    }
    Ok(labels)
}

/// The pause before retry number `attempt` (1 for the first retry): the receiver's
/// `Retry-After` when it gave one, capped at `max_backoff`; otherwise `min_backoff`
/// doubled per attempt up to `max_backoff`, with jitter so that many senders cut off
/// together do not come back in lockstep. Always within `[min_backoff, max_backoff]`.
pub(crate) fn backoff(
    min: Duration,
    max: Duration,
    attempt: u32,
    retry_after: Option<Duration>,
) -> Duration {
    if let Some(after) = retry_after.filter(|d| !d.is_zero()) {
        return after.clamp(min, max);
    }
    let base = min
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(30))
        .min(max);
    base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
        .clamp(min, max)
}

/// Runs `fut` until it finishes or the shutdown deadline (once one is set) passes;
/// `None` when the deadline won.
async fn until_stop<F: Future>(
    stop: &mut watch::Receiver<Option<Instant>>,
    fut: F,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        let deadline = *stop.borrow_and_update();
        match deadline {
            Some(deadline) => return tokio::time::timeout_at(deadline, &mut fut).await.ok(),
            None => tokio::select! {
                out = &mut fut => return Some(out),
                changed = stop.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            },
        }
    }
}

/// The sending task of one endpoint. `stop` carries the shutdown deadline: once set, the
/// task sends what is queued without waiting for full batches and returns when the queue
/// is empty or the deadline has passed.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut client: Client,
    queue: QueueConfig,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let mut sender = Sender {
        shared: shared.clone(),
        queue,
        rejections_logged: HashSet::new(),
        next_prune: Instant::now() + PRUNE_EVERY,
    };
    loop {
        sender.maybe_prune();
        let now = Instant::now();
        let next_prune = sender.next_prune;
        let stopping = stop.borrow_and_update().is_some();
        let wait_until = {
            let st = shared.lock();
            let len = st.queue.len();
            let due = st.queue.front().map(|e| {
                shared.epoch
                    + Duration::from_millis(e.queued_ms)
                    + sender.queue.batch_send_deadline.0
            });
            if len >= shared.max_samples_per_send
                || (len > 0 && (stopping || due.is_none_or(|d| now >= d)))
            {
                None
            } else if len == 0 && stopping {
                return;
            } else {
                Some(due.unwrap_or(next_prune).min(next_prune))
            }
        };
        if let Some(until) = wait_until {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep_until(until) => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            continue;
        }
        if !sender.send_front_batch(&mut client, &mut stop).await {
            let left = shared.lock().queue.len();
            if left > 0 {
                tracing::warn!(
                    remote_name = %shared.name,
                    url = %shared.url,
                    samples = left,
                    "shutdown deadline reached: queued samples were not sent"
                );
            }
            return;
        }
    }
}

struct Sender {
    shared: Arc<Shared>,
    queue: QueueConfig,
    rejections_logged: HashSet<String>,
    next_prune: Instant,
}

impl Sender {
    /// Forgets series that have been quiet for [`SERIES_TTL`]; also called between
    /// retries, since an outage can keep the task retrying for hours.
    fn maybe_prune(&mut self) {
        let now = Instant::now();
        if now < self.next_prune {
            return;
        }
        self.next_prune = now + PRUNE_EVERY;
        self.shared.forget_quiet_series(now);
    }

    /// Sends the oldest `max_samples_per_send` samples until they land, are refused, or
    /// are all pushed out of the queue by its bound. False when the shutdown deadline
    /// interrupted it.
    async fn send_front_batch(
        &mut self,
        client: &mut Client,
        stop: &mut watch::Receiver<Option<Instant>>,
    ) -> bool {
        let shared = self.shared.clone();
        let end_seq = {
            let st = shared.lock();
            st.front_seq + st.queue.len().min(shared.max_samples_per_send) as u64
        };
        // The encoded body stays valid while the bound has not taken samples off it.
        let mut cached: Option<(u64, Bytes)> = None;
        let mut attempt = 0u32;
        loop {
            let (front, rows) = {
                let mut st = shared.lock();
                if st.front_seq >= end_seq {
                    return true;
                }
                let front = st.front_seq;
                let n = (end_seq - front) as usize;
                st.in_flight_end = Some(end_seq);
                st.in_flight_evicted = 0;
                let rows = match &cached {
                    Some((seq, _)) if *seq == front => Vec::new(),
                    _ => st
                        .queue
                        .iter()
                        .take(n)
                        .map(|e| (e.labels.clone(), e.timestamp_ms, e.value))
                        .collect(),
                };
                (front, rows)
            };
            let n = end_seq - front;
            let body = match &cached {
                Some((seq, body)) if *seq == front => body.clone(),
                _ => match encode::encode(&group(&rows)) {
                    Ok(body) => {
                        let body = Bytes::from(body);
                        cached = Some((front, body.clone()));
                        body
                    }
                    Err(e) => {
                        let mut st = shared.lock();
                        pop_through(&mut st, end_seq);
                        st.counters.dropped_too_large += n;
                        st.last_error = Some((e.to_string(), SystemTime::now()));
                        tracing::error!(remote_name = %shared.name, url = %shared.url, error = %e, "dropping a batch that cannot be encoded");
                        return true;
                    }
                },
            };
            let outcome = until_stop(stop, client.send(body.clone())).await;
            match self.settle(outcome, end_seq, n, body.len(), attempt) {
                Settled::Done => return true,
                Settled::Stopped => return false,
                Settled::Retry(retry_after) => {
                    self.maybe_prune();
                    attempt = attempt.saturating_add(1);
                    let pause = backoff(
                        self.queue.min_backoff.0,
                        self.queue.max_backoff.0,
                        attempt,
                        retry_after,
                    );
                    if until_stop(stop, tokio::time::sleep(pause)).await.is_none() {
                        return false;
                    }
                }
            }
        }
    }

    /// Books the outcome of the request carrying samples up to `end_seq` (`n` of them);
    /// `None` when the shutdown deadline cut it short.
    fn settle(
        &mut self,
        outcome: Option<Result<(), SendError>>,
        end_seq: u64,
        n: u64,
        body_len: usize,
        failed_attempts: u32,
    ) -> Settled {
        let shared = &self.shared;
        let mut st = shared.lock();
        st.in_flight_end = None;
        let evicted = std::mem::take(&mut st.in_flight_evicted);
        let Some(outcome) = outcome else {
            st.counters.dropped_queue_full += evicted;
            return Settled::Stopped;
        };
        match outcome {
            Ok(()) => {
                pop_through(&mut st, end_seq);
                st.counters.sent += n;
                st.counters.bytes_sent += body_len as u64;
                st.last_success = Some(SystemTime::now());
                if st.failing {
                    st.failing = false;
                    tracing::info!(
                        remote_name = %shared.name,
                        url = %shared.url,
                        failed_attempts,
                        "remote write endpoint accepts samples again"
                    );
                }
                Settled::Done
            }
            Err(SendError::Rejected { status, message }) => {
                pop_through(&mut st, end_seq);
                st.counters.dropped_http_4xx += n;
                st.counters.requests_failed += 1;
                let error = format!("HTTP {status}: {message}");
                st.last_error = Some((error.clone(), SystemTime::now()));
                drop(st);
                if self.rejections_logged.len() >= REJECTIONS_REMEMBERED {
                    self.rejections_logged.clear();
                }
                if self.rejections_logged.insert(error.clone()) {
                    tracing::warn!(
                        remote_name = %shared.name,
                        url = %shared.url,
                        samples = n,
                        error = %error,
                        "remote write endpoint refused a request; its samples are dropped \
                         (each distinct refusal is logged once)"
                    );
                }
                Settled::Done
            }
            Err(SendError::Retryable {
                message,
                retry_after,
            }) => {
                st.counters.retried += n;
                st.counters.requests_failed += 1;
                st.counters.dropped_queue_full += evicted;
                st.last_error = Some((message.clone(), SystemTime::now()));
                let first = !st.failing;
                st.failing = true;
                drop(st);
                if first {
                    tracing::warn!(
                        remote_name = %shared.name,
                        url = %shared.url,
                        error = %message,
                        "remote write failed; retrying with backoff until it succeeds"
                    );
                } else {
                    tracing::debug!(
                        remote_name = %shared.name,
                        error = %message,
                        "remote write retry failed"
                    );
                }
                Settled::Retry(retry_after)
            }
        }
    }
}

enum Settled {
    Done,
    Stopped,
    Retry(Option<Duration>),
}

/// Removes the samples numbered below `end_seq` that are still queued.
fn pop_through(st: &mut State, end_seq: u64) {
    while st.front_seq < end_seq {
        let Some(entry) = st.queue.pop_front() else {
            break;
        };
        st.queue_bytes -= entry.bytes;
        st.front_seq += 1;
    }
}

/// One `Series` per label set, in order of first appearance, samples in queue order —
/// which is timestamp order, since the queue only accepts increasing timestamps per series.
fn group(rows: &[(LabelSet, i64, f64)]) -> Vec<Series> {
    let mut index: HashMap<&[(String, String)], usize> = HashMap::new();
    let mut out: Vec<Series> = Vec::new();
    for (labels, ts, value) in rows {
        let i = *index.entry(labels).or_insert_with(|| {
            out.push(Series {
                labels: labels.to_vec(),
                samples: Vec::new(),
            });
            out.len() - 1
        });
        out[i].samples.push((*ts, *value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_get_external_labels_unless_present() {
        let ext = l(&[("cluster", "eu1"), ("job", "ext")]);
        let got = series_labels(l(&[("job", "web"), ("__name__", "up"), ("x", "")]), &ext);
        assert_eq!(
            got.unwrap(),
            l(&[("__name__", "up"), ("cluster", "eu1"), ("job", "web")])
        );
        // An empty value is no label, so the external one applies.
        let got = series_labels(l(&[("__name__", "up"), ("cluster", "")]), &ext).unwrap();
        assert_eq!(
            got,
            l(&[("__name__", "up"), ("cluster", "eu1"), ("job", "ext")])
        );
        assert!(series_labels(l(&[("job", "web")]), &[]).is_err());
        assert!(series_labels(l(&[("__name__", "up"), ("a", "1"), ("a", "2")]), &[]).is_err());
        assert!(series_labels(l(&[("__name__", "up"), ("", "1")]), &[]).is_err());
    }

    #[test]
    fn backoff_bounds() {
        let min = Duration::from_millis(30);
        let max = Duration::from_secs(5);
        for attempt in 1..40 {
            let d = backoff(min, max, attempt, None);
            assert!(d >= min && d <= max, "attempt {attempt}: {d:?}");
        }
        // Doubling: by attempt 3 the base is 120ms, jittered into [60ms, 120ms].
        for _ in 0..100 {
            let d = backoff(min, max, 3, None);
            assert!(
                d >= Duration::from_millis(60) && d <= Duration::from_millis(120),
                "{d:?}"
            );
        }
        assert!(backoff(min, max, 40, None) >= Duration::from_millis(2500));
        assert_eq!(
            backoff(min, max, 1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(backoff(min, max, 1, Some(Duration::from_secs(3600))), max);
        assert!(backoff(min, max, 1, Some(Duration::ZERO)) <= min);
    }

    #[test]
    fn groups_by_series_in_order() {
        let a: LabelSet = Arc::from(l(&[("__name__", "a")]));
        let b: LabelSet = Arc::from(l(&[("__name__", "b")]));
        // Same labels in a different allocation (after the series map forgot it) still
        // make one TimeSeries.
        let a2: LabelSet = Arc::from(l(&[("__name__", "a")]));
        let rows = vec![
            (a.clone(), 1, 1.0),
            (b.clone(), 1, 2.0),
            (a.clone(), 2, 3.0),
            (a2, 3, 4.0),
        ];
        let got = group(&rows);
        assert_eq!(
            got,
            vec![
                Series {
                    labels: a.to_vec(),
                    samples: vec![(1, 1.0), (2, 3.0), (3, 4.0)]
                },
                Series {
                    labels: b.to_vec(),
                    samples: vec![(1, 2.0)]
                },
            ]
        );
    }

    fn sample(name: &str, ts: i64) -> SeriesSample {
        SeriesSample {
            labels: l(&[("__name__", name)]),
            timestamp_ms: ts,
            value: ts as f64,
        }
    }

    #[test]
    fn push_drops_out_of_order_and_bounds_bytes() {
        let mut q = QueueConfig::default();
        let one = sample_bytes(&l(&[("__name__", "m")]));
        q.max_queue_bytes = sonde_proto::config::ByteSize(one * 3);
        let shared = Shared::new("t".into(), "http://x/".into(), Vec::new(), &q);
        shared.push(vec![sample("m", 10), sample("m", 10), sample("m", 5)]);
        shared.push((11..=15).map(|t| sample("m", t)).collect());
        let snap = shared.snapshot();
        assert_eq!(snap.counters.dropped_out_of_order, 2);
        assert_eq!(snap.counters.dropped_queue_full, 3);
        assert_eq!(snap.queued_samples, 3);
        assert_eq!(snap.queued_bytes, one * 3);
        let st = shared.lock();
        let left: Vec<i64> = st.queue.iter().map(|e| e.timestamp_ms).collect();
        assert_eq!(left, [13, 14, 15]);
        assert_eq!(st.front_seq, 3);
    }

    #[test]
    fn quiet_series_are_forgotten() {
        let shared = Shared::new(
            "t".into(),
            "http://x/".into(),
            Vec::new(),
            &QueueConfig::default(),
        );
        shared.push(vec![sample("old", 10), sample("new", 10)]);
        shared.forget_quiet_series(Instant::now() + SERIES_TTL / 2);
        assert_eq!(shared.lock().series.len(), 2);
        shared.push(vec![sample("new", 11)]);
        shared.forget_quiet_series(Instant::now() + SERIES_TTL + Duration::from_secs(1));
        // Both are quiet by then; the map is empty and a restarted series is accepted.
        assert!(shared.lock().series.is_empty());
        shared.push(vec![sample("old", 5)]);
        assert_eq!(shared.snapshot().counters.dropped_out_of_order, 0);
        assert_eq!(shared.snapshot().queued_samples, 4);
    }
}
