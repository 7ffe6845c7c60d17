//! The files under deploy/ are what users copy: the alert rules must load and pass their
//! promtool tests, and the example configs must pass `check-config`. A broken config must
//! be reported with FILE:LINE:COLUMN. What is shipped is secure: the configs authenticate
//! agents over TLS, the units are hardened, and the security guide's TLS + token steps are the
//! ones `deploy/examples/tls/make-certs.sh` runs.

use sonde_tests::{
    TestDir, example_installed_in, make_pki, repo_path, require_tool, run, sonde_bin,
};
use std::path::{Path, PathBuf};
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

/// The rule files shipped, each with its promtool test file and how many rules it has
/// (paths under deploy/prometheus/).
const RULE_FILES: &[(&str, &str, usize)] = &[
    ("sonde-alerts.yml", "sonde-alerts.test.yml", 8),
    (
        "compat/existing-alerts.yml",
        "compat/existing-alerts.test.yml",
        2,
    ),
];

#[test]
fn alert_rules_load() {
    let scratch = TestDir::new("promtool-check");
    for (rules, _, count) in RULE_FILES {
        let out = promtool(&["check", "rules", rules], &scratch);
        assert!(
            out.status.success(),
            "promtool check rules deploy/prometheus/{rules} failed:\n{}",
            out.combined()
        );
        assert!(
            out.combined()
                .contains(&format!("SUCCESS: {count} rules found")),
            "{}",
            out.combined()
        );
    }
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let scratch = TestDir::new("promtool-test");
    for (_, tests, _) in RULE_FILES {
        let out = promtool(&["test", "rules", tests], &scratch);
        assert!(
            out.status.success(),
            "promtool test rules deploy/prometheus/{tests} failed:\n{}",
            out.combined()
        );
    }
}

/// The alert names of a rules file, in order.
fn alert_names(rules: &str) -> Vec<&str> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect()
}

fn read_rules(relative: &str) -> String {
    std::fs::read_to_string(repo_path(&format!("deploy/prometheus/{relative}")))
        .unwrap_or_else(|e| panic!("read deploy/prometheus/{relative}: {e}"))
}

/// Every alert of each rules file is exercised by its promtool test file, both firing
/// (an `exp_alerts` with entries) and quiet (`exp_alerts: []`).
#[test]
fn every_alert_is_tested_firing_and_quiet() {
    for (rules_file, tests_file, count) in RULE_FILES {
        let rules = read_rules(rules_file);
        let tests = read_rules(tests_file);
        let alerts = alert_names(&rules);
        assert_eq!(alerts.len(), *count, "{rules_file}: {alerts:?}");
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
            assert!(
                firing,
                "no promtool test in {tests_file} has {alert} firing"
            );
            assert!(quiet, "no promtool test in {tests_file} has {alert} quiet");
        }
    }
}

/// Every alert rule has a `runbook_url` annotation naming its runbook,
/// `deploy/runbooks/ALERT.md`, which exists and has the shape every runbook follows:
/// the alert's name as its title, then Meaning, Impact, Diagnosis and Mitigation.
#[test]
fn every_alert_has_its_runbook() {
    let mut runbooks = Vec::new();
    for (rules_file, _, _) in RULE_FILES {
        let rules = read_rules(rules_file);
        let lines: Vec<&str> = rules.lines().collect();
        let alerts = alert_names(&rules);
        let urls: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
            .map(str::trim)
            .collect();
        assert_eq!(
            urls.len(),
            alerts.len(),
            "{rules_file}: every rule needs one runbook_url annotation ({alerts:?}, {urls:?})"
        );
        for (alert, url) in alerts.iter().zip(&urls) {
            assert_eq!(
                *url,
                format!("deploy/runbooks/{alert}.md"),
                "{rules_file}: the runbook_url of {alert}"
            );
            let path = repo_path(url);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{alert}: runbook {url} cannot be read: {e}"));
            assert!(
                text.starts_with(&format!("# {alert}\n")),
                "{url} should start with the title \"# {alert}\""
            );
            let mut at = 0;
            for section in ["## Meaning", "## Impact", "## Diagnosis", "## Mitigation"] {
                match text[at..].find(&format!("\n{section}\n")) {
                    Some(i) => at += i + 1,
                    None => panic!("{url} has no {section:?} section after the ones before it"),
                }
            }
            runbooks.push(format!("{alert}.md"));
        }
    }
    // And no runbook for an alert that is not shipped.
    for entry in std::fs::read_dir(repo_path("deploy/runbooks")).expect("deploy/runbooks") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(
            name == "README.md" || runbooks.contains(&name),
            "deploy/runbooks/{name} is the runbook of no shipped alert"
        );
    }
}

