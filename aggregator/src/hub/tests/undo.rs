//! A failed commit and its rollback.

use super::*;
use crate::merge::TargetState;
use sonde_hub::model::STALE_NAN_BITS;

#[test]
fn a_failed_commit_changes_nothing_and_the_replay_writes_everything() {
    let (hub, rec, _rx) = setup();
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", T0, true)],
        T0,
    )
    .unwrap();
    rec.take();
    rec.2.store(true, Ordering::Relaxed);
    let batch = [
        result(2, "web", "127.0.0.1:80", T0 + 10_000, false),
        result(3, "slow", "127.0.0.1:81", T0 + 10_000, true),
    ];
    assert!(results(&hub, "eu-1", &batch, T0 + 10_000).is_err());
    assert!(hub.storage.failing().is_some());
    assert_eq!(hub.storage.errors(), 1);
    {
        let state = hub.snapshot_blocking();
        assert_eq!(state.agents["eu-1"].committed_seq, 1);
        let web = &state.entries[&("web".to_string(), "127.0.0.1:80".to_string())];
        assert!(web.views["eu-1"].success, "the view is the committed one");
        assert_eq!(web.merged.unwrap().state, TargetState::Up);
        assert!(
            !state
                .entries
                .contains_key(&("slow".to_string(), "127.0.0.1:81".to_string()))
        );
    }
    // A failing tick keeps nothing either: the staleness marker stays owed.
    hub.tick(T0 + 40_000).wait();
    rec.2.store(false, Ordering::Relaxed);
    assert_eq!(
        results(&hub, "eu-1", &batch, T0 + 10_500).unwrap(),
        Some(3),
        "the same batch, offered again, is taken whole"
    );
    assert!(hub.storage.failing().is_none());
    let out = rec.take();
    assert_eq!(value_of(&out, "up", &[("job", "web")]), [0.0]);
    assert_eq!(value_of(&out, "probe_success", &[("job", "slow")]), [1.0]);
    hub.tick(T0 + 40_000).wait();
    let up = value_of(&rec.take(), "up", &[("job", "web")]);
    assert_eq!(up.len(), 1);
    assert_eq!(
        up[0].to_bits(),
        STALE_NAN_BITS,
        "the marker comes once it can"
    );
}

#[test]
fn an_agent_maintenance_begun_in_a_failed_group_is_undone_and_begins_again() {
    let (hub, rec, _rx) = setup();
    let (tx, _rx_us) = mpsc::channel(16);
    connect(&hub, &hello("us-1", "us"), None, tx, T0);
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", T0, true)],
        T0,
    )
    .unwrap();
    results(
        &hub,
        "us-1",
        &[result(1, "web", "127.0.0.1:80", T0, false)],
        T0,
    )
    .unwrap();
    set_one_window(
        &hub,
        "eu-network",
        &[],
        &[("agent", "eu-1")],
        (T0 + 5_000, "1h"),
        T0 + 1_000,
    );
    rec.take();
    let key = ("web".to_string(), "127.0.0.1:80".to_string());
    // The tick at which the window opens fails to commit: nothing of it stays.
    rec.2.store(true, Ordering::Relaxed);
    hub.tick(T0 + 5_000).wait();
    {
        let state = hub.snapshot_blocking();
        assert_eq!(state.entries[&key].merged.unwrap().state, TargetState::Up);
        assert_eq!(state.entries[&key].merged.unwrap().agents, 2);
    }
    rec.2.store(false, Ordering::Relaxed);
    // A result while the commit still fails is undone with the tally rebuilt.
    assert!(
        results(
            &hub,
            "us-1",
            &[result(2, "web", "127.0.0.1:80", T0 + 5_500, false)],
            T0 + 5_500
        )
        .is_ok()
    );
    hub.tick(T0 + 6_000).wait();
    let out = rec.take();
    assert_eq!(
        value_of(&out, "sonde_agent_in_maintenance", &[("agent", "eu-1")]).pop(),
        Some(1.0)
    );
    assert_eq!(value_of(&out, "up", &[("job", "web")]).pop(), Some(0.0));
    let state = hub.snapshot_blocking();
    let merged = state.entries[&key].merged.unwrap();
    assert_eq!((merged.state, merged.agents), (TargetState::Down, 1));
}
