//! The tables of the agents, the jobs and the history, as migrations applied in order at
//! open (the remote-write queue keeps its own, see `queue::schema`).

/// Schema revisions, applied in order; `PRAGMA user_version` records how many ran.
pub(crate) const MIGRATIONS: &[&str] = &[
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
    HISTORY,
    HISTORY_BYTES,
    MAINTENANCE,
];

/// The maintenance windows added through the API (`storage::maintenance`); a deleted
/// one keeps its row, with when it was deleted, for the uptime of its past.
const MAINTENANCE: &str = "
CREATE TABLE maintenance_windows (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    deleted_ms INTEGER
);
CREATE UNIQUE INDEX maintenance_windows_live ON maintenance_windows (name) WHERE deleted_ms IS NULL;
";

/// The history's tables: state changes and response-time buckets.
const HISTORY: &str = "
CREATE TABLE target_events (
    job TEXT NOT NULL,
    instance TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    agents INTEGER NOT NULL,
    succeeding INTEGER NOT NULL,
    views TEXT NOT NULL
);
CREATE INDEX target_events_target ON target_events (job, instance, ts_ms);
CREATE INDEX target_events_age ON target_events (ts_ms);
CREATE TABLE target_latency (
    job TEXT NOT NULL,
    instance TEXT NOT NULL,
    agent TEXT NOT NULL,
    width_ms INTEGER NOT NULL,
    bucket_ms INTEGER NOT NULL,
    probes INTEGER NOT NULL,
    successes INTEGER NOT NULL,
    duration_sum REAL NOT NULL,
    duration_max REAL NOT NULL,
    PRIMARY KEY (job, instance, agent, width_ms, bucket_ms)
) WITHOUT ROWID;
CREATE INDEX target_latency_age ON target_latency (bucket_ms);
";

/// The aggregator's starts and signs of life (its gaps, see `history::Gap`), and the
/// running total of what the history weighs. The fixed weights written here are
/// `EVENT_ROW_OVERHEAD`, `BUCKET_ROW_OVERHEAD` and `RUN_ROW_BYTES`, plus the text.
const HISTORY_BYTES: &str = "
CREATE TABLE aggregator_runs (
    started_ms INTEGER PRIMARY KEY,
    alive_ms INTEGER NOT NULL
);
CREATE TABLE history_bytes (
    part TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
);
INSERT INTO history_bytes (part, bytes) VALUES
    ('events', (SELECT COALESCE(SUM(2 * (octet_length(job) + octet_length(instance))
        + octet_length(state) + octet_length(views) + 64), 0) FROM target_events)),
    ('buckets', (SELECT COALESCE(SUM(2 * (octet_length(job) + octet_length(instance)
        + octet_length(agent)) + 80), 0) FROM target_latency)),
    ('runs', 0);
CREATE TRIGGER target_events_bytes_added AFTER INSERT ON target_events BEGIN
    UPDATE history_bytes SET bytes = bytes + 2 * (octet_length(NEW.job) + octet_length(NEW.instance))
        + octet_length(NEW.state) + octet_length(NEW.views) + 64 WHERE part = 'events';
END;
CREATE TRIGGER target_events_bytes_removed AFTER DELETE ON target_events BEGIN
    UPDATE history_bytes SET bytes = bytes - 2 * (octet_length(OLD.job) + octet_length(OLD.instance))
        - octet_length(OLD.state) - octet_length(OLD.views) - 64 WHERE part = 'events';
END;
CREATE TRIGGER target_latency_bytes_added AFTER INSERT ON target_latency BEGIN
    UPDATE history_bytes SET bytes = bytes + 2 * (octet_length(NEW.job) + octet_length(NEW.instance)
        + octet_length(NEW.agent)) + 80 WHERE part = 'buckets';
END;
CREATE TRIGGER target_latency_bytes_removed AFTER DELETE ON target_latency BEGIN
    UPDATE history_bytes SET bytes = bytes - 2 * (octet_length(OLD.job) + octet_length(OLD.instance)
        + octet_length(OLD.agent)) - 80 WHERE part = 'buckets';
END;
CREATE TRIGGER aggregator_runs_bytes_added AFTER INSERT ON aggregator_runs BEGIN
    UPDATE history_bytes SET bytes = bytes + 48 WHERE part = 'runs';
END;
CREATE TRIGGER aggregator_runs_bytes_removed AFTER DELETE ON aggregator_runs BEGIN
    UPDATE history_bytes SET bytes = bytes - 48 WHERE part = 'runs';
END;
";
