//! The simulated agents: each drives its schedule to the end of a phase over one link,
//! sonde.v1 to an aggregator (or the ingest floor) or remote write 1.0 to vmagent.

use crate::load::{Batching, Due, Plan, Schedule, Shape, probe_duration, value};
use crate::{WAIT_START, now_ms};
use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prost::Message;
use sonde_proto::pb::{
    self, AgentMessage, AggregatorMessage, agent_message, aggregator_message,
    fleet_client::FleetClient,
};
use sonde_proto::prompb;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Unacked results a real agent holds in flight before it stops sending
/// (`IN_FLIGHT_MAX` in agent/src/uplink/mod.rs); the simulated agents wait the same way.
const IN_FLIGHT_MAX: usize = 20_000;
/// The real agent's heartbeat period (`HEARTBEAT_EVERY` in agent/src/uplink/mod.rs).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// What one agent saw of its deliveries.
#[derive(Default)]
pub struct AgentStats {
    /// Batch sent → its acknowledgement, in microseconds.
    pub latencies_us: Vec<u32>,
    pub results_sent: u64,
    /// Of those, sent once the first interval was over: every series exists by then.
    pub results_sent_warm: u64,
    pub results_acked: u64,
    pub batches: u64,
    /// Times the agent had to wait because IN_FLIGHT_MAX results were unacked.
    pub stalls: u64,
    /// Times the connection was found closed and opened again.
    pub reconnects: u64,
    pub errors: Vec<String>,
    /// When (since the phase start) it sent the failed result of the failing target.
    pub failure_sent: Option<Duration>,
}

/// The sonde.v1 side of one simulated agent: the outgoing half of its stream, and the
/// batches awaiting their ack.
pub struct GrpcAgent {
    tx: mpsc::Sender<AgentMessage>,
    seq: u64,
    /// Symbol indexes of each shape: (name, [label name, label value]...).
    interned: Vec<(u32, Vec<u32>)>,
    /// Symbols not yet sent (the whole table, before the first batch).
    unsent_symbols: Vec<String>,
    window: Arc<AckWindow>,
    reader: tokio::task::JoinHandle<()>,
}

/// Batches sent and not yet acked, shared by the sending half and the stream reader.
#[derive(Default)]
pub struct AckWindow {
    /// (last seq of the batch, sent at, results in it), oldest first.
    pending: Mutex<VecDeque<(u64, Instant, usize)>>,
    unacked: AtomicUsize,
    acked: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    assignments: AtomicU64,
    ended: Mutex<Option<String>>,
    closed: AtomicBool,
}

