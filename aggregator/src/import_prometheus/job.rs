//! One Prometheus scrape job to one sonde job.

use super::yaml_value::{Yaml, scalar, write_entry};
use std::fmt::Write;
use std::path::Path;

pub enum Outcome {
    Unnamed,
    NotBlackbox {
        name: String,
    },
    Converted {
        name: String,
        module: String,
        /// The job as an item of sonde's `jobs:` list.
        text: String,
        /// What was not carried over, one line each.
        notes: Vec<String>,
    },
}

/// The discovery mechanisms sonde has, with Prometheus's fields: carried as written.
const CARRIED_DISCOVERY: &[&str] = &[
    "static_configs",
    "file_sd_configs",
    "http_sd_configs",
    "dns_sd_configs",
    "kubernetes_sd_configs",
];

/// How Prometheus reached the exporter: sonde's agents probe the targets themselves.
const REACHING_THE_EXPORTER: &[&str] = &[
    "scheme",
    "basic_auth",
    "authorization",
    "oauth2",
    "bearer_token",
    "bearer_token_file",
    "tls_config",
    "proxy_url",
    "no_proxy",
    "proxy_from_environment",
    "proxy_connect_header",
    "follow_redirects",
    "enable_http2",
    "http_headers",
    "enable_compression",
];

/// The default module of a blackbox exporter asked without `module=`.
const BLACKBOX_DEFAULT_MODULE: &str = "http_2xx";

pub fn convert_job(job: &Yaml, base: &Path) -> Outcome {
    let Some(name) = job.get("job_name").and_then(Yaml::scalar_text) else {
        return Outcome::Unnamed;
    };
    let metrics_path = job.get("metrics_path").and_then(Yaml::as_str);
    let params = job.get("params");
    let module_param = params.and_then(|p| p.get("module"));
    let relabel = job.get("relabel_configs").map(Yaml::as_seq).unwrap_or(&[]);
    let rules: Vec<Rule> = relabel.iter().map(Rule::read).collect();
    let sets_param_target = rules.iter().any(|r| r.target == "__param_target");
    let is_blackbox = metrics_path.is_some_and(|p| p.ends_with("/probe"))
        || module_param.is_some()
        || sets_param_target;
    if !is_blackbox {
        return Outcome::NotBlackbox { name };
    }

    let mut notes = Vec::new();
    let module = match module_param.map(Yaml::as_seq) {
        Some([first, rest @ ..]) => {
            let first = first.scalar_text().unwrap_or_default();
            if !rest.is_empty() {
                notes.push(format!(
                    "params.module lists {} modules; a blackbox exporter runs the first, {first}, and so does this job",
                    rest.len() + 1
                ));
            }
            first
        }
        _ => {
            notes.push(format!(
                "no params.module: a blackbox exporter then runs {BLACKBOX_DEFAULT_MODULE}, and so does this job"
            ));
            BLACKBOX_DEFAULT_MODULE.to_string()
        }
    };
    if rules.iter().any(|r| r.target == "__param_module") {
        notes.push(format!(
            "relabel_configs: a rule sets __param_module (a module per target); a sonde job has one module, {module}: split the job per module"
        ));
    }

    let mut text = String::new();
    let _ = writeln!(text, "  - job_name: {}", scalar(&name));
    write_entry(&mut text, 4, "module", &Yaml::Str(module.clone()));
    let mut discovery = 0;
    for (key, value) in job.entries() {
        match key.as_str() {
            "job_name" => {}
            "scrape_interval" => write_entry(&mut text, 4, "interval", value),
            "scrape_timeout" => write_entry(&mut text, 4, "timeout", value),
            "metrics_path" => {
                if !value.as_str().is_some_and(|p| p.ends_with("/probe")) {
                    notes.push(format!(
                        "metrics_path {}: the exporter's path; not carried (sonde's agents probe the targets themselves)",
                        value.scalar_text().unwrap_or_default()
                    ));
                }
            }
            "params" => {
                for (param, _) in value.entries() {
                    if param != "module" {
                        notes.push(format!(
                            "params.{param}: a URL parameter for the exporter; a sonde job has no counterpart, not carried"
                        ));
                    }
                }
            }
            "relabel_configs" => {}
            "file_sd_configs" => {
                discovery += 1;
                write_entry(
                    &mut text,
                    4,
                    key,
                    &with_absolute_files(value, base),
                );
            }
            k if CARRIED_DISCOVERY.contains(&k) => {
                discovery += 1;
                write_entry(&mut text, 4, key, value);
            }
            k if k.ends_with("_sd_configs") => notes.push(format!(
                "{k}: sonde has no such discovery (it has {}); these targets are not carried",
                CARRIED_DISCOVERY.join(", ")
            )),
            "metric_relabel_configs" => notes.push(
                "metric_relabel_configs: sonde does not rewrite its samples' labels; not carried"
                    .into(),
            ),
            "honor_labels" | "honor_timestamps" | "track_timestamps_staleness" => notes.push(
                format!("{key}: sonde's samples carry no labels or timestamps of an exporter's; no meaning here, not carried"),
            ),
            k if REACHING_THE_EXPORTER.contains(&k) => notes.push(format!(
                "{k}: how Prometheus reached the exporter; no meaning when the agents probe, not carried"
            )),
            k => notes.push(format!(
                "{k}: about scraping an exporter (limits, protocols, histograms); no meaning here, not carried"
            )),
        }
    }
    if discovery == 0 {
        notes.push(
            "no target source sonde can use: the job is written without targets; add static_configs or file_sd_configs".into(),
        );
    }
    if !rules.is_empty() && !is_the_usual_rewrite(&rules) {
        write_entry(
            &mut text,
            4,
            "relabel_configs",
            &Yaml::Seq(relabel.to_vec()),
        );
    }
    Outcome::Converted {
        name,
        module,
        text,
        notes,
    }
}

