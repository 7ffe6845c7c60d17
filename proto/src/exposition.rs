//! Renders metric families in the Prometheus text format (0.0.4) and in OpenMetrics 1.0,
//! for both binaries' `/metrics` and for the agent's blackbox-compatible `/probe`.

use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Gauge,
    /// The family name must end in `_total`.
    Counter,
}

/// One metric family: every sample shares the name, help and type.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub name: String,
    pub help: String,
    pub kind: MetricType,
    pub samples: Vec<(Vec<(String, String)>, f64)>,
}

impl Family {
    pub fn new(name: impl Into<String>, help: impl Into<String>, kind: MetricType) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            kind,
            samples: Vec::new(),
        }
    }

    pub fn gauge(name: impl Into<String>, help: impl Into<String>) -> Self {
        Self::new(name, help, MetricType::Gauge)
    }

    pub fn counter(name: impl Into<String>, help: impl Into<String>) -> Self {
        Self::new(name, help, MetricType::Counter)
    }

    /// Adds a sample; `labels` are (name, value) pairs.
    pub fn push<K: Into<String>, V: Into<String>>(
        &mut self,
        labels: impl IntoIterator<Item = (K, V)>,
        value: f64,
    ) -> &mut Self {
        self.samples.push((
            labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            value,
        ));
        self
    }

    pub fn with(mut self, labels: Vec<(String, String)>, value: f64) -> Self {
        self.samples.push((labels, value));
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    PrometheusText,
    OpenMetrics,
}

impl Format {
    /// Picks the format a scraper asks for in its `Accept` header, as Prometheus's own
    /// client libraries do: OpenMetrics when offered, the classic text format otherwise.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Renders `families` in `format`. Families with no samples still get their HELP and TYPE.
pub fn render(families: &[Family], format: Format) -> String {
    let mut out = String::new();
    render_into(&mut out, families, format);
    finish(&mut out, format);
    out
}

/// [`render`] into `out`, without the end marker: for output written in parts.
pub fn render_into(out: &mut String, families: &[Family], format: Format) {
    for family in families {
        write_header(out, &family.name, &family.help, family.kind, format);
        for (labels, value) in &family.samples {
            write_sample(
                out,
                &family.name,
                labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                *value,
            );
        }
    }
}

/// A family's HELP and TYPE lines.
pub fn write_header(out: &mut String, name: &str, help: &str, kind: MetricType, format: Format) {
    let (type_name, meta_name) = match (kind, format) {
        (MetricType::Gauge, _) => ("gauge", name),
        (MetricType::Counter, Format::PrometheusText) => ("counter", name),
        (MetricType::Counter, Format::OpenMetrics) => {
            ("counter", name.strip_suffix("_total").unwrap_or(name))
        }
    };
    let _ = writeln!(out, "# HELP {meta_name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {meta_name} {type_name}");
}

/// One sample line, its labels written straight from borrowed strings.
pub fn write_sample<'a>(
    out: &mut String,
    name: &str,
    labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    value: f64,
) {
    out.push_str(name);
    let mut first = true;
    for (k, v) in labels {
        out.push(if first { '{' } else { ',' });
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        push_escaped_label_value(out, v);
        out.push('"');
    }
    if !first {
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_value(value));
    out.push('\n');
}

/// The end of an exposition (`# EOF` in OpenMetrics).
pub fn finish(out: &mut String, format: Format) {
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
}

/// A sample value as both formats write it (`NaN`, `+Inf`, `-Inf`, shortest decimal).
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v == f64::INFINITY {
        "+Inf".to_string()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        format!("{v}")
    }
}

fn push_escaped_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_openmetrics() {
        let mut up = Family::gauge("up", "1 if the target is up.");
        up.push([("job", "web"), ("instance", "a\"b")], 1.0);
        let mut n = Family::counter("sonde_x_total", "Things.");
        n.push(Vec::<(String, String)>::new(), 3.0);
        let text = render(&[up.clone(), n.clone()], Format::PrometheusText);
        assert_eq!(
            text,
            "# HELP up 1 if the target is up.\n# TYPE up gauge\nup{job=\"web\",instance=\"a\\\"b\"} 1\n\
             # HELP sonde_x_total Things.\n# TYPE sonde_x_total counter\nsonde_x_total 3\n"
        );
        let om = render(&[n], Format::OpenMetrics);
        assert_eq!(
            om,
            "# HELP sonde_x Things.\n# TYPE sonde_x counter\nsonde_x_total 3\n# EOF\n"
        );
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(1e21), "1000000000000000000000");
    }
}
