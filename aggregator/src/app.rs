//! The running aggregator: the store, the hub, its outputs (one remote-write queue per
//! endpoint), and reloading. The binary and the tests build it the same way.

use crate::config::AggregatorConfig;
use crate::fleet::now_ms;
use crate::hub::{Durable, Hub, Output};
use crate::remote_write::RemoteWriter;
use crate::series::Samples;
use crate::store::Store;
use sonde_proto::config::ConfigError;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Commits the hub's series and state changes, and hands the series to every
/// remote-write endpoint; endpoints are swapped whole on reload.
pub struct Outputs {
    store: Arc<Store>,
    writers: RwLock<Vec<Arc<RemoteWriter>>>,
}

impl Output for Outputs {
    fn commit(&self, samples: &Samples, durable: &Durable) -> Result<(), String> {
        let writers = self.writers.read().unwrap_or_else(|e| e.into_inner());
        self.store.with_tx(|tx| {
            durable.apply(tx)?;
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
    /// The aggregator's database (the history's queries read it).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
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
    pub started_ms: i64,
    /// The gRPC port's TLS, swapped on reload.
    pub fleet_tls: Arc<crate::fleet::listener::FleetTls>,
    /// Where agents connect, once the server is listening.
    pub grpc_address: std::sync::OnceLock<std::net::SocketAddr>,
}

impl App {
    /// Opens the store under `storage` (`None`: in memory, nothing survives a restart),
    /// restores what it remembers, and starts one remote-write queue per endpoint.
    pub async fn start(
        config: AggregatorConfig,
        config_file: Option<PathBuf>,
        storage: Option<&Path>,
    ) -> Result<Arc<Self>, String> {
        let store = Arc::new(match storage {
            Some(dir) => Store::open(dir)?,
            None => Store::in_memory()?,
        });
        let config = Arc::new(config);
        let outputs = Arc::new(Outputs {
            writers: RwLock::new(start_writers(&config, &store)?),
            store: store.clone(),
        });
        let hub = Arc::new(Hub::new(config, outputs.clone(), now_ms()));
        hub.restore(store.load_agents()?, store.load_jobs()?).await;
        Ok(Arc::new(Self {
            hub,
            outputs,
            config_file,
            started_ms: now_ms(),
            fleet_tls: Default::default(),
            grpc_address: std::sync::OnceLock::new(),
        }))
    }

    /// `/-/ready`: the config is loaded and the queues restored once the App exists, so
    /// what remains is whether the store takes commits.
    pub fn readiness(&self) -> Result<(), String> {
        match self.hub.storage.failing() {
            Some(e) => Err(format!(
                "the store refuses commits ({e}); results are not acked until it recovers"
            )),
            None => Ok(()),
        }
    }

    /// Re-reads the config file; on any problem the running config stays.
    pub async fn reload(&self) -> Result<(), String> {
        let Some(file) = &self.config_file else {
            return Err(
                "the built-in all-in-one config cannot be reloaded; start with --config.file"
                    .into(),
            );
        };
        let config = AggregatorConfig::load(file).map_err(|e: ConfigError| e.to_string())?;
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
        self.hub.reload(config, now_ms()).await;
        tracing::info!(file = %file.display(), "config reloaded");
        Ok(())
    }

    /// Flushes the remote-write queues for up to `grace`.
    pub async fn shutdown(&self, grace: Duration) {
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
) -> Result<Vec<Arc<RemoteWriter>>, String> {
    // Queues of endpoints no longer configured keep their samples; say so once.
    crate::remote_write::report_unconfigured_queues(store, &config.remote_write)?;
    config
        .remote_write
        .iter()
        .map(|rw| {
            RemoteWriter::start(rw.clone(), &config.external_labels, store.clone()).map(Arc::new)
        })
        .collect()
}
