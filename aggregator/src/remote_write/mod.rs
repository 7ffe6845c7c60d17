//! Prometheus remote write (1.0 and 2.0): the wire format and one endpoint's HTTP
//! exchange, with no queue and no tasks ([`crate::delivery`] drains the queue through it).
//!
//! - `config`: the `remote_write` block, its defaults and validation;
//! - `request`: samples grouped by series to 1.0 and 2.0 request bodies (pure);
//! - `encode`, `encode_v2`: 1.0's `WriteRequest` and 2.0's `Request` as prost messages,
//!   and the decoders (pure; receivers and tests use them too);
//! - `tail`: the queue's newest blocks in memory, in request form, so that a shard that
//!   keeps up does not read back what was just written;
//! - `client`: the HTTP exchange and the sorting of responses;
//! - `backoff`: how long to wait before a retry.

mod backoff;
pub mod client;
pub mod config;
pub mod encode;
pub mod encode_v2;
pub(crate) mod endpoint;
pub(crate) mod request;
mod setting;
pub(crate) mod tail;
pub(crate) mod tls;

pub use backoff::backoff;
pub use client::SendError;
pub use config::{
    ProtobufMessage, RemoteWriteConfig, RemoteWriteError, SettingError, validate_all,
};
pub use encode::{STALE_NAN_BITS, Series, decode, encode};
