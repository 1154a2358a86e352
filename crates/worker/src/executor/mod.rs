//! Executors run tasks. The [`Executor`] trait is what an embedding program implements; the
//! built-in ones are [`command::CommandExecutor`] and [`sleep::SleepExecutor`].
//!
//! Layering is a DAG fixed at construction: the runner owns an [`Executors`] registry, which owns
//! a [`Metered`] wrapper per kind, which owns the executor. Nothing routes back up, so an
//! assignment calls the executor exactly once (the original recursed until the stack overflowed).

pub mod command;
pub mod orphans;
pub mod packing;
pub mod procs;
pub mod sleep;
pub(crate) mod warden;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tether_proto::msg::{
    Checkpoint, CheckpointData, CheckpointError, StateJson, StateTextError, TaskNotice, TaskState,
    WorkerMsg, now,
};
use tether_proto::task::Blob;
use tether_proto::{Attempt, CheckpointId, TaskId};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::outbox::{Class, Coalesce, Outbox};

/// What a task needs to start.
#[derive(Debug, Clone)]
pub struct TaskInput {
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub config: serde_json::Value,
    pub timeout: Option<Duration>,
}

/// How an execution ended other than with success.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    /// The task ran and failed; `result` holds what it produced (exit status, output tail).
    #[error("{message}")]
    Failed {
        message: String,
        result: serde_json::Value,
    },
    /// The task's config is not valid for this executor.
    #[error("invalid task config: {0}")]
    InvalidConfig(String),
    /// The task observed cancellation and stopped.
    #[error("cancelled")]
    Cancelled,
    /// The task observed cancellation and stopped, with what it produced until then (the
    /// `command` executor: output tails, signal, duration). The attempt ends as for
    /// [`ExecError::Cancelled`] (`cancelled`, or `timed_out` when its timeout stopped it), with
    /// `result` as its result.
    #[error("cancelled")]
    Stopped { result: serde_json::Value },
    /// The executor enforced a timeout of its own.
    #[error("timed out")]
    TimedOut,
    /// The executor panicked; the panic is contained to its task (the worker and the other
    /// tasks run on), and the attempt ends with this failure as its one result.
    #[error("executor panicked: {0}")]
    Panicked(String),
    /// The attempt could not run on this worker, for a fault of the worker's own and not the
    /// task's: its checkpoint directory could not be prepared (the disk full or failing, the
    /// checkpoint not unpacked), a process could not be started for want of memory, processes
    /// or files. Reported `failed` with `worker_fault`: the coordinator runs the task again
    /// (an attempt used, as for one lost with its worker) rather than ending it.
    #[error("{0}")]
    WorkerFault(String),
}

/// A state the worker refused to send ([`TaskCtx::report_state`]) ends the attempt as a
/// failure saying why, for an executor that passes the error on with `?`.
impl From<StateTextError> for ExecError {
    fn from(e: StateTextError) -> Self {
        ExecError::Failed {
            message: format!("the task reported a state that cannot be sent: {e}"),
            result: serde_json::json!({}),
        }
    }
}

/// Runs tasks of one kind.
pub trait Executor: Send + Sync + 'static {
    /// Runs one attempt to its end. Called exactly once per assignment. The latest checkpoint
    /// of an earlier attempt, if any, is `ctx.latest_checkpoint()` at start.
    fn execute(
        &self,
        input: TaskInput,
        ctx: TaskCtx,
    ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>>;

    /// How long an attempt of this executor may take to end once cancelled: a newer attempt
    /// of the same task waits that long for it (they share the task's checkpoint directory).
    fn stop_grace(&self) -> Duration {
        crate::runner::PREDECESSOR_GRACE
    }

    /// Checks a task's config (its JSON text) as [`Executor::execute`] would read it, without
    /// running anything: `Err` says what is wrong. A coordinator given this check refuses such
    /// a task at submission, instead of assigning it only to see every attempt fail. The
    /// default takes any config.
    fn check_config(&self, config: &str) -> Result<(), String> {
        let _ = config;
        Ok(())
    }
}

/// Counters of one executor kind.
#[derive(Debug, Default)]
pub struct ExecMetrics {
    pub executions: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub resumed_from_checkpoint: AtomicU64,
    pub busy_ms: AtomicU64,
}

/// The metrics layer: owns the executor it measures, so it can only call down.
pub struct Metered {
    inner: Box<dyn Executor>,
    pub metrics: Arc<ExecMetrics>,
}

impl Metered {
    pub fn new(inner: Box<dyn Executor>) -> Self {
        Self {
            inner,
            metrics: Arc::default(),
        }
    }

    /// The executor's [`Executor::stop_grace`].
    pub fn stop_grace(&self) -> Duration {
        self.inner.stop_grace()
    }

    /// Runs the executor once and records the execution around the real work.
    pub async fn run(
        &self,
        input: TaskInput,
        ctx: TaskCtx,
    ) -> Result<serde_json::Value, ExecError> {
        let m = self.metrics.clone();
        m.executions.fetch_add(1, Ordering::Relaxed);
        if ctx.latest_checkpoint().is_some() {
            m.resumed_from_checkpoint.fetch_add(1, Ordering::Relaxed);
        }
        let started = tokio::time::Instant::now();
        let (task, attempt) = (input.task_id.clone(), input.attempt);
        // The call and every poll of its future run inside the guard, so a panic in either
        // becomes this attempt's failure rather than a task that never reports.
        let run = std::panic::AssertUnwindSafe(async { self.inner.execute(input, ctx).await });
        let out = match run.catch_unwind().await {
            Ok(out) => out,
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                tracing::error!(task = %task, attempt = %attempt, panic = %message, "executor panicked; the attempt fails");
                Err(ExecError::Panicked(message))
            }
        };
        m.busy_ms
            .fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        match &out {
            Ok(_) => m.completed.fetch_add(1, Ordering::Relaxed),
            Err(_) => m.failed.fetch_add(1, Ordering::Relaxed),
        };
        out
    }
}

/// The text a panic was raised with (`panic!("...")` carries a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => (*s).to_owned(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

/// Executor kinds by name.
#[derive(Default)]
pub struct Executors {
    by_kind: BTreeMap<String, Arc<Metered>>,
}

impl Executors {
    /// The built-in executors: `command` and `sleep`.
    pub fn builtin() -> Self {
        let mut e = Self::default();
        e.register("command", command::CommandExecutor::default());
        e.register("sleep", sleep::SleepExecutor);
        e
    }

    /// Adds (or replaces) the executor for `kind`.
    pub fn register(&mut self, kind: &str, executor: impl Executor) -> &mut Self {
        self.by_kind
            .insert(kind.to_owned(), Arc::new(Metered::new(Box::new(executor))));
        self
    }

    pub fn get(&self, kind: &str) -> Option<Arc<Metered>> {
        self.by_kind.get(kind).cloned()
    }

