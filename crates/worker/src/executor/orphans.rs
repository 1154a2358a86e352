//! Processes of `command` tasks that outlive a killed worker.
//!
//! A worker killed with SIGKILL cannot stop its tasks' processes. The `command` executor
//! records each process group it starts in `groups/<task_id>` of the state directory (without
//! one, of the agent's scratch directory, whose records the next worker process on the machine
//! reads: `agent::remove_dead_scratch`)
//! (`"<pgid> <start time> <mark>"`, the mark its processes carry in their environment, see
//! [`super::procs`]) and removes the record once the attempt's processes have ended. At the
//! next start every record left over names the processes of the previous worker process: the
//! group is killed (when its leader is still the process recorded, not a reused pid), and so is
//! every process still carrying the mark (those that left the group), before the lost tasks
//! are reported, so an orphan cannot keep writing into the checkpoint directory a resumed
//! attempt uses.
//!
//! The records have a directory of their own: beside the checkpoint directories
//! (`tasks/<task_id>.group`, where workers before this one kept them) the record of task `X`
//! was the path of the checkpoint directory of a task named `X.group`. Records found there are
//! still read at start, so a worker upgraded after a crash kills what the old one left.

use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tether_proto::TaskId;

use crate::statedir::start_time;

/// The directory of the records, in the state directory.
pub const GROUPS_DIR: &str = "groups";
/// Where workers before [`GROUPS_DIR`] kept the records: `tasks/<task_id>.group`.
const LEGACY_DIR: &str = "tasks";
const LEGACY_SUFFIX: &str = ".group";
/// Recorded for a start time that could not be read: matches no process.
const UNKNOWN_START: &str = "-";

/// Where the process group of `task` is recorded, under `groups_root` ([`GROUPS_DIR`]). Every
/// task id names a file of its own there: ids are non-empty, hold no `/` and are never `.` or
/// `..`, and nothing else lives in the directory.
pub(crate) fn record_file(groups_root: &Path, task: &TaskId) -> PathBuf {
    groups_root.join(task.as_str())
}

/// Records a started group and the mark of its processes (best effort: a failure only means a
/// crash could leave them running).
pub(crate) fn record(file: &Path, pgid: Pid, mark: &str) {
    let pid = pgid.as_raw().unsigned_abs();
    let start = start_time(pid).unwrap_or_else(|| UNKNOWN_START.to_owned());
    let stamp = format!("{pid} {start} {mark}");
    let write = || {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // The worker's user's alone, as the state directory's other files are.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::statedir::FILE_MODE)
            .open(file)
            .and_then(|mut f| f.write_all(stamp.as_bytes()))
    };
    let written = match file.parent() {
        Some(dir) => crate::statedir::create_private_dir(dir).and_then(|()| write()),
        None => write(),
    };
    if let Err(e) = written {
        tracing::warn!(file = %file.display(), error = %e, "cannot record a task's process group");
    }
}

/// Removes the record of group `pgid` once it ended, unless the file records another group
/// now (a newer attempt of the same task started and recorded its own).
pub(crate) fn forget(file: &Path, pgid: Pid) {
    let content = std::fs::read_to_string(file).unwrap_or_default();
    let recorded = Record::parse(&content).map(|r| r.pgid);
    if recorded == Some(pgid.as_raw().unsigned_abs()) {
        let _ = std::fs::remove_file(file);
    }
}

/// One record, as written by [`record`] (or without its mark, by an older worker).
#[derive(Debug, PartialEq, Eq)]
struct Record<'a> {
    pgid: u32,
    start: &'a str,
    mark: Option<&'a str>,
}

impl<'a> Record<'a> {
    fn parse(content: &'a str) -> Option<Self> {
        let mut parts = content.split_whitespace();
        let pgid = parts.next()?.parse().ok()?;
        let start = parts.next().unwrap_or(UNKNOWN_START);
        Some(Self {
            pgid,
            start,
            mark: parts.next(),
        })
    }
}

/// Kills the processes recorded in the state directory `state_dir` by a previous process
/// (groups whose leader still runs, and processes carrying a recorded mark), and removes the
/// records: those in [`GROUPS_DIR`], and those an older worker left in `tasks/`. Returns the
/// number of records whose processes were found running and killed.
pub fn kill_orphans(state_dir: &Path) -> usize {
    let groups = files(&state_dir.join(GROUPS_DIR)).into_iter();
    let legacy = files(&state_dir.join(LEGACY_DIR))
        .into_iter()
        .filter(|path| path.to_string_lossy().ends_with(LEGACY_SUFFIX));
    groups
        .chain(legacy)
        .filter(|path| kill_recorded(path))
        .count()
}

/// The regular files in `dir` (in `tasks/`, checkpoint directories are not records, whatever
/// their name).
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect()
}

