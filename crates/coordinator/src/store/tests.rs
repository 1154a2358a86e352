//! Store tests on real database files in a temporary directory.

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use tether_proto::msg::StateJson;
use tether_proto::{Attempt, Outcome, TaskId, TaskSpec, TaskStatus, WorkerId};

use super::*;

mod modes;
mod open_full;

fn task(id: &str, seq: u64, status: TaskStatus) -> Task {
    let spec = TaskSpec::new("sleep", serde_json::json!({}));
    let mut t = Task::fixture(id, spec, status, seq, Utc::now());
    t.attempt = Attempt(1);
    t.finished_at = status.is_terminal().then(Utc::now);
    t
}

/// Retention's removal of a task whose last attempt was 1.
fn removal(id: TaskId) -> Mutation {
    Mutation::DeleteTask {
        id,
        last_attempt: Attempt(1),
        at: Utc::now(),
    }
}

/// A database as a coordinator of schema `version` left it, with one row written by `insert`
/// (whose one parameter is `value`).
fn old_database(dir: &Path, version: usize, insert: &str, value: &str) {
    let conn = Connection::open(dir.join(DB_FILE)).expect("create");
    for m in &schema::MIGRATIONS[..version] {
        conn.execute_batch(m).expect("old schema");
    }
    conn.execute(insert, [value]).expect("old row");
    conn.execute_batch(&format!("PRAGMA user_version = {version};"))
        .expect("version");
}

fn commit_muts(conn: &mut Connection, muts: Vec<Mutation>) {
    let mut batches = vec![Batch {
        muts,
        effects: vec![],
        reads: vec![],
    }];
    let (mut states, _) = states_of(conn);
    commit(conn, &mut batches, &mut states).expect("commit");
    // As a writer that stops: its states are in `task_state`, its journal gone.
    states.fold_all(conn).expect("fold");
}

/// The writer's states for the database of `conn` (its journal beside it).
fn states_of(conn: &Connection) -> (States, Arc<Unfolded>) {
    let dir = Path::new(conn.path().expect("a file"))
        .parent()
        .expect("dir");
    let unfolded = Arc::new(Unfolded::default());
    let states = States::start(dir, unfolded.clone(), false, FOLD_BYTES).expect("journal");
    (states, unfolded)
}

/// Whether the schema has a table or index of that name.
fn in_schema(conn: &Connection, name: &str) -> bool {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .expect("schema")
        > 0
}

fn count(conn: &Connection, table: &str) -> i64 {
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .expect("count")
}

fn result_mut(task: &str, attempt: u32) -> Mutation {
    Mutation::PutResult {
        task_id: TaskId::parse(task).expect("id"),
        attempt: Attempt(attempt),
        worker: WorkerId::parse("w").expect("id"),
        outcome: Outcome::Completed,
        stale: false,
        body: "{}".into(),
    }
}

fn file_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(DB_FILE)).expect("read db file")
}

#[test]
fn a_new_data_directory_gets_the_current_schema_and_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, loaded) = open(dir.path()).expect("open");
    assert!(loaded.tasks.is_empty());
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(v, SCHEMA_VERSION);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, "wal");
    commit_muts(
        &mut conn,
        vec![
            Mutation::PutTask(Box::new(task("a", 0, TaskStatus::Queued))),
            Mutation::PutTask(Box::new(task("b", 1, TaskStatus::Completed))),
        ],
    );
    drop(conn);
    let (_conn, loaded) = open(dir.path()).expect("reopen");
    let ids: Vec<&str> = loaded.tasks.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "tasks come back in submission order");
}

#[test]
fn the_next_submission_number_outlives_the_tasks_that_held_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, loaded) = open(dir.path()).expect("open");
    assert_eq!(loaded.next_submit_seq, 0);
    commit_muts(
        &mut conn,
        vec![
            Mutation::PutTask(Box::new(task("a", 0, TaskStatus::Completed))),
            Mutation::PutTask(Box::new(task("b", 7, TaskStatus::Completed))),
        ],
    );
    // Retention removes the newest; a lower mark later never lowers it.
    let b = TaskId::parse("b").expect("id");
    commit_muts(&mut conn, vec![removal(b), Mutation::NextSubmitSeq(8)]);
    commit_muts(&mut conn, vec![Mutation::NextSubmitSeq(3)]);
    drop(conn);
    let (_conn, loaded) = open(dir.path()).expect("reopen");
    assert_eq!(loaded.tasks.len(), 1);
    assert_eq!(loaded.next_submit_seq, 8);
}

#[test]
fn a_data_directory_the_store_makes_is_its_users_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("made/data");
    let (_conn, _) = open(&data).expect("open");
    for made in [&data, &dir.path().join("made")] {
        let mode = std::fs::metadata(made).expect("made").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", made.display());
    }
}

#[test]
fn durability_machine_makes_every_commit_sync_the_wal_and_process_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (conn, _) = open(dir.path()).expect("open");
    let sync = |conn: &Connection| -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("synchronous")
    };
    // SQLite: 1 = NORMAL (the WAL synced at checkpoints only), 2 = FULL (at every commit).
    assert_eq!(sync(&conn), 1, "the default survives the process's death");
    set_durability(&conn, Durability::Machine).expect("machine");
    assert_eq!(sync(&conn), 2);
    set_durability(&conn, Durability::Process).expect("process");
    assert_eq!(sync(&conn), 1);
    assert_eq!("machine".parse(), Ok(Durability::Machine));
    assert_eq!("process".parse(), Ok(Durability::Process));
    let e = "disk".parse::<Durability>().expect_err("unknown");
    assert!(e.contains("process") && e.contains("machine"), "{e}");
}

#[test]
fn a_database_written_by_a_newer_version_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("create");
        conn.execute_batch(&format!(
            "CREATE TABLE future (x); PRAGMA user_version = {};",
            SCHEMA_VERSION + 1
        ))
        .expect("write");
    }
    let before = file_bytes(dir.path());
    let err = open(dir.path()).expect_err("a newer schema must be refused");
    assert!(
        matches!(err, StoreError::TooNew { found, supported, .. } if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade tether"), "{err}");
    assert_eq!(file_bytes(dir.path()), before, "the file must not change");
    assert!(
        !dir.path().join(format!("{DB_FILE}-wal")).exists(),
        "no WAL may be created next to a refused file"
    );
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(dir.path().join(DB_FILE), &garbage).expect("write");
    let err = open(dir.path()).expect_err("garbage must be refused");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert_eq!(file_bytes(dir.path()), garbage, "the file must not change");
}

/// A coordinator killed while it made its database leaves no empty file where the database
/// goes (which the next start refuses): it is made under another name and renamed into place,
/// and a start after such a kill removes what that name left and starts afresh.
#[test]
fn a_database_made_anew_is_never_an_empty_file_and_a_killed_making_is_cleared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let left = dir.path().join(format!("{DB_FILE}.new"));
    std::fs::write(&left, b"").expect("write");
    drop(open(dir.path()).expect("starts afresh"));
    assert!(!left.exists());
    assert!(file_bytes(dir.path()).starts_with(b"SQLite format 3\0"));
    drop(open(dir.path()).expect("opens again"));
}

#[test]
fn an_emptied_database_file_or_a_directory_in_its_place_is_refused_not_started_afresh() {
    // An empty file would open as a new, empty database: every task gone, without a word.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(DB_FILE), b"").expect("write");
    let err = open(dir.path()).expect_err("an empty file must be refused");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("the file is empty"), "{err}");
    assert_eq!(file_bytes(dir.path()), b"", "the file must not change");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join(DB_FILE)).expect("mkdir");
    let err = open(dir.path()).expect_err("a directory must be refused");
    assert!(err.to_string().contains("is a directory"), "{err}");
    // A data directory that is a file.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let err = open(&file).expect_err("a file is no data directory");
    assert!(err.to_string().contains("is not a directory"), "{err}");
}

#[test]
fn a_database_with_damaged_pages_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut conn, _) = open(dir.path()).expect("open");
        let muts = (0..2000)
            .map(|i| Mutation::PutTask(Box::new(task(&format!("t{i}"), i, TaskStatus::Queued))))
            .collect();
        commit_muts(&mut conn, muts);
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode = DELETE;")
            .expect("checkpoint");
    }
    // Overwrite the middle of the file (table and index pages) with noise, keep the header.
    let mut bytes = file_bytes(dir.path());
    assert!(
        bytes.len() > 64 * 1024,
        "the database should span many pages"
    );
    let mid = bytes.len() / 2;
    for (i, b) in bytes[mid..mid + 16 * 1024].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    std::fs::write(dir.path().join(DB_FILE), &bytes).expect("write");
    let err = open(dir.path()).expect_err("damaged pages must be refused");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert_eq!(file_bytes(dir.path()), bytes, "the file must not change");
}

/// A record whose JSON was damaged outside tether is named by its row's id: refused at start
/// for a task or a worker (among thousands, which one), an error naming the task when its
/// state or a result is read (served as `null` before, as if the worker had sent that).
#[test]
fn a_damaged_record_is_named_at_start_and_at_a_read_never_served_as_null() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut conn, _) = open(dir.path()).expect("open");
        let mut muts: Vec<Mutation> = (0..3)
            .map(|i| Mutation::PutTask(Box::new(task(&format!("t{i}"), i, TaskStatus::Queued))))
            .collect();
        muts.push(result_mut("t1", 1));
        muts.push(Mutation::PutState {
            task_id: TaskId::parse("t1").expect("id"),
            attempt: Attempt(1),
            state: StateJson::from_text("{\"n\":1}".into()).expect("json"),
        });
        commit_muts(&mut conn, muts);
        conn.execute_batch(
            "UPDATE task_state SET state = '{bad' WHERE task_id = 't1';
             UPDATE results SET body = 'not json' WHERE task_id = 't1';",
        )
        .expect("damage");
        let t1 = TaskId::parse("t1").expect("id");
        let said = read_state(&conn, &Unfolded::default(), &t1)
            .expect_err("a damaged state")
            .to_string();
        assert!(
            said.contains("task_state record of task \"t1\" is damaged"),
            "{said}"
        );
        let said = read_results(&conn, &t1)
            .expect_err("a damaged result")
            .to_string();
        assert!(
            said.contains("results record of task \"t1\" is damaged"),
            "{said}"
        );
        conn.execute("UPDATE tasks SET doc = '{garbage' WHERE id = 't2'", [])
            .expect("damage");
    }
    let said = open(dir.path()).expect_err("refused").to_string();
    assert!(said.contains("task \"t2\" (table tasks, doc)"), "{said}");
    // A task number no next one can follow (the core counts from the largest plus one).
    {
        let conn = Connection::open(dir.path().join("tether.db")).expect("open");
        let doc: String = conn
            .query_row("SELECT doc FROM tasks WHERE id = 't0'", [], |r| r.get(0))
            .expect("doc");
        let mut doc: serde_json::Value = serde_json::from_str(&doc).expect("json");
        doc["submit_seq"] = serde_json::json!(u64::MAX);
        conn.execute(
            "UPDATE tasks SET doc = ?1 WHERE id = 't0'",
            [doc.to_string()],
        )
        .expect("damage");
    }
    let said = open(dir.path()).expect_err("refused").to_string();
    assert!(
        said.contains(
            "task \"t0\" (table tasks, doc): submit_seq 18446744073709551615 is out of range"
        ),
        "{said}"
    );
}

