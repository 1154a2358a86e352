//! A worker restarted after a crash, with its state directory: what it keeps for the tasks it
//! lost. Real time and real SQLite files; the crash is the runtime dropped under the agent (no
//! shutdown runs: nothing is stopped or recorded as ended).

use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};
use tether_proto::{Attempt, CheckpointId, TaskId, TaskRef, WorkerId};
use tether_worker::ConnState;
use tether_worker::executor::StoredCheckpoint;
use tether_worker::statedir::{CHECKPOINTS_FILE, DB_FILE, StateDir};

use crate::fake::{FakeConnector, REASSIGNED, Running, STOPPING, Script};

/// Real time: how long the test waits for the worker to settle.
const SETTLE: Duration = Duration::from_secs(20);

fn count(db: &std::path::Path, sql: &str) -> i64 {
    Connection::open(db)
        .and_then(|c| c.query_row(sql, [], |r| r.get(0)))
        .expect("count")
}

/// The attempt under which `checkpoints.db` keeps the task's checkpoint, if it keeps one.
fn kept_under(dir: &std::path::Path, task: &str) -> Option<u32> {
    Connection::open(dir.join(CHECKPOINTS_FILE))
        .and_then(|c| {
            c.query_row(
                "SELECT attempt FROM checkpoints WHERE task_id = ?1",
                [task],
                |r| r.get(0),
            )
            .optional()
        })
        .expect("read")
}

/// A task running at a crash comes back to the same worker at attempt 2, which resumes from
/// the checkpoint attempt 1 left on disk. The coordinator then has been told attempt 1 was
/// lost, and the worker forgets it: not the checkpoint attempt 2 runs on, which a second crash
/// (before attempt 2 checkpoints itself) hands to the next start, still kept under attempt 1.
#[test]
fn a_checkpoint_a_newer_attempt_resumed_from_survives_forgetting_the_lost_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = WorkerId::parse("w").expect("id");
    let task = TaskId::parse(REASSIGNED).expect("id");
    let cp_id = CheckpointId::parse("c-1").expect("id");
    // The first process: attempt 1 runs and checkpoints, then the process dies.
    {
        let (sd, _) = StateDir::open(dir.path(), &id).expect("open");
        sd.task_started(&task, Attempt(1)).expect("start");
        let cp = StoredCheckpoint {
            id: cp_id.clone(),
            attempt: Attempt(1),
            data: Arc::new(b"7".to_vec()),
            piece: 0,
        };
        sd.store_checkpoint(&task, &cp).expect("checkpoint");
    }
    // The second: reports attempt 1 lost, is given attempt 2, and dies too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let fake = FakeConnector::new(Script::Reassign);
        let mut cfg = tether_worker::WorkerConfig::new("ws://coordinator.invalid:1", id.clone());
        cfg.state_dir = Some(dir.path().to_owned());
        let running = Running::start(&fake, cfg);
        running.wait_state(|s| s == ConnState::Connected).await;
        let (db, t0) = (dir.path().join(DB_FILE), tokio::time::Instant::now());
        let settled = || {
            let active = running.handle.active_tasks();
            let lost = count(&db, "SELECT count(*) FROM lost");
            let owed = count(&db, "SELECT count(*) FROM forget");
            let kept = kept_under(dir.path(), REASSIGNED);
            let done = active == [TaskRef::new(task.clone(), Attempt(2))]
                && lost == 0
                && owed == 0
                && kept == Some(1);
            (
                done,
                format!("active {active:?}, lost {lost}, owed {owed}, kept under {kept:?}"),
            )
        };
        loop {
            let (done, what) = settled();
            if done {
                break;
            }
            assert!(t0.elapsed() < SETTLE, "after {SETTLE:?}: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(running);
    });
    drop(rt);
    let (sd, restored) = StateDir::open(dir.path(), &id).expect("reopen");
    assert_eq!(restored.lost, [TaskRef::new(task.clone(), Attempt(2))]);
    assert_eq!(restored.checkpoints.len(), 1, "{:?}", restored.checkpoints);
    let (t, cp) = &restored.checkpoints[0];
    assert_eq!(
        (t, &cp.id, cp.attempt, cp.bytes),
        (&task, &cp_id, Attempt(1), 1)
    );
    let kept = sd.latest_checkpoint(&task).expect("read").expect("kept");
    assert_eq!(kept.data.as_slice(), b"7");
}

