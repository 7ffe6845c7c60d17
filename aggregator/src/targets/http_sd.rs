//! `http_sd_configs`: a URL answering, with `Content-Type: application/json`, a JSON
//! list of target groups (`[{"targets": ["host:port"], "labels": {...}}]`), fetched
//! every `refresh_interval`, as Prometheus's HTTP SD. Each group gets the label
//! `__meta_url` and the source `URL:index`. A failed fetch (connection, status other
//! than 200, wrong Content-Type, bad JSON, bad label name) keeps the last good list.

use super::{ADDRESS_LABEL, Group, Publisher, Source};
use crate::remote_write::endpoint::Endpoint;
use crate::remote_write::tls::tls_client_config;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use sonde_proto::config::discovery::{SdAuthorization, SdBasicAuth, SdSecret};
use sonde_proto::config::{HttpSdConfig, Labels, is_valid_label_name};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// A response body larger than this is refused (its targets would not fit anyway).
const MAX_BODY: usize = 64 << 20;
/// Redirects followed, as Go's HTTP client does.
const MAX_REDIRECTS: usize = 10;

pub(super) fn source(_job: &str, config: &HttpSdConfig) -> Source {
    let config = config.clone();
    Source::new("http", move |publisher: Publisher| async move {
        let interval = config.refresh_interval.0;
        publisher
            .poll_every(interval, || fetch(&config, interval))
            .await
    })
}

/// Why a refresh failed; the message names the URL.
#[derive(Debug, thiserror::Error)]
#[error("http_sd {url}: {message}")]
pub struct HttpSdError {
    url: String,
    message: String,
}

/// One refresh: the groups the URL answers now.
pub async fn fetch(config: &HttpSdConfig, timeout: Duration) -> Result<Vec<Group>, HttpSdError> {
    let fail = |message: String| HttpSdError {
        url: config.url.clone(),
        message,
    };
    let body = tokio::time::timeout(timeout, get_following_redirects(config))
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
        .map_err(fail)?;
    parse(&config.url, &body).map_err(fail)
}

/// The groups of an http_sd answer's body, as Prometheus reads them.
pub fn parse(url: &str, body: &[u8]) -> Result<Vec<Group>, String> {
    #[derive(serde::Deserialize)]
    struct Wire {
        #[serde(default)]
        targets: Vec<String>,
        #[serde(default)]
        labels: Labels,
    }
    let wire: Option<Vec<Wire>> = serde_json::from_slice(body)
        .map_err(|e| format!("the answer is not a JSON list of target groups: {e}"))?;
    let mut groups = Vec::new();
    for (i, g) in wire.unwrap_or_default().into_iter().enumerate() {
        if let Some(bad) = g.labels.keys().find(|k| !is_valid_label_name(k)) {
            return Err(format!("group {i}: {bad:?} is not a valid label name"));
        }
        let mut labels = g.labels;
        labels.insert("__meta_url".to_string(), url.to_string());
        groups.push(Group {
            source: format!("{url}:{i}"),
            targets: g
                .targets
                .into_iter()
                .map(|t| Labels::from([(ADDRESS_LABEL.to_string(), t)]))
                .collect(),
            labels,
        });
    }
    Ok(groups)
}

async fn get_following_redirects(config: &HttpSdConfig) -> Result<Bytes, String> {
    let mut url = config.url.clone();
    for _ in 0..=MAX_REDIRECTS {
        match get(config, &url).await? {
            Answer::Body(b) => return Ok(b),
            Answer::Redirect(location) => url = location,
        }
    }
    Err(format!("stopped after {MAX_REDIRECTS} redirects"))
}

enum Answer {
    Body(Bytes),
    Redirect(String),
}