impl AckWindow {
    fn ack(&self, acked_seq: u64) {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap();
        let mut latencies = self.latencies_us.lock().unwrap();
        while let Some(&(last, sent, n)) = pending.front() {
            if last > acked_seq {
                break;
            }
            pending.pop_front();
            latencies.push(now.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
            self.unacked.fetch_sub(n, Ordering::Relaxed);
            self.acked.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

fn hello(agent_id: &str) -> pb::Hello {
    pb::Hello {
        protocol_version: sonde_proto::PROTOCOL_VERSION,
        agent_id: agent_id.to_string(),
        labels: [("site".to_string(), "sim".to_string())].into(),
        version: "fleet-sim".into(),
        local_jobs: vec![],
        last_acked_seq: 0,
    }
}

pub fn agent_id(agent: usize) -> String {
    format!("sim-{agent:04}")
}

impl GrpcAgent {
    /// Connects, says Hello and waits for the first Assignment (without reading it: the
    /// simulator knows the targets from the config it wrote).
    pub async fn connect(grpc: &str, agent: usize, shapes: &[Shape]) -> anyhow::Result<Self> {
        let id = agent_id(agent);
        let mut client = FleetClient::connect(grpc.to_string())
            .await
            .with_context(|| format!("{id}: cannot connect to the aggregator at {grpc}"))?
            // An assignment lists every target of the agent; the agent accepts 64 MiB.
            .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(64);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(hello(&id))),
        })
        .await
        .map_err(|_| anyhow!("{id}: stream closed before Hello"))?;
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .with_context(|| format!("{id}: the aggregator refused the stream"))?
            .into_inner();
        match tokio::time::timeout(WAIT_START, inbound.message()).await {
            Ok(Ok(Some(AggregatorMessage {
                msg: Some(aggregator_message::Msg::Assignment(_)),
            }))) => {}
            Ok(other) => {
                return Err(anyhow!("{id}: expected an Assignment first, got {other:?}"));
            }
            Err(_) => return Err(anyhow!("{id}: no Assignment within {WAIT_START:?}")),
        }
        let window = Arc::new(AckWindow::default());
        window.assignments.fetch_add(1, Ordering::Relaxed);
        let reader = tokio::spawn(read_stream(inbound, window.clone()));
        tokio::spawn(heartbeats(tx.downgrade()));

        let mut symbols: Vec<String> = Vec::new();
        let mut intern = |s: &str| -> u32 {
            match symbols.iter().position(|x| x == s) {
                Some(i) => i as u32,
                None => {
                    symbols.push(s.to_string());
                    (symbols.len() - 1) as u32
                }
            }
        };
        let interned = shapes
            .iter()
            .map(|s| {
                let name = intern(&s.name);
                let labels = s
                    .labels
                    .iter()
                    .flat_map(|(k, v)| [intern(k), intern(v)])
                    .collect();
                (name, labels)
            })
            .collect();
        Ok(Self {
            tx,
            seq: 0,
            interned,
            unsent_symbols: symbols,
            window,
            reader,
        })
    }

    pub async fn send(&mut self, plan: &Plan, dues: &[Due], stats: &mut AgentStats) {
        while self.window.unacked.load(Ordering::Relaxed) >= IN_FLIGHT_MAX {
            stats.stalls += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let results: Vec<pb::ProbeResult> = dues
            .iter()
            .map(|d| {
                self.seq += 1;
                let (job, instance) = &plan.targets.all[d.target];
                pb::ProbeResult {
                    seq: self.seq,
                    job: job.to_string(),
                    instance: instance.to_string(),
                    timestamp_ms: d.timestamp_ms,
                    success: d.success,
                    duration_seconds: probe_duration(d.i),
                    samples: plan
                        .shapes
                        .iter()
                        .zip(&self.interned)
                        .map(|(shape, (name, labels))| pb::Sample {
                            name: *name,
                            labels: labels.clone(),
                            value: value(shape, d.success, d.i),
                        })
                        .collect(),
                    generation: 1,
                    failure: if d.success {
                        String::new()
                    } else {
                        "simulated outage".into()
                    },
                    trace: None,
                }
            })
            .collect();
        let batch = pb::ResultBatch {
            new_symbols: std::mem::take(&mut self.unsent_symbols),
            results,
        };
        self.window.unacked.fetch_add(dues.len(), Ordering::Relaxed);
        self.window
            .pending
            .lock()
            .unwrap()
            .push_back((self.seq, Instant::now(), dues.len()));
        stats.batches += 1;
        stats.results_sent += dues.len() as u64;
        if plan.start.elapsed() >= plan.load.interval {
            stats.results_sent_warm += dues.len() as u64;
        }
        let message = AgentMessage {
            msg: Some(agent_message::Msg::Results(batch)),
        };
        if self.tx.send(message).await.is_err() && stats.errors.is_empty() {
            let why = self.window.ended.lock().unwrap().clone();
            stats.errors.push(format!(
                "the stream ended while sending: {}",
                why.unwrap_or_else(|| "no reason given".into())
            ));
        }
    }

    /// Waits (bounded) for every batch to be acked, then closes the stream.
    pub async fn finish(self, stats: &mut AgentStats) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.window.unacked.load(Ordering::Relaxed) > 0
            && !self.window.closed.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let unacked = self.window.unacked.load(Ordering::Relaxed);
        if unacked > 0 {
            stats.errors.push(format!(
                "{unacked} results never acked ({})",
                self.window
                    .ended
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_else(|| "waited 120s".into())
            ));
        }
        drop(self.tx);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.reader).await;
        stats.results_acked = self.window.acked.load(Ordering::Relaxed);
        stats.latencies_us = std::mem::take(&mut self.window.latencies_us.lock().unwrap());
    }
}

/// Sends a Heartbeat every [`HEARTBEAT_EVERY`] as the real agent does, from the Hello on
/// (an agent whose first slot is late in the interval would otherwise look silent and
/// be dropped), until the stream's sender is dropped.
async fn heartbeats(tx: mpsc::WeakSender<AgentMessage>) {
    let mut ticker = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        ticker.tick().await;
        let Some(tx) = tx.upgrade() else { return };
        let beat = AgentMessage {
            msg: Some(agent_message::Msg::Heartbeat(pb::Heartbeat {
                timestamp_ms: now_ms(),
            })),
        };
        if tx.send(beat).await.is_err() {
            return;
        }
    }
}

/// Reads the aggregator's side of the stream continuously: acks close batches,
/// assignments are counted and otherwise ignored.
async fn read_stream(mut inbound: tonic::Streaming<AggregatorMessage>, window: Arc<AckWindow>) {
    let why = loop {
        match inbound.message().await {
            Ok(Some(AggregatorMessage {
                msg: Some(aggregator_message::Msg::Ack(a)),
            })) => window.ack(a.acked_seq),
            Ok(Some(AggregatorMessage {
                msg: Some(aggregator_message::Msg::Assignment(_)),
            })) => {
                window.assignments.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(_)) => {}
            Ok(None) => break "the aggregator closed the stream".to_string(),
            Err(status) => break format!("stream error: {status}"),
        }
    };
    *window.ended.lock().unwrap() = Some(why);
    window.closed.store(true, Ordering::Relaxed);
}

