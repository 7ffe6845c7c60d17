//! The dns prober's DNSSEC check: the chain of trust from a trust anchor down to the
//! answer, walked by the agent itself so that a failure names the link that broke.
//!
//! From the answer's RRSIG the signer zone is known; its DNSKEY set is asked for, then
//! its DS set in the parent, whose RRSIG names the parent zone, and so on up to a zone
//! with a trust anchor. Then each link is checked from the anchor down: the anchor
//! matches a DNSKEY of its zone, that key signs the zone's DNSKEY set, a DS signed by
//! the parent's keys matches a child DNSKEY that signs the child's DNSKEY set, ... and
//! a key of the signer zone signs the answer. Every record comes from the server the
//! probe asks (resolver or authoritative), with DO and CD set so that a resolver hands
//! over what it would refuse as bogus. The replies are hostile input: hickory decodes
//! them and verifies the signatures (ring), anything unexpected is a broken link.
//!
//! A negative answer (NXDOMAIN, NODATA) counts as validated when its SOA and NSEC or
//! NSEC3 records are signed along a valid chain and prove the name or type absent
//! ([`super::denial`]). A positive answer synthesised from a wildcard is taken on its
//! signature alone: the NSEC proving that the name asked does not exist is not checked.

use super::denial;
use hickory_proto::dnssec::rdata::{DNSKEY, DNSSECRData, DS, RRSIG};
use hickory_proto::dnssec::{
    Algorithm, DigestType, PublicKey, PublicKeyBuf, TrustAnchors, Verifier,
};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use sonde_proto::config::module::{AnchorKey, DnssecConfig, read_trust_anchors};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// What broke on a link of the chain: the word the failure reason starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Broken {
    /// Every RRSIG over the RRset has expired.
    ExpiredSignature,
    /// Every RRSIG over the RRset has an inception in the future.
    SignatureNotYetValid,
    /// The RRset comes without an RRSIG.
    MissingRrsig,
    /// The zone has no DNSKEY, or none with the key tag and algorithm of the RRSIG.
    MissingDnskey,
    /// The parent has no DS record for the zone: the delegation is unsigned.
    MissingDs,
    /// A signature does not verify, no DNSKEY matches the DS or the trust anchor, or the
    /// records contradict themselves.
    Bogus,
    /// The RRSIGs use an algorithm the agent cannot verify.
    UnsupportedAlgorithm,
    /// No trust anchor is at or above the zone.
    NoTrustAnchor,
    /// The server did not answer the query for the DNSKEY or DS records.
    QueryFailed,
}

impl Broken {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Broken::ExpiredSignature => "expired_signature",
            Broken::SignatureNotYetValid => "signature_not_yet_valid",
            Broken::MissingRrsig => "missing_rrsig",
            Broken::MissingDnskey => "missing_dnskey",
            Broken::MissingDs => "missing_ds",
            Broken::Bogus => "bogus",
            Broken::UnsupportedAlgorithm => "unsupported_algorithm",
            Broken::NoTrustAnchor => "no_trust_anchor",
            Broken::QueryFailed => "query_failed",
        }
    }
}

/// The link of the chain that did not validate: `<what> on <owner> <type>: <detail>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BrokenLink {
    pub kind: Broken,
    pub owner: Name,
    pub rtype: RecordType,
    pub detail: String,
}

impl fmt::Display for BrokenLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} {}: {}",
            self.kind.as_str(),
            self.owner,
            self.rtype,
            self.detail
        )
    }
}

fn broken(kind: Broken, owner: &Name, rtype: RecordType, detail: impl Into<String>) -> BrokenLink {
    BrokenLink {
        kind,
        owner: owner.clone(),
        rtype,
        detail: detail.into(),
    }
}

/// A trusted key of a zone.
#[derive(Clone, Debug)]
enum Anchor {
    Ds(DS),
    Key(PublicKeyBuf),
}

/// The trust anchors a probe validates against.
#[derive(Clone, Debug)]
pub(crate) struct Anchors(Vec<(Name, Anchor)>);

