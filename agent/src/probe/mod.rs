//! The probers, behind one interface in the shape of blackbox_exporter's `ProbeFn`:
//! a target, a module and a deadline in; success and the samples it produced out.
//!
//! Adding a prober is adding one file (or folder) here and one arm in [`run`]:
//! [`http`], [`tcp`], [`dns`], [`icmp`], [`grpc`] and `multihttp` (steps of http requests) are the probers; `net` (the TCP connect), `tls` (the
//! TLS client), `tls_samples` (the `probe_ssl_*` / `probe_tls_*` samples) and `x509`
//! (what a certificate says) are the parts they share; `per_address` runs a prober once
//! per address of the target; [`policy`] says where a probe may connect. Each prober notes what it saw in [`Samples::trace`]
//! (`sonde_proto::trace`); [`traceroute`] adds the path when a scheduled probe fails.

pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod icmp;
pub mod log;
pub(crate) mod multihttp;
pub(crate) mod net;
pub(crate) mod per_address;
pub mod policy;
pub mod tcp;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod tls;
pub(crate) mod tls_samples;
pub mod traceroute;
pub mod unix;
pub mod websocket;
pub(crate) mod x509;

pub use log::ProbeLog;
pub use policy::{ConnectPolicy, Refusal};
use sonde_proto::config::module::IpProtocol;
use sonde_proto::config::{Module, Prober};
use sonde_proto::trace::{Step, Trace};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One sample a probe produced, before interning for the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// Where a prober writes its samples. Kept outside the prober's future so that what
/// was measured before a timeout (the resolve and connect phases, say) survives it.
#[derive(Debug, Default)]
pub struct Samples {
    pub items: Vec<Sample>,
    /// What the prober is doing now, so that a deadline that cuts it short can say
    /// whether it was resolving, connecting or later (`probe_failure_info`).
    pub(crate) stage: Stage,
    /// What the probe saw on the way (DNS answer, connects, TLS error, status lines),
    /// sent with the result when the probe fails. Secret-free: probers add addresses,
    /// outcomes and a few body bytes, never headers, URLs or credentials.
    pub trace: Trace,
    /// The step-by-step log, on for `/probe?debug=true` only ([`log`]).
    pub log: ProbeLog,
}

/// The step a probe is in, for classifying a timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Stage {
    #[default]
    Start,
    Resolve,
    Connect,
    Exchange,
}

/// Why a probe failed: the bounded label values of `probe_failure_info{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The target's (or a redirect's) name did not resolve.
    Dns,
    ConnectRefused,
    ConnectTimeout,
    /// Any other connect error (unreachable network, no route, bind failure).
    ConnectError,
    /// The TLS handshake failed (untrusted or expired certificate, wrong name, no common
    /// version), or `fail_if_ssl` / `fail_if_not_ssl`.
    Tls,
    HttpStatus,
    HttpVersion,
    /// A body, header, `expect` or DNS record regex.
    Regex,
    /// `expect_bytes` did not match.
    Bytes,
    BodySize,
    /// The DNS server answered with an rcode not in `valid_rcodes`.
    DnsRcode,
    /// The probe's deadline passed after connecting.
    Timeout,
    /// The peer broke the protocol: garbage, a reset, a closed connection, a body that
    /// does not decompress.
    Protocol,
    /// The module or target cannot work as configured (bad target, unreadable file).
    Config,
    /// The connect policy (`/probe`'s allowlist, `assigned_modules.connect` for an
    /// assigned check) refused an address the probe was about to connect to.
    RefusedByPolicy,
    /// A gRPC health check answered with an error status, or a serving status other
    /// than `SERVING`.
    GrpcStatus,
    /// `dns.dnssec.validate`: the answer's chain of trust did not validate.
    Dnssec,
}

