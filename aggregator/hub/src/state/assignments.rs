//! Which agent probes which target, and the assignments queued for the agents' streams.

use super::*;

/// A fingerprint of a plan: equal plans, equal fingerprints (and different ones differ,
/// but for a 2^-64 chance, which at worst skips sending an unchanged-looking plan).
pub(super) fn fingerprint(planned: &assignment::Planned) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for m in &planned.modules {
        (&m.name, &m.json).hash(&mut h);
    }
    planned.checks.len().hash(&mut h);
    for c in &planned.checks {
        (
            &c.job,
            &c.instance,
            c.interval_ms,
            c.timeout_ms,
            c.retries,
            c.module,
        )
            .hash(&mut h);
    }
    h.finish()
}

/// True when an agent with `labels` matches the job selector `selector`.
pub(super) fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl State {
    /// True when a job spreads its targets (`agents_per_target`), so that which agents
    /// are placeable decides assignments.
    pub(super) fn has_spread_jobs(&self) -> bool {
        self.config
            .jobs
            .iter()
            .any(|j| j.config.agents_per_target.is_some())
    }

    /// Recomputes which agents may be given targets; true when that changed.
    pub(super) fn update_placeable(&mut self, now_ms: i64) -> bool {
        let grace = self.config.missing_after;
        let placeable: BTreeSet<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.is_up(now_ms, grace))
            .map(|(id, _)| id.clone())
            .collect();
        if placeable == self.placeable {
            return false;
        }
        self.placeable = placeable;
        true
    }

    /// Every agent's checks, as (index of the job in the config, target): each job's
    /// targets to every agent its selector matches, or with `agents_per_target: K` to
    /// the K chosen among the placeable ones.
    pub(super) fn plan(&self, only: Option<&str>) -> BTreeMap<String, Vec<(usize, Arc<Target>)>> {
        let mut plan: BTreeMap<String, Vec<(usize, Arc<Target>)>> = self
            .agents
            .iter()
            .filter(|(id, a)| a.connection.is_some() && only.is_none_or(|o| o == id.as_str()))
            .map(|(id, _)| (id.clone(), Vec::new()))
            .collect();
        if plan.is_empty() {
            return plan;
        }
        for (index, job) in self.config.jobs.iter().enumerate() {
            let targets = self
                .targets
                .range((job.name.clone(), String::new())..)
                .take_while(|(k, _)| k.0 == job.name)
                .map(|(_, t)| t);
            match job.config.agents_per_target {
                None => {
                    let receivers: Vec<String> = plan
                        .keys()
                        .filter(|id| {
                            self.agents
                                .get(*id)
                                .is_some_and(|a| job.config.selects(&a.labels))
                        })
                        .cloned()
                        .collect();
                    if receivers.is_empty() {
                        continue;
                    }
                    for t in targets {
                        for id in &receivers {
                            if let Some(v) = plan.get_mut(id) {
                                v.push((index, t.clone()));
                            }
                        }
                    }
                }
                Some(k) => {
                    let candidates: Vec<&str> = self
                        .placeable
                        .iter()
                        .filter(|id| {
                            self.agents
                                .get(*id)
                                .is_some_and(|a| job.config.selects(&a.labels))
                        })
                        .map(String::as_str)
                        .collect();
                    for t in targets {
                        for id in placement::choose(&t.job, &t.instance, &candidates, k as usize) {
                            if let Some(v) = plan.get_mut(id) {
                                v.push((index, t.clone()));
                            }
                        }
                    }
                }
            }
        }
        plan
    }

    /// Queues for each connected agent (or just `only`) its assignment when it changed,
    /// in parts under [`assignment::PART_BUDGET`] each.
    pub(super) fn send_assignments(&mut self, only: Option<&str>, ch: &mut Changes) {
        let plan = self.plan(only);
        let config = self.config.clone();
        let planner = assignment::Planner::new(&config.jobs);
        let mut generation = self.generation;
        for (id, mut checks) in plan {
            checks.sort_by(|a, b| (&a.1.job, &a.1.instance).cmp(&(&b.1.job, &b.1.instance)));
            let Some(agent) = self.agents.get_mut(&id) else {
                continue;
            };
            let planned = planner.plan(checks.iter().map(|(j, t)| (&config.jobs[*j], &**t)));
            let fingerprint = fingerprint(&planned);
            if agent.last_assignment == Some(fingerprint) {
                continue;
            }
            let parts = match assignment::encode(generation + 1, &planned, assignment::PART_BUDGET)
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(agent = %crate::refusals::loggable(&id), error = %e, "cannot send this agent its assignment; it keeps its previous one");
                    continue;
                }
            };
            generation += 1;
            agent.generation = generation;
            agent.checks = planned.checks.len();
            agent.assignment_status = assignment::AssignmentStatus::Sent {
                generation,
                checks: planned.checks.len(),
            };
            agent.last_assignment = Some(fingerprint);
            if let Some(connection) = agent.connection {
                ch.outgoing.push(Outgoing::Assignment {
                    agent: id.clone(),
                    connection,
                    parts,
                });
            }
        }
        self.generation = generation;
    }
}
