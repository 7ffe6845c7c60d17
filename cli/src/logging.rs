//! Logging set up the Prometheus exporters' way: `--log.level` and `--log.format`.
//!
//! `logfmt` is the format of Prometheus and go-kit, one line per event:
//! `ts=2026-11-30T09:01:36.372Z caller=main.rs:42 level=info msg="config reloaded" file=/etc/sonde/agent.yml`,
//! keys and values quoted only when they need it (a space, `=`, `"`, a control
//! character, or nothing at all).

use clap::ValueEnum;
use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Logfmt,
    Json,
}

/// `--log.level` and `--log.format`, the same for both binaries.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct LogFlags {
    #[arg(long = "log.level", value_enum, default_value = "info")]
    pub level: LogLevel,
    #[arg(long = "log.format", value_enum, default_value = "logfmt")]
    pub format: LogFormat,
}

impl LogFlags {
    pub fn init(self) {
        init(self.level, self.format);
    }
}

/// Installs the global subscriber; logs go to stderr.
pub fn init(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    };
    // Our own crates at the chosen level; chatty dependencies (h2, hyper) one notch up.
    let filter = tracing_subscriber::EnvFilter::new(format!(
        "warn,sonde_agent={level},sonde_aggregator={level},sonde_cli={level},sonde={level}"
    ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Logfmt => builder
            .with_ansi(false)
            .fmt_fields(LogfmtFields)
            .event_format(Logfmt)
            .try_init(),
    };
}

/// Formats events as logfmt (see the module documentation).
#[derive(Clone, Copy, Debug, Default)]
pub struct Logfmt;

/// Formats span fields as logfmt pairs, for [`Logfmt`] to append to the events in them.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogfmtFields;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = String::with_capacity(160);
        line.push_str("ts=");
        push_timestamp(&mut line, std::time::SystemTime::now());
        if let (Some(file), Some(number)) = (meta.file(), meta.line()) {
            let file = file.rsplit('/').next().unwrap_or(file);
            line.push_str(" caller=");
            push_value(&mut line, &format!("{file}:{number}"));
        }
        line.push_str(" level=");
        line.push_str(match *meta.level() {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            Level::DEBUG | Level::TRACE => "debug",
        });
        let mut pairs = Pairs::default();
        event.record(&mut pairs);
        if let Some(msg) = &pairs.message {
            line.push_str(" msg=");
            push_value(&mut line, msg);
        }
        line.push_str(&pairs.rest);
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    line.push(' ');
                    line.push_str(fields);
                }
            }
        }
        writeln!(writer, "{line}")
    }
}

impl<'writer> FormatFields<'writer> for LogfmtFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut pairs = Pairs::default();
        fields.record(&mut pairs);
        let mut out = String::new();
        if let Some(msg) = &pairs.message {
            out.push_str(" msg=");
            push_value(&mut out, msg);
        }
        out.push_str(&pairs.rest);
        writer.write_str(out.trim_start())
    }
}

/// An event's fields: its message apart, the others as ` key=value` pairs in order.
#[derive(Default)]
struct Pairs {
    message: Option<String>,
    rest: String,
}

impl Pairs {
    fn pair(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_string());
            return;
        }
        self.rest.push(' ');
        // Keys are Rust identifiers (`r#type` is written `type`); anything that would
        // break the line's syntax becomes '_'.
        let key = field.name().trim_start_matches("r#");
        self.rest.extend(key.chars().map(|c| {
            if c == ' ' || c == '=' || c == '"' || c.is_control() {
                '_'
            } else {
                c
            }
        }));
        self.rest.push('=');
        push_value(&mut self.rest, value);
    }
}

impl Visit for Pairs {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.pair(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.pair(field, &format!("{value:?}"));
    }
}

/// Appends `value`, quoted and escaped when it is empty or holds a space, `=`, `"` or a
/// control character (as go-kit's logfmt encoder).
fn push_value(out: &mut String, value: &str) {
    let needs_quotes = value.is_empty()
        || value
            .chars()
            .any(|c| c == ' ' || c == '=' || c == '"' || c.is_control());
    if !needs_quotes {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends `at` as RFC 3339 in UTC with milliseconds: `2026-11-30T09:01:36.372Z`.
fn push_timestamp(out: &mut String, at: std::time::SystemTime) {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(f: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(LogfmtFields)
            .event_format(Logfmt)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn logfmt_lines_are_real_logfmt() {
        let out = logged(|| {
            let file = "/etc/sonde/agent.yml";
            tracing::info!(file, count = 3, "config reloaded");
            tracing::warn!(error = %"a \"b\"=c\nd", empty = "", "reload failed");
            let span = tracing::info_span!("stream", agent = "edge-1");
            let _in = span.enter();
            tracing::error!(ok = true, "gone");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let strip = |l: &str| {
            // ts=YYYY-MM-DDTHH:MM:SS.mmmZ caller=logging.rs:N level=...
            let (ts, rest) = l.split_once(' ').unwrap();
            assert!(
                ts.starts_with("ts=20") && ts.ends_with('Z') && ts.len() == 27,
                "{l}"
            );
            let (caller, rest) = rest.split_once(' ').unwrap();
            assert!(caller.starts_with("caller=logging.rs:"), "{l}");
            rest.to_string()
        };
        assert_eq!(
            strip(lines[0]),
            "level=info msg=\"config reloaded\" file=/etc/sonde/agent.yml count=3"
        );
        assert_eq!(
            strip(lines[1]),
            r#"level=warn msg="reload failed" error="a \"b\"=c\nd" empty="""#
        );
        assert_eq!(strip(lines[2]), "level=error msg=gone ok=true agent=edge-1");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let mut s = String::new();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_796_029_296_372);
        push_timestamp(&mut s, at);
        assert_eq!(s, "2026-11-30T09:01:36.372Z");
        s.clear();
        push_timestamp(
            &mut s,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400),
        );
        assert_eq!(s, "2000-02-29T00:00:00.000Z");
    }
}
