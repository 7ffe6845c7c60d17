//! The running aggregator: the store, the hub, its outputs (one remote-write queue per
//! endpoint), and reloading. The binary and the tests build it the same way.

use crate::config::{AggregatorConfig, OpenFleet};
use crate::delivery::RemoteWriter;
use crate::fleet::listener::FleetTlsError;
use crate::fleet::now_ms;
use crate::hub::{Durable, Hub, Output};
use crate::remote_write::RemoteWriteError;
use crate::series::Samples;
use crate::storage::{HistoryReader, Store, StoreError, StoredHistory};
use sonde_proto::config::ConfigError;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Why the aggregator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    RemoteWrite(#[from] RemoteWriteError),
}

/// Why a reload did not happen; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the built-in all-in-one config cannot be reloaded; start with --config.file")]
    BuiltIn,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    OpenFleet(#[from] OpenFleet),
    #[error(transparent)]
    FleetTls(#[from] FleetTlsError),
    #[error(transparent)]
    RemoteWrite(#[from] RemoteWriteError),
}

/// Why a maintenance window was not added or deleted.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error(
        "a maintenance window named {0:?} exists already; delete it first or choose another name"
    )]
    NameTaken(String),
    #[error("the config file has a maintenance window named {0:?}; choose another name")]
    NameInConfig(String),
    #[error("maintenance window {0:?} comes from the config file; remove it there and reload")]
    FromConfig(String),
    #[error("no maintenance window named {0:?} was added through the API")]
    NotFound(String),
    #[error("cannot store the maintenance window: {0}")]
    Store(#[from] StoreError),
    #[error("the aggregator is shutting down: {0}")]
    Stopped(String),
}

/// Why the aggregator is not ready (`/-/ready` answers 503 with it).
#[derive(Debug, thiserror::Error)]
#[error("the store refuses commits ({reason}); results are not acked until it recovers")]
pub struct NotReady {
    /// The last commit's error.
    #[source]
    pub reason: Arc<StoreError>,
}

/// Commits the hub's series and state changes, and hands the series to every
/// remote-write endpoint; endpoints are swapped whole on reload.
pub struct Outputs {
    store: Arc<Store>,
    /// The history's read side, for the pages.
    history: Arc<StoredHistory>,
    writers: RwLock<Vec<Arc<RemoteWriter>>>,
}

impl Output for Outputs {
    fn commit(&self, samples: &Samples, durable: &Durable) -> Result<(), StoreError> {
        let writers = self.writers.read().unwrap_or_else(|e| e.into_inner());
        self.store.transaction(|tx| {
            crate::storage::apply_durable(tx, durable)?;
            for w in writers.iter() {
                w.enqueue(tx, samples)?;
            }
            Ok(())
        })?;
        for w in writers.iter() {
            w.wake();
        }
        Ok(())
    }
}

impl Outputs {
    /// The aggregator's database (for the history's upkeep).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The history, read-only, as the pages and the history API read it.
    pub fn history(&self) -> Arc<dyn HistoryReader> {
        self.history.clone()
    }

