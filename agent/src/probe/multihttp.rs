//! The multihttp prober: the module's steps in order, each one request made by the http
//! prober's machinery ([`super::http::request`]: connect policy, TLS, redirects, body
//! limits and checks), its answer checked against the step's `expect` and its
//! variables extracted for the steps after it. The first step that fails ends the run
//! and is the failure reason; the steps after it are not reached and have no series.
//!
//! Secrets: what `{{file:}}` placeholders read, and variables extracted with
//! `secret: true`, are collected in [`Secrets`] as the run goes, and every text that
//! leaves the probe (failure reason, trace, log lines) passes through it, so that they
//! show as `<secret>`. Samples carry only step names and numbers.

use super::http::{self, Answer};
use super::log::ProbeLog;
use super::{Env, Failure, Reason, Samples, timed_out};
use sonde_proto::config::Module;
use sonde_proto::config::module::HttpProbe;
use sonde_proto::config::module::multihttp::{
    Extract, HttpStep, MultiHttpProbe, Piece, parse_template,
};
use sonde_proto::trace::Step;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const SUCCESS: &str = "probe_multihttp_step_success";
const DURATION: &str = "probe_multihttp_step_duration_seconds";
const STATUS: &str = "probe_multihttp_step_status_code";
/// The most a `{{file:}}` placeholder reads: a secret, not a document.
const MAX_FILE_BYTES: u64 = 64 << 10;
const HIDDEN: &str = "<secret>";

pub(crate) async fn probe(
    env: &Env<'_>,
    target: &str,
    module: &Module,
    deadline: tokio::time::Instant,
    timeout: Duration,
    out: &mut Samples,
) -> Result<(), Failure> {
    let cfg = &module.multihttp;
    let mut run = Run {
        target,
        vars: HashMap::new(),
        secrets: Secrets::default(),
    };
    for step in &cfg.steps {
        let started = Instant::now();
        crate::probe_log!(out.log, Info, "Running step", step = step.name);
        let mut sub = Samples::with_log(if out.log.is_on() {
            ProbeLog::on()
        } else {
            ProbeLog::default()
        });
        let result =
            match tokio::time::timeout_at(deadline, run.step(env, cfg, step, &mut sub)).await {
                Ok(r) => r,
                Err(_) => Err(timed_out(&mut sub, timeout)),
            };
        let status = sub
            .items
            .iter()
            .find(|s| s.name == "probe_http_status_code" && s.labels.is_empty())
            .map_or(0.0, |s| s.value);
        let labels = [("step", step.name.as_str())];
        out.gauge_with(SUCCESS, &labels, if result.is_ok() { 1.0 } else { 0.0 });
        out.gauge_with(DURATION, &labels, started.elapsed().as_secs_f64());
        out.gauge_with(STATUS, &labels, status);
        run.keep_trace_and_log(&step.name, sub, out);
        match result {
            Ok(()) => crate::probe_log!(
                out.log,
                Info,
                "Step succeeded",
                step = step.name,
                duration_seconds = started.elapsed().as_secs_f64()
            ),
            Err(f) => {
                let message = run.secrets.redact(&f.message);
                crate::probe_log!(
                    out.log,
                    Error,
                    "Step failed",
                    step = step.name,
                    err = message
                );
                return Err(Failure::new(
                    f.reason,
                    format!("step {:?}: {message}", step.name),
                ));
            }
        }
    }
    Ok(())
}

/// What the steps of one run share.
struct Run<'a> {
    target: &'a str,
    /// Variables extracted so far.
    vars: HashMap<String, String>,
    secrets: Secrets,
}

