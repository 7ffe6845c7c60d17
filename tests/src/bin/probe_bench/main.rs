//! probe-bench: what one `/probe` costs the real `sonde-agent`, beside the physical floor
//! and the real blackbox_exporter, measured against the same nginx in one run.
//!
//! - **The floor**, what a `/probe` of `tcp_connect` cannot go below: one TCP connection
//!   opened and closed (a C loop of `connect()` + `close()` to nginx, compiled here with
//!   gcc: its whole-process CPU per connection) plus serving one HTTP request (nginx's
//!   CPU per request while 32 keep-alive connections send `GET /` in a closed loop).
//! - **sonde-agent** (release build) serving `/probe?target=127.0.0.1:PORT&module=tcp_connect`,
//!   and `module=http_2xx` with `target=http://127.0.0.1:PORT/`, to the same closed loop:
//!   its whole-process CPU per request.
//! - **blackbox_exporter** (the Debian package) serving the same requests.
//!
//! CPU is utime + stime of `/proc/PID/stat` over the measured phase, which starts after
//! a warm-up on the same connections and ends when every request sent has been answered.
//! Every answer must be a 200 (with a `probe_success 1` line for `/probe`), or the run
//! fails. The load generator is a thread of this program, so its CPU is in no figure.
//! The phases run one after another, in rounds; the ratios that count are each round's
//! against that round's floor.
//!
//! `scripts/probe-bench.sh` installs what it needs, builds and runs it; `--help` has the
//! options; docs/benchmarks.md has the figures.

mod floor;
mod load;

use clap::Parser;
use load::{Expect, LoadGenerator, Target};
use sonde_proto::config::PromDuration;
use sonde_tests::bench::{PerfRecord, RunArgs, WorkDir, find_release_bin, start_nginx, wait_for};
use sonde_tests::procfs::{clock_ticks_per_second, cpu_seconds};
use sonde_tests::{Process, free_port, http_get_ok};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "probe-bench",
    about = "sonde-agent's /probe against the floor (connect+close, one nginx request) and blackbox_exporter: CPU per request"
)]
struct Args {
    /// Measured time of each phase.
    #[arg(long, default_value = "5s")]
    duration: PromDuration,
    /// Load before each phase's measurement, on the same connections.
    #[arg(long, default_value = "1s")]
    warmup: PromDuration,
    /// Concurrent keep-alive connections of the load.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Rounds of every phase; the table gives the median and the spread.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The sonde-agent binary [default: next to this program, else target/release].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The blackbox_exporter binary [default: prometheus-blackbox-exporter on PATH or
    /// in /usr/bin].
    #[arg(long)]
    blackbox: Option<PathBuf>,
    /// Another sonde-agent binary, measured beside the first in every round (the
    /// commit before a change), so that the two compare under the same load.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Leave blackbox_exporter out (quicker while working on the agent).
    #[arg(long)]
    no_blackbox: bool,
    /// Record the agent with `perf record -g` during its first tcp_connect phase, into
    /// this file.
    #[arg(long)]
    perf: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

/// The modules both servers load, in blackbox_exporter's syntax.
const MODULES: &str = "modules:
  tcp_connect:
    prober: tcp
    timeout: 5s
  http_2xx:
    prober: http
    timeout: 5s
    http:
      preferred_ip_protocol: ip4
";

fn agent_config() -> String {
    format!(
        "# Written by probe-bench\nagent:\n  id: probe-bench\naggregators: []\n{MODULES}probe_endpoint:\n  enabled: true\n  allowed_targets: [\"127.0.0.1:*\"]\n"
    )
}

/// The rows of the report, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Row {
    ConnectClose,
    NginxRequest,
    Floor,
    AgentTcp,
    AgentHttp,
    BaselineTcp,
    BaselineHttp,
    BlackboxTcp,
    BlackboxHttp,
}

