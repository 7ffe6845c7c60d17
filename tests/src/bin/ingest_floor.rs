//! ingest-floor: the least work an aggregator can do for fleet-sim's load, as a process
//! fleet-sim drives in place of `sonde-aggregator`: its floor phase, in the same run as
//! the aggregator's (or alone, `fleet-sim --aggregator target/release/ingest-floor`). It
//! is the floor the aggregator's CPU per sample is compared with (docs/benchmarks.md,
//! "The ingest floor"), as probe-bench compares `/probe` with a connect loop. It writes
//! to whatever receiver fleet-sim gives it: VictoriaMetrics or fleet-sim's sink.
//!
//! It keeps what the contract makes every aggregator pay, and nothing else:
//! - the fleet protocol as it is: one gRPC stream per agent (tonic, like the
//!   aggregator), an `Ack` per batch; each `ResultBatch` read in place, without a
//!   value built per result or per sample, and each agent's targets found by job and
//!   instance on the stream's own task;
//! - each batch made durable before its ack: its samples appended to a file in compact
//!   form (series, timestamp, value: 20 bytes), one `write(2)` per batch, no fsync (the
//!   aggregator's SQLite runs `synchronous=NORMAL`: a commit survives a SIGKILL, not a
//!   power loss; a write to the page cache does the same);
//! - remote write 1.0 out: every sample a `TimeSeries` with its full label set (each
//!   series' labels encoded once, on first sight, and copied per sample), snappy, one
//!   keep-alive HTTP/1.1 connection, requests of up to 2,000 samples;
//! - `up` per target (the last result's success, at most one sample per target a
//!   second), so that fleet-sim's failure detection has something to find.
//!
//! What it leaves out, which the aggregator must do: merging the agents' views, freshness
//! and missing jobs, validation and limits, retries and a bounded on-disk queue that
//! survives a receiver outage, the status pages. Whatever it costs per sample is what
//! any design pays on this machine with these protocols.
//!
//! Flags: the aggregator's `--config.file` (only `remote_write`'s first `url:` is read),
//! `--web.listen-address` (`/-/healthy`, and `/metrics` with the queue's size),
//! `--grpc.listen-address` and `--storage.path`; others are ignored.

use bytes::{Buf, Bytes};
use prost::Message;
use sonde_proto::pb::{self, AggregatorMessage, aggregator_message};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::{Request, Response, Status, Streaming};

/// Samples per remote-write request (the aggregator's `max_samples_per_send` default).
const PER_REQUEST: usize = 2000;
/// A request that has not filled goes out after this long.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

struct Flags {
    config: PathBuf,
    web: SocketAddr,
    grpc: SocketAddr,
    storage: PathBuf,
}

fn flags() -> Result<Flags, String> {
    let mut found: HashMap<String, String> = HashMap::new();
    for arg in std::env::args().skip(1) {
        if let Some((k, v)) = arg.split_once('=') {
            found.insert(k.to_string(), v.to_string());
        }
    }
    let get = |name: &str| {
        found
            .get(name)
            .cloned()
            .ok_or_else(|| format!("ingest-floor: {name}=... is required"))
    };
    let addr = |name: &str| -> Result<SocketAddr, String> {
        get(name)?
            .parse()
            .map_err(|e| format!("ingest-floor: {name}: {e}"))
    };
    Ok(Flags {
        config: get("--config.file")?.into(),
        web: addr("--web.listen-address")?,
        grpc: addr("--grpc.listen-address")?,
        storage: get("--storage.path")?.into(),
    })
}

/// The first `url:` under `remote_write:`, split into host:port and path.
fn remote_write_url(config: &str) -> Result<(String, String), String> {
    let after = config
        .split_once("remote_write:")
        .ok_or("ingest-floor: the config has no remote_write block")?
        .1;
    let url = after
        .lines()
        .find_map(|l| l.trim().trim_start_matches("- ").strip_prefix("url:"))
        .ok_or("ingest-floor: remote_write has no url")?
        .trim();
    let rest = url
        .strip_prefix("http://")
        .ok_or("ingest-floor: only http:// remote_write urls")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    Ok((host.to_string(), path.to_string()))
}

// ---------------------------------------------------------------------------------------
// Remote write 1.0 by hand: the per-series label bytes are built once.

fn varint(buf: &mut Vec<u8>, v: u64) {
    prost::encoding::encode_varint(v, buf);
}

fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}

/// `Label` fields (field 1 of `TimeSeries`) of `labels`, sorted by name.
fn encode_labels(mut labels: Vec<(&str, &str)>) -> Box<[u8]> {
    labels.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::new();
    for (k, v) in labels {
        let inner =
            1 + varint_len(k.len() as u64) + k.len() + 1 + varint_len(v.len() as u64) + v.len();
        out.push(0x0a);
        varint(&mut out, inner as u64);
        out.push(0x0a);
        varint(&mut out, k.len() as u64);
        out.extend_from_slice(k.as_bytes());
        out.push(0x12);
        varint(&mut out, v.len() as u64);
        out.extend_from_slice(v.as_bytes());
    }
    out.into_boxed_slice()
}

/// Appends one `TimeSeries` with one sample to a `WriteRequest` body.
fn push_timeseries(body: &mut Vec<u8>, labels: &[u8], ts: i64, value: f64) {
    let sample = 1 + 8 + 1 + varint_len(ts as u64);
    let series = labels.len() + 1 + varint_len(sample as u64) + sample;
    body.push(0x0a);
    varint(body, series as u64);
    body.extend_from_slice(labels);
    body.push(0x12);
    varint(body, sample as u64);
    body.push(0x09);
    body.extend_from_slice(&value.to_le_bytes());
    body.push(0x10);
    varint(body, ts as u64);
}

// ---------------------------------------------------------------------------------------
// The pipeline: series, the durable log, the request being filled.

struct Series {
    id: u32,
    /// The sample's shape it was built for: name symbol, label symbols as sent.
    name: u64,
    label_syms: Box<[u8]>,
    labels: Box<[u8]>,
    last_ts: i64,
}

struct Target {
    samples: Vec<Series>,
}

struct UpSeries {
    labels: Box<[u8]>,
    last_ts: i64,
}

type Map<V> = HashMap<Box<[u8]>, V, foldhash::fast::RandomState>;

struct Pipeline {
    next_id: u32,
    up: Map<Map<UpSeries>>,
    out: Output,
}

/// Where samples go: the durable log and the request being filled.
struct Output {
    log: File,
    record: Vec<u8>,
    body: Vec<u8>,
    in_body: usize,
    requests: std_mpsc::SyncSender<(Vec<u8>, usize)>,
}

struct Shared {
    pipeline: Mutex<Pipeline>,
    /// Samples taken and not yet accepted by the receiver.
    queued: AtomicU64,
}

impl Shared {
    /// The pipeline writing its log to `log`, and where its requests come out.
    fn new(log: File) -> (Self, std_mpsc::Receiver<(Vec<u8>, usize)>) {
        let (requests, to_send) = std_mpsc::sync_channel(64);
        let shared = Shared {
            pipeline: Mutex::new(Pipeline {
                next_id: 0,
                up: Map::default(),
                out: Output {
                    log,
                    record: Vec::new(),
                    body: Vec::new(),
                    in_body: 0,
                    requests,
                },
            }),
            queued: AtomicU64::new(0),
        };
        (shared, to_send)
    }
}

impl Output {
    fn sample(&mut self, id: u32, labels: &[u8], ts: i64, value: f64) {
        self.record.extend_from_slice(&id.to_le_bytes());
        self.record.extend_from_slice(&ts.to_le_bytes());
        self.record.extend_from_slice(&value.to_le_bytes());
        push_timeseries(&mut self.body, labels, ts, value);
        self.in_body += 1;
    }

    fn flush_if(&mut self, full_only: bool) {
        if self.in_body >= PER_REQUEST || (!full_only && self.in_body > 0) {
            let capacity = self.body.len();
            let body = std::mem::replace(&mut self.body, Vec::with_capacity(capacity));
            let n = std::mem::take(&mut self.in_body);
            let _ = self.requests.send((body, n));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading `AgentMessage` bytes in place: no allocation per result or sample.

fn bad(what: &str) -> Status {
    Status::invalid_argument(format!("malformed {what}"))
}

struct Wire<'a> {
    buf: &'a [u8],
}

enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, Status> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or_else(|| bad("varint"))?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(bad("varint"))
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, Status> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                let (v, rest) = self
                    .buf
                    .split_first_chunk::<8>()
                    .ok_or_else(|| bad("fixed64"))?;
                self.buf = rest;
                Field::Fixed64(u64::from_le_bytes(*v))
            }
            2 => {
                let n = self.varint()? as usize;
                if n > self.buf.len() {
                    return Err(bad("length"));
                }
                let (v, rest) = self.buf.split_at(n);
                self.buf = rest;
                Field::Bytes(v)
            }
            5 => {
                let (_, rest) = self
                    .buf
                    .split_first_chunk::<4>()
                    .ok_or_else(|| bad("fixed32"))?;
                self.buf = rest;
                Field::Varint(0)
            }
            _ => return Err(bad("wire type")),
        };
        Ok(Some((key >> 3, field)))
    }
}

