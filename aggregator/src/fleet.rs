//! The gRPC service agents stream to (`sonde.v1.Fleet/Session`): authenticates the
//! agent, decodes its batches (symbols, samples), hands them to the [`Hub`], and acks
//! what the hub committed.

use crate::hub::{Hub, IncomingResult};
use sonde_proto::config::{is_valid_label_name, is_valid_metric_name};
use sonde_proto::pb::{
    self, AgentMessage, AggregatorMessage, agent_message, aggregator_message, fleet_server::Fleet,
};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Symbols a stream may define; bounds the memory one agent can make us hold.
const MAX_SYMBOLS: usize = 1 << 20;
/// An agent silent for this long (no result, no heartbeat) is treated as gone.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);

pub struct FleetService {
    pub hub: Arc<Hub>,
    /// Turns true when the aggregator stops: every agent stream then ends, so agents
    /// reconnect elsewhere (or to the restarted process) instead of talking to a
    /// server that is going away.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

type SessionStream = Pin<Box<dyn futures::Stream<Item = Result<AggregatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Fleet for FleetService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                msg: Some(agent_message::Msg::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message of a stream must be Hello",
                ));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10s")),
        };
        if let Err(status) = self.admit(&hello, token.as_deref()) {
            self.hub
                .counters
                .agents_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(agent = %hello.agent_id, peer = %peer, reason = %status.message(), "agent refused");
            return Err(status);
        }
        let (tx, rx) = mpsc::channel::<Result<AggregatorMessage, Status>>(256);
        let agent = hello.agent_id.clone();
        let connection = self.hub.connect(&hello, tx.clone(), now_ms());
        tracing::info!(agent = %agent, peer = %peer, version = %hello.version, "agent connected");
        let hub = self.hub.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                reason = serve_stream(&hub, &agent, inbound, &tx) => reason,
                _ = shutdown.wait_for(|s| *s) => "aggregator shutting down".to_string(),
            };
            hub.disconnect(&agent, connection, now_ms());
            tracing::info!(agent = %agent, reason = %reason, "agent disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl FleetService {
    fn admit(&self, hello: &pb::Hello, token: Option<&str>) -> Result<(), Status> {
        if hello.protocol_version != sonde_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "this aggregator speaks sonde.v1 protocol version {}, the agent {}; run the same sonde version on both",
                sonde_proto::PROTOCOL_VERSION,
                hello.protocol_version
            )));
        }
        if hello.agent_id.is_empty() || hello.agent_id.len() > 256 {
            return Err(Status::invalid_argument(
                "agent_id must be 1 to 256 characters",
            ));
        }
        for name in hello.labels.keys() {
            if !is_valid_label_name(name) || name.starts_with("__") {
                return Err(Status::invalid_argument(format!(
                    "agent label {name:?} is not a valid label name"
                )));
            }
        }
        let config = self.hub.config();
        if config.tokens.is_empty() {
            return Ok(());
        }
        let Some(token) = token else {
            return Err(Status::unauthenticated(
                "this aggregator requires a token: set token_file for it in the agent's config",
            ));
        };
        match config.tokens.get(token) {
            Some(agent) if *agent == hello.agent_id => Ok(()),
            Some(agent) => Err(Status::permission_denied(format!(
                "this token belongs to agent {agent:?}, not {:?}",
                hello.agent_id
            ))),
            None => Err(Status::unauthenticated("unknown token")),
        }
    }
}

/// Reads the agent's stream until it ends; returns why it ended.
async fn serve_stream(
    hub: &Hub,
    agent: &str,
    mut inbound: Streaming<AgentMessage>,
    tx: &mpsc::Sender<Result<AggregatorMessage, Status>>,
) -> String {
    let mut symbols: Vec<String> = Vec::new();
    loop {
        let message = match tokio::time::timeout(SILENCE_LIMIT, inbound.message()).await {
            Err(_) => return format!("silent for {SILENCE_LIMIT:?}"),
            Ok(Err(status)) => return format!("stream error: {}", status.message()),
            Ok(Ok(None)) => return "stream closed by the agent".into(),
            Ok(Ok(Some(m))) => m,
        };
        match message.msg {
            Some(agent_message::Msg::Heartbeat(_)) => hub.heartbeat(agent, now_ms()),
            Some(agent_message::Msg::Results(batch)) => {
                let results = match decode_batch(&mut symbols, batch, &hub.counters.samples_invalid)
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(Status::invalid_argument(e.clone()))).await;
                        return format!("malformed batch: {e}");
                    }
                };
                match hub.results(agent, results, now_ms()) {
                    Ok(Some(seq)) => {
                        let ack = AggregatorMessage {
                            msg: Some(aggregator_message::Msg::Ack(pb::Ack { acked_seq: seq })),
                        };
                        if tx.send(Ok(ack)).await.is_err() {
                            return "stream closed".into();
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        // Nothing was committed, so nothing is acked: the agent keeps the
                        // batch and sends it again on its next stream.
                        tracing::error!(agent = %agent, error = %e, "cannot commit results; closing the stream");
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "aggregator storage error: {e}"
                            ))))
                            .await;
                        return format!("commit failed: {e}");
                    }
                }
            }
            Some(agent_message::Msg::Hello(_)) => {
                let _ = tx
                    .send(Err(Status::invalid_argument("Hello sent twice")))
                    .await;
                return "Hello sent twice".into();
            }
            None => {}
        }
    }
}

