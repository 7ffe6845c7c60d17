//! Where the phases' remote write goes, and what fleet-sim reads of it: VictoriaMetrics
//! (a real database, the default) or the sink (next to nothing), and the process under
//! test's own pages.

use crate::WAIT_START;
use crate::sink::{Sink, SinkCounts};
use anyhow::{Context, anyhow};
use clap::ValueEnum;
use sonde_tests::procfs::{metrics_page, status_bytes};
use sonde_tests::{Process, http_get_ok, metric_sum, prometheus_query};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// How often the failed target's `up` is looked up in VictoriaMetrics (the sink notes
/// the instant it reads it).
const DETECT_POLL: Duration = Duration::from_millis(50);
/// How long after its phase the aggregator's remote-write queue may take to empty.
const DRAIN_MAX: Duration = Duration::from_secs(300);
/// How long after the failure instant `up == 0` may take to show.
const DETECT_MAX: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReceiverKind {
    /// A real VictoriaMetrics (own data dir), which also creates every series.
    VictoriaMetrics,
    /// An HTTP/1.1 sink in fleet-sim's process: reads each request whole, counts its
    /// rows, answers 204 (its CPU is reported apart).
    Sink,
}

pub enum Receiver {
    VictoriaMetrics { url: String, process: Process },
    Sink(Sink),
}

impl Receiver {
    pub fn start(kind: ReceiverKind, binary: &Path, dir: &Path) -> anyhow::Result<Self> {
        match kind {
            ReceiverKind::Sink => Ok(Self::Sink(
                Sink::start().context("cannot start the remote-write sink")?,
            )),
            ReceiverKind::VictoriaMetrics => {
                let port = sonde_tests::free_port();
                let mut cmd = Command::new(binary);
                cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
                    .arg(format!(
                        "-storageDataPath={}",
                        dir.join("vm-data").display()
                    ))
                    .arg("-search.latencyOffset=0s")
                    .arg("-dedup.minScrapeInterval=1ms")
                    .arg("-search.disableCache")
                    .arg("-loggerLevel=WARN");
                let mut process = Process::start("victoria-metrics", cmd, dir);
                let url = format!("http://127.0.0.1:{port}");
                wait_healthy("VictoriaMetrics", &format!("{url}/health"), &mut process)?;
                Ok(Self::VictoriaMetrics { url, process })
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::VictoriaMetrics { .. } => "VictoriaMetrics",
            Self::Sink(_) => "the sink",
        }
    }

    /// The remote-write URL to give the process under test.
    pub fn write_url(&self) -> String {
        match self {
            Self::VictoriaMetrics { url, .. } => format!("{url}/api/v1/write"),
            Self::Sink(sink) => sink.url(),
        }
    }

    /// Rows taken so far: VictoriaMetrics's `vm_rows_inserted_total`, the sink's count.
    pub fn rows(&self) -> anyhow::Result<f64> {
        match self {
            Self::VictoriaMetrics { url, .. } => {
                metric_sum(url, "vm_rows_inserted_total", &[]).map_err(anyhow::Error::msg)
            }
            Self::Sink(sink) => Ok(sink.counts().rows as f64),
        }
    }

    /// The sink's counts (none for VictoriaMetrics, whose CPU is no figure).
    pub fn sink_counts(&self) -> Option<SinkCounts> {
        match self {
            Self::VictoriaMetrics { .. } => None,
            Self::Sink(sink) => Some(sink.counts()),
        }
    }

    pub fn errors(&self) -> Vec<String> {
        match self {
            Self::VictoriaMetrics { .. } => Vec::new(),
            Self::Sink(sink) => sink.errors(),
        }
    }

    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self {
            Self::VictoriaMetrics { process, .. } => {
                process.check_running().map_err(anyhow::Error::msg)
            }
            Self::Sink(_) => Ok(()),
        }
    }

