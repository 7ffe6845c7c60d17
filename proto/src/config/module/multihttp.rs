//! sonde's `multihttp` module: ordered HTTP steps sharing variables (log in, take the
//! token from the answer, call the API with it, check the JSON).
//!
//! Each step's `url`, header values and `body` are templates: `{{target}}` is the job's
//! target, `{{name}}` a variable an earlier step extracted, `{{file:/path}}` the
//! contents of a file (trimmed), read by the agent at every probe so that a rotated
//! secret is picked up without a reload. What a file holds is a secret: the agent never
//! shows it in samples, traces, failure reasons or logs. Everything is checked here at
//! load time: template syntax, variables used before a step extracts them, duplicate
//! step names, regexes, JSON paths and CEL expressions.

use super::{BasicAuth, HeaderMatch, IpProtocol, ModuleError, TlsConfig, check_tls, yes};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The most steps one module may have (each adds three series per target).
pub const MAX_STEPS: usize = 32;
/// The longest step name, in bytes (it is a label value of every step series).
pub const MAX_STEP_NAME_BYTES: usize = 64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiHttpProbe {
    #[serde(default)]
    pub steps: Vec<HttpStep>,
    #[serde(default)]
    pub preferred_ip_protocol: IpProtocol,
    #[serde(default = "yes")]
    pub ip_protocol_fallback: bool,
}

impl Default for MultiHttpProbe {
    fn default() -> Self {
        Self {
            steps: Vec::new(),
            preferred_ip_protocol: IpProtocol::Ip6,
            ip_protocol_fallback: true,
        }
    }
}

/// One request of a multihttp check, its assertions and the variables it extracts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStep {
    /// Unique within the module: the `step` label of the step's series.
    pub name: String,
    #[serde(default = "default_method")]
    pub method: String,
    /// A template; without a scheme, `http://` is assumed.
    pub url: String,
    /// Header values are templates; one value or a list.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, OneOrMany>,
    /// A template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "StepExpect::is_empty")]
    pub expect: StepExpect,
    /// Variables taken from the answer, by name, for the later steps.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extract: BTreeMap<String, Extract>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    #[serde(default, skip_serializing_if = "is_default_tls")]
    pub tls_config: TlsConfig,
    #[serde(default = "yes")]
    pub follow_redirects: bool,
}

fn is_default_tls(tls: &TlsConfig) -> bool {
    *tls == TlsConfig::default()
}

fn default_method() -> String {
    "GET".to_string()
}

/// A header's values: one string or a list of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn values(&self) -> &[String] {
        match self {
            OneOrMany::One(v) => std::slice::from_ref(v),
            OneOrMany::Many(vs) => vs,
        }
    }
}

/// What the answer of a step must be; all of it must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepExpect {
    /// Any of these status codes; empty means any 2xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status: Vec<u16>,
    /// Each header must have a value matching its regexp (a missing header fails
    /// unless `allow_missing`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_regexp: Vec<HeaderMatch>,
    /// The body must match each regexp.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_regexp: Vec<String>,
    /// A CEL expression over the body parsed as JSON (bound to `body`) that must be true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_json_cel: Option<String>,
}

