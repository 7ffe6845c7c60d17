//! The periodic series: missing jobs, target counts, agents' liveness, and agents
//! forgotten after `fleet.forget_after`.

use super::*;

pub(super) fn sample(series: Series, timestamp_ms: i64, value: f64) -> Sample {
    Sample {
        series,
        timestamp_ms,
        value,
    }
}

impl State {
    /// Re-evaluates freshness and missing jobs and agents; call about once a second.
    pub fn tick(&mut self, now_ms: i64, ch: &mut Changes) {
        if self.update_placeable(now_ms) && self.has_spread_jobs() {
            self.replan = true;
        }
        if std::mem::take(&mut self.replan) {
            self.send_assignments(None, ch);
        }
        self.write_retired(now_ms, ch);
        let meta_every = self.config.scrape_interval.as_millis() as i64;
        let meta_due = now_ms - self.last_meta_ms >= meta_every;
        // Before the evaluation: an agent entering or leaving maintenance changes what
        // its targets' merges count.
        if meta_due || now_ms >= self.maintenance_next_change_ms {
            self.write_maintenance(now_ms, ch);
        }
        self.evaluate_all(now_ms, ch);
        let minute = now_ms.div_euclid(history::MINUTE_MS) * history::MINUTE_MS;
        if minute > self.buckets_flushed_ms {
            self.flush_buckets(minute, ch);
            self.buckets_flushed_ms = minute;
        }
        // A job's missing signal follows its targets' at once, not at the next periodic
        // write: `sonde_job_missing` turns 1 on the tick its last target goes missing.
        let job_changed = self
            .jobs
            .iter()
            .any(|(name, j)| self.job_is_missing(name, now_ms).0 != j.missing);
        if meta_due || job_changed {
            let forgotten = self.write_meta(now_ms, ch);
            ch.durable.forgotten.extend(forgotten);
            ch.durable.jobs = self
                .jobs
                .iter()
                .map(|(n, j)| (n.clone(), j.expected_since_ms))
                .collect();
        }
    }

    /// Whether job `name` is missing now (see [`merge::job_missing`]), and how many
    /// targets it has (configured, or seen for local jobs).
    pub(super) fn job_is_missing(&self, name: &str, now_ms: i64) -> (bool, usize) {
        let entries = || {
            self.entries
                .range((name.to_string(), String::new())..)
                .take_while(|(k, _)| k.0 == name)
        };
        let with_entry = entries().count();
        let configured_targets = self.configured_targets(name);
        let expected_since = self.jobs.get(name).map_or(now_ms, |j| j.expected_since_ms);
        // Configured targets with no entry yet have no fresh result either.
        let missing = merge::job_missing(
            entries()
                .map(|(_, e)| e.merged.map_or(TargetState::Missing, |m| m.state))
                .chain(std::iter::repeat_n(
                    TargetState::Missing,
                    configured_targets.saturating_sub(with_entry),
                )),
            expected_since,
            now_ms,
            self.config.missing_after,
        );
        (missing, configured_targets.max(with_entry))
    }

    /// Per-job and per-agent series: missing jobs, target counts, agent liveness.
    /// Returns the agents forgotten (gone for longer than `forget_after`).
    pub(super) fn write_meta(&mut self, now_ms: i64, ch: &mut Changes) -> Vec<String> {
        let out = &mut ch.out;
        let undo = &mut ch.undo;
        let ts = now_ms.max(self.last_meta_ms + 1);
        undo.last_meta_ms.get_or_insert(self.last_meta_ms);
        self.last_meta_ms = ts;
        let grace = self.config.missing_after;
        let forget = self.config.forget_after;
        // Agents gone for longer than forget_after are dropped, their series staled.
        let forgotten: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| {
                a.connection.is_none() && now_ms - a.last_seen_ms >= forget.as_millis() as i64
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &forgotten {
            if let Some(agent) = self.agents.remove(id) {
                tracing::info!(agent = %id, "agent forgotten after forget_after");
                for name in [
                    "sonde_agent_up",
                    "sonde_agent_last_seen_timestamp_seconds",
                    "sonde_agent_clock_skew_seconds",
                ] {
                    out.push(sample(labels::agent(name, id), ts, stale_nan()));
                }
                out.push(sample(
                    labels::agent_info(id, &agent.labels),
                    ts,
                    stale_nan(),
                ));
                undo.forgotten.push((id.clone(), agent));
            }
        }
        let local: BTreeSet<String> = self
            .agents
            .values()
            .flat_map(|a| a.local_jobs.iter().cloned())
            .collect();
        self.jobs
            .retain(|name, j| j.config.is_some() || local.contains(name));
        let job_names: Vec<String> = self.jobs.keys().cloned().collect();
        let gone: Vec<String> = self
            .jobs_written
            .iter()
            .filter(|name| !self.jobs.contains_key(*name))
            .cloned()
            .collect();
        for name in &gone {
            for series in ["sonde_job_missing", "sonde_job_targets"] {
                out.push(sample(labels::job(series, name), ts, stale_nan()));
            }
        }
        let written: BTreeSet<String> = job_names.iter().cloned().collect();
        if written != self.jobs_written {
            let before = std::mem::replace(&mut self.jobs_written, written);
            undo.jobs_written.get_or_insert(before);
        }
        for name in job_names {
            let (missing, target_count) = self.job_is_missing(&name, now_ms);
            let Some(job) = self.jobs.get_mut(&name) else {
                continue;
            };
            if missing != job.missing {
                tracing::warn!(job = %name, missing, "job missing state changed");
            }
            job.missing = missing;
            out.push(sample(
                labels::job("sonde_job_missing", &name),
                ts,
                f64::from(u8::from(missing)),
            ));
            out.push(sample(
                labels::job("sonde_job_targets", &name),
                ts,
                target_count as f64,
            ));
        }
        for (id, agent) in &self.agents {
            let up = agent.is_up(now_ms, grace);
            out.push(sample(
                labels::agent("sonde_agent_up", id),
                ts,
                f64::from(u8::from(up)),
            ));
            out.push(sample(
                labels::agent("sonde_agent_last_seen_timestamp_seconds", id),
                ts,
                agent.last_seen_at(now_ms) as f64 / 1000.0,
            ));
            if let Some(skew) = agent.clock_skew_ms {
                out.push(sample(
                    labels::agent("sonde_agent_clock_skew_seconds", id),
                    ts,
                    skew as f64 / 1000.0,
                ));
            }
            out.push(sample(labels::agent_info(id, &agent.labels), ts, 1.0));
        }
        // An agent gone past missing_after: its per-target series end now, so that
        // dashboards and absent() see it at once rather than after 5 minutes.
        let gone: Vec<String> = self
            .agents
            .iter_mut()
            .filter_map(|(id, a)| {
                let up = a.is_up(now_ms, grace);
                let newly_gone = !up && !a.series_staled;
                if a.series_staled == up {
                    undo.staled.push((id.clone(), a.series_staled));
                }
                a.series_staled = !up;
                newly_gone.then(|| id.clone())
            })
            .collect();
        for id in &gone {
            for entry in self.entries.values() {
                if let Some(view) = entry.views.get(id.as_str()) {
                    stale_agent_series(view, now_ms, out);
                }
            }
        }
        forgotten
    }

    /// `sonde_job_targets`: the configured targets, or for an agent-local job the
    /// targets its results name.
    pub fn job_target_count(&self, job: &str) -> usize {
        let seen = self
            .entries
            .range((job.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == job)
            .count();
        self.configured_targets(job).max(seen)
    }
}