impl Reason {
    pub const ALL: [Reason; 17] = [
        Reason::Dns,
        Reason::ConnectRefused,
        Reason::ConnectTimeout,
        Reason::ConnectError,
        Reason::Tls,
        Reason::HttpStatus,
        Reason::HttpVersion,
        Reason::Regex,
        Reason::Bytes,
        Reason::BodySize,
        Reason::DnsRcode,
        Reason::Timeout,
        Reason::Protocol,
        Reason::Config,
        Reason::RefusedByPolicy,
        Reason::GrpcStatus,
        Reason::Dnssec,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Dns => "dns",
            Reason::ConnectRefused => "connect_refused",
            Reason::ConnectTimeout => "connect_timeout",
            Reason::ConnectError => "connect_error",
            Reason::Tls => "tls",
            Reason::HttpStatus => "http_status",
            Reason::HttpVersion => "http_version",
            Reason::Regex => "regex",
            Reason::Bytes => "bytes",
            Reason::BodySize => "body_size",
            Reason::DnsRcode => "dns_rcode",
            Reason::Timeout => "timeout",
            Reason::Protocol => "protocol",
            Reason::Config => "config",
            Reason::RefusedByPolicy => "refused_by_policy",
            Reason::GrpcStatus => "grpc_status",
            Reason::Dnssec => "dnssec",
        }
    }
}

/// A failed probe: the reason class and the message for logs and `debug=true`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Tags an error with the reason it stands for, its message kept as it is.
pub(crate) trait Because<T> {
    fn because(self, reason: Reason) -> Result<T, Failure>;
}

impl<T, E: std::fmt::Display> Because<T> for Result<T, E> {
    fn because(self, reason: Reason) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(reason, e.to_string()))
    }
}

/// What a prober runs with: the shared context and, for `/probe` and assigned checks,
/// the connect policy ([`policy`]).
/// Dereferences to the [`ProbeContext`].
pub struct Env<'a> {
    pub ctx: &'a ProbeContext,
    pub policy: Option<&'a dyn ConnectPolicy>,
    /// The one address of the target this probe uses instead of resolving it: set for
    /// each address of a `per_address` module.
    pub pinned: Option<IpAddr>,
}

impl std::ops::Deref for Env<'_> {
    type Target = ProbeContext;
    fn deref(&self) -> &ProbeContext {
        self.ctx
    }
}

impl Env<'_> {
    /// Asks the policy, if any, before connecting to `addr` for `host`.
    /// Asks the policy before connecting to the unix socket at `path`.
    pub(crate) fn allow_socket(&self, path: &str) -> Result<(), Failure> {
        match self.policy {
            None => Ok(()),
            Some(policy) => policy.check_socket(path).map_err(refused),
        }
    }

    pub(crate) fn allow(&self, host: &str, addr: std::net::SocketAddr) -> Result<(), Failure> {
        let Some(policy) = self.policy else {
            return Ok(());
        };
        policy
            .check_addr(addr)
            .and_then(|()| policy.check_host(host, addr.port()))
            .map_err(refused)
    }

    /// Asks the policy before connecting to a module's proxy at `proxy` to reach
    /// `host:port`: the host by name (the proxy resolves it), the proxy by address.
    pub(crate) fn allow_via_proxy(
        &self,
        host: &str,
        port: u16,
        proxy: std::net::SocketAddr,
    ) -> Result<(), Failure> {
        let Some(policy) = self.policy else {
            return Ok(());
        };
        policy.check_host(host, port).map_err(refused)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            policy
                .check_addr(std::net::SocketAddr::new(ip, port))
                .map_err(refused)?;
        }
        policy.check_addr(proxy).map_err(refused)
    }
}

fn refused(why: Refusal) -> Failure {
    Failure::new(Reason::RefusedByPolicy, why.0)
}

impl Samples {
    /// Samples for a probe whose log is `log`.
    pub fn with_log(log: ProbeLog) -> Self {
        Self {
            log,
            ..Self::default()
        }
    }