/// A data directory whose database holds one queued task `t`, closed cleanly.
fn one_task_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let t = task("t", 0, TaskStatus::Queued);
    commit_muts(&mut conn, vec![Mutation::PutTask(Box::new(t))]);
    dir
}

/// The write-ahead log removed after a crash (its `-shm` left: a clean close removes both) is
/// refused, not opened without the commits it held; without the `-shm` too, nothing tells.
#[test]
fn a_database_whose_write_ahead_log_was_removed_after_a_crash_is_refused() {
    let dir = one_task_store();
    let shm = dir.path().join("tether.db-shm");
    std::fs::write(&shm, b"").expect("shm");
    let before = file_bytes(dir.path());
    let err = open(dir.path()).expect_err("refused");
    assert!(matches!(err, StoreError::WalMissing { .. }), "{err}");
    let said = err.to_string();
    assert!(
        said.contains("tether.db-wal is missing beside") && said.contains("remove"),
        "{said}"
    );
    assert_eq!(file_bytes(dir.path()), before, "the database untouched");
    std::fs::remove_file(&shm).expect("rm");
    let (_, loaded) = open(dir.path()).expect("opens once told");
    assert_eq!(loaded.tasks.len(), 1);
}

/// A database moved away alone (as the advice for a refused one read) after its coordinator
/// crashed: the `-wal`, `-shm` and state journal left behind hold its latest commits and
/// states. The next start made a new database, replayed the journal into it (no task there:
/// every state dropped), removed it, and SQLite deleted the `-wal`; it is refused now, with
/// those files untouched, and so is an emptied database in its place. Put back, the database
/// opens with everything.
#[test]
fn a_database_moved_away_without_its_wal_and_journal_is_refused_and_they_stay_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let aside = tempfile::tempdir().expect("tempdir");
    let j = Journaled::open(dir.path());
    let Journaled {
        mut conn,
        mut states,
        ..
    } = j;
    let mut batches = vec![Batch {
        muts: vec![new_task("a"), state_mut("a", 1)],
        ..Batch::default()
    }];
    commit(&mut conn, &mut batches, &mut states).expect("commit");
    // A crash: the connection is never closed, so its `-wal` and `-shm` stay, and the journal
    // is not folded.
    std::mem::forget(conn);
    drop(states);
    let db = dir.path().join(DB_FILE);
    let moved = aside.path().join(DB_FILE);
    std::fs::rename(&db, &moved).expect("move the database away");
    let files = ["tether.db-wal", "tether.db-shm", "states-1.journal"];
    let bytes = || files.map(|f| std::fs::read(dir.path().join(f)).expect(f));
    let before = bytes();
    assert!(before.iter().all(|b| !b.is_empty()), "each holds something");
    let err = open(dir.path()).map(|_| ()).expect_err("refused");
    assert!(
        matches!(&err, StoreError::Leftovers { empty: false, .. }),
        "{err}"
    );
    let said = err.to_string();
    for f in files {
        assert!(said.contains(f), "{f}: {said}");
    }
    assert!(
        said.contains("is missing") && said.contains("move these files away too"),
        "{said}"
    );
    assert_eq!(bytes(), before, "the -wal, -shm and journal untouched");
    assert!(!db.exists(), "no database made");
    std::fs::write(&db, b"").expect("an empty database");
    let err = open(dir.path()).map(|_| ()).expect_err("refused");
    assert!(
        matches!(&err, StoreError::Leftovers { empty: true, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("is empty"), "{err}");
    assert_eq!(bytes(), before, "untouched again");
    assert_eq!(std::fs::metadata(&db).expect("db").len(), 0);
    std::fs::rename(&moved, &db).expect("put the database back");
    let (conn, loaded) = open(dir.path()).expect("opens once put back");
    assert_eq!(loaded.tasks.len(), 1, "the task its -wal held");
    assert_eq!(state_n(&conn, "a"), Some(1), "the state its journal held");
}

/// A file of the data directory that cannot be opened is named as such, not called corrupt
/// with advice to move it away (which would throw good data away). Tests run as root, whom
/// modes do not stop, so a symlink loop stands in for a file that cannot be opened; the
/// permission hint is checked on its own.
#[test]
fn a_file_that_cannot_be_opened_is_named_not_called_corrupt() {
    let dir = one_task_store();
    let loop_at = |name: &str| {
        let p = dir.path().join(name);
        std::os::unix::fs::symlink(&p, &p).expect("symlink");
        p
    };
    let wal = loop_at("tether.db-wal");
    let err = open(dir.path()).expect_err("refused");
    assert!(
        matches!(&err, StoreError::Access { path, .. } if *path == wal),
        "{err}"
    );
    assert!(!err.to_string().contains("corrupt"), "{err}");
    std::fs::remove_file(&wal).expect("rm");
    let journal = loop_at("states-99.journal");
    let err = open(dir.path()).expect_err("refused");
    assert!(
        matches!(&err, StoreError::Access { path, .. } if *path == journal),
        "{err}"
    );
    assert!(!err.to_string().contains("move it away"), "{err}");
    std::fs::remove_file(&journal).expect("rm");
    open(dir.path()).expect("opens again, nothing lost");
    // Closed cleanly (no -wal left), then a directory in the -wal's place: SQLite cannot open
    // it, and says so; the database is not called corrupt.
    assert!(!wal.exists());
    std::fs::create_dir(&wal).expect("mkdir");
    let err = open(dir.path()).expect_err("refused");
    assert!(matches!(&err, StoreError::Sql { .. }), "{err}");
    assert!(!err.to_string().contains("corrupt"), "{err}");
    std::fs::remove_dir(&wal).expect("rmdir");
    let (_, loaded) = open(dir.path()).expect("opens again, nothing lost");
    assert_eq!(loaded.tasks.len(), 1);

    // What a permission refused says: the file's owner and mode, and who this process is.
    use std::os::unix::fs::PermissionsExt;
    let f = dir.path().join("tether.db");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let said = StoreError::Access {
        path: f.clone(),
        source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
    }
    .to_string();
    assert!(
        said.contains("mode 0;") && said.contains("runs as uid"),
        "{said}"
    );
    assert!(said.contains("not said to be damaged"), "{said}");
}

/// A result and a state are served as the worker sent them, byte for byte: keys in their
/// order, a duplicate key, a number past 64 bits and a trailing zero kept. Read as trees they
/// came back with sorted keys, one of the duplicates, and rounded numbers.
#[test]
fn a_result_and_a_state_are_served_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let text = r#"{"b":1,"a":18446744073709551616,"f":1.10,"b":2}"#;
    let t = TaskId::parse("t").expect("id");
    commit_muts(
        &mut conn,
        vec![
            Mutation::PutTask(Box::new(task("t", 0, TaskStatus::Running))),
            Mutation::PutResult {
                task_id: t.clone(),
                attempt: Attempt(1),
                worker: WorkerId::parse("w").expect("id"),
                outcome: Outcome::Completed,
                stale: false,
                body: text.into(),
            },
            Mutation::PutState {
                task_id: t.clone(),
                attempt: Attempt(1),
                state: StateJson::from_text(text.into()).expect("json"),
            },
        ],
    );
    let rows = read_results(&conn, &t).expect("read");
    assert_eq!(rows[0].body.get(), text);
    let served = serde_json::to_string(&rows[0]).expect("serialize");
    assert!(served.contains(text), "{served}");
    let state = read_state(&conn, &Unfolded::default(), &t)
        .expect("read")
        .expect("a state");
    assert_eq!(state.state.get(), text);
}

#[test]
fn a_result_is_stored_once_per_attempt_even_when_committed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    commit_muts(&mut conn, vec![result_mut("a", 1), result_mut("a", 1)]);
    commit_muts(&mut conn, vec![result_mut("a", 1), result_mut("a", 2)]);
    let rows = read_results(&conn, &TaskId::parse("a").expect("id")).expect("read");
    let attempts: Vec<u32> = rows.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert!(attempts.contains(&1) && attempts.contains(&2));
}

#[test]
fn deleting_a_task_removes_its_results_state_and_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let meta = |task: &str, id: &str| CheckpointMeta {
        checkpoint_id: CheckpointId::parse(id).expect("id"),
        task_id: TaskId::parse(task).expect("id"),
        attempt: Attempt(1),
        worker: WorkerId::parse("w").expect("id"),
        size: 3,
        chunks: 1,
        created_at: Utc::now(),
    };
    let mut muts = Vec::new();
    for t in ["gone", "kept"] {
        muts.push(Mutation::PutTask(Box::new(task(
            t,
            0,
            TaskStatus::Completed,
        ))));
        muts.push(result_mut(t, 1));
        muts.push(Mutation::PutState {
            task_id: TaskId::parse(t).expect("id"),
            attempt: Attempt(1),
            state: StateJson::from_text("{}".into()).expect("json"),
        });
        let cid = format!("{t}-c1");
        muts.push(Mutation::PutCheckpoint {
            meta: meta(t, &cid),
            complete: true,
        });
        muts.push(Mutation::PutChunk {
            checkpoint_id: CheckpointId::parse(&cid).expect("id"),
            idx: 0,
            data: vec![1, 2, 3],
        });
    }
    commit_muts(&mut conn, muts);
    commit_muts(&mut conn, vec![removal(TaskId::parse("gone").expect("id"))]);
    for table in [
        "tasks",
        "results",
        "task_state",
        "checkpoints",
        "checkpoint_chunks",
    ] {
        assert_eq!(
            count(&conn, table),
            1,
            "{table} keeps only the other task's row"
        );
    }
    let kept = TaskId::parse("kept").expect("id");
    assert_eq!(read_results(&conn, &kept).expect("read").len(), 1);
}

#[test]
fn a_removed_task_leaves_its_id_with_its_highest_last_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut conn, _) = open(dir.path()).expect("open");
        let gone = TaskId::parse("nightly").expect("id");
        let removed = |last| Mutation::DeleteTask {
            id: gone.clone(),
            last_attempt: Attempt(last),
            at: Utc::now(),
        };
        // Removed after 3 attempts, submitted again, removed again after fewer: 3 stays (a
        // later task of the id had numbered its attempts after it anyway).
        commit_muts(&mut conn, vec![removed(3)]);
        commit_muts(&mut conn, vec![removed(1)]);
        commit_muts(
            &mut conn,
            vec![removal(TaskId::parse("other").expect("id"))],
        );
    }
    let (_, loaded) = open(dir.path()).expect("reopen");
    let mut removed: Vec<_> = loaded
        .removed
        .iter()
        .map(|(id, n, _)| (id.clone(), *n))
        .collect();
    removed.sort();
    assert_eq!(
        removed,
        [
            ("nightly".to_owned(), Attempt(3)),
            ("other".to_owned(), Attempt(1))
        ]
    );
}

