//! The agent: one task owns the connection and its state machine
//! (Connecting -> Connected -> Disconnected -> ... -> Failed | Shutdown). Sessions run inline in
//! that task, so there are never two live sessions (two connection attempts may be under way,
//! see `dial`; the first to open is the session, the other is dropped unused); each attempt
//! has a generation number and everything its session started ends with it, so late events of
//! an old session do nothing.
//! With a state directory the agent starts from what the previous process left: its outbox,
//! its sequence numbers, and the tasks that died with it (reported `lost` at registration).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tether_proto::auth::Secret;
use tether_proto::endpoint::{EndpointError, derive_endpoint};
use tether_proto::msg::{Ack, WorkerMsg};
use tether_proto::task::ConnStats;
use tether_proto::{Seq, TaskRef, WorkerId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::WorkerConfig;
use crate::connector::{Connector, TcpConnector, tls_client_config};
use crate::dial::Dialed;
use crate::eventlog::{Event, EventLog};
use crate::executor::Executors;
use crate::metrics as m;
use crate::outbox::Outbox;
use crate::runner::Runner;
use crate::session::{Session, SessionEnd};
use crate::statedir::{LockFile, Restored, StateDir};
use crate::stats::{ConnState, StatsTracker};

/// How long running tasks get to stop at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why an agent stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    // Not `#[from]`: the detail is in the message, so error chains do not print it twice.
    #[error("invalid coordinator URL: {0}")]
    Config(EndpointError),
    #[error("invalid configuration: {0}")]
    Settings(#[from] tether_proto::settings::ConfigError),
    #[error("{0}")]
    Refused(String),
    #[error("gave up after {attempts} consecutive failed connection attempts")]
    GaveUp { attempts: u32 },
    #[error("state directory: {0}")]
    StateDir(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    EventLog(String),
}

impl From<EndpointError> for AgentError {
    fn from(e: EndpointError) -> Self {
        AgentError::Config(e)
    }
}

/// State shared between the agent task and its handles.
#[derive(Debug)]
pub struct AgentShared {
    pub worker_id: WorkerId,
    pub stats: Mutex<StatsTracker>,
    pub state: watch::Sender<ConnState>,
    /// Connections open right now (never more than one).
    pub live_connections: AtomicI64,
    /// Most connections ever open at once.
    pub max_live_connections: AtomicI64,
    /// Session generation, +1 per connection attempt.
    pub generation: AtomicU64,
    /// Sessions that registered.
    pub registrations: AtomicU64,
    /// `error` messages received from the coordinator.
    pub errors_received: AtomicU64,
    /// Frames from the coordinator this worker could not decode.
    pub bad_frames: AtomicU64,
    /// Frames from the coordinator dropped because their integrity tag did not verify.
    pub mac_failures: AtomicU64,
    /// Heartbeats answered by the coordinator, every one (also those whose round trip
    /// measured a loaded link, left out of the RTT statistics).
    pub heartbeats_answered: AtomicU64,
    /// Current adaptive heartbeat timeout, ms.
    pub heartbeat_timeout_ms: AtomicU64,
    /// Current heartbeat interval, ms.
    pub heartbeat_interval_ms: AtomicU64,
    /// Drained by an operator, as the coordinator's last heartbeat reply said (`draining`): it
    /// gives this worker no new task until undrained.
    pub drained: AtomicBool,
    /// The link's delivery rate to the coordinator, bytes a second, as last measured while
    /// the worker had more to send than went at once (`link::ShownRate`); 0 before such a
    /// measure.
    pub send_bytes_per_sec: AtomicU64,
    /// The link's delivery rate to the coordinator, bytes a second, as last measured from
    /// every acknowledgement (`link::DeliveryRate`), 0 before a measure: it sizes the send
    /// window (the next session's starts from it) and the pieces of checkpoints. Not what the
    /// stats show: a worker with little to send measures how little, not its link.
    pub link_bytes_per_sec: AtomicU64,
    /// Times entries started to wait for the send window to open (a window held back what
    /// was ready to send): on a link sized right, rare outside large uploads.
    pub send_window_full: AtomicU64,
    /// Current backoff factor x 1000.
    pub backoff_factor_milli: AtomicU64,
    /// Next backoff delay before jitter, ms, as the latest failure or lost session left it
    /// (read through [`AgentShared::next_backoff_ms`], which knows a healthy session's).
    pub next_backoff_ms: AtomicU64,
    /// How long a registered session lasts before its loss starts the delays over.
    pub healthy_after: Duration,
    /// The first delay, before jitter, ms: the next after a healthy session.
    pub first_backoff_ms: u64,
    /// The delay (with jitter) waited before the current connection attempt, µs; 0 before
    /// the first.
    pub backoff_delay_us: AtomicU64,
    /// When the current (or latest) connection attempt started, µs since the Unix epoch.
    pub attempt_started_unix_us: AtomicU64,
    /// When the latest session's registration was acknowledged, µs since the Unix epoch;
    /// 0 before the first. Stamped where it happens, so a reader that runs later (a
    /// watcher of the state, a load test's bookkeeping) does not add its own lag.
    pub registered_unix_us: AtomicU64,
    /// The latest connection attempts (at most [`RECENT_ATTEMPTS`]), oldest first, twins
    /// started while another attempt was under way included.
    pub recent_attempts: Mutex<VecDeque<AttemptStamp>>,
    /// When the latest registered session ended (the worker noticed it lost the coordinator),
    /// µs since the Unix epoch; 0 before the first loss.
    pub lost_unix_us: AtomicU64,
    /// Why the agent failed, if it did.
    pub refusal: Mutex<Option<String>>,
    /// A secret given while the agent runs ([`AgentHandle::replace_secret`]), taken at its next
    /// connection.
    new_secret: Mutex<Option<Secret>>,
}

/// Connection attempts kept in [`AgentShared::recent_attempts`].
pub const RECENT_ATTEMPTS: usize = 16;

/// A connection attempt as it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptStamp {
    /// µs since the Unix epoch.
    pub started_unix_us: u64,
    /// The backoff delay (with jitter) waited before it, µs.
    pub delay_us: u64,
}

impl AgentShared {
    /// The latest connection attempts, oldest first.
    pub fn recent_attempts(&self) -> Vec<AttemptStamp> {
        let a = self
            .recent_attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        a.iter().copied().collect()
    }

    pub(crate) fn stamp_attempt(&self, stamp: AttemptStamp) {
        self.attempt_started_unix_us
            .store(stamp.started_unix_us, Ordering::Relaxed);
        self.backoff_delay_us
            .store(stamp.delay_us, Ordering::Relaxed);
        let mut a = self
            .recent_attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if a.len() == RECENT_ATTEMPTS {
            a.pop_front();
        }
        a.push_back(stamp);
    }

    pub(crate) fn stats(&self) -> std::sync::MutexGuard<'_, StatsTracker> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The delay before jitter, ms, that the wait after this moment's loss or failure would
    /// start from: in a registered session alive for `healthy_after` (up to the last frame it
    /// heard, as its loss counts it: `StatsTracker::alive_age`), the first (its loss starts
    /// the delays over); otherwise what the latest failure or lost session left (a session
    /// lost sooner, or silent since, is followed by the grown delay).
    pub fn next_backoff_ms(&self) -> u64 {
        let healthy = self
            .stats()
            .alive_age()
            .is_some_and(|age| age >= self.healthy_after);
        match healthy {
            true => self.first_backoff_ms,
            false => self.next_backoff_ms.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn set_state(&self, s: ConnState) {
        self.stats().state = s;
        self.state.send_if_modified(|cur| {
            let changed = *cur != s;
            *cur = s;
            changed
        });
    }
}

/// Whether the worker sends its registration right after the upgrade instead of after the
/// welcome: without a secret, nothing of the welcome goes into it (no signature over its nonce,
/// no session key). Its endpoint URL then says so ([`tether_proto::endpoint::PIPELINED_QUERY`]).
pub(crate) fn registers_first(cfg: &WorkerConfig) -> bool {
    cfg.secret.is_none() && !cfg.require_message_mac
}

/// Microseconds since the Unix epoch (0 for a clock set before it): the clock of
/// [`AgentShared`]'s stamps, which other processes on the machine read too.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A view of a running agent, for the CLI, the demo and tests.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    pub shared: Arc<AgentShared>,
    pub outbox: Arc<Outbox>,
    pub runner: Arc<Runner>,
}

impl AgentHandle {
    /// Registers with `secret` from the next connection on, in place of the secret the worker
    /// was configured with (the CLI's SIGHUP, reading its secret file again): a fleet secret
    /// rotates without a restart, which would stop the worker's tasks. The session under way
    /// keeps the key it registered with; a coordinator in a rotation takes either secret. A
    /// worker configured without a secret keeps none (its endpoint said it registers
    /// unsigned).
    pub fn replace_secret(&self, secret: Secret) {
        *self
            .shared
            .new_secret
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(secret);
    }

    pub fn state(&self) -> ConnState {
        *self.shared.state.borrow()
    }

    /// Waits until the state satisfies `f`.
    pub async fn wait_state(&self, f: impl Fn(ConnState) -> bool) -> ConnState {
        let mut rx = self.shared.state.subscribe();
        loop {
            let s = *rx.borrow_and_update();
            if f(s) {
                return s;
            }
            if rx.changed().await.is_err() {
                return *rx.borrow();
            }
        }
    }

    /// Whether the coordinator said this worker is drained (its last heartbeat reply's
    /// `draining`): no new task comes until an operator undrains it.
    pub fn drained(&self) -> bool {
        self.shared.drained.load(Ordering::Relaxed)
    }

    /// Connection statistics, with the current adaptive values.
    pub fn stats(&self) -> ConnStats {
        let mut s = self.shared.stats().snapshot();
        s.heartbeat_timeout_ms = self.shared.heartbeat_timeout_ms.load(Ordering::Relaxed);
        s.heartbeat_interval_ms = self.shared.heartbeat_interval_ms.load(Ordering::Relaxed);
        s.send_bytes_per_sec = self.shared.send_bytes_per_sec.load(Ordering::Relaxed);
        s.backoff_factor = self.shared.backoff_factor_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        s.next_backoff_ms = self.shared.next_backoff_ms();
        s
    }

    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(Ordering::Relaxed)
    }

    pub fn active_tasks(&self) -> Vec<TaskRef> {
        self.runner.active()
    }

    /// Executions started by this worker, over all executor kinds.
    pub fn executions(&self) -> u64 {
        self.runner.executors().executions()
    }
}

/// A worker agent, ready to run.
pub struct Agent {
    pub(crate) cfg: WorkerConfig,
    pub(crate) endpoint: String,
    pub(crate) runner: Arc<Runner>,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) shared: Arc<AgentShared>,
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) boot_id: String,
    pub(crate) rng: StdRng,
    /// Tasks that died with the previous process, reported `lost` at every registration
    /// until the coordinator has the replay of what that process sent (`lost_through`).
    pub(crate) lost: Vec<TaskRef>,
    /// The `replay_through` of the registration that last reported `lost`: the lost tasks
    /// are forgotten once nothing held here is at or below it (their checkpoints among it
    /// reached the coordinator, which requeues them then). `None` before that registration's
    /// ack.
    pub(crate) lost_through: Option<Seq>,
    /// Set once `lost` is forgotten, for the state directory to forget it too.
    pub(crate) lost_settled: watch::Sender<bool>,
    pub(crate) heartbeat_seq: u64,
    pub(crate) state: Option<Arc<StateDir>>,
    pub(crate) ack_hook: Option<AckHook>,
    pub(crate) events: Option<EventLog>,
    /// Whether "the coordinator does not ask to authenticate" was logged already.
    pub(crate) warned_unauthenticated: bool,
    /// The odd values of a `registration_ack` last warned about ([`crate::session`]): the
    /// same again, from every session of a coordinator so set up, is not warned again.
    pub(crate) warned_ack: Vec<String>,
    /// The pace of what the outbox sends, below the coordinator's message and byte rates; kept
    /// across sessions, as the coordinator keeps its counts ([`crate::pace`]).
    pub(crate) pace: Option<crate::pace::Pace>,
    /// The coordinator's grace for a disconnected worker, as its latest `registration_ack`
    /// said (`lost_after_ms`): while this worker holds leased work, its reconnect delays stay
    /// well below it (see [`crate::dial`]).
    pub(crate) grace: Option<Duration>,
    /// The root of the tasks' checkpoint directories of an agent without a state directory.
    pub(crate) _scratch: Option<ScratchDir>,
}

