//! The dns prober's `dnssec:` options and the trust anchors they name.
//!
//! A trust anchor file holds DS or DNSKEY records in zone-file presentation format, the
//! form of unbound's `root.key` (`unbound-anchor`), of `dnssec-dsfromkey`'s output and of
//! a zone's `.key` files: `owner [ttl] [class] DS|DNSKEY rdata`, `;` comments, records
//! spread over lines inside `( )`. The file is trusted config: it is parsed here, at
//! load, into plain data that the agent turns into keys.

use super::ModuleError;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `dns.dnssec`: check the answer's chain of trust.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnssecConfig {
    /// Ask for DNSSEC records (EDNS DO bit), report the resolver's AD flag, and validate
    /// the chain of trust from a trust anchor down to the answer.
    #[serde(default)]
    pub validate: bool,
    /// DS or DNSKEY records to trust; unset: the IANA root zone's KSKs (key tags 20326
    /// and 38696), built into the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_anchor_file: Option<String>,
}

impl DnssecConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the options and reads the trust anchor file, so that a missing or
    /// malformed file is found when the config is loaded rather than at every probe.
    pub fn validate(&self) -> Result<(), ModuleError> {
        match &self.trust_anchor_file {
            Some(_) if !self.validate => Err(ModuleError::DnssecAnchorWithoutValidate),
            Some(path) => read_trust_anchors(Path::new(path))
                .map(drop)
                .map_err(ModuleError::TrustAnchor),
            None => Ok(()),
        }
    }
}

/// A trusted key of a zone, as a DS (a digest of the key) or the DNSKEY itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustAnchor {
    /// The zone, lowercase and fully qualified (`.`, `example.com.`).
    pub zone: String,
    pub key: AnchorKey,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnchorKey {
    Ds {
        key_tag: u16,
        algorithm: u8,
        digest_type: u8,
        digest: Vec<u8>,
    },
    Dnskey {
        flags: u16,
        algorithm: u8,
        public_key: Vec<u8>,
    },
}

/// Why a trust anchor file cannot be used; says which file, which line and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrustAnchorError {
    #[error(
        "dns.dnssec.trust_anchor_file: cannot read {path}: {error}; give a file of DS or DNSKEY records, or drop the option to use the IANA root anchors"
    )]
    Read { path: String, error: String },
    #[error(
        "dns.dnssec.trust_anchor_file {path}:{line}: {message}; write DS or DNSKEY records in zone-file form, like `. IN DS 20326 8 2 E06D44B8...` or `example. IN DNSKEY 257 3 13 <base64>`"
    )]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error(
        "dns.dnssec.trust_anchor_file {path}: no DS or DNSKEY record in the file; write at least one, or drop the option to use the IANA root anchors"
    )]
    Empty { path: String },
}

/// Reads and parses a trust anchor file.
pub fn read_trust_anchors(path: &Path) -> Result<Vec<TrustAnchor>, TrustAnchorError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| TrustAnchorError::Read {
        path: shown.clone(),
        error: e.to_string(),
    })?;
    let anchors =
        parse_trust_anchors(&text).map_err(|(line, message)| TrustAnchorError::Parse {
            path: shown.clone(),
            line,
            message,
        })?;
    if anchors.is_empty() {
        return Err(TrustAnchorError::Empty { path: shown });
    }
    Ok(anchors)
}

/// A record's first line (1-based) and its tokens.
type LineTokens<'a> = (usize, Vec<&'a str>);

/// The line (1-based) of the record at fault and what is wrong with it.
pub type LineError = (usize, String);

/// The records of a trust anchor file's text.
pub fn parse_trust_anchors(text: &str) -> Result<Vec<TrustAnchor>, LineError> {
    let mut anchors = Vec::new();
    for (line, tokens) in records(text)? {
        if tokens[0].starts_with('$') {
            // $TTL says nothing about trust; $ORIGIN and $INCLUDE would make a record
            // mean something other than what its line says.
            if tokens[0].eq_ignore_ascii_case("$TTL") {
                continue;
            }
            return Err((
                line,
                format!(
                    "directive {} is not supported in a trust anchor file",
                    tokens[0]
                ),
            ));
        }
        anchors.push(parse_record(&tokens).map_err(|message| (line, message))?);
    }
    Ok(anchors)
}

