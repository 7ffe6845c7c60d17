//! The phases: the process under test (the aggregator, then the ingest floor) under the
//! simulated fleet over sonde.v1, and vmagent under the same fleet over remote write,
//! one after the other, each measured from its start until its rows are all in.

use crate::agents::{AgentStats, GrpcAgent, Link, RemoteWriteAgent, drive};
use crate::load::{FAILING, Load, Plan, Targets, plan_for, shapes};
use crate::receiver::{Receiver, memory, refused_results, wait_healthy};
use crate::report::{PhaseReport, summarize};
use crate::{Args, SETTLE_QUIET, now_ms, pin_under_test};
use anyhow::{Context, anyhow};
use sonde_tests::Process;
use sonde_tests::procfs::cpu_seconds;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The aggregator's default `fleet.limits` this load must fit, or the generated config
/// raises them (and the report says so).
const DEFAULT_MAX_RESULTS_PER_BATCH: usize = 1000;
const DEFAULT_MAX_SAMPLES_PER_BATCH: usize = 10_000;
const DEFAULT_MAX_SAMPLES_PER_RESULT: usize = 256;
const DEFAULT_MAX_SERIES: usize = 250_000;
const DEFAULT_MAX_SERIES_BYTES: usize = 32 << 20;
const DEFAULT_MAX_AGENTS: usize = 1000;

/// What every phase of a run shares.
pub struct Bench<'a> {
    pub args: &'a Args,
    pub load: &'a Load,
    pub dir: &'a Path,
    pub ticks: f64,
    pub receiver: &'a Receiver,
    pub runtime: &'a tokio::runtime::Runtime,
    pub local: &'a tokio::task::LocalSet,
}

/// What [`run_agents`] hands back: every agent's stats, the phase's plan, when the
/// failure showed, the phase's length in seconds and the CPU read at the end of the
/// first interval.
type Ran = (Vec<AgentStats>, Arc<Plan>, Option<f64>, f64, Option<f64>);

/// Runs the schedule of every agent over links `connect` opens, with `up == 0` looked
/// for in `detect_in` when given.
async fn run_agents<F, Fut>(
    load: &Load,
    job_prefix: &str,
    connect: F,
    detect_in: Option<&Receiver>,
    before_start: impl FnOnce() -> anyhow::Result<()>,
    cpu_now: impl FnOnce() -> Option<f64> + Send + 'static,
) -> anyhow::Result<Ran>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Link>> + 'static,
{
    let mut links = Vec::with_capacity(load.agents);
    // A few at a time: a thousand simultaneous handshakes are not what is measured.
    let mut next = 0;
    while next < load.agents {
        let upto = (next + 50).min(load.agents);
        let batch = futures_join((next..upto).map(&connect)).await;
        for link in batch {
            links.push(link?);
        }
        next = upto;
    }
    if links.len() != load.agents {
        return Err(anyhow!(
            "only {} of {} agents could connect",
            links.len(),
            load.agents
        ));
    }
    before_start()?;
    let mut plan = plan_for(load, job_prefix);
    plan.start = tokio::time::Instant::now();
    plan.start_ms = now_ms();
    let plan = Arc::new(plan);
    let wall_start = Instant::now();
    let detector = detect_in.map(|receiver| {
        let (job, instance) = &plan.targets.all[FAILING];
        receiver.detect(job, instance, wall_start + plan.fail_at)
    });
    // The process's CPU once the first interval is over, when every series exists: the
    // steady state a long-running process pays is measured from there.
    let warm_at = wall_start + load.interval;
    let warm = std::thread::spawn(move || {
        std::thread::sleep(warm_at.saturating_duration_since(Instant::now()));
        cpu_now()
    });
    let tasks: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(agent, link)| tokio::spawn(drive(plan.clone(), agent, link)))
        .collect();
    let mut stats = Vec::with_capacity(tasks.len());
    for task in tasks {
        stats.push(task.await.context("an agent task failed")?);
    }
    let elapsed = wall_start.elapsed().as_secs_f64();
    let detection = match detector {
        Some(d) => tokio::task::spawn_blocking(move || d.join().ok().flatten())
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let warm_cpu = tokio::task::spawn_blocking(move || warm.join().ok().flatten())
        .await
        .ok()
        .flatten();
    Ok((stats, plan, detection, elapsed, warm_cpu))
}

