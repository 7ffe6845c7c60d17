//! The agent's HTTP endpoints: `/metrics`, `/-/healthy`, `/-/ready`, and the
//! blackbox_exporter-compatible `/probe` when `probe_endpoint.enabled` is set.

use crate::config::AgentConfig;
use crate::probe;
use crate::runtime::AgentRuntime;
use axum::Router;
use axum::extract::{FromRef, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sonde_proto::config::{Module, Prober, split_port};
use sonde_proto::exposition::{Family, Format, MetricType, render, write_header, write_sample};
use std::borrow::Cow;
use std::net::IpAddr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn router(agent: Arc<AgentRuntime>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/-/healthy", get(|| async { "Healthy.\n" }))
        .route("/-/ready", get(ready))
        .route("/probe", get(probe_handler))
        .with_state(WebState {
            agent,
            allowlists: Arc::default(),
        })
}

/// Serves the endpoints on `listener` from a thread of their own (`sonde-web`), on a
/// current-thread runtime, until `shutdown` fires (or its sender is dropped); then shuts
/// down gracefully ([`sonde_cli::http_server::serve`]).
///
/// Why a thread of its own: a `/probe` is a few system calls and a page of text on a
/// keep-alive connection. On one thread, reading the request, probing and answering all
/// run where the connection's events arrive, one `epoll_wait` collects the events of
/// many connections, and no idle worker is woken to steal work: the whole `/probe`
/// request path costs less CPU than on the multi-threaded runtime (docs/benchmarks.md,
/// "`/probe` against the floor"). The uplinks stay on the main runtime and the
/// scheduled checks on their probing threads, so neither waits behind `/probe`.
pub fn serve_on_own_thread(
    listener: std::net::TcpListener,
    agent: Arc<AgentRuntime>,
    limits: sonde_cli::http_server::Limits,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered with the thread's own runtime, the one that will poll it.
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    std::thread::Builder::new()
        .name("sonde-web".into())
        .spawn(move || {
            runtime.block_on(sonde_cli::http_server::serve(
                listener,
                router(agent),
                limits,
                async {
                    let _ = shutdown.await;
                },
            ));
        })
}

/// What the handlers share: the agent, and what `/probe` keeps from one request to the
/// next.
#[derive(Clone)]
struct WebState {
    agent: Arc<AgentRuntime>,
    allowlists: Arc<AllowlistCache>,
}

impl FromRef<WebState> for Arc<AgentRuntime> {
    fn from_ref(state: &WebState) -> Self {
        state.agent.clone()
    }
}

/// `probe_endpoint.allowed_targets` of the running config, parsed once per config
/// rather than once per request: a glob pattern compiles to a regex, which costs more
/// than the TCP probe it guards.
#[derive(Default)]
struct AllowlistCache(Mutex<Option<(Arc<AgentConfig>, ParsedAllowlist)>>);

/// `probe_endpoint.allowed_targets` parsed, or why it does not parse.
type ParsedAllowlist = Arc<Result<Allowlist, BadPattern>>;

impl AllowlistCache {
    fn get(&self, config: &Arc<AgentConfig>) -> ParsedAllowlist {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((parsed_from, allowlist)) = &*cached
            && Arc::ptr_eq(parsed_from, config)
        {
            return allowlist.clone();
        }
        let allowlist = Arc::new(Allowlist::parse(&config.probe_endpoint.allowed_targets));
        *cached = Some((config.clone(), allowlist.clone()));
        allowlist
    }
}

async fn index(State(agent): State<Arc<AgentRuntime>>) -> impl IntoResponse {
    let config = agent.config();
    let mut text = format!(
        "sonde-agent {} (id {})\n\nChecks:\n",
        env!("CARGO_PKG_VERSION"),
        config.id
    );
    for (source, check) in agent.scheduler.checks() {
        text.push_str(&format!(
            "  {:?}\tjob={}\tinstance={}\tmodule={}\tinterval={:?}\n",
            source, check.job, check.instance, check.module_name, check.interval
        ));
    }
    text.push_str("\nEndpoints: /metrics /probe /-/healthy /-/ready\n");
    text
}

/// 200 "Ready." while [`AgentRuntime::readiness`] says so, else 503 with the reason.
async fn ready(State(agent): State<Arc<AgentRuntime>>) -> Response {
    match agent.readiness() {
        Ok(()) => "Ready.\n".into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(agent): State<Arc<AgentRuntime>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let mut families = agent.families();
    let reload = &sonde_cli::reload::RELOAD;
    families.push(
        Family::gauge(
            "sonde_config_last_reload_successful",
            "Whether the last configuration reload attempt was successful.",
        )
        .with(Vec::new(), f64::from(u8::from(reload.successful()))),
    );
    families.push(
        Family::gauge(
            "sonde_config_last_reload_success_timestamp_seconds",
            "Timestamp of the last successful configuration reload (or of the start).",
        )
        .with(Vec::new(), reload.last_success_seconds()),
    );
    (
        [(header::CONTENT_TYPE, format.content_type())],
        render(&families, format),
    )
        .into_response()
}

/// blackbox_exporter subtracts this from the scrape timeout so the answer arrives in time.
const SCRAPE_TIMEOUT_OFFSET: Duration = Duration::from_millis(500);
/// What blackbox_exporter uses when the scraper sends no timeout header (then capped at
/// `probe_endpoint.max_timeout`).
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(120);
/// The shortest probe `/probe` runs, whatever it is asked for.
const MIN_PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// The header Prometheus sends with its scrape timeout, in seconds.
const SCRAPE_TIMEOUT_HEADER: &str = "X-Prometheus-Scrape-Timeout-Seconds";

/// A `/probe` request being served, counted in `AgentRuntime::probes_in_flight` until
/// dropped.
struct ProbeSlot<'a>(&'a AtomicUsize);

impl<'a> ProbeSlot<'a> {
    /// A slot when fewer than `max` probes run, else `None`.
    fn take(in_flight: &'a AtomicUsize, max: usize) -> Option<Self> {
        in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(in_flight))
    }
}

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The query parameters `/probe` reads. A parameter given twice counts with its last
/// value.
#[derive(Default)]
struct ProbeParams<'a> {
    target: Option<Cow<'a, str>>,
    module: Option<Cow<'a, str>>,
    debug: Option<Cow<'a, str>>,
}

