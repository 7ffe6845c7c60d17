//! Putting an assignment back together from its parts (`Assignment` in fleet.proto), on
//! the agent, within bounds: an aggregator (trusted with what to probe, not with the
//! agent's memory) can make the agent hold at most one incomplete assignment of at most
//! [`Bounds`]. Pure: the agent feeds it the parts it receives and acts on the [`Step`]s.
//!
//! Here so that the aggregator's encoder is tested against the very code agents run.

use crate::pb;
use prost::Message;

/// What one assignment may hold; past any of them it is refused whole.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub max_parts: u32,
    /// Encoded bytes of all its parts.
    pub max_bytes: usize,
    pub max_checks: usize,
    pub max_modules: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_parts: 1 << 16,
            max_bytes: 256 << 20,
            max_checks: 1_000_000,
            max_modules: 100_000,
        }
    }
}

/// A complete assignment: its module table and its checks, every module index checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Assembled {
    pub generation: u64,
    pub modules: Vec<pb::AssignedModule>,
    pub checks: Vec<pb::Check>,
}

/// What a part did.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Taken; more parts are to come.
    Incomplete,
    /// The last part: the assignment is complete.
    Complete(Assembled),
    /// The assignment of `generation` is refused whole, for `reason`; the rest of its
    /// parts will be ignored.
    Refused { generation: u64, reason: String },
    /// A part of an assignment already complete or refused: nothing to do.
    Ignored,
}

#[derive(Debug)]
struct Partial {
    generation: u64,
    next_part: u32,
    bytes: usize,
    modules: Vec<pb::AssignedModule>,
    checks: Vec<pb::Check>,
}

/// One stream's assembler (a new stream starts a new one).
#[derive(Debug, Default)]
pub struct Assembler {
    bounds: Bounds,
    partial: Option<Partial>,
    /// The generation last completed or refused: later parts of it are ignored.
    finished: Option<u64>,
}

impl Assembler {
    pub fn new(bounds: Bounds) -> Self {
        Self {
            bounds,
            partial: None,
            finished: None,
        }
    }

    /// The generation of the incomplete assignment being received, if any.
    pub fn pending(&self) -> Option<u64> {
        self.partial.as_ref().map(|p| p.generation)
    }

    /// Takes the next part received. A part of another generation than the incomplete
    /// one drops it and starts anew (aggregators send whole assignments, newest last).
    pub fn push(&mut self, part: pb::Assignment) -> Step {
        let generation = part.generation;
        if self.finished == Some(generation) {
            return Step::Ignored;
        }
        let bytes = part.encoded_len();
        let partial = match &mut self.partial {
            Some(p) if p.generation == generation => p,
            _ => {
                self.partial = None;
                if part.part != 0 {
                    return self.refuse(
                        generation,
                        format!(
                            "part {} of assignment {generation} arrived before its part 0",
                            part.part
                        ),
                    );
                }
                self.partial.insert(Partial {
                    generation,
                    next_part: 0,
                    bytes: 0,
                    modules: Vec::new(),
                    checks: Vec::new(),
                })
            }
        };
        if part.part != partial.next_part {
            let reason = format!(
                "part {} of assignment {generation} arrived where part {} was expected",
                part.part, partial.next_part
            );
            return self.refuse(generation, reason);
        }
        let bounds = self.bounds;
        let parts = partial.next_part as u64 + 1;
        let total_bytes = partial.bytes.saturating_add(bytes);
        let checks = partial.checks.len().saturating_add(part.checks.len());
        let modules = partial.modules.len().saturating_add(part.modules.len());
        let over = if parts > u64::from(bounds.max_parts) {
            Some(format!("more than {} parts", bounds.max_parts))
        } else if total_bytes > bounds.max_bytes {
            Some(format!("more than {}", size(bounds.max_bytes)))
        } else if checks > bounds.max_checks {
            Some(format!("more than {} checks", bounds.max_checks))
        } else if modules > bounds.max_modules {
            Some(format!("more than {} modules", bounds.max_modules))
        } else {
            None
        };
        if let Some(over) = over {
            let reason = format!(
                "assignment {generation} has {over}, the most this agent takes; assign fewer targets to it (split the job, or narrow its agent selector)"
            );
            return self.refuse(generation, reason);
        }
        partial.next_part += 1;
        partial.bytes = total_bytes;
        partial.modules.extend(part.modules);
        partial.checks.extend(part.checks);
        if !part.last {
            return Step::Incomplete;
        }
        let Some(done) = self.partial.take() else {
            return Step::Incomplete;
        };
        let table = done.modules.len();
        if let Some(bad) = done.checks.iter().find(|c| c.module as usize >= table) {
            let reason = format!(
                "check of job {:?} target {:?} refers to module {}, and assignment {generation} has {table} modules",
                cut(&bad.job, 200),
                cut(&bad.instance, 200),
                bad.module
            );
            return self.refuse(generation, reason);
        }
        self.finished = Some(generation);
        Step::Complete(Assembled {
            generation,
            modules: done.modules,
            checks: done.checks,
        })
    }

