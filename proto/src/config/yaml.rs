//! Strict YAML loading: unknown keys are errors, and every error names file:line:column.

use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};

/// A value together with where it was written, for checks that span several fields
/// (a job's timeout against its interval, a module name against the modules defined).
pub type Located<T> = serde_saphyr::Spanned<T>;

/// Where a [`Located`] value was written.
pub type Location = serde_saphyr::Location;

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

impl ConfigError {
    /// `FILE:LINE:COLUMN: warning: message`, for a problem that does not refuse the file.
    pub fn as_warning(&self) -> String {
        let mut w = self.clone();
        w.message = format!("warning: {}", w.message);
        w.to_string()
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
    // `!!binary` scalars reach their field as the base64 text they are written as, and
    // the byte fields that accept them (`module::YamlBytes`) decode it; the loader's
    // own decoding would refuse binary that is not UTF-8 (a PostgreSQL SSLRequest).
    let mut options = serde_saphyr::Options::default();
    options.ignore_binary_tag_for_string = true;
    serde_saphyr::from_str_with_options::<T>(text, options).map_err(|err| {
        let inner = err.without_snippet();
        let message = strip_position(&inner.to_string());
        match inner.location() {
            Some(loc) if loc.line() > 0 => {
                let mut e = ConfigError::at(file, loc, message);
                e.message = explain(text, e.line, e.column, &e.message);
                e
            }
            _ => ConfigError::whole_file(file, message),
        }
    })
}

/// Everything found wrong with a configuration: errors (the file is refused) and
/// warnings (it loads, but probably does not do what its author meant).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Problems {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigError>,
}

impl Problems {
    pub fn error(&mut self, e: ConfigError) {
        self.errors.push(e);
    }

    pub fn warn(&mut self, w: ConfigError) {
        self.warnings.push(w);
    }

    /// Adds `result`'s error, if any, and returns its value.
    pub fn take<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|e| self.error(e)).ok()
    }

    /// The first error, told that there are more and where to see them all; for the
    /// callers that report one problem (a reload, a test).
    /// What a loader hands back: `config` and the warnings to log when there is no
    /// error, else the first error (saying how many more there are).
    pub fn into_result<T>(
        self,
        config: Option<T>,
        file: &std::path::Path,
    ) -> Result<(T, Vec<ConfigError>), ConfigError> {
        match config {
            Some(config) if self.errors.is_empty() => Ok((config, self.warnings)),
            _ => Err(self
                .first_error()
                .unwrap_or_else(|| ConfigError::whole_file(file, "the file cannot be loaded"))),
        }
    }

    pub fn first_error(&self) -> Option<ConfigError> {
        let mut first = self.errors.first()?.clone();
        let more = self.errors.len() - 1;
        if more > 0 {
            first.message = format!(
                "{} (and {more} more problem{}: run `check-config {}` to see them all)",
                first.message,
                if more == 1 { "" } else { "s" },
                first.file.display()
            );
        }
        Some(first)
    }
}

/// The most problems one file reports: past this, fix the first ones and look again.
const MAX_PROBLEMS: usize = 100;