/// What is loaded by default (sonde-alerts.yml) fires nothing on a fresh install (no
/// `absent()` of a job that may not exist: the promtool test has a healthy fleet fire
/// nothing), and one DOWN target pages once: a single rule reads `up`, once per job.
#[test]
fn default_rules_fire_nothing_at_rest_and_page_once_per_down_target() {
    let rules = read_rules("sonde-alerts.yml");
    let exprs: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
        .collect();
    assert!(
        !exprs.iter().any(|e| e.contains("absent(")),
        "sonde-alerts.yml must not use absent(): it fires where the job does not exist"
    );
    let reading_up: Vec<&&str> = exprs
        .iter()
        .filter(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|w| w == "up")
        })
        .collect();
    assert_eq!(
        reading_up,
        [
            &"count by (cluster, job) ((up == 0 and sonde_target_agents) unless on (cluster, job, instance) sonde_target_in_maintenance == 1) > 0"
        ],
        "exactly one default rule should page for DOWN targets, once per job, and only for \
         sonde's targets"
    );
    let tests = read_rules("sonde-alerts.test.yml");
    let healthy = tests
        .split("\n  - interval:")
        .nth(1)
        .expect("the first promtool test (a healthy fleet)");
    for alert in alert_names(&rules) {
        assert!(
            healthy.contains(&format!("alertname: {alert}\n        exp_alerts: []")),
            "the healthy-fleet promtool test should check that {alert} stays quiet"
        );
    }
}

/// The words of a PromQL expression (metric, label and function names, keywords).
fn promql_words(expr: &str) -> impl Iterator<Item = &str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}

/// Every expression of the default rules and of the dashboard that reads `up` also reads
/// `sonde_target_agents`, and every one that reads a `probe_*` metric also reads
/// `sonde_agent_info`: the Prometheus they run in has other scrape jobs (and maybe a
/// blackbox_exporter) whose series have the same names. (The end-to-end test
/// alerts_in_a_shared_prometheus.rs checks what they return.)
#[test]
fn rules_and_panels_read_up_and_probe_series_only_where_sonde_wrote_them() {
    let rules = read_rules("sonde-alerts.yml");
    let mut exprs: Vec<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr: "))
        .map(str::to_string)
        .collect();
    let text = std::fs::read_to_string(repo_path("deploy/grafana/sonde.json")).expect("read");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.extend(target["expr"].as_str().map(str::to_string));
        }
    }
    assert!(exprs.len() > 20, "{exprs:?}");
    for expr in &exprs {
        let words: Vec<&str> = promql_words(expr).collect();
        if words.contains(&"up") {
            assert!(
                words.contains(&"sonde_target_agents"),
                "{expr:?} reads every `up` of the Prometheus, not only sonde's"
            );
        }
        if words.iter().any(|w| w.starts_with("probe_")) {
            assert!(
                words.contains(&"sonde_agent_info"),
                "{expr:?} reads every probe_* series of the Prometheus, not only sonde's agents'"
            );
        }
    }
}

/// Every `sonde_*` metric the rules, the scrape config and the dashboard name is one the
/// binaries export (a string literal in aggregator/src or agent/src): none is invented.
#[test]
fn rules_and_dashboard_name_only_metrics_sonde_exports() {
    fn sources(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).expect("read source"));
            }
        }
    }
    let mut code = String::new();
    sources(&repo_path("aggregator/src"), &mut code);
    sources(&repo_path("agent/src"), &mut code);
    for file in [
        "deploy/prometheus/sonde-alerts.yml",
        "deploy/prometheus/scrape-sonde.yml",
        "deploy/grafana/sonde.json",
    ] {
        let text = std::fs::read_to_string(repo_path(file)).expect("read");
        let mut names: Vec<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            // A name ending with `_` is a family's prefix in a comment (`sonde_agent_buffer_*`).
            .filter(|w| w.starts_with("sonde_") && !w.ends_with('_'))
            .collect();
        names.sort();
        names.dedup();
        assert!(!names.is_empty(), "{file} names no sonde_ metric");
        for name in names {
            // scrape-sonde.yml keeps families by prefix (sonde_remote_write_.*).
            let exported = code.contains(&format!("\"{name}\""))
                || (file.ends_with("scrape-sonde.yml") && code.contains(&format!("\"{name}")));
            assert!(
                exported,
                "{file} names {name}, which neither binary exports"
            );
        }
    }
}

