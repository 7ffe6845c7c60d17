//! The agent's configuration file (`sonde-agent.yml`), its defaults and its checks.

use serde::Deserialize;
use sonde_proto::config::{
    ByteSize, ConfigError, JobConfig, JobDefaults, Labels, Located, Module, Problems, PromDuration,
    ResolvedJob, check_yaml_file, resolve_jobs_all, resolve_modules, validate_labels,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub agent: Option<Located<AgentSection>>,
    /// One stream to each. May be empty: the agent then serves its local jobs alone.
    #[serde(default)]
    pub aggregators: Vec<Located<AggregatorEndpoint>>,
    #[serde(default)]
    pub buffer: BufferConfig,
    /// An existing blackbox.yml whose `modules:` are merged in (as the aggregator's).
    pub modules_file: Option<Located<PathBuf>>,
    #[serde(default)]
    pub modules: BTreeMap<String, Located<Module>>,
    #[serde(default)]
    pub jobs: Vec<Located<JobConfig>>,
    pub probe_endpoint: Option<Located<ProbeEndpointConfig>>,
    pub assigned_modules: Option<Located<AssignedModulesConfig>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Defaults to the host name.
    pub id: Option<String>,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorEndpoint {
    /// `http://host:port`, or `https://` for TLS.
    pub address: String,
    pub token_file: Option<PathBuf>,
    pub tls_config: Option<ClientTlsConfig>,
    /// Send `token_file`'s token over plain `http://` to an aggregator that is not on
    /// loopback. Off by default: the agent then refuses such an entry at load time, as
    /// anyone on the path could read the token and join the fleet as this agent.
    #[serde(default)]
    pub allow_plaintext_token: bool,
}

impl AggregatorEndpoint {
    /// An entry for `address` with no token and no TLS settings.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            token_file: None,
            tls_config: None,
            allow_plaintext_token: false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Store-and-forward limit; past it the oldest results are dropped and counted.
    #[serde(default = "default_buffer")]
    pub max_bytes: ByteSize,
}

fn default_buffer() -> ByteSize {
    ByteSize(256 << 20)
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_buffer(),
        }
    }
}

/// blackbox_exporter-compatible `/probe`, off by default and never an open proxy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeEndpointConfig {
    #[serde(default)]
    pub enabled: bool,
    /// `host:port` glob patterns (`*.internal:443`, `127.0.0.1:*`) a target must match.
    #[serde(default)]
    pub allowed_targets: Vec<String>,
    /// Absent: every configured module.
    pub allowed_modules: Option<Vec<String>>,
    /// Probes `/probe` runs at once; past it a request is answered 503 at once.
    /// Default 64.
    #[serde(default = "default_max_concurrent_probes")]
    pub max_concurrent_probes: usize,
    /// The longest probe a scraper can ask for with `X-Prometheus-Scrape-Timeout-Seconds`
    /// (and what a request without that header gets, when the module sets no timeout).
    /// Default 60s.
    #[serde(default = "default_max_timeout")]
    pub max_timeout: PromDuration,
}

fn default_max_concurrent_probes() -> usize {
    64
}

fn default_max_timeout() -> PromDuration {
    PromDuration::from_secs(60)
}

impl Default for ProbeEndpointConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            allowed_targets: Vec::new(),
            allowed_modules: None,
            max_concurrent_probes: default_max_concurrent_probes(),
            max_timeout: default_max_timeout(),
        }
    }
}

/// What the agent accepts in the modules its aggregators assign (DESIGN, "Trust model"):
/// modules from the agent's own config are trusted, assigned ones are not.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignedModulesConfig {
    /// Globs over absolute paths (`/etc/sonde/certs/*`; `*` stays within one directory,
    /// `**` crosses directories) under which an assigned module may name a file
    /// (`body_file`, `ca_file`, `bearer_token_file`, ...). Absent or empty: no assigned
    /// module may name a file.
    #[serde(default)]
    pub allowed_file_paths: Option<Vec<String>>,
    /// Where assigned checks may connect.
    #[serde(default)]
    pub connect: ConnectConfig,
}