/// Parses `text` (the contents of `file`) into `T` and collects every problem instead of
/// stopping at the first: after each error, the lines of the offending entry (the line
/// the error points at, and the more deeply indented lines that belong to it) are
/// commented out and the text is parsed again. An error that only follows from an entry
/// taken out before (a job left without its `job_name`) is not reported twice. When the
/// YAML itself does not parse, that one error is all there is.
///
/// The value, when there is one, is what the rest of the file means without the bad
/// entries, so that the caller can go on checking it; `errors` not being empty means the
/// file is refused. A file with nothing in it but blank lines and comments is read as an
/// empty mapping (every setting at its default) and warned about.
pub fn parse_yaml_all<T: DeserializeOwned>(file: &Path, text: &str) -> (Option<T>, Problems) {
    let mut problems = Problems::default();
    let empty = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if empty {
        problems.warn(ConfigError::whole_file(
            file,
            "the file is empty (nothing but blank lines and comments): every setting has its default; check that this is the file you meant",
        ));
        let value = problems.take(from_yaml_str(file, "{}"));
        return (value, problems);
    }
    // YAML that does not parse as YAML at all: one error, nothing to go on with.
    if let Err(e) = from_yaml_str::<serde::de::IgnoredAny>(file, text) {
        problems.error(e);
        return (None, problems);
    }
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut masked = vec![false; lines.len()];
    loop {
        let joined = lines.join("\n");
        let err = match from_yaml_str::<T>(file, &joined) {
            Ok(value) => return (Some(value), problems),
            Err(err) => err,
        };
        let line = err.line as usize;
        if line == 0 || line > lines.len() || masked[line - 1] {
            if !(err.message.starts_with("missing field") && masked.iter().any(|m| *m)) {
                problems.error(err);
            }
            return (None, problems);
        }
        let (start, end) = if err.message.starts_with("missing field") {
            enclosing_block(&lines, line - 1, err.column as usize)
        } else {
            (line - 1, block_end(&lines, line - 1))
        };
        // The entry and the comments right after it: an entry whose lines were all
        // taken out before is left empty (`fleet:` with nothing under it any more).
        let mut reach = end;
        while reach < lines.len() && {
            let t = lines[reach].trim_start();
            t.is_empty() || t.starts_with('#')
        } {
            reach += 1;
        }
        let follows_earlier = masked[start..reach].iter().any(|m| *m);
        if !follows_earlier {
            problems.error(err);
        }
        for i in start..end {
            if !masked[i] {
                lines[i] = format!("#{}", lines[i]);
                masked[i] = true;
            }
        }
        // Taking lines out of a multi-line flow collection (`[` ... `]`) can break the
        // YAML itself: what would follow is noise, so stop at what was found.
        if problems.errors.len() >= MAX_PROBLEMS
            || from_yaml_str::<serde::de::IgnoredAny>(file, &lines.join("\n")).is_err()
        {
            return (None, problems);
        }
    }
}

/// Reads and parses `file` as `R`, then checks it with `check`, which notes what it
/// finds wrong: every problem, each with its place. The config is `Some` only when
/// there is no error (a binary's `check`, shared by its loader and `check-config`).
pub fn check_yaml_file<R: DeserializeOwned, C>(
    file: &Path,
    check: impl FnOnce(R, &mut Problems) -> C,
) -> (Option<C>, Problems) {
    let (raw, mut problems) = load_yaml_file_all::<R>(file);
    let config = raw.map(|raw| check(raw, &mut problems));
    let config = config.filter(|_| problems.errors.is_empty());
    (config, problems)
}

/// Reads `file` and parses it with [`parse_yaml_all`].
pub fn load_yaml_file_all<T: DeserializeOwned>(file: &Path) -> (Option<T>, Problems) {
    match std::fs::read_to_string(file) {
        Ok(text) => parse_yaml_all(file, &text),
        Err(e) => {
            let mut problems = Problems::default();
            problems.error(ConfigError::whole_file(
                file,
                format!("cannot read the file: {e}"),
            ));
            (None, problems)
        }
    }
}

/// The end (exclusive) of the entry that starts on line `start` (0-based): that line
/// and the following lines that are blank, comments, or indented more deeply.
fn block_end(lines: &[String], start: usize) -> usize {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let base = indent(&lines[start]);
    let mut end = start + 1;
    let mut i = start + 1;
    while i < lines.len() {
        let l = &lines[i];
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            i += 1;
            continue;
        }
        if indent(l) > base {
            i += 1;
            end = i;
        } else {
            break;
        }
    }
    end
}

/// The lines of the mapping a "missing field" error is about: the entry that starts on
/// line `line` (0-based) when the mapping starts in the middle of it (`- job_name: a`,
/// `key: {`), else the entry that line belongs to.
fn enclosing_block(lines: &[String], line: usize, column: usize) -> (usize, usize) {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let own = indent(&lines[line]);
    if column > own + 1 {
        return (line, block_end(lines, line));
    }
    let parent = (0..line).rev().find(|i| {
        let t = lines[*i].trim_start();
        !t.is_empty() && !t.starts_with('#') && indent(&lines[*i]) < own
    });
    match parent {
        Some(p) => (p, block_end(lines, p)),
        None => (0, lines.len()),
    }
}

