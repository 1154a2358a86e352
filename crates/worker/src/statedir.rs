//! The worker's state directory (`--state-dir`): what survives a restart of the process.
//!
//! Layout:
//!
//! ```text
//! <state_dir>/
//!   lock           "<pid> <start time>" of the process that owns the directory
//!   worker.db      SQLite (WAL, synchronous=NORMAL): identity, outbox journal, seq high-water
//!                  mark, tasks running now, tasks lost with the previous process, journaled
//!                  entries set aside at a start because they did not decode, checkpoint
//!                  deletions owed to checkpoints.db (`forget`), the submission (the
//!                  coordinator's `submit_seq`) of each task id as it last started here
//!                  (`incarnation`; a table an older worker of schema 2 leaves alone)
//!   checkpoints.db SQLite (WAL, synchronous=NORMAL): the latest checkpoint of each task
//!                  running or lost (`checkpoints`)
//!   tasks/<task>/  checkpoint directories of command tasks (owned by the executor; those of
//!                  tasks neither running nor lost are swept at start: `sweep_task_dirs`)
//!   groups/<task>  the process group and mark of a running command task, for a worker that
//!                  starts after a crash (`executor::orphans`)
//! ```
//!
//! Every write is a committed transaction when the call returns: an outbox entry counts as
//! produced, and a task as running, only once it is on disk. With `synchronous=NORMAL` in WAL
//! mode a commit survives the death of the process (not of the machine), which is what a
//! restarted worker needs. A journal write that fails (the disk is full) says so
//! ([`Journal::write`]): the runner does not record the end of an attempt whose result it
//! did not take, so a crash reports the attempt lost instead of losing its result unseen.
//!
//! Checkpoints have a database, a connection and a lock of their own: a checkpoint of many MiB
//! is written on the blocking pool, while the outbox journal is written on the runtime under
//! the outbox lock at every push and ack, and tasks are recorded starting and ending there too.
//! Sharing a lock, or SQLite's one writer of a file, the session would stall for as long as a
//! checkpoint takes to write. So nothing on the `worker.db` side waits for `checkpoints.db`:
//! the deletions an ending task or `forget_lost` asks of it are done at once when it is free,
//! else by its holder as it releases it. Nor does the journal write a checkpoint's bytes again:
//! it records a checkpoint's pieces by where they lie in it, and a start rebuilds them from
//! `checkpoints.db` (module `pieces`).
//!
//! The two files share no transaction, so each change that touches both is ordered to be safe
//! at a crash between its steps: `worker.db` first, in one transaction (the attempt leaves the
//! running set, and the deletion is recorded as owed in `forget`: the task's checkpoints up to
//! the attempt that ended), then the checkpoints, then the `forget` rows go. A crash between
//! them leaves owed deletions on disk, which the next open applies before it reads any
//! checkpoint: a task lost at that open (even at a newer attempt that started here since) is
//! never handed an ended attempt's checkpoint, and a lost task never loses its own. Forgetting
//! the lost set (`forget_lost`) leaves their checkpoints: a newer attempt here may resume from
//! one, and nothing forgets a task's checkpoints but the end of an attempt here (up to that
//! attempt), so a crash while it runs still finds the checkpoint at the next start, or the
//! start here of another submission under the task's id (all of them: they are the removed
//! task's, never the new one's past). So the checkpoints kept of a task id are all of the
//! submission recorded for it, which a lost task's [`LocalCheckpoint`] carries. Every open
//! also sweeps away the checkpoints of tasks neither running nor lost. A corrupt or emptied `checkpoints.db` is refused at open like
//! `worker.db`, left untouched. A missing one is made at open: from the `checkpoints` table of
//! a `worker.db` of schema 1 (then dropped), empty otherwise, as a missing `worker.db` is, with a
//! warning if `worker.db` says there was one; a `-wal` and `-shm` it left are removed first.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use tether_proto::msg::WorkerMsg;
use tether_proto::{Attempt, Seq, TaskId, TaskRef, WorkerId};

use crate::executor::StoredCheckpoint;
use crate::outbox::{Class, Journal, JournalError, Put};

mod checkpoints;
#[cfg(test)]
mod modes;
mod pieces;
mod private;

pub use checkpoints::CHECKPOINTS_FILE;
pub(crate) use private::{DIR_MODE, FILE_MODE, create_dir_all as create_private_dir, tighten};

/// File name of the lock.
pub const LOCK_FILE: &str = "lock";
/// Directory of the command tasks' checkpoint directories (`tasks/<task>/`).
pub const TASKS_DIR: &str = "tasks";
/// File name of the database.
pub const DB_FILE: &str = "worker.db";
/// Schema version of `worker.db` (`PRAGMA user_version`): 2 since its checkpoints live in
/// `checkpoints.db` (1 kept them in a table of its own; a worker of schema 1 refuses 2).
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY, class INTEGER NOT NULL, msg TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS running (task_id TEXT PRIMARY KEY, attempt INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lost (
    task_id TEXT NOT NULL, attempt INTEGER NOT NULL, PRIMARY KEY (task_id, attempt));
CREATE TABLE IF NOT EXISTS discarded (
    seq INTEGER PRIMARY KEY, class INTEGER NOT NULL, msg TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS forget (
    task_id TEXT NOT NULL, attempt INTEGER NOT NULL, PRIMARY KEY (task_id, attempt));
CREATE TABLE IF NOT EXISTS incarnation (task_id TEXT PRIMARY KEY, submit_seq INTEGER NOT NULL);
";

/// Raises the highest sequence number handed out to `?1`.
const SEQ_HIGH: &str = "INSERT INTO meta (key, value) VALUES ('seq_high', ?1)
    ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)";

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
    #[error(
        "{path} is not a usable worker database ({detail}); move it away, with its -wal and -shm files, to start afresh"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{} is missing beside {}: the worker was not stopped cleanly, and the write-ahead log that held its latest writes (results not yet delivered among them) was removed; refusing to start without them (put it back; to start without them, remove {})",
        wal.display(),
        shm.display(),
        shm.display()
    )]
    WalMissing { wal: PathBuf, shm: PathBuf },
    #[error("{path} has schema version {found}, newer than this worker's {newest}; left untouched")]
    Newer {
        path: PathBuf,
        found: i64,
        newest: i64,
    },
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
    /// The latest checkpoint of each lost task (already uploaded by the process that wrote it),
    /// described: its bytes stay on disk until a resume reads them
    /// ([`StateDir::latest_checkpoint`]), since most lost tasks never come back to this worker.
    pub checkpoints: Vec<(TaskId, LocalCheckpoint)>,
}

/// A checkpoint kept in the state directory, without its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCheckpoint {
    pub id: tether_proto::CheckpointId,
    pub attempt: Attempt,
    /// Its size.
    pub bytes: u64,
    /// The submission of the task it was written for (the coordinator's `submit_seq`), when
    /// its attempt's assignment said.
    pub submit_seq: Option<u64>,
}

impl StateDirError {
    /// The error of an SQLite call on the database at `path` (for `map_err`, off the hot
    /// paths: it copies the path when made).
    fn db(path: &Path) -> impl FnOnce(rusqlite::Error) -> Self + use<> {
        let path = path.to_owned();
        move |source| Self::Db { path, source }
    }

    /// The error of a file operation on `path` (as [`StateDirError::db`]).
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + use<> {
        let path = path.to_owned();
        move |source| Self::Io { path, source }
    }
}

/// An open, locked state directory.
pub struct StateDir {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
    cp_path: PathBuf,
    // INVARIANT: when both are held, `cp_conn` is taken first (`settle` reads and clears the
    // owed deletions under it); nothing waits for it while holding `conn`, and nothing on the
    // journal's or the running set's path waits for it at all (`try_lock` only).
    cp_conn: Mutex<Connection>,
    /// `worker.db`'s `forget` table may hold rows not yet applied to `checkpoints.db`. Set
    /// after the rows are committed, cleared by `settle` before it reads them.
    owed: AtomicBool,
    _lock: LockFile,
}

/// The checkpoint connection, locked. Whoever releases it settles what was owed meanwhile
/// (a deletion asked while it was held found it busy, and left it to the holder).
struct CheckpointsGuard<'a> {
    sd: &'a StateDir,
    conn: Option<MutexGuard<'a, Connection>>,
}

