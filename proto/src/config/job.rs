//! A probing job: which module to run against which targets, how often, from which
//! agents, and how the agents' views merge into one `up`.

use super::{Labels, PromDuration, RelabelConfig};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// Defines [`JobConfig`] with, after its own fields, the Prometheus scrape_config fields
/// that have no meaning here: each one kept as written (so that the job loads as it is and
/// prints back whole) and named, with why, by [`JobConfig::ignored_fields`].
macro_rules! job_config {
    (
        $(#[$meta:meta])*
        pub struct JobConfig { $($fields:tt)* }
        ignored { $($ignored:ident: $why:literal,)* }
    ) => {
        $(#[$meta])*
        pub struct JobConfig {
            $($fields)*
            $(
                #[doc = concat!("Prometheus's `", stringify!($ignored), "`, ignored: ", $why, ".")]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $ignored: Option<serde_json::Value>,
            )*
        }

        impl JobConfig {
            /// Every Prometheus field this job sets that has no meaning here, with why.
            pub fn ignored_fields(&self) -> Vec<(&'static str, &'static str)> {
                let mut ignored = Vec::new();
                $(
                    if self.$ignored.is_some() {
                        ignored.push((stringify!($ignored), $why));
                    }
                )*
                ignored
            }
        }
    };
}

job_config! {
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct JobConfig {
        pub job_name: String,
        /// The module to probe with; a Prometheus job gives it as `params: {module: [name]}`.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub module: String,
        /// Defaults to `global.scrape_interval`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub interval: Option<PromDuration>,
        /// Prometheus's name for `interval`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub scrape_interval: Option<PromDuration>,
        /// Defaults to `global.scrape_timeout` (capped at the interval).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub timeout: Option<PromDuration>,
        /// Prometheus's name for `timeout`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub scrape_timeout: Option<PromDuration>,
        #[serde(default)]
        pub quorum: Quorum,
        /// Re-probe a failure this many times before it counts.
        #[serde(default)]
        pub retries: u32,
        /// How long a result counts toward `up`; default `2 × interval + timeout`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub freshness: Option<PromDuration>,
        /// Label selector over agent labels; empty selects every agent.
        #[serde(default)]
        pub agents: Labels,
        /// Each target is probed by this many of the matching agents (rendezvous hashing),
        /// instead of by every one of them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub agents_per_target: Option<u32>,
        /// The exporter's path in Prometheus (`/probe`); here only the `__metrics_path__`
        /// label relabeling sees.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub metrics_path: Option<String>,
        /// The exporter's URL parameters in Prometheus: `module` names the module, and each
        /// one's first value is the `__param_<name>` label relabeling sees (`target` among them).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub params: BTreeMap<String, Vec<String>>,
        /// Prometheus's rule for labels the scrape itself carries; probe results carry no
        /// `job` or `instance` of their own, so it changes nothing (as with blackbox_exporter).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub honor_labels: Option<bool>,
        /// Applied to each discovered target's labels before it becomes a check.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub relabel_configs: Vec<RelabelConfig>,
        #[serde(default)]
        pub static_configs: Vec<StaticConfig>,
        #[serde(default)]
        pub file_sd_configs: Vec<FileSdConfig>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub http_sd_configs: Vec<super::HttpSdConfig>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub dns_sd_configs: Vec<super::DnsSdConfig>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub kubernetes_sd_configs: Vec<super::discovery::kubernetes::KubernetesSdConfig>,
    }
    // The rest of a Prometheus scrape_config: accepted, so that a scrape job loads as it is,
    // and each one set is reported as ignored, with why.
    ignored {
        honor_timestamps: "every sample is stamped with the time its probe started",
        track_timestamps_staleness: "every sample is stamped with the time its probe started",
        scheme: "it is how Prometheus reaches the exporter; agents probe the targets themselves",
        enable_compression: "it is how Prometheus reaches the exporter; agents probe the targets themselves",
        enable_http2: "it is how Prometheus reaches the exporter; set http.enable_http2 in the module",
        follow_redirects: "it is how Prometheus reaches the exporter; set http.follow_redirects in the module",
        basic_auth: "it is how Prometheus reaches the exporter; set http.http_client_config in the module to authenticate probes",
        authorization: "it is how Prometheus reaches the exporter; set http.http_client_config in the module to authenticate probes",
        oauth2: "it is how Prometheus reaches the exporter; set http.http_client_config in the module to authenticate probes",
        bearer_token: "it is how Prometheus reaches the exporter; set http.http_client_config in the module to authenticate probes",
        bearer_token_file: "it is how Prometheus reaches the exporter; set http.http_client_config in the module to authenticate probes",
        tls_config: "it is how Prometheus reaches the exporter; set tls_config in the module for the probes' TLS",
        proxy_url: "it is how Prometheus reaches the exporter; set http.http_client_config in the module to probe through a proxy",
        no_proxy: "it is how Prometheus reaches the exporter; agents probe the targets themselves",
        proxy_from_environment: "it is how Prometheus reaches the exporter; agents probe the targets themselves",
        proxy_connect_header: "it is how Prometheus reaches the exporter; agents probe the targets themselves",
        http_headers: "it is how Prometheus reaches the exporter; set http.headers in the module for the probes' headers",
        scrape_protocols: "there is no exposition format to negotiate: agents send results over the fleet stream",
        fallback_scrape_protocol: "there is no exposition format to negotiate: agents send results over the fleet stream",
        body_size_limit: "there is no scrape body: agents send results over the fleet stream",
        sample_limit: "a probe's samples are bounded by the aggregator's own limits",
        label_limit: "a probe's labels are bounded by the aggregator's own limits",
        label_name_length_limit: "a probe's labels are bounded by the aggregator's own limits",
        label_value_length_limit: "a probe's labels are bounded by the aggregator's own limits",
        target_limit: "every target the job discovers is probed",
        keep_dropped_targets: "targets dropped by relabeling are not kept",
        metric_relabel_configs: "probe series are written as the prober makes them; relabel_configs sets the target labels they carry",
        scrape_classic_histograms: "probe results hold no histograms",
        always_scrape_classic_histograms: "probe results hold no histograms",
        scrape_native_histograms: "probe results hold no histograms",
        convert_classic_histograms_to_nhcb: "probe results hold no histograms",
        native_histogram_bucket_limit: "probe results hold no histograms",
        native_histogram_min_bucket_factor: "probe results hold no histograms",
        metric_name_validation_scheme: "probe series have classic Prometheus names",
        metric_name_escaping_scheme: "probe series have classic Prometheus names",
        scrape_failure_log_file: "failed probes are traced on the status page instead",
        azure_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        consul_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        digitalocean_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        docker_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        dockerswarm_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        ec2_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        eureka_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        gce_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        hetzner_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        ionos_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        kuma_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        lightsail_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        linode_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        marathon_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        nerve_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        nomad_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        openstack_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        ovhcloud_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        puppetdb_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        scaleway_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        serverset_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        stackit_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        triton_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        uyuni_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
        vultr_sd_configs: "this discovery mechanism is not supported, so it discovers no target",
    }
}

/// A group of targets sharing labels; also the shape of one entry of a file_sd file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGroup {
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub labels: Labels,
}

pub type StaticConfig = TargetGroup;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSdConfig {
    /// Paths, with glob patterns in the last path element (`targets/*.yml`), as Prometheus.
    pub files: Vec<String>,
    /// Files are also re-read on change; this is the fallback period, as in Prometheus.
    #[serde(default = "default_refresh")]
    pub refresh_interval: PromDuration,
}

fn default_refresh() -> PromDuration {
    PromDuration::from_secs(300)
}

/// How many of the agents with a fresh result must report success for `up` to be 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quorum {
    /// At least this many (`any` is 1).
    AtLeast(u32),
    /// More than half of the agents with a fresh result.
    Majority,
    /// Every agent with a fresh result.
    All,
}

