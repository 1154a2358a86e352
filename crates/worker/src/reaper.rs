//! The worker as a child subreaper (Linux): a process a task leaves behind when its parent
//! ends (a daemon's double fork, `setsid cmd &` in a script that exits) is re-parented to the
//! worker instead of init, and the worker reaps it once it ends, as init would.
//!
//! [`become_subreaper`] is a choice of the program (`tether worker` makes it, also as PID 1 of
//! a container); an agent in a process that made it runs [`run`], which reaps adopted children
//! until shutdown. Without it, a worker that is PID 1 would keep the zombie of every orphan of
//! its tasks. A program that embeds the library and did not choose it is never reaped for,
//! PID 1 or not: its own children's statuses stay its own.
//!
//! # Reaping without taking another waiter's status
//!
//! The `command` executor's own children are waited for by `tokio::process`, which calls
//! `waitpid` on each child's pid (after SIGCHLD, or from its queue of dropped children). A
//! reaper calling `waitpid(-1)` would take some of those statuses: the task would end with
//! "cannot wait", or tokio would wait on a pid already reused. So the reaper never waits for
//! "any child": it looks in `/proc` for zombies whose parent is this process, and waits for each
//! by its pid, unless it is a tracked child: one started through `spawn`, which records
//! (pid, start time) under the same lock the reaper holds while it decides and waits. A child
//! cannot appear between a look and the wait (spawning waits for the lock), and the start time
//! tells a tracked child from an adopted one that got a reused pid. (`waitid` with `WNOWAIT`
//! peeks at one zombie without reaping it, but always at the same one: one of tokio's, not yet
//! collected, would hide every adopted zombie behind it.)
//!
//! Every other child of the process is taken for adopted: a program that makes itself a
//! subreaper runs no child of its own outside `spawn` (`tether worker` runs none).

use std::sync::Mutex;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

use crate::executor::procs::{self, Stat};

/// Children started through [`spawn`]: pid and start time (`None` when it could not be read:
/// any process with that pid is taken for the child). An entry whose process is gone is
/// dropped at the next spawn.
static TRACKED: Mutex<Vec<(u32, Option<String>)>> = Mutex::new(Vec::new());

fn tracked() -> std::sync::MutexGuard<'static, Vec<(u32, Option<String>)>> {
    TRACKED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes this process a child subreaper (Linux `PR_SET_CHILD_SUBREAPER`): orphaned
/// descendants re-parent to it instead of init. The process must reap them: an agent does so
/// ([`run`]) as long as it runs. Not done where `/proc/self/stat` cannot be read: the reaper
/// finds adopted zombies in `/proc`, and without it every adopted process would stay a zombie
/// (init reaps them when the worker is no subreaper). Elsewhere than Linux: `Unsupported`.
pub fn become_subreaper() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if let Some(error) = cannot_reap(std::fs::read_to_string("/proc/self/stat")) {
            tracing::warn!(%error, "/proc/self/stat cannot be read, so adopted processes could not be found to reap: the worker does not become a subreaper (init reaps the orphans of tasks)");
            return Err(error);
        }
        nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)?;
        CHOSEN.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            "the worker is a subreaper: it adopts and reaps the orphans of tasks (/proc/self/stat is readable)"
        );
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Why this process could not reap the processes it would adopt, if it could not: `stat` is
/// what reading its own `/proc/self/stat` gave. [`reap_adopted`] finds zombies in `/proc`.
fn cannot_reap(stat: std::io::Result<String>) -> Option<std::io::Error> {
    match stat {
        Err(e) => Some(std::io::Error::new(
            e.kind(),
            format!("reading /proc/self/stat: {e}"),
        )),
        Ok(text) if Stat::parse(&text).is_none() => Some(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "/proc/self/stat does not read as a process status",
        )),
        Ok(_) => None,
    }
}

/// Set by [`become_subreaper`]: this process reaps what it adopts.
static CHOSEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process chose to adopt and reap orphans ([`become_subreaper`]). Being PID 1
/// or a subreaper made by other code is not enough: a program that did not choose it may
/// wait for children of its own that the reaper would take for adopted.
pub fn is_reaper() -> bool {
    CHOSEN.load(std::sync::atomic::Ordering::Relaxed)
}

/// Starts `cmd` as a tracked child, which [`reap_adopted`] leaves to its `Child`.
pub(crate) fn spawn(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut tracked = tracked();
    let child = cmd.spawn()?;
    tracked.retain(|(pid, start)| {
        Stat::read(*pid).is_some_and(|s| start.as_ref().is_none_or(|start| *start == s.start))
    });
    if let Some(pid) = child.id() {
        tracked.push((pid, Stat::read(pid).map(|s| s.start)));
    }
    Ok(child)
}