/// Awaits every future (they run concurrently on the runtime).
async fn futures_join<T: 'static, Fut: std::future::Future<Output = T> + 'static>(
    futures: impl Iterator<Item = Fut>,
) -> Vec<T> {
    let mut out = Vec::new();
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futures.enumerate() {
        // Spawned on the current thread's set, in order; results are re-ordered below.
        set.spawn_local(async move { (i, f.await) });
    }
    while let Some(Ok(item)) = set.join_next().await {
        out.push(item);
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, v)| v).collect()
}

/// The aggregator's config: every target in static jobs that select every agent,
/// remote write to the receiver, and `fleet.limits` raised where the defaults would
/// refuse this load. Returns the YAML and what was raised.
pub fn aggregator_config(
    load: &Load,
    targets: &Targets,
    write_url: &str,
    remote_name: &str,
) -> (String, Vec<String>) {
    let mut raised = Vec::new();
    let mut limits = String::new();
    let per_batch_samples = load.batch * load.samples;
    if load.batch > DEFAULT_MAX_RESULTS_PER_BATCH {
        let _ = writeln!(limits, "    max_results_per_batch: {}", load.batch);
        raised.push(format!("max_results_per_batch {}", load.batch));
    }
    if per_batch_samples > DEFAULT_MAX_SAMPLES_PER_BATCH {
        let _ = writeln!(limits, "    max_samples_per_batch: {per_batch_samples}");
        raised.push(format!("max_samples_per_batch {per_batch_samples}"));
    }
    if load.samples > DEFAULT_MAX_SAMPLES_PER_RESULT {
        let _ = writeln!(limits, "    max_samples_per_result: {}", load.samples);
        raised.push(format!("max_samples_per_result {}", load.samples));
    }
    let series = load.targets * load.samples;
    if series > DEFAULT_MAX_SERIES {
        let _ = writeln!(limits, "    max_series: {series}");
        raised.push(format!("max_series {series}"));
    }
    let shape_bytes: usize = shapes(load.samples)
        .iter()
        .map(|s| {
            s.name.len()
                + s.labels
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        })
        .sum();
    let series_bytes = shape_bytes * load.targets;
    if series_bytes > DEFAULT_MAX_SERIES_BYTES {
        // With room: the bound is on bytes held, and this is the exact need.
        let bytes = series_bytes + series_bytes / 4;
        let _ = writeln!(limits, "    max_series_bytes: {bytes}");
        raised.push(format!("max_series_bytes {bytes}"));
    }
    if load.agents > DEFAULT_MAX_AGENTS {
        // The simulated agents connect without tokens.
        let _ = writeln!(limits, "    max_agents: {}", load.agents);
        raised.push(format!("max_agents {}", load.agents));
    }
    let interval_s = load.interval.as_secs_f64();
    let mut text = format!(
        "# Written by fleet-sim: {}\nglobal:\n  scrape_interval: {}ms\n  scrape_timeout: {}ms\nmodules:\n  http_2xx:\n    prober: http\n    http:\n      preferred_ip_protocol: ip4\njobs:\n",
        load.describe(),
        load.interval.as_millis(),
        (interval_s * 1000.0 * 0.8).min(10_000.0) as u64
    );
    for (job, instances) in targets.jobs() {
        let _ = writeln!(text, "  - job_name: {job}\n    module: http_2xx");
        let _ = writeln!(text, "    static_configs:\n      - targets:");
        for instance in instances {
            let _ = writeln!(text, "          - \"{instance}\"");
        }
    }
    let _ = writeln!(
        text,
        "remote_write:\n  - url: {write_url}\n    name: {remote_name}"
    );
    if !limits.is_empty() {
        let _ = write!(text, "fleet:\n  limits:\n{limits}");
    }
    (text, raised)
}