    /// Records a step in the failure trace and, when the log is on, logs it.
    pub fn note(&mut self, step: Step) {
        self.log.step(&step);
        self.trace.push(step);
    }

    pub fn gauge(&mut self, name: &'static str, value: f64) {
        self.items.push(Sample {
            name,
            labels: Vec::new(),
            value,
        });
    }

    pub fn gauge_with(&mut self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        self.items.push(Sample {
            name,
            labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        });
    }

    /// Adds `delta` to the sample with exactly these labels, or adds the sample: phase
    /// durations are summed over redirects, as blackbox_exporter does.
    pub fn add_with(&mut self, name: &'static str, labels: &[(&'static str, &str)], delta: f64) {
        let existing = self.items.iter_mut().find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && s.labels
                    .iter()
                    .zip(labels)
                    .all(|((k, v), (lk, lv))| k == lk && v == lv)
        });
        match existing {
            Some(s) => s.value += delta,
            None => self.gauge_with(name, labels, delta),
        }
    }

    /// Registers the samples a prober always reports, at 0 until the probe gets that far
    /// (as blackbox_exporter registers its gauges up front): `metric{phase}` for each of
    /// `phases`, and each of `gauges`.
    pub fn register(&mut self, metric: &'static str, phases: &[&str], gauges: &[&'static str]) {
        for phase in phases {
            self.add_with(metric, &[("phase", phase)], 0.0);
        }
        for name in gauges {
            self.set(name, 0.0);
        }
    }

    /// Replaces the value of an existing unlabelled sample, or adds it.
    pub fn set(&mut self, name: &'static str, value: f64) {
        match self
            .items
            .iter_mut()
            .find(|s| s.name == name && s.labels.is_empty())
        {
            Some(s) => s.value = value,
            None => self.gauge(name, value),
        }
    }
}

/// Shared, long-lived state the probers use (the system resolver, TLS roots), built
/// once per process rather than once per probe.
pub struct ProbeContext {
    pub resolver: hickory_resolver::TokioResolver,
    /// The TLS primitives (ring), shared by every TLS client config a probe builds.
    pub(crate) crypto: Arc<rustls::crypto::CryptoProvider>,
    /// webpki-roots' Mozilla trust anchors, the default when a module has no `ca_file`.
    pub(crate) web_roots: Arc<rustls::RootCertStore>,
    /// Compiled body regexes by pattern, so that a probe does not recompile them.
    regexes: Mutex<HashMap<String, Arc<regex::bytes::Regex>>>,
    /// Label names from module configs (`query_response` labels), stored once for the
    /// process so samples can carry them as `&'static str`.
    label_names: Mutex<std::collections::HashSet<&'static str>>,
    /// Traceroutes after failures, rate-limited for the whole agent.
    pub tracer: traceroute::Tracer,
    /// `oauth2` tokens of the http prober, per client, until shortly before they expire.
    pub(crate) oauth2_tokens: http::oauth2::TokenCache,
}

impl ProbeContext {
    /// Uses the system's resolver configuration (`/etc/resolv.conf`).
    ///
    /// The resolver's cache is off: like blackbox_exporter, every probe asks the
    /// configured resolver, so `probe_dns_lookup_time_seconds` measures it and an
    /// address change shows in `probe_ip_addr_hash` at the next probe.
    pub fn from_system() -> Result<Self, SystemResolverError> {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .and_then(|mut b| {
                b.options_mut().cache_size = 0;
                b.build()
            })
            .map_err(SystemResolverError)?;
        Ok(Self::with_resolver(resolver))
    }

    /// Uses the given resolver for target names (tests, or a resolver set in config).
    pub fn with_resolver(resolver: hickory_resolver::TokioResolver) -> Self {
        let web_roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Self {
            resolver,
            crypto: Arc::new(rustls::crypto::ring::default_provider()),
            web_roots: Arc::new(web_roots),
            regexes: Mutex::new(HashMap::new()),
            label_names: Mutex::new(std::collections::HashSet::new()),
            tracer: traceroute::Tracer::default(),
            oauth2_tokens: http::oauth2::TokenCache::default(),
        }
    }

