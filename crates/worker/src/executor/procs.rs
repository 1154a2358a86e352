//! Finding a task's processes in `/proc`, also those that left its process group.
//!
//! The `command` executor puts a mark in the environment of every process it starts
//! ([`MARK_ENV`]`=<executor nonce>:<task>:<attempt>`), which their descendants inherit. A
//! process that left the task's group (`setsid`, a daemon's double fork, `setpgid`) is out of
//! reach of the group's signals, but still carries the mark: at the end of the attempt (and,
//! from the recorded mark, after a crash of the worker) every live process of the worker's user
//! whose environment holds the mark is terminated like the group.
//!
//! Best effort: `/proc/<pid>/environ` is the environment a process was started with, which a
//! process can overwrite (`setproctitle` does) or not pass on (`env -i`, a daemon that clears
//! its environment); a process that made itself non-dumpable or changed its user cannot be read.
//! Where there is no `/proc` (not Linux), nothing is found.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The variable that marks a task's processes.
pub const MARK_ENV: &str = "TETHER_TASK_MARK";

/// Rounds of "find and SIGKILL" before giving up on a process that keeps forking.
const KILL_ROUNDS: usize = 20;
/// Pause between two rounds: a killed process leaves `/proc` within it.
const KILL_ROUND_PAUSE: Duration = Duration::from_millis(10);

/// The numeric entries of `/proc` (empty without a readable `/proc`).
pub fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
}

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub ppid: u32,
    /// Process group.
    pub pgrp: u32,
    /// Start time (clock ticks after boot): with the pid, tells a reused pid apart.
    pub start: String,
}

impl Stat {
    pub fn read(pid: u32) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// Parses the text of a `/proc/<pid>/stat`.
    pub fn parse(stat: &str) -> Option<Self> {
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        let pgrp = fields.next()?.parse().ok()?;
        let start = fields.nth(16)?.to_owned();
        Some(Self {
            state,
            ppid,
            pgrp,
            start,
        })
    }

    /// A zombie (or dead) process runs no more; it only waits to be reaped.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// The marks a task's processes carry beside their own: those of the worker's own
/// environment (`TETHER_TASK_MARK` and `TETHER_TASK_MARK_<n>`), when the worker is itself a
/// task of another worker, renamed `TETHER_TASK_MARK_1`, `_2`, ... so that the outer worker's
/// cleanup still finds what its task started.
pub(crate) fn inherited_marks(
    env: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(String, std::ffi::OsString)> {
    use std::os::unix::ffi::OsStrExt;
    // Bytes, not strings: a worker may inherit variables that are not UTF-8 (a Latin-1 path),
    // and reading the environment as strings panicked every command task.
    let mut marks: Vec<std::ffi::OsString> = env
        .filter(|(k, _)| is_mark_var(k.as_bytes()))
        .map(|(_, v)| v)
        .collect();
    marks.sort();
    marks.dedup();
    marks
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("{MARK_ENV}_{}", i + 1), v))
        .collect()
}

/// `TETHER_TASK_MARK` or `TETHER_TASK_MARK_<anything>`.
pub(crate) fn is_mark_var(name: &[u8]) -> bool {
    name.strip_prefix(MARK_ENV.as_bytes())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"_"))
}

/// Whether an environment block (`/proc/<pid>/environ`: `NAME=value` entries separated by NUL)
/// carries `mark` in a mark variable.
fn env_carries(env: &[u8], mark: &[u8]) -> bool {
    env.split(|b| *b == 0).any(|var| {
        var.iter()
            .position(|b| *b == b'=')
            .is_some_and(|eq| is_mark_var(&var[..eq]) && &var[eq + 1..] == mark)
    })
}

/// Whether process `pid`, owned by `uid`, was started with `entry` in its environment.
fn carries(pid: u32, uid: u32, mark: &[u8]) -> bool {
    let dir = format!("/proc/{pid}");
    // Another user's process is none of ours (and its environment is not readable anyway).
    if !std::fs::metadata(&dir).is_ok_and(|m| m.uid() == uid) {
        return false;
    }
    // Gone meanwhile, or a zombie (whose environment reads empty): not running.
    std::fs::read(format!("{dir}/environ")).is_ok_and(|env| env_carries(&env, mark))
}

/// Live processes of this user, other than this one, whose environment carries `mark`.
pub(crate) fn marked(mark: &str) -> Vec<u32> {
    let (uid, me) = (nix::unistd::geteuid().as_raw(), std::process::id());
    pids()
        .filter(|pid| *pid != me && carries(*pid, uid, mark.as_bytes()))
        .collect()
}

/// Sends `sig` (SIGTERM with SIGCONT after it, for a stopped process to act on it) to every process of
/// `mark` outside the process group `signalled`, which the caller signalled already (a process
/// that traps the signal would otherwise act on it twice); returns how many it signalled.
pub(crate) fn signal_marked(mark: &str, sig: Signal, signalled: Option<u32>) -> usize {
    let found: Vec<u32> = marked(mark)
        .into_iter()
        .filter(|pid| signalled.is_none() || Stat::read(*pid).map(|s| s.pgrp) != signalled)
        .collect();
    for pid in &found {
        signal(*pid, sig);
        if sig == Signal::SIGTERM {
            signal(*pid, Signal::SIGCONT);
        }
    }
    found.len()
}

/// Longest a blocking look through `/proc` outside an attempt is awaited: at the worker's
/// start ([`super::orphans::kill_orphans`]) and its immediate exit
/// ([`super::command::kill_all_now`]).
pub(crate) const BLOCKING_SCAN_LIMIT: Duration = Duration::from_secs(5);

