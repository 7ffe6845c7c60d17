//! deploy/kubernetes/: the kustomize base and its overlays are valid Kubernetes objects
//! (the Python package `kubernetes-validate`, strict, against Kubernetes
//! [`KUBERNETES_VERSION`]), the flags they pass exist in the binaries, the configs in
//! their ConfigMaps pass `check-config`, and the init containers' scripts (the shard index
//! from the pod's ordinal, the agent id from the node's name) write configs that pass it.
//! In the DaemonSet overlay, no agent pod can reach another node's token.
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
                // The DaemonSet overlay's token Secrets are made per node by the operator.
                let secret = (!dir.ends_with("daemonset")).then_some("Secret");
                for kind in ["StatefulSet", "Service", "NetworkPolicy", "ConfigMap"]
                    .into_iter()
                    .chain(secret)
                {
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
                let whole_object =
                    (in_base && !kustomization) || file.ends_with("overlays/daemonset/agents.yaml");
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
                "overlays/daemonset/agents.yaml",
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
        "overlays/daemonset/agents.yaml",
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

/// The YAML documents of `text` as JSON values, read by PyYAML (which kubernetes-validate
/// depends on, so it is there whenever these tests can run).
fn yaml_documents(text: &str, what: &str, scratch: &TestDir) -> Vec<serde_json::Value> {
    let file = scratch.write("documents.yaml", text);
    let mut cmd = Command::new(require_tool("python3", "python3"));
    cmd.args([
        "-c",
        "import json, sys, yaml\n\
         print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
    ])
    .arg(&file);
    let out = run(cmd, scratch.path(), TIMEOUT);
    assert!(
        out.status.success(),
        "PyYAML could not read {what} (python3 -m pip install pyyaml if it is missing):\n{}",
        out.combined()
    );
    serde_json::from_str::<Vec<serde_json::Value>>(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The objects of the DaemonSet overlay: rendered by `kubectl kustomize` when there is a
/// kubectl; else the overlay's own files (its agents, and the aggregator's config and
/// token volume as its patches set them), which is where all of that is written.
fn daemonset_overlay_objects(scratch: &TestDir) -> Vec<serde_json::Value> {
    let dir = kubernetes_dir().join("overlays/daemonset");
    let text = match find_program("kubectl") {
        Some(kubectl) => {
            let mut cmd = Command::new(kubectl);
            cmd.arg("kustomize").arg(&dir);
            let out = run(cmd, scratch.path(), TIMEOUT);
            assert!(
                out.status.success(),
                "kubectl kustomize: {}",
                out.combined()
            );
            out.stdout
        }
        None => {
            eprintln!("kubectl not found: reading the overlay's files instead of its rendering");
            [
                "agents.yaml",
                "aggregator-config.yaml",
                "aggregator-tokens.yaml",
            ]
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)).expect("read the overlay") + "\n---\n")
            .collect()
        }
    };
    yaml_documents(&text, "the DaemonSet overlay", scratch)
}

/// Every Secret a pod spec names: volumes (plain and projected), env and envFrom of every
/// container, image pull secrets.
fn secrets_named(pod: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |v: &serde_json::Value| out.extend(v.as_str().map(str::to_string));
    let list = |v: &serde_json::Value| v.as_array().cloned().unwrap_or_default();
    for volume in list(&pod["volumes"]) {
        push(&volume["secret"]["secretName"]);
        for source in list(&volume["projected"]["sources"]) {
            push(&source["secret"]["name"]);
        }
    }
    for container in list(&pod["containers"])
        .into_iter()
        .chain(list(&pod["initContainers"]))
    {
        for env in list(&container["env"]) {
            push(&env["valueFrom"]["secretKeyRef"]["name"]);
        }
        for from in list(&container["envFrom"]) {
            push(&from["secretRef"]["name"]);
        }
    }
    for pull in list(&pod["imagePullSecrets"]) {
        push(&pull["name"]);
    }
    out
}

/// The one node a pod spec may run on, by name (`matchFields: metadata.name In [NODE]`,
/// the only term); panics with `what` otherwise. A node label (even
/// `kubernetes.io/hostname`) would not do: a node's kubelet may set its own labels.
fn pinned_node(pod: &serde_json::Value, what: &str) -> String {
    let terms = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    let terms = terms.as_array().cloned().unwrap_or_default();
    let [term] = terms.as_slice() else {
        panic!("{what} is not pinned to one node by a single node affinity term: {terms:?}");
    };
    let fields = term["matchFields"].as_array().cloned().unwrap_or_default();
    match fields.as_slice() {
        [field]
            if field["key"] == "metadata.name"
                && field["operator"] == "In"
                && field["values"].as_array().is_some_and(|v| v.len() == 1)
                && term["matchExpressions"]
                    .as_array()
                    .is_none_or(|e| e.is_empty()) =>
        {
            field["values"][0]
                .as_str()
                .expect("a node name")
                .to_string()
        }
        _ => panic!(
            "{what} is not pinned to one node by its name (matchFields metadata.name In [NODE]): {term}"
        ),
    }
}

