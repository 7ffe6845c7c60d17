//! One `remote_write` entry of the aggregator's config: Prometheus's block, the parts that
//! apply to sonde's sender (no `write_relabel_configs`; remote write 1.0 and 2.0).
//! Defaults and checks live here, next to the options, so `check-config` and the running
//! sender agree on what a config means.

use super::endpoint::Endpoint;
pub use super::setting::SettingError;
pub(crate) use super::setting::invalid;
pub use super::tls::TlsConfig;
use super::tls::tls_client_config;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sonde_proto::config::{ByteSize, PromDuration};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Headers that the sender sets itself. Prometheus refuses to let `headers` override them
/// because a wrong value breaks the protocol (encoding, version) or silently replaces
/// the configured authentication.
pub const RESERVED_HEADERS: [&str; 6] = [
    "Authorization",
    "Content-Encoding",
    "Content-Type",
    "User-Agent",
    "X-Prometheus-Remote-Write-Version",
    "Host",
];

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteConfig {
    pub url: String,
    /// Names the endpoint in logs, self-metrics and the status page. Absent: a short hash
    /// of the rest of the config, as Prometheus does (see [`RemoteWriteConfig::name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default = "default_remote_timeout")]
    pub remote_timeout: PromDuration,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_config: Option<TlsConfig>,
    #[serde(default)]
    pub protobuf_message: ProtobufMessage,
    #[serde(default)]
    pub queue_config: QueueConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// The scheme of the `Authorization` header; `Bearer` when absent.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    #[serde(default = "default_max_samples_per_send")]
    pub max_samples_per_send: usize,
    #[serde(default = "default_batch_send_deadline")]
    pub batch_send_deadline: PromDuration,
    #[serde(default = "default_min_backoff")]
    pub min_backoff: PromDuration,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: PromDuration,
    /// Bound of the durable queue, counted as the samples' uncompressed size with their
    /// labels. Past it the oldest samples are dropped (and counted), so a dead receiver
    /// costs bounded disk.
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: ByteSize,
    /// Requests in flight at once. A series always goes through the same shard, so its
    /// samples stay in order. Fixed (Prometheus resizes between min_shards and max_shards;
    /// sonde's load is small enough for a fixed number).
    // Not serialized at their defaults, so that the generated endpoint name (a hash of the
    // serialized config) stays what it was before these options existed.
    #[serde(
        default = "default_max_shards",
        skip_serializing_if = "is_default_max_shards"
    )]
    pub max_shards: usize,
    /// Samples older than this when their turn to be sent comes are dropped and counted
    /// (reason `too_old`) instead of sent; 0 (the default) sends everything. As in
    /// Prometheus: set it to about 1h for a Prometheus receiver, which refuses a whole
    /// request (HTTP 400 "out of bounds") when one sample in it is older than its head block.
    #[serde(
        default = "default_sample_age_limit",
        skip_serializing_if = "is_zero_duration"
    )]
    pub sample_age_limit: PromDuration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_samples_per_send: default_max_samples_per_send(),
            batch_send_deadline: default_batch_send_deadline(),
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
            max_queue_bytes: default_max_queue_bytes(),
            max_shards: default_max_shards(),
            sample_age_limit: default_sample_age_limit(),
        }
    }
}

fn default_remote_timeout() -> PromDuration {
    PromDuration::from_secs(30)
}
fn default_max_samples_per_send() -> usize {
    2000
}
fn default_batch_send_deadline() -> PromDuration {
    PromDuration::from_secs(5)
}
fn default_min_backoff() -> PromDuration {
    PromDuration::from_millis(30)
}
fn default_max_backoff() -> PromDuration {
    PromDuration::from_secs(5)
}
fn default_max_queue_bytes() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_max_shards() -> usize {
    4
}
fn default_sample_age_limit() -> PromDuration {
    PromDuration::from_secs(0)
}
fn is_default_max_shards(n: &usize) -> bool {
    *n == default_max_shards()
}
fn is_zero_duration(d: &PromDuration) -> bool {
    d.0.is_zero()
}

