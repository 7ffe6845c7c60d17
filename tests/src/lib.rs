//! The harness of sonde's end-to-end tests: real processes (sonde's binaries, Prometheus,
//! nginx, dnsmasq) on loopback ports, each with its output in a log file, bounded waits,
//! and small clients for Prometheus's HTTP API and the text exposition format.
//!
//! Rules every test follows through this harness:
//! - only 127.0.0.1, on ports the kernel hands out ([`free_port`]);
//! - every wait is bounded in time ([`wait_until`], [`run`]);
//! - a missing peer program fails the test with the Debian package to install
//!   ([`require_tool`]); nothing is skipped silently;
//! - every process is killed when its [`Process`] guard drops, and when a test fails the
//!   tail of every process's log is printed, so that CI output says what went wrong.

pub mod bench;
pub mod netns;
pub mod parity;

pub use netns::Netns;
pub mod procfs;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How many log lines of each process a failing test prints.
const LOG_TAIL_LINES: usize = 80;

/// Pause between two polls of [`wait_until`].
const POLL_EVERY: Duration = Duration::from_millis(250);

// ---------------------------------------------------------------------------------------
// Paths

/// The workspace root (the directory of the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("the tests crate lives inside the workspace");
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
}

/// A file or directory of the repository, by its path from the workspace root.
pub fn repo_path(relative: &str) -> PathBuf {
    workspace_root().join(relative)
}

/// True when running under CI (`CI=true`, as CI sets it).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

// ---------------------------------------------------------------------------------------
// Temporary directories