/// The start of the name of a worker process's scratch directory in the temporary directory,
/// before its process id: `tether-worker-<pid>/<boot_id>/` is an agent's.
const SCRATCH_PREFIX: &str = "tether-worker-";

/// Once a process, whatever its agents' state directories: removes the scratch directories of
/// worker processes gone, killing the task processes they left running.
fn sweep_dead_scratch_once() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| remove_dead_scratch(&std::env::temp_dir()));
}

/// This process's scratch directory while an agent uses it (readable by its user only: the
/// tasks' checkpoints may hold secrets), locked as a state directory is (`statedir::LockFile`):
/// the lock, not a process id, tells another worker process's sweep that it is in use. Made by
/// the first agent without a state directory, shared by the agents of the process (a `tether
/// stress` fleet, a test), removed by the last one's drop ([`release_scratch_root`]), made
/// again by the next one. `None`, said once, when it cannot be made (a `TMPDIR` that is a
/// file, a read-only or full `/tmp`): tasks then run without a checkpoint directory, as they
/// would fail to make one.
static SCRATCH_ROOT: Mutex<Option<ScratchRoot>> = Mutex::new(None);

/// The process's scratch directory, its lock, and how many agents use it.
struct ScratchRoot {
    path: std::path::PathBuf,
    lock: LockFile,
    users: usize,
}

