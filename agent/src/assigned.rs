//! What the agent accepts in an assignment (DESIGN, "Trust model": the agent distrusts
//! what it is sent).
//!
//! An aggregator is trusted with *what* to probe, not with the agent's host: a module it
//! assigns may name a file (a request body, a CA, a client key, a password) only under
//! `assigned_modules.allowed_file_paths`, or a hostile or compromised aggregator could
//! have the agent send `/etc/shadow` as a request body to a server of its choosing. And
//! its numbers (interval, timeout, retries) are checked before any arithmetic is done
//! with them. Each refused check is refused alone, with a reason; the rest run. Modules
//! from the agent's own config are trusted and never pass through here.

use crate::config::AssignedModulesConfig;
use sonde_proto::config::Module;
use sonde_proto::config::module::{
    Authorization, BasicAuth, DnsProbe, GrpcProbe, HttpProbe, IcmpProbe, OAuth2, TcpProbe,
    TlsConfig, UnixProbe, WebsocketHttpConfig, WebsocketProbe,
};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// The longest interval an assigned check may have. Longer is more likely a mistake or
/// an attack on the agent's schedule arithmetic than a probe anyone wants.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
/// The most retries an assigned check may ask for (each retry must fit in the interval
/// anyway, so more than a handful never run).
pub const MAX_RETRIES: u32 = 100;

/// Why a check of an assignment was refused: the `reason` label of
/// `sonde_agent_assignment_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// The module could not be read (a newer aggregator's options, or garbage).
    BadModule,
    /// The module names a file outside `assigned_modules.allowed_file_paths`.
    FileNotAllowed,
    /// Interval, timeout or retries out of range.
    BadTiming,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadModule => "bad_module",
            Refusal::FileNotAllowed => "file_not_allowed",
            Refusal::BadTiming => "bad_timing",
        }
    }
}

/// A pattern of `assigned_modules.allowed_file_paths` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{pattern:?} is not an absolute path; write it like /etc/sonde/certs/*")]
    NotAbsolute { pattern: String },
    #[error("{pattern:?} contains '..'; write the directory it means")]
    ParentDir { pattern: String },
    #[error("{pattern:?}: {source}")]
    Glob {
        pattern: String,
        source: globset::Error,
    },
    #[error("{0}")]
    Set(#[source] globset::Error),
}

/// A file an assigned module names that `assigned_modules.allowed_file_paths` does not
/// allow: the option, the path, why, and how to allow it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{option}: {path:?} {why}; to accept it, add a glob covering it to assigned_modules.allowed_file_paths in the agent config (now {})",
    allowed_now(patterns)
)]
pub struct FileNotAllowed {
    pub option: &'static str,
    pub path: String,
    why: PathRefused,
    patterns: Vec<String>,
}

/// Why a path an assigned module names is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    /// No `allowed_file_paths`: every file is refused.
    #[error("names a file")]
    NoFileAllowed,
    #[error("is outside the allowed file paths")]
    Outside,
    #[error("contains a NUL byte")]
    NulByte,
    #[error("is not an absolute path")]
    NotAbsolute,
    #[error("is not a Unix path")]
    NotUnix,
}

fn allowed_now(patterns: &[String]) -> String {
    if patterns.is_empty() {
        "absent, so no file is accepted".to_string()
    } else {
        format!("{patterns:?}")
    }
}

/// An assigned check's interval, timeout or retries out of the range an agent accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("interval_ms is 0")]
    ZeroInterval,
    #[error(
        "interval_ms {interval_ms} is longer than the {}h an agent accepts",
        MAX_INTERVAL.as_secs() / 3600
    )]
    IntervalTooLong { interval_ms: u64 },
    #[error("timeout_ms is 0")]
    ZeroTimeout,
    #[error("timeout_ms {timeout_ms} is longer than interval_ms {interval_ms}")]
    TimeoutOverInterval { timeout_ms: u64, interval_ms: u64 },
    #[error("retries {retries} is more than the {MAX_RETRIES} an agent accepts")]
    TooManyRetries { retries: u32 },
}

