//! What an assignment does to this agent: which of its checks the agent trusts and runs,
//! which it refuses and why, and the report that tells the aggregator.

use super::Uplink;
use crate::assigned::{FilePolicy, Refusal, check_timing};
use crate::schedule::{CheckSpec, Source};
use sonde_proto::assignment::{Assembled, cut};
use sonde_proto::config::Module;
use sonde_proto::pb;
use std::collections::BTreeMap;
use std::sync::Arc;

impl Uplink {
    /// Runs the checks of a complete assignment that this agent accepts, in place of
    /// the previous assignment's; what it did, for the aggregator.
    pub(super) fn apply(&self, assignment: Assembled) -> pb::AssignmentReport {
        let generation = assignment.generation;
        let (checks, refused) = self.checks_of(assignment);
        tracing::info!(
            aggregator = %self.endpoint.address,
            generation,
            checks = checks.len(),
            refused = refused.iter().map(|r| r.checks).sum::<u64>(),
            "new assignment"
        );
        self.metrics
            .uplink(&self.endpoint.address, |u| u.generation = generation);
        let report = pb::AssignmentReport {
            generation,
            applied: true,
            error: String::new(),
            checks: checks.len() as u64,
            refused,
        };
        self.scheduler
            .set_checks(Source::Aggregator(self.index), checks);
        report
    }

    /// The checks of an assignment this agent accepts (see [`accept`]), and the refused
    /// ones by reason, each with its first example; each refused check is counted, and
    /// logged once per module and reason (timing problems once per assignment, with the
    /// first example).
    fn checks_of(&self, assignment: Assembled) -> (Vec<CheckSpec>, Vec<pb::RefusedChecks>) {
        let policy = self
            .file_policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (checks, refused) = accept(assignment, &policy);
        let mut counts: BTreeMap<Refusal, (u64, &RefusedCheck)> = BTreeMap::new();
        for r in &refused {
            counts.entry(r.reason).or_insert((0, r)).0 += 1;
            if r.reason != Refusal::BadTiming {
                self.log_refusal(&r.module_name, r.reason, &r.message);
            }
        }
        for (reason, (n, _)) in &counts {
            self.metrics.assignment_refused(*reason, *n);
        }
        if let Some((n, r)) = counts.get(&Refusal::BadTiming) {
            tracing::error!(
                aggregator = %self.endpoint.address,
                checks = n,
                first = %r.message,
                "refused assigned checks whose interval, timeout or retries are out of range (interval 1ms..24h, timeout 1ms..interval, retries <= 100); fix the job in the aggregator's config"
            );
        }
        let report = counts
            .into_iter()
            .map(|(reason, (n, r))| pb::RefusedChecks {
                reason: reason.as_str().to_string(),
                checks: n,
                example: cut(
                    &format!("module {:?}: {}", cut(&r.module_name, 200), r.message),
                    1000,
                )
                .to_string(),
            })
            .collect();
        (checks, report)
    }

    fn log_refusal(&self, module_name: &str, reason: Refusal, message: &str) {
        let module_name = cut(module_name, 200);
        let mut logged = self
            .logged_refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Bounded: a hostile aggregator could name endless modules.
        if logged.len() >= 1000 {
            logged.clear();
        }
        if logged.insert(format!("{module_name}\0{message}")) {
            tracing::error!(
                aggregator = %self.endpoint.address,
                module = %module_name,
                reason = reason.as_str(),
                "refused the assigned checks of this module: {}",
                cut(message, 1000)
            );
        }
    }
}

/// A check of an assignment that this agent refused.
#[derive(Debug)]
struct RefusedCheck {
    reason: Refusal,
    module_name: String,
    message: String,
}

/// An assigned module as this agent judged it: readable and allowed, or why not.
type Judged = Result<Arc<Module>, (Refusal, String)>;

