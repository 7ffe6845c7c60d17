//! Every label set the aggregator writes, built in one place: remote write, `/metrics`
//! and the API all take their series from here, so a series has the same labels
//! wherever it is read.
//!
//! Precedence, the same for every builder: the labels sonde sets (`__name__`, `job`,
//! `instance`, `agent`) win over target labels, which win over a sample's own labels;
//! external labels are added by each output to series that do not carry the name.

use crate::model::Symbol;
use crate::series::{Label, Series, SeriesLabels};
use sonde_proto::config::Labels;
use std::sync::{Arc, LazyLock};

fn constant(s: &'static str) -> Arc<str> {
    Arc::from(s)
}

static NAME: LazyLock<Arc<str>> = LazyLock::new(|| constant("__name__"));
static JOB: LazyLock<Arc<str>> = LazyLock::new(|| constant("job"));
static INSTANCE: LazyLock<Arc<str>> = LazyLock::new(|| constant("instance"));
static AGENT: LazyLock<Arc<str>> = LazyLock::new(|| constant("agent"));

/// The labels every series of one target shares: `job`, `instance`, then the target's
/// own labels (a target label named `job` or `instance` loses). Built once per target
/// and label change, and shared by all its series.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetBase {
    labels: Arc<[Label]>,
}

impl TargetBase {
    pub fn new(job: &str, instance: &str, target_labels: &Labels) -> Self {
        let mut labels: Vec<Label> = vec![
            (JOB.clone(), Arc::from(job)),
            (INSTANCE.clone(), Arc::from(instance)),
        ];
        labels.extend(
            target_labels
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "job" | "instance"))
                .map(|(k, v)| (Arc::from(k.as_str()), Arc::from(v.as_str()))),
        );
        Self {
            labels: labels.into(),
        }
    }

    /// A merged series of the target (`up`, `sonde_target_agents`, ...).
    pub fn merged(&self, name: &str) -> Series {
        let mut labels = Vec::with_capacity(self.labels.len() + 1);
        labels.push((NAME.clone(), Arc::from(name)));
        labels.extend(self.labels.iter().cloned());
        Arc::new(SeriesLabels::new(labels))
    }

    /// A per-agent probe series: the target's labels (one named `agent` loses to the
    /// agent), `agent`, the sample's labels (which cannot override any of those), and
    /// the metric name.
    pub fn probe(
        &self,
        agent: &Arc<str>,
        name: &Symbol,
        sample_labels: &[(Symbol, Symbol)],
    ) -> Series {
        let mut labels = Vec::with_capacity(self.labels.len() + 2 + sample_labels.len());
        labels.push((NAME.clone(), name.clone()));
        labels.push((AGENT.clone(), agent.clone()));
        labels.extend(self.labels.iter().cloned());
        labels.extend(sample_labels.iter().cloned());
        Arc::new(SeriesLabels::new(labels))
    }

    /// How many labels the base has.
    pub fn label_count(&self) -> usize {
        self.labels.len()
    }

    /// True when both are the same build (not only equal labels).
    pub fn same(&self, other: &TargetBase) -> bool {
        Arc::ptr_eq(&self.labels, &other.labels)
    }

    /// The value of one of the base labels.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| &**v)
    }
}

/// `sonde_job_missing{job}`, `sonde_job_targets{job}`.
pub fn job(name: &str, job: &str) -> Series {
    Arc::new(SeriesLabels::new(vec![
        (NAME.clone(), Arc::from(name)),
        (JOB.clone(), Arc::from(job)),
    ]))
}

/// `sonde_agent_up{agent}` and the other per-agent meta series.
pub fn agent(name: &str, agent: &str) -> Series {
    Arc::new(SeriesLabels::new(vec![
        (NAME.clone(), Arc::from(name)),
        (AGENT.clone(), Arc::from(agent)),
    ]))
}

/// `sonde_agent_info`: the agent's own labels, then `agent`, which wins.
pub fn agent_info(agent: &str, agent_labels: &Labels) -> Series {
    let mut labels = vec![
        (NAME.clone(), constant("sonde_agent_info")),
        (AGENT.clone(), Arc::from(agent)),
    ];
    labels.extend(
        agent_labels
            .iter()
            .map(|(k, v)| (Arc::from(k.as_str()), Arc::from(v.as_str()))),
    );
    Arc::new(SeriesLabels::new(labels))
}

/// External labels in the form outputs add them: empty values dropped.
pub fn external(labels: &Labels) -> Vec<Label> {
    labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (Arc::from(k.as_str()), Arc::from(v.as_str())))
        .collect()
}

/// A series' labels without `__name__`, plus the external labels it does not carry, as
/// `/metrics` and the API print them.
pub fn exposed(series: &SeriesLabels, external: &[Label]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = series
        .labels()
        .iter()
        .filter(|(k, _)| &**k != "__name__")
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in external {
        if series.get(k).is_none() {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sonde_labels_win_over_target_and_sample_labels() {
        let base = TargetBase::new(
            "web",
            "a:80",
            &labels(&[("job", "evil"), ("agent", "evil"), ("team", "shop")]),
        );
        let s = base.probe(
            &Arc::from("eu-1"),
            &Arc::from("probe_http_duration_seconds"),
            &[
                (Arc::from("phase"), Arc::from("tls")),
                (Arc::from("team"), Arc::from("evil")),
            ],
        );
        assert_eq!(
            s.to_pairs(),
            [
                ("__name__", "probe_http_duration_seconds"),
                ("agent", "eu-1"),
                ("instance", "a:80"),
                ("job", "web"),
                ("phase", "tls"),
                ("team", "shop"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let up = base.merged("up");
        assert_eq!(
            up.get("agent"),
            Some("evil"),
            "merged series keep a target label named agent"
        );
        assert_eq!(up.get("job"), Some("web"));
    }

    #[test]
    fn exposed_adds_external_labels_the_series_lacks() {
        let s = job("sonde_job_missing", "web");
        let ext = external(&labels(&[("cluster", "eu1"), ("job", "x"), ("empty", "")]));
        assert_eq!(
            exposed(&s, &ext),
            [("job", "web"), ("cluster", "eu1")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
}