    fn refuse(&mut self, generation: u64, reason: String) -> Step {
        self.partial = None;
        self.finished = Some(generation);
        Step::Refused { generation, reason }
    }
}

fn size(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (for messages that quote
/// what a peer sent).
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str) -> pb::AssignedModule {
        pb::AssignedModule {
            name: name.into(),
            json: format!(r#"{{"prober":"{name}"}}"#),
        }
    }

    fn check(n: u32, module: u32) -> pb::Check {
        pb::Check {
            job: "web".into(),
            instance: format!("10.0.0.{n}:80"),
            interval_ms: 60_000,
            timeout_ms: 5_000,
            retries: 0,
            module,
            target: String::new(),
        }
    }

    fn part(
        generation: u64,
        part: u32,
        last: bool,
        modules: Vec<pb::AssignedModule>,
        checks: Vec<pb::Check>,
    ) -> pb::Assignment {
        pb::Assignment {
            generation,
            checks,
            part,
            last,
            modules,
        }
    }

    #[test]
    fn parts_in_order_make_the_assignment() {
        let mut a = Assembler::default();
        assert_eq!(
            a.push(part(3, 0, false, vec![module("tcp")], vec![check(1, 0)])),
            Step::Incomplete
        );
        assert_eq!(a.pending(), Some(3));
        assert_eq!(
            a.push(part(3, 1, false, vec![module("http")], vec![])),
            Step::Incomplete
        );
        let Step::Complete(done) = a.push(part(3, 2, true, vec![], vec![check(2, 1)])) else {
            panic!("expected the assignment complete");
        };
        assert_eq!(done.generation, 3);
        assert_eq!(done.modules, [module("tcp"), module("http")]);
        assert_eq!(done.checks, [check(1, 0), check(2, 1)]);
        assert_eq!(a.pending(), None);
        // A duplicate of a part of a finished assignment changes nothing.
        assert_eq!(a.push(part(3, 2, true, vec![], vec![])), Step::Ignored);
        // An empty assignment is one part: no checks at all.
        let Step::Complete(empty) = a.push(part(4, 0, true, vec![], vec![])) else {
            panic!("expected an empty assignment");
        };
        assert!(empty.checks.is_empty());
    }

    #[test]
    fn parts_out_of_order_refuse_the_assignment() {
        let mut a = Assembler::default();
        assert_eq!(
            a.push(part(5, 0, false, vec![module("tcp")], vec![check(1, 0)])),
            Step::Incomplete
        );
        let Step::Refused { generation, reason } =
            a.push(part(5, 2, true, vec![], vec![check(2, 0)]))
        else {
            panic!("a skipped part must refuse the assignment");
        };
        assert_eq!(generation, 5);
        assert!(
            reason.contains("part 2") && reason.contains("part 1"),
            "{reason}"
        );
        // The rest of it is ignored, once.
        assert_eq!(a.push(part(5, 1, false, vec![], vec![])), Step::Ignored);
        // An assignment starting past part 0 is refused too.
        let Step::Refused { reason, .. } = a.push(part(6, 1, true, vec![], vec![])) else {
            panic!("an assignment without its part 0 must be refused");
        };
        assert!(reason.contains("before its part 0"), "{reason}");
        // A part repeated is out of order.
        a.push(part(7, 0, false, vec![module("tcp")], vec![]));
        assert!(matches!(
            a.push(part(7, 0, false, vec![], vec![])),
            Step::Refused { generation: 7, .. }
        ));
    }

    #[test]
    fn a_new_generation_drops_an_incomplete_one() {
        let mut a = Assembler::default();
        a.push(part(8, 0, false, vec![module("tcp")], vec![check(1, 0)]));
        a.push(part(8, 1, false, vec![], vec![check(2, 0)]));
        let Step::Complete(done) =
            a.push(part(9, 0, true, vec![module("http")], vec![check(3, 0)]))
        else {
            panic!("generation 9 is complete in one part");
        };
        assert_eq!(done.generation, 9);
        assert_eq!(done.modules, [module("http")]);
        assert_eq!(done.checks, [check(3, 0)]);
        // The last part of the dropped one arrives late: it has no part 0 any more.
        assert!(matches!(
            a.push(part(8, 2, true, vec![], vec![])),
            Step::Refused { generation: 8, .. }
        ));
    }

    #[test]
    fn a_module_index_out_of_range_refuses_the_assignment() {
        let mut a = Assembler::default();
        let Step::Refused { reason, .. } = a.push(part(
            1,
            0,
            true,
            vec![module("tcp")],
            vec![check(1, 0), check(2, 1)],
        )) else {
            panic!("module 1 of a table of 1 must be refused");
        };
        assert!(reason.contains("refers to module 1"), "{reason}");
        assert!(reason.contains("10.0.0.2:80"), "{reason}");
        let Step::Refused { .. } = a.push(part(2, 0, true, vec![], vec![check(1, u32::MAX)]))
        else {
            panic!("no module table at all");
        };
    }

    #[test]
    fn bounds_refuse_the_assignment() {
        let bounds = Bounds {
            max_parts: 3,
            max_bytes: 10_000,
            max_checks: 100,
            max_modules: 2,
        };
        let checks = |n: u32| (0..n).map(|i| check(i, 0)).collect::<Vec<_>>();
        let cases: [(Vec<pb::Assignment>, &str); 4] = [
            (
                (0..4).map(|p| part(1, p, p == 3, vec![], vec![])).collect(),
                "more than 3 parts",
            ),
            (
                vec![
                    part(1, 0, false, vec![], checks(60)),
                    part(1, 1, true, vec![], checks(60)),
                ],
                "more than 100 checks",
            ),
            (
                vec![part(
                    1,
                    0,
                    true,
                    vec![module("a"), module("b"), module("c")],
                    vec![],
                )],
                "more than 2 modules",
            ),
            (
                vec![part(
                    1,
                    0,
                    true,
                    vec![pb::AssignedModule {
                        name: "big".into(),
                        json: "x".repeat(20_000),
                    }],
                    vec![],
                )],
                "more than 10000 bytes",
            ),
        ];
        for (parts, want) in cases {
            let mut a = Assembler::new(bounds);
            let last = parts.into_iter().map(|p| a.push(p)).last().unwrap();
            let Step::Refused { reason, .. } = &last else {
                panic!("expected {want:?}, got {last:?}");
            };
            assert!(reason.contains(want), "{reason}");
            assert_eq!(a.pending(), None, "nothing of it is held");
        }
    }
}