/// A `file_sd_configs` list with its relative `files` made absolute: Prometheus reads
/// them relative to its config file, and the output may be saved anywhere.
fn with_absolute_files(value: &Yaml, base: &Path) -> Yaml {
    let absolute = |file: &Yaml| match file {
        Yaml::Str(path) if !Path::new(path).is_absolute() => {
            Yaml::Str(std::path::absolute(base.join(path)).map_or_else(
                |_| base.join(path).to_string_lossy().into_owned(),
                |p| p.to_string_lossy().into_owned(),
            ))
        }
        other => other.clone(),
    };
    let configs = value
        .as_seq()
        .iter()
        .map(|config| match config {
            Yaml::Map(entries) => Yaml::Map(
                entries
                    .iter()
                    .map(|(k, v)| match (k.as_str(), v) {
                        ("files", Yaml::Seq(files)) => {
                            (k.clone(), Yaml::Seq(files.iter().map(absolute).collect()))
                        }
                        _ => (k.clone(), v.clone()),
                    })
                    .collect(),
            ),
            other => other.clone(),
        })
        .collect();
    Yaml::Seq(configs)
}

/// One relabeling rule, with Prometheus's defaults filled in.
struct Rule {
    action: String,
    sources: Vec<String>,
    target: String,
    regex: String,
    replacement: String,
}

impl Rule {
    fn read(rule: &Yaml) -> Self {
        let text = |key: &str, default: &str| {
            rule.get(key)
                .and_then(Yaml::scalar_text)
                .unwrap_or_else(|| default.to_string())
        };
        Rule {
            action: text("action", "replace").to_ascii_lowercase(),
            sources: rule
                .get("source_labels")
                .map(Yaml::as_seq)
                .unwrap_or(&[])
                .iter()
                .filter_map(Yaml::scalar_text)
                .collect(),
            target: text("target_label", ""),
            regex: text("regex", "(.*)"),
            replacement: text("replacement", "$1"),
        }
    }

    fn copies(&self, from: &str, to: &str) -> bool {
        self.action == "replace"
            && self.sources == [from]
            && self.target == to
            && matches!(self.regex.as_str(), "(.*)" | "(.+)" | "^(.*)$")
            && matches!(self.replacement.as_str(), "$1" | "${1}")
    }

    /// `__address__` set to a fixed value: the exporter's address.
    fn points_at_exporter(&self) -> bool {
        self.action == "replace"
            && self.target == "__address__"
            && self.sources.is_empty()
            && !self.replacement.contains('$')
    }
}

/// True when the rules are only blackbox's usual rewrite (the target to
/// `__param_target`, then to `instance`, `__address__` to the exporter), which is what a
/// sonde job does without rules: it probes each target and labels it `instance`.
fn is_the_usual_rewrite(rules: &[Rule]) -> bool {
    let to_param = rules
        .iter()
        .position(|r| r.copies("__address__", "__param_target"));
    let to_instance = rules
        .iter()
        .position(|r| r.copies("__param_target", "instance"));
    match (to_param, to_instance) {
        (Some(p), Some(i)) if p < i => rules
            .iter()
            .enumerate()
            .all(|(n, r)| n == p || n == i || (n > p && r.points_at_exporter())),
        _ => false,
    }
}
