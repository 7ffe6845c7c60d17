//! Where a probe may connect: one [`ConnectRules`] type for the two connect policies of
//! the agent's config, `/probe`'s `probe_endpoint.allowed_targets` and the assigned
//! checks' `assigned_modules.connect`. Scheduled checks of the agent's own jobs run
//! without one: the agent's config is trusted with its own probes.
//!
//! A policy is asked right before every connection a probe opens (each redirect hop,
//! the DNS server, a gRPC server, an ICMP echo's destination, a module's proxy) with the
//! name the probe was about to reach and the address that name resolved to, so that
//! neither a redirect nor a DNS answer can lead a probe where the policy refuses: the
//! address is checked, not only the name.
//!
//! Link-local and cloud metadata addresses ([`SPECIAL_NETS`], and every IPv6 form that
//! embeds one of the IPv4 ones: see [`embedded_ipv4`]) are refused by both policies
//! unless an entry names them explicitly: an IP or CIDR lying wholly inside those
//! ranges (`169.254.169.254:80` in `allowed_targets`, `169.254.169.254/32` in
//! `assigned_modules.connect.allow`). A glob or a wider CIDR (`*`, `0.0.0.0/0`) never
//! admits them. Whoever writes a module (an aggregator's config, a `/probe` caller) could
//! otherwise have the agent read its host's credentials from the metadata service and
//! copy them into a label (`query_response` labels) or a failure message.

use crate::config::ConnectConfig;
use sonde_proto::config::{Module, Prober, split_port};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Decides whether a probe may connect somewhere. It is asked right before every
/// connection (every redirect hop, the DNS server, a proxy) with the name the probe was
/// about to reach and the address that name resolved to.
pub trait ConnectPolicy: Send + Sync {
    /// `host` is the name or IP literal as the target or a redirect wrote it.
    fn check_host(&self, host: &str, port: u16) -> Result<(), Refusal>;
    /// The address a connection is about to be opened to.
    fn check_addr(&self, addr: SocketAddr) -> Result<(), Refusal>;
    /// A unix socket about to be connected to; refused unless a policy admits it.
    fn check_socket(&self, path: &str) -> Result<(), Refusal> {
        Err(Refusal(format!("{path}: no unix socket is allowed here")))
    }
}

/// Why a [`ConnectPolicy`] refuses a connection, in the words the probe fails with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// A connect policy of the agent's config.
///
/// For `/probe` (`probe_endpoint.allowed_targets`), each pattern is `HOST:PORT`:
/// - `HOST` is a glob over the host name or IP literal as the target writes it
///   (`*.internal`, `shop-?.example`, `127.0.0.1`), or a CIDR network that matches IP
///   literals inside it (`10.0.0.0/8`, `[fd00::/8]` for IPv6, in brackets);
/// - `PORT` is a glob over the port number (`443`, `*`, `80*`); a pattern without
///   `:PORT` (`*`, `*.internal`) matches any port.
///
/// For assigned checks (`assigned_modules.connect`), `allow` and `deny` are CIDR
/// networks (or single addresses) matched against the address a probe connects to,
/// whatever name led there: `allow`, when given, is every network a probe may reach;
/// `deny` is refused even inside `allow`.
///
/// Either way, the special ranges are refused unless named explicitly (see the module's
/// documentation).
pub struct ConnectRules {
    /// `HOST:PORT` patterns the host as written must match (`/probe`); `None`: any host.
    targets: Option<Vec<Pattern>>,
    /// Networks the address connected to must lie in; `None`: any address.
    allow: Option<Vec<(IpAddr, u8)>>,
    /// Networks refused whatever else allows them.
    deny: Vec<(IpAddr, u8)>,
    /// The config key that allows more (`targets` or `allow`), named in refusals.
    allow_key: &'static str,
}

/// Where `deny` is set, named in its refusals.
const DENY_KEY: &str = "assigned_modules.connect.deny";