/// `assigned_modules.allowed_file_paths`, compiled.
#[derive(Clone, Debug)]
pub struct FilePolicy {
    /// `None`: no file option is accepted.
    allowed: Option<globset::GlobSet>,
    patterns: Vec<String>,
}

impl FilePolicy {
    pub fn new(config: &AssignedModulesConfig) -> Result<Self, PolicyError> {
        let patterns = config.allowed_file_paths.clone().unwrap_or_default();
        if patterns.is_empty() {
            return Ok(Self {
                allowed: None,
                patterns,
            });
        }
        let mut set = globset::GlobSetBuilder::new();
        for pattern in &patterns {
            if !pattern.starts_with('/') {
                return Err(PolicyError::NotAbsolute {
                    pattern: pattern.clone(),
                });
            }
            if Path::new(pattern)
                .components()
                .any(|c| c == Component::ParentDir)
            {
                return Err(PolicyError::ParentDir {
                    pattern: pattern.clone(),
                });
            }
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|source| PolicyError::Glob {
                    pattern: pattern.clone(),
                    source,
                })?;
            set.add(glob);
        }
        let allowed = set.build().map_err(PolicyError::Set)?;
        Ok(Self {
            allowed: Some(allowed),
            patterns,
        })
    }

    /// `Ok` when every file the module names lies under an allowed path, else the first
    /// that does not, with the option's name and the fix.
    pub fn check_module(&self, module: &Module) -> Result<(), FileNotAllowed> {
        for (option, path) in file_options(module) {
            self.check_path(path).map_err(|why| FileNotAllowed {
                option,
                path: path.to_string(),
                why,
                patterns: self.patterns.clone(),
            })?;
        }
        Ok(())
    }

    fn check_path(&self, path: &str) -> Result<(), PathRefused> {
        let Some(allowed) = &self.allowed else {
            return Err(PathRefused::NoFileAllowed);
        };
        let normalised = normalise(path)?;
        if allowed.is_match(&normalised) {
            Ok(())
        } else {
            Err(PathRefused::Outside)
        }
    }
}

/// `path` with `.` and `..` resolved lexically, so that `/etc/sonde/certs/../../shadow`
/// is judged as `/etc/shadow`. Relative paths (which would depend on the agent's working
/// directory) and NUL bytes are refused.
pub fn normalise(path: &str) -> Result<PathBuf, PathRefused> {
    if path.contains('\0') {
        return Err(PathRefused::NulByte);
    }
    if !path.starts_with('/') {
        return Err(PathRefused::NotAbsolute);
    }
    let mut out = PathBuf::from("/");
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::Prefix(_) => return Err(PathRefused::NotUnix),
        }
    }
    Ok(out)
}

