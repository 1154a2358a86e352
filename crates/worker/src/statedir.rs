//! The worker's state directory (`--state-dir`): what survives a restart of the process.
//!
//! Layout:
//!
//! ```text
//! <state_dir>/
//!   lock           "<pid> <start time>" of the process that owns the directory
//!   worker.db      SQLite (WAL, synchronous=NORMAL): identity, outbox journal, seq high-water
//!                  mark, tasks running now, tasks lost with the previous process, checkpoints,
//!                  journaled entries set aside at a start because they did not decode
//!   tasks/<task>/  checkpoint directories of command tasks (owned by the executor)
//!   groups/<task>  the process group and mark of a running command task, for a worker that
//!                  starts after a crash (`executor::orphans`)
//! ```
//!
//! Every write is a committed transaction when the call returns: an outbox entry counts as
//! produced, and a task as running, only once it is on disk. With `synchronous=NORMAL` in WAL
//! mode a commit survives the death of the process (not of the machine), which is what a
//! restarted worker needs.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use tether_proto::msg::WorkerMsg;
use tether_proto::{Attempt, CheckpointId, Seq, TaskId, TaskRef, WorkerId};

use crate::executor::StoredCheckpoint;
use crate::outbox::{Class, Journal};

/// File name of the lock.
pub const LOCK_FILE: &str = "lock";
/// File name of the database.
pub const DB_FILE: &str = "worker.db";
/// Schema version written to `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY, class INTEGER NOT NULL, msg TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS running (task_id TEXT PRIMARY KEY, attempt INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lost (
    task_id TEXT NOT NULL, attempt INTEGER NOT NULL, PRIMARY KEY (task_id, attempt));
CREATE TABLE IF NOT EXISTS checkpoints (
    task_id TEXT PRIMARY KEY, checkpoint_id TEXT NOT NULL, attempt INTEGER NOT NULL,
    data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS discarded (
    seq INTEGER PRIMARY KEY, class INTEGER NOT NULL, msg TEXT NOT NULL, reason TEXT NOT NULL);
";

/// Why a state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir} is in use by process {pid} (lock file {dir}/{LOCK_FILE}); one worker per state directory"
    )]
    Locked { dir: PathBuf, pid: u32 },
    #[error("{path} is not a usable worker database ({detail}); move it away to start afresh")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path} has schema version {found}, newer than this worker's {SCHEMA_VERSION}; left untouched"
    )]
    Newer { path: PathBuf, found: i64 },
    #[error(
        "{dir} belongs to worker {recorded}, not {given}; use --id {recorded} or another --state-dir"
    )]
    Identity {
        dir: PathBuf,
        recorded: String,
        given: WorkerId,
    },
    #[error("{path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// What the previous process left, read once at open.
#[derive(Debug, Default)]
pub struct Restored {
    /// Outbox entries not acknowledged, in sequence order.
    pub entries: Vec<(Class, WorkerMsg)>,
    /// Highest sequence number ever handed out.
    pub last_seq: Seq,
    /// Attempts that were running when a previous process died (reported as `lost`).
    pub lost: Vec<TaskRef>,
    /// The latest checkpoint of each lost task (already uploaded by the process that wrote it).
    pub checkpoints: Vec<(TaskId, StoredCheckpoint)>,
}

/// An open, locked state directory.
pub struct StateDir {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
    _lock: LockFile,
}