/// Splits an assignment into the checks this agent runs and those it refuses: a module
/// it cannot read, a module naming a file outside `policy`, or an interval, timeout or
/// retries out of range ([`check_timing`]). Each module of the table is read and judged
/// once, and shared by its checks.
fn accept(assignment: Assembled, policy: &FilePolicy) -> (Vec<CheckSpec>, Vec<RefusedCheck>) {
    let modules: Vec<(String, Judged)> = assignment
        .modules
        .into_iter()
        .map(|m| {
            // A newer aggregator may send options this agent does not know.
            let module = serde_json::from_str::<Module>(&m.json)
                .map_err(|e| {
                    (
                        Refusal::BadModule,
                        format!("cannot read the module ({e}); upgrade this agent to the aggregator's version"),
                    )
                })
                .and_then(|module| {
                    policy
                        .check_module(&module)
                        .map_err(|e| (Refusal::FileNotAllowed, e.to_string()))?;
                    Ok(Arc::new(module))
                });
            (m.name, module)
        })
        .collect();
    let mut checks = Vec::with_capacity(assignment.checks.len());
    let mut refused = Vec::new();
    for check in assignment.checks {
        // The assembler checked every index; a missing module is refused all the same.
        let Some((module_name, module)) = modules.get(check.module as usize) else {
            refused.push(RefusedCheck {
                reason: Refusal::BadModule,
                module_name: String::new(),
                message: format!("module {} is not in the assignment", check.module),
            });
            continue;
        };
        let module = match module {
            Ok(m) => m.clone(),
            Err((reason, message)) => {
                refused.push(RefusedCheck {
                    reason: *reason,
                    module_name: module_name.clone(),
                    message: message.clone(),
                });
                continue;
            }
        };
        let (interval, timeout) =
            match check_timing(check.interval_ms, check.timeout_ms, check.retries) {
                Ok(t) => t,
                Err(e) => {
                    refused.push(RefusedCheck {
                        reason: Refusal::BadTiming,
                        module_name: module_name.clone(),
                        message: format!(
                            "job {:?} target {:?}: {e}",
                            cut(&check.job, 200),
                            cut(&check.instance, 200)
                        ),
                    });
                    continue;
                }
            };
        checks.push(CheckSpec {
            job: check.job,
            instance: check.instance,
            probe_target: Some(check.target).filter(|t| !t.is_empty()),
            module_name: module_name.clone(),
            module,
            interval,
            timeout,
            retries: check.retries,
            generation: assignment.generation,
        });
    }
    (checks, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    /// An assignment of checks given as (module JSON, interval, timeout), each distinct
    /// module once in its table.
    fn assignment(generation: u64, checks: &[(&str, u64, u64)]) -> Assembled {
        let mut out = Assembled {
            generation,
            ..Default::default()
        };
        for (json, interval_ms, timeout_ms) in checks {
            let module = match out.modules.iter().position(|m| m.json == *json) {
                Some(i) => i,
                None => {
                    out.modules.push(pb::AssignedModule {
                        name: format!("m{}", out.modules.len()),
                        json: json.to_string(),
                    });
                    out.modules.len() - 1
                }
            };
            out.checks.push(pb::Check {
                job: "web".into(),
                instance: format!("http://127.0.0.1/{}", out.checks.len()),
                interval_ms: *interval_ms,
                timeout_ms: *timeout_ms,
                retries: 0,
                module: module as u32,
                target: String::new(),
            });
        }
        out
    }

    #[test]
    fn an_assignment_keeps_the_checks_it_can_trust() {
        let policy = FilePolicy::new(&crate::config::AssignedModulesConfig {
            allowed_file_paths: Some(vec!["/etc/sonde/certs/*".into()]),
            ..Default::default()
        })
        .unwrap();
        let plain = r#"{"prober":"http"}"#;
        let allowed =
            r#"{"prober":"http","http":{"tls_config":{"ca_file":"/etc/sonde/certs/ca.pem"}}}"#;
        let shadow = r#"{"prober":"http","http":{"body_file":"/etc/shadow"}}"#;
        let escape = r#"{"prober":"http","http":{"body_file":"/etc/sonde/certs/../../shadow"}}"#;
        let relative = r#"{"prober":"tcp","tcp":{"tls_config":{"key_file":"key.pem"}}}"#;
        let seven = assignment(
            7,
            &[
                (plain, 15_000, 5_000),
                (allowed, 15_000, 5_000),
                (shadow, 15_000, 5_000),
                (escape, 15_000, 5_000),
                (relative, 15_000, 5_000),
                ("{not json", 15_000, 5_000),
                (plain, 0, 0),
                (plain, u64::MAX, u64::MAX),
                (plain, 1_000, 5_000),
                (plain, 15_000, 0),
            ],
        );
        let (checks, refused) = accept(seven, &policy);
        assert_eq!(checks.len(), 2);
        assert!(checks.iter().all(|c| c.generation == 7));
        let reasons: Vec<_> = refused.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            [
                Refusal::FileNotAllowed,
                Refusal::FileNotAllowed,
                Refusal::FileNotAllowed,
                Refusal::BadModule,
                Refusal::BadTiming,
                Refusal::BadTiming,
                Refusal::BadTiming,
                Refusal::BadTiming,
            ]
        );
        assert!(
            refused[0].message.contains("/etc/shadow"),
            "{}",
            refused[0].message
        );
        assert!(
            refused[0].message.contains("http.body_file"),
            "{}",
            refused[0].message
        );
        assert!(
            refused[2].message.contains("not an absolute path"),
            "{}",
            refused[2].message
        );
        // Without allowed_file_paths, even the certificate is refused.
        let (checks, refused) = accept(
            assignment(1, &[(allowed, 15_000, 5_000), (plain, 15_000, 5_000)]),
            &FilePolicy::new(&Default::default()).unwrap(),
        );
        assert_eq!(checks.len(), 1);
        assert_eq!(refused[0].reason, Refusal::FileNotAllowed);
    }
}
