//! Assignment parts as an agent receives them from an aggregator it does not fully
//! trust: a stream of length-delimited `Assignment`s → `assignment::Assembler` (with
//! small bounds, so the fuzzer reaches them). A complete assignment must be within the
//! bounds and refer only to modules it carries; nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sonde_proto::assignment::{Assembler, Bounds, Step};
use sonde_proto::pb;

fuzz_target!(|data: &[u8]| {
    let bounds = Bounds {
        max_parts: 8,
        max_bytes: 4096,
        max_checks: 64,
        max_modules: 4,
    };
    let mut assembler = Assembler::new(bounds);
    let mut input = data;
    while let Ok(part) = pb::Assignment::decode_length_delimited(&mut input) {
        let generation = part.generation;
        match assembler.push(part) {
            Step::Complete(done) => {
                assert_eq!(done.generation, generation);
                assert!(done.checks.len() <= bounds.max_checks);
                assert!(done.modules.len() <= bounds.max_modules);
                assert!(
                    done.checks
                        .iter()
                        .all(|c| (c.module as usize) < done.modules.len())
                );
                assert_eq!(assembler.pending(), None);
            }
            Step::Refused {
                generation: g,
                reason,
            } => {
                assert_eq!(g, generation);
                assert!(!reason.is_empty());
                assert_eq!(assembler.pending(), None);
            }
            Step::Incomplete => assert_eq!(assembler.pending(), Some(generation)),
            Step::Ignored => {}
        }
    }
});