/// The anchor's side of one simulated agent: remote write 1.0 to vmagent on a
/// keep-alive HTTP/1.1 connection.
pub struct RemoteWriteAgent {
    id: String,
    address: String,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl RemoteWriteAgent {
    pub async fn connect(address: &str, agent: usize) -> anyhow::Result<Self> {
        Ok(Self {
            id: agent_id(agent),
            address: address.to_string(),
            sender: Self::open(address).await?,
        })
    }

    async fn open(
        address: &str,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .with_context(|| format!("cannot connect to vmagent at {address}"))?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .with_context(|| format!("HTTP handshake with vmagent at {address}"))?;
        tokio::spawn(connection);
        Ok(sender)
    }

    pub async fn send(&mut self, plan: &Plan, dues: &[Due], stats: &mut AgentStats) {
        let label = |name: &str, value: &str| prompb::Label {
            name: name.into(),
            value: value.into(),
        };
        let mut timeseries = Vec::with_capacity(dues.len() * plan.shapes.len());
        for d in dues {
            let (job, instance) = &plan.targets.all[d.target];
            for shape in &plan.shapes {
                let mut labels = vec![
                    label("__name__", &shape.name),
                    label("agent", &self.id),
                    label("instance", instance),
                    label("job", job),
                    label("sim", "anchor"),
                ];
                labels.extend(shape.labels.iter().map(|(k, v)| label(k, v)));
                labels.sort_by(|a, b| a.name.cmp(&b.name));
                timeseries.push(prompb::TimeSeries {
                    labels,
                    samples: vec![prompb::Sample {
                        value: value(shape, d.success, d.i),
                        timestamp: d.timestamp_ms,
                    }],
                });
            }
        }
        let body = prompb::WriteRequest {
            timeseries,
            metadata: vec![],
        }
        .encode_to_vec();
        let body = match snap::raw::Encoder::new().compress_vec(&body) {
            Ok(b) => b,
            Err(e) => {
                stats.errors.push(format!("snappy: {e}"));
                return;
            }
        };
        let body = Bytes::from(body);
        stats.batches += 1;
        stats.results_sent += dues.len() as u64;
        if plan.start.elapsed() >= plan.load.interval {
            stats.results_sent_warm += dues.len() as u64;
        }
        let sent = Instant::now();
        let mut outcome = self.post(body.clone()).await;
        if outcome.is_err() && self.sender.is_closed() {
            // vmagent closed the keep-alive connection: connect again and resend, as a
            // remote-write client does.
            stats.reconnects += 1;
            outcome = match Self::open(&self.address).await {
                Ok(sender) => {
                    self.sender = sender;
                    self.post(body).await
                }
                Err(e) => Err(e),
            };
        }
        match outcome {
            Ok(()) => {
                stats
                    .latencies_us
                    .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                stats.results_acked += dues.len() as u64;
            }
            Err(e) => {
                if stats.errors.len() < 5 {
                    stats.errors.push(format!("{e:#}"));
                }
            }
        }
    }

    async fn post(&mut self, body: Bytes) -> anyhow::Result<()> {
        let request = http::Request::post("/api/v1/write")
            .header("Host", &self.address)
            .header("Content-Type", "application/x-protobuf")
            .header("Content-Encoding", "snappy")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(Full::new(body))
            .context("building the request")?;
        self.sender.ready().await.context("connection to vmagent")?;
        let response = self
            .sender
            .send_request(request)
            .await
            .context("POST to vmagent")?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading vmagent's answer")?
            .to_bytes();
        if status.is_success() {
            Ok(())
        } else {
            Err(anyhow!(
                "vmagent answered {status}: {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }
}

pub enum Link {
    Grpc(Box<GrpcAgent>),
    RemoteWrite(Box<RemoteWriteAgent>),
}

/// Runs one agent's schedule to the end of the phase over `link`.
pub async fn drive(plan: Arc<Plan>, agent: usize, mut link: Link) -> AgentStats {
    let mut stats = AgentStats::default();
    let mut schedule = Schedule::new(&plan, agent);
    let mut ticker = tokio::time::interval_at(plan.start, plan.load.flush);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dues = Vec::new();
    while !schedule.done() {
        match plan.load.batching {
            Batching::Flush => {
                ticker.tick().await;
            }
            Batching::Agent => {
                let at = Duration::from_secs_f64(schedule.next_send_ms().max(0.0) / 1000.0);
                tokio::time::sleep_until(plan.start + at).await;
            }
        }
        let now_ms = plan.start.elapsed().as_secs_f64() * 1000.0;
        let had_failure = schedule.fail_reported;
        schedule.take_ready(&plan, now_ms, &mut dues);
        if !had_failure && schedule.fail_reported {
            stats.failure_sent = Some(plan.start.elapsed());
        }
        for chunk in dues.chunks(plan.load.batch) {
            match &mut link {
                Link::Grpc(a) => a.send(&plan, chunk, &mut stats).await,
                Link::RemoteWrite(a) => a.send(&plan, chunk, &mut stats).await,
            }
        }
        dues.clear();
    }
    if let Link::Grpc(a) = link {
        a.finish(&mut stats).await;
    }
    stats
}
