//! The processes of a run: the coordinator and the workers are this same binary started as
//! child processes, each logging to its own file in the work directory. A child is killed
//! (SIGKILL) when its handle is dropped, so an aborted run leaves nothing behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tether_worker::executor::procs::{self, Stat};
use tokio::process::{Child, Command};

/// How long a started process gets to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process gets to stop after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Timings given to every process of a run (short, so that a run of a minute sees many
/// detections and recoveries).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timings {
    pub coordinator_heartbeat_interval: &'static str,
    pub coordinator_heartbeat_timeout: &'static str,
    pub coordinator_lost_after: &'static str,
    pub worker_heartbeat_interval: &'static str,
    pub worker_heartbeat_timeout: &'static str,
    pub worker_connect_timeout: &'static str,
    pub worker_initial_reconnect_delay: &'static str,
    pub worker_max_reconnect_delay: &'static str,
    pub worker_slots: u32,
}

pub const TIMINGS: Timings = Timings {
    coordinator_heartbeat_interval: "250ms",
    coordinator_heartbeat_timeout: "3s",
    // Short, so that a `lease_loss` blackhole outlasts it within seconds. Every other
    // disruption has its worker back within about 2 s of its removal (backoff at most 1 s, a
    // connect within 2 s), well inside it.
    coordinator_lost_after: "6s",
    worker_heartbeat_interval: "250ms",
    worker_heartbeat_timeout: "1500ms",
    worker_connect_timeout: "2s",
    worker_initial_reconnect_delay: "100ms",
    worker_max_reconnect_delay: "1s",
    worker_slots: 2,
};

impl Timings {
    /// The worker's heartbeat timeout as configured: the least silence it declares a link
    /// dead after (the adaptive timeout only grows from it, with the measured round trip).
    pub fn worker_liveness(&self) -> Duration {
        humantime::parse_duration(self.worker_heartbeat_timeout)
            .expect("the run's own timings are durations")
    }

    /// How long a silent worker keeps its leases at the coordinator: its heartbeat timeout,
    /// then its lost-after from the disconnection.
    pub fn coordinator_grace(&self) -> Duration {
        let d =
            |s: &str| humantime::parse_duration(s).expect("the run's own timings are durations");
        d(self.coordinator_heartbeat_timeout) + d(self.coordinator_lost_after)
    }
}

fn spawn(exe: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = Command::new(exe);
    crate::run::die_with_parent(&mut cmd);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))
}

/// SIGKILL the process in `slot`; how it ended (`None`: there was no process, or its status
/// could not be read).
async fn kill(slot: &mut Option<Child>) -> Option<ExitStatus> {
    let mut child = slot.take()?;
    let _ = child.start_kill();
    child.wait().await.ok()
}

/// The task processes of process `root`: its descendants whose environment carries a task's
/// mark (`TETHER_TASK_MARK`: the processes of its `command` tasks, not the warden beside
/// them, which carries none). Processes that come and go while it looks are missed or kept.
pub fn task_processes(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = procs::pids()
        .filter_map(|pid| Some((pid, Stat::read(pid)?.ppid)))
        .collect();
    let mut tree = vec![root];
    let mut grew = true;
    while grew {
        let before = tree.len();
        for (pid, ppid) in &parents {
            if tree.contains(ppid) && !tree.contains(pid) {
                tree.push(*pid);
            }
        }
        grew = tree.len() > before;
    }
    tree.into_iter()
        .filter(|pid| *pid != root && carries_a_mark(*pid))
        .collect()
}

fn carries_a_mark(pid: u32) -> bool {
    env_var(pid, procs::MARK_ENV).is_some()
}

/// The value of `name` in process `pid`'s environment (as it was started).
fn env_var(pid: u32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|var| {
        let v = var.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(v).into_owned())
    })
}

/// A task process, as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskProc {
    pub pid: u32,
    /// From its mark (`<nonce>:<task>:<attempt>`).
    pub task: String,
    pub attempt: u32,
    /// Its parent carries no mark: the task's command itself, not one of its children (a
    /// counter's `sleep 0.3` ends on its own, warden or not).
    pub top: bool,
    /// What the counter task had counted to, by the `count` file in its checkpoint directory
    /// (`None`: no such file, not a counter or not started counting).
    pub count: Option<u32>,
}

