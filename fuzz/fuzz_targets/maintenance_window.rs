//! A maintenance window as `POST /api/v1/maintenance` receives it: JSON, then the checks
//! (RFC 3339 start, durations), then its occurrences and merged intervals over a range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde_aggregator::maintenance::{Source, WindowSpec, Windows, target_labels};

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<WindowSpec>(data) else {
        return;
    };
    let Ok(window) = spec.check(Source::Api) else {
        return;
    };
    let from = window.start_ms.saturating_sub(86_400_000);
    let to = window.start_ms.saturating_add(7 * 86_400_000);
    let labels = target_labels("web", "http://example/", &window.matchers);
    let windows = Windows::new(vec![window.clone()]);
    let intervals = windows.intervals_ms(&labels, from, to);
    assert!(intervals.windows(2).all(|w| w[0].1 < w[1].0));
    assert!(
        intervals
            .iter()
            .all(|&(a, b)| from <= a && a < b && b <= to)
    );
    let _ = windows.active(&labels, from);
    let _ = windows.next_change_after(from);
    let _ = windows.active_for_agent("edge-1", &window.agents, from);
    let _ = windows.could_match_agent("edge-1", &window.agents, from);
    assert_eq!(window.spec().check(Source::Api).as_ref(), Ok(&window));
});
