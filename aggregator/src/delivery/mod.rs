//! Delivery to the remote-write endpoints: each endpoint's durable queue (in
//! `storage::queue`) and the shard tasks that drain it through
//! [`crate::remote_write`]'s client.
//!
//! - `sender`: the shard tasks: batching, retries, backoff, splitting refused requests.
//!
//! [`RemoteWriter`] is one endpoint; [`RemoteWriters`] fans the same samples out to every
//! configured endpoint. Endpoints are independent: each has its own blocks and tasks, so a
//! slow or dead one delays neither the producers nor the others.
//!
//! The delivery guarantee: a sample handed to [`RemoteWriter::enqueue`] inside a
//! transaction that commits is on disk; it leaves the queue only when the receiver
//! stored it (2xx), refused it for good (4xx other than 429), or the queue's byte bound
//! pushed it out — each of the last two counted in
//! `sonde_remote_write_samples_dropped_total`. Per series, samples are sent in order, and
//! a sample at or before the last timestamp queued for its series is dropped (see
//! `storage::queue` for how long that check remembers).
//!
//! It sits above both [`crate::storage`] (the queue) and [`crate::remote_write`] (the
//! wire format, the endpoint's settings, the HTTP exchange), which know nothing of it.

mod sender;

use crate::remote_write::{
    ProtobufMessage, RemoteWriteConfig, RemoteWriteError, client, validate_all,
};
use crate::series::{Sample, SampleSource};
use crate::storage::Store;
use crate::storage::queue;
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
    /// The message sent now: `protobuf_message`, or 1.0 after a fallback from 2.0.
    pub protobuf_message: &'static str,
    pub shards: usize,
}

