//! One process per `--storage.path`. Two processes on one directory would each take the
//! other's rows for their own (an agent acking another's results, an aggregator sending,
//! deleting and garbage-collecting another's remote-write queue), so each binary locks
//! its directory before it opens any database in it, and a second one refuses to start.
//!
//! The lock is an advisory `flock` on a file in the directory, which also holds the PID
//! of the process that has it, for the second one's message. The kernel releases a
//! `flock` when the process ends, however it ends: a SIGKILLed or crashed process never
//! leaves a stale lock behind, and the PID left in the file is only ever read while the
//! lock is held by the process that wrote it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A storage directory held by this process until the value is dropped (or the process
/// ends).
#[derive(Debug)]
pub struct StorageLock {
    _file: File,
    path: PathBuf,
}

impl StorageLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why a storage directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "--storage.path {} is in use by {} (PID {}), which holds the lock on {}; stop that process first, or give this one its own --storage.path",
        dir.display(),
        holder.program.as_deref().unwrap_or("another process"),
        holder.pid.map_or("unknown".to_string(), |p| p.to_string()),
        lock.display()
    )]
    Held {
        dir: PathBuf,
        lock: PathBuf,
        holder: Holder,
    },
    #[error(
        "cannot lock --storage.path {} ({}): {source}; check that the directory exists and this user may write to it",
        dir.display(),
        lock.display()
    )]
    Io {
        dir: PathBuf,
        lock: PathBuf,
        source: std::io::Error,
    },
}

/// What the lock file says about the process that holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
    pub program: Option<String>,
}

impl Holder {
    /// The file's first line is the PID, its second the program's name; a process that
    /// has just taken the lock may not have written them yet.
    fn parse(text: &str) -> Self {
        let mut lines = text.lines();
        Self {
            pid: lines.next().and_then(|l| l.trim().parse().ok()),
            program: lines
                .next()
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from),
        }
    }
}

/// Locks `dir` through `dir/file_name` (created 0600 if absent), writing this process's
/// PID into it; fails at once, naming the holder, when another process has it.
pub fn lock(dir: &Path, file_name: &str) -> Result<StorageLock, LockError> {
    let path = dir.join(file_name);
    let io = |source| LockError::Io {
        dir: dir.to_path_buf(),
        lock: path.clone(),
        source,
    };
    let mut options = File::options();
    // Never truncated on open: the holder's PID is what the refused process reports.
    options.create(true).truncate(false).read(true).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                lock: path,
                holder: Holder::parse(&text),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| write!(file, "{}\n{program}\n", std::process::id()))
        .and_then(|()| file.flush())
        .map_err(io)?;
    Ok(StorageLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sonde-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = temp_dir("second");
        let first = lock(&dir, "x.lock").unwrap();
        let text = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(
            text.lines().next(),
            Some(std::process::id().to_string().as_str())
        );
        let err = lock(&dir, "x.lock").unwrap_err();
        let LockError::Held { holder, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(holder.pid, Some(std::process::id()));
        let message = err.to_string();
        assert!(message.contains(&dir.display().to_string()), "{message}");
        assert!(
            message.contains(&format!("PID {}", std::process::id())),
            "{message}"
        );
        drop(first);
        let again = lock(&dir, "x.lock").unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_holder_that_wrote_nothing_yet_is_reported_as_unknown() {
        assert_eq!(Holder::parse(""), Holder::default());
        assert_eq!(
            Holder::parse("42\nsonde-agent\n"),
            Holder {
                pid: Some(42),
                program: Some("sonde-agent".into())
            }
        );
        let err = LockError::Held {
            dir: "/d".into(),
            lock: "/d/x.lock".into(),
            holder: Holder::default(),
        };
        assert!(err.to_string().contains("another process (PID unknown)"));
    }
}
