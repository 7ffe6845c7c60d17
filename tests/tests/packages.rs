//! The Debian packages: `cargo deb` (the cargo-deb crate, which scripts/test.sh installs)
//! builds `sonde-agent` and `sonde-aggregator` from the `[package.metadata.deb]` of their
//! Cargo.toml; both install with `dpkg -i` on this machine (as root), with the binaries,
//! the systemd units, the sysusers file, the `sonde` user, the configs in /etc/sonde and
//! the alert rules; the installed configs pass the installed binaries' `check-config`
//! (exactly as the units' ExecStartPre runs it), and the installed rules pass promtool.
//! The packages are purged at the end.
//!
//! The packages hold the binaries the other end-to-end tests run (`sonde_bin`: the test's
//! own profile, `cargo deb --no-build --profile`), so this test costs no build of its own:
//! a release build would compile every dependency once more, some ten minutes of the
//! suite on two cores, and nothing it checks (the metadata, the installed files, the user,
//! the units, the configs passing `check-config`) depends on the optimisation level.

use sonde_tests::{TestDir, file_mode, require_tool, run, sonde_bin, under_ci, workspace_root};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

/// The `cargo-deb` subcommand: on PATH or in cargo's bin directory. Missing, the test
/// fails, saying how to install it.
fn cargo_deb() -> PathBuf {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("cargo-deb"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`cargo-deb` is not installed{}: run `cargo install cargo-deb --locked` \
                 (scripts/test.sh does), then run this test again",
                if under_ci() {
                    " on this CI machine"
                } else {
                    ""
                }
            )
        })
}

/// The cargo profile whose output directory holds `bin` (`target/debug` is `dev`).
fn profile_of(bin: &Path) -> String {
    match bin
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
    {
        Some("debug") | None => "dev".into(),
        Some(other) => other.into(),
    }
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn must(cmd: Command, scratch: &TestDir, timeout: Duration) -> String {
    let describe = format!("{cmd:?}");
    let out = run(cmd, scratch.path(), timeout);
    assert!(
        out.status.success(),
        "{describe} failed ({}):\n{}",
        out.status,
        out.combined()
    );
    out.combined()
}

/// The path of the .deb `cargo deb` says it wrote.
fn deb_path(output: &str) -> PathBuf {
    output
        .split_whitespace()
        .rev()
        .find(|w| w.ends_with(".deb"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("cargo deb named no .deb:\n{output}"))
}

/// The first of `candidates` that exists.
fn installed(candidates: &[&str]) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("none of {candidates:?} is installed"))
}

