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
    /// [`finish`] with `--json`.
    pub fn finish(
        &self,
        bin: &str,
        markdown: &str,
        json: &serde_json::Value,
        problems: &[String],
    ) -> std::process::ExitCode {
        finish(bin, self.json.as_deref(), markdown, json, problems)
    }
}

/// Writes `report` as pretty JSON to `path`, when given.
fn write_json(path: Option<&Path>, report: &serde_json::Value) -> Result<(), String> {
    let Some(path) = path else {
        return Ok(());
    };
    let text = serde_json::to_string_pretty(report).unwrap_or_default();
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Ends a bench binary `bin`: the report's table on stdout, its JSON to `json_path`, and
/// the problems found on stderr; success only without any.
pub fn finish(
    bin: &str,
    json_path: Option<&Path>,
    markdown: &str,
    json: &serde_json::Value,
    problems: &[String],
) -> std::process::ExitCode {
    println!("{markdown}");
    if let Err(e) = write_json(json_path, json) {
        eprintln!("{bin}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    for p in problems {
        eprintln!("{bin}: {p}");
    }
    if problems.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
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

/// Compiles a bench's C program (`source`, the text of `file_name`) with `gcc -O2` into
/// `dir/program`. Returns the program's path.
pub fn compile_c(
    dir: &Path,
    file_name: &str,
    source: &str,
    program: &str,
) -> Result<PathBuf, String> {
    let gcc = ["/usr/bin/gcc", "/usr/bin/cc"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("gcc not found; install the Debian package gcc")?;
    let source_path = dir.join(file_name);
    let program = dir.join(program);
    std::fs::write(&source_path, source)
        .map_err(|e| format!("write {}: {e}", source_path.display()))?;
    let out = Command::new(gcc)
        .args(["-O2", "-o"])
        .arg(&program)
        .arg(&source_path)
        .output()
        .map_err(|e| format!("cannot run gcc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "gcc could not compile {} ({}): {}",
            source_path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(program)
}

/// What one measured phase of a bench's C loop did.
pub struct LoopRun {
    /// Iterations in the measured phase, as the program counted them.
    pub count: u64,
    /// The program's whole-process CPU (`/proc/PID/stat`) over the measured phase.
    pub cpu_seconds: f64,
    pub elapsed: Duration,
}

/// Runs one of the benches' C loops (`connect_loop.c`, `http_exchange_loop.c`), which all
/// speak one protocol on stdin and stdout: the program warms up, prints `ready` and waits
/// for a line; it then runs its measured phase, prints `done N` and waits for stdin to
/// close before it exits. Its CPU is read between the line sent and `done`, so neither
/// its start nor its warm-up is counted. A program that fails (exits non-zero) fails the
/// run with what it wrote on stderr.
pub fn run_loop(program: &Path, args: &[String], ticks: f64) -> Result<LoopRun, String> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let name = program.file_name().map_or_else(
        || program.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().ok_or(format!("{name} has no stdin"))?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or(format!("{name} has no stdout"))?);
    let mut line = String::new();
    let measured = (|| {
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("reading {name}: {e}"))?;
        if line.trim() != "ready" {
            return Err(format!("{name} said {line:?} instead of ready"));
        }
        let cpu0 = crate::procfs::cpu_seconds(pid, ticks)?;
        let started = Instant::now();
        stdin
            .write_all(b"go\n")
            .map_err(|e| format!("writing to {name}: {e}"))?;
        line.clear();
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("reading {name}: {e}"))?;
        let elapsed = started.elapsed();
        let cpu1 = crate::procfs::cpu_seconds(pid, ticks)?;
        let count = line
            .trim()
            .strip_prefix("done ")
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| format!("{name} said {line:?} instead of done N"))?;
        Ok(LoopRun {
            count,
            cpu_seconds: cpu1 - cpu0,
            elapsed,
        })
    })();
    drop(stdin);
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {name}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{name} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    measured
}
