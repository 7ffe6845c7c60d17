//! The http prober: blackbox_exporter's `http` module. One request, following up to 10
//! redirects, each over a fresh connection that this file drives itself (TCP connect,
//! TLS handshake with ALPN, HTTP/1.1 or HTTP/2) so that every phase can be timed.
//!
//! Samples keep blackbox_exporter's names and meaning: phase durations are summed over
//! the redirects, everything else describes the final response. Each sample is written
//! as soon as it is known, so a probe cut short by its deadline still reports the
//! phases it got through.

use super::decode::{Algorithm, Body, BodyError};
use super::tcp::{Io, TlsClient, TlsFacts, connect};
use super::{Because, Env, Failure, Reason, Samples, Stage, choose_ip, resolve_target};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sonde_proto::config::Module;
use sonde_proto::config::module::HttpProbe;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use url::Url;

/// Go's http.Client gives up after 10 redirects; blackbox_exporter inherits that.
const MAX_REDIRECTS: u32 = 10;
const DURATION: &str = "probe_http_duration_seconds";
const USER_AGENT: &str = concat!("sonde/", env!("CARGO_PKG_VERSION"));

pub async fn probe(
    ctx: &Env<'_>,
    target: &str,
    module: &Module,
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.http;
    for phase in ["resolve", "connect", "tls", "processing", "transfer"] {
        out.add_with(DURATION, &[("phase", phase)], 0.0);
    }
    for name in [
        "probe_http_content_length",
        "probe_http_uncompressed_body_length",
        "probe_http_redirects",
        "probe_http_ssl",
        "probe_http_status_code",
        "probe_http_version",
        "probe_failed_due_to_regex",
    ] {
        out.set(name, 0.0);
    }

    let url = target_url(target).because(Reason::Config)?;
    let host = url_host(&url).because(Reason::Config)?;
    // Everything that can fail on the module alone fails before any network work.
    let algorithm = Algorithm::from_config(&cfg.compression).because(Reason::Config)?;
    let proxy = cfg
        .proxy_url
        .as_deref()
        .map(Proxy::parse)
        .transpose()
        .because(Reason::Config)?;
    let body = match (&cfg.body, &cfg.body_file) {
        (_, Some(path)) => Some(Bytes::from(std::fs::read(path).map_err(|e| {
            Failure::new(Reason::Config, format!("http.body_file {path}: {e}"))
        })?)),
        (Some(body), None) => Some(Bytes::from(body.clone())),
        (None, None) => None,
    };
    let authorization = authorization(cfg).because(Reason::Config)?;
    // The target's name is resolved even through a proxy (for probe_ip_* and the
    // resolve phase), unless skip_resolve_phase_with_proxy says the agent cannot.
    let ip = if proxy.is_some() && cfg.skip_resolve_phase_with_proxy {
        None
    } else {
        let (ip, lookup) = resolve_target(
            ctx,
            &host,
            cfg.preferred_ip_protocol,
            cfg.ip_protocol_fallback,
            out,
        )
        .await?;
        out.add_with(DURATION, &[("phase", "resolve")], lookup.as_secs_f64());
        Some(ip)
    };

    let host_override = cfg
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.clone());
    // SNI: the configured server_name, else the Host header override (so that an IP
    // target with a Host header verifies against the name), else the URL's host.
    let sni = cfg
        .tls_config
        .server_name
        .clone()
        .or_else(|| host_override.clone())
        .unwrap_or_else(|| host.clone());
    let method = Method::from_bytes(cfg.method.as_bytes())
        .map_err(|_| format!("http.method {:?} is not an HTTP method", cfg.method))
        .because(Reason::Config)?;
    let mut hop = Hop {
        host_header: host_override.unwrap_or_else(|| authority(&url)),
        url,
        ip,
        sni,
        method,
        body,
        same_site: true,
    };
    let mut session = Session {
        ctx,
        cfg,
        authorization,
        algorithm,
        proxy,
        tls: None,
        first_host: host,
        cookies: Vec::new(),
    };
    let mut redirects = 0;
    loop {
        match session.exchange(&hop, redirects, out).await? {
            HopEnd::Final(last) => return last.check(ctx, cfg, out),
            HopEnd::Redirect { status, next } => {
                redirects += 1;
                out.set("probe_http_redirects", f64::from(redirects));
                hop = hop.follow(status, next, &session.first_host);
            }
        }
    }
}

/// blackbox_exporter adds `http://` to a target without a scheme.
fn target_url(target: &str) -> Result<Url, String> {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let full = if lower.starts_with("http://") || lower.starts_with("https://") {
        target.to_string()
    } else {
        format!("http://{target}")
    };
    let url = Url::parse(&full).map_err(|e| format!("target {target:?} is not a URL: {e}"))?;
    url_host(&url)?;
    Ok(url)
}

/// The URL's host, IPv6 addresses without their brackets.
fn url_host(url: &Url) -> Result<String, String> {
    match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => Ok(d.to_string()),
        Some(url::Host::Ipv4(ip)) => Ok(ip.to_string()),
        Some(url::Host::Ipv6(ip)) => Ok(ip.to_string()),
        _ => Err(format!("URL {url} has no host")),
    }
}

/// `host[:port]` as it goes in a Host header (the port only when the URL has one).
fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// One request of the chain.
struct Hop {
    url: Url,
    /// Where to connect; `None` means resolve the URL's host.
    ip: Option<IpAddr>,
    /// Host (HTTP/1) or :authority (HTTP/2).
    host_header: String,
    sni: String,
    method: Method,
    body: Option<Bytes>,
    /// False once a redirect leaves the first host: credentials are not sent there.
    same_site: bool,
}

impl Hop {
    /// The next request after a redirect, as Go's http.Client builds it.
    fn follow(self, status: StatusCode, next: Url, first_host: &str) -> Hop {
        // 301/302 turn a POST into a GET and 303 anything but HEAD; only 307/308 resend
        // the body.
        let (method, body) = match status.as_u16() {
            301 | 302 if self.method == Method::POST => (Method::GET, None),
            303 if self.method != Method::HEAD => (Method::GET, None),
            307 | 308 => (self.method, self.body),
            _ => (self.method, None),
        };
        let same_authority = next.scheme() == self.url.scheme()
            && next.host_str() == self.url.host_str()
            && next.port_or_known_default() == self.url.port_or_known_default();
        if same_authority {
            // A relative Location, or one to the same place: same address, same Host
            // header and server name, as Go keeps them for relative redirects.
            return Hop {
                url: next,
                method,
                body,
                ..self
            };
        }
        let host = url_host(&next).unwrap_or_default();
        let same_site =
            self.same_site && (host == first_host || host.ends_with(&format!(".{first_host}")));
        Hop {
            host_header: authority(&next),
            sni: host,
            url: next,
            ip: None,
            method,
            body,
            same_site,
        }
    }
}

enum HopEnd {
    Redirect { status: StatusCode, next: Url },
    Final(FinalResponse),
}

/// What the checks after the last response need.
struct FinalResponse {
    status: StatusCode,
    version: Version,
    tls: bool,
    /// Kept only when header regexes need them.
    headers: Option<HeaderMap>,
    /// Set when the body was not read (a redirect that was not followed).
    body: Option<BodyRead>,
    /// Why the body could not be read to its end.
    body_error: Option<Failure>,
}

pub(crate) struct BodyRead {
    /// The first [`HttpProbe::MAX_MATCHED_BODY`] bytes, when regexes need them.
    pub(crate) kept: Vec<u8>,
    pub(crate) truncated: bool,
}

/// An HTTP proxy from `proxy_url`.
struct Proxy {
    host: String,
    port: u16,
    /// `Basic ...` from the URL's user info.
    authorization: Option<HeaderValue>,
}

