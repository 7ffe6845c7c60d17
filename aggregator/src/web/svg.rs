//! The status pages' pictures, drawn as inline SVG on the server: a target's state
//! timeline, a response-time chart, and badges. Pure functions of their data, so that
//! a page needs no JavaScript and a test can read what they show.

use crate::history::{HistoryState, Segment, StoredBucket};
use std::fmt::Write;

/// The colour of a state, the same on every page.
pub fn colour(state: HistoryState) -> &'static str {
    match state {
        HistoryState::Up => "#2e9e4f",
        HistoryState::Degraded => "#e0a100",
        HistoryState::Down => "#d13b3b",
        HistoryState::Missing => "#9a9a9a",
    }
}

pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A horizontal bar over `[from_ms, to_ms)`, as wide as the page: one rectangle per
/// segment (class `seg-<state>`, with a tooltip), blank where nothing is known.
pub fn timeline(segments: &[Segment], from_ms: i64, to_ms: i64, width: u32, height: u32) -> String {
    let span = (to_ms - from_ms).max(1) as f64;
    let mut svg = format!(
        r##"<svg class="timeline" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img" aria-label="state timeline"><rect class="bg" width="{width}" height="{height}" fill="#eeeeee"/>"##
    );
    for s in segments {
        let x = (s.from_ms - from_ms) as f64 / span * f64::from(width);
        let w = ((s.to_ms - s.from_ms) as f64 / span * f64::from(width)).max(1.0);
        let _ = write!(
            svg,
            r#"<rect class="seg-{state}" x="{x:.1}" width="{w:.1}" height="{height}" fill="{fill}"><title>{state} for {dur}</title></rect>"#,
            state = s.state.as_str(),
            fill = colour(s.state),
            dur = human_duration(s.to_ms - s.from_ms),
        );
    }
    svg.push_str("</svg>");
    svg
}