/// Reaps the zombies among this process's children that were not started through [`spawn`];
/// returns how many. Blocking (reads `/proc`).
pub(crate) fn reap_adopted() -> usize {
    let me = std::process::id();
    let zombies: Vec<(u32, String)> = procs::pids()
        .filter_map(|pid| {
            let s = Stat::read(pid)?;
            (s.ppid == me && s.is_dead()).then_some((pid, s.start))
        })
        .collect();
    if zombies.is_empty() {
        return 0;
    }
    let tracked = tracked();
    let mut reaped = 0;
    for (pid, start) in zombies {
        let own = tracked
            .iter()
            .any(|(p, s)| *p == pid && s.as_ref().is_none_or(|s| *s == start));
        // Looked at again under the lock: the zombie seen may have been reaped (by another
        // agent's reaper) and its pid reused meanwhile.
        let still =
            Stat::read(pid).is_some_and(|s| s.ppid == me && s.is_dead() && s.start == start);
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if own || !still {
            continue;
        }
        match waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => {}
            Ok(status) => {
                tracing::debug!(pid, ?status, "reaped a process adopted from a task");
                reaped += 1;
            }
        }
    }
    reaped
}

/// Reaps adopted children (see the module's doc) whenever a child ends, until `shutdown`.
pub async fn run(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut ended = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot watch for ended children; adopted processes are not reaped");
            return;
        }
    };
    tracing::info!("reaping processes adopted from tasks");
    loop {
        // Zombies left before the first signal, or while the last look ran, are found too:
        // every look takes all there are, and a signal during one wakes the next.
        if let Err(error) = tokio::task::spawn_blocking(reap_adopted).await {
            tracing::error!(%error, "reaping adopted processes failed");
        }
        tokio::select! {
            _ = ended.recv() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{KillOnDrop, PATIENCE, wait_for};

    /// Without a readable `/proc`, adopted zombies could not be found: no subreaper then.
    #[test]
    fn the_worker_becomes_a_subreaper_only_with_a_readable_proc() {
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(cannot_reap(Err(missing)).is_some());
        assert!(cannot_reap(Ok("not a status".into())).is_some());
        let real = std::fs::read_to_string("/proc/self/stat");
        if cfg!(target_os = "linux") {
            assert!(cannot_reap(real).is_none());
        }
    }

    /// Set in the process of its own [`as_a_subreaper`] runs in.
    const CHILD_ENV: &str = "TETHER_TEST_SUBREAPER_CHILD";

    /// Being a subreaper is a property of the whole process: the test runs in a process of its
    /// own (this test binary, running that test alone), so that the children of the other
    /// tests are never taken for adopted.
    #[test]
    fn adopted_processes_are_reaped_and_the_executors_own_children_are_not() {
        crate::testutil::pass_alone(
            "reaper::tests::as_a_subreaper",
            &[(CHILD_ENV, std::ffi::OsStr::new("1"))],
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run by adopted_processes_are_reaped_and_the_executors_own_children_are_not"]
    async fn as_a_subreaper() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        become_subreaper().expect("prctl");
        assert!(is_reaper());
        let shutdown = CancellationToken::new();
        let reaper = tokio::spawn(run(shutdown.clone()));
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        // The shell exits at once; the process it started in a session of its own outlives it.
        let script = r#"setsid sh -c 'echo $$ > "$D/pid.tmp"; mv "$D/pid.tmp" "$D/pid"; exec sleep 300' & exit 7"#;
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", script]).env("D", dir.path());
        let mut shell = spawn(&mut cmd).expect("spawn");
        let status = tokio::time::timeout(PATIENCE, shell.wait())
            .await
            .expect("the shell's status came")
            .expect("wait");
        assert_eq!(status.code(), Some(7), "the shell's status is its waiter's");
        let mut pid = 0;
        wait_for("the pid file", || {
            pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            pid != 0
        })
        .await;
        // Killed when dropped: a failed assertion does not leave the `sleep 300` running.
        let _orphan_guard = KillOnDrop(pid);
        let me = std::process::id();
        wait_for("the orphan to be adopted", || {
            Stat::read(pid).is_some_and(|s| s.ppid == me)
        })
        .await;

        // Tracked children ending all the while keep their statuses.
        let waits = (0..16).map(|code| {
            let mut cmd = tokio::process::Command::new("sh");
            cmd.args(["-c", &format!("exit {code}")]);
            let mut child = spawn(&mut cmd).expect("spawn");
            async move {
                let status = tokio::time::timeout(PATIENCE, child.wait()).await;
                (code, status.expect("its status came").expect("wait").code())
            }
        });
        nix::sys::signal::kill(
            Pid::from_raw(i32::try_from(pid).expect("pid")),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the orphan");
        for (code, got) in futures_util::future::join_all(waits).await {
            assert_eq!(got, Some(code));
        }
        // Dead, it stays a zombie until its parent, this process, reaps it.
        wait_for("the orphan to be reaped", || Stat::read(pid).is_none()).await;
        shutdown.cancel();
        reaper.await.expect("reaper");
    }
}
