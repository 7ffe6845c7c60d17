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
//! # The path of a result
//!
//! What every result costs is what sets the aggregator's price at a real fleet's shape,
//! where an agent probing 100 targets every 60 s sends about one result per batch
//! (`fleet-sim --preset real`, `docs/benchmarks.md`). The path:
//!
//! 1. **The stream's task** (a Tokio worker, [`fleet`]) reads the batch and decodes it in
//!    place against the stream's symbol table: a result is a job, an instance and
//!    samples whose names and labels are symbols of that table.
//! 2. **The ingest thread** ([`hub`]) owns the [`sonde_hub::state::State`] and applies
//!    every command waiting for it as one group: each result is checked against what the
//!    agent may report and its check's budget, deduplicated by sequence number, and
//!    becomes the agent's view of the target, whose series (labels built once per shape
//!    and reused) carry the samples. The target's `up` is merged again only when the
//!    view's verdict or freshness changed.
//! 3. **The storage thread** commits the group in one SQLite transaction: the agents'
//!    sequence numbers, history rows and every remote-write queue's new block
//!    ([`storage`]); only then are the group's batches acked, which is what makes
//!    delivery exactly-once in the output. The next group is applied meanwhile.
//! 4. **The writers** ([`delivery`]) read each endpoint's blocks back in request form (from
//!    memory while they keep up) and send them.
//!
//! Where the time went before the current layout, at `--preset real` (1,000 agents × 100
//! targets × 12 samples at 60 s, ~1.2 results per batch; `perf record` by thread and
//! stage): the commit, paid about once per batch since groups were tiny at this shape,
//! 22.9 %; the remote-write queue's enqueue 12.0 %; the state's `results` 19.3 % (8.0 %
//! of it merging each target's 1,000 views at every result); the hand-over between
//! threads 12.5 % (futex wake-ups and context switches); the streams' transport and
//! decoding 8.0 %; sends 4.8 %; writers 3.7 %; the runtime and unattributed 16.8 %. The
//! whole process cost 21.7 µs per probe sample, 3.3× the ingest floor and 2.3× vmagent
//! in the same run.

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
