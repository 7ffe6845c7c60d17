//! SLO reports over any window: `GET /api/v1/report` as JSON (`format=json`, the
//! default) or CSV (`format=csv`: one row per target; `format=csv&incidents=1`: one row
//! per incident), and `GET /report`, the same as a printable page.
//!
//! Parameters: `job` (all jobs when absent), `instance` (needs `job`), `from` and `to`
//! (RFC 3339 or unix seconds; by default the 30 days up to now). The counting is
//! [`crate::report`]'s, and every report states it.

use crate::app::App;
use crate::fleet::now_ms;
use crate::history::Gap;
use crate::hub::Snapshot;
use crate::report::csv::{self, NamedReport, seconds};
use crate::report::time::{self, format_ms};
use crate::report::{
    COUNTING, Change, InMaintenance, Input, MaintenanceIntervals, Window, target_report,
};
use crate::storage::{HistoryReader, StoreError};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::fmt::Write;
use std::sync::Arc;

/// The window when none is asked for.
const DEFAULT_WINDOW_MS: i64 = 30 * 86_400_000;

/// The maintenance windows the reports leave out of the counted time: those in force
/// (config and API) and the API windows deleted within the history's retention, as the
/// snapshot holds them.
struct SnapshotMaintenance(Arc<Snapshot>);

