//! The agents and jobs the aggregator has seen, so that replays are recognised and
//! missing-job detection goes on after a restart.

use super::{Store, StoreError};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

pub use sonde_hub::StoredAgent;

impl Store {
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
    super::history::save(tx, &durable.history)
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
}
