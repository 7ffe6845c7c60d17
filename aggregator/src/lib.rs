//! sonde's aggregator: the fleet server agents stream to, the merge of their views into
//! `up`, missing-job detection, remote write, and the HTTP API and status page.
//!
//! - [`config`]: the config file, its defaults and checks;
//! - [`targets`]: static and file_sd targets;
//! - [`fleet`]: the gRPC service (authentication, decoding, acks);
//! - [`hub`]: the state fed by the fleet and the series it produces, and its threads;
//! - [`labels`]: every label set written, built in one place;
//! - [`merge`]: the `up` / missing rules, pure code;
//! - [`history`]: each target's state changes and response times, kept for weeks;
//! - [`series`]: a written series (shared labels) and its samples;
//! - [`remote_write`]: encoder, client and queue per endpoint;
//! - [`web`]: status page, JSON API, `/metrics`, reload.

pub mod app;
pub mod config;
pub mod delivery;
pub mod fleet;
pub mod health;
pub mod history;
pub mod hub;
pub mod remote_write;
pub mod server;
pub mod storage;
pub mod store;
pub mod targets;
pub mod web;

pub use sonde_hub::{labels, merge, refusals, series};
