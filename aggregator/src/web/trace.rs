//! A failed result's trace on the per-target page: the steps the agent took, one per
//! line, then the path. Every string in it comes from an agent, so every one is escaped.

use super::svg::{esc, utc};
use sonde_proto::trace::{Path, Step, Trace};
use std::fmt::Write;

/// The trace as an ordered list (`class="trace"`), and the path as a table of hops
/// (`class="path"`) whose last answering hop is marked `data-last="true"`.
pub fn html(trace: &Trace) -> String {
    let mut out = String::from(r#"<ol class="trace">"#);
    for step in &trace.steps {
        let (kind, text) = describe(step);
        let _ = write!(
            out,
            r#"<li data-kind="{kind}"><span class="muted">{kind}</span> {}</li>"#,
            esc(&text)
        );
    }
    out.push_str("</ol>");
    if let Some(path) = &trace.path {
        out.push_str(&path_html(path));
    }
    out
}

/// One step in words.
fn describe(step: &Step) -> (&'static str, String) {
    match step {
        Step::Dns {
            name,
            addresses,
            error,
        } => {
            let answer = match error {
                Some(e) => e.clone(),
                None => addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            ("dns", format!("{name} → {answer}"))
        }
        Step::Connect {
            address,
            ok,
            error,
            seconds,
        } => {
            let outcome = match (ok, error) {
                (true, _) => "connected".to_string(),
                (false, Some(e)) => e.clone(),
                (false, None) => "failed".to_string(),
            };
            (
                "connect",
                format!("{address}: {outcome} ({:.1} ms)", seconds * 1000.0),
            )
        }
        Step::Tls { error } => ("tls", error.clone()),
        Step::HttpStatus { line } => ("http", line.clone()),
        Step::Body { excerpt, regexp } => ("body", format!("\"{excerpt}\" (regexp {regexp})")),
        Step::Timeout { during } => ("timeout", format!("the deadline passed during {during}")),
    }
}

fn path_html(path: &Path) -> String {
    let last = path.last_hop().map(|h| h.ttl);
    let mut out = format!(
        r#"<table class="path" data-destination="{}" data-reached="{}"><tr><th>hop</th><th>address</th><th>rtt</th><th>answer</th></tr>"#,
        path.destination, path.reached
    );
    for hop in &path.hops {
        let _ = write!(
            out,
            r#"<tr class="hop" data-ttl="{ttl}" data-last="{is_last}"><td>{ttl}</td><td>{addr}</td><td>{rtt}</td><td>{icmp}</td></tr>"#,
            ttl = hop.ttl,
            is_last = Some(hop.ttl) == last,
            addr = hop.address.map_or("*".to_string(), |a| a.to_string()),
            rtt = if hop.address.is_some() {
                format!("{:.1} ms", hop.rtt_seconds * 1000.0)
            } else {
                String::new()
            },
            icmp = esc(&hop.icmp),
        );
    }
    let _ = write!(
        out,
        r#"</table><p class="muted">traceroute to {} {}, at {}</p>"#,
        path.destination,
        if path.reached {
            "reached it"
        } else {
            "did not reach it"
        },
        utc(path.timestamp_ms)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_text_is_escaped() {
        let mut t = Trace::default();
        t.push(Step::HttpStatus {
            line: "HTTP/1.1 500 <script>alert(1)</script>".into(),
        });
        t.push(Step::Body {
            excerpt: "\"><img src=x onerror=alert(1)>".into(),
            regexp: "ok".into(),
        });
        let html = html(&t);
        assert!(
            !html.contains("<script>") && !html.contains("<img"),
            "{html}"
        );
        assert!(html.contains("&lt;script&gt;"), "{html}");
    }
}