impl Anchors {
    /// The module's `trust_anchor_file`, or the IANA root KSKs built into hickory.
    pub(crate) fn load(cfg: &DnssecConfig) -> Result<Self, String> {
        let Some(path) = &cfg.trust_anchor_file else {
            let roots = TrustAnchors::default();
            return Ok(Self(
                (0..roots.len())
                    .filter_map(|i| roots.get(i))
                    .map(|key| (Name::root(), Anchor::Key(key.clone())))
                    .collect(),
            ));
        };
        let parsed = read_trust_anchors(Path::new(path)).map_err(|e| e.to_string())?;
        let mut anchors = Vec::with_capacity(parsed.len());
        for anchor in parsed {
            let zone = Name::from_ascii(&anchor.zone).map_err(|e| {
                format!(
                    "dns.dnssec.trust_anchor_file {path}: zone {:?}: {e}",
                    anchor.zone
                )
            })?;
            let key = match anchor.key {
                AnchorKey::Ds {
                    key_tag,
                    algorithm,
                    digest_type,
                    digest,
                } => Anchor::Ds(DS::new(
                    key_tag,
                    Algorithm::from_u8(algorithm),
                    DigestType::from(digest_type),
                    digest,
                )),
                AnchorKey::Dnskey {
                    flags: _,
                    algorithm,
                    public_key,
                } => Anchor::Key(PublicKeyBuf::new(public_key, Algorithm::from_u8(algorithm))),
            };
            anchors.push((zone, key));
        }
        Ok(Self(anchors))
    }

    fn at(&self, zone: &Name) -> impl Iterator<Item = &Anchor> {
        self.0
            .iter()
            .filter(move |(z, _)| z == zone)
            .map(|(_, a)| a)
    }

    fn has_zone(&self, zone: &Name) -> bool {
        self.at(zone).next().is_some()
    }

    /// True when some anchor's zone is `name` or one of its ancestors.
    fn cover(&self, name: &Name) -> bool {
        self.0.iter().any(|(zone, _)| zone.zone_of(name))
    }

    fn trusts(&self, zone: &Name, key: &DNSKEY) -> bool {
        self.at(zone).any(|anchor| match anchor {
            Anchor::Ds(ds) => ds_matches(ds, zone, key),
            Anchor::Key(trusted) => {
                trusted.algorithm() == key.algorithm()
                    && trusted.public_bytes() == key.public_key().public_bytes()
            }
        })
    }
}

fn ds_matches(ds: &DS, zone: &Name, key: &DNSKEY) -> bool {
    ds.algorithm() == key.algorithm()
        && key.calculate_key_tag().ok() == Some(ds.key_tag())
        && ds.covers(zone, key).unwrap_or(false)
}

/// Asks the probe's server for the records of one name and type (DO and CD set).
pub(crate) trait Fetch {
    fn fetch(
        &mut self,
        name: &Name,
        rtype: RecordType,
    ) -> impl Future<Output = Result<Message, String>> + Send;
}

/// What a validated chain tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Validated {
    /// The earliest expiration (unix seconds) of the RRSIGs the chain rests on.
    pub earliest_expiry: u64,
    /// The zones of the chain, from the trust anchor down.
    pub zones: Vec<Name>,
}

/// One RRset of a reply with its RRSIGs.
struct RrSet {
    owner: Name,
    rtype: RecordType,
    records: Vec<Record>,
    sigs: Vec<RRSIG>,
}

/// The RRsets of `records` of the types `keep` accepts, each with the RRSIGs over it.
fn rrsets(records: &[Record], keep: impl Fn(RecordType) -> bool) -> Vec<RrSet> {
    let mut sets: Vec<RrSet> = Vec::new();
    for record in records {
        let rtype = record.record_type();
        if rtype == RecordType::RRSIG || !keep(rtype) {
            continue;
        }
        match sets
            .iter_mut()
            .find(|s| s.rtype == rtype && s.owner == record.name)
        {
            Some(set) => set.records.push(record.clone()),
            None => sets.push(RrSet {
                owner: record.name.clone(),
                rtype,
                records: vec![record.clone()],
                sigs: Vec::new(),
            }),
        }
    }
    for record in records {
        if let RData::DNSSEC(DNSSECRData::RRSIG(sig)) = &record.data
            && let Some(set) = sets
                .iter_mut()
                .find(|s| s.rtype == sig.input().type_covered && s.owner == record.name)
        {
            set.sigs.push(sig.clone());
        }
    }
    sets
}

