//! `sonde_target_in_maintenance`: 1 while a maintenance window covers a target, 0
//! otherwise, for the targets some window selects. Written with the periodic series, at
//! once when a window starts or ends, and when the windows change.

use super::*;
use crate::maintenance::Windows;

/// The name of the series.
pub const IN_MAINTENANCE: &str = "sonde_target_in_maintenance";

/// A target's `sonde_target_in_maintenance` as last written.
#[derive(Clone, Debug)]
pub(super) struct WrittenFlag {
    series: Series,
    last_ms: i64,
}

impl State {
    /// Installs the windows in force and writes what they change at once.
    pub fn set_maintenance(&mut self, windows: Arc<Windows>, now_ms: i64, ch: &mut Changes) {
        self.maintenance = windows;
        self.write_maintenance(now_ms, ch);
    }

    /// Writes `sonde_target_in_maintenance` for every target some window selects, and
    /// staleness markers for the targets no window selects any more (or gone).
    pub(super) fn write_maintenance(&mut self, now_ms: i64, ch: &mut Changes) {
        self.maintenance_next_change_ms = self
            .maintenance
            .next_change_after(now_ms)
            .unwrap_or(i64::MAX);
        if self.maintenance.selects_nothing(now_ms) && self.maintenance_written.is_empty() {
            return;
        }
        ch.undo
            .maintenance_written
            .get_or_insert_with(|| self.maintenance_written.clone());
        let windows = self.maintenance.clone();
        let mut written = std::mem::take(&mut self.maintenance_written);
        let mut now_written = BTreeMap::new();
        if !windows.selects_nothing(now_ms) {
            for (key, entry) in &self.entries {
                if !windows.could_match(&entry.base, now_ms) {
                    continue;
                }
                let flag = match written.remove(key) {
                    Some(f) if same_labels(&f, entry) => f,
                    Some(old) => {
                        ch.out
                            .push(sample(old.series, now_ms.max(old.last_ms + 1), stale_nan()));
                        fresh_flag(entry)
                    }
                    None => fresh_flag(entry),
                };
                let value = f64::from(u8::from(windows.active(&entry.base, now_ms).is_some()));
                let ts = now_ms.max(flag.last_ms + 1);
                ch.out.push(sample(flag.series.clone(), ts, value));
                now_written.insert(
                    key.clone(),
                    WrittenFlag {
                        series: flag.series,
                        last_ms: ts,
                    },
                );
            }
        }
        for (_, gone) in written {
            ch.out.push(sample(
                gone.series,
                now_ms.max(gone.last_ms + 1),
                stale_nan(),
            ));
        }
        self.maintenance_written = now_written;
    }
}

fn fresh_flag(entry: &TargetEntry) -> WrittenFlag {
    WrittenFlag {
        series: entry.base.merged(IN_MAINTENANCE),
        last_ms: 0,
    }
}

/// True when the flag's series carries the target's current labels (file_sd may change
/// them; the old series then gets a staleness marker).
fn same_labels(flag: &WrittenFlag, entry: &TargetEntry) -> bool {
    let without_name = |s: &Series| {
        s.labels()
            .iter()
            .filter(|(k, _)| &**k != "__name__")
            .cloned()
            .collect::<Vec<_>>()
    };
    without_name(&flag.series) == without_name(&entry.merged_series.up)
}
