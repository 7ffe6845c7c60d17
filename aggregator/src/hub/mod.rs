//! The aggregator's hub: the state machine of the `sonde-hub` crate, and the threads
//! that run it and carry out what it decides.
//!
//! - [`state`] (`sonde_hub::state`): the state machine itself — agents, targets, their
//!   views and the series they turn into — plain synchronous code with no I/O: every
//!   input changes it and returns, as data, the samples and durable changes to commit
//!   and the messages to send or streams to end;
//! - [`snapshot`]: a read-only copy for the web handlers;
//! - [`placement`]: which agents probe which target (`agents_per_target`).
//!
//! Threads, so that neither SQLite nor a slow reader ever stalls the fleet's streams or
//! the Tokio workers:
//! - the **ingest thread** owns the [`State`] and the agents' streams; the streams, the
//!   ticker, reloads and discovery send it commands. It applies every command waiting
//!   in its queue (sending the assignments and ending the streams each one queued as
//!   soon as it is applied, before the next), then
//!   hands the whole group's changes to the storage thread in one piece (group commit
//!   across agents and batches) and goes on with the next group meanwhile. While
//!   batches keep coming it hands over at most once per gather window (20 ms), so that
//!   at a real fleet's shape, about one result per batch, a commit carries tens of
//!   batches; between hand-overs it waits on the commit or a timer, not on its queue,
//!   so a stream's command wakes nobody. After a quiet spell longer than the window
//!   the first batch goes at once;
//! - the **storage thread** commits a group in one transaction (the agents' sequence
//!   numbers and every remote-write queue together) and reports back;
//! - the **discovery thread** collects every job's targets once a second: file_sd
//!   files that changed, and the latest lists of the background sources (`targets`).
//!
//! A group's acks (and a reload's or a tick's completion) are answered only after its
//! commit. If a commit fails, the group and the one applied after it are rolled back,
//! in reverse, from their undo logs, so the state again shows only what is stored, and
//! their results are answered with an error (the streams offer them again). Web
//! handlers read snapshots taken between groups and published once the commit of
//! everything they show succeeded.

mod ingest;
pub mod snapshot;
#[cfg(test)]
mod tests;

pub use snapshot::AgentSummary;
pub use snapshot::Snapshot;
pub use sonde_hub::HubCounters;
pub use sonde_hub::model::{IncomingResult, ProbeSample};
pub use sonde_hub::{budget, placement, state};
pub use state::{AgentEntry, Durable, JobEntry, LastResult, Outgoing, State, TargetEntry};

use crate::config::AggregatorConfig;
use crate::refusals::Refusals;
use crate::series::Samples;
use crate::storage::StoreError;
use crate::storage::health::StorageHealth;
use crate::targets::{Discovery, TargetSet};
use sonde_proto::config::Labels;
use sonde_proto::pb::{self, AggregatorMessage};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Where the stream to one connected agent can be written.
pub type AgentSender = mpsc::Sender<Result<AggregatorMessage, tonic::Status>>;

/// Where the series and durable changes the hub produces go. `commit` stores every
/// sample in every output queue and applies the durable changes in one transaction:
/// all of it, or none of it.
pub trait Output: Send + Sync {
    fn commit(&self, samples: &Samples, durable: &Durable) -> Result<(), StoreError>;
}

/// Why [`Hub::results`] did not take a batch.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// The store refused the commit; nothing of the batch was kept. Retry later. Shared
    /// by every batch of the group that failed.
    #[error("the store refused the commit: {0}")]
    Storage(#[source] Arc<StoreError>),
    #[error("the aggregator is shutting down")]
    Stopped,
}

/// Tells one stream to end, and why.
#[derive(Default)]
pub struct Kick {
    notify: tokio::sync::Notify,
    reason: std::sync::Mutex<String>,
}

impl Kick {
    fn kick(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.notify.notify_one();
    }

