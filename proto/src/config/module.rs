//! A probe module, in blackbox_exporter's `modules:` syntax, accepted verbatim so that an
//! existing `blackbox.yml` carries over. Defaults are blackbox_exporter's.

use super::{ByteSize, PromDuration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod cel;
mod dnssec;
pub mod multihttp;
mod oauth2;
mod unix;
mod websocket;
mod yaml_bytes;

pub use cel::compile_cel;
pub use dnssec::{
    AnchorKey, DnssecConfig, TrustAnchor, TrustAnchorError, parse_trust_anchors, read_trust_anchors,
};
pub use multihttp::MultiHttpProbe;
pub use oauth2::{OAuth2, OAuth2Error};
pub use unix::UnixProbe;
pub use websocket::{HeaderSources, HeaderValues, WebsocketHttpConfig, WebsocketProbe};
pub use yaml_bytes::YamlBytes;

/// Which prober runs a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prober {
    Http,
    Tcp,
    Dns,
    Icmp,
    Grpc,
    Unix,
    Websocket,
    Multihttp,
}

impl Prober {
    pub fn as_str(self) -> &'static str {
        match self {
            Prober::Http => "http",
            Prober::Tcp => "tcp",
            Prober::Dns => "dns",
            Prober::Icmp => "icmp",
            Prober::Grpc => "grpc",
            Prober::Unix => "unix",
            Prober::Websocket => "websocket",
            Prober::Multihttp => "multihttp",
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
    /// Left out of the JSON that carries a module to agents when unset, so that an
    /// agent older than these probers still reads every other module.
    #[serde(default, skip_serializing_if = "IcmpProbe::is_default")]
    pub icmp: IcmpProbe,
    #[serde(default, skip_serializing_if = "GrpcProbe::is_default")]
    pub grpc: GrpcProbe,
    #[serde(default, skip_serializing_if = "UnixProbe::is_default")]
    pub unix: UnixProbe,
    #[serde(default, skip_serializing_if = "WebsocketProbe::is_default")]
    pub websocket: WebsocketProbe,
    /// sonde's `multihttp` prober: ordered HTTP steps sharing variables.
    #[serde(default, skip_serializing_if = "MultiHttpProbe::is_default")]
    pub multihttp: MultiHttpProbe,
    /// sonde's addition: probe every address of the target instead of the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_address: Option<PerAddress>,
}

/// Probe each A/AAAA address of the target (of the preferred family first, then, with
/// `ip_protocol_fallback`, of the other), every per-agent sample labelled `ip`; the
/// probe succeeds when `must_succeed` of them do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerAddress {
    /// At most this many addresses are probed (1 to [`MAX_PER_ADDRESS`]); the others
    /// are counted in `probe_addresses_skipped`.
    #[serde(default = "default_max_addresses")]
    pub max_addresses: u32,
    /// How many of the probed addresses must succeed: a number from 1, `any`,
    /// `majority` or `all` (the default). A number above the addresses found fails.
    #[serde(default = "all_addresses")]
    pub must_succeed: super::Quorum,
}

/// The most addresses a `per_address` module may probe at once.
pub const MAX_PER_ADDRESS: u32 = 16;

fn default_max_addresses() -> u32 {
    8
}

fn all_addresses() -> super::Quorum {
    super::Quorum::All
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
    /// `TLS10`..`TLS13`, as Prometheus's `tls_config` spells them. The agent speaks
    /// TLS 1.2 and 1.3 only: a lower minimum is accepted and means TLS 1.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_version: Option<String>,
}

/// A TLS protocol version as Prometheus's `tls_config` names it (`TLS12`), as a number
/// (`12`), `None` when the name is unknown.
pub fn tls_version_number(name: &str) -> Option<u8> {
    match name {
        "TLS10" => Some(10),
        "TLS11" => Some(11),
        "TLS12" => Some(12),
        "TLS13" => Some(13),
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// Empty means any 2xx.
    #[serde(default)]
    pub valid_status_codes: Vec<u16>,
    /// Empty means any version. Values like `HTTP/1.1`, `HTTP/2.0`, as Go names them:
    /// `HTTP/2` is taken, as blackbox_exporter takes it, and never matches.
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
    /// Prometheus's `http_headers`: each header's `values`, `secrets` and `files` (read
    /// at every probe, trimmed), sent as `headers` are.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub http_headers: BTreeMap<String, HeaderSources>,
    /// Headers of the CONNECT request to `proxy_url`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proxy_connect_header: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The request body read from this file at every probe (exclusive with `body`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_file: Option<String>,
    /// Decompress the response body with this algorithm (`gzip`, `deflate`, `br`,
    /// `identity`) whatever its Content-Encoding says, as blackbox_exporter does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub compression: String,
    /// An HTTP proxy (`http://[user:pass@]host:port`) every request goes through; https
    /// targets are tunnelled with CONNECT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_url: Option<String>,
    /// With `proxy_url`: do not resolve the target's name (the proxy does), so a name
    /// only the proxy can resolve still works; the resolve phase and `probe_ip_*` stay 0.
    #[serde(default)]
    pub skip_resolve_phase_with_proxy: bool,
    /// Sent on every request of the probe: `<type> <credentials>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    #[serde(default)]
    pub fail_if_body_matches_regexp: Vec<String>,
    #[serde(default)]
    pub fail_if_body_not_matches_regexp: Vec<String>,
    /// A CEL expression over the body parsed as JSON (bound to `body`): the probe fails
    /// when it is true, or not a boolean, or the body is not JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_if_body_json_matches_cel: Option<String>,
    /// As above, failing when the expression is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_if_body_json_not_matches_cel: Option<String>,
    #[serde(default)]
    pub tls_config: TlsConfig,
    /// Offer HTTP/2 over TLS (ALPN), as blackbox_exporter does by default.
    #[serde(default = "yes")]
    pub enable_http2: bool,
    /// Make every request over HTTP/3 (QUIC, TLS 1.3), never TCP: an `http://` target
    /// is probed as `https://`, as blackbox_exporter does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_http3: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fail_if_header_matches: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fail_if_header_not_matches: Vec<HeaderMatch>,
    /// Sent on every request of the probe, redirects included, as Prometheus's HTTP
    /// client config does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<String>,
    /// Read at every probe, so a rotated token is picked up without a reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<String>,
    /// The OAuth 2.0 client-credentials grant: a token fetched from `token_url`, kept
    /// until shortly before it expires, sent as `Authorization: <type> <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2>,
    /// Fail when the (final) response body is larger than this; 0 means no limit, though
    /// only the first [`HttpProbe::MAX_MATCHED_BODY`] bytes are kept for the regexes.
    #[serde(default, skip_serializing_if = "is_zero_size")]
    pub body_size_limit: ByteSize,
}

/// A regex over the values of one response header (blackbox_exporter's `HeaderMatch`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub header: String,
    pub regexp: String,
    /// Without it, a missing header fails the probe.
    #[serde(default)]
    pub allow_missing: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Read at every probe; surrounding whitespace is trimmed, as Prometheus does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
}