/// How one RRSIG fared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SigOutcome {
    Valid { expiration: u64 },
    Expired { expiration: u64 },
    NotYetValid { inception: u64 },
    NoKey { key_tag: u16 },
    Unsupported { algorithm: String },
    BadSignature { key_tag: u16 },
}

/// The verdict over an RRset from how each of its RRSIGs fared: valid when one is (until
/// the latest valid one expires), else the most telling failure: a signature out of date
/// before one that does not verify, before an algorithm the agent lacks, before a key
/// that is not there.
pub(crate) fn classify(outcomes: &[SigOutcome]) -> Result<u64, (Broken, String)> {
    if let Some(latest) = outcomes
        .iter()
        .filter_map(|o| match o {
            SigOutcome::Valid { expiration } => Some(*expiration),
            _ => None,
        })
        .max()
    {
        return Ok(latest);
    }
    let first = |want: fn(&SigOutcome) -> bool| outcomes.iter().find(|o| want(o));
    if let Some(SigOutcome::Expired { expiration }) =
        first(|o| matches!(o, SigOutcome::Expired { .. }))
    {
        return Err((
            Broken::ExpiredSignature,
            format!("the RRSIG expired at {}", dnssec_time(*expiration)),
        ));
    }
    if let Some(SigOutcome::NotYetValid { inception }) =
        first(|o| matches!(o, SigOutcome::NotYetValid { .. }))
    {
        return Err((
            Broken::SignatureNotYetValid,
            format!("the RRSIG is valid from {} only", dnssec_time(*inception)),
        ));
    }
    if let Some(SigOutcome::BadSignature { key_tag }) =
        first(|o| matches!(o, SigOutcome::BadSignature { .. }))
    {
        return Err((
            Broken::Bogus,
            format!("the RRSIG by key {key_tag} does not verify"),
        ));
    }
    if let Some(SigOutcome::Unsupported { algorithm }) =
        first(|o| matches!(o, SigOutcome::Unsupported { .. }))
    {
        return Err((
            Broken::UnsupportedAlgorithm,
            format!("the RRSIG uses algorithm {algorithm}, which the agent cannot verify"),
        ));
    }
    if let Some(SigOutcome::NoKey { key_tag }) = first(|o| matches!(o, SigOutcome::NoKey { .. })) {
        return Err((
            Broken::MissingDnskey,
            format!("no trusted DNSKEY with key tag {key_tag} signs it"),
        ));
    }
    Err((Broken::MissingRrsig, "no RRSIG covers it".to_string()))
}

