//! Durable state in an embedded SQLite database (WAL mode) in the data directory.
//!
//! One writer thread owns the connection. The core hands it batches of [`Mutation`]s together
//! with the effects (acks, assignments, API replies) that may only happen once those mutations
//! are durable; the writer drains every batch that is waiting, commits them in one transaction
//! (group commit), then runs their effects in order. Reads that must be ordered with later
//! commits (a checkpoint handed out with an assignment) run as effects on the same connection;
//! the API's reads of committed data go to a reader thread with a connection of its own
//! (`read`) once their group committed, so that they see what was acknowledged without
//! holding up the commits behind them. Task states go to a journal file of their own before
//! the group's commit, and between groups the writer folds a bounded piece of them into the
//! database (`states`); a thread with a connection of its own copies the WAL into the
//! database (`wal`).

mod lock;
mod read;
mod schema;
pub mod space;
mod states;
mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use tether_proto::msg::CoordMsg;
use tether_proto::{Attempt, CheckpointId, Outcome, Seq, TaskId, WorkerId};
use tokio_util::sync::CancellationToken;

use crate::core::{Outgoing, SessionRef};
use crate::model::{CheckpointMeta, Task, Worker};

pub use schema::SCHEMA_VERSION;
pub use states::{FOLD_BYTES, FOLD_EVERY, PIECE_STATES, Unfolded, WriteError};
pub use wal::{CATCH_UP_EVERY, CHECKPOINT_EVERY, WAL_RESTART_FRAMES};

pub use lock::{DirLock, LOCK_FILE, lock_dir};
use read::Reader;
use states::{Op, States};
use wal::Checkpointer;

/// Most batches committed in one transaction by the writer (group commit).
pub const MAX_GROUP: usize = 256;
/// The writer's group commit window. Under a flood of 100,000 messages/s a window of 1 ms made a
/// fifth of the commits of none, with 120-170 mutations each instead of 23-31 (each commit
/// rewrites the WAL's last page and the pages around it). 250 µs keeps most of that (909
/// commits a second of 109 mutations, against 596 of 167 at 1 ms and 3,284 of 30 with none;
/// coordinator CPU a message 6.1-7.2 µs against 6.1-7.4 in six interleaved pairs at that rate,
/// 4.9-6.2 against 5.0-6.0 in four at the top rate) and takes a millisecond or two off the
/// slowest acknowledgements at that rate (p99 10.4-13.7 ms against 12.6-18.6 in the six pairs;
/// docs/PERFORMANCE.md, twenty-seventh round).
pub const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_micros(250);

/// Name of the database file in the data directory.
pub const DB_FILE: &str = "tether.db";

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {path}: {source}{}", access_hint(path, source))]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is missing beside {}: the database was not closed cleanly, and its write-ahead log, which holds its latest commits (acknowledged tasks and results among them), was removed; refusing to start without them (put the -wal file back; to start without those commits, remove {})",
        wal.display(),
        shm.display(),
        shm.display()
    )]
    WalMissing { wal: PathBuf, shm: PathBuf },
    /// A file of the data directory that could not be opened or read: not corrupt, and not to
    /// be moved away for it (a file made by another user, a mode changed).
    #[error("cannot open {path}: {source}{}", access_hint(path, source))]
    Access {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this coordinator's {supported}; refusing to touch it (upgrade tether)"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "database {path} is corrupt ({detail}); refusing to touch it (restore a backup or move it away, either way with its -wal and -shm files and the states-*.journal files beside it)"
    )]
    Corrupt { path: PathBuf, detail: String },
    /// The database is gone (or empty) while files that belong with it are still there: its
    /// `-wal` or `-shm` with something in them, or state journals (what the operator left
    /// when moving a refused database away alone).
    #[error(
        "database {} is {}, yet {} beside it hold its latest commits or task states, which a new database would drop (the journals replayed into no task and removed, the -wal deleted by SQLite); refusing to start, with nothing touched (put that database back; to start empty, or from a backup, move these files away too)",
        db.display(),
        if *empty { "empty" } else { "missing" },
        file_names(leftovers)
    )]
    Leftovers {
        db: PathBuf,
        /// The database file is there with nothing in it (else it is missing).
        empty: bool,
        leftovers: Vec<PathBuf>,
    },
    #[error(
        "state journal {path} is corrupt ({detail}); refusing to start (move it away to start without the task states it holds)"
    )]
    CorruptJournal { path: PathBuf, detail: String },
    #[error("database {path}: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database {path} holds a record that cannot be read: {detail}")]
    BadRecord { path: PathBuf, detail: String },
    #[error(
        "data directory {path} is in use by another coordinator{}; two on one directory would take each other's workers for lost and number tasks twice (stop it, or give another --data-dir)",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { path: PathBuf, holder: Option<u32> },
    /// The data directory is out of space (a full file system, a quota reached): an open
    /// waits for room ([`open_until`]) and returns this only when stopped meanwhile.
    #[error(
        "database {}: the data directory is out of space ({source}); the store cannot be opened without room, and the coordinator was stopped while waiting for it, with nothing changed (free space, and start it again)",
        path.display()
    )]
    OutOfSpace { path: PathBuf, source: WriteError },
}

/// The files' names, for a message that names the directory already.
fn file_names(files: &[PathBuf]) -> String {
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.file_name()
                .unwrap_or(f.as_os_str())
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.join(", ")
}

/// What to look at when `source` is a permission refused on `path`: its owner and mode, and
/// who this process runs as (a coordinator started once as root leaves files only root can
/// open). The file itself may well be intact.
fn access_hint(path: &Path, source: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt;
    if source.kind() != std::io::ErrorKind::PermissionDenied {
        return String::new();
    }
    // The owner of /proc/self is the process's effective user.
    let me = std::fs::metadata("/proc/self").map_or_else(|_| "?".into(), |m| m.uid().to_string());
    match std::fs::metadata(path) {
        Ok(m) => format!(
            " (owner uid {}, mode {:o}; this process runs as uid {me}: fix the owner or the mode, the file is not said to be damaged)",
            m.uid(),
            m.mode() & 0o7777
        ),
        Err(_) => format!(
            " (this process runs as uid {me}: check the owner and mode of it and of the directories above it)"
        ),
    }
}

