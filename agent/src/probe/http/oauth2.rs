//! `oauth2`: the client-credentials grant. The token is fetched from `token_url` with a
//! form POST, kept per client (token URL, id, secret, scopes, parameters) until shortly
//! before it expires, and sent as `Authorization: <type> <token>`.
//!
//! The client authenticates as Go's oauth2 package does by default: first with HTTP
//! basic auth (id and secret form-encoded), and when the endpoint refuses that, with
//! `client_id` and `client_secret` in the form; the way that worked is remembered.
//!
//! Neither the secret nor the token reaches a sample, a trace step or a failure
//! message: the trace gets the connection steps and the token endpoint's status line.

use super::auth::basic;
use super::conn::{drive, handshake, hyper_reason};
use crate::probe::net::connect;
use crate::probe::tls::TlsClient;
use crate::probe::{Env, Failure, Reason, Samples, Stage, choose_ip};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use sonde_proto::config::module::{HttpProbe, OAuth2};
use sonde_proto::trace::Step;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use url::Url;
use url::form_urlencoded;

/// A token is renewed this long before it expires, as Go's oauth2 package does, so
/// that it does not expire on the way to the target.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// A token response larger than this is refused rather than read.
const MAX_RESPONSE: usize = 64 << 10;
/// Clients remembered at most; past this the cache starts over (a rotating secret
/// file makes a new client each time).
const MAX_CLIENTS: usize = 1024;

/// How the client's id and secret travel in the token request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthStyle {
    Header,
    Params,
}

struct Cached {
    authorization: HeaderValue,
    /// `None`: the endpoint gave no lifetime; the token is kept until it is refused.
    expires: Option<Instant>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct ClientKey(String);

/// Tokens and the auth style that worked, per client, for the life of the agent.
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: Mutex<HashMap<ClientKey, Cached>>,
    styles: Mutex<HashMap<ClientKey, AuthStyle>>,
}

impl TokenCache {
    fn valid(&self, key: &ClientKey, now: Instant) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let cached = tokens.get(key)?;
        match cached.expires {
            Some(at) if at.saturating_duration_since(now) <= EXPIRY_MARGIN => None,
            _ => Some(cached.authorization.clone()),
        }
    }

    fn store(&self, key: ClientKey, cached: Cached) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.len() >= MAX_CLIENTS && !tokens.contains_key(&key) {
            tokens.clear();
        }
        tokens.insert(key, cached);
    }

    fn style(&self, key: &ClientKey) -> Option<AuthStyle> {
        let styles = self.styles.lock().unwrap_or_else(|e| e.into_inner());
        styles.get(key).copied()
    }

    fn remember_style(&self, key: ClientKey, style: AuthStyle) {
        let mut styles = self.styles.lock().unwrap_or_else(|e| e.into_inner());
        if styles.len() >= MAX_CLIENTS && !styles.contains_key(&key) {
            styles.clear();
        }
        styles.insert(key, style);
    }
}

/// Why the token endpoint gave no token.
#[derive(Debug, thiserror::Error)]
enum TokenError {
    /// The endpoint answered, but not with a token: worth retrying another auth style.
    #[error("{status}{detail}")]
    Refused { status: StatusCode, detail: String },
    #[error("{0}")]
    Failed(Failure),
}

impl From<Failure> for TokenError {
    fn from(f: Failure) -> Self {
        TokenError::Failed(f)
    }
}

/// The Authorization value for the module's `oauth2` client: the cached token, or a
/// new one from the token endpoint.
pub(super) async fn authorization(
    env: &Env<'_>,
    cfg: &HttpProbe,
    oauth2: &OAuth2,
    out: &mut Samples,
) -> Result<HeaderValue, Failure> {
    let secret = match (&oauth2.client_secret, &oauth2.client_secret_file) {
        (_, Some(path)) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|e| {
                Failure::new(
                    Reason::Config,
                    format!("http.oauth2.client_secret_file {path}: {e}"),
                )
            })?,
        (Some(secret), None) => secret.clone(),
        (None, None) => String::new(),
    };
    let key = ClientKey(
        serde_json::to_string(&(
            &oauth2.token_url,
            &oauth2.client_id,
            &secret,
            &oauth2.scopes,
            &oauth2.endpoint_params,
        ))
        .unwrap_or_default(),
    );
    let cache = &env.oauth2_tokens;
    if let Some(value) = cache.valid(&key, Instant::now()) {
        return Ok(value);
    }
    let url = Url::parse(&oauth2.token_url).map_err(|e| {
        Failure::new(
            Reason::Config,
            format!("http.oauth2.token_url {:?}: {e}", oauth2.token_url),
        )
    })?;
    let styles = match cache.style(&key) {
        Some(style) => vec![style],
        None => vec![AuthStyle::Header, AuthStyle::Params],
    };
    let mut refused = None;
    for style in styles {
        let form = form(oauth2, &secret, style);
        let basic_auth = (style == AuthStyle::Header).then(|| {
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            basic(&enc(&oauth2.client_id), &enc(&secret))
        });
        let requested = Instant::now();
        match request_token(env, cfg, oauth2, &url, form, basic_auth, out).await {
            Ok(token) => {
                cache.remember_style(key.clone(), style);
                let cached = token.into_cached(requested)?;
                let value = cached.authorization.clone();
                cache.store(key, cached);
                return Ok(value);
            }
            Err(TokenError::Refused { status, detail }) => refused = Some((status, detail)),
            Err(TokenError::Failed(f)) => return Err(f),
        }
    }
    let (status, detail) = refused.unwrap_or((StatusCode::INTERNAL_SERVER_ERROR, String::new()));
    Err(Failure::new(
        Reason::HttpStatus,
        format!(
            "oauth2 token endpoint answered {status}{detail}; no token, the target was not asked"
        ),
    ))
}

