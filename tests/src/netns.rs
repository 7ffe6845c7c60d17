//! Network namespaces a test creates for itself (`ip netns`), so that probes can cross a
//! veth link, and per-namespace settings (`net.ipv4.ping_group_range`) can change
//! without touching the machine's own network. Removed when the guard drops.

use crate::{Output, TestDir, require_tool, run};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A network namespace, with its loopback up; deleted on drop (with what runs in it
/// killed by the [`crate::Process`] guards of the test).
pub struct Netns {
    name: String,
    /// Where the output of the commands run for it goes.
    scratch: TestDir,
}

/// Fails the test unless it runs as root: network namespaces, raw sockets and `setpriv`
/// need it (CI runs the tests as root; elsewhere, `sudo -E cargo test`).
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root (network namespaces, raw sockets, setpriv); run the tests as root, as CI does"
    );
}

impl Netns {
    /// `sonde-<tag>-<pid>`, so that parallel tests and runs never share one.
    pub fn new(tag: &str) -> Self {
        require_root(&format!("the network namespace {tag}"));
        let name = format!("sonde-{tag}-{}", std::process::id());
        let _ = Command::new(ip()).args(["netns", "del", &name]).output();
        let ns = Self {
            scratch: TestDir::new(&format!("netns-{tag}")),
            name,
        };
        ns.ip(&["netns", "add", &ns.name]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` (in the test's own namespace), failing the test on an error.
    pub fn ip(&self, args: &[&str]) {
        let mut cmd = Command::new(ip());
        cmd.args(args);
        checked(cmd, &self.scratch, &format!("ip {}", args.join(" ")));
    }

    /// Runs `ARGS` inside the namespace, failing the test on an error.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(ip());
        cmd.args(["netns", "exec", &self.name]).args(args);
        checked(
            cmd,
            &self.scratch,
            &format!("ip netns exec {} {}", self.name, args.join(" ")),
        )
    }

    /// Sets a sysctl of the namespace (`net.*` ones are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it, so
    /// the process's id is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(ip());
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// [`Netns::command`] when `netns` is given, else the program itself.
    pub fn command_in(netns: Option<&Netns>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match netns {
            Some(ns) => ns.command(program),
            None => Command::new(program),
        }
    }

    /// The namespace's `/etc/resolv.conf`: `ip netns exec` mounts
    /// `/etc/netns/<name>/resolv.conf` over it for the programs it runs.
    pub fn set_nameserver(&self, address: &str) {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<name>");
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {address}\n"))
            .expect("write the namespace's resolv.conf");
    }

    /// The command prefix that starts a program inside the namespace.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            ip().display().to_string(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// [`crate::http_get`] from inside the namespace: a thread that joins it first, so
    /// that a program listening on the namespace's loopback can be reached.
    /// GET `url` from inside the namespace (curl, run there): (status, body).
    pub fn http_get(&self, url: &str) -> Result<(u16, String), String> {
        let out = self
            .command(require_tool("curl", "curl"))
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", url])
            .output()
            .map_err(|e| format!("curl {url}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "curl {url}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        let status = status
            .parse()
            .map_err(|_| format!("curl {url}: no status in {text:?}"))?;
        Ok((status, body.to_string()))
    }

    /// A veth pair from this namespace to `peer`, each end with its addresses (CIDR
    /// notation; IPv6 ones without duplicate address detection) and `mtu`.
    pub fn link_to(&self, peer: &Netns, mtu: u32, here: &[&str], there: &[&str]) {
        // Interface names are at most 15 bytes, and unique in the test's namespace while
        // they are created there.
        static PAIRS: AtomicU32 = AtomicU32::new(0);
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        let a = format!("sv{}x{n}a", std::process::id() % 100_000);
        let b = format!("sv{}x{n}b", std::process::id() % 100_000);
        self.ip(&[
            "link", "add", &a, "netns", &self.name, "type", "veth", "peer", "name", &b, "netns",
            &peer.name,
        ]);
        for (ns, dev, addrs) in [(self, &a, here), (peer, &b, there)] {
            ns.exec(&["ip", "link", "set", dev, "mtu", &mtu.to_string(), "up"]);
            for addr in addrs {
                let mut args = vec!["ip", "addr", "add", addr, "dev", dev];
                if addr.contains(':') {
                    args.push("nodad");
                }
                ns.exec(&args);
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(ip())
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

fn ip() -> std::path::PathBuf {
    require_tool("ip", "iproute2")
}

fn checked(cmd: Command, scratch: &TestDir, what: &str) -> Output {
    let out = run(cmd, scratch.path(), Duration::from_secs(30));
    assert!(out.status.success(), "{what} failed:\n{}", out.combined());
    out
}