impl std::fmt::Debug for StateDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDir")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl StateDir {
    /// Opens (creating if needed) and locks `dir` for `worker`, and reads what the previous
    /// process left. Tasks it recorded as running are moved to the lost set now.
    pub fn open(dir: &Path, worker: &WorkerId) -> Result<(Arc<Self>, Restored), StateDirError> {
        let made = match dir.exists() && !dir.is_dir() {
            true => Err(std::io::Error::other("it exists and is not a directory")),
            false => std::fs::create_dir_all(dir),
        };
        made.map_err(|source| StateDirError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let lock = LockFile::acquire(dir)?;
        let db_path = dir.join(DB_FILE);
        let mut conn = open_db(&db_path)?;
        let restored = {
            let db = |source| StateDirError::Db {
                path: db_path.clone(),
                source,
            };
            let tx = conn.transaction().map_err(db)?;
            check_identity(&tx, worker).map_err(|e| match e {
                IdentityError::Db(source) => db(source),
                IdentityError::Mismatch(recorded) => StateDirError::Identity {
                    dir: dir.to_owned(),
                    recorded,
                    given: worker.clone(),
                },
            })?;
            let restored = restore(&tx, &db_path)?;
            tx.commit().map_err(db)?;
            restored
        };
        if !restored.lost.is_empty() || !restored.entries.is_empty() {
            tracing::info!(
                dir = %dir.display(),
                lost = restored.lost.len(),
                outbox = restored.entries.len(),
                last_seq = restored.last_seq.0,
                "state restored from the previous process"
            );
        }
        let sd = Arc::new(Self {
            dir: dir.to_owned(),
            db_path,
            conn: Mutex::new(conn),
            _lock: lock,
        });
        Ok((sd, restored))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn db_err(&self, source: rusqlite::Error) -> StateDirError {
        StateDirError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    /// Records that `task` runs at `attempt` (before it is reported running).
    pub fn task_started(&self, task: &TaskId, attempt: Attempt) -> Result<(), StateDirError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO running (task_id, attempt) VALUES (?1, ?2)",
                params![task.as_str(), attempt.0],
            )
            .map(drop)
            .map_err(|e| self.db_err(e))
    }

    /// Records that `attempt` of `task` left the running set; its checkpoint is no longer
    /// needed here (the coordinator holds it for the next attempt).
    pub fn task_finished(&self, task: &TaskId, attempt: Attempt) -> Result<(), StateDirError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.db_err(e))?;
        tx.execute(
            "DELETE FROM running WHERE task_id = ?1 AND attempt = ?2",
            params![task.as_str(), attempt.0],
        )
        .and_then(|_| {
            tx.execute(
                "DELETE FROM checkpoints WHERE task_id = ?1 AND attempt <= ?2",
                params![task.as_str(), attempt.0],
            )
        })
        .and_then(|_| tx.commit())
        .map_err(|e| self.db_err(e))
    }

    /// Keeps `cp` as the latest checkpoint of `task`.
    pub fn store_checkpoint(
        &self,
        task: &TaskId,
        cp: &StoredCheckpoint,
    ) -> Result<(), StateDirError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO checkpoints (task_id, checkpoint_id, attempt, data)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    task.as_str(),
                    cp.id.as_str(),
                    cp.attempt.0,
                    cp.data.as_slice()
                ],
            )
            .map(drop)
            .map_err(|e| self.db_err(e))
    }

    /// The latest checkpoint stored for `task`.
    pub fn latest_checkpoint(
        &self,
        task: &TaskId,
    ) -> Result<Option<StoredCheckpoint>, StateDirError> {
        let conn = self.conn();
        read_checkpoint(&conn, task, &self.db_path)
    }

    /// The coordinator has been told about the lost tasks (a registration was acknowledged):
    /// forgets them and their checkpoints.
    pub fn forget_lost(&self) -> Result<(), StateDirError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.db_err(e))?;
        tx.execute_batch(
            "DELETE FROM checkpoints WHERE task_id IN (SELECT task_id FROM lost)
               AND task_id NOT IN (SELECT task_id FROM running);
             DELETE FROM lost;",
        )
        .and_then(|_| tx.commit())
        .map_err(|e| self.db_err(e))
    }

    fn write_journal(
        &self,
        put: Option<(Class, Seq, &WorkerMsg)>,
        removed: &[Seq],
    ) -> Result<(), String> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        for seq in removed {
            tx.execute("DELETE FROM outbox WHERE seq = ?1", params![seq.0 as i64])
                .map_err(|e| e.to_string())?;
        }
        if let Some((class, seq, msg)) = put {
            let json = serde_json::to_string(msg).map_err(|e| e.to_string())?;
            tx.execute(
                "INSERT OR REPLACE INTO outbox (seq, class, msg) VALUES (?1, ?2, ?3)",
                params![seq.0 as i64, class as i64, json],
            )
            .and_then(|_| {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('seq_high', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                    params![seq.0 as i64],
                )
            })
            .map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())
    }
}