    /// Checks a config for `kind` ([`Executor::check_config`]); `None` for a kind not here.
    pub fn check_config(&self, kind: &str, config: &str) -> Option<Result<(), String>> {
        self.by_kind.get(kind).map(|m| m.inner.check_config(config))
    }

    pub fn kinds(&self) -> Vec<String> {
        self.by_kind.keys().cloned().collect()
    }

    /// Total executions over all kinds.
    pub fn executions(&self) -> u64 {
        self.by_kind
            .values()
            .map(|m| m.metrics.executions.load(Ordering::Relaxed))
            .sum()
    }

    pub fn metrics(&self) -> BTreeMap<String, Arc<ExecMetrics>> {
        self.by_kind
            .iter()
            .map(|(k, m)| (k.clone(), m.metrics.clone()))
            .collect()
    }
}

/// A checkpoint held by the worker.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    pub id: CheckpointId,
    pub attempt: Attempt,
    pub data: Arc<Vec<u8>>,
    /// The size of the pieces this worker cut it into to upload it (0: not uploaded from
    /// here). A re-upload repeats them: the coordinator refuses an announcement of the same
    /// checkpoint with another count of pieces, and the worker then drops the pieces queued.
    pub piece: usize,
}

/// A checkpoint [`TaskCtx::store_checkpoint`] stored, its upload not queued yet.
#[derive(Debug)]
pub(crate) struct Stored {
    cp: StoredCheckpoint,
    /// Its place among the attempt's stores, which orders the uploads.
    order: u64,
}

impl Stored {
    pub(crate) fn id(&self) -> &CheckpointId {
        &self.cp.id
    }

    /// Its size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.cp.data.len()
    }
}

/// Shared between a running task's context and the runner.
#[derive(Debug)]
pub(crate) struct TaskShared {
    pub task_id: TaskId,
    pub attempt: Attempt,
    pub cancel: CancellationToken,
    /// Set before `cancel` when the stop is the worker's: the next attempt runs elsewhere,
    /// from the checkpoint this one leaves.
    pub worker_stopping: AtomicBool,
    pub pause: watch::Sender<bool>,
    pub parked: AtomicBool,
    pub latest: Mutex<Option<StoredCheckpoint>>,
    pub checkpoint_requested: AtomicBool,
    pub checkpoint_wanted: Notify,
    /// Set while the executor answers every checkpoint request itself, soon: with a checkpoint,
    /// or with a `checkpoint_error` saying why none comes (the `command` executor, from the
    /// start of its watch of its checkpoint directory, paused or not, until its last look
    /// once the process is gone answered what is left). The runner then leaves a request it
    /// has nothing to re-send for to the executor, rather than answer first that there is no
    /// checkpoint yet, or that the task is paused.
    pub answers_requests: AtomicBool,
    /// A re-upload of the latest checkpoint (`checkpoint_request`) is under way.
    pub reuploading: AtomicBool,
    /// Cancelled once the executor's run has returned: the attempt touches its checkpoint
    /// directory no more (a newer attempt of the task waits for it).
    pub ended: CancellationToken,
    /// Cancelled once the attempt is recorded as running in the state directory (at once
    /// without one): before that it is not reported running, nor does its executor start.
    pub recorded: CancellationToken,
    pub state: Mutex<StateJson>,
    /// Held while a checkpoint is stored and made the latest: stores of one task, which run on
    /// the blocking pool, land in the order they were asked for. The store's closure owns the
    /// guard, so a store whose awaiting future was dropped (cancel, timeout) still holds it
    /// until it landed; the runner takes it before the attempt's end forgets its checkpoints.
    pub storing: Arc<tokio::sync::Mutex<()>>,
    /// The order of the last checkpoint stored (counted under `storing`), so that uploads
    /// can follow the order of the stores; each checkpoint's id carries its own
    /// ([`checkpoint_id`]).
    pub stored: AtomicU64,
    /// Held while a checkpoint's announcement and pieces are queued; holds the order of the
    /// newest checkpoint queued. The coordinator makes the checkpoint completed last the
    /// task's latest: an older one queued after a newer one would replace it there, so it is
    /// not queued at all (see [`TaskShared::upload_in_order`]).
    pub uploading: tokio::sync::Mutex<u64>,
}

impl TaskShared {
    pub(crate) fn new(
        task_id: TaskId,
        attempt: Attempt,
        latest: Option<StoredCheckpoint>,
    ) -> Arc<Self> {
        Arc::new(Self {
            task_id,
            attempt,
            cancel: CancellationToken::new(),
            worker_stopping: AtomicBool::new(false),
            pause: watch::channel(false).0,
            parked: AtomicBool::new(false),
            latest: Mutex::new(latest),
            checkpoint_requested: AtomicBool::new(false),
            checkpoint_wanted: Notify::new(),
            answers_requests: AtomicBool::new(false),
            reuploading: AtomicBool::new(false),
            ended: CancellationToken::new(),
            recorded: CancellationToken::new(),
            state: Mutex::new(StateJson::from(serde_json::Value::Null)),
            storing: Arc::new(tokio::sync::Mutex::new(())),
            stored: AtomicU64::new(0),
            uploading: tokio::sync::Mutex::new(0),
        })
    }

    /// Queues the upload of checkpoint `cp`, stored `order`th, unless a newer one of the task
    /// was queued already (the coordinator would take this one, completed after it, as the
    /// task's latest). Uploads of one task are queued one at a time, whole: two running at
    /// once would interleave their pieces, and the one with more pieces would complete last.
    pub(crate) async fn upload_in_order(
        &self,
        outbox: &Outbox,
        cp: &StoredCheckpoint,
        order: u64,
        piece: usize,
        max_checkpoint: u64,
    ) {
        let mut queued = self.uploading.lock().await;
        if *queued > order {
            tracing::debug!(task = %self.task_id, checkpoint = %cp.id, "a newer checkpoint of the task is queued for upload already: this one is not");
            return;
        }
        *queued = order;
        upload_checkpoint(outbox, &self.task_id, cp, piece, max_checkpoint).await;
    }

    /// Queues a re-upload of checkpoint `cp` (asked for by the coordinator), in turn with the
    /// task's own uploads, unless it is no longer the task's latest: the newer one is, or
    /// will be, queued after it was stored.
    pub(crate) async fn reupload(
        &self,
        outbox: &Outbox,
        cp: &StoredCheckpoint,
        piece: usize,
        max_checkpoint: u64,
    ) {
        let _turn = self.uploading.lock().await;
        if self.latest().is_none_or(|l| l.id != cp.id) {
            tracing::debug!(task = %self.task_id, checkpoint = %cp.id, "a newer checkpoint of the task was stored: it is uploaded instead");
            return;
        }
        upload_checkpoint(outbox, &self.task_id, cp, piece, max_checkpoint).await;
    }

