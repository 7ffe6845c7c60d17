//! Authenticated denial of existence: whether the NSEC or NSEC3 records of a negative
//! answer (NXDOMAIN, NODATA) prove what it says for the name and type asked (RFC 4035
//! §5.4 for NSEC, RFC 5155 §8 for NSEC3). Their signatures are checked elsewhere
//! ([`super::dnssec`]); a signed NSEC of the same zone for another name, replayed, proves
//! nothing, and this is where that shows.
//!
//! Pure functions over records already decoded; every input may be hostile. NSEC3 hashes
//! are bounded: more than [`MAX_NSEC3_ITERATIONS`] iterations are refused (RFC 9276 lets
//! a validator treat such zones as insecure; a probe says so instead of spending CPU).

use data_encoding::BASE32HEX_NOPAD;
use hickory_proto::dnssec::Nsec3HashAlgorithm;
use hickory_proto::dnssec::rdata::{DNSSECRData, NSEC, NSEC3};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// The most NSEC3 hash iterations a proof is checked with.
pub(crate) const MAX_NSEC3_ITERATIONS: u16 = 150;

/// What the reply claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// NXDOMAIN: the name does not exist.
    NoName,
    /// NOERROR with an empty answer: the name exists, the type does not.
    NoData,
}

/// Checks that `nsecs` (owner, record) prove `claim` for `qname` `qtype` in `zone`.
pub(crate) fn prove_with_nsec(
    claim: Claim,
    qname: &Name,
    qtype: RecordType,
    zone: &Name,
    nsecs: &[(Name, NSEC)],
) -> Result<(), String> {
    let in_zone: Vec<&(Name, NSEC)> = nsecs.iter().filter(|(o, _)| zone.zone_of(o)).collect();
    let lacks =
        |n: &NSEC| !n.type_set().contains(qtype) && !n.type_set().contains(RecordType::CNAME);
    let matching = |name: &Name| in_zone.iter().find(|(o, _)| o == name).map(|(_, n)| n);
    let covering = |name: &Name| {
        in_zone
            .iter()
            .find(|(o, n)| covers(o, n.next_domain_name(), name))
    };
    match claim {
        Claim::NoData => {
            if let Some(n) = matching(qname) {
                return if lacks(n) {
                    Ok(())
                } else {
                    Err(format!(
                        "the NSEC of {qname} lists {qtype}: the type exists, yet the answer is empty"
                    ))
                };
            }
            let (owner, n) = covering(qname).ok_or_else(|| {
                format!("no NSEC matches or covers {qname}: nothing proves {qtype} absent")
            })?;
            // An empty non-terminal: no NSEC of its own, but the next name is below it.
            if qname.zone_of(n.next_domain_name()) {
                return Ok(());
            }
            // A wildcard's NODATA: qname is covered, and the wildcard that would have
            // matched it lacks the type.
            let wildcard = wildcard_of(&closest_encloser(qname, owner, n.next_domain_name()))?;
            match matching(&wildcard) {
                Some(w) if lacks(w) => Ok(()),
                _ => Err(format!(
                    "no NSEC proves {qtype} absent at {qname} nor at the wildcard {wildcard}"
                )),
            }
        }
        Claim::NoName => {
            if matching(qname).is_some() {
                return Err(format!(
                    "an NSEC says {qname} exists, yet the answer is NXDOMAIN"
                ));
            }
            let (owner, n) = covering(qname)
                .ok_or_else(|| format!("no NSEC covers {qname}: nothing proves it absent"))?;
            if qname.zone_of(n.next_domain_name()) {
                return Err(format!(
                    "the NSEC covering {qname} leads to {}, below it: it exists, yet the answer is NXDOMAIN",
                    n.next_domain_name()
                ));
            }
            let wildcard = wildcard_of(&closest_encloser(qname, owner, n.next_domain_name()))?;
            if covering(&wildcard).is_some() {
                Ok(())
            } else {
                Err(format!(
                    "no NSEC covers the wildcard {wildcard}: it might have answered for {qname}"
                ))
            }
        }
    }
}

