//! `enable_http3` against a real HTTP/3 server: quinn and h3 listening on 127.0.0.1 UDP
//! with the test PKI's certificate.

use super::super::DURATION;
use crate::probe::test_support::{
    LEAF_NOT_AFTER, TestPki, assert_handshake_samples, ca_file, ctx, labelled, phase_of, sample,
    test_pki,
};
use crate::probe::{ProbeOutcome, Reason, run};
use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sonde_proto::config::Module;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(5);

/// What the server answers to `req` with body `body`: status, headers and body.
fn route(req: &Request<()>, body: &[u8], port: u16) -> (u16, Vec<(&'static str, String)>, Vec<u8>) {
    let path = req.uri().path();
    match path {
        "/ok" => (
            200,
            vec![
                ("content-length", "11".into()),
                ("x-served-by", "h3-test".into()),
                ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT".into()),
            ],
            b"hello world".to_vec(),
        ),
        // What the request was: method, authority, a header and the body.
        "/echo" => {
            let header = req
                .headers()
                .get("x-probe")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let agent = req
                .headers()
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let text = format!(
                "{} {} x-probe={header} ua={agent} body={}",
                req.method(),
                req.uri().authority().map_or("-", |a| a.as_str()),
                String::from_utf8_lossy(body)
            );
            (200, vec![], text.into_bytes())
        }
        "/big" => (200, vec![], vec![b'x'; 4096]),
        "/redirect" => (302, vec![("location", "/ok".into())], vec![]),
        "/redirect-http" => (
            302,
            vec![("location", format!("http://127.0.0.1:{port}/ok"))],
            vec![],
        ),
        _ => match path.strip_prefix("/status/").and_then(|c| c.parse().ok()) {
            Some(code) => (code, vec![], vec![]),
            None => (404, vec![], b"not found".to_vec()),
        },
    }
}

/// An HTTP/3 server on 127.0.0.1 (UDP) presenting the test PKI's leaf, answering
/// [`route`]. It runs until the test's runtime ends.
async fn h3_server(pki: &TestPki) -> SocketAddr {
    let chain = vec![
        CertificateDer::from(pki.leaf_der.clone()),
        CertificateDer::from(pki.ca_der.clone()),
    ];
    let key = PrivateKeyDer::Pkcs8(pki.leaf_key_der.clone().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok(mut h3) =
                    h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(conn)).await
                else {
                    return;
                };
                while let Ok(Some(resolver)) = h3.accept().await {
                    tokio::spawn(async move {
                        let Ok((req, mut stream)) = resolver.resolve_request().await else {
                            return;
                        };
                        let mut body = BytesMut::new();
                        while let Ok(Some(mut chunk)) = stream.recv_data().await {
                            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
                        }
                        let (status, headers, content) = route(&req, &body, addr.port());
                        let mut resp =
                            Response::builder().status(StatusCode::from_u16(status).unwrap());
                        for (name, value) in headers {
                            resp = resp.header(name, value);
                        }
                        if stream.send_response(resp.body(()).unwrap()).await.is_err() {
                            return;
                        }
                        if !content.is_empty() {
                            let _ = stream.send_data(Bytes::from(content)).await;
                        }
                        let _ = stream.finish().await;
                    });
                }
            });
        }
    });
    addr
}

/// An http module with `enable_http3` (and `enable_http2: false`, which blackbox_exporter
/// requires with it) and `options` on top, trusting the test CA.
fn h3_module(pki: &TestPki, options: serde_json::Value) -> Module {
    let mut http = serde_json::json!({
        "enable_http3": true,
        "enable_http2": false,
        "preferred_ip_protocol": "ip4",
        "tls_config": {"ca_file": ca_file(pki)},
    });
    for (k, v) in options.as_object().unwrap() {
        http[k] = v.clone();
    }
    let m: Module =
        serde_json::from_value(serde_json::json!({"prober": "http", "http": http})).unwrap();
    m.validate().unwrap();
    m
}

async fn probe(target: &str, module: &Module) -> ProbeOutcome {
    run(&ctx(), target, module, TIMEOUT).await
}

fn phase(o: &ProbeOutcome, name: &str) -> f64 {
    phase_of(o, DURATION, name)
}

