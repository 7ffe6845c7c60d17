//! The stream to one aggregator: connect, say hello, send results in batches, take
//! assignments and acks, reconnect with exponential backoff and jitter.
//!
//! Delivery is at-least-once: after a reconnect, everything the buffer still holds is
//! sent again in sequence order, and the aggregator drops what it already committed.
//!
//! What the uplink keeps within the aggregator's default limits (`fleet.limits`), so that
//! an honest agent is never refused: each message under [`MAX_ENCODE_BYTES`], each
//! symbol under [`MAX_SYMBOL_BYTES`] (longer label values are cut), and each stream's
//! symbol table under [`MAX_TABLE_BYTES`] (past it the stream ends cleanly and a new one,
//! with a new table, starts).
//!
//! Assignments arrive in parts ([`Assembler`], within [`ASSIGNMENT_BOUNDS`]) and are
//! applied whole when the last part is in; the agent reports on each (applied, with the
//! checks it refused, or refused whole). An assignment it refuses changes nothing else:
//! the previous checks keep running and the stream stays open.
//!
//! Reconnecting: a network error backs off from 200 ms to 15 s; a refusal
//! (`Unauthenticated`, `PermissionDenied`: a token the aggregator does not accept;
//! `FailedPrecondition`: a protocol version it does not speak) from
//! 30 s to 5 min, since retrying sooner changes nothing until someone fixes the token. A
//! stream that ends within [`STABLE_AFTER`] of being established does not reset the
//! backoff, so an aggregator that accepts streams and then ends them at once
//! (overloaded, storage failing) is not hammered in a tight loop. Opening a stream (TCP,
//! TLS, HTTP/2 and the aggregator's answer to the Hello) is bounded by one timeout, so an
//! aggregator that accepts connections and answers nothing costs each attempt that long.

//!
//! Here the stream itself and its reconnects; `symbols.rs` builds the batches,
//! `assignment.rs` judges and applies what the aggregator assigns, `connect.rs` opens the
//! channel.

mod assignment;
mod connect;
mod diagnose;
mod symbols;

pub use connect::ConnectError;
pub use symbols::{
    MAX_BATCH_SAMPLES, MAX_SYMBOL_BYTES, MAX_TABLE_BYTES, MAX_TABLE_SYMBOLS, SYMBOL_OVERHEAD,
};

use crate::assigned::FilePolicy;
use crate::buffer::Buffer;
use crate::config::AggregatorEndpoint;
use crate::metrics::AgentMetrics;
use crate::schedule::Scheduler;
use connect::{Dial, SETUP_TIMEOUT, describe_status};
use diagnose::Seen;
use rand::Rng;
use sonde_proto::assignment::cut;
use sonde_proto::assignment::{Assembler, Bounds, Step};
use sonde_proto::config::Labels;
use sonde_proto::pb::{
    self, AgentMessage, AggregatorMessage, agent_message, aggregator_message,
    fleet_client::FleetClient,
};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use symbols::{Built, Symbols};
use tokio::sync::{mpsc, watch};

/// Results per batch on the wire.
const BATCH_MAX: usize = 500;
/// Results sent but not yet acked before the uplink waits for acks.
const IN_FLIGHT_MAX: usize = 20_000;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
const REFUSED_BACKOFF_MIN: Duration = Duration::from_secs(30);
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A stream that lived this long resets the backoff when it ends.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// The largest message the agent sends: the aggregator's default
/// `fleet.limits.max_message_bytes`.
pub const MAX_ENCODE_BYTES: usize = 4 << 20;
/// The largest message the agent accepts. Aggregators send assignments in parts of at
/// most 1 MiB; the rest is room for a future aggregator's larger parts.
pub const MAX_DECODE_BYTES: usize = 16 << 20;
/// What one assignment may hold, all its parts together; past it the agent refuses it
/// whole and keeps its previous checks.
pub const ASSIGNMENT_BOUNDS: Bounds = Bounds {
    max_parts: 1 << 16,
    max_bytes: 256 << 20,
    max_checks: 1_000_000,
    max_modules: 100_000,
};
/// What one `ResultBatch` may take, leaving room for the message's own framing.
const BATCH_BUDGET: usize = MAX_ENCODE_BYTES - (64 << 10);
/// How long a stream whose symbol table is full waits for the acks of what it sent
/// before it ends anyway (what is unacked is replayed on the next stream).
const ROTATE_WAIT: Duration = Duration::from_secs(30);