/// A fresh directory under the system temp dir. Removed on drop, except when the test is
/// failing: then it is kept (logs, configs, databases) and its path printed.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("sonde-test-{name}-{}-{n}", std::process::id()));
        if path.exists() {
            let _ = fs::remove_dir_all(&path);
        }
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(relative)`.
    pub fn join(&self, relative: &str) -> PathBuf {
        self.path.join(relative)
    }

    /// Writes `contents` to `relative` inside the directory (creating parent directories)
    /// and returns the file's absolute path.
    pub fn write(&self, relative: &str, contents: &str) -> PathBuf {
        let path = self.join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        }
        fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: its files are kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Ports

/// Ports this test process has already handed out: the kernel may give the same
/// ephemeral port twice once the first listener is closed.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

fn claim(port: u16) -> bool {
    handed_out()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(port)
}

/// A TCP port on 127.0.0.1 that nothing listens on right now (bound, then released).
/// Also the way to get a *closed* port to probe.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        drop(listener);
        if claim(port) {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 after 200 tries");
}

/// A port free on 127.0.0.1 for both TCP and UDP (for a DNS server).
pub fn free_tcp_udp_port() -> u16 {
    for _ in 0..200 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        let udp_free = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok();
        drop(listener);
        if udp_free && claim(port) {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP on 127.0.0.1 after 200 tries");
}

// ---------------------------------------------------------------------------------------
// Programs

/// The path of an external program the tests need, from PATH or the sbin directories
/// (nginx and dnsmasq live in /usr/sbin, which a non-root PATH may lack).
///
/// A missing program FAILS the test, naming the Debian package that provides it: under
/// CI that is a broken test machine, and anywhere else it is a missing install step.
pub fn require_tool(name: &str, debian_package: &str) -> PathBuf {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path_var).collect();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        dirs.push(PathBuf::from(extra));
    }
    for dir in dirs {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return candidate;
        }
    }
    if under_ci() {
        panic!(
            "`{name}` is not installed on this CI machine: scripts/test.sh must install the \
             Debian package `{debian_package}` (apt-get install -y {debian_package}) before \
             running the tests"
        );
    }
    panic!(
        "`{name}` is not installed: install the Debian package `{debian_package}` \
         (apt-get install -y {debian_package}), or run `bash scripts/test.sh`, which installs \
         every package the tests need"
    );
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The path of one of sonde's binaries (`sonde-agent`, `sonde-aggregator`), built once per
/// test process (`cargo build --workspace --bins`) with the same profile and target
/// directory as the running test, so it is never stale. A failed build fails the test with
/// the compiler's output.
pub fn sonde_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = match BUILT.get_or_init(build_sonde_binaries) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    };
    let path = dir.join(name);
    assert!(
        is_executable(&path),
        "{} was not built by `cargo build --workspace --bins`",
        path.display()
    );
    path
}

fn build_sonde_binaries() -> Result<PathBuf, String> {
    // The test executable is <target-dir>/<profile>/deps/<test>-<hash>: its grandparent is
    // where cargo puts this profile's binaries, whatever CARGO_TARGET_DIR or
    // build.target-dir say.
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable path {}", exe.display()))?
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("unexpected target directory {}", profile_dir.display()))?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => "dev".to_string(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let log_dir = std::env::temp_dir().join(format!("sonde-test-build-{}", std::process::id()));
    fs::create_dir_all(&log_dir).map_err(|e| format!("create {}: {e}", log_dir.display()))?;
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        // The same command as scripts/test.sh, so that after it this is a no-op (building
        // only the two packages would unify dependency features differently and rebuild).
        .args(["build", "--workspace", "--bins", "--profile"])
        .arg(&profile)
        .arg("--target-dir")
        .arg(target_dir);
    let out = run(cmd, &log_dir, Duration::from_secs(30 * 60));
    let _ = fs::remove_dir_all(&log_dir);
    if !out.status.success() {
        return Err(format!(
            "`cargo build --workspace --bins` failed ({}):\n{}",
            out.status,
            tail(&out.combined(), 60)
        ));
    }
    Ok(profile_dir)
}

// ---------------------------------------------------------------------------------------
// Running commands to completion

/// The result of [`run`].
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stdout then stderr, for messages and for checks that do not care which.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion with no stdin, its output in files under `scratch`, killing it
/// after `timeout` (then the test fails, with what it printed).
pub fn run(mut cmd: Command, scratch: &Path, timeout: Duration) -> Output {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let out_path = scratch.join(format!("run-{n}.stdout"));
    let err_path = scratch.join(format!("run-{n}.stderr"));
    let describe = format!("{cmd:?}");
    let out_file = File::create(&out_path).expect("create stdout file");
    let err_file = File::create(&err_path).expect("create stderr file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {describe}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{describe} did not finish within {timeout:?}; it printed:\n{}{}",
                    read_lossy(&out_path),
                    read_lossy(&err_path)
                );
            }
            Err(e) => panic!("waiting for {describe}: {e}"),
        }
    };
    Output {
        status,
        stdout: read_lossy(&out_path),
        stderr: read_lossy(&err_path),
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        let _ = writeln!(out, "[... {start} earlier lines]");
    }
    for line in &all[start..] {
        let _ = writeln!(out, "{line}");
    }
    out
}

// ---------------------------------------------------------------------------------------
// Long-running processes

/// A child process with its stdout and stderr in a log file. Killed (SIGKILL) when
/// dropped; if the test is failing at that point, the tail of its log is printed.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once the test has stopped it on purpose.
    stopped: bool,
    /// It runs `sonde-agent` (perhaps under a wrapper): a [`Scene`] stops it first.
    is_agent: bool,
}

impl Process {
    /// Starts `cmd` with stdin closed and its output appended to `<log_dir>/<name>.log`,
    /// whose first line is the command line.
    pub fn start(name: &str, mut cmd: Command, log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let is_agent = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .any(|arg| Path::new(arg).file_name() == Some(std::ffi::OsStr::new("sonde-agent")));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let _ = writeln!(file, "$ {cmd:?}");
        let err_file = file.try_clone().expect("clone log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_string(),
            child,
            log,
            stopped: false,
            is_agent,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has printed so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The last lines of the log, headed by the process's name, for failure messages.
    pub fn log_tail(&self) -> String {
        format!(
            "----- last lines of {} ({}) -----\n{}",
            self.name,
            self.log.display(),
            tail(&self.log(), LOG_TAIL_LINES)
        )
    }

    /// Kills the process with SIGKILL (no chance to clean up, like a crash or a power
    /// cut) and reaps it.
    pub fn kill(&mut self) {
        self.stopped = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM (a graceful stop) and waits up to `timeout` for it to
    /// exit; SIGKILLs it past that and fails the test, since it did not stop as asked.
    pub fn terminate(&mut self, timeout: Duration) {
        self.stopped = true;
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL_EVERY);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!(
            "{} did not exit within {timeout:?} of SIGTERM\n{}",
            self.name,
            self.log_tail()
        );
    }

    /// Ok while the process runs (or was stopped on purpose); Err with its exit status and
    /// log tail once it has exited by itself.
    pub fn check_running(&mut self) -> Result<(), String> {
        if self.stopped {
            return Ok(());
        }
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited unexpectedly ({status})\n{}",
                self.name,
                self.log_tail()
            )),
            Err(e) => Err(format!("cannot check on {}: {e}", self.name)),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// A loopback TCP port that accepts and closes connections, for TCP probes to succeed
/// against. Served by a thread for the rest of the test process.
pub fn accepting_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the TCP target");
    let port = listener.local_addr().expect("target address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

/// A metric of the `/metrics` page at `base`, summed over the series matching `labels`;
/// Err (for polling) when no series matches.
pub fn metric_sum(base: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
    let text = http_get_ok(&format!("{base}/metrics"))?;
    let samples = parse_metrics(&text);
    let found = find_samples(&samples, name, labels);
    if found.is_empty() {
        return Err(format!("{name}{labels:?} not on {base}/metrics"));
    }
    Ok(found.iter().map(|s| s.value).sum())
}

// ---------------------------------------------------------------------------------------
// Bounded waiting

/// Polls `check` until it returns `Ok`, for at most `timeout`. `Err` carries what was seen
/// instead; on time-out the test fails with `what` and the last thing seen.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(value) => return value,
            Err(seen) if start.elapsed() >= timeout => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
            }
            Err(_) => std::thread::sleep(POLL_EVERY),
        }
    }
}

/// A set of processes making up one test's world, and the directory they work in.
/// Waits through a `Scene` also fail at once, with the log, if any process dies.
pub struct Scene {
    // Declared before `dir` so that the processes are killed before it is removed.
    processes: Vec<Process>,
    dir: TestDir,
}

impl Scene {
    pub fn new(name: &str) -> Self {
        Self {
            processes: Vec::new(),
            dir: TestDir::new(name),
        }
    }

    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    /// Starts a process named `name` (unique in the scene) with its log in the scene's dir.
    pub fn spawn(&mut self, name: &str, cmd: Command) {
        assert!(
            self.processes.iter().all(|p| p.name() != name),
            "two processes named {name}"
        );
        let process = Process::start(name, cmd, self.dir.path());
        self.processes.push(process);
    }

    pub fn process(&mut self, name: &str) -> &mut Process {
        self.processes
            .iter_mut()
            .find(|p| p.name() == name)
            .unwrap_or_else(|| panic!("no process named {name}"))
    }

    /// SIGKILLs the process named `name`.
    pub fn kill(&mut self, name: &str) {
        self.process(name).kill();
    }

    /// Err naming the first process that has exited without being stopped on purpose.
    pub fn check_running(&mut self) -> Result<(), String> {
        for p in &mut self.processes {
            p.check_running()?;
        }
        Ok(())
    }

    /// [`wait_until`], failing at once if a process of the scene dies meanwhile.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Err(died) = self.check_running() {
                panic!("while waiting for {what}: {died}");
            }
            match check() {
                Ok(value) => return value,
                Err(seen) if start.elapsed() >= timeout => {
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
                }
                Err(_) => std::thread::sleep(POLL_EVERY),
            }
        }
    }

    /// Asserts that `check` holds on every poll for `duration` (a state that must *stay*).
    pub fn hold_for(
        &mut self,
        what: &str,
        duration: Duration,
        mut check: impl FnMut() -> Result<(), String>,
    ) {
        let start = Instant::now();
        let mut polls = 0u32;
        while start.elapsed() < duration {
            if let Err(died) = self.check_running() {
                panic!("while checking that {what}: {died}");
            }
            if let Err(seen) = check() {
                panic!(
                    "{what} stopped holding after {:?} ({polls} good polls): {seen}",
                    start.elapsed()
                );
            }
            polls += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// How long a scene's agents get to stop on SIGTERM before they are killed.
const AGENTS_STOP_WITHIN: Duration = Duration::from_secs(5);

impl Scene {
    /// Stops every process as a scene's drop does: the agents first, with SIGTERM, then
    /// the others (aggregators, peers) with SIGKILL. Their logs stay for the test to read.
    pub fn stop(&mut self) {
        self.stop_agents();
        for p in self.processes.iter_mut().rev() {
            if !p.stopped {
                p.kill();
            }
        }
    }

    /// SIGTERMs the agents still running and waits up to [`AGENTS_STOP_WITHIN`] for
    /// them to exit, so that they end their streams as in production.
    fn stop_agents(&mut self) {
        let mut agents: Vec<&mut Process> = self
            .processes
            .iter_mut()
            .filter(|p| p.is_agent && !p.stopped)
            .collect();
        for agent in &mut agents {
            agent.stopped = true;
            if let Ok(pid) = i32::try_from(agent.pid()) {
                // SAFETY: kill(2) on a child this scene started and has not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let start = Instant::now();
        while start.elapsed() < AGENTS_STOP_WITHIN {
            agents.retain_mut(|a| !matches!(a.child.try_wait(), Ok(Some(_))));
            if agents.is_empty() {
                break;
            }
            std::thread::sleep(POLL_EVERY);
        }
    }
}

impl Drop for Scene {
    /// Agents first (see [`Scene::stop`]): killed after their aggregator, every agent's
    /// log, and the aggregator's, would end in lost connections that say nothing about
    /// why a test failed. The rest are killed as each `Process` drops.
    fn drop(&mut self) {
        self.stop_agents();
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

fn http_agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            // Loopback only: never through a proxy from the environment.
            .proxy(None)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into()
    })
}

/// GET `url`: (status, body), or Err when no HTTP answer came.
pub fn http_get(url: &str) -> Result<(u16, String), String> {
    let mut response = http_agent()
        .get(url)
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    Ok((status, body))
}

/// POST an empty body to `url`: (status, body).
pub fn http_post(url: &str) -> Result<(u16, String), String> {
    let mut response = http_agent()
        .post(url)
        .send_empty()
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("POST {url}: reading the body: {e}"))?;
    Ok((status, body))
}

/// GET `url` and require a 200: the body.
pub fn http_get_ok(url: &str) -> Result<String, String> {
    match http_get(url)? {
        (200, body) => Ok(body),
        (status, body) => Err(format!("GET {url}: status {status}: {}", tail(&body, 5))),
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus

/// A label set.
pub type Labels = BTreeMap<String, String>;

/// Runs an instant query against the Prometheus at `base` (`http://127.0.0.1:9090`):
/// one (labels, value) per series of a vector result, or one with no labels for a scalar.
pub fn prometheus_query(base: &str, promql: &str) -> Result<Vec<(Labels, f64)>, String> {
    let url = format!("{base}/api/v1/query");
    let mut response = http_agent()
        .get(&url)
        .query("query", promql)
        .call()
        .map_err(|e| format!("query {promql:?}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("query {promql:?}: reading the body: {e}"))?;
    let json: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| format!("query {promql:?}: status {status}, not JSON ({e}): {body}"))?;
    if json["status"] != "success" {
        return Err(format!("query {promql:?}: status {status}: {body}"));
    }
    let data = &json["data"];
    let parse_value = |v: &serde_json::Value| -> Result<f64, String> {
        let text = v[1]
            .as_str()
            .ok_or_else(|| format!("query {promql:?}: bad sample {v}"))?;
        parse_float(text).ok_or_else(|| format!("query {promql:?}: bad value {text:?}"))
    };
    match data["resultType"].as_str() {
        Some("vector") => {
            let mut out = Vec::new();
            for series in data["result"].as_array().into_iter().flatten() {
                let mut labels = Labels::new();
                if let Some(metric) = series["metric"].as_object() {
                    for (k, v) in metric {
                        labels.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                out.push((labels, parse_value(&series["value"])?));
            }
            Ok(out)
        }
        Some("scalar") => Ok(vec![(Labels::new(), parse_value(&data["result"])?)]),
        other => Err(format!(
            "query {promql:?}: unexpected result type {other:?}: {body}"
        )),
    }
}

/// The value of a query expected to return exactly one series: Err (for polling) when it
/// returns none or several.
pub fn prometheus_single(base: &str, promql: &str) -> Result<f64, String> {
    let result = prometheus_query(base, promql)?;
    match result.as_slice() {
        [(_, value)] => Ok(*value),
        [] => Err(format!("{promql}: no series")),
        many => Err(format!("{promql}: {} series: {many:?}", many.len())),
    }
}

/// Ok when the query returns exactly one series with value `want`.
pub fn prometheus_expect(base: &str, promql: &str, want: f64) -> Result<(), String> {
    let got = prometheus_single(base, promql)?;
    if got == want {
        Ok(())
    } else {
        Err(format!("{promql} = {got}, want {want}"))
    }
}

/// Every alert of the Prometheus at `base`, pending and firing, as `/api/v1/alerts`
/// lists them (`state`, `labels`, `value`, ...).
pub fn prometheus_alerts(base: &str) -> Result<Vec<serde_json::Value>, String> {
    let body = http_get_ok(&format!("{base}/api/v1/alerts"))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("/api/v1/alerts: {e}: {body}"))?;
    match v["data"]["alerts"].take() {
        serde_json::Value::Array(alerts) => Ok(alerts),
        _ => Err(format!("/api/v1/alerts: no alerts list: {body}")),
    }
}

/// Ok when the query returns no series at all.
pub fn prometheus_expect_empty(base: &str, promql: &str) -> Result<(), String> {
    let result = prometheus_query(base, promql)?;
    if result.is_empty() {
        Ok(())
    } else {
        Err(format!("{promql}: want no series, got {result:?}"))
    }
}

/// Prometheus's float syntax: Go's, plus `+Inf`, `-Inf`, `NaN`.
fn parse_float(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

// ---------------------------------------------------------------------------------------
// The text exposition format

/// One sample line of a `/metrics` page.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

/// Parses the sample lines of the Prometheus text format (or OpenMetrics text), skipping
/// comments, `# EOF` and lines it cannot read.
pub fn parse_metrics(text: &str) -> Vec<MetricSample> {
    text.lines().filter_map(parse_metric_line).collect()
}

fn parse_metric_line(line: &str) -> Option<MetricSample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Labels::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices().peekable();
        let consumed = loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let &(start, c) = chars.peek()?;
            if c == '}' {
                break start + 1;
            }
            let mut label = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                label.push(c);
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.insert(label.trim().to_string(), value);
        };
        rest = &after_brace[consumed..];
    }
    let value = parse_float(rest.split_whitespace().next()?)?;
    Some(MetricSample {
        name,
        labels,
        value,
    })
}

