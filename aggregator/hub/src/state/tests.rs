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