impl Journal for StateDir {
    fn write(&self, put: Option<(Class, Seq, &WorkerMsg)>, removed: &[Seq]) {
        if let Err(error) = self.write_journal(put, removed) {
            // The entry stays in memory and is delivered; only its survival of a crash is lost.
            tracing::error!(dir = %self.dir.display(), %error, seq = put.map(|p| p.1.0), "outbox journal write failed");
        }
    }
}

fn open_db(path: &Path) -> Result<Connection, StateDirError> {
    let corrupt = |detail: String| StateDirError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    // SQLite would take an empty file for a new database and a directory for a disk error.
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(corrupt("it is a directory, not a file".into())),
        Ok(m) if m.len() == 0 => {
            return Err(corrupt(
                "the file is empty: every worker database holds at least its header".into(),
            ));
        }
        _ => {}
    }
    let conn = Connection::open(path).map_err(|e| corrupt(e.to_string()))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| corrupt(e.to_string()))?;
    if version > SCHEMA_VERSION {
        return Err(StateDirError::Newer {
            path: path.to_owned(),
            found: version,
        });
    }
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| corrupt(e.to_string()))?;
    if check != "ok" {
        return Err(corrupt(check));
    }
    conn.pragma_update(None, "journal_mode", "WAL")
        .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
        .and_then(|_| conn.busy_timeout(std::time::Duration::from_secs(5)))
        .and_then(|_| conn.execute_batch(SCHEMA))
        .and_then(|_| conn.pragma_update(None, "user_version", SCHEMA_VERSION))
        .map_err(|e| corrupt(e.to_string()))?;
    Ok(conn)
}

enum IdentityError {
    Db(rusqlite::Error),
    Mismatch(String),
}

fn check_identity(conn: &Connection, worker: &WorkerId) -> Result<(), IdentityError> {
    let recorded: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'worker_id'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(IdentityError::Db)?;
    match recorded {
        Some(r) if r == worker.as_str() => Ok(()),
        Some(r) => Err(IdentityError::Mismatch(r)),
        None => conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('worker_id', ?1)",
                params![worker.as_str()],
            )
            .map(drop)
            .map_err(IdentityError::Db),
    }
}