/// In the DaemonSet overlay, every agent pod runs on one node, named, and can reach that
/// node's token and no other Secret; no two nodes share a Secret; the aggregator reads
/// each node's Secret and has a token entry for each node, and nothing else.
#[test]
fn daemonset_pods_reach_only_their_own_nodes_token() {
    let scratch = TestDir::new("kubernetes-daemonset-tokens");
    let objects = daemonset_overlay_objects(&scratch);
    let mut secret_of_node = std::collections::BTreeMap::new();
    let mut aggregator_tokens = None;
    let mut aggregator_config = None;
    for object in &objects {
        let kind = object["kind"].as_str().unwrap_or("?");
        let name = object["metadata"]["name"].as_str().unwrap_or("?");
        let what = format!("{kind} {name}");
        if kind == "ConfigMap" && name == "sonde-aggregator" {
            aggregator_config = object["data"]["aggregator.yml"]
                .as_str()
                .map(str::to_string);
        }
        let pod = match kind {
            "Pod" => &object["spec"],
            "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => {
                &object["spec"]["template"]["spec"]
            }
            "CronJob" => &object["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => continue,
        };
        let runs = |bin: &str| {
            pod["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["command"][0] == bin)
        };
        if name == "sonde-aggregator" {
            aggregator_tokens = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == "tokens")
                .cloned();
            continue;
        }
        if !runs("sonde-agent") {
            assert!(
                secrets_named(pod).is_empty(),
                "{what} names Secrets: {:?}",
                secrets_named(pod)
            );
            continue;
        }
        assert_eq!(
            kind, "DaemonSet",
            "{what}: the overlay's agents are DaemonSets"
        );
        let node = pinned_node(pod, &what);
        let own = format!("sonde-agent-token-{node}");
        assert_eq!(
            secrets_named(pod),
            [own.as_str()],
            "{what} (node {node}) must name its node's Secret and no other"
        );
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            if volume["secret"]["secretName"] == own.as_str() {
                let items: Vec<&str> = volume["secret"]["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i["key"].as_str())
                    .collect();
                assert_eq!(
                    items,
                    [node.as_str()],
                    "{what}: the keys it mounts of {own}"
                );
            }
        }
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{what}: a ServiceAccount token in the pod would let it ask the API for more"
        );
        assert!(
            secret_of_node.insert(node.clone(), own).is_none(),
            "two agent workloads on node {node}"
        );
    }
    for object in objects.iter().filter(|o| o["kind"] == "Secret") {
        let name = object["metadata"]["name"].as_str().unwrap_or("?");
        assert_ne!(
            name, "sonde-agent-tokens",
            "the overlay still has every agent's token in one Secret"
        );
        assert!(
            !name.starts_with("sonde-agent-token-"),
            "the overlay ships the Secret {name}: each node's token is the operator's to make"
        );
    }
    assert!(
        secret_of_node.len() >= 2,
        "the overlay should run an agent on each of its example nodes: {secret_of_node:?}"
    );
    let volume = aggregator_tokens.expect("the aggregator's volume tokens");
    let mut aggregator_sources: Vec<String> = volume["projected"]["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|source| source["secret"]["name"].as_str().map(str::to_string))
        .collect();
    assert!(
        volume["secret"].is_null(),
        "the aggregator's tokens should be each node's Secret, projected: {volume}"
    );
    let mut wanted: Vec<String> = secret_of_node.values().cloned().collect();
    aggregator_sources.sort();
    wanted.sort();
    assert_eq!(
        aggregator_sources, wanted,
        "the aggregator should read exactly each node's Secret"
    );
    let config = aggregator_config.expect("the aggregator's ConfigMap");
    for node in secret_of_node.keys() {
        assert!(
            config.contains(&format!("- agent: {node}\n"))
                && config.contains(&format!("token_file: /etc/sonde/tokens/{node}\n")),
            "the aggregator's fleet.auth.tokens has no entry for node {node}:\n{config}"
        );
    }
    assert_eq!(
        config.matches("- agent: ").count(),
        secret_of_node.len(),
        "a token entry for a node that runs no agent:\n{config}"
    );
}

/// per-node.sh writes the overlay's per-node files: for the example nodes, exactly the
/// ones shipped; for other nodes, one agent each; and it refuses what is not a node name.
#[test]
fn per_node_script_writes_the_shipped_files_and_refuses_bad_names() {
    let dir = TestDir::new("kubernetes-per-node");
    let script = kubernetes_dir().join("overlays/daemonset/per-node.sh");
    let per_node = |nodes: &[&str]| {
        let mut cmd = Command::new("sh");
        cmd.arg(&script)
            .args(nodes)
            .env("SONDE_OVERLAY_DIR", dir.path());
        run(cmd, dir.path(), TIMEOUT)
    };
    let out = per_node(&["node-a", "node-b"]);
    assert!(out.status.success(), "{}", out.combined());
    for file in ["agents.yaml", "aggregator-tokens.yaml"] {
        let shipped =
            std::fs::read_to_string(kubernetes_dir().join("overlays/daemonset").join(file))
                .expect("read the shipped file");
        let written = std::fs::read_to_string(dir.join(file)).expect("read the written file");
        assert_eq!(
            written, shipped,
            "overlays/daemonset/{file} is not what `per-node.sh node-a node-b` writes: run it again"
        );
    }
    assert!(
        out.stdout
            .contains("create secret generic sonde-agent-token-node-b --from-literal=node-b="),
        "{}",
        out.stdout
    );
    let out = per_node(&["ip-10-0-0-7.eu-west-1.compute.internal", "worker-3"]);
    assert!(out.status.success(), "{}", out.combined());
    let agents = std::fs::read_to_string(dir.join("agents.yaml")).expect("read");
    assert_eq!(agents.matches("\nkind: DaemonSet\n").count(), 2, "{agents}");
    assert!(
        agents.contains("secretName: sonde-agent-token-worker-3\n"),
        "{agents}"
    );
    assert!(!agents.contains("@NODE@"), "{agents}");
    for bad in [&["Node_A"][..], &["node-a", "node-a"], &[&"n".repeat(52)]] {
        let out = per_node(bad);
        assert!(!out.status.success(), "per-node.sh accepted {bad:?}");
        assert!(
            out.stderr.contains("per-node.sh: "),
            "per-node.sh should say why it refuses {bad:?}: {}",
            out.combined()
        );
    }
}
