//! Ground truth after a run: the coordinator's SQLite file, read once the coordinator stopped.
//! Every task the API acknowledged must be there, terminal, with exactly one counted result.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};

/// One task as the store has it.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub status: String,
    pub priority: u8,
    pub submitted_at: Option<DateTime<Utc>>,
    /// Start of the first attempt.
    pub started_at: Option<DateTime<Utc>>,
    /// Counted (non-stale) results.
    pub counted: u64,
    /// Attempts made (leases given): more than one when the task ran again.
    pub attempts: u64,
}

#[derive(Debug, Default)]
pub struct Truth {
    pub tasks: HashMap<String, TaskRow>,
    /// Acknowledged by the API but absent, not terminal, or without a counted result.
    pub lost: u64,
    /// Tasks with more than one counted result.
    pub recorded_twice: u64,
    pub failed: u64,
    /// Results kept but not counted: from an attempt whose lease had ended (its worker was
    /// taken for lost and the task given to another attempt).
    pub stale: u64,
    /// Results (counted or stale) stored at or after the `since` given to [`read`]: what the
    /// coordinator started then recorded, one row per (task, attempt).
    pub stored_since: u64,
    /// Counted results whose execution resumed from a checkpoint: the `steps` executor's
    /// result says where it resumed (`resumed_at` above 0).
    pub resumed: u64,
}

/// Reads the store file `db`; `since` is when the coordinator that ran last was started.
pub fn read(db: &Path, submitted: &HashSet<String>, since: DateTime<Utc>) -> anyhow::Result<Truth> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", db.display()))?;
    let mut counted: HashMap<String, u64> = HashMap::new();
    let mut q =
        conn.prepare("SELECT task_id, count(*) FROM results WHERE stale = 0 GROUP BY task_id")?;
    let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
    for row in rows {
        let (id, n) = row?;
        counted.insert(id, n);
    }
    let mut truth = Truth {
        stale: conn.query_row("SELECT count(*) FROM results WHERE stale = 1", [], |r| {
            r.get(0)
        })?,
        ..Truth::default()
    };
    truth.resumed = conn.query_row(
        "SELECT count(*) FROM results WHERE stale = 0 \
         AND json_extract(body, '$.result.resumed_at') > 0",
        [],
        |r| r.get(0),
    )?;
    let mut q = conn.prepare("SELECT recorded_at FROM results")?;
    for at in q.query_map([], |r| r.get::<_, String>(0))? {
        let at = at?;
        let at = DateTime::parse_from_rfc3339(&at)
            .with_context(|| format!("a result recorded at {at:?}, not an RFC 3339 time"))?;
        truth.stored_since += u64::from(at >= since);
    }
    // Schema 2: the spec in its own column, the changing part of the task in `doc`.
    let mut q = conn.prepare("SELECT id, status, spec, doc FROM tasks")?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    for row in rows {
        let (id, status, spec, doc) = row?;
        let spec: serde_json::Value = serde_json::from_str(&spec).unwrap_or_default();
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap_or_default();
        let time = |v: &serde_json::Value| {
            v.as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        let row = TaskRow {
            counted: counted.get(&id).copied().unwrap_or(0),
            status,
            priority: spec["priority"].as_u64().unwrap_or(5) as u8,
            submitted_at: time(&doc["submitted_at"]),
            started_at: time(&doc["attempts"][0]["started_at"]),
            attempts: doc["attempts"].as_array().map_or(0, |a| a.len() as u64),
        };
        truth.tasks.insert(id, row);
    }
    for id in submitted {
        match truth.tasks.get(id) {
            Some(t) if t.counted > 1 => truth.recorded_twice += 1,
            Some(t) if t.counted == 1 && (t.status == "completed" || t.status == "failed") => {
                truth.failed += u64::from(t.status == "failed");
            }
            _ => truth.lost += 1,
        }
    }
    Ok(truth)
}