impl MaintenanceIntervals for SnapshotMaintenance {
    fn intervals(&self, job: &str, instance: &str, from_s: i64, to_s: i64) -> Vec<(i64, i64)> {
        let key = (job.to_string(), instance.to_string());
        self.0
            .maintenance_intervals(&key, from_s.saturating_mul(1000), to_s.saturating_mul(1000))
            .into_iter()
            // Whole seconds that cover the window: windows are set to the second anyway.
            .map(|(start, end)| (start.div_euclid(1000), (end + 999).div_euclid(1000)))
            .collect()
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ReportQuery {
    pub job: Option<String>,
    pub instance: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub format: Option<String>,
    pub incidents: Option<String>,
}

/// What is wrong with a report's query (answered with 400).
#[derive(Debug, thiserror::Error)]
pub enum ReportQueryError {
    #[error("from={0}")]
    From(time::BadTime),
    #[error("to={0}")]
    To(time::BadTime),
    #[error("to ({to}) is not after from ({from}); give a window that ends after it starts")]
    Empty { from: String, to: String },
    #[error("instance= needs job= too (see /api/v1/targets for both)")]
    InstanceWithoutJob,
    #[error("no job {job:?} is configured, reported or in the history; known jobs: {known}")]
    UnknownJob { job: String, known: String },
    #[error(
        "job {job:?} has no target {instance:?} configured, reported or in the history (see /api/v1/targets)"
    )]
    UnknownTarget { job: String, instance: String },
    #[error("format={0:?}: use json or csv")]
    Format(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Csv { incidents: bool },
}

/// A checked query.
struct Asked {
    job: Option<String>,
    instance: Option<String>,
    window: Window,
    format: Format,
}

impl ReportQuery {
    fn check(&self, now: i64) -> Result<Asked, ReportQueryError> {
        let given = |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(String::from);
        let to = match given(&self.to) {
            Some(t) => time::parse_ms(&t).map_err(ReportQueryError::To)?,
            None => now,
        };
        let from = match given(&self.from) {
            Some(f) => time::parse_ms(&f).map_err(ReportQueryError::From)?,
            None => to.saturating_sub(DEFAULT_WINDOW_MS),
        };
        if to <= from {
            return Err(ReportQueryError::Empty {
                from: format_ms(from),
                to: format_ms(to),
            });
        }
        let (job, instance) = (given(&self.job), given(&self.instance));
        if instance.is_some() && job.is_none() {
            return Err(ReportQueryError::InstanceWithoutJob);
        }
        let format = match given(&self.format).as_deref() {
            None | Some("json") => Format::Json,
            Some("csv") => Format::Csv {
                incidents: matches!(given(&self.incidents).as_deref(), Some("1" | "true")),
            },
            Some(other) => return Err(ReportQueryError::Format(other.chars().take(32).collect())),
        };
        Ok(Asked {
            job,
            instance,
            window: Window {
                from_ms: from,
                to_ms: to,
            },
            format,
        })
    }
}

/// Why a report could not be made.
enum Failed {
    Query(ReportQueryError),
    /// The history could not be read (the message says where and why).
    Store(String),
}

impl From<StoreError> for Failed {
    fn from(e: StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

/// The targets asked for: configured or reported now, or in the history.
fn targets(
    snapshot: &Snapshot,
    history: &dyn HistoryReader,
    job: Option<&str>,
    instance: Option<&str>,
) -> Result<Vec<(String, String)>, Failed> {
    let mut all: BTreeSet<(String, String)> = snapshot
        .targets
        .keys()
        .chain(snapshot.entries.keys())
        .filter(|(j, _)| job.is_none_or(|job| job == j))
        .cloned()
        .collect();
    all.extend(history.targets_in_history(job)?);
    if let Some(job) = job
        && all.is_empty()
        && !snapshot.jobs.contains_key(job)
    {
        let mut known: BTreeSet<String> = snapshot.jobs.keys().cloned().collect();
        known.extend(
            history
                .targets_in_history(None)?
                .into_iter()
                .map(|(j, _)| j),
        );
        let known: Vec<String> = known.into_iter().map(|j| format!("{j:?}")).collect();
        return Err(Failed::Query(ReportQueryError::UnknownJob {
            job: job.to_string(),
            known: if known.is_empty() {
                "none yet".into()
            } else {
                known.join(", ")
            },
        }));
    }
    if let (Some(job), Some(instance)) = (job, instance) {
        let key = (job.to_string(), instance.to_string());
        if !all.contains(&key) {
            return Err(Failed::Query(ReportQueryError::UnknownTarget {
                job: key.0,
                instance: key.1,
            }));
        }
        return Ok(vec![key]);
    }
    Ok(all.into_iter().collect())
}

/// Every asked target's report.
fn build(
    snapshot: &Snapshot,
    history: &dyn HistoryReader,
    maintenance: &dyn MaintenanceIntervals,
    asked: &Asked,
    now: i64,
) -> Result<Vec<NamedReport>, Failed> {
    let window = asked.window;
    let keys = targets(
        snapshot,
        history,
        asked.job.as_deref(),
        asked.instance.as_deref(),
    )?;
    let gaps: Vec<Gap> = history.gaps(window.from_ms)?;
    let (from_s, to_s) = (
        window.from_ms.div_euclid(1000),
        window.to_ms.div_euclid(1000) + 1,
    );
    let mut out = Vec::with_capacity(keys.len());
    for (job, instance) in keys {
        let changes: Vec<Change> = history
            .changes_between(&job, &instance, window.from_ms, window.to_ms)?
            .into_iter()
            .map(|e| Change {
                at_ms: e.timestamp_ms,
                state: e.state,
                reasons: e.reasons(),
            })
            .collect();
        let intervals = maintenance.intervals(&job, &instance, from_s, to_s);
        let report = target_report(
            Input {
                changes: &changes,
                gaps: &gaps,
                maintenance: &intervals,
                known_until_ms: now,
                objective: snapshot.config.slo.get(&job).copied(),
            },
            window,
        );
        out.push(NamedReport {
            job,
            instance,
            report,
        });
    }
    Ok(out)
}

/// Checks the query and builds the reports off the async threads.
async fn run(app: Arc<App>, q: ReportQuery) -> Result<(Asked, Vec<NamedReport>, i64), Failed> {
    let now = now_ms();
    let asked = q.check(now).map_err(Failed::Query)?;
    let snapshot = app.hub.snapshot().await;
    let history = app.outputs.history();
    let maintenance: Arc<dyn MaintenanceIntervals> =
        Arc::new(SnapshotMaintenance(snapshot.clone()));
    let joined = tokio::task::spawn_blocking(move || {
        build(&snapshot, &*history, &*maintenance, &asked, now).map(|r| (asked, r))
    })
    .await;
    match joined {
        Ok(Ok((asked, reports))) => Ok((asked, reports, now)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(Failed::Store(format!("the report's task failed: {e}"))),
    }
}

fn api_error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(json!({"status": "error", "errorType": kind, "error": message})),
    )
        .into_response()
}

/// `GET /api/v1/report`.
pub async fn api(State(app): State<Arc<App>>, Query(q): Query<ReportQuery>) -> Response {
    match run(app, q).await {
        Ok((asked, reports, now)) => match asked.format {
            Format::Json => Json(json!({
                "status": "success",
                "data": csv::report_json(asked.window.from_ms, asked.window.to_ms, now, &reports),
            }))
            .into_response(),
            Format::Csv { incidents } => (
                [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
                if incidents {
                    csv::incidents_csv(&reports)
                } else {
                    csv::targets_csv(&reports)
                },
            )
                .into_response(),
        },
        Err(Failed::Query(e)) => api_error(StatusCode::BAD_REQUEST, "bad_data", e.to_string()),
        Err(Failed::Store(e)) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot read the history: {e}"),
        ),
    }
}

/// `GET /report`: the printable page.
pub async fn page(State(app): State<Arc<App>>, Query(q): Query<ReportQuery>) -> Response {
    match run(app, q).await {
        Ok((asked, reports, now)) => Html(render(&asked, &reports, now)).into_response(),
        Err(Failed::Query(e)) => (
            StatusCode::BAD_REQUEST,
            Html(format!(
                "<!doctype html><title>Bad report query</title><p>{}</p>",
                esc(&e.to_string())
            )),
        )
            .into_response(),
        Err(Failed::Store(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Html(format!(
                "<!doctype html><title>Report failed</title><p>cannot read the history: {}</p>",
                esc(&e)
            )),
        )
            .into_response(),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A duration for people: `2 d 3 h`, `30 min`, `45 s`.
fn human(ms: i64) -> String {
    let s = ms.abs() / 1000;
    let sign = if ms < 0 { "−" } else { "" };
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    let text = if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min {sec} s")
    } else {
        format!("{} s", seconds(ms.abs()))
    };
    format!("{sign}{text}")
}

fn pct(p: Option<f64>) -> String {
    p.map_or("—".into(), |p| {
        format!("{} %", csv::percent((p * 1000.0).round() / 1000.0))
    })
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
h1{margin:0 0 .3rem} h2{margin-top:1.5rem;font-size:1.15rem}
table{border-collapse:collapse;width:100%;font-size:.85rem} th,td{text-align:left;padding:.25rem .45rem;border-bottom:1px solid #ccc;vertical-align:top}
th{background:#f2f2f2} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums} .muted{color:#666} .counting{font-size:.85rem;max-width:60rem}
.over{color:#8a1111;font-weight:600}
@media print{nav{display:none} body{margin:0;font-size:10pt} table{font-size:8.5pt} th{background:none;border-bottom:2px solid #000} tr{break-inside:avoid} a{color:inherit;text-decoration:none}}";

fn render(asked: &Asked, reports: &[NamedReport], now: i64) -> String {
    let scope = match (&asked.job, &asked.instance) {
        (Some(j), Some(i)) => format!("{j} · {i}"),
        (Some(j), None) => format!("job {j}"),
        _ => "all jobs".into(),
    };
    let (from, to) = (
        format_ms(asked.window.from_ms),
        format_ms(asked.window.to_ms),
    );
    let mut query = format!("from={}&to={}", enc(&from), enc(&to));
    if let Some(j) = &asked.job {
        let _ = write!(query, "&job={}", enc(j));
    }
    if let Some(i) = &asked.instance {
        let _ = write!(query, "&instance={}", enc(i));
    }
    let mut h = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>SLO report: {title}</title><style>{STYLE}</style></head><body>\n\
         <nav class=\"muted\"><a href=\"/\">status</a> · <a href=\"/api/v1/report?{q}\">JSON</a> · <a href=\"/api/v1/report?{q}&amp;format=csv\">CSV</a> · <a href=\"/api/v1/report?{q}&amp;format=csv&amp;incidents=1\">incidents CSV</a></nav>\n\
         <h1>SLO report: {title}</h1>\n<p>From <time>{from}</time> to <time>{to}</time> ({span}) · made <time>{made}</time></p>\n\
         <p class=\"counting\"><strong>How this is counted.</strong> {counting}</p>\n",
        title = esc(&scope),
        q = esc(&query),
        span = human(asked.window.to_ms - asked.window.from_ms),
        made = format_ms(now),
        counting = esc(COUNTING),
    );
    h.push_str("<h2>Targets</h2>\n<table id=\"targets\"><thead><tr><th>job</th><th>instance</th><th class=\"n\">availability</th><th class=\"n\">objective</th><th class=\"n\">counted</th><th class=\"n\">down</th><th class=\"n\">missing</th><th class=\"n\">maintenance</th><th class=\"n\">no data</th><th class=\"n\">budget</th><th class=\"n\">used</th><th class=\"n\">remaining</th><th class=\"n\">burned</th><th class=\"n\">incidents</th></tr></thead><tbody>\n");
    for n in reports {
        let r = &n.report;
        let b = r.error_budget;
        let over = b.is_some_and(|b| b.remaining_ms < 0.0);
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td><code>{}</code>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\" data-seconds=\"{}\">{}</td><td class=\"n\" data-seconds=\"{}\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n{}\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&n.job),
            esc(&n.instance),
            r.data_starts_ms.map_or(String::new(), |at| format!(
                "<br><span class=\"muted\">history starts {}</span>",
                format_ms(at)
            )),
            pct(r.availability_percent),
            b.map_or("—".into(), |b| format!(
                "{} %",
                csv::percent(b.objective_percent)
            )),
            seconds(r.counted_ms),
            human(r.counted_ms),
            seconds(r.down_ms),
            human(r.down_ms),
            human(r.missing_ms),
            human(r.maintenance_ms),
            human(r.no_data_ms),
            b.map_or("—".into(), |b| human(b.allowed_ms.round() as i64)),
            b.map_or("—".into(), |b| human(b.used_ms)),
            if over { " over" } else { "" },
            b.map_or("—".into(), |b| human(b.remaining_ms.round() as i64)),
            pct(b.and_then(|b| b.burned_percent)),
            r.incidents.len(),
        );
    }
    h.push_str("</tbody></table>\n");
    let incidents: Vec<_> = reports
        .iter()
        .flat_map(|n| n.report.incidents.iter().map(move |i| (n, i)))
        .collect();
    if incidents.is_empty() {
        h.push_str("<h2>Incidents</h2>\n<p id=\"no-incidents\">No incident in this window.</p>\n");
    } else {
        h.push_str("<h2>Incidents</h2>\n<table id=\"incidents\"><thead><tr><th>job</th><th>instance</th><th>start</th><th>end</th><th class=\"n\">duration</th><th class=\"n\">counted down</th><th>maintenance</th><th>reason</th></tr></thead><tbody>\n");
        for (n, i) in incidents {
            let end = match (i.end_ms, i.ongoing_at_window_end) {
                (Some(e), false) => format_ms(e),
                (Some(e), true) => format!("{} (after the window)", format_ms(e)),
                (None, _) => "still down".into(),
            };
            let start = if i.started_before_window {
                format!("{} (before the window)", format_ms(i.start_ms))
            } else {
                format_ms(i.start_ms)
            };
            let maintenance = match i.maintenance {
                InMaintenance::None => "—".to_string(),
                InMaintenance::Partly => format!("partly ({})", human(i.in_maintenance_ms)),
                InMaintenance::Entirely => "entirely: not counted".to_string(),
            };
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&n.job),
                esc(&n.instance),
                start,
                esc(&end),
                human(i.duration_ms),
                human(i.counted_down_ms),
                maintenance,
                esc(&i.reasons.join("; ")),
            );
        }
        h.push_str("</tbody></table>\n");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> ReportQuery {
        let text: String = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        serde_urlencoded_like(&text)
    }

    /// The query as axum's `Query` reads it.
    fn serde_urlencoded_like(text: &str) -> ReportQuery {
        let uri: axum::http::Uri = format!("/api/v1/report?{text}").parse().unwrap();
        Query::<ReportQuery>::try_from_uri(&uri).unwrap().0
    }

    #[test]
    fn the_window_defaults_to_the_last_30_days_and_bad_ones_say_why() {
        let now = 1_796_083_200_000;
        let a = query(&[]).check(now).unwrap();
        assert_eq!(
            a.window,
            Window {
                from_ms: now - 30 * 86_400_000,
                to_ms: now
            }
        );
        assert_eq!(a.format, Format::Json);
        let a = query(&[
            ("from", "2026-11-01T00:00:00Z"),
            ("to", "1796083200"),
            ("format", "csv"),
            ("incidents", "1"),
        ])
        .check(now)
        .unwrap();
        assert_eq!(a.window.to_ms - a.window.from_ms, 30 * 86_400_000);
        assert_eq!(a.format, Format::Csv { incidents: true });
        let e = |pairs: &[(&str, &str)]| query(pairs).check(now).err().unwrap().to_string();
        assert!(e(&[("from", "last week")]).starts_with("from=\"last week\" is not a time"));
        assert!(e(&[("to", "2026-12-32T00:00:00Z")]).starts_with("to="));
        assert!(e(&[("from", "1796083200"), ("to", "1796083100")]).contains("is not after from"));
        assert!(e(&[("instance", "x")]).contains("needs job="));
        assert!(e(&[("format", "xml")]).contains("use json or csv"));
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(1_800_000), "30 min 0 s");
        assert_eq!(human(2 * 86_400_000 + 3 * 3_600_000), "2 d 3 h");
        assert_eq!(human(-3_745_200_000), "−43 d 8 h");
        assert_eq!(human(1_500), "1.5 s");
    }
}