/// `<nonce>:<task>:<attempt>` as the task and the attempt.
fn parse_mark(mark: &str) -> Option<(String, u32)> {
    let (_nonce, rest) = mark.split_once(':')?;
    let (task, attempt) = rest.rsplit_once(':')?;
    Some((task.to_owned(), attempt.parse().ok()?))
}

/// The task processes of process `root` ([`task_processes`]) with their marks and counts.
pub fn task_procs(root: u32) -> Vec<TaskProc> {
    let pids = task_processes(root);
    pids.iter()
        .filter_map(|pid| {
            let (task, attempt) = parse_mark(&env_var(*pid, procs::MARK_ENV)?)?;
            let top = Stat::read(*pid).is_some_and(|s| !pids.contains(&s.ppid));
            let count = env_var(*pid, "TETHER_CHECKPOINT_DIR").and_then(|d| {
                std::fs::read_to_string(Path::new(&d).join("count"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            });
            Some(TaskProc {
                pid: *pid,
                task,
                attempt,
                top,
                count,
            })
        })
        .collect()
}

/// Whether a process runs (a zombie, which waits for a reaper, does not).
pub fn running(pid: u32) -> bool {
    Stat::read(pid).is_some_and(|s| !s.is_dead())
}

/// Whether `status` says the process was ended by SIGKILL (not one that had exited already).
pub fn killed_by_sigkill(status: Option<ExitStatus>) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    status.and_then(|s| s.signal()) == Some(nix::sys::signal::Signal::SIGKILL as i32)
}

/// How a child process of the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It had ended before the run told it to stop.
    OnItsOwn(ExitStatus),
    /// It ended within the grace after the run's SIGTERM.
    Stopped(ExitStatus),
    /// It was still running this long after the run's SIGTERM, and was SIGKILLed.
    KilledAfterGrace(Duration),
}

/// The unexpected ones among `seen` (a process's name and how it ended), described. Every
/// process of a run handles SIGTERM (`cancel_on_signal`) by stopping gracefully and exiting 0,
/// so anything else is a fault: an end the run did not ask for (whatever its status), a
/// non-zero status or a death by any signal after SIGTERM (a crash while stopping, or the
/// SIGTERM itself: its handler was not there), or needing SIGKILL after the grace.
pub fn unexpected_exits(seen: &[(String, Exit)]) -> Vec<String> {
    seen.iter()
        .filter_map(|(name, exit)| match exit {
            Exit::OnItsOwn(status) => Some(format!("{name} exited on its own: {status}")),
            Exit::Stopped(status) if status.success() => None,
            Exit::Stopped(status) => Some(format!(
                "{name} ended with {status} after SIGTERM (it should exit 0)"
            )),
            Exit::KilledAfterGrace(grace) => Some(format!(
                "{name} had not stopped {grace:?} after SIGTERM and was SIGKILLed"
            )),
        })
        .collect()
}

/// Stops the process in `slot`: SIGTERM, then SIGKILL after `grace`; how it ended (`None`:
/// there was no process). One that had already ended is not signalled.
async fn terminate(slot: &mut Option<Child>, grace: Duration) -> Option<Exit> {
    let mut child = slot.take()?;
    if let Ok(Some(status)) = child.try_wait() {
        return Some(Exit::OnItsOwn(status));
    }
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if let Ok(Ok(status)) = tokio::time::timeout(grace, child.wait()).await {
        return Some(Exit::Stopped(status));
    }
    // Not ended within the grace (or its status unreadable, which no SIGTERM explains either).
    let _ = child.start_kill();
    let _ = child.wait().await;
    Some(Exit::KilledAfterGrace(grace))
}

/// The coordinator process, restartable on the same address and data directory.
pub struct Coordinator {
    exe: PathBuf,
    pub addr: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pub api: Api,
    pub starts: u32,
    /// The fleet secret file, with integrity tags required (`--message-mac`).
    secret: Option<PathBuf>,
}

