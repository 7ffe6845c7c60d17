//! Numbers each probe result and hands it to the store for the aggregators that should
//! receive it.

use crate::buffer::Buffer;
use crate::metrics::AgentMetrics;
use crate::probe::ProbeOutcome;
use crate::record::ProbeRecord;
use crate::schedule::Source;
use crate::store::{Route, Store};
use std::sync::Arc;

pub struct Outbox {
    store: Arc<Store>,
    /// One buffer per configured aggregator, in config order.
    pub buffers: Vec<(String, Arc<Buffer>)>,
    pub metrics: Arc<AgentMetrics>,
}

impl Outbox {
    /// The store numbers results: above every number this agent used before, because
    /// an aggregator takes a number it has already committed for a replay.
    pub fn new(store: Arc<Store>, metrics: Arc<AgentMetrics>) -> Self {
        Self {
            buffers: store.buffers(),
            store,
            metrics,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Where results from `source` go; `None` when no aggregator would take them.
    fn route(&self, source: Source) -> Option<Route> {
        match source {
            _ if self.buffers.is_empty() => None,
            Source::Aggregator(i) if i < self.buffers.len() => Some(Route::One(i)),
            // An aggregator index from another config; nobody would ack it.
            Source::Aggregator(_) => None,
            Source::Local => Some(Route::All),
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
        let Some(route) = self.route(source) else {
            return;
        };
        self.store.append(route, |seq| ProbeRecord {
            seq,
            job: job.to_string(),
            instance: instance.to_string(),
            timestamp_ms,
            success: outcome.success,
            duration_seconds: outcome.duration.as_secs_f64(),
            samples: outcome.samples,
            generation,
            failure: outcome.failure,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_results_go_everywhere_and_assigned_ones_go_back() {
        let dir = std::env::temp_dir().join(format!("sonde-outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let aggregators = ["http://a:9451".to_string(), "http://b:9451".to_string()];
        let store = Store::open(Some(&dir), &aggregators, 1 << 20).unwrap();
        let outbox = Outbox::new(store.clone(), Arc::new(AgentMetrics::default()));
        assert_eq!(outbox.route(Source::Aggregator(7)), None);
        for (source, job, generation) in [
            (Source::Local, "local", 0),
            (Source::Aggregator(1), "assigned", 4),
        ] {
            let route = outbox.route(source).unwrap();
            store.append(route, |seq| ProbeRecord {
                seq,
                job: job.into(),
                instance: "t:1".into(),
                timestamp_ms: 1,
                success: true,
                duration_seconds: 0.1,
                samples: Vec::new(),
                generation,
                failure: None,
            });
        }
        store.flush();
        let jobs = |i: usize| {
            outbox.buffers[i]
                .1
                .pending_after(0, 10)
                .iter()
                .map(|r| (r.job.clone(), r.generation))
                .collect::<Vec<_>>()
        };
        assert_eq!(jobs(0), [("local".to_string(), 0)]);
        assert_eq!(
            jobs(1),
            [("local".to_string(), 0), ("assigned".to_string(), 4)]
        );

        let alone = Store::open(None, &[], 1 << 20).unwrap();
        let outbox = Outbox::new(alone, Arc::new(AgentMetrics::default()));
        assert_eq!(
            outbox.route(Source::Local),
            None,
            "no aggregator, nothing kept"
        );
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