/// More shards than this would only multiply connections to one receiver.
pub const MAX_SHARDS_LIMIT: usize = 64;

/// The message the endpoint receives: remote write 1.0's `prometheus.WriteRequest` (the
/// default, which every receiver speaks) or 2.0's `io.prometheus.write.v2.Request`. An
/// endpoint configured for 2.0 falls back to 1.0 by itself when the receiver shows that it
/// does not speak 2.0 (HTTP 415, or a 2xx without the 2.0 response headers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProtobufMessage {
    #[default]
    WriteRequestV1,
    RequestV2,
}

pub const PROTOBUF_V1: &str = "prometheus.WriteRequest";
pub const PROTOBUF_V2: &str = "io.prometheus.write.v2.Request";

impl ProtobufMessage {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtobufMessage::WriteRequestV1 => PROTOBUF_V1,
            ProtobufMessage::RequestV2 => PROTOBUF_V2,
        }
    }
}

impl Serialize for ProtobufMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ProtobufMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            PROTOBUF_V1 => Ok(ProtobufMessage::WriteRequestV1),
            PROTOBUF_V2 => Ok(ProtobufMessage::RequestV2),
            other => Err(serde::de::Error::custom(format!(
                "protobuf_message: unknown message {other:?}; expected {PROTOBUF_V1} \
                 (remote write 1.0) or {PROTOBUF_V2} (remote write 2.0)"
            ))),
        }
    }
}

/// A credential from the config file. It prints and serializes as `<secret>`, as in
/// Prometheus, so that logs, config dumps and the default endpoint name never carry it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<secret>")
    }
}

