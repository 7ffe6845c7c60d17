//! Maintenance windows: times during which a target is expected to be down. Probing goes
//! on; `sonde_target_in_maintenance` is 1, the shipped alerts are quiet, and the time is
//! left out of uptime and availability.
//!
//! A window selects targets by label equality (`match:`, every pair must hold) over the
//! target's labels, `job` and `instance` included; or agents (`agents:`, the same over
//! the agent's labels and `agent`, its id): an agent in maintenance keeps probing, but
//! its views do not count toward `up` (as a disconnected agent's), so a site's planned
//! outage neither takes a target down nor props it up, and `sonde_agent_in_maintenance`
//! keeps the agents' alerts quiet. It starts at `start` and lasts
//! `duration`; with `every` it comes back every period (counted in plain seconds from
//! `start`, in UTC: no time zone, no daylight saving shift). Everything here is pure: the
//! aggregator parses the config and the API's bodies into [`Window`]s, and hands the hub
//! their union as [`Windows`].

use crate::labels::TargetBase;
use serde::{Deserialize, Serialize};
use sonde_proto::config::{Labels, PromDuration};

/// Where a target's labels are read from (a [`Labels`] map holding `job` and `instance`,
/// or the hub's [`TargetBase`]).
pub trait LabelSource {
    fn label(&self, name: &str) -> Option<&str>;
}

impl LabelSource for Labels {
    fn label(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl LabelSource for TargetBase {
    fn label(&self, name: &str) -> Option<&str> {
        self.get(name)
    }
}

/// A target's labels as windows match them: its own labels, then `job` and `instance`
/// (which win, as they do on the target's series).
pub fn target_labels(job: &str, instance: &str, labels: &Labels) -> Labels {
    let mut out = labels.clone();
    out.insert("job".into(), job.into());
    out.insert("instance".into(), instance.into());
    out
}

/// Where a window comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config file's `maintenance:` (replaced on reload).
    Config,
    /// `POST /api/v1/maintenance` (kept in the aggregator's database).
    Api,
}

/// A window as written in the config file and in the API's JSON bodies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    pub name: String,
    #[serde(rename = "match", default, skip_serializing_if = "Labels::is_empty")]
    pub matchers: Labels,
    /// Agents by label (their own labels and `agent`, the id): instead of `match:`.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub agents: Labels,
    /// RFC 3339, e.g. `2026-12-24T22:00:00Z`.
    pub start: String,
    pub duration: PromDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<PromDuration>,
}

/// A checked window.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub name: String,
    /// Targets by label (empty for a window of agents).
    pub matchers: Labels,
    /// Agents by label (empty for a window of targets).
    pub agents: Labels,
    pub start_ms: i64,
    pub duration_ms: i64,
    pub every_ms: Option<i64>,
    pub source: Source,
    /// When an API window was deleted: its occurrences end there. A deleted window still
    /// leaves its past occurrences out of uptime, but matches nothing from then on.
    pub deleted_ms: Option<i64>,
}

