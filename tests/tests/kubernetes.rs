//! deploy/kubernetes/: the kustomize base and its overlays are valid Kubernetes objects
//! (the Python package `kubernetes-validate`, strict, against Kubernetes
//! [`KUBERNETES_VERSION`]), the flags they pass exist in the binaries, the configs in
//! their ConfigMaps pass `check-config`, and the init containers' scripts (the shard index
//! from the pod's ordinal, the agent id from the node's name) write configs that pass it.
//!
//! With `kubectl` (which embeds kustomize), the base and every overlay are rendered with
//! `kubectl kustomize` and the output validated. Without it, every resource file is
//! validated on its own (the overlays' patches, which are not whole objects, are then
//! only checked as part of nothing): the test says which it did.

use sonde_tests::{TestDir, make_pki, repo_path, require_tool, run, sonde_bin, under_ci};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The Kubernetes version whose schemas the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.37.0";

const TIMEOUT: Duration = Duration::from_secs(120);

const OVERLAYS: &[&str] = &["overlays/sharded", "overlays/daemonset"];

fn kubernetes_dir() -> PathBuf {
    repo_path("deploy/kubernetes")
}

/// A program from PATH, or None.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `python3 -m kubernetes_validate`: the Python package `kubernetes-validate`, which
/// scripts/test.sh installs with pip. Missing, the test fails (under CI and elsewhere
/// alike), saying how to install it.
fn kubernetes_validate(scratch: &TestDir) -> Command {
    let python = require_tool("python3", "python3");
    let mut probe = Command::new(&python);
    probe.args(["-c", "import kubernetes_validate"]);
    let found = run(probe, scratch.path(), TIMEOUT);
    assert!(
        found.status.success(),
        "the Python package kubernetes-validate is not installed{}: run `python3 -m pip \
         install kubernetes-validate` (scripts/test.sh does), then run this test again:\n{}",
        if under_ci() {
            " on this CI machine"
        } else {
            ""
        },
        found.combined()
    );
    let mut cmd = Command::new(python);
    cmd.args(["-m", "kubernetes_validate"]);
    cmd
}

fn validate(file: &Path, scratch: &TestDir) {
    let mut cmd = kubernetes_validate(scratch);
    cmd.args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(file);
    let out = run(cmd, scratch.path(), TIMEOUT);
    assert!(
        out.status.success(),
        "kubernetes-validate --strict (Kubernetes {KUBERNETES_VERSION}) refused {}:\n{}",
        file.display(),
        out.combined()
    );
    assert!(
        out.combined().contains("passed"),
        "kubernetes-validate validated nothing in {}:\n{}",
        file.display(),
        out.combined()
    );
}

/// Every `.yaml` file under `dir` (recursively), sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The base and each overlay rendered by `kubectl kustomize`: (directory, rendered text).
fn render_all(kubectl: &Path, scratch: &TestDir) -> Vec<(String, String)> {
    let mut rendered = Vec::new();
    for dir in std::iter::once("base").chain(OVERLAYS.iter().copied()) {
        let mut cmd = Command::new(kubectl);
        cmd.arg("kustomize").arg(kubernetes_dir().join(dir));
        let out = run(cmd, scratch.path(), TIMEOUT);
        assert!(
            out.status.success(),
            "kubectl kustomize deploy/kubernetes/{dir} failed:\n{}",
            out.combined()
        );
        rendered.push((dir.to_string(), out.stdout));
    }
    rendered
}

#[test]
fn manifests_are_valid_kubernetes_objects() {
    let scratch = TestDir::new("kubernetes-validate");
    match find_program("kubectl") {
        Some(kubectl) => {
            eprintln!("kubectl found: validating the rendered base and overlays");
            for (dir, text) in render_all(&kubectl, &scratch) {
                for kind in [
                    "StatefulSet",
                    "Service",
                    "NetworkPolicy",
                    "Secret",
                    "ConfigMap",
                ] {
                    assert!(
                        text.contains(&format!("\nkind: {kind}\n")),
                        "deploy/kubernetes/{dir} renders no {kind}"
                    );
                }
                let agents = if dir.ends_with("daemonset") {
                    "DaemonSet"
                } else {
                    "Deployment"
                };
                assert!(
                    text.contains(&format!("\nkind: {agents}\n")),
                    "deploy/kubernetes/{dir} should run the agents as a {agents}"
                );
                let file = scratch.write(&format!("{}.yaml", dir.replace('/', "-")), &text);
                validate(&file, &scratch);
            }
        }
        None => {
            eprintln!(
                "kubectl not found: validating each resource file on its own (the overlays' \
                 patches are not rendered)"
            );
            for file in yaml_files(&kubernetes_dir()) {
                let text = std::fs::read_to_string(&file).expect("read manifest");
                let in_base = file.parent().is_some_and(|d| d.ends_with("base"));
                let kustomization = text.contains("kind: Kustomization");
                let whole_object = (in_base && !kustomization)
                    || file.ends_with("overlays/daemonset/agent-daemonset.yaml");
                if whole_object {
                    validate(&file, &scratch);
                }
            }
        }
    }
}