impl<'a> ProbeParams<'a> {
    fn parse(query: &'a str) -> Self {
        let mut params = Self::default();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "target" => params.target = Some(value),
                "module" => params.module = Some(value),
                "debug" => params.debug = Some(value),
                _ => {}
            }
        }
        params
    }
}

async fn probe_handler(State(web): State<WebState>, request: Request) -> Response {
    // The request's parts are read in place: extracting the query and the headers would
    // copy them.
    let (request, _) = request.into_parts();
    let headers = &request.headers;
    let agent = &web.agent;
    let params = ProbeParams::parse(request.uri.query().unwrap_or(""));
    let config = agent.config();
    let settings = &config.probe_endpoint;
    if !settings.enabled {
        return (
            StatusCode::NOT_FOUND,
            "/probe is disabled; set probe_endpoint.enabled: true (with allowed_targets) in the agent config\n",
        )
            .into_response();
    }
    let module_name = params.module.as_deref().unwrap_or("http_2xx");
    let Some(module) = config.modules.get(module_name) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("Unknown module {module_name:?}\n"),
        )
            .into_response();
    };
    if let Some(allowed) = &settings.allowed_modules
        && !allowed.iter().any(|m| m == module_name)
    {
        return (
            StatusCode::FORBIDDEN,
            format!("module {module_name:?} is not in probe_endpoint.allowed_modules\n"),
        )
            .into_response();
    }
    let Some(target) = params.target.as_deref().filter(|t| !t.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "Target parameter is missing\n").into_response();
    };
    let allowlists = web.allowlists.get(&config);
    let allowlist = match &*allowlists {
        Ok(a) => a,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("probe_endpoint.allowed_targets: {e}\n"),
            )
                .into_response();
        }
    };
    if let Err(reason) = allowlist.allows_target(module, target) {
        return (
            StatusCode::FORBIDDEN,
            format!("target {target:?} refused: {reason}\n"),
        )
            .into_response();
    }
    let Some(_slot) = ProbeSlot::take(&agent.probes_in_flight, settings.max_concurrent_probes)
    else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many probes running: /probe runs at most {} at once (probe_endpoint.max_concurrent_probes); try again later\n",
                settings.max_concurrent_probes
            ),
        )
            .into_response();
    };
    let timeout = probe_timeout(
        headers.get(SCRAPE_TIMEOUT_HEADER),
        module,
        settings.max_timeout.0,
    );
    let outcome = probe::run_with_policy(
        &agent.probe_context,
        Some(allowlist),
        target,
        module,
        timeout,
    )
    .await;
    if outcome.failure_reason == Some(probe::Reason::RefusedByPolicy) {
        // A redirect or a DNS answer led the probe to an address the allowlist refuses;
        // nothing was sent there.
        return (
            StatusCode::FORBIDDEN,
            format!(
                "target {target:?} refused: {}\n",
                outcome.failure.as_deref().unwrap_or("refused")
            ),
        )
            .into_response();
    }
    let debug = params.debug.as_deref() == Some("true");
    let body = exposition(&outcome.samples);
    if debug {
        let log = match &outcome.failure {
            Some(f) => format!("Probe failed: {f}\n"),
            None => "Probe succeeded\n".to_string(),
        };
        return format!(
            "Logs for the probe:\n{log}\n\nMetrics that would have been returned:\n{body}"
        )
        .into_response();
    }
    (
        [(header::CONTENT_TYPE, Format::PrometheusText.content_type())],
        body,
    )
        .into_response()
}

/// The samples of a probe in the Prometheus text format, as blackbox_exporter's registry
/// writes them: one family per metric name, in the order the names first appear, each a
/// gauge with blackbox_exporter's HELP text.
fn exposition(samples: &[probe::Sample]) -> String {
    // A family's HELP and TYPE lines and a sample take some 150 bytes.
    let mut out = String::with_capacity(160 * samples.len());
    for (i, first) in samples.iter().enumerate() {
        if samples[..i].iter().any(|s| s.name == first.name) {
            continue;
        }
        write_header(
            &mut out,
            first.name,
            help(first.name),
            MetricType::Gauge,
            Format::PrometheusText,
        );
        for sample in samples[i..].iter().filter(|s| s.name == first.name) {
            write_sample(
                &mut out,
                sample.name,
                sample.labels.iter().map(|(k, v)| (*k, v.as_str())),
                sample.value,
            );
        }
    }
    out
}

