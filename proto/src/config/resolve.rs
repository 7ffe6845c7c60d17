//! Checks a list of jobs against the modules they name and fills in their defaults, for
//! both the aggregator's jobs and an agent's local jobs.

use super::{ConfigError, JobConfig, Located, Module, Problems, PromDuration, Quorum};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A job whose module exists and whose interval and timeout are settled.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedJob {
    pub name: String,
    pub module_name: String,
    pub module: Module,
    pub interval: Duration,
    /// The probe deadline: the job's (or global) timeout, lowered to the module's own
    /// timeout when that is shorter, as blackbox_exporter does.
    pub timeout: Duration,
    pub quorum: Quorum,
    pub retries: u32,
    /// How long a result stays fresh (counts toward `up`).
    pub freshness: Duration,
    pub config: JobConfig,
}

/// Defaults that apply to every job that does not set its own.
#[derive(Clone, Copy, Debug)]
pub struct JobDefaults {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for JobDefaults {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Checks `modules` and `jobs` (read from `file`) and resolves each job; the first
/// problem, if any (see [`resolve_jobs_all`] for every one).
pub fn resolve_jobs(
    file: &Path,
    modules: &BTreeMap<String, Module>,
    jobs: &[Located<JobConfig>],
    defaults: JobDefaults,
) -> Result<Vec<ResolvedJob>, ConfigError> {
    let mut problems = Vec::new();
    let resolved = resolve_jobs_all(file, modules, jobs, defaults, &mut problems);
    match problems.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(resolved),
    }
}

/// Checks `modules` and `jobs` (read from `file`) and resolves each job, adding every
/// problem to `problems` (each at its job's place); a job with a problem is left out.
pub fn resolve_jobs_all(
    file: &Path,
    modules: &BTreeMap<String, Module>,
    jobs: &[Located<JobConfig>],
    defaults: JobDefaults,
    problems: &mut Vec<ConfigError>,
) -> Vec<ResolvedJob> {
    let mut names = BTreeSet::new();
    let mut resolved = Vec::with_capacity(jobs.len());
    for located in jobs {
        let before = problems.len();
        if let Some(job) = resolve_one(file, modules, located, defaults, &mut names, problems)
            && problems.len() == before
        {
            resolved.push(job);
        }
    }
    resolved
}

/// One job: `None` when it cannot be resolved at all; `problems` gets every problem found.
fn resolve_one<'a>(
    file: &Path,
    modules: &BTreeMap<String, Module>,
    located: &'a Located<JobConfig>,
    defaults: JobDefaults,
    names: &mut BTreeSet<&'a str>,
    problems: &mut Vec<ConfigError>,
) -> Option<ResolvedJob> {
    {
        let job = &located.value;
        let err = |msg: String| ConfigError::at(file, located.referenced, msg);
        let mut report = |e: ConfigError| problems.push(e);
        if job.job_name.is_empty() {
            report(err("job_name must not be empty".into()));
        }
        if !names.insert(job.job_name.as_str()) {
            report(err(format!(
                "job_name {:?} is used twice; every job needs a unique name",
                job.job_name
            )));
        }
        let Some(module) = modules.get(&job.module) else {
            let known: Vec<_> = modules.keys().map(String::as_str).collect();
            report(err(format!(
                "job {:?} uses module {:?}, which is not defined (defined: {})",
                job.job_name,
                job.module,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
            return None;
        };
        let interval = job
            .interval
            .map_or(defaults.interval, PromDuration::as_duration);
        if interval.is_zero() {
            report(err(format!(
                "job {:?}: interval must be greater than 0",
                job.job_name
            )));
        }
        let job_timeout = match job.timeout {
            Some(t) => t.as_duration(),
            None => defaults.timeout.min(interval),
        };
        if job_timeout.is_zero() {
            report(err(format!(
                "job {:?}: timeout must be greater than 0",
                job.job_name
            )));
        }
        if job_timeout > interval {
            report(err(format!(
                "job {:?}: timeout {} is longer than the interval {}; lower the timeout or raise the interval",
                job.job_name,
                PromDuration(job_timeout),
                PromDuration(interval)
            )));
        }
        let timeout = if module.timeout.0.is_zero() {
            job_timeout
        } else {
            module.timeout.0.min(job_timeout)
        };
        if let Quorum::AtLeast(0) = job.quorum {
            report(err(format!(
                "job {:?}: quorum must be at least 1",
                job.job_name
            )));
        }
        if job.agents_per_target == Some(0) {
            report(err(format!(
                "job {:?}: agents_per_target must be at least 1 (remove it to have every matching agent probe every target)",
                job.job_name
            )));
        }
        if let (Some(k), Quorum::AtLeast(q)) = (job.agents_per_target, job.quorum)
            && q > k
        {
            report(err(format!(
                "job {:?}: quorum {q} can never be met with agents_per_target {k}; lower the quorum or raise agents_per_target",
                job.job_name
            )));
        }
        if let Err(e) =
            super::validate_labels(&job.agents, &format!("job {:?}: agents", job.job_name))
        {
            report(err(e.to_string()));
        }
        for group in &job.static_configs {
            if let Err(e) = super::validate_labels(
                &group.labels,
                &format!("job {:?}: static_configs labels", job.job_name),
            ) {
                report(err(e.to_string()));
            }
            for target in &group.targets {
                if let Err(m) = check_target(module, target) {
                    report(err(format!(
                        "job {:?}: target {target:?}: {m}",
                        job.job_name
                    )));
                }
            }
        }
        for sd in &job.file_sd_configs {
            if sd.files.is_empty() {
                report(err(format!(
                    "job {:?}: file_sd_configs entry needs at least one file",
                    job.job_name
                )));
            }
        }
        let sd_problems = (job.http_sd_configs.iter())
            .flat_map(super::discovery::check_http_sd)
            .chain(
                job.dns_sd_configs
                    .iter()
                    .flat_map(super::discovery::check_dns_sd),
            );
        for problem in sd_problems {
            report(err(format!("job {:?}: {problem}", job.job_name)));
        }
        for sd in &job.kubernetes_sd_configs {
            if let Err(m) = sd.validate() {
                report(err(format!(
                    "job {:?}: kubernetes_sd_configs ({} role): {m}",
                    job.job_name, sd.role
                )));
            }
        }
        let freshness = match job.freshness {
            Some(f) if f.0 < interval => {
                report(err(format!(
                    "job {:?}: freshness {f} is shorter than the interval {}; every target would go missing between two probes",
                    job.job_name,
                    PromDuration(interval)
                )));
                f.0
            }
            Some(f) => f.0,
            None => interval * 2 + job_timeout,
        };
        Some(ResolvedJob {
            name: job.job_name.clone(),
            module_name: job.module.clone(),
            module: module.clone(),
            interval,
            timeout,
            quorum: job.quorum,
            retries: job.retries,
            freshness,
            config: job.clone(),
        })
    }
}

/// A blackbox_exporter config file, for `modules_file`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BlackboxFile {
    #[serde(default)]
    modules: BTreeMap<String, Located<Module>>,
}

/// The modules of a config file (`file`): those of its `modules_file` (an existing
/// blackbox.yml, relative to `file`'s directory) merged with its own `modules:`, each
/// validated. Every problem goes to `problems`, at the module's place (in `file`, or in
/// the modules file).
pub fn resolve_modules(
    file: &Path,
    modules_file: Option<&Located<PathBuf>>,
    inline: &BTreeMap<String, Located<Module>>,
    problems: &mut Problems,
) -> BTreeMap<String, Module> {
    let mut all: BTreeMap<String, (PathBuf, &Located<Module>)> = BTreeMap::new();
    let from_file;
    if let Some(located) = modules_file {
        let base = file.parent().unwrap_or(Path::new("."));
        let path = base.join(&located.value);
        match std::fs::read_to_string(&path) {
            Err(e) => problems.error(ConfigError::at(
                file,
                located.referenced,
                format!(
                    "modules_file: cannot read {}: {e}; give a blackbox_exporter config file (a path relative to this file's directory) or remove modules_file",
                    path.display()
                ),
            )),
            Ok(text) => {
                let (parsed, more) = super::parse_yaml_all::<BlackboxFile>(&path, &text);
                problems.errors.extend(more.errors);
                problems.warnings.extend(more.warnings);
                from_file = parsed.map(|f| f.modules).unwrap_or_default();
                for (name, module) in &from_file {
                    all.insert(name.clone(), (path.clone(), module));
                }
            }
        }
    }
    for (name, module) in inline {
        if let Some((other, theirs)) = all.get(name) {
            problems.error(ConfigError::at(
                file,
                module.referenced,
                format!(
                    "module {name:?} is defined both here and in modules_file ({}:{}); rename one of them",
                    other.display(),
                    theirs.referenced.line()
                ),
            ));
            continue;
        }
        all.insert(name.clone(), (file.to_path_buf(), module));
    }
    let mut modules = BTreeMap::new();
    for (name, (path, module)) in all {
        // Kept even when invalid, so that the jobs naming it are not also told it is missing.
        if let Err(m) = module.value.validate() {
            problems.error(ConfigError::at(
                &path,
                module.referenced,
                format!("modules.{name}: {m}"),
            ));
        }
        modules.insert(name, module.value.clone());
    }
    modules
}

/// Why a target cannot be probed with its job's module.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("a target must be a non-empty string without spaces")]
    Blank,
    #[error("the tcp prober needs host:port (for example 127.0.0.1:443)")]
    TcpWithoutPort,
}

/// Checks that `target` is something `module`'s prober can probe, so typos surface at
/// load time rather than as a failing probe.
pub fn check_target(module: &Module, target: &str) -> Result<(), TargetError> {
    use super::Prober;
    if target.is_empty() || target.chars().any(char::is_whitespace) {
        return Err(TargetError::Blank);
    }
    match module.prober {
        Prober::Http => Ok(()),
        Prober::Tcp => {
            if split_port(target).is_none() {
                return Err(TargetError::TcpWithoutPort);
            }
            Ok(())
        }
        Prober::Dns | Prober::Icmp | Prober::Grpc => Ok(()),
    }
}

/// Splits `host:port` (with `[v6]:port`), or `None` when there is no valid port.
pub fn split_port(target: &str) -> Option<(&str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        None
    } else {
        Some((host, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_yaml_str;

    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        modules: BTreeMap<String, Module>,
        jobs: Vec<Located<JobConfig>>,
    }

    fn resolve(text: &str) -> Result<Vec<ResolvedJob>, ConfigError> {
        let doc: Doc = from_yaml_str(Path::new("c.yml"), text)?;
        resolve_jobs(
            Path::new("c.yml"),
            &doc.modules,
            &doc.jobs,
            JobDefaults::default(),
        )
    }

    #[test]
    fn defaults_and_module_timeout() {
        let jobs = resolve(
            "modules:\n  m: {prober: tcp, timeout: 3s}\njobs:\n  - job_name: a\n    module: m\n    static_configs: [{targets: ['127.0.0.1:1']}]\n",
        )
        .unwrap();
        assert_eq!(jobs[0].interval, Duration::from_secs(15));
        assert_eq!(jobs[0].timeout, Duration::from_secs(3));
    }

    #[test]
    fn errors_point_at_the_job() {
        let e = resolve("modules: {}\njobs:\n  - job_name: a\n    module: nope\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("nope"), "{e}");
        let e = resolve(
            "modules:\n  m: {prober: http}\njobs:\n  - job_name: a\n    module: m\n  - job_name: b\n    module: m\n    interval: 5s\n    timeout: 10s\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("longer than the interval"), "{e}");
        let e = resolve(
            "modules:\n  m: {prober: tcp}\njobs:\n  - job_name: a\n    module: m\n    static_configs: [{targets: [example.com]}]\n",
        )
        .unwrap_err();
        assert!(e.message.contains("host:port"), "{e}");
        let e = resolve(
            "modules:\n  m: {prober: tcp}\njobs:\n  - {job_name: a, module: m}\n  - {job_name: a, module: m}\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 5, "{e}");
    }

    #[test]
    fn every_job_problem_is_reported() {
        let doc: Doc = from_yaml_str(
            Path::new("c.yml"),
            "modules: {m: {prober: tcp}}\njobs:\n  - {job_name: a, module: nope}\n  - {job_name: b, module: m, interval: 5s, timeout: 10s, static_configs: [{targets: [x]}]}\n  - {job_name: c, module: m}\n",
        )
        .unwrap();
        let mut problems = Vec::new();
        let jobs = resolve_jobs_all(
            Path::new("c.yml"),
            &doc.modules,
            &doc.jobs,
            JobDefaults::default(),
            &mut problems,
        );
        let found: Vec<(u64, bool)> = problems
            .iter()
            .map(|e| (e.line, e.message.contains("host:port")))
            .collect();
        assert_eq!(found, [(3, false), (4, false), (4, true)], "{problems:#?}");
        assert_eq!(jobs.len(), 1);
    }

    #[test]
    fn freshness_defaults_to_two_intervals_plus_timeout() {
        let jobs = resolve(
            "modules: {m: {prober: tcp}}\njobs:\n  - {job_name: a, module: m, interval: 10s, timeout: 2s}\n  - {job_name: b, module: m, interval: 10s, freshness: 5m}\n",
        )
        .unwrap();
        assert_eq!(jobs[0].freshness, Duration::from_secs(22));
        assert_eq!(jobs[1].freshness, Duration::from_secs(300));
        let e = resolve("modules: {m: {prober: tcp}}\njobs:\n  - {job_name: a, module: m, interval: 10s, freshness: 5s}\n")
            .unwrap_err();
        assert!(e.message.contains("freshness"), "{e}");
    }

    #[test]
    fn ports() {
        assert_eq!(split_port("a:80"), Some(("a", 80)));
        assert_eq!(split_port("[::1]:53"), Some(("::1", 53)));
        assert_eq!(split_port("a"), None);
        assert_eq!(split_port(":80"), None);
    }
}
