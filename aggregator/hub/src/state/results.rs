//! The accept path: a batch of results checked against what the agent may report,
//! deduplicated by sequence number, bounded, and turned into the view's series.

use super::*;

/// The entry key's instance of a local job's target owned by `agent`: the agent's id,
/// quoted as Rust quotes strings (so that no other (instance, agent) gives the same
/// key: a quoted string ends at its first unescaped quote), after the instance.
pub fn owned_instance(instance: &str, agent: &str) -> String {
    format!("{instance} @{agent:?}")
}

/// A result's target, made safe to log.
pub(super) fn describe(r: &IncomingResult) -> String {
    format!(
        "job {:?} instance {:?}",
        crate::refusals::loggable(&r.job),
        crate::refusals::loggable(&r.instance)
    )
}

/// True when `series` (built by [`TargetBase::probe`] over a base of `base_len` labels
/// for the same agent) is the series of a sample named `name` with `labels`. A sample's
/// labels can collide with none of the base's (the fleet service and
/// [`State::accept`] refuse those), so having each of them and exactly that many labels
/// in all means having no others; a target label named `agent` makes the count differ
/// and the series is built again, which is only slower.
pub(super) fn is_probe_series(
    series: &crate::series::SeriesLabels,
    base_len: usize,
    name: &str,
    labels: &[(Symbol, Symbol)],
) -> bool {
    series.labels().len() == base_len + 2 + labels.len()
        && series.name() == name
        && labels.iter().all(|(k, v)| series.get(k) == Some(&**v))
}

/// A failure reason is kept for the status page; longer ones are cut.
pub(super) const MAX_FAILURE_CHARS: usize = 512;

impl State {
    /// Takes a batch of results from `agent` and returns the sequence number to ack
    /// once `ch` is committed. Results at or below what was already committed are
    /// replays and are dropped; results the agent may not send (see DESIGN's trust
    /// model) are refused, counted, and acked, since sending them again cannot make them
    /// acceptable.
    pub fn results(
        &mut self,
        agent: &str,
        batch: &[IncomingResult],
        now_ms: i64,
        ch: &mut Changes,
        counters: &HubCounters,
        refusals: &Refusals,
    ) -> Option<u64> {
        let mut refused: BTreeMap<Reason, (u64, String)> = BTreeMap::new();
        let (committed, hello_acked) = self
            .agents
            .get(agent)
            .map(|a| (a.committed_seq, a.hello_acked_seq))?;
        let skew = self.config.max_clock_skew.as_millis() as i64;
        let mut last = committed;
        let mut ack = None;
        for result in batch {
            counters.results_received.fetch_add(1, Ordering::Relaxed);
            if result.seq <= last {
                counters
                    .results_deduplicated
                    .fetch_add(1, Ordering::Relaxed);
                ack = Some(ack.unwrap_or(last).max(committed));
                continue;
            }
            last = result.seq;
            ack = Some(result.seq);
            let verdict = match result.refused {
                Some(reason) => Err((reason, format!("result for {}", describe(result)))),
                None if result.seq <= hello_acked => Err((
                    Reason::BadSequence,
                    format!(
                        "result {} for {}, at or below the last_acked_seq {hello_acked} of the agent's Hello",
                        result.seq,
                        describe(result)
                    ),
                )),
                None if result.timestamp_ms < 0
                    || result.timestamp_ms > now_ms.saturating_add(skew) =>
                {
                    Err((
                        Reason::FutureTimestamp,
                        format!(
                            "result for {} stamped {} ms, now is {now_ms} ms (fleet.max_clock_skew {skew} ms)",
                            describe(result),
                            result.timestamp_ms
                        ),
                    ))
                }
                None => self.accept(agent, result, now_ms, ch, &mut refused),
            };
            if let Err((reason, detail)) = verdict {
                self.note_refused(agent, result, reason, &detail, now_ms);
                let e = refused.entry(reason).or_insert((0, detail));
                e.0 += 1;
            }
        }
        if last > committed
            && let Some(a) = self.agents.get_mut(agent)
        {
            ch.undo.committed.push((a.id.clone(), a.committed_seq));
            a.committed_seq = last;
            a.last_seen_ms = now_ms;
            ch.durable.agents.insert(agent.to_string(), a.stored());
        }
        for (reason, (n, detail)) in refused {
            counters.results_unexpected.fetch_add(
                u64::from(reason == Reason::Unassigned) * n,
                Ordering::Relaxed,
            );
            refusals.refuse(agent, reason, n, || detail);
        }
        ack
    }

