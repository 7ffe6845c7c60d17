//! The agent's self-metrics, served on its `/metrics`.

use sonde_proto::exposition::Family;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct AgentMetrics {
    /// Probes run per (job, instance): anyone can compare it with what reached the
    /// receiver to check that every result arrived.
    probes: Mutex<BTreeMap<(String, String), ProbeCounts>>,
    pub uplinks: Mutex<BTreeMap<String, UplinkCounts>>,
    /// Assigned checks refused, by reason ([`crate::assigned::Refusal`]).
    assignment_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Label values (and other symbols) cut to the aggregator's symbol size limit.
    pub symbols_truncated: AtomicU64,
    /// Results too large for any message the aggregator accepts, dropped unsent.
    pub results_oversized: AtomicU64,
}

#[derive(Clone, Copy, Default)]
struct ProbeCounts {
    total: u64,
    failed: u64,
}

/// Per aggregator address.
#[derive(Clone, Default, Debug)]
pub struct UplinkCounts {
    pub connected: bool,
    pub connects: u64,
    pub disconnects: u64,
    pub results_sent: u64,
    pub results_acked: u64,
    pub generation: u64,
    pub last_error: Option<String>,
}

impl AgentMetrics {
    /// Continues the counts a previous run of this agent stored, so that
    /// `sonde_agent_probes_total` counts every result kept, across restarts.
    pub fn restore_probe_counts(&self, counts: Vec<crate::store::ProbeCount>) {
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        for (key, (total, failed)) in counts {
            let c = probes.entry(key).or_default();
            c.total += total;
            c.failed += failed;
        }
    }

    pub fn probe_ran(&self, job: &str, instance: &str, success: bool) {
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        let counts = probes
            .entry((job.to_string(), instance.to_string()))
            .or_default();
        counts.total += 1;
        counts.failed += u64::from(!success);
    }

    pub fn assignment_refused(&self, reason: crate::assigned::Refusal, checks: u64) {
        *self
            .assignment_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason.as_str())
            .or_default() += checks;
    }

    pub fn uplink<R>(&self, address: &str, f: impl FnOnce(&mut UplinkCounts) -> R) -> R {
        let mut uplinks = self.uplinks.lock().unwrap_or_else(|e| e.into_inner());
        f(uplinks.entry(address.to_string()).or_default())
    }

    /// Every family, with the buffer figures passed in by the owner of the buffers.
    pub fn families(
        &self,
        buffers: &[(String, crate::buffer::BufferStats)],
        buffer_write_errors: u64,
        checks: usize,
    ) -> Vec<Family> {
        let mut probes_total = Family::counter(
            "sonde_agent_probes_total",
            "Probes this agent has run, per job and target.",
        );
        let mut probe_failures = Family::counter(
            "sonde_agent_probe_failures_total",
            "Probes of this agent that failed, per job and target.",
        );
        for ((job, instance), c) in self.probes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let labels = [("job", job.as_str()), ("instance", instance.as_str())];
            probes_total.push(labels, c.total as f64);
            probe_failures.push(labels, c.failed as f64);
        }
        let mut checks_f = Family::gauge("sonde_agent_checks", "Checks this agent is running.");
        checks_f.push(Vec::<(String, String)>::new(), checks as f64);

        let mut connected = Family::gauge(
            "sonde_agent_stream_connected",
            "1 while the stream to this aggregator is open.",
        );
        let mut reconnects = Family::counter(
            "sonde_agent_stream_reconnects_total",
            "Times the stream to this aggregator was opened again after the first time.",
        );
        let mut sent = Family::counter(
            "sonde_agent_results_sent_total",
            "Results sent to this aggregator (replays included).",
        );
        let mut acked = Family::counter(
            "sonde_agent_results_acked_total",
            "Results this aggregator acknowledged as committed.",
        );
        let mut generation = Family::gauge(
            "sonde_agent_assignment_generation",
            "Generation of the last assignment received from this aggregator.",
        );
        for (address, u) in self
            .uplinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let l = [("aggregator", address.as_str())];
            connected.push(l, f64::from(u8::from(u.connected)));
            reconnects.push(l, u.connects.saturating_sub(1) as f64);
            sent.push(l, u.results_sent as f64);
            acked.push(l, u.results_acked as f64);
            generation.push(l, u.generation as f64);
        }
        let mut buffered = Family::gauge(
            "sonde_agent_buffer_results",
            "Results waiting for this aggregator's ack.",
        );
        let mut buffered_bytes = Family::gauge(
            "sonde_agent_buffer_bytes",
            "Bytes the results waiting for this aggregator's ack take in the on-disk buffer (approximate).",
        );
        let mut dropped = Family::counter(
            "sonde_agent_buffer_dropped_total",
            "Results dropped unsent because the buffer was full (oldest first) or could not be written.",
        );
        for (address, s) in buffers {
            let l = [("aggregator", address.as_str())];
            buffered.push(l, s.results as f64);
            buffered_bytes.push(l, s.bytes as f64);
            dropped.push(l, s.dropped as f64);
        }
        let mut write_errors = Family::counter(
            "sonde_agent_buffer_write_errors_total",
            "Buffer transactions that failed (disk full, I/O error); their results are counted as dropped.",
        );
        write_errors.push(Vec::<(String, String)>::new(), buffer_write_errors as f64);
        let mut assignment_errors = Family::counter(
            "sonde_agent_assignment_errors_total",
            "Checks of an assignment this agent refused, by reason: bad_module (a module it cannot read), file_not_allowed (a file outside assigned_modules.allowed_file_paths), bad_timing (interval, timeout or retries out of range).",
        );
        {
            let errors = self
                .assignment_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for reason in [
                crate::assigned::Refusal::BadModule,
                crate::assigned::Refusal::FileNotAllowed,
                crate::assigned::Refusal::BadTiming,
            ] {
                let n = errors.get(reason.as_str()).copied().unwrap_or(0);
                assignment_errors.push([("reason", reason.as_str())], n as f64);
            }
        }
        let mut truncated = Family::counter(
            "sonde_agent_symbols_truncated_total",
            "Label values cut to the 16 KiB an aggregator accepts in one symbol.",
        );
        truncated.push(
            Vec::<(String, String)>::new(),
            self.symbols_truncated.load(Ordering::Relaxed) as f64,
        );
        let mut oversized = Family::counter(
            "sonde_agent_results_oversized_total",
            "Results dropped unsent because they alone exceed the message or symbol-table size an aggregator accepts.",
        );
        oversized.push(
            Vec::<(String, String)>::new(),
            self.results_oversized.load(Ordering::Relaxed) as f64,
        );
        vec![
            probes_total,
            probe_failures,
            checks_f,
            connected,
            reconnects,
            sent,
            acked,
            generation,
            buffered,
            buffered_bytes,
            dropped,
            write_errors,
            assignment_errors,
            truncated,
            oversized,
        ]
    }
}
