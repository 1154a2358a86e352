//! `command`: runs a program as a task, in a process group of its own.
//!
//! Config (unknown fields are refused):
//!
//! ```json
//! {"program": "prog", "args": ["a"], "env": {"K": "V"}, "cwd": "/abs/dir",
//!  "shell": "script run with /bin/sh -c", "tail_bytes": 4096, "checkpoint_poll_ms": 1000}
//! ```
//!
//! Exactly one of `program` (with optional `args`) or `shell` is given; `cwd`, when given, is
//! an absolute path (a relative one is refused: it would depend on where the worker was
//! started). The process inherits
//! the worker's environment but the worker's own settings and credentials ([`WORKER_ENV`]:
//! `TETHER_WORKER_ID`, `TETHER_SECRET`...), plus `env`, `TETHER_TASK_ID`,
//! `TETHER_ATTEMPT`, `TETHER_TASK_MARK` (`<executor nonce>:<task>:<attempt>`, which finds the
//! attempt's processes that left its group, see [`super::procs`]) and, when the task has a
//! checkpoint directory, `TETHER_CHECKPOINT_DIR`. Stdin is `/dev/null`; of stdout and
//! stderr only the last `tail_bytes` bytes each are kept.
//!
//! Lifecycle of one attempt:
//! 1. The checkpoint directory is created and emptied; if an earlier attempt left a
//!    checkpoint, it is unpacked into it ([`super::packing`]).
//! 2. The process starts as leader of a new process group, so signals reach its whole tree.
//! 3. While it runs: cancellation sends SIGTERM (and SIGCONT) to the group, then SIGKILL after
//!    [`KILL_GRACE`] ([`CommandExecutor::with_kill_grace`]), and the attempt ends
//!    [`ExecError::Stopped`] with the result below (what it wrote until then);
//!    a pause request sends SIGSTOP (to the group and to the processes that left it, found
//!    by their mark), parks at [`TaskCtx::pause_point`], then sends SIGCONT;
//!    every `checkpoint_poll_ms` the directory is looked at, and shipped as a checkpoint if
//!    its files changed (paths, sizes, mtimes) and then stay the same for [`SETTLE`] (or the
//!    poll interval, if shorter: looked at again every settle until the next poll is due),
//!    and did not change while packed: a file still being written is not shipped half written.
//!    So a task that rewrites its state once a second is checkpointed at every poll (its
//!    writes leave the directory still between them); one whose directory never stays the
//!    same for a settle is shipped only at the end, and a state of several files is best
//!    written aside and renamed into place. A checkpoint request (`tether checkpoint`) looks
//!    at once, not at the next poll: the directory, if it changed since the last checkpoint,
//!    is shipped once it stays the same for [`SETTLE`] (or the poll interval, if shorter),
//!    looked at up to [`REQUEST_LOOKS`] times. A look that ships nothing answers the request at once with a
//!    `checkpoint_error` saying why: the directory is unchanged since checkpoint N (the runner
//!    has re-sent that one), the task has written no checkpoint in it (it holds no files), it
//!    cannot be packed or read, or it kept changing. A request that comes while a look is in
//!    flight is looked at once that look ends (unless the checkpoint it stored answers it).
//!    One that comes while the task is paused (its processes stopped) is answered at once
//!    that the task is paused, naming its latest checkpoint, and the directory is looked at
//!    once it is resumed (shipped if it changed, nothing said otherwise).
//! 4. When the leader exits, the rest of its group is terminated the same way (a task's
//!    processes end with it), the output pipes are drained, and the directory is shipped one
//!    last time if it changed. A request no look took (it came as the process exited, or
//!    while a poll's look was in flight) is answered then: by that checkpoint, or with a
//!    `checkpoint_error` that the task ended and why nothing new came.
//!
//! Whenever the group is terminated (cancel, timeout, the leader's exit), so are the processes
//! that left it (`setsid`, a daemon's double fork) but still carry the attempt's mark in their
//! environment: SIGTERM with the group, SIGKILL after the same grace. With a group record
//! ([`super::orphans`]) the mark is recorded too, for a worker that starts after a crash. The
//! leader is reaped only once the group was signalled for the last time: its zombie holds its
//! pid, the group's id, so no signal meant for the group reaches a process that took a reused
//! id. A last look for the marked processes that did not finish leaves them guarded until a
//! look on a thread of its own killed them (`GroupGuard`).
//!
//! Result, also inside [`ExecError::Failed`] for a non-zero exit or a signal, and inside
//! [`ExecError::Stopped`] for a cancelled (or timed-out) process:
//! `{"exit_code": 0, "duration_ms": 12, "stdout_tail": "..", "stderr_tail": "..",
//! "stdout_truncated": false, "stderr_truncated": false, "signal": null}`. A `*_truncated` flag is
//! always present, and true when the tail beside it is only the end of what the stream carried:
//! cut to `tail_bytes`, or further so that the result fits in a message (binary output grows up
//! to six times as JSON), which keeps the exit code and signal.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, Either, maybe_done, select};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use tether_proto::{CheckpointId, TaskId};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::time::{Instant, MissedTickBehavior};

use super::packing::{self, PackError, Signature};
use super::{ExecError, Executor, StoredCheckpoint, TaskCtx, TaskInput};

/// Bytes kept of stdout, and of stderr, when `tail_bytes` is not given.
pub const DEFAULT_TAIL_BYTES: usize = 4096;
/// Largest `tail_bytes` accepted.
pub const MAX_TAIL_BYTES: usize = 1024 * 1024;
/// Checkpoint directory poll interval when `checkpoint_poll_ms` is not given.
pub const DEFAULT_CHECKPOINT_POLL_MS: u64 = 1000;
/// Smallest `checkpoint_poll_ms` accepted.
pub const MIN_CHECKPOINT_POLL_MS: u64 = 10;
/// How long the checkpoint directory must stay the same to be shipped, at a poll or a
/// checkpoint request (the poll interval instead, if shorter): a file being written (not
/// paused that long) is not shipped half written, yet a task that rewrites its state about
/// once a poll interval is not left unshipped until its end, as it was when the directory
/// had to stay the same from one poll to the next (a user's review found a task writing every
/// second checkpointed only on request).
pub const SETTLE: Duration = Duration::from_millis(200);
/// Looks a checkpoint request takes at a directory that keeps changing before it gives up,
/// leaving it to the poll (and the end of the task).
pub const REQUEST_LOOKS: u32 = 10;
/// Time a process group gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long output is still read once the process group is gone; a process that left the
/// group may hold the pipes open forever.
pub const PIPE_DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long a task stopped for its worker's stop waits for room to queue the checkpoint it
/// wrote as it stopped, once packed and stored locally (neither is cut short: they take what
/// the directory's size and the disk make them take). What is not queued by then is queued
/// on without holding the stop, until [`STOP_QUEUE_UNTIL`].
pub const STOP_SHIP_LIMIT: Duration = Duration::from_secs(1);
/// How long after a worker's stop reached a task the checkpoint it wrote as it stopped is
/// still queued, piece by piece as the outbox makes room, once [`STOP_SHIP_LIMIT`] is past:
/// the longest the stop's session may still take it, the runner's grace for the tasks to stop
/// ([`crate::agent::SHUTDOWN_GRACE`]) and then the flush ([`crate::session::SHUTDOWN_FLUSH`]),
/// 10 s.
pub const STOP_QUEUE_UNTIL: Duration =
    crate::agent::SHUTDOWN_GRACE.saturating_add(crate::session::SHUTDOWN_FLUSH);
/// The interpreter of `shell`.
pub const SHELL: &str = "/bin/sh";

pub const ENV_TASK_ID: &str = "TETHER_TASK_ID";
pub const ENV_ATTEMPT: &str = "TETHER_ATTEMPT";
pub const ENV_CHECKPOINT_DIR: &str = "TETHER_CHECKPOINT_DIR";
/// Where a task may write its result as JSON (a benchmark's figures): read when its process
/// ends, into the result's `output` (`read_output`).
pub const ENV_RESULT_FILE: &str = "TETHER_RESULT_FILE";
/// The mark of an attempt's processes, `<executor nonce>:<task>:<attempt>`.
pub const ENV_TASK_MARK: &str = super::procs::MARK_ENV;
/// The worker's own secret, when given in the environment (`tether worker`): never inherited
/// by a task, whose output the coordinator keeps and serves.
pub const ENV_SECRET: &str = "TETHER_SECRET";
/// What a task's environment never inherits from the worker's: the settings the `tether` CLI
/// reads from the environment (every `env = "TETHER_..."` of its flags, the worker's and the
/// coordinator's, checked by a test against its sources), its secret and an API token. A
/// task that inherited them would run as this worker: a `tether worker` in a task registered
/// under the worker's id, with its state directory, and replaced the worker's own session; and
/// the credentials would end in output the coordinator keeps and serves. A task that wants
/// one gives it in its `env`. What the worker sets for the task (`TETHER_TASK_ID`,
/// `TETHER_CHECKPOINT_DIR`...) is not among them.
pub const WORKER_ENV: [&str; 22] = [
    // Credentials.
    ENV_SECRET,
    "TETHER_SECRET_FILE",
    "TETHER_TOKEN",
    "TETHER_TOKEN_FILE",
    // `tether worker` (and the client's coordinator and CA).
    "TETHER_COORDINATOR",
    "TETHER_WORKER_ID",
    "TETHER_STATE_DIR",
    "TETHER_EVENT_LOG",
    "TETHER_CA_FILE",
    "TETHER_CONFIG",
    "TETHER_METRICS_LISTEN",
    "TETHER_LOG",
    // `tether coordinator`, when started from the same environment.
    "TETHER_LISTEN",
    "TETHER_DATA_DIR",
    "TETHER_HEARTBEAT_BUDGET",
    "TETHER_IDLE_COALESCE",
    "TETHER_SECRETS_DIR",
    "TETHER_ADMIN_TOKEN_FILE",
    "TETHER_READ_TOKEN_FILE",
    "TETHER_METRICS_TOKEN_FILE",
    "TETHER_TLS_CERT",
    "TETHER_TLS_KEY",
];

/// Room a result leaves beside it in its message for the error it may travel with (an exit
/// status, the runner's `task timed out`).
const ERROR_ROOM: usize = 256;

/// How often a terminating group is checked for remaining members.
const GROUP_POLL: Duration = Duration::from_millis(20);
const READ_CHUNK: usize = 8 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    program: Option<String>,
    args: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    shell: Option<String>,
    #[serde(default = "default_tail_bytes")]
    tail_bytes: usize,
    #[serde(default = "default_poll_ms")]
    checkpoint_poll_ms: u64,
}

fn default_tail_bytes() -> usize {
    DEFAULT_TAIL_BYTES
}

fn default_poll_ms() -> u64 {
    DEFAULT_CHECKPOINT_POLL_MS
}

/// A validated config.
#[derive(Debug)]
struct Plan {
    program: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    tail_bytes: usize,
    poll: Duration,
}

impl Plan {
    fn parse(config: serde_json::Value) -> Result<Self, ExecError> {
        let config = if config.is_null() {
            serde_json::json!({})
        } else {
            config
        };
        let c: Config =
            serde_json::from_value(config).map_err(|e| ExecError::InvalidConfig(e.to_string()))?;
        Self::of(c)
    }

    /// [`Plan::parse`] of a config's JSON text.
    fn parse_text(config: &str) -> Result<Self, ExecError> {
        match serde_json::from_str::<Option<Config>>(config) {
            Ok(Some(c)) => Self::of(c),
            Ok(None) => Self::parse(serde_json::Value::Null),
            Err(e) => Err(ExecError::InvalidConfig(e.to_string())),
        }
    }

    fn of(c: Config) -> Result<Self, ExecError> {
        let invalid = |m: String| Err(ExecError::InvalidConfig(m));
        let (program, args) = match (c.program, c.shell, c.args) {
            (Some(_), Some(_), _) => return invalid("give `program` or `shell`, not both".into()),
            (None, None, _) => return invalid("missing `program` (or `shell`)".into()),
            (None, Some(_), Some(_)) => {
                return invalid("`args` go with `program`; a `shell` script has its own".into());
            }
            (Some(p), None, _) if p.is_empty() => return invalid("`program` is empty".into()),
            // Ran nothing and "completed", where an empty program is refused.
            (None, Some(s), None) if s.trim().is_empty() => {
                return invalid("`shell` is empty: a script of nothing runs nothing".into());
            }
            (Some(p), None, args) => (p, args.unwrap_or_default()),
            (None, Some(script), None) => (SHELL.to_owned(), vec!["-c".to_owned(), script]),
        };
        for (k, v) in &c.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return invalid(format!("`env` entry {k:?} is not a valid variable"));
            }
            if [
                ENV_TASK_ID,
                ENV_ATTEMPT,
                ENV_CHECKPOINT_DIR,
                ENV_RESULT_FILE,
            ]
            .contains(&k.as_str())
                || super::procs::is_mark_var(k.as_bytes())
            {
                return invalid(format!("`env` cannot set {k}; the worker sets it"));
            }
        }
        // A relative one is taken from where the worker was started, no place a task can
        // count on (and the coordinator refuses it at submission by this check).
        if let Some(cwd) = c.cwd.as_ref().filter(|d| !d.is_absolute()) {
            return invalid(format!(
                "`cwd` {cwd:?} is relative; it must be an absolute path on the worker"
            ));
        }
        if c.tail_bytes > MAX_TAIL_BYTES {
            let n = c.tail_bytes;
            return invalid(format!("`tail_bytes` is {n}; at most {MAX_TAIL_BYTES}"));
        }
        if c.checkpoint_poll_ms < MIN_CHECKPOINT_POLL_MS {
            let n = c.checkpoint_poll_ms;
            return invalid(format!(
                "`checkpoint_poll_ms` is {n}; at least {MIN_CHECKPOINT_POLL_MS}"
            ));
        }
        Ok(Self {
            program,
            args,
            env: c.env,
            cwd: c.cwd,
            tail_bytes: c.tail_bytes,
            poll: Duration::from_millis(c.checkpoint_poll_ms),
        })
    }

    fn command(
        &self,
        ctx: &TaskCtx,
        checkpoint_dir: Option<&Path>,
        result_file: Option<&Path>,
        mark: &str,
    ) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for setting in WORKER_ENV {
            cmd.env_remove(setting);
        }
        cmd.envs(&self.env)
            .envs(super::procs::inherited_marks(std::env::vars_os()))
            .env(ENV_TASK_ID, ctx.task_id().as_str())
            .env(ENV_ATTEMPT, ctx.attempt().to_string())
            .env(ENV_TASK_MARK, mark)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        match checkpoint_dir {
            Some(dir) => cmd.env(ENV_CHECKPOINT_DIR, dir),
            None => cmd.env_remove(ENV_CHECKPOINT_DIR),
        };
        match result_file {
            Some(file) => cmd.env(ENV_RESULT_FILE, file),
            None => cmd.env_remove(ENV_RESULT_FILE),
        };
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        cmd
    }
}

/// The `command` executor.
#[derive(Debug, Clone)]
pub struct CommandExecutor {
    kill_grace: Duration,
    /// Random, in the mark of every process it starts: another executor's (another worker's,
    /// in the same process or not) processes never carry it.
    nonce: Arc<str>,
    scans: Scans,
}

/// How an attempt's looks through `/proc` for its marked processes are bounded.
#[derive(Debug, Clone)]
struct Scans {
    /// Longest one is awaited ([`SCAN_LIMIT`]), its wait for a permit included.
    limit: Duration,
    /// The permits of looks under way ([`SCANS_AT_ONCE`]), shared by every executor of the
    /// process ([`scan_permits`]); a look holds one on its thread until it ends, stuck or not.
    permits: Arc<tokio::sync::Semaphore>,
    /// Tests: the last look of a termination (the one that kills) first waits until this
    /// receives or its sender is gone, as a look stuck on a process in the kernel waits.
    #[cfg(test)]
    stall: Option<Arc<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>>,
    /// Tests: how many looks wait in `stall` now.
    #[cfg(test)]
    stalled: Arc<std::sync::atomic::AtomicUsize>,
}

impl Scans {
    /// Runs `look` as [`bounded_scan_within`] does, with these permits and limit.
    async fn bounded<T: Send + 'static>(
        &self,
        look: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        bounded_scan_within(self.permits.clone(), self.limit, look).await
    }
}

impl Default for CommandExecutor {
    fn default() -> Self {
        Self {
            kill_grace: KILL_GRACE,
            nonce: uuid::Uuid::new_v4().simple().to_string().into(),
            scans: Scans {
                limit: SCAN_LIMIT,
                permits: scan_permits(),
                #[cfg(test)]
                stall: None,
                #[cfg(test)]
                stalled: Arc::default(),
            },
        }
    }
}

impl CommandExecutor {
    /// Sets the time a process group gets between SIGTERM and SIGKILL ([`KILL_GRACE`]).
    pub fn with_kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }
}

impl Executor for CommandExecutor {
    fn execute(
        &self,
        input: TaskInput,
        ctx: TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
        let mark = format!("{}:{}:{}", self.nonce, input.task_id, input.attempt);
        let procs = (mark.into(), self.scans.clone());
        Box::pin(run(input, ctx, self.kill_grace, procs))
    }

    /// Its kill grace, the reading of the output meanwhile, the wait to queue the last
    /// checkpoint of a worker's stop ([`STOP_SHIP_LIMIT`]; its pack and local store are not
    /// bounded, but a stopping worker starts no newer attempt to wait; what is left to queue
    /// then is queued on without the attempt), and a second to spare: 6 s by default.
    fn stop_grace(&self) -> Duration {
        self.kill_grace + PIPE_DRAIN_GRACE + STOP_SHIP_LIMIT + Duration::from_secs(1)
    }

    fn check_config(&self, config: &str) -> Result<(), String> {
        match Plan::parse_text(config) {
            Ok(_) => Ok(()),
            Err(ExecError::InvalidConfig(m)) => Err(m),
            Err(e) => Err(e.to_string()),
        }
    }
}