/// The dashboard is a Grafana dashboard whose every panel query runs on the Prometheus
/// data source chosen by its `datasource` variable (the end-to-end test runs them all).
#[test]
fn grafana_dashboard_is_well_formed() {
    let text = std::fs::read_to_string(repo_path("deploy/grafana/sonde.json")).expect("read");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dashboard["uid"], "sonde-fleet");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "job", "region"]);
    let mut ids = std::collections::BTreeSet::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let id = panel["id"].as_u64().expect("a panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let title = panel["title"].as_str().expect("a panel title");
        titles.push(title);
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            assert!(target["expr"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
    for row in [
        "Fleet overview",
        "Success per region",
        "Probe latency",
        "Certificates",
        "Agent health",
        "Remote write",
    ] {
        assert!(titles.contains(&row), "the dashboard has no row {row:?}");
    }
}

/// The example `relative` (under deploy/examples/) as installed: written into `scratch`
/// with its `/etc/sonde/` files there too (the certificates of make-certs.sh and the
/// token files of the security guide's command), next to a copy of the example file_sd targets.
fn installed_example(relative: &str, scratch: &TestDir) -> PathBuf {
    let pki = if scratch.join("pki").exists() {
        scratch.join("pki")
    } else {
        make_pki(
            scratch,
            "DNS:aggregator.example.com",
            &["edge-eu-1", "edge-us-1"],
        )
    };
    scratch.write(
        "targets/web.yml",
        &std::fs::read_to_string(repo_path("deploy/examples/targets/web.yml"))
            .expect("read the example targets"),
    );
    let name = Path::new(relative)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a file name");
    scratch.write(name, &example_installed_in(relative, &pki))
}

#[test]
fn example_aggregator_config_is_valid() {
    let scratch = TestDir::new("check-aggregator-example");
    let file = installed_example("deploy/examples/aggregator.yml", &scratch);
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
    let file = installed_example("deploy/examples/agent.yml", &scratch);
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

    // And one inside a job of the `jobs:` list (a misspelling: neither sonde's key nor
    // Prometheus's).
    let (text, line) = insert_before(
        &example,
        "    module: tcp_connect",
        "    scrape_intervall: 30s",
    );
    let file = scratch.write("aggregator-job.yml", &text);
    let out = check_config("sonde-aggregator", &file, &scratch);
    assert!(
        !out.status.success(),
        "check-config accepted an unknown job key at line {line}:\n{}",
        out.combined()
    );
    assert_located(&out.combined(), &file, line, "scrape_intervall");
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

/// A newcomer's first config, with several mistakes: every one is reported at once, each
/// at its place, wrong types say what was expected with an example, and the empty file
/// and the job no token-bound agent can match are warned about.
#[test]
fn check_config_reports_every_problem_at_once() {
    let scratch = TestDir::new("check-every-problem");
    scratch.write("blackbox.yml", "modules:\n  http_2xx: {prober: http}\n");
    let file = scratch.write(
        "aggregator.yml",
        "global: {scrape_interval: 5s}\nmodules_file: blackbox.yml\nmodules:\n  http_2xx: {prober: http}\n  tcp_connect:\n    prober: tcp\n    tcp: {query_response: [{expect: '('}]}\njobs:\n  - job_name: web\n    module: http_2xx\n    retries: two\n    agents: {region: us}\n  - job_name: edge\n    module: tcp_connect\n    agents: region=eu\nfleet:\n  auth:\n    tokens: [{agent: e1, token: secret, labels: {region: eu}}]\n  forget_afterr: 1h\n",
    );
    let out = check_config("sonde-aggregator", &file, &scratch);
    let text = out.combined();
    assert!(!out.status.success(), "{text}");
    let f = file.display();
    for expected in [
        format!("{f}:11:14: retries: \"two\" is not a whole number"),
        format!("{f}:15:13: agents: \"region=eu\" is not a mapping"),
        format!("{f}:19:3: unknown field `forget_afterr`"),
        format!("{f}:4:13: module \"http_2xx\" is defined both here and in modules_file"),
        format!("{f}:6:5: modules.tcp_connect:"),
        format!("{f}: FAILED: 5 errors"),
    ] {
        assert!(text.contains(&expected), "no {expected:?} in:\n{text}");
    }
    assert!(text.contains("for example `retries: 2`"), "{text}");
    assert!(
        text.contains("for example `agents: {region: eu}`"),
        "{text}"
    );
    // scrape_timeout was not given: 5s, not a refusal of a 10s the user never wrote.
    assert!(!text.contains("scrape_timeout"), "{text}");

    // Fixed, it passes, with the warning about the job no agent can match.
    let fixed = scratch.write(
        "fixed.yml",
        "global: {scrape_interval: 5s}\nmodules_file: blackbox.yml\njobs:\n  - job_name: web\n    module: http_2xx\n    agents: {region: us}\nfleet:\n  auth:\n    tokens: [{agent: e1, token: secret, labels: {region: eu}}]\n",
    );
    let out = check_config("sonde-aggregator", &fixed, &scratch);
    let text = out.combined();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "{}:4:5: warning: job \"web\": no agent can match",
            fixed.display()
        )),
        "{text}"
    );

    let empty = scratch.write("agent.yml", "# to do\n");
    let out = check_config("sonde-agent", &empty, &scratch);
    let text = out.combined();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("warning: the file is empty"), "{text}");
}

