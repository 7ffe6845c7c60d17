//! `/probe` with the unix prober, end to end: a running agent probes a real unix socket
//! server (a line protocol) that a path pattern of `allowed_targets` admits, and refuses
//! one outside it without connecting.

use sonde_tests::{Scene, http_get, start_agent};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Serves PING → PONG on `listener` (one line each), counting connections.
fn serve_ping(listener: UnixListener, connections: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            connections.fetch_add(1, Ordering::SeqCst);
            let mut writer = stream.try_clone().unwrap();
            let mut line = String::new();
            if BufReader::new(stream).read_line(&mut line).is_ok() && line == "PING\n" {
                let _ = writer.write_all(b"PONG\n");
            }
        }
    });
}

#[test]
fn probe_endpoint_runs_the_unix_prober_on_allowed_paths_only() {
    let mut scene = Scene::new("probe-unix");
    let sockets = scene.dir().path().join("sockets");
    std::fs::create_dir_all(&sockets).unwrap();
    let allowed = sockets.join("ping.sock");
    let outside = scene.dir().path().join("other.sock");
    let allowed_count = Arc::new(AtomicUsize::new(0));
    let outside_count = Arc::new(AtomicUsize::new(0));
    serve_ping(UnixListener::bind(&allowed).unwrap(), allowed_count.clone());
    serve_ping(UnixListener::bind(&outside).unwrap(), outside_count.clone());
    // blackbox_exporter's example.yml module `unix_socket_ping`.
    let config = format!(
        "aggregators: []\nmodules:\n  unix_socket_ping:\n    prober: unix\n    timeout: 5s\n    unix:\n      query_response:\n        - send: \"PING\"\n        - expect: \"PONG\"\nprobe_endpoint:\n  enabled: true\n  allowed_targets: [\"*\", \"{}/*.sock\"]\n",
        sockets.display()
    );
    let agent = start_agent(&mut scene, "agent", &config);
    let (status, body) = http_get(&format!(
        "{agent}/probe?module=unix_socket_ping&target={}",
        allowed.display()
    ))
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("probe_success 1"), "{body}");
    assert!(body.contains("probe_failed_due_to_regex 0"), "{body}");
    assert_eq!(allowed_count.load(Ordering::SeqCst), 1);

    // `*` admits hosts, never a socket: refused before any connection.
    let (status, body) = http_get(&format!(
        "{agent}/probe?module=unix_socket_ping&target={}",
        outside.display()
    ))
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(outside_count.load(Ordering::SeqCst), 0);
}