/// Prometheus's `authorization` block of an HTTP client config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// The scheme, `Bearer` when unset.
    #[serde(default = "default_auth_type", rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// Read at every probe; surrounding whitespace is trimmed, as Prometheus does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
}

fn default_auth_type() -> String {
    "Bearer".to_string()
}

fn is_zero_size(s: &ByteSize) -> bool {
    s.0 == 0
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
            http_headers: BTreeMap::new(),
            proxy_connect_header: BTreeMap::new(),
            body: None,
            body_file: None,
            compression: String::new(),
            proxy_url: None,
            skip_resolve_phase_with_proxy: false,
            authorization: None,
            fail_if_body_matches_regexp: Vec::new(),
            fail_if_body_not_matches_regexp: Vec::new(),
            fail_if_body_json_matches_cel: None,
            fail_if_body_json_not_matches_cel: None,
            tls_config: TlsConfig::default(),
            enable_http2: true,
            enable_http3: false,
            body_size_limit: ByteSize(0),
            fail_if_header_matches: Vec::new(),
            fail_if_header_not_matches: Vec::new(),
            basic_auth: None,
            bearer_token: None,
            bearer_token_file: None,
            oauth2: None,
        }
    }
}

impl HttpProbe {
    /// How much of a body the agent keeps in memory to run the body regexes on, so that a
    /// hostile target cannot exhaust the agent's memory; the rest is counted and dropped.
    pub const MAX_MATCHED_BODY: usize = 10 << 20;

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
    /// Lines to expect and send, in order, after connecting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_response: Vec<QueryResponse>,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub tls_config: TlsConfig,
}

/// One step of a tcp `query_response` dialogue (blackbox_exporter's `QueryResponse`):
/// wait for a line matching `expect` (or exactly the bytes `expect_bytes`), then send
/// `send` plus a newline, then upgrade to TLS when `starttls`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryResponse {
    /// A regex; its capture groups (`${1}`, `${name}`) can be used in `send` and `labels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_bytes: Option<YamlBytes>,
    /// Reported as `probe_expect_info{<name>="<value>"} 1` once `expect` matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<ExpectLabel>,
    /// Text, or `!!binary` for bytes that are not (blackbox_exporter's `postgresql`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<YamlBytes>,
    #[serde(default)]
    pub starttls: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectLabel {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

impl Default for TcpProbe {
    fn default() -> Self {
        Self {
            preferred_ip_protocol: IpProtocol::Ip6,
            ip_protocol_fallback: true,
            source_ip_address: None,
            query_response: Vec::new(),
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
    /// DNS over TLS (RFC 7858); needs `transport_protocol: tcp`, port 853 by default.
    #[serde(default)]
    pub dns_over_tls: bool,
    #[serde(default)]
    pub tls_config: TlsConfig,
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
    #[serde(default, skip_serializing_if = "DnsRrValidator::is_empty")]
    pub validate_answer_rrs: DnsRrValidator,
    #[serde(default, skip_serializing_if = "DnsRrValidator::is_empty")]
    pub validate_authority_rrs: DnsRrValidator,
    #[serde(default, skip_serializing_if = "DnsRrValidator::is_empty")]
    pub validate_additional_rrs: DnsRrValidator,
    /// Left out of the JSON sent to agents when unset, for agents older than it.
    #[serde(default, skip_serializing_if = "DnssecConfig::is_default")]
    pub dnssec: DnssecConfig,
}

/// blackbox_exporter's `icmp` module: one echo request, one matching reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpProbe {
    #[serde(default)]
    pub preferred_ip_protocol: IpProtocol,
    #[serde(default = "yes")]
    pub ip_protocol_fallback: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip_address: Option<String>,
    /// Bytes of echo data; 0 means blackbox_exporter's 28-byte "Prometheus Blackbox
    /// Exporter". A larger payload starts with those bytes and is padded with zeros.
    #[serde(default)]
    pub payload_size: u32,
    /// Set the IPv4 "don't fragment" bit, so that a payload larger than the path's MTU
    /// fails instead of being fragmented. IPv6 never fragments on the way.
    #[serde(default)]
    pub dont_fragment: bool,
    /// The request's TTL (IPv4) or hop limit (IPv6), 1 to 255.
    #[serde(default = "default_icmp_ttl")]
    pub ttl: u32,
}

fn default_icmp_ttl() -> u32 {
    IcmpProbe::DEFAULT_TTL
}

impl IcmpProbe {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// blackbox_exporter's `DefaultICMPTTL`.
    pub const DEFAULT_TTL: u32 = 64;
    /// The most echo data an IPv6 packet carries (65535 - 8 bytes of ICMPv6 header);
    /// over IPv4 it is 20 bytes less.
    pub const MAX_PAYLOAD: u32 = 65_527;
}

impl Default for IcmpProbe {
    fn default() -> Self {
        Self {
            preferred_ip_protocol: IpProtocol::Ip6,
            ip_protocol_fallback: true,
            source_ip_address: None,
            payload_size: 0,
            dont_fragment: false,
            ttl: IcmpProbe::DEFAULT_TTL,
        }
    }
}

/// blackbox_exporter's `grpc` module: the gRPC health checking protocol's `Check`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcProbe {
    /// The service asked about; empty asks about the server as a whole.
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub tls_config: TlsConfig,
    #[serde(default)]
    pub preferred_ip_protocol: IpProtocol,
    #[serde(default = "yes")]
    pub ip_protocol_fallback: bool,
    /// Sent with the health check as gRPC metadata (request headers): each key with
    /// its values, keys lowercased as gRPC sends them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Vec<String>>,
}

impl GrpcProbe {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for GrpcProbe {
    fn default() -> Self {
        Self {
            service: String::new(),
            tls: false,
            tls_config: TlsConfig::default(),
            preferred_ip_protocol: IpProtocol::Ip6,
            ip_protocol_fallback: true,
            metadata: BTreeMap::new(),
        }
    }
}

/// Regexes over the records of one section of a DNS reply, each record written as
/// miekg/dns writes it (`name<TAB>ttl<TAB>class<TAB>type<TAB>data`).
/// The semantics are blackbox_exporter's code, names notwithstanding:
/// `fail_if_all_match_regexp` fails unless every record matches each regex.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRrValidator {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fail_if_matches_regexp: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fail_if_all_match_regexp: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fail_if_not_matches_regexp: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fail_if_none_matches_regexp: Vec<String>,
}

impl DnsRrValidator {
    pub fn is_empty(&self) -> bool {
        self.fail_if_matches_regexp.is_empty()
            && self.fail_if_all_match_regexp.is_empty()
            && self.fail_if_not_matches_regexp.is_empty()
            && self.fail_if_none_matches_regexp.is_empty()
    }

    fn regexes(&self) -> impl Iterator<Item = &String> {
        self.fail_if_matches_regexp
            .iter()
            .chain(&self.fail_if_all_match_regexp)
            .chain(&self.fail_if_not_matches_regexp)
            .chain(&self.fail_if_none_matches_regexp)
    }
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
            dns_over_tls: false,
            tls_config: TlsConfig::default(),
            query_name: String::new(),
            query_type: default_query_type(),
            query_class: default_query_class(),
            recursion_desired: true,
            valid_rcodes: Vec::new(),
            validate_answer_rrs: DnsRrValidator::default(),
            validate_authority_rrs: DnsRrValidator::default(),
            validate_additional_rrs: DnsRrValidator::default(),
            dnssec: DnssecConfig::default(),
        }
    }
}

