//! The step-by-step log of one probe, as blackbox_exporter writes it for
//! `/probe?debug=true`: timestamped logfmt lines at debug level (resolving, connecting,
//! the TLS handshake, the request, the response, each check and its outcome).
//!
//! A prober writes to the [`ProbeLog`] in [`Samples::log`](super::Samples) with
//! [`probe_log!`](crate::probe_log), which builds a line only when the log is on: a probe
//! that nobody asked to debug pays one branch per line, never the formatting. The steps
//! that also go into the failure trace are written once, with
//! [`Samples::note`](super::Samples::note), which logs them as it records them.
//!
//! Secrets never reach a line: probers log header names, not the values of sensitive
//! ones ([`is_secret_header`]), URLs without their password, and never file contents.

use sonde_proto::trace::Step;
use std::fmt::Write as _;
use std::time::SystemTime;

/// Lines kept per probe; later ones are dropped and counted.
pub const MAX_LINES: usize = 256;
/// Bytes of one field's value in a line; longer ones are cut.
pub const MAX_VALUE_BYTES: usize = 512;

/// A line's level, as blackbox_exporter's loggers name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Error => "error",
        }
    }
}

/// One line of a probe's log.
#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    pub at: SystemTime,
    pub level: Level,
    pub message: &'static str,
    pub fields: Vec<(&'static str, String)>,
}

/// A probe's log: off (the default, costing nothing) or collecting lines.
#[derive(Clone, Debug, Default)]
pub struct ProbeLog {
    lines: Option<Vec<LogLine>>,
    dropped: usize,
}

impl ProbeLog {
    /// A log that collects lines.
    pub fn on() -> Self {
        Self {
            lines: Some(Vec::new()),
            dropped: 0,
        }
    }

    #[inline]
    pub fn is_on(&self) -> bool {
        self.lines.is_some()
    }

