//! `/`: a server-rendered status page: jobs, targets with their merged and per-agent
//! state, agents, missing jobs and remote-write queues. No JavaScript; it refreshes
//! itself every few seconds.

use super::api::{agents_json, jobs_json, targets_json};
use crate::app::App;
use axum::extract::State;
use axum::response::Html;
use serde_json::Value;
use std::fmt::Write;
use std::sync::Arc;

fn esc(s: &str) -> String {
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

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn labels(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}=\"{}\"", text(v)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn state_badge(state: &str) -> String {
    let (class, label) = match state {
        "up" => ("up", "UP"),
        "down" => ("down", "DOWN"),
        _ => ("missing", "MISSING"),
    };
    format!("<span class=\"badge {class}\">{label}</span>")
}

pub async fn page(State(app): State<Arc<App>>) -> Html<String> {
    Html(render(&app, &*app.hub.snapshot().await))
}

pub fn render(app: &App, snapshot: &crate::hub::Snapshot) -> String {
    let jobs = jobs_json(snapshot);
    let targets = targets_json(snapshot);
    let agents = agents_json(snapshot);
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5"><title>sonde</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}} h1{{margin:0 0 .2rem}} h2{{margin-top:1.6rem}}
table{{border-collapse:collapse;width:100%;font-size:.9rem}} th,td{{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}}
th{{background:#f4f4f4}} .badge{{padding:.1rem .4rem;border-radius:.3rem;font-weight:600;font-size:.8rem}}
.up{{background:#d4f5dc;color:#135c25}} .down{{background:#fbd5d5;color:#8a1111}} .missing{{background:#eee;color:#555}}
.muted{{color:#777}} code{{font-size:.85rem}}
</style></head><body>
<h1>sonde aggregator</h1><p class="muted">version {} · config {} · <a href="/metrics">/metrics</a> · <a href="/api/v1/targets">/api/v1/targets</a> · <a href="/api/v1/jobs">/api/v1/jobs</a> · <a href="/api/v1/agents">/api/v1/agents</a></p>
"#,
        env!("CARGO_PKG_VERSION"),
        esc(&app
            .config_file
            .as_ref()
            .map_or("built-in all-in-one".to_string(), |p| p
                .display()
                .to_string())),
    );

    let missing: Vec<String> = jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["missing"] == Value::Bool(true))
        .map(|j| text(&j["job"]))
        .collect();
    h.push_str("<h2>Missing jobs</h2>");
    if missing.is_empty() {
        h.push_str("<p class=\"muted\">None: every job has fresh results.</p>");
    } else {
        h.push_str("<p>");
        for m in &missing {
            let _ = write!(h, "<span class=\"badge down\">{}</span> ", esc(m));
        }
        h.push_str("</p>");
    }

    h.push_str("<h2>Jobs</h2><table><tr><th>job</th><th>module</th><th>interval</th><th>timeout</th><th>quorum</th><th>agents</th><th>targets</th><th>state</th></tr>");
    for j in jobs.as_array().into_iter().flatten() {
        let state = if j["missing"] == Value::Bool(true) {
            "<span class=\"badge down\">MISSING</span>"
        } else {
            "<span class=\"badge up\">OK</span>"
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{state}</td></tr>",
            esc(&text(&j["job"])),
            esc(&if j["local"] == Value::Bool(true) {
                "(agent-local job)".to_string()
            } else {
                text(&j["module"])
            }),
            esc(&text(&j["interval"])),
            esc(&text(&j["timeout"])),
            esc(&text(&j["quorum"])),
            esc(&{
                let l = labels(&j["agents"]);
                if l.is_empty() { "all".into() } else { l }
            }),
            esc(&text(&j["targets"])),
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Targets</h2><table><tr><th>job</th><th>instance</th><th>labels</th><th>up</th><th>agents (succeeding / fresh)</th><th>per agent</th></tr>");
    for t in targets.as_array().into_iter().flatten() {
        let mut per_agent = String::new();
        for v in t["views"].as_array().into_iter().flatten() {
            let ok = v["success"] == Value::Bool(true);
            let fresh = v["fresh"] != Value::Bool(false);
            let _ = write!(
                per_agent,
                "<div>{} <b>{}</b> <span class=\"muted\">{:.1}s ago, took {:.3}s{}</span>{}</div>",
                if !fresh {
                    "<span class=\"badge missing\">STALE</span>"
                } else if ok {
                    "<span class=\"badge up\">OK</span>"
                } else {
                    "<span class=\"badge down\">FAIL</span>"
                },
                esc(&text(&v["agent"])),
                v["age_seconds"].as_f64().unwrap_or(0.0),
                v["duration_seconds"].as_f64().unwrap_or(0.0),
                if fresh { "" } else { ", stale" },
                match v["failure"].as_str() {
                    Some(f) if !f.is_empty() =>
                        format!(" <span class=\"muted\">— {}</span>", esc(f)),
                    _ => String::new(),
                },
            );
        }
        if per_agent.is_empty() {
            per_agent.push_str("<span class=\"muted\">no result yet</span>");
        }
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{} / {}</td><td>{per_agent}</td></tr>",
            esc(&text(&t["job"])),
            esc(&text(&t["instance"])),
            esc(&labels(&t["labels"])),
            state_badge(t["state"].as_str().unwrap_or("missing")),
            t["succeeding"],
            t["agents"],
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Agents</h2><table><tr><th>agent</th><th>labels</th><th>state</th><th>version</th><th>checks</th><th>assignment</th></tr>");
    for a in agents.as_array().into_iter().flatten() {
        let state = if a["connected"] == Value::Bool(true) {
            "<span class=\"badge up\">CONNECTED</span>"
        } else if a["up"] == Value::Bool(true) {
            "<span class=\"badge missing\">RECONNECTING</span>"
        } else {
            "<span class=\"badge down\">GONE</span>"
        };
        let status = &a["assignment"];
        let assignment = match status["state"].as_str() {
            Some("refused") => format!(
                "<span class=\"badge down\">REFUSED</span> {}",
                esc(&text(&status["text"]))
            ),
            _ => esc(&text(&status["text"])),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td>{state}</td><td>{}</td><td>{}</td><td>{assignment}</td></tr>",
            esc(&text(&a["agent"])),
            esc(&labels(&a["labels"])),
            esc(&text(&a["version"])),
            a["checks"],
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Remote write</h2>");
    let writers = app.outputs.writers();
    if writers.is_empty() {
        h.push_str("<p class=\"muted\">No remote_write endpoint configured: Prometheus can scrape <a href=\"/metrics\">/metrics</a> instead.</p>");
    } else {
        h.push_str("<table><tr><th>name</th><th>url</th><th>queued samples</th><th>sent</th><th>dropped</th><th>last error</th></tr>");
        for w in writers {
            let s = w.status();
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&s.name),
                esc(&s.url),
                s.queued_samples,
                s.sent_samples,
                s.dropped_samples,
                esc(s.last_error.as_deref().unwrap_or("")),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>\n");
    h
}