#[tokio::test]
async fn http3_probe_reports_the_response_tls_and_phases() {
    let pki = test_pki();
    let addr = h3_server(&pki).await;
    let module = h3_module(
        &pki,
        serde_json::json!({"valid_http_versions": ["HTTP/3.0"]}),
    );
    let o = probe(&format!("https://{addr}/ok"), &module).await;
    assert!(o.success, "{:?}", o.failure);
    assert_eq!(sample(&o, "probe_http_status_code"), Some(200.0));
    assert_eq!(sample(&o, "probe_http_version"), Some(3.0));
    assert_eq!(sample(&o, "probe_http_ssl"), Some(1.0));
    assert_eq!(sample(&o, "probe_http_content_length"), Some(11.0));
    assert_eq!(
        sample(&o, "probe_http_uncompressed_body_length"),
        Some(11.0)
    );
    assert_eq!(sample(&o, "probe_http_redirects"), Some(0.0));
    assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
    assert_eq!(
        sample(&o, "probe_http_last_modified_timestamp_seconds"),
        Some(784_111_777.0)
    );
    // The QUIC handshake is both the connect and the tls phase, as blackbox_exporter
    // reports it.
    assert!(phase(&o, "connect") > 0.0);
    assert_eq!(phase(&o, "connect"), phase(&o, "tls"));
    assert!(phase(&o, "processing") > 0.0);
    assert!(phase(&o, "transfer") >= 0.0);
    assert!(phase(&o, "resolve") < 0.01);
    assert_handshake_samples(&o, LEAF_NOT_AFTER);
    assert_eq!(labelled(&o, "probe_ssl_last_chain_info").len(), 1);
    // quinn does not tell the negotiated suite: none is made up.
    assert!(labelled(&o, "probe_tls_cipher_info").is_empty());
}

#[tokio::test]
async fn http3_probe_turns_an_http_target_into_https() {
    let pki = test_pki();
    let addr = h3_server(&pki).await;
    let module = h3_module(&pki, serde_json::json!({}));
    for target in [
        format!("http://{addr}/ok"),
        format!("HtTp://{addr}/ok"),
        format!("{addr}/ok"),
    ] {
        let o = probe(&target, &module).await;
        assert!(o.success, "{target}: {:?}", o.failure);
        assert_eq!(sample(&o, "probe_http_version"), Some(3.0), "{target}");
    }
}

#[tokio::test]
async fn http3_probe_sends_method_headers_and_body() {
    let pki = test_pki();
    let addr = h3_server(&pki).await;
    let module = h3_module(
        &pki,
        serde_json::json!({
            "method": "POST",
            "headers": {"X-Probe": "sonde", "Host": "localhost"},
            "body": "ping",
            "fail_if_body_not_matches_regexp": [
                "^POST localhost x-probe=sonde ua=sonde/[0-9.]+ body=ping$"
            ],
            "fail_if_header_matches": [
                {"header": "X-Served-By", "regexp": "h3", "allow_missing": true}
            ],
        }),
    );
    let o = probe(&format!("https://127.0.0.1:{}/echo", addr.port()), &module).await;
    assert!(o.success, "{:?}", o.failure);
    assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));

    // The header check reads the response's headers.
    let o = probe(&format!("https://{addr}/ok"), &module).await;
    assert_eq!(o.failure_reason, Some(Reason::Regex), "{:?}", o.failure);
    assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(1.0));
}

#[tokio::test]
async fn http3_probe_checks_status_body_and_size() {
    let pki = test_pki();
    let addr = h3_server(&pki).await;
    let cases = [
        (
            "/status/503",
            serde_json::json!({}),
            Some(Reason::HttpStatus),
        ),
        (
            "/status/404",
            serde_json::json!({"valid_status_codes": [404]}),
            None,
        ),
        (
            "/ok",
            serde_json::json!({"fail_if_body_matches_regexp": ["hello"]}),
            Some(Reason::Regex),
        ),
        (
            "/big",
            serde_json::json!({"body_size_limit": "1KiB"}),
            Some(Reason::BodySize),
        ),
        ("/big", serde_json::json!({"body_size_limit": "4KiB"}), None),
        (
            "/ok",
            serde_json::json!({"fail_if_ssl": true}),
            Some(Reason::Tls),
        ),
        ("/ok", serde_json::json!({"fail_if_not_ssl": true}), None),
    ];
    for (path, options, reason) in cases {
        let o = probe(
            &format!("https://{addr}{path}"),
            &h3_module(&pki, options.clone()),
        )
        .await;
        assert_eq!(
            o.failure_reason, reason,
            "{path} {options}: {:?}",
            o.failure
        );
        assert_eq!(o.success, reason.is_none(), "{path} {options}");
    }
    let o = probe(
        &format!("https://{addr}/status/503"),
        &h3_module(&pki, serde_json::json!({})),
    )
    .await;
    assert_eq!(sample(&o, "probe_http_status_code"), Some(503.0));
    let steps = format!("{:?}", o.trace.as_ref().unwrap().steps);
    assert!(
        steps.contains("HTTP/3.0 503 Service Unavailable"),
        "{steps}"
    );
}

