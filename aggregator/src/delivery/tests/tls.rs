//! HTTPS against a receiver whose certificate (for `receiver.test` only) and client
//! CA are the test CA below, made once with openssl (ECDSA P-256, valid until 2126).

use super::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;

const CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBmDCCAT2gAwIBAgIUJfadg34WhMbO1ztYmq3kV+O4nw4wCgYIKoZIzj0EAwIw\n\
GDEWMBQGA1UEAwwNc29uZGUgdGVzdCBDQTAgFw0yNjExMjIwMDAzMzFaGA8yMTI2\n\
MTAyOTAwMDMzMVowGDEWMBQGA1UEAwwNc29uZGUgdGVzdCBDQTBZMBMGByqGSM49\n\
AgEGCCqGSM49AwEHA0IABLsotNooCkzWpY/gcJIh7+cp3mxjr70tvYN2mA3kz5RJ\n\
JjYhLc8j3GovsYvqggz//QGBS7IuQ0PobiwxtLfrVdajYzBhMB0GA1UdDgQWBBTk\n\
oqlujJ077MrvZu+wtnjCrssFGzAfBgNVHSMEGDAWgBTkoqlujJ077MrvZu+wtnjC\n\
rssFGzAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAKBggqhkjOPQQD\n\
AgNJADBGAiEA564S3Oy2SDkmacW05P1S6ngJn5zFISlqKgKLMrMGrucCIQDn0/Tr\n\
GwjHd5b4l8gooW/sJDweM7KvPG/dYf9+2C75fQ==\n\
-----END CERTIFICATE-----\n\
";
const SERVER_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBwTCCAWigAwIBAgIUcBkeEH97edo9yG/RV8RLm0dLK9MwCgYIKoZIzj0EAwIw\n\
GDEWMBQGA1UEAwwNc29uZGUgdGVzdCBDQTAgFw0yNjExMjIwMDAzMzFaGA8yMTI2\n\
MTAyOTAwMDMzMVowGDEWMBQGA1UEAwwNcmVjZWl2ZXIudGVzdDBZMBMGByqGSM49\n\
AgEGCCqGSM49AwEHA0IABDdZdBgVibELwyoaMmNQiQoZjjjeXvUroIH6ncSz/U79\n\
g/p7VjbnVBFOHwNhD4qkrd7yXLJe4Z4nyTFGlMBzZdqjgY0wgYowCQYDVR0TBAIw\n\
ADAOBgNVHQ8BAf8EBAMCB4AwEwYDVR0lBAwwCgYIKwYBBQUHAwEwGAYDVR0RBBEw\n\
D4INcmVjZWl2ZXIudGVzdDAdBgNVHQ4EFgQUzHb+DzP4BQLtc3pnGu2gyCupej0w\n\
HwYDVR0jBBgwFoAU5KKpboydO+zK72bvsLZ4wq7LBRswCgYIKoZIzj0EAwIDRwAw\n\
RAIgfAiS16EuQ7/HJMHIB/RzMsl3CtbMFKxP8pGwqZFeJKcCIEYOD3+QBaWWhZAG\n\
7icdYVUVTal8qez/L3qKM/YXx+X+\n\
-----END CERTIFICATE-----\n\
";
const SERVER_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgzLqr0cDI3zeLM7Rw\n\
d3yo2ssA7QQrm5gt/5nw7K09K82hRANCAAQ3WXQYFYmxC8MqGjJjUIkKGY443l71\n\
K6CB+p3Es/1O/YP6e1Y251QRTh8DYQ+KpK3e8lyyXuGeJ8kxRpTAc2Xa\n\
-----END PRIVATE KEY-----\n\
";
const CLIENT_PEM: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBqjCCAU+gAwIBAgIUcBkeEH97edo9yG/RV8RLm0dLK9QwCgYIKoZIzj0EAwIw\n\
GDEWMBQGA1UEAwwNc29uZGUgdGVzdCBDQTAgFw0yNjExMjIwMDAzMzFaGA8yMTI2\n\
MTAyOTAwMDMzMVowGzEZMBcGA1UEAwwQc29uZGUtYWdncmVnYXRvcjBZMBMGByqG\n\
SM49AgEGCCqGSM49AwEHA0IABNjW8v1eth8MpHAAINKipTQv/HTZ+x4LqcNnkuRD\n\
I9TwuYaq18fN32Eg6+9mArH0tDDY6hlC0bZT9eoCL9cS8c2jcjBwMAkGA1UdEwQC\n\
MAAwDgYDVR0PAQH/BAQDAgeAMBMGA1UdJQQMMAoGCCsGAQUFBwMCMB0GA1UdDgQW\n\
BBTcu/L6SgVI0TR+K0VVYJKoFkTx6zAfBgNVHSMEGDAWgBTkoqlujJ077MrvZu+w\n\
tnjCrssFGzAKBggqhkjOPQQDAgNJADBGAiEA/1LSakOws59LqxvH4h4xq63nx/XU\n\
fmUwWBbOzNjAf10CIQCQDZaSqwryzOZj0BJtvnsxHZnWIPpKatt+uKGsuNtsLg==\n\
-----END CERTIFICATE-----\n\
";
const CLIENT_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgPI/cVH1kj5YmDAQ4\n\
/p97yoLKNgH67GNbjUiMi8jyg/ehRANCAATY1vL9XrYfDKRwACDSoqU0L/x02fse\n\
C6nDZ5LkQyPU8LmGqtfHzd9hIOvvZgKx9LQw2OoZQtG2U/XqAi/XEvHN\n\
-----END PRIVATE KEY-----\n\
";

