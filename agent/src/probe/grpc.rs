//! The grpc prober: the gRPC health checking protocol's `Check` (`grpc.health.v1`), as
//! blackbox_exporter's `grpc` module, with its options and samples.
//!
//! The connection is the probers' own (the resolved address, the connect policy, the
//! shared TLS client offering `h2`), handed to tonic as an established stream, so that
//! resolve, connect and TLS behave and report as in the other probers.

use super::net::{Io, connect};
use super::tls::TlsClient;
use super::tls_samples::TlsFacts;
use super::{Because, Env, Failure, HostPortError, Reason, Samples, Stage, resolve_target};
use crate::one_connection::OneConnection;
use sonde_proto::config::Module;
use std::error::Error as _;
use std::net::SocketAddr;
use std::time::Instant;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The largest health answer read: a real one is a few bytes, and a hostile server
/// should not make the agent buffer tonic's default of 4 MiB.
const MAX_ANSWER: usize = 64 * 1024;

/// The values of `probe_grpc_healthcheck_response{serving_status}`, all reported.
const SERVING_STATUSES: [ServingStatus; 4] = [
    ServingStatus::Unknown,
    ServingStatus::Serving,
    ServingStatus::NotServing,
    ServingStatus::ServiceUnknown,
];

pub async fn probe(
    ctx: &Env<'_>,
    target: &str,
    module: &Module,
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.grpc;
    // Registered before anything can fail, as blackbox_exporter does: a probe that
    // fails early still says it used no TLS and got no status.
    out.register(
        "probe_grpc_duration_seconds",
        &["resolve"],
        &[
            "probe_grpc_ssl",
            "probe_grpc_status_code",
            "probe_ssl_earliest_cert_expiry",
        ],
    );
    let (host, port) = host_port(target, cfg.tls).because(Reason::Config)?;
    let tls = if cfg.tls {
        Some(TlsClient::new(ctx, &cfg.tls_config, &[b"h2"]).because(Reason::Config)?)
    } else {
        None
    };
    let (ip, lookup) = resolve_target(
        ctx,
        host,
        cfg.preferred_ip_protocol,
        cfg.ip_protocol_fallback,
        out,
    )
    .await?;
    out.add_with(
        "probe_grpc_duration_seconds",
        &[("phase", "resolve")],
        lookup.as_secs_f64(),
    );
    let addr = SocketAddr::new(ip, port);
    ctx.allow(host, addr)?;

    let started = Instant::now();
    // The name the certificate must carry: `tls_config.server_name`, else the host.
    let server_name = cfg.tls_config.server_name.as_deref().unwrap_or(host);
    let answer = check(ctx, host, addr, cfg, tls.as_ref(), server_name, out).await;
    out.add_with(
        "probe_grpc_duration_seconds",
        &[("phase", "check")],
        started.elapsed().as_secs_f64(),
    );
    let (code, status) = match &answer {
        Ok(answer) => (Code::Ok, Some(answer.status.as_str())),
        Err(e) => (e.code, None),
    };
    for s in SERVING_STATUSES {
        out.gauge_with(
            "probe_grpc_healthcheck_response",
            &[("serving_status", s.as_str_name())],
            0.0,
        );
    }
    if let Some(status) = status {
        out.items
            .retain(|s| !(s.name == "probe_grpc_healthcheck_response" && s.labels[0].1 == status));
        out.gauge_with(
            "probe_grpc_healthcheck_response",
            &[("serving_status", status)],
            1.0,
        );
    }
    out.set("probe_grpc_status_code", f64::from(code as i32));
    crate::probe_log!(
        out.log,
        Debug,
        "Got the gRPC health check answer",
        grpc_status = format!("{code:?}"),
        serving_status = status.unwrap_or(""),
        err = answer
            .as_ref()
            .err()
            .map(|e| e.failure.message.as_str())
            .unwrap_or("")
    );
    match answer {
        Ok(answer) => {
            // As blackbox_exporter: the connection counts as TLS once the server answered
            // over it.
            out.set("probe_grpc_ssl", if answer.over_tls { 1.0 } else { 0.0 });
            if answer.status == "SERVING" {
                Ok(())
            } else {
                Err(Failure::new(
                    Reason::GrpcStatus,
                    format!("grpc: health of {:?} is {}", cfg.service, answer.status),
                ))
            }
        }
        Err(e) => Err(e.failure),
    }
}

