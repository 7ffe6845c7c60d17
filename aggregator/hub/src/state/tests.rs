//! What the state asks of the agents' streams, as data: assignments to send on the
//! current stream, and the streams to end.

use super::*;
use crate::config::TokenGrant;
use crate::limits::FleetLimits;

const T0: i64 = 1_700_000_000_000;

fn config(tokens: &[(&str, &str)]) -> Arc<HubConfig> {
    Arc::new(HubConfig {
        scrape_interval: Duration::from_secs(15),
        external_labels: Labels::new(),
        jobs: Vec::new(),
        tokens: tokens
            .iter()
            .map(|(token, agent)| {
                (
                    token.to_string(),
                    TokenGrant {
                        agent: agent.to_string(),
                        labels: None,
                    },
                )
            })
            .collect(),
        auth_required: !tokens.is_empty(),
        missing_after: Duration::from_secs(30),
        forget_after: Duration::from_secs(3600),
        max_clock_skew: Duration::from_secs(60),
        limits: FleetLimits::default(),
        shared_local_jobs: BTreeSet::new(),
    })
}

fn hello(id: &str) -> pb::Hello {
    pb::Hello {
        protocol_version: sonde_proto::PROTOCOL_VERSION,
        agent_id: id.into(),
        ..Default::default()
    }
}

/// (kind, agent, connection) of each outgoing message.
fn summary(outgoing: &[Outgoing]) -> Vec<(&'static str, &str, u64)> {
    outgoing
        .iter()
        .map(|o| match o {
            Outgoing::Assignment {
                agent, connection, ..
            } => ("assignment", agent.as_str(), *connection),
            Outgoing::End {
                agent, connection, ..
            } => ("end", agent.as_str(), *connection),
        })
        .collect()
}

#[test]
fn a_newer_stream_ends_the_older_one_and_gets_its_own_assignment() {
    let mut state = State::new(config(&[]), TargetSet::new(), T0);
    let mut ch = Changes::default();
    let first = state
        .connect(&hello("edge"), Labels::new(), None, T0, &mut ch)
        .unwrap();
    assert_eq!(summary(&ch.outgoing), [("assignment", "edge", first)]);

    let mut ch = Changes::default();
    let second = state
        .connect(&hello("edge"), Labels::new(), None, T0 + 1, &mut ch)
        .unwrap();
    assert_ne!(first, second);
    assert_eq!(
        summary(&ch.outgoing),
        [("end", "edge", first), ("assignment", "edge", second)]
    );
    // The older stream's end changes nothing for the newer one.
    state.disconnect("edge", first, T0 + 2);
    assert_eq!(state.agents["edge"].connection, Some(second));
}

#[test]
fn a_stream_that_cannot_take_its_assignment_counts_as_gone() {
    let mut state = State::new(config(&[]), TargetSet::new(), T0);
    let mut ch = Changes::default();
    let connection = state
        .connect(&hello("edge"), Labels::new(), None, T0, &mut ch)
        .unwrap();
    state.stream_lost("edge", connection);
    assert_eq!(state.agents["edge"].connection, None);
    // Its next hello ends what may be left of the lost stream.
    let mut ch = Changes::default();
    let again = state
        .connect(&hello("edge"), Labels::new(), None, T0 + 1, &mut ch)
        .unwrap();
    assert_eq!(
        summary(&ch.outgoing),
        [("end", "edge", connection), ("assignment", "edge", again)]
    );
}

#[test]
fn a_reload_that_revokes_a_token_ends_that_stream_only() {
    let tokens = [("t-1", "eu-1"), ("t-2", "eu-2")];
    let mut state = State::new(config(&tokens), TargetSet::new(), T0);
    let mut ch = Changes::default();
    let one = state
        .connect(
            &hello("eu-1"),
            Labels::new(),
            Some("t-1".into()),
            T0,
            &mut ch,
        )
        .unwrap();
    state
        .connect(
            &hello("eu-2"),
            Labels::new(),
            Some("t-2".into()),
            T0,
            &mut ch,
        )
        .unwrap();
    let mut ch = Changes::default();
    state.reload(
        config(&[("t-2", "eu-2")]),
        TargetSet::new(),
        T0 + 1,
        &mut ch,
    );
    let ends: Vec<_> = summary(&ch.outgoing)
        .into_iter()
        .filter(|(kind, ..)| *kind == "end")
        .collect();
    assert_eq!(ends, [("end", "eu-1", one)]);
    assert_eq!(state.agents["eu-1"].connection, None);
    assert!(state.agents["eu-2"].connection.is_some());
}