impl Row {
    const ALL: [Row; 9] = [
        Row::ConnectClose,
        Row::NginxRequest,
        Row::Floor,
        Row::AgentTcp,
        Row::AgentHttp,
        Row::BaselineTcp,
        Row::BaselineHttp,
        Row::BlackboxTcp,
        Row::BlackboxHttp,
    ];

    fn label(self) -> &'static str {
        match self {
            Row::ConnectClose => "floor: `connect()` + `close()` (C loop), per connection",
            Row::NginxRequest => "floor: nginx, per keep-alive request",
            Row::Floor => "**floor** (the two above)",
            Row::AgentTcp => "**sonde-agent** `/probe` tcp_connect",
            Row::AgentHttp => "sonde-agent `/probe` http_2xx",
            Row::BaselineTcp => "sonde-agent, baseline binary, `/probe` tcp_connect",
            Row::BaselineHttp => "sonde-agent, baseline binary, `/probe` http_2xx",
            Row::BlackboxTcp => "blackbox_exporter `/probe` tcp_connect",
            Row::BlackboxHttp => "blackbox_exporter `/probe` http_2xx",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Row::ConnectClose => "connect_close",
            Row::NginxRequest => "nginx_request",
            Row::Floor => "floor",
            Row::AgentTcp => "agent_tcp_connect",
            Row::AgentHttp => "agent_http_2xx",
            Row::BaselineTcp => "baseline_tcp_connect",
            Row::BaselineHttp => "baseline_http_2xx",
            Row::BlackboxTcp => "blackbox_tcp_connect",
            Row::BlackboxHttp => "blackbox_http_2xx",
        }
    }
}

/// One phase of one round.
#[derive(Clone, Copy, Debug)]
struct Measurement {
    /// Requests answered (connections, for the C loop).
    count: u64,
    cpu_seconds: f64,
    elapsed: Duration,
}

impl Measurement {
    fn cpu_us(&self) -> f64 {
        self.cpu_seconds / self.count as f64 * 1e6
    }

    fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// The rows measured in one round, with the floor as the sum of its two parts.
#[derive(Default)]
struct Round {
    rows: Vec<(Row, Measurement)>,
}

impl Round {
    fn get(&self, row: Row) -> Option<&Measurement> {
        self.rows.iter().find(|(r, _)| *r == row).map(|(_, m)| m)
    }

    /// CPU µs per request of `row` (the floor: the sum of its parts).
    fn cpu_us(&self, row: Row) -> Option<f64> {
        match row {
            Row::Floor => {
                Some(self.get(Row::ConnectClose)?.cpu_us() + self.get(Row::NginxRequest)?.cpu_us())
            }
            _ => self.get(row).map(Measurement::cpu_us),
        }
    }

    fn ratio(&self, row: Row) -> Option<f64> {
        Some(self.cpu_us(row)? / self.cpu_us(Row::Floor)?)
    }
}

/// (median, min, max); the median of an even count is the mean of the middle two.
fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}

/// A server under load: its process and its address.
struct Server<'a> {
    name: &'static str,
    process: &'a mut Process,
    addr: SocketAddr,
}

/// Loads `server` with `target` from `connections` keep-alive connections: `warmup`
/// unmeasured, then `duration` measured (under `perf record` when `perf` is given).
fn measure_server(
    server: &mut Server<'_>,
    target: &Target,
    args: &Args,
    ticks: f64,
    perf: Option<&Path>,
) -> Result<Measurement, String> {
    let pid = server.process.pid();
    let mut generator = LoadGenerator::connect(server.addr, args.connections)
        .map_err(|e| format!("{}: {e}", server.name))?;
    let fail = |tally: &load::Tally, server: &mut Server<'_>| -> Result<(), String> {
        server.process.check_running()?;
        if tally.failures > 0 {
            return Err(format!(
                "{}: {} of {} requests failed; the first: {}",
                server.name,
                tally.failures,
                tally.requests,
                tally.first_failure.as_deref().unwrap_or("?")
            ));
        }
        Ok(())
    };
    let warm = generator.run(target, args.warmup.0);
    fail(&warm, server)?;
    let recorder = perf.map(|path| PerfRecord::start(pid, path)).transpose()?;
    let cpu0 = cpu_seconds(pid, ticks)?;
    let tally = generator.run(target, args.duration.0);
    let cpu1 = cpu_seconds(pid, ticks)?;
    if let Some(recorder) = recorder {
        recorder.stop();
    }
    fail(&tally, server)?;
    Ok(Measurement {
        count: tally.requests,
        cpu_seconds: cpu1 - cpu0,
        elapsed: tally.elapsed,
    })
}