#[test]
fn tls_example_configs_are_valid() {
    let scratch = TestDir::new("check-tls-examples");
    for (bin, example) in [
        ("sonde-aggregator", "deploy/examples/tls/aggregator.yml"),
        ("sonde-agent", "deploy/examples/tls/agent.yml"),
    ] {
        let file = installed_example(example, &scratch);
        let out = check_config(bin, &file, &scratch);
        assert!(
            out.status.success(),
            "{bin} check-config {example} (installed in {}) failed ({}):\n{}",
            scratch.path().display(),
            out.status,
            out.combined()
        );
    }
}

// ---------------------------------------------------------------------------------------
// What is shipped authenticates agents

/// The lines of a YAML file that carry something: comments (from a `#` at the start of
/// the line or after a space; the shipped files quote no `#`) and blank lines removed.
fn yaml_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(|line| {
            let cut = if line.trim_start().starts_with('#') {
                0
            } else {
                line.find(" #").unwrap_or(line.len())
            };
            line[..cut].trim_end()
        })
        .filter(|line| !line.is_empty())
        .collect()
}

/// The lines of the top-level block `key:` (those indented under it).
fn top_level_block<'a>(lines: &[&'a str], key: &str) -> Vec<&'a str> {
    let head = format!("{key}:");
    lines
        .iter()
        .skip_while(|l| **l != head)
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .copied()
        .collect()
}

/// Ok when an aggregator config's `fleet:` requires per-agent tokens, each bound to
/// labels, over TLS, and does not allow anonymous agents.
fn fleet_requires_tokens_over_tls(text: &str) -> Result<(), String> {
    let lines = yaml_lines(text);
    let fleet = top_level_block(&lines, "fleet");
    let has = |line: &str| fleet.contains(&line);
    let count = |needle: &str| fleet.iter().filter(|l| l.contains(needle)).count();
    if !has("  auth:") || count("tokens:") != 1 {
        return Err("fleet.auth.tokens is absent: anyone could join the fleet".into());
    }
    let agents = count("- agent:");
    if agents == 0 || count("token_file:") != agents {
        return Err(format!(
            "fleet.auth.tokens should list agents, each with a token_file: {agents} agents, {} token files",
            count("token_file:")
        ));
    }
    if count("labels:") < agents {
        return Err(
            "every fleet.auth.tokens entry should bind the agent's labels (labels:)".into(),
        );
    }
    if !has("  tls:") || count("cert_file:") != 1 || count("key_file:") != 1 {
        return Err("fleet.tls (cert_file, key_file) is absent: tokens would cross the network in clear text".into());
    }
    if count("allow_anonymous: true") > 0 {
        return Err("fleet.allow_anonymous is true".into());
    }
    Ok(())
}