/// Reads the journal, turns the running set into the lost set and loads lost checkpoints.
fn restore(conn: &Connection, path: &Path) -> Result<Restored, StateDirError> {
    let db = |source| StateDirError::Db {
        path: path.to_owned(),
        source,
    };
    let corrupt = |detail: String| StateDirError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let (mut entries, mut salvaged, mut discarded) = (Vec::new(), Vec::new(), Vec::new());
    {
        let mut stmt = conn
            .prepare("SELECT seq, class, msg FROM outbox ORDER BY seq")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(db)?;
        for row in rows {
            let (seq, class, json) = row.map_err(db)?;
            match journaled(class, &json) {
                Journaled::Entry(class, msg) => entries.push((class, msg)),
                Journaled::Salvaged(class, msg, why) => {
                    tracing::error!(seq, %why, "a journaled result does not decode; it is sent as the failure of its attempt");
                    salvaged.push((seq, serde_json::to_string(&msg).unwrap_or_default()));
                    entries.push((class, msg));
                }
                Journaled::Discarded(why) => {
                    tracing::error!(seq, %why, "a journaled outbox entry does not decode; it is set aside (table discarded), not sent");
                    discarded.push((seq, why));
                }
            }
        }
    }
    // An entry the other end could not decode either would never be acknowledged: it is not
    // let stop the worker from starting (a worker of an earlier version journaled results and
    // states nested too deep; nothing produces them now).
    for (seq, json) in &salvaged {
        conn.execute(
            "UPDATE outbox SET msg = ?2 WHERE seq = ?1",
            params![seq, json],
        )
        .map_err(db)?;
    }
    for (seq, why) in &discarded {
        conn.execute(
            "INSERT OR REPLACE INTO discarded (seq, class, msg, reason)
             SELECT seq, class, msg, ?2 FROM outbox WHERE seq = ?1",
            params![seq, why],
        )
        .and_then(|_| conn.execute("DELETE FROM outbox WHERE seq = ?1", params![seq]))
        .map_err(db)?;
    }
    let seq_high: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'seq_high'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db)?;
    let journal_high = entries
        .iter()
        .filter_map(|(_, m)| m.seq())
        .map(|s| s.0)
        .max()
        .unwrap_or(0);
    let last_seq = Seq((seq_high.unwrap_or(0).max(0) as u64).max(journal_high));
    // Attempts whose result waits in the journal are finished, not lost.
    let finished: BTreeSet<(TaskId, Attempt)> = entries
        .iter()
        .filter_map(|(_, m)| match m {
            WorkerMsg::TaskResult(r) => Some((r.task_id.clone(), r.attempt)),
            _ => None,
        })
        .collect();
    conn.execute_batch(
        "INSERT OR IGNORE INTO lost (task_id, attempt) SELECT task_id, attempt FROM running;
         DELETE FROM running;",
    )
    .map_err(db)?;
    let mut lost = Vec::new();
    {
        let mut stmt = conn
            .prepare("SELECT task_id, attempt FROM lost ORDER BY task_id, attempt")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))
            .map_err(db)?;
        for row in rows {
            let (task, attempt) = row.map_err(db)?;
            let task =
                TaskId::parse(&task).map_err(|e| corrupt(format!("lost task id {task:?}: {e}")))?;
            if !finished.contains(&(task.clone(), Attempt(attempt))) {
                lost.push(TaskRef::new(task, Attempt(attempt)));
            }
        }
    }
    let mut checkpoints = Vec::new();
    for t in &lost {
        if let Some(cp) = read_checkpoint(conn, &t.task_id, path)? {
            checkpoints.push((t.task_id.clone(), cp));
        }
    }
    Ok(Restored {
        entries,
        last_seq,
        lost,
        checkpoints,
    })
}

/// What a journaled outbox entry is at a start.
enum Journaled {
    Entry(Class, WorkerMsg),
    /// A result that does not decode, made the failure of its attempt, with why.
    Salvaged(Class, WorkerMsg, String),
    /// Anything else that does not decode, with why.
    Discarded(String),
}

/// Reads a journaled outbox entry. One that does not decode is not sent as it is (the other
/// end would not decode it either, and never acknowledge it): a result becomes the failure of
/// its attempt, saying why, so that the attempt still ends with one result; anything else
/// (a state, a notice, telemetry) is set aside.
fn journaled(class: i64, json: &str) -> Journaled {
    let Some(class) = class_from(class) else {
        return Journaled::Discarded(format!("unknown class {class}"));
    };
    let error = match tether_proto::decode_worker(json) {
        Ok(msg) => return Journaled::Entry(class, msg),
        Err(e) => e.to_string(),
    };
    /// What a result is without its `result` and `error`, which are skipped unread (serde_json
    /// skips a value of any depth without recursion).
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        ty: String,
        seq: Seq,
        task_id: TaskId,
        attempt: Attempt,
        #[serde(with = "tether_proto::time")]
        started_at: chrono::DateTime<chrono::Utc>,
        #[serde(with = "tether_proto::time")]
        finished_at: chrono::DateTime<chrono::Utc>,
        duration_ms: u64,
    }
    match serde_json::from_str::<Head>(json) {
        Ok(h) if h.ty == "task_result" && class == Class::Result => {
            let msg = WorkerMsg::TaskResult(tether_proto::msg::TaskResult {
                seq: h.seq,
                task_id: h.task_id,
                attempt: h.attempt,
                outcome: tether_proto::Outcome::Failed,
                result: serde_json::json!({}),
                error: Some(tether_proto::task::TaskError {
                    message: format!("the result could not be sent ({error})"),
                    detail: None,
                }),
                started_at: h.started_at,
                finished_at: h.finished_at,
                duration_ms: h.duration_ms,
                timestamp: tether_proto::msg::now(),
            });
            Journaled::Salvaged(class, msg, error)
        }
        _ => Journaled::Discarded(error),
    }
}

