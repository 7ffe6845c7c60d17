//! `per_address`: the module's prober run once for each address of the target, at the
//! same time and under the same deadline, each run's samples labelled `ip`. The result
//! succeeds when `must_succeed` of the addresses do; `up` is built from that result
//! alone, so it stays one series per target.

use super::{
    Env, Failure, ProbeLog, Reason, Samples, Stage, dns, grpc, http, probe_once, record_answer,
    resolve_all, split_host_port, timed_out, websocket,
};
use sonde_proto::config::module::{IpProtocol, PerAddress};
use sonde_proto::config::{Module, Prober};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How many failing addresses the failure message names; the trace has them all.
const NAMED_FAILURES: usize = 3;

pub(crate) async fn probe(
    env: &Env<'_>,
    target: &str,
    module: &Module,
    per: &PerAddress,
    deadline: tokio::time::Instant,
    timeout: Duration,
    log: ProbeLog,
) -> (Samples, Result<(), Failure>) {
    let logging = log.is_on();
    let mut out = Samples::with_log(log);
    let (host, preferred, fallback) = match target_host(target, module) {
        Ok(v) => v,
        Err(f) => return (out, Err(f)),
    };
    out.set("probe_dns_lookup_time_seconds", 0.0);
    out.set("probe_resolved_addresses", 0.0);
    out.stage = Stage::Resolve;
    let started = Instant::now();
    let lookup = tokio::time::timeout_at(deadline, resolve_all(env, &host, preferred, fallback));
    let resolved = match lookup.await {
        Ok(r) => r,
        Err(_) => {
            let f = timed_out(&mut out, timeout);
            return (out, Err(f));
        }
    };
    out.stage = Stage::Start;
    out.set(
        "probe_dns_lookup_time_seconds",
        started.elapsed().as_secs_f64(),
    );
    record_answer(&mut out, &host, &resolved);
    let mut addresses = match resolved {
        Ok(a) => a,
        Err(e) => return (out, Err(Failure::new(Reason::Dns, e.to_string()))),
    };
    out.set("probe_resolved_addresses", addresses.len() as f64);
    addresses.truncate(per.max_addresses as usize);

    let runs = futures::future::join_all(addresses.iter().map(|&ip| async move {
        let pinned = Env {
            ctx: env.ctx,
            policy: env.policy,
            pinned: Some(ip),
        };
        let started = Instant::now();
        let log = if logging {
            ProbeLog::on()
        } else {
            ProbeLog::default()
        };
        let (samples, result) = probe_once(&pinned, target, module, deadline, timeout, log).await;
        (ip, samples, result, started.elapsed())
    }))
    .await;

    let mut succeeded = 0;
    let mut failures: Vec<(IpAddr, Failure)> = Vec::new();
    for (ip, mut samples, result, took) in runs {
        let ip_text = ip.to_string();
        out.log
            .append(std::mem::take(&mut samples.log), ("ip", &ip_text));
        for mut s in samples.items {
            s.labels.push(("ip", ip_text.clone()));
            out.items.push(s);
        }
        let ip_label = [("ip", ip_text.as_str())];
        out.gauge_with(
            "probe_success",
            &ip_label,
            f64::from(u8::from(result.is_ok())),
        );
        out.gauge_with("probe_duration_seconds", &ip_label, took.as_secs_f64());
        match result {
            Ok(()) => succeeded += 1,
            Err(f) => {
                out.gauge_with(
                    "probe_failure_info",
                    &[("reason", f.reason.as_str()), ("ip", &ip_text)],
                    1.0,
                );
                // Only the failing addresses' steps: they are what the trace explains.
                for step in samples.trace.steps {
                    out.trace.push(step);
                }
                failures.push((ip, f));
            }
        }
    }
    let probed = addresses.len() as u32;
    let needed = per.must_succeed.needed(probed);
    if succeeded >= needed {
        return (out, Ok(()));
    }
    let reason = failures.first().map_or(Reason::Config, |(_, f)| f.reason);
    let named: Vec<String> = failures
        .iter()
        .take(NAMED_FAILURES)
        .map(|(ip, f)| format!("{ip}: {}", f.message))
        .collect();
    let more = failures.len().saturating_sub(NAMED_FAILURES);
    let message = format!(
        "{succeeded} of {probed} addresses succeeded, per_address.must_succeed is {}: {}{}",
        per.must_succeed,
        named.join("; "),
        if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        }
    );
    (out, Err(Failure::new(reason, message)))
}

