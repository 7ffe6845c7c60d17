//! The stream to one aggregator: connect, say hello, send results in batches, take
//! assignments and acks, reconnect with exponential backoff and jitter.
//!
//! Delivery is at-least-once: after a reconnect, everything the buffer still holds is
//! sent again in sequence order, and the aggregator drops what it already committed.

use crate::buffer::Buffer;
use crate::config::AggregatorEndpoint;
use crate::metrics::AgentMetrics;
use crate::record::ProbeRecord;
use crate::schedule::{CheckSpec, Scheduler, Source};
use rand::Rng;
use sonde_proto::config::Labels;
use sonde_proto::pb::{
    self, AgentMessage, AggregatorMessage, Assignment, agent_message, aggregator_message,
    fleet_client::FleetClient,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

/// Results per batch on the wire.
const BATCH_MAX: usize = 500;
/// Results sent but not yet acked before the uplink waits for acks.
const IN_FLIGHT_MAX: usize = 20_000;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Everything one uplink needs.
pub struct Uplink {
    pub index: usize,
    pub endpoint: AggregatorEndpoint,
    pub agent_id: String,
    pub labels: Labels,
    pub local_jobs: Vec<String>,
    pub buffer: Arc<Buffer>,
    pub scheduler: Arc<Scheduler>,
    pub metrics: Arc<AgentMetrics>,
}

impl Uplink {
    /// Runs until `shutdown` turns true, reconnecting whenever the stream breaks.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let address = self.endpoint.address.clone();
        let mut backoff = BACKOFF_MIN;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let opened = self.session(&mut shutdown).await;
            self.metrics.uplink(&address, |u| u.connected = false);
            match opened {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Established(err)) => {
                    // The stream worked for a while: start the backoff afresh.
                    backoff = BACKOFF_MIN;
                    tracing::warn!(aggregator = %address, error = %err, "stream to the aggregator ended; reconnecting");
                    self.metrics.uplink(&address, |u| {
                        u.disconnects += 1;
                        u.last_error = Some(err);
                    });
                }
                Err(err) => {
                    tracing::warn!(aggregator = %address, error = %err, retry_in = ?backoff, "cannot reach the aggregator");
                    self.metrics.uplink(&address, |u| u.last_error = Some(err));
                }
            }
            let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
            tokio::select! {
                _ = tokio::time::sleep(jittered) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream, from connect to its end. `Err` means it never got going.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<SessionEnd, String> {
        let address = &self.endpoint.address;
        let channel = tokio::select! {
            c = connect(&self.endpoint) => c?,
            _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
        };
        let (tx, rx) = mpsc::channel::<AgentMessage>(8);
        tx.send(hello(self))
            .await
            .map_err(|_| "stream closed".to_string())?;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(path) = &self.endpoint.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read token_file {}: {e}", path.display()))?;
            let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
                format!(
                    "token_file {} holds characters not allowed in a header",
                    path.display()
                )
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut client = FleetClient::new(channel);
        let mut inbound = tokio::select! {
            r = client.session(request) => r.map_err(|s| describe_status(&s))?.into_inner(),
            _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
        };
        tracing::info!(aggregator = %address, "connected to the aggregator");
        self.metrics.uplink(address, |u| {
            u.connected = true;
            u.connects += 1;
            u.last_error = None;
        });

        let mut symbols = Symbols::default();
        let mut sent_up_to = self.buffer.stats().acked_seq;
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            // Registered before looking at the buffer so that no push goes unnoticed.
            let added = self.buffer.added.notified();
            let in_flight = self.buffer.count_up_to(sent_up_to);
            let pending = if in_flight >= IN_FLIGHT_MAX {
                // Wait for acks before sending more: the aggregator may be slow to commit.
                Vec::new()
            } else {
                self.buffer.pending_after(sent_up_to, BATCH_MAX)
            };
            if let Some(last) = pending.last().map(|r| r.seq) {
                let msg = AgentMessage {
                    msg: Some(agent_message::Msg::Results(symbols.batch(&pending))),
                };
                tokio::select! {
                    sent = tx.send(msg) => if sent.is_err() {
                        return Ok(SessionEnd::Established("stream closed while sending".into()));
                    },
                    _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
                }
                sent_up_to = last;
                self.metrics
                    .uplink(address, |u| u.results_sent += pending.len() as u64);
                continue;
            }
            tokio::select! {
                _ = added => {}
                _ = heartbeat.tick() => {
                    let beat = AgentMessage {
                        msg: Some(agent_message::Msg::Heartbeat(pb::Heartbeat {
                            timestamp_ms: crate::schedule::unix_ms(std::time::SystemTime::now()),
                        })),
                    };
                    if tx.send(beat).await.is_err() {
                        return Ok(SessionEnd::Established("stream closed".into()));
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(m)) => self.handle(m),
                    Ok(None) => return Ok(SessionEnd::Established("the aggregator closed the stream".into())),
                    Err(status) => return Ok(SessionEnd::Established(describe_status(&status))),
                },
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
            }
        }
    }

    fn handle(&self, message: AggregatorMessage) {
        match message.msg {
            Some(aggregator_message::Msg::Ack(ack)) => {
                let removed = self.buffer.ack(ack.acked_seq);
                self.metrics.uplink(&self.endpoint.address, |u| {
                    u.results_acked += removed as u64
                });
            }
            Some(aggregator_message::Msg::Assignment(assignment)) => {
                let generation = assignment.generation;
                let checks = self.checks_of(assignment);
                tracing::info!(
                    aggregator = %self.endpoint.address,
                    generation,
                    checks = checks.len(),
                    "new assignment"
                );
                self.metrics
                    .uplink(&self.endpoint.address, |u| u.generation = generation);
                self.scheduler
                    .set_checks(Source::Aggregator(self.index), checks);
            }
            None => {}
        }
    }

    fn checks_of(&self, assignment: Assignment) -> Vec<CheckSpec> {
        let mut modules: HashMap<String, Arc<sonde_proto::config::Module>> = HashMap::new();
        let mut checks = Vec::with_capacity(assignment.checks.len());
        for check in assignment.checks {
            let module = match modules.get(&check.module_json) {
                Some(m) => m.clone(),
                None => {
                    match serde_json::from_str::<sonde_proto::config::Module>(&check.module_json) {
                        Ok(m) => {
                            let m = Arc::new(m);
                            modules.insert(check.module_json.clone(), m.clone());
                            m
                        }
                        Err(e) => {
                            // A newer aggregator may send options this agent does not know.
                            tracing::error!(
                                job = %check.job, module = %check.module_name, error = %e,
                                "cannot read the module of an assigned check; upgrade this agent to the aggregator's version"
                            );
                            self.metrics
                                .assignment_errors
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                    }
                }
            };
            checks.push(CheckSpec {
                job: check.job,
                instance: check.instance,
                module_name: check.module_name,
                module,
                interval: Duration::from_millis(check.interval_ms.max(1)),
                timeout: Duration::from_millis(check.timeout_ms.max(1)),
                retries: check.retries,
                generation: assignment.generation,
            });
        }
        checks
    }
}

enum SessionEnd {
    Shutdown,
    /// The stream was up and then broke, for this reason.
    Established(String),
}

fn hello(up: &Uplink) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Hello(pb::Hello {
            protocol_version: sonde_proto::PROTOCOL_VERSION,
            agent_id: up.agent_id.clone(),
            labels: up.labels.clone().into_iter().collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            local_jobs: up.local_jobs.clone(),
            last_acked_seq: up.buffer.stats().acked_seq,
        })),
    }
}