/// The process's scratch directory, made if no agent uses it yet, counted as used by one more
/// agent, which gives it back with [`release_scratch_root`].
fn acquire_scratch_root() -> Option<std::path::PathBuf> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let mut held = SCRATCH_ROOT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(root) = held.as_mut() {
        root.users += 1;
        return Some(root.path.clone());
    }
    let temp = std::env::temp_dir();
    let path = temp.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
    match make_scratch_root(&temp, &path) {
        Ok(lock) => {
            *held = Some(ScratchRoot {
                path: path.clone(),
                lock,
                users: 1,
            });
            Some(path)
        }
        Err(e) => {
            WARNED.call_once(|| tracing::warn!(dir = %temp.display(), error = %e, "cannot make checkpoint directories under the temporary directory: command tasks run without $TETHER_CHECKPOINT_DIR (give --state-dir, or a usable TMPDIR)"));
            None
        }
    }
}

/// One agent is done with the process's scratch directory; the last one removes it. Under the
/// lock of [`SCRATCH_ROOT`], so an agent being built meanwhile makes a new one only after.
///
/// The directory is first renamed, still locked, to `<name>.gone`, and only then emptied, its
/// lock file included: emptied under its own name, it could be found by another process's
/// sweep ([`remove_dead_scratch`]) without a lock file, locked anew, and removed after this
/// process had made its next one there. One that cannot be emptied stays under the `.gone`
/// name, unlocked once this is done, for the next worker process's sweep, which takes such a
/// directory as it takes a dead process's.
fn release_scratch_root() {
    let mut held = SCRATCH_ROOT.lock().unwrap_or_else(|p| p.into_inner());
    let Some(root) = held.as_mut() else {
        return;
    };
    root.users = root.users.saturating_sub(1);
    if root.users > 0 {
        return;
    }
    let Some(ScratchRoot { path, lock, .. }) = held.take() else {
        return;
    };
    let mut going = path.clone().into_os_string();
    going.push(GOING);
    let going = std::path::PathBuf::from(going);
    // Left by an earlier process of this pid that could not empty it: nothing of it is in use.
    let _ = crate::executor::packing::remove_tree(&going);
    let doomed = match std::fs::rename(&path, &going) {
        Ok(()) => going,
        // Removed in place: a sweep may then take it for a dead process's, which is harmless
        // now that no agent uses it.
        Err(_) => path,
    };
    if let Err(e) = crate::executor::packing::remove_tree(&doomed) {
        tracing::warn!(dir = %doomed.display(), error = %e, "could not remove the worker's checkpoint directory");
    }
    drop(lock);
}

/// The suffix of a scratch directory being removed (`release_scratch_root`), which sweeps take
/// only once its lock is free: one its process could not empty, or a process killed while
/// emptying it, left behind.
const GOING: &str = ".gone";

/// Makes `root` under another name, locks it and only then names it: a sweep by another
/// process never finds it unlocked.
fn make_scratch_root(temp: &std::path::Path, root: &std::path::Path) -> Result<LockFile, String> {
    use std::os::unix::fs::DirBuilderExt;
    let young = temp.join(format!("{SCRATCH_PREFIX}{}{YOUNG}", std::process::id()));
    // Left by an earlier process of this pid, gone then: nothing of it is in use.
    let _ = std::fs::remove_dir_all(&young);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&young)
        .map_err(|e| e.to_string())?;
    let lock = LockFile::acquire(&young).map_err(|e| e.to_string())?;
    std::fs::rename(&young, root).map_err(|e| e.to_string())?;
    Ok(lock)
}

/// The suffix of a scratch directory being made (`make_scratch_root`), which sweeps leave alone
/// while a process has its pid.
const YOUNG: &str = ".new";

/// Whether no process has the id `pid` (one of another user's counts as there; 0 and ids past
/// `i32` name none, and are taken as there: `kill(0)` would name this process's group).
fn process_gone(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    raw > 0
        && nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None)
            == Err(nix::errno::Errno::ESRCH)
}

/// Removes the scratch directories that processes now gone left in `temp` (killed, they could
/// not remove their own), after killing the task processes recorded there, which outlived
/// them (as a state directory's next start does), and those their processes let go but could
/// not empty (named `<name>.gone`), and those a process killed while making one left (named
/// `<name>.new`, taken once no process has its pid). A directory whose lock its process still
/// holds is left alone, as is one being made (`.new`, locked only once made, of a pid a process
/// has) and anything else in `temp`.
/// The lock is free once the process is gone, killed and not yet reaped included.
///
/// `temp` is shared with every user of the machine: anyone can make a directory of that name
/// there, and the records in it would name the process groups this sweep kills. Only a real
/// directory of this process's user that no one else can write is taken ([`unsafe_scratch`]);
/// its lock file is never followed if it is a link (`tether_proto::lockfile`). Another user's
/// workers' directories are theirs to sweep: passed over, said at debug only (on a shared
/// machine every start found some).
fn remove_dead_scratch(temp: &std::path::Path) {
    sweep_scratch(temp, nix::unistd::geteuid().as_raw());
}

/// [`remove_dead_scratch`] by the user `uid`.
fn sweep_scratch(temp: &std::path::Path, uid: u32) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, young)) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .map(|rest| match rest.strip_suffix(YOUNG) {
                Some(pid) => (pid, true),
                None => (rest.strip_suffix(GOING).unwrap_or(rest), false),
            })
            .and_then(|(pid, young)| Some((pid.parse::<u32>().ok()?, young)))
        else {
            continue;
        };
        // One being made is locked only once made: taken only when no process has its pid,
        // so that none can be making it (a process killed between the two left it).
        if young && !process_gone(pid) {
            continue;
        }
        let path = entry.path();
        match unsafe_scratch(&path, uid) {
            None => {}
            // Removed since it was listed: by its process, or by another's sweep.
            Some(Unswept::Gone) => continue,
            Some(Unswept::OtherUsers) => {
                tracing::debug!(dir = %path.display(), "leaving alone another user's worker scratch directory");
                continue;
            }
            Some(Unswept::Unsafe(why)) => {
                tracing::warn!(dir = %path.display(), why, "leaving alone a directory named like a worker's scratch directory that is not one of this user's");
                continue;
            }
        }
        let _gone = match LockFile::acquire(&path) {
            Ok(lock) => lock,
            Err(crate::statedir::StateDirError::Locked { .. }) => continue,
            Err(crate::statedir::StateDirError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                continue;
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "leaving alone a scratch directory whose lock cannot be taken");
                continue;
            }
        };
        // Each agent of the process recorded its tasks' groups in a directory of its own.
        let agents = std::fs::read_dir(&path).into_iter().flatten().flatten();
        let dirs: Vec<_> = agents.map(|a| a.path()).collect();
        let killed: usize = crate::executor::procs::blocking_within(
            crate::executor::procs::BLOCKING_SCAN_LIMIT,
            move || {
                dirs.iter()
                    .map(|d| crate::executor::orphans::kill_orphans(d))
                    .sum()
            },
        )
        .unwrap_or(0);
        if killed > 0 {
            tracing::warn!(dir = %path.display(), groups = killed, "killed the task processes a worker process gone left running");
        }
        match crate::executor::packing::remove_tree(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), "removed the checkpoint directories of a worker process gone")
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "could not remove a gone worker's checkpoint directories")
            }
        }
    }
}