/// One line per agent of the average response time per bucket over `[from_ms,
/// to_ms)`, with a marker where a bucket had failed probes; axes labelled in seconds.
pub fn latency_chart(
    series: &[(String, Vec<StoredBucket>)],
    from_ms: i64,
    to_ms: i64,
    width: u32,
    height: u32,
) -> String {
    let (left, bottom, top, right) = (48.0, 18.0, 8.0, 8.0);
    let plot_w = f64::from(width) - left - right;
    let plot_h = f64::from(height) - top - bottom;
    let max = series
        .iter()
        .flat_map(|(_, b)| b.iter().map(|b| b.duration_avg_seconds))
        .fold(0.0f64, f64::max);
    let ticks = Ticks::for_max(max);
    let max = ticks.top;
    let span = (to_ms - from_ms).max(1) as f64;
    let x = |ms: i64| left + (ms - from_ms) as f64 / span * plot_w;
    let y = |s: f64| top + plot_h - (s / max) * plot_h;
    let mut svg = format!(
        r##"<svg class="latency chart" viewBox="0 0 {width} {height}" role="img" aria-label="response time"><rect class="plot" x="{left}" y="{top}" width="{plot_w:.1}" height="{plot_h:.1}" fill="#fafafa" stroke="#ddd"/>"##
    );
    for (tick, label) in ticks.labelled() {
        let _ = write!(
            svg,
            r##"<line class="gridline" x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text class="axis tick" x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#666">{label}</text>"##,
            left + plot_w,
            left - 4.0,
            y(tick) + 3.0,
            y = y(tick),
        );
    }
    let _ = write!(
        svg,
        r##"<text class="axis" x="{left}" y="{:.1}" font-size="10" fill="#666">{}</text><text class="axis" x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#666">now</text>"##,
        f64::from(height) - 4.0,
        human_duration(to_ms - from_ms) + " ago",
        left + plot_w,
        f64::from(height) - 4.0,
    );
    for (i, (agent, buckets)) in series.iter().enumerate() {
        let line = line_colour(i);
        // A bucket is drawn at its middle, or now for the minute in progress.
        let at = |b: &StoredBucket| x((b.start_ms + b.width_ms / 2).clamp(from_ms, to_ms));
        let shown = || {
            buckets
                .iter()
                .filter(|b| b.probes > 0 && b.start_ms + b.width_ms > from_ms && b.start_ms < to_ms)
        };
        let points: Vec<String> = shown()
            .map(|b| format!("{:.1},{:.1}", at(b), y(b.duration_avg_seconds)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline class="agent-line" data-agent="{agent}" data-points="{n}" fill="none" stroke="{line}" stroke-width="1.5" points="{pts}"><title>{agent}</title></polyline>"#,
            agent = esc(agent),
            n = points.len(),
            pts = points.join(" "),
        );
        for b in shown() {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2" fill="{line}"><title>{}: {} average, {} max, {} probes</title></circle>"#,
                at(b),
                y(b.duration_avg_seconds),
                esc(agent),
                seconds(b.duration_avg_seconds),
                seconds(b.duration_max_seconds),
                b.probes
            );
        }
        for b in shown().filter(|b| b.successes < b.probes) {
            let _ = write!(
                svg,
                r#"<circle class="failed" cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"><title>{}: {} of {} probes failed</title></circle>"#,
                at(b),
                top + plot_h,
                colour(HistoryState::Down),
                esc(agent),
                b.probes - b.successes,
                b.probes
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The colour of the `i`th agent's line.
pub fn line_colour(i: usize) -> &'static str {
    const PALETTE: [&str; 8] = [
        "#1f77b4", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#ff7f0e",
    ];
    PALETTE[i % PALETTE.len()]
}

/// A two-part flat badge, like shields.io's and Gatus's.
pub fn badge(label: &str, message: &str, fill: &str) -> String {
    // Verdana 11px averages about 6.5 px per character.
    let text_width = |s: &str| 10 + (s.chars().count() as u32 * 13).div_ceil(2);
    let (lw, mw) = (text_width(label), text_width(message));
    let w = lw + mw;
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="20" role="img" aria-label="{label}: {message}"><title>{label}: {message}</title><linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient><clipPath id="r"><rect width="{w}" height="20" rx="3" fill="#fff"/></clipPath><g clip-path="url(#r)"><rect width="{lw}" height="20" fill="#555"/><rect x="{lw}" width="{mw}" height="20" fill="{fill}"/><rect width="{w}" height="20" fill="url(#s)"/></g><g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11"><text x="{lx}" y="14">{label}</text><text x="{mx}" y="14">{message}</text></g></svg>"##,
        label = esc(label),
        message = esc(message),
        lx = lw / 2,
        mx = lw + mw / 2,
    )
}

/// The colour of an uptime badge: green from 99.9 %, then yellow, orange, red.
pub fn uptime_colour(uptime: Option<f64>) -> &'static str {
    match uptime {
        None => "#9f9f9f",
        Some(u) if u >= 0.999 => "#40cc11",
        Some(u) if u >= 0.99 => "#94cc11",
        Some(u) if u >= 0.95 => "#ccd311",
        Some(u) if u >= 0.9 => "#ccb311",
        Some(_) => "#c7130a",
    }
}

/// An HTTP date (`Mon, 30 Nov 2026 08:15:02 GMT`): what people read in logs and headers.
pub fn utc(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    httpdate::fmt_http_date(at)
}

/// An uptime as people read it: "100%", "99.95%", "87.3%".
pub fn percent(uptime: Option<f64>) -> String {
    match uptime {
        None => "no data".into(),
        Some(u) if u >= 1.0 => "100%".into(),
        Some(u) if u >= 0.99 => format!("{:.2}%", (u * 10_000.0).floor() / 100.0),
        Some(u) => format!("{:.1}%", (u * 1_000.0).floor() / 10.0),
    }
}

pub fn human_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A response time as people read it: "1.25 s", "340 ms", "2.4 ms", "850 µs".
pub fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.01 {
        format!("{:.0} ms", s * 1e3)
    } else if s >= 0.001 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

/// A chart's vertical axis: 0 to `top` in steps of 1, 2 or 5 times a power of ten,
/// three to five of them, chosen from the largest value shown.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ticks {
    pub top: f64,
    pub step: f64,
}