/// Everything one uplink needs.
pub struct Uplink {
    /// This aggregator's position in the config: its slot in the buffer.
    pub index: usize,
    pub endpoint: AggregatorEndpoint,
    pub agent_id: String,
    pub labels: Labels,
    pub local_jobs: Vec<String>,
    /// The agent's buffer; this uplink reads and acks slot `index` of it.
    pub buffer: Arc<Buffer>,
    pub scheduler: Arc<Scheduler>,
    pub metrics: Arc<AgentMetrics>,
    /// `assigned_modules` of the agent's config, as of the last (re)load.
    pub file_policy: Arc<RwLock<FilePolicy>>,
    /// Refusals already logged (module and reason), so each is logged once.
    pub logged_refusals: Mutex<HashSet<String>>,
}

impl Uplink {
    /// Runs until `shutdown` turns true, reconnecting whenever the stream breaks.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let address = self.endpoint.address.clone();
        let mut backoff = Backoff::default();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let opened = self.session(&mut shutdown).await;
            self.metrics.uplink(&address, |u| u.connected = false);
            let delay = match opened {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Rotate) => {
                    // Deliberate, and the stream worked: reconnect at once.
                    backoff.reset();
                    self.metrics.uplink(&address, |u| u.disconnects += 1);
                    continue;
                }
                Ok(SessionEnd::Established { end, lived }) => {
                    if lived >= STABLE_AFTER {
                        backoff.reset();
                    }
                    let delay = backoff.next(end.refused(), &mut rand::rng());
                    if end.refused() {
                        tracing::warn!(aggregator = %address, reason = %end, retry_in = ?delay, "the aggregator refused this agent and ended its stream");
                    } else {
                        tracing::warn!(aggregator = %address, error = %end, lived = ?lived, retry_in = ?delay, "stream to the aggregator ended; reconnecting");
                    }
                    self.metrics.uplink(&address, |u| {
                        u.disconnects += 1;
                        u.last_error = Some(end.to_string());
                    });
                    delay
                }
                Err(end) => {
                    let delay = backoff.next(end.refused(), &mut rand::rng());
                    if end.refused() {
                        tracing::warn!(aggregator = %address, reason = %end, retry_in = ?delay, "the aggregator refused this agent");
                    } else {
                        tracing::warn!(aggregator = %address, error = %end, retry_in = ?delay, "cannot reach the aggregator");
                    }
                    self.metrics
                        .uplink(&address, |u| u.last_error = Some(end.to_string()));
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One stream, from connect to its end. `Err` means it never got going.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<SessionEnd, Ended> {
        let address = &self.endpoint.address;
        let dial = Dial::new(self.index, &self.endpoint)?;
        let (tx, rx) = mpsc::channel::<AgentMessage>(8);
        tx.send(hello(self))
            .await
            .map_err(|_| Ended::Closed("the stream closed before the hello was sent"))?;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(path) = &self.endpoint.token_file {
            let token = std::fs::read_to_string(path).map_err(|source| Ended::TokenFile {
                path: path.clone(),
                source,
            })?;
            let value = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| Ended::TokenNotAHeader { path: path.clone() })?;
            request.metadata_mut().insert("authorization", value);
        }
        let seen = Seen::default();
        let open = async {
            let channel = dial.connect(&seen).await?;
            let mut client = FleetClient::new(channel)
                .max_decoding_message_size(MAX_DECODE_BYTES)
                .max_encoding_message_size(MAX_ENCODE_BYTES);
            match client.session(request).await {
                Ok(response) => Ok(response.into_inner()),
                Err(status) => Err(ended_by(&dial, &seen, &status, false).await),
            }
        };
        // One bound for the whole set-up: an aggregator that accepts the TCP connection
        // and then answers nothing must not hold the attempt for longer.
        let mut inbound = tokio::select! {
            r = tokio::time::timeout(SETUP_TIMEOUT, open) => match r {
                Ok(opened) => opened?,
                Err(_) => return Err(Ended::Transport(dial.does_not_answer(&seen))),
            },
            _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
        };
        let established = tokio::time::Instant::now();
        let ended = |end: Ended| SessionEnd::Established {
            end,
            lived: established.elapsed(),
        };
        tracing::info!(aggregator = %address, "connected to the aggregator");
        self.metrics.uplink(address, |u| {
            u.connected = true;
            u.connects += 1;
            u.last_error = None;
        });

        let mut symbols = Symbols::default();
        let mut assembler = Assembler::new(ASSIGNMENT_BOUNDS);
        let mut sent_up_to = self.buffer.stats(self.index).acked_seq;
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        // Set once the symbol table is full: send nothing more, end the stream once
        // what was sent is acked (or at this deadline).
        let mut rotating: Option<tokio::time::Instant> = None;
        loop {
            // Registered before looking at the buffer so that no commit goes unnoticed.
            let committed = self.buffer.committed(self.index);
            let in_flight = self.buffer.count_up_to(self.index, sent_up_to);
            if let Some(deadline) = rotating {
                if in_flight == 0 || tokio::time::Instant::now() >= deadline {
                    return Ok(SessionEnd::Rotate);
                }
            } else {
                let pending = if in_flight >= IN_FLIGHT_MAX {
                    // Wait for acks before sending more: the aggregator may be slow to commit.
                    Vec::new()
                } else {
                    self.buffer.pending_after(self.index, sent_up_to, BATCH_MAX)
                };
                if !pending.is_empty() {
                    let built = symbols.batch(&pending, BATCH_BUDGET);
                    self.count_batch(&built);
                    if built.table_full {
                        tracing::info!(
                            aggregator = %address,
                            symbol_bytes = symbols.bytes,
                            "the stream's symbol table reached {} MiB; ending the stream once what was sent is acked, to start a new one",
                            MAX_TABLE_BYTES >> 20
                        );
                        rotating = Some(tokio::time::Instant::now() + ROTATE_WAIT);
                    }
                    let sent = built.batch.results.len();
                    if sent > 0 || !built.batch.new_symbols.is_empty() {
                        let msg = AgentMessage {
                            msg: Some(agent_message::Msg::Results(built.batch)),
                        };
                        tokio::select! {
                            sent = tx.send(msg) => if sent.is_err() {
                                return Ok(ended(why_closed(&mut inbound, &dial, &seen).await));
                            },
                            _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
                        }
                    }
                    if let Some(last) = built.last_seq {
                        sent_up_to = last;
                    }
                    self.metrics
                        .uplink(address, |u| u.results_sent += sent as u64);
                    if built.last_seq.is_some() {
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = committed => {}
                _ = heartbeat.tick() => {
                    let beat = AgentMessage {
                        msg: Some(agent_message::Msg::Heartbeat(pb::Heartbeat {
                            timestamp_ms: crate::schedule::unix_ms(std::time::SystemTime::now()),
                        })),
                    };
                    if tx.send(beat).await.is_err() {
                        return Ok(ended(why_closed(&mut inbound, &dial, &seen).await));
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(m)) => {
                        if let Some(answer) = self.handle(m, &mut assembler)
                            && tx.send(answer).await.is_err()
                        {
                            return Ok(ended(why_closed(&mut inbound, &dial, &seen).await));
                        }
                    }
                    Ok(None) => return Ok(ended(Ended::Closed("the aggregator closed the stream"))),
                    Err(status) => return Ok(ended(ended_by(&dial, &seen, &status, true).await)),
                },
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
            }
        }
    }

    fn count_batch(&self, built: &Built) {
        if built.truncated > 0 {
            self.metrics
                .symbols_truncated
                .fetch_add(built.truncated, Ordering::Relaxed);
        }
        if built.oversized > 0 {
            self.metrics
                .results_oversized
                .fetch_add(built.oversized, Ordering::Relaxed);
            tracing::warn!(
                aggregator = %self.endpoint.address,
                results = built.oversized,
                "results too large for any message the aggregator accepts were dropped unsent (sonde_agent_results_oversized_total)"
            );
        }
    }

    /// Takes one message of the aggregator; returns what to answer it (the report on
    /// an assignment once its last part arrived or it was refused).
    fn handle(
        &self,
        message: AggregatorMessage,
        assembler: &mut Assembler,
    ) -> Option<AgentMessage> {
        match message.msg {
            Some(aggregator_message::Msg::Ack(ack)) => {
                let removed = self.buffer.ack(self.index, ack.acked_seq);
                self.metrics.uplink(&self.endpoint.address, |u| {
                    u.results_acked += removed as u64
                });
                None
            }
            Some(aggregator_message::Msg::Assignment(part)) => {
                let report = match assembler.push(part) {
                    Step::Incomplete | Step::Ignored => return None,
                    Step::Refused { generation, reason } => {
                        // Once per generation: the assembler ignores the rest of its parts.
                        tracing::warn!(
                            aggregator = %self.endpoint.address,
                            generation,
                            "refused the assignment, keeping the checks of the previous one: {}",
                            cut(&reason, 1000)
                        );
                        pb::AssignmentReport {
                            generation,
                            applied: false,
                            error: cut(&reason, 1000).to_string(),
                            checks: 0,
                            refused: Vec::new(),
                        }
                    }
                    Step::Complete(assignment) => self.apply(assignment),
                };
                Some(AgentMessage {
                    msg: Some(agent_message::Msg::AssignmentReport(report)),
                })
            }
            None => None,
        }
    }
}

/// Why a stream ended or never started.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot read token_file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token_file {} holds characters not allowed in a header", path.display())]
    TokenNotAHeader { path: PathBuf },
    /// The stream closed under the uplink, which says when.
    #[error("{0}")]
    Closed(&'static str),
    /// The connection failed or was lost under the stream: what is wrong and, when
    /// known, what to fix.
    #[error("{0}")]
    Transport(String),
    /// The aggregator ended the stream with this status (its message cut to 1000 bytes).
    #[error("{}", describe_status(*code, message))]
    Status { code: tonic::Code, message: String },
}

impl Ended {
    fn status(status: &tonic::Status) -> Self {
        Self::Status {
            code: status.code(),
            message: cut(status.message(), 1000).to_string(),
        }
    }

    /// The aggregator refused this agent: retrying soon changes nothing.
    fn refused(&self) -> bool {
        matches!(self, Self::Status { code, .. } if is_refusal(*code))
    }
}

/// Why a stream failed with `status`: the aggregator's own status, or (for a status tonic
/// made from a failed connection) what the connection's transcript shows.
async fn ended_by(dial: &Dial, seen: &Seen, status: &tonic::Status, established: bool) -> Ended {
    if std::error::Error::source(status).is_some() {
        Ended::Transport(dial.explain(seen, status, established).await)
    } else {
        Ended::status(status)
    }
}

/// Why the stream closed under a send: the status the aggregator ended it with, if one
/// comes within a moment, or else a lost connection.
async fn why_closed(
    inbound: &mut tonic::Streaming<AggregatorMessage>,
    dial: &Dial,
    seen: &Seen,
) -> Ended {
    match tokio::time::timeout(Duration::from_secs(1), inbound.message()).await {
        Ok(Err(status)) => ended_by(dial, seen, &status, true).await,
        Ok(Ok(None)) => Ended::Closed("the aggregator closed the stream"),
        Ok(Ok(Some(_))) | Err(_) => {
            Ended::Transport(dial.entry.says(sonde_cli::errors::CONNECTION_LOST))
        }
    }
}

/// Refusals retrying soon does not fix: a token the aggregator does not accept, or a
/// protocol version it does not speak (someone must upgrade one side).
fn is_refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition
    )
}