#[tokio::test]
async fn http3_probe_follows_redirects_over_http3_only() {
    let pki = test_pki();
    let addr = h3_server(&pki).await;
    let o = probe(
        &format!("https://{addr}/redirect"),
        &h3_module(&pki, serde_json::json!({})),
    )
    .await;
    assert!(o.success, "{:?}", o.failure);
    assert_eq!(sample(&o, "probe_http_redirects"), Some(1.0));
    assert_eq!(sample(&o, "probe_http_status_code"), Some(200.0));
    assert_eq!(sample(&o, "probe_http_version"), Some(3.0));

    let module = h3_module(&pki, serde_json::json!({"follow_redirects": false}));
    let o = probe(&format!("https://{addr}/redirect"), &module).await;
    assert_eq!(sample(&o, "probe_http_status_code"), Some(302.0));
    assert_eq!(o.failure_reason, Some(Reason::HttpStatus));

    // HTTP/3 has no plain-text form: a redirect to http:// is not followed over TCP.
    let o = probe(
        &format!("https://{addr}/redirect-http"),
        &h3_module(&pki, serde_json::json!({})),
    )
    .await;
    assert_eq!(o.failure_reason, Some(Reason::Config));
    assert!(
        o.failure.as_deref().unwrap().contains("needs https"),
        "{:?}",
        o.failure
    );
}

#[tokio::test]
async fn http3_probe_fails_when_nothing_listens_on_the_udp_port() {
    let pki = test_pki();
    let port = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let module = h3_module(&pki, serde_json::json!({}));
    let o = run(
        &ctx(),
        &format!("https://127.0.0.1:{port}/ok"),
        &module,
        Duration::from_secs(1),
    )
    .await;
    assert!(!o.success);
    assert_eq!(
        o.failure_reason,
        Some(Reason::ConnectTimeout),
        "{:?}",
        o.failure
    );
    let steps = format!("{:?}", o.trace.as_ref().unwrap().steps);
    assert!(steps.contains("no answer to the QUIC handshake"), "{steps}");
    assert!(sample(&o, "probe_http_version").is_none_or(|v| v == 0.0));
}

#[tokio::test]
async fn http3_probe_verifies_the_certificate() {
    let pki = test_pki();
    let addr = h3_server(&pki).await;
    let strict: Module = serde_json::from_value(serde_json::json!({
        "prober": "http",
        "http": {"enable_http3": true, "enable_http2": false},
    }))
    .unwrap();
    let o = probe(&format!("https://{addr}/ok"), &strict).await;
    assert_eq!(o.failure_reason, Some(Reason::Tls), "{:?}", o.failure);
    assert!(
        o.failure.as_deref().unwrap().contains("UnknownIssuer"),
        "{:?}",
        o.failure
    );
    // What the server showed is still reported.
    assert_eq!(
        sample(&o, "probe_ssl_earliest_cert_expiry"),
        Some(LEAF_NOT_AFTER)
    );

    let insecure: Module = serde_json::from_value(serde_json::json!({
        "prober": "http",
        "http": {"enable_http3": true, "enable_http2": false,
                 "tls_config": {"insecure_skip_verify": true}},
    }))
    .unwrap();
    let o = probe(&format!("https://{addr}/ok"), &insecure).await;
    assert!(o.success, "{:?}", o.failure);

    // The name checked is server_name's when set: the leaf is for localhost, not this.
    let module = h3_module(
        &pki,
        serde_json::json!({"tls_config": {"ca_file": ca_file(&pki), "server_name": "other.example"}}),
    );
    let o = probe(&format!("https://{addr}/ok"), &module).await;
    assert_eq!(o.failure_reason, Some(Reason::Tls), "{:?}", o.failure);
    let module = h3_module(
        &pki,
        serde_json::json!({"tls_config": {"ca_file": ca_file(&pki), "server_name": "localhost"}}),
    );
    let o = probe(&format!("https://{addr}/ok"), &module).await;
    assert!(o.success, "{:?}", o.failure);
}
