//! Process groups of `command` tasks that outlive a killed worker.
//!
//! A worker killed with SIGKILL cannot stop its tasks' process groups. With a state directory,
//! the `command` executor records each group it starts in `tasks/<task_id>.group`
//! ("<pgid> <start time>") and removes the record once the group has ended. At the next start
//! every record left over names a group of the previous process: it is killed (when that
//! process is still the one recorded, not a reused pid) before the lost tasks are reported, so
//! an orphan cannot keep writing into the checkpoint directory a resumed attempt uses.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::statedir::start_time;

const SUFFIX: &str = ".group";

/// Where the group of the task whose checkpoint directory is `checkpoint_dir` is recorded.
pub(crate) fn group_file(checkpoint_dir: &Path) -> PathBuf {
    let mut name = OsString::from(checkpoint_dir.as_os_str());
    name.push(SUFFIX);
    PathBuf::from(name)
}

/// Records a started group (best effort: a failure only means a crash could leave it running).
pub(crate) fn record(file: &Path, pgid: Pid) {
    let pid = pgid.as_raw().unsigned_abs();
    let stamp = format!("{pid} {}", start_time(pid).unwrap_or_default());
    if let Err(e) = std::fs::write(file, stamp) {
        tracing::warn!(file = %file.display(), error = %e, "cannot record a task's process group");
    }
}

/// Removes the record of group `pgid` once it ended, unless the file records another group
/// now (a newer attempt of the same task started and recorded its own).
pub(crate) fn forget(file: &Path, pgid: Pid) {
    let recorded = std::fs::read_to_string(file).ok().and_then(|content| {
        let pid = content.split_whitespace().next()?;
        pid.parse::<u32>().ok()
    });
    if recorded == Some(pgid.as_raw().unsigned_abs()) {
        let _ = std::fs::remove_file(file);
    }
}

/// Kills every group recorded under `tasks_root` by a previous process that still runs, and
/// removes the records. Returns the number of groups killed.
pub fn kill_orphans(tasks_root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(tasks_root) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.to_string_lossy().ends_with(SUFFIX) {
            continue;
        }
        let content = std::fs::read_to_string(&path).unwrap_or_default();
        let mut parts = content.split_whitespace();
        let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
        let recorded_start = parts.next().unwrap_or_default();
        if let Some(pid) = pid
            && pid > 1
            && !recorded_start.is_empty()
            && start_time(pid).as_deref() == Some(recorded_start)
            && let Ok(raw) = i32::try_from(pid)
            && killpg(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
        {
            tracing::warn!(pgid = pid, record = %path.display(), "killed the process group of a task that outlived the previous worker process");
            killed += 1;
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    #[test]
    fn a_recorded_live_group_is_killed_and_a_stale_record_is_only_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        let pgid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let live = group_file(&dir.path().join("t1"));
        record(&live, pgid);
        // A record whose pid now belongs to another process (different start time).
        let stale = group_file(&dir.path().join("t2"));
        std::fs::write(&stale, format!("{} 1", std::process::id())).expect("write");
        assert_eq!(kill_orphans(dir.path()), 1);
        let status = child.wait().expect("reap");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the orphan was killed"
        );
        assert!(!live.exists() && !stale.exists(), "records removed");
        assert_eq!(kill_orphans(dir.path()), 0);
    }

    /// A group's end removes its own record only: a newer attempt may have recorded its group
    /// in the same file meanwhile.
    #[test]
    fn an_ended_group_forgets_its_own_record_and_not_a_newer_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = group_file(&dir.path().join("t"));
        let (older, newer) = (Pid::from_raw(4_000_001), Pid::from_raw(4_000_002));
        record(&file, older);
        record(&file, newer);
        forget(&file, older);
        assert!(file.exists(), "the newer attempt's record stays");
        forget(&file, newer);
        assert!(!file.exists());
        forget(&file, newer);
    }
}