impl Run<'_> {
    /// One step: its request (templates filled in), its checks, its extractions.
    async fn step(
        &mut self,
        env: &Env<'_>,
        cfg: &MultiHttpProbe,
        step: &HttpStep,
        sub: &mut Samples,
    ) -> Result<(), Failure> {
        let request = self.request_config(cfg, step)?;
        let url = self.render(&step.url)?;
        let mut answer = None;
        let checked = http::request(env, &url, &request, sub, Some(&mut answer)).await;
        if let Err(f) = checked {
            if f.reason == Reason::HttpStatus {
                let status = sub
                    .items
                    .iter()
                    .find(|s| s.name == "probe_http_status_code")
                    .map_or(0.0, |s| s.value);
                return Err(Failure::new(
                    Reason::HttpStatus,
                    if step.expect.status.is_empty() {
                        format!("status {status} is not 2xx")
                    } else {
                        format!("status {status} not in {:?}", step.expect.status)
                    },
                ));
            }
            return Err(f);
        }
        let Some(answer) = answer else {
            return Ok(());
        };
        for (name, source) in &step.extract {
            let value = extract(env, source, &answer)
                .map_err(|why| Failure::new(Reason::Regex, format!("extract {name}: {why}")))?;
            if source.secret {
                self.secrets.add(&value);
            }
            crate::probe_log!(
                sub.log,
                Debug,
                "Extracted a variable",
                name = name,
                bytes = value.len(),
                secret = source.secret
            );
            self.vars.insert(name.clone(), value);
        }
        Ok(())
    }

    /// The step as the http prober's options, its templates filled in.
    fn request_config(
        &mut self,
        cfg: &MultiHttpProbe,
        step: &HttpStep,
    ) -> Result<HttpProbe, Failure> {
        let mut headers = BTreeMap::new();
        let mut http_headers = BTreeMap::new();
        for (name, values) in &step.headers {
            let values: Vec<String> = values
                .values()
                .iter()
                .map(|v| self.render(v))
                .collect::<Result<_, _>>()?;
            match values.as_slice() {
                // One value goes in `headers`, where a Host header overrides the URL's.
                [one] => {
                    headers.insert(name.clone(), one.clone());
                }
                _ => {
                    http_headers.insert(
                        name.clone(),
                        sonde_proto::config::module::HeaderSources {
                            values,
                            ..Default::default()
                        },
                    );
                }
            }
        }
        let body = step.body.as_deref().map(|b| self.render(b)).transpose()?;
        let expect = &step.expect;
        Ok(HttpProbe {
            method: step.method.clone(),
            headers,
            http_headers,
            body,
            valid_status_codes: expect.status.clone(),
            fail_if_header_not_matches: expect.header_regexp.clone(),
            fail_if_body_not_matches_regexp: expect.body_regexp.clone(),
            fail_if_body_json_not_matches_cel: expect.body_json_cel.clone(),
            basic_auth: step.basic_auth.clone(),
            tls_config: step.tls_config.clone(),
            follow_redirects: step.follow_redirects,
            preferred_ip_protocol: cfg.preferred_ip_protocol,
            ip_protocol_fallback: cfg.ip_protocol_fallback,
            ..HttpProbe::default()
        })
    }

    /// A template with its placeholders filled in; a file's contents become secrets.
    fn render(&mut self, template: &str) -> Result<String, Failure> {
        let pieces = parse_template(template).map_err(|e| Failure::new(Reason::Config, e))?;
        let mut out = String::with_capacity(template.len());
        for piece in pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Target => out.push_str(self.target),
                Piece::Var(name) => match self.vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => {
                        return Err(Failure::new(
                            Reason::Config,
                            format!("{{{{{name}}}}} has no value: no earlier step extracted it"),
                        ));
                    }
                },
                Piece::File(path) => {
                    let value = read_secret_file(path).map_err(|e| {
                        Failure::new(Reason::Config, format!("{{{{file:{path}}}}}: {e}"))
                    })?;
                    self.secrets.add(&value);
                    out.push_str(&value);
                }
            }
        }
        Ok(out)
    }

    /// Adds a step's trace and log to the probe's, its secrets hidden, its status lines
    /// and log lines naming the step.
    fn keep_trace_and_log(&self, step: &str, mut sub: Samples, out: &mut Samples) {
        for s in std::mem::take(&mut sub.trace.steps) {
            let s = self.secrets.redact_step(s);
            out.trace.push(match s {
                Step::HttpStatus { line } => Step::HttpStatus {
                    line: format!("step {step:?}: {line}"),
                },
                other => other,
            });
        }
        sub.log.rewrite_values(|v| self.secrets.redact(v));
        out.log.append(sub.log, ("step", step));
    }
}

/// A file's contents, trimmed as Prometheus trims its `*_file` secrets.
fn read_secret_file(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text.trim().to_string())
}

