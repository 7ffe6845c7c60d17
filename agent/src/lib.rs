//! sonde's agent: runs the checks it is assigned (and its own local jobs), and streams
//! every result to its aggregators.
//!
//! - [`probe`]: the http, tcp and dns probers behind one interface;
//! - [`schedule`]: runs each check on its interval;
//! - [`buffer`]: numbers results and keeps them, on disk, until each aggregator acks them;
//! - [`uplink`]: the gRPC stream to each aggregator, and [`assigned`]: what it accepts
//!   of an assignment;
//! - [`web`]: `/metrics`, `/probe` and the health endpoints, served by
//!   `sonde_cli::http_server` (also the aggregator's HTTP server).

pub mod assigned;
pub mod buffer;
pub mod config;
pub mod metrics;
pub mod one_connection;
pub mod probe;
pub mod probe_logs;
pub mod record;
pub mod runtime;
pub mod schedule;
pub mod uplink;
pub mod web;
