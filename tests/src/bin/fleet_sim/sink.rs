//! `--receiver sink`: a remote-write receiver that costs next to nothing, so that the
//! process under test, not a database creating millions of series, is what the two
//! cores carry.
//!
//! An HTTP/1.1 server on threads of fleet-sim's own process (one per connection,
//! keep-alive): it reads each request whole, answers 204, and counts requests, bytes and
//! rows. Rows are counted honestly, not estimated: the body is unsnappied and its
//! protobuf walked field by field without building anything (no allocation per series
//! or sample), every `Sample` of every `TimeSeries` counted. The walk also finds the
//! watched target's `up` sample with value 0, which is how a phase sees the failure
//! arrive. Its threads' CPU is counted apart ([`SinkCounts::cpu_s`]), never in the
//! process under test's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The failing target whose `up == 0` a phase waits for, and when it first arrived.
#[derive(Clone, Debug, Default)]
struct Watch {
    job: String,
    instance: String,
    seen: Option<Instant>,
}

#[derive(Default)]
struct Shared {
    requests: AtomicU64,
    bytes: AtomicU64,
    rows: AtomicU64,
    refused: AtomicU64,
    cpu_ns: AtomicU64,
    watch: Mutex<Option<Watch>>,
    /// The first few refusals, to say what went wrong.
    errors: Mutex<Vec<String>>,
}

/// What the sink has counted so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct SinkCounts {
    pub requests: u64,
    pub bytes: u64,
    pub rows: u64,
    pub refused: u64,
    /// CPU of the sink's threads (user + system).
    pub cpu_s: f64,
}

impl SinkCounts {
    /// What was counted between `before` and these counts.
    pub fn since(&self, before: &SinkCounts) -> SinkCounts {
        SinkCounts {
            requests: self.requests - before.requests,
            bytes: self.bytes - before.bytes,
            rows: self.rows - before.rows,
            refused: self.refused - before.refused,
            cpu_s: self.cpu_s - before.cpu_s,
        }
    }
}

pub struct Sink {
    address: SocketAddr,
    shared: Arc<Shared>,
}

impl Sink {
    /// Listens on a free port of 127.0.0.1; a thread accepts connections and serves each
    /// on a thread of its own.
    pub fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("sink-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let s = s.clone();
                    let _ = std::thread::Builder::new()
                        .name("sink-conn".into())
                        .spawn(move || serve(stream, &s));
                }
            })?;
        Ok(Self { address, shared })
    }

    /// The URL to give as a remote-write endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/api/v1/write", self.address)
    }

    pub fn counts(&self) -> SinkCounts {
        let s = &self.shared;
        SinkCounts {
            requests: s.requests.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            rows: s.rows.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            cpu_s: s.cpu_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    pub fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().unwrap().clone()
    }

    /// From now on, looks for `up{job, instance}` with value 0 in what arrives.
    pub fn watch(&self, job: &str, instance: &str) {
        *self.shared.watch.lock().unwrap() = Some(Watch {
            job: job.into(),
            instance: instance.into(),
            seen: None,
        });
    }

    /// When the watched `up == 0` first arrived.
    #[cfg(test)]
    pub fn seen(&self) -> Option<Instant> {
        self.watcher()()
    }

    /// When the watched `up == 0` first arrived, read from another thread.
    pub fn watcher(&self) -> impl Fn() -> Option<Instant> + Send + 'static {
        let shared = self.shared.clone();
        move || shared.watch.lock().unwrap().as_ref().and_then(|w| w.seen)
    }
}

/// CPU time of the calling thread.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call writes into.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One request's head: what the sink needs of it.
#[derive(Default)]
struct Head {
    method: String,
    length: Option<usize>,
    encoding: String,
    content_type: String,
    close: bool,
}

