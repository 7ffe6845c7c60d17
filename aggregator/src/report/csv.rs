//! Reports as JSON and CSV: times in RFC 3339 (UTC), durations in seconds (with
//! milliseconds where there are some).
//!
//! CSV comes in two tables, each with a header row: one row per target
//! ([`targets_csv`], `format=csv`), and one row per incident ([`incidents_csv`],
//! `format=csv&incidents=1`). Fields are quoted as RFC 4180 says: a field holding a
//! comma, a double quote, a line break or a leading or trailing space is put in double
//! quotes, with its double quotes doubled.

use super::time::format_ms;
use super::{COUNTING, Incident, TargetReport};
use serde_json::{Value, json};

/// A target's report with its name.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedReport {
    pub job: String,
    pub instance: String,
    pub report: TargetReport,
}

/// `ms` as seconds: `1800`, `0.25`, `-3745.2`.
pub fn seconds(ms: i64) -> String {
    let sign = if ms < 0 { "-" } else { "" };
    let abs = ms.unsigned_abs();
    let (whole, frac) = (abs / 1000, abs % 1000);
    if frac == 0 {
        format!("{sign}{whole}")
    } else {
        let f = format!("{frac:03}");
        format!("{sign}{whole}.{}", f.trim_end_matches('0'))
    }
}

/// Milliseconds given as `f64` (a budget) as seconds, to the millisecond.
pub fn seconds_f(ms: f64) -> String {
    seconds(ms.round() as i64)
}