/// The host a prober resolves for `target`, and its module's address family options.
fn target_host(target: &str, module: &Module) -> Result<(String, IpProtocol, bool), Failure> {
    let config = |e: &dyn std::fmt::Display| Failure::new(Reason::Config, e.to_string());
    match module.prober {
        Prober::Http => Ok((
            http::target_host(target).map_err(|e| config(&e))?,
            module.http.preferred_ip_protocol,
            module.http.ip_protocol_fallback,
        )),
        Prober::Tcp => Ok((
            split_host_port(target)
                .map_err(|e| config(&e))?
                .0
                .to_string(),
            module.tcp.preferred_ip_protocol,
            module.tcp.ip_protocol_fallback,
        )),
        Prober::Dns => Ok((
            dns::server_target(target, 53)
                .map_err(|e| config(&e))?
                .0
                .to_string(),
            module.dns.preferred_ip_protocol,
            module.dns.ip_protocol_fallback,
        )),
        Prober::Icmp => Ok((
            target.to_string(),
            module.icmp.preferred_ip_protocol,
            module.icmp.ip_protocol_fallback,
        )),
        Prober::Grpc => Ok((
            grpc::host_port(target, module.grpc.tls)
                .map_err(|e| config(&e))?
                .0
                .to_string(),
            module.grpc.preferred_ip_protocol,
            module.grpc.ip_protocol_fallback,
        )),
        Prober::Websocket => Ok((
            websocket::host_port(target)
                .map_err(|e| config(&e))?
                .0
                .to_string(),
            module.websocket.preferred_ip_protocol,
            module.websocket.ip_protocol_fallback,
        )),
        Prober::Multihttp => Err(Failure::new(
            Reason::Config,
            "per_address: a multihttp check's steps may reach several hosts; remove per_address from the module",
        )),
        Prober::Unix => Err(Failure::new(
            Reason::Config,
            "per_address: a unix socket has no addresses to probe one by one; remove per_address from the module",
        )),
    }
}

#[cfg(test)]
mod tests {
    use crate::probe::run;
    use crate::probe::test_support::{ctx, labelled, sample};
    use sonde_proto::config::Module;
    use sonde_proto::trace::Step;
    use std::time::Duration;

    fn each_address(must_succeed: &str) -> Module {
        serde_json::from_value(serde_json::json!({
            "prober": "tcp",
            "per_address": {"must_succeed": must_succeed},
        }))
        .unwrap()
    }

    /// A listening port on 127.0.0.1, and the tcp target that names it.
    async fn listening() -> (tokio::net::TcpListener, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        (listener, target)
    }

    /// The tcp prober on every address of `target`, all of which must succeed.
    async fn probe_each_address(target: &str) -> crate::probe::ProbeOutcome {
        run(&ctx(), target, &each_address("all"), Duration::from_secs(2)).await
    }

    #[tokio::test]
    async fn each_address_gets_its_own_ip_labelled_samples() {
        let (_listener, target) = listening().await;
        let o = probe_each_address(&target).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_success"), Some(1.0));
        assert_eq!(sample(&o, "probe_resolved_addresses"), Some(1.0));
        let ip = vec![("ip", "127.0.0.1".to_string())];
        assert_eq!(
            labelled(&o, "probe_success"),
            [(ip.clone(), 1.0), (vec![], 1.0)]
        );
        assert!(
            labelled(&o, "probe_ip_protocol").contains(&(ip, 4.0)),
            "the prober's own samples carry the ip label too"
        );
        assert_eq!(o.trace, None, "no trace on success");
    }

    #[tokio::test]
    async fn a_failing_address_fails_the_verdict_with_its_trace() {
        let (listener, target) = listening().await;
        drop(listener);
        let o = probe_each_address(&target).await;
        assert!(!o.success);
        assert_eq!(
            o.failure.as_deref(),
            Some(
                "0 of 1 addresses succeeded, per_address.must_succeed is all: 127.0.0.1: connect: connection refused"
            )
        );
        let trace = o.trace.clone().unwrap();
        assert!(matches!(
            &trace.steps[0],
            Step::Connect { ok: false, error: Some(e), .. } if e == "connection refused"
        ));
        assert!(
            labelled(&o, "probe_failure_info")
                .iter()
                .any(|(l, _)| l.contains(&("ip", "127.0.0.1".to_string())))
        );
    }
}