impl Proxy {
    fn parse(raw: &str) -> Result<Self, String> {
        let url = Url::parse(raw).map_err(|e| format!("http.proxy_url {raw:?}: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "http.proxy_url {raw:?}: only http:// proxies are supported"
            ));
        }
        let host = url_host(&url)?;
        let port = url.port_or_known_default().unwrap_or(80);
        let authorization = if url.username().is_empty() {
            None
        } else {
            let decode = |s: &str| {
                url::form_urlencoded::parse(s.as_bytes())
                    .map(|(k, v)| {
                        if v.is_empty() {
                            k
                        } else {
                            format!("{k}={v}").into()
                        }
                    })
                    .collect::<String>()
            };
            let user = decode(url.username());
            let pass = decode(url.password().unwrap_or_default());
            let mut v = HeaderValue::from_str(&format!(
                "Basic {}",
                base64(format!("{user}:{pass}").as_bytes())
            ))
            .map_err(|_| "http.proxy_url: the credentials are not a header value".to_string())?;
            v.set_sensitive(true);
            Some(v)
        };
        Ok(Self {
            host,
            port,
            authorization,
        })
    }
}

/// State shared by the hops of one probe.
struct Session<'a> {
    ctx: &'a Env<'a>,
    cfg: &'a HttpProbe,
    /// From basic_auth, authorization or the bearer token, for every request.
    authorization: Option<HeaderValue>,
    algorithm: Option<Algorithm>,
    proxy: Option<Proxy>,
    /// Built on the first https hop, so a plain-http probe never pays for it.
    tls: Option<TlsClient>,
    first_host: String,
    /// Cookies set by redirect responses, sent on the next hops to the same host (the
    /// login-redirect pattern blackbox_exporter's cookie jar supports): (host, name=value).
    cookies: Vec<(String, String)>,
}

impl Session<'_> {
    async fn exchange(
        &mut self,
        hop: &Hop,
        redirects: u32,
        out: &mut Samples,
    ) -> Result<HopEnd, Failure> {
        let https = match hop.url.scheme() {
            "http" => false,
            "https" => true,
            other => {
                return Err(Failure::new(
                    Reason::Config,
                    format!("unsupported URL scheme {other:?} in {}", hop.url),
                ));
            }
        };
        // Built before any network work, so a bad ca_file or header fails the probe
        // without touching the target.
        if https && self.tls.is_none() {
            let alpn: &[&[u8]] = if self.cfg.enable_http2 {
                &[b"h2", b"http/1.1"]
            } else {
                &[b"http/1.1"]
            };
            self.tls =
                Some(TlsClient::new(self.ctx, &self.cfg.tls_config, alpn).because(Reason::Config)?);
        }
        let request = self.request(hop).because(Reason::Config)?;
        let port = hop
            .url
            .port_or_known_default()
            .ok_or_else(|| Failure::new(Reason::Config, format!("URL {} has no port", hop.url)))?;
        let host = url_host(&hop.url).because(Reason::Config)?;
        // Where the TCP connection goes: the proxy when there is one, else this hop's
        // host (resolved now for a redirect to another host).
        let (connect_host, connect_port, known_ip) = match &self.proxy {
            Some(p) => (p.host.clone(), p.port, None),
            None => (host.clone(), port, hop.ip),
        };
        let ip = match known_ip {
            Some(ip) => ip,
            None => {
                out.stage = Stage::Resolve;
                let started = Instant::now();
                let ip = choose_ip(
                    self.ctx,
                    &connect_host,
                    self.cfg.preferred_ip_protocol,
                    self.cfg.ip_protocol_fallback,
                )
                .await;
                out.add_with(
                    DURATION,
                    &[("phase", "resolve")],
                    started.elapsed().as_secs_f64(),
                );
                ip.because(Reason::Dns)?
            }
        };
        let addr = SocketAddr::new(ip, connect_port);
        // Every hop, the first and each redirect, passes the connect policy on the
        // address it resolved to, before any packet is sent there.
        if self.proxy.is_some() {
            self.ctx.allow_via_proxy(&host, port, addr)?;
        } else {
            self.ctx.allow(&connect_host, addr)?;
        }

        out.stage = Stage::Connect;
        let started = Instant::now();
        let mut tcp: Io = Box::new(connect(addr, None).await?);
        out.add_with(
            DURATION,
            &[("phase", "connect")],
            started.elapsed().as_secs_f64(),
        );
        out.stage = Stage::Exchange;
        if https && let Some(proxy) = &self.proxy {
            tunnel(&mut tcp, proxy, &hop.url, port).await?;
        }

        if let (true, Some(client)) = (https, &self.tls) {
            let started = Instant::now();
            let stream = client.handshake(self.ctx, &hop.sni, tcp, out).await;
            // Timed even when it fails: how long a broken handshake took is part of the
            // diagnosis (blackbox_exporter drops the phases of a failed connection).
            out.add_with(
                DURATION,
                &[("phase", "tls")],
                started.elapsed().as_secs_f64(),
            );
            let stream = stream?;
            let conn = stream.get_ref().1;
            let h2 = conn.alpn_protocol() == Some(b"h2");
            let facts = TlsFacts::read(self.ctx, conn, client);
            self.roundtrip(stream, h2, request, hop, Some(facts), redirects, out)
                .await
        } else {
            self.roundtrip(tcp, false, request, hop, None, redirects, out)
                .await
        }
    }

    /// The request of one hop, without its URI (which depends on the HTTP version).
    fn request(&self, hop: &Hop) -> Result<Request<Full<Bytes>>, String> {
        let mut req = Request::new(Full::new(hop.body.clone().unwrap_or_default()));
        *req.method_mut() = hop.method.clone();
        let headers = req.headers_mut();
        for (name, value) in &self.cfg.headers {
            if name.eq_ignore_ascii_case("host") {
                continue;
            }
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("http.headers: {name:?} is not a header name"))?;
            let sensitive = [
                header::AUTHORIZATION,
                header::COOKIE,
                header::WWW_AUTHENTICATE,
            ]
            .contains(&name);
            if sensitive && !hop.same_site {
                continue;
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("http.headers: the value of {name} is not a header value"))?;
            headers.insert(name, value);
        }
        if let Some(auth) = &self.authorization
            && !headers.contains_key(header::AUTHORIZATION)
        {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        }
        let host = url_host(&hop.url).unwrap_or_default();
        let jar: Vec<&str> = self
            .cookies
            .iter()
            .filter(|(h, _)| *h == host)
            .map(|(_, c)| c.as_str())
            .collect();
        if !jar.is_empty()
            && let Ok(v) = HeaderValue::from_str(&jar.join("; "))
        {
            headers.append(header::COOKIE, v);
        }
        Ok(req)
    }

    #[allow(clippy::too_many_arguments)]
    async fn roundtrip<S>(
        &mut self,
        io: S,
        h2: bool,
        mut req: Request<Full<Bytes>>,
        hop: &Hop,
        tls: Option<TlsFacts>,
        redirects: u32,
        out: &mut Samples,
    ) -> Result<HopEnd, Failure>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let path = match hop.url.query() {
            Some(q) => format!("{}?{q}", hop.url.path()),
            None => hop.url.path().to_string(),
        };
        let via_proxy = self.proxy.is_some() && hop.url.scheme() == "http";
        let uri = if h2 {
            format!("{}://{}{path}", hop.url.scheme(), hop.host_header)
        } else if via_proxy {
            // A plain-http request through a proxy names the whole URL (absolute form).
            let host = HeaderValue::from_str(&hop.host_header)
                .map_err(|_| format!("Host {:?} is not a header value", hop.host_header))
                .because(Reason::Config)?;
            req.headers_mut().insert(header::HOST, host);
            if let Some(auth) = self.proxy.as_ref().and_then(|p| p.authorization.clone()) {
                req.headers_mut().insert(header::PROXY_AUTHORIZATION, auth);
            }
            format!("http://{}{path}", authority(&hop.url))
        } else {
            let host = HeaderValue::from_str(&hop.host_header)
                .map_err(|_| format!("Host {:?} is not a header value", hop.host_header))
                .because(Reason::Config)?;
            req.headers_mut().insert(header::HOST, host);
            path
        };
        *req.uri_mut() = uri
            .parse::<Uri>()
            .map_err(|e| format!("request URI {uri:?}: {e}"))
            .because(Reason::Config)?;
        if h2 {
            *req.version_mut() = Version::HTTP_2;
        }

        let ready = Instant::now();
        let (mut sender, conn) = handshake(io, h2).await?;
        let work = async {
            let resp = sender
                .send(req)
                .await
                .map_err(|e| format!("request: {}", hyper_reason(&e)))?;
            let first_byte = Instant::now();
            out.add_with(
                DURATION,
                &[("phase", "processing")],
                first_byte.duration_since(ready).as_secs_f64(),
            );
            self.respond(resp, hop, tls, redirects, first_byte, out)
                .await
        };
        drive(conn, work).await
    }

    /// Either the next URL of a redirect to follow, or the final response with the
    /// samples that describe it already written.
    async fn respond(
        &mut self,
        resp: Response<Incoming>,
        hop: &Hop,
        tls: Option<TlsFacts>,
        redirects: u32,
        first_byte: Instant,
        out: &mut Samples,
    ) -> Result<HopEnd, Failure> {
        let status = resp.status();
        let mut stopped_redirect = false;
        if let Some(next) = redirect_location(&resp, &hop.url) {
            // Go's CheckRedirect sees this as the (redirects+1)th and refuses past 10 or
            // when redirects are off; the redirect response is then the final one.
            if self.cfg.follows_redirects() && redirects < MAX_REDIRECTS {
                self.keep_cookies(&hop.url, resp.headers());
                return Ok(HopEnd::Redirect { status, next });
            }
            stopped_redirect = true;
            out.set("probe_http_redirects", f64::from(redirects + 1));
        }

        out.set("probe_http_status_code", f64::from(status.as_u16()));
        out.set(
            "probe_http_content_length",
            content_length(&resp, &hop.method),
        );
        out.set("probe_http_version", version_number(resp.version()));
        out.set("probe_http_ssl", if tls.is_some() { 1.0 } else { 0.0 });
        if let Some(facts) = &tls {
            facts.record(out, true);
        }
        if let Some(t) = resp
            .headers()
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_http_date)
        {
            out.set("probe_http_last_modified_timestamp_seconds", t as f64);
        }

        let version = resp.version();
        let matches_headers = !(self.cfg.fail_if_header_matches.is_empty()
            && self.cfg.fail_if_header_not_matches.is_empty());
        let mut last = FinalResponse {
            status,
            version,
            tls: tls.is_some(),
            headers: matches_headers.then(|| resp.headers().clone()),
            body: None,
            body_error: None,
        };
        if !stopped_redirect {
            let keep = status_ok(self.cfg, status)
                && !(self.cfg.fail_if_body_matches_regexp.is_empty()
                    && self.cfg.fail_if_body_not_matches_regexp.is_empty());
            let (body, error) =
                read_body(resp.into_body(), self.cfg, self.algorithm, keep, out).await;
            last.body = Some(body);
            last.body_error = error;
        }
        out.add_with(
            DURATION,
            &[("phase", "transfer")],
            first_byte.elapsed().as_secs_f64(),
        );
        Ok(HopEnd::Final(last))
    }

    fn keep_cookies(&mut self, url: &Url, headers: &HeaderMap) {
        // Bounded: a hostile target could set thousands over ten redirects.
        const MAX_COOKIES: usize = 50;
        let host = url_host(url).unwrap_or_default();
        for value in headers.get_all(header::SET_COOKIE) {
            let Some(pair) = value.to_str().ok().and_then(|v| v.split(';').next()) else {
                continue;
            };
            let pair = pair.trim();
            let Some((name, _)) = pair.split_once('=') else {
                continue;
            };
            self.cookies
                .retain(|(h, c)| !(*h == host && c.split_once('=').map(|(n, _)| n) == Some(name)));
            if self.cookies.len() < MAX_COOKIES {
                self.cookies.push((host.clone(), pair.to_string()));
            }
        }
    }
}