/// The ids removed before a time are forgotten, the later ones kept with their times (oldest
/// first at load), and an id removed again counts from its latest removal.
#[test]
fn removed_ids_are_forgotten_by_the_time_they_were_last_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("ms");
    let t = |s: i64| base - chrono::Duration::seconds(s);
    let removed = |id: &str, at| Mutation::DeleteTask {
        id: TaskId::parse(id).expect("id"),
        last_attempt: Attempt(2),
        at,
    };
    {
        let (mut conn, _) = open(dir.path()).expect("open");
        commit_muts(
            &mut conn,
            vec![
                removed("old", t(300)),
                removed("again", t(290)),
                removed("new", t(100)),
            ],
        );
        commit_muts(&mut conn, vec![removed("again", t(50))]);
        commit_muts(&mut conn, vec![Mutation::ForgetRemoved { before: t(200) }]);
    }
    let (_, loaded) = open(dir.path()).expect("reopen");
    let kept: Vec<_> = loaded
        .removed
        .iter()
        .map(|(id, _, at)| (id.as_str(), *at))
        .collect();
    assert_eq!(kept, [("new", t(100)), ("again", t(50))]);
}

/// Ids removed under schema 8 (no time) take the migration's time: forgotten a retention
/// after it, not at once.
#[test]
fn removed_ids_of_schema_8_are_taken_as_removed_at_the_migration() {
    let dir = tempfile::tempdir().expect("tempdir");
    old_database(
        dir.path(),
        8,
        "INSERT INTO removed_tasks (id, last_attempt) VALUES (?1, 3)",
        "nightly",
    );
    let before = Utc::now() - chrono::Duration::seconds(2);
    let (_, loaded) = open(dir.path()).expect("migrated");
    let [(id, last, at)] = &loaded.removed[..] else {
        panic!("{:?}", loaded.removed);
    };
    assert_eq!((id.as_str(), *last), ("nightly", Attempt(3)));
    assert!(*at >= before && *at <= Utc::now(), "{at}");
}

#[test]
fn later_writes_of_a_task_in_one_group_win() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let mut batches = vec![
        Batch {
            muts: vec![Mutation::PutTask(Box::new(task(
                "a",
                0,
                TaskStatus::Queued,
            )))],
            effects: vec![],
            reads: vec![],
        },
        Batch {
            muts: vec![Mutation::PutTask(Box::new(task(
                "a",
                0,
                TaskStatus::Completed,
            )))],
            effects: vec![],
            reads: vec![],
        },
    ];
    let (mut states, _) = states_of(&conn);
    commit(&mut conn, &mut batches, &mut states).expect("commit");
    let status: String = conn
        .query_row("SELECT status FROM tasks WHERE id = 'a'", [], |r| r.get(0))
        .expect("row");
    assert_eq!(status, "completed");
}

#[test]
fn a_version_1_database_is_migrated_and_its_tasks_load_and_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = task("old", 0, TaskStatus::Queued);
    // What a version-1 coordinator left: the whole task in `doc`, a status index.
    old_database(
        dir.path(),
        1,
        "INSERT INTO tasks (id, status, submit_seq, doc) VALUES ('old', 'queued', 0, ?1)",
        &serde_json::to_string(&old).expect("json"),
    );
    let (mut conn, loaded) = open(dir.path()).expect("open migrates");
    assert_eq!(loaded.tasks, vec![old.clone()], "a v1 row loads whole");
    let spec: String = conn
        .query_row("SELECT spec FROM tasks WHERE id = 'old'", [], |r| r.get(0))
        .expect("spec");
    assert_eq!(
        serde_json::from_str::<TaskSpec>(&spec).expect("spec json"),
        *old.spec,
        "the migration moved the spec to its column"
    );
    assert!(
        !in_schema(&conn, "tasks_status"),
        "the unused status index is gone"
    );
    let mut done = old.clone();
    done.status = TaskStatus::Completed;
    done.finished_at = Some(Utc::now());
    let new = task("new", 1, TaskStatus::Queued);
    commit_muts(
        &mut conn,
        vec![
            Mutation::PutTask(Box::new(done.clone())),
            Mutation::InsertTask(Box::new(new.clone())),
        ],
    );
    drop(conn);
    let (_conn, loaded) = open(dir.path()).expect("reopen");
    assert_eq!(loaded.tasks, vec![done, new]);
}

#[test]
fn a_version_6_database_s_checkpoints_load_after_the_migration_that_brings_pruned_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    // What a version-6 coordinator left: a complete checkpoint (it knew only 0 and 1).
    old_database(
        dir.path(),
        6,
        "INSERT INTO checkpoints (id, task_id, attempt, worker, size, chunks, complete, created_at)
         VALUES (?1, 't', 1, 'w', 0, 0, 1, '2026-12-01T00:00:00Z')",
        "ck-old",
    );
    let (conn, loaded) = open(dir.path()).expect("open migrates");
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(
        v, SCHEMA_VERSION,
        "the database now says it may hold pruned rows (version 7 on)"
    );
    assert_eq!(
        loaded.complete_checkpoints,
        vec![(
            TaskId::parse("t").expect("id"),
            CheckpointId::parse("ck-old").expect("id")
        )]
    );
    assert!(loaded.superseded_checkpoints.is_empty());
}

#[test]
fn a_task_round_trips_through_its_spec_and_doc_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let mut t = task("a", 0, TaskStatus::Running);
    t.spec = Arc::new(TaskSpec {
        retry_of: Some(TaskId::parse("before").expect("id")),
        ..TaskSpec::new("command", serde_json::json!({"argv": ["true"]}))
    });
    // (Not a state a running task is in; every field is set to be carried.)
    t.retried_by = Some(TaskId::parse("after").expect("id"));
    t.attempt = Attempt(2);
    t.lease = Some(crate::model::Lease {
        worker: WorkerId::parse("w").expect("id"),
        attempt: Attempt(2),
        since: Utc::now(),
        desired: crate::model::Desired::Paused,
    });
    t.error = Some("first attempt lost".into());
    t.attempts = vec![crate::model::AttemptRecord {
        attempt: Attempt(1),
        worker: WorkerId::parse("w").expect("id"),
        started_at: Utc::now(),
        ended_at: Some(Utc::now()),
        end: Some("lost".into()),
        result_recorded: false,
        checkpoint_refused: Some("checkpoint c-1 of 9 bytes exceeds the limit of 8".into()),
        checkpoint_error: None,
        checkpoint_error_at: None,
    }];
    commit_muts(&mut conn, vec![Mutation::InsertTask(Box::new(t.clone()))]);
    let spec: String = conn
        .query_row("SELECT spec FROM tasks WHERE id = 'a'", [], |r| r.get(0))
        .expect("spec");
    assert!(spec.contains("argv"), "{spec}");
    let doc: String = conn
        .query_row("SELECT doc FROM tasks WHERE id = 'a'", [], |r| r.get(0))
        .expect("doc");
    assert!(
        !doc.contains("argv"),
        "the spec is not rewritten with each change: {doc}"
    );
    drop(conn);
    let (_conn, loaded) = open(dir.path()).expect("reopen");
    assert_eq!(loaded.tasks, vec![t]);
}

#[test]
fn an_update_of_a_task_inserted_in_the_same_group_writes_it_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let queued = task("a", 0, TaskStatus::Queued);
    let mut running = queued.clone();
    running.status = TaskStatus::Running;
    commit_muts(
        &mut conn,
        vec![
            Mutation::InsertTask(Box::new(queued)),
            Mutation::PutTask(Box::new(running.clone())),
        ],
    );
    drop(conn);
    let (_conn, loaded) = open(dir.path()).expect("reopen");
    assert_eq!(loaded.tasks, vec![running]);
}

#[test]
fn a_deleted_worker_is_gone_unless_written_again_later_in_the_same_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let worker = |id: &str| Box::new(Worker::new(WorkerId::parse(id).expect("id"), Utc::now()));
    let id = |s: &str| WorkerId::parse(s).expect("id");
    commit_muts(
        &mut conn,
        vec![
            Mutation::PutWorker(worker("kept")),
            Mutation::PutWorker(worker("gone")),
            Mutation::PutWorker(worker("back")),
        ],
    );
    assert_eq!(count(&conn, "workers"), 3);
    // Deleted; written then deleted in one group; deleted then written again in one group.
    commit_muts(
        &mut conn,
        vec![
            Mutation::DeleteWorker(id("gone")),
            Mutation::PutWorker(worker("fresh")),
            Mutation::DeleteWorker(id("fresh")),
            Mutation::DeleteWorker(id("back")),
            Mutation::PutWorker(worker("back")),
        ],
    );
    drop(conn);
    let (_conn, loaded) = open(dir.path()).expect("reopen");
    let mut ids: Vec<String> = loaded
        .workers
        .iter()
        .map(|w| w.worker_id.to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["back", "kept"]);
}

/// After a crash, a worker that had a session was there until the previous run last wrote
/// that it was alive, not only until its record was last saved (its registration, or a
/// telemetry report minutes ago). A worker that had disconnected keeps its own times, and so
/// does a record of an older coordinator, which does not say whether it was connected.
#[test]
fn a_worker_connected_at_a_crash_is_last_seen_when_the_coordinator_was_last_alive() {
    use crate::model::WorkerState;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, loaded) = open(dir.path()).expect("open");
    assert_eq!(loaded.alive_at, None);
    let t = |s: i64| Utc::now() - chrono::Duration::seconds(s);
    let worker = |id: &str, state: WorkerState, seen: i64| {
        let mut w = Worker::new(WorkerId::parse(id).expect("id"), t(600));
        w.state = state;
        w.last_seen = t(seen);
        w.disconnected_at = (state != WorkerState::Connected).then(|| t(seen));
        Box::new(w)
    };
    let alive = DateTime::from_timestamp_millis(t(5).timestamp_millis()).expect("ms");
    commit_muts(
        &mut conn,
        vec![
            Mutation::PutWorker(worker("on", WorkerState::Connected, 300)),
            Mutation::PutWorker(worker("off", WorkerState::Disconnected, 200)),
            Mutation::AliveAt(t(60)),
            Mutation::AliveAt(alive),
        ],
    );
    // A record as an older coordinator wrote it: no word of a session.
    conn.execute(
        "INSERT INTO workers (id, doc) SELECT 'old', \
         json_set(json_remove(doc, '$.connected'), '$.worker_id', 'old') FROM workers WHERE id = 'on'",
        [],
    )
    .expect("old record");
    drop(conn);
    let (_conn, loaded) = open(dir.path()).expect("reopen");
    assert_eq!(loaded.alive_at, Some(alive));
    let of = |id: &str| {
        let w = loaded.workers.iter().find(|w| w.worker_id.as_str() == id);
        let w = w.expect("loaded");
        (w.state, w.last_seen, w.disconnected_at)
    };
    let disconnected = WorkerState::Disconnected;
    assert_eq!(of("on"), (disconnected, alive, Some(alive)));
    let near = |a: DateTime<Utc>, b: DateTime<Utc>| (a - b).num_seconds().abs() <= 1;
    let (state, seen, at) = of("off");
    assert_eq!(state, disconnected);
    assert!(near(seen, t(200)) && at.is_some_and(|at| near(at, t(200))));
    let (_, seen, _) = of("old");
    assert!(near(seen, t(300)), "an older record keeps its own time");
}

