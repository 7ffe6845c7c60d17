//! The multihttp prober against a real login/token/API server (hyper on loopback, in
//! this test), through the real `sonde-agent` and `sonde-aggregator` binaries:
//! - `/probe` on the agent: the whole flow succeeds with each step's series; a wrong
//!   password fails at the login step; a token that expires while a slow step runs
//!   fails at the API step; each failure names its step;
//! - the same module assigned by an aggregator: the per-step series in its `/metrics`,
//!   the failure and the trace naming the step in `/api/v1/targets`;
//! - the password read from `{{file:}}` and the tokens the server issued (extracted as
//!   secrets) appear nowhere: not in `/probe?debug=true`, the agent's `/logs`, the
//!   aggregator's series, traces or target page, although the server echoes the password
//!   in a response header;
//! - `check-config` refuses a module that uses a variable before a step extracts it,
//!   naming the module and the step.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sonde_tests::{Scene, http_get, run, sonde_bin, start_agent, start_aggregator};
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PASSWORD: &str = "correct-horse-battery";
const WRONG_PASSWORD: &str = "tr0ub4dor-and-3";
/// How long the server's slow page takes: longer than a short-lived token lasts.
const SLOW: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_secs(60);

/// The API server's state: the tokens it issued and until when each is valid.
#[derive(Default)]
struct Api {
    tokens: HashMap<String, Instant>,
    issued: Vec<String>,
}

