//! The gRPC service agents stream to (`sonde.v1.Fleet/Session`): authenticates the
//! stream from its headers before reading anything, admits the agent's Hello, decodes
//! its batches ([`decode`]), hands them to the [`Hub`], and acks what the hub committed.
//! [`listener`] owns the connections underneath (limits, TLS).

pub mod assignment;
pub mod decode;
pub mod listener;

pub use decode::decode_batch;

use crate::config::{AggregatorConfig, MAX_AGENT_ID_BYTES};
use crate::hub::{Hub, Kick, ResultsError};
use crate::refusals::{Reason, loggable};
use decode::SymbolTable;
use sonde_cli::errors::{CONNECTION_LOST, connection_lost};
use sonde_proto::config::{Labels, is_valid_label_name};
use sonde_proto::pb::{
    self, AgentMessage, AggregatorMessage, agent_message, aggregator_message, fleet_server::Fleet,
};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

/// An agent silent for this long (no result, no heartbeat) is treated as gone.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// The HTTP/2 keepalive of agent connections: a ping after this long without a frame
/// from the agent...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...and the connection closed when its answer takes longer than this.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts to commit a batch while the store fails.
const STORAGE_RETRY_MAX: Duration = Duration::from_secs(30);

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

/// Who the request's headers say the caller is.
enum Credential {
    /// The fleet needs no token (`fleet.auth` absent).
    Anonymous,
    /// A known token and what it grants.
    Token {
        token: String,
        grant: crate::config::TokenGrant,
    },
}