impl Bench<'_> {
    /// A server phase: `binary` (the aggregator, or the ingest floor in its place) under
    /// the fleet over sonde.v1, from the agents' start until its remote-write queue is
    /// empty. Returns the phase's report and the `fleet.limits` its config raised.
    pub fn server_phase(
        &self,
        name: &str,
        binary: &Path,
        job_prefix: &str,
        perf: Option<&Path>,
    ) -> anyhow::Result<(PhaseReport, Vec<String>)> {
        let (load, receiver, ticks) = (self.load, self.receiver, self.ticks);
        let targets = Targets::new(load, job_prefix);
        let remote_name = match receiver {
            Receiver::VictoriaMetrics { .. } => "victoriametrics",
            Receiver::Sink(_) => "sink",
        };
        let (config, raised) =
            aggregator_config(load, &targets, &receiver.write_url(), remote_name);
        let tag = job_prefix.replace('_', "-");
        let config_path = self.dir.join(format!("{tag}.yml"));
        std::fs::write(&config_path, config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let web_port = sonde_tests::free_port();
        let grpc_port = sonde_tests::free_port();
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
            .arg(format!("--grpc.listen-address=127.0.0.1:{grpc_port}"))
            .arg(format!(
                "--storage.path={}",
                self.dir.join(format!("{tag}-data")).display()
            ))
            .arg("--log.level=info");
        pin_under_test(&mut cmd, self.args.pin);
        let mut server = Process::start(&tag, cmd, self.dir);
        let web = format!("http://127.0.0.1:{web_port}");
        wait_healthy(name, &format!("{web}/-/healthy"), &mut server)?;
        let pid = server.pid();
        let grpc = format!("http://127.0.0.1:{grpc_port}");
        eprintln!(
            "fleet-sim: {name} {} (pid {pid}) at {web}, gRPC {grpc}; fleet.limits raised: {}",
            binary.display(),
            if raised.is_empty() {
                "none".to_string()
            } else {
                raised.join(", ")
            }
        );

        let rows_before = std::cell::Cell::new(0.0);
        let cpu_before = std::cell::Cell::new(0.0);
        let sink_before = std::cell::Cell::new(None);
        let mut perf_child: Option<std::process::Child> = None;
        let (stats, plan, detection, elapsed, warm_cpu) =
            self.local.block_on(self.runtime, async {
                let shapes = shapes(load.samples);
                let grpc = grpc.clone();
                run_agents(
                    load,
                    job_prefix,
                    |agent| {
                        let grpc = grpc.clone();
                        let shapes = shapes.clone();
                        async move {
                            GrpcAgent::connect(&grpc, agent, &shapes)
                                .await
                                .map(|a| Link::Grpc(Box::new(a)))
                        }
                    },
                    Some(receiver),
                    || {
                        cpu_before.set(cpu_seconds(pid, ticks).map_err(anyhow::Error::msg)?);
                        rows_before.set(receiver.rows()?);
                        sink_before.set(receiver.sink_counts());
                        if let Some(path) = perf {
                            perf_child = Some(
                                Command::new("perf")
                                    .args(["record", "-g", "-o"])
                                    .arg(path)
                                    .args(["-p", &pid.to_string()])
                                    .stdout(std::process::Stdio::null())
                                    .stderr(std::process::Stdio::null())
                                    .spawn()
                                    .context("cannot run perf")?,
                            );
                        }
                        eprintln!(
                            "fleet-sim: {} agents connected; {name} phase starts",
                            load.agents
                        );
                        Ok(())
                    },
                    move || cpu_seconds(pid, ticks).ok(),
                )
                .await
            })?;
        if let Some(mut perf) = perf_child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &perf.id().to_string()])
                .status();
            let _ = perf.wait();
        }
        let (hwm, rss) = memory(pid)?;
        let (page, undrained) = receiver.drain(&web, rows_before.get(), load.duration)?;
        let rows_after = receiver.rows()?;
        let cpu_after = cpu_seconds(pid, ticks).map_err(anyhow::Error::msg)?;
        let refused = refused_results(&page);
        server.check_running().map_err(anyhow::Error::msg)?;
        let mut phase = summarize(name, &stats, &plan, elapsed);
        phase.rows_inserted = rows_after - rows_before.get();
        phase.cpu_s = cpu_after - cpu_before.get();
        phase.cpu_warm_s = warm_cpu.map(|w| cpu_after - w);
        phase.hwm_bytes = hwm;
        phase.rss_bytes = rss;
        phase.detects = true;
        phase.detection_ms = detection;
        phase.refused = Some(refused);
        phase.sink = receiver
            .sink_counts()
            .zip(sink_before.get())
            .map(|(after, before)| after.since(&before));
        phase.errors.extend(undrained);
        server.terminate(Duration::from_secs(60));
        eprintln!("fleet-sim: {name} phase done");
        Ok((phase, raised))
    }

    /// The anchor phase: vmagent under the same fleet over remote write 1.0, writing to
    /// the same receiver, from the agents' start until the receiver has taken every row.
    pub fn anchor_phase(&self) -> anyhow::Result<PhaseReport> {
        let (load, receiver, ticks) = (self.load, self.receiver, self.ticks);
        let port = sonde_tests::free_port();
        let mut cmd = Command::new(&self.args.vmagent);
        cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-remoteWrite.url={}", receiver.write_url()))
            .arg(format!(
                "-remoteWrite.tmpDataPath={}",
                self.dir.join("vmagent-data").display()
            ))
            .arg("-loggerLevel=WARN");
        pin_under_test(&mut cmd, self.args.pin);
        let mut vmagent = Process::start("vmagent", cmd, self.dir);
        wait_healthy(
            "vmagent",
            &format!("http://127.0.0.1:{port}/health"),
            &mut vmagent,
        )?;
        let pid = vmagent.pid();
        let rows_before = receiver.settle(SETTLE_QUIET)?;
        let sink_before = receiver.sink_counts();
        let cpu_before = std::cell::Cell::new(0.0);
        let address = format!("127.0.0.1:{port}");
        let (stats, plan, _, elapsed, warm_cpu) = self.local.block_on(self.runtime, async {
            run_agents(
                load,
                "sim_http",
                |agent| {
                    let address = address.clone();
                    async move {
                        RemoteWriteAgent::connect(&address, agent)
                            .await
                            .map(|a| Link::RemoteWrite(Box::new(a)))
                    }
                },
                None,
                || {
                    cpu_before.set(cpu_seconds(pid, ticks).map_err(anyhow::Error::msg)?);
                    eprintln!("fleet-sim: anchor phase starts (vmagent pid {pid})");
                    Ok(())
                },
                move || cpu_seconds(pid, ticks).ok(),
            )
            .await
        })?;
        let (hwm, rss) = memory(pid)?;
        let rows_after = receiver.settle(SETTLE_QUIET)?;
        let cpu_after = cpu_seconds(pid, ticks).map_err(anyhow::Error::msg)?;
        vmagent.check_running().map_err(anyhow::Error::msg)?;
        let mut phase = summarize("vmagent (anchor)", &stats, &plan, elapsed);
        phase.rows_inserted = rows_after - rows_before;
        phase.cpu_s = cpu_after - cpu_before.get();
        phase.cpu_warm_s = warm_cpu.map(|w| cpu_after - w);
        phase.hwm_bytes = hwm;
        phase.rss_bytes = rss;
        phase.sink = receiver
            .sink_counts()
            .zip(sink_before)
            .map(|(after, before)| after.since(&before));
        vmagent.terminate(Duration::from_secs(30));
        Ok(phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::tests::load;

    #[test]
    fn limits_are_raised_only_when_the_load_needs_it() {
        let small = load(10, 1000, 5000, 30_000);
        let targets = Targets::new(&small, "sim_http");
        let (text, raised) = aggregator_config(&small, &targets, "http://vm/api/v1/write", "vm");
        assert!(raised.is_empty(), "{raised:?}");
        assert!(!text.contains("fleet:"));
        assert_eq!(text.matches("sim.example").count(), 1000);
        assert!(
            text.contains("  - url: http://vm/api/v1/write\n    name: vm\n"),
            "{text}"
        );

        let big = load(3, 50_000, 60_000, 120_000);
        let targets = Targets::new(&big, "sim_http");
        let (text, raised) = aggregator_config(&big, &targets, "http://vm/api/v1/write", "vm");
        assert_eq!(raised, vec!["max_series 600000".to_string()]);
        assert!(
            text.contains("fleet:\n  limits:\n    max_series: 600000\n"),
            "{text}"
        );
    }
}
