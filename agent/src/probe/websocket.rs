//! The websocket prober: the HTTP upgrade handshake to a `ws://` or `wss://` target
//! (with the module's headers and credentials, over TLS for `wss://`), then the
//! `query_response` steps over messages, as blackbox_exporter's `websocket` module:
//! an `expect` reads the next message and matches it, a `send` sends a text message.

use super::net::{Io, connect};
use super::tls::TlsClient;
use super::tls_samples::TlsFacts;
use super::{Because, Env, Failure, Reason, Samples, Stage, resolve_target};
use futures::{SinkExt, StreamExt};
use sonde_proto::config::Module;
use sonde_proto::config::module::{HttpProbe, QueryResponse, WebsocketProbe};
use std::net::SocketAddr;
use std::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The largest message (and frame) the prober takes from a target; a hostile target
/// cannot make the agent buffer more.
const MAX_MESSAGE: usize = 1 << 20;

/// The host and port of a `ws://` or `wss://` URL (80 and 443 by default).
pub fn host_port(target: &str) -> Result<(&str, u16), String> {
    let (tls, rest) = if let Some(rest) = target.strip_prefix("wss://") {
        (true, rest)
    } else if let Some(rest) = target.strip_prefix("ws://") {
        (false, rest)
    } else {
        return Err(format!(
            "{target:?} is not a websocket URL: write ws://host[:port]/path or wss://..."
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let default = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{target:?}: missing ']' after an IPv6 address"))?;
        match after.strip_prefix(':') {
            Some(p) => (
                host,
                p.parse().map_err(|_| format!("{target:?}: bad port"))?,
            ),
            None => (host, default),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("{target:?}: bad port"))?),
            None => (authority, default),
        }
    };
    if host.is_empty() {
        return Err(format!("{target:?}: no host"));
    }
    Ok((host, port))
}

