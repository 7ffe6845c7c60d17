//! The http prober: blackbox_exporter's `http` module. One request, following up to 10
//! redirects, each over a fresh connection that this file drives itself (TCP connect,
//! TLS handshake with ALPN, HTTP/1.1 or HTTP/2) so that every phase can be timed.
//!
//! Samples keep blackbox_exporter's names and meaning: phase durations are summed over
//! the redirects, everything else describes the final response. Each sample is written
//! as soon as it is known, so a probe cut short by its deadline still reports the
//! phases it got through.
//!
//! One job per file: `redirect` (which responses redirect, and the request after one),
//! `proxy` (`proxy_url` and CONNECT tunnels), `auth` (the Authorization header),
//! `oauth2` (its token), `cookies`, `conn` (the HTTP/1.1 or HTTP/2 connection), `body` and
//! `decode` (reading the body), `checks` (the checks on the final response), `http3` (each
//! hop over QUIC instead, with `enable_http3`). This file runs the hops.

pub(crate) mod auth;
pub(crate) mod body;
mod cel_match;
pub(crate) mod checks;
mod conn;
mod cookies;
pub(crate) mod decode;
mod http3;
pub(crate) mod oauth2;
#[cfg(test)]
mod oauth2_tests;
mod proxy;
mod redirect;
#[cfg(test)]
mod tests;

use self::auth::authorization;
use self::body::{ReadError, content_length, read_body};
use self::checks::{FinalResponse, status_ok};
use self::conn::{drive, handshake, hyper_reason, version_number};
use self::cookies::CookieJar;
use self::decode::Algorithm;
use self::proxy::{Proxy, tunnel};
use self::redirect::{Hop, is_sensitive, redirect_location};
use super::log::{ProbeLog, header_value_for_log, url_for_log};
use super::net::{Io, connect};
use super::tls::TlsClient;
use super::tls_samples::TlsFacts;
use super::{Because, Env, Failure, Reason, Samples, Stage, choose_ip, resolve_target};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Full;
use sonde_proto::config::Module;
use sonde_proto::config::module::HttpProbe;
use sonde_proto::trace::Step;
use std::net::SocketAddr;
use std::time::{Instant, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
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
    request(ctx, target, &module.http, out, None).await
}

/// The final response of a request, for a prober that reads it (multihttp extracts
/// variables from it): its status, headers and the first
/// [`HttpProbe::MAX_MATCHED_BODY`] bytes of its body.
pub(crate) struct Answer {
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Vec<u8>,
}

/// One request of `cfg` to `target`, its redirects followed and its final response
/// checked, as the http prober makes it; with `answer`, that response is also kept
/// there (when one came).
pub(crate) async fn request(
    ctx: &Env<'_>,
    target: &str,
    cfg: &HttpProbe,
    out: &mut Samples,
    answer: Option<&mut Option<Answer>>,
) -> Result<(), Failure> {
    out.register(
        DURATION,
        &["resolve", "connect", "tls", "processing", "transfer"],
        &[
            "probe_http_content_length",
            "probe_http_uncompressed_body_length",
            "probe_http_redirects",
            "probe_http_ssl",
            "probe_http_status_code",
            "probe_http_version",
            "probe_failed_due_to_regex",
        ],
    );

    // Registered only for a module with a CEL expression, as blackbox_exporter does.
    if cel_match::configured(cfg) {
        out.set("probe_failed_due_to_cel", 0.0);
    }
    let url = if cfg.enable_http3 {
        target_url(&http3::https_target(target))
    } else {
        target_url(target)
    }
    .because(Reason::Config)?;
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
    let authorization = match &cfg.oauth2 {
        Some(client) => Some(oauth2::authorization(ctx, cfg, client, out).await?),
        None => authorization,
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
        .map_err(|_| RequestError::Method(cfg.method.clone()))
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
        cookies: CookieJar::default(),
        capture: answer.is_some(),
    };
    let mut redirects = 0;
    loop {
        match session.exchange(&hop, redirects, out).await? {
            HopEnd::Final(last) => {
                if let Some(slot) = answer {
                    *slot = Some(Answer {
                        headers: last.headers.clone().unwrap_or_default(),
                        body: last
                            .body
                            .as_ref()
                            .map(|b| b.kept.clone())
                            .unwrap_or_default(),
                    });
                }
                return last.check(ctx, cfg, out);
            }
            HopEnd::Redirect { status, next } => {
                redirects += 1;
                out.set("probe_http_redirects", f64::from(redirects));
                hop = hop.follow(status, next, &session.first_host);
            }
        }
    }
}