async fn run(
    input: TaskInput,
    ctx: TaskCtx,
    kill_grace: Duration,
    (mark, scans): (Arc<str>, Scans),
) -> Result<serde_json::Value, ExecError> {
    let plan = Plan::parse(input.config)?;
    let checkpoints = match ctx.checkpoint_dir() {
        Some(dir) => Some(prepare_dir(dir, ctx.shared.latest()).await?),
        None => None,
    };
    if ctx.is_cancelled() {
        return Err(ExecError::Cancelled);
    }
    let result_file = match checkpoints.as_ref() {
        Some(c) => Some(fresh_result_file(&c.dir).await?),
        None => None,
    };
    let mut cmd = plan.command(
        &ctx,
        checkpoints.as_ref().map(|c| c.dir.as_path()),
        result_file.as_deref(),
        &mark,
    );
    // Told before the spawn: a worker killed a moment after it leaves processes that carry the
    // mark already.
    let mut watch = super::warden::Watch::start(&mark, kill_grace);
    let started = Instant::now();
    let mut child = spawn(&mut cmd, &plan)?;
    let Some(pgid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
    else {
        // Only possible if the child was already reaped, which nothing here does.
        let _ = child.kill().await;
        return Err(ExecError::Failed {
            message: format!("cannot start {}: no process id", plan.program),
            result: not_started(),
        });
    };
    let procs = TaskProcs { pgid, mark, scans };
    watch.group(pgid);
    let record = ctx.group_record.clone();
    let mut guard = GroupGuard::arm(
        procs.clone(),
        record.clone().map(|f| (f, pgid)),
        Some(watch),
    );
    if let Some(file) = record {
        let mark = procs.mark.clone();
        // A file written, a process's stat read: not on a runtime thread.
        let write = move || {
            #[cfg(test)]
            tests::blocking_work(format!("record {}", file.display()));
            super::orphans::record(&file, pgid, &mark);
        };
        if let Err(e) = tokio::task::spawn_blocking(write).await {
            tracing::warn!(task_id = %ctx.task_id(), error = %e, "cannot record a task's process group");
        }
    }
    tracing::debug!(task_id = %ctx.task_id(), attempt = %ctx.attempt(), pid = pgid.as_raw(), program = %plan.program, "command started");

    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let mut out_tail = Tail::new(plan.tail_bytes);
    let mut err_tail = Tail::new(plan.tail_bytes);
    // `maybe_done`: the pumps may finish inside `wait_exit` and be awaited again after it.
    let pumps = maybe_done(async {
        tokio::join!(pump(stdout, &mut out_tail), pump(stderr, &mut err_tail));
    });
    let mut pumps = Box::pin(pumps);

    let mut sup = Supervisor::new(&ctx, procs.clone(), checkpoints, plan.poll, kill_grace);
    let end = sup.wait_exit(&mut child, pumps.as_mut()).await;
    let duration = started.elapsed();
    // The leader has exited but is not reaped (a cancel ended the processes already): what is
    // left of its group goes now, while its id is still the leader's and no other process's.
    let swept = match end {
        End::Cancelled(swept) => swept,
        End::Exited => terminate_draining(&mut child, &procs, kill_grace, pumps.as_mut()).await,
    };
    // The group is signalled no more: its leader is reaped next, and its id may then be
    // another process's.
    match swept {
        true => guard.disarm().await,
        false => {
            tracing::warn!(task_id = %ctx.task_id(), attempt = %ctx.attempt(), mark = %procs.mark, "the last look for the task's processes that left its group did not finish in time; they are looked for again on a thread of their own, and the warden and the group record keep them until then");
            guard.group_ended();
        }
    }
    let waited = child.wait().await;
    let status = match end {
        End::Cancelled(_) => {
            // What it wrote until it was stopped is what a hung task leaves to debug it by.
            let _ = tokio::time::timeout(PIPE_DRAIN_GRACE, pumps.as_mut()).await;
            drop(pumps);
            // The worker stops: the task's next attempt, elsewhere, resumes from the checkpoint
            // this one leaves, the one it wrote as it stopped (a TERM trap) included.
            if ctx.worker_stopping() {
                sup.finish_on_stop().await;
            }
            let ran = Ran::read(duration, result_file.as_deref(), ctx.max_frame()).await;
            let result = result(waited.ok(), &ran, &out_tail, &err_tail, ctx.max_frame());
            return Err(ExecError::Stopped { result });
        }
        End::Exited => match waited {
            Ok(status) => status,
            Err(e) => {
                return Err(ExecError::Failed {
                    message: format!("cannot wait for {}: {e}", plan.program),
                    result: not_started(),
                });
            }
        },
    };
    let _ = tokio::time::timeout(PIPE_DRAIN_GRACE, pumps.as_mut()).await;
    drop(pumps);
    sup.finish_checkpoints().await;
    drop(sup);
    tracing::debug!(task_id = %ctx.task_id(), %status, "command exited");
    let ran = Ran::read(duration, result_file.as_deref(), ctx.max_frame()).await;
    outcome(status, &ran, &out_tail, &err_tail, ctx.max_frame())
}

/// The attempt's result file ([`ENV_RESULT_FILE`]), beside its checkpoint directory
/// (`tasks/<task>.result.json`: not in it, which is shipped as the checkpoint), with what an
/// earlier attempt left there removed.
async fn fresh_result_file(checkpoint_dir: &Path) -> Result<PathBuf, ExecError> {
    let mut name = checkpoint_dir
        .file_name()
        .unwrap_or_default()
        .to_os_string();
    name.push(RESULT_FILE_SUFFIX);
    let file = checkpoint_dir.with_file_name(name);
    let cleared = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || clear(&file))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    };
    match cleared {
        Ok(()) => Ok(file),
        Err(e) => Err(ExecError::WorkerFault(format!(
            "cannot clear the result file {}: {e}",
            file.display()
        ))),
    }
}

/// Removes what is at `path`, whatever a task made of it: a file, a link (not followed), or a
/// directory tree (read-only parts included); nothing there is no error.
pub(crate) fn clear(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => packing::remove_tree(path),
        Ok(_) => std::fs::remove_file(path),
    }
}

/// What names a task's result file beside its checkpoint directory's name.
pub const RESULT_FILE_SUFFIX: &str = ".result.json";

/// What the task wrote to its result file, read and removed once its process ended: `None`
/// when it wrote none (or has none: no checkpoint directory), else its JSON, or why it is no
/// output: not JSON, larger than a result message carries (`max_frame`), or no file (a link
/// is not followed: the worker reads what the task wrote, not what a link points at).
async fn read_output(
    file: Option<&Path>,
    max_frame: usize,
) -> Option<Result<serde_json::Value, String>> {
    let file = file?.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&file);
        let opened = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                let _ = clear(&file);
                return Some(Err(format!("cannot be read: {e}")));
            }
        };
        let mut bytes = Vec::new();
        let limit = u64::try_from(max_frame).unwrap_or(u64::MAX);
        let read = opened.take(limit.saturating_add(1)).read_to_end(&mut bytes);
        let _ = clear(&file);
        Some(match read {
            Err(e) => Err(format!("cannot be read: {e}")),
            Ok(n) if n > max_frame => Err(format!(
                "is larger than a result message carries ({max_frame} bytes)"
            )),
            Ok(_) => serde_json::from_slice(&bytes).map_err(|e| format!("is not JSON: {e}")),
        })
    })
    .await;
    read.unwrap_or_else(|e| Some(Err(format!("cannot be read: {e}"))))
}

/// What an attempt's result says of its process beside its exit status and output tails.
struct Ran {
    duration: Duration,
    /// What it wrote to its result file ([`read_output`]).
    output: Option<Result<serde_json::Value, String>>,
}

impl Ran {
    /// A process that ran `duration`, its result file (if any) read.
    async fn read(duration: Duration, result_file: Option<&Path>, max_frame: usize) -> Self {
        let output = read_output(result_file, max_frame).await;
        Ran { duration, output }
    }
}

/// Starts the attempt's process. A program (or `cwd`) that is missing or may not be run is
/// the task's failure; anything else (no memory, no process or file left, a full disk) is the
/// worker's ([`spawn_fault_is_the_tasks`]).
fn spawn(cmd: &mut Command, plan: &Plan) -> Result<Child, ExecError> {
    #[cfg(test)]
    if let Some(errno) = spawn_fails_with(&plan.program) {
        return Err(spawn_error(&std::io::Error::from(errno), plan));
    }
    crate::reaper::spawn(cmd).map_err(|e| spawn_error(&e, plan))
}

fn spawn_error(e: &std::io::Error, plan: &Plan) -> ExecError {
    let message = match &plan.cwd {
        Some(cwd) => format!("cannot start {} in {}: {e}", plan.program, cwd.display()),
        None => format!("cannot start {}: {e}", plan.program),
    };
    match spawn_fault_is_the_tasks(e) {
        true => ExecError::Failed {
            message,
            result: not_started(),
        },
        false => ExecError::WorkerFault(message),
    }
}

/// Tests: programs whose start fails with the error beside them, as a start fails on a
/// machine out of processes or memory.
#[cfg(test)]
pub(crate) static SPAWN_FAILS: std::sync::Mutex<Vec<(String, nix::errno::Errno)>> =
    std::sync::Mutex::new(Vec::new());

#[cfg(test)]
fn spawn_fails_with(program: &str) -> Option<nix::errno::Errno> {
    let fails = SPAWN_FAILS.lock().unwrap_or_else(|p| p.into_inner());
    fails.iter().find(|(p, _)| p == program).map(|(_, e)| *e)
}

/// Whether a process could not be started for what the task asked (its program or `cwd`
/// missing, not executable, not a program, its arguments too long) rather than for what the
/// worker lacks at the moment (`EAGAIN`, `ENOMEM`, `EMFILE`, `ENFILE`, `ENOSPC`, `EIO`...).
fn spawn_fault_is_the_tasks(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    let Some(errno) = e.raw_os_error().map(Errno::from_raw) else {
        // Not from the kernel: std refused the command itself (a NUL byte in an argument).
        return true;
    };
    matches!(
        errno,
        Errno::ENOENT
            | Errno::EACCES
            | Errno::EPERM
            | Errno::ENOEXEC
            | Errno::ENOTDIR
            | Errno::EISDIR
            | Errno::ELOOP
            | Errno::ENAMETOOLONG
            | Errno::E2BIG
            | Errno::ELIBBAD
    )
}

/// Turns an exit status into the task's result. A zero exit whose result file is no output
/// (not JSON, too large) fails: the task said it wrote figures, and they are not there.
fn outcome(
    status: ExitStatus,
    ran: &Ran,
    out: &Tail,
    err: &Tail,
    max_frame: usize,
) -> Result<serde_json::Value, ExecError> {
    let result = result(Some(status), ran, out, err, max_frame);
    let message = match (status.code(), status.signal()) {
        (Some(0), _) => match result["output_error"].as_str() {
            None => return Ok(result),
            Some(why) => format!("its result file (${ENV_RESULT_FILE}) {why}"),
        },
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(name) => format!("killed by signal {sig} ({name})"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => format!("ended with {status}"),
    };
    Err(ExecError::Failed { message, result })
}

/// The result of a process that ran: how it ended (when known), how long it ran, what it wrote
/// to its result file (`output`, or why that is none, `output_error`), its output, the output
/// cut to fit in a message of `max_frame` ([`fit_tails`]). An `output` that leaves no room
/// for the rest in a message is said too large instead.
fn result(
    status: Option<ExitStatus>,
    ran: &Ran,
    out: &Tail,
    err: &Tail,
    max_frame: usize,
) -> serde_json::Value {
    let mut out = (out.text(), out.truncated);
    let mut err = (err.text(), err.truncated);
    let mut others = serde_json::json!({
        "exit_code": status.and_then(|s| s.code()),
        "duration_ms": u64::try_from(ran.duration.as_millis()).unwrap_or(u64::MAX),
        "stdout_tail": "",
        "stderr_tail": "",
        "stdout_truncated": true,
        "stderr_truncated": true,
        "signal": status.and_then(|s| s.signal()),
    });
    let room = max_frame
        .saturating_sub(tether_proto::codec::ENVELOPE_BYTES)
        .saturating_sub(ERROR_ROOM);
    match &ran.output {
        None => {}
        Some(Ok(output)) => {
            others["output"] = output.clone();
            if tether_proto::codec::json_len(&others) > room {
                let map = others.as_object_mut().expect("an object");
                map.remove("output");
                map.insert(
                    "output_error".into(),
                    format!("is larger than a result message carries ({max_frame} bytes)").into(),
                );
            }
        }
        Some(Err(why)) => others["output_error"] = why.as_str().into(),
    }
    let room = room.saturating_sub(tether_proto::codec::json_len(&others));
    fit_tails(&mut out, &mut err, room);
    others["stdout_tail"] = out.0.into();
    others["stderr_tail"] = err.0.into();
    others["stdout_truncated"] = out.1.into();
    others["stderr_truncated"] = err.1.into();
    others
}

/// Cuts two tails from the front, keeping their ends, until their contents take at most `room`
/// bytes as JSON strings, and marks a cut one truncated. Output of binary bytes grows up to six
/// times as JSON (`\u0000`); a result too large for a message would be replaced whole by a
/// failure, losing the exit code. Each tail gets half the room, and the other's unused half.
fn fit_tails(out: &mut (String, bool), err: &mut (String, bool), room: usize) {
    let (out_len, err_len) = (escaped_len(&out.0), escaped_len(&err.0));
    if out_len.saturating_add(err_len) <= room {
        return;
    }
    let half = room / 2;
    let (out_room, err_room) = if out_len <= half {
        (out_len, room - out_len)
    } else if err_len <= half {
        (room - err_len, err_len)
    } else {
        (half, room - half)
    };
    for (tail, room) in [(out, out_room), (err, err_room)] {
        let start = keep_end(&tail.0, room);
        if start > 0 {
            tail.0.drain(..start);
            tail.1 = true;
        }
    }
}

/// Bytes `text` takes inside a JSON string (without the quotes).
fn escaped_len(text: &str) -> usize {
    tether_proto::codec::json_len(&text).saturating_sub(2)
}

/// The byte index from which the end of `text` takes at most `room` bytes inside a JSON string.
fn keep_end(text: &str, room: usize) -> usize {
    let mut used = 0usize;
    let mut buf = [0u8; 4];
    for (i, c) in text.char_indices().rev() {
        used = used.saturating_add(escaped_len(c.encode_utf8(&mut buf)));
        if used > room {
            return i + c.len_utf8();
        }
    }
    0
}

/// The result of a process that never ran.
fn not_started() -> serde_json::Value {
    serde_json::json!({
        "exit_code": null,
        "duration_ms": 0,
        "stdout_tail": "",
        "stderr_tail": "",
        "stdout_truncated": false,
        "stderr_truncated": false,
        "signal": null,
    })
}

/// How the process ended, as far as the supervisor is concerned.
enum End {
    /// The leader exited; it is not reaped yet ([`leader_exited`]).
    Exited,
    /// Cancelled: the processes were ended (all of them known to be gone, or not: see
    /// [`terminate_group`]); the leader is not reaped yet.
    Cancelled(bool),
}

/// Checkpoint directory state of a running task.
struct Checkpoints {
    /// Absolute, so it stays right whatever the process's working directory is.
    dir: PathBuf,
    /// The signature last shipped (or found at start).
    last: Signature,
    /// What the files `last` describes are: what a checkpoint request that finds them as they
    /// were answers.
    basis: Basis,
    /// Another signature the last look saw, not shipped then: the directory is shipped once
    /// a later look sees it again (it stayed the same for a settle, [`SETTLE`]), not while a
    /// file in it is still being written.
    seen: Option<Signature>,
    /// The last error looking at the directory, to log each distinct one once.
    last_error: Option<String>,
}

/// What the files of a checkpoint directory as last shipped (or found at start) are.
#[derive(Debug, Clone, PartialEq)]
enum Basis {
    /// None: the directory as prepared for an attempt that resumed from no checkpoint, empty.
    Empty,
    /// Checkpoint `id`'s: shipped by this attempt, or the one it resumed from.
    Checkpoint(CheckpointId),
    /// Files that could not be packed (why): shipped by no look until they change.
    Unpackable(String),
}

impl Basis {
    /// Why a checkpoint request that finds the directory `dir` as these files left it ships
    /// nothing. What matters comes first: the coordinator keeps 256 characters of it.
    fn unchanged(&self, dir: &Path) -> String {
        let dir = dir.display();
        match self {
            Basis::Empty => {
                format!("the task has written no checkpoint in {dir} (it holds no files)")
            }
            Basis::Checkpoint(id) => format!(
                "the checkpoint dir is unchanged since checkpoint {id}: nothing new to ship ({dir})"
            ),
            Basis::Unpackable(e) => {
                format!("the checkpoint dir cannot be packed, and is unchanged since: {e} ({dir})")
            }
        }
    }
}

/// Creates the checkpoint directory and restores the latest checkpoint into it; with no
/// checkpoint, empties it. An attempt starts from its checkpoint or from nothing, never from
/// files an earlier attempt (or an earlier task of the same id) left without shipping them: a
/// resumable script would take them for its own progress.
async fn prepare_dir(
    dir: &Path,
    latest: Option<StoredCheckpoint>,
) -> Result<Checkpoints, ExecError> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let shown = dir.display().to_string();
    let blocking_dir = dir.clone();
    let basis = match &latest {
        Some(cp) => Basis::Checkpoint(cp.id.clone()),
        None => Basis::Empty,
    };
    let last = off_thread(move || {
        match latest {
            Some(cp) => packing::unpack(&cp.data, &blocking_dir)?,
            None => packing::clear_dir(&blocking_dir)?,
        }
        packing::signature(&blocking_dir)
    })
    .await
    .and_then(|r| r.map_err(|e| e.to_string()))
    // The worker's disk, not the task: the attempt runs again, here or elsewhere.
    .map_err(|e| ExecError::WorkerFault(format!("cannot prepare checkpoint dir {shown}: {e}")))?;
    Ok(Checkpoints {
        dir,
        last,
        basis,
        seen: None,
        last_error: None,
    })
}

/// What one look at the checkpoint directory found.
enum Snapshot {
    /// As last shipped.
    Unchanged,
    /// Changed since the look before: looked at again at the next poll.
    Unsettled(Signature),
    /// Packed, as `Signature` says (it did not change while it was packed).
    Changed(Signature, Result<Vec<u8>, PackError>),
    Unreadable(String),
}

/// How a look at the checkpoint directory takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// While the task runs: the directory is packed only once it stayed the same since the
    /// look before (a file still being written is not shipped half written).
    Running,
    /// Once the task's processes are gone: whatever it holds now is the last state.
    Final,
}

/// Looks at `dir` and packs it if its signature differs from `last` (while running, only if
/// it is also the signature the look before saw, `seen`, and it did not change while packed).
/// Blocking work runs off the async threads.
async fn snapshot(dir: PathBuf, last: Signature, seen: Option<Signature>, look: Look) -> Snapshot {
    let looked = off_thread(move || {
        let sig = match packing::signature(&dir) {
            Err(e) => return Snapshot::Unreadable(e.to_string()),
            Ok(sig) if sig == last => return Snapshot::Unchanged,
            Ok(sig) => sig,
        };
        if look == Look::Running && seen.as_ref() != Some(&sig) {
            return Snapshot::Unsettled(sig);
        }
        let packed = packing::pack(&dir);
        match packing::signature(&dir) {
            Ok(after) if after == sig => Snapshot::Changed(sig, packed),
            // Written while it was packed: the pack may hold a file half written.
            Ok(after) if look == Look::Running => Snapshot::Unsettled(after),
            // The task's processes are gone (those still writing are ones it could not end):
            // what was packed is the last state there is.
            Ok(_) => Snapshot::Changed(sig, packed),
            Err(e) => Snapshot::Unreadable(e.to_string()),
        }
    })
    .await;
    looked.unwrap_or_else(Snapshot::Unreadable)
}