impl FinalResponse {
    /// blackbox_exporter's checks, in its order; the first failure is the reason.
    fn check(self, ctx: &Env<'_>, cfg: &HttpProbe, out: &mut Samples) -> Result<(), Failure> {
        let mut failure: Option<Failure> = None;
        if !status_ok(cfg, self.status) {
            failure = Some(Failure::new(
                Reason::HttpStatus,
                if cfg.valid_status_codes.is_empty() {
                    format!("http status {} is not 2xx", self.status.as_u16())
                } else {
                    format!(
                        "http status {} not in valid_status_codes",
                        self.status.as_u16()
                    )
                },
            ));
        }
        if failure.is_none()
            && let Some(headers) = &self.headers
        {
            let why = header_regex_failure(ctx, cfg, headers).because(Reason::Config)?;
            out.set(
                "probe_failed_due_to_regex",
                f64::from(u8::from(why.is_some())),
            );
            failure = why.map(|m| Failure::new(Reason::Regex, m));
        }
        if failure.is_none()
            && let Some(body) = &self.body
            && let Some(why) = body_regex_failure(ctx, cfg, body).because(Reason::Config)?
        {
            out.set("probe_failed_due_to_regex", 1.0);
            failure = Some(Failure::new(Reason::Regex, why));
        }
        if let Some(e) = self.body_error {
            failure.get_or_insert(e);
        }
        if !cfg.valid_http_versions.is_empty() {
            let name = version_name(self.version);
            if !cfg.valid_http_versions.iter().any(|v| v == name) {
                failure.get_or_insert(Failure::new(
                    Reason::HttpVersion,
                    format!("{name} not in valid_http_versions"),
                ));
            }
        }
        if self.tls && cfg.fail_if_ssl {
            failure.get_or_insert(Failure::new(
                Reason::Tls,
                "final response was over TLS (fail_if_ssl)",
            ));
        }
        if !self.tls && cfg.fail_if_not_ssl {
            failure.get_or_insert(Failure::new(
                Reason::Tls,
                "final response was not over TLS (fail_if_not_ssl)",
            ));
        }
        match failure {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// Opens a CONNECT tunnel through the proxy to the hop's host and port (by name: the
/// proxy resolves it). The proxy's answer is read byte by byte up to its blank line, so
/// nothing of the tunnelled stream is consumed, and at most 16 KiB of it.
async fn tunnel(io: &mut Io, proxy: &Proxy, url: &Url, port: u16) -> Result<(), Failure> {
    const MAX_HEAD: usize = 16 * 1024;
    let host = url.host_str().unwrap_or_default();
    let target = format!("{host}:{port}");
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = proxy.authorization.as_ref().and_then(|v| v.to_str().ok()) {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    let io_err = |e: std::io::Error| {
        Failure::new(
            Reason::Protocol,
            format!("proxy CONNECT: {}", super::io_reason(&e)),
        )
    };
    io.write_all(request.as_bytes()).await.map_err(io_err)?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(Failure::new(
                Reason::Protocol,
                "proxy CONNECT: answer head longer than 16 KiB",
            ));
        }
        let mut byte = [0u8; 1];
        let n = io.read(&mut byte).await.map_err(io_err)?;
        if n == 0 {
            return Err(Failure::new(
                Reason::Protocol,
                "proxy CONNECT: the proxy closed the connection",
            ));
        }
        head.push(byte[0]);
    }
    let status_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let status = String::from_utf8_lossy(status_line);
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if !code.starts_with('2') {
        return Err(Failure::new(
            Reason::Protocol,
            format!("proxy CONNECT {target}: {}", status.trim()),
        ));
    }
    Ok(())
}

fn status_ok(cfg: &HttpProbe, status: StatusCode) -> bool {
    if cfg.valid_status_codes.is_empty() {
        status.is_success()
    } else {
        cfg.valid_status_codes.contains(&status.as_u16())
    }
}

/// blackbox_exporter's header checks: a missing header fails unless `allow_missing`;
/// otherwise any value matching (`fail_if_header_matches`) or none matching
/// (`fail_if_header_not_matches`) fails.
fn header_regex_failure(
    ctx: &Env<'_>,
    cfg: &HttpProbe,
    headers: &HeaderMap,
) -> Result<Option<String>, String> {
    for (spec, fail_on_match) in cfg
        .fail_if_header_matches
        .iter()
        .map(|m| (m, true))
        .chain(cfg.fail_if_header_not_matches.iter().map(|m| (m, false)))
    {
        let values: Vec<&[u8]> = headers
            .get_all(spec.header.as_str())
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if values.is_empty() {
            if spec.allow_missing {
                continue;
            }
            return Ok(Some(format!("header {} is missing", spec.header)));
        }
        let re = ctx.regex(&spec.regexp)?;
        let any = values.iter().any(|v| re.is_match(v));
        if fail_on_match && any {
            return Ok(Some(format!(
                "header {} matched {:?}",
                spec.header, spec.regexp
            )));
        }
        if !fail_on_match && !any {
            return Ok(Some(format!(
                "header {} did not match {:?}",
                spec.header, spec.regexp
            )));
        }
    }
    Ok(None)
}

/// The Authorization value from basic_auth, authorization or the bearer token; files are
/// read at each probe so that rotated secrets are picked up.
fn authorization(cfg: &HttpProbe) -> Result<Option<HeaderValue>, String> {
    let read = |path: &str, what: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("http.{what} {path}: {e}"))
    };
    let value = if let Some(auth) = &cfg.basic_auth {
        let password = match (&auth.password, &auth.password_file) {
            (_, Some(path)) => read(path, "basic_auth.password_file")?,
            (Some(p), None) => p.clone(),
            (None, None) => String::new(),
        };
        format!(
            "Basic {}",
            base64(format!("{}:{password}", auth.username).as_bytes())
        )
    } else if let Some(auth) = &cfg.authorization {
        let credentials = match (&auth.credentials, &auth.credentials_file) {
            (_, Some(path)) => read(path, "authorization.credentials_file")?,
            (Some(c), None) => c.clone(),
            (None, None) => String::new(),
        };
        format!("{} {credentials}", auth.kind)
    } else if let Some(token) = &cfg.bearer_token {
        format!("Bearer {token}")
    } else if let Some(path) = &cfg.bearer_token_file {
        format!("Bearer {}", read(path, "bearer_token_file")?)
    } else {
        return Ok(None);
    };
    let mut value = HeaderValue::from_str(&value)
        .map_err(|_| "http: the credentials are not a valid header value".to_string())?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// Standard base64 with padding, for the Basic scheme.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) fn body_regex_failure(
    ctx: &Env<'_>,
    cfg: &HttpProbe,
    body: &BodyRead,
) -> Result<Option<String>, String> {
    let note = if body.truncated {
        " (in its first 10 MiB)"
    } else {
        ""
    };
    for pattern in &cfg.fail_if_body_matches_regexp {
        if ctx.regex(pattern)?.is_match(&body.kept) {
            return Ok(Some(format!("body matched {pattern:?}{note}")));
        }
    }
    for pattern in &cfg.fail_if_body_not_matches_regexp {
        if !ctx.regex(pattern)?.is_match(&body.kept) {
            return Ok(Some(format!("body did not match {pattern:?}{note}")));
        }
    }
    Ok(None)
}