/// What a worker's process said of itself survives a restart: that it is stopping (it comes
/// back only to hand back what it holds, and takes nothing new), and the processes a newer one
/// replaced (one of them coming back is refused while the newer one is connected). Lost, the
/// stopping process was leased tasks it never ran, and the older process took the id back. So
/// does an operator's drain.
#[test]
fn a_workers_stopping_draining_and_replaced_processes_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let mut w = Worker::new(WorkerId::parse("w-1").expect("id"), Utc::now());
    w.boot_id = "b-new".into();
    w.stopping = true;
    w.draining = true;
    w.superseded = vec!["b-old".into()];
    let plain = Worker::new(WorkerId::parse("w-2").expect("id"), Utc::now());
    commit_muts(
        &mut conn,
        vec![
            Mutation::PutWorker(Box::new(w)),
            Mutation::PutWorker(Box::new(plain)),
        ],
    );
    drop(conn);
    let (_conn, loaded) = open(dir.path()).expect("reopen");
    let of = |id: &str| {
        let w = loaded.workers.iter().find(|w| w.worker_id.as_str() == id);
        let w = w.expect("loaded");
        (w.stopping, w.draining, w.superseded.clone())
    };
    assert_eq!(of("w-1"), (true, true, vec!["b-old".to_owned()]));
    assert_eq!(of("w-2"), (false, false, vec![]));
}

fn state_mut(task: &str, n: u32) -> Mutation {
    Mutation::PutState {
        task_id: TaskId::parse(task).expect("id"),
        attempt: Attempt(1),
        state: StateJson::from_text(format!("{{\"n\":{n}}}")).expect("json"),
    }
}

fn n_of(state: Option<StateRow>) -> Option<u64> {
    state.and_then(|s| as_value(&s.state)["n"].as_u64())
}

/// A stored record's JSON as a tree, to look into.
fn as_value(raw: &serde_json::value::RawValue) -> serde_json::Value {
    serde_json::from_str(raw.get()).expect("JSON")
}

/// The state of `task` in the database, with nothing unfolded in memory (a reopened store).
fn state_n(conn: &Connection, task: &str) -> Option<u64> {
    n_of(
        read_state(
            conn,
            &Unfolded::default(),
            &TaskId::parse(task).expect("id"),
        )
        .expect("read"),
    )
}

/// The state of `task` in `task_state` alone.
fn table_n(conn: &Connection, task: &str) -> Option<u64> {
    conn.query_row(
        "SELECT state FROM task_state WHERE task_id = ?1",
        [task],
        |r| r.get::<_, String>(0),
    )
    .optional()
    .expect("read")
    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
    .and_then(|v| v["n"].as_u64())
}

/// The state journal's files in `dir` and their bytes.
fn journal(dir: &Path) -> (usize, u64) {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".journal"))
        .fold((0, 0), |(n, bytes), e| {
            (n + 1, bytes + e.metadata().map_or(0, |m| m.len()))
        })
}

/// Bytes of the journal files the writer holds: the two newest. Older ones belong to finished
/// rounds (a round starts only after the last one ended) and wait for the reaper thread, whose
/// pace is the file system's, not the writer's.
fn held_journal(dir: &Path) -> u64 {
    let mut files: Vec<(u64, u64)> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let generation = name.strip_prefix("states-")?.strip_suffix(".journal")?;
            Some((
                generation.parse().ok()?,
                e.metadata().map_or(0, |m| m.len()),
            ))
        })
        .collect();
    files.sort_unstable();
    files.iter().rev().take(2).map(|(_, bytes)| bytes).sum()
}

fn new_task(id: &str) -> Mutation {
    Mutation::InsertTask(Box::new(task(id, 0, TaskStatus::Running)))
}

/// The writer's side of a store, driven a commit and a piece at a time.
struct Journaled {
    dir: PathBuf,
    conn: Connection,
    states: States,
    unfolded: Arc<Unfolded>,
}

impl Journaled {
    fn open(dir: &Path) -> Journaled {
        let (conn, loaded) = open(dir).expect("open");
        let states =
            States::start(dir, loaded.unfolded.clone(), false, FOLD_BYTES).expect("journal");
        Journaled {
            dir: dir.to_owned(),
            conn,
            states,
            unfolded: loaded.unfolded,
        }
    }

    fn commit(&mut self, muts: Vec<Mutation>) {
        let mut batches = vec![Batch {
            muts,
            effects: vec![],
            reads: vec![],
        }];
        commit(&mut self.conn, &mut batches, &mut self.states).expect("commit");
    }

    /// As an API read sees it.
    fn state_n(&self, task: &str) -> Option<u64> {
        n_of(
            read_state(
                &self.conn,
                &self.unfolded,
                &TaskId::parse(task).expect("id"),
            )
            .expect("read"),
        )
    }

    /// Folds a piece; the files a finished round covered are gone when it returns.
    fn piece(&mut self) -> states::Piece {
        let piece = self.states.piece(&self.conn).expect("fold");
        self.states.settle();
        piece
    }

    /// Begins a round and folds pieces until it is over.
    fn fold_round(&mut self) -> Vec<states::Piece> {
        self.states.begin_now();
        let mut pieces = Vec::new();
        while self.states.due() {
            pieces.push(self.piece());
        }
        pieces
    }

    fn journal(&self) -> (usize, u64) {
        journal(&self.dir)
    }
}

/// A group whose commit fails for space after its states were journaled takes them out of
/// the journal again: a crash then replays none of it (it was never committed nor
/// acknowledged), and its retry journals it once. They stayed, and were replayed.
#[test]
fn a_group_whose_commit_fails_leaves_nothing_in_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut j = Journaled::open(dir.path());
        j.commit(vec![
            Mutation::PutTask(Box::new(task("a", 0, TaskStatus::Running))),
            state_mut("a", 1),
        ]);
        let before = j.journal();
        let mut batches = vec![Batch {
            muts: vec![state_mut("a", 2)],
            effects: vec![],
            reads: vec![],
        }];
        FAIL_NEXT_COMMIT.with(|f| f.set(true));
        let failed = commit(&mut j.conn, &mut batches, &mut j.states).expect_err("full");
        assert!(failed.out_of_space(), "{failed}");
        assert_eq!(
            j.journal(),
            before,
            "nothing of the group stays in the journal"
        );
        assert_eq!(j.state_n("a"), Some(1), "nor in memory");
    }
    // A crash now: the state of the failed group is not replayed.
    let j = Journaled::open(dir.path());
    assert_eq!(j.state_n("a"), Some(1));
}

/// A writer that stops while a fold round is under way, with states acknowledged since the
/// round began (in the journal file it left for the appends): they are folded too before the
/// journal files go, and read after a restart. The round used to be finished alone, the next
/// one not yet due, and the file holding them deleted.
#[test]
fn a_stop_during_a_fold_round_keeps_the_states_acknowledged_during_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = |i: usize| format!("t{i:04}");
    let tasks = PIECE_STATES + 10;
    {
        let mut j = Journaled::open(dir.path());
        j.commit((0..tasks).map(|i| state_mut(&name(i), 1)).collect());
        j.states.begin_now();
        assert_eq!(j.piece().states_written, PIECE_STATES);
        // Acknowledged during the round: one for a task it wrote, one for a task it never saw.
        j.commit(vec![state_mut(&name(0), 2), state_mut("late", 1)]);
        j.states.fold_all(&j.conn).expect("fold");
        assert!(j.unfolded.is_empty(), "everything folded");
        assert_eq!(j.journal().0, 0, "no journal file left");
    }
    let j = Journaled::open(dir.path());
    assert_eq!(j.state_n(&name(0)), Some(2));
    assert_eq!(j.state_n("late"), Some(1));
    assert_eq!(j.state_n(&name(tasks - 1)), Some(1));
}

#[test]
fn states_are_journaled_then_folded_and_the_latest_is_read_either_way() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut j = Journaled::open(dir.path());
    assert_eq!(j.journal().0, 1, "a journal file from the start");
    j.commit(vec![state_mut("a", 1), state_mut("b", 1)]);
    j.commit(vec![state_mut("a", 2)]);
    assert_eq!(j.state_n("a"), Some(2), "from memory");
    assert_eq!(
        count(&j.conn, "task_state"),
        0,
        "nothing in the database yet"
    );
    assert!(
        !j.states.due(),
        "neither a second nor {FOLD_BYTES} bytes yet"
    );
    let pieces = j.fold_round();
    assert_eq!(
        pieces,
        vec![states::Piece {
            states_written: 2,
            files_deleted: 1
        }]
    );
    assert_eq!(count(&j.conn, "task_state"), 2);
    assert!(j.unfolded.is_empty());
    assert_eq!(
        j.journal().0,
        1,
        "the round's file went, the next one began"
    );
    assert_eq!(j.state_n("a"), Some(2), "from the table");
    assert_eq!(j.state_n("b"), Some(1));
    j.commit(vec![state_mut("a", 3)]);
    assert_eq!(j.state_n("a"), Some(3), "memory is newer than the table");
    assert_eq!(table_n(&j.conn, "a"), Some(2));
    assert_eq!(j.state_n("none"), None);
}

#[test]
fn a_fold_round_writes_each_task_s_newest_state_even_one_that_came_during_the_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut j = Journaled::open(dir.path());
    let tasks = PIECE_STATES + 10;
    let name = |i: usize| format!("t{i:04}");
    j.commit((0..tasks).map(|i| state_mut(&name(i), 1)).collect());
    assert_eq!(
        j.states.journal_bytes(),
        j.journal().1,
        "as counted, on disk"
    );
    j.states.begin_now();
    let first = j.piece();
    assert_eq!(
        (first.states_written, first.files_deleted),
        (PIECE_STATES, 0)
    );
    assert_eq!(j.journal().0, 2, "the appends moved to a new file");
    assert_eq!(j.states.journal_bytes(), j.journal().1);
    // One state for a task this round wrote already, one for a task it has yet to write.
    j.commit(vec![state_mut(&name(0), 2)]);
    j.commit(vec![state_mut(&name(tasks - 1), 2)]);
    assert!(j.states.due(), "the round goes on");
    assert_eq!(j.states.journal_bytes(), j.journal().1);
    let second = j.piece();
    assert_eq!((second.states_written, second.files_deleted), (10, 1));
    assert!(!j.states.due(), "round over");
    assert_eq!(j.journal().0, 1);
    assert_eq!(
        j.states.journal_bytes(),
        j.journal().1,
        "the covered file went"
    );
    assert_eq!(table_n(&j.conn, &name(0)), Some(1));
    assert_eq!(j.state_n(&name(0)), Some(2), "the newer one, from memory");
    assert_eq!(
        table_n(&j.conn, &name(tasks - 1)),
        Some(2),
        "written newest"
    );
    assert_eq!(j.state_n(&name(1)), Some(1));
    assert_eq!(
        j.unfolded.len(),
        1,
        "only the one written before it changed"
    );
    j.fold_round();
    assert_eq!(table_n(&j.conn, &name(0)), Some(2));
    assert!(j.unfolded.is_empty());
}

