//! One running agent: its scheduler, buffers and uplinks, started and stopped as a unit
//! so the aggregator's all-in-one mode can embed it.

use crate::assigned::{FilePolicy, PolicyError};
use crate::buffer::{Buffer, BufferError, BufferUnhealthy};
use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::probe::policy::{BadPattern, ConnectRules};
use crate::probe::{ProbeContext, SystemResolverError};
use crate::schedule::{CheckSpec, Scheduler, SchedulerError, Source};
use crate::uplink::Uplink;
use sonde_proto::config::ResolvedJob;
use sonde_proto::exposition::Family;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Resolver(#[from] SystemResolverError),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("assigned_modules.allowed_file_paths: {0}")]
    FilePolicy(#[source] PolicyError),
    #[error("assigned_modules.connect: {0}")]
    ConnectPolicy(#[source] BadPattern),
}

/// Why a new config was not applied; the running one stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "agent.id, agent.labels and aggregators cannot change on reload; restart the agent to apply them"
    )]
    FixedSettingChanged,
    #[error("assigned_modules.allowed_file_paths: {0}")]
    FilePolicy(#[source] PolicyError),
    #[error("assigned_modules.connect: {0}")]
    ConnectPolicy(#[source] BadPattern),
}

/// Why the agent is not ready (`/-/ready` answers 503 with it).
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Buffer(#[from] BufferUnhealthy),
}

pub struct AgentRuntime {
    pub config: RwLock<Arc<AgentConfig>>,
    pub scheduler: Arc<Scheduler>,
    /// Every result from its probe to its aggregators' acks.
    pub buffer: Arc<Buffer>,
    pub metrics: Arc<AgentMetrics>,
    pub probe_context: Arc<ProbeContext>,
    /// `assigned_modules` of the current config, shared with the uplinks.
    file_policy: Arc<RwLock<FilePolicy>>,
    /// `/probe` requests being served, against `probe_endpoint.max_concurrent_probes`.
    pub probes_in_flight: AtomicUsize,
    shutdown: watch::Sender<bool>,
    uplinks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl AgentRuntime {
    /// Starts probing the local jobs and streaming to every configured aggregator.
    ///
    /// Results wait for their acks in `<storage_dir>/agent.db`, or in memory (lost when
    /// the process ends) for `None`.
    pub fn start(config: AgentConfig, storage_dir: Option<&Path>) -> Result<Arc<Self>, StartError> {
        let probe_context = Arc::new(ProbeContext::from_system()?);
        let metrics = Arc::new(AgentMetrics::default());
        let addresses: Vec<String> = config
            .aggregators
            .iter()
            .map(|a| a.address.clone())
            .collect();
        let open_files = crate::schedule::raise_open_file_limit();
        tracing::debug!(open_files, "open-file limit");
        let buffer = Buffer::open(storage_dir, &addresses, config.buffer.max_bytes.0)?;
        // The stored high-water mark keeps numbers rising across restarts. The clock
        // (µs) covers what it cannot: an agent whose storage was wiped or that ran
        // without one (as before the store existed), whose old numbers an aggregator
        // may still hold as committed and would take new results for replays of.
        buffer.raise_next_seq(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64),
        );
        metrics.restore_probe_counts(buffer.probe_counts());
        let scheduler = Arc::new(Scheduler::new(
            config.id.clone(),
            probe_context.clone(),
            buffer.clone(),
            metrics.clone(),
        )?);
        scheduler.set_assigned_connect_policy(
            ConnectRules::assigned(&config.assigned_modules.connect)
                .map_err(StartError::ConnectPolicy)?,
        );
        scheduler.set_checks(Source::Local, local_checks(&config.jobs));
        let file_policy =
            FilePolicy::new(&config.assigned_modules).map_err(StartError::FilePolicy)?;
        let file_policy = Arc::new(RwLock::new(file_policy));
        for endpoint in &config.aggregators {
            if endpoint.allow_plaintext_token && endpoint.address.starts_with("http://") {
                tracing::warn!(aggregator = %endpoint.address, "allow_plaintext_token is set: this agent's token travels in clear text to this aggregator");
            }
        }
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
                buffer: buffer.clone(),
                scheduler: scheduler.clone(),
                metrics: metrics.clone(),
                file_policy: file_policy.clone(),
                logged_refusals: Default::default(),
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
            buffer,
            metrics,
            probe_context,
            file_policy,
            probes_in_flight: AtomicUsize::new(0),
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
    pub fn reload(&self, new: AgentConfig) -> Result<(), ReloadError> {
        let old = self.config();
        if new.id != old.id || new.labels != old.labels || new.aggregators != old.aggregators {
            return Err(ReloadError::FixedSettingChanged);
        }
        let policy = FilePolicy::new(&new.assigned_modules).map_err(ReloadError::FilePolicy)?;
        let connect = ConnectRules::assigned(&new.assigned_modules.connect)
            .map_err(ReloadError::ConnectPolicy)?;
        self.scheduler.set_assigned_connect_policy(connect);
        if new.assigned_modules != old.assigned_modules {
            self.drop_assigned_checks_refused_by(&policy);
        }
        *self.file_policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
        self.scheduler
            .set_checks(Source::Local, local_checks(&new.jobs));
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        Ok(())
    }

    /// Applies a narrower `assigned_modules` to the assigned checks already running: those
    /// whose module names a file the new policy refuses stop now. (Checks refused under
    /// the old policy start with the next assignment each aggregator sends.)
    fn drop_assigned_checks_refused_by(&self, policy: &FilePolicy) {
        let mut by_source: std::collections::BTreeMap<Source, Vec<CheckSpec>> =
            std::collections::BTreeMap::new();
        let mut stopped = 0;
        for (source, check) in self.scheduler.checks() {
            if source == Source::Local {
                continue;
            }
            let kept = by_source.entry(source).or_default();
            match policy.check_module(&check.module) {
                Ok(()) => kept.push(check),
                Err(e) => {
                    stopped += 1;
                    tracing::warn!(job = %check.job, instance = %check.instance, module = %check.module_name, error = %e, "assigned check stopped: assigned_modules no longer allows its files");
                }
            }
        }
        if stopped > 0 {
            for (source, kept) in by_source {
                self.scheduler.set_checks(source, kept);
            }
        }
        tracing::info!(
            stopped,
            "assigned_modules changed: it applies to running assigned checks now, and to each aggregator's next assignment"
        );
    }

    /// `/-/ready`: `Ok` while the agent can do its job: its config is loaded (it is, once
    /// the runtime exists), it is not shutting down, and its buffer is open and takes
    /// writes. An aggregator that cannot be reached does not make the agent unready: it
    /// keeps probing and buffers the results.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if *self.shutdown.borrow() {
            return Err(NotReady::ShuttingDown);
        }
        Ok(self.buffer.health()?)
    }

    pub fn families(&self) -> Vec<Family> {
        self.metrics.families(
            &self.buffer.all_stats(),
            self.buffer.write_errors(),
            self.scheduler.check_count(),
        )
    }

    /// Stops probing, gives each uplink up to `grace` to send what is buffered, and
    /// waits for every task to end.
    pub async fn shutdown(&self, grace: Duration) {
        self.scheduler.stop();
        // The last results must be committed before they can be counted and sent.
        let buffer = self.buffer.clone();
        let _ = tokio::task::spawn_blocking(move || buffer.flush()).await;
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline
            && self.buffer.all_stats().iter().any(|(_, s)| s.results > 0)
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
        // Commits what the last probes produced and releases the storage directory.
        let buffer = self.buffer.clone();
        let _ = tokio::task::spawn_blocking(move || buffer.close()).await;
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
                    probe_target: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AggregatorEndpoint;

    fn config() -> AgentConfig {
        let mut config = AgentConfig::minimal("edge-1".into());
        // Nothing listens there: results stay buffered.
        config
            .aggregators
            .push(AggregatorEndpoint::new("http://127.0.0.1:9"));
        config
    }

    #[tokio::test]
    async fn a_storage_path_that_cannot_be_used_is_named() {
        let file = std::env::temp_dir().join(format!("sonde-runtime-file-{}", std::process::id()));
        std::fs::write(&file, "").unwrap();
        let err = AgentRuntime::start(config(), Some(&file))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("check --storage.path"), "{err}");
        std::fs::remove_file(&file).unwrap();
    }

    #[tokio::test]
    async fn a_restarted_agent_numbers_above_its_buffered_results() {
        let dir = std::env::temp_dir().join(format!("sonde-runtime-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let agent = AgentRuntime::start(config(), Some(&dir)).unwrap();
        let seq = agent
            .buffer
            .append(&crate::buffer::Route::All, |seq| {
                crate::record::ProbeRecord {
                    seq,
                    job: "j".into(),
                    instance: "i".into(),
                    timestamp_ms: 1,
                    success: true,
                    duration_seconds: 0.1,
                    samples: Vec::new(),
                    generation: 0,
                    failure: None,
                    trace: None,
                }
            })
            .unwrap();
        agent.shutdown(Duration::ZERO).await;
        // Shutdown releases the directory even while the old runtime is still around.
        let again = AgentRuntime::start(config(), Some(&dir)).unwrap();
        assert_eq!(again.buffer.stats(0).results, 1);
        assert_eq!(again.buffer.pending_after(0, 0, 10)[0].seq, seq);
        assert!(again.buffer.next_seq() > seq);
        again.shutdown(Duration::ZERO).await;
        drop((agent, again));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_narrower_assigned_modules_stops_running_checks_at_reload() {
        let mut first = config();
        first.assigned_modules.allowed_file_paths = Some(vec!["/etc/sonde/certs/*".into()]);
        let agent = AgentRuntime::start(first.clone(), None).unwrap();
        let module = |json: &str| Arc::new(serde_json::from_str(json).unwrap());
        let check = |job: &str, module| CheckSpec {
            job: job.into(),
            instance: "127.0.0.1:9".into(),
            probe_target: None,
            module_name: "m".into(),
            module,
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(1),
            retries: 0,
            generation: 1,
        };
        agent.scheduler.set_checks(
            Source::Aggregator(0),
            vec![
                check(
                    "with-ca",
                    module(r#"{"prober":"tcp","tcp":{"tls":true,"tls_config":{"ca_file":"/etc/sonde/certs/ca.pem"}}}"#),
                ),
                check("plain", module(r#"{"prober":"tcp"}"#)),
            ],
        );
        assert_eq!(agent.scheduler.check_count(), 2);
        // Same policy: nothing stops.
        agent.reload(first.clone()).unwrap();
        assert_eq!(agent.scheduler.check_count(), 2);
        let mut narrower = first;
        narrower.assigned_modules.allowed_file_paths = None;
        agent.reload(narrower).unwrap();
        let jobs: Vec<_> = agent
            .scheduler
            .checks()
            .into_iter()
            .map(|(_, c)| c.job)
            .collect();
        assert_eq!(jobs, ["plain"]);
        agent.shutdown(Duration::ZERO).await;
    }
}