/// HELP texts for the probe metrics, worded as blackbox_exporter words them.
fn help(name: &str) -> &'static str {
    sonde_proto::help::series_help(name).unwrap_or("Probe metric")
}

/// How long a `/probe` may take: the scraper's timeout (`header`, in seconds) less
/// [`SCRAPE_TIMEOUT_OFFSET`], or [`DEFAULT_PROBE_TIMEOUT`] without a usable header; no
/// longer than the module's own timeout (when set) and `max`, no shorter than
/// [`MIN_PROBE_TIMEOUT`].
///
/// The header is the caller's: a value that is not UTF-8, not a number, not finite,
/// not positive or beyond any `Duration` counts as absent or as `max`, never as a panic.
fn probe_timeout(header: Option<&HeaderValue>, module: &Module, max: Duration) -> Duration {
    let scrape = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .unwrap_or(Duration::MAX)
                .saturating_sub(SCRAPE_TIMEOUT_OFFSET)
        });
    let mut timeout = scrape.unwrap_or(DEFAULT_PROBE_TIMEOUT).min(max);
    if !module.timeout.0.is_zero() {
        timeout = timeout.min(module.timeout.0);
    }
    timeout.max(MIN_PROBE_TIMEOUT)
}

/// `probe_endpoint.allowed_targets`, parsed: what `/probe` may reach. `/probe` is never an
/// open proxy.
///
/// Each pattern is `HOST:PORT`:
/// - `HOST` is a glob over the host name or IP literal as the target writes it
///   (`*.internal`, `shop-?.example`, `127.0.0.1`), or a CIDR network that matches IP
///   literals inside it (`10.0.0.0/8`, `[fd00::/8]` for IPv6, in brackets);
/// - `PORT` is a glob over the port number (`443`, `*`, `80*`); a pattern without
///   `:PORT` (`*`, `*.internal`) matches any port.
///
/// Link-local and cloud metadata addresses ([`SPECIAL_NETS`], and every IPv6 form
/// that embeds one of the IPv4 ones: see [`embedded_ipv4`]) are refused unless a
/// pattern names them explicitly: an IP or CIDR lying wholly inside those ranges
/// (`169.254.169.254:80`, `169.254.0.0/16:*`, `[64:ff9b::a9fe:a9fe]:80`). A glob or a
/// wider CIDR (`*`, `0.0.0.0/0:*`) never admits them.
///
/// The same checks run at connect time on every address a probe is about to connect to
/// (each redirect hop, each resolved name), through [`probe::ConnectPolicy`].
pub struct Allowlist {
    patterns: Vec<Pattern>,
}

/// Why a target or an address is not allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAllowed {
    #[error("cannot tell the host and port of {target:?} for the {prober} prober")]
    NoHostPort {
        target: String,
        prober: &'static str,
    },
    /// `shown` is the host and port as a user writes them (IPv6 in brackets).
    #[error("{shown} matches no pattern of probe_endpoint.allowed_targets")]
    NoPattern { shown: String },
    #[error(
        "{ip} is a link-local or cloud metadata address; list it in probe_endpoint.allowed_targets explicitly (like {ip}:{port}) to allow it"
    )]
    Metadata { ip: IpAddr, port: u16 },
}

/// A pattern of `probe_endpoint.allowed_targets` that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "pattern {pattern:?}: {why} (expected HOST:PORT, like *.internal:443, 10.0.0.0/8:* or [fd00::/8]:53)"
)]
pub struct BadPattern {
    pattern: String,
    why: String,
}

struct Pattern {
    host: HostPattern,
    port: Option<globset::GlobMatcher>,
}

enum HostPattern {
    Glob(globset::GlobMatcher),
    Net(IpAddr, u8),
}

impl Allowlist {
    pub fn parse(patterns: &[String]) -> Result<Self, BadPattern> {
        patterns
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map(|patterns| Self { patterns })
    }