/// A group's states and other mutations interleaved: each state is its own task's, and each
/// task ends with its newest, in memory, in the table and after a replay.
#[test]
fn states_committed_together_are_each_kept_as_their_own_task_s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tasks = 39;
    let n = |i: usize, round: usize| (i * 10 + round) as u32;
    let newest = |i: usize| Some(u64::from(n(i, usize::from(i.is_multiple_of(2)))));
    {
        let mut j = Journaled::open(dir.path());
        j.commit((0..tasks).map(|i| new_task(&format!("t{i:03}"))).collect());
        // Every task, then every other one in the opposite order: a state kept as the wrong
        // task's would leave some task with an older state, or none.
        let rounds: [Vec<usize>; 2] = [
            (0..tasks).collect(),
            (0..tasks).rev().filter(|i| i.is_multiple_of(2)).collect(),
        ];
        for (round, order) in rounds.iter().enumerate() {
            let mut muts: Vec<Mutation> = order
                .iter()
                .map(|&i| state_mut(&format!("t{i:03}"), n(i, round)))
                .collect();
            let worker = Worker::new(WorkerId::parse("w").expect("id"), Utc::now());
            muts.insert(7, Mutation::PutWorker(Box::new(worker)));
            j.commit(muts);
        }
        for i in 0..tasks {
            assert_eq!(j.state_n(&format!("t{i:03}")), newest(i));
        }
        // Replayed below, unfolded: the process dies here.
    }
    let (conn, _) = open(dir.path()).expect("reopen");
    for i in 0..tasks {
        assert_eq!(table_n(&conn, &format!("t{i:03}")), newest(i), "t{i:03}");
    }
    assert_eq!(journal(dir.path()), (0, 0), "replayed and removed");
}

#[test]
fn of_several_states_of_a_task_in_one_group_the_last_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut j = Journaled::open(dir.path());
    let state = |attempt: u32, n: u32| Mutation::PutState {
        task_id: TaskId::parse("a").expect("id"),
        attempt: Attempt(attempt),
        state: StateJson::from_text(format!("{{\"n\":{n}}}")).expect("json"),
    };
    let mut batches = vec![
        Batch {
            muts: vec![state(1, 1), state(1, 2)],
            effects: vec![],
            reads: vec![],
        },
        Batch {
            muts: vec![state(2, 3)],
            effects: vec![],
            reads: vec![],
        },
    ];
    commit(&mut j.conn, &mut batches, &mut j.states).expect("commit");
    let read = |j: &Journaled| {
        let s = read_state(&j.conn, &j.unfolded, &TaskId::parse("a").expect("id"))
            .expect("read")
            .expect("a state");
        (s.attempt, as_value(&s.state))
    };
    assert_eq!(read(&j), (2, serde_json::json!({"n": 3})));
    j.fold_round();
    assert_eq!(read(&j), (2, serde_json::json!({"n": 3})), "folded");
}

#[test]
fn a_deleted_task_keeps_no_state_after_a_replay_or_under_the_same_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut j = Journaled::open(dir.path());
        j.commit(vec![
            new_task("gone"),
            new_task("kept"),
            state_mut("gone", 1),
            state_mut("kept", 1),
        ]);
        j.fold_round();
        j.commit(vec![state_mut("gone", 2), state_mut("kept", 2)]);
        j.commit(vec![removal(TaskId::parse("gone").expect("id"))]);
        assert_eq!(
            j.state_n("gone"),
            None,
            "neither in memory nor in the table"
        );
        assert_eq!(j.state_n("kept"), Some(2));
        // The process dies with the deletion in the journal after the state.
    }
    {
        let (mut conn, _) = open(dir.path()).expect("reopen");
        assert_eq!(
            state_n(&conn, "gone"),
            None,
            "not brought back by the replay"
        );
        assert_eq!(state_n(&conn, "kept"), Some(2), "replayed");
        commit_muts(&mut conn, vec![new_task("gone")]);
        assert_eq!(
            state_n(&conn, "gone"),
            None,
            "a new task of that id starts without a state"
        );
    }
    // Deleted while a round is under way, before the round reaches it.
    let mut j = Journaled::open(dir.path());
    let tasks = PIECE_STATES + 10;
    let name = |i: usize| format!("t{i:04}");
    let mut muts: Vec<Mutation> = (0..tasks).map(|i| new_task(&name(i))).collect();
    muts.extend((0..tasks).map(|i| state_mut(&name(i), 1)));
    j.commit(muts);
    j.states.begin_now();
    j.piece();
    let last = name(tasks - 1);
    j.commit(vec![removal(TaskId::parse(&last).expect("id"))]);
    while j.states.due() {
        j.piece();
    }
    assert_eq!(table_n(&j.conn, &last), None);
    assert_eq!(j.state_n(&last), None);
    assert_eq!(j.state_n(&name(tasks - 2)), Some(1));
    assert!(j.unfolded.is_empty());
}

#[test]
fn states_journaled_by_a_process_that_died_are_folded_at_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut j = Journaled::open(dir.path());
        j.commit(vec![new_task("a"), state_mut("a", 1), state_mut("a", 2)]);
        j.commit(vec![state_mut("a", 3), state_mut("ghost", 1)]);
        assert_eq!(count(&j.conn, "task_state"), 0);
    }
    assert_eq!(journal(dir.path()).0, 1);
    let (conn, loaded) = open(dir.path()).expect("reopen");
    assert_eq!(state_n(&conn, "a"), Some(3));
    assert_eq!(
        table_n(&conn, "ghost"),
        None,
        "a state of a task the database does not hold is not replayed"
    );
    assert_eq!(journal(dir.path()), (0, 0));
    assert!(loaded.unfolded.is_empty());
}

#[test]
fn a_journal_torn_by_a_crash_replays_up_to_its_last_whole_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut j = Journaled::open(dir.path());
        j.commit(vec![new_task("a")]);
        j.commit(vec![state_mut("a", 1)]);
        j.commit(vec![state_mut("a", 2)]);
    }
    let (_, bytes) = journal(dir.path());
    let path = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "journal"))
        .expect("journal");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open journal");
    file.set_len(bytes - 3).expect("tear");
    drop(file);
    let (conn, _) = open(dir.path()).expect("a torn journal opens");
    assert_eq!(state_n(&conn, "a"), Some(1), "the last whole group's state");
    assert_eq!(journal(dir.path()), (0, 0));
}

/// An older journal file, the one a round was covering when the machine crashed, may end torn
/// as well as the newest: with `process` durability neither was synced. It is read up to its
/// tear, as the newest is, and the newer file after it; refused as damage, the operator would
/// move it away and every state in it with it.
#[test]
fn an_older_journal_file_torn_by_a_crash_replays_up_to_its_tear_and_the_newer_file_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = |i: usize| format!("t{i:04}");
    // One more than a piece: `z-` ids come after them all in a round (task-id order).
    let tasks = PIECE_STATES + 1;
    {
        let mut j = Journaled::open(dir.path());
        let mut all: Vec<Mutation> = (0..tasks).map(|i| new_task(&name(i))).collect();
        all.extend([new_task("z-before"), new_task("z-torn")]);
        j.commit(all);
        j.commit(vec![state_mut("z-before", 1)]);
        let mut last: Vec<Mutation> = (0..tasks).map(|i| state_mut(&name(i), 1)).collect();
        last.push(state_mut("z-torn", 1));
        j.commit(last);
        // A round begins (the appends go to file 2), folds its first piece and is not over
        // when the machine crashes.
        j.states.begin_now();
        let piece = j.piece();
        assert_eq!(
            (piece.states_written, piece.files_deleted),
            (PIECE_STATES, 0)
        );
        j.commit(vec![state_mut(&name(tasks - 1), 2)]);
    }
    let older = dir.path().join("states-1.journal");
    let len = std::fs::metadata(&older).expect("file 1").len();
    std::fs::File::options()
        .write(true)
        .open(&older)
        .and_then(|f| f.set_len(len - 3))
        .expect("tear file 1's last group");
    assert!(dir.path().join("states-2.journal").exists());
    let (conn, _) = open(dir.path()).expect("opens");
    assert_eq!(
        state_n(&conn, "z-before"),
        Some(1),
        "file 1 before its tear"
    );
    assert_eq!(state_n(&conn, "z-torn"), None, "file 1's torn group");
    assert_eq!(state_n(&conn, &name(tasks - 1)), Some(2), "file 2");
    assert_eq!(state_n(&conn, &name(0)), Some(1), "folded before the crash");
    assert_eq!(journal(dir.path()), (0, 0));
}

#[test]
fn a_corrupt_journal_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut j = Journaled::open(dir.path());
        j.commit(vec![new_task("a"), state_mut("a", 1)]);
    }
    let path = dir.path().join("states-1.journal");
    let mut bytes = std::fs::read(&path).expect("journal");
    bytes[..8].copy_from_slice(b"NOTMINE!");
    std::fs::write(&path, &bytes).expect("write");
    let before = file_bytes(dir.path());
    let err = open(dir.path()).map(|_| ()).expect_err("refused");
    assert!(
        matches!(&err, StoreError::CorruptJournal { path: p, .. } if *p == path),
        "{err}"
    );
    assert!(
        err.to_string().contains("not a tether state journal"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&path).expect("journal"),
        bytes,
        "journal untouched"
    );
    assert_eq!(file_bytes(dir.path()), before, "database untouched");
}

#[test]
fn an_empty_journal_is_refused_as_corrupt_by_name_and_left_untouched_with_the_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut j = Journaled::open(dir.path());
        j.commit(vec![new_task("a"), state_mut("a", 1)]);
    }
    // The journal of a process that stopped without folding, its bytes lost.
    let path = dir.path().join("states-1.journal");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(0))
        .expect("empty the journal");
    let before = file_bytes(dir.path());
    for _ in 0..2 {
        let err = open(dir.path()).map(|_| ()).expect_err("refused");
        assert!(
            matches!(&err, StoreError::CorruptJournal { path: p, .. } if *p == path),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("empty (0 bytes)"), "{msg}");
        assert!(path.exists(), "journal left in place");
        assert_eq!(std::fs::metadata(&path).expect("journal").len(), 0);
        assert_eq!(file_bytes(dir.path()), before, "database untouched");
    }
}