impl StepExpect {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Where a variable's value comes from: exactly one of `json_path`, `regex` (with its
/// `group`) and `header`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extract {
    /// An RFC 9535 JSONPath over the body parsed as JSON; the first node it selects (a
    /// string as it is, anything else as JSON text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_path: Option<String>,
    /// A regex over the body; the value is its capture group `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// The capture group of `regex`: 1 by default (0 is the whole match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
    /// The first value of this response header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The value is a credential (a session token): hidden like a file's contents.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

impl Extract {
    /// The capture group a `regex` extraction takes.
    pub fn regex_group(&self) -> usize {
        self.group.unwrap_or(1)
    }
}

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    /// `{{target}}`.
    Target,
    /// `{{name}}`: a variable an earlier step extracted.
    Var(&'a str),
    /// `{{file:/path}}`: the file's contents, trimmed.
    File(&'a str),
}

/// Splits a template into its pieces. `{{` always opens a placeholder; inside, spaces
/// around the name are ignored.
pub fn parse_template(template: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            pieces.push(Piece::Text(&rest[..open]));
        }
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| {
            format!(
                "{{{{ at byte {} is not closed with }}}}",
                template.len() - rest.len() + open
            )
        })?;
        let inner = after[..close].trim();
        pieces.push(if inner == "target" {
            Piece::Target
        } else if let Some(path) = inner.strip_prefix("file:") {
            let path = path.trim();
            if !path.starts_with('/') {
                return Err(format!(
                    "{{{{file:{path}}}}} is not an absolute path; write it like {{{{file:/etc/sonde/api.password}}}}"
                ));
            }
            Piece::File(path)
        } else if is_variable_name(inner) {
            Piece::Var(inner)
        } else {
            return Err(format!(
                "{{{{{inner}}}}} is not a placeholder: use {{{{target}}}}, {{{{file:/path}}}} or {{{{name}}}} of a variable (letters, digits, _)"
            ));
        });
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// A variable name: a letter or `_`, then letters, digits and `_`; not `target`.
pub fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl HttpStep {
    /// Every template of the step, with the option it is in.
    pub fn templates(&self) -> Vec<(String, &str)> {
        let mut out = vec![("url".to_string(), self.url.as_str())];
        for (name, values) in &self.headers {
            for v in values.values() {
                out.push((format!("headers.{name}"), v.as_str()));
            }
        }
        if let Some(body) = &self.body {
            out.push(("body".to_string(), body.as_str()));
        }
        out
    }
}

impl MultiHttpProbe {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Every file the module names (templates' `{{file:}}`, TLS files, password files),
    /// with the option's name, for the agent's policy on assigned modules.
    pub fn files(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        for step in &self.steps {
            for (_, template) in step.templates() {
                for piece in parse_template(template).unwrap_or_default() {
                    if let Piece::File(path) = piece {
                        out.push(("multihttp.steps.{{file:}}", path));
                    }
                }
            }
            let tls = &step.tls_config;
            for (option, file) in [
                ("multihttp.steps.tls_config.ca_file", &tls.ca_file),
                ("multihttp.steps.tls_config.cert_file", &tls.cert_file),
                ("multihttp.steps.tls_config.key_file", &tls.key_file),
            ] {
                if let Some(f) = file {
                    out.push((option, f.as_str()));
                }
            }
            if let Some(f) = step
                .basic_auth
                .as_ref()
                .and_then(|b| b.password_file.as_ref())
            {
                out.push(("multihttp.steps.basic_auth.password_file", f.as_str()));
            }
        }
        out
    }

    pub(super) fn validate(&self) -> Result<(), ModuleError> {
        if self.steps.is_empty() {
            return Err(ModuleError::Option {
                option: "multihttp.steps".into(),
                problem: "the multihttp prober needs at least one step".into(),
            });
        }
        if self.steps.len() > MAX_STEPS {
            return Err(ModuleError::Option {
                option: "multihttp.steps".into(),
                problem: format!(
                    "{} steps, at most {MAX_STEPS}; split the check into several modules",
                    self.steps.len()
                ),
            });
        }
        let mut names = BTreeSet::new();
        let mut known: BTreeSet<&str> = BTreeSet::new();
        for (index, step) in self.steps.iter().enumerate() {
            let at = |field: &str| {
                if step.name.is_empty() {
                    format!("multihttp.steps[{index}].{field}")
                } else {
                    format!("multihttp.steps[{index}] {:?}.{field}", step.name)
                }
            };
            let err = |field: &str, problem: String| ModuleError::Option {
                option: at(field),
                problem,
            };
            if step.name.is_empty() {
                return Err(err(
                    "name",
                    "every step needs a name (its series' step label)".into(),
                ));
            }
            if step.name.len() > MAX_STEP_NAME_BYTES || step.name.chars().any(char::is_control) {
                return Err(err(
                    "name",
                    format!(
                        "a step name is at most {MAX_STEP_NAME_BYTES} bytes without control characters"
                    ),
                ));
            }
            if !names.insert(step.name.as_str()) {
                return Err(err(
                    "name",
                    "another step has this name; step names are unique within a module".into(),
                ));
            }
            if step.method.is_empty() || !step.method.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(err(
                    "method",
                    format!(
                        "{:?} is not an HTTP method (GET, HEAD, POST, ...)",
                        step.method
                    ),
                ));
            }
            for (name, values) in &step.headers {
                if !super::is_header_name(name) {
                    return Err(err(
                        "headers",
                        format!("{name:?} is not a valid header name"),
                    ));
                }
                if values
                    .values()
                    .iter()
                    .any(|v| v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0))
                {
                    return Err(err(
                        &format!("headers.{name}"),
                        "a value contains a line break or NUL byte".into(),
                    ));
                }
            }
            for (field, template) in step.templates() {
                for piece in parse_template(template).map_err(|p| err(&field, p))? {
                    if let Piece::Var(var) = piece
                        && !known.contains(var)
                    {
                        let earlier: Vec<&str> = known.iter().copied().collect();
                        return Err(err(
                            &field,
                            format!(
                                "{{{{{var}}}}} is not extracted by an earlier step (known here: {}); extract it in a step before this one",
                                if earlier.is_empty() {
                                    "target only".to_string()
                                } else {
                                    format!("target, {}", earlier.join(", "))
                                }
                            ),
                        ));
                    }
                }
            }
            for code in &step.expect.status {
                if !(100..=599).contains(code) {
                    return Err(err(
                        "expect.status",
                        format!("{code} is not an HTTP status code (100-599)"),
                    ));
                }
            }
            for m in &step.expect.header_regexp {
                if !super::is_header_name(&m.header) {
                    return Err(err(
                        "expect.header_regexp",
                        format!("{:?} is not a header name", m.header),
                    ));
                }
                regex(&m.regexp).map_err(|p| err("expect.header_regexp", p))?;
            }
            for re in &step.expect.body_regexp {
                regex(re).map_err(|p| err("expect.body_regexp", p))?;
            }
            if let Some(cel) = &step.expect.body_json_cel {
                super::compile_cel(&at("expect.body_json_cel"), cel)?;
            }
            let wrap = |e: ModuleError| err("", e.to_string());
            check_tls("multihttp", &step.tls_config).map_err(wrap)?;
            if let Some(b) = &step.basic_auth
                && b.password.is_some()
                && b.password_file.is_some()
            {
                return Err(err(
                    "basic_auth",
                    "set password or password_file, not both".into(),
                ));
            }
            for (var, source) in &step.extract {
                let field = format!("extract.{var}");
                if !is_variable_name(var) || var == "target" {
                    return Err(err(
                        &field,
                        "a variable name is a letter or _, then letters, digits and _ (and not target)".into(),
                    ));
                }
                let sources = usize::from(source.json_path.is_some())
                    + usize::from(source.regex.is_some())
                    + usize::from(source.header.is_some());
                if sources != 1 {
                    return Err(err(
                        &field,
                        "set exactly one of json_path, regex and header".into(),
                    ));
                }
                if source.group.is_some() && source.regex.is_none() {
                    return Err(err(&field, "group goes with regex".into()));
                }
                if let Some(path) = &source.json_path {
                    jsonpath_rust::parser::parse_json_path(path).map_err(|e| {
                        err(
                            &format!("{field}.json_path"),
                            format!("{path:?} is not a JSONPath (RFC 9535, like $.token or $.items[0].id): {e}"),
                        )
                    })?;
                }
                if let Some(re) = &source.regex {
                    let compiled = regex(re).map_err(|p| err(&format!("{field}.regex"), p))?;
                    let groups = compiled.captures_len() - 1;
                    if source.regex_group() > groups {
                        return Err(err(
                            &format!("{field}.group"),
                            format!(
                                "group {} of a regex with {groups} capture groups; add a group like (...) or set group: 0 for the whole match",
                                source.regex_group()
                            ),
                        ));
                    }
                }
                if let Some(h) = &source.header
                    && !super::is_header_name(h)
                {
                    return Err(err(
                        &format!("{field}.header"),
                        format!("{h:?} is not a header name"),
                    ));
                }
            }
            known.extend(step.extract.keys().map(String::as_str));
        }
        Ok(())
    }
}

