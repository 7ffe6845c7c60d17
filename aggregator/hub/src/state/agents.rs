//! Agents coming and going: hello (admission, the stream that replaces an older one),
//! heartbeats, assignment reports, disconnection, and streams whose token a reload revoked.

use super::*;

impl AgentEntry {
    /// An agent as known from its labels, jobs, times and committed sequence: not
    /// connected, nothing held yet.
    pub(super) fn known(
        id: &str,
        labels: Labels,
        local_jobs: Vec<String>,
        first_seen_ms: i64,
        last_seen_ms: i64,
        committed_seq: u64,
    ) -> Self {
        Self {
            labels,
            version: String::new(),
            local_jobs,
            connection: None,
            credential: None,
            open_stream: None,
            clock_skew_ms: None,
            hello_acked_seq: 0,
            series: 0,
            series_bytes: 0,
            local_series: 0,
            local_bytes: 0,
            local_targets: HashSet::new(),
            first_seen_ms,
            last_seen_ms,
            committed_seq,
            generation: 0,
            checks: 0,
            series_staled: false,
            last_assignment: None,
            assignment_status: assignment::AssignmentStatus::None,
            id: Arc::from(id),
        }
    }

    /// `sonde_agent_up`: connected, or heard from within `grace`.
    pub fn is_up(&self, now_ms: i64, grace: Duration) -> bool {
        merge::agent_up(self.connection.is_some(), self.last_seen_ms, now_ms, grace)
    }

    /// `sonde_agent_last_seen_timestamp_seconds`, in ms: now while connected.
    pub fn last_seen_at(&self, now_ms: i64) -> i64 {
        if self.connection.is_some() {
            now_ms
        } else {
            self.last_seen_ms
        }
    }

    pub(super) fn held(&self) -> Held {
        Held {
            series: self.series,
            bytes: self.series_bytes,
            local_series: self.local_series,
            local_bytes: self.local_bytes,
        }
    }

    pub(super) fn set_held(&mut self, held: Held) {
        self.series = held.series;
        self.series_bytes = held.bytes;
        self.local_series = held.local_series;
        self.local_bytes = held.local_bytes;
    }

    /// Stops counting `view`, gone.
    pub(super) fn release(&mut self, view: &LastResult) {
        let mut held = self.held();
        held.take(view);
        self.set_held(held);
    }

    pub(super) fn stored(&self) -> StoredAgent {
        StoredAgent {
            id: self.id.to_string(),
            labels: self.labels.clone(),
            local_jobs: self.local_jobs.clone(),
            committed_seq: self.committed_seq,
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
        }
    }
}

impl Held {
    /// Stops counting `view`.
    pub(super) fn take(&mut self, view: &LastResult) {
        self.series = self.series.saturating_sub(view.values.len());
        self.bytes = self.bytes.saturating_sub(view.bytes);
        if view.local {
            self.local_series = self.local_series.saturating_sub(view.values.len());
            self.local_bytes = self.local_bytes.saturating_sub(view.bytes);
        }
    }

    /// Counts a view of `series` samples weighing `bytes`.
    pub(super) fn add(&mut self, series: usize, bytes: usize, local: bool) {
        self.series += series;
        self.bytes += bytes;
        if local {
            self.local_series += series;
            self.local_bytes += bytes;
        }
    }
}

impl State {
    /// Takes back what the store remembers from before a restart: agents (disconnected
    /// until they say hello again, with their committed sequence numbers) and when each
    /// job started being expected.
    pub fn restore(&mut self, agents: Vec<StoredAgent>, jobs: Vec<(String, i64)>) {
        for a in agents {
            for job in &a.local_jobs {
                self.jobs.entry(job.clone()).or_insert(JobEntry {
                    expected_since_ms: a.first_seen_ms,
                    config: None,
                    missing: false,
                });
            }
            self.agents.insert(
                a.id.clone(),
                AgentEntry::known(
                    &a.id,
                    a.labels,
                    a.local_jobs,
                    a.first_seen_ms,
                    a.last_seen_ms,
                    a.committed_seq,
                ),
            );
        }
        for (name, since) in jobs {
            if let Some(job) = self.jobs.get_mut(&name) {
                job.expected_since_ms = job.expected_since_ms.min(since);
            }
        }
    }