/// Starts `bin` with `flags` and `--web.listen-address` on a free loopback port, and
/// waits until `health` answers there. Returns the process and the port.
fn start_server(
    dir: &Path,
    name: &str,
    bin: &Path,
    flags: &[String],
    health: &str,
) -> Result<(Process, u16), String> {
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(flags)
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let mut process = Process::start(name, cmd, dir);
    wait_for(
        &format!("{name} {health}"),
        Duration::from_secs(60),
        &mut [&mut process],
        || http_get_ok(&format!("http://127.0.0.1:{port}{health}")).map(drop),
    )?;
    Ok((process, port))
}

fn find_blackbox(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("prometheus-blackbox-exporter"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "prometheus-blackbox-exporter not found; install the Debian package prometheus-blackbox-exporter (or pass --blackbox PATH, or --no-blackbox)".to_string()
        })
}

/// `/proc/loadavg`'s first three fields: how busy the machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

struct Report {
    command: String,
    label: String,
    args: String,
    rounds: Vec<Round>,
    load_before: String,
    load_after: String,
}

fn run(args: &Args) -> Result<Report, String> {
    if args.rounds == 0 || args.connections == 0 {
        return Err("--rounds and --connections must be at least 1".into());
    }
    let agent_bin = find_release_bin(args.agent.as_deref(), "sonde-agent")?;
    let blackbox_bin = if args.no_blackbox {
        None
    } else {
        Some(find_blackbox(args.blackbox.as_deref())?)
    };
    let ticks = clock_ticks_per_second();
    let load_before = load_average();
    let work = WorkDir::create("probe-bench", args.run.keep)?;
    let dir = work.path.clone();
    let connect_loop = floor::build(&dir)?;
    let (mut nginx, nginx_port) = start_nginx(&dir)?;
    let nginx_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, nginx_port));

    let agent_conf = dir.join("agent.yml");
    std::fs::write(&agent_conf, agent_config())
        .map_err(|e| format!("write {}: {e}", agent_conf.display()))?;
    let start_agent = |name: &str, bin: &Path| {
        let flags = [
            format!("--config.file={}", agent_conf.display()),
            format!(
                "--storage.path={}",
                dir.join(format!("{name}-data")).display()
            ),
        ];
        start_server(&dir, name, bin, &flags, "/-/ready")
    };
    let (mut agent, agent_port) = start_agent("sonde-agent", &agent_bin)?;
    let mut baseline = match &args.baseline {
        Some(bin) => Some(start_agent("sonde-agent-baseline", bin)?),
        None => None,
    };
    let mut blackbox = match &blackbox_bin {
        Some(bin) => {
            let conf = dir.join("blackbox.yml");
            std::fs::write(&conf, MODULES).map_err(|e| format!("write {}: {e}", conf.display()))?;
            let flags = [format!("--config.file={}", conf.display())];
            Some(start_server(
                &dir,
                "blackbox_exporter",
                bin,
                &flags,
                "/-/healthy",
            )?)
        }
        None => None,
    };

    let tcp_probe = Target {
        path: format!("/probe?target=127.0.0.1:{nginx_port}&module=tcp_connect"),
        expect: Expect::ProbeSuccess,
    };
    let http_probe = Target {
        path: format!(
            "/probe?target={}&module=http_2xx",
            urlencode(&format!("http://127.0.0.1:{nginx_port}/"))
        ),
        expect: Expect::ProbeSuccess,
    };
    let nginx_request = Target {
        path: "/".into(),
        expect: Expect::Ok,
    };
    eprintln!(
        "probe-bench: nginx :{nginx_port} (pid {}), sonde-agent :{agent_port} (pid {}){}; load average {load_before}",
        nginx.pid(),
        agent.pid(),
        blackbox
            .as_ref()
            .map(|(p, port)| format!(", blackbox_exporter :{port} (pid {})", p.pid()))
            .unwrap_or_default()
    );

    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let mut r = Round::default();
        let c = floor::run(
            &connect_loop,
            nginx_addr,
            args.warmup.0,
            args.duration.0,
            ticks,
        )?;
        r.rows.push((
            Row::ConnectClose,
            Measurement {
                count: c.count,
                cpu_seconds: c.cpu_seconds,
                elapsed: c.elapsed,
            },
        ));
        let mut server = Server {
            name: "nginx",
            process: &mut nginx,
            addr: nginx_addr,
        };
        r.rows.push((
            Row::NginxRequest,
            measure_server(&mut server, &nginx_request, args, ticks, None)?,
        ));
        let perf = args.perf.as_deref().filter(|_| round == 1);
        let mut servers = vec![(
            Server {
                name: "sonde-agent",
                process: &mut agent,
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, agent_port)),
            },
            [
                (Row::AgentTcp, &tcp_probe, perf),
                (Row::AgentHttp, &http_probe, None),
            ],
        )];
        if let Some((process, port)) = &mut baseline {
            let server = Server {
                name: "sonde-agent (baseline)",
                process,
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, *port)),
            };
            servers.push((
                server,
                [
                    (Row::BaselineTcp, &tcp_probe, None),
                    (Row::BaselineHttp, &http_probe, None),
                ],
            ));
        }
        if let Some((process, port)) = &mut blackbox {
            let server = Server {
                name: "blackbox_exporter",
                process,
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, *port)),
            };
            servers.push((
                server,
                [
                    (Row::BlackboxTcp, &tcp_probe, None),
                    (Row::BlackboxHttp, &http_probe, None),
                ],
            ));
        }
        for (server, rows) in &mut servers {
            for (row, target, perf) in rows {
                r.rows
                    .push((*row, measure_server(server, target, args, ticks, *perf)?));
            }
        }
        let mut line = format!("probe-bench: round {round}/{}:", args.rounds);
        for row in Row::ALL {
            if let (Some(us), Some(ratio)) = (r.cpu_us(row), r.ratio(row)) {
                let _ = write!(line, " {} {us:.1} µs ({ratio:.2}×);", row.key());
            }
        }
        eprintln!("{line}");
        rounds.push(r);
    }
    let load_after = load_average();
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        label: args.run.label.clone(),
        args: format!(
            "{} keep-alive connections, {} measured per phase after {} of warm-up, {} rounds",
            args.connections, args.duration, args.warmup, args.rounds
        ),
        rounds,
        load_before,
        load_after,
    })
}