pub(super) struct TlsListener {
    pub tcp: tokio::net::TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that refuses the certificate is simply not served.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn server_config(require_client_cert: bool) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(certs(CA_PEM));
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    builder
        .with_single_cert(
            certs(SERVER_PEM),
            PrivateKeyDer::from_pem_slice(SERVER_KEY.as_bytes()).unwrap(),
        )
        .unwrap()
}

/// The test PEM files in a directory of their own, removed on drop.
struct Files(PathBuf);

impl Files {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sonde-rw-tls-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in [
            ("ca.pem", CA_PEM),
            ("client.pem", CLIENT_PEM),
            ("client.key", CLIENT_KEY),
        ] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        Self(dir)
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        Some(self.0.join(name))
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn https_config(rx: &Receiver, tls: config::TlsConfig) -> RemoteWriteConfig {
    let mut cfg = config(&format!("https://{}/api/v1/write", rx.addr));
    cfg.tls_config = Some(tls);
    cfg
}

async fn delivers(cfg: RemoteWriteConfig, rx: &Receiver) {
    let writer = start(cfg);
    writer.push(vec![sample("up", 1)]);
    eventually("the sample over TLS", || writer.status().sent_samples == 1).await;
    assert_eq!(rx.accepted_samples(), vec![flat("up", 1)]);
    writer.shutdown(Duration::from_secs(1)).await;
}

/// Starts a writer and returns its first error once a request has failed.
async fn first_error(cfg: RemoteWriteConfig) -> String {
    let writer = start(cfg);
    writer.push(vec![sample("up", 1)]);
    eventually("a failed request", || writer.status().failing).await;
    let error = writer.status().last_error.unwrap();
    writer.shutdown(Duration::from_millis(50)).await;
    error
}

#[tokio::test]
async fn https_with_ca_file_and_server_name() {
    let files = Files::new("ca");
    let rx = Receiver::start_with(Some(server_config(false)), Speaks::V1Lenient).await;
    let tls = config::TlsConfig {
        ca_file: files.path("ca.pem"),
        server_name: Some("receiver.test".into()),
        ..Default::default()
    };
    delivers(https_config(&rx, tls), &rx).await;
}

#[tokio::test]
async fn https_refuses_unverified_certificates() {
    let files = Files::new("refuse");
    let rx = Receiver::start_with(Some(server_config(false)), Speaks::V1Lenient).await;
    // The public roots do not know the test CA.
    let error = first_error(https_config(&rx, config::TlsConfig::default())).await;
    assert!(error.contains("TLS handshake failed"), "{error}");
    // The CA is known but the certificate is not for 127.0.0.1.
    let tls = config::TlsConfig {
        ca_file: files.path("ca.pem"),
        ..Default::default()
    };
    let error = first_error(https_config(&rx, tls)).await;
    assert!(error.contains("TLS handshake failed"), "{error}");
    assert_eq!(rx.attempts(), 0);
}

#[tokio::test]
async fn https_insecure_skip_verify() {
    let rx = Receiver::start_with(Some(server_config(false)), Speaks::V1Lenient).await;
    let tls = config::TlsConfig {
        insecure_skip_verify: true,
        ..Default::default()
    };
    delivers(https_config(&rx, tls), &rx).await;
}

#[tokio::test]
async fn https_client_certificate() {
    let files = Files::new("mtls");
    let rx = Receiver::start_with(Some(server_config(true)), Speaks::V1Lenient).await;
    let tls = config::TlsConfig {
        ca_file: files.path("ca.pem"),
        cert_file: files.path("client.pem"),
        key_file: files.path("client.key"),
        server_name: Some("receiver.test".into()),
        ..Default::default()
    };
    delivers(https_config(&rx, tls.clone()), &rx).await;
    let without = config::TlsConfig {
        cert_file: None,
        key_file: None,
        ..tls
    };
    let error = first_error(https_config(&rx, without)).await;
    assert!(!error.is_empty());
    assert_eq!(rx.attempts(), 1);
}