/// One durable change.
#[derive(Debug)]
pub enum Mutation {
    /// A task that is not in the store yet (a submission): its spec and its changing part.
    InsertTask(Box<Task>),
    /// A change of a stored task: only its changing part is written (inserted whole when it
    /// is not there, e.g. when its `InsertTask` was superseded in the same group).
    PutTask(Box<Task>),
    /// Removes a finished task and everything of it, and remembers its id with its last
    /// attempt and the time (`removed_tasks`), so that a later task of the id numbers its
    /// attempts after.
    DeleteTask {
        id: TaskId,
        last_attempt: Attempt,
        at: DateTime<Utc>,
    },
    /// Forgets the ids of tasks removed before `before` (`removed_tasks`).
    ForgetRemoved {
        before: DateTime<Utc>,
    },
    PutResult {
        task_id: TaskId,
        attempt: Attempt,
        worker: WorkerId,
        outcome: Outcome,
        stale: bool,
        body: String,
    },
    PutState {
        task_id: TaskId,
        attempt: Attempt,
        /// The text as received, shared with the message: not copied.
        state: tether_proto::msg::StateJson,
    },
    PutCheckpoint {
        meta: CheckpointMeta,
        complete: bool,
    },
    PutChunk {
        checkpoint_id: CheckpointId,
        idx: u32,
        data: Vec<u8>,
    },
    DeleteCheckpoint(CheckpointId),
    /// A complete checkpoint pruned while `attempt`'s lease runs: its pieces go, its row stays
    /// (`complete = 2`, under that attempt) so that a replay of it is known after a restart.
    SupersedeCheckpoint {
        checkpoint_id: CheckpointId,
        attempt: Attempt,
    },
    /// The superseded checkpoints of a task go (its lease ended).
    ForgetSuperseded(TaskId),
    PutWorker(Box<Worker>),
    /// A worker's record removed (retention of lost workers).
    DeleteWorker(WorkerId),
    /// The next submission number is at least this (written when tasks are removed: the
    /// stored tasks then may not show the highest number given).
    NextSubmitSeq(u64),
    /// The coordinator was running, with its workers' sessions open, at this time (written
    /// every few seconds while a worker is connected, and at a clean stop): after a crash
    /// it is when the workers it had connected were last known to be there.
    AliveAt(DateTime<Utc>),
}

/// Runs after its batch is committed, on the writer's connection (an effect) or the reader's
/// (a read).
pub type Job = Box<dyn FnOnce(&Connection) + Send>;

/// What happens once a batch is committed, in order.
pub enum Effect {
    /// A job on the writer's connection.
    Run(Job),
    /// Messages for one session, handed over together: a frame's acknowledgements take one
    /// turn of the session's mailbox (one lock, one wakeup) instead of one each, and no job is
    /// boxed for each.
    Send(SessionRef, Vec<Outgoing>),
}

impl Effect {
    pub fn run(self, conn: &Connection) {
        match self {
            Effect::Run(job) => job(conn),
            Effect::Send(to, msgs) => to.send_all(msgs),
        }
    }
}

/// Mutations and what waits for them.
#[derive(Default)]
pub struct Batch {
    pub muts: Vec<Mutation>,
    /// Run in order on the writer's connection once the batch is committed.
    pub effects: Vec<Effect>,
    /// Reads of committed data that need no order with later commits (the API's): handed to
    /// the reader thread once the batch is committed (run on the writer's connection when
    /// there is no reader).
    pub reads: Vec<Job>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.muts.is_empty() && self.effects.is_empty() && self.reads.is_empty()
    }

    /// Runs `job` on the writer's connection once the batch is committed, after the effects
    /// queued before it.
    pub fn effect(&mut self, job: impl FnOnce(&Connection) + Send + 'static) {
        self.effects.push(Effect::Run(Box::new(job)));
    }

    /// Sends `msg` to `session` once the batch is committed, after the effects queued before
    /// it: with the messages queued for the same session just before, when nothing came
    /// between.
    pub fn send(&mut self, session: &SessionRef, msg: CoordMsg) {
        self.send_out(session, Outgoing::Msg(Box::new(msg)));
    }

    /// Closes `session` with `code` and `reason` once the batch is committed, after what was
    /// queued for it before.
    pub fn close(&mut self, session: &SessionRef, code: u16, reason: impl Into<String>) {
        self.send_out(session, Outgoing::close(code, reason));
    }

    /// Acknowledges recorded message `seq` to `session` by its number ([`Outgoing::Recorded`]),
    /// in order with what [`Batch::send`] queues.
    pub fn send_recorded(&mut self, session: &SessionRef, seq: Seq) {
        self.send_out(session, Outgoing::Recorded(seq));
    }

    fn send_out(&mut self, session: &SessionRef, out: Outgoing) {
        match self.effects.last_mut() {
            Some(Effect::Send(to, queued)) if to.id == session.id => queued.push(out),
            _ => self.effects.push(Effect::Send(session.clone(), vec![out])),
        }
    }

    /// Nothing in the batch needs the store: no mutation, no read, no job on the writer's
    /// connection; only messages for sessions.
    fn only_messages(&self) -> bool {
        self.muts.is_empty()
            && self.reads.is_empty()
            && self.effects.iter().all(|e| matches!(e, Effect::Send(..)))
    }
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub commits: AtomicU64,
    pub mutations: AtomicU64,
    pub commit_micros: AtomicU64,
    /// Batches whose effects have run (counted after them, see [`Handoff`]).
    pub batches: AtomicU64,
    /// Batches of messages only, delivered by the core itself while the writer had nothing
    /// unfinished ([`Handoff`]).
    pub delivered_directly: AtomicU64,
    /// A commit waits for space in the data directory ([`space`]).
    pub out_of_space: std::sync::atomic::AtomicBool,
    /// Times commits began to wait for space.
    pub stalls: AtomicU64,
    /// Fold rounds of the task states that could not make or remove a journal file (tried
    /// again a second later: [`WriteError::Fold`]).
    pub fold_failures: AtomicU64,
    /// When the writer took the group it is working on, in microseconds since [`epoch`] plus
    /// one; 0 while it waits for work. Read by sessions ([`StoreStats::held_for`]).
    group_began: AtomicU64,
}

/// The instant the writer's group times count from.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl StoreStats {
    /// How long the writer has been on its current group (its commit, and the acknowledgements
    /// after it), if it is on one: a commit held up (out of space, a disk that does not answer)
    /// holds every acknowledgement behind it, and a session then tells its worker that the
    /// coordinator is alive and has what was sent (`ws`), or the worker would take the missing
    /// acknowledgements for a link that lost its frames and reconnect. One atomic load.
    pub fn held_for(&self) -> Option<Duration> {
        let began = self.group_began.load(Ordering::Relaxed).checked_sub(1)?;
        let now = epoch().elapsed().as_micros() as u64;
        Some(Duration::from_micros(now.saturating_sub(began)))
    }

    pub(crate) fn group_begins(&self) {
        let began = epoch().elapsed().as_micros() as u64;
        self.group_began.store(began + 1, Ordering::Relaxed);
    }

    pub(crate) fn group_ends(&self) {
        self.group_began.store(0, Ordering::Relaxed);
    }
}

/// The core's end of the writer's queue.
///
/// A batch with nothing for the store (an acknowledgement of telemetry whose statistics are not
/// due to be saved, say) would still cross to the writer's thread and back, two thread wakeups,
/// only to keep its messages behind those of earlier batches. It counts the batches it hands
/// over; the writer counts those whose effects have run ([`StoreStats::batches`], after them).
/// When the two agree, every message queued before is in its session's mailbox, and a batch
/// of messages only is delivered here and now: it overtakes nothing.
pub struct Handoff {
    tx: tokio::sync::mpsc::Sender<Batch>,
    stats: Arc<StoreStats>,
    handed: u64,
}