/// A time as DNSSEC writes it (RRSIG presentation format, UTC): `YYYYMMDDHHmmSS`.
pub(crate) fn dnssec_time(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// How each RRSIG of `set` made by `signer` fares with `keys` at `now`.
fn sig_outcomes(set: &RrSet, signer: &Name, keys: &[DNSKEY], now: u64) -> Vec<SigOutcome> {
    let mut outcomes = Vec::new();
    for sig in set.sigs.iter().filter(|s| &s.input().signer_name == signer) {
        let input = sig.input();
        let expiration = u64::from(input.sig_expiration.get());
        let inception = u64::from(input.sig_inception.get());
        if now > expiration {
            outcomes.push(SigOutcome::Expired { expiration });
            continue;
        }
        if now < inception {
            outcomes.push(SigOutcome::NotYetValid { inception });
            continue;
        }
        if !input.algorithm.is_supported() {
            outcomes.push(SigOutcome::Unsupported {
                algorithm: input.algorithm.to_string(),
            });
            continue;
        }
        let mut candidates = keys.iter().filter(|k| {
            k.algorithm() == input.algorithm && k.calculate_key_tag().ok() == Some(input.key_tag)
        });
        let Some(first) = candidates.next() else {
            outcomes.push(SigOutcome::NoKey {
                key_tag: input.key_tag,
            });
            continue;
        };
        let verifies = |key: &DNSKEY| {
            key.verify_rrsig(
                &set.owner,
                set.records.first().map_or(DNSClass::IN, |r| r.dns_class),
                sig,
                set.records.iter(),
            )
            .is_ok()
        };
        if verifies(first) || candidates.any(verifies) {
            outcomes.push(SigOutcome::Valid { expiration });
        } else {
            outcomes.push(SigOutcome::BadSignature {
                key_tag: input.key_tag,
            });
        }
    }
    outcomes
}

/// The signer zone of an RRset: the one its RRSIGs name, which must be the owner or
/// above it.
fn signer_of(set: &RrSet) -> Result<Name, BrokenLink> {
    let Some(sig) = set.sigs.first() else {
        return Err(broken(
            Broken::MissingRrsig,
            &set.owner,
            set.rtype,
            "the records come without an RRSIG",
        ));
    };
    let signer = &sig.input().signer_name;
    if !signer.zone_of(&set.owner) {
        return Err(broken(
            Broken::Bogus,
            &set.owner,
            set.rtype,
            format!("the RRSIG's signer {signer} is not the name or above it"),
        ));
    }
    Ok(signer.clone())
}

/// A zone's records as fetched on the way up, checked on the way down.
struct ZoneLink {
    zone: Name,
    dnskeys: RrSet,
    /// The zone's DS set in its parent and the parent; `None` for an anchored zone.
    ds: Option<(RrSet, Name)>,
}

/// Walks and checks chains of trust for one probe, remembering the zones already
/// validated.
pub(crate) struct Chain<'a, F> {
    anchors: &'a Anchors,
    now: u64,
    fetch: F,
    keys: HashMap<Name, Vec<DNSKEY>>,
    earliest: Option<u64>,
    zones: Vec<Name>,
}

impl<'a, F: Fetch> Chain<'a, F> {
    pub(crate) fn new(anchors: &'a Anchors, now: u64, fetch: F) -> Self {
        Self {
            anchors,
            now,
            fetch,
            keys: HashMap::new(),
            earliest: None,
            zones: Vec::new(),
        }
    }

    fn note_expiry(&mut self, expiration: u64) {
        self.earliest = Some(self.earliest.map_or(expiration, |e| e.min(expiration)));
    }

    /// Checks the RRSIGs of `set` made by `signer` with `keys`, noting the expiry of the
    /// valid ones, or of expired ones when none is valid: a chain broken by an expired
    /// signature tells when it expired.
    fn verify(&mut self, set: &RrSet, signer: &Name, keys: &[DNSKEY]) -> Result<(), BrokenLink> {
        let outcomes = sig_outcomes(set, signer, keys, self.now);
        match classify(&outcomes) {
            Ok(expiration) => {
                self.note_expiry(expiration);
                Ok(())
            }
            Err((kind, detail)) => {
                if let Some(expired) = outcomes
                    .iter()
                    .filter_map(|o| match o {
                        SigOutcome::Expired { expiration } => Some(*expiration),
                        _ => None,
                    })
                    .max()
                {
                    self.note_expiry(expired);
                }
                Err(broken(kind, &set.owner, set.rtype, detail))
            }
        }
    }

    /// The earliest expiry of the RRSIGs validated so far, even when a later link broke.
    pub(crate) fn earliest_expiry(&self) -> Option<u64> {
        self.earliest
    }