/// Checks that `nsec3s` (owner, record) prove `claim` for `qname` `qtype` in `zone`.
pub(crate) fn prove_with_nsec3(
    claim: Claim,
    qname: &Name,
    qtype: RecordType,
    zone: &Name,
    nsec3s: &[(Name, NSEC3)],
) -> Result<(), String> {
    if !zone.zone_of(qname) {
        return Err(format!(
            "{qname} is not in the zone {zone} of its NSEC3 records"
        ));
    }
    let Some((_, first)) = nsec3s.first() else {
        return Err("no NSEC3 record".into());
    };
    let (salt, iterations) = (first.salt().to_vec(), first.iterations());
    if first.hash_algorithm() != Nsec3HashAlgorithm::SHA1 {
        return Err("NSEC3 with a hash algorithm other than SHA-1".into());
    }
    if iterations > MAX_NSEC3_ITERATIONS {
        return Err(format!(
            "NSEC3 with {iterations} hash iterations, more than the {MAX_NSEC3_ITERATIONS} a validator checks (RFC 9276)"
        ));
    }
    // The zone's chain: records with its parameters, their owners' hashes decoded.
    let chain: Vec<(Vec<u8>, &NSEC3)> = nsec3s
        .iter()
        .filter(|(owner, n)| {
            n.hash_algorithm() == Nsec3HashAlgorithm::SHA1
                && n.iterations() == iterations
                && n.salt() == salt.as_slice()
                && owner.base_name() == *zone
        })
        .filter_map(|(owner, n)| Some((owner_hash(owner)?, n)))
        .collect();
    let hash = |name: &Name| -> Result<Vec<u8>, String> {
        Nsec3HashAlgorithm::SHA1
            .hash(&salt, name, iterations)
            .map(|d| d.as_ref().to_vec())
            .map_err(|e| format!("hashing {name}: {e}"))
    };
    let matching = |h: &[u8]| {
        chain
            .iter()
            .find(|(o, _)| o.as_slice() == h)
            .map(|(_, n)| *n)
    };
    let covering = |h: &[u8]| {
        chain
            .iter()
            .find(|(o, n)| covers_hash(o, n.next_hashed_owner_name(), h))
            .map(|(_, n)| *n)
    };
    let lacks =
        |n: &NSEC3| !n.type_set().contains(qtype) && !n.type_set().contains(RecordType::CNAME);
    // The closest encloser proof (RFC 5155 §7.2.1): the deepest ancestor of qname whose
    // hash matches, and the name one label below it toward qname, whose hash is covered.
    let closest_encloser_proof = || -> Result<(Name, &NSEC3), String> {
        let mut next_closer = qname.clone();
        let mut candidate = qname.base_name();
        loop {
            if matching(&hash(&candidate)?).is_some() {
                let cover = covering(&hash(&next_closer)?).ok_or_else(|| {
                    format!("no NSEC3 covers {next_closer}, the next closer name to {qname}")
                })?;
                return Ok((candidate, cover));
            }
            if candidate == *zone || candidate.is_root() {
                return Err(format!(
                    "no NSEC3 matches an ancestor of {qname} in {zone}: no closest encloser"
                ));
            }
            next_closer = candidate.clone();
            candidate = candidate.base_name();
        }
    };
    match claim {
        Claim::NoData => {
            if let Some(n) = matching(&hash(qname)?) {
                return if lacks(n) {
                    Ok(())
                } else {
                    Err(format!(
                        "the NSEC3 of {qname} lists {qtype}: the type exists, yet the answer is empty"
                    ))
                };
            }
            let (encloser, cover) = closest_encloser_proof()?;
            // A DS under an opt-out span: the delegation is unsigned (RFC 5155 §8.6).
            if qtype == RecordType::DS && cover.opt_out() {
                return Ok(());
            }
            let wildcard = wildcard_of(&encloser)?;
            match matching(&hash(&wildcard)?) {
                Some(w) if lacks(w) => Ok(()),
                _ => Err(format!(
                    "no NSEC3 proves {qtype} absent at {qname} nor at the wildcard {wildcard}"
                )),
            }
        }
        Claim::NoName => {
            if matching(&hash(qname)?).is_some() {
                return Err(format!(
                    "an NSEC3 says {qname} exists, yet the answer is NXDOMAIN"
                ));
            }
            let (encloser, _) = closest_encloser_proof()?;
            let wildcard = wildcard_of(&encloser)?;
            if covering(&hash(&wildcard)?).is_some() {
                Ok(())
            } else {
                Err(format!(
                    "no NSEC3 covers the wildcard {wildcard}: it might have answered for {qname}"
                ))
            }
        }
    }
}

