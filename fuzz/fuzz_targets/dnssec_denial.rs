//! The dns prober's proof of a negative answer from raw bytes: a reply's NSEC or NSEC3
//! records, checked for covering its question's name (closest encloser and wildcard,
//! NSEC3 hashes with the reply's salt and iterations, hostile owner names).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_agent::probe::fuzzing;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::dnssec_denial(data);
});
