//! The queue's counters, its point-in-time view for the status page, and its
//! self-metrics' families.

use super::{Shared, lock};
use crate::remote_write::config::ProtobufMessage;
use sonde_proto::exposition::Family;
use std::time::SystemTime;

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
    /// Blocks of the queue's store that no longer decode (or name series missing from
    /// its dictionary): damage to the file, never the samples' fault.
    pub dropped_damaged: u64,
    pub dropped_too_large: u64,
    pub dropped_too_old: u64,
    pub fallbacks: u64,
}

impl Counters {
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped_http_4xx
            + self.dropped_queue_full
            + self.dropped_out_of_order
            + self.dropped_invalid_labels
            + self.dropped_damaged
            + self.dropped_too_large
            + self.dropped_too_old
    }
}

/// Self-metrics and the status page's view. In memory: they restart from zero with the
/// process (Prometheus counters may reset), except the queue size, read from the database.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) counters: Counters,
    pub(super) queued_samples: u64,
    pub(super) queued_bytes: u64,
    pub(crate) failing: bool,
    pub(crate) last_error: Option<(String, SystemTime)>,
    pub(crate) last_success: Option<SystemTime>,
    pub(super) warned_invalid: bool,
    pub(crate) warned_partial: bool,
}

/// A point-in-time view of the queue for the status page and metrics.
pub(crate) struct Snapshot {
    pub queued_samples: u64,
    pub queued_bytes: u64,
    pub counters: Counters,
    pub failing: bool,
    pub last_error: Option<(String, SystemTime)>,
    pub last_success: Option<SystemTime>,
    pub message: ProtobufMessage,
}

impl Shared {
    /// A request failed and will not be sent again as it was (its samples are settled
    /// otherwise).
    pub(crate) fn record_failed_request(&self, error: String) {
        let mut stats = lock(&self.stats);
        stats.counters.requests_failed += 1;
        stats.last_error = Some((error, SystemTime::now()));
    }

    /// A request of `samples` failed and is to be sent again; true when the endpoint was
    /// not failing before (the first failure of a run of them).
    pub(crate) fn record_retry(&self, error: String, samples: u64) -> bool {
        let mut stats = lock(&self.stats);
        stats.counters.retried += samples;
        stats.counters.requests_failed += 1;
        stats.last_error = Some((error, SystemTime::now()));
        !std::mem::replace(&mut stats.failing, true)
    }

    /// True the first time a receiver reports fewer samples written than sent.
    pub(crate) fn first_partial_write(&self) -> bool {
        !std::mem::replace(&mut lock(&self.stats).warned_partial, true)
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let stats = lock(&self.stats);
        Snapshot {
            queued_samples: stats.queued_samples,
            queued_bytes: stats.queued_bytes,
            counters: stats.counters,
            failing: stats.failing,
            last_error: stats.last_error.clone(),
            last_success: stats.last_success,
            message: self.message(),
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
        let with = |name: &str, value: &str| {
            let mut labels = id();
            labels.push((name.to_string(), value.to_string()));
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
                "Samples never to be sent: refused by the endpoint (http_4xx), pushed out of the full queue (queue_full), not newer than the last sample of their series (out_of_order), with labels no receiver accepts (invalid_labels), in a block of the queue's store that no longer decodes (damaged), in a request too large to encode (too_large), or older than queue_config.sample_age_limit when their turn came (too_old).",
            )
            .with(with("reason", "http_4xx"), c.dropped_http_4xx as f64)
            .with(with("reason", "queue_full"), c.dropped_queue_full as f64)
            .with(with("reason", "out_of_order"), c.dropped_out_of_order as f64)
            .with(with("reason", "invalid_labels"), c.dropped_invalid_labels as f64)
            .with(with("reason", "damaged"), c.dropped_damaged as f64)
            .with(with("reason", "too_large"), c.dropped_too_large as f64)
            .with(with("reason", "too_old"), c.dropped_too_old as f64),
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
            Family::counter(
                "sonde_remote_write_protocol_fallbacks_total",
                "Times the endpoint was found not to speak remote write 2.0 and sonde fell back to 1.0.",
            )
            .with(id(), c.fallbacks as f64),
            Family::gauge(
                "sonde_remote_write_queue_samples",
                "Samples waiting in the durable queue, including the requests in flight.",
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
            .with(id(), self.queue.max_queue_bytes.0 as f64),
            Family::gauge(
                "sonde_remote_write_shards",
                "Requests the endpoint may have in flight at once (queue_config.max_shards).",
            )
            .with(id(), self.shards.len() as f64),
            Family::gauge(
                "sonde_remote_write_protocol_info",
                "1 for the message the endpoint is sent now (protobuf_message, or 1.0 after a fallback).",
            )
            .with(with("protobuf_message", snap.message.as_str()), 1.0),
            Family::gauge(
                "sonde_remote_write_last_send_timestamp_seconds",
                "Unix time of the last request the endpoint accepted, 0 before the first.",
            )
            .with(id(), unix(snap.last_success)),
        ]
    }
}