impl RemoteWriteConfig {
    /// A config with every option at its default, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: None,
            remote_timeout: default_remote_timeout(),
            headers: BTreeMap::new(),
            basic_auth: None,
            bearer_token: None,
            bearer_token_file: None,
            authorization: None,
            tls_config: None,
            protobuf_message: ProtobufMessage::default(),
            queue_config: QueueConfig::default(),
        }
    }

    /// The configured name, or the first 6 hex digits of a hash of the rest of the config.
    /// Like Prometheus's, the default stays the same across restarts and releases as
    /// long as the config does, so the self-metrics' series stay continuous.
    pub fn name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        let canonical = serde_json::to_string(&Self {
            name: None,
            ..self.clone()
        })
        .unwrap_or_else(|_| self.url.clone());
        format!("{:016x}", fnv1a64(canonical.as_bytes()))[..6].to_string()
    }

    /// Checks what serde cannot: the URL, that one authentication method is set, that
    /// the files named exist and parse now rather than at the first send.
    pub fn validate(&self) -> Result<(), RemoteWriteError> {
        self.validate_inner()
            .map_err(|problem| self.problem(problem))
    }

    /// `problem`, said of this endpoint (by its name, or its URL when it has none).
    pub(crate) fn problem(&self, problem: SettingError) -> RemoteWriteError {
        RemoteWriteError::Endpoint {
            endpoint: format!("{:?}", self.name.as_deref().unwrap_or(&self.url)),
            problem,
        }
    }

    fn validate_inner(&self) -> Result<(), SettingError> {
        Endpoint::parse(&self.url)?;
        if let Some(name) = &self.name
            && name.trim().is_empty()
        {
            return Err(invalid(
                "name: must not be empty; remove it to get a generated name".into(),
            ));
        }
        if self.remote_timeout.0.is_zero() {
            return Err(invalid(
                "remote_timeout: must be more than 0, like \"30s\"".into(),
            ));
        }
        for (name, value) in &self.headers {
            if let Some(reserved) = RESERVED_HEADERS
                .iter()
                .find(|r| r.eq_ignore_ascii_case(name))
            {
                return Err(invalid(format!(
                    "headers: {reserved} is set by sonde itself and cannot be overridden; \
                     remove it (for credentials use basic_auth, bearer_token_file or authorization)"
                )));
            }
            http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                invalid(format!("headers: {name:?} is not a valid HTTP header name"))
            })?;
            http::HeaderValue::from_str(value).map_err(|_| {
                invalid(format!(
                    "headers: the value of {name:?} has characters not allowed in HTTP headers"
                ))
            })?;
        }
        let methods: Vec<&str> = [
            ("basic_auth", self.basic_auth.is_some()),
            ("bearer_token", self.bearer_token.is_some()),
            ("bearer_token_file", self.bearer_token_file.is_some()),
            ("authorization", self.authorization.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if methods.len() > 1 {
            return Err(invalid(format!(
                "{} are all set, but only one authentication method can be used; keep one",
                methods.join(", ")
            )));
        }
        if let Some(b) = &self.basic_auth {
            match (&b.username, &b.username_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "basic_auth: username and username_file are both set; keep one".into(),
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        "basic_auth: username (or username_file) is required".into(),
                    ));
                }
                (None, Some(f)) => check_readable("basic_auth.username_file", f)?,
                (Some(_), None) => {}
            }
            match (&b.password, &b.password_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "basic_auth: password and password_file are both set; keep one".into(),
                    ));
                }
                (None, Some(f)) => check_readable("basic_auth.password_file", f)?,
                _ => {}
            }
        }
        if let Some(f) = &self.bearer_token_file {
            check_readable("bearer_token_file", f)?;
        }
        if let Some(a) = &self.authorization {
            if a.kind
                .as_deref()
                .is_some_and(|k| k.eq_ignore_ascii_case("basic"))
            {
                return Err(invalid(
                    "authorization: type Basic is not allowed here; use basic_auth instead".into(),
                ));
            }
            if let Some(kind) = &a.kind
                && (kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(invalid(format!(
                    "authorization: type {kind:?} must be a single word, like \"Bearer\""
                )));
            }
            match (&a.credentials, &a.credentials_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "authorization: credentials and credentials_file are both set; keep one"
                            .into(),
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        "authorization: credentials (or credentials_file) is required".into(),
                    ));
                }
                (None, Some(f)) => check_readable("authorization.credentials_file", f)?,
                (Some(_), None) => {}
            }
        }
        if let Some(tls) = &self.tls_config {
            // Building the TLS setup reads and parses every file it names.
            tls_client_config(tls)?;
        }
        let q = &self.queue_config;
        if q.max_samples_per_send == 0 {
            return Err(invalid(
                "queue_config.max_samples_per_send: must be at least 1".into(),
            ));
        }
        if q.batch_send_deadline.0.is_zero() {
            return Err(invalid(
                "queue_config.batch_send_deadline: must be more than 0, like \"5s\"".into(),
            ));
        }
        if q.min_backoff.0.is_zero() {
            return Err(invalid(
                "queue_config.min_backoff: must be more than 0, like \"30ms\", or a failing \
                 receiver would be retried in a busy loop"
                    .into(),
            ));
        }
        if q.max_backoff < q.min_backoff {
            return Err(invalid(format!(
                "queue_config.max_backoff ({}) is smaller than queue_config.min_backoff ({}); \
                 raise max_backoff",
                q.max_backoff, q.min_backoff
            )));
        }
        if q.max_queue_bytes.0 == 0 {
            return Err(invalid(
                "queue_config.max_queue_bytes: must be more than 0, like \"1GiB\"".into(),
            ));
        }
        if q.max_shards == 0 || q.max_shards > MAX_SHARDS_LIMIT {
            return Err(invalid(format!(
                "queue_config.max_shards: must be between 1 and {MAX_SHARDS_LIMIT}, like 4"
            )));
        }
        Ok(())
    }
}

/// Checks a list of endpoints together: each one, and that their names differ, since the
/// name is what tells their self-metrics and logs apart.
pub fn validate_all(configs: &[RemoteWriteConfig]) -> Result<(), RemoteWriteError> {
    let mut seen = BTreeMap::new();
    for cfg in configs {
        cfg.validate()?;
        let name = cfg.name();
        if let Some(other_url) = seen.insert(name.clone(), cfg.url.clone()) {
            return Err(if cfg.name.is_some() {
                RemoteWriteError::SameName {
                    name,
                    first: other_url,
                    second: cfg.url.clone(),
                }
            } else {
                RemoteWriteError::SameConfig {
                    url: cfg.url.clone(),
                }
            });
        }
    }
    Ok(())
}

