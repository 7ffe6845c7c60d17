//! Prometheus file_sd files as the aggregator reads them: JSON (a name ending in
//! `.json`) or YAML, the groups' label names checked, then each target checked against
//! the job's prober. Byte 0 picks the format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_aggregator::targets::parse_groups;
use sonde_proto::config::{Module, check_target};
use std::path::Path;
use std::sync::LazyLock;

static MODULES: LazyLock<Vec<Module>> = LazyLock::new(|| {
    ["http", "tcp", "dns"]
        .into_iter()
        .map(|p| serde_json::from_value(serde_json::json!({ "prober": p })).expect("module"))
        .collect()
});

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let path = if form & 1 == 0 {
        Path::new("/nonexistent/sonde-fuzz/targets.yml")
    } else {
        Path::new("/nonexistent/sonde-fuzz/targets.json")
    };
    if let Ok(groups) = parse_groups(path, text) {
        for group in &groups {
            for target in &group.targets {
                for module in MODULES.iter() {
                    let _ = check_target(module, target);
                }
            }
        }
    }
});
