//! The network path to an address that failed a probe: a UDP traceroute that needs no
//! privilege. Datagrams leave one unprivileged UDP socket with TTL 1, 2, 3, ... towards
//! unused ports of the destination; with `IP_RECVERR` (`IPV6_RECVERR`) the kernel hands
//! the ICMP errors they cause back on the socket's error queue (`MSG_ERRQUEUE`), each
//! with the router that sent it (`SO_EE_OFFENDER`) and the port of the datagram that
//! caused it, which says its TTL. A "time exceeded" is a hop on the way; an unreachable
//! is where the path ends (the destination's own "port unreachable": it was reached).
//!
//! Every datagram is sent at once and the answers collected for a bounded time, so a
//! traceroute costs at most [`WAIT`] however many hops stay silent. [`Tracer`] bounds
//! how often: a fleet-wide outage must not make an agent traceroute all its targets.

use sonde_proto::trace::{Hop, MAX_HOPS, Path};
use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// TTLs tried: 1 to this.
pub const MAX_TTL: u8 = 30;
/// How long answers are collected after the datagrams are sent.
pub const WAIT: Duration = Duration::from_secs(2);
/// A destination is traced at most once in this period; its failures meanwhile carry
/// the last path found.
pub const PER_DESTINATION_EVERY: Duration = Duration::from_secs(300);
/// How long a path found is sent with later failures to the same address.
pub const KEEP_PATH: Duration = Duration::from_secs(900);
/// Traceroutes the agent may start at once after a quiet period, and how many more it
/// earns per minute (a token bucket).
pub const AGENT_BURST: f64 = 6.0;
pub const AGENT_PER_MINUTE: f64 = 6.0;
/// Destinations remembered for the per-destination limit.
const MAX_REMEMBERED: usize = 4096;
/// traceroute(8)'s first port: destination port = BASE_PORT + TTL.
const BASE_PORT: u16 = 33434;
const PAYLOAD: &[u8] = b"sonde traceroute";

/// Decides when the agent traceroutes, and keeps the paths it found.
pub struct Tracer {
    state: Mutex<TracerState>,
}

struct TracerState {
    /// Last traceroute of each destination: when it started, and what it found.
    last: HashMap<IpAddr, (Instant, Option<Path>)>,
    tokens: f64,
    refilled: Instant,
}

impl Default for Tracer {
    fn default() -> Self {
        Self {
            state: Mutex::new(TracerState {
                last: HashMap::new(),
                tokens: AGENT_BURST,
                refilled: Instant::now(),
            }),
        }
    }
}

impl Tracer {
    /// The path to `dest` for a probe that failed there: a new traceroute when the
    /// limits allow one, else the last path found (while [`KEEP_PATH`] holds). `None`
    /// for an address of the agent's own host, where there is no path to show.
    pub async fn path_to(&self, dest: IpAddr) -> Option<Path> {
        if is_own_address(dest) {
            return None;
        }
        let now = Instant::now();
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, path)) = state.last.get(&dest)
                && now.duration_since(*at) < PER_DESTINATION_EVERY
            {
                return path.clone();
            }
            if !state.take_token(now) {
                return state
                    .last
                    .get(&dest)
                    .filter(|(at, _)| now.duration_since(*at) < KEEP_PATH)
                    .and_then(|(_, p)| p.clone());
            }
            if state.last.len() >= MAX_REMEMBERED {
                state
                    .last
                    .retain(|_, (at, _)| now.duration_since(*at) < KEEP_PATH);
                if state.last.len() >= MAX_REMEMBERED {
                    state.last.clear();
                }
            }
            // Claimed before it runs, so that concurrent failures to the same address
            // do not start a second one.
            state.last.insert(dest, (now, None));
        }
        let path = tokio::task::spawn_blocking(move || traceroute(dest, MAX_TTL, WAIT))
            .await
            .ok()
            .and_then(Result::ok);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.last.insert(dest, (now, path.clone()));
        path
    }
}

