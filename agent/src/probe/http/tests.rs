//! The http prober against real HTTP/1.1, HTTP/2, TLS and proxy servers.

use super::*;
use crate::probe::test_support::{
    LEAF_NOT_AFTER, TestPki, assert_handshake_samples, ca_file, ctx, labelled, module, phase_of,
    sample, test_pki, tls_server,
};
use crate::probe::tls_samples::GO_ZERO_TIME;
use crate::probe::{Reason, run};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sonde_proto::config::Prober;
use sonde_proto::config::module::IpProtocol;
use std::convert::Infallible;
use std::net::IpAddr;
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
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
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

async fn https_server_with(pki: &TestPki, alpn: &[&[u8]]) -> SocketAddr {
    tls_server(pki, alpn, |tls| async move {
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let port = tls.get_ref().0.local_addr().unwrap().port();
        serve(tls, h2, port).await;
    })
    .await
}

fn phase(o: &crate::probe::ProbeOutcome, name: &str) -> f64 {
    phase_of(o, DURATION, name)
}

/// A probe of `target` with the default http module.
async fn probe_default(target: &str) -> crate::probe::ProbeOutcome {
    run(&ctx(), target, &module(Prober::Http), TIMEOUT).await
}

fn http_module(json: serde_json::Value) -> Module {
    serde_json::from_value(serde_json::json!({ "prober": "http", "http": json })).unwrap()
}

#[tokio::test]
async fn probe_http_200_reports_the_response() {
    let addr = http_server().await;
    let o = probe_default(&format!("http://{addr}/ok")).await;
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
    let o = probe_default(&format!("{addr}/ok")).await;
    assert!(o.success, "{:?}", o.failure);
    assert_eq!(sample(&o, "probe_http_status_code"), Some(200.0));
}

#[tokio::test]
async fn probe_http_404_and_valid_status_codes() {
    let addr = http_server().await;
    let target = format!("http://{addr}/404");
    let o = probe_default(&target).await;
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
    let o = probe_default(&target).await;
    assert!(o.success, "{:?}", o.failure);
    assert_eq!(sample(&o, "probe_http_redirects"), Some(1.0));
    assert_eq!(sample(&o, "probe_http_status_code"), Some(200.0));
    assert_eq!(
        sample(&o, "probe_http_uncompressed_body_length"),
        Some(11.0)
    );

    // A chain of exactly 10 is followed; blackbox_exporter counts each.
    let o = probe_default(&format!("http://{addr}/chain/10")).await;
    assert!(o.success, "{:?}", o.failure);
    assert_eq!(sample(&o, "probe_http_redirects"), Some(10.0));
}