impl Truth {
    /// Of `ids` (tasks whose result was acknowledged to its worker before a cut), those the
    /// store does not hold completed with one counted result from their one attempt, each with
    /// what it holds: a result lost in the cut sends its task to run again (its worker, told
    /// it was recorded, no longer has it), which the plain count of results does not show.
    pub fn unsettled(&self, ids: &HashSet<String>) -> Vec<String> {
        let mut out: Vec<String> = ids
            .iter()
            .filter_map(|id| match self.tasks.get(id) {
                None => Some(format!("{id} absent")),
                Some(t) if t.status == "completed" && t.counted == 1 && t.attempts == 1 => None,
                Some(t) => Some(format!(
                    "{id} {} with {} counted results after {} attempts",
                    t.status, t.counted, t.attempts
                )),
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store file with the two tables the truth reads, as the coordinator lays them out.
    fn store(
        dir: &Path,
        tasks: &[(&str, &str)],
        results: &[(&str, u32, bool)],
    ) -> std::path::PathBuf {
        let path = dir.join("tether.db");
        let c = Connection::open(&path).expect("create");
        c.execute_batch(
            "CREATE TABLE tasks (id TEXT PRIMARY KEY, status TEXT, spec TEXT, doc TEXT);
             CREATE TABLE results (task_id TEXT, attempt INTEGER, stale INTEGER, recorded_at TEXT, body TEXT);",
        )
        .expect("schema");
        for (id, status) in tasks {
            // A task run again has two attempts.
            let attempts = match *id {
                "again" => r#"{"attempts": [{}, {}]}"#,
                _ => r#"{"attempts": [{}]}"#,
            };
            c.execute(
                "INSERT INTO tasks VALUES (?1, ?2, '{\"priority\": 3}', ?3)",
                [id, status, &attempts],
            )
            .expect("task");
        }
        for (id, attempt, stale) in results {
            c.execute(
                "INSERT INTO results VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![
                    id,
                    attempt,
                    stale,
                    format!("2026-12-03T10:00:0{attempt}.5Z"),
                    // A second attempt resumed from its first's checkpoint at step 3.
                    format!(r#"{{"result": {{"resumed_at": {}}}}}"#, (attempt - 1) * 3)
                ],
            )
            .expect("result");
        }
        path
    }

    #[test]
    fn each_acknowledged_task_is_judged_from_the_file_lost_twice_failed_or_stale() {
        let dir = tempfile::tempdir().expect("dir");
        let db = store(
            dir.path(),
            &[
                ("done", "completed"),
                ("failed", "failed"),
                ("twice", "completed"),
                ("no-result", "completed"),
                ("running", "running"),
                ("only-stale", "completed"),
            ],
            &[
                ("done", 1, false),
                ("failed", 1, false),
                ("twice", 1, false),
                ("twice", 2, false),
                ("running", 1, false),
                ("only-stale", 1, true),
            ],
        );
        let acked = [
            "done",
            "failed",
            "twice",
            "no-result",
            "running",
            "only-stale",
            "absent",
        ];
        let acked = acked.iter().map(|s| s.to_string()).collect();
        // Attempt 2's result was stored at 10:00:02.5, after a coordinator started at 10:00:02.
        let since = "2026-12-03T10:00:02Z".parse().expect("time");
        let t = read(&db, &acked, since).expect("read");
        assert_eq!(t.stored_since, 1);
        // Only "twice"'s second attempt resumed; stale results are not counted.
        assert_eq!(t.resumed, 1);
        assert_eq!(t.recorded_twice, 1);
        assert_eq!(t.failed, 1);
        assert_eq!(t.stale, 1);
        // No result, not terminal, only a stale result, not in the file at all.
        assert_eq!(t.lost, 4);
        assert_eq!(t.tasks["done"].priority, 3);
    }

    /// Tasks acknowledged done before a cut: only one completed once, from its one attempt,
    /// is settled; one that ran again (its result lost in the cut) is not, though it holds
    /// one counted result.
    #[test]
    fn a_task_done_before_a_cut_must_hold_its_one_result_from_its_one_attempt() {
        let dir = tempfile::tempdir().expect("dir");
        let db = store(
            dir.path(),
            &[
                ("done", "completed"),
                ("again", "completed"),
                ("running", "running"),
            ],
            &[("done", 1, false), ("again", 2, false)],
        );
        let ids: HashSet<String> = ["done", "again", "running", "absent"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let since = "2026-12-03T10:00:00Z".parse().expect("time");
        let t = read(&db, &ids, since).expect("read");
        assert_eq!(
            t.unsettled(&ids),
            [
                "absent absent",
                "again completed with 1 counted results after 2 attempts",
                "running running with 0 counted results after 1 attempts",
            ]
        );
    }
}