    /// Validates the reply to the probe's query for `qname` `qtype`.
    pub(crate) async fn validate(
        &mut self,
        reply: &Message,
        qname: &Name,
        qtype: RecordType,
    ) -> Result<Validated, BrokenLink> {
        let sets = if reply.answers.is_empty() {
            let sets = rrsets(&reply.authorities, |t| {
                matches!(t, RecordType::SOA | RecordType::NSEC | RecordType::NSEC3)
            });
            if !sets
                .iter()
                .any(|s| matches!(s.rtype, RecordType::NSEC | RecordType::NSEC3))
            {
                return Err(broken(
                    Broken::Bogus,
                    qname,
                    qtype,
                    "the answer is empty and no NSEC or NSEC3 record proves the name or type absent",
                ));
            }
            sets
        } else {
            rrsets(&reply.answers, |_| true)
        };
        let mut denial_zone = None;
        for set in &sets {
            let signer = signer_of(set)?;
            let keys = self.zone_keys(&signer).await?;
            self.verify(set, &signer, &keys)?;
            if matches!(set.rtype, RecordType::NSEC | RecordType::NSEC3) {
                denial_zone = Some(signer);
            }
        }
        if let Some(zone) = denial_zone {
            // The proof keeps only the records of the zone that signed them.
            let records = sets.iter().flat_map(|s| &s.records);
            denial::prove(reply.metadata.response_code, qname, qtype, &zone, records)
                .map_err(|detail| broken(Broken::Bogus, qname, qtype, detail))?;
        }
        Ok(Validated {
            earliest_expiry: self.earliest.unwrap_or(0),
            zones: self.zones.clone(),
        })
    }

    /// The validated DNSKEYs of `zone`: its links fetched up to an anchored or already
    /// validated zone, then checked from there down.
    async fn zone_keys(&mut self, zone: &Name) -> Result<Vec<DNSKEY>, BrokenLink> {
        if let Some(keys) = self.keys.get(zone) {
            return Ok(keys.clone());
        }
        let mut links: Vec<ZoneLink> = Vec::new();
        let mut current = zone.clone();
        // Each step goes to a proper ancestor, so the walk ends within the name's labels.
        loop {
            if !self.anchors.cover(&current) {
                return Err(broken(
                    Broken::NoTrustAnchor,
                    &current,
                    RecordType::DNSKEY,
                    "no trust anchor is at or above this zone; add one to dns.dnssec.trust_anchor_file",
                ));
            }
            let dnskeys = self.fetch_set(&current, RecordType::DNSKEY).await?;
            if dnskeys.records.is_empty() {
                return Err(broken(
                    Broken::MissingDnskey,
                    &current,
                    RecordType::DNSKEY,
                    "the zone has no DNSKEY records",
                ));
            }
            if self.anchors.has_zone(&current) {
                links.push(ZoneLink {
                    zone: current,
                    dnskeys,
                    ds: None,
                });
                break;
            }
            let ds = self.fetch_set(&current, RecordType::DS).await?;
            if ds.records.is_empty() {
                return Err(broken(
                    Broken::MissingDs,
                    &current,
                    RecordType::DS,
                    "the parent zone has no DS record for it (an unsigned delegation)",
                ));
            }
            let parent = signer_of(&ds)?;
            if parent == current {
                return Err(broken(
                    Broken::Bogus,
                    &current,
                    RecordType::DS,
                    "the DS records are signed by the zone itself, not its parent",
                ));
            }
            let known = self.keys.contains_key(&parent);
            links.push(ZoneLink {
                zone: current,
                dnskeys,
                ds: Some((ds, parent.clone())),
            });
            if known {
                break;
            }
            current = parent;
        }
        let mut keys = Vec::new();
        for link in links.into_iter().rev() {
            keys = self.check_link(link)?;
        }
        Ok(keys)
    }