impl DnsProbe {
    /// The query type's number; an empty `query_type` is ANY, as in blackbox_exporter.
    pub fn query_type_code(&self) -> Option<u16> {
        if self.query_type.is_empty() {
            return Some(255);
        }
        lookup(DNS_TYPES, &self.query_type)
    }

    /// The query class's number; an empty `query_class` is IN.
    pub fn query_class_code(&self) -> Option<u16> {
        if self.query_class.is_empty() {
            return Some(1);
        }
        lookup(DNS_CLASSES, &self.query_class)
    }

    /// The rcodes that count as success; NOERROR alone when `valid_rcodes` is empty.
    /// Names are blackbox_exporter's (miekg/dns), so `NXDOMAIN`, `SERVFAIL`, ...
    pub fn valid_rcode_codes(&self) -> Result<Vec<u16>, ModuleError> {
        if self.valid_rcodes.is_empty() {
            return Ok(vec![0]);
        }
        self.valid_rcodes
            .iter()
            .map(|name| lookup(DNS_RCODES, name).ok_or_else(|| ModuleError::Rcode(name.clone())))
            .collect()
    }
}

/// The name of a DNS rcode as blackbox_exporter spells it, for failure messages.
pub fn dns_rcode_name(code: u16) -> Option<&'static str> {
    DNS_RCODES.iter().find(|(_, c)| *c == code).map(|(n, _)| *n)
}

fn lookup(table: &[(&str, u16)], name: &str) -> Option<u16> {
    table.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// miekg/dns's `StringToType`, which is what blackbox_exporter accepts as `query_type`.
#[rustfmt::skip]
const DNS_TYPES: &[(&str, u16)] = &[
    ("A", 1), ("NS", 2), ("MD", 3), ("MF", 4), ("CNAME", 5), ("SOA", 6), ("MB", 7),
    ("MG", 8), ("MR", 9), ("NULL", 10), ("PTR", 12), ("HINFO", 13), ("MINFO", 14),
    ("MX", 15), ("TXT", 16), ("RP", 17), ("AFSDB", 18), ("X25", 19), ("ISDN", 20),
    ("RT", 21), ("NSAP-PTR", 23), ("SIG", 24), ("KEY", 25), ("PX", 26), ("GPOS", 27),
    ("AAAA", 28), ("LOC", 29), ("NXT", 30), ("EID", 31), ("NIMLOC", 32), ("SRV", 33),
    ("ATMA", 34), ("NAPTR", 35), ("KX", 36), ("CERT", 37), ("DNAME", 39), ("OPT", 41),
    ("APL", 42), ("DS", 43), ("SSHFP", 44), ("IPSECKEY", 45), ("RRSIG", 46),
    ("NSEC", 47), ("DNSKEY", 48), ("DHCID", 49), ("NSEC3", 50), ("NSEC3PARAM", 51),
    ("TLSA", 52), ("SMIMEA", 53), ("HIP", 55), ("NINFO", 56), ("RKEY", 57),
    ("TALINK", 58), ("CDS", 59), ("CDNSKEY", 60), ("OPENPGPKEY", 61), ("CSYNC", 62),
    ("ZONEMD", 63), ("SVCB", 64), ("HTTPS", 65), ("SPF", 99), ("UINFO", 100),
    ("UID", 101), ("GID", 102), ("UNSPEC", 103), ("NID", 104), ("L32", 105),
    ("L64", 106), ("LP", 107), ("EUI48", 108), ("EUI64", 109), ("NXNAME", 128),
    ("TKEY", 249), ("TSIG", 250), ("IXFR", 251), ("AXFR", 252), ("MAILB", 253),
    ("MAILA", 254), ("ANY", 255), ("URI", 256), ("CAA", 257), ("AVC", 258),
    ("AMTRELAY", 260), ("RESINFO", 261), ("TA", 32768), ("DLV", 32769),
];

/// miekg/dns's `StringToClass`.
#[rustfmt::skip]
const DNS_CLASSES: &[(&str, u16)] = &[
    ("IN", 1), ("CS", 2), ("CH", 3), ("HS", 4), ("NONE", 254), ("ANY", 255),
];

/// miekg/dns's `StringToRcode` (16 is both BADSIG and BADVERS there).
#[rustfmt::skip]
const DNS_RCODES: &[(&str, u16)] = &[
    ("NOERROR", 0), ("FORMERR", 1), ("SERVFAIL", 2), ("NXDOMAIN", 3), ("NOTIMP", 4),
    ("NOTIMPL", 4), ("REFUSED", 5), ("YXDOMAIN", 6), ("YXRRSET", 7), ("NXRRSET", 8),
    ("NOTAUTH", 9), ("NOTZONE", 10), ("BADSIG", 16), ("BADVERS", 16), ("BADKEY", 17),
    ("BADTIME", 18), ("BADMODE", 19), ("BADNAME", 20), ("BADALG", 21),
    ("BADTRUNC", 22), ("BADCOOKIE", 23),
];

/// True for a header name HTTP accepts (RFC 9110 token characters).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn check_source_ip(prober: &'static str, ip: &Option<String>) -> Result<(), ModuleError> {
    match ip {
        Some(ip) if ip.parse::<std::net::IpAddr>().is_err() => Err(ModuleError::SourceIp {
            prober,
            ip: ip.clone(),
        }),
        _ => Ok(()),
    }
}