    /// Adds a line (when on); the values are cut to [`MAX_VALUE_BYTES`]. Use
    /// [`probe_log!`](crate::probe_log), which does not build the fields when off.
    pub fn push(
        &mut self,
        level: Level,
        message: &'static str,
        fields: Vec<(&'static str, String)>,
    ) {
        let Some(lines) = &mut self.lines else {
            return;
        };
        if lines.len() >= MAX_LINES {
            self.dropped += 1;
            return;
        }
        lines.push(LogLine {
            at: SystemTime::now(),
            level,
            message,
            fields: fields
                .into_iter()
                .map(|(k, v)| (k, cut(v, MAX_VALUE_BYTES)))
                .collect(),
        });
    }

    /// Logs what a trace step says (a DNS answer, a connect's outcome, a TLS error, a
    /// status line, a body that failed a regexp, a deadline).
    pub fn step(&mut self, step: &Step) {
        if !self.is_on() {
            return;
        }
        match step {
            Step::Dns {
                name,
                addresses,
                error: None,
            } => {
                let ips: Vec<String> = addresses.iter().map(ToString::to_string).collect();
                self.push(
                    Level::Debug,
                    "Resolved target address",
                    vec![("target", name.clone()), ("ip", ips.join(","))],
                );
            }
            Step::Dns {
                name,
                error: Some(error),
                ..
            } => self.push(
                Level::Error,
                "Resolution with IP protocol failed",
                vec![("target", name.clone()), ("err", error.clone())],
            ),
            Step::Connect {
                address,
                ok: true,
                seconds,
                ..
            } => self.push(
                Level::Debug,
                "Successfully dialed",
                vec![
                    ("address", address.to_string()),
                    ("duration_seconds", seconds.to_string()),
                ],
            ),
            Step::Connect {
                address,
                ok: false,
                error,
                seconds,
            } => self.push(
                Level::Error,
                "Error dialing",
                vec![
                    ("address", address.to_string()),
                    ("err", error.clone().unwrap_or_default()),
                    ("duration_seconds", seconds.to_string()),
                ],
            ),
            Step::Tls { error } => self.push(
                Level::Error,
                "TLS handshake failed",
                vec![("err", error.clone())],
            ),
            Step::HttpStatus { line } => self.push(
                Level::Debug,
                "Received HTTP response",
                vec![("status_line", line.clone())],
            ),
            Step::Body { excerpt, regexp } => self.push(
                Level::Error,
                "Body failed a regular expression",
                vec![("regexp", regexp.clone()), ("body_start", excerpt.clone())],
            ),
            Step::Timeout { during } => self.push(
                Level::Error,
                "Deadline passed",
                vec![("during", during.clone())],
            ),
        }
    }

    /// Moves `other`'s lines to the end of this log, each with `field` added (the
    /// address of a `per_address` run).
    pub fn append(&mut self, mut other: ProbeLog, field: (&'static str, &str)) {
        let (Some(lines), Some(theirs)) = (&mut self.lines, other.lines.take()) else {
            return;
        };
        for mut line in theirs {
            if lines.len() >= MAX_LINES {
                self.dropped += 1;
                continue;
            }
            line.fields.insert(0, (field.0, field.1.to_string()));
            lines.push(line);
        }
        self.dropped += other.dropped;
    }

    /// Rewrites every field value with `hide`: a prober hiding values it knows to be
    /// secret (multihttp's file contents) before the lines leave the probe.
    pub fn rewrite_values(&mut self, mut hide: impl FnMut(&str) -> String) {
        for line in self.lines.iter_mut().flatten() {
            for (_, value) in &mut line.fields {
                *value = hide(value);
            }
        }
    }

    pub fn lines(&self) -> &[LogLine] {
        self.lines.as_deref().unwrap_or_default()
    }

    /// The lines in logfmt, one per line, each starting with `ts=` (RFC 3339, UTC,
    /// milliseconds) and `level=`, then the fields `prefix` gives every line (module and
    /// target, as blackbox_exporter's scrape logger adds them).
    pub fn render(&self, prefix: &[(&str, &str)], out: &mut String) {
        for line in self.lines() {
            let _ = write!(
                out,
                "ts={} level={}",
                rfc3339_millis(line.at),
                line.level.as_str()
            );
            for (k, v) in prefix {
                write_field(out, k, v);
            }
            write_field(out, "msg", line.message);
            for (k, v) in &line.fields {
                write_field(out, k, v);
            }
            out.push('\n');
        }
        if self.dropped > 0 {
            let _ = writeln!(
                out,
                "ts={} level=warn msg=\"log cut: {} more lines dropped (at most {MAX_LINES} per probe)\"",
                rfc3339_millis(SystemTime::now()),
                self.dropped
            );
        }
    }
}

/// Adds a line to a [`ProbeLog`] when it is on; the fields are not built otherwise.
///
/// `probe_log!(out.log, Debug, "Making HTTP request", url = url, method = m)`: each value
/// is anything with `Display`.
#[macro_export]
macro_rules! probe_log {
    ($log:expr, $level:ident, $message:literal $(, $key:ident = $value:expr)* $(,)?) => {
        if $log.is_on() {
            $log.push(
                $crate::probe::log::Level::$level,
                $message,
                vec![$((stringify!($key), ($value).to_string())),*],
            );
        }
    };
}

/// Header names whose values are credentials: logged as `<secret>`.
pub fn is_secret_header(name: &str) -> bool {
    const SECRET: [&str; 6] = [
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
    ];
    SECRET.iter().any(|s| name.eq_ignore_ascii_case(s))
}

/// A header's value as a log may show it.
pub fn header_value_for_log(name: &str, value: &[u8]) -> String {
    if is_secret_header(name) {
        "<secret>".to_string()
    } else {
        String::from_utf8_lossy(value).into_owned()
    }
}

/// A URL as a log may show it: without its password.
pub fn url_for_log(url: &url::Url) -> String {
    if url.password().is_none() {
        return url.to_string();
    }
    let mut shown = url.clone();
    let _ = shown.set_password(Some("xxxxx"));
    shown.to_string()
}

fn write_field(out: &mut String, key: &str, value: &str) {
    out.push(' ');
    out.push_str(key);
    out.push('=');
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if plain {
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
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// `2026-12-07T15:04:05.123Z`.
pub fn rfc3339_millis(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Howard Hinnant's days-from-civil inverse: a day count since 1970-01-01 to a date.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_off_log_keeps_nothing_and_builds_nothing() {
        let mut log = ProbeLog::default();
        let mut built = false;
        probe_log!(
            log,
            Debug,
            "x",
            v = {
                built = true;
                1
            }
        );
        assert!(!built);
        assert!(log.lines().is_empty());
        log.step(&Step::Tls { error: "e".into() });
        assert!(log.lines().is_empty());
    }

    #[test]
    fn lines_render_as_logfmt_with_quoting() {
        let mut log = ProbeLog::on();
        probe_log!(
            log,
            Debug,
            "Making HTTP request",
            url = "http://a/",
            note = "two words\n\"q\""
        );
        let mut text = String::new();
        log.render(&[("module", "http_2xx")], &mut text);
        assert!(text.starts_with("ts=20"), "{text}");
        assert!(
            text.contains(
                " level=debug module=http_2xx msg=\"Making HTTP request\" url=http://a/ note=\"two words\\n\\\"q\\\"\"\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn logs_are_bounded() {
        let mut log = ProbeLog::on();
        for _ in 0..MAX_LINES + 5 {
            probe_log!(log, Debug, "x", v = "y".repeat(10_000));
        }
        assert_eq!(log.lines().len(), MAX_LINES);
        assert!(log.lines()[0].fields[0].1.len() <= MAX_VALUE_BYTES + 3);
        let mut text = String::new();
        log.render(&[], &mut text);
        assert!(text.contains("5 more lines dropped"), "{text}");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_655_845_123);
        assert_eq!(rfc3339_millis(at), "2026-12-07T15:04:05.123Z");
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn secrets_are_not_shown() {
        assert_eq!(
            header_value_for_log("Authorization", b"Bearer x"),
            "<secret>"
        );
        assert_eq!(header_value_for_log("set-cookie", b"s=1"), "<secret>");
        assert_eq!(
            header_value_for_log("Content-Type", b"text/plain"),
            "text/plain"
        );
        let url = url::Url::parse("http://user:hunter2@a.example/p").unwrap();
        assert!(!url_for_log(&url).contains("hunter2"));
    }
}
