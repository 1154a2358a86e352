//! Ground truth after a run: the coordinator's SQLite file, read once the coordinator stopped.
//! Every task the API acknowledged must be there, terminal, with exactly one counted result.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};

/// One task as the store has it.
#[derive(Debug, Clone, Default)]
pub struct TaskRow {
    pub status: String,
    pub priority: u8,
    pub submitted_at: Option<DateTime<Utc>>,
    /// Start of the first attempt.
    pub started_at: Option<DateTime<Utc>>,
    /// Counted (non-stale) results.
    pub counted: u64,
    /// Results kept stale: of an attempt whose lease had ended before it came.
    pub stale: u64,
    /// Attempts made (leases given): more than one when the task ran again.
    pub attempts: u64,
    /// Each attempt, in the store's order (by attempt number).
    pub runs: Vec<AttemptRow>,
    /// The ends its spec runs it again on (`retry_on`: `failed`, `timed_out`).
    pub retry_on: Vec<String>,
    /// The task its spec says it is the retry of (`retry_of`).
    pub retry_of: Option<String>,
    /// The task recorded as its retry (`retried_by`, in its doc).
    pub retried_by: Option<String>,
}

/// One attempt of a task as the store has it: its record in the task, and its result's word
/// on where it resumed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttemptRow {
    pub attempt: u64,
    /// The worker the attempt was leased to.
    pub worker: String,
    /// When the coordinator leased it (the task left the queue for this attempt).
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// How it ended, as the coordinator recorded it: an outcome, `lost`, `stopped`, ...
    pub end: Option<String>,
    /// A result of this attempt was recorded (counted or stale).
    pub result_recorded: bool,
    /// That result was kept stale (the attempt's lease had ended).
    pub stale_result: bool,
    /// That result's outcome (`completed`, `failed`, ...); `None` without a stored result.
    pub result_outcome: Option<String>,
    /// Where the attempt's stored result (counted or stale) says its execution resumed (0:
    /// from the start); `None` without a stored result.
    pub resumed_at: Option<u64>,
}

/// An attempt the coordinator listed as running on `worker`: around a crash, of a task it
/// then held a complete checkpoint of (acknowledged to the worker that wrote it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Checkpointed {
    pub task: String,
    pub attempt: u64,
    pub worker: String,
    /// The step of the newest checkpoint the run saw the coordinator hold of it, listed before
    /// the crash or after it (read from their bytes; a listing after the crash that names an
    /// older one than before does not lower it): the task must resume from it or a later one.
    /// `None`: no listed checkpoint's bytes could be read (superseded or removed first), and
    /// the task is judged only on resuming from some checkpoint.
    pub step: Option<u32>,
}

