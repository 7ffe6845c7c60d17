//! sonde-agent's `/probe` with an `enable_http3` module against a real HTTP/3 server
//! (quinn and h3, on 127.0.0.1 UDP, with a certificate made by the openssl CLI).
//! Debian's blackbox_exporter 0.23 has no HTTP/3 (it refuses `enable_http3` as an
//! unknown field), so there is nothing to run side by side.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sonde_tests::parity::{Certs, make_certs};
use sonde_tests::{Scene, find_samples, http_get, parse_metrics, start_agent};
use std::net::SocketAddr;
use std::sync::Arc;

/// An HTTP/3 server on 127.0.0.1 answering every request with 200 and a short body,
/// except `/missing` (404). It runs as long as `rt` does.
fn h3_server(rt: &tokio::runtime::Runtime, certs: &Certs) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.leaf)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&certs.leaf_key).unwrap();
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
    let _guard = rt.enter();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    rt.spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok(mut h3) =
                    h3::server::Connection::<_, bytes::Bytes>::new(h3_quinn::Connection::new(conn))
                        .await
                else {
                    return;
                };
                while let Ok(Some(resolver)) = h3.accept().await {
                    tokio::spawn(async move {
                        let Ok((req, mut stream)) = resolver.resolve_request().await else {
                            return;
                        };
                        let status = if req.uri().path() == "/missing" {
                            404
                        } else {
                            200
                        };
                        let resp = http::Response::builder().status(status).body(()).unwrap();
                        if stream.send_response(resp).await.is_ok() {
                            let _ = stream
                                .send_data(bytes::Bytes::from_static(b"served over h3"))
                                .await;
                            let _ = stream.finish().await;
                        }
                    });
                }
            });
        }
    });
    addr
}

#[test]
fn probe_endpoint_runs_an_http3_module() {
    let mut scene = Scene::new("http3-probe");
    let certs = make_certs(scene.dir().path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = h3_server(&rt, &certs);
    // Nothing listens on this UDP port: the handshake gets no answer.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    let ca = certs.ca.display();
    let config = format!(
        "agent:\n  id: h3\naggregators: []\nmodules:\n  http3_2xx:\n    prober: http\n    timeout: 2s\n    http:\n      enable_http3: true\n      enable_http2: false\n      valid_http_versions: [\"HTTP/3.0\"]\n      preferred_ip_protocol: ip4\n      fail_if_body_not_matches_regexp: [\"over h3\"]\n      tls_config:\n        ca_file: {ca}\nprobe_endpoint:\n  enabled: true\n  allowed_targets: [\"127.0.0.1:*\"]\n  allowed_modules: [http3_2xx]\n"
    );
    let agent = start_agent(&mut scene, "sonde-agent", &config);
    let probe = |target: String| {
        let url = format!("{agent}/probe?module=http3_2xx&target={target}");
        let (status, body) = http_get(&url).unwrap();
        assert_eq!(status, 200, "{url}: {body}");
        body
    };
    let value = |body: &str, name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        let samples = parse_metrics(body);
        find_samples(&samples, name, labels)
            .first()
            .map(|s| s.value)
    };

    // An http:// target is probed as https://, over QUIC.
    for target in [format!("https://{server}/"), format!("http://{server}/")] {
        let body = probe(target.clone());
        assert_eq!(
            value(&body, "probe_success", &[]),
            Some(1.0),
            "{target}:\n{body}"
        );
        assert_eq!(value(&body, "probe_http_version", &[]), Some(3.0), "{body}");
        assert_eq!(value(&body, "probe_http_status_code", &[]), Some(200.0));
        assert_eq!(value(&body, "probe_http_ssl", &[]), Some(1.0));
        assert_eq!(
            value(&body, "probe_tls_version_info", &[("version", "TLS 1.3")]),
            Some(1.0)
        );
        let connect = value(
            &body,
            "probe_http_duration_seconds",
            &[("phase", "connect")],
        );
        assert!(connect.is_some_and(|s| s > 0.0), "{body}");
        assert_eq!(
            connect,
            value(&body, "probe_http_duration_seconds", &[("phase", "tls")])
        );
    }

    let body = probe(format!("https://{server}/missing"));
    assert_eq!(value(&body, "probe_success", &[]), Some(0.0));
    assert_eq!(value(&body, "probe_http_status_code", &[]), Some(404.0));
    assert_eq!(
        value(&body, "probe_failure_info", &[("reason", "http_status")]),
        Some(1.0),
        "{body}"
    );

    let body = probe(format!("https://{silent}/"));
    assert_eq!(value(&body, "probe_success", &[]), Some(0.0), "{body}");
    assert_eq!(
        value(
            &body,
            "probe_failure_info",
            &[("reason", "connect_timeout")]
        ),
        Some(1.0),
        "{body}"
    );

    scene.stop();
    drop(rt);
}