impl Ticks {
    pub fn for_max(max: f64) -> Self {
        // Nothing measured, or all zero: a 1 ms axis.
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            0.001
        };
        let rough = max / 4.0;
        let p = 10f64.powf(rough.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * p)
            .find(|c| *c >= rough * 0.999_999)
            .unwrap_or(10.0 * p);
        let top = (max / step - 1e-9).ceil().max(1.0) * step;
        Self { top, step }
    }

    /// Every tick with its label, from 0 up, all in the unit that suits the top.
    pub fn labelled(&self) -> Vec<(f64, String)> {
        let (scale, unit) = if self.top >= 1.0 {
            (1.0, "s")
        } else if self.top >= 0.001 {
            (1e3, "ms")
        } else {
            (1e6, "µs")
        };
        let step = self.step * scale;
        let decimals = if step >= 1.0 {
            0
        } else {
            (-(step.log10() + 1e-9).floor()) as usize
        };
        let n = (self.top / self.step).round() as usize;
        (0..=n)
            .map(|i| {
                let v = self.step * i as f64;
                (v, format!("{:.*} {unit}", decimals, v * scale))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(utc(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(utc(1_796_025_600_000), "Mon, 30 Nov 2026 08:00:00 GMT");
    }

    #[test]
    fn uptimes_read_like_people_write_them() {
        assert_eq!(percent(Some(1.0)), "100%");
        assert_eq!(percent(Some(0.99959)), "99.95%");
        assert_eq!(percent(Some(0.8739)), "87.3%");
        assert_eq!(percent(None), "no data");
        assert_eq!(uptime_colour(Some(0.5)), "#c7130a");
    }

    #[test]
    fn the_timeline_draws_each_segment_in_its_state() {
        let segs = [
            Segment {
                from_ms: 0,
                to_ms: 50,
                state: HistoryState::Up,
            },
            Segment {
                from_ms: 50,
                to_ms: 100,
                state: HistoryState::Down,
            },
        ];
        let svg = timeline(&segs, 0, 100, 200, 10);
        assert!(
            svg.contains(r#"class="seg-up" x="0.0" width="100.0""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"class="seg-down" x="100.0" width="100.0""#),
            "{svg}"
        );
    }

    #[test]
    fn badges_escape_what_they_show() {
        let b = badge("uptime", "<b>", "#fff");
        assert!(b.contains("&lt;b&gt;") && !b.contains("<b>"));
    }

    #[test]
    fn chart_scales_are_round_numbers_in_a_unit_that_suits_them() {
        let labels = |max: f64| -> Vec<String> {
            Ticks::for_max(max)
                .labelled()
                .into_iter()
                .map(|(_, l)| l)
                .collect()
        };
        assert_eq!(
            labels(0.00074),
            ["0 µs", "200 µs", "400 µs", "600 µs", "800 µs"]
        );
        assert_eq!(labels(0.0034), ["0 ms", "1 ms", "2 ms", "3 ms", "4 ms"]);
        assert_eq!(labels(0.0012), ["0.0 ms", "0.5 ms", "1.0 ms", "1.5 ms"]);
        assert_eq!(labels(0.12), ["0 ms", "50 ms", "100 ms", "150 ms"]);
        assert_eq!(labels(3.0), ["0 s", "1 s", "2 s", "3 s"]);
        assert_eq!(labels(0.0), ["0.0 ms", "0.5 ms", "1.0 ms"]);
        assert_eq!(labels(f64::NAN), ["0.0 ms", "0.5 ms", "1.0 ms"]);
        for max in [0.000_05, 0.000_9, 0.004, 0.07, 0.6, 8.0, 45.0] {
            let t = Ticks::for_max(max);
            let l = labels(max);
            assert!(t.top >= max && l.len() >= 3 && l.len() <= 6, "{max}: {l:?}");
            let mut unique = l.clone();
            unique.dedup();
            assert_eq!(unique, l, "{max}: every tick reads differently");
        }
        assert_eq!(seconds(0.000_42), "420 µs");
        assert_eq!(seconds(0.0024), "2.4 ms");
        assert_eq!(human_duration(90_000), "1m30s");
        assert_eq!(human_duration(2 * 86_400_000), "2d00h");
    }
}