/// What [`Truth::crash_resumes`] found.
#[derive(Debug, Default, PartialEq)]
pub struct CrashResumes {
    /// Attempts running on a crashed worker at the crash, by the store.
    pub interrupted: u64,
    /// Of those, the ones owed a resume, each judged: listed with a checkpoint, or run long
    /// enough before the crash to have written one.
    pub judged: u64,
    /// Of the judged, those the run saw no checkpoint of listed (they had run long enough to
    /// write one): judged on resuming from any.
    pub unlisted: u64,
    /// Interrupted too soon after they started to have written a checkpoint, and none listed:
    /// they may start afresh, and are not judged.
    pub too_young: u64,
    /// Those judged that did not resume from the checkpoint owed, each with what the store
    /// holds.
    pub not_resumed: Vec<String>,
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
    /// When the coordinator recorded the last counted result: the end of the run's work.
    pub last_result_at: Option<DateTime<Utc>>,
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
    // Where each stored result (counted or stale) says its execution resumed, and whether it
    // was kept stale, by task and attempt.
    let mut resumed_at: HashMap<String, Vec<(u64, u64, bool, String)>> = HashMap::new();
    let mut q = conn.prepare(
        "SELECT task_id, attempt, \
         CAST(coalesce(json_extract(body, '$.result.resumed_at'), 0) AS INTEGER), stale, outcome \
         FROM results",
    )?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, u64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, bool>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    for row in rows {
        let (id, attempt, at, stale, outcome) = row?;
        let at = u64::try_from(at).unwrap_or(0);
        resumed_at
            .entry(id)
            .or_default()
            .push((attempt, at, stale, outcome));
    }
    let mut q = conn.prepare("SELECT recorded_at, stale FROM results")?;
    let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))?;
    for row in rows {
        let (at, stale) = row?;
        let at = DateTime::parse_from_rfc3339(&at)
            .with_context(|| format!("a result recorded at {at:?}, not an RFC 3339 time"))?
            .with_timezone(&Utc);
        truth.stored_since += u64::from(at >= since);
        if !stale {
            truth.last_result_at = truth.last_result_at.max(Some(at));
        }
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
        let results = resumed_at.remove(&id).unwrap_or_default();
        let stale = results.iter().filter(|r| r.2).count() as u64;
        let runs = doc["attempts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                let attempt = a["attempt"].as_u64().unwrap_or(0);
                let result = results.iter().find(|(n, ..)| *n == attempt);
                AttemptRow {
                    attempt,
                    worker: a["worker"].as_str().unwrap_or_default().to_owned(),
                    started_at: time(&a["started_at"]),
                    ended_at: time(&a["ended_at"]),
                    end: a["end"].as_str().map(str::to_owned),
                    result_recorded: a["result_recorded"].as_bool().unwrap_or(false),
                    stale_result: result.is_some_and(|r| r.2),
                    result_outcome: result.map(|r| r.3.clone()),
                    resumed_at: result.map(|r| r.1),
                }
            })
            .collect();
        let row = TaskRow {
            counted: counted.get(&id).copied().unwrap_or(0),
            stale,
            status,
            priority: spec["priority"].as_u64().unwrap_or(5) as u8,
            submitted_at: time(&doc["submitted_at"]),
            started_at: time(&doc["attempts"][0]["started_at"]),
            attempts: doc["attempts"].as_array().map_or(0, |a| a.len() as u64),
            runs,
            retry_on: spec["retry_on"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|on| on.as_str().map(str::to_owned))
                .collect(),
            retry_of: spec["retry_of"].as_str().map(str::to_owned),
            retried_by: doc["retried_by"].as_str().map(str::to_owned),
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

impl TaskRow {
    /// Whether the next attempt after `a` (of this task, `id`) that ran to a result resumed
    /// from at least `step` (any checkpoint when `None`): `None` if it did, else what it did.
    fn resumed_after(&self, id: &str, a: &AttemptRow, step: Option<u32>) -> Option<String> {
        let next = self
            .runs
            .iter()
            .filter(|n| n.attempt > a.attempt)
            .find_map(|n| n.resumed_at.map(|at| (n.attempt, at)));
        let held = u64::from(step.unwrap_or(1).max(1));
        let (attempt, worker) = (a.attempt, &a.worker);
        match next {
            Some((_, at)) if at >= held => None,
            Some((n, 0)) => Some(format!(
                "{id} attempt {n} started afresh after attempt {attempt} on crashed {worker}"
            )),
            Some((n, at)) => Some(format!(
                "{id} attempt {n} resumed at step {at}, before step {held} held at the crash of attempt {attempt} on crashed {worker}"
            )),
            None => Some(format!(
                "{id} {}: no attempt after attempt {attempt} on crashed {worker} ran to a result",
                self.status
            )),
        }
    }
}

/// One stored result row, as `tether e2e` holds it against what the API said.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub task: String,
    pub attempt: u64,
    pub stale: bool,
    /// The outcome it recorded (`completed`, `failed`, ...).
    pub outcome: String,
    /// The executor's payload (`body.result`), `null` when the body has none.
    pub result: serde_json::Value,
    /// When the coordinator recorded it (`None`: not a time the row could be read as).
    pub recorded_at: Option<DateTime<Utc>>,
}