/// The records of a zone file, each with the line it starts on and its tokens: comments
/// dropped, lines inside parentheses joined.
fn records(text: &str) -> Result<Vec<LineTokens<'_>>, LineError> {
    let mut out = Vec::new();
    let mut open: Option<(usize, Vec<&str>)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split(';').next().unwrap_or("");
        let mut depth_tokens: Vec<&str> = Vec::new();
        let mut opened = open.is_some();
        for token in content.split_whitespace() {
            let mut token = token;
            if let Some(rest) = token.strip_prefix('(') {
                if opened {
                    return Err((line, "nested '(' in a record".to_string()));
                }
                opened = true;
                token = rest;
            }
            let closes = token.ends_with(')');
            if closes {
                if !opened {
                    return Err((line, "')' without '('".to_string()));
                }
                token = &token[..token.len() - 1];
            }
            if token.contains('(') || token.contains(')') {
                return Err((line, format!("unexpected parenthesis in {token:?}")));
            }
            if !token.is_empty() {
                depth_tokens.push(token);
            }
            if closes {
                opened = false;
            }
        }
        match (&mut open, opened) {
            (Some((_, tokens)), still_open) => {
                tokens.extend(depth_tokens);
                if !still_open {
                    out.push(open.take().expect("an open record"));
                }
            }
            (None, true) => open = Some((line, depth_tokens)),
            (None, false) if depth_tokens.is_empty() => {}
            (None, false) => out.push((line, depth_tokens)),
        }
    }
    if let Some((line, _)) = open {
        return Err((line, "'(' is never closed".to_string()));
    }
    // A record whose parentheses held everything but the owner is still one record.
    out.retain(|(_, tokens)| !tokens.is_empty());
    Ok(out)
}

/// `owner [ttl] [class] TYPE rdata...`, TTL and class in either order.
fn parse_record(tokens: &[&str]) -> Result<TrustAnchor, String> {
    let owner = tokens[0];
    if owner == "@" || owner.is_empty() {
        return Err("the owner must be a domain name, like `.` or `example.com.`".to_string());
    }
    let mut rest = &tokens[1..];
    let mut seen_ttl = false;
    let mut seen_class = false;
    loop {
        match rest.first() {
            Some(t) if !seen_ttl && t.bytes().all(|b| b.is_ascii_digit()) => {
                seen_ttl = true;
                rest = &rest[1..];
            }
            Some(t) if !seen_class && t.eq_ignore_ascii_case("IN") => {
                seen_class = true;
                rest = &rest[1..];
            }
            _ => break,
        }
    }
    let Some((kind, rdata)) = rest.split_first() else {
        return Err(format!("no record type after {owner:?}"));
    };
    let zone = zone_name(owner)?;
    let key = if kind.eq_ignore_ascii_case("DS") {
        parse_ds(rdata)?
    } else if kind.eq_ignore_ascii_case("DNSKEY") {
        parse_dnskey(rdata)?
    } else {
        return Err(format!(
            "a {kind} record cannot be a trust anchor, only DS and DNSKEY records"
        ));
    };
    Ok(TrustAnchor { zone, key })
}

/// The owner as a lowercase, fully qualified name.
fn zone_name(owner: &str) -> Result<String, String> {
    let name = owner.to_ascii_lowercase();
    let bare = name.strip_suffix('.').unwrap_or(&name);
    if bare.is_empty() {
        return Ok(".".to_string());
    }
    if bare.len() > 253
        || bare
            .split('.')
            .any(|label| label.is_empty() || label.len() > 63)
        || !bare.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(format!("{owner:?} is not a domain name"));
    }
    Ok(format!("{bare}."))
}

fn number<T: std::str::FromStr>(tokens: &[&str], at: usize, what: &str) -> Result<T, String> {
    let token = tokens
        .get(at)
        .ok_or_else(|| format!("the {what} is missing"))?;
    token
        .parse()
        .map_err(|_| format!("the {what} {token:?} is not a number in range"))
}

