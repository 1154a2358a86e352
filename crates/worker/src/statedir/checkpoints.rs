//! `checkpoints.db`: the latest checkpoint of each task, in a database of its own so that a
//! checkpoint being written (many MiB, on the blocking pool) holds neither a lock nor SQLite's
//! one writer that the outbox journal and the running set in `worker.db` need.
//!
//! Made whole before it is there: a missing file is built as `checkpoints.db.new` (rollback
//! journal, synced at commit) and renamed into place, so a start that dies while making it
//! leaves no file, never an empty or half-made one. A state directory of schema 1 kept its
//! checkpoints in `worker.db`: they are copied into the new file, and the old table is dropped
//! (and `worker.db` marked schema 2, its space given back by a `VACUUM`) only once the file
//! is in place. A start that finds both the file and the old table (one died between the
//! two) copies the table's rows again, over the file's, before dropping it: nothing of this
//! version writes the file while the table exists, and an older worker run since (after a
//! rollback) wrote its newer checkpoints into the table. A missing file's `-wal` and `-shm`, left by a killed process, are removed before
//! it is made, or SQLite would replay the old file's pages into the new one. A
//! `checkpoints.db.new` (and its journal) found beside a file in place is swept at open too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};
use tether_proto::{Attempt, CheckpointId, TaskId};

use super::StateDirError;
use crate::executor::StoredCheckpoint;

/// File name of the checkpoint database.
pub const CHECKPOINTS_FILE: &str = "checkpoints.db";
/// Schema version of the checkpoint database (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS checkpoints (
    task_id TEXT PRIMARY KEY, checkpoint_id TEXT NOT NULL, attempt INTEGER NOT NULL,
    data BLOB NOT NULL);
";

/// Opens the checkpoint database of `dir`, making it (from the checkpoints of an older
/// `worker.db`, if `main` holds any) when it is missing, and marks `main` as keeping its
/// checkpoints there. `version` is `main`'s schema version as found.
pub(super) fn open(
    dir: &Path,
    main: &mut Connection,
    main_path: &Path,
    version: i64,
) -> Result<(Connection, PathBuf), StateDirError> {
    let path = dir.join(CHECKPOINTS_FILE);
    let old_table: bool = main
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoints'",
            [],
            |r| r.get(0),
        )
        .map_err(StateDirError::db(main_path))?;
    let created = match std::fs::metadata(&path) {
        Ok(_) => {
            sweep_half_made(&path);
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if version >= super::SCHEMA_VERSION {
                // Removed by hand (a start never leaves it missing once it was made): like a
                // missing worker.db, it is started afresh. What it held is gone; the tasks lost
                // with the previous process resume from the coordinator's copy, or afresh.
                tracing::warn!(path = %path.display(), "the checkpoint database is missing: started without the checkpoints it held");
            }
            // Its -wal and -shm, if left behind, are not replayed into the new file.
            super::remove_stale_wal(&path)?;
            create(&path, main, main_path, old_table)?;
            true
        }
        Err(e) => return Err(StateDirError::io(&path)(e)),
    };
    let (mut conn, _) = super::open_db(&path, SCHEMA, SCHEMA_VERSION)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(StateDirError::db(&path))?;
    if old_table && !created {
        // A start died after the rename and before the drop, and an older worker may have run
        // since, writing newer checkpoints into the old table: they are copied again, over the
        // file's (which nothing wrote since the rename: this version drops the table first).
        let tx = conn.transaction().map_err(StateDirError::db(&path))?;
        copy_old(main, main_path, &tx, &path)?;
        tx.commit().map_err(StateDirError::db(&path))?;
    }
    if old_table || version < super::SCHEMA_VERSION {
        let tx = main.transaction().map_err(StateDirError::db(main_path))?;
        tx.execute_batch("DROP TABLE IF EXISTS checkpoints")
            .and_then(|_| tx.pragma_update(None, "user_version", super::SCHEMA_VERSION))
            .and_then(|_| tx.commit())
            .map_err(StateDirError::db(main_path))?;
    }
    if old_table {
        // The dropped table's pages stay in worker.db as free pages, up to all the
        // checkpoints it held: given back to the file system once. Not fatal: the journal
        // reuses free pages, and the next start of this version finds no table to drop.
        if let Err(error) = main.execute_batch("VACUUM") {
            tracing::warn!(path = %main_path.display(), %error, "could not give back the space of the moved checkpoints");
        }
    }
    Ok((conn, path))
}

