//! A YAML document read as it is written (mapping keys in their order, scalars as typed by
//! YAML), for parts of a Prometheus config that are carried over to sonde's verbatim
//! (`static_configs`, discovery blocks, `relabel_configs`), and the block-style writer
//! that prints them back.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt::{self, Write};

#[derive(Clone, Debug, PartialEq)]
pub enum Yaml {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Yaml>),
    /// Keys in the order written; a non-string key is kept as its text.
    Map(Vec<(String, Yaml)>),
}

impl Yaml {
    pub fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A scalar as Prometheus would read it into a string field.
    pub fn scalar_text(&self) -> Option<String> {
        match self {
            Yaml::Str(s) => Some(s.clone()),
            Yaml::Int(i) => Some(i.to_string()),
            Yaml::Float(f) => Some(f.to_string()),
            Yaml::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> &[Yaml] {
        match self {
            Yaml::Seq(items) => items,
            _ => &[],
        }
    }

    pub fn entries(&self) -> &[(String, Yaml)] {
        match self {
            Yaml::Map(entries) => entries,
            _ => &[],
        }
    }
}

impl<'de> Deserialize<'de> for Yaml {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(YamlVisitor)
    }
}

struct YamlVisitor;

impl<'de> Visitor<'de> for YamlVisitor {
    type Value = Yaml;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Yaml, E> {
        Ok(Yaml::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Yaml, E> {
        Ok(Yaml::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Yaml, E> {
        Ok(i64::try_from(v).map_or_else(|_| Yaml::Str(v.to_string()), Yaml::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Yaml, E> {
        Ok(Yaml::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Yaml, E> {
        Ok(Yaml::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Yaml, E> {
        Ok(Yaml::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Yaml, E> {
        Ok(Yaml::Str(String::from_utf8_lossy(v).into_owned()))
    }
    fn visit_none<E>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }
    fn visit_unit<E>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Yaml, D::Error> {
        Yaml::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Yaml, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Yaml::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Yaml, A::Error> {
        let mut entries = Vec::new();
        while let Some((key, value)) = map.next_entry::<Yaml, Yaml>()? {
            let key = key.scalar_text().unwrap_or_else(|| format!("{key:?}"));
            entries.push((key, value));
        }
        Ok(Yaml::Map(entries))
    }
}

/// Writes `value` as the value of `key` at `indent` spaces, in block style.
pub fn write_entry(out: &mut String, indent: usize, key: &str, value: &Yaml) {
    let pad = " ".repeat(indent);
    let _ = write!(out, "{pad}{}:", scalar(key));
    write_value_after_key(out, indent, value);
}

fn write_value_after_key(out: &mut String, indent: usize, value: &Yaml) {
    match value {
        Yaml::Map(entries) if !entries.is_empty() => {
            out.push('\n');
            for (k, v) in entries {
                write_entry(out, indent + 2, k, v);
            }
        }
        Yaml::Seq(items) if !items.is_empty() => {
            out.push('\n');
            write_items(out, indent + 2, items);
        }
        other => {
            let _ = writeln!(out, " {}", inline(other));
        }
    }
}

/// Writes the items of a sequence at `indent` spaces (`- item` lines).
pub fn write_items(out: &mut String, indent: usize, items: &[Yaml]) {
    let pad = " ".repeat(indent);
    for item in items {
        match item {
            Yaml::Map(entries) if !entries.is_empty() => {
                // The first entry goes on the dash's line; the rest line up under it.
                let mut first = String::new();
                let (k, v) = &entries[0];
                write_entry(&mut first, indent + 2, k, v);
                let _ = write!(out, "{pad}- {}", &first[indent + 2..]);
                for (k, v) in &entries[1..] {
                    write_entry(out, indent + 2, k, v);
                }
            }
            Yaml::Seq(inner) if !inner.is_empty() => {
                let _ = writeln!(out, "{pad}-");
                write_items(out, indent + 2, inner);
            }
            other => {
                let _ = writeln!(out, "{pad}- {}", inline(other));
            }
        }
    }
}

/// A scalar, or an empty collection, on one line.
fn inline(value: &Yaml) -> String {
    match value {
        Yaml::Null => "null".into(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Int(i) => i.to_string(),
        Yaml::Float(f) if f.is_finite() => {
            let text = f.to_string();
            if text.contains(['.', 'e', 'E']) {
                text
            } else {
                format!("{text}.0")
            }
        }
        Yaml::Float(f) if f.is_nan() => ".nan".into(),
        Yaml::Float(f) if *f > 0.0 => ".inf".into(),
        Yaml::Float(_) => "-.inf".into(),
        Yaml::Str(s) => scalar(s),
        Yaml::Seq(_) => "[]".into(),
        Yaml::Map(_) => "{}".into(),
    }
}

/// `text` as a YAML string scalar: plain when YAML reads it back as this same string, else
/// double-quoted (JSON's escapes are YAML's).
pub fn scalar(text: &str) -> String {
    if plain_is_safe(text) {
        text.to_string()
    } else {
        serde_json::to_string(text).unwrap_or_else(|_| format!("{text:?}"))
    }
}

fn plain_is_safe(text: &str) -> bool {
    const WORDS: &[&str] = &[
        "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~",
    ];
    let Some(first) = text.chars().next() else {
        return false;
    };
    // A duration (`15s`, `1m30s`) reads back as a string; a number never does.
    let duration_like = first.is_ascii_digit()
        && text.parse::<f64>().is_err()
        && !text.contains([':', '_'])
        && !text.starts_with("0x")
        && !text.starts_with("0o")
        && !text.starts_with("0b");
    (first.is_ascii_alphabetic() || first == '/' || first == '_' || duration_like)
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-' | ':'))
        && !text.ends_with(':')
        && !text.contains(": ")
        && !WORDS.contains(&text.to_ascii_lowercase().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Yaml {
        sonde_proto::config::from_yaml_str(std::path::Path::new("t.yml"), text).unwrap()
    }

    #[test]
    fn what_is_written_reads_back_the_same() {
        let text = r##"
a: [x, "1", 2, 2.5, true, "true", null, "", "http://h:80/p", "127.0.0.1:9115", "${1}://${2}", "a: b", "#c", "(.+);(.+)"]
b:
  - {k: v, l: [1, [2, 3]], m: {}}
  - []
  - - nested
c: {d: {e: "multi\nline"}}
"##;
        let value = parse(text);
        let mut out = String::new();
        for (k, v) in value.entries() {
            write_entry(&mut out, 0, k, v);
        }
        assert_eq!(parse(&out), value, "written:\n{out}");
    }

    #[test]
    fn strings_are_quoted_only_when_yaml_would_read_them_otherwise() {
        assert_eq!(scalar("http://prometheus.io"), "http://prometheus.io");
        assert_eq!(scalar("__param_target"), "__param_target");
        assert_eq!(scalar("127.0.0.1:9115"), "\"127.0.0.1:9115\"");
        assert_eq!(scalar("yes"), "\"yes\"");
        assert_eq!(scalar("1m30s"), "1m30s");
        assert_eq!(scalar("1e5"), "\"1e5\"");
        assert_eq!(scalar("1_000"), "\"1_000\"");
        assert_eq!(scalar("$1"), "\"$1\"");
        assert_eq!(scalar(""), "\"\"");
    }
}
