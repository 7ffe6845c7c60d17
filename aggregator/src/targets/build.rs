//! A discovered group of targets becomes the job's checks, through the job's
//! `relabel_configs` as Prometheus applies them to a scrape job's targets.
//!
//! Each target starts as the label set Prometheus builds for it: its own labels
//! (`__address__`, any `__meta_*` from discovery), the group's labels, then `job`,
//! `__scheme__`, `__metrics_path__`, `__scrape_interval__`, `__scrape_timeout__` and a
//! `__param_<name>` for each of the job's `params`. After relabeling, the labels starting
//! with `__` are dropped; the agents probe `__param_target` when it is set (a blackbox
//! job's rewrite), else `__address__`; the `instance` label is the one relabeling left, else
//! `__address__`, as Prometheus gives it.

use super::{Target, TargetSet};
use sonde_proto::config::{
    Labels, PromDuration, ResolvedJob, check_target, is_valid_label_name, relabel,
};
use std::sync::Arc;

/// Adds a discovered group: each target a label set holding `__address__` (and whatever
/// `__meta_*` labels its discovery gives it), plus the labels the whole group shares.
pub(super) fn add_labeled_group(
    set: &mut TargetSet,
    job: &ResolvedJob,
    targets: impl IntoIterator<Item = Labels>,
    group_labels: &Labels,
) {
    for target_labels in targets {
        let address = target_labels
            .get("__address__")
            .cloned()
            .unwrap_or_default();
        match build_target(job, target_labels, group_labels) {
            Ok(Some(target)) => {
                set.entry((job.name.clone(), target.instance.clone()))
                    .or_insert_with(|| Arc::new(target));
            }
            Ok(None) => {
                tracing::debug!(job = %job.name, address, "target dropped by relabel_configs")
            }
            Err(e) => {
                tracing::warn!(job = %job.name, target = %address, error = %e, "target skipped")
            }
        }
    }
}

/// Why a discovered target cannot become a check.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetBuildError {
    #[error("no __address__ left after relabel_configs; a target needs an address to probe")]
    NoAddress,
    #[error(
        "relabel_configs made the label name {0:?}, which is not a valid label name (letters, digits and '_', not starting with a digit)"
    )]
    InvalidLabelName(String),
    #[error("probed target {target:?}: {error}")]
    Unprobeable {
        target: String,
        error: sonde_proto::config::TargetError,
    },
}

/// The check one discovered target becomes; `None` when relabeling drops it.
pub fn build_target(
    job: &ResolvedJob,
    target_labels: Labels,
    group_labels: &Labels,
) -> Result<Option<Target>, TargetBuildError> {
    let config = &job.config;
    if config.relabel_configs.is_empty() && !config.params.contains_key("target") {
        // Nothing can move the address away from the instance: the plain path, which keeps
        // the group's labels as they are.
        let address = target_labels
            .get("__address__")
            .cloned()
            .unwrap_or_default();
        if address.is_empty() {
            return Err(TargetBuildError::NoAddress);
        }
        check_target(&job.module, &address).map_err(|error| TargetBuildError::Unprobeable {
            target: address.clone(),
            error,
        })?;
        // The target's own labels over the group's; `__meta_*` and the other `__` labels
        // of discovery are for relabeling only, as in Prometheus.
        let mut labels = group_labels.clone();
        labels.extend(target_labels);
        labels.retain(|name, _| !name.starts_with("__"));
        return Ok(Some(Target {
            job: job.name.clone(),
            instance: address,
            probe_target: None,
            labels,
        }));
    }
    let start = prometheus_labels(job, target_labels, group_labels);
    let Some(mut labels) = relabel::apply(&config.relabel_configs, &start) else {
        return Ok(None);
    };
    let address = labels
        .get("__address__")
        .filter(|a| !a.is_empty())
        .cloned()
        .ok_or(TargetBuildError::NoAddress)?;
    let probed = labels
        .get("__param_target")
        .filter(|t| !t.is_empty())
        .cloned()
        .unwrap_or_else(|| address.clone());
    labels.retain(|name, _| !name.starts_with("__"));
    if let Some(bad) = labels.keys().find(|name| !is_valid_label_name(name)) {
        return Err(TargetBuildError::InvalidLabelName(bad.clone()));
    }
    check_target(&job.module, &probed).map_err(|error| TargetBuildError::Unprobeable {
        target: probed.clone(),
        error,
    })?;
    let instance = labels.remove("instance").unwrap_or(address);
    if let Some(relabeled_job) = labels.remove("job")
        && relabeled_job != job.name
    {
        tracing::warn!(job = %job.name, instance, relabeled_job, "relabel_configs set the job label; series keep the job's name, which alerts and quorum key on");
    }
    Ok(Some(Target {
        job: job.name.clone(),
        probe_target: (probed != instance).then_some(probed),
        instance,
        labels,
    }))
}

