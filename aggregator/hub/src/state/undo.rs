//! Putting the state back as it was before a group whose commit failed. Views are put
//! back through [`TargetEntry::set_view`], so each target's tally (a function of its
//! views and of the agents in maintenance) is restored with them.

use super::*;

impl State {
    /// Puts back what `undo` recorded, newest change first.
    pub fn rollback(&mut self, mut undo: Undo) {
        self.evaluate_every_target();
        // When an agent's maintenance began or ended in the group, the tallies counted
        // its views differently before and after: they are rebuilt from the views.
        let excluded_before = undo.agents_in_maintenance.take();
        let retally = excluded_before.is_some();
        if let Some(excluded) = excluded_before {
            self.agents_in_maintenance = excluded;
        }
        for (key, agent, before) in undo.views.into_iter().rev() {
            if let Some(entry) = self.entries.get_mut(&*key) {
                if retally {
                    entry.put_view(agent, before);
                } else {
                    let counted = !self.agents_in_maintenance.contains(&agent);
                    entry.set_view(agent, before, counted);
                }
            }
        }
        for (key, written) in undo.written.into_iter().rev() {
            if let Some(e) = self.entries.get_mut(&*key) {
                e.merged = written.merged;
                e.last_written_ms = written.last_written_ms;
                e.up_live = written.up_live;
                e.history_state = written.history_state;
            }
        }
        for key in undo.created {
            self.entries.remove(&*key);
        }
        for (agent, held) in undo.series.into_iter().rev() {
            if let Some(a) = self.agents.get_mut(&*agent) {
                a.set_held(held);
            }
        }
        for (agent, key) in undo.local_targets {
            if let Some(a) = self.agents.get_mut(&agent) {
                a.local_targets.remove(&key);
            }
        }
        for (agent, seq) in undo.committed.into_iter().rev() {
            if let Some(a) = self.agents.get_mut(&*agent) {
                a.committed_seq = seq;
            }
        }
        if let Some(ms) = undo.last_meta_ms {
            self.last_meta_ms = ms;
        }
        if let Some(jobs) = undo.jobs_written {
            self.jobs_written = jobs;
        }
        for (agent, staled) in undo.staled {
            if let Some(a) = self.agents.get_mut(&agent) {
                a.series_staled = staled;
            }
        }
        for (id, agent) in undo.forgotten {
            self.agents.insert(id, agent);
        }
        self.retired.extend(undo.retired);
        if let Some(written) = undo.maintenance_written {
            self.maintenance_written = written;
            self.maintenance_next_change_ms = i64::MIN;
        }
        if let Some(written) = undo.agent_flags_written {
            self.agent_flags_written = written;
        }
        if retally {
            for entry in self.entries.values_mut() {
                entry.retally(&self.agents_in_maintenance);
            }
            self.maintenance_next_change_ms = i64::MIN;
        }
    }
}
