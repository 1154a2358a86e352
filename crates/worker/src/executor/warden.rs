//! The warden: a small process beside the worker that ends the processes of its running
//! `command` attempts when the worker process dies without ending them itself.
//!
//! A worker killed with SIGKILL (or by the OOM killer, or a panic that aborts) cannot stop its
//! tasks' processes, and the records of [`super::orphans`] are only read when the next worker
//! starts on the same machine (and state directory): until then the processes run on,
//! unsupervised, writing into directories a resumed attempt elsewhere will not see. So the
//! first `command` attempt of a process starts a warden, `/bin/sh` running [`SCRIPT`], with the
//! read end of a pipe as its standard input; the worker holds the write end and tells it of
//! each attempt: `+ <mark> <grace seconds>` before it starts the attempt's process group (whose
//! processes carry the mark from their first instruction), `= <mark> <pgid> <leader start
//! time>` once it started, `- <mark>` once the worker ended the attempt's processes itself (the
//! leader exited and the group was ended, a cancel, a drop of the execution, a spawn that
//! failed). When the worker process dies, the kernel closes its end and the warden reads end of
//! file: it ends the attempts it was told of and not told were over, as the worker would have:
//! each group and every process still carrying one of their marks (those that left the group,
//! see [`super::procs`]), SIGTERM (and SIGCONT), then SIGKILL after the longest kill grace, to
//! those still there. A worker process that exits without attempts running leaves a warden
//! with nothing to do, and it exits.
//!
//! One warden serves the whole process: an attempt costs the worker three short writes into a
//! pipe and the warden 0.17 ms of CPU to read them (measured with a `command` task that runs
//! `true`: 2.3 ms of worker CPU without a warden, 3.4 ms with a warden started per attempt, as
//! an earlier version did; see PERFORMANCE, thirty-ninth round). Each line is written whole
//! or not at all (a line is shorter than `PIPE_BUF`, and the pipe does not block the worker):
//! a warden that stopped reading (stopped by a signal, say) costs the attempts it was not told
//! of their cover, with a warning. A warden that died (killed by someone) is started again at
//! the next attempt and told of every attempt still running.
//!
//! A group's id is a pid, which the kernel may give again once the group is gone (a worker
//! killed after a group ended but before it wrote `-`): the warden signals a group only while
//! its leader is the process the worker started (its start time, which the worker read before
//! it could reap the leader) or is gone (a group outlives its leader, and no new group can take
//! the id of one that still has members; a new process that took the id and made a group of
//! its own is there to be seen). What is left is the moment between that look and the signal.
//!
//! The warden is in a process group of its own (signals meant for the worker's group, a
//! terminal's Ctrl-C, do not reach it) and ignores SIGHUP, SIGINT and SIGQUIT; its environment
//! is `PATH` and the script ([`SCRIPT_ENV`], so that `ps` shows `tether-warden`, not the
//! script). It carries no mark, so no sweep of marks ends it. It is started through
//! [`crate::reaper::spawn`]. The sweep after a death costs a `tr` per process on the machine
//! whose environment the worker's user may read (measured: 0.64 s with 569 processes, 500 of
//! them the user's, while the test suite ran). The records of [`super::orphans`] stay as the
//! backstop for a warden that was killed with its worker.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::unistd::Pid;