#[test]
fn a_group_journaled_in_several_frames_is_replayed_whole() {
    let group = || {
        vec![
            new_task("a"),
            new_task("b"),
            state_mut("a", 1),
            state_mut("b", 2),
        ]
    };
    let (whole, split) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    Journaled::open(whole.path()).commit(group());
    {
        let mut j = Journaled::open(split.path());
        j.states.split_frames_at(1);
        j.commit(group());
    }
    assert!(
        journal(split.path()).1 > journal(whole.path()).1,
        "a frame's head for each state"
    );
    // As after a crash: the states come back from the journal alone.
    let (conn, _) = open(split.path()).expect("reopen");
    assert_eq!(
        (state_n(&conn, "a"), state_n(&conn, "b")),
        (Some(1), Some(2))
    );
}

#[test]
fn an_upgrade_reads_an_older_coordinators_journals_as_it_wrote_them_then_creates_them_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut j = Journaled::open(dir.path());
        j.commit(vec![new_task("a"), state_mut("a", 1)]);
    }
    // As a coordinator of schema 4 left the directory: a journal with a group in it, and an
    // empty one it created and crashed before writing its header.
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("db");
        conn.execute_batch("PRAGMA user_version = 4;")
            .expect("version");
    }
    let empty = dir.path().join("states-2.journal");
    std::fs::write(&empty, b"").expect("empty journal");
    let version = |conn: &Connection| -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version")
    };
    let (conn, _) = open(dir.path()).expect("an older coordinator's empty journal is accepted");
    assert_eq!(state_n(&conn, "a"), Some(1), "replayed");
    assert_eq!(journal(dir.path()), (0, 0), "both replayed and removed");
    assert_eq!(version(&conn), SCHEMA_VERSION);
    drop(conn);
    // From now on this directory's journals are created whole: an empty one is damage.
    {
        let _j = Journaled::open(dir.path());
    }
    std::fs::write(dir.path().join("states-1.journal"), b"").expect("empty journal");
    let err = open(dir.path()).map(|_| ()).expect_err("refused");
    assert!(err.to_string().contains("empty (0 bytes)"), "{err}");
}

#[test]
fn a_temporary_journal_file_a_crash_left_is_removed_at_start_and_not_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path()).expect("open"));
    // Not a journal (a creation cut short), whatever it holds.
    let temporary = dir.path().join("states-3.journal.tmp");
    std::fs::write(&temporary, b"TS").expect("write");
    let (conn, loaded) = open(dir.path()).expect("open");
    assert!(!temporary.exists());
    assert!(loaded.unfolded.is_empty());
    drop(conn);
}

#[test]
fn durability_machine_syncs_the_journal_at_every_group_with_states_and_process_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    for sync in [true, false] {
        let (mut conn, loaded) = open(dir.path()).expect("open");
        let mut states =
            States::start(dir.path(), loaded.unfolded.clone(), sync, FOLD_BYTES).expect("journal");
        for muts in [
            vec![new_task("a"), state_mut("a", 1)],
            vec![new_task("b")],
            vec![state_mut("a", 2), state_mut("b", 1)],
        ] {
            let mut batches = vec![Batch {
                muts,
                effects: vec![],
                reads: vec![],
            }];
            commit(&mut conn, &mut batches, &mut states).expect("commit");
        }
        assert_eq!(states.synced(), if sync { 2 } else { 0 }, "sync {sync}");
        drop(conn);
        let (conn, _) = open(dir.path()).expect("reopen");
        assert_eq!(state_n(&conn, "a"), Some(2), "sync {sync}");
    }
}

#[test]
fn a_version_2_database_keeps_its_task_states_through_the_migrations() {
    let dir = tempfile::tempdir().expect("tempdir");
    old_database(
        dir.path(),
        2,
        "INSERT INTO task_state (task_id, attempt, state, updated_at) VALUES ('a', 1, ?1, 'x')",
        r#"{"n":7}"#,
    );
    let (mut conn, _) = open(dir.path()).expect("open migrates");
    assert_eq!(state_n(&conn, "a"), Some(7));
    commit_muts(&mut conn, vec![state_mut("a", 8)]);
    assert_eq!(state_n(&conn, "a"), Some(8));
}

#[test]
fn a_version_3_database_s_state_log_is_folded_by_the_migration_and_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    old_database(
        dir.path(),
        3,
        "INSERT INTO task_state_log (task_id, attempt, state, updated_at) VALUES ('a', 1, ?1, 'x')",
        r#"{"n":7}"#,
    );
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).expect("old");
        conn.execute_batch(
            r#"INSERT INTO task_state_log (task_id, attempt, state, updated_at) VALUES ('a', 1, '{"n":9}', 'y'), ('b', 2, '{"n":1}', 'z');
               INSERT INTO task_state (task_id, attempt, state, updated_at) VALUES ('a', 1, '{"n":3}', 'w');"#,
        )
        .expect("old rows");
    }
    let (conn, _) = open(dir.path()).expect("open migrates");
    assert_eq!(state_n(&conn, "a"), Some(9), "the log's newest");
    assert_eq!(state_n(&conn, "b"), Some(1));
    assert!(!in_schema(&conn, "task_state_log"), "the log table is gone");
}

/// A writer thread on the database in `dir`.
struct Writer {
    tx: tokio::sync::mpsc::Sender<Batch>,
    thread: std::thread::JoinHandle<()>,
    unfolded: Arc<Unfolded>,
    dir: PathBuf,
}

impl Writer {
    /// A writer without a commit window: the tests commit one group after another.
    fn start(dir: &Path) -> Writer {
        Writer::start_with(
            dir,
            WriterOptions {
                commit_interval: std::time::Duration::ZERO,
                ..Default::default()
            },
        )
    }

    fn start_with(dir: &Path, opts: WriterOptions) -> Writer {
        let (conn, loaded) = open(dir).expect("open");
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let thread = spawn_writer(
            conn,
            dir.join(DB_FILE),
            rx,
            Arc::default(),
            Default::default(),
            opts,
            loaded.unfolded.clone(),
        )
        .expect("writer");
        Writer {
            tx,
            thread,
            unfolded: loaded.unfolded,
            dir: dir.to_owned(),
        }
    }

    /// Commits `muts` as one group; answers the bytes of the journal files the writer holds
    /// and the rows of `task_state`, as the group's effect sees them.
    fn group(&self, muts: Vec<Mutation>) -> (u64, i64) {
        let (done, seen) = std::sync::mpsc::channel();
        let dir = self.dir.clone();
        let effect = Effect::Run(Box::new(move |conn: &Connection| {
            let _ = done.send((held_journal(&dir), count(conn, "task_state")));
        }));
        self.tx
            .blocking_send(Batch {
                muts,
                effects: vec![effect],
                reads: vec![],
            })
            .expect("send");
        seen.recv().expect("effect ran")
    }

    fn stop(self) {
        drop(self.tx);
        self.thread.join().expect("writer ends");
    }
}

/// The writer's options set the database's durability as well as the journal's.
#[test]
fn the_writer_sets_the_database_s_durability_from_its_options() {
    for (durability, want) in [(Durability::Machine, 2), (Durability::Process, 1)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Writer::start_with(
            dir.path(),
            WriterOptions {
                durability,
                ..Default::default()
            },
        );
        let (done, seen) = std::sync::mpsc::channel();
        let effect = Effect::Run(Box::new(move |conn: &Connection| {
            let sync: i64 = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("synchronous");
            let _ = done.send(sync);
        }));
        w.tx.blocking_send(Batch {
            muts: vec![new_task("a")],
            effects: vec![effect],
            reads: vec![],
        })
        .expect("send");
        assert_eq!(seen.recv().expect("effect ran"), want, "{durability:?}");
        w.stop();
    }
}

/// A batch of one state whose effect says when it ran.
fn timed(task: &str, n: u32, done: std::sync::mpsc::Sender<std::time::Instant>) -> Batch {
    let effect = Effect::Run(Box::new(move |_: &Connection| {
        let _ = done.send(std::time::Instant::now());
    }));
    Batch {
        muts: vec![state_mut(task, n)],
        effects: vec![effect],
        reads: vec![],
    }
}

/// The writer says how long it has been on its group while a group holds it (here an effect
/// that does not return; out of space, the commit), and nothing once it is done: sessions
/// ping their workers while the acknowledgements wait (`ws`).
#[test]
fn the_writer_says_how_long_a_group_has_held_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (conn, _) = open(dir.path()).expect("open");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let stats = Arc::new(StoreStats::default());
    let thread = spawn_writer(
        conn,
        dir.path().join(DB_FILE),
        rx,
        stats.clone(),
        Default::default(),
        WriterOptions::default(),
        Arc::default(),
    )
    .expect("writer");
    assert_eq!(stats.held_for(), None, "idle");
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (entered, inside) = std::sync::mpsc::channel();
    let mut b = Batch::default();
    b.muts.push(state_mut("t-held", 1));
    b.effect(move |_| {
        let _ = entered.send(());
        let _ = held.recv();
    });
    tx.blocking_send(b).expect("send");
    inside.recv().expect("the effect ran");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let for_ = stats.held_for().expect("held");
    assert!(for_ >= std::time::Duration::from_millis(100), "{for_:?}");
    release.send(()).expect("release");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stats.held_for().is_some() {
        assert!(std::time::Instant::now() < deadline, "still held");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(tx);
    thread.join().expect("writer ends");
}

/// A stop while a commit waits for space ends the writer: the waiting group, never
/// acknowledged, is given up (its senders send it again). The writer used to try it again for
/// as long as the space ran out, and the coordinator's stop waited with it, signals or not.
#[test]
fn a_stop_while_a_commit_waits_for_space_ends_the_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (conn, _) = open(dir.path()).expect("open");
    // No page more than it has: the next commit that grows the file finds no room.
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .expect("pages");
    conn.execute_batch(&format!("PRAGMA max_page_count = {pages}"))
        .expect("max pages");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let stats = Arc::new(StoreStats::default());
    let stopping = tokio_util::sync::CancellationToken::new();
    let thread = spawn_writer(
        conn,
        dir.path().join(DB_FILE),
        rx,
        stats.clone(),
        (Default::default(), stopping.clone()),
        WriterOptions::default(),
        Arc::default(),
    )
    .expect("writer");
    tx.blocking_send(Batch {
        muts: (0..2000).map(|i| new_task(&format!("t{i}"))).collect(),
        effects: vec![],
        reads: vec![],
    })
    .expect("send");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !stats.out_of_space.load(Ordering::Acquire) {
        assert!(std::time::Instant::now() < deadline, "never out of space");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    stopping.cancel();
    // The sender is kept (a core blocked handing the writer more): the stop alone ends it.
    let (ended, waited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = ended.send(thread.join().is_ok());
    });
    let joined = waited.recv_timeout(std::time::Duration::from_secs(15));
    assert_eq!(joined, Ok(true), "the writer ended after the stop");
    drop(tx);
}