async fn get(config: &HttpSdConfig, url: &str) -> Result<Answer, String> {
    let endpoint = Endpoint::parse(url).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", endpoint.authority))?;
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(endpoint.path_and_query.as_str())
        .header(header::HOST, endpoint.authority.as_str())
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("sonde/", env!("CARGO_PKG_VERSION")),
        )
        .header(
            "X-Prometheus-Refresh-Interval-Seconds",
            config.refresh_interval.0.as_secs().to_string(),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    // Credentials go only to the configured URL's host, as Go's client does on redirects.
    if Endpoint::parse(&config.url).is_ok_and(|c| c.authority == endpoint.authority)
        && let Some(value) = authorization(config)?
    {
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let response = if endpoint.https {
        let tls = config.tls_config.clone().unwrap_or_default();
        let remote = crate::remote_write::config::TlsConfig {
            ca_file: tls.ca_file,
            cert_file: tls.cert_file,
            key_file: tls.key_file,
            server_name: tls.server_name.clone(),
            insecure_skip_verify: tls.insecure_skip_verify,
        };
        let client = tls_client_config(&remote).map_err(|e| e.to_string())?;
        let name = tls.server_name.unwrap_or_else(|| endpoint.host.clone());
        let name = ServerName::try_from(name.clone()).map_err(|_| {
            format!("tls_config.server_name: {name:?} is not a valid DNS name or IP address")
        })?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake failed with {}: {e}", endpoint.authority))?;
        send(stream, request).await?
    } else {
        send(tcp, request).await?
    };
    let status = response.status();
    if status.is_redirection()
        && let Some(location) = response.headers().get(header::LOCATION)
    {
        let location = location
            .to_str()
            .map_err(|_| format!("{status}: a Location header that is not text"))?;
        return Ok(Answer::Redirect(resolve_location(&endpoint, location)));
    }
    if status != StatusCode::OK {
        return Err(format!("server returned HTTP status {status}"));
    }
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !is_json(content_type) {
        return Err(format!(
            "unsupported content type {content_type:?}; the server must answer application/json"
        ));
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok(Answer::Body(body.to_bytes()))
}

/// `application/json`, with or without parameters (Prometheus's `^application/json(;.*)?$`).
fn is_json(content_type: &str) -> bool {
    content_type
        .strip_prefix("application/json")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(';'))
}

fn resolve_location(base: &Endpoint, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let scheme = if base.https { "https" } else { "http" };
    if location.starts_with('/') {
        return format!("{scheme}://{}{location}", base.authority);
    }
    let dir = base
        .path_and_query
        .split('?')
        .next()
        .and_then(|p| p.rsplit_once('/'))
        .map_or("", |(d, _)| d);
    format!("{scheme}://{}{dir}/{location}", base.authority)
}

async fn send<S>(
    io: S,
    request: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"));
    // The body is read after this returns; the driver must live until then, and ends
    // on its own when the connection closes (the sender is dropped with the response).
    drop(driver);
    result
}

/// The `Authorization` header, credentials files read now so a rotated secret is used.
fn authorization(config: &HttpSdConfig) -> Result<Option<HeaderValue>, String> {
    let value = if let Some(SdBasicAuth {
        username,
        username_file,
        password,
        password_file,
    }) = &config.basic_auth
    {
        let user = inline_or_file(
            username.as_deref(),
            username_file.as_deref(),
            "basic_auth.username_file",
        )?;
        let pass = inline_or_file(
            password.as_ref().map(|s: &SdSecret| s.0.as_str()),
            password_file.as_deref(),
            "basic_auth.password_file",
        )?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        format!("Basic {encoded}")
    } else if let Some(SdAuthorization {
        kind,
        credentials,
        credentials_file,
    }) = &config.authorization
    {
        let credentials = inline_or_file(
            credentials.as_ref().map(|s| s.0.as_str()),
            credentials_file.as_deref(),
            "authorization.credentials_file",
        )?;
        format!("{} {credentials}", kind.as_deref().unwrap_or("Bearer"))
    } else {
        return Ok(None);
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| {
        "the credentials contain characters not allowed in an HTTP header".to_string()
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

fn inline_or_file(
    inline: Option<&str>,
    file: Option<&Path>,
    field: &str,
) -> Result<String, String> {
    match (inline, file) {
        (Some(v), _) => Ok(v.to_string()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("{field}: cannot read {}: {e}", path.display())),
        (None, None) => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_prometheus_reads_them() {
        let groups = parse(
            "http://sd/x",
            br#"[{"targets": ["a:1", "b:2"], "labels": {"team": "x"}}, {"targets": []}]"#,
        )
        .unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].source, "http://sd/x:0");
        assert_eq!(groups[0].labels["__meta_url"], "http://sd/x");
        assert_eq!(groups[0].labels["team"], "x");
        assert_eq!(groups[0].targets[1][ADDRESS_LABEL], "b:2");
        assert!(parse("u", b"null").unwrap().is_empty());
        assert!(parse("u", br#"{"targets": []}"#).is_err());
        assert!(parse("u", br#"[{"targets": ["a:1"], "labels": {"a-b": "x"}}]"#).is_err());
        assert!(is_json("application/json; charset=utf-8"));
        assert!(!is_json("application/jsonx"));
        assert!(!is_json("text/plain"));
    }
}