/// What a look at the checkpoint directory leaves to remember.
#[derive(Debug)]
enum Looked {
    Unchanged,
    /// Changed since the look before; not shipped (yet).
    Unsettled(Signature),
    /// Shipped (or known not to pack: the same files would fail the same way), as what.
    Shipped(Signature, Basis),
}

/// Ships the directory if it changed (and, while running, settled); returns what to remember
/// of this look.
async fn ship(
    ctx: &TaskCtx,
    dir: PathBuf,
    (last, seen): (Signature, Option<Signature>),
    look: Look,
) -> Result<Looked, String> {
    match snapshot(dir, last, seen, look).await {
        Snapshot::Unchanged => Ok(Looked::Unchanged),
        Snapshot::Unsettled(sig) => Ok(Looked::Unsettled(sig)),
        Snapshot::Changed(sig, Ok(data)) => {
            let size = data.len();
            let id = ctx.checkpoint(data).await;
            tracing::debug!(task_id = %ctx.task_id(), checkpoint_id = %id, size, "checkpoint shipped");
            Ok(Looked::Shipped(sig, Basis::Checkpoint(id)))
        }
        Snapshot::Changed(sig, Err(e)) => {
            // Remember the signature anyway: the same files would fail the same way.
            tracing::warn!(task_id = %ctx.task_id(), error = %e, "checkpoint dir not shipped");
            Ok(Looked::Shipped(sig, Basis::Unpackable(e.to_string())))
        }
        Snapshot::Unreadable(e) => Err(e),
    }
}

/// A checkpoint request's look: ships the directory if it changed since `last` and then stays
/// the same for `settle` (a directory already seen the same at the last poll, `seen`, at
/// once); looks up to [`REQUEST_LOOKS`] times.
///
/// A look that ships nothing answers the request with a `checkpoint_error` saying why, so
/// that `tether checkpoint --wait` need not wait out its time for a checkpoint that will not
/// come: the directory is as the files of `basis` left it (unchanged since that checkpoint, or
/// empty with none written, or not packable), it could not be read, or it kept changing. The
/// answer is true when the look was made: files the task writes just after it are shipped by
/// the next poll (or request) all the same, after an answer that said there was nothing new.
///
/// Not `answer`ing (the look a request answered while the task was paused owes once it is
/// resumed), a look that ships nothing says nothing.
async fn ship_requested(
    ctx: &TaskCtx,
    dir: PathBuf,
    (last, seen, basis): (Signature, Option<Signature>, Basis),
    settle: Duration,
    answer: bool,
) -> Result<Looked, String> {
    let looked = ship_settled(ctx, dir.clone(), (last, seen), settle, REQUEST_LOOKS).await;
    let why = match looked {
        Ok(Looked::Unsettled(_)) => {
            tracing::info!(task_id = %ctx.task_id(), looks = REQUEST_LOOKS, "checkpoint request: the checkpoint dir kept changing; shipped once it stays the same for a settle, or at the end");
            format!(
                "the checkpoint dir kept changing over {REQUEST_LOOKS} looks: it is shipped once it stays the same for {} ms, or as the task ends ({})",
                settle.as_millis(),
                dir.display()
            )
        }
        Ok(Looked::Unchanged) => {
            tracing::debug!(task_id = %ctx.task_id(), "checkpoint request: the checkpoint dir is as last shipped");
            basis.unchanged(&dir)
        }
        Ok(Looked::Shipped(_, Basis::Unpackable(ref e))) => {
            format!(
                "the checkpoint dir cannot be packed: {e} ({})",
                dir.display()
            )
        }
        Ok(Looked::Shipped(..)) => return looked,
        Err(ref e) => format!("cannot read the checkpoint dir {}: {e}", dir.display()),
    };
    if answer {
        ctx.refuse_checkpoint(why);
    }
    looked
}

/// Ships the directory if it changed since `last` and then stays the same for `settle` (at
/// once if it is as `seen`, the look before last saw it), looking up to `looks` times (at
/// least once); returns what the last look left. A directory still changing at the last look
/// is left `Unsettled`, for the next look to find it settled.
async fn ship_settled(
    ctx: &TaskCtx,
    dir: PathBuf,
    (last, mut seen): (Signature, Option<Signature>),
    settle: Duration,
    looks: u32,
) -> Result<Looked, String> {
    let mut look = 1;
    loop {
        match ship(ctx, dir.clone(), (last.clone(), seen), Look::Running).await {
            Ok(Looked::Unsettled(sig)) if look < looks => {
                seen = Some(sig);
                look += 1;
                tokio::time::sleep(settle).await;
            }
            looked => return looked,
        }
    }
}

/// Looks a poll takes at a changed directory, [`SETTLE`] apart, before the next poll is due:
/// one when the settle is the poll interval itself.
fn poll_looks(poll: Duration, settle: Duration) -> u32 {
    let looks = poll.as_millis() / settle.as_millis().max(1);
    u32::try_from(looks)
        .unwrap_or(REQUEST_LOOKS)
        .clamp(1, REQUEST_LOOKS)
}

/// The answer to a checkpoint request while the task is paused (its processes stopped): no
/// look until it is resumed.
fn paused_answer(ctx: &TaskCtx) -> String {
    ctx.shared
        .paused_answer("its checkpoint dir is looked at once it is resumed")
}

/// Runs blocking work on the blocking pool; `Err` if it panicked or the runtime is going away.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "blocking checkpoint work failed");
        format!("blocking work failed: {e}")
    })
}

/// Watches a running process: cancellation, pause and checkpoint polling.
struct Supervisor<'a> {
    ctx: &'a TaskCtx,
    procs: TaskProcs,
    checkpoints: Option<Checkpoints>,
    poll: Duration,
    kill_grace: Duration,
    /// INVARIANT: `stopped` is true exactly while the group has been sent SIGSTOP and no
    /// SIGCONT since.
    stopped: bool,
    /// The pause point this supervisor parks at while the group is stopped.
    park: Option<BoxFuture<'a, ()>>,
    /// Stopped while a checkpoint was in flight: that checkpoint parks first, then we do.
    park_pending: bool,
    /// A request came while the task was paused, answered so: the directory is looked at
    /// once it is resumed.
    owed: bool,
    /// A checkpoint being looked at, packed or shipped (shipping may park while paused).
    shipping: Option<BoxFuture<'a, Result<Looked, String>>>,
    /// When the cancellation was seen: a worker's stop, for the last checkpoint's queueing
    /// ([`STOP_QUEUE_UNTIL`]).
    cancelled_at: Option<Instant>,
    /// The directory was looked at once the task's processes were gone: `checkpoints` says
    /// what it holds for good.
    looked_last: bool,
}

/// The supervisor answers checkpoint requests (`TaskShared::answers_requests`) from the
/// start of its watch until it is dropped, past the process's exit: the runner leaves a
/// request for a task with no checkpoint of its own to the executor while it answers, so one
/// that came as the process exited (its exit is seen first), or while a look was in flight,
/// would otherwise be answered by nothing, and `tether checkpoint --wait` wait out its time.
/// The last look stores a checkpoint if the directory changed (which answers the request);
/// one still pending is answered here, with what that look found.
impl Drop for Supervisor<'_> {
    fn drop(&mut self) {
        let shared = &self.ctx.shared;
        shared
            .answers_requests
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let Some(cp) = &self.checkpoints else {
            return;
        };
        if !shared
            .checkpoint_requested
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let why = match (&cp.last_error, self.looked_last) {
            (Some(e), true) => format!("cannot read the checkpoint dir {}: {e}", cp.dir.display()),
            (None, true) => format!("the task ended: {}", cp.basis.unchanged(&cp.dir)),
            (_, false) => format!(
                "the task ended before its checkpoint dir was looked at again ({})",
                cp.dir.display()
            ),
        };
        tracing::debug!(task_id = %self.ctx.task_id(), %why, "checkpoint request answered as the task ended");
        self.ctx.refuse_checkpoint(why);
    }
}

impl<'a> Supervisor<'a> {
    fn new(
        ctx: &'a TaskCtx,
        procs: TaskProcs,
        checkpoints: Option<Checkpoints>,
        poll: Duration,
        kill_grace: Duration,
    ) -> Self {
        Self {
            ctx,
            procs,
            checkpoints,
            poll,
            kill_grace,
            stopped: false,
            park: None,
            park_pending: false,
            owed: false,
            shipping: None,
            cancelled_at: None,
            looked_last: false,
        }
    }

    /// Waits until the process exits or the task is cancelled; a cancelled process group has
    /// been killed when this returns. The leader is not reaped either way.
    async fn wait_exit(
        &mut self,
        child: &mut Child,
        mut pumps: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> End {
        let ctx = self.ctx;
        // From now on a request is answered here (a checkpoint, or why none comes; that the
        // task is paused, while it is), until the supervisor is dropped (its `Drop`).
        ctx.shared.answers_requests.store(
            self.checkpoints.is_some(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut pause = ctx.pause_watch();
        // A pause requested before the start applies at once.
        pause.mark_changed();
        let mut pause_open = true;
        let mut pumps_done = false;
        let mut tick = tokio::time::interval_at(Instant::now() + self.poll, self.poll);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let can_poll = self.checkpoints.is_some() && self.shipping.is_none() && !self.stopped;
            tokio::select! {
                biased;
                () = ctx.cancelled() => {
                    self.cancelled_at = Some(Instant::now());
                    let swept = terminate_draining(child, &self.procs, self.kill_grace, pumps).await;
                    tracing::debug!(task_id = %ctx.task_id(), "command cancelled");
                    return End::Cancelled(swept);
                }
                () = leader_exited(child) => return End::Exited,
                () = poll_opt(&mut self.park) => {
                    self.park = None;
                    self.resume().await;
                }
                changed = pause.changed(), if pause_open && !self.stopped => match changed {
                    Err(_) => pause_open = false,
                    Ok(()) if *pause.borrow_and_update() => self.stop().await,
                    Ok(()) => {}
                },
                shipped = poll_opt(&mut self.shipping) => {
                    self.shipping = None;
                    self.shipped(shipped);
                    if std::mem::take(&mut self.park_pending) {
                        self.park = Some(Box::pin(ctx.pause_point()));
                    }
                }
                // A request asks for the look at once; taken here, so that a directory as
                // last shipped does not keep it pending (a checkpoint stored clears it too).
                // While paused it is answered at once, a look in flight or not: no look
                // starts until the task is resumed, and a request waiting for one was
                // answered by nothing.
                () = ctx.checkpoint_wanted(), if can_poll || (self.stopped && self.checkpoints.is_some()) => {
                    ctx.shared.checkpoint_requested.store(false, std::sync::atomic::Ordering::Relaxed);
                    if self.stopped {
                        self.owed = true;
                        ctx.refuse_checkpoint(paused_answer(ctx));
                    } else {
                        self.owed = false;
                        self.start_requested(true);
                    }
                }
                // Resumed after a request answered that the task was paused: the look it was
                // told of.
                () = std::future::ready(()), if can_poll && self.owed => {
                    self.owed = false;
                    self.start_requested(false);
                }
                _ = tick.tick(), if can_poll => self.start_polling(),
                () = &mut pumps, if !pumps_done => pumps_done = true,
            }
        }
    }

    /// After the process exited: lets an in-flight checkpoint finish and ships the directory
    /// once more if it changed. Gives up (the process already ended) if the attempt is
    /// cancelled meanwhile: nothing resumes from it.
    async fn finish_checkpoints(&mut self) {
        if self.checkpoints.is_none() {
            return;
        }
        let ctx = self.ctx;
        let finish = async {
            if let Some(inflight) = self.shipping.take() {
                let shipped = inflight.await;
                self.shipped(shipped);
            }
            self.start_last_look();
            if let Some(last) = self.shipping.take() {
                let shipped = last.await;
                self.shipped(shipped);
                self.looked_last = true;
            }
        };
        tokio::select! {
            () = finish => {}
            () = ctx.cancelled() => {
                tracing::debug!(task_id = %ctx.task_id(), "the last checkpoint given up: the attempt is cancelled");
            }
        }
    }

    /// The worker stops, and the task's processes are gone: ships the directory once more if
    /// it changed (a TERM trap's last state, which the next attempt elsewhere resumes from).
    /// Its pack and its local store are not cut short: they are bounded by the directory's
    /// size and the disk, and the stored copy is what a resume here finds. Its announcement and
    /// pieces are queued in order, each once the outbox has room for it; the stop waits for
    /// that up to [`STOP_SHIP_LIMIT`] (it must not wait for ever on a session that takes
    /// nothing), and what is left then is queued on without it ([`queue_after_stop`]).
    async fn finish_on_stop(&mut self) {
        let Some(cp) = &self.checkpoints else {
            return;
        };
        let ctx = self.ctx;
        // A look in flight is taken again here. Its store, if it started, lands all the same
        // (on the blocking pool), before this one's; its pieces are not queued, this one's are.
        self.shipping = None;
        let (dir, last) = (cp.dir.clone(), cp.last.clone());
        let data = match snapshot(dir.clone(), last, None, Look::Final).await {
            Snapshot::Unchanged => {
                self.looked_last = true;
                return;
            }
            Snapshot::Unsettled(_) => return,
            Snapshot::Changed(_, Ok(data)) => data,
            Snapshot::Changed(_, Err(e)) => {
                tracing::warn!(task_id = %ctx.task_id(), error = %e, "the checkpoint dir written as the worker stops is not shipped");
                return;
            }
            Snapshot::Unreadable(e) => {
                tracing::warn!(task_id = %ctx.task_id(), dir = %dir.display(), error = %e, "cannot read the checkpoint dir as the worker stops; its last state is not shipped");
                return;
            }
        };
        // The limit counts from the store's end: a store in flight lands first, then this one.
        let stored = ctx.store_checkpoint(data).await;
        let (id, size) = (stored.id().clone(), stored.size());
        let mut upload = Box::pin(ctx.upload(stored));
        if tokio::time::timeout(STOP_SHIP_LIMIT, upload.as_mut())
            .await
            .is_ok()
        {
            tracing::debug!(task_id = %ctx.task_id(), checkpoint_id = %id, size, "the checkpoint written as the worker stops is queued");
            return;
        }
        let until = self.cancelled_at.unwrap_or_else(Instant::now) + STOP_QUEUE_UNTIL;
        queue_after_stop((ctx.task_id().clone(), id, size), upload, until);
    }

    /// A poll's look: ships the directory if it changed and then settles before the next
    /// poll is due ([`ship_settled`]).
    fn start_polling(&mut self) {
        if let Some(cp) = &self.checkpoints {
            let settle = SETTLE.min(self.poll);
            let looks = poll_looks(self.poll, settle);
            let seen = (cp.last.clone(), cp.seen.clone());
            let fut = ship_settled(self.ctx, cp.dir.clone(), seen, settle, looks);
            self.shipping = Some(Box::pin(fut));
        }
    }

    /// The look once the task's processes are gone: whatever the directory holds is shipped
    /// if it changed, settled or not.
    fn start_last_look(&mut self) {
        if let Some(cp) = &self.checkpoints {
            let seen = (cp.last.clone(), cp.seen.clone());
            let fut = ship(self.ctx, cp.dir.clone(), seen, Look::Final);
            self.shipping = Some(Box::pin(fut));
        }
    }

    /// Starts a checkpoint request's look ([`ship_requested`]), answering the request if it
    /// ships nothing when `answer`.
    fn start_requested(&mut self, answer: bool) {
        if let Some(cp) = &self.checkpoints {
            let seen = (cp.last.clone(), cp.seen.clone(), cp.basis.clone());
            let settle = SETTLE.min(self.poll);
            let fut = ship_requested(self.ctx, cp.dir.clone(), seen, settle, answer);
            self.shipping = Some(Box::pin(fut));
        }
    }

    fn shipped(&mut self, shipped: Result<Looked, String>) {
        let Some(cp) = &mut self.checkpoints else {
            return;
        };
        cp.seen = None;
        match shipped {
            Ok(Looked::Shipped(sig, basis)) => {
                cp.last = sig;
                cp.basis = basis;
                cp.last_error = None;
            }
            Ok(Looked::Unsettled(sig)) => {
                cp.seen = Some(sig);
                cp.last_error = None;
            }
            Ok(Looked::Unchanged) => cp.last_error = None,
            Err(e) => {
                if cp.last_error.as_ref() != Some(&e) {
                    tracing::warn!(task_id = %self.ctx.task_id(), dir = %cp.dir.display(), error = %e, "cannot read checkpoint dir");
                }
                cp.last_error = Some(e);
            }
        }
    }

    /// Stops the group and the processes that left it, and parks at a pause point (after an
    /// in-flight checkpoint, which parks at its own).
    async fn stop(&mut self) {
        signal_group(self.procs.pgid, Signal::SIGSTOP);
        marked(&self.procs, Some(Signal::SIGSTOP)).await;
        self.stopped = true;
        tracing::debug!(task_id = %self.ctx.task_id(), "command paused");
        if self.shipping.is_some() {
            self.park_pending = true;
        } else {
            self.park = Some(Box::pin(self.ctx.pause_point()));
        }
    }

    async fn resume(&mut self) {
        signal_group(self.procs.pgid, Signal::SIGCONT);
        marked(&self.procs, Some(Signal::SIGCONT)).await;
        self.stopped = false;
        tracing::debug!(task_id = %self.ctx.task_id(), "command resumed");
    }
}

/// Queues what is left of `upload`, the announcement and pieces of the checkpoint `id` (of
/// `size` bytes) that task `task_id` wrote as its worker stops and that found no room in the
/// outbox within [`STOP_SHIP_LIMIT`]: each once the outbox has room for it (the stop's flush
/// makes it as the coordinator acknowledges what was sent), in order, until `until`, the
/// longest the stop's flush may last ([`STOP_QUEUE_UNTIL`]). All queued and acknowledged
/// within the flush, the coordinator holds the checkpoint, and the task's next attempt
/// elsewhere resumes from it; otherwise it stays stored here (`Runner::handed_back` keeps a
/// checkpoint the coordinator does not hold). A stop with no session has nothing to make
/// room: this then waits in vain, until `until` or the runtime's end, holding up nothing.
///
/// On a task of its own, not the runner's: the runner's tasks are what the stop waits for
/// (`SHUTDOWN_GRACE`), and the flush begins only once they ended. Not tracked either (no one
/// would wait for it): bounded by `until`, it ends with the runtime, and it holds only the
/// task's turn to queue uploads, which nothing waits for once the attempt ended.
fn queue_after_stop(
    (task_id, id, size): (TaskId, CheckpointId, usize),
    upload: impl Future<Output = ()> + Send + 'static,
    until: Instant,
) {
    let limit_ms = STOP_SHIP_LIMIT.as_millis() as u64;
    tracing::warn!(%task_id, checkpoint_id = %id, size, limit_ms, "the checkpoint written as the worker stops is stored here, but its pieces found no room in the outbox within the limit: the stop goes on, and the rest is queued as room is made while the worker's stop flush lasts");
    let queue = async move {
        match tokio::time::timeout_at(until, upload).await {
            Ok(()) => {
                tracing::info!(%task_id, checkpoint_id = %id, size, "the checkpoint written as the worker stops is queued, every piece, after its task stopped");
            }
            Err(_) => {
                tracing::warn!(%task_id, checkpoint_id = %id, size, "the checkpoint written as the worker stops is stored here, but not all of it was queued while the worker's stop could still send it (its flush has ended by now): the next attempt elsewhere resumes from an earlier checkpoint, a resume here from this one");
            }
        }
    };
    drop(tokio::spawn(queue));
}

/// Awaits the future in `slot`, or never if there is none.
async fn poll_opt<T>(slot: &mut Option<BoxFuture<'_, T>>) -> T {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// The processes of one attempt: its group, and the mark of those that left it.
#[derive(Debug, Clone)]
struct TaskProcs {
    pgid: Pid,
    mark: Arc<str>,
    scans: Scans,
}

/// Ends what is left of the attempt's processes, the group and those that left it (found by
/// their mark): SIGTERM (with SIGCONT, in case they are stopped), SIGKILL to those still there
/// after `grace`; a leader that left its group is killed too. Returns at once if none is left.
/// The leader is not reaped here: until it is, its pid, the group's id, is no other process's,
/// so every signal sent to the group reaches this attempt's processes only. Returns whether
/// the processes that left the group are known to be gone: not when the last look for them
/// (the one that kills) did not finish in time.
async fn terminate_group(child: &mut Child, procs: &TaskProcs, grace: Duration) -> bool {
    let pgid = procs.pgid;
    // The leader's zombie takes a signal too: only a live member counts.
    let in_group = signal_group(pgid, Signal::SIGTERM) && group_alive(procs).await;
    // The group's members carry the mark too: only those that left the group are signalled. A
    // look that did not finish counts as one that found some.
    let escaped = marked(procs, Some(Signal::SIGTERM)).await != Some(0);
    let mut swept = true;
    if in_group || escaped {
        signal_group(pgid, Signal::SIGCONT);
        let deadline = Instant::now() + grace;
        let _ = tokio::time::timeout_at(deadline, leader_exited(child)).await;
        while Instant::now() < deadline && any_left(procs).await {
            tokio::time::sleep(GROUP_POLL).await;
        }
        signal_group(pgid, Signal::SIGKILL);
        let mark = procs.mark.clone();
        #[cfg(test)]
        let (stall, stalled) = (procs.scans.stall.clone(), procs.scans.stalled.clone());
        let kill = move || {
            #[cfg(test)]
            if let Some(stall) = &stall {
                use std::sync::atomic::Ordering::SeqCst;
                stalled.fetch_add(1, SeqCst);
                let _ = stall.lock().map(|r| r.recv());
                stalled.fetch_sub(1, SeqCst);
            }
            super::procs::kill_marked(&mark)
        };
        swept = procs.scans.bounded(kill).await.is_some();
    }
    if !leader_has_exited(child) {
        // The leader left its group (setsid); it still ends with the task.
        let _ = child.start_kill();
    }
    swept
}

/// [`terminate_group`], reading output meanwhile: a process that writes while it shuts down
/// must not block on a full pipe until SIGKILL. `pumps` must tolerate being polled when done.
async fn terminate_draining(
    child: &mut Child,
    procs: &TaskProcs,
    grace: Duration,
    pumps: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let term = std::pin::pin!(terminate_group(child, procs, grace));
    match select(term, pumps).await {
        Either::Left((swept, _)) => swept,
        Either::Right(((), term)) => term.await,
    }
}

/// Resolves once the leader has exited, without reaping it: until its `Child` is waited for,
/// its zombie holds its pid, the group's id, which no other process can take meanwhile. Woken
/// by SIGCHLD (every [`GROUP_POLL`] where that cannot be listened for). Where the kernel cannot
/// be asked without reaping, the leader is reaped here, as before.
async fn leader_exited(child: &mut Child) {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Listened for before the first look: an exit between the look and the wait wakes it.
        let mut sigchld = signal(SignalKind::child()).ok();
        while !leader_has_exited(child) {
            match &mut sigchld {
                Some(s) => {
                    if s.recv().await.is_none() {
                        sigchld = None;
                    }
                }
                None => tokio::time::sleep(GROUP_POLL).await,
            }
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    {
        let _ = child.wait().await;
    }
}

/// Whether the leader has exited, asked without reaping it (`waitid` with `WNOWAIT`).
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn leader_has_exited(child: &mut Child) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    // No id: it was reaped already.
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return true;
    };
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    loop {
        match waitid(Id::Pid(Pid::from_raw(pid)), flags) {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => {}
            // Not a child of this process (any more): nothing is left to wait for.
            Err(_) => return true,
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn leader_has_exited(child: &mut Child) -> bool {
    !matches!(child.try_wait(), Ok(None))
}

/// Counts the live processes carrying the attempt's mark (a look at `/proc`, off the async
/// threads), or, given a signal (its group signalled already), sends it (SIGTERM with SIGCONT)
/// to those outside that group and counts them. `None` when the look did not finish in time.
async fn marked(procs: &TaskProcs, sig: Option<Signal>) -> Option<usize> {
    let (mark, pgid) = (procs.mark.clone(), procs.pgid);
    let look = move || match sig {
        Some(sig) => {
            let group = u32::try_from(pgid.as_raw()).ok();
            super::procs::signal_marked(&mark, sig, group)
        }
        None => super::procs::marked(&mark).len(),
    };
    procs.scans.bounded(look).await
}

/// Longest a look through `/proc` for marked processes is awaited.
const SCAN_LIMIT: Duration = Duration::from_secs(5);

/// Most looks through `/proc` the `command` executors of a process run at once. A look stuck
/// on a process in the kernel holds its blocking-pool thread for as long as that process is
/// stuck, and every task's end looks: unbounded, the stuck looks of a few hundred ends took
/// every thread of the blocking pool, and no task could start (its preparation waits for
/// one). With at most this many at once, at most this many threads are stuck; the looks
/// that find no permit within their limit are given up as ones that did not finish.
pub const SCANS_AT_ONCE: usize = 4;

/// The permits of the looks through `/proc` of this process's `command` executors.
fn scan_permits() -> Arc<tokio::sync::Semaphore> {
    static PERMITS: std::sync::LazyLock<Arc<tokio::sync::Semaphore>> =
        std::sync::LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(SCANS_AT_ONCE)));
    PERMITS.clone()
}

/// Runs a look through `/proc` on the blocking pool, awaited at most `limit` ([`SCAN_LIMIT`]): reading a
/// process's `environ` waits for its memory map, which a process stuck in the kernel (a hung
/// network mount) may hold for ever, and the task's end must not wait with it. `None` when
/// it did not finish in time (it may still, on its own thread), or did not start: it waits
/// for one of `permits` (the process's [`SCANS_AT_ONCE`]) within the same limit.
async fn bounded_scan_within<T: Send + 'static>(
    permits: Arc<tokio::sync::Semaphore>,
    limit: Duration,
    look: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    let limit_ms = limit.as_millis() as u64;
    let permit = match tokio::time::timeout_at(deadline, permits.acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            tracing::warn!(
                limit_ms,
                at_once = SCANS_AT_ONCE,
                "a look through /proc for a task's processes found the looks allowed at once all under way (stuck on a process in the kernel, perhaps) until its limit; going on without it"
            );
            return None;
        }
    };
    // Held on the look's thread until the look ends, however long it is stuck.
    let look = move || {
        let _permit = permit;
        look()
    };
    match tokio::time::timeout_at(deadline, tokio::task::spawn_blocking(look)).await {
        Ok(done) => done.ok(),
        Err(_) => {
            tracing::warn!(
                limit_ms,
                "a look through /proc for a task's processes did not finish in time; going on without it"
            );
            None
        }
    }
}

/// Sends `sig` to the group; false if the group has no members left.
fn signal_group(pgid: Pid, sig: Signal) -> bool {
    match killpg(pgid, sig) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => {
            tracing::warn!(pgid = pgid.as_raw(), signal = %sig, error = %e, "cannot signal process group");
            true
        }
    }
}

