//! The report's times as people write them: RFC 3339 (`2026-12-01T00:00:00Z`,
//! `2026-12-01T01:00:00+01:00`, fractions of a second allowed) or unix seconds
//! (`1796083200`, `1796083200.5`), and RFC 3339 in UTC on the way out. RFC 3339 is
//! read and written as maintenance windows read and write it.

/// A time the report cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a time: {why}; write RFC 3339 (2026-12-01T00:00:00Z) or unix seconds (1796083200)"
)]
pub struct BadTime {
    pub text: String,
    pub why: &'static str,
}

/// Milliseconds since the epoch of `text` (RFC 3339 or unix seconds).
pub fn parse_ms(text: &str) -> Result<i64, BadTime> {
    let bad = |why| BadTime {
        text: text.chars().take(64).collect(),
        why,
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(bad("it is empty"));
    }
    if t.bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
        && !t.contains('T')
    {
        let seconds: f64 = t.parse().map_err(|_| bad("not a number of seconds"))?;
        // Far enough for any report, near enough that the milliseconds fit an i64.
        if !seconds.is_finite() || seconds.abs() > 1e13 {
            return Err(bad("out of range"));
        }
        return Ok((seconds * 1000.0).round() as i64);
    }
    sonde_hub::maintenance::parse_rfc3339_ms(t)
        .map_err(|_| bad("not RFC 3339 (YYYY-MM-DDTHH:MM:SS with Z or an offset)"))
}

/// `ms` as RFC 3339 in UTC: `2026-12-01T00:00:00Z`, with milliseconds only when there
/// are some.
pub fn format_ms(ms: i64) -> String {
    sonde_hub::maintenance::format_rfc3339_ms(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_and_unix_seconds_read_alike() {
        let dec1 = 1_796_083_200_000;
        assert_eq!(parse_ms("2026-12-01T00:00:00Z"), Ok(dec1));
        assert_eq!(parse_ms("2026-12-01T01:00:00+01:00"), Ok(dec1));
        assert_eq!(parse_ms("2026-11-30T19:00:00-05:00"), Ok(dec1));
        assert_eq!(parse_ms("1796083200"), Ok(dec1));
        assert_eq!(parse_ms("1796083200.25"), Ok(dec1 + 250));
        assert_eq!(parse_ms("2026-12-01T00:00:00.5Z"), Ok(dec1 + 500));
        assert_eq!(
            parse_ms("2024-02-29T12:00:00Z").map(format_ms).as_deref(),
            Ok("2024-02-29T12:00:00Z")
        );
        assert_eq!(format_ms(dec1), "2026-12-01T00:00:00Z");
        assert_eq!(format_ms(dec1 + 7), "2026-12-01T00:00:00.007Z");
        assert_eq!(format_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_ms(-1000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn nonsense_is_refused_with_the_way_to_write_it() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T00:00:00",
            "2026-12-01T00:00:00+1:00",
            "2026-12-01T00:00:00.Z",
            "1e400",
            "99999999999999999",
            "--5",
            "2026-12-01Té0:00:00Z",
        ] {
            let e = parse_ms(bad).unwrap_err();
            assert!(e.to_string().contains("RFC 3339"), "{bad}: {e}");
        }
    }
}
