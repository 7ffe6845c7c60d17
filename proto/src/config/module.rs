//! A probe module, in blackbox_exporter's `modules:` syntax, accepted verbatim so that an
//! existing `blackbox.yml` carries over. Defaults are blackbox_exporter's.

use super::PromDuration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which prober runs a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prober {
    Http,
    Tcp,
    Dns,
}

impl Prober {
    pub fn as_str(self) -> &'static str {
        match self {
            Prober::Http => "http",
            Prober::Tcp => "tcp",
            Prober::Dns => "dns",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Module {
    pub prober: Prober,
    /// Probe deadline; 0 (unset) means the job's timeout.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: PromDuration,
    #[serde(default)]
    pub http: HttpProbe,
    #[serde(default)]
    pub tcp: TcpProbe,
    #[serde(default)]
    pub dns: DnsProbe,
}

fn is_zero(d: &PromDuration) -> bool {
    d.0.is_zero()
}

fn yes() -> bool {
    true
}

/// `ip4` or `ip6`, as blackbox_exporter spells them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpProtocol {
    #[serde(rename = "ip4")]
    Ip4,
    #[default]
    #[serde(rename = "ip6")]
    Ip6,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// Empty means any 2xx.
    #[serde(default)]
    pub valid_status_codes: Vec<u16>,
    /// Empty means any version. Values like `HTTP/1.1`, `HTTP/2.0`.
    #[serde(default)]
    pub valid_http_versions: Vec<String>,
    #[serde(default)]
    pub preferred_ip_protocol: IpProtocol,
    #[serde(default = "yes")]
    pub ip_protocol_fallback: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_follow_redirects: Option<bool>,
    #[serde(default = "yes")]
    pub follow_redirects: bool,
    #[serde(default)]
    pub fail_if_ssl: bool,
    #[serde(default)]
    pub fail_if_not_ssl: bool,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default)]
    pub fail_if_body_matches_regexp: Vec<String>,
    #[serde(default)]
    pub fail_if_body_not_matches_regexp: Vec<String>,
    #[serde(default)]
    pub tls_config: TlsConfig,
}

fn default_method() -> String {
    "GET".to_string()
}

impl Default for HttpProbe {
    fn default() -> Self {
        Self {
            valid_status_codes: Vec::new(),
            valid_http_versions: Vec::new(),
            preferred_ip_protocol: IpProtocol::Ip6,
            ip_protocol_fallback: true,
            no_follow_redirects: None,
            follow_redirects: true,
            fail_if_ssl: false,
            fail_if_not_ssl: false,
            method: default_method(),
            headers: BTreeMap::new(),
            body: None,
            fail_if_body_matches_regexp: Vec::new(),
            fail_if_body_not_matches_regexp: Vec::new(),
            tls_config: TlsConfig::default(),
        }
    }
}

impl HttpProbe {
    /// blackbox_exporter honours the deprecated `no_follow_redirects` over `follow_redirects`.
    pub fn follows_redirects(&self) -> bool {
        match self.no_follow_redirects {
            Some(no) => !no,
            None => self.follow_redirects,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    #[serde(default)]
    pub preferred_ip_protocol: IpProtocol,
    #[serde(default = "yes")]
    pub ip_protocol_fallback: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip_address: Option<String>,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub tls_config: TlsConfig,
}

impl Default for TcpProbe {
    fn default() -> Self {
        Self {
            preferred_ip_protocol: IpProtocol::Ip6,
            ip_protocol_fallback: true,
            source_ip_address: None,
            tls: false,
            tls_config: TlsConfig::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsTransport {
    #[default]
    Udp,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsProbe {
    #[serde(default)]
    pub preferred_ip_protocol: IpProtocol,
    #[serde(default = "yes")]
    pub ip_protocol_fallback: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip_address: Option<String>,
    #[serde(default)]
    pub transport_protocol: DnsTransport,
    #[serde(default)]
    pub query_name: String,
    #[serde(default = "default_query_type")]
    pub query_type: String,
    #[serde(default = "default_query_class")]
    pub query_class: String,
    #[serde(default = "yes")]
    pub recursion_desired: bool,
    /// Empty means NOERROR.
    #[serde(default)]
    pub valid_rcodes: Vec<String>,
}

fn default_query_type() -> String {
    "ANY".to_string()
}

fn default_query_class() -> String {
    "IN".to_string()
}

impl Default for DnsProbe {
    fn default() -> Self {
        Self {
            preferred_ip_protocol: IpProtocol::Ip6,
            ip_protocol_fallback: true,
            source_ip_address: None,
            transport_protocol: DnsTransport::Udp,
            query_name: String::new(),
            query_type: default_query_type(),
            query_class: default_query_class(),
            recursion_desired: true,
            valid_rcodes: Vec::new(),
        }
    }
}

impl Module {
    /// Checks what serde cannot: regexes compile, values are in range, the prober's
    /// required options are present. The message names the option and the fix.
    pub fn validate(&self) -> Result<(), String> {
        match self.prober {
            Prober::Http => {
                for code in &self.http.valid_status_codes {
                    if !(100..=599).contains(code) {
                        return Err(format!(
                            "http.valid_status_codes: {code} is not an HTTP status code (100-599)"
                        ));
                    }
                }
                for re in self
                    .http
                    .fail_if_body_matches_regexp
                    .iter()
                    .chain(&self.http.fail_if_body_not_matches_regexp)
                {
                    regex::Regex::new(re)
                        .map_err(|e| format!("http: invalid regular expression {re:?}: {e}"))?;
                }
                if self.http.method.is_empty()
                    || !self.http.method.bytes().all(|b| b.is_ascii_alphabetic())
                {
                    return Err(format!(
                        "http.method: {:?} is not an HTTP method (GET, HEAD, POST, ...)",
                        self.http.method
                    ));
                }
            }
            Prober::Tcp => {}
            Prober::Dns => {
                if self.dns.query_name.is_empty() {
                    return Err("dns.query_name is required for the dns prober".to_string());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blackbox_defaults() {
        let m: Module = serde_json::from_str(r#"{"prober":"http"}"#).unwrap();
        assert!(m.http.follows_redirects());
        assert!(m.http.ip_protocol_fallback);
        assert_eq!(m.http.preferred_ip_protocol, IpProtocol::Ip6);
        assert_eq!(m.http.method, "GET");
        assert_eq!(m.dns.query_type, "ANY");
    }

    #[test]
    fn json_round_trip() {
        let m: Module = serde_json::from_str(
            r#"{"prober":"dns","timeout":"5s","dns":{"query_name":"example.com","query_type":"A"}}"#,
        )
        .unwrap();
        let again: Module = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(m, again);
        m.validate().unwrap();
    }
}
