//! A warden for each running `command` attempt: a small process that ends the attempt's
//! processes when the worker process dies without ending them itself.
//!
//! A worker killed with SIGKILL (or by the OOM killer, or a panic that aborts) cannot stop its
//! tasks' processes, and the records of [`super::orphans`] are only read when the next worker
//! starts on the same machine (and state directory): until then the processes run on,
//! unsupervised, writing into directories a resumed attempt elsewhere will not see. So beside
//! each attempt's process group the executor starts a warden, `/bin/sh` running [`SCRIPT`],
//! with the read end of a pipe as its standard input; the worker holds the write end. When the
//! worker has ended the attempt's processes itself (the leader exited and the group was ended,
//! a cancel, a drop of the execution), it writes `done` and the warden exits doing nothing.
//! When the worker process dies, the kernel closes its end and the warden reads end of file
//! without `done`: it ends the group and every process still carrying the attempt's mark (those
//! that left the group, see [`super::procs`]) as the worker would have: SIGTERM (and SIGCONT),
//! then SIGKILL after the kill grace, to those still there.
//!
//! The warden is in a process group of its own (signals meant for the worker's group, a
//! terminal's Ctrl-C, do not reach it) and ignores SIGHUP, SIGINT and SIGQUIT; its environment
//! is only `PATH` (it carries no mark, so no sweep of marks ends it). It is started through
//! [`crate::reaper::spawn`], and `tokio` reaps it once it exits. It costs one small shell
//! process per running `command` attempt; the sweep after a death costs a `tr` per process on
//! the machine whose environment the worker's user may read (measured: 0.64 s with 569
//! processes, 500 of them the user's, while the test suite ran).
//!
//! A pid-reuse window remains: a worker killed after its group ended but before it wrote
//! `done` leaves a warden that signals the group's id; that only reaches a process if a new
//! process got that id and made itself a group leader in between. The records of
//! [`super::orphans`] stay as the backstop for a warden that was killed with its worker.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::unistd::Pid;

/// What the worker writes when it ended the attempt's processes itself.
const DONE: &[u8] = b"done\n";