fn read_head(reader: &mut impl BufRead, line: &mut String) -> std::io::Result<Option<Head>> {
    line.clear();
    if reader.read_line(line)? == 0 {
        return Ok(None);
    }
    let mut head = Head {
        method: line.split_whitespace().next().unwrap_or("").to_string(),
        close: line.trim_end().ends_with("HTTP/1.0"),
        ..Head::default()
    };
    loop {
        line.clear();
        if reader.read_line(line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok(Some(head));
        }
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            head.length = v.parse().ok();
        } else if k.eq_ignore_ascii_case("content-encoding") {
            head.encoding = v.to_ascii_lowercase();
        } else if k.eq_ignore_ascii_case("content-type") {
            head.content_type = v.to_ascii_lowercase();
        } else if k.eq_ignore_ascii_case("connection") {
            head.close = v.eq_ignore_ascii_case("close");
        }
    }
}

fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let (mut line, mut body, mut plain) = (String::new(), Vec::new(), Vec::new());
    let mut decoder = snap::raw::Decoder::new();
    let mut cpu = thread_cpu_ns();
    loop {
        let head = match read_head(&mut reader, &mut line) {
            Ok(Some(head)) => head,
            _ => return,
        };
        let answer = match head.length {
            None if head.method == "POST" => Err((411, "a Content-Length is required".into())),
            length => {
                body.resize(length.unwrap_or(0), 0);
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                shared.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                take(shared, &head, &body, &mut decoder, &mut plain)
            }
        };
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let written = match answer {
            Ok(()) => out.write_all(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Err((status, why)) => {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                let mut errors = shared.errors.lock().unwrap();
                if errors.len() < 5 {
                    errors.push(format!("refused a request with {status}: {why}"));
                }
                drop(errors);
                let reason = if status == 415 {
                    "Unsupported Media Type"
                } else {
                    "Bad Request"
                };
                write!(
                    out,
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{why}",
                    why.len()
                )
            }
        };
        let now = thread_cpu_ns();
        shared
            .cpu_ns
            .fetch_add(now.saturating_sub(cpu), Ordering::Relaxed);
        cpu = now;
        if written.is_err() || head.close {
            return;
        }
    }
}

/// Takes one request: a remote write 1.0 body is unsnappied and walked; anything else is
/// refused with the reason.
fn take(
    shared: &Shared,
    head: &Head,
    body: &[u8],
    decoder: &mut snap::raw::Decoder,
    plain: &mut Vec<u8>,
) -> Result<(), (u16, String)> {
    if head.method != "POST" {
        // A client probing what the receiver speaks (vmagent asks whether it may use its
        // own protocol): the answer is no, with nothing in it.
        return Ok(());
    }
    if head.encoding != "snappy" {
        return Err((
            415,
            format!(
                "Content-Encoding {:?}: only snappy remote write 1.0",
                head.encoding
            ),
        ));
    }
    if head.content_type.contains("io.prometheus.write.v2") {
        return Err((415, "remote write 2.0: only 1.0".into()));
    }
    let n = snap::raw::decompress_len(body).map_err(|e| (400, format!("snappy: {e}")))?;
    plain.resize(n, 0);
    decoder
        .decompress(body, plain)
        .map_err(|e| (400, format!("snappy: {e}")))?;
    let watch = shared.watch.lock().unwrap().clone();
    let wanted = watch
        .as_ref()
        .filter(|w| w.seen.is_none())
        .map(|w| (w.job.as_bytes(), w.instance.as_bytes()));
    let scan = scan(plain, wanted).map_err(|e| (400, format!("protobuf: {e}")))?;
    shared.rows.fetch_add(scan.rows, Ordering::Relaxed);
    if scan.up_zero
        && let Some(w) = shared.watch.lock().unwrap().as_mut()
        && w.seen.is_none()
    {
        w.seen = Some(Instant::now());
    }
    Ok(())
}

/// What one `WriteRequest` held.
#[derive(Debug, Default, PartialEq)]
pub struct Scan {
    pub rows: u64,
    /// The watched target's `up` came with a sample of value 0.
    pub up_zero: bool,
}