/// Why a target or an address is not allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAllowed {
    #[error("cannot tell the host and port of {target:?} for the {prober} prober")]
    NoHostPort {
        target: String,
        prober: &'static str,
    },
    /// `shown` is the host and port as a user writes them (IPv6 in brackets).
    #[error("{shown} matches no pattern of {key}")]
    NoPattern { shown: String, key: &'static str },
    #[error(
        "{ip} is in no network of {key}; add one covering it (like {}) to the agent's config to allow it",
        single_net(*ip)
    )]
    NotInAllow { ip: IpAddr, key: &'static str },
    #[error(
        "{ip} is in {net}/{prefix}, which {DENY_KEY} refuses; remove that entry from the agent's config to allow it"
    )]
    Denied { ip: IpAddr, net: IpAddr, prefix: u8 },
    #[error(
        "{ip} is a link-local or cloud metadata address; list it in {key} explicitly (like {example}) to allow it"
    )]
    Metadata {
        ip: IpAddr,
        key: &'static str,
        example: String,
    },
    #[error(
        "{path}: an assigned check may not probe a unix socket (a local service); probe it from the agent's own jobs or through /probe with a path pattern in probe_endpoint.allowed_targets"
    )]
    SocketNotAssignable { path: String },
}

/// A pattern of `probe_endpoint.allowed_targets` or a network of
/// `assigned_modules.connect` that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} {pattern:?}: {why} (expected {})", kind.noun(), kind.expected())]
pub struct BadPattern {
    pattern: String,
    why: String,
    kind: PatternKind,
}

/// What a [`BadPattern`] was meant to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PatternKind {
    /// A `HOST:PORT` pattern of `probe_endpoint.allowed_targets`.
    Target,
    /// A network of `assigned_modules.connect`.
    Network,
}

impl PatternKind {
    fn noun(self) -> &'static str {
        match self {
            PatternKind::Target => "pattern",
            PatternKind::Network => "network",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            PatternKind::Target => {
                "HOST:PORT, like *.internal:443, 10.0.0.0/8:* or [fd00::/8]:53, or a socket path like /run/app/*.sock"
            }
            PatternKind::Network => {
                "a CIDR network or an address, like 10.0.0.0/8, 127.0.0.77/32 or fd00::/8"
            }
        }
    }
}

struct Pattern {
    host: HostPattern,
    port: Option<globset::GlobMatcher>,
}

enum HostPattern {
    Glob(globset::GlobMatcher),
    Net(IpAddr, u8),
    /// A pattern starting with `/`: the unix prober's socket paths (`*` stops at `/`).
    Path(globset::GlobMatcher),
}

impl ConnectRules {
    /// `/probe`'s policy: `probe_endpoint.allowed_targets`.
    pub fn probe_endpoint(patterns: &[String]) -> Result<Self, BadPattern> {
        patterns
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map(|patterns| Self {
                targets: Some(patterns),
                allow: None,
                deny: Vec::new(),
                allow_key: "probe_endpoint.allowed_targets",
            })
    }

