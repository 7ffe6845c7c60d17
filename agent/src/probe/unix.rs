//! The unix prober: connect to a unix domain socket (the target is its path),
//! optionally complete a TLS handshake, then run the `query_response` dialogue with the
//! tcp prober's engine, as blackbox_exporter's `unix` module.

use super::net::{Io, connect_failure};
use super::tcp::query_responses;
use super::tls::TlsClient;
use super::tls_samples::TlsFacts;
use super::{Because, Env, Failure, Reason, Samples, Stage};
use sonde_proto::config::Module;
use tokio::net::UnixStream;

pub async fn probe(
    ctx: &Env<'_>,
    target: &str,
    module: &Module,
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.unix;
    // As the tcp prober: blackbox_exporter's shared query_response engine registers both.
    out.set("probe_failed_due_to_regex", 0.0);
    out.set("probe_failed_due_to_bytes", 0.0);
    if !target.starts_with('/') {
        return Err(Failure::new(
            Reason::Config,
            format!(
                "{target:?} is not a socket path: the unix prober's target is the absolute path of a unix domain socket (like /run/app.sock)"
            ),
        ));
    }
    let needs_tls = cfg.tls || cfg.query_response.iter().any(|qr| qr.starttls);
    let tls = if needs_tls {
        Some(TlsClient::new(ctx, &cfg.tls_config, &[]).because(Reason::Config)?)
    } else {
        None
    };
    ctx.allow_socket(target)?;
    out.stage = Stage::Connect;
    let stream = UnixStream::connect(target).await.map_err(|e| {
        let mut failure = connect_failure(&e);
        if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) {
            failure.message = format!(
                "connect: permission denied connecting to unix socket {target}: give the agent's user access to it (its group, or the socket's mode)"
            );
        }
        failure
    })?;
    out.stage = Stage::Exchange;
    // A path names no host: the certificate is checked against `server_name` (the
    // module's validation requires it unless verification is off).
    let server_name = cfg.tls_config.server_name.as_deref().unwrap_or("localhost");
    let io: Io = match (&tls, cfg.tls) {
        (Some(client), true) => {
            let stream = client.handshake(ctx, server_name, stream, out).await?;
            TlsFacts::read(ctx, stream.get_ref().1, client).record(out, false);
            Box::new(stream)
        }
        _ => Box::new(stream),
    };
    query_responses(ctx, io, &cfg.query_response, tls.as_ref(), server_name, out).await
}

#[cfg(test)]
mod tests {
    use crate::probe::test_support::*;
    use crate::probe::{Reason, run};
    use sonde_proto::config::Prober;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// A line server on a unix socket: greets, then answers `PING` with `PONG` and
    /// anything else with `ERR` and hangs up; it also notes the raw bytes of the first line.
    fn ping_server(dir: &std::path::Path) -> (String, tokio::sync::oneshot::Receiver<Vec<u8>>) {
        let path = dir.join("ping.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            write.write_all(b"READY sonde-test\n").await.unwrap();
            let mut lines = BufReader::new(read);
            let mut tx = Some(tx);
            loop {
                let mut line = Vec::new();
                if lines.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line.clone());
                }
                if line != b"PING\n" {
                    // Hangs up: the probe's expect then fails on the closed connection.
                    let _ = write.write_all(b"ERR\n").await;
                    return;
                }
                let _ = write.write_all(b"PONG\n").await;
            }
        });
        (path.to_string_lossy().into_owned(), rx)
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sonde-unix-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn unix_query_response_against_a_line_server() {
        let dir = temp_dir("ok");
        let (path, first) = ping_server(&dir);
        let m = module_with(
            Prober::Unix,
            serde_json::json!({"query_response": [
                {"expect": "^READY (.+)$", "labels": [{"name": "server", "value": "${1}"}]},
                {"send": "PING"},
                {"expect": "^PONG$"}
            ]}),
        );
        let o = run(&ctx(), &path, &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));
        assert_eq!(
            labelled(&o, "probe_expect_info"),
            vec![(vec![("server", "sonde-test".to_string())], 1.0)]
        );
        assert_eq!(first.await.unwrap(), b"PING\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn unix_sends_binary_bytes_and_fails_on_a_wrong_answer() {
        let dir = temp_dir("bytes");
        let (path, first) = ping_server(&dir);
        // `send: !!binary` bytes reach the socket as they are (plus the newline).
        let yaml = "prober: unix\nunix:\n  query_response:\n    - expect: READY\n    - send: !!binary AAHSLw==\n    - expect: ^PONG$\n";
        let m: sonde_proto::config::Module =
            sonde_proto::config::from_yaml_str(std::path::Path::new("m.yml"), yaml).unwrap();
        let o = run(&ctx(), &path, &m, Duration::from_secs(2)).await;
        assert!(!o.success);
        assert_eq!(o.failure_reason, Some(Reason::Regex));
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(1.0));
        assert_eq!(first.await.unwrap(), vec![0x00, 0x01, 0xD2, 0x2F, b'\n']);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn unix_missing_socket_is_a_connect_failure() {
        let dir = temp_dir("missing");
        let path = dir.join("absent.sock");
        let o = run(
            &ctx(),
            path.to_str().unwrap(),
            &module(Prober::Unix),
            Duration::from_secs(2),
        )
        .await;
        assert!(!o.success);
        assert_eq!(o.failure_reason, Some(Reason::ConnectError));
        let o = run(
            &ctx(),
            "relative.sock",
            &module(Prober::Unix),
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(o.failure_reason, Some(Reason::Config));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
