//! The "last 24 h" bars of the target lists: one bar per half hour, coloured by the
//! worst state known in it (down, then degraded, then up, then missing), the half hour
//! in progress included from its first minute; a half hour nothing is known of (before
//! the target's first record, or while the aggregator was not running) is a thin dash,
//! not a bar.

use crate::history::{self, Gap, HistoryState};
use std::fmt::Write;

/// Bars drawn.
pub const BARS: usize = 48;
/// What one bar covers.
pub const BAR_MS: i64 = 86_400_000 / BARS as i64;

/// Each bar's state, oldest first (`None`: nothing known), for the `BARS` bars whose
/// last one holds `now_ms`. `current` is the state the hub holds now: the bar in
/// progress shows it even before the history has recorded anything.
pub fn bars(
    changes: &[(i64, HistoryState)],
    gaps: &[Gap],
    current: Option<HistoryState>,
    now_ms: i64,
) -> Vec<Option<HistoryState>> {
    let last_start = now_ms.div_euclid(BAR_MS) * BAR_MS;
    let first_start = last_start - (BARS as i64 - 1) * BAR_MS;
    let mut out: Vec<Option<HistoryState>> = vec![None; BARS];
    for s in history::segments(changes, gaps, first_start, now_ms) {
        let first = ((s.from_ms - first_start) / BAR_MS) as usize;
        let last = (((s.to_ms - 1).max(s.from_ms) - first_start) / BAR_MS) as usize;
        for bar in out.iter_mut().take(last.min(BARS - 1) + 1).skip(first) {
            *bar = worst(*bar, s.state);
        }
    }
    if let (Some(state), Some(bar)) = (current, out.last_mut()) {
        *bar = worst(*bar, state);
    }
    out
}

/// Down over degraded over up over missing: a half hour with a minute down is shown
/// down; one that is only missing (no fresh result) shows missing.
fn worst(bar: Option<HistoryState>, state: HistoryState) -> Option<HistoryState> {
    let rank = |s: HistoryState| match s {
        HistoryState::Missing => 0,
        HistoryState::Up => 1,
        HistoryState::Degraded => 2,
        HistoryState::Down => 3,
    };
    Some(match bar {
        Some(b) if rank(b) >= rank(state) => b,
        _ => state,
    })
}

/// The bars as a compact SVG: one path per state (a list of a hundred targets stays
/// small), stretched to the width of its cell.
pub fn svg(bars: &[Option<HistoryState>]) -> String {
    let mut paths: [(&str, String); 5] = [
        ("up", String::new()),
        ("degraded", String::new()),
        ("down", String::new()),
        ("missing", String::new()),
        ("unknown", String::new()),
    ];
    let mut known = 0;
    for (i, bar) in bars.iter().enumerate() {
        let x = i * 6;
        let (slot, shape) = match bar {
            None => (4, format!("M{x} 4h5v2h-5z")),
            Some(s) => {
                known += 1;
                let slot = match s {
                    HistoryState::Up => 0,
                    HistoryState::Degraded => 1,
                    HistoryState::Down => 2,
                    HistoryState::Missing => 3,
                };
                (slot, format!("M{x} 0h5v10h-5z"))
            }
        };
        paths[slot].1.push_str(&shape);
    }
    let mut out = format!(
        r#"<svg class="heartbeat" viewBox="0 0 {w} 10" preserveAspectRatio="none" role="img" data-known="{known}" aria-label="last 24 h, half-hour bars: {known} known"><title>last 24 h: one bar per half hour, the newest on the right; a dash where nothing is known</title>"#,
        w = bars.len() * 6 - 1,
    );
    for (state, d) in &paths {
        if !d.is_empty() {
            let _ = write!(out, r#"<path class="hb-{state}" d="{d}"/>"#);
        }
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use HistoryState::*;

    #[test]
    fn a_target_seen_for_a_minute_has_its_bar_in_progress_and_nothing_else() {
        let now = 10 * 86_400_000 + 5 * BAR_MS + 60_000;
        let b = bars(&[], &[], Some(Up), now);
        assert_eq!(b.len(), BARS);
        assert_eq!(b[BARS - 1], Some(Up));
        assert!(b[..BARS - 1].iter().all(Option::is_none));
        let svg = svg(&b);
        assert!(svg.contains(r#"class="hb-up""#) && svg.contains("data-known=\"1\""));
        assert!(svg.contains(r#"class="hb-unknown""#), "{svg}");
    }

    #[test]
    fn each_bar_shows_the_worst_state_known_in_it() {
        let day = 10 * 86_400_000;
        let now = day + BAR_MS * 47 + 10;
        let start = now.div_euclid(BAR_MS) * BAR_MS - 47 * BAR_MS;
        let changes = [
            (start + 10 * BAR_MS, Up),
            (start + 12 * BAR_MS + 1_000, Down),
            (start + 12 * BAR_MS + 2_000, Up),
            (start + 20 * BAR_MS, Missing),
            (start + 21 * BAR_MS, Up),
        ];
        let gaps = [Gap {
            from_ms: start + 30 * BAR_MS,
            to_ms: start + 32 * BAR_MS,
        }];
        let b = bars(&changes, &gaps, Some(Up), now);
        assert_eq!(b[9], None, "before the first record");
        assert_eq!(
            (b[10], b[11], b[12], b[13]),
            (Some(Up), Some(Up), Some(Down), Some(Up))
        );
        assert_eq!(b[20], Some(Missing));
        assert_eq!(
            (b[30], b[31]),
            (None, None),
            "the aggregator was not running"
        );
        assert_eq!(b[47], Some(Up));
    }
}