/// Every file a module names, with the option's name. Each struct is destructured
/// field by field (no `..`), so a new option added to a module type fails to compile
/// here until someone decides whether it names a file.
pub fn file_options(module: &Module) -> Vec<(&'static str, &str)> {
    let Module {
        prober: _,
        timeout: _,
        http,
        tcp,
        dns,
        per_address: _,
        icmp,
        grpc,
        unix,
        websocket,
        multihttp,
    } = module;
    let mut out = multihttp.files();
    let HttpProbe {
        valid_status_codes: _,
        valid_http_versions: _,
        preferred_ip_protocol: _,
        ip_protocol_fallback: _,
        no_follow_redirects: _,
        follow_redirects: _,
        fail_if_ssl: _,
        fail_if_not_ssl: _,
        method: _,
        headers: _,
        http_headers,
        proxy_connect_header: _,
        body: _,
        body_file,
        compression: _,
        proxy_url: _,
        skip_resolve_phase_with_proxy: _,
        authorization,
        fail_if_body_matches_regexp: _,
        fail_if_body_not_matches_regexp: _,
        fail_if_body_json_matches_cel: _,
        fail_if_body_json_not_matches_cel: _,
        tls_config,
        enable_http2: _,
        enable_http3: _,
        fail_if_header_matches: _,
        fail_if_header_not_matches: _,
        basic_auth,
        bearer_token: _,
        bearer_token_file,
        oauth2,
        body_size_limit: _,
    } = http;
    push(&mut out, "http.body_file", body_file);
    for sources in http_headers.values() {
        for file in &sources.files {
            out.push(("http.http_headers.files", file.as_str()));
        }
    }
    push(&mut out, "http.bearer_token_file", bearer_token_file);
    if let Some(BasicAuth {
        username: _,
        password: _,
        password_file,
    }) = basic_auth
    {
        push(&mut out, "http.basic_auth.password_file", password_file);
    }
    if let Some(Authorization {
        kind: _,
        credentials: _,
        credentials_file,
    }) = authorization
    {
        push(
            &mut out,
            "http.authorization.credentials_file",
            credentials_file,
        );
    }
    if let Some(OAuth2 {
        client_id: _,
        client_secret: _,
        client_secret_file,
        scopes: _,
        token_url: _,
        endpoint_params: _,
        tls_config,
    }) = oauth2
    {
        push(
            &mut out,
            "http.oauth2.client_secret_file",
            client_secret_file,
        );
        tls_files(
            &mut out,
            [
                "http.oauth2.tls_config.ca_file",
                "http.oauth2.tls_config.cert_file",
                "http.oauth2.tls_config.key_file",
            ],
            tls_config,
        );
    }
    tls_files(
        &mut out,
        [
            "http.tls_config.ca_file",
            "http.tls_config.cert_file",
            "http.tls_config.key_file",
        ],
        tls_config,
    );
    let TcpProbe {
        preferred_ip_protocol: _,
        ip_protocol_fallback: _,
        source_ip_address: _,
        query_response: _,
        tls: _,
        tls_config,
    } = tcp;
    tls_files(
        &mut out,
        [
            "tcp.tls_config.ca_file",
            "tcp.tls_config.cert_file",
            "tcp.tls_config.key_file",
        ],
        tls_config,
    );
    let DnsProbe {
        preferred_ip_protocol: _,
        ip_protocol_fallback: _,
        source_ip_address: _,
        transport_protocol: _,
        dns_over_tls: _,
        tls_config,
        query_name: _,
        query_type: _,
        query_class: _,
        recursion_desired: _,
        valid_rcodes: _,
        validate_answer_rrs: _,
        validate_authority_rrs: _,
        validate_additional_rrs: _,
        dnssec,
    } = dns;
    push(
        &mut out,
        "dns.dnssec.trust_anchor_file",
        &dnssec.trust_anchor_file,
    );
    tls_files(
        &mut out,
        [
            "dns.tls_config.ca_file",
            "dns.tls_config.cert_file",
            "dns.tls_config.key_file",
        ],
        tls_config,
    );
    let IcmpProbe {
        preferred_ip_protocol: _,
        ip_protocol_fallback: _,
        source_ip_address: _,
        payload_size: _,
        dont_fragment: _,
        ttl: _,
    } = icmp;
    let GrpcProbe {
        service: _,
        tls: _,
        tls_config,
        preferred_ip_protocol: _,
        ip_protocol_fallback: _,
        metadata: _,
    } = grpc;
    tls_files(
        &mut out,
        [
            "grpc.tls_config.ca_file",
            "grpc.tls_config.cert_file",
            "grpc.tls_config.key_file",
        ],
        tls_config,
    );
    let UnixProbe {
        query_response: _,
        tls: _,
        tls_config,
    } = unix;
    tls_files(
        &mut out,
        [
            "unix.tls_config.ca_file",
            "unix.tls_config.cert_file",
            "unix.tls_config.key_file",
        ],
        tls_config,
    );
    let WebsocketProbe {
        http_config:
            WebsocketHttpConfig {
                basic_auth,
                authorization,
                tls_config,
            },
        headers,
        query_response: _,
        preferred_ip_protocol: _,
        ip_protocol_fallback: _,
    } = websocket;
    if let Some(BasicAuth {
        username: _,
        password: _,
        password_file,
    }) = basic_auth
    {
        push(
            &mut out,
            "websocket.http_config.basic_auth.password_file",
            password_file,
        );
    }
    if let Some(Authorization {
        kind: _,
        credentials: _,
        credentials_file,
    }) = authorization
    {
        push(
            &mut out,
            "websocket.http_config.authorization.credentials_file",
            credentials_file,
        );
    }
    tls_files(
        &mut out,
        [
            "websocket.http_config.tls_config.ca_file",
            "websocket.http_config.tls_config.cert_file",
            "websocket.http_config.tls_config.key_file",
        ],
        tls_config,
    );
    for values in headers.values() {
        for file in values.files() {
            out.push(("websocket.headers.files", file.as_str()));
        }
    }
    out
}

