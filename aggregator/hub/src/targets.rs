//! A job's targets as the hub sees them: plain data, discovered by the caller (static
//! configs and file_sd files are read outside the hub).

use sonde_proto::config::Labels;
use std::collections::BTreeMap;

/// A target of a job, with the labels of the group it came from (after relabeling).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub job: String,
    pub instance: String,
    /// What the agents probe when it is not the instance: a relabeled job's
    /// `__param_target` (Prometheus's `instance` may be rewritten apart from it).
    pub probe_target: Option<String>,
    pub labels: Labels,
}

/// `(job, instance)` → target.
/// Shared: the hub hands the same target to every result for it without copying labels.
pub type TargetSet = BTreeMap<(String, String), std::sync::Arc<Target>>;