impl Handoff {
    /// `stats` must be the writer's (`spawn_writer`), and nothing else may send to `tx`.
    pub fn new(tx: tokio::sync::mpsc::Sender<Batch>, stats: Arc<StoreStats>) -> Self {
        Self {
            tx,
            stats,
            handed: 0,
        }
    }

    /// Hands `b` to the writer, or delivers its messages at once (see [`Handoff`]). Fails
    /// when the writer is gone.
    pub async fn pass(&mut self, b: Batch) -> Result<(), Batch> {
        if b.only_messages() && self.stats.batches.load(Ordering::Acquire) == self.handed {
            for effect in b.effects {
                if let Effect::Send(to, msgs) = effect {
                    to.send_all(msgs);
                }
            }
            self.stats
                .delivered_directly
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::STORE_DIRECT).increment(1);
            return Ok(());
        }
        self.tx.send(b).await.map_err(|e| e.0)?;
        self.handed += 1;
        Ok(())
    }
}

/// What was in the database at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub tasks: Vec<Task>,
    pub workers: Vec<Worker>,
    /// Checkpoints whose pieces have not all arrived, with the pieces that did and their bytes.
    pub partial_checkpoints: Vec<(CheckpointMeta, Vec<u32>, u64)>,
    /// Complete checkpoints, oldest first.
    pub complete_checkpoints: Vec<(TaskId, CheckpointId)>,
    /// Complete checkpoints pruned while their task's lease runs (pieces deleted, the row
    /// kept so that a replay is known), oldest first, with that lease's attempt.
    pub superseded_checkpoints: Vec<(TaskId, CheckpointId, Attempt)>,
    /// The next submission number kept when tasks were removed (0 if none was).
    pub next_submit_seq: u64,
    /// Ids of tasks removed by retention, with their last attempt and when, oldest first.
    pub removed: Vec<(String, Attempt, DateTime<Utc>)>,
    /// The last [`Mutation::AliveAt`] the previous run wrote.
    pub alive_at: Option<DateTime<Utc>>,
    /// The task states the writer has journaled and not yet folded into the database (empty
    /// at open: the journal was replayed); the writer fills it, the API's reads look in it.
    pub unfolded: Arc<Unfolded>,
}

/// What an acknowledged commit survives (docs/OPERATIONS.md, "Durability").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The death of the coordinator's process (SQLite `synchronous = NORMAL`: the WAL is
    /// written before the ack and synced at each checkpoint pass, every 100 ms).
    #[default]
    Process,
    /// Also a crash of the machine or a power loss (`synchronous = FULL`: one fsync of the WAL
    /// per group commit, before its acks).
    Machine,
}

impl Durability {
    /// Its name, as `--durability` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Process => "process",
            Durability::Machine => "machine",
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Durability::Process, Durability::Machine]
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| format!("unknown durability {s:?}: expected `process` or `machine`"))
    }
}

/// Sets what the commits of the writer's connection `conn` survive.
pub fn set_durability(conn: &Connection, d: Durability) -> rusqlite::Result<()> {
    conn.execute_batch(match d {
        Durability::Process => "PRAGMA synchronous = NORMAL;",
        Durability::Machine => "PRAGMA synchronous = FULL;",
    })
}

/// Creates the data directory if need be, for the coordinator's user alone: the store holds
/// task specs (their `env` often carries credentials), output tails and checkpoints. On a full
/// disk (a directory takes an inode, and on most file systems a block) or a quota reached,
/// [`StoreError::OutOfSpace`]: nothing was made, and it may be tried again ([`lock_and_open`]
/// waits for room).
fn make_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    let made = match dir.exists() && !dir.is_dir() {
        true => Err(std::io::Error::other("it exists and is not a directory")),
        false => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
    };
    made.map_err(|source| match space::io_out_of_space(&source) {
        true => StoreError::OutOfSpace {
            path: dir.to_owned(),
            source: WriteError::Dir(source),
        },
        false => StoreError::DataDir {
            path: dir.to_owned(),
            source,
        },
    })
}

/// Makes the data directory `dir` if need be, locks it ([`lock_dir`]) and opens the store in
/// it ([`open_watched`]), waiting for space for each step as the open does: a directory or a
/// lock file that cannot be made on a full disk (no inode or block for it) is tried again
/// until there is room (or until `stop`), with the same log lines and the same
/// [`StoreError::OutOfSpace`] when stopped, and `stats` saying meanwhile that the start waits
/// (every request answered `503 starting`). Failing at once there stopped the coordinator on
/// a full disk whose data directory was not made yet, where one whose directory was there
/// waited for room.
pub fn lock_and_open(
    dir: &Path,
    stop: &CancellationToken,
    stats: &StoreStats,
) -> Result<(DirLock, Connection, Loaded), StoreError> {
    let db = dir.join(DB_FILE);
    let mut wait = space::OpenWait::new(&db, stats, stop);
    let lock = wait.retry(|| lock_dir(dir))?;
    let (conn, loaded) = open_waiting(dir, wait)?;
    Ok((lock, conn, loaded))
}

/// Opens (creating if needed) the database in `dir`, checks and migrates it, and loads it,
/// waiting for space as long as it takes ([`open_until`], never stopped).
/// A coordinator locks the directory first ([`lock_dir`]).
pub fn open(dir: &Path) -> Result<(Connection, Loaded), StoreError> {
    open_until(dir, &CancellationToken::new())
}

/// Like [`open`], waiting for space until `stop`. Each step that fails for want of space
/// (reading the database makes its WAL index; the replay of the state journals writes
/// `task_state`; a migration) is tried again, pausing as the writer's commits do
/// ([`space`]), until it goes through; every step is one that changes nothing when it fails
/// so. Stopped during a wait, it returns [`StoreError::OutOfSpace`], with nothing changed.
pub fn open_until(
    dir: &Path,
    stop: &CancellationToken,
) -> Result<(Connection, Loaded), StoreError> {
    open_watched(dir, stop, &StoreStats::default())
}

/// Like [`open_until`], saying in `stats` whether the open waits for space
/// ([`StoreStats::out_of_space`]), for the answers served meanwhile.
pub fn open_watched(
    dir: &Path,
    stop: &CancellationToken,
    stats: &StoreStats,
) -> Result<(Connection, Loaded), StoreError> {
    let db = dir.join(DB_FILE);
    open_waiting(dir, space::OpenWait::new(&db, stats, stop))
}

