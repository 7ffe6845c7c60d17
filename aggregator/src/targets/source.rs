//! Background discovery sources: one Tokio task per `*_sd_configs` entry of a job,
//! publishing its latest target groups on a `watch` channel that [`super::Discovery`]
//! reads on every pass. A source keeps publishing its last good list until it has a
//! new one: a failed refresh is logged and counted, and changes nothing.

use super::Group;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The mechanisms that run in the background, for the failure counter's label values
/// (every one is reported from the start, at 0).
pub const BACKGROUND_MECHANISMS: [&str; 3] = ["http", "dns", "kubernetes"];

/// Discovery's self-metrics, shared by every source.
#[derive(Default)]
pub struct DiscoveryCounters {
    /// Failed refreshes per mechanism (`sonde_sd_refresh_failures_total{mechanism}`).
    failures: Mutex<BTreeMap<&'static str, Arc<AtomicU64>>>,
}

impl DiscoveryCounters {
    fn failures_of(&self, mechanism: &'static str) -> Arc<AtomicU64> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(mechanism)
            .or_default()
            .clone()
    }

    /// Failed refreshes per mechanism, every background mechanism listed.
    pub fn refresh_failures(&self) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> =
            BACKGROUND_MECHANISMS.iter().map(|m| (*m, 0)).collect();
        for (m, n) in self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            out.insert(m, n.load(Ordering::Relaxed));
        }
        out
    }
}

/// Where a background source hands over what it found. Given to the source's task
/// when it starts; dropped (and the task aborted) when its config goes away.
pub struct Publisher {
    job: String,
    mechanism: &'static str,
    tx: watch::Sender<Arc<Vec<Group>>>,
    failures: Arc<AtomicU64>,
}

impl Publisher {
    /// The job this source discovers targets for (for logs).
    pub fn job(&self) -> &str {
        &self.job
    }

    /// Replaces the source's groups with `groups`, its complete current list.
    pub fn publish(&self, groups: Vec<Group>) {
        self.tx.send_if_modified(|current| {
            if **current == groups {
                return false;
            }
            tracing::info!(
                job = %self.job,
                mechanism = self.mechanism,
                groups = groups.len(),
                targets = groups.iter().map(|g| g.targets.len()).sum::<usize>(),
                "discovered targets changed"
            );
            *current = Arc::new(groups);
            true
        });
    }

    /// Records a failed refresh: logged and counted; the last good list stays.
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            job = %self.job,
            mechanism = self.mechanism,
            error = %error,
            "discovery refresh failed; the targets found before are kept"
        );
    }

    /// Runs `refresh` now and then every `interval`, publishing each success and
    /// recording each failure: the loop of the mechanisms that poll (http, dns).
    pub async fn poll_every<F, Fut, E>(self, interval: Duration, mut refresh: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Vec<Group>, E>>,
        E: std::fmt::Display,
    {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match refresh().await {
                Ok(groups) => self.publish(groups),
                Err(e) => self.failed(&e),
            }
        }
    }
}

/// A background source to run: its mechanism's name and the task that feeds the
/// [`Publisher`] it is given.
pub struct Source {
    pub mechanism: &'static str,
    pub run: Box<dyn FnOnce(Publisher) -> futures::future::BoxFuture<'static, ()> + Send>,
}

impl Source {
    pub fn new<Fut>(
        mechanism: &'static str,
        run: impl FnOnce(Publisher) -> Fut + Send + 'static,
    ) -> Self
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            mechanism,
            run: Box::new(move |p| Box::pin(run(p))),
        }
    }
}

struct Running {
    rx: watch::Receiver<Arc<Vec<Group>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The running background sources, by key (job, mechanism, position and config: a
/// source whose config is unchanged by a reload keeps running and keeps its list).
pub(super) struct Sources {
    running: HashMap<String, Running>,
    /// Where the tasks run: the runtime that built the hub, or one of discovery's own
    /// when there is none (tools and tests that drive the hub without Tokio).
    runtime: Option<tokio::runtime::Handle>,
    own_runtime: Option<tokio::runtime::Runtime>,
    pub(super) counters: Arc<DiscoveryCounters>,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            running: HashMap::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            own_runtime: None,
            counters: Arc::default(),
        }
    }
}

impl Sources {
    /// The latest groups of the source under `key`, started with `make` if it is not
    /// running yet (a new source has no groups until its first refresh).
    pub(super) fn latest(
        &mut self,
        key: String,
        job: &str,
        make: impl FnOnce() -> Source,
    ) -> Arc<Vec<Group>> {
        if let Some(r) = self.running.get(&key) {
            return r.rx.borrow().clone();
        }
        let source = make();
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        let publisher = Publisher {
            job: job.to_string(),
            mechanism: source.mechanism,
            tx,
            failures: self.counters.failures_of(source.mechanism),
        };
        let task = self.handle().spawn((source.run)(publisher));
        tracing::info!(
            job,
            mechanism = source.mechanism,
            "discovery source started"
        );
        self.running.insert(key, Running { rx, task });
        Arc::new(Vec::new())
    }

    /// Stops every source whose key is not in `keep`.
    pub(super) fn retain(&mut self, keep: &std::collections::HashSet<String>) {
        self.running.retain(|key, r| {
            let kept = keep.contains(key);
            if !kept {
                r.task.abort();
            }
            kept
        });
    }

    fn handle(&mut self) -> tokio::runtime::Handle {
        if let Some(h) = &self.runtime {
            return h.clone();
        }
        let rt = self.own_runtime.get_or_insert_with(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("sonde-discovery-rt")
                .enable_all()
                .build()
                .expect("cannot start discovery's runtime")
        });
        rt.handle().clone()
    }
}

impl Drop for Sources {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
        // Dropping a runtime from inside another one panics; this never blocks.
        if let Some(rt) = self.own_runtime.take() {
            rt.shutdown_background();
        }
    }
}
