//! Schema, version checks and migrations.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use tether_proto::task::ConnStats;
pub(super) use tether_proto::whole_file::sibling;
use tether_proto::{Attempt, Outcome, TaskId, TaskSpec, TaskStatus, WorkerId};

use super::StoreError;
use crate::model::{AttemptRecord, CheckpointMeta, Lease, Task, Worker, WorkerState};

/// The schema version this coordinator writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 9;

/// The version from which every state journal file in the data directory was created whole
/// (`store::states`): one shorter than its header is damage, not a crash. A coordinator of an
/// earlier version could leave such a file (a crash, or a failed write, between creating the
/// file and writing its header), holding no state; its journals are read as it wrote them,
/// and the version is set only once they are replayed and removed.
///
/// So `store::open` migrates to version 4 before it replays the journals, and to the newest
/// after. A future migration (version 6 on) therefore runs after the replay, which writes
/// `task_state` as this code knows it: a migration that changes that table must either keep
/// what the replay writes valid or move this marker out of the version (a row of its own,
/// written after the replay), so that every table migration runs first.
pub(super) const WHOLE_JOURNALS: i64 = 5;

/// Migrations from version N-1 to N, by index.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    submit_seq INTEGER NOT NULL,
    finished_at TEXT,
    doc TEXT NOT NULL
);
CREATE INDEX tasks_status ON tasks (status);
CREATE TABLE results (
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT NOT NULL,
    outcome TEXT NOT NULL,
    stale INTEGER NOT NULL,
    body TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
CREATE TABLE task_state (
    task_id TEXT PRIMARY KEY,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE checkpoints (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    complete INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX checkpoints_task ON checkpoints (task_id);
CREATE TABLE checkpoint_chunks (
    checkpoint_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (checkpoint_id, idx)
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL
);
"#,
    // Version 2: the spec is written once, in its own column, and `doc` holds the task's
    // changing part (`TaskDoc`), so a lease or a finish does not rewrite the spec. The status
    // index was never read and cost two index writes per status change.
    r#"
ALTER TABLE tasks ADD COLUMN spec TEXT;
UPDATE tasks SET spec = json_extract(doc, '$.spec'), doc = json_remove(doc, '$.spec');
DROP INDEX tasks_status;
"#,
    // Version 3: state updates are appended to a log (one row after the other, a few pages a
    // commit) and folded into `task_state` now and then, instead of an update in place per
    // state, which dirtied a page per row.
    r#"
CREATE TABLE task_state_log (
    seq INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"#,
    // Version 4: states are journaled in a file of their own (`store::states`); the log's
    // newest state of each task is folded into `task_state` and the log goes.
    r#"
INSERT INTO task_state (task_id, attempt, state, updated_at)
SELECT task_id, attempt, state, updated_at FROM task_state_log
WHERE seq IN (SELECT max(seq) FROM task_state_log GROUP BY task_id)
ON CONFLICT(task_id) DO UPDATE SET attempt = excluded.attempt, state = excluded.state, updated_at = excluded.updated_at;
DROP TABLE task_state_log;
"#,
    // Version 5: no change to the tables. State journal files are created whole (written
    // under a temporary name, synced, renamed): see `WHOLE_JOURNALS`.
    "",
    // Version 6: the next submission number, kept when retention removes tasks (the newest
    // among them may have held the highest number: reused, it would break `after_seq` paging).
    r#"
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"#,
    // Version 7: no change to the tables. A checkpoint pruned while a lease runs keeps its row
    // as `complete = 2` (no pieces), so that a replay of it is known after a restart. A
    // coordinator of version 6 reads only 0 and 1: it would neither recognise such a replay nor
    // ever delete those rows, so it refuses this database (`StoreError::TooNew`).
    "",
    // Version 8: the ids of tasks removed by retention, with their last attempt: a task
    // submitted later under one of them numbers its attempts after it (`Task::attempt_base`).
    // A coordinator of version 7 would number them from 1 again, so it refuses this database.
    r#"
CREATE TABLE IF NOT EXISTS removed_tasks (
    id TEXT PRIMARY KEY,
    last_attempt INTEGER NOT NULL
);
"#,
    // Version 9: when each id was removed (Unix milliseconds; rows of version 8 take the
    // migration's time), so that ids removed longer than the retention ago are forgotten
    // (`Mutation::ForgetRemoved`). A coordinator of version 8 would never forget them, nor
    // write the time of its own removals, so it refuses this database.
    // Made anew rather than altered, so that it runs again without failing, as the others.
    r#"
DROP TABLE IF EXISTS removed_tasks_9;
CREATE TABLE removed_tasks_9 (
    id TEXT PRIMARY KEY,
    last_attempt INTEGER NOT NULL,
    removed_at_ms INTEGER NOT NULL
);
INSERT INTO removed_tasks_9 (id, last_attempt, removed_at_ms)
    SELECT id, last_attempt, CAST(strftime('%s', 'now') AS INTEGER) * 1000 FROM removed_tasks;
DROP TABLE removed_tasks;
ALTER TABLE removed_tasks_9 RENAME TO removed_tasks;
CREATE INDEX removed_tasks_at ON removed_tasks (removed_at_ms);
"#,
];

/// The writer connection's page cache: the task tables, `task_state` among them (a fold round
/// rewrites the rows of every task with a new state).
const WRITER_CACHE_KIB: u32 = 64 * 1024;

/// Checks the database at `path` read-only, refusing a corrupt file or a newer schema without
/// changing it; returns its schema version (0 when there is no database yet).
pub(super) fn check(path: &Path) -> Result<i64, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    if !path.exists() {
        return Ok(0);
    }
    // A clean close removes both; a crash leaves both. The shared-memory file without the log
    // means the log was removed by hand (they look like temporary files), and with it the
    // latest commits: SQLite would open the database without them, silently.
    let (wal, shm) = (sibling(path, "-wal"), sibling(path, "-shm"));
    if shm.exists() && !wal.exists() {
        return Err(StoreError::WalMissing { wal, shm });
    }
    // The coordinator writes them all: one it cannot open is named as such, not taken for a
    // corrupt database (SQLite says "unable to open database file" of a WAL it cannot open).
    for suffix in ["", "-wal", "-shm"] {
        let file = sibling(path, suffix);
        if let Err(source) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            && source.kind() != std::io::ErrorKind::NotFound
            && !file.is_dir()
        {
            return Err(StoreError::Access { path: file, source });
        }
    }
    // SQLite would take an empty file for a new database and a directory for a disk error.
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => return Err(corrupt("it is a directory, not a file".into())),
        Ok(m) if m.len() == 0 => {
            return Err(corrupt(
                "the file is empty: every database tether made holds at least its header; \
                 if this data directory is new, delete the empty file"
                    .into(),
            ));
        }
        _ => {}
    }
    // Read-only, so that a file we refuse is left exactly as it was.
    let ro =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(open_err)?;
    // The first read of a database in WAL mode makes its WAL index (`-shm`), which needs room:
    // a full disk is not a corrupt database. Nor is a file SQLite cannot open or read (its
    // `-wal` a directory, an I/O error): named as SQLite says it, not called corrupt with
    // advice to move good data away. Only what SQLite finds damaged is corrupt.
    let unread = |e: rusqlite::Error| {
        super::space::or_out_of_space(&ro, path, e, |e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
                corrupt(e.to_string())
            }
            _ => StoreError::Sql {
                path: path.to_owned(),
                source: e,
            },
        })
    };
    let version: i64 = ro
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(unread)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    let check: String = ro
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(unread)?;
    if check != "ok" {
        return Err(corrupt(check));
    }
    Ok(version)
}