/// The label set Prometheus gives a target before relabeling: the target's own labels
/// win over its group's, and both over the job's defaults.
fn prometheus_labels(job: &ResolvedJob, target_labels: Labels, group_labels: &Labels) -> Labels {
    let config = &job.config;
    let mut labels = target_labels;
    let mut default = |name: &str, value: String| {
        labels.entry(name.to_string()).or_insert(value);
    };
    for (name, value) in group_labels {
        default(name, value.clone());
    }
    default("job", job.name.clone());
    default("__scheme__", "http".into());
    default(
        "__metrics_path__",
        config
            .metrics_path
            .clone()
            .unwrap_or_else(|| "/metrics".into()),
    );
    default(
        "__scrape_interval__",
        PromDuration(job.interval).to_string(),
    );
    default("__scrape_timeout__", PromDuration(job.timeout).to_string());
    for (name, values) in &config.params {
        if let Some(first) = values.first() {
            default(&format!("__param_{name}"), first.clone());
        }
    }
    labels.retain(|_, value| !value.is_empty());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_proto::config::{JobConfig, JobDefaults, Located, Module, from_yaml_str};
    use std::collections::BTreeMap;
    use std::path::Path;

    fn job(yaml: &str) -> ResolvedJob {
        #[derive(serde::Deserialize)]
        struct Doc {
            modules: BTreeMap<String, Module>,
            jobs: Vec<Located<JobConfig>>,
        }
        let text = format!(
            "modules: {{http_2xx: {{prober: http}}, tcp: {{prober: tcp}}}}\njobs:\n  - {}\n",
            yaml.replace('\n', "\n    ")
        );
        let doc: Doc = from_yaml_str(Path::new("j.yml"), &text).unwrap();
        sonde_proto::config::resolve_jobs(
            Path::new("j.yml"),
            &doc.modules,
            &doc.jobs,
            JobDefaults::default(),
        )
        .unwrap()
        .remove(0)
    }

    fn targets(job: &ResolvedJob, addresses: &[&str], group: &[(&str, &str)]) -> TargetSet {
        let mut set = TargetSet::new();
        let group: Labels = group
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let targets = addresses
            .iter()
            .map(|a| Labels::from([("__address__".to_string(), a.to_string())]));
        add_labeled_group(&mut set, job, targets, &group);
        set
    }

    const BLACKBOX: &str = "job_name: blackbox
metrics_path: /probe
params: {module: [http_2xx]}
relabel_configs:
  - source_labels: [__address__]
    target_label: __param_target
  - source_labels: [__param_target]
    target_label: instance
  - target_label: __address__
    replacement: 127.0.0.1:9115";

    #[test]
    fn a_blackbox_job_probes_the_param_target_under_its_instance() {
        let job = job(BLACKBOX);
        let set = targets(
            &job,
            &["http://a.example/", "https://b.example/x"],
            &[("team", "web")],
        );
        let got: Vec<(&str, Option<&str>, &Labels)> = set
            .values()
            .map(|t| (t.instance.as_str(), t.probe_target.as_deref(), &t.labels))
            .collect();
        let team = Labels::from([("team".to_string(), "web".to_string())]);
        assert_eq!(
            got,
            [
                ("http://a.example/", None, &team),
                ("https://b.example/x", None, &team)
            ]
        );
    }

    #[test]
    fn without_relabel_configs_a_target_is_what_it_always_was() {
        let job = job("job_name: web\nmodule: http_2xx");
        let set = targets(&job, &["http://a.example/"], &[("team", "web")]);
        let t = &set[&("web".to_string(), "http://a.example/".to_string())];
        assert_eq!(t.instance, "http://a.example/");
        assert_eq!(t.probe_target, None);
        assert_eq!(t.labels, Labels::from([("team".into(), "web".into())]));
    }

    #[test]
    fn an_instance_apart_from_the_probed_target_travels_with_it() {
        let job = job("job_name: web
module: http_2xx
relabel_configs:
  - {source_labels: [__address__], target_label: __param_target}
  - {source_labels: [__address__], regex: 'https?://([^/:]+).*', target_label: instance}
  - {target_label: __address__, replacement: exporter:9115}");
        let set = targets(&job, &["https://shop.example/health"], &[]);
        let t = &set[&("web".to_string(), "shop.example".to_string())];
        assert_eq!(
            t.probe_target.as_deref(),
            Some("https://shop.example/health")
        );
        assert!(t.labels.is_empty(), "{:?}", t.labels);
    }

    #[test]
    fn relabeling_sees_prometheus_labels_and_can_drop_keep_and_map() {
        let job = job(
            "job_name: web
module: tcp
scrape_interval: 30s
params: {module: [tcp], extra: [x]}
relabel_configs:
  - {source_labels: [__address__], regex: '.*:9999', action: drop}
  - {source_labels: [job, __scheme__, __metrics_path__, __scrape_interval__, __scrape_timeout__, __param_module, __param_extra], separator: ',', target_label: seen}
  - {regex: 'team', replacement: owner, action: labelmap}
  - {source_labels: [__address__], target_label: __address__, regex: '(.*):1', replacement: '${1}:2'}",
        );
        let set = targets(&job, &["127.0.0.1:1", "127.0.0.1:9999"], &[("team", "db")]);
        assert_eq!(set.len(), 1, "{set:?}");
        let t = &set[&("web".to_string(), "127.0.0.1:2".to_string())];
        assert_eq!(t.labels["seen"], "web,http,/metrics,30s,10s,tcp,x");
        assert_eq!(t.labels["owner"], "db");
        assert_eq!(t.labels["team"], "db");
        assert_eq!(t.probe_target, None);
    }

    #[test]
    fn a_target_relabeling_cannot_probe_is_skipped() {
        let job = job("job_name: web
module: tcp
relabel_configs:
  - {source_labels: [__address__], regex: '(.*):.*', target_label: __param_target}");
        let e = build_target(
            &job,
            Labels::from([("__address__".into(), "db:5432".into())]),
            &Labels::new(),
        )
        .unwrap_err();
        assert!(matches!(e, TargetBuildError::Unprobeable { .. }), "{e}");
        let job = super::tests::job(
            "job_name: web
module: tcp
relabel_configs:
  - {regex: '__address__', action: labeldrop}",
        );
        let e = build_target(
            &job,
            Labels::from([("__address__".into(), "db:5432".into())]),
            &Labels::new(),
        )
        .unwrap_err();
        assert_eq!(e, TargetBuildError::NoAddress);
    }

    #[test]
    fn discovered_meta_labels_reach_relabeling_and_are_dropped_after() {
        let job = job(
            "job_name: k8s
module: http_2xx
relabel_configs:
  - {source_labels: [__meta_kubernetes_ingress_annotation_prometheus_io_probe], regex: 'true', action: keep}
  - {regex: '__meta_kubernetes_ingress_label_(.+)', action: labelmap}",
        );
        let mut set = TargetSet::new();
        let target = |address: &str, probe: &str| {
            Labels::from([
                ("__address__".to_string(), address.to_string()),
                (
                    "__meta_kubernetes_ingress_annotation_prometheus_io_probe".to_string(),
                    probe.to_string(),
                ),
                (
                    "__meta_kubernetes_ingress_label_app".to_string(),
                    "shop".to_string(),
                ),
            ])
        };
        add_labeled_group(
            &mut set,
            &job,
            [target("http://a/", "true"), target("http://b/", "false")],
            &Labels::new(),
        );
        assert_eq!(set.len(), 1);
        let t = &set[&("k8s".to_string(), "http://a/".to_string())];
        assert_eq!(t.labels, Labels::from([("app".into(), "shop".into())]));
    }

    #[test]
    fn without_relabeling_discovery_labels_of_the_target_and_group_are_dropped() {
        let job = job("job_name: sd\nmodule: tcp");
        let mut set = TargetSet::new();
        add_labeled_group(
            &mut set,
            &job,
            [Labels::from([
                ("__address__".to_string(), "db:5432".to_string()),
                ("__meta_dns_name".to_string(), "db.example".to_string()),
                ("team".to_string(), "data".to_string()),
            ])],
            &Labels::from([
                ("__meta_url".to_string(), "http://sd/".to_string()),
                ("team".to_string(), "group".to_string()),
                ("env".to_string(), "prod".to_string()),
            ]),
        );
        let t = &set[&("sd".to_string(), "db:5432".to_string())];
        assert_eq!(
            t.labels,
            Labels::from([
                ("env".into(), "prod".into()),
                ("team".into(), "data".into())
            ])
        );
    }
}
