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
//! - [`report`]: SLO reports, pure arithmetic over a target's history, maintenance
//!   windows and its job's objective;
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
//!    and reused) carry the samples. The target's fresh and succeeding agents are counted
//!    as views change ([`sonde_hub::tally`]), so a result costs O(log agents), not a walk
//!    over every agent's view. A group is handed over at most once per gather window
//!    (20 ms) while batches keep coming, so that at a real fleet's shape one commit
//!    carries tens of streams' batches; between hand-overs the thread waits on the
//!    commit or the window, not on each command.
//! 3. **The storage thread** commits the group in one SQLite transaction: the agents'
//!    sequence numbers, history rows and every remote-write queue's new block
//!    ([`storage`]); only then are the group's batches acked, which is what makes
//!    delivery exactly-once in the output. The next group is gathered meanwhile.
//! 4. **The writers** ([`delivery`]) read each endpoint's blocks back in request form (from
//!    memory while they keep up) and send them.
//!
//! Where the time goes at `--preset real` (1,000 agents × 100 targets × 12 samples at
//! 60 s, ~1.2 results per batch; `perf record`, each sample put in a stage by its thread
//! and function), with a commit per group as it was, and with the gather window:
//!
//! | stage | a commit per group | gather window |
//! |---|---:|---:|
//! | SQLite commit | 22.9 % | 12.0 % |
//! | futex wake-ups, context switches | 10.2 % | 5.4 % |
//! | the state's `results` (merge over 1,000 views: 8.0 %) | 19.3 % | 29 % |
//! | queue enqueue | 12.0 % | 7.7 % |
//! | storage thread's malloc/free | (in the above) | 8.7 % |
//!
//! The whole process: 21.7–28.7 µs per probe sample before, 3.3–4.3× the ingest floor
//! of the same run; 25.5 µs and 3.0× with the gather window alone (one run); 18.8 µs,
//! 2.4× the floor and 2.1× vmagent with the tally as well (one run, see
//! `docs/benchmarks.md`). What remains is per result: the state's accept path
//! (allocation is about a third of it), the queue's enqueue and request-form copies, and
//! glibc's allocator across all three threads. The floor's shape — one pass per result
//! on the stream's own task, per-series state kept with the agent's view, no per-sample
//! value crossing a thread — is where the rest of the distance is.
//!
//! At the default load (`fleet-sim --pin`: 10 agents × 1,000 targets × 12 samples every
//! 5 s, ~50 results per batch), where a batch's own costs are spread over fifty results,
//! the stages are others (two runs with `perf record`: 4.23 and 4.47 µs per probe
//! sample, 4.95× and 5.84× the floor's 0.86 and 0.77 in the same runs; the first run's
//! shares):
//!
//! | stage | share |
//! |---|---:|
//! | storage thread: the remote-write enqueue (series cache lookup 6.3 %, block encoding 3.6 %, request-form copies 1.8 %) | 17.5 % |
//! | storage thread: malloc, free and copies | 9.3 % |
//! | storage thread: kernel (WAL writes, page faults) | 9.5 % |
//! | storage thread: SQLite | 5.1 % |
//! | ingest thread: `State::results` and the hub | 11.6 % |
//! | ingest thread: malloc, free, kernel | 8.5 % |
//! | gRPC workers: decoding | 6.4 % |
//! | gRPC workers: malloc, free, copies, kernel | 15.1 % |
//! | gRPC workers: remote-write senders (snappy, settling blocks) | 5.5 % |
//!
//! There the price is per sample. The storage thread is 44 % of the process, and most
//! of it is the queue's enqueue with its allocation and copies: a lookup in the
//! endpoint's series cache, the block's encoding and a copy of the series' labels in
//! request form for the tail, each once per sample, where the floor copies a sample's
//! encoded labels once.

pub mod app;
pub mod config;
pub mod delivery;
pub mod fleet;
pub mod history;
pub mod hub;
pub mod import_prometheus;
pub mod maintenance;
pub mod remote_write;
pub mod report;
pub mod server;
pub mod storage;
pub mod targets;
pub mod web;

pub use sonde_hub::{labels, merge, refusals, series};
