//! `/targets?q=&job=&state=&page=`: every target, found by search and read a hundred
//! at a time, each with its state, its last 24 hours as half-hour bars, its uptime and
//! what its agents found. The rows of `/`'s problem list are drawn the same way.

use super::heartbeat;
use super::live::Live;
use super::page::{self, Chrome, LIVE_SCRIPT, labels, state_badge, summary_header, target_link};
use super::svg::{self, esc};
use super::view::{self, Summary, TargetView};
use crate::app::App;
use crate::history::{self, Gap, HistoryState};
use crate::hub::Snapshot;
use axum::extract::{Extension, Query, State};
use axum::response::Html;
use serde::Deserialize;
use std::fmt::Write;
use std::sync::Arc;

/// Rows per page.
pub const PAGE_SIZE: usize = 100;
/// What the bars and the uptime cover.
const DAY_MS: i64 = 86_400_000;

/// Which states a list shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateFilter {
    All,
    /// Down, degraded or missing: down first.
    Problems,
    Only(HistoryState),
}

impl StateFilter {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("problems") => Self::Problems,
            Some(s) => HistoryState::parse(s).map_or(Self::All, Self::Only),
            None => Self::All,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::All => "",
            Self::Problems => "problems",
            Self::Only(s) => s.as_str(),
        }
    }

    /// The targets of `states` it keeps, in the order shown: by (job, instance), the
    /// problems down first, then degraded, then missing.
    pub fn ordered<'a>(
        self,
        states: &[(&'a (String, String), HistoryState)],
    ) -> Vec<&'a (String, String)> {
        let of = |want: HistoryState| {
            states
                .iter()
                .filter(move |(_, s)| *s == want)
                .map(|(k, _)| *k)
        };
        let mut out: Vec<&(String, String)> = match self {
            Self::All => states.iter().map(|(k, _)| *k).collect(),
            Self::Only(s) => of(s).collect(),
            Self::Problems => {
                let mut v: Vec<_> = of(HistoryState::Down).collect();
                v.sort();
                let mut d: Vec<_> = of(HistoryState::Degraded).collect();
                d.sort();
                let mut m: Vec<_> = of(HistoryState::Missing).collect();
                m.sort();
                v.extend(d);
                v.extend(m);
                return v;
            }
        };
        out.sort();
        out
    }
}

/// One row of a target list.
pub struct Row<'a> {
    pub view: TargetView<'a>,
    pub bars: Vec<Option<HistoryState>>,
    pub uptime: Option<f64>,
}

/// The rows of `keys`: their views now, and their last 24 hours from the history.
pub async fn load_rows<'a>(
    app: &App,
    snapshot: &'a Snapshot,
    keys: &[&'a (String, String)],
    now: i64,
) -> Vec<Row<'a>> {
    let history = app.outputs.history();
    let wanted: Vec<(String, String)> = keys.iter().map(|k| (*k).clone()).collect();
    let since = now - DAY_MS;
    let read = tokio::task::spawn_blocking(move || {
        let gaps = history.gaps(since)?;
        let changes = wanted
            .iter()
            .map(|(job, instance)| history.state_changes(job, instance, since))
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, crate::storage::StoreError>((gaps, changes))
    })
    .await;
    let (gaps, changes): (Vec<Gap>, Vec<Vec<(i64, HistoryState)>>) = match read {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "status page: cannot read the target history");
            Default::default()
        }
        Err(_) => Default::default(),
    };
    keys.iter()
        .enumerate()
        .map(|(i, key)| {
            let view = view::target(snapshot, key, now);
            let changes = changes.get(i).map_or(&[][..], Vec::as_slice);
            Row {
                bars: heartbeat::bars(changes, &gaps, Some(view.history_state), now),
                // Maintenance counts neither way, like the aggregator's gaps.
                uptime: history::durations(
                    changes,
                    &history::excluded(&gaps, &snapshot.maintenance_intervals(key, since, now)),
                    since,
                    now,
                )
                .uptime(),
                view,
            }
        })
        .collect()
}

