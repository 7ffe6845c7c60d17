//! The agent's self-metrics, served on its `/metrics`.

use sonde_proto::exposition::Family;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The upper bounds of `sonde_agent_probes_started_total{le}`, in seconds: how late after
/// its slot a probe started.
pub const START_DELAY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// Why a probe started late (see [`crate::schedule::LATE_AFTER`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Late {
    /// It waited for a place under the bound on probes in flight.
    ConcurrencyLimit,
    /// Its probing thread was busy (or the machine was).
    Busy,
}

impl Late {
    pub fn as_str(self) -> &'static str {
        match self {
            Late::ConcurrencyLimit => "concurrency_limit",
            Late::Busy => "busy",
        }
    }
}

/// Why a probe slot was skipped rather than run (see [`crate::schedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The check's previous probe, with its wait for a place, still ran.
    Overrun,
    /// The slot was more than one interval past when the check could start it (the
    /// process was stopped or starved, or catching up after that took too long): the
    /// check's next slot had come, so the probe would only have been a stale copy of it.
    Late,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Overrun => "overrun",
            Skip::Late => "late",
        }
    }
}

#[derive(Default)]
pub struct AgentMetrics {
    /// Probes run per (job, instance): anyone can compare it with what reached the
    /// receiver to check that every result arrived. Each check holds its own counts, so
    /// a probe costs two atomic additions, not a lookup.
    probes: Mutex<BTreeMap<(String, String), Arc<ProbeCounts>>>,
    /// Probes started, by how late after their slot: one count per bucket of
    /// [`START_DELAY_BUCKETS`] and the last for the rest (not cumulative here).
    started: [AtomicU64; START_DELAY_BUCKETS.len() + 1],
    /// Probes that started late, by [`Late`] (in its order).
    late: [AtomicU64; 2],
    /// Slots skipped, by [`Skip`] (in its order).
    skipped: [AtomicU64; 2],
    /// The bound on probes in flight.
    probe_limit: AtomicUsize,
    /// CPU time of the sampled probes' own work, in nanoseconds, and how many.
    probe_cpu_nanos: AtomicU64,
    probe_cpu_probes: AtomicU64,
    probe_cpu_ticket: AtomicU64,
    pub uplinks: Mutex<BTreeMap<String, UplinkCounts>>,
    /// Assigned checks refused, by reason ([`crate::assigned::Refusal`]).
    assignment_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Label values (and other symbols) cut to the aggregator's symbol size limit.
    pub symbols_truncated: AtomicU64,
    /// Results too large for any message the aggregator accepts, dropped unsent.
    pub results_oversized: AtomicU64,
}

/// One target's probe counts.
#[derive(Default, Debug)]
pub struct ProbeCounts {
    total: AtomicU64,
    failed: AtomicU64,
}

impl ProbeCounts {
    pub fn ran(&self, success: bool) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if !success {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
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
    pub fn restore_probe_counts(&self, counts: Vec<crate::buffer::ProbeCount>) {
        for ((job, instance), (total, failed)) in counts {
            let c = self.probe_counts(&job, &instance);
            c.total.fetch_add(total, Ordering::Relaxed);
            c.failed.fetch_add(failed, Ordering::Relaxed);
        }
    }

    /// The counts of one target, for its check to keep.
    pub fn probe_counts(&self, job: &str, instance: &str) -> Arc<ProbeCounts> {
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        probes
            .entry((job.to_string(), instance.to_string()))
            .or_default()
            .clone()
    }

    /// A probe started `delay` after its slot; `late` says why when that is past
    /// [`crate::schedule::LATE_AFTER`].
    pub fn probe_started(&self, delay: Duration, late: Option<Late>) {
        let seconds = delay.as_secs_f64();
        let bucket = START_DELAY_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(START_DELAY_BUCKETS.len());
        self.started[bucket].fetch_add(1, Ordering::Relaxed);
        if let Some(late) = late {
            self.late[late as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn probes_skipped(&self, why: Skip, slots: u64) {
        self.skipped[why as usize].fetch_add(slots, Ordering::Relaxed);
    }

    pub fn set_probe_limit(&self, limit: usize) {
        self.probe_limit.store(limit, Ordering::Relaxed);
    }

    /// Whether to time the next probe's CPU: one in `every`.
    pub fn sample_probe_cpu(&self, every: u64) -> bool {
        self.probe_cpu_ticket
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(every)
    }

    /// A sampled probe's own CPU time.
    pub fn probe_cpu(&self, spent: Duration) {
        self.probe_cpu_nanos
            .fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
        self.probe_cpu_probes.fetch_add(1, Ordering::Relaxed);
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
            probes_total.push(labels, c.total.load(Ordering::Relaxed) as f64);
            probe_failures.push(labels, c.failed.load(Ordering::Relaxed) as f64);
        }
        let mut started = Family::counter(
            "sonde_agent_probes_started_total",
            "Probes started, cumulative by how late after their slot they started (le, in seconds), as a histogram's buckets: histogram_quantile() gives the start delay's quantiles.",
        );
        let mut cumulative = 0;
        for (i, count) in self.started.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let le = START_DELAY_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            started.push([("le", le)], cumulative as f64);
        }
        let mut late = Family::counter(
            "sonde_agent_probes_late_total",
            "Probes that started more than 50 ms after their slot, by reason: concurrency_limit (it waited for a place under the bound on probes in flight), busy (the probing thread or the machine was busy).",
        );
        for reason in [Late::ConcurrencyLimit, Late::Busy] {
            late.push(
                [("reason", reason.as_str())],
                self.late[reason as usize].load(Ordering::Relaxed) as f64,
            );
        }
        let mut skipped = Family::counter(
            "sonde_agent_probes_skipped_total",
            "Probe slots skipped, by reason: overrun (the check's previous probe, with its wait for a place, still ran), late (the slot was more than one interval past when the check could start it, as after the process was stopped: its next slot had come).",
        );
        for why in [Skip::Overrun, Skip::Late] {
            skipped.push(
                [("reason", why.as_str())],
                self.skipped[why as usize].load(Ordering::Relaxed) as f64,
            );
        }
        let mut limit = Family::gauge(
            "sonde_agent_probes_max_in_flight",
            "The bound on probes in flight at once (from the open-file limit).",
        );
        limit.push(
            Vec::<(String, String)>::new(),
            self.probe_limit.load(Ordering::Relaxed) as f64,
        );
        let mut cpu = Family::counter(
            "sonde_agent_probe_cpu_seconds_total",
            "CPU time of the probing work alone (the probers' own code and system calls, timed on the probing thread's clock), over a sample of one probe in 8.",
        );
        cpu.push(
            Vec::<(String, String)>::new(),
            self.probe_cpu_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        );
        let mut cpu_probes = Family::counter(
            "sonde_agent_probe_cpu_probes_total",
            "Probes whose CPU time sonde_agent_probe_cpu_seconds_total holds.",
        );
        cpu_probes.push(
            Vec::<(String, String)>::new(),
            self.probe_cpu_probes.load(Ordering::Relaxed) as f64,
        );
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
            started,
            late,
            skipped,
            limit,
            cpu,
            cpu_probes,
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
