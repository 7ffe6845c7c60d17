//! The report's times as people write them: RFC 3339 (`2026-12-01T00:00:00Z`,
//! `2026-12-01T01:00:00+01:00`, fractions of a second allowed) or unix seconds
//! (`1796083200`, `1796083200.5`), and RFC 3339 in UTC on the way out.

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
    rfc3339_ms(t).ok_or_else(|| bad("not RFC 3339 (YYYY-MM-DDTHH:MM:SS with Z or an offset)"))
}

fn rfc3339_ms(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let s = t.get(from..to)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &t[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &frac[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ => {
            let o = rest.as_bytes();
            if o.len() != 6 || !matches!(o[0], b'+' | b'-') || o[3] != b':' {
                return None;
            }
            let hours = num_of(&rest[1..3])?;
            let minutes = num_of(&rest[4..6])?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let sign = if o[0] == b'-' { -1 } else { 1 };
            sign * (hours * 3600 + minutes * 60)
        }
    };
    // A leap second is read as the second after it.
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Some(seconds * 1000 + millis)
}

fn num_of(s: &str) -> Option<i64> {
    s.bytes()
        .all(|c| c.is_ascii_digit())
        .then(|| s.parse().ok())?
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01 (the inverse of the above).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `ms` as RFC 3339 in UTC: `2026-12-01T00:00:00Z`, with milliseconds only when there
/// are some.
pub fn format_ms(ms: i64) -> String {
    let seconds = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let in_day = seconds.rem_euclid(86_400);
    let (h, m, s) = (in_day / 3600, in_day % 3600 / 60, in_day % 60);
    if millis == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
    }
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
