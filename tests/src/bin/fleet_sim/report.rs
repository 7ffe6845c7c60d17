//! What the phases measured, as a table (aggregator, ingest floor and vmagent side by
//! side, with the aggregator's ratios to both), as JSON, and the problems that make the
//! run fail.

use crate::agents::AgentStats;
use crate::load::{Load, Plan};
use crate::receiver::ReceiverKind;
use crate::sink::SinkCounts;
use crate::{CPU_FOR_THE_REST, CPU_UNDER_TEST};
use std::fmt::Write as _;
use std::time::Duration;

/// What one phase measured.
#[derive(Default, Debug)]
pub struct PhaseReport {
    pub name: String,
    pub elapsed_s: f64,
    pub results_sent: u64,
    pub results_acked: u64,
    pub samples_sent: u64,
    pub batches: u64,
    pub stalls: u64,
    pub reconnects: u64,
    /// Rows the receiver took in the phase.
    pub rows_inserted: f64,
    pub cpu_s: f64,
    /// Samples sent, and the CPU spent, from the end of the first interval (every series
    /// exists) until the phase's rows are all in: the steady state.
    pub samples_sent_warm: u64,
    pub cpu_warm_s: Option<f64>,
    pub hwm_bytes: u64,
    pub rss_bytes: u64,
    pub latency_ms: Option<(f64, f64, f64)>,
    /// Failure instant → `up == 0` visible in the receiver (`None` for vmagent, which
    /// writes no `up`).
    pub detection_ms: Option<f64>,
    /// Whether the phase looks for `up == 0` at all.
    pub detects: bool,
    /// Failure instant → the last agent had sent its failed result.
    pub failure_sent_spread_ms: Option<f64>,
    pub refused: Option<f64>,
    /// What the sink did in the phase: its own CPU, in no other figure.
    pub sink: Option<SinkCounts>,
    pub errors: Vec<String>,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

pub fn summarize(name: &str, stats: &[AgentStats], plan: &Plan, elapsed: f64) -> PhaseReport {
    let (samples, fail_at) = (plan.load.samples, plan.fail_at);
    let mut report = PhaseReport {
        name: name.into(),
        elapsed_s: elapsed,
        ..PhaseReport::default()
    };
    let mut latencies: Vec<u32> = Vec::new();
    let mut failure_sent: Option<Duration> = None;
    for s in stats {
        report.results_sent += s.results_sent;
        report.results_acked += s.results_acked;
        report.samples_sent_warm += s.results_sent_warm * samples as u64;
        report.batches += s.batches;
        report.stalls += s.stalls;
        report.reconnects += s.reconnects;
        latencies.extend(&s.latencies_us);
        if let Some(t) = s.failure_sent {
            failure_sent = Some(failure_sent.map_or(t, |f| f.max(t)));
        }
        for e in &s.errors {
            if report.errors.len() < 10 {
                report.errors.push(e.clone());
            }
        }
    }
    report.samples_sent = report.results_sent * samples as u64;
    latencies.sort_unstable();
    if !latencies.is_empty() {
        report.latency_ms = Some((
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            f64::from(*latencies.last().unwrap_or(&0)) / 1000.0,
        ));
    }
    report.failure_sent_spread_ms =
        failure_sent.map(|t| t.saturating_sub(fail_at).as_secs_f64() * 1000.0);
    report
}

impl PhaseReport {
    fn cpu_per_sample(&self) -> Option<f64> {
        (self.samples_sent > 0).then(|| self.cpu_s * 1e6 / self.samples_sent as f64)
    }

