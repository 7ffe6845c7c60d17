//! The configuration model both binaries share: blackbox-style modules, jobs and their
//! targets, Prometheus-style durations and sizes, and strict YAML loading whose errors
//! name the file, line and column.

pub mod discovery;
mod job;
pub mod module;
mod resolve;
mod units;
mod yaml;

pub use discovery::{DnsSdConfig, DnsSdType, HttpSdConfig};
pub use job::{FileSdConfig, JobConfig, Quorum, StaticConfig, TargetGroup};
pub use module::{Module, ModuleError, Prober};
pub use resolve::{
    JobDefaults, ResolvedJob, TargetError, check_target, resolve_jobs, resolve_jobs_all,
    resolve_modules, split_port,
};
pub use units::{ByteSize, DurationError, PromDuration, SizeError};
pub use yaml::{
    ConfigError, Located, Location, Problems, check_yaml_file, from_yaml_str, load_yaml_file,
    load_yaml_file_all, parse_yaml_all,
};

use std::collections::BTreeMap;

/// A label set, sorted by name (the order Prometheus wants on the wire).
pub type Labels = BTreeMap<String, String>;

/// True when `name` is a valid Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`).
pub fn is_valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// True when `name` is a valid Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn is_valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A label name a config section may not use; `what` names the section.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error(
        "{what}: {name:?} is not a valid label name (letters, digits and '_', not starting with a digit)"
    )]
    Invalid { what: String, name: String },
    #[error(
        "{what}: label names starting with \"__\" are reserved for internal use, rename {name:?}"
    )]
    Reserved { what: String, name: String },
}

/// Checks every name of a label set, for config sections that carry labels.
pub fn validate_labels(labels: &Labels, what: &str) -> Result<(), LabelError> {
    for name in labels.keys() {
        if !is_valid_label_name(name) {
            return Err(LabelError::Invalid {
                what: what.to_string(),
                name: name.clone(),
            });
        }
        if name.starts_with("__") {
            return Err(LabelError::Reserved {
                what: what.to_string(),
                name: name.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names() {
        assert!(is_valid_label_name("region"));
        assert!(is_valid_label_name("_x1"));
        assert!(!is_valid_label_name("1x"));
        assert!(!is_valid_label_name("a-b"));
        assert!(!is_valid_label_name(""));
        assert!(is_valid_metric_name("sonde:up"));
    }
}
