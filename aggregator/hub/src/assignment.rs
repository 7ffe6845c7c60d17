//! An agent's assignment on the wire (`Assignment` in fleet.proto): the checks planned
//! for it with their module table ([`Planner`]), cut into parts that each stay under a
//! byte budget ([`encode`]), and what the agent reported doing with it
//! ([`AssignmentStatus`]).
//!
//! Each module travels once per assignment, so a check costs its job, target and
//! timings (tens of bytes), and no part grows with the number of checks: an assignment
//! of any size passes both sides' message limits.

use crate::targets::Target;
use prost::Message;
use prost::encoding::encoded_len_varint;
use serde_json::{Value, json};
use sonde_proto::config::ResolvedJob;
use sonde_proto::pb::{self, AggregatorMessage, AssignedModule, Check, aggregator_message};
use std::collections::{BTreeMap, HashMap};

/// The most one part may take, encoded: far under [`MAX_ENCODE_BYTES`] and the agent's
/// decode limit (16 MiB in sonde-agent, 4 MiB in tonic's default), so that an agent of
/// any version since protocol 2 takes it.
pub const PART_BUDGET: usize = 1 << 20;
/// The largest message the aggregator sends (the gRPC server's encode limit).
pub const MAX_ENCODE_BYTES: usize = 4 << 20;
/// Messages queued to one agent's stream: room for the parts of three assignments of
/// the million checks an agent takes at most (about 75 parts each, at some 75 bytes a
/// check) and the acks between them, and a bound (256 MiB) on what an agent that stops
/// reading makes the aggregator hold before its stream is closed.
pub const AGENT_CHANNEL: usize = 256;
/// What the outer messages and the part's own fields (generation, part, last) add.
const PART_OVERHEAD: usize = 64;

/// An agent's assignment before it is cut into parts: what is compared to decide
/// whether the agent needs a new one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Planned {
    pub modules: Vec<AssignedModule>,
    pub checks: Vec<Check>,
}

impl Planned {
    /// Forgets what was sent, so the next plan is sent even if equal (a new stream).
    pub fn clear(&mut self) {
        self.modules.clear();
        self.checks.clear();
    }
}

/// Each job's module, JSON-encoded once for every agent's plan.
pub struct Planner<'a> {
    jobs: BTreeMap<&'a str, (&'a ResolvedJob, String)>,
}

impl<'a> Planner<'a> {
    pub fn new(jobs: &'a [ResolvedJob]) -> Self {
        let jobs = jobs
            .iter()
            .map(|j| {
                let json = serde_json::to_string(&j.module).unwrap_or_default();
                (j.name.as_str(), (j, json))
            })
            .collect();
        Self { jobs }
    }

    pub fn job(&self, name: &str) -> Option<&'a ResolvedJob> {
        self.jobs.get(name).map(|(j, _)| *j)
    }

    /// The plan of `selected` (targets with their job, in the order to send them): each
    /// distinct module (name and content) once in the table, in order of first use.
    pub fn plan<'t>(
        &self,
        selected: impl Iterator<Item = (&'a ResolvedJob, &'t Target)>,
    ) -> Planned {
        let mut planned = Planned::default();
        let mut index: HashMap<(&str, &str), u32> = HashMap::new();
        for (job, target) in selected {
            let json = self
                .jobs
                .get(job.name.as_str())
                .map_or("", |(_, j)| j.as_str());
            let module = *index
                .entry((job.module_name.as_str(), json))
                .or_insert_with(|| {
                    planned.modules.push(AssignedModule {
                        name: job.module_name.clone(),
                        json: json.to_string(),
                    });
                    (planned.modules.len() - 1) as u32
                });
            planned.checks.push(Check {
                job: target.job.clone(),
                instance: target.instance.clone(),
                target: target.probe_target.clone().unwrap_or_default(),
                interval_ms: job.interval.as_millis() as u64,
                timeout_ms: job.timeout.as_millis() as u64,
                retries: job.retries,
                module,
            });
        }
        planned
    }
}