/// Why an entry of the temporary directory named like a scratch directory is not swept.
#[derive(Debug, PartialEq)]
enum Unswept {
    /// No longer there.
    Gone,
    /// Another user's (a link included): their workers sweep it.
    OtherUsers,
    /// This user's, but not as a worker makes its own: why.
    Unsafe(&'static str),
}

/// Why the entry at `path` of the temporary directory is not a scratch directory the user `uid`
/// may sweep, if it is not: gone, another user's, a symbolic link (to anything), not a
/// directory, or one that others may write into (they could plant records there). A worker's
/// own are made `0700` by its user (`make_scratch_root`).
fn unsafe_scratch(path: &std::path::Path, uid: u32) -> Option<Unswept> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(Unswept::Gone),
        Err(_) => return Some(Unswept::Unsafe("cannot be read")),
    };
    if meta.uid() != uid {
        Some(Unswept::OtherUsers)
    } else if meta.file_type().is_symlink() {
        Some(Unswept::Unsafe("a symbolic link"))
    } else if !meta.is_dir() {
        Some(Unswept::Unsafe("not a directory"))
    } else if meta.mode() & 0o022 != 0 {
        Some(Unswept::Unsafe("writable by its group or others"))
    } else {
        None
    }
}

/// A directory of the agent's own in the process's scratch directory, removed (with what is in
/// it) when the agent is dropped; the last agent's drop removes the process's directory too.
#[derive(Debug)]
pub(crate) struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        match crate::executor::packing::remove_tree(&self.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %self.0.display(), error = %e, "could not remove the tasks' checkpoint directories");
            }
            _ => {}
        }
        release_scratch_root();
    }
}