/// Kills what the record at `path` names, removes it; whether anything was running.
fn kill_recorded(path: &Path) -> bool {
    let content = std::fs::read_to_string(path).unwrap_or_default();
    let mut killed = false;
    if let Some(r) = Record::parse(&content) {
        if r.pgid > 1
            && start_time(r.pgid).as_deref() == Some(r.start)
            && let Ok(raw) = i32::try_from(r.pgid)
            && killpg(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
        {
            tracing::warn!(pgid = r.pgid, record = %path.display(), "killed the process group of a task that outlived the previous worker process");
            killed = true;
        }
        if let Some(mark) = r.mark {
            let n = super::procs::kill_marked(mark);
            if n > 0 {
                tracing::warn!(processes = n, %mark, record = %path.display(), "killed processes of a task that left its group and outlived the previous worker process");
                killed = true;
            }
        }
    }
    let _ = std::fs::remove_file(path);
    killed
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;
    use crate::executor::procs::MARK_ENV;

    fn tid(s: &str) -> TaskId {
        TaskId::parse(s).expect("id")
    }

    fn sleeper(mark: Option<&str>) -> (std::process::Child, Pid) {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("300").process_group(0);
        if let Some(mark) = mark {
            cmd.env(MARK_ENV, mark);
        }
        let child = cmd.spawn().expect("spawn sleep");
        let pgid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        (child, pgid)
    }

    fn killed(mut child: std::process::Child) -> bool {
        let status = child.wait().expect("reap");
        std::os::unix::process::ExitStatusExt::signal(&status) == Some(9)
    }

    #[test]
    fn a_recorded_live_group_is_killed_and_a_stale_record_is_only_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let groups = dir.path().join(GROUPS_DIR);
        let (child, pgid) = sleeper(None);
        let live = record_file(&groups, &tid("t1"));
        record(&live, pgid, "nonce:t1:1");
        // A record whose pid now belongs to another process (different start time).
        let stale = record_file(&groups, &tid("t2"));
        std::fs::write(&stale, format!("{} 1", std::process::id())).expect("write");
        assert_eq!(kill_orphans(dir.path()), 1);
        assert!(killed(child), "the orphan was killed");
        assert!(!live.exists() && !stale.exists(), "records removed");
        assert_eq!(kill_orphans(dir.path()), 0);
    }

    /// A process that left its task's group (its own session here) escapes the group's kill;
    /// the mark recorded with the group finds it.
    #[test]
    fn a_process_that_left_its_group_is_killed_by_its_recorded_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mark = format!("{}:t:1", uuid::Uuid::new_v4().simple());
        let (leader, pgid) = sleeper(Some(&mark));
        let (escaped, _) = sleeper(Some(&mark));
        let (unmarked, _) = sleeper(Some("another-worker:t:1"));
        record(
            &record_file(&dir.path().join(GROUPS_DIR), &tid("t")),
            pgid,
            &mark,
        );
        assert_eq!(kill_orphans(dir.path()), 1);
        assert!(killed(leader) && killed(escaped));
        let mut unmarked = unmarked;
        assert!(
            matches!(unmarked.try_wait(), Ok(None)),
            "another mark's process runs on"
        );
        let _ = unmarked.kill();
        let _ = unmarked.wait();
    }

    /// A worker upgraded after a crash still kills what the old one recorded in `tasks/`; a
    /// checkpoint directory there named like a record (task `x.group`) is left alone.
    #[test]
    fn records_an_older_worker_left_beside_the_checkpoint_dirs_are_still_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tasks = dir.path().join(LEGACY_DIR);
        std::fs::create_dir_all(tasks.join("x.group")).expect("mkdir");
        let (child, pgid) = sleeper(None);
        let pid = pgid.as_raw().unsigned_abs();
        let old = tasks.join("t.group");
        let start = start_time(pid).expect("start time");
        std::fs::write(&old, format!("{pid} {start}")).expect("write");
        assert_eq!(kill_orphans(dir.path()), 1);
        assert!(killed(child));
        assert!(!old.exists());
        assert!(
            tasks.join("x.group").is_dir(),
            "a checkpoint dir is no record"
        );
    }

    /// A group's end removes its own record only: a newer attempt may have recorded its group
    /// in the same file meanwhile.
    #[test]
    fn an_ended_group_forgets_its_own_record_and_not_a_newer_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = record_file(dir.path(), &tid("t"));
        let (older, newer) = (Pid::from_raw(4_000_001), Pid::from_raw(4_000_002));
        record(&file, older, "n:t:1");
        record(&file, newer, "n:t:2");
        forget(&file, older);
        assert!(file.exists(), "the newer attempt's record stays");
        forget(&file, newer);
        assert!(!file.exists());
        forget(&file, newer);
    }

    #[test]
    fn records_of_every_format_parse() {
        let r = |pgid, start, mark| Some(Record { pgid, start, mark });
        assert_eq!(Record::parse("12 345 n:t:1"), r(12, "345", Some("n:t:1")));
        assert_eq!(Record::parse("12 345"), r(12, "345", None));
        assert_eq!(Record::parse("12 "), r(12, UNKNOWN_START, None));
        assert_eq!(Record::parse(""), None);
    }
}
