//! Discovery mechanisms beyond files: `http_sd_configs` and `dns_sd_configs`, with
//! Prometheus's fields and defaults. The aggregator runs them (`targets` module there);
//! what it cannot honour is refused here, by [`check_http_sd`] and [`check_dns_sd`], with
//! the field named, never silently ignored.

pub mod kubernetes;

use super::PromDuration;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::path::PathBuf;

/// A credential written inline in the config: never shown by `Debug` or when serialized.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SdSecret(pub String);

impl fmt::Debug for SdSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl Serialize for SdSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<secret>")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdBasicAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<SdSecret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdAuthorization {
    /// The scheme of the `Authorization` header; `Bearer` when absent.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<SdSecret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdTlsConfig {
    /// CA certificates (PEM) that replace the built-in web PKI roots, as in Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// One `http_sd_configs` entry: a URL answering a JSON list of target groups.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSdConfig {
    pub url: String,
    #[serde(default = "default_http_refresh")]
    pub refresh_interval: PromDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<SdBasicAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<SdAuthorization>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_config: Option<SdTlsConfig>,
    /// Prometheus's default; `false` is refused (redirects are followed, up to 10).
    #[serde(default = "yes")]
    pub follow_redirects: bool,
    /// Prometheus's HTTP client options that sonde's client does not have: accepted by
    /// the parser so that [`check_http_sd`] can name them, never acted on.
    #[serde(default, skip_serializing)]
    pub proxy_url: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    pub no_proxy: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    pub proxy_from_environment: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    pub proxy_connect_header: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    pub oauth2: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    pub bearer_token: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    pub bearer_token_file: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    pub http_headers: Option<IgnoredAny>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_http2: Option<bool>,
}

impl HttpSdConfig {
    /// Makes the entry's file paths relative to `base` (the config file's directory),
    /// as Prometheus does.
    pub fn relative_to(&mut self, base: &std::path::Path) {
        let mut files: Vec<&mut PathBuf> = Vec::new();
        if let Some(b) = &mut self.basic_auth {
            files.extend(b.username_file.as_mut());
            files.extend(b.password_file.as_mut());
        }
        if let Some(a) = &mut self.authorization {
            files.extend(a.credentials_file.as_mut());
        }
        if let Some(t) = &mut self.tls_config {
            files.extend(t.ca_file.as_mut());
            files.extend(t.cert_file.as_mut());
            files.extend(t.key_file.as_mut());
        }
        for f in files {
            *f = base.join(&*f);
        }
    }
}

fn default_http_refresh() -> PromDuration {
    PromDuration::from_secs(60)
}

fn yes() -> bool {
    true
}

/// The record type a `dns_sd_configs` entry asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DnsSdType {
    #[default]
    Srv,
    A,
    Aaaa,
    Mx,
    Ns,
}

impl fmt::Display for DnsSdType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DnsSdType::Srv => "SRV",
            DnsSdType::A => "A",
            DnsSdType::Aaaa => "AAAA",
            DnsSdType::Mx => "MX",
            DnsSdType::Ns => "NS",
        })
    }
}

/// One `dns_sd_configs` entry: names looked up every `refresh_interval`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSdConfig {
    pub names: Vec<String>,
    #[serde(default, rename = "type")]
    pub kind: DnsSdType,
    /// The port of every target; required for A, AAAA, MX and NS (SRV records carry one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_dns_refresh")]
    pub refresh_interval: PromDuration,
    /// sonde's extension: the DNS servers to ask (`ip` or `ip:port`, port 53 when left
    /// out), instead of the system's (`/etc/resolv.conf`, as Prometheus reads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

fn default_dns_refresh() -> PromDuration {
    PromDuration::from_secs(30)
}

/// What is wrong with an `http_sd_configs` entry, each message naming its field.
pub fn check_http_sd(sd: &HttpSdConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let url = sd.url.as_str();
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if !scheme_ok {
        problems.push(format!(
            "http_sd_configs: url {url:?} must start with http:// or https://"
        ));
    }
    if sd.refresh_interval.0.is_zero() {
        problems.push("http_sd_configs: refresh_interval must be greater than 0".into());
    }
    if sd.basic_auth.is_some() && sd.authorization.is_some() {
        problems
            .push("http_sd_configs: basic_auth and authorization are both set; keep one".into());
    }
    if let Some(b) = &sd.basic_auth {
        if b.username.is_some() && b.username_file.is_some() {
            problems.push(
                "http_sd_configs: basic_auth: username and username_file are both set; keep one"
                    .into(),
            );
        }
        if b.password.is_some() && b.password_file.is_some() {
            problems.push(
                "http_sd_configs: basic_auth: password and password_file are both set; keep one"
                    .into(),
            );
        }
    }
    if let Some(a) = &sd.authorization {
        if a.credentials.is_some() && a.credentials_file.is_some() {
            problems.push("http_sd_configs: authorization: credentials and credentials_file are both set; keep one".into());
        }
        if a.kind
            .as_deref()
            .is_some_and(|k| k.eq_ignore_ascii_case("basic"))
        {
            problems.push(
                "http_sd_configs: authorization: type Basic is not allowed; use basic_auth".into(),
            );
        }
    }
    if sd.tls_config.is_some() && url.starts_with("http://") {
        problems.push(format!(
            "http_sd_configs: tls_config is set but url {url:?} is plain http; use https:// or remove tls_config"
        ));
    }
    if !sd.follow_redirects {
        problems.push("http_sd_configs: follow_redirects: false is not supported by sonde (redirects are always followed); remove it".into());
    }
    let unsupported = [
        ("proxy_url", sd.proxy_url.is_some()),
        ("no_proxy", sd.no_proxy.is_some()),
        (
            "proxy_from_environment",
            sd.proxy_from_environment.is_some(),
        ),
        ("proxy_connect_header", sd.proxy_connect_header.is_some()),
        ("oauth2", sd.oauth2.is_some()),
        ("bearer_token", sd.bearer_token.is_some()),
        ("bearer_token_file", sd.bearer_token_file.is_some()),
        ("http_headers", sd.http_headers.is_some()),
    ];
    for (field, set) in unsupported {
        if set {
            let hint = match field {
                "bearer_token" | "bearer_token_file" => {
                    "use authorization: {credentials: ...} or {credentials_file: ...}"
                }
                _ => "remove it (sonde connects directly)",
            };
            problems.push(format!(
                "http_sd_configs: {field} is not supported by sonde; {hint}"
            ));
        }
    }
    problems
}