impl Report {
    fn values(&self, row: Row, f: impl Fn(&Round, Row) -> Option<f64>) -> Vec<f64> {
        self.rounds.iter().filter_map(|r| f(r, row)).collect()
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "probe-bench {}: `{}`", self.label, self.command);
        let _ = writeln!(
            s,
            "{}; load average {} before, {} after\n",
            self.args, self.load_before, self.load_after
        );
        let _ = write!(
            s,
            "| | requests/s | CPU µs per request, median (min–max) | ÷ floor, median (min–max) |"
        );
        for i in 1..=self.rounds.len() {
            let _ = write!(s, " round {i}: µs (÷ floor) |");
        }
        let _ = write!(s, "\n|---|---:|---:|---:|");
        for _ in &self.rounds {
            let _ = write!(s, "---:|");
        }
        s.push('\n');
        let show = |v: Option<(f64, f64, f64)>, digits: usize, unit: &str| match v {
            Some((median, min, max)) => {
                format!("{median:.digits$}{unit} ({min:.digits$}–{max:.digits$})")
            }
            None => "—".into(),
        };
        for row in Row::ALL {
            let us = self.values(row, Round::cpu_us);
            if us.is_empty() {
                continue;
            }
            let rate = spread(&self.values(row, |r, row| r.get(row).map(Measurement::rate)));
            let ratios = self.values(row, Round::ratio);
            let _ = write!(
                s,
                "| {} | {} | {} | {} |",
                row.label(),
                rate.map_or("".into(), |(m, _, _)| format!("{m:.0}")),
                show(spread(&us), 1, ""),
                show(spread(&ratios), 2, "×"),
            );
            for r in &self.rounds {
                match (r.cpu_us(row), r.ratio(row)) {
                    (Some(us), Some(ratio)) => {
                        let _ = write!(s, " {us:.1} ({ratio:.2}×) |");
                    }
                    _ => s.push_str(" — |"),
                }
            }
            s.push('\n');
        }
        if let Some((median, _, max)) = spread(&self.values(Row::AgentTcp, Round::ratio)) {
            let _ = writeln!(
                s,
                "\nsonde-agent `/probe` tcp_connect: {median:.2}× the floor (worst round {max:.2}×); goal ≤ 1.5×: {}",
                if max <= 1.5 {
                    "met in every round"
                } else if median <= 1.5 {
                    "met in the median, not in every round"
                } else {
                    "not met"
                }
            );
        }
        for (row, name) in [
            (Row::BaselineTcp, "the baseline sonde-agent"),
            (Row::BlackboxTcp, "blackbox_exporter"),
        ] {
            if let Some((median, min, max)) = spread(&self.values(row, Round::ratio)) {
                let _ = writeln!(
                    s,
                    "{name} `/probe` tcp_connect: {median:.2}× the floor ({min:.2}–{max:.2})"
                );
            }
        }
        s
    }

    fn json(&self) -> serde_json::Value {
        let rounds: Vec<serde_json::Value> = self
            .rounds
            .iter()
            .map(|r| {
                let mut o = serde_json::Map::new();
                for row in Row::ALL {
                    if let Some(us) = r.cpu_us(row) {
                        o.insert(
                            row.key().into(),
                            serde_json::json!({
                                "cpu_us_per_request": us,
                                "ratio_to_floor": r.ratio(row),
                                "count": r.get(row).map(|m| m.count),
                                "cpu_seconds": r.get(row).map(|m| m.cpu_seconds),
                                "elapsed_seconds": r.get(row).map(|m| m.elapsed.as_secs_f64()),
                            }),
                        );
                    }
                }
                serde_json::Value::Object(o)
            })
            .collect();
        serde_json::json!({
            "label": self.label,
            "command": self.command,
            "settings": self.args,
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
            "rounds": rounds,
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => args
            .run
            .finish("probe-bench", &report.markdown(), &report.json(), &[]),
        Err(e) => {
            eprintln!("probe-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn the_floor_is_a_connection_plus_a_request() {
        let m = |count, cpu_seconds| Measurement {
            count,
            cpu_seconds,
            elapsed: Duration::from_secs(1),
        };
        let round = Round {
            rows: vec![
                (Row::ConnectClose, m(1000, 0.02)),
                (Row::NginxRequest, m(1000, 0.01)),
                (Row::AgentTcp, m(500, 0.03)),
            ],
        };
        assert!((round.cpu_us(Row::Floor).unwrap() - 30.0).abs() < 1e-9);
        assert!((round.ratio(Row::AgentTcp).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(round.ratio(Row::BlackboxTcp), None);
    }

    #[test]
    fn targets_are_percent_encoded() {
        assert_eq!(
            urlencode("http://127.0.0.1:80/"),
            "http%3A%2F%2F127.0.0.1%3A80%2F"
        );
    }
}
