//! The buffer on disk: `<storage.path>/agent.db`, SQLite in WAL mode, and the writer
//! thread that owns the write connection.
//!
//! # Layout
//!
//! - `queue(aggregator, seq, bytes, body)`: one row per result *per aggregator* it is
//!   for. The alternative, one row per result plus per-aggregator ack marks, would store
//!   a shared result once instead of once per aggregator; but only local jobs and checks
//!   that several aggregators assigned (an HA pair) are shared at all, and with a row per
//!   aggregator every ack and every drop is one range delete on one aggregator's rows,
//!   no row's life depends on another aggregator's progress, and each aggregator's row
//!   can carry that aggregator's own assignment generation.
//! - `aggregators(id, address, acked_seq)`: each aggregator's cursor, keyed by address so
//!   that reordering the config keeps it.
//! - `meta('last_seq')`: the highest sequence number ever written, so numbering
//!   continues above it after a restart even when every result was acked.
//! - `probe_counts(job, instance, total, failed)`: probes recorded per target, counted
//!   in the transaction that stores each result, so `sonde_agent_probes_total` survives
//!   restarts and equals what was kept.
//!
//! A body is a [`ProbeRecord`] in its own protobuf form ([`ProbeRecord::encode`]).

use super::{BufferError, Entry, LINGER, MAX_BATCH, Op, ROW_OVERHEAD, Row, Shared, Slot, lock};
use crate::record::ProbeRecord;
use rusqlite::Connection;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The database's file name under `--storage.path`.
pub const DB_FILE: &str = "agent.db";
/// Held locked (`flock`, with the holder's PID) while an agent uses the directory, so
/// two agents never share one buffer and ack each other's results.
pub(super) const LOCK_FILE: &str = "agent.lock";

