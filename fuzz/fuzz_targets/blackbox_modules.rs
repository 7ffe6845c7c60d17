//! Blackbox modules, in both forms they arrive in: a blackbox.yml `modules:` file (an
//! aggregator's `modules_file`) and one module as JSON (what an agent receives in an
//! assignment's `module_json`, from an aggregator it does not fully trust).
//!
//! The first byte picks the form. The YAML form mirrors `config::BlackboxFile` (private
//! to the aggregator's config module).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_proto::config::Module;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BlackboxFile {
    #[serde(default)]
    modules: BTreeMap<String, Module>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if form & 1 == 0 {
        let path = Path::new("/nonexistent/sonde-fuzz/blackbox.yml");
        if let Ok(file) = sonde_proto::config::from_yaml_str::<BlackboxFile>(path, text) {
            for module in file.modules.values() {
                check(module);
            }
        }
    } else if let Ok(module) = serde_json::from_str::<Module>(text) {
        check(&module);
    }
});

fn check(module: &Module) {
    if module.validate().is_ok() {
        // What an agent does with an accepted module: serialise it back (assignments
        // carry it as JSON) and read the DNS options the prober derives.
        let json = serde_json::to_string(module).expect("a module serialises");
        let back: Module = serde_json::from_str(&json).expect("a module round-trips");
        assert_eq!(&back, module, "round trip of {json}");
        let _ = module.dns.query_type_code();
        let _ = module.dns.query_class_code();
        let _ = module.dns.valid_rcode_codes();
    }
}