/// The two reconnect backoffs (see the module documentation).
#[derive(Debug)]
struct Backoff {
    network: Duration,
    refused: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            network: BACKOFF_MIN,
            refused: REFUSED_BACKOFF_MIN,
        }
    }
}

impl Backoff {
    fn reset(&mut self) {
        *self = Self::default();
    }

    /// The wait before the next attempt, and the backoff doubled for the one after.
    /// A network error waits 50–100 % of its step (spreading a fleet's reconnects); a
    /// refusal 100–150 % of its step, so never less than [`REFUSED_BACKOFF_MIN`].
    fn next(&mut self, refused: bool, rng: &mut impl Rng) -> Duration {
        if refused {
            let step = self.refused;
            self.refused = (step * 2).min(REFUSED_BACKOFF_MAX);
            step.mul_f64(rng.random_range(1.0..1.5))
        } else {
            let step = self.network;
            self.network = (step * 2).min(BACKOFF_MAX);
            step.mul_f64(rng.random_range(0.5..1.0))
        }
    }
}

enum SessionEnd {
    Shutdown,
    /// The stream was up for `lived` and then ended.
    Established {
        end: Ended,
        lived: Duration,
    },
    /// The symbol table is full: the stream was ended on purpose, to start a new one.
    Rotate,
}