/// The wire size of one element of a repeated message field.
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// A module or a check too large for any part of an assignment.
#[derive(Debug, thiserror::Error)]
pub enum TooLargeForAPart {
    #[error(
        "module {module:?} is {bytes} bytes encoded, more than the {budget} bytes of an assignment part"
    )]
    Module {
        module: String,
        bytes: usize,
        budget: usize,
    },
    /// `job` and `instance` as they may be logged ([`crate::refusals::loggable`]).
    #[error(
        "the check of job {job:?} target {instance:?} is {bytes} bytes encoded, more than the {budget} bytes of an assignment part"
    )]
    Check {
        job: String,
        instance: String,
        bytes: usize,
        budget: usize,
    },
}

/// The parts of assignment `generation` of `planned`, in order: the module table first,
/// then the checks, each part's encoded `AggregatorMessage` at most `budget` bytes, the
/// final one marked `last` (an empty plan is one empty last part). Fails only when a
/// single module or check does not fit in a part at all.
pub fn encode(
    generation: u64,
    planned: &Planned,
    budget: usize,
) -> Result<Vec<AggregatorMessage>, TooLargeForAPart> {
    let room = budget.saturating_sub(PART_OVERHEAD);
    let mut parts: Vec<pb::Assignment> = Vec::new();
    let mut current = pb::Assignment {
        generation,
        part: 0,
        ..Default::default()
    };
    let mut used = 0;
    let next_part = |current: &mut pb::Assignment, used: &mut usize| {
        let number = current.part + 1;
        let full = std::mem::replace(
            current,
            pb::Assignment {
                generation,
                part: number,
                ..Default::default()
            },
        );
        *used = 0;
        full
    };
    for module in &planned.modules {
        let len = field_len(module.encoded_len());
        if len > room {
            return Err(TooLargeForAPart::Module {
                module: module.name.clone(),
                bytes: module.encoded_len(),
                budget,
            });
        }
        if used + len > room {
            parts.push(next_part(&mut current, &mut used));
        }
        current.modules.push(module.clone());
        used += len;
    }
    for check in &planned.checks {
        let len = field_len(check.encoded_len());
        if len > room {
            return Err(TooLargeForAPart::Check {
                job: crate::refusals::loggable(&check.job).to_string(),
                instance: crate::refusals::loggable(&check.instance).to_string(),
                bytes: check.encoded_len(),
                budget,
            });
        }
        if used + len > room {
            parts.push(next_part(&mut current, &mut used));
        }
        current.checks.push(check.clone());
        used += len;
    }
    current.last = true;
    parts.push(current);
    Ok(parts
        .into_iter()
        .map(|a| AggregatorMessage {
            msg: Some(aggregator_message::Msg::Assignment(a)),
        })
        .collect())
}

/// Checks refused one by one, for one reason, as the agent reported them.
#[derive(Clone, Debug, PartialEq)]
pub struct RefusedChecks {
    pub reason: String,
    pub checks: u64,
    pub example: String,
}

/// What became of an agent's latest assignment.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum AssignmentStatus {
    /// Nothing sent yet.
    #[default]
    None,
    /// Sent; the agent has not reported on it (yet).
    Sent { generation: u64, checks: usize },
    /// The agent runs `checks` of it; `refused` were refused one by one.
    Applied {
        generation: u64,
        checks: u64,
        refused: Vec<RefusedChecks>,
    },
    /// The agent refused it whole and keeps running its previous checks.
    Refused { generation: u64, error: String },
}

/// Longest string of an agent's report kept (each escaped, so it is safe to show and log).
const MAX_REPORT_CHARS: usize = 500;
/// Refusal reasons kept from one report.
const MAX_REPORT_REASONS: usize = 16;