    fn cpu_per_sample_steady(&self) -> Option<f64> {
        self.cpu_warm_s
            .filter(|_| self.samples_sent_warm > 0)
            .map(|c| c * 1e6 / self.samples_sent_warm as f64)
    }
}

pub struct Report {
    pub load: Load,
    pub raised: Vec<String>,
    /// `--pin`: the process under test had CPU 0 to itself.
    pub pinned: bool,
    pub receiver: ReceiverKind,
    /// The load average when the run started and when it ended (1, 5, 15 minutes).
    pub loadavg: (String, String),
    pub aggregator: PhaseReport,
    pub floor: Option<PhaseReport>,
    pub anchor: Option<PhaseReport>,
}

type Cell<'a> = &'a dyn Fn(&PhaseReport) -> Option<f64>;

impl Report {
    /// Series the aggregator holds and writes: one per agent, target and sample, plus
    /// the merged `up`, `sonde_target_agents` and `sonde_target_agents_succeeding` of
    /// every target.
    pub fn active_series(&self) -> u64 {
        let l = &self.load;
        (l.agents * l.targets * l.samples + 3 * l.targets) as u64
    }

    fn phases(&self) -> impl Iterator<Item = &PhaseReport> {
        std::iter::once(&self.aggregator)
            .chain(self.floor.as_ref())
            .chain(self.anchor.as_ref())
    }

