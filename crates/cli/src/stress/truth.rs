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
}

pub fn read(db: &Path, submitted: &HashSet<String>) -> anyhow::Result<Truth> {
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
