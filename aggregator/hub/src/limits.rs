//! `fleet.limits`: what one agent, one stream and one connection may cost the aggregator.

use serde::Deserialize;
use sonde_proto::config::{ByteSize, PromDuration};

/// What one agent, one stream and one connection may cost the aggregator. The
/// defaults fit an honest agent with 50,000 targets; the README gives the worst case
/// they allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetLimits {
    /// One gRPC message from an agent (decoded size).
    pub max_message_bytes: ByteSize,
    /// Open connections on the gRPC port; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams on one connection.
    pub max_streams_per_connection: u32,
    pub tls_handshake_timeout: PromDuration,
    /// Time an authenticated stream has to send its Hello.
    pub hello_timeout: PromDuration,
    /// One interned string (metric name, label name or value).
    pub max_symbol_bytes: ByteSize,
    /// All the strings one stream interns.
    pub max_symbol_table_bytes: ByteSize,
    pub max_results_per_batch: usize,
    /// Samples in one batch, over all its results: what one batch may make the
    /// aggregator build at once.
    pub max_samples_per_batch: usize,
    pub max_samples_per_result: usize,
    pub max_labels_per_sample: usize,
    /// The bytes of one sample's label names and values together.
    pub max_sample_label_bytes: ByteSize,
    /// Jobs an agent may declare as its own.
    pub max_local_jobs: usize,
    /// Distinct targets across one agent's local jobs.
    pub max_local_targets: usize,
    /// Series one agent may hold live at once (the samples of its latest results).
    pub max_series: usize,
    /// The bytes of those series' metric names, label names and values together: what
    /// the agent's series weigh in `/metrics` and in every remote-write request.
    /// Both bound what the agent declares itself (its local jobs); the checks the
    /// aggregator assigns it get what each needs on top (see `hub::budget`).
    pub max_series_bytes: ByteSize,
    /// The `instance` of a local job's result (every series of the target carries it).
    pub max_instance_bytes: ByteSize,
    /// Agents without a token known at once (connected, or gone for less than
    /// `fleet.forget_after`); agents with a token are bounded by `fleet.auth.tokens`.
    pub max_agents: usize,
    /// Distinct local job names that agents without a token declare, all together: each
    /// is a job the aggregator tracks (its `sonde_job_*` series, its row), and made-up
    /// ids could otherwise declare `max_agents` × `max_local_jobs` of them.
    pub max_anonymous_local_jobs: usize,
}

impl Default for FleetLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: ByteSize(4 << 20),
            max_connections: 4096,
            max_streams_per_connection: 16,
            tls_handshake_timeout: PromDuration::from_secs(10),
            hello_timeout: PromDuration::from_secs(10),
            max_symbol_bytes: ByteSize(16 << 10),
            max_symbol_table_bytes: ByteSize(16 << 20),
            max_results_per_batch: 1000,
            max_samples_per_batch: 10_000,
            max_samples_per_result: 256,
            max_labels_per_sample: 8,
            max_sample_label_bytes: ByteSize(4 << 10),
            max_local_jobs: 64,
            max_local_targets: 10_000,
            max_series: 250_000,
            max_series_bytes: ByteSize(32 << 20),
            max_instance_bytes: ByteSize(1 << 10),
            max_agents: 1000,
            max_anonymous_local_jobs: 1024,
        }
    }
}