/// The samples of `name` in `text` whose labels include every pair of `want`.
pub fn find_samples<'a>(
    samples: &'a [MetricSample],
    name: &str,
    want: &[(&str, &str)],
) -> Vec<&'a MetricSample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// DNS (just enough to check that a test DNS server answers)

/// Sends one A query for `name` over UDP to `server`: the IPv4 addresses answered.
pub fn dns_query_a(server: SocketAddr, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("bind: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let id: u16 = 0x5eed;
    let mut query = Vec::new();
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; 1 question
    for part in name.trim_end_matches('.').split('.') {
        query.push(part.len() as u8);
        query.extend_from_slice(part.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    socket
        .send_to(&query, server)
        .map_err(|e| format!("send to {server}: {e}"))?;
    let mut buf = [0u8; 1500];
    let (len, _) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("no answer from {server}: {e}"))?;
    let msg = &buf[..len];
    if len < 12 || msg[..2] != id.to_be_bytes() {
        return Err(format!("bad answer from {server}: {msg:?}"));
    }
    let rcode = msg[3] & 0x0f;
    if rcode != 0 {
        return Err(format!("{server} answered rcode {rcode} for {name}"));
    }
    let questions = u16::from_be_bytes([msg[4], msg[5]]);
    let answers = u16::from_be_bytes([msg[6], msg[7]]);
    let mut at = 12;
    let skip_name = |mut at: usize| -> Option<usize> {
        loop {
            let len = *msg.get(at)? as usize;
            if len == 0 {
                return Some(at + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Some(at + 2);
            }
            at += 1 + len;
        }
    };
    for _ in 0..questions {
        at = skip_name(at).ok_or("truncated question")? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        at = skip_name(at).ok_or("truncated answer")?;
        let header = msg.get(at..at + 10).ok_or("truncated answer")?;
        let rtype = u16::from_be_bytes([header[0], header[1]]);
        let rdlen = u16::from_be_bytes([header[8], header[9]]) as usize;
        let rdata = msg.get(at + 10..at + 10 + rdlen).ok_or("truncated rdata")?;
        if rtype == 1 && rdlen == 4 {
            out.push(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        at += 10 + rdlen;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Peers

/// A Prometheus 2.x receiving remote write, with the given rule files, no scrape jobs,
/// evaluating rules every second. Returns its base URL once it is ready.
pub fn start_prometheus(scene: &mut Scene, name: &str, rule_files: &[PathBuf]) -> String {
    start_prometheus_with(scene, name, rule_files, "")
}

/// [`start_prometheus`] that also scrapes: `scrape_configs` is the YAML list that goes
/// under `scrape_configs:` (for instance `deploy/prometheus/scrape-sonde.yml` with its
/// addresses rewritten), scraped every second (the global `scrape_interval`).
pub fn start_prometheus_scraping(
    scene: &mut Scene,
    name: &str,
    rule_files: &[PathBuf],
    scrape_configs: &str,
) -> String {
    let mut extra = String::from("scrape_configs:\n");
    extra.push_str(scrape_configs);
    if !scrape_configs.ends_with('\n') {
        extra.push('\n');
    }
    start_prometheus_with(scene, name, rule_files, &extra)
}

/// [`start_prometheus`] with more of its config (`scrape_configs:`, ...) appended. The
/// global `scrape_interval` and `scrape_timeout` are 1s.
pub fn start_prometheus_with(
    scene: &mut Scene,
    name: &str,
    rule_files: &[PathBuf],
    extra_config: &str,
) -> String {
    let prometheus = require_tool("prometheus", "prometheus");
    let port = free_port();
    let mut config = String::from(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n",
    );
    for file in rule_files {
        let _ = writeln!(config, "  - {:?}", file.display().to_string());
    }
    if rule_files.is_empty() {
        config.push_str("  []\n");
    }
    config.push_str(extra_config);
    let config_path = scene
        .dir()
        .write(&format!("{name}/prometheus.yml"), &config);
    let mut cmd = Command::new(prometheus);
    cmd.arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            scene.dir().join(&format!("{name}/data")).display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--web.enable-remote-write-receiver")
        .arg("--log.level=info");
    scene.spawn(name, cmd);
    let base = format!("http://127.0.0.1:{port}");
    scene.wait_until(
        &format!("{name} to be ready"),
        Duration::from_secs(60),
        || http_get_ok(&format!("{base}/-/ready")).map(drop),
    );
    base
}

/// Starts VictoriaMetrics (single node) with `extra` flags and waits until it is healthy.
/// Recent samples are visible to queries at once (`-search.latencyOffset=0s`) and never
/// from a cache. Returns its base URL.
pub fn start_victoria_metrics(scene: &mut Scene, name: &str, extra: &[&str]) -> String {
    let vm = require_tool("victoria-metrics", "victoria-metrics");
    let port = free_port();
    let mut cmd = Command::new(vm);
    cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg(format!(
            "-storageDataPath={}",
            scene.dir().join(&format!("{name}-data")).display()
        ))
        .args(extra)
        .arg("-search.latencyOffset=0s")
        .arg("-search.disableCache")
        .arg("-loggerLevel=WARN");
    scene.spawn(name, cmd);
    let base = format!("http://127.0.0.1:{port}");
    scene.wait_until(
        &format!("{name} to be healthy"),
        Duration::from_secs(60),
        || http_get_ok(&format!("{base}/health")).map(drop),
    );
    base
}

/// An nginx serving `GET /` → 200 "ok\n" and `/missing` → 404 on 127.0.0.1, and `/flip`:
/// 200 "ok\n", or 503 while the file [`nginx_flip_file`] exists (a target that fails and
/// recovers on the test's command). Returns its port once it answers.
pub fn start_nginx(scene: &mut Scene, name: &str) -> u16 {
    start_nginx_with_tls(scene, name, None).0
}

/// [`start_nginx`], plus, with `tls: Some((certificate, key))` (PEM files), the same
/// locations over HTTPS on a second port. Returns (HTTP port, HTTPS port).
pub fn start_nginx_with_tls(
    scene: &mut Scene,
    name: &str,
    tls: Option<(&Path, &Path)>,
) -> (u16, Option<u16>) {
    let nginx = require_tool("nginx", "nginx-light");
    let port = free_port();
    let dir = scene.dir().join(name);
    fs::create_dir_all(&dir).expect("create nginx dir");
    let https_port = tls.map(|_| free_port());
    let https_server = match (tls, https_port) {
        (Some((cert, key)), Some(https)) => format!(
            r#"    server {{
        listen 127.0.0.1:{https} ssl;
        ssl_certificate {};
        ssl_certificate_key {};
        location = / {{ return 200 "ok\n"; }}
        location /missing {{ return 404; }}
    }}
"#,
            cert.display(),
            key.display()
        ),
        _ => String::new(),
    };
    let d = dir.display();
    let config = nginx_config(
        &dir,
        &format!(
            r#"    server {{
        listen 127.0.0.1:{port};
        location = / {{ return 200 "ok\n"; }}
        location /missing {{ return 404; }}
        location = /flip {{
            if (-f {d}/flip-down) {{ return 503 "flipped down\n"; }}
            return 200 "ok\n";
        }}
    }}
{https_server}"#
        ),
    );
    let config_path = scene.dir().write(&format!("{name}/nginx.conf"), &config);
    let mut cmd = Command::new(nginx);
    // -e: the error log before the config is read (the default is under /var/log); both
    // go to stderr, so into the process's log.
    cmd.arg("-c")
        .arg(&config_path)
        .arg("-p")
        .arg(&dir)
        .args(["-e", "stderr"]);
    scene.spawn(name, cmd);
    let url = format!("http://127.0.0.1:{port}/");
    scene.wait_until(
        &format!("{name} to serve {url}"),
        Duration::from_secs(30),
        || match http_get(&url)? {
            (200, body) if body == "ok\n" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    if let Some(https) = https_port {
        scene.wait_until(
            &format!("{name} to listen on HTTPS port {https}"),
            Duration::from_secs(30),
            || {
                std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, https))
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        );
    }
    (port, https_port)
}

/// An nginx config that runs in the foreground as the test's user, keeps its pid and
/// temporary files under `dir`, logs errors to stderr, and serves the `http` block's
/// `servers`.
pub fn nginx_config(dir: &Path, servers: &str) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{servers}}}
"#
    )
}