    /// A label name from a module's config as a `&'static str`. Each distinct name is
    /// stored once for the life of the process; names come from the config only (never
    /// from a target's answer), and at most [`MAX_LABEL_NAMES`] are kept.
    pub(crate) fn label_name(&self, name: &str) -> Option<&'static str> {
        const MAX_LABEL_NAMES: usize = 4096;
        let mut names = self.label_names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = names.get(name) {
            return Some(n);
        }
        if names.len() >= MAX_LABEL_NAMES {
            return None;
        }
        let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
        names.insert(leaked);
        Some(leaked)
    }

    /// The compiled form of a body regex. Module validation has already compiled each
    /// pattern once, so an error here names a module that skipped validation.
    pub(crate) fn regex(&self, pattern: &str) -> Result<Arc<regex::bytes::Regex>, BadRegex> {
        // Bounded so that a config churning through patterns cannot grow it forever.
        const MAX_CACHED: usize = 1024;
        let mut cache = self.regexes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(re) = cache.get(pattern) {
            return Ok(re.clone());
        }
        let re = Arc::new(regex::bytes::Regex::new(pattern).map_err(|error| BadRegex {
            pattern: pattern.to_string(),
            error,
        })?);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(pattern.to_string(), re.clone());
        Ok(re)
    }
}

/// The system's resolver configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up DNS resolution from the system configuration (/etc/resolv.conf): {0}")]
pub struct SystemResolverError(#[source] hickory_resolver::net::NetError);

/// A pattern of the module that does not compile (a module that skipped validation).
#[derive(Clone, Debug, thiserror::Error)]
#[error("invalid regular expression {pattern:?}: {error}")]
pub(crate) struct BadRegex {
    pattern: String,
    error: regex::Error,
}

/// Why a host has no address to probe; each message starts with `resolve`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub(crate) enum ResolveError {
    #[error("resolve: empty host name")]
    EmptyHost,
    #[error("resolve {host}: not an ip{family} address")]
    WrongFamily { host: String, family: u8 },
    #[error("resolve {host}: no ip{family} address")]
    NoAddressOfFamily { host: String, family: u8 },
    #[error("resolve {host}: no address")]
    NoAddress { host: String },
    /// The lookup itself failed (the resolver unreachable, a timeout, SERVFAIL).
    #[error("resolve {host}: {reason}")]
    Lookup { host: String, reason: String },
}

/// What one probe found.
#[derive(Debug)]
pub struct ProbeOutcome {
    pub success: bool,
    pub duration: Duration,
    /// Every sample, `probe_success` and `probe_duration_seconds` included.
    pub samples: Vec<Sample>,
    /// Why the probe failed, in a few words, when it did.
    pub failure: Option<String>,
    /// The class of that failure, also reported as `probe_failure_info{reason}`.
    pub failure_reason: Option<Reason>,
    /// What the probe saw, when it failed.
    pub trace: Option<Trace>,
    /// The step-by-step log, when the probe ran with it on ([`run_logged`]).
    pub log: ProbeLog,
}

/// Runs one probe of `target` with `module`, bounded by `timeout`.
pub async fn run(
    ctx: &ProbeContext,
    target: &str,
    module: &Module,
    timeout: Duration,
) -> ProbeOutcome {
    run_with_policy(ctx, None, target, module, timeout).await
}

/// [`run`], asking `policy` before every connection the probe makes.
pub async fn run_with_policy(
    ctx: &ProbeContext,
    policy: Option<&dyn ConnectPolicy>,
    target: &str,
    module: &Module,
    timeout: Duration,
) -> ProbeOutcome {
    run_logged(ctx, policy, target, module, timeout, ProbeLog::default()).await
}