/// Observes every acknowledgement with the message it acknowledged, when the outbox still held
/// it (an ack log, a test's ground truth). Called on the session's task: keep it quick.
pub type AckHook = Arc<dyn Fn(&Ack, Option<&WorkerMsg>) + Send + Sync>;

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("worker_id", &self.cfg.worker_id)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Builds an agent; fails on a configuration error (bad URL, unusable state directory, a
    /// CA file that cannot be read for a `wss://` coordinator).
    pub fn new(cfg: WorkerConfig, executors: Executors) -> Result<Self, AgentError> {
        Self::build(cfg, executors, None)
    }

    /// Builds an agent that connects through `connector` (a bound source address, a TLS
    /// client shared by many agents, in-memory pipes), without setting up its own: for a
    /// `wss://` coordinator that would read the CA file, or the system's roots, once per agent.
    pub fn with_transport(
        cfg: WorkerConfig,
        executors: Executors,
        connector: impl Connector,
    ) -> Result<Self, AgentError> {
        Self::build(cfg, executors, Some(Arc::new(connector)))
    }

    fn build(
        cfg: WorkerConfig,
        executors: Executors,
        connector: Option<Arc<dyn Connector>>,
    ) -> Result<Self, AgentError> {
        cfg.validate()?;
        let mut endpoint = derive_endpoint(&cfg.coordinator, &cfg.worker_id)?;
        if registers_first(&cfg) {
            endpoint.push('?');
            endpoint.push_str(tether_proto::endpoint::PIPELINED_QUERY);
        }
        let (state, restored) = match &cfg.state_dir {
            Some(dir) => {
                let (sd, restored) = StateDir::open(dir, &cfg.worker_id)
                    .map_err(|e| AgentError::StateDir(e.to_string()))?;
                // Only after the lock is ours: the groups recorded belong to a dead process.
                let dir = dir.clone();
                crate::executor::procs::blocking_within(
                    crate::executor::procs::BLOCKING_SCAN_LIMIT,
                    move || crate::executor::orphans::kill_orphans(&dir),
                );
                // After the orphans (none writes into a directory as it goes), before any task
                // runs: only the lost tasks' directories may still be wanted.
                sd.sweep_task_dirs();
                (Some(sd), restored)
            }
            None => (None, Restored::default()),
        };
        let mut outbox = Outbox::starting_at(cfg.outbox, restored.last_seq);
        if let Some(sd) = &state {
            outbox = outbox.with_journal(sd.clone());
        }
        for (class, msg) in restored.entries {
            // A fetch was made for an attempt of the process that died: no one waits for its
            // piece, and the coordinator need not read it (it leaves the journal too).
            let fetch = matches!(msg, WorkerMsg::CheckpointFetch(_))
                .then(|| msg.seq())
                .flatten();
            outbox.restore(class, msg);
            if let Some(seq) = fetch {
                outbox.ack(seq);
            }
        }
        let outbox = Arc::new(outbox);
        let mut runner = Runner::new(executors, outbox.clone(), cfg.checkpoint_chunk_size)
            .with_max_frame(cfg.max_frame);
        if let Some(sd) = &state {
            // The lost tasks' checkpoints stay on disk: read when one comes back here.
            let sd = sd.clone();
            runner = runner.with_local_checkpoints(
                restored.checkpoints,
                Arc::new(move |task| sd.latest_checkpoint(task).map_err(|e| e.to_string())),
            );
        }
        let boot_id = format!("b-{}", uuid::Uuid::new_v4().simple());
        // A task's checkpoint directory (`$TETHER_CHECKPOINT_DIR` of a `command` task) lives in
        // the state directory, or without one in a directory of this agent's own under the
        // system's temporary directory: a task checkpoints and resumes either way; only a
        // restart of the worker process loses what the state directory would have kept. Made
        // by the first task that needs it, removed with the agent.
        sweep_dead_scratch_once();
        let scratch = match &cfg.state_dir {
            Some(dir) => {
                runner = runner
                    .with_checkpoint_root(dir.join(crate::statedir::TASKS_DIR))
                    .with_group_root(dir.join(crate::executor::orphans::GROUPS_DIR));
                None
            }
            None if let Some(root) = acquire_scratch_root() => {
                let dir = root.join(&boot_id);
                // The tasks' process groups are recorded there too: a process killed before it
                // could stop them leaves their records for the next one (`remove_dead_scratch`).
                runner = runner
                    .with_checkpoint_root(dir.join("tasks"))
                    .with_group_root(dir.join(crate::executor::orphans::GROUPS_DIR));
                Some(ScratchDir(dir))
            }
            // Tasks run without a checkpoint directory rather than fail, each, at its making.
            None => None,
        };
        if let Some(sd) = &state {
            runner = persist_runner(runner, sd);
        }
        for t in &restored.lost {
            tracing::warn!(worker = %cfg.worker_id, task = %t.task_id, attempt = %t.attempt, "task died with the previous worker process; reporting it lost");
        }
        let events = match &cfg.event_log {
            Some(path) => Some(
                EventLog::open(path, cfg.worker_id.as_str())
                    .map_err(|e| AgentError::EventLog(e.to_string()))?
                    .with_max_bytes(cfg.event_log_max_bytes),
            ),
            None => None,
        };
        let connector: Arc<dyn Connector> = match connector {
            Some(c) => c,
            None if endpoint.starts_with("wss://") => {
                let connector = match cfg.ca_file.as_deref() {
                    // Read again at each attempt: a new CA bundle heals the worker.
                    Some(path) => TcpConnector::with_ca_file(path),
                    None => tls_client_config(None).map(TcpConnector::with_tls),
                };
                Arc::new(connector.map_err(|e| AgentError::Tls(e.to_string()))?)
            }
            None => Arc::new(TcpConnector::default()),
        };
        let seed = cfg.seed.unwrap_or_else(rand::random);
        tracing::info!(worker = %cfg.worker_id, %endpoint, seed, "worker configured");
        let shared = Arc::new(AgentShared {
            worker_id: cfg.worker_id.clone(),
            stats: Mutex::new(StatsTracker::new()),
            state: watch::channel(ConnState::Disconnected).0,
            live_connections: AtomicI64::new(0),
            max_live_connections: AtomicI64::new(0),
            generation: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
            errors_received: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            mac_failures: AtomicU64::new(0),
            heartbeats_answered: AtomicU64::new(0),
            heartbeat_timeout_ms: AtomicU64::new(cfg.heartbeat_timeout.as_millis() as u64),
            heartbeat_interval_ms: AtomicU64::new(cfg.heartbeat_interval.as_millis() as u64),
            drained: AtomicBool::new(false),
            send_bytes_per_sec: AtomicU64::new(0),
            link_bytes_per_sec: AtomicU64::new(0),
            send_window_full: AtomicU64::new(0),
            backoff_factor_milli: AtomicU64::new((cfg.backoff.factor * 1000.0) as u64),
            next_backoff_ms: AtomicU64::new(cfg.backoff.initial.as_millis() as u64),
            healthy_after: cfg.healthy_after,
            first_backoff_ms: cfg.backoff.initial.min(cfg.backoff.max).as_millis() as u64,
            backoff_delay_us: AtomicU64::new(0),
            attempt_started_unix_us: AtomicU64::new(0),
            registered_unix_us: AtomicU64::new(0),
            recent_attempts: Mutex::new(VecDeque::new()),
            lost_unix_us: AtomicU64::new(0),
            refusal: Mutex::new(None),
            new_secret: Mutex::new(None),
        });
        Ok(Self {
            endpoint,
            runner: Arc::new(runner),
            outbox,
            shared,
            connector,
            boot_id,
            _scratch: scratch,
            rng: StdRng::seed_from_u64(seed),
            lost: restored.lost,
            lost_through: None,
            lost_settled: watch::Sender::new(false),
            heartbeat_seq: 0,
            state,
            ack_hook: None,
            events,
            warned_unauthenticated: false,
            warned_ack: Vec::new(),
            pace: None,
            grace: None,
            cfg,
        })
    }

    /// Calls `hook` for every acknowledgement received, with the acknowledged message.
    pub fn on_ack(
        mut self,
        hook: impl Fn(&Ack, Option<&WorkerMsg>) + Send + Sync + 'static,
    ) -> Self {
        self.ack_hook = Some(Arc::new(hook));
        self
    }

    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            shared: self.shared.clone(),
            outbox: self.outbox.clone(),
            runner: self.runner.clone(),
        }
    }

    /// The endpoint this agent connects to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Tasks this agent will report lost at its next registration.
    pub fn lost(&self) -> &[TaskRef] {
        &self.lost
    }

    /// Appends to the event log, when there is one.
    pub(crate) fn event(&self, event: Event) {
        if let Some(log) = &self.events {
            log.record(event);
        }
    }

    /// Runs until `shutdown`, a permanent refusal, or `max_reconnect_attempts` failures.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), AgentError> {
        self.event(Event::Started {
            boot_id: self.boot_id.clone(),
        });
        let forget = forget_lost_once_settled(
            self.state.clone().filter(|_| !self.lost.is_empty()),
            self.lost_settled.subscribe(),
        );
        // Orphans of tasks re-parent to a process that chose to adopt them (`reaper`): reaped until the tasks are
        // stopped, after the connection loop.
        let stop_reaping = CancellationToken::new();
        let reaping = crate::reaper::is_reaper()
            .then(|| tokio::spawn(crate::reaper::run(stop_reaping.clone())));
        // Told to stop while not connected, a worker holding something to hand back keeps
        // trying to reach the coordinator for `stop_reconnect` (a session then stops
        // properly, handing its tasks on at once); one holding nothing stops at once.
        // Polled beside the loop, not spawned: an agent aborted (a crash) leaves no task behind.
        let give_up = CancellationToken::new();
        let watch_stop = {
            let (stop, give_up) = (shutdown.clone(), give_up.clone());
            let (outbox, runner) = (self.outbox.clone(), self.runner.clone());
            let window = self.cfg.stop_reconnect;
            async move {
                stop.cancelled().await;
                if holds_work(&outbox, &runner) {
                    tokio::time::sleep(window).await;
                }
                give_up.cancel();
                std::future::pending::<std::convert::Infallible>().await
            }
        };
        let result = tokio::select! {
            r = self.connect_loop(&shutdown, &give_up) => r,
            never = forget => match never {},
            never = watch_stop => match never {},
        };
        self.runner.shutdown(SHUTDOWN_GRACE).await;
        stop_reaping.cancel();
        if let Some(reaping) = reaping {
            let _ = reaping.await;
        }
        match &result {
            Ok(()) => {
                self.shared.set_state(ConnState::Shutdown);
                tracing::info!(worker = %self.cfg.worker_id, "worker stopped");
            }
            Err(e) => {
                *self
                    .shared
                    .refusal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                self.shared.set_state(ConnState::Failed);
                tracing::error!(worker = %self.cfg.worker_id, error = %e, "worker stopped");
            }
        }
        result
    }

    /// Takes the secret given since the last connection, if any ([`AgentHandle::replace_secret`]),
    /// for the session about to register: the refusals counted under the old one start over.
    fn take_new_secret(&mut self, generation: u64, refusals: &mut u32) {
        let given = self
            .shared
            .new_secret
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(secret) = given else {
            return;
        };
        if self.cfg.secret.is_none() {
            tracing::warn!(worker = %self.cfg.worker_id, "a secret was given to a worker configured without one; it registers unsigned, as its endpoint says (restart it with a secret)");
            return;
        }
        self.cfg.secret = Some(secret);
        *refusals = 0;
        tracing::info!(worker = %self.cfg.worker_id, generation, "registering with the secret given since the last connection");
    }

    /// Connects, runs sessions and reconnects until `shutdown` (then, while it holds work and
    /// is not connected, until `give_up`: see [`Agent::run`]).
    async fn connect_loop(
        &mut self,
        shutdown: &CancellationToken,
        give_up: &CancellationToken,
    ) -> Result<(), AgentError> {
        let mut backoff = Backoff::new(self.cfg.backoff);
        // Refusals by the coordinator since the last registration, at the upgrade (401, 403:
        // counted in `dial`; an untrusted certificate is retried, never counted) or in the session (close 4001-4003,
        // `unauthorized`, `incompatible_protocol`). One may be a frame damaged on the wire (a
        // flipped bit in a signature reads as a wrong secret), a proxy's hiccup or a forgery;
        // the same refusal on several fresh connections is the coordinator's answer.
        let mut refusals = 0u32;
        let mut waited = Duration::ZERO;
        // Whether the path swallowed what was sent: the last registered session ended by the
        // liveness timeout (attempts then get a twin when unanswered for a delay, see `dial`).
        let mut silent = false;
        // A stop cuts short the backoff delay it finds under way, once.
        let mut hurried = false;
        loop {
            if shutdown.is_cancelled() {
                if give_up.is_cancelled() || !holds_work(&self.outbox, &self.runner) {
                    return Ok(());
                }
                if !std::mem::replace(&mut hurried, true) {
                    tracing::info!(worker = %self.cfg.worker_id, window_ms = self.cfg.stop_reconnect.as_millis() as u64, running = self.runner.running_count(), "stopping while not connected: trying to reach the coordinator to hand back what this worker holds");
                }
            }
            let dialed = self
                .dial(
                    &mut backoff,
                    waited,
                    silent,
                    &mut refusals,
                    (shutdown, &mut hurried),
                    give_up,
                )
                .await;
            let (ws, generation) = match dialed {
                Dialed::Open(ws, generation) => (ws, generation),
                Dialed::Refused(reason) => return Err(AgentError::Refused(reason)),
                Dialed::GaveUp(attempts) => return Err(AgentError::GaveUp { attempts }),
                Dialed::Shutdown => return Ok(()),
            };
            self.take_new_secret(generation, &mut refusals);
            let end = {
                let _live = LiveGuard::new(self.shared.clone());
                Session::new(self, *ws, generation)
                    .run(shutdown, give_up)
                    .await
            };
            // Only a registered session's silence: a registration answered late may be a
            // coordinator busy with a herd, whose handshakes a twin each would only add to.
            let dead = |reason: &str| crate::session::is_liveness_timeout(reason);
            silent = matches!(&end, SessionEnd::Lost { reason, .. } if dead(reason));
            let delay = match end {
                SessionEnd::Shutdown => {
                    // A registered session's time connected ends here too (the figures of a
                    // stopped worker are read after it stopped).
                    self.shared.stats().on_session_end();
                    return Ok(());
                }
                SessionEnd::Refused(reason) if refusals + 1 < self.cfg.refusals_before_stop => {
                    refusals += 1;
                    self.attempt_failed(generation, &reason);
                    tracing::warn!(worker = %self.cfg.worker_id, generation, %reason, refusals, stop_after = self.cfg.refusals_before_stop, "coordinator refused this worker; trying again in case the exchange was damaged");
                    self.failed(&mut backoff)
                }
                SessionEnd::Refused(reason) => return Err(AgentError::Refused(reason)),
                SessionEnd::NotRegistered(reason) => {
                    self.attempt_failed(generation, &reason);
                    self.failed(&mut backoff)
                }
                SessionEnd::Lost {
                    alive_for,
                    silent_for,
                    reason,
                } => {
                    self.shared.lost_unix_us.store(unix_us(), Ordering::Relaxed);
                    self.shared.stats().on_session_end();
                    self.event(Event::SessionLost {
                        generation,
                        dead: crate::session::is_liveness_timeout(&reason),
                        reason: reason.clone(),
                    });
                    metrics::counter!(m::SESSIONS_LOST).increment(1);
                    refusals = 0;
                    // alive_ms: registration to the last sign the link was whole (what
                    // `healthy_after` is held against); silent_ms: from then to the detection.
                    tracing::warn!(worker = %self.cfg.worker_id, generation, %reason, alive_ms = alive_for.as_millis() as u64, silent_ms = silent_for.as_millis() as u64, "session lost");
                    // Its attempt succeeded: `max_attempts` counts the attempts from here on.
                    let healthy = alive_for >= self.cfg.healthy_after;
                    Some(self.session_lost(&mut backoff, healthy))
                }
            };
            let Some(delay) = delay else {
                return Err(AgentError::GaveUp {
                    attempts: backoff.failed_attempts(),
                });
            };
            self.shared.set_state(ConnState::Disconnected);
            let stop_now = async {
                match hurried {
                    true => std::future::pending().await,
                    false => shutdown.cancelled().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = give_up.cancelled() => return Ok(()),
                // Back to the loop's top, which decides whether to try again at once.
                _ = stop_now => {}
            }
            waited = delay;
        }
    }
}