/// A variable's value from the answer, or why there is none.
fn extract(env: &Env<'_>, source: &Extract, answer: &Answer) -> Result<String, String> {
    if let Some(path) = &source.json_path {
        use jsonpath_rust::JsonPath;
        let json: serde_json::Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("the body is not JSON ({e}), for json_path {path}"))?;
        let found = json
            .query(path)
            .map_err(|e| format!("json_path {path}: {e}"))?;
        return match found.first() {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Ok(other.to_string()),
            None => Err(format!("json_path {path} selects nothing in the body")),
        };
    }
    if let Some(pattern) = &source.regex {
        let re = env.regex(pattern).map_err(|e| e.to_string())?;
        let group = source.regex_group();
        return re
            .captures(&answer.body)
            .and_then(|c| c.get(group))
            .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
            .ok_or_else(|| format!("regex {pattern:?} (group {group}) does not match the body"));
    }
    if let Some(header) = &source.header {
        return answer
            .headers
            .get(header.as_str())
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .ok_or_else(|| format!("the answer has no {header} header"));
    }
    Err("nothing to extract from (json_path, regex or header)".into())
}

/// Values never to show, in the forms they may take in a text: as they are, escaped in
/// JSON, and URL-encoded.
#[derive(Debug, Default)]
struct Secrets {
    /// Longest first, so that a secret containing another is hidden whole.
    forms: Vec<String>,
}

impl Secrets {
    fn add(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        let quoted = serde_json::to_string(secret).unwrap_or_default();
        let json = quoted
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .unwrap_or_default()
            .to_string();
        let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let percent = encoded.replace('+', "%20");
        for form in [secret.to_string(), json, encoded, percent] {
            if !form.is_empty() && !self.forms.contains(&form) {
                self.forms.push(form);
            }
        }
        self.forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    }