/// Turns a batch into results, resolving symbol references. A reference past the table
/// is a protocol error; a sample with an invalid metric or label name is dropped alone.
pub fn decode_batch(
    symbols: &mut Vec<String>,
    batch: pb::ResultBatch,
    invalid: &std::sync::atomic::AtomicU64,
) -> Result<Vec<IncomingResult>, String> {
    if symbols.len() + batch.new_symbols.len() > MAX_SYMBOLS {
        return Err(format!("more than {MAX_SYMBOLS} symbols on one stream"));
    }
    symbols.extend(batch.new_symbols);
    let lookup = |i: u32| -> Result<&String, String> {
        symbols
            .get(i as usize)
            .ok_or_else(|| format!("symbol {i} is not defined (table has {})", symbols.len()))
    };
    let mut results = Vec::with_capacity(batch.results.len());
    let mut last_seq = 0;
    for r in batch.results {
        if r.seq <= last_seq {
            return Err(format!(
                "sequence numbers must increase within a batch ({} after {last_seq})",
                r.seq
            ));
        }
        last_seq = r.seq;
        let mut samples = Vec::with_capacity(r.samples.len());
        for s in r.samples {
            let name = lookup(s.name)?.clone();
            if s.labels.len() % 2 != 0 {
                return Err("sample labels must come in name/value pairs".into());
            }
            let mut labels = Vec::with_capacity(s.labels.len() / 2);
            for pair in s.labels.chunks_exact(2) {
                labels.push((lookup(pair[0])?.clone(), lookup(pair[1])?.clone()));
            }
            let valid = name.starts_with("probe_")
                && is_valid_metric_name(&name)
                && labels
                    .iter()
                    .all(|(k, _)| is_valid_label_name(k) && !k.starts_with("__"));
            if valid {
                samples.push((name, labels, s.value));
            } else {
                invalid.fetch_add(1, Ordering::Relaxed);
            }
        }
        results.push(IncomingResult {
            seq: r.seq,
            job: r.job,
            instance: r.instance,
            timestamp_ms: r.timestamp_ms,
            success: r.success,
            duration_seconds: r.duration_seconds,
            failure: r.failure,
            samples,
        });
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn result(seq: u64, samples: Vec<pb::Sample>) -> pb::ProbeResult {
        pb::ProbeResult {
            seq,
            job: "j".into(),
            instance: "i".into(),
            timestamp_ms: 1,
            success: true,
            duration_seconds: 0.1,
            samples,
            generation: 1,
            failure: String::new(),
        }
    }

    #[test]
    fn symbols_resolve_across_batches() {
        let mut symbols = Vec::new();
        let invalid = AtomicU64::new(0);
        let first = pb::ResultBatch {
            new_symbols: vec!["probe_success".into(), "phase".into(), "connect".into()],
            results: vec![result(
                1,
                vec![pb::Sample {
                    name: 0,
                    labels: vec![],
                    value: 1.0,
                }],
            )],
        };
        decode_batch(&mut symbols, first, &invalid).unwrap();
        let second = pb::ResultBatch {
            new_symbols: vec!["probe_http_duration_seconds".into()],
            results: vec![result(
                2,
                vec![pb::Sample {
                    name: 3,
                    labels: vec![1, 2],
                    value: 0.5,
                }],
            )],
        };
        let r = decode_batch(&mut symbols, second, &invalid).unwrap();
        assert_eq!(r[0].samples[0].0, "probe_http_duration_seconds");
        assert_eq!(
            r[0].samples[0].1,
            [("phase".to_string(), "connect".to_string())]
        );
    }

    #[test]
    fn hostile_batches_are_refused_not_panicked_on() {
        let invalid = AtomicU64::new(0);
        let bad_ref = pb::ResultBatch {
            new_symbols: vec![],
            results: vec![result(
                1,
                vec![pb::Sample {
                    name: 7,
                    labels: vec![],
                    value: 1.0,
                }],
            )],
        };
        assert!(decode_batch(&mut Vec::new(), bad_ref, &invalid).is_err());
        let odd = pb::ResultBatch {
            new_symbols: vec!["probe_x".into()],
            results: vec![result(
                1,
                vec![pb::Sample {
                    name: 0,
                    labels: vec![0],
                    value: 1.0,
                }],
            )],
        };
        assert!(decode_batch(&mut Vec::new(), odd, &invalid).is_err());
        let order = pb::ResultBatch {
            new_symbols: vec![],
            results: vec![result(5, vec![]), result(5, vec![])],
        };
        assert!(decode_batch(&mut Vec::new(), order, &invalid).is_err());
        // A name that is not a probe metric (it could overwrite `up`) is dropped alone.
        let sneaky = pb::ResultBatch {
            new_symbols: vec!["up".into()],
            results: vec![result(
                1,
                vec![pb::Sample {
                    name: 0,
                    labels: vec![],
                    value: 1.0,
                }],
            )],
        };
        let r = decode_batch(&mut Vec::new(), sneaky, &invalid).unwrap();
        assert!(r[0].samples.is_empty());
        assert_eq!(invalid.load(Ordering::Relaxed), 1);
    }
}
