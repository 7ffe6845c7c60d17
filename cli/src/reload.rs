//! How the last config reload of this process went, for `/metrics`
//! (`sonde_config_last_reload_successful` and its timestamp, as Prometheus reports its
//! own): one per process, since a process has one config.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct ReloadStatus {
    successful: AtomicBool,
    /// Unix ms of the last good load (the start, or a reload); 0 before the first.
    last_success_ms: AtomicI64,
}

/// This process's.
pub static RELOAD: ReloadStatus = ReloadStatus::new();

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl ReloadStatus {
    pub const fn new() -> Self {
        Self {
            successful: AtomicBool::new(true),
            last_success_ms: AtomicI64::new(0),
        }
    }

    /// The config in use was loaded now (at start, or by a good reload).
    pub fn loaded(&self) {
        self.successful.store(true, Ordering::Relaxed);
        self.last_success_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A reload failed; the config loaded before stays in use.
    pub fn failed(&self) {
        self.successful.store(false, Ordering::Relaxed);
    }

    pub fn successful(&self) -> bool {
        self.successful.load(Ordering::Relaxed)
    }

    /// When the config in use was loaded, in Unix seconds.
    pub fn last_success_seconds(&self) -> f64 {
        self.last_success_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

impl Default for ReloadStatus {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_the_time_of_the_last_good_load() {
        let s = ReloadStatus::new();
        s.loaded();
        let at = s.last_success_seconds();
        assert!(s.successful() && at > 0.0);
        s.failed();
        assert!(!s.successful());
        assert_eq!(s.last_success_seconds(), at);
    }
}
