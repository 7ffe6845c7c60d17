//! The HTTP side of remote write: one kept-alive HTTP/1.1 connection per endpoint (plain
//! or rustls with ring), the protocol's headers and the configured authentication, the
//! per-request `remote_timeout`, and the sorting of a response into sent, retry later, or
//! rejected for good.

use super::config::{ProtobufMessage, RemoteWriteConfig, Secret};
use super::endpoint::Endpoint;
use super::setting::{SettingError, invalid};
use super::tls::tls_client_config;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Bytes of a rejection's body kept for the log: enough for Prometheus's or Mimir's one-
/// line reason, short enough that a receiver returning an HTML page cannot flood the log.
const MESSAGE_BYTES: usize = 256;
/// A success body larger than this is not drained; the connection is dropped instead.
const DRAIN_BYTES: usize = 64 << 10;

/// What a 2xx response said about what it stored: remote write 2.0's
/// `X-Prometheus-Remote-Write-{Samples,Histograms,Exemplars}-Written` headers. A 2.0
/// receiver always sends them; a 1.0 receiver never does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub samples: Option<u64>,
    pub histograms: Option<u64>,
    pub exemplars: Option<u64>,
}

impl Written {
    fn from_headers(headers: &HeaderMap) -> Self {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Self {
            samples: get("x-prometheus-remote-write-samples-written"),
            histograms: get("x-prometheus-remote-write-histograms-written"),
            exemplars: get("x-prometheus-remote-write-exemplars-written"),
        }
    }

    /// True when the response carried any of the 2.0 headers.
    pub fn any(&self) -> bool {
        self.samples.is_some() || self.histograms.is_some() || self.exemplars.is_some()
    }
}

/// Why a request did not land.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth sending again: 5xx, 429, connection trouble, timeouts, unreadable credentials.
    #[error("{message}")]
    Retryable {
        message: String,
        /// From the receiver's `Retry-After` (seconds), when it sent one.
        retry_after: Option<Duration>,
    },
    /// The receiver refused this request (4xx other than 429); sending it again would get
    /// the same answer.
    #[error("HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
}

/// A credential given inline or read from a file at each request, so that a rotated token
/// file is picked up without a reload (as Prometheus does).
#[derive(Clone, Debug)]
enum Credential {
    Inline(Secret),
    File { option: &'static str, path: PathBuf },
}

impl Credential {
    fn new(option: &'static str, inline: Option<&Secret>, file: Option<&Path>) -> Option<Self> {
        match (inline, file) {
            (Some(s), _) => Some(Credential::Inline(s.clone())),
            (None, Some(p)) => Some(Credential::File {
                option,
                path: p.to_path_buf(),
            }),
            (None, None) => None,
        }
    }

    fn read(&self) -> Result<String, SendError> {
        match self {
            Credential::Inline(s) => Ok(s.expose().to_string()),
            Credential::File { option, path } => std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|e| SendError::Retryable {
                    message: format!(
                        "{option}: cannot read {}: {e}; fix the file (retrying)",
                        path.display()
                    ),
                    retry_after: None,
                }),
        }
    }
}

#[derive(Clone, Debug)]
enum Auth {
    None,
    Basic {
        username: Credential,
        password: Option<Credential>,
    },
    Scheme {
        scheme: String,
        credentials: Credential,
    },
}

impl Auth {
    fn from_config(cfg: &RemoteWriteConfig) -> Self {
        if let Some(b) = &cfg.basic_auth {
            let username = match (&b.username, &b.username_file) {
                (Some(u), _) => Credential::Inline(Secret(u.clone())),
                (None, Some(f)) => Credential::File {
                    option: "basic_auth.username_file",
                    path: f.clone(),
                },
                (None, None) => Credential::Inline(Secret(String::new())),
            };
            return Auth::Basic {
                username,
                password: Credential::new(
                    "basic_auth.password_file",
                    b.password.as_ref(),
                    b.password_file.as_deref(),
                ),
            };
        }
        if let Some(c) = Credential::new(
            "bearer_token_file",
            cfg.bearer_token.as_ref(),
            cfg.bearer_token_file.as_deref(),
        ) {
            return Auth::Scheme {
                scheme: "Bearer".to_string(),
                credentials: c,
            };
        }
        if let Some(a) = &cfg.authorization
            && let Some(c) = Credential::new(
                "authorization.credentials_file",
                a.credentials.as_ref(),
                a.credentials_file.as_deref(),
            )
        {
            return Auth::Scheme {
                scheme: a.kind.clone().unwrap_or_else(|| "Bearer".to_string()),
                credentials: c,
            };
        }
        Auth::None
    }

