//! Targets and their views: the config's jobs and targets, the merge of each target's
//! views into `up` and the series that carry it, staleness markers for what went away,
//! and the response-time buckets handed to the history.

use super::*;

/// A merged series must be rewritten at least this often while its target is fresh, so
/// that it never falls out of Prometheus's 5-minute lookback, whatever the interval.
pub(super) const MAX_REWRITE_PERIOD_MS: i64 = 60_000;

impl MergedSeries {
    pub(super) fn new(base: &TargetBase) -> Self {
        Self {
            up: base.merged("up"),
            agents: base.merged("sonde_target_agents"),
            succeeding: base.merged("sonde_target_agents_succeeding"),
        }
    }
}

impl TargetEntry {
    /// The entry of `target` under `key` (the target's own job and instance, or for a
    /// local job the key its agent owns it under).
    pub(super) fn new(key: Arc<TargetKey>, target: &Target) -> Self {
        let base = TargetBase::new(&target.job, &target.instance, &target.labels);
        Self {
            merged_series: Arc::new(MergedSeries::new(&base)),
            base,
            labels: Arc::new(target.labels.clone()),
            key,
            views: BTreeMap::new(),
            tally: Tally::default(),
            merged: None,
            last_written_ms: 0,
            up_live: false,
            history_state: None,
            next_evaluation_ms: i64::MIN,
        }
    }

    /// Follows a change of the target's labels (file_sd): later series carry the new ones.
    pub(super) fn relabel(&mut self, target: &Target) {
        if *self.labels != target.labels {
            *self = Self {
                views: std::mem::take(&mut self.views),
                tally: std::mem::take(&mut self.tally),
                merged: self.merged,
                last_written_ms: self.last_written_ms,
                up_live: self.up_live,
                history_state: self.history_state,
                ..Self::new(self.key.clone(), target)
            };
        }
    }

    /// Sets (`Some`) or removes (`None`) `agent`'s view, keeping the tally in step;
    /// returns the view before. `counted`: the agent's views count toward `up` (it is
    /// not in maintenance); the tally holds exactly the counted views.
    pub(super) fn set_view(
        &mut self,
        agent: Arc<str>,
        view: Option<Arc<LastResult>>,
        counted: bool,
    ) -> Option<Arc<LastResult>> {
        let after = view.as_deref().map(LastResult::vote);
        let before = self.put_view(agent, view);
        if counted {
            self.tally
                .replace(before.as_deref().map(LastResult::vote), after);
        }
        before
    }

    /// Sets or removes a view without the tally: the caller rebuilds it
    /// ([`TargetEntry::retally`]).
    pub(super) fn put_view(
        &mut self,
        agent: Arc<str>,
        view: Option<Arc<LastResult>>,
    ) -> Option<Arc<LastResult>> {
        match view {
            Some(view) => self.views.insert(agent, view),
            None => self.views.remove(&agent),
        }
    }

    /// Starts (`true`) or stops counting `agent`'s view, if it has one here; true when
    /// it has, so that the target's merge may have changed.
    pub(super) fn count_agent(&mut self, agent: &str, counted: bool) -> bool {
        let Some(vote) = self.views.get(agent).map(|v| v.vote()) else {
            return false;
        };
        if counted {
            self.tally.replace(None, Some(vote));
        } else {
            self.tally.replace(Some(vote), None);
        }
        true
    }

    /// Rebuilds the tally from the views of the agents not in `excluded`.
    pub(super) fn retally(&mut self, excluded: &BTreeSet<Arc<str>>) {
        self.tally = Tally::default();
        for (agent, view) in &self.views {
            if !excluded.contains(agent) {
                self.tally.replace(None, Some(view.vote()));
            }
        }
    }
}

impl LastResult {
    /// What this result counts for in the merge.
    pub fn vote(&self) -> AgentView {
        AgentView {
            timestamp_ms: self.timestamp_ms,
            success: self.success,
        }
    }
}

/// The quorum and freshness window that apply to a target's job.
pub(super) fn rules(
    config: &HubConfig,
    jobs: &BTreeMap<String, JobEntry>,
    job: &str,
    entry: &TargetEntry,
) -> (Quorum, Duration) {
    match jobs.get(job).and_then(|j| j.config.as_ref()) {
        Some(c) => (c.quorum, c.freshness),
        None => {
            // A local job: the aggregator knows its rhythm only from the results.
            let spacing = entry
                .views
                .values()
                .filter_map(|v| v.spacing_ms)
                .max()
                .map_or(config.scrape_interval, |ms| {
                    Duration::from_millis(ms.max(1) as u64)
                });
            (Quorum::AtLeast(1), spacing * 2 + spacing / 2)
        }
    }
}

