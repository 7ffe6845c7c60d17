//! `oauth2` against a real token endpoint and a real API on loopback: the token is
//! fetched, reused, renewed near its expiry, and a refusing endpoint fails the probe.

use super::*;
use crate::probe::test_support::ctx;
use crate::probe::{ProbeContext, ProbeOutcome, Reason, run};
use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_secs(3);
const SECRET: &str = "s3cr3t&=";

/// Serves `handler` over HTTP/1.1 on a loopback port.
async fn server<F>(handler: F) -> SocketAddr
where
    F: Fn(Request<Bytes>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    Ok::<_, Infallible>(handler(Request::from_parts(parts, body)))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    addr
}

fn respond(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap(),
    );
    resp
}

/// A token request's form fields, and whether it came with the client's basic auth.
type TokenRequest = (HashMap<String, String>, bool);

/// How the token endpoint wants the client to authenticate.
#[derive(Clone, Copy, PartialEq)]
enum Wants {
    BasicAuth,
    FormParams,
    Nothing,
}

/// A token endpoint issuing `tok-1`, `tok-2`, ... valid `expires_in` seconds; every
/// request it gets (its form fields, whether basic auth came) is recorded.
#[derive(Clone)]
struct TokenEndpoint {
    wants: Wants,
    expires_in: u64,
    requests: Arc<Mutex<Vec<TokenRequest>>>,
    issued: Arc<Mutex<u32>>,
}

impl TokenEndpoint {
    fn new(wants: Wants, expires_in: u64) -> Self {
        Self {
            wants,
            expires_in,
            requests: Arc::default(),
            issued: Arc::default(),
        }
    }

    fn handle(&self, req: Request<Bytes>) -> Response<Full<Bytes>> {
        let form: HashMap<String, String> = url::form_urlencoded::parse(req.body())
            .into_owned()
            .collect();
        let expected_basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("client%2F1:s3cr3t%26%3D")
        );
        let basic = req
            .headers()
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == expected_basic.as_bytes());
        self.requests.lock().unwrap().push((form.clone(), basic));
        let authenticated = req.method() == Method::POST
            && req.uri().path() == "/token"
            && form.get("grant_type").map(String::as_str) == Some("client_credentials")
            && match self.wants {
                Wants::BasicAuth => basic,
                Wants::FormParams => {
                    form.get("client_id").map(String::as_str) == Some("client/1")
                        && form.get("client_secret").map(String::as_str) == Some(SECRET)
                }
                Wants::Nothing => false,
            };
        if !authenticated {
            return respond(
                401,
                "application/json",
                r#"{"error":"invalid_client","error_description":"who are you"}"#.into(),
            );
        }
        let mut issued = self.issued.lock().unwrap();
        *issued += 1;
        respond(
            200,
            "application/json",
            format!(
                r#"{{"access_token":"tok-{issued}","token_type":"bearer","expires_in":{}}}"#,
                self.expires_in
            ),
        )
    }

    fn issued(&self) -> u32 {
        *self.issued.lock().unwrap()
    }

    fn requests(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

/// An API that answers 200 to the latest token only, and records what it was sent.
async fn api(tokens: TokenEndpoint) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let addr = server(move |req| {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        record.lock().unwrap().push(auth.clone());
        if auth == format!("Bearer tok-{}", tokens.issued()) {
            respond(200, "text/plain", "welcome".into())
        } else {
            respond(401, "text/plain", "bad token".into())
        }
    })
    .await;
    (addr, seen)
}

async fn token_server(endpoint: &TokenEndpoint) -> SocketAddr {
    let endpoint = endpoint.clone();
    server(move |req| endpoint.handle(req)).await
}

fn oauth2_module(token_addr: SocketAddr) -> Module {
    let m: Module = serde_json::from_value(serde_json::json!({
        "prober": "http",
        "http": {"oauth2": {
            "client_id": "client/1",
            "client_secret": SECRET,
            "scopes": ["read", "probe"],
            "token_url": format!("http://{token_addr}/token"),
            "endpoint_params": {"audience": "api"},
        }},
    }))
    .unwrap();
    m.validate().unwrap();
    m
}

