//! What the aggregator refuses from agents and from anonymous peers: counted per agent
//! and reason for `sonde_results_refused_total`, and logged at a bounded rate, so that
//! a hostile agent can neither hide its refusals nor fill the log with them.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a result, a sample or a batch was refused: the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// A `(job, instance)` that is neither assigned to the agent nor one of its local jobs.
    Unassigned,
    /// Stamped later than now + `fleet.max_clock_skew`, or before 1970.
    FutureTimestamp,
    /// A sequence number at or past 2^63.
    BadSequence,
    /// A metric name the probers cannot produce.
    UnknownMetric,
    /// A label name the aggregator sets itself (`job`, `instance`, `agent`, target and
    /// external label names, `__*`), or not a valid label name.
    ReservedLabel,
    /// The same label name twice on one sample.
    DuplicateLabel,
    /// A string longer than `fleet.limits.max_symbol_bytes`.
    SymbolTooLong,
    /// More samples in one result than `fleet.limits.max_samples_per_result`.
    TooManySamples,
    /// More labels on one sample than `fleet.limits.max_labels_per_sample`.
    TooManyLabels,
    /// More samples or bytes than an assigned check's module can produce, or more live
    /// series than `fleet.limits.max_series` / `max_series_bytes` in local jobs.
    SeriesLimit,
    /// More local jobs or local targets than the limits allow.
    LocalLimit,
    /// A local job's instance longer than `fleet.limits.max_instance_bytes`.
    InstanceTooLong,
    /// A result's trace over its bounds or not well-formed: the trace is dropped, the
    /// result kept.
    BadTrace,
    /// A batch broke the protocol (unknown symbol, more results than allowed, ...): the
    /// stream was ended.
    Malformed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unassigned => "unassigned",
            Reason::FutureTimestamp => "future_timestamp",
            Reason::BadSequence => "bad_sequence",
            Reason::UnknownMetric => "unknown_metric",
            Reason::ReservedLabel => "reserved_label",
            Reason::DuplicateLabel => "duplicate_label",
            Reason::SymbolTooLong => "symbol_too_long",
            Reason::TooManySamples => "too_many_samples",
            Reason::TooManyLabels => "too_many_labels",
            Reason::SeriesLimit => "series_limit",
            Reason::LocalLimit => "local_limit",
            Reason::InstanceTooLong => "instance_too_long",
            Reason::BadTrace => "bad_trace",
            Reason::Malformed => "malformed",
        }
    }
}

/// One log line per key per period at most; what was held back is counted in the next.
pub struct LogLimiter<K> {
    period: Duration,
    capacity: usize,
    last: Mutex<HashMap<K, (Instant, u64)>>,
}

impl<K: Eq + Hash + Clone> LogLimiter<K> {
    /// Remembers at most `capacity` keys (a flood of new keys resets the memory rather
    /// than growing it).
    pub fn new(period: Duration, capacity: usize) -> Self {
        Self {
            period,
            capacity,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed since the last line)` when a line may be logged for `key` now.
    pub fn allow(&self, key: &K, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, suppressed)) = last.get_mut(key) {
            if now.duration_since(*at) < self.period {
                *suppressed += 1;
                return None;
            }
            let held = *suppressed;
            *at = now;
            *suppressed = 0;
            return Some(held);
        }
        if last.len() >= self.capacity {
            last.retain(|_, (at, _)| now.duration_since(*at) < self.period);
            if last.len() >= self.capacity {
                last.clear();
            }
        }
        last.insert(key.clone(), (now, 0));
        Some(0)
    }
}

/// A string from an untrusted peer, made safe to log: escaped, at most 64 characters.
pub fn loggable(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    let total = s.chars().count();
    if total > MAX {
        out.push_str(&format!("…(+{} chars)", total - MAX));
    }
    out
}

/// Refused results and samples per agent and reason, and refused connections.
pub struct Refusals {
    counts: Mutex<BTreeMap<(String, Reason), u64>>,
    by_agent: LogLimiter<String>,
    by_peer: LogLimiter<IpAddr>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            counts: Mutex::new(BTreeMap::new()),
            by_agent: LogLimiter::new(Duration::from_secs(10), 4096),
            by_peer: LogLimiter::new(Duration::from_secs(10), 4096),
        }
    }
}

impl Refusals {
    /// Counts `n` refusals of `agent`'s data for `reason`, and logs `detail` unless
    /// this agent was logged about within the last 10 seconds.
    pub fn refuse(&self, agent: &str, reason: Reason, n: u64, detail: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((agent.to_string(), reason))
            .or_insert(0) += n;
        if let Some(suppressed) = self.by_agent.allow(&agent.to_string(), Instant::now()) {
            tracing::warn!(
                agent = %loggable(agent),
                reason = reason.as_str(),
                count = n,
                suppressed,
                "refused from an agent: {}",
                detail()
            );
        }
    }

    /// Logs a refused connection from `peer`, at most once per 10 s per address.
    pub fn refuse_connection(&self, peer: Option<IpAddr>, agent: Option<&str>, why: &str) {
        let key = peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Some(suppressed) = self.by_peer.allow(&key, Instant::now()) {
            tracing::warn!(
                peer = %key,
                agent = %agent.map(loggable).unwrap_or_default(),
                suppressed,
                "agent refused: {}",
                loggable(why)
            );
        }
    }

    /// `sonde_results_refused_total`, per (agent, reason).
    pub fn counts(&self) -> Vec<(String, &'static str, u64)> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((agent, reason), n)| (agent.clone(), reason.as_str(), *n))
            .collect()
    }

    /// Drops the counters of an agent the aggregator forgot.
    pub fn forget(&self, agent: &str) {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(a, _), _| a != agent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_lets_one_line_through_per_period() {
        let limiter = LogLimiter::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        assert_eq!(limiter.allow(&1, t0), Some(0));
        assert_eq!(limiter.allow(&1, t0 + Duration::from_secs(1)), None);
        assert_eq!(limiter.allow(&1, t0 + Duration::from_secs(2)), None);
        assert_eq!(limiter.allow(&1, t0 + Duration::from_secs(11)), Some(2));
        // A flood of keys does not grow the memory past its capacity.
        for k in 2..100 {
            limiter.allow(&k, t0 + Duration::from_secs(12));
        }
        assert!(limiter.last.lock().unwrap().len() <= 2);
    }

    #[test]
    fn loggable_escapes_and_truncates() {
        assert_eq!(loggable("edge-1"), "edge-1");
        assert_eq!(loggable("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        let long = "x".repeat(1_000_000);
        let shown = loggable(&long);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("…(+999936 chars)"));
    }
}
