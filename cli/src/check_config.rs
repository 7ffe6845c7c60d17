//! `check-config FILE`, the same for both binaries: the file is loaded and validated
//! exactly as at start-up; a valid one gets a one-line summary on stdout, an invalid
//! one its problems (each with file:line:column) on stderr and a failing exit status.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The subcommands both binaries accept.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Validate a config file; print each problem with file:line:column.
    CheckConfig { file: PathBuf },
}

/// Runs `check-config` on `file`: `load` reads and validates it and returns what to
/// say about a valid one ("agent edge-1, 2 aggregators, 0 local jobs"), printed as
/// `FILE: OK (summary)`.
pub fn run<E: Display>(file: &Path, load: impl FnOnce(&Path) -> Result<String, E>) -> ExitCode {
    match load(file) {
        Ok(summary) => {
            println!("{}: OK ({summary})", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
