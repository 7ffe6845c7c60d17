//! The aggregator's durable state, and all the SQL it runs: one SQLite database (WAL)
//! under `--storage.path`.
//!
//! It holds what must survive a restart or a SIGKILL: each agent's last committed
//! sequence number (so replays are recognised), the agents and jobs seen (so
//! missing-job detection goes on after a restart), each target's history, and each
//! remote-write endpoint's queue. A batch of results is committed in one transaction
//! together with the samples it adds to every queue, and acked only after.
//!
//! - [`schema`]: the tables of the agents and the history, and their migrations;
//! - [`agents`]: the agents' and jobs' rows;
//! - [`history`]: the history's writes, queries and pruning, and [`HistoryReader`], the
//!   read-only side the web pages use ([`StoredHistory`]);
//! - [`maintenance`]: the maintenance windows added through the API;
//! - [`health`]: whether commits succeed, for `/-/ready` and the fleet service;
//! - `queue`: each remote-write endpoint's durable queue, split by role (see its docs).
//!
//! Nothing outside this module runs SQL; the hub's durable changes reach it as plain data
//! applied inside [`Store::transaction`].

pub mod agents;
pub mod health;
pub mod history;
mod history_reader;
mod history_size;
pub mod maintenance;
pub(crate) mod queue;
pub mod schema;

pub use agents::{
    StoredAgent, apply_durable, commit_seq, committed_seq, forget_agent, save_agent, save_jobs,
};
pub use history_reader::{HistoryReader, StoredHistory};
pub use history_size::HistoryBytes;

use rusqlite::{Connection, Transaction};
use sonde_cli::storage_lock::{LockError, StorageLock};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The open database, its connection shared behind a lock: transactions on it are
/// serialized, which the queue's rollback detection counts on.
pub struct Store {
    conn: Mutex<Connection>,
    pub path: Option<PathBuf>,
    /// `--storage.path` held by this process for as long as the store is open.
    _lock: Option<StorageLock>,
}

/// The lock file under `--storage.path` (see [`sonde_cli::storage_lock`]).
pub const LOCK_FILE: &str = "aggregator.lock";

/// Why the store cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create --storage.path {}: {source}", dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create {} (mode 0600): {source}", path.display())]
    CreateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make {} private: {source}", path.display())]
    MakePrivate {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds `--storage.path` (or it cannot be locked).
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error("cannot open {location}: {source}")]
    Open {
        location: String,
        source: rusqlite::Error,
    },
    #[error(
        "{location} was written by a newer sonde (schema {found}, this one knows {known}); upgrade sonde or move the file away"
    )]
    NewerSchema {
        location: String,
        found: i64,
        known: usize,
    },
    /// A statement or a commit failed (disk full, I/O error, a corrupt file).
    #[error("{location}: {source}")]
    Sqlite {
        location: String,
        source: rusqlite::Error,
    },
}

impl Store {
    /// Locks `dir` for this process, then opens (or creates) `dir/aggregator.db`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let lock = sonde_cli::storage_lock::lock(dir, LOCK_FILE)?;
        let path = dir.join("aggregator.db");
        private_file(&path)?;
        let conn = Connection::open(&path).map_err(|source| StoreError::Open {
            location: path.display().to_string(),
            source,
        })?;
        Self::init(conn, Some(path), Some(lock))
    }

    /// A throwaway store, for tests and benchmarks.
    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            location: location(None),
            source,
        })?;
        Self::init(conn, None, None)
    }

    fn init(
        conn: Connection,
        path: Option<PathBuf>,
        lock: Option<StorageLock>,
    ) -> Result<Self, StoreError> {
        let fail = |source| StoreError::Sqlite {
            location: location(path.as_deref()),
            source,
        };
        // WAL with synchronous=NORMAL: a commit survives the process being killed;
        // only a power loss can take the last transactions back.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(fail)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(fail)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(fail)?;
        // The bundled SQLite is built with STAT4, which prepares a statement again each
        // time a value bound in a range on an indexed column changes (the remote-write
        // shards' "blocks after this id" query, on every read). One plan per statement
        // serves these queries as well.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )
        .map_err(fail)?;
        // More statements than rusqlite's default 16 take turns on this connection (the
        // queue's alone has 16, plus one per shard); a statement pushed out of the cache
        // is parsed and planned again on its next use.
        conn.set_prepared_statement_cache_capacity(128);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(fail)?;
        if version > schema::MIGRATIONS.len() as i64 {
            return Err(StoreError::NewerSchema {
                location: location(path.as_deref()),
                found: version,
                known: schema::MIGRATIONS.len(),
            });
        }
        for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
            conn.execute_batch(sql).map_err(fail)?;
            conn.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(fail)?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
            path,
            _lock: lock,
        })
    }

    /// The connection, for the storage modules' own queries.
    pub(in crate::storage) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` in one transaction and commits it; nothing of it stays on error.
    pub fn transaction<R>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        let mut conn = self.conn();
        let run = |conn: &mut Connection| {
            let tx = conn.transaction()?;
            let r = f(&tx)?;
            tx.commit()?;
            Ok(r)
        };
        run(&mut conn).map_err(|source| self.failed(source))
    }

    /// `source` as this store's error, naming its file.
    pub fn failed(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            location: location(self.path.as_deref()),
            source,
        }
    }
}

/// Where a store lives, for messages.
fn location(path: Option<&Path>) -> String {
    path.map_or("in-memory store".to_string(), |p| p.display().to_string())
}

/// Creates `path` readable by its owner only, or tightens it if it exists: the store
/// holds the fleet's state and queued samples. SQLite gives its -wal and -shm files the
/// database's mode.
fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
        .map_err(|source| StoreError::CreateFile {
            path: path.to_path_buf(),
            source,
        })?;
    for side in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(side);
        if let Ok(meta) = std::fs::metadata(&p)
            && meta.permissions().mode() & 0o077 != 0
        {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| StoreError::MakePrivate {
                    path: PathBuf::from(&p),
                    source,
                },
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sonde-store-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("aggregator.db");
        std::fs::write(&db, b"").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(&dir).unwrap();
        store
            .transaction(|tx| save_jobs(tx, &[("web".into(), 1)]))
            .unwrap();
        for name in ["aggregator.db", "aggregator.db-wal", "aggregator.db-shm"] {
            let mode = std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_transaction_leaves_nothing() {
        let store = Store::in_memory().unwrap();
        let r = store.transaction(|tx| {
            save_jobs(tx, &[("web".into(), 1)])?;
            tx.execute("INSERT INTO nonexistent VALUES (1)", [])?;
            Ok(())
        });
        assert!(r.is_err());
        assert!(store.load_jobs().unwrap().is_empty());
    }
}