impl WindowSpec {
    /// Checks the spec: a name, valid label names, an RFC 3339 start, a duration above
    /// zero and a period no shorter than the duration. The error says which field is
    /// wrong and how to fix it, without the window's name (the caller adds where).
    pub fn check(&self, source: Source) -> Result<Window, String> {
        if self.name.trim().is_empty() {
            return Err("name is empty; give each window a unique name".into());
        }
        if self.name.contains('/') || self.name.len() > 200 {
            return Err(format!(
                "name {:?} must be at most 200 bytes and hold no '/' (it is part of the API's URL)",
                self.name
            ));
        }
        match (self.matchers.is_empty(), self.agents.is_empty()) {
            (true, true) => return Err("it selects nothing; select targets by label (match: {job: web}: every target of job web) or agents (agents: {site: fra}: every agent labelled site=fra)".into()),
            (false, false) => return Err("it has both match: and agents:; a window selects targets or agents: write one window for each".into()),
            _ => {}
        }
        for (key, selector) in [("match", &self.matchers), ("agents", &self.agents)] {
            for name in selector.keys() {
                if !sonde_proto::config::is_valid_label_name(name) {
                    return Err(format!("{key}: {name:?} is not a valid label name"));
                }
            }
        }
        let start_ms =
            parse_rfc3339_ms(&self.start).map_err(|e| format!("start {:?}: {e}", self.start))?;
        // Stored and shown in UTC: an offset must not push it out of four-digit years.
        if parse_rfc3339_ms(&format_rfc3339_ms(start_ms)) != Ok(start_ms) {
            return Err(format!(
                "start {:?} is out of range: in UTC it must fall within the years 0000 to 9999",
                self.start
            ));
        }
        let duration_ms = millis(self.duration);
        if duration_ms < 1000 {
            return Err("duration must be greater than 0 (at least 1s)".into());
        }
        let every_ms = self.every.map(millis);
        if every_ms.is_some_and(|every| every < MIN_EVERY_MS) {
            return Err(format!(
                "every {} is shorter than the shortest period, 1m",
                self.every.unwrap_or_default()
            ));
        }
        if let Some(every) = every_ms
            && every < duration_ms
        {
            return Err(format!(
                "every {} is shorter than duration {}; occurrences would overlap: make every at least the duration",
                self.every.unwrap_or_default(),
                self.duration
            ));
        }
        Ok(Window {
            name: self.name.clone(),
            matchers: self.matchers.clone(),
            agents: self.agents.clone(),
            start_ms,
            duration_ms,
            every_ms,
            source,
            deleted_ms: None,
        })
    }
}

/// How long after its deletion a window's targets still get `sonde_target_in_maintenance`
/// 0: Prometheus's lookback, the time a last sample stays the current one.
pub const DELETED_WRITTEN_FOR_MS: i64 = 5 * 60_000;

/// The shortest `every:`: shorter periods are no maintenance, and would make every
/// uptime over a month walk millions of occurrences.
pub const MIN_EVERY_MS: i64 = 60_000;

fn millis(d: PromDuration) -> i64 {
    i64::try_from(d.0.as_millis()).unwrap_or(i64::MAX)
}

impl Window {
    /// The spec this window was made from (for the API and the database).
    pub fn spec(&self) -> WindowSpec {
        WindowSpec {
            name: self.name.clone(),
            matchers: self.matchers.clone(),
            agents: self.agents.clone(),
            start: format_rfc3339_ms(self.start_ms),
            duration: PromDuration(std::time::Duration::from_millis(self.duration_ms as u64)),
            every: self
                .every_ms
                .map(|ms| PromDuration(std::time::Duration::from_millis(ms as u64))),
        }
    }

    /// True when this window selects targets and every pair of `match:` holds for the
    /// target's `labels`.
    pub fn matches(&self, labels: &impl LabelSource) -> bool {
        !self.matchers.is_empty()
            && self
                .matchers
                .iter()
                .all(|(k, v)| labels.label(k) == Some(v.as_str()))
    }

    /// True when this window selects agents and every pair of `agents:` holds for the
    /// agent `id` with `labels` (`agent` is its id, whatever its labels say).
    pub fn matches_agent(&self, id: &str, labels: &Labels) -> bool {
        !self.agents.is_empty()
            && self.agents.iter().all(|(k, v)| {
                let value = if k == "agent" {
                    Some(id)
                } else {
                    labels.get(k).map(String::as_str)
                };
                value == Some(v.as_str())
            })
    }

    /// Not deleted.
    pub fn is_live(&self) -> bool {
        self.deleted_ms.is_none()
    }

    /// Live, or deleted less than [`DELETED_WRITTEN_FOR_MS`] before `now_ms`: what it
    /// selects has a `sonde_*_in_maintenance` series.
    fn is_written_at(&self, now_ms: i64) -> bool {
        self.deleted_ms
            .is_none_or(|at| now_ms < at.saturating_add(DELETED_WRITTEN_FOR_MS))
    }

    /// The occurrence `[start, end)` that contains `at_ms`, or else the first one after
    /// it; `None` when there is none (a one-off window that is over, a deleted one).
    pub fn occurrence_at_or_after(&self, at_ms: i64) -> Option<(i64, i64)> {
        self.occurrences(at_ms, i64::MAX).next()
    }

