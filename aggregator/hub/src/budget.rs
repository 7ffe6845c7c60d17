//! What the result of one assigned check may weigh, derived from its module: the
//! aggregator never refuses a result of a check it assigned for the agent's series
//! budget (DESIGN, "Trust model"), so each check brings its own budget, an upper bound of
//! what its prober can produce. An agent's series are then bounded by its checks ×
//! their budgets, plus `fleet.limits.max_series` / `max_series_bytes` for the local
//! jobs it declares itself.
//!
//! The bound must hold for every honest result: a prober that learns a new metric, a
//! new phase or labels with text from the target must raise it here.

use crate::limits::FleetLimits;
use sonde_proto::config::{Module, Prober};
use sonde_proto::help::PROBE_METRICS;

/// Samples one probe of one address produces at most: every probe metric once, and
/// room for the duration phases beyond the first (http has five, dns, grpc and icmp a
/// few) and for `probe_failure_info`.
const SAMPLES_PER_ADDRESS: usize = PROBE_METRICS.len() + 16;
/// The longest probe metric name, with room.
const NAME_BYTES: usize = 64;
/// The labels of a sample whose label values are sonde's own words (`phase`, `reason`,
/// `version`, `cipher`, `ip`, `serving_status`): far less than this.
const VOCABULARY_LABEL_BYTES: usize = 192;
/// What a trace within `sonde_proto::trace`'s bounds weighs at most (32 steps of a
/// few hundred bytes and a 32-hop path come to some 34 KiB).
pub const MAX_TRACE_WEIGHT: usize = 64 << 10;

/// What one result of a check may hold: samples, and the bytes of their names and
/// labels (job and instance not included: see [`CheckBudget::allows`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckBudget {
    pub samples: usize,
    pub bytes: usize,
}

impl CheckBudget {
    /// The budget of a check of `module`. Samples whose labels carry text from the
    /// target (`probe_ssl_last_chain_info`'s certificate names, `probe_expect_info`'s
    /// captures) are given the whole `max_sample_label_bytes`, the others what sonde's
    /// own label values need. Never more than a result may carry anyway
    /// (`max_samples_per_result` samples of at most `max_sample_label_bytes` each).
    pub fn of(module: &Module, limits: &FleetLimits) -> Self {
        let expect_steps = match module.prober {
            Prober::Tcp => module.tcp.query_response.len(),
            _ => 0,
        };
        // Each step of a multihttp check: success, duration and status, labelled with
        // the step's name (at most 64 bytes, within the vocabulary's room).
        let step_samples = match module.prober {
            Prober::Multihttp => 3 * module.multihttp.steps.len(),
            _ => 0,
        };
        let text_samples = 1 + expect_steps;
        let label_bytes = limits.max_sample_label_bytes.0 as usize;
        let per_address_samples = SAMPLES_PER_ADDRESS + expect_steps + step_samples;
        let per_address_bytes = per_address_samples * (NAME_BYTES + VOCABULARY_LABEL_BYTES)
            + text_samples * label_bytes;
        let (samples, bytes) = match &module.per_address {
            // Each address's samples, and the target's own summary of them.
            Some(p) => {
                let addresses = p.max_addresses as usize;
                (
                    addresses * per_address_samples + SAMPLES_PER_ADDRESS,
                    addresses * per_address_bytes
                        + SAMPLES_PER_ADDRESS * (NAME_BYTES + VOCABULARY_LABEL_BYTES),
                )
            }
            None => (per_address_samples, per_address_bytes),
        };
        let samples = samples.min(limits.max_samples_per_result);
        Self {
            samples,
            bytes: bytes.min(samples * (NAME_BYTES + label_bytes)),
        }
    }

    /// True when a result of `samples` samples weighing `bytes` (names, labels, `key_bytes`
    /// of job and instance on each sample, and its trace) fits.
    pub fn allows(&self, samples: usize, bytes: usize, key_bytes: usize) -> bool {
        samples <= self.samples && bytes <= self.weight(key_bytes)
    }

    /// The bytes a result may weigh when its job and instance take `key_bytes`.
    pub fn weight(&self, key_bytes: usize) -> usize {
        self.bytes + self.samples * key_bytes + MAX_TRACE_WEIGHT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(json: &str) -> Module {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn an_http_check_is_given_every_metric_and_a_certificate() {
        let limits = FleetLimits::default();
        let b = CheckBudget::of(&module(r#"{"prober":"http"}"#), &limits);
        assert_eq!(b.samples, PROBE_METRICS.len() + 16);
        assert_eq!(
            b.bytes,
            b.samples * (NAME_BYTES + VOCABULARY_LABEL_BYTES) + (4 << 10)
        );
        // Job and instance count on every sample, the trace once.
        assert_eq!(b.weight(100), b.bytes + b.samples * 100 + MAX_TRACE_WEIGHT);
        assert!(b.allows(b.samples, b.weight(100), 100));
        assert!(!b.allows(b.samples + 1, 0, 100));
        assert!(!b.allows(1, b.weight(100) + 1, 100));
    }

    #[test]
    fn query_response_steps_and_addresses_add_to_the_budget() {
        let limits = FleetLimits::default();
        let plain = CheckBudget::of(&module(r#"{"prober":"tcp"}"#), &limits);
        let dialogue = CheckBudget::of(
            &module(r#"{"prober":"tcp","tcp":{"query_response":[{"expect":"a"},{"send":"b"}]}}"#),
            &limits,
        );
        assert_eq!(dialogue.samples, plain.samples + 2);
        assert!(dialogue.bytes > plain.bytes + 2 * (4 << 10));
        let per_address = CheckBudget::of(
            &module(r#"{"prober":"tcp","per_address":{"max_addresses":2}}"#),
            &limits,
        );
        assert_eq!(per_address.samples, 3 * plain.samples);
    }

    #[test]
    fn multihttp_steps_add_their_series_to_the_budget() {
        let limits = FleetLimits::default();
        let http = CheckBudget::of(&module(r#"{"prober":"http"}"#), &limits);
        let steps = CheckBudget::of(
            &module(
                r#"{"prober":"multihttp","multihttp":{"steps":[{"name":"a","url":"{{target}}"},{"name":"b","url":"{{target}}"}]}}"#,
            ),
            &limits,
        );
        assert_eq!(steps.samples, http.samples + 6);
    }

    #[test]
    fn a_budget_is_never_more_than_a_result_may_carry() {
        let limits = FleetLimits {
            max_samples_per_result: 10,
            ..FleetLimits::default()
        };
        let b = CheckBudget::of(
            &module(r#"{"prober":"tcp","per_address":{"max_addresses":16}}"#),
            &limits,
        );
        assert_eq!(b.samples, 10);
        assert_eq!(b.bytes, 10 * (NAME_BYTES + (4 << 10)));
    }
}