async fn connect(endpoint: &AggregatorEndpoint) -> Result<Channel, String> {
    let address = &endpoint.address;
    let mut ep = Endpoint::from_shared(address.clone())
        .map_err(|e| format!("invalid aggregator address {address:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if address.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
        if let Some(cfg) = &endpoint.tls_config {
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("cannot read ca_file {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
                let cert = std::fs::read(cert)
                    .map_err(|e| format!("cannot read cert_file {}: {e}", cert.display()))?;
                let key = std::fs::read(key)
                    .map_err(|e| format!("cannot read key_file {}: {e}", key.display()))?;
                tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            if let Some(name) = &cfg.server_name {
                tls = tls.domain_name(name.clone());
            }
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| format!("TLS setup for {address}: {e}"))?;
    }
    ep.connect()
        .await
        .map_err(|e| format!("connect to {address}: {}", error_chain(&e)))
}

fn describe_status(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => format!(
            "the aggregator refused this agent: {} (check token_file and the aggregator's fleet.auth.tokens)",
            status.message()
        ),
        code => format!("{code:?}: {}", status.message()),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The stream's symbol table: each metric or label name and value is sent once per
/// stream, then referred to by its index.
#[derive(Default)]
struct Symbols {
    index: HashMap<String, u32>,
}

impl Symbols {
    fn batch(&mut self, records: &[Arc<ProbeRecord>]) -> pb::ResultBatch {
        let mut new_symbols = Vec::new();
        let mut intern = |s: &str, index: &mut HashMap<String, u32>| -> u32 {
            if let Some(&i) = index.get(s) {
                return i;
            }
            let i = index.len() as u32;
            index.insert(s.to_string(), i);
            new_symbols.push(s.to_string());
            i
        };
        let results = records
            .iter()
            .map(|r| pb::ProbeResult {
                seq: r.seq,
                job: r.job.clone(),
                instance: r.instance.clone(),
                timestamp_ms: r.timestamp_ms,
                success: r.success,
                duration_seconds: r.duration_seconds,
                generation: r.generation,
                failure: r.failure.clone().unwrap_or_default(),
                samples: r
                    .samples
                    .iter()
                    .map(|s| pb::Sample {
                        name: intern(s.name, &mut self.index),
                        labels: s
                            .labels
                            .iter()
                            .flat_map(|(k, v)| {
                                [intern(k, &mut self.index), intern(v, &mut self.index)]
                            })
                            .collect(),
                        value: s.value,
                    })
                    .collect(),
            })
            .collect();
        pb::ResultBatch {
            new_symbols,
            results,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Sample;

    #[test]
    fn symbols_are_sent_once_per_stream() {
        let record = |seq| {
            Arc::new(ProbeRecord {
                seq,
                job: "j".into(),
                instance: "i".into(),
                timestamp_ms: 1,
                success: true,
                duration_seconds: 0.1,
                samples: vec![
                    Sample {
                        name: "probe_success",
                        labels: vec![],
                        value: 1.0,
                    },
                    Sample {
                        name: "probe_http_duration_seconds",
                        labels: vec![("phase", "connect".into())],
                        value: 0.01,
                    },
                ],
                generation: 1,
                failure: None,
            })
        };
        let mut symbols = Symbols::default();
        let first = symbols.batch(&[record(1)]);
        assert_eq!(
            first.new_symbols,
            [
                "probe_success",
                "probe_http_duration_seconds",
                "phase",
                "connect"
            ]
        );
        assert_eq!(first.results[0].samples[1].labels, [2, 3]);
        let second = symbols.batch(&[record(2)]);
        assert!(second.new_symbols.is_empty());
        assert_eq!(second.results[0].samples[1].name, 1);
    }
}
