//! The merge rules: how the agents' views of one target become one `up`, and when a job
//! or an agent counts as missing. Pure code with no I/O and no clock of its own, so every
//! rule is unit- and property-tested.
//!
//! A result is *fresh* while it is younger than the job's freshness window
//! (`2 × interval + timeout`, or the job's `freshness`). Only fresh results vote; an agent that disappears simply
//! stops voting once its last result ages out, so an agent problem never turns a target
//! DOWN on its own.
//!
//! [`merge`] is the rule as written: it walks every view. The hub keeps the same counts
//! incrementally ([`crate::tally`]), as a target probed by a thousand agents would
//! otherwise walk a thousand views at each of their results; `merge` stays the
//! reference the tally is property-tested against.

use sonde_proto::config::Quorum;
use std::time::Duration;

/// What one agent last reported for a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentView {
    /// When the probe ran, Unix milliseconds.
    pub timestamp_ms: i64,
    pub success: bool,
}

/// The merged state of a target, as Prometheus's `up` expresses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// `up 1`: enough fresh results succeed.
    Up,
    /// `up 0`: fresh results exist but too few succeed.
    Down,
    /// No `up` at all: no agent has a fresh result.
    Missing,
}

impl TargetState {
    /// The value of `up`, or `None` when no sample is written.
    pub fn up_value(self) -> Option<f64> {
        match self {
            TargetState::Up => Some(1.0),
            TargetState::Down => Some(0.0),
            TargetState::Missing => None,
        }
    }
}

/// The merged view of one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Merged {
    pub state: TargetState,
    /// Agents with a fresh result (`sonde_target_agents`).
    pub agents: u32,
    /// Of those, the ones whose result succeeded (`sonde_target_agents_succeeding`).
    pub succeeding: u32,
}

/// How long a result stays fresh for a job that does not set `freshness`:
/// `2 × interval + timeout` (the rule `sonde_proto::config::resolve_jobs` applies).
pub fn freshness_window(interval: Duration, timeout: Duration) -> Duration {
    interval * 2 + timeout
}

/// True while a result taken at `timestamp_ms` still votes at `now_ms`.
pub fn is_fresh(timestamp_ms: i64, now_ms: i64, window: Duration) -> bool {
    now_ms.saturating_sub(timestamp_ms) < millis(window)
}

/// Merges the agents' latest views of one target.
pub fn merge(
    views: impl IntoIterator<Item = impl std::borrow::Borrow<AgentView>>,
    quorum: Quorum,
    now_ms: i64,
    window: Duration,
) -> Merged {
    let (mut agents, mut succeeding) = (0u32, 0u32);
    for view in views {
        let view = view.borrow();
        if is_fresh(view.timestamp_ms, now_ms, window) {
            agents += 1;
            succeeding += u32::from(view.success);
        }
    }
    Merged::of(agents, succeeding, quorum)
}

impl Merged {
    /// The merge of `agents` fresh views of which `succeeding` succeed.
    pub fn of(agents: u32, succeeding: u32, quorum: Quorum) -> Self {
        let state = if agents == 0 {
            TargetState::Missing
        } else if succeeding >= quorum.needed(agents) {
            TargetState::Up
        } else {
            TargetState::Down
        };
        Merged {
            state,
            agents,
            succeeding,
        }
    }
}

/// A job is missing while it is expected, has been for longer than the grace period,
/// and none of its targets has a fresh result (including a job with no targets, or
/// whose selector matches no agent).
pub fn job_missing(
    target_states: impl IntoIterator<Item = TargetState>,
    expected_since_ms: i64,
    now_ms: i64,
    grace: Duration,
) -> bool {
    let past_grace = now_ms.saturating_sub(expected_since_ms) >= millis(grace);
    past_grace && target_states.into_iter().all(|s| s == TargetState::Missing)
}

