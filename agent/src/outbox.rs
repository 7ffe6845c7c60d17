//! Numbers each probe result and hands it to the buffers of the aggregators that should
//! receive it.

use crate::buffer::Buffer;
use crate::metrics::AgentMetrics;
use crate::probe::ProbeOutcome;
use crate::record::ProbeRecord;
use crate::schedule::Source;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Outbox {
    next_seq: AtomicU64,
    /// One buffer per configured aggregator, in config order.
    pub buffers: Vec<(String, Arc<Buffer>)>,
    pub metrics: Arc<AgentMetrics>,
}

impl Outbox {
    /// `first_seq` must be above every sequence number this agent ever used, so that an
    /// aggregator never takes a new result for a replay.
    pub fn new(
        first_seq: u64,
        buffers: Vec<(String, Arc<Buffer>)>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Self {
            next_seq: AtomicU64::new(first_seq.max(1)),
            buffers,
            metrics,
        }
    }

    /// Records one probe result: results of an assigned check go back to the aggregator
    /// that assigned it; results of a local job go to every aggregator.
    pub fn record(
        &self,
        source: Source,
        job: &str,
        instance: &str,
        generation: u64,
        timestamp_ms: i64,
        outcome: ProbeOutcome,
    ) {
        self.metrics.probe_ran(job, instance, outcome.success);
        if self.buffers.is_empty() {
            return;
        }
        let record = Arc::new(ProbeRecord {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            job: job.to_string(),
            instance: instance.to_string(),
            timestamp_ms,
            success: outcome.success,
            duration_seconds: outcome.duration.as_secs_f64(),
            samples: outcome.samples,
            generation,
            failure: outcome.failure,
        });
        match source {
            Source::Aggregator(i) => {
                if let Some((_, buffer)) = self.buffers.get(i) {
                    buffer.push(record);
                }
            }
            Source::Local => {
                for (_, buffer) in &self.buffers {
                    buffer.push(record.clone());
                }
            }
        }
    }
}