/// Checks that the NSEC3 records among `records` (else the NSEC ones) prove the negative
/// answer `rcode` gave for `qname` `qtype` in `zone`.
pub(crate) fn prove<'a>(
    rcode: ResponseCode,
    qname: &Name,
    qtype: RecordType,
    zone: &Name,
    records: impl IntoIterator<Item = &'a Record>,
) -> Result<(), String> {
    let claim = if rcode == ResponseCode::NXDomain {
        Claim::NoName
    } else {
        Claim::NoData
    };
    let mut nsecs = Vec::new();
    let mut nsec3s = Vec::new();
    for r in records {
        match &r.data {
            RData::DNSSEC(DNSSECRData::NSEC(n)) => nsecs.push((r.name.clone(), n.clone())),
            RData::DNSSEC(DNSSECRData::NSEC3(n)) => nsec3s.push((r.name.clone(), n.clone())),
            _ => {}
        }
    }
    if nsec3s.is_empty() {
        prove_with_nsec(claim, qname, qtype, zone, &nsecs)
    } else {
        prove_with_nsec3(claim, qname, qtype, zone, &nsec3s)
    }
}

/// [`prove`] over a raw reply (the fuzz target's entry): its first question, its rcode,
/// its authority section, the zone of its first SOA (else the question's parent).
pub(crate) fn prove_from_reply(reply: &[u8]) -> Option<Result<(), String>> {
    let message = Message::from_vec(reply).ok()?;
    let query = message.queries.first()?;
    let (qname, qtype) = (query.name().clone(), query.query_type());
    let zone = message
        .authorities
        .iter()
        .find(|r| r.record_type() == RecordType::SOA)
        .map_or_else(|| qname.base_name(), |r| r.name.clone());
    Some(prove(
        message.metadata.response_code,
        &qname,
        qtype,
        &zone,
        &message.authorities,
    ))
}

/// True when the NSEC from `owner` to `next` covers `name`: it falls strictly between
/// them in canonical order (the last NSEC of a zone points back to its apex).
fn covers(owner: &Name, next: &Name, name: &Name) -> bool {
    if owner < next {
        owner < name && name < next
    } else {
        name > owner || name < next
    }
}

/// [`covers`] for NSEC3's hashed names, compared as bytes.
fn covers_hash(owner: &[u8], next: &[u8], hash: &[u8]) -> bool {
    if owner < next {
        owner < hash && hash < next
    } else {
        hash > owner || hash < next
    }
}

/// The hash an NSEC3 owner name carries in its first label (base32hex).
fn owner_hash(owner: &Name) -> Option<Vec<u8>> {
    let label = owner.iter().next()?;
    BASE32HEX_NOPAD.decode(&label.to_ascii_uppercase()).ok()
}

/// The closest encloser an NSEC covering `qname` shows: the deepest ancestor of `qname`
/// that `owner` or `next` (which exist) lies under.
fn closest_encloser(qname: &Name, owner: &Name, next: &Name) -> Name {
    let under = |other: &Name| {
        let mut n = qname.base_name();
        while !n.zone_of(other) && !n.is_root() {
            n = n.base_name();
        }
        n
    };
    let (a, b) = (under(owner), under(next));
    if a.num_labels() >= b.num_labels() {
        a
    } else {
        b
    }
}