impl Coordinator {
    pub async fn start(exe: &Path, work: &Path, secret: Option<PathBuf>) -> anyhow::Result<Self> {
        // A free port, kept for every restart (the listener sets SO_REUSEADDR).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("cannot find a free port on 127.0.0.1")?;
        let mut c = Self {
            exe: exe.to_owned(),
            addr,
            data_dir: work.join("coordinator-data"),
            log: work.join("coordinator.log"),
            child: None,
            api: Api::new(addr)?,
            starts: 0,
            secret,
        };
        c.restart().await?;
        Ok(c)
    }

    /// Starts the process (again) and waits until it answers `/healthz`.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let t = &TIMINGS;
        let mut args: Vec<String> = [
            "--log",
            "info",
            "coordinator",
            "--listen",
            &self.addr.to_string(),
            "--data-dir",
            &self.data_dir.display().to_string(),
            "--heartbeat-interval",
            t.coordinator_heartbeat_interval,
            "--heartbeat-timeout",
            t.coordinator_heartbeat_timeout,
            "--lost-after",
            t.coordinator_lost_after,
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(secret) = &self.secret {
            args.extend(["--secret-file".into(), secret.display().to_string()]);
            args.push("--message-mac".into());
        }
        self.child = Some(spawn(&self.exe, &args, &self.log)?);
        self.starts += 1;
        let end = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if self.api.get("/healthz").await.is_ok() {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "the coordinator exited with {status} at start; see {}",
                    self.log.display()
                );
            }
            if tokio::time::Instant::now() >= end {
                bail!("the coordinator did not answer within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL; how the process ended.
    pub async fn kill(&mut self) -> Option<ExitStatus> {
        kill(&mut self.child).await
    }

    /// Whether the process has ended (it does so on its own only on a fatal error), and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGTERM, SIGKILL after [`STOP_GRACE`]; how the process ended (`None`: none was running).
    pub async fn stop(&mut self) -> Option<Exit> {
        terminate(&mut self.child, STOP_GRACE).await
    }

    /// Its SQLite store file, to be read once it stopped.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join(tether_coordinator::store::DB_FILE)
    }
}

/// One worker process, restartable on the same state directory and event log.
pub struct Worker {
    exe: PathBuf,
    pub id: String,
    url: String,
    pub state_dir: PathBuf,
    pub events: PathBuf,
    pub log: PathBuf,
    seed: u64,
    /// The network namespace the process runs in, if any.
    netns: Option<String>,
    child: Option<Child>,
    pub starts: u32,
    /// Each start's time (taken before the spawn), with whether that process then stopped
    /// gracefully (exit 0 after the run's SIGTERM): its event log must end with `stopped`.
    pub lives: Vec<(DateTime<Utc>, bool)>,
    /// The fleet secret file; the worker then insists on integrity tags (`--message-mac`).
    secret: Option<PathBuf>,
}

impl Worker {
    pub fn new(
        exe: &Path,
        work: &Path,
        id: &str,
        proxy: SocketAddr,
        seed: u64,
        netns: Option<String>,
        secret: Option<PathBuf>,
    ) -> Self {
        Self {
            netns,
            exe: exe.to_owned(),
            id: id.to_owned(),
            url: format!("ws://{proxy}"),
            state_dir: work.join(format!("{id}-state")),
            events: work.join(format!("{id}.events.jsonl")),
            log: work.join(format!("{id}.log")),
            seed,
            child: None,
            starts: 0,
            lives: Vec::new(),
            secret,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let t = &TIMINGS;
        let mut args: Vec<String> = vec![
            "--log".into(),
            "info".into(),
            "worker".into(),
            "--coordinator".into(),
            self.url.clone(),
            "--id".into(),
            self.id.clone(),
            "--slots".into(),
            t.worker_slots.to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--event-log".into(),
            self.events.display().to_string(),
            "--heartbeat-interval".into(),
            t.worker_heartbeat_interval.into(),
            "--heartbeat-timeout".into(),
            t.worker_heartbeat_timeout.into(),
            "--connect-timeout".into(),
            t.worker_connect_timeout.into(),
            "--initial-reconnect-delay".into(),
            t.worker_initial_reconnect_delay.into(),
            "--max-reconnect-delay".into(),
            t.worker_max_reconnect_delay.into(),
            "--reconnect-jitter".into(),
            "0.2".into(),
            "--seed".into(),
            self.seed.wrapping_add(u64::from(self.starts)).to_string(),
        ];
        if let Some(secret) = &self.secret {
            args.extend(["--secret-file".into(), secret.display().to_string()]);
            args.push("--message-mac".into());
        }
        // Before the spawn: every record of this process comes after it.
        let started_at = Utc::now();
        self.child = Some(match &self.netns {
            // `ip netns exec` enters the namespace and execs the worker: same process.
            Some(ns) => {
                let mut v = vec![
                    "netns".to_owned(),
                    "exec".into(),
                    ns.clone(),
                    self.exe.display().to_string(),
                ];
                v.extend(args);
                spawn(Path::new("ip"), &v, &self.log)?
            }
            None => spawn(&self.exe, &args, &self.log)?,
        });
        self.starts += 1;
        self.lives.push((started_at, false));
        Ok(())
    }

    /// Whether the process has ended (it does so on its own only on a fatal error), and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL; how the process ended.
    pub async fn kill(&mut self) -> Option<ExitStatus> {
        kill(&mut self.child).await
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// SIGTERM, SIGKILL after [`STOP_GRACE`]; how the process ended (`None`: none was running).
    pub async fn stop(&mut self) -> Option<Exit> {
        let exit = terminate(&mut self.child, STOP_GRACE).await;
        if let (Some(Exit::Stopped(status)), Some(life)) = (exit, self.lives.last_mut()) {
            life.1 = status.success();
        }
        exit
    }
}

/// The coordinator's HTTP API.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

/// Per request; a coordinator being killed must not hang the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Api {
    pub fn new(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            base: format!("http://{addr}"),
            // Always on loopback: a proxy from HTTP_PROXY could not reach it.
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .no_proxy()
                .build()
                .context("HTTP client")?,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("GET {path}: HTTP {}: {v}", status.as_u16());
        }
        Ok(v)
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST {path}: HTTP {}: {v}", status.as_u16());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A marked grandchild is a task process, found through the unmarked shell between;
    /// unmarked descendants and the root itself are not.
    #[tokio::test]
    async fn the_task_processes_of_a_process_are_its_marked_descendants() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("count"), "4\n").expect("count");
        let mut shell = Command::new("/bin/sh")
            .args(["-c", "TETHER_TASK_MARK=n:t:1 sleep 30 & sleep 30 & wait"])
            .env("TETHER_CHECKPOINT_DIR", dir.path())
            .env_remove("TETHER_TASK_MARK")
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let shell_pid = shell.id().expect("pid");
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = task_processes(shell_pid);
            if !found.is_empty() || std::time::Instant::now() > end {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(running(found[0]));
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", found[0])).expect("cmdline");
        assert!(cmdline.starts_with(b"sleep\0"), "{cmdline:?}");
        // Other tests of this binary may run task processes of their own beside these.
        assert!(task_processes(std::process::id()).contains(&found[0]));
        // Its mark and its checkpoint directory's count; its parent, the shell, has no mark.
        assert_eq!(
            task_procs(shell_pid),
            [TaskProc {
                pid: found[0],
                task: "t".into(),
                attempt: 1,
                top: true,
                count: Some(4),
            }]
        );
        let group = nix::unistd::Pid::from_raw(i32::try_from(shell_pid).expect("pid"));
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = shell.wait().await;
    }

