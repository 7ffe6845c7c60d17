//! The http prober's body decoders (identity, gzip, deflate in both wrappings, br) with
//! `body_size_limit` applied after decompression, then the body regexes; and the
//! `Last-Modified` date parser. Byte 0 picks the compression and limit, byte 1 how the
//! body is cut into frames; the rest is the body as it comes off the wire.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_agent::probe::{ProbeContext, fuzzing};
use sonde_proto::config::Module;
use std::sync::LazyLock;

static CTX: LazyLock<ProbeContext> =
    LazyLock::new(|| ProbeContext::from_system().expect("a probe context"));

const COMPRESSIONS: [&str; 4] = ["", "gzip", "deflate", "br"];
const LIMITS: [&str; 4] = ["0", "100", "64KiB", "1MiB"];

static MODULES: LazyLock<Vec<Module>> = LazyLock::new(|| {
    let mut modules = Vec::new();
    for limit in LIMITS {
        for compression in COMPRESSIONS {
            let m: Module = serde_json::from_value(serde_json::json!({
                "prober": "http",
                "http": {
                    "compression": compression,
                    "body_size_limit": limit,
                    "fail_if_body_matches_regexp": ["(?i)error|fail"],
                    "fail_if_body_not_matches_regexp": ["^\\s*[{<]", "sonde$"],
                }
            }))
            .expect("module parses");
            m.validate().expect("module is valid");
            modules.push(m);
        }
    }
    modules
});

fuzz_target!(|data: &[u8]| {
    let [pick, cut, body @ ..] = data else {
        return;
    };
    let module = &MODULES[usize::from(*pick) % MODULES.len()];
    let chunk = usize::from(*cut).max(1) * 16;
    let outcome = fuzzing::http_body(&CTX, module, body.chunks(chunk)).expect("module is valid");
    assert!(outcome.kept as u64 <= outcome.total);
    if module.http.body_size_limit.0 > 0 {
        assert!(outcome.total <= module.http.body_size_limit.0);
    }
    let _ = fuzzing::http_date(&String::from_utf8_lossy(body));
});
