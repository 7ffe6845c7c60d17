//! The dns prober: one query to the DNS server named by the target (`host[:port]`,
//! port 53 by default, 853 for DNS over TLS), over UDP, TCP or TLS, as
//! blackbox_exporter's `dns` module.
//!
//! The query is built and the reply parsed with hickory-proto on our own sockets, so
//! that the phases (`resolve` of the server's name, `connect`, `request`) are timed.
//! The reply comes from the network and is hostile: anything malformed is a failure
//! with a reason, never a panic; on UDP a datagram that is not the reply to our query
//! (wrong id) is ignored, as a spoofed or stale answer would be.
//!
//! With `dnssec: {validate: true}` the queries carry EDNS with the DO and CD bits, the
//! reply's AD flag is reported, and the answer's chain of trust is checked by the agent
//! itself (the `dnssec` submodule), asking the same server for each DNSKEY and DS set.

pub(crate) mod denial;
mod dnssec;

use super::net::{AddressError, connect, connect_failure, parse_port, parse_source_ip};
use super::tls::TlsClient;
use super::tls_samples::TlsFacts;
use super::{
    Because, Env, Failure, ProbeContext, Reason, Samples, Stage, io_reason, resolve_target,
    split_host_port,
};
use hickory_proto::ProtoError;
use hickory_proto::op::Edns;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use sonde_proto::config::Module;
use sonde_proto::config::module::{DnsProbe, DnsRrValidator, DnsTransport, dns_rcode_name};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;

const DURATION: &str = "probe_dns_duration_seconds";
const DNSSEC_VALID: &str = "probe_dns_dnssec_valid";
const DNSSEC_AD: &str = "probe_dns_dnssec_ad";
const RRSIG_EXPIRY: &str = "probe_dns_rrsig_expiry_timestamp_seconds";
const SOA: u16 = 6;

pub async fn probe(
    ctx: &Env<'_>,
    target: &str,
    module: &Module,
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.dns;
    out.register(
        DURATION,
        &["resolve", "connect", "request"],
        &[
            "probe_dns_answer_rrs",
            "probe_dns_authority_rrs",
            "probe_dns_additional_rrs",
            "probe_dns_query_succeeded",
        ],
    );

    let qtype = cfg.query_type_code().ok_or_else(|| {
        Failure::new(
            Reason::Config,
            format!("dns.query_type {:?} is not a record type", cfg.query_type),
        )
    })?;
    let qclass = cfg.query_class_code().ok_or_else(|| {
        Failure::new(
            Reason::Config,
            format!("dns.query_class {:?} is not a class", cfg.query_class),
        )
    })?;
    let valid_rcodes = cfg.valid_rcode_codes().because(Reason::Config)?;
    let source = parse_source_ip(cfg.source_ip_address.as_deref()).because(Reason::Config)?;
    let anchors = if cfg.dnssec.validate {
        // Only with validation on, so a module without it reports blackbox_exporter's set.
        out.register(DURATION, &[], &[DNSSEC_VALID, DNSSEC_AD, RRSIG_EXPIRY]);
        Some(dnssec::Anchors::load(&cfg.dnssec).because(Reason::Config)?)
    } else {
        None
    };
    let query = build_query(
        &cfg.query_name,
        qtype,
        qclass,
        cfg.recursion_desired,
        cfg.dnssec.validate,
    )
    .because(Reason::Config)?;
    if cfg.dns_over_tls && cfg.transport_protocol != DnsTransport::Tcp {
        return Err(Failure::new(
            Reason::Config,
            "dns.dns_over_tls needs transport_protocol: tcp",
        ));
    }
    let tls = if cfg.dns_over_tls {
        Some(TlsClient::new(ctx, &cfg.tls_config, &[]).because(Reason::Config)?)
    } else {
        None
    };

    let default_port = if cfg.dns_over_tls { 853 } else { 53 };
    let (host, port) = server_target(target, default_port).because(Reason::Config)?;
    let (ip, lookup) = resolve_target(
        ctx,
        host,
        cfg.preferred_ip_protocol,
        cfg.ip_protocol_fallback,
        out,
    )
    .await?;
    out.add_with(DURATION, &[("phase", "resolve")], lookup.as_secs_f64());

    let server = SocketAddr::new(ip, port);
    ctx.allow(host, server)?;
    crate::probe_log!(
        out.log,
        Debug,
        "Making DNS query",
        server = server,
        transport = match (cfg.transport_protocol, cfg.dns_over_tls) {
            (DnsTransport::Udp, _) => "udp",
            (DnsTransport::Tcp, false) => "tcp",
            (DnsTransport::Tcp, true) => "tls",
        },
        query_name = cfg.query_name,
        query_type = cfg.query_type,
        recursion_desired = cfg.recursion_desired
    );
    let reply = match (cfg.transport_protocol, &tls) {
        (DnsTransport::Udp, _) => exchange_udp(server, source, &query, out).await?,
        (DnsTransport::Tcp, None) => {
            let started = Instant::now();
            out.stage = Stage::Connect;
            let stream = connect(server, source, out).await?;
            out.add_with(
                DURATION,
                &[("phase", "connect")],
                started.elapsed().as_secs_f64(),
            );
            out.stage = Stage::Exchange;
            exchange_stream(stream, &query, out).await?
        }
        (DnsTransport::Tcp, Some(client)) => {
            // As miekg/dns times it, the connect phase includes the TLS handshake.
            let started = Instant::now();
            out.stage = Stage::Connect;
            let stream = connect(server, source, out).await?;
            out.stage = Stage::Exchange;
            let name = cfg.tls_config.server_name.as_deref().unwrap_or(host);
            let stream = client.handshake(ctx, name, stream, out).await;
            out.add_with(
                DURATION,
                &[("phase", "connect")],
                started.elapsed().as_secs_f64(),
            );
            let stream = stream?;
            // Not reported by blackbox_exporter for DNS over TLS; the server's
            // certificate expiry is worth alerting on all the same.
            TlsFacts::read(ctx, stream.get_ref().1, client).record(out, false);
            exchange_stream(stream, &query, out).await?
        }
    };
    let checked = read_reply(ctx, cfg, qtype, &valid_rcodes, &reply, out);
    let Some(anchors) = anchors else {
        return checked;
    };
    let Ok(message) = Message::from_vec(&reply) else {
        return checked;
    };
    let fetch = ServerFetch {
        ctx,
        server,
        source,
        transport: cfg.transport_protocol,
        tls: tls.as_ref().map(|client| {
            (
                client,
                cfg.tls_config.server_name.as_deref().unwrap_or(host),
            )
        }),
        recursion: cfg.recursion_desired,
    };
    let validated = validate_dnssec(&message, &anchors, fetch, qtype, out).await;
    checked.and(validated)
}

