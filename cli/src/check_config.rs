//! `check-config FILE`, the same for both binaries: the file is loaded and validated
//! exactly as at start-up, and every problem found is printed, each with
//! file:line:column: errors (the file would be refused) and warnings (it loads, but
//! probably does not do what its author meant), on stderr. A file without errors gets
//! a one-line summary on stdout; one with errors a failing exit status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The subcommands both binaries accept.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Validate a config file; print every problem with file:line:column.
    CheckConfig { file: PathBuf },
}

/// What checking a file found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// What to say about a valid file ("agent edge-1, 2 aggregators, 0 local jobs");
    /// `None` when it has errors.
    pub summary: Option<String>,
    /// Each `FILE:LINE:COLUMN: message`.
    pub errors: Vec<String>,
    /// Each `FILE:LINE:COLUMN: warning: message`.
    pub warnings: Vec<String>,
}

/// Runs `check-config` on `file`: `check` reads and validates it.
pub fn run(file: &Path, check: impl FnOnce(&Path) -> Outcome) -> ExitCode {
    let outcome = check(file);
    let ok = report(
        file,
        &outcome,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes `outcome` the way `check-config` does; true when the file is valid.
pub fn report(file: &Path, outcome: &Outcome, out: &mut dyn Write, err: &mut dyn Write) -> bool {
    for e in &outcome.errors {
        let _ = writeln!(err, "{e}");
    }
    for w in &outcome.warnings {
        let _ = writeln!(err, "{w}");
    }
    let warnings = match outcome.warnings.len() {
        0 => String::new(),
        1 => ", 1 warning".to_string(),
        n => format!(", {n} warnings"),
    };
    match (&outcome.summary, outcome.errors.len()) {
        (Some(summary), 0) => {
            let _ = writeln!(out, "{}: OK ({summary}{warnings})", file.display());
            true
        }
        (_, n) => {
            let _ = writeln!(
                err,
                "{}: FAILED: {n} error{}{warnings}",
                file.display(),
                if n == 1 { "" } else { "s" }
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_printed_and_warnings_are_marked() {
        let outcome = Outcome {
            summary: None,
            errors: vec!["a.yml:3:10: first".into(), "a.yml:8:5: second".into()],
            warnings: vec!["a.yml:12:3: warning: odd".into()],
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(!report(Path::new("a.yml"), &outcome, &mut out, &mut err));
        let err = String::from_utf8(err).unwrap();
        assert_eq!(
            err,
            "a.yml:3:10: first\na.yml:8:5: second\na.yml:12:3: warning: odd\na.yml: FAILED: 2 errors, 1 warning\n"
        );
        assert!(out.is_empty());

        let outcome = Outcome {
            summary: Some("1 job".into()),
            errors: vec![],
            warnings: vec!["a.yml: warning: the file is empty".into()],
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(report(Path::new("a.yml"), &outcome, &mut out, &mut err));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a.yml: OK (1 job, 1 warning)\n"
        );
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "a.yml: warning: the file is empty\n"
        );
    }
}
