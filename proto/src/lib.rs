//! Types both sonde binaries share: the `sonde.v1` fleet protocol, the remote-write
//! messages, the configuration model (modules, jobs, durations, label sets), and what
//! `tls_config.insecure_skip_verify` means to every TLS client of either (`tls`, with the
//! `grpc` feature, on by default; without it the crate is plain data and pulls in no gRPC
//! or TLS runtime).

pub mod pb {
    //! Generated from `proto/sonde/v1/fleet.proto`.
    include!(concat!(env!("OUT_DIR"), "/sonde.v1.rs"));
}

pub mod prompb {
    //! Generated from `proto/prometheus/remote.proto` (remote write 1.0).
    include!(concat!(env!("OUT_DIR"), "/prometheus.rs"));
}

/// Revision of the fleet protocol this build speaks (in `Hello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 2;

pub mod assignment;
pub mod config;
pub mod exposition;
pub mod help;
#[cfg(feature = "grpc")]
pub mod tls;
pub mod trace;
