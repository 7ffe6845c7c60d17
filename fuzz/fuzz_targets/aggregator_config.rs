//! The aggregator's config file from arbitrary text: strict YAML, then every check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_aggregator::config::{AggregatorConfig, AggregatorFile};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A directory that does not exist: relative file references fail to read.
    let path = Path::new("/nonexistent/sonde-fuzz/aggregator.yml");
    if let Ok(raw) = sonde_proto::config::from_yaml_str::<AggregatorFile>(path, text) {
        let _ = AggregatorConfig::from_file(path, raw);
    }
});