/// The warden, run as `sh -c SCRIPT tether-warden <pgid> <grace seconds> <mark>`.
///
/// `kill -SIG -<pgid>` signals a group in every POSIX shell (dash's `kill` takes no `--`).
/// A process carries the mark when a line of its environment (NUL-separated, so `tr` first) is
/// `TETHER_TASK_MARK=<mark>` or `TETHER_TASK_MARK_<n>=<mark>` (the outer marks of a worker run
/// as a task, see [`super::procs::inherited_marks`]): compared as a string, never a pattern.
pub(crate) const SCRIPT: &str = r#"trap '' HUP INT QUIT
IFS= read -r said
[ "$said" = done ] && exit 0
pgid=$1 grace=$2 mark=$3
carries() {
  tr '\000' '\n' 2>/dev/null < "$1" | {
    while IFS= read -r v; do
      case $v in
        TETHER_TASK_MARK=*|TETHER_TASK_MARK_*=*) [ "${v#*=}" = "$mark" ] && exit 0 ;;
      esac
    done
    exit 1
  }
}
sweep() {
  hit=1
  kill -"$1" -"$pgid" 2>/dev/null && hit=0
  [ "$1" = TERM ] && kill -CONT -"$pgid" 2>/dev/null
  for e in /proc/[0-9]*/environ; do
    [ -r "$e" ] || continue
    p=${e#/proc/}
    p=${p%/environ}
    if carries "$e" && kill -"$1" "$p" 2>/dev/null; then
      hit=0
      [ "$1" = TERM ] && kill -CONT "$p" 2>/dev/null
    fi
  done
  return $hit
}
sweep TERM || exit 0
sleep "$grace"
sweep KILL
exit 0
"#;

/// The name the warden runs under (`$0`), which `ps` shows.
const NAME: &str = "tether-warden";

/// The shell the warden runs in.
const SHELL: &str = "/bin/sh";

/// Set once a warden could not be started, so that the warning is given once a process.
static WARNED: AtomicBool = AtomicBool::new(false);

/// The worker's side of one attempt's warden: the write end of its pipe. Dropped without
/// [`Warden::release`], the warden ends the attempt's processes.
#[derive(Debug)]
pub(crate) struct Warden {
    pipe: std::fs::File,
    /// Kept so that `tokio` reaps the warden once it exits (a dropped child is reaped in the
    /// background).
    _child: tokio::process::Child,
}

impl Warden {
    /// Starts the warden of process group `pgid`, whose processes (also those that left it)
    /// carry `mark`. `None` when it cannot be started (no `/bin/sh`, no processes left): a
    /// warning, once a process, and the attempt runs without one.
    pub(crate) fn watch(pgid: Pid, mark: &str, grace: Duration) -> Option<Self> {
        match Self::start(pgid, mark, grace) {
            Ok(warden) => Some(warden),
            Err(error) => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "cannot start a warden for a task's processes: a worker killed while its command tasks run leaves them running until the next worker starts");
                }
                None
            }
        }
    }

    fn start(pgid: Pid, mark: &str, grace: Duration) -> std::io::Result<Self> {
        let grace_secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let mut cmd = tokio::process::Command::new(SHELL);
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg(NAME)
            .arg(pgid.as_raw().to_string())
            .arg(grace_secs.to_string())
            .arg(mark)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        let mut child = crate::reaper::spawn(&mut cmd)?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("the warden's stdin was not piped"))?;
        let pipe: OwnedFd = stdin.into_owned_fd()?;
        Ok(Self {
            pipe: std::fs::File::from(pipe),
            _child: child,
        })
    }

    /// The worker ended the attempt's processes itself: the warden exits doing nothing.
    pub(crate) fn release(mut self) {
        // Into an empty pipe (the warden reads nothing else): it never blocks. If it fails the
        // warden reads end of file and sweeps for processes that are gone: no harm.
        let _ = self.pipe.write_all(DONE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// Whether a process runs (a zombie does not).
    fn alive(pid: u32) -> bool {
        super::super::procs::Stat::read(pid).is_some_and(|s| !s.is_dead())
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A group leader, and a process that left its group (a session of its own) but carries
    /// the mark under an outer worker's name; both deaf to SIGTERM, so only the SIGKILL after
    /// the grace ends them.
    struct Attempt {
        leader: std::process::Child,
        escaped: u32,
        mark: String,
        _dir: tempfile::TempDir,
    }

    impl Attempt {
        fn start() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let mark = format!("{}:t.1:1", uuid::Uuid::new_v4().simple());
            let script = r#"trap '' TERM
setsid sh -c 'trap "" TERM; echo $$ > "$D/p.tmp"; mv "$D/p.tmp" "$D/escaped"; while :; do sleep 1; done' >/dev/null 2>&1 &
while :; do sleep 1; done"#;
            let leader = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(script)
                .env("D", dir.path())
                .env("TETHER_TASK_MARK_1", &mark)
                .process_group(0)
                .spawn()
                .expect("spawn");
            let file = dir.path().join("escaped");
            let end = std::time::Instant::now() + Duration::from_secs(20);
            let escaped = loop {
                if let Some(pid) = std::fs::read_to_string(&file)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    break pid;
                }
                assert!(
                    std::time::Instant::now() < end,
                    "the escaped process did not start"
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            Self {
                leader,
                escaped,
                mark,
                _dir: dir,
            }
        }

        fn pgid(&self) -> Pid {
            Pid::from_raw(i32::try_from(self.leader.id()).expect("pid"))
        }
    }

    impl Drop for Attempt {
        fn drop(&mut self) {
            let _ = nix::sys::signal::killpg(self.pgid(), nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::kill(
                Pid::from_raw(i32::try_from(self.escaped).expect("pid")),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.leader.wait();
        }
    }

    #[tokio::test]
    async fn a_warden_whose_worker_end_closes_without_done_kills_the_group_and_the_marked_after_the_grace()
     {
        let mut attempt = Attempt::start();
        let warden = Warden::watch(attempt.pgid(), &attempt.mark, Duration::from_millis(300))
            .expect("a warden");
        // What the kernel does to the worker's end when the worker dies.
        drop(warden);
        let leader = attempt.leader.id();
        wait_until("the leader to be killed", || {
            attempt.leader.try_wait().expect("try_wait").is_some()
        })
        .await;
        let status = attempt.leader.try_wait().expect("try_wait").expect("ended");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "deaf to SIGTERM, the leader {leader} is killed after the grace"
        );
        wait_until("the escaped process to be killed", || {
            !alive(attempt.escaped)
        })
        .await;
    }

    #[tokio::test]
    async fn a_released_warden_exits_and_leaves_the_group_alone() {
        let attempt = Attempt::start();
        let warden = Warden::watch(attempt.pgid(), &attempt.mark, Duration::from_millis(300))
            .expect("a warden");
        let warden_pid = warden._child.id().expect("warden pid");
        warden.release();
        wait_until("the warden to exit", || !alive(warden_pid)).await;
        // Past the grace a sweep would have waited.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(alive(attempt.leader.id()), "the leader runs on");
        assert!(alive(attempt.escaped), "the escaped process runs on");
    }

    #[test]
    fn the_script_is_valid_shell() {
        let status = std::process::Command::new(SHELL)
            .args(["-n", "-c", SCRIPT])
            .status()
            .expect("sh -n");
        assert!(status.success());
    }
}
