//! `relabel_configs` with Prometheus's semantics: the same fields and defaults (action
//! `replace`, separator `;`, regex `(.*)` anchored at both ends, replacement `$1`), the same
//! validation, and the same result for every action, so that a scrape job's relabeling
//! yields here the label sets it yields in Prometheus.
//!
//! A label set is a [`Labels`] map; as in Prometheus, a label whose value would become
//! empty is removed, and a missing label reads as the empty string.

use super::{Labels, is_valid_label_name};
use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::sync::LazyLock;

/// What a relabeling step does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RelabelAction {
    /// Writes `replacement` (with the regex's groups expanded) to `target_label` when the
    /// joined source values match `regex`.
    #[default]
    Replace,
    /// Keeps the label set only when the joined source values match `regex`.
    Keep,
    /// Drops the label set when the joined source values match `regex`.
    Drop,
    /// Keeps the label set only when the joined source values equal `target_label`'s value.
    KeepEqual,
    /// Drops the label set when the joined source values equal `target_label`'s value.
    DropEqual,
    /// Writes the MD5 of the joined source values, modulo `modulus`, to `target_label`.
    HashMod,
    /// Copies every label whose name matches `regex` to the name `replacement` makes of it.
    LabelMap,
    /// Removes every label whose name matches `regex`.
    LabelDrop,
    /// Removes every label whose name does not match `regex`.
    LabelKeep,
    /// Writes the joined source values in lower case to `target_label`.
    Lowercase,
    /// Writes the joined source values in upper case to `target_label`.
    Uppercase,
}

impl RelabelAction {
    const ALL: [(RelabelAction, &'static str); 11] = [
        (RelabelAction::Replace, "replace"),
        (RelabelAction::Keep, "keep"),
        (RelabelAction::Drop, "drop"),
        (RelabelAction::KeepEqual, "keepequal"),
        (RelabelAction::DropEqual, "dropequal"),
        (RelabelAction::HashMod, "hashmod"),
        (RelabelAction::LabelMap, "labelmap"),
        (RelabelAction::LabelDrop, "labeldrop"),
        (RelabelAction::LabelKeep, "labelkeep"),
        (RelabelAction::Lowercase, "lowercase"),
        (RelabelAction::Uppercase, "uppercase"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(a, _)| *a == self)
            .map(|(_, n)| *n)
            .unwrap_or("replace")
    }
}

impl fmt::Display for RelabelAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RelabelAction {
    type Err = RelabelError;