impl TracerState {
    fn take_token(&mut self, now: Instant) -> bool {
        let earned = now.duration_since(self.refilled).as_secs_f64() / 60.0 * AGENT_PER_MINUTE;
        self.tokens = (self.tokens + earned).min(AGENT_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Traces the path to `dest`: TTL 1 to `max_ttl`, answers collected for `wait`. The
/// hops listed end at the first one where the path ends (an unreachable, or `dest`).
pub fn traceroute(dest: IpAddr, max_ttl: u8, wait: Duration) -> io::Result<Path> {
    let max_ttl = max_ttl.clamp(1, MAX_HOPS as u8);
    let socket = UdpSocket::bind(match dest {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    })?;
    socket.set_nonblocking(true)?;
    let fd = socket.as_raw_fd();
    match dest {
        IpAddr::V4(_) => set_int(fd, libc::SOL_IP, libc::IP_RECVERR, 1)?,
        IpAddr::V6(_) => set_int(fd, libc::SOL_IPV6, libc::IPV6_RECVERR, 1)?,
    }
    let timestamp_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut sent: Vec<Option<Instant>> = vec![None; usize::from(max_ttl) + 1];
    let mut answers: Vec<Option<(IpAddr, Duration, Answer)>> = vec![None; usize::from(max_ttl) + 1];
    for ttl in 1..=max_ttl {
        match dest {
            IpAddr::V4(_) => set_int(fd, libc::SOL_IP, libc::IP_TTL, i32::from(ttl))?,
            IpAddr::V6(_) => set_int(fd, libc::SOL_IPV6, libc::IPV6_UNICAST_HOPS, i32::from(ttl))?,
        }
        let at = Instant::now();
        match socket.send_to(PAYLOAD, SocketAddr::new(dest, BASE_PORT + u16::from(ttl))) {
            Ok(_) => sent[usize::from(ttl)] = Some(at),
            // The agent's own host has no route: there is no path to trace.
            Err(e) if ttl == 1 => return Err(e),
            // An earlier datagram's error surfacing on this send; it is on the queue.
            Err(_) => sent[usize::from(ttl)] = Some(at),
        }
    }
    let deadline = Instant::now() + wait;
    loop {
        drain_errors(fd, dest, &sent, &mut answers);
        if let Some(end) = end_ttl(&answers)
            && answers[1..=end].iter().all(Option::is_some)
        {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLERR,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the socket this function owns.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready > 0 && pfd.revents & libc::POLLIN != 0 {
            // The destination answered a datagram itself: it is reachable.
            let mut buf = [0u8; 64];
            if let Ok((_, from)) = socket.recv_from(&mut buf)
                && from.ip() == dest
            {
                let ttl = usize::from(from.port().saturating_sub(BASE_PORT))
                    .clamp(1, usize::from(max_ttl));
                let rtt = sent[ttl].map_or(Duration::ZERO, |s| s.elapsed());
                answers[ttl].get_or_insert((dest, rtt, Answer::Reached));
            }
        }
    }
    let end = end_ttl(&answers).unwrap_or_else(|| {
        // Nothing ended the path: list up to the farthest hop that answered.
        answers.iter().rposition(Option::is_some).unwrap_or(0)
    });
    let hops = (1..=end)
        .map(|ttl| match answers[ttl] {
            Some((address, rtt, answer)) => Hop {
                ttl: ttl as u8,
                address: Some(address),
                rtt_seconds: rtt.as_secs_f64(),
                icmp: answer.words(),
            },
            None => Hop {
                ttl: ttl as u8,
                address: None,
                rtt_seconds: 0.0,
                icmp: String::new(),
            },
        })
        .collect::<Vec<_>>();
    let reached = hops.last().is_some_and(|h| h.address == Some(dest));
    Ok(Path {
        destination: dest,
        hops,
        reached,
        timestamp_ms,
    })
}

/// What an ICMP error says about the hop that sent it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    TimeExceeded,
    Unreachable {
        v6: bool,
        code: u8,
    },
    /// A datagram came back from the destination itself.
    Reached,
}

impl Answer {
    fn ends_path(self) -> bool {
        !matches!(self, Answer::TimeExceeded)
    }

    fn words(self) -> String {
        match self {
            Answer::TimeExceeded => "time exceeded".into(),
            Answer::Reached => "answered".into(),
            Answer::Unreachable { v6: false, code } => match code {
                0 => "net unreachable".into(),
                1 => "host unreachable".into(),
                2 => "protocol unreachable".into(),
                3 => "port unreachable".into(),
                9 | 10 | 13 => "administratively prohibited".into(),
                c => format!("unreachable (code {c})"),
            },
            Answer::Unreachable { v6: true, code } => match code {
                0 => "no route".into(),
                1 => "administratively prohibited".into(),
                3 => "address unreachable".into(),
                4 => "port unreachable".into(),
                c => format!("unreachable (code {c})"),
            },
        }
    }
}

/// The first TTL at which the path ended.
fn end_ttl(answers: &[Option<(IpAddr, Duration, Answer)>]) -> Option<usize> {
    answers
        .iter()
        .position(|a| a.is_some_and(|(_, _, answer)| answer.ends_path()))
}

/// Reads every ICMP error waiting on the socket's error queue into `answers`.
fn drain_errors(
    fd: i32,
    dest: IpAddr,
    sent: &[Option<Instant>],
    answers: &mut [Option<(IpAddr, Duration, Answer)>],
) {
    while let Some((port, offender, answer)) = read_error(fd) {
        let Some(ttl) = port
            .checked_sub(BASE_PORT)
            .map(usize::from)
            .filter(|t| (1..sent.len()).contains(t))
        else {
            continue;
        };
        let rtt = sent[ttl].map_or(Duration::ZERO, |s| s.elapsed());
        let answer = match answer {
            Answer::Unreachable { .. } if offender == dest => Answer::Unreachable {
                v6: dest.is_ipv6(),
                code: if dest.is_ipv6() { 4 } else { 3 },
            },
            a => a,
        };
        answers[ttl].get_or_insert((offender, rtt, answer));
    }
}

/// One message of the error queue: the original datagram's destination port, the
/// address of the router that answered, and what it said. `None` when the queue is
/// empty.
fn read_error(fd: i32) -> Option<(u16, IpAddr, Answer)> {
    loop {
        let mut name = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut control = [0u64; 64];
        let mut data = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain data; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = name.as_mut_ptr().cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `msg` points at buffers of the sizes it declares.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            return None;
        }
        // SAFETY: the kernel filled `msg_namelen` bytes of `name`, zeroed before.
        let port = match unsafe { sockaddr_to(name.as_ptr()) } {
            Some(addr) => addr.port(),
            None => continue,
        };
        // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
        // the `msg_controllen` it set.
        let found = unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            let mut found = None;
            while !cmsg.is_null() {
                let level = (*cmsg).cmsg_level;
                let kind = (*cmsg).cmsg_type;
                if (level == libc::SOL_IP && kind == libc::IP_RECVERR)
                    || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR)
                {
                    let err = libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err;
                    let e = std::ptr::read_unaligned(err);
                    let offender = err.add(1) as *const libc::sockaddr_storage;
                    found = classify(&e)
                        .and_then(|answer| sockaddr_to(offender).map(|a| (port, a.ip(), answer)));
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            found
        };
        if found.is_some() {
            return found;
        }
    }
}

fn classify(e: &libc::sock_extended_err) -> Option<Answer> {
    match e.ee_origin {
        libc::SO_EE_ORIGIN_ICMP => match e.ee_type {
            11 => Some(Answer::TimeExceeded),
            3 => Some(Answer::Unreachable {
                v6: false,
                code: e.ee_code,
            }),
            _ => None,
        },
        libc::SO_EE_ORIGIN_ICMP6 => match e.ee_type {
            3 => Some(Answer::TimeExceeded),
            1 => Some(Answer::Unreachable {
                v6: true,
                code: e.ee_code,
            }),
            _ => None,
        },
        _ => None,
    }
}

/// An IPv4 or IPv6 socket address from a `sockaddr_storage` the kernel wrote.
///
/// # Safety
/// `addr` points at a readable `sockaddr_storage`-sized buffer.
unsafe fn sockaddr_to(addr: *const libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the caller's promise; the family says which layout to read.
    unsafe {
        match i32::from((*addr).ss_family) {
            libc::AF_INET => {
                let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in);
                Some(SocketAddr::from((
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in6);
                Some(SocketAddr::from((
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                )))
            }
            _ => None,
        }
    }
}

fn set_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid socket and a pointer to an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True for an address of the agent's own host: loopback, unspecified, or one of its
/// interfaces' addresses.
pub fn is_own_address(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || ip.is_unspecified() || interface_addresses().contains(&ip)
}

fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list freed below; each ifa_addr is
    // null or points at a sockaddr of the family it names.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let a = std::ptr::read_unaligned(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_are_recognised() {
        assert!(is_own_address("127.0.0.1".parse().unwrap()));
        assert!(is_own_address("::1".parse().unwrap()));
        assert!(is_own_address("::ffff:127.0.0.1".parse().unwrap()));
        for ip in interface_addresses() {
            assert!(is_own_address(ip), "{ip}");
        }
        assert!(!is_own_address("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn tracing_a_closed_port_on_loopback_reaches_it_at_once() {
        // Loopback is one hop: the first datagram's "port unreachable" ends the path.
        let started = Instant::now();
        let path = traceroute("127.0.0.1".parse().unwrap(), MAX_TTL, WAIT).unwrap();
        assert!(path.reached, "{path:?}");
        assert_eq!(path.hops.len(), 1, "{path:?}");
        assert_eq!(path.hops[0].icmp, "port unreachable");
        assert!(started.elapsed() < WAIT, "it stops once the path has ended");
    }

    #[test]
    fn tracing_ipv6_reads_icmpv6_errors() {
        let path = traceroute("::1".parse().unwrap(), MAX_TTL, WAIT).unwrap();
        assert!(path.reached, "{path:?}");
        assert_eq!(path.hops[0].icmp, "port unreachable");
        assert_eq!(path.hops[0].address, Some("::1".parse().unwrap()));
    }

    #[tokio::test]
    async fn the_agent_never_traces_its_own_host_and_is_rate_limited() {
        let tracer = Tracer::default();
        assert_eq!(tracer.path_to("127.0.0.1".parse().unwrap()).await, None);
        let mut state = tracer.state.lock().unwrap();
        let now = Instant::now();
        let granted = (0..100).filter(|_| state.take_token(now)).count();
        assert_eq!(granted, AGENT_BURST as usize);
        assert!(state.take_token(now + Duration::from_secs(10)));
    }
}