/// The warden, run as `sh -c 'eval "$TETHER_WARDEN_SCRIPT"' tether-warden`, reading lines
/// `+ <mark> <grace seconds>`, `= <mark> <pgid> <start>` and `- <mark>` (`<start>`: the leader's
/// start time, `/proc/<pid>/stat`'s 22nd field, `-` when it could not be read).
///
/// Attempts are kept one a line in `$live`, `<mark> <grace> <pgid> <start>` (`-` for a group
/// not started yet), split on newlines with globbing off (marks hold none of `*?[`, nor
/// spaces: they are made of ids). `kill -SIG -<pgid>` signals a group in
/// every POSIX shell (dash's `kill` takes no `--`). A process carries a mark when a line of its
/// environment (NUL-separated, so `tr` first) is `TETHER_TASK_MARK=<mark>` or
/// `TETHER_TASK_MARK_<n>=<mark>` (the outer marks of a worker run as a task, see
/// [`super::procs::inherited_marks`]): compared as a string, never a pattern.
pub(crate) const SCRIPT: &str = r#"trap '' HUP INT QUIT
set -f
nl='
'
live=
drop() {
  rest= found=
  IFS=$nl
  for a in $live; do
    if [ "${a%% *}" = "$1" ]; then found=$a; else rest=$rest$a$nl; fi
  done
  unset IFS
  live=$rest
}
while IFS= read -r line; do
  case $line in
    "+ "*) live=$live${line#"+ "}" - -"$nl ;;
    "= "*)
      set -- ${line#"= "}
      drop "$1"
      if [ -n "$found" ]; then
        g=${found#* }
        live=$live"$1 ${g%% *} $2 $3"$nl
      fi ;;
    "- "*) drop "${line#"- "}" ;;
  esac
done
[ -n "$live" ] || exit 0
ours() {
  want=$2
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  s=${s##*") "}
  set -- $s
  [ "${20}" = "$want" ]
}
carries() {
  tr '\000' '\n' 2>/dev/null < "$1" | {
    while IFS= read -r v; do
      case $v in
        TETHER_TASK_MARK=*|TETHER_TASK_MARK_*=*)
          m=${v#*=}
          IFS=$nl
          for x in $live; do
            [ "${x%% *}" = "$m" ] && exit 0
          done
          unset IFS ;;
      esac
    done
    exit 1
  }
}
sweep() {
  hit=1
  IFS=$nl
  for a in $live; do
    unset IFS
    set -- $a
    if [ "$3" != - ] && ours "$3" "$4"; then
      kill -"$sig" -"$3" 2>/dev/null && hit=0
      [ "$sig" = TERM ] && kill -CONT -"$3" 2>/dev/null
    fi
    IFS=$nl
  done
  unset IFS
  set +f
  set -- /proc/[0-9]*/environ
  set -f
  for e in "$@"; do
    [ -r "$e" ] || continue
    p=${e#/proc/}
    p=${p%/environ}
    if carries "$e" && kill -"$sig" "$p" 2>/dev/null; then
      hit=0
      [ "$sig" = TERM ] && kill -CONT "$p" 2>/dev/null
    fi
  done
  return $hit
}
grace=0
IFS=$nl
for a in $live; do
  unset IFS
  set -- $a
  [ "$2" -gt "$grace" ] && grace=$2
  IFS=$nl
done
unset IFS
sig=TERM
sweep || exit 0
sleep "$grace"
sig=KILL
sweep
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

/// Set once a warden could not be started (or told of an attempt), so that the warning is
/// given once a process.
static WARNED: AtomicBool = AtomicBool::new(false);

fn warn_once(error: &std::io::Error) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(%error, "the warden of command tasks' processes cannot be started or told of an attempt: a worker killed while such an attempt runs leaves its processes running until the next worker starts");
    }
}

/// One running attempt, as the warden is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attempt {
    grace_secs: u64,
    /// Once started.
    group: Option<Group>,
}

/// An attempt's process group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    pgid: i32,
    /// The leader's start time (`None`: not known, so the group is signalled only once the
    /// leader is gone).
    start: Option<String>,
}

impl Group {
    /// Read while the leader cannot have been reaped: the worker, its parent, has not waited
    /// for it yet.
    fn of(pgid: Pid) -> Self {
        Self {
            pgid: pgid.as_raw(),
            start: u32::try_from(pgid.as_raw())
                .ok()
                .and_then(crate::statedir::start_time),
        }
    }
}

/// A warden process and the worker's end of its pipe.
#[derive(Debug)]
struct Warden {
    pipe: std::fs::File,
    child: tokio::process::Child,
}