/// The words of the unit's `ExecStartPre=` line.
fn exec_start_pre(unit: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(unit).expect("read the installed unit");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .unwrap_or_else(|| panic!("{} has no ExecStartPre=", unit.display()));
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
fn debian_packages_build_install_and_check_their_configs() {
    let dpkg = require_tool("dpkg", "dpkg");
    let cargo_deb = cargo_deb();
    assert!(
        is_root(),
        "installing the packages with dpkg -i needs root: run this test as root (CI does)"
    );
    let scratch = TestDir::new("packages");

    // cargo deb packages the binaries the suite built; `sonde_bin` builds them if needed.
    let profile = profile_of(&sonde_bin("sonde-agent"));
    let mut debs = Vec::new();
    for package in ["sonde-agent", "sonde-aggregator"] {
        let mut cmd = Command::new(&cargo_deb);
        // --strip and --fast: the debug build's binaries are large, and xz at its default
        // level would spend a minute on them.
        cmd.current_dir(workspace_root()).args([
            "deb",
            "--no-build",
            "--profile",
            &profile,
            "--strip",
            "--fast",
            "-p",
            package,
        ]);
        let out = must(cmd, &scratch, TIMEOUT);
        let deb = deb_path(&out);
        assert!(deb.exists(), "{} does not exist:\n{out}", deb.display());
        let mut contents = Command::new(&dpkg);
        contents.arg("--contents").arg(&deb);
        let listing = must(contents, &scratch, TIMEOUT);
        for want in [
            format!("./usr/bin/{package}"),
            format!("/systemd/system/{package}.service"),
            format!("./usr/lib/sysusers.d/{package}.conf"),
            format!("./etc/sonde/{}.yml", package.trim_start_matches("sonde-")),
        ] {
            assert!(
                listing.contains(&want),
                "{} has no {want}:\n{listing}",
                deb.display()
            );
        }
        debs.push(deb);
    }

    // Install both, on this machine; whatever happens next, purge them at the end.
    let result = std::panic::catch_unwind(|| {
        let mut install = Command::new(&dpkg);
        install.arg("-i").args(&debs);
        must(install, &scratch, TIMEOUT);
        check_installed(&scratch)
    });

    let mut purge = Command::new(&dpkg);
    purge.args(["--purge", "sonde-agent", "sonde-aggregator"]);
    let purged = run(purge, scratch.path(), TIMEOUT);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(
        purged.status.success(),
        "dpkg --purge failed:\n{}",
        purged.combined()
    );
    assert!(!Path::new("/usr/bin/sonde-agent").exists());
}

fn check_installed(scratch: &TestDir) {
    // The user the units run as.
    let mut getent = Command::new("getent");
    getent.args(["passwd", "sonde"]);
    let user = must(getent, scratch, TIMEOUT);
    assert!(user.contains("/var/lib/sonde"), "{user}");

    for (package, config) in [
        ("sonde-agent", "/etc/sonde/agent.yml"),
        ("sonde-aggregator", "/etc/sonde/aggregator.yml"),
    ] {
        // The config: root's, readable by the group sonde only.
        assert_eq!(file_mode(Path::new(config)), 0o640, "{config}");
        let mut stat = Command::new("stat");
        stat.args(["-c", "%U:%G", config]);
        assert_eq!(
            must(stat, scratch, TIMEOUT).trim(),
            "root:sonde",
            "{config}"
        );

        // check-config on the installed config, as the installed unit's ExecStartPre.
        let unit = installed(&[
            &format!("/usr/lib/systemd/system/{package}.service"),
            &format!("/lib/systemd/system/{package}.service"),
        ]);
        let pre = exec_start_pre(&unit);
        assert_eq!(
            pre,
            [
                format!("/usr/bin/{package}"),
                "check-config".into(),
                config.into()
            ],
            "{}",
            unit.display()
        );
        let mut cmd = Command::new(&pre[0]);
        cmd.args(&pre[1..]);
        let said = must(cmd, scratch, TIMEOUT);
        assert!(said.contains(": OK"), "{said}");

        // The unit is installed but not enabled: the config needs the operator first.
        assert!(
            !Path::new(&format!(
                "/etc/systemd/system/multi-user.target.wants/{package}.service"
            ))
            .exists(),
            "{package} should not be enabled at install"
        );
    }

    // The aggregator's installed config admits no agent until tokens are added: fleet.auth
    // is there (the unit listens on 0.0.0.0), and nothing is anonymous.
    let aggregator = std::fs::read_to_string("/etc/sonde/aggregator.yml").expect("read");
    assert!(
        aggregator.contains("\n  auth:\n    tokens: []"),
        "{aggregator}"
    );
    assert!(
        !aggregator.contains("allow_anonymous: true"),
        "{aggregator}"
    );

    // The alert rules, with their tests, where docs/deploying.md says.
    let promtool = require_tool("promtool", "prometheus");
    let rules = Path::new("/usr/share/sonde/prometheus");
    let mut check = Command::new(&promtool);
    check
        .args([
            "check",
            "rules",
            "sonde-alerts.yml",
            "compat/existing-alerts.yml",
        ])
        .current_dir(rules);
    must(check, scratch, TIMEOUT);
    let mut test = Command::new(&promtool);
    test.args(["test", "rules", "sonde-alerts.test.yml"])
        .current_dir(rules);
    must(test, scratch, TIMEOUT);
    for file in [
        "/usr/share/sonde/runbooks/SondeTargetDown.md",
        "/usr/share/sonde/grafana/sonde.json",
        "/usr/share/sonde/prometheus/scrape-sonde.yml",
        "/usr/share/doc/sonde-aggregator/examples/aggregator.yml",
        "/usr/share/doc/sonde-agent/examples/agent.yml",
    ] {
        assert!(Path::new(file).exists(), "{file} is not installed");
    }
}