/// The search form of `/` and `/targets`.
pub fn search_form(q: &str, job: Option<&str>, state: StateFilter) -> String {
    let mut options = String::new();
    for (value, text) in [
        ("", "any state"),
        ("problems", "down, degraded or missing"),
        ("down", "down"),
        ("degraded", "degraded"),
        ("missing", "missing"),
        ("up", "up"),
    ] {
        let _ = write!(
            options,
            r#"<option value="{value}"{}>{text}</option>"#,
            if state.name() == value {
                " selected"
            } else {
                ""
            }
        );
    }
    format!(
        r#"<form class="search" action="/targets" method="get" role="search"><input type="search" name="q" value="{q}" placeholder="instance, job or label" aria-label="search targets">{job}<select name="state" aria-label="state">{options}</select><button type="submit">Search</button></form>"#,
        q = esc(q),
        job = job
            .map(|j| format!(r#"<input type="hidden" name="job" value="{}">"#, esc(j)))
            .unwrap_or_default(),
    )
}

/// A table of target rows; `id` names it for the pages' tests and scripts.
pub fn table(out: &mut String, chrome: &Chrome, rows: &[Row<'_>], id: &str) {
    let _ = write!(
        out,
        r#"<div class="scroll"><table id="{id}"><tr><th>job</th><th>instance</th><th>state</th><th>last 24 h</th><th>uptime 24 h</th><th class="wide">{what}</th></tr>"#,
        what = if chrome.public { "why" } else { "agents" },
    );
    for row in rows {
        let t = &row.view;
        let _ = write!(
            out,
            r#"<tr class="target" data-job="{job}" data-instance="{instance}" data-state="{state}"><td>{job}</td><td><a href="{link}"><code>{instance}</code></a>{labels}</td><td class="state">{badge}</td><td>{bars}</td><td class="uptime">{uptime}</td><td class="wide">{detail}</td></tr>"#,
            job = esc(t.job),
            instance = esc(t.instance),
            state = t.history_state.as_str(),
            link = esc(&target_link(t.job, t.instance)),
            labels = if t.labels.is_empty() {
                String::new()
            } else {
                format!(
                    r#"<br><code class="muted">{}</code>"#,
                    esc(&labels(&t.labels))
                )
            },
            badge = match &t.in_maintenance {
                Some(window) => format!(
                    r#"{}<br><span class="muted" title="maintenance window {}">in maintenance</span>"#,
                    state_badge(t.history_state),
                    esc(window)
                ),
                None => state_badge(t.history_state),
            },
            bars = heartbeat::svg(&row.bars),
            uptime = svg::percent(row.uptime),
            detail = if chrome.public {
                public_detail(t)
            } else {
                agents_detail(t)
            },
        );
    }
    out.push_str("</table></div>");
}

/// What a published page says of a target's agents: how many succeed, and the reasons
/// of those that fail, without naming them.
fn public_detail(t: &TargetView<'_>) -> String {
    let mut reasons: Vec<&str> = Vec::new();
    for v in &t.views {
        if !v.success
            && v.fresh != Some(false)
            && v.agent_in_maintenance.is_none()
            && !v.failure.is_empty()
            && !reasons.contains(&v.failure)
        {
            reasons.push(v.failure);
        }
    }
    let mut out = format!("{} of {} vantage points succeeding", t.succeeding, t.agents);
    for r in reasons.iter().take(3) {
        let _ = write!(out, r#"<br><span class="muted">{}</span>"#, esc(r));
    }
    out
}

/// Every agent's last result for a target, for the operator.
fn agents_detail(t: &TargetView<'_>) -> String {
    let mut out = format!("{} / {} succeeding / fresh", t.succeeding, t.agents);
    for v in &t.views {
        let fresh = v.fresh != Some(false);
        let _ = write!(
            out,
            "<div>{} <b>{}</b> <span class=\"muted\">{:.1}s ago, took {}</span>{}</div>",
            if v.agent_in_maintenance.is_some() {
                "<span class=\"badge missing\">NOT COUNTED</span>"
            } else if !fresh {
                "<span class=\"badge missing\">STALE</span>"
            } else if v.success {
                "<span class=\"badge up\">OK</span>"
            } else {
                "<span class=\"badge down\">FAIL</span>"
            },
            esc(v.agent),
            v.age_seconds,
            svg::seconds(v.duration_seconds),
            match (&v.agent_in_maintenance, v.failure.is_empty()) {
                (Some(window), _) => format!(
                    " <span class=\"muted\">— agent in maintenance ({})</span>",
                    esc(window)
                ),
                (None, true) => String::new(),
                (None, false) => format!(" <span class=\"muted\">— {}</span>", esc(v.failure)),
            },
        );
    }
    for n in &t.refused {
        let _ = write!(
            out,
            "<div class=\"refused\"><span class=\"badge down\">REFUSED</span> <b>{}</b> <code>{}</code> <span class=\"muted\">{:.1}s ago — {}</span></div>",
            esc(n.agent),
            esc(n.reason),
            n.age_seconds,
            esc(n.detail),
        );
    }
    out
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    q: Option<String>,
    job: Option<String>,
    state: Option<String>,
    page: Option<String>,
}

/// True when `q` (lower case) is in the target's instance, job or a label's value.
fn matches(snapshot: &Snapshot, key: &(String, String), q: &str) -> bool {
    if q.is_empty() {
        return true;
    }
    let has = |s: &str| s.to_lowercase().contains(q);
    has(&key.0)
        || has(&key.1)
        || snapshot
            .targets
            .get(key)
            .is_some_and(|t| t.labels.iter().any(|(k, v)| has(k) || has(v)))
}

pub async fn page(
    State(app): State<Arc<App>>,
    Extension(live): Extension<Arc<Live>>,
    Query(query): Query<ListQuery>,
) -> Html<String> {
    let snapshot = app.hub.snapshot().await;
    let now = crate::fleet::now_ms();
    let chrome = Chrome::of(&app);
    let states = view::target_states(&snapshot);
    let version = live.observe(&snapshot, &states, None, now).version;
    let q = query.q.as_deref().unwrap_or("").trim().to_lowercase();
    let job = query.job.as_deref().filter(|j| !j.is_empty());
    let filter = StateFilter::parse(query.state.as_deref().filter(|s| !s.is_empty()));
    let found: Vec<&(String, String)> = filter
        .ordered(&states)
        .into_iter()
        .filter(|k| job.is_none_or(|j| k.0 == j) && matches(&snapshot, k, &q))
        .collect();
    let pages = found.len().div_ceil(PAGE_SIZE).max(1);
    let page_no = query
        .page
        .as_deref()
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, pages);
    let shown: Vec<&(String, String)> = found
        .iter()
        .skip((page_no - 1) * PAGE_SIZE)
        .take(PAGE_SIZE)
        .copied()
        .collect();
    let rows = load_rows(&app, &snapshot, &shown, now).await;

    let summary = Summary::of(&snapshot, &states);
    let mut h = page::head(&chrome, &format!("{} · targets", chrome.title), None);
    let _ = write!(h, r#"<main id="live" data-version="{version}">"#);
    h.push_str(&summary_header(&summary));
    let _ = write!(
        h,
        r#"<h2>Targets{}</h2>{}"#,
        job.map(|j| format!(" of job {}", esc(j)))
            .unwrap_or_default(),
        search_form(query.q.as_deref().unwrap_or(""), job, filter)
    );
    let link = |p: usize| {
        let mut params = url::form_urlencoded::Serializer::new(String::new());
        if !q.is_empty() {
            params.append_pair("q", query.q.as_deref().unwrap_or(""));
        }
        if let Some(j) = job {
            params.append_pair("job", j);
        }
        if filter != StateFilter::All {
            params.append_pair("state", filter.name());
        }
        params.append_pair("page", &p.to_string());
        format!("/targets?{}", params.finish())
    };
    let mut nav = format!(
        r#"<p class="pages" id="pages" data-found="{found}" data-page="{page_no}" data-pages="{pages}"><span>{found} {noun}, page {page_no} of {pages}</span>"#,
        found = found.len(),
        noun = if found.len() == 1 {
            "target"
        } else {
            "targets"
        },
    );
    if page_no > 1 {
        let _ = write!(
            nav,
            r#"<a href="{}">first</a><a href="{}" rel="prev">previous</a>"#,
            esc(&link(1)),
            esc(&link(page_no - 1))
        );
    }
    if page_no < pages {
        let _ = write!(
            nav,
            r#"<a href="{}" rel="next">next</a><a href="{}">last</a>"#,
            esc(&link(page_no + 1)),
            esc(&link(pages))
        );
    }
    nav.push_str("</p>");
    h.push_str(&nav);
    if rows.is_empty() {
        h.push_str(r#"<p class="muted">No target matches.</p>"#);
    } else {
        table(&mut h, &chrome, &rows, "targets");
        h.push_str(&nav);
    }
    h.push_str("</main>");
    h.push_str(LIVE_SCRIPT);
    h.push_str("</body></html>\n");
    Html(h)
}