    /// The assigned checks' policy: `assigned_modules.connect`.
    pub fn assigned(config: &ConnectConfig) -> Result<Self, BadPattern> {
        let nets = |list: &[String]| {
            list.iter()
                .map(|n| parse_net(n))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            allow: config.allow.as_deref().map(nets).transpose()?,
            deny: nets(&config.deny)?,
            ..Self::assigned_default()
        })
    }

    /// The assigned checks' policy when `assigned_modules.connect` is absent: any address
    /// but the special ranges.
    pub fn assigned_default() -> Self {
        Self {
            targets: None,
            allow: None,
            deny: Vec::new(),
            allow_key: "assigned_modules.connect.allow",
        }
    }

    /// The up-front check of a `/probe` request: the target's own host and port.
    pub fn allows_target(&self, module: &Module, target: &str) -> Result<(), NotAllowed> {
        if module.prober == Prober::Unix {
            return self.allows_socket(target);
        }
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

    /// A unix socket path: only a pattern that starts with `/` and matches it admits it
    /// (`*` or a host pattern never does), and assigned checks may not reach local
    /// sockets at all (a socket is a local service, not a network target).
    pub fn allows_socket(&self, path: &str) -> Result<(), NotAllowed> {
        let Some(patterns) = &self.targets else {
            return Err(NotAllowed::SocketNotAssignable {
                path: path.to_string(),
            });
        };
        let found = patterns.iter().any(|p| match &p.host {
            HostPattern::Path(g) => g.is_match(path),
            _ => false,
        });
        if found {
            Ok(())
        } else {
            Err(NotAllowed::NoPattern {
                shown: path.to_string(),
                key: self.allow_key,
            })
        }
    }

    fn host_allowed(&self, host: &str, port: u16) -> Result<(), NotAllowed> {
        let Some(patterns) = &self.targets else {
            return Ok(());
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        // Made only when a pattern needs them: most allowlists are addresses and `*`.
        let lower = std::cell::OnceCell::new();
        let port_text = std::cell::OnceCell::new();
        let ip = host.parse::<IpAddr>().ok().map(canonical);
        let found = patterns.iter().any(|p| {
            let host_ok = match &p.host {
                HostPattern::Glob(g) => g.is_match(lower.get_or_init(|| host.to_ascii_lowercase())),
                HostPattern::Net(net, prefix) => ip.is_some_and(|ip| in_net(ip, *net, *prefix)),
                HostPattern::Path(_) => false,
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
            Err(NotAllowed::NoPattern {
                shown,
                key: self.allow_key,
            })
        }
    }

    fn addr_allowed(&self, ip: IpAddr, port: u16) -> Result<(), NotAllowed> {
        let ip = canonical(ip);
        if let Some(&(net, prefix)) = self.deny.iter().find(|(n, p)| in_net(ip, *n, *p)) {
            return Err(NotAllowed::Denied { ip, net, prefix });
        }
        if let Some(allow) = &self.allow
            && !allow.iter().any(|(n, p)| in_net(ip, *n, *p))
        {
            return Err(NotAllowed::NotInAllow {
                ip,
                key: self.allow_key,
            });
        }
        if !is_metadata_address(ip) {
            return Ok(());
        }
        if self.names_special(ip, port) {
            return Ok(());
        }
        let example = match (&self.targets, ip) {
            (Some(_), IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            (Some(_), v4) => format!("{v4}:{port}"),
            (None, ip) => single_net(ip),
        };
        Err(NotAllowed::Metadata {
            ip,
            key: self.allow_key,
            example,
        })
    }

    /// Whether an entry names the special address `ip` explicitly: a network lying
    /// wholly inside the special ranges, or that very address.
    fn names_special(&self, ip: IpAddr, port: u16) -> bool {
        let port_text = port.to_string();
        let in_targets = self.targets.iter().flatten().any(|p| match &p.host {
            HostPattern::Net(net, prefix) => {
                in_net(ip, *net, *prefix)
                    && net_is_special(*net, *prefix)
                    && p.port.as_ref().is_none_or(|g| g.is_match(&port_text))
            }
            HostPattern::Glob(_) | HostPattern::Path(_) => false,
        });
        let in_allow = self
            .allow
            .iter()
            .flatten()
            .any(|(net, prefix)| in_net(ip, *net, *prefix) && net_is_special(*net, *prefix));
        in_targets || in_allow
    }
}

impl ConnectPolicy for ConnectRules {
    fn check_host(&self, host: &str, port: u16) -> Result<(), Refusal> {
        self.host_allowed(host, port)
            .map_err(|e| Refusal(e.to_string()))
    }

    fn check_addr(&self, addr: SocketAddr) -> Result<(), Refusal> {
        self.addr_allowed(addr.ip(), addr.port())
            .map_err(|e| Refusal(e.to_string()))
    }

    fn check_socket(&self, path: &str) -> Result<(), Refusal> {
        self.allows_socket(path).map_err(|e| Refusal(e.to_string()))
    }
}

/// `ip` as a network of its own (`169.254.169.254/32`).
fn single_net(ip: IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })
}

/// A network of `assigned_modules.connect`: `ADDR/PREFIX` or a single address, IPv6
/// with or without brackets.
fn parse_net(raw: &str) -> Result<(IpAddr, u8), BadPattern> {
    let bad = |why: &str| BadPattern {
        pattern: raw.to_string(),
        why: why.to_string(),
        kind: PatternKind::Network,
    };
    let text = raw.trim();
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| bad("bad CIDR prefix length"))?,
    };
    Ok((addr, prefix))
}

