//! An http_sd server's answer body as the aggregator reads it: a JSON list of target
//! groups, label names checked, then each discovered address checked against the job's
//! prober.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_aggregator::targets::{ADDRESS_LABEL, parse_http_sd};
use sonde_proto::config::{Module, check_target};
use std::sync::LazyLock;

static MODULES: LazyLock<Vec<Module>> = LazyLock::new(|| {
    ["http", "tcp", "dns"]
        .into_iter()
        .map(|p| serde_json::from_value(serde_json::json!({ "prober": p })).expect("module"))
        .collect()
});

fuzz_target!(|data: &[u8]| {
    if let Ok(groups) = parse_http_sd("http://127.0.0.1:1/sd", data) {
        for group in &groups {
            for target in &group.targets {
                let address = target
                    .get(ADDRESS_LABEL)
                    .expect("every target has an address");
                for module in MODULES.iter() {
                    let _ = check_target(module, address);
                }
            }
        }
    }
});