fn read_checkpoint(
    conn: &Connection,
    task: &TaskId,
    path: &Path,
) -> Result<Option<StoredCheckpoint>, StateDirError> {
    let row = conn
        .query_row(
            "SELECT checkpoint_id, attempt, data FROM checkpoints WHERE task_id = ?1",
            params![task.as_str()],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            },
        )
        .optional()
        .map_err(|source| StateDirError::Db {
            path: path.to_owned(),
            source,
        })?;
    let Some((id, attempt, data)) = row else {
        return Ok(None);
    };
    let id = CheckpointId::parse(&id).map_err(|e| StateDirError::Corrupt {
        path: path.to_owned(),
        detail: format!("checkpoint id {id:?} of task {task}: {e}"),
    })?;
    Ok(Some(StoredCheckpoint {
        id,
        attempt: Attempt(attempt),
        data: Arc::new(data),
    }))
}

fn class_from(v: i64) -> Option<Class> {
    [Class::Result, Class::Notice, Class::State, Class::Telemetry]
        .into_iter()
        .find(|c| *c as i64 == v)
}

/// The lock: an exclusive `flock` on the lock file, which the kernel releases when the process
/// dies, so a lock is never stale and two processes can never both take it. The file holds
/// "<pid> <start time>" of the holder, for the error message; it is never removed (removing it
/// would let a second process lock a new file while the first still holds the old one).
#[derive(Debug)]
struct LockFile {
    _flock: nix::fcntl::Flock<std::fs::File>,
}

impl LockFile {
    fn acquire(dir: &Path) -> Result<Self, StateDirError> {
        use nix::fcntl::{Flock, FlockArg};
        let path = dir.join(LOCK_FILE);
        let io = |source| StateDirError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut flock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let held = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(StateDirError::Locked {
                    dir: dir.to_owned(),
                    pid: held_by(&held).unwrap_or(0),
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        let pid = std::process::id();
        let stamp = format!("{pid} {}", start_time(pid).unwrap_or_default());
        flock
            .set_len(0)
            .and_then(|_| flock.write_all(stamp.as_bytes()))
            .map_err(io)?;
        Ok(Self { _flock: flock })
    }
}

/// The pid recorded in a lock file.
fn held_by(content: &str) -> Option<u32> {
    content.split_whitespace().next()?.parse().ok()
}

/// Start time of a process (field 22 of `/proc/<pid>/stat`), to tell a reused pid apart.
pub(crate) fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after its closing paren are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::msg::{TaskResult, TaskState, now};

    fn wid(s: &str) -> WorkerId {
        WorkerId::parse(s).expect("id")
    }

    fn tid(s: &str) -> TaskId {
        TaskId::parse(s).expect("id")
    }

    fn result(seq: u64, task: &str) -> WorkerMsg {
        WorkerMsg::TaskResult(TaskResult {
            seq: Seq(seq),
            task_id: tid(task),
            attempt: Attempt(1),
            outcome: tether_proto::Outcome::Completed,
            result: serde_json::json!({"n": seq}),
            error: None,
            started_at: now(),
            finished_at: now(),
            duration_ms: 1,
            timestamp: now(),
        })
    }

    fn state(seq: u64, task: &str) -> WorkerMsg {
        WorkerMsg::TaskState(TaskState {
            seq: Seq(seq),
            task_id: tid(task),
            attempt: Attempt(1),
            state: serde_json::json!({"step": seq}).into(),
            timestamp: now(),
        })
    }

    #[test]
    fn the_journal_survives_a_reopen_and_seq_never_goes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r1 = result(1, "a");
        let s2 = state(2, "b");
        {
            let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("open");
            assert!(restored.entries.is_empty());
            assert_eq!(restored.last_seq, Seq(0));
            sd.write(Some((Class::Result, Seq(1), &r1)), &[]);
            sd.write(Some((Class::State, Seq(2), &s2)), &[]);
            sd.write(Some((Class::Result, Seq(3), &result(3, "c"))), &[]);
            sd.write(None, &[Seq(3)]);
        }
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(
            restored.entries,
            vec![(Class::Result, r1), (Class::State, s2)]
        );
        assert_eq!(restored.last_seq, Seq(3), "the acked seq 3 is still used");
    }