/// While this file exists, the nginx `name` of [`start_nginx`] answers `/flip` with 503.
pub fn nginx_flip_file(scene: &Scene, name: &str) -> PathBuf {
    scene.dir().join(name).join("flip-down")
}

/// A dnsmasq answering `A example.test` (and every name under it) with 127.0.0.1, and
/// nothing else (no upstream, no /etc/hosts). Returns its port (UDP and TCP).
pub fn start_dnsmasq(scene: &mut Scene, name: &str) -> u16 {
    let dnsmasq = require_tool("dnsmasq", "dnsmasq-base");
    let port = free_tcp_udp_port();
    let dir = scene.dir().join(name);
    fs::create_dir_all(&dir).expect("create dnsmasq dir");
    let mut cmd = Command::new(dnsmasq);
    cmd.arg("--keep-in-foreground")
        .arg("--no-resolv")
        .arg("--no-hosts")
        .arg("--no-poll")
        .arg("--conf-file=/dev/null")
        .arg("--listen-address=127.0.0.1")
        .arg("--bind-interfaces")
        .arg(format!("--port={port}"))
        .arg("--address=/example.test/127.0.0.1")
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .arg("--log-facility=-")
        .arg("--log-queries");
    scene.spawn(name, cmd);
    let server = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    scene.wait_until(
        &format!("{name} to answer A example.test"),
        Duration::from_secs(30),
        || match dns_query_a(server, "example.test")? {
            addrs if addrs == [Ipv4Addr::LOCALHOST] => Ok(()),
            addrs => Err(format!("answered {addrs:?}")),
        },
    );
    port
}