fn check_tls(prober: &'static str, tls: &TlsConfig) -> Result<(), ModuleError> {
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(ModuleError::TlsCertWithoutKey { prober });
    }
    let version = |field: &'static str, v: &Option<String>| -> Result<Option<u8>, ModuleError> {
        v.as_deref()
            .map(|name| {
                tls_version_number(name).ok_or_else(|| ModuleError::TlsVersion {
                    prober,
                    field,
                    name: name.to_string(),
                })
            })
            .transpose()
    };
    let min = version("min_version", &tls.min_version)?;
    let max = version("max_version", &tls.max_version)?;
    if let Some(max) = max
        && max < 12
    {
        return Err(ModuleError::TlsTooOld { prober });
    }
    if let (Some(min), Some(max)) = (min, max)
        && min > max
    {
        return Err(ModuleError::TlsMinAboveMax { prober });
    }
    Ok(())
}

/// blackbox_exporter's rules for `enable_http3`, and what HTTP/3 cannot do here.
fn check_http3(http: &HttpProbe) -> Result<(), ModuleError> {
    let h3 = "HTTP/3.0";
    if !http.enable_http3 {
        if http.valid_http_versions.iter().any(|v| v == h3) {
            return Err(ModuleError::Http3Version);
        }
        return Ok(());
    }
    if http.enable_http2 {
        return Err(ModuleError::Http3WithHttp2);
    }
    if let Some(v) = http.valid_http_versions.iter().find(|v| *v != h3) {
        return Err(ModuleError::Http3OtherVersion(v.clone()));
    }
    if http.proxy_url.is_some() {
        return Err(ModuleError::Http3Proxy);
    }
    if http
        .tls_config
        .max_version
        .as_deref()
        .and_then(tls_version_number)
        == Some(12)
    {
        return Err(ModuleError::Http3Tls12);
    }
    Ok(())
}

