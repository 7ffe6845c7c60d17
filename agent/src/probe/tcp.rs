//! The tcp prober: connect to `host:port`, optionally complete a TLS handshake, then
//! run the `query_response` dialogue (expect a line or bytes, send a line, upgrade with
//! STARTTLS), as blackbox_exporter's `tcp` module.

use super::net::{Io, connect, parse_port, parse_source_ip};
use super::tls::TlsClient;
use super::tls_samples::TlsFacts;
use super::{
    Because, Env, Failure, Reason, Samples, Stage, io_reason, resolve_target, split_host_port,
};
use sonde_proto::config::Module;
use sonde_proto::config::module::QueryResponse;
use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Go's `bufio.Scanner` gives up on lines longer than this (`MaxScanTokenSize`), and so
/// does the `query_response` reader: a peer cannot make the agent buffer more.
const MAX_LINE: usize = 64 * 1024;

pub async fn probe(
    ctx: &Env<'_>,
    target: &str,
    module: &Module,
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.tcp;
    // Registered before dialing, as blackbox_exporter 0.23 does; stays 0 unless an
    // `expect` or `expect_bytes` step fails on the content.
    out.set("probe_failed_due_to_regex", 0.0);
    out.set("probe_failed_due_to_bytes", 0.0);
    let (host, port) = split_host_port(target).because(Reason::Config)?;
    let port = parse_port(port, target).because(Reason::Config)?;
    let source = parse_source_ip(cfg.source_ip_address.as_deref()).because(Reason::Config)?;
    // Built before dialing so that a bad ca_file fails the probe without touching the
    // target, as blackbox_exporter does.
    let needs_tls = cfg.tls || cfg.query_response.iter().any(|qr| qr.starttls);
    let tls = if needs_tls {
        Some(TlsClient::new(ctx, &cfg.tls_config, &[]).because(Reason::Config)?)
    } else {
        None
    };
    let (ip, _) = resolve_target(
        ctx,
        host,
        cfg.preferred_ip_protocol,
        cfg.ip_protocol_fallback,
        out,
    )
    .await?;
    let addr = SocketAddr::new(ip, port);
    ctx.allow(host, addr)?;
    out.stage = Stage::Connect;
    let stream = connect(addr, source, out).await?;
    out.stage = Stage::Exchange;
    let server_name = cfg.tls_config.server_name.as_deref().unwrap_or(host);
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

/// blackbox_exporter's query_response loop, step by step.
pub(crate) async fn query_responses(
    ctx: &Env<'_>,
    io: Io,
    steps: &[QueryResponse],
    tls: Option<&TlsClient>,
    server_name: &str,
    out: &mut Samples,
) -> Result<(), Failure> {
    let mut conn = BufReader::with_capacity(8 * 1024, io);
    for (i, step) in steps.iter().enumerate() {
        crate::probe_log!(
            out.log,
            Debug,
            "Processing query response entry",
            entry_number = i
        );
        let mut send = step.send.as_ref().map(|s| s.0.clone()).unwrap_or_default();
        if let Some(pattern) = &step.expect {
            let re = ctx.regex(pattern).because(Reason::Config)?;
            // Lines are read until one matches; the connection ending first is a failed
            // expectation, as Go's Scanner reports it.
            let line = loop {
                match read_line(&mut conn).await? {
                    None => {
                        out.set("probe_failed_due_to_regex", 1.0);
                        return Err(Failure::new(
                            Reason::Regex,
                            format!(
                                "query_response[{i}]: connection closed before a line matched {pattern:?}"
                            ),
                        ));
                    }
                    Some(line) => {
                        let matched = re.is_match(&line);
                        crate::probe_log!(
                            out.log,
                            Debug,
                            "Read line",
                            line = String::from_utf8_lossy(&line),
                            regexp = pattern,
                            matched = matched
                        );
                        if matched {
                            break line;
                        }
                    }
                }
            };
            out.set("probe_failed_due_to_regex", 0.0);
            let caps = re
                .captures(&line)
                .ok_or_else(|| Failure::new(Reason::Regex, "regex matched then did not"))?;
            let mut expanded = Vec::new();
            caps.expand(&send, &mut expanded);
            send = expanded;
            if !step.labels.is_empty() {
                let mut labels: Vec<(&'static str, String)> = Vec::new();
                for label in &step.labels {
                    let Some(name) = ctx.label_name(&label.name) else {
                        continue;
                    };
                    let mut value = Vec::new();
                    caps.expand(label.value.as_bytes(), &mut value);
                    labels.push((name, String::from_utf8_lossy(&value).into_owned()));
                }
                out.items.push(super::Sample {
                    name: "probe_expect_info",
                    labels,
                    value: 1.0,
                });
            }
        }
        if let Some(want) = &step.expect_bytes {
            let mut got = vec![0u8; want.len()];
            conn.read_exact(&mut got).await.map_err(|e| {
                Failure::new(
                    Reason::Protocol,
                    format!(
                        "query_response[{i}]: reading {} expected bytes: {}",
                        want.len(),
                        io_reason(&e)
                    ),
                )
            })?;
            crate::probe_log!(
                out.log,
                Debug,
                "Read bytes",
                bytes = String::from_utf8_lossy(&got),
                expected = String::from_utf8_lossy(want.as_bytes()),
                matched = got == want.as_bytes()
            );
            if got != want.as_bytes() {
                out.set("probe_failed_due_to_bytes", 1.0);
                return Err(Failure::new(
                    Reason::Bytes,
                    format!(
                        "query_response[{i}]: read {:?}, expected {:?}",
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(want.as_bytes())
                    ),
                ));
            }
            out.set("probe_failed_due_to_bytes", 0.0);
        }
        if !send.is_empty() {
            crate::probe_log!(
                out.log,
                Debug,
                "Sending line",
                line = String::from_utf8_lossy(&send)
            );
            send.push(b'\n');
            let sent = match conn.write_all(&send).await {
                Ok(()) => conn.flush().await,
                Err(e) => Err(e),
            };
            sent.map_err(|e| {
                Failure::new(
                    Reason::Protocol,
                    format!("query_response[{i}]: send: {}", io_reason(&e)),
                )
            })?;
        }
        if step.starttls {
            let client = tls.ok_or_else(|| {
                Failure::new(
                    Reason::Config,
                    "starttls without a TLS client configuration",
                )
            })?;
            // Whatever the peer sent after its "go ahead" line and before the handshake
            // is dropped, as Go's tls.Client over the raw connection does.
            crate::probe_log!(out.log, Debug, "Upgrading the connection to TLS (starttls)");
            let raw = conn.into_inner();
            let stream = client.handshake(ctx, server_name, raw, out).await?;
            TlsFacts::read(ctx, stream.get_ref().1, client).record(out, false);
            conn = BufReader::with_capacity(8 * 1024, Box::new(stream) as Io);
        }
    }
    Ok(())
}

/// One line without its `\n` (and `\r`), as Go's `bufio.ScanLines`; `None` at the end of
/// the stream. A line longer than [`MAX_LINE`] fails the probe.
async fn read_line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, Failure> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await.map_err(|e| {
            Failure::new(
                Reason::Protocol,
                format!("query_response: reading: {}", io_reason(&e)),
            )
        })?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then(|| strip_cr(line)));
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_LINE + 1 {
            return Err(Failure::new(
                Reason::Protocol,
                format!("query_response: a line longer than {MAX_LINE} bytes"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            return Ok(Some(strip_cr(line)));
        }
    }
}

fn strip_cr(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::test_support::*;
    use crate::probe::tls_samples::GO_ZERO_TIME;
    use crate::probe::{Reason, run};
    use sonde_proto::config::Prober;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn probe_tcp_connects_to_an_open_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = module(Prober::Tcp);
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_success"), Some(1.0));
        assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
        assert_eq!(
            sample(&o, "probe_ip_addr_hash"),
            Some(f64::from(crate::probe::ip_hash(addr.ip())))
        );
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));
        assert!(sample(&o, "probe_duration_seconds").unwrap() > 0.0);
        assert!(sample(&o, "probe_ssl_earliest_cert_expiry").is_none());
    }

    #[tokio::test]
    async fn probe_tcp_resolves_localhost_with_ip4() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut m = module(Prober::Tcp);
        m.tcp.preferred_ip_protocol = sonde_proto::config::module::IpProtocol::Ip4;
        m.tcp.ip_protocol_fallback = false;
        let o = run(
            &ctx(),
            &format!("localhost:{port}"),
            &m,
            Duration::from_secs(2),
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
    }

    #[tokio::test]
    async fn probe_tcp_closed_port_fails_with_a_reason() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let o = run(
            &ctx(),
            &format!("127.0.0.1:{port}"),
            &module(Prober::Tcp),
            Duration::from_secs(2),
        )
        .await;
        assert!(!o.success);
        assert_eq!(o.failure.as_deref(), Some("connect: connection refused"));
        assert_eq!(sample(&o, "probe_success"), Some(0.0));
        // Resolution happened before the failure and is still reported.
        assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
        // Registered before dialing, as blackbox_exporter 0.23 does.
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));
        assert_eq!(o.failure_reason, Some(crate::probe::Reason::ConnectRefused));
        assert_eq!(
            labelled(&o, "probe_failure_info"),
            vec![(vec![("reason", "connect_refused".to_string())], 1.0)]
        );
    }

    #[tokio::test]
    async fn probe_tcp_bad_targets_fail_cleanly() {
        let c = ctx();
        let m = module(Prober::Tcp);
        for target in [
            "127.0.0.1",
            "127.0.0.1:notaport",
            "::1:80",
            "[::1",
            ":80",
            "127.0.0.1:99999",
        ] {
            let o = run(&c, target, &m, Duration::from_secs(1)).await;
            assert!(!o.success, "{target}");
            assert!(o.failure.is_some(), "{target}");
        }
    }

    #[tokio::test]
    async fn probe_tcp_source_ip_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.unwrap().1 });
        let mut m = module(Prober::Tcp);
        m.tcp.source_ip_address = Some("127.0.0.1".to_string());
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(accept.await.unwrap().ip(), addr.ip());
        m.tcp.source_ip_address = Some("not-an-ip".to_string());
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.failure.clone().unwrap().contains("source_ip_address"));
    }

    #[tokio::test]
    async fn probe_tcp_tls_strict_fails_on_an_unknown_issuer() {
        let pki = test_pki();
        let addr = tls_server(&pki, &[], |_s| async {}).await;
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(!o.success);
        let reason = o.failure.clone().unwrap();
        assert!(
            reason.starts_with("tls: invalid peer certificate"),
            "{reason}"
        );
        assert_eq!(o.failure_reason, Some(crate::probe::Reason::Tls));
        // Beyond blackbox_exporter: the untrusted certificate's expiry is still reported.
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
        let info = labelled(&o, "probe_ssl_last_chain_info");
        assert_eq!(info.len(), 1);
        assert!(labelled(&o, "probe_tls_version_info").is_empty());
    }

    #[tokio::test]
    async fn probe_tcp_tls_with_ca_file_reports_certificate_dates() {
        let pki = test_pki();
        let addr = tls_server(&pki, &[], |_s| async {}).await;
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        m.tcp.tls_config.ca_file = Some(ca_file(&pki));
        m.tcp.tls_config.server_name = Some("localhost".to_string());
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_handshake_samples(&o, LEAF_NOT_AFTER);
        let info = labelled(&o, "probe_ssl_last_chain_info");
        assert_eq!(info.len(), 1);
        let labels: std::collections::HashMap<_, _> = info[0].0.iter().cloned().collect();
        assert_eq!(labels["subject"], "CN=localhost");
        assert_eq!(labels["issuer"], "CN=sonde test CA,O=sonde\\, tests");
        assert_eq!(labels["subjectalternative"], "localhost");
        assert_eq!(labels["serialnumber"], "8f01");
        assert_eq!(labels["fingerprint_sha256"].len(), 64);
        // The tcp prober has no cipher sample, as in blackbox_exporter.
        assert!(labelled(&o, "probe_tls_cipher_info").is_empty());

        // The wrong name is a failure even with the right CA.
        m.tcp.tls_config.server_name = Some("other.example".to_string());
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(
            o.failure
                .clone()
                .unwrap()
                .starts_with("tls: invalid peer certificate")
        );
    }

    #[tokio::test]
    async fn probe_tcp_tls_insecure_skip_verify() {
        let pki = test_pki();
        let addr = tls_server(&pki, &[], |_s| async {}).await;
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        m.tcp.tls_config.insecure_skip_verify = true;
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        // No verified chain: Go's zero time, as blackbox_exporter reports.
        assert_handshake_samples(&o, GO_ZERO_TIME);
    }

    #[tokio::test]
    async fn probe_tcp_tls_against_a_plain_server_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            }
        });
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        m.tcp.tls_config.insecure_skip_verify = true;
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(!o.success);
        assert!(o.failure.clone().unwrap().starts_with("tls: "));
    }

    #[tokio::test]
    async fn probe_tcp_missing_ca_file_fails_before_connecting() {
        let mut m = module(Prober::Tcp);
        m.tcp.tls = true;
        m.tcp.tls_config.ca_file = Some("/nonexistent/ca.pem".to_string());
        let o = run(&ctx(), "127.0.0.1:1", &m, Duration::from_secs(1)).await;
        assert!(
            o.failure
                .clone()
                .unwrap()
                .contains("tls_config.ca_file: cannot read /nonexistent/ca.pem")
        );
        assert!(sample(&o, "probe_ip_protocol").is_none());
    }

    /// A line server: greets, answers `PING <x>` with `PONG <x>`, `STARTTLS` with
    /// `GO` and a TLS handshake, `BIN` with raw bytes, and `QUIT` by closing.
    async fn line_server(pki: &TestPki) -> SocketAddr {
        let acceptor = acceptor(pki, &[], false);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut io: Io = Box::new(stream);
                    let _ = io
                        .write_all(b"noise before the greeting\r\n* OK line-7 ready\r\n")
                        .await;
                    let mut reader = BufReader::new(io);
                    loop {
                        let Ok(Some(line)) = read_line(&mut reader).await else {
                            return;
                        };
                        let line = String::from_utf8_lossy(&line).into_owned();
                        let reply: Vec<u8> = if let Some(x) = line.strip_prefix("PING ") {
                            format!("PONG {x}\r\n").into_bytes()
                        } else if line == "BIN" {
                            b"\x00\x01SONDE".to_vec()
                        } else if line == "LONG" {
                            vec![b'x'; MAX_LINE + 10]
                        } else if line == "STARTTLS" {
                            let _ = reader.write_all(b"GO\r\n").await;
                            let raw = reader.into_inner();
                            let Ok(tls) = acceptor.accept(raw).await else {
                                return;
                            };
                            reader = BufReader::new(Box::new(tls) as Io);
                            let _ = reader.write_all(b"* OK secure\r\n").await;
                            let _ = reader.flush().await;
                            continue;
                        } else {
                            return;
                        };
                        let _ = reader.write_all(&reply).await;
                        let _ = reader.flush().await;
                    }
                });
            }
        });
        addr
    }

    fn qr_module(json: serde_json::Value) -> Module {
        serde_json::from_value(serde_json::json!({"prober": "tcp", "tcp": json})).unwrap()
    }

    #[tokio::test]
    async fn probe_tcp_query_response_substitutes_captures_and_labels() {
        let pki = test_pki();
        let addr = line_server(&pki).await;
        let m = qr_module(serde_json::json!({"query_response": [
            {"expect": "^\\* OK (?P<name>[a-z]+)-(\\d+) ready$",
             "send": "PING ${name}${2}",
             "labels": [{"name": "server", "value": "${name}"}, {"name": "build", "value": "v$2"}]},
            {"expect": "^PONG line7$"},
            {"send": "BIN"},
            {"expect_bytes": "\u{0}\u{1}SONDE", "send": "QUIT"},
        ]}));
        m.validate().unwrap();
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(0.0));
        assert_eq!(sample(&o, "probe_failed_due_to_bytes"), Some(0.0));
        assert_eq!(
            labelled(&o, "probe_expect_info"),
            vec![(
                vec![("server", "line".to_string()), ("build", "v7".to_string())],
                1.0
            )]
        );
    }

    #[tokio::test]
    async fn probe_tcp_query_response_failures() {
        let pki = test_pki();
        let addr = line_server(&pki).await;
        let cases = [
            (
                // No line matches and the server stays open: the deadline ends it, and
                // like blackbox_exporter that is not counted as a regex failure.
                serde_json::json!([{"expect": "^\\* OK", "send": "PING a"}, {"expect": "^PONG b$"}]),
                Reason::Timeout,
                ("probe_failed_due_to_regex", 0.0),
            ),
            (
                serde_json::json!([{"send": "BIN"}, {"expect_bytes": "\u{0}\u{1}OTHER"}]),
                Reason::Bytes,
                ("probe_failed_due_to_bytes", 1.0),
            ),
            (
                serde_json::json!([{"send": "LONG"}, {"expect": "never"}]),
                Reason::Protocol,
                ("probe_failed_due_to_regex", 0.0),
            ),
        ];
        for (steps, reason, (metric, value)) in cases {
            let m = qr_module(serde_json::json!({ "query_response": steps }));
            let o = run(&ctx(), &addr.to_string(), &m, Duration::from_millis(500)).await;
            assert!(!o.success, "{steps}");
            assert_eq!(o.failure_reason, Some(reason), "{steps}: {:?}", o.failure);
            assert_eq!(sample(&o, metric), Some(value), "{steps}");
        }
        // The server closes on QUIT: a later expect fails as a regex failure, as Go's
        // Scanner ends without a match.
        let m =
            qr_module(serde_json::json!({"query_response": [{"send": "QUIT"}, {"expect": "bye"}]}));
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert_eq!(o.failure_reason, Some(Reason::Regex));
        assert_eq!(sample(&o, "probe_failed_due_to_regex"), Some(1.0));
    }

    #[tokio::test]
    async fn probe_tcp_starttls_upgrades_and_reports_the_certificate() {
        let pki = test_pki();
        let addr = line_server(&pki).await;
        let steps = serde_json::json!([
            {"expect": "ready$", "send": "STARTTLS"},
            {"expect": "^GO$", "starttls": true},
            {"expect": "^\\* OK secure$", "send": "PING tls"},
            {"expect": "^PONG tls$", "send": "QUIT"},
        ]);
        let m = qr_module(serde_json::json!({
            "query_response": steps,
            "tls_config": {"ca_file": ca_file(&pki), "server_name": "localhost"},
        }));
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
        assert_eq!(labelled(&o, "probe_tls_version_info").len(), 1);
        // Without the CA the upgrade fails as a TLS failure, with the expiry reported.
        let m = qr_module(serde_json::json!({ "query_response": steps }));
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert_eq!(o.failure_reason, Some(Reason::Tls), "{:?}", o.failure);
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
    }

    #[tokio::test]
    async fn probe_tcp_tls_version_bounds() {
        let pki = test_pki();
        let acceptor = acceptor(&pki, &[], true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(s).await;
                });
            }
        });
        let tls = |cfg: serde_json::Value| {
            let mut c = serde_json::json!({"insecure_skip_verify": true});
            c.as_object_mut()
                .unwrap()
                .extend(cfg.as_object().unwrap().clone());
            qr_module(serde_json::json!({"tls": true, "tls_config": c}))
        };
        let o = run(
            &ctx(),
            &addr.to_string(),
            &tls(serde_json::json!({"min_version": "TLS13"})),
            Duration::from_secs(2),
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        let o = run(
            &ctx(),
            &addr.to_string(),
            &tls(serde_json::json!({"min_version": "TLS10"})),
            Duration::from_secs(2),
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        let m = tls(serde_json::json!({"max_version": "TLS12"}));
        m.validate().unwrap();
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_secs(2)).await;
        assert_eq!(o.failure_reason, Some(Reason::Tls), "{:?}", o.failure);
        assert!(
            tls(serde_json::json!({"max_version": "TLS11"}))
                .validate()
                .is_err()
        );
        assert!(
            tls(serde_json::json!({"min_version": "SSL3"}))
                .validate()
                .is_err()
        );
    }

    struct RefuseAll;
    impl crate::probe::ConnectPolicy for RefuseAll {
        fn check_host(&self, _: &str, _: u16) -> Result<(), crate::probe::Refusal> {
            Ok(())
        }
        fn check_addr(&self, addr: SocketAddr) -> Result<(), crate::probe::Refusal> {
            Err(crate::probe::Refusal(format!("{addr} is not allowed")))
        }
    }

    #[tokio::test]
    async fn probe_tcp_policy_refuses_before_connecting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let o = crate::probe::run_with_policy(
            &ctx(),
            Some(&RefuseAll),
            &addr.to_string(),
            &module(Prober::Tcp),
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(o.failure_reason, Some(Reason::RefusedByPolicy));
        // Nothing connected: the listener has no pending connection.
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "the probe connected despite the policy");
    }

    #[tokio::test]
    async fn probe_tcp_debug_log_tells_each_query_response_step() {
        let pki = test_pki();
        let addr = line_server(&pki).await;
        let mut m = qr_module(serde_json::json!({"query_response": [
            {"expect": "^\\* OK (?P<name>[a-z]+)-(\\d+) ready$", "send": "PING ${name}"},
            {"expect": "^PONG line$", "send": "STARTTLS"},
            {"expect": "^GO$", "starttls": true},
            {"expect": "^\\* OK secure$", "send": "BIN"},
            {"expect_bytes": "\u{0}\u{1}OTHER"},
        ]}));
        m.tcp.tls_config.insecure_skip_verify = true;
        let (o, log) = run_with_log(&addr.to_string(), &m).await;
        assert_eq!(o.failure_reason, Some(Reason::Bytes), "{log}");
        assert_log_has(
            &log,
            &[
                "msg=\"Beginning probe\" probe=tcp",
                "msg=\"Successfully dialed\"",
                "msg=\"Processing query response entry\" entry_number=0",
                "msg=\"Read line\" line=\"noise before the greeting\" regexp=",
                "matched=false",
                "msg=\"Read line\" line=\"* OK line-7 ready\"",
                "matched=true",
                "msg=\"Sending line\" line=\"PING line\"",
                "msg=\"Processing query response entry\" entry_number=1",
                "msg=\"Read line\" line=\"PONG line\"",
                "msg=\"Upgrading the connection to TLS (starttls)\"",
                "msg=\"TLS handshake done\" version=TLSv1_3",
                "msg=\"Read line\" line=\"* OK secure\"",
                "msg=\"Processing query response entry\" entry_number=4",
                "msg=\"Read bytes\" bytes=\"\\u{0}\\u{1}SONDE\" expected=\"\\u{0}\\u{1}OTHER\" matched=false",
                "level=error msg=\"Probe failed\" reason=bytes",
            ],
        );
    }
}