/// A worker told to stop while its coordinator is gone stops its task, which writes a last
/// checkpoint as it stops. No `worker_stopped` reached the coordinator, which ends the lease
/// only at the next process's registration: the attempt stays recorded as running, with that
/// checkpoint, so the next start reports it lost and a resume here may start from it.
/// Recorded as ended, it was neither reported lost nor kept: the next start swept the
/// checkpoint, and the coordinator answered its upload, replayed from the journal, stale.
#[test]
fn a_task_stopped_while_disconnected_is_lost_at_the_next_start_with_its_last_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let task = TaskId::parse(STOPPING).expect("id");
    let running_here = [TaskRef::new(task.clone(), Attempt(1))];
    let (sd, restored) = stop_running(
        dir.path(),
        Script::AssignThenGone,
        |cfg| cfg.stop_reconnect = Duration::from_millis(200),
        |running, fake| {
            running.handle.active_tasks() == running_here
                && fake.attempts().len() >= 2
                && running.handle.state() != ConnState::Connected
        },
        |_| {},
    );
    assert_eq!(restored.lost, [TaskRef::new(task.clone(), Attempt(1))]);
    assert_eq!(restored.checkpoints.len(), 1, "{:?}", restored.checkpoints);
    let (t, cp) = &restored.checkpoints[0];
    assert_eq!((t, cp.attempt, cp.bytes), (&task, Attempt(1), 4));
    let kept = sd.latest_checkpoint(&task).expect("read").expect("kept");
    assert_eq!(kept.data.as_slice(), b"last");
}

/// The same stop with the coordinator there: the task's last checkpoint is acknowledged and
/// `worker_stopped` sent, so the coordinator moves the task at once, from that checkpoint. The
/// attempt is recorded as ended: the next start reports nothing lost and keeps no checkpoint.
#[test]
fn a_task_stopped_once_the_coordinator_was_told_is_not_lost_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let task = TaskId::parse(STOPPING).expect("id");
    let running_here = [TaskRef::new(task, Attempt(1))];
    let (_sd, restored) = stop_running(
        dir.path(),
        Script::AssignAndStay,
        |_| {},
        |running, _| running.handle.active_tasks() == running_here,
        |fake| assert_eq!(fake.attempts().len(), 1, "one session, stopped in it"),
    );
    assert_eq!(restored.lost, []);
    assert_eq!(restored.entries.len(), 0, "everything acknowledged");
    assert_eq!(kept_under(dir.path(), STOPPING), None);
}

/// The same stop with the coordinator there, but its link never carries the last
/// checkpoint's piece in time: the announcement is acknowledged, the piece never is, so the
/// coordinator holds the checkpoint incomplete (and deletes it as the lease ends). The flush
/// ends with every result in: `worker_stopped` goes out and the task moves at once, but the
/// attempt stays recorded as running with that checkpoint: the next start reports it lost and
/// keeps it, and given the task back it resumes from it. Recorded as ended, as before, the
/// checkpoint was deleted and the task resumed from nothing.
#[test]
fn a_stopped_tasks_checkpoint_the_coordinator_never_completed_is_kept_and_resumed_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let task = TaskId::parse(STOPPING).expect("id");
    let running_here = [TaskRef::new(task.clone(), Attempt(1))];
    let (sd, restored) = stop_running(
        dir.path(),
        Script::AssignAndHoldPieces,
        |_| {},
        |running, _| running.handle.active_tasks() == running_here,
        |fake| {
            assert_eq!(fake.attempts().len(), 1, "one session, stopped in it");
            assert_eq!(fake.stopped(), 1, "worker_stopped went out");
            let pieces = fake.pieces.lock().expect("lock").clone();
            assert_eq!(
                pieces.len(),
                1,
                "the piece sent, never acknowledged: {pieces:?}"
            );
        },
    );
    assert_eq!(restored.lost, [TaskRef::new(task.clone(), Attempt(1))]);
    assert_eq!(restored.checkpoints.len(), 1, "{:?}", restored.checkpoints);
    let (t, cp) = &restored.checkpoints[0];
    assert_eq!((t, cp.attempt, cp.bytes), (&task, Attempt(1), 4));
    let kept = sd.latest_checkpoint(&task).expect("read").expect("kept");
    assert_eq!(kept.data.as_slice(), b"last");
    drop((sd, restored));

    // The next start: the task comes back at attempt 2, the coordinator naming no checkpoint.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let resumed = rt.block_on(async {
        let fake = FakeConnector::new(Script::ReassignStopping);
        let id = WorkerId::parse("w").expect("id");
        let mut cfg = tether_worker::WorkerConfig::new("ws://coordinator.invalid:1", id);
        cfg.state_dir = Some(dir.path().to_owned());
        let running = Running::start_with_last(&fake, cfg);
        let t0 = tokio::time::Instant::now();
        let result = loop {
            let results = fake.results.lock().expect("lock").clone();
            if let Some(r) = results.into_iter().find(|r| r.task_id == task) {
                break r;
            }
            assert!(t0.elapsed() < SETTLE, "no result after {SETTLE:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        running.stop().await;
        result
    });
    assert_eq!(resumed.attempt, Attempt(2));
    assert_eq!(resumed.outcome, tether_proto::Outcome::Completed);
    assert_eq!(
        resumed.result.to_value().expect("JSON"),
        "last",
        "resumed from the checkpoint kept"
    );
}

