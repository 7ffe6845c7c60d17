//! The aggregator's configuration file (`sonde-aggregator.yml`): schema, defaults and
//! every check `check-config` runs.

use crate::remote_write::config::RemoteWriteConfig;
use serde::Deserialize;
use sonde_proto::config::{
    ByteSize, ConfigError, JobConfig, JobDefaults, Labels, Located, Module, Problems, PromDuration,
    ResolvedJob, check_yaml_file, resolve_jobs_all, resolve_modules,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorFile {
    pub global: Option<Located<GlobalConfig>>,
    /// An existing blackbox.yml whose `modules:` are merged in.
    pub modules_file: Option<Located<PathBuf>>,
    #[serde(default)]
    pub modules: BTreeMap<String, Located<Module>>,
    #[serde(default)]
    pub jobs: Vec<Located<JobConfig>>,
    #[serde(default)]
    pub remote_write: Vec<Located<RemoteWriteConfig>>,
    #[serde(default)]
    pub fleet: FleetConfig,
    #[serde(default)]
    pub history: HistoryConfig,
    /// Maintenance windows (see [`crate::maintenance`]).
    #[serde(default)]
    pub maintenance: Vec<Located<crate::maintenance::WindowSpec>>,
    /// Availability objectives per job, for the reports.
    #[serde(default)]
    pub slo: Vec<Located<crate::report::slo::SloEntry>>,
    #[serde(default)]
    pub status_page: StatusPageConfig,
}

/// `status_page:` how the web pages present themselves (the JSON API is the same either
/// way).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusPageConfig {
    /// A page to publish: no config path, no API links, no agent names or addresses,
    /// no agents, fleet or remote-write sections.
    #[serde(default)]
    pub public: bool,
    /// The pages' heading (default "sonde aggregator").
    #[serde(default)]
    pub title: Option<String>,
}

/// `history:` how long each target's state changes and response times are kept (the
/// status page's timelines, uptimes and charts, `/api/v1/targets/history`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryConfig {
    #[serde(default = "default_history_retention")]
    pub retention: PromDuration,
    /// What the history may weigh in the database; past it the oldest rows go.
    #[serde(default = "default_history_max_size")]
    pub max_size: ByteSize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            retention: default_history_retention(),
            max_size: default_history_max_size(),
        }
    }
}

fn default_history_retention() -> PromDuration {
    PromDuration::from_secs(30 * 86_400)
}

fn default_history_max_size() -> ByteSize {
    ByteSize(256 << 20)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalConfig {
    #[serde(default = "default_interval")]
    pub scrape_interval: PromDuration,
    /// Not given: 10s, or `scrape_interval` when that is shorter (as Prometheus).
    #[serde(default)]
    pub scrape_timeout: Option<Located<PromDuration>>,
    #[serde(default)]
    pub external_labels: Labels,
    /// This aggregator owns the jobs whose `hash(job_name) mod total == index`.
    pub shard: Option<Shard>,
}

fn default_interval() -> PromDuration {
    PromDuration::from_secs(15)
}

fn default_timeout() -> PromDuration {
    PromDuration::from_secs(10)
}

impl Default for GlobalConfig {
    fn default() -> Self {
        Self {
            scrape_interval: default_interval(),
            scrape_timeout: None,
            external_labels: Labels::new(),
            shard: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub index: u32,
    pub total: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Lets agents connect without a token on a non-loopback gRPC address.
    #[serde(default)]
    pub allow_anonymous: bool,
    pub auth: Option<AuthConfig>,
    pub tls: Option<Located<ServerTlsConfig>>,
    /// Grace before a disconnected agent or a silent job is flagged missing.
    #[serde(default = "default_missing_after")]
    pub missing_after: PromDuration,
    /// How long a vanished agent stays listed (and flagged) before it is forgotten.
    #[serde(default = "default_forget_after")]
    pub forget_after: PromDuration,
    /// Results stamped later than now + this are refused.
    #[serde(default = "default_max_clock_skew")]
    pub max_clock_skew: PromDuration,
    #[serde(default)]
    pub limits: FleetLimits,
    /// Agent-local jobs whose targets are one target whoever declares them (several
    /// agents probing the same shared service): their `up` merges every declaring
    /// agent's view. Any other local job's targets belong to the agent that declares
    /// them, and their series carry its `agent` label.
    #[serde(default)]
    pub shared_local_jobs: Vec<String>,
}

fn default_missing_after() -> PromDuration {
    PromDuration::from_secs(120)
}

fn default_forget_after() -> PromDuration {
    PromDuration::from_secs(24 * 3600)
}

fn default_max_clock_skew() -> PromDuration {
    PromDuration::from_secs(60)
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: false,
            auth: None,
            tls: None,
            missing_after: default_missing_after(),
            forget_after: default_forget_after(),
            max_clock_skew: default_max_clock_skew(),
            limits: FleetLimits::default(),
            shared_local_jobs: Vec::new(),
        }
    }
}

pub use sonde_hub::limits::FleetLimits;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub tokens: Vec<Located<TokenEntry>>,
}