/// The sender for one remote write endpoint: its durable queue in the aggregator's
/// database and the shard tasks that drain it.
pub struct RemoteWriter {
    shared: Arc<queue::Shared>,
    stop: watch::Sender<Option<Instant>>,
    /// Taken by `shutdown`; aborted on drop, so no task outlives its writer.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl RemoteWriter {
    /// Validates `cfg`, opens the endpoint's queue in `store` (what an earlier run left
    /// there is sent first) and starts its shard tasks (so it must be called inside a
    /// Tokio runtime). `external_labels` go on every series that does not carry the label
    /// itself.
    pub fn start(
        cfg: RemoteWriteConfig,
        external_labels: &Labels,
        store: Arc<Store>,
    ) -> Result<Self, RemoteWriteError> {
        cfg.validate()?;
        let name = cfg.name();
        let shards = cfg.queue_config.max_shards;
        let clients = (0..shards)
            .map(|_| client::Client::new(&cfg))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|problem| cfg.problem(problem))?;
        let shared = Arc::new(queue::Shared::open(
            name,
            cfg.url.clone(),
            external_labels
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            &cfg.queue_config,
            cfg.protobuf_message,
            store,
        )?);
        let (stop, stop_rx) = watch::channel(None);
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(shard, client)| {
                tokio::spawn(sender::run_shard(
                    shared.clone(),
                    shard,
                    client,
                    stop_rx.clone(),
                ))
            })
            .collect();
        Ok(Self {
            shared,
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// Inside the caller's transaction: applies the external labels, drops (and counts)
    /// samples at or before the last timestamp queued for their series, appends the rest
    /// to this endpoint's queue (one block per shard), and enforces `max_queue_bytes`
    /// (oldest dropped, counted). Never waits on the network. Call
    /// [`RemoteWriter::wake`] after the commit.
    pub fn enqueue<S: SampleSource + ?Sized>(
        &self,
        tx: &rusqlite::Transaction<'_>,
        samples: &S,
    ) -> rusqlite::Result<()> {
        self.shared.enqueue(tx, samples)
    }

    /// After the caller's commit: lets the shard tasks send what was queued.
    pub fn wake(&self) {
        self.shared.wake();
    }

    /// [`RemoteWriter::enqueue`] in a transaction of its own, then [`RemoteWriter::wake`];
    /// for producers outside a batch, and tests. A database error is logged (the samples
    /// are then lost).
    pub fn push(&self, samples: Vec<Sample>) {
        match self
            .shared
            .store_transaction(|tx| self.enqueue(tx, &samples))
        {
            Ok(()) => self.wake(),
            Err(e) => tracing::error!(
                remote_name = %self.shared.name,
                samples = samples.len(),
                error = %e,
                "cannot queue samples for remote write"
            ),
        }
    }

    /// Sends what is queued, without waiting for full batches, until the queue is empty
    /// or `deadline` has passed; then stops the tasks. What is not sent stays on disk for
    /// the next start. Takes `&self` so that a writer shared behind an `Arc` can be
    /// flushed too; samples queued afterwards are sent by the next start.
    pub async fn shutdown(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        self.stop.send_replace(Some(until));
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        // The tasks stop by themselves at the deadline; the margin only guards against
        // one stuck where nothing can interrupt it.
        let margin = until + Duration::from_secs(1);
        for mut task in tasks {
            if tokio::time::timeout_at(margin, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        let left = self.shared.snapshot().queued_samples;
        if left > 0 {
            tracing::info!(
                remote_name = %self.shared.name,
                url = %self.shared.url,
                samples = left,
                "remote write stopped with samples still queued; they stay on disk and are sent after the next start"
            );
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
            queued_samples: snap.queued_samples as usize,
            queued_bytes: snap.queued_bytes,
            max_queue_bytes: self.shared.max_queue_bytes(),
            sent_samples: snap.counters.sent,
            dropped_samples: snap.counters.dropped(),
            failing: snap.failing,
            last_error: snap.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_time: snap.last_error.as_ref().map(|(_, t)| *t),
            last_success: snap.last_success,
            protobuf_message: snap.message.as_str(),
            shards: self.shared.shard_count(),
        }
    }

    /// The configured `protobuf_message` (before any fallback).
    pub fn configured_message(&self) -> ProtobufMessage {
        self.shared.configured_message()
    }
}

impl Drop for RemoteWriter {
    fn drop(&mut self) {
        let tasks = std::mem::take(self.tasks.get_mut().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            task.abort();
        }
    }
}

/// Logs, once, every endpoint with samples queued on disk that `configs` no longer has.
/// Their blocks are kept, unsent and outside every bound, until an endpoint with the same
/// name is configured again. [`RemoteWriters::start`] calls it.
pub fn report_unconfigured_queues(
    store: &Store,
    configs: &[RemoteWriteConfig],
) -> Result<(), RemoteWriteError> {
    let names: Vec<String> = configs.iter().map(RemoteWriteConfig::name).collect();
    queue::report_unconfigured(store, &names)
}

/// Every configured endpoint, each fed the same samples.
pub struct RemoteWriters {
    writers: Vec<RemoteWriter>,
    store: Arc<Store>,
}

impl RemoteWriters {
    /// Validates all `configs` (including that their names differ), reports queues left
    /// by endpoints no longer configured, and starts one writer per endpoint.
    pub fn start(
        configs: &[RemoteWriteConfig],
        external_labels: &Labels,
        store: Arc<Store>,
    ) -> Result<Self, RemoteWriteError> {
        validate_all(configs)?;
        report_unconfigured_queues(&store, configs)?;
        let writers = configs
            .iter()
            .map(|cfg| RemoteWriter::start(cfg.clone(), external_labels, store.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { writers, store })
    }

    pub fn is_empty(&self) -> bool {
        self.writers.is_empty()
    }

    pub fn writers(&self) -> &[RemoteWriter] {
        &self.writers
    }

    /// Queues `samples` on every endpoint inside the caller's transaction.
    pub fn enqueue<S: SampleSource + ?Sized>(
        &self,
        tx: &rusqlite::Transaction<'_>,
        samples: &S,
    ) -> rusqlite::Result<()> {
        for writer in &self.writers {
            writer.enqueue(tx, samples)?;
        }
        Ok(())
    }

    /// After the caller's commit: wakes every endpoint.
    pub fn wake(&self) {
        for writer in &self.writers {
            writer.wake();
        }
    }

    /// Queues `samples` on every endpoint in one transaction; never waits on the network.
    pub fn push(&self, samples: Vec<Sample>) {
        match self.store.transaction(|tx| self.enqueue(tx, &samples)) {
            Ok(()) => self.wake(),
            Err(e) => tracing::error!(
                samples = samples.len(),
                error = %e,
                "cannot queue samples for remote write"
            ),
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
mod tests;
