//! What the hub needs of the aggregator's config, as plain data: the jobs it owns, the
//! fleet's rules (who may connect, when an agent or a job is missing) and its limits.
//! The aggregator loads and checks the file, and hands the hub this part of it.

use crate::limits::FleetLimits;
use sonde_proto::config::{Labels, ResolvedJob};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// What a token grants: the one agent id it may use, and the labels bound to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGrant {
    pub agent: String,
    pub labels: Option<Labels>,
}

/// The hub's part of the aggregator's config.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// `global.scrape_interval`: how often the per-job and per-agent series are written.
    pub scrape_interval: Duration,
    /// `global.external_labels`: names a probe sample may not use.
    pub external_labels: Labels,
    /// The jobs this aggregator owns (all of them, unless sharded).
    pub jobs: Vec<ResolvedJob>,
    /// token → what it grants; empty when agents need no token.
    pub tokens: HashMap<String, TokenGrant>,
    /// True when `fleet.auth` is configured (even with an empty token list).
    pub auth_required: bool,
    pub missing_after: Duration,
    pub forget_after: Duration,
    pub max_clock_skew: Duration,
    pub limits: FleetLimits,
    /// `fleet.shared_local_jobs`.
    pub shared_local_jobs: BTreeSet<String>,
}