fn hello(up: &Uplink) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Hello(pb::Hello {
            protocol_version: sonde_proto::PROTOCOL_VERSION,
            agent_id: up.agent_id.clone(),
            labels: up.labels.clone().into_iter().collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            local_jobs: up.local_jobs.clone(),
            last_acked_seq: up.buffer.stats(up.index).acked_seq,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ProbeRecord;
    use std::collections::HashMap;
    use symbols::tests::{big_record, encoded};
    #[test]
    fn a_refusal_backs_off_longer_than_a_network_error() {
        let mut rng = rand::rng();
        let mut b = Backoff::default();
        let first = b.next(true, &mut rng);
        assert!(first >= REFUSED_BACKOFF_MIN && first < REFUSED_BACKOFF_MIN.mul_f64(1.5));
        let mut last = first;
        for _ in 0..20 {
            last = b.next(true, &mut rng);
        }
        assert!(last >= REFUSED_BACKOFF_MAX && last <= REFUSED_BACKOFF_MAX.mul_f64(1.5));
        let mut b = Backoff::default();
        let first = b.next(false, &mut rng);
        assert!(first <= BACKOFF_MIN);
        for _ in 0..20 {
            last = b.next(false, &mut rng);
        }
        assert!(last <= BACKOFF_MAX);
        // Without a reset (a stream that ended soon after it was established), the
        // backoff keeps growing; a reset starts it again.
        assert!(b.network == BACKOFF_MAX);
        b.reset();
        assert_eq!(b.network, BACKOFF_MIN);
        assert_eq!(b.refused, REFUSED_BACKOFF_MIN);
    }

    #[test]
    fn refusals_are_told_apart_from_network_errors() {
        for code in [tonic::Code::Unauthenticated, tonic::Code::PermissionDenied] {
            let e = Ended::status(&tonic::Status::new(code, "unknown token"));
            assert!(e.refused());
            let message = e.to_string();
            assert!(message.starts_with("refused"), "{message}");
            assert!(message.contains("unknown token"), "{message}");
        }
        for code in [tonic::Code::Unavailable, tonic::Code::ResourceExhausted] {
            assert!(!Ended::status(&tonic::Status::new(code, "busy")).refused());
        }
        let long = "x".repeat(100_000);
        let e = Ended::status(&tonic::Status::new(tonic::Code::Unauthenticated, long));
        assert!(e.to_string().len() < 2000);
    }

    /// A stand-in aggregator: refuses, fails, or takes and acks every batch.
    mod fake {
        use super::*;
        use sonde_proto::pb::fleet_server::{Fleet, FleetServer};
        use std::pin::Pin;
        use std::sync::atomic::AtomicUsize;
        use tonic::{Request, Response, Status, Streaming};

        #[derive(Clone, Copy)]
        pub enum Mode {
            /// Every stream refused: an unknown token.
            Refuse,
            /// Every stream refused as unavailable, before it is established.
            Unavailable,
            /// Every stream established, then ended at once with `Unavailable`.
            AcceptThenEnd,
            /// Every batch recorded and acked.
            AckAll,
            /// The aggregator's `script` sent after the Hello, then every batch acked.
            Assign,
        }

        #[derive(Clone)]
        pub struct Aggregator {
            mode: Mode,
            pub sessions: Arc<AtomicUsize>,
            /// (session number, batch), in arrival order.
            pub batches: Arc<Mutex<Vec<(usize, pb::ResultBatch)>>>,
            /// What [`Mode::Assign`] sends each stream.
            pub script: Arc<Vec<AggregatorMessage>>,
            pub reports: Arc<Mutex<Vec<pb::AssignmentReport>>>,
        }

        type Stream =
            Pin<Box<dyn futures::Stream<Item = Result<AggregatorMessage, Status>> + Send>>;

        #[tonic::async_trait]
        impl Fleet for Aggregator {
            type SessionStream = Stream;

            async fn session(
                &self,
                request: Request<Streaming<AgentMessage>>,
            ) -> Result<Response<Stream>, Status> {
                let session = self.sessions.fetch_add(1, Ordering::SeqCst) + 1;
                match self.mode {
                    Mode::Refuse => return Err(Status::unauthenticated("unknown token")),
                    Mode::Unavailable => return Err(Status::unavailable("overloaded")),
                    Mode::AcceptThenEnd => {
                        let end = futures::stream::iter([Err(Status::unavailable(
                            "the store refuses commits",
                        ))]);
                        return Ok(Response::new(Box::pin(end)));
                    }
                    Mode::AckAll | Mode::Assign => {}
                }
                let mut inbound = request.into_inner();
                let (tx, rx) = mpsc::channel(1024);
                if matches!(self.mode, Mode::Assign) {
                    for message in self.script.iter() {
                        let _ = tx.try_send(Ok(message.clone()));
                    }
                }
                let batches = self.batches.clone();
                let reports = self.reports.clone();
                tokio::spawn(async move {
                    while let Ok(Some(message)) = inbound.message().await {
                        if let Some(agent_message::Msg::AssignmentReport(r)) = &message.msg {
                            reports.lock().unwrap().push(r.clone());
                        }
                        if let Some(agent_message::Msg::Results(batch)) = message.msg {
                            let acked_seq = batch.results.iter().map(|r| r.seq).max();
                            batches.lock().unwrap().push((session, batch));
                            if let Some(acked_seq) = acked_seq {
                                let ack = AggregatorMessage {
                                    msg: Some(aggregator_message::Msg::Ack(pb::Ack { acked_seq })),
                                };
                                if tx.send(Ok(ack)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                Ok(Response::new(Box::pin(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                )))
            }
        }

        /// Serves on a free loopback port (with tonic's default 4 MiB decode limit, the
        /// aggregator's default); returns its `http://` address.
        pub async fn start(mode: Mode) -> (String, Aggregator) {
            start_with(mode, Vec::new()).await
        }

        pub async fn start_with(
            mode: Mode,
            script: Vec<AggregatorMessage>,
        ) -> (String, Aggregator) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = format!("http://{}", listener.local_addr().unwrap());
            let fake = Aggregator {
                mode,
                sessions: Arc::new(AtomicUsize::new(0)),
                batches: Arc::default(),
                script: Arc::new(script),
                reports: Arc::default(),
            };
            let service = FleetServer::new(fake.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            (address, fake)
        }
    }

    /// An uplink to `address` over an in-memory buffer.
    fn uplink_to(address: &str) -> (Uplink, Arc<Buffer>) {
        let buffer = Buffer::open(None, &[address.to_string()], 1 << 30).unwrap();
        let metrics = Arc::new(AgentMetrics::default());
        let context = Arc::new(crate::probe::ProbeContext::from_system().unwrap());
        let scheduler =
            Scheduler::new("edge-test".into(), context, buffer.clone(), metrics.clone()).unwrap();
        let uplink = Uplink {
            index: 0,
            endpoint: AggregatorEndpoint::new(address),
            agent_id: "edge-test".into(),
            labels: Labels::new(),
            local_jobs: Vec::new(),
            buffer: buffer.clone(),
            scheduler: Arc::new(scheduler),
            metrics,
            file_policy: Arc::new(RwLock::new(FilePolicy::new(&Default::default()).unwrap())),
            logged_refusals: Mutex::default(),
        };
        (uplink, buffer)
    }

    /// Runs the uplink to a fake aggregator in `mode` for `duration`; the fake and the
    /// uplink's last error.
    async fn run_against(mode: fake::Mode, duration: Duration) -> (fake::Aggregator, String) {
        let (address, fake) = fake::start(mode).await;
        let (uplink, _store) = uplink_to(&address);
        let metrics = uplink.metrics.clone();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(uplink.run(stopped));
        tokio::time::sleep(duration).await;
        stop.send(true).unwrap();
        task.await.unwrap();
        let last_error = metrics
            .uplink(&address, |u| u.last_error.clone())
            .unwrap_or_default();
        (fake, last_error)
    }

    #[tokio::test]
    async fn a_refused_agent_says_so_and_waits_before_trying_again() {
        let (fake, last_error) = run_against(fake::Mode::Refuse, Duration::from_secs(2)).await;
        assert!(last_error.starts_with("refused"), "{last_error}");
        assert!(last_error.contains("unknown token"), "{last_error}");
        // The next attempt is at least 30 s away.
        assert_eq!(fake.sessions.load(Ordering::SeqCst), 1);
        // A network-class failure is retried within the same time.
        let (fake, last_error) = run_against(fake::Mode::Unavailable, Duration::from_secs(2)).await;
        assert!(!last_error.contains("refused"), "{last_error}");
        assert!(fake.sessions.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test]
    async fn streams_that_end_at_once_do_not_make_a_tight_loop() {
        let (fake, last_error) =
            run_against(fake::Mode::AcceptThenEnd, Duration::from_secs(4)).await;
        assert!(
            last_error.contains("the store refuses commits"),
            "{last_error}"
        );
        // Backing off 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6, 1.6-3.2 s: at most 6 streams
        // in 4 s (resetting the backoff each time would make 20 or more).
        let sessions = fake.sessions.load(Ordering::SeqCst);
        assert!((2..=6).contains(&sessions), "{sessions} streams in 4s");
    }

    #[tokio::test]
    async fn a_full_symbol_table_moves_the_rest_to_a_new_stream() {
        let (address, fake) = fake::start(fake::Mode::AckAll).await;
        let (uplink, store) = uplink_to(&address);
        // 60 results of 10 distinct 16 KiB label values each: 9.6 MiB of symbols, past
        // the 8 MiB one stream's table may hold, in batches the 4 MiB limit would refuse
        // if they were not split.
        let mut seqs = Vec::new();
        for n in 0..60 {
            let r = big_record(n, 10, MAX_SYMBOL_BYTES - 10);
            seqs.push(
                store
                    .append(&crate::buffer::Route::All, |seq| ProbeRecord {
                        seq,
                        ..(*r).clone()
                    })
                    .unwrap(),
            );
        }
        store.flush();
        let metrics = uplink.metrics.clone();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(uplink.run(stopped));
        let started = tokio::time::Instant::now();
        let all_acked = loop {
            let received: HashSet<u64> = fake
                .batches
                .lock()
                .unwrap()
                .iter()
                .flat_map(|(_, b)| b.results.iter().map(|r| r.seq))
                .collect();
            if seqs.iter().all(|s| received.contains(s)) {
                break true;
            }
            if started.elapsed() > Duration::from_secs(20) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        stop.send(true).unwrap();
        task.await.unwrap();
        let last_error = metrics.uplink(&address, |u| u.last_error.clone());
        assert!(
            all_acked,
            "not every result arrived; last error {last_error:?}"
        );
        let batches = fake.batches.lock().unwrap();
        let mut table_bytes: HashMap<usize, usize> = HashMap::new();
        for (session, batch) in batches.iter() {
            assert!(encoded(batch) <= MAX_ENCODE_BYTES);
            *table_bytes.entry(*session).or_default() +=
                batch.new_symbols.iter().map(String::len).sum::<usize>();
        }
        assert!(table_bytes.len() >= 2, "{table_bytes:?}");
        assert!(
            table_bytes.values().all(|b| *b <= MAX_TABLE_BYTES),
            "{table_bytes:?}"
        );
        // Ending the stream on purpose is not an error and costs no backoff.
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(last_error, None);
    }

    fn part(
        generation: u64,
        part: u32,
        last: bool,
        modules: Vec<pb::AssignedModule>,
        checks: Vec<pb::Check>,
    ) -> AggregatorMessage {
        AggregatorMessage {
            msg: Some(aggregator_message::Msg::Assignment(pb::Assignment {
                generation,
                checks,
                part,
                last,
                modules,
            })),
        }
    }

    #[tokio::test]
    async fn a_refused_assignment_is_reported_and_the_stream_stays() {
        let tcp = || pb::AssignedModule {
            name: "tcp".into(),
            json: r#"{"prober":"tcp"}"#.into(),
        };
        let check = |n: u32, module: u32| pb::Check {
            job: "web".into(),
            instance: format!("127.0.0.1:{}", 10_000 + n),
            interval_ms: 3_600_000,
            timeout_ms: 1_000,
            retries: 0,
            module,
            target: String::new(),
        };
        let script = vec![
            // 1: complete, applied.
            part(1, 0, false, vec![tcp()], vec![check(1, 0)]),
            part(1, 1, true, vec![], vec![check(2, 0)]),
            // 2: a part skipped.
            part(2, 0, false, vec![tcp()], vec![check(3, 0)]),
            part(2, 2, true, vec![], vec![check(4, 0)]),
            // 3: a module index out of range.
            part(3, 0, true, vec![tcp()], vec![check(5, 0), check(6, 1)]),
            // 4: dropped incomplete by 5.
            part(4, 0, false, vec![tcp()], vec![check(7, 0)]),
            // 5: applied, with one module the agent cannot read.
            part(
                5,
                0,
                true,
                vec![
                    tcp(),
                    pb::AssignedModule {
                        name: "future".into(),
                        json: r#"{"prober":"quantum"}"#.into(),
                    },
                ],
                vec![check(8, 0), check(9, 1), check(10, 1)],
            ),
        ];
        let (address, fake) = fake::start_with(fake::Mode::Assign, script).await;
        let (uplink, _store) = uplink_to(&address);
        let scheduler = uplink.scheduler.clone();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(uplink.run(stopped));
        let started = tokio::time::Instant::now();
        while fake.reports.lock().unwrap().len() < 4 && started.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let running: Vec<String> = scheduler
            .checks()
            .into_iter()
            .map(|(_, c)| c.instance)
            .collect();
        stop.send(true).unwrap();
        task.await.unwrap();
        let reports = fake.reports.lock().unwrap().clone();
        let summary: Vec<(u64, bool, u64)> = reports
            .iter()
            .map(|r| (r.generation, r.applied, r.checks))
            .collect();
        assert_eq!(
            summary,
            [(1, true, 2), (2, false, 0), (3, false, 0), (5, true, 1)]
        );
        assert!(reports[1].error.contains("part 2"), "{}", reports[1].error);
        assert!(
            reports[2].error.contains("refers to module 1"),
            "{}",
            reports[2].error
        );
        let refused = &reports[3].refused;
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].reason, "bad_module");
        assert_eq!(refused[0].checks, 2);
        assert!(
            refused[0].example.contains("future"),
            "{}",
            refused[0].example
        );
        assert_eq!(running, ["127.0.0.1:10008"]);
        // Refusing is not a reason to reconnect.
        assert_eq!(fake.sessions.load(Ordering::SeqCst), 1);
    }
}