    /// Case-insensitive, as Prometheus reads it.
    fn from_str(s: &str) -> Result<Self, RelabelError> {
        let lower = s.to_lowercase();
        Self::ALL
            .iter()
            .find(|(_, n)| *n == lower)
            .map(|(a, _)| *a)
            .ok_or_else(|| RelabelError::UnknownAction(s.to_string()))
    }
}

impl Serialize for RelabelAction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for RelabelAction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A relabeling regex: the expression as written, matched against the whole value (Prometheus
/// wraps it in `^(?:…)$`).
#[derive(Clone, Debug)]
pub struct RelabelRegex {
    /// `None` when the config does not set `regex` (Prometheus's default `(.*)`, which some
    /// actions treat apart).
    written: Option<String>,
    anchored: Regex,
}

const DEFAULT_REGEX: &str = "(.*)";
const DEFAULT_SEPARATOR: &str = ";";
const DEFAULT_REPLACEMENT: &str = "$1";

impl RelabelRegex {
    /// Compiles `expr`, anchored at both ends.
    pub fn new(expr: &str) -> Result<Self, RelabelError> {
        Ok(Self {
            written: Some(expr.to_string()),
            anchored: anchored(expr)?,
        })
    }

    /// The expression as written (`(.*)` when not set).
    pub fn as_str(&self) -> &str {
        self.written.as_deref().unwrap_or(DEFAULT_REGEX)
    }

    /// True when the config did not set `regex`.
    pub fn is_default(&self) -> bool {
        self.written.is_none()
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.anchored.is_match(value)
    }
}

fn anchored(expr: &str) -> Result<Regex, RelabelError> {
    Regex::new(&format!("^(?:{expr})$")).map_err(|e| RelabelError::InvalidRegex {
        regex: expr.to_string(),
        reason: e.to_string(),
    })
}

impl Default for RelabelRegex {
    fn default() -> Self {
        static DEFAULT: LazyLock<Regex> =
            LazyLock::new(|| anchored(DEFAULT_REGEX).expect("the default relabel regex compiles"));
        Self {
            written: None,
            anchored: DEFAULT.clone(),
        }
    }
}

impl PartialEq for RelabelRegex {
    fn eq(&self, other: &Self) -> bool {
        self.written == other.written
    }
}

/// One step of `relabel_configs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WrittenRelabelConfig", into = "WrittenRelabelConfig")]
pub struct RelabelConfig {
    pub source_labels: Vec<String>,
    pub separator: String,
    pub regex: RelabelRegex,
    pub modulus: u64,
    pub target_label: String,
    pub replacement: String,
    pub action: RelabelAction,
}

impl Default for RelabelConfig {
    fn default() -> Self {
        Self {
            source_labels: Vec::new(),
            separator: DEFAULT_SEPARATOR.into(),
            regex: RelabelRegex::default(),
            modulus: 0,
            target_label: String::new(),
            replacement: DEFAULT_REPLACEMENT.into(),
            action: RelabelAction::Replace,
        }
    }
}

/// The YAML form, with Prometheus's defaults.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WrittenRelabelConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    source_labels: Vec<String>,
    #[serde(default = "default_separator")]
    separator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    modulus: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    target_label: String,
    #[serde(default = "default_replacement")]
    replacement: String,
    #[serde(default)]
    action: RelabelAction,
}

fn default_separator() -> String {
    DEFAULT_SEPARATOR.into()
}

fn default_replacement() -> String {
    DEFAULT_REPLACEMENT.into()
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl TryFrom<WrittenRelabelConfig> for RelabelConfig {
    type Error = RelabelError;

    fn try_from(w: WrittenRelabelConfig) -> Result<Self, RelabelError> {
        let config = RelabelConfig {
            source_labels: w.source_labels,
            separator: w.separator,
            regex: match w.regex {
                Some(expr) => RelabelRegex::new(&expr)?,
                None => RelabelRegex::default(),
            },
            modulus: w.modulus,
            target_label: w.target_label,
            replacement: w.replacement,
            action: w.action,
        };
        config.validate()?;
        Ok(config)
    }
}

impl From<RelabelConfig> for WrittenRelabelConfig {
    fn from(c: RelabelConfig) -> Self {
        Self {
            source_labels: c.source_labels,
            separator: c.separator,
            regex: c.regex.written,
            modulus: c.modulus,
            target_label: c.target_label,
            replacement: c.replacement,
            action: c.action,
        }
    }
}

/// Why a relabel config is refused (the rules and wording of Prometheus's own check).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelabelError {
    #[error(
        "unknown relabel action {0:?}; expected one of replace, keep, drop, keepequal, dropequal, hashmod, labelmap, labeldrop, labelkeep, lowercase, uppercase"
    )]
    UnknownAction(String),
    #[error("invalid regex {regex:?}: {reason}")]
    InvalidRegex { regex: String, reason: String },
    #[error("source_labels: {0:?} is not a valid label name")]
    InvalidSourceLabel(String),
    #[error("relabel configuration for hashmod requires non-zero modulus")]
    ZeroModulus,
    #[error("relabel configuration for {0} action requires 'target_label' value")]
    TargetLabelRequired(RelabelAction),
    #[error("{label:?} is invalid 'target_label' for {action} action")]
    InvalidTargetLabel {
        label: String,
        action: RelabelAction,
    },
    #[error("'replacement' can not be set for {0} action")]
    ReplacementNotAllowed(RelabelAction),
    #[error("{replacement:?} is invalid 'replacement' for {action} action")]
    InvalidReplacement {
        replacement: String,
        action: RelabelAction,
    },
    #[error("{0} action requires only 'source_labels' and `target_label`, and no other fields")]
    OnlySourceAndTarget(RelabelAction),
    #[error("{0} action requires only 'regex', and no other fields")]
    OnlyRegex(RelabelAction),
}

/// A label name that may hold `$1`/`${name}` references to the regex's groups.
fn is_valid_label_template(s: &str) -> bool {
    static TEMPLATE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^(?:(?:[a-zA-Z_]|\$(?:\{\w+\}|\w+))+\w*)+$")
            .expect("the label template pattern compiles")
    });
    TEMPLATE.is_match(s)
}

