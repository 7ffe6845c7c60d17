//! Maintenance windows as the aggregator runs them: the config file's `maintenance:`
//! (checked by `check-config`, replaced on reload) and the windows added through
//! `POST /api/v1/maintenance` (kept in the database, so they survive a restart). Their
//! union goes to the hub, which writes `sonde_target_in_maintenance`; the pages and the
//! API read it from the snapshot to leave maintenance out of uptime.
//!
//! The windows themselves, their occurrences and whom they select are pure code in
//! [`sonde_hub::maintenance`], re-exported here.

pub use sonde_hub::maintenance::*;

use sonde_proto::config::{ConfigError, Located, Problems};
use std::collections::BTreeMap;
use std::path::Path;

/// Checks the config file's `maintenance:` list: every window on its own, and names
/// unique. Returns the windows that passed.
pub fn check_config(
    file: &Path,
    specs: &[Located<WindowSpec>],
    problems: &mut Problems,
) -> Vec<Window> {
    let mut seen: BTreeMap<&str, ()> = BTreeMap::new();
    let mut out = Vec::new();
    for located in specs {
        let spec = &located.value;
        let at = |m: String| ConfigError::at(file, located.referenced, m);
        if seen.insert(&spec.name, ()).is_some() {
            problems.error(at(format!(
                "maintenance: the name {:?} is used twice; each window needs its own name",
                spec.name
            )));
            continue;
        }
        match spec.check(Source::Config) {
            Ok(w) => out.push(w),
            Err(e) => problems.error(at(format!("maintenance {:?}: {e}", spec.name))),
        }
    }
    out
}

/// The windows in force: the config's, then the API's (deleted ones included: they
/// still leave their past out of uptime).
pub fn combined(config: &[Window], api: &[Window]) -> Windows {
    Windows::new(config.iter().chain(api).cloned().collect())
}

#[cfg(test)]
mod tests {
    use crate::config::AggregatorConfig;
    use sonde_proto::config::from_yaml_str;
    use std::path::Path;

    fn parse(text: &str) -> Result<AggregatorConfig, sonde_proto::config::ConfigError> {
        let file = Path::new("agg.yml");
        AggregatorConfig::from_file(file, from_yaml_str(file, text)?)
    }

    #[test]
    fn the_design_example_loads() {
        let c = parse(
            "maintenance:\n  - name: db-upgrade\n    match: {job: web, instance: \"https://shop.example/\"}\n    start: 2026-12-24T22:00:00Z\n    duration: 2h\n    every: 168h\n",
        )
        .unwrap();
        assert_eq!(c.maintenance.len(), 1);
        let w = &c.maintenance[0];
        assert_eq!(w.name, "db-upgrade");
        assert_eq!(w.matchers["instance"], "https://shop.example/");
        assert_eq!(w.every_ms, Some(168 * 3_600_000));
    }

    #[test]
    fn bad_windows_are_errors_at_their_place() {
        let e = parse("maintenance:\n  - {name: a, match: {job: web}, start: 2026-12-24T22:00:00Z, duration: 0s}\n").unwrap_err();
        assert!(
            e.message.contains("\"a\"") && e.message.contains("greater than 0"),
            "{e}"
        );
        assert_eq!(e.line, 2, "{e}");
        let e = parse("maintenance:\n  - {name: a, match: {job: web}, start: 2026-12-24T22:00:00Z, duration: 2h, every: 1h}\n").unwrap_err();
        assert!(
            e.message.contains("every 1h is shorter than duration 2h"),
            "{e}"
        );
        let e = parse("maintenance:\n  - {name: a, match: {job: web}, start: 2026-12-24T22:00:00Z, duration: 2h}\n  - {name: a, match: {job: db}, start: 2026-12-24T22:00:00Z, duration: 2h}\n").unwrap_err();
        assert!(e.message.contains("used twice"), "{e}");
        assert_eq!(e.line, 3, "{e}");
        let e = parse(
            "maintenance:\n  - {name: a, match: {job: web}, start: 24/12/2026, duration: 2h}\n",
        )
        .unwrap_err();
        assert!(e.message.contains("RFC 3339"), "{e}");
        let e = parse("maintenance:\n  - {name: a, match: {job: web}, start: 2026-12-24T22:00:00Z, duration: 2h, evry: 3h}\n").unwrap_err();
        assert!(e.message.contains("evry"), "{e}");
    }
}