/// The `--flag` words of every container's args in `text`.
fn flags_in(text: &str) -> Vec<String> {
    let mut flags: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                .collect();
            format!("--{name}")
        })
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

#[test]
fn manifests_pass_only_flags_the_binaries_have() {
    let scratch = TestDir::new("kubernetes-flags");
    for (bin, files) in [
        ("sonde-aggregator", vec!["base/aggregator-statefulset.yaml"]),
        (
            "sonde-agent",
            vec![
                "base/agent-deployment.yaml",
                "overlays/daemonset/agent-daemonset.yaml",
            ],
        ),
    ] {
        let mut cmd = Command::new(sonde_bin(bin));
        cmd.arg("--help");
        let help = run(cmd, scratch.path(), TIMEOUT);
        assert!(help.status.success(), "{bin} --help: {}", help.combined());
        for file in files {
            let text = std::fs::read_to_string(kubernetes_dir().join(file)).expect("read");
            let flags = flags_in(&text);
            assert!(flags.len() >= 4, "{file}: {flags:?}");
            for flag in flags {
                assert!(
                    help.stdout.contains(&flag),
                    "deploy/kubernetes/{file} passes {flag}, which `{bin} --help` does not list:\n{}",
                    help.stdout
                );
            }
        }
    }
}

/// The literal block that follows the first line `head` (e.g. `agent.yml: |`, or `- |`
/// for a container's script) of a manifest, dedented.
fn literal_block(text: &str, head: &str) -> String {
    let mut lines = text.lines().skip_while(|l| l.trim() != head);
    let first = lines.next().unwrap_or_else(|| panic!("no {head:?}"));
    let outer = first.len() - first.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > outer)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .expect("an empty block");
    body.iter()
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect()
}

/// The config of a ConfigMap manifest, its `/etc/sonde/` made `<dir>/`, with the token
/// files it names (from `tokens`, one agent id each) and the TLS files written there.
fn installed_config(manifest: &str, key: &str, dir: &TestDir, tokens: &[&str]) -> PathBuf {
    let text = std::fs::read_to_string(kubernetes_dir().join(manifest)).expect("read");
    let config = literal_block(&text, &format!("{key}: |"));
    let root = dir.path().display().to_string();
    let pki = make_pki(dir, "DNS:sonde-aggregator.sonde.svc", &[]);
    for (from, to) in [
        ("aggregator.pem", "tls/tls.crt"),
        ("aggregator.key", "tls/tls.key"),
        ("ca.pem", "tls/ca.crt"),
    ] {
        let body = std::fs::read_to_string(pki.join(from)).expect("read pki");
        dir.write(to, &body);
    }
    for agent in tokens {
        dir.write(
            &format!("tokens/{agent}"),
            &format!("the-token-of-{agent}-32-random-bytes\n"),
        );
    }
    dir.write(
        &format!("config/{key}"),
        &config.replace("/etc/sonde/", &format!("{root}/")),
    )
}

/// Runs the init container's script of `manifest` with `env`, and `bin` on PATH.
fn run_init_script(manifest: &str, bin: &str, env: &[(&str, &str)], dir: &TestDir) -> String {
    let text = std::fs::read_to_string(kubernetes_dir().join(manifest)).expect("read");
    let script = literal_block(&text, "- |");
    let bin_dir = sonde_bin(bin).parent().expect("bin dir").to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]).env("PATH", path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(cmd, dir.path(), TIMEOUT);
    assert!(
        out.status.success(),
        "the init container of {manifest} failed with {env:?}:\n{}",
        out.combined()
    );
    out.combined()
}

