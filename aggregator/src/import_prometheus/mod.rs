//! `sonde-aggregator import-prometheus prometheus.yml`: the scrape jobs of a Prometheus
//! config that point at a blackbox exporter, as a sonde aggregator config.
//!
//! A blackbox scrape job is Prometheus asking an exporter to probe a target for it; in
//! sonde the agents probe the target themselves. So what made Prometheus reach the
//! exporter (`metrics_path: /probe`, the `__address__` rewrite to the exporter, its
//! scheme, credentials and TLS) has no counterpart, `params.module` becomes the job's
//! `module:`, and the targets, their discovery and their relabeling are carried over as
//! they are. Everything not carried over is said, per job and field, in the notes.

mod job;
pub mod yaml_value;

use serde::Deserialize;
use sonde_proto::config::{ConfigError, Located, from_yaml_str};
use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use yaml_value::{Yaml, write_entry};

/// What a conversion gives.
#[derive(Debug)]
pub struct Conversion {
    /// The sonde aggregator config (YAML), empty of jobs when nothing was converted.
    pub config: String,
    /// What was not carried over, and why: each `FILE:LINE:COLUMN: job "name": ...` or
    /// `FILE: ...`.
    pub notes: Vec<String>,
    /// How many scrape jobs became sonde jobs.
    pub converted: usize,
    /// How many scrape jobs the file has.
    pub scrape_jobs: usize,
}

/// Why there is no conversion at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}: {source}; give the path of a Prometheus config file", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Yaml(#[from] ConfigError),
    #[error("--blackbox.config {}: cannot read it: {source}; give the blackbox_exporter config file (its --config.file), or leave the option out", path.display())]
    ReadBlackbox {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--blackbox.config {}: it has no `modules:`; give the blackbox_exporter config file (its --config.file)", path.display())]
    NotBlackbox { path: PathBuf },
}

/// The top of a Prometheus config: only what the conversion reads (Prometheus itself
/// refuses unknown keys; that is not repeated here).
#[derive(Debug, Default, Deserialize)]
struct PrometheusFile {
    global: Option<Located<Yaml>>,
    #[serde(default)]
    scrape_configs: Vec<Located<Yaml>>,
    scrape_config_files: Option<Located<Yaml>>,
}

/// The modules blackbox_exporter ships by default, for jobs whose modules file is not given.
const BLACKBOX_DEFAULT_MODULES: &str = include_str!("blackbox_default.yml");

/// Reads `prometheus_file` and converts it; `blackbox_config` is the blackbox
/// exporter's config file, whose modules the jobs then use as they are.
pub fn import_file(
    prometheus_file: &Path,
    blackbox_config: Option<&Path>,
) -> Result<Conversion, ImportError> {
    let text = std::fs::read_to_string(prometheus_file).map_err(|source| ImportError::Read {
        path: prometheus_file.to_path_buf(),
        source,
    })?;
    let blackbox = match blackbox_config {
        None => None,
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ImportError::ReadBlackbox {
                    path: path.to_path_buf(),
                    source,
                })?;
            let doc: Yaml = from_yaml_str(path, &text)?;
            let Some(Yaml::Map(modules)) = doc.get("modules") else {
                return Err(ImportError::NotBlackbox {
                    path: path.to_path_buf(),
                });
            };
            let names = modules.iter().map(|(name, _)| name.clone()).collect();
            let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
            Some(BlackboxConfig {
                path: absolute,
                given_as: path.to_path_buf(),
                modules: names,
            })
        }
    };
    convert(prometheus_file, &text, blackbox.as_ref())
}

/// The blackbox exporter's config file, as the user gave it.
#[derive(Debug)]
pub struct BlackboxConfig {
    /// Absolute, so that the output loads from wherever it is saved.
    pub path: PathBuf,
    pub given_as: PathBuf,
    pub modules: BTreeSet<String>,
}

