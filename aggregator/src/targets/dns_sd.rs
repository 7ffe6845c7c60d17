//! `dns_sd_configs`: names looked up every `refresh_interval` (SRV, A, AAAA, MX or NS),
//! one group per name (its source is the name), with the `__meta_dns_*` labels
//! Prometheus sets. A name whose lookup fails keeps its last good group; a name that
//! does not exist (NXDOMAIN) or has no such records has no targets, as in Prometheus.
//!
//! The servers asked are the system's (`/etc/resolv.conf`, as Prometheus), or the
//! entry's `nameservers` (sonde's extension).

use super::{ADDRESS_LABEL, Group, Publisher, Source};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use sonde_proto::config::discovery::parse_nameserver;
use sonde_proto::config::{DnsSdConfig, DnsSdType, Labels};
use std::collections::HashMap;

pub(super) fn source(_job: &str, config: &DnsSdConfig) -> Source {
    let config = config.clone();
    Source::new("dns", move |publisher: Publisher| run(config, publisher))
}

async fn run(config: DnsSdConfig, publisher: Publisher) {
    let resolver = match resolver(&config) {
        Ok(r) => r,
        Err(e) => {
            // Without a resolver nothing can be found until the config changes; say so
            // once per refresh, so the counter and the log show it.
            let mut ticker = tokio::time::interval(config.refresh_interval.0);
            loop {
                ticker.tick().await;
                publisher.failed(&e);
            }
        }
    };
    let mut last: HashMap<String, Group> = HashMap::new();
    let mut ticker = tokio::time::interval(config.refresh_interval.0);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (resolver, config) = (&resolver, &config);
        let lookups = config
            .names
            .iter()
            .map(|name| async move { (name, lookup(resolver, name, config).await) });
        for (name, result) in futures::future::join_all(lookups).await {
            match result {
                Ok(group) => {
                    last.insert(name.clone(), group);
                }
                Err(e) => publisher.failed(&e),
            }
        }
        // In the configured order, so an unchanged answer publishes an equal list.
        let groups = config
            .names
            .iter()
            .filter_map(|n| last.get(n).cloned())
            .collect();
        publisher.publish(groups);
    }
}

/// Why a name could not be looked up; its last good group stays.
#[derive(Debug, thiserror::Error)]
#[error("dns_sd {kind} {name}: {message}")]
pub struct DnsSdError {
    kind: DnsSdType,
    name: String,
    message: String,
}

fn resolver(config: &DnsSdConfig) -> Result<TokioResolver, DnsSdError> {
    let fail = |message: String| DnsSdError {
        kind: config.kind,
        name: config.names.join(","),
        message,
    };
    let mut builder = if config.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| {
            fail(format!(
                "cannot use the system's resolver configuration: {e}"
            ))
        })?
    } else {
        let servers = config
            .nameservers
            .iter()
            .filter_map(|s| parse_nameserver(s))
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    // No cache: every refresh asks the servers, so a change shows at the next refresh
    // as in Prometheus, whatever the records' TTL.
    builder.options_mut().cache_size = 0;
    builder
        .build()
        .map_err(|e| fail(format!("cannot build a resolver: {e}")))
}

async fn lookup(
    resolver: &TokioResolver,
    name: &str,
    config: &DnsSdConfig,
) -> Result<Group, DnsSdError> {
    let record_type = match config.kind {
        DnsSdType::Srv => RecordType::SRV,
        DnsSdType::A => RecordType::A,
        DnsSdType::Aaaa => RecordType::AAAA,
        DnsSdType::Mx => RecordType::MX,
        DnsSdType::Ns => RecordType::NS,
    };
    let port = config.port.unwrap_or(0);
    let answers = match resolver.lookup(name, record_type).await {
        Ok(lookup) => lookup.answers().iter().map(|r| r.data.clone()).collect(),
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Vec::new(),
        Err(e) => {
            return Err(DnsSdError {
                kind: config.kind,
                name: name.to_string(),
                message: e.to_string(),
            });
        }
    };
    let mut targets = Vec::new();
    for data in answers {
        let mut labels = Labels::from([("__meta_dns_name".to_string(), name.to_string())]);
        let address = match &data {
            RData::SRV(srv) => {
                let target = srv.target.to_string();
                labels.insert("__meta_dns_srv_record_target".into(), target.clone());
                labels.insert("__meta_dns_srv_record_port".into(), srv.port.to_string());
                host_port(target.trim_end_matches('.'), srv.port)
            }
            RData::MX(mx) => {
                let target = mx.exchange.to_string();
                labels.insert("__meta_dns_mx_record_target".into(), target.clone());
                host_port(target.trim_end_matches('.'), port)
            }
            RData::NS(ns) => {
                let target = ns.0.to_string();
                labels.insert("__meta_dns_ns_record_target".into(), target.clone());
                host_port(target.trim_end_matches('.'), port)
            }
            RData::A(a) => host_port(&a.0.to_string(), port),
            RData::AAAA(a) => host_port(&a.0.to_string(), port),
            // A CNAME leads to the records asked for, which follow it in the answer.
            RData::CNAME(_) => continue,
            other => {
                tracing::warn!(name, record = ?other.record_type(), "dns_sd: unexpected record skipped");
                continue;
            }
        };
        labels.insert(ADDRESS_LABEL.to_string(), address);
        targets.push(labels);
    }
    Ok(Group {
        source: name.to_string(),
        targets,
        labels: Labels::new(),
    })
}