    /// Waits until the receiver's row count has not moved for `quiet` (bounded); returns
    /// the count. Only for phases after the aggregator has stopped: a running aggregator
    /// rewrites `up` and its own series every few seconds.
    pub fn settle(&self, quiet: Duration) -> anyhow::Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last = self.rows()?;
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = self.rows()?;
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return Ok(now);
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "{} kept taking rows for 300s after the phase",
                    self.name()
                ));
            }
        }
    }

    /// Starts looking for `up{job, instance} == 0` from `fail_at` on; the returned
    /// thread says how long after that instant it was first visible.
    pub fn detect(
        &self,
        job: &str,
        instance: &str,
        fail_at: Instant,
    ) -> std::thread::JoinHandle<Option<f64>> {
        let since = move |t: Instant| t.saturating_duration_since(fail_at).as_secs_f64() * 1000.0;
        match self {
            Self::VictoriaMetrics { url, .. } => {
                let (url, query) = (
                    url.clone(),
                    format!("up{{job=\"{job}\",instance=\"{instance}\"}} == 0"),
                );
                std::thread::spawn(move || {
                    std::thread::sleep(fail_at.saturating_duration_since(Instant::now()));
                    while fail_at.elapsed() < DETECT_MAX {
                        if prometheus_query(&url, &query).is_ok_and(|r| !r.is_empty()) {
                            return Some(since(Instant::now()));
                        }
                        std::thread::sleep(DETECT_POLL);
                    }
                    None
                })
            }
            Self::Sink(sink) => {
                sink.watch(job, instance);
                let sink = sink.watcher();
                std::thread::spawn(move || {
                    while fail_at.elapsed() < DETECT_MAX {
                        if let Some(seen) = sink() {
                            return Some(since(seen));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    None
                })
            }
        }
    }

    /// Waits until the process under test's remote-write queue is empty (bounded):
    /// every row of the phase has then been taken by the receiver. Returns the page it
    /// saw last, and why it stopped waiting if the queue never emptied (the phase's
    /// figures then count only the rows that got in, and the report lists it as a
    /// problem).
    ///
    /// The aggregator's `/metrics` page lists series per target, so rendering it costs
    /// the aggregator CPU that would count in the phase: it is read only once the
    /// receiver takes rows at under 2% of the phase's rate (the aggregator's own
    /// periodic rewrites of `up`), then every 2 s until the queue is empty.
    pub fn drain(
        &self,
        web: &str,
        rows_before: f64,
        phase: Duration,
    ) -> anyhow::Result<(Vec<sonde_tests::MetricSample>, Option<String>)> {
        let deadline = Instant::now() + DRAIN_MAX;
        let step = Duration::from_millis(500);
        let mut last = self.rows()?;
        let slow =
            ((last - rows_before) / phase.as_secs_f64() * step.as_secs_f64() * 0.02).max(1.0);
        loop {
            std::thread::sleep(step);
            let now = self.rows()?;
            let delta = now - last;
            last = now;
            if delta <= slow || Instant::now() > deadline {
                break;
            }
        }
        loop {
            let page = metrics_page(
                web,
                &[
                    "sonde_remote_write_queue_samples",
                    "sonde_results_refused_total",
                ],
            )
            .map_err(anyhow::Error::msg)?;
            let samples = sonde_tests::parse_metrics(&page);
            let queues =
                sonde_tests::find_samples(&samples, "sonde_remote_write_queue_samples", &[]);
            if queues.is_empty() {
                return Err(anyhow!(
                    "sonde_remote_write_queue_samples is not on {web}/metrics: cannot tell when remote write is done"
                ));
            }
            let queued: f64 = queues.iter().map(|s| s.value).sum();
            if queued == 0.0 {
                return Ok((samples, None));
            }
            if Instant::now() > deadline {
                let why = format!(
                    "the remote-write queue still held {queued} samples {}s after the phase ({web}/metrics)",
                    DRAIN_MAX.as_secs()
                );
                return Ok((samples, Some(why)));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

/// (VmHWM, VmRSS) of a process, in bytes.
pub fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    Ok((
        status_bytes(pid, "VmHWM:").map_err(anyhow::Error::msg)?,
        status_bytes(pid, "VmRSS:").map_err(anyhow::Error::msg)?,
    ))
}

/// `sonde_results_refused_total` over every agent and reason (0 before any refusal,
/// when the counter has no series yet).
pub fn refused_results(samples: &[sonde_tests::MetricSample]) -> f64 {
    sonde_tests::find_samples(samples, "sonde_results_refused_total", &[])
        .iter()
        .map(|s| s.value)
        .sum::<f64>()
        + 0.0
}

pub fn wait_healthy(what: &str, url: &str, process: &mut Process) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if http_get_ok(url).is_ok() {
            return Ok(());
        }
        process.check_running().map_err(anyhow::Error::msg)?;
        if start.elapsed() > WAIT_START {
            return Err(anyhow!(
                "{what} not healthy at {url} after {WAIT_START:?}\n{}",
                process.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