impl Default for Quorum {
    fn default() -> Self {
        Quorum::AtLeast(1)
    }
}

impl Quorum {
    /// Successes needed out of `reporting` agents with a fresh result (`reporting` > 0).
    pub fn needed(self, reporting: u32) -> u32 {
        match self {
            Quorum::AtLeast(n) => n,
            Quorum::Majority => reporting / 2 + 1,
            Quorum::All => reporting,
        }
    }
}

impl fmt::Display for Quorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quorum::AtLeast(1) => f.write_str("any"),
            Quorum::AtLeast(n) => write!(f, "{n}"),
            Quorum::Majority => f.write_str("majority"),
            Quorum::All => f.write_str("all"),
        }
    }
}

impl Serialize for Quorum {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Quorum::AtLeast(n) if *n != 1 => s.serialize_u32(*n),
            other => s.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for Quorum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let bad = |what: &str| {
            serde::de::Error::custom(format!(
                "invalid quorum {what}: expected a number from 1, \"any\", \"majority\" or \"all\""
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Number(n) if n >= 1 && n <= u32::MAX as i64 => Ok(Quorum::AtLeast(n as u32)),
            Raw::Number(n) => Err(bad(&n.to_string())),
            Raw::Text(t) => match t.as_str() {
                "any" => Ok(Quorum::AtLeast(1)),
                "majority" => Ok(Quorum::Majority),
                "all" => Ok(Quorum::All),
                other => other
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .map(Quorum::AtLeast)
                    .ok_or_else(|| bad(&format!("{other:?}"))),
            },
        }
    }
}

impl JobConfig {
    /// True when an agent with `agent_labels` should run this job.
    pub fn selects(&self, agent_labels: &Labels) -> bool {
        self.agents
            .iter()
            .all(|(k, v)| agent_labels.get(k).is_some_and(|a| a == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_forms() {
        let q = |s: &str| serde_json::from_str::<Quorum>(s);
        assert_eq!(q("1").unwrap(), Quorum::AtLeast(1));
        assert_eq!(q("3").unwrap(), Quorum::AtLeast(3));
        assert_eq!(q("\"any\"").unwrap(), Quorum::AtLeast(1));
        assert_eq!(q("\"majority\"").unwrap(), Quorum::Majority);
        assert_eq!(q("\"all\"").unwrap(), Quorum::All);
        assert!(q("0").is_err());
        assert!(q("\"most\"").is_err());
        assert_eq!(Quorum::Majority.needed(3), 2);
        assert_eq!(Quorum::Majority.needed(4), 3);
        assert_eq!(Quorum::All.needed(4), 4);
    }

    #[test]
    fn selector() {
        let job: JobConfig =
            serde_json::from_str(r#"{"job_name":"w","module":"m","agents":{"region":"eu"}}"#)
                .unwrap();
        let mut labels = Labels::new();
        assert!(!job.selects(&labels));
        labels.insert("region".into(), "eu".into());
        labels.insert("site".into(), "x".into());
        assert!(job.selects(&labels));
    }
}