    /// An agent said hello (already authenticated, with `labels` the ones it may have):
    /// register it, queue its assignment in `ch.outgoing`, and return its connection id.
    /// A newer connection of the same agent replaces the older one, which is ended.
    /// Without tokens, a new agent id past `fleet.limits.max_agents`, or local jobs past
    /// `max_anonymous_local_jobs`, are refused (`Err`: why), so that made-up ids cannot
    /// grow the aggregator without bound.
    pub fn connect(
        &mut self,
        hello: &pb::Hello,
        labels: Labels,
        credential: Option<String>,
        now_ms: i64,
        ch: &mut Changes,
    ) -> Result<u64, String> {
        let max_agents = self.config.limits.max_agents;
        if !self.config.auth_required
            && self.agents.len() >= max_agents
            && !self.agents.contains_key(&hello.agent_id)
        {
            return Err(format!(
                "fleet.limits.max_agents ({max_agents}) reached: this aggregator knows {} agents without tokens, each until fleet.forget_after ({}) after it was last seen; raise max_agents, or give each agent a token (fleet.auth)",
                self.agents.len(),
                sonde_proto::config::PromDuration(self.config.forget_after)
            ));
        }
        let configured: BTreeSet<&str> = self.config.jobs.iter().map(|j| j.name.as_str()).collect();
        // A local job cannot take over a configured one: its results would count for
        // targets the agent was never assigned.
        let mut local_jobs: Vec<String> = hello
            .local_jobs
            .iter()
            .filter(|j| !configured.contains(j.as_str()))
            .cloned()
            .collect();
        local_jobs.sort();
        local_jobs.dedup();
        if !self.config.auth_required {
            let max = self.config.limits.max_anonymous_local_jobs;
            let new = local_jobs
                .iter()
                .filter(|j| !self.jobs.contains_key(*j))
                .count();
            let known = self.jobs.values().filter(|j| j.config.is_none()).count();
            if new > 0 && known + new > max {
                return Err(format!(
                    "fleet.limits.max_anonymous_local_jobs ({max}) reached: agents without tokens declare {known} local jobs, this one {new} more; raise it, or give each agent a token (fleet.auth)"
                ));
            }
        }
        let connection = self.next_connection;
        self.next_connection += 1;
        let info_changed;
        {
            let entry = self
                .agents
                .entry(hello.agent_id.clone())
                .or_insert_with(|| {
                    AgentEntry::known(
                        &hello.agent_id,
                        labels.clone(),
                        Vec::new(),
                        now_ms,
                        now_ms,
                        0,
                    )
                });
            if entry.connection.is_some() {
                tracing::warn!(agent = %crate::refusals::loggable(&hello.agent_id), "agent connected again; the newer stream replaces the older one");
            }
            if let Some(old) = entry.open_stream.take() {
                ch.outgoing.push(Outgoing::End {
                    agent: hello.agent_id.clone(),
                    connection: old,
                    reason: "replaced by a newer stream of the same agent".into(),
                });
            }
            info_changed = entry.labels != labels;
            entry.labels = labels;
            entry.version = hello.version.chars().take(64).collect();
            entry.local_jobs = local_jobs.clone();
            entry.connection = Some(connection);
            entry.credential = credential;
            entry.open_stream = Some(connection);
            entry.hello_acked_seq = hello.last_acked_seq;
            if hello.last_acked_seq > entry.committed_seq && entry.committed_seq > 0 {
                tracing::warn!(
                    agent = %crate::refusals::loggable(&hello.agent_id),
                    agent_says = hello.last_acked_seq,
                    committed = entry.committed_seq,
                    "the agent says more was acked than this aggregator committed (was its store replaced?)"
                );
            }
            entry.series_staled = false;
            entry.last_seen_ms = now_ms;
            // A fresh stream must receive its assignment even if it equals the last one.
            entry.last_assignment = None;
            ch.durable
                .agents
                .insert(hello.agent_id.clone(), entry.stored());
        }
        for job in &local_jobs {
            self.jobs.entry(job.clone()).or_insert(JobEntry {
                expected_since_ms: now_ms,
                config: None,
                missing: false,
            });
        }
        if (self.update_placeable(now_ms) || info_changed) && self.has_spread_jobs() {
            // Its arrival (or new labels) moves targets of other agents to it: their
            // new assignments go out with the next tick, so that a thousand agents
            // connecting at once cost one plan per second, not one each.
            self.replan = true;
        }
        self.send_assignments(Some(&hello.agent_id), ch);
        // A new agent, or new labels, may be in (or out of) a maintenance window of
        // agents: before its first result counts.
        if self.maintenance.selects_agents() || !self.agents_in_maintenance.is_empty() {
            self.update_agents_in_maintenance(now_ms, ch);
        }
        if info_changed {
            self.write_meta(now_ms, ch);
        }
        Ok(connection)
    }