    /// Keeps `detail` for the status page's row of the target `r` names, when the
    /// target is known (configured, or one an agent's results made): a hostile agent's
    /// made-up targets get no row.
    pub(super) fn note_refused(
        &mut self,
        agent: &str,
        r: &IncomingResult,
        reason: Reason,
        detail: &str,
        now_ms: i64,
    ) {
        let key = (r.job.clone(), r.instance.clone());
        let key = if self.targets.contains_key(&key) || self.entries.contains_key(&key) {
            key
        } else {
            let owned = (r.job.clone(), owned_instance(&r.instance, agent));
            if !self.entries.contains_key(&owned) {
                return;
            }
            owned
        };
        let notes = self.refused_notes.entry(key).or_default();
        if !notes.contains_key(agent)
            && notes.len() >= MAX_REFUSED_NOTES
            && let Some(oldest) = notes
                .iter()
                .min_by_key(|(_, n)| n.at_ms)
                .map(|(a, _)| a.clone())
        {
            notes.remove(&oldest);
        }
        notes.insert(
            Arc::from(agent),
            RefusedNote {
                at_ms: now_ms,
                reason,
                detail: Arc::from(detail),
            },
        );
    }

    /// The target a result of `agent` may report on: a target of a job whose selector
    /// (current, or until the next reload previous) matches the agent, or a target of
    /// one of its own local jobs. With `agents_per_target`, any matching agent may
    /// report: one that was moved off a target still delivers what it probed before.
    /// Takes the result's key by value: for a configured target (the common case) it is
    /// the entry's key as is, with no copy made.
    pub(super) fn admissible(&self, agent: &str, key: TargetKey) -> Result<Admitted, Reason> {
        let job = key.0.as_str();
        let Some(a) = self.agents.get(agent) else {
            return Err(Reason::Unassigned);
        };
        if let Some(target) = self.targets.get(&key) {
            let config = self.jobs.get(job).and_then(|j| j.config.as_ref());
            let selected = config.is_some_and(|j| j.config.selects(&a.labels))
                || self
                    .previous_selectors
                    .get(job)
                    .is_some_and(|selector| selects(selector, &a.labels));
            return match config {
                Some(config) if selected => Ok(Admitted {
                    target: target.clone(),
                    budget: Some(CheckBudget::of(&config.module, &self.config.limits)),
                    freshness: Some(config.freshness),
                    local_target: None,
                    key,
                }),
                _ => Err(Reason::Unassigned),
            };
        }
        if a.local_jobs.iter().any(|j| j == job) && self.is_local_job(job) {
            if key.1.len() > self.config.limits.max_instance_bytes.0 as usize {
                return Err(Reason::InstanceTooLong);
            }
            if !a.local_targets.contains(&key)
                && a.local_targets.len() >= self.config.limits.max_local_targets
            {
                return Err(Reason::LocalLimit);
            }
            let shared = self.config.shared_local_jobs.contains(job);
            let (entry_key, labels) = if shared {
                (key.clone(), Labels::new())
            } else {
                (
                    (key.0.clone(), owned_instance(&key.1, agent)),
                    Labels::from([("agent".to_string(), agent.to_string())]),
                )
            };
            return Ok(Admitted {
                target: Arc::new(Target {
                    job: key.0.clone(),
                    instance: key.1.clone(),
                    probe_target: None,
                    labels,
                }),
                key: entry_key,
                budget: None,
                freshness: None,
                local_target: Some(key),
            });
        }
        Err(Reason::Unassigned)
    }