pub async fn probe(
    ctx: &Env<'_>,
    target: &str,
    module: &Module,
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.websocket;
    out.set("probe_websocket_connection_upgraded", 0.0);
    out.set("probe_websocket_failed_due_to_regex", 0.0);
    let (host, port) = host_port(target).because(Reason::Config)?;
    let tls = if target.starts_with("wss://") {
        Some(TlsClient::new(ctx, &cfg.http_config.tls_config, &[]).because(Reason::Config)?)
    } else {
        None
    };
    let request = upgrade_request(target, cfg)?;
    let started = Instant::now();
    let (ip, _) = resolve_target(
        ctx,
        host,
        cfg.preferred_ip_protocol,
        cfg.ip_protocol_fallback,
        out,
    )
    .await?;
    out.add_with(
        "probe_websocket_duration_seconds",
        &[("phase", "resolve")],
        started.elapsed().as_secs_f64(),
    );
    let addr = SocketAddr::new(ip, port);
    ctx.allow(host, addr)?;
    out.stage = Stage::Connect;
    let dial = Instant::now();
    let stream = connect(addr, None, out).await?;
    let connected = dial.elapsed().as_secs_f64();
    out.add_with(
        "probe_websocket_duration_seconds",
        &[("phase", "connect")],
        connected,
    );
    out.stage = Stage::Exchange;
    let io: Io = match &tls {
        Some(client) => {
            let server_name = cfg
                .http_config
                .tls_config
                .server_name
                .as_deref()
                .unwrap_or(host);
            let stream = client.handshake(ctx, server_name, stream, out).await?;
            TlsFacts::read(ctx, stream.get_ref().1, client).record(out, false);
            Box::new(stream)
        }
        None => Box::new(stream),
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let handshake = tokio_tungstenite::client_async_with_config(request, io, Some(config)).await;
    // The handshake's time after the TCP connection (TLS and the upgrade), as
    // blackbox_exporter's "processing".
    out.add_with(
        "probe_websocket_duration_seconds",
        &[("phase", "processing")],
        (dial.elapsed().as_secs_f64() - connected).max(0.0),
    );
    let mut socket = match handshake {
        Ok((socket, response)) => {
            out.set(
                "probe_websocket_status_code",
                f64::from(response.status().as_u16()),
            );
            socket
        }
        Err(WsError::Http(response)) => {
            let status = response.status();
            out.set("probe_websocket_status_code", f64::from(status.as_u16()));
            return Err(Failure::new(
                Reason::HttpStatus,
                format!("websocket: the server answered the upgrade with {status}"),
            ));
        }
        Err(e) => return Err(ws_failure("handshake", &e)),
    };
    out.set("probe_websocket_connection_upgraded", 1.0);
    if cfg.query_response.is_empty() {
        let _ = socket.close(None).await;
        return Ok(());
    }
    let transfer = Instant::now();
    let result = run_steps(ctx, &mut socket, &cfg.query_response, out).await;
    out.add_with(
        "probe_websocket_duration_seconds",
        &[("phase", "transfer")],
        transfer.elapsed().as_secs_f64(),
    );
    if result.is_ok() {
        let _ = socket.close(None).await;
    }
    result
}

/// The upgrade request: the target URL, the module's headers (files read now) and
/// its credentials.
fn upgrade_request(target: &str, cfg: &WebsocketProbe) -> Result<http::Request<()>, Failure> {
    let mut request = target
        .into_client_request()
        .map_err(|e| Failure::new(Reason::Config, format!("websocket: target {target:?}: {e}")))?;
    let headers = request.headers_mut();
    let header_error = |name: &str, why: String| {
        Failure::new(Reason::Config, format!("websocket.headers.{name}: {why}"))
    };
    for (name, values) in &cfg.headers {
        let header: http::HeaderName = name
            .parse()
            .map_err(|_| header_error(name, "not a header name".into()))?;
        let mut all: Vec<String> = values.inline().iter().map(|v| v.to_string()).collect();
        for file in values.files() {
            let text = std::fs::read_to_string(file)
                .map_err(|e| header_error(name, format!("{file}: {e}")))?;
            all.push(text.trim().to_string());
        }
        for value in all {
            let value = http::HeaderValue::from_str(&value)
                .map_err(|_| header_error(name, "a value is not a valid header value".into()))?;
            headers.append(header.clone(), value);
        }
    }
    let auth = HttpProbe {
        basic_auth: cfg.http_config.basic_auth.clone(),
        authorization: cfg.http_config.authorization.clone(),
        ..HttpProbe::default()
    };
    if let Some(value) = super::http::auth::authorization(&auth).map_err(|e| {
        Failure::new(
            Reason::Config,
            format!("websocket.{}", e.to_string().trim_start_matches("http.")),
        )
    })? {
        headers.append(http::header::AUTHORIZATION, value);
    }
    Ok(request)
}

type Socket = tokio_tungstenite::WebSocketStream<Io>;

/// blackbox_exporter's steps: `expect` reads one message (of any kind) and must match
/// it; its groups fill `${1}` / `${name}` in `send`, sent as a text message.
async fn run_steps(
    ctx: &Env<'_>,
    socket: &mut Socket,
    steps: &[QueryResponse],
    out: &mut Samples,
) -> Result<(), Failure> {
    for (i, step) in steps.iter().enumerate() {
        let mut send = step
            .send
            .as_ref()
            .map(|s| s.as_bytes().to_vec())
            .unwrap_or_default();
        if let Some(pattern) = &step.expect {
            let re = ctx.regex(pattern).because(Reason::Config)?;
            let message = next_data(socket, i).await?;
            let Some(caps) = re.captures(&message) else {
                out.set("probe_websocket_failed_due_to_regex", 1.0);
                let shown = String::from_utf8_lossy(&message[..message.len().min(48)]).into_owned();
                return Err(Failure::new(
                    Reason::Regex,
                    format!(
                        "query_response[{i}]: the message {shown:?} does not match {pattern:?}"
                    ),
                ));
            };
            let mut expanded = Vec::new();
            caps.expand(&send, &mut expanded);
            send = expanded;
        }
        if !send.is_empty() {
            let text = String::from_utf8_lossy(&send).into_owned();
            socket
                .send(Message::text(text))
                .await
                .map_err(|e| ws_failure(&format!("query_response[{i}]: send"), &e))?;
        }
    }
    Ok(())
}

/// The next data message's bytes; pings are answered by the library, and a close or
/// the end of the stream fails the step.
async fn next_data(socket: &mut Socket, step: usize) -> Result<Vec<u8>, Failure> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.as_bytes().to_vec()),
            Some(Ok(Message::Binary(bytes))) => return Ok(bytes.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(Message::Close(_))) | None => {
                return Err(Failure::new(
                    Reason::Regex,
                    format!(
                        "query_response[{step}]: the server closed the websocket before a message came"
                    ),
                ));
            }
            Some(Err(e)) => return Err(ws_failure(&format!("query_response[{step}]: read"), &e)),
        }
    }
}