/// `sonde_agent_up`: an agent counts as up while it is connected, and for `grace` after
/// it was last heard from, so a brief reconnect does not flag it.
pub fn agent_up(connected: bool, last_seen_ms: i64, now_ms: i64, grace: Duration) -> bool {
    connected || now_ms.saturating_sub(last_seen_ms) < millis(grace)
}

/// `d` in milliseconds, saturating: a window longer than `i64::MAX` ms (a local job's
/// spacing is the agent's to choose) must not wrap to a negative one that is never fresh.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WINDOW: Duration = Duration::from_secs(40); // 2 × 15s + 10s
    const NOW: i64 = 1_000_000;

    fn view(age_ms: i64, success: bool) -> AgentView {
        AgentView {
            timestamp_ms: NOW - age_ms,
            success,
        }
    }

    fn state(views: &[AgentView], quorum: Quorum) -> TargetState {
        merge(views, quorum, NOW, WINDOW).state
    }

    #[test]
    fn window_is_two_intervals_plus_timeout() {
        assert_eq!(
            freshness_window(Duration::from_secs(15), Duration::from_secs(10)),
            WINDOW
        );
    }

    #[test]
    fn windows_past_i64_millis_saturate() {
        // 2.5 × i64::MAX ms: what a local job's spacing can make of its window.
        let huge = Duration::from_millis(i64::MAX as u64) * 2;
        assert!(is_fresh(NOW - 1, NOW, huge));
        assert!(agent_up(false, NOW - 1, NOW, huge));
        assert!(!job_missing([TargetState::Missing], NOW - 1, NOW, huge));
    }

    #[test]
    fn any_needs_one_success() {
        let q = Quorum::AtLeast(1);
        assert_eq!(state(&[view(0, true), view(0, false)], q), TargetState::Up);
        assert_eq!(
            state(&[view(0, false), view(0, false)], q),
            TargetState::Down
        );
        assert_eq!(state(&[], q), TargetState::Missing);
    }

    #[test]
    fn majority_needs_more_than_half() {
        let q = Quorum::Majority;
        let two_of_three = [view(0, true), view(0, true), view(0, false)];
        let one_of_three = [view(0, true), view(0, false), view(0, false)];
        let two_of_four = [view(0, true), view(0, true), view(0, false), view(0, false)];
        assert_eq!(state(&two_of_three, q), TargetState::Up);
        assert_eq!(state(&one_of_three, q), TargetState::Down);
        assert_eq!(state(&two_of_four, q), TargetState::Down);
    }

    #[test]
    fn all_needs_every_fresh_agent() {
        let q = Quorum::All;
        assert_eq!(state(&[view(0, true), view(0, true)], q), TargetState::Up);
        assert_eq!(
            state(&[view(0, true), view(0, false)], q),
            TargetState::Down
        );
        // A stale failure no longer vetoes.
        assert_eq!(
            state(&[view(0, true), view(WINDOW.as_millis() as i64, false)], q),
            TargetState::Up
        );
    }

    #[test]
    fn fixed_number_larger_than_reporting_agents_is_down() {
        let q = Quorum::AtLeast(2);
        assert_eq!(state(&[view(0, true)], q), TargetState::Down);
        assert_eq!(state(&[view(0, true), view(0, true)], q), TargetState::Up);
    }

    #[test]
    fn stale_results_do_not_vote() {
        let at_edge = WINDOW.as_millis() as i64;
        let m = merge(
            [view(at_edge - 1, true), view(at_edge, true)],
            Quorum::AtLeast(1),
            NOW,
            WINDOW,
        );
        assert_eq!((m.agents, m.succeeding, m.state), (1, 1, TargetState::Up));
        assert_eq!(
            state(
                &[view(at_edge, true), view(at_edge + 5_000, false)],
                Quorum::All
            ),
            TargetState::Missing
        );
    }

    #[test]
    fn vanished_agent_stops_counting_once_stale() {
        // Two agents; one disappears: its last (successful) view ages out and the
        // target's fate rests with the remaining agent.
        let gone = view(WINDOW.as_millis() as i64 + 1, true);
        assert_eq!(
            state(&[gone, view(0, false)], Quorum::AtLeast(1)),
            TargetState::Down
        );
        assert_eq!(state(&[gone, view(0, true)], Quorum::All), TargetState::Up);
    }

    #[test]
    fn missing_job_waits_for_grace_then_needs_no_fresh_target() {
        let grace = Duration::from_secs(120);
        let since = NOW - 60_000;
        assert!(!job_missing([TargetState::Missing], since, NOW, grace));
        let since = NOW - 120_000;
        assert!(job_missing([TargetState::Missing], since, NOW, grace));
        assert!(
            job_missing([], since, NOW, grace),
            "a job with no targets is missing"
        );
        assert!(!job_missing(
            [TargetState::Missing, TargetState::Down],
            since,
            NOW,
            grace
        ));
    }

    #[test]
    fn agent_up_has_grace_after_disconnect() {
        let grace = Duration::from_secs(5);
        assert!(agent_up(true, 0, NOW, grace));
        assert!(agent_up(false, NOW - 4_999, NOW, grace));
        assert!(!agent_up(false, NOW - 5_000, NOW, grace));
    }

    fn quorum() -> impl Strategy<Value = Quorum> {
        prop_oneof![
            (1u32..6).prop_map(Quorum::AtLeast),
            Just(Quorum::Majority),
            Just(Quorum::All),
        ]
    }

    fn views() -> impl Strategy<Value = Vec<AgentView>> {
        prop::collection::vec(
            (0i64..80_000, any::<bool>()).prop_map(|(age, success)| view(age, success)),
            0..8,
        )
    }

    proptest! {
        #[test]
        fn counts_match_fresh_views(vs in views(), q in quorum()) {
            let m = merge(&vs, q, NOW, WINDOW);
            let fresh: Vec<_> = vs.iter().filter(|v| is_fresh(v.timestamp_ms, NOW, WINDOW)).collect();
            prop_assert_eq!(m.agents as usize, fresh.len());
            prop_assert_eq!(m.succeeding as usize, fresh.iter().filter(|v| v.success).count());
            prop_assert!(m.succeeding <= m.agents);
            prop_assert_eq!(m.state == TargetState::Missing, m.agents == 0);
        }

        #[test]
        fn stale_views_never_change_the_state(vs in views(), stale in views(), q in quorum()) {
            let aged: Vec<_> = stale
                .iter()
                .map(|v| AgentView { timestamp_ms: v.timestamp_ms - WINDOW.as_millis() as i64, ..*v })
                .collect();
            let mut all = vs.clone();
            all.extend(aged);
            prop_assert_eq!(merge(&vs, q, NOW, WINDOW), merge(&all, q, NOW, WINDOW));
        }

        #[test]
        fn one_more_success_never_turns_up_into_down(vs in views(), q in quorum()) {
            let before = merge(&vs, q, NOW, WINDOW).state;
            let mut more = vs.clone();
            if let Some(v) = more.iter_mut().find(|v| !v.success && is_fresh(v.timestamp_ms, NOW, WINDOW)) {
                v.success = true;
            }
            let after = merge(&more, q, NOW, WINDOW).state;
            prop_assert!(!(before == TargetState::Up && after == TargetState::Down));
        }

        #[test]
        fn all_succeeding_is_up_unless_quorum_exceeds_agents(vs in views(), q in quorum()) {
            let ok: Vec<_> = vs.iter().map(|v| AgentView { success: true, ..*v }).collect();
            let m = merge(&ok, q, NOW, WINDOW);
            if m.agents > 0 {
                let expect = if q.needed(m.agents) <= m.agents { TargetState::Up } else { TargetState::Down };
                prop_assert_eq!(m.state, expect);
            }
        }
    }
}