    /// Why a checkpoint request to this task, paused, gets no checkpoint now, and what comes
    /// `then`, once it is resumed; naming its latest checkpoint (which holds its state), since
    /// `tether checkpoint --wait` waits for a newer one. What matters comes first: the
    /// coordinator keeps 256 characters of it.
    pub(crate) fn paused_answer(&self, then: &str) -> String {
        let latest = match self.latest() {
            Some(cp) => format!("its latest checkpoint is {}", cp.id),
            None => "it has no checkpoint yet".to_owned(),
        };
        format!("the task is paused: no checkpoint is made while it is; {then} ({latest})")
    }

    pub(crate) fn latest(&self) -> Option<StoredCheckpoint> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A fresh id for the checkpoint an attempt stores `n`th here: `c-<32 random hex digits>-<n>`.
/// Its place among the attempt's stores travels with it, to the coordinator too: after a
/// machine crash `checkpoints.db` may hold an older checkpoint of the attempt than the one the
/// coordinator acknowledged (its last commits are lost, `synchronous=NORMAL`), and only the
/// coordinator's copy of the newer one is left to say that it is newer ([`stored_order`]).
pub(crate) fn checkpoint_id(n: u64) -> CheckpointId {
    let id = format!("c-{}-{n}", uuid::Uuid::new_v4().simple());
    CheckpointId::parse(&id).expect("hex digits, dashes and a number make an id")
}

/// The place among its attempt's stores that `id` carries, if [`checkpoint_id`] made it (a
/// worker before this one made ids without it: `c-<32 hex digits>`).
pub(crate) fn stored_order(id: &CheckpointId) -> Option<u64> {
    let (random, n) = id.as_str().strip_prefix("c-")?.split_once('-')?;
    let random = random.len() == 32 && random.bytes().all(|b| b.is_ascii_hexdigit());
    let digits = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    n.parse().ok().filter(|_| random && digits)
}

/// Replies the worker's executors queue for the session to send as they come (a
/// `checkpoint_error` answering a checkpoint request once the executor looked): sent directly,
/// outside the outbox, never acknowledged. One queued while no session runs goes with the
/// next; at most [`MAX_REPLIES`] wait, the oldest dropped past them.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    queue: Mutex<VecDeque<WorkerMsg>>,
    ready: Notify,
}

/// The most replies [`Replies`] holds unsent: requests come one per operator's call, so more
/// than this wait only while no session runs, and the oldest are stale by then.
pub(crate) const MAX_REPLIES: usize = 64;

impl Replies {
    /// Queues `msg` for the session to send.
    pub(crate) fn push(&self, msg: WorkerMsg) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= MAX_REPLIES
                && let Some(old) = q.pop_front()
            {
                tracing::debug!(
                    r#type = old.type_name(),
                    "a reply waited too long unsent; dropped"
                );
            }
            q.push_back(msg);
        }
        // A permit when no one waits: the next wait returns at once.
        self.ready.notify_one();
    }

    /// Takes every reply queued, oldest first.
    pub(crate) fn take(&self) -> Vec<WorkerMsg> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.drain(..).collect()
    }

    /// Resolves once a reply was queued since the last wait resolved (one queued while none
    /// waited leaves a permit, so none is missed; [`Replies::take`] may find it taken already).
    /// Takes no lock of the queue: the session waits for this in every round of its loop.
    pub(crate) async fn ready(&self) {
        self.ready.notified().await;
    }
}

/// Called when a task stores a checkpoint (the state directory persists it). Runs on the
/// blocking pool: it may write the whole checkpoint to disk.
pub type CheckpointSink = Arc<dyn Fn(&TaskId, &StoredCheckpoint) + Send + Sync>;

/// What a running task can do: report state, write and read checkpoints, observe cancel and
/// pause. Cheap to clone.
#[derive(Clone)]
pub struct TaskCtx {
    pub(crate) shared: Arc<TaskShared>,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) chunk_size: usize,
    /// The largest piece for the link's rate (see `Runner::size_pieces_for`).
    pub(crate) link_piece: Arc<std::sync::atomic::AtomicUsize>,
    /// The largest frame a message may take (see `Runner::limit_frames_to`).
    pub(crate) max_frame: Arc<AtomicUsize>,
    /// The largest checkpoint the coordinator keeps (see `Runner::limit_checkpoints_to`).
    pub(crate) max_checkpoint: Arc<AtomicU64>,
    pub(crate) checkpoint_dir: Option<PathBuf>,
    /// Where the `command` executor records the task's process group, for a worker that
    /// starts after a crash ([`orphans`]).
    pub(crate) group_record: Option<PathBuf>,
    pub(crate) on_checkpoint: Option<CheckpointSink>,
    /// Where [`TaskCtx::refuse_checkpoint`] queues its answers, for the session to send.
    pub(crate) replies: Arc<Replies>,
}

impl std::fmt::Debug for TaskCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskCtx")
            .field("task_id", &self.shared.task_id)
            .field("attempt", &self.shared.attempt)
            .finish_non_exhaustive()
    }
}

/// Default size of one checkpoint piece on the wire.
pub const DEFAULT_CHUNK_SIZE: usize = tether_proto::codec::CHECKPOINT_PIECE;

/// The piece size for a re-upload of `cp`: the pieces it was first cut into, so that the
/// coordinator sees the same announcement again, unless they no longer fit in a frame of
/// `max_frame` (the worker then registered with a coordinator taking smaller frames, and the
/// first upload's pieces cannot go either); `now` otherwise.
pub(crate) fn reupload_piece(cp: &StoredCheckpoint, now: usize, max_frame: usize) -> usize {
    match cp.piece {
        p if p > 0 && p <= tether_proto::codec::largest_blob(max_frame) => p,
        _ => now,
    }
}

/// The checkpoint piece size to use: `chunk_size`, or less for the link (`link_piece`, about a
/// second of its measured rate: `Runner::size_pieces_for`) or when a piece (base64 in its
/// message) would not fit in a frame of `max_frame`.
pub(crate) fn piece_size(chunk_size: usize, link_piece: usize, max_frame: usize) -> usize {
    chunk_size
        .min(link_piece)
        .min(tether_proto::codec::largest_blob(max_frame))
        .max(1)
}

impl TaskCtx {
    /// A context not attached to any worker, for unit-testing executors.
    pub fn detached(task_id: TaskId, attempt: Attempt) -> (Self, TaskControl) {
        let shared = TaskShared::new(task_id, attempt, None);
        let ctx = Self {
            shared: shared.clone(),
            outbox: Arc::new(Outbox::new(Default::default())),
            chunk_size: DEFAULT_CHUNK_SIZE,
            link_piece: Arc::new(usize::MAX.into()),
            max_frame: Arc::new(crate::config::DEFAULT_MAX_FRAME.into()),
            max_checkpoint: Arc::new(u64::MAX.into()),
            checkpoint_dir: None,
            group_record: None,
            on_checkpoint: None,
            replies: Arc::default(),
        };
        (ctx, TaskControl { shared })
    }

