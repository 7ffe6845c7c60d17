//! The hand-written certificate reader behind the `probe_ssl_*` samples: a chain of
//! DER certificates as a TLS peer presents it. The input is split into certificates at
//! DER element boundaries (a real chain, concatenated, splits back into itself); byte 0
//! says how many of them are the presented chain, the rest stand for `ca_file` roots.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::CertificateDer;
use sonde_agent::probe::{ProbeContext, Samples, fuzzing};
use std::sync::LazyLock;

static CTX: LazyLock<ProbeContext> =
    LazyLock::new(|| ProbeContext::from_system().expect("a probe context"));

/// The length of the DER element at the start of `input`, or all of it.
fn element_len(input: &[u8]) -> usize {
    let len = match input.get(1) {
        Some(&b) if b < 0x80 => Some(2 + usize::from(b)),
        Some(&b) => {
            let n = usize::from(b & 0x7f);
            input.get(2..2 + n).filter(|_| n <= 4).map(|bytes| {
                2 + n
                    + bytes
                        .iter()
                        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
            })
        }
        None => None,
    };
    len.filter(|l| *l <= input.len()).unwrap_or(input.len())
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, mut rest)) = data.split_first() else {
        return;
    };
    let mut certs = Vec::new();
    while !rest.is_empty() && certs.len() < 16 {
        let n = element_len(rest).max(1);
        certs.push(CertificateDer::from(rest[..n].to_vec()));
        rest = &rest[n..];
    }
    let presented = usize::from(split).min(certs.len());
    let (chain, roots) = certs.split_at(presented);
    let mut out = Samples::default();
    let _ = fuzzing::certificates(&CTX, chain, roots, &mut out);
});