/// The token request's form: the grant, the scopes, the endpoint parameters (which may
/// replace `grant_type`), and with [`AuthStyle::Params`] the client's credentials.
fn form(oauth2: &OAuth2, secret: &str, style: AuthStyle) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    if !oauth2.endpoint_params.contains_key("grant_type") {
        form.append_pair("grant_type", "client_credentials");
    }
    if !oauth2.scopes.is_empty() {
        form.append_pair("scope", &oauth2.scopes.join(" "));
    }
    for (key, value) in &oauth2.endpoint_params {
        form.append_pair(key, value);
    }
    if style == AuthStyle::Params {
        form.append_pair("client_id", &oauth2.client_id);
        form.append_pair("client_secret", secret);
    }
    form.finish()
}

/// One POST to the token endpoint, through the connect policy like every connection a
/// probe opens.
async fn request_token(
    env: &Env<'_>,
    cfg: &HttpProbe,
    oauth2: &OAuth2,
    url: &Url,
    form: String,
    basic_auth: Option<String>,
    out: &mut Samples,
) -> Result<Token, TokenError> {
    let fail =
        |reason, what: String| Failure::new(reason, format!("oauth2 token endpoint: {what}"));
    let https = url.scheme() == "https";
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(host) => host.to_string(),
        None => return Err(fail(Reason::Config, "token_url has no host".into()).into()),
    };
    let port = url.port_or_known_default().unwrap_or(80);
    out.stage = Stage::Resolve;
    let ip = choose_ip(
        env,
        &host,
        cfg.preferred_ip_protocol,
        cfg.ip_protocol_fallback,
    )
    .await
    .map_err(|e| fail(Reason::Dns, e.to_string()))?;
    let addr = SocketAddr::new(ip, port);
    env.allow(&host, addr)?;
    out.stage = Stage::Connect;
    let tcp = connect(addr, None, out)
        .await
        .map_err(|f| fail(f.reason, f.message))?;
    out.stage = Stage::Exchange;
    let mut request = Request::new(Full::new(Bytes::from(form)));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = url[url::Position::BeforePath..]
        .parse()
        .map_err(|e| fail(Reason::Config, format!("token_url path: {e}")))?;
    let headers = request.headers_mut();
    let authority = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&authority) {
        headers.insert(header::HOST, value);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(super::USER_AGENT),
    );
    if let Some(basic_auth) = basic_auth {
        let mut value = HeaderValue::from_str(&basic_auth).map_err(|_| {
            fail(
                Reason::Config,
                "client_id and client_secret are not a valid header value".into(),
            )
        })?;
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
    }
    let (status, content_type, body) = if https {
        let client = TlsClient::new(env, &oauth2.tls_config, &[b"http/1.1"])
            .map_err(|e| fail(Reason::Config, format!("http.oauth2.tls_config: {e}")))?;
        let name = oauth2
            .tls_config
            .server_name
            .clone()
            .unwrap_or_else(|| host.clone());
        // The token endpoint's certificates are not the target's: its handshake writes
        // no probe_ssl_* sample, only its trace steps are kept.
        let mut scratch = Samples::default();
        let stream = client.handshake(env, &name, tcp, &mut scratch).await;
        for step in scratch.trace.steps {
            out.trace.push(step);
        }
        let stream = stream.map_err(|f| fail(f.reason, f.message))?;
        exchange(stream, request).await?
    } else {
        exchange(tcp, request).await?
    };
    out.trace.push(Step::HttpStatus {
        line: format!("oauth2 token endpoint: {status}"),
    });
    if !status.is_success() {
        return Err(TokenError::Refused {
            status,
            detail: error_detail(&body),
        });
    }
    Token::parse(&content_type, &body).map_err(|what| fail(Reason::Protocol, what).into())
}

/// Sends the request over HTTP/1.1 and reads the whole (bounded) response.
async fn exchange<S>(
    io: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, String, Bytes), Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let fail =
        |what: String| Failure::new(Reason::Protocol, format!("oauth2 token endpoint: {what}"));
    let (mut sender, conn) = handshake(io, false).await.map_err(|f| fail(f.message))?;
    drive(conn, async move {
        let response = sender
            .send(request)
            .await
            .map_err(|e| fail(hyper_reason(&e)))?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| fail(format!("reading the response: {e}")))?
            .to_bytes();
        Ok((status, content_type, body))
    })
    .await
}

