//! sonde's hub: the aggregator's state machine — which agents are connected, what each
//! last reported for each target, how those views merge into `up`, which jobs and agents
//! are missing, which agent probes which target — kept apart from every kind of I/O.
//!
//! **What comes in**, one input at a time, from whoever runs it (the aggregator's
//! ingest thread): an agent's hello, heartbeat, assignment report and disconnection; a
//! batch of results as the fleet service decoded it ([`model::IncomingResult`]); the
//! once-a-second tick; a reload with its [`config::HubConfig`] and the targets the
//! caller discovered; what the store remembered from before a restart.
//!
//! **What goes out**, as plain data in a [`state::Changes`]: the samples to write, the
//! durable changes to commit with them ([`state::Durable`]: agents' sequence numbers,
//! jobs, history rows), the messages to send and the streams to end
//! ([`state::Outgoing`]), and an undo log that puts the state back if the commit fails.
//! The caller commits, then acks and answers; the hub never waits on anything.
//!
//! **Why no I/O**: so that every rule is tested with plain values, a failed commit can be
//! undone exactly, and the one thread that owns the state never blocks on a disk or a
//! socket. This crate's `Cargo.toml` has no SQLite, no async runtime and no network
//! crate (it uses `sonde-proto` without its `grpc` feature), so the compiler keeps it so.
//!
//! - [`state`]: the state machine, split by concern;
//! - [`model`]: what the fleet decoder and the hub share (a result, its samples' shape
//!   and values, the stream's symbols, a target's key, the staleness marker);
//! - [`merge`]: the `up` / missing rules; [`tally`]: the same counts kept as views
//!   change; [`placement`]: `agents_per_target`;
//! - [`assignment`]: an agent's checks, planned and cut into parts; [`budget`]: what one
//!   assigned check may produce;
//! - [`series`], [`labels`]: a written series and every label set the hub builds;
//! - [`history`]: the state changes and response times handed to the history;
//! - [`refusals`]: why a result or a connection was refused, counted per agent;
//! - [`maintenance`]: maintenance windows, their occurrences and whom they select;
//! - [`config`], [`limits`], [`targets`]: the hub's part of the config, as plain data.

pub mod assignment;
pub mod budget;
pub mod config;
pub mod history;
pub mod labels;
pub mod limits;
pub mod maintenance;
pub mod merge;
pub mod model;
pub mod placement;
pub mod refusals;
pub mod series;
pub mod state;
pub mod tally;
pub mod targets;

pub use state::{HubCounters, StoredAgent};