/// `key_tag algorithm digest_type digest`, the digest in hex, possibly split by spaces.
fn parse_ds(rdata: &[&str]) -> Result<AnchorKey, String> {
    let key_tag = number(rdata, 0, "DS key tag")?;
    let algorithm = number(rdata, 1, "DS algorithm")?;
    let digest_type = number(rdata, 2, "DS digest type")?;
    let hex: String = rdata.get(3..).unwrap_or_default().concat();
    if hex.is_empty() {
        return Err("the DS digest is missing".to_string());
    }
    let digest = decode_hex(&hex).ok_or_else(|| format!("the DS digest {hex:?} is not hex"))?;
    Ok(AnchorKey::Ds {
        key_tag,
        algorithm,
        digest_type,
        digest,
    })
}

/// `flags protocol algorithm key`, the key in base64, possibly split by spaces.
fn parse_dnskey(rdata: &[&str]) -> Result<AnchorKey, String> {
    let flags: u16 = number(rdata, 0, "DNSKEY flags")?;
    let protocol: u8 = number(rdata, 1, "DNSKEY protocol")?;
    let algorithm = number(rdata, 2, "DNSKEY algorithm")?;
    if protocol != 3 {
        return Err(format!("the DNSKEY protocol is {protocol}, it must be 3"));
    }
    if flags & 0x0100 == 0 {
        return Err(format!(
            "the DNSKEY flags {flags} lack the zone key bit (256 or 257 for a zone's key)"
        ));
    }
    let text: String = rdata.get(3..).unwrap_or_default().concat();
    if text.is_empty() {
        return Err("the DNSKEY public key is missing".to_string());
    }
    let public_key = base64::engine::general_purpose::STANDARD
        .decode(&text)
        .map_err(|e| format!("the DNSKEY public key is not base64: {e}"))?;
    Ok(AnchorKey::Dnskey {
        flags,
        algorithm,
        public_key,
    })
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IANA root KSK-2017 as `unbound-anchor` writes it.
    const UNBOUND_ROOT_KEY: &str = "; autotrust trust anchor file
;;id: . 1
;;last_queried: 1700000000 ;;Tue Nov 14 22:13:20 2023
. 172800 IN DNSKEY 257 3 8 AwEAAaz/tAm8yTn4Mfeh5eyI96WSVexTBAvkMgJzkKTOiW1vkIbzxeF3+/4RgWOq7HrxRixHlFlExOLAJr5emLvN7SWXgnLh4+B5xQlNVz8Og8kvArMtNROxVQuCaSnIDdD5LKyWbRd2n9WGe2R8PzgCmr3EgVLrjyBxWezF0jLHwVN8efS3rCj/EWgvIWgb9tarpVUDK/b58Da+sqqls3eNbuv7pr+eoZG+SrDK6nWeL3c6H5Apxz7LjVc1uTIdsIXxuOLYA4/ilBmSVIzuDWfdRUfhHdY6+cn8HFRm+2hM8AnXGXws9555KrUB5qihylGa8subX2Nn6UwNR1AkUTV74bU= ;{id = 20326 (ksk), size = 2048b} ;;state=2 [  VALID  ] ;;count=0 ;;lastchange=1700000000
";

    #[test]
    fn reads_unbound_root_key() {
        let anchors = parse_trust_anchors(UNBOUND_ROOT_KEY).unwrap();
        assert_eq!(anchors.len(), 1);
        assert_eq!(anchors[0].zone, ".");
        let AnchorKey::Dnskey {
            flags,
            algorithm,
            public_key,
        } = &anchors[0].key
        else {
            panic!("{anchors:?}")
        };
        assert_eq!((*flags, *algorithm, public_key.len()), (257, 8, 260));
    }

    #[test]
    fn reads_ds_records_in_every_form() {
        let text = "$TTL 3600
; dnssec-dsfromkey output, then the same over several lines, relative owner
test. IN DS 65362 13 2 A2B6A59F1CB3A89218AC512277A2A104923BCAF589656B2C0FD1FB258261E12F
Example.ORG 3600 IN DS 1234 8 2 (
        A2B6A59F1CB3A89218AC512277A2A104
        923BCAF589656B2C0FD1FB258261E12F ) ; digest split in two
. IN 86400 DS 20326 8 2 e06d44b80b8f1d39a95c0b0d7c65d08458e880409bbc683457104237c7f8ec8d
";
        let anchors = parse_trust_anchors(text).unwrap();
        let zones: Vec<&str> = anchors.iter().map(|a| a.zone.as_str()).collect();
        assert_eq!(zones, ["test.", "example.org.", "."]);
        let AnchorKey::Ds {
            key_tag,
            algorithm,
            digest_type,
            digest,
        } = &anchors[1].key
        else {
            panic!("{anchors:?}")
        };
        assert_eq!((*key_tag, *algorithm, *digest_type), (1234, 8, 2));
        assert_eq!(digest.len(), 32);
        assert_eq!(digest[0], 0xa2);
        assert_eq!(anchors[0].key, {
            let mut second = anchors[1].key.clone();
            if let AnchorKey::Ds {
                key_tag, algorithm, ..
            } = &mut second
            {
                *key_tag = 65362;
                *algorithm = 13;
            }
            second
        });
    }

    #[test]
    fn names_the_line_at_fault() {
        let cases = [
            (
                "test. IN DS 1 13 2 ABCD\ntest. IN A 192.0.2.1\n",
                2,
                "a A record cannot be a trust anchor",
            ),
            ("\n\ntest. IN DS 1 13 2 XYZ1\n", 3, "is not hex"),
            ("test. IN DS 70000 13 2 ABCD\n", 1, "DS key tag \"70000\""),
            ("test. IN DNSKEY 257 4 13 AAAA\n", 1, "protocol is 4"),
            ("test. IN DNSKEY 0 3 13 AAAA\n", 1, "zone key bit"),
            ("test. IN DNSKEY 257 3 13 !!!!\n", 1, "not base64"),
            ("test. IN DNSKEY 257 3 13\n", 1, "public key is missing"),
            ("test. IN DS ( 1 13\n2 ABCD\n", 1, "never closed"),
            ("test. IN\n", 1, "no record type"),
            ("$ORIGIN test.\n", 1, "$ORIGIN is not supported"),
            ("@ IN DS 1 13 2 ABCD\n", 1, "must be a domain name"),
        ];
        for (text, line, needle) in cases {
            let (at, message) = parse_trust_anchors(text).unwrap_err();
            assert_eq!(at, line, "{text:?}: {message}");
            assert!(message.contains(needle), "{text:?}: {message}");
        }
    }

    #[test]
    fn a_file_is_read_and_checked_at_validation() {
        let dir = std::env::temp_dir().join(format!("sonde-anchor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.key");
        std::fs::write(&good, UNBOUND_ROOT_KEY).unwrap();
        let bad = dir.join("bad.key");
        std::fs::write(&bad, "; a comment\n. IN DS 20326 8 2 nothex\n").unwrap();
        let empty = dir.join("empty.key");
        std::fs::write(&empty, "; nothing\n").unwrap();
        let config = |file: &Path| DnssecConfig {
            validate: true,
            trust_anchor_file: Some(file.display().to_string()),
        };
        config(&good).validate().unwrap();
        let message = config(&bad).validate().unwrap_err().to_string();
        assert!(
            message.starts_with(&format!(
                "dns.dnssec.trust_anchor_file {}:2: the DS digest \"nothex\" is not hex",
                bad.display()
            )),
            "{message}"
        );
        let message = config(&empty).validate().unwrap_err().to_string();
        assert!(message.contains("no DS or DNSKEY record"), "{message}");
        let missing = dir.join("missing.key");
        let message = config(&missing).validate().unwrap_err().to_string();
        assert!(
            message.starts_with(&format!(
                "dns.dnssec.trust_anchor_file: cannot read {}",
                missing.display()
            )),
            "{message}"
        );
        let off = DnssecConfig {
            validate: false,
            ..config(&good)
        };
        assert_eq!(
            off.validate(),
            Err(ModuleError::DnssecAnchorWithoutValidate)
        );
        DnssecConfig::default().validate().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
