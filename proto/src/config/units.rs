//! Prometheus-style durations (`1m30s`, `500ms`) and byte sizes (`256MiB`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration written the way Prometheus writes them: `[0-9]+(ms|s|m|h|d|w|y)`, units
/// combinable from largest to smallest (`1h30m`), or `0`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PromDuration(pub Duration);

impl PromDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }
    pub fn as_duration(self) -> Duration {
        self.0
    }
}

impl From<Duration> for PromDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

/// Why a duration does not parse; each message quotes the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "invalid duration {0:?}: expected a number with a unit (ms, s, m, h, d, w, y), like \"15s\" or \"1m30s\""
    )]
    Malformed(String),
    #[error("invalid duration {0:?}: units must go from largest to smallest, each once")]
    UnitOrder(String),
    #[error("invalid duration {0:?}: too large")]
    TooLarge(String),
}

impl std::str::FromStr for PromDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, DurationError> {
        const UNITS: [(&str, u64); 7] = [
            ("y", 365 * 24 * 3600 * 1000),
            ("w", 7 * 24 * 3600 * 1000),
            ("d", 24 * 3600 * 1000),
            ("h", 3600 * 1000),
            ("m", 60 * 1000),
            ("s", 1000),
            ("ms", 1),
        ];
        let bad = || DurationError::Malformed(s.to_string());
        if s == "0" {
            return Ok(Self(Duration::ZERO));
        }
        if s.is_empty() {
            return Err(bad());
        }
        let mut rest = s;
        let mut total_ms: u64 = 0;
        let mut last_rank = None::<usize>;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let rank = UNITS.iter().position(|(u, _)| *u == unit).ok_or_else(bad)?;
            if last_rank.is_some_and(|r| r >= rank) {
                return Err(DurationError::UnitOrder(s.to_string()));
            }
            last_rank = Some(rank);
            total_ms = value
                .checked_mul(UNITS[rank].1)
                .and_then(|v| total_ms.checked_add(v))
                .ok_or_else(|| DurationError::TooLarge(s.to_string()))?;
        }
        Ok(Self(Duration::from_millis(total_ms)))
    }
}

impl fmt::Display for PromDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis() as u64;
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [
            ("d", 24 * 3600 * 1000u64),
            ("h", 3600 * 1000),
            ("m", 60 * 1000),
            ("s", 1000),
            ("ms", 1),
        ] {
            if ms >= size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for PromDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PromDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A byte count: a plain number, or a number with a unit (`B`, `KB`, `MB`, `GB`, `TB`
/// in powers of 1000; `KiB`, `MiB`, `GiB`, `TiB` in powers of 1024).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Why a byte size does not parse; each message quotes the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error(
        "invalid size {0:?}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB, TiB), like \"256MiB\""
    )]
    Malformed(String),
    #[error("invalid size {0:?}: too large")]
    TooLarge(String),
}

impl std::str::FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, SizeError> {
        let t = s.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        let bad = || SizeError::Malformed(s.to_string());
        if digits == 0 {
            return Err(bad());
        }
        let value: u64 = t[..digits].parse().map_err(|_| bad())?;
        let mult: u64 = match t[digits..].trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => return Err(bad()),
        };
        value
            .checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| SizeError::TooLarge(s.to_string()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        let d = |s: &str| s.parse::<PromDuration>().map(|d| d.0.as_millis());
        assert_eq!(d("15s"), Ok(15_000));
        assert_eq!(d("1m30s"), Ok(90_000));
        assert_eq!(d("500ms"), Ok(500));
        assert_eq!(d("2h"), Ok(7_200_000));
        assert_eq!(d("1d"), Ok(86_400_000));
        assert_eq!(d("0"), Ok(0));
        assert!(d("").is_err());
        assert!(d("15").is_err());
        assert!(d("s").is_err());
        assert!(d("30s1m").is_err());
        assert!(d("1.5s").is_err());
        assert!(d("99999999999999999999y").is_err());
        assert_eq!(
            d("30s1m").unwrap_err().to_string(),
            "invalid duration \"30s1m\": units must go from largest to smallest, each once"
        );
    }

    #[test]
    fn sizes() {
        let b = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(b("256MiB"), Ok(256 << 20));
        assert_eq!(b("1GiB"), Ok(1 << 30));
        assert_eq!(b("1000"), Ok(1000));
        assert_eq!(b("2KB"), Ok(2000));
        assert!(b("1 parsec").is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
    }

    proptest! {
        #[test]
        fn duration_display_round_trips(ms in 0u64..10_000_000_000) {
            let d = PromDuration::from_millis(ms);
            prop_assert_eq!(d.to_string().parse::<PromDuration>(), Ok(d));
        }
    }
}