/// One agent's stream: its symbols and its targets' series (by job, then instance).
struct Agent {
    id: String,
    symbols: Vec<String>,
    targets: Map<Map<Target>>,
}

fn entry<'a, V>(map: &'a mut Map<V>, key: &[u8], new: impl FnOnce() -> V) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.into(), new());
    }
    map.get_mut(key).expect("just inserted")
}

fn text(bytes: &[u8]) -> Result<&str, Status> {
    std::str::from_utf8(bytes).map_err(|_| bad("string"))
}

/// A sample as sent: name symbol, packed label symbols, value.
#[derive(Clone, Copy)]
struct RawSample<'a> {
    name: u64,
    labels: &'a [u8],
    value: f64,
}

fn raw_sample(bytes: &[u8]) -> Result<RawSample<'_>, Status> {
    let mut sample = RawSample {
        name: 0,
        labels: &[],
        value: 0.0,
    };
    let mut wire = Wire { buf: bytes };
    while let Some((tag, field)) = wire.next()? {
        match (tag, field) {
            (1, Field::Varint(v)) => sample.name = v,
            (2, Field::Bytes(b)) => sample.labels = b,
            (3, Field::Fixed64(v)) => sample.value = f64::from_bits(v),
            _ => return Err(bad("sample")),
        }
    }
    Ok(sample)
}

impl Target {
    /// The series of the `index`-th sample, built again when the sample's shape changed.
    fn series(
        &mut self,
        index: usize,
        sample: RawSample<'_>,
        symbols: &[String],
        base: [(&str, &str); 3],
        next_id: &mut u32,
    ) -> Result<&mut Series, Status> {
        let fits = self
            .samples
            .get(index)
            .is_some_and(|s| s.name == sample.name && *s.label_syms == *sample.labels);
        if !fits {
            let sym = |i: u64| {
                symbols
                    .get(i as usize)
                    .map(String::as_str)
                    .ok_or_else(|| Status::invalid_argument("symbol out of range"))
            };
            let mut labels = vec![("__name__", sym(sample.name)?)];
            labels.extend(base);
            let mut wire = Wire { buf: sample.labels };
            while !wire.buf.is_empty() {
                labels.push((sym(wire.varint()?)?, sym(wire.varint()?)?));
            }
            let series = Series {
                id: *next_id,
                name: sample.name,
                label_syms: sample.labels.into(),
                labels: encode_labels(labels),
                last_ts: i64::MIN,
            };
            *next_id += 1;
            match index.cmp(&self.samples.len()) {
                std::cmp::Ordering::Less => self.samples[index] = series,
                std::cmp::Ordering::Equal => self.samples.push(series),
                std::cmp::Ordering::Greater => return Err(bad("sample index")),
            }
        }
        Ok(&mut self.samples[index])
    }
}