impl Pattern {
    fn parse(raw: &str) -> Result<Self, BadPattern> {
        let bad = |why: &str| BadPattern {
            pattern: raw.to_string(),
            why: why.to_string(),
            kind: PatternKind::Target,
        };
        if raw.starts_with('/') {
            let glob = globset::GlobBuilder::new(raw)
                .literal_separator(true)
                .build()
                .map_err(|e| bad(&e.to_string()))?;
            return Ok(Self {
                host: HostPattern::Path(glob.compile_matcher()),
                port: None,
            });
        }
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

/// True for the addresses [`ConnectRules`] refuses unless listed explicitly: inside one
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
        // A multihttp target is what its steps' `{{target}}` stands for: a URL, or a
        // host as the http prober reads it.
        Prober::Http | Prober::Multihttp => {
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
        Prober::Websocket => crate::probe::websocket::host_port(target)
            .ok()
            .map(|(host, port)| (host.to_string(), port)),
        Prober::Unix => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe;
    use std::time::Duration;

    fn module(prober: &str) -> Module {
        serde_json::from_str(&format!(r#"{{"prober":"{prober}"}}"#)).unwrap()
    }

    fn allowed_target(patterns: &[&str], module: &Module, target: &str) -> Result<(), NotAllowed> {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        ConnectRules::probe_endpoint(&patterns)
            .expect("valid patterns")
            .allows_target(module, target)
    }

    #[test]
    fn unix_sockets_need_a_path_pattern() {
        let unix = module("unix");
        let patterns = ["*", "/run/app/*.sock"];
        assert!(allowed_target(&patterns, &unix, "/run/app/api.sock").is_ok());
        // `*` (any host) never admits a socket, and `*` in a path stops at `/`.
        assert!(allowed_target(&["*", "0.0.0.0/0:*"], &unix, "/run/app/api.sock").is_err());
        assert!(allowed_target(&patterns, &unix, "/run/app/sub/x.sock").is_err());
        assert!(allowed_target(&patterns, &unix, "/var/run/docker.sock").is_err());
        // A path pattern admits no network target.
        assert!(allowed_target(&["/run/*"], &module("tcp"), "127.0.0.1:80").is_err());
        // Assigned checks never reach a local socket.
        let assigned = ConnectRules::assigned_default();
        let e = assigned.check_socket("/run/app/api.sock").unwrap_err();
        assert!(e.0.contains("may not probe a unix socket"), "{e}");
        let ws = module("websocket");
        assert!(allowed_target(&["127.0.0.1:8080"], &ws, "ws://127.0.0.1:8080/chat").is_ok());
        assert!(allowed_target(&["127.0.0.1:8080"], &ws, "wss://127.0.0.1/chat").is_err());
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
            assert!(ConnectRules::probe_endpoint(&patterns).is_err(), "{bad}");
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
        let list = ConnectRules::probe_endpoint(&["*.test:*".to_string()]).unwrap();
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
            // `/probe`'s allowlist, and the assigned checks' policy at its default.
            let assigned = ConnectRules::assigned_default();
            for policy in [&list, &assigned] {
                let o = probe::run_with_policy(
                    &ctx,
                    Some(policy),
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
    }

    #[test]
    fn the_policy_checks_resolved_addresses() {
        use probe::ConnectPolicy;
        let list = ConnectRules::probe_endpoint(&["*.test:*".to_string()]).unwrap();
        assert!(list.check_host("meta.test", 80).is_ok());
        let meta: std::net::SocketAddr = "169.254.169.254:80".parse().unwrap();
        assert!(list.check_addr(meta).unwrap_err().0.contains("metadata"));
        assert!(list.check_addr("127.0.0.1:80".parse().unwrap()).is_ok());
        assert!(list.check_host("elsewhere.example", 80).is_err());
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

    fn assigned(allow: Option<&[&str]>, deny: &[&str]) -> ConnectRules {
        ConnectRules::assigned(&ConnectConfig {
            allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        })
        .expect("valid networks")
    }

    fn refusal(rules: &ConnectRules, addr: &str) -> Option<String> {
        rules.check_addr(addr.parse().unwrap()).err().map(|r| r.0)
    }

    #[test]
    fn assigned_checks_are_refused_metadata_addresses_by_default() {
        let rules = ConnectRules::assigned_default();
        for meta in [
            "169.254.169.254:80",
            "[fd00:ec2::254]:80",
            "[::ffff:169.254.169.254]:80",
            "[64:ff9b::a9fe:a9fe]:80",
        ] {
            let why = refusal(&rules, meta).unwrap_or_else(|| panic!("{meta} allowed"));
            assert!(
                why.contains("link-local or cloud metadata")
                    && why.contains("assigned_modules.connect.allow"),
                "{meta}: {why}"
            );
        }
        assert_eq!(
            refusal(&rules, "169.254.169.254:80").unwrap(),
            "169.254.169.254 is a link-local or cloud metadata address; list it in assigned_modules.connect.allow explicitly (like 169.254.169.254/32) to allow it"
        );
        for ordinary in ["127.0.0.1:80", "10.1.2.3:443", "[2001:db8::1]:53"] {
            assert_eq!(refusal(&rules, ordinary), None, "{ordinary}");
        }
        // Names are judged by the address they resolve to, at connect time.
        assert!(rules.check_host("metadata.google.internal", 80).is_ok());
    }

    #[test]
    fn assigned_deny_and_allow_networks() {
        let rules = assigned(None, &["127.0.0.77/32", "10.0.0.0/8", "fd00::/8"]);
        assert_eq!(
            refusal(&rules, "127.0.0.77:9").unwrap(),
            "127.0.0.77 is in 127.0.0.77/32, which assigned_modules.connect.deny refuses; remove that entry from the agent's config to allow it"
        );
        assert!(refusal(&rules, "10.9.9.9:22").is_some());
        assert!(refusal(&rules, "[::ffff:10.0.0.1]:22").is_some());
        assert!(refusal(&rules, "[fd12::1]:53").is_some());
        assert_eq!(refusal(&rules, "127.0.0.1:9"), None);

        // `allow` is every network a probe may reach; `deny` wins inside it.
        let rules = assigned(Some(&["192.0.2.0/24", "[2001:db8::]/32"]), &["192.0.2.7"]);
        assert_eq!(refusal(&rules, "192.0.2.1:80"), None);
        assert_eq!(refusal(&rules, "[2001:db8::1]:80"), None);
        assert!(refusal(&rules, "192.0.2.7:80").unwrap().contains("deny"));
        assert_eq!(
            refusal(&rules, "198.51.100.1:80").unwrap(),
            "198.51.100.1 is in no network of assigned_modules.connect.allow; add one covering it (like 198.51.100.1/32) to the agent's config to allow it"
        );

        // A wide network never admits the metadata ranges; one inside them does.
        let wide = assigned(Some(&["0.0.0.0/0", "::/0"]), &[]);
        assert!(refusal(&wide, "169.254.169.254:80").is_some());
        let explicit = assigned(Some(&["0.0.0.0/0", "169.254.169.254/32"]), &[]);
        assert_eq!(refusal(&explicit, "169.254.169.254:80"), None);
        assert!(refusal(&explicit, "169.254.169.253:80").is_some());

        for bad in ["10.0.0.0/33", "ten/8", "*.internal", "10.0.0.0/x", ""] {
            let config = ConnectConfig {
                allow: None,
                deny: vec![bad.to_string()],
            };
            assert!(ConnectRules::assigned(&config).is_err(), "{bad:?}");
        }
    }

    /// The tcp prober under the assigned rules: a denied address is never connected to.
    #[tokio::test]
    async fn a_denied_address_is_refused_before_connecting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.77:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let rules = assigned(None, &["127.0.0.77/32"]);
        let ctx = probe::ProbeContext::from_system().unwrap();
        let m: Module = serde_json::from_str(r#"{"prober":"tcp"}"#).unwrap();
        let o =
            probe::run_with_policy(&ctx, Some(&rules), &target, &m, Duration::from_secs(1)).await;
        assert_eq!(o.failure_reason, Some(probe::Reason::RefusedByPolicy));
        assert!(o.failure.unwrap().contains("assigned_modules.connect.deny"));
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "the probe connected despite the policy");
    }
}