/// Writes `up`, `sonde_target_agents` and `sonde_target_agents_succeeding` for a
/// target; `None` (target removed) or a missing state writes staleness markers for
/// `up`. Returns the timestamp used, always after `last_ms`.
pub(super) fn write_merged(
    series: &MergedSeries,
    merged: Option<Merged>,
    now_ms: i64,
    last_ms: i64,
    out: &mut Samples,
) -> i64 {
    let ts = now_ms.max(last_ms + 1);
    let (up, agents, succeeding) = match merged {
        Some(m) => (
            m.state.up_value().unwrap_or_else(stale_nan),
            f64::from(m.agents),
            f64::from(m.succeeding),
        ),
        None => (stale_nan(), stale_nan(), stale_nan()),
    };
    out.push(sample(series.up.clone(), ts, up));
    out.push(sample(series.agents.clone(), ts, agents));
    out.push(sample(series.succeeding.clone(), ts, succeeding));
    ts
}

/// Staleness markers for every series one agent wrote for one target.
pub(super) fn stale_agent_series(view: &LastResult, now_ms: i64, out: &mut Samples) {
    let ts = now_ms.max(view.timestamp_ms + 1);
    for s in view.series.iter() {
        out.push(sample(s.clone(), ts, stale_nan()));
    }
}

impl State {
    /// Applies a new config and the targets discovered under it: new jobs and targets,
    /// new assignments; what disappeared gets staleness markers so `absent()` fires at
    /// once. Streams whose token the new config no longer accepts (removed, or bound to
    /// other labels) are ended.
    pub fn reload(
        &mut self,
        config: Arc<HubConfig>,
        targets: TargetSet,
        now_ms: i64,
        ch: &mut Changes,
    ) {
        let removed = self.apply_config(config, targets, now_ms);
        for key in removed {
            if let Some(entry) = self.entries.remove(&key) {
                self.retired.insert(key, entry);
            }
        }
        self.write_retired(now_ms, ch);
        self.forget_refusals_of_gone_targets();
        self.revoke_credentials(ch);
        self.update_placeable(now_ms);
        self.replan = false;
        self.send_assignments(None, ch);
        self.write_meta(now_ms, ch);
    }

    /// Targets discovered anew (file_sd) under the current config (the caller drops
    /// what was discovered under a config a reload has replaced meanwhile).
    pub fn discovered(&mut self, targets: TargetSet, ch: &mut Changes) {
        if *self.targets == targets {
            return;
        }
        self.targets = Arc::new(targets);
        self.forget_refusals_of_gone_targets();
        self.send_assignments(None, ch);
    }

    pub(super) fn forget_refusals_of_gone_targets(&mut self) {
        let (targets, entries) = (&self.targets, &self.entries);
        self.refused_notes
            .retain(|k, _| targets.contains_key(k) || entries.contains_key(k));
    }

    /// Installs `config`; returns the targets that no longer exist.
    pub(super) fn apply_config(
        &mut self,
        config: Arc<HubConfig>,
        targets: TargetSet,
        now_ms: i64,
    ) -> Vec<(String, String)> {
        self.previous_selectors = self
            .config
            .jobs
            .iter()
            .map(|j| (j.name.clone(), j.config.agents.clone()))
            .collect();
        self.config = config;
        self.config_epoch += 1;
        // Freshness windows and quorums may have changed.
        self.evaluate_every_target();
        let configured: BTreeSet<String> =
            self.config.jobs.iter().map(|j| j.name.clone()).collect();
        let local: BTreeSet<String> = self
            .agents
            .values()
            .flat_map(|a| a.local_jobs.iter().cloned())
            .collect();
        self.jobs
            .retain(|name, _| configured.contains(name) || local.contains(name));
        for job in &self.config.jobs {
            let entry = self.jobs.entry(job.name.clone()).or_insert(JobEntry {
                expected_since_ms: now_ms,
                config: None,
                missing: false,
            });
            entry.config = Some(job.clone());
        }
        for (name, entry) in self.jobs.iter_mut() {
            if !configured.contains(name) {
                entry.config = None;
            }
        }
        self.targets = Arc::new(targets);
        let removed: Vec<_> = self
            .entries
            .keys()
            .filter(|k| !self.targets.contains_key(*k) && !self.is_local_job(&k.0))
            .cloned()
            .collect();
        removed
    }