/// What the health service answered.
struct Answer {
    /// The serving status's name (`SERVING`), or its number when it has none.
    status: String,
    over_tls: bool,
}

/// Why no answer came, with the gRPC status code blackbox_exporter reports for it
/// (`UNAVAILABLE` when the connection could not be made, as grpc-go has it).
struct NoAnswer {
    code: Code,
    failure: Failure,
}

impl NoAnswer {
    fn unavailable(failure: Failure) -> Self {
        Self {
            code: Code::Unavailable,
            failure,
        }
    }
}

/// The module's `metadata` as request headers, as grpc-go sends an outgoing context's
/// metadata: keys lowercased, values of `-bin` keys as bytes (base64 on the wire).
fn add_metadata(
    map: &mut tonic::metadata::MetadataMap,
    metadata: &std::collections::BTreeMap<String, Vec<String>>,
) -> Result<(), Failure> {
    use tonic::metadata::{AsciiMetadataKey, BinaryMetadataKey, BinaryMetadataValue};
    let bad = |key: &str| {
        Failure::new(
            Reason::Config,
            format!("grpc.metadata.{key}: not a valid metadata key or value"),
        )
    };
    for (key, values) in metadata {
        let lower = key.to_ascii_lowercase();
        for value in values {
            if lower.ends_with("-bin") {
                let name = BinaryMetadataKey::from_bytes(lower.as_bytes()).map_err(|_| bad(key))?;
                map.append_bin(name, BinaryMetadataValue::from_bytes(value.as_bytes()));
            } else {
                let name = AsciiMetadataKey::from_bytes(lower.as_bytes()).map_err(|_| bad(key))?;
                map.append(name, value.parse().map_err(|_| bad(key))?);
            }
        }
    }
    Ok(())
}

async fn check(
    ctx: &Env<'_>,
    host: &str,
    addr: SocketAddr,
    cfg: &sonde_proto::config::module::GrpcProbe,
    tls: Option<&TlsClient>,
    server_name: &str,
    out: &mut Samples,
) -> Result<Answer, NoAnswer> {
    out.stage = Stage::Connect;
    let stream = connect(addr, None, out)
        .await
        .map_err(NoAnswer::unavailable)?;
    out.stage = Stage::Exchange;
    let io: Io = match tls {
        Some(client) => {
            let stream = client
                .handshake(ctx, server_name, stream, out)
                .await
                .map_err(NoAnswer::unavailable)?;
            TlsFacts::read(ctx, stream.get_ref().1, client).record(out, false);
            Box::new(stream)
        }
        None => Box::new(stream),
    };
    // The :authority is the target's host and port, as grpc-go sends it.
    let authority = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(_)) => format!("[{host}]:{}", addr.port()),
        _ => format!("{host}:{}", addr.port()),
    };
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{authority}")).map_err(|e| {
            NoAnswer::unavailable(Failure::new(
                Reason::Config,
                format!("grpc: target {authority:?}: {e}"),
            ))
        })?;
    let channel = endpoint
        .connect_with_connector(OneConnection::new(
            io,
            "the probe's one connection is already in use (no reconnects within a probe)",
        ))
        .await
        .map_err(|e| {
            NoAnswer::unavailable(Failure::new(
                Reason::Protocol,
                format!("grpc: HTTP/2 connection: {}", error_chain(&e)),
            ))
        })?;
    let mut client = HealthClient::new(channel).max_decoding_message_size(MAX_ANSWER);
    crate::probe_log!(
        out.log,
        Debug,
        "Sending the gRPC health check",
        authority = authority,
        service = cfg.service
    );
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: cfg.service.clone(),
    });
    add_metadata(request.metadata_mut(), &cfg.metadata).map_err(NoAnswer::unavailable)?;
    match client.check(request).await {
        Ok(response) => {
            let raw = response.into_inner().status;
            let status = ServingStatus::try_from(raw)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| raw.to_string());
            Ok(Answer {
                status,
                over_tls: tls.is_some(),
            })
        }
        // A status tonic made from a broken connection, not one the server sent: grpc-go
        // reports those as UNAVAILABLE, and so does blackbox_exporter.
        Err(status) if status.source().is_some() => Err(NoAnswer::unavailable(Failure::new(
            Reason::Protocol,
            format!("grpc: Check({:?}): {}", cfg.service, error_chain(&status)),
        ))),
        Err(status) => Err(NoAnswer {
            code: status.code(),
            failure: Failure::new(
                Reason::GrpcStatus,
                format!(
                    "grpc: Check({:?}) failed: {:?}: {}",
                    cfg.service,
                    status.code(),
                    status.message()
                ),
            ),
        }),
    }
}