    /// Records one result, or says why it is refused. Every change is noted in `ch.undo`.
    pub(super) fn accept(
        &mut self,
        agent: &str,
        r: &IncomingResult,
        now_ms: i64,
        ch: &mut Changes,
        refused: &mut BTreeMap<Reason, (u64, String)>,
    ) -> Result<(), (Reason, String)> {
        let Admitted {
            target,
            key,
            budget,
            freshness,
            local_target,
        } = self
            .admissible(agent, (r.job.clone(), r.instance.clone()))
            .map_err(|reason| {
            let why = match reason {
                Reason::LocalLimit => format!(
                    "result for {}: the agent's local jobs already have fleet.limits.max_local_targets ({}) targets",
                    describe(r),
                    self.config.limits.max_local_targets
                ),
                Reason::InstanceTooLong => format!(
                    "result for {} (an instance of {} bytes): a local job's instance is at most fleet.limits.max_instance_bytes ({})",
                    describe(r),
                    r.instance.len(),
                    self.config.limits.max_instance_bytes
                ),
                _ => format!(
                    "result for {}, which is not assigned to this agent nor one of its local jobs",
                    describe(r)
                ),
            };
            (reason, why)
        })?;
        let local = budget.is_none();
        let previous = self
            .entries
            .get(&key)
            .and_then(|e| e.views.get(agent))
            .cloned();
        if previous
            .as_ref()
            .is_some_and(|p| r.timestamp_ms <= p.timestamp_ms)
        {
            // Older than what this agent already reported: it cannot change the present.
            return Ok(());
        }
        // The common case: the result has the shape of the view's last one (the same
        // symbols, so the same names and labels), which every check below passed under
        // the same config. Its series are then the previous result's.
        let same_shape = previous.as_ref().is_some_and(|p| {
            p.config_epoch == self.config_epoch
                && p.shape
                    .as_ref()
                    .is_some_and(|shape| Arc::ptr_eq(shape, &r.samples.shape))
        });
        // Otherwise: labels the aggregator sets on the series, a sample may not bring.
        let kept: Vec<SampleRef> = if same_shape {
            Vec::new()
        } else {
            let taken = |name: &str| {
                target.labels.contains_key(name) || self.config.external_labels.contains_key(name)
            };
            let kept: Vec<_> = r
                .samples
                .iter()
                .filter(|(_, labels, _)| !labels.iter().any(|(k, _)| taken(k)))
                .collect();
            if kept.len() < r.samples.len() {
                // Counted as refused samples; the result itself stands.
                let n = (r.samples.len() - kept.len()) as u64;
                let e = refused.entry(Reason::ReservedLabel).or_insert((
                    0,
                    format!(
                        "{n} samples of {} carry a label named like a target or external label",
                        describe(r)
                    ),
                ));
                e.0 += n;
            }
            kept
        };
        // The shape a later result may match: only one whose samples were all kept.
        let shape = (same_shape || kept.len() == r.samples.len()).then(|| r.samples.shape.clone());
        let (sample_count, names_weigh) = if same_shape {
            (r.samples.len(), r.samples.shape.bytes)
        } else {
            (
                kept.len(),
                kept.iter()
                    .map(|(name, labels, _)| sample_weight(name, labels))
                    .sum(),
            )
        };
        // Every series of the target carries its job and instance; a trace weighs
        // against the same bound as the series it comes with.
        let key_bytes = r.job.len() + r.instance.len();
        let samples_weigh =
            names_weigh + sample_count * key_bytes + r.trace.as_ref().map_or(0, |t| t.weight());
        let limits = self.config.limits;
        let Some(a) = self.agents.get_mut(agent) else {
            return Err((Reason::Unassigned, "result from an unknown agent".into()));
        };
        let mut held = a.held();
        if let Some(p) = &previous {
            held.take(p);
        }
        held.add(sample_count, samples_weigh, local);
        match budget {
            // A check the aggregator assigned brings its own budget: what its module
            // can produce. Only a result no honest prober sends goes past it.
            Some(budget) if !budget.allows(sample_count, samples_weigh, key_bytes) => {
                let module = self
                    .jobs
                    .get(&r.job)
                    .and_then(|j| j.config.as_ref())
                    .map_or("", |c| c.module_name.as_str());
                return Err((
                    Reason::SeriesLimit,
                    format!(
                        "result for {} has {sample_count} samples of {samples_weigh} bytes; a check of module {module:?} produces at most {} samples of {} bytes",
                        describe(r),
                        budget.samples,
                        budget.weight(key_bytes)
                    ),
                ));
            }
            Some(_) => {}
            None if held.local_series > limits.max_series
                || held.local_bytes as u64 > limits.max_series_bytes.0 =>
            {
                return Err((
                    Reason::SeriesLimit,
                    format!(
                        "result for {} would make the agent's local jobs hold {} series of {} bytes; fleet.limits.max_series is {}, max_series_bytes {}",
                        describe(r),
                        held.local_series,
                        held.local_bytes,
                        limits.max_series,
                        limits.max_series_bytes
                    ),
                ));
            }
            None => {}
        }
        ch.undo.series.push((a.id.clone(), a.held()));
        a.set_held(held);
        if let Some(result_key) = local_target
            && a.local_targets.insert(result_key.clone())
        {
            ch.undo.local_targets.push((agent.to_string(), result_key));
        }
        let agent_id = a.id.clone();
        // One lookup of the entry from here on (the key moves into the map when the
        // entry is new); its `key` serves where the key is needed again.
        let entry = match self.entries.entry(key) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let entry = TargetEntry::new(Arc::new(v.key().clone()), &target);
                ch.undo.created.push(entry.key.clone());
                v.insert(entry)
            }
        };
        let key = entry.key.clone();
        entry.relabel(&target);
        if let Some(notes) = self.refused_notes.get_mut(&*key) {
            notes.remove(&agent_id);
            if notes.is_empty() {
                self.refused_notes.remove(&*key);
            }
        }
        let same_base = previous.as_ref().is_some_and(|p| p.base.same(&entry.base));
        let (series, values): (Arc<[Series]>, Arc<[f64]>) = match &previous {
            Some(p) if same_shape && same_base => {
                (p.series.clone(), r.samples.values.as_slice().into())
            }
            _ => {
                let samples: Vec<SampleRef> = if same_shape {
                    r.samples.iter().collect()
                } else {
                    kept
                };
                // The series of the previous result are reused where the sample is the
                // same: no label set is built for an unchanged sample.
                let base_len = entry.base.label_count();
                let reusable = |i: usize, name: &str, labels: &[(Symbol, Symbol)]| {
                    previous
                        .as_ref()
                        .filter(|_| same_base)
                        .and_then(|p| p.series.get(i))
                        .filter(|s| is_probe_series(s, base_len, name, labels))
                };
                let series = samples
                    .iter()
                    .enumerate()
                    .map(|(i, (name, labels, _))| match reusable(i, name, labels) {
                        Some(s) => s.clone(),
                        None => entry.base.probe(&agent_id, name, labels),
                    })
                    .collect();
                (series, samples.iter().map(|(_, _, v)| *v).collect())
            }
        };
        ch.out.push_row(SampleRow {
            series: series.clone(),
            timestamp_ms: r.timestamp_ms,
            values: values.clone(),
        });
        let previous_ts = previous.as_ref().map(|p| p.timestamp_ms);
        let mut bucket = match previous.as_ref().and_then(|p| p.bucket) {
            Some(b) if b.covers(r.timestamp_ms) => b,
            finished => {
                if let Some(b) = finished {
                    ch.durable
                        .history
                        .buckets
                        .push(((*key).clone(), agent_id.to_string(), b));
                }
                history::Bucket::starting(r.timestamp_ms)
            }
        };
        bucket.add(r.success, r.duration_seconds);
        // The target's shared state is touched only when this view's vote changes: a
        // result that repeats its agent's fresh verdict changes no count, and no other
        // view has gone stale or come due for a rewrite before `next_evaluation_ms`, so
        // the merge is the one already written and is not redone. (A later timestamp
        // only moves this view's staleness later, so `next_evaluation_ms` stays a safe
        // bound.) When it does change, the evaluation reads the tally's counts (O(log
        // n)), not every view.
        let merge_unchanged = previous.as_ref().is_some_and(|p| {
            p.success == r.success
                && entry.merged.is_some()
                && entry.last_written_ms != 0
                && now_ms < entry.next_evaluation_ms
                && freshness.is_some_and(|window| merge::is_fresh(p.timestamp_ms, now_ms, window))
        });
        // An agent in maintenance keeps its view (pages show it) but it does not count.
        let counted = !self.agents_in_maintenance.contains(&agent_id);
        let before = entry.set_view(
            agent_id.clone(),
            Some(Arc::new(LastResult {
                timestamp_ms: r.timestamp_ms,
                success: r.success,
                duration_seconds: r.duration_seconds,
                failure: r.failure.chars().take(MAX_FAILURE_CHARS).collect(),
                trace: r.trace.clone(),
                // Saturating: both timestamps come from the agent (found by fuzz/fleet_batch).
                spacing_ms: previous_ts.map(|p| r.timestamp_ms.saturating_sub(p)),
                series,
                values,
                bytes: samples_weigh,
                local,
                shape,
                config_epoch: self.config_epoch,
                base: entry.base.clone(),
                bucket: Some(bucket),
            })),
            counted,
        );
        ch.undo.views.push((entry.key.clone(), agent_id, before));
        if !merge_unchanged {
            self.evaluate(&key, now_ms, true, ch);
        }
        Ok(())
    }
}