mod tally {
    //! Each target's incrementally kept counts against the reference rule
    //! (`merge::merge` over every view), through results, ticks and failed commits.

    use super::*;
    use crate::model::ResultSamples;
    use proptest::prelude::*;
    use sonde_proto::config::{JobConfig, Module, ResolvedJob, from_yaml_str};
    use std::path::Path;

    const AGENTS: usize = 4;
    const TARGETS: usize = 2;

    fn config_with_job(quorum: Quorum) -> (Arc<HubConfig>, TargetSet) {
        let file = Path::new("test.yml");
        let interval = Duration::from_secs(15);
        let timeout = Duration::from_secs(5);
        let job = ResolvedJob {
            name: "web".into(),
            module_name: "http_2xx".into(),
            module: from_yaml_str::<Module>(file, "prober: http\n").unwrap(),
            interval,
            timeout,
            quorum,
            retries: 0,
            freshness: interval * 2 + timeout,
            config: from_yaml_str::<JobConfig>(file, "job_name: web\nmodule: http_2xx\n").unwrap(),
        };
        let mut hub = (*config(&[])).clone();
        hub.jobs = vec![job];
        let targets = (0..TARGETS)
            .map(|i| {
                let target = Target {
                    job: "web".into(),
                    instance: format!("site-{i}"),
                    probe_target: None,
                    labels: Labels::new(),
                };
                (
                    ("web".to_string(), target.instance.clone()),
                    Arc::new(target),
                )
            })
            .collect();
        (Arc::new(hub), targets)
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// (agent, target, timestamp relative to now, success).
        Result(usize, usize, i64, bool),
        /// The clock moves on by this many ms and the state ticks.
        Tick(i64),
        /// The changes so far commit (`true`) or fail and are rolled back.
        Commit(bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..AGENTS, 0..TARGETS, -60_000i64..1_000, any::<bool>())
                .prop_map(|(a, t, offset, ok)| Step::Result(a, t, offset, ok)),
            3 => (0i64..20_000).prop_map(Step::Tick),
            2 => any::<bool>().prop_map(Step::Commit),
        ]
    }

    fn quorum() -> impl Strategy<Value = Quorum> {
        prop_oneof![
            (1u32..4).prop_map(Quorum::AtLeast),
            Just(Quorum::Majority),
            Just(Quorum::All),
        ]
    }

    proptest! {
        #[test]
        fn every_target_counts_what_merging_all_its_views_gives(
            steps in prop::collection::vec(step(), 0..60),
            q in quorum(),
        ) {
            let (hub, targets) = config_with_job(q);
            let mut now = T0;
            let mut state = State::new(hub, targets, now);
            let (counters, refusals) = (HubCounters::default(), Refusals::default());
            let mut ch = Changes::default();
            for a in 0..AGENTS {
                state
                    .connect(&hello(&format!("agent-{a}")), Labels::new(), None, now, &mut ch)
                    .unwrap();
            }
            let mut seq = [0u64; AGENTS];
            for s in steps {
                match s {
                    Step::Result(a, t, offset, success) => {
                        seq[a] += 1;
                        let result = IncomingResult {
                            seq: seq[a],
                            job: "web".into(),
                            instance: format!("site-{t}"),
                            timestamp_ms: now + offset,
                            success,
                            duration_seconds: 0.1,
                            failure: String::new(),
                            trace: None,
                            samples: ResultSamples::default(),
                            refused: None,
                        };
                        state.results(
                            &format!("agent-{a}"),
                            &[result],
                            now,
                            &mut ch,
                            &counters,
                            &refusals,
                        );
                    }
                    Step::Tick(by) => {
                        now += by;
                        state.tick(now, &mut ch);
                    }
                    Step::Commit(true) => ch = Changes::default(),
                    Step::Commit(false) => {
                        let failed = std::mem::take(&mut ch);
                        state.rollback(failed.undo);
                        // What the caller does after a failed commit: agents resend.
                        seq = std::array::from_fn(|a| {
                            state.agents[&format!("agent-{a}")].committed_seq
                        });
                    }
                }
                for (key, entry) in &state.entries {
                    let (quorum, window) = targets::rules(&state.config, &state.jobs, &key.0, entry);
                    let expected = merge::merge(
                        entry.views.values().map(|v| v.vote()),
                        quorum,
                        now,
                        window,
                    );
                    prop_assert_eq!(entry.tally.clone().merge(quorum, now, window), expected);
                }
            }
        }
    }
}
