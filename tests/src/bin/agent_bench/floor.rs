//! The floor of the agent's HTTP probes, measured in the same run: a C program
//! (`http_exchange_loop.c`, compiled by the bench with gcc) doing, per target, what any
//! fresh-connection HTTP probe must (socket, connect, write a GET, read to the end,
//! close) against the same nginx and URLs, at the agent's probe rate, for the same
//! window; its whole-process CPU per exchange.

use sonde_tests::bench::{LoopRun, compile_c, run_loop};
use std::path::{Path, PathBuf};
use std::time::Duration;

const SOURCE: &str = include_str!("http_exchange_loop.c");

/// Compiles `http_exchange_loop.c` into `dir`. Returns the program.
pub fn build(dir: &Path) -> Result<PathBuf, String> {
    compile_c(dir, "http_exchange_loop.c", SOURCE, "http-exchange-loop")
}

/// What the floor's measured window did.
pub struct Floor {
    pub exchanges: u64,
    pub cpu_seconds: f64,
    pub window: f64,
}

impl Floor {
    pub fn cpu_per_exchange_us(&self) -> f64 {
        self.cpu_seconds / self.exchanges as f64 * 1e6
    }

    pub fn rate(&self) -> f64 {
        self.exchanges as f64 / self.window
    }
}

/// Runs `program` against nginx on `127.0.0.1:port` over `targets` URLs (`/?t=0` ..),
/// `rate` exchanges a second: `warmup`, then `window` measured.
pub fn run(
    program: &Path,
    port: u16,
    targets: usize,
    rate: f64,
    warmup: Duration,
    window: Duration,
    ticks: f64,
) -> Result<Floor, String> {
    let LoopRun {
        count,
        cpu_seconds,
        elapsed,
    } = run_loop(
        program,
        &[
            "127.0.0.1".to_string(),
            port.to_string(),
            targets.to_string(),
            rate.to_string(),
            warmup.as_secs_f64().to_string(),
            window.as_secs_f64().to_string(),
        ],
        ticks,
    )?;
    if count == 0 {
        return Err(format!(
            "the floor's loop made no exchange in {elapsed:?}; is the rate ({rate}/s) too low for the window?"
        ));
    }
    Ok(Floor {
        exchanges: count,
        cpu_seconds,
        window: elapsed.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonde_tests::TestDir;
    use sonde_tests::procfs::clock_ticks_per_second;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    /// A loopback HTTP server answering each request on a fresh connection and closing
    /// it: 200, or 500 for the request whose line contains `fail_on`. Stops with the
    /// flag, or after 60 s at most.
    fn server(fail_on: Option<&'static str>) -> (u16, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(60);
            while !stopped.load(Ordering::Relaxed) && Instant::now() < until {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                let mut request = Vec::new();
                let mut chunk = [0u8; 512];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let status = match fail_on {
                    Some(f) if line.lines().next().unwrap_or("").contains(f) => "500 Oops",
                    _ => "200 OK",
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                );
            }
        });
        (port, stop)
    }

    #[test]
    fn the_loop_runs_at_its_rate_over_the_targets_and_names_a_failed_one() {
        let dir = TestDir::new("agent-bench-floor");
        let program = build(dir.path()).unwrap();
        let ticks = clock_ticks_per_second();

        // 5 targets at 50/s: 0.1 s of warm-up, 0.6 s measured.
        let run_against = |fail_on| {
            let (port, stop) = server(fail_on);
            let result = run(
                &program,
                port,
                5,
                50.0,
                Duration::from_millis(100),
                Duration::from_millis(600),
                ticks,
            );
            stop.store(true, Ordering::Relaxed);
            (port, result)
        };

        let floor = run_against(None).1.unwrap();
        // 50/s for 0.6 s: the slots 0 .. 29 (30 itself falls on the window's end).
        assert!(
            (29..=30).contains(&floor.exchanges),
            "{} exchanges",
            floor.exchanges
        );
        assert!(
            (floor.rate() - 50.0).abs() < 5.0,
            "rate {} for 50/s",
            floor.rate()
        );

        let (port, result) = run_against(Some("/?t=3 "));
        let error = result.err().unwrap();
        assert!(
            error.contains(&format!(
                "GET http://127.0.0.1:{port}/?t=3: answer: not a 200"
            )),
            "{error}"
        );
    }
}