/// Rewrites serde's terse type errors ("invalid u32", "expected mapping start") into
/// what a user can act on: the field (read from the line the error points at), what
/// was written, what was expected, and an example.
fn explain(text: &str, line: u64, column: u64, message: &str) -> String {
    let expected = if message.starts_with("invalid u") || message.starts_with("invalid i") {
        if message.starts_with("invalid u") {
            "a whole number, 0 or more"
        } else {
            "a whole number"
        }
    } else if message.starts_with("invalid f") {
        "a number"
    } else if message == "expected mapping start" {
        "a mapping of names to values, `{name: value}` or one `name: value` per indented line"
    } else if message == "expected sequence start" {
        "a list, `[a, b]` or one `- item` per indented line"
    } else if message == "expected string scalar" {
        "a single string"
    } else if message.starts_with("data did not match any variant") {
        "one of the forms this option takes"
    } else if message.starts_with("invalid type") || message.starts_with("invalid bool") {
        ""
    } else {
        return message.to_string();
    };
    let Some(source) = text.lines().nth(line.saturating_sub(1) as usize) else {
        return message.to_string();
    };
    // The parser counts columns in characters, not bytes.
    let col = source
        .char_indices()
        .nth(column.saturating_sub(1) as usize)
        .map_or(source.len(), |(i, _)| i);
    let (before, after) = source.split_at(col);
    let field = field_before(before);
    let written = written_at(after);
    let mut out = match &field {
        Some(f) => format!("{f}: "),
        None => String::new(),
    };
    if expected.is_empty() {
        out.push_str(message);
    } else {
        match written {
            Some(w) => out.push_str(&format!("{w} is not {expected}")),
            None => out.push_str(&format!("expected {expected}")),
        }
        out.push_str(&format!(" ({message})"));
    }
    if let Some(example) = field.as_deref().and_then(example_of) {
        out.push_str(&format!("; for example `{example}`"));
    }
    out
}

