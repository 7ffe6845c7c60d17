//! sonde's hub: the aggregator's state machine, kept apart from every kind of I/O.
//!
//! - [`model`]: what the fleet decoder hands the hub (a result, its samples' shape and
//!   values, the stream's symbols) and the staleness marker;
//! - [`merge`]: the `up` / missing rules, pure code;
//! - [`placement`]: which agents probe which target (`agents_per_target`);
//! - [`budget`]: what one assigned check may produce;
//! - [`series`], [`labels`]: a written series and every label set the hub builds;
//! - [`refusals`]: why a result or a connection was refused, counted per agent;
//! - [`limits`], [`targets`]: `fleet.limits` and the jobs' targets, as plain data.
//!
//! No I/O: this crate's `Cargo.toml` has no SQLite, no async runtime and no network
//! crate, so the compiler keeps it that way. What the state machine decides comes back
//! to the caller as data, to be carried out after the commit.

pub mod assignment;
pub mod budget;
pub mod config;
pub mod history;
pub mod labels;
pub mod limits;
pub mod merge;
pub mod model;
pub mod placement;
pub mod refusals;
pub mod series;
pub mod state;
pub mod targets;

pub use state::{HubCounters, StoredAgent};