/// [`run_with_policy`] writing the probe's step-by-step log to `log` (when it is on),
/// from "Beginning probe" to "Probe succeeded" or "Probe failed".
pub async fn run_logged(
    ctx: &ProbeContext,
    policy: Option<&dyn ConnectPolicy>,
    target: &str,
    module: &Module,
    timeout: Duration,
    mut log: ProbeLog,
) -> ProbeOutcome {
    crate::probe_log!(
        log,
        Info,
        "Beginning probe",
        probe = module.prober.as_str(),
        timeout_seconds = timeout.as_secs_f64()
    );
    let env = Env {
        ctx,
        policy,
        pinned: None,
    };
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut samples, result) = match &module.per_address {
        None => probe_once(&env, target, module, deadline, timeout, log).await,
        Some(per) => per_address::probe(&env, target, module, per, deadline, timeout, log).await,
    };
    let duration = started.elapsed();
    let success = result.is_ok();
    samples.set("probe_success", if success { 1.0 } else { 0.0 });
    samples.set("probe_duration_seconds", duration.as_secs_f64());
    let (failure, failure_reason) = match result {
        Ok(()) => {
            crate::probe_log!(
                samples.log,
                Info,
                "Probe succeeded",
                duration_seconds = duration.as_secs_f64()
            );
            (None, None)
        }
        Err(f) => {
            crate::probe_log!(
                samples.log,
                Error,
                "Probe failed",
                reason = f.reason.as_str(),
                err = f.message,
                duration_seconds = duration.as_secs_f64()
            );
            samples.gauge_with("probe_failure_info", &[("reason", f.reason.as_str())], 1.0);
            (Some(f.message), Some(f.reason))
        }
    };
    ProbeOutcome {
        success,
        duration,
        samples: samples.items,
        failure,
        failure_reason,
        trace: (!success && !samples.trace.is_empty()).then_some(samples.trace),
        log: samples.log,
    }
}

/// One run of the module's prober, cut at `deadline` (`timeout` after the probe
/// started); what it measured before a timeout is kept, and the timeout is classified
/// by the stage it cut short.
pub(crate) async fn probe_once(
    env: &Env<'_>,
    target: &str,
    module: &Module,
    deadline: tokio::time::Instant,
    timeout: Duration,
    log: ProbeLog,
) -> (Samples, Result<(), Failure>) {
    let mut samples = Samples::with_log(log);
    let probe = async {
        match module.prober {
            Prober::Http => http::probe(env, target, module, &mut samples).await,
            Prober::Tcp => tcp::probe(env, target, module, &mut samples).await,
            Prober::Dns => dns::probe(env, target, module, &mut samples).await,
            Prober::Icmp => icmp::probe(env, target, module, &mut samples).await,
            Prober::Grpc => grpc::probe(env, target, module, &mut samples).await,
            Prober::Unix => unix::probe(env, target, module, &mut samples).await,
            Prober::Websocket => websocket::probe(env, target, module, &mut samples).await,
            Prober::Multihttp => {
                multihttp::probe(env, target, module, deadline, timeout, &mut samples).await
            }
        }
    };
    let result = match tokio::time::timeout_at(deadline, probe).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(&mut samples, timeout)),
    };
    (samples, result)
}

/// The failure of a probe whose deadline passed, noted in its trace.
pub(crate) fn timed_out(samples: &mut Samples, after: Duration) -> Failure {
    let (reason, during) = match samples.stage {
        Stage::Resolve => (Reason::Dns, "resolve"),
        Stage::Connect => (Reason::ConnectTimeout, "connect"),
        Stage::Start => (Reason::Timeout, "start"),
        Stage::Exchange => (Reason::Timeout, "exchange"),
    };
    samples.note(Step::Timeout {
        during: during.to_string(),
    });
    Failure::new(
        reason,
        format!(
            "timed out after {}",
            sonde_proto::config::PromDuration(after)
        ),
    )
}

