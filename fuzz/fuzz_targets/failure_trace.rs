//! An agent's trace of a failed probe, as the aggregator reads it: protobuf decode, then
//! `Trace::from_pb`'s bounds and checks. What it accepts must stay within the bounds,
//! read back the same after a round trip, and serialise for `/api/v1/targets`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sonde_proto::pb::FailureTrace;
use sonde_proto::trace::{MAX_HOPS, MAX_STEPS, MAX_TEXT_BYTES, Step, Trace};

fuzz_target!(|data: &[u8]| {
    let Ok(wire) = FailureTrace::decode(data) else {
        return;
    };
    let Ok(trace) = Trace::from_pb(wire) else {
        return;
    };
    assert!(trace.steps.len() <= MAX_STEPS);
    assert!(trace.path.as_ref().is_none_or(|p| p.hops.len() <= MAX_HOPS));
    for step in &trace.steps {
        if let Step::HttpStatus { line } | Step::Tls { error: line } = step {
            assert!(line.len() <= MAX_TEXT_BYTES && !line.chars().any(char::is_control));
        }
    }
    assert_eq!(Trace::from_pb(trace.to_pb()).as_ref(), Ok(&trace));
    serde_json::to_string(&trace).expect("a checked trace serialises");
    let _ = trace.weight();
});
