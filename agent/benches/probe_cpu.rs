//! Agent CPU per probe: runs probes one after another through `probe::run` on a
//! current-thread runtime and divides the probing thread's CPU time by their number.
//!
//! The targets (a TCP listener, a small HTTP/1.1 server, the same behind TLS) run on
//! another thread with their own runtime, so their CPU is not counted: the number is
//! what the agent spends, the kernel's work for the probing thread's syscalls included.
//!
//! Run: `cargo bench -p sonde-agent --bench probe_cpu` (optionally `-- 5000` probes).

use sonde_agent::probe::{ProbeContext, run};
use sonde_proto::config::Module;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";

fn main() {
    // `cargo bench` passes `--bench`; a bare number is the probe count.
    let probes: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
            let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
            let https = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
            tx.send((
                tcp.local_addr().unwrap(),
                http.local_addr().unwrap(),
                https.local_addr().unwrap(),
            ))
            .expect("report addresses");
            let acceptor = tls_acceptor();
            tokio::join!(
                async {
                    while let Ok((s, _)) = tcp.accept().await {
                        drop(s);
                    }
                },
                async {
                    while let Ok((s, _)) = http.accept().await {
                        tokio::spawn(serve_http(s));
                    }
                },
                async {
                    while let Ok((s, _)) = https.accept().await {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            if let Ok(tls) = acceptor.accept(s).await {
                                serve_http(tls).await;
                            }
                        });
                    }
                },
            );
        });
    });
    let (tcp, http, https) = rx.recv().expect("server addresses");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("probe runtime");
    rt.block_on(async {
        let ctx = ProbeContext::from_system().expect("probe context");
        println!("probes per kind: {probes} (sequential, current-thread runtime, probing thread CPU only)");
        println!("{:<28} {:>14} {:>14}", "probe", "CPU µs/probe", "wall µs/probe");
        let cases = [
            ("tcp connect", module(r#"{"prober":"tcp"}"#), tcp.to_string()),
            ("http GET (HTTP/1.1)", module(r#"{"prober":"http"}"#), format!("http://{http}/")),
            (
                "https GET (TLS 1.3, no verify)",
                module(r#"{"prober":"http","http":{"tls_config":{"insecure_skip_verify":true}}}"#),
                format!("https://{https}/"),
            ),
        ];
        for (name, module, target) in cases {
            let (cpu, wall) = measure(&ctx, &module, &target, probes).await;
            println!("{name:<28} {cpu:>14.1} {wall:>14.1}");
        }
    });
}

fn module(json: &str) -> Module {
    serde_json::from_str(json).expect("module")
}

/// Per-probe CPU and wall time in µs, after a warm-up.
async fn measure(ctx: &ProbeContext, module: &Module, target: &str, probes: u32) -> (f64, f64) {
    for _ in 0..probes / 10 + 1 {
        let o = run(ctx, target, module, Duration::from_secs(5)).await;
        assert!(o.success, "{target}: {:?}", o.failure);
    }
    let cpu0 = thread_cpu();
    let wall0 = Instant::now();
    for _ in 0..probes {
        let o = run(ctx, target, module, Duration::from_secs(5)).await;
        assert!(o.success, "{target}: {:?}", o.failure);
    }
    let wall = wall0.elapsed();
    let cpu = thread_cpu() - cpu0;
    let n = f64::from(probes);
    (cpu.as_secs_f64() * 1e6 / n, wall.as_secs_f64() * 1e6 / n)
}

/// CPU time of the calling thread, user and system: the first field of
/// /proc/thread-self/schedstat (nanoseconds), else utime+stime of
/// /proc/thread-self/stat (clock ticks, coarse).
fn thread_cpu() -> Duration {
    if let Some(ns) = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
    {
        return Duration::from_nanos(ns);
    }
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("/proc/thread-self/stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

async fn serve_http<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 4096];
    let mut seen = 0;
    loop {
        match s.read(&mut buf[seen..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen += n,
        }
        if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if seen == buf.len() {
            return;
        }
    }
    let _ = s.write_all(RESPONSE).await;
    let _ = s.shutdown().await;
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