/// Reports the AD flag and checks the chain of trust of `reply`, the answer to the probe's
/// query: `probe_dns_dnssec_valid` and the earliest RRSIG expiry on the chain.
async fn validate_dnssec(
    reply: &Message,
    anchors: &dnssec::Anchors,
    fetch: ServerFetch<'_, '_>,
    qtype: u16,
    out: &mut Samples,
) -> Result<(), Failure> {
    out.set(
        DNSSEC_AD,
        f64::from(u8::from(reply.metadata.authentic_data)),
    );
    let Some(query) = reply.queries.first() else {
        return Err(Failure::new(
            Reason::Dnssec,
            "dnssec: the reply does not repeat the question",
        ));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut chain = dnssec::Chain::new(anchors, now, fetch);
    let result = chain
        .validate(reply, query.name(), RecordType::from(qtype))
        .await;
    if let Some(expiry) = chain.earliest_expiry() {
        out.set(RRSIG_EXPIRY, expiry as f64);
    }
    match result {
        Ok(validated) => {
            out.set(DNSSEC_VALID, 1.0);
            crate::probe_log!(
                out.log,
                Debug,
                "Validated the DNSSEC chain of trust",
                zones = validated
                    .zones
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                earliest_rrsig_expiry = dnssec::dnssec_time(validated.earliest_expiry),
                ad = reply.metadata.authentic_data
            );
            Ok(())
        }
        Err(link) => {
            crate::probe_log!(
                out.log,
                Debug,
                "DNSSEC chain of trust broken",
                link = link,
                ad = reply.metadata.authentic_data
            );
            Err(Failure::new(Reason::Dnssec, format!("dnssec: {link}")))
        }
    }
}

/// Asks the probe's server, over the probe's transport, for the records of the chain of
/// trust. Each query is a connection (or socket) of its own, left out of the phase
/// durations, which time the probe's own query.
struct ServerFetch<'e, 'c> {
    ctx: &'e Env<'c>,
    server: SocketAddr,
    source: Option<IpAddr>,
    transport: DnsTransport,
    /// The TLS client and the name to check the server's certificate against.
    tls: Option<(&'e TlsClient, &'e str)>,
    recursion: bool,
}

impl dnssec::Fetch for ServerFetch<'_, '_> {
    async fn fetch(&mut self, name: &Name, rtype: RecordType) -> Result<Message, String> {
        let query = build_query(&name.to_ascii(), u16::from(rtype), 1, self.recursion, true)
            .map_err(|e| e.to_string())?;
        let mut scratch = Samples::default();
        let reply = match (self.transport, self.tls) {
            (DnsTransport::Udp, _) => {
                let reply = exchange_udp(self.server, self.source, &query, &mut scratch)
                    .await
                    .map_err(|f| f.message)?;
                // TC: the answer did not fit in a datagram; DNSKEY sets often do not.
                if reply[2] & 0x02 != 0 {
                    let stream = connect(self.server, self.source, &mut scratch)
                        .await
                        .map_err(|f| f.message)?;
                    exchange_stream(stream, &query, &mut scratch)
                        .await
                        .map_err(|f| f.message)?
                } else {
                    reply
                }
            }
            (DnsTransport::Tcp, None) => {
                let stream = connect(self.server, self.source, &mut scratch)
                    .await
                    .map_err(|f| f.message)?;
                exchange_stream(stream, &query, &mut scratch)
                    .await
                    .map_err(|f| f.message)?
            }
            (DnsTransport::Tcp, Some((client, server_name))) => {
                let stream = connect(self.server, self.source, &mut scratch)
                    .await
                    .map_err(|f| f.message)?;
                let stream = client
                    .handshake(self.ctx, server_name, stream, &mut scratch)
                    .await
                    .map_err(|f| f.message)?;
                exchange_stream(stream, &query, &mut scratch)
                    .await
                    .map_err(|f| f.message)?
            }
        };
        Message::from_vec(&reply).map_err(|e| format!("malformed reply: {e}"))
    }
}

/// What a reply says, checked against the module: the section counts, the SOA serial,
/// the rcode and the record regexes. `reply` comes off the network: anything malformed
/// is a [`Reason::Protocol`] failure, never a panic.
pub(crate) fn read_reply(
    ctx: &ProbeContext,
    cfg: &DnsProbe,
    qtype: u16,
    valid_rcodes: &[u16],
    reply: &[u8],
    out: &mut Samples,
) -> Result<(), Failure> {
    let message = Message::from_vec(reply)
        .map_err(|e| Failure::new(Reason::Protocol, format!("dns: malformed reply: {e}")))?;

    // The header's counts are the sections as sent, which is what miekg/dns reports
    // (hickory moves an OPT record out of the additional section).
    let count = |at: usize| {
        reply
            .get(at..at + 2)
            .map_or(0.0, |b| f64::from(u16::from_be_bytes([b[0], b[1]])))
    };
    out.set("probe_dns_answer_rrs", count(6));
    out.set("probe_dns_authority_rrs", count(8));
    out.set("probe_dns_additional_rrs", count(10));
    out.set("probe_dns_query_succeeded", 1.0);
    if qtype == SOA {
        // Registered for every SOA query; the last SOA answer's serial, else 0.
        let serial = message
            .answers
            .iter()
            .rev()
            .find_map(|r| match &r.data {
                RData::SOA(soa) => Some(soa.serial),
                _ => None,
            })
            .unwrap_or(0);
        out.set("probe_dns_serial", f64::from(serial));
    }

    let rcode = u16::from(message.metadata.response_code);
    if out.log.is_on() {
        crate::probe_log!(
            out.log,
            Debug,
            "Got DNS response",
            rcode = dns_rcode_name(rcode)
                .map(str::to_string)
                .unwrap_or_else(|| rcode.to_string()),
            valid = valid_rcodes.contains(&rcode),
            answer_rrs = message.answers.len(),
            authority_rrs = message.authorities.len(),
            additional_rrs = message.additionals.len()
        );
        for (section, records) in [
            ("answer", &message.answers),
            ("authority", &message.authorities),
            ("additional", &message.additionals),
        ] {
            for record in records.iter() {
                crate::probe_log!(
                    out.log,
                    Debug,
                    "Got record",
                    section = section,
                    rr = rr_string(record)
                );
            }
        }
    }
    if !valid_rcodes.contains(&rcode) {
        let name = dns_rcode_name(rcode)
            .map(str::to_string)
            .unwrap_or_else(|| rcode.to_string());
        return Err(Failure::new(
            Reason::DnsRcode,
            if cfg.valid_rcodes.is_empty() {
                format!("dns: rcode {name} is not NOERROR")
            } else {
                format!("dns: rcode {name} not in valid_rcodes")
            },
        ));
    }
    for (section, records, validator) in [
        ("answer", &message.answers, &cfg.validate_answer_rrs),
        (
            "authority",
            &message.authorities,
            &cfg.validate_authority_rrs,
        ),
        (
            "additional",
            &message.additionals,
            &cfg.validate_additional_rrs,
        ),
    ] {
        if !validator.is_empty() {
            let lines: Vec<String> = records.iter().map(rr_string).collect();
            let checked = check_records(ctx, section, &lines, validator);
            crate::probe_log!(
                out.log,
                Debug,
                "Validated the records against the regular expressions",
                section = section,
                records = lines.len(),
                ok = checked.is_ok(),
                err = checked
                    .as_ref()
                    .err()
                    .map(|f| f.message.as_str())
                    .unwrap_or("")
            );
            checked?;
        }
    }
    Ok(())
}

/// blackbox_exporter's `validRRs`, in its order. `fail_if_all_match_regexp` fails
/// unless every record matches, which is what its code does.
fn check_records(
    ctx: &ProbeContext,
    section: &str,
    records: &[String],
    v: &DnsRrValidator,
) -> Result<(), Failure> {
    let regex = |re: &str| ctx.regex(re).because(Reason::Config);
    let mismatch =
        |message: String| -> Result<(), Failure> { Err(Failure::new(Reason::Regex, message)) };
    if records.is_empty() {
        if let Some(re) = v.fail_if_not_matches_regexp.first() {
            return mismatch(format!(
                "dns: no {section} records to match {re:?} (fail_if_not_matches_regexp)"
            ));
        }
        if let Some(re) = v.fail_if_none_matches_regexp.first() {
            return mismatch(format!(
                "dns: no {section} records to match {re:?} (fail_if_none_matches_regexp)"
            ));
        }
    }
    let mut all_match = true;
    let mut any_match = false;
    for record in records {
        let text = record.as_bytes();
        for re in &v.fail_if_matches_regexp {
            if regex(re)?.is_match(text) {
                return mismatch(format!("dns: {section} record matched {re:?}"));
            }
        }
        for re in &v.fail_if_all_match_regexp {
            all_match &= regex(re)?.is_match(text);
        }
        for re in &v.fail_if_not_matches_regexp {
            if !regex(re)?.is_match(text) {
                return mismatch(format!("dns: {section} record did not match {re:?}"));
            }
        }
        for re in &v.fail_if_none_matches_regexp {
            any_match |= regex(re)?.is_match(text);
        }
    }
    if !v.fail_if_all_match_regexp.is_empty() && !all_match {
        return mismatch(format!(
            "dns: not every {section} record matched fail_if_all_match_regexp"
        ));
    }
    if !v.fail_if_none_matches_regexp.is_empty() && !any_match {
        return mismatch(format!(
            "dns: no {section} record matched fail_if_none_matches_regexp"
        ));
    }
    Ok(())
}

/// A record as miekg/dns's `RR.String()` writes it, which is what users' regexes in
/// blackbox.yml are written against: tab-separated header, TXT strings quoted.
fn rr_string(record: &Record) -> String {
    let data = match &record.data {
        RData::TXT(txt) => txt
            .txt_data
            .iter()
            .map(|s| {
                let mut quoted = String::from("\"");
                for &b in s.iter() {
                    match b {
                        b'"' | b'\\' => {
                            quoted.push('\\');
                            quoted.push(char::from(b));
                        }
                        0x20..=0x7e => quoted.push(char::from(b)),
                        _ => quoted.push_str(&format!("\\{b:03}")),
                    }
                }
                quoted.push('"');
                quoted
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    };
    format!(
        "{}\t{}\t{}\t{}\t{}",
        record.name,
        record.ttl,
        record.dns_class,
        record.record_type(),
        data
    )
}

/// The server's host and port. Where Go's SplitHostPort fails (a bare host, a bare
/// IPv6 address) the whole target is the host and the port is DNS's, as in
/// blackbox_exporter.
pub(crate) fn server_target(target: &str, default_port: u16) -> Result<(&str, u16), AddressError> {
    match split_host_port(target) {
        Ok((host, port)) => Ok((host, parse_port(port, target)?)),
        Err(_) => Ok((target, default_port)),
    }
}

/// A query that cannot be built from the module.
#[derive(Debug, thiserror::Error)]
enum QueryError {
    #[error("dns.query_name {name:?}: {error}")]
    Name { name: String, error: ProtoError },
    #[error("dns: cannot encode the query: {0}")]
    Encode(ProtoError),
}

/// A query with a random id, no EDNS (as blackbox_exporter sends it); with `dnssec`,
/// EDNS with the DO bit (send DNSSEC records) and the CD bit (hand them over even when
/// the resolver finds them bogus: the agent checks them itself).
fn build_query(
    name: &str,
    qtype: u16,
    qclass: u16,
    recursion: bool,
    dnssec: bool,
) -> Result<Vec<u8>, QueryError> {
    let mut name = Name::from_ascii(name).map_err(|error| QueryError::Name {
        name: name.to_string(),
        error,
    })?;
    name.set_fqdn(true);
    let mut query = Query::query(name, RecordType::from(qtype));
    query.set_query_class(DNSClass::from(qclass));
    let mut message = Message::query();
    message.metadata.recursion_desired = recursion;
    message.add_query(query);
    if dnssec {
        let mut edns = Edns::new();
        edns.set_dnssec_ok(true);
        // The payload size DNS flag day 2020 settled on: no IP fragmentation.
        edns.set_max_payload(1232);
        message.set_edns(edns);
        message.metadata.checking_disabled = true;
    }
    message.to_vec().map_err(QueryError::Encode)
}

async fn exchange_udp(
    server: SocketAddr,
    source: Option<IpAddr>,
    query: &[u8],
    out: &mut Samples,
) -> Result<Vec<u8>, Failure> {
    let started = Instant::now();
    out.stage = Stage::Connect;
    let local = source.unwrap_or(if server.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    });
    let socket = UdpSocket::bind(SocketAddr::new(local, 0))
        .await
        .map_err(|e| {
            Failure::new(
                Reason::ConnectError,
                format!("bind {local}: {}", io_reason(&e)),
            )
        })?;
    // Connected, so the kernel drops datagrams from anyone but the server.
    socket
        .connect(server)
        .await
        .map_err(|e| connect_failure(&e))?;
    out.stage = Stage::Exchange;
    out.add_with(
        DURATION,
        &[("phase", "connect")],
        started.elapsed().as_secs_f64(),
    );

    let started = Instant::now();
    socket
        .send(query)
        .await
        .map_err(|e| Failure::new(Reason::Protocol, format!("dns: send: {}", io_reason(&e))))?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| {
            // An ICMP port unreachable comes back as a refused receive.
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                Failure::new(Reason::ConnectRefused, format!("dns: {}", io_reason(&e)))
            } else {
                Failure::new(Reason::Protocol, format!("dns: {}", io_reason(&e)))
            }
        })?;
        if n >= 2 && buf[..2] == query[..2] {
            out.add_with(
                DURATION,
                &[("phase", "request")],
                started.elapsed().as_secs_f64(),
            );
            buf.truncate(n);
            return check_header(buf);
        }
    }
}