    #[test]
    fn tasks_running_at_a_crash_are_lost_with_their_checkpoints_unless_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
            sd.task_started(&tid("long"), Attempt(1)).expect("start");
            sd.task_started(&tid("done"), Attempt(1)).expect("start");
            sd.task_started(&tid("short"), Attempt(1)).expect("start");
            let cp = StoredCheckpoint {
                id: CheckpointId::random(),
                attempt: Attempt(1),
                data: Arc::new(b"5".to_vec()),
            };
            sd.store_checkpoint(&tid("long"), &cp).expect("checkpoint");
            sd.task_finished(&tid("short"), Attempt(1)).expect("finish");
            // "done" finished and its result was journaled, but the process died before the
            // finished hook ran.
            sd.write(Some((Class::Result, Seq(1), &result(1, "done"))), &[]);
        }
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.lost, vec![TaskRef::new(tid("long"), Attempt(1))]);
        assert_eq!(restored.checkpoints.len(), 1);
        assert_eq!(restored.checkpoints[0].1.data.as_slice(), b"5");
        drop(sd);
        // Not yet told to a coordinator: still lost on the next start.
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.lost.len(), 1);
        sd.forget_lost().expect("forget");
        assert!(sd.latest_checkpoint(&tid("long")).expect("read").is_none());
        drop(sd);
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert!(restored.lost.is_empty());
    }

    /// Entries that do not decode (a result and a state nested too deep, journaled by a
    /// worker that still sent them; a damaged row) do not stop the worker from starting: the
    /// result becomes its attempt's failure, in the journal too, and the rest is set aside.
    #[test]
    fn journaled_entries_that_do_not_decode_do_not_stop_a_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = |n: usize| (0..n).fold(serde_json::json!(1), |v, _| serde_json::json!([v]));
        let WorkerMsg::TaskResult(mut deep) = result(1, "a") else {
            unreachable!()
        };
        deep.result = nested(tether_proto::msg::MAX_RESULT_DEPTH + 1);
        let WorkerMsg::TaskState(mut deep_state) = state(2, "b") else {
            unreachable!()
        };
        deep_state.state = nested(tether_proto::msg::MAX_STATE_DEPTH + 1).into();
        let s4 = state(4, "c");
        {
            let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
            sd.write(
                Some((Class::Result, Seq(1), &WorkerMsg::TaskResult(deep.clone()))),
                &[],
            );
            sd.write(
                Some((Class::State, Seq(2), &WorkerMsg::TaskState(deep_state))),
                &[],
            );
            sd.write(Some((Class::State, Seq(4), &s4)), &[]);
            sd.conn()
                .execute(
                    "INSERT INTO outbox (seq, class, msg) VALUES (3, 1, '{\"type\":\"task_paused\"')",
                    [],
                )
                .expect("damaged row");
        }
        for _ in 0..2 {
            let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
            assert_eq!(restored.entries.len(), 2, "{:?}", restored.entries);
            let (class, WorkerMsg::TaskResult(r)) = &restored.entries[0] else {
                panic!("{:?}", restored.entries[0]);
            };
            assert_eq!(*class, Class::Result);
            assert_eq!(
                (r.seq, &r.task_id, r.attempt),
                (Seq(1), &deep.task_id, deep.attempt)
            );
            assert_eq!(r.outcome, tether_proto::Outcome::Failed);
            let error = r.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
            assert!(error.contains("could not be sent"), "{error}");
            assert_eq!(r.started_at, deep.started_at);
            assert_eq!(restored.entries[1], (Class::State, s4.clone()));
            assert_eq!(restored.last_seq, Seq(4));
            let set_aside: Vec<i64> = sd
                .conn()
                .prepare("SELECT seq FROM discarded ORDER BY seq")
                .expect("prepare")
                .query_map([], |r| r.get(0))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows");
            assert_eq!(set_aside, [2, 3]);
        }
    }

    #[test]
    fn another_worker_id_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(StateDir::open(dir.path(), &wid("w1")).expect("open"));
        let err = StateDir::open(dir.path(), &wid("w2")).expect_err("refused");
        assert!(matches!(err, StateDirError::Identity { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("w1") && msg.contains("w2"), "{msg}");
    }

    #[test]
    fn a_directory_held_by_a_live_process_is_refused_and_a_stale_lock_is_taken_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = StateDir::open(dir.path(), &wid("w1")).expect("open");
        let err = StateDir::open(dir.path(), &wid("w1")).expect_err("locked");
        assert!(
            matches!(err, StateDirError::Locked { pid, .. } if pid == std::process::id()),
            "{err}"
        );
        drop(held);
        drop(StateDir::open(dir.path(), &wid("w1")).expect("released on drop"));
        // A lock file left by a dead process holds no lock: it is taken over.
        std::fs::write(dir.path().join(LOCK_FILE), "4194304999 1").expect("write");
        drop(StateDir::open(dir.path(), &wid("w1")).expect("stale lock taken over"));
    }

    #[test]
    fn of_many_openers_racing_for_a_stale_lock_exactly_one_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(StateDir::open(dir.path(), &wid("w1")).expect("create"));
        std::fs::write(dir.path().join(LOCK_FILE), "4194304999 1").expect("write");
        const N: usize = 8;
        let barrier = std::sync::Barrier::new(N);
        let opened = std::sync::Barrier::new(N);
        let wins = std::thread::scope(|s| {
            let handles: Vec<_> = (0..N)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let r = StateDir::open(dir.path(), &wid("w1"));
                        // Hold what was won until every opener has tried.
                        opened.wait();
                        match r {
                            Ok(_) => true,
                            Err(StateDirError::Locked { .. }) => false,
                            Err(e) => panic!("unexpected error: {e}"),
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .filter(|won| *won)
                .count()
        });
        assert_eq!(wins, 1, "exactly one opener holds the directory");
    }

    #[test]
    fn a_corrupt_database_is_refused_clearly_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = b"this is not a sqlite database, not at all, not even close....".repeat(100);
        std::fs::write(dir.path().join(DB_FILE), &junk).expect("write");
        let err = StateDir::open(dir.path(), &wid("w1")).expect_err("corrupt");
        assert!(matches!(err, StateDirError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("worker.db"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join(DB_FILE)).expect("read"),
            junk,
            "untouched"
        );
        // The lock was released with the refusal.
        std::fs::remove_file(dir.path().join(DB_FILE)).expect("remove");
        drop(StateDir::open(dir.path(), &wid("w1")).expect("lock released"));
    }

    #[test]
    fn an_emptied_database_file_is_refused_not_started_afresh() {
        // An empty file would open as a new database: the outbox it held gone, without a word.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(DB_FILE), b"").expect("write");
        let err = StateDir::open(dir.path(), &wid("w1")).expect_err("empty");
        assert!(matches!(err, StateDirError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("the file is empty"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(DB_FILE)).expect("read"), b"");
        // A state directory that is a file.
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        let err = StateDir::open(&file, &wid("w1")).expect_err("a file");
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }
}
