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

    /// Where a result for `to` goes, and the generation it carries; `None` when no
    /// aggregator would take it. A local job's results go to every aggregator; an
    /// assigned check's go to each aggregator that assigned it, each with the generation
    /// of its own assignment.
    fn route(&self, to: &[(Source, u64)]) -> Option<(Route, u64)> {
        if self.buffers.is_empty() {
            return None;
        }
        if to.iter().any(|(source, _)| *source == Source::Local) {
            return Some((Route::All, 0));
        }
        let mut slots: Vec<(usize, u64)> = to
            .iter()
            .filter_map(|&(source, generation)| match source {
                // An aggregator index from another config is dropped: nobody would ack it.
                Source::Aggregator(i) if i < self.buffers.len() => Some((i, generation)),
                _ => None,
            })
            .collect();
        slots.sort_unstable();
        slots.dedup_by_key(|(i, _)| *i);
        let &(first, generation) = slots.first()?;
        if slots.len() == 1 {
            Some((Route::One(first), generation))
        } else {
            Some((Route::Each(slots.into()), generation))
        }
    }

    /// Records one probe run: counts it once, and keeps its result, numbered once, for
    /// each aggregator of `to` (see `Outbox::route`).
    pub fn record(
        &self,
        to: &[(Source, u64)],
        job: &str,
        instance: &str,
        timestamp_ms: i64,
        outcome: ProbeOutcome,
    ) {
        self.metrics.probe_ran(job, instance, outcome.success);
        let Some((route, generation)) = self.route(to) else {
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
    use crate::probe::{ProbeOutcome, Sample};
    use std::time::Duration;

    fn outcome() -> ProbeOutcome {
        ProbeOutcome {
            success: true,
            duration: Duration::from_millis(100),
            samples: vec![Sample {
                name: "probe_http_status_code",
                labels: Vec::new(),
                value: 200.0,
            }],
            failure: None,
            failure_reason: None,
        }
    }

    #[test]
    fn each_result_goes_to_the_aggregators_that_want_it() {
        let dir = std::env::temp_dir().join(format!("sonde-outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let aggregators = ["http://a:9451", "http://b:9451", "http://c:9451"].map(String::from);
        let store = Store::open(Some(&dir), &aggregators, 1 << 20).unwrap();
        let metrics = Arc::new(AgentMetrics::default());
        let outbox = Outbox::new(store.clone(), metrics.clone());
        let (local, a, b, c) = (
            Source::Local,
            Source::Aggregator(0),
            Source::Aggregator(1),
            Source::Aggregator(2),
        );
        assert_eq!(outbox.route(&[(Source::Aggregator(7), 1)]), None);
        outbox.record(&[(local, 0)], "local", "t:1", 1, outcome());
        outbox.record(&[(b, 4)], "assigned", "t:1", 2, outcome());
        // One check two aggregators assigned, each under its own generation.
        outbox.record(&[(a, 3), (c, 9)], "shared", "t:1", 3, outcome());
        // An index from another config is left out, the rest still get it.
        outbox.record(
            &[(b, 4), (Source::Aggregator(7), 1)],
            "shared",
            "t:2",
            4,
            outcome(),
        );
        store.flush();
        let got = |i: usize| {
            outbox.buffers[i]
                .1
                .pending_after(0, 10)
                .iter()
                .map(|r| (r.seq, r.job.clone(), r.timestamp_ms, r.generation))
                .collect::<Vec<_>>()
        };
        let (a, b, c) = (got(0), got(1), got(2));
        let jobs = |v: &[(u64, String, i64, u64)]| {
            v.iter().map(|r| (r.1.clone(), r.3)).collect::<Vec<_>>()
        };
        let owned = |v: &[(&str, u64)]| {
            v.iter()
                .map(|(j, g)| (j.to_string(), *g))
                .collect::<Vec<_>>()
        };
        assert_eq!(jobs(&a), owned(&[("local", 0), ("shared", 3)]));
        assert_eq!(
            jobs(&b),
            owned(&[("local", 0), ("assigned", 4), ("shared", 4)])
        );
        assert_eq!(jobs(&c), owned(&[("local", 0), ("shared", 9)]));
        // The shared result is one result: same number and timestamp for both.
        assert_eq!((a[1].0, a[1].2), (c[1].0, c[1].2));
        assert_eq!(a[0].0, b[0].0);
        let samples = |i: usize| outbox.buffers[i].1.pending_after(0, 10)[1].samples.clone();
        assert_eq!(samples(0), samples(2));
        // Counted once per run, whoever it went to.
        let counts = store.probe_counts();
        let total: u64 = counts.iter().map(|(_, (t, _))| t).sum();
        assert_eq!(total, 4);
        drop((outbox, store));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_aggregator_nothing_kept() {
        let alone = Store::open(None, &[], 1 << 20).unwrap();
        let outbox = Outbox::new(alone, Arc::new(AgentMetrics::default()));
        assert_eq!(outbox.route(&[(Source::Local, 0)]), None);
    }
}
