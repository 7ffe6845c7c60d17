//! `/`: a server-rendered status page: jobs, targets with their merged and per-agent
//! state, agents, missing jobs and remote-write queues. No JavaScript; it refreshes
//! itself every few seconds.

use super::svg::{self, esc};
use super::view;
use crate::app::App;
use crate::fleet::assignment::AssignmentStatus;
use crate::history::{self, HistoryState};
use axum::extract::State;
use axum::response::Html;
use sonde_proto::config::Labels;
use std::fmt::Write;
use std::sync::Arc;

/// `name="value", …`, as PromQL writes a selector.
fn labels(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The top of every page: styles, a self-refresh every `refresh` seconds, and links.
pub fn head(title: &str, refresh: u32, config: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}"><title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}} h1{{margin:0 0 .2rem}} h2{{margin-top:1.6rem}}
table{{border-collapse:collapse;width:100%;font-size:.9rem}} th,td{{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}}
th{{background:#f4f4f4}} .badge{{padding:.1rem .4rem;border-radius:.3rem;font-weight:600;font-size:.8rem}}
.up{{background:#d4f5dc;color:#135c25}} .down{{background:#fbd5d5;color:#8a1111}} .missing{{background:#eee;color:#555}}
.degraded{{background:#fdf0c4;color:#7a5800}} .muted{{color:#777}} code{{font-size:.85rem}} a{{color:#1a5fb4}}
.grid{{display:flex;flex-wrap:wrap;gap:.6rem}} .tile{{border:1px solid #ddd;border-radius:.4rem;padding:.4rem .6rem;min-width:9rem}}
.uptimes td{{font-size:1.1rem;font-weight:600}} .side{{display:flex;flex-wrap:wrap;gap:.8rem}} .side>div{{flex:1 1 16rem;border:1px solid #ddd;border-radius:.4rem;padding:.5rem}}
.trace{{font-family:monospace;font-size:.8rem;margin:.4rem 0;padding-left:1.4rem}} .path{{font-family:monospace;font-size:.8rem;width:auto}}
</style></head><body>
<h1>{title}</h1><p class="muted">sonde {version} · config {config} · <a href="/">status</a> · <a href="/fleet">fleet</a> · <a href="/metrics">/metrics</a> · <a href="/api/v1/targets">/api/v1/targets</a> · <a href="/api/v1/jobs">/api/v1/jobs</a> · <a href="/api/v1/agents">/api/v1/agents</a></p>
"#,
        title = esc(title),
        version = env!("CARGO_PKG_VERSION"),
        config = esc(config),
    )
}

/// What the pages say the config is.
pub fn config_name(app: &App) -> String {
    app.config_file
        .as_ref()
        .map_or("built-in all-in-one".to_string(), |p| {
            p.display().to_string()
        })
}

/// A state as a coloured word.
pub fn state_badge(state: HistoryState) -> String {
    let s = state.as_str();
    format!("<span class=\"badge {s}\">{}</span>", s.to_uppercase())
}

/// The per-target page of `job`/`instance`.
pub fn target_link(job: &str, instance: &str) -> String {
    format!(
        "/target?job={}&instance={}",
        url::form_urlencoded::byte_serialize(job.as_bytes()).collect::<String>(),
        url::form_urlencoded::byte_serialize(instance.as_bytes()).collect::<String>()
    )
}

pub async fn page(State(app): State<Arc<App>>) -> Html<String> {
    let snapshot = app.hub.snapshot().await;
    let now = crate::fleet::now_ms();
    let since = now - TIMELINE_MS;
    let changes = {
        let history = app.outputs.history();
        tokio::task::spawn_blocking(move || {
            Ok::<_, crate::storage::StoreError>((
                history.all_state_changes(since)?,
                history.gaps(since)?,
            ))
        })
        .await
    };
    let (changes, gaps) = match changes {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "status page: cannot read the target history");
            Default::default()
        }
        Err(_) => Default::default(),
    };
    Html(render(&app, &snapshot, &changes, &gaps, now))
}

/// What the main page's timelines cover.
const TIMELINE_MS: i64 = 86_400_000;

pub fn render(
    app: &App,
    snapshot: &crate::hub::Snapshot,
    changes: &history::ChangesByTarget,
    gaps: &[history::Gap],
    now: i64,
) -> String {
    let jobs = view::jobs(snapshot, now);
    let targets = view::targets(snapshot, now);
    let agents = view::agents(snapshot, now);
    let mut h = head("sonde aggregator", 5, &config_name(app));
    let reload = app
        .reload_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let (false, Some((at, why))) = (reload.successful, &reload.last_failure) {
        let _ = write!(
            h,
            r#"<p id="reload-failed" class="badge down" style="display:block;padding:.6rem">The last config reload failed ({} ago); the aggregator runs on the config loaded {} ago. {}</p>"#,
            svg::human_duration(now - at),
            svg::human_duration(now - reload.last_success_ms),
            esc(why)
        );
    }

    let missing: Vec<(&str, &str)> = jobs
        .iter()
        .filter(|j| j.missing)
        .map(|j| (j.job, j.why.as_str()))
        .collect();
    h.push_str("<h2>Missing jobs</h2>");
    if missing.is_empty() {
        h.push_str("<p class=\"muted\">None: every job has fresh results.</p>");
    } else {
        h.push_str("<p>");
        for (m, why) in &missing {
            let _ = write!(
                h,
                "<span class=\"badge down\">{}</span> <span class=\"muted\">{}</span><br>",
                esc(m),
                esc(why)
            );
        }
        h.push_str("</p>");
    }

    h.push_str("<h2>Jobs</h2><table><tr><th>job</th><th>module</th><th>interval</th><th>timeout</th><th>quorum</th><th>agents</th><th>targets</th><th>state</th></tr>");
    for j in &jobs {
        let class = match j.status {
            "ok" => "up",
            "down" | "missing" => "down",
            "degraded" => "degraded",
            _ => "missing",
        };
        let state = format!(
            "<span class=\"badge {class}\">{}</span> <span class=\"muted why\">{}</span>",
            esc(&j.status.to_uppercase()),
            esc(&j.why)
        );
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{state}</td></tr>",
            esc(j.job),
            esc(match &j.settings {
                Some(c) if !j.local => c.module,
                _ => "(agent-local job)",
            }),
            esc(j.settings.as_ref().map_or("", |c| &c.interval)),
            esc(j.settings.as_ref().map_or("", |c| &c.timeout)),
            esc(j.settings.as_ref().map_or("", |c| &c.quorum)),
            esc(&{
                let l = j
                    .settings
                    .as_ref()
                    .map(|c| labels(c.agents))
                    .unwrap_or_default();
                if l.is_empty() { "all".into() } else { l }
            }),
            j.targets,
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Targets</h2><table><tr><th>job</th><th>instance</th><th>labels</th><th>state</th><th>agents (succeeding / fresh)</th><th>last 24 h</th><th>uptime 24 h</th><th>per agent</th></tr>");
    for t in &targets {
        let (job, instance) = (t.job, t.instance);
        let state = t.history_state;
        let target_changes = changes
            .get(&(job.to_string(), instance.to_string()))
            .map_or(&[][..], Vec::as_slice);
        let since = now - TIMELINE_MS;
        let timeline = history::segments(target_changes, gaps, since, now);
        let uptime = history::durations(target_changes, gaps, since, now).uptime();
        let mut per_agent = String::new();
        for v in &t.views {
            let ok = v.success;
            let fresh = v.fresh != Some(false);
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
                esc(v.agent),
                v.age_seconds,
                v.duration_seconds,
                if fresh { "" } else { ", stale" },
                if v.failure.is_empty() {
                    String::new()
                } else {
                    format!(" <span class=\"muted\">— {}</span>", esc(v.failure))
                },
            );
        }
        for n in &t.refused {
            let _ = write!(
                per_agent,
                "<div class=\"refused\"><span class=\"badge down\">REFUSED</span> <b>{}</b> <code>{}</code> <span class=\"muted\">{:.1}s ago — {}</span></div>",
                esc(n.agent),
                esc(n.reason),
                n.age_seconds,
                esc(n.detail),
            );
        }
        if per_agent.is_empty() {
            per_agent.push_str("<span class=\"muted\">no result yet</span>");
        }
        let _ = write!(
            h,
            "<tr class=\"target\" data-job=\"{job_attr}\" data-instance=\"{instance_attr}\" data-state=\"{state_name}\"><td>{}</td><td><a href=\"{}\"><code>{}</code></a></td><td><code>{}</code></td><td>{}</td><td>{} / {}</td><td>{}</td><td class=\"uptime\">{}</td><td>{per_agent}</td></tr>",
            esc(job),
            esc(&target_link(job, instance)),
            esc(instance),
            esc(&labels(&t.labels)),
            state_badge(state),
            t.succeeding,
            t.agents,
            svg::timeline(&timeline, since, now, 240, 14),
            svg::percent(uptime),
            job_attr = esc(job),
            instance_attr = esc(instance),
            state_name = state.as_str(),
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Agents</h2><table><tr><th>agent</th><th>labels</th><th>state</th><th>version</th><th>checks</th><th>assignment</th></tr>");
    for a in &agents {
        let state = if a.connected {
            "<span class=\"badge up\">CONNECTED</span>"
        } else if a.up {
            "<span class=\"badge missing\">RECONNECTING</span>"
        } else {
            "<span class=\"badge down\">GONE</span>"
        };
        let assignment = match a.assignment {
            AssignmentStatus::Refused { .. } => format!(
                "<span class=\"badge down\">REFUSED</span> {}",
                esc(&a.assignment.text())
            ),
            _ => esc(&a.assignment.text()),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td><code>{}</code></td><td>{state}</td><td>{}</td><td>{}</td><td>{assignment}</td></tr>",
            esc(a.agent),
            esc(&labels(a.labels)),
            esc(a.version),
            a.checks,
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
