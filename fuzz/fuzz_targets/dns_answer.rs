//! The dns prober's handling of a reply, from raw bytes: hickory's parse, the section
//! counts read from the header, the SOA serial, the rcode check and the record regexes
//! (each record written as miekg/dns writes it). The first byte picks the module.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_agent::probe::{ProbeContext, Samples, fuzzing};
use sonde_proto::config::Module;
use std::sync::LazyLock;

static CTX: LazyLock<ProbeContext> =
    LazyLock::new(|| ProbeContext::from_system().expect("a probe context"));

static MODULES: LazyLock<Vec<Module>> = LazyLock::new(|| {
    let validator = serde_json::json!({
        "fail_if_matches_regexp": ["^evil\\."],
        "fail_if_all_match_regexp": [".*"],
        "fail_if_none_matches_regexp": ["IN"],
    });
    [
        serde_json::json!({"prober": "dns", "dns": {"query_name": "example.com", "query_type": "A"}}),
        serde_json::json!({"prober": "dns", "dns": {"query_name": "example.com", "query_type": "SOA",
            "valid_rcodes": ["NOERROR", "NXDOMAIN", "SERVFAIL"]}}),
        serde_json::json!({"prober": "dns", "dns": {"query_name": "example.com", "query_type": "ANY",
            "validate_answer_rrs": validator,
            "validate_authority_rrs": validator,
            "validate_additional_rrs": validator}}),
        serde_json::json!({"prober": "dns", "dns": {"query_name": "example.com", "query_type": "TXT",
            "validate_answer_rrs": {"fail_if_not_matches_regexp": ["\"v=spf1"]}}}),
    ]
    .into_iter()
    .map(|v| {
        let m: Module = serde_json::from_value(v).expect("module parses");
        m.validate().expect("module is valid");
        m
    })
    .collect()
});

fuzz_target!(|data: &[u8]| {
    let Some((&pick, reply)) = data.split_first() else {
        return;
    };
    let module = &MODULES[usize::from(pick) % MODULES.len()];
    let mut out = Samples::default();
    let _ = fuzzing::dns_reply(&CTX, module, reply, &mut out);
});
