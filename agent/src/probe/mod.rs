//! The probers, behind one interface in the shape of blackbox_exporter's `ProbeFn`:
//! a target, a module and a deadline in; success and the samples it produced out.
//!
//! Adding a prober is adding one file here and one arm in [`run`].

pub mod dns;
pub mod http;
pub mod tcp;

use sonde_proto::config::{Module, Prober};
use std::time::{Duration, Instant};

/// One sample a probe produced, before interning for the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// Where a prober writes its samples. Kept outside the prober's future so that what
/// was measured before a timeout (the resolve and connect phases, say) survives it.
#[derive(Debug, Default)]
pub struct Samples {
    pub items: Vec<Sample>,
}

impl Samples {
    pub fn gauge(&mut self, name: &'static str, value: f64) {
        self.items.push(Sample {
            name,
            labels: Vec::new(),
            value,
        });
    }

    pub fn gauge_with(&mut self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        self.items.push(Sample {
            name,
            labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        });
    }

    /// Replaces the value of an existing unlabelled sample, or adds it.
    pub fn set(&mut self, name: &'static str, value: f64) {
        match self
            .items
            .iter_mut()
            .find(|s| s.name == name && s.labels.is_empty())
        {
            Some(s) => s.value = value,
            None => self.gauge(name, value),
        }
    }
}

/// Shared, long-lived state the probers use (the system resolver, TLS roots), built
/// once per process rather than once per probe.
pub struct ProbeContext {
    pub resolver: hickory_resolver::TokioResolver,
}

impl ProbeContext {
    /// Uses the system's resolver configuration (`/etc/resolv.conf`).
    pub fn from_system() -> Result<Self, String> {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(|e| {
                format!("cannot set up DNS resolution from the system configuration (/etc/resolv.conf): {e}")
            })?;
        Ok(Self { resolver })
    }
}

/// What one probe found.
#[derive(Debug)]
pub struct ProbeOutcome {
    pub success: bool,
    pub duration: Duration,
    /// Every sample, `probe_success` and `probe_duration_seconds` included.
    pub samples: Vec<Sample>,
    /// Why the probe failed, in a few words, when it did.
    pub failure: Option<String>,
}

/// Runs one probe of `target` with `module`, bounded by `timeout`.
pub async fn run(ctx: &ProbeContext, target: &str, module: &Module, timeout: Duration) -> ProbeOutcome {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut samples = Samples::default();
    let result = {
        let probe = async {
            match module.prober {
                Prober::Http => http::probe(ctx, target, module, &mut samples).await,
                Prober::Tcp => tcp::probe(ctx, target, module, &mut samples).await,
                Prober::Dns => dns::probe(ctx, target, module, &mut samples).await,
            }
        };
        match tokio::time::timeout_at(deadline, probe).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {}", sonde_proto::config::PromDuration(timeout))),
        }
    };
    let duration = started.elapsed();
    let success = result.is_ok();
    samples.set("probe_success", if success { 1.0 } else { 0.0 });
    samples.set("probe_duration_seconds", duration.as_secs_f64());
    ProbeOutcome {
        success,
        duration,
        samples: samples.items,
        failure: result.err(),
    }
}