    #[test]
    fn a_mark_names_its_task_and_attempt() {
        assert_eq!(parse_mark("n1:t-01ab:3"), Some(("t-01ab".into(), 3)));
        assert_eq!(
            parse_mark("n1:t:with:colons:2"),
            Some(("t:with:colons".into(), 2))
        );
        assert_eq!(parse_mark("n1:t"), None);
        assert_eq!(parse_mark("n1:t:x"), None);
    }

    #[tokio::test]
    async fn only_a_process_ended_by_sigkill_counts_as_killed() {
        let start = |program: &str, args: &[&str]| {
            Some(
                Command::new(program)
                    .args(args)
                    .kill_on_drop(true)
                    .spawn()
                    .expect("spawn"),
            )
        };
        let mut slot = start("sleep", &["30"]);
        assert!(killed_by_sigkill(kill(&mut slot).await));
        assert!(slot.is_none());
        // Nothing to kill, or a process that had already exited on its own: no kill.
        assert!(!killed_by_sigkill(kill(&mut None).await));
        let mut slot = start("true", &[]);
        if let Some(c) = slot.as_mut() {
            c.wait().await.expect("wait");
        }
        assert!(!killed_by_sigkill(kill(&mut slot).await));
        // Another signal is not a SIGKILL.
        let mut c = start("sleep", &["30"]).expect("child");
        let pid = c.id().and_then(|p| i32::try_from(p).ok()).expect("pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        assert!(!killed_by_sigkill(c.wait().await.ok()));
    }

    const SIGSEGV: i32 = nix::sys::signal::Signal::SIGSEGV as i32;
    const SIGTERM: i32 = nix::sys::signal::Signal::SIGTERM as i32;

    /// A wait status as the kernel gives it: `code << 8` for an exit, the signal's number for
    /// a death by signal.
    fn status(raw: i32) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt as _;
        ExitStatus::from_raw(raw)
    }

