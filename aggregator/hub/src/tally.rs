//! A target's fresh-view counts kept as its views change, so that merging one agent's
//! new result costs O(log n) instead of a walk over all `n` views ([`crate::merge::merge`],
//! the reference rule, walks them).
//!
//! Why this shape: a view is fresh while `now − timestamp < window`, which for a given
//! `now` and window holds for every timestamp above some cut and none below it. So the
//! views are kept counted per timestamp in an ordered map (with a thousand agents on
//! one target, many share a timestamp), and the counts cover exactly the views above a
//! cut. A changed view moves between buckets in O(log n); when time passes, the cut
//! moves up over the buckets that went stale, each passed once (amortised O(1) per
//! view); should the window grow (a reload, a local job's spacing) or the clock step
//! back, it moves down the same way. No expiry has to be scheduled: whoever asks for
//! the counts at `now` (a result, the once-a-second evaluation) moves the cut first.
//!
//! The counts depend only on the views and the cut, never on the order of changes, so
//! undoing a change (a failed commit's rollback) is applying the reverse change.

use crate::merge::{AgentView, Merged, is_fresh};
use sonde_proto::config::Quorum;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::Duration;

/// Views per timestamp: how many, and how many of them succeed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    views: u32,
    succeeding: u32,
}

/// The views of one target counted as [`crate::merge::merge`] counts them.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    by_timestamp: BTreeMap<i64, Bucket>,
    /// Views at or before this timestamp are not counted (`None`: every view is).
    uncounted_through: Option<i64>,
    /// Counted views, and of those the succeeding ones.
    agents: u32,
    succeeding: u32,
}

impl Tally {
    /// Replaces one agent's view `before` (none: a new agent) with `after` (none: gone).
    pub fn replace(&mut self, before: Option<AgentView>, after: Option<AgentView>) {
        if let Some(v) = before {
            self.remove(v);
        }
        if let Some(v) = after {
            self.add(v);
        }
    }

    fn counted(&self, timestamp_ms: i64) -> bool {
        self.uncounted_through.is_none_or(|t| timestamp_ms > t)
    }

    fn add(&mut self, v: AgentView) {
        let b = self.by_timestamp.entry(v.timestamp_ms).or_default();
        b.views += 1;
        b.succeeding += u32::from(v.success);
        if self.counted(v.timestamp_ms) {
            self.agents += 1;
            self.succeeding += u32::from(v.success);
        }
    }

    fn remove(&mut self, v: AgentView) {
        let counted = self.counted(v.timestamp_ms);
        let Some(b) = self.by_timestamp.get_mut(&v.timestamp_ms) else {
            debug_assert!(false, "a view the tally never had: {v:?}");
            return;
        };
        b.views -= 1;
        b.succeeding -= u32::from(v.success);
        if b.views == 0 {
            self.by_timestamp.remove(&v.timestamp_ms);
        }
        if counted {
            self.agents -= 1;
            self.succeeding -= u32::from(v.success);
        }
    }

    fn first_counted(&self) -> Option<(i64, Bucket)> {
        let from = self
            .uncounted_through
            .map_or(Bound::Unbounded, Bound::Excluded);
        self.by_timestamp
            .range((from, Bound::Unbounded))
            .next()
            .map(|(&t, &b)| (t, b))
    }

    fn last_uncounted(&self) -> Option<(i64, Bucket)> {
        let through = self.uncounted_through?;
        self.by_timestamp
            .range(..=through)
            .next_back()
            .map(|(&t, &b)| (t, b))
    }

    /// Moves the cut to `now_ms` under `window`: afterwards exactly the fresh views are
    /// counted.
    pub fn advance(&mut self, now_ms: i64, window: Duration) {
        while let Some((t, b)) = self.first_counted() {
            if is_fresh(t, now_ms, window) {
                break;
            }
            self.agents -= b.views;
            self.succeeding -= b.succeeding;
            self.uncounted_through = Some(t);
        }
        while let Some((t, b)) = self.last_uncounted() {
            if !is_fresh(t, now_ms, window) {
                break;
            }
            self.agents += b.views;
            self.succeeding += b.succeeding;
            self.uncounted_through = self.by_timestamp.range(..t).next_back().map(|(&t, _)| t);
        }
    }

    /// The merge at `now_ms` (what [`crate::merge::merge`] over the same views gives).
    pub fn merge(&mut self, quorum: Quorum, now_ms: i64, window: Duration) -> Merged {
        self.advance(now_ms, window);
        Merged::of(self.agents, self.succeeding, quorum)
    }

    /// When the first fresh view goes stale, once [`Tally::advance`]d to now (`None`:
    /// no view is fresh).
    pub fn next_expiry(&self, window: Duration) -> Option<i64> {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        self.first_counted()
            .map(|(t, _)| t.saturating_add(window_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::merge;
    use proptest::prelude::*;

    const WINDOW: Duration = Duration::from_secs(40);

    #[derive(Clone, Debug)]
    enum Step {
        /// Agent `.0` reports (timestamp offset from now, success); or leaves.
        View(usize, Option<(i64, bool)>),
        /// The clock moves by this many ms (negative: steps back).
        Clock(i64),
        /// The window changes to this many seconds.
        Window(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0usize..6, prop::option::weighted(0.9, (-90_000i64..5_000, any::<bool>())))
                .prop_map(|(a, v)| Step::View(a, v)),
            2 => (-3_000i64..30_000).prop_map(Step::Clock),
            1 => (0u64..90).prop_map(Step::Window),
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
        fn counts_what_merge_counts(steps in prop::collection::vec(step(), 0..80), q in quorum()) {
            let mut views: Vec<Option<AgentView>> = vec![None; 6];
            let mut tally = Tally::default();
            let (mut now, mut window) = (1_000_000i64, WINDOW);
            for s in steps {
                match s {
                    Step::View(a, v) => {
                        let after = v.map(|(offset, success)| AgentView {
                            timestamp_ms: now + offset,
                            success,
                        });
                        tally.replace(views[a], after);
                        views[a] = after;
                    }
                    Step::Clock(by) => now += by,
                    Step::Window(secs) => window = Duration::from_secs(secs),
                }
                let expected = merge(views.iter().flatten(), q, now, window);
                prop_assert_eq!(tally.merge(q, now, window), expected);
                let window_ms = window.as_millis() as i64;
                let stale_next = views
                    .iter()
                    .flatten()
                    .map(|v| v.timestamp_ms + window_ms)
                    .filter(|&at| at > now)
                    .min();
                prop_assert_eq!(tally.next_expiry(window), stale_next);
            }
        }
    }

    #[test]
    fn a_view_going_stale_leaves_the_counts_once_time_passes() {
        let mut tally = Tally::default();
        let view = |timestamp_ms, success| {
            Some(AgentView {
                timestamp_ms,
                success,
            })
        };
        tally.replace(None, view(0, true));
        tally.replace(None, view(10_000, false));
        let m = tally.merge(Quorum::AtLeast(1), 39_999, WINDOW);
        assert_eq!((m.agents, m.succeeding), (2, 1));
        let m = tally.merge(Quorum::AtLeast(1), 40_000, WINDOW);
        assert_eq!((m.agents, m.succeeding), (1, 0));
        assert_eq!(tally.next_expiry(WINDOW), Some(50_000));
        // The stale agent reports again: counted again.
        tally.replace(view(0, true), view(40_000, true));
        let m = tally.merge(Quorum::AtLeast(1), 40_000, WINDOW);
        assert_eq!((m.agents, m.succeeding), (2, 1));
    }
}
