//! Agent CPU per probe: runs probes one after another through `probe::run` on a
//! current-thread runtime and divides the probing thread's CPU time by their number.
//!
//! The targets (a TCP listener, a small HTTP/1.1 server, the same behind TLS, a DNS
//! server that answers every query with an empty NOERROR) run on another thread with
//! their own runtime, so their CPU is not counted: the number is what the agent spends,
//! the kernel's work for the probing thread's syscalls included.
//!
//! Wall time is the median: on loopback, a fast connect/close cycle now and then
//! reuses a port the server side has not released yet and that SYN waits for the 1 s
//! retransmit, which would swamp a mean.
//!
//! Run: `cargo bench -p sonde-agent --bench probe_cpu` (optionally `-- 5000` probes).

use sonde_agent::probe::{ProbeContext, ProbeLog, run, run_logged};
use sonde_proto::config::Module;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

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
            let dns = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
            tx.send([
                tcp.local_addr().unwrap(),
                http.local_addr().unwrap(),
                https.local_addr().unwrap(),
                dns.local_addr().unwrap(),
            ])
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
                    let mut buf = [0u8; 512];
                    while let Ok((n, peer)) = dns.recv_from(&mut buf).await {
                        // The query itself with QR set: a NOERROR reply with no records.
                        if n >= 12 {
                            buf[2] |= 0x80;
                            let _ = dns.send_to(&buf[..n], peer).await;
                        }
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
    let [tcp, http, https, dns] = rx.recv().expect("server addresses");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("probe runtime");
    rt.block_on(async {
        let ctx = ProbeContext::from_system().expect("probe context");
        println!("probes per kind: {probes} (sequential, current-thread runtime, probing thread CPU only)");
        println!("{:<34} {:>14} {:>16}", "probe", "CPU µs/probe", "wall µs (median)");
        let cases = [
            ("tcp connect", module(r#"{"prober":"tcp"}"#), tcp.to_string()),
            (
                "tcp connect, target localhost",
                module(r#"{"prober":"tcp","tcp":{"preferred_ip_protocol":"ip4","ip_protocol_fallback":false}}"#),
                format!("localhost:{}", tcp.port()),
            ),
            (
                "dns A query over udp",
                module(r#"{"prober":"dns","dns":{"query_name":"example.com","query_type":"A"}}"#),
                dns.to_string(),
            ),
            ("http GET (HTTP/1.1)", module(r#"{"prober":"http"}"#), format!("http://{http}/")),
            (
                "https GET (TLS 1.3, no verify)",
                module(r#"{"prober":"http","http":{"tls_config":{"insecure_skip_verify":true}}}"#),
                format!("https://{https}/"),
            ),
        ];
        let debugged = [cases[0].clone(), cases[3].clone()];
        for (name, module, target) in cases {
            let (cpu, wall) = measure(&ctx, &module, &target, probes, false).await;
            println!("{name:<34} {cpu:>14.1} {wall:>16.1}");
        }
        // What `/probe?debug=true` adds: the step-by-step log, collected and rendered.
        for (name, module, target) in debugged {
            let (cpu, wall) = measure(&ctx, &module, &target, probes, true).await;
            let name = format!("{name}, debug log");
            println!("{name:<34} {cpu:>14.1} {wall:>16.1}");
        }
    });
}

fn module(json: &str) -> Module {
    serde_json::from_str(json).expect("module")
}

/// One probe; with `logged`, with its log on and rendered as `/probe?debug=true` does.
async fn probe_once(ctx: &ProbeContext, module: &Module, target: &str, logged: bool) -> bool {
    let timeout = Duration::from_secs(5);
    if !logged {
        let o = run(ctx, target, module, timeout).await;
        assert!(o.success, "{target}: {:?}", o.failure);
        return o.success;
    }
    let o = run_logged(ctx, None, target, module, timeout, ProbeLog::on()).await;
    let mut text = String::new();
    o.log
        .render(&[("module", "bench"), ("target", target)], &mut text);
    assert!(o.success && !text.is_empty(), "{target}: {:?}", o.failure);
    o.success
}

/// Mean CPU time and median wall time per probe in µs, after a warm-up.
async fn measure(
    ctx: &ProbeContext,
    module: &Module,
    target: &str,
    probes: u32,
    logged: bool,
) -> (f64, f64) {
    for _ in 0..probes / 10 + 1 {
        probe_once(ctx, module, target, logged).await;
    }
    let mut walls = Vec::with_capacity(probes as usize);
    let cpu0 = thread_cpu();
    for _ in 0..probes {
        let started = Instant::now();
        probe_once(ctx, module, target, logged).await;
        walls.push(started.elapsed());
    }
    let cpu = thread_cpu() - cpu0;
    walls.sort();
    let median = walls[walls.len() / 2];
    (
        cpu.as_secs_f64() * 1e6 / f64::from(probes),
        median.as_secs_f64() * 1e6,
    )
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
