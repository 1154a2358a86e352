//! The worker's files are its user's alone whatever the umask (`private`): checked on what a
//! task with a checkpoint leaves in the state directory, and on what an older worker left.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tether_proto::file_modes::{Umask, mode, modes};
use tether_proto::{Attempt, CheckpointId, TaskId, WorkerId};

use super::StateDir;
use crate::eventlog::EventLog;
use crate::executor::{StoredCheckpoint, orphans, packing};

fn tid(s: &str) -> TaskId {
    TaskId::parse(s).expect("id")
}

/// Runs what a command task with a checkpoint makes in the state directory `state`, as the
/// agent and the command executor do: the task recorded running, its process group recorded,
/// its checkpoint kept and put back in its checkpoint directory, with the event log beside.
/// The checkpoint holds `note` and `sub/data`, both 0644 as the task made them. Returns the open
/// state directory and the log.
fn run_task(state: &Path, task: &TaskId) -> (Arc<StateDir>, EventLog) {
    let src = tempfile::tempdir().expect("src");
    std::fs::write(src.path().join("note"), b"n").expect("note");
    std::fs::create_dir(src.path().join("sub")).expect("sub");
    std::fs::write(src.path().join("sub/data"), b"d").expect("data");
    let data = packing::pack(src.path()).expect("pack");
    let (sd, _) = StateDir::open(state, &WorkerId::parse("w1").expect("id")).expect("open");
    sd.task_started(task, Attempt(1)).expect("start");
    let cp = StoredCheckpoint {
        id: CheckpointId::random(),
        attempt: Attempt(1),
        data: Arc::new(data.clone()),
        piece: 0,
    };
    sd.store_checkpoint(task, &cp).expect("checkpoint");
    let groups = state.join(orphans::GROUPS_DIR);
    orphans::record(
        &orphans::record_file(&groups, task),
        nix::unistd::Pid::this(),
        "mark",
    );
    let dir = state.join(super::TASKS_DIR).join(task.as_str());
    packing::unpack(&data, &dir).expect("unpack");
    let log = EventLog::open(&state.join("events.log"), "w1").expect("log");
    (sd, log)
}

/// Under umask 022 every file a task with a checkpoint leaves in the state directory is 0600
/// and every directory 0700: the databases with their `-wal` and `-shm` (looked at while they
/// are open), the lock, the process-group record, the event log, the checkpoint directory and
/// what unpacking made in it. The exception, by decision: a file put back from a checkpoint
/// keeps the mode the task gave it where it was packed (its script's execute bit), in a
/// directory no other user can enter.
#[test]
fn every_file_a_task_with_a_checkpoint_leaves_in_the_state_dir_is_its_users_alone() {
    let _umask = Umask::usual();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("made/state");
    let task = tid("t1");
    let (sd, log) = run_task(&state, &task);
    let put_back = state.join(super::TASKS_DIR).join("t1");
    let kept_by_task = |p: &Path| p.starts_with(&put_back) && p.is_file();
    let check = |when: &str| {
        let found = modes(&state);
        let names: Vec<String> = found
            .iter()
            .filter_map(|(p, _)| p.strip_prefix(&state).ok())
            .map(|p| p.display().to_string())
            .collect();
        for want in [
            "worker.db",
            "checkpoints.db",
            "lock",
            "groups/t1",
            "events.log",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        for (path, m) in found {
            let want = match () {
                () if path.is_dir() => 0o700,
                () if kept_by_task(&path) => 0o644,
                () => 0o600,
            };
            assert_eq!(m, want, "{} {when}: {m:o}", path.display());
        }
    };
    assert!(
        std::fs::read_dir(&state)
            .expect("state")
            .flatten()
            .any(|e| e.file_name() == "worker.db-wal"),
        "the -wal is there to be looked at"
    );
    check("while open");
    drop(log);
    drop(sd);
    check("after the worker closed them");
    assert_eq!(mode(&state), 0o700, "the state directory");
}

/// What an older worker made with the umask's mode (0644 files, 0755 directories) is made
/// private at the next open, and read as before: the task it left running is lost, its
/// checkpoint kept. The event log is made private at its open too.
#[test]
fn an_older_workers_files_open_to_others_are_made_private_at_open_and_read_as_before() {
    let _umask = Umask::usual();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let task = tid("t1");
    let (sd, log) = run_task(&state, &task);
    drop(log);
    drop(sd);
    let opened = |p: &Path| {
        let m = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    };
    let (tasks, groups) = (
        state.join(super::TASKS_DIR),
        state.join(orphans::GROUPS_DIR),
    );
    let (db, cps, events) = (
        state.join("worker.db"),
        state.join("checkpoints.db"),
        state.join("events.log"),
    );
    for p in [&db, &cps, &events, &tasks, &groups] {
        opened(p);
    }
    let (sd, restored) = StateDir::open(&state, &WorkerId::parse("w1").expect("id")).expect("open");
    let lost: Vec<&TaskId> = restored.lost.iter().map(|t| &t.task_id).collect();
    assert_eq!(lost, [&task], "the task left running is lost");
    assert!(
        sd.latest_checkpoint(&task).expect("read").is_some(),
        "its checkpoint is kept"
    );
    let _log = EventLog::open(&events, "w1").expect("log");
    for (p, want) in [
        (&db, 0o600),
        (&cps, 0o600),
        (&events, 0o600),
        (&tasks, 0o700),
        (&groups, 0o700),
    ] {
        assert_eq!(mode(p), want, "{}: {:o}", p.display(), mode(p));
    }
}
