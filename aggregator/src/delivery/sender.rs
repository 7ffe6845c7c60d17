//! The sending side of one endpoint: a task per shard that reads its shard's oldest
//! samples from the queue, sends them, and settles them.
//!
//! A task reads up to `max_samples_per_send` samples and sends them as one request; it
//! settles them (moves the shard's cursor past them) only when the receiver stored them
//! (2xx) or refused them for good (other 4xx: dropped, counted, the receiver's message
//! logged once). 5xx, 429 and connection errors are retried with capped exponential
//! backoff (or `Retry-After`) for as long as it takes, re-reading the batch each time so
//! that the byte bound, which drops the oldest samples, is respected meanwhile. A 400 on a
//! request with several series is split in two and each half sent again, a few times, so
//! one series the receiver refuses (out of order, out of bounds) does not take the others
//! down with it. A request waits for a full batch or for its oldest sample's
//! `batch_send_deadline`, whichever comes first.

use crate::remote_write::backoff;
use crate::remote_write::client::{Client, SendError};
use crate::remote_write::config::ProtobufMessage;
use crate::remote_write::request::Payload;
use crate::storage::queue::{Shared, Tally};
use bytes::Bytes;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Distinct rejection messages remembered so that each is logged once.
const REJECTIONS_REMEMBERED: usize = 100;
/// After a database error the shard task waits this long before trying again.
const DB_ERROR_PAUSE: Duration = Duration::from_secs(1);

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

/// How a request (or the requests a 400 was split into) ended.
enum Delivered {
    Done(Tally),
    /// A retryable failure of the whole batch: read it again after this pause.
    Retry(Option<Duration>),
    /// The shutdown deadline passed.
    Stopped,
}

/// How a batch ended, for the shard loop.
enum BatchEnd {
    /// The shard had nothing to send.
    Empty,
    Done,
    Stopped,
}

