//! Strict YAML loading: unknown keys are errors, and every error names file:line:column.

use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};

/// A value together with where it was written, for checks that span several fields
/// (a job's timeout against its interval, a module name against the modules defined).
pub type Located<T> = serde_saphyr::Spanned<T>;

/// A configuration problem, with the place in the file that causes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no single place (a missing file).
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl ConfigError {
    /// A problem at a known place (use `Located::referenced` for the place).
    pub fn at(file: &Path, location: serde_saphyr::Location, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line: location.line(),
            column: location.column(),
            message: message.into(),
        }
    }

    /// A problem with the file as a whole.
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses `text` (the contents of `file`) strictly into `T`.
pub fn from_yaml_str<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    serde_saphyr::from_str::<T>(text).map_err(|err| {
        let inner = err.without_snippet();
        let message = strip_position(&inner.to_string());
        match inner.location() {
            Some(loc) if loc.line() > 0 => ConfigError::at(file, loc, message),
            _ => ConfigError::whole_file(file, message),
        }
    })
}

/// Reads and strictly parses the YAML file at `file`.
pub fn load_yaml_file<T: DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::whole_file(file, format!("cannot read the file: {e}")))?;
    from_yaml_str(file, &text)
}

/// serde-saphyr appends "at line L, column C" to its messages; we print the position
/// up front, the way compilers and promtool do, so drop the duplicate.
fn strip_position(message: &str) -> String {
    let trimmed = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    trimmed.trim().trim_start_matches("error: ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{JobConfig, Module};
    use std::collections::BTreeMap;

    #[test]
    fn unknown_key_names_line_and_column() {
        let text = "web:\n  prober: http\n  timeout: 5s\n  htp: {}\n";
        let err = from_yaml_str::<BTreeMap<String, Module>>(Path::new("b.yml"), text).unwrap_err();
        assert_eq!((err.line, err.column), (4, 3), "{err}");
        assert!(err.to_string().starts_with("b.yml:4:3: "), "{err}");
        assert!(err.message.contains("htp"), "{err}");
    }

    #[test]
    fn bad_value_names_line() {
        let text = "job_name: x\nmodule: m\ninterval: 15\n";
        let err = from_yaml_str::<JobConfig>(Path::new("j.yml"), text).unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("duration"), "{err}");
        let text = "job_name: x\nmodule: m\nquorum: most\n";
        let err = from_yaml_str::<JobConfig>(Path::new("j.yml"), text).unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("quorum"), "{err}");
    }

    #[test]
    fn located_values_keep_their_place() {
        #[derive(serde::Deserialize)]
        struct Doc {
            #[allow(dead_code)]
            a: u32,
            jobs: Vec<Located<JobConfig>>,
        }
        let text = "a: 1\njobs:\n  - job_name: x\n    module: m\n";
        let doc: Doc = from_yaml_str(Path::new("x.yml"), text).unwrap();
        assert_eq!(doc.jobs[0].referenced.line(), 3);
        assert_eq!(doc.jobs[0].value.job_name, "x");
    }
}