/// A token binds one agent id: an agent presenting it may only say it is that agent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub agent: String,
    pub token_file: Option<PathBuf>,
    pub token: Option<String>,
    /// When given, these are the agent's labels: a Hello that contradicts one is refused.
    pub labels: Option<Labels>,
}

pub use sonde_hub::config::{HubConfig, TokenGrant};

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, agents must present a client certificate signed by this CA (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

/// The aggregator's configuration, checked, with defaults and referenced files resolved.
#[derive(Clone, Debug)]
pub struct AggregatorConfig {
    pub file: PathBuf,
    pub scrape_interval: Duration,
    pub external_labels: Labels,
    pub shard: Option<Shard>,
    pub modules: BTreeMap<String, Module>,
    /// The jobs this aggregator owns (all of them, unless sharded).
    pub jobs: Vec<ResolvedJob>,
    pub remote_write: Vec<RemoteWriteConfig>,
    /// token → what it grants; empty when agents need no token.
    pub tokens: HashMap<String, TokenGrant>,
    /// True when `fleet.auth` is configured (even with an empty token list).
    pub auth_required: bool,
    pub allow_anonymous: bool,
    pub tls: Option<ServerTlsConfig>,
    pub missing_after: Duration,
    pub forget_after: Duration,
    pub max_clock_skew: Duration,
    pub limits: FleetLimits,
    /// `fleet.shared_local_jobs`.
    pub shared_local_jobs: BTreeSet<String>,
    pub history: crate::history::Limits,
    /// The config file's maintenance windows, checked.
    pub maintenance: Vec<crate::maintenance::Window>,
    /// `slo:` job → objective in percent.
    pub slo: BTreeMap<String, f64>,
    pub status_page: StatusPageConfig,
}

impl AggregatorConfig {
    /// What the hub needs of this config: the jobs, the fleet's rules and limits.
    pub fn hub(&self) -> HubConfig {
        HubConfig {
            scrape_interval: self.scrape_interval,
            external_labels: self.external_labels.clone(),
            jobs: self.jobs.clone(),
            tokens: self.tokens.clone(),
            auth_required: self.auth_required,
            missing_after: self.missing_after,
            forget_after: self.forget_after,
            max_clock_skew: self.max_clock_skew,
            limits: self.limits,
            shared_local_jobs: self.shared_local_jobs.clone(),
        }
    }

    /// Loads and checks `file`; the first problem, if any, says how many more there are
    /// ([`AggregatorConfig::check`] has them all).
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let (config, problems) = Self::check(file);
        let (config, warnings) = problems.into_result(config, file)?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        Ok(config)
    }

    /// Loads and checks `file`, collecting every problem (errors and warnings, each
    /// with its place). The config is `Some` only when there is no error.
    pub fn check(file: &Path) -> (Option<Self>, Problems) {
        check_yaml_file(file, |raw: AggregatorFile, problems| {
            Self::check_file(file, raw, problems)
        })
    }

    /// Checks what `file` says (already parsed); the first problem, if any.
    pub fn from_file(file: &Path, raw: AggregatorFile) -> Result<Self, ConfigError> {
        let mut problems = Problems::default();
        let config = Self::check_file(file, raw, &mut problems);
        match problems.first_error() {
            Some(e) => Err(e),
            None => Ok(config),
        }
    }

    /// Checks what `file` says, adding every problem to `problems`; what it returns is
    /// meaningful only when no error was added.
    pub fn check_file(file: &Path, raw: AggregatorFile, problems: &mut Problems) -> Self {
        let whole = |msg: String| ConfigError::whole_file(file, msg);
        let base = file.parent().unwrap_or(Path::new("."));
        let (global, global_at) = match raw.global {
            Some(l) => (l.value, Some(l.referenced)),
            None => (GlobalConfig::default(), None),
        };
        let in_global = |msg: String| match global_at {
            Some(place) => ConfigError::at(file, place, msg),
            None => whole(msg),
        };
        if global.scrape_interval.0.is_zero() {
            problems.error(in_global(
                "global.scrape_interval must be greater than 0".into(),
            ));
        }
        // Prometheus's rule: a timeout not given is 10s, or the interval when that is
        // shorter; one given that is longer than the interval is an error.
        let scrape_timeout = match &global.scrape_timeout {
            None => default_timeout().0.min(global.scrape_interval.0),
            Some(t) => {
                if t.value.0 > global.scrape_interval.0 {
                    problems.error(ConfigError::at(
                        file,
                        t.referenced,
                        format!(
                            "global.scrape_timeout {} is longer than global.scrape_interval {}; lower the timeout or remove it (it then defaults to 10s, or to the interval when that is shorter)",
                            t.value, global.scrape_interval
                        ),
                    ));
                }
                t.value.0
            }
        };
        for name in global.external_labels.keys() {
            // `__replica__` and the like are allowed here: HA trackers (Mimir, Cortex) key on them.
            if !sonde_proto::config::is_valid_label_name(name) || name == "__name__" {
                problems.error(in_global(format!(
                    "global.external_labels: {name:?} is not a valid label name"
                )));
            }
        }
        if let Some(shard) = global.shard
            && (shard.total == 0 || shard.index >= shard.total)
        {
            problems.error(in_global(format!(
                "global.shard: index {} must be below total {} (and total at least 1)",
                shard.index, shard.total
            )));
        }

        let modules = resolve_modules(file, raw.modules_file.as_ref(), &raw.modules, problems);

        let defaults = JobDefaults {
            interval: global.scrape_interval.0,
            timeout: scrape_timeout,
        };
        let mut jobs = resolve_jobs_all(file, &modules, &raw.jobs, defaults, problems);
        for job in &mut jobs {
            for sd in &mut job.config.file_sd_configs {
                for pattern in &mut sd.files {
                    *pattern = base.join(&*pattern).to_string_lossy().into_owned();
                }
            }
            for sd in &mut job.config.http_sd_configs {
                sd.relative_to(base);
            }
            for sd in &mut job.config.kubernetes_sd_configs {
                sd.resolve_paths(base);
            }
        }
        if let Some(shard) = global.shard
            && shard.total > 0
        {
            jobs.retain(|j| owns_job(shard, &j.name));
        }

        let mut remote_write = Vec::new();
        for located in raw.remote_write {
            let mut rw = located.value;
            resolve_paths(&mut rw, base);
            match rw.validate() {
                Ok(()) => remote_write.push(rw),
                Err(e) => problems.error(ConfigError::at(file, located.referenced, e.to_string())),
            }
        }
        if let Err(m) = crate::remote_write::config::validate_all(&remote_write) {
            problems.error(whole(m.to_string()));
        }

        let mut tokens = HashMap::new();
        if let Some(auth) = &raw.fleet.auth {
            for located in &auth.tokens {
                let at = |m: String| ConfigError::at(file, located.referenced, m);
                let entry = &located.value;
                let token = match (&entry.token, &entry.token_file) {
                    (Some(t), None) => t.trim().to_string(),
                    (None, Some(path)) => {
                        let path = base.join(path);
                        match std::fs::read_to_string(&path) {
                            Ok(t) => t.trim().to_string(),
                            Err(e) => {
                                problems.error(at(format!(
                                    "fleet.auth.tokens: cannot read token_file {}: {e}",
                                    path.display()
                                )));
                                continue;
                            }
                        }
                    }
                    _ => {
                        problems.error(at(format!(
                            "fleet.auth.tokens: agent {:?} needs exactly one of token_file or token",
                            entry.agent
                        )));
                        continue;
                    }
                };
                if token.is_empty() {
                    problems.error(at(format!(
                        "fleet.auth.tokens: the token of agent {:?} is empty",
                        entry.agent
                    )));
                }
                if entry.agent.is_empty() || entry.agent.len() > MAX_AGENT_ID_BYTES {
                    problems.error(at(format!(
                        "fleet.auth.tokens: agent ids are 1 to {MAX_AGENT_ID_BYTES} bytes long"
                    )));
                }
                if let Some(labels) = &entry.labels
                    && let Err(e) = sonde_proto::config::validate_labels(
                        labels,
                        &format!("fleet.auth.tokens: labels of agent {:?}", entry.agent),
                    )
                {
                    problems.error(at(e.to_string()));
                }
                if let Some(path) = &entry.token_file
                    && let Some(w) = readable_by_others(&base.join(path))
                {
                    problems.warn(at(w));
                }
                let grant = TokenGrant {
                    agent: entry.agent.clone(),
                    labels: entry.labels.clone(),
                };
                if token.is_empty() {
                    continue;
                }
                if let Some(other) = tokens.insert(token, grant) {
                    problems.error(at(format!(
                        "fleet.auth.tokens: agents {:?} and {:?} share a token; each agent needs its own",
                        other.agent, entry.agent
                    )));
                }
            }
            warn_unmatchable_selectors(file, &raw.jobs, &auth.tokens, problems);
        }
        let tls = match raw.fleet.tls {
            Some(located) => {
                let mut tls = located.value;
                for path in [&mut tls.cert_file, &mut tls.key_file]
                    .into_iter()
                    .chain(tls.client_ca_file.as_mut())
                {
                    *path = base.join(&*path);
                    if let Err(e) = std::fs::metadata(&*path) {
                        problems.error(ConfigError::at(
                            file,
                            located.referenced,
                            format!("fleet.tls: cannot read {}: {e}", path.display()),
                        ));
                    }
                }
                Some(tls)
            }
            None => None,
        };
        let maintenance = crate::maintenance::check_config(file, &raw.maintenance, problems);
        let slo = check_slo(file, &raw.slo, &raw.jobs, problems);
        Self {
            file: file.to_path_buf(),
            scrape_interval: global.scrape_interval.0,
            external_labels: global.external_labels,
            shard: global.shard,
            modules,
            jobs,
            remote_write,
            tokens,
            auth_required: raw.fleet.auth.is_some(),
            allow_anonymous: raw.fleet.allow_anonymous,
            tls,
            missing_after: raw.fleet.missing_after.0,
            forget_after: raw.fleet.forget_after.0,
            max_clock_skew: raw.fleet.max_clock_skew.0,
            limits: raw.fleet.limits,
            shared_local_jobs: raw.fleet.shared_local_jobs.into_iter().collect(),
            history: crate::history::Limits {
                retention: raw.history.retention.0,
                max_size: raw.history.max_size.0,
            },
            maintenance,
            slo,
            status_page: raw.status_page,
        }
    }

    /// The all-in-one default: probe this aggregator's own endpoints, so that a newcomer
    /// sees live results without writing any config.
    pub fn all_in_one(
        web: std::net::SocketAddr,
        grpc: std::net::SocketAddr,
    ) -> Result<Self, ConfigError> {
        let text = format!(
            r#"
global:
  scrape_interval: 5s
  scrape_timeout: 3s
modules:
  http_2xx:
    prober: http
    http:
      preferred_ip_protocol: ip4
  tcp_connect:
    prober: tcp
    tcp:
      preferred_ip_protocol: ip4
jobs:
  - job_name: sonde_web
    module: http_2xx
    static_configs:
      - targets: ["http://{web}/-/healthy", "http://{web}/metrics"]
  - job_name: sonde_grpc
    module: tcp_connect
    static_configs:
      - targets: ["{grpc}"]
fleet:
  missing_after: 30s
"#
        );
        let path = Path::new("<built-in all-in-one config>");
        sonde_proto::config::from_yaml_str(path, &text).and_then(|raw| Self::from_file(path, raw))
    }
}

