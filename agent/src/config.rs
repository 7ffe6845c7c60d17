//! The agent's configuration file (`sonde-agent.yml`), its defaults and its checks.

use serde::Deserialize;
use sonde_proto::config::{
    ByteSize, ConfigError, JobConfig, JobDefaults, Labels, Located, Module, ResolvedJob,
    load_yaml_file, resolve_jobs, validate_labels,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    #[serde(default)]
    pub agent: AgentSection,
    /// One stream to each. May be empty: the agent then serves its local jobs alone.
    #[serde(default)]
    pub aggregators: Vec<Located<AggregatorEndpoint>>,
    #[serde(default)]
    pub buffer: BufferConfig,
    #[serde(default)]
    pub modules: BTreeMap<String, Module>,
    #[serde(default)]
    pub jobs: Vec<Located<JobConfig>>,
    #[serde(default)]
    pub probe_endpoint: ProbeEndpointConfig,
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
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeEndpointConfig {
    #[serde(default)]
    pub enabled: bool,
    /// `host:port` glob patterns (`*.internal:443`, `127.0.0.1:*`) a target must match.
    #[serde(default)]
    pub allowed_targets: Vec<String>,
    /// Absent: every configured module.
    pub allowed_modules: Option<Vec<String>>,
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
}

impl AgentConfig {
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let raw: AgentFile = load_yaml_file(file)?;
        Self::from_file(file, raw)
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
        }
    }

    pub fn from_file(file: &Path, raw: AgentFile) -> Result<Self, ConfigError> {
        let whole = |msg: String| ConfigError::whole_file(file, msg);
        let id = match raw.agent.id {
            Some(id) if id.trim().is_empty() => {
                return Err(whole(
                    "agent.id must not be empty; remove it to use the host name".into(),
                ));
            }
            Some(id) => id,
            None => host_name(),
        };
        validate_labels(&raw.agent.labels, "agent.labels").map_err(whole)?;
        for (name, module) in &raw.modules {
            module
                .validate()
                .map_err(|m| whole(format!("modules.{name}: {m}")))?;
        }
        let base = file.parent().unwrap_or(Path::new("."));
        let mut aggregators = Vec::new();
        for located in raw.aggregators {
            let at = |msg: String| ConfigError::at(file, located.referenced, msg);
            let mut endpoint = located.value;
            if !(endpoint.address.starts_with("http://")
                || endpoint.address.starts_with("https://"))
            {
                return Err(at(format!(
                    "aggregator address {:?} must start with http:// (or https:// for TLS), like http://127.0.0.1:9451",
                    endpoint.address
                )));
            }
            if let Some(path) = &mut endpoint.token_file {
                *path = base.join(&*path);
                check_readable(path).map_err(&at)?;
            }
            if let Some(tls) = &mut endpoint.tls_config {
                for path in [&mut tls.ca_file, &mut tls.cert_file, &mut tls.key_file]
                    .into_iter()
                    .flatten()
                {
                    *path = base.join(&*path);
                    check_readable(path).map_err(&at)?;
                }
                if tls.cert_file.is_some() != tls.key_file.is_some() {
                    return Err(at(
                        "tls_config needs both cert_file and key_file, or neither".into(),
                    ));
                }
            }
            aggregators.push(endpoint);
        }
        let jobs = resolve_jobs(file, &raw.modules, &raw.jobs, JobDefaults::default())?;
        for job in &jobs {
            if !job.config.file_sd_configs.is_empty() || !job.config.agents.is_empty() {
                return Err(whole(format!(
                    "local job {:?}: an agent's local jobs take static_configs only (file_sd_configs and agents belong in the aggregator's jobs)",
                    job.name
                )));
            }
        }
        if let Some(allowed) = &raw.probe_endpoint.allowed_modules {
            for m in allowed {
                if !raw.modules.contains_key(m) {
                    return Err(whole(format!(
                        "probe_endpoint.allowed_modules: module {m:?} is not defined in modules"
                    )));
                }
            }
        }
        crate::web::Allowlist::parse(&raw.probe_endpoint.allowed_targets)
            .map_err(|e| whole(format!("probe_endpoint.allowed_targets: {e}")))?;
        if raw.probe_endpoint.enabled && raw.probe_endpoint.allowed_targets.is_empty() {
            return Err(whole(
                "probe_endpoint is enabled but allowed_targets is empty: list the host:port patterns /probe may reach (it is never an open proxy)".into(),
            ));
        }
        Ok(Self {
            id,
            labels: raw.agent.labels,
            aggregators,
            buffer: raw.buffer,
            modules: raw.modules,
            jobs,
            probe_endpoint: raw.probe_endpoint,
        })
    }
}

fn check_readable(path: &Path) -> Result<(), String> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
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
}
