//! A probing job: which module to run against which targets, how often, from which
//! agents, and how the agents' views merge into one `up`.

use super::{Labels, PromDuration};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub job_name: String,
    pub module: String,
    /// Defaults to `global.scrape_interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<PromDuration>,
    /// Defaults to `global.scrape_timeout` (capped at the interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<PromDuration>,
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
