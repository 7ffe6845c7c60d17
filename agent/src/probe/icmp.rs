//! The icmp prober: one echo request and its echo reply, as blackbox_exporter's `icmp`
//! module, with its options and samples.
//!
//! The socket is an unprivileged ICMP datagram socket when the kernel allows the agent's
//! group one (`net.ipv4.ping_group_range`, for IPv4 and IPv6 alike), else a raw socket,
//! which needs `CAP_NET_RAW`. With a datagram socket the kernel picks the echo
//! identifier and hands the socket only the replies that carry it; with a raw socket
//! every ICMP packet arrives and the reply is picked by identifier, sequence, data and
//! source. The reply's TTL (hop limit) comes from `IP_RECVTTL` / `IPV6_RECVHOPLIMIT`.
//!
//! `dont_fragment` is `IP_MTU_DISCOVER = IP_PMTUDISC_DO`, which needs no privilege
//! (blackbox_exporter writes its own IP header on a raw socket for it).

use super::net::parse_source_ip;
use super::{Because, Env, Failure, Reason, Samples, Stage, resolve_target};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use sonde_proto::config::Module;
use sonde_proto::config::module::IcmpProbe;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Instant;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// blackbox_exporter's echo data, so that a capture or a firewall rule sees the same.
const PAYLOAD: &[u8] = b"Prometheus Blackbox Exporter";

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

pub async fn probe(
    ctx: &Env<'_>,
    target: &str,
    module: &Module,
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.icmp;
    out.register(
        "probe_icmp_duration_seconds",
        &["resolve", "setup", "rtt"],
        &[],
    );
    let (ip, lookup) = resolve_target(
        ctx,
        target,
        cfg.preferred_ip_protocol,
        cfg.ip_protocol_fallback,
        out,
    )
    .await?;
    out.add_with(
        "probe_icmp_duration_seconds",
        &[("phase", "resolve")],
        lookup.as_secs_f64(),
    );
    let source = parse_source_ip(cfg.source_ip_address.as_deref()).because(Reason::Config)?;
    // Checked here: Linux binds a raw IPv4 socket to the "address" it reads out of an
    // IPv6 one instead of refusing it.
    if let Some(src) = source
        && src.is_ipv4() != ip.is_ipv4()
    {
        return Err(Failure::new(
            Reason::Config,
            format!(
                "icmp.source_ip_address {src} and the target's address {ip} are of different IP versions"
            ),
        ));
    }
    let host = target
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(target);
    ctx.allow(host, SocketAddr::new(ip, 0))?;

    let setup = Instant::now();
    crate::probe_log!(out.log, Debug, "Creating socket", ip = ip);
    let socket = IcmpSocket::open(ip, source, cfg)?;
    let echo = Echo {
        id: identifier(),
        seq: next_sequence(),
        data: payload(cfg.payload_size),
    };
    let request = echo.encode(ip.is_ipv4());
    out.add_with(
        "probe_icmp_duration_seconds",
        &[("phase", "setup")],
        setup.elapsed().as_secs_f64(),
    );

    out.stage = Stage::Exchange;
    crate::probe_log!(
        out.log,
        Debug,
        "Creating ICMP packet",
        socket = match socket.framing {
            Framing::Datagram => "datagram (unprivileged)",
            Framing::RawV4 | Framing::RawV6 => "raw",
        },
        id = echo.id,
        seq = echo.seq,
        payload_bytes = echo.data.len()
    );
    let rtt = Instant::now();
    crate::probe_log!(out.log, Debug, "Writing out packet", ip = ip);
    socket.send(&request, ip).await?;
    crate::probe_log!(out.log, Debug, "Waiting for reply packets");
    let hop_limit = socket.reply(&echo, ip).await?;
    crate::probe_log!(
        out.log,
        Debug,
        "Found matching reply packet",
        from = ip,
        rtt_seconds = rtt.elapsed().as_secs_f64(),
        hop_limit = hop_limit.map(|h| h.to_string()).unwrap_or_default()
    );
    out.add_with(
        "probe_icmp_duration_seconds",
        &[("phase", "rtt")],
        rtt.elapsed().as_secs_f64(),
    );
    if let Some(hops) = hop_limit {
        out.gauge("probe_icmp_reply_hop_limit", f64::from(hops));
    }
    Ok(())
}

/// The echo data for `payload_size`: blackbox_exporter's bytes, cut or zero-padded.
fn payload(size: u32) -> Vec<u8> {
    if size == 0 {
        return PAYLOAD.to_vec();
    }
    let mut data = vec![0u8; size as usize];
    let n = PAYLOAD.len().min(data.len());
    data[..n].copy_from_slice(&PAYLOAD[..n]);
    data
}