    /// Waits until the stream is told to end; returns why.
    pub async fn kicked(&self) -> String {
        self.notify.notified().await;
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the threads share with the handle.
pub(crate) struct Shared {
    pub counters: HubCounters,
    pub storage: StorageHealth,
    pub refusals: Arc<Refusals>,
    config: RwLock<Arc<AggregatorConfig>>,
    discovery: Mutex<Discovery>,
    /// Discovery's self-metrics, read without taking `discovery`'s lock.
    discovery_counters: Arc<crate::targets::DiscoveryCounters>,
}

impl Shared {
    /// Every job's targets under `config`: file_sd files re-read if they changed, the
    /// background sources' latest lists.
    fn discover(&self, config: &AggregatorConfig) -> TargetSet {
        self.discovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .targets(&config.jobs)
    }
}

/// An answer that comes once the command is applied (and, where it matters,
/// committed): `.await` it in async code, [`Reply::wait`] it elsewhere. If the hub has
/// stopped, the answer is the one for a stopped hub.
pub struct Reply<T> {
    rx: oneshot::Receiver<T>,
    stopped: fn() -> T,
}

impl<T> Reply<T> {
    /// Blocks until the answer comes (not from inside a Tokio runtime).
    pub fn wait(self) -> T {
        self.rx.blocking_recv().unwrap_or_else(|_| (self.stopped)())
    }
}

impl<T> std::future::Future for Reply<T> {
    type Output = T;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        let stopped = self.stopped;
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| stopped()))
    }
}

/// The inputs of the state machine.
pub(crate) enum Command {
    Results {
        agent: String,
        batch: Arc<[IncomingResult]>,
        now_ms: i64,
        reply: oneshot::Sender<Result<Option<u64>, ResultsError>>,
    },
    Connect {
        hello: Box<pb::Hello>,
        labels: Labels,
        credential: Option<String>,
        sender: AgentSender,
        now_ms: i64,
        reply: oneshot::Sender<Result<Connected, String>>,
    },
    Disconnect {
        agent: String,
        connection: u64,
        now_ms: i64,
    },
    DisconnectAll {
        now_ms: i64,
        reply: oneshot::Sender<()>,
    },
    Heartbeat {
        agent: String,
        agent_time_ms: i64,
        now_ms: i64,
    },
    AssignmentReport {
        agent: String,
        report: Box<pb::AssignmentReport>,
    },
    Tick {
        now_ms: i64,
        reply: oneshot::Sender<()>,
    },
    Reload {
        config: Arc<AggregatorConfig>,
        targets: TargetSet,
        now_ms: i64,
        reply: oneshot::Sender<()>,
    },
    Maintenance {
        windows: Arc<sonde_hub::maintenance::Windows>,
        now_ms: i64,
        reply: oneshot::Sender<()>,
    },
    Restore {
        agents: Vec<crate::storage::StoredAgent>,
        jobs: Vec<(String, i64)>,
        reply: oneshot::Sender<()>,
    },
    Targets {
        config: Arc<AggregatorConfig>,
        targets: TargetSet,
    },
    Snapshot {
        reply: oneshot::Sender<Arc<Snapshot>>,
    },
    Stop,
}

/// A connected stream: its id, and the handle that ends it.
#[derive(Clone, Default)]
pub struct Connected {
    pub connection: u64,
    pub kick: Arc<Kick>,
}

fn stopped_connect() -> Result<Connected, String> {
    Err("the aggregator is shutting down".into())
}

/// The handle the rest of the aggregator holds.
pub struct Hub {
    commands: std_mpsc::Sender<Command>,
    shared: Arc<Shared>,
    snapshot: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    stop_discovery: Mutex<Option<std_mpsc::Sender<()>>>,
    pub counters: Arc<CountersRef>,
    pub storage: Arc<StorageRef>,
    pub refusals: Arc<Refusals>,
}

/// Access to the shared counters through the handle (`hub.counters.results_received`).
pub struct CountersRef(Arc<Shared>);
impl std::ops::Deref for CountersRef {
    type Target = HubCounters;
    fn deref(&self) -> &HubCounters {
        &self.0.counters
    }
}

/// Access to the store's health through the handle (`hub.storage.failing()`).
pub struct StorageRef(Arc<Shared>);
impl std::ops::Deref for StorageRef {
    type Target = StorageHealth;
    fn deref(&self) -> &StorageHealth {
        &self.0.storage
    }
}

