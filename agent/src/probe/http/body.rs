//! The response body: its declared length, and reading it to its end (decompressed
//! by [`super::decode`]) within `body_size_limit`, keeping what the body regexes need.

use super::conn::hyper_reason;
use super::decode::{Algorithm, Body, BodyError};
use crate::probe::{Failure, Reason, Samples};
use http::header;
use http::{Method, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Body as HttpBody;
use sonde_proto::config::module::HttpProbe;

pub(crate) struct BodyRead {
    /// The first [`HttpProbe::MAX_MATCHED_BODY`] bytes, when regexes need them.
    pub(crate) kept: Vec<u8>,
    pub(crate) truncated: bool,
}

/// As Go's `Response.ContentLength`: the header's value, 0 when no body can follow,
/// -1 when unknown (chunked, or read to the connection's end).
pub(super) fn content_length<B: HttpBody>(resp: &Response<B>, method: &Method) -> f64 {
    let declared = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let status = resp.status().as_u16();
    if *method != Method::HEAD && (status < 200 || status == 204 || status == 304) {
        return 0.0;
    }
    let chunked = resp
        .headers()
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    match declared {
        Some(n) if !chunked => n as f64,
        _ if resp.version() == Version::HTTP_2 && resp.body().is_end_stream() => 0.0,
        _ => -1.0,
    }
}

/// Reads the body to its end (decompressing it with `algorithm`), counting it and
/// keeping at most [`HttpProbe::MAX_MATCHED_BODY`] bytes when `keep`. Exceeding
/// `body_size_limit` (after decompression, as blackbox_exporter applies it) stops the
/// read with an error. Memory stays bounded whatever the peer sends.
///
/// A compressed body is decompressed in [`Body::step`]s of bounded output, yielding
/// after each: however much a frame inflates, the thread goes on serving its other
/// work (`/-/healthy` and `/probe` on the web thread, the other checks on a probing
/// thread) in between, and the probe's deadline ends the read between two steps.
pub(super) async fn read_body<B>(
    mut incoming: B,
    cfg: &HttpProbe,
    algorithm: Option<Algorithm>,
    keep: bool,
    out: &mut Samples,
) -> (BodyRead, Option<Failure>)
where
    B: HttpBody<Data = bytes::Bytes> + Unpin,
    B::Error: ReadError,
{
    const LENGTH: &str = "probe_http_uncompressed_body_length";
    let keep_bytes = if keep { HttpProbe::MAX_MATCHED_BODY } else { 0 };
    let mut body = Body::new(algorithm, keep_bytes, cfg.body_size_limit.0);
    let mut error = None;
    'frames: while let Some(frame) = incoming.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                error = Some(Failure::new(
                    Reason::Protocol,
                    format!("reading body: {}", e.describe()),
                ));
                break;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let mut rest = &data[..];
        while !rest.is_empty() {
            let result = body.step(rest);
            out.set(LENGTH, body.sink().total as f64);
            match result {
                Ok(taken) => rest = &rest[taken..],
                Err(e) => {
                    error = Some(body_failure(e, cfg));
                    break 'frames;
                }
            }
            if algorithm.is_some() {
                tokio::task::yield_now().await;
            }
        }
    }
    while error.is_none() {
        let result = body.finish_step();
        out.set(LENGTH, body.sink().total as f64);
        match result {
            Ok(true) => break,
            Ok(false) => tokio::task::yield_now().await,
            Err(e) => error = Some(body_failure(e, cfg)),
        }
    }
    let sink = body.into_sink();
    out.set(LENGTH, sink.total as f64);
    let read = BodyRead {
        truncated: sink.truncated,
        kept: sink.kept,
    };
    (read, error)
}

/// What an error reading a body says, with its causes.
pub(super) trait ReadError {
    fn describe(&self) -> String;
}

impl ReadError for hyper::Error {
    fn describe(&self) -> String {
        hyper_reason(self)
    }
}

fn body_failure(e: BodyError, cfg: &HttpProbe) -> Failure {
    match e {
        BodyError::TooLarge => Failure::new(
            Reason::BodySize,
            format!(
                "body is larger than body_size_limit ({} bytes)",
                cfg.body_size_limit.0
            ),
        ),
        BodyError::Corrupt(why) => Failure::new(
            Reason::Protocol,
            format!("body does not decompress as {}: {why}", cfg.compression),
        ),
    }
}