/// The identifier of this process's echo requests on raw sockets: the pid, or a random
/// number when the pid is 1 (in a container every agent would share it), as
/// blackbox_exporter does.
fn identifier() -> u16 {
    static ID: OnceLock<u16> = OnceLock::new();
    *ID.get_or_init(|| match std::process::id() {
        1 => rand::random(),
        pid => (pid & 0xffff) as u16,
    })
}

/// Sequence numbers, process-wide, from a random start so that agents restarted
/// together do not send the same ones.
fn next_sequence() -> u16 {
    static SEQ: OnceLock<AtomicU16> = OnceLock::new();
    SEQ.get_or_init(|| AtomicU16::new(rand::random()))
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(1)
}

/// One echo request (or the reply it expects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Echo {
    pub(crate) id: u16,
    pub(crate) seq: u16,
    pub(crate) data: Vec<u8>,
}

impl Echo {
    /// The ICMP message. The IPv4 checksum is computed here; the kernel computes the
    /// ICMPv6 one (it covers a pseudo-header with addresses only the kernel knows).
    pub(crate) fn encode(&self, v4: bool) -> Vec<u8> {
        let mut m = Vec::with_capacity(8 + self.data.len());
        m.push(if v4 { ECHO_REQUEST_V4 } else { ECHO_REQUEST_V6 });
        m.push(0);
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&self.id.to_be_bytes());
        m.extend_from_slice(&self.seq.to_be_bytes());
        m.extend_from_slice(&self.data);
        if v4 {
            let sum = checksum(&m);
            m[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        m
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// How a received packet reaches the prober.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// A datagram socket: the ICMP message alone, its identifier the kernel's.
    Datagram,
    /// A raw IPv4 socket: the IP header, then the ICMP message.
    RawV4,
    /// A raw IPv6 socket: the ICMPv6 message alone.
    RawV6,
}

/// True when `packet` is the echo reply to `echo`: type, code, identifier (unless the
/// kernel chose it), sequence and data all as sent. Anything else (our own request on
/// loopback, another prober's reply, an error, garbage) is not.
pub(crate) fn is_reply(packet: &[u8], framing: Framing, v4: bool, echo: &Echo) -> bool {
    let message = match framing {
        Framing::RawV4 => {
            let Some(&first) = packet.first() else {
                return false;
            };
            let header = usize::from(first & 0x0f) * 4;
            if first >> 4 != 4 || header < 20 {
                return false;
            }
            match packet.get(header..) {
                Some(m) => m,
                None => return false,
            }
        }
        Framing::Datagram | Framing::RawV6 => packet,
    };
    if message.len() < 8 {
        return false;
    }
    let want_type = if v4 { ECHO_REPLY_V4 } else { ECHO_REPLY_V6 };
    let id = u16::from_be_bytes([message[4], message[5]]);
    let seq = u16::from_be_bytes([message[6], message[7]]);
    message[0] == want_type
        && message[1] == 0
        && (framing == Framing::Datagram || id == echo.id)
        && seq == echo.seq
        && message[8..] == echo.data[..]
}

/// An open ICMP socket of either kind.
struct IcmpSocket {
    fd: AsyncFd<Socket>,
    framing: Framing,
}

impl IcmpSocket {
    fn open(ip: IpAddr, source: Option<IpAddr>, cfg: &IcmpProbe) -> Result<Self, Failure> {
        let v4 = ip.is_ipv4();
        let (domain, protocol) = if v4 {
            (Domain::IPV4, Protocol::ICMPV4)
        } else {
            (Domain::IPV6, Protocol::ICMPV6)
        };
        let (socket, framing) = match Socket::new(domain, Type::DGRAM, Some(protocol)) {
            Ok(s) => (s, Framing::Datagram),
            Err(dgram) => match Socket::new(domain, Type::RAW, Some(protocol)) {
                Ok(s) => (s, if v4 { Framing::RawV4 } else { Framing::RawV6 }),
                Err(raw) => return Err(no_socket(&dgram, &raw)),
            },
        };
        tracing::debug!(
            socket = if framing == Framing::Datagram {
                "datagram"
            } else {
                "raw"
            },
            "icmp socket opened"
        );
        let setup = |what: &str, e: io::Error| {
            Failure::new(Reason::ConnectError, format!("icmp socket: {what}: {e}"))
        };
        socket
            .set_nonblocking(true)
            .map_err(|e| setup("non-blocking", e))?;
        if let Some(src) = source {
            socket.bind(&SocketAddr::new(src, 0).into()).map_err(|e| {
                Failure::new(
                    Reason::ConnectError,
                    format!("bind source_ip_address {src}: {}", super::io_reason(&e)),
                )
            })?;
        }
        // 0 leaves the system's default, as blackbox_exporter does.
        if cfg.ttl > 0 {
            if v4 {
                socket.set_ttl_v4(cfg.ttl).map_err(|e| setup("ttl", e))?;
            } else {
                socket
                    .set_unicast_hops_v6(cfg.ttl)
                    .map_err(|e| setup("ttl", e))?;
            }
        }
        let fd = socket.as_raw_fd();
        if v4 {
            set_int(fd, libc::IPPROTO_IP, libc::IP_RECVTTL, 1)
                .map_err(|e| setup("IP_RECVTTL", e))?;
            if cfg.dont_fragment {
                set_int(
                    fd,
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    libc::IP_PMTUDISC_DO,
                )
                .map_err(|e| setup("dont_fragment", e))?;
            }
        } else {
            set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1)
                .map_err(|e| setup("IPV6_RECVHOPLIMIT", e))?;
        }
        // SAFETY: the socket owns its descriptor, which stays open and the same until
        // the AsyncFd (its owner now) is dropped.
        let fd = unsafe { AsyncFd::register(socket) }
            .map_err(|e| setup("register", io::Error::other(e.to_string())))?;
        Ok(Self { fd, framing })
    }

    async fn send(&self, message: &[u8], ip: IpAddr) -> Result<(), Failure> {
        let to = SockAddr::from(SocketAddr::new(ip, 0));
        self.fd
            .async_io(Interest::WRITABLE, |s| s.send_to(message, &to))
            .await
            .map(drop)
            .map_err(|e| {
                let why = match e.raw_os_error() {
                    Some(libc::EMSGSIZE) => format!(
                        "the echo request ({} bytes) is larger than the path's MTU and dont_fragment is set",
                        message.len()
                    ),
                    _ => super::io_reason(&e),
                };
                Failure::new(Reason::ConnectError, format!("icmp: sending to {ip}: {why}"))
            })
    }

    /// Waits for the reply to `echo` from `ip` and returns its TTL / hop limit. Errors
    /// the kernel reports on the socket (an unreachable host) do not end the wait,
    /// as in blackbox_exporter: only the probe's deadline does.
    async fn reply(&self, echo: &Echo, ip: IpAddr) -> Result<Option<u8>, Failure> {
        // A reported error is consumed by the read that reports it; one that keeps
        // coming back is not a passing network problem, and ends the wait.
        const MAX_READ_ERRORS: u32 = 64;
        let mut errors = 0;
        let mut packet = vec![0u8; 8 + echo.data.len() + 60];
        loop {
            let received = self
                .fd
                .async_io(Interest::READABLE, |s| recv_with_hops(s, &mut packet))
                .await;
            let (len, from, hops) = match received {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "icmp: reading the socket");
                    errors += 1;
                    if errors >= MAX_READ_ERRORS {
                        return Err(Failure::new(
                            Reason::ConnectError,
                            format!("icmp: reading replies from {ip}: {}", super::io_reason(&e)),
                        ));
                    }
                    continue;
                }
            };
            let from_target = from.is_some_and(|f| same_ip(f, ip));
            if from_target && is_reply(&packet[..len], self.framing, ip.is_ipv4(), echo) {
                return Ok(hops);
            }
        }
    }
}

