//! blackbox_exporter's `websocket` module: the HTTP upgrade handshake (with headers,
//! credentials and TLS for `wss://`), then `query_response` steps over messages: each
//! `expect` reads one message and matches it, each `send` sends a text message.

use super::{Authorization, BasicAuth, IpProtocol, ModuleError, QueryResponse, TlsConfig};
use super::{check_tls, unix::check_query_response, yes};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebsocketProbe {
    /// The handshake's HTTP client settings, in Prometheus's `http_config` form.
    #[serde(default, skip_serializing_if = "WebsocketHttpConfig::is_default")]
    pub http_config: WebsocketHttpConfig,
    /// Headers of the upgrade request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderValues>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_response: Vec<QueryResponse>,
    #[serde(default)]
    pub preferred_ip_protocol: IpProtocol,
    #[serde(default = "yes")]
    pub ip_protocol_fallback: bool,
}

impl Default for WebsocketProbe {
    fn default() -> Self {
        Self {
            http_config: WebsocketHttpConfig::default(),
            headers: BTreeMap::new(),
            query_response: Vec::new(),
            preferred_ip_protocol: IpProtocol::Ip6,
            ip_protocol_fallback: true,
        }
    }
}

/// The part of Prometheus's HTTP client config blackbox_exporter's websocket prober
/// uses: credentials for the handshake and TLS.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebsocketHttpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    #[serde(default)]
    pub tls_config: TlsConfig,
}

impl WebsocketHttpConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A header's values, in any of the forms Prometheus's `headers` takes: one string,
/// a list, or `{values, secrets, files}` (a file's contents, trimmed, read at every
/// probe).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    One(String),
    Many(Vec<String>),
    Sources(HeaderSources),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSources {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

impl HeaderValues {
    /// The values written in the config (values and secrets), without the files.
    pub fn inline(&self) -> Vec<&str> {
        match self {
            HeaderValues::One(v) => vec![v.as_str()],
            HeaderValues::Many(vs) => vs.iter().map(String::as_str).collect(),
            HeaderValues::Sources(s) => s
                .values
                .iter()
                .chain(&s.secrets)
                .map(String::as_str)
                .collect(),
        }
    }

    /// Files whose contents are further values.
    pub fn files(&self) -> &[String] {
        match self {
            HeaderValues::Sources(s) => &s.files,
            _ => &[],
        }
    }
}

impl WebsocketProbe {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub(super) fn validate(&self) -> Result<(), ModuleError> {
        check_tls("websocket", &self.http_config.tls_config)?;
        check_query_response("websocket", &self.query_response)?;
        for (step, qr) in self.query_response.iter().enumerate() {
            let unsupported = if qr.expect_bytes.is_some() {
                Some("expect_bytes")
            } else if qr.starttls {
                Some("starttls")
            } else if !qr.labels.is_empty() {
                Some("labels")
            } else {
                None
            };
            if let Some(field) = unsupported {
                return Err(ModuleError::Option {
                    option: format!("websocket.query_response[{step}].{field}"),
                    problem: "the websocket prober's steps have expect and send only (as blackbox_exporter's); remove it".into(),
                });
            }
        }
        let auth = &self.http_config;
        if auth.basic_auth.is_some() && auth.authorization.is_some() {
            return Err(ModuleError::Option {
                option: "websocket.http_config".into(),
                problem: "set basic_auth or authorization, not both".into(),
            });
        }
        if let Some(b) = &auth.basic_auth
            && b.password.is_some()
            && b.password_file.is_some()
        {
            return Err(ModuleError::Option {
                option: "websocket.http_config.basic_auth".into(),
                problem: "set password or password_file, not both".into(),
            });
        }
        if let Some(a) = &auth.authorization
            && a.credentials.is_some()
            && a.credentials_file.is_some()
        {
            return Err(ModuleError::Option {
                option: "websocket.http_config.authorization".into(),
                problem: "set credentials or credentials_file, not both".into(),
            });
        }
        check_header_map(
            "websocket.headers",
            self.headers.iter().map(|(k, v)| (k, v.clone())),
        )
    }
}

/// Header names are tokens, written values have no line break or NUL byte.
pub(super) fn check_header_map<'a>(
    option: &str,
    headers: impl Iterator<Item = (&'a String, HeaderValues)>,
) -> Result<(), ModuleError> {
    for (name, values) in headers {
        if http_header_name_invalid(name) {
            return Err(ModuleError::Option {
                option: option.into(),
                problem: format!("{name:?} is not a valid header name"),
            });
        }
        if values
            .inline()
            .iter()
            .any(|v| v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0))
        {
            return Err(ModuleError::Option {
                option: format!("{option}.{name}"),
                problem: "a value contains a line break or NUL byte".into(),
            });
        }
    }
    Ok(())
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
