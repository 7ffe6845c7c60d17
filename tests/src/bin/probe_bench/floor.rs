//! The first half of the floor: a C program looping `connect()` + `close()` to nginx,
//! compiled by the bench with gcc, and its whole-process CPU per connection.

use sonde_tests::bench::{LoopRun, compile_c, run_loop};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SOURCE: &str = include_str!("connect_loop.c");

/// Compiles `connect_loop.c` into `dir`. Returns the program.
pub fn build(dir: &Path) -> Result<PathBuf, String> {
    compile_c(dir, "connect_loop.c", SOURCE, "connect-loop")
}

/// Runs `program` against `addr`: a warm-up, then `duration` measured; `count` is the
/// connections made in it.
pub fn run(
    program: &Path,
    addr: SocketAddr,
    warmup: Duration,
    duration: Duration,
    ticks: f64,
) -> Result<LoopRun, String> {
    run_loop(
        program,
        &[
            addr.ip().to_string(),
            addr.port().to_string(),
            warmup.as_secs_f64().to_string(),
            duration.as_secs_f64().to_string(),
        ],
        ticks,
    )
}
