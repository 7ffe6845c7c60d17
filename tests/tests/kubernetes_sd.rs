//! `kubernetes_sd_configs` against a Kubernetes API endpoint served on loopback by the
//! test, which replays recorded list and watch responses (the objects as an API server
//! returns them, with their resourceVersions; watches streamed as chunked JSON lines):
//!
//! - the aggregator lists the Ingresses, then watches from the list's resourceVersion;
//! - a watched change, a new Ingress and a deleted one reach `/api/v1/targets` (a target
//!   changing, appearing and disappearing);
//! - a watch whose connection breaks is resumed from the last resourceVersion seen;
//! - a watch that expires (410 Gone) is followed by a new list, and a list refused by RBAC
//!   (403) is logged with what to grant while the targets found before are kept;
//! - an API server that cannot be reached is logged as such.

use serde_json::{Value, json};
use sonde_tests::{Scene, free_port, http_get_ok, repo_path, start_aggregator};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const INGRESSES: &str = "/apis/networking.k8s.io/v1/ingresses";

/// What the API endpoint does with one request.
enum Exchange {
    /// Answers with this body (a list, or a Status for an error).
    Reply(u16, Value),
    /// Streams a watch.
    Watch(Vec<Step>),
}

enum Step {
    Event(Value),
    /// Waits until the test has checked what the events so far did.
    WaitForTest,
    /// Drops the connection in the middle of the stream.
    Break,
    /// Ends the stream cleanly.
    End,
    /// Keeps the stream open with a bookmark a second, until the test is over.
    Hold(&'static str),
}

/// The recorded API endpoint: answers requests with the script's exchanges in order and
/// records each request's path and query.
struct RecordedApi {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
    go: mpsc::Sender<()>,
}

impl RecordedApi {
    fn start(script: Vec<Exchange>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (go, go_rx) = mpsc::channel();
        let recorded = requests.clone();
        std::thread::spawn(move || {
            let mut script = script.into_iter();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let Some(target) = read_request(&conn) else {
                    continue;
                };
                recorded.lock().unwrap().push(target.clone());
                let path = target.split('?').next().unwrap_or("");
                let exchange = if path == INGRESSES {
                    script.next()
                } else {
                    None
                };
                let open = match exchange {
                    Some(Exchange::Reply(code, body)) => reply(conn, code, &body),
                    Some(Exchange::Watch(steps)) => stream(conn, steps, &go_rx),
                    None => reply(
                        conn,
                        404,
                        &status(404, "NotFound", &format!("{path} is not recorded")),
                    ),
                };
                if !open {
                    return;
                }
            }
        });
        RecordedApi { url, requests, go }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Lets the stream under way go past its `WaitForTest`.
    fn go_on(&self) {
        self.go.send(()).unwrap();
    }
}

/// The request target of a GET (no body), once its headers are read.
fn read_request(conn: &TcpStream) -> Option<String> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let target = line.split_whitespace().nth(1)?.to_string();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header == "\r\n" {
            break;
        }
    }
    Some(target)
}

fn reply(mut conn: TcpStream, code: u16, body: &Value) -> bool {
    let body = body.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    true
}

fn chunk(conn: &mut TcpStream, line: &str) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write!(conn, "{:x}\r\n{data}\r\n", data.len())?;
    conn.flush()
}

/// Streams a watch as the API server does (chunked, one JSON event a line); false when
/// the test is over.
fn stream(mut conn: TcpStream, steps: Vec<Step>, go: &mpsc::Receiver<()>) -> bool {
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for step in steps {
        match step {
            Step::Event(e) => {
                let _ = chunk(&mut conn, &e.to_string());
            }
            Step::WaitForTest => {
                if go.recv().is_err() {
                    return false;
                }
            }
            Step::Break => {
                let _ = conn.shutdown(Shutdown::Both);
                return true;
            }
            Step::End => {
                let _ = write!(conn, "0\r\n\r\n");
                return true;
            }
            Step::Hold(rv) => loop {
                let bookmark = json!({"type": "BOOKMARK", "object": {"kind": "Ingress", "apiVersion": "networking.k8s.io/v1", "metadata": {"resourceVersion": rv}}});
                if chunk(&mut conn, &bookmark.to_string()).is_err() {
                    return true;
                }
                match go.recv_timeout(Duration::from_secs(1)) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return false,
                }
            },
        }
    }
    true
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// The recorded Ingresses by name, as a watch event carries them (with kind and
/// apiVersion, which list items lack).
fn recorded_ingress(name: &str) -> Value {
    let text =
        std::fs::read_to_string(repo_path("tests/fixtures/kubernetes/ingresses.json")).unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    let mut item = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["metadata"]["name"] == name)
        .unwrap()
        .clone();
    item["kind"] = json!("Ingress");
    item["apiVersion"] = json!("networking.k8s.io/v1");
    item
}

fn with_version(mut object: Value, rv: &str) -> Value {
    object["metadata"]["resourceVersion"] = json!(rv);
    object
}

/// A new Ingress for `host`, annotated for probing.
fn new_ingress(name: &str, host: &str, rv: &str) -> Value {
    json!({
        "kind": "Ingress",
        "apiVersion": "networking.k8s.io/v1",
        "metadata": {
            "name": name, "namespace": "shop", "uid": format!("0000{name}-1111-4222-8333-444455556666"),
            "resourceVersion": rv, "generation": 1, "creationTimestamp": "2026-12-01T08:00:00Z",
            "annotations": {"prometheus.io/probe": "true"}
        },
        "spec": {
            "ingressClassName": "nginx",
            "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": name, "port": {"number": 80}}}}]}}]
        },
        "status": {"loadBalancer": {}}
    })
}