/// Ok when every entry of an agent config's `aggregators:` sends a token over TLS.
fn aggregators_get_tokens_over_tls(text: &str) -> Result<(), String> {
    let lines = yaml_lines(text);
    let block = top_level_block(&lines, "aggregators");
    let mut entries: Vec<Vec<&str>> = Vec::new();
    for line in block {
        if line.trim_start().starts_with("- ") {
            entries.push(Vec::new());
        }
        match entries.last_mut() {
            Some(entry) => entry.push(line.trim_start().trim_start_matches("- ")),
            None => return Err(format!("unexpected line in aggregators: {line:?}")),
        }
    }
    if entries.is_empty() {
        return Err("no aggregators: entry".into());
    }
    for entry in entries {
        let address = entry
            .iter()
            .find_map(|l| l.strip_prefix("address: "))
            .ok_or_else(|| format!("an aggregators: entry without address: {entry:?}"))?;
        if !address.starts_with("https://") {
            return Err(format!("aggregator {address} is not https://"));
        }
        if !entry.iter().any(|l| l.starts_with("token_file: ")) {
            return Err(format!("aggregator {address} has no token_file"));
        }
        if entry.contains(&"allow_plaintext_token: true") {
            return Err(format!("aggregator {address} allows a plaintext token"));
        }
    }
    Ok(())
}

#[test]
fn shipped_aggregator_configs_require_tokens_over_tls() {
    for example in [
        "deploy/examples/aggregator.yml",
        "deploy/examples/tls/aggregator.yml",
    ] {
        let text = std::fs::read_to_string(repo_path(example)).expect("read the example");
        if let Err(e) = fleet_requires_tokens_over_tls(&text) {
            panic!("{example}: {e}");
        }
    }
}

#[test]
fn shipped_agent_configs_send_their_token_over_tls() {
    for example in ["deploy/examples/agent.yml", "deploy/examples/tls/agent.yml"] {
        let text = std::fs::read_to_string(repo_path(example)).expect("read the example");
        if let Err(e) = aggregators_get_tokens_over_tls(&text) {
            panic!("{example}: {e}");
        }
    }
}