/// Why a request cannot be built from the target and the module.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("target {target:?} is not a URL: {error}")]
    Url {
        target: String,
        error: url::ParseError,
    },
    #[error("URL {0} has no host")]
    NoHost(Url),
    #[error("http.method {0:?} is not an HTTP method")]
    Method(String),
    #[error("http.headers: {0:?} is not a header name")]
    HeaderName(String),
    #[error("http.http_headers.{0}")]
    HeaderFile(String),
    #[error("http.headers: the value of {0} is not a header value")]
    HeaderValue(HeaderName),
    #[error("Host {0:?} is not a header value")]
    Host(String),
    #[error("request URI {uri:?}: {error}")]
    Uri {
        uri: String,
        error: http::uri::InvalidUri,
    },
}

/// blackbox_exporter adds `http://` to a target without a scheme.
fn target_url(target: &str) -> Result<Url, RequestError> {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let full = if lower.starts_with("http://") || lower.starts_with("https://") {
        target.to_string()
    } else {
        format!("http://{target}")
    };
    let url = Url::parse(&full).map_err(|error| RequestError::Url {
        target: target.to_string(),
        error,
    })?;
    url_host(&url)?;
    Ok(url)
}

/// The host of a target as the http prober reads it (`per_address` resolves it).
pub(crate) fn target_host(target: &str) -> Result<String, RequestError> {
    url_host(&target_url(target)?)
}