    /// Stream `connection` of `agent` could not take its assignment (gone, or hopelessly
    /// behind) and was dropped: the agent counts as disconnected, and gets a fresh
    /// assignment with its next hello.
    pub fn stream_lost(&mut self, agent: &str, connection: u64) {
        if let Some(entry) = self.agents.get_mut(agent)
            && entry.connection == Some(connection)
        {
            tracing::warn!(agent = %crate::refusals::loggable(agent), "cannot send the assignment; closing the stream");
            entry.connection = None;
        }
    }

    /// The stream of `connection` ended.
    pub fn disconnect(&mut self, agent: &str, connection: u64, now_ms: i64) {
        if let Some(entry) = self.agents.get_mut(agent)
            && entry.connection == Some(connection)
        {
            entry.connection = None;
            entry.open_stream = None;
            entry.credential = None;
            entry.last_seen_ms = now_ms;
        }
    }

    /// What `agent` reports doing with an assignment. A report on another generation
    /// than the one last sent (a late report of an older one) is ignored. A refusal is
    /// logged once per agent and generation.
    pub fn assignment_report(&mut self, agent: &str, report: &pb::AssignmentReport) {
        let Some(entry) = self.agents.get_mut(agent) else {
            return;
        };
        if report.generation != entry.generation {
            return;
        }
        let status = assignment::AssignmentStatus::from_report(report);
        // Only the first report on a generation is logged: an agent repeating (or
        // varying) its reports cannot fill the log.
        let first = matches!(
            entry.assignment_status,
            assignment::AssignmentStatus::Sent { .. }
        );
        match &status {
            _ if !first => {}
            assignment::AssignmentStatus::Refused { generation, error } => {
                tracing::warn!(agent = %crate::refusals::loggable(agent), generation, reason = %error, "the agent refused its assignment and keeps running its previous checks");
            }
            assignment::AssignmentStatus::Applied { refused, .. } if !refused.is_empty() => {
                tracing::info!(agent = %crate::refusals::loggable(agent), "{}", status.text());
            }
            _ => {}
        }
        entry.assignment_status = status;
    }

    /// Forgets every stream (at shutdown).
    pub fn disconnect_all(&mut self, now_ms: i64) {
        for entry in self.agents.values_mut() {
            if entry.connection.take().is_some() {
                entry.open_stream = None;
                entry.last_seen_ms = now_ms;
            }
        }
    }

    /// A heartbeat stamped `agent_time_ms` by the agent's clock.
    pub fn heartbeat(&mut self, agent: &str, agent_time_ms: i64, now_ms: i64) {
        if let Some(entry) = self.agents.get_mut(agent) {
            entry.last_seen_ms = now_ms;
            entry.clock_skew_ms = Some(agent_time_ms.saturating_sub(now_ms));
        }
    }

    /// Ends the streams whose token the config no longer accepts as it was.
    pub(super) fn revoke_credentials(&mut self, ch: &mut Changes) {
        let config = self.config.clone();
        for (id, agent) in self.agents.iter_mut() {
            let Some(stream) = agent.open_stream else {
                continue;
            };
            let still = match &agent.credential {
                None => !config.auth_required,
                Some(token) => config.tokens.get(token).is_some_and(|grant| {
                    grant.agent == *id && grant.labels.as_ref().is_none_or(|l| *l == agent.labels)
                }),
            };
            if !still {
                tracing::warn!(agent = %crate::refusals::loggable(id), "the reloaded config no longer accepts this agent's token as it was; ending its stream");
                ch.outgoing.push(Outgoing::End {
                    agent: id.clone(),
                    connection: stream,
                    reason: "the aggregator's fleet.auth no longer accepts this agent's token"
                        .into(),
                });
                agent.open_stream = None;
                agent.connection = None;
                agent.credential = None;
            }
        }
    }
}