impl RelabelConfig {
    /// Checks the fields against the action, as Prometheus does when it loads a config.
    pub fn validate(&self) -> Result<(), RelabelError> {
        use RelabelAction::*;
        let action = self.action;
        if let Some(bad) = self.source_labels.iter().find(|l| !is_valid_label_name(l)) {
            return Err(RelabelError::InvalidSourceLabel(bad.clone()));
        }
        if action == HashMod && self.modulus == 0 {
            return Err(RelabelError::ZeroModulus);
        }
        let needs_target = matches!(
            action,
            Replace | HashMod | Lowercase | Uppercase | KeepEqual | DropEqual
        );
        if needs_target && self.target_label.is_empty() {
            return Err(RelabelError::TargetLabelRequired(action));
        }
        let invalid_target = || RelabelError::InvalidTargetLabel {
            label: self.target_label.clone(),
            action,
        };
        let target_ok = match action {
            Replace if self.target_label.contains('$') => {
                is_valid_label_template(&self.target_label)
            }
            Replace | HashMod | Lowercase | Uppercase | KeepEqual | DropEqual => {
                is_valid_label_name(&self.target_label)
            }
            _ => true,
        };
        if !target_ok {
            return Err(invalid_target());
        }
        if matches!(action, Lowercase | Uppercase | KeepEqual | DropEqual)
            && self.replacement != DEFAULT_REPLACEMENT
        {
            return Err(RelabelError::ReplacementNotAllowed(action));
        }
        if action == LabelMap && !is_valid_label_template(&self.replacement) {
            return Err(RelabelError::InvalidReplacement {
                replacement: self.replacement.clone(),
                action,
            });
        }
        if matches!(action, KeepEqual | DropEqual)
            && (!self.regex.is_default()
                || self.modulus != 0
                || self.separator != DEFAULT_SEPARATOR
                || self.replacement != DEFAULT_REPLACEMENT)
        {
            return Err(RelabelError::OnlySourceAndTarget(action));
        }
        if matches!(action, LabelDrop | LabelKeep)
            && (!self.source_labels.is_empty()
                || !self.target_label.is_empty()
                || self.modulus != 0
                || self.separator != DEFAULT_SEPARATOR
                || self.replacement != DEFAULT_REPLACEMENT)
        {
            return Err(RelabelError::OnlyRegex(action));
        }
        Ok(())
    }

    /// Applies this one step; `false` when it drops the label set.
    fn apply_to(&self, labels: &mut Labels) -> bool {
        use RelabelAction::*;
        let value = self
            .source_labels
            .iter()
            .map(|name| labels.get(name).map_or("", String::as_str))
            .collect::<Vec<_>>()
            .join(&self.separator);
        match self.action {
            Drop => return !self.regex.is_match(&value),
            Keep => return self.regex.is_match(&value),
            DropEqual => return get(labels, &self.target_label) != value,
            KeepEqual => return get(labels, &self.target_label) == value,
            Replace => self.replace(labels, &value),
            Lowercase => set(labels, &self.target_label, value.to_lowercase()),
            Uppercase => set(labels, &self.target_label, value.to_uppercase()),
            HashMod => {
                let hash = md5::compute(value.as_bytes()).0;
                // The hash's last 8 bytes, big-endian: what Prometheus has always used.
                let mut tail = [0u8; 8];
                tail.copy_from_slice(&hash[8..]);
                let bucket = u64::from_be_bytes(tail) % self.modulus;
                set(labels, &self.target_label, bucket.to_string());
            }
            LabelMap => {
                let matching: Vec<(String, String)> = labels
                    .iter()
                    .filter(|(name, _)| self.regex.is_match(name))
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect();
                for (name, v) in matching {
                    let renamed = self
                        .regex
                        .anchored
                        .replace_all(&name, self.replacement.as_str())
                        .into_owned();
                    set(labels, &renamed, v);
                }
            }
            LabelDrop => labels.retain(|name, _| !self.regex.is_match(name)),
            LabelKeep => labels.retain(|name, _| self.regex.is_match(name)),
        }
        true
    }

    fn replace(&self, labels: &mut Labels, value: &str) {
        // Without a regex or any reference, the replacement is written as it is (even
        // when the source is empty, which the default regex would otherwise match).
        if value.is_empty()
            && self.regex.is_default()
            && !self.target_label.contains('$')
            && !self.replacement.contains('$')
        {
            set(labels, &self.target_label, self.replacement.clone());
            return;
        }
        let Some(groups) = self.regex.anchored.captures(value) else {
            return;
        };
        let mut target = String::new();
        groups.expand(&self.target_label, &mut target);
        if !is_valid_label_name(&target) {
            return;
        }
        let mut replaced = String::new();
        groups.expand(&self.replacement, &mut replaced);
        set(labels, &target, replaced);
    }
}

fn get<'a>(labels: &'a Labels, name: &str) -> &'a str {
    labels.get(name).map_or("", String::as_str)
}

/// Sets a label; an empty value removes it, as in Prometheus.
fn set(labels: &mut Labels, name: &str, value: String) {
    if value.is_empty() {
        labels.remove(name);
    } else {
        labels.insert(name.to_string(), value);
    }
}

/// Applies `configs` in order to `labels`: the relabeled set, or `None` when a step drops it.
pub fn apply(configs: &[RelabelConfig], labels: &Labels) -> Option<Labels> {
    let mut labels = labels.clone();
    for config in configs {
        if !config.apply_to(&mut labels) {
            return None;
        }
    }
    Some(labels)
}

#[cfg(test)]
#[path = "relabel_tests.rs"]
mod tests;