    /// Gives the context a checkpoint directory (for `detached` contexts in tests).
    pub fn with_checkpoint_dir(mut self, dir: PathBuf) -> Self {
        self.checkpoint_dir = Some(dir);
        self
    }

    /// Gives the context a file to record its process group in (for `detached` contexts in
    /// tests; see [`orphans`]).
    pub fn with_group_record(mut self, file: PathBuf) -> Self {
        self.group_record = Some(file);
        self
    }

    /// Starts the context with a checkpoint to resume from (for `detached` contexts in tests).
    pub fn with_checkpoint(self, data: Vec<u8>) -> Self {
        *self.shared.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(StoredCheckpoint {
            id: CheckpointId::random(),
            attempt: self.shared.attempt,
            data: Arc::new(data),
            piece: 0,
        });
        self
    }

    pub fn task_id(&self) -> &TaskId {
        &self.shared.task_id
    }

    pub fn attempt(&self) -> Attempt {
        self.shared.attempt
    }

    /// The outbox this context reports into (tests inspect it).
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Reports progress or state; updates coalesce, so only the latest unsent one travels.
    /// Takes a `serde_json::Value`, or a [`StateJson`] made from text the executor already has
    /// (`StateJson::from_text`), which is then sent as it is, not parsed into a tree and
    /// serialised again.
    ///
    /// A state nested deeper than [`tether_proto::msg::MAX_STATE_DEPTH`] is refused
    /// ([`StateTextError::TooDeep`]) and not sent: the coordinator could not decode it, would
    /// never acknowledge it, and the worker would resend it in every session. `?` turns the
    /// error into the attempt's failure.
    pub async fn report_state(&self, state: impl Into<StateJson>) -> Result<(), StateTextError> {
        let mut state = state.into();
        if let Err(e) = state.check_depth() {
            tracing::error!(task = %self.shared.task_id, error = %e, "a state nested too deep is refused, not sent");
            return Err(e);
        }
        self.outbox.reserve().await;
        let bytes = state.get().len();
        let limit = self.max_frame.load(Ordering::Relaxed);
        // Not sent as it is when too large: it would end the session at the coordinator's
        // limit (close 1009), and again at every resend after reconnecting.
        if !tether_proto::codec::fits(bytes, limit) {
            tracing::error!(task = %self.shared.task_id, bytes, limit, "a state larger than a message may be is replaced by a note of its size");
            state = StateJson::from(serde_json::json!({
                "state_too_large": { "bytes": bytes, "limit": limit }
            }));
        }
        *self.shared.state.lock().unwrap_or_else(|p| p.into_inner()) = state.clone();
        push_state(
            &self.outbox,
            &self.shared.task_id,
            self.shared.attempt,
            state,
        );
        Ok(())
    }

    /// Stores a checkpoint, queues its upload in bounded pieces, and then, if the task was asked
    /// to pause, parks here until resumed: a paused task stops at its next checkpoint.
    pub async fn checkpoint(&self, data: Vec<u8>) -> CheckpointId {
        let stored = self.store_checkpoint(data).await;
        let id = stored.id().clone();
        self.upload(stored).await;
        self.pause_point().await;
        id
    }

    /// The first half of [`TaskCtx::checkpoint`]: stores a checkpoint and makes it the task's
    /// latest; its upload is queued by [`TaskCtx::upload`].
    pub(crate) async fn store_checkpoint(&self, data: Vec<u8>) -> Stored {
        let piece = piece_size(
            self.chunk_size,
            self.link_piece.load(Ordering::Relaxed),
            self.max_frame.load(Ordering::Relaxed),
        );
        let order = self.shared.storing.clone().lock_owned().await;
        // Counted under the lock: the stores' order, which the id carries.
        let position = self.shared.stored.fetch_add(1, Ordering::Relaxed) + 1;
        let id = checkpoint_id(position);
        let stored = StoredCheckpoint {
            id: id.clone(),
            attempt: self.shared.attempt,
            data: Arc::new(data),
            piece,
        };
        let shared = self.shared.clone();
        let (sink, cp) = (self.on_checkpoint.clone(), stored.clone());
        // INVARIANT: the guard moves into the store and is dropped only once it landed and
        // was made the latest, even when this future is dropped meanwhile: a later store, or
        // the runner forgetting the attempt's checkpoints at its end, waits for it.
        let store = move || {
            let _order = order;
            // The attempt has ended (a store asked for by something the task left running):
            // its checkpoints are forgotten, and one stored now would outlive the task.
            if shared.ended.is_cancelled() {
                return;
            }
            if let Some(sink) = &sink {
                sink(&shared.task_id, &cp);
            }
            *shared.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(cp);
        };
        match &self.on_checkpoint {
            // The state directory writes the whole blob (and SQLite may sync): not on a
            // runtime thread, where it would stall the tasks sharing it, the session's among
            // them. Awaited: the checkpoint is stored before it counts as written.
            Some(_) => {
                if let Err(e) = tokio::task::spawn_blocking(store).await {
                    tracing::error!(task = %self.shared.task_id, checkpoint = %id, error = %e, "storing a checkpoint failed");
                }
            }
            None => store(),
        }
        self.shared
            .checkpoint_requested
            .store(false, Ordering::Relaxed);
        Stored {
            cp: stored,
            order: position,
        }
    }