/// Runs worker `w` with its state in `dir` against a fake coordinator playing `script` (its
/// configuration as `edit` makes it) until `settled`, stops it, checks the fake with `after`,
/// and opens the state directory again as the next start would.
fn stop_running(
    dir: &std::path::Path,
    script: Script,
    edit: impl FnOnce(&mut tether_worker::WorkerConfig),
    settled: impl Fn(&Running, &FakeConnector) -> bool,
    after: impl FnOnce(&FakeConnector),
) -> (Arc<StateDir>, tether_worker::statedir::Restored) {
    let id = WorkerId::parse("w").expect("id");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let fake = FakeConnector::new(script);
        let mut cfg = tether_worker::WorkerConfig::new("ws://coordinator.invalid:1", id.clone());
        cfg.state_dir = Some(dir.to_owned());
        edit(&mut cfg);
        let running = Running::start_with_last(&fake, cfg);
        let t0 = tokio::time::Instant::now();
        while !settled(&running, &fake) {
            assert!(
                t0.elapsed() < SETTLE,
                "after {SETTLE:?}: active {:?}, {:?}",
                running.handle.active_tasks(),
                running.handle.state()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        running.stop().await;
        after(&fake);
    });
    drop(rt);
    StateDir::open(dir, &id).expect("reopen")
}

/// A crash between journaling a task's result and removing its checkpoint directory left
/// `tasks/<task>/` behind, for ever, and one as its process ended its result file
/// (`tasks/<task>.result.json`): the next start removes those of tasks neither running nor
/// lost, and keeps those of tasks lost with the previous process (an attempt that comes back
/// here may own them) and anything else.
#[tokio::test]
async fn a_start_sweeps_the_checkpoint_directories_of_tasks_neither_running_nor_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = WorkerId::parse("w").expect("id");
    let tasks = dir.path().join("tasks");
    // The previous process: `lost` runs when it dies; `gone` ended, its directory left.
    {
        let (sd, _) = StateDir::open(dir.path(), &id).expect("open");
        sd.task_started(&TaskId::parse("lost").expect("id"), Attempt(1))
            .expect("start");
        for t in ["lost", "gone"] {
            std::fs::create_dir_all(tasks.join(t).join("sub")).expect("mkdir");
            std::fs::write(tasks.join(t).join("sub").join("f"), b"x").expect("write");
        }
        std::fs::write(tasks.join("not-a-dir"), b"x").expect("write");
        for t in ["lost", "gone"] {
            std::fs::write(tasks.join(format!("{t}.result.json")), b"{}").expect("write");
        }
        // A link a task made its result file: removed as one (its target left alone).
        std::os::unix::fs::symlink(tasks.join("not-a-dir"), tasks.join("linked.result.json"))
            .expect("symlink");
    }
    let mut cfg = tether_worker::WorkerConfig::new("ws://coordinator.invalid:1", id);
    cfg.state_dir = Some(dir.path().to_owned());
    let agent = crate::fake::agent(&FakeConnector::new(Script::Refuse), cfg);
    assert_eq!(
        agent.lost(),
        [TaskRef::new(TaskId::parse("lost").expect("id"), Attempt(1))]
    );
    assert!(
        !tasks.join("gone").exists(),
        "the ended task's directory is swept"
    );
    assert!(
        tasks.join("lost").join("sub").join("f").exists(),
        "the lost task's directory is kept"
    );
    assert!(
        tasks.join("not-a-dir").exists(),
        "only directories and result files are swept"
    );
    assert!(
        !tasks.join("gone.result.json").exists(),
        "the ended task's result file is swept"
    );
    assert!(
        tasks.join("lost.result.json").exists(),
        "the lost task's result file is kept"
    );
    assert!(
        std::fs::symlink_metadata(tasks.join("linked.result.json")).is_err(),
        "a result file made a link is swept"
    );
}