#[tonic::async_trait]
impl Fleet for FleetService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let peer = request.remote_addr();
        let config = self.hub.config();
        // The token first, from the headers: nothing of the stream is read for a caller
        // that cannot say who it is.
        let credential = match authenticate(&config, request.metadata()) {
            Ok(c) => c,
            Err(status) => return Err(self.refuse(peer.map(|p| p.ip()), None, status)),
        };
        let mut inbound = request.into_inner();
        let hello_timeout = config.limits.hello_timeout.0;
        let hello = match tokio::time::timeout(hello_timeout, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                msg: Some(agent_message::Msg::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                let status =
                    Status::invalid_argument("the first message of a stream must be Hello");
                return Err(self.refuse(peer.map(|p| p.ip()), None, status));
            }
            Ok(Err(status)) => return Err(self.refuse(peer.map(|p| p.ip()), None, status)),
            Err(_) => {
                let status =
                    Status::deadline_exceeded(format!("no Hello within {hello_timeout:?}"));
                return Err(self.refuse(peer.map(|p| p.ip()), None, status));
            }
        };
        let labels = match admit(&config, &hello, &credential) {
            Ok(l) => l,
            Err(status) => {
                return Err(self.refuse(peer.map(|p| p.ip()), Some(&hello.agent_id), status));
            }
        };
        let (tx, rx) =
            mpsc::channel::<Result<AggregatorMessage, Status>>(assignment::AGENT_CHANNEL);
        let agent = hello.agent_id.clone();
        let token = match credential {
            Credential::Anonymous => None,
            Credential::Token { token, .. } => Some(token),
        };
        let crate::hub::Connected { connection, kick } = match self
            .hub
            .connect(&hello, labels, token, tx.clone(), now_ms())
            .await
        {
            Ok(c) => c,
            Err(why) => {
                let status = Status::resource_exhausted(why);
                return Err(self.refuse(peer.map(|p| p.ip()), Some(&hello.agent_id), status));
            }
        };
        let peer_text = peer.map_or_else(|| "unknown".to_string(), |a| a.to_string());
        tracing::info!(agent = %loggable(&agent), peer = %peer_text, version = %loggable(&hello.version), "agent connected");
        let hub = self.hub.clone();
        let mut shutdown = self.shutdown.clone();
        let limits = config.limits;
        tokio::spawn(async move {
            let reason = tokio::select! {
                reason = serve_stream(&hub, &agent, &limits, inbound, &tx, &kick) => reason,
                _ = shutdown.wait_for(|s| *s) => "aggregator shutting down".to_string(),
            };
            hub.disconnect(&agent, connection, now_ms());
            tracing::info!(agent = %loggable(&agent), reason = %reason, "agent disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl FleetService {
    /// Counts and logs (at a bounded rate per peer) a refused stream.
    fn refuse(&self, peer: Option<IpAddr>, agent: Option<&str>, status: Status) -> Status {
        self.hub
            .counters
            .agents_refused
            .fetch_add(1, Ordering::Relaxed);
        self.hub
            .refusals
            .refuse_connection(peer, agent, status.message());
        status
    }
}

/// The caller's credential from the request headers, before any message is read.
fn authenticate(config: &AggregatorConfig, headers: &MetadataMap) -> Result<Credential, Status> {
    if !config.auth_required {
        return Ok(Credential::Anonymous);
    }
    let Some(value) = headers.get("authorization") else {
        return Err(Status::unauthenticated(
            "this aggregator requires a token: set token_file for it in the agent's config",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            Status::unauthenticated("the authorization header is not \"Bearer <token>\"")
        })?;
    match config.tokens.get(token) {
        Some(grant) => Ok(Credential::Token {
            token: token.to_string(),
            grant: grant.clone(),
        }),
        None => Err(Status::unauthenticated("unknown token")),
    }
}

/// Checks a Hello against the credential; returns the labels the agent gets.
fn admit(
    config: &AggregatorConfig,
    hello: &pb::Hello,
    credential: &Credential,
) -> Result<Labels, Status> {
    if hello.protocol_version != sonde_proto::PROTOCOL_VERSION {
        let ours = sonde_proto::PROTOCOL_VERSION;
        let theirs = hello.protocol_version;
        let upgrade = if theirs < ours {
            "upgrade the agent to this aggregator's version"
        } else {
            "upgrade this aggregator to the agent's version"
        };
        return Err(Status::failed_precondition(format!(
            "this aggregator (sonde {}) speaks fleet protocol version {ours}, the agent (sonde {}) version {theirs}: {upgrade}",
            env!("CARGO_PKG_VERSION"),
            loggable(&hello.version),
        )));
    }
    if hello.agent_id.is_empty() || hello.agent_id.len() > MAX_AGENT_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "agent_id must be 1 to {MAX_AGENT_ID_BYTES} bytes"
        )));
    }
    let limits = &config.limits;
    if hello.local_jobs.len() > limits.max_local_jobs {
        return Err(Status::resource_exhausted(format!(
            "the agent declares {} local jobs; this aggregator's fleet.limits.max_local_jobs is {}",
            hello.local_jobs.len(),
            limits.max_local_jobs
        )));
    }
    if let Some(job) = hello
        .local_jobs
        .iter()
        .find(|j| j.is_empty() || j.len() > MAX_AGENT_ID_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "local job name {:?} must be 1 to {MAX_AGENT_ID_BYTES} bytes",
            loggable(job)
        )));
    }
    let too_long = |s: &String| s.len() > limits.max_symbol_bytes.0 as usize;
    for (name, value) in &hello.labels {
        if !is_valid_label_name(name) || name.starts_with("__") || too_long(name) || too_long(value)
        {
            return Err(Status::invalid_argument(format!(
                "agent label {:?} is not a valid label name, or it or its value is too long",
                loggable(name)
            )));
        }
    }
    if hello.labels.len() > limits.max_labels_per_sample {
        return Err(Status::invalid_argument(format!(
            "{} agent labels; at most {} (fleet.limits.max_labels_per_sample)",
            hello.labels.len(),
            limits.max_labels_per_sample
        )));
    }
    let claimed: Labels = hello.labels.clone().into_iter().collect();
    match credential {
        Credential::Anonymous => Ok(claimed),
        Credential::Token { grant, .. } => {
            if grant.agent != hello.agent_id {
                return Err(Status::permission_denied(format!(
                    "this token belongs to agent {:?}, not {:?}",
                    loggable(&grant.agent),
                    loggable(&hello.agent_id)
                )));
            }
            let Some(bound) = &grant.labels else {
                return Ok(claimed);
            };
            for (name, value) in &claimed {
                if let Some(want) = bound.get(name)
                    && want != value
                {
                    return Err(Status::permission_denied(format!(
                        "this agent's token binds {name}={want:?}, the agent says {name}={:?}; fix agent.labels in the agent's config",
                        loggable(value)
                    )));
                }
            }
            // The token's labels are the agent's labels; any others it claims are
            // ignored, or a token could reach jobs selected by labels it was not given.
            Ok(bound.clone())
        }
    }
}