    /// The up-front check of a `/probe` request: the target's own host and port.
    pub fn allows_target(&self, module: &Module, target: &str) -> Result<(), NotAllowed> {
        let (host, port) = host_port(module, target).ok_or_else(|| NotAllowed::NoHostPort {
            target: target.to_string(),
            prober: module.prober.as_str(),
        })?;
        // The metadata check first: its reason is the one worth reading.
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.addr_allowed(ip, port)?;
        }
        self.host_allowed(&host, port)
    }

    fn host_allowed(&self, host: &str, port: u16) -> Result<(), NotAllowed> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        // Made only when a pattern needs them: most allowlists are addresses and `*`.
        let lower = std::cell::OnceCell::new();
        let port_text = std::cell::OnceCell::new();
        let ip = host.parse::<IpAddr>().ok().map(canonical);
        let found = self.patterns.iter().any(|p| {
            let host_ok = match &p.host {
                HostPattern::Glob(g) => g.is_match(lower.get_or_init(|| host.to_ascii_lowercase())),
                HostPattern::Net(net, prefix) => ip.is_some_and(|ip| in_net(ip, *net, *prefix)),
            };
            host_ok
                && p.port
                    .as_ref()
                    .is_none_or(|g| g.is_match(port_text.get_or_init(|| port.to_string())))
        });
        if found {
            Ok(())
        } else {
            let shown = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            Err(NotAllowed::NoPattern { shown })
        }
    }

    fn addr_allowed(&self, ip: IpAddr, port: u16) -> Result<(), NotAllowed> {
        let ip = canonical(ip);
        if !is_metadata_address(ip) {
            return Ok(());
        }
        let port_text = port.to_string();
        let explicit = self.patterns.iter().any(|p| match &p.host {
            HostPattern::Net(net, prefix) => {
                in_net(ip, *net, *prefix)
                    && net_is_special(*net, *prefix)
                    && p.port.as_ref().is_none_or(|g| g.is_match(&port_text))
            }
            HostPattern::Glob(_) => false,
        });
        if explicit {
            Ok(())
        } else {
            Err(NotAllowed::Metadata { ip, port })
        }
    }
}

impl probe::ConnectPolicy for Allowlist {
    fn check_host(&self, host: &str, port: u16) -> Result<(), probe::Refusal> {
        self.host_allowed(host, port)
            .map_err(|e| probe::Refusal(e.to_string()))
    }

    fn check_addr(&self, addr: std::net::SocketAddr) -> Result<(), probe::Refusal> {
        self.addr_allowed(addr.ip(), addr.port())
            .map_err(|e| probe::Refusal(e.to_string()))
    }
}

impl Pattern {
    fn parse(raw: &str) -> Result<Self, BadPattern> {
        let bad = |why: &str| BadPattern {
            pattern: raw.to_string(),
            why: why.to_string(),
        };
        let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("text after ']'"))?,
                    ),
                ),
            }
        } else {
            match raw.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => return Err(bad("write an IPv6 address in brackets")),
                None => (raw, None),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let glob = |text: &str| {
            globset::GlobBuilder::new(text)
                .literal_separator(false)
                .build()
                .map(|g| g.compile_matcher())
                .map_err(|e| bad(&e.to_string()))
        };
        let host = if let Some((addr, prefix)) = host.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| bad("not a CIDR network"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad("bad CIDR prefix length"))?;
            HostPattern::Net(addr, prefix)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            HostPattern::Net(ip, max)
        } else {
            HostPattern::Glob(glob(&host.to_ascii_lowercase())?)
        };
        let port = match port {
            None | Some("*") => None,
            Some("") => return Err(bad("empty port")),
            Some(p) => Some(glob(p)?),
        };
        Ok(Self { host, port })
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
        let full = usize::from(bits / 8);
        let rest = bits % 8;
        a[..full] == b[..full] && (rest == 0 || (a[full] ^ b[full]) & (0xffu8 << (8 - rest)) == 0)
    }
    match (canonical(ip), canonical(net)) {
        (IpAddr::V4(a), IpAddr::V4(n)) => prefix_eq(&a.octets(), &n.octets(), prefix.min(32)),
        (IpAddr::V6(a), IpAddr::V6(n)) => prefix_eq(&a.octets(), &n.octets(), prefix.min(128)),
        _ => false,
    }
}

/// The ranges refused unless listed explicitly: link-local, and the cloud metadata
/// and platform services that sit outside it.
pub const SPECIAL_NETS: [(&str, u8); 7] = [
    // IPv4 link-local: the metadata service of AWS, GCP, Azure, OpenStack,
    // DigitalOcean, Hetzner, Oracle, IBM (169.254.169.254), AWS ECS task metadata
    // (169.254.170.2), Tencent Cloud (169.254.0.23), ...
    ("169.254.0.0", 16),
    // Alibaba Cloud's metadata service.
    ("100.100.100.200", 32),
    // Oracle Cloud's older metadata address.
    ("192.0.0.192", 32),
    // Azure's platform address (WireServer, the host's DNS and health probes).
    ("168.63.129.16", 32),
    // IPv6 link-local, OpenStack's metadata service (fe80::a9fe:a9fe) among them.
    ("fe80::", 10),
    // AWS's metadata service over IPv6.
    ("fd00:ec2::254", 128),
    // Google Cloud's metadata service over IPv6.
    ("fd20:ce::254", 128),
];

/// [`SPECIAL_NETS`] parsed, once for the process: every `/probe` checks its addresses
/// against them.
fn special_nets() -> impl Iterator<Item = (IpAddr, u8)> {
    static PARSED: std::sync::LazyLock<Vec<(IpAddr, u8)>> = std::sync::LazyLock::new(|| {
        SPECIAL_NETS
            .iter()
            .filter_map(|(a, p)| a.parse::<IpAddr>().ok().map(|a| (a, *p)))
            .collect()
    });
    PARSED.iter().copied()
}