/// Whether the worker holds something a coordinator should be told of before it stops: a
/// running task, or a result, state, notice or checkpoint not yet acknowledged.
pub(crate) fn holds_work(outbox: &Outbox, runner: &Runner) -> bool {
    runner.running_count() > 0 || !outbox.holds_only_telemetry()
}

/// Records starts, checkpoints and ends of tasks in the state directory. A failed write is
/// logged: the task still runs, only its survival of a crash is at stake.
fn persist_runner(runner: Runner, sd: &Arc<StateDir>) -> Runner {
    let (on_start, on_checkpoint, on_finish) = (sd.clone(), sd.clone(), sd.clone());
    runner
        .with_start_hook(Arc::new(move |task, attempt, submit_seq| {
            if let Err(error) = on_start.task_started_as(task, attempt, submit_seq) {
                tracing::error!(task = %task, attempt = %attempt, %error, "could not record a running task");
            }
        }))
        .with_checkpoint_sink(Arc::new(move |task, cp| {
            if let Err(error) = on_checkpoint.store_checkpoint(task, cp) {
                tracing::error!(task = %task, checkpoint = %cp.id, %error, "could not store a checkpoint");
            }
        }))
        .with_finished_hook(Arc::new(move |task, attempt| {
            if let Err(error) = on_finish.task_finished(task, attempt) {
                tracing::error!(task = %task, attempt = %attempt, %error, "could not record the end of a task");
            }
        }))
}