/// The URL's host, IPv6 addresses without their brackets.
fn url_host(url: &Url) -> Result<String, RequestError> {
    match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => Ok(d.to_string()),
        Some(url::Host::Ipv4(ip)) => Ok(ip.to_string()),
        Some(url::Host::Ipv6(ip)) => Ok(ip.to_string()),
        _ => Err(RequestError::NoHost(url.clone())),
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

enum HopEnd {
    Redirect { status: StatusCode, next: Url },
    Final(FinalResponse),
}

/// State shared by the hops of one probe.
struct Session<'a> {
    ctx: &'a Env<'a>,
    cfg: &'a HttpProbe,
    /// From basic_auth, authorization or the bearer token, for every request to the
    /// first host (see [`redirect`]).
    authorization: Option<HeaderValue>,
    algorithm: Option<Algorithm>,
    proxy: Option<Proxy>,
    /// Built on the first https hop, so a plain-http probe never pays for it.
    tls: Option<TlsClient>,
    first_host: String,
    /// Cookies set by redirect responses, for the next hops.
    cookies: CookieJar,
    /// Keep the final response's headers and body whatever the checks need.
    capture: bool,
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
        if self.cfg.enable_http3 && !https {
            return Err(http3::not_https(&hop.url));
        }
        // Built before any network work, so a bad ca_file or header fails the probe
        // without touching the target.
        if https && self.tls.is_none() && self.cfg.enable_http3 {
            self.tls = Some(http3::tls_client(self.ctx, self.cfg).because(Reason::Config)?);
        }
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

        if self.cfg.enable_http3 {
            return self.exchange_h3(hop, addr, request, redirects, out).await;
        }
        out.stage = Stage::Connect;
        let started = Instant::now();
        let mut tcp: Io = Box::new(connect(addr, None, out).await?);
        out.add_with(
            DURATION,
            &[("phase", "connect")],
            started.elapsed().as_secs_f64(),
        );
        out.stage = Stage::Exchange;
        if https && let Some(proxy) = &self.proxy {
            tunnel(
                &mut tcp,
                proxy,
                &self.cfg.proxy_connect_header,
                &hop.url,
                port,
            )
            .await?;
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
    fn request(&self, hop: &Hop) -> Result<Request<Full<Bytes>>, RequestError> {
        let mut req = Request::new(Full::new(hop.body.clone().unwrap_or_default()));
        *req.method_mut() = hop.method.clone();
        let headers = req.headers_mut();
        for (name, value) in &self.cfg.headers {
            if name.eq_ignore_ascii_case("host") {
                continue;
            }
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| RequestError::HeaderName(name.clone()))?;
            if !hop.same_site && is_sensitive(&name) {
                continue;
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| RequestError::HeaderValue(name.clone()))?;
            headers.insert(name, value);
        }
        for (name, sources) in &self.cfg.http_headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| RequestError::HeaderName(name.clone()))?;
            if !hop.same_site && is_sensitive(&header) {
                continue;
            }
            let mut values: Vec<String> = sources
                .values
                .iter()
                .chain(&sources.secrets)
                .cloned()
                .collect();
            for file in &sources.files {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| RequestError::HeaderFile(format!("{name}: {file}: {e}")))?;
                values.push(text.trim().to_string());
            }
            for value in values {
                let value = HeaderValue::from_str(&value)
                    .map_err(|_| RequestError::HeaderValue(header.clone()))?;
                headers.append(header.clone(), value);
            }
        }
        if let Some(auth) = &self.authorization
            && hop.same_site
            && !headers.contains_key(header::AUTHORIZATION)
        {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        }
        let host = url_host(&hop.url).unwrap_or_default();
        if let Some(cookies) = self.cookies.header(&host) {
            headers.append(header::COOKIE, cookies);
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
                .map_err(|_| RequestError::Host(hop.host_header.clone()))
                .because(Reason::Config)?;
            req.headers_mut().insert(header::HOST, host);
            if let Some(auth) = self.proxy.as_ref().and_then(|p| p.authorization.clone()) {
                req.headers_mut().insert(header::PROXY_AUTHORIZATION, auth);
            }
            format!("http://{}{path}", authority(&hop.url))
        } else {
            let host = HeaderValue::from_str(&hop.host_header)
                .map_err(|_| RequestError::Host(hop.host_header.clone()))
                .because(Reason::Config)?;
            req.headers_mut().insert(header::HOST, host);
            path
        };
        *req.uri_mut() = uri
            .parse::<Uri>()
            .map_err(|error| RequestError::Uri {
                uri: uri.clone(),
                error,
            })
            .because(Reason::Config)?;
        if h2 {
            *req.version_mut() = Version::HTTP_2;
        }

        if out.log.is_on() {
            log_request(&mut out.log, &req, &hop.url);
        }
        let ready = Instant::now();
        let (mut sender, conn) = handshake(io, h2).await?;
        let work = async {
            let resp = sender.send(req).await.map_err(|e| {
                Failure::new(Reason::Protocol, format!("request: {}", hyper_reason(&e)))
            })?;
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
    async fn respond<B>(
        &mut self,
        resp: Response<B>,
        hop: &Hop,
        tls: Option<TlsFacts>,
        redirects: u32,
        first_byte: Instant,
        out: &mut Samples,
    ) -> Result<HopEnd, Failure>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: ReadError,
    {
        let status = resp.status();
        out.note(Step::HttpStatus {
            line: status_line(&resp),
        });
        if out.log.is_on() {
            for (name, value) in resp.headers() {
                crate::probe_log!(
                    out.log,
                    Debug,
                    "Response header",
                    name = name,
                    value = header_value_for_log(name.as_str(), value.as_bytes())
                );
            }
        }
        let mut stopped_redirect = false;
        if let Some(next) = redirect_location(&resp, &hop.url) {
            crate::probe_log!(
                out.log,
                Debug,
                "Received redirect",
                location = url_for_log(&next),
                followed = self.cfg.follows_redirects() && redirects < MAX_REDIRECTS
            );
            // Go's CheckRedirect sees this as the (redirects+1)th and refuses past 10 or
            // when redirects are off; the redirect response is then the final one.
            if self.cfg.follows_redirects() && redirects < MAX_REDIRECTS {
                self.cookies.keep(&hop.url, resp.headers());
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
            .and_then(last_modified)
        {
            out.set("probe_http_last_modified_timestamp_seconds", t as f64);
        }

        let version = resp.version();
        let matches_headers = self.capture
            || !(self.cfg.fail_if_header_matches.is_empty()
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
            let keep = self.capture
                || status_ok(self.cfg, status)
                    && !(self.cfg.fail_if_body_matches_regexp.is_empty()
                        && self.cfg.fail_if_body_not_matches_regexp.is_empty()
                        && !cel_match::configured(self.cfg));
            let (body, error) =
                read_body(resp.into_body(), self.cfg, self.algorithm, keep, out).await;
            match &error {
                None => {
                    crate::probe_log!(out.log, Debug, "Read the body", truncated = body.truncated)
                }
                Some(e) => {
                    crate::probe_log!(out.log, Error, "Reading the body failed", err = e.message)
                }
            }
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
}

/// Logs the request about to be sent: method, URL (without its password), version and
/// each header, the values of credentials hidden.
fn log_request(log: &mut ProbeLog, req: &Request<Full<Bytes>>, url: &Url) {
    crate::probe_log!(
        log,
        Debug,
        "Making HTTP request",
        method = req.method(),
        url = url_for_log(url),
        request_target = req.uri(),
        version = conn::version_name(req.version())
    );
    for (name, value) in req.headers() {
        crate::probe_log!(
            log,
            Debug,
            "Request header",
            name = name,
            value = header_value_for_log(name.as_str(), value.as_bytes())
        );
    }
}

/// `HTTP/1.1 500 Internal Server Error`: the version, the code and the reason phrase
/// the server sent (HTTP/1), else the standard one.
fn status_line<B>(resp: &Response<B>) -> String {
    let status = resp.status();
    let phrase = resp
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned())
        .or_else(|| status.canonical_reason().map(str::to_string))
        .unwrap_or_default();
    format!(
        "{} {} {phrase}",
        conn::version_name(resp.version()),
        status.as_u16()
    )
}

/// A `Last-Modified` value as Unix seconds: an HTTP date in any of the three forms
/// that Go's `http.ParseTime` accepts (IMF-fixdate, RFC 850, asctime).
pub(crate) fn last_modified(value: &str) -> Option<i64> {
    let t = httpdate::parse_http_date(value).ok()?;
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
}