    /// `text` with every secret replaced by `<secret>`, and a secret's beginning at its
    /// end too (a body excerpt or a log value cut in the middle of one).
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for form in &self.forms {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), HIDDEN);
            }
        }
        let (body, ellipsis) = match out.strip_suffix('…') {
            Some(b) => (b.to_string(), "…"),
            None => (out.clone(), ""),
        };
        for form in &self.forms {
            // A cut secret of a character or two says nothing; more is hidden.
            let shortest = 3.min(form.len());
            let cut = (shortest..form.len())
                .rev()
                .filter(|k| form.is_char_boundary(*k))
                .find(|k| body.ends_with(&form[..*k]));
            if let Some(k) = cut {
                return format!("{}{HIDDEN}{ellipsis}", &body[..body.len() - k]);
            }
        }
        out
    }

    fn redact_step(&self, step: Step) -> Step {
        let r = |s: String| self.redact(&s);
        match step {
            Step::Dns {
                name,
                addresses,
                error,
            } => Step::Dns {
                name: r(name),
                addresses,
                error: error.map(r),
            },
            Step::Connect {
                address,
                ok,
                error,
                seconds,
            } => Step::Connect {
                address,
                ok,
                error: error.map(r),
                seconds,
            },
            Step::Tls { error } => Step::Tls { error: r(error) },
            Step::HttpStatus { line } => Step::HttpStatus { line: r(line) },
            Step::Body { excerpt, regexp } => Step::Body {
                excerpt: r(excerpt),
                regexp: r(regexp),
            },
            Step::Timeout { during } => Step::Timeout { during: r(during) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::test_support::ctx;

    fn env(ctx: &crate::probe::ProbeContext) -> Env<'_> {
        Env {
            ctx,
            policy: None,
            pinned: None,
        }
    }

    #[test]
    fn secrets_are_hidden_whole_escaped_encoded_and_cut() {
        let mut s = Secrets::default();
        s.add("hunter2 \"x\"");
        assert_eq!(s.redact("pw=hunter2 \"x\"!"), "pw=<secret>!");
        assert_eq!(
            s.redact(r#"{"password": "hunter2 \"x\""}"#),
            r#"{"password": "<secret>"}"#
        );
        assert_eq!(s.redact("/login?p=hunter2+%22x%22"), "/login?p=<secret>");
        assert_eq!(s.redact("/login?p=hunter2%20%22x%22"), "/login?p=<secret>");
        // An excerpt cut inside the secret.
        assert_eq!(s.redact("{\"echo\": \"hunte"), "{\"echo\": \"<secret>");
        assert_eq!(s.redact("said hunt…"), "said <secret>…");
        // Two letters of it say nothing and are left.
        assert_eq!(s.redact("a hu"), "a hu");
        assert_eq!(s.redact("nothing here"), "nothing here");
        let step = s.redact_step(Step::Body {
            excerpt: "bad password hunter2 \"x\"".into(),
            regexp: "ok".into(),
        });
        assert_eq!(
            step,
            Step::Body {
                excerpt: "bad password <secret>".into(),
                regexp: "ok".into()
            }
        );
    }

    #[test]
    fn templates_fill_in_target_variables_and_files() {
        let dir = std::env::temp_dir().join(format!("sonde-multihttp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "  s3cret\n").unwrap();
        let mut run = Run {
            target: "http://127.0.0.1:8080",
            vars: HashMap::from([("token".to_string(), "t0k".to_string())]),
            secrets: Secrets::default(),
        };
        let template = format!(
            "{{{{target}}}}/a?t={{{{token}}}}&p={{{{ file:{} }}}}",
            file.display()
        );
        assert_eq!(
            run.render(&template).unwrap(),
            "http://127.0.0.1:8080/a?t=t0k&p=s3cret"
        );
        // The file's contents are a secret from now on; the variable is not.
        assert_eq!(run.secrets.redact("p=s3cret t=t0k"), "p=<secret> t=t0k");
        let missing = run.render("{{other}}").unwrap_err();
        assert_eq!(missing.reason, Reason::Config);
        assert!(missing.message.contains("no earlier step extracted it"));
        let unreadable = run.render("{{file:/nonexistent/sonde/pw}}").unwrap_err();
        assert!(
            unreadable
                .message
                .starts_with("{{file:/nonexistent/sonde/pw}}: "),
            "{}",
            unreadable.message
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn variables_come_from_json_path_regex_group_and_header() {
        let ctx = ctx();
        let env = env(&ctx);
        let mut headers = ::http::HeaderMap::new();
        headers.insert("x-token", "h-123".parse().unwrap());
        let answer = Answer {
            headers,
            body: br#"{"token": "abc", "n": 2, "items": [{"id": 7}, {"id": 8, "state": "ok"}], "html": "id=<b>x9</b>"}"#
                .to_vec(),
        };
        let source = |json: serde_json::Value| -> Extract { serde_json::from_value(json).unwrap() };
        let get = |json| extract(&env, &source(json), &answer);
        assert_eq!(
            get(serde_json::json!({"json_path": "$.token"})),
            Ok("abc".into())
        );
        assert_eq!(get(serde_json::json!({"json_path": "$.n"})), Ok("2".into()));
        assert_eq!(
            get(serde_json::json!({"json_path": "$.items[0].id"})),
            Ok("7".into())
        );
        assert_eq!(
            get(serde_json::json!({"json_path": "$['items'][0]"})),
            Ok(r#"{"id":7}"#.into())
        );
        assert_eq!(
            get(serde_json::json!({"json_path": "$.items[-1].id"})),
            Ok("8".into())
        );
        assert_eq!(
            get(serde_json::json!({"json_path": "$..id"})),
            Ok("7".into())
        );
        assert_eq!(
            get(serde_json::json!({"json_path": "$.items[?@.state == 'ok'].id"})),
            Ok("8".into())
        );
        assert!(
            get(serde_json::json!({"json_path": "$.nope"}))
                .unwrap_err()
                .contains("selects nothing")
        );
        assert_eq!(
            get(serde_json::json!({"regex": "<b>(\\w+)</b>"})),
            Ok("x9".into())
        );
        assert_eq!(
            get(serde_json::json!({"regex": "id=<b>\\w+", "group": 0})),
            Ok("id=<b>x9".into())
        );
        assert!(
            get(serde_json::json!({"regex": "zzz(z)"}))
                .unwrap_err()
                .contains("does not match")
        );
        assert_eq!(
            get(serde_json::json!({"header": "X-Token"})),
            Ok("h-123".into())
        );
        assert!(
            get(serde_json::json!({"header": "X-Other"}))
                .unwrap_err()
                .contains("no X-Other header")
        );
        let not_json = Answer {
            headers: ::http::HeaderMap::new(),
            body: b"<html>".to_vec(),
        };
        assert!(
            extract(
                &env,
                &source(serde_json::json!({"json_path": "$.a"})),
                &not_json
            )
            .unwrap_err()
            .contains("not JSON")
        );
    }
}
