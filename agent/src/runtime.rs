//! One running agent: its scheduler, buffers and uplinks, started and stopped as a unit
//! so the aggregator's all-in-one mode can embed it.

use crate::buffer::Buffer;
use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::outbox::Outbox;
use crate::probe::ProbeContext;
use crate::schedule::{CheckSpec, Scheduler, Source};
use crate::uplink::Uplink;
use sonde_proto::config::ResolvedJob;
use sonde_proto::exposition::Family;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct AgentRuntime {
    pub config: RwLock<Arc<AgentConfig>>,
    pub scheduler: Arc<Scheduler>,
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<AgentMetrics>,
    pub probe_context: Arc<ProbeContext>,
    shutdown: watch::Sender<bool>,
    uplinks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl AgentRuntime {
    /// Starts probing the local jobs and streaming to every configured aggregator.
    pub fn start(config: AgentConfig) -> Result<Arc<Self>, String> {
        let probe_context = Arc::new(ProbeContext::from_system()?);
        let metrics = Arc::new(AgentMetrics::default());
        let buffers: Vec<(String, Arc<Buffer>)> = config
            .aggregators
            .iter()
            .map(|a| {
                (
                    a.address.clone(),
                    Arc::new(Buffer::new(config.buffer.max_bytes.0)),
                )
            })
            .collect();
        // Results are not kept across restarts yet, so sequence numbers start from the
        // clock (µs): above any number an earlier run of this agent can have used.
        let first_seq = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let outbox = Arc::new(Outbox::new(first_seq, buffers, metrics.clone()));
        let scheduler = Arc::new(Scheduler::new(
            config.id.clone(),
            probe_context.clone(),
            outbox.clone(),
        ));
        scheduler.set_checks(Source::Local, local_checks(&config.jobs));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let local_jobs: Vec<String> = config.jobs.iter().map(|j| j.name.clone()).collect();
        let mut uplinks = Vec::new();
        for (index, endpoint) in config.aggregators.iter().enumerate() {
            let uplink = Uplink {
                index,
                endpoint: endpoint.clone(),
                agent_id: config.id.clone(),
                labels: config.labels.clone(),
                local_jobs: local_jobs.clone(),
                buffer: outbox.buffers[index].1.clone(),
                scheduler: scheduler.clone(),
                metrics: metrics.clone(),
            };
            uplinks.push(tokio::spawn(uplink.run(shutdown_rx.clone())));
        }
        tracing::info!(
            agent = %config.id,
            aggregators = config.aggregators.len(),
            local_jobs = config.jobs.len(),
            "agent started"
        );
        Ok(Arc::new(Self {
            config: RwLock::new(Arc::new(config)),
            scheduler,
            outbox,
            metrics,
            probe_context,
            shutdown,
            uplinks: std::sync::Mutex::new(uplinks),
        }))
    }

    pub fn config(&self) -> Arc<AgentConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies a new config's local jobs, modules and /probe settings. Identity and
    /// aggregators are fixed for the life of the process; changing them needs a restart.
    pub fn reload(&self, new: AgentConfig) -> Result<(), String> {
        let old = self.config();
        if new.id != old.id || new.labels != old.labels || new.aggregators != old.aggregators {
            return Err(
                "agent.id, agent.labels and aggregators cannot change on reload; restart the agent to apply them"
                    .into(),
            );
        }
        self.scheduler
            .set_checks(Source::Local, local_checks(&new.jobs));
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        Ok(())
    }

    pub fn families(&self) -> Vec<Family> {
        let buffers: Vec<_> = self
            .outbox
            .buffers
            .iter()
            .map(|(a, b)| (a.clone(), b.stats()))
            .collect();
        self.metrics
            .families(&buffers, self.scheduler.check_count())
    }

    /// Stops probing, gives each uplink up to `grace` to send what is buffered, and
    /// waits for every task to end.
    pub async fn shutdown(&self, grace: Duration) {
        self.scheduler.stop();
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline
            && self
                .outbox
                .buffers
                .iter()
                .any(|(_, b)| b.stats().results > 0)
            && self
                .metrics
                .uplinks
                .lock()
                .map(|u| u.values().any(|c| c.connected))
                .unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.shutdown.send(true);
        let handles: Vec<_> =
            std::mem::take(&mut *self.uplinks.lock().unwrap_or_else(|e| e.into_inner()));
        for handle in handles {
            let _ = handle.await;
        }
    }
}

fn local_checks(jobs: &[ResolvedJob]) -> Vec<CheckSpec> {
    let mut checks = Vec::new();
    for job in jobs {
        let module = Arc::new(job.module.clone());
        for group in &job.config.static_configs {
            for target in &group.targets {
                checks.push(CheckSpec {
                    job: job.name.clone(),
                    instance: target.clone(),
                    module_name: job.module_name.clone(),
                    module: module.clone(),
                    interval: job.interval,
                    timeout: job.timeout,
                    retries: job.retries,
                    generation: 0,
                });
            }
        }
    }
    checks
}
