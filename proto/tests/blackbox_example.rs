//! blackbox_exporter's current example.yml (its main branch) read by the module loader.

use serde::Deserialize;
use sonde_proto::config::module::YamlBytes;
use sonde_proto::config::{Module, Prober, parse_yaml_all};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModulesFile {
    modules: BTreeMap<String, Module>,
}

fn example() -> (Option<ModulesFile>, Vec<String>) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/blackbox/example-main.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (file, problems) = parse_yaml_all::<ModulesFile>(&path, &text);
    (
        file,
        problems.errors.iter().map(|e| e.to_string()).collect(),
    )
}

#[test]
fn current_example_modules_resolve_with_their_probers() {
    let (file, errors) = example();
    let file = file.expect("the example parses");
    assert_eq!(errors, Vec::<String>::new());
    // blackbox_exporter takes any text in valid_http_versions (an `HTTP/2` there never
    // matches Go's `HTTP/2.0`); sonde takes it too.
    let invalid: Vec<String> = file
        .modules
        .iter()
        .filter_map(|(name, module)| module.validate().err().map(|e| format!("{name}: {e}")))
        .collect();
    assert_eq!(invalid, Vec::<String>::new());
    let m = &file.modules;
    assert_eq!(m["unix_socket_ping"].prober, Prober::Unix);
    assert_eq!(
        m["unix_socket_ping"].unix.query_response[0].send,
        Some(YamlBytes::from("PING"))
    );
    // `!!binary AAAACATSFi8=`: the PostgreSQL SSLRequest, bytes that are not UTF-8.
    assert_eq!(
        m["postgresql"].tcp.query_response[0].send,
        Some(YamlBytes(vec![
            0x00, 0x00, 0x00, 0x08, 0x04, 0xD2, 0x16, 0x2F
        ]))
    );
    assert_eq!(
        m["postgresql"].tcp.query_response[1].expect_bytes,
        Some(YamlBytes::from("S"))
    );
    assert_eq!(
        m["http_json_cel_match"]
            .http
            .fail_if_body_json_not_matches_cel
            .as_deref(),
        Some("body.foo == 'bar' && body.baz.startsWith('q')")
    );
    for name in [
        "websocket_example_basic_auth",
        "websocket_example_bearer_token",
    ] {
        let ws = &m[name].websocket;
        assert_eq!(m[name].prober, Prober::Websocket);
        assert!(ws.http_config.tls_config.insecure_skip_verify);
        assert_eq!(ws.headers["X-Some-Header"].inline(), vec!["my_header"]);
        assert_eq!(ws.query_response.len(), 2);
    }
    let oauth2 = m["http_2xx_oauth_client_credentials"]
        .http
        .oauth2
        .as_ref()
        .expect("oauth2 is read");
    assert_eq!(oauth2.client_id, "client_id");
    assert_eq!(oauth2.client_secret.as_deref(), Some("client_secret"));
    assert_eq!(oauth2.token_url, "https://api.example.com/token");
    assert_eq!(oauth2.endpoint_params["grant_type"], "client_credentials");
    // Modules travel to agents as JSON: the binary bytes survive the trip.
    let json = serde_json::to_string(&m["postgresql"]).unwrap();
    let back: Module = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, &m["postgresql"]);
    // A text `send` stays a JSON string, as older agents read it.
    let json = serde_json::to_value(&m["unix_socket_ping"].unix.query_response[0]).unwrap();
    assert_eq!(json["send"], "PING");
}

#[test]
fn cel_that_does_not_compile_is_a_config_error() {
    let bad: Module = serde_json::from_value(serde_json::json!({
        "prober": "http",
        "http": {"fail_if_body_json_matches_cel": "body.foo =="}
    }))
    .unwrap();
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.starts_with("http.fail_if_body_json_matches_cel: "), "{e}");
    let macro_var: Module = serde_json::from_value(serde_json::json!({
        "prober": "http",
        "http": {"fail_if_body_json_not_matches_cel": "body.items.all(i, i.ok)"}
    }))
    .unwrap();
    macro_var.validate().unwrap();
}

#[test]
fn grpc_metadata_keys_and_values_are_checked() {
    let ok: Module = serde_json::from_value(serde_json::json!({
        "prober": "grpc", "grpc": {"metadata": {"X-Tenant": ["a", "b"], "blob-bin": ["\u{1}"]}}
    }))
    .unwrap();
    ok.validate().unwrap();
    let reserved: Module = serde_json::from_value(serde_json::json!({
        "prober": "grpc", "grpc": {"metadata": {"grpc-timeout": ["1S"]}}
    }))
    .unwrap();
    assert!(
        reserved
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("grpc.metadata.grpc-timeout")
    );
}