/// Every result row of the store file `db`, by task and attempt.
pub fn results(db: &Path) -> anyhow::Result<Vec<ResultRow>> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", db.display()))?;
    let mut q = conn.prepare(
        "SELECT task_id, attempt, stale, outcome, body, recorded_at FROM results \
         ORDER BY task_id, attempt",
    )?;
    let rows = q.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, u64>(1)?,
            r.get::<_, bool>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (task, attempt, stale, outcome, body, recorded_at) = row?;
        let body: serde_json::Value = serde_json::from_str(&body).with_context(|| {
            format!("the stored result of {task} attempt {attempt} is not JSON")
        })?;
        out.push(ResultRow {
            task,
            attempt,
            stale,
            outcome,
            result: body["result"].clone(),
            recorded_at: DateTime::parse_from_rfc3339(&recorded_at)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        });
    }
    Ok(out)
}

impl Truth {
    /// Whether the tasks crashed workers were running resumed from a checkpoint. Interrupted:
    /// by the store, each attempt on a worker of `crashed` (the ids of the workers crashed at
    /// `crash_at`) that had started by the crash and was still running at it (no result
    /// recorded, not ended before it). Each is owed a resume, and judged, if the coordinator
    /// listed it with a checkpoint (`held`: the attempts it listed running before the crash or
    /// after it, the attempt still leased and its worker dead, each of a task it held a
    /// complete checkpoint of), or if it had started at least `owed_after` before the crash:
    /// long enough to have written one and had it taken. One interrupted sooner, with none
    /// listed, may start afresh ([`CrashResumes::too_young`]).
    ///
    /// The next of a judged task's attempts that ran to a result must say it resumed from the
    /// newest checkpoint listed (`resumed_at` at least its step, [`Checkpointed::step`]; a
    /// later one, recorded after the run looked, will do), or from any when none was listed or
    /// read; started afresh, or from an older checkpoint, it lost the work the newest kept (a
    /// failed fetch, a checkpoint dropped, an old one served).
    ///
    /// Counting every resumed result instead passed with one resume when several were owed
    /// (more than a task per worker, or fewer tasks than workers), and counted resumes that
    /// other causes (connections reset) brought about. Judging only the attempts listed with
    /// a checkpoint let a task whose checkpoints the coordinator never listed (dropped, or
    /// written between the two listings and requeued before the second) start afresh.
    pub fn crash_resumes(
        &self,
        held: &[Checkpointed],
        crashed: &HashSet<String>,
        crash_at: DateTime<Utc>,
        owed_after: std::time::Duration,
    ) -> CrashResumes {
        let mut out = CrashResumes::default();
        let owed_after = chrono::Duration::from_std(owed_after).unwrap_or(chrono::Duration::MAX);
        let listed: HashMap<(&str, u64, &str), &Checkpointed> = held
            .iter()
            .map(|h| ((h.task.as_str(), h.attempt, h.worker.as_str()), h))
            .collect();
        for h in held.iter().filter(|h| crashed.contains(&h.worker)) {
            if !self.tasks.contains_key(&h.task) {
                out.judged += 1;
                out.not_resumed.push(format!("{} absent", h.task));
            }
        }
        for (id, task) in &self.tasks {
            for a in &task.runs {
                let interrupted = crashed.contains(&a.worker)
                    && a.started_at.is_some_and(|s| s <= crash_at)
                    && !a.result_recorded
                    && a.ended_at.is_none_or(|e| e >= crash_at);
                if !interrupted {
                    continue;
                }
                out.interrupted += 1;
                let h = listed.get(&(id.as_str(), a.attempt, a.worker.as_str()));
                let ran_long = a
                    .started_at
                    .is_some_and(|s| crash_at.signed_duration_since(s) >= owed_after);
                if h.is_none() && !ran_long {
                    out.too_young += 1;
                    continue;
                }
                out.judged += 1;
                out.unlisted += u64::from(h.is_none());
                // Any checkpoint's step is at least 1: one unread or unlisted still asks for
                // a resume.
                let step = h.and_then(|h| h.step);
                out.not_resumed.extend(task.resumed_after(id, a, step));
            }
        }
        out.not_resumed.sort();
        out
    }

