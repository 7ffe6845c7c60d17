//! sonde's aggregator: the fleet server agents stream to, the merge of their views into
//! `up`, missing-job detection, remote write, and the HTTP API and status page.
//!
//! # Layers
//!
//! Each layer uses only the ones below it; `tests/tests/aggregator_layers.rs` checks that
//! no module imports one that imports it back and that the hub crate reaches no I/O crate.
//!
//! - [`sonde_hub`] (its own crate, `aggregator/hub/`): the state machine — agents, their
//!   views of targets, the merge into `up`, missing jobs, placement, budgets — with no
//!   I/O: every input returns samples, durable changes and messages as plain data;
//! - [`storage`]: every SQL statement — the schema, the agents' rows, the history, and
//!   each remote-write endpoint's durable queue split by role (schema, label cache,
//!   writer, reader, metrics);
//! - [`remote_write`]: the wire format (1.0 and 2.0 requests, encoders and decoders), an
//!   endpoint's settings and its HTTP exchange;
//! - [`delivery`]: the writers that drain each endpoint's queue through its client;
//! - [`hub`]: the threads that run the state machine and commit what it returns;
//! - [`fleet`]: the gRPC service (authentication, decoding, acks);
//! - [`config`], [`targets`], [`history`]: the config file, target discovery, and the
//!   history's records and uptime arithmetic;
//! - [`web`]: status page, JSON API, `/metrics`, reload — read from snapshots and the
//!   history reader through typed views, never from SQL;
//! - [`app`], [`server`]: the whole process wired together.
//!

pub mod app;
pub mod config;
pub mod delivery;
pub mod fleet;
pub mod history;
pub mod hub;
pub mod remote_write;
pub mod server;
pub mod storage;
pub mod targets;
pub mod web;

pub use sonde_hub::{labels, merge, refusals, series};