/// A login/token/API server on loopback:
/// - `POST /login` with `{"user": "probe", "password": PASSWORD}` answers
///   `{"token": ...}`, valid for `lifetime`; any other password 401. Every answer echoes
///   the password it was sent in an `X-Echo-Password` header (a careless server).
/// - `GET /slow` answers 200 after [`SLOW`].
/// - `GET /api/items` with `Authorization: Bearer <valid token>` answers
///   `{"items": [...]}`; a missing, unknown or expired token 401.
fn start_api(runtime: &tokio::runtime::Runtime, lifetime: Duration) -> (String, Arc<Mutex<Api>>) {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the API server");
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new(Mutex::new(Api::default()));
    let shared = state.clone();
    runtime.spawn(async move {
        let mut serial = 0u64;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            serial += 1;
            let state = shared.clone();
            let connection = serial;
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move { answer(request, &state, lifetime, connection).await }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://127.0.0.1:{port}"), state)
}

async fn answer(
    request: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<Api>,
    lifetime: Duration,
    connection: u64,
) -> Result<hyper::Response<Full<Bytes>>, hyper::http::Error> {
    let reply = |status: u16, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(body)))
    };
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let bearer = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    match (method.as_str(), path.as_str()) {
        ("POST", "/login") => {
            let body = request.into_body().collect().await.map(|b| b.to_bytes());
            let json: serde_json::Value = body
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let password = json["password"].as_str().unwrap_or_default().to_string();
            let echo = |status: u16, body: String| {
                hyper::Response::builder()
                    .status(status)
                    .header("Content-Type", "application/json")
                    .header("X-Echo-Password", password.as_str())
                    .body(Full::new(Bytes::from(body)))
            };
            if json["user"] != "probe" || password != PASSWORD {
                return echo(401, r#"{"error": "bad credentials"}"#.into());
            }
            let token = format!(
                "tok-{connection}-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            let mut api = state.lock().unwrap();
            api.tokens.insert(token.clone(), Instant::now() + lifetime);
            api.issued.push(token.clone());
            echo(
                200,
                format!(
                    r#"{{"token": "{token}", "expires_in_ms": {}}}"#,
                    lifetime.as_millis()
                ),
            )
        }
        ("GET", "/slow") => {
            tokio::time::sleep(SLOW).await;
            reply(200, r#"{"slow": true}"#.into())
        }
        ("GET", "/api/items") => {
            let valid = bearer.is_some_and(|t| {
                state
                    .lock()
                    .unwrap()
                    .tokens
                    .get(&t)
                    .is_some_and(|until| Instant::now() < *until)
            });
            if valid {
                reply(200, r#"{"items": [{"id": 1}, {"id": 2}]}"#.into())
            } else {
                reply(401, r#"{"error": "token missing or expired"}"#.into())
            }
        }
        _ => reply(404, "{}".into()),
    }
}

/// The module: log in with the password from `password_file`, wait on the slow page,
/// list the items with the token.
fn flow_module(name: &str, password_file: &str) -> String {
    format!(
        r#"  {name}:
    prober: multihttp
    timeout: 5s
    multihttp:
      preferred_ip_protocol: ip4
      steps:
        - name: login
          method: POST
          url: "{{{{target}}}}/login"
          headers: {{Content-Type: [application/json]}}
          body: '{{"user": "probe", "password": "{{{{file:{password_file}}}}}"}}'
          expect: {{status: [200], header_regexp: [{{header: Content-Type, regexp: json}}]}}
          extract: {{token: {{json_path: "$.token", secret: true}}}}
        - name: wait
          url: "{{{{target}}}}/slow"
          expect: {{status: [200]}}
        - name: items
          url: "{{{{target}}}}/api/items"
          headers: {{Authorization: ["Bearer {{{{token}}}}"]}}
          expect: {{status: [200], body_regexp: ['"items"'], body_json_cel: "size(body.items) == 2"}}
"#
    )
}

/// The value of `name{step="<step>"}` in a text exposition, when there is one.
fn step_value(metrics: &str, name: &str, step: &str) -> Option<f64> {
    let label = format!("step=\"{step}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

#[track_caller]
fn assert_no_secret(what: &str, text: &str, api: &[&Arc<Mutex<Api>>]) {
    assert!(
        !text.contains(PASSWORD),
        "{what} shows the password:\n{text}"
    );
    assert!(
        !text.contains(WRONG_PASSWORD),
        "{what} shows the wrong password:\n{text}"
    );
    for api in api {
        for token in &api.lock().unwrap().issued {
            assert!(
                !text.contains(token.as_str()),
                "{what} shows token {token}:\n{text}"
            );
        }
    }
}

#[test]
fn multihttp_flows_name_their_failed_step_and_keep_their_secrets() {
    let mut scene = Scene::new("multihttp-probe");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (lasting, lasting_api) = start_api(&runtime, Duration::from_secs(3600));
    let (expiring, expiring_api) = start_api(&runtime, Duration::from_millis(150));
    let apis = [&lasting_api, &expiring_api];
    let good = scene
        .dir()
        .write("secrets/api.password", &format!("{PASSWORD}\n"));
    let wrong = scene.dir().write("secrets/wrong.password", WRONG_PASSWORD);
    let (good, wrong) = (good.display().to_string(), wrong.display().to_string());

    // A variable used before any step extracts it: refused at load, naming the module
    // and the step.
    let broken = scene.dir().write(
        "broken.yml",
        &format!(
            "modules:\n{}jobs:\n  - job_name: flow\n    module: api_flow\n    static_configs: [{{targets: ['{lasting}']}}]\n",
            flow_module("api_flow", &good).replace("$.token", "$.tokn").replace(
                "url: \"{{target}}/slow\"",
                "url: \"{{target}}/slow?t={{tokn}}\""
            )
        ),
    );
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg("check-config").arg(&broken);
    let out = run(cmd, scene.dir().path(), WAIT);
    assert!(!out.status.success(), "{}", out.combined());
    assert!(
        out.combined().contains(
            "modules.api_flow: multihttp.steps[1] \"wait\".url: {{tokn}} is not extracted by an earlier step (known here: target, token)"
        ),
        "{}",
        out.combined()
    );

    // The agent's own modules, on /probe.
    let agent = start_agent(
        &mut scene,
        "probe-agent",
        &format!(
            "agent: {{id: edge-probe}}\nmodules:\n{}{}probe_endpoint:\n  enabled: true\n  allowed_targets: ['127.0.0.1:*']\n",
            flow_module("api_flow", &good),
            flow_module("api_flow_wrong", &wrong),
        ),
    );
    let probe = |module: &str, target: &str| {
        let (status, text) = http_get(&format!(
            "{agent}/probe?module={module}&debug=true&target={target}"
        ))
        .expect("/probe?debug=true");
        assert_eq!(status, 200, "{text}");
        assert_no_secret(&format!("/probe of {module} on {target}"), &text, &apis);
        text
    };

    let text = probe("api_flow", &lasting);
    assert!(text.contains("\nprobe_success 1\n"), "{text}");
    for step in ["login", "wait", "items"] {
        assert_eq!(
            step_value(&text, "probe_multihttp_step_success", step),
            Some(1.0),
            "{step}: {text}"
        );
        assert_eq!(
            step_value(&text, "probe_multihttp_step_status_code", step),
            Some(200.0),
            "{step}: {text}"
        );
    }
    let waited = step_value(&text, "probe_multihttp_step_duration_seconds", "wait").unwrap();
    assert!(waited >= SLOW.as_secs_f64(), "{waited}: {text}");
    for line in [
        "msg=\"Making HTTP request\" step=login method=POST",
        "msg=\"Response header\" step=login name=x-echo-password value=<secret>",
        "msg=\"Request header\" step=items name=authorization value=<secret>",
        "msg=\"Extracted a variable\" step=login name=token",
        "msg=\"Step succeeded\" step=items",
        "msg=\"Probe succeeded\"",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }
    assert_eq!(lasting_api.lock().unwrap().issued.len(), 1);

    let text = probe("api_flow_wrong", &lasting);
    assert!(text.contains("\nprobe_success 0\n"), "{text}");
    assert!(
        text.contains(
            r#"msg="Probe failed" reason=http_status err="step \"login\": status 401 not in [200]""#
        ),
        "{text}"
    );
    assert_eq!(
        step_value(&text, "probe_multihttp_step_success", "login"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        step_value(&text, "probe_multihttp_step_status_code", "login"),
        Some(401.0),
        "{text}"
    );
    // The steps after the failed one were not reached: no series rather than a 0.
    assert_eq!(
        step_value(&text, "probe_multihttp_step_success", "items"),
        None,
        "{text}"
    );
    assert!(text.contains("value=<secret>"), "{text}");

    let text = probe("api_flow", &expiring);
    assert!(text.contains("\nprobe_success 0\n"), "{text}");
    assert!(
        text.contains(r#"err="step \"items\": status 401 not in [200]""#),
        "{text}"
    );
    assert_eq!(
        step_value(&text, "probe_multihttp_step_success", "login"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        step_value(&text, "probe_multihttp_step_success", "wait"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        step_value(&text, "probe_multihttp_step_success", "items"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        step_value(&text, "probe_multihttp_step_status_code", "items"),
        Some(401.0),
        "{text}"
    );
    assert_eq!(
        expiring_api.lock().unwrap().issued.len(),
        1,
        "one login, one token"
    );

    let (_, kept) = http_get(&format!("{agent}/logs?target={expiring}")).expect("/logs");
    assert!(kept.contains("step \\\"items\\\""), "{kept}");
    assert_no_secret("/logs", &kept, &apis);

    // The same modules assigned by an aggregator to an agent that allows their file.
    let aggregator = start_aggregator(
        &mut scene,
        "aggregator",
        &format!(
            "global: {{scrape_interval: 2s, scrape_timeout: 1500ms}}\nmodules:\n{}{}jobs:\n  \
               - job_name: flow_ok\n    module: api_flow\n    static_configs: [{{targets: ['{lasting}']}}]\n  \
               - job_name: flow_expired\n    module: api_flow\n    static_configs: [{{targets: ['{expiring}']}}]\n  \
               - job_name: flow_wrong\n    module: api_flow_wrong\n    static_configs: [{{targets: ['{lasting}']}}]\n",
            flow_module("api_flow", &good),
            flow_module("api_flow_wrong", &wrong),
        ),
    );
    let secrets_dir = scene.dir().join("secrets");
    start_agent(
        &mut scene,
        "assigned-agent",
        &format!(
            "agent: {{id: edge-assigned}}\naggregators:\n  - address: {}\nassigned_modules:\n  allowed_file_paths: ['{}/*']\n",
            aggregator.grpc,
            secrets_dir.display()
        ),
    );
    let web = aggregator.web.clone();
    let metrics = scene.wait_until("each job's step series in the aggregator", WAIT, || {
        let (_, m) = http_get(&format!("{web}/metrics"))?;
        let of = |job: &str, name: &str, step: &str| {
            m.lines()
                .filter(|l| {
                    l.starts_with(&format!("{name}{{"))
                        && l.contains(&format!("job=\"{job}\""))
                        && l.contains(&format!("step=\"{step}\""))
                })
                .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        };
        let got = (
            of("flow_ok", "probe_multihttp_step_success", "items"),
            of("flow_expired", "probe_multihttp_step_success", "items"),
            of("flow_expired", "probe_multihttp_step_status_code", "items"),
            of("flow_wrong", "probe_multihttp_step_success", "login"),
            of("flow_wrong", "probe_multihttp_step_success", "items"),
        );
        (got == (Some(1.0), Some(0.0), Some(401.0), Some(0.0), None))
            .then(|| m.clone())
            .ok_or(format!("{got:?}"))
    });
    assert_no_secret("the aggregator's /metrics", &metrics, &apis);

    let view = |job: &str| -> Result<serde_json::Value, String> {
        let (_, body) = http_get(&format!("{web}/api/v1/targets"))?;
        let all: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        all["data"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["job"] == job))
            .map(|t| t["views"][0].clone())
            .filter(|v| v["success"] == false && v["trace"].is_object())
            .ok_or(format!("no failed view of {job} with a trace yet: {body}"))
    };
    let expired = scene.wait_until("flow_expired's failure", WAIT, || view("flow_expired"));
    assert_eq!(
        expired["failure"], "step \"items\": status 401 not in [200]",
        "{expired}"
    );
    let lines: Vec<&str> = expired["trace"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "http_status")
        .filter_map(|s| s["line"].as_str())
        .collect();
    assert_eq!(
        lines,
        [
            "step \"login\": HTTP/1.1 200 OK",
            "step \"wait\": HTTP/1.1 200 OK",
            "step \"items\": HTTP/1.1 401 Unauthorized",
        ],
        "{expired}"
    );
    let wrong_view = scene.wait_until("flow_wrong's failure", WAIT, || view("flow_wrong"));
    assert_eq!(
        wrong_view["failure"], "step \"login\": status 401 not in [200]",
        "{wrong_view}"
    );

    let (_, targets) = http_get(&format!("{web}/api/v1/targets")).unwrap();
    assert_no_secret("/api/v1/targets", &targets, &apis);
    let page_url = format!(
        "{web}/target?job=flow_expired&instance={}",
        url::form_urlencoded::byte_serialize(expiring.as_bytes()).collect::<String>()
    );
    let (status, page) = http_get(&page_url).unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("step &quot;items&quot;") || page.contains("step \"items\""),
        "{page}"
    );
    assert_no_secret("the target page", &page, &apis);

    scene.stop();
    runtime.shutdown_background();
}
