//! The TCP connect every prober shares (the tcp prober, each http hop, the dns prober
//! over TCP and TLS), with the failure reasons a connect error stands for.

use super::{Failure, Reason, Samples, io_reason};
use sonde_proto::trace::Step;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

/// A connection the dialogue runs over, plain or TLS, before or after STARTTLS.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub(crate) type Io = Box<dyn Stream>;

/// An address in a target or module that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AddressError {
    #[error("target {target:?}: {port:?} is not a port number")]
    Port { target: String, port: String },
    #[error("source_ip_address {0:?} is not an IP address")]
    SourceIp(String),
}

pub(crate) fn parse_port(port: &str, target: &str) -> Result<u16, AddressError> {
    port.parse::<u16>().map_err(|_| AddressError::Port {
        target: target.to_string(),
        port: port.to_string(),
    })
}

pub(crate) fn parse_source_ip(source: Option<&str>) -> Result<Option<IpAddr>, AddressError> {
    source
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| AddressError::SourceIp(s.to_string()))
        })
        .transpose()
}

/// The failure reason of a connect error.
pub(crate) fn connect_failure(e: &std::io::Error) -> Failure {
    let reason = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Reason::ConnectRefused,
        std::io::ErrorKind::TimedOut => Reason::ConnectTimeout,
        _ => Reason::ConnectError,
    };
    Failure::new(reason, format!("connect: {}", io_reason(e)))
}

/// Opens a TCP connection, from `source` when given, and notes the attempt in the
/// probe's trace. Nagle is off, as in Go's dialer.
pub(crate) async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    out: &mut Samples,
) -> Result<TcpStream, Failure> {
    let pending = PendingConnect::note(out, addr, "no answer before the deadline");
    crate::probe_log!(out.log, Debug, "Dialing TCP", address = addr);
    let started = Instant::now();
    let result = open(addr, source).await;
    pending.settle(
        out,
        result.is_ok(),
        result.as_ref().err().map(|f| {
            f.message
                .strip_prefix("connect: ")
                .unwrap_or(&f.message)
                .to_string()
        }),
        started.elapsed().as_secs_f64(),
    );
    result
}

/// A connection attempt in the probe's trace: noted before it starts, so that a deadline
/// that cuts it short leaves it there as unanswered, and replaced by its outcome (which the
/// probe's log gets too) when there is one.
pub(crate) struct PendingConnect {
    slot: usize,
    address: SocketAddr,
}

impl PendingConnect {
    pub(crate) fn note(out: &mut Samples, address: SocketAddr, unanswered: &str) -> Self {
        let slot = out.trace.steps.len();
        out.trace.push(Step::Connect {
            address,
            ok: false,
            error: Some(unanswered.to_string()),
            seconds: 0.0,
        });
        PendingConnect { slot, address }
    }

    pub(crate) fn settle(self, out: &mut Samples, ok: bool, error: Option<String>, seconds: f64) {
        let outcome = Step::Connect {
            address: self.address,
            ok,
            error,
            seconds,
        };
        out.log.step(&outcome);
        out.trace.replace(self.slot, outcome);
    }
}

async fn open(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, Failure> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| connect_failure(&e))?;
    if let Some(src) = source {
        socket.bind(SocketAddr::new(src, 0)).map_err(|e| {
            Failure::new(
                Reason::ConnectError,
                format!("bind {src}: {}", io_reason(&e)),
            )
        })?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| connect_failure(&e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