/// The addresses of a running aggregator.
pub struct AggregatorAddrs {
    /// `http://127.0.0.1:<web port>`
    pub web: String,
    /// `http://127.0.0.1:<grpc port>`, as agents write it in `aggregators: [{address}]`.
    pub grpc: String,
}

/// Starts `sonde-aggregator` with `config` (YAML) on free loopback ports, its storage in
/// the scene's dir, and waits until `/-/healthy` answers 200.
pub fn start_aggregator(scene: &mut Scene, name: &str, config: &str) -> AggregatorAddrs {
    start_aggregator_in(scene, None, name, config)
}

/// [`start_aggregator`], inside the network namespace `netns` when given (its loopback;
/// query it with [`Netns::http_get`]).
pub fn start_aggregator_in(
    scene: &mut Scene,
    netns: Option<&Netns>,
    name: &str,
    config: &str,
) -> AggregatorAddrs {
    let bin = sonde_bin("sonde-aggregator");
    let web_port = free_port();
    let grpc_port = free_port();
    let config_path = scene.dir().write(&format!("{name}.yml"), config);
    let mut cmd = Netns::command_in(netns, bin);
    cmd.arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .arg(format!("--grpc.listen-address=127.0.0.1:{grpc_port}"))
        .arg(format!(
            "--storage.path={}",
            scene.dir().join(&format!("{name}-data")).display()
        ))
        .arg("--log.level=debug");
    scene.spawn(name, cmd);
    let web = format!("http://127.0.0.1:{web_port}");
    scene.wait_until(
        &format!("{name} /-/healthy"),
        Duration::from_secs(60),
        || get_ok_in(netns, &format!("{web}/-/healthy")).map(drop),
    );
    AggregatorAddrs {
        web,
        grpc: format!("http://127.0.0.1:{grpc_port}"),
    }
}