/// What is wrong with a module, in words that name the option and the fix.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ModuleError {
    #[error("http.valid_status_codes: {0} is not an HTTP status code (100-599)")]
    StatusCode(u16),
    #[error("{option}: invalid regular expression {pattern:?}: {error}")]
    Regex {
        /// The option the pattern is in (`http`, `dns.validate_answer_rrs`, ...).
        option: String,
        pattern: String,
        error: regex::Error,
    },
    #[error("http.method: {0:?} is not an HTTP method (GET, HEAD, POST, ...)")]
    Method(String),
    #[error("http.headers: {0:?} is not a valid header name")]
    HeaderName(String),
    #[error("http.headers: the value of {0:?} contains a line break or NUL byte")]
    HeaderValue(String),
    #[error(
        "http.valid_http_versions: {0:?} is not an HTTP version (HTTP/1.0, HTTP/1.1, HTTP/2.0, HTTP/3.0)"
    )]
    HttpVersion(String),
    #[error("http.valid_http_versions: HTTP/3.0 needs enable_http3: true")]
    Http3Version,
    #[error("http: when enable_http3 is true, enable_http2 must be set to false")]
    Http3WithHttp2,
    #[error(
        "http.valid_http_versions: {0:?} cannot be used with enable_http3 (every request is HTTP/3); list only HTTP/3.0"
    )]
    Http3OtherVersion(String),
    #[error(
        "http: enable_http3 cannot go through proxy_url (HTTP/3 runs over UDP, the proxy takes TCP); drop one of them"
    )]
    Http3Proxy,
    #[error(
        "http: enable_http3 needs TLS 1.3 (QUIC runs over it), but tls_config.max_version is TLS12; drop max_version or set TLS13"
    )]
    Http3Tls12,
    #[error(transparent)]
    OAuth2(#[from] OAuth2Error),
    #[error("http: fail_if_ssl and fail_if_not_ssl together fail every probe, keep one")]
    SslAndNotSsl,
    #[error("http.fail_if_header_matches: {0:?} is not a header name")]
    HeaderMatchName(String),
    #[error("http.basic_auth: set password or password_file, not both")]
    PasswordTwice,
    #[error(
        "http: set at most one of basic_auth, authorization, oauth2, bearer_token and bearer_token_file"
    )]
    AuthSchemes,
    #[error("http.authorization: set credentials or credentials_file, not both")]
    CredentialsTwice,
    #[error("http.authorization: type Basic is set with basic_auth, not authorization")]
    AuthorizationBasic,
    #[error("http.authorization.type: {0:?} is not an authorization scheme (Bearer, ...)")]
    AuthorizationType(String),
    #[error("http: set body or body_file, not both")]
    BodyTwice,
    #[error("http.compression: {0:?} is not one of gzip, deflate, br, identity")]
    Compression(String),
    #[error(
        "http.headers: Accept-Encoding {accept:?} does not admit compression {compression:?}; list it in the header or drop the header"
    )]
    AcceptEncoding { accept: String, compression: String },
    #[error("http.proxy_url: {0:?} is not an http:// proxy URL (like http://proxy.internal:3128)")]
    ProxyUrl(String),
    #[error("tcp.query_response[{step}]: expect and expect_bytes are mutually exclusive, keep one")]
    ExpectAndExpectBytes { step: usize },
    #[error(
        "tcp.query_response[{step}].labels: labels take their values from expect's match, set expect"
    )]
    LabelsWithoutExpect { step: usize },
    #[error("tcp.query_response[{step}].labels: {name:?} is not a valid label name")]
    QueryResponseLabel { step: usize, name: String },
    #[error("dns.query_name is required for the dns prober")]
    QueryNameMissing,
    #[error("dns.query_type: {0:?} is not a DNS record type (A, AAAA, MX, SOA, TXT, ...)")]
    QueryType(String),
    #[error("dns.query_class: {0:?} is not a DNS class (IN, CH, HS, NONE, ANY)")]
    QueryClass(String),
    #[error(
        "dns.valid_rcodes: {0:?} is not an rcode (NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, ...)"
    )]
    Rcode(String),
    #[error("dns.dns_over_tls needs transport_protocol: tcp (DNS over TLS runs over TCP)")]
    DnsOverTlsWithoutTcp,
    #[error(
        "dns.dnssec: trust_anchor_file is set but validate is false; set validate: true or drop trust_anchor_file"
    )]
    DnssecAnchorWithoutValidate,
    #[error(transparent)]
    TrustAnchor(TrustAnchorError),
    #[error(
        "{prober}.source_ip_address: {ip:?} is not an IP address (like 192.0.2.10 or 2001:db8::10)"
    )]
    SourceIp { prober: &'static str, ip: String },
    #[error("{prober}.tls_config: cert_file and key_file go together, set both or neither")]
    TlsCertWithoutKey { prober: &'static str },
    #[error("{prober}.tls_config.{field}: {name:?} is not one of TLS10, TLS11, TLS12, TLS13")]
    TlsVersion {
        prober: &'static str,
        field: &'static str,
        name: String,
    },
    #[error(
        "{prober}.tls_config.max_version: TLS 1.0 and 1.1 are not supported (the agent speaks TLS 1.2 and 1.3), use TLS12 or TLS13"
    )]
    TlsTooOld { prober: &'static str },
    #[error("icmp.ttl: {0} is more than an IP header holds, use 1 to 255 (0: the default, 64)")]
    IcmpTtl(u32),
    #[error(
        "icmp.payload_size: {0} bytes do not fit in one IP packet, use at most 65527 (65507 over IPv4)"
    )]
    IcmpPayload(u32),
    #[error("{prober}.tls_config: min_version is above max_version")]
    TlsMinAboveMax { prober: &'static str },
    #[error(
        "per_address.max_addresses: {0} is out of range, use 1 to {MAX_PER_ADDRESS} (each address adds its own per-agent series)"
    )]
    MaxAddresses(u32),
    #[error("{option}: {problem}")]
    Option { option: String, problem: String },
}

/// gRPC metadata as grpc-go accepts it: lowercase keys of `[0-9a-z-_.]` not in the
/// reserved `grpc-` space, values of printable ASCII (any bytes for `-bin` keys).
fn check_grpc_metadata(metadata: &BTreeMap<String, Vec<String>>) -> Result<(), ModuleError> {
    for (key, values) in metadata {
        let lower = key.to_ascii_lowercase();
        let bad_key = lower.is_empty()
            || lower.starts_with("grpc-")
            || !lower
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b"-_.".contains(&b));
        let bad_value = !lower.ends_with("-bin")
            && values
                .iter()
                .any(|v| !v.bytes().all(|b| (0x20..0x7f).contains(&b)));
        if bad_key || bad_value {
            return Err(ModuleError::Option {
                option: format!("grpc.metadata.{key}"),
                problem: if bad_key {
                    "a metadata key is letters, digits, '-', '_' and '.', and does not start with grpc- (reserved)".into()
                } else {
                    "a value is printable ASCII (use a key ending in -bin for binary values)".into()
                },
            });
        }
    }
    Ok(())
}

/// Compiles a regex of `option`, only to check it.
fn compile(option: &str, pattern: &str) -> Result<(), ModuleError> {
    regex::Regex::new(pattern)
        .map(drop)
        .map_err(|error| ModuleError::Regex {
            option: option.to_string(),
            pattern: pattern.to_string(),
            error,
        })
}

/// The compression algorithms blackbox_exporter decompresses a body with.
const COMPRESSIONS: [&str; 4] = ["gzip", "deflate", "br", "identity"];

/// blackbox_exporter's check that an `Accept-Encoding` header admits the configured
/// `compression` (listed with a non-zero quality, or `*`).
fn accept_encoding_admits(compression: &str, accept: &str) -> bool {
    if compression.is_empty() || accept.is_empty() {
        return true;
    }
    let mut encodings: Vec<(String, f32)> = accept
        .split(',')
        .map(|part| match part.rsplit_once(';') {
            None => (part.trim().to_string(), 1.0),
            Some((name, q)) => {
                let q = q.trim();
                let q = q.strip_prefix("q=").unwrap_or(q);
                (name.trim().to_string(), q.parse::<f32>().unwrap_or(0.0))
            }
        })
        .collect();
    encodings.sort_by(|a, b| b.1.total_cmp(&a.1));
    encodings
        .iter()
        .find(|(name, _)| name == compression || name == "*")
        .is_some_and(|(_, q)| *q > 0.0)
}

