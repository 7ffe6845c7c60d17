//! `/`: the status page: a summary header (all up, degraded or down, with counts), the
//! jobs, and the targets with a problem (a capped list); every target is reached by
//! search and pages (`/targets`, see [`super::targets`]). The page stays the same size
//! whatever the number of targets, reads without JavaScript, and keeps itself current
//! with a few lines of it asking `/api/v1/status` for what changed.

use super::live::Live;
use super::page::{self, Chrome, LIVE_SCRIPT, labels, summary_header};
use super::svg::{self, esc};
use super::targets::{self, StateFilter};
use super::view::{self, Summary};
use crate::app::App;
use crate::fleet::assignment::AssignmentStatus;
use crate::history::HistoryState;
use crate::hub::Snapshot;
use axum::extract::{Extension, State};
use axum::response::Html;
use std::fmt::Write;
use std::sync::Arc;

/// Targets with a problem listed on `/`; the rest are a click away.
pub const PROBLEMS_SHOWN: usize = 50;
/// Jobs and agents listed on `/` before "and N more".
const ROWS_SHOWN: usize = 200;

pub async fn page(
    State(app): State<Arc<App>>,
    Extension(live): Extension<Arc<Live>>,
) -> Html<String> {
    let snapshot = app.hub.snapshot().await;
    let now = crate::fleet::now_ms();
    let chrome = Chrome::of(&app);
    let states = view::target_states(&snapshot);
    let version = live.observe(&snapshot, &states, None, now).version;
    let problems: Vec<&(String, String)> = StateFilter::Problems
        .ordered(&states)
        .into_iter()
        .take(PROBLEMS_SHOWN)
        .collect();
    let rows = targets::load_rows(&app, &snapshot, &problems, now).await;
    Html(render(
        &app, &chrome, &snapshot, &states, &rows, version, now,
    ))
}