/// Neither socket could be opened: say which setting allows which.
fn no_socket(dgram: &io::Error, raw: &io::Error) -> Failure {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
        .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unreadable".to_string());
    // SAFETY: getgid has no preconditions and cannot fail.
    let gid = unsafe { libc::getgid() };
    let unprivileged = if dgram.raw_os_error() == Some(libc::EACCES) {
        format!(
            "an unprivileged one was refused ({dgram}) because group {gid} is outside \
             net.ipv4.ping_group_range (\"{range}\")"
        )
    } else {
        format!("an unprivileged one failed ({dgram})")
    };
    let privileged = if raw.raw_os_error() == Some(libc::EPERM) {
        format!("a raw one ({raw}) needs CAP_NET_RAW")
    } else {
        format!("a raw one failed ({raw})")
    };
    Failure::new(
        Reason::Config,
        format!(
            "icmp: no ICMP socket: {unprivileged}, and {privileged}; allow the group with \
             `sysctl -w net.ipv4.ping_group_range=\"{gid} {gid}\"` (per network namespace) or \
             give the agent CAP_NET_RAW"
        ),
    )
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    canonical(a) == canonical(b)
}

fn set_int(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` outlives the call and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One packet, its source address and the TTL / hop limit it arrived with.
fn recv_with_hops(s: &Socket, buf: &mut [u8]) -> io::Result<(usize, Option<IpAddr>, Option<u8>)> {
    let mut control = [MaybeUninit::<u8>::uninit(); 128];
    // SAFETY: MaybeUninit<u8> and u8 have the same layout, and recvmsg only writes
    // into the buffer.
    let data = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
    let mut bufs = [socket2::MaybeUninitSlice::new(data)];
    // SAFETY: a zeroed sockaddr_storage with its full size is a valid empty address
    // for recvmsg to fill.
    let mut from = unsafe {
        SockAddr::new(
            socket2::SockAddrStorage::zeroed(),
            std::mem::size_of::<libc::sockaddr_storage>() as socket2::socklen_t,
        )
    };
    let mut msg = socket2::MsgHdrMut::new()
        .with_addr(&mut from)
        .with_buffers(&mut bufs)
        .with_control(&mut control);
    let len = s.recvmsg(&mut msg, 0)?;
    let control_len = msg.control_len().min(control.len());
    // SAFETY: the kernel initialised the first `control_len` bytes.
    let control: &[u8] =
        unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), control_len) };
    Ok((
        len.min(buf.len()),
        from.as_socket().map(|a| a.ip()),
        hop_limit(control),
    ))
}

/// The TTL (`IP_TTL`) or hop limit (`IPV6_HOPLIMIT`) among the control messages of one
/// packet, laid out as Linux lays out `cmsghdr`s.
pub(crate) fn hop_limit(mut control: &[u8]) -> Option<u8> {
    let align = std::mem::size_of::<usize>();
    let header = std::mem::size_of::<libc::cmsghdr>();
    while control.len() >= header {
        let len = usize::from_ne_bytes(control[..align].try_into().ok()?);
        let level = i32::from_ne_bytes(control[align..align + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[align + 4..align + 8].try_into().ok()?);
        if len < header || len > control.len() {
            return None;
        }
        let data = &control[header..len];
        let wanted = (level == libc::IPPROTO_IP && kind == libc::IP_TTL)
            || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_HOPLIMIT);
        if wanted && data.len() >= 4 {
            let v = i32::from_ne_bytes(data[..4].try_into().ok()?);
            return u8::try_from(v).ok();
        }
        let next = len.div_ceil(align) * align;
        control = control.get(next..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::test_support::*;
    use crate::probe::{Reason, run};
    use sonde_proto::config::Prober;
    use std::time::Duration;

    fn icmp(options: serde_json::Value) -> Module {
        module_with(Prober::Icmp, options)
    }

    #[test]
    fn echo_requests_are_blackbox_exporters() {
        let echo = Echo {
            id: 0x1234,
            seq: 7,
            data: payload(0),
        };
        let m = echo.encode(true);
        assert_eq!(&m[..2], &[8, 0]);
        assert_eq!(&m[4..8], &[0x12, 0x34, 0, 7]);
        assert_eq!(&m[8..], b"Prometheus Blackbox Exporter");
        // A correct checksum sums, with itself, to zero.
        assert_eq!(checksum(&m), 0);
        assert_eq!(echo.encode(false)[0], 128);
        assert_eq!(payload(4), b"Prom");
        let big = payload(40);
        assert_eq!(&big[..28], PAYLOAD);
        assert!(big[28..].iter().all(|b| *b == 0));
    }

    #[test]
    fn replies_are_matched_to_their_request() {
        let echo = Echo {
            id: 9,
            seq: 300,
            data: b"abc".to_vec(),
        };
        let mut reply = echo.encode(true);
        reply[0] = 0;
        assert!(is_reply(&reply, Framing::Datagram, true, &echo));
        let mut with_ip = vec![0x45; 1];
        with_ip.extend([0u8; 19]);
        with_ip.extend(&reply);
        assert!(is_reply(&with_ip, Framing::RawV4, true, &echo));
        // Our own request seen on a raw socket, another sequence, other data: no.
        let request = echo.encode(true);
        assert!(!is_reply(&request, Framing::Datagram, true, &echo));
        let mut other = reply.clone();
        other[7] ^= 1;
        assert!(!is_reply(&other, Framing::Datagram, true, &echo));
        let mut other = reply.clone();
        other.push(0);
        assert!(!is_reply(&other, Framing::Datagram, true, &echo));
        // The kernel's identifier counts on datagram sockets only.
        let mut other_id = reply.clone();
        other_id[5] ^= 1;
        assert!(is_reply(&other_id, Framing::Datagram, true, &echo));
        let mut raw = vec![0x45; 1];
        raw.extend([0u8; 19]);
        raw.extend(&other_id);
        assert!(!is_reply(&raw, Framing::RawV4, true, &echo));
        for bad in [&[][..], &[0x4f], &[0x45, 0, 0], &[0x60; 30]] {
            assert!(!is_reply(bad, Framing::RawV4, true, &echo));
        }
        let mut v6 = echo.encode(false);
        v6[0] = 129;
        assert!(is_reply(&v6, Framing::RawV6, false, &echo));
        assert!(!is_reply(&v6, Framing::RawV6, true, &echo));
    }

    #[test]
    fn control_messages_give_the_hop_limit() {
        let header = std::mem::size_of::<libc::cmsghdr>();
        let mut c = Vec::new();
        c.extend((header + 4).to_ne_bytes());
        c.extend(libc::IPPROTO_IP.to_ne_bytes());
        c.extend(libc::IP_TTL.to_ne_bytes());
        c.extend(57i32.to_ne_bytes());
        c.extend([0u8; 4]);
        assert_eq!(hop_limit(&c), Some(57));
        assert_eq!(hop_limit(&c[..header]), None);
        assert_eq!(hop_limit(&[]), None);
        let mut huge = c.clone();
        huge[..8].copy_from_slice(&usize::MAX.to_ne_bytes()[..8]);
        assert_eq!(hop_limit(&huge), None);
    }

    #[tokio::test]
    async fn probe_icmp_loopback_v4_and_v6() {
        let c = ctx();
        for (target, protocol, preferred) in [("127.0.0.1", 4.0, "ip4"), ("::1", 6.0, "ip6")] {
            let m = icmp(serde_json::json!({"preferred_ip_protocol": preferred}));
            let o = run(&c, target, &m, Duration::from_secs(2)).await;
            if o.failure_reason == Some(Reason::Config) {
                // Neither socket kind is open to this test process: the message says so.
                let msg = o.failure.unwrap();
                assert!(msg.contains("net.ipv4.ping_group_range"), "{msg}");
                return;
            }
            assert!(o.success, "{target}: {:?}", o.failure);
            assert_eq!(sample(&o, "probe_ip_protocol"), Some(protocol));
            assert_eq!(sample(&o, "probe_icmp_reply_hop_limit"), Some(64.0));
            let phases = labelled(&o, "probe_icmp_duration_seconds");
            assert_eq!(phases.len(), 3, "{phases:?}");
            assert!(phases.iter().any(|(l, v)| l[0].1 == "rtt" && *v > 0.0));
        }
    }

    #[tokio::test]
    async fn probe_icmp_bad_options_fail_without_sending() {
        let c = ctx();
        let mut m = icmp(serde_json::json!({}));
        m.icmp.source_ip_address = Some("nope".into());
        let o = run(&c, "127.0.0.1", &m, Duration::from_secs(1)).await;
        assert_eq!(o.failure_reason, Some(Reason::Config));
        let mut m = icmp(serde_json::json!({}));
        m.icmp.ttl = 256;
        assert!(m.validate().unwrap_err().to_string().contains("icmp.ttl"));
        m.icmp.ttl = 64;
        m.icmp.payload_size = 70_000;
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("icmp.payload_size")
        );
        let _ = module(Prober::Icmp);
    }

    #[tokio::test]
    async fn probe_icmp_debug_log_tells_the_echo_and_its_reply() {
        let m = icmp(serde_json::json!({"preferred_ip_protocol": "ip4"}));
        let (o, log) = run_with_log("localhost", &m).await;
        if o.failure_reason == Some(Reason::Config) {
            // Neither socket kind is open to this test process (see the loopback test).
            assert!(
                log.contains("level=error msg=\"Probe failed\" reason=config"),
                "{log}"
            );
            return;
        }
        assert!(o.success, "{:?}\n{log}", o.failure);
        assert_log_has(
            &log,
            &[
                "msg=\"Beginning probe\" probe=icmp",
                "msg=\"Resolving target address\" target=localhost ip_protocol=ip4",
                "msg=\"Resolved target address\" target=localhost ip=127.0.0.1",
                "msg=\"Creating socket\" ip=127.0.0.1",
                "msg=\"Creating ICMP packet\" socket=",
                "msg=\"Writing out packet\" ip=127.0.0.1",
                "msg=\"Waiting for reply packets\"",
                "msg=\"Found matching reply packet\" from=127.0.0.1 rtt_seconds=",
                "hop_limit=64",
                "level=info msg=\"Probe succeeded\"",
            ],
        );
    }
}
