//! Entry points for the fuzz targets in `fuzz/`: each runs one decoder of what a probed
//! target sends (a DNS reply, an HTTP body, a certificate chain) the way the prober runs
//! it, without a network. Not part of the agent's API; kept here so that the decoders
//! stay private to the probers.

use super::http::body::BodyRead;
use super::http::checks::body_regex_failure;
use super::http::decode::{Algorithm, Body};
use super::http::last_modified;
use super::tls_samples::TlsFacts;
use super::x509;
use super::{Because, Env, Failure, ProbeContext, Reason, Samples};
use rustls::pki_types::CertificateDer;
use sonde_proto::config::Module;
use sonde_proto::config::module::HttpProbe;

/// What [`http_body`] read.
#[derive(Debug)]
pub struct BodyOutcome {
    /// Bytes after decompression.
    pub total: u64,
    pub kept: usize,
    pub truncated: bool,
    /// Why the body could not be read to its end.
    pub error: Option<String>,
    /// The body regexes' verdict (`Ok(None)`: the body passes).
    pub regex: Result<Option<String>, Failure>,
}

/// Reads `chunks` (the body as it comes off the wire) as the http prober does with
/// `module`'s `compression`, `body_size_limit` and body regexes.
pub fn http_body<'a>(
    ctx: &ProbeContext,
    module: &Module,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<BodyOutcome, Failure> {
    let cfg: &HttpProbe = &module.http;
    let algorithm = Algorithm::from_config(&cfg.compression).because(Reason::Config)?;
    let mut body = Body::new(
        algorithm,
        HttpProbe::MAX_MATCHED_BODY,
        cfg.body_size_limit.0,
    );
    let mut error = None;
    for chunk in chunks {
        if let Err(e) = body.write(chunk) {
            error = Some(format!("{e:?}"));
            break;
        }
    }
    let (sink, finish_error) = body.finish();
    if error.is_none() {
        error = finish_error.map(|e| format!("{e:?}"));
    }
    let read = BodyRead {
        truncated: sink.truncated,
        kept: sink.kept,
    };
    let env = Env {
        ctx,
        policy: None,
        pinned: None,
    };
    let regex = body_regex_failure(&env, cfg, &read, &mut super::ProbeLog::default())
        .map(|found| found.map(|(why, _)| why))
        .because(Reason::Config);
    Ok(BodyOutcome {
        total: sink.total,
        kept: read.kept.len(),
        truncated: read.truncated,
        error,
        regex,
    })
}

/// A `Last-Modified` header's value as the http prober reads it (Unix seconds).
pub fn http_date(value: &str) -> Option<i64> {
    last_modified(value)
}

/// Checks a DNS reply against `module`'s dns settings as the dns prober does after the
/// exchange (section counts, SOA serial, rcode, record regexes).
pub fn dns_reply(
    ctx: &ProbeContext,
    module: &Module,
    reply: &[u8],
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.dns;
    let qtype = cfg
        .query_type_code()
        .ok_or_else(|| Failure::new(Reason::Config, "bad query_type"))?;
    let valid_rcodes = cfg.valid_rcode_codes().because(Reason::Config)?;
    super::dns::read_reply(ctx, cfg, qtype, &valid_rcodes, reply, out)
}

/// Checks the NSEC and NSEC3 records in a DNS reply's authority section as the dns
/// prober's DNSSEC validation does once their signatures are verified: whether they prove
/// the reply's NXDOMAIN or NODATA for its first question, in the zone of the first SOA
/// (else the question's parent). `None` when `reply` is no DNS message with a question.
pub fn dnssec_denial(reply: &[u8]) -> Option<Result<(), String>> {
    super::dns::denial::prove_from_reply(reply)
}

/// The samples a TLS prober derives from a presented certificate chain (`presented`,
/// leaf first) when the handshake failed verification, plus the verified-chain expiry
/// against `roots`, and every certificate's names as the leaf's would be written.
pub fn certificates(
    ctx: &ProbeContext,
    presented: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    out: &mut Samples,
) -> Option<i64> {
    TlsFacts::from_certs(ctx, presented).record_unverified(out);
    let parsed: Vec<x509::Cert<'_>> = presented
        .iter()
        .filter_map(|c| x509::Cert::parse(c))
        .collect();
    let roots: Vec<x509::Cert<'_>> = roots.iter().filter_map(|c| x509::Cert::parse(c)).collect();
    for cert in parsed.iter().chain(&roots) {
        let _ = cert.subject();
        let _ = cert.issuer();
        let _ = cert.dns_names();
        let _ = cert.serial_hex();
    }
    x509::chain_expiry(&parsed, &roots)
}

/// What the icmp prober makes of one packet read from its socket: whether it is the
/// reply to the echo request `id`/`seq` with `data` (for a datagram socket, a raw IPv4
/// socket with the IP header, or a raw IPv6 one, by `framing` 0, 1, 2), and the hop
/// limit found in `control` (the packet's control messages).
pub fn icmp_reply(
    framing: u8,
    v4: bool,
    id: u16,
    seq: u16,
    data: &[u8],
    packet: &[u8],
    control: &[u8],
) -> (bool, Option<u8>) {
    use super::icmp::{Echo, Framing, hop_limit, is_reply};
    let framing = match framing % 3 {
        0 => Framing::Datagram,
        1 => Framing::RawV4,
        _ => Framing::RawV6,
    };
    let echo = Echo {
        id,
        seq,
        data: data.to_vec(),
    };
    (is_reply(packet, framing, v4, &echo), hop_limit(control))
}
