//! `fail_if_body_json_matches_cel` / `fail_if_body_json_not_matches_cel`, as
//! blackbox_exporter evaluates them: the body parsed as JSON is bound to `body`; a body
//! that is not JSON, an evaluation error or a result that is not a boolean fails the
//! probe, as does a true (matches) or false (not matches) result.

use super::body::BodyRead;
use sonde_proto::config::module::{HttpProbe, compile_cel};

/// True when the module has a CEL expression.
pub(super) fn configured(cfg: &HttpProbe) -> bool {
    cfg.fail_if_body_json_matches_cel.is_some() || cfg.fail_if_body_json_not_matches_cel.is_some()
}

/// Why the body fails the module's CEL expressions, `None` when it passes.
pub(super) fn failure(cfg: &HttpProbe, body: &BodyRead) -> Option<String> {
    if body.truncated {
        return Some(
            "the body is larger than the 10 MiB the CEL expressions are evaluated on".into(),
        );
    }
    let json: serde_json::Value = match serde_json::from_slice(&body.kept) {
        Ok(json) => json,
        Err(e) => {
            return Some(format!(
                "the body is not JSON ({e}), for the CEL expressions"
            ));
        }
    };
    let mut context = cel::Context::default();
    if let Err(e) = context.add_variable("body", json) {
        return Some(format!("the JSON body cannot be given to CEL: {e}"));
    }
    for (option, expression, fail_when) in [
        (
            "fail_if_body_json_matches_cel",
            &cfg.fail_if_body_json_matches_cel,
            true,
        ),
        (
            "fail_if_body_json_not_matches_cel",
            &cfg.fail_if_body_json_not_matches_cel,
            false,
        ),
    ] {
        let Some(expression) = expression else {
            continue;
        };
        let program = match compile_cel(option, expression) {
            Ok(p) => p,
            Err(e) => return Some(e.to_string()),
        };
        match program.execute(&context) {
            Ok(cel::Value::Bool(result)) if result == fail_when => {
                return Some(if fail_when {
                    format!("the body matched the CEL expression {expression:?}")
                } else {
                    format!("the body did not match the CEL expression {expression:?}")
                });
            }
            Ok(cel::Value::Bool(_)) => {}
            Ok(other) => {
                return Some(format!(
                    "the CEL expression {expression:?} gave {other:?}, not a boolean"
                ));
            }
            Err(e) => {
                return Some(format!(
                    "the CEL expression {expression:?} failed on the body: {e}"
                ));
            }
        }
    }
    None
}