/// The steps of [`open_watched`], each tried again by `wait` while it fails for space.
fn open_waiting(dir: &Path, mut wait: space::OpenWait) -> Result<(Connection, Loaded), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(DB_FILE);
    wait.retry(|| make_dir(dir))?;
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the data directory is open to other users; it holds task specs, output and checkpoints (chmod 700)");
    }
    tighten_files(dir);
    refuse_leftovers(dir, &path)?;
    let found =
        wait.retry(|| schema::check(&path).map_err(|e| space::cannot_open_for_space(&path, e)))?;
    // What a previous process journaled and did not fold yet (read before the database is
    // opened for writing: a corrupt journal is refused with the database untouched).
    let journaled = states::read_journals(dir, found >= schema::WHOLE_JOURNALS)?;
    // A try that made the database and failed for want of space removes it again while it is
    // empty, so that it changed nothing: left, a stop during the wait (a first start on a full
    // disk) left an empty file, which the next start refused as a corrupt database.
    let conn = wait.retry(|| {
        let new = !path.exists();
        schema::open_checked(&path, schema::WHOLE_JOURNALS - 1).map_err(|e| {
            let e = space::cannot_open_for_space(&path, e);
            if new && matches!(e, StoreError::OutOfSpace { .. }) {
                remove_if_empty(&path);
            }
            e
        })
    })?;
    wait.retry(|| states::replay(&conn, dir, &journaled))?;
    // Only once the journals an older coordinator made are gone (durably: `replay` syncs the
    // directory) does the database say that every journal beside it is created whole.
    wait.retry(|| schema::migrate(&conn, &path, SCHEMA_VERSION))?;
    // One line for the steps of both calls (a new database takes every one).
    if found < SCHEMA_VERSION {
        tracing::info!(db = %path.display(), from = found, to = SCHEMA_VERSION, steps = SCHEMA_VERSION - found, "database migrated");
    }
    let loaded = wait.retry(|| {
        load(&conn).map_err(|e| match e {
            LoadError::Sql(source) => {
                space::or_out_of_space(&conn, &path, source, |source| StoreError::Sql {
                    path: path.clone(),
                    source,
                })
            }
            LoadError::Json(detail) => StoreError::BadRecord {
                path: path.clone(),
                detail,
            },
        })
    })?;
    wait.done();
    Ok((conn, loaded))
}

/// The mode of every file the store makes in the data directory: its user's alone, whatever
/// the umask. The files hold task specs (their `env` often carries credentials), output tails
/// and checkpoints; a data directory made by a package (`/var/lib/tether`, 0755) is all that
/// kept them from other local users when they were made 0644.
pub(super) const FILE_MODE: u32 = 0o600;

/// Whether `name` is a file the store makes in the data directory: the database with its
/// `-wal` and `-shm`, the lock file, a state journal (or one being made).
fn made_by_store(name: &str) -> bool {
    let journal = name
        .strip_prefix("states-")
        .and_then(|n| {
            n.strip_suffix(".journal.tmp")
                .or(n.strip_suffix(".journal"))
        })
        .is_some_and(|g| g.parse::<u64>().is_ok());
    journal || [DB_FILE, "tether.db-wal", "tether.db-shm", LOCK_FILE].contains(&name)
}

/// Takes group and other access off the store's files in `dir` that have it (made by a version
/// that created them 0644 under the usual umask, or changed by hand), each said at WARN with
/// its old mode. Tightened rather than only warned of: an upgrade would otherwise leave every
/// existing deployment's task specs readable until someone acts on a log line, and no other
/// user has a reason to read these files (a backup runs as the coordinator's user or as root).
/// One that cannot be changed (another owner) is warned of and left: the open goes on, and
/// says of a file it cannot open whose it is ([`StoreError::Access`]).
fn tighten_files(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        // The open that follows names what is wrong with the directory.
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_str().is_some_and(made_by_store) {
            continue;
        }
        // Not following a link: the store never makes one, and a chmod through it would
        // change a file elsewhere.
        let Ok(meta) = entry.metadata() else { continue };
        let mode = meta.permissions().mode() & 0o7777;
        if !meta.is_file() || mode & 0o077 == 0 {
            continue;
        }
        let path = entry.path();
        match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(FILE_MODE)) {
            Ok(()) => {
                tracing::warn!(file = %path.display(), was = format!("{mode:o}"), now = format!("{FILE_MODE:o}"), "a file of the data directory was open to other users (it holds task specs, whose env may carry credentials, and their output); made private to this user");
            }
            Err(error) => {
                tracing::warn!(file = %path.display(), mode = format!("{mode:o}"), %error, "a file of the data directory is open to other users (it holds task specs, whose env may carry credentials, and their output) and cannot be made private: chmod 600 it");
            }
        }
    }
}

/// Removes the file at `path` if it is empty (a database made by a try that failed).
fn remove_if_empty(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0)
        && let Err(error) = std::fs::remove_file(path)
    {
        tracing::warn!(db = %path.display(), %error, "could not remove the empty database a failed open made; the next start refuses it as corrupt (delete it)");
    }
}

/// Refuses a data directory whose database at `db` is missing or empty while files that
/// belong with it are still there ([`StoreError::Leftovers`]): its `-wal` or `-shm` holding
/// anything, or a state journal. Opened, it would start empty and destroy them: the journals
/// replayed into a new database that holds no task (every state dropped) and removed, and a
/// `-wal` beside a database of no pages deleted by SQLite at its first read. That is what
/// moving a refused database away alone, its other files left, used to do at the next start.
fn refuse_leftovers(dir: &Path, db: &Path) -> Result<(), StoreError> {
    let empty = match std::fs::metadata(db) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Ok(m) if m.is_file() && m.len() == 0 => true,
        // There, or not to be read: `schema::check` says what it is.
        _ => return Ok(()),
    };
    // One that cannot be looked at is counted: it may hold anything.
    let holds_bytes = |f: &PathBuf| {
        std::fs::metadata(f).map_or_else(
            |e| e.kind() != std::io::ErrorKind::NotFound,
            |m| m.len() > 0,
        )
    };
    let mut leftovers: Vec<PathBuf> = ["-wal", "-shm"]
        .into_iter()
        .map(|suffix| schema::sibling(db, suffix))
        .filter(holds_bytes)
        .collect();
    let journals = states::journal_files(dir).map_err(|source| StoreError::DataDir {
        path: dir.to_owned(),
        source,
    })?;
    leftovers.extend(journals.into_iter().map(|(_, path)| path));
    if leftovers.is_empty() {
        return Ok(());
    }
    Err(StoreError::Leftovers {
        db: db.to_owned(),
        empty,
        leftovers,
    })
}

enum LoadError {
    Sql(rusqlite::Error),
    Json(String),
}