/// Reads the agent's stream until it ends; returns why it ended.
async fn serve_stream(
    hub: &Hub,
    agent: &str,
    limits: &crate::config::FleetLimits,
    mut inbound: Streaming<AgentMessage>,
    tx: &mpsc::Sender<Result<AggregatorMessage, Status>>,
    kick: &Kick,
) -> String {
    let mut symbols = SymbolTable::default();
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let message = tokio::select! {
            m = tokio::time::timeout(SILENCE_LIMIT, inbound.message()) => m,
            why = kick.kicked() => {
                let _ = tx.send(Err(Status::permission_denied(why.clone()))).await;
                return why;
            }
        };
        let message = match message {
            Err(_) => return format!("silent for {SILENCE_LIMIT:?}"),
            Ok(Err(status)) if connection_lost(&status) => return CONNECTION_LOST.into(),
            Ok(Err(status)) => return format!("stream error: {}", status.message()),
            Ok(Ok(None)) => return stream_end(last_heard.elapsed()),
            Ok(Ok(Some(m))) => m,
        };
        last_heard = tokio::time::Instant::now();
        match message.msg {
            Some(agent_message::Msg::Heartbeat(beat)) => {
                hub.heartbeat(agent, beat.timestamp_ms, now_ms());
            }
            Some(agent_message::Msg::Results(batch)) => {
                let decoded = match decode_batch(&mut symbols, batch, limits) {
                    Ok(d) => d,
                    Err(e) => {
                        hub.refusals
                            .refuse(agent, Reason::Malformed, 1, || e.to_string());
                        let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                        return format!("malformed batch: {e}");
                    }
                };
                for (reason, n, example) in decoded.refused_samples {
                    hub.refusals.refuse(agent, reason, n, || example);
                }
                let results: std::sync::Arc<[crate::hub::IncomingResult]> = decoded.results.into();
                let seq = tokio::select! {
                    seq = commit(hub, agent, results) => seq,
                    why = kick.kicked() => {
                        let _ = tx.send(Err(Status::permission_denied(why.clone()))).await;
                        return why;
                    }
                };
                if let Some(seq) = seq {
                    let ack = AggregatorMessage {
                        msg: Some(aggregator_message::Msg::Ack(pb::Ack { acked_seq: seq })),
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return "stream closed".into();
                    }
                }
            }
            Some(agent_message::Msg::AssignmentReport(report)) => {
                hub.assignment_report(agent, &report);
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

/// Why a stream ended without a status, `silence` after the agent's last message. An
/// agent ending its stream has sent a heartbeat within the last few seconds; the
/// HTTP/2 keepalive ends a stream the same quiet way, but only after the agent has been
/// silent for longer than [`KEEPALIVE_TIMEOUT`].
fn stream_end(silence: Duration) -> String {
    if silence >= KEEPALIVE_TIMEOUT {
        format!("{CONNECTION_LOST} (nothing from the agent for {silence:.0?})")
    } else {
        "stream closed by the agent".into()
    }
}

/// Commits one batch, trying again while the store fails: the stream stays open and
/// unacked (the agent keeps the results and stops sending once its in-flight window is
/// full), so nothing is lost and nobody reconnects in a loop. Returns what to ack.
async fn commit(
    hub: &Hub,
    agent: &str,
    results: std::sync::Arc<[crate::hub::IncomingResult]>,
) -> Option<u64> {
    let mut wait = Duration::from_secs(1);
    loop {
        match hub.results(agent, results.clone(), now_ms()).await {
            Ok(seq) => return seq,
            Err(ResultsError::Stopped) => return None,
            Err(ResultsError::Storage(e)) => {
                tracing::warn!(agent = %loggable(agent), error = %e, retry_in = ?wait, "cannot commit this agent's results; holding the ack and trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(STORAGE_RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_proto::config::from_yaml_str;
    use std::path::Path;

    fn config(text: &str) -> AggregatorConfig {
        let path = Path::new("t.yml");
        AggregatorConfig::from_file(path, from_yaml_str(path, text).unwrap()).unwrap()
    }

    fn hello(id: &str, labels: &[(&str, &str)]) -> pb::Hello {
        pb::Hello {
            protocol_version: sonde_proto::PROTOCOL_VERSION,
            agent_id: id.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            version: "test".into(),
            local_jobs: vec![],
            last_acked_seq: 0,
        }
    }

    fn bearer(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    const AUTH: &str = r#"
fleet:
  auth:
    tokens:
      - {agent: eu-1, token: t-eu, labels: {region: eu}}
      - {agent: free, token: t-free}
"#;

    #[test]
    fn the_token_is_checked_from_the_headers() {
        let c = config(AUTH);
        assert!(authenticate(&c, &MetadataMap::new()).is_err());
        assert!(authenticate(&c, &bearer("nope")).is_err());
        assert!(matches!(
            authenticate(&c, &bearer("t-eu")),
            Ok(Credential::Token { .. })
        ));
        assert!(matches!(
            authenticate(&config(""), &MetadataMap::new()),
            Ok(Credential::Anonymous)
        ));
    }

    #[test]
    fn a_token_binds_the_agent_id_and_its_labels() {
        let c = config(AUTH);
        let eu = authenticate(&c, &bearer("t-eu")).unwrap();
        let labels = admit(&c, &hello("eu-1", &[("region", "eu")]), &eu).unwrap();
        assert_eq!(labels["region"], "eu");
        // Omitted labels come from the token; claimed extra ones are ignored.
        let labels = admit(&c, &hello("eu-1", &[("site", "x")]), &eu).unwrap();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels["region"], "eu");
        let e = admit(&c, &hello("eu-1", &[("region", "us")]), &eu).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("region"), "{}", e.message());
        let e = admit(&c, &hello("us-1", &[]), &eu).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // A token without labels lets the agent say its own.
        let free = authenticate(&c, &bearer("t-free")).unwrap();
        let labels = admit(&c, &hello("free", &[("region", "us")]), &free).unwrap();
        assert_eq!(labels["region"], "us");
    }

    #[test]
    fn another_protocol_version_is_told_which_side_to_upgrade() {
        let c = config("");
        let mut old = hello("a", &[]);
        old.protocol_version = sonde_proto::PROTOCOL_VERSION - 1;
        let e = admit(&c, &old, &Credential::Anonymous).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("upgrade the agent"), "{}", e.message());
        let mut new = hello("a", &[]);
        new.protocol_version = sonde_proto::PROTOCOL_VERSION + 1;
        let e = admit(&c, &new, &Credential::Anonymous).unwrap_err();
        assert!(
            e.message().contains("upgrade this aggregator"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn hostile_hellos_are_refused() {
        let c = config("");
        let anon = Credential::Anonymous;
        assert!(admit(&c, &hello(&"x".repeat(300), &[]), &anon).is_err());
        assert!(admit(&c, &hello("", &[]), &anon).is_err());
        assert!(admit(&c, &hello("a", &[("__x", "1")]), &anon).is_err());
        let long = "v".repeat(20_000);
        assert!(admit(&c, &hello("a", &[("region", &long)]), &anon).is_err());
        let mut many_jobs = hello("a", &[]);
        many_jobs.local_jobs = (0..100).map(|i| format!("j{i}")).collect();
        assert_eq!(
            admit(&c, &many_jobs, &anon).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }
}