    /// One zone's link, its parent (or anchor) already trusted: returns its zone keys.
    fn check_link(&mut self, link: ZoneLink) -> Result<Vec<DNSKEY>, BrokenLink> {
        let zone = &link.zone;
        let all: Vec<DNSKEY> = link
            .dnskeys
            .records
            .iter()
            .filter_map(|r| match &r.data {
                RData::DNSSEC(DNSSECRData::DNSKEY(key)) => Some(key.clone()),
                _ => None,
            })
            .collect();
        let entry: Vec<DNSKEY> = match &link.ds {
            None => {
                let entry: Vec<DNSKEY> = all
                    .iter()
                    .filter(|k| self.anchors.trusts(zone, k))
                    .cloned()
                    .collect();
                if entry.is_empty() {
                    return Err(broken(
                        Broken::Bogus,
                        zone,
                        RecordType::DNSKEY,
                        format!(
                            "no DNSKEY of the zone (key tags {}) matches its trust anchor",
                            key_tags(&all)
                        ),
                    ));
                }
                entry
            }
            Some((ds_set, parent)) => {
                let parent_keys = self.keys.get(parent).cloned().unwrap_or_default();
                self.verify(ds_set, parent, &parent_keys)?;
                let ds: Vec<&DS> = ds_set
                    .records
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::DNSSEC(DNSSECRData::DS(ds)) => Some(ds),
                        _ => None,
                    })
                    .collect();
                let entry: Vec<DNSKEY> = all
                    .iter()
                    .filter(|k| ds.iter().any(|d| ds_matches(d, zone, k)))
                    .cloned()
                    .collect();
                if entry.is_empty() {
                    let tags: Vec<String> = ds.iter().map(|d| d.key_tag().to_string()).collect();
                    return Err(broken(
                        Broken::Bogus,
                        zone,
                        RecordType::DNSKEY,
                        format!(
                            "no DNSKEY of the zone (key tags {}) matches a DS record in {parent} (key tags {})",
                            key_tags(&all),
                            tags.join(", ")
                        ),
                    ));
                }
                entry
            }
        };
        self.verify(&link.dnskeys, zone, &entry)?;
        let zone_keys: Vec<DNSKEY> = all
            .into_iter()
            .filter(|k| k.zone_key() && !k.revoke())
            .collect();
        self.keys.insert(zone.clone(), zone_keys.clone());
        self.zones.push(zone.clone());
        Ok(zone_keys)
    }

    /// The RRset of `name` `rtype` from the server: empty for NXDOMAIN or NODATA.
    async fn fetch_set(&mut self, name: &Name, rtype: RecordType) -> Result<RrSet, BrokenLink> {
        let reply = self
            .fetch
            .fetch(name, rtype)
            .await
            .map_err(|e| broken(Broken::QueryFailed, name, rtype, e))?;
        let code = reply.metadata.response_code;
        if code != ResponseCode::NoError && code != ResponseCode::NXDomain {
            return Err(broken(
                Broken::QueryFailed,
                name,
                rtype,
                format!("the server answered {code}"),
            ));
        }
        let mut sets = rrsets(&reply.answers, |t| t == rtype);
        let found = sets.iter().position(|s| &s.owner == name);
        Ok(match found {
            Some(at) => sets.swap_remove(at),
            None => RrSet {
                owner: name.clone(),
                rtype,
                records: Vec::new(),
                sigs: Vec::new(),
            },
        })
    }
}