/// Within the group commit window, batches wait for one commit together; after a quiet spell
/// a batch commits at once.
#[test]
fn batches_within_the_commit_window_commit_together_and_a_quiet_writer_commits_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (conn, _) = open(dir.path()).expect("open");
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let stats = Arc::new(StoreStats::default());
    let window = std::time::Duration::from_millis(500);
    let thread = spawn_writer(
        conn,
        dir.path().join(DB_FILE),
        rx,
        stats.clone(),
        Default::default(),
        WriterOptions {
            commit_interval: window,
            ..Default::default()
        },
        Arc::default(),
    )
    .expect("writer");
    let (done, ran) = std::sync::mpsc::channel();
    // The first batch: nothing committed before, so at once.
    let sent = std::time::Instant::now();
    tx.blocking_send(timed("a", 0, done.clone())).expect("send");
    let first = ran.recv().expect("first effect");
    assert!(
        first - sent < window / 2,
        "first commit after {:?}",
        first - sent
    );
    // Ten batches a millisecond apart, right after: one commit at the end of the window.
    for n in 1..=10 {
        tx.blocking_send(timed("a", n, done.clone())).expect("send");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let times: Vec<_> = (0..10).map(|_| ran.recv().expect("effect")).collect();
    assert_eq!(
        stats.commits.load(Ordering::Relaxed),
        2,
        "the ten batches in one commit"
    );
    assert!(times.iter().all(|t| *t - first >= window * 9 / 10));
    // A quiet spell longer than the window: the next batch commits at once.
    std::thread::sleep(window + window / 5);
    let sent = std::time::Instant::now();
    tx.blocking_send(timed("a", 11, done)).expect("send");
    let last = ran.recv().expect("last effect");
    assert!(
        last - sent < window / 2,
        "after a quiet spell: {:?}",
        last - sent
    );
    assert_eq!(stats.commits.load(Ordering::Relaxed), 3);
    drop(tx);
    thread.join().expect("writer ends");
    let (conn, _) = open(dir.path()).expect("reopen");
    assert_eq!(state_n(&conn, "a"), Some(11));
}

/// An API read runs on the reader's connection after its group committed: it sees that
/// group's state, and while it is held up (a large checkpoint downloading) the writer keeps
/// committing. On the writer's connection the second group would wait for the read.
#[test]
fn a_read_sees_its_group_committed_and_does_not_hold_up_the_commits_behind_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = Writer::start(dir.path());
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (answer, answered) = std::sync::mpsc::channel();
    let unfolded = w.unfolded.clone();
    let read: Job = Box::new(move |conn: &Connection| {
        let seen =
            n_of(read_state(conn, &unfolded, &TaskId::parse("a").expect("id")).expect("read"));
        let _ = held.recv();
        let _ = answer.send(seen);
    });
    let (done, committed) = std::sync::mpsc::channel();
    let effect = Effect::Run(Box::new(move |_: &Connection| {
        let _ = done.send(());
    }));
    w.tx.blocking_send(Batch {
        muts: vec![new_task("a"), state_mut("a", 1)],
        effects: vec![effect],
        reads: vec![read],
    })
    .expect("send");
    committed.recv().expect("first group committed");
    // Committed and acknowledged while the read is still held.
    let (done, committed) = std::sync::mpsc::channel();
    let effect = Effect::Run(Box::new(move |conn: &Connection| {
        let _ = done.send(count(conn, "tasks"));
    }));
    w.tx.blocking_send(Batch {
        muts: vec![new_task("b"), state_mut("a", 2)],
        effects: vec![effect],
        reads: vec![],
    })
    .expect("send");
    let second = committed.recv_timeout(std::time::Duration::from_secs(10));
    assert!(answered.try_recv().is_err(), "the read is still held");
    release.send(()).expect("read waiting");
    assert_eq!(
        second,
        Ok(2),
        "the second group committed while the read was held"
    );
    let seen = answered.recv().expect("read ran");
    assert!(
        matches!(seen, Some(1 | 2)),
        "the read saw its own group's commit (or the next): {seen:?}"
    );
    w.stop();
}

#[test]
fn the_writer_folds_the_states_a_second_after_the_last_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = Writer::start(dir.path());
    let (_, table) = w.group(vec![new_task("a"), new_task("b"), state_mut("a", 1)]);
    assert_eq!(table, 0, "journaled, not folded yet");
    std::thread::sleep(FOLD_EVERY);
    // The fold runs after this group's effects, so they do not see it...
    assert_eq!(w.group(vec![state_mut("a", 2)]).1, 0);
    // ...and the next group's do.
    assert_eq!(w.group(vec![state_mut("b", 1)]).1, 1);
    assert_eq!(w.unfolded.len(), 1, "b's state is newer than the round");
    w.stop();
    assert_eq!(
        journal(dir.path()),
        (0, 0),
        "a writer that stops folds everything"
    );
    let (conn, _) = open(dir.path()).expect("reopen");
    assert_eq!(table_n(&conn, "a"), Some(2));
    assert_eq!(table_n(&conn, "b"), Some(1));
}

/// Runs the test `name` (its path in this crate) again, alone, in a child process of this test
/// binary, for a fault that would touch every test of this process (a resource limit). Answers
/// whether this is the child, which runs the test; the parent checks that the child passed and
/// printed `done`.
pub(super) fn in_a_child(name: &str, done: &str) -> bool {
    const CHILD: &str = "TETHER_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let me = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(me)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains(done), "{text}");
    false
}

/// A commit's I/O error carries the system error behind it, read from its connection: SQLite
/// says "disk I/O error" of a quota reached as of a failing disk, and only that number tells
/// them apart (`space::sql_out_of_space`). The error is real: a file size limit
/// (RLIMIT_FSIZE, SIGXFSZ ignored) at the WAL's end, in a child process of this test binary,
/// makes the WAL's next write fail with EFBIG, which is not for want of space.
#[test]
fn a_commits_io_error_carries_the_system_error_behind_it() {
    const DONE: &str = "the commit's system error read";
    let name = "store::tests::a_commits_io_error_carries_the_system_error_behind_it";
    if !in_a_child(name, DONE) {
        return;
    }
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: ignoring a signal installs no handler; this process runs this test alone.
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.expect("ignore SIGXFSZ");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut j = Journaled::open(dir.path());
    j.commit(vec![new_task("a")]);
    let wal = std::fs::metadata(dir.path().join("tether.db-wal"))
        .expect("wal")
        .len();
    let (_, hard) = getrlimit(Resource::RLIMIT_FSIZE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_FSIZE, wal, hard).expect("limit");
    let mut batches = vec![Batch {
        muts: vec![new_task("b")],
        ..Batch::default()
    }];
    let failed = commit(&mut j.conn, &mut batches, &mut j.states)
        .expect_err("past the limit")
        .with_errno(&j.conn);
    setrlimit(Resource::RLIMIT_FSIZE, hard, hard).expect("no limit");
    assert!(
        matches!(failed, WriteError::SqlIo { errno, .. } if errno == nix::libc::EFBIG),
        "{failed:?}"
    );
    assert!(!failed.out_of_space(), "{failed}");
    assert!(failed.to_string().contains("File too large"), "{failed}");
    j.commit(vec![new_task("b")]);
    println!("{DONE}");
}

/// A fold round that cannot open its next journal file (no file descriptor to be had, as in
/// a storm of reconnections) stopped the coordinator, though nothing waits on a fold and the
/// states were safe in the journal. The writer goes on committing and acknowledging, the round
/// is tried again, and once files open again it goes through and the files it covered go. The
/// failure is real: RLIMIT_NOFILE lowered in a child process of this test binary, where no
/// other test runs.
#[test]
fn a_fold_round_that_cannot_open_its_next_journal_file_is_tried_again_while_the_writer_goes_on() {
    const DONE: &str = "folded once files could be opened again";
    let name = "store::tests::a_fold_round_that_cannot_open_its_next_journal_file_is_tried_again_while_the_writer_goes_on";
    if !in_a_child(name, DONE) {
        return;
    }
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    let (conn, loaded) = open(dir.path()).expect("open");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let stats = Arc::new(StoreStats::default());
    let fatal = CancellationToken::new();
    let thread = spawn_writer(
        conn,
        dir.path().join(DB_FILE),
        rx,
        stats.clone(),
        (fatal.clone(), CancellationToken::new()),
        // A round is due after every group with a state.
        WriterOptions {
            commit_interval: Duration::ZERO,
            fold_bytes: 1,
            ..Default::default()
        },
        loaded.unfolded,
    )
    .expect("writer");
    // Opens nothing: the checks below run while no file can be opened.
    let acknowledged = |muts: Vec<Mutation>| {
        let (done, ran) = std::sync::mpsc::channel();
        let mut b = Batch {
            muts,
            ..Batch::default()
        };
        b.effect(move |_| {
            let _ = done.send(());
        });
        tx.blocking_send(b).expect("the writer takes the group");
        ran.recv_timeout(Duration::from_secs(10))
            .expect("the group acknowledged");
    };
    let file = |generation: u64| dir.path().join(format!("states-{generation}.journal"));
    acknowledged(vec![new_task("a"), state_mut("a", 1)]);
    // The first round moved the appends to file 2 and removed file 1 (on the reaper's thread).
    let deadline = Instant::now() + Duration::from_secs(20);
    while file(1).exists() {
        assert!(Instant::now() < deadline, "file 1 removed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(file(2).exists());

    // Every descriptor from the lowest free one on is refused (EMFILE).
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let lowest = std::fs::File::open("/dev/null").expect("a descriptor");
    let free = lowest.as_raw_fd() as u64;
    drop(lowest);
    setrlimit(Resource::RLIMIT_NOFILE, free, hard).expect("limit");
    assert!(
        std::fs::File::open("/dev/null").is_err(),
        "no descriptor left"
    );
    for n in 2..=4 {
        acknowledged(vec![state_mut("a", n)]);
    }
    assert!(!fatal.is_cancelled(), "the writer goes on");
    assert!(
        stats.fold_failures.load(Ordering::Relaxed) >= 1,
        "the round was due and failed"
    );
    assert!(file(2).exists() && !file(3).exists(), "no next file made");
    assert!(!dir.path().join("states-3.journal.tmp").exists());
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("no limit");

    // Tried again (a second after it failed), it goes through and file 2 goes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 5;
    while file(2).exists() {
        assert!(Instant::now() < deadline, "file 2 removed");
        acknowledged(vec![state_mut("a", n)]);
        n += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    // The appends went on in a later file: the 3rd, or a later one where the reaper removed
    // file 2 only after the next group's round had moved them on again (on a loaded machine).
    let newest = (3..u64::from(n) + 3).rev().find(|&g| file(g).exists());
    assert!(newest.is_some(), "the appends go to a later file");
    assert!(!fatal.is_cancelled());
    drop(tx);
    thread.join().expect("writer ends");
    let (conn, _) = open(dir.path()).expect("reopen");
    assert!(
        state_n(&conn, "a").is_some_and(|n| n >= 5),
        "the newest state"
    );
    println!("{DONE}");
}

#[test]
fn under_steady_states_the_writer_folds_and_the_journal_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fold_bytes = 64 * 1024;
    let w = Writer::start_with(
        dir.path(),
        WriterOptions {
            commit_interval: std::time::Duration::ZERO,
            fold_bytes,
            ..Default::default()
        },
    );
    // About 5 KiB a group; a round of 128 tasks takes two pieces, one after each group.
    let per_group = 128usize;
    w.group((0..per_group).map(|i| new_task(&format!("t{i}"))).collect());
    let (mut longest, mut folded) = (0, 0);
    let groups = 200u32;
    for g in 0..groups {
        let muts = (0..per_group)
            .map(|i| state_mut(&format!("t{i}"), g))
            .collect();
        let (bytes, table) = w.group(muts);
        longest = longest.max(bytes);
        folded = folded.max(table);
        // The covered file (up to `fold_bytes` and a group) until the round ends, and the
        // groups the round took in the next one; a finished round's file is removed by
        // another thread, which a loaded machine delays by a dozen groups or more (2 x
        // `fold_bytes` was once passed by 419 bytes beside a CI run). Unbounded, the 200
        // groups would hold a megabyte.
        assert!(
            bytes < 3 * fold_bytes,
            "group {g}: {bytes} bytes of journal"
        );
    }
    assert!(
        longest >= fold_bytes,
        "the journal grew to a round: {longest}"
    );
    assert_eq!(folded, per_group as i64, "every task's state was folded");
    w.stop();
    let (conn, _) = open(dir.path()).expect("reopen");
    assert_eq!(table_n(&conn, "t7"), Some(u64::from(groups - 1)));
}

#[test]
fn the_wal_starts_over_while_the_writer_keeps_committing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let restart = 512;
    let w = Writer::start_with(
        dir.path(),
        WriterOptions {
            wal_restart_frames: restart,
            ..Default::default()
        },
    );
    let wal = dir.path().join(format!("{DB_FILE}-wal"));
    let frame = 4096 + 24;
    // Each commit appends at least one frame; without start-overs the WAL would pass 4x the
    // frames after which the writer makes it start over (after a pass of the checkpointer,
    // or at twice that without one).
    let commits = 4 * restart as u32;
    for n in 0..commits {
        let worker = Worker::new(
            WorkerId::parse(&format!("w{}", n % 64)).expect("id"),
            Utc::now(),
        );
        w.group(vec![Mutation::PutWorker(Box::new(worker))]);
    }
    let size = std::fs::metadata(&wal).expect("wal").len();
    assert!(
        size < 3 * restart * frame,
        "{size} bytes of WAL after {commits} commits"
    );
    w.stop();
    assert_eq!(
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0),
        0,
        "truncated at the end"
    );
}