/// Resolves a target host the way blackbox_exporter's `chooseProtocol` does and records
/// `probe_dns_lookup_time_seconds`, `probe_ip_protocol` and `probe_ip_addr_hash`, and
/// the answer in the trace. When the probe is pinned to one of the target's addresses
/// (`per_address`), that address is used without a lookup.
///
/// The samples are written before the lookup starts, so that a probe that times out
/// while resolving still reports them (the lookup time is then left at 0).
pub(crate) async fn resolve_target(
    env: &Env<'_>,
    host: &str,
    preferred: IpProtocol,
    fallback: bool,
    out: &mut Samples,
) -> Result<(IpAddr, Duration), Failure> {
    out.set("probe_ip_protocol", 0.0);
    out.set("probe_ip_addr_hash", 0.0);
    out.set("probe_dns_lookup_time_seconds", 0.0);
    let ip = match env.pinned {
        Some(ip) => ip,
        None => {
            out.stage = Stage::Resolve;
            if bare_host(host).parse::<IpAddr>().is_err() {
                crate::probe_log!(
                    out.log,
                    Debug,
                    "Resolving target address",
                    target = host,
                    ip_protocol = if preferred == IpProtocol::Ip4 {
                        "ip4"
                    } else {
                        "ip6"
                    }
                );
            }
            let started = Instant::now();
            let resolved = resolve_all(env, host, preferred, fallback).await;
            let lookup = started.elapsed();
            out.set("probe_dns_lookup_time_seconds", lookup.as_secs_f64());
            out.stage = Stage::Start;
            record_answer(out, host, &resolved);
            let ip = resolved.because(Reason::Dns)?[0];
            out.set("probe_ip_protocol", f64::from(ip_version(ip)));
            out.set("probe_ip_addr_hash", f64::from(ip_hash(ip)));
            return Ok((ip, lookup));
        }
    };
    crate::probe_log!(out.log, Debug, "Using the pinned address", ip = ip);
    out.set("probe_ip_protocol", f64::from(ip_version(ip)));
    out.set("probe_ip_addr_hash", f64::from(ip_hash(ip)));
    Ok((ip, Duration::ZERO))
}

/// Notes a lookup's answer in the trace; an IP literal was not looked up.
pub(crate) fn record_answer(
    out: &mut Samples,
    host: &str,
    resolved: &Result<Vec<IpAddr>, ResolveError>,
) {
    if bare_host(host).parse::<IpAddr>().is_ok() {
        crate::probe_log!(
            out.log,
            Debug,
            "Target is an IP address, not resolved",
            ip = host
        );
        return;
    }
    out.note(Step::Dns {
        name: bare_host(host).to_string(),
        addresses: resolved.clone().unwrap_or_default(),
        error: resolved.as_ref().err().map(ToString::to_string),
    });
}

