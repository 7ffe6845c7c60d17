//! What the remote-write client reads from a receiver: the status, the headers it acts
//! on (`Retry-After`, `Location`, the 2.0 `X-Prometheus-Remote-Write-*-Written` counts)
//! and the start of the body it logs; then the pause before the retry it asks for.
//!
//! Input: two bytes of status, then `name: value` header lines up to an empty line,
//! then the body.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use sonde_aggregator::remote_write::{SendError, backoff, client};
use std::time::Duration;

/// As the client reads bodies: this much of a refusal, this much of a success.
const MESSAGE_BYTES: usize = 256;
const DRAIN_BYTES: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let [hi, lo, rest @ ..] = data else {
        return;
    };
    let Ok(status) = StatusCode::from_u16(u16::from_be_bytes([*hi, *lo]) % 1000) else {
        return;
    };
    let mut headers = HeaderMap::new();
    let mut rest = rest;
    loop {
        let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        if line.is_empty() {
            break;
        }
        let colon = line.iter().position(|b| *b == b':').unwrap_or(line.len());
        let (name, value) = (&line[..colon], line.get(colon + 1..).unwrap_or_default());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let limit = if status.is_success() {
        DRAIN_BYTES
    } else {
        MESSAGE_BYTES
    };
    let body = &rest[..rest.len().min(limit)];
    let (min, max) = (Duration::from_millis(30), Duration::from_secs(5));
    match client::read_response(status, &headers, body) {
        Ok(written) => {
            let _ = written.any();
        }
        Err(SendError::Retryable {
            message,
            retry_after,
        }) => {
            assert!(message.len() < 3 * MESSAGE_BYTES + 64, "{message}");
            for attempt in [1, 2, 31, u32::MAX] {
                let pause = backoff(min, max, attempt, retry_after);
                assert!(pause >= min && pause <= max, "{pause:?}");
            }
        }
        Err(SendError::Rejected { message, .. }) => {
            let _ = message;
        }
    }
});
