//! The icmp prober's reading of what its socket receives, from raw bytes: whether a
//! packet (any ICMP message a host or a forger sends, with or without an IP header) is
//! the echo reply it waits for, and the hop limit among the packet's control messages.
//! Byte 0 picks the socket kind and the IP version; byte 1 splits the rest into the
//! packet and the control messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_agent::probe::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&[pick, split], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let at = usize::from(split).min(rest.len());
    let (control, packet) = rest.split_at(at);
    let (matched, _) = fuzzing::icmp_reply(
        pick >> 1,
        pick & 1 == 0,
        0x1234,
        7,
        b"Prometheus Blackbox Exporter",
        packet,
        control,
    );
    if matched {
        // Only an echo reply with the request's sequence and data matches.
        assert!(packet.ends_with(b"Prometheus Blackbox Exporter"));
    }
});