    #[test]
    fn only_a_clean_exit_after_sigterm_is_expected() {
        let seen = [
            ("clean".to_owned(), Exit::Stopped(status(0))),
            ("exit3".to_owned(), Exit::Stopped(status(3 << 8))),
            ("segv".to_owned(), Exit::Stopped(status(SIGSEGV))),
            ("term".to_owned(), Exit::Stopped(status(SIGTERM))),
            ("stuck".to_owned(), Exit::KilledAfterGrace(STOP_GRACE)),
            ("early".to_owned(), Exit::OnItsOwn(status(0))),
            ("panicked".to_owned(), Exit::OnItsOwn(status(101 << 8))),
        ];
        let bad = unexpected_exits(&seen);
        let names: Vec<&str> = bad
            .iter()
            .map(|d| d.split_whitespace().next().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            ["exit3", "segv", "term", "stuck", "early", "panicked"],
            "{bad:?}"
        );
        assert!(bad[0].contains("exit status: 3"), "{bad:?}");
        assert!(bad[1].contains("SIGSEGV"), "{bad:?}");
        assert!(bad[3].contains("SIGKILLed"), "{bad:?}");
        assert!(unexpected_exits(&seen[..1]).is_empty());
    }

    /// Starts `sh -c script` and waits (5 s at most) for its first line, `ready`, so that
    /// the traps it sets are in place before it is signalled.
    async fn ready_shell(script: &str) -> Option<Child> {
        use tokio::io::AsyncBufReadExt as _;
        let mut c = Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let out = c.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(out).lines();
        let first = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await;
        assert_eq!(
            first.ok().and_then(Result::ok).flatten().as_deref(),
            Some("ready")
        );
        Some(c)
    }

    #[tokio::test]
    async fn terminate_tells_an_early_end_a_graceful_stop_a_signal_death_and_a_kill_apart() {
        let grace = Duration::from_secs(5);
        // Ended before being told: exit 3, not signalled.
        let mut slot = ready_shell("echo ready; exit 3").await;
        if let Some(c) = slot.as_mut() {
            c.wait().await.expect("wait");
        }
        assert_eq!(
            terminate(&mut slot, grace).await,
            Some(Exit::OnItsOwn(status(3 << 8)))
        );
        assert!(slot.is_none());
        assert_eq!(terminate(&mut None, grace).await, None);
        // Handles SIGTERM and exits 0, as tether does.
        let mut slot =
            ready_shell("trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done").await;
        assert_eq!(
            terminate(&mut slot, grace).await,
            Some(Exit::Stopped(status(0)))
        );
        // Does not handle it: ended by the SIGTERM itself.
        let mut slot = ready_shell("echo ready; exec sleep 30").await;
        assert_eq!(
            terminate(&mut slot, grace).await,
            Some(Exit::Stopped(status(SIGTERM)))
        );
        // Ignores it: SIGKILLed after the grace.
        let short = Duration::from_millis(300);
        let mut slot = ready_shell("trap '' TERM; echo ready; exec sleep 30").await;
        assert_eq!(
            terminate(&mut slot, short).await,
            Some(Exit::KilledAfterGrace(short))
        );
    }
}