/// The IPv4 addresses an IPv6 address may stand for, so that an IPv4 metadata address
/// cannot be reached through one of its IPv6 spellings: IPv4-mapped (`::ffff:a.b.c.d`,
/// also turned into IPv4 before any check), IPv4-compatible (`::a.b.c.d`), NAT64 through the
/// well-known prefix (`64:ff9b::/96`) and the local-use prefix (`64:ff9b:1::/48`, at
/// each RFC 6052 position a sub-prefix of it may use), 6to4 (`2002:AABB:CCDD::/48`),
/// and Teredo (`2001:0::/32`: the server address, and the client's, inverted).
pub fn embedded_ipv4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let o = ip.octets();
    let v4 = |a: usize, b: usize, c: usize, d: usize| Ipv4Addr::new(o[a], o[b], o[c], o[d]);
    let seg = ip.segments();
    let mut out = Vec::new();
    if seg[..5] == [0; 5] && (seg[5] == 0 || seg[5] == 0xffff) {
        // IPv4-compatible and IPv4-mapped. `::` and `::1` are not IPv4 addresses but
        // embed 0.0.0.0 and 0.0.0.1, which no special range holds.
        out.push(v4(12, 13, 14, 15));
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        out.push(v4(12, 13, 14, 15));
    }
    if seg[..3] == [0x64, 0xff9b, 1] {
        out.push(v4(6, 7, 9, 10)); // /48
        out.push(v4(7, 9, 10, 11)); // /56
        out.push(v4(9, 10, 11, 12)); // /64
        out.push(v4(12, 13, 14, 15)); // /96
    }
    if seg[0] == 0x2002 {
        out.push(v4(2, 3, 4, 5));
    }
    if seg[..2] == [0x2001, 0] {
        out.push(v4(4, 5, 6, 7));
        out.push(Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]));
    }
    out
}

/// True for the addresses [`Allowlist`] refuses unless listed explicitly: inside one
/// of [`SPECIAL_NETS`], directly or through an IPv6 form that embeds one.
pub fn is_metadata_address(ip: IpAddr) -> bool {
    let in_special = |ip: IpAddr| special_nets().any(|(net, prefix)| in_net(ip, net, prefix));
    match canonical(ip) {
        IpAddr::V4(v4) => in_special(IpAddr::V4(v4)),
        IpAddr::V6(v6) => {
            in_special(IpAddr::V6(v6))
                || embedded_ipv4(v6)
                    .into_iter()
                    .any(|v4| in_special(IpAddr::V4(v4)))
        }
    }
}

/// True when the network `net/prefix` lies wholly inside one of the special ranges, or
/// is a single address that is special (an embedded form listed explicitly).
fn net_is_special(net: IpAddr, prefix: u8) -> bool {
    let single = prefix == if net.is_ipv4() { 32 } else { 128 };
    special_nets().any(|(special, sp)| prefix >= sp && in_net(net, special, sp))
        || (single && is_metadata_address(net))
}