/// The next URL when the response is a redirect Go's client would follow: 301, 302,
/// 303, 307 or 308 with a usable Location.
fn redirect_location(resp: &Response<Incoming>, base: &Url) -> Option<Url> {
    if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    if location.is_empty() {
        return None;
    }
    base.join(location).ok()
}

/// As Go's `Response.ContentLength`: the header's value, 0 when no body can follow,
/// -1 when unknown (chunked, or read to the connection's end).
fn content_length(resp: &Response<Incoming>, method: &Method) -> f64 {
    use hyper::body::Body;
    let declared = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let status = resp.status().as_u16();
    if *method != Method::HEAD && (status < 200 || status == 204 || status == 304) {
        return 0.0;
    }
    let chunked = resp
        .headers()
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    match declared {
        Some(n) if !chunked => n as f64,
        _ if resp.version() == Version::HTTP_2 && resp.body().is_end_stream() => 0.0,
        _ => -1.0,
    }
}

/// Reads the body to its end (decompressing it with `algorithm`), counting it and
/// keeping at most [`HttpProbe::MAX_MATCHED_BODY`] bytes when `keep`. Exceeding
/// `body_size_limit` (after decompression, as blackbox_exporter applies it) stops the
/// read with an error. Memory stays bounded whatever the peer sends.
async fn read_body(
    mut incoming: Incoming,
    cfg: &HttpProbe,
    algorithm: Option<Algorithm>,
    keep: bool,
    out: &mut Samples,
) -> (BodyRead, Option<Failure>) {
    /// Decompression runs in slices this large, yielding between them, so that a
    /// compressed frame that inflates enormously cannot hold the thread past the deadline.
    const SLICE: usize = 16 * 1024;
    let keep_bytes = if keep { HttpProbe::MAX_MATCHED_BODY } else { 0 };
    let mut body = Body::new(algorithm, keep_bytes, cfg.body_size_limit.0);
    let mut error = None;
    'frames: while let Some(frame) = incoming.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                error = Some(Failure::new(
                    Reason::Protocol,
                    format!("reading body: {}", hyper_reason(&e)),
                ));
                break;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        for slice in data.chunks(SLICE) {
            let result = body.write(slice);
            out.set(
                "probe_http_uncompressed_body_length",
                body.sink().total as f64,
            );
            if let Err(e) = result {
                error = Some(body_failure(e, cfg));
                break 'frames;
            }
            if algorithm.is_some() {
                tokio::task::yield_now().await;
            }
        }
    }
    let (sink, finish_error) = body.finish();
    out.set("probe_http_uncompressed_body_length", sink.total as f64);
    if error.is_none() {
        error = finish_error.map(|e| body_failure(e, cfg));
    }
    let read = BodyRead {
        truncated: sink.truncated,
        kept: sink.kept,
    };
    (read, error)
}

fn body_failure(e: BodyError, cfg: &HttpProbe) -> Failure {
    match e {
        BodyError::TooLarge => Failure::new(
            Reason::BodySize,
            format!(
                "body is larger than body_size_limit ({} bytes)",
                cfg.body_size_limit.0
            ),
        ),
        BodyError::Corrupt(why) => Failure::new(
            Reason::Protocol,
            format!("body does not decompress as {}: {why}", cfg.compression),
        ),
    }
}

fn version_number(v: Version) -> f64 {
    match v {
        Version::HTTP_09 => 0.9,
        Version::HTTP_10 => 1.0,
        Version::HTTP_11 => 1.1,
        Version::HTTP_2 => 2.0,
        Version::HTTP_3 => 3.0,
        _ => 0.0,
    }
}

/// As Go's `Response.Proto`, which `valid_http_versions` lists.
fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

fn hyper_reason(e: &hyper::Error) -> String {
    use std::error::Error as _;
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        match s.downcast_ref::<std::io::Error>() {
            Some(io) => {
                reason = format!("{reason}: {}", super::io_reason(io));
                break;
            }
            None => reason = format!("{reason}: {s}"),
        }
        source = s.source();
    }
    reason
}

type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

async fn handshake<S>(io: S, h2: bool) -> Result<(Sender, ConnFuture), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let reason = |e: hyper::Error| format!("http handshake: {}", hyper_reason(&e));
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(reason)?;
        Ok((
            Sender::H2(sender),
            Box::pin(async move {
                let _ = conn.await;
            }),
        ))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(reason)?;
        Ok((
            Sender::H1(sender),
            Box::pin(async move {
                let _ = conn.await;
            }),
        ))
    }
}

/// Runs `work` while driving the connection in the same task, so that dropping the
/// probe (its deadline) drops the connection too: nothing is left running behind it.
async fn drive<T>(mut conn: ConnFuture, work: impl Future<Output = T>) -> T {
    let mut work = std::pin::pin!(work);
    tokio::select! {
        biased;
        t = &mut work => return t,
        () = &mut conn => {}
    }
    // The connection ended (closed or failed); the request observes that itself.
    work.await
}

