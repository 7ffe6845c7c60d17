//! The security guide's TLS + token deployment ("Security model"), followed step by step with the
//! real binaries: `deploy/examples/tls/make-certs.sh` makes the CA and the certificates,
//! the security guide's command makes the token files, and the example configs of
//! `deploy/examples/tls/` run with their `/etc/sonde/` paths moved into a temporary
//! directory. Everything stays on loopback: the aggregator certificate's subjectAltName
//! covers 127.0.0.1 and localhost, as the security guide's SAN covers the name agents dial.
//!
//! Then every way in that the deployment must close is tried: no token, a wrong token, a
//! token with labels it was not issued for, no client certificate (mTLS), plain HTTP/2 on
//! the TLS port, a token revoked by a reload; and an aggregator without `fleet.auth` on a
//! non-loopback address, and an agent asked to send its token in clear text to a
//! non-loopback address.

use serde_json::Value;
use sonde_tests::{
    MAKE_TOKEN_COMMAND, Scene, TestDir, accepting_tcp_port, example_installed_in, file_mode,
    free_port, http_get_ok, make_pki, metric_sum, replace_once, repo_path, require_tool, run,
    sonde_bin, start_agent, start_aggregator,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The names the aggregator's certificate is valid for here (the security guide uses the name
/// agents dial, `DNS:aggregator.example.com`).
const SAN: &str = "DNS:localhost,IP:127.0.0.1";

/// Bound of each wait for a state to show.
const WAIT: Duration = Duration::from_secs(60);

/// How long a connection that must not happen is watched for.
const HOLD: Duration = Duration::from_secs(5);

/// The example aggregator config, installed in `pki`, probing `target`, every second, and
/// writing to a port where nothing listens.
fn aggregator_config(pki: &Path, target: &str) -> String {
    let text = example_installed_in("deploy/examples/tls/aggregator.yml", pki);
    let text = replace_once(&text, "scrape_interval: 15s", "scrape_interval: 1s");
    let text = replace_once(&text, "scrape_timeout: 10s", "scrape_timeout: 1s");
    let text = replace_once(&text, "shop.example.com:443", target);
    replace_once(
        &text,
        "http://127.0.0.1:9090/api/v1/write",
        &format!("http://127.0.0.1:{}/api/v1/write", free_port()),
    )
}

/// The example agent config, installed in `pki`, streaming to the aggregator at `grpc`
/// (`127.0.0.1:<port>`) over TLS.
fn agent_config(pki: &Path, grpc: &str) -> String {
    let text = example_installed_in("deploy/examples/tls/agent.yml", pki);
    replace_once(
        &text,
        "https://aggregator.example.com:9451",
        &format!("https://{grpc}"),
    )
}

/// The agent config as another agent of the security guide: `edge-us-1`, region us, with its own
/// token and certificate.
fn as_edge_us_1(config: &str) -> String {
    let text = replace_once(config, "id: edge-eu-1", "id: edge-us-1");
    let text = replace_once(&text, "region: eu", "region: us");
    text.replace("edge-eu-1.", "edge-us-1.")
}

/// `config` without its one line containing `needle`.
fn without_line(config: &str, needle: &str) -> String {
    let found = config.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(found, 1, "expected one line with {needle:?}:\n{config}");
    config
        .lines()
        .filter(|l| !l.contains(needle))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The aggregator's `/api/v1/agents` entry for `id`, if it has one.
fn agent_entry(web: &str, id: &str) -> Result<Option<Value>, String> {
    let body = http_get_ok(&format!("{web}/api/v1/agents"))?;
    let json: Value =
        serde_json::from_str(&body).map_err(|e| format!("/api/v1/agents: {e}: {body}"))?;
    Ok(json["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["agent"] == id)
        .cloned())
}

fn is_connected(web: &str, id: &str) -> Result<bool, String> {
    Ok(agent_entry(web, id)?.is_some_and(|a| a["connected"] == true))
}

/// The aggregator's `sonde_agents_refused_total` (summed over its series, if it has labels).
fn refused(web: &str) -> f64 {
    metric_sum(web, "sonde_agents_refused_total", &[])
        .unwrap_or_else(|e| panic!("the aggregator's /metrics: {e}"))
}

/// Starts an agent with `config` that the aggregator must refuse: waits until
/// `sonde_agents_refused_total` rises, checks that `id` did not get connected by it
/// (`id_was_connected`: whether `id` was connected before, by the honest agent), and
/// stops it.
fn expect_refused(
    scene: &mut Scene,
    web: &str,
    name: &str,
    config: &str,
    id: &str,
    id_was_connected: bool,
) {
    let before = refused(web);
    start_agent(scene, name, config);
    scene.wait_until(
        &format!("{name} to be refused (sonde_agents_refused_total above {before})"),
        WAIT,
        || match refused(web) {
            now if now > before => Ok(()),
            now => Err(format!("sonde_agents_refused_total = {now}")),
        },
    );
    assert_eq!(
        is_connected(web, id).expect("/api/v1/agents"),
        id_was_connected,
        "{name}: a refused agent changed whether {id} is connected\n{}",
        scene.process(name).log_tail()
    );
    scene.kill(name);
}

/// Starts an agent with `config` that must never get a stream (its connection fails
/// below gRPC), watches `id` stay disconnected for a while, and stops it.
fn expect_no_stream(scene: &mut Scene, web: &str, name: &str, config: &str, id: &str) {
    start_agent(scene, name, config);
    scene.hold_for(
        &format!("{id} stays disconnected ({name})"),
        HOLD,
        || match is_connected(web, id)? {
            false => Ok(()),
            true => Err(format!("{id} is connected")),
        },
    );
    scene.kill(name);
}

#[test]
fn tls_and_token_deployment_as_the_readme_says() {
    let mut scene = Scene::new("secure-deployment");

    // ---- steps 1 and 2: certificates and token files
    let pki = make_pki(scene.dir(), SAN, &["edge-eu-1", "edge-us-1"]);
    for file in [
        "ca.key",
        "aggregator.key",
        "edge-eu-1.key",
        "edge-us-1.key",
        "edge-eu-1.token",
        "edge-us-1.token",
    ] {
        let mode = file_mode(&pki.join(file));
        assert_eq!(mode, 0o600, "{file} is {mode:o}, not 0600");
    }
    let token = std::fs::read_to_string(pki.join("edge-eu-1.token")).expect("read the token");
    assert!(
        token.trim().len() >= 40,
        "a token of 32 random bytes in base64 is 44 characters: {token:?}"
    );

    // ---- step 3: the aggregator, with the example config
    let target = format!("127.0.0.1:{}", accepting_tcp_port());
    let aggregator = start_aggregator(&mut scene, "aggregator", &aggregator_config(&pki, &target));
    let web = aggregator.web.clone();
    let grpc = aggregator
        .grpc
        .strip_prefix("http://")
        .expect("the harness's gRPC address is http://host:port")
        .to_string();

    // ---- step 4: the agent, with the example config: TLS (mTLS), its token, target UP
    let honest = agent_config(&pki, &grpc);
    start_agent(&mut scene, "edge-eu-1", &honest);
    scene.wait_until(
        "edge-eu-1 connected over TLS with its token",
        WAIT,
        || match agent_entry(&web, "edge-eu-1")? {
            Some(a) if a["connected"] == true && a["labels"]["region"] == "eu" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let target_is_up = || -> Result<(), String> {
        let body = http_get_ok(&format!("{web}/api/v1/targets"))?;
        let json: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        let entry = json["data"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["job"] == "shop" && t["instance"] == target.as_str())
            .ok_or_else(|| format!("no target shop/{target}: {body}"))?;
        let views: Vec<&str> = entry["views"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["agent"].as_str())
            .collect();
        if entry["state"] == "up" && views == ["edge-eu-1"] {
            Ok(())
        } else {
            Err(format!("{entry}"))
        }
    };
    scene.wait_until(
        "the target UP in /api/v1/targets, seen by edge-eu-1 alone",
        WAIT,
        target_is_up,
    );

    // ---- refused at the token check: sonde_agents_refused_total rises
    // No token at all (but a client certificate, so that mTLS lets it through).
    let no_token = replace_once(&honest, "id: edge-eu-1", "id: anonymous");
    let no_token = without_line(&no_token, "token_file:");
    expect_refused(&mut scene, &web, "no-token", &no_token, "anonymous", false);

    // A token that is not in fleet.auth, claiming the honest agent's id.
    let forged = pki.join("forged.token");
    std::fs::write(&forged, "bm90IGEgdG9rZW4gb2YgdGhpcyBmbGVldCwgc29ycnk=\n").expect("write");
    let wrong_token = replace_once(
        &honest,
        &format!("{}/edge-eu-1.token", pki.display()),
        &forged.display().to_string(),
    );
    expect_refused(
        &mut scene,
        &web,
        "wrong-token",
        &wrong_token,
        "edge-eu-1",
        true,
    );

    // edge-us-1's own token (bound to region us), asking for region eu's jobs.
    let wrong_labels = replace_once(&as_edge_us_1(&honest), "region: us", "region: eu");
    expect_refused(
        &mut scene,
        &web,
        "wrong-labels",
        &wrong_labels,
        "edge-us-1",
        false,
    );

    // ---- refused below gRPC
    // mTLS: no client certificate, the handshake fails (the agent and openssl both).
    let edge_us_1 = as_edge_us_1(&honest);
    let no_cert = without_line(&edge_us_1, "cert_file:");
    let no_cert = without_line(&no_cert, "key_file:");
    expect_no_stream(&mut scene, &web, "no-cert", &no_cert, "edge-us-1");
    let mut s_client = Command::new(require_tool("openssl", "openssl"));
    s_client
        .args(["s_client", "-connect", &grpc, "-alpn", "h2", "-ign_eof"])
        .arg("-CAfile")
        .arg(pki.join("ca.pem"));
    let out = run(s_client, scene.dir().path(), Duration::from_secs(30));
    assert!(
        !out.status.success() && out.combined().contains("certificate required"),
        "a TLS client without a certificate should be refused in the handshake \
         (alert certificate_required), got ({}):\n{}",
        out.status,
        out.combined()
    );

    // Plain HTTP/2 to the TLS port: the agent gets no stream, and a raw HTTP/2 client no
    // HTTP/2 answer (a TLS alert, or nothing).
    let plaintext = replace_once(&edge_us_1, "address: https://", "address: http://");
    let plaintext = without_line(&plaintext, "tls_config:");
    let plaintext = without_line(&plaintext, "ca_file:");
    let plaintext = without_line(&plaintext, "cert_file:");
    let plaintext = without_line(&plaintext, "key_file:");
    expect_no_stream(&mut scene, &web, "plaintext", &plaintext, "edge-us-1");
    let answer = plaintext_http2_answer(&grpc);
    assert!(
        answer.get(3) != Some(&0x04),
        "plain HTTP/2 on the TLS port got an HTTP/2 SETTINGS frame back: {answer:?}"
    );

    // ---- the honest agents still work
    // edge-us-1 as the security guide sets it up connects, with the labels its token binds, and
    // gets no check of the job that selects region eu.
    start_agent(&mut scene, "edge-us-1", &edge_us_1);
    scene.wait_until(
        "edge-us-1 connected, with region us",
        WAIT,
        || match agent_entry(&web, "edge-us-1")? {
            Some(a) if a["connected"] == true && a["labels"]["region"] == "us" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    scene.hold_for(
        "edge-us-1 has no check of region eu's job",
        HOLD,
        || match agent_entry(&web, "edge-us-1")? {
            Some(a) if a["connected"] == true && a["checks"] == 0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(
        is_connected(&web, "edge-eu-1").expect("/api/v1/agents"),
        "edge-eu-1 lost its stream during the attempts"
    );
    target_is_up().expect("the target is still UP, seen by edge-eu-1 alone");

    // ---- revoking: edge-us-1's entry removed from fleet.auth, then a reload (SIGHUP, as
    // `systemctl reload` sends): its stream ends within seconds, and it stays out.
    let config_file = scene.dir().join("aggregator.yml");
    let config = std::fs::read_to_string(&config_file).expect("read the aggregator config");
    let entry = format!(
        "      - agent: edge-us-1\n        token_file: {}/edge-us-1.token\n        labels:\n          region: us\n",
        pki.display()
    );
    std::fs::write(&config_file, replace_once(&config, &entry, "")).expect("write the config");
    let before = refused(&web);
    let pid = scene.process("aggregator").pid().to_string();
    let status = Command::new("kill").args(["-HUP", &pid]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -HUP {pid}");
    scene.wait_until(
        "edge-us-1's stream to end after its token was removed",
        Duration::from_secs(30),
        || match is_connected(&web, "edge-us-1")? {
            false => Ok(()),
            true => Err("edge-us-1 is still connected".into()),
        },
    );
    scene.wait_until(
        "edge-us-1's reconnection to be refused",
        WAIT,
        || match refused(&web) {
            now if now > before => Ok(()),
            now => Err(format!("sonde_agents_refused_total = {now}")),
        },
    );
    assert!(
        !is_connected(&web, "edge-us-1").expect("/api/v1/agents"),
        "edge-us-1 got back in without a token"
    );
    assert!(
        is_connected(&web, "edge-eu-1").expect("/api/v1/agents"),
        "edge-eu-1 lost its stream in the reload"
    );
}

/// Sends the HTTP/2 client preface and an empty SETTINGS frame in clear text to `address`
/// and returns what comes back within 5 s (until the server closes).
fn plaintext_http2_answer(address: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).expect("connect to the gRPC port");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set_read_timeout");
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .expect("send the HTTP/2 preface");
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    answer
}

/// The security guide gives the command the test runs for the token files, word for word.
#[test]
fn readme_has_the_token_command() {
    let readme =
        std::fs::read_to_string(repo_path("docs/security.md")).expect("read docs/security.md");
    assert!(
        readme.contains(MAKE_TOKEN_COMMAND),
        "docs/security.md should show the token command `{MAKE_TOKEN_COMMAND}` (tests/src/lib.rs \
         runs it as the security guide's step)"
    );
}

/// Secure by default, aggregator side: on a non-loopback gRPC address without
/// `fleet.auth`, the aggregator refuses to start and names the fix; with
/// `fleet.allow_anonymous: true` it gets past that check, with a warning. The address is
/// 192.0.2.1 (TEST-NET-1, RFC 5737), which no host has: nothing ever listens beyond
/// loopback, whatever the outcome.
#[test]
fn aggregator_refuses_anonymous_agents_beyond_loopback() {
    let dir = TestDir::new("anonymous-aggregator");
    let start = |name: &str, config: &str| {
        let file = dir.write(&format!("{name}.yml"), config);
        let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
        cmd.arg(format!("--config.file={}", file.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{}", free_port()))
            .arg(format!("--grpc.listen-address=192.0.2.1:{}", free_port()))
            .arg(format!(
                "--storage.path={}",
                dir.join(&format!("{name}-data")).display()
            ));
        run(cmd, dir.path(), Duration::from_secs(30))
    };

    let out = start("anonymous", "fleet:\n  missing_after: 2m\n");
    assert!(
        !out.status.success(),
        "the aggregator started on a non-loopback address without fleet.auth:\n{}",
        out.combined()
    );
    assert!(
        out.combined().contains("fleet.auth"),
        "the refusal should name the fix (fleet.auth); got:\n{}",
        out.combined()
    );

    let out = start("allowed", "fleet:\n  allow_anonymous: true\n");
    // 192.0.2.1 cannot be bound (EADDRNOTAVAIL, os error 99): reaching that error means
    // the aggregator got past its config and the anonymous check, warning on the way.
    let output = out.combined();
    assert!(
        output.contains("allow_anonymous") && output.contains("(os error 99)"),
        "with allow_anonymous: true the aggregator should warn (naming it) at start, then \
         fail only to bind 192.0.2.1; got:\n{output}"
    );
}

/// Secure by default, agent side: a token is not sent in clear text to a non-loopback
/// aggregator unless its entry says `allow_plaintext_token: true`; on loopback it is.
#[test]
fn agent_refuses_to_send_its_token_in_clear_text() {
    let dir = TestDir::new("plaintext-token");
    dir.write("edge.token", "dG9rZW4=\n");
    let check = |name: &str, address: &str, extra: &str| {
        let file = dir.write(
            &format!("{name}.yml"),
            &format!(
                "agent:\n  id: edge\naggregators:\n  - address: {address}\n    token_file: edge.token\n{extra}"
            ),
        );
        let mut cmd = Command::new(sonde_bin("sonde-agent"));
        cmd.arg("check-config").arg(&file);
        run(cmd, dir.path(), Duration::from_secs(30))
    };
    let out = check("clear", "http://aggregator.example.com:9451", "");
    assert!(
        !out.status.success() && out.combined().contains("allow_plaintext_token"),
        "an http:// non-loopback address with a token_file should be refused, naming \
         allow_plaintext_token; got ({}):\n{}",
        out.status,
        out.combined()
    );
    let out = check(
        "allowed",
        "http://aggregator.example.com:9451",
        "    allow_plaintext_token: true\n",
    );
    assert!(
        out.status.success(),
        "allow_plaintext_token: true should be accepted; got ({}):\n{}",
        out.status,
        out.combined()
    );
    for address in [
        "http://127.0.0.1:9451",
        "https://aggregator.example.com:9451",
    ] {
        let out = check("fine", address, "");
        assert!(
            out.status.success(),
            "{address} with a token_file should be accepted; got ({}):\n{}",
            out.status,
            out.combined()
        );
    }
}
