//! The aggregator's durable state: one SQLite database (WAL) under `--storage.path`.
//!
//! It holds what must survive a restart or a SIGKILL: each agent's last committed
//! sequence number (so replays are recognised), the agents and jobs seen (so
//! missing-job detection goes on after a restart), and each remote-write endpoint's
//! queue (see `remote_write::queue`). A batch of results is committed in one
//! transaction together with the samples it adds to every queue, and acked only after.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use sonde_cli::storage_lock::{LockError, StorageLock};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

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

pub use sonde_hub::StoredAgent;

/// Schema revisions, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        labels TEXT NOT NULL,
        local_jobs TEXT NOT NULL,
        committed_seq INTEGER NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL
    );
    CREATE TABLE jobs (
        name TEXT PRIMARY KEY,
        expected_since_ms INTEGER NOT NULL
    );",
    crate::history::SCHEMA,
    crate::history::SCHEMA_BYTES,
];

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
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::NewerSchema {
                location: location(path.as_deref()),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
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

    /// The connection, for modules that keep their own tables here (remote write).
    pub fn conn(&self) -> MutexGuard<'_, Connection> {
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

    pub fn load_agents(&self) -> Result<Vec<StoredAgent>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, labels, local_jobs, committed_seq, first_seen_ms, last_seen_ms FROM agents")
            .map_err(|e| self.failed(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StoredAgent {
                    id: r.get(0)?,
                    labels: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
                    local_jobs: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
                    committed_seq: r.get::<_, i64>(3)? as u64,
                    first_seen_ms: r.get(4)?,
                    last_seen_ms: r.get(5)?,
                })
            })
            .map_err(|e| self.failed(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.failed(e))
    }

    pub fn load_jobs(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, expected_since_ms FROM jobs")
            .map_err(|e| self.failed(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.failed(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.failed(e))
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

/// Applies the hub's durable changes inside the caller's transaction.
pub fn apply_durable(
    tx: &Transaction<'_>,
    durable: &sonde_hub::state::Durable,
) -> rusqlite::Result<()> {
    for a in durable.agents.values() {
        save_agent(tx, a)?;
    }
    for id in &durable.forgotten {
        forget_agent(tx, id)?;
    }
    if !durable.jobs.is_empty() {
        save_jobs(tx, &durable.jobs)?;
    }
    crate::history::ApplyWrites::apply(&durable.history, tx)
}

/// Records an agent (on hello, and as its committed sequence advances).
pub fn save_agent(tx: &Transaction<'_>, agent: &StoredAgent) -> rusqlite::Result<()> {
    // Cached: every commit saves the agents whose sequence advanced.
    tx.prepare_cached(
        "INSERT INTO agents (id, labels, local_jobs, committed_seq, first_seen_ms, last_seen_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(id) DO UPDATE SET labels = ?2, local_jobs = ?3, committed_seq = ?4, last_seen_ms = ?6",
    )?
    .execute(params![
            agent.id,
            serde_json::to_string(&agent.labels).unwrap_or_default(),
            serde_json::to_string(&agent.local_jobs).unwrap_or_default(),
            agent.committed_seq as i64,
        agent.first_seen_ms,
        agent.last_seen_ms
    ])?;
    Ok(())
}

pub fn commit_seq(
    tx: &Transaction<'_>,
    agent: &str,
    seq: u64,
    last_seen_ms: i64,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE agents SET committed_seq = MAX(committed_seq, ?2), last_seen_ms = ?3 WHERE id = ?1",
        params![agent, seq as i64, last_seen_ms],
    )?;
    Ok(())
}

pub fn forget_agent(tx: &Transaction<'_>, agent: &str) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM agents WHERE id = ?1", params![agent])?;
    Ok(())
}

/// Replaces the set of expected jobs, keeping the first time each was expected.
pub fn save_jobs(tx: &Transaction<'_>, jobs: &[(String, i64)]) -> rusqlite::Result<()> {
    let existing: Vec<String> = {
        let mut stmt = tx.prepare("SELECT name FROM jobs")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for name in existing {
        if !jobs.iter().any(|(n, _)| *n == name) {
            tx.execute("DELETE FROM jobs WHERE name = ?1", params![name])?;
        }
    }
    for (name, since) in jobs {
        tx.execute(
            "INSERT INTO jobs (name, expected_since_ms) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
            params![name, since],
        )?;
    }
    Ok(())
}

/// The committed sequence of one agent, for checks.
pub fn committed_seq(conn: &Connection, agent: &str) -> rusqlite::Result<Option<u64>> {
    conn.query_row(
        "SELECT committed_seq FROM agents WHERE id = ?1",
        params![agent],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.map(|s| s as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_and_jobs_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("sonde-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let store = Store::open(&dir).unwrap();
            store
                .transaction(|tx| {
                    save_agent(
                        tx,
                        &StoredAgent {
                            id: "a".into(),
                            labels: [("region".to_string(), "eu".to_string())]
                                .into_iter()
                                .collect(),
                            local_jobs: vec!["l".into()],
                            committed_seq: 5,
                            first_seen_ms: 1,
                            last_seen_ms: 2,
                        },
                    )?;
                    commit_seq(tx, "a", 9, 3)?;
                    commit_seq(tx, "a", 7, 4)?;
                    save_jobs(tx, &[("web".into(), 10), ("dns".into(), 11)])
                })
                .unwrap();
            store
                .transaction(|tx| save_jobs(tx, &[("web".into(), 99)]))
                .unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let agents = store.load_agents().unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!(
            agents[0].committed_seq, 9,
            "the committed sequence never goes back"
        );
        assert_eq!(agents[0].labels["region"], "eu");
        assert_eq!(store.load_jobs().unwrap(), [("web".to_string(), 10)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

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