    pub fn writers(&self) -> Vec<Arc<RemoteWriter>> {
        self.writers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct App {
    pub hub: Arc<Hub>,
    pub outputs: Arc<Outputs>,
    /// Where the config comes from; `None` for the built-in all-in-one config.
    pub config_file: Option<PathBuf>,
    /// When this run started, and its key in the history's record of runs (the time
    /// between one run's last sign of life and the next one's start is a gap).
    pub started_ms: i64,
    /// The gRPC port's TLS, swapped on reload.
    pub fleet_tls: Arc<crate::fleet::listener::FleetTls>,
    /// Where agents connect, once the server is listening.
    pub grpc_address: std::sync::OnceLock<std::net::SocketAddr>,
    /// How the last reload went (`sonde_config_last_reload_*`, the status page's banner).
    pub reload_status: std::sync::Mutex<ReloadStatus>,
    /// The maintenance windows added through the API (deleted ones included, see
    /// [`crate::storage::maintenance`]); the lock also keeps additions and deletions
    /// in order with what the hub is told.
    pub maintenance_api: tokio::sync::Mutex<Vec<crate::maintenance::Window>>,
}

/// The outcome of the last reload, as Prometheus reports its own.
#[derive(Clone, Debug, PartialEq)]
pub struct ReloadStatus {
    pub successful: bool,
    /// When the config in use was loaded (at start, or by the last good reload).
    pub last_success_ms: i64,
    /// The last failed reload: when, and why.
    pub last_failure: Option<(i64, String)>,
}

impl App {
    /// Opens the store under `storage` (`None`: in memory, nothing survives a restart),
    /// restores what it remembers, and starts one remote-write queue per endpoint.
    pub async fn start(
        config: AggregatorConfig,
        config_file: Option<PathBuf>,
        storage: Option<&Path>,
    ) -> Result<Arc<Self>, StartError> {
        let store = Arc::new(match storage {
            Some(dir) => Store::open(dir)?,
            None => Store::in_memory()?,
        });
        let started_ms = store.begin_run(now_ms()).map_err(|e| store.failed(e))?;
        let config = Arc::new(config);
        let outputs = Arc::new(Outputs {
            writers: RwLock::new(start_writers(&config, &store)?),
            history: Arc::new(StoredHistory::new(store.clone())),
            store: store.clone(),
        });
        let hub = Arc::new(Hub::new(config.clone(), outputs.clone(), now_ms()));
        hub.restore(store.load_agents()?, store.load_jobs()?).await;
        let api_windows = store.load_maintenance()?;
        hub.set_maintenance(
            Arc::new(crate::maintenance::combined(
                &config.maintenance,
                &api_windows,
            )),
            now_ms(),
        )
        .await;
        Ok(Arc::new(Self {
            hub,
            outputs,
            config_file,
            started_ms,
            fleet_tls: Default::default(),
            grpc_address: std::sync::OnceLock::new(),
            reload_status: std::sync::Mutex::new(ReloadStatus {
                successful: true,
                last_success_ms: now_ms(),
                last_failure: None,
            }),
            maintenance_api: tokio::sync::Mutex::new(api_windows),
        }))
    }

    /// `/-/ready`: the config is loaded and the queues restored once the App exists, so
    /// what remains is whether the store takes commits.
    pub fn readiness(&self) -> Result<(), NotReady> {
        match self.hub.storage.failing() {
            Some(reason) => Err(NotReady { reason }),
            None => Ok(()),
        }
    }

    /// Re-reads the config file; on any problem the running config stays.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let result = self.reload_config().await;
        let mut status = self.reload_status.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(()) => {
                status.successful = true;
                status.last_success_ms = now_ms();
            }
            Err(e) => {
                status.successful = false;
                status.last_failure = Some((now_ms(), e.to_string()));
            }
        }
        result
    }

    async fn reload_config(&self) -> Result<(), ReloadError> {
        let Some(file) = &self.config_file else {
            return Err(ReloadError::BuiltIn);
        };
        let config = AggregatorConfig::load(file)?;
        if let Some(grpc) = self.grpc_address.get() {
            config.check_listen_address(*grpc)?;
            // Certificates are re-read on every reload (renewed files take effect);
            // a problem with them fails the reload before anything changes.
            self.fleet_tls.load(config.tls.as_ref())?;
        }
        let old = self.hub.config();
        let config = Arc::new(config);
        if old.remote_write != config.remote_write || old.external_labels != config.external_labels
        {
            let new_writers = start_writers(&config, &self.outputs.store)?;
            let old_writers = std::mem::replace(
                &mut *self
                    .outputs
                    .writers
                    .write()
                    .unwrap_or_else(|e| e.into_inner()),
                new_writers,
            );
            // The replaced endpoints get a short while to flush what they hold.
            futures::future::join_all(
                old_writers
                    .iter()
                    .map(|w| w.shutdown(Duration::from_secs(10))),
            )
            .await;
        }
        let changes = describe_changes(&old, &config);
        let api_windows = self.maintenance_api.lock().await;
        self.hub.reload(config.clone(), now_ms()).await;
        self.hub
            .set_maintenance(
                Arc::new(crate::maintenance::combined(
                    &config.maintenance,
                    &api_windows,
                )),
                now_ms(),
            )
            .await;
        drop(api_windows);
        tracing::info!(
            file = %file.display(),
            changes = %if changes.is_empty() { "none".to_string() } else { changes.join("; ") },
            "config reloaded"
        );
        Ok(())
    }

    /// Adds a maintenance window through the API: stored first, then in force.
    pub async fn add_maintenance(
        &self,
        window: crate::maintenance::Window,
    ) -> Result<(), MaintenanceError> {
        let mut api = self.maintenance_api.lock().await;
        let config = self.hub.config();
        if config.maintenance.iter().any(|w| w.name == window.name) {
            return Err(MaintenanceError::NameInConfig(window.name));
        }
        let store = self.outputs.store.clone();
        let stored = window.clone();
        let added = tokio::task::spawn_blocking(move || store.add_maintenance(&stored, now_ms()))
            .await
            .map_err(|e| MaintenanceError::Stopped(e.to_string()))??;
        if !added {
            return Err(MaintenanceError::NameTaken(window.name));
        }
        api.push(window);
        self.hub
            .set_maintenance(
                Arc::new(crate::maintenance::combined(&config.maintenance, &api)),
                now_ms(),
            )
            .await;
        Ok(())
    }

