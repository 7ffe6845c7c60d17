//! What the certificates a server presents say, for the samples blackbox_exporter
//! derives from them: validity end, issuer and subject names, serial, DNS names.
//!
//! Certificates are parsed with `x509-parser`. They come from the peer and are hostile:
//! one that does not parse is skipped, never a panic. Only the formatting is ours, since
//! it must match Go's byte for byte (`pkix.Name.String()`, `%x` of the serial).

use x509_parser::asn1_rs::{Any, Class, ToDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

/// One parsed certificate.
pub(crate) struct Cert<'a> {
    cert: X509Certificate<'a>,
}

impl<'a> Cert<'a> {
    /// `None` when `der` is not a certificate that parses.
    pub(crate) fn parse(der: &'a [u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        Some(Self { cert })
    }

    /// The end of the validity period, Unix seconds.
    pub(crate) fn not_after(&self) -> i64 {
        self.cert.validity().not_after.timestamp()
    }

    /// The encoded issuer Name, compared byte for byte to link a chain.
    pub(crate) fn issuer_der(&self) -> &[u8] {
        self.cert.issuer().as_raw()
    }

    /// The encoded subject Name.
    pub(crate) fn subject_der(&self) -> &[u8] {
        self.cert.subject().as_raw()
    }

    pub(crate) fn issuer(&self) -> String {
        name_string(self.cert.issuer())
    }

    pub(crate) fn subject(&self) -> String {
        name_string(self.cert.subject())
    }

    /// The dNSName entries of the subjectAltName extension; none when it is absent or
    /// does not parse.
    pub(crate) fn dns_names(&self) -> Vec<String> {
        let Ok(Some(san)) = self.cert.subject_alternative_name() else {
            return Vec::new();
        };
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(name) => Some((*name).to_string()),
                _ => None,
            })
            .collect()
    }

    /// As Go's `fmt.Sprintf("%x", serial.Bytes())`: big-endian, no leading zeros.
    pub(crate) fn serial_hex(&self) -> String {
        let serial = self.cert.raw_serial();
        let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
        hex(&serial[start..])
    }
}

/// The chain blackbox_exporter's `probe_ssl_last_chain_expiry_timestamp_seconds`
/// looks at: from the leaf, each issuer among the presented certificates (and the
/// `ca_file` roots), to the end; the earliest expiry on it. The built-in roots have
/// no date on them here, and they outlive the certificates they sign.
pub(crate) fn chain_expiry(presented: &[Cert<'_>], roots: &[Cert<'_>]) -> Option<i64> {
    let mut current = presented.first()?;
    let mut earliest = current.not_after();
    let mut used = vec![false; presented.len()];
    used[0] = true;
    for _ in 0..presented.len() + 1 {
        if current.issuer_der() == current.subject_der() {
            break;
        }
        let next = presented
            .iter()
            .enumerate()
            .find(|(i, c)| !used[*i] && c.subject_der() == current.issuer_der())
            .map(|(i, c)| {
                used[i] = true;
                c
            })
            .or_else(|| {
                roots
                    .iter()
                    .find(|c| c.subject_der() == current.issuer_der())
            });
        match next {
            Some(next) => {
                earliest = earliest.min(next.not_after());
                current = next;
            }
            None => break,
        }
    }
    Some(earliest)
}

/// A distinguished name as Go's `pkix.Name.String()` writes it: the well-known
/// attributes in Go's fixed order (then reversed, RFC 2253 style), other attributes
/// as `OID=#hex`, values escaped as Go does.
pub(crate) fn name_string(name: &X509Name<'_>) -> String {
    // Go's ToRDNSequence order; the output is that sequence reversed.
    const ORDER: [(u8, &str); 9] = [
        (6, "C"),
        (8, "ST"),
        (7, "L"),
        (9, "STREET"),
        (17, "POSTALCODE"),
        (10, "O"),
        (11, "OU"),
        (3, "CN"),
        (5, "SERIALNUMBER"),
    ];
    let mut known: Vec<(u8, String)> = Vec::new();
    let mut others: Vec<String> = Vec::new();
    for atv in name.iter_rdn().flat_map(|rdn| rdn.iter()) {
        let oid = atv.attr_type();
        let value = atv.attr_value();
        match oid.as_bytes() {
            [0x55, 0x04, attr] if ORDER.iter().any(|(a, _)| a == attr) => {
                if let Some(text) = decode_string(value) {
                    known.push((*attr, text));
                }
            }
            _ => others.push(format!(
                "{}=#{}",
                oid.to_id_string(),
                hex(&go_marshal(value))
            )),
        }
    }
    let mut parts: Vec<String> = others;
    for (attr, label) in ORDER {
        let values: Vec<&String> = known
            .iter()
            .filter(|(a, _)| *a == attr)
            .map(|(_, v)| v)
            .collect();
        // Go keeps only the last CommonName and SerialNumber, every value of the rest.
        let values = match attr {
            3 | 5 => values.last().map(|v| vec![*v]).unwrap_or_default(),
            _ => values,
        };
        if values.is_empty() {
            continue;
        }
        let rdn: Vec<String> = values
            .iter()
            .map(|v| format!("{label}={}", escape(v)))
            .collect();
        parts.push(rdn.join("+"));
    }
    parts.reverse();
    parts.join(",")
}