/// Creates the database at `path` with [`super::FILE_MODE`] whatever the umask, unless it
/// exists. SQLite makes a new database with 0644 less the umask, and gives its `-wal` and
/// `-shm` the database file's mode when it makes them (umask or not): so a database made here
/// keeps all three private. Made whole under another name (`path` with `.new`), its header
/// written, then renamed into place: a coordinator killed while making it leaves that name,
/// which the next start removes, never an empty file at `path`, which [`check`] refuses as an
/// emptied database (made at `path` itself, a SIGKILL between the file and its header left a
/// data directory the coordinator would not start on until the file was deleted by hand).
fn create_private(path: &Path) -> Result<(), StoreError> {
    use tether_proto::whole_file::{Failed, create_whole};
    // Anything there, a dangling link too, is left to SQLite: it says what it cannot open.
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    // WAL mode is kept in the header, which setting it writes: the file is a database.
    let wal = |new: &Path| {
        let conn = Connection::open(new).map_err(|source| StoreError::Open {
            path: new.to_owned(),
            source,
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| {
                super::space::or_out_of_space(&conn, new, e, |source| StoreError::Sql {
                    path: new.to_owned(),
                    source,
                })
            })
    };
    create_whole(path, super::FILE_MODE, wal).map_err(|e| match e {
        Failed::Io { path, source } if super::space::io_out_of_space(&source) => {
            StoreError::OutOfSpace {
                path,
                source: super::WriteError::Dir(source),
            }
        }
        Failed::Io { path, source } => StoreError::Access { path, source },
        Failed::Fill(e) => e,
    })
}

/// Opens the database at `path` (passed by [`check`]) for writing, switches to WAL and applies
/// pending migrations up to version `through`.
pub(super) fn open_checked(path: &Path, through: i64) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    create_private(path)?;
    let conn = Connection::open(path).map_err(open_err)?;
    let sql = |source| {
        super::space::or_out_of_space(&conn, path, source, |source| StoreError::Sql {
            path: path.to_owned(),
            source,
        })
    };
    // WAL with synchronous=NORMAL: a commit survives the death of the process (kill -9);
    // `--durability machine` sets FULL (super::set_durability, from the writer's options;
    // docs/OPERATIONS.md).
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF; PRAGMA busy_timeout = 5000;",
    )
    .map_err(sql)?;
    // This is the writer's connection. Its page cache holds the tables a fold of the states
    // rewrites (SQLite's default of 2 MiB made the fold read evicted pages back with a
    // syscall each); statement journals (the fold's upserts among them) stay in
    // memory rather than in a temporary file. Both only as used: an idle coordinator's cache
    // stays small.
    conn.execute_batch(&format!(
        "PRAGMA cache_size = -{WRITER_CACHE_KIB}; PRAGMA temp_store = MEMORY;"
    ))
    .map_err(sql)?;
    migrate(&conn, path, through)?;
    Ok(conn)
}

