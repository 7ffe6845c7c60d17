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
    let mut problems = Problems::default();
    let resolved = resolve_jobs_all(file, modules, jobs, defaults, &mut problems);
    match problems.errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(resolved),
    }
}

/// Checks `modules` and `jobs` (read from `file`) and resolves each job, adding every
/// problem to `problems` (each at its job's place); a job with an error is left out.
/// A Prometheus scrape-job field with no meaning here is a warning, one per field.
pub fn resolve_jobs_all(
    file: &Path,
    modules: &BTreeMap<String, Module>,
    jobs: &[Located<JobConfig>],
    defaults: JobDefaults,
    problems: &mut Problems,
) -> Vec<ResolvedJob> {
    let mut names = BTreeSet::new();
    let mut resolved = Vec::with_capacity(jobs.len());
    for located in jobs {
        let before = problems.errors.len();
        for message in ignored_field_warnings(&located.value) {
            problems.warn(ConfigError::at(file, located.referenced, message));
        }
        if let Some(job) = resolve_one(
            file,
            modules,
            located,
            defaults,
            &mut names,
            &mut problems.errors,
        ) && problems.errors.len() == before
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
        let module_name = match (job.module.as_str(), module_param(job)) {
            ("", None) => {
                report(err(format!(
                    "job {:?} names no module: give module: NAME (or, as in a Prometheus blackbox job, params: {{module: [NAME]}})",
                    job.job_name
                )));
                return None;
            }
            (given, Some(param)) if !given.is_empty() && given != param => {
                report(err(format!(
                    "job {:?}: module {given:?} and params.module {param:?} disagree; keep one of them",
                    job.job_name
                )));
                return None;
            }
            ("", Some(param)) => param,
            (given, _) => given,
        };
        let Some(module) = modules.get(module_name) else {
            let known: Vec<_> = modules.keys().map(String::as_str).collect();
            report(err(format!(
                "job {:?} uses module {:?}, which is not defined (defined: {})",
                job.job_name,
                module_name,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
            return None;
        };
        let both = |ours: &str, theirs: &str| {
            format!(
                "job {:?}: {ours} and {theirs} are the same setting, given twice; keep one of them",
                job.job_name
            )
        };
        if job.interval.is_some() && job.scrape_interval.is_some() {
            report(err(both("interval", "scrape_interval")));
        }
        if job.timeout.is_some() && job.scrape_timeout.is_some() {
            report(err(both("timeout", "scrape_timeout")));
        }
        let given_interval = job.interval.or(job.scrape_interval);
        let given_timeout = job.timeout.or(job.scrape_timeout);
        let interval = given_interval.map_or(defaults.interval, PromDuration::as_duration);
        if interval.is_zero() {
            report(err(format!(
                "job {:?}: interval must be greater than 0",
                job.job_name
            )));
        }
        let job_timeout = match given_timeout {
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
            // A relabeled job's probed target is known only after relabeling, where it is checked.
            let relabeled = !job.relabel_configs.is_empty() || job.params.contains_key("target");
            for target in group.targets.iter().filter(|_| !relabeled) {
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
        // Settled under our own names, so that nothing downstream reads Prometheus's.
        let mut config = job.clone();
        config.module = module_name.to_string();
        config.interval = given_interval;
        config.scrape_interval = None;
        config.timeout = given_timeout;
        config.scrape_timeout = None;
        Some(ResolvedJob {
            name: job.job_name.clone(),
            module_name: module_name.to_string(),
            module: module.clone(),
            interval,
            timeout,
            quorum: job.quorum,
            retries: job.retries,
            freshness,
            config,
        })
    }
}

/// The module a Prometheus blackbox job names in its URL parameters (the first value, the
/// one blackbox_exporter reads).
fn module_param(job: &JobConfig) -> Option<&str> {
    job.params
        .get("module")
        .and_then(|values| values.first())
        .map(String::as_str)
}

/// What `job` says that is ignored here, one message per field.
fn ignored_field_warnings(job: &JobConfig) -> Vec<String> {
    let name = &job.job_name;
    let mut warnings: Vec<String> = job
        .ignored_fields()
        .into_iter()
        .map(|(field, why)| format!("job {name:?}: field {field} is ignored: {why}"))
        .collect();
    if job.honor_labels == Some(true) {
        warnings.push(format!(
            "job {name:?}: field honor_labels is ignored: probe results carry no job or instance labels of their own to honor"
        ));
    }
    for (param, values) in &job.params {
        match param.as_str() {
            "module" if values.len() > 1 => warnings.push(format!(
                "job {name:?}: params.module: only the first module, {:?}, is probed (as blackbox_exporter does)",
                values[0]
            )),
            "module" | "target" => {}
            other => warnings.push(format!(
                "job {name:?}: field params.{other} is ignored: only module and target mean something to a probe (relabeling still sees __param_{other})"
            )),
        }
    }
    warnings
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
        Prober::Dns
        | Prober::Icmp
        | Prober::Grpc
        | Prober::Unix
        | Prober::Websocket
        | Prober::Multihttp => Ok(()),
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
        let mut problems = Problems::default();
        let jobs = resolve_jobs_all(
            Path::new("c.yml"),
            &doc.modules,
            &doc.jobs,
            JobDefaults::default(),
            &mut problems,
        );
        let found: Vec<(u64, bool)> = problems
            .errors
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

    fn resolve_with_problems(text: &str) -> (Vec<ResolvedJob>, Problems) {
        let doc: Doc = from_yaml_str(Path::new("c.yml"), text).unwrap();
        let mut problems = Problems::default();
        let jobs = resolve_jobs_all(
            Path::new("c.yml"),
            &doc.modules,
            &doc.jobs,
            JobDefaults::default(),
            &mut problems,
        );
        (jobs, problems)
    }

    #[test]
    fn a_prometheus_blackbox_job_loads_as_it_is() {
        let (jobs, problems) = resolve_with_problems(
            r#"
modules: {http_2xx: {prober: http}}
jobs:
  - job_name: blackbox
    metrics_path: /probe
    scrape_interval: 30s
    scrape_timeout: 7s
    honor_labels: false
    params:
      module: [http_2xx]
    static_configs:
      - targets: [http://prometheus.io, prometheus.io]
    relabel_configs:
      - source_labels: [__address__]
        target_label: __param_target
      - source_labels: [__param_target]
        target_label: instance
      - target_label: __address__
        replacement: 127.0.0.1:9115
"#,
        );
        assert!(problems.errors.is_empty(), "{problems:#?}");
        assert!(problems.warnings.is_empty(), "{problems:#?}");
        let job = &jobs[0];
        assert_eq!(job.module_name, "http_2xx");
        assert_eq!(job.config.module, "http_2xx");
        assert_eq!(job.interval, Duration::from_secs(30));
        assert_eq!(job.timeout, Duration::from_secs(7));
        assert_eq!(job.config.relabel_configs.len(), 3);
        assert_eq!(job.config.metrics_path.as_deref(), Some("/probe"));
    }

    #[test]
    fn prometheus_fields_with_no_meaning_here_are_warnings() {
        let (jobs, problems) = resolve_with_problems(
            r#"
modules: {m: {prober: http}}
jobs:
  - job_name: web
    module: m
    scheme: https
    honor_labels: true
    sample_limit: 100
    tls_config: {insecure_skip_verify: true}
    metric_relabel_configs: [{action: labeldrop, regex: x}]
    consul_sd_configs: [{server: localhost:8500}]
    params: {module: [m, other], hostname: [h]}
"#,
        );
        assert!(problems.errors.is_empty(), "{problems:#?}");
        assert_eq!(jobs.len(), 1);
        let warnings: Vec<String> = problems
            .warnings
            .iter()
            .map(|w| w.message.clone())
            .collect();
        for field in [
            "scheme",
            "sample_limit",
            "tls_config",
            "metric_relabel_configs",
            "consul_sd_configs",
            "honor_labels",
            "params.hostname",
        ] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.starts_with(&format!("job \"web\": field {field} is ignored: "))),
                "{field}: {warnings:#?}"
            );
        }
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("only the first module, \"m\"")),
            "{warnings:#?}"
        );
        assert_eq!(warnings.len(), 8, "{warnings:#?}");
        assert!(
            problems.warnings.iter().all(|w| w.line == 4),
            "{problems:#?}"
        );
    }

    #[test]
    fn fields_that_are_neither_ours_nor_prometheus_are_refused() {
        let e = resolve("modules: {m: {prober: http}}\njobs:\n  - {job_name: a, module: m, scrape_intervall: 5s}\n")
            .unwrap_err();
        assert!(e.message.contains("scrape_intervall"), "{e}");
    }

    #[test]
    fn the_same_setting_twice_is_an_error() {
        let cases = [
            (
                "module: m, interval: 5s, scrape_interval: 5s",
                "interval and scrape_interval",
            ),
            (
                "module: m, timeout: 1s, scrape_timeout: 1s",
                "timeout and scrape_timeout",
            ),
            ("module: m, params: {module: [n]}", "disagree"),
        ];
        for (fields, want) in cases {
            let e = resolve(&format!(
                "modules: {{m: {{prober: http}}, n: {{prober: http}}}}\njobs:\n  - {{job_name: a, {fields}}}\n"
            ))
            .unwrap_err();
            assert!(e.message.contains(want), "{fields}: {e}");
            assert_eq!(e.line, 3, "{e}");
        }
        let e = resolve("modules: {m: {prober: http}}\njobs:\n  - {job_name: a}\n").unwrap_err();
        assert!(e.message.contains("names no module"), "{e}");
        let jobs = resolve(
            "modules: {m: {prober: http}}\njobs:\n  - {job_name: a, module: m, params: {module: [m]}, scrape_timeout: 2s}\n",
        )
        .unwrap();
        assert_eq!(jobs[0].timeout, Duration::from_secs(2));
        assert_eq!(jobs[0].config.timeout, Some(PromDuration::from_secs(2)));
    }

    #[test]
    fn a_relabeled_job_checks_its_targets_after_relabeling() {
        // The address is only where relabeling starts: here it gains its port.
        let jobs = resolve(
            "modules: {t: {prober: tcp}}\njobs:\n  - job_name: a\n    module: t\n    static_configs: [{targets: [db.internal]}]\n    relabel_configs: [{source_labels: [__address__], target_label: __address__, replacement: '$1:5432'}]\n",
        )
        .unwrap();
        assert_eq!(jobs.len(), 1);
    }

    #[test]
    fn ports() {
        assert_eq!(split_port("a:80"), Some(("a", 80)));
        assert_eq!(split_port("[::1]:53"), Some(("::1", 53)));
        assert_eq!(split_port("a"), None);
        assert_eq!(split_port(":80"), None);
    }
}