    /// Configured targets (static and file_sd) of `job`.
    pub(super) fn configured_targets(&self, job: &str) -> usize {
        self.targets
            .range((job.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == job)
            .count()
    }

    pub(super) fn is_local_job(&self, job: &str) -> bool {
        self.jobs.get(job).is_some_and(|j| j.config.is_none())
    }

    /// Hands the response-time buckets of minutes before `minute` to the history, for
    /// views whose agent has not reported since (the others were handed over by their
    /// next result).
    pub(super) fn flush_buckets(&mut self, minute: i64, ch: &mut Changes) {
        for entry in self.entries.values_mut() {
            for (agent, view) in entry.views.iter_mut() {
                let Some(b) = view.bucket.filter(|b| b.start_ms < minute) else {
                    continue;
                };
                ch.durable.history.buckets.push((
                    (entry.key.0.clone(), entry.key.1.clone()),
                    agent.to_string(),
                    b,
                ));
                let flushed = Arc::new(LastResult {
                    bucket: None,
                    ..(**view).clone()
                });
                // The same timestamp and verdict: the tally is unchanged.
                let before = std::mem::replace(view, flushed);
                ch.undo
                    .views
                    .push((entry.key.clone(), agent.clone(), Some(before)));
            }
        }
    }

    /// Staleness markers for targets a reload removed; on success they are gone.
    pub(super) fn write_retired(&mut self, now_ms: i64, ch: &mut Changes) {
        let retired = std::mem::take(&mut self.retired);
        for (key, entry) in retired {
            for view in entry.views.values() {
                stale_agent_series(view, now_ms, &mut ch.out);
            }
            if entry.up_live {
                write_merged(
                    &entry.merged_series,
                    None,
                    now_ms,
                    entry.last_written_ms,
                    &mut ch.out,
                );
            }
            for (agent, view) in &entry.views {
                if let Some(a) = self.agents.get_mut(&**agent) {
                    ch.undo.series.push((a.id.clone(), a.held()));
                    a.release(view);
                }
            }
            ch.undo.retired.push((key, entry));
        }
    }

    /// Makes the next tick evaluate every target (after a reload or a rollback, which
    /// change what the targets' next evaluations were worked out from).
    pub(super) fn evaluate_every_target(&mut self) {
        for entry in self.entries.values_mut() {
            entry.next_evaluation_ms = i64::MIN;
        }
    }

    pub(super) fn evaluate_all(&mut self, now_ms: i64, ch: &mut Changes) {
        // Only the targets whose merge the passing time can change by now: with 50,000
        // targets probed every 2 minutes, evaluating each every second was most of the
        // aggregator's work.
        let keys: Vec<Arc<TargetKey>> = self
            .entries
            .values()
            .filter(|e| e.next_evaluation_ms <= now_ms)
            .map(|e| e.key.clone())
            .collect();
        for key in keys {
            self.evaluate(&key, now_ms, false, ch);
        }
    }

    /// Merges one target and writes its merged series when they changed, when a new
    /// result arrived, or when they were last written too long ago.
    pub(super) fn evaluate(
        &mut self,
        key: &(String, String),
        now_ms: i64,
        new_result: bool,
        ch: &mut Changes,
    ) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        let (quorum, window) = rules(&self.config, &self.jobs, &key.0, e);
        // What `merge::merge` over every view gives, kept up to date as views change.
        let merged = e.tally.merge(quorum, now_ms, window);
        let changed = e.merged.map(|m| m.state) != Some(merged.state)
            || e.merged.map(|m| (m.agents, m.succeeding))
                != Some((merged.agents, merged.succeeding));
        let period = window.as_millis().min(MAX_REWRITE_PERIOD_MS as u128) as i64 / 2;
        let due =
            merged.state != TargetState::Missing && now_ms - e.last_written_ms >= period.max(1);
        // A new result that changes nothing merged writes nothing: with ten agents on a
        // target, rewriting `up` at each of their results would add three rows to every
        // twelve. The periodic rewrite (`due`) keeps it live in the receivers.
        let must_write = changed || due || (new_result && e.last_written_ms == 0);
        let write = must_write && !(merged.state == TargetState::Missing && !e.up_live && !changed);
        // The history records every change of state, but not a target's first being
        // missing (it never had a result then).
        let state = HistoryState::of(&merged);
        let event = (e.history_state != Some(state)
            && (e.history_state.is_some() || state != HistoryState::Missing))
            .then(|| {
                history::Event {
                    timestamp_ms: now_ms,
                    state,
                    agents: merged.agents,
                    succeeding: merged.succeeding,
                    views: e
                        .views
                        .iter()
                        .map(|(agent, v)| history::EventView {
                            agent: agent.to_string(),
                            success: v.success,
                            fresh: merge::is_fresh(v.timestamp_ms, now_ms, window),
                            timestamp_ms: v.timestamp_ms,
                            failure: v.failure.clone(),
                        })
                        .collect(),
                }
                .bounded()
            });
        if write || event.is_some() {
            ch.undo.written.push((
                e.key.clone(),
                Written {
                    merged: e.merged,
                    last_written_ms: e.last_written_ms,
                    up_live: e.up_live,
                    history_state: e.history_state,
                },
            ));
        }
        if let Some(event) = event {
            ch.durable
                .history
                .events
                .push(((key.0.clone(), key.1.clone()), event));
            e.history_state = Some(state);
        }
        if write {
            e.last_written_ms = write_merged(
                &e.merged_series,
                Some(merged),
                now_ms,
                e.last_written_ms,
                &mut ch.out,
            );
            e.up_live = merged.state != TargetState::Missing;
        }
        e.merged = Some(merged);
        // The merge changes with time only when a fresh view goes stale; the rewrite is
        // due a period after the last write.
        let stale_next = e.tally.next_expiry(window).filter(|&at| at > now_ms);
        let rewrite_next = (merged.state != TargetState::Missing)
            .then(|| e.last_written_ms.saturating_add(period.max(1)));
        e.next_evaluation_ms = stale_next
            .into_iter()
            .chain(rewrite_next)
            .min()
            .unwrap_or(i64::MAX)
            .max(now_ms.saturating_add(1));
    }
}
