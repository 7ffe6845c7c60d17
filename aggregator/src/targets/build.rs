//! A discovered group of targets becomes the job's checks.

use super::{Target, TargetSet};
use sonde_proto::config::{ResolvedJob, TargetGroup, check_target};

pub(super) fn add_group(set: &mut TargetSet, job: &ResolvedJob, group: &TargetGroup) {
    for target in &group.targets {
        if let Err(e) = check_target(&job.module, target) {
            tracing::warn!(job = %job.name, target = %target, error = %e, "target skipped");
            continue;
        }
        set.entry((job.name.clone(), target.clone()))
            .or_insert_with(|| {
                std::sync::Arc::new(Target {
                    job: job.name.clone(),
                    instance: target.clone(),
                    labels: group.labels.clone(),
                })
            });
    }
}