#[test]
fn aggregator_shard_index_comes_from_the_pod_ordinal() {
    let dir = TestDir::new("kubernetes-shards");
    let template = installed_config(
        "base/aggregator-configmap.yaml",
        "aggregator.yml",
        &dir,
        &["k8s-agent"],
    );
    let out_file = dir.join("run/aggregator.yml");
    std::fs::create_dir_all(dir.join("run")).expect("mkdir");
    let input = template.display().to_string();
    let output = out_file.display().to_string();
    // Unsharded (the base): the config as it is.
    let said = run_init_script(
        "base/aggregator-statefulset.yaml",
        "sonde-aggregator",
        &[("SONDE_CONFIG_IN", &input), ("SONDE_CONFIG_OUT", &output)],
        &dir,
    );
    assert!(said.contains("OK"), "{said}");
    let rendered = std::fs::read_to_string(&out_file).expect("read the rendered config");
    assert!(!rendered.contains("shard:"), "{rendered}");
    // Two shards: the index from the pod-index label, else from the pod's name.
    for (label, hostname, index) in [
        ("1", "sonde-aggregator-1", 1),
        ("", "sonde-aggregator-0", 0),
    ] {
        let said = run_init_script(
            "base/aggregator-statefulset.yaml",
            "sonde-aggregator",
            &[
                ("SONDE_CONFIG_IN", &input),
                ("SONDE_CONFIG_OUT", &output),
                ("SONDE_SHARDS", "2"),
                ("SONDE_SHARD_INDEX", label),
                ("HOSTNAME", hostname),
            ],
            &dir,
        );
        assert!(said.contains(&format!("shard {index} of 2")), "{said}");
        assert!(said.contains("OK"), "check-config should pass: {said}");
        let rendered = std::fs::read_to_string(&out_file).expect("read the rendered config");
        assert!(
            rendered.contains(&format!("global:\n  shard: {{index: {index}, total: 2}}\n")),
            "{rendered}"
        );
    }
    // The overlay sets as many shards as replicas.
    let overlay =
        std::fs::read_to_string(kubernetes_dir().join("overlays/sharded/aggregator-shards.yaml"))
            .expect("read");
    assert!(
        overlay.contains("replicas: 2") && overlay.contains("value: \"2\""),
        "{overlay}"
    );
}

#[test]
fn agent_configs_pass_check_config() {
    let dir = TestDir::new("kubernetes-agent");
    // The base's agent, as the Deployment runs it.
    let config = installed_config(
        "base/agent-configmap.yaml",
        "agent.yml",
        &dir,
        &["k8s-agent"],
    );
    let mut cmd = Command::new(sonde_bin("sonde-agent"));
    cmd.arg("check-config").arg(&config);
    let out = run(cmd, dir.path(), TIMEOUT);
    assert!(out.status.success(), "{}", out.combined());
    // The DaemonSet's agent: its id and token file from the node's name.
    let tokens = dir.join("tokens").display().to_string();
    dir.write("tokens/node-a", "another-token-of-32-random-bytes\n");
    let output = dir.join("run-agent.yml");
    let said = run_init_script(
        "overlays/daemonset/agent-daemonset.yaml",
        "sonde-agent",
        &[
            ("SONDE_CONFIG_IN", &config.display().to_string()),
            ("SONDE_CONFIG_OUT", &output.display().to_string()),
            ("SONDE_TOKENS_DIR", &tokens),
            ("NODE_NAME", "node-a"),
        ],
        &dir,
    );
    assert!(said.contains("agent node-a"), "{said}");
    // The sharded overlay's agent streams to both shards.
    let sharded =
        std::fs::read_to_string(kubernetes_dir().join("overlays/sharded/agent-config.yaml"))
            .expect("read");
    for pod in ["sonde-aggregator-0", "sonde-aggregator-1"] {
        assert!(
            sharded.contains(pod),
            "the sharded agents should stream to {pod}"
        );
    }
}

#[test]
fn aggregator_configs_pass_check_config() {
    for (manifest, agents) in [
        ("base/aggregator-configmap.yaml", vec!["k8s-agent"]),
        (
            "overlays/daemonset/aggregator-config.yaml",
            vec!["node-a", "node-b"],
        ),
    ] {
        let dir = TestDir::new("kubernetes-aggregator");
        let config = installed_config(manifest, "aggregator.yml", &dir, &agents);
        let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
        cmd.arg("check-config").arg(&config);
        let out = run(cmd, dir.path(), TIMEOUT);
        assert!(out.status.success(), "{manifest}: {}", out.combined());
    }
}
