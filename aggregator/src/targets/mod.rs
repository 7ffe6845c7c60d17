//! Target discovery: every job's target groups, from each of its discovery sources,
//! turned into the checks the hub places on agents.
//!
//! As in Prometheus, a source produces [`Group`]s: a `source` name unique within the
//! source, targets that are each a label set (`__address__` plus the mechanism's
//! `__meta_*` labels) and labels common to the group. [`Discovery::targets`] reads the
//! latest groups of every source of every job and hands each group to the conversion
//! into checks (relabeling, then `build::add_group`).
//!
//! Two kinds of sources:
//! - **polled in place** on each pass of the discovery thread (once a second):
//!   `static_configs` and `file_sd_configs` (files re-read when they change);
//! - **background** ([`source`]): one Tokio task per `*_sd_configs` entry, started the
//!   first time a pass sees the entry and stopped (aborted) when a reload removes or
//!   changes it. It publishes its complete current list through a [`Publisher`];
//!   a failed refresh is reported with [`Publisher::failed`] (logged, counted in
//!   `sonde_sd_refresh_failures_total{mechanism}`) and keeps the last good list.
//!
//! # Plugging in a mechanism
//! 1. Its config type goes in `sonde_proto::config` (a `Vec<…>` field on `JobConfig`,
//!    checked in `resolve.rs` so a bad entry names its job and field).
//! 2. A file here with `fn source(job: &str, config: &TheConfig) -> Source`: the
//!    [`Source`]'s task loops forever, calling `publisher.publish(groups)` with the
//!    whole list each time it changes (a list/watch mechanism) or using
//!    [`Publisher::poll_every`] (a polling one), and `publisher.failed(&error)` when a
//!    refresh fails. Targets carry `__address__` and the mechanism's `__meta_*` labels.
//! 3. One line in `Discovery::job_groups`: `self.background(job, "name",
//!    &job.config.the_sd_configs, the_module::source, &mut groups)`, the field in
//!    [`Discovery::is_dynamic`] (so the discovery thread looks for changes), and the
//!    mechanism's name in [`source::BACKGROUND_MECHANISMS`].
//!
//! The discovery thread notices new lists on its next pass; nothing else is needed.

mod build;
mod dns_sd;
mod file_sd;
mod http_sd;
pub mod kubernetes;
pub mod source;

pub use file_sd::{FileSdError, parse_groups, read_groups};
pub use http_sd::parse as parse_http_sd;
pub use sonde_hub::targets::{Target, TargetSet};
pub use source::{DiscoveryCounters, Publisher, Source};

use file_sd::FileSd;
use serde::Serialize;
use sonde_proto::config::{Labels, ResolvedJob, TargetGroup};
use std::collections::HashSet;
use std::sync::Arc;

/// The label holding a target's address, as in Prometheus.
pub const ADDRESS_LABEL: &str = "__address__";

/// A group of discovered targets, as Prometheus's discovery hands them over.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Group {
    /// Names the group within its source (a file and index, a URL and index, a DNS name).
    pub source: String,
    /// One label set per target: `__address__` and the mechanism's `__meta_*` labels.
    pub targets: Vec<Labels>,
    /// Labels every target of the group gets (the target's own win).
    pub labels: Labels,
}

impl Group {
    /// A `static_configs` / file_sd group: its targets as bare addresses.
    pub fn from_target_group(source: String, group: &TargetGroup, meta: &Labels) -> Self {
        Self {
            source,
            targets: group
                .targets
                .iter()
                .map(|t| {
                    let mut labels = meta.clone();
                    labels.insert(ADDRESS_LABEL.to_string(), t.clone());
                    labels
                })
                .collect(),
            labels: group.labels.clone(),
        }
    }
}

/// Every job's discovery: the file_sd cache and the background sources.
#[derive(Default)]
pub struct Discovery {
    files: FileSd,
    sources: source::Sources,
    /// Background source keys seen in the current pass.
    wanted: HashSet<String>,
}

impl Discovery {
    /// Discovery's self-metrics.
    pub fn counters(&self) -> Arc<DiscoveryCounters> {
        self.sources.counters.clone()
    }

    /// True when some job of `jobs` has a source that can change without a reload.
    pub fn is_dynamic(jobs: &[ResolvedJob]) -> bool {
        jobs.iter().any(|j| {
            let c = &j.config;
            !c.file_sd_configs.is_empty()
                || !c.http_sd_configs.is_empty()
                || !c.dns_sd_configs.is_empty()
                || !c.kubernetes_sd_configs.is_empty()
        })
    }

    /// Every job's targets: static ones, file_sd files re-read if they changed, the
    /// latest lists of the background sources (started for new entries, stopped for
    /// entries no job has any more).
    pub fn targets(&mut self, jobs: &[ResolvedJob]) -> TargetSet {
        let mut set = TargetSet::new();
        self.wanted.clear();
        self.files.begin_pass();
        for job in jobs {
            for group in self.job_groups(job) {
                hand_over(&mut set, job, &group);
            }
        }
        self.files.end_pass();
        self.sources.retain(&self.wanted);
        set
    }

    /// The latest groups of every source of `job`.
    fn job_groups(&mut self, job: &ResolvedJob) -> Vec<Group> {
        let mut groups = Vec::new();
        for (i, g) in job.config.static_configs.iter().enumerate() {
            groups.push(Group::from_target_group(i.to_string(), g, &Labels::new()));
        }
        for sd in &job.config.file_sd_configs {
            self.files.groups(sd, &mut groups);
        }
        let http = &job.config.http_sd_configs;
        self.background(job, "http", http, http_sd::source, &mut groups);
        let dns = &job.config.dns_sd_configs;
        self.background(job, "dns", dns, dns_sd::source, &mut groups);
        self.background(
            job,
            "kubernetes",
            &job.config.kubernetes_sd_configs,
            kubernetes::source,
            &mut groups,
        );
        groups
    }

    /// The latest groups of `job`'s `configs` entries of one background mechanism.
    fn background<C: Serialize>(
        &mut self,
        job: &ResolvedJob,
        mechanism: &str,
        configs: &[C],
        make: fn(&str, &C) -> Source,
        out: &mut Vec<Group>,
    ) {
        for (i, config) in configs.iter().enumerate() {
            let identity = serde_json::to_string(config).unwrap_or_default();
            let key = format!("{}\u{0}{mechanism}\u{0}{i}\u{0}{identity}", job.name);
            self.wanted.insert(key.clone());
            let latest = self
                .sources
                .latest(key, &job.name, || make(&job.name, config));
            out.extend(latest.iter().cloned());
        }
    }
}

/// Turns one discovered group into checks: each target's labels (`__address__`, its
/// `__meta_*`) with the group's under them go through the job's `relabel_configs`, as in
/// Prometheus ([`build`]).
fn hand_over(set: &mut TargetSet, job: &ResolvedJob, group: &Group) {
    build::add_labeled_group(set, job, group.targets.iter().cloned(), &group.labels);
}
