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
//! The group's id is a pid, which the kernel may give again once the group is gone (a worker
//! killed after its group ended but before it wrote `done`): the warden signals the group only
//! while its leader is the process the worker started (the start time the worker read when it
//! started the warden) or is gone (a group outlives its leader, and no new group can take the
//! id of one that still has members; a new process that took the id and made a group of its own
//! is there to be seen). What is left is the moment between that look and the signal. The
//! records of [`super::orphans`] stay as the backstop for a warden that was killed with its
//! worker.
//!
//! The script travels in the warden's environment ([`SCRIPT_ENV`]), not its arguments, so that
//! `ps` shows `tether-warden <pgid> <start> <grace> <mark>`, not the script.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::unistd::Pid;

/// What the worker writes when it ended the attempt's processes itself.
const DONE: &[u8] = b"done\n";

/// The warden, run as `sh -c 'eval "$TETHER_WARDEN_SCRIPT"' tether-warden <pgid> <start>
/// <grace seconds> <mark>`, `<start>` the leader's start time (`/proc/<pid>/stat`'s 22nd field,
/// `-` when it could not be read).
///
/// `kill -SIG -<pgid>` signals a group in every POSIX shell (dash's `kill` takes no `--`).
/// A process carries the mark when a line of its environment (NUL-separated, so `tr` first) is
/// `TETHER_TASK_MARK=<mark>` or `TETHER_TASK_MARK_<n>=<mark>` (the outer marks of a worker run
/// as a task, see [`super::procs::inherited_marks`]): compared as a string, never a pattern.
pub(crate) const SCRIPT: &str = r#"trap '' HUP INT QUIT
IFS= read -r said
[ "$said" = done ] && exit 0
pgid=$1 start=$2 grace=$3 mark=$4
ours() {
  s=$(cat "/proc/$pgid/stat" 2>/dev/null) || return 0
  s=${s##*") "}
  set -- $s
  [ "${20}" = "$start" ]
}
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
  if ours; then
    kill -"$1" -"$pgid" 2>/dev/null && hit=0
    [ "$1" = TERM ] && kill -CONT -"$pgid" 2>/dev/null
  fi
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

/// The variable that carries [`SCRIPT`] (no mark variable's name, see
/// [`super::procs::is_mark_var`]).
const SCRIPT_ENV: &str = "TETHER_WARDEN_SCRIPT";

/// What `sh -c` runs: the script from [`SCRIPT_ENV`].
const RUN_SCRIPT: &str = r#"eval "$TETHER_WARDEN_SCRIPT""#;

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
        // Read while the leader cannot have been reaped: the worker, its parent, has not
        // waited for it yet.
        let start = u32::try_from(pgid.as_raw())
            .ok()
            .and_then(super::procs::Stat::read)
            .map(|s| s.start);
        match Self::start(pgid, start.as_deref(), mark, grace) {
            Ok(warden) => Some(warden),
            Err(error) => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "cannot start a warden for a task's processes: a worker killed while its command tasks run leaves them running until the next worker starts");
                }
                None
            }
        }
    }

    /// Starts the warden of group `pgid` whose leader started at `start` (clock ticks after
    /// boot; `None`: not known, so the group is signalled only once its leader is gone).
    fn start(pgid: Pid, start: Option<&str>, mark: &str, grace: Duration) -> std::io::Result<Self> {
        let grace_secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let mut cmd = tokio::process::Command::new(SHELL);
        cmd.arg("-c")
            .arg(RUN_SCRIPT)
            .arg(NAME)
            .arg(pgid.as_raw().to_string())
            .arg(start.unwrap_or("-"))
            .arg(grace_secs.to_string())
            .arg(mark)
            .env_clear()
            .env(SCRIPT_ENV, SCRIPT)
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

    /// A group leader; a process that left its group (a session of its own) but carries the
    /// mark under an outer worker's name; and one that stayed in the group but cleared its
    /// environment (no mark: only the group's signal reaches it). All deaf to SIGTERM, so only
    /// the SIGKILL after the grace ends them.
    struct Attempt {
        leader: std::process::Child,
        escaped: u32,
        unmarked: u32,
        mark: String,
        _dir: tempfile::TempDir,
    }

    impl Attempt {
        fn start() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let mark = format!("{}:t.1:1", uuid::Uuid::new_v4().simple());
            let script = r#"trap '' TERM
setsid sh -c 'trap "" TERM; echo $$ > "$D/p.tmp"; mv "$D/p.tmp" "$D/escaped"; while :; do sleep 1; done' >/dev/null 2>&1 &
env -i D="$D" PATH="$PATH" /bin/sh -c 'trap "" TERM; echo $$ > "$D/u.tmp"; mv "$D/u.tmp" "$D/unmarked"; while :; do sleep 1; done' &
while :; do sleep 1; done"#;
            let leader = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(script)
                .env("D", dir.path())
                .env("TETHER_TASK_MARK_1", &mark)
                .process_group(0)
                .spawn()
                .expect("spawn");
            let pid_in = |name: &str| {
                let file = dir.path().join(name);
                let end = std::time::Instant::now() + Duration::from_secs(20);
                loop {
                    if let Some(pid) = std::fs::read_to_string(&file)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                    {
                        break pid;
                    }
                    assert!(
                        std::time::Instant::now() < end,
                        "the {name} process did not start"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            let (escaped, unmarked) = (pid_in("escaped"), pid_in("unmarked"));
            Self {
                leader,
                escaped,
                unmarked,
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
        wait_until("the escaped and the unmarked process to be killed", || {
            !alive(attempt.escaped) && !alive(attempt.unmarked)
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
        assert!(alive(attempt.unmarked), "the unmarked process runs on");
    }

    /// A group whose leader is not the process the warden was started for (its id given
    /// again, as after the attempt's group ended) is left alone; the attempt's marked
    /// processes are still ended.
    #[tokio::test]
    async fn a_warden_leaves_alone_a_group_whose_leader_is_not_the_one_it_watched() {
        let attempt = Attempt::start();
        let mut other = std::process::Command::new("/bin/sh")
            .args(["-c", "while :; do sleep 1; done"])
            .env_remove(super::super::procs::MARK_ENV)
            .process_group(0)
            .spawn()
            .expect("spawn");
        let other_pgid = Pid::from_raw(i32::try_from(other.id()).expect("pid"));
        let real = super::super::procs::Stat::read(other.id())
            .expect("stat")
            .start;
        let warden = Warden::start(
            other_pgid,
            Some(&format!("{real}0")),
            &attempt.mark,
            Duration::from_millis(300),
        )
        .expect("a warden");
        drop(warden);
        wait_until("the marked processes to be killed", || {
            !alive(attempt.escaped) && !alive(attempt.leader.id())
        })
        .await;
        // Past the grace, when a second signal would have come.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let running = other.try_wait().expect("try_wait").is_none();
        let _ = nix::sys::signal::killpg(other_pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = other.wait();
        assert!(running, "a group the warden did not watch was signalled");
    }

    /// A group outlives its leader: with the leader gone (exited and reaped), the group's
    /// remaining processes are still the attempt's and are ended.
    #[tokio::test]
    async fn a_warden_ends_a_group_whose_leader_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = r#"env -i D="$D" PATH="$PATH" /bin/sh -c 'trap "" TERM; echo $$ > "$D/u.tmp"; mv "$D/u.tmp" "$D/unmarked"; while :; do sleep 1; done' &
exit 0"#;
        let mut leader = std::process::Command::new("/bin/sh")
            .args(["-c", script])
            .env("D", dir.path())
            .process_group(0)
            .spawn()
            .expect("spawn");
        let pgid = Pid::from_raw(i32::try_from(leader.id()).expect("pid"));
        let start = super::super::procs::Stat::read(leader.id())
            .expect("stat")
            .start;
        let file = dir.path().join("unmarked");
        wait_until("the group's process to start", || file.exists()).await;
        let member: u32 = std::fs::read_to_string(&file)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid");
        leader.wait().expect("the leader exits");
        let warden = Warden::start(
            pgid,
            Some(&start),
            "no-such-mark",
            Duration::from_millis(300),
        )
        .expect("a warden");
        drop(warden);
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while alive(member) && std::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ended = !alive(member);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        assert!(ended, "the group's process outlived its warden's sweep");
    }

    /// What `ps` shows of a warden: its name and arguments, not its script.
    #[tokio::test]
    async fn a_warden_shows_its_name_and_arguments_not_its_script() {
        let attempt = Attempt::start();
        let warden = Warden::watch(attempt.pgid(), &attempt.mark, Duration::from_millis(300))
            .expect("a warden");
        let pid = warden._child.id().expect("warden pid");
        // Read empty for a moment while the exec that `spawn` returned from sets it up.
        let read = || std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        wait_until("the warden's command line", || !read().is_empty()).await;
        let cmdline = read();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let start = super::super::procs::Stat::read(attempt.leader.id())
            .expect("stat")
            .start;
        let pgid = attempt.pgid().as_raw().to_string();
        let expected: Vec<&[u8]> = vec![
            SHELL.as_bytes(),
            b"-c",
            RUN_SCRIPT.as_bytes(),
            NAME.as_bytes(),
            pgid.as_bytes(),
            start.as_bytes(),
            b"1",
            attempt.mark.as_bytes(),
            b"",
        ];
        assert_eq!(args, expected);
        warden.release();
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