/// A protobuf reader over a slice: fields as (number, wire type, payload).
struct Fields<'a> {
    rest: &'a [u8],
}

enum Field<'a> {
    Varint,
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
}

fn varint(rest: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, tail) = rest.split_first().ok_or("truncated varint")?;
        *rest = tail;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

impl<'a> Fields<'a> {
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let key = varint(&mut self.rest)?;
        let field = match key & 7 {
            0 => {
                varint(&mut self.rest)?;
                Field::Varint
            }
            1 => {
                let (v, tail) = self.rest.split_at_checked(8).ok_or("truncated fixed64")?;
                self.rest = tail;
                Field::Fixed64(u64::from_le_bytes(v.try_into().expect("8 bytes")))
            }
            2 => {
                let n = varint(&mut self.rest)? as usize;
                let (v, tail) = self.rest.split_at_checked(n).ok_or("length past the end")?;
                self.rest = tail;
                Field::Bytes(v)
            }
            5 => {
                let (_, tail) = self.rest.split_at_checked(4).ok_or("truncated fixed32")?;
                self.rest = tail;
                Field::Fixed32
            }
            w => return Err(format!("wire type {w}")),
        };
        Ok(Some((key >> 3, field)))
    }
}

/// A `Label`'s name and value.
fn label(bytes: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let (mut name, mut value): (&[u8], &[u8]) = (b"", b"");
    let mut fields = Fields { rest: bytes };
    while let Some((n, f)) = fields.next()? {
        match (n, f) {
            (1, Field::Bytes(b)) => name = b,
            (2, Field::Bytes(b)) => value = b,
            _ => {}
        }
    }
    Ok((name, value))
}

