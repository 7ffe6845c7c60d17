//! `/target?job=&instance=`: one target on one page: its state and uptimes, its state
//! timeline, every agent's view side by side (which vantage points fail, and why), a
//! response-time chart per agent, and its last incidents with their reasons (and the
//! times the aggregator was not running among them).

use super::history::{self, TargetQuery};
use super::page::{Chrome, head, state_badge, target_link};
use super::svg::{self, esc};
use crate::app::App;
use crate::history::Gap;
use crate::hub::Snapshot;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Html;
use std::fmt::Write;
use std::sync::Arc;

pub async fn page(
    State(app): State<Arc<App>>,
    Query(q): Query<TargetQuery>,
) -> (StatusCode, Html<String>) {
    let retention = app.hub.config().history.retention;
    let (key, window) = match q.target_and_window(retention) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, Html(message(&app, &e.to_string()))),
    };
    let snapshot = app.hub.snapshot().await;
    let loaded = {
        let (app, snapshot, key) = (app.clone(), snapshot.clone(), key.clone());
        tokio::task::spawn_blocking(move || history::load(&app, &snapshot, &key, window)).await
    };
    match loaded {
        Ok(Ok(Some(h))) => (StatusCode::OK, Html(render(&app, &snapshot, &h))),
        Ok(Ok(None)) => (
            StatusCode::NOT_FOUND,
            Html(message(
                &app,
                &format!(
                    "No target job={:?} instance={:?}: it is not configured and has no history.",
                    key.0, key.1
                ),
            )),
        ),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Html(message(&app, &e.to_string())),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Html(message(&app, &e.to_string())),
        ),
    }
}

fn message(app: &App, text: &str) -> String {
    format!(
        "{}<p>{}</p></body></html>\n",
        head(&Chrome::of(app), "sonde: target", Some(30)),
        esc(text)
    )
}