/// Takes one `ResultBatch`; returns the seq to ack.
fn take_batch(shared: &Shared, agent: &mut Agent, batch: &[u8]) -> Result<u64, Status> {
    let Agent {
        id,
        symbols,
        targets,
    } = agent;
    let mut results = Vec::new();
    let mut wire = Wire { buf: batch };
    while let Some((tag, field)) = wire.next()? {
        match (tag, field) {
            (1, Field::Bytes(s)) => symbols.push(text(s)?.to_string()),
            (2, Field::Bytes(r)) => results.push(r),
            _ => return Err(bad("batch")),
        }
    }
    let mut samples: Vec<RawSample<'_>> = Vec::new();
    let mut guard = shared.pipeline.lock().unwrap();
    let p = &mut *guard;
    let mut last_seq = 0;
    let mut taken = 0u64;
    for result in results {
        let (mut job, mut instance, mut ts, mut success) = (&[][..], &[][..], 0i64, false);
        samples.clear();
        let mut wire = Wire { buf: result };
        while let Some((tag, field)) = wire.next()? {
            match (tag, field) {
                (1, Field::Varint(v)) => last_seq = v,
                (2, Field::Bytes(b)) => job = b,
                (3, Field::Bytes(b)) => instance = b,
                (4, Field::Varint(v)) => ts = v as i64,
                (5, Field::Varint(v)) => success = v != 0,
                (7, Field::Bytes(b)) => samples.push(raw_sample(b)?),
                _ => {}
            }
        }
        let target = entry(entry(targets, job, Map::default), instance, || Target {
            samples: Vec::new(),
        });
        let (job, instance) = (text(job)?, text(instance)?);
        let base = [("agent", id.as_str()), ("job", job), ("instance", instance)];
        for (i, sample) in samples.iter().enumerate() {
            let series = target.series(i, *sample, symbols, base, &mut p.next_id)?;
            if ts <= series.last_ts {
                continue;
            }
            series.last_ts = ts;
            p.out.sample(series.id, &series.labels, ts, sample.value);
            taken += 1;
        }
        let up = entry(
            entry(&mut p.up, job.as_bytes(), Map::default),
            instance.as_bytes(),
            || UpSeries {
                labels: encode_labels(vec![
                    ("__name__", "up"),
                    ("job", job),
                    ("instance", instance),
                ]),
                last_ts: i64::MIN,
            },
        );
        if ts >= up.last_ts.saturating_add(1000) {
            up.last_ts = ts;
            let value = if success { 1.0 } else { 0.0 };
            p.out.sample(u32::MAX, &up.labels, ts, value);
            taken += 1;
        }
    }
    let out = &mut p.out;
    out.log
        .write_all(&out.record)
        .map_err(|e| Status::unavailable(format!("cannot write the log: {e}")))?;
    out.record.clear();
    shared.queued.fetch_add(taken, Ordering::Relaxed);
    out.flush_if(true);
    Ok(last_seq)
}

// ---------------------------------------------------------------------------------------
// The gRPC service, by hand, so that messages arrive as bytes.

/// Decodes nothing: an `AgentMessage` arrives as its bytes.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawDecoder;

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = AggregatorMessage;
    type Decode = Bytes;
    type Encoder =
        <tonic_prost::ProstCodec<AggregatorMessage, pb::Hello> as tonic::codec::Codec>::Encoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> Self::Encoder {
        tonic::codec::Codec::encoder(
            &mut tonic_prost::ProstCodec::<AggregatorMessage, pb::Hello>::default(),
        )
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<AggregatorMessage, Status>> + Send>>;

struct Session(Arc<Shared>);

impl tonic::server::StreamingService<Bytes> for Session {
    type Response = AggregatorMessage;
    type ResponseStream = Outbound;
    type Future = BoxFuture<Response<Outbound>, Status>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                let mut agent: Option<Agent> = None;
                while let Ok(Some(message)) = inbound.message().await {
                    let reply = match answer(&shared, &mut agent, &message) {
                        Ok(Some(reply)) => reply,
                        Ok(None) => continue,
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    };
                    if tx
                        .send(Ok(AggregatorMessage { msg: Some(reply) }))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
            Ok(Response::new(
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Outbound,
            ))
        })
    }
}

fn answer(
    shared: &Shared,
    agent: &mut Option<Agent>,
    message: &[u8],
) -> Result<Option<aggregator_message::Msg>, Status> {
    let mut wire = Wire { buf: message };
    let Some((tag, Field::Bytes(inner))) = wire.next()? else {
        return Ok(None);
    };
    match tag {
        1 => {
            let hello = pb::Hello::decode(inner).map_err(|_| bad("hello"))?;
            *agent = Some(Agent {
                id: hello.agent_id,
                symbols: Vec::new(),
                targets: Map::default(),
            });
            Ok(Some(aggregator_message::Msg::Assignment(pb::Assignment {
                generation: 1,
                last: true,
                ..Default::default()
            })))
        }
        2 => {
            let agent = agent
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("results before hello"))?;
            let acked_seq = take_batch(shared, agent, inner)?;
            Ok(Some(aggregator_message::Msg::Ack(pb::Ack { acked_seq })))
        }
        _ => Ok(None),
    }
}

#[derive(Clone)]
struct FleetFloor(Arc<Shared>);

impl tonic::server::NamedService for FleetFloor {
    const NAME: &'static str = "sonde.v1.Fleet";
}