    /// The second half of [`TaskCtx::checkpoint`]: queues the upload of a checkpoint
    /// [`TaskCtx::store_checkpoint`] stored, in order with the task's other uploads, each
    /// piece as the outbox has room for it. Owns what it needs, so it may run on once the
    /// attempt has ended (the last checkpoint of a worker's stop: see
    /// [`command::STOP_SHIP_LIMIT`]).
    pub(crate) fn upload(&self, stored: Stored) -> impl Future<Output = ()> + Send + 'static {
        let (shared, outbox) = (self.shared.clone(), self.outbox.clone());
        let limit = self.max_checkpoint.load(Ordering::Relaxed);
        async move {
            let Stored { cp, order } = stored;
            shared
                .upload_in_order(&outbox, &cp, order, cp.piece, limit)
                .await;
        }
    }

    /// The latest checkpoint of this task: one written by this attempt, or the one an earlier
    /// attempt left, handed over at start.
    pub fn latest_checkpoint(&self) -> Option<Arc<Vec<u8>>> {
        self.shared.latest().map(|c| c.data)
    }

    /// Answers a checkpoint request with no checkpoint: a `checkpoint_error` saying `why`,
    /// sent directly by the session (not through the outbox, never acknowledged). It names no
    /// checkpoint: the coordinator would drop an upload under way of the one it named (the
    /// runner's re-upload of the latest).
    pub(crate) fn refuse_checkpoint(&self, why: String) {
        self.replies
            .push(WorkerMsg::CheckpointError(CheckpointError {
                task_id: self.shared.task_id.clone(),
                checkpoint_id: None,
                error: why,
                timestamp: now(),
            }));
    }

    /// Whether the coordinator asked for a checkpoint since the last one.
    pub fn checkpoint_requested(&self) -> bool {
        self.shared.checkpoint_requested.load(Ordering::Relaxed)
    }

    /// Resolves when a checkpoint is requested.
    pub async fn checkpoint_wanted(&self) {
        loop {
            let n = self.shared.checkpoint_wanted.notified();
            if self.checkpoint_requested() {
                return;
            }
            n.await;
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.is_cancelled()
    }

    /// Resolves when the task is cancelled (by the coordinator, a timeout or shutdown). Cheap
    /// to wait for alongside busier futures in a loop: polled again only once the cancellation
    /// woke the task. Making one allocates twice, so pin it once, outside the loop.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + '_ {
        crate::woken::when_woken(self.shared.cancel.cancelled())
    }

    /// Whether the task was stopped because the worker stops (not cancelled, timed out or
    /// moved): its next attempt runs on another worker, from the checkpoint this one leaves,
    /// so a checkpoint the task writes as it stops is worth shipping.
    pub fn worker_stopping(&self) -> bool {
        self.shared.worker_stopping.load(Ordering::Relaxed)
    }

    pub fn cancellation_token(&self) -> CancellationToken {
        self.shared.cancel.clone()
    }

    /// Whether a pause is requested.
    pub fn pause_requested(&self) -> bool {
        *self.shared.pause.borrow()
    }

    /// A receiver that changes when pause is requested or lifted.
    pub fn pause_watch(&self) -> watch::Receiver<bool> {
        self.shared.pause.subscribe()
    }

    /// A pause point: if a pause is requested, tells the coordinator the task is paused and
    /// waits until it is resumed or cancelled. Returns at once otherwise.
    pub async fn pause_point(&self) {
        let mut rx = self.shared.pause.subscribe();
        if !*rx.borrow_and_update() || self.is_cancelled() {
            return;
        }
        self.notice(Notice::Paused);
        self.shared.parked.store(true, Ordering::Relaxed);
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() || !*rx.borrow_and_update() {
                        break;
                    }
                }
                _ = self.shared.cancel.cancelled() => break,
            }
        }
        self.shared.parked.store(false, Ordering::Relaxed);
        if !self.is_cancelled() {
            self.notice(Notice::Resumed);
        }
    }

    /// The largest frame a message may take now: a result or state must fit in it, with
    /// [`tether_proto::codec::ENVELOPE_BYTES`] to spare ([`tether_proto::codec::fits`]).
    pub fn max_frame(&self) -> usize {
        self.max_frame.load(Ordering::Relaxed)
    }

    /// Directory whose files are shipped as checkpoints (command tasks).
    pub fn checkpoint_dir(&self) -> Option<&Path> {
        self.checkpoint_dir.as_deref()
    }

    pub(crate) fn notice(&self, kind: Notice) {
        push_notice(
            &self.outbox,
            &self.shared.task_id,
            self.shared.attempt,
            kind,
        );
    }
}

/// Drives a task from outside, for tests of executors with a detached context.
#[derive(Debug, Clone)]
pub struct TaskControl {
    pub(crate) shared: Arc<TaskShared>,
}

impl TaskControl {
    /// Stops the task as a stopping worker does (tests).
    pub fn stop_worker(&self) {
        self.shared.worker_stopping.store(true, Ordering::Relaxed);
        self.shared.cancel.cancel();
    }

    pub fn cancel(&self) {
        self.shared.cancel.cancel();
    }

    pub fn set_paused(&self, paused: bool) {
        self.shared.pause.send_replace(paused);
    }

    /// Whether the task is parked at a pause point.
    pub fn is_parked(&self) -> bool {
        self.shared.parked.load(Ordering::Relaxed)
    }

    pub fn request_checkpoint(&self) {
        self.shared
            .checkpoint_requested
            .store(true, Ordering::Relaxed);
        self.shared.checkpoint_wanted.notify_waiters();
    }