/// A broken handshake, a reset or a frame that breaks the protocol (or the size limit).
fn ws_failure(what: &str, e: &WsError) -> Failure {
    Failure::new(Reason::Protocol, format!("websocket: {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use crate::probe::test_support::*;
    use crate::probe::{Reason, run};
    use futures::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    /// A websocket server (tokio-tungstenite's): refuses an upgrade without the
    /// expected Authorization and X-Some-Header, greets, then welcomes a client that
    /// introduces itself with the name from the greeting.
    async fn hello_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    #[allow(clippy::result_large_err)] // tungstenite's callback type
                    let check = |req: &Request, resp: Response| {
                        let h = req.headers();
                        let auth_ok = h.get("authorization").and_then(|v| v.to_str().ok())
                            == Some("Basic dXNlcjpwYXNzd29yZA==");
                        let custom_ok = h.get("x-some-header").and_then(|v| v.to_str().ok())
                            == Some("my_header");
                        if auth_ok && custom_ok {
                            Ok(resp)
                        } else {
                            let mut refuse = http::Response::new(None);
                            *refuse.status_mut() = http::StatusCode::UNAUTHORIZED;
                            Err(refuse)
                        }
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await
                    else {
                        return;
                    };
                    ws.send(Message::text("Hello, probe-7\"")).await.unwrap();
                    if let Some(Ok(Message::Text(t))) = ws.next().await {
                        let reply = if t.as_str() == "Hello server, i'am probe-7" {
                            "Welcome"
                        } else {
                            "Who?"
                        };
                        let _ = ws.send(Message::text(reply)).await;
                    }
                    let _ = ws.close(None).await;
                });
            }
        });
        addr
    }

    fn example_module(auth: bool) -> sonde_proto::config::Module {
        // blackbox_exporter's example.yml module `websocket_example_basic_auth`.
        let auth = if auth {
            "\n    basic_auth: {username: user, password: password}"
        } else {
            ""
        };
        let yaml = format!(
            "prober: websocket\nwebsocket:\n  http_config:{auth}\n    tls_config: {{insecure_skip_verify: true}}\n  headers:\n    X-Some-Header: \"my_header\"\n  query_response:\n    - expect: ^Hello,\\s(.+)\"\n      send: \"Hello server, i'am ${{1}}\"\n    - expect: ^Welcome\n"
        );
        sonde_proto::config::from_yaml_str(std::path::Path::new("m.yml"), &yaml).unwrap()
    }

    #[tokio::test]
    async fn websocket_handshake_and_steps_against_a_real_server() {
        let addr = hello_server().await;
        let target = format!("ws://{addr}/chat");
        let o = run(
            &ctx(),
            &target,
            &example_module(true),
            Duration::from_secs(3),
        )
        .await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_websocket_status_code"), Some(101.0));
        assert_eq!(sample(&o, "probe_websocket_connection_upgraded"), Some(1.0));
        assert_eq!(sample(&o, "probe_websocket_failed_due_to_regex"), Some(0.0));
        for phase in ["resolve", "connect", "processing", "transfer"] {
            assert!(phase_of(&o, "probe_websocket_duration_seconds", phase) >= 0.0);
        }
        // An aggregator refuses any other name from an agent.
        for s in &o.samples {
            assert!(sonde_proto::help::is_probe_metric(s.name), "{}", s.name);
        }
    }

    #[tokio::test]
    async fn websocket_refused_upgrade_and_unmatched_message_fail() {
        let addr = hello_server().await;
        let target = format!("ws://{addr}/chat");
        let o = run(
            &ctx(),
            &target,
            &example_module(false),
            Duration::from_secs(3),
        )
        .await;
        assert!(!o.success);
        assert_eq!(sample(&o, "probe_websocket_status_code"), Some(401.0));
        assert_eq!(sample(&o, "probe_websocket_connection_upgraded"), Some(0.0));

        let mut m = example_module(true);
        m.websocket.query_response[1].expect = Some("^Goodbye".into());
        let o = run(&ctx(), &target, &m, Duration::from_secs(3)).await;
        assert!(!o.success);
        assert_eq!(o.failure_reason, Some(Reason::Regex));
        assert_eq!(sample(&o, "probe_websocket_connection_upgraded"), Some(1.0));
        assert_eq!(sample(&o, "probe_websocket_failed_due_to_regex"), Some(1.0));
    }

    #[test]
    fn websocket_targets_name_host_and_port() {
        assert_eq!(super::host_port("ws://a.example/x"), Ok(("a.example", 80)));
        assert_eq!(super::host_port("wss://[::1]:8443/"), Ok(("::1", 8443)));
        assert!(super::host_port("http://a.example/").is_err());
    }
}
