//! The files under deploy/ are what users copy: the alert rules must load and pass their
//! promtool tests, and the example configs must pass `check-config`. A broken config must
//! be reported with FILE:LINE:COLUMN.

use sonde_tests::{TestDir, repo_path, require_tool, run, sonde_bin};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

fn promtool(args: &[&str], scratch: &TestDir) -> sonde_tests::Output {
    let mut cmd = Command::new(require_tool("promtool", "prometheus"));
    cmd.args(args).current_dir(repo_path("deploy/prometheus"));
    run(cmd, scratch.path(), TIMEOUT)
}

fn check_config(bin: &str, file: &Path, scratch: &TestDir) -> sonde_tests::Output {
    let mut cmd = Command::new(sonde_bin(bin));
    cmd.arg("check-config")
        .arg(file)
        .current_dir(scratch.path());
    run(cmd, scratch.path(), TIMEOUT)
}

#[test]
fn alert_rules_load() {
    let scratch = TestDir::new("promtool-check");
    let out = promtool(&["check", "rules", "sonde-alerts.yml"], &scratch);
    assert!(
        out.status.success(),
        "promtool check rules deploy/prometheus/sonde-alerts.yml failed:\n{}",
        out.combined()
    );
    assert!(
        out.combined().contains("SUCCESS: 5 rules found"),
        "{}",
        out.combined()
    );
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let scratch = TestDir::new("promtool-test");
    let out = promtool(&["test", "rules", "sonde-alerts.test.yml"], &scratch);
    assert!(
        out.status.success(),
        "promtool test rules deploy/prometheus/sonde-alerts.test.yml failed:\n{}",
        out.combined()
    );
}

/// Every alert of the rules file is exercised by the promtool test file, both firing
/// (an `exp_alerts` with entries) and quiet (`exp_alerts: []`).
#[test]
fn every_alert_is_tested_firing_and_quiet() {
    let rules = std::fs::read_to_string(repo_path("deploy/prometheus/sonde-alerts.yml"))
        .expect("read the rules");
    let tests = std::fs::read_to_string(repo_path("deploy/prometheus/sonde-alerts.test.yml"))
        .expect("read the rule tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    assert_eq!(alerts.len(), 5, "{alerts:?}");
    for alert in alerts {
        let mut firing = false;
        let mut quiet = false;
        let lines: Vec<&str> = tests.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim() != format!("alertname: {alert}") {
                continue;
            }
            match lines.get(i + 1).map(|l| l.trim()) {
                Some("exp_alerts: []") => quiet = true,
                Some("exp_alerts:") => firing = true,
                other => panic!("unexpected line after alertname {alert}: {other:?}"),
            }
        }
        assert!(firing, "no promtool test has {alert} firing");
        assert!(quiet, "no promtool test has {alert} quiet");
    }
}

#[test]
fn example_aggregator_config_is_valid() {
    let scratch = TestDir::new("check-aggregator-example");
    let file = repo_path("deploy/examples/aggregator.yml");
    let out = check_config("sonde-aggregator", &file, &scratch);
    assert!(
        out.status.success(),
        "sonde-aggregator check-config {} failed ({}):\n{}",
        file.display(),
        out.status,
        out.combined()
    );
}

#[test]
fn example_agent_config_is_valid() {
    let scratch = TestDir::new("check-agent-example");
    let file = repo_path("deploy/examples/agent.yml");
    let out = check_config("sonde-agent", &file, &scratch);
    assert!(
        out.status.success(),
        "sonde-agent check-config {} failed ({}):\n{}",
        file.display(),
        out.status,
        out.combined()
    );
}

/// Inserts `line` before the first line of `text` equal to `before` (whitespace included):
/// the new text, and the 1-based number of the inserted line.
fn insert_before(text: &str, before: &str, line: &str) -> (String, usize) {
    let mut lines: Vec<&str> = text.lines().collect();
    let index = lines
        .iter()
        .position(|l| *l == before)
        .unwrap_or_else(|| panic!("no line {before:?} in the example"));
    lines.insert(index, line);
    (lines.join("\n") + "\n", index + 1)
}

/// Asserts that `output` has `FILE:LINE:COLUMN:` for `file` and `line`, and names `key`.
fn assert_located(output: &str, file: &Path, line: usize, key: &str) {
    let prefix = format!("{}:{line}:", file.display());
    let located = output.match_indices(&prefix).any(|(at, _)| {
        let rest = &output[at + prefix.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with(':')
    });
    assert!(
        located,
        "the error should start with {prefix}COLUMN: (the file, line {line} and column); got:\n{output}"
    );
    assert!(
        output.contains(key),
        "the error should name the unknown key {key:?}; got:\n{output}"
    );
}

#[test]
fn broken_aggregator_config_names_file_line_column() {
    let scratch = TestDir::new("check-aggregator-broken");
    let example = std::fs::read_to_string(repo_path("deploy/examples/aggregator.yml"))
        .expect("read the example");
    // The example's file_sd job reads targets/*.yml next to the config.
    scratch.write(
        "targets/web.yml",
        &std::fs::read_to_string(repo_path("deploy/examples/targets/web.yml"))
            .expect("read the example targets"),
    );
    // An unknown key deep inside the file, in the `fleet:` section.
    let (text, line) = insert_before(
        &example,
        "  forget_after: 24h             # how long a vanished agent-local job stays expected",
        "  forget_afterr: 24h",
    );
    let file = scratch.write("aggregator.yml", &text);
    let out = check_config("sonde-aggregator", &file, &scratch);
    assert!(
        !out.status.success(),
        "check-config accepted an unknown key at line {line}:\n{}",
        out.combined()
    );
    assert_located(&out.combined(), &file, line, "forget_afterr");

    // And one inside a job of the `jobs:` list.
    let (text, line) = insert_before(
        &example,
        "    module: tcp_connect",
        "    scrape_interval: 30s",
    );
    let file = scratch.write("aggregator-job.yml", &text);
    let out = check_config("sonde-aggregator", &file, &scratch);
    assert!(
        !out.status.success(),
        "check-config accepted an unknown job key at line {line}:\n{}",
        out.combined()
    );
    assert_located(&out.combined(), &file, line, "scrape_interval");
}

#[test]
fn broken_agent_config_names_file_line_column() {
    let scratch = TestDir::new("check-agent-broken");
    let example =
        std::fs::read_to_string(repo_path("deploy/examples/agent.yml")).expect("read the example");
    let (text, line) = insert_before(
        &example,
        "  max_bytes: 256MiB             # store-and-forward limit; oldest dropped first, counted",
        "  max_byte: 1GiB",
    );
    let file = scratch.write("agent.yml", &text);
    let out = check_config("sonde-agent", &file, &scratch);
    assert!(
        !out.status.success(),
        "check-config accepted an unknown key at line {line}:\n{}",
        out.combined()
    );
    assert_located(&out.combined(), &file, line, "max_byte");
}