    /// Deletes the API window `name`: from now on it selects nothing, and its past
    /// occurrences stay out of uptime for as long as the history is kept.
    pub async fn delete_maintenance(&self, name: &str) -> Result<(), MaintenanceError> {
        let mut api = self.maintenance_api.lock().await;
        let config = self.hub.config();
        let now = now_ms();
        let Some(window) = api.iter_mut().find(|w| w.name == name && w.is_live()) else {
            return Err(if config.maintenance.iter().any(|w| w.name == name) {
                MaintenanceError::FromConfig(name.to_string())
            } else {
                MaintenanceError::NotFound(name.to_string())
            });
        };
        let store = self.outputs.store.clone();
        let forget_before = now - config.history.retention.as_millis() as i64;
        let owned = name.to_string();
        tokio::task::spawn_blocking(move || store.delete_maintenance(&owned, now, forget_before))
            .await
            .map_err(|e| MaintenanceError::Stopped(e.to_string()))??;
        window.deleted_ms = Some(now);
        api.retain(|w| w.deleted_ms.is_none_or(|d| d >= forget_before));
        self.hub
            .set_maintenance(
                Arc::new(crate::maintenance::combined(&config.maintenance, &api)),
                now,
            )
            .await;
        Ok(())
    }

    /// Records that this run is alive now (see [`crate::history::Gap`]).
    pub async fn mark_alive(&self) {
        let store = self.outputs.store.clone();
        let run = self.started_ms;
        let marked = tokio::task::spawn_blocking(move || store.mark_alive(run, now_ms())).await;
        if let Ok(Err(e)) = marked {
            tracing::warn!(error = %e, "cannot record that the aggregator is running; a restart may show a longer gap in the history");
        }
    }

    /// Flushes the remote-write queues for up to `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.mark_alive().await;
        let writers = std::mem::take(
            &mut *self
                .outputs
                .writers
                .write()
                .unwrap_or_else(|e| e.into_inner()),
        );
        futures::future::join_all(writers.iter().map(|w| w.shutdown(grace))).await;
    }
}

fn start_writers(
    config: &AggregatorConfig,
    store: &Arc<Store>,
) -> Result<Vec<Arc<RemoteWriter>>, RemoteWriteError> {
    // Queues of endpoints no longer configured keep their samples; say so once.
    crate::delivery::report_unconfigured_queues(store, &config.remote_write)?;
    config
        .remote_write
        .iter()
        .map(|rw| {
            RemoteWriter::start(rw.clone(), &config.external_labels, store.clone()).map(Arc::new)
        })
        .collect()
}

/// What a reload changes, for its log line: jobs added, removed and changed, and the
/// other sections that differ.
pub fn describe_changes(old: &AggregatorConfig, new: &AggregatorConfig) -> Vec<String> {
    let mut out = Vec::new();
    let names = |c: &AggregatorConfig| -> std::collections::BTreeMap<String, String> {
        c.jobs
            .iter()
            .map(|j| (j.name.clone(), format!("{j:?}")))
            .collect()
    };
    let (before, after) = (names(old), names(new));
    let list = |v: Vec<&String>| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let changed: Vec<&String> = after
        .iter()
        .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
        .map(|(k, _)| k)
        .collect();
    if !added.is_empty() {
        out.push(format!("jobs added: {}", list(added)));
    }
    if !removed.is_empty() {
        out.push(format!("jobs removed: {}", list(removed)));
    }
    if !changed.is_empty() {
        out.push(format!("jobs changed: {}", list(changed)));
    }
    if old.remote_write != new.remote_write {
        out.push("remote_write changed".into());
    }
    if old.external_labels != new.external_labels {
        out.push("external_labels changed".into());
    }
    if old.tokens.len() != new.tokens.len() || old.auth_required != new.auth_required {
        out.push(format!(
            "agent tokens: {} → {}",
            old.tokens.len(),
            new.tokens.len()
        ));
    }
    if old.modules != new.modules {
        out.push("modules changed".into());
    }
    if old.limits != new.limits
        || old.missing_after != new.missing_after
        || old.forget_after != new.forget_after
    {
        out.push("fleet settings changed".into());
    }
    if old.history != new.history {
        out.push("history settings changed".into());
    }
    if old.maintenance != new.maintenance {
        out.push("maintenance windows changed".into());
    }
    out
}