/// One length-prefixed query and reply over a connected TCP (or TLS) stream.
async fn exchange_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    query: &[u8],
    out: &mut Samples,
) -> Result<Vec<u8>, Failure> {
    let io = |e: std::io::Error| Failure::new(Reason::Protocol, format!("dns: {}", io_reason(&e)));
    let started = Instant::now();
    let len = u16::try_from(query.len())
        .map_err(|_| Failure::new(Reason::Protocol, "dns: query too long"))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).await.map_err(io)?;
    out.add_with(
        DURATION,
        &[("phase", "request")],
        started.elapsed().as_secs_f64(),
    );
    if reply.len() < 2 || reply[..2] != query[..2] {
        return Err(Failure::new(
            Reason::Protocol,
            "dns: the reply's id does not match the query's",
        ));
    }
    check_header(reply)
}

/// Every reply used past here has a full 12-byte header.
fn check_header(reply: Vec<u8>) -> Result<Vec<u8>, Failure> {
    if reply.len() < 12 {
        return Err(Failure::new(
            Reason::Protocol,
            format!(
                "dns: malformed reply: {} bytes, shorter than a DNS header",
                reply.len()
            ),
        ));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::run;
    use crate::probe::test_support::{ctx, phase_of, sample};
    use hickory_proto::op::{MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA as SoaData};
    use std::time::Duration;
    use tokio::net::TcpListener;

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// The test zone: what the server answers for each name.
    fn answer(query: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        let q = request.queries.first()?.clone();
        let name = q.name().to_ascii();
        let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.add_query(q.clone());
        let soa = || {
            Record::from_rdata(
                Name::from_ascii("test.").unwrap(),
                300,
                RData::SOA(SoaData::new(
                    Name::from_ascii("ns.test.").unwrap(),
                    Name::from_ascii("admin.test.").unwrap(),
                    2024010101,
                    3600,
                    600,
                    86400,
                    300,
                )),
            )
        };
        match name.as_str() {
            "a.test." => {
                for last in [1, 2] {
                    reply.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(A::new(192, 0, 2, last)),
                    ));
                }
                reply.add_additional(Record::from_rdata(
                    Name::from_ascii("extra.test.").unwrap(),
                    60,
                    RData::A(A::new(192, 0, 2, 9)),
                ));
            }
            "test." => {
                reply.add_answer(soa());
            }
            "rd.test." if !request.metadata.recursion_desired => {
                reply.metadata.response_code = ResponseCode::Refused;
            }
            "rd.test." => {}
            "nx.test." => {
                reply.metadata.response_code = ResponseCode::NXDomain;
                reply.add_authority(soa());
            }
            "garbage.test." => {
                // Our id, then nonsense.
                let mut bytes = query[..2].to_vec();
                bytes.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 5, 0, 0, 0, 0, 0xde, 0xad]);
                return Some(bytes);
            }
            "short.test." => return Some(query[..2].to_vec()),
            "silent.test." => return None,
            _ => {
                reply.metadata.response_code = ResponseCode::ServFail;
            }
        }
        reply.to_vec().ok()
    }

    async fn udp_server() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let query = buf[..n].to_vec();
                let name = Message::from_vec(&query)
                    .ok()
                    .and_then(|m| m.queries.first().map(|q| q.name().to_ascii()));
                if name.as_deref() == Some("wrongid.test.") {
                    // A stray datagram first (another id, then garbage), then the answer.
                    let mut stray = query.clone();
                    stray[0] ^= 0xff;
                    let _ = socket.send_to(&stray, peer).await;
                    let _ = socket.send_to(&[0x42], peer).await;
                    let mut fixed = query.clone();
                    fixed[2] |= 0x80;
                    let _ = socket.send_to(&fixed, peer).await;
                    continue;
                }
                if let Some(reply) = answer(&query) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        addr
    }

    async fn tcp_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut len = [0u8; 2];
                    if stream.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if stream.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    if let Some(reply) = answer(&query) {
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend(reply);
                        let _ = stream.write_all(&framed).await;
                    } else {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                });
            }
        });
        addr
    }

    fn dns_module(json: serde_json::Value) -> Module {
        serde_json::from_value(serde_json::json!({ "prober": "dns", "dns": json })).unwrap()
    }

    fn phase(o: &crate::probe::ProbeOutcome, name: &str) -> f64 {
        phase_of(o, DURATION, name)
    }

    #[tokio::test]
    async fn probe_dns_udp_a_records() {
        let addr = udp_server().await;
        let m = dns_module(serde_json::json!({"query_name": "a.test", "query_type": "A"}));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_dns_answer_rrs"), Some(2.0));
        assert_eq!(sample(&o, "probe_dns_authority_rrs"), Some(0.0));
        assert_eq!(sample(&o, "probe_dns_additional_rrs"), Some(1.0));
        assert_eq!(sample(&o, "probe_dns_query_succeeded"), Some(1.0));
        assert_eq!(sample(&o, "probe_ip_protocol"), Some(4.0));
        assert!(sample(&o, "probe_dns_serial").is_none());
        assert!(phase(&o, "connect") > 0.0);
        assert!(phase(&o, "request") > 0.0);
        assert!(phase(&o, "resolve") < 0.01);
    }

    #[tokio::test]
    async fn probe_dns_source_ip_address_over_udp_and_tcp() {
        // A server that answers and reports which address each query came from.
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let listener = TcpListener::bind(addr).await.unwrap();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let udp_seen = seen_tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let _ = udp_seen.send(peer.ip());
                if let Some(reply) = answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        tokio::spawn(async move {
            while let Ok((mut stream, peer)) = listener.accept().await {
                let _ = seen_tx.send(peer.ip());
                let mut len = [0u8; 2];
                if stream.read_exact(&mut len).await.is_err() {
                    continue;
                }
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if stream.read_exact(&mut query).await.is_err() {
                    continue;
                }
                if let Some(reply) = answer(&query) {
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend(reply);
                    let _ = stream.write_all(&framed).await;
                }
            }
        });
        for transport in ["udp", "tcp"] {
            let m = dns_module(serde_json::json!({
                "query_name": "a.test", "query_type": "A",
                "transport_protocol": transport, "source_ip_address": "127.0.0.2"
            }));
            let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
            assert!(o.success, "{transport}: {:?}", o.failure);
            assert_eq!(
                seen.recv().await,
                Some("127.0.0.2".parse().unwrap()),
                "{transport}: the query must leave from source_ip_address"
            );
        }
    }

    #[tokio::test]
    async fn probe_dns_tcp_a_records() {
        let addr = tcp_server().await;
        let m = dns_module(serde_json::json!({
            "query_name": "a.test", "query_type": "A", "transport_protocol": "tcp"
        }));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_dns_answer_rrs"), Some(2.0));
        assert_eq!(sample(&o, "probe_dns_additional_rrs"), Some(1.0));
        assert!(phase(&o, "connect") > 0.0);
        assert!(phase(&o, "request") > 0.0);
    }

    #[tokio::test]
    async fn probe_dns_nxdomain_and_valid_rcodes() {
        let addr = udp_server().await;
        let m = dns_module(serde_json::json!({"query_name": "nx.test", "query_type": "A"}));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert!(!o.success);
        assert_eq!(
            o.failure.as_deref(),
            Some("dns: rcode NXDOMAIN is not NOERROR")
        );
        // The query itself went through.
        assert_eq!(sample(&o, "probe_dns_query_succeeded"), Some(1.0));
        assert_eq!(sample(&o, "probe_dns_authority_rrs"), Some(1.0));

        let m = dns_module(serde_json::json!({
            "query_name": "nx.test", "query_type": "A", "valid_rcodes": ["NOERROR", "NXDOMAIN"]
        }));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);

        let m = dns_module(serde_json::json!({
            "query_name": "other.test", "query_type": "A", "valid_rcodes": ["NXDOMAIN"]
        }));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert_eq!(
            o.failure.as_deref(),
            Some("dns: rcode SERVFAIL not in valid_rcodes")
        );
    }

    #[tokio::test]
    async fn probe_dns_soa_serial() {
        let addr = udp_server().await;
        let m = dns_module(serde_json::json!({"query_name": "test", "query_type": "SOA"}));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_dns_serial"), Some(2024010101.0));
        // Registered for SOA queries even without an SOA answer.
        let m = dns_module(serde_json::json!({"query_name": "a.test", "query_type": "SOA"}));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert_eq!(sample(&o, "probe_dns_serial"), Some(0.0));
    }

    #[tokio::test]
    async fn probe_dns_recursion_desired_is_sent() {
        let addr = udp_server().await;
        let on = dns_module(serde_json::json!({"query_name": "rd.test", "query_type": "A"}));
        assert!(run(&ctx(), &addr.to_string(), &on, TIMEOUT).await.success);
        let off = dns_module(serde_json::json!({
            "query_name": "rd.test", "query_type": "A", "recursion_desired": false
        }));
        let o = run(&ctx(), &addr.to_string(), &off, TIMEOUT).await;
        assert_eq!(
            o.failure.as_deref(),
            Some("dns: rcode REFUSED is not NOERROR")
        );
    }

    #[tokio::test]
    async fn probe_dns_garbage_replies_fail_cleanly() {
        let udp = udp_server().await;
        let tcp = tcp_server().await;
        for (name, transport, addr) in [
            ("garbage.test", "udp", udp),
            ("garbage.test", "tcp", tcp),
            ("short.test", "udp", udp),
            ("short.test", "tcp", tcp),
        ] {
            let m = dns_module(serde_json::json!({
                "query_name": name, "query_type": "A", "transport_protocol": transport
            }));
            let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
            assert!(!o.success, "{name} over {transport}");
            let reason = o.failure.clone().unwrap();
            assert!(reason.starts_with("dns: malformed reply"), "{reason}");
            assert_eq!(sample(&o, "probe_dns_query_succeeded"), Some(0.0));
        }
    }

    #[tokio::test]
    async fn probe_dns_udp_ignores_datagrams_with_another_id() {
        let addr = udp_server().await;
        let m = dns_module(serde_json::json!({"query_name": "wrongid.test", "query_type": "A"}));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_dns_query_succeeded"), Some(1.0));
    }

    #[tokio::test]
    async fn probe_dns_silent_server_times_out_with_connect_phase() {
        let addr = udp_server().await;
        let m = dns_module(serde_json::json!({"query_name": "silent.test", "query_type": "A"}));
        let o = run(&ctx(), &addr.to_string(), &m, Duration::from_millis(200)).await;
        assert_eq!(o.failure.as_deref(), Some("timed out after 200ms"));
        assert!(phase(&o, "connect") > 0.0);
        assert_eq!(phase(&o, "request"), 0.0);
        assert_eq!(sample(&o, "probe_dns_query_succeeded"), Some(0.0));
    }

    #[tokio::test]
    async fn probe_dns_closed_tcp_port() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let m = dns_module(serde_json::json!({
            "query_name": "a.test", "transport_protocol": "tcp"
        }));
        let o = run(&ctx(), &format!("127.0.0.1:{port}"), &m, TIMEOUT).await;
        assert_eq!(o.failure.as_deref(), Some("connect: connection refused"));
    }

    #[tokio::test]
    async fn probe_dns_validates_records_like_blackbox() {
        let addr = udp_server().await;
        let probe = |v: serde_json::Value| {
            let mut dns = serde_json::json!({"query_name": "a.test", "query_type": "A"});
            dns.as_object_mut()
                .unwrap()
                .extend(v.as_object().unwrap().clone());
            let m = dns_module(dns);
            async move { run(&ctx(), &addr.to_string(), &m, TIMEOUT).await.failure }
        };
        let ok = probe(serde_json::json!({
            "validate_answer_rrs": {
                "fail_if_not_matches_regexp": ["^a\\.test\\.\t60\tIN\tA\t192\\.0\\.2\\.[12]$"],
                "fail_if_none_matches_regexp": ["192.0.2.2"],
                "fail_if_all_match_regexp": ["\tA\t"],
            },
            "validate_additional_rrs": {"fail_if_not_matches_regexp": ["extra"]},
        }))
        .await;
        assert_eq!(ok, None);
        let cases = [
            (
                serde_json::json!({"validate_answer_rrs": {"fail_if_matches_regexp": [".*192.0.2.2"]}}),
                "dns: answer record matched \".*192.0.2.2\"",
            ),
            (
                serde_json::json!({"validate_answer_rrs": {"fail_if_none_matches_regexp": ["192.0.2.3"]}}),
                "dns: no answer record matched fail_if_none_matches_regexp",
            ),
            (
                serde_json::json!({"validate_answer_rrs": {"fail_if_all_match_regexp": ["192.0.2.1$"]}}),
                "dns: not every answer record matched fail_if_all_match_regexp",
            ),
            (
                serde_json::json!({"validate_additional_rrs": {"fail_if_matches_regexp": ["extra"]}}),
                "dns: additional record matched \"extra\"",
            ),
            (
                serde_json::json!({"validate_authority_rrs": {"fail_if_not_matches_regexp": ["ns"]}}),
                "dns: no authority records to match \"ns\" (fail_if_not_matches_regexp)",
            ),
        ];
        for (v, reason) in cases {
            assert_eq!(probe(v).await.as_deref(), Some(reason));
        }
    }

    /// A DNS-over-TLS server with the test PKI, answering from the test zone.
    async fn dot_server(pki: &crate::probe::test_support::TestPki) -> SocketAddr {
        crate::probe::test_support::tls_server(pki, &[], |mut tls| async move {
            let mut len = [0u8; 2];
            if tls.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if tls.read_exact(&mut query).await.is_err() {
                return;
            }
            if let Some(reply) = answer(&query) {
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend(reply);
                let _ = tls.write_all(&framed).await;
                let _ = tls.flush().await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn probe_dns_over_tls() {
        use crate::probe::test_support::{LEAF_NOT_AFTER, ca_file, test_pki};
        let pki = test_pki();
        let addr = dot_server(&pki).await;
        let m = dns_module(serde_json::json!({
            "query_name": "a.test", "query_type": "A", "transport_protocol": "tcp",
            "dns_over_tls": true,
            "tls_config": {"ca_file": ca_file(&pki), "server_name": "localhost"},
        }));
        m.validate().unwrap();
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_dns_answer_rrs"), Some(2.0));
        assert!(phase(&o, "connect") > 0.0);
        assert_eq!(
            sample(&o, "probe_ssl_earliest_cert_expiry"),
            Some(LEAF_NOT_AFTER)
        );
        // Untrusted: a TLS failure, the query never sent.
        let m = dns_module(serde_json::json!({
            "query_name": "a.test", "transport_protocol": "tcp", "dns_over_tls": true,
        }));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert_eq!(o.failure_reason, Some(crate::probe::Reason::Tls));
        assert_eq!(sample(&o, "probe_dns_query_succeeded"), Some(0.0));
        // DoT over UDP is refused by validation.
        let m = dns_module(serde_json::json!({"query_name": "a.test", "dns_over_tls": true}));
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("transport_protocol: tcp")
        );
    }

    #[tokio::test]
    async fn probe_dns_query_class_and_reasons() {
        let addr = udp_server().await;
        // The class goes on the wire: the test server echoes the question.
        let m = dns_module(
            serde_json::json!({"query_name": "a.test", "query_type": "A", "query_class": "CH"}),
        );
        m.validate().unwrap();
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert!(o.success, "{:?}", o.failure);
        let query = build_query("a.test", 1, 3, true, false).unwrap();
        let q = Message::from_vec(&query).unwrap();
        assert_eq!(q.queries[0].query_class(), DNSClass::CH);
        let m = dns_module(serde_json::json!({"query_name": "nx.test", "query_type": "A"}));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert_eq!(o.failure_reason, Some(crate::probe::Reason::DnsRcode));
        let m = dns_module(serde_json::json!({"query_name": "garbage.test", "query_type": "A"}));
        let o = run(&ctx(), &addr.to_string(), &m, TIMEOUT).await;
        assert_eq!(o.failure_reason, Some(crate::probe::Reason::Protocol));
    }

    #[test]
    fn records_are_written_like_miekg() {
        use hickory_proto::rr::rdata::TXT;
        let name = Name::from_ascii("www.example.").unwrap();
        let a = Record::from_rdata(name.clone(), 300, RData::A(A::new(127, 0, 0, 1)));
        assert_eq!(rr_string(&a), "www.example.\t300\tIN\tA\t127.0.0.1");
        let txt = Record::from_rdata(
            name,
            60,
            RData::TXT(TXT::new(vec!["v=spf1 -all".into(), "say \"hi\"".into()])),
        );
        assert_eq!(
            rr_string(&txt),
            "www.example.\t60\tIN\tTXT\t\"v=spf1 -all\" \"say \\\"hi\\\"\""
        );
    }

    #[test]
    fn server_targets_like_blackbox() {
        assert_eq!(server_target("192.0.2.53", 53), Ok(("192.0.2.53", 53)));
        assert_eq!(server_target("192.0.2.53", 853), Ok(("192.0.2.53", 853)));
        assert_eq!(
            server_target("ns.example:5353", 53),
            Ok(("ns.example", 5353))
        );
        assert_eq!(
            server_target("[2001:db8::53]:53", 53),
            Ok(("2001:db8::53", 53))
        );
        assert_eq!(server_target("2001:db8::53", 53), Ok(("2001:db8::53", 53)));
        assert!(server_target("ns.example:dns", 53).is_err());
    }

    #[tokio::test]
    async fn probe_dns_bad_options_fail_before_querying() {
        let addr = udp_server().await;
        let bad = dns_module(serde_json::json!({"query_name": "a..b", "query_type": "A"}));
        let o = run(&ctx(), &addr.to_string(), &bad, TIMEOUT).await;
        assert!(o.failure.clone().unwrap().starts_with("dns.query_name"));
        let bad = dns_module(serde_json::json!({"query_name": "a.test", "query_type": "NOPE"}));
        let o = run(&ctx(), &addr.to_string(), &bad, TIMEOUT).await;
        assert!(o.failure.clone().unwrap().starts_with("dns.query_type"));
        assert!(sample(&o, "probe_ip_protocol").is_none());
    }

    #[test]
    fn parse_never_panics_on_mutated_replies() {
        let query = build_query("a.test", 1, 1, true, false).unwrap();
        let reply = answer(&query).unwrap();
        for i in 0..reply.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut r = reply.clone();
                r[i] ^= flip;
                let _ = Message::from_vec(&r);
            }
            let _ = Message::from_vec(&reply[..i]);
        }
    }

    #[tokio::test]
    async fn probe_dns_debug_log_tells_the_query_and_the_answer() {
        use crate::probe::test_support::{assert_log_has, run_with_log};
        for (server, transport) in [(udp_server().await, "udp"), (tcp_server().await, "tcp")] {
            let m = dns_module(serde_json::json!({
                "query_name": "a.test", "query_type": "A", "transport_protocol": transport,
                "validate_answer_rrs": {"fail_if_not_matches_regexp": ["192.0.2.1$"]},
            }));
            let (o, log) = run_with_log(&server.to_string(), &m).await;
            assert_eq!(o.failure_reason, Some(crate::probe::Reason::Regex), "{log}");
            assert_log_has(
                &log,
                &[
                    "msg=\"Beginning probe\" probe=dns",
                    &format!(
                        "msg=\"Making DNS query\" server={server} transport={transport} query_name=a.test query_type=A recursion_desired=true"
                    ),
                    "msg=\"Got DNS response\" rcode=NOERROR valid=true answer_rrs=2",
                    "msg=\"Got record\" section=answer rr=\"a.test.",
                    "192.0.2.1",
                    "msg=\"Validated the records against the regular expressions\" section=answer records=2 ok=false err=\"dns: answer record did not match",
                    "level=error msg=\"Probe failed\" reason=regex",
                ],
            );
            if transport == "tcp" {
                assert!(log.contains("msg=\"Successfully dialed\""), "{log}");
            }
        }
    }
}