/// The shape checks above catch what they are meant to catch.
#[test]
fn config_shape_checks_refuse_configs_without_auth() {
    let aggregator =
        std::fs::read_to_string(repo_path("deploy/examples/aggregator.yml")).expect("read");
    let commented: String = aggregator
        .lines()
        .map(|l| match l {
            "  auth:" | "    tokens:" => format!("  # {l}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    assert!(fleet_requires_tokens_over_tls(&commented).is_err());
    let no_tls = aggregator.replace("  tls:", "  # tls:");
    assert!(fleet_requires_tokens_over_tls(&no_tls).is_err());
    let anonymous = aggregator.replace("fleet:\n", "fleet:\n  allow_anonymous: true\n");
    assert!(fleet_requires_tokens_over_tls(&anonymous).is_err());

    let agent = std::fs::read_to_string(repo_path("deploy/examples/agent.yml")).expect("read");
    let plain = agent.replace("https://", "http://");
    assert!(aggregators_get_tokens_over_tls(&plain).is_err());
    let tokenless: String = agent
        .lines()
        .filter(|l| !l.trim_start().starts_with("token_file:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(aggregators_get_tokens_over_tls(&tokenless).is_err());
}

/// The value of `--flag=` on a unit's ExecStart.
fn unit_flag<'a>(unit: &'a str, flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    unit.split_whitespace()
        .find_map(|word| word.strip_prefix(prefix.as_str()))
}

#[test]
fn systemd_units_are_hardened() {
    for name in ["sonde-aggregator.service", "sonde-agent.service"] {
        let text = std::fs::read_to_string(repo_path(&format!("deploy/systemd/{name}")))
            .expect("read the unit");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for want in [
            "User=sonde",
            "Group=sonde",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectControlGroups=yes",
            "RestrictSUIDSGID=yes",
            "RestrictNamespaces=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "CapabilityBoundingSet=",
            "SystemCallArchitectures=native",
            "SystemCallFilter=@system-service",
            "StateDirectory=sonde",
            "StateDirectoryMode=0700",
            "UMask=0077",
        ] {
            assert!(lines.contains(&want), "{name} should have {want}");
        }
        for prefix in ["RestrictAddressFamilies=", "LimitNOFILE="] {
            assert!(
                lines.iter().any(|l| l.starts_with(prefix)),
                "{name} should set {prefix}"
            );
        }
        for never in ["AmbientCapabilities=", "User=root", "PermissionsStartOnly="] {
            assert!(
                !lines.iter().any(|l| l.starts_with(never)),
                "{name} must not have {never}"
            );
        }
        // ProtectSystem=strict: the storage must be in the StateDirectory (or listed in
        // ReadWritePaths=), or the service cannot write its database.
        let storage = unit_flag(&text, "--storage.path").expect("--storage.path");
        let writable = storage.starts_with("/var/lib/sonde/")
            || lines.iter().any(|l| {
                l.strip_prefix("ReadWritePaths=")
                    .is_some_and(|p| p.split_whitespace().any(|d| storage.starts_with(d)))
            });
        assert!(writable, "{name}: --storage.path={storage} is not writable");
        // The HTTP endpoints (status page, API, /probe) are for local callers.
        let web = unit_flag(&text, "--web.listen-address").expect("--web.listen-address");
        assert!(
            web.starts_with("127.0.0.1:"),
            "{name}: --web.listen-address={web} is not loopback"
        );
    }
}

/// The aggregator's unit listens for agents beyond loopback, so the config it runs (the
/// shipped example, installed as /etc/sonde/aggregator.yml) requires tokens over TLS.
#[test]
fn aggregator_unit_listening_beyond_loopback_runs_a_config_with_auth() {
    let unit = std::fs::read_to_string(repo_path("deploy/systemd/sonde-aggregator.service"))
        .expect("read the unit");
    let grpc = unit_flag(&unit, "--grpc.listen-address").expect("--grpc.listen-address");
    let config = unit_flag(&unit, "--config.file").expect("--config.file");
    assert_eq!(config, "/etc/sonde/aggregator.yml");
    let loopback = grpc.starts_with("127.") || grpc.starts_with("[::1]:");
    if !loopback {
        let text = std::fs::read_to_string(repo_path("deploy/examples/aggregator.yml"))
            .expect("read the example");
        if let Err(e) = fleet_requires_tokens_over_tls(&text) {
            panic!("the unit listens on {grpc}, but deploy/examples/aggregator.yml: {e}");
        }
    }
    let agent = std::fs::read_to_string(repo_path("deploy/systemd/sonde-agent.service"))
        .expect("read the unit");
    assert_eq!(
        unit_flag(&agent, "--config.file"),
        Some("/etc/sonde/agent.yml")
    );
}

// ---------------------------------------------------------------------------------------
// The security guide's security model matches the files

fn security_guide() -> String {
    std::fs::read_to_string(repo_path("docs/security.md")).expect("read docs/security.md")
}

/// The body of the first fenced block of `lang` after the first occurrence of `marker`.
fn fenced_block_after<'a>(text: &'a str, marker: &str, lang: &str) -> &'a str {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("docs/security.md has no {marker:?}"));
    let open = format!("```{lang}\n");
    let start = text[at..]
        .find(&open)
        .map(|i| at + i + open.len())
        .unwrap_or_else(|| panic!("no ```{lang} block after {marker:?}"));
    let end = text[start..]
        .find("\n```")
        .map(|i| start + i + 1)
        .expect("an unterminated fenced block");
    &text[start..end]
}

/// The `openssl` commands of a shell script, each on one line (continuations joined,
/// indentation and trailing comments removed).
fn openssl_commands(script: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in script.lines() {
        let line = line.trim();
        let line = line.split("   #").next().unwrap_or(line).trim_end();
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                if current.starts_with("openssl ") {
                    commands.push(current.clone());
                }
                current.clear();
            }
        }
    }
    commands.sort();
    commands.dedup();
    commands
}

/// Step 1 of the security guide's "Step by step: TLS and tokens" runs as written (on OpenSSL 3),
/// and make-certs.sh runs the same openssl commands.
#[test]
fn security_guide_certificate_steps_run_and_match_make_certs() {
    let readme = security_guide();
    let steps = fenced_block_after(&readme, "**1. A CA and the certificates**", "sh");
    let script = std::fs::read_to_string(repo_path("deploy/examples/tls/make-certs.sh"))
        .expect("read make-certs.sh");
    let in_readme = openssl_commands(steps);
    assert!(in_readme.len() >= 8, "{in_readme:#?}");
    assert_eq!(
        in_readme,
        openssl_commands(&script),
        "docs/security.md's step 1 and deploy/examples/tls/make-certs.sh should run the same openssl commands"
    );

    // Run the security guide's block as it is, its $HOME in a scratch directory.
    require_tool("openssl", "openssl");
    let scratch = TestDir::new("readme-certificates");
    let mut cmd = Command::new("sh");
    cmd.args(["-e", "-c", steps]).env("HOME", scratch.path());
    let out = run(cmd, scratch.path(), TIMEOUT);
    assert!(
        out.status.success(),
        "the security guide's certificate steps failed ({}):\n{}",
        out.status,
        out.combined()
    );
    let made = scratch.join("sonde-pki");
    for file in ["ca.pem", "aggregator.pem", "edge-eu-1.pem", "edge-us-1.pem"] {
        assert!(made.join(file).exists(), "no {file}:\n{}", out.combined());
    }
    assert!(
        out.combined().contains("DNS:aggregator.example.com"),
        "the certificate should name aggregator.example.com:\n{}",
        out.combined()
    );
    assert_eq!(
        out.combined().matches(": OK").count(),
        3,
        "openssl verify should pass for the aggregator and both agents:\n{}",
        out.combined()
    );
}