/// An aggregator with fixed ports and storage, so that it can be started again as the
/// same aggregator after a kill: its agents keep its address, it keeps its data.
pub struct RestartableAggregator {
    /// Its config file (a test may rewrite it before a reload).
    pub config: PathBuf,
    /// Its `--storage.path`.
    pub data: PathBuf,
    web_port: u16,
    grpc_port: u16,
}

impl RestartableAggregator {
    /// Writes `config` to `<name>.yml` in the scene's dir; storage in `<name>-data`.
    pub fn new(scene: &Scene, name: &str, config: &str) -> Self {
        Self {
            config: scene.dir().write(&format!("{name}.yml"), config),
            data: scene.dir().join(&format!("{name}-data")),
            web_port: free_port(),
            grpc_port: free_port(),
        }
    }

    /// `http://127.0.0.1:<web port>`
    pub fn web(&self) -> String {
        format!("http://127.0.0.1:{}", self.web_port)
    }

    /// `http://127.0.0.1:<grpc port>`, as agents write it.
    pub fn grpc(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Starts it as process `process` (a new name for each start) with `extra` flags,
    /// always on the same ports and storage, and waits until `/-/ready` answers 200.
    pub fn start(&self, scene: &mut Scene, process: &str, extra: &[&str]) {
        let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
        cmd.arg(format!("--config.file={}", self.config.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.web_port))
            .arg(format!(
                "--grpc.listen-address=127.0.0.1:{}",
                self.grpc_port
            ))
            .arg(format!("--storage.path={}", self.data.display()))
            .args(extra);
        scene.spawn(process, cmd);
        let web = self.web();
        scene.wait_until(
            &format!("{process} /-/ready"),
            Duration::from_secs(60),
            || http_get_ok(&format!("{web}/-/ready")).map(drop),
        );
    }
}

/// Starts `sonde-agent` with `config` (YAML) on a free loopback port, its storage in the
/// scene's dir, and waits until `/-/healthy` answers 200. Returns its web base URL.
pub fn start_agent(scene: &mut Scene, name: &str, config: &str) -> String {
    start_agent_in(scene, None, name, config)
}

/// [`start_agent`], inside the network namespace `netns` when given (its loopback;
/// query it with [`Netns::http_get`]).
pub fn start_agent_in(
    scene: &mut Scene,
    netns: Option<&Netns>,
    name: &str,
    config: &str,
) -> String {
    let wrapper = netns.map(Netns::wrapper).unwrap_or_default();
    let web = start_agent_with(scene, name, config, &wrapper);
    scene.wait_until(
        &format!("{name} /-/healthy"),
        Duration::from_secs(60),
        || get_ok_in(netns, &format!("{web}/-/healthy")).map(drop),
    );
    web
}

fn get_ok_in(netns: Option<&Netns>, url: &str) -> Result<String, String> {
    let (status, body) = match netns {
        Some(ns) => ns.http_get(url)?,
        None => http_get(url)?,
    };
    match status {
        200 => Ok(body),
        _ => Err(format!("GET {url}: status {status}: {}", tail(&body, 5))),
    }
}

/// [`start_agent`] with the command prefixed by `wrapper` (`ip netns exec NS`, `setpriv
/// --reuid=nobody ...`), without waiting for it: from another network namespace only
/// that namespace's client can tell ([`parity::wait_healthy`]). Its storage directory
/// is writable by anyone, so that the agent can run as an unprivileged user.
pub fn start_agent_with(scene: &mut Scene, name: &str, config: &str, wrapper: &[String]) -> String {
    let bin = sonde_bin("sonde-agent");
    let web_port = free_port();
    let config_path = scene.dir().write(&format!("{name}.yml"), config);
    let storage = scene.dir().join(&format!("{name}-data"));
    fs::create_dir_all(&storage).expect("create the agent's storage directory");
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&storage, fs::Permissions::from_mode(0o777))
            .expect("open the agent's storage directory to its user");
    }
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    cmd.arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"))
        .arg(format!("--storage.path={}", storage.display()))
        .arg("--log.level=debug");
    scene.spawn(name, cmd);
    format!("http://127.0.0.1:{web_port}")
}