/// Converts `text`, the contents of `file`.
pub fn convert(
    file: &Path,
    text: &str,
    blackbox: Option<&BlackboxConfig>,
) -> Result<Conversion, ImportError> {
    let only_comments = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    let parsed: PrometheusFile = if only_comments {
        PrometheusFile::default()
    } else {
        from_yaml_str(file, text)?
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let mut notes = Vec::new();
    let mut out = format!(
        "# A sonde aggregator config: the blackbox scrape jobs of {}, converted by\n# `sonde-aggregator import-prometheus`.\n",
        file.display()
    );

    write_global(file, parsed.global.as_ref(), &mut out, &mut notes);
    if let Some(files) = &parsed.scrape_config_files {
        notes.push(
            ConfigError::at(
                file,
                files.referenced,
                "scrape_config_files: not followed; run import-prometheus on each of those files too",
            )
            .to_string(),
        );
    }

    let mut jobs_text = String::new();
    let mut needed_modules = BTreeSet::new();
    let mut converted = 0;
    for located in &parsed.scrape_configs {
        let at = |message: String| ConfigError::at(file, located.referenced, message).to_string();
        match job::convert_job(&located.value, base) {
            job::Outcome::NotBlackbox { name } => notes.push(at(format!(
                "job {name:?}: not a blackbox job (no metrics_path /probe, no params.module, no relabeling to __param_target); left out"
            ))),
            job::Outcome::Unnamed => {
                notes.push(at("a scrape job without job_name; left out".into()));
            }
            job::Outcome::Converted {
                name,
                module,
                text,
                notes: job_notes,
            } => {
                converted += 1;
                let _ = writeln!(
                    jobs_text,
                    "  # {}:{}:{}",
                    file.display(),
                    located.referenced.line(),
                    located.referenced.column()
                );
                jobs_text.push_str(&text);
                for n in job_notes {
                    notes.push(at(format!("job {name:?}: {n}")));
                }
                needed_modules.insert(module);
            }
        }
    }

    write_modules(file, blackbox, &needed_modules, &mut out, &mut notes);
    if converted > 0 {
        out.push_str("jobs:\n");
        out.push_str(&jobs_text);
    } else {
        out.push_str("jobs: []\n");
    }
    Ok(Conversion {
        config: out,
        notes,
        converted,
        scrape_jobs: parsed.scrape_configs.len(),
    })
}

/// The global settings sonde shares with Prometheus. Prometheus's default interval is
/// 1m where sonde's is 15s: it is always written, so that the jobs keep their pace.
fn write_global(
    file: &Path,
    global: Option<&Located<Yaml>>,
    out: &mut String,
    notes: &mut Vec<String>,
) {
    let mut interval = Yaml::Str("1m".into());
    let mut carried = Vec::new();
    if let Some(global) = global {
        for (key, value) in global.value.entries() {
            match key.as_str() {
                "scrape_interval" => interval = value.clone(),
                "scrape_timeout" | "external_labels" => carried.push((key.clone(), value.clone())),
                _ => notes.push(
                    ConfigError::at(
                        file,
                        global.referenced,
                        format!("global.{key}: {}", global_field_note(key)),
                    )
                    .to_string(),
                ),
            }
        }
    }
    out.push_str("global:\n");
    write_entry(out, 2, "scrape_interval", &interval);
    for (key, value) in &carried {
        write_entry(out, 2, key, value);
    }
}

fn global_field_note(key: &str) -> &'static str {
    match key {
        "evaluation_interval" | "rule_query_offset" | "query_log_file" => {
            "about rules and queries, which stay with Prometheus; not carried"
        }
        _ => "no meaning for sonde's jobs; not carried",
    }
}

/// `modules_file:` when the blackbox exporter's config is given, else the definitions
/// blackbox_exporter ships for the names the jobs use.
fn write_modules(
    file: &Path,
    blackbox: Option<&BlackboxConfig>,
    needed: &BTreeSet<String>,
    out: &mut String,
    notes: &mut Vec<String>,
) {
    let names = |set: &BTreeSet<String>| {
        set.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(blackbox) = blackbox {
        write_entry(
            out,
            0,
            "modules_file",
            &Yaml::Str(blackbox.path.to_string_lossy().into_owned()),
        );
        let missing: BTreeSet<String> = needed.difference(&blackbox.modules).cloned().collect();
        if !missing.is_empty() {
            notes.push(format!(
                "{}: the jobs use modules that {} does not define: {}; add them to it, or the output will not load",
                file.display(),
                blackbox.given_as.display(),
                names(&missing)
            ));
        }
        return;
    }
    if needed.is_empty() {
        return;
    }
    let shipped: Yaml = from_yaml_str(Path::new("blackbox_default.yml"), BLACKBOX_DEFAULT_MODULES)
        .expect("the built-in blackbox modules are valid YAML");
    let shipped = shipped.get("modules").cloned().unwrap_or(Yaml::Null);
    let mut known = Vec::new();
    let mut unknown = BTreeSet::new();
    for name in needed {
        match shipped.get(name) {
            Some(module) => known.push((name.clone(), module.clone())),
            None => {
                unknown.insert(name.clone());
            }
        }
    }
    notes.push(format!(
        "{}: the jobs use the modules {}; without --blackbox.config the output defines those blackbox_exporter ships ({}) as it ships them; give --blackbox.config with your blackbox.yml to use yours",
        file.display(),
        names(needed),
        if known.is_empty() {
            "none of them".to_string()
        } else {
            known
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    if !unknown.is_empty() {
        notes.push(format!(
            "{}: modules {} are your own blackbox.yml's: give it with --blackbox.config, or the output will not load",
            file.display(),
            names(&unknown)
        ));
    }
    if !known.is_empty() {
        out.push_str("modules:\n");
        for (name, module) in &known {
            write_entry(out, 2, name, module);
        }
    }
}

#[cfg(test)]
mod tests;