/// The sending task of one shard. `stop` carries the shutdown deadline: once set, the
/// task sends what its shard holds without waiting for full batches and returns when the
/// shard is empty or the deadline has passed (what is left stays on disk).
pub(crate) async fn run_shard(
    shared: Arc<Shared>,
    shard: usize,
    mut client: Client,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let mut sender = ShardSender {
        shared: shared.clone(),
        shard,
        rejections_logged: HashSet::new(),
    };
    loop {
        let stopping = stop.borrow_and_update().is_some();
        let wait_until = shared.next_read(shard, Instant::now(), stopping);
        if let Some(until) = wait_until {
            tokio::select! {
                _ = shared.woken(shard) => {}
                _ = tokio::time::sleep_until(until) => {}
                changed = stop.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            continue;
        }
        let read_at = Instant::now();
        match sender.send_batch(&mut client, &mut stop).await {
            BatchEnd::Done => {}
            BatchEnd::Empty => {
                if stopping {
                    return;
                }
                // Samples queued since the read keep their hint: they are not read yet.
                shared.read_all_until(shard, read_at);
            }
            BatchEnd::Stopped => return,
        }
    }
}

struct ShardSender {
    shared: Arc<Shared>,
    shard: usize,
    rejections_logged: HashSet<String>,
}

impl ShardSender {
    /// Reads the shard's oldest samples and sends them until they are settled (stored,
    /// refused, or evicted while the receiver was failing).
    async fn send_batch(
        &mut self,
        client: &mut Client,
        stop: &mut watch::Receiver<Option<Instant>>,
    ) -> BatchEnd {
        let mut attempt = 0u32;
        loop {
            let mut batch = match self.shared.read_batch(self.shard) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(remote_name = %self.shared.name, error = %e, "remote write queue: reading a batch failed; retrying");
                    if until_stop(stop, tokio::time::sleep(DB_ERROR_PAUSE))
                        .await
                        .is_none()
                    {
                        return BatchEnd::Stopped;
                    }
                    continue;
                }
            };
            if batch.scanned == 0 {
                return if attempt == 0 {
                    BatchEnd::Empty
                } else {
                    BatchEnd::Done
                };
            }
            if batch.series.is_empty() && batch.fields.is_empty() {
                // Everything read is to be dropped (too old, damaged): settle and read on.
                if let Err(e) = self.shared.settle(self.shard, &batch, Tally::default()) {
                    tracing::error!(remote_name = %self.shared.name, error = %e, "remote write queue: removing dropped samples failed");
                    self.shared.release_in_flight(self.shard);
                    if until_stop(stop, tokio::time::sleep(DB_ERROR_PAUSE))
                        .await
                        .is_none()
                    {
                        return BatchEnd::Stopped;
                    }
                }
                continue;
            }
            let payload = if batch.fields.is_empty() {
                Payload::Series(std::mem::take(&mut batch.series))
            } else {
                Payload::Fields(std::mem::take(&mut batch.fields))
            };
            let mut budget = split_budget(payload.parts());
            match self.deliver(client, stop, payload, true, &mut budget).await {
                Delivered::Stopped => {
                    self.shared.release_in_flight(self.shard);
                    return BatchEnd::Stopped;
                }
                Delivered::Retry(retry_after) => {
                    self.shared.release_in_flight(self.shard);
                    if !self.pause(&mut attempt, retry_after, stop).await {
                        return BatchEnd::Stopped;
                    }
                }
                Delivered::Done(tally) => {
                    if let Err(e) = self.shared.settle(self.shard, &batch, tally) {
                        // The samples stay and are sent again: a duplicate, never a loss.
                        tracing::error!(remote_name = %self.shared.name, error = %e, "remote write queue: removing a sent batch failed");
                        self.shared.release_in_flight(self.shard);
                    }
                    return BatchEnd::Done;
                }
            }
        }
    }

    /// Sends `payload` until it is stored or refused. A retryable failure of the whole
    /// batch (`top`) goes back to the caller, which reads the batch again after the pause;
    /// the halves of a split batch are retried here. An HTTP 400 on several series splits
    /// them while `budget` lasts: the receiver refuses a whole request for one bad sample.
    fn deliver<'a>(
        &'a mut self,
        client: &'a mut Client,
        stop: &'a mut watch::Receiver<Option<Instant>>,
        mut payload: Payload,
        top: bool,
        budget: &'a mut u32,
    ) -> Pin<Box<dyn Future<Output = Delivered> + Send + 'a>> {
        Box::pin(async move {
            let n = payload.samples();
            let mut attempt = 0u32;
            loop {
                let (body, message) = match payload.encode(self.shared.message()) {
                    Ok((body, message)) => (Bytes::from(body), message),
                    Err(e) => {
                        self.record_error(e.to_string());
                        tracing::error!(remote_name = %self.shared.name, url = %self.shared.url, error = %e, "dropping a batch that cannot be encoded");
                        return Delivered::Done(Tally {
                            too_large: n,
                            ..Tally::default()
                        });
                    }
                };
                let Some(result) = until_stop(stop, client.send(body.clone(), message)).await
                else {
                    return Delivered::Stopped;
                };
                match result {
                    Ok(written) => {
                        if message == ProtobufMessage::RequestV2 && !written.any() {
                            self.shared.fall_back(
                                "a 2xx response without X-Prometheus-Remote-Write-*-Written headers (nothing stored)",
                            );
                            continue;
                        }
                        if let Some(w) = written.samples
                            && w < n
                        {
                            self.warn_partial(w, n);
                        }
                        return Delivered::Done(Tally {
                            sent: n,
                            bytes: body.len() as u64,
                            ..Tally::default()
                        });
                    }
                    Err(SendError::Rejected { status: 415, .. })
                        if message == ProtobufMessage::RequestV2 =>
                    {
                        self.shared
                            .fall_back("HTTP 415 Unsupported Media Type for the 2.0 message");
                        continue;
                    }
                    Err(SendError::Rejected { status, message }) => {
                        let error = format!("HTTP {status}: {message}");
                        self.record_error(error.clone());
                        if status == 400 {
                            // Split by series, not by sample.
                            payload = payload.grouped();
                        }
                        if status == 400 && payload.parts() > 1 && *budget >= 2 {
                            *budget -= 2;
                            tracing::debug!(remote_name = %self.shared.name, series = payload.parts(), error = %error, "request refused; splitting it to isolate the refused series");
                            let right = payload.split_off(payload.parts() / 2);
                            let a = self.deliver(client, stop, payload, false, budget).await;
                            let b = match a {
                                Delivered::Stopped => return Delivered::Stopped,
                                _ => self.deliver(client, stop, right, false, budget).await,
                            };
                            return match (a, b) {
                                (Delivered::Done(x), Delivered::Done(y)) => Delivered::Done(x + y),
                                _ => Delivered::Stopped,
                            };
                        }
                        self.log_refusal(&error, n);
                        return Delivered::Done(Tally {
                            refused: n,
                            ..Tally::default()
                        });
                    }
                    Err(SendError::Retryable {
                        message,
                        retry_after,
                    }) => {
                        self.record_retry(message, n);
                        if top {
                            return Delivered::Retry(retry_after);
                        }
                        if !self.pause(&mut attempt, retry_after, stop).await {
                            return Delivered::Stopped;
                        }
                    }
                }
            }
        })
    }

    fn record_error(&self, error: String) {
        self.shared.record_failed_request(error);
    }

    /// Waits out the backoff of one more failed attempt (or `Retry-After`); false when
    /// the shutdown deadline came first.
    async fn pause(
        &self,
        attempt: &mut u32,
        retry_after: Option<Duration>,
        stop: &mut watch::Receiver<Option<Instant>>,
    ) -> bool {
        *attempt = attempt.saturating_add(1);
        let pause = backoff(
            self.shared.queue.min_backoff.0,
            self.shared.queue.max_backoff.0,
            *attempt,
            retry_after,
        );
        until_stop(stop, tokio::time::sleep(pause)).await.is_some()
    }

    fn record_retry(&self, message: String, n: u64) {
        let first = self.shared.record_retry(message.clone(), n);
        if first {
            tracing::warn!(
                remote_name = %self.shared.name,
                url = %self.shared.url,
                error = %message,
                "remote write failed; retrying with backoff until it succeeds (the queue is on disk)"
            );
        } else {
            tracing::debug!(remote_name = %self.shared.name, error = %message, "remote write retry failed");
        }
    }

    fn log_refusal(&mut self, error: &str, n: u64) {
        if self.rejections_logged.len() >= REJECTIONS_REMEMBERED {
            self.rejections_logged.clear();
        }
        if self.rejections_logged.insert(error.to_string()) {
            tracing::warn!(
                remote_name = %self.shared.name,
                url = %self.shared.url,
                samples = n,
                error = %error,
                "remote write endpoint refused a request; its samples are dropped \
                 (each distinct refusal is logged once)"
            );
        }
    }

    fn warn_partial(&self, written: u64, sent: u64) {
        if self.shared.first_partial_write() {
            tracing::warn!(
                remote_name = %self.shared.name,
                url = %self.shared.url,
                written,
                sent,
                "the remote write 2.0 receiver answered 2xx but reports fewer samples written than sent (logged once)"
            );
        }
    }
}

/// Requests a refused batch of `series` series may be split into: enough to isolate a
/// few bad series by halving (two requests per level), not one request per series.
fn split_budget(series: usize) -> u32 {
    let levels = usize::BITS - series.leading_zeros();
    4 * levels + 2
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn split_budget_isolates_a_few_series() {
        assert_eq!(split_budget(1), 6);
        // 2000 series: 11 halvings reach one series; enough for two bad ones.
        assert!(split_budget(2000) >= 2 * 2 * 11);
        assert!(split_budget(2000) < 100);
    }
}