/// A percentage to six decimals, trailing zeros dropped.
pub fn percent(p: f64) -> String {
    let s = format!("{p:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

fn secs_json(ms: i64) -> Value {
    if ms % 1000 == 0 {
        json!(ms / 1000)
    } else {
        json!(ms as f64 / 1000.0)
    }
}

fn incident_json(i: &Incident) -> Value {
    json!({
        "start": format_ms(i.start_ms),
        "end": i.end_ms.map(format_ms),
        "duration_seconds": secs_json(i.duration_ms),
        "counted_down_seconds": secs_json(i.counted_down_ms),
        "in_maintenance_seconds": secs_json(i.in_maintenance_ms),
        "maintenance": i.maintenance,
        "started_before_window": i.started_before_window,
        "ongoing_at_window_end": i.ongoing_at_window_end,
        "reasons": i.reasons,
    })
}

/// One target's report as the API gives it.
pub fn target_json(n: &NamedReport) -> Value {
    let r = &n.report;
    json!({
        "job": n.job,
        "instance": n.instance,
        "data_starts_at": r.data_starts_ms.map(format_ms),
        "window_seconds": secs_json(r.window_ms),
        "counted_seconds": secs_json(r.counted_ms),
        "up_seconds": secs_json(r.up_ms),
        "degraded_seconds": secs_json(r.degraded_ms),
        "down_seconds": secs_json(r.down_ms),
        "missing_seconds": secs_json(r.missing_ms),
        "maintenance_seconds": secs_json(r.maintenance_ms),
        "no_data_seconds": secs_json(r.no_data_ms),
        "availability_percent": r.availability_percent,
        "objective_percent": r.error_budget.map(|b| b.objective_percent),
        "error_budget": r.error_budget.map(|b| json!({
            "allowed_seconds": b.allowed_ms / 1000.0,
            "used_seconds": secs_json(b.used_ms),
            "remaining_seconds": b.remaining_ms / 1000.0,
            "burned_percent": b.burned_percent,
        })),
        "incidents": r.incidents.iter().map(incident_json).collect::<Vec<_>>(),
    })
}

/// The whole report: the window, how it was counted, every target.
pub fn report_json(from_ms: i64, to_ms: i64, generated_ms: i64, targets: &[NamedReport]) -> Value {
    json!({
        "from": format_ms(from_ms),
        "to": format_ms(to_ms),
        "generated_at": format_ms(generated_ms),
        "counting": COUNTING,
        "targets": targets.iter().map(target_json).collect::<Vec<_>>(),
    })
}

/// One CSV field, quoted when it must be.
pub fn field(s: &str) -> String {
    let needs = s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ');
    if needs {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn row(out: &mut String, fields: &[String]) {
    let line: Vec<String> = fields.iter().map(|f| field(f)).collect();
    out.push_str(&line.join(","));
    out.push_str("\r\n");
}

/// The columns of [`targets_csv`].
pub const TARGET_COLUMNS: &[&str] = &[
    "job",
    "instance",
    "from",
    "to",
    "objective_percent",
    "window_seconds",
    "counted_seconds",
    "up_seconds",
    "degraded_seconds",
    "down_seconds",
    "missing_seconds",
    "maintenance_seconds",
    "no_data_seconds",
    "data_starts_at",
    "availability_percent",
    "budget_allowed_seconds",
    "budget_used_seconds",
    "budget_remaining_seconds",
    "budget_burned_percent",
    "incidents",
];

/// One row per target (empty fields where a figure does not exist).
pub fn targets_csv(targets: &[NamedReport]) -> String {
    let mut out = String::new();
    row(
        &mut out,
        &TARGET_COLUMNS
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
    );
    for n in targets {
        let r = &n.report;
        let b = r.error_budget;
        row(
            &mut out,
            &[
                n.job.clone(),
                n.instance.clone(),
                format_ms(r.window.from_ms),
                format_ms(r.window.to_ms),
                b.map(|b| percent(b.objective_percent)).unwrap_or_default(),
                seconds(r.window_ms),
                seconds(r.counted_ms),
                seconds(r.up_ms),
                seconds(r.degraded_ms),
                seconds(r.down_ms),
                seconds(r.missing_ms),
                seconds(r.maintenance_ms),
                seconds(r.no_data_ms),
                r.data_starts_ms.map(format_ms).unwrap_or_default(),
                r.availability_percent.map(percent).unwrap_or_default(),
                b.map(|b| seconds_f(b.allowed_ms)).unwrap_or_default(),
                b.map(|b| seconds(b.used_ms)).unwrap_or_default(),
                b.map(|b| seconds_f(b.remaining_ms)).unwrap_or_default(),
                b.and_then(|b| b.burned_percent)
                    .map(percent)
                    .unwrap_or_default(),
                r.incidents.len().to_string(),
            ],
        );
    }
    out
}

/// The columns of [`incidents_csv`].
pub const INCIDENT_COLUMNS: &[&str] = &[
    "job",
    "instance",
    "start",
    "end",
    "duration_seconds",
    "counted_down_seconds",
    "in_maintenance_seconds",
    "maintenance",
    "started_before_window",
    "ongoing_at_window_end",
    "reasons",
];

/// One row per incident; several reasons are joined with "; ".
pub fn incidents_csv(targets: &[NamedReport]) -> String {
    let mut out = String::new();
    row(
        &mut out,
        &INCIDENT_COLUMNS
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
    );
    for n in targets {
        for i in &n.report.incidents {
            row(
                &mut out,
                &[
                    n.job.clone(),
                    n.instance.clone(),
                    format_ms(i.start_ms),
                    i.end_ms.map(format_ms).unwrap_or_default(),
                    seconds(i.duration_ms),
                    seconds(i.counted_down_ms),
                    seconds(i.in_maintenance_ms),
                    serde_json::to_value(i.maintenance)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                    i.started_before_window.to_string(),
                    i.ongoing_at_window_end.to_string(),
                    i.reasons.join("; "),
                ],
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{InMaintenance, Window};

    #[test]
    fn fields_are_quoted_as_rfc_4180_says() {
        assert_eq!(field("plain"), "plain");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("two\nlines"), "\"two\nlines\"");
        assert_eq!(field(" padded"), "\" padded\"");
        assert_eq!(seconds(1_800_000), "1800");
        assert_eq!(seconds(250), "0.25");
        assert_eq!(seconds(-3_745_200_000), "-3745200");
        assert_eq!(seconds(-1_500), "-1.5");
        assert_eq!(percent(99.753_405_354_626_6), "99.753405");
        assert_eq!(percent(100.0), "100");
    }

    #[test]
    fn an_incident_with_awkward_reasons_stays_one_row() {
        let report = TargetReport {
            window: Window {
                from_ms: 0,
                to_ms: 1000,
            },
            data_starts_ms: None,
            window_ms: 1000,
            counted_ms: 1000,
            up_ms: 500,
            degraded_ms: 0,
            down_ms: 500,
            missing_ms: 0,
            maintenance_ms: 0,
            no_data_ms: 0,
            availability_percent: Some(50.0),
            error_budget: None,
            incidents: vec![Incident {
                start_ms: 500,
                end_ms: None,
                duration_ms: 500,
                counted_down_ms: 500,
                in_maintenance_ms: 0,
                maintenance: InMaintenance::None,
                started_before_window: false,
                ongoing_at_window_end: true,
                reasons: vec!["body matched \"error, try\"".into(), "line\nbreak".into()],
            }],
        };
        let named = [NamedReport {
            job: "web".into(),
            instance: "http://x/?a=1,2".into(),
            report,
        }];
        let csv = incidents_csv(&named);
        assert_eq!(
            csv,
            "job,instance,start,end,duration_seconds,counted_down_seconds,in_maintenance_seconds,maintenance,started_before_window,ongoing_at_window_end,reasons\r\n\
             web,\"http://x/?a=1,2\",1970-01-01T00:00:00.500Z,,0.5,0.5,0,none,false,true,\"body matched \"\"error, try\"\"; line\nbreak\"\r\n"
        );
        let targets = targets_csv(&named);
        assert!(targets.contains("\r\nweb,\"http://x/?a=1,2\",1970-01-01T00:00:00Z,1970-01-01T00:00:01Z,,1,1,0.5,0,0.5,0,0,0,,50,,,,,1\r\n"), "{targets}");
    }
}