/// Applies the migrations of `conn`'s database (at `path`) up to version `through`.
pub(super) fn migrate(conn: &Connection, path: &Path, through: i64) -> Result<(), StoreError> {
    let sql = |source| {
        super::space::or_out_of_space(conn, path, source, |source| StoreError::Sql {
            path: path.to_owned(),
            source,
        })
    };
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    for (i, migration) in MIGRATIONS.iter().enumerate() {
        let to = i as i64 + 1;
        if version < to && to <= through {
            let tx = conn.unchecked_transaction().map_err(sql)?;
            tx.execute_batch(migration).map_err(sql)?;
            tx.execute_batch(&format!("PRAGMA user_version = {to};"))
                .map_err(sql)?;
            tx.commit().map_err(sql)?;
            // At debug: the store's opening says the lot in one line (`store::open`).
            tracing::debug!(db = %path.display(), version = to, "database migration applied");
        }
    }
    Ok(())
}

/// The persisted part of a worker.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct WorkerDoc {
    worker_id: WorkerId,
    capabilities: BTreeSet<String>,
    tags: BTreeMap<String, String>,
    slots: u32,
    executors: BTreeSet<String>,
    boot_id: String,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    sessions: u64,
    stats: Option<ConnStats>,
    /// When `stats` was reported (absent in records of older coordinators: then `last_seen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stats_at: Option<DateTime<Utc>>,
    /// `lost` or `stopped`, which a restart keeps; absent for the others (and in records of
    /// older coordinators), which a restart makes `disconnected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ended: Option<WorkerState>,
    /// Saved while a session was open (absent in records of older coordinators): a restart
    /// takes it to have been there until the previous run was last known alive.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disconnected_at: Option<DateTime<Utc>>,
    /// The process said it is stopping (absent in records of older coordinators, which lost
    /// it at a restart: the process, come back to hand back what it holds, was leased tasks it
    /// never ran, each using up an attempt).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    stopping: bool,
    /// Drained by an operator (absent in records of older coordinators, which had no drain).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    draining: bool,
    /// Processes a newer one replaced (absent in records of older coordinators, which forgot
    /// them at a restart: the older process, registering again first, took the id back and
    /// the newer one was refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    superseded: Vec<String>,
}

impl WorkerDoc {
    pub(super) fn from_worker(w: &Worker) -> Self {
        Self {
            worker_id: w.worker_id.clone(),
            capabilities: w.capabilities.clone(),
            tags: w.tags.clone(),
            slots: w.slots,
            executors: w.executors.clone(),
            boot_id: w.boot_id.clone(),
            first_seen: w.first_seen,
            last_seen: w.last_seen,
            sessions: w.sessions,
            stats: w.stats.as_ref().map(|r| r.stats.clone()),
            stats_at: w.stats.as_ref().map(|r| r.reported_at),
            ended: matches!(w.state, WorkerState::Lost | WorkerState::Stopped).then_some(w.state),
            connected: w.state == WorkerState::Connected,
            disconnected_at: w.disconnected_at,
            stopping: w.stopping,
            draining: w.draining,
            superseded: w.superseded.clone(),
        }
    }

