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
