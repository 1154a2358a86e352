//! Store tests on real database files in a temporary directory.

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use tether_proto::msg::StateJson;
use tether_proto::{Attempt, Outcome, TaskId, TaskSpec, TaskStatus, WorkerId};

use super::*;

fn task(id: &str, seq: u64, status: TaskStatus) -> Task {
    Task {
        task_id: TaskId::parse(id).expect("id"),
        spec: Arc::new(TaskSpec::new("sleep", serde_json::json!({}))),
        status,
        attempt: Attempt(1),
        lease: None,
        submit_seq: seq,
        submitted_at: Utc::now(),
        updated_at: Utc::now(),
        finished_at: status.is_terminal().then(Utc::now),
        outcome: None,
        error: None,
        latest_checkpoint: None,
        attempts: vec![],
        lease_started: None,
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
    commit(conn, &mut batches, &mut Folder::new()).expect("commit");
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
    commit_muts(
        &mut conn,
        vec![Mutation::DeleteTask(TaskId::parse("gone").expect("id"))],
    );
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
    commit(&mut conn, &mut batches, &mut Folder::new()).expect("commit");
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
    let indexes: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'tasks_status'",
            [],
            |r| r.get(0),
        )
        .expect("indexes");
    assert_eq!(indexes, 0, "the unused status index is gone");
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
fn a_task_round_trips_through_its_spec_and_doc_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let mut t = task("a", 0, TaskStatus::Running);
    t.spec = Arc::new(TaskSpec::new(
        "command",
        serde_json::json!({"argv": ["true"]}),
    ));
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
fn of_several_states_of_a_task_in_one_group_the_last_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
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
    commit(&mut conn, &mut batches, &mut Folder::new()).expect("commit");
    let (attempt, state, _) = read_state(&conn, &TaskId::parse("a").expect("id"))
        .expect("read")
        .expect("a state");
    assert_eq!((attempt, state), (2, serde_json::json!({"n": 3})));
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

fn state_mut(task: &str, n: u32) -> Mutation {
    Mutation::PutState {
        task_id: TaskId::parse(task).expect("id"),
        attempt: Attempt(1),
        state: StateJson::from_text(format!("{{\"n\":{n}}}")).expect("json"),
    }
}

fn state_n(conn: &Connection, task: &str) -> Option<u64> {
    read_state(conn, &TaskId::parse(task).expect("id"))
        .expect("read")
        .and_then(|(_, s, _)| s["n"].as_u64())
}

#[test]
fn states_are_logged_then_folded_and_the_latest_is_read_either_way() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    commit_muts(&mut conn, vec![state_mut("a", 1), state_mut("b", 1)]);
    commit_muts(&mut conn, vec![state_mut("a", 2)]);
    assert_eq!(state_n(&conn, "a"), Some(2), "from the log");
    assert_eq!(
        (count(&conn, "task_state_log"), count(&conn, "task_state")),
        (3, 0)
    );
    assert_eq!(compact_states(&conn).expect("fold"), 3);
    assert_eq!(
        (count(&conn, "task_state_log"), count(&conn, "task_state")),
        (0, 2)
    );
    assert_eq!(state_n(&conn, "a"), Some(2), "from the table");
    assert_eq!(state_n(&conn, "b"), Some(1));
    commit_muts(&mut conn, vec![state_mut("a", 3)]);
    assert_eq!(
        state_n(&conn, "a"),
        Some(3),
        "the log is newer than the table"
    );
    assert_eq!(compact_states(&conn).expect("fold"), 1);
    assert_eq!(state_n(&conn, "a"), Some(3));
    assert_eq!(state_n(&conn, "none"), None);
}

#[test]
fn a_task_deleted_while_its_states_are_logged_keeps_none_even_under_the_same_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let t = |id| Mutation::PutTask(Box::new(task(id, 0, TaskStatus::Completed)));
    commit_muts(
        &mut conn,
        vec![
            t("gone"),
            t("kept"),
            state_mut("gone", 1),
            state_mut("kept", 1),
        ],
    );
    commit_muts(&mut conn, vec![state_mut("gone", 2)]);
    commit_muts(
        &mut conn,
        vec![Mutation::DeleteTask(TaskId::parse("gone").expect("id"))],
    );
    assert_eq!(state_n(&conn, "gone"), None);
    assert_eq!(state_n(&conn, "kept"), Some(1), "folded, not lost");
    assert_eq!(count(&conn, "task_state_log"), 0);
    commit_muts(&mut conn, vec![t("gone")]);
    assert_eq!(
        state_n(&conn, "gone"),
        None,
        "a new task of that id starts without a state"
    );
}