/// Whether a process of the group still runs. Zombies do not count: an orphan's zombie waits
/// for a reaper (init, or nobody in some containers) and runs no more. Uses `/proc` where it
/// exists, on the blocking pool: the look reads the stat of every process on the machine, and
/// asking the kernel first spares it only once the group is gone for good (the leader's zombie,
/// not reaped yet, is a member). Elsewhere asks the kernel, which counts zombies. A look that
/// did not finish in time ([`bounded_scan_within`]) counts as one that found a member.
async fn group_alive(procs: &TaskProcs) -> bool {
    let pgid = procs.pgid;
    if matches!(killpg(pgid, None), Err(nix::errno::Errno::ESRCH)) {
        return false;
    }
    let look = move || live_member_in_proc(pgid).unwrap_or(true);
    procs.scans.bounded(look).await.unwrap_or(true)
}

/// Whether a process of the attempt is known to be left: a live member of its group, or one
/// that left the group but carries its mark. One look through `/proc`, on the blocking pool;
/// one that did not finish in time knows of none (the grace is waited no longer: SIGKILL
/// follows).
async fn any_left(procs: &TaskProcs) -> bool {
    let (pgid, mark) = (procs.pgid, procs.mark.clone());
    if matches!(killpg(pgid, None), Err(nix::errno::Errno::ESRCH)) {
        return marked(procs, None).await.unwrap_or(0) > 0;
    }
    let look = move || {
        live_member_in_proc(pgid).unwrap_or(true) || !super::procs::marked(&mark).is_empty()
    };
    procs.scans.bounded(look).await.unwrap_or(false)
}

/// Scans `/proc` for a non-zombie process in group `pgid`; `None` without a readable `/proc`.
fn live_member_in_proc(pgid: Pid) -> Option<bool> {
    #[cfg(test)]
    tests::blocking_work(format!("group {pgid}"));
    std::fs::read_dir("/proc").ok()?;
    let pgid = u32::try_from(pgid.as_raw()).ok()?;
    // Processes come and go while we look; a vanished one is simply not a member.
    Some(
        super::procs::pids().any(|pid| {
            super::procs::Stat::read(pid).is_some_and(|s| s.pgrp == pgid && !s.is_dead())
        }),
    )
}

/// The processes of every attempt the `command` executors of this process run now, by mark,
/// with their process group while it may still be signalled (its leader not reaped): what
/// [`kill_all_now`] ends.
static LIVE: std::sync::Mutex<BTreeMap<Arc<str>, Option<Pid>>> =
    std::sync::Mutex::new(BTreeMap::new());

fn live() -> std::sync::MutexGuard<'static, BTreeMap<Arc<str>, Option<Pid>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills (SIGKILL) at once the processes of every attempt that the `command` executors of
/// this process run: each group, and the processes that left it (by their mark). For a
/// process about to exit without waiting for its tasks (a second stop signal to `tether
/// worker`), so that none of them is left running. Blocking: it looks through `/proc`, for at
/// most `super::procs::BLOCKING_SCAN_LIMIT` (the process exits all the same). Returns the
/// number of attempts whose processes it signalled.
pub fn kill_all_now() -> usize {
    let attempts: Vec<(Arc<str>, Option<Pid>)> = live()
        .iter()
        .map(|(mark, pgid)| (mark.clone(), *pgid))
        .collect();
    for pgid in attempts.iter().filter_map(|(_, pgid)| *pgid) {
        signal_group(pgid, Signal::SIGKILL);
    }
    let n = attempts.len();
    super::procs::blocking_within(super::procs::BLOCKING_SCAN_LIMIT, move || {
        for (mark, _) in &attempts {
            super::procs::kill_marked(mark);
        }
    });
    n
}

/// Kills the process group if the execution is dropped before it ended the group itself, and
/// the processes that left the group unless they are known to be gone; then removes the
/// group's record (see [`super::orphans`]), if the record is still this group's: a newer
/// attempt of the task may have recorded its own in the same file. Either way it then tells
/// the process's warden ([`super::warden`]) the attempt is over: the warden acts only on
/// attempts it was not told were over, when the worker process dies.
struct GroupGuard {
    procs: Option<TaskProcs>,
    /// The group may still be signalled: its leader is not reaped, so its id is no other
    /// process's.
    group: bool,
    record: Option<(PathBuf, Pid)>,
    warden: Option<super::warden::Watch>,
}

impl GroupGuard {
    /// Guards the processes of a started attempt (and lists them for [`kill_all_now`]).
    fn arm(
        procs: TaskProcs,
        record: Option<(PathBuf, Pid)>,
        warden: Option<super::warden::Watch>,
    ) -> Self {
        live().insert(procs.mark.clone(), Some(procs.pgid));
        Self {
            procs: Some(procs),
            group: true,
            record,
            warden,
        }
    }

    /// The group, and the processes that left it, have ended: the group's record is removed
    /// (on the blocking pool: small file work, but not on a runtime thread).
    async fn disarm(&mut self) {
        if let Some(procs) = self.procs.take() {
            live().remove(&procs.mark);
        }
        if let Some((file, pgid)) = self.record.take() {
            let forget = move || {
                #[cfg(test)]
                tests::blocking_work(format!("forget {}", file.display()));
                super::orphans::forget(&file, pgid);
            };
            if let Err(e) = tokio::task::spawn_blocking(forget).await {
                tracing::warn!(error = %e, "cannot remove the record of a task's process group");
            }
        }
        // Dropped, it tells the warden the attempt is over.
        self.warden = None;
    }

    /// The group has ended, and its leader is about to be reaped (its id may then be another
    /// process's: it is signalled no more), but processes that left it may not have (the last
    /// look for them did not finish): they are looked for again as the guard drops, on a thread
    /// of its own; until that look ends, [`kill_all_now`], the warden and the group record
    /// still reach them.
    fn group_ended(&mut self) {
        if let Some(procs) = &self.procs {
            live().insert(procs.mark.clone(), None);
        }
        self.group = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let record = self.record.take();
        // Held apart from the sweep: a sweep that cannot start leaves the attempt to the
        // warden, which must then not be told it is over.
        let warden = Arc::new(std::sync::Mutex::new(self.warden.take()));
        let forget = {
            let warden = warden.clone();
            move || {
                if let Some((file, pgid)) = &record {
                    #[cfg(test)]
                    tests::blocking_work(format!("forget {}", file.display()));
                    super::orphans::forget(file, *pgid);
                }
                // Once the processes are killed: the warden is told the attempt is over.
                drop(warden.lock().unwrap_or_else(|p| p.into_inner()).take());
            }
        };
        let Some(procs) = self.procs.take() else {
            forget();
            return;
        };
        if std::mem::take(&mut self.group) {
            signal_group(procs.pgid, Signal::SIGKILL);
            // Its leader, dropped unreaped, is reaped by tokio from now on.
            live().insert(procs.mark.clone(), None);
        }
        // An execution dropped before it ended its processes (on a runtime thread), or one
        // whose last look for them did not finish: those that left the group are looked for
        // on a thread of its own, which a look stuck on a process in the kernel holds instead
        // of the runtime's.
        let sweep = move || {
            super::procs::kill_marked(&procs.mark);
            live().remove(&procs.mark);
            forget();
        };
        if let Err(e) = spawn_sweep(sweep) {
            // What is left stays guarded: listed for `kill_all_now`, in the group record for
            // the next start, and under the warden, which ends it when the worker exits.
            let kept = warden.lock().unwrap_or_else(|p| p.into_inner()).take();
            let wardened = kept.is_some();
            if let Some(watch) = kept {
                watch.keep();
            }
            tracing::warn!(error = %e, wardened, "cannot start a thread to end an attempt's processes; they stay listed for a second signal's kill, the warden ends them when the worker exits, and the next start from the group record");
        }
    }
}

/// A sweep of a dropped [`GroupGuard`].
type Sweep = Box<dyn FnOnce() + Send>;

/// The sweeps waiting for the sweeper thread, and whether it runs.
static SWEEPS: std::sync::Mutex<(VecDeque<Sweep>, bool)> =
    std::sync::Mutex::new((VecDeque::new(), false));

fn sweeps() -> std::sync::MutexGuard<'static, (VecDeque<Sweep>, bool)> {
    SWEEPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queues the sweep of a dropped [`GroupGuard`] for the sweeper, a thread of its own started
/// when none runs: one, not one per sweep, since a sweep looks through `/proc` and may be stuck
/// there on a process in the kernel, as every sweep after it would be. An error when the
/// thread cannot start: the sweep is not queued.
fn spawn_sweep(sweep: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    #[cfg(test)]
    if tests::SWEEP_CANNOT_START.get() {
        return Err(std::io::Error::other("no thread (test)"));
    }
    let mut queue = sweeps();
    if !queue.1 {
        std::thread::Builder::new()
            .name("tether-group-sweep".into())
            .spawn(run_sweeps)?;
        queue.1 = true;
    }
    queue.0.push_back(Box::new(sweep));
    Ok(())
}

/// The sweeper: runs the sweeps queued, one at a time, and ends when none is left.
fn run_sweeps() {
    loop {
        let next = {
            let mut queue = sweeps();
            match queue.0.pop_front() {
                Some(sweep) => sweep,
                None => {
                    queue.1 = false;
                    return;
                }
            }
        };
        next();
    }
}

/// The last `cap` bytes of a stream.
#[derive(Debug)]
struct Tail {
    cap: usize,
    buf: VecDeque<u8>,
    truncated: bool,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            buf: VecDeque::with_capacity(cap.min(READ_CHUNK)),
            truncated: false,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        // INVARIANT: buf.len() <= cap after every push.
        let keep = &chunk[chunk.len().saturating_sub(self.cap)..];
        self.truncated |= keep.len() < chunk.len();
        self.buf.extend(keep);
        let excess = self.buf.len().saturating_sub(self.cap);
        self.truncated |= excess > 0;
        self.buf.drain(..excess);
    }

    /// The tail as text; a character cut in half at the front is dropped, other invalid UTF-8
    /// becomes U+FFFD.
    fn text(&self) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let start = if self.truncated {
            bytes
                .iter()
                .take(3)
                .take_while(|b| (**b & 0xC0) == 0x80)
                .count()
        } else {
            0
        };
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }
}