/// The disk fills as a task ends: the journal cannot take its result (a trigger refuses
/// results in the outbox table, as a full disk refuses their large insert), while the small
/// commits that follow would still fit. The result goes out, is never acknowledged, and the
/// process dies. Its attempt was not recorded as ended on the strength of that result, nor its
/// checkpoint directory removed: the next start finds the result journaled or the attempt
/// lost, so the coordinator is told, and the directory is still there for a resume here.
/// Recorded as ended, the result was gone and the attempt not lost, the directory deleted.
#[test]
fn a_result_the_journal_could_not_take_leaves_its_attempt_lost_at_the_next_start() {
    use tether_proto::WorkerMsg;
    let dir = tempfile::tempdir().expect("tempdir");
    let id = WorkerId::parse("w").expect("id");
    // The task `Script::PieceForResult` assigns: a sleep of one step, at attempt 2.
    let task = TaskId::parse("t-1").expect("id");
    let task_dir = dir
        .path()
        .join(tether_worker::statedir::TASKS_DIR)
        .join(task.as_str());
    drop(StateDir::open(dir.path(), &id).expect("open"));
    let full = "CREATE TRIGGER full BEFORE INSERT ON outbox WHEN NEW.class = 0
        BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END";
    Connection::open(dir.path().join(DB_FILE))
        .and_then(|c| c.execute_batch(full))
        .expect("trigger");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let failures = rt.block_on(async {
        let fake = FakeConnector::new(Script::PieceForResult);
        let mut cfg = tether_worker::WorkerConfig::new("ws://coordinator.invalid:1", id.clone());
        cfg.state_dir = Some(dir.path().to_owned());
        let agent = crate::fake::agent(&fake, cfg);
        // Made after the start's sweep (a task neither running nor lost has no directory),
        // as a `command` task's executor makes it.
        std::fs::create_dir_all(&task_dir).expect("mkdir");
        std::fs::write(task_dir.join("progress"), b"3").expect("write");
        let running = Running::start_agent(agent);
        // The result went out, and the attempt's task is over: all it does after queueing
        // the result (its directory, the record of its end) is done.
        let t0 = tokio::time::Instant::now();
        while fake.outcomes.lock().expect("lock").is_empty()
            || running.handle.runner.live_tasks() > 0
        {
            assert!(
                t0.elapsed() < SETTLE,
                "after {SETTLE:?}: {} results, {} tasks",
                fake.outcomes.lock().expect("lock").len(),
                running.handle.runner.live_tasks()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let failures = running
            .handle
            .outbox
            .journal_failures
            .load(std::sync::atomic::Ordering::Relaxed);
        drop(running);
        failures
    });
    // Killed: the runtime goes with the agent, and no shutdown runs.
    drop(rt);
    assert!(failures >= 1, "the journal refused the result");
    Connection::open(dir.path().join(DB_FILE))
        .and_then(|c| c.execute_batch("DROP TRIGGER full"))
        .expect("room again");
    let (_sd, restored) = StateDir::open(dir.path(), &id).expect("reopen");
    let journaled = restored
        .entries
        .iter()
        .any(|(_, m)| matches!(m, WorkerMsg::TaskResult(r) if r.task_id == task));
    let lost = restored.lost == [TaskRef::new(task.clone(), Attempt(2))];
    assert!(
        journaled || lost,
        "neither the result journaled nor the attempt lost: entries {:?}, lost {:?}",
        restored.entries,
        restored.lost
    );
    assert!(
        task_dir.join("progress").exists(),
        "the attempt's directory is kept"
    );
}

/// A `checkpoints.db.new` (and its rollback journal) left beside `checkpoints.db`, by a start
/// that died making it (its rename on disk, their removal not), is removed at the next start,
/// which connects as usual and keeps the checkpoint of the task it lost; the databases in
/// place are not touched. Before, nothing ever removed it, and it may hold every checkpoint of
/// the directory.
#[test]
fn a_checkpoint_database_left_half_made_is_swept_and_the_worker_starts_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = WorkerId::parse("w").expect("id");
    let task = TaskId::parse("t-lost").expect("id");
    {
        let (sd, _) = StateDir::open(dir.path(), &id).expect("open");
        sd.task_started(&task, Attempt(1)).expect("start");
        let cp = StoredCheckpoint {
            id: CheckpointId::parse("c-1").expect("id"),
            attempt: Attempt(1),
            data: Arc::new(b"7".to_vec()),
            piece: 0,
        };
        sd.store_checkpoint(&task, &cp).expect("checkpoint");
    }
    let half_made = [
        dir.path().join(format!("{CHECKPOINTS_FILE}.new")),
        dir.path().join(format!("{CHECKPOINTS_FILE}.new-journal")),
    ];
    for f in &half_made {
        std::fs::write(f, vec![7u8; 64 * 1024]).expect("plant");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let fake = FakeConnector::new(Script::Healthy);
        let mut cfg = tether_worker::WorkerConfig::new("ws://coordinator.invalid:1", id.clone());
        cfg.state_dir = Some(dir.path().to_owned());
        let running = Running::start(&fake, cfg);
        running.wait_state(|s| s == ConnState::Connected).await;
        for f in &half_made {
            assert!(!f.exists(), "{} left", f.display());
        }
        assert_eq!(kept_under(dir.path(), "t-lost"), Some(1), "the lost task's");
        drop(running);
    });
}