fn bare_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Picks one address of `host`: the first of the preferred family, else (when
/// `fallback`) the first of the other. An IP literal is used as it is, without a lookup.
pub(crate) async fn choose_ip(
    ctx: &ProbeContext,
    host: &str,
    preferred: IpProtocol,
    fallback: bool,
) -> Result<IpAddr, ResolveError> {
    resolve_all(ctx, host, preferred, fallback)
        .await
        .map(|all| all[0])
}

/// Every address of `host` a probe may use, never empty: those of the preferred family
/// first, then (when `fallback`) those of the other, at most
/// [`sonde_proto::trace::MAX_ANSWER_ADDRESSES`] of each.
pub(crate) async fn resolve_all(
    ctx: &ProbeContext,
    host: &str,
    preferred: IpProtocol,
    fallback: bool,
) -> Result<Vec<IpAddr>, ResolveError> {
    let want = match preferred {
        IpProtocol::Ip4 => 4,
        IpProtocol::Ip6 => 6,
    };
    let host = bare_host(host);
    if host.is_empty() {
        return Err(ResolveError::EmptyHost);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        if fallback || ip_version(ip) == want {
            return Ok(vec![ip]);
        }
        return Err(ResolveError::WrongFamily {
            host: host.to_string(),
            family: want,
        });
    }
    if !fallback {
        let found = lookup_family(ctx, host, want).await?;
        if found.is_empty() {
            return Err(ResolveError::NoAddressOfFamily {
                host: host.to_string(),
                family: want,
            });
        }
        return Ok(found);
    }
    // Both families at once, as Go's LookupIPAddr does, so the fallback costs no extra
    // round trip.
    let other = if want == 4 { 6 } else { 4 };
    let (first, second) = tokio::join!(
        lookup_family(ctx, host, want),
        lookup_family(ctx, host, other)
    );
    match (first, second) {
        (Ok(mut a), Ok(b)) if !(a.is_empty() && b.is_empty()) => {
            a.extend(b);
            Ok(a)
        }
        (Ok(a), _) | (_, Ok(a)) if !a.is_empty() => Ok(a),
        (Err(e), _) => Err(e),
        (_, Err(e)) => Err(e),
        (Ok(_), Ok(_)) => Err(ResolveError::NoAddress {
            host: host.to_string(),
        }),
    }
}

/// The addresses of one family, in the answer's order; empty when the name has no
/// such records.
async fn lookup_family(
    ctx: &ProbeContext,
    host: &str,
    family: u8,
) -> Result<Vec<IpAddr>, ResolveError> {
    use hickory_resolver::proto::rr::{RData, RecordType};
    let record_type = if family == 4 {
        RecordType::A
    } else {
        RecordType::AAAA
    };
    match ctx.resolver.lookup(host, record_type).await {
        Ok(lookup) => Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) if family == 4 => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) if family == 6 => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .take(sonde_proto::trace::MAX_ANSWER_ADDRESSES)
            .collect()),
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(Vec::new()),
        Err(e) => Err(ResolveError::Lookup {
            host: host.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// 4 or 6; an IPv4-mapped IPv6 address counts as IPv4, as Go's `To4()` has it.
pub(crate) fn ip_version(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 4,
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => 4,
        IpAddr::V6(_) => 6,
    }
}

/// blackbox_exporter's `probe_ip_addr_hash`: FNV-1a (32 bit) over the address bytes,
/// 4 of them for IPv4 (mapped addresses included) and 16 for IPv6.
pub(crate) fn ip_hash(ip: IpAddr) -> u32 {
    let v4;
    let v6;
    let bytes: &[u8] = match ip {
        IpAddr::V4(a) => {
            v4 = a.octets();
            &v4
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => {
                v4 = m.octets();
                &v4
            }
            None => {
                v6 = a.octets();
                &v6
            }
        },
    };
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// An I/O error in a few words ("connection refused"), for failure reasons.
pub(crate) fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".to_string(),
        ConnectionReset => "connection reset by peer".to_string(),
        ConnectionAborted => "connection aborted".to_string(),
        TimedOut => "timed out".to_string(),
        UnexpectedEof => "connection closed by peer".to_string(),
        AddrNotAvailable => "address not available".to_string(),
        HostUnreachable => "host unreachable".to_string(),
        NetworkUnreachable => "network unreachable".to_string(),
        _ => e.to_string(),
    }
}

/// A `host:port` target that does not split.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("target {target:?}: {why}, expected host:port")]
pub(crate) struct HostPortError {
    target: String,
    why: &'static str,
}

impl HostPortError {
    pub(crate) fn new(target: &str, why: &'static str) -> Self {
        Self {
            target: target.to_string(),
            why,
        }
    }
}