/// Counts the samples of a remote write 1.0 `WriteRequest` (`timeseries` = 1; in each,
/// `labels` = 1, `samples` = 2 with `value` = 1), and, given `watch` (job, instance),
/// whether that target's `up` came with a 0.
pub fn scan(body: &[u8], watch: Option<(&[u8], &[u8])>) -> Result<Scan, String> {
    let mut out = Scan::default();
    let mut request = Fields { rest: body };
    while let Some((n, f)) = request.next()? {
        let (1, Field::Bytes(series)) = (n, f) else {
            continue;
        };
        // Matched labels of the watched series: __name__="up", job, instance.
        let mut matched = 0;
        let mut zero = false;
        let mut fields = Fields { rest: series };
        while let Some((n, f)) = fields.next()? {
            match (n, f) {
                (1, Field::Bytes(l)) => {
                    if let Some((job, instance)) = watch {
                        let (name, value) = label(l)?;
                        let hit = match name {
                            b"__name__" => value == b"up",
                            b"job" => value == job,
                            b"instance" => value == instance,
                            _ => false,
                        };
                        matched += usize::from(hit);
                    }
                }
                (2, Field::Bytes(sample)) => {
                    out.rows += 1;
                    if watch.is_some() {
                        let mut s = Fields { rest: sample };
                        let mut value = 0.0;
                        while let Some((n, f)) = s.next()? {
                            if let (1, Field::Fixed64(bits)) = (n, f) {
                                value = f64::from_bits(bits);
                            }
                        }
                        zero |= value == 0.0;
                    }
                }
                (_, Field::Varint | Field::Fixed64(_) | Field::Bytes(_) | Field::Fixed32) => {}
            }
        }
        out.up_zero |= matched == 3 && zero;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use sonde_proto::prompb;

    fn series(labels: &[(&str, &str)], values: &[f64]) -> prompb::TimeSeries {
        prompb::TimeSeries {
            labels: labels
                .iter()
                .map(|(k, v)| prompb::Label {
                    name: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            samples: values
                .iter()
                .enumerate()
                .map(|(i, &value)| prompb::Sample {
                    value,
                    timestamp: 1_700_000_000_000 + i as i64,
                })
                .collect(),
        }
    }

    fn request(timeseries: Vec<prompb::TimeSeries>) -> Vec<u8> {
        let body = prompb::WriteRequest {
            timeseries,
            metadata: vec![],
        }
        .encode_to_vec();
        snap::raw::Encoder::new().compress_vec(&body).unwrap()
    }

    /// POSTs `body` on `conn` and returns the status line and the head's lines.
    fn post(conn: &mut BufReader<TcpStream>, body: &[u8], encoding: &str) -> String {
        write!(
            conn.get_mut(),
            "POST /api/v1/write HTTP/1.1\r\nHost: sink\r\nContent-Type: application/x-protobuf\r\nContent-Encoding: {encoding}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        conn.get_mut().write_all(body).unwrap();
        let mut head = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            conn.read_line(&mut line).unwrap();
            if let Some(v) = line.strip_prefix("Content-Length: ") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut rest = vec![0; length];
        conn.read_exact(&mut rest).unwrap();
        head
    }

    #[test]
    fn the_sink_answers_204_and_counts_the_rows_of_a_real_request() {
        let sink = Sink::start().unwrap();
        let address = sink.url();
        let address = address
            .strip_prefix("http://")
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        let mut conn = BufReader::new(TcpStream::connect(address).unwrap());
        sink.watch("sim_http_0", "https://t00000.sim.example/health");
        let up = |value: f64| {
            series(
                &[
                    ("__name__", "up"),
                    ("instance", "https://t00000.sim.example/health"),
                    ("job", "sim_http_0"),
                ],
                &[value],
            )
        };
        let probe = series(
            &[
                ("__name__", "probe_success"),
                ("agent", "sim-0000"),
                ("instance", "https://t00000.sim.example/health"),
                ("job", "sim_http_0"),
            ],
            &[1.0, 1.0, 0.0],
        );
        let first = request(vec![probe.clone(), up(1.0)]);
        assert!(post(&mut conn, &first, "snappy").starts_with("HTTP/1.1 204"));
        // Keep-alive: the same connection takes the next request.
        let other_target = series(
            &[
                ("__name__", "up"),
                ("instance", "https://t00001.sim.example/health"),
                ("job", "sim_http_0"),
            ],
            &[0.0],
        );
        let second = request(vec![other_target, probe]);
        assert!(post(&mut conn, &second, "snappy").starts_with("HTTP/1.1 204"));
        let counts = sink.counts();
        assert_eq!((counts.requests, counts.rows, counts.refused), (2, 8, 0));
        assert_eq!(counts.bytes, (first.len() + second.len()) as u64);
        assert!(
            sink.seen().is_none(),
            "no up == 0 of the watched target yet"
        );

        let third = request(vec![up(0.0)]);
        assert!(post(&mut conn, &third, "snappy").starts_with("HTTP/1.1 204"));
        assert!(sink.seen().is_some());
        assert_eq!(sink.counts().rows, 9);

        // What it cannot read is refused and said, not counted.
        assert!(post(&mut conn, &third, "zstd").starts_with("HTTP/1.1 415"));
        assert!(post(&mut conn, b"\xff\xff\xff", "snappy").starts_with("HTTP/1.1 400"));
        let counts = sink.counts();
        assert_eq!((counts.requests, counts.rows, counts.refused), (5, 9, 2));
        assert_eq!(sink.errors().len(), 2, "{:?}", sink.errors());
    }

    #[test]
    fn the_scan_counts_what_prost_encoded_and_refuses_garbage() {
        let many: Vec<_> = (0..100)
            .map(|i| series(&[("__name__", "m"), ("n", &i.to_string())], &[1.0, 2.0]))
            .collect();
        let body = prompb::WriteRequest {
            timeseries: many,
            metadata: vec![],
        }
        .encode_to_vec();
        assert_eq!(
            scan(&body, None),
            Ok(Scan {
                rows: 200,
                up_zero: false
            })
        );
        assert!(scan(&body[..body.len() - 1], None).is_err());
        assert!(scan(&[0x0a, 0xff], None).is_err());
    }
}