fn wildcard_of(encloser: &Name) -> Result<Name, String> {
    encloser
        .prepend_label("*")
        .map_err(|e| format!("the wildcard of {encloser}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::dnssec::rdata::NSEC3;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn nsec(owner: &str, next: &str, types: &[RecordType]) -> (Name, NSEC) {
        (name(owner), NSEC::new(name(next), types.iter().copied()))
    }

    const ZONE: &str = "example.test.";

    /// The zone's names in canonical order: apex, a, m, c.sub (so sub is an empty
    /// non-terminal), *.w.
    fn chain() -> Vec<(Name, NSEC)> {
        use RecordType::*;
        vec![
            nsec(
                "example.test.",
                "a.example.test.",
                &[SOA, NS, RRSIG, NSEC, DNSKEY],
            ),
            nsec("a.example.test.", "m.example.test.", &[A, RRSIG, NSEC]),
            nsec(
                "m.example.test.",
                "c.sub.example.test.",
                &[TXT, RRSIG, NSEC],
            ),
            nsec(
                "c.sub.example.test.",
                "*.w.example.test.",
                &[A, RRSIG, NSEC],
            ),
            nsec("*.w.example.test.", "example.test.", &[A, RRSIG, NSEC]),
        ]
    }

    fn with_nsec(
        claim: Claim,
        q: &str,
        t: RecordType,
        records: &[(Name, NSEC)],
    ) -> Result<(), String> {
        prove_with_nsec(claim, &name(q), t, &name(ZONE), records)
    }

    #[test]
    fn nsec_proves_a_missing_name_and_its_wildcard() {
        let all = chain();
        // b sorts between a and m; its closest encloser is the apex, whose wildcard
        // *.example.test sorts between the apex and a.
        let proof = [all[1].clone(), all[0].clone()];
        assert_eq!(
            with_nsec(Claim::NoName, "b.example.test.", RecordType::A, &proof),
            Ok(())
        );
        // Without the NSEC covering the wildcard, a wildcard might have answered.
        let e =
            with_nsec(Claim::NoName, "b.example.test.", RecordType::A, &proof[..1]).unwrap_err();
        assert!(e.contains("*.example.test."), "{e}");
        // A signed NSEC for another gap proves nothing for b (a replay).
        let e = with_nsec(
            Claim::NoName,
            "b.example.test.",
            RecordType::A,
            &[all[3].clone(), all[0].clone()],
        )
        .unwrap_err();
        assert!(e.contains("no NSEC covers b.example.test."), "{e}");
        // A name the NSECs say exists is no NXDOMAIN.
        let e = with_nsec(Claim::NoName, "a.example.test.", RecordType::A, &all).unwrap_err();
        assert!(e.contains("exists"), "{e}");
        // The empty non-terminal sub exists: no NXDOMAIN for it.
        let e = with_nsec(Claim::NoName, "sub.example.test.", RecordType::A, &all).unwrap_err();
        assert!(e.contains("below it"), "{e}");
        // Below the wildcard *.w, a name would have matched it: no NXDOMAIN there.
        let e = with_nsec(Claim::NoName, "x.w.example.test.", RecordType::A, &all).unwrap_err();
        assert!(e.contains("*.w.example.test."), "{e}");
        // The last NSEC wraps around to the apex.
        assert_eq!(
            with_nsec(
                Claim::NoName,
                "zz.example.test.",
                RecordType::A,
                &[all[4].clone(), all[0].clone()]
            ),
            Ok(())
        );
    }

    #[test]
    fn nsec_proves_a_missing_type() {
        let all = chain();
        assert_eq!(
            with_nsec(Claim::NoData, "m.example.test.", RecordType::A, &all[2..3]),
            Ok(())
        );
        let e = with_nsec(
            Claim::NoData,
            "m.example.test.",
            RecordType::TXT,
            &all[2..3],
        )
        .unwrap_err();
        assert!(e.contains("lists TXT"), "{e}");
        // The empty non-terminal sub exists (c.sub is under it) with no type at all: the
        // NSEC covering it, whose next name is below it, proves that.
        assert_eq!(
            with_nsec(
                Claim::NoData,
                "sub.example.test.",
                RecordType::A,
                &all[2..3]
            ),
            Ok(())
        );
        // b does not exist: covering it proves no NODATA without a wildcard's NSEC.
        let e = with_nsec(Claim::NoData, "b.example.test.", RecordType::A, &all[1..2]).unwrap_err();
        assert!(e.contains("wildcard"), "{e}");
        // A wildcard's NODATA: x.w is covered, *.w lacks TXT.
        assert_eq!(
            with_nsec(
                Claim::NoData,
                "x.w.example.test.",
                RecordType::TXT,
                &[all[3].clone(), all[4].clone()]
            ),
            Ok(())
        );
        // Records of another zone count for nothing.
        let other = [nsec("m.other.test.", "z.other.test.", &[RecordType::TXT])];
        assert!(with_nsec(Claim::NoData, "m.example.test.", RecordType::A, &other).is_err());
    }

    /// NSEC3 records for the names of `names` (hashed with no salt, `iterations`), each
    /// pointing at the next hash, the last back at the first.
    fn nsec3_chain(
        names: &[(&str, &[RecordType])],
        iterations: u16,
        opt_out: bool,
    ) -> Vec<(Name, NSEC3)> {
        let mut hashed: Vec<(Vec<u8>, Vec<RecordType>)> = names
            .iter()
            .map(|(n, types)| {
                let h = Nsec3HashAlgorithm::SHA1
                    .hash(&[], &name(n), iterations)
                    .unwrap();
                (h.as_ref().to_vec(), types.to_vec())
            })
            .collect();
        hashed.sort();
        (0..hashed.len())
            .map(|i| {
                let (h, types) = &hashed[i];
                let next = hashed[(i + 1) % hashed.len()].0.clone();
                let owner = name(&format!(
                    "{}.{ZONE}",
                    BASE32HEX_NOPAD.encode(h).to_lowercase()
                ));
                let record = NSEC3::new(
                    Nsec3HashAlgorithm::SHA1,
                    opt_out,
                    iterations,
                    Vec::new(),
                    next,
                    types.iter().copied(),
                );
                (owner, record)
            })
            .collect()
    }

    fn with_nsec3(
        claim: Claim,
        q: &str,
        t: RecordType,
        records: &[(Name, NSEC3)],
    ) -> Result<(), String> {
        prove_with_nsec3(claim, &name(q), t, &name(ZONE), records)
    }

    #[test]
    fn nsec3_proves_a_missing_name_with_the_closest_encloser() {
        use RecordType::*;
        let zone: &[(&str, &[RecordType])] = &[
            ("example.test.", &[SOA, NS, DNSKEY]),
            ("a.example.test.", &[A]),
            ("m.example.test.", &[TXT]),
        ];
        let all = nsec3_chain(zone, 5, false);
        // The whole chain covers every other hash: the apex matches, b (next closer) and
        // *.example.test are covered.
        assert_eq!(
            with_nsec3(Claim::NoName, "b.example.test.", A, &all),
            Ok(())
        );
        assert_eq!(
            with_nsec3(Claim::NoName, "x.y.example.test.", A, &all),
            Ok(())
        );
        let e = with_nsec3(Claim::NoName, "a.example.test.", A, &all).unwrap_err();
        assert!(e.contains("exists"), "{e}");
        // Without the apex's own NSEC3 there is no closest encloser.
        let apex_hash = Nsec3HashAlgorithm::SHA1.hash(&[], &name(ZONE), 5).unwrap();
        let apex_owner = BASE32HEX_NOPAD.encode(apex_hash.as_ref()).to_lowercase();
        let without: Vec<_> = all
            .iter()
            .filter(|(o, _)| !o.to_ascii().starts_with(&apex_owner))
            .cloned()
            .collect();
        let e = with_nsec3(Claim::NoName, "b.example.test.", A, &without).unwrap_err();
        assert!(
            e.contains("closest encloser") || e.contains("covers"),
            "{e}"
        );
        // Another parameter set, or too many iterations, is refused.
        let costly = nsec3_chain(zone, 500, false);
        let e = with_nsec3(Claim::NoName, "b.example.test.", A, &costly).unwrap_err();
        assert!(e.contains("RFC 9276"), "{e}");
    }

    #[test]
    fn nsec3_proves_a_missing_type_and_an_opt_out_ds() {
        use RecordType::*;
        let zone: &[(&str, &[RecordType])] = &[
            ("example.test.", &[SOA, NS, DNSKEY]),
            ("m.example.test.", &[TXT]),
        ];
        let all = nsec3_chain(zone, 0, false);
        assert_eq!(
            with_nsec3(Claim::NoData, "m.example.test.", A, &all),
            Ok(())
        );
        let e = with_nsec3(Claim::NoData, "m.example.test.", TXT, &all).unwrap_err();
        assert!(e.contains("lists TXT"), "{e}");
        // An unsigned delegation under opt-out: its DS is proved absent by the covering span.
        let opted = nsec3_chain(zone, 0, true);
        assert_eq!(
            with_nsec3(Claim::NoData, "deleg.example.test.", DS, &opted),
            Ok(())
        );
        assert!(with_nsec3(Claim::NoData, "deleg.example.test.", DS, &all).is_err());
    }

    /// A reply to `q` `t` with `rcode`, its authority section the apex's SOA and `nsecs`
    /// or `nsec3s`, in wire form.
    fn reply_bytes(
        q: &str,
        t: RecordType,
        rcode: hickory_proto::op::ResponseCode,
        nsecs: &[(Name, NSEC)],
        nsec3s: &[(Name, NSEC3)],
    ) -> Vec<u8> {
        use hickory_proto::op::Query;
        use hickory_proto::rr::rdata::SOA;
        let mut m = Message::query();
        m.add_query(Query::query(name(q), t));
        m.metadata.response_code = rcode;
        let soa = SOA::new(
            name("ns.test."),
            name("admin.test."),
            1,
            3600,
            600,
            86400,
            300,
        );
        m.add_authority(Record::from_rdata(name(ZONE), 300, RData::SOA(soa)));
        for (owner, n) in nsecs {
            m.add_authority(Record::from_rdata(
                owner.clone(),
                300,
                RData::DNSSEC(DNSSECRData::NSEC(n.clone())),
            ));
        }
        for (owner, n) in nsec3s {
            m.add_authority(Record::from_rdata(
                owner.clone(),
                300,
                RData::DNSSEC(DNSSECRData::NSEC3(n.clone())),
            ));
        }
        m.to_vec().unwrap()
    }

    /// Whole replies as the fuzz target reads them; with `SONDE_FUZZ_SEEDS=DIR` set, they
    /// are written there as its seeds (`fuzz/corpus/dnssec_denial/`).
    #[test]
    fn whole_replies_are_read_as_the_prober_reads_them() {
        use RecordType::*;
        use hickory_proto::op::ResponseCode::{NXDomain, NoError};
        let all = chain();
        let n3 = nsec3_chain(
            &[
                ("example.test.", &[SOA, NS, DNSKEY]),
                ("m.example.test.", &[TXT]),
            ],
            1,
            false,
        );
        let cases = [
            (
                "nsec-nxdomain",
                reply_bytes(
                    "b.example.test.",
                    A,
                    NXDomain,
                    &[all[1].clone(), all[0].clone()],
                    &[],
                ),
                true,
            ),
            (
                "nsec-replayed",
                reply_bytes("b.example.test.", A, NXDomain, &[all[3].clone()], &[]),
                false,
            ),
            (
                "nsec-nodata",
                reply_bytes("m.example.test.", A, NoError, &all[2..3], &[]),
                true,
            ),
            (
                "nsec3-nxdomain",
                reply_bytes("b.example.test.", A, NXDomain, &[], &n3),
                true,
            ),
            (
                "nsec3-nodata",
                reply_bytes("m.example.test.", A, NoError, &[], &n3),
                true,
            ),
            (
                "nsec3-lies",
                reply_bytes("m.example.test.", A, NXDomain, &[], &n3),
                false,
            ),
        ];
        for (label, bytes, proved) in &cases {
            assert_eq!(
                prove_from_reply(bytes).map(|r| r.is_ok()),
                Some(*proved),
                "{label}"
            );
        }
        assert_eq!(prove_from_reply(b"not dns"), None);
        if let Some(dir) = std::env::var_os("SONDE_FUZZ_SEEDS") {
            for (label, bytes, _) in &cases {
                std::fs::write(
                    std::path::Path::new(&dir).join(format!("{label}.bin")),
                    bytes,
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn hostile_owner_names_are_ignored_not_trusted() {
        let mut all = nsec3_chain(&[("example.test.", &[RecordType::SOA])], 0, false);
        all[0].0 = name("zz-not-base32.example.test.");
        assert!(with_nsec3(Claim::NoName, "b.example.test.", RecordType::A, &all).is_err());
        assert!(with_nsec3(Claim::NoName, "b.other.test.", RecordType::A, &all).is_err());
    }
}
