//! `sonde_target_in_maintenance`: 1 while a maintenance window covers a target, 0
//! otherwise, for the targets some window selects; `sonde_agent_in_maintenance` the same
//! for agents. Written with the periodic series, at once when a window starts or ends,
//! and when the windows change. An agent in maintenance keeps its views, but no
//! target's tally counts them: its targets are merged from the other agents' views.

use super::*;
use crate::maintenance::Windows;

/// The name of the series.
pub const IN_MAINTENANCE: &str = "sonde_target_in_maintenance";

/// The name of the agents' series.
pub const AGENT_IN_MAINTENANCE: &str = "sonde_agent_in_maintenance";

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
        self.update_agents_in_maintenance(now_ms, ch);
        self.write_agent_flags(now_ms, ch);
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

impl State {
    /// Moves agents into and out of maintenance as the windows say at `now_ms`: the
    /// targets they have views of stop or start counting them, and are merged again at
    /// once.
    pub(super) fn update_agents_in_maintenance(&mut self, now_ms: i64, ch: &mut Changes) {
        let windows = self.maintenance.clone();
        let now_in: BTreeSet<Arc<str>> = if windows.selects_agents() {
            self.agents
                .values()
                .filter(|a| windows.active_for_agent(&a.id, &a.labels, now_ms).is_some())
                .map(|a| a.id.clone())
                .collect()
        } else {
            BTreeSet::new()
        };
        if now_in == self.agents_in_maintenance {
            return;
        }
        let changed: Vec<(Arc<str>, bool)> = now_in
            .symmetric_difference(&self.agents_in_maintenance)
            .map(|agent| (agent.clone(), !now_in.contains(agent)))
            .collect();
        for (agent, counted) in &changed {
            tracing::info!(agent = %agent, in_maintenance = !counted, "agent maintenance changed: its views {} toward up", if *counted { "count again" } else { "no longer count" });
        }
        ch.undo
            .agents_in_maintenance
            .get_or_insert_with(|| self.agents_in_maintenance.clone());
        let mut touched = Vec::new();
        for entry in self.entries.values_mut() {
            let mut any = false;
            for (agent, counted) in &changed {
                any |= entry.count_agent(agent, *counted);
            }
            if any {
                touched.push(entry.key.clone());
            }
        }
        self.agents_in_maintenance = now_in;
        for key in touched {
            self.evaluate(&key, now_ms, false, ch);
        }
    }

    /// Writes `sonde_agent_in_maintenance` for every agent some window selects (1 for
    /// those [`State::update_agents_in_maintenance`] put in maintenance), and staleness
    /// markers for the agents no window selects any more (or forgotten).
    fn write_agent_flags(&mut self, now_ms: i64, ch: &mut Changes) {
        if self.agent_flags_written.is_empty() && !self.maintenance.selects_agents() {
            return;
        }
        let windows = self.maintenance.clone();
        let mut before = std::mem::take(&mut self.agent_flags_written);
        ch.undo
            .agent_flags_written
            .get_or_insert_with(|| before.clone());
        let mut now_written = BTreeMap::new();
        for (id, agent) in &self.agents {
            if !windows.could_match_agent(id, &agent.labels, now_ms) {
                continue;
            }
            let last_ms = before.remove(id).unwrap_or(0);
            let ts = now_ms.max(last_ms + 1);
            let active = self.agents_in_maintenance.contains(id.as_str());
            ch.out.push(sample(
                crate::labels::agent(AGENT_IN_MAINTENANCE, id),
                ts,
                f64::from(u8::from(active)),
            ));
            now_written.insert(id.clone(), ts);
        }
        for (id, last_ms) in before {
            ch.out.push(sample(
                crate::labels::agent(AGENT_IN_MAINTENANCE, &id),
                now_ms.max(last_ms + 1),
                stale_nan(),
            ));
        }
        self.agent_flags_written = now_written;
    }

    /// True while an active window selects `agent`: its views do not count.
    pub fn agent_in_maintenance(&self, agent: &str) -> bool {
        self.agents_in_maintenance.contains(agent)
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