/// Once the session forgot the lost tasks (the coordinator has them, and the replay that may
/// carry their checkpoints), the state directory forgets them too. Never completes.
async fn forget_lost_once_settled(
    state: Option<Arc<StateDir>>,
    mut settled: watch::Receiver<bool>,
) -> Infallible {
    if let Some(sd) = state
        && settled.wait_for(|s| *s).await.is_ok()
        && let Err(error) = sd.forget_lost()
    {
        tracing::error!(%error, "could not forget the tasks reported lost");
    }
    std::future::pending().await
}

/// Counts a connection as live for as long as it exists.
struct LiveGuard(Arc<AgentShared>);

impl LiveGuard {
    fn new(shared: Arc<AgentShared>) -> Self {
        let now = shared.live_connections.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_live_connections.fetch_max(now, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Class, Journal, Put};
    use crate::statedir::StateDir;
    use tether_proto::msg::{CheckpointFetch, TaskState, now};
    use tether_proto::{Attempt, CheckpointId, Seq, TaskId};

    /// Scratch directories of processes gone are removed, and the task processes recorded there
    /// killed; a live process's, and other names, are left alone.
    #[test]
    fn the_scratch_directories_of_processes_gone_are_removed() {
        let temp = tempfile::tempdir().expect("tempdir");
        // A pid past the kernel's largest (4194304): no process has it.
        let gone = temp.path().join(format!("{SCRATCH_PREFIX}4194305"));
        let live = temp
            .path()
            .join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        let other = temp.path().join(format!("{SCRATCH_PREFIX}notapid"));
        for d in [&gone, &live, &other] {
            std::fs::create_dir_all(d.join("b-x").join("tasks")).expect("mkdir");
            // As a worker makes its own, whatever the umask here.
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .expect("chmod");
        }
        // A task process the gone worker left running, recorded in its directory.
        let mut orphan = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::process_group(orphan.arg("300"), 0);
        let mut orphan = orphan.spawn().expect("spawn sleep");
        let pgid = nix::unistd::Pid::from_raw(orphan.id() as i32);
        let groups = gone.join("b-x").join(crate::executor::orphans::GROUPS_DIR);
        let record =
            crate::executor::orphans::record_file(&groups, &TaskId::parse("t").expect("id"));
        crate::executor::orphans::record(&record, pgid, "nonce:t:1");
        // The live one's lock is held (here by this process), as its process holds it.
        let _held = LockFile::acquire(&live).expect("lock");
        remove_dead_scratch(temp.path());
        assert!(!gone.exists());
        assert!(live.exists() && other.exists());
        let status = orphan.wait().expect("reap");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }

    /// A process group of its own running `sleep 300`, and its id.
    fn sleeper() -> (std::process::Child, nix::unistd::Pid) {
        let mut cmd = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::process_group(cmd.arg("300"), 0);
        let child = cmd.spawn().expect("spawn sleep");
        let pgid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        (child, pgid)
    }

    /// A directory named like a gone worker's scratch directory, holding a record of `pgid`'s
    /// group as a worker writes one.
    fn planted(dir: &std::path::Path, pgid: nix::unistd::Pid) {
        let groups = dir.join("b-x").join(crate::executor::orphans::GROUPS_DIR);
        std::fs::create_dir_all(&groups).expect("mkdir");
        let record =
            crate::executor::orphans::record_file(&groups, &TaskId::parse("x").expect("id"));
        crate::executor::orphans::record(&record, pgid, "nonce:x:1");
    }

    /// The temporary directory is shared: another user can make a directory named like a dead
    /// worker's there, writable by all, or a link of that name to one, with a record naming
    /// the victim's process group. The sweep leaves such entries alone, and the group runs on
    /// (the sweep killed it, trusting the record).
    #[test]
    fn the_sweep_leaves_alone_scratch_directories_others_could_have_planted() {
        use std::os::unix::fs::PermissionsExt;
        let temp = tempfile::tempdir().expect("tempdir");
        let (mut victim, pgid) = sleeper();
        let open = temp.path().join(format!("{SCRATCH_PREFIX}4194305"));
        planted(&open, pgid);
        std::fs::set_permissions(&open, PermissionsExt::from_mode(0o777)).expect("chmod");
        // A link of the right name to a directory that would pass every other check.
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let real = elsewhere.path().join("real");
        planted(&real, pgid);
        std::fs::set_permissions(&real, PermissionsExt::from_mode(0o700)).expect("chmod");
        let link = temp.path().join(format!("{SCRATCH_PREFIX}4194306"));
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        remove_dead_scratch(temp.path());
        assert!(
            matches!(victim.try_wait(), Ok(None)),
            "the process group a planted record named was killed"
        );
        assert!(open.join("b-x").exists(), "the open directory was swept");
        assert!(real.join("b-x").exists(), "the linked directory was swept");
        let _ = victim.kill();
        let _ = victim.wait();
    }

    /// A scratch directory's lock file linked to a file of this user's (its `~/.bashrc`): the
    /// lock is not taken through the link, so the file keeps its bytes, and the directory is
    /// left alone.
    #[test]
    fn the_sweep_does_not_follow_a_lock_file_that_is_a_link() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().join(format!("{SCRATCH_PREFIX}4194305"));
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");
        let home = tempfile::tempdir().expect("tempdir");
        let bashrc = home.path().join(".bashrc");
        std::fs::write(&bashrc, "alias ll='ls -l'\n").expect("write");
        std::os::unix::fs::symlink(&bashrc, dir.join(crate::statedir::LOCK_FILE)).expect("symlink");
        remove_dead_scratch(temp.path());
        assert_eq!(
            std::fs::read_to_string(&bashrc).expect("read"),
            "alias ll='ls -l'\n"
        );
        assert!(dir.exists(), "the directory was swept");
    }

    /// The messages and fields of the events at WARN or above that `f` logs on this thread.
    fn warnings_of(f: impl FnOnce()) -> Vec<String> {
        use tracing::span::{Attributes, Id, Record};
        struct Warnings(Arc<Mutex<Vec<String>>>);
        impl tracing::Subscriber for Warnings {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &Attributes<'_>) -> Id {
                Id::from_u64(1)
            }
            fn record(&self, _: &Id, _: &Record<'_>) {}
            fn record_follows_from(&self, _: &Id, _: &Id) {}
            fn event(&self, event: &tracing::Event<'_>) {
                if *event.metadata().level() <= tracing::Level::WARN {
                    let mut text = String::new();
                    event.record(&mut |f: &tracing::field::Field, v: &dyn std::fmt::Debug| {
                        text.push_str(&format!("{}={v:?} ", f.name()));
                    });
                    self.0.lock().unwrap_or_else(|p| p.into_inner()).push(text);
                }
            }
            fn enter(&self, _: &Id) {}
            fn exit(&self, _: &Id) {}
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Warnings(seen.clone()), f);
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.clone()
    }