async fn probe(ctx: &ProbeContext, api: SocketAddr, module: &Module) -> ProbeOutcome {
    run(ctx, &format!("http://{api}/"), module, TIMEOUT).await
}

#[tokio::test]
async fn oauth2_token_is_fetched_reused_and_renewed_before_expiry() {
    // 11 s of life and a 10 s margin: the token is good for about a second.
    let tokens = TokenEndpoint::new(Wants::BasicAuth, 11);
    let (api, seen) = api(tokens.clone()).await;
    let module = oauth2_module(token_server(&tokens).await);
    let ctx = ctx();

    let first = probe(&ctx, api, &module).await;
    assert!(first.success, "{:?}", first.failure);
    let second = probe(&ctx, api, &module).await;
    assert!(second.success, "{:?}", second.failure);
    assert_eq!(tokens.issued(), 1, "the second probe reuses the token");
    assert_eq!(*seen.lock().unwrap(), ["Bearer tok-1", "Bearer tok-1"]);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let third = probe(&ctx, api, &module).await;
    assert!(third.success, "{:?}", third.failure);
    assert_eq!(tokens.issued(), 2, "a token near its expiry is renewed");
    assert_eq!(seen.lock().unwrap().last().unwrap(), "Bearer tok-2");

    let (form, basic) = tokens.requests.lock().unwrap()[0].clone();
    assert!(basic, "the client authenticates with basic auth first");
    assert_eq!(form["scope"], "read probe");
    assert_eq!(form["audience"], "api");
    assert!(!form.contains_key("client_secret"));
    for sample in &third.samples {
        for (_, value) in &sample.labels {
            assert!(!value.contains("tok-") && !value.contains(SECRET));
        }
    }
}

#[tokio::test]
async fn oauth2_falls_back_to_credentials_in_the_form_and_remembers_it() {
    // A lifetime inside the margin: every probe asks for a new token.
    let tokens = TokenEndpoint::new(Wants::FormParams, 5);
    let (api, _) = api(tokens.clone()).await;
    let module = oauth2_module(token_server(&tokens).await);
    let ctx = ctx();
    let first = probe(&ctx, api, &module).await;
    assert!(first.success, "{:?}", first.failure);
    assert_eq!(tokens.requests(), 2, "basic auth refused, then the form");
    let second = probe(&ctx, api, &module).await;
    assert!(second.success, "{:?}", second.failure);
    assert_eq!(tokens.requests(), 3, "the form straight away");
    assert_eq!(tokens.issued(), 2);
}

#[tokio::test]
async fn oauth2_refusing_token_endpoint_fails_the_probe_before_the_target() {
    let tokens = TokenEndpoint::new(Wants::Nothing, 3600);
    let (api, seen) = api(tokens.clone()).await;
    let module = oauth2_module(token_server(&tokens).await);
    let o = probe(&ctx(), api, &module).await;
    assert!(!o.success);
    assert_eq!(o.failure_reason, Some(Reason::HttpStatus));
    let failure = o.failure.unwrap();
    assert!(
        failure.starts_with(
            "oauth2 token endpoint answered 401 Unauthorized (invalid_client: who are you)"
        ),
        "{failure}"
    );
    assert!(seen.lock().unwrap().is_empty(), "the target is not asked");
    let trace = serde_json::to_string(&o.trace.unwrap()).unwrap();
    assert!(
        trace.contains("oauth2 token endpoint: 401 Unauthorized"),
        "{trace}"
    );
    assert!(!trace.contains(SECRET) && !failure.contains(SECRET));
}

#[tokio::test]
async fn oauth2_unreachable_token_endpoint_fails_the_probe() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_addr = closed.local_addr().unwrap();
    drop(closed);
    let tokens = TokenEndpoint::new(Wants::BasicAuth, 3600);
    let (api, seen) = api(tokens).await;
    let o = probe(&ctx(), api, &oauth2_module(token_addr)).await;
    assert_eq!(o.failure_reason, Some(Reason::ConnectRefused));
    let failure = o.failure.unwrap();
    assert!(
        failure.starts_with("oauth2 token endpoint: connect: "),
        "{failure}"
    );
    assert!(seen.lock().unwrap().is_empty());
}
