//! The first half of the floor: a C program looping `connect()` + `close()` to nginx,
//! compiled by the bench with gcc, and its whole-process CPU per connection.

use sonde_tests::procfs::cpu_seconds;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const SOURCE: &str = include_str!("connect_loop.c");

/// Compiles `connect_loop.c` into `dir`. Returns the program.
pub fn build(dir: &Path) -> Result<PathBuf, String> {
    let gcc = ["/usr/bin/gcc", "/usr/bin/cc"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("gcc not found; install the Debian package gcc")?;
    let source = dir.join("connect_loop.c");
    let program = dir.join("connect-loop");
    std::fs::write(&source, SOURCE).map_err(|e| format!("write {}: {e}", source.display()))?;
    let out = Command::new(gcc)
        .args(["-O2", "-o"])
        .arg(&program)
        .arg(&source)
        .output()
        .map_err(|e| format!("cannot run gcc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "gcc could not compile {} ({}): {}",
            source.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(program)
}

/// What one run of the loop measured.
pub struct ConnectLoop {
    pub connections: u64,
    pub cpu_seconds: f64,
    pub elapsed: Duration,
}

/// Runs `program` against `addr`: a warm-up, then `duration` measured.
pub fn run(
    program: &Path,
    addr: SocketAddr,
    warmup: Duration,
    duration: Duration,
    ticks: f64,
) -> Result<ConnectLoop, String> {
    let mut child = Command::new(program)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(warmup.as_secs_f64().to_string())
        .arg(duration.as_secs_f64().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().ok_or("connect-loop has no stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or("connect-loop has no stdout")?);
    let mut line = String::new();
    let measured = (|| {
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("reading connect-loop: {e}"))?;
        if line.trim() != "ready" {
            return Err(format!("connect-loop said {line:?} instead of ready"));
        }
        let cpu0 = cpu_seconds(pid, ticks)?;
        let started = std::time::Instant::now();
        stdin
            .write_all(b"go\n")
            .map_err(|e| format!("writing to connect-loop: {e}"))?;
        line.clear();
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("reading connect-loop: {e}"))?;
        let elapsed = started.elapsed();
        let cpu1 = cpu_seconds(pid, ticks)?;
        let connections = line
            .trim()
            .strip_prefix("done ")
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| format!("connect-loop said {line:?} instead of done N"))?;
        Ok(ConnectLoop {
            connections,
            cpu_seconds: cpu1 - cpu0,
            elapsed,
        })
    })();
    drop(stdin);
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for connect-loop: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "connect-loop failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    measured
}
