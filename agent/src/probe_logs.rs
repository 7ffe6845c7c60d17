//! What `/probe?debug=true` answers and `/logs` keeps: a probe's debug output in
//! blackbox_exporter's layout ("Logs for the probe:", "Metrics that would have been
//! returned:", "Module configuration:"), and the last probes of each target.
//!
//! Bounds: [`PER_TARGET`] probes per target (a failure pushed out by later successes is
//! kept aside, one per target, as blackbox_exporter keeps failures), and [`MAX_BYTES`]
//! for the whole store, the oldest entries of any target dropped first; so a fleet of
//! 50,000 checks costs at most that, whatever they answer.
//!
//! Only a probe run with its log on (`/probe?debug=true`) has the step-by-step log; the
//! others (scheduled checks, `/probe` without `debug`) keep what they produce anyway
//! — the steps of their failure trace, the failure, the samples — and are shown as a
//! debug output when read, so that probing pays no formatting for a log nobody reads.

use crate::probe::log::{ProbeLog, rfc3339_millis};
use crate::probe::{ProbeOutcome, Sample};
use sonde_proto::config::Module;
use sonde_proto::trace::Trace;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Probes kept per target.
pub const PER_TARGET: usize = 4;
/// What the whole store may hold, roughly (text, samples, traces): small beside the
/// agent's own memory goal (64 MiB at 10,000 checks, `docs/benchmarks.md`), which the
/// store must not push over.
pub const MAX_BYTES: usize = 4 << 20;

/// Where a kept probe came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A scheduled check of this job (assigned or local).
    Check { job: String },
    /// A `/probe` request.
    ProbeEndpoint,
}

/// One kept probe.
#[derive(Debug)]
pub struct KeptProbe {
    pub id: u64,
    pub at: SystemTime,
    pub target: String,
    pub module_name: String,
    pub origin: Origin,
    pub success: bool,
    body: Body,
}

#[derive(Debug)]
enum Body {
    /// The whole debug output, written when the probe ran with its log on.
    Rendered(String),
    /// What a probe without a log produced, rendered when read.
    Outcome {
        duration: Duration,
        failure: Option<String>,
        trace: Option<Trace>,
        samples: Vec<Sample>,
        module: Arc<Module>,
    },
}

impl KeptProbe {
    /// The debug output, in blackbox_exporter's layout.
    pub fn debug_output(&self) -> String {
        match &self.body {
            Body::Rendered(text) => text.clone(),
            Body::Outcome {
                duration,
                failure,
                trace,
                samples,
                module,
            } => {
                let mut log = ProbeLog::on();
                crate::probe_log!(
                    log,
                    Info,
                    "Probe ran without its step-by-step log; its trace follows (run it with /probe?debug=true for every step)",
                    started = rfc3339_millis(self.at)
                );
                if let Some(trace) = trace {
                    for step in &trace.steps {
                        log.step(step);
                    }
                }
                match failure {
                    None => crate::probe_log!(
                        log,
                        Info,
                        "Probe succeeded",
                        duration_seconds = duration.as_secs_f64()
                    ),
                    Some(f) => crate::probe_log!(
                        log,
                        Error,
                        "Probe failed",
                        err = f,
                        duration_seconds = duration.as_secs_f64()
                    ),
                }
                debug_output(&log, &self.module_name, &self.target, samples, module)
            }
        }
    }

    fn weight(&self) -> usize {
        const FIXED: usize = 256;
        let body = match &self.body {
            Body::Rendered(text) => text.len(),
            Body::Outcome {
                failure,
                trace,
                samples,
                ..
            } => {
                failure.as_ref().map_or(0, String::len)
                    + trace.as_ref().map_or(0, Trace::weight)
                    + samples
                        .iter()
                        .map(|s| 48 + s.labels.iter().map(|(_, v)| 24 + v.len()).sum::<usize>())
                        .sum::<usize>()
            }
        };
        FIXED + self.target.len() + self.module_name.len() + body
    }
}

/// A probe's debug output: its log, the samples in the text format, the module as YAML
/// with its secrets hidden.
pub fn debug_output(
    log: &ProbeLog,
    module_name: &str,
    target: &str,
    samples: &[Sample],
    module: &Module,
) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str("Logs for the probe:\n");
    log.render(&[("module", module_name), ("target", target)], &mut out);
    out.push_str("\n\n\nMetrics that would have been returned:\n");
    out.push_str(&crate::web::exposition(samples));
    out.push_str("\n\n\nModule configuration:\n");
    out.push_str(&module_yaml(module));
    out
}

/// The module as YAML, blackbox_exporter's way: secrets (passwords, bearer tokens,
/// credentials, the values of credential headers) as `<secret>`; file names are shown,
/// never what the files hold.
pub fn module_yaml(module: &Module) -> String {
    let mut value = match serde_json::to_value(module) {
        Ok(v) => v,
        Err(e) => return format!("cannot show the module: {e}\n"),
    };
    hide_secrets(&mut value);
    serde_saphyr::to_string(&value).unwrap_or_else(|e| format!("cannot show the module: {e}\n"))
}

