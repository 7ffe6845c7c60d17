//! The agent's HTTP endpoints: `/metrics`, `/-/healthy`, `/-/ready`, and the
//! blackbox_exporter-compatible `/probe` when `probe_endpoint.enabled` is set.

use crate::probe;
use crate::runtime::AgentRuntime;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sonde_proto::config::{Module, Prober, split_port};
use sonde_proto::exposition::{Family, Format, render};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub fn router(agent: Arc<AgentRuntime>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/-/healthy", get(|| async { "Healthy.\n" }))
        .route("/-/ready", get(|| async { "Ready.\n" }))
        .route("/probe", get(probe_handler))
        .with_state(agent)
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

async fn metrics(State(agent): State<Arc<AgentRuntime>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    (
        [(header::CONTENT_TYPE, format.content_type())],
        render(&agent.families(), format),
    )
        .into_response()
}

/// blackbox_exporter subtracts this from the scrape timeout so the answer arrives in time.
const SCRAPE_TIMEOUT_OFFSET: Duration = Duration::from_millis(500);
/// What blackbox_exporter uses when the scraper sends no timeout header.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(120);

async fn probe_handler(
    State(agent): State<Arc<AgentRuntime>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let config = agent.config();
    let settings = &config.probe_endpoint;
    if !settings.enabled {
        return (
            StatusCode::NOT_FOUND,
            "/probe is disabled; set probe_endpoint.enabled: true (with allowed_targets) in the agent config\n",
        )
            .into_response();
    }
    let module_name = params.get("module").map_or("http_2xx", String::as_str);
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
    let Some(target) = params.get("target").filter(|t| !t.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "Target parameter is missing\n").into_response();
    };
    let allowlist = match Allowlist::parse(&settings.allowed_targets) {
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
    let timeout = probe_timeout(&headers, module);
    let outcome = probe::run_with_policy(
        &agent.probe_context,
        Some(&allowlist),
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
    let debug = params.get("debug").is_some_and(|d| d == "true");
    let mut families: Vec<Family> = Vec::new();
    for sample in &outcome.samples {
        let labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        match families.iter_mut().find(|f| f.name == sample.name) {
            Some(f) => f.samples.push((labels, sample.value)),
            None => families
                .push(Family::gauge(sample.name, help(sample.name)).with(labels, sample.value)),
        }
    }
    let body = render(&families, Format::PrometheusText);
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

/// HELP texts for the probe metrics, worded as blackbox_exporter words them.
fn help(name: &str) -> &'static str {
    sonde_proto::help::series_help(name).unwrap_or("Probe metric")
}

fn probe_timeout(headers: &HeaderMap, module: &Module) -> Duration {
    let scrape = headers
        .get("X-Prometheus-Scrape-Timeout-Seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s).saturating_sub(SCRAPE_TIMEOUT_OFFSET));
    let mut timeout = scrape.unwrap_or(DEFAULT_PROBE_TIMEOUT);
    if !module.timeout.0.is_zero() {
        timeout = timeout.min(module.timeout.0);
    }
    timeout.max(Duration::from_millis(100))
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
/// Link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254,
/// and their IPv4-mapped forms) are refused unless a pattern names them explicitly: an
/// IP or CIDR lying wholly inside those ranges (`169.254.169.254:80`,
/// `169.254.0.0/16:*`). A glob or a wider CIDR (`*`, `0.0.0.0/0:*`) never admits them.
///
/// The same checks run at connect time on every address a probe is about to connect to
/// (each redirect hop, each resolved name), through [`probe::ConnectPolicy`].
pub struct Allowlist {
    patterns: Vec<Pattern>,
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
    pub fn parse(patterns: &[String]) -> Result<Self, String> {
        patterns
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map(|patterns| Self { patterns })
    }

    /// The up-front check of a `/probe` request: the target's own host and port.
    pub fn allows_target(&self, module: &Module, target: &str) -> Result<(), String> {
        let (host, port) = host_port(module.prober, target).ok_or_else(|| {
            format!(
                "cannot tell the host and port of {target:?} for the {} prober",
                module.prober.as_str()
            )
        })?;
        // The metadata check first: its reason is the one worth reading.
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.addr_allowed(ip, port)?;
        }
        self.host_allowed(&host, port)
    }

    fn host_allowed(&self, host: &str, port: u16) -> Result<(), String> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let lower = host.to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok().map(canonical);
        let port_text = port.to_string();
        let found = self.patterns.iter().any(|p| {
            let host_ok = match &p.host {
                HostPattern::Glob(g) => g.is_match(&lower),
                HostPattern::Net(net, prefix) => ip.is_some_and(|ip| in_net(ip, *net, *prefix)),
            };
            host_ok && p.port.as_ref().is_none_or(|g| g.is_match(&port_text))
        });
        if found {
            Ok(())
        } else {
            let shown = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            Err(format!(
                "{shown} matches no pattern of probe_endpoint.allowed_targets"
            ))
        }
    }

    fn addr_allowed(&self, ip: IpAddr, port: u16) -> Result<(), String> {
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
            Err(format!(
                "{ip} is a link-local or cloud metadata address; list it in probe_endpoint.allowed_targets explicitly (like {ip}:{port}) to allow it"
            ))
        }
    }
}

impl probe::ConnectPolicy for Allowlist {
    fn check_host(&self, host: &str, port: u16) -> Result<(), String> {
        self.host_allowed(host, port)
    }

    fn check_addr(&self, addr: std::net::SocketAddr) -> Result<(), String> {
        self.addr_allowed(addr.ip(), addr.port())
    }
}

impl Pattern {
    fn parse(raw: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "pattern {raw:?}: {why} (expected HOST:PORT, like *.internal:443, 10.0.0.0/8:* or [fd00::/8]:53)"
            )
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

/// The ranges refused unless listed explicitly.
const SPECIAL_NETS: [(&str, u8); 3] = [("169.254.0.0", 16), ("fe80::", 10), ("fd00:ec2::254", 128)];

fn special_nets() -> impl Iterator<Item = (IpAddr, u8)> {
    SPECIAL_NETS
        .iter()
        .filter_map(|(a, p)| a.parse::<IpAddr>().ok().map(|a| (a, *p)))
}

fn is_metadata_address(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    special_nets().any(|(net, prefix)| in_net(ip, net, prefix))
}

/// True when the network `net/prefix` lies wholly inside one of the special ranges.
fn net_is_special(net: IpAddr, prefix: u8) -> bool {
    special_nets().any(|(special, sp)| prefix >= sp && in_net(net, special, sp))
}

/// The host and port a target reaches, the way each prober reads its target.
fn host_port(prober: Prober, target: &str) -> Option<(String, u16)> {
    match prober {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(prober: &str) -> Module {
        serde_json::from_str(&format!(r#"{{"prober":"{prober}"}}"#)).unwrap()
    }

    fn allowed_target(patterns: &[&str], module: &Module, target: &str) -> Result<(), String> {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        Allowlist::parse(&patterns)?.allows_target(module, target)
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
        let err =
            allowed_target(&wide, &http, "http://169.254.169.254/latest/meta-data").unwrap_err();
        assert!(err.contains("metadata"), "{err}");
        let explicit = ["169.254.169.254:80"];
        assert!(allowed_target(&explicit, &http, "http://169.254.169.254/").is_ok());
        assert!(allowed_target(&explicit, &http, "http://169.254.169.254:8080/").is_err());
        assert!(allowed_target(&wide, &http, "http://[fd00:ec2::254]/").is_err());
        assert!(allowed_target(&wide, &http, "http://[fe80::1]/").is_err());
        assert!(allowed_target(&wide, &http, "http://[::ffff:169.254.169.254]/").is_err());
        let err = allowed_target(&["*.internal:8?"], &module("dns"), "ns.internal").unwrap_err();
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
        assert!(list.check_addr(meta).unwrap_err().contains("metadata"));
        assert!(list.check_addr("127.0.0.1:80".parse().unwrap()).is_ok());
        assert!(list.check_host("elsewhere.example", 80).is_err());
    }
}
