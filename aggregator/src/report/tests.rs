use super::*;
use HistoryState::*;

/// 2026-12-01T00:00:00Z in unix seconds.
const DEC_1: i64 = 1_796_083_200;
const DAY: i64 = 86_400;
const HOUR: i64 = 3_600;
const MINUTE: i64 = 60;

/// Seconds from 2026-12-01T00:00:00Z of day `d` (1-based), at `h:m`.
fn at(d: i64, h: i64, m: i64) -> i64 {
    DEC_1 + (d - 1) * DAY + h * HOUR + m * MINUTE
}

fn change(seconds: i64, state: HistoryState, reason: &str) -> Change {
    Change {
        at_ms: seconds * 1000,
        state,
        reasons: if reason.is_empty() {
            Vec::new()
        } else {
            vec![reason.to_string()]
        },
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

/// December 2026, figured by hand:
///
/// - window: 2026-12-01T00:00Z to 2027-01-01T00:00Z = 31 × 86,400 = 2,678,400 s;
/// - the history starts on 2 December 00:00 (up): 1 December is no data, 86,400 s;
/// - down 5 Dec 10:00–10:30 "connection refused": 1,800 s;
/// - down 10 Dec 03:00–03:05 "HTTP 503": 300 s, then degraded 03:05–04:00: 3,300 s;
/// - missing 15 Dec 12:00–18:00: 6 h = 21,600 s;
/// - maintenance 20 Dec 22:00–24:00 (7,200 s), with a down 22:30–23:00 entirely inside it
///   (counts nothing);
/// - maintenance 24 Dec 22:00–24:00 (7,200 s), with a down "timeout" 21:50–22:10: 600 s
///   counted, 600 s in maintenance;
/// - the aggregator stopped 28 Dec 06:00–06:20 while the target was up: 1,200 s no data;
/// - down 31 Dec 23:00 "HTTP 500" until 1 January 01:00: 3,600 s inside the window.
///
/// maintenance = 7,200 + 7,200 = 14,400 s; no data = 86,400 + 1,200 = 87,600 s;
/// missing = 21,600 s; down = 1,800 + 300 + 600 + 3,600 = 6,300 s;
/// up = 2,678,400 − 14,400 − 87,600 − 21,600 − 6,300 = 2,548,500 s (degraded 3,300 of it);
/// counted = 2,548,500 + 6,300 = 2,554,800 s;
/// availability = 2,548,500 / 2,554,800 = 99.7534053546… %;
/// budget at 99.9 % = 0.001 × 2,554,800 = 2,554.8 s; used 6,300 s; remaining −3,745.2 s;
/// burned = 6,300 / 2,554.8 = 246.5946453734… %.
#[test]
fn december_2026_matches_the_figures_worked_out_by_hand() {
    let changes = [
        change(at(2, 0, 0), Up, ""),
        change(at(5, 10, 0), Down, "connection refused"),
        change(at(5, 10, 30), Up, ""),
        change(at(10, 3, 0), Down, "HTTP 503"),
        change(at(10, 3, 5), Degraded, ""),
        change(at(10, 4, 0), Up, ""),
        change(at(15, 12, 0), Missing, ""),
        change(at(15, 18, 0), Up, ""),
        change(at(20, 22, 30), Down, "HTTP 502"),
        change(at(20, 23, 0), Up, ""),
        change(at(24, 21, 50), Down, "timeout"),
        change(at(24, 22, 10), Up, ""),
        change(at(31, 23, 0), Down, "HTTP 500"),
        change(at(32, 1, 0), Up, ""),
    ];
    let gaps = [Gap {
        from_ms: at(28, 6, 0) * 1000,
        to_ms: at(28, 6, 20) * 1000,
    }];
    let maintenance = [(at(24, 22, 0), at(25, 0, 0)), (at(20, 22, 0), at(21, 0, 0))];
    let window = Window {
        from_ms: DEC_1 * 1000,
        to_ms: at(32, 0, 0) * 1000,
    };
    let r = target_report(
        Input {
            changes: &changes,
            gaps: &gaps,
            maintenance: &maintenance,
            known_until_ms: at(40, 0, 0) * 1000,
            objective: Some(99.9),
        },
        window,
    );
    assert_eq!(r.window_ms, 2_678_400_000);
    assert_eq!(r.data_starts_ms, Some(at(2, 0, 0) * 1000));
    assert_eq!(r.maintenance_ms, 14_400_000);
    assert_eq!(r.no_data_ms, 87_600_000);
    assert_eq!(r.missing_ms, 21_600_000);
    assert_eq!(r.down_ms, 6_300_000);
    assert_eq!(r.up_ms, 2_548_500_000);
    assert_eq!(r.degraded_ms, 3_300_000);
    assert_eq!(r.counted_ms, 2_554_800_000);
    assert!(close(r.availability_percent.unwrap(), 99.753_405_354_626_6));
    let b = r.error_budget.unwrap();
    assert!(close(b.allowed_ms, 2_554_800.0), "{b:?}");
    assert_eq!(b.used_ms, 6_300_000);
    assert!(close(b.remaining_ms, -3_745_200.0), "{b:?}");
    assert!(
        close(b.burned_percent.unwrap(), 246.594_645_373_414_7),
        "{b:?}"
    );

    let summary: Vec<_> = r
        .incidents
        .iter()
        .map(|i| {
            (
                i.start_ms / 1000,
                i.duration_ms / 1000,
                i.counted_down_ms / 1000,
                i.in_maintenance_ms / 1000,
                i.maintenance,
                i.reasons.join(";"),
            )
        })
        .collect();
    use InMaintenance as M;
    assert_eq!(
        summary,
        [
            (
                at(5, 10, 0),
                1_800,
                1_800,
                0,
                M::None,
                "connection refused".into()
            ),
            (at(10, 3, 0), 300, 300, 0, M::None, "HTTP 503".into()),
            (
                at(20, 22, 30),
                1_800,
                0,
                1_800,
                M::Entirely,
                "HTTP 502".into()
            ),
            (at(24, 21, 50), 1_200, 600, 600, M::Partly, "timeout".into()),
            (at(31, 23, 0), 3_600, 3_600, 0, M::None, "HTTP 500".into()),
        ]
    );
    let last = r.incidents.last().unwrap();
    assert!(last.ongoing_at_window_end && !last.started_before_window);
    assert_eq!(last.end_ms, Some(at(32, 1, 0) * 1000));
    assert!(r.incidents[..4].iter().all(|i| !i.ongoing_at_window_end));
}

fn simple(changes: &[Change], maintenance: &[(i64, i64)], from: i64, to: i64) -> TargetReport {
    target_report(
        Input {
            changes,
            gaps: &[],
            maintenance,
            known_until_ms: i64::MAX,
            objective: Some(99.0),
        },
        Window {
            from_ms: from * 1000,
            to_ms: to * 1000,
        },
    )
}

#[test]
fn an_incident_open_at_the_window_start_counts_only_its_part_inside() {
    // Down since 100 s before the window, up 50 s into it; the window is 1,000 s.
    let changes = [change(900, Down, "refused"), change(1_050, Up, "")];
    let r = simple(&changes, &[], 1_000, 2_000);
    assert_eq!((r.down_ms, r.up_ms, r.no_data_ms), (50_000, 950_000, 0));
    assert_eq!(r.data_starts_ms, None, "the window opens on a known state");
    let i = &r.incidents[0];
    assert!(i.started_before_window && !i.ongoing_at_window_end);
    assert_eq!((i.start_ms, i.duration_ms), (900_000, 50_000));
    // Budget: 1 % of 1,000 s = 10 s, 50 s used: 500 % burned.
    assert!(close(
        r.error_budget.unwrap().burned_percent.unwrap(),
        500.0
    ));
}

#[test]
fn an_incident_entirely_inside_maintenance_costs_nothing() {
    let changes = [
        change(0, Up, ""),
        change(300, Down, "HTTP 503"),
        change(400, Up, ""),
    ];
    let r = simple(&changes, &[(250, 450)], 0, 1_000);
    assert_eq!(
        (r.down_ms, r.maintenance_ms, r.up_ms),
        (0, 200_000, 800_000)
    );
    assert_eq!(r.availability_percent, Some(100.0));
    assert_eq!(r.incidents.len(), 1, "shown, flagged");
    assert_eq!(r.incidents[0].maintenance, InMaintenance::Entirely);
    assert_eq!(r.incidents[0].counted_down_ms, 0);
    // Overlapping and out-of-window windows are merged and clipped.
    let r = simple(
        &changes,
        &[(250, 350), (300, 450), (5_000, 6_000), (-50, 10)],
        0,
        1_000,
    );
    assert_eq!(r.maintenance_ms, 210_000);
}

#[test]
fn no_history_is_no_data_not_up() {
    let r = simple(&[], &[], 0, 1_000);
    assert_eq!((r.no_data_ms, r.counted_ms, r.up_ms), (1_000_000, 0, 0));
    assert_eq!(r.availability_percent, None);
    let b = r.error_budget.unwrap();
    assert_eq!((b.allowed_ms, b.burned_percent), (0.0, None));
    assert!(r.incidents.is_empty());
}

#[test]
fn time_after_the_report_is_no_data_and_an_open_incident_is_ongoing() {
    let changes = [change(0, Up, ""), change(600, Down, "refused")];
    let r = target_report(
        Input {
            changes: &changes,
            gaps: &[],
            maintenance: &[],
            known_until_ms: 700_000,
            objective: None,
        },
        Window {
            from_ms: 0,
            to_ms: 1_000_000,
        },
    );
    assert_eq!(
        (r.up_ms, r.down_ms, r.no_data_ms),
        (600_000, 100_000, 300_000)
    );
    assert_eq!(r.error_budget, None);
    let i = &r.incidents[0];
    assert_eq!((i.end_ms, i.duration_ms), (None, 100_000));
    assert!(i.ongoing_at_window_end);
}

#[test]
fn an_incident_before_the_window_is_not_listed() {
    let changes = [change(0, Down, "refused"), change(100, Up, "")];
    let r = simple(&changes, &[], 200, 300);
    assert!(r.incidents.is_empty());
    assert_eq!(r.up_ms, 100_000);
}