    fn header(&self) -> Result<Option<HeaderValue>, SendError> {
        let value = match self {
            Auth::None => return Ok(None),
            Auth::Basic { username, password } => {
                let user = username.read()?;
                let pass = match password {
                    Some(p) => p.read()?,
                    None => String::new(),
                };
                format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
            }
            Auth::Scheme {
                scheme,
                credentials,
            } => format!("{scheme} {}", credentials.read()?),
        };
        let mut value = HeaderValue::from_str(&value).map_err(|_| SendError::Retryable {
            message: "the credentials contain characters not allowed in an HTTP header; fix them"
                .to_string(),
            retry_after: None,
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

/// An open HTTP/1.1 connection. Its driver task belongs to it and ends with it, so no
/// connection outlives the client.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

pub(crate) struct Client {
    endpoint: Endpoint,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// Everything but `Authorization`, which is built per request from its source.
    headers: HeaderMap,
    auth: Auth,
    timeout: Duration,
    conn: Option<Conn>,
}

impl Client {
    pub(crate) fn new(cfg: &RemoteWriteConfig) -> Result<Self, SettingError> {
        let endpoint = Endpoint::parse(&cfg.url)?;
        let tls = if endpoint.https {
            let tls_cfg = cfg.tls_config.clone().unwrap_or_default();
            let config = tls_client_config(&tls_cfg)?;
            let name = tls_cfg
                .server_name
                .clone()
                .unwrap_or_else(|| endpoint.host.clone());
            let server_name = ServerName::try_from(name.clone()).map_err(|_| {
                invalid(format!(
                    "tls_config.server_name: {name:?} is not a valid DNS name or IP address"
                ))
            })?;
            Some((
                tokio_rustls::TlsConnector::from(Arc::new(config)),
                server_name,
            ))
        } else {
            None
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                invalid(format!("headers: {name:?} is not a valid HTTP header name"))
            })?;
            let value = HeaderValue::from_str(value).map_err(|_| {
                invalid(format!(
                    "headers: the value of {name:?} has characters not allowed in HTTP headers"
                ))
            })?;
            headers.insert(name, value);
        }
        // Set after the configured ones so that they always win (validation refuses
        // these names in `headers` anyway). Content-Type and the protocol version are
        // set per request, since an endpoint may fall back from 2.0 to 1.0.
        let fixed = [
            (header::CONTENT_ENCODING, "snappy"),
            (
                header::USER_AGENT,
                concat!("sonde/", env!("CARGO_PKG_VERSION")),
            ),
        ];
        for (name, value) in fixed {
            headers.insert(name, HeaderValue::from_static(value));
        }
        headers.insert(
            header::HOST,
            HeaderValue::from_str(&endpoint.authority)
                .map_err(|_| invalid(format!("url: invalid host {:?}", endpoint.authority)))?,
        );
        Ok(Self {
            endpoint,
            tls,
            headers,
            auth: Auth::from_config(cfg),
            timeout: cfg.remote_timeout.0,
            conn: None,
        })
    }

    /// Sends one request body encoded as `message`, within `remote_timeout` from
    /// connecting to reading the response.
    pub(crate) async fn send(
        &mut self,
        body: Bytes,
        message: ProtobufMessage,
    ) -> Result<Written, SendError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.send_inner(body, message)).await {
            Ok(result) => result,
            Err(_) => {
                // The connection may still carry the abandoned request's response.
                self.conn = None;
                Err(SendError::Retryable {
                    message: format!(
                        "no response within remote_timeout ({}s)",
                        timeout.as_secs_f64()
                    ),
                    retry_after: None,
                })
            }
        }
    }

