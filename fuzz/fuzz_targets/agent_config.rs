//! The agent's config file from arbitrary text: strict YAML, then every check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_agent::config::{AgentConfig, AgentFile};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A directory that does not exist: relative file references fail to read.
    let path = Path::new("/nonexistent/sonde-fuzz/agent.yml");
    if let Ok(raw) = sonde_proto::config::from_yaml_str::<AgentFile>(path, text) {
        let _ = AgentConfig::from_file(path, raw);
    }
});
