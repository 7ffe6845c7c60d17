//! Bytes written in YAML as text or as `!!binary` (base64), as blackbox_exporter's
//! `send: !!binary AAAACATSFi8=` (a PostgreSQL SSLRequest, not valid UTF-8).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// A byte string from a config: plain text, or `!!binary` decoded to its bytes.
///
/// In the JSON that carries a module to agents it is a string when the bytes are UTF-8
/// (as before binary values were accepted, so an older agent reads every text value),
/// and `{"base64": "..."}` otherwise (which an older agent refuses, module by module).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct YamlBytes(pub Vec<u8>);

impl YamlBytes {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// As text, with bytes that are not UTF-8 shown as escapes (`\x00`): what a log line shows.
impl fmt::Display for YamlBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

impl From<&str> for YamlBytes {
    fn from(text: &str) -> Self {
        YamlBytes(text.as_bytes().to_vec())
    }
}

impl From<String> for YamlBytes {
    fn from(text: String) -> Self {
        YamlBytes(text.into_bytes())
    }
}

impl Serialize for YamlBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("base64", &STANDARD.encode(&self.0))?;
                map.end()
            }
        }
    }
}

/// The tags YAML spells `!!binary` with (YAML 1.1's type repository).
fn is_binary_tag(tag: &str) -> bool {
    matches!(
        tag,
        "!!binary" | "!binary" | "tag:yaml.org,2002:binary" | "tag:yaml.org,2002:!binary"
    )
}

/// The JSON forms: a string, or `{"base64": "..."}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum WireForm {
    Text(String),
    Encoded { base64: String },
}

impl WireForm {
    fn into_bytes<E: de::Error>(self) -> Result<YamlBytes, E> {
        match self {
            WireForm::Text(text) => Ok(text.into()),
            WireForm::Encoded { base64 } => STANDARD
                .decode(base64.as_bytes())
                .map(YamlBytes)
                .map_err(|e| E::custom(format!("bad base64 in a byte string: {e}"))),
        }
    }
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = YamlBytes;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, or !!binary followed by base64")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<YamlBytes, E> {
        Ok(v.into())
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<YamlBytes, E> {
        Ok(YamlBytes(v.to_vec()))
    }

    /// serde-saphyr hands a tagged node over as `[value, tag]`: the scalar's text as
    /// written (base64 for `!!binary`, since the loader keeps binary scalars as text)
    /// and its tag.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<YamlBytes, A::Error> {
        let text: String = seq
            .next_element()?
            .ok_or_else(|| de::Error::custom("a byte string without a value"))?;
        let tag: Option<String> = seq.next_element()?;
        match tag.as_deref() {
            Some(tag) if is_binary_tag(tag) => {
                let compact: String = text.split_ascii_whitespace().collect();
                STANDARD
                    .decode(compact.as_bytes())
                    .map(YamlBytes)
                    .map_err(|e| {
                        de::Error::custom(format!("!!binary {text:?} is not valid base64: {e}"))
                    })
            }
            _ => Ok(text.into()),
        }
    }

    /// Any other format (JSON) calls this with the value itself.
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<YamlBytes, D::Error> {
        WireForm::deserialize(d)?.into_bytes()
    }
}

impl<'de> Deserialize<'de> for YamlBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The name serde-saphyr gives the tag of the node that follows.
        d.deserialize_newtype_struct("__yaml_tagged", BytesVisitor)
    }
}