#[test]
fn states_logged_by_a_process_that_died_are_folded_at_the_next_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut conn, _) = open(dir.path()).expect("open");
        commit_muts(&mut conn, vec![state_mut("a", 1), state_mut("a", 2)]);
        commit_muts(&mut conn, vec![state_mut("a", 3)]);
    }
    let (conn, _) = open(dir.path()).expect("reopen");
    assert_eq!(count(&conn, "task_state_log"), 0);
    assert_eq!(state_n(&conn, "a"), Some(3));
}

#[test]
fn a_version_2_database_keeps_its_task_states_and_gets_the_state_log() {
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

/// A writer thread on the database in `dir`.
struct Writer {
    tx: tokio::sync::mpsc::Sender<Batch>,
    thread: std::thread::JoinHandle<()>,
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
        let (conn, _) = open(dir).expect("open");
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let thread = spawn_writer(
            conn,
            dir.join(DB_FILE),
            rx,
            Arc::default(),
            tokio_util::sync::CancellationToken::new(),
            opts,
        )
        .expect("writer");
        Writer { tx, thread }
    }

    /// Commits `muts` as one group; answers the log's and the table's row counts as the
    /// group's effect sees them.
    fn group(&self, muts: Vec<Mutation>) -> (i64, i64) {
        let (done, seen) = std::sync::mpsc::channel();
        let effect = Effect::Run(Box::new(move |conn: &Connection| {
            let _ = done.send((count(conn, "task_state_log"), count(conn, "task_state")));
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
        tokio_util::sync::CancellationToken::new(),
        WriterOptions {
            commit_interval: window,
            ..Default::default()
        },
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
    let read: Job = Box::new(move |conn: &Connection| {
        let seen = state_n(conn, "a");
        let _ = held.recv();
        let _ = answer.send(seen);
    });
    let (done, committed) = std::sync::mpsc::channel();
    let effect = Effect::Run(Box::new(move |_: &Connection| {
        let _ = done.send(());
    }));
    w.tx.blocking_send(Batch {
        muts: vec![state_mut("a", 1)],
        effects: vec![effect],
        reads: vec![read],
    })
    .expect("send");
    committed.recv().expect("first group committed");
    // Committed and acknowledged while the read is still held.
    let (done, committed) = std::sync::mpsc::channel();
    let effect = Effect::Run(Box::new(move |conn: &Connection| {
        let _ = done.send(count(conn, "task_state_log"));
    }));
    w.tx.blocking_send(Batch {
        muts: vec![state_mut("a", 2)],
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
fn the_writer_folds_the_state_log_a_second_after_the_last_fold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = Writer::start(dir.path());
    assert_eq!(
        w.group(vec![state_mut("a", 1)]),
        (1, 0),
        "logged, not folded yet"
    );
    std::thread::sleep(FOLD_EVERY);
    // The fold runs after this group's effects, so they still see the log...
    assert_eq!(w.group(vec![state_mut("a", 2)]), (2, 0));
    // ...and the next group's see it folded.
    assert_eq!(w.group(vec![state_mut("b", 1)]), (1, 1));
    w.stop();
    let (conn, _) = open(dir.path()).expect("reopen");
    assert_eq!(state_n(&conn, "a"), Some(2));
    assert_eq!(state_n(&conn, "b"), Some(1));
}

fn commit_with(conn: &mut Connection, folder: &mut Folder, muts: Vec<Mutation>) {
    let mut batches = vec![Batch {
        muts,
        effects: vec![],
        reads: vec![],
    }];
    commit(conn, &mut batches, folder).expect("commit");
}

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

#[test]
fn a_fold_round_writes_each_task_s_newest_state_then_deletes_what_it_covers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let mut f = Folder::new();
    for m in [state_mut("a", 1), state_mut("b", 1), state_mut("a", 2)] {
        commit_with(&mut conn, &mut f, vec![m]);
    }
    assert!(!f.due(), "neither a second nor {FOLD_ROWS} rows yet");
    f.begin_now();
    assert_eq!(
        f.piece(&conn).expect("fold"),
        fold::Piece {
            states_written: 2,
            rows_deleted: 3
        }
    );
    assert!(!f.due(), "round over");
    assert_eq!(
        (table_n(&conn, "a"), table_n(&conn, "b")),
        (Some(2), Some(1))
    );
    assert_eq!(count(&conn, "task_state_log"), 0);

    // A round bigger than a piece; states logged meanwhile stay for the next round.
    let tasks = PIECE_BUDGET / 16 + 44;
    for i in 0..tasks {
        commit_with(&mut conn, &mut f, vec![state_mut(&format!("t{i:04}"), 1)]);
    }
    f.begin_now();
    let first = f.piece(&conn).expect("fold");
    assert_eq!((first.states_written, first.rows_deleted), (tasks - 44, 0));
    commit_with(&mut conn, &mut f, vec![state_mut("t0000", 2)]);
    commit_with(
        &mut conn,
        &mut f,
        vec![state_mut(&format!("t{:04}", tasks - 1), 2)],
    );
    assert!(f.due(), "the round goes on");
    let second = f.piece(&conn).expect("fold");
    assert_eq!((second.states_written, second.rows_deleted), (44, tasks));
    assert_eq!(count(&conn, "task_state_log"), 2, "the newer states stay");
    assert_eq!(table_n(&conn, "t0000"), Some(1));
    assert_eq!(state_n(&conn, "t0000"), Some(2), "read from the log first");
    assert_eq!(state_n(&conn, &format!("t{:04}", tasks - 1)), Some(2));
    assert_eq!(state_n(&conn, "t0001"), Some(1));
    f.begin_now();
    f.piece(&conn).expect("fold");
    assert_eq!(table_n(&conn, "t0000"), Some(2));
    assert_eq!(count(&conn, "task_state_log"), 0);
}

/// States are appended several rows a statement (`LOG_ROWS`), in runs broken by other
/// mutations: each row must still be known to the folder as its own task's, so each task ends
/// with its own newest state.
#[test]
fn states_appended_together_are_each_folded_as_their_own_task_s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let mut f = Folder::new();
    let tasks = 2 * LOG_ROWS + 7;
    let n = |i: usize, round: usize| (i * 10 + round) as u32;
    // Every task, then every other one in the opposite order: a row credited to the wrong
    // task would leave some task with an older state, or none.
    let rounds: [Vec<usize>; 2] = [
        (0..tasks).collect(),
        (0..tasks).rev().filter(|i| i.is_multiple_of(2)).collect(),
    ];
    for (round, order) in rounds.iter().enumerate() {
        let mut muts: Vec<Mutation> = order
            .iter()
            .map(|&i| state_mut(&format!("t{i:03}"), n(i, round)))
            .collect();
        // A run broken by another kind of mutation.
        let worker = Worker::new(WorkerId::parse("w").expect("id"), Utc::now());
        muts.insert(LOG_ROWS + 3, Mutation::PutWorker(Box::new(worker)));
        commit_with(&mut conn, &mut f, muts);
    }
    let newest = |i: usize| Some(u64::from(n(i, usize::from(i.is_multiple_of(2)))));
    for i in 0..tasks {
        assert_eq!(state_n(&conn, &format!("t{i:03}")), newest(i));
    }
    f.begin_now();
    while f.due() {
        f.piece(&conn).expect("fold");
    }
    assert_eq!(count(&conn, "task_state_log"), 0);
    for i in 0..tasks {
        assert_eq!(table_n(&conn, &format!("t{i:03}")), newest(i), "t{i:03}");
    }
}

#[test]
fn a_task_deleted_during_a_fold_round_stays_without_a_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut conn, _) = open(dir.path()).expect("open");
    let mut f = Folder::new();
    let tasks = PIECE_BUDGET / 16 + 10;
    for i in 0..tasks {
        commit_with(&mut conn, &mut f, vec![state_mut(&format!("t{i:04}"), 1)]);
    }
    f.begin_now();
    f.piece(&conn).expect("fold");
    let last = format!("t{:04}", tasks - 1);
    assert_eq!(table_n(&conn, &last), None, "not written yet");
    commit_with(
        &mut conn,
        &mut f,
        vec![Mutation::DeleteTask(TaskId::parse(&last).expect("id"))],
    );
    assert!(!f.due(), "the deletion folded the whole log");
    assert_eq!(f.piece(&conn).expect("fold"), fold::Piece::default());
    assert_eq!(state_n(&conn, &last), None);
    assert_eq!(state_n(&conn, &format!("t{:04}", tasks - 2)), Some(1));
    assert_eq!(count(&conn, "task_state_log"), 0);
}

#[test]
fn under_steady_states_the_writer_folds_in_pieces_and_the_log_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = Writer::start(dir.path());
    let per_group = 1024usize;
    // A round writes `per_group` states and deletes FOLD_ROWS rows, a piece per group.
    let pieces = per_group * 16 / PIECE_BUDGET + FOLD_ROWS / PIECE_BUDGET + 1;
    let bound = (FOLD_ROWS + (pieces + 1) * per_group) as i64;
    let (mut longest, mut folded) = (0, 0);
    for g in 0..(3 * FOLD_ROWS / per_group) as u32 {
        let muts = (0..per_group)
            .map(|i| state_mut(&format!("t{i}"), g))
            .collect();
        let (log, table) = w.group(muts);
        longest = longest.max(log);
        folded = folded.max(table);
        assert!(log < bound, "group {g}: {log} rows in the log");
    }
    assert!(longest >= FOLD_ROWS as i64, "the log filled up to a round");
    assert_eq!(folded, per_group as i64, "every task's state was folded");
    w.stop();
    let (conn, _) = open(dir.path()).expect("reopen");
    assert_eq!(
        state_n(&conn, "t7"),
        Some(3 * FOLD_ROWS as u64 / per_group as u64 - 1)
    );
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
        w.group(vec![state_mut(&format!("t{}", n % 64), n)]);
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