    /// The tasks of `ids` that ran more than once by the store (more than one attempt, or a
    /// result kept stale), each with the attempts another replaced: all but its last, and any
    /// whose result was kept stale. The store keeps a stale result apart and counts only the
    /// last attempt's, so the lost and recorded-twice verdicts never see them.
    pub fn ran_again<'a>(&'a self, ids: &HashSet<String>) -> Vec<(&'a str, Vec<&'a AttemptRow>)> {
        let mut out: Vec<(&str, Vec<&AttemptRow>)> = self
            .tasks
            .iter()
            .filter(|(id, t)| ids.contains(*id) && (t.attempts > 1 || t.stale > 0))
            .map(|(id, t)| {
                let last = t.runs.iter().map(|a| a.attempt).max();
                let replaced = t
                    .runs
                    .iter()
                    .filter(|a| Some(a.attempt) != last || a.stale_result)
                    .collect();
                (id.as_str(), replaced)
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// Attempts the coordinator leased to a drained worker after the run had the drain's
    /// answer (`drained`: each worker's, that moment), each said as `task attempt N on W, X ms
    /// after its drain`, in task order. Its stamps round down, so an attempt leased before
    /// the drain never reads as after it.
    pub fn started_after_drain(&self, drained: &HashMap<String, DateTime<Utc>>) -> Vec<String> {
        let mut out: Vec<String> = self
            .tasks
            .iter()
            .flat_map(|(id, t)| t.runs.iter().map(move |r| (id, r)))
            .filter_map(|(id, r)| {
                let at = *drained.get(&r.worker)?;
                let started = r.started_at.filter(|s| *s > at)?;
                Some(format!(
                    "{id} attempt {} on {}, {} ms after its drain",
                    r.attempt,
                    r.worker,
                    (started - at).num_milliseconds()
                ))
            })
            .collect();
        out.sort();
        out
    }

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

    /// Only an attempt leased to a drained worker after its drain's answer is named: one
    /// leased to it before, one leased to another worker after, and one of a worker never
    /// drained are not.
    #[test]
    fn an_attempt_leased_to_a_drained_worker_after_its_drain_is_named() {
        let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(1_800_000_000_000 + ms);
        let run = |attempt: u64, worker: &str, ms: i64| AttemptRow {
            attempt,
            worker: worker.into(),
            started_at: at(ms),
            ..AttemptRow::default()
        };
        let mut t = Truth::default();
        let task = |runs: Vec<AttemptRow>| TaskRow {
            runs,
            ..TaskRow::default()
        };
        t.tasks
            .insert("t-1".into(), task(vec![run(1, "w1", -5), run(2, "w2", 10)]));
        t.tasks.insert("t-2".into(), task(vec![run(1, "w3", 50)]));
        t.tasks.insert("t-3".into(), task(vec![run(1, "w1", 0)]));
        let drained: HashMap<String, DateTime<Utc>> =
            [("w1".to_owned(), at(0).expect("at"))].into();
        assert!(t.started_after_drain(&drained).is_empty());
        t.tasks.insert("t-4".into(), task(vec![run(1, "w1", 7)]));
        assert_eq!(
            t.started_after_drain(&drained),
            ["t-4 attempt 1 on w1, 7 ms after its drain"]
        );
    }

    /// A new store file at `path` with the two tables the truth reads, as the coordinator lays
    /// them out.
    fn with_tables(path: &Path) -> Connection {
        let c = Connection::open(path).expect("create");
        c.execute_batch(
            "CREATE TABLE tasks (id TEXT PRIMARY KEY, status TEXT, spec TEXT, doc TEXT);
             CREATE TABLE results (task_id TEXT, attempt INTEGER, stale INTEGER, recorded_at TEXT, body TEXT,
               outcome TEXT NOT NULL DEFAULT 'completed');",
        )
        .expect("schema");
        c
    }

    /// A store file with the two tables the truth reads, as the coordinator lays them out.
    fn store(
        dir: &Path,
        tasks: &[(&str, &str)],
        results: &[(&str, u32, bool)],
    ) -> std::path::PathBuf {
        let path = dir.join("tether.db");
        let c = with_tables(&path);
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
                "INSERT INTO results (task_id, attempt, stale, recorded_at, body) VALUES (?1, ?2, ?3, ?4, ?5)",
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

    #[test]
    fn the_last_result_is_the_latest_counted_one_recorded() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("last.db");
        let c = with_tables(&path);
        for (attempt, stale, at) in [
            (1, false, "2026-12-03T10:00:01.25Z"),
            (2, false, "2026-12-03T10:00:04.75Z"),
            // A stale result later: no task ended with it.
            (3, true, "2026-12-03T10:00:09Z"),
        ] {
            c.execute(
                "INSERT INTO results (task_id, attempt, stale, recorded_at, body) VALUES ('t', ?1, ?2, ?3, '{}')",
                rusqlite::params![attempt, stale, at],
            )
            .expect("result");
        }
        let t = read(&path, &HashSet::new(), DateTime::UNIX_EPOCH).expect("read");
        let last = "2026-12-03T10:00:04.75Z".parse().expect("time");
        assert_eq!(t.last_result_at, Some(last));
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

    #[test]
    fn every_result_row_is_read_with_its_stale_flag_outcome_and_payload() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("rows.db");
        let c = Connection::open(&path).expect("create");
        c.execute_batch(
            "CREATE TABLE results (task_id TEXT, attempt INTEGER, worker TEXT, outcome TEXT,
               stale INTEGER, body TEXT, recorded_at TEXT);
             INSERT INTO results VALUES ('b', 2, 'w1', 'completed', 0, '{\"result\": {\"steps\": 4}}', '');
             INSERT INTO results VALUES ('b', 1, 'w2', 'completed', 1, '{\"result\": {\"steps\": 3}}', '');
             INSERT INTO results VALUES ('a', 1, 'w2', 'failed', 0, '{}', '');",
        )
        .expect("rows");
        let rows = results(&path).expect("read");
        let seen: Vec<_> = rows
            .iter()
            .map(|r| (r.task.as_str(), r.attempt, r.stale, r.outcome.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", 1, false, "failed"),
                ("b", 1, true, "completed"),
                ("b", 2, false, "completed"),
            ]
        );
        assert_eq!(rows[2].result, serde_json::json!({"steps": 4}));
        assert!(rows[0].result.is_null());
    }

    /// A task run again is judged attempt by attempt (a requeued attempt may start where its
    /// first did not): each attempt is read with its own start and end, not only the first's.
    #[test]
    fn each_attempt_is_read_with_its_own_start_and_end() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("attempts.db");
        let c = with_tables(&path);
        let doc = serde_json::json!({
            "submitted_at": "2026-12-03T10:00:00Z",
            "attempts": [
                {"attempt": 1, "worker": "w-0", "started_at": "2026-12-03T10:00:01Z",
                 "ended_at": "2026-12-03T10:00:02Z", "end": "lost"},
                {"attempt": 2, "worker": "w-1", "started_at": "2026-12-03T10:00:05Z",
                 "ended_at": "2026-12-03T10:00:06Z", "end": "completed", "result_recorded": true},
            ],
        });
        c.execute(
            "INSERT INTO tasks VALUES ('t', 'completed', '{\"priority\": 9}', ?1)",
            [doc.to_string()],
        )
        .expect("task");
        let t = read(&path, &HashSet::new(), DateTime::UNIX_EPOCH).expect("read");
        let at = |s: &str| Some(s.parse::<DateTime<Utc>>().expect("time"));
        let row = &t.tasks["t"];
        assert_eq!(row.started_at, at("2026-12-03T10:00:01Z"));
        let runs: Vec<_> = row
            .runs
            .iter()
            .map(|a| (a.attempt, a.started_at, a.ended_at))
            .collect();
        assert_eq!(
            runs,
            [
                (1, at("2026-12-03T10:00:01Z"), at("2026-12-03T10:00:02Z")),
                (2, at("2026-12-03T10:00:05Z"), at("2026-12-03T10:00:06Z")),
            ]
        );
    }

    /// A task run twice is read from the file as such: its attempts, how each ended, and
    /// which result was kept stale; a task of one attempt, or one not asked about, is not.
    #[test]
    fn the_tasks_run_more_than_once_are_read_with_the_attempts_another_replaced() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("again.db");
        let c = with_tables(&path);
        let attempt = |n: u32, worker: &str, end: &str| {
            serde_json::json!({"attempt": n, "worker": worker, "end": end,
                "started_at": "2026-12-03T10:00:00Z", "ended_at": "2026-12-03T10:00:03Z"})
        };
        for (id, attempts) in [
            ("once", vec![attempt(1, "w-0", "completed")]),
            (
                "again",
                vec![attempt(1, "w-1", "lost"), attempt(2, "w-2", "completed")],
            ),
            (
                "unasked",
                vec![attempt(1, "w-1", "lost"), attempt(2, "w-2", "completed")],
            ),
        ] {
            let doc = serde_json::json!({ "attempts": attempts }).to_string();
            c.execute(
                "INSERT INTO tasks VALUES (?1, 'completed', '{}', ?2)",
                [id, &doc],
            )
            .expect("task");
        }
        for (id, attempt, stale) in [("once", 1, false), ("again", 1, true), ("again", 2, false)] {
            c.execute(
                "INSERT INTO results (task_id, attempt, stale, recorded_at, body) VALUES (?1, ?2, ?3, '2026-12-03T10:00:04Z', '{}')",
                rusqlite::params![id, attempt, stale],
            )
            .expect("result");
        }
        let ids: HashSet<String> = ["once", "again"].iter().map(|s| s.to_string()).collect();
        let t = read(&path, &ids, DateTime::UNIX_EPOCH).expect("read");
        assert_eq!((t.tasks["again"].stale, t.tasks["once"].stale), (1, 0));
        let again = t.ran_again(&ids);
        assert_eq!(again.len(), 1, "{again:?}");
        let (id, replaced) = &again[0];
        assert_eq!(*id, "again");
        let seen: Vec<_> = replaced
            .iter()
            .map(|a| {
                (
                    a.attempt,
                    a.worker.as_str(),
                    a.end.as_deref(),
                    a.stale_result,
                )
            })
            .collect();
        assert_eq!(seen, [(1, "w-1", Some("lost"), true)]);
    }

    /// A task's attempts in [`crash_store`]: (attempt, worker, ended at second, recorded).
    type Attempts<'a> = &'a [(u32, &'a str, u32, bool)];

    /// A store of tasks with their attempts (attempt, worker, ended at second of 10:00,
    /// result recorded) and results (task, attempt, where it resumed), as the coordinator
    /// lays them out. Every attempt started at 10:00:00, but those of "young", at 10:00:04.8.
    fn crash_store(
        dir: &Path,
        tasks: &[(&str, &str, Attempts)],
        results: &[(&str, u32, u64)],
    ) -> std::path::PathBuf {
        let path = dir.join("crash.db");
        let c = with_tables(&path);
        for (id, status, attempts) in tasks {
            let attempts: Vec<serde_json::Value> = attempts
                .iter()
                .map(|&(attempt, worker, ended, recorded)| {
                    serde_json::json!({
                        "attempt": attempt,
                        "worker": worker,
                        "started_at": match *id {
                            "young" => "2026-12-03T10:00:04.8Z",
                            _ => "2026-12-03T10:00:00Z",
                        },
                        "ended_at": format!("2026-12-03T10:00:{ended:02}Z"),
                        "result_recorded": recorded,
                    })
                })
                .collect();
            let doc = serde_json::json!({ "attempts": attempts }).to_string();
            c.execute(
                "INSERT INTO tasks VALUES (?1, ?2, '{}', ?3)",
                [id, status, &doc.as_str()],
            )
            .expect("task");
        }
        for (id, attempt, resumed_at) in results {
            c.execute(
                "INSERT INTO results (task_id, attempt, stale, recorded_at, body) VALUES (?1, ?2, 0, '2026-12-03T10:00:30Z', ?3)",
                rusqlite::params![
                    id,
                    attempt,
                    format!(r#"{{"result": {{"resumed_at": {resumed_at}}}}}"#)
                ],
            )
            .expect("result");
        }
        path
    }

    /// Workers w-0 and w-1 crashed at 10:00:05; each task of `held` was running (by the
    /// coordinator's list before the crash) on the worker of its attempt 1, with a checkpoint.
    /// An attempt interrupted without one listed is owed a resume if it had started at least
    /// [`LONG`] before the crash ([`NEVER`]: none is).
    fn crash_judged(held: &[&str], owed_after: std::time::Duration) -> CrashResumes {
        let dir = tempfile::tempdir().expect("dir");
        let ran = |worker, ended, recorded| [(1, worker, ended, recorded)];
        let db = crash_store(
            dir.path(),
            &[
                // Resumed at step 20 on another worker.
                (
                    "resumed",
                    "completed",
                    &[(1, "w-0", 6, false), (2, "w-5", 9, true)],
                ),
                // Started afresh on another worker: its checkpoint was not used.
                (
                    "afresh",
                    "completed",
                    &[(1, "w-1", 6, false), (2, "w-6", 9, true)],
                ),
                // Finished (its result recorded) before the crash: nothing to resume.
                ("finished", "completed", &ran("w-0", 4, true)),
                // On a worker not crashed.
                ("healthy", "completed", &ran("w-7", 9, true)),
                // Its attempt on w-1 had ended (lost) before the crash, and not by it.
                (
                    "ended",
                    "completed",
                    &[(1, "w-1", 3, false), (2, "w-0", 4, true)],
                ),
                // Lost again before a result, then resumed at step 40 by its third attempt.
                (
                    "twice",
                    "completed",
                    &[
                        (1, "w-0", 6, false),
                        (2, "w-8", 7, false),
                        (3, "w-9", 9, true),
                    ],
                ),
                // Never ran again.
                ("stuck", "queued", &ran("w-1", 6, false)),
                // Resumed on another worker, but at step 1 of the 20 its checkpoints reached.
                (
                    "older",
                    "completed",
                    &[(1, "w-0", 6, false), (2, "w-5", 9, true)],
                ),
                // The same, its checkpoint's step unread (its bytes gone before they were).
                (
                    "unread",
                    "completed",
                    &[(1, "w-0", 6, false), (2, "w-5", 9, true)],
                ),
                // Started 200 ms before the crash, and started afresh on another worker.
                (
                    "young",
                    "completed",
                    &[(1, "w-1", 6, false), (2, "w-6", 9, true)],
                ),
            ],
            &[
                ("resumed", 2, 20),
                ("afresh", 2, 0),
                ("finished", 1, 0),
                ("healthy", 1, 0),
                ("ended", 2, 0),
                ("twice", 3, 40),
                ("older", 2, 1),
                ("unread", 2, 1),
                ("young", 2, 0),
            ],
        );
        let t = read(
            &db,
            &HashSet::new(),
            "2026-12-03T10:00:00Z".parse().expect("time"),
        )
        .expect("read");
        let worker = |id: &str| match id {
            "healthy" => "w-7",
            "finished" | "resumed" | "twice" | "older" | "unread" => "w-0",
            _ => "w-1",
        };
        // The step of the latest checkpoint held: "resumed" came back at 20 from one recorded
        // after the run looked (at 18), "twice" at 40 through another attempt.
        let step = |id: &str| match id {
            "resumed" => Some(18),
            "twice" => Some(30),
            "older" => Some(20),
            "unread" => None,
            _ => Some(5),
        };
        let held: Vec<Checkpointed> = held
            .iter()
            .map(|id| Checkpointed {
                task: id.to_string(),
                attempt: 1,
                worker: worker(id).to_owned(),
                step: step(id),
            })
            .collect();
        let crashed = ["w-0", "w-1"].iter().map(|w| w.to_string()).collect();
        t.crash_resumes(
            &held,
            &crashed,
            "2026-12-03T10:00:05Z".parse().expect("time"),
            owed_after,
        )
    }

    /// How long an attempt must have run to be owed a resume without a checkpoint listed, in
    /// [`crash_judged`]: a step and a margin, as checkpoint_heavy has it.
    const LONG: std::time::Duration = std::time::Duration::from_millis(600);
    /// Longer than any attempt in [`crash_judged`] ran: only those listed are owed.
    const NEVER: std::time::Duration = std::time::Duration::from_secs(3_600);

    #[test]
    fn each_task_running_with_a_checkpoint_on_a_crashed_worker_must_resume_from_one() {
        let all = [
            "resumed", "afresh", "finished", "healthy", "ended", "twice", "stuck",
        ];
        let c = crash_judged(&all, NEVER);
        // One resume among several owed does not pass: each task is judged.
        assert_eq!(c.judged, 4, "{c:?}");
        assert_eq!(
            c.not_resumed,
            [
                "afresh attempt 2 started afresh after attempt 1 on crashed w-1",
                "stuck queued: no attempt after attempt 1 on crashed w-1 ran to a result",
            ]
        );
        // Those that resumed (the second one through a third attempt) are all it judges.
        let c = crash_judged(&["resumed", "twice", "healthy"], NEVER);
        assert_eq!((c.judged, c.not_resumed.len()), (2, 0), "{c:?}");
        // Resumes brought about by other causes count for nothing: with no task running on a
        // crashed worker at the crash listed, and none run long enough to be owed one, nothing
        // is judged (the verdict then fails).
        let c = crash_judged(&["finished", "healthy", "ended"], NEVER);
        assert_eq!((c.judged, c.not_resumed.len()), (0, 0), "{c:?}");
        // Interrupted by the store: each of the seven attempts on w-0 and w-1 running at
        // 10:00:05 ("finished" had its result, "ended" had ended, "healthy" is elsewhere).
        assert_eq!((c.interrupted, c.too_young), (7, 7), "{c:?}");
        // A task running on a crashed worker with no checkpoint listed ("afresh" here) may
        // start afresh only if it had not run long enough to write one: after 5 s it had, and
        // starting afresh fails. (This passed, judging "resumed" alone.)
        let c = crash_judged(&["resumed"], LONG);
        assert_eq!((c.judged, c.unlisted, c.too_young), (6, 5, 1), "{c:?}");
        assert_eq!(
            c.not_resumed,
            [
                "afresh attempt 2 started afresh after attempt 1 on crashed w-1",
                "stuck queued: no attempt after attempt 1 on crashed w-1 ran to a result",
            ]
        );
        // "young", 200 ms old at the crash, may: it is interrupted, and not judged.
        let c = crash_judged(&["resumed"], NEVER);
        assert_eq!((c.judged, c.not_resumed.len()), (1, 0), "{c:?}");
    }

    /// Every attempt the crash interrupted that ran long enough to checkpoint is judged,
    /// whether or not a listing named a checkpoint of it: the listings come before the crash
    /// and after it, and a task whose first checkpoint came between them and that was
    /// requeued before the second, or whose checkpoints the coordinator dropped, is in
    /// neither.
    #[test]
    fn every_interrupted_task_that_ran_long_enough_to_checkpoint_is_judged() {
        let c = crash_judged(&[], LONG);
        assert_eq!(c.interrupted, 7, "{c:?}");
        assert_eq!((c.judged, c.unlisted, c.too_young), (6, 6, 1), "{c:?}");
        assert_eq!(c.not_resumed.len(), 2, "{c:?}");
        // Listed young, it is owed: its checkpoint was held.
        let c = crash_judged(&["young"], LONG);
        assert_eq!((c.judged, c.too_young), (7, 0), "{c:?}");
        assert!(
            c.not_resumed
                .contains(&"young attempt 2 started afresh after attempt 1 on crashed w-1".into()),
            "{c:?}"
        );
    }

    /// A coordinator that kept serving an old checkpoint lost the steps after it: resuming
    /// from one before the latest held at the crash is not resuming from the latest.
    #[test]
    fn a_task_resumed_from_a_checkpoint_older_than_the_latest_held_did_not_resume() {
        let c = crash_judged(&["older"], NEVER);
        assert_eq!(c.judged, 1, "{c:?}");
        assert_eq!(
            c.not_resumed,
            [
                "older attempt 2 resumed at step 1, before step 20 held at the crash of attempt 1 on crashed w-0"
            ]
        );
        // A later one than the run saw held is fine ("resumed" at 20 of 18 held); one whose
        // step could not be read is judged on resuming at all.
        let c = crash_judged(&["resumed", "unread"], NEVER);
        assert_eq!((c.judged, c.not_resumed.len()), (2, 0), "{c:?}");
    }
}
