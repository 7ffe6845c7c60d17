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