impl Warden {
    fn spawn() -> std::io::Result<Self> {
        let mut cmd = tokio::process::Command::new(SHELL);
        cmd.arg("-c")
            .arg(RUN_SCRIPT)
            .arg(NAME)
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
        // A warden that stopped reading must not hold up the worker.
        let flags = nix::fcntl::fcntl(pipe.as_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(pipe.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Self {
            pipe: std::fs::File::from(pipe),
            child,
        })
    }

    /// Writes `line` whole, or nothing: it is shorter than `PIPE_BUF`, which a pipe writes
    /// at once or refuses (`WouldBlock` when full).
    fn send(&mut self, line: &str) -> std::io::Result<()> {
        let n = self.pipe.write(line.as_bytes())?;
        if n == line.len() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "wrote {n} of the {} bytes of a line",
                line.len()
            )))
        }
    }
}

/// The attempts of this process's `command` executors, and the warden told of them.
#[derive(Debug, Default)]
struct Wardened {
    warden: Option<Warden>,
    /// By mark.
    attempts: BTreeMap<String, Attempt>,
}

fn plus(mark: &str, grace_secs: u64) -> String {
    format!("+ {mark} {grace_secs}\n")
}

fn equals(mark: &str, g: &Group) -> String {
    format!(
        "= {mark} {} {}\n",
        g.pgid,
        g.start.as_deref().unwrap_or("-")
    )
}

impl Wardened {
    /// Tells the warden of an attempt about to start, starting the warden first (or again,
    /// and telling it of every attempt still running) when there is none.
    fn watch(&mut self, mark: &str, grace: Duration) {
        let grace_secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        self.attempts.insert(
            mark.to_owned(),
            Attempt {
                grace_secs,
                group: None,
            },
        );
        self.tell(&plus(mark, grace_secs));
    }

    /// Tells the warden the attempt of `mark` started as process group `group`.
    fn group(&mut self, mark: &str, group: Group) {
        let Some(a) = self.attempts.get_mut(mark) else {
            return;
        };
        let line = equals(mark, &group);
        a.group = Some(group);
        self.tell(&line);
    }

    /// Tells the warden the worker ended an attempt's processes itself.
    fn release(&mut self, mark: &str) {
        if self.attempts.remove(mark).is_none() {
            return;
        }
        if let Some(w) = &mut self.warden
            && let Err(e) = w.send(&format!("- {mark}\n"))
        {
            // A warden that missed it finds the group ended (or another's) and the marks gone.
            if e.kind() != std::io::ErrorKind::WouldBlock {
                self.gone();
            }
        }
    }

    /// Sends `line`, after starting a warden (and telling it of every attempt, this line's
    /// news included) if there is none or it is gone.
    fn tell(&mut self, line: &str) {
        if let Some(w) = &mut self.warden {
            match w.send(line) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return warn_once(&e),
                // Gone: started again below.
                Err(_) => self.gone(),
            }
        }
        let started = Warden::spawn().and_then(|mut w| {
            for (mark, a) in &self.attempts {
                w.send(&plus(mark, a.grace_secs))?;
                if let Some(g) = &a.group {
                    w.send(&equals(mark, g))?;
                }
            }
            Ok(w)
        });
        match started {
            Ok(w) => self.warden = Some(w),
            Err(e) => warn_once(&e),
        }
    }

    /// The warden stopped reading for good (it exited: killed by someone): forgets it.
    fn gone(&mut self) {
        if let Some(mut w) = self.warden.take() {
            let _ = w.child.start_kill();
            let _ = w.child.try_wait();
        }
    }
}

/// The warden of this process's `command` attempts.
static WARDENED: Mutex<Wardened> = Mutex::new(Wardened {
    warden: None,
    attempts: BTreeMap::new(),
});

fn wardened() -> MutexGuard<'static, Wardened> {
    WARDENED.lock().unwrap_or_else(|p| p.into_inner())
}

/// The worker's side of one attempt under the warden: dropped once the worker ended the
/// attempt's processes itself, or could not start them.
#[derive(Debug)]
pub(crate) struct Watch {
    mark: String,
}