/// Runs `f` on a thread of its own and waits for it at most `limit`. A look through `/proc`
/// reads processes' `environ`, which waits for their memory map, and a process stuck in the
/// kernel (a hung network mount) may hold that for ever: the worker's start or exit must not
/// wait with it. `None` when it did not end in time (it goes on, detached) or no thread could
/// be made.
pub(crate) fn blocking_within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("tether-proc-scan".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread to look through /proc");
        return None;
    }
    let done = rx.recv_timeout(limit).ok();
    if done.is_none() {
        tracing::warn!(
            limit_ms = limit.as_millis() as u64,
            "a look through /proc for task processes did not finish in time; going on without it"
        );
    }
    done
}

/// SIGKILLs the processes of `mark` until none is found (a process may fork between a look and
/// the signal), for at most [`KILL_ROUNDS`] rounds. Returns how many were killed. Blocking.
pub(crate) fn kill_marked(mark: &str) -> usize {
    let mut killed = std::collections::HashSet::new();
    for _ in 0..KILL_ROUNDS {
        let found = marked(mark);
        if found.is_empty() {
            break;
        }
        for pid in found {
            signal(pid, Signal::SIGKILL);
            killed.insert(pid);
        }
        std::thread::sleep(KILL_ROUND_PAUSE);
    }
    killed.len()
}

/// Signals one process. A pid looked at a moment ago may have ended since, or, rarely, been
/// reused: the window is the time between reading its environment and this call.
fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    /// A worker that is itself a task of another worker passes the outer marks on, renamed,
    /// so the outer worker's cleanup finds its task's grandchildren; the marks are read from
    /// any mark variable, by exact value.
    #[test]
    fn a_nested_workers_tasks_carry_the_outer_marks_too() {
        let env = [
            ("PATH", "/bin"),
            ("TETHER_TASK_MARK", "outer:a:1"),
            ("TETHER_TASK_MARK_1", "outermost:b:2"),
            ("TETHER_TASK_MARKER", "not a mark"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let inherited = inherited_marks(env.into_iter());
        let pairs: Vec<(&str, &str)> = inherited
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().expect("utf-8")))
            .collect();
        assert_eq!(
            pairs,
            [
                ("TETHER_TASK_MARK_1", "outer:a:1"),
                ("TETHER_TASK_MARK_2", "outermost:b:2")
            ]
        );
        let block = b"PATH=/bin\0TETHER_TASK_MARK=inner:c:1\0TETHER_TASK_MARK_1=outer:a:1\0";
        assert!(env_carries(block, b"inner:c:1"));
        assert!(env_carries(block, b"outer:a:1"));
        assert!(!env_carries(block, b"outer:a:10"), "exact values only");
        assert!(!env_carries(
            b"TETHER_TASK_MARKER=outer:a:1\0",
            b"outer:a:1"
        ));
    }

    /// A look that does not end is given up at its limit (the worker's start and exit go on);
    /// one that ends is waited for.
    #[test]
    fn a_blocking_look_is_waited_for_only_up_to_its_limit() {
        let started = std::time::Instant::now();
        let stuck = blocking_within(Duration::from_millis(200), || {
            std::thread::sleep(Duration::from_secs(30));
        });
        assert!(stuck.is_none());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(blocking_within(Duration::from_secs(10), || 7), Some(7));
    }

    #[test]
    fn a_marked_process_is_found_by_its_exact_mark_and_killed() {
        let mark = format!("test-{}:t:1", uuid::Uuid::new_v4().simple());
        let mut child = std::process::Command::new("sleep")
            .arg("300")
            .env(MARK_ENV, &mark)
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        await_marked(&mark, 1);
        assert_eq!(marked(&mark), [pid]);
        assert!(
            marked(&format!("{mark}0")).is_empty(),
            "a longer mark differs"
        );
        assert!(
            marked(&mark[..mark.len() - 1]).is_empty(),
            "a prefix differs"
        );
        assert_eq!(kill_marked(&mark), 1);
        let status = child.wait().expect("reap");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(marked(&mark).is_empty());
    }

    /// Waits (at most 10 s) until `n` processes carry `mark`. A spawn returns once the child's
    /// exec has begun, and for a moment after it the new image's environment reads empty (the
    /// kernel lets the spawning parent go on when the child's new memory is in place, before its
    /// environment is laid out there): a look at once missed the child now and then.
    fn await_marked(mark: &str, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while marked(mark).len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{n} processes marked {mark} not found within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills `sleep 300` on drop: a failed assertion does not leave it running.
    struct Sleeper(std::process::Child);

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The members of the group the caller signalled already get no second signal; a marked
    /// process outside it does.
    #[test]
    fn marked_processes_of_the_signalled_group_are_not_signalled_again() {
        let mark = format!("test-{}:t:1", uuid::Uuid::new_v4().simple());
        let sleeper = || {
            std::process::Command::new("sleep")
                .arg("300")
                .env(MARK_ENV, &mark)
                .process_group(0)
                .spawn()
                .map(Sleeper)
                .expect("spawn sleep")
        };
        let (mut member, mut outside) = (sleeper(), sleeper());
        await_marked(&mark, 2);
        // Each leads a group of its own: the first's is the one signalled already.
        assert_eq!(
            signal_marked(&mark, Signal::SIGTERM, Some(member.0.id())),
            1
        );
        let status = outside.0.wait().expect("reap");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(15)
        );
        assert!(
            matches!(member.0.try_wait(), Ok(None)),
            "the member of the signalled group was signalled again"
        );
    }

    #[test]
    fn a_stat_reads_its_group() {
        let stat =
            Stat::parse("42 (a (b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 777 0 0")
                .expect("stat");
        assert_eq!((stat.ppid, stat.pgrp, stat.start.as_str()), (1, 42, "777"));
    }
}