impl From<rusqlite::Error> for LoadError {
    fn from(e: rusqlite::Error) -> Self {
        LoadError::Sql(e)
    }
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, LoadError> {
    serde_json::from_str(s).map_err(|e| LoadError::Json(format!("{what}: {e}")))
}

fn load(conn: &Connection) -> Result<Loaded, LoadError> {
    let mut out = Loaded::default();
    // Each record that cannot be read is named by its row's id, for the operator to find.
    let mut stmt = conn.prepare("SELECT id, doc, spec FROM tasks ORDER BY submit_seq")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
        ))
    })?;
    for row in rows {
        let (id, doc, spec) = row?;
        let spec =
            spec.ok_or_else(|| LoadError::Json(format!("task {id:?} has no spec (table tasks)")))?;
        let mut t =
            from_json::<schema::LoadedTaskDoc>(&format!("task {id:?} (table tasks, doc)"), &doc)?
                .with_spec(from_json(
                    &format!("task {id:?} (table tasks, spec)"),
                    &spec,
                )?);
        // The column holds an i64, and the next task's number is one more: a larger one was
        // written outside tether.
        if t.submit_seq >= i64::MAX as u64 {
            return Err(LoadError::Json(format!(
                "task {id:?} (table tasks, doc): submit_seq {} is out of range",
                t.submit_seq
            )));
        }
        // Stored before a recorded result's error text was cut (or imported): cut as that is.
        crate::core::Core::cut_loaded_error(&mut t);
        out.tasks.push(t);
    }
    out.next_submit_seq = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'next_submit_seq'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map_or(0, |v| v.max(0).unsigned_abs());
    let mut stmt = conn.prepare(
        "SELECT id, last_attempt, removed_at_ms FROM removed_tasks ORDER BY removed_at_ms",
    )?;
    let rows = stmt.query_map([], |r| {
        let at = r.get::<_, i64>(2)?;
        let at = DateTime::<Utc>::from_timestamp_millis(at).unwrap_or_else(Utc::now);
        Ok((r.get::<_, String>(0)?, Attempt(r.get(1)?), at))
    })?;
    out.removed = rows.collect::<Result<_, _>>()?;
    out.alive_at = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'alive_at_ms'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .and_then(DateTime::<Utc>::from_timestamp_millis);
    let mut stmt = conn.prepare("SELECT id, doc FROM workers")?;
    let docs = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in docs {
        let (id, doc) = row?;
        let w: schema::WorkerDoc = from_json(&format!("worker {id:?} (table workers, doc)"), &doc)?;
        out.workers.push(w.into_worker(out.alive_at));
    }
    let mut stmt = conn.prepare(
        "SELECT id, task_id, attempt, worker, size, chunks, created_at FROM checkpoints WHERE complete = 0",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, u32>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, u32>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    let mut chunk_stmt =
        conn.prepare("SELECT idx, length(data) FROM checkpoint_chunks WHERE checkpoint_id = ?1")?;
    let bad = |what: &str, v: &str| LoadError::Json(format!("{what} {v:?} is not valid"));
    for row in rows {
        let (id, task, attempt, worker, size, chunks, created) = row?;
        let meta = CheckpointMeta {
            checkpoint_id: CheckpointId::parse(&id).map_err(|_| bad("checkpoint id", &id))?,
            task_id: TaskId::parse(&task).map_err(|_| bad("task id", &task))?,
            attempt: Attempt(attempt),
            worker: WorkerId::parse(&worker).map_err(|_| bad("worker id", &worker))?,
            size: size as u64,
            chunks,
            created_at: chrono::DateTime::parse_from_rfc3339(&created)
                .map_err(|_| bad("timestamp", &created))?
                .with_timezone(&chrono::Utc),
        };
        let pieces: Vec<(u32, i64)> = chunk_stmt
            .query_map([&id], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<_, _>>()?;
        let bytes = pieces.iter().map(|(_, n)| n.max(&0).unsigned_abs()).sum();
        let idx = pieces.into_iter().map(|(i, _)| i).collect();
        out.partial_checkpoints.push((meta, idx, bytes));
    }
    let mut stmt = conn.prepare(
        "SELECT task_id, id FROM checkpoints WHERE complete = 1 ORDER BY created_at, rowid",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (task, id) = row?;
        out.complete_checkpoints.push((
            TaskId::parse(&task).map_err(|_| bad("task id", &task))?,
            CheckpointId::parse(&id).map_err(|_| bad("checkpoint id", &id))?,
        ));
    }
    let mut stmt = conn.prepare(
        "SELECT task_id, id, attempt FROM checkpoints WHERE complete = 2 ORDER BY created_at, rowid",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, u32>(2)?,
        ))
    })?;
    for row in rows {
        let (task, id, attempt) = row?;
        out.superseded_checkpoints.push((
            TaskId::parse(&task).map_err(|_| bad("task id", &task))?,
            CheckpointId::parse(&id).map_err(|_| bad("checkpoint id", &id))?,
            Attempt(attempt),
        ));
    }
    Ok(out)
}

/// How the writer groups commits and keeps its WAL short.
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    /// Waiting batches committed in one transaction ([`MAX_GROUP`]; 1 turns group commit
    /// off, for comparison).
    pub max_group: usize,
    /// Frames in the WAL past which it starts over ([`WAL_RESTART_FRAMES`]).
    pub wal_restart_frames: u64,
    /// Group commit window ([`COMMIT_INTERVAL`]): a group commits no sooner than this after
    /// the previous one began, and takes every batch that arrived meanwhile; a batch that
    /// arrives after a quiet spell commits at once. Zero commits whatever waits at once.
    pub commit_interval: std::time::Duration,
    /// What an acknowledged commit survives: the database's commits ([`set_durability`]) and
    /// the state journal's appends (synced at each group with [`Durability::Machine`]).
    pub durability: Durability,
    /// Bytes of state journal after which a fold round begins ([`FOLD_BYTES`]; one begins
    /// [`FOLD_EVERY`] after the previous one anyway).
    pub fold_bytes: u64,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_group: MAX_GROUP,
            wal_restart_frames: WAL_RESTART_FRAMES,
            commit_interval: COMMIT_INTERVAL,
            durability: Durability::Process,
            fold_bytes: FOLD_BYTES,
        }
    }
}