fn check_readable(option: &'static str, path: &Path) -> Result<(), SettingError> {
    std::fs::read(path)
        .map(|_| ())
        .map_err(|source| SettingError::Unreadable {
            option,
            path: path.to_path_buf(),
            source,
        })
}

/// Why remote write cannot start (or reload) as configured.
#[derive(Debug, thiserror::Error)]
pub enum RemoteWriteError {
    #[error("remote_write {endpoint}: {problem}")]
    Endpoint {
        /// The endpoint's name, or its URL, quoted.
        endpoint: String,
        #[source]
        problem: SettingError,
    },
    #[error(
        "remote_write: the name {name:?} is used by two endpoints ({first} and {second}); give each a different name"
    )]
    SameName {
        name: String,
        first: String,
        second: String,
    },
    #[error("remote_write: two endpoints for {url} have the same config; remove the duplicate")]
    SameConfig { url: String },
    /// The queue's tables in the aggregator's database cannot be read or written.
    #[error("remote write queue {what}: {source}")]
    Queue {
        /// Which queue, or `tables` for all of them.
        what: String,
        #[source]
        source: rusqlite::Error,
    },
}

/// FNV-1a: a hash whose output is fixed by its definition, unlike std's `DefaultHasher`,
/// so generated endpoint names do not change when the toolchain does.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_proto::config::from_yaml_str;
    use std::time::Duration;

    fn parse(yaml: &str) -> Result<RemoteWriteConfig, String> {
        from_yaml_str(Path::new("test.yml"), yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse("url: http://127.0.0.1:9090/api/v1/write\n").unwrap();
        assert_eq!(c.remote_timeout.0, Duration::from_secs(30));
        assert_eq!(c.queue_config.max_samples_per_send, 2000);
        assert_eq!(c.queue_config.batch_send_deadline.0, Duration::from_secs(5));
        assert_eq!(c.queue_config.min_backoff.0, Duration::from_millis(30));
        assert_eq!(c.queue_config.max_backoff.0, Duration::from_secs(5));
        assert_eq!(c.queue_config.max_queue_bytes, ByteSize(1 << 30));
        assert_eq!(c.protobuf_message, ProtobufMessage::WriteRequestV1);
        assert_eq!(c.queue_config.max_shards, 4);
        assert!(c.queue_config.sample_age_limit.0.is_zero());
        assert_eq!(
            c,
            RemoteWriteConfig::new("http://127.0.0.1:9090/api/v1/write")
        );
        c.validate().unwrap();
    }

    #[test]
    fn full_block_parses() {
        let dir = std::env::temp_dir().join(format!("sonde-rw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "hunter2\n").unwrap();
        let c = parse(&format!(
            "url: https://mimir.example:443/api/v1/push\n\
             name: mimir\n\
             remote_timeout: 10s\n\
             headers: {{X-Scope-OrgID: tenant-1}}\n\
             basic_auth: {{username: u, password_file: {}}}\n\
             protobuf_message: prometheus.WriteRequest\n\
             queue_config: {{max_samples_per_send: 500, batch_send_deadline: 1s, min_backoff: 10ms, \
             max_backoff: 1s, max_queue_bytes: 64MiB}}\n",
            pw.display()
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.name(), "mimir");
        assert_eq!(c.headers["X-Scope-OrgID"], "tenant-1");
        assert_eq!(c.queue_config.max_queue_bytes, ByteSize(64 << 20));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_unknown_keys_accepts_v2() {
        let e = parse("url: http://a/\nwrite_relabel_configs: []\n").unwrap_err();
        assert!(e.contains("write_relabel_configs"), "{e}");
        let c =
            parse("url: http://a/\nprotobuf_message: io.prometheus.write.v2.Request\n").unwrap();
        assert_eq!(c.protobuf_message, ProtobufMessage::RequestV2);
        let e = parse("url: http://a/\nprotobuf_message: v3\n").unwrap_err();
        assert!(e.contains("io.prometheus.write.v2.Request"), "{e}");
        let e = parse("url: http://a/\nqueue_config: {capacity: 10}\n").unwrap_err();
        assert!(e.contains("capacity"), "{e}");
    }

    #[test]
    fn validation_errors_name_the_option() {
        let check = |yaml: &str, expect: &str| {
            let e = parse(yaml).unwrap().validate().unwrap_err().to_string();
            assert!(e.contains(expect), "{yaml} gave {e}");
        };
        check("url: ftp://a/\n", "http:// or https://");
        check("url: /api/v1/write\n", "http:// or https://");
        check("url: http://u:p@a/\n", "basic_auth");
        check(
            "url: http://a/\nheaders: {authorization: x}\n",
            "Authorization",
        );
        check(
            "url: http://a/\nheaders: {X-Prometheus-Remote-Write-Version: 2}\n",
            "cannot be overridden",
        );
        check(
            "url: http://a/\nbearer_token: t\nbasic_auth: {username: u, password: p}\n",
            "only one authentication method",
        );
        check(
            "url: http://a/\nbearer_token_file: /nonexistent/sonde/token\n",
            "bearer_token_file: cannot read /nonexistent/sonde/token",
        );
        check(
            "url: http://a/\nauthorization: {type: Basic, credentials: x}\n",
            "use basic_auth",
        );
        check(
            "url: http://a/\ntls_config: {ca_file: /nonexistent/ca.pem}\n",
            "tls_config.ca_file",
        );
        check(
            "url: http://a/\ntls_config: {cert_file: /nonexistent/c.pem}\n",
            "key_file",
        );
        check(
            "url: http://a/\nqueue_config: {min_backoff: 2s, max_backoff: 1s}\n",
            "raise max_backoff",
        );
        check(
            "url: http://a/\nqueue_config: {max_samples_per_send: 0}\n",
            "max_samples_per_send",
        );
        check(
            "url: http://a/\nqueue_config: {max_shards: 0}\n",
            "queue_config.max_shards",
        );
        let e = parse("url: http://a/\nname: x\nbearer_token_file: /nonexistent/t\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            matches!(
                &e,
                RemoteWriteError::Endpoint {
                    problem: SettingError::Unreadable {
                        option: "bearer_token_file",
                        ..
                    },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("remote_write \"x\": "), "{e}");
    }

    #[test]
    fn generated_name_is_stable_and_hides_secrets() {
        let a = parse("url: http://a/\nbearer_token: s3cr3t-1\n").unwrap();
        let b = parse("url: http://a/\nbearer_token: s3cr3t-2\n").unwrap();
        let c = parse("url: http://b/\n").unwrap();
        assert_eq!(a.name().len(), 6);
        assert_eq!(a.name(), a.clone().name());
        // Secrets never reach the name (nor logs): both print as <secret>.
        assert_eq!(a.name(), b.name());
        assert_ne!(a.name(), c.name());
        assert!(!format!("{a:?}").contains("s3cr3t"));
        // Pinned: the name must not change between releases for the same config.
        assert_eq!(RemoteWriteConfig::new("http://a/").name(), "4e24d1");
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn duplicate_names_rejected() {
        let a = RemoteWriteConfig {
            name: Some("x".into()),
            ..RemoteWriteConfig::new("http://a/")
        };
        let b = RemoteWriteConfig {
            name: Some("x".into()),
            ..RemoteWriteConfig::new("http://b/")
        };
        assert!(
            validate_all(&[a.clone(), b])
                .unwrap_err()
                .to_string()
                .contains("different name")
        );
        let c = RemoteWriteConfig::new("http://c/");
        assert!(
            validate_all(&[c.clone(), c.clone()])
                .unwrap_err()
                .to_string()
                .contains("same config")
        );
        validate_all(&[a, c]).unwrap();
    }
}