fn hide_secrets(value: &mut serde_json::Value) {
    // `secrets`: the secret values of `http_headers` and websocket headers.
    const SECRET_KEYS: [&str; 7] = [
        "secrets",
        "password",
        "bearer_token",
        "credentials",
        "client_secret",
        "token",
        "key",
    ];
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if SECRET_KEYS.contains(&key.as_str()) && !v.is_null() {
                    *v = serde_json::Value::String("<secret>".into());
                } else if key == "headers" {
                    if let serde_json::Value::Object(headers) = v {
                        for (name, hv) in headers.iter_mut() {
                            if crate::probe::log::is_secret_header(name) {
                                *hv = serde_json::Value::String("<secret>".into());
                            }
                        }
                    }
                } else {
                    hide_secrets(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(hide_secrets),
        _ => {}
    }
}

/// The last probes of each target, bounded ([`PER_TARGET`], [`MAX_BYTES`]).
#[derive(Default)]
pub struct ProbeLogs {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    targets: HashMap<String, Kept>,
    /// Every kept probe's (id, target), oldest first: what the global bound drops.
    order: VecDeque<(u64, String)>,
    /// Probes kept: `order` is compacted when it holds many more entries than this.
    live: usize,
    bytes: usize,
}

#[derive(Default)]
struct Kept {
    /// Newest last.
    recent: VecDeque<Arc<KeptProbe>>,
    /// The latest failure pushed out of `recent` by later probes.
    failure: Option<Arc<KeptProbe>>,
}

impl ProbeLogs {
    /// Keeps a probe that ran with its log on, as its debug output.
    pub fn keep_rendered(
        &self,
        target: &str,
        module_name: &str,
        origin: Origin,
        at: SystemTime,
        success: bool,
        text: String,
    ) -> u64 {
        self.keep(
            target,
            module_name,
            origin,
            at,
            success,
            Body::Rendered(text),
        )
    }

    /// Keeps a probe that ran without a log: its trace, failure and samples.
    pub fn keep_outcome(
        &self,
        target: &str,
        module_name: &str,
        module: &Arc<Module>,
        origin: Origin,
        at: SystemTime,
        outcome: &ProbeOutcome,
    ) -> u64 {
        let body = Body::Outcome {
            duration: outcome.duration,
            failure: outcome.failure.clone(),
            trace: outcome.trace.clone(),
            samples: outcome.samples.clone(),
            module: module.clone(),
        };
        self.keep(target, module_name, origin, at, outcome.success, body)
    }

    fn keep(
        &self,
        target: &str,
        module_name: &str,
        origin: Origin,
        at: SystemTime,
        success: bool,
        body: Body,
    ) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let id = inner.next_id;
        inner.next_id += 1;
        let probe = Arc::new(KeptProbe {
            id,
            at,
            target: target.to_string(),
            module_name: module_name.to_string(),
            origin,
            success,
            body,
        });
        inner.bytes += probe.weight() + order_weight(target);
        inner.order.push_back((id, target.to_string()));
        let kept = inner.targets.entry(target.to_string()).or_default();
        kept.recent.push_back(probe);
        let mut freed = 0;
        let mut gone = 0;
        if kept.recent.len() > PER_TARGET
            && let Some(out) = kept.recent.pop_front()
        {
            let gone_probe = if out.success {
                Some(out)
            } else {
                kept.failure.replace(out)
            };
            if let Some(p) = gone_probe {
                freed += p.weight();
                gone += 1;
            }
        }
        inner.bytes -= freed;
        inner.live = inner.live + 1 - gone;
        if inner.order.len() > 2 * inner.live + 1024 {
            inner.compact_order();
        }
        while inner.bytes > MAX_BYTES {
            let Some((oldest, target)) = inner.order.pop_front() else {
                break;
            };
            inner.bytes -= order_weight(&target);
            inner.drop_probe(oldest, &target);
        }
        id
    }

    /// The newest kept probe of `target` (of `module`, when given).
    pub fn latest(&self, target: &str, module: Option<&str>) -> Option<Arc<KeptProbe>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let kept = inner.targets.get(target)?;
        kept.recent
            .iter()
            .rev()
            .chain(kept.failure.iter())
            .find(|p| module.is_none_or(|m| p.module_name == m))
            .cloned()
    }

    pub fn by_id(&self, id: u64) -> Option<Arc<KeptProbe>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (_, target) = inner.order.iter().find(|(i, _)| *i == id)?;
        let kept = inner.targets.get(target)?;
        kept.recent
            .iter()
            .chain(kept.failure.iter())
            .find(|p| p.id == id)
            .cloned()
    }

    /// Every kept probe, newest first.
    pub fn list(&self) -> Vec<Arc<KeptProbe>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Arc<KeptProbe>> = inner
            .targets
            .values()
            .flat_map(|k| k.recent.iter().chain(k.failure.iter()).cloned())
            .collect();
        all.sort_by_key(|p| std::cmp::Reverse(p.id));
        all
    }

    /// What the store holds, by its own count.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

