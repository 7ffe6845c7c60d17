//! `/fleet`: every agent as a tile, grouped by its `region` label (one row each) and
//! `site` label (one group each): which vantage points are connected, reconnecting or
//! gone, at a glance and without a map.

use super::page::{Chrome, head};
use super::svg::{self, esc};
use crate::app::App;
use crate::fleet::now_ms;
use crate::hub::Snapshot;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Html;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

/// The labels agents are grouped by, outer first.
const GROUP_BY: [&str; 2] = ["region", "site"];

/// An agent's id and what the hub knows of it.
type Tile<'a> = (&'a String, &'a crate::hub::AgentSummary);

pub async fn page(State(app): State<Arc<App>>) -> (StatusCode, Html<String>) {
    let chrome = Chrome::of(&app);
    if chrome.public {
        // A published page names no agent.
        return (
            StatusCode::NOT_FOUND,
            Html(format!(
                "{}<p>The fleet is not shown on a public status page (status_page.public in the config).</p></body></html>\n",
                head(&chrome, &chrome.title, None)
            )),
        );
    }
    (
        StatusCode::OK,
        Html(render(&app, &*app.hub.snapshot().await)),
    )
}

pub fn render(app: &App, snapshot: &Snapshot) -> String {
    let now = now_ms();
    let grace = snapshot.config.missing_after;
    let mut h = head(&Chrome::of(app), "sonde fleet", Some(5));
    // region → site → agents.
    let mut groups: BTreeMap<&str, BTreeMap<&str, Vec<Tile<'_>>>> = BTreeMap::new();
    for (id, a) in &snapshot.agents {
        let label = |name: &str| a.labels.get(name).map_or("", String::as_str);
        groups
            .entry(label(GROUP_BY[0]))
            .or_default()
            .entry(label(GROUP_BY[1]))
            .or_default()
            .push((id, a));
    }
    let (mut connected, mut reconnecting, mut gone) = (0, 0, 0);
    for a in snapshot.agents.values() {
        match (a.connected, a.is_up(now, grace)) {
            (true, _) => connected += 1,
            (false, true) => reconnecting += 1,
            (false, false) => gone += 1,
        }
    }
    let _ = write!(
        h,
        r#"<p id="summary">{} agents: <span class="badge up">{connected} CONNECTED</span> <span class="badge missing">{reconnecting} RECONNECTING</span> <span class="badge down">{gone} GONE</span> <span class="muted">(grouped by the agents' <code>region</code> and <code>site</code> labels)</span></p>"#,
        snapshot.agents.len()
    );
    if groups.is_empty() {
        h.push_str("<p class=\"muted\">No agent has connected yet.</p>");
    }
    for (region, sites) in &groups {
        let _ = write!(
            h,
            r#"<h2 class="region" data-region="{r}">{}</h2>"#,
            if region.is_empty() {
                "no region label".to_string()
            } else {
                format!("region={}", esc(region))
            },
            r = esc(region),
        );
        for (site, agents) in sites {
            if !site.is_empty() || sites.len() > 1 {
                let _ = write!(
                    h,
                    "<h3 class=\"muted\">{}</h3>",
                    if site.is_empty() {
                        "no site label".to_string()
                    } else {
                        format!("site={}", esc(site))
                    }
                );
            }
            h.push_str("<div class=\"grid\">");
            for (id, a) in agents {
                let (class, word) = match (a.connected, a.is_up(now, grace)) {
                    (true, _) => ("up", "CONNECTED"),
                    (false, true) => ("missing", "RECONNECTING"),
                    (false, false) => ("down", "GONE"),
                };
                let maintenance = snapshot
                    .agent_maintenance(id, now)
                    .map(|w| super::page::agent_maintenance_badge(&w))
                    .unwrap_or_default();
                let others: Vec<String> = a
                    .labels
                    .iter()
                    .filter(|(k, _)| !GROUP_BY.contains(&k.as_str()))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let _ = write!(
                    h,
                    r#"<div class="tile agent {class}" data-agent="{a}" data-state="{word}"><b>{a}</b><br><span class="badge {class}">{word}</span>{maintenance}<br><span class="muted">{checks} checks · seen {seen} ago{skew}<br>{others}</span></div>"#,
                    a = esc(id),
                    checks = a.checks,
                    seen = svg::human_duration(now - a.last_seen_at(now)),
                    skew = a
                        .clock_skew_ms
                        .filter(|s| s.abs() >= 1000)
                        .map(|s| format!(" · clock {:+.1}s", s as f64 / 1000.0))
                        .unwrap_or_default(),
                    others = esc(&others.join(" ")),
                );
            }
            h.push_str("</div>");
        }
    }
    h.push_str("</body></html>\n");
    h
}