impl<B> Service<http::Request<B>> for FleetFloor
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(64 << 20), None);
            Ok(grpc.streaming(Session(shared), request).await)
        })
    }
}

// ---------------------------------------------------------------------------------------
// The sender: snappy, one keep-alive HTTP/1.1 connection.

fn post(
    conn: &mut Option<BufReader<TcpStream>>,
    host: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<u16> {
    if conn.is_none() {
        let stream = TcpStream::connect(host)?;
        // The head and the body are two writes: with Nagle's algorithm the body would
        // wait for the receiver's delayed ACK of the head, some 40 ms per request.
        stream.set_nodelay(true)?;
        *conn = Some(BufReader::new(stream));
    }
    let reader = conn.as_mut().expect("connected");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\nX-Prometheus-Remote-Write-Version: 0.1.0\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let stream = reader.get_mut();
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut rest = vec![0; length];
    reader.read_exact(&mut rest)?;
    Ok(status)
}

fn sender(
    requests: std_mpsc::Receiver<(Vec<u8>, usize)>,
    shared: Arc<Shared>,
    host: String,
    path: String,
) {
    let mut encoder = snap::raw::Encoder::new();
    let mut compressed = Vec::new();
    let mut conn = None;
    while let Ok((body, samples)) = requests.recv() {
        compressed.resize(snap::raw::max_compress_len(body.len()), 0);
        let n = match encoder.compress(&body, &mut compressed) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("ingest-floor: snappy: {e}");
                continue;
            }
        };
        for attempt in 0..100 {
            match post(&mut conn, &host, &path, &compressed[..n]) {
                Ok(s) if (200..300).contains(&s) => break,
                Ok(s) => eprintln!("ingest-floor: the receiver answered {s}"),
                Err(e) => {
                    conn = None;
                    eprintln!("ingest-floor: POST {host}{path}: {e} (attempt {attempt})");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        shared.queued.fetch_sub(samples as u64, Ordering::Relaxed);
    }
}

/// `/-/healthy`, and `/metrics` with the two series fleet-sim reads.
fn web(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => continue,
        });
        let mut first = String::new();
        if reader.read_line(&mut first).is_err() {
            continue;
        }
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let body = if first.starts_with("GET /metrics") {
            format!(
                "sonde_remote_write_queue_samples{{remote_name=\"victoriametrics\"}} {}\nsonde_results_refused_total{{agent=\"\",reason=\"none\"}} 0\n",
                shared.queued.load(Ordering::Relaxed)
            )
        } else {
            "ok\n".to_string()
        };
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn main() -> Result<(), String> {
    let flags = flags()?;
    let config = std::fs::read_to_string(&flags.config)
        .map_err(|e| format!("ingest-floor: {}: {e}", flags.config.display()))?;
    let (host, path) = remote_write_url(&config)?;
    std::fs::create_dir_all(&flags.storage)
        .map_err(|e| format!("ingest-floor: {}: {e}", flags.storage.display()))?;
    let log_path = flags.storage.join("floor.log");
    let log = File::create(&log_path)
        .map_err(|e| format!("ingest-floor: {}: {e}", log_path.display()))?;
    let (shared, to_send) = Shared::new(log);
    let shared = Arc::new(shared);
    let s = shared.clone();
    std::thread::spawn(move || sender(to_send, s, host, path));
    let s = shared.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(FLUSH_EVERY);
            s.pipeline.lock().unwrap().out.flush_if(false);
        }
    });
    let listener = TcpListener::bind(flags.web)
        .map_err(|e| format!("ingest-floor: cannot listen on {}: {e}", flags.web))?;
    let s = shared.clone();
    std::thread::spawn(move || web(listener, s));
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        tonic::transport::Server::builder()
            .add_service(FleetFloor(shared))
            .serve(flags.grpc)
            .await
            .map_err(|e| format!("ingest-floor: gRPC on {}: {e}", flags.grpc))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_proto::pb::{AgentMessage, agent_message};
    use sonde_proto::prompb::WriteRequest;

    fn pipeline(dir: &std::path::Path) -> (Shared, std_mpsc::Receiver<(Vec<u8>, usize)>) {
        Shared::new(File::create(dir.join("floor.log")).unwrap())
    }

    fn result(seq: u64, ts: i64, success: bool) -> pb::ProbeResult {
        pb::ProbeResult {
            seq,
            job: "web".into(),
            instance: "http://a.example/".into(),
            timestamp_ms: ts,
            success,
            samples: vec![
                pb::Sample {
                    name: 0,
                    labels: vec![],
                    value: 1.0,
                },
                pb::Sample {
                    name: 1,
                    labels: vec![2, 3],
                    value: 0.25,
                },
            ],
            ..Default::default()
        }
    }

    fn message(msg: agent_message::Msg) -> Vec<u8> {
        AgentMessage { msg: Some(msg) }.encode_to_vec()
    }

    /// (labels as `name=value` joined by `,`, timestamp, value) of every sample sent.
    fn sent(sent: &std_mpsc::Receiver<(Vec<u8>, usize)>) -> Vec<(String, i64, f64)> {
        let mut out = Vec::new();
        while let Ok((body, n)) = sent.try_recv() {
            let request = WriteRequest::decode(&body[..]).unwrap();
            assert_eq!(request.timeseries.len(), n);
            for series in request.timeseries {
                let labels: Vec<String> = series
                    .labels
                    .iter()
                    .map(|l| format!("{}={}", l.name, l.value))
                    .collect();
                for s in series.samples {
                    out.push((labels.join(","), s.timestamp, s.value));
                }
            }
        }
        out
    }

    #[test]
    fn batches_read_in_place_come_out_as_remote_write_with_full_labels() {
        let dir = std::env::temp_dir().join(format!("ingest-floor-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (shared, requests) = pipeline(&dir);
        let mut agent = None;
        let hello = pb::Hello {
            agent_id: "edge-1".into(),
            ..Default::default()
        };
        let reply = answer(
            &shared,
            &mut agent,
            &message(agent_message::Msg::Hello(hello)),
        );
        assert!(matches!(
            reply,
            Ok(Some(aggregator_message::Msg::Assignment(_)))
        ));
        let batch = pb::ResultBatch {
            new_symbols: [
                "probe_success",
                "probe_http_duration_seconds",
                "phase",
                "connect",
            ]
            .map(String::from)
            .to_vec(),
            // The second result repeats the first one's timestamp: dropped, but acked.
            results: vec![
                result(7, 1000, true),
                result(8, 1000, true),
                result(9, 3000, false),
            ],
        };
        let reply = answer(
            &shared,
            &mut agent,
            &message(agent_message::Msg::Results(batch)),
        );
        assert!(matches!(
            reply,
            Ok(Some(aggregator_message::Msg::Ack(pb::Ack { acked_seq: 9 })))
        ));
        shared.pipeline.lock().unwrap().out.flush_if(false);
        let base = "agent=edge-1,instance=http://a.example/,job=web";
        let success = format!("__name__=probe_success,{base}");
        let connect = format!("__name__=probe_http_duration_seconds,{base},phase=connect");
        let up = "__name__=up,instance=http://a.example/,job=web".to_string();
        assert_eq!(
            sent(&requests),
            vec![
                (success.clone(), 1000, 1.0),
                (connect.clone(), 1000, 0.25),
                (up.clone(), 1000, 1.0),
                (success, 3000, 1.0),
                (connect, 3000, 0.25),
                (up, 3000, 0.0),
            ]
        );
        // Every sample taken is in the log, 20 bytes each, before the ack.
        assert_eq!(
            std::fs::metadata(dir.join("floor.log")).unwrap().len(),
            6 * 20
        );
        assert_eq!(shared.queued.load(Ordering::Relaxed), 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn malformed_messages_are_refused_not_panicked_on() {
        let dir = std::env::temp_dir().join(format!("ingest-floor-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (shared, _requests) = pipeline(&dir);
        let mut agent = None;
        let batch = message(agent_message::Msg::Results(pb::ResultBatch::default()));
        assert!(
            answer(&shared, &mut agent, &batch).is_err(),
            "results before hello"
        );
        let hello = message(agent_message::Msg::Hello(pb::Hello::default()));
        answer(&shared, &mut agent, &hello).unwrap();
        let mut unknown_symbol = pb::ResultBatch::default();
        unknown_symbol.results.push(result(1, 1000, true));
        let unknown_symbol = message(agent_message::Msg::Results(unknown_symbol));
        assert!(answer(&shared, &mut agent, &unknown_symbol).is_err());
        for cut in 1..unknown_symbol.len() {
            let _ = answer(&shared, &mut agent, &unknown_symbol[..cut]);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