/// Splits `host:port` as Go's `net.SplitHostPort` does: `[v6]:port` for IPv6.
pub(crate) fn split_host_port(target: &str) -> Result<(&str, &str), HostPortError> {
    let bad = |why: &'static str| HostPortError {
        target: target.to_string(),
        why,
    };
    if let Some(rest) = target.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
        let port = after.strip_prefix(':').ok_or_else(|| bad("missing port"))?;
        return Ok((host, port));
    }
    let (host, port) = target.rsplit_once(':').ok_or_else(|| bad("missing port"))?;
    if host.contains(':') {
        return Err(bad(
            "too many colons (write an IPv6 address as [addr]:port)",
        ));
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn test_ctx() -> ProbeContext {
        ProbeContext::from_system().unwrap()
    }

    #[test]
    fn ip_hash_is_fnv32a_over_address_bytes() {
        // Reference values: Go's fnv.New32a() over ip.To4() / ip.To16().
        assert_eq!(
            ip_hash(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))),
            fnv(&[127, 0, 0, 1])
        );
        assert_eq!(fnv(&[]), 0x811c9dc5);
        assert_eq!(fnv(b"a"), 0xe40c292c);
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(ip_hash(mapped), fnv(&[192, 0, 2, 1]));
        assert_eq!(ip_version(mapped), 4);
        assert_eq!(
            ip_hash(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            fnv(&Ipv6Addr::LOCALHOST.octets())
        );
    }

    fn fnv(bytes: &[u8]) -> u32 {
        let mut h: u32 = 2166136261;
        for b in bytes {
            h ^= u32::from(*b);
            h = h.wrapping_mul(16777619);
        }
        h
    }

    #[test]
    fn host_port_split_like_go() {
        assert_eq!(split_host_port("a.example:80"), Ok(("a.example", "80")));
        assert_eq!(split_host_port("[::1]:53"), Ok(("::1", "53")));
        assert!(split_host_port("::1:53").is_err());
        assert!(split_host_port("a.example").is_err());
        assert!(split_host_port("[::1]").is_err());
    }

    #[tokio::test]
    async fn ip_literals_honour_the_protocol_preference() {
        let ctx = test_ctx();
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            choose_ip(&ctx, "127.0.0.1", IpProtocol::Ip6, true).await,
            Ok(v4)
        );
        assert!(
            choose_ip(&ctx, "127.0.0.1", IpProtocol::Ip6, false)
                .await
                .is_err()
        );
        assert_eq!(
            choose_ip(&ctx, "[::1]", IpProtocol::Ip6, false).await,
            Ok("::1".parse().unwrap())
        );
        let mut out = Samples::default();
        let env = Env {
            ctx: &ctx,
            policy: None,
            pinned: None,
        };
        let (ip, _) = resolve_target(&env, "127.0.0.1", IpProtocol::Ip4, false, &mut out)
            .await
            .unwrap();
        assert_eq!(ip, v4);
        assert_eq!(value(&out, "probe_ip_protocol"), Some(4.0));
        assert_eq!(
            value(&out, "probe_ip_addr_hash"),
            Some(f64::from(ip_hash(v4)))
        );
        assert!(value(&out, "probe_dns_lookup_time_seconds").unwrap() < 0.01);
    }

    #[tokio::test]
    async fn localhost_resolves_without_the_network() {
        let ctx = test_ctx();
        let ip = choose_ip(&ctx, "localhost", IpProtocol::Ip4, false)
            .await
            .unwrap();
        assert!(ip.is_loopback() && ip.is_ipv4(), "{ip}");
    }

    #[tokio::test]
    async fn probes_are_send() {
        fn send<T: Send>(_: &T) {}
        let ctx = test_ctx();
        let m: Module = serde_json::from_str(r#"{"prober":"http"}"#).unwrap();
        let f = run(&ctx, "x", &m, Duration::from_secs(1));
        send(&f);
    }

    pub(crate) fn value(out: &Samples, name: &str) -> Option<f64> {
        out.items
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value)
    }
}