impl Watch {
    /// Puts the attempt whose processes (also those that leave its group) will carry `mark`
    /// under this process's warden, before they are started; `grace` is the kill grace between
    /// its SIGTERM and SIGKILL. Without a warden (no `/bin/sh`, no processes left) a warning,
    /// once a process, and the attempt runs without one.
    pub(crate) fn start(mark: &str, grace: Duration) -> Self {
        wardened().watch(mark, grace);
        Self {
            mark: mark.to_owned(),
        }
    }

    /// The attempt's processes started, as process group `pgid` (whose leader the worker has
    /// not reaped).
    pub(crate) fn group(&mut self, pgid: Pid) {
        wardened().group(&self.mark, Group::of(pgid));
    }
}

impl Watch {
    /// The worker cannot end the attempt's processes itself: the warden goes on watching
    /// them, for the life of the process, and ends them when the worker exits.
    pub(crate) fn keep(self) {
        std::mem::forget(self);
    }
}

/// Whether the warden watches the attempt of `mark`.
#[cfg(test)]
pub(crate) fn watched(mark: &str) -> bool {
    wardened().attempts.contains_key(mark)
}

impl Drop for Watch {
    fn drop(&mut self) {
        wardened().release(&self.mark);
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
    struct Task {
        leader: std::process::Child,
        escaped: u32,
        unmarked: u32,
        mark: String,
        _dir: tempfile::TempDir,
    }

    impl Task {
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
                // The shells' notes of their killed children.
                .stderr(std::process::Stdio::null())
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

        /// Under `w`'s warden, with a kill grace of 300 ms.
        fn watched(&self, w: &mut Wardened) {
            w.watch(&self.mark, Duration::from_millis(300));
            w.group(&self.mark, Group::of(self.pgid()));
        }

        fn ended(&mut self) -> bool {
            self.leader.try_wait().expect("try_wait").is_some()
                && !alive(self.escaped)
                && !alive(self.unmarked)
        }

        fn running(&mut self) -> bool {
            self.leader.try_wait().expect("try_wait").is_none()
                && alive(self.escaped)
                && alive(self.unmarked)
        }
    }

    impl Drop for Task {
        fn drop(&mut self) {
            let _ = nix::sys::signal::killpg(self.pgid(), nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::kill(
                Pid::from_raw(i32::try_from(self.escaped).expect("pid")),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.leader.wait();
        }
    }

    fn warden_pid(w: &Wardened) -> u32 {
        w.warden
            .as_ref()
            .and_then(|w| w.child.id())
            .expect("a warden")
    }

    /// The worker's end closes (what the kernel does when the worker dies) with two attempts
    /// running: each group (its member that cleared its environment too) and each process
    /// that left it carrying the mark end, by SIGKILL after the grace since they ignore
    /// SIGTERM.
    #[tokio::test]
    async fn when_the_worker_dies_its_warden_kills_every_running_attempts_processes() {
        let (mut a, mut b) = (Task::start(), Task::start());
        let mut w = Wardened::default();
        a.watched(&mut w);
        b.watched(&mut w);
        let pid = warden_pid(&w);
        drop(w);
        wait_until("both attempts' processes to be killed", || {
            a.ended() && b.ended()
        })
        .await;
        let status = a.leader.try_wait().expect("try_wait").expect("ended");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "deaf to SIGTERM, the leader is killed after the grace"
        );
        wait_until("the warden to exit", || !alive(pid)).await;
    }

    /// An attempt the worker said was over is left alone while another is ended; with none
    /// left the warden exits at the worker's end doing nothing.
    #[tokio::test]
    async fn a_released_attempt_is_left_alone_and_a_warden_with_none_left_exits() {
        let (mut a, mut b) = (Task::start(), Task::start());
        let mut w = Wardened::default();
        a.watched(&mut w);
        b.watched(&mut w);
        w.release(&a.mark);
        drop(w);
        wait_until("the running attempt's processes to be killed", || b.ended()).await;
        assert!(a.running(), "the released attempt runs on");

        let mut w = Wardened::default();
        a.watched(&mut w);
        let pid = warden_pid(&w);
        w.release(&a.mark);
        drop(w);
        wait_until("the warden to exit", || !alive(pid)).await;
        // Past the grace a sweep would have waited.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(a.running(), "the released attempt runs on");
    }

    /// An attempt the warden was told of before its group started (the worker killed between
    /// the two) is ended by its mark.
    #[tokio::test]
    async fn an_attempt_whose_group_the_warden_was_not_told_of_is_ended_by_its_mark() {
        let mut a = Task::start();
        let mut w = Wardened::default();
        w.watch(&a.mark, Duration::from_millis(300));
        drop(w);
        wait_until("the marked processes to be killed", || {
            !alive(a.escaped) && a.leader.try_wait().expect("try_wait").is_some()
        })
        .await;
    }

    /// A warden killed by someone is started again at the next attempt and told of every
    /// attempt still running.
    #[tokio::test]
    async fn a_killed_warden_is_started_again_and_told_of_the_running_attempts() {
        let (mut a, mut b) = (Task::start(), Task::start());
        let mut w = Wardened::default();
        a.watched(&mut w);
        let first = warden_pid(&w);
        nix::sys::signal::kill(
            Pid::from_raw(i32::try_from(first).expect("pid")),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the warden");
        wait_until("the warden to die", || !alive(first)).await;
        b.watched(&mut w);
        assert_ne!(warden_pid(&w), first, "a new warden");
        drop(w);
        wait_until("both attempts' processes to be killed", || {
            a.ended() && b.ended()
        })
        .await;
    }

    /// A group whose leader is not the process the warden was told of (its id given again,
    /// as after the attempt's group ended) is left alone; the attempt's marked processes are
    /// still ended.
    #[tokio::test]
    async fn a_warden_leaves_alone_a_group_whose_leader_is_not_the_one_it_was_told_of() {
        let mut task = Task::start();
        let mut other = std::process::Command::new("/bin/sh")
            .args(["-c", "while :; do sleep 1; done"])
            .env_remove(super::super::procs::MARK_ENV)
            .process_group(0)
            .spawn()
            .expect("spawn");
        let other_pgid = Pid::from_raw(i32::try_from(other.id()).expect("pid"));
        let mut told = Group::of(other_pgid);
        told.start = told.start.map(|s| format!("{s}0"));
        let mut w = Wardened::default();
        w.watch(&task.mark, Duration::from_millis(300));
        w.group(&task.mark, told);
        drop(w);
        wait_until("the marked processes to be killed", || {
            !alive(task.escaped) && task.leader.try_wait().expect("try_wait").is_some()
        })
        .await;
        // Past the grace, when a second signal would have come.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let running = other.try_wait().expect("try_wait").is_none();
        let _ = nix::sys::signal::killpg(other_pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = other.wait();
        assert!(running, "a group the warden was not told of was signalled");
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
        let told = Group::of(pgid);
        assert!(told.start.is_some());
        let file = dir.path().join("unmarked");
        wait_until("the group's process to start", || file.exists()).await;
        let member: u32 = std::fs::read_to_string(&file)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid");
        leader.wait().expect("the leader exits");
        let mut w = Wardened::default();
        w.watch("no-such-mark", Duration::from_millis(300));
        w.group("no-such-mark", told);
        drop(w);
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while alive(member) && std::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ended = !alive(member);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        assert!(ended, "the group's process outlived its warden's sweep");
    }

    /// What `ps` shows of a warden: its name, not its script.
    #[tokio::test]
    async fn a_warden_shows_its_name_not_its_script() {
        let task = Task::start();
        let mut w = Wardened::default();
        task.watched(&mut w);
        let pid = warden_pid(&w);
        // Read empty for a moment while the exec that `spawn` returned from sets it up.
        let read = || std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        wait_until("the warden's command line", || !read().is_empty()).await;
        let cmdline = read();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let expected: Vec<&[u8]> = vec![
            SHELL.as_bytes(),
            b"-c",
            RUN_SCRIPT.as_bytes(),
            NAME.as_bytes(),
            b"",
        ];
        assert_eq!(args, expected);
        w.release(&task.mark);
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
