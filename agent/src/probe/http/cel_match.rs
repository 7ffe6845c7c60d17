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

/// Every JSON number as a double, as Go's `json.Unmarshal` into `any` gives them to
/// cel-go: `body.count == 2` and `body.count > 1.5` hold for `{"count": 2}`, and
/// `body.count + 1` fails (no double + int), as in blackbox_exporter.
fn numbers_as_doubles(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) => {
            if let Some(d) = n.as_f64().and_then(serde_json::Number::from_f64) {
                *n = d;
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(numbers_as_doubles),
        serde_json::Value::Object(map) => map.values_mut().for_each(numbers_as_doubles),
        _ => {}
    }
}

/// Why the body fails the module's CEL expressions, `None` when it passes.
pub(super) fn failure(cfg: &HttpProbe, body: &BodyRead) -> Option<String> {
    if body.truncated {
        return Some(
            "the body is larger than the 10 MiB the CEL expressions are evaluated on".into(),
        );
    }
    let json: serde_json::Value = match serde_json::from_slice(&body.kept) {
        Ok(mut json) => {
            numbers_as_doubles(&mut json);
            json
        }
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

#[cfg(test)]
mod tests {
    use crate::probe::test_support::{ctx, module_with, sample};
    use crate::probe::{Reason, run};
    use sonde_proto::config::Prober;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An HTTP/1.1 server answering every request with `body` as JSON.
    async fn json_server(body: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}/")
    }

    async fn probe(body: &'static str, http: serde_json::Value) -> crate::probe::ProbeOutcome {
        let target = json_server(body).await;
        let m = module_with(Prober::Http, http);
        run(&ctx(), &target, &m, Duration::from_secs(3)).await
    }

    #[tokio::test]
    async fn cel_on_a_json_body_as_blackbox_binds_it() {
        // blackbox_exporter's example: `body.foo == 'bar' && body.baz.startsWith('q')`.
        let example = serde_json::json!({
            "fail_if_body_json_not_matches_cel": "body.foo == 'bar' && body.baz.startsWith('q')"
        });
        let o = probe(r#"{"foo": "bar", "baz": "qux"}"#, example.clone()).await;
        assert!(o.success, "{:?}", o.failure);
        assert_eq!(sample(&o, "probe_failed_due_to_cel"), Some(0.0));
        // An aggregator refuses any other name from an agent.
        for s in &o.samples {
            assert!(sonde_proto::help::is_probe_metric(s.name), "{}", s.name);
        }

        let o = probe(r#"{"foo": "bar", "baz": "zap"}"#, example.clone()).await;
        assert!(!o.success);
        assert_eq!(o.failure_reason, Some(Reason::Regex));
        assert_eq!(sample(&o, "probe_failed_due_to_cel"), Some(1.0));

        // Not JSON: a failure, as blackbox_exporter's.
        let o = probe("<html>down</html>", example).await;
        assert!(!o.success);
        assert!(
            o.failure.as_deref().unwrap().contains("not JSON"),
            "{:?}",
            o.failure
        );
        assert_eq!(sample(&o, "probe_failed_due_to_cel"), Some(1.0));

        let matches = serde_json::json!({
            "fail_if_body_json_matches_cel": "body.items.exists(i, i.state == 'broken')"
        });
        let o = probe(
            r#"{"items": [{"state": "ok"}, {"state": "broken"}]}"#,
            matches.clone(),
        )
        .await;
        assert!(!o.success);
        assert_eq!(sample(&o, "probe_failed_due_to_cel"), Some(1.0));
        let o = probe(r#"{"items": [{"state": "ok"}]}"#, matches).await;
        assert!(o.success, "{:?}", o.failure);

        // Numbers are doubles, as Go decodes JSON: they compare with ints and doubles.
        let compare = serde_json::json!({
            "fail_if_body_json_not_matches_cel": "body.count == 2 && body.count > 1.5 && body.count < 3"
        });
        let o = probe(r#"{"count": 2}"#, compare).await;
        assert!(o.success, "{:?}", o.failure);

        // A result that is not a boolean fails.
        let number = serde_json::json!({"fail_if_body_json_matches_cel": "body.count + 1.0"});
        let o = probe(r#"{"count": 2}"#, number).await;
        assert!(!o.success);
        assert!(
            o.failure.as_deref().unwrap().contains("not a boolean"),
            "{:?}",
            o.failure
        );

        // Without a CEL option the sample is not there, as blackbox_exporter registers
        // it only then.
        let o = probe(r#"{}"#, serde_json::json!({})).await;
        assert_eq!(sample(&o, "probe_failed_due_to_cel"), None);
    }
}