#[tokio::test]
async fn probe_http_redirect_loop_stops_after_ten() {
    let addr = http_server().await;
    let o = probe_default(&format!("http://{addr}/loop")).await;
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
    let m =
        http_module(serde_json::json!({"follow_redirects": false, "valid_status_codes": [302]}));
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
    let o = probe_default(&format!("http://{addr}/ftp")).await;
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
    let o = probe_default(&format!("http://{addr}/big")).await;
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
    let o = probe_default(&format!("http://127.0.0.1:{port}/")).await;
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
        let o = probe_default(&format!("http://{addr}/")).await;
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
    let o = probe_default(&format!("https://{addr}/ok")).await;
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
    assert_handshake_samples(&o, GO_ZERO_TIME);
    let cipher = labelled(&o, "probe_tls_cipher_info");
    assert_eq!(cipher.len(), 1);
    assert!(
        cipher[0].0[0].1.starts_with("TLS_AES_") || cipher[0].0[0].1.starts_with("TLS_CHACHA20")
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
            .contains("tls_config.ca_file: cannot read /nonexistent/ca.pem")
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
    let o = probe_default(&target).await;
    assert_eq!(sample(&o, "probe_http_status_code"), Some(401.0));
    let m =
        http_module(serde_json::json!({"basic_auth": {"username": "user", "password": "s3cr3t"}}));
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
    assert!(
        m.validate()
            .unwrap_err()
            .to_string()
            .contains("Accept-Encoding")
    );
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
    let o = probe_default(&format!("https://{addr}/ok")).await;
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
    let o = probe_default(&format!("http://{addr}/ok")).await;
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
    fn check_host(&self, _: &str, _: u16) -> Result<(), crate::probe::Refusal> {
        Ok(())
    }
    fn check_addr(&self, addr: SocketAddr) -> Result<(), crate::probe::Refusal> {
        match addr.ip() {
            IpAddr::V4(v4) if v4.is_link_local() => {
                Err(crate::probe::Refusal(format!("{addr} is link-local")))
            }
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
fn http_dates_in_all_three_forms() {
    let t = Some(784_111_777);
    assert_eq!(last_modified("Sun, 06 Nov 1994 08:49:37 GMT"), t);
    assert_eq!(last_modified("Sunday, 06-Nov-94 08:49:37 GMT"), t);
    assert_eq!(last_modified("Sun Nov  6 08:49:37 1994"), t);
    assert_eq!(last_modified("yesterday"), None);
    assert_eq!(last_modified("Sun, 06 Foo 1994 08:49:37 GMT"), None);
    assert_eq!(last_modified("Sun, 99 Nov 1994 08:49:37 GMT"), None);
    // Stricter than Go's http.ParseTime, which ignores the day name: httpdate refuses a
    // day name that does not match the date.
    assert_eq!(last_modified("Mon, 06 Nov 1994 08:49:37 GMT"), None);
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

#[tokio::test]
async fn probe_http_debug_log_tells_each_step() {
    use crate::probe::test_support::{assert_log_has, run_with_log};
    let addr = https_server(&[b"http/1.1"]).await;
    let m = http_module(serde_json::json!({
        "tls_config": {"insecure_skip_verify": true},
        "preferred_ip_protocol": "ip4",
        "authorization": {"credentials": "tok3n"},
        "headers": {"X-Api-Key": "k3y-s3cret", "X-Plain": "shown"},
        "fail_if_body_not_matches_regexp": ["welcome"],
        "fail_if_body_matches_regexp": ["denied"],
    }));
    let target = format!("https://localhost:{}/private", addr.port());
    let (o, log) = run_with_log(&target, &m).await;
    assert!(o.success, "{:?}\n{log}", o.failure);
    assert_log_has(
        &log,
        &[
            "level=info msg=\"Beginning probe\" probe=http timeout_seconds=5",
            "level=debug msg=\"Resolving target address\" target=localhost ip_protocol=ip4",
            "msg=\"Resolved target address\" target=localhost ip=127.0.0.1",
            &format!("msg=\"Dialing TCP\" address=127.0.0.1:{}", addr.port()),
            "msg=\"Successfully dialed\"",
            "msg=\"Starting TLS handshake\" server_name=localhost",
            "msg=\"TLS handshake done\" version=TLSv1_3 cipher=TLS13_",
            &format!(
                "msg=\"Making HTTP request\" method=GET url=https://localhost:{}/private",
                addr.port()
            ),
            "msg=\"Request header\" name=x-plain value=shown",
            "msg=\"Received HTTP response\" status_line=\"HTTP/1.1 200 OK\"",
            "msg=\"Response header\" name=content-length value=7",
            "msg=\"Read the body\" truncated=false",
            "msg=\"Checked the status code\" status_code=200 valid=true wanted=2xx",
            "msg=\"Checked the body against fail_if_body_matches_regexp\" regexp=denied matched=false",
            "msg=\"Checked the body against fail_if_body_not_matches_regexp\" regexp=welcome matched=true",
            "level=info msg=\"Probe succeeded\"",
        ],
    );
    assert!(log.contains("name=authorization value=<secret>"), "{log}");
    assert!(log.contains("name=x-api-key value=<secret>"), "{log}");
    assert!(
        !log.contains("tok3n") && !log.contains("k3y-s3cret"),
        "{log}"
    );
}

#[tokio::test]
async fn probe_http_debug_log_tells_why_it_failed() {
    use crate::probe::test_support::{assert_log_has, run_with_log};
    let addr = http_server().await;
    let m = http_module(serde_json::json!({"fail_if_body_not_matches_regexp": ["^absent$"]}));
    let (o, log) = run_with_log(&format!("http://{addr}/ok"), &m).await;
    assert!(!o.success);
    assert_log_has(
        &log,
        &[
            "msg=\"Target is an IP address, not resolved\" ip=127.0.0.1",
            "msg=\"Received HTTP response\" status_line=\"HTTP/1.1 200 OK\"",
            "regexp=^absent$ matched=false",
            "level=error msg=\"Body failed a regular expression\" regexp=^absent$ body_start=\"hello sonde\"",
            "level=error msg=\"Probe failed\" reason=regex err=\"body did not match \\\"^absent$\\\"\"",
        ],
    );

    // A closed port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);
    let (o, log) = run_with_log(&format!("http://{closed}/"), &module(Prober::Http)).await;
    assert!(!o.success);
    assert_log_has(
        &log,
        &[
            &format!(
                "level=error msg=\"Error dialing\" address={closed} err=\"connection refused\""
            ),
            "level=error msg=\"Probe failed\" reason=connect_refused err=\"connect: connection refused\"",
        ],
    );
    // Without a log, nothing is collected.
    let o = run(
        &ctx(),
        &format!("http://{closed}/"),
        &module(Prober::Http),
        TIMEOUT,
    )
    .await;
    assert!(o.log.lines().is_empty() && !o.log.is_on());
}

#[tokio::test]
async fn probe_http_sends_http_headers_from_values_and_files() {
    let site = http_server().await;
    let dir = std::env::temp_dir().join(format!("sonde-http-headers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("probe.txt");
    std::fs::write(&file, "from-file\n").unwrap();
    let m = http_module(serde_json::json!({
        "http_headers": {"X-Probe": {"files": [file.to_str().unwrap()]}},
        "fail_if_body_not_matches_regexp": ["x-probe=from-file "],
    }));
    let o = run(&ctx(), &format!("http://{site}/echo"), &m, TIMEOUT).await;
    assert!(o.success, "{:?}", o.failure);
    std::fs::remove_file(&file).unwrap();
    let o = run(&ctx(), &format!("http://{site}/echo"), &m, TIMEOUT).await;
    assert_eq!(o.failure_reason, Some(Reason::Config));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A proxy that answers CONNECT with 407 unless it carries `X-Tunnel-Token: t0k`, and
/// tunnels to `site` otherwise.
async fn picky_proxy(site: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !text.contains("\r\nx-tunnel-token: t0k\r\n") {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let Ok(mut upstream) = TcpStream::connect(site).await else {
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn probe_http_sends_proxy_connect_header_on_connect() {
    let pki = test_pki();
    let tls_site = https_server_with(&pki, &[b"http/1.1"]).await;
    let proxy = picky_proxy(tls_site).await;
    let target = "https://localhost:1/ok";
    let with = |headers: serde_json::Value| {
        http_module(serde_json::json!({
            "proxy_url": format!("http://{proxy}"),
            "proxy_connect_header": headers,
            "tls_config": {"ca_file": ca_file(&pki)},
        }))
    };
    let o = run(
        &ctx(),
        target,
        &with(serde_json::json!({"X-Tunnel-Token": ["t0k"]})),
        TIMEOUT,
    )
    .await;
    assert!(o.success, "{:?}", o.failure);
    let o = run(&ctx(), target, &with(serde_json::json!({})), TIMEOUT).await;
    assert!(!o.success);
    assert!(
        o.failure.as_deref().unwrap().contains("407"),
        "{:?}",
        o.failure
    );
}
