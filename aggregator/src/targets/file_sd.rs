//! `static_configs`, and `file_sd_configs` files in Prometheus's file_sd format (YAML or
//! JSON), re-read when they change.
//!
//! A file that cannot be read or parsed keeps the targets it had, as in Prometheus,
//! so a half-written file never empties a job.

use super::Group;
use sonde_proto::config::{
    ConfigError, FileSdConfig, LabelError, Labels, TargetGroup, from_yaml_str,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The file_sd files' last good contents, re-read when a file changes.
#[derive(Default)]
pub(super) struct FileSd {
    files: HashMap<PathBuf, CachedFile>,
    /// Files named by some job in the current pass; the others are forgotten.
    seen_files: Vec<PathBuf>,
}

struct CachedFile {
    modified: Option<SystemTime>,
    len: u64,
    groups: Vec<TargetGroup>,
}

impl FileSd {
    pub(super) fn begin_pass(&mut self) {
        self.seen_files.clear();
    }

    /// The groups of the files `sd` names, re-read if they changed; each target has
    /// `__meta_filepath`, as in Prometheus.
    pub(super) fn groups(&mut self, sd: &FileSdConfig, out: &mut Vec<Group>) {
        for pattern in &sd.files {
            for path in expand(pattern) {
                self.refresh(&path);
                if let Some(cached) = self.files.get(&path) {
                    let shown = path.display().to_string();
                    let meta = Labels::from([("__meta_filepath".to_string(), shown.clone())]);
                    for (i, group) in cached.groups.iter().enumerate() {
                        out.push(Group::from_target_group(
                            format!("{shown}:{i}"),
                            group,
                            &meta,
                        ));
                    }
                }
                self.seen_files.push(path);
            }
        }
    }

    pub(super) fn end_pass(&mut self) {
        let seen = &self.seen_files;
        self.files.retain(|p, _| seen.contains(p));
    }

    fn refresh(&mut self, path: &Path) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let modified = meta.modified().ok();
        if let Some(c) = self.files.get(path)
            && c.modified == modified
            && c.len == meta.len()
        {
            return;
        }
        match read_groups(path) {
            Ok(groups) => {
                tracing::info!(file = %path.display(), groups = groups.len(), "file_sd file read");
                self.files.insert(
                    path.to_path_buf(),
                    CachedFile {
                        modified,
                        len: meta.len(),
                        groups,
                    },
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "file_sd file ignored; its previous targets are kept");
                // Remember the attempt so the same broken file is not re-parsed every tick.
                if let Some(c) = self.files.get_mut(path) {
                    c.modified = modified;
                    c.len = meta.len();
                } else {
                    self.files.insert(
                        path.to_path_buf(),
                        CachedFile {
                            modified,
                            len: meta.len(),
                            groups: Vec::new(),
                        },
                    );
                }
            }
        }
    }
}

/// Why a file_sd file's targets cannot be used (its previous targets are kept).
#[derive(Debug, thiserror::Error)]
pub enum FileSdError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{}:{}: {source}", path.display(), source.line(), source.column())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Yaml(#[from] ConfigError),
    #[error(transparent)]
    Labels(#[from] LabelError),
}

/// Reads one file_sd file: JSON when it ends in `.json`, YAML otherwise.
pub fn read_groups(path: &Path) -> Result<Vec<TargetGroup>, FileSdError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileSdError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_groups(path, &text)
}

/// Parses the text of the file_sd file at `path`: JSON when it ends in `.json`, YAML
/// otherwise; every group's label names checked.
pub fn parse_groups(path: &Path, text: &str) -> Result<Vec<TargetGroup>, FileSdError> {
    let groups: Vec<TargetGroup> = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|source| FileSdError::Json {
            path: path.to_path_buf(),
            source,
        })?
    } else if text.trim().is_empty() {
        Vec::new()
    } else {
        from_yaml_str(path, text)?
    };
    for g in &groups {
        sonde_proto::config::validate_labels(&g.labels, &format!("{}: labels", path.display()))?;
    }
    Ok(groups)
}

/// Expands a path whose last element may hold a glob (`targets/*.yml`), sorted.
fn expand(pattern: &str) -> Vec<PathBuf> {
    let path = Path::new(pattern);
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    if !name.contains(['*', '?', '[']) {
        return vec![path.to_path_buf()];
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(glob) = globset::Glob::new(name).map(|g| g.compile_matcher()) else {
        tracing::error!(pattern, "invalid glob in file_sd_configs");
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| glob.is_match(e.file_name()))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::Discovery;
    use sonde_proto::config::{JobConfig, JobDefaults, Located, Module, ResolvedJob, resolve_jobs};
    use std::collections::BTreeMap;

    fn jobs(dir: &Path) -> Vec<ResolvedJob> {
        #[derive(serde::Deserialize)]
        struct Doc {
            modules: BTreeMap<String, Module>,
            jobs: Vec<Located<JobConfig>>,
        }
        let text = format!(
            "modules: {{m: {{prober: tcp}}}}\njobs:\n  - job_name: j\n    module: m\n    static_configs: [{{targets: ['127.0.0.1:1'], labels: {{a: b}}}}]\n    file_sd_configs: [{{files: ['{}/*.yml', '{}/*.json']}}]\n",
            dir.display(),
            dir.display()
        );
        let doc: Doc = from_yaml_str(Path::new("x.yml"), &text).unwrap();
        resolve_jobs(
            Path::new("x.yml"),
            &doc.modules,
            &doc.jobs,
            JobDefaults::default(),
        )
        .unwrap()
    }

    #[test]
    fn static_and_file_sd_with_changes_and_broken_files() {
        let dir = std::env::temp_dir().join(format!("sonde-filesd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let jobs = jobs(&dir);
        let mut sd = Discovery::default();
        assert_eq!(sd.targets(&jobs).len(), 1);

        std::fs::write(
            dir.join("a.yml"),
            "- targets: ['127.0.0.1:2']\n  labels: {team: x}\n",
        )
        .unwrap();
        std::fs::write(dir.join("b.json"), r#"[{"targets": ["127.0.0.1:3"]}]"#).unwrap();
        let set = sd.targets(&jobs);
        assert_eq!(set.len(), 3);
        assert_eq!(
            set[&("j".to_string(), "127.0.0.1:2".to_string())].labels["team"],
            "x"
        );

        // A broken rewrite keeps the previous targets.
        std::fs::write(dir.join("a.yml"), "- targets: [unclosed\n").unwrap();
        assert_eq!(sd.targets(&jobs).len(), 3);

        std::fs::write(
            dir.join("a.yml"),
            "- targets: ['127.0.0.1:4', '127.0.0.1:5']\n",
        )
        .unwrap();
        let set = sd.targets(&jobs);
        assert_eq!(set.len(), 4, "{set:?}");

        std::fs::remove_file(dir.join("b.json")).unwrap();
        assert_eq!(sd.targets(&jobs).len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