/// Once the WAL is long the checkpointer passes often and says so, once per pass: the writer
/// finishes a checkpoint right after one, when little is left to copy.
#[test]
fn the_checkpointer_says_when_it_has_just_passed_over_a_long_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (conn, _) = open(dir.path()).expect("open");
    wal::track_wal(&conn);
    let c = wal::Checkpointer::start(&dir.path().join(DB_FILE), 64).expect("checkpointer");
    let passed_within = |limit: std::time::Duration| {
        let t = std::time::Instant::now();
        while t.elapsed() < limit {
            if c.just_passed() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    };
    // A short WAL: passes every CHECKPOINT_EVERY, none of them over a long WAL.
    conn.execute_batch("CREATE TABLE t (x TEXT)")
        .expect("create");
    assert!(!passed_within(3 * CHECKPOINT_EVERY), "the WAL is short");
    // 200 commits of a page each: the WAL is past 64 frames until a start-over.
    let big = "x".repeat(3000);
    for _ in 0..200 {
        conn.execute("INSERT INTO t VALUES (?1)", [&big])
            .expect("insert");
    }
    assert!(wal::wal_frames() >= 64, "{} frames", wal::wal_frames());
    assert!(
        passed_within(3 * CHECKPOINT_EVERY),
        "a pass over the long WAL"
    );
    // Said once per pass, and passes come every CATCH_UP_EVERY while it stays long.
    assert!(!c.just_passed());
    assert!(passed_within(20 * CATCH_UP_EVERY), "passes again soon");
    // The writer's own pass copies what is left, and the next commit starts the WAL over. With
    // the checkpointer stopped first: a pass of it at the same moment leaves part of the WAL
    // (the writer then tries again after its next group), which made this flaky.
    drop(c);
    wal::finish_checkpoint(&conn).expect("finish");
    conn.execute("INSERT INTO t VALUES ('after')", [])
        .expect("insert after");
    assert!(
        wal::wal_frames() < 64,
        "started over: {} frames",
        wal::wal_frames()
    );
}

/// What `session`'s mailbox holds: the first sequence number of each `acks`, in order.
fn acked_firsts(rx: &mut crate::core::mailbox::Receiver<crate::core::Outgoing>) -> Vec<u64> {
    let mut got = Vec::new();
    while let Ok(crate::core::Outgoing::Msg(m)) = rx.try_recv() {
        if let CoordMsg::Acks(a) = *m {
            got.push(a.recorded[0].0.0);
        }
    }
    got
}

#[test]
fn a_batch_hands_a_session_its_consecutive_messages_together_and_in_order() {
    let acks = |n: u64| CoordMsg::Acks(tether_proto::msg::Acks::of(vec![tether_proto::Seq(n)]));
    let (tx, mut rx_a) = crate::core::mailbox::channel();
    let a = SessionRef::new(1, tx);
    let (tx, mut rx_b) = crate::core::mailbox::channel();
    let b = SessionRef::new(2, tx);
    let mut batch = Batch::default();
    batch.send(&a, acks(1));
    batch.send(&a, acks(2));
    batch.send(&b, acks(3));
    batch.send(&a, acks(4));
    let (ran, ran_rx) = std::sync::mpsc::channel();
    batch.effect(move |_| {
        let _ = ran.send(());
    });
    batch.send(&a, acks(5));
    batch.send(&a, acks(6));
    // A run of messages to one session is one effect; another session's, or a job, ends it.
    let runs: Vec<usize> = batch
        .effects
        .iter()
        .map(|e| match e {
            Effect::Send(_, msgs) => msgs.len(),
            Effect::Run(_) => 0,
        })
        .collect();
    assert_eq!(runs, vec![2, 1, 1, 0, 2]);
    let conn = Connection::open_in_memory().expect("sqlite");
    for e in batch.effects {
        e.run(&conn);
    }
    assert!(ran_rx.try_recv().is_ok(), "the job ran");
    assert_eq!(acked_firsts(&mut rx_a), vec![1, 2, 4, 5, 6]);
    assert_eq!(acked_firsts(&mut rx_b), vec![3]);
    // A session that has ended takes nothing, and nothing fails.
    drop(rx_b);
    let mut batch = Batch::default();
    batch.send(&b, acks(7));
    for e in batch.effects {
        e.run(&conn);
    }
}

#[test]
fn a_checkpoint_range_is_read_across_its_pieces_and_only_for_its_own_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let (task, cid) = (
        TaskId::parse("t").expect("id"),
        CheckpointId::parse("c").expect("id"),
    );
    // Pieces of 3, 1, 4 and 2 bytes: 0 1 2 | 3 | 4 5 6 7 | 8 9.
    let pieces: [&[u8]; 4] = [&[0, 1, 2], &[3], &[4, 5, 6, 7], &[8, 9]];
    let mut muts = vec![Mutation::PutCheckpoint {
        meta: CheckpointMeta {
            checkpoint_id: cid.clone(),
            task_id: task.clone(),
            attempt: Attempt(1),
            worker: WorkerId::parse("w").expect("id"),
            size: 10,
            chunks: 4,
            created_at: Utc::now(),
        },
        complete: true,
    }];
    for (idx, data) in pieces.iter().enumerate() {
        muts.push(Mutation::PutChunk {
            checkpoint_id: cid.clone(),
            idx: idx as u32,
            data: data.to_vec(),
        });
    }
    commit_muts(&mut conn, muts);
    let read = |offset, len| {
        read_checkpoint_range(&conn, &task, &cid, offset, len)
            .expect("read")
            .expect("found")
    };
    let all: Vec<u8> = (0..10).collect();
    for offset in 0..10u64 {
        for len in 1..=11u64 {
            let end = (offset + len).min(10) as usize;
            assert_eq!(
                read(offset, len),
                all[offset as usize..end],
                "{offset}+{len}"
            );
        }
    }
    assert!(read(10, 5).is_empty(), "past the end: nothing");
    let other = TaskId::parse("other").expect("id");
    assert_eq!(
        read_checkpoint_range(&conn, &other, &cid, 0, 10).expect("read"),
        None,
        "another task's checkpoint is not served"
    );
    let missing = CheckpointId::parse("missing").expect("id");
    assert_eq!(
        read_checkpoint_range(&conn, &task, &missing, 0, 10).expect("read"),
        None
    );
}

/// A task stored with a failed result's error text as long as a frame (before the record kept
/// at most 4 KiB of it, or imported) is loaded with that text cut as a recorded result's is
/// (on a character boundary, with a marker saying how much went); its stored result keeps the
/// whole text.
#[test]
fn a_stored_tasks_long_error_is_cut_at_load_and_its_stored_result_kept_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    // Two-byte characters after one byte: the bound falls inside a character.
    let message = format!("x{}", "é".repeat(512 * 1024));
    let mut t = task("big", 0, TaskStatus::Failed);
    t.outcome = Some(Outcome::Failed);
    t.error = Some(message.clone());
    let body = serde_json::json!({"outcome": "failed", "error": {"message": message}});
    commit_muts(
        &mut conn,
        vec![
            Mutation::PutTask(Box::new(t)),
            Mutation::PutResult {
                task_id: TaskId::parse("big").expect("id"),
                attempt: Attempt(1),
                worker: WorkerId::parse("w").expect("id"),
                outcome: Outcome::Failed,
                stale: false,
                body: body.to_string(),
            },
            Mutation::PutTask(Box::new({
                let mut short = task("short", 1, TaskStatus::Failed);
                short.error = Some("exit 1".into());
                short
            })),
        ],
    );
    drop(conn);
    let (conn, loaded) = open(dir.path()).expect("reopen");
    let kept = loaded.tasks[0].error.as_deref().expect("an error");
    let bound = 4096;
    assert!(kept.len() <= bound, "{} bytes", kept.len());
    let at = kept.find('…').expect("a marker");
    assert!(message.starts_with(&kept[..at]));
    let cut = message.len() - at;
    assert!(kept.ends_with(&format!("… (cut: {cut} bytes)")), "{kept}");
    assert_eq!(loaded.tasks[1].error.as_deref(), Some("exit 1"));
    let results = read_results(&conn, &TaskId::parse("big").expect("id")).expect("results");
    let stored: serde_json::Value = serde_json::from_str(results[0].body.get()).expect("JSON");
    assert_eq!(stored["error"]["message"], message.as_str(), "kept whole");
}
