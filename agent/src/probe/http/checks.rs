//! blackbox_exporter's checks on the final response, in its order: status code, header
//! and body regexes, HTTP version, `fail_if_ssl` / `fail_if_not_ssl`.

use super::body::BodyRead;
use super::conn::version_name;
use crate::probe::{BadRegex, Because, Env, Failure, ProbeLog, Reason, Samples};
use http::header::{HeaderMap, HeaderValue};
use http::{StatusCode, Version};
use sonde_proto::config::module::HttpProbe;
use sonde_proto::trace::{Step, body_excerpt};

/// What the checks after the last response need.
pub(super) struct FinalResponse {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) tls: bool,
    /// Kept only when header regexes need them.
    pub(super) headers: Option<HeaderMap>,
    /// Set when the body was not read (a redirect that was not followed).
    pub(super) body: Option<BodyRead>,
    /// Why the body could not be read to its end.
    pub(super) body_error: Option<Failure>,
}

impl FinalResponse {
    /// blackbox_exporter's checks, in its order; the first failure is the reason.
    pub(super) fn check(
        self,
        ctx: &Env<'_>,
        cfg: &HttpProbe,
        out: &mut Samples,
    ) -> Result<(), Failure> {
        let mut failure: Option<Failure> = None;
        let status_valid = status_ok(cfg, self.status);
        crate::probe_log!(
            out.log,
            Debug,
            "Checked the status code",
            status_code = self.status.as_u16(),
            valid = status_valid,
            wanted = if cfg.valid_status_codes.is_empty() {
                "2xx".to_string()
            } else {
                format!("{:?}", cfg.valid_status_codes)
            }
        );
        if !status_valid {
            failure = Some(Failure::new(
                Reason::HttpStatus,
                if cfg.valid_status_codes.is_empty() {
                    format!("http status {} is not 2xx", self.status.as_u16())
                } else {
                    format!(
                        "http status {} not in valid_status_codes",
                        self.status.as_u16()
                    )
                },
            ));
        }
        if failure.is_none()
            && let Some(headers) = &self.headers
        {
            let why =
                header_regex_failure(ctx, cfg, headers, &mut out.log).because(Reason::Config)?;
            out.set(
                "probe_failed_due_to_regex",
                f64::from(u8::from(why.is_some())),
            );
            failure = why.map(|m| Failure::new(Reason::Regex, m));
        }
        if failure.is_none()
            && let Some(body) = &self.body
            && let Some((why, regexp)) =
                body_regex_failure(ctx, cfg, body, &mut out.log).because(Reason::Config)?
        {
            out.set("probe_failed_due_to_regex", 1.0);
            out.note(Step::Body {
                excerpt: body_excerpt(&body.kept),
                regexp: regexp.to_string(),
            });
            failure = Some(Failure::new(Reason::Regex, why));
        }
        if failure.is_none()
            && let Some(body) = &self.body
            && super::cel_match::configured(cfg)
        {
            let why = super::cel_match::failure(cfg, body);
            out.set(
                "probe_failed_due_to_cel",
                f64::from(u8::from(why.is_some())),
            );
            failure = why.map(|m| Failure::new(Reason::Regex, m));
        }
        if let Some(e) = self.body_error {
            failure.get_or_insert(e);
        }
        if !cfg.valid_http_versions.is_empty() {
            let name = version_name(self.version);
            if !cfg.valid_http_versions.iter().any(|v| v == name) {
                failure.get_or_insert(Failure::new(
                    Reason::HttpVersion,
                    format!("{name} not in valid_http_versions"),
                ));
            }
        }
        if self.tls && cfg.fail_if_ssl {
            failure.get_or_insert(Failure::new(
                Reason::Tls,
                "final response was over TLS (fail_if_ssl)",
            ));
        }
        if !self.tls && cfg.fail_if_not_ssl {
            failure.get_or_insert(Failure::new(
                Reason::Tls,
                "final response was not over TLS (fail_if_not_ssl)",
            ));
        }
        match failure {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

pub(super) fn status_ok(cfg: &HttpProbe, status: StatusCode) -> bool {
    if cfg.valid_status_codes.is_empty() {
        status.is_success()
    } else {
        cfg.valid_status_codes.contains(&status.as_u16())
    }
}

/// blackbox_exporter's header checks: a missing header fails unless `allow_missing`;
/// otherwise any value matching (`fail_if_header_matches`) or none matching
/// (`fail_if_header_not_matches`) fails.
fn header_regex_failure(
    ctx: &Env<'_>,
    cfg: &HttpProbe,
    headers: &HeaderMap,
    log: &mut ProbeLog,
) -> Result<Option<String>, BadRegex> {
    for (spec, fail_on_match) in cfg
        .fail_if_header_matches
        .iter()
        .map(|m| (m, true))
        .chain(cfg.fail_if_header_not_matches.iter().map(|m| (m, false)))
    {
        let values: Vec<&[u8]> = headers
            .get_all(spec.header.as_str())
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if values.is_empty() {
            crate::probe_log!(
                log,
                Debug,
                "Header to check is missing",
                header = spec.header,
                allow_missing = spec.allow_missing
            );
            if spec.allow_missing {
                continue;
            }
            return Ok(Some(format!("header {} is missing", spec.header)));
        }
        let re = ctx.regex(&spec.regexp)?;
        let any = values.iter().any(|v| re.is_match(v));
        crate::probe_log!(
            log,
            Debug,
            "Checked a header against a regular expression",
            header = spec.header,
            regexp = spec.regexp,
            matched = any,
            fails_on = if fail_on_match { "match" } else { "no match" }
        );
        if fail_on_match && any {
            return Ok(Some(format!(
                "header {} matched {:?}",
                spec.header, spec.regexp
            )));
        }
        if !fail_on_match && !any {
            return Ok(Some(format!(
                "header {} did not match {:?}",
                spec.header, spec.regexp
            )));
        }
    }
    Ok(None)
}

/// The first body regexp that fails, with the failure in words.
pub(crate) fn body_regex_failure<'c>(
    ctx: &Env<'_>,
    cfg: &'c HttpProbe,
    body: &BodyRead,
    log: &mut ProbeLog,
) -> Result<Option<(String, &'c str)>, BadRegex> {
    let note = if body.truncated {
        " (in its first 10 MiB)"
    } else {
        ""
    };
    for pattern in &cfg.fail_if_body_matches_regexp {
        let matched = ctx.regex(pattern)?.is_match(&body.kept);
        crate::probe_log!(
            log,
            Debug,
            "Checked the body against fail_if_body_matches_regexp",
            regexp = pattern,
            matched = matched
        );
        if matched {
            return Ok(Some((format!("body matched {pattern:?}{note}"), pattern)));
        }
    }
    for pattern in &cfg.fail_if_body_not_matches_regexp {
        let matched = ctx.regex(pattern)?.is_match(&body.kept);
        crate::probe_log!(
            log,
            Debug,
            "Checked the body against fail_if_body_not_matches_regexp",
            regexp = pattern,
            matched = matched
        );
        if !matched {
            return Ok(Some((
                format!("body did not match {pattern:?}{note}"),
                pattern,
            )));
        }
    }
    Ok(None)
}
