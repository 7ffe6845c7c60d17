//! `slo:` in the aggregator's file: an availability objective per job, which the
//! reports measure each target's error budget against.

use serde::Deserialize;
use std::collections::BTreeMap;

/// One entry of `slo:`: `{job: web, objective: 99.9}` (percent).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloEntry {
    pub job: String,
    pub objective: f64,
}

/// What is wrong with an `slo:` entry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SloProblem {
    #[error("slo: an entry has an empty job; name the job the objective is for")]
    NoJob,
    #[error(
        "slo: job {job:?}: objective {objective} is not a percentage strictly between 0 and 100; write e.g. 99.9 for 99.9 %"
    )]
    Objective { job: String, objective: f64 },
    #[error("slo: job {job:?} has two objectives ({first} and {second}); keep one entry per job")]
    Duplicate {
        job: String,
        first: f64,
        second: f64,
    },
}

/// Checks one entry against those before it (`seen`: job → objective).
pub fn check(entry: &SloEntry, seen: &BTreeMap<String, f64>) -> Result<(), SloProblem> {
    if entry.job.is_empty() {
        return Err(SloProblem::NoJob);
    }
    if !(entry.objective > 0.0 && entry.objective < 100.0) {
        return Err(SloProblem::Objective {
            job: entry.job.clone(),
            objective: entry.objective,
        });
    }
    if let Some(first) = seen.get(&entry.job) {
        return Err(SloProblem::Duplicate {
            job: entry.job.clone(),
            first: *first,
            second: entry.objective,
        });
    }
    Ok(())
}

/// The warning for an objective whose job the file does not configure.
pub fn unknown_job_warning(job: &str) -> String {
    format!(
        "slo: job {job:?} is not among jobs:; its objective applies only if an agent declares a local job of that name (check the spelling)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objectives_are_percentages_strictly_inside_0_and_100_once_per_job() {
        let e = |job: &str, objective| SloEntry {
            job: job.into(),
            objective,
        };
        let mut seen = BTreeMap::new();
        assert_eq!(check(&e("web", 99.9), &seen), Ok(()));
        for bad in [0.0, 100.0, -1.0, 250.0, f64::NAN] {
            let p = check(&e("web", bad), &seen).unwrap_err();
            assert!(p.to_string().contains("strictly between 0 and 100"), "{p}");
        }
        assert_eq!(check(&e("", 99.0), &seen), Err(SloProblem::NoJob));
        seen.insert("web".to_string(), 99.9);
        assert!(
            check(&e("web", 99.0), &seen)
                .unwrap_err()
                .to_string()
                .contains("two objectives")
        );
    }
}