/// The universal, primitive tag number of a value (`0x0c` for a UTF8String), if it
/// has one.
fn universal_tag(value: &Any<'_>) -> Option<u8> {
    let header = &value.header;
    (header.class() == Class::Universal && header.is_primitive())
        .then(|| u8::try_from(header.tag().0).ok())
        .flatten()
}

/// A string value as Go's asn1 package reads it.
fn decode_string(value: &Any<'_>) -> Option<String> {
    let content = value.data;
    match universal_tag(value)? {
        // UTF8String, PrintableString, IA5String
        0x0c | 0x13 | 0x16 => std::str::from_utf8(content).ok().map(str::to_string),
        // T61String: Go reads it as Latin-1
        0x14 => Some(content.iter().map(|b| char::from(*b)).collect()),
        // BMPString: UTF-16BE
        0x1e if content.len().is_multiple_of(2) => {
            let units: Vec<u16> = content
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// Go re-encodes an unknown attribute's string value with `asn1.Marshal`: as a
/// PrintableString when every character allows it, else a UTF8String. Any other value
/// keeps its own encoding.
fn go_marshal(value: &Any<'_>) -> Vec<u8> {
    let Some(text) = decode_string(value) else {
        return value.to_der_vec().unwrap_or_default();
    };
    let printable = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b" '()+,-./:=?*".contains(&b));
    let bytes = text.as_bytes();
    let mut out = vec![if printable { 0x13 } else { 0x0c }];
    if bytes.len() < 0x80 {
        out.push(bytes.len() as u8);
    } else {
        let len = bytes.len().to_be_bytes();
        let skip = len.iter().position(|b| *b != 0).unwrap_or(len.len() - 1);
        out.push(0x80 | (len.len() - skip) as u8);
        out.extend_from_slice(&len[skip..]);
    }
    out.extend_from_slice(bytes);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Go's RDNSequence escaping.
fn escape(value: &str) -> String {
    let count = value.chars().count();
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let needs = match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => true,
            ' ' => i == 0 || i + 1 == count,
            '#' => i == 0,
            _ => false,
        };
        if needs {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::test_support::{CA_NOT_AFTER, LEAF_NOT_AFTER, test_pki};

    #[test]
    fn x509_reads_the_test_certificates() {
        let pki = test_pki();
        let leaf = Cert::parse(&pki.leaf_der).unwrap();
        let ca = Cert::parse(&pki.ca_der).unwrap();
        assert_eq!(leaf.not_after() as f64, LEAF_NOT_AFTER);
        assert_eq!(ca.not_after() as f64, CA_NOT_AFTER);
        assert_eq!(leaf.issuer_der(), ca.subject_der());
        assert_eq!(leaf.dns_names(), vec!["localhost".to_string()]);
        assert_eq!(leaf.subject(), "CN=localhost");
        assert_eq!(leaf.issuer(), "CN=sonde test CA,O=sonde\\, tests");
        assert_eq!(leaf.serial_hex(), "8f01");
        assert_eq!(chain_expiry(&[leaf], &[ca]), Some(LEAF_NOT_AFTER as i64));
    }

    #[test]
    fn x509_never_panics_on_garbage() {
        let pki = test_pki();
        for cut in 0..pki.leaf_der.len() {
            let _ = Cert::parse(&pki.leaf_der[..cut]);
        }
        let mut flipped = pki.leaf_der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            if let Some(c) = Cert::parse(&flipped) {
                let _ = c.subject();
                let _ = c.issuer();
                let _ = c.dns_names();
                let _ = c.serial_hex();
            }
            flipped[i] ^= 0xff;
        }
        assert!(Cert::parse(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
    }

    #[test]
    fn x509_name_strings_follow_go() {
        // SEQUENCE { SET { C=US } SET { O=Acme+ } SET { CN=" a" } SET { email } }
        let atv = |oid: &[u8], tag: u8, v: &[u8]| {
            let mut inner = vec![0x06, oid.len() as u8];
            inner.extend_from_slice(oid);
            inner.extend_from_slice(&[tag, v.len() as u8]);
            inner.extend_from_slice(v);
            let mut seq = vec![0x30, inner.len() as u8];
            seq.extend(inner);
            let mut set = vec![0x31, seq.len() as u8];
            set.extend(seq);
            set
        };
        let mut body = Vec::new();
        body.extend(atv(&[0x55, 4, 6], 0x13, b"US"));
        body.extend(atv(&[0x55, 4, 10], 0x0c, b"Acme+"));
        body.extend(atv(&[0x55, 4, 3], 0x0c, b" a"));
        body.extend(atv(
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
            0x16,
            b"a@b",
        ));
        let mut der = vec![0x30, body.len() as u8];
        der.extend(body);
        let (_, name) = X509Name::from_der(&der).unwrap();
        assert_eq!(
            name_string(&name),
            "CN=\\ a,O=Acme\\+,C=US,1.2.840.113549.1.9.1=#0c03614062"
        );
    }
}
