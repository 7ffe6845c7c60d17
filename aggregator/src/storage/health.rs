//! Whether the aggregator's store is accepting commits, for `/-/ready`,
//! `sonde_storage_errors_total` and the fleet service (which stops acking while it fails).

use super::StoreError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct StorageHealth {
    /// The last commit's error, while commits fail; `None` once one succeeds.
    failing: Mutex<Option<Arc<StoreError>>>,
    errors: AtomicU64,
}

impl StorageHealth {
    /// A commit failed with `error`.
    pub fn failed(&self, error: &Arc<StoreError>) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing.is_none() {
            tracing::error!(
                error = %error,
                "the store refuses commits: acks stop until it recovers"
            );
        }
        *failing = Some(error.clone());
    }

    /// A commit succeeded.
    pub fn succeeded(&self) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing.take().is_some() {
            tracing::info!("the store accepts commits again");
        }
    }

    /// `sonde_storage_errors_total`.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The error of the last failed commit, while the store fails.
    pub fn failing(&self) -> Option<Arc<StoreError>> {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