// ---------------------------------------------------------------------------------------
// TLS + token deployments (docs/security.md)

/// The security guide's command that makes one agent's token file, 0600: 32 random bytes in
/// base64. Run by `sh` with `DIR` and `AGENT` in the environment.
pub const MAKE_TOKEN_COMMAND: &str =
    r#"(umask 077 && head -c 32 /dev/urandom | base64 > "$DIR/$AGENT.token")"#;

/// Follows the security guide's first two steps into `<scratch>/pki`:
/// `deploy/examples/tls/make-certs.sh` makes a CA, the aggregator's certificate for `san`
/// (openssl's subjectAltName syntax) and a client certificate per agent, then
/// [`MAKE_TOKEN_COMMAND`] makes each agent's token file. A missing openssl fails the test
/// with the package to install. Returns the directory (`ca.pem`, `aggregator.pem`,
/// `aggregator.key`, `<agent>.pem`, `<agent>.key`, `<agent>.token`).
pub fn make_pki(scratch: &TestDir, san: &str, agents: &[&str]) -> PathBuf {
    // make-certs.sh runs openssl from PATH: fail here, naming the package, when it is missing.
    let openssl = require_tool("openssl", "openssl");
    let dir = scratch.join("pki");
    let mut path =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect::<Vec<_>>();
    if let Some(openssl_dir) = openssl.parent() {
        path.insert(0, openssl_dir.to_path_buf());
    }
    let path = std::env::join_paths(path).expect("PATH");
    let mut cmd = Command::new("sh");
    cmd.arg(repo_path("deploy/examples/tls/make-certs.sh"))
        .arg(&dir)
        .arg(san)
        .args(agents)
        .env("PATH", &path);
    let out = run(cmd, scratch.path(), Duration::from_secs(60));
    assert!(
        out.status.success(),
        "deploy/examples/tls/make-certs.sh failed ({}):\n{}",
        out.status,
        out.combined()
    );
    for agent in agents {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", MAKE_TOKEN_COMMAND])
            .env("DIR", &dir)
            .env("AGENT", agent);
        let out = run(cmd, scratch.path(), Duration::from_secs(10));
        assert!(
            out.status.success(),
            "the security guide's token command failed for {agent} ({}):\n{}",
            out.status,
            out.combined()
        );
    }
    dir
}