/// The security guide's configs of the TLS + token deployment are (excerpts of) the files of
/// deploy/examples/tls/: every line they show is in the file, in the same order.
#[test]
fn security_guide_tls_configs_are_the_example_files() {
    let readme = security_guide();
    for example in [
        "deploy/examples/tls/aggregator.yml",
        "deploy/examples/tls/agent.yml",
    ] {
        let shown = fenced_block_after(&readme, &format!("[`{example}`](../{example})"), "yaml");
        let file = std::fs::read_to_string(repo_path(example)).expect("read the example");
        let file_lines = yaml_lines(&file);
        let mut rest = file_lines.as_slice();
        for line in yaml_lines(shown) {
            match rest.iter().position(|l| *l == line) {
                Some(i) => rest = &rest[i + 1..],
                None => panic!(
                    "docs/security.md shows {line:?} for {example}, which the file does not have \
                     (at that place)"
                ),
            }
        }
    }
}

/// Every `fleet.limits` key is in the security guide's limits table, and the security guide's block of
/// defaults is a config the aggregator accepts.
#[test]
fn security_guide_limits_are_documented_and_accepted() {
    let readme = security_guide();
    let block = fenced_block_after(&readme, "### Limits", "yaml");
    let keys: Vec<&str> = yaml_lines(block)
        .into_iter()
        .filter(|l| l.starts_with("    "))
        .filter_map(|l| l.trim().split(':').next())
        .collect();
    assert_eq!(keys.len(), 19, "{keys:?}");
    for key in &keys {
        assert!(
            readme.contains(&format!("| `{key}` |")),
            "docs/security.md's limits table has no row for {key}"
        );
    }
    let scratch = TestDir::new("check-readme-limits");
    let file = scratch.write("limits.yml", block);
    let out = check_config("sonde-aggregator", &file, &scratch);
    assert!(
        out.status.success(),
        "the security guide's fleet.limits block (defaults) should be accepted ({}):\n{}",
        out.status,
        out.combined()
    );
}

/// The configs the Debian packages install as /etc/sonde/*.yml (deploy/packages/) pass
/// `check-config` as they are, naming no file that the packages do not install; the
/// aggregator's keeps fleet.auth (its unit listens beyond loopback), admitting no agent.
#[test]
fn package_configs_are_valid_as_installed() {
    let scratch = TestDir::new("check-package-configs");
    for (bin, file) in [
        ("sonde-agent", "deploy/packages/agent.yml"),
        ("sonde-aggregator", "deploy/packages/aggregator.yml"),
    ] {
        let text = std::fs::read_to_string(repo_path(file)).expect("read");
        let names_files = yaml_lines(&text)
            .iter()
            .any(|l| l.contains("/etc/sonde/") || l.contains("_file:"));
        assert!(
            !names_files,
            "{file} names a file the package does not install"
        );
        let out = check_config(bin, &repo_path(file), &scratch);
        assert!(
            out.status.success(),
            "{bin} check-config {file} failed ({}):\n{}",
            out.status,
            out.combined()
        );
    }
    let aggregator =
        std::fs::read_to_string(repo_path("deploy/packages/aggregator.yml")).expect("read");
    let fleet = yaml_lines(&aggregator);
    let fleet = top_level_block(&fleet, "fleet");
    assert!(fleet.contains(&"  auth:"), "{fleet:?}");
    assert!(fleet.contains(&"    tokens: []"), "{fleet:?}");
    assert!(!fleet.iter().any(|l| l.contains("allow_anonymous: true")));
}