/// Starts the writer thread, which commits up to `opts.max_group` waiting batches in one
/// transaction, with a state journal beside the database at `path` whose unfolded states it
/// keeps in `unfolded` ([`Loaded::unfolded`]).
pub fn spawn_writer(
    conn: Connection,
    path: PathBuf,
    mut rx: tokio::sync::mpsc::Receiver<Batch>,
    stats: Arc<StoreStats>,
    (fatal, stopping): (CancellationToken, CancellationToken),
    opts: WriterOptions,
    unfolded: Arc<Unfolded>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // One setting for both: the database's commits and the journal's appends.
    set_durability(&conn, opts.durability).map_err(|e| {
        std::io::Error::other(format!("cannot set durability on {}: {e}", path.display()))
    })?;
    let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
    let sync = opts.durability == Durability::Machine;
    // Out of space, the journal's first file is made by the writer's thread, which waits for
    // room before it takes a group, as a commit does (see `start_states`).
    let started = match States::start(&dir, unfolded.clone(), sync, opts.fold_bytes) {
        Ok(states) => Some(states),
        Err(e) if space::io_out_of_space(&e) => None,
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot start the state journal in {}: {e}", dir.display()),
            ));
        }
    };
    std::thread::Builder::new()
        .name("tether-store".into())
        .spawn(move || {
            let mut conn = conn;
            let start = || States::start(&dir, unfolded.clone(), sync, opts.fold_bytes);
            let Some(mut states) =
                started.or_else(|| start_states(start, &path, &stats, &fatal, &stopping))
            else {
                return;
            };
            // The WAL is copied into the database by a thread of its own, not by a commit.
            let checkpointer = match Checkpointer::start(&path, opts.wal_restart_frames) {
                Ok(c) => {
                    wal::track_wal(&conn);
                    Some(c)
                }
                Err(e) => {
                    tracing::warn!(db = %path.display(), error = %e, "cannot open a checkpoint connection; commits do WAL checkpoints");
                    None
                }
            };
            let reader = match Reader::start(&path) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(db = %path.display(), error = %e, "cannot open a read connection; API reads run between commits");
                    None
                }
            };
            let mut last_began: Option<Instant> = None;
            let mut backlog = false;
            while let Some(first) = rx.blocking_recv() {
                // The group commit window; a backlog (the last group was full) commits at once.
                if let Some(wait) = last_began
                    .and_then(|t| opts.commit_interval.checked_sub(t.elapsed()))
                    .filter(|_| !backlog)
                {
                    std::thread::sleep(wait);
                }
                last_began = Some(Instant::now());
                stats.group_begins();
                let mut batches = vec![first];
                while batches.len() < opts.max_group {
                    match rx.try_recv() {
                        Ok(b) => batches.push(b),
                        Err(_) => break,
                    }
                }
                backlog = batches.len() >= opts.max_group;
                let started = Instant::now();
                let n_muts: usize = batches.iter().map(|b| b.muts.len()).sum();
                if n_muts > 0 {
                    // Out of space, the same group is tried again until it commits.
                    let mut stall: Option<space::Stall<'_>> = None;
                    loop {
                        // A quota reached is an I/O error to SQLite: its system error tells.
                        match commit(&mut conn, &mut batches, &mut states)
                            .map_err(|e| e.with_errno(&conn))
                        {
                            Ok(()) => break,
                            // A stop gives the waiting group up: nothing of it was
                            // acknowledged (its senders send it again), and nothing of it
                            // stays (rolled back, its journaled states cut back). Waited for,
                            // the stop lasted until there was space, signals or not.
                            Err(e) if e.out_of_space() && stopping.is_cancelled() => {
                                tracing::warn!(db = %path.display(), "stopping while out of space: the waiting group, never acknowledged, is given up");
                                return;
                            }
                            Err(e) if e.out_of_space() => stall
                                .get_or_insert_with(|| {
                                    space::Stall::begin(&stats, space::Waiting::Commit, &path, &e)
                                })
                                .pause(&path, &e, &stopping),
                            Err(e) => {
                                tracing::error!(db = %path.display(), error = %e, "commit failed; stopping the coordinator without acknowledging");
                                fatal.cancel();
                                return;
                            }
                        }
                    }
                    if let Some(s) = stall {
                        s.end(&path);
                    }
                    stats.commits.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::observe(crate::metrics::STORE_COMMIT, started.elapsed());
                    metrics::counter!(crate::metrics::STORE_COMMITS).increment(1);
                    metrics::counter!(crate::metrics::STORE_MUTATIONS).increment(n_muts as u64);
                    stats.mutations.fetch_add(n_muts as u64, Ordering::Relaxed);
                    stats
                        .commit_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                let n_batches = batches.len() as u64;
                for b in batches {
                    for effect in b.effects {
                        effect.run(&conn);
                    }
                    for read in b.reads {
                        match &reader {
                            Some(r) => {
                                if let Err(read) = r.run(read) {
                                    read(&conn);
                                }
                            }
                            None => read(&conn),
                        }
                    }
                }
                // After the effects, so that the core's `Handoff` may deliver a batch of
                // messages itself only once every message queued before is out.
                stats.batches.fetch_add(n_batches, Ordering::Release);
                stats.group_ends();
                // After the effects: the acks of this group do not wait for a fold.
                if states.due() {
                    match states.piece(&conn).map_err(|e| e.with_errno(&conn)) {
                        Ok(p) => tracing::trace!(states = p.states_written, files = p.files_deleted, "states folded a piece"),
                        // Said by `States` (once a minute while it lasts) and tried again: the
                        // journal keeps the states meanwhile.
                        Err(WriteError::Fold(_)) => {
                            stats.fold_failures.fetch_add(1, Ordering::Relaxed);
                        }
                        // Nothing of the piece was kept: it is done again when next due (the
                        // journal keeps the states meanwhile), as the commits wait for space.
                        Err(e) if e.out_of_space() => {
                            tracing::debug!(db = %path.display(), error = %e, "folding the task states waits for space");
                        }
                        Err(e) => {
                            tracing::error!(db = %path.display(), error = %e, "folding the task states failed; stopping the coordinator");
                            fatal.cancel();
                            return;
                        }
                    }
                }
                states.publish_metrics();
                // Right after a pass of the checkpointer, the WAL has little left to copy.
                let frames = wal::wal_frames();
                if let Some(c) = &checkpointer
                    && frames >= opts.wal_restart_frames
                    && (c.just_passed() || frames >= 2 * opts.wal_restart_frames)
                    && let Err(e) = wal::finish_checkpoint(&conn)
                {
                    tracing::warn!(db = %path.display(), error = %e, "WAL checkpoint failed");
                }
            }
            drop(reader);
            drop(checkpointer);
            // The core is gone: fold the states (the journal files go) and checkpoint the WAL.
            if let Err(e) = states.fold_all(&conn) {
                tracing::warn!(db = %path.display(), error = %e, "folding the task states at the end failed; the next start replays their journal");
            }
            let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
        })
}

/// Starts the state journal with `start` on the writer's thread, before it takes a group: its
/// first try, made before the thread, failed for want of space (its file's header needs a
/// block). Tried again as a commit is ([`space::Stall`]): meanwhile nothing is committed, the
/// writer's queue fills, and submissions are refused. `None` when the writer is to end: stopped
/// meanwhile (nothing was taken), or the journal failed otherwise (`fatal` is cancelled).
fn start_states(
    mut start: impl FnMut() -> std::io::Result<States>,
    db: &Path,
    stats: &StoreStats,
    fatal: &CancellationToken,
    stopping: &CancellationToken,
) -> Option<States> {
    let mut stall: Option<space::Stall<'_>> = None;
    loop {
        match start() {
            Ok(states) => {
                if let Some(s) = stall {
                    s.end(db);
                }
                return Some(states);
            }
            Err(e) if space::io_out_of_space(&e) && stopping.is_cancelled() => {
                tracing::warn!(db = %db.display(), "stopping while out of space, before the state journal was started: nothing was taken");
                return None;
            }
            Err(e) if space::io_out_of_space(&e) => stall
                .get_or_insert_with(|| space::Stall::begin(stats, space::Waiting::Journal, db, &e))
                .pause(db, &e, stopping),
            Err(e) => {
                tracing::error!(db = %db.display(), error = %e, "cannot start the state journal; stopping the coordinator");
                fatal.cancel();
                return None;
            }
        }
    }
}

