//! `proxy_url`: an http:// proxy, with credentials from its URL. Plain-http requests
//! go to it in absolute form; https ones through a CONNECT tunnel.

use super::auth::basic;
use super::{RequestError, url_host};
use crate::probe::net::Io;
use crate::probe::{Failure, Reason, io_reason};
use http::header::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

/// A `proxy_url` the prober cannot use.
#[derive(Debug, thiserror::Error)]
pub(super) enum ProxyError {
    #[error("http.proxy_url {raw:?}: {error}")]
    Url { raw: String, error: url::ParseError },
    #[error("http.proxy_url {raw:?}: only http:// proxies are supported")]
    Scheme { raw: String },
    #[error(transparent)]
    Host(#[from] RequestError),
    #[error("http.proxy_url: the credentials are not a header value")]
    Credentials,
}

/// An HTTP proxy from `proxy_url`.
pub(super) struct Proxy {
    pub(super) host: String,
    pub(super) port: u16,
    /// `Basic ...` from the URL's user info.
    pub(super) authorization: Option<HeaderValue>,
}

impl Proxy {
    pub(super) fn parse(raw: &str) -> Result<Self, ProxyError> {
        let url = Url::parse(raw).map_err(|error| ProxyError::Url {
            raw: raw.to_string(),
            error,
        })?;
        if url.scheme() != "http" {
            return Err(ProxyError::Scheme {
                raw: raw.to_string(),
            });
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
            let mut v =
                HeaderValue::from_str(&basic(&user, &pass)).map_err(|_| ProxyError::Credentials)?;
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

/// Opens a CONNECT tunnel through the proxy to the hop's host and port (by name: the
/// proxy resolves it). The proxy's answer is read byte by byte up to its blank line, so
/// nothing of the tunnelled stream is consumed, and at most 16 KiB of it.
pub(super) async fn tunnel(
    io: &mut Io,
    proxy: &Proxy,
    connect_headers: &std::collections::BTreeMap<String, Vec<String>>,
    url: &Url,
    port: u16,
) -> Result<(), Failure> {
    const MAX_HEAD: usize = 16 * 1024;
    let host = url.host_str().unwrap_or_default();
    let target = format!("{host}:{port}");
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = proxy.authorization.as_ref().and_then(|v| v.to_str().ok()) {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    // Names and values were checked at load: tokens, and no line breaks.
    for (name, values) in connect_headers {
        for value in values {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    request.push_str("\r\n");
    let io_err = |e: std::io::Error| {
        Failure::new(
            Reason::Protocol,
            format!("proxy CONNECT: {}", io_reason(&e)),
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