    async fn send_inner(
        &mut self,
        body: Bytes,
        message: ProtobufMessage,
    ) -> Result<Written, SendError> {
        let auth = self.auth.header()?;
        let (content_type, version) = match message {
            ProtobufMessage::WriteRequestV1 => ("application/x-protobuf", "0.1.0"),
            ProtobufMessage::RequestV2 => (
                super::encode_v2::CONTENT_TYPE_V2,
                super::encode_v2::VERSION_V2,
            ),
        };
        let mut reused = self.conn.is_some();
        loop {
            let mut conn = match self.conn.take() {
                Some(c) if !c.sender.is_closed() => c,
                _ => {
                    reused = false;
                    self.connect().await?
                }
            };
            let mut request = Request::builder()
                .method(Method::POST)
                .uri(self.endpoint.path_and_query.as_str())
                .body(Full::new(body.clone()))
                .map_err(|e| SendError::Retryable {
                    message: format!("cannot build the request: {e}"),
                    retry_after: None,
                })?;
            *request.headers_mut() = self.headers.clone();
            request
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            request.headers_mut().insert(
                HeaderName::from_static("x-prometheus-remote-write-version"),
                HeaderValue::from_static(version),
            );
            if let Some(auth) = &auth {
                request
                    .headers_mut()
                    .insert(header::AUTHORIZATION, auth.clone());
            }
            let sent = match conn.sender.ready().await {
                Ok(()) => conn.sender.send_request(request).await,
                Err(e) => Err(e),
            };
            let response = match sent {
                Ok(r) => r,
                // A kept-alive connection the receiver closed while idle fails before the
                // request reached it: open a new one at once rather than back off.
                Err(e) if reused && (e.is_canceled() || e.is_incomplete_message()) => {
                    reused = false;
                    continue;
                }
                Err(e) => {
                    return Err(SendError::Retryable {
                        message: format!("request to {} failed: {e}", self.endpoint.authority),
                        retry_after: None,
                    });
                }
            };
            let (parts, body) = response.into_parts();
            let limit = if parts.status.is_success() {
                DRAIN_BYTES
            } else {
                MESSAGE_BYTES
            };
            let (prefix, complete) = read_prefix(body, limit).await;
            if complete {
                self.conn = Some(conn);
            }
            return read_response(parts.status, &parts.headers, &prefix);
        }
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| SendError::Retryable {
            message: format!("{what} {}: {e}", self.endpoint.authority),
            retry_after: None,
        };
        let tcp = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
            .await
            .map_err(|e| failed("cannot connect to", &e))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| failed("TLS handshake failed with", &e))?;
                handshake(tls).await
            }
        }
        .map_err(|e| failed("HTTP handshake failed with", &e))
    }
}

async fn handshake<S>(io: S) -> Result<Conn, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io)).await?;
    let driver = tokio::spawn(async move {
        // Errors surface on the request side; the driver only has to run.
        let _ = connection.await;
    });
    Ok(Conn { sender, driver })
}

/// Reads up to `limit` bytes of a body; `complete` is false when more was left unread
/// (the connection cannot be reused then) or the body failed.
async fn read_prefix(mut body: hyper::body::Incoming, limit: usize) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (buf, false);
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                buf.extend_from_slice(&data[..limit - buf.len()]);
                return (buf, false);
            }
            buf.extend_from_slice(&data);
        }
    }
    (buf, true)
}

/// What a receiver's response means: its status, the headers that matter (`Retry-After`,
/// `Location`, the 2.0 `-Written` counts) and the first bytes of its body (the reason a
/// refusal gives). Everything here comes from the receiver and is taken as untrusted.
pub fn read_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Written, SendError> {
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let location = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let written = Written::from_headers(headers);
    classify(status, retry_after, location, body).map(|()| written)
}