    pub fn markdown(&self) -> String {
        let (a, f, b) = (&self.aggregator, self.floor.as_ref(), self.anchor.as_ref());
        let mut out = String::new();
        let _ = writeln!(out, "Load: {}.", self.load.describe());
        let _ = writeln!(
            out,
            "Receiver: {}. Load average at the start: {}; at the end: {}.",
            match self.receiver {
                ReceiverKind::VictoriaMetrics => "VictoriaMetrics",
                ReceiverKind::Sink =>
                    "the sink (fleet-sim's own threads: read, unsnappy, count, answer 204)",
            },
            self.loadavg.0,
            self.loadavg.1
        );
        if self.pinned {
            let _ = writeln!(
                out,
                "Pinned (`--pin`): the process under test on CPU {CPU_UNDER_TEST}, the simulator and the receiver on CPU {CPU_FOR_THE_REST}."
            );
        }
        let _ = writeln!(
            out,
            "Aggregator `fleet.limits` raised: {}.\n",
            if self.raised.is_empty() {
                "none (the defaults take this load)".to_string()
            } else {
                self.raised.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "| | sonde-aggregator | ingest floor | vmagent (anchor) | aggregator ÷ floor | aggregator ÷ vmagent |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        let row = |out: &mut String, name: &str, cell: Cell, fmt: &dyn Fn(f64) -> String, ratio| {
            let (va, vf, vb) = (cell(a), f.and_then(cell), b.and_then(cell));
            let show = |v: Option<f64>| v.map_or("—".to_string(), fmt);
            let r = |y: Option<f64>| match (ratio, va, y) {
                (true, Some(x), Some(y)) if y > 0.0 => format!("{:.2}×", x / y),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} |",
                show(va),
                show(vf),
                show(vb),
                r(vf),
                r(vb)
            );
        };
        let int = |v: f64| format!("{v:.0}");
        let one = |v: f64| format!("{v:.1}");
        let two = |v: f64| format!("{v:.2}");
        let mib = |v: f64| format!("{:.1}", v / f64::from(1 << 20));
        let _ = writeln!(
            out,
            "| results sent / acked | {} | {} | {} | | |",
            format_args!("{} / {}", a.results_sent, a.results_acked),
            f.map_or("—".into(), |p| format!(
                "{} / {}",
                p.results_sent, p.results_acked
            )),
            b.map_or("—".into(), |p| format!(
                "{} / {}",
                p.results_sent, p.results_acked
            ))
        );
        let results_per_s = |p: &PhaseReport| Some(p.results_sent as f64 / p.elapsed_s);
        row(&mut out, "results/s", &results_per_s, &int, false);
        let per_batch =
            |p: &PhaseReport| (p.batches > 0).then(|| p.results_sent as f64 / p.batches as f64);
        row(&mut out, "results per batch", &per_batch, &two, false);
        let samples_per_s = |p: &PhaseReport| Some(p.samples_sent as f64 / p.elapsed_s);
        row(&mut out, "samples/s", &samples_per_s, &int, false);
        let rows = |p: &PhaseReport| Some(p.rows_inserted);
        row(&mut out, "rows the receiver took", &rows, &int, true);
        let cpu = |p: &PhaseReport| Some(p.cpu_s);
        row(
            &mut out,
            "CPU s (utime+stime, whole process)",
            &cpu,
            &two,
            true,
        );
        let per_row =
            |p: &PhaseReport| (p.rows_inserted > 0.0).then(|| p.cpu_s * 1e6 / p.rows_inserted);
        row(&mut out, "CPU µs per row taken", &per_row, &two, true);
        row(
            &mut out,
            "**CPU µs per probe sample sent**",
            &PhaseReport::cpu_per_sample,
            &two,
            true,
        );
        row(
            &mut out,
            "CPU µs per probe sample sent after the first interval (steady state)",
            &PhaseReport::cpu_per_sample_steady,
            &two,
            true,
        );
        let hwm = |p: &PhaseReport| Some(p.hwm_bytes as f64);
        row(&mut out, "peak RSS (VmHWM), MiB", &hwm, &mib, true);
        let rss = |p: &PhaseReport| Some(p.rss_bytes as f64);
        row(&mut out, "RSS at the end (VmRSS), MiB", &rss, &mib, true);
        let series = self.active_series() as f64;
        let per_series = |p: &PhaseReport| Some(p.hwm_bytes as f64 / series);
        row(
            &mut out,
            &format!(
                "peak RSS per active series ({} series), bytes",
                self.active_series()
            ),
            &per_series,
            &one,
            true,
        );
        let p50 = |p: &PhaseReport| p.latency_ms.map(|l| l.0);
        row(&mut out, "ack latency p50, ms", &p50, &two, false);
        let p99 = |p: &PhaseReport| p.latency_ms.map(|l| l.1);
        row(&mut out, "ack latency p99, ms", &p99, &two, false);
        let max = |p: &PhaseReport| p.latency_ms.map(|l| l.2);
        row(&mut out, "ack latency max, ms", &max, &two, false);
        let batches = |p: &PhaseReport| Some(p.batches as f64);
        row(&mut out, "batches", &batches, &int, false);
        let stalls = |p: &PhaseReport| Some(p.stalls as f64);
        row(
            &mut out,
            "waits on a full in-flight window",
            &stalls,
            &int,
            false,
        );
        let reconnects = |p: &PhaseReport| Some(p.reconnects as f64);
        row(
            &mut out,
            "reconnects (connection found closed)",
            &reconnects,
            &int,
            false,
        );
        let detection = |p: &PhaseReport| {
            if !p.detects {
                "—".to_string()
            } else {
                p.detection_ms
                    .map_or("not seen within 120s".into(), |v| format!("{v:.0}"))
            }
        };
        let _ = writeln!(
            out,
            "| target failed → `up == 0` in the receiver, ms | {} | {} | — | | |",
            detection(a),
            f.map_or("—".into(), detection)
        );
        let spread = |p: &PhaseReport| {
            p.failure_sent_spread_ms
                .map_or("—".into(), |v| format!("{v:.0}"))
        };
        let _ = writeln!(
            out,
            "| (of which: the agents' failed results all sent after, ms) | {} | {} | — | | |",
            spread(a),
            f.map_or("—".into(), spread)
        );
        let _ = writeln!(
            out,
            "| results refused (`sonde_results_refused_total`) | {} | {} | — | | |",
            a.refused.map_or("—".into(), |v| format!("{:.0}", v + 0.0)),
            f.and_then(|p| p.refused)
                .map_or("—".into(), |v| format!("{:.0}", v + 0.0))
        );
        if self.receiver == ReceiverKind::Sink {
            let sink_cpu = |p: &PhaseReport| p.sink.map(|s| s.cpu_s);
            row(
                &mut out,
                "the sink's CPU s (fleet-sim's threads, in no figure above)",
                &sink_cpu,
                &two,
                false,
            );
            let sink_per_row = |p: &PhaseReport| {
                p.sink
                    .filter(|s| s.rows > 0)
                    .map(|s| s.cpu_s * 1e6 / s.rows as f64)
            };
            row(
                &mut out,
                "the sink's CPU µs per row",
                &sink_per_row,
                &two,
                false,
            );
            let requests = |p: &PhaseReport| p.sink.map(|s| s.requests as f64);
            row(&mut out, "requests the sink read", &requests, &int, false);
            let kib = |p: &PhaseReport| {
                p.sink
                    .filter(|s| s.requests > 0)
                    .map(|s| s.bytes as f64 / s.requests as f64 / 1024.0)
            };
            row(&mut out, "KiB per request (snappy)", &kib, &one, false);
        }
        for p in self.phases() {
            for e in &p.errors {
                let _ = writeln!(out, "\n**{} error**: {e}", p.name);
            }
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let phase = |p: &PhaseReport| {
            serde_json::json!({
                "elapsed_s": p.elapsed_s,
                "results_sent": p.results_sent,
                "results_acked": p.results_acked,
                "samples_sent": p.samples_sent,
                "results_per_s": p.results_sent as f64 / p.elapsed_s,
                "samples_per_s": p.samples_sent as f64 / p.elapsed_s,
                "batches": p.batches,
                "in_flight_waits": p.stalls,
                "reconnects": p.reconnects,
                "rows_inserted": p.rows_inserted,
                "cpu_s": p.cpu_s,
                "cpu_us_per_row": if p.rows_inserted > 0.0 { p.cpu_s * 1e6 / p.rows_inserted } else { f64::NAN },
                "cpu_us_per_sample": p.cpu_per_sample().unwrap_or(f64::NAN),
                "cpu_us_per_sample_steady": p.cpu_per_sample_steady().unwrap_or(f64::NAN),
                "peak_rss_bytes": p.hwm_bytes,
                "rss_bytes": p.rss_bytes,
                "ack_latency_ms": p.latency_ms.map(|(p50, p99, max)| serde_json::json!({"p50": p50, "p99": p99, "max": max})),
                "up_zero_visible_ms": p.detection_ms,
                "failed_results_sent_within_ms": p.failure_sent_spread_ms,
                "refused": p.refused,
                "sink": p.sink.map(|s| serde_json::json!({
                    "requests": s.requests, "bytes": s.bytes, "rows": s.rows,
                    "refused": s.refused, "cpu_s": s.cpu_s,
                })),
                "errors": p.errors,
            })
        };
        let ratio = |other: Option<&PhaseReport>| {
            other
                .and_then(PhaseReport::cpu_per_sample)
                .zip(self.aggregator.cpu_per_sample())
                .map(|(o, a)| a / o)
        };
        let l = &self.load;
        serde_json::json!({
            "load": {
                "agents": l.agents, "targets": l.targets, "jobs": l.jobs, "samples": l.samples,
                "interval_s": l.interval.as_secs_f64(), "duration_s": l.duration.as_secs_f64(),
                "batch": l.batch, "batching": format!("{:?}", l.batching).to_lowercase(),
                "flush_s": l.flush.as_secs_f64(),
            },
            "receiver": format!("{:?}", self.receiver),
            "loadavg": {"start": self.loadavg.0, "end": self.loadavg.1},
            "limits_raised": self.raised,
            "pinned": self.pinned,
            "active_series": self.active_series(),
            "aggregator": phase(&self.aggregator),
            "floor": self.floor.as_ref().map(phase),
            "anchor": self.anchor.as_ref().map(phase),
            "cpu_per_sample_aggregator_over_floor": ratio(self.floor.as_ref()),
            "cpu_per_sample_aggregator_over_vmagent": ratio(self.anchor.as_ref()),
        })
    }

    /// The run failed its own bar: something refused, unacked or in error.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in self.phases() {
            if p.refused.is_some_and(|r| r > 0.0) {
                out.push(format!(
                    "{} refused {} results",
                    p.name,
                    p.refused.unwrap_or(0.0)
                ));
            }
            if p.results_acked < p.results_sent {
                out.push(format!(
                    "{}: {} of {} results were never acked",
                    p.name,
                    p.results_sent - p.results_acked,
                    p.results_sent
                ));
            }
            if p.detects && p.detection_ms.is_none() {
                out.push(format!(
                    "{}: the failed target's up == 0 never showed in the receiver",
                    p.name
                ));
            }
            if !p.errors.is_empty() {
                out.push(format!("{}: {} errors", p.name, p.errors.len()));
            }
        }
        out
    }
}