/// What a mutation overwrites whole: of several in one group, only the last is executed.
#[derive(PartialEq, Eq, Hash)]
enum Slot<'a> {
    Task(&'a TaskId),
    State(&'a TaskId),
    Worker(&'a WorkerId),
}

impl Mutation {
    fn slot(&self) -> Option<Slot<'_>> {
        match self {
            Mutation::InsertTask(t) | Mutation::PutTask(t) => Some(Slot::Task(&t.task_id)),
            Mutation::PutState { task_id, .. } => Some(Slot::State(task_id)),
            Mutation::PutWorker(w) => Some(Slot::Worker(&w.worker_id)),
            Mutation::DeleteWorker(id) => Some(Slot::Worker(id)),
            _ => None,
        }
    }
}

fn commit(
    conn: &mut Connection,
    batches: &mut [Batch],
    states: &mut States,
) -> Result<(), WriteError> {
    // Later writes of the same task, task state or worker in this group supersede earlier
    // ones: the transaction ends with the same rows, and all of it commits or none.
    let n: usize = batches.iter().map(|b| b.muts.len()).sum();
    // Whether each mutation, in order, is executed: the last of its slot, or slotless.
    let mut keep = vec![true; n];
    {
        let mut last: crate::model::IdMap<Slot<'_>, usize> =
            crate::model::IdMap::with_capacity_and_hasher(n, Default::default());
        for (i, m) in batches.iter().flat_map(|b| &b.muts).enumerate() {
            if let Some(slot) = m.slot()
                && let Some(earlier) = last.insert(slot, i)
            {
                keep[earlier] = false;
            }
        }
    }
    let tx = conn.transaction()?;
    // Results and states are stamped with the time of their commit.
    let now = chrono::Utc::now().to_rfc3339();
    // The group's states and deletions, in order: journaled before the commit, kept in memory
    // after it.
    let mut ops: Vec<Op<'_>> = Vec::new();
    let muts = batches.iter().flat_map(|b| &b.muts).zip(keep);
    for (m, keep) in muts {
        if !keep {
            continue;
        }
        match m {
            Mutation::InsertTask(t) => insert_task(&tx, t)?,
            Mutation::PutTask(t) => {
                let changed = tx
                    .prepare_cached(
                        "UPDATE tasks SET status = ?2, finished_at = ?3, doc = ?4 WHERE id = ?1",
                    )?
                    .execute(params![
                        t.task_id.as_str(),
                        t.status.as_str(),
                        t.finished_at.map(|d| d.to_rfc3339()),
                        to_json(&schema::TaskDoc::of(t))?
                    ])?;
                if changed == 0 {
                    insert_task(&tx, t)?;
                }
            }
            Mutation::DeleteTask {
                id,
                last_attempt,
                at,
            } => {
                // Its journaled states go too (and are not replayed, even under its id). The
                // forget is journaled before the commit, as every op is: a crash between them
                // leaves the task (finished: only those are removed) without its journaled
                // state, and its removal is done again; the other order could replay a removed
                // task's state under a new task of its id.
                ops.push(Op::Forget(id));
                for sql in [
                    "DELETE FROM checkpoint_chunks WHERE checkpoint_id IN (SELECT id FROM checkpoints WHERE task_id = ?1)",
                    "DELETE FROM checkpoints WHERE task_id = ?1",
                    "DELETE FROM results WHERE task_id = ?1",
                    "DELETE FROM task_state WHERE task_id = ?1",
                    "DELETE FROM tasks WHERE id = ?1",
                ] {
                    tx.prepare_cached(sql)?.execute([id.as_str()])?;
                }
                tx.prepare_cached(
                    "INSERT INTO removed_tasks (id, last_attempt, removed_at_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT(id) DO UPDATE SET last_attempt = max(last_attempt, excluded.last_attempt),
                     removed_at_ms = max(removed_at_ms, excluded.removed_at_ms)",
                )?
                .execute(rusqlite::params![
                    id.as_str(),
                    last_attempt.0,
                    at.timestamp_millis()
                ])?;
            }
            Mutation::ForgetRemoved { before } => {
                tx.prepare_cached("DELETE FROM removed_tasks WHERE removed_at_ms < ?1")?
                    .execute([before.timestamp_millis()])?;
            }
            Mutation::NextSubmitSeq(next) => {
                tx.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ('next_submit_seq', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                )?
                .execute([i64::try_from(*next).unwrap_or(i64::MAX)])?;
            }
            Mutation::AliveAt(at) => {
                tx.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES ('alive_at_ms', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                )?
                .execute([at.timestamp_millis()])?;
            }
            Mutation::PutResult {
                task_id,
                attempt,
                worker,
                outcome,
                stale,
                body,
            } => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO results (task_id, attempt, worker, outcome, stale, body, recorded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    task_id.as_str(),
                    attempt.0,
                    worker.as_str(),
                    tether_proto::TaskStatus::from(*outcome).as_str(),
                    *stale,
                    body,
                    now
                ])?;
            }
            Mutation::PutState {
                task_id,
                attempt,
                state,
            } => ops.push(Op::State {
                task: task_id,
                attempt: attempt.0,
                state,
            }),
            Mutation::PutCheckpoint { meta, complete } => {
                tx.prepare_cached(
                    "INSERT INTO checkpoints (id, task_id, attempt, worker, size, chunks, complete, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT(id) DO UPDATE SET complete = excluded.complete",
                )?
                .execute(params![
                    meta.checkpoint_id.as_str(),
                    meta.task_id.as_str(),
                    meta.attempt.0,
                    meta.worker.as_str(),
                    meta.size as i64,
                    meta.chunks,
                    *complete,
                    meta.created_at.to_rfc3339()
                ])?;
            }
            Mutation::PutChunk {
                checkpoint_id,
                idx,
                data,
            } => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO checkpoint_chunks (checkpoint_id, idx, data) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![checkpoint_id.as_str(), idx, data])?;
            }
            Mutation::DeleteCheckpoint(id) => {
                tx.prepare_cached("DELETE FROM checkpoint_chunks WHERE checkpoint_id = ?1")?
                    .execute([id.as_str()])?;
                tx.prepare_cached("DELETE FROM checkpoints WHERE id = ?1")?
                    .execute([id.as_str()])?;
            }
            Mutation::SupersedeCheckpoint {
                checkpoint_id,
                attempt,
            } => {
                tx.prepare_cached("DELETE FROM checkpoint_chunks WHERE checkpoint_id = ?1")?
                    .execute([checkpoint_id.as_str()])?;
                tx.prepare_cached(
                    "UPDATE checkpoints SET complete = 2, attempt = ?2 WHERE id = ?1",
                )?
                .execute(params![checkpoint_id.as_str(), attempt.0])?;
            }
            Mutation::ForgetSuperseded(task) => {
                tx.prepare_cached("DELETE FROM checkpoints WHERE task_id = ?1 AND complete = 2")?
                    .execute([task.as_str()])?;
            }
            Mutation::PutWorker(w) => {
                let doc = to_json(&schema::WorkerDoc::from_worker(w))?;
                tx.prepare_cached(
                    "INSERT INTO workers (id, doc) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                )?
                .execute(params![w.worker_id.as_str(), doc])?;
            }
            Mutation::DeleteWorker(id) => {
                tx.prepare_cached("DELETE FROM workers WHERE id = ?1")?
                    .execute([id.as_str()])?;
            }
        }
    }
    let appended = states.append(&now, &ops)?;
    if let Err(e) = commit_tx(tx) {
        // Nothing of the group stays: not its rows (rolled back), nor its journaled states.
        return match states.unappend(appended) {
            Ok(()) => Err(e.into()),
            // Not out of space any more, whatever `e` was: the writer stops.
            Err(cut) => Err(WriteError::Journal(std::io::Error::other(format!(
                "{e}; and the journal could not be cut back to before the group: {cut}"
            )))),
        };
    }
    states.committed(&now, &ops);
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Tests: the next commit on this thread fails as a full disk does at the commit itself (a
    /// WAL write needing a block that is not there), after the group was journaled.
    pub(crate) static FAIL_NEXT_COMMIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn commit_tx(tx: rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    #[cfg(test)]
    if FAIL_NEXT_COMMIT.with(|f| f.replace(false)) {
        drop(tx);
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        ));
    }
    tx.commit()
}