/// Sorts a response the way Prometheus's sender does: 2xx sent; 5xx and 429 retried (after
/// `Retry-After` when given); anything else refused for good.
pub(crate) fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    location: Option<String>,
    body: &[u8],
) -> Result<(), SendError> {
    if status.is_success() {
        return Ok(());
    }
    let message = receiver_message(body);
    let described = if message.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {message}")
    };
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return Err(SendError::Retryable {
            message: described,
            retry_after,
        });
    }
    let message = if status.is_redirection() {
        format!(
            "redirected to {}; remote write does not follow redirects, set url to the final address",
            location.as_deref().unwrap_or("(no Location)")
        )
    } else {
        message
    };
    Err(SendError::Rejected {
        status: status.as_u16(),
        message,
    })
}

/// The receiver's explanation, cut to [`MESSAGE_BYTES`] at a character boundary and put
/// on one line so that it logs cleanly.
fn receiver_message(body: &[u8]) -> String {
    let body = &body[..body.len().min(MESSAGE_BYTES)];
    let text = String::from_utf8_lossy(body);
    let mut text: String = text
        .trim_end_matches('\u{FFFD}')
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    text
}

/// Standard base64 with padding, for the Basic credentials.
fn base64(input: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors() {
        // RFC 4648 section 10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn classification() {
        let s = |code: u16| StatusCode::from_u16(code).unwrap();
        assert_eq!(classify(s(204), None, None, b""), Ok(()));
        assert_eq!(
            classify(s(503), Some(Duration::from_secs(2)), None, b"busy\n"),
            Err(SendError::Retryable {
                message: "HTTP 503 Service Unavailable: busy".into(),
                retry_after: Some(Duration::from_secs(2)),
            })
        );
        assert!(matches!(
            classify(s(429), None, None, b""),
            Err(SendError::Retryable { .. })
        ));
        let long = "x".repeat(1000);
        match classify(
            s(400),
            None,
            None,
            format!("out of bounds\n{long}").as_bytes(),
        ) {
            Err(SendError::Rejected {
                status: 400,
                message,
            }) => {
                assert!(message.starts_with("out of bounds x"), "{message}");
                assert!(message.len() <= MESSAGE_BYTES, "{}", message.len());
            }
            other => panic!("{other:?}"),
        }
        match classify(s(308), None, Some("https://x/".into()), b"") {
            Err(SendError::Rejected {
                status: 308,
                message,
            }) => {
                assert!(message.contains("https://x/"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // A cut in the middle of a UTF-8 character leaves no replacement character.
        let mut body = "a".repeat(MESSAGE_BYTES - 1).into_bytes();
        body.extend_from_slice("é".as_bytes());
        assert_eq!(receiver_message(&body), "a".repeat(MESSAGE_BYTES - 1));
    }

    #[test]
    fn auth_headers() {
        let mut cfg = RemoteWriteConfig::new("http://127.0.0.1:1/");
        cfg.basic_auth = Some(super::super::config::BasicAuth {
            username: Some("Aladdin".into()),
            username_file: None,
            password: Some(Secret("open sesame".into())),
            password_file: None,
        });
        let h = Auth::from_config(&cfg).header().unwrap().unwrap();
        assert_eq!(h, "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(h.is_sensitive());

        let dir = std::env::temp_dir().join(format!("sonde-rw-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "t0k3n\n").unwrap();
        let mut cfg = RemoteWriteConfig::new("http://127.0.0.1:1/");
        cfg.authorization = Some(super::super::config::Authorization {
            kind: Some("Token".into()),
            credentials: None,
            credentials_file: Some(token.clone()),
        });
        let auth = Auth::from_config(&cfg);
        assert_eq!(auth.header().unwrap().unwrap(), "Token t0k3n");
        // Rotation is picked up at the next request.
        std::fs::write(&token, "rotated").unwrap();
        assert_eq!(auth.header().unwrap().unwrap(), "Token rotated");
        std::fs::remove_file(&token).unwrap();
        match auth.header() {
            Err(SendError::Retryable { message, .. }) => {
                assert!(
                    message.contains("authorization.credentials_file"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