/// The permission bits of `path` (`0o600` for a file only its owner may read or write).
pub fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `text` with its one occurrence of `from` replaced by `to`; fails the test when `from`
/// occurs more than once or not at all (so that a rewritten example config fails loudly
/// when the example changes, instead of silently keeping the original).
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    let found = text.matches(from).count();
    assert_eq!(
        found, 1,
        "expected exactly one {from:?} in the text to rewrite, found {found}:\n{text}"
    );
    text.replacen(from, to, 1)
}

/// deploy/prometheus/scrape-sonde.yml with each job's static target replaced by a file_sd
/// file (the processes' ports are known only once they run).
pub fn shipped_scrape_configs_with_file_sd(aggregator: &Path, agents: &Path) -> String {
    let shipped = std::fs::read_to_string(repo_path("deploy/prometheus/scrape-sonde.yml"))
        .expect("read deploy/prometheus/scrape-sonde.yml");
    let file_sd = |file: &Path| {
        format!(
            "file_sd_configs:\n    - files: [{:?}]\n      refresh_interval: 1s",
            file.display().to_string()
        )
    };
    let text = replace_once(
        &shipped,
        "static_configs:\n    - targets: [\"127.0.0.1:9450\"]",
        &file_sd(aggregator),
    );
    replace_once(
        &text,
        "static_configs:\n    - targets: [\"127.0.0.1:9452\"]",
        &file_sd(agents),
    )
}

/// A `deploy/` example config as installed under `/etc/sonde`, moved into `dir`: its text
/// with every `/etc/sonde/` path made `<dir>/` (for instance the directory of
/// [`make_pki`], whose files have the names the examples use).
pub fn example_installed_in(relative: &str, dir: &Path) -> String {
    let text = fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"));
    assert!(
        text.contains("/etc/sonde/"),
        "{relative} names no file under /etc/sonde/"
    );
    text.replace("/etc/sonde/", &format!("{}/", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exposition_lines() {
        let text = "# HELP x y\n# TYPE sonde_agent_probes_total counter\n\
            sonde_agent_probes_total{job=\"web\",instance=\"http://127.0.0.1:8080/\"} 12\n\
            up 1 1700000000000\n\
            odd{a=\"q\\\"uote\\\\\",b=\"x,y}\"} NaN\n\
            # EOF\n";
        let samples = parse_metrics(text);
        assert_eq!(samples.len(), 3, "{samples:?}");
        assert_eq!(samples[0].name, "sonde_agent_probes_total");
        assert_eq!(samples[0].labels["instance"], "http://127.0.0.1:8080/");
        assert_eq!(samples[0].value, 12.0);
        assert_eq!(samples[1].name, "up");
        assert!(samples[1].labels.is_empty());
        assert_eq!(samples[2].labels["a"], "q\"uote\\");
        assert_eq!(samples[2].labels["b"], "x,y}");
        assert!(samples[2].value.is_nan());
        let web = find_samples(&samples, "sonde_agent_probes_total", &[("job", "web")]);
        assert_eq!(web.len(), 1);
    }

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        TcpListener::bind((Ipv4Addr::LOCALHOST, a)).expect("free port is bindable");
        let c = free_tcp_udp_port();
        UdpSocket::bind((Ipv4Addr::LOCALHOST, c)).expect("free UDP port is bindable");
    }

    #[test]
    fn run_is_bounded_and_captures_output() {
        let dir = TestDir::new("harness-run");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run(cmd, dir.path(), Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        let result = std::panic::catch_unwind(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            run(cmd, dir.path(), Duration::from_millis(300))
        });
        assert!(result.is_err(), "a command past its timeout fails the test");
    }

    #[test]
    fn wait_until_is_bounded() {
        let mut n = 0;
        let got = wait_until("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            if n >= 3 {
                Ok(n)
            } else {
                Err(format!("n = {n}"))
            }
        });
        assert_eq!(got, 3);
        let result = std::panic::catch_unwind(|| {
            wait_until("never", Duration::from_millis(300), || -> Result<(), _> {
                Err("no".to_string())
            })
        });
        assert!(result.is_err());
    }

    #[test]
    fn process_guard_kills_on_drop() {
        let dir = TestDir::new("harness-process");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 60"]);
        let mut p = Process::start("sleeper", cmd, dir.path());
        let pid = p.pid();
        wait_until("the log line", Duration::from_secs(10), || {
            if p.log().contains("started") {
                Ok(())
            } else {
                Err(p.log())
            }
        });
        p.check_running().expect("running");
        drop(p);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the process is gone after drop"
        );
    }
}