/// The host and port a target reaches, the way each prober reads its target. An icmp
/// target has no port: it is 0, which a pattern's port `*` (or no port) matches.
fn host_port(module: &Module, target: &str) -> Option<(String, u16)> {
    match module.prober {
        Prober::Http => {
            let with_scheme = if target.contains("://") {
                target.to_string()
            } else {
                format!("http://{target}")
            };
            let uri: http::Uri = with_scheme.parse().ok()?;
            let host = uri
                .host()?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            Some((host, port))
        }
        Prober::Tcp => split_port(target).map(|(h, p)| (h.to_string(), p)),
        Prober::Dns => match split_port(target) {
            Some((h, p)) => Some((h.to_string(), p)),
            None => Some((
                target
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                53,
            )),
        },
        Prober::Icmp => Some((
            target
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            0,
        )),
        Prober::Grpc => crate::probe::grpc::host_port(target, module.grpc.tls)
            .ok()
            .map(|(host, port)| (host.to_string(), port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(prober: &str) -> Module {
        serde_json::from_str(&format!(r#"{{"prober":"{prober}"}}"#)).unwrap()
    }

    fn allowed_target(patterns: &[&str], module: &Module, target: &str) -> Result<(), NotAllowed> {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        Allowlist::parse(&patterns)
            .expect("valid patterns")
            .allows_target(module, target)
    }

    #[test]
    fn allowlist_globs() {
        let patterns = ["*.internal:443", "127.0.0.1:*"];
        let http = module("http");
        assert!(allowed_target(&patterns, &http, "https://shop.internal/").is_ok());
        assert!(allowed_target(&patterns, &http, "https://SHOP.Internal/").is_ok());
        assert!(allowed_target(&patterns, &http, "http://shop.internal/").is_err());
        assert!(allowed_target(&patterns, &http, "http://127.0.0.1:8080/x").is_ok());
        assert!(allowed_target(&patterns, &module("tcp"), "10.0.0.1:22").is_err());
        let wide = ["*"];
        let err = allowed_target(&wide, &http, "http://169.254.169.254/latest/meta-data")
            .unwrap_err()
            .to_string();
        assert!(err.contains("metadata"), "{err}");
        let explicit = ["169.254.169.254:80"];
        assert!(allowed_target(&explicit, &http, "http://169.254.169.254/").is_ok());
        assert!(allowed_target(&explicit, &http, "http://169.254.169.254:8080/").is_err());
        assert!(allowed_target(&wide, &http, "http://[fd00:ec2::254]/").is_err());
        assert!(allowed_target(&wide, &http, "http://[fe80::1]/").is_err());
        assert!(allowed_target(&wide, &http, "http://[::ffff:169.254.169.254]/").is_err());
        let err = allowed_target(&["*.internal:8?"], &module("dns"), "ns.internal")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ns.internal:53"), "{err}");
        assert!(allowed_target(&["*.internal:5?"], &module("dns"), "ns.internal").is_ok());
    }

    #[test]
    fn allowlist_cidrs() {
        let tcp = module("tcp");
        let patterns = ["10.0.0.0/8:*", "127.0.0.0/8:443", "[fd00::/8]:53"];
        assert!(allowed_target(&patterns, &tcp, "10.1.2.3:22").is_ok());
        assert!(allowed_target(&patterns, &tcp, "11.1.2.3:22").is_err());
        assert!(allowed_target(&patterns, &tcp, "127.0.0.9:443").is_ok());
        assert!(allowed_target(&patterns, &tcp, "127.0.0.9:444").is_err());
        assert!(allowed_target(&patterns, &tcp, "[fd12::1]:53").is_ok());
        assert!(allowed_target(&patterns, &tcp, "[fe12::1]:53").is_err());
        // CIDRs match IP literals, not names.
        assert!(allowed_target(&patterns, &tcp, "ten.internal:22").is_err());
        // A wide network never admits the metadata range; a network inside it does.
        let wide = ["0.0.0.0/0:*"];
        assert!(allowed_target(&wide, &tcp, "169.254.169.254:80").is_err());
        assert!(allowed_target(&wide, &tcp, "192.0.2.1:80").is_ok());
        assert!(allowed_target(&["169.254.0.0/16:*"], &tcp, "169.254.169.254:80").is_ok());
        assert!(allowed_target(&["[fd00:ec2::254]:80"], &tcp, "[fd00:ec2::254]:80").is_ok());
        for bad in [
            "10.0.0.0/33:*",
            "10.0.0.0/x:1",
            ":80",
            "[::1:80",
            "fd00::1:53",
            "a:",
        ] {
            let patterns = vec![bad.to_string()];
            assert!(Allowlist::parse(&patterns).is_err(), "{bad}");
        }
    }

    /// A DNS server answering every A query with 169.254.169.254.
    async fn metadata_dns() -> std::net::SocketAddr {
        use hickory_proto::op::{Message, MessageType, OpCode};
        use hickory_proto::rr::{RData, Record, rdata::A};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                reply.metadata.recursion_desired = q.metadata.recursion_desired;
                reply.metadata.recursion_available = true;
                if let Some(question) = q.queries.first() {
                    reply.add_query(question.clone());
                    if question.query_type() == hickory_proto::rr::RecordType::A {
                        reply.add_answer(Record::from_rdata(
                            question.name().clone(),
                            60,
                            RData::A(A::new(169, 254, 169, 254)),
                        ));
                    }
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_dns_answer_pointing_at_the_metadata_service_is_refused() {
        use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
        use hickory_resolver::net::runtime::TokioRuntimeProvider;
        let dns = metadata_dns().await;
        let mut conn = ConnectionConfig::udp();
        conn.port = dns.port();
        let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
            dns.ip(),
            true,
            vec![conn],
        )]);
        let resolver = hickory_resolver::TokioResolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        )
        .build()
        .unwrap();
        let ctx = probe::ProbeContext::with_resolver(resolver);
        let list = Allowlist::parse(&["*.test:*".to_string()]).unwrap();
        let mut m = module("http");
        m.http.preferred_ip_protocol = sonde_proto::config::module::IpProtocol::Ip4;
        // The name passes the up-front check; its address does not.
        assert!(list.allows_target(&m, "http://meta.test/latest").is_ok());
        for prober_target in [
            ("http", "http://meta.test/latest/meta-data"),
            ("tcp", "meta.test:80"),
            ("dns", "meta.test:53"),
        ] {
            let mut m = module(prober_target.0);
            m.http.preferred_ip_protocol = sonde_proto::config::module::IpProtocol::Ip4;
            m.tcp.preferred_ip_protocol = sonde_proto::config::module::IpProtocol::Ip4;
            m.dns.preferred_ip_protocol = sonde_proto::config::module::IpProtocol::Ip4;
            m.dns.query_name = "example.test".to_string();
            let o = probe::run_with_policy(
                &ctx,
                Some(&list),
                prober_target.1,
                &m,
                Duration::from_secs(2),
            )
            .await;
            assert_eq!(
                o.failure_reason,
                Some(probe::Reason::RefusedByPolicy),
                "{prober_target:?}: {:?}",
                o.failure
            );
            assert!(o.failure.unwrap().contains("169.254.169.254"));
        }
    }

    #[test]
    fn the_policy_checks_resolved_addresses() {
        use probe::ConnectPolicy;
        let list = Allowlist::parse(&["*.test:*".to_string()]).unwrap();
        assert!(list.check_host("meta.test", 80).is_ok());
        let meta: std::net::SocketAddr = "169.254.169.254:80".parse().unwrap();
        assert!(list.check_addr(meta).unwrap_err().0.contains("metadata"));
        assert!(list.check_addr("127.0.0.1:80".parse().unwrap()).is_ok());
        assert!(list.check_host("elsewhere.example", 80).is_err());
    }

    fn timeout_for(header: Option<HeaderValue>, module: &Module) -> Duration {
        probe_timeout(header.as_ref(), module, Duration::from_secs(60))
    }

    #[test]
    fn the_scrape_timeout_header_never_panics_and_is_capped() {
        let m = module("http");
        let h = |v: &str| Some(HeaderValue::from_str(v).unwrap());
        // The ordinary case: the scrape timeout less the offset.
        assert_eq!(timeout_for(h("10"), &m), Duration::from_millis(9500));
        assert_eq!(timeout_for(h(" 2.5 "), &m), Duration::from_secs(2));
        // Absent: blackbox's 120 s, capped at max_timeout.
        assert_eq!(timeout_for(None, &m), Duration::from_secs(60));
        // Capped.
        assert_eq!(timeout_for(h("3600"), &m), Duration::from_secs(60));
        for hostile in [
            "NaN",
            "nan",
            "inf",
            "-inf",
            "Infinity",
            "-1",
            "-0",
            "0",
            "1e309",
            "1e300",
            "18446744073709551616",
            "1e-400",
            "",
            "ten",
            "0x10",
            "5s",
        ] {
            let t = timeout_for(h(hostile), &m);
            assert!(
                t >= MIN_PROBE_TIMEOUT && t <= Duration::from_secs(60),
                "{hostile:?}: {t:?}"
            );
        }
        // Not UTF-8.
        let bytes = HeaderValue::from_bytes(b"\xff\xfe10").unwrap();
        assert_eq!(timeout_for(Some(bytes), &m), Duration::from_secs(60));
        // Smaller than the offset: the floor.
        assert_eq!(timeout_for(h("0.2"), &m), MIN_PROBE_TIMEOUT);
        // The module's own timeout wins when shorter.
        let mut short = module("http");
        short.timeout = sonde_proto::config::PromDuration::from_secs(3);
        assert_eq!(timeout_for(h("10"), &short), Duration::from_secs(3));
        // A max_timeout at the extreme of Duration does not overflow either.
        assert_eq!(
            probe_timeout(h("1e300").as_ref(), &m, Duration::MAX),
            Duration::MAX - SCRAPE_TIMEOUT_OFFSET
        );
    }

    #[test]
    fn the_exposition_groups_samples_by_name_in_first_seen_order() {
        let sample = |name, labels: &[(&'static str, &str)], value| probe::Sample {
            name,
            labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        };
        let samples = vec![
            sample("probe_http_duration_seconds", &[("phase", "resolve")], 0.5),
            sample("probe_success", &[], 1.0),
            sample(
                "probe_http_duration_seconds",
                &[("phase", "con\"nect")],
                1e-7,
            ),
            sample("probe_expect_info", &[("a", "x"), ("b", "y\nz")], 1.0),
            sample("probe_duration_seconds", &[], f64::NAN),
        ];
        // The same text as building the families and rendering them.
        let mut families: Vec<Family> = Vec::new();
        for s in &samples {
            let labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            match families.iter_mut().find(|f| f.name == s.name) {
                Some(f) => f.samples.push((labels, s.value)),
                None => families.push(Family::gauge(s.name, help(s.name)).with(labels, s.value)),
            }
        }
        let text = exposition(&samples);
        assert_eq!(text, render(&families, Format::PrometheusText));
        assert_eq!(
            text,
            "# HELP probe_http_duration_seconds Duration of http request by phase, summed over all redirects\n\
             # TYPE probe_http_duration_seconds gauge\n\
             probe_http_duration_seconds{phase=\"resolve\"} 0.5\n\
             probe_http_duration_seconds{phase=\"con\\\"nect\"} 0.0000001\n\
             # HELP probe_success Displays whether or not the probe was a success\n\
             # TYPE probe_success gauge\n\
             probe_success 1\n\
             # HELP probe_expect_info Explicit content matched\n\
             # TYPE probe_expect_info gauge\n\
             probe_expect_info{a=\"x\",b=\"y\\nz\"} 1\n\
             # HELP probe_duration_seconds Returns how long the probe took to complete in seconds\n\
             # TYPE probe_duration_seconds gauge\n\
             probe_duration_seconds NaN\n"
        );
    }

    #[test]
    fn probe_parameters_are_decoded_and_the_last_one_counts() {
        let p = ProbeParams::parse(
            "target=http%3A%2F%2Fa%3A80%2F%3Fx%3D1&module=m1&module=m2&debug=true&other=1",
        );
        assert_eq!(p.target.as_deref(), Some("http://a:80/?x=1"));
        assert_eq!(p.module.as_deref(), Some("m2"));
        assert_eq!(p.debug.as_deref(), Some("true"));
        let p = ProbeParams::parse("target=a+b%20c&debug");
        assert_eq!(p.target.as_deref(), Some("a b c"));
        assert_eq!(p.module, None);
        assert_eq!(p.debug.as_deref(), Some(""));
        assert!(ProbeParams::parse("").target.is_none());
        // Bytes that are not UTF-8 do not fail the request: they decode lossily.
        assert_eq!(
            ProbeParams::parse("target=%ff").target.as_deref(),
            Some("\u{fffd}")
        );
    }

    #[test]
    fn the_allowlist_is_parsed_once_per_config() {
        let cache = AllowlistCache::default();
        let mut config = crate::config::AgentConfig::minimal("a".into());
        config.probe_endpoint.allowed_targets = vec!["*.internal:443".into()];
        let first = Arc::new(config.clone());
        let a = cache.get(&first);
        assert!(Arc::ptr_eq(&a, &cache.get(&first)));
        config.probe_endpoint.allowed_targets = vec!["[::1:80".into()];
        let second = Arc::new(config);
        let b = cache.get(&second);
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(b.as_ref().as_ref().is_err());
    }

    #[test]
    fn probe_slots_are_bounded_and_released() {
        let in_flight = AtomicUsize::new(0);
        let a = ProbeSlot::take(&in_flight, 2).unwrap();
        let b = ProbeSlot::take(&in_flight, 2).unwrap();
        assert!(ProbeSlot::take(&in_flight, 2).is_none());
        drop(a);
        let c = ProbeSlot::take(&in_flight, 2).unwrap();
        drop((b, c));
        assert_eq!(in_flight.load(Ordering::Relaxed), 0);
    }

    fn is_meta(s: &str) -> bool {
        is_metadata_address(s.parse().unwrap())
    }

    #[test]
    fn every_cloud_metadata_address_is_special() {
        for meta in [
            "169.254.169.254", // AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, ...
            "169.254.170.2",   // AWS ECS task metadata
            "169.254.0.23",    // Tencent Cloud
            "100.100.100.200", // Alibaba
            "192.0.0.192",     // Oracle (older)
            "168.63.129.16",   // Azure WireServer
            "fe80::a9fe:a9fe", // OpenStack over IPv6
            "fe80::1",
            "fd00:ec2::254", // AWS over IPv6
            "fd20:ce::254",  // Google Cloud over IPv6
        ] {
            assert!(is_meta(meta), "{meta}");
        }
        for ordinary in [
            "127.0.0.1",
            "10.0.0.1",
            "100.100.100.201",
            "192.0.0.193",
            "168.63.129.17",
            "8.8.8.8",
            "::1",
            "::",
            "fd00:ec2::253",
            "2001:db8::1",
        ] {
            assert!(!is_meta(ordinary), "{ordinary}");
        }
    }

    #[test]
    fn ipv4_metadata_addresses_are_special_in_every_ipv6_spelling() {
        for v4 in [
            "169.254.169.254",
            "169.254.1.2",
            "100.100.100.200",
            "192.0.0.192",
            "168.63.129.16",
        ] {
            let a: Ipv4Addr = v4.parse().unwrap();
            let [b0, b1, b2, b3] = a.octets();
            let hi = u16::from_be_bytes([b0, b1]);
            let lo = u16::from_be_bytes([b2, b3]);
            for form in [
                format!("::ffff:{v4}"),                                    // IPv4-mapped
                format!("::{v4}"),                                         // IPv4-compatible
                format!("64:ff9b::{v4}"),         // NAT64, well-known prefix
                format!("64:ff9b:1::{v4}"),       // NAT64, local-use prefix, /96
                format!("2002:{hi:x}:{lo:x}::1"), // 6to4
                format!("2001:0:{hi:x}:{lo:x}::1"), // Teredo server
                format!("2001:0:4136:e378:8000:63bf:{:x}:{:x}", !hi, !lo), // Teredo client
            ] {
                assert!(is_meta(&form), "{form} ({v4})");
            }
            // The RFC 6052 positions of the local-use prefix, built byte by byte.
            for (positions, name) in [
                ([6, 7, 9, 10], "/48"),
                ([7, 9, 10, 11], "/56"),
                ([9, 10, 11, 12], "/64"),
                ([12, 13, 14, 15], "/96"),
            ] {
                let mut o = [0u8; 16];
                o[..6].copy_from_slice(&[0, 0x64, 0xff, 0x9b, 0, 1]);
                for (p, b) in positions.into_iter().zip(a.octets()) {
                    o[p] = b;
                }
                let ip = Ipv6Addr::from(o);
                assert!(is_meta(&ip.to_string()), "{ip} ({v4} at {name})");
            }
        }
        // The same spellings of an ordinary address are not special.
        for ordinary in [
            "::ffff:10.0.0.1",
            "64:ff9b::10.0.0.1",
            "2002:a00:1::1",
            "::10.0.0.1",
        ] {
            assert!(!is_meta(ordinary), "{ordinary}");
        }
    }

    #[test]
    fn embedded_forms_are_refused_by_the_allowlist_unless_explicit() {
        let http = module("http");
        for target in [
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:a9fe:a9fe::1]/",
            "http://[::169.254.169.254]/",
            "http://100.100.100.200/",
            "http://[fd20:ce::254]/",
        ] {
            let err = allowed_target(&["*", "[::/0]:*"], &http, target)
                .unwrap_err()
                .to_string();
            assert!(err.contains("metadata"), "{target}: {err}");
        }
        assert!(
            allowed_target(
                &["[64:ff9b::a9fe:a9fe]:80"],
                &http,
                "http://[64:ff9b::a9fe:a9fe]/"
            )
            .is_ok()
        );
        assert!(allowed_target(&["100.100.100.200:80"], &http, "http://100.100.100.200/").is_ok());
    }
}