/// Makes the checkpoint database at `path`, with the rows of `main`'s `checkpoints` table if
/// `copy`, under another name first and then renamed into place.
fn create(
    path: &Path,
    main: &Connection,
    main_path: &Path,
    copy: bool,
) -> Result<(), StateDirError> {
    let new = path.with_extension(HALF_MADE);
    let (io, db) = (StateDirError::io, StateDirError::db);
    // Left by a start that died while making it.
    for stale in half_made(path) {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&stale)(e)),
            _ => {}
        }
    }
    {
        // Its rollback journal takes its mode, and so does the file renamed into place.
        super::private::create_file(&new).map_err(io(&new))?;
        let mut conn = Connection::open(&new).map_err(db(&new))?;
        let tx = conn.transaction().map_err(db(&new))?;
        tx.execute_batch(SCHEMA)
            .and_then(|_| tx.pragma_update(None, "user_version", SCHEMA_VERSION))
            .map_err(db(&new))?;
        if copy {
            copy_old(main, main_path, &tx, &new)?;
        }
        tx.commit().map_err(db(&new))?;
    }
    std::fs::File::open(&new)
        .and_then(|f| f.sync_all())
        .map_err(io(&new))?;
    std::fs::rename(&new, path).map_err(io(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The extension of the checkpoint database while it is made ([`create`]).
const HALF_MADE: &str = "db.new";

/// The files of a checkpoint database at `path` being made: the file, and its rollback
/// journal.
fn half_made(path: &Path) -> [PathBuf; 2] {
    let new = path.with_extension(HALF_MADE);
    let mut journal = new.clone().into_os_string();
    journal.push("-journal");
    [new, PathBuf::from(journal)]
}

/// Removes what a making of the checkpoint database at `path` left, now that the database is
/// in place (a crash after its rename whose directory entries were not all on disk, or a
/// file restored by hand after a start died making it): nothing else ever would, and the file
/// may hold every checkpoint of the directory. Called under the state directory's lock, so
/// no start is making it meanwhile; only these two names are touched, and only a file (a
/// directory of that name, or anything that cannot be removed, stays, with a warning): a
/// failure costs disk space, not the start.
fn sweep_half_made(path: &Path) {
    for stale in half_made(path) {
        let Ok(meta) = std::fs::symlink_metadata(&stale) else {
            continue;
        };
        let removed = match meta.is_dir() {
            true => Err(std::io::Error::other("it is a directory")),
            false => std::fs::remove_file(&stale),
        };
        match removed {
            Ok(()) => {
                tracing::warn!(path = %stale.display(), bytes = meta.len(), "removed, left by a start that died making the checkpoint database");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %stale.display(), %error, "cannot remove what a start that died making the checkpoint database left");
            }
        }
    }
}

/// Copies the rows of `main`'s old `checkpoints` table into `to` (at `to_path`), over the rows
/// it holds of the same tasks.
fn copy_old(
    main: &Connection,
    main_path: &Path,
    to: &Connection,
    to_path: &Path,
) -> Result<(), StateDirError> {
    let db = StateDirError::db;
    let mut stmt = main
        .prepare("SELECT task_id, checkpoint_id, attempt, data FROM checkpoints")
        .map_err(db(main_path))?;
    let mut rows = stmt.query([]).map_err(db(main_path))?;
    // One row in memory at a time: each may be many MiB.
    while let Some(r) = rows.next().map_err(db(main_path))? {
        let row = (0..4)
            .map(|i| r.get::<_, Value>(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(db(main_path))?;
        to.execute(
            "INSERT OR REPLACE INTO checkpoints (task_id, checkpoint_id, attempt, data)
             VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params_from_iter(row),
        )
        .map_err(db(to_path))?;
    }
    Ok(())
}

/// Keeps `cp` as the latest checkpoint of `task`, unless a newer attempt's is kept: two
/// attempts of a task can both be storing (the newer starts when the older has not ended
/// within the predecessor grace), and the older's last checkpoint is not the task's latest.
pub(super) fn store(
    conn: &Connection,
    task: &TaskId,
    cp: &StoredCheckpoint,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO checkpoints (task_id, checkpoint_id, attempt, data) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (task_id) DO UPDATE SET
             checkpoint_id = excluded.checkpoint_id, attempt = excluded.attempt,
             data = excluded.data
         WHERE excluded.attempt >= checkpoints.attempt",
        params![
            task.as_str(),
            cp.id.as_str(),
            cp.attempt.0,
            cp.data.as_slice()
        ],
    )
    .map(drop)
}

/// Forgets the checkpoints of each task up to the attempt given (which ended here), in one
/// transaction. Returns how many went.
pub(super) fn forget(conn: &mut Connection, ended: &[(String, u32)]) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut forgot = 0;
    for (task, attempt) in ended {
        forgot += tx.execute(
            "DELETE FROM checkpoints WHERE task_id = ?1 AND attempt <= ?2",
            params![task, attempt],
        )?;
    }
    tx.commit()?;
    Ok(forgot)
}

/// Forgets the checkpoints of every task not in `needed` (the tasks running or lost).
pub(super) fn sweep(conn: &mut Connection, needed: &BTreeSet<String>) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let held: Vec<String> = tx
        .prepare("SELECT task_id FROM checkpoints")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut swept = 0;
    for task in held.iter().filter(|t| !needed.contains(*t)) {
        swept += tx.execute("DELETE FROM checkpoints WHERE task_id = ?1", [task])?;
    }
    tx.commit()?;
    Ok(swept)
}

/// What is kept of `task`'s latest checkpoint, without its bytes.
pub(super) fn describe(
    conn: &Connection,
    task: &TaskId,
    path: &Path,
) -> Result<Option<super::LocalCheckpoint>, StateDirError> {
    let row = conn
        .query_row(
            "SELECT checkpoint_id, attempt, length(data) FROM checkpoints WHERE task_id = ?1",
            params![task.as_str()],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, u64>(2)?,
                ))
            },
        )
        .optional()
        .map_err(StateDirError::db(path))?;
    let Some((id, attempt, bytes)) = row else {
        return Ok(None);
    };
    let id = CheckpointId::parse(&id).map_err(|e| StateDirError::Corrupt {
        path: path.to_owned(),
        detail: format!("checkpoint id {id:?} of task {task}: {e}"),
    })?;
    Ok(Some(super::LocalCheckpoint {
        id,
        attempt: Attempt(attempt),
        bytes,
        submit_seq: None,
    }))
}

/// The latest checkpoint stored for `task`.
pub(super) fn read(
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
        .map_err(StateDirError::db(path))?;
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
        piece: 0,
    }))
}