pub(super) const SCHEMA_VERSION: i64 = 2;
const SCHEMA: &str = "
CREATE TABLE aggregators (
    id INTEGER PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    acked_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE queue (
    aggregator INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (aggregator, seq)
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Schema 2: probes recorded per target, counted in the transaction that stores each
/// result, so `sonde_agent_probes_total` survives restarts and equals what was kept.
const SCHEMA_2: &str = "
CREATE TABLE probe_counts (
    job TEXT NOT NULL,
    instance TEXT NOT NULL,
    total INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    PRIMARY KEY (job, instance)
);
";

/// What a row costs on disk beyond its body, roughly: its key again in the primary-key
/// index, the cell headers, and the free space left in pages (measured with
/// A repeated write error is logged at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The connections of a buffer, and what holds its directory.
pub(super) struct Opened {
    pub writer: Arc<Mutex<Connection>>,
    pub reader: Arc<Mutex<Connection>>,
    pub lock_file: Option<sonde_cli::storage_lock::StorageLock>,
    pub location: String,
}

/// Opens `<dir>/agent.db` (locking the directory, the files kept private), or an
/// in-memory database for `None`.
pub(super) fn open(dir: Option<&Path>) -> Result<Opened, BufferError> {
    let Some(dir) = dir else {
        let location = "the in-memory agent buffer".to_string();
        let conn = Connection::open_in_memory().map_err(|source| BufferError::Sqlite {
            path: location.clone(),
            source,
        })?;
        let conn = Arc::new(Mutex::new(conn));
        return Ok(Opened {
            writer: conn.clone(),
            reader: conn,
            lock_file: None,
            location,
        });
    };
    let location = dir.join(DB_FILE).display().to_string();
    std::fs::create_dir_all(dir).map_err(|source| BufferError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let lock = sonde_cli::storage_lock::lock(dir, LOCK_FILE)?;
    let sql = |source| BufferError::Sqlite {
        path: location.clone(),
        source,
    };
    let path = dir.join(DB_FILE);
    make_private(dir).map_err(|source| BufferError::Io {
        path: location.clone(),
        source,
    })?;
    let writer = Connection::open(&path).map_err(sql)?;
    configure(&writer, true).map_err(sql)?;
    let reader = Connection::open(&path).map_err(sql)?;
    configure(&reader, false).map_err(sql)?;
    Ok(Opened {
        writer: Arc::new(Mutex::new(writer)),
        reader: Arc::new(Mutex::new(reader)),
        lock_file: Some(lock),
        location,
    })
}

/// The database and its `-wal` and `-shm` files: what [`make_private`] keeps 0600.
pub(super) const DB_FILES: [&str; 3] = [DB_FILE, "agent.db-wal", "agent.db-shm"];

/// Creates the database file readable and writable by its owner only (0600), and
/// narrows an existing one (and its `-wal` and `-shm` files) that is wider: results
/// carry target names, labels and failure messages that are nobody else's business.
/// SQLite creates the `-wal` and `-shm` files with the database file's permissions, so
/// those follow.
fn make_private(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(DB_FILE))
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        for name in DB_FILES {
            let path = dir.join(name);
            let mode = match std::fs::metadata(&path) {
                Ok(m) => m.permissions().mode(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if mode & 0o077 != 0 {
                tracing::info!(file = %path.display(), mode = format!("{:o}", mode & 0o777), "narrowing the buffer file's permissions to 0600");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn configure(conn: &Connection, writer: bool) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    if writer {
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(journal_mode = %mode, "the agent buffer's file system does not support WAL; writes will be slower");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The WAL file is truncated back to this after a checkpoint.
        conn.pragma_update(None, "journal_size_limit", 16i64 << 20)?;
    }
    Ok(())
}

pub(super) struct Loaded {
    pub ids: Vec<i64>,
    pub slots: Vec<Slot>,
    pub last_seq: u64,
}

/// Creates or checks the schema and reads back each aggregator's cursor and index.
pub(super) fn load(
    conn: &mut Connection,
    aggregators: &[String],
    location: &str,
) -> Result<Loaded, BufferError> {
    let sql = |source| BufferError::Sqlite {
        path: location.to_string(),
        source,
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql)?;
    if version > SCHEMA_VERSION {
        return Err(BufferError::NewerSchema {
            path: location.to_string(),
            found: version,
        });
    }
    let tx = conn.transaction().map_err(sql)?;
    if version == 0 {
        tx.execute_batch(SCHEMA).map_err(sql)?;
    }
    if version < 2 {
        tx.execute_batch(SCHEMA_2).map_err(sql)?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql)?;
    }
    let mut ids = Vec::with_capacity(aggregators.len());
    let mut slots: Vec<Slot> = Vec::with_capacity(aggregators.len());
    for address in aggregators {
        tx.execute(
            "INSERT INTO aggregators (address) VALUES (?1) ON CONFLICT(address) DO NOTHING",
            [address],
        )
        .map_err(sql)?;
        let (id, acked): (i64, i64) = tx
            .query_row(
                "SELECT id, acked_seq FROM aggregators WHERE address = ?1",
                [address],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(sql)?;
        ids.push(id);
        slots.push(Slot {
            acked_seq: acked as u64,
            floor: acked as u64,
            ..Slot::default()
        });
    }
    // Results for an aggregator no longer configured would never be acked and would
    // hold their space for good.
    let counts: Vec<(i64, String, i64)> = {
        let mut stmt = tx
            .prepare(
                "SELECT q.aggregator, a.address, COUNT(*) FROM queue q
                 JOIN aggregators a ON a.id = q.aggregator GROUP BY q.aggregator",
            )
            .map_err(sql)?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sql)?
            .collect::<Result<_, _>>()
            .map_err(sql)?
    };
    for (id, address, count) in counts {
        if !ids.contains(&id) {
            tracing::warn!(
                buffer = %location, aggregator = %address, results = count,
                "dropping buffered results for an aggregator that is no longer configured"
            );
            tx.execute("DELETE FROM queue WHERE aggregator = ?1", [id])
                .map_err(sql)?;
        }
    }
    tx.execute(
        "DELETE FROM queue WHERE seq <= (SELECT acked_seq FROM aggregators a WHERE a.id = queue.aggregator)",
        [],
    )
    .map_err(sql)?;
    {
        let mut stmt = tx
            .prepare("SELECT aggregator, seq, bytes FROM queue ORDER BY aggregator, seq")
            .map_err(sql)?;
        let mut rows = stmt.query([]).map_err(sql)?;
        while let Some(row) = rows.next().map_err(sql)? {
            let id: i64 = row.get(0).map_err(sql)?;
            let Some(slot) = ids.iter().position(|&i| i == id) else {
                continue;
            };
            let seq = row.get::<_, i64>(1).map_err(sql)? as u64;
            let bytes = row.get::<_, i64>(2).map_err(sql)?.clamp(0, u32::MAX.into()) as u32;
            let s = &mut slots[slot];
            s.index.push_back(Entry { seq, bytes });
            s.bytes += u64::from(bytes);
        }
    }
    let last_seq: i64 = tx
        .query_row(
            "SELECT MAX(COALESCE((SELECT value FROM meta WHERE key = 'last_seq'), 0),
                        COALESCE((SELECT MAX(seq) FROM queue), 0))",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    tx.commit().map_err(sql)?;
    Ok(Loaded {
        ids,
        slots,
        last_seq: last_seq.max(0) as u64,
    })
}

pub(super) fn row_bytes(body: &[u8]) -> u32 {
    (body.len() + ROW_OVERHEAD).min(u32::MAX as usize) as u32
}

pub(super) fn delete_cuts(
    conn: &mut Connection,
    ids: &[i64],
    cuts: &[(usize, u64)],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut delete =
            tx.prepare_cached("DELETE FROM queue WHERE aggregator = ?1 AND seq <= ?2")?;
        for &(slot, up_to) in cuts {
            delete.execute((ids[slot], up_to as i64))?;
        }
    }
    tx.commit()
}

struct Encoded {
    record: Arc<ProbeRecord>,
    rows: Vec<Row>,
}

/// Commits one batch of appends and deletes in one transaction.
fn write_batch(
    conn: &mut Connection,
    ids: &[i64],
    appends: &[Encoded],
    deletes: &[(usize, u64, bool)],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO queue (aggregator, seq, bytes, body) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut count = tx.prepare_cached(
            "INSERT INTO probe_counts (job, instance, total, failed) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT(job, instance) DO UPDATE SET total = total + 1, failed = failed + excluded.failed",
        )?;
        let mut last_seq = None;
        for a in appends {
            for row in &a.rows {
                let bytes = i64::from(row_bytes(&row.body));
                insert.execute((ids[row.slot], a.record.seq as i64, bytes, &row.body[..]))?;
            }
            count.execute((
                &a.record.job,
                &a.record.instance,
                i64::from(!a.record.success),
            ))?;
            last_seq = Some(a.record.seq);
        }
        if let Some(seq) = last_seq {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('last_seq', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                [seq as i64],
            )?;
        }
        let mut delete =
            tx.prepare_cached("DELETE FROM queue WHERE aggregator = ?1 AND seq <= ?2")?;
        let mut cursor = tx.prepare_cached(
            "UPDATE aggregators SET acked_seq = MAX(acked_seq, ?2) WHERE id = ?1",
        )?;
        for &(slot, up_to, acked) in deletes {
            delete.execute((ids[slot], up_to as i64))?;
            if acked {
                cursor.execute((ids[slot], up_to as i64))?;
            }
        }
    }
    tx.commit()
}

/// The writer thread: runs until the buffer is closed. It sleeps until the first
/// operation of an idle spell arrives, lingers [`LINGER`] for more (unless a flush or a
/// close hurries it, or a full batch is already waiting), and commits everything that
/// came in one transaction; then the uplinks of the aggregators that got results are
/// woken, once.
pub(super) fn run_writer(
    conn: Arc<Mutex<Connection>>,
    rx: Receiver<Op>,
    shared: Arc<Shared>,
    location: String,
) {
    let mut errors = Throttle::default();
    let mut ops = Vec::new();
    while let Ok(first) = rx.recv() {
        ops.push(first);
        take_queued(&rx, &mut ops);
        // A backlog (a full batch waiting) or a flush is committed at once.
        if ops.len() < MAX_BATCH && !ops.iter().any(|op| matches!(op, Op::Flush(_))) {
            linger(&shared, Instant::now() + LINGER);
            shared.urgent.store(false, Ordering::Release);
            take_queued(&rx, &mut ops);
        } else {
            shared.urgent.store(false, Ordering::Release);
        }
        let mut appends = Vec::new();
        let mut deletes = Vec::new();
        let mut flushes = Vec::new();
        for op in ops.drain(..) {
            match op {
                Op::Append { record, route } => {
                    // Encoded here rather than by the probing task, to keep that cheap.
                    let rows = route.rows(&record, shared.ids.len());
                    appends.push(Encoded { record, rows });
                }
                Op::Delete { slot, up_to, acked } => deletes.push((slot, up_to, acked)),
                Op::Flush(reply) => flushes.push(reply),
            }
        }
        let written = write_batch(&mut lock(&conn), &shared.ids, &appends, &deletes);
        let n = shared.ids.len();
        let mut touched = vec![false; n];
        match written {
            Ok(()) => {
                let cuts = {
                    let mut state = shared.lock();
                    if !appends.is_empty() || !deletes.is_empty() {
                        state.failing = None;
                    }
                    let mut newest = 0;
                    for a in &appends {
                        for row in &a.rows {
                            let bytes = row_bytes(&row.body);
                            state.slots[row.slot].append(&row.record, bytes, shared.cache_bytes);
                            state.bytes += u64::from(bytes);
                            touched[row.slot] = true;
                        }
                        newest = newest.max(a.record.seq);
                    }
                    state.enforce(shared.max_bytes, newest)
                };
                if !cuts.is_empty()
                    && let Err(e) = delete_cuts(&mut lock(&conn), &shared.ids, &cuts)
                {
                    // They stay on disk until the next delete of that aggregator's rows,
                    // which covers them; the bound is kept in memory meanwhile.
                    errors.log(&location, &e, "cannot delete dropped results");
                }
            }
            Err(e) => {
                let lost = {
                    let mut state = shared.lock();
                    state.write_errors += 1;
                    state.failing = Some(e.to_string());
                    let mut lost = 0;
                    for a in &appends {
                        for row in &a.rows {
                            state.slots[row.slot].dropped += 1;
                            lost += 1;
                        }
                    }
                    lost
                };
                errors.log(
                    &location,
                    &e,
                    &format!(
                        "cannot write to the buffer, {lost} results dropped; check free space and permissions under --storage.path"
                    ),
                );
            }
        }
        for (slot, touched) in touched.into_iter().enumerate() {
            if touched {
                shared.committed[slot].notify_waiters();
            }
        }
        for reply in flushes {
            let _ = reply.send(());
        }
    }
}

/// Moves what is queued into `ops`, up to [`MAX_BATCH`] operations.
fn take_queued(rx: &Receiver<Op>, ops: &mut Vec<Op>) {
    while ops.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(op) => ops.push(op),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
        }
    }
}

/// Parks the writer until `until`, or until a flush or a close sets `urgent`. While it
/// is parked, and not waiting on the channel, a producer's push wakes nobody.
fn linger(shared: &Shared, until: Instant) {
    while !shared.urgent.load(Ordering::Acquire) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::park_timeout(until - now);
    }
}

#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    fn log(&mut self, location: &str, error: &rusqlite::Error, what: &str) {
        if self.last.is_some_and(|t| t.elapsed() < ERROR_LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        tracing::error!(buffer = %location, error = %error, similar_errors_not_logged = self.suppressed, "{what}");
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}