    /// On a machine shared by several users, each one's workers leave scratch directories in
    /// the one `/tmp`: another user's is passed over without a warning (every start warned of
    /// each), and left alone; one of this user's that is not as a worker makes it still warns.
    #[test]
    fn the_sweep_passes_over_other_users_scratch_directories_without_a_warning() {
        use std::os::unix::fs::PermissionsExt;
        let temp = tempfile::tempdir().expect("tempdir");
        let theirs = temp.path().join(format!("{SCRATCH_PREFIX}4194305"));
        std::fs::create_dir_all(theirs.join("b-x")).expect("mkdir");
        std::fs::set_permissions(&theirs, PermissionsExt::from_mode(0o700)).expect("chmod");
        let me = nix::unistd::geteuid().as_raw();
        // Swept as another user: the directory is someone else's.
        let warned = warnings_of(|| sweep_scratch(temp.path(), me.wrapping_add(1)));
        assert_eq!(warned, Vec::<String>::new());
        assert!(
            theirs.join("b-x").exists(),
            "another user's directory was swept"
        );
        // This user's, open to all: a warning, and left alone.
        std::fs::set_permissions(&theirs, PermissionsExt::from_mode(0o777)).expect("chmod");
        let warned = warnings_of(|| sweep_scratch(temp.path(), me));
        assert!(
            warned.len() == 1 && warned[0].contains("writable by its group or others"),
            "{warned:?}"
        );
        assert!(theirs.join("b-x").exists(), "an open directory was swept");
    }

    /// A child process (`sleep 300`) holding the lock of `dir`, as its worker process would:
    /// it opens and locks the lock file itself, between its fork and its exec (no descriptor
    /// of this process, which other tests' children could inherit).
    fn locked_by_child(dir: &std::path::Path) -> std::process::Child {
        let lock = dir.join(crate::statedir::LOCK_FILE);
        std::fs::File::create(&lock).expect("lock file");
        let path = std::ffi::CString::new(lock.as_os_str().as_encoded_bytes()).expect("path");
        let mut sleep = std::process::Command::new("sleep");
        sleep.arg("300");
        // SAFETY: between fork and exec the closure makes only open and flock calls, which are
        // async-signal-safe, and allocates nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut sleep, move || {
                let fd = nix::libc::open(path.as_ptr(), nix::libc::O_RDWR);
                if fd < 0 || nix::libc::flock(fd, nix::libc::LOCK_EX | nix::libc::LOCK_NB) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        sleep.spawn().expect("spawn")
    }

    /// A scratch directory its process let go but could not empty stays as
    /// `tether-worker-<pid>.gone`, unlocked: the next sweep removes it as a dead process's
    /// (sweeps passed over the name, so it stayed for good). One whose lock its process still
    /// holds (removing it) is left alone until that process exits. One being made (`.new`,
    /// locked only once made) is left alone while a process has its pid, and swept once none
    /// has (a process killed while making it left it, and sweeps passed over the name).
    #[test]
    fn a_scratch_directory_left_being_removed_is_swept_once_its_lock_is_free() {
        let temp = tempfile::tempdir().expect("tempdir");
        // Pids past the kernel's largest (4194304): no process has them.
        let left = temp.path().join(format!("{SCRATCH_PREFIX}4194305{GOING}"));
        let held = temp.path().join(format!("{SCRATCH_PREFIX}4194306{GOING}"));
        let orphan = temp.path().join(format!("{SCRATCH_PREFIX}4194307{YOUNG}"));
        let young = temp
            .path()
            .join(format!("{SCRATCH_PREFIX}{}{YOUNG}", std::process::id()));
        for d in [&left, &held, &orphan, &young] {
            std::fs::create_dir_all(d.join("b-x").join("tasks")).expect("mkdir");
            // As a worker makes its own, whatever the umask here.
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .expect("chmod");
        }
        // The lock file its process left, unlocked.
        std::fs::write(left.join(crate::statedir::LOCK_FILE), "4194305 1").expect("lock file");
        let mut owner = locked_by_child(&held);
        remove_dead_scratch(temp.path());
        assert!(!left.exists(), "a leftover whose lock is free stayed");
        assert!(
            held.join("b-x").exists(),
            "one whose process holds its lock was swept"
        );
        assert!(young.join("b-x").exists(), "one being made was swept");
        assert!(!orphan.exists(), "one a dead process was making stayed");
        owner.kill().expect("kill");
        owner.wait().expect("reap");
        remove_dead_scratch(temp.path());
        assert!(!held.exists(), "kept once its process exited");
        assert!(young.join("b-x").exists(), "one being made was swept");
    }

    /// A directory is kept while the process that locked it runs, and is the next one's once
    /// that process is killed, even before its parent reaps it (a zombie holds no lock): a
    /// worker restarted at once after a `kill -9` cleans up after it.
    #[test]
    fn a_scratch_directory_is_kept_while_its_process_runs_and_freed_by_its_kill() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path().join(format!("{SCRATCH_PREFIX}77"));
        std::fs::create_dir(&dir).expect("mkdir");
        let mut child = locked_by_child(&dir);
        remove_dead_scratch(temp.path());
        assert!(dir.exists(), "kept while its process runs");
        child.kill().expect("kill");
        // Not reaped: a zombie, whose descriptors are closed.
        std::thread::sleep(std::time::Duration::from_millis(200));
        remove_dead_scratch(temp.path());
        assert!(!dir.exists(), "freed by the kill");
        child.wait().expect("reap");
    }

    /// A fetch journaled by a process that died answers to no attempt of the next one: it is
    /// neither sent again nor kept in the journal; the rest of the outbox is.
    #[test]
    fn a_fetch_left_by_a_previous_process_is_dropped_and_the_rest_restored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = WorkerId::parse("w").expect("id");
        let task = TaskId::parse("t").expect("id");
        let state = WorkerMsg::TaskState(TaskState {
            seq: Seq(1),
            task_id: task.clone(),
            attempt: Attempt(1),
            state: serde_json::json!({"step": 1}).into(),
            timestamp: now(),
        });
        let fetch = WorkerMsg::CheckpointFetch(CheckpointFetch {
            seq: Seq(2),
            task_id: task,
            attempt: Attempt(2),
            checkpoint_id: CheckpointId::parse("c").expect("id"),
            offset: 0,
            len: 10,
            timestamp: now(),
        });
        {
            let (sd, _) = StateDir::open(dir.path(), &id).expect("open");
            sd.write(Some(Put::new(Class::State, Seq(1), &state)), &[])
                .expect("write");
            sd.write(Some(Put::new(Class::Notice, Seq(2), &fetch)), &[])
                .expect("write");
        }
        let mut cfg = WorkerConfig::new("ws://127.0.0.1:1", id.clone());
        cfg.state_dir = Some(dir.path().to_owned());
        let agent = Agent::new(cfg, Executors::builtin()).expect("agent");
        let held: Vec<Seq> = agent.outbox.snapshot().iter().map(|(_, s, _)| *s).collect();
        assert_eq!(held, [Seq(1)]);
        drop(agent);
        let (_sd, restored) = StateDir::open(dir.path(), &id).expect("reopen");
        assert_eq!(restored.entries, vec![(Class::State, state)]);
    }
}