fn to_json<T: serde::Serialize>(v: &T) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Writes a whole task: its spec, once, and its changing part.
fn insert_task(tx: &rusqlite::Transaction<'_>, t: &Task) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO tasks (id, status, submit_seq, finished_at, spec, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(id) DO UPDATE SET status = excluded.status, finished_at = excluded.finished_at, spec = excluded.spec, doc = excluded.doc",
    )?
    .execute(params![
        t.task_id.as_str(),
        t.status.as_str(),
        t.submit_seq as i64,
        t.finished_at.map(|d| d.to_rfc3339()),
        to_json(t.spec.as_ref())?,
        to_json(&schema::TaskDoc::of(t))?
    ])?;
    Ok(())
}

/// A stored result row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResultRow {
    pub task_id: String,
    pub attempt: u32,
    pub worker: String,
    pub outcome: String,
    /// From an attempt that no longer held the lease: kept, never counted.
    pub stale: bool,
    pub recorded_at: String,
    /// The result as the worker sent it, served byte for byte: kept as text, it is never made
    /// a tree (16 MiB of JSON as a tree take hundreds of megabytes), which would also sort its
    /// keys, merge duplicate keys and round its numbers.
    pub body: Box<serde_json::value::RawValue>,
}

/// A task's latest state, as the API serves it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StateRow {
    pub attempt: u32,
    /// As the worker sent it, byte for byte (as [`ResultRow::body`]).
    pub state: Box<serde_json::value::RawValue>,
    pub updated_at: String,
}

/// A record's JSON, as the API serves it: its text, checked to be JSON but not made a tree.
/// Text that is not JSON (the file damaged outside tether: it only ever writes JSON there) is
/// an error naming the record, logged, never a `null` that would pass for what the worker
/// sent.
fn stored_json(
    table: &str,
    col: usize,
    task: &str,
    text: String,
) -> rusqlite::Result<Box<serde_json::value::RawValue>> {
    serde_json::value::RawValue::from_string(text).map_err(|e| {
        let why = format!("the {table} record of task {task:?} is damaged (not JSON: {e})");
        tracing::warn!(table, task, error = %e, "a stored record cannot be read");
        rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, why.into())
    })
}

/// Every result recorded for a task, counted first.
pub fn read_results(conn: &Connection, task: &TaskId) -> rusqlite::Result<Vec<ResultRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT task_id, attempt, worker, outcome, stale, body, recorded_at FROM results WHERE task_id = ?1 ORDER BY stale, attempt",
    )?;
    let rows = stmt.query_map([task.as_str()], |r| {
        let body: String = r.get(5)?;
        Ok(ResultRow {
            task_id: r.get(0)?,
            attempt: r.get(1)?,
            worker: r.get(2)?,
            outcome: r.get(3)?,
            stale: r.get(4)?,
            body: stored_json("results", 5, task.as_str(), body)?,
            recorded_at: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// The latest state of a task, with its attempt: its unfolded state, else its row. (A fold
/// removes a state from `unfolded` only after its row committed, and the row is read after
/// looking there.)
pub fn read_state(
    conn: &Connection,
    unfolded: &Unfolded,
    task: &TaskId,
) -> rusqlite::Result<Option<StateRow>> {
    if let Some((attempt, state, at)) = unfolded.get(task) {
        return Ok(Some(StateRow {
            attempt,
            state: stored_json("task_state", 1, task.as_str(), state.to_string())?,
            updated_at: at,
        }));
    }
    let row = |r: &rusqlite::Row<'_>| {
        let s: String = r.get(1)?;
        Ok(StateRow {
            attempt: r.get(0)?,
            state: stored_json("task_state", 1, task.as_str(), s)?,
            updated_at: r.get(2)?,
        })
    };
    conn.prepare_cached("SELECT attempt, state, updated_at FROM task_state WHERE task_id = ?1")?
        .query_row([task.as_str()], row)
        .optional()
}

/// Complete checkpoints of a task, newest first: (id, attempt, size, created_at).
pub fn read_checkpoints(
    conn: &Connection,
    task: &TaskId,
) -> rusqlite::Result<Vec<(String, u32, i64, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, attempt, size, created_at FROM checkpoints WHERE task_id = ?1 AND complete = 1 ORDER BY created_at DESC, rowid DESC",
    )?;
    let rows = stmt.query_map([task.as_str()], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })?;
    rows.collect()
}

/// Bytes `offset..offset + len` of checkpoint `id` of `task` (fewer at its end), reading only
/// the pieces the range overlaps; `None` when `task` has no complete checkpoint `id`. One read
/// transaction: a re-upload or a removal committed meanwhile is not half seen.
pub fn read_checkpoint_range(
    conn: &Connection,
    task: &TaskId,
    id: &CheckpointId,
    offset: u64,
    len: u64,
) -> rusqlite::Result<Option<Vec<u8>>> {
    let conn = conn.unchecked_transaction()?;
    let complete = conn
        .prepare_cached(
            "SELECT 1 FROM checkpoints WHERE id = ?1 AND task_id = ?2 AND complete = 1",
        )?
        .exists([id.as_str(), task.as_str()])?;
    if !complete {
        return Ok(None);
    }
    let end = offset.saturating_add(len);
    // Where each piece starts: `length` reads a blob's size from its record, not its bytes.
    let mut overlapping = Vec::new();
    let mut at = 0u64;
    let mut sizes = conn.prepare_cached(
        "SELECT idx, length(data) FROM checkpoint_chunks WHERE checkpoint_id = ?1 ORDER BY idx",
    )?;
    let rows = sizes.query_map([id.as_str()], |r| {
        Ok((r.get::<_, u32>(0)?, r.get::<_, u64>(1)?))
    })?;
    for row in rows {
        let (idx, n) = row?;
        if at >= end {
            break;
        }
        if at + n > offset {
            overlapping.push((idx, at));
        }
        at += n;
    }
    let mut out = Vec::with_capacity(end.min(at).saturating_sub(offset) as usize);
    let mut piece = conn.prepare_cached(
        "SELECT data FROM checkpoint_chunks WHERE checkpoint_id = ?1 AND idx = ?2",
    )?;
    for (idx, at) in overlapping {
        piece.query_row(rusqlite::params![id.as_str(), idx], |r| {
            let data = r.get_ref(0)?.as_blob()?;
            let from = offset.saturating_sub(at).min(data.len() as u64) as usize;
            let to = (end - at).min(data.len() as u64) as usize;
            out.extend_from_slice(&data[from..to]);
            Ok(())
        })?;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests;