/// What is wrong with a `dns_sd_configs` entry, each message naming its field.
pub fn check_dns_sd(sd: &DnsSdConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if sd.names.is_empty() {
        problems.push("dns_sd_configs: names needs at least one name".into());
    }
    for name in &sd.names {
        if name.is_empty() || name.contains(char::is_whitespace) {
            problems.push(format!("dns_sd_configs: names: {name:?} is not a DNS name"));
        }
    }
    if sd.kind != DnsSdType::Srv && sd.port.is_none() {
        problems.push(format!(
            "dns_sd_configs: port is required for type {} (only SRV records carry a port)",
            sd.kind
        ));
    }
    if sd.refresh_interval.0.is_zero() {
        problems.push("dns_sd_configs: refresh_interval must be greater than 0".into());
    }
    for server in &sd.nameservers {
        if parse_nameserver(server).is_none() {
            problems.push(format!(
                "dns_sd_configs: nameservers: {server:?} is not an IP address or ip:port"
            ));
        }
    }
    problems
}

/// A `nameservers` entry: `ip`, `ip:port` or `[ipv6]:port`; port 53 when left out.
pub fn parse_nameserver(s: &str) -> Option<std::net::SocketAddr> {
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return Some(addr);
    }
    s.parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| std::net::SocketAddr::new(ip, 53))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(yaml: &str) -> HttpSdConfig {
        crate::config::from_yaml_str(std::path::Path::new("t.yml"), yaml).unwrap()
    }

    fn dns(yaml: &str) -> DnsSdConfig {
        crate::config::from_yaml_str(std::path::Path::new("t.yml"), yaml).unwrap()
    }

    #[test]
    fn http_sd_defaults_and_refusals() {
        let sd = http("url: http://127.0.0.1:1/sd");
        assert_eq!(sd.refresh_interval, PromDuration::from_secs(60));
        assert!(check_http_sd(&sd).is_empty());
        let sd = http("url: http://x/sd\nproxy_url: http://proxy:3128\nfollow_redirects: false");
        let problems = check_http_sd(&sd);
        assert!(
            problems.iter().any(|p| p.contains("proxy_url")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("follow_redirects")),
            "{problems:?}"
        );
        assert!(!check_http_sd(&http("url: ftp://x/")).is_empty());
        let secret = http("url: https://x/\nbasic_auth: {username: u, password: hunter2}");
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn a_refused_field_names_its_job() {
        use crate::config::{JobConfig, JobDefaults, Located, Module, resolve_jobs};
        use std::collections::BTreeMap;
        #[derive(serde::Deserialize)]
        struct Doc {
            modules: BTreeMap<String, Module>,
            jobs: Vec<Located<JobConfig>>,
        }
        let text = "modules: {m: {prober: tcp}}\njobs:\n  - job_name: cmdb\n    module: m\n    http_sd_configs: [{url: 'http://127.0.0.1:1/sd', proxy_url: 'http://proxy:3128'}]\n";
        let path = std::path::Path::new("x.yml");
        let doc: Doc = crate::config::from_yaml_str(path, text).unwrap();
        let err = resolve_jobs(path, &doc.modules, &doc.jobs, JobDefaults::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("job \"cmdb\": http_sd_configs: proxy_url is not supported"),
            "{err}"
        );
    }

    #[test]
    fn dns_sd_defaults_and_refusals() {
        let sd = dns("names: [_web._tcp.example.org]");
        assert_eq!(sd.kind, DnsSdType::Srv);
        assert_eq!(sd.refresh_interval, PromDuration::from_secs(30));
        assert!(check_dns_sd(&sd).is_empty());
        let sd = dns("names: [web.example.org]\ntype: A");
        assert!(check_dns_sd(&sd)[0].contains("port is required"));
        let sd = dns(
            "names: [web.example.org]\ntype: AAAA\nport: 80\nnameservers: ['127.0.0.1:5353', '::1', nope]",
        );
        let problems = check_dns_sd(&sd);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("\"nope\""));
    }
}