/// An error and its sources, `: `-separated (tonic's own message is only "transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Host and port of a grpc target, read as blackbox_exporter reads it: an optional
/// `http://` or `https://` (which does not choose TLS: `tls` does), `host[:port]`, and
/// without a port 443 with TLS, 80 without.
pub(crate) fn host_port(target: &str, tls: bool) -> Result<(&str, u16), HostPortError> {
    let rest = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .unwrap_or(target);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let default_port = if tls { 443 } else { 80 };
    let bad = |why: &'static str| HostPortError::new(target, why);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("missing ']'"))?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(bad("garbage after ']'")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(bad(
                    "too many colons (write an IPv6 address as [addr]:port)",
                ));
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None | Some("") => default_port,
        Some(p) => p.parse::<u16>().map_err(|_| bad("not a port number"))?,
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::run;
    use crate::probe::test_support::*;
    use sonde_proto::config::Prober;
    use std::time::Duration;

    fn grpc(options: serde_json::Value) -> Module {
        module_with(Prober::Grpc, options)
    }

    /// A health server on 127.0.0.1: the server SERVING, `up` SERVING, `down` NOT_SERVING.
    async fn health_server() -> SocketAddr {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("up", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("down", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _keep = reporter;
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        addr
    }

    /// A health server that refuses (PERMISSION_DENIED) a call without the metadata
    /// `x-tenant: blue` (sent as `X-Tenant`) and the binary `token-bin: \x01sonde`.
    async fn metadata_checking_server() -> SocketAddr {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let check = |req: tonic::Request<()>| {
            let md = req.metadata();
            let tenants: Vec<&str> = md
                .get_all("x-tenant")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let token = md.get_bin("token-bin").and_then(|v| v.to_bytes().ok());
            if tenants == ["blue", "green"] && token.as_deref() == Some(&b"\x01sonde"[..]) {
                Ok(req)
            } else {
                Err(tonic::Status::permission_denied(format!(
                    "tenants {tenants:?}, token {token:?}"
                )))
            }
        };
        tokio::spawn(async move {
            let _keep = reporter;
            tonic::transport::Server::builder()
                .layer(tonic::service::InterceptorLayer::new(check))
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        addr
    }

    #[tokio::test]
    async fn probe_grpc_sends_metadata() {
        let addr = metadata_checking_server().await;
        let target = addr.to_string();
        let without = run(
            &ctx(),
            &target,
            &grpc(serde_json::json!({})),
            Duration::from_secs(3),
        )
        .await;
        assert!(!without.success);
        assert_eq!(sample(&without, "probe_grpc_status_code"), Some(7.0));
        // A `-bin` key's value goes as its bytes (base64 on the wire, as grpc-go sends it).
        let with = grpc(serde_json::json!({"metadata": {
            "X-Tenant": ["blue", "green"],
            "token-bin": ["\u{1}sonde"],
        }}));
        let o = run(&ctx(), &target, &with, Duration::from_secs(3)).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_grpc_status_code"), Some(0.0));
        let partial = grpc(serde_json::json!({"metadata": {"X-Tenant": ["blue", "green"]}}));
        let o = run(&ctx(), &target, &partial, Duration::from_secs(3)).await;
        assert_eq!(sample(&o, "probe_grpc_status_code"), Some(7.0));
    }

    fn healthcheck(o: &crate::probe::ProbeOutcome) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = labelled(o, "probe_grpc_healthcheck_response")
            .into_iter()
            .map(|(l, v)| (l[0].1.clone(), v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[tokio::test]
    async fn probe_grpc_health_answers() {
        let addr = health_server().await;
        let c = ctx();
        let target = addr.to_string();
        let o = run(
            &c,
            &target,
            &grpc(serde_json::json!({})),
            Duration::from_secs(3),
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_grpc_status_code"), Some(0.0));
        assert_eq!(sample(&o, "probe_grpc_ssl"), Some(0.0));
        assert_eq!(sample(&o, "probe_ssl_earliest_cert_expiry"), Some(0.0));
        assert_eq!(
            healthcheck(&o),
            vec![
                ("NOT_SERVING".to_string(), 0.0),
                ("SERVICE_UNKNOWN".to_string(), 0.0),
                ("SERVING".to_string(), 1.0),
                ("UNKNOWN".to_string(), 0.0),
            ]
        );
        let phases = labelled(&o, "probe_grpc_duration_seconds");
        assert_eq!(phases.len(), 2, "{phases:?}");

        let o = run(
            &c,
            &format!("http://{target}"),
            &grpc(serde_json::json!({"service": "up"})),
            Duration::from_secs(3),
        )
        .await;
        assert!(o.success, "{:?}", o.failure);

        let o = run(
            &c,
            &target,
            &grpc(serde_json::json!({"service": "down"})),
            Duration::from_secs(3),
        )
        .await;
        assert!(!o.success);
        assert_eq!(o.failure_reason, Some(Reason::GrpcStatus));
        assert_eq!(sample(&o, "probe_grpc_status_code"), Some(0.0));
        assert!(healthcheck(&o).contains(&("NOT_SERVING".to_string(), 1.0)));

        // An unknown service is the NOT_FOUND status, with no serving status.
        let o = run(
            &c,
            &target,
            &grpc(serde_json::json!({"service": "nope"})),
            Duration::from_secs(3),
        )
        .await;
        assert!(!o.success);
        assert_eq!(sample(&o, "probe_grpc_status_code"), Some(5.0));
        assert!(healthcheck(&o).iter().all(|(_, v)| *v == 0.0));
    }

    #[tokio::test]
    async fn probe_grpc_unreachable_and_wrong_protocol_are_unavailable() {
        let c = ctx();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let o = run(
            &c,
            &closed.to_string(),
            &grpc(serde_json::json!({})),
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(o.failure_reason, Some(Reason::ConnectRefused));
        assert_eq!(sample(&o, "probe_grpc_status_code"), Some(14.0));
        // TLS towards a plaintext server fails the handshake: UNAVAILABLE too.
        let addr = health_server().await;
        let o = run(
            &c,
            &addr.to_string(),
            &grpc(serde_json::json!({"tls": true, "tls_config": {"insecure_skip_verify": true}})),
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(o.failure_reason, Some(Reason::Tls), "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_grpc_status_code"), Some(14.0));
        assert_eq!(sample(&o, "probe_grpc_ssl"), Some(0.0));
    }

    #[test]
    fn targets_read_as_blackbox_exporter_reads_them() {
        assert_eq!(
            host_port("a.example:50051", false),
            Ok(("a.example", 50051))
        );
        assert_eq!(host_port("a.example", false), Ok(("a.example", 80)));
        assert_eq!(host_port("a.example", true), Ok(("a.example", 443)));
        assert_eq!(
            host_port("https://a.example/x", false),
            Ok(("a.example", 80))
        );
        assert_eq!(host_port("http://[::1]:9000", false), Ok(("::1", 9000)));
        assert_eq!(host_port("[::1]", true), Ok(("::1", 443)));
        assert!(host_port("::1:80", false).is_err());
        assert!(host_port("a.example:http", false).is_err());
        assert!(host_port("http://", false).is_err());
        assert!(host_port("[::1", false).is_err());
    }

    #[tokio::test]
    async fn probe_grpc_debug_log_tells_the_health_check() {
        let addr = health_server().await;
        let (o, log) = run_with_log(
            &addr.to_string(),
            &grpc(serde_json::json!({"service": "down"})),
        )
        .await;
        assert_eq!(
            o.failure_reason,
            Some(crate::probe::Reason::GrpcStatus),
            "{log}"
        );
        assert_log_has(
            &log,
            &[
                "msg=\"Beginning probe\" probe=grpc",
                "msg=\"Successfully dialed\"",
                &format!("msg=\"Sending the gRPC health check\" authority={addr} service=down"),
                "msg=\"Got the gRPC health check answer\" grpc_status=Ok serving_status=NOT_SERVING",
                "level=error msg=\"Probe failed\" reason=grpc_status",
            ],
        );
        let (o, log) = run_with_log(
            &addr.to_string(),
            &grpc(serde_json::json!({"service": "up"})),
        )
        .await;
        assert!(o.success, "{log}");
        assert!(log.contains("serving_status=SERVING"), "{log}");
    }
}