    /// The occurrences that overlap `[from_ms, to_ms)`, clipped to it, in time order.
    pub fn occurrences(&self, from_ms: i64, to_ms: i64) -> impl Iterator<Item = (i64, i64)> {
        let end_cap = self.deleted_ms.unwrap_or(i64::MAX).min(to_ms);
        let first = match self.every_ms {
            // Occurrence k starts at start + k·every; the one before the first that
            // ends after `from_ms` ends by the next one's start (every ≥ duration).
            Some(every) if from_ms > self.start_ms => {
                (i128::from(from_ms) - i128::from(self.start_ms)) / i128::from(every)
            }
            _ => 0,
        };
        // Back to back occurrences are one open-ended window: no need to walk them.
        let (start, duration, every) = match self.every_ms {
            Some(every) if every == self.duration_ms => (self.start_ms, i64::MAX, None),
            every => (self.start_ms, self.duration_ms, every),
        };
        let first = if every.is_none() { 0 } else { first };
        let mut k = first;
        std::iter::from_fn(move || {
            loop {
                if k > first && every.is_none() {
                    return None;
                }
                let begin = i128::from(start) + k * i128::from(every.unwrap_or(0));
                if begin >= i128::from(end_cap) {
                    return None;
                }
                k += 1;
                let end = (begin + i128::from(duration)).min(i128::from(end_cap));
                let clipped = (begin.max(i128::from(from_ms)), end);
                if clipped.0 < clipped.1 {
                    return Some((clipped.0 as i64, clipped.1 as i64));
                }
                // A one-off window has no later occurrence to try.
                every?;
            }
        })
    }

    /// Active at `now_ms`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.occurrence_at_or_after(now_ms)
            .is_some_and(|(from, _)| from <= now_ms)
    }
}

/// Every window in force: the config's and the API's, and deleted API windows kept for
/// the uptime of the past.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Windows {
    windows: Vec<Window>,
}

impl Windows {
    pub fn new(windows: Vec<Window>) -> Self {
        Self { windows }
    }

    /// Every window, deleted ones included.
    pub fn all(&self) -> &[Window] {
        &self.windows
    }

    /// The windows not deleted.
    pub fn live(&self) -> impl Iterator<Item = &Window> {
        self.windows.iter().filter(|w| w.is_live())
    }

    pub fn is_empty(&self) -> bool {
        self.live().next().is_none()
    }

    /// True when some live window selects `labels`, at any time, or a window deleted
    /// less than [`DELETED_WRITTEN_FOR_MS`] before `now_ms` did: such a target has a
    /// `sonde_target_in_maintenance` series (0 outside its windows). Writing 0 for a
    /// while after a deletion replaces a 1 an earlier run of the aggregator wrote and
    /// could not mark stale (it was stopped), which would keep the alerts quiet.
    pub fn could_match(&self, labels: &impl LabelSource, now_ms: i64) -> bool {
        self.windows
            .iter()
            .any(|w| w.is_written_at(now_ms) && w.matches(labels))
    }

    /// True when no window may select a target or an agent at `now_ms` (see
    /// [`Windows::could_match`]).
    pub fn selects_nothing(&self, now_ms: i64) -> bool {
        !self.windows.iter().any(|w| w.is_written_at(now_ms))
    }

    /// [`Windows::could_match`] for an agent: it has a `sonde_agent_in_maintenance`.
    pub fn could_match_agent(&self, id: &str, labels: &Labels, now_ms: i64) -> bool {
        self.windows
            .iter()
            .any(|w| w.is_written_at(now_ms) && w.matches_agent(id, labels))
    }

    /// The name of a window that selects the agent and is active at `now_ms`.
    pub fn active_for_agent(&self, id: &str, labels: &Labels, now_ms: i64) -> Option<&str> {
        self.live()
            .find(|w| w.matches_agent(id, labels) && w.is_active(now_ms))
            .map(|w| w.name.as_str())
    }

    /// True when some live window selects agents (the hub then checks each agent).
    pub fn selects_agents(&self) -> bool {
        self.live().any(|w| !w.agents.is_empty())
    }

    /// The name of a window that selects `labels` and is active at `now_ms`.
    pub fn active(&self, labels: &impl LabelSource, now_ms: i64) -> Option<&str> {
        self.live()
            .find(|w| w.matches(labels) && w.is_active(now_ms))
            .map(|w| w.name.as_str())
    }