/// `assigned_modules.connect`: the connect policy of assigned checks, checked on the
/// address each probe is about to connect to (every redirect hop, each name's answer).
/// Link-local and cloud metadata addresses are refused unless `allow` names them
/// ([`crate::probe::policy`]).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectConfig {
    /// CIDR networks (or addresses) a probe may connect to. Absent: any address that
    /// `deny` and the metadata rule do not refuse.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// CIDR networks (or addresses) refused, even inside `allow`.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The agent's configuration, checked and with its defaults filled in.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub id: String,
    pub labels: Labels,
    pub aggregators: Vec<AggregatorEndpoint>,
    pub buffer: BufferConfig,
    pub modules: BTreeMap<String, Module>,
    pub jobs: Vec<ResolvedJob>,
    pub probe_endpoint: ProbeEndpointConfig,
    pub assigned_modules: AssignedModulesConfig,
}

impl AgentConfig {
    /// Loads and checks `file`; the first problem, if any, says how many more there are
    /// ([`AgentConfig::check`] has them all).
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
        check_yaml_file(file, |raw: AgentFile, problems| {
            Self::check_file(file, raw, problems)
        })
    }

    /// An agent with no aggregators, no jobs and default settings, with the given id.
    pub fn minimal(id: String) -> Self {
        Self {
            id,
            labels: Labels::new(),
            aggregators: Vec::new(),
            buffer: BufferConfig::default(),
            modules: BTreeMap::new(),
            jobs: Vec::new(),
            probe_endpoint: ProbeEndpointConfig::default(),
            assigned_modules: AssignedModulesConfig::default(),
        }
    }

    /// Checks what `file` says (already parsed); the first problem, if any.
    pub fn from_file(file: &Path, raw: AgentFile) -> Result<Self, ConfigError> {
        let mut problems = Problems::default();
        let config = Self::check_file(file, raw, &mut problems);
        match problems.first_error() {
            Some(e) => Err(e),
            None => Ok(config),
        }
    }

    /// Checks what `file` says, adding every problem to `problems`; what it returns is
    /// meaningful only when no error was added.
    pub fn check_file(file: &Path, raw: AgentFile, problems: &mut Problems) -> Self {
        let whole = |msg: String| ConfigError::whole_file(file, msg);
        let (agent, agent_at) = match raw.agent {
            Some(l) => (l.value, Some(l.referenced)),
            None => (AgentSection::default(), None),
        };
        let at_or_whole = |place: Option<sonde_proto::config::Location>, msg: String| match place {
            Some(place) => ConfigError::at(file, place, msg),
            None => whole(msg),
        };
        let id = match agent.id {
            Some(id) if id.trim().is_empty() => {
                problems.error(at_or_whole(
                    agent_at,
                    "agent.id must not be empty; remove it to use the host name".into(),
                ));
                id
            }
            Some(id) => id,
            None => host_name(),
        };
        if let Err(e) = validate_labels(&agent.labels, "agent.labels") {
            problems.error(at_or_whole(agent_at, e.to_string()));
        }
        let modules = resolve_modules(file, raw.modules_file.as_ref(), &raw.modules, problems);
        let base = file.parent().unwrap_or(Path::new("."));
        let mut aggregators = Vec::new();
        for located in raw.aggregators {
            let before = problems.errors.len();
            let mut report = |msg: String| {
                problems
                    .errors
                    .push(ConfigError::at(file, located.referenced, msg))
            };
            let mut endpoint = located.value;
            if !(endpoint.address.starts_with("http://")
                || endpoint.address.starts_with("https://"))
            {
                report(format!(
                    "aggregator address {:?} must start with http:// (or https:// for TLS), like http://127.0.0.1:9451",
                    endpoint.address
                ));
            }
            if let Some(path) = &mut endpoint.token_file {
                *path = base.join(&*path);
                if let Err(e) = check_readable(path) {
                    report(e.to_string());
                }
            }
            if let Some(tls) = &mut endpoint.tls_config {
                for path in [&mut tls.ca_file, &mut tls.cert_file, &mut tls.key_file]
                    .into_iter()
                    .flatten()
                {
                    *path = base.join(&*path);
                    if let Err(e) = check_readable(path) {
                        report(e.to_string());
                    }
                }
                if tls.cert_file.is_some() != tls.key_file.is_some() {
                    report("tls_config needs both cert_file and key_file, or neither".into());
                }
            }
            if endpoint.token_file.is_some()
                && !endpoint.allow_plaintext_token
                && let Some(host) = plaintext_remote_host(&endpoint.address)
            {
                report(format!(
                    "aggregator {:?} would receive token_file's token in clear text: {host} is not a loopback address and the address is http://. Use https:// with tls_config (ca_file naming the aggregator's CA) for this aggregator, or set allow_plaintext_token: true on this entry if the network to it is trusted",
                    endpoint.address
                ));
            }
            if problems.errors.len() == before {
                aggregators.push(endpoint);
            }
        }
        for located in &raw.jobs {
            let job = &located.value;
            if !job.file_sd_configs.is_empty()
                || !job.agents.is_empty()
                || !job.relabel_configs.is_empty()
                || job.params.contains_key("target")
            {
                problems.error(ConfigError::at(
                    file,
                    located.referenced,
                    format!(
                        "local job {:?}: an agent's local jobs take static_configs only (file_sd_configs, agents, relabel_configs and params.target belong in the aggregator's jobs)",
                        job.job_name
                    ),
                ));
            }
        }
        let jobs = resolve_jobs_all(file, &modules, &raw.jobs, JobDefaults::default(), problems);
        let (probe_endpoint, probe_at) = match raw.probe_endpoint {
            Some(l) => (l.value, Some(l.referenced)),
            None => (ProbeEndpointConfig::default(), None),
        };
        let mut probe_error = |msg: String| problems.errors.push(at_or_whole(probe_at, msg));
        if let Some(allowed) = &probe_endpoint.allowed_modules {
            for m in allowed {
                if !modules.contains_key(m) {
                    probe_error(format!(
                        "probe_endpoint.allowed_modules: module {m:?} is not defined in modules"
                    ));
                }
            }
        }
        if probe_endpoint.max_concurrent_probes == 0 {
            probe_error(
                "probe_endpoint.max_concurrent_probes must be at least 1 (default 64)".into(),
            );
        }
        if probe_endpoint.max_timeout.0 < Duration::from_millis(100) {
            probe_error("probe_endpoint.max_timeout must be at least 100ms (default 60s)".into());
        }
        if let Err(e) =
            crate::probe::policy::ConnectRules::probe_endpoint(&probe_endpoint.allowed_targets)
        {
            probe_error(format!("probe_endpoint.allowed_targets: {e}"));
        }
        if probe_endpoint.enabled && probe_endpoint.allowed_targets.is_empty() {
            probe_error(
                "probe_endpoint is enabled but allowed_targets is empty: list the host:port patterns /probe may reach (it is never an open proxy)".into(),
            );
        }
        let (assigned_modules, assigned_at) = match raw.assigned_modules {
            Some(l) => (l.value, Some(l.referenced)),
            None => (AssignedModulesConfig::default(), None),
        };
        if let Err(e) = crate::assigned::FilePolicy::new(&assigned_modules) {
            problems.error(at_or_whole(
                assigned_at,
                format!("assigned_modules.allowed_file_paths: {e}"),
            ));
        }
        if let Err(e) = crate::probe::policy::ConnectRules::assigned(&assigned_modules.connect) {
            problems.error(at_or_whole(
                assigned_at,
                format!("assigned_modules.connect: {e}"),
            ));
        }
        Self {
            id,
            labels: agent.labels,
            aggregators,
            buffer: raw.buffer,
            modules,
            jobs,
            probe_endpoint,
            assigned_modules,
        }
    }
}