fn resolve_paths(rw: &mut RemoteWriteConfig, base: &Path) {
    let fix = |p: &mut PathBuf| *p = base.join(&*p);
    if let Some(p) = rw.bearer_token_file.as_mut() {
        fix(p);
    }
    if let Some(b) = rw.basic_auth.as_mut() {
        b.password_file.as_mut().map(fix);
        b.username_file.as_mut().map(fix);
    }
    if let Some(a) = rw.authorization.as_mut() {
        a.credentials_file.as_mut().map(fix);
    }
    if let Some(t) = rw.tls_config.as_mut() {
        t.ca_file.as_mut().map(fix);
        t.cert_file.as_mut().map(fix);
        t.key_file.as_mut().map(fix);
    }
}

/// Warns about each job whose `agents:` selector no agent can match: checked offline,
/// so only when every token in `fleet.auth.tokens` binds labels (an agent's labels are
/// then exactly its token's) and none of those label sets satisfies the selector.
fn warn_unmatchable_selectors(
    file: &Path,
    jobs: &[Located<JobConfig>],
    tokens: &[Located<TokenEntry>],
    problems: &mut Problems,
) {
    let bound: Vec<&Labels> = tokens
        .iter()
        .filter_map(|t| t.value.labels.as_ref())
        .collect();
    if tokens.is_empty() || bound.len() != tokens.len() {
        return;
    }
    for located in jobs {
        let job = &located.value;
        if job.agents.is_empty() || bound.iter().any(|labels| job.selects(labels)) {
            continue;
        }
        let granted_by_none: Vec<String> = job
            .agents
            .iter()
            .filter(|(k, v)| !bound.iter().any(|l| l.get(*k) == Some(*v)))
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        let why = if granted_by_none.is_empty() {
            "no single token's labels have all of them".to_string()
        } else {
            format!("no token's labels have {}", granted_by_none.join(", "))
        };
        problems.warn(ConfigError::at(
            file,
            located.referenced,
            format!(
                "job {:?}: no agent can match agents: {}: every token in fleet.auth.tokens binds labels (they are then the agent's labels) and {why}, so this job will run on no agent; fix the selector or a token's labels",
                job.job_name,
                job.agents
                    .iter()
                    .map(|(k, v)| format!("{k}={v:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
}

/// `slo:` as job → objective; a bad entry is an error, a job the file does not
/// configure a warning (an agent may declare it as a local job).
fn check_slo(
    file: &Path,
    entries: &[Located<crate::report::slo::SloEntry>],
    jobs: &[Located<JobConfig>],
    problems: &mut Problems,
) -> BTreeMap<String, f64> {
    use crate::report::slo;
    let mut out = BTreeMap::new();
    for located in entries {
        let entry = &located.value;
        let at = |m: String| ConfigError::at(file, located.referenced, m);
        if let Err(e) = slo::check(entry, &out) {
            problems.error(at(e.to_string()));
            continue;
        }
        if !jobs.iter().any(|j| j.value.job_name == entry.job) {
            problems.warn(at(slo::unknown_job_warning(&entry.job)));
        }
        out.insert(entry.job.clone(), entry.objective);
    }
    out
}

/// Agent ids are at most this long (in bytes), in tokens and in Hellos.
pub const MAX_AGENT_ID_BYTES: usize = 256;

/// A token file others can read is a token others can use: say so (the file is the
/// operator's to fix, so this is a warning, not a refusal).
fn readable_by_others(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "fleet.auth.tokens: token_file {} (mode {mode:o}) is readable by group or others; chmod 600 it",
            path.display()
        )
    })
}

/// The gRPC port would be open to anyone: not loopback, no `fleet.auth`, and no
/// `fleet.allow_anonymous: true`.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}: --grpc.listen-address {grpc} is not a loopback address and fleet.auth is not configured, so anyone who can reach it could join the fleet; add fleet.auth.tokens (see the README's Security model), listen on 127.0.0.1, or set fleet.allow_anonymous: true to accept that",
    file.display()
)]
pub struct OpenFleet {
    pub file: PathBuf,
    pub grpc: std::net::SocketAddr,
}

impl AggregatorConfig {
    /// Secure by default: agents on a non-loopback address must authenticate, unless
    /// the operator said `fleet.allow_anonymous: true` (then a warning, every start).
    pub fn check_listen_address(&self, grpc: std::net::SocketAddr) -> Result<(), OpenFleet> {
        if self.auth_required || grpc.ip().is_loopback() {
            return Ok(());
        }
        if self.allow_anonymous {
            tracing::warn!(
                grpc = %grpc,
                "fleet.allow_anonymous is true: anyone who can reach {grpc} can join the fleet, read every job's modules and report results; configure fleet.auth.tokens"
            );
            return Ok(());
        }
        Err(OpenFleet {
            file: self.file.clone(),
            grpc,
        })
    }
}

/// FNV-1a: stable across versions and platforms, so every shard agrees on ownership.
pub fn owns_job(shard: Shard, job_name: &str) -> bool {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job_name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash % u64::from(shard.total) == u64::from(shard.index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_proto::config::from_yaml_str;

    fn parse(text: &str) -> Result<AggregatorConfig, ConfigError> {
        let file = Path::new("agg.yml");
        AggregatorConfig::from_file(file, from_yaml_str(file, text)?)
    }

    const GOOD: &str = r#"
global:
  scrape_interval: 15s
  scrape_timeout: 10s
  external_labels: {cluster: eu1}
modules:
  http_2xx: {prober: http, timeout: 5s}
  tcp_connect: {prober: tcp}
  dns_a:
    prober: dns
    dns: {query_name: example.com, query_type: A}
jobs:
  - job_name: web
    module: http_2xx
    interval: 15s
    timeout: 5s
    quorum: majority
    retries: 1
    agents: {region: eu}
    static_configs:
      - targets: ["http://127.0.0.1:8080/"]
        labels: {team: shop}
    file_sd_configs:
      - files: ["targets/*.yml"]
remote_write:
  - url: http://127.0.0.1:9090/api/v1/write
    name: local
    remote_timeout: 30s
    headers: {X-Scope-OrgID: tenant-1}
    queue_config: {max_samples_per_send: 2000, batch_send_deadline: 5s, min_backoff: 30ms, max_backoff: 5s}
fleet:
  missing_after: 2m
  forget_after: 24h
"#;

    #[test]
    fn design_example_loads() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.jobs.len(), 1);
        assert_eq!(c.jobs[0].timeout, Duration::from_secs(5));
        assert_eq!(c.external_labels["cluster"], "eu1");
        assert_eq!(c.remote_write.len(), 1);
        assert_eq!(c.missing_after, Duration::from_secs(120));
        assert!(c.jobs[0].config.file_sd_configs[0].files[0].ends_with("targets/*.yml"));
    }

    #[test]
    fn unknown_key_is_located() {
        let text = GOOD.replace("  forget_after: 24h", "  forget_afterr: 24h");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.line, 33, "{e}");
        assert!(e.to_string().starts_with("agg.yml:33:3:"), "{e}");
    }

    #[test]
    fn ha_replica_label_is_allowed() {
        let c = parse("global: {external_labels: {cluster: eu1, __replica__: A}}\n").unwrap();
        assert_eq!(c.external_labels["__replica__"], "A");
        assert!(parse("global: {external_labels: {__name__: x}}\n").is_err());
    }

    #[test]
    fn bad_timeout_is_an_error() {
        let e = parse("global: {scrape_interval: 5s, scrape_timeout: 10s}\n").unwrap_err();
        assert!(e.message.contains("scrape_timeout"), "{e}");
    }

    #[test]
    fn a_default_scrape_timeout_follows_prometheus() {
        let c = parse("global: {scrape_interval: 5s}\nmodules: {m: {prober: tcp}}\njobs:\n  - {job_name: a, module: m}\n")
            .unwrap();
        assert_eq!(c.jobs[0].timeout, Duration::from_secs(5));
        let c = parse("global: {scrape_interval: 1m}\nmodules: {m: {prober: tcp}}\njobs:\n  - {job_name: a, module: m}\n")
            .unwrap();
        assert_eq!(c.jobs[0].timeout, Duration::from_secs(10));
        // Given explicitly, longer than the interval, it stays an error, at its place.
        let e = parse("global:\n  scrape_interval: 5s\n  scrape_timeout: 6s\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sonde-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn check_reports_every_problem_with_its_place() {
        let dir = scratch("every");
        std::fs::write(
            dir.join("blackbox.yml"),
            "modules:\n  http_2xx:\n    prober: http\n",
        )
        .unwrap();
        let file = dir.join("agg.yml");
        std::fs::write(
            &file,
            "modules_file: blackbox.yml\nmodules:\n  http_2xx: {prober: http}\n  bad_re:\n    prober: http\n    http: {fail_if_body_matches_regexp: ['(']}\njobs:\n  - job_name: a\n    module: http_2xx\n    retries: two\n  - job_name: b\n    module: nope\n  - job_name: c\n    module: http_2xx\n    agents: region=eu\nfleet:\n  forget_afterr: 1h\n",
        )
        .unwrap();
        let (config, problems) = AggregatorConfig::check(&file);
        assert!(config.is_none());
        let places: Vec<u64> = problems.errors.iter().map(|e| e.line).collect();
        assert_eq!(places, [10, 15, 17, 3, 5, 11], "{problems:#?}");
        let text: Vec<String> = problems.errors.iter().map(ToString::to_string).collect();
        assert!(
            text[3].contains("modules_file") && text[3].contains("blackbox.yml:3"),
            "{text:#?}"
        );
        assert!(text[4].contains("bad_re"), "{text:#?}");
        assert!(text[5].contains("nope"), "{text:#?}");
        let e = AggregatorConfig::load(&file).unwrap_err();
        assert!(e.message.contains("and 5 more problems"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn check_warns_about_an_empty_file_and_a_selector_no_token_can_match() {
        let dir = scratch("warn");
        let file = dir.join("agg.yml");
        std::fs::write(&file, "# to do\n").unwrap();
        let (config, problems) = AggregatorConfig::check(&file);
        assert!(config.is_some() && problems.errors.is_empty());
        assert!(
            problems.warnings[0].message.contains("empty"),
            "{problems:#?}"
        );

        std::fs::write(
            &file,
            "modules: {m: {prober: tcp}}\njobs:\n  - {job_name: eu, module: m, agents: {region: eu}}\n  - {job_name: us, module: m, agents: {region: us}}\nfleet:\n  auth:\n    tokens:\n      - {agent: e1, token: t1, labels: {region: eu}}\n",
        )
        .unwrap();
        let (config, problems) = AggregatorConfig::check(&file);
        assert!(config.is_some(), "{problems:#?}");
        assert_eq!(problems.warnings.len(), 1, "{problems:#?}");
        let w = &problems.warnings[0];
        assert_eq!(w.line, 4, "{w}");
        assert!(
            w.message.contains("region=\"us\"") && w.message.contains("every token"),
            "{w}"
        );
        // A token without labels could be any agent: nothing can be said offline.
        std::fs::write(
            &file,
            "modules: {m: {prober: tcp}}\njobs:\n  - {job_name: us, module: m, agents: {region: us}}\nfleet:\n  auth:\n    tokens:\n      - {agent: e1, token: t1, labels: {region: eu}}\n      - {agent: e2, token: t2}\n",
        )
        .unwrap();
        let (_, problems) = AggregatorConfig::check(&file);
        assert!(problems.warnings.is_empty(), "{problems:#?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn slo_objectives_are_checked_with_their_place() {
        let jobs = "modules: {m: {prober: tcp}}\njobs:\n  - {job_name: web, module: m}\n";
        let c = parse(&format!("{jobs}slo:\n  - {{job: web, objective: 99.9}}\n")).unwrap();
        assert_eq!(c.slo["web"], 99.9);
        let e = parse(&format!("{jobs}slo:\n  - {{job: web, objective: 100}}\n")).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("strictly between 0 and 100"), "{e}");
        let e = parse(&format!(
            "{jobs}slo:\n  - {{job: web, objective: 99}}\n  - {{job: web, objective: 98}}\n"
        ))
        .unwrap_err();
        assert!(e.message.contains("two objectives"), "{e}");
        let e = parse(&format!("{jobs}slo:\n  - {{job: web, objectiv: 99}}\n")).unwrap_err();
        assert!(e.message.contains("objectiv"), "{e}");

        let dir = scratch("slo");
        let file = dir.join("agg.yml");
        std::fs::write(
            &file,
            format!("{jobs}slo:\n  - {{job: wbe, objective: 99}}\n"),
        )
        .unwrap();
        let (config, problems) = AggregatorConfig::check(&file);
        assert!(config.is_some(), "{problems:#?}");
        assert_eq!(problems.warnings.len(), 1, "{problems:#?}");
        assert!(
            problems.warnings[0]
                .message
                .contains("\"wbe\" is not among jobs")
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn all_in_one_builds() {
        let c = AggregatorConfig::all_in_one(
            "127.0.0.1:9450".parse().unwrap(),
            "127.0.0.1:9451".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(c.jobs.len(), 2);
    }

    #[test]
    fn shards_split_jobs() {
        let names: Vec<String> = (0..100).map(|i| format!("job{i}")).collect();
        let owned = |index| {
            names
                .iter()
                .filter(|n| owns_job(Shard { index, total: 3 }, n))
                .count()
        };
        assert_eq!(owned(0) + owned(1) + owned(2), 100);
        assert!(owned(0) > 10 && owned(1) > 10 && owned(2) > 10);
    }
}