fn regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(pattern).map_err(|e| format!("invalid regular expression {pattern:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::super::Module;
    use super::*;

    fn module(multihttp: serde_json::Value) -> Module {
        serde_json::from_value(serde_json::json!({"prober": "multihttp", "multihttp": multihttp}))
            .unwrap()
    }

    fn flow() -> serde_json::Value {
        serde_json::json!({"steps": [
            {"name": "login", "method": "POST", "url": "{{target}}/login",
             "headers": {"Content-Type": ["application/json"]},
             "body": "{\"user\": \"probe\", \"password\": \"{{file:/etc/sonde/api.password}}\"}",
             "expect": {"status": [200]},
             "extract": {"token": {"json_path": "$.token", "secret": true}}},
            {"name": "items", "url": "{{target}}/api/items",
             "headers": {"Authorization": "Bearer {{ token }}"},
             "expect": {"status": [200], "body_regexp": ["\"items\""],
                        "body_json_cel": "size(body.items) > 0"}}
        ]})
    }

    fn error(multihttp: serde_json::Value) -> String {
        module(multihttp).validate().unwrap_err().to_string()
    }

    #[test]
    fn the_designed_flow_loads_and_travels_as_json() {
        let m = module(flow());
        m.validate().unwrap();
        assert_eq!(m.multihttp.steps[1].method, "GET");
        assert_eq!(
            m.multihttp.files(),
            vec![("multihttp.steps.{{file:}}", "/etc/sonde/api.password")]
        );
        let again: Module = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(m, again);
        // Other modules do not carry the section, so older agents read them as before.
        let http: Module = serde_json::from_str(r#"{"prober":"http"}"#).unwrap();
        assert!(!serde_json::to_string(&http).unwrap().contains("multihttp"));
    }

    #[test]
    fn templates_split_into_pieces() {
        assert_eq!(
            parse_template("{{target}}/a?t={{ tok_1 }}&p={{file:/run/p}}").unwrap(),
            vec![
                Piece::Target,
                Piece::Text("/a?t="),
                Piece::Var("tok_1"),
                Piece::Text("&p="),
                Piece::File("/run/p"),
            ]
        );
        assert_eq!(parse_template("plain").unwrap(), vec![Piece::Text("plain")]);
        assert!(
            parse_template("a {{token")
                .unwrap_err()
                .contains("not closed")
        );
        assert!(
            parse_template("{{file:relative}}")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            parse_template("{{no-dash}}")
                .unwrap_err()
                .contains("not a placeholder")
        );
    }

    #[test]
    fn load_errors_name_the_step_and_the_fix() {
        let mut f = flow();
        f["steps"][1]["url"] = "{{target}}/api?t={{tokn}}".into();
        let e = error(f);
        assert!(
            e.starts_with("multihttp.steps[1] \"items\".url: {{tokn}} is not extracted by an earlier step (known here: target, token)"),
            "{e}"
        );

        // A step's own extraction is not there for its own request.
        let mut f = flow();
        f["steps"][0]["url"] = "{{target}}/login?{{token}}".into();
        assert!(error(f).contains("known here: target only"));

        let mut f = flow();
        f["steps"][1]["name"] = "login".into();
        let e = error(f);
        assert!(
            e.starts_with("multihttp.steps[1] \"login\".name: another step"),
            "{e}"
        );

        let mut f = flow();
        f["steps"][1]["expect"]["body_regexp"] = serde_json::json!(["("]);
        let e = error(f);
        assert!(
            e.starts_with(
                "multihttp.steps[1] \"items\".expect.body_regexp: invalid regular expression"
            ),
            "{e}"
        );

        let mut f = flow();
        f["steps"][0]["extract"]["token"]["json_path"] = "$.token[".into();
        let e = error(f);
        assert!(e.starts_with("multihttp.steps[0] \"login\".extract.token.json_path: \"$.token[\" is not a JSONPath"), "{e}");

        let mut f = flow();
        f["steps"][0]["extract"]["token"] = serde_json::json!({"regex": "token=\\w+"});
        assert!(error(f).contains("extract.token.group: group 1 of a regex with 0 capture groups"));

        let mut f = flow();
        f["steps"][0]["extract"]["token"] = serde_json::json!({"regex": "t=(\\w+)", "header": "X"});
        assert!(error(f).contains("set exactly one of json_path, regex and header"));

        let mut f = flow();
        f["steps"][1]["expect"]["body_json_cel"] = "body.items ==".into();
        assert!(error(f).contains("\"items\".expect.body_json_cel: the CEL expression"));

        let mut f = flow();
        f["steps"][0]["name"] = "".into();
        assert!(error(f).starts_with("multihttp.steps[0].name: every step needs a name"));

        assert!(error(serde_json::json!({"steps": []})).contains("at least one step"));

        let mut f = flow();
        f["steps"][1]["headers"]["Authorization"] = "Bearer {{token".into();
        assert!(error(f).starts_with(
            "multihttp.steps[1] \"items\".headers.Authorization: {{ at byte 7 is not closed"
        ));

        let unknown = serde_json::from_value::<Module>(serde_json::json!({
            "prober": "multihttp", "multihttp": {"steps": [{"name": "a", "url": "x", "expekt": {}}]}
        }));
        assert!(unknown.is_err());
    }
}
