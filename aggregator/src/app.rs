//! The running aggregator: the hub, its outputs (one remote-write queue per endpoint),
//! and reloading. The binary and the tests build it the same way.

use crate::config::AggregatorConfig;
use crate::fleet::now_ms;
use crate::hub::{Hub, Output};
use crate::remote_write::RemoteWriter;
use crate::remote_write::encode::SeriesSample;
use sonde_proto::config::ConfigError;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Hands the hub's series to every remote-write endpoint; endpoints are swapped whole
/// on reload.
#[derive(Default)]
pub struct Outputs {
    writers: RwLock<Vec<Arc<RemoteWriter>>>,
}

impl Output for Outputs {
    fn write(&self, samples: Vec<SeriesSample>) {
        let writers = self.writers.read().unwrap_or_else(|e| e.into_inner());
        if let Some((last, rest)) = writers.split_last() {
            for w in rest {
                w.push(samples.clone());
            }
            last.push(samples);
        }
    }
}

impl Outputs {
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
    pub config_file: Option<std::path::PathBuf>,
    pub started_ms: i64,
}

impl App {
    pub fn start(
        config: AggregatorConfig,
        config_file: Option<std::path::PathBuf>,
    ) -> Result<Arc<Self>, String> {
        let config = Arc::new(config);
        let outputs = Arc::new(Outputs::default());
        *outputs.writers.write().unwrap_or_else(|e| e.into_inner()) = start_writers(&config)?;
        let hub = Arc::new(Hub::new(config, outputs.clone(), now_ms()));
        Ok(Arc::new(Self {
            hub,
            outputs,
            config_file,
            started_ms: now_ms(),
        }))
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
        let old = self.hub.config();
        let config = Arc::new(config);
        if old.remote_write != config.remote_write || old.external_labels != config.external_labels
        {
            let new_writers = start_writers(&config)?;
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
        self.hub.reload(config, now_ms());
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

fn start_writers(config: &AggregatorConfig) -> Result<Vec<Arc<RemoteWriter>>, String> {
    config
        .remote_write
        .iter()
        .map(|rw| RemoteWriter::start(rw.clone(), &config.external_labels).map(Arc::new))
        .collect()
}