    /// The times within `[from_ms, to_ms)` that `labels` spent in maintenance, merged
    /// (overlapping and touching occurrences of every window become one) and clipped to
    /// the range, in time order. Deleted windows count up to their deletion.
    pub fn intervals_ms(
        &self,
        labels: &impl LabelSource,
        from_ms: i64,
        to_ms: i64,
    ) -> Vec<(i64, i64)> {
        let mut all: Vec<(i64, i64)> = self
            .windows
            .iter()
            .filter(|w| w.matches(labels))
            .flat_map(|w| w.occurrences(from_ms, to_ms))
            .collect();
        all.sort_unstable();
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(all.len());
        for (from, to) in all {
            match merged.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        merged
    }

    /// [`Windows::intervals_ms`] in unix seconds: `[from_unix, to_unix)` in, intervals
    /// out (a start rounded down, an end rounded up to the second).
    pub fn intervals(
        &self,
        labels: &impl LabelSource,
        from_unix: i64,
        to_unix: i64,
    ) -> Vec<(i64, i64)> {
        let ms = |s: i64| s.saturating_mul(1000);
        let mut out: Vec<(i64, i64)> = Vec::new();
        for (from, to) in self.intervals_ms(labels, ms(from_unix), ms(to_unix)) {
            let (from, to) = (from.div_euclid(1000), (to + 999).div_euclid(1000));
            match out.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => out.push((from, to)),
            }
        }
        out
    }

    /// The first instant after `now_ms` at which some live window starts or ends: until
    /// then no target's maintenance state changes.
    pub fn next_change_after(&self, now_ms: i64) -> Option<i64> {
        self.live()
            .filter_map(|w| {
                let (from, to) = w.occurrence_at_or_after(now_ms)?;
                Some(if from > now_ms { from } else { to })
            })
            .min()
    }
}

/// Parses an RFC 3339 timestamp (`2026-12-24T22:00:00Z`, `2026-12-24T23:00:00.5+01:00`)
/// into unix milliseconds.
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, String> {
    const FORM: &str = "expected an RFC 3339 time such as 2026-12-24T22:00:00Z";
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Result<i64, String> {
        let part = text.get(from..from + len).ok_or(FORM)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(FORM.to_string());
        }
        part.parse::<i64>().map_err(|_| FORM.to_string())
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(FORM.into());
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(format!("{FORM} (a field is out of range)"));
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(FORM.into());
        }
        let kept = digits.min(3);
        millis = num(i, kept)? * 10_i64.pow(3 - kept as u32);
        i += digits;
    }
    let offset_s = match b.get(i..) {
        Some(b"Z" | b"z") => 0,
        Some([sign @ (b'+' | b'-'), _, _, b':', _, _]) => {
            let (h, m) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if h > 23 || m > 59 {
                return Err(format!("{FORM} (the offset is out of range)"));
            }
            let s = h * 3600 + m * 60;
            if *sign == b'-' { -s } else { s }
        }
        _ => return Err(format!("{FORM} (it needs a Z or an offset like +01:00)")),
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_s;
    Ok(seconds * 1000 + millis)
}