/// An HTTP date (`Last-Modified`) in the three forms Go's `http.ParseTime` accepts:
/// IMF-fixdate, RFC 850 and asctime. Unix seconds.
pub(crate) fn parse_http_date(s: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = |m: &str| MONTHS.iter().position(|x| *x == m).map(|i| i as i64 + 1);
    let num = |t: &str| -> Option<i64> {
        (!t.is_empty() && t.len() <= 4 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let tokens: Vec<&str> = s
        .split([' ', ',', '-', ':'])
        .filter(|t| !t.is_empty())
        .collect();
    let (day, mon, year, time, zone) = match tokens.as_slice() {
        // asctime: Sun Nov  6 08:49:37 1994
        [_, mon, day, h, m, sec, year] => (*day, *mon, *year, [*h, *m, *sec], "GMT"),
        // IMF-fixdate / RFC 850: Sun, 06 Nov 1994 08:49:37 GMT / Sunday, 06-Nov-94 ...
        [_, day, mon, year, h, m, sec, zone] => (*day, *mon, *year, [*h, *m, *sec], *zone),
        _ => return None,
    };
    if zone != "GMT" && zone != "UTC" {
        return None;
    }
    let mut year = num(year)?;
    if year < 100 {
        // Go's two-digit years: 69-99 are 19xx, 00-68 are 20xx.
        year += if year >= 69 { 1900 } else { 2000 };
    }
    super::unix_time(
        year,
        month(mon)?,
        num(day)?,
        num(time[0])?,
        num(time[1])?,
        num(time[2])?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tcp::GO_ZERO_TIME;
    use crate::probe::tcp::tests::{
        LEAF_NOT_AFTER, ca_file, ctx, labelled, module, sample, test_pki, tls_server,
    };
    use crate::probe::{Reason, run};
    use hyper::service::service_fn;
    use sonde_proto::config::Prober;
    use sonde_proto::config::module::IpProtocol;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::net::TcpStream;

    const TIMEOUT: Duration = Duration::from_secs(3);

    fn text(status: u16, body: &str) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        resp
    }

    fn redirect(status: u16, location: &str) -> Response<Full<Bytes>> {
        let mut resp = text(status, "moved");
        resp.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_str(location).unwrap());
        resp
    }

    /// The test site. `port` is the server's own, for absolute redirects.
    async fn route(req: Request<Bytes>, port: u16) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/" | "/ok" => {
                let mut resp = text(200, "hello sonde");
                resp.headers_mut().insert(
                    header::LAST_MODIFIED,
                    HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
                );
                resp
            }
            "/404" => text(404, "not here"),
            "/redirect" => redirect(302, "/ok"),
            "/loop" => redirect(302, "/loop"),
            "/absolute" => redirect(301, &format!("http://localhost:{port}/ok")),
            "/see-other" => redirect(303, "/echo"),
            "/keep-method" => redirect(307, "/echo"),
            "/ftp" => redirect(302, "ftp://127.0.0.1/file"),
            "/cookie" => {
                let mut resp = redirect(302, "/echo");
                resp.headers_mut().insert(
                    header::SET_COOKIE,
                    HeaderValue::from_static("session=abc; Path=/"),
                );
                resp
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                text(200, "late")
            }
            "/big" => text(200, &"x".repeat(64 * 1024)),
            "/gzip" => {
                use std::io::Write as _;
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all("hello compressed sonde ".repeat(100).as_bytes())
                    .unwrap();
                let mut resp = Response::new(Full::new(Bytes::from(e.finish().unwrap())));
                resp.headers_mut()
                    .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                resp
            }
            "/meta-redirect" => redirect(302, "http://169.254.169.254/latest/meta-data"),
            "/headers" => {
                let mut resp = text(200, "{}");
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                h.append(header::VARY, HeaderValue::from_static("Accept"));
                h.append(header::VARY, HeaderValue::from_static("Origin"));
                resp
            }
            "/private" => {
                let auth = req.headers().get(header::AUTHORIZATION);
                if auth.and_then(|v| v.to_str().ok()) == Some("Basic dXNlcjpzM2NyM3Q=")
                    || auth.and_then(|v| v.to_str().ok()) == Some("Bearer tok3n")
                {
                    text(200, "welcome")
                } else {
                    text(401, "who are you")
                }
            }
            "/private-redirect" => redirect(302, "/private"),
            "/echo" => {
                let h = |name: header::HeaderName| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string()
                };
                let host = req
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| h(header::HOST));
                text(
                    200,
                    &format!(
                        "method={} host={} ua={} x-probe={} cookie={} auth={} proxy-auth={} uri={} body={}",
                        req.method(),
                        host,
                        h(header::USER_AGENT),
                        h(HeaderName::from_static("x-probe")),
                        h(header::COOKIE),
                        h(header::AUTHORIZATION),
                        h(header::PROXY_AUTHORIZATION),
                        req.uri(),
                        String::from_utf8_lossy(req.body()),
                    ),
                )
            }
            p if p.starts_with("/chain/") => match p[7..].parse::<u32>() {
                Ok(0) | Err(_) => text(200, "end of chain"),
                Ok(n) => redirect(302, &format!("/chain/{}", n - 1)),
            },
            _ => text(404, "no route"),
        }
    }

    async fn serve<S>(io: S, h2: bool, port: u16)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = service_fn(move |req: Request<Incoming>| async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, Infallible>(route(Request::from_parts(parts, body), port).await)
        });
        let io = TokioIo::new(io);
        if h2 {
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await;
        } else {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        }
    }

    async fn http_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, false, addr.port()));
            }
        });
        addr
    }

    async fn https_server(alpn: &[&[u8]]) -> SocketAddr {
        let pki = test_pki();
        https_server_with(&pki, alpn).await
    }

    async fn https_server_with(
        pki: &crate::probe::tcp::tests::TestPki,
        alpn: &[&[u8]],
    ) -> SocketAddr {
        tls_server(pki, alpn, |tls| async move {
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let port = tls.get_ref().0.local_addr().unwrap().port();
            serve(tls, h2, port).await;
        })
        .await
    }

    fn phase(o: &crate::probe::ProbeOutcome, name: &str) -> f64 {
        let found: Vec<f64> = labelled(o, DURATION)
            .into_iter()
            .filter(|(l, _)| l == &vec![("phase", name.to_string())])
            .map(|(_, v)| v)
            .collect();
        assert_eq!(found.len(), 1, "one {name} phase sample");
        found[0]
    }

    fn http_module(json: serde_json::Value) -> Module {
        serde_json::from_value(serde_json::json!({ "prober": "http", "http": json })).unwrap()
    }

    #[tokio::test]
    async fn probe_http_200_reports_the_response() {
        let addr = http_server().await;
        let o = run(
            &ctx(),
            &format!("http://{addr}/ok"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_status_code"), Some(200.0));
        assert_eq!(sample(&o, "probe_http_content_length"), Some(11.0));
        assert_eq!(
            sample(&o, "probe_http_uncompressed_body_length"),
            Some(11.0)
        );
        assert_eq!(sample(&o, "probe_http_version"), Some(1.1));
        assert_eq!(sample(&o, "probe_http_ssl"), Some(0.0));
        assert_eq!(sample(&o, "probe_http_redirects"), Some(0.0));
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));
        assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
        assert_eq!(
            sample(&o, "probe_http_last_modified_timestamp_seconds"),
            Some(784_111_777.0)
        );
        assert!(phase(&o, "connect") > 0.0);
        assert!(phase(&o, "processing") > 0.0);
        assert!(phase(&o, "transfer") >= 0.0);
        assert_eq!(phase(&o, "tls"), 0.0);
        assert!(phase(&o, "resolve") < 0.01);
        let total: f64 = labelled(&o, DURATION).iter().map(|(_, v)| v).sum();
        assert!(total <= sample(&o, "probe_duration_seconds").unwrap());
        assert!(sample(&o, "probe_ssl_earliest_cert_expiry").is_none());
    }

    #[tokio::test]
    async fn probe_http_target_without_scheme_gets_http() {
        let addr = http_server().await;
        let o = run(
            &ctx(),
            &format!("{addr}/ok"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_status_code"), Some(200.0));
    }

    #[tokio::test]
    async fn probe_http_404_and_valid_status_codes() {
        let addr = http_server().await;
        let target = format!("http://{addr}/404");
        let o = run(&ctx(), &target, &module(Prober::Http), TIMEOUT).await;
        assert!(!o.success);
        assert_eq!(o.failure.as_deref(), Some("http status 404 is not 2xx"));
        assert_eq!(sample(&o, "probe_http_status_code"), Some(404.0));
        assert_eq!(sample(&o, "probe_http_uncompressed_body_length"), Some(8.0));

        let m = http_module(serde_json::json!({"valid_status_codes": [404]}));
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        let m = http_module(serde_json::json!({"valid_status_codes": [200, 201]}));
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert_eq!(
            o.failure.as_deref(),
            Some("http status 404 not in valid_status_codes")
        );
    }

    #[tokio::test]
    async fn probe_http_follows_redirects() {
        let addr = http_server().await;
        let target = format!("http://{addr}/redirect");
        let o = run(&ctx(), &target, &module(Prober::Http), TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_redirects"), Some(1.0));
        assert_eq!(sample(&o, "probe_http_status_code"), Some(200.0));
        assert_eq!(
            sample(&o, "probe_http_uncompressed_body_length"),
            Some(11.0)
        );

        // A chain of exactly 10 is followed; blackbox_exporter counts each.
        let o = run(
            &ctx(),
            &format!("http://{addr}/chain/10"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_redirects"), Some(10.0));
    }

    #[tokio::test]
    async fn probe_http_redirect_loop_stops_after_ten() {
        let addr = http_server().await;
        let o = run(
            &ctx(),
            &format!("http://{addr}/loop"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert!(!o.success);
        assert_eq!(sample(&o, "probe_http_redirects"), Some(11.0));
        assert_eq!(sample(&o, "probe_http_status_code"), Some(302.0));
        assert_eq!(o.failure.as_deref(), Some("http status 302 is not 2xx"));
    }

    #[tokio::test]
    async fn probe_http_no_follow_redirects() {
        let addr = http_server().await;
        let target = format!("http://{addr}/redirect");
        for m in [
            http_module(serde_json::json!({"follow_redirects": false})),
            http_module(serde_json::json!({"no_follow_redirects": true})),
        ] {
            let o = run(&ctx(), &target, &m, TIMEOUT).await;
            assert!(!o.success);
            assert_eq!(sample(&o, "probe_http_status_code"), Some(302.0));
            // Go's CheckRedirect saw one redirect before refusing it.
            assert_eq!(sample(&o, "probe_http_redirects"), Some(1.0));
            assert_eq!(sample(&o, "probe_http_uncompressed_body_length"), Some(0.0));
        }
        let m = http_module(
            serde_json::json!({"follow_redirects": false, "valid_status_codes": [302]}),
        );
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
    }

    #[tokio::test]
    async fn probe_http_absolute_redirect_resolves_the_new_host() {
        let addr = http_server().await;
        let m = http_module(serde_json::json!({"preferred_ip_protocol": "ip4"}));
        let o = run(&ctx(), &format!("http://{addr}/absolute"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_redirects"), Some(1.0));
        assert_eq!(sample(&o, "probe_http_status_code"), Some(200.0));
        // Two connections were made; their connect times are summed.
        assert!(phase(&o, "connect") > 0.0);
    }

    #[tokio::test]
    async fn probe_http_redirect_to_another_scheme_fails() {
        let addr = http_server().await;
        let o = run(
            &ctx(),
            &format!("http://{addr}/ftp"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert!(!o.success);
        assert!(
            o.failure
                .clone()
                .unwrap()
                .contains("unsupported URL scheme")
        );
        assert_eq!(sample(&o, "probe_http_status_code"), Some(0.0));
        assert_eq!(sample(&o, "probe_http_redirects"), Some(1.0));
    }

    #[tokio::test]
    async fn probe_http_sends_method_headers_and_body() {
        let addr = http_server().await;
        let m = http_module(serde_json::json!({
            "method": "POST",
            "body": "payload",
            "headers": {"X-Probe": "yes", "host": "example.test"},
            "fail_if_body_not_matches_regexp": [
                "method=POST", "host=example.test ", "ua=sonde/", "x-probe=yes", "body=payload$"
            ],
        }));
        let o = run(&ctx(), &format!("http://{addr}/echo"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);

        let m = http_module(serde_json::json!({
            "headers": {"User-Agent": "custom/1"},
            "fail_if_body_not_matches_regexp": ["ua=custom/1 "],
        }));
        let o = run(&ctx(), &format!("http://{addr}/echo"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
    }

    #[tokio::test]
    async fn probe_http_redirect_methods_follow_go() {
        let addr = http_server().await;
        // 303 turns the POST into a GET without body; 307 keeps both.
        let m = http_module(serde_json::json!({
            "method": "POST", "body": "payload",
            "fail_if_body_not_matches_regexp": ["method=GET .* body=$"],
        }));
        let o = run(&ctx(), &format!("http://{addr}/see-other"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        let m = http_module(serde_json::json!({
            "method": "POST", "body": "payload",
            "fail_if_body_not_matches_regexp": ["method=POST .* body=payload$"],
        }));
        let o = run(&ctx(), &format!("http://{addr}/keep-method"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
    }

    #[tokio::test]
    async fn probe_http_keeps_cookies_across_redirects() {
        let addr = http_server().await;
        let m = http_module(serde_json::json!({
            "fail_if_body_not_matches_regexp": ["cookie=session=abc "],
        }));
        let o = run(&ctx(), &format!("http://{addr}/cookie"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
    }

    #[tokio::test]
    async fn probe_http_body_regexes() {
        let addr = http_server().await;
        let target = format!("http://{addr}/ok");
        let m = http_module(serde_json::json!({"fail_if_body_matches_regexp": ["hel+o"]}));
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert!(!o.success);
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(1.0));
        assert_eq!(o.failure.as_deref(), Some("body matched \"hel+o\""));

        let m = http_module(serde_json::json!({"fail_if_body_not_matches_regexp": ["sonde$"]}));
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));

        let m = http_module(serde_json::json!({"fail_if_body_not_matches_regexp": ["absent"]}));
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(1.0));
        assert_eq!(o.failure.as_deref(), Some("body did not match \"absent\""));

        // Regexes only run on an accepted status, as in blackbox_exporter.
        let o = run(&ctx(), &format!("http://{addr}/404"), &m, TIMEOUT).await;
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));
    }

    #[tokio::test]
    async fn probe_http_body_size_limit() {
        let addr = http_server().await;
        let m = http_module(serde_json::json!({"body_size_limit": "1KiB"}));
        let o = run(&ctx(), &format!("http://{addr}/big"), &m, TIMEOUT).await;
        assert!(!o.success);
        assert_eq!(
            o.failure.as_deref(),
            Some("body is larger than body_size_limit (1024 bytes)")
        );
        assert_eq!(
            sample(&o, "probe_http_uncompressed_body_length"),
            Some(1024.0)
        );
        assert_eq!(sample(&o, "probe_http_status_code"), Some(200.0));
        let o = run(
            &ctx(),
            &format!("http://{addr}/big"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(
            sample(&o, "probe_http_uncompressed_body_length"),
            Some(65536.0)
        );
    }

    #[tokio::test]
    async fn probe_http_timeout_keeps_the_phases_it_measured() {
        let addr = http_server().await;
        let o = run(
            &ctx(),
            &format!("http://{addr}/slow"),
            &module(Prober::Http),
            Duration::from_millis(300),
        )
        .await;
        assert!(!o.success);
        assert_eq!(o.failure.as_deref(), Some("timed out after 300ms"));
        assert!(phase(&o, "connect") > 0.0);
        assert_eq!(phase(&o, "processing"), 0.0);
        assert_eq!(sample(&o, "probe_http_status_code"), Some(0.0));
        assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
        let d = sample(&o, "probe_duration_seconds").unwrap();
        assert!((0.3..2.0).contains(&d), "{d}");
    }

    #[tokio::test]
    async fn probe_http_closed_port() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let o = run(
            &ctx(),
            &format!("http://127.0.0.1:{port}/"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert_eq!(o.failure.as_deref(), Some("connect: connection refused"));
        assert_eq!(sample(&o, "probe_http_status_code"), Some(0.0));
    }

    #[tokio::test]
    async fn probe_http_hostile_servers_fail_cleanly() {
        // Garbage instead of HTTP, an immediate close, a lying Content-Length.
        for reply in [
            &b"\x00\x01garbage\r\n\r\n"[..],
            b"",
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
            b"HTTP/1.1 999999 Nope\r\n\r\n",
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let reply = reply.to_vec();
            tokio::spawn(async move {
                if let Ok((mut s, _)) = listener.accept().await {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                    let _ = s.write_all(&reply).await;
                }
            });
            let o = run(
                &ctx(),
                &format!("http://{addr}/"),
                &module(Prober::Http),
                TIMEOUT,
            )
            .await;
            assert!(!o.success, "{:?}", o.samples);
            assert!(o.failure.is_some());
        }
    }

    #[tokio::test]
    async fn probe_http_bad_targets_fail_cleanly() {
        for target in ["http://", "http://[::1", "https://:443/", "http://a b/"] {
            let o = run(&ctx(), target, &module(Prober::Http), TIMEOUT).await;
            assert!(!o.success, "{target}");
            assert!(o.failure.is_some());
        }
    }

    #[tokio::test]
    async fn probe_https_strict_fails_on_a_self_signed_certificate() {
        let addr = https_server(&[b"http/1.1"]).await;
        let o = run(
            &ctx(),
            &format!("https://{addr}/ok"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert!(!o.success);
        assert!(
            o.failure
                .clone()
                .unwrap()
                .starts_with("tls: invalid peer certificate")
        );
        assert!(phase(&o, "tls") > 0.0);
        assert_eq!(sample(&o, "probe_http_ssl"), Some(0.0));
    }

    #[tokio::test]
    async fn probe_https_insecure_skip_verify_reports_tls() {
        let addr = https_server(&[b"http/1.1"]).await;
        let m = http_module(serde_json::json!({"tls_config": {"insecure_skip_verify": true}}));
        let o = run(&ctx(), &format!("https://{addr}/ok"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_ssl"), Some(1.0));
        assert_eq!(sample(&o, "probe_http_version"), Some(1.1));
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
        assert_eq!(
            sample(&o, "probe_ssl_last_chain_expiry_timestamp_seconds"),
            Some(GO_ZERO_TIME)
        );
        assert_eq!(
            labelled(&o, "probe_tls_version_info"),
            vec![(vec![("version", "TLS 1.3".to_string())], 1.0)]
        );
        let cipher = labelled(&o, "probe_tls_cipher_info");
        assert_eq!(cipher.len(), 1);
        assert!(
            cipher[0].0[0].1.starts_with("TLS_AES_")
                || cipher[0].0[0].1.starts_with("TLS_CHACHA20")
        );
        assert!(phase(&o, "tls") > 0.0);

        let m = http_module(serde_json::json!({
            "tls_config": {"insecure_skip_verify": true}, "fail_if_ssl": true
        }));
        let o = run(&ctx(), &format!("https://{addr}/ok"), &m, TIMEOUT).await;
        assert_eq!(
            o.failure.as_deref(),
            Some("final response was over TLS (fail_if_ssl)")
        );
    }

    #[tokio::test]
    async fn probe_https_with_ca_file_and_server_name() {
        let pki = test_pki();
        let addr = https_server_with(&pki, &[b"h2", b"http/1.1"]).await;
        let m = http_module(serde_json::json!({
            "tls_config": {"ca_file": ca_file(&pki), "server_name": "localhost"},
            "valid_http_versions": ["HTTP/2.0"],
        }));
        let o = run(&ctx(), &format!("https://{addr}/ok"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_version"), Some(2.0));
        assert_eq!(sample(&o, "probe_http_content_length"), Some(11.0));
        assert_eq!(
            sample(&o, "probe_ssl_last_chain_expiry_timestamp_seconds"),
            Some(LEAF_NOT_AFTER)
        );

        // A Host header names the server for TLS when server_name is unset.
        let m = http_module(serde_json::json!({
            "tls_config": {"ca_file": ca_file(&pki)},
            "headers": {"Host": "localhost"},
            "enable_http2": false,
            "fail_if_body_not_matches_regexp": ["host=localhost "],
        }));
        let o = run(&ctx(), &format!("https://{addr}/echo"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_version"), Some(1.1));

        let m = http_module(serde_json::json!({
            "tls_config": {"ca_file": ca_file(&pki), "server_name": "localhost"},
            "valid_http_versions": ["HTTP/1.1"],
        }));
        let o = run(&ctx(), &format!("https://{addr}/ok"), &m, TIMEOUT).await;
        assert_eq!(
            o.failure.as_deref(),
            Some("HTTP/2.0 not in valid_http_versions")
        );
    }

    #[tokio::test]
    async fn probe_https_missing_ca_file_fails_before_connecting() {
        let addr = https_server(&[b"http/1.1"]).await;
        let m = http_module(serde_json::json!({"tls_config": {"ca_file": "/nonexistent/ca.pem"}}));
        let o = run(&ctx(), &format!("https://{addr}/ok"), &m, TIMEOUT).await;
        assert!(
            o.failure
                .clone()
                .unwrap()
                .contains("ca_file /nonexistent/ca.pem")
        );
        assert_eq!(phase(&o, "connect"), 0.0);
    }

    #[tokio::test]
    async fn probe_http_fail_if_not_ssl() {
        let addr = http_server().await;
        let m = http_module(serde_json::json!({"fail_if_not_ssl": true}));
        let o = run(&ctx(), &format!("http://{addr}/ok"), &m, TIMEOUT).await;
        assert_eq!(
            o.failure.as_deref(),
            Some("final response was not over TLS (fail_if_not_ssl)")
        );
    }

    #[tokio::test]
    async fn probe_http_header_regexes() {
        let addr = http_server().await;
        let target = format!("http://{addr}/headers");
        let cases = [
            (
                serde_json::json!({"fail_if_header_matches": [{"header": "content-type", "regexp": "json"}]}),
                Some("header content-type matched \"json\""),
            ),
            (
                serde_json::json!({"fail_if_header_matches": [{"header": "Vary", "regexp": "^Origin$"}]}),
                Some("header Vary matched \"^Origin$\""),
            ),
            (
                serde_json::json!({"fail_if_header_not_matches": [{"header": "Content-Type", "regexp": "^application/json$"}]}),
                None,
            ),
            (
                serde_json::json!({"fail_if_header_not_matches": [{"header": "Content-Type", "regexp": "html"}]}),
                Some("header Content-Type did not match \"html\""),
            ),
            (
                serde_json::json!({"fail_if_header_not_matches": [{"header": "X-Missing", "regexp": "."}]}),
                Some("header X-Missing is missing"),
            ),
            (
                serde_json::json!({"fail_if_header_matches": [{"header": "X-Missing", "regexp": ".", "allow_missing": true}]}),
                None,
            ),
        ];
        for (json, want) in cases {
            let o = run(&ctx(), &target, &http_module(json.clone()), TIMEOUT).await;
            assert_eq!(o.failure.as_deref(), want, "{json}");
            let regex_failed = if want.is_some() { 1.0 } else { 0.0 };
            assert_eq!(
                sample(&o, "probe_failed_due_to_regex"),
                Some(regex_failed),
                "{json}"
            );
        }
    }

    #[tokio::test]
    async fn probe_http_credentials_on_every_hop() {
        let addr = http_server().await;
        let target = format!("http://{addr}/private-redirect");
        let o = run(&ctx(), &target, &module(Prober::Http), TIMEOUT).await;
        assert_eq!(sample(&o, "probe_http_status_code"), Some(401.0));
        let m = http_module(
            serde_json::json!({"basic_auth": {"username": "user", "password": "s3cr3t"}}),
        );
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        let token = std::env::temp_dir().join(format!("sonde-token-{}", rand::random::<u64>()));
        std::fs::write(&token, "tok3n\n").unwrap();
        let m = http_module(serde_json::json!({"bearer_token_file": token}));
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        let _ = std::fs::remove_file(&token);
        let m = http_module(serde_json::json!({"bearer_token_file": "/nonexistent/token"}));
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert!(
            o.failure
                .clone()
                .unwrap()
                .starts_with("http.bearer_token_file /nonexistent/token")
        );
    }

    #[tokio::test]
    async fn probe_http_compression_decodes_the_body() {
        let addr = http_server().await;
        let target = format!("http://{addr}/gzip");
        let m = http_module(serde_json::json!({
            "compression": "gzip",
            "headers": {"Accept-Encoding": "gzip"},
            "fail_if_body_not_matches_regexp": ["^(hello compressed sonde )+$"],
        }));
        m.validate().unwrap();
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(
            sample(&o, "probe_http_uncompressed_body_length"),
            Some(2300.0)
        );
        // The limit applies to the decompressed body.
        let m = http_module(serde_json::json!({"compression": "gzip", "body_size_limit": "1KiB"}));
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert_eq!(o.failure_reason, Some(Reason::BodySize), "{:?}", o.failure);
        // A body that is not what the module says fails as a protocol error.
        let m = http_module(serde_json::json!({"compression": "br"}));
        let o = run(&ctx(), &format!("http://{addr}/ok"), &m, TIMEOUT).await;
        assert_eq!(o.failure_reason, Some(Reason::Protocol), "{:?}", o.failure);
        let m = http_module(serde_json::json!({"compression": "gzip"}));
        let o = run(&ctx(), &format!("http://{addr}/ok"), &m, TIMEOUT).await;
        assert_eq!(o.failure_reason, Some(Reason::Protocol), "{:?}", o.failure);
        // identity leaves the body as it came.
        let m = http_module(serde_json::json!({"compression": "identity"}));
        let o = run(&ctx(), &target, &m, TIMEOUT).await;
        assert!(o.success);
        assert!(sample(&o, "probe_http_uncompressed_body_length").unwrap() < 2300.0);
        // An Accept-Encoding that excludes the algorithm is a config error, as in
        // blackbox_exporter.
        let m = http_module(serde_json::json!({
            "compression": "gzip", "headers": {"Accept-Encoding": "br, gzip;q=0"}
        }));
        assert!(m.validate().unwrap_err().contains("Accept-Encoding"));
    }

    #[tokio::test]
    async fn probe_http_body_file_and_authorization() {
        let addr = http_server().await;
        let dir = std::env::temp_dir().join(format!("sonde-http-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let body = dir.join("body.json");
        std::fs::write(&body, "{\"from\":\"file\"}").unwrap();
        let creds = dir.join("creds");
        std::fs::write(&creds, " s3cr3t \n").unwrap();
        let m = http_module(serde_json::json!({
            "method": "POST",
            "body_file": body,
            "authorization": {"type": "Token", "credentials_file": creds},
            "fail_if_body_not_matches_regexp": ["auth=Token s3cr3t ", "body=\\{\"from\":\"file\"\\}$"],
        }));
        m.validate().unwrap();
        let o = run(&ctx(), &format!("http://{addr}/echo"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        let m = http_module(serde_json::json!({
            "authorization": {"credentials": "tok3n"},
        }));
        let o = run(&ctx(), &format!("http://{addr}/private"), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        let m = http_module(serde_json::json!({"body_file": dir.join("missing")}));
        let o = run(&ctx(), &format!("http://{addr}/echo"), &m, TIMEOUT).await;
        assert_eq!(o.failure_reason, Some(Reason::Config));
        assert_eq!(phase(&o, "connect"), 0.0);
        let both = http_module(serde_json::json!({"body": "x", "body_file": body}));
        assert!(both.validate().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A forward proxy: CONNECT tunnels, and plain-http requests in absolute form
    /// forwarded to the test site. Counts the requests it saw.
    async fn proxy_server(site: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let seen = Arc::new(AtomicUsize::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if client.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let Ok(mut upstream) = TcpStream::connect(site).await else {
                        return;
                    };
                    if text.starts_with("CONNECT ") {
                        let _ = client
                            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            .await;
                    } else {
                        let _ = upstream.write_all(&head).await;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn probe_http_through_a_proxy() {
        use std::sync::atomic::Ordering;
        let site = http_server().await;
        let (proxy, seen) = proxy_server(site).await;
        // 127.0.0.2:1 refuses direct connections: success proves the proxy carried it.
        let m = http_module(serde_json::json!({
            "proxy_url": format!("http://user:pa%20ss@{proxy}"),
            "fail_if_body_not_matches_regexp": [
                "uri=http://127.0.0.2:1/echo ", "proxy-auth=Basic dXNlcjpwYSBzcw== "
            ],
        }));
        m.validate().unwrap();
        let o = run(&ctx(), "http://127.0.0.2:1/echo", &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        // With skip_resolve_phase_with_proxy the name need not resolve here at all.
        let m = http_module(serde_json::json!({
            "proxy_url": format!("http://{proxy}"),
            "skip_resolve_phase_with_proxy": true,
        }));
        let o = run(&ctx(), "http://unresolvable.invalid/ok", &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(seen.load(Ordering::SeqCst), 2);

        let pki = test_pki();
        let tls_site = https_server_with(&pki, &[b"http/1.1"]).await;
        let (proxy, seen) = proxy_server(tls_site).await;
        let m = http_module(serde_json::json!({
            "proxy_url": format!("http://{proxy}"),
            "tls_config": {"ca_file": ca_file(&pki)},
        }));
        let o = run(&ctx(), "https://localhost:1/ok", &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_ssl"), Some(1.0));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert!(
            http_module(serde_json::json!({"proxy_url": "socks5://x:1"}))
                .validate()
                .is_err()
        );
    }

    #[tokio::test]
    async fn probe_https_untrusted_still_reports_expiry_and_reason() {
        let addr = https_server(&[b"http/1.1"]).await;
        let o = run(
            &ctx(),
            &format!("https://{addr}/ok"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert_eq!(o.failure_reason, Some(Reason::Tls));
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
        assert_eq!(
            labelled(&o, "probe_failure_info"),
            vec![(vec![("reason", "tls".to_string())], 1.0)]
        );
    }

    #[tokio::test]
    async fn probe_http_failure_reasons() {
        let addr = http_server().await;
        let cases = [
            ("/404", serde_json::json!({}), Reason::HttpStatus),
            (
                "/ok",
                serde_json::json!({"valid_http_versions": ["HTTP/2.0"]}),
                Reason::HttpVersion,
            ),
            (
                "/ok",
                serde_json::json!({"fail_if_body_matches_regexp": ["hello"]}),
                Reason::Regex,
            ),
            (
                "/ok",
                serde_json::json!({"fail_if_not_ssl": true}),
                Reason::Tls,
            ),
            (
                "/big",
                serde_json::json!({"body_size_limit": "1KiB"}),
                Reason::BodySize,
            ),
        ];
        for (path, json, reason) in cases {
            let o = run(
                &ctx(),
                &format!("http://{addr}{path}"),
                &http_module(json.clone()),
                TIMEOUT,
            )
            .await;
            assert_eq!(o.failure_reason, Some(reason), "{path} {json}");
            let info = labelled(&o, "probe_failure_info");
            assert_eq!(
                info,
                vec![(vec![("reason", reason.as_str().to_string())], 1.0)]
            );
        }
        let o = run(
            &ctx(),
            &format!("http://{addr}/ok"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert!(labelled(&o, "probe_failure_info").is_empty());
        let o = run(
            &ctx(),
            "http://name.invalid/",
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert_eq!(o.failure_reason, Some(Reason::Dns));
    }

    /// Admits everything but link-local addresses, like `/probe`'s allowlist.
    struct NoLinkLocal;
    impl crate::probe::ConnectPolicy for NoLinkLocal {
        fn check_host(&self, _: &str, _: u16) -> Result<(), String> {
            Ok(())
        }
        fn check_addr(&self, addr: SocketAddr) -> Result<(), String> {
            match addr.ip() {
                IpAddr::V4(v4) if v4.is_link_local() => Err(format!("{addr} is link-local")),
                _ => Ok(()),
            }
        }
    }

    #[tokio::test]
    async fn probe_http_policy_applies_to_redirect_hops() {
        let addr = http_server().await;
        let o = crate::probe::run_with_policy(
            &ctx(),
            Some(&NoLinkLocal),
            &format!("http://{addr}/meta-redirect"),
            &module(Prober::Http),
            TIMEOUT,
        )
        .await;
        assert_eq!(
            o.failure_reason,
            Some(Reason::RefusedByPolicy),
            "{:?}",
            o.failure
        );
        assert!(o.failure.clone().unwrap().contains("169.254.169.254"));
        assert_eq!(sample(&o, "probe_http_redirects"), Some(1.0));
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("user:s3cr3t", "dXNlcjpzM2NyM3Q="),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        let t = Some(784_111_777);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), t);
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), t);
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), t);
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(parse_http_date("Sun, 06 Foo 1994 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 99 Nov 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn targets_get_a_scheme() {
        assert_eq!(
            target_url("example.com").unwrap().as_str(),
            "http://example.com/"
        );
        assert_eq!(
            target_url("HTTPS://example.com/x").unwrap().scheme(),
            "https"
        );
        assert_eq!(
            url_host(&target_url("http://[::1]:8080/").unwrap()).unwrap(),
            "::1"
        );
        assert!(target_url("http://").is_err());
        let _ = IpProtocol::Ip4;
    }
}