/// How often the discovery thread collects the discovered targets.
const DISCOVERY_EVERY: Duration = Duration::from_secs(1);

/// Web handlers share a snapshot younger than this.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_millis(500);

impl Hub {
    /// Starts the ingest, storage and discovery threads with `config`.
    pub fn new(config: Arc<AggregatorConfig>, output: Arc<dyn Output>, now_ms: i64) -> Self {
        let refusals = Arc::new(Refusals::default());
        let discovery = Discovery::default();
        let discovery_counters = discovery.counters();
        let shared = Arc::new(Shared {
            counters: HubCounters::default(),
            storage: StorageHealth::default(),
            refusals: refusals.clone(),
            config: RwLock::new(config.clone()),
            discovery: Mutex::new(discovery),
            discovery_counters,
        });
        let targets = shared.discover(&config);
        let state = State::new(Arc::new(config.hub()), targets, now_ms);
        let applied = config.clone();
        let (commands, rx) = std_mpsc::channel();
        let (jobs_tx, jobs_rx) = std_mpsc::sync_channel::<(Samples, Durable)>(1);
        let mut threads = Vec::new();
        // The commits' outcomes come back on a channel of their own, which the ingest
        // thread waits on while a group is in flight (see `ingest_thread`).
        let (committed_tx, committed_rx) = std_mpsc::channel();
        threads.push(
            std::thread::Builder::new()
                .name("sonde-storage".into())
                .spawn(move || ingest::storage_thread(output, jobs_rx, committed_tx))
                .expect("cannot start the storage thread"),
        );
        let ingest_shared = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("sonde-ingest".into())
                .spawn(move || {
                    ingest::ingest_thread(state, applied, rx, jobs_tx, committed_rx, ingest_shared)
                })
                .expect("cannot start the ingest thread"),
        );
        let (stop_tx, stop_rx) = std_mpsc::channel::<()>();
        let discovery_shared = shared.clone();
        let discovery_commands = commands.clone();
        threads.push(
            std::thread::Builder::new()
                .name("sonde-discovery".into())
                .spawn(move || {
                    ingest::discovery_thread(discovery_shared, discovery_commands, stop_rx)
                })
                .expect("cannot start the discovery thread"),
        );
        Self {
            commands,
            counters: Arc::new(CountersRef(shared.clone())),
            storage: Arc::new(StorageRef(shared.clone())),
            refusals,
            shared,
            snapshot: Mutex::new(None),
            threads: Mutex::new(threads),
            stop_discovery: Mutex::new(Some(stop_tx)),
        }
    }

    fn send<T>(
        &self,
        stopped: fn() -> T,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Reply<T> {
        let (tx, rx) = oneshot::channel();
        // A closed channel means the ingest thread has stopped: the reply's sender is
        // dropped with the command, and the answer is `stopped`'s.
        let _ = self.commands.send(make(tx));
        Reply { rx, stopped }
    }

    /// Takes back what the store remembers from before a restart: agents (disconnected
    /// until they say hello again, with their committed sequence numbers) and when each
    /// job started being expected.
    pub fn restore(
        &self,
        agents: Vec<crate::storage::StoredAgent>,
        jobs: Vec<(String, i64)>,
    ) -> Reply<()> {
        self.send(
            || (),
            |reply| Command::Restore {
                agents,
                jobs,
                reply,
            },
        )
    }

    pub fn config(&self) -> Arc<AggregatorConfig> {
        self.shared
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// An agent said hello (already authenticated, with `labels` the ones it may have):
    /// register it and send its assignment. A newer connection of the same agent
    /// replaces the older one.
    pub fn connect(
        &self,
        hello: &pb::Hello,
        labels: Labels,
        credential: Option<String>,
        sender: AgentSender,
        now_ms: i64,
    ) -> Reply<Result<Connected, String>> {
        self.send(stopped_connect, |reply| Command::Connect {
            hello: Box::new(hello.clone()),
            labels,
            credential,
            sender,
            now_ms,
            reply,
        })
    }

    /// The stream of `connection` ended.
    pub fn disconnect(&self, agent: &str, connection: u64, now_ms: i64) {
        let _ = self.commands.send(Command::Disconnect {
            agent: agent.to_string(),
            connection,
            now_ms,
        });
    }

    /// Forgets every stream (at shutdown).
    pub fn disconnect_all(&self, now_ms: i64) -> Reply<()> {
        self.send(|| (), |reply| Command::DisconnectAll { now_ms, reply })
    }

    /// A heartbeat stamped `agent_time_ms` by the agent's clock.
    pub fn heartbeat(&self, agent: &str, agent_time_ms: i64, now_ms: i64) {
        let _ = self.commands.send(Command::Heartbeat {
            agent: agent.to_string(),
            agent_time_ms,
            now_ms,
        });
    }

    /// What `agent` reports doing with its assignment (see [`State::assignment_report`]).
    pub fn assignment_report(&self, agent: &str, report: &pb::AssignmentReport) {
        let _ = self.commands.send(Command::AssignmentReport {
            agent: agent.to_string(),
            report: Box::new(report.clone()),
        });
    }

    /// Takes a batch of results from `agent`; answers with the sequence number to ack
    /// once everything the batch changed is committed. See [`State::results`].
    pub fn results(
        &self,
        agent: &str,
        batch: Arc<[IncomingResult]>,
        now_ms: i64,
    ) -> Reply<Result<Option<u64>, ResultsError>> {
        self.send(
            || Err(ResultsError::Stopped),
            |reply| Command::Results {
                agent: agent.to_string(),
                batch,
                now_ms,
                reply,
            },
        )
    }

    /// Discovery's self-metrics (failed refreshes per mechanism).
    pub fn discovery_counters(&self) -> Arc<crate::targets::DiscoveryCounters> {
        self.shared.discovery_counters.clone()
    }

    /// Re-evaluates freshness and missing jobs and agents; call about once a second.
    pub fn tick(&self, now_ms: i64) -> Reply<()> {
        self.send(|| (), |reply| Command::Tick { now_ms, reply })
    }

    /// Applies a new config (see [`State::reload`]); its targets are collected here,
    /// by the caller.
    pub fn reload(&self, config: Arc<AggregatorConfig>, now_ms: i64) -> Reply<()> {
        let targets = self.shared.discover(&config);
        *self
            .shared
            .config
            .write()
            .unwrap_or_else(|e| e.into_inner()) = config.clone();
        self.send(
            || (),
            |reply| Command::Reload {
                config,
                targets,
                now_ms,
                reply,
            },
        )
    }

    /// Installs the maintenance windows in force (the config's and the API's); answered
    /// once the series they change are committed.
    pub fn set_maintenance(
        &self,
        windows: Arc<sonde_hub::maintenance::Windows>,
        now_ms: i64,
    ) -> Reply<()> {
        self.send(
            || (),
            |reply| Command::Maintenance {
                windows,
                now_ms,
                reply,
            },
        )
    }

    /// A snapshot of the state no older than half a second, everything in it committed.
    pub async fn snapshot(&self) -> Arc<Snapshot> {
        if let Some(s) = self.cached_snapshot() {
            return s;
        }
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Snapshot { reply: tx });
        let s = rx
            .await
            .unwrap_or_else(|_| Arc::new(Snapshot::empty(self.config())));
        self.cache_snapshot(&s);
        s
    }

    /// [`Hub::snapshot`] for code outside a Tokio runtime (tests, benches).
    pub fn snapshot_blocking(&self) -> Arc<Snapshot> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Snapshot { reply: tx });
        rx.blocking_recv()
            .unwrap_or_else(|_| Arc::new(Snapshot::empty(self.config())))
    }

    fn cached_snapshot(&self) -> Option<Arc<Snapshot>> {
        let cache = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .as_ref()
            .filter(|(at, _)| at.elapsed() < SNAPSHOT_MAX_AGE)
            .map(|(_, s)| s.clone())
    }

    fn cache_snapshot(&self, s: &Arc<Snapshot>) {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), s.clone()));
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop_discovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let _ = self.commands.send(Command::Stop);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}