/// Reads a pipe to its end into `tail`.
async fn pump(pipe: Option<impl AsyncRead + Unpin>, tail: &mut Tail) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut buf = vec![0; READ_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => tail.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "output pipe read failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::TaskControl;
    use crate::testutil::{KillOnDrop, PATIENCE, is_dead, wait_for};
    use tether_proto::{Attempt, TaskId};

    /// Blocking work done (looks through `/proc`, a group record written or removed), with
    /// the thread that did it.
    static BLOCKING_WORK: std::sync::Mutex<Vec<(String, std::thread::ThreadId)>> =
        std::sync::Mutex::new(Vec::new());

    pub(super) fn blocking_work(what: String) {
        let mut work = BLOCKING_WORK.lock().unwrap_or_else(|p| p.into_inner());
        work.push((what, std::thread::current().id()));
    }

    /// The blocking work done that `what` describes, and whether each was on this thread.
    fn blocking_work_of(what: &str) -> Vec<(String, bool)> {
        let me = std::thread::current().id();
        let work = BLOCKING_WORK.lock().unwrap_or_else(|p| p.into_inner());
        work.iter()
            .filter(|(w, _)| w == what)
            .map(|(w, on)| (w.clone(), *on == me))
            .collect()
    }

    /// A process not started because the program (or its `cwd`) is missing or may not be run
    /// is the task's failure; one not started for what the machine lacks at the moment is the
    /// worker's, and the task runs again.
    #[test]
    fn a_start_fails_for_the_task_only_when_its_program_cannot_run() {
        use nix::errno::Errno;
        for errno in [Errno::ENOENT, Errno::EACCES, Errno::ENOEXEC, Errno::ENOTDIR] {
            let e = std::io::Error::from(errno);
            assert!(spawn_fault_is_the_tasks(&e), "{errno}");
        }
        for errno in [
            Errno::EAGAIN,
            Errno::ENOMEM,
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::ENOSPC,
            Errno::EIO,
        ] {
            let e = std::io::Error::from(errno);
            assert!(!spawn_fault_is_the_tasks(&e), "{errno}");
        }
    }

    /// A task's end, and each look of a kill grace, read the stat of every process on the
    /// machine (the group's leader is a zombie not reaped yet then, so asking the kernel about
    /// the group never spares it), and its group record is a file written and removed: all of
    /// it on the blocking pool, not on the runtime's threads, which it held for tens of ms per
    /// look on a machine of thousands of processes. Here the runtime is the test's own thread
    /// (`current_thread`): nothing of that is done on it.
    #[tokio::test]
    async fn the_scans_and_group_record_of_a_kill_grace_run_off_the_runtime_threads() {
        let state = tempfile::tempdir().expect("tempdir");
        let dir = tempfile::tempdir().expect("tempdir");
        let record = group_record(state.path());
        let (ctx, control) = ctx(1);
        let ctx = ctx.with_group_record(record.clone());
        let executor = CommandExecutor::default().with_kill_grace(Duration::from_millis(300));
        let script = r#"trap '' TERM; echo $$ > "$D/pid.tmp"; mv "$D/pid.tmp" "$D/pid"; sleep 30"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(executor.execute(input(config), ctx));
        let leader = read_pid(&dir.path().join("pid")).await;
        let _leader_guard = KillOnDrop(leader);
        control.cancel();
        stopped(run.await.expect("joined"));
        assert!(!record.exists(), "the record is removed");
        let looks = blocking_work_of(&format!("group {leader}"));
        assert!(!looks.is_empty(), "the group was looked for");
        let record = record.display().to_string();
        let kept = blocking_work_of(&format!("record {record}"));
        let forgot = blocking_work_of(&format!("forget {record}"));
        assert!(
            !kept.is_empty() && !forgot.is_empty(),
            "recorded, forgotten"
        );
        let on_runtime: Vec<_> = [looks, kept, forgot]
            .concat()
            .into_iter()
            .filter(|(_, on)| *on)
            .collect();
        assert!(
            on_runtime.is_empty(),
            "on the runtime's thread: {on_runtime:?}"
        );
    }

    thread_local! {
        /// A [`GroupGuard`] dropped on this thread cannot start its sweep's thread.
        pub(super) static SWEEP_CANNOT_START: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    /// A dropped guard that cannot start the thread that ends what is left of its attempt's
    /// processes leaves them guarded: still listed for `kill_all_now`, and still under the
    /// warden, which ends them when the worker exits (as the log says). Before, the warden's
    /// watch went with the sweep that could not start, telling it the attempt was over.
    #[tokio::test]
    async fn a_guard_whose_sweep_cannot_start_leaves_what_is_left_to_the_warden() {
        let mark: Arc<str> = format!("{}:t-unswept:1", uuid::Uuid::new_v4().simple()).into();
        let grace = Duration::from_secs(1);
        let procs = TaskProcs {
            pgid: Pid::from_raw(i32::MAX),
            mark: mark.clone(),
            scans: CommandExecutor::default().scans,
        };
        let watch = super::super::warden::Watch::start(&mark, grace);
        let mut guard = GroupGuard::arm(procs, None, Some(watch));
        // Its group ended (no such group here): only the processes that left it are left.
        guard.group = false;
        SWEEP_CANNOT_START.set(true);
        drop(guard);
        SWEEP_CANNOT_START.set(false);
        let listed = live().contains_key(&mark);
        let wardened = super::super::warden::watched(&mark);
        // Let go of both, for the other tests of the process.
        live().remove(&mark);
        drop(super::super::warden::Watch::start(&mark, grace));
        assert!(listed, "no longer listed for kill_all_now");
        assert!(wardened, "the warden was told the attempt is over");
    }

    fn input(config: serde_json::Value) -> TaskInput {
        TaskInput {
            task_id: TaskId::parse("t-cmd").expect("id"),
            attempt: Attempt(1),
            config,
            timeout: None,
        }
    }

    fn ctx(attempt: u32) -> (TaskCtx, TaskControl) {
        TaskCtx::detached(TaskId::parse("t-cmd").expect("id"), Attempt(attempt))
    }

    async fn exec(config: serde_json::Value, ctx: TaskCtx) -> Result<serde_json::Value, ExecError> {
        CommandExecutor::default().execute(input(config), ctx).await
    }

    /// Waits for a pid the script wrote (atomically, via rename) to `path`.
    async fn read_pid(path: &Path) -> u32 {
        let mut pid = None;
        wait_for("the pid file", || {
            pid = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            pid.is_some()
        })
        .await;
        pid.expect("pid")
    }

    /// The state letter of a process from /proc, `None` once it is gone.
    fn proc_state(pid: u32) -> Option<char> {
        super::super::procs::Stat::read(pid).map(|s| s.state)
    }

    fn stopped(r: Result<serde_json::Value, ExecError>) -> serde_json::Value {
        match r {
            Err(ExecError::Stopped { result }) => result,
            other => panic!("expected Stopped, got {other:?}"),
        }
    }

    fn failed(r: Result<serde_json::Value, ExecError>) -> (String, serde_json::Value) {
        match r {
            Err(ExecError::Failed { message, result }) => (message, result),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn a_task_never_inherits_the_workers_secret_but_may_set_the_variable_itself() {
        let (ctx, _) = ctx(1);
        let envs = |config| {
            let plan = Plan::parse(config).expect("plan");
            let cmd = plan.command(&ctx, None, None, "n:t-cmd:1");
            cmd.as_std()
                .get_envs()
                .find(|(k, _)| *k == ENV_SECRET)
                .map(|(_, v)| v.map(|v| v.to_owned()))
        };
        // Removed (`None`), not left to the inherited environment.
        assert_eq!(envs(serde_json::json!({"program": "env"})), Some(None));
        let own = serde_json::json!({"program": "env", "env": {ENV_SECRET: "the task's"}});
        assert_eq!(envs(own), Some(Some("the task's".into())));
    }

    /// Set in the process [`sees_none_of_the_workers_settings`] runs in.
    const SETTINGS_CHILD: &str = "TETHER_TEST_SETTINGS_CHILD";

    /// A worker started with its settings in the environment (`TETHER_WORKER_ID`,
    /// `TETHER_COORDINATOR`, `TETHER_STATE_DIR`...) does not hand them to its tasks: a
    /// `tether worker` started by a task registered as the worker itself and replaced its
    /// session. The environment is a property of the whole process: the test runs in a
    /// process of its own, whose environment holds every one of them.
    #[test]
    fn a_task_never_inherits_the_workers_settings() {
        use std::ffi::OsStr;
        let mut env: Vec<(&str, &OsStr)> = WORKER_ENV
            .iter()
            .map(|k| (*k, OsStr::new("the worker's")))
            .collect();
        env.push((SETTINGS_CHILD, OsStr::new("1")));
        crate::testutil::pass_alone(
            "executor::command::tests::sees_none_of_the_workers_settings",
            &env,
        );
    }

    #[tokio::test]
    #[ignore = "run by a_task_never_inherits_the_workers_settings"]
    async fn sees_none_of_the_workers_settings() {
        if std::env::var_os(SETTINGS_CHILD).is_none() {
            return;
        }
        assert_eq!(
            std::env::var("TETHER_WORKER_ID").as_deref(),
            Ok("the worker's")
        );
        let (ctx, _) = ctx(1);
        let out = exec(serde_json::json!({"program": "env"}), ctx)
            .await
            .expect("env ran");
        let seen: Vec<&str> = out["stdout_tail"]
            .as_str()
            .expect("output")
            .lines()
            .filter(|l| WORKER_ENV.iter().any(|k| l.starts_with(&format!("{k}="))))
            .collect();
        assert!(seen.is_empty(), "the task saw {seen:?}");
        // What the worker sets for the task it still sees.
        let (ctx, _) = self::ctx(1);
        let out = exec(serde_json::json!({"shell": "echo $TETHER_TASK_ID"}), ctx)
            .await
            .expect("echo ran");
        assert_eq!(out["stdout_tail"], "t-cmd\n");
    }

    /// Every variable the `tether` CLI reads a setting from (`env = "TETHER_..."` of a flag,
    /// or a constant naming one) is in [`WORKER_ENV`]: a setting added to the CLI cannot be
    /// forgotten there and leak into tasks.
    #[test]
    fn every_setting_the_cli_reads_from_the_environment_is_kept_from_tasks() {
        let cli = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/src");
        let mut pending = vec![cli.clone()];
        let mut names = std::collections::BTreeSet::new();
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir)
                .expect("list the CLI's sources")
                .flatten()
            {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("read");
                for line in text.lines() {
                    let setting = line.split_once("env = \"").map(|(_, rest)| rest);
                    let constant = line
                        .trim_start()
                        .starts_with("pub const")
                        .then(|| line.split_once("_ENV: &str = \"").map(|(_, rest)| rest))
                        .flatten();
                    if let Some(rest) = setting.or(constant)
                        && let Some(name) = rest.split('"').next()
                        && name.starts_with("TETHER_")
                    {
                        names.insert(name.to_owned());
                    }
                }
            }
        }
        assert!(
            names.contains("TETHER_WORKER_ID"),
            "found {names:?} in {}",
            cli.display()
        );
        let missing: Vec<_> = names
            .iter()
            .filter(|n| !WORKER_ENV.contains(&n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "the CLI reads {missing:?}, which tasks would inherit"
        );
    }

    /// Set in the process [`made_with_a_non_utf8_environment`] runs in.
    const NON_UTF8_CHILD: &str = "TETHER_TEST_NON_UTF8_ENV";

    /// A worker whose environment holds a variable that is not UTF-8 (a Latin-1 path) makes
    /// its command tasks all the same, passing an outer mark on byte for byte: reading the
    /// environment as strings panicked every command task. The environment is a property of
    /// the whole process: the test runs in a process of its own.
    #[test]
    fn a_command_is_made_in_a_worker_whose_environment_is_not_all_utf8() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        crate::testutil::pass_alone(
            "executor::command::tests::made_with_a_non_utf8_environment",
            &[
                (NON_UTF8_CHILD, OsStr::new("1")),
                ("TETHER_TEST_LATIN1", OsStr::from_bytes(b"caf\xe9")),
                ("TETHER_TASK_MARK", OsStr::from_bytes(b"outer:\xe9:1")),
            ],
        );
    }

    #[test]
    #[ignore = "run by a_command_is_made_in_a_worker_whose_environment_is_not_all_utf8"]
    fn made_with_a_non_utf8_environment() {
        use std::os::unix::ffi::OsStrExt;
        if std::env::var_os(NON_UTF8_CHILD).is_none() {
            return;
        }
        let (ctx, _) = ctx(1);
        let plan = Plan::parse(serde_json::json!({"program": "true"})).expect("plan");
        let cmd = plan.command(&ctx, None, None, "n:t-cmd:1");
        let passed = cmd
            .as_std()
            .get_envs()
            .find(|(k, _)| *k == "TETHER_TASK_MARK_1")
            .and_then(|(_, v)| v)
            .map(|v| v.as_bytes().to_vec());
        assert_eq!(passed.as_deref(), Some(&b"outer:\xe9:1"[..]));
    }

    /// A task's result file: the JSON it wrote is the result's `output`, read and removed once
    /// its process ended; none written, no `output`; a file an earlier attempt left is not
    /// taken for this one's. A zero exit whose file is not JSON, or too large for a result
    /// message, fails saying so; a non-zero exit keeps its own failure, `output_error` beside
    /// it. The task cannot set the variable itself.
    #[tokio::test]
    async fn the_json_a_task_writes_to_its_result_file_is_its_results_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cp.result.json");
        let run = async |script: &str, max_frame: Option<usize>| {
            let (ctx, _) = ctx(1);
            if let Some(n) = max_frame {
                ctx.max_frame.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            let ctx = ctx.with_checkpoint_dir(dir.path().join("cp"));
            exec(serde_json::json!({ "shell": script }), ctx).await
        };
        let figures = r#"printf '{"p50_ms": 1.5, "runs": [1, 2]}' > "$TETHER_RESULT_FILE""#;
        let out = run(figures, None).await.expect("exit 0");
        assert_eq!(
            out["output"],
            serde_json::json!({"p50_ms": 1.5, "runs": [1, 2]})
        );
        assert_eq!(out["exit_code"], 0);
        assert!(!file.exists(), "read and removed");

        std::fs::write(&file, br#"{"stale": true}"#).expect("write");
        let out = run("true", None).await.expect("exit 0");
        assert!(out.get("output").is_none(), "{out}");

        let (message, result) =
            failed(run(r#"echo 'p50 1.5' > "$TETHER_RESULT_FILE""#, None).await);
        assert!(
            message.starts_with("its result file ($TETHER_RESULT_FILE) is not JSON"),
            "{message}"
        );
        assert!(result.get("output").is_none(), "{result}");
        assert_eq!(result["exit_code"], 0);

        // A link where the file goes: not followed, no output, and the link removed (its
        // target left alone).
        let target = dir.path().join("target.json");
        std::fs::write(&target, br#"{"secret": 1}"#).expect("write");
        let link = format!(r#"ln -s {} "$TETHER_RESULT_FILE""#, target.display());
        let (message, result) = failed(run(&link, None).await);
        assert!(message.contains("cannot be read"), "{message}");
        assert!(result.get("output").is_none(), "{result}");
        assert!(target.exists(), "the link's target left alone");
        assert!(
            std::fs::symlink_metadata(&file).is_err(),
            "the link removed"
        );
        // A directory where the file goes: no output, and the next attempt starts clear of it
        // (a task's doing, no fault of the worker's).
        let (message, _) = failed(run(r#"mkdir -p "$TETHER_RESULT_FILE/x""#, None).await);
        assert!(message.contains("cannot be read"), "{message}");
        let out = run("true", None).await.expect("exit 0");
        assert!(out.get("output").is_none(), "{out}");
        assert!(!file.exists());

        let (message, result) =
            failed(run(r#"echo nope > "$TETHER_RESULT_FILE"; exit 4"#, None).await);
        assert_eq!(message, "exit status 4");
        assert!(
            result["output_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("is not JSON")),
            "{result}"
        );

        let big = r#"printf '{"x": "%s"}' "$(head -c 8000 /dev/zero | tr '\0' a)" > "$TETHER_RESULT_FILE""#;
        let (message, result) = failed(run(big, Some(4096)).await);
        assert!(
            message.contains("larger than a result message carries"),
            "{message}"
        );
        assert!(result.get("output").is_none(), "{result}");
        // A JSON document that fits the file's read but not the message beside the rest.
        let near = r#"printf '{"x": "%s"}' "$(head -c 4000 /dev/zero | tr '\0' a)" > "$TETHER_RESULT_FILE""#;
        let (message, result) = failed(run(near, Some(4096)).await);
        assert!(
            message.contains("larger than a result message carries"),
            "{message}"
        );
        assert!(tether_proto::codec::json_len(&result) < 4096, "{result}");

        let sets = serde_json::json!({"program": "true", "env": {"TETHER_RESULT_FILE": "/x"}});
        let Err(e) = Plan::parse(sets) else {
            panic!("a task setting TETHER_RESULT_FILE is refused");
        };
        assert!(format!("{e:?}").contains("the worker sets it"), "{e:?}");
    }

    #[tokio::test]
    async fn a_zero_exit_returns_the_stdout_tail_and_no_signal() {
        let (ctx, _) = ctx(1);
        let out = exec(
            serde_json::json!({"program": "echo", "args": ["hello"]}),
            ctx,
        )
        .await
        .expect("exit 0");
        assert_eq!(out["exit_code"], 0);
        assert_eq!(out["stdout_tail"], "hello\n");
        assert_eq!(out["stderr_tail"], "");
        assert!(out["signal"].is_null());
        assert!(out["duration_ms"].is_u64());
    }

    #[tokio::test]
    async fn a_non_zero_exit_fails_with_its_exit_code_and_output() {
        let (ctx, _) = ctx(1);
        let r = exec(serde_json::json!({"shell": "echo oops >&2; exit 3"}), ctx).await;
        let (message, result) = failed(r);
        assert_eq!(message, "exit status 3");
        assert_eq!(result["exit_code"], 3);
        assert_eq!(result["stderr_tail"], "oops\n");
        assert!(result["signal"].is_null());

        let (ctx, _) = self::ctx(1);
        let (message, _) = failed(exec(serde_json::json!({"program": "false"}), ctx).await);
        assert_eq!(message, "exit status 1");
    }

    #[tokio::test]
    async fn a_process_killed_by_a_signal_fails_with_the_signal_number() {
        let (ctx, _) = ctx(1);
        let (message, result) = failed(exec(serde_json::json!({"shell": "kill -9 $$"}), ctx).await);
        assert_eq!(message, "killed by signal 9 (SIGKILL)");
        assert_eq!(result["signal"], 9);
        assert!(result["exit_code"].is_null());
    }

    #[tokio::test]
    async fn output_longer_than_tail_bytes_keeps_only_the_tail_of_each_stream() {
        let (ctx, _) = ctx(1);
        // Megabytes on both pipes at once: both must be read concurrently or the child blocks.
        let script = "seq 1 200000; seq 1 200000 >&2; echo last >&2";
        let out = exec(serde_json::json!({"shell": script, "tail_bytes": 16}), ctx)
            .await
            .expect("exit 0");
        assert_eq!(out["stdout_tail"], "8\n199999\n200000\n");
        assert_eq!(out["stderr_tail"], "999\n200000\nlast\n");
    }

    /// A reader of the result can tell a tail that is the whole output from one that is only
    /// its end.
    #[tokio::test]
    async fn a_tail_cut_to_tail_bytes_is_marked_truncated_and_a_whole_one_is_not() {
        let (ctx, _) = ctx(1);
        let config =
            serde_json::json!({"shell": "printf 0123456789; printf ab >&2", "tail_bytes": 4});
        let out = exec(config, ctx).await.expect("exit 0");
        assert_eq!(out["stdout_tail"], "6789");
        assert_eq!(out["stdout_truncated"], true);
        assert_eq!(out["stderr_tail"], "ab");
        assert_eq!(out["stderr_truncated"], false);

        let (ctx, _) = self::ctx(1);
        let config = serde_json::json!({"shell": "printf abcd", "tail_bytes": 4});
        let out = exec(config, ctx).await.expect("exit 0");
        assert_eq!(out["stdout_tail"], "abcd");
        assert_eq!(
            out["stdout_truncated"], false,
            "exactly tail_bytes is whole"
        );
    }

    #[tokio::test]
    async fn the_program_sees_task_id_attempt_env_and_cwd() {
        let cwd = tempfile::tempdir().expect("tempdir");
        let (ctx, _) = ctx(3);
        let script =
            r#"echo "$TETHER_TASK_ID $TETHER_ATTEMPT [$TETHER_CHECKPOINT_DIR] $GREETING"; pwd"#;
        let config = serde_json::json!({
            "shell": script,
            "env": {"GREETING": "hi"},
            "cwd": cwd.path(),
        });
        let out = exec(config, ctx).await.expect("exit 0");
        let cwd = cwd.path().canonicalize().expect("canonical");
        assert_eq!(
            out["stdout_tail"],
            format!("t-cmd 3 [] hi\n{}\n", cwd.display())
        );
    }

    #[tokio::test]
    async fn bad_configs_are_refused_with_a_clear_reason() {
        let cases = [
            (serde_json::json!(null), "missing `program`"),
            (serde_json::json!({"args": ["x"]}), "missing `program`"),
            (
                serde_json::json!({"program": "a", "shell": "b"}),
                "not both",
            ),
            (
                serde_json::json!({"shell": "b", "args": ["x"]}),
                "`args` go with `program`",
            ),
            (serde_json::json!({"program": ""}), "`program` is empty"),
            (serde_json::json!({"shell": ""}), "`shell` is empty"),
            (serde_json::json!({"shell": " \n\t"}), "`shell` is empty"),
            (
                serde_json::json!({"program": "a", "colour": 1}),
                "unknown field `colour`",
            ),
            (
                serde_json::json!({"program": "a", "tail_bytes": 1 << 30}),
                "`tail_bytes`",
            ),
            (
                serde_json::json!({"program": "a", "checkpoint_poll_ms": 0}),
                "`checkpoint_poll_ms`",
            ),
            (
                serde_json::json!({"program": "a", "env": {"A=B": "c"}}),
                "not a valid variable",
            ),
            (
                serde_json::json!({"program": "a", "env": {"TETHER_ATTEMPT": "9"}}),
                "worker sets it",
            ),
            (
                serde_json::json!({"program": "a", "cwd": "rel/dir"}),
                "must be an absolute path on the worker",
            ),
        ];
        for (config, expected) in cases {
            let (ctx, _) = ctx(1);
            match exec(config.clone(), ctx).await {
                Err(ExecError::InvalidConfig(m)) => {
                    assert!(m.contains(expected), "{config}: {m:?} lacks {expected:?}")
                }
                other => panic!("{config}: expected InvalidConfig, got {other:?}"),
            }
            // The check a coordinator makes at submission says the same, from the text.
            let checked = CommandExecutor::default().check_config(&config.to_string());
            assert!(
                checked.as_ref().is_err_and(|m| m.contains(expected)),
                "{config}: {checked:?}"
            );
        }
        let check = |text: &str| CommandExecutor::default().check_config(text);
        assert_eq!(check(r#"{"program": "true", "args": ["-x"]}"#), Ok(()));
        assert_eq!(check(r#"{"shell": "exit 0"}"#), Ok(()));
        assert!(check("null").is_err_and(|m| m.contains("missing `program`")));
    }

    #[tokio::test]
    async fn a_missing_program_fails_to_start_with_a_clear_message() {
        let (ctx, _) = ctx(1);
        let r = exec(
            serde_json::json!({"program": "/nonexistent/tether-nope"}),
            ctx,
        )
        .await;
        let (message, result) = failed(r);
        assert!(
            message.starts_with("cannot start /nonexistent/tether-nope: "),
            "{message}"
        );
        assert!(result["exit_code"].is_null());
    }

    #[tokio::test]
    async fn cancellation_kills_the_whole_process_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let script = r#"sleep 30 & echo $! > "$D/pid.tmp" && mv "$D/pid.tmp" "$D/child.pid"; sleep 30; wait"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(exec(config, ctx));
        let grandchild = read_pid(&dir.path().join("child.pid")).await;
        assert!(!is_dead(grandchild), "the background sleep runs");

        control.cancel();
        stopped(run.await.expect("joined"));
        wait_for("the grandchild to die", || is_dead(grandchild)).await;
    }

    /// A hung task stopped by a cancel or its timeout leaves what it wrote until then, and
    /// how it was ended, to debug it by.
    #[tokio::test]
    async fn a_cancelled_process_stops_with_its_output_and_the_signal_that_ended_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let script = r#"echo started; echo warming >&2; touch "$D/ready"; sleep 30"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(exec(config, ctx));
        wait_for("the script to start", || dir.path().join("ready").exists()).await;

        control.cancel();
        let result = stopped(run.await.expect("joined"));
        assert_eq!(result["stdout_tail"], "started\n");
        assert_eq!(result["stderr_tail"], "warming\n");
        assert_eq!(result["signal"], 15);
        assert!(result["exit_code"].is_null());
        assert!(result["duration_ms"].is_u64());
    }

    #[tokio::test]
    async fn a_tree_that_ignores_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        // An ignored signal stays ignored across exec, so the `sleep` ignores SIGTERM too.
        let script = r#"trap '' TERM; sleep 30 & echo $! > "$D/pid.tmp" && mv "$D/pid.tmp" "$D/child.pid"; wait"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let executor = CommandExecutor::default().with_kill_grace(Duration::from_millis(100));
        let run = tokio::spawn(executor.execute(input(config), ctx));
        let grandchild = read_pid(&dir.path().join("child.pid")).await;

        control.cancel();
        stopped(run.await.expect("joined"));
        wait_for("the grandchild to die", || is_dead(grandchild)).await;
    }

    /// A script that starts a process in a session of its own (out of the task's group) and
    /// waits until it is there, then runs `rest`. The process writes its pid to `$D/child.pid`.
    fn escaping(rest: &str) -> String {
        sleeper("child", true, false, rest)
    }

    /// An execution dropped before it ended its processes (its future aborted) kills them: its
    /// group at once, and one that left the group on a thread of its own (a look through
    /// `/proc` stuck on a process in the kernel holds that thread, not the runtime's).
    #[tokio::test]
    async fn an_execution_dropped_midway_kills_its_processes_those_that_left_its_group_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, _control) = ctx(1);
        let script = escaping(
            r#"echo $$ > "$D/me.tmp"; mv "$D/me.tmp" "$D/me.pid"
            while :; do sleep 0.05; done"#,
        );
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(exec(config, ctx));
        let escaped = read_pid(&dir.path().join("child.pid")).await;
        let leader = read_pid(&dir.path().join("me.pid")).await;
        run.abort();
        assert!(run.await.is_err_and(|e| e.is_cancelled()));
        wait_for("the group's leader to die", || is_dead(leader)).await;
        wait_for("the process that left the group to die", || {
            is_dead(escaped)
        })
        .await;
    }

    /// A process that traps SIGTERM acts on it once when its task is cancelled: a member of
    /// the task's group, which carries the task's mark too, is not signalled again as one that
    /// left the group.
    #[tokio::test]
    async fn a_cancelled_task_s_process_gets_one_sigterm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        // Once terminated, it keeps running a while, for a second SIGTERM to be seen, then
        // exits by itself.
        let script = r#"trap 'echo term >> "$D/terms"' TERM
            touch "$D/ready"
            n=0
            while [ "$n" -lt 20 ]; do
                sleep 0.05
                [ -e "$D/terms" ] && n=$((n + 1))
            done"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let executor = CommandExecutor::default().with_kill_grace(PATIENCE);
        let run = tokio::spawn(executor.execute(input(config), ctx));
        wait_for("the script to start", || dir.path().join("ready").exists()).await;

        control.cancel();
        run.await.expect("joined").ok();
        let terms = std::fs::read_to_string(dir.path().join("terms")).expect("terms");
        assert_eq!(terms, "term\n", "SIGTERMs seen");
    }

    /// Whether `pid` runs in a session other than this process's (it left the task's group).
    fn in_own_session(pid: u32) -> bool {
        let session = |pid: &str| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<String> = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            fields.get(3).cloned()
        };
        let theirs = session(&pid.to_string());
        theirs.is_some() && theirs != session("self")
    }

    /// A process that left the task's group is out of reach of the group's signals; the mark
    /// in its environment finds it, whether the task exits or is cancelled.
    #[tokio::test]
    async fn a_process_that_left_the_group_ends_with_the_task() {
        for cancel in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (ctx, control) = ctx(1);
            let script = escaping(if cancel { "sleep 30" } else { "echo done" });
            let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
            let run = tokio::spawn(exec(config, ctx));
            let escaped = read_pid(&dir.path().join("child.pid")).await;
            let _escaped_guard = KillOnDrop(escaped);
            assert!(in_own_session(escaped), "the process left the group");
            if cancel {
                control.cancel();
                stopped(run.await.expect("joined"));
            } else {
                let out = run.await.expect("joined").expect("exit 0");
                assert_eq!(out["stdout_tail"], "done\n");
            }
            wait_for("the escaped process to die", || is_dead(escaped)).await;
        }
    }

    /// A script whose process starts a process that ignores SIGTERM, writes its pid to
    /// `$D/<name>.pid` and sleeps; `setsid`, in a session of its own (out of the task's group),
    /// else in the task's group. The script waits until it is there, then runs `rest`.
    fn deaf_to_term(name: &str, setsid: bool, rest: &str) -> String {
        sleeper(name, setsid, true, rest)
    }

    /// A script whose process starts a sleeping process that writes its pid to
    /// `$D/<name>.pid` (in a session of its own with `setsid`, ignoring SIGTERM with `deaf`),
    /// waits until it is there, then runs `rest`.
    fn sleeper(name: &str, setsid: bool, deaf: bool, rest: &str) -> String {
        let setsid = if setsid { "setsid " } else { "" };
        let trap = if deaf { r#"trap "" TERM; "# } else { "" };
        format!(
            r#"{setsid}sh -c '{trap}echo $$ > "$D/{name}.tmp"; mv "$D/{name}.tmp" "$D/{name}.pid"; exec sleep 300' >/dev/null 2>&1 &
            while [ ! -e "$D/{name}.pid" ]; do sleep 0.01; done
            {rest}"#
        )
    }

    /// The last look for the processes that left a task's group (the one that kills them) may
    /// not finish: a process stuck in the kernel holds its `environ`. The attempt ends all the
    /// same, but what it could not kill stays guarded: listed for `kill_all_now` (and kept by
    /// the warden and the group record) until a look on a thread of its own killed it. Before,
    /// the guard was disarmed as if every process had ended.
    #[tokio::test]
    async fn a_last_look_for_escaped_processes_that_did_not_finish_keeps_them_guarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, _control) = ctx(1);
        let (release, stall) = std::sync::mpsc::channel::<()>();
        let mut executor = CommandExecutor::default().with_kill_grace(Duration::from_millis(200));
        executor.scans = Scans {
            limit: Duration::from_secs(1),
            permits: scan_permits(),
            stall: Some(Arc::new(std::sync::Mutex::new(stall))),
            stalled: Arc::default(),
        };
        let mark: Arc<str> = format!("{}:t-cmd:1", executor.nonce).into();
        let script = deaf_to_term("child", true, "echo done");
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(executor.execute(input(config), ctx));
        let escaped = read_pid(&dir.path().join("child.pid")).await;
        let _escaped_guard = KillOnDrop(escaped);
        let out = run.await.expect("joined").expect("exit 0");
        assert_eq!(out["stdout_tail"], "done\n");
        assert!(
            !is_dead(escaped),
            "it ignores SIGTERM, and SIGKILL never came"
        );
        assert_eq!(
            live().get(&mark),
            Some(&None),
            "still guarded, its group not"
        );
        drop(release);
        wait_for("the escaped process to be killed", || is_dead(escaped)).await;
        wait_for("the guard to let go", || !live().contains_key(&mark)).await;
    }

    /// A leader that exits while its group lives on is reaped only once the group was ended:
    /// until then its zombie holds its pid, the group's id, which no other process can take
    /// while the group is signalled (a signal to an id reused as another group's would reach a
    /// stranger's processes). Before, it was reaped as it exited and its group signalled after.
    #[tokio::test]
    async fn a_leader_that_exits_is_reaped_only_once_its_group_was_ended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, _control) = ctx(1);
        let executor = CommandExecutor::default().with_kill_grace(Duration::from_secs(3));
        let script = deaf_to_term(
            "member",
            false,
            r#"echo $$ > "$D/leader.tmp"; mv "$D/leader.tmp" "$D/leader.pid""#,
        );
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(executor.execute(input(config), ctx));
        let member = read_pid(&dir.path().join("member.pid")).await;
        let _member_guard = KillOnDrop(member);
        let leader = read_pid(&dir.path().join("leader.pid")).await;
        wait_for("the leader to exit", || {
            proc_state(leader).is_none_or(|s| s == 'Z')
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!is_dead(member), "the member ignores SIGTERM for the grace");
        assert_eq!(
            proc_state(leader),
            Some('Z'),
            "the leader is not reaped yet"
        );
        run.await.expect("joined").expect("exit 0");
        assert!(is_dead(member), "killed after the grace");
        assert_eq!(proc_state(leader), None, "reaped");
    }

    /// Looks through `/proc` stuck on a process in the kernel hold at most [`SCANS_AT_ONCE`]
    /// threads of the blocking pool, however many tasks end meanwhile, and the next task still
    /// starts (its checkpoint directory is prepared on that pool). Before, each task's end left
    /// one more thread stuck, until the pool (here of `SCANS_AT_ONCE + 2` threads) was full and
    /// no task could start. The processes the stuck looks were to kill are killed by the
    /// sweeper meanwhile.
    #[test]
    fn stuck_looks_through_proc_hold_a_bounded_number_of_threads() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(SCANS_AT_ONCE + 2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (release, stall) = std::sync::mpsc::channel::<()>();
            let mut executor =
                CommandExecutor::default().with_kill_grace(Duration::from_millis(100));
            // Permits of its own: the other tests of the process look through `/proc` too.
            executor.scans = Scans {
                limit: Duration::from_millis(500),
                permits: Arc::new(tokio::sync::Semaphore::new(SCANS_AT_ONCE)),
                stall: Some(Arc::new(std::sync::Mutex::new(stall))),
                stalled: Arc::default(),
            };
            let ends = SCANS_AT_ONCE + 4;
            let dirs: Vec<_> = (0..ends)
                .map(|_| tempfile::tempdir().expect("tempdir"))
                .collect();
            let runs: Vec<_> = dirs
                .iter()
                .enumerate()
                .map(|(i, dir)| {
                    let task = TaskId::parse(&format!("t-stuck-{i}")).expect("id");
                    let (ctx, _) = TaskCtx::detached(task.clone(), Attempt(1));
                    let script = deaf_to_term("child", true, "echo done");
                    let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
                    let input = TaskInput {
                        task_id: task,
                        attempt: Attempt(1),
                        config,
                        timeout: None,
                    };
                    tokio::spawn(executor.execute(input, ctx))
                })
                .collect();
            let mut escaped = Vec::new();
            for dir in &dirs {
                escaped.push(KillOnDrop(read_pid(&dir.path().join("child.pid")).await));
            }
            for run in runs {
                let out = run.await.expect("joined").expect("exit 0");
                assert_eq!(out["stdout_tail"], "done\n");
            }
            let stalled = executor
                .scans
                .stalled
                .load(std::sync::atomic::Ordering::SeqCst);
            assert!(
                (1..=SCANS_AT_ONCE).contains(&stalled),
                "{stalled} looks stuck after {ends} ends"
            );

            let next = tempfile::tempdir().expect("tempdir");
            let (ctx, _) = self::ctx(1);
            let ctx = ctx.with_checkpoint_dir(next.path().join("cp"));
            let config = serde_json::json!({"shell": "echo next"});
            let out = tokio::time::timeout(PATIENCE, executor.execute(input(config), ctx))
                .await
                .expect("the next task started and ended")
                .expect("exit 0");
            assert_eq!(out["stdout_tail"], "next\n");
            for pid in &escaped {
                wait_for("the sweeper to kill an escaped process", || is_dead(pid.0)).await;
            }
            drop(release);
        });
    }

    /// A look through `/proc` stuck on a process (its `environ` held by the kernel) does not
    /// hold the task's end: it is given up after the limit.
    #[tokio::test]
    async fn a_stuck_look_through_proc_is_given_up() {
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let look = bounded_scan_within(scan_permits(), Duration::from_millis(50), move || {
            stuck.recv().is_ok()
        });
        assert_eq!(look.await, None);
        release.send(()).expect("the look still waits");
        assert_eq!(
            bounded_scan_within(scan_permits(), SCAN_LIMIT, || 7).await,
            Some(7)
        );
    }

    /// A pause stops the processes that left the task's group too, and a resume lets them go.
    #[tokio::test]
    async fn a_pause_stops_the_processes_that_left_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let script = escaping(r#"while [ ! -e "$D/go" ]; do sleep 0.02; done; echo done"#);
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(exec(config, ctx));
        let escaped = read_pid(&dir.path().join("child.pid")).await;
        let _escaped_guard = KillOnDrop(escaped);
        control.set_paused(true);
        wait_for("the escaped process to stop", || {
            proc_state(escaped) == Some('T')
        })
        .await;
        control.set_paused(false);
        wait_for("the escaped process to go on", || {
            proc_state(escaped) != Some('T')
        })
        .await;
        std::fs::write(dir.path().join("go"), "").expect("go");
        let out = run.await.expect("joined").expect("exit 0");
        assert_eq!(out["stdout_tail"], "done\n");
        wait_for("the escaped process to die", || is_dead(escaped)).await;
    }

    /// A worker killed outright leaves its tasks' processes running; the next one kills them
    /// from the record: the group, and the processes that left it, by their mark.
    #[tokio::test]
    async fn after_a_crash_the_next_worker_kills_the_processes_that_left_the_group() {
        let state = tempfile::tempdir().expect("tempdir");
        let dir = tempfile::tempdir().expect("tempdir");
        let record = group_record(state.path());
        let (ctx, _control) = ctx(1);
        let ctx = ctx.with_group_record(record.clone());
        let script =
            escaping(r#"echo $$ > "$D/leader.tmp"; mv "$D/leader.tmp" "$D/leader.pid"; sleep 300"#);
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let mut run = Box::pin(exec(config, ctx));
        let leader_file = dir.path().join("leader.pid");
        let leader = tokio::select! {
            r = &mut run => panic!("the task ended: {r:?}"),
            pid = read_pid(&leader_file) => pid,
        };
        let _leader_guard = KillOnDrop(leader);
        let escaped = read_pid(&dir.path().join("child.pid")).await;
        let _escaped_guard = KillOnDrop(escaped);
        assert!(record.exists(), "the group is recorded");
        // The worker dies: nothing of the execution runs again, no destructor either.
        std::mem::forget(run);
        assert!(!is_dead(leader) && !is_dead(escaped));

        assert_eq!(super::super::orphans::kill_orphans(state.path()), 1);
        wait_for("the leader to die", || is_dead(leader)).await;
        wait_for("the escaped process to die", || is_dead(escaped)).await;
        assert!(!record.exists(), "the record is removed");
    }

    #[tokio::test]
    async fn a_background_process_left_behind_ends_with_the_task() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, _) = ctx(1);
        // The leftover `sleep` holds stdout open; the result must not wait for it.
        let script =
            r#"sleep 30 & echo $! > "$D/pid.tmp" && mv "$D/pid.tmp" "$D/child.pid"; echo done"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let out = exec(config, ctx).await.expect("exit 0");
        assert_eq!(out["stdout_tail"], "done\n");
        let grandchild = read_pid(&dir.path().join("child.pid")).await;
        wait_for("the leftover process to die", || is_dead(grandchild)).await;
    }

    #[tokio::test]
    async fn pause_stops_the_process_and_resume_lets_it_finish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let outbox = ctx.outbox().clone();
        let script = r#"echo $$ > "$D/pid.tmp" && mv "$D/pid.tmp" "$D/pid"
            while [ ! -e "$D/go" ]; do sleep 0.02; done; echo done"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(exec(config, ctx));
        let pid = read_pid(&dir.path().join("pid")).await;

        control.set_paused(true);
        wait_for("the process to stop", || proc_state(pid) == Some('T')).await;
        wait_for("the task to park", || control.is_parked()).await;

        control.set_paused(false);
        wait_for("the process to continue", || proc_state(pid) != Some('T')).await;
        std::fs::write(dir.path().join("go"), "").expect("go");
        let out = run.await.expect("joined").expect("exit 0");
        assert_eq!(out["stdout_tail"], "done\n");
        let kinds = queued_kinds(&outbox);
        assert_eq!(kinds, ["task_paused", "task_resumed"]);
    }

    #[tokio::test]
    async fn cancelling_a_paused_process_kills_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let script = r#"echo $$ > "$D/pid.tmp" && mv "$D/pid.tmp" "$D/pid"; sleep 30"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(exec(config, ctx));
        let pid = read_pid(&dir.path().join("pid")).await;
        control.set_paused(true);
        wait_for("the task to park", || control.is_parked()).await;

        control.cancel();
        stopped(run.await.expect("joined"));
        wait_for("the process to die", || is_dead(pid)).await;
    }

    #[tokio::test]
    async fn files_written_to_the_checkpoint_dir_are_shipped_while_it_runs_and_at_exit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let ctx = ctx.with_checkpoint_dir(dir.path().join("cp"));
        let outbox = ctx.outbox().clone();
        let script = r#"mkdir -p "$TETHER_CHECKPOINT_DIR/sub"
            echo 1 > "$TETHER_CHECKPOINT_DIR/sub/state.txt"
            while [ ! -e "$D/stop" ]; do sleep 0.02; done
            echo 2 > "$TETHER_CHECKPOINT_DIR/sub/state.txt""#;
        let config = serde_json::json!({
            "shell": script,
            "env": {"D": dir.path()},
            "checkpoint_poll_ms": 20,
        });
        let run = tokio::spawn(exec(config, ctx));
        let state = |control: &TaskControl| latest_file(control, "sub/state.txt");
        wait_for("the running checkpoint", || {
            state(&control).as_deref() == Some(b"1\n")
        })
        .await;

        std::fs::write(dir.path().join("stop"), "").expect("stop");
        run.await.expect("joined").expect("exit 0");
        assert_eq!(
            state(&control).as_deref(),
            Some(&b"2\n"[..]),
            "shipped at exit"
        );
        let kinds = queued_kinds(&outbox);
        assert!(kinds.contains(&"checkpoint") && kinds.contains(&"checkpoint_data"));
    }

    /// A task that rewrites its state every half second (aside, then renamed into place, as
    /// advised) is checkpointed while it runs, at the default poll of a second: a poll that
    /// finds the directory changed looks again a settle later, when it has stayed the same.
    /// Before, it had to stay the same from one poll to the next, which a state rewritten more
    /// often than the poll never does: it was shipped only at the end (in a user's review, a
    /// task whose worker died lost its progress).
    #[tokio::test]
    async fn a_state_rewritten_more_often_than_the_poll_is_checkpointed_while_it_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let ctx = ctx.with_checkpoint_dir(dir.path().join("cp"));
        let script = r#"n=0
            while [ ! -e "$D/stop" ]; do
                n=$((n + 1))
                echo $n > "$TETHER_CHECKPOINT_DIR/n.new"
                mv "$TETHER_CHECKPOINT_DIR/n.new" "$TETHER_CHECKPOINT_DIR/n"
                sleep 0.5
            done"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let run = tokio::spawn(exec(config, ctx));
        let mut states = std::collections::BTreeSet::new();
        wait_for("three states checkpointed while the task runs", || {
            let data = control.latest_checkpoint();
            let files = data.map(|d| packing::decode(&d).expect("a valid pack"));
            if let Some(n) = files.and_then(|f| f.get("n").cloned()) {
                states.insert(n);
            }
            states.len() >= 3
        })
        .await;
        std::fs::write(dir.path().join("stop"), "").expect("stop");
        run.await.expect("joined").expect("exit 0");
    }

    /// A poll looks again at a changed directory a settle apart until the next poll is due,
    /// once when the poll is no longer than the settle.
    #[test]
    fn a_poll_looks_as_often_as_a_settle_fits_in_its_interval() {
        let ms = Duration::from_millis;
        assert_eq!(poll_looks(ms(1000), SETTLE), 5);
        assert_eq!(poll_looks(ms(20), SETTLE.min(ms(20))), 1);
        assert_eq!(poll_looks(ms(300), SETTLE), 1);
        assert_eq!(poll_looks(ms(3_600_000), SETTLE), REQUEST_LOOKS);
    }

    /// A checkpoint request ships the changed directory at once, not at the next poll (a
    /// minute here: only the requests can explain the checkpoints), each time it is asked
    /// for. Before, the executor never read a request: `tether checkpoint` did nothing.
    #[tokio::test]
    async fn a_checkpoint_request_ships_the_changed_dir_before_the_next_poll() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let ctx = ctx.with_checkpoint_dir(dir.path().join("cp"));
        let script = r#"echo 1 > "$TETHER_CHECKPOINT_DIR/n"; touch "$D/ready"
            while [ ! -e "$D/two" ]; do sleep 0.02; done
            echo 2 > "$TETHER_CHECKPOINT_DIR/n.new"; mv "$TETHER_CHECKPOINT_DIR/n.new" "$TETHER_CHECKPOINT_DIR/n"
            touch "$D/written"
            while [ ! -e "$D/stop" ]; do sleep 0.02; done"#;
        let config = serde_json::json!({
            "shell": script,
            "env": {"D": dir.path()},
            "checkpoint_poll_ms": 60_000,
        });
        let run = tokio::spawn(exec(config, ctx));
        let n = |control: &TaskControl| latest_file(control, "n");
        wait_for("the first state written", || {
            dir.path().join("ready").exists()
        })
        .await;
        assert_eq!(n(&control), None, "nothing shipped before the request");
        control.request_checkpoint();
        wait_for("the requested checkpoint", || {
            n(&control).as_deref() == Some(b"1\n")
        })
        .await;

        std::fs::write(dir.path().join("two"), "").expect("two");
        wait_for("the second state written", || {
            dir.path().join("written").exists()
        })
        .await;
        control.request_checkpoint();
        wait_for("the second requested checkpoint", || {
            n(&control).as_deref() == Some(b"2\n")
        })
        .await;
        std::fs::write(dir.path().join("stop"), "").expect("stop");
        run.await.expect("joined").expect("exit 0");
    }

    /// The `checkpoint_error`s the executor queued for the session to send, each with the
    /// checkpoint it names and its reason.
    fn refusals(ctx: &TaskCtx) -> Vec<(Option<CheckpointId>, String)> {
        ctx.replies
            .take()
            .into_iter()
            .map(|m| match m {
                tether_proto::msg::WorkerMsg::CheckpointError(e) => {
                    assert_eq!(e.task_id.as_str(), "t-cmd");
                    (e.checkpoint_id, e.error)
                }
                other => panic!("not a checkpoint_error: {other:?}"),
            })
            .collect()
    }

    /// The contents of file `name` in the task's latest checkpoint, if it has one holding it.
    fn latest_file(control: &TaskControl, name: &str) -> Option<Vec<u8>> {
        let data = control.latest_checkpoint()?;
        let files = packing::decode(&data).expect("a valid pack");
        files.get(name).cloned()
    }

    /// A task (attempt 1) whose checkpoint dir is `dir/cp`: its context, its control, the dir.
    fn checkpointing(dir: &Path) -> (TaskCtx, TaskControl, PathBuf) {
        let (ctx, control) = ctx(1);
        let cp_dir = dir.join("cp");
        (ctx.with_checkpoint_dir(cp_dir.clone()), control, cp_dir)
    }

    /// The config of a task whose TERM trap writes a checkpoint (`n`, `7`) and exits; it says
    /// it is ready (`D/ready`) once the trap is set, and polls only after a minute.
    fn trapping(dir: &Path) -> serde_json::Value {
        let script = r#"trap 'echo 7 > "$TETHER_CHECKPOINT_DIR/n"; exit 0' TERM
            touch "$D/ready"
            while :; do sleep 0.05; done"#;
        serde_json::json!({
            "shell": script,
            "env": {"D": dir},
            "checkpoint_poll_ms": 60_000,
        })
    }

    /// Where a worker whose state directory is `state` records the test task's group.
    fn group_record(state: &Path) -> PathBuf {
        state.join(super::super::orphans::GROUPS_DIR).join("t-cmd")
    }

    /// The kinds of the messages queued in `outbox` since the last look.
    fn queued_kinds(outbox: &crate::outbox::Outbox) -> Vec<&'static str> {
        outbox
            .take_unsent(10_000)
            .iter()
            .map(|(_, m)| m.type_name())
            .collect()
    }

    /// Starts a `shell` task that runs `first`, says it is ready and waits for `dir/stop`,
    /// with a 60 s checkpoint poll (only a request makes it look); returns once it is ready.
    async fn started_waiting(
        dir: &Path,
        first: &str,
        ctx: TaskCtx,
    ) -> tokio::task::JoinHandle<Result<serde_json::Value, ExecError>> {
        let script =
            format!(r#"{first}touch "$D/ready"; while [ ! -e "$D/stop" ]; do sleep 0.02; done"#);
        let config = serde_json::json!({
            "shell": script,
            "env": {"D": dir},
            "checkpoint_poll_ms": 60_000,
        });
        let run = tokio::spawn(exec(config, ctx));
        wait_for("the task started", || dir.join("ready").exists()).await;
        run
    }

    /// Asks the task for a checkpoint and waits until it answers with a refusal: what it said.
    async fn answer_to_a_request(
        control: &TaskControl,
        probe: &TaskCtx,
    ) -> Vec<(Option<CheckpointId>, String)> {
        control.request_checkpoint();
        let mut said = Vec::new();
        wait_for("the answer to the request", || {
            said.extend(refusals(probe));
            !said.is_empty()
        })
        .await;
        said
    }

    /// Stops a task [`started_waiting`] started and checks that it exited 0.
    async fn stop_waiting(
        dir: &Path,
        run: tokio::task::JoinHandle<Result<serde_json::Value, ExecError>>,
    ) {
        std::fs::write(dir.join("stop"), "").expect("stop");
        run.await.expect("joined").expect("exit 0");
    }

    /// A checkpoint request that finds the directory as it was shipped is answered at once
    /// with a `checkpoint_error` naming that checkpoint (naming none in its `checkpoint_id`:
    /// the coordinator would drop the runner's re-upload of it), and ships nothing. Before,
    /// the look shipped nothing and said nothing: `tether checkpoint --wait` waited out its
    /// 30 s for a checkpoint that would not come. A request that ships one says nothing.
    #[tokio::test]
    async fn a_checkpoint_request_on_a_dir_unchanged_since_its_checkpoint_says_so_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control, cp_dir) = checkpointing(dir.path());
        let (outbox, probe) = (ctx.outbox().clone(), ctx.clone());
        let first = r#"echo 1 > "$TETHER_CHECKPOINT_DIR/n"; "#;
        let run = started_waiting(dir.path(), first, ctx).await;
        control.request_checkpoint();
        wait_for("the requested checkpoint", || {
            control.latest_checkpoint().is_some()
        })
        .await;
        let shipped = control.shared.latest().expect("shipped").id;
        assert!(queued_kinds(&outbox).contains(&"checkpoint"));
        let said = refusals(&probe);
        assert!(
            said.is_empty(),
            "a request that shipped says nothing: {said:?}"
        );

        let said = answer_to_a_request(&control, &probe).await;
        let why = format!(
            "the checkpoint dir is unchanged since checkpoint {shipped}: nothing new to ship ({})",
            cp_dir.display()
        );
        assert_eq!(said, [(None, why)]);
        let queued = queued_kinds(&outbox);
        assert!(queued.is_empty(), "nothing shipped: {queued:?}");
        assert_eq!(control.shared.latest().map(|c| c.id), Some(shipped));
        stop_waiting(dir.path(), run).await;
    }

    /// A request to a task that resumed from a checkpoint and has not changed its directory
    /// since names the checkpoint it resumed from.
    #[tokio::test]
    async fn a_checkpoint_request_on_a_dir_as_resumed_names_the_checkpoint_resumed_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::create_dir(&src).expect("src");
        std::fs::write(src.join("n"), "5\n").expect("n");
        let packed = packing::pack(&src).expect("pack");
        let (ctx, control) = ctx(2);
        let cp_dir = dir.path().join("cp");
        let ctx = ctx
            .with_checkpoint_dir(cp_dir.clone())
            .with_checkpoint(packed);
        let resumed = control.shared.latest().expect("resumed from").id;
        let probe = ctx.clone();
        let run = started_waiting(dir.path(), "", ctx).await;
        let said = answer_to_a_request(&control, &probe).await;
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0]
                .1
                .contains(&format!("unchanged since checkpoint {resumed}")),
            "{said:?}"
        );
        assert_eq!(control.shared.latest().map(|c| c.id), Some(resumed));
        stop_waiting(dir.path(), run).await;
    }

    /// A request whose wake-up comes with the process's exit (both ready at one look of the
    /// watch, which takes the exit first) is answered once the last look found nothing new,
    /// saying the task ended. Before, it was taken by no look and answered by nothing (the
    /// runner leaves it to the executor while it answers): `tether checkpoint --wait` waited
    /// out its time. The flag is set without its wake-up, and a background `sleep` holds the
    /// output pipes open, so that nothing but the exit wakes the watch.
    #[tokio::test]
    async fn a_checkpoint_request_that_comes_as_the_task_exits_is_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control, cp_dir) = checkpointing(dir.path());
        let probe = ctx.clone();
        let run = started_waiting(dir.path(), "sleep 30 & ", ctx).await;
        control
            .shared
            .checkpoint_requested
            .store(true, std::sync::atomic::Ordering::Relaxed);
        stop_waiting(dir.path(), run).await;
        let why = format!(
            "the task ended: the task has written no checkpoint in {} (it holds no files)",
            cp_dir.display()
        );
        assert_eq!(refusals(&probe), [(None, why)]);
        assert!(
            !control
                .shared
                .checkpoint_requested
                .load(std::sync::atomic::Ordering::Relaxed)
        );
    }

    /// A request to a task that has written nothing in its checkpoint directory says so, with
    /// the directory, and ships nothing (an empty checkpoint would hold nothing to resume
    /// from).
    #[tokio::test]
    async fn a_checkpoint_request_on_an_empty_dir_says_the_task_has_written_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control, cp_dir) = checkpointing(dir.path());
        let (outbox, probe) = (ctx.outbox().clone(), ctx.clone());
        let run = started_waiting(dir.path(), "", ctx).await;
        let said = answer_to_a_request(&control, &probe).await;
        let why = format!(
            "the task has written no checkpoint in {} (it holds no files)",
            cp_dir.display()
        );
        assert_eq!(said, [(None, why)]);
        let queued = queued_kinds(&outbox);
        assert!(queued.is_empty(), "nothing shipped: {queued:?}");
        assert!(control.latest_checkpoint().is_none());
        stop_waiting(dir.path(), run).await;
    }

    /// A request to a paused task (its processes stopped) is answered at once that it is
    /// paused, naming its latest checkpoint, and ships nothing; once resumed, the directory is
    /// looked at (a poll is a minute away here): what changed meanwhile is shipped, with
    /// nothing more said. Before, a request waited unanswered for the resume (the runner's
    /// re-send of the latest was no newer than the coordinator's copy).
    #[tokio::test]
    async fn a_checkpoint_request_to_a_paused_task_says_so_and_the_dir_is_looked_at_once_resumed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control, cp_dir) = checkpointing(dir.path());
        let (outbox, probe) = (ctx.outbox().clone(), ctx.clone());
        let first = r#"echo 1 > "$TETHER_CHECKPOINT_DIR/n"; echo $$ > "$D/pid.tmp"; mv "$D/pid.tmp" "$D/pid"; "#;
        let run = started_waiting(dir.path(), first, ctx).await;
        let pid = read_pid(&dir.path().join("pid")).await;
        control.request_checkpoint();
        wait_for("the requested checkpoint", || {
            control.latest_checkpoint().is_some()
        })
        .await;
        let shipped = control.shared.latest().expect("shipped").id;
        queued_kinds(&outbox);

        control.set_paused(true);
        wait_for("the task to park", || control.is_parked()).await;
        wait_for("the process to stop", || proc_state(pid) == Some('T')).await;
        let said = answer_to_a_request(&control, &probe).await;
        let why = format!(
            "the task is paused: no checkpoint is made while it is; its checkpoint dir is looked \
             at once it is resumed (its latest checkpoint is {shipped})"
        );
        assert_eq!(said, [(None, why)]);
        assert!(queued_kinds(&outbox).contains(&"task_paused"));
        assert_eq!(control.shared.latest().map(|c| c.id), Some(shipped.clone()));

        // Written while paused (by someone else: the task's processes are stopped).
        std::fs::write(cp_dir.join("n"), "2\n").expect("write");
        control.set_paused(false);
        let n = |control: &TaskControl| latest_file(control, "n");
        wait_for("the change shipped once resumed", || {
            n(&control).as_deref() == Some(b"2\n")
        })
        .await;
        assert!(refusals(&probe).is_empty(), "nothing more said");
        stop_waiting(dir.path(), run).await;
        assert!(refusals(&probe).is_empty(), "nothing more said");
    }

    /// The packs queued for upload in `outbox`, by checkpoint, their pieces put together.
    fn queued_packs(outbox: &crate::outbox::Outbox) -> Vec<BTreeMap<String, Vec<u8>>> {
        let mut pieces: BTreeMap<String, BTreeMap<u32, Vec<u8>>> = BTreeMap::new();
        for (_, msg) in outbox.take_unsent(10_000) {
            if let tether_proto::msg::WorkerMsg::CheckpointData(d) = &*msg {
                let of = pieces.entry(d.checkpoint_id.to_string()).or_default();
                of.insert(d.chunk, d.data.0.clone());
            }
        }
        pieces
            .into_values()
            .map(|of| {
                let data: Vec<u8> = of.into_values().flatten().collect();
                packing::decode(&data).expect("a valid pack")
            })
            .collect()
    }

    /// A file still being written is not shipped: only a directory that stayed the same for a
    /// poll interval is, and the last look at the task's end. The file here grows by 125
    /// bytes every 20 ms or so for about a second, well within the 500 ms poll; before, the
    /// looks during the writing shipped it half written (and made that the latest checkpoint).
    #[tokio::test]
    async fn a_file_still_being_written_is_not_shipped_half_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let ctx = ctx.with_checkpoint_dir(dir.path().join("cp"));
        let outbox = ctx.outbox().clone();
        let script = r#"i=0; while [ $i -lt 40 ]; do
                head -c 125 /dev/zero >> "$TETHER_CHECKPOINT_DIR/big"; sleep 0.02; i=$((i+1))
            done"#;
        let config = serde_json::json!({"shell": script, "checkpoint_poll_ms": 500});
        exec(config, ctx).await.expect("exit 0");
        let packs = queued_packs(&outbox);
        assert!(!packs.is_empty(), "shipped at exit");
        for files in &packs {
            let big = files.get("big").map(Vec::len);
            assert!(
                big.is_none_or(|n| n == 5000),
                "shipped half written: {big:?} bytes"
            );
        }
        let latest = control.latest_checkpoint().expect("a checkpoint");
        let files = packing::decode(&latest).expect("a valid pack");
        assert_eq!(files.get("big").map(Vec::len), Some(5000));
    }

    /// A task stopped because its worker stops ships the checkpoint it wrote as it stopped (a
    /// TERM trap): its next attempt, on another worker, resumes from it. One cancelled ships
    /// nothing more (nothing resumes from it).
    #[tokio::test]
    async fn a_checkpoint_written_as_the_worker_stops_the_task_is_shipped() {
        for worker_stops in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (ctx, control) = ctx(1);
            let ctx = ctx.with_checkpoint_dir(dir.path().join("cp"));
            let config = trapping(dir.path());
            let run = tokio::spawn(exec(config, ctx));
            wait_for("the trap set", || dir.path().join("ready").exists()).await;
            match worker_stops {
                true => control.stop_worker(),
                false => control.cancel(),
            }
            stopped(run.await.expect("joined"));
            let n = latest_file(&control, "n");
            match worker_stops {
                true => assert_eq!(n.as_deref(), Some(&b"7\n"[..])),
                false => assert_eq!(n, None, "a cancelled task ships nothing more"),
            }
        }
    }

    /// The checkpoint a task writes as its worker stops is packed and stored whatever they
    /// take (here a store of 1.5 s, past the 1 s limit); only the wait for room to queue its
    /// pieces is cut short. Before, the limit covered the pack and the store too: the run
    /// returned with the checkpoint neither stored nor queued, logged at debug.
    #[tokio::test]
    async fn a_checkpoint_written_as_the_worker_stops_is_stored_and_queued_however_long_the_store()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let mut ctx = ctx.with_checkpoint_dir(dir.path().join("cp"));
        let stores = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = stores.clone();
        let sink: crate::executor::CheckpointSink = Arc::new(move |_, _| {
            std::thread::sleep(STOP_SHIP_LIMIT + Duration::from_millis(500));
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        ctx.on_checkpoint = Some(sink);
        let outbox = ctx.outbox().clone();
        let config = trapping(dir.path());
        let run = tokio::spawn(exec(config, ctx));
        wait_for("the trap set", || dir.path().join("ready").exists()).await;
        control.stop_worker();
        stopped(run.await.expect("joined"));
        assert_eq!(
            stores.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "stored"
        );
        let n = latest_file(&control, "n");
        assert_eq!(n.as_deref(), Some(&b"7\n"[..]), "the latest");
        let packs = queued_packs(&outbox);
        let queued: Vec<_> = packs.iter().map(|files| files.get("n").cloned()).collect();
        assert_eq!(queued, [Some(b"7\n".to_vec())], "queued, every piece");
    }

    /// Warnings logged on this thread, as `message field=value ..` lines.
    #[derive(Clone, Default)]
    struct Warnings(Arc<std::sync::Mutex<Vec<String>>>);

    impl Warnings {
        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    impl tracing::Subscriber for Warnings {
        fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
            *meta.level() <= tracing::Level::WARN
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Line(String);
            impl tracing::field::Visit for Line {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    self.0.push_str(&format!(" {}={v:?}", f.name()));
                }
            }
            let mut line = Line(String::new());
            event.record(&mut line);
            let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
            lines.push(line.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// A checkpoint written as the worker stops whose pieces find no room in the outbox (a
    /// session that takes nothing) does not hold the stop: it is stored here, its pieces wait
    /// for room past the limit without the task, and a warning says so with its size.
    #[tokio::test]
    async fn a_checkpoint_written_as_the_worker_stops_is_stored_when_its_pieces_find_no_room() {
        let warnings = Warnings::default();
        let _log = tracing::subscriber::set_default(warnings.clone());
        let (outbox, control, _) = stopped_with_room_for_one(None).await;
        let n = latest_file(&control, "n");
        assert_eq!(n.as_deref(), Some(&b"7\n"[..]), "stored");
        let kinds = queued_kinds(&outbox);
        assert_eq!(kinds, ["checkpoint"], "announced; its piece found no room");
        let said = warnings.lines();
        assert!(
            said.iter()
                .any(|w| w.contains("is stored here") && w.contains("size=")),
            "{said:?}"
        );
    }

    /// A task whose TERM trap writes a checkpoint (`n`, `7`), its outbox with room for the
    /// announcement alone, its pieces `chunk_size` bytes if given: stopped with its worker, and
    /// returned once its stop did (not held by the outbox). Its outbox, its control, and when
    /// the stop was asked.
    async fn stopped_with_room_for_one(
        chunk_size: Option<usize>,
    ) -> (
        Arc<crate::outbox::Outbox>,
        TaskControl,
        tokio::time::Instant,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctx, control) = ctx(1);
        let mut ctx = ctx.with_checkpoint_dir(dir.path().join("cp"));
        if let Some(size) = chunk_size {
            ctx.chunk_size = size;
        }
        let limits = crate::outbox::Limits {
            max_entries: 0,
            max_bytes: usize::MAX,
        };
        ctx.outbox = Arc::new(crate::outbox::Outbox::new(limits));
        let outbox = ctx.outbox().clone();
        let config = trapping(dir.path());
        let mut run = std::pin::pin!(exec(config, ctx));
        let ready = dir.path().join("ready");
        tokio::select! {
            r = &mut run => panic!("the task ended: {r:?}"),
            () = wait_for("the trap set", || ready.exists()) => {}
        }
        control.stop_worker();
        let stop_at = tokio::time::Instant::now();
        let r = tokio::time::timeout(PATIENCE, run).await;
        stopped(r.expect("the stop is not held by the outbox"));
        (outbox, control, stop_at)
    }

    /// The messages `outbox` holds unsent, taken as the session takes them and acknowledged at
    /// once, as the coordinator acknowledges them: room is made for what waits.
    fn take_and_ack(
        outbox: &crate::outbox::Outbox,
    ) -> Vec<(tether_proto::Seq, Arc<tether_proto::msg::WorkerMsg>)> {
        let taken = outbox.take_unsent(100);
        for (seq, _) in &taken {
            assert!(outbox.ack(*seq), "held until acknowledged");
        }
        taken
    }

    /// The pieces found past the limit are queued on, after the task stopped, as room is made
    /// while the worker's stop flush may last: here the outbox has room for the announcement
    /// alone until, 2 s after the stop, the session (this test) acknowledges what it holds,
    /// and then takes and acknowledges each piece as it comes. Every piece ends up queued, in
    /// order after the announcement, and they make the checkpoint stored here. Before, only
    /// the announcement was: the pieces were given up at the limit and never queued later,
    /// though the flush had seconds left.
    #[tokio::test]
    async fn a_checkpoint_written_as_the_worker_stops_is_queued_whole_as_room_comes_after_the_limit()
     {
        let warnings = Warnings::default();
        let _log = tracing::subscriber::set_default(warnings.clone());
        // Small pieces: several of them, each waiting for the one before to be acknowledged.
        let (outbox, control, stop_at) = stopped_with_room_for_one(Some(16)).await;
        let room_at = stop_at + Duration::from_secs(2);
        let latest = control.latest_checkpoint().expect("stored");
        let kinds = |msgs: &[(tether_proto::Seq, Arc<tether_proto::msg::WorkerMsg>)]| {
            msgs.iter().map(|(_, m)| m.type_name()).collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(&outbox.take_unsent(100)),
            ["checkpoint"],
            "as the task stopped: announced, its pieces waiting for room"
        );
        outbox.requeue_all();

        // The session makes room 2 s after the stop, past the limit: the task stopped already.
        tokio::time::sleep_until(room_at).await;
        let mut taken = take_and_ack(&outbox);
        let chunks = match taken.first().map(|(_, m)| &**m) {
            Some(tether_proto::msg::WorkerMsg::Checkpoint(c)) => c.chunks,
            other => panic!("not the announcement: {other:?}"),
        };
        assert!(chunks > 1, "{chunks} pieces");
        let deadline = std::time::Instant::now() + PATIENCE;
        while taken.len() < 1 + chunks as usize {
            let more = take_and_ack(&outbox);
            if more.is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "of {chunks} pieces, queued: {:?}",
                    kinds(&taken)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            taken.extend(more);
        }
        let mut data = Vec::new();
        let mut order = Vec::new();
        for (_, msg) in &taken[1..] {
            match &**msg {
                tether_proto::msg::WorkerMsg::CheckpointData(d) => {
                    order.push(d.chunk);
                    data.extend_from_slice(&d.data.0);
                }
                other => panic!("not a piece: {}", other.type_name()),
            }
        }
        assert_eq!(order, (0..chunks).collect::<Vec<_>>(), "in order");
        assert_eq!(data, *latest, "every piece of the checkpoint stored here");
        let files = packing::decode(&data).expect("a valid pack");
        assert_eq!(files.get("n").map(Vec::as_slice), Some(&b"7\n"[..]));
        let said = warnings.lines();
        assert!(
            said.iter().all(|w| !w.contains("not all of it was queued")),
            "{said:?}"
        );
    }

    /// What is left to queue of a worker's stop's last checkpoint is queued on as room is made
    /// until the stop's flush may have ended (`until`), and given up then, with a warning: the
    /// session is gone by then, and nothing it would send is acknowledged.
    #[tokio::test(start_paused = true)]
    async fn a_stops_last_checkpoint_is_queued_on_until_the_flush_may_have_ended_not_after() {
        let warnings = Warnings::default();
        let _log = tracing::subscriber::set_default(warnings.clone());
        let (mut ctx, _control) = ctx(1);
        ctx.chunk_size = 1;
        let limits = crate::outbox::Limits {
            max_entries: 0,
            max_bytes: usize::MAX,
        };
        ctx.outbox = Arc::new(crate::outbox::Outbox::new(limits));
        let outbox = ctx.outbox().clone();
        let stored = ctx.store_checkpoint(b"abc".to_vec()).await;
        let (id, size) = (stored.id().clone(), stored.size());
        let until = tokio::time::Instant::now() + STOP_QUEUE_UNTIL;
        queue_after_stop((ctx.task_id().clone(), id, size), ctx.upload(stored), until);
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        let pieces = |msgs: &[(tether_proto::Seq, Arc<tether_proto::msg::WorkerMsg>)]| {
            let chunk = |(_, m): &(_, Arc<tether_proto::msg::WorkerMsg>)| match &**m {
                tether_proto::msg::WorkerMsg::CheckpointData(d) => Some(d.chunk),
                _ => None,
            };
            msgs.iter().map(chunk).collect::<Vec<_>>()
        };
        settle().await;
        assert_eq!(pieces(&take_and_ack(&outbox)), [None], "the announcement");
        settle().await;
        tokio::time::sleep(STOP_QUEUE_UNTIL / 2).await;
        assert_eq!(
            pieces(&take_and_ack(&outbox)),
            [Some(0)],
            "room made: a piece"
        );
        settle().await;
        // Piece 1 is queued, piece 2 waits for room, which comes only after the end.
        tokio::time::sleep_until(until + Duration::from_millis(1)).await;
        settle().await;
        let said = warnings.lines();
        assert!(
            said.iter()
                .any(|w| w.contains("not all of it was queued") && w.contains("size=3")),
            "{said:?}"
        );
        assert_eq!(
            pieces(&take_and_ack(&outbox)),
            [Some(1)],
            "queued before the end"
        );
        settle().await;
        assert!(outbox.is_empty(), "room, but nothing queued after the end");
    }

    #[tokio::test]
    async fn a_resumed_attempt_finds_its_checkpoint_restored_before_it_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let saved = dir.path().join("saved");
        std::fs::create_dir_all(&saved).expect("mkdir");
        std::fs::write(saved.join("state.txt"), "7\n").expect("write");
        let packed = packing::pack(&saved).expect("pack");
        let cp = dir.path().join("cp");
        std::fs::create_dir_all(&cp).expect("mkdir");
        std::fs::write(cp.join("stale.txt"), "old").expect("write");

        let (ctx, control) = ctx(2);
        let ctx = ctx.with_checkpoint(packed.clone()).with_checkpoint_dir(cp);
        let script = r#"cat "$TETHER_CHECKPOINT_DIR/state.txt"; ls "$TETHER_CHECKPOINT_DIR""#;
        let out = exec(serde_json::json!({"shell": script}), ctx)
            .await
            .expect("exit 0");
        assert_eq!(out["stdout_tail"], "7\nstate.txt\n");
        assert_eq!(
            control.latest_checkpoint().as_deref(),
            Some(&packed),
            "an unchanged dir is not shipped again"
        );
    }

    /// Files an earlier attempt (or an earlier task of the same id) left in the directory
    /// without shipping them are not the new attempt's: with no checkpoint it starts empty.
    #[tokio::test]
    async fn an_attempt_without_a_checkpoint_starts_with_an_empty_checkpoint_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = dir.path().join("cp");
        std::fs::create_dir_all(cp.join("sub")).expect("mkdir");
        std::fs::write(cp.join("stale.txt"), "old").expect("write");
        std::fs::write(cp.join("sub/done.marker"), "").expect("write");

        let (ctx, control) = ctx(1);
        let ctx = ctx.with_checkpoint_dir(cp);
        let script = r#"ls "$TETHER_CHECKPOINT_DIR""#;
        let out = exec(serde_json::json!({"shell": script}), ctx)
            .await
            .expect("exit 0");
        assert_eq!(out["stdout_tail"], "");
        assert!(
            control.latest_checkpoint().is_none(),
            "an empty dir, unchanged, is not shipped"
        );
    }

    /// Room is counted in escaped bytes; a tail that needs less than half leaves the rest to
    /// the other; only a cut tail is marked.
    #[test]
    fn tails_too_large_for_a_message_keep_their_ends_within_the_room() {
        let tails = |out: &str, err: &str, room| {
            let (mut out, mut err) = ((out.to_owned(), false), (err.to_owned(), false));
            fit_tails(&mut out, &mut err, room);
            (out, err)
        };
        let (out, err) = tails(&"a".repeat(100), "bb", 50);
        assert_eq!(out, ("a".repeat(48), true));
        assert_eq!(err, ("bb".to_owned(), false));
        let (out, err) = tails(&"a".repeat(100), &"b".repeat(100), 20);
        assert_eq!((out.0.len(), err.0.len()), (10, 10));
        assert!(out.1 && err.1);
        // `"` takes 2, a NUL 6, `é` 2 (UTF-8, unescaped): 2 + 6 + 2 = 10 of 11.
        let (out, _) = tails("x\"\"\u{0}é", "", 11);
        assert_eq!(out, ("\"\u{0}é".to_owned(), true));
        let (out, _) = tails("short", "", 11);
        assert_eq!(out, ("short".to_owned(), false));
    }

    #[test]
    fn a_tail_keeps_the_last_bytes_and_drops_a_cut_character() {
        let mut t = Tail::new(5);
        t.push(b"ab");
        assert_eq!(t.text(), "ab");
        t.push(b"cdefg");
        assert_eq!(t.text(), "cdefg");
        t.push(b"0123456789");
        assert_eq!(t.text(), "56789");

        let mut t = Tail::new(4);
        t.push("xé€".as_bytes()); // 1 + 2 + 3 bytes; the tail starts inside 'é'.
        assert_eq!(t.text(), "€");
        let mut t = Tail::new(0);
        t.push(b"anything");
        assert_eq!(t.text(), "");
    }
}