/// The host of an `http://` aggregator address that is not loopback (127.0.0.0/8, ::1,
/// `localhost`): where a token would travel in clear text over a network. `None` for
/// `https://` and for loopback.
fn plaintext_remote_host(address: &str) -> Option<String> {
    let url = url::Url::parse(address).ok()?;
    if url.scheme() != "http" {
        return None;
    }
    let loopback = match url.host()? {
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.');
            name.eq_ignore_ascii_case("localhost")
        }
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    (!loopback).then(|| url.host_str().unwrap_or_default().to_string())
}

/// A file the config names that is not there to read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}", path.display())]
struct Unreadable {
    path: PathBuf,
    source: std::io::Error,
}

fn check_readable(path: &Path) -> Result<(), Unreadable> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|source| Unreadable {
            path: path.to_path_buf(),
            source,
        })
}

/// The host name, as the default agent id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "sonde-agent".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_proto::config::from_yaml_str;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let file = Path::new("agent.yml");
        AgentConfig::from_file(file, from_yaml_str(file, text)?)
    }

    #[test]
    fn full_example() {
        let c = parse(
            "agent:\n  id: edge-1\n  labels: {region: eu}\naggregators:\n  - address: http://127.0.0.1:9451\nbuffer:\n  max_bytes: 64MiB\nmodules:\n  tcp_connect: {prober: tcp}\njobs:\n  - job_name: local\n    module: tcp_connect\n    static_configs: [{targets: ['127.0.0.1:22']}]\n",
        )
        .unwrap();
        assert_eq!(c.id, "edge-1");
        assert_eq!(c.labels["region"], "eu");
        assert_eq!(c.buffer.max_bytes.0, 64 << 20);
        assert_eq!(c.jobs.len(), 1);
    }

    #[test]
    fn empty_file_is_a_valid_agent() {
        let c = parse("{}").unwrap();
        assert!(!c.id.is_empty());
        assert!(c.aggregators.is_empty());
    }

    #[test]
    fn bad_allowlist_pattern_is_a_config_error() {
        let e = parse("probe_endpoint:\n  enabled: true\n  allowed_targets: ['10.0.0.0/33:*']\n")
            .unwrap_err();
        assert!(e.message.contains("allowed_targets"), "{e}");
    }

    #[test]
    fn modules_file_is_taken_like_the_aggregator() {
        let dir = std::env::temp_dir().join(format!("sonde-agent-mf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("blackbox.yml"),
            "modules:\n  tcp_connect: {prober: tcp}\n",
        )
        .unwrap();
        let file = dir.join("agent.yml");
        std::fs::write(
            &file,
            "modules_file: blackbox.yml\njobs:\n  - job_name: local\n    module: tcp_connect\n    static_configs: [{targets: ['127.0.0.1:22']}]\n",
        )
        .unwrap();
        let c = AgentConfig::load(&file).unwrap();
        assert!(c.modules.contains_key("tcp_connect"));
        assert_eq!(c.jobs.len(), 1);
        std::fs::write(
            &file,
            "modules_file: missing.yml\nmodules:\n  m:\n    prober: http\n    http: {fail_if_body_matches_regexp: ['(']}\nprobe_endpoint:\n  enabled: true\n  allowed_targets: ['10.0.0.0/33:*']\nagent:\n  labels: {__x: y}\n",
        )
        .unwrap();
        let (config, problems) = AgentConfig::check(&file);
        assert!(config.is_none());
        let lines: Vec<u64> = problems.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [10, 1, 4, 7], "{problems:#?}");
        assert!(
            problems.errors[1].message.contains("missing.yml"),
            "{problems:#?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn mistakes_are_located() {
        let e = parse("agent:\n  idd: x\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 3), "{e}");
        let e = parse("aggregators:\n  - address: 127.0.0.1:9451\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("http://"), "{e}");
        let e = parse("aggregators:\n  - address: http://x\n    token_file: /nonexistent/t\n")
            .unwrap_err();
        assert!(e.message.contains("/nonexistent/t"), "{e}");
    }

    fn token_file() -> PathBuf {
        let path = std::env::temp_dir().join(format!("sonde-config-token-{}", std::process::id()));
        std::fs::write(&path, "secret\n").unwrap();
        path
    }

    #[test]
    fn a_token_is_never_sent_in_clear_text_off_loopback_unless_allowed() {
        let token = token_file();
        let entry = |address: &str, extra: &str| {
            parse(&format!(
                "aggregators:\n  - address: {address}\n    token_file: {}\n{extra}",
                token.display()
            ))
        };
        for address in [
            "http://aggregator.example:9451",
            "http://10.0.0.1:9451",
            "http://[2001:db8::1]:9451",
            "http://0.0.0.0:9451",
            "http://localhost.example:9451",
        ] {
            let e = entry(address, "").unwrap_err();
            assert_eq!(e.line, 2, "{address}: {e}");
            assert!(e.message.contains("clear text"), "{e}");
            assert!(e.message.contains("https://"), "{e}");
            assert!(e.message.contains("allow_plaintext_token: true"), "{e}");
            let ok = entry(address, "    allow_plaintext_token: true\n").unwrap();
            assert!(ok.aggregators[0].allow_plaintext_token);
        }
        for address in [
            "http://127.0.0.1:9451",
            "http://127.9.8.7:9451",
            "http://[::1]:9451",
            "http://localhost:9451",
            "http://LOCALHOST.:9451",
            "https://aggregator.example:9451",
        ] {
            assert!(entry(address, "").is_ok(), "{address}");
        }
        // Without a token there is nothing to protect.
        assert!(parse("aggregators:\n  - address: http://aggregator.example:9451\n").is_ok());
        std::fs::remove_file(token).unwrap();
    }

    #[test]
    fn probe_endpoint_limits_have_defaults_and_are_checked() {
        let c = parse("{}").unwrap();
        assert_eq!(c.probe_endpoint.max_concurrent_probes, 64);
        assert_eq!(c.probe_endpoint.max_timeout.0, Duration::from_secs(60));
        let c = parse("probe_endpoint:\n  max_concurrent_probes: 3\n  max_timeout: 5s\n").unwrap();
        assert_eq!(c.probe_endpoint.max_concurrent_probes, 3);
        assert_eq!(c.probe_endpoint.max_timeout.0, Duration::from_secs(5));
        let e = parse("probe_endpoint:\n  max_concurrent_probes: 0\n").unwrap_err();
        assert!(e.message.contains("max_concurrent_probes"), "{e}");
        let e = parse("probe_endpoint:\n  max_timeout: 0s\n").unwrap_err();
        assert!(e.message.contains("max_timeout"), "{e}");
    }

    #[test]
    fn assigned_modules_allowed_file_paths() {
        let c = parse("assigned_modules:\n  allowed_file_paths: ['/etc/sonde/certs/*']\n").unwrap();
        assert_eq!(
            c.assigned_modules.allowed_file_paths,
            Some(vec!["/etc/sonde/certs/*".to_string()])
        );
        assert_eq!(
            parse("{}").unwrap().assigned_modules.allowed_file_paths,
            None
        );
        let e = parse("assigned_modules:\n  allowed_file_paths: ['certs/*']\n").unwrap_err();
        assert!(e.message.contains("absolute"), "{e}");
        let e = parse("assigned_modules:\n  allowed_files: []\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let c =
            parse("assigned_modules:\n  connect: {deny: [127.0.0.77/32], allow: ['0.0.0.0/0']}\n")
                .unwrap();
        assert_eq!(c.assigned_modules.connect.deny, ["127.0.0.77/32"]);
        let bad = parse("assigned_modules:\n  connect: {deny: [127.0.0.0/33]}\n").unwrap_err();
        assert!(
            bad.to_string().contains(
                "assigned_modules.connect: network \"127.0.0.0/33\": bad CIDR prefix length"
            ),
            "{bad}"
        );
    }
}