    pub fn latest_checkpoint(&self) -> Option<Arc<Vec<u8>>> {
        self.shared.latest().map(|c| c.data)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Notice {
    Cancelled,
    Paused,
    Resumed,
}

/// Queues a task's state; a newer one of the same attempt replaces an unsent older one.
pub(crate) fn push_state(outbox: &Outbox, task_id: &TaskId, attempt: Attempt, state: StateJson) {
    let task_id = task_id.clone();
    outbox.push(
        Class::State,
        Some(Coalesce::task_state(&task_id, attempt)),
        |seq| {
            WorkerMsg::TaskState(TaskState {
                seq,
                task_id,
                attempt,
                state,
                timestamp: now(),
            })
        },
    );
}

pub(crate) fn push_notice(outbox: &Outbox, task_id: &TaskId, attempt: Attempt, kind: Notice) {
    let task_id = task_id.clone();
    outbox.push(Class::Notice, None, move |seq| {
        let n = TaskNotice {
            seq,
            task_id,
            attempt,
            timestamp: now(),
        };
        match kind {
            Notice::Cancelled => WorkerMsg::TaskCancelled(n),
            Notice::Paused => WorkerMsg::TaskPaused(n),
            Notice::Resumed => WorkerMsg::TaskResumed(n),
        }
    });
}

/// Queues a checkpoint as one `checkpoint` message and its `checkpoint_data` pieces, unless
/// it is larger than the coordinator keeps (`max_checkpoint`): then it is kept only here (a
/// resume on this worker still finds it), logged and counted, and only its announcement is
/// sent, which the coordinator refuses, saying so on the task's attempt: its pieces would be
/// refused after every one had been sent.
pub(crate) async fn upload_checkpoint(
    outbox: &Outbox,
    task_id: &TaskId,
    cp: &StoredCheckpoint,
    chunk_size: usize,
    max_checkpoint: u64,
) {
    // Larger pieces rather than more than the coordinator takes (at the default frame limit,
    // a checkpoint would need to pass 1 TiB for such a piece not to fit in a frame).
    let most = usize::try_from(tether_proto::codec::MAX_CHECKPOINT_CHUNKS).unwrap_or(usize::MAX);
    let chunk_size = chunk_size.max(1).max(cp.data.len().div_ceil(most));
    let pieces: Vec<&[u8]> = if cp.data.is_empty() {
        vec![&[][..]]
    } else {
        cp.data.chunks(chunk_size).collect()
    };
    let size = cp.data.len() as u64;
    let too_large = size > max_checkpoint;
    if too_large {
        metrics::counter!(crate::metrics::CHECKPOINTS_TOO_LARGE).increment(1);
        tracing::error!(task = %task_id, checkpoint = %cp.id, size, limit = max_checkpoint, "checkpoint larger than the coordinator keeps: not uploaded (a resume elsewhere starts from an earlier one)");
    } else {
        metrics::counter!(crate::metrics::CHECKPOINT_BYTES).increment(size);
    }
    outbox.reserve().await;
    outbox.push(Class::State, None, |seq| {
        WorkerMsg::Checkpoint(Checkpoint {
            seq,
            task_id: task_id.clone(),
            attempt: cp.attempt,
            checkpoint_id: cp.id.clone(),
            size: cp.data.len() as u64,
            chunks: pieces.len() as u32,
            timestamp: now(),
        })
    });
    if too_large {
        return;
    }
    for (i, piece) in pieces.into_iter().enumerate() {
        outbox.reserve().await;
        // The attempt's result was acknowledged meanwhile: the coordinator would store none of
        // what is left (and the outbox would not hold it).
        if outbox.is_settled(task_id, cp.attempt) {
            tracing::debug!(task = %task_id, checkpoint = %cp.id, left = cp.data.len().div_ceil(chunk_size) - i, "the attempt's result was acknowledged: the rest of its checkpoint is not queued");
            return;
        }
        // Journaled by where it lies in the checkpoint, which the state directory holds
        // already: its bytes are not written again, under the outbox's lock.
        let offset = (i * chunk_size) as u64;
        outbox.push_piece(offset, |seq| {
            WorkerMsg::CheckpointData(CheckpointData {
                seq,
                task_id: task_id.clone(),
                attempt: cp.attempt,
                checkpoint_id: cp.id.clone(),
                chunk: i as u32,
                data: Blob(piece.to_vec()),
                timestamp: now(),
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(Arc<AtomicU64>);

    impl Executor for Counting {
        fn execute(
            &self,
            _input: TaskInput,
            _ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            let n = self.0.clone();
            Box::pin(async move {
                n.fetch_add(1, Ordering::SeqCst);
                Ok(serde_json::json!({}))
            })
        }
    }

    /// Panics when called (`at_call`) or when its future is first polled.
    struct Panicking {
        at_call: bool,
    }

    impl Executor for Panicking {
        fn execute(
            &self,
            _input: TaskInput,
            _ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            if self.at_call {
                panic!("boom at the call");
            }
            Box::pin(async move { panic!("boom in task {}", 7) })
        }
    }

    #[tokio::test]
    async fn a_panicking_executor_fails_its_attempt_once_and_is_counted_as_failed() {
        let mut reg = Executors::default();
        reg.register("call", Panicking { at_call: true });
        reg.register("poll", Panicking { at_call: false });
        for (kind, message) in [("call", "boom at the call"), ("poll", "boom in task 7")] {
            let m = reg.get(kind).expect("registered");
            let (ctx, _) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
            let err = m.run(input(), ctx).await.expect_err("a panic is a failure");
            assert_eq!(err, ExecError::Panicked(message.into()));
            assert_eq!(err.to_string(), format!("executor panicked: {message}"));
            assert_eq!(m.metrics.executions.load(Ordering::SeqCst), 1);
            assert_eq!(m.metrics.failed.load(Ordering::SeqCst), 1);
            assert_eq!(m.metrics.completed.load(Ordering::SeqCst), 0);
        }
    }

    fn input() -> TaskInput {
        TaskInput {
            task_id: TaskId::parse("t").expect("id"),
            attempt: Attempt(1),
            config: serde_json::Value::Null,
            timeout: None,
        }
    }

    #[tokio::test]
    async fn the_metrics_layer_calls_its_executor_exactly_once_per_run() {
        let calls = Arc::new(AtomicU64::new(0));
        let mut reg = Executors::default();
        reg.register("count", Counting(calls.clone()));
        let m = reg.get("count").expect("registered");
        for _ in 0..3 {
            let (ctx, _) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
            m.run(input(), ctx).await.expect("ok");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(reg.executions(), 3);
        assert_eq!(m.metrics.completed.load(Ordering::SeqCst), 3);
    }

    /// A state made from text travels as that text, and replaces the unsent one (made from a
    /// tree) before it.
    #[tokio::test]
    async fn a_state_reported_as_text_travels_as_that_text_and_coalesces() {
        let (ctx, _) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        ctx.report_state(serde_json::json!({"n": 1}))
            .await
            .expect("sent");
        let text = r#"{ "n" : 2,"pad":"x" }"#;
        ctx.report_state(StateJson::from_text(text.into()).expect("json"))
            .await
            .expect("sent");
        let msgs = ctx.outbox.take_unsent(100);
        assert_eq!(msgs.len(), 1, "the first state was replaced while unsent");
        let WorkerMsg::TaskState(s) = msgs[0].1.as_ref() else {
            panic!("not a state: {:?}", msgs[0].1)
        };
        assert_eq!(s.state.get(), text);
        let encoded = tether_proto::codec::encode(msgs[0].1.as_ref());
        assert!(encoded.contains(text), "{encoded}");
    }

    /// A state made from a tree nested deeper than a message may carry is refused, not sent
    /// (the coordinator's decoder would refuse it, and never acknowledge it) nor kept as the
    /// task's state; `?` makes it the attempt's failure.
    #[tokio::test]
    async fn a_state_nested_too_deep_is_refused_and_not_sent() {
        use tether_proto::msg::MAX_STATE_DEPTH;
        let nested = |n: usize| {
            (0..n).fold(serde_json::json!(1), |v, i| match i % 2 {
                0 => serde_json::json!([v]),
                _ => serde_json::json!({ "k": v }),
            })
        };
        let (ctx, _) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        ctx.report_state(serde_json::json!({"n": 1}))
            .await
            .expect("sent");
        let deep = nested(MAX_STATE_DEPTH + 1);
        let e = ctx.report_state(deep).await.expect_err("too deep");
        assert_eq!(e, StateTextError::TooDeep);
        assert_eq!(
            *ctx.shared.state.lock().expect("lock"),
            serde_json::json!({"n": 1})
        );
        let sent = ctx.outbox.take_unsent(100);
        assert_eq!(sent.len(), 1, "{sent:?}");
        let text = tether_proto::codec::encode(sent[0].1.as_ref());
        assert!(tether_proto::codec::decode_worker(&text).is_ok());
        // At the limit it goes, and decodes at the other end.
        ctx.report_state(nested(MAX_STATE_DEPTH))
            .await
            .expect("sent");
        let sent = ctx.outbox.take_unsent(100);
        let text = tether_proto::codec::encode(sent[0].1.as_ref());
        assert!(tether_proto::codec::decode_worker(&text).is_ok());
        let failed = ExecError::from(e);
        assert!(failed.to_string().contains("nested deeper"), "{failed}");
    }

    #[test]
    fn a_checkpoint_piece_fits_in_the_frames_the_coordinator_takes() {
        let unbound = usize::MAX;
        assert_eq!(
            piece_size(DEFAULT_CHUNK_SIZE, unbound, 16 << 20),
            DEFAULT_CHUNK_SIZE
        );
        // A coordinator taking 256 KiB frames: pieces whose base64 fits with room to spare.
        let piece = piece_size(DEFAULT_CHUNK_SIZE, unbound, 256 * 1024);
        let frame = 256 * 1024;
        assert!(tether_proto::codec::fits(
            tether_proto::codec::base64_len(piece),
            frame
        ));
        assert!(piece > 150 * 1024, "{piece}");
        assert_eq!(piece_size(DEFAULT_CHUNK_SIZE, unbound, 0), 1);
        // A slow link's measure cuts them smaller still; a fast one never past the chunk size.
        assert_eq!(
            piece_size(DEFAULT_CHUNK_SIZE, 16 * 1024, 16 << 20),
            16 * 1024
        );
        assert_eq!(
            piece_size(DEFAULT_CHUNK_SIZE, 1 << 30, 16 << 20),
            DEFAULT_CHUNK_SIZE
        );
    }

    #[test]
    fn a_re_upload_is_cut_as_the_first_upload_while_those_pieces_fit_a_frame() {
        let cp = |piece| StoredCheckpoint {
            id: CheckpointId::random(),
            attempt: Attempt(1),
            data: Arc::new(vec![0; 100_000]),
            piece,
        };
        assert_eq!(reupload_piece(&cp(20_000), 256 * 1024, 16 << 20), 20_000);
        // Not cut here (handed over, fetched, read back from the state directory).
        assert_eq!(reupload_piece(&cp(0), 64 * 1024, 16 << 20), 64 * 1024);
        // Too large for the frames of the coordinator registered with since.
        let small_frames = 64 * 1024;
        let now = piece_size(DEFAULT_CHUNK_SIZE, usize::MAX, small_frames);
        assert_eq!(
            reupload_piece(&cp(DEFAULT_CHUNK_SIZE), now, small_frames),
            now
        );
    }

    /// Storing a checkpoint (the state directory writes the whole blob) runs off the thread of
    /// the task that writes it: the other tasks of that thread, the session's among them, run
    /// meanwhile. The sink here waits until another task of the (one-thread) runtime ran.
    #[tokio::test]
    async fn a_checkpoint_is_stored_off_the_runtime_thread() {
        let (ran, other_ran) = std::sync::mpsc::channel::<()>();
        let other_ran = Mutex::new(other_ran);
        let stored_after_other = Arc::new(AtomicBool::new(false));
        let seen = stored_after_other.clone();
        let sink: CheckpointSink = Arc::new(move |_, _| {
            // Bounded, so that the test fails rather than hangs.
            let rx = other_ran.lock().unwrap_or_else(|p| p.into_inner());
            let other = rx.recv_timeout(Duration::from_secs(5)).is_ok();
            seen.store(other, Ordering::SeqCst);
        });
        let (mut ctx, control) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        ctx.on_checkpoint = Some(sink);
        let other = tokio::spawn(async move { ran.send(()) });
        ctx.checkpoint(b"big".to_vec()).await;
        assert!(
            stored_after_other.load(Ordering::SeqCst),
            "the runtime's other task ran while the checkpoint was stored"
        );
        assert!(other.await.expect("joined").is_ok());
        assert_eq!(
            control.latest_checkpoint().as_deref().map(Vec::as_slice),
            Some(&b"big"[..]),
            "stored, then the latest"
        );
    }

    /// Stores of one task land in the order they were asked for, though each runs on the
    /// blocking pool: the state directory keeps only the last it was given.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_checkpoints_of_a_task_are_stored_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(AtomicBool::new(false));
        let (sink_log, sink_started) = (log.clone(), started.clone());
        let sink: CheckpointSink = Arc::new(move |_, cp| {
            // The first store is slow: without the order, the second would land before it.
            if cp.data.as_slice() == b"1" {
                sink_started.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
            }
            sink_log
                .lock()
                .expect("lock")
                .push(cp.data.as_slice().to_vec());
        });
        let (mut ctx, control) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        ctx.on_checkpoint = Some(sink);
        let first = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.checkpoint(b"1".to_vec()).await }
        });
        // The first store is under way before the second is asked for.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !started.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the first store never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ctx.checkpoint(b"2".to_vec()).await;
        first.await.expect("joined");
        assert_eq!(*log.lock().expect("lock"), [b"1".to_vec(), b"2".to_vec()]);
        assert_eq!(
            control.latest_checkpoint().as_deref().map(Vec::as_slice),
            Some(&b"2"[..])
        );
    }

    #[tokio::test]
    async fn a_checkpoint_is_uploaded_in_bounded_pieces() {
        let (mut ctx, control) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(2));
        ctx.chunk_size = 4;
        ctx.checkpoint(b"0123456789".to_vec()).await;
        let msgs = ctx.outbox.take_unsent(100);
        let kinds: Vec<&str> = msgs.iter().map(|(_, m)| m.type_name()).collect();
        assert_eq!(
            kinds,
            [
                "checkpoint",
                "checkpoint_data",
                "checkpoint_data",
                "checkpoint_data"
            ]
        );
        let mut joined = Vec::new();
        for (_, m) in &msgs {
            if let WorkerMsg::CheckpointData(d) = m.as_ref() {
                assert!(d.data.0.len() <= 4);
                assert_eq!(d.attempt, Attempt(2));
                joined.extend_from_slice(&d.data.0);
            }
        }
        assert_eq!(joined, b"0123456789");
        assert_eq!(
            control.latest_checkpoint().as_deref().map(Vec::as_slice),
            Some(&b"0123456789"[..])
        );
    }

    /// A checkpoint's id says its place among its attempt's stores (the coordinator's copy too),
    /// and an id made otherwise says none.
    #[tokio::test]
    async fn a_checkpoints_id_says_its_place_among_its_attempts_stores() {
        let (ctx, _control) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        let ids = [
            ctx.checkpoint(b"a".to_vec()).await,
            ctx.checkpoint(b"b".to_vec()).await,
        ];
        assert_eq!(ids.each_ref().map(stored_order), [Some(1), Some(2)]);
        assert_ne!(ids[0], checkpoint_id(1), "unique");
        for other in [
            "c-0123456789abcdef0123456789abcdef",
            "c-1-2",
            "s-1-3",
            "c-x-1",
        ] {
            let other = CheckpointId::parse(other).expect("id");
            assert_eq!(stored_order(&other), None, "{other}");
        }
        assert_eq!(stored_order(&CheckpointId::random()), None);
    }

    #[tokio::test]
    async fn a_checkpoint_never_comes_in_more_pieces_than_the_coordinator_takes() {
        let outbox = Outbox::new(crate::outbox::Limits {
            max_entries: usize::MAX,
            max_bytes: usize::MAX,
        });
        let most = tether_proto::codec::MAX_CHECKPOINT_CHUNKS as usize;
        let cp = StoredCheckpoint {
            id: tether_proto::CheckpointId::parse("c-many").expect("id"),
            attempt: Attempt(1),
            data: Arc::new(vec![7; 3 * most]),
            piece: 0,
        };
        // Three pieces' worth at the most pieces, in pieces of 1 byte asked: 3 bytes instead.
        upload_checkpoint(&outbox, &TaskId::parse("t").expect("id"), &cp, 1, u64::MAX).await;
        let msgs = outbox.take_unsent(usize::MAX);
        let announced = msgs.iter().find_map(|(_, m)| match m.as_ref() {
            WorkerMsg::Checkpoint(c) => Some(c.chunks),
            _ => None,
        });
        assert_eq!(announced, Some(most as u32));
        assert_eq!(msgs.len(), most + 1);
    }

    /// A checkpoint larger than the coordinator keeps is announced alone (the coordinator
    /// refuses it, saying so on the task; its pieces would be refused once every one had
    /// gone); one of the limit's size is sent whole.
    #[tokio::test]
    async fn a_checkpoint_larger_than_the_coordinator_keeps_is_not_uploaded() {
        let outbox = Outbox::new(crate::outbox::Limits {
            max_entries: usize::MAX,
            max_bytes: usize::MAX,
        });
        let task = TaskId::parse("t").expect("id");
        let cp = |id: &str, n: usize| StoredCheckpoint {
            id: tether_proto::CheckpointId::parse(id).expect("id"),
            attempt: Attempt(1),
            data: Arc::new(vec![7; n]),
            piece: 0,
        };
        upload_checkpoint(&outbox, &task, &cp("c-big", 1001), 100, 1000).await;
        let queued = outbox.take_unsent(usize::MAX);
        assert!(
            matches!(&queued[..], [(_, m)] if matches!(m.as_ref(), WorkerMsg::Checkpoint(c) if c.size == 1001)),
            "its announcement alone"
        );
        for (seq, _) in queued {
            outbox.ack(seq);
        }
        upload_checkpoint(&outbox, &task, &cp("c-fits", 1000), 100, 1000).await;
        assert_eq!(outbox.take_unsent(usize::MAX).len(), 1 + 10);
    }

    /// Two checkpoints written at once by one task (its context is shared by the parts of
    /// it): the coordinator takes the one completed last as the task's latest, so the newer
    /// one must complete last. Their uploads used to interleave, waiting for room in a full
    /// outbox, and the older one, in more pieces, completed after the newer.
    #[tokio::test]
    async fn checkpoints_written_at_once_complete_in_the_order_they_were_stored() {
        let (ctx, _control) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        let outbox = Arc::new(Outbox::new(crate::outbox::Limits {
            max_entries: 1,
            max_bytes: usize::MAX,
        }));
        let ctx = TaskCtx {
            outbox: outbox.clone(),
            chunk_size: 1,
            ..ctx
        };
        // Full: every message queued waits for one acknowledged.
        for _ in 0..2 {
            push_notice(&outbox, ctx.task_id(), Attempt(1), Notice::Paused);
        }
        let older = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.checkpoint(b"old".to_vec()).await }
        });
        while ctx.latest_checkpoint().is_none() {
            tokio::task::yield_now().await;
        }
        let newer = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.checkpoint(b"n".to_vec()).await }
        });
        let mut sent = Vec::new();
        for _ in 0..1000 {
            if older.is_finished() && newer.is_finished() && outbox.is_empty() {
                break;
            }
            match outbox.take_unsent(1).pop() {
                Some((seq, msg)) => {
                    sent.push(msg);
                    outbox.ack(seq);
                }
                None => tokio::task::yield_now().await,
            }
        }
        let (older, newer) = (older.await.expect("older"), newer.await.expect("newer"));
        let mut announced = BTreeMap::new();
        let mut completed = Vec::new();
        for msg in &sent {
            match msg.as_ref() {
                WorkerMsg::Checkpoint(c) => {
                    announced.insert(c.checkpoint_id.clone(), c.chunks);
                }
                WorkerMsg::CheckpointData(d)
                    if announced.get(&d.checkpoint_id) == Some(&(d.chunk + 1)) =>
                {
                    completed.push(d.checkpoint_id.clone());
                }
                _ => {}
            }
        }
        assert_eq!(completed, [older, newer], "completed in the order stored");
    }

    /// An upload queued after a newer checkpoint's of the same task is not queued at all (it
    /// would become the task's latest at the coordinator); neither is a re-upload of a
    /// checkpoint no longer the latest.
    #[tokio::test]
    async fn an_older_checkpoint_is_not_uploaded_after_a_newer_one() {
        let (ctx, _control) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        let cp = |id: &str| StoredCheckpoint {
            id: tether_proto::CheckpointId::parse(id).expect("id"),
            attempt: Attempt(1),
            data: Arc::new(b"x".to_vec()),
            piece: 0,
        };
        let shared = &ctx.shared;
        shared
            .upload_in_order(&ctx.outbox, &cp("c-2"), 2, 1, u64::MAX)
            .await;
        shared
            .upload_in_order(&ctx.outbox, &cp("c-1"), 1, 1, u64::MAX)
            .await;
        *shared.latest.lock().expect("latest") = Some(cp("c-2"));
        shared.reupload(&ctx.outbox, &cp("c-1"), 1, u64::MAX).await;
        let queued: Vec<_> = ctx
            .outbox
            .take_unsent(usize::MAX)
            .into_iter()
            .map(|(_, m)| match m.as_ref() {
                WorkerMsg::Checkpoint(c) => c.checkpoint_id.to_string(),
                WorkerMsg::CheckpointData(d) => d.checkpoint_id.to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(queued, ["c-2", "c-2"]);
        shared.reupload(&ctx.outbox, &cp("c-2"), 1, u64::MAX).await;
        assert_eq!(
            ctx.outbox.take_unsent(usize::MAX).len(),
            2,
            "the latest re-uploaded"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_task_parks_at_its_next_checkpoint_until_resumed() {
        let (ctx, control) = TaskCtx::detached(TaskId::parse("t").expect("id"), Attempt(1));
        control.set_paused(true);
        let task = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.checkpoint(b"x".to_vec()).await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(control.is_parked());
        assert!(!task.is_finished());
        control.set_paused(false);
        task.await.expect("joined");
        assert!(!control.is_parked());
        let kinds: Vec<&str> = ctx
            .outbox
            .take_unsent(100)
            .iter()
            .map(|(_, m)| m.type_name())
            .collect();
        assert!(kinds.contains(&"task_paused") && kinds.contains(&"task_resumed"));
    }
}