fn key_tags(keys: &[DNSKEY]) -> String {
    let tags: Vec<String> = keys
        .iter()
        .filter_map(|k| k.calculate_key_tag().ok())
        .map(|t| t.to_string())
        .collect();
    tags.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_signature_wins_and_the_latest_counts() {
        let outcomes = [
            SigOutcome::Expired { expiration: 10 },
            SigOutcome::Valid { expiration: 200 },
            SigOutcome::Valid { expiration: 300 },
            SigOutcome::BadSignature { key_tag: 1 },
        ];
        assert_eq!(classify(&outcomes), Ok(300));
    }

    #[test]
    fn failures_are_classified_by_what_tells_most() {
        let cases: [(&[SigOutcome], Broken, &str); 6] = [
            (
                &[
                    SigOutcome::NoKey { key_tag: 7 },
                    SigOutcome::Expired {
                        expiration: 1_700_000_000,
                    },
                ],
                Broken::ExpiredSignature,
                "the RRSIG expired at 20231114221320",
            ),
            (
                &[
                    SigOutcome::BadSignature { key_tag: 9 },
                    SigOutcome::NotYetValid {
                        inception: 4_000_000_000,
                    },
                ],
                Broken::SignatureNotYetValid,
                "the RRSIG is valid from 20961002070640 only",
            ),
            (
                &[
                    SigOutcome::NoKey { key_tag: 7 },
                    SigOutcome::BadSignature { key_tag: 9 },
                ],
                Broken::Bogus,
                "the RRSIG by key 9 does not verify",
            ),
            (
                &[
                    SigOutcome::NoKey { key_tag: 7 },
                    SigOutcome::Unsupported {
                        algorithm: "RSAMD5".into(),
                    },
                ],
                Broken::UnsupportedAlgorithm,
                "the RRSIG uses algorithm RSAMD5, which the agent cannot verify",
            ),
            (
                &[SigOutcome::NoKey { key_tag: 7 }],
                Broken::MissingDnskey,
                "no trusted DNSKEY with key tag 7 signs it",
            ),
            (&[], Broken::MissingRrsig, "no RRSIG covers it"),
        ];
        for (outcomes, kind, detail) in cases {
            assert_eq!(
                classify(outcomes),
                Err((kind, detail.to_string())),
                "{outcomes:?}"
            );
        }
    }

    #[test]
    fn times_are_written_as_rrsigs_write_them() {
        assert_eq!(dnssec_time(0), "19700101000000");
        assert_eq!(dnssec_time(951_782_400), "20000229000000");
        assert_eq!(dnssec_time(4_294_967_295), "21060207062815");
    }

    #[test]
    fn broken_links_name_the_zone_and_type() {
        let link = broken(
            Broken::ExpiredSignature,
            &Name::from_ascii("example.test.").unwrap(),
            RecordType::DNSKEY,
            "the RRSIG expired at 20200101000000",
        );
        assert_eq!(
            link.to_string(),
            "expired_signature on example.test. DNSKEY: the RRSIG expired at 20200101000000"
        );
    }

    /// A server that answers every DNSKEY and DS query with an empty NOERROR.
    struct EmptyServer(Vec<(Name, RecordType)>);

    impl Fetch for EmptyServer {
        async fn fetch(&mut self, name: &Name, rtype: RecordType) -> Result<Message, String> {
            self.0.push((name.clone(), rtype));
            Ok(Message::query())
        }
    }

    /// A reply with `www.ok.test. A` signed (with a signature of nothing) by `signer`.
    fn signed_reply(signer: &str) -> Message {
        use hickory_proto::dnssec::rdata::sig::SigInput;
        use hickory_proto::rr::SerialNumber;
        use hickory_proto::rr::rdata::A;
        let owner = Name::from_ascii("www.ok.test.").unwrap();
        let mut reply = Message::query();
        reply.add_answer(Record::from_rdata(
            owner.clone(),
            300,
            RData::A(A::new(192, 0, 2, 10)),
        ));
        let input = SigInput {
            type_covered: RecordType::A,
            algorithm: Algorithm::ECDSAP256SHA256,
            num_labels: 3,
            original_ttl: 300,
            sig_expiration: SerialNumber::new(2_000_000_000),
            sig_inception: SerialNumber::new(1_000_000_000),
            key_tag: 1,
            signer_name: Name::from_ascii(signer).unwrap(),
        };
        reply.add_answer(Record::from_rdata(
            owner,
            300,
            RData::DNSSEC(DNSSECRData::RRSIG(RRSIG::from_sig(input, Vec::new()))),
        ));
        reply
    }

    #[tokio::test]
    async fn hostile_or_empty_answers_break_a_named_link() {
        let test_anchor = Anchors(vec![(
            Name::from_ascii("test.").unwrap(),
            Anchor::Key(PublicKeyBuf::new(vec![1; 64], Algorithm::ECDSAP256SHA256)),
        )]);
        async fn check(
            reply: Message,
            anchors: Anchors,
        ) -> (Result<(), String>, Vec<(Name, RecordType)>) {
            let qname = Name::from_ascii("www.ok.test.").unwrap();
            let mut chain = Chain::new(&anchors, 1_500_000_000, EmptyServer(Vec::new()));
            let result = chain.validate(&reply, &qname, RecordType::A).await;
            (result.map(|_| ()).map_err(|l| l.to_string()), chain.fetch.0)
        }
        // The zone serves no DNSKEY: asked once, for the signer.
        let (result, asked) = check(signed_reply("ok.test."), test_anchor.clone()).await;
        assert_eq!(
            result,
            Err("missing_dnskey on ok.test. DNSKEY: the zone has no DNSKEY records".into())
        );
        assert_eq!(
            asked,
            [(Name::from_ascii("ok.test.").unwrap(), RecordType::DNSKEY)]
        );
        // A signer that is not the name or above it: nothing is asked.
        let (result, asked) = check(signed_reply("example."), test_anchor.clone()).await;
        assert_eq!(
            result,
            Err(
                "bogus on www.ok.test. A: the RRSIG's signer example. is not the name or above it"
                    .into()
            )
        );
        assert!(asked.is_empty());
        // No anchor at or above the signer.
        let elsewhere = Anchors(vec![(
            Name::from_ascii("other.").unwrap(),
            test_anchor.0[0].1.clone(),
        )]);
        let (result, _) = check(signed_reply("ok.test."), elsewhere).await;
        assert!(
            result
                .unwrap_err()
                .starts_with("no_trust_anchor on ok.test. DNSKEY")
        );
        // Unsigned records, and an empty answer without NSEC.
        let mut unsigned = signed_reply("ok.test.");
        unsigned.answers.truncate(1);
        let (result, _) = check(unsigned, test_anchor.clone()).await;
        assert_eq!(
            result,
            Err("missing_rrsig on www.ok.test. A: the records come without an RRSIG".into())
        );
        let (result, _) = check(Message::query(), test_anchor).await;
        assert!(
            result
                .unwrap_err()
                .starts_with("bogus on www.ok.test. A: the answer is empty")
        );
    }

    #[test]
    fn without_a_file_the_iana_root_keys_are_trusted() {
        let anchors = Anchors::load(&DnssecConfig {
            validate: true,
            trust_anchor_file: None,
        })
        .unwrap();
        assert_eq!(anchors.0.len(), 2);
        assert!(anchors.cover(&Name::from_ascii("example.com.").unwrap()));
        assert!(anchors.has_zone(&Name::root()));
    }

    #[test]
    fn a_ds_anchor_trusts_the_key_it_digests() {
        // test.'s key and DS as dnssec-keygen and dnssec-dsfromkey wrote them.
        let key_line = "test. IN DNSKEY 257 3 13 ADRU/WnvLOwtB/KoIuGra9FFEPSLnqQUv6vxKbv/a7GI8FttFMWmnjXJ 3o8aEUsOVOfp3USV2Fm2IZgso0zQPQ==";
        let ds_line = "test. IN DS 65362 13 2 A2B6A59F1CB3A89218AC512277A2A104923BCAF589656B2C0FD1FB258261E12F";
        let dir = std::env::temp_dir().join(format!("sonde-dnssec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("anchor.ds");
        std::fs::write(&file, ds_line).unwrap();
        let anchors = Anchors::load(&DnssecConfig {
            validate: true,
            trust_anchor_file: Some(file.display().to_string()),
        })
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let AnchorKey::Dnskey {
            flags,
            algorithm,
            public_key,
        } = sonde_proto::config::module::parse_trust_anchors(key_line).unwrap()[0]
            .key
            .clone()
        else {
            panic!("a DNSKEY")
        };
        let key = DNSKEY::with_flags(
            flags,
            PublicKeyBuf::new(public_key.clone(), Algorithm::from_u8(algorithm)),
        );
        let test = Name::from_ascii("test.").unwrap();
        assert_eq!(key.calculate_key_tag().unwrap(), 65362);
        assert!(anchors.trusts(&test, &key));
        assert!(!anchors.trusts(&Name::from_ascii("other.").unwrap(), &key));
        let mut tampered = public_key;
        tampered[0] ^= 1;
        let other = DNSKEY::with_flags(
            flags,
            PublicKeyBuf::new(tampered, Algorithm::from_u8(algorithm)),
        );
        assert!(!anchors.trusts(&test, &other));
        assert!(!anchors.cover(&Name::from_ascii("example.com.").unwrap()));
        assert!(anchors.cover(&Name::from_ascii("www.ok.test.").unwrap()));
    }
}