pub fn render(
    app: &App,
    chrome: &Chrome,
    snapshot: &Snapshot,
    states: &[(&(String, String), HistoryState)],
    problem_rows: &[targets::Row<'_>],
    version: u64,
    now: i64,
) -> String {
    let summary = Summary::of(snapshot, states);
    let mut h = page::head(chrome, &chrome.title, None);
    let _ = write!(h, r#"<main id="live" data-version="{version}">"#);
    if !chrome.public {
        reload_banner(&mut h, app, now);
    }
    h.push_str(&summary_header(&summary));
    h.push_str(r#"<p id="stale" class="muted" hidden>Much has changed since this page was served: <a href="">reload it</a>.</p>"#);

    let problems = summary.down + summary.degraded + summary.missing;
    let _ = write!(
        h,
        r#"<h2>Problems</h2>{}"#,
        targets::search_form("", None, StateFilter::All)
    );
    if problems == 0 {
        h.push_str(r#"<p class="muted" id="no-problems">None: every target is up.</p>"#);
    } else {
        let _ = write!(
            h,
            r#"<p class="muted">{shown} of {problems} targets down, degraded or missing, the down ones first · <a href="/targets?state=problems">all of them</a> · <a href="/targets">all {all} targets</a></p>"#,
            shown = problem_rows.len(),
            all = summary.targets,
        );
        targets::table(&mut h, chrome, problem_rows, "problems");
    }

    jobs_table(&mut h, chrome, snapshot, now);
    if !chrome.public {
        agents_table(&mut h, snapshot, now);
        remote_write_table(&mut h, app);
    }
    h.push_str("</main>");
    h.push_str(LIVE_SCRIPT);
    h.push_str("</body></html>\n");
    h
}

fn reload_banner(h: &mut String, app: &App, now: i64) {
    let reload = app
        .reload_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let (false, Some((at, why))) = (reload.successful, &reload.last_failure) {
        let _ = write!(
            h,
            r#"<p id="reload-failed" class="badge down" style="display:block;padding:.6rem;white-space:normal">The last config reload failed ({} ago); the aggregator runs on the config loaded {} ago. {}</p>"#,
            svg::human_duration(now - at),
            svg::human_duration(now - reload.last_success_ms),
            esc(why)
        );
    }
}

fn jobs_table(h: &mut String, chrome: &Chrome, snapshot: &Snapshot, now: i64) {
    let jobs = view::jobs(snapshot, now);
    h.push_str(r#"<h2>Jobs</h2><div class="scroll"><table id="jobs"><tr><th>job</th><th class="wide">module</th><th class="wide">interval</th>"#);
    if !chrome.public {
        h.push_str(r#"<th class="wide">quorum</th><th class="wide">agents</th>"#);
    }
    h.push_str("<th>targets</th><th>state</th></tr>");
    for j in jobs.iter().take(ROWS_SHOWN) {
        let class = match j.status {
            "ok" => "up",
            "down" | "missing" => "down",
            "degraded" => "degraded",
            _ => "missing",
        };
        let _ = write!(
            h,
            r#"<tr data-job-row="{job}"><td><a href="/targets?job={job_q}">{job}</a></td><td class="wide">{module}</td><td class="wide">{interval}</td>"#,
            job = esc(j.job),
            job_q =
                esc(&url::form_urlencoded::byte_serialize(j.job.as_bytes()).collect::<String>()),
            module = esc(match &j.settings {
                Some(c) if !j.local => c.module,
                _ => "(agent-local job)",
            }),
            interval = esc(j.settings.as_ref().map_or("", |c| &c.interval)),
        );
        if !chrome.public {
            let selector = j
                .settings
                .as_ref()
                .map(|c| labels(c.agents))
                .unwrap_or_default();
            let _ = write!(
                h,
                r#"<td class="wide">{}</td><td class="wide"><code>{}</code></td>"#,
                esc(j.settings.as_ref().map_or("", |c| &c.quorum)),
                esc(if selector.is_empty() {
                    "all"
                } else {
                    &selector
                }),
            );
        }
        // A missing job's reason names the agents its selector matches.
        let why = if chrome.public && j.status == "missing" {
            "no fresh result".to_string()
        } else {
            j.why.clone()
        };
        let _ = write!(
            h,
            r#"<td>{}</td><td><span class="state"><span class="badge {class}">{}</span></span> <span class="muted why">{}</span></td></tr>"#,
            j.targets,
            esc(&j.status.to_uppercase()),
            esc(&why),
        );
    }
    h.push_str("</table></div>");
    if jobs.len() > ROWS_SHOWN {
        let _ = write!(
            h,
            r#"<p class="muted">and {} more jobs: search them above.</p>"#,
            jobs.len() - ROWS_SHOWN
        );
    }
}

fn agents_table(h: &mut String, snapshot: &Snapshot, now: i64) {
    let agents = view::agents(snapshot, now);
    h.push_str(r#"<h2>Agents</h2><div class="scroll"><table id="agents"><tr><th>agent</th><th class="wide">labels</th><th>state</th><th class="wide">version</th><th>checks</th><th class="wide">assignment</th></tr>"#);
    for a in agents.iter().take(ROWS_SHOWN) {
        let mut state = if a.connected {
            "<span class=\"badge up\">CONNECTED</span>"
        } else if a.up {
            "<span class=\"badge missing\">RECONNECTING</span>"
        } else {
            "<span class=\"badge down\">GONE</span>"
        }
        .to_string();
        if let Some(window) = &a.in_maintenance {
            state += &super::page::agent_maintenance_badge(window);
        }
        let assignment = match a.assignment {
            AssignmentStatus::Refused { .. } => format!(
                "<span class=\"badge down\">REFUSED</span> {}",
                esc(&a.assignment.text())
            ),
            _ => esc(&a.assignment.text()),
        };
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td class="wide"><code>{}</code></td><td>{state}</td><td class="wide">{}</td><td>{}</td><td class="wide">{assignment}</td></tr>"#,
            esc(a.agent),
            esc(&labels(a.labels)),
            esc(a.version),
            a.checks,
        );
    }
    h.push_str("</table></div>");
    if agents.len() > ROWS_SHOWN {
        let _ = write!(
            h,
            r#"<p class="muted">and {} more agents: see <a href="/fleet">the fleet</a>.</p>"#,
            agents.len() - ROWS_SHOWN
        );
    }
}

fn remote_write_table(h: &mut String, app: &App) {
    h.push_str("<h2>Remote write</h2>");
    let writers = app.outputs.writers();
    if writers.is_empty() {
        h.push_str("<p class=\"muted\">No remote_write endpoint configured: Prometheus can scrape <a href=\"/metrics\">/metrics</a> instead.</p>");
        return;
    }
    h.push_str(r#"<div class="scroll"><table><tr><th>name</th><th class="wide">url</th><th>queued samples</th><th>sent</th><th>dropped</th><th>last error</th></tr>"#);
    for w in writers {
        let s = w.status();
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td class="wide"><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&s.name),
            esc(&s.url),
            s.queued_samples,
            s.sent_samples,
            s.dropped_samples,
            esc(s.last_error.as_deref().unwrap_or("")),
        );
    }
    h.push_str("</table></div>");
}
