//! Missing jobs.

use super::*;

#[test]
fn job_without_agents_is_missing_after_grace() {
    let (hub, rec, _rx) = setup();
    hub.tick(T0 + 10_000).wait();
    assert_eq!(
        value_of(&rec.take(), "sonde_job_missing", &[("job", "alertmanager")]),
        [0.0]
    );
    hub.tick(T0 + 31_000).wait();
    let out = rec.take();
    assert_eq!(
        value_of(&out, "sonde_job_missing", &[("job", "alertmanager")]),
        [1.0]
    );
    assert!(value_of(&out, "up", &[("job", "alertmanager")]).is_empty());
}

#[test]
fn a_job_is_missing_as_soon_as_its_last_target_is() {
    let (hub, rec, _rx) = setup();
    // Past the start-up grace (fleet.missing_after, 30 s) before the last result.
    let last = T0 + 40_000;
    results(
        &hub,
        "eu-1",
        &[result(1, "web", "127.0.0.1:80", last, true)],
        last,
    )
    .unwrap();
    let (mut target_missing, mut job_missing) = (None, None);
    for s in 41..=200 {
        let now = T0 + s * 1000;
        hub.tick(now).wait();
        let out = rec.take();
        let up = value_of(&out, "up", &[("job", "web")]);
        if target_missing.is_none() && up.iter().any(|v| v.is_nan()) {
            target_missing = Some(now);
        }
        if job_missing.is_none() && value_of(&out, "sonde_job_missing", &[("job", "web")]) == [1.0]
        {
            job_missing = Some(now);
        }
    }
    let (t, j) = (target_missing.unwrap(), job_missing.unwrap());
    // The freshness window is 2 × 10 s + 5 s.
    assert_eq!(t, last + 25_000);
    assert!(
        j >= t && j - t <= 1_000,
        "target missing at {t}, job at {j}"
    );
}