fn push<'a>(out: &mut Vec<(&'static str, &'a str)>, option: &'static str, v: &'a Option<String>) {
    if let Some(path) = v {
        out.push((option, path.as_str()));
    }
}

/// The file options of one `tls_config`, named `<names[i]>`.
fn tls_files<'a>(
    out: &mut Vec<(&'static str, &'a str)>,
    names: [&'static str; 3],
    tls: &'a TlsConfig,
) {
    let TlsConfig {
        ca_file,
        cert_file,
        key_file,
        server_name: _,
        insecure_skip_verify: _,
        min_version: _,
        max_version: _,
    } = tls;
    for (option, v) in names.into_iter().zip([ca_file, cert_file, key_file]) {
        push(out, option, v);
    }
}

/// An assigned check's interval and timeout, checked: both at least 1 ms, the interval
/// at most [`MAX_INTERVAL`], the timeout at most the interval, retries at most
/// [`MAX_RETRIES`]. Within these bounds no schedule arithmetic (phase, deadlines,
/// `2 × interval + timeout`) can overflow.
pub fn check_timing(
    interval_ms: u64,
    timeout_ms: u64,
    retries: u32,
) -> Result<(Duration, Duration), TimingError> {
    let max_ms = MAX_INTERVAL.as_millis() as u64;
    if interval_ms == 0 {
        return Err(TimingError::ZeroInterval);
    }
    if interval_ms > max_ms {
        return Err(TimingError::IntervalTooLong { interval_ms });
    }
    if timeout_ms == 0 {
        return Err(TimingError::ZeroTimeout);
    }
    if timeout_ms > interval_ms {
        return Err(TimingError::TimeoutOverInterval {
            timeout_ms,
            interval_ms,
        });
    }
    if retries > MAX_RETRIES {
        return Err(TimingError::TooManyRetries { retries });
    }
    Ok((
        Duration::from_millis(interval_ms),
        Duration::from_millis(timeout_ms),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(globs: Option<&[&str]>) -> FilePolicy {
        FilePolicy::new(&AssignedModulesConfig {
            allowed_file_paths: globs.map(|g| g.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        })
        .unwrap()
    }

    fn module(json: &str) -> Module {
        serde_json::from_str(json).unwrap()
    }

    /// One module naming every file option there is, each a distinct path.
    fn every_file_option() -> Module {
        module(
            r#"{"prober":"http",
                "http":{"body_file":"/f/body","bearer_token_file":"/f/bearer",
                        "tls_config":{"ca_file":"/f/hca","cert_file":"/f/hcert","key_file":"/f/hkey"}},
                "tcp":{"tls_config":{"ca_file":"/f/tca","cert_file":"/f/tcert","key_file":"/f/tkey"}},
                "dns":{"tls_config":{"ca_file":"/f/dca","cert_file":"/f/dcert","key_file":"/f/dkey"},
                       "dnssec":{"validate":true,"trust_anchor_file":"/f/anchor"}}}"#,
        )
    }

    #[test]
    fn every_file_option_is_found() {
        let mut m = every_file_option();
        let found: Vec<_> = file_options(&m).into_iter().map(|(o, _)| o).collect();
        assert_eq!(found.len(), 12, "{found:?}");
        m.http.bearer_token_file = None;
        m.http.basic_auth = Some(BasicAuth {
            username: "u".into(),
            password: None,
            password_file: Some("/f/pw".into()),
        });
        m.http.authorization = Some(Authorization {
            kind: "Bearer".into(),
            credentials: None,
            credentials_file: Some("/f/cred".into()),
        });
        let found = file_options(&m);
        assert!(found.contains(&("http.basic_auth.password_file", "/f/pw")));
        let oauth2 = module(
            r#"{"prober":"http","http":{"oauth2":{"client_id":"c","token_url":"https://a.example/t",
                "client_secret_file":"/f/oauth","tls_config":{"ca_file":"/f/oca"}}}}"#,
        );
        let oauth2 = file_options(&oauth2);
        assert!(oauth2.contains(&("http.oauth2.client_secret_file", "/f/oauth")));
        assert!(oauth2.contains(&("http.oauth2.tls_config.ca_file", "/f/oca")));
        assert!(found.contains(&("http.authorization.credentials_file", "/f/cred")));
        for option in [
            "http.body_file",
            "http.tls_config.ca_file",
            "http.tls_config.cert_file",
            "http.tls_config.key_file",
            "tcp.tls_config.ca_file",
            "tcp.tls_config.cert_file",
            "tcp.tls_config.key_file",
            "dns.tls_config.ca_file",
            "dns.tls_config.cert_file",
            "dns.tls_config.key_file",
            "dns.dnssec.trust_anchor_file",
        ] {
            assert!(found.iter().any(|(o, _)| *o == option), "{option}");
        }
    }

    #[test]
    fn without_allowed_paths_no_file_option_is_accepted() {
        let m = every_file_option();
        for (option, path) in file_options(&m) {
            let mut single = module(r#"{"prober":"http"}"#);
            // Check each option alone, through a module naming only it.
            match option {
                "http.body_file" => single.http.body_file = Some(path.into()),
                "http.bearer_token_file" => single.http.bearer_token_file = Some(path.into()),
                "http.tls_config.ca_file" => single.http.tls_config.ca_file = Some(path.into()),
                "http.tls_config.cert_file" => single.http.tls_config.cert_file = Some(path.into()),
                "http.tls_config.key_file" => single.http.tls_config.key_file = Some(path.into()),
                "tcp.tls_config.ca_file" => single.tcp.tls_config.ca_file = Some(path.into()),
                "tcp.tls_config.cert_file" => single.tcp.tls_config.cert_file = Some(path.into()),
                "tcp.tls_config.key_file" => single.tcp.tls_config.key_file = Some(path.into()),
                "dns.tls_config.ca_file" => single.dns.tls_config.ca_file = Some(path.into()),
                "dns.tls_config.cert_file" => single.dns.tls_config.cert_file = Some(path.into()),
                "dns.tls_config.key_file" => single.dns.tls_config.key_file = Some(path.into()),
                "dns.dnssec.trust_anchor_file" => {
                    single.dns.dnssec.trust_anchor_file = Some(path.into())
                }
                other => panic!("untested option {other}"),
            }
            for p in [policy(None), policy(Some(&[]))] {
                let err = p.check_module(&single).unwrap_err().to_string();
                assert!(err.starts_with(option), "{err}");
                assert!(err.contains(path), "{err}");
                assert!(err.contains("assigned_modules.allowed_file_paths"), "{err}");
            }
            assert!(policy(Some(&["/f/*"])).check_module(&single).is_ok());
        }
        // A module naming no file is fine without any allowed path.
        assert!(
            policy(None)
                .check_module(&module(r#"{"prober":"tcp"}"#))
                .is_ok()
        );
    }

    #[test]
    fn multihttp_files_pass_the_policy_like_any_other() {
        let m = module(
            r#"{"prober":"multihttp","multihttp":{"steps":[
                {"name":"login","url":"{{target}}/login","body":"pw={{file:/etc/shadow}}",
                 "tls_config":{"ca_file":"/etc/sonde/certs/ca.pem"}},
                {"name":"api","url":"{{target}}/api","basic_auth":{"username":"u","password_file":"/etc/sonde/certs/pw"}}]}}"#,
        );
        assert_eq!(
            file_options(&m),
            vec![
                ("multihttp.steps.{{file:}}", "/etc/shadow"),
                (
                    "multihttp.steps.tls_config.ca_file",
                    "/etc/sonde/certs/ca.pem"
                ),
                (
                    "multihttp.steps.basic_auth.password_file",
                    "/etc/sonde/certs/pw"
                ),
            ]
        );
        let err = policy(Some(&["/etc/sonde/certs/*"]))
            .check_module(&m)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("multihttp.steps.{{file:}}: \"/etc/shadow\" is outside"),
            "{err}"
        );
        assert!(
            policy(Some(&["/etc/sonde/certs/*", "/etc/shadow"]))
                .check_module(&m)
                .is_ok()
        );
    }

    #[test]
    fn paths_are_matched_after_normalising() {
        let p = policy(Some(&["/etc/sonde/certs/*"]));
        let with = |path: &str| {
            let mut m = module(r#"{"prober":"http"}"#);
            m.http.tls_config.ca_file = Some(path.into());
            p.check_module(&m)
        };
        assert!(with("/etc/sonde/certs/ca.pem").is_ok());
        assert!(with("/etc/sonde/certs/./ca.pem").is_ok());
        assert!(with("/etc/sonde/other/../certs/ca.pem").is_ok());
        assert!(with("/etc/sonde/certs/../../shadow").is_err());
        assert!(with("/etc/sonde/certs/../../../../etc/shadow").is_err());
        assert!(with("/etc/shadow").is_err());
        // `*` stays within the directory.
        assert!(with("/etc/sonde/certs/sub/ca.pem").is_err());
        let err = with("certs/ca.pem").unwrap_err().to_string();
        assert!(err.contains("not an absolute path"), "{err}");
        assert!(with("/etc/sonde/certs/\0ca.pem").is_err());
        assert!(with("").is_err());
    }

    #[test]
    fn bad_patterns_are_config_errors() {
        for bad in ["certs/*", "/etc/sonde/../*", "/etc/[*"] {
            let config = AssignedModulesConfig {
                allowed_file_paths: Some(vec![bad.to_string()]),
                ..Default::default()
            };
            assert!(FilePolicy::new(&config).is_err(), "{bad}");
        }
    }

    #[test]
    fn normalise_resolves_dots_and_stays_under_root() {
        assert_eq!(normalise("/a/./b/../c").unwrap(), PathBuf::from("/a/c"));
        assert_eq!(normalise("/../../etc").unwrap(), PathBuf::from("/etc"));
        assert_eq!(normalise("//a//b/").unwrap(), PathBuf::from("/a/b"));
        assert!(normalise("a/b").is_err());
        assert!(normalise("./a").is_err());
    }

    #[test]
    fn timing_out_of_range_is_refused_not_panicked_on() {
        assert_eq!(
            check_timing(15_000, 5_000, 0).unwrap(),
            (Duration::from_secs(15), Duration::from_secs(5))
        );
        assert!(check_timing(MAX_INTERVAL.as_millis() as u64, 1, MAX_RETRIES).is_ok());
        for (interval, timeout, retries, why) in [
            (0, 0, 0, "interval_ms is 0"),
            (0, 1, 0, "interval_ms is 0"),
            (1000, 0, 0, "timeout_ms is 0"),
            (1000, 2000, 0, "longer than interval_ms"),
            (u64::MAX, 1000, 0, "longer than the 24h"),
            (u64::MAX, u64::MAX, 0, "longer than the 24h"),
            (
                MAX_INTERVAL.as_millis() as u64 + 1,
                1000,
                0,
                "longer than the 24h",
            ),
            (1000, u64::MAX, 0, "longer than interval_ms"),
            (1000, 1000, u32::MAX, "retries"),
            (1000, 1000, MAX_RETRIES + 1, "retries"),
        ] {
            let err = check_timing(interval, timeout, retries)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{interval} {timeout} {retries}: {err}");
        }
    }

    #[test]
    fn accepted_timing_survives_the_schedule_arithmetic() {
        // The largest accepted values through what the agent computes with them.
        let (interval, timeout) = check_timing(
            MAX_INTERVAL.as_millis() as u64,
            MAX_INTERVAL.as_millis() as u64,
            100,
        )
        .unwrap();
        let freshness = interval * 2 + timeout;
        assert!(freshness > interval);
        let deadline = tokio::time::Instant::now() + interval + timeout;
        assert!(deadline > tokio::time::Instant::now());
    }
}