/// The key whose value starts where `before` ends: `    retries: ` → `retries`.
fn field_before(before: &str) -> Option<String> {
    let t = before.trim_end().strip_suffix(':')?;
    let key = t
        .rsplit(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.'))
        .next()?;
    (!key.is_empty()).then(|| key.to_string())
}

/// The value as written, for the message: the scalar or the rest of the line.
fn written_at(after: &str) -> Option<String> {
    let v = after.split(" #").next().unwrap_or(after).trim();
    let mut v = v.trim_end_matches(',').trim();
    // A flow value ends inside its parent's brackets: drop the parent's closers.
    while (v.ends_with('}') && v.matches('{').count() < v.matches('}').count())
        || (v.ends_with(']') && v.matches('[').count() < v.matches(']').count())
    {
        v = v[..v.len() - 1].trim_end_matches(',').trim_end();
    }
    if v.is_empty() {
        None
    } else {
        let v: String = v.chars().take(60).collect();
        Some(format!("{v:?}"))
    }
}

/// An example of each option whose type a newcomer can get wrong.
fn example_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "retries" => "retries: 2",
        "agents" => "agents: {region: eu}",
        "labels" => "labels: {team: shop}",
        "external_labels" => "external_labels: {cluster: eu1}",
        "quorum" => "quorum: majority   # or any, all, or a number from 1",
        "agents_per_target" => "agents_per_target: 2",
        "static_configs" => "static_configs: [{targets: [\"http://127.0.0.1:8080/\"]}]",
        "targets" => "targets: [\"http://127.0.0.1:8080/\", \"example.com:443\"]",
        "file_sd_configs" => "file_sd_configs: [{files: [\"targets/*.yml\"]}]",
        "files" => "files: [\"targets/*.yml\"]",
        "jobs" => {
            "jobs: [{job_name: web, module: http_2xx, static_configs: [{targets: [\"http://127.0.0.1:8080/\"]}]}]"
        }
        "modules" => "modules: {http_2xx: {prober: http}}",
        "job_name" => "job_name: web",
        "module" => "module: http_2xx",
        "prober" => "prober: http   # or tcp, dns",
        "headers" => "headers: {X-Scope-OrgID: tenant-1}",
        "tokens" => "tokens: [{agent: edge-1, token_file: /etc/sonde/edge-1.token}]",
        "aggregators" => "aggregators: [{address: \"http://127.0.0.1:9451\"}]",
        "remote_write" => "remote_write: [{url: \"http://127.0.0.1:9090/api/v1/write\"}]",
        "allowed_targets" => "allowed_targets: [\"*.internal:443\"]",
        "allowed_modules" => "allowed_modules: [http_2xx]",
        "allowed_file_paths" => "allowed_file_paths: [\"/etc/sonde/certs/*\"]",
        "max_concurrent_probes" => "max_concurrent_probes: 64",
        "valid_status_codes" => "valid_status_codes: [200, 204]",
        "enabled" => "enabled: true",
        "insecure_skip_verify" => "insecure_skip_verify: false",
        "allow_anonymous" => "allow_anonymous: false",
        "shard" => "shard: {index: 0, total: 2}",
        "index" | "total" => "shard: {index: 0, total: 2}",
        _ => return None,
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
    fn wrong_types_name_the_field_and_show_an_example() {
        let err = from_yaml_str::<JobConfig>(
            Path::new("j.yml"),
            "job_name: x\nmodule: m\nretries: two\n",
        )
        .unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(
            err.message
                .starts_with("retries: \"two\" is not a whole number"),
            "{err}"
        );
        assert!(err.message.contains("`retries: 2`"), "{err}");
        let err = from_yaml_str::<JobConfig>(
            Path::new("j.yml"),
            "job_name: x\nmodule: m\nagents: region=eu\n",
        )
        .unwrap_err();
        assert!(
            err.message
                .starts_with("agents: \"region=eu\" is not a mapping"),
            "{err}"
        );
        assert!(err.message.contains("`agents: {region: eu}`"), "{err}");
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        #[allow(dead_code)]
        modules: BTreeMap<String, Module>,
        #[serde(default)]
        jobs: Vec<JobConfig>,
    }

    #[test]
    fn every_problem_is_reported() {
        let text = "modules:\n  m:\n    prober: http\n    htp: {}\njobs:\n  - job_name: a\n    module: m\n    retries: two\n  - module: m\n    job_name: [b]\n    static_configs:\n      - targets: [x]\n  - job_name: c\n    module: m\n    agents: region=eu\n  - job_name: d\n    module: m\nextra: 1\n";
        let (doc, problems) = parse_yaml_all::<Doc>(Path::new("c.yml"), text);
        let lines: Vec<u64> = problems.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 8, 10, 15, 18], "{problems:#?}");
        assert!(
            problems
                .errors
                .iter()
                .all(|e| !e.message.contains("missing field"))
        );
        // What is left still parses, so that the caller can check the rest.
        let doc = doc.unwrap();
        let names: Vec<&str> = doc.jobs.iter().map(|j| j.job_name.as_str()).collect();
        assert_eq!(names, ["a", "c", "d"]);
        assert!(problems.warnings.is_empty());
    }

    #[test]
    fn a_multi_line_flow_collection_stops_the_search_instead_of_adding_noise() {
        let text = "jobs: [\n  {job_name: a, module: m,\n   retries: two},\n  {job_name: b, module: m}]\nextra: 1\n";
        let (doc, problems) = parse_yaml_all::<Doc>(Path::new("c.yml"), text);
        assert!(doc.is_none());
        assert_eq!(problems.errors.len(), 1, "{problems:#?}");
        assert_eq!(problems.errors[0].line, 3, "{problems:#?}");
    }

    #[test]
    fn a_syntax_error_is_one_problem_and_an_empty_file_a_warning() {
        let (doc, problems) = parse_yaml_all::<Doc>(Path::new("c.yml"), "jobs: [\n  - x: 1\n");
        assert!(doc.is_none());
        assert_eq!(problems.errors.len(), 1, "{problems:#?}");
        let (doc, problems) = parse_yaml_all::<Doc>(Path::new("c.yml"), "# nothing yet\n\n");
        assert!(doc.is_some() && problems.errors.is_empty());
        assert!(
            problems.warnings[0].message.contains("empty"),
            "{problems:#?}"
        );
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

    /// Found by the `blackbox_modules` fuzzer: a multi-byte character (here a byte-order
    /// mark) just before the key used to be sliced through while naming the field.
    #[test]
    fn non_ascii_text_before_a_bad_value_is_named_not_sliced() {
        let text = "\u{FEFF}modules:    c a b|   preferred_iprs:        ip3\n";
        let err =
            from_yaml_str::<BTreeMap<String, BTreeMap<String, Module>>>(Path::new("b.yml"), text)
                .unwrap_err();
        assert_eq!(err.line, 1, "{err}");
        // Columns count characters: the field and the value are found on a line
        // with multi-byte characters before them.
        let err = from_yaml_str::<BTreeMap<String, BTreeMap<String, String>>>(
            Path::new("j.yml"),
            "labels: {région: [1]}\n",
        )
        .unwrap_err();
        assert!(
            err.message
                .starts_with("région: \"[1]\" is not a single string"),
            "{err}"
        );
    }
}