    /// A worker loaded at start is disconnected, its grace period starting now, unless it
    /// was lost or stopped: a restart does not bring those back to lose them again. One
    /// connected when last saved was seen until `alive_at`, when the previous run last said it
    /// was alive with its sessions open: its session ended with that run.
    pub(super) fn into_worker(self, alive_at: Option<DateTime<Utc>>) -> Worker {
        let mut w = Worker::new(self.worker_id, Utc::now());
        w.capabilities = self.capabilities;
        w.tags = self.tags;
        w.slots = self.slots;
        w.executors = self.executors;
        w.boot_id = self.boot_id;
        w.first_seen = self.first_seen;
        w.last_seen = self.last_seen;
        w.sessions = self.sessions;
        w.stopping = self.stopping;
        w.draining = self.draining;
        w.superseded = self.superseded;
        let reported_at = self.stats_at.unwrap_or(self.last_seen);
        w.stats = self
            .stats
            .map(|stats| Box::new(crate::model::Reported { stats, reported_at }));
        w.state = self.ended.unwrap_or(WorkerState::Disconnected);
        match alive_at.filter(|_| self.connected) {
            Some(alive) => {
                w.last_seen = w.last_seen.max(alive);
                w.disconnected_at = Some(w.last_seen);
            }
            None => w.disconnected_at = self.disconnected_at.or(w.disconnected_at),
        }
        w
    }
}

/// The changing part of a task as stored in `tasks.doc` (the spec has its own column, written
/// once at submission). Field names and rules follow [`Task`]'s serde form.
#[derive(Serialize)]
pub(super) struct TaskDoc<'a> {
    task_id: &'a TaskId,
    status: TaskStatus,
    attempt: Attempt,
    #[serde(skip_serializing_if = "Attempt::is_zero")]
    attempt_base: Attempt,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<&'a Lease>,
    submit_seq: u64,
    submitted_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latest_checkpoint: Option<&'a CheckpointMeta>,
    attempts: &'a [AttemptRecord],
    #[serde(skip_serializing_if = "Option::is_none")]
    retried_by: Option<&'a TaskId>,
}

impl<'a> TaskDoc<'a> {
    pub(super) fn of(t: &'a Task) -> Self {
        Self {
            task_id: &t.task_id,
            status: t.status,
            attempt: t.attempt,
            attempt_base: t.attempt_base,
            lease: t.lease.as_ref(),
            submit_seq: t.submit_seq,
            submitted_at: t.submitted_at,
            updated_at: t.updated_at,
            finished_at: t.finished_at,
            outcome: t.outcome,
            error: t.error.as_deref(),
            latest_checkpoint: t.latest_checkpoint.as_deref(),
            attempts: &t.attempts,
            retried_by: t.retried_by.as_ref(),
        }
    }
}

/// [`TaskDoc`] read back.
#[derive(Deserialize)]
pub(super) struct LoadedTaskDoc {
    task_id: TaskId,
    status: TaskStatus,
    attempt: Attempt,
    #[serde(default)]
    attempt_base: Attempt,
    lease: Option<Lease>,
    submit_seq: u64,
    submitted_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    outcome: Option<Outcome>,
    error: Option<String>,
    latest_checkpoint: Option<CheckpointMeta>,
    #[serde(default)]
    attempts: Vec<AttemptRecord>,
    #[serde(default)]
    retried_by: Option<TaskId>,
}

impl LoadedTaskDoc {
    pub(super) fn with_spec(self, spec: TaskSpec) -> Task {
        Task {
            task_id: self.task_id,
            spec: std::sync::Arc::new(spec),
            status: self.status,
            attempt: self.attempt,
            attempt_base: self.attempt_base,
            lease: self.lease,
            submit_seq: self.submit_seq,
            submitted_at: self.submitted_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            outcome: self.outcome,
            error: self.error,
            latest_checkpoint: self.latest_checkpoint.map(Box::new),
            attempts: self.attempts,
            env_redacted: false,
            lease_started: None,
            retried_by: self.retried_by,
        }
    }
}