/// `s` as an agent sent it, cut to `max` characters, its control and bidirectional
/// formatting characters escaped: safe in a log line, and on a page once HTML-escaped.
pub fn untrusted(s: &str, max: usize) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    let mut out = String::new();
    for c in s.chars().take(max) {
        if hidden(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    let total = s.chars().count();
    if total > max {
        out.push_str(&format!("…(+{} chars)", total - max));
    }
    out
}

impl AssignmentStatus {
    /// The status an agent's report says, its strings bounded and escaped.
    pub fn from_report(report: &pb::AssignmentReport) -> Self {
        if !report.applied {
            return Self::Refused {
                generation: report.generation,
                error: untrusted(&report.error, MAX_REPORT_CHARS),
            };
        }
        Self::Applied {
            generation: report.generation,
            checks: report.checks,
            refused: report
                .refused
                .iter()
                .take(MAX_REPORT_REASONS)
                .map(|r| RefusedChecks {
                    reason: untrusted(&r.reason, 32),
                    checks: r.checks,
                    example: untrusted(&r.example, MAX_REPORT_CHARS),
                })
                .collect(),
        }
    }

    pub fn generation(&self) -> Option<u64> {
        match self {
            Self::None => None,
            Self::Sent { generation, .. }
            | Self::Applied { generation, .. }
            | Self::Refused { generation, .. } => Some(*generation),
        }
    }

    /// One line for people: "assignment 7: 50,000 checks applied".
    pub fn text(&self) -> String {
        match self {
            Self::None => "no assignment sent".into(),
            Self::Sent { generation, checks } => format!(
                "assignment {generation}: {} sent, not confirmed yet",
                count_checks(*checks as u64)
            ),
            Self::Applied {
                generation,
                checks,
                refused,
            } => {
                let mut text =
                    format!("assignment {generation}: {} applied", count_checks(*checks));
                for r in refused {
                    text.push_str(&format!(
                        "; {} refused ({}: {})",
                        thousands(r.checks),
                        r.reason,
                        r.example
                    ));
                }
                text
            }
            Self::Refused { generation, error } => {
                format!("assignment {generation} refused: {error}")
            }
        }
    }

    /// For `/api/v1/agents`.
    pub fn json(&self) -> Value {
        let (state, generation) = match self {
            Self::None => ("none", None),
            Self::Sent { generation, .. } => ("sent", Some(generation)),
            Self::Applied { generation, .. } => ("applied", Some(generation)),
            Self::Refused { generation, .. } => ("refused", Some(generation)),
        };
        let mut out = json!({
            "state": state,
            "generation": generation,
            "text": self.text(),
        });
        match self {
            Self::Sent { checks, .. } => out["checks"] = json!(checks),
            Self::Applied {
                checks, refused, ..
            } => {
                out["checks"] = json!(checks);
                out["refused"] = refused
                    .iter()
                    .map(|r| json!({"reason": r.reason, "checks": r.checks, "example": r.example}))
                    .collect();
            }
            Self::Refused { error, .. } => out["error"] = json!(error),
            Self::None => {}
        }
        out
    }
}

/// "1 check", "50,000 checks".
fn count_checks(n: u64) -> String {
    if n == 1 {
        "1 check".into()
    } else {
        format!("{} checks", thousands(n))
    }
}

/// 50000 → "50,000".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_proto::assignment::{Assembler, Bounds, Step};

    fn planned(checks: usize, modules: usize) -> Planned {
        Planned {
            modules: (0..modules)
                .map(|m| AssignedModule {
                    name: format!("module_{m}"),
                    json: format!(
                        r#"{{"prober":"http","http":{{"headers":{{"X-Module":"{}"}}}}}}"#,
                        "m".repeat(100 + m)
                    ),
                })
                .collect(),
            checks: (0..checks)
                .map(|n| Check {
                    job: format!("job_{}", n % 7),
                    instance: format!("https://host-{n}.shop.example.com/health?probe=sonde"),
                    interval_ms: 60_000,
                    timeout_ms: 5_000,
                    retries: 1,
                    module: (n % modules.max(1)) as u32,
                    target: String::new(),
                })
                .collect(),
        }
    }

    fn assemble(parts: Vec<AggregatorMessage>) -> Step {
        let mut assembler = Assembler::new(Bounds::default());
        let mut last = Step::Incomplete;
        for message in parts {
            let Some(aggregator_message::Msg::Assignment(part)) = message.msg else {
                panic!("not an assignment part");
            };
            assert_eq!(last, Step::Incomplete, "a step after the last part");
            last = assembler.push(part);
        }
        last
    }

    #[test]
    fn fifty_thousand_checks_travel_in_parts_under_the_budget() {
        let plan = planned(50_000, 5);
        let parts = encode(7, &plan, PART_BUDGET).unwrap();
        assert!(parts.len() >= 3, "{} parts", parts.len());
        let mut modules_sent = 0;
        for (n, message) in parts.iter().enumerate() {
            assert!(
                message.encoded_len() <= PART_BUDGET,
                "part {n} is {} bytes",
                message.encoded_len()
            );
            let Some(aggregator_message::Msg::Assignment(a)) = &message.msg else {
                panic!("not an assignment part");
            };
            assert_eq!(a.generation, 7);
            assert_eq!(a.part as usize, n);
            assert_eq!(a.last, n == parts.len() - 1);
            modules_sent += a.modules.len();
        }
        assert_eq!(modules_sent, 5, "each module once");
        let bytes: usize = parts.iter().map(|p| p.encoded_len()).sum();
        eprintln!(
            "50,000 checks of 5 modules: {} parts, {bytes} bytes ({} per check)",
            parts.len(),
            bytes / 50_000
        );
        let Step::Complete(done) = assemble(parts) else {
            panic!("the agent's assembler did not complete the assignment");
        };
        assert_eq!(done.generation, 7);
        assert_eq!(done.modules, plan.modules);
        assert_eq!(done.checks, plan.checks);
    }

    #[test]
    fn small_budgets_and_empty_plans() {
        let plan = planned(1_000, 3);
        let parts = encode(2, &plan, 4_096).unwrap();
        assert!(parts.len() > 10);
        assert!(parts.iter().all(|p| p.encoded_len() <= 4_096));
        let Step::Complete(done) = assemble(parts) else {
            panic!("incomplete");
        };
        assert_eq!(done.checks, plan.checks);

        let parts = encode(3, &Planned::default(), PART_BUDGET).unwrap();
        assert_eq!(parts.len(), 1);
        let Step::Complete(done) = assemble(parts) else {
            panic!("incomplete");
        };
        assert!(done.checks.is_empty() && done.modules.is_empty());
    }

    #[test]
    fn what_cannot_fit_in_a_part_is_an_error() {
        let mut plan = planned(10, 1);
        plan.modules[0].json = "x".repeat(10_000);
        let e = encode(1, &plan, 4_096).unwrap_err().to_string();
        assert!(e.contains("module_0") && e.contains("4096"), "{e}");
    }

    #[test]
    fn reports_are_shown_bounded_and_escaped() {
        let refused = AssignmentStatus::from_report(&pb::AssignmentReport {
            generation: 7,
            applied: false,
            error: format!("too big\n\x1b[31m{}", "x".repeat(10_000)),
            checks: 0,
            refused: vec![],
        });
        let text = refused.text();
        assert!(
            text.starts_with("assignment 7 refused: too big\\n\\u{1b}[31m"),
            "{text}"
        );
        assert!(text.len() < 1_000, "{}", text.len());
        let applied = AssignmentStatus::from_report(&pb::AssignmentReport {
            generation: 8,
            applied: true,
            error: String::new(),
            checks: 50_000,
            refused: (0..100)
                .map(|_| pb::RefusedChecks {
                    reason: "file_not_allowed".into(),
                    checks: 10,
                    example: "http.body_file: \"/etc/shadow\"".into(),
                })
                .collect(),
        });
        let text = applied.text();
        assert!(
            text.starts_with("assignment 8: 50,000 checks applied; 10 refused (file_not_allowed: "),
            "{text}"
        );
        assert_eq!(text.matches("refused").count(), MAX_REPORT_REASONS);
        assert_eq!(applied.json()["state"], "applied");
        assert_eq!(applied.json()["checks"], 50_000);
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