impl std::ops::Deref for CheckpointsGuard<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_deref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for CheckpointsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for CheckpointsGuard<'_> {
    fn drop(&mut self) {
        drop(self.conn.take());
        self.sd.settle_if_free();
    }
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
        // Made for its user alone (a directory that exists is left as it is): it holds
        // checkpoints and results, which may hold secrets.
        let made = match dir.exists() && !dir.is_dir() {
            true => Err(std::io::Error::other("it exists and is not a directory")),
            false => private::create_dir_all(dir),
        };
        made.map_err(|source| StateDirError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let lock = LockFile::acquire(dir)?;
        tighten_files(dir);
        let db_path = dir.join(DB_FILE);
        let (mut conn, version) = open_db(&db_path, SCHEMA, SCHEMA_VERSION)?;
        let db = |source| StateDirError::Db {
            path: db_path.clone(),
            source,
        };
        // The directory's owner first: a start with another worker's id is refused before it
        // changes anything there (such as making a missing checkpoint database anew).
        check_identity(&conn, worker).map_err(|e| match e {
            IdentityError::Db(source) => db(source),
            IdentityError::Mismatch(recorded) => StateDirError::Identity {
                dir: dir.to_owned(),
                recorded,
                given: worker.clone(),
            },
        })?;
        let (mut cp_conn, cp_path) = checkpoints::open(dir, &mut conn, &db_path, version)?;
        let (mut restored, pieces) = {
            let tx = conn.transaction().map_err(db)?;
            let restored = restore(&tx, &db_path)?;
            tx.commit().map_err(db)?;
            restored
        };
        // What a crash between the two steps of `task_finished` or `forget_lost` left: before
        // the lost tasks' checkpoints are read, or an earlier attempt's would be handed back.
        let conn = Mutex::new(conn);
        let forgot = apply_forget(&conn, &db_path, &mut cp_conn, &cp_path)?;
        let needed = needed(&locked(&conn)).map_err(db)?;
        let swept =
            checkpoints::sweep(&mut cp_conn, &needed).map_err(StateDirError::db(&cp_path))?;
        // Only those of tasks whose checkpoints are kept are still of use.
        locked(&conn)
            .execute(
                "DELETE FROM incarnation WHERE task_id NOT IN
                     (SELECT task_id FROM running UNION SELECT task_id FROM lost)",
                [],
            )
            .map_err(db)?;
        for t in &restored.lost {
            if let Some(mut cp) = checkpoints::describe(&cp_conn, &t.task_id, &cp_path)? {
                cp.submit_seq = incarnation(&locked(&conn), &t.task_id).map_err(db)?;
                restored.checkpoints.push((t.task_id.clone(), cp));
            }
        }
        // Pieces journaled by reference, from the checkpoints kept now (after the deletions
        // owed and the sweep): those of a checkpoint gone leave the journal, with their
        // upload's announcement.
        let dropped = pieces::rebuild(&cp_conn, &cp_path, pieces, &mut restored.entries)?;
        if !dropped.is_empty() {
            let mut conn = locked(&conn);
            let tx = conn.transaction().map_err(db)?;
            for seq in &dropped {
                tx.execute("DELETE FROM outbox WHERE seq = ?1", params![seq.0 as i64])
                    .map_err(db)?;
            }
            tx.commit().map_err(db)?;
        }
        if !restored.lost.is_empty() || !restored.entries.is_empty() || swept + forgot > 0 {
            tracing::info!(
                dir = %dir.display(),
                lost = restored.lost.len(),
                outbox = restored.entries.len(),
                last_seq = restored.last_seq.0,
                checkpoints = restored.checkpoints.len(),
                checkpoints_swept = swept + forgot,
                "state restored from the previous process"
            );
        }
        let sd = Arc::new(Self {
            dir: dir.to_owned(),
            db_path,
            conn,
            cp_path,
            cp_conn: Mutex::new(cp_conn),
            owed: AtomicBool::new(false),
            _lock: lock,
        });
        Ok((sd, restored))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the checkpoint directories (`tasks/<task>/`) and result files
    /// (`tasks/<task>.result.json`, a `command` task's `$TETHER_RESULT_FILE`) of tasks neither
    /// running nor lost, by the rule of the checkpoints swept at open: a crash between
    /// journaling a task's result and removing its directory, or as its process ended, left
    /// one, which nothing else would ever remove. Called at start, before any task runs here
    /// (the executor owns the directory of a task it runs); those of lost tasks stay, for an
    /// attempt that may come back here. Anything else (the records of an older worker's
    /// process groups, `tasks/<task>.group`) is left alone. Returns how many were removed; a
    /// failure is logged (only disk space is at stake).
    pub fn sweep_task_dirs(&self) -> usize {
        let root = self.dir.join(TASKS_DIR);
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(error) => {
                tracing::warn!(dir = %root.display(), %error, "cannot look through the tasks' checkpoint directories");
                return 0;
            }
        };
        let needed = match needed(&self.conn()) {
            Ok(needed) => needed,
            Err(error) => {
                tracing::warn!(path = %self.db_path.display(), %error, "cannot read the tasks running or lost; their checkpoint directories are not swept");
                return 0;
            }
        };
        let mut swept = Vec::new();
        for entry in entries.flatten() {
            // Not followed: a link is no directory of the executor's.
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            // A task's directory, or its result file (a file or a link the task made of it).
            let task = match name.strip_suffix(crate::executor::command::RESULT_FILE_SUFFIX) {
                Some(task) if !is_dir => task,
                _ if is_dir => name,
                _ => continue,
            };
            if needed.contains(task) {
                continue;
            }
            // Read-only directories a task left in it included.
            match crate::executor::command::clear(&entry.path()) {
                Ok(()) => swept.push(task.to_owned()),
                Err(error) => {
                    tracing::warn!(path = %entry.path().display(), %error, "could not remove the checkpoint directory or result file of a task that ended");
                }
            }
        }
        if !swept.is_empty() {
            tracing::info!(dir = %root.display(), swept = swept.len(), tasks = ?swept, "removed the checkpoint directories and result files of tasks that ended before the previous process could");
        }
        swept.len()
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        locked(&self.conn)
    }

    /// The checkpoint database, locked (for as long as a checkpoint takes to write).
    fn checkpoints(&self) -> CheckpointsGuard<'_> {
        CheckpointsGuard {
            sd: self,
            conn: Some(locked(&self.cp_conn)),
        }
    }

    fn db_err(&self, source: rusqlite::Error) -> StateDirError {
        StateDirError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    fn cp_err(&self, source: rusqlite::Error) -> StateDirError {
        StateDirError::Db {
            path: self.cp_path.clone(),
            source,
        }
    }

    /// Records that `task` runs at `attempt` (before it is reported running), of a submission
    /// not known ([`StateDir::task_started_as`]).
    pub fn task_started(&self, task: &TaskId, attempt: Attempt) -> Result<(), StateDirError> {
        self.task_started_as(task, attempt, None)
    }

    /// Records that `task` runs at `attempt`, of submission `submit_seq` (the coordinator's,
    /// when its assignment said). The checkpoints kept of another submission under the same
    /// id (a task that retention removed, its id submitted again) are forgotten with it:
    /// they are not this task's past. Of a submission not known, the one recorded is
    /// forgotten: its checkpoints are then of none known.
    pub fn task_started_as(
        &self,
        task: &TaskId,
        attempt: Attempt,
        submit_seq: Option<u64>,
    ) -> Result<(), StateDirError> {
        let other = {
            let mut conn = self.conn();
            let tx = conn.transaction().map_err(|e| self.db_err(e))?;
            let other = started(&tx, task, attempt, submit_seq).map_err(|e| self.db_err(e))?;
            tx.commit().map_err(|e| self.db_err(e))?;
            other
        };
        if other {
            tracing::info!(task = %task, %attempt, ?submit_seq, "another submission of the task id starts here: the checkpoints kept of the earlier one are forgotten");
            self.owe();
        }
        Ok(())
    }

    /// Records that `attempt` of `task` left the running set; its checkpoint is no longer
    /// needed here (the coordinator holds it for the next attempt). Waits for no checkpoint
    /// being written: the checkpoint is forgotten then by the writer, as it releases its lock.
    pub fn task_finished(&self, task: &TaskId, attempt: Attempt) -> Result<(), StateDirError> {
        // Step one: the attempt leaves the running set and its checkpoints are owed, in one
        // transaction. A crash before step two leaves the debt on disk, paid at the next open
        // before anything is read (the task may by then run again here, at a newer attempt).
        {
            let mut conn = self.conn();
            let tx = conn.transaction().map_err(|e| self.db_err(e))?;
            tx.execute(
                "DELETE FROM running WHERE task_id = ?1 AND attempt = ?2",
                params![task.as_str(), attempt.0],
            )
            .and_then(|_| {
                tx.execute(
                    "INSERT OR IGNORE INTO forget (task_id, attempt) VALUES (?1, ?2)",
                    params![task.as_str(), attempt.0],
                )
            })
            // Its submission, unless a newer attempt runs or it is lost (its checkpoint kept).
            .and_then(|_| {
                tx.execute(
                    "DELETE FROM incarnation WHERE task_id = ?1 AND task_id NOT IN
                         (SELECT task_id FROM running UNION SELECT task_id FROM lost)",
                    [task.as_str()],
                )
            })
            .and_then(|_| tx.commit())
            .map_err(|e| self.db_err(e))?;
        }
        self.owe();
        Ok(())
    }

    /// Keeps `cp` as the latest checkpoint of `task`. When it cannot be kept (the disk is full),
    /// the one kept before it of the same attempt or an older one goes: kept, it would be taken
    /// after a crash for a checkpoint newer than the coordinator's (it differs from it), and the
    /// task would resume from further back than its last checkpoint.
    pub fn store_checkpoint(
        &self,
        task: &TaskId,
        cp: &StoredCheckpoint,
    ) -> Result<(), StateDirError> {
        // What was asked while this one was written is settled as the guard is released.
        let mut conn = self.checkpoints();
        self.settle(&mut conn);
        let stored = checkpoints::store(&conn, task, cp).map_err(|e| self.cp_err(e));
        if stored.is_err() {
            let ended = [(task.as_str().to_owned(), cp.attempt.0)];
            if let Err(error) = checkpoints::forget(&mut conn, &ended) {
                tracing::error!(task = %task, %error, "could not forget the checkpoint before the one that failed to store: after a crash the task may resume from it");
            }
        }
        stored
    }

    /// The latest checkpoint stored for `task`.
    pub fn latest_checkpoint(
        &self,
        task: &TaskId,
    ) -> Result<Option<StoredCheckpoint>, StateDirError> {
        let mut conn = self.checkpoints();
        self.settle(&mut conn);
        checkpoints::read(&conn, task, &self.cp_path)
    }

    /// The coordinator has been told about the lost tasks (a registration was acknowledged):
    /// forgets them, not their checkpoints. The coordinator may hand such a task back to this
    /// worker, whose new attempt then resumes from the checkpoint, kept under the lost attempt:
    /// deleted here, a crash while the new attempt runs (before it checkpoints itself) would
    /// leave it, lost at the next start, without one. So a lost task's checkpoints go with the
    /// end of a newer attempt here (`task_finished` forgets every attempt up to its own), or at
    /// the next start, which sweeps away the checkpoints of tasks neither running nor lost.
    /// Until then they take the disk they took before (and only the disk: the runner knows
    /// them by id, and reads one when its task comes back).
    pub fn forget_lost(&self) -> Result<(), StateDirError> {
        self.conn()
            .execute("DELETE FROM lost", [])
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Notes that `forget` holds rows (committed), and applies them now unless a checkpoint is
    /// being written: then its writer does, as it releases the lock.
    fn owe(&self) {
        self.owed.store(true, Ordering::SeqCst);
        self.settle_if_free();
    }

    /// Settles what is owed for as long as something is and the checkpoint lock is free. A
    /// holder found busy settles it as it releases the lock (`CheckpointsGuard`), so no debt
    /// waits for the next user.
    fn settle_if_free(&self) {
        while self.owed.load(Ordering::SeqCst) {
            match self.cp_conn.try_lock() {
                Ok(mut conn) => self.settle(&mut conn),
                Err(std::sync::TryLockError::Poisoned(p)) => self.settle(&mut p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => return,
            }
        }
    }

    /// Applies the `forget` rows to the checkpoint database, of which `conn` is the held lock.
    /// A failure is logged: the rows stay, and the next open applies them.
    fn settle(&self, conn: &mut Connection) {
        // Cleared before the rows are read: a row committed after the read sets it again.
        if !self.owed.swap(false, Ordering::SeqCst) {
            return;
        }
        if let Err(error) = apply_forget(&self.conn, &self.db_path, conn, &self.cp_path) {
            tracing::error!(%error, "could not forget the checkpoints of tasks that ended; the next start does");
        }
    }

    /// Records `seq` as handed out, alone: the journal did not take the entry that has it (its
    /// write, which records that too, failed). The entry still goes out under it, and may be
    /// acknowledged under it: a restart that numbered another message with it would put two
    /// messages under one (worker, seq), by which the end-to-end verdicts tell acknowledgements
    /// apart. Small enough to fit where the entry did not; a failure is logged.
    fn note_seq(&self, seq: Seq) {
        let noted = self.conn().execute(SEQ_HIGH, params![seq.0 as i64]);
        if let Err(error) = noted {
            tracing::error!(dir = %self.dir.display(), %error, seq = seq.0, "could not record a sequence number as used; a restart may use it again");
        }
    }

    /// Writes the journal: `put` entered the outbox (a checkpoint piece, given its offset in
    /// its checkpoint: journaled by reference, see [`pieces`]) and `removed` left it.
    fn write_journal(&self, put: Option<Put<'_>>, removed: &[Seq]) -> Result<(), String> {
        // Encoded before the lock is taken.
        let put = match put {
            Some(Put {
                class,
                seq,
                msg,
                offset,
            }) => {
                let json = offset
                    .and_then(|offset| pieces::encode(msg, offset))
                    .unwrap_or_else(|| serde_json::to_string(msg))
                    .map_err(|e| e.to_string())?;
                Some((class, seq, json))
            }
            None => None,
        };
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        // The entry put first: it can be among those removed (telemetry the push that made it
        // dropped at once, to keep the outbox within its bounds), and then must not stay.
        if let Some((class, seq, json)) = put {
            tx.execute(
                "INSERT OR REPLACE INTO outbox (seq, class, msg) VALUES (?1, ?2, ?3)",
                params![seq.0 as i64, class as i64, json],
            )
            .and_then(|_| tx.execute(SEQ_HIGH, params![seq.0 as i64]))
            .map_err(|e| e.to_string())?;
        }
        for seq in removed {
            tx.execute("DELETE FROM outbox WHERE seq = ?1", params![seq.0 as i64])
                .map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())
    }
}

impl Journal for StateDir {
    fn write(&self, put: Option<Put<'_>>, removed: &[Seq]) -> Result<(), JournalError> {
        self.write_journal(put, removed).map_err(|error| {
            if let Some(put) = put {
                self.note_seq(put.seq);
            }
            JournalError(format!("{}: {error}", self.db_path.display()))
        })
    }
}

/// Opens the database at `path` after checking that it is one (of schema `newest` at most),
/// and creates the tables of `schema` it lacks. Returns it with the schema version found; the
/// caller sets the version once the database is of it.
fn open_db(path: &Path, schema: &str, newest: i64) -> Result<(Connection, i64), StateDirError> {
    let corrupt = |detail: String| StateDirError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    // SQLite would take an empty file for a new database and a directory for a disk error.
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            remove_stale_wal(path)?;
            // A dangling link is left to SQLite, which says it cannot open it.
            if std::fs::symlink_metadata(path).is_err() {
                create_db(path)?;
            }
        }
        Ok(m) if m.is_dir() => return Err(corrupt("it is a directory, not a file".into())),
        Ok(m) if m.len() == 0 => {
            return Err(corrupt(
                "the file is empty: every worker database holds at least its header".into(),
            ));
        }
        _ => {
            // A clean close removes both; a crash leaves both. The shared-memory file alone
            // means the log was removed by hand, and with it the latest writes, which SQLite
            // would silently open without.
            let sibling = |suffix| tether_proto::whole_file::sibling(path, suffix);
            let (wal, shm) = (sibling("-wal"), sibling("-shm"));
            if shm.exists() && !wal.exists() {
                return Err(StateDirError::WalMissing { wal, shm });
            }
        }
    }
    let conn = Connection::open(path).map_err(|e| corrupt(e.to_string()))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| corrupt(e.to_string()))?;
    if version > newest {
        return Err(StateDirError::Newer {
            path: path.to_owned(),
            found: version,
            newest,
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
        .and_then(|_| conn.execute_batch(schema))
        .map_err(|e| corrupt(e.to_string()))?;
    Ok((conn, version))
}

/// Makes private ([`private::tighten`]) what an older worker made in the state directory `dir`
/// with the umask's mode: the databases with their `-wal` and `-shm`, and the directories of
/// the checkpoints and the process-group records (what is in those two is out of other users'
/// reach once they are private).
fn tighten_files(dir: &Path) {
    for db in [DB_FILE, CHECKPOINTS_FILE] {
        for suffix in ["", "-wal", "-shm"] {
            private::tighten(
                &dir.join(format!("{db}{suffix}")),
                "task results, output and checkpoints",
            );
        }
    }
    private::tighten(&dir.join(TASKS_DIR), "the tasks' checkpoint directories");
    private::tighten(
        &dir.join(crate::executor::orphans::GROUPS_DIR),
        "the records of the tasks' process groups",
    );
}

/// Makes a new database at `path`, its header written, under another name (`path` with `.new`)
/// renamed into place: a process killed while making it leaves that name, which the next try
/// removes, never an empty file at `path`, which the next start would refuse as an emptied
/// database (made at `path` itself, a worker SIGKILLed between the file and its header could
/// not start again until the file was moved away by hand).
fn create_db(path: &Path) -> Result<(), StateDirError> {
    use tether_proto::whole_file::{Failed, create_whole};
    // WAL mode is kept in the header, which setting it writes: the file is a database.
    let wal = |new: &Path| {
        Connection::open(new)
            .and_then(|conn| conn.pragma_update(None, "journal_mode", "WAL"))
            .map_err(|e| StateDirError::Corrupt {
                path: new.to_owned(),
                detail: e.to_string(),
            })
    };
    create_whole(path, private::FILE_MODE, wal).map_err(|e| match e {
        Failed::Io { path, source } => StateDirError::io(&path)(source),
        Failed::Fill(e) => e,
    })
}

/// Removes the `-wal` and `-shm` files of the missing database at `path` (moved away without
/// them, after a killed process left them): SQLite would replay the old database's pages from
/// that WAL into the new file made at `path`.
fn remove_stale_wal(path: &Path) -> Result<(), StateDirError> {
    for suffix in ["-wal", "-shm"] {
        let stale = tether_proto::whole_file::sibling(path, suffix);
        match std::fs::remove_file(&stale) {
            Ok(()) => {
                tracing::warn!(path = %stale.display(), "removed, left by a database that is gone");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StateDirError::io(&stale)(e)),
        }
    }
    Ok(())
}

/// Applies the checkpoint deletions owed in `main`'s `forget` table to `cp` (each task's
/// checkpoints up to the attempt given), then deletes those rows. Applying a row twice (a
/// crash between the two files) deletes nothing more: a newer attempt's checkpoint stays.
/// Returns how many checkpoints went. `main` is locked only to read the rows and to delete
/// them, not while the checkpoints go (deleting a large one reads its every page): the outbox
/// journal does not wait for that either.
fn apply_forget(
    main: &Mutex<Connection>,
    main_path: &Path,
    cp: &mut Connection,
    cp_path: &Path,
) -> Result<usize, StateDirError> {
    #[cfg(test)]
    FORGOT_ON
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(std::thread::current().id());
    let rows: Vec<(String, u32)> = locked(main)
        .prepare("SELECT task_id, attempt FROM forget")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(StateDirError::db(main_path))?;
    if rows.is_empty() {
        return Ok(0);
    }
    let forgot = checkpoints::forget(cp, &rows).map_err(StateDirError::db(cp_path))?;
    let mut main = locked(main);
    let tx = main.transaction().map_err(StateDirError::db(main_path))?;
    for (task, attempt) in &rows {
        tx.execute(
            "DELETE FROM forget WHERE task_id = ?1 AND attempt = ?2",
            params![task, attempt],
        )
        .map_err(StateDirError::db(main_path))?;
    }
    tx.commit().map_err(StateDirError::db(main_path))?;
    Ok(forgot)
}

/// Tests: the threads `apply_forget` ran on.
#[cfg(test)]
pub(crate) static FORGOT_ON: Mutex<Vec<std::thread::ThreadId>> = Mutex::new(Vec::new());

/// `m`, locked: a panic while it was held left a connection that is still usable.
fn locked(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records the start of `attempt` of `task`, of submission `submit_seq`, in `tx`; true when the
/// checkpoints kept of the id were another submission's, and their deletion is now owed.
fn started(
    tx: &rusqlite::Transaction<'_>,
    task: &TaskId,
    attempt: Attempt,
    submit_seq: Option<u64>,
) -> rusqlite::Result<bool> {
    tx.execute(
        "INSERT OR REPLACE INTO running (task_id, attempt) VALUES (?1, ?2)",
        params![task.as_str(), attempt.0],
    )?;
    let before: Option<i64> = tx
        .query_row(
            "SELECT submit_seq FROM incarnation WHERE task_id = ?1",
            [task.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    let Some(seq) = submit_seq else {
        tx.execute(
            "DELETE FROM incarnation WHERE task_id = ?1",
            [task.as_str()],
        )?;
        return Ok(false);
    };
    // Stored as SQLite's signed integer, bit for bit.
    let seq = seq as i64;
    let other = before.is_some_and(|b| b != seq);
    if other {
        // Every checkpoint of the id, whatever its attempt.
        tx.execute(
            "INSERT OR IGNORE INTO forget (task_id, attempt) VALUES (?1, ?2)",
            params![task.as_str(), u32::MAX],
        )?;
    }
    tx.execute(
        "INSERT OR REPLACE INTO incarnation (task_id, submit_seq) VALUES (?1, ?2)",
        params![task.as_str(), seq],
    )?;
    Ok(other)
}

/// The submission recorded for `task` ([`StateDir::task_started_as`]).
fn incarnation(conn: &Connection, task: &TaskId) -> rusqlite::Result<Option<u64>> {
    conn.query_row(
        "SELECT submit_seq FROM incarnation WHERE task_id = ?1",
        [task.as_str()],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|s| s.map(|s| s as u64))
}

/// The tasks whose checkpoints are still needed: those running and those lost.
fn needed(conn: &Connection) -> rusqlite::Result<BTreeSet<String>> {
    conn.prepare("SELECT task_id FROM running UNION SELECT task_id FROM lost")?
        .query_map([], |r| r.get(0))?
        .collect()
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

/// Reads the journal and turns the running set into the lost set (their checkpoints are read
/// by the caller, from the other file), with the pieces journaled by reference apart: the
/// caller rebuilds them from the other file too.
fn restore(
    conn: &Connection,
    path: &Path,
) -> Result<(Restored, Vec<(Class, pieces::PieceRef)>), StateDirError> {
    let db = |source| StateDirError::Db {
        path: path.to_owned(),
        source,
    };
    let corrupt = |detail: String| StateDirError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let (mut entries, mut salvaged, mut discarded) = (Vec::new(), Vec::new(), Vec::new());
    let mut by_ref = Vec::new();
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
                Journaled::Piece(class, piece) => by_ref.push((class, piece)),
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
        .chain(by_ref.iter().map(|(_, p)| p.seq))
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
    let mut ended = Vec::new();
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
            match finished.contains(&(task.clone(), Attempt(attempt))) {
                false => lost.push(TaskRef::new(task, Attempt(attempt))),
                true => ended.push((task, attempt)),
            }
        }
    }
    // An attempt whose result is journaled ended (the process died before it recorded the
    // end): it leaves the lost set, and its checkpoints are owed, as `task_finished` does.
    // Kept there, it was reported lost at a later start, once its result had been sent and
    // left the journal, and its checkpoint was kept for it.
    for (task, attempt) in ended {
        conn.execute(
            "DELETE FROM lost WHERE task_id = ?1 AND attempt = ?2",
            params![task.as_str(), attempt],
        )
        .and_then(|_| {
            conn.execute(
                "INSERT OR IGNORE INTO forget (task_id, attempt) VALUES (?1, ?2)",
                params![task.as_str(), attempt],
            )
        })
        .map_err(db)?;
    }
    let restored = Restored {
        entries,
        last_seq,
        lost,
        checkpoints: Vec::new(),
    };
    Ok((restored, by_ref))
}

/// What a journaled outbox entry is at a start.
enum Journaled {
    Entry(Class, WorkerMsg),
    /// A checkpoint piece journaled by reference, its bytes to be read from the checkpoint.
    Piece(Class, pieces::PieceRef),
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
    if let Some(piece) = pieces::decode(json) {
        return Journaled::Piece(class, piece);
    }
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
                result: serde_json::json!({}).into(),
                error: Some(tether_proto::task::TaskError {
                    message: format!("the result could not be sent ({error})"),
                    detail: None,
                }),
                worker_fault: false,
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

fn class_from(v: i64) -> Option<Class> {
    [Class::Result, Class::Notice, Class::State, Class::Telemetry]
        .into_iter()
        .find(|c| *c as i64 == v)
}

/// The lock ([`tether_proto::lockfile`], as the coordinator locks its data directory): the file
/// holds "<pid> <start time>" of the holder, for the error message.
#[derive(Debug)]
pub(crate) struct LockFile {
    _lock: tether_proto::lockfile::FileLock,
}

impl LockFile {
    /// Locks `dir` for this process; refused ([`StateDirError::Locked`]) while a live process
    /// holds it. The agent's scratch directories are locked the same way.
    pub(crate) fn acquire(dir: &Path) -> Result<Self, StateDirError> {
        use tether_proto::lockfile::LockError;
        let path = dir.join(LOCK_FILE);
        let pid = std::process::id();
        let stamp = format!("{pid} {}", start_time(pid).unwrap_or_default());
        match tether_proto::lockfile::lock(&path, &stamp) {
            Ok(lock) => {
                // `lockfile` makes it with the umask's mode. It holds only a pid: a failure
                // here costs nothing worth refusing the start for.
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(
                    &path,
                    std::fs::Permissions::from_mode(private::FILE_MODE),
                );
                Ok(Self { _lock: lock })
            }
            Err(LockError::Held { stamp }) => Err(StateDirError::Locked {
                dir: dir.to_owned(),
                pid: held_by(&stamp).unwrap_or(0),
            }),
            Err(LockError::Io(source)) => Err(StateDirError::Io { path, source }),
        }
    }
}

/// The pid recorded in a lock file.
fn held_by(content: &str) -> Option<u32> {
    content.split_whitespace().next()?.parse().ok()
}

/// Start time of a process (field 22 of `/proc/<pid>/stat`), to tell a reused pid apart.
pub(crate) fn start_time(pid: u32) -> Option<String> {
    crate::executor::procs::Stat::read(pid).map(|s| s.start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tether_proto::CheckpointId;
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
            result: serde_json::json!({"n": seq}).into(),
            error: None,
            worker_fault: false,
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

    /// The bytes of the `i`th lost task's checkpoint `restored` describes, read from `sd`.
    fn kept(sd: &StateDir, restored: &Restored, i: usize) -> Vec<u8> {
        let (task, local) = &restored.checkpoints[i];
        let cp = sd.latest_checkpoint(task).expect("read").expect("kept");
        assert_eq!((&cp.id, cp.attempt), (&local.id, local.attempt));
        assert_eq!(cp.data.len() as u64, local.bytes);
        cp.data.to_vec()
    }

    fn checkpoint(attempt: u32, data: &[u8]) -> StoredCheckpoint {
        StoredCheckpoint {
            id: CheckpointId::random(),
            attempt: Attempt(attempt),
            data: Arc::new(data.to_vec()),
            piece: 0,
        }
    }

    /// Opens `dir` for worker `w1` with `task` running at attempt 1 and its checkpoint `data`
    /// stored.
    fn open_running(dir: &Path, task: &str, data: &[u8]) -> Arc<StateDir> {
        let (sd, _) = StateDir::open(dir, &wid("w1")).expect("open");
        sd.task_started(&tid(task), Attempt(1)).expect("start");
        sd.store_checkpoint(&tid(task), &checkpoint(1, data))
            .expect("checkpoint");
        sd
    }

    /// The tasks whose checkpoints `checkpoints.db` holds, read from the side.
    fn checkpoint_rows(dir: &Path) -> Vec<String> {
        Connection::open(dir.join(CHECKPOINTS_FILE))
            .expect("open")
            .prepare("SELECT task_id FROM checkpoints ORDER BY task_id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// The schema version of `worker.db` and whether it has a `checkpoints` table.
    fn main_schema(conn: &Connection) -> (i64, bool) {
        let version = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        let table = conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'checkpoints'",
                [],
                |r| r.get(0),
            )
            .expect("table");
        (version, table)
    }

    /// `worker.db` as a worker of schema 1 left it (checkpoints in a table of its own): worker
    /// `w1`, `running` tasks at attempt 1, `checkpoints` (task, attempt, data) and `outbox`.
    fn schema_1_state_dir(
        dir: &Path,
        running: &[&str],
        checkpoints: &[(&str, u32, &[u8])],
        outbox: &[(Class, &WorkerMsg)],
    ) {
        let conn = Connection::open(dir.join(DB_FILE)).expect("open");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value);
             CREATE TABLE outbox (
                 seq INTEGER PRIMARY KEY, class INTEGER NOT NULL, msg TEXT NOT NULL);
             CREATE TABLE running (task_id TEXT PRIMARY KEY, attempt INTEGER NOT NULL);
             CREATE TABLE lost (
                 task_id TEXT NOT NULL, attempt INTEGER NOT NULL, PRIMARY KEY (task_id, attempt));
             CREATE TABLE checkpoints (
                 task_id TEXT PRIMARY KEY, checkpoint_id TEXT NOT NULL, attempt INTEGER NOT NULL,
                 data BLOB NOT NULL);
             CREATE TABLE discarded (
                 seq INTEGER PRIMARY KEY, class INTEGER NOT NULL, msg TEXT NOT NULL,
                 reason TEXT NOT NULL);
             PRAGMA user_version = 1;
             INSERT INTO meta (key, value) VALUES ('worker_id', 'w1');",
        )
        .expect("schema 1");
        for task in running {
            conn.execute(
                "INSERT INTO running (task_id, attempt) VALUES (?1, 1)",
                [task],
            )
            .expect("running");
        }
        for (task, attempt, data) in checkpoints {
            conn.execute(
                "INSERT INTO checkpoints (task_id, checkpoint_id, attempt, data)
                 VALUES (?1, ?2, ?3, ?4)",
                params![task, CheckpointId::random().as_str(), attempt, data],
            )
            .expect("checkpoint");
        }
        for (class, msg) in outbox {
            conn.execute(
                "INSERT INTO outbox (seq, class, msg) VALUES (?1, ?2, ?3)",
                params![
                    msg.seq().expect("seq").0 as i64,
                    *class as i64,
                    serde_json::to_string(msg).expect("json")
                ],
            )
            .expect("outbox");
        }
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
            sd.write(Some(Put::new(Class::Result, Seq(1), &r1)), &[])
                .expect("write");
            sd.write(Some(Put::new(Class::State, Seq(2), &s2)), &[])
                .expect("write");
            sd.write(Some(Put::new(Class::Result, Seq(3), &result(3, "c"))), &[])
                .expect("write");
            sd.write(None, &[Seq(3)]).expect("write");
        }
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(
            restored.entries,
            vec![(Class::Result, r1), (Class::State, s2)]
        );
        assert_eq!(restored.last_seq, Seq(3), "the acked seq 3 is still used");
    }

    /// A result the journal cannot take (the disk is full: here a trigger refuses it) is
    /// reported as not written, and its sequence number is still recorded as used: it went
    /// out under it, and a restart numbers no other message with it.
    #[test]
    fn a_result_the_journal_cannot_take_is_reported_and_its_seq_not_used_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s3 = state(3, "b");
        {
            let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
            sd.write(Some(Put::new(Class::State, Seq(3), &s3)), &[])
                .expect("write");
            sd.conn()
                .execute_batch(
                    "CREATE TRIGGER full BEFORE INSERT ON outbox WHEN NEW.class = 0
                     BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END",
                )
                .expect("trigger");
            let full = sd.write(Some(Put::new(Class::Result, Seq(4), &result(4, "a"))), &[]);
            assert!(full.is_err_and(|e| e.to_string().contains("full")));
            sd.conn()
                .execute_batch("DROP TRIGGER full")
                .expect("room again");
        }
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.entries, vec![(Class::State, s3)]);
        assert_eq!(restored.last_seq, Seq(4), "its seq is not used again");
    }

    /// An entry that the write that put it also removes (telemetry dropped by the push that
    /// made it, the outbox being past its bounds) is not left in the journal, to be replayed
    /// after a restart and never deleted.
    #[test]
    fn an_entry_put_and_removed_in_one_write_is_not_journaled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r1 = result(1, "a");
        {
            let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
            sd.write(Some(Put::new(Class::Result, Seq(1), &r1)), &[])
                .expect("write");
            sd.write(
                Some(Put::new(Class::State, Seq(2), &state(2, "b"))),
                &[Seq(2)],
            )
            .expect("write");
        }
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.entries, vec![(Class::Result, r1)]);
        assert_eq!(restored.last_seq, Seq(2), "its seq is not used again");
    }

    /// A lost task's checkpoint comes back with the submission its attempt started as (the
    /// coordinator's `submit_seq`), across more starts, to tell it from a task submitted again
    /// under the id. Another submission of the id starting here forgets the earlier one's
    /// checkpoints: none is that task's past. An attempt of no known submission leaves its
    /// checkpoint of none.
    #[test]
    fn a_lost_tasks_checkpoint_keeps_the_submission_it_was_written_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
            sd.task_started_as(&tid("t"), Attempt(1), Some(7))
                .expect("start");
            sd.store_checkpoint(&tid("t"), &checkpoint(1, b"old"))
                .expect("checkpoint");
            sd.task_started(&tid("unknown"), Attempt(1)).expect("start");
            sd.store_checkpoint(&tid("unknown"), &checkpoint(1, b"u"))
                .expect("checkpoint");
        }
        let seq_of = |restored: &Restored, task: &str| {
            let found = restored
                .checkpoints
                .iter()
                .find(|(t, _)| t.as_str() == task);
            found.map(|(_, cp)| cp.submit_seq)
        };
        {
            let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
            assert_eq!(seq_of(&restored, "t"), Some(Some(7)), "{restored:?}");
            assert_eq!(seq_of(&restored, "unknown"), Some(None), "{restored:?}");
            sd.forget_lost().expect("forget the lost set");
            // Lost again at the next start: still of submission 7.
            sd.task_started_as(&tid("t"), Attempt(2), Some(7))
                .expect("start");
        }
        {
            let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
            assert_eq!(seq_of(&restored, "t"), Some(Some(7)), "{restored:?}");
            assert_eq!(kept(&sd, &restored, 0), b"old");
            sd.forget_lost().expect("forget the lost set");
            // The id, submitted again, starts here at attempt 1 and dies before it stores.
            sd.task_started_as(&tid("t"), Attempt(1), Some(9))
                .expect("start");
            assert!(sd.latest_checkpoint(&tid("t")).expect("read").is_none());
        }
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(seq_of(&restored, "t"), None, "{restored:?}");
        assert_eq!(restored.lost.len(), 1, "{restored:?}");
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
                piece: 0,
            };
            sd.store_checkpoint(&tid("long"), &cp).expect("checkpoint");
            sd.task_finished(&tid("short"), Attempt(1)).expect("finish");
            // "done" finished and its result was journaled, but the process died before the
            // finished hook ran.
            sd.write(
                Some(Put::new(Class::Result, Seq(1), &result(1, "done"))),
                &[],
            )
            .expect("write");
        }
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.lost, vec![TaskRef::new(tid("long"), Attempt(1))]);
        assert_eq!(restored.checkpoints.len(), 1);
        assert_eq!(kept(&sd, &restored, 0), b"5");
        drop(sd);
        // Not yet told to a coordinator: still lost on the next start.
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.lost.len(), 1);
        sd.forget_lost().expect("forget");
        // Kept until the task's next attempt here ends, or the next start.
        assert!(sd.latest_checkpoint(&tid("long")).expect("read").is_some());
        drop(sd);
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert!(restored.lost.is_empty());
        assert!(restored.checkpoints.is_empty());
        assert!(sd.latest_checkpoint(&tid("long")).expect("read").is_none());
    }

    /// An attempt whose result is journaled but whose end was never recorded (the process died
    /// between the two) is not lost at the next start, nor at a later one once its result was
    /// acknowledged and left the journal; its checkpoint goes with it.
    #[test]
    fn an_attempt_that_died_with_its_result_journaled_is_never_reported_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let sd = open_running(dir.path(), "done", b"5");
            sd.write(
                Some(Put::new(Class::Result, Seq(1), &result(1, "done"))),
                &[],
            )
            .expect("write");
        }
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert!(restored.lost.is_empty());
        assert_eq!(restored.entries.len(), 1, "the result is sent again");
        assert!(sd.latest_checkpoint(&tid("done")).expect("read").is_none());
        // The result is acknowledged: it leaves the journal.
        sd.write(None, &[Seq(1)]).expect("write");
        drop(sd);
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert!(restored.lost.is_empty(), "{:?}", restored.lost);
        assert!(restored.entries.is_empty());
        assert!(checkpoint_rows(dir.path()).is_empty());
        drop(sd);
    }

    /// The coordinator hands a lost task back: its new attempt is recorded as running and
    /// resumes from the lost attempt's checkpoint, kept under the lost attempt. A crash while
    /// it runs, after the lost set was forgotten, still finds the checkpoint at the next start,
    /// for the new attempt lost in its turn. The end of a later attempt forgets it.
    #[test]
    fn a_crash_while_a_reassigned_task_runs_on_its_lost_attempts_checkpoint_keeps_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open_running(dir.path(), "t", b"5"));
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.lost, vec![TaskRef::new(tid("t"), Attempt(1))]);
        // Registered (the lost set forgotten), then the task comes back at attempt 2, which
        // resumes from attempt 1's checkpoint: recorded as running, and the process dies before
        // attempt 2 checkpoints itself.
        sd.forget_lost().expect("forget");
        sd.task_started(&tid("t"), Attempt(2)).expect("start");
        drop(sd);
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.lost, vec![TaskRef::new(tid("t"), Attempt(2))]);
        assert_eq!(restored.checkpoints.len(), 1, "the checkpoint survived");
        assert_eq!(kept(&sd, &restored, 0), b"5");
        // Handed back once more, run to its end here: every attempt's checkpoints go.
        sd.forget_lost().expect("forget");
        sd.task_started(&tid("t"), Attempt(3)).expect("start");
        sd.task_finished(&tid("t"), Attempt(3)).expect("finish");
        assert!(checkpoint_rows(dir.path()).is_empty());
    }

    /// A newer attempt's checkpoint is kept under that attempt: the older attempt storing
    /// again does not take it back, the older attempt's end (a superseded one ending late)
    /// leaves it, and the newer attempt's end forgets it.
    #[test]
    fn a_newer_attempts_checkpoint_outlives_the_older_attempts_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = open_running(dir.path(), "t", b"5");
        let older = sd
            .latest_checkpoint(&tid("t"))
            .expect("read")
            .expect("kept");
        sd.task_started(&tid("t"), Attempt(2)).expect("start");
        let newer = checkpoint(2, b"6");
        sd.store_checkpoint(&tid("t"), &newer).expect("newer");
        sd.store_checkpoint(&tid("t"), &older).expect("older again");
        sd.task_finished(&tid("t"), Attempt(1)).expect("older ends");
        let kept = sd
            .latest_checkpoint(&tid("t"))
            .expect("read")
            .expect("kept");
        assert_eq!((kept.id, kept.attempt), (newer.id, Attempt(2)));
        assert_eq!(kept.data.as_slice(), b"6");
        sd.task_finished(&tid("t"), Attempt(2)).expect("newer ends");
        assert!(sd.latest_checkpoint(&tid("t")).expect("read").is_none());
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
        deep.result = (&nested(tether_proto::msg::MAX_RESULT_DEPTH + 1)).into();
        let WorkerMsg::TaskState(mut deep_state) = state(2, "b") else {
            unreachable!()
        };
        deep_state.state = nested(tether_proto::msg::MAX_STATE_DEPTH + 1).into();
        let s4 = state(4, "c");
        {
            let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
            sd.write(
                Some(Put::new(
                    Class::Result,
                    Seq(1),
                    &WorkerMsg::TaskResult(deep.clone()),
                )),
                &[],
            )
            .expect("write");
            sd.write(
                Some(Put::new(
                    Class::State,
                    Seq(2),
                    &WorkerMsg::TaskState(deep_state),
                )),
                &[],
            )
            .expect("write");
            sd.write(Some(Put::new(Class::State, Seq(4), &s4)), &[])
                .expect("write");
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

    /// A state directory the worker makes is its user's alone.
    #[test]
    fn a_state_directory_made_by_the_worker_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let made = dir.path().join("new").join("state");
        drop(StateDir::open(&made, &wid("w1")).expect("open"));
        let mode = std::fs::metadata(&made).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn another_worker_id_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(StateDir::open(dir.path(), &wid("w1")).expect("open"));
        let err = StateDir::open(dir.path(), &wid("w2")).expect_err("refused");
        assert!(matches!(err, StateDirError::Identity { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("w1") && msg.contains("w2"), "{msg}");
        // Refused before it changes anything: a missing checkpoint database is not made anew.
        std::fs::remove_file(dir.path().join(CHECKPOINTS_FILE)).expect("remove");
        StateDir::open(dir.path(), &wid("w2")).expect_err("refused");
        assert!(!dir.path().join(CHECKPOINTS_FILE).exists());
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

    /// A `-wal` removed after a crash (its `-shm` left; a clean close removes both) is refused,
    /// naming both, not opened without the writes it held (results not yet delivered).
    #[test]
    fn a_database_whose_write_ahead_log_was_removed_after_a_crash_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(StateDir::open(dir.path(), &wid("w1")).expect("open"));
        assert!(
            !dir.path().join("worker.db-wal").exists(),
            "a clean close removes it"
        );
        std::fs::write(dir.path().join("worker.db-shm"), b"").expect("shm");
        let err = StateDir::open(dir.path(), &wid("w1")).expect_err("refused");
        assert!(matches!(err, StateDirError::WalMissing { .. }), "{err}");
        assert!(
            err.to_string().contains("worker.db-wal is missing beside"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("worker.db-shm")).expect("rm");
        drop(StateDir::open(dir.path(), &wid("w1")).expect("opens once told"));
    }

    /// A worker killed while it made its database leaves no empty file where the database
    /// goes (which the next start refuses): it is made under another name and renamed into
    /// place, and a start after such a kill removes what that name left and starts afresh.
    #[test]
    fn a_database_made_anew_is_never_an_empty_file_and_a_killed_making_is_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        // What a kill between the file and its header left.
        std::fs::write(dir.path().join(format!("{DB_FILE}.new")), b"").expect("write");
        drop(StateDir::open(dir.path(), &wid("w1")).expect("starts afresh"));
        assert!(!dir.path().join(format!("{DB_FILE}.new")).exists());
        let made = std::fs::read(dir.path().join(DB_FILE)).expect("read");
        assert!(made.starts_with(b"SQLite format 3\0"), "{}", made.len());
        // And the made database is opened as the worker's, its next start too.
        drop(StateDir::open(dir.path(), &wid("w1")).expect("opens again"));
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

    /// A checkpoint being written (many MiB, on the blocking pool) holds nothing that the
    /// outbox journal (a push, an ack: on the runtime, under the outbox lock) or the running set
    /// needs: the session does not stall for the length of the write.
    #[test]
    fn a_checkpoint_being_written_holds_up_neither_the_journal_nor_tasks_starting_and_ending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = open_running(dir.path(), "done", b"1");
        let big = checkpoint(1, &vec![7; 8 << 20]);
        let s2 = state(2, "next");
        let (began, writing) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (done, finished) = std::sync::mpsc::channel();
        let in_time = std::thread::scope(|s| {
            // A large checkpoint half written: its lock held and its write transaction open,
            // as `store_checkpoint` holds them (bounded, not to hang a failing test).
            let (sd_, big) = (&sd, &big);
            let writer = s.spawn(move || {
                let conn = sd_.checkpoints();
                conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
                checkpoints::store(&conn, &tid("big"), big).expect("write");
                began.send(()).expect("began");
                let _ = released.recv_timeout(Duration::from_secs(30));
                conn.execute_batch("COMMIT").expect("commit");
            });
            writing
                .recv_timeout(Duration::from_secs(10))
                .expect("the write began");
            let (sd, s2) = (sd.clone(), &s2);
            s.spawn(move || {
                sd.write(
                    Some(Put::new(Class::Result, Seq(1), &result(1, "done"))),
                    &[],
                )
                .expect("write");
                sd.write(Some(Put::new(Class::State, Seq(2), s2)), &[])
                    .expect("write");
                sd.write(None, &[Seq(1)]).expect("write");
                sd.task_started(&tid("next"), Attempt(1)).expect("start");
                sd.task_finished(&tid("done"), Attempt(1)).expect("finish");
                let _ = done.send(());
            });
            let in_time = finished.recv_timeout(Duration::from_secs(5));
            release.send(()).expect("release");
            writer.join().expect("writer");
            in_time
        });
        assert!(
            in_time.is_ok(),
            "the journal and the running set waited for the checkpoint being written"
        );
        // The write landed, and the checkpoint of the attempt that ended meanwhile is gone.
        let stored = sd.latest_checkpoint(&tid("big")).expect("read");
        assert_eq!(stored.map(|c| c.data.len()), Some(8 << 20));
        assert!(sd.latest_checkpoint(&tid("done")).expect("read").is_none());
        drop(sd);
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.entries, vec![(Class::State, s2)]);
        assert_eq!(restored.lost, vec![TaskRef::new(tid("next"), Attempt(1))]);
    }

    /// Paying a debt of deletions (a large checkpoint's deletion reads its every page) holds
    /// `worker.db`'s lock only to read and to clear the debt, not while the checkpoints go: the
    /// journal does not wait for it. Here the deletion waits for another writer of
    /// `checkpoints.db` (a second connection holding its write lock) for as long as the test
    /// likes.
    #[test]
    fn paying_a_debt_of_deletions_holds_up_neither_the_journal_nor_tasks_starting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = open_running(dir.path(), "done", b"1");
        let other = Connection::open(dir.path().join(CHECKPOINTS_FILE)).expect("other");
        other.execute_batch("BEGIN IMMEDIATE").expect("begin");
        let in_time = std::thread::scope(|s| {
            let sd_ = &sd;
            let payer = s.spawn(move || sd_.task_finished(&tid("done"), Attempt(1)));
            // The payer holds the checkpoint lock once its deletion is under way (it waits in
            // SQLite for `other`, up to the connection's busy timeout).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while sd.cp_conn.try_lock().is_ok() && !payer.is_finished() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the debt was not paid"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let (done, finished) = std::sync::mpsc::channel();
            let (sd_, s2) = (sd.clone(), state(2, "next"));
            s.spawn(move || {
                sd_.write(Some(Put::new(Class::State, Seq(2), &s2)), &[])
                    .expect("write");
                sd_.task_started(&tid("next"), Attempt(1)).expect("start");
                let _ = done.send(());
            });
            let in_time = finished.recv_timeout(Duration::from_secs(2));
            other.execute_batch("COMMIT").expect("commit");
            payer.join().expect("payer").expect("finish");
            in_time
        });
        assert!(
            in_time.is_ok(),
            "the journal waited for checkpoints being deleted"
        );
        assert!(sd.latest_checkpoint(&tid("done")).expect("read").is_none());
        assert_eq!(forget_rows(&sd.conn()), 0, "the debt was cleared");
    }

    /// A state directory of schema 1 kept checkpoints in `worker.db`: the first start moves
    /// them into `checkpoints.db` and drops the table; later starts read the file.
    #[test]
    fn an_older_state_directory_has_its_checkpoints_moved_into_their_own_file_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r1 = result(1, "done");
        schema_1_state_dir(
            dir.path(),
            &["long"],
            &[("long", 1, b"5"), ("ended", 1, b"x")],
            &[(Class::Result, &r1)],
        );
        for _ in 0..2 {
            let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("open");
            assert_eq!(restored.lost, vec![TaskRef::new(tid("long"), Attempt(1))]);
            assert_eq!(restored.checkpoints.len(), 1, "{:?}", restored.checkpoints);
            assert_eq!(restored.checkpoints[0].0, tid("long"));
            assert_eq!(kept(&sd, &restored, 0), b"5");
            assert_eq!(restored.entries, vec![(Class::Result, r1.clone())]);
            assert_eq!(main_schema(&sd.conn()), (SCHEMA_VERSION, false));
            drop(sd);
            // "ended" is neither running nor lost: not kept.
            assert_eq!(checkpoint_rows(dir.path()), ["long"]);
        }
    }

    /// The moved checkpoints' space goes back to the file system: `worker.db` does not keep
    /// the dropped table's pages as free pages for ever.
    #[test]
    fn the_space_of_checkpoints_moved_out_of_worker_db_is_given_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let big = vec![7u8; 4 << 20];
        schema_1_state_dir(dir.path(), &["long"], &[("long", 1, &big)], &[]);
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("open");
        assert_eq!(restored.checkpoints[0].1.bytes, big.len() as u64);
        assert_eq!(kept(&sd, &restored, 0), big);
        let (pages, free, page_size): (i64, i64, i64) = sd
            .conn()
            .query_row(
                "SELECT page_count, freelist_count, page_size
                 FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("pragmas");
        assert_eq!(free, 0, "free pages left in worker.db");
        assert!(pages * page_size < 1 << 20, "worker.db holds {pages} pages");
        drop(sd);
        let len = std::fs::metadata(dir.path().join(DB_FILE))
            .expect("len")
            .len();
        assert!(len < 1 << 20, "worker.db is {len} bytes on disk");
    }

    /// A half-made checkpoint database beside the one in place is swept at open, its journal
    /// too, the checkpoints in place kept; a directory of that name is no file a start made,
    /// and is left, without failing the start.
    #[test]
    fn a_half_made_checkpoint_database_beside_the_one_in_place_is_swept_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let task = TaskId::parse("t").expect("id");
        let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
        sd.task_started(&task, Attempt(1)).expect("start");
        sd.store_checkpoint(&task, &checkpoint(1, b"5"))
            .expect("store");
        drop(sd);
        let new = dir.path().join("checkpoints.db.new");
        let journal = dir.path().join("checkpoints.db.new-journal");
        std::fs::write(&new, b"SQLite format 3\0 and then nothing").expect("write");
        std::fs::write(&journal, b"a journal").expect("write");
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert!(!new.exists() && !journal.exists());
        assert_eq!(kept(&sd, &restored, 0), b"5");
        drop(sd);
        std::fs::create_dir(&new).expect("mkdir");
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert!(new.is_dir(), "a directory is left");
        assert_eq!(kept(&sd, &restored, 0), b"5");
    }

    /// A start that died while moving the checkpoints of schema 1 leaves the move to the next:
    /// before the new file was in place it is made again; after, the old table's rows are
    /// copied again over the file's (the same rows) and the table is dropped.
    #[test]
    fn a_move_of_checkpoints_cut_short_is_finished_at_the_next_start() {
        // Died before the rename: a half-made file under its temporary name.
        let dir = tempfile::tempdir().expect("tempdir");
        schema_1_state_dir(dir.path(), &["long"], &[("long", 1, b"5")], &[]);
        let half_made = dir.path().join("checkpoints.db.new");
        std::fs::write(&half_made, b"SQLite format 3\0 and then nothing").expect("write");
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("open");
        assert_eq!(restored.checkpoints.len(), 1);
        assert_eq!(kept(&sd, &restored, 0), b"5");
        assert!(!half_made.exists());
        drop(sd);
        // Died after the rename: the file and the old table hold the same rows, worker.db is
        // still of schema 1.
        let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        restore_old_table(&sd.conn(), &[("long", 1, b"5")]);
        drop(sd);
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.checkpoints.len(), 1);
        assert_eq!(kept(&sd, &restored, 0), b"5");
        assert_eq!(main_schema(&sd.conn()), (SCHEMA_VERSION, false));
        assert_eq!(checkpoint_rows(dir.path()), ["long"]);
    }

    /// A start that died after the new file was in place and before the old table was dropped
    /// left `worker.db` at schema 1, which an older worker (after a rollback) opens: it keeps
    /// writing checkpoints into the old table. The next start of this version keeps them.
    #[test]
    fn checkpoints_an_older_worker_wrote_after_a_move_cut_short_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        schema_1_state_dir(dir.path(), &["long"], &[("long", 1, b"5")], &[]);
        let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
        // The older worker ran "long" again (lost at this start, at attempt 1) to "7", and
        // started "new" with its first checkpoint.
        restore_old_table(&sd.conn(), &[("long", 1, b"7"), ("new", 1, b"n")]);
        sd.conn()
            .execute_batch("INSERT INTO running (task_id, attempt) VALUES ('new', 1)")
            .expect("running");
        drop(sd);
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        let got: Vec<_> = restored
            .checkpoints
            .iter()
            .enumerate()
            .map(|(i, (t, _))| (t.as_str().to_owned(), kept(&sd, &restored, i)))
            .collect();
        assert_eq!(
            got,
            [
                ("long".to_owned(), b"7".to_vec()),
                ("new".to_owned(), b"n".to_vec())
            ]
        );
        assert_eq!(main_schema(&sd.conn()), (SCHEMA_VERSION, false));
    }

    /// `worker.db` as a start that died between the rename and the drop leaves it: the old
    /// `checkpoints` table with `rows` (task, attempt, data), schema 1.
    fn restore_old_table(conn: &Connection, rows: &[(&str, u32, &[u8])]) {
        conn.execute_batch(
            "CREATE TABLE checkpoints (
                 task_id TEXT PRIMARY KEY, checkpoint_id TEXT NOT NULL,
                 attempt INTEGER NOT NULL, data BLOB NOT NULL);
             PRAGMA user_version = 1;",
        )
        .expect("the old table");
        for (task, attempt, data) in rows {
            conn.execute(
                "INSERT INTO checkpoints VALUES (?1, ?2, ?3, ?4)",
                params![task, CheckpointId::random().as_str(), attempt, data],
            )
            .expect("row");
        }
    }

    /// An attempt that ended while another task's checkpoint was being written leaves its
    /// checkpoint's deletion owed; the task runs again here, at a newer attempt, and the
    /// process is killed. At the next start the newer attempt is lost, and is not handed the
    /// ended attempt's checkpoint as its own.
    #[test]
    fn an_ended_attempts_checkpoint_is_not_restored_for_a_newer_attempt_after_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let sd = open_running(dir.path(), "t", b"c1");
            // Another task's checkpoint being written when the process dies.
            let _writing = sd.cp_conn.lock().expect("lock");
            sd.task_finished(&tid("t"), Attempt(1)).expect("finish");
            sd.task_started(&tid("t"), Attempt(2)).expect("start");
        }
        assert_eq!(checkpoint_rows(dir.path()), ["t"], "the deletion waited");
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.lost, vec![TaskRef::new(tid("t"), Attempt(2))]);
        assert!(
            restored.checkpoints.is_empty(),
            "{:?}",
            restored.checkpoints
        );
        assert!(checkpoint_rows(dir.path()).is_empty());
        assert_eq!(forget_rows(&sd.conn()), 0, "the debt is paid once");
    }

    /// The rows of `worker.db`'s `forget` table (deletions owed to `checkpoints.db`).
    fn forget_rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM forget", [], |r| r.get(0))
            .expect("forget")
    }

    /// A deletion asked while a checkpoint is being written finds its lock busy and is left to
    /// the writer, which may have settled what was owed already: it settles again as it
    /// releases the lock, not at the next use of the lock (which may never come).
    #[test]
    fn a_deletion_asked_while_a_checkpoint_is_written_is_done_when_the_write_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sd = open_running(dir.path(), "t", b"c1");
        {
            // As store_checkpoint holds it after its last settle, before it returns.
            let mut writing = sd.checkpoints();
            sd.settle(&mut writing);
            sd.task_finished(&tid("t"), Attempt(1)).expect("finish");
            sd.forget_lost().expect("forget");
            assert_eq!(checkpoint_rows(dir.path()), ["t"], "the lock was busy");
        }
        assert!(checkpoint_rows(dir.path()).is_empty());
        assert_eq!(forget_rows(&sd.conn()), 0);
        assert!(!sd.owed.load(Ordering::SeqCst));
        // And through store_checkpoint: another task's write, with a deletion asked during it
        // (from another thread, while the lock is held).
        sd.task_started(&tid("u"), Attempt(1)).expect("start");
        sd.store_checkpoint(&tid("u"), &checkpoint(1, b"u"))
            .expect("checkpoint");
        std::thread::scope(|s| {
            let writing = sd.checkpoints();
            s.spawn(|| sd.task_finished(&tid("u"), Attempt(1)).expect("finish"))
                .join()
                .expect("finisher");
            assert_eq!(checkpoint_rows(dir.path()), ["u"], "the lock was busy");
            drop(writing);
        });
        assert!(checkpoint_rows(dir.path()).is_empty());
        assert_eq!(forget_rows(&sd.conn()), 0);
    }

    /// Two attempts of a task can both be storing checkpoints (the newer starts when the older
    /// has not ended within the predecessor grace): the older's never replaces the newer's.
    #[test]
    fn an_older_attempts_checkpoint_never_replaces_a_newer_attempts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
        let latest = |sd: &StateDir| {
            let cp = sd
                .latest_checkpoint(&tid("t"))
                .expect("read")
                .expect("kept");
            (cp.attempt.0, cp.data.to_vec())
        };
        sd.store_checkpoint(&tid("t"), &checkpoint(1, b"a"))
            .expect("checkpoint");
        sd.store_checkpoint(&tid("t"), &checkpoint(2, b"b"))
            .expect("checkpoint");
        assert_eq!(latest(&sd), (2, b"b".to_vec()));
        sd.store_checkpoint(&tid("t"), &checkpoint(1, b"late"))
            .expect("checkpoint");
        assert_eq!(
            latest(&sd),
            (2, b"b".to_vec()),
            "the older attempt's is dropped"
        );
        sd.store_checkpoint(&tid("t"), &checkpoint(2, b"c"))
            .expect("checkpoint");
        assert_eq!(latest(&sd), (2, b"c".to_vec()));
        sd.store_checkpoint(&tid("t"), &checkpoint(3, b"d"))
            .expect("checkpoint");
        assert_eq!(latest(&sd), (3, b"d".to_vec()));
    }

    /// A checkpoint that cannot be stored (the disk is full: here the database may not grow)
    /// takes the task's older one with it; kept, it would be the resume point after a crash,
    /// taken for newer than the coordinator's since it differs from it. Another task's stays.
    #[test]
    fn a_checkpoint_that_cannot_be_stored_takes_the_older_one_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sd, _) = StateDir::open(dir.path(), &wid("w1")).expect("open");
        sd.store_checkpoint(&tid("t"), &checkpoint(1, b"first"))
            .expect("checkpoint");
        sd.store_checkpoint(&tid("u"), &checkpoint(2, b"another task's"))
            .expect("checkpoint");
        {
            let conn = locked(&sd.cp_conn);
            let pages: i64 = conn
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .expect("pages");
            conn.pragma_update(None, "max_page_count", pages)
                .expect("full");
        }
        let big = vec![7u8; 1 << 20];
        let full = sd.store_checkpoint(&tid("t"), &checkpoint(1, &big));
        assert!(full.is_err(), "the disk is full");
        assert!(sd.latest_checkpoint(&tid("t")).expect("read").is_none());
        let kept = sd
            .latest_checkpoint(&tid("u"))
            .expect("read")
            .expect("kept");
        assert_eq!(kept.data.as_slice(), b"another task's");
    }

    /// A `checkpoints.db` moved away without its `-wal` and `-shm` (a killed worker left them):
    /// the file made anew is empty, not the old one's pages replayed from that WAL.
    #[test]
    fn a_checkpoint_database_moved_away_without_its_wal_is_made_anew_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let killed = tempfile::tempdir().expect("tempdir");
        {
            let _sd = open_running(dir.path(), "long", b"5");
            // The directory as a kill -9 leaves it: each database with its WAL not checkpointed.
            for entry in std::fs::read_dir(dir.path()).expect("read dir") {
                let entry = entry.expect("entry");
                if entry.file_type().expect("type").is_file() {
                    std::fs::copy(entry.path(), killed.path().join(entry.file_name()))
                        .expect("copy");
                }
            }
        }
        let wal = killed.path().join("checkpoints.db-wal");
        assert!(
            std::fs::metadata(&wal).expect("a WAL left").len() > 0,
            "the WAL holds frames"
        );
        std::fs::remove_file(killed.path().join(CHECKPOINTS_FILE)).expect("move away");
        let (sd, restored) = StateDir::open(killed.path(), &wid("w1")).expect("made anew");
        assert_eq!(restored.lost, vec![TaskRef::new(tid("long"), Attempt(1))]);
        assert!(restored.checkpoints.is_empty());
        assert!(sd.latest_checkpoint(&tid("long")).expect("read").is_none());
        sd.store_checkpoint(&tid("long"), &checkpoint(1, b"6"))
            .expect("usable");
        drop(sd);
        let (sd, restored) = StateDir::open(killed.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.checkpoints.len(), 1);
        assert_eq!(kept(&sd, &restored, 0), b"6");
    }

    /// A database of a newer schema (a newer worker ran on the directory) is refused, and
    /// neither file is changed.
    #[test]
    fn a_newer_schema_of_either_database_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let _sd = open_running(dir.path(), "long", b"5");
        }
        let files = |dir: &Path| {
            [DB_FILE, CHECKPOINTS_FILE].map(|f| std::fs::read(dir.join(f)).expect("read"))
        };
        for (file, old) in [
            (DB_FILE, SCHEMA_VERSION),
            (CHECKPOINTS_FILE, checkpoints::SCHEMA_VERSION),
        ] {
            let newer = old + 1;
            let side = Connection::open(dir.path().join(file)).expect("open");
            side.pragma_update(None, "user_version", newer)
                .expect("version");
            drop(side);
            let before = files(dir.path());
            let err = StateDir::open(dir.path(), &wid("w1")).expect_err("refused");
            assert!(
                matches!(&err, StateDirError::Newer { path, found, .. }
                    if path.ends_with(file) && *found == newer),
                "{err}"
            );
            assert!(files(dir.path()) == before, "{file}: untouched");
            let side = Connection::open(dir.path().join(file)).expect("open");
            side.pragma_update(None, "user_version", old)
                .expect("version");
        }
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("open");
        assert_eq!(restored.checkpoints.len(), 1);
    }

    /// A `worker.db` of schema 1 made without a `checkpoints` table (none was ever written):
    /// opened, with an empty `checkpoints.db`.
    #[test]
    fn a_schema_1_worker_db_without_a_checkpoints_table_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r1 = result(1, "done");
        schema_1_state_dir(dir.path(), &["long"], &[], &[(Class::Result, &r1)]);
        Connection::open(dir.path().join(DB_FILE))
            .expect("open")
            .execute_batch("DROP TABLE checkpoints")
            .expect("drop");
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("open");
        assert_eq!(restored.lost, vec![TaskRef::new(tid("long"), Attempt(1))]);
        assert!(restored.checkpoints.is_empty());
        assert_eq!(restored.entries, vec![(Class::Result, r1)]);
        assert_eq!(main_schema(&sd.conn()), (SCHEMA_VERSION, false));
        assert!(checkpoint_rows(dir.path()).is_empty());
    }

    /// `forget_lost` and `task_finished` change `worker.db` first and `checkpoints.db` second,
    /// and two files share no transaction. A crash between the steps (here: step two waits
    /// for a checkpoint being written, and the process dies meanwhile) leaves checkpoints that
    /// no task needs, and the next start sweeps them away; a task still lost always keeps its
    /// checkpoint.
    #[test]
    fn a_crash_between_forgetting_tasks_and_their_checkpoints_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let _sd = open_running(dir.path(), "long", b"5");
        }
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.checkpoints.len(), 1);
        sd.task_started(&tid("next"), Attempt(1)).expect("start");
        sd.store_checkpoint(&tid("next"), &checkpoint(1, b"n"))
            .expect("checkpoint");
        {
            // Held as by a writer when the process dies: never released, so nothing settles.
            let _writing = sd.cp_conn.lock().expect("lock");
            sd.forget_lost().expect("forget");
            sd.task_finished(&tid("next"), Attempt(1)).expect("finish");
            // Step one of each is on disk; the process dies before step two.
            assert_eq!(main_schema(&sd.conn()).0, SCHEMA_VERSION);
            let lost: i64 = sd
                .conn()
                .query_row("SELECT count(*) FROM lost", [], |r| r.get(0))
                .expect("lost");
            assert_eq!(lost, 0);
        }
        drop(sd);
        assert_eq!(checkpoint_rows(dir.path()), ["long", "next"]);
        let (sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert!(restored.lost.is_empty(), "{:?}", restored.lost);
        assert!(restored.checkpoints.is_empty());
        assert!(checkpoint_rows(dir.path()).is_empty());
        // Without a crash: the lost tasks' checkpoints go, the running tasks' stay.
        sd.task_started(&tid("run"), Attempt(1)).expect("start");
        sd.store_checkpoint(&tid("run"), &checkpoint(1, b"r"))
            .expect("checkpoint");
        sd.forget_lost().expect("forget");
        assert!(sd.latest_checkpoint(&tid("run")).expect("read").is_some());
        drop(sd);
        // A task running at a crash is lost with its checkpoint: forget_lost left it alone.
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("reopen");
        assert_eq!(restored.lost, vec![TaskRef::new(tid("run"), Attempt(1))]);
        assert_eq!(restored.checkpoints.len(), 1);
    }

    #[test]
    fn a_corrupt_or_emptied_checkpoint_database_is_refused_and_a_missing_one_made_anew() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let sd = open_running(dir.path(), "long", b"5");
            sd.write(
                Some(Put::new(Class::Result, Seq(1), &result(1, "done"))),
                &[],
            )
            .expect("write");
        }
        let path = dir.path().join(CHECKPOINTS_FILE);
        let junk = b"this is not a sqlite database, not at all, not even close....".repeat(100);
        for (content, says) in [(&junk[..], "checkpoints.db"), (b"", "the file is empty")] {
            std::fs::write(&path, content).expect("write");
            let err = StateDir::open(dir.path(), &wid("w1")).expect_err("refused");
            assert!(matches!(err, StateDirError::Corrupt { .. }), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("checkpoints.db") && msg.contains(says),
                "{msg}"
            );
            assert_eq!(std::fs::read(&path).expect("read"), content, "untouched");
        }
        // Moved away: the worker starts without the checkpoints, with the rest of its state
        // (the running task is lost at this start, not at a refused one).
        std::fs::remove_file(&path).expect("remove");
        let (_sd, restored) = StateDir::open(dir.path(), &wid("w1")).expect("made anew");
        assert_eq!(restored.lost, vec![TaskRef::new(tid("long"), Attempt(1))]);
        assert!(restored.checkpoints.is_empty());
        assert_eq!(restored.entries.len(), 1);
        assert!(checkpoint_rows(dir.path()).is_empty());
    }
}