impl Module {
    /// Checks what serde cannot: regexes compile, values are in range, the prober's
    /// required options are present. The message names the option and the fix.
    pub fn validate(&self) -> Result<(), ModuleError> {
        if let Some(p) = &self.per_address
            && !(1..=MAX_PER_ADDRESS).contains(&p.max_addresses)
        {
            return Err(ModuleError::MaxAddresses(p.max_addresses));
        }
        match self.prober {
            Prober::Http => {
                for code in &self.http.valid_status_codes {
                    if !(100..=599).contains(code) {
                        return Err(ModuleError::StatusCode(*code));
                    }
                }
                for re in self
                    .http
                    .fail_if_body_matches_regexp
                    .iter()
                    .chain(&self.http.fail_if_body_not_matches_regexp)
                {
                    compile("http", re)?;
                }
                websocket::check_header_map(
                    "http.http_headers",
                    self.http
                        .http_headers
                        .iter()
                        .map(|(k, v)| (k, HeaderValues::Sources(v.clone()))),
                )?;
                websocket::check_header_map(
                    "http.proxy_connect_header",
                    self.http
                        .proxy_connect_header
                        .iter()
                        .map(|(k, v)| (k, HeaderValues::Many(v.clone()))),
                )?;
                for (option, expression) in [
                    (
                        "http.fail_if_body_json_matches_cel",
                        &self.http.fail_if_body_json_matches_cel,
                    ),
                    (
                        "http.fail_if_body_json_not_matches_cel",
                        &self.http.fail_if_body_json_not_matches_cel,
                    ),
                ] {
                    if let Some(expression) = expression {
                        compile_cel(option, expression)?;
                    }
                }
                if self.http.method.is_empty()
                    || !self.http.method.bytes().all(|b| b.is_ascii_alphabetic())
                {
                    return Err(ModuleError::Method(self.http.method.clone()));
                }
                for (name, value) in &self.http.headers {
                    if !is_header_name(name) {
                        return Err(ModuleError::HeaderName(name.clone()));
                    }
                    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                        return Err(ModuleError::HeaderValue(name.clone()));
                    }
                }
                // As blackbox_exporter, any version text is taken (an `HTTP/2` never
                // matches, responses say `HTTP/2.0`); only what is no version at all is
                // refused.
                for v in &self.http.valid_http_versions {
                    if !v.starts_with("HTTP/") || v.len() == "HTTP/".len() {
                        return Err(ModuleError::HttpVersion(v.clone()));
                    }
                }
                check_http3(&self.http)?;
                if self.http.fail_if_ssl && self.http.fail_if_not_ssl {
                    return Err(ModuleError::SslAndNotSsl);
                }
                check_tls("http", &self.http.tls_config)?;
                for m in self
                    .http
                    .fail_if_header_matches
                    .iter()
                    .chain(&self.http.fail_if_header_not_matches)
                {
                    if !is_header_name(&m.header) {
                        return Err(ModuleError::HeaderMatchName(m.header.clone()));
                    }
                    compile("http", &m.regexp)?;
                }
                let http = &self.http;
                if let Some(auth) = &http.basic_auth
                    && auth.password.is_some()
                    && auth.password_file.is_some()
                {
                    return Err(ModuleError::PasswordTwice);
                }
                let schemes = usize::from(http.basic_auth.is_some())
                    + usize::from(http.bearer_token.is_some())
                    + usize::from(http.bearer_token_file.is_some())
                    + usize::from(http.authorization.is_some())
                    + usize::from(http.oauth2.is_some());
                if schemes > 1 {
                    return Err(ModuleError::AuthSchemes);
                }
                if let Some(auth) = &http.authorization {
                    if auth.credentials.is_some() && auth.credentials_file.is_some() {
                        return Err(ModuleError::CredentialsTwice);
                    }
                    if auth.kind.eq_ignore_ascii_case("basic") {
                        return Err(ModuleError::AuthorizationBasic);
                    }
                    if auth.kind.is_empty() || !is_header_name(&auth.kind) {
                        return Err(ModuleError::AuthorizationType(auth.kind.clone()));
                    }
                }
                if let Some(oauth2) = &http.oauth2 {
                    oauth2.validate()?;
                    check_tls("http.oauth2", &oauth2.tls_config)?;
                }
                if http.body.is_some() && http.body_file.is_some() {
                    return Err(ModuleError::BodyTwice);
                }
                let compression = http.compression.to_ascii_lowercase();
                if !compression.is_empty() && !COMPRESSIONS.contains(&compression.as_str()) {
                    return Err(ModuleError::Compression(http.compression.clone()));
                }
                for (name, value) in &http.headers {
                    if name.eq_ignore_ascii_case("accept-encoding")
                        && !accept_encoding_admits(&compression, value)
                    {
                        return Err(ModuleError::AcceptEncoding {
                            accept: value.clone(),
                            compression: http.compression.clone(),
                        });
                    }
                }
                if let Some(proxy) = &http.proxy_url {
                    let ok = proxy
                        .strip_prefix("http://")
                        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
                    if !ok {
                        return Err(ModuleError::ProxyUrl(proxy.clone()));
                    }
                }
            }
            Prober::Tcp => {
                check_source_ip("tcp", &self.tcp.source_ip_address)?;
                check_tls("tcp", &self.tcp.tls_config)?;
                for (step, qr) in self.tcp.query_response.iter().enumerate() {
                    if qr.expect.is_some() && qr.expect_bytes.is_some() {
                        return Err(ModuleError::ExpectAndExpectBytes { step });
                    }
                    if let Some(re) = &qr.expect {
                        regex::Regex::new(re).map_err(|error| ModuleError::Regex {
                            option: format!("tcp.query_response[{step}].expect"),
                            pattern: re.clone(),
                            error,
                        })?;
                    }
                    if !qr.labels.is_empty() && qr.expect.is_none() {
                        return Err(ModuleError::LabelsWithoutExpect { step });
                    }
                    for label in &qr.labels {
                        if !super::is_valid_label_name(&label.name) {
                            return Err(ModuleError::QueryResponseLabel {
                                step,
                                name: label.name.clone(),
                            });
                        }
                    }
                }
            }
            Prober::Dns => {
                if self.dns.query_name.is_empty() {
                    return Err(ModuleError::QueryNameMissing);
                }
                if self.dns.query_type_code().is_none() {
                    return Err(ModuleError::QueryType(self.dns.query_type.clone()));
                }
                if self.dns.query_class_code().is_none() {
                    return Err(ModuleError::QueryClass(self.dns.query_class.clone()));
                }
                self.dns.valid_rcode_codes()?;
                for (section, v) in [
                    ("validate_answer_rrs", &self.dns.validate_answer_rrs),
                    ("validate_authority_rrs", &self.dns.validate_authority_rrs),
                    ("validate_additional_rrs", &self.dns.validate_additional_rrs),
                ] {
                    for re in v.regexes() {
                        regex::Regex::new(re).map_err(|error| ModuleError::Regex {
                            option: format!("dns.{section}"),
                            pattern: re.clone(),
                            error,
                        })?;
                    }
                }
                check_source_ip("dns", &self.dns.source_ip_address)?;
                if self.dns.dns_over_tls && self.dns.transport_protocol != DnsTransport::Tcp {
                    return Err(ModuleError::DnsOverTlsWithoutTcp);
                }
                check_tls("dns", &self.dns.tls_config)?;
                self.dns.dnssec.validate()?;
            }
            Prober::Icmp => {
                check_source_ip("icmp", &self.icmp.source_ip_address)?;
                if self.icmp.ttl > 255 {
                    return Err(ModuleError::IcmpTtl(self.icmp.ttl));
                }
                if self.icmp.payload_size > IcmpProbe::MAX_PAYLOAD {
                    return Err(ModuleError::IcmpPayload(self.icmp.payload_size));
                }
            }
            Prober::Grpc => {
                check_tls("grpc", &self.grpc.tls_config)?;
                check_grpc_metadata(&self.grpc.metadata)?;
            }
            Prober::Unix => self.unix.validate()?,
            Prober::Websocket => self.websocket.validate()?,
            Prober::Multihttp => {
                if self.per_address.is_some() {
                    return Err(ModuleError::Option {
                        option: "per_address".into(),
                        problem: "a multihttp check's steps may reach several hosts, it is not probed per address; remove per_address".into(),
                    });
                }
                self.multihttp.validate()?
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
    fn per_address_has_bounded_defaults() {
        let m: Module = serde_json::from_str(r#"{"prober":"http","per_address":{}}"#).unwrap();
        let per = m.per_address.clone().unwrap();
        assert_eq!(per.max_addresses, 8);
        assert_eq!(per.must_succeed, super::super::Quorum::All);
        assert_eq!(m.validate(), Ok(()));
        let any: Module = serde_json::from_str(
            r#"{"prober":"tcp","per_address":{"max_addresses":16,"must_succeed":"any"}}"#,
        )
        .unwrap();
        assert_eq!(
            any.per_address.unwrap().must_succeed,
            super::super::Quorum::AtLeast(1)
        );
        for max in [0, MAX_PER_ADDRESS + 1] {
            let mut m = m.clone();
            m.per_address.as_mut().unwrap().max_addresses = max;
            let e = m.validate().unwrap_err().to_string();
            assert!(e.starts_with("per_address.max_addresses"), "{e}");
        }
        assert!(
            serde_json::from_str::<Module>(r#"{"prober":"http","per_address":{"all":true}}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<Module>(
                r#"{"prober":"http","per_address":{"must_succeed":"most"}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn dns_names_follow_blackbox() {
        let mut m: Module =
            serde_json::from_str(r#"{"prober":"dns","dns":{"query_name":"example.com"}}"#).unwrap();
        assert_eq!(m.dns.query_type_code(), Some(255));
        assert_eq!(m.dns.query_class_code(), Some(1));
        assert_eq!(m.dns.valid_rcode_codes(), Ok(vec![0]));
        m.dns.query_type = "SOA".into();
        m.dns.valid_rcodes = vec!["NOERROR".into(), "NXDOMAIN".into()];
        assert_eq!(m.dns.query_type_code(), Some(6));
        assert_eq!(m.dns.valid_rcode_codes(), Ok(vec![0, 3]));
        m.validate().unwrap();
        m.dns.query_type = "a".into();
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("dns.query_type")
        );
        m.dns.query_type = "A".into();
        m.dns.valid_rcodes = vec!["NOPE".into()];
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("dns.valid_rcodes")
        );
        assert_eq!(dns_rcode_name(3), Some("NXDOMAIN"));
        m.dns.valid_rcodes.clear();
        m.dns.validate_answer_rrs.fail_if_none_matches_regexp = vec!["(".into()];
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("dns.validate_answer_rrs")
        );
    }

    #[test]
    fn http_checks() {
        let mut m: Module = serde_json::from_str(
            r#"{"prober":"http","http":{"body_size_limit":"1MiB","enable_http2":false}}"#,
        )
        .unwrap();
        assert_eq!(m.http.body_size_limit, ByteSize(1 << 20));
        assert!(!m.http.enable_http2);
        m.validate().unwrap();
        m.http.headers.insert("X-Bad\nName".into(), "v".into());
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("http.headers")
        );
        m.http.headers.clear();
        m.http.bearer_token = Some("t".into());
        m.http.basic_auth = Some(BasicAuth {
            username: "u".into(),
            password: None,
            password_file: None,
        });
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("at most one")
        );
        m.http.bearer_token = None;
        m.validate().unwrap();
        m.http.fail_if_header_matches = vec![HeaderMatch {
            header: "Content-Type".into(),
            regexp: "(".into(),
            allow_missing: false,
        }];
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("regular expression")
        );
        m.http.fail_if_header_matches.clear();
        m.http.valid_http_versions = vec!["HTTP/2".into()];
        m.validate().unwrap();
        m.http.valid_http_versions = vec!["1.1".into()];
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("valid_http_versions")
        );
    }

    #[test]
    fn enable_http3_follows_blackbox_rules() {
        let load = |http: serde_json::Value| {
            let m: Module =
                serde_json::from_value(serde_json::json!({"prober": "http", "http": http}))
                    .unwrap();
            m.validate().map(|()| m).map_err(|e| e.to_string())
        };
        let m = load(serde_json::json!({
            "enable_http3": true, "enable_http2": false, "valid_http_versions": ["HTTP/3.0"]
        }))
        .unwrap();
        assert!(m.http.enable_http3);
        for (http, says) in [
            (
                serde_json::json!({"enable_http3": true}),
                "enable_http2 must be set to false",
            ),
            (
                serde_json::json!({"valid_http_versions": ["HTTP/3.0"]}),
                "HTTP/3.0 needs enable_http3",
            ),
            (
                serde_json::json!({"enable_http3": true, "enable_http2": false,
                    "valid_http_versions": ["HTTP/1.1", "HTTP/3.0"]}),
                "\"HTTP/1.1\" cannot be used with enable_http3",
            ),
            (
                serde_json::json!({"enable_http3": true, "enable_http2": false,
                    "proxy_url": "http://proxy:3128"}),
                "cannot go through proxy_url",
            ),
            (
                serde_json::json!({"enable_http3": true, "enable_http2": false,
                    "tls_config": {"max_version": "TLS12"}}),
                "needs TLS 1.3",
            ),
        ] {
            let error = load(http.clone()).unwrap_err();
            assert!(error.contains(says), "{http}: {error}");
        }
        // Not written when off, so a module spec without it reads the same everywhere.
        let off = serde_json::to_value(HttpProbe::default()).unwrap();
        assert!(off.get("enable_http3").is_none());
    }

    #[test]
    fn issue3_options_parse_and_validate() {
        let m: Module = serde_json::from_value(serde_json::json!({
            "prober": "tcp",
            "tcp": {
                "query_response": [
                    {"expect": "^220 (.+)$", "send": "EHLO ${1}\r",
                     "labels": [{"name": "banner", "value": "${1}"}]},
                    {"expect_bytes": "OK", "starttls": true},
                ],
                "tls_config": {"min_version": "TLS12", "max_version": "TLS13"},
            }
        }))
        .unwrap();
        m.validate().unwrap();
        assert_eq!(m.tcp.query_response.len(), 2);
        assert!(m.tcp.query_response[1].starttls);
        let mut bad = m.clone();
        bad.tcp.query_response[0].expect_bytes = Some("x".into());
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("mutually exclusive")
        );
        let mut bad = m.clone();
        bad.tcp.query_response[0].labels[0].name = "bad-name".into();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("label name")
        );
        let mut bad = m.clone();
        bad.tcp.query_response[0].expect = Some("(".into());
        assert!(bad.validate().unwrap_err().to_string().contains("expect"));

        let h: Module = serde_json::from_value(serde_json::json!({
            "prober": "http",
            "http": {"authorization": {"credentials": "t"}, "compression": "br",
                     "proxy_url": "http://proxy:3128", "body_file": "/tmp/b"}
        }))
        .unwrap();
        h.validate().unwrap();
        assert_eq!(h.http.authorization.as_ref().unwrap().kind, "Bearer");
        let mut bad = h.clone();
        bad.http.bearer_token = Some("t".into());
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("at most one")
        );
        let mut bad = h.clone();
        bad.http.compression = "zstd".into();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("http.compression")
        );
        assert!(accept_encoding_admits("gzip", "br;q=1.0, gzip;q=0.9"));
        assert!(accept_encoding_admits("gzip", "*"));
        assert!(!accept_encoding_admits("gzip", "br, gzip;q=0"));
        assert!(!accept_encoding_admits("gzip", "br"));
        let unknown = serde_json::from_value::<Module>(serde_json::json!({
            "prober": "tcp", "tcp": {"query_response": [{"expekt": "x"}]}
        }));
        assert!(unknown.is_err());
    }

    #[test]
    fn errors_read_as_before_they_were_types() {
        let m: Module = serde_json::from_value(serde_json::json!({
            "prober": "tcp",
            "tcp": {"tls_config": {"min_version": "SSL3"},
                    "query_response": [{"expect": "("}]},
        }))
        .unwrap();
        assert_eq!(
            m.validate().unwrap_err().to_string(),
            "tcp.tls_config.min_version: \"SSL3\" is not one of TLS10, TLS11, TLS12, TLS13"
        );
        let mut m = m;
        m.tcp.tls_config.min_version = None;
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .starts_with("tcp.query_response[0].expect: invalid regular expression \"(\": ")
        );
        assert_eq!(
            ModuleError::SourceIp {
                prober: "dns",
                ip: "x".into()
            }
            .to_string(),
            "dns.source_ip_address: \"x\" is not an IP address (like 192.0.2.10 or 2001:db8::10)"
        );
    }

    #[test]
    fn icmp_and_grpc_sections_travel_only_when_set() {
        let http: Module = serde_json::from_str(r#"{"prober":"http"}"#).unwrap();
        let json = serde_json::to_string(&http).unwrap();
        assert!(!json.contains("icmp") && !json.contains("grpc"), "{json}");
        let grpc: Module = serde_json::from_value(serde_json::json!({
            "prober": "grpc", "grpc": {"service": "s", "tls": true}
        }))
        .unwrap();
        let again: Module = serde_json::from_str(&serde_json::to_string(&grpc).unwrap()).unwrap();
        assert_eq!(grpc, again);
        let icmp: Module = serde_json::from_value(serde_json::json!({
            "prober": "icmp", "icmp": {"ttl": 5, "dont_fragment": true}
        }))
        .unwrap();
        let again: Module = serde_json::from_str(&serde_json::to_string(&icmp).unwrap()).unwrap();
        assert_eq!(icmp, again);
        assert_eq!(again.icmp.ttl, 5);
        icmp.validate().unwrap();
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
