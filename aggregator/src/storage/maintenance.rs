//! The maintenance windows added through the API, so that they survive a restart.
//! A deleted window keeps its row (with when it was deleted) for as long as the history
//! is kept: its past occurrences stay out of the uptime of that time.

use super::{Store, StoreError};
use crate::maintenance::{Source, Window, WindowSpec};
use rusqlite::{OptionalExtension, params};

impl Store {
    /// Every API window kept, deleted ones included, oldest first. A row whose spec no
    /// longer reads (written by a later version) is skipped with a warning.
    pub fn load_maintenance(&self) -> Result<Vec<Window>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, spec, deleted_ms FROM maintenance_windows ORDER BY id")
            .map_err(|e| self.failed(e))?;
        let rows: Vec<(String, String, Option<i64>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.failed(e))?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, spec, deleted_ms)| {
                let window = serde_json::from_str::<WindowSpec>(&spec)
                    .map_err(|e| e.to_string())
                    .and_then(|s| s.check(Source::Api));
                match window {
                    Ok(w) => Some(Window { deleted_ms, ..w }),
                    Err(e) => {
                        tracing::warn!(window = %name, error = %e, "a stored maintenance window cannot be read; it is ignored");
                        None
                    }
                }
            })
            .collect())
    }

    /// Stores an API window; `false` when a live window of that name is stored already.
    pub fn add_maintenance(&self, window: &Window, now_ms: i64) -> Result<bool, StoreError> {
        let spec = serde_json::to_string(&window.spec()).unwrap_or_default();
        let conn = self.conn();
        let exists = conn
            .query_row(
                "SELECT 1 FROM maintenance_windows WHERE name = ?1 AND deleted_ms IS NULL",
                [&window.name],
                |_| Ok(()),
            )
            .optional()
            .map_err(|e| self.failed(e))?
            .is_some();
        if exists {
            return Ok(false);
        }
        conn.execute(
            "INSERT INTO maintenance_windows (name, spec, created_ms) VALUES (?1, ?2, ?3)",
            params![window.name, spec, now_ms],
        )
        .map_err(|e| self.failed(e))?;
        Ok(true)
    }

    /// Marks the live API window `name` deleted at `now_ms`, and forgets windows deleted
    /// before `forget_before_ms`; `false` when there was no such window.
    pub fn delete_maintenance(
        &self,
        name: &str,
        now_ms: i64,
        forget_before_ms: i64,
    ) -> Result<bool, StoreError> {
        let conn = self.conn();
        let changed = conn
            .execute(
                "UPDATE maintenance_windows SET deleted_ms = ?2 WHERE name = ?1 AND deleted_ms IS NULL",
                params![name, now_ms],
            )
            .map_err(|e| self.failed(e))?;
        conn.execute(
            "DELETE FROM maintenance_windows WHERE deleted_ms < ?1",
            [forget_before_ms],
        )
        .map_err(|e| self.failed(e))?;
        Ok(changed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(name: &str) -> Window {
        WindowSpec {
            name: name.into(),
            matchers: [("job".to_string(), "web".to_string())].into(),
            agents: Default::default(),
            start: "2026-12-24T22:00:00Z".into(),
            duration: "2h".parse().unwrap(),
            every: Some("1d".parse().unwrap()),
        }
        .check(Source::Api)
        .unwrap()
    }

    #[test]
    fn api_windows_are_kept_and_deleted_ones_remembered_until_forgotten() {
        let dir = std::env::temp_dir().join(format!("sonde-maint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        assert!(store.add_maintenance(&window("a"), 1_000).unwrap());
        assert!(!store.add_maintenance(&window("a"), 2_000).unwrap());
        assert!(store.add_maintenance(&window("b"), 2_000).unwrap());
        assert!(store.delete_maintenance("a", 5_000, 0).unwrap());
        assert!(!store.delete_maintenance("a", 6_000, 0).unwrap());
        // A new window may take a deleted one's name.
        assert!(store.add_maintenance(&window("a"), 7_000).unwrap());
        drop(store);
        let store = Store::open(&dir).unwrap();
        let kept = store.load_maintenance().unwrap();
        let names: Vec<(&str, Option<i64>)> = kept
            .iter()
            .map(|w| (w.name.as_str(), w.deleted_ms))
            .collect();
        assert_eq!(names, [("a", Some(5_000)), ("b", None), ("a", None)]);
        assert_eq!(kept[1], window("b"));
        store.delete_maintenance("b", 9_000, 6_000).unwrap();
        let names: Vec<(String, Option<i64>)> = store
            .load_maintenance()
            .unwrap()
            .into_iter()
            .map(|w| (w.name, w.deleted_ms))
            .collect();
        assert_eq!(names, [("b".into(), Some(9_000)), ("a".into(), None)]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