/// Unix milliseconds as RFC 3339 in UTC (milliseconds shown only when not zero).
pub fn format_rfc3339_ms(ms: i64) -> String {
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let time = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        y,
        m,
        d,
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
    if millis == 0 {
        format!("{time}Z")
    } else {
        format!("{time}.{millis:03}Z")
    }
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Howard Hinnant's algorithm: a proleptic Gregorian date to days since 1970-01-01.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    fn spec(start: &str, duration: &str, every: Option<&str>) -> WindowSpec {
        WindowSpec {
            name: "w".into(),
            matchers: Labels::from([("job".to_string(), "web".to_string())]),
            agents: Labels::new(),
            start: start.into(),
            duration: duration.parse().unwrap(),
            every: every.map(|e| e.parse().unwrap()),
        }
    }

    fn window(start_ms: i64, duration_ms: i64, every_ms: Option<i64>) -> Window {
        Window {
            name: "w".into(),
            matchers: Labels::from([("job".to_string(), "web".to_string())]),
            agents: Labels::new(),
            start_ms,
            duration_ms,
            every_ms,
            source: Source::Config,
            deleted_ms: None,
        }
    }

    fn web(instance: &str) -> Labels {
        target_labels("web", instance, &Labels::new())
    }

    #[test]
    fn rfc3339_round_trips_and_honours_offsets() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Ok(0));
        let t = parse_rfc3339_ms("2026-12-24T22:00:00Z").unwrap();
        assert_eq!(format_rfc3339_ms(t), "2026-12-24T22:00:00Z");
        assert_eq!(
            parse_rfc3339_ms("2026-12-24T23:30:00.250+01:30").unwrap(),
            t + 250
        );
        assert_eq!(parse_rfc3339_ms("2026-12-24T21:00:00-01:00").unwrap(), t);
        assert_eq!(
            format_rfc3339_ms(parse_rfc3339_ms("2000-02-29T12:00:00.5Z").unwrap()),
            "2000-02-29T12:00:00.500Z"
        );
        for bad in [
            "",
            "2026-12-24",
            "2026-12-24T22:00:00",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-12-24T22:00:00+1:00",
            "2026-12-24T2a:00:00Z",
            "２026-12-24T22:00:00Z",
        ] {
            let e = parse_rfc3339_ms(bad).unwrap_err();
            assert!(e.contains("RFC 3339"), "{bad}: {e}");
        }
    }

    #[test]
    fn specs_are_checked_with_a_reason() {
        let ok = spec("2026-12-24T22:00:00Z", "2h", Some("168h"))
            .check(Source::Config)
            .unwrap();
        assert_eq!(ok.duration_ms, 2 * HOUR);
        assert_eq!(ok.every_ms, Some(168 * HOUR));
        assert_eq!(ok.spec(), spec("2026-12-24T22:00:00Z", "2h", Some("1w")));
        let err = |s: WindowSpec| s.check(Source::Api).unwrap_err();
        assert!(err(spec("2026-12-24T22:00:00Z", "0s", None)).contains("greater than 0"));
        assert!(err(spec("2026-12-24T22:00:00Z", "2h", Some("1h"))).contains("shorter than"));
        assert!(err(spec("2026-12-24T22:00:00Z", "1s", Some("30s"))).contains("1m"));
        assert!(err(spec("2026-12-24T22:00:00Z", "500ms", None)).contains("at least 1s"));
        assert!(err(spec("tomorrow", "2h", None)).contains("RFC 3339"));
        assert!(err(spec("9999-12-31T23:30:00-01:00", "2h", None)).contains("out of range"));
        let mut s = spec("2026-12-24T22:00:00Z", "2h", None);
        s.matchers.clear();
        assert!(err(s.clone()).contains("selects nothing"));
        s.matchers.insert("bad-name".into(), "x".into());
        assert!(err(s.clone()).contains("match: \"bad-name\" is not a valid label name"));
        s.matchers.clear();
        s.agents.insert("site".into(), "fra".into());
        assert!(s.check(Source::Api).is_ok());
        s.matchers.insert("job".into(), "web".into());
        assert!(err(s).contains("both match: and agents:"));
        let mut s = spec("2026-12-24T22:00:00Z", "2h", None);
        s.name = "a/b".into();
        assert!(err(s).contains("'/'"));
    }

    #[test]
    fn a_window_matches_when_every_label_does() {
        let mut w = window(0, HOUR, None);
        assert!(w.matches(&web("a")));
        assert!(!w.matches(&target_labels("db", "a", &Labels::new())));
        w.matchers.insert("instance".into(), "a".into());
        assert!(w.matches(&web("a")));
        assert!(!w.matches(&web("b")));
        w.matchers.insert("team".into(), "shop".into());
        assert!(!w.matches(&web("a")));
        let with_team = target_labels("web", "a", &Labels::from([("team".into(), "shop".into())]));
        assert!(w.matches(&with_team));
        // `job` and `instance` are the target's, whatever its labels say.
        let lying = Labels::from([("job".into(), "db".into())]);
        assert!(window(0, HOUR, None).matches(&target_labels("web", "x", &lying)));
    }

    #[test]
    fn a_window_of_agents_selects_agents_only() {
        let mut w = window(0, HOUR, None);
        w.matchers.clear();
        w.agents.insert("site".into(), "fra".into());
        let fra = Labels::from([("site".into(), "fra".into())]);
        assert!(w.matches_agent("edge-1", &fra));
        assert!(!w.matches_agent("edge-2", &Labels::new()));
        assert!(!w.matches(&web("a")), "no target is in an agents' window");
        // `agent` is the id, whatever the labels say.
        w.agents = Labels::from([("agent".into(), "edge-1".into())]);
        let lying = Labels::from([("agent".into(), "edge-2".into())]);
        assert!(w.matches_agent("edge-1", &lying));
        assert!(!w.matches_agent("edge-2", &Labels::new()));
        // And a window of targets selects no agent.
        assert!(!window(0, HOUR, None).matches_agent("edge-1", &fra));
        let windows = Windows::new(vec![w]);
        assert!(windows.selects_agents());
        assert_eq!(
            windows.active_for_agent("edge-1", &Labels::new(), 0),
            Some("w")
        );
        assert_eq!(
            windows.active_for_agent("edge-1", &Labels::new(), HOUR),
            None
        );
        assert!(windows.could_match_agent("edge-1", &Labels::new(), HOUR));
        assert!(!windows.could_match(&web("a"), 0));
        assert!(windows.intervals_ms(&web("a"), 0, HOUR).is_empty());
    }

    #[test]
    fn one_off_occurrence_edges_are_half_open() {
        let w = window(10 * HOUR, 2 * HOUR, None);
        assert!(!w.is_active(10 * HOUR - 1));
        assert!(w.is_active(10 * HOUR));
        assert!(w.is_active(12 * HOUR - 1));
        assert!(!w.is_active(12 * HOUR));
        assert_eq!(w.occurrence_at_or_after(0), Some((10 * HOUR, 12 * HOUR)));
        assert_eq!(
            w.occurrence_at_or_after(11 * HOUR),
            Some((11 * HOUR, 12 * HOUR))
        );
        assert_eq!(w.occurrence_at_or_after(12 * HOUR), None);
    }

    #[test]
    fn recurring_occurrences_follow_the_period_in_utc() {
        // Weekly, Sunday 22:00 UTC for 2 h, across the end of European summer time
        // (2026-10-25): UTC knows no shift, so every occurrence starts at 22:00.
        let w = spec("2026-10-18T22:00:00Z", "2h", Some("168h"))
            .check(Source::Config)
            .unwrap();
        let from = parse_rfc3339_ms("2026-10-01T00:00:00Z").unwrap();
        let to = parse_rfc3339_ms("2026-11-02T00:00:00Z").unwrap();
        let starts: Vec<String> = w
            .occurrences(from, to)
            .map(|(s, _)| format_rfc3339_ms(s))
            .collect();
        assert_eq!(
            starts,
            [
                "2026-10-18T22:00:00Z",
                "2026-10-25T22:00:00Z",
                "2026-11-01T22:00:00Z"
            ]
        );
        // Inside the third occurrence: it is active, and clipped to the range.
        let at = parse_rfc3339_ms("2026-11-01T23:00:00Z").unwrap();
        assert!(w.is_active(at));
        assert_eq!(w.occurrence_at_or_after(at), Some((at, at + HOUR)));
        assert!(!w.is_active(at + HOUR));
        assert_eq!(
            w.occurrence_at_or_after(at + HOUR),
            Some((at + 7 * DAY - HOUR, at + 7 * DAY + HOUR))
        );
        // Before the first start, nothing.
        assert!(!w.is_active(w.start_ms - 7 * DAY + 30 * 60_000));
    }

    #[test]
    fn intervals_merge_overlapping_windows_and_clip_to_the_range() {
        let mut a = window(10 * HOUR, 2 * HOUR, Some(DAY));
        a.name = "a".into();
        let mut b = window(11 * HOUR, 2 * HOUR, None);
        b.name = "b".into();
        // Touching a's second occurrence: merged with it.
        let mut c = window(DAY + 12 * HOUR, HOUR, None);
        c.name = "c".into();
        c.matchers.insert("instance".into(), "x".into());
        let ws = Windows::new(vec![a, b, c]);
        assert_eq!(
            ws.intervals_ms(&web("x"), 0, 2 * DAY),
            [(10 * HOUR, 13 * HOUR), (DAY + 10 * HOUR, DAY + 13 * HOUR)]
        );
        // Another instance: not c.
        assert_eq!(
            ws.intervals_ms(&web("y"), 0, 2 * DAY),
            [(10 * HOUR, 13 * HOUR), (DAY + 10 * HOUR, DAY + 12 * HOUR)]
        );
        // Clipped at both ends.
        assert_eq!(
            ws.intervals_ms(&web("y"), 11 * HOUR, DAY + 11 * HOUR),
            [(11 * HOUR, 13 * HOUR), (DAY + 10 * HOUR, DAY + 11 * HOUR)]
        );
        // A range ending where an occurrence starts, or starting where one ends, holds none.
        assert!(ws.intervals_ms(&web("y"), 0, 10 * HOUR).is_empty());
        assert!(
            ws.intervals_ms(&web("y"), 13 * HOUR, DAY + 10 * HOUR)
                .is_empty()
        );
        assert!(
            ws.intervals_ms(&target_labels("db", "x", &Labels::new()), 0, 2 * DAY)
                .is_empty()
        );
        // In seconds, for reports.
        assert_eq!(
            ws.intervals(&web("y"), 0, DAY / 1000),
            [(10 * 3600, 13 * 3600)]
        );
        assert_eq!(ws.active(&web("x"), 10 * HOUR), Some("a"));
        assert_eq!(ws.active(&web("x"), 12 * HOUR), Some("b"));
        assert_eq!(ws.active(&web("x"), DAY + 12 * HOUR + 1), Some("c"));
        assert_eq!(ws.active(&web("x"), 13 * HOUR), None);
        assert_eq!(ws.next_change_after(0), Some(10 * HOUR));
        assert_eq!(ws.next_change_after(10 * HOUR), Some(11 * HOUR));
        assert_eq!(ws.next_change_after(12 * HOUR), Some(13 * HOUR));
        assert_eq!(ws.next_change_after(13 * HOUR), Some(DAY + 10 * HOUR));
    }

    #[test]
    fn a_period_equal_to_the_duration_is_one_long_window() {
        let w = window(HOUR, HOUR, Some(HOUR));
        let ws = Windows::new(vec![w]);
        assert_eq!(ws.intervals_ms(&web("a"), 0, 5 * HOUR), [(HOUR, 5 * HOUR)]);
    }

    #[test]
    fn a_deleted_window_counts_until_its_deletion_and_matches_nothing_after() {
        let mut w = window(0, 10 * HOUR, None);
        w.deleted_ms = Some(4 * HOUR);
        let ws = Windows::new(vec![w]);
        assert_eq!(ws.intervals_ms(&web("a"), 0, DAY), [(0, 4 * HOUR)]);
        assert_eq!(ws.active(&web("a"), 2 * HOUR), None);
        // Still written (0) for a while after the deletion, then not at all.
        assert!(ws.could_match(&web("a"), 4 * HOUR + DELETED_WRITTEN_FOR_MS - 1));
        assert!(!ws.selects_nothing(4 * HOUR));
        assert!(!ws.could_match(&web("a"), 4 * HOUR + DELETED_WRITTEN_FOR_MS));
        assert!(ws.selects_nothing(4 * HOUR + DELETED_WRITTEN_FOR_MS));
        assert!(ws.is_empty());
        assert_eq!(ws.next_change_after(0), None);
    }

    #[test]
    fn far_times_do_not_overflow() {
        let w = window(i64::MIN / 2, HOUR, Some(HOUR * 2));
        assert!(w.occurrences(i64::MAX - HOUR, i64::MAX).count() <= 1);
        // Back to back from the far past: one interval, found without walking.
        let w = window(i64::MIN / 2, HOUR, Some(HOUR));
        assert_eq!(w.occurrences(0, DAY).collect::<Vec<_>>(), [(0, DAY)]);
        let w = window(i64::MAX - HOUR, 2 * HOUR, None);
        assert_eq!(
            w.occurrence_at_or_after(0),
            Some((i64::MAX - HOUR, i64::MAX))
        );
    }
}
