//! What the bench programs that run sonde's release binaries share (`agent-bench`,
//! `probe-bench`): finding those binaries, a working directory that goes away with the
//! run, bounded waits that notice a dead peer, and the nginx they load.

use crate::{Process, free_port, http_get_ok};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A sonde binary for a bench: `given` when set, else the one next to the bench program,
/// else `target/release/<name>`. The error says how to build it.
pub fn find_release_bin(given: Option<&Path>, name: &str) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("{}: no such file", path.display()))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)));
    let release = crate::workspace_root().join("target/release").join(name);
    for candidate in beside.into_iter().chain([release.clone()]) {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "no {name} binary next to this program nor at {}; build it with `cargo build --release -p {name}`",
        release.display()
    ))
}

/// A bench's scratch directory (configs, logs, data), removed when the run ends unless
/// it is to be kept.
pub struct WorkDir {
    pub path: PathBuf,
    keep: bool,
    /// Who says where the files are kept (the bench's name).
    owner: &'static str,
}

impl WorkDir {
    pub fn create(owner: &'static str, keep: bool) -> Result<Self, String> {
        let path = std::env::temp_dir().join(format!("sonde-{owner}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        Ok(Self { path, keep, owner })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("{}: files kept in {}", self.owner, self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Polls `check` every half second until it is `Ok`, for at most `timeout`; fails at once
/// when one of `processes` has exited.
pub fn wait_for<T, E: std::fmt::Display>(
    what: &str,
    timeout: Duration,
    processes: &mut [&mut Process],
    mut check: impl FnMut() -> Result<T, E>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        for p in processes.iter_mut() {
            p.check_running()?;
        }
        match check() {
            Ok(v) => return Ok(v),
            Err(seen) if start.elapsed() > timeout => {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}; last seen: {seen:#}"
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// nginx answering every path with 200 "ok\n": one process (no master), room for many
/// connections, and keep-alive connections that last the whole run (nginx closes one
/// after 1,000 requests by default).
pub fn nginx_config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok\n"; }}
    }}
}}
"#
    )
}

/// Starts the bench nginx ([`nginx_config`]) in `<dir>/nginx` on a free port and waits
/// until it answers. Returns the process (its only one: nginx runs without a master)
/// and the port.
pub fn start_nginx(dir: &Path) -> Result<(Process, u16), String> {
    let nginx_bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("nginx not found; install the Debian package nginx-light")?;
    let port = free_port();
    let nginx_dir = dir.join("nginx");
    std::fs::create_dir_all(&nginx_dir)
        .map_err(|e| format!("create {}: {e}", nginx_dir.display()))?;
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(&conf, nginx_config(&nginx_dir, port))
        .map_err(|e| format!("write {}: {e}", conf.display()))?;
    let mut cmd = Command::new(nginx_bin);
    cmd.arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&nginx_dir)
        .args(["-e", "stderr"]);
    let mut nginx = Process::start("nginx", cmd, dir);
    let url = format!("http://127.0.0.1:{port}/");
    wait_for("nginx", Duration::from_secs(30), &mut [&mut nginx], || {
        http_get_ok(&url).map(drop)
    })?;
    Ok((nginx, port))
}

/// The options every bench has: a name for the run, a JSON copy of its report, and
/// whether its files outlive it.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A name for this run in the report (the commit, "before", ...).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the working directory (configs, logs, data) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

impl RunArgs {
    /// Writes `report` to `--json`, when given.
    pub fn write_json(&self, report: &serde_json::Value) -> Result<(), String> {
        let Some(path) = &self.json else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(report).unwrap_or_default();
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// `perf record -g` of one process, into a file, until stopped.
pub struct PerfRecord(std::process::Child);

impl PerfRecord {
    pub fn start(pid: u32, output: &Path) -> Result<Self, String> {
        Command::new("perf")
            .args(["record", "-g", "-p", &pid.to_string(), "-o"])
            .arg(output)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(Self)
            .map_err(|e| format!("cannot start perf (Debian package linux-perf): {e}"))
    }

    /// Stops the recording (SIGINT, as Ctrl-C would) and waits until perf has written
    /// its file.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}