/// What an entry of `Inner::order` costs: it stays until the global bound drops it,
/// after its probe has left its target's ring, so it counts against the bound too.
fn order_weight(target: &str) -> usize {
    std::mem::size_of::<(u64, String)>() + target.len()
}

impl Inner {
    /// Drops the entries of `order` whose probes have left their rings.
    fn compact_order(&mut self) {
        let mut live: Vec<(u64, String)> = self
            .targets
            .iter()
            .flat_map(|(t, k)| {
                k.recent
                    .iter()
                    .chain(k.failure.iter())
                    .map(move |p| (p.id, t.clone()))
            })
            .collect();
        live.sort_unstable_by_key(|(id, _)| *id);
        let before: usize = self.order.iter().map(|(_, t)| order_weight(t)).sum();
        let after: usize = live.iter().map(|(_, t)| order_weight(t)).sum();
        self.bytes = self.bytes - before + after;
        self.order = live.into();
    }

    fn drop_probe(&mut self, id: u64, target: &str) {
        let Some(kept) = self.targets.get_mut(target) else {
            return;
        };
        let mut freed = 0;
        if let Some(at) = kept.recent.iter().position(|p| p.id == id) {
            if let Some(p) = kept.recent.remove(at) {
                freed = p.weight();
            }
        } else if kept.failure.as_ref().is_some_and(|p| p.id == id) {
            freed = kept.failure.take().map_or(0, |p| p.weight());
        }
        if freed > 0 {
            self.live -= 1;
        }
        self.bytes -= freed;
        if kept.recent.is_empty() && kept.failure.is_none() {
            self.targets.remove(target);
        }
    }
}

/// A probe's debug output header line for a listing: id, time, result, module, target.
pub fn summary_line(p: &KeptProbe) -> String {
    let mut line = String::new();
    let _ = write!(
        line,
        "  /logs?id={}\t{}\t{}\tmodule={}\ttarget={}",
        p.id,
        rfc3339_millis(p.at),
        if p.success { "success" } else { "FAILURE" },
        p.module_name,
        p.target
    );
    if let Origin::Check { job } = &p.origin {
        let _ = write!(line, "\tjob={job}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(logs: &ProbeLogs, target: &str, success: bool, size: usize) -> u64 {
        logs.keep_rendered(
            target,
            "m",
            Origin::ProbeEndpoint,
            SystemTime::now(),
            success,
            "x".repeat(size),
        )
    }

    #[test]
    fn each_target_keeps_its_last_probes_and_its_last_failure() {
        let logs = ProbeLogs::default();
        let failed = keep(&logs, "a", false, 10);
        for _ in 0..10 {
            keep(&logs, "a", true, 10);
        }
        let last = keep(&logs, "a", true, 10);
        keep(&logs, "b", true, 10);
        assert_eq!(logs.latest("a", None).unwrap().id, last);
        assert!(!logs.by_id(failed).unwrap().success);
        assert_eq!(
            logs.list().iter().filter(|p| p.target == "a").count(),
            PER_TARGET + 1
        );
        assert!(logs.latest("a", Some("other")).is_none());
        assert!(logs.latest("c", None).is_none());
    }

    #[test]
    fn the_whole_store_is_bounded_oldest_first() {
        let logs = ProbeLogs::default();
        let first = keep(&logs, "t0", true, 1 << 20);
        for i in 1..100 {
            keep(&logs, &format!("t{i}"), true, 1 << 20);
        }
        assert!(logs.bytes() <= MAX_BYTES, "{}", logs.bytes());
        assert!(logs.by_id(first).is_none());
        assert!(logs.latest("t99", None).is_some());
        let listed: usize = logs.list().iter().map(|p| p.weight()).sum();
        assert!(listed < logs.bytes());
        // Small probes of one target: the ring and the order stay bounded too.
        let logs = ProbeLogs::default();
        for _ in 0..200_000 {
            keep(&logs, "t", true, 10);
        }
        assert!(logs.bytes() <= MAX_BYTES);
        let inner = logs.inner.lock().unwrap();
        assert_eq!(inner.live, PER_TARGET);
        assert!(
            inner.order.len() <= 2 * PER_TARGET + 1024,
            "{}",
            inner.order.len()
        );
    }

    #[test]
    fn module_yaml_hides_secrets() {
        let module: Module = serde_json::from_value(serde_json::json!({
            "prober": "http",
            "http": {
                "headers": {"Authorization": "Bearer hunter2", "X-Plain": "visible"},
                "basic_auth": {"username": "probe", "password": "hunter3"},
                "bearer_token_file": "/etc/sonde/token"
            }
        }))
        .unwrap();
        let yaml = module_yaml(&module);
        assert!(
            !yaml.contains("hunter2") && !yaml.contains("hunter3"),
            "{yaml}"
        );
        assert!(yaml.contains("prober: http"), "{yaml}");
        assert!(
            yaml.contains("visible") && yaml.contains("username: probe"),
            "{yaml}"
        );
        assert!(yaml.contains("/etc/sonde/token"), "{yaml}");
    }
}
