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

/// A string from an untrusted peer, made safe to show: at most 64 characters (cut at a
/// character boundary, the rest counted), its control characters escaped so that it
/// cannot break a line or a terminal. Quotes and backslashes are left alone: the log's
/// logfmt or JSON layer escapes what it must, once.
pub fn loggable(s: &str) -> String {
    const MAX: usize = 64;
    let mut out = String::new();
    for c in s.chars().take(MAX) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    let total = s.chars().count();
    if total > MAX {
        out.push_str(&format!("…(+{} chars)", total - MAX));
    }
    out
}

/// `reason` whole when it fits in `max` characters; past that, cut at a character
/// boundary with the rest counted. Reasons are the aggregator's own sentences (with
/// what they quote of a peer already bounded by [`loggable`]), so the cut is a guard,
/// not a habit.
fn whole_reason(reason: &str, max: usize) -> String {
    match reason.char_indices().nth(max) {
        None => reason.to_string(),
        Some((end, _)) => format!(
            "{}…(+{} chars)",
            &reason[..end],
            reason[end..].chars().count()
        ),
    }
}

/// How many refused-connection lines pass per [`CONNECTION_LOG_PERIOD`]: one per
/// address, [`PREFIX_LINES`] per network prefix (/24, /64) and [`GLOBAL_LINES`] in all,
/// so a refused peer spread over many addresses writes no more than one on a single
/// address would, times a constant.
const CONNECTION_LOG_PERIOD: Duration = Duration::from_secs(10);
const PREFIX_LINES: u32 = 2;
const GLOBAL_LINES: u32 = 10;
/// Addresses and prefixes remembered; a flood of new ones resets the memory rather than
/// growing it (the global limit still holds).
const CONNECTION_LOG_MEMORY: usize = 4096;

/// The network an address belongs to for the log limit: its /24 (IPv4) or /64 (IPv6).
fn prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => prefix(IpAddr::V4(v4)),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// The limits on refused-connection lines (see [`CONNECTION_LOG_PERIOD`]); what is held
/// back is counted in the next line that passes.
struct ConnectionLogLimit {
    state: Mutex<ConnectionLogState>,
}

struct ConnectionLogState {
    by_address: HashMap<IpAddr, Instant>,
    /// Per prefix: when its window started, and the lines it let through since.
    by_prefix: HashMap<IpAddr, (Instant, u32)>,
    global: (Instant, u32),
    suppressed: u64,
}

impl ConnectionLogLimit {
    fn new(now: Instant) -> Self {
        Self {
            state: Mutex::new(ConnectionLogState {
                by_address: HashMap::new(),
                by_prefix: HashMap::new(),
                global: (now, 0),
                suppressed: 0,
            }),
        }
    }

    /// `Some(lines held back since the last one)` when a line about `peer` may be
    /// logged now.
    fn allow(&self, peer: IpAddr, now: Instant) -> Option<u64> {
        let period = CONNECTION_LOG_PERIOD;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = |at: Instant| now.duration_since(at) >= period;
        if expired(s.global.0) {
            s.global = (now, 0);
        }
        let net = prefix(peer);
        let address_quiet = s.by_address.get(&peer).is_none_or(|at| expired(*at));
        let prefix_lines = match s.by_prefix.get(&net) {
            Some((start, lines)) if !expired(*start) => *lines,
            _ => 0,
        };
        if s.global.1 >= GLOBAL_LINES || !address_quiet || prefix_lines >= PREFIX_LINES {
            s.suppressed += 1;
            return None;
        }
        if s.by_address.len() >= CONNECTION_LOG_MEMORY {
            s.by_address.retain(|_, at| !expired(*at));
            if s.by_address.len() >= CONNECTION_LOG_MEMORY {
                s.by_address.clear();
            }
        }
        if s.by_prefix.len() >= CONNECTION_LOG_MEMORY {
            s.by_prefix.retain(|_, (start, _)| !expired(*start));
            if s.by_prefix.len() >= CONNECTION_LOG_MEMORY {
                s.by_prefix.clear();
            }
        }
        s.global.1 += 1;
        s.by_address.insert(peer, now);
        let window = s.by_prefix.entry(net).or_insert((now, 0));
        if expired(window.0) {
            *window = (now, 0);
        }
        window.1 += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

/// Refused results and samples per agent and reason, and refused connections.
pub struct Refusals {
    counts: Mutex<BTreeMap<(String, Reason), u64>>,
    by_agent: LogLimiter<String>,
    connections: ConnectionLogLimit,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            counts: Mutex::new(BTreeMap::new()),
            by_agent: LogLimiter::new(Duration::from_secs(10), 4096),
            connections: ConnectionLogLimit::new(Instant::now()),
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

    /// Logs a refused connection from `peer`, at most one line per address, two per
    /// network (/24, /64) and ten in all per 10 s: the reason first and whole, then who;
    /// `suppressed` counts the refused connections not logged since the previous line.
    pub fn refuse_connection(&self, peer: Option<IpAddr>, agent: Option<&str>, why: &str) {
        let key = peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Some(suppressed) = self.connections.allow(key, Instant::now()) {
            tracing::warn!(
                peer = %key,
                agent = %agent.map(loggable).unwrap_or_default(),
                suppressed,
                "agent refused: {}",
                whole_reason(why, 1024)
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
    fn a_reason_is_kept_whole_and_cut_only_past_its_bound() {
        let reason = "TLS handshake failed: peer sent no certificates";
        assert_eq!(whole_reason(reason, 1024), reason);
        assert_eq!(whole_reason("ééééé", 3), "ééé…(+2 chars)");
    }

    #[test]
    fn refused_connection_lines_are_bounded_per_address_prefix_and_in_all() {
        let t0 = Instant::now();
        let limit = ConnectionLogLimit::new(t0);
        let v4 = |a: u8, b: u8, c: u8| IpAddr::from([127, a, b, c]);
        // One address: one line per period, the rest counted in the next.
        assert_eq!(limit.allow(v4(0, 0, 1), t0), Some(0));
        assert_eq!(limit.allow(v4(0, 0, 1), t0), None);
        // Its /24: two lines per period, whatever the address.
        assert_eq!(limit.allow(v4(0, 0, 2), t0), Some(1));
        assert_eq!(limit.allow(v4(0, 0, 3), t0), None);
        // Spread over many networks: ten lines in all per period.
        let passed = (0..200u8)
            .filter(|i| limit.allow(v4(1, *i, 1), t0).is_some())
            .count();
        assert_eq!(passed, 8);
        // The next period starts afresh, and its first line counts what was held back.
        let t1 = t0 + CONNECTION_LOG_PERIOD;
        assert_eq!(limit.allow(v4(0, 0, 3), t1), Some(192));
        // IPv6 by /64.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        let c: IpAddr = "2001:db8::3".parse().unwrap();
        assert!(limit.allow(a, t1).is_some() && limit.allow(b, t1).is_some());
        assert_eq!(limit.allow(c, t1), None);
    }

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
    fn loggable_escapes_controls_once_and_truncates() {
        assert_eq!(loggable("edge-1"), "edge-1");
        assert_eq!(loggable("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(loggable(r#"agent's "x"\y"#), r#"agent's "x"\y"#);
        assert_eq!(
            loggable(&"é".repeat(70)),
            format!("{}…(+6 chars)", "é".repeat(64))
        );
        let long = "x".repeat(1_000_000);
        let shown = loggable(&long);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("…(+999936 chars)"));
    }
}