pub fn render(app: &App, snapshot: &Snapshot, h: &history::TargetHistory) -> String {
    let key = (h.job.clone(), h.instance.clone());
    let chrome = Chrome::of(app);
    let mut out = head(&chrome, &format!("{} · {}", h.job, h.instance), Some(10));
    let q = esc(target_link(&h.job, &h.instance).trim_start_matches("/target?"));
    let _ = write!(
        out,
        r#"<p id="state" data-state="{}">{} <span class="muted">job <a href="/targets?job={}"><code>{}</code></a>{} · badges: <img alt="status" src="/badge/status.svg?{q}"> <img alt="uptime" src="/badge/uptime.svg?{q}&amp;window=24h"></span></p>"#,
        h.state.as_str(),
        state_badge(h.state),
        esc(&url::form_urlencoded::byte_serialize(h.job.as_bytes()).collect::<String>()),
        esc(&h.job),
        if chrome.public {
            String::new()
        } else {
            format!(r#" · <a href="/api/v1/targets/history?{q}">JSON</a>"#)
        },
    );

    if let Some(window) = super::view::target(snapshot, &key, crate::fleet::now_ms()).in_maintenance
    {
        let _ = write!(
            out,
            r#"<p id="maintenance"><span class="badge missing">MAINTENANCE</span> window <code>{}</code>: still probed, left out of uptime, shipped alerts quiet</p>"#,
            esc(&window)
        );
    }
    out.push_str("<h2>Uptime</h2><div class=\"scroll\"><table class=\"uptimes\"><tr>");
    for (name, _, _) in &h.uptimes {
        let _ = write!(out, "<th>{name}</th>");
    }
    out.push_str("</tr><tr>");
    for (name, d, u) in &h.uptimes {
        let _ = write!(
            out,
            r#"<td class="uptime" data-window="{name}" title="up {} · degraded {} · down {} · missing {}">{}</td>"#,
            svg::human_duration(d.up),
            svg::human_duration(d.degraded),
            svg::human_duration(d.down),
            svg::human_duration(d.missing),
            svg::percent(*u)
        );
    }
    out.push_str("</tr></table></div>");

    let from = h.from_ms;
    let _ = write!(
        out,
        "<h2>Timeline, last {}</h2>{}",
        svg::human_duration(h.now_ms - from),
        svg::timeline(&h.timeline, from, h.now_ms, 900, 22)
    );

    out.push_str("<h2>Vantage points</h2><div class=\"side\">");
    let now = h.now_ms;
    let entry = snapshot.entries.get(&key);
    let views: Vec<_> = entry.map(|e| e.views.iter().collect()).unwrap_or_default();
    if views.is_empty() {
        out.push_str("<p class=\"muted\">No agent has reported on this target yet.</p>");
    }
    // A published page numbers the vantage points instead of naming them.
    let shown_name = |i: usize, agent: &str| {
        if chrome.public {
            format!("vantage point {}", i + 1)
        } else {
            agent.to_string()
        }
    };
    for (i, (agent, view)) in views.into_iter().enumerate() {
        let fresh = history::is_fresh(snapshot, &h.job, view.timestamp_ms, now);
        let maintenance = snapshot.agent_maintenance(agent, now);
        let (class, word) = match (fresh, view.success) {
            _ if maintenance.is_some() => ("missing", "NOT COUNTED"),
            (false, _) => ("missing", "STALE"),
            (true, true) => ("up", "OK"),
            (true, false) => ("down", "FAIL"),
        };
        let labels = snapshot
            .agents
            .get(&**agent)
            .filter(|_| !chrome.public)
            .map(|a| {
                a.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let _ = write!(
            out,
            r#"<div class="view" data-agent="{a}" data-result="{word}"><b>{a}</b> <span class="badge {class}">{word}</span>{window}<br><span class="muted">{labels}</span><br>{age} ago, took {took}{failure}{trace}</div>"#,
            window = match &maintenance {
                Some(w) if !chrome.public => format!(
                    r#"<br><span class="muted">agent in maintenance ({}): its result does not count</span>"#,
                    esc(w)
                ),
                Some(_) =>
                    r#"<br><span class="muted">in maintenance: its result does not count</span>"#
                        .to_string(),
                None => String::new(),
            },
            a = esc(&shown_name(i, agent)),
            labels = esc(&labels),
            age = svg::human_duration(now - view.timestamp_ms),
            took = svg::seconds(view.duration_seconds),
            failure = if view.failure.is_empty() {
                String::new()
            } else {
                format!(r#"<br><span class="failure">{}</span>"#, esc(&view.failure))
            },
            trace = match (&view.trace, view.success) {
                (Some(t), false) => super::trace::html(t),
                _ => String::new(),
            },
        );
    }
    out.push_str("</div>");

    out.push_str("<h2>Response time</h2>");
    if h.latency.is_empty() {
        out.push_str("<p class=\"muted\">No probes recorded in this window.</p>");
    } else {
        let renamed;
        let series = if chrome.public {
            renamed = h
                .latency
                .iter()
                .enumerate()
                .map(|(i, (_, b))| (shown_name(i, ""), b.clone()))
                .collect::<Vec<_>>();
            &renamed
        } else {
            &h.latency
        };
        out.push_str(&svg::latency_chart(series, from, now, 900, 220));
        out.push_str("<p class=\"legend\">");
        for (i, (agent, _)) in series.iter().enumerate() {
            let _ = write!(
                out,
                r#"<span style="color:{}">■</span> {} &nbsp; "#,
                svg::line_colour(i),
                esc(agent)
            );
        }
        out.push_str("</p><p class=\"muted\">Average response time per minute (per hour beyond two days) of each agent; red dots: minutes with failed probes.</p>");
    }

    out.push_str("<h2>Incidents</h2>");
    if h.events.is_empty() {
        out.push_str("<p class=\"muted\">No state change recorded.</p>");
    } else {
        out.push_str("<div class=\"scroll\"><table class=\"events\"><tr><th>when</th><th>became</th><th>from</th><th>agents (succeeding / fresh)</th><th>reasons</th></tr>");
        // Newest first, the aggregator's gaps among the changes where they fell.
        let mut gaps = h.gaps.iter().rev().peekable();
        for e in &h.events {
            while let Some(g) = gaps.next_if(|g| g.to_ms > e.event.timestamp_ms) {
                gap_row(&mut out, g, now);
            }
            let reasons = e.event.reasons();
            let failing: Vec<String> = e
                .event
                .views
                .iter()
                .filter(|v| !v.success && v.fresh && !chrome.public)
                .map(|v| esc(&v.agent))
                .collect();
            let _ = write!(
                out,
                r#"<tr class="event" data-state="{state}"><td>{when} <span class="muted">({ago} ago)</span></td><td>{badge}</td><td>{from}</td><td>{s} / {a}{failing}</td><td class="reasons">{reasons}</td></tr>"#,
                state = e.event.state.as_str(),
                when = svg::utc(e.event.timestamp_ms),
                ago = svg::human_duration(now - e.event.timestamp_ms),
                badge = state_badge(e.event.state),
                from = e.previous.map(state_badge).unwrap_or_default(),
                s = e.event.succeeding,
                a = e.event.agents,
                failing = if failing.is_empty() {
                    String::new()
                } else {
                    format!(
                        r#"<br><span class="muted">failing: {}</span>"#,
                        failing.join(", ")
                    )
                },
                reasons = reasons
                    .iter()
                    .map(|r| esc(r))
                    .collect::<Vec<_>>()
                    .join("<br>"),
            );
        }
        for g in gaps {
            gap_row(&mut out, g, now);
        }
        out.push_str("</table></div>");
    }
    out.push_str("</body></html>\n");
    out
}

/// A time the aggregator was not running: not a change of the target's state, and left
/// out of its uptime.
fn gap_row(out: &mut String, g: &Gap, now: i64) {
    let _ = write!(
        out,
        r#"<tr class="gap" data-from-ms="{}" data-to-ms="{}"><td>{} <span class="muted">({} ago)</span></td><td colspan="4" class="muted">aggregator not running from {} to {} ({}): the target's state is unknown then and counts neither way in its uptime</td></tr>"#,
        g.from_ms,
        g.to_ms,
        svg::utc(g.to_ms),
        svg::human_duration(now - g.to_ms),
        svg::utc(g.from_ms),
        svg::utc(g.to_ms),
        svg::human_duration(g.to_ms - g.from_ms),
    );
}