/// `host:port`, IPv6 addresses in brackets (Go's `net.JoinHostPort`).
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::{Message, MessageType, OpCode};
    use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, NS, SRV};
    use hickory_resolver::proto::rr::{Name, Record};

    /// A DNS server on loopback with one record of each type the mechanism asks for.
    async fn records_server() -> std::net::SocketAddr {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                reply.metadata.recursion_desired = q.metadata.recursion_desired;
                reply.metadata.recursion_available = true;
                if let Some(question) = q.queries.first() {
                    reply.add_query(question.clone());
                    let name = |s: &str| Name::from_ascii(s).unwrap();
                    let data = match question.query_type() {
                        RecordType::SRV => {
                            Some(RData::SRV(SRV::new(0, 0, 8080, name("web1.sd.test."))))
                        }
                        RecordType::MX => Some(RData::MX(MX::new(10, name("mail.sd.test.")))),
                        RecordType::NS => Some(RData::NS(NS(name("ns1.sd.test.")))),
                        RecordType::A => Some(RData::A(A::new(127, 0, 0, 9))),
                        RecordType::AAAA => Some(RData::AAAA(AAAA::new(0, 0, 0, 0, 0, 0, 0, 1))),
                        _ => None,
                    };
                    if let Some(data) = data {
                        reply.add_answer(Record::from_rdata(question.name().clone(), 60, data));
                    }
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn targets_and_meta_labels_as_prometheus_sets_them() {
        let server = records_server().await;
        let config = |kind, port| DnsSdConfig {
            names: vec!["x.sd.test".into()],
            kind,
            port,
            refresh_interval: sonde_proto::config::PromDuration::from_secs(30),
            nameservers: vec![server.to_string()],
        };
        type Case = (
            DnsSdType,
            Option<u16>,
            &'static [(&'static str, &'static str)],
        );
        let cases: [Case; 5] = [
            (
                DnsSdType::Srv,
                None,
                &[
                    ("__address__", "web1.sd.test:8080"),
                    ("__meta_dns_srv_record_port", "8080"),
                    ("__meta_dns_srv_record_target", "web1.sd.test."),
                ],
            ),
            (
                DnsSdType::Mx,
                Some(25),
                &[
                    ("__address__", "mail.sd.test:25"),
                    ("__meta_dns_mx_record_target", "mail.sd.test."),
                ],
            ),
            (
                DnsSdType::Ns,
                Some(53),
                &[
                    ("__address__", "ns1.sd.test:53"),
                    ("__meta_dns_ns_record_target", "ns1.sd.test."),
                ],
            ),
            (DnsSdType::A, Some(80), &[("__address__", "127.0.0.9:80")]),
            (DnsSdType::Aaaa, Some(80), &[("__address__", "[::1]:80")]),
        ];
        for (kind, port, want) in cases {
            let config = config(kind, port);
            let resolver = resolver(&config).unwrap();
            let group = lookup(&resolver, "x.sd.test", &config).await.unwrap();
            assert_eq!(group.source, "x.sd.test");
            let mut want: Labels = want
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            want.insert("__meta_dns_name".into(), "x.sd.test".into());
            assert_eq!(group.targets, vec![want], "{kind}");
        }
    }
}