fn list(rv: &str, items: Vec<Value>) -> Value {
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut i| {
            let o = i.as_object_mut().unwrap();
            o.remove("kind");
            o.remove("apiVersion");
            i
        })
        .collect();
    json!({"kind": "IngressList", "apiVersion": "networking.k8s.io/v1",
           "metadata": {"resourceVersion": rv}, "items": items})
}

fn event(kind: &str, object: Value) -> Step {
    Step::Event(json!({"type": kind, "object": object}))
}

/// The instances `/api/v1/targets` lists for `job`.
fn instances(web: &str, job: &str) -> Result<BTreeSet<String>, String> {
    let body = http_get_ok(&format!("{web}/api/v1/targets"))?;
    let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let data = v["data"]
        .as_array()
        .ok_or_else(|| format!("no data in {body}"))?;
    Ok(data
        .iter()
        .filter(|t| t["job"] == job)
        .filter_map(|t| t["instance"].as_str().map(String::from))
        .collect())
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn ingresses_listed_watched_resumed_and_relisted() {
    // The storefront's second host moves, so that the change is seen as a target.
    let mut changed = with_version(recorded_ingress("storefront"), "48300");
    changed["spec"]["rules"][1]["host"] = json!("status.shop.example");
    let script = vec![
        Exchange::Reply(
            200,
            list(
                "48211",
                vec![recorded_ingress("storefront"), recorded_ingress("admin")],
            ),
        ),
        Exchange::Watch(vec![
            Step::WaitForTest,
            event("MODIFIED", changed.clone()),
            event("ADDED", new_ingress("blog", "blog.shop.example", "48301")),
            Step::WaitForTest,
            Step::Break,
        ]),
        Exchange::Watch(vec![
            event("DELETED", with_version(recorded_ingress("admin"), "48350")),
            Step::WaitForTest,
            Step::Event(
                json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version: 48350 (48400)")}),
            ),
            Step::End,
        ]),
        Exchange::Reply(
            403,
            status(
                403,
                "Forbidden",
                "ingresses.networking.k8s.io is forbidden: User \"system:serviceaccount:monitoring:sonde-aggregator\" cannot list resource \"ingresses\" in API group \"networking.k8s.io\" at the cluster scope",
            ),
        ),
        Exchange::Reply(
            200,
            list(
                "48500",
                vec![
                    changed,
                    new_ingress("blog", "blog.shop.example", "48301"),
                    new_ingress("docs", "docs.shop.example", "48480"),
                ],
            ),
        ),
        Exchange::Watch(vec![Step::Hold("48600")]),
    ];
    let api = RecordedApi::start(script);
    let unreachable = format!("http://127.0.0.1:{}", free_port());

    let mut scene = Scene::new("kubernetes-sd");
    let config = format!(
        "modules:\n  http_2xx: {{prober: http}}\njobs:\n  - job_name: ingresses\n    module: http_2xx\n    kubernetes_sd_configs:\n      - role: ingress\n        api_server: {}\n  - job_name: elsewhere\n    module: http_2xx\n    kubernetes_sd_configs:\n      - role: service\n        api_server: {unreachable}\n",
        api.url
    );
    let aggregator = start_aggregator(&mut scene, "aggregator", &config);
    let web = aggregator.web.clone();
    let started = std::time::Instant::now();
    let expect = |scene: &mut Scene, what: &str, want: BTreeSet<String>| {
        eprintln!("{:?}: waiting for {what}", started.elapsed());
        scene.wait_until(what, WAIT, || {
            let got = instances(&web, "ingresses")?;
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        });
    };

    expect(
        &mut scene,
        "the listed Ingresses",
        set(&[
            "www.shop.example",
            "status.example.org",
            "admin.shop.internal",
        ]),
    );
    api.go_on();
    expect(
        &mut scene,
        "the watched change and the new Ingress",
        set(&[
            "www.shop.example",
            "status.shop.example",
            "admin.shop.internal",
            "blog.shop.example",
        ]),
    );
    api.go_on();
    expect(
        &mut scene,
        "the deletion seen on the resumed watch",
        set(&[
            "www.shop.example",
            "status.shop.example",
            "blog.shop.example",
        ]),
    );
    api.go_on();
    expect(
        &mut scene,
        "the new list after the watch expired and a 403",
        set(&[
            "www.shop.example",
            "status.shop.example",
            "blog.shop.example",
            "docs.shop.example",
        ]),
    );

    let requests = api.requests();
    let ingress_requests: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with(INGRESSES))
        .collect();
    let watch_from = |r: &str| r.contains("watch=true") || r.contains("watch=1");
    let version = |r: &str| {
        r.split(['?', '&'])
            .find_map(|p| p.strip_prefix("resourceVersion="))
            .unwrap_or("")
            .to_string()
    };
    let summary: Vec<String> = ingress_requests
        .iter()
        .map(|r| {
            if watch_from(r) {
                format!("watch@{}", version(r))
            } else {
                "list".to_string()
            }
        })
        .collect();
    assert_eq!(
        summary[..5],
        ["list", "watch@48211", "watch@48301", "list", "list"],
        "the watch resumes from the last resourceVersion after a break, lists again after 410 Gone; requests: {requests:#?}"
    );
    assert_eq!(summary[5], "watch@48500", "{requests:#?}");

    let log = scene.process("aggregator").log();
    assert!(
        log.contains("forbidden (403)") && log.contains("get, list and watch on ingresses"),
        "the 403 is logged with what to grant:\n{log}"
    );
    assert!(
        log.contains("cannot reach the API server")
            && log.contains(&unreachable.replace("http://", "")),
        "the unreachable API server is logged as such:\n{log}"
    );
    assert!(instances(&web, "elsewhere").unwrap().is_empty());
    drop(api);
    scene.stop();
}