/// The endpoint's `error` and `error_description` (RFC 6749 §5.2), short and on one
/// line; never the rest of the body.
fn error_detail(body: &[u8]) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return String::new();
    };
    let field = |name: &str| {
        map.get(name).and_then(|v| v.as_str()).map(|s| {
            s.chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
        })
    };
    match (field("error"), field("error_description")) {
        (Some(error), Some(description)) => format!(" ({error}: {description})"),
        (Some(error), None) => format!(" ({error})"),
        _ => String::new(),
    }
}

/// A token response's fields (RFC 6749 §5.1).
#[derive(Debug, PartialEq)]
struct Token {
    access_token: String,
    token_type: String,
    expires_in: Option<u64>,
}

impl Token {
    /// JSON, or a form as some endpoints send (Go's oauth2 package reads both).
    fn parse(content_type: &str, body: &[u8]) -> Result<Self, String> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        let fields: HashMap<String, serde_json::Value> = if media
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            || media.eq_ignore_ascii_case("text/plain")
        {
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
                .collect()
        } else {
            serde_json::from_slice(body)
                .map_err(|e| format!("the token response is not a JSON object: {e}"))?
        };
        let text = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
        };
        let access_token = text("access_token").to_string();
        if access_token.is_empty() {
            return Err("the token response has no access_token".into());
        }
        let expires_in =
            match fields.get("expires_in") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64))
                }
                Some(serde_json::Value::String(s)) if s.is_empty() => None,
                Some(serde_json::Value::String(s)) => Some(s.parse().map_err(|_| {
                    format!("the token response's expires_in {s:?} is not a number")
                })?),
                Some(other) => {
                    return Err(format!(
                        "the token response's expires_in {other} is not a number"
                    ));
                }
            };
        Ok(Token {
            access_token,
            token_type: text("token_type").to_string(),
            expires_in: expires_in.filter(|&s| s > 0),
        })
    }

    /// As Go's `Token.Type`: the usual schemes capitalised, `Bearer` when unset.
    fn scheme(&self) -> String {
        let t = &self.token_type;
        if t.is_empty() || t.eq_ignore_ascii_case("bearer") {
            "Bearer".into()
        } else if t.eq_ignore_ascii_case("mac") {
            "MAC".into()
        } else if t.eq_ignore_ascii_case("basic") {
            "Basic".into()
        } else {
            t.clone()
        }
    }

    fn into_cached(self, requested: Instant) -> Result<Cached, Failure> {
        let mut authorization =
            HeaderValue::from_str(&format!("{} {}", self.scheme(), self.access_token)).map_err(
                |_| {
                    Failure::new(
                        Reason::Protocol,
                        "oauth2 token endpoint: the token is not a valid header value",
                    )
                },
            )?;
        authorization.set_sensitive(true);
        Ok(Cached {
            authorization,
            expires: self
                .expires_in
                .map(|s| requested + Duration::from_secs(s.min(10 * 365 * 86_400))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses_in_json_and_form() {
        let json = br#"{"access_token":"t0k","token_type":"bearer","expires_in":3600}"#;
        let token = Token::parse("application/json; charset=utf-8", json).unwrap();
        assert_eq!(token.scheme(), "Bearer");
        assert_eq!(token.expires_in, Some(3600));
        let form = b"access_token=t0k&token_type=mac&expires_in=60";
        let token = Token::parse("application/x-www-form-urlencoded", form).unwrap();
        assert_eq!(
            (token.scheme().as_str(), token.expires_in),
            ("MAC", Some(60))
        );
        let no_lifetime = Token::parse("", br#"{"access_token":"t","expires_in":"0"}"#).unwrap();
        assert_eq!(no_lifetime.expires_in, None);
        assert!(Token::parse("", br#"{"token_type":"bearer"}"#).is_err());
        assert!(Token::parse("", b"<html>").is_err());
    }

    #[test]
    fn form_carries_grant_scopes_and_params() {
        let mut oauth2 = OAuth2 {
            client_id: "id&1".into(),
            scopes: vec!["a".into(), "b".into()],
            token_url: "http://127.0.0.1/t".into(),
            ..OAuth2::default()
        };
        oauth2
            .endpoint_params
            .insert("audience".into(), "x y".into());
        assert_eq!(
            form(&oauth2, "s", AuthStyle::Header),
            "grant_type=client_credentials&scope=a+b&audience=x+y"
        );
        oauth2
            .endpoint_params
            .insert("grant_type".into(), "urn:custom".into());
        assert_eq!(
            form(&oauth2, "s=", AuthStyle::Params),
            "scope=a+b&audience=x+y&grant_type=urn%3Acustom&client_id=id%261&client_secret=s%3D"
        );
    }

    #[test]
    fn error_detail_is_short_and_single_line() {
        let body = br#"{"error":"invalid_client","error_description":"bad\nsecret"}"#;
        assert_eq!(error_detail(body), " (invalid_client: badsecret)");
        assert_eq!(error_detail(b"secret-bearing html"), "");
    }
}
