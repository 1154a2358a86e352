//! The runner: starts one executor run per assignment on its own task, independent of the
//! connection, and turns its end into exactly one result in the outbox. Controls (cancel,
//! pause, resume, checkpoint and state requests) act on the running executor through its
//! context. The map of running tasks is behind a sync mutex that is never held across an await
//! or a call that takes it again (the original deadlocked exactly there).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_proto::msg::{
    CheckpointError, CheckpointPiece, CheckpointRequest, Directive, DirectiveAction, Disposition,
    MAX_RESULT_DEPTH, StateError, StateRequest, TaskAssignment, TaskControl, TaskResult, WorkerMsg,
    now,
};
use tether_proto::task::TaskError;
use tether_proto::{Attempt, CheckpointId, Outcome, Seq, TaskId, TaskRef};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::executor::{
    CheckpointSink, ExecError, Executors, Notice, Replies, StoredCheckpoint, TaskCtx, TaskInput,
    TaskShared, push_notice, push_state,
};
use crate::fetch::{FETCH_PIECE, FetchError, Fetches, Wanted, fetch};
use crate::outbox::{Class, Outbox};
use crate::statedir::LocalCheckpoint;

/// Finished attempts remembered to ignore a duplicated assignment.
const DONE_MEMORY: usize = 4096;

/// Longest a newer attempt of a task waits for the older one it superseded, still running here,
/// to end before it starts (and unpacks its checkpoint into the directory they share), unless
/// its executor says otherwise ([`Executor::stop_grace`](crate::Executor::stop_grace)): the
/// `command` executor's default kill grace, the reading of its output meanwhile, and a second
/// to spare. An executor that takes longer is not waited for (the wait is logged).
pub const PREDECESSOR_GRACE: Duration = Duration::from_secs(
    crate::executor::command::KILL_GRACE.as_secs()
        + crate::executor::command::PIPE_DRAIN_GRACE.as_secs()
        + 1,
);

/// Called when a task leaves the running set.
pub type FinishedHook = Arc<dyn Fn(&TaskId, Attempt) + Send + Sync>;

/// Called when a task enters the running set, before anything can report it running and
/// before its executor starts; on the blocking pool.
pub type StartHook = Arc<dyn Fn(&TaskId, Attempt, Option<u64>) + Send + Sync>;

/// Reads the latest checkpoint kept locally for a task (the state directory's). Called on the
/// blocking pool, when an attempt resumes from it.
pub type CheckpointLoader =
    Arc<dyn Fn(&TaskId) -> Result<Option<StoredCheckpoint>, String> + Send + Sync>;

/// Why a running task was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// `cancel_task`: report a cancelled result.
    Cancelled,
    /// The coordinator moved the task elsewhere: stop quietly, no result.
    Superseded,
    /// The worker is shutting down: no result if the executor stopped for it (the
    /// coordinator requeues the task); one that ended on its own meanwhile reports its result.
    Shutdown,
}

#[derive(Debug)]
struct Running {
    shared: Arc<TaskShared>,
    stop: Option<StopReason>,
    /// Its executor returned and whether it reports is decided: it is no longer running for
    /// the coordinator nor for controls, only held until its checkpoint directory is dealt
    /// with.
    ending: bool,
}

/// What the coordinator acknowledged of the upload of one checkpoint: whether it holds the
/// checkpoint complete, its announcement and every piece stored (acknowledged `recorded` or
/// `duplicate`).
#[derive(Debug)]
struct Upload {
    id: CheckpointId,
    /// Its count of pieces, once its announcement was acknowledged as stored.
    chunks: Option<u32>,
    /// The pieces acknowledged as stored, a bit an index.
    pieces: Vec<u64>,
    /// Its announcement or a piece was acknowledged `rejected` or `stale`: the coordinator
    /// never completes it from this upload.
    refused: bool,
}

impl Upload {
    fn new(id: CheckpointId) -> Self {
        Self {
            id,
            chunks: None,
            pieces: Vec::new(),
            refused: false,
        }
    }

    fn piece_stored(&mut self, chunk: u32) {
        // A piece's index is below its announcement's count, which the coordinator bounds.
        if u64::from(chunk) >= tether_proto::codec::MAX_CHECKPOINT_CHUNKS {
            return;
        }
        let (word, bit) = (chunk as usize / 64, chunk % 64);
        if self.pieces.len() <= word {
            self.pieces.resize(word + 1, 0);
        }
        self.pieces[word] |= 1 << bit;
    }

    fn has_piece(&self, chunk: u32) -> bool {
        self.pieces
            .get(chunk as usize / 64)
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// `Ok` when the coordinator holds it complete; else what it holds of it.
    fn complete(&self) -> Result<(), String> {
        let Some(n) = self.chunks else {
            return Err("its announcement was not acknowledged".into());
        };
        let stored = (0..n).filter(|&i| self.has_piece(i)).count();
        match (self.refused, stored == n as usize) {
            (false, true) => Ok(()),
            (true, _) => Err(format!(
                "refused by the coordinator ({stored} of {n} pieces stored)"
            )),
            (false, false) => Err(format!("{stored} of its {n} pieces acknowledged")),
        }
    }
}

/// What the coordinator holds of one attempt's checkpoints, as this worker knows it: kept for
/// an attempt while it runs here, and after the worker's stop stopped it until it is handed
/// back ([`Runner::handed_back`]), which forgets its latest checkpoint here only if the
/// coordinator holds it.
#[derive(Debug)]
struct Held {
    attempt: Attempt,
    /// The checkpoint its assignment named: the coordinator's latest of the task then.
    handed: Option<CheckpointId>,
    /// The newest checkpoint of the attempt whose upload was acknowledged in part or whole.
    upload: Option<Upload>,
}

impl Held {
    /// `Ok` when the coordinator holds checkpoint `id`, written by attempt `written`,
    /// complete; else why not.
    fn holds(&self, id: &CheckpointId, written: Attempt) -> Result<(), String> {
        if self.handed.as_ref() == Some(id) {
            return Ok(());
        }
        match &self.upload {
            _ if written != self.attempt => Err(format!(
                "it is the one attempt {written} left here, which this attempt resumed from, not the coordinator's"
            )),
            Some(u) if &u.id == id => u.complete(),
            _ => Err("none of its upload was acknowledged".into()),
        }
    }
}

/// An attempt the worker's stop ended without a result, not yet handed back.
#[derive(Debug)]
struct Unhanded {
    task: TaskId,
    attempt: Attempt,
    /// Its latest checkpoint, and the attempt that wrote it.
    latest: Option<(CheckpointId, Attempt)>,
}

/// An attempt that reported a result the journal could not take (the disk is full, say). Its
/// end is not recorded, nor its directory removed, until the result is journaled after all
/// ([`Runner::rejournal`]) or acknowledged ([`Runner::acknowledged`]): a crash meanwhile
/// finds it recorded as running, so the next start reports it lost with its local checkpoint,
/// and the coordinator runs it again from there rather than lose its result unseen.
#[derive(Debug)]
struct Unjournaled {
    task: TaskId,
    attempt: Attempt,
    /// The outbox entry of its result.
    seq: Seq,
    /// Its checkpoint directory, removed with its end; `None` once a newer attempt of the task
    /// was assigned, which takes the directory over.
    dir: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct Table {
    running: HashMap<TaskId, Running>,
    done: HashSet<(TaskId, Attempt)>,
    done_order: VecDeque<(TaskId, Attempt)>,
    /// Attempts ended here whose results the journal has not taken. Nearly always empty.
    unjournaled: Vec<Unjournaled>,
    /// Tasks whose checkpoint directory an unjournaled attempt's late end is removing: a newer
    /// attempt assigned meanwhile waits for the removal before it starts in the directory.
    clearing: HashMap<TaskId, CancellationToken>,
}

/// Runs assigned tasks.
pub struct Runner {
    executors: Executors,
    outbox: Arc<Outbox>,
    table: Mutex<Table>,
    tracker: TaskTracker,
    chunk_size: usize,
    /// The largest frame a message may take (the smaller of this worker's and the
    /// coordinator's limits, once it said): a bigger result is not sent as it is.
    max_frame: Arc<std::sync::atomic::AtomicUsize>,
    /// The largest checkpoint piece for the link's measured rate (`usize::MAX` until
    /// measured): on a slow link, pieces of about a second of it ([`crate::link::piece_for`]).
    link_piece: Arc<std::sync::atomic::AtomicUsize>,
    /// The most a checkpoint fetch asks for at once, for the rate the link delivers to this
    /// worker ([`Runner::size_fetches_for`]; [`FETCH_PIECE`] at most); 0 until measured.
    fetch_piece: std::sync::atomic::AtomicUsize,
    /// The largest checkpoint the coordinator keeps (its `registration_ack` says it; no limit
    /// until it did): a larger one is kept here but not uploaded.
    max_checkpoint: Arc<std::sync::atomic::AtomicU64>,
    checkpoint_root: Option<PathBuf>,
    /// Where command tasks record their process groups ([`crate::executor::orphans`]).
    group_root: Option<PathBuf>,
    on_checkpoint: Option<CheckpointSink>,
    on_finished: Option<FinishedHook>,
    on_started: Option<StartHook>,
    /// Checkpoints of tasks lost with the previous process, kept in the state directory: a
    /// fallback when the same task comes back with an older checkpoint or none. Known here by
    /// id only: most such tasks go to other workers, and their bytes are read
    /// (`load_local`) only when one comes back.
    local_checkpoints: Mutex<HashMap<TaskId, LocalCheckpoint>>,
    load_local: Option<CheckpointLoader>,
    /// Checkpoints being fetched for resumed attempts.
    fetches: Fetches,
    /// Cancelled at shutdown: a re-upload waiting for room in the outbox gives up.
    stopping: CancellationToken,
    /// Attempts the worker's shutdown stopped without a result, not yet recorded as ended
    /// (`on_finished`), each with its latest checkpoint: only once the coordinator
    /// was told the worker stopped ([`Runner::handed_back`]), and only if the coordinator
    /// holds that checkpoint. Until then it leases them here, and ends their leases only at
    /// the next process's registration, answering what that process replays of them stale:
    /// still recorded as running, they are reported lost then, with their checkpoints kept.
    unhanded: Mutex<Vec<Unhanded>>,
    /// What the coordinator acknowledged of the checkpoints of each task's attempt running
    /// here or stopped and not yet handed back; kept only when the ends of attempts are
    /// recorded (`on_finished`: a state directory).
    held: Mutex<HashMap<TaskId, Held>>,
    /// The executors' replies for the session to send (`Runner::replies`).
    replies: Arc<Replies>,
}

/// Waits, up to `grace`, until the older attempt a newer one superseded has ended:
/// both use the task's checkpoint directory (and its process-group record), and the older may
/// still write there while its processes shut down. Not cut short when the newer is stopped
/// meanwhile: the one after it waits for the newer only.
async fn wait_for_predecessor(older: &TaskShared, newer: &TaskShared, grace: Duration) {
    if older.ended.is_cancelled() {
        return;
    }
    let t0 = tokio::time::Instant::now();
    match tokio::time::timeout(grace, older.ended.cancelled()).await {
        Ok(()) => {
            tracing::info!(task = %newer.task_id, attempt = %newer.attempt, older = %older.attempt, ms = t0.elapsed().as_millis() as u64, "the older attempt ended; the newer starts");
        }
        Err(_) => {
            tracing::warn!(task = %newer.task_id, attempt = %newer.attempt, older = %older.attempt, grace_ms = grace.as_millis() as u64, "the older attempt has not ended within the grace; the newer starts anyway");
        }
    }
}

/// Whether an attempt that ended reports a result: not when superseded, nor when the
/// shutdown stopped it (`stopped`: its executor returned a cancellation; the coordinator
/// requeues it). One that ended on its own while the worker stopped reports what it produced.
/// A stop reason only ever changes towards reporting less, so a `false` stays `false`.
fn reports(stop: Option<StopReason>, stopped: bool) -> bool {
    match stop {
        None | Some(StopReason::Cancelled) => true,
        Some(StopReason::Superseded) => false,
        Some(StopReason::Shutdown) => !stopped,
    }
}

/// Records the ends of attempts (`on_finished`) on the blocking pool, and waits for it: the
/// state directory writes SQLite there, and deletes the attempts' checkpoints (which reads a
/// large one's every page), which would stall the tasks sharing a runtime thread, the
/// session's among them. A checkpoint of a newer attempt of the task is never among those
/// deleted, whenever it is stored.
async fn finish_off_thread(hook: FinishedHook, ended: Vec<(TaskId, Attempt)>) {
    if ended.is_empty() {
        return;
    }
    let record = move || {
        for (task, attempt) in &ended {
            hook(task, *attempt);
        }
    };
    if let Err(error) = tokio::task::spawn_blocking(record).await {
        tracing::error!(%error, "recording the end of a task failed");
    }
}

/// Removes a finished task's checkpoint directory, off the async threads. A failure is logged:
/// only disk space is at stake.
async fn remove_checkpoint_dir(dir: PathBuf) {
    let shown = dir.display().to_string();
    // Read-only directories the task left in it included.
    let removed =
        tokio::task::spawn_blocking(move || crate::executor::packing::remove_tree(&dir)).await;
    match removed {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(dir = %shown, %error, "could not remove a finished task's checkpoint dir");
        }
        Err(error) => {
            tracing::warn!(dir = %shown, %error, "removing a finished task's checkpoint dir failed");
        }
    }
}

/// The checkpoint an assignment carries with its bytes.
fn inline(
    r: &tether_proto::msg::CheckpointBlob,
    data: &tether_proto::task::Blob,
) -> StoredCheckpoint {
    StoredCheckpoint {
        id: r.checkpoint_id.clone(),
        attempt: r.attempt,
        data: Arc::new(data.0.clone()),
        piece: 0,
    }
}

/// Whether `earlier`, a checkpoint of the same attempt as `later`, which this worker keeps,
/// was stored before it here: unless their ids say the other order (they are the same, or
/// `earlier` was stored after).
fn stored_before(earlier: &CheckpointId, later: &CheckpointId) -> bool {
    use crate::executor::stored_order;
    earlier != later
        && match (stored_order(earlier), stored_order(later)) {
            (Some(e), Some(l)) => e < l,
            _ => true,
        }
}

/// Whether checkpoint `a` is known to have been stored before `b` of the same attempt: both
/// ids say their place, and `a`'s comes first.
fn known_older(a: &CheckpointId, b: &CheckpointId) -> bool {
    use crate::executor::stored_order;
    matches!((stored_order(a), stored_order(b)), (Some(a), Some(b)) if a < b)
}

/// Where an attempt resumes from.
#[derive(Debug)]
enum Resume {
    Afresh,
    /// The coordinator's checkpoint, sent with the assignment.
    From(StoredCheckpoint),
    /// This worker's own, kept on disk from an earlier attempt lost with the previous process:
    /// read before the attempt runs. It stays kept under the lost attempt until this task's
    /// next attempt here ends (or the next start finds the task neither running nor lost), so
    /// a second crash finds it again. With the coordinator's older one, if it sent its bytes:
    /// resumed from should the local one not read.
    Local(LocalCheckpoint, Option<StoredCheckpoint>),
    /// The coordinator's checkpoint, named without its bytes: fetched before the attempt runs
    /// (with an older one of this worker's to fall back on, if it has one, read first).
    Fetch(Wanted, Option<LocalCheckpoint>),
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

impl Runner {
    pub fn new(executors: Executors, outbox: Arc<Outbox>, chunk_size: usize) -> Self {
        Self {
            executors,
            outbox,
            table: Mutex::default(),
            tracker: TaskTracker::new(),
            chunk_size,
            max_frame: Arc::new(crate::config::DEFAULT_MAX_FRAME.into()),
            link_piece: Arc::new(usize::MAX.into()),
            fetch_piece: 0.into(),
            max_checkpoint: Arc::new(u64::MAX.into()),
            checkpoint_root: None,
            group_root: None,
            on_checkpoint: None,
            on_finished: None,
            on_started: None,
            local_checkpoints: Mutex::default(),
            load_local: None,
            fetches: Fetches::default(),
            stopping: CancellationToken::new(),
            unhanded: Mutex::default(),
            held: Mutex::default(),
            replies: Arc::default(),
        }
    }

    /// What the tasks' executors answer outside the outbox (a `checkpoint_error` once a
    /// checkpoint request's look found nothing new), for the session to send as it comes.
    pub(crate) fn replies(&self) -> &Replies {
        &self.replies
    }

    /// The largest frame a message may take (the worker's `max_frame`).
    pub fn with_max_frame(self, max_frame: usize) -> Self {
        self.max_frame.store(max_frame, Ordering::Relaxed);
        self
    }

    /// Lowers the largest frame a message may take to the coordinator's limit (its
    /// `registration_ack` says it), never above this worker's own.
    pub fn limit_frames_to(&self, coordinator: usize, own: usize) {
        self.max_frame
            .store(own.min(coordinator), Ordering::Relaxed);
    }

    /// Cuts the checkpoints written from now on into pieces of about a second of a link of
    /// `rate` bytes a second (or `chunk_size`, when smaller).
    pub fn size_pieces_for(&self, rate: f64) {
        self.link_piece
            .store(crate::link::piece_for(Some(rate)), Ordering::Relaxed);
    }

    /// Checkpoint fetches from now on ask for pieces such that the window of them in flight
    /// (`crate::fetch::FETCH_WINDOW`) holds about a second of a link delivering `rate` bytes
    /// a second to this worker: what the coordinator sends besides (assignments, cancels,
    /// acknowledgements) waits behind that, not behind a megabyte.
    pub fn size_fetches_for(&self, rate: f64) {
        let window = crate::fetch::FETCH_WINDOW as f64;
        let piece = crate::link::piece_for(Some(rate / window)).min(FETCH_PIECE);
        self.fetch_piece.store(piece, Ordering::Relaxed);
    }

    /// The largest checkpoint the coordinator keeps, as its `registration_ack` says (`None`:
    /// it says nothing, no limit).
    pub fn limit_checkpoints_to(&self, coordinator: Option<u64>) {
        self.max_checkpoint
            .store(coordinator.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Checkpoints kept locally for tasks lost with the previous process, described; `load`
    /// reads one's bytes when its task comes back.
    pub fn with_local_checkpoints(
        mut self,
        cps: impl IntoIterator<Item = (TaskId, LocalCheckpoint)>,
        load: CheckpointLoader,
    ) -> Self {
        *self
            .local_checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = cps.into_iter().collect();
        self.load_local = Some(load);
        self
    }

    /// Reads the local checkpoint `local` of `shared`'s task into its `latest`, on the
    /// blocking pool. One that cannot be read, or was replaced meanwhile, is logged and left:
    /// the attempt resumes from what `latest` holds, or afresh.
    async fn load_local(&self, shared: &TaskShared, local: &LocalCheckpoint) {
        let Some(load) = self.load_local.clone() else {
            return;
        };
        let task = shared.task_id.clone();
        let read = tokio::task::spawn_blocking(move || load(&task))
            .await
            .unwrap_or_else(|e| Err(format!("the read panicked: {e}")));
        match read {
            Ok(Some(cp)) if cp.id == local.id => {
                tracing::info!(task = %shared.task_id, attempt = %shared.attempt, checkpoint = %cp.id, bytes = cp.data.len(), "local checkpoint read");
                *shared.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(cp);
            }
            Ok(other) => {
                tracing::error!(task = %shared.task_id, attempt = %shared.attempt, checkpoint = %local.id, found = ?other.map(|c| c.id), "the local checkpoint is no longer kept; the task resumes without it");
            }
            Err(error) => {
                tracing::error!(task = %shared.task_id, attempt = %shared.attempt, checkpoint = %local.id, %error, "cannot read the local checkpoint; the task resumes without it");
            }
        }
    }

    /// The checkpoint an assignment resumes from: the coordinator's, unless this worker holds a
    /// newer one of the same task (written before it died and never uploaded in full).
    ///
    /// The local copy is newer when the coordinator has none, has one of an earlier attempt,
    /// or has one of the same attempt that this worker stored before it. One of a later
    /// attempt was written elsewhere after this one: the coordinator's wins. Of one attempt,
    /// this worker wrote both, each id saying its place among the attempt's stores
    /// ([`crate::executor::stored_order`]): the coordinator's may be the later, though this
    /// worker keeps only its latest, after a machine crash took the last commits of
    /// `checkpoints.db` and not the upload the coordinator acknowledged. Ids that say no place
    /// (made by a worker before this one) leave the local copy the newer, as it was taken.
    fn resume_point(&self, a: &TaskAssignment) -> Resume {
        let local = self
            .local_checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&a.task_id)
            // One of a later attempt than this assignment's is not this task's past: a task
            // submitted again under the same id after the first was removed long ago counts its
            // attempts from 1 again. One of an attempt up to the assignment's base is not
            // either: it is of a removed task of this id, whose attempts this task's follow.
            .filter(|l| l.attempt <= a.attempt && a.attempt_base.is_none_or(|b| l.attempt > b))
            // Nor one of another submission under this id (a removed task's, once the
            // coordinator forgot the removal too and numbers this task's attempts from 1), when
            // both say which they are of.
            .filter(|l| match (l.submit_seq, a.submit_seq) {
                (Some(kept), Some(this)) => kept == this,
                _ => true,
            });
        let remote = a.checkpoint.as_ref();
        match (local, remote) {
            (Some(l), None) => {
                tracing::info!(task = %a.task_id, checkpoint = %l.id, "resuming from the local checkpoint: the coordinator sent none");
                Resume::Local(l, None)
            }
            (Some(l), Some(r))
                if l.attempt > r.attempt
                    || (l.attempt == r.attempt && stored_before(&r.checkpoint_id, &l.id)) =>
            {
                tracing::info!(task = %a.task_id, local = %l.id, remote = %r.checkpoint_id, "resuming from the local checkpoint: newer than the coordinator's");
                Resume::Local(l, r.data.as_ref().map(|data| inline(r, data)))
            }
            (_, None) => Resume::Afresh,
            // The very checkpoint the coordinator would have this worker fetch: no need.
            (Some(l), Some(r)) if l.id == r.checkpoint_id && r.data.is_none() => {
                tracing::info!(task = %a.task_id, checkpoint = %l.id, "resuming from the local copy of the coordinator's checkpoint");
                Resume::Local(l, None)
            }
            (local, Some(r)) => match (&r.data, r.size) {
                (Some(data), _) => Resume::From(inline(r, data)),
                (None, Some(size)) => Resume::Fetch(
                    Wanted {
                        id: r.checkpoint_id.clone(),
                        attempt: r.attempt,
                        size,
                    },
                    local,
                ),
                (None, None) => {
                    tracing::error!(task = %a.task_id, checkpoint = %r.checkpoint_id, "the assignment names a checkpoint with neither its bytes nor its size; the task starts afresh");
                    Resume::Afresh
                }
            },
        }
    }

    /// Where command tasks get their checkpoint directories.
    pub fn with_checkpoint_root(mut self, root: PathBuf) -> Self {
        self.checkpoint_root = Some(root);
        self
    }

    /// Where command tasks record their process groups, for a worker that starts after a
    /// crash to kill them ([`crate::executor::orphans`]).
    pub fn with_group_root(mut self, root: PathBuf) -> Self {
        self.group_root = Some(root);
        self
    }

    /// Called whenever a task stores a checkpoint (persistence).
    pub fn with_checkpoint_sink(mut self, sink: CheckpointSink) -> Self {
        self.on_checkpoint = Some(sink);
        self
    }

    /// Called when a task leaves the running set (persistence).
    pub fn with_finished_hook(mut self, hook: FinishedHook) -> Self {
        self.on_finished = Some(hook);
        self
    }

    /// Called when a task starts (persistence).
    pub fn with_start_hook(mut self, hook: StartHook) -> Self {
        self.on_started = Some(hook);
        self
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The coordinator acknowledged `msg`, which the outbox held, with `disposition`: of a
    /// checkpoint's announcement or piece, it says what the coordinator holds of that
    /// checkpoint, which decides whether a stopped attempt's checkpoint may be forgotten here
    /// ([`Runner::handed_back`]). Acks of other messages, and of attempts no longer running
    /// nor waiting to be handed back, change nothing. Of a result the journal never took, it
    /// ends its attempt now, whatever the disposition: the outbox no longer holds the result,
    /// so nothing of it is left to keep. Of any result, whatever the disposition, the
    /// attempt's checkpoints still queued are dropped, and none more is queued
    /// ([`Outbox::settle_attempt`]): its lease has ended, and the coordinator would store
    /// none of them (docs/PROTOCOL.md, section 11).
    pub fn acknowledged(self: &Arc<Self>, msg: &WorkerMsg, disposition: Disposition) {
        let (task, attempt, id, chunks, chunk) = match msg {
            WorkerMsg::TaskResult(r) => {
                let dropped = self.outbox.settle_attempt(&r.task_id, r.attempt);
                if dropped > 0 {
                    tracing::debug!(task = %r.task_id, attempt = %r.attempt, ?disposition, dropped, "the attempt's result was acknowledged: its checkpoint pieces still queued are not sent");
                }
                if let Some(late) = self.take_unjournaled(&r.task_id, r.attempt) {
                    tracing::info!(task = %r.task_id, attempt = %r.attempt, ?disposition, "a result the journal never took was acknowledged; its attempt's end is recorded now");
                    self.tracker.spawn(self.clone().end_unjournaled(late));
                }
                return;
            }
            WorkerMsg::Checkpoint(c) => (
                &c.task_id,
                c.attempt,
                &c.checkpoint_id,
                Some(c.chunks),
                None,
            ),
            WorkerMsg::CheckpointData(d) => {
                (&d.task_id, d.attempt, &d.checkpoint_id, None, Some(d.chunk))
            }
            _ => return,
        };
        let stored = matches!(disposition, Disposition::Recorded | Disposition::Duplicate);
        let mut held = self.held();
        let Some(h) = held.get_mut(task).filter(|h| h.attempt == attempt) else {
            return;
        };
        let upload = match &mut h.upload {
            Some(u) if &u.id == id => u,
            // An ack of a checkpoint stored before the one followed: not the attempt's latest.
            Some(u) if known_older(id, &u.id) => return,
            slot => slot.insert(Upload::new(id.clone())),
        };
        match (stored, chunks, chunk) {
            (false, _, _) => upload.refused = true,
            (true, Some(n), _) => upload.chunks = Some(n),
            (true, None, Some(i)) => upload.piece_stored(i),
            (true, None, None) => {}
        }
    }

    /// Forgets what the coordinator holds of `attempt` of `task` (its end is recorded).
    fn forget_held(&self, task: &TaskId, attempt: Attempt) {
        let mut held = self.held();
        if held.get(task).is_some_and(|h| h.attempt == attempt) {
            held.remove(task);
        }
    }

    pub fn executors(&self) -> &Executors {
        &self.executors
    }

    /// Tasks executing now, for heartbeats and the inventory.
    pub fn active(&self) -> Vec<TaskRef> {
        let t = self.table();
        let mut v: Vec<TaskRef> = t
            .running
            .values()
            // One not yet recorded as running in the state directory is not reported running:
            // a crash before the record would not report it lost.
            .filter(|r| r.stop.is_none() && !r.ending && r.shared.recorded.is_cancelled())
            .map(|r| TaskRef {
                task_id: r.shared.task_id.clone(),
                attempt: r.shared.attempt,
                paused: *r.shared.pause.borrow(),
            })
            .collect();
        v.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        v
    }

    pub fn running_count(&self) -> usize {
        self.table().running.len()
    }

    /// Starts an assignment, unless this attempt already runs or finished here.
    pub fn assign(self: &Arc<Self>, a: TaskAssignment) {
        let key = (a.task_id.clone(), a.attempt);
        let (shared, local, fetch, predecessor, clearing) = {
            let mut t = self.table();
            if t.done.contains(&key) {
                tracing::debug!(task = %a.task_id, attempt = %a.attempt, "assignment of a finished attempt ignored");
                return;
            }
            let mut predecessor = None;
            if let Some(r) = t.running.get_mut(&a.task_id) {
                if r.shared.attempt >= a.attempt {
                    tracing::debug!(task = %a.task_id, attempt = %a.attempt, "duplicate assignment ignored");
                    return;
                }
                // An older attempt of the same task is superseded by this one, which starts
                // once it ended.
                r.stop = Some(StopReason::Superseded);
                r.shared.cancel.cancel();
                predecessor = Some(r.shared.clone());
            }
            let (latest, local, fetch) = match self.resume_point(&a) {
                Resume::Afresh => (None, None, None),
                Resume::From(cp) => (Some(cp), None, None),
                Resume::Local(local, fallback) => (fallback, Some(local), None),
                Resume::Fetch(wanted, fallback) => (None, fallback, Some(wanted)),
            };
            let shared = TaskShared::new(a.task_id.clone(), a.attempt, latest);
            // The task's directory is this attempt's now, not an older one's left to remove
            // with its late end; one being removed is waited for.
            for u in t.unjournaled.iter_mut().filter(|u| u.task == a.task_id) {
                u.dir = None;
            }
            let clearing = t.clearing.get(&a.task_id).cloned();
            // With nothing to record it in, it is recorded as it enters the table; otherwise
            // on the blocking pool, by its own task (`record_start`), and `active()` leaves it
            // out until then.
            if self.on_started.is_none() {
                shared.recorded.cancel();
            }
            t.running.insert(
                a.task_id.clone(),
                Running {
                    shared: shared.clone(),
                    stop: None,
                    ending: false,
                },
            );
            (shared, local, fetch, predecessor, clearing)
        };
        if self.on_finished.is_some() {
            let held = Held {
                attempt: a.attempt,
                handed: a.checkpoint.as_ref().map(|c| c.checkpoint_id.clone()),
                upload: None,
            };
            self.held().insert(a.task_id.clone(), held);
        }
        let this = self.clone();
        let grace = self
            .executors
            .get(&a.kind)
            .map_or(PREDECESSOR_GRACE, |e| e.stop_grace());
        self.tracker.spawn(async move {
            this.record_start(&shared, predecessor.as_deref(), a.submit_seq)
                .await;
            if let Some(older) = predecessor {
                wait_for_predecessor(&older, &shared, grace).await;
            }
            if let Some(clearing) = clearing {
                clearing.cancelled().await;
            }
            this.execute(a, shared, local, fetch).await
        });
    }

    /// Records the attempt `shared` as running (`on_started`) on the blocking pool, and waits
    /// for it: the state directory writes SQLite there, which would stall the tasks sharing a
    /// runtime thread, the session's among them (it was written under the table lock, on the
    /// thread that called `assign`). Awaited before its executor starts, so a crash from then
    /// on reports the attempt lost; and only once the start of the `older` attempt it
    /// superseded was recorded, whose record would otherwise replace this one's (the running
    /// set holds one attempt a task). A failed record is logged: the task still runs.
    async fn record_start(
        &self,
        shared: &TaskShared,
        older: Option<&TaskShared>,
        submit_seq: Option<u64>,
    ) {
        let Some(hook) = self.on_started.clone() else {
            return;
        };
        if let Some(older) = older {
            older.recorded.cancelled().await;
        }
        let (task, attempt) = (shared.task_id.clone(), shared.attempt);
        let record = move || hook(&task, attempt, submit_seq);
        if let Err(error) = tokio::task::spawn_blocking(record).await {
            tracing::error!(task = %shared.task_id, attempt = %shared.attempt, %error, "recording the start of a task failed");
        }
        shared.recorded.cancel();
    }

    /// A piece of a checkpoint being fetched (`checkpoint_piece`).
    pub fn checkpoint_piece(&self, piece: CheckpointPiece) {
        self.fetches.deliver(piece);
    }

    /// Fetches the checkpoint an attempt resumes from into its `latest` (which holds until then
    /// an older one of this worker's, or nothing). `false` when the attempt is to stop: it was
    /// stopped meanwhile, or the coordinator says it holds no lease (it ends without a result).
    /// One the coordinator cannot serve at all (not found, too large: [`FetchError::Failed`])
    /// resumes from what `latest` holds, or afresh; one it is only too busy to serve now is
    /// asked for again until it comes ([`crate::fetch::MAX_RETRY_DELAY`]).
    async fn fetch_checkpoint(&self, shared: &TaskShared, wanted: &Wanted) -> bool {
        let piece = || {
            let most = tether_proto::codec::largest_blob(self.max_frame.load(Ordering::Relaxed));
            match self.fetch_piece.load(Ordering::Relaxed) {
                0 => (most.min(crate::fetch::FIRST_PIECE), false),
                p => (most.min(p), true),
            }
        };
        let t0 = tokio::time::Instant::now();
        match fetch(&self.outbox, &self.fetches, shared, wanted, piece).await {
            Ok(cp) => {
                tracing::info!(task = %shared.task_id, attempt = %shared.attempt, checkpoint = %cp.id, bytes = cp.data.len(), ms = t0.elapsed().as_millis() as u64, "checkpoint fetched");
                *shared.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(cp);
                true
            }
            Err(FetchError::Stopped) => false,
            Err(FetchError::NotLeased(error)) => {
                tracing::warn!(task = %shared.task_id, attempt = %shared.attempt, %error, "the attempt holds no lease; it stops without a result");
                self.with_running(&shared.task_id, shared.attempt, |r| {
                    r.stop.get_or_insert(StopReason::Superseded);
                });
                false
            }
            Err(FetchError::Failed(error)) => {
                let fallback = shared.latest().map(|c| c.id);
                tracing::error!(task = %shared.task_id, attempt = %shared.attempt, checkpoint = %wanted.id, %error, ?fallback, "fetching the checkpoint failed; the task resumes from this worker's older checkpoint, if any, else afresh");
                true
            }
        }
    }

    async fn execute(
        self: Arc<Self>,
        a: TaskAssignment,
        shared: Arc<TaskShared>,
        local: Option<LocalCheckpoint>,
        fetch: Option<Wanted>,
    ) {
        let task_id = a.task_id.clone();
        let attempt = a.attempt;
        let started_at = now();
        let t0 = tokio::time::Instant::now();
        let checkpoint_dir = self
            .checkpoint_root
            .as_ref()
            .map(|r| r.join(task_id.as_str()));
        let ctx = TaskCtx {
            shared: shared.clone(),
            outbox: self.outbox.clone(),
            chunk_size: self.chunk_size,
            link_piece: self.link_piece.clone(),
            max_frame: self.max_frame.clone(),
            max_checkpoint: self.max_checkpoint.clone(),
            checkpoint_dir: checkpoint_dir.clone(),
            group_record: self
                .group_root
                .as_ref()
                .map(|r| crate::executor::orphans::record_file(r, &task_id)),
            on_checkpoint: self.on_checkpoint.clone(),
            replies: self.replies.clone(),
        };
        let timeout = a.timeout_ms.map(Duration::from_millis);
        let mut timed_out = false;
        // The attempt's timeout covers the fetch of its checkpoint: the coordinator's
        // backstop counts from the lease.
        let run = async {
            if let Some(local) = &local {
                self.load_local(&shared, local).await;
            }
            if let Some(wanted) = &fetch
                && !self.fetch_checkpoint(&shared, wanted).await
            {
                return Err(ExecError::Cancelled);
            }
            match self.executors.get(&a.kind) {
                None => Err(ExecError::InvalidConfig(format!(
                    "no executor for kind {:?} on this worker (it has: {})",
                    a.kind,
                    self.executors.kinds().join(", ")
                ))),
                // The config travels as text; the executor gets it as a tree.
                Some(exec) => match a.config.to_value() {
                    Ok(config) => {
                        let input = TaskInput {
                            task_id: task_id.clone(),
                            attempt,
                            config,
                            timeout,
                        };
                        exec.run(input, ctx).await
                    }
                    Err(e) => Err(ExecError::InvalidConfig(format!("config: {e}"))),
                },
            }
        };
        tokio::pin!(run);
        let res = match timeout {
            Some(limit) => tokio::select! {
                r = &mut run => r,
                _ = tokio::time::sleep(limit) => {
                    timed_out = true;
                    shared.cancel.cancel();
                    run.await
                }
            },
            None => run.await,
        };
        // Only an attempt that stopped because it was told to goes the way it was told: one
        // that ended on its own (exited 0 just before its deadline while its executor still
        // cleaned up, or finished as the worker began to stop) reports what it returned.
        let stopped = matches!(res, Err(ExecError::Cancelled | ExecError::Stopped { .. }));
        // A store the executor asked for may still run on the blocking pool though the future
        // that awaited it was dropped (cancel, timeout): its end waits for it, so the finished
        // hook's forgetting of the task's checkpoints comes after it, not before. Held until
        // that hook ran; a store asked for later finds the attempt ended and stores nothing.
        let _stores = shared.storing.clone().lock_owned().await;
        // Whether the attempt reports is decided once, here. Its entry stays in the table,
        // `ending`, until its directory was dealt with: a newer attempt of the task, which would
        // use that directory, still finds it and waits for `ended`, and controls no longer act
        // on it.
        let (stop, report) = {
            let mut t = self.table();
            let stop = match t.running.get_mut(&task_id) {
                Some(r) if Arc::ptr_eq(&r.shared, &shared) => {
                    r.ending = true;
                    r.stop
                }
                // A newer attempt replaced this one in the table.
                _ => Some(StopReason::Superseded),
            };
            let report = reports(stop, stopped);
            if report || stop != Some(StopReason::Shutdown) {
                let key = (task_id.clone(), attempt);
                if t.done.insert(key.clone()) {
                    t.done_order.push_back(key);
                    if t.done_order.len() > DONE_MEMORY
                        && let Some(old) = t.done_order.pop_front()
                    {
                        t.done.remove(&old);
                    }
                }
            }
            (stop, report)
        };
        // What a stopped attempt leaves: the output a `Stopped` executor kept, or nothing.
        let partial = || match &res {
            Err(ExecError::Stopped { result }) => result.clone(),
            _ => serde_json::json!({}),
        };
        let (mut outcome, mut result, mut error) = match &res {
            Ok(v) => (Outcome::Completed, v.clone(), None),
            Err(ExecError::Failed { message, result }) => (
                Outcome::Failed,
                result.clone(),
                Some(TaskError {
                    message: message.clone(),
                    detail: None,
                }),
            ),
            Err(ExecError::TimedOut) => (Outcome::TimedOut, partial(), None),
            Err(ExecError::Cancelled | ExecError::Stopped { .. }) if timed_out => {
                (Outcome::TimedOut, partial(), None)
            }
            Err(
                e @ (ExecError::InvalidConfig(_)
                | ExecError::Panicked(_)
                | ExecError::WorkerFault(_)),
            ) => (
                Outcome::Failed,
                serde_json::json!({}),
                Some(TaskError {
                    message: e.to_string(),
                    detail: None,
                }),
            ),
            Err(ExecError::Cancelled | ExecError::Stopped { .. }) => {
                (Outcome::Cancelled, partial(), None)
            }
        };
        // Not the task's failure: the coordinator runs it again.
        let worker_fault = matches!(res, Err(ExecError::WorkerFault(_)));
        if outcome == Outcome::TimedOut {
            error = Some(TaskError {
                message: "task timed out".into(),
                detail: None,
            });
        }
        // A result that cannot be delivered would end every session that carries it; the
        // attempt fails with why instead.
        let bytes = tether_proto::codec::json_len(&result)
            + error.as_ref().map_or(0, |e| {
                e.message.len() + e.detail.as_ref().map_or(0, String::len)
            });
        let limit = self.max_frame.load(Ordering::Relaxed);
        // Nor would one nested deeper than the other end decodes: never acknowledged, it would
        // be sent again in every session.
        let unsendable = if !tether_proto::codec::fits(bytes, limit) {
            Some(format!(
                "the result ({bytes} bytes of JSON) is larger than a message may be ({limit} bytes); it was not sent"
            ))
        } else if tether_proto::msg::value_depth(&result, MAX_RESULT_DEPTH) > MAX_RESULT_DEPTH {
            Some(format!(
                "the result is nested deeper than a message may carry ({MAX_RESULT_DEPTH} levels of arrays and objects); it was not sent"
            ))
        } else {
            None
        };
        if let Some(message) = unsendable {
            tracing::error!(task = %task_id, attempt = %attempt, %message, "the task's result cannot be sent; the attempt fails");
            outcome = Outcome::Failed;
            result = serde_json::json!({});
            error = Some(TaskError {
                message,
                detail: None,
            });
        }
        // The result's outbox entry, if the journal did not take it.
        let mut unjournaled = None;
        if report {
            let duration_ms = t0.elapsed().as_millis() as u64;
            // Once the worker is stopping, no session reads the acks that make room: the
            // result is queued (and journaled) at once rather than waiting to be dropped with
            // the process. The outbox never refuses a push.
            tokio::select! {
                () = self.outbox.reserve() => {}
                () = self.stopping.cancelled() => {}
            }
            let (seq, journaled) = self.outbox.push_journaled(Class::Result, None, |seq| {
                WorkerMsg::TaskResult(TaskResult {
                    seq,
                    task_id: task_id.clone(),
                    attempt,
                    outcome,
                    result: (&result).into(),
                    error,
                    worker_fault,
                    started_at,
                    finished_at: now(),
                    duration_ms,
                    timestamp: now(),
                })
            });
            match journaled {
                // The disk has room again, perhaps: the results it had none for go now.
                Ok(()) => self.rejournal().await,
                Err(error) => {
                    tracing::error!(task = %task_id, attempt = %attempt, seq = seq.0, %error, "the task's result is sent but not journaled: the attempt stays recorded as running, with its checkpoint directory, until the result is journaled or acknowledged (a crash meanwhile reports it lost)");
                    unjournaled = Some(seq);
                }
            }
            let status = tether_proto::TaskStatus::from(outcome).as_str();
            metrics::counter!(crate::metrics::TASKS_FINISHED, "outcome" => status).increment(1);
            crate::metrics::observe_labeled(crate::metrics::TASK_DURATION, status, t0.elapsed());
            tracing::info!(task = %task_id, attempt = %attempt, ?outcome, worker_fault, duration_ms, "task finished");
        } else {
            let reason = match stop {
                Some(StopReason::Superseded) => "a newer attempt replaced it",
                Some(StopReason::Shutdown) => "the worker is stopping",
                _ => "",
            };
            tracing::info!(task = %task_id, attempt = %attempt, reason, "task stopped without a result");
        }
        // A reported attempt's directory is of no more use: its result says how it ended. Only
        // removed once that result is journaled: a crash between the two then leaves a
        // directory behind, where the other order lost a finished result with it (the attempt
        // reported lost, and run again). Nor is the directory of one that ended without a
        // result of use, when the coordinator ended it (a `cancel` directive at registration,
        // a fetch answered `not_leased`): its checkpoints are forgotten with its end, and an
        // attempt that comes later unpacks its own checkpoint into a fresh one. Kept, they
        // stayed until the next start, each as large as the task made it.
        // Kept are the directory of one the worker's stop stopped, for the next start, and
        // the one a newer attempt of the task took over (no longer this attempt's in the
        // table): the newer may have started in it (it waited for `ended` no longer than its
        // grace). Removed before `ended`: a newer attempt of the task waits for that. Nor is
        // the directory of one whose result the journal did not take removed yet: with its end
        // (`Unjournaled`).
        let remove = self
            .with_stop(&task_id, &shared, |stop| {
                report || stop == Some(StopReason::Superseded)
            })
            .unwrap_or(false)
            && unjournaled.is_none();
        if let Some(dir) = checkpoint_dir.as_ref().filter(|_| remove) {
            remove_checkpoint_dir(dir.clone()).await;
        }
        // The executor returned: it touches the task's directory no more.
        shared.ended.cancel();
        {
            let mut t = self.table();
            if t.running
                .get(&task_id)
                .is_some_and(|r| Arc::ptr_eq(&r.shared, &shared))
            {
                t.running.remove(&task_id);
            }
            if let Some(seq) = unjournaled {
                t.unjournaled.push(Unjournaled {
                    task: task_id.clone(),
                    attempt,
                    seq,
                    dir: checkpoint_dir,
                });
            }
        }
        if let Some(seq) = unjournaled {
            self.forget_held(&task_id, attempt);
            // Acknowledged before it was listed above, it found nothing to end: ended here.
            if self.outbox.held(seq).is_none()
                && let Some(late) = self.take_unjournaled(&task_id, attempt)
            {
                self.clone().end_unjournaled(late).await;
            }
            return;
        }
        match &self.on_finished {
            // The coordinator still leases it here: see `unhanded`. Its latest checkpoint is
            // final: every store asked for landed (`_stores`), and none lands after `ended`.
            Some(_) if stop == Some(StopReason::Shutdown) && !report => {
                let latest = shared.latest().map(|c| (c.id, c.attempt));
                let mut unhanded = self.unhanded.lock().unwrap_or_else(|p| p.into_inner());
                unhanded.push(Unhanded {
                    task: task_id.clone(),
                    attempt,
                    latest,
                });
            }
            Some(hook) => {
                self.forget_held(&task_id, attempt);
                finish_off_thread(hook.clone(), vec![(task_id.clone(), attempt)]).await;
            }
            None => {}
        }
    }

    /// Takes the unjournaled `attempt` of `task` out of the table, if it is still there (its
    /// result's ack and the journal write that took it at last may race: one ends it), with
    /// the token of its directory's removal, if it removes it: not when a newer attempt of the
    /// task runs here or another removal of the directory is under way.
    fn take_unjournaled(
        &self,
        task: &TaskId,
        attempt: Attempt,
    ) -> Option<(Unjournaled, Option<CancellationToken>)> {
        let mut t = self.table();
        let i = t
            .unjournaled
            .iter()
            .position(|u| &u.task == task && u.attempt == attempt)?;
        let mut late = t.unjournaled.swap_remove(i);
        if t.running.contains_key(task) || t.clearing.contains_key(task) {
            late.dir = None;
        }
        let clearing = late.dir.is_some().then(|| {
            let token = CancellationToken::new();
            t.clearing.insert(task.clone(), token.clone());
            token
        });
        Some((late, clearing))
    }

    /// Ends an unjournaled attempt whose result is journaled or acknowledged now, as an
    /// attempt whose result the journal took at once ends: its directory removed, then its end
    /// recorded.
    async fn end_unjournaled(
        self: Arc<Self>,
        (late, clearing): (Unjournaled, Option<CancellationToken>),
    ) {
        if let Some(token) = clearing {
            if let Some(dir) = late.dir {
                remove_checkpoint_dir(dir).await;
            }
            // INVARIANT: only the one that inserted a task's token removes it (none is
            // inserted while one is there).
            self.table().clearing.remove(&late.task);
            token.cancel();
        }
        if let Some(hook) = &self.on_finished {
            finish_off_thread(hook.clone(), vec![(late.task, late.attempt)]).await;
        }
    }

    /// Writes the results the journal did not take through it again (the disk may have room
    /// now), and ends the attempts of those it takes. Stops at the first that fails: the disk
    /// is still full.
    async fn rejournal(self: &Arc<Self>) {
        let waiting: Vec<(TaskId, Attempt, Seq)> = {
            let t = self.table();
            if t.unjournaled.is_empty() {
                return;
            }
            t.unjournaled
                .iter()
                .map(|u| (u.task.clone(), u.attempt, u.seq))
                .collect()
        };
        for (task, attempt, seq) in waiting {
            match self.outbox.rejournal(seq) {
                Ok(true) => {
                    if let Some(late) = self.take_unjournaled(&task, attempt) {
                        tracing::info!(task = %task, %attempt, seq = seq.0, "a result the journal did not take is journaled now; its attempt's end is recorded");
                        self.clone().end_unjournaled(late).await;
                    }
                }
                // Acknowledged meanwhile: its ack ends it.
                Ok(false) => {}
                // Logged and counted by the outbox.
                Err(_) => return,
            }
        }
    }

    /// The coordinator was told the worker stopped (`worker_stopped` went out once every task
    /// had ended): it moves what it still leases here at once, from the checkpoints it holds.
    /// The attempts the shutdown stopped are recorded as ended now, which forgets their
    /// checkpoints here, unless the coordinator does not hold an attempt's latest checkpoint
    /// complete (its upload not all acknowledged: pieces given up as the task stopped, or
    /// still unacknowledged when the flush ended; refused; or a local checkpoint resumed from
    /// and never uploaded). Such an attempt stays recorded as running with that checkpoint,
    /// as every stopped attempt does without this call: the next start reports it lost, and
    /// should the task come back to this worker it resumes from the local copy
    /// (`Runner::resume_point`), not from the coordinator's older one.
    ///
    /// Why `worker_stopped` still goes out for it: it moves every lease of the worker, and a
    /// checkpoint that did not reach the coordinator within the flush does not reach it from a
    /// later process either (the lease ends at that process's registration, before its replay,
    /// and the coordinator deletes the attempt's unfinished uploads then), so withholding it
    /// would only hold every task of the worker for the coordinator's `lost_after` (or until
    /// this worker starts again), to resume from the same older checkpoint unless the task
    /// happens to come back here. Moved at once, the task loses what it did since the
    /// checkpoint the coordinator holds, as it would have anyway elsewhere, and this worker
    /// keeps its newer copy for the case it comes back.
    pub async fn handed_back(&self) {
        let unhanded =
            std::mem::take(&mut *self.unhanded.lock().unwrap_or_else(|p| p.into_inner()));
        let Some(hook) = &self.on_finished else {
            return;
        };
        let mut ended = Vec::with_capacity(unhanded.len());
        for Unhanded {
            task,
            attempt,
            latest,
        } in unhanded
        {
            let missing = latest.and_then(|(id, written)| {
                let held = self.held();
                let why = match held.get(&task).filter(|h| h.attempt == attempt) {
                    Some(h) => h.holds(&id, written).err(),
                    None => Some("nothing of it was acknowledged".into()),
                };
                why.map(|why| (id, why))
            });
            self.forget_held(&task, attempt);
            match missing {
                None => ended.push((task, attempt)),
                Some((checkpoint, why)) => {
                    tracing::warn!(task = %task, %attempt, %checkpoint, %why, "the coordinator does not hold the stopped attempt's latest checkpoint: it is kept here, and the attempt stays recorded as running (the next start reports it lost; should the task come back here, it resumes from this checkpoint)");
                }
            }
        }
        finish_off_thread(hook.clone(), ended).await;
    }

    /// Calls `f` with why the attempt `shared` was stopped, if it still is the one in the
    /// table; `None` if a newer attempt replaced it.
    fn with_stop<R>(
        &self,
        task: &TaskId,
        shared: &Arc<TaskShared>,
        f: impl FnOnce(Option<StopReason>) -> R,
    ) -> Option<R> {
        let t = self.table();
        match t.running.get(task) {
            Some(r) if Arc::ptr_eq(&r.shared, shared) => Some(f(r.stop)),
            _ => None,
        }
    }

    fn with_running<R>(
        &self,
        task: &TaskId,
        attempt: Attempt,
        f: impl FnOnce(&mut Running) -> R,
    ) -> Option<R> {
        let mut t = self.table();
        match t.running.get_mut(task) {
            Some(r) if r.shared.attempt == attempt && r.stop.is_none() && !r.ending => Some(f(r)),
            _ => None,
        }
    }

    /// `cancel_task`: stops the executor; it reports a cancelled result.
    pub fn cancel(&self, c: &TaskControl) {
        let hit = self.with_running(&c.task_id, c.attempt, |r| {
            r.stop = Some(StopReason::Cancelled);
            r.shared.cancel.cancel();
        });
        if hit.is_some() {
            push_notice(&self.outbox, &c.task_id, c.attempt, Notice::Cancelled);
        }
    }

    /// `pause_task`: the executor stops at its next pause point.
    pub fn pause(&self, c: &TaskControl) {
        self.with_running(&c.task_id, c.attempt, |r| r.shared.pause.send_replace(true));
    }

    /// `resume_task`.
    pub fn resume(&self, c: &TaskControl) {
        let was_parked = self.with_running(&c.task_id, c.attempt, |r| {
            r.shared.pause.send_replace(false);
            r.shared.parked.load(Ordering::Relaxed)
        });
        if was_parked == Some(false) {
            // Never reached a pause point: acknowledge the resume here.
            push_notice(&self.outbox, &c.task_id, c.attempt, Notice::Resumed);
        }
    }

    /// Applies the coordinator's reconciliation decisions after registration.
    pub fn apply_directives(&self, directives: &[Directive]) {
        for d in directives {
            match d.action {
                DirectiveAction::Continue => {
                    self.with_running(&d.task_id, d.attempt, |r| {
                        r.shared.pause.send_replace(false)
                    });
                }
                DirectiveAction::Pause => {
                    self.with_running(&d.task_id, d.attempt, |r| r.shared.pause.send_replace(true));
                }
                DirectiveAction::Cancel => {
                    let hit = self.with_running(&d.task_id, d.attempt, |r| {
                        r.stop = Some(StopReason::Superseded);
                        r.shared.cancel.cancel();
                    });
                    if hit.is_some() {
                        tracing::warn!(task = %d.task_id, attempt = %d.attempt, reason = %d.reason, "coordinator cancelled a task this worker still ran");
                    }
                }
            }
        }
    }

    /// `checkpoint_request`: re-sends the asked-for (or latest) checkpoint and asks the task for
    /// a fresh one. Returns an error message to send when there is nothing to give, unless the
    /// executor answers the request itself (`TaskShared::answers_requests`: the `command`
    /// executor looks at its checkpoint directory at once, and ships it or says why not). An
    /// operator's request (naming no checkpoint) to a task parked at a pause point is answered
    /// that it is paused: it makes none until resumed, and the latest, re-sent, is no newer
    /// than what the coordinator holds (`tether checkpoint --wait` waited out its time).
    ///
    /// Never waits: it is called on the session's task, and the re-upload waits for room in
    /// the outbox, which only the acks that task reads can make (waiting there, the session
    /// read nothing, sent no heartbeat and never ended). The re-upload runs on a task of its
    /// own, its pieces pushed in order; one under way for the attempt covers a request that
    /// comes meanwhile (the task, asked again, uploads any newer checkpoint itself).
    pub fn checkpoint_request(self: &Arc<Self>, req: &CheckpointRequest) -> Option<WorkerMsg> {
        let shared = {
            let t = self.table();
            t.running
                .get(&req.task_id)
                .filter(|r| r.shared.attempt == req.attempt)
                .map(|r| r.shared.clone())
        };
        let error = |error: String| {
            Some(WorkerMsg::CheckpointError(CheckpointError {
                task_id: req.task_id.clone(),
                checkpoint_id: req.checkpoint_id.clone(),
                error,
                timestamp: now(),
            }))
        };
        let Some(shared) = shared else {
            return error(format!("task {} is not running here", req.task_id));
        };
        shared.checkpoint_requested.store(true, Ordering::Relaxed);
        shared.checkpoint_wanted.notify_waiters();
        let answers = shared.answers_requests.load(Ordering::Relaxed);
        // Left set: the task is asked for one once it is resumed.
        let paused =
            (req.checkpoint_id.is_none() && !answers && shared.parked.load(Ordering::Relaxed))
                .then(|| error(shared.paused_answer("it is asked for one once it is resumed")))
                .flatten();
        // Only a checkpoint written by this attempt can be uploaded under it; one handed over
        // from an earlier attempt is already at the coordinator.
        let own = shared.latest().filter(|c| c.attempt == req.attempt);
        match (own, &req.checkpoint_id) {
            (Some(cp), Some(id)) if &cp.id != id => error(format!("checkpoint {id} not found")),
            (Some(cp), _) => {
                if shared.reuploading.swap(true, Ordering::AcqRel) {
                    tracing::debug!(task = %req.task_id, checkpoint = %cp.id, "a re-upload of the checkpoint is under way already");
                    return paused;
                }
                let max_frame = self.max_frame.load(Ordering::Relaxed);
                let now = crate::executor::piece_size(
                    self.chunk_size,
                    self.link_piece.load(Ordering::Relaxed),
                    max_frame,
                );
                let piece = crate::executor::reupload_piece(&cp, now, max_frame);
                let limit = self.max_checkpoint.load(Ordering::Relaxed);
                let this = self.clone();
                self.tracker.spawn(async move {
                    // Not stopped with the attempt: a re-upload cut short would leave the
                    // checkpoint incomplete at the coordinator. Only shutdown gives up.
                    tokio::select! {
                        () = shared.reupload(&this.outbox, &cp, piece, limit) => {}
                        () = this.stopping.cancelled() => {}
                    }
                    shared.reuploading.store(false, Ordering::Release);
                });
                paused
            }
            (None, Some(id)) => error(format!("checkpoint {id} not found")),
            (None, None) if answers => {
                tracing::debug!(task = %req.task_id, "no checkpoint yet: the executor answers the request once it looked");
                None
            }
            (None, None) if paused.is_some() => paused,
            (None, None) => error(format!(
                "no checkpoint for task {} yet; the task was asked for one",
                req.task_id
            )),
        }
    }

    /// `state_request`: queues the full state of one or every running task.
    pub fn state_request(&self, req: &StateRequest) -> Option<WorkerMsg> {
        let shared: Vec<Arc<TaskShared>> = {
            let t = self.table();
            t.running
                .values()
                .filter(|r| {
                    req.task_id
                        .as_ref()
                        .is_none_or(|id| id == &r.shared.task_id)
                })
                .map(|r| r.shared.clone())
                .collect()
        };
        if shared.is_empty() && req.task_id.is_some() {
            return Some(WorkerMsg::StateError(StateError {
                task_id: req.task_id.clone(),
                error: "task is not running here".into(),
                timestamp: now(),
            }));
        }
        for s in shared {
            let state = s.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
            push_state(&self.outbox, &s.task_id, s.attempt, state);
        }
        None
    }

    /// Tells every running task to stop, for the worker stops; no task starts from now on.
    /// [`Runner::shutdown`] does this first; done earlier (a stop noticed while a write
    /// waited on a slow link), it is not done twice.
    pub fn stop_tasks(&self) {
        self.stopping.cancel();
        {
            let mut t = self.table();
            for r in t.running.values_mut() {
                if *r.stop.get_or_insert(StopReason::Shutdown) == StopReason::Shutdown {
                    r.shared.worker_stopping.store(true, Ordering::Relaxed);
                }
                r.shared.cancel.cancel();
            }
        }
        self.tracker.close();
    }

    /// Stops every task (shutdown) and waits for them, up to `grace`. A task stopped this way
    /// reports nothing; one that ended on its own meanwhile has its result queued as usual.
    ///
    /// One still stopping past the grace (a `command` task's kill grace, the reading of its
    /// output, and the pack and store of the checkpoint it wrote as it stopped, which are not
    /// bounded, can take longer) is not waited for here, and not given up either: the
    /// session's flush goes on while it runs, and says `worker_stopped` only once it ended
    /// (then [`Runner::handed_back`] judges its checkpoint as any other's). Still running when
    /// the session closes, it is never handed back: it stays recorded as running, with the
    /// latest checkpoint it stored, and the next start reports it lost. Only a checkpoint not
    /// yet being stored when the process exits (its pack still running, say) is lost: a store
    /// under way runs on the blocking pool, which the runtime waits for as it ends. The next
    /// attempt then resumes from the one stored before (here, or the coordinator's).
    pub async fn shutdown(&self, grace: Duration) {
        self.stop_tasks();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            let tasks: Vec<String> = {
                let t = self.table();
                let mut v: Vec<String> = t
                    .running
                    .values()
                    .map(|r| format!("{}@{}", r.shared.task_id, r.shared.attempt))
                    .collect();
                v.sort();
                v
            };
            tracing::warn!(
                remaining = self.tracker.len(),
                ?tasks,
                grace_ms = grace.as_millis() as u64,
                "tasks did not stop within the shutdown grace: each stays recorded as running with the latest checkpoint it stored (the next start reports it lost) unless it ends before the session closes; a checkpoint it has not begun to store when the process exits is not kept"
            );
        }
    }

    /// Number of executor tasks still alive (0 after a clean shutdown).
    pub fn live_tasks(&self) -> usize {
        self.tracker.len()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::future::BoxFuture;
    use tether_proto::msg::{CheckpointBlob, now};
    use tether_proto::task::Blob;
    use tether_proto::{CheckpointId, Seq, TaskId};

    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::executor::{ExecError, Executor, TaskCtx, TaskInput};
    use crate::outbox::Limits;
    use crate::statedir::StateDir;

    /// Returns the checkpoint it was started with.
    struct Echo;

    impl Executor for Echo {
        fn execute(
            &self,
            _input: TaskInput,
            ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            Box::pin(async move {
                let cp = ctx.latest_checkpoint();
                Ok(serde_json::json!(
                    cp.map(|d| String::from_utf8_lossy(&d).into_owned())
                ))
            })
        }
    }

    /// Returns (or fails with) a result nested `config.depth` deep.
    struct Deep;

    impl Executor for Deep {
        fn execute(
            &self,
            input: TaskInput,
            _ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            Box::pin(async move {
                let depth = input.config["depth"].as_u64().unwrap_or(0);
                let result = (0..depth).fold(serde_json::json!(1), |v, i| match i % 2 {
                    0 => serde_json::json!([v]),
                    _ => serde_json::json!({ "k": v }),
                });
                match input.config["fail"] == true {
                    true => Err(ExecError::Failed {
                        message: "failed".into(),
                        result,
                    }),
                    false => Ok(result),
                }
            })
        }
    }

    /// Writes a checkpoint of `config.size` bytes, then waits to be cancelled.
    struct Checkpoints;

    impl Executor for Checkpoints {
        fn execute(
            &self,
            input: TaskInput,
            ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            Box::pin(async move {
                let size = input.config["size"].as_u64().unwrap_or(0) as usize;
                ctx.checkpoint(vec![7; size]).await;
                ctx.cancelled().await;
                Err(ExecError::Cancelled)
            })
        }
    }

    /// Writes a last checkpoint of `config.size` bytes and ends, as a command's last look at
    /// its directory after its process exited; with `size` absent, ends at once.
    struct LastCheckpoint;

    impl Executor for LastCheckpoint {
        fn execute(
            &self,
            input: TaskInput,
            ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            Box::pin(async move {
                if let Some(size) = input.config["size"].as_u64() {
                    ctx.checkpoint(vec![7; size as usize]).await;
                }
                Ok(serde_json::json!({"done": true}))
            })
        }
    }

    /// What the outbox sends in a new session, each as its type and task.
    fn replayed(outbox: &Outbox) -> Vec<(String, String)> {
        outbox.requeue_all();
        outbox
            .take_unsent(usize::MAX)
            .into_iter()
            .map(|(_, m)| {
                let task = match m.as_ref() {
                    WorkerMsg::TaskResult(r) => r.task_id.to_string(),
                    WorkerMsg::Checkpoint(c) => c.task_id.to_string(),
                    WorkerMsg::CheckpointData(d) => d.task_id.to_string(),
                    _ => String::new(),
                };
                (m.type_name().to_owned(), task)
            })
            .collect()
    }

    /// A runner whose `last` executor writes one checkpoint as it ends (see `LastCheckpoint`),
    /// cut in pieces for a link measured at 20 kB/s.
    fn last_checkpoint_runner() -> (Arc<Outbox>, Arc<Runner>) {
        let mut executors = Executors::default();
        executors.register("last", LastCheckpoint);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(Runner::new(executors, outbox.clone(), 256 * 1024));
        runner.size_pieces_for(20_000.0);
        (outbox, runner)
    }

    /// Waits until `outbox` holds `n` results, 10 s at most.
    async fn results_queued(outbox: &Outbox, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let results = || {
            outbox
                .snapshot()
                .iter()
                .filter(|(_, _, m)| matches!(m.as_ref(), WorkerMsg::TaskResult(_)))
                .count()
        };
        while results() < n {
            assert!(tokio::time::Instant::now() < deadline, "no result {n}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Results go first, in every session: one queued while its attempt's last checkpoint is
    /// still in the outbox (unacknowledged) goes ahead of that upload again after a reconnect,
    /// as it does on a slow link (the testkit's
    /// `a_result_is_not_held_behind_a_checkpoint_on_a_slow_link`). The coordinator then stores
    /// none of its pieces (the lease ended with the result): that last checkpoint is lost, by
    /// design (docs/PROTOCOL.md, section 11). A finished task is never resumed, and its result
    /// is not held back by the upload, however slow the link.
    #[tokio::test]
    async fn a_result_replayed_after_a_reconnect_goes_ahead_of_its_attempts_last_checkpoint() {
        let (outbox, runner) = last_checkpoint_runner();
        let run = |task: &str, config: serde_json::Value| {
            let mut a = assignment(task, 1, None);
            a.kind = "last".into();
            a.config = config.into();
            runner.assign(a);
        };
        run("with-cp", serde_json::json!({ "size": 50_000 }));
        results_queued(&outbox, 1).await;
        run("plain", serde_json::json!({}));
        results_queued(&outbox, 2).await;
        let cp = |ty: &str| (ty.to_owned(), "with-cp".to_owned());
        let mut want = vec![cp("task_result")];
        want.push(("task_result".to_owned(), "plain".to_owned()));
        want.push(cp("checkpoint"));
        want.extend([
            cp("checkpoint_data"),
            cp("checkpoint_data"),
            cp("checkpoint_data"),
        ]);
        for session in 1..=2 {
            assert_eq!(replayed(&outbox), want, "session {session}");
        }
        runner.shutdown(Duration::from_secs(5)).await;
    }

    /// Once the coordinator acknowledged an attempt's result, nothing more of its checkpoints
    /// goes out: the coordinator would answer each `stale` and store none (docs/PROTOCOL.md,
    /// section 11), and on a slow link each piece takes seconds. Its pieces still queued are
    /// not sent, in that session or the next, a piece in flight when the ack came is not sent
    /// again, and a re-upload of its checkpoint queues nothing; another task's checkpoint, and
    /// the same task's newer attempt's, still go out whole.
    #[tokio::test]
    async fn an_attempts_checkpoint_pieces_are_not_sent_once_its_result_is_acknowledged() {
        let (outbox, runner) = last_checkpoint_runner();
        // Each task's result is queued before the next one starts: the outbox's order is known.
        for (n, (task, attempt)) in [("done", 1), ("other", 1), ("done", 2)]
            .into_iter()
            .enumerate()
        {
            let mut a = assignment(task, attempt, None);
            a.kind = "last".into();
            a.config = serde_json::json!({ "size": 50_000 }).into();
            runner.assign(a);
            results_queued(&outbox, n + 1).await;
        }
        let of = |m: &WorkerMsg| -> (String, String, u32) {
            let (task, attempt) = match m {
                WorkerMsg::TaskResult(r) => (&r.task_id, r.attempt),
                WorkerMsg::Checkpoint(c) => (&c.task_id, c.attempt),
                WorkerMsg::CheckpointData(d) => (&d.task_id, d.attempt),
                other => panic!("{other:?}"),
            };
            (m.type_name().to_owned(), task.to_string(), attempt.0)
        };
        let sent = |batch: Vec<(Seq, Arc<WorkerMsg>)>| -> Vec<(String, String, u32)> {
            batch.iter().map(|(_, m)| of(m)).collect()
        };
        let e = |ty: &str, task: &str, attempt: u32| (ty.to_owned(), task.to_owned(), attempt);
        // The three results go out, then the announcement and first piece of done's attempt 1.
        let first = outbox.take_unsent(5);
        let done_result = first[0].0;
        assert_eq!(
            sent(first),
            [
                e("task_result", "done", 1),
                e("task_result", "other", 1),
                e("task_result", "done", 2),
                e("checkpoint", "done", 1),
                e("checkpoint_data", "done", 1),
            ]
        );
        // The coordinator acknowledges done's first result before its other pieces went out.
        let acked = outbox.take_acked(done_result).expect("held");
        runner.acknowledged(&acked, Disposition::Recorded);
        let upload = |attempt: u32| {
            let mut want = vec![e("checkpoint", "other", 1)];
            want.extend(std::iter::repeat_n(e("checkpoint_data", "other", 1), 3));
            want.push(e("checkpoint", "done", attempt));
            want.extend(std::iter::repeat_n(
                e("checkpoint_data", "done", attempt),
                3,
            ));
            want
        };
        assert_eq!(
            sent(outbox.take_unsent(usize::MAX)),
            upload(2),
            "none of done's attempt 1 after its result's ack"
        );
        // A re-upload of its checkpoint (asked for before the ack) queues nothing.
        let cp = StoredCheckpoint {
            id: CheckpointId::random(),
            attempt: Attempt(1),
            data: Arc::new(vec![1; 50_000]),
            piece: 20_000,
        };
        let before = outbox.last_seq();
        crate::executor::upload_checkpoint(
            &outbox,
            &TaskId::parse("done").expect("id"),
            &cp,
            20_000,
            u64::MAX,
        )
        .await;
        assert!(
            outbox.last_seq().0 <= before.0 + 1,
            "at most the announcement's number taken"
        );
        // A new session: the results not acknowledged, and the rest, without done's attempt 1
        // (not the piece that was in flight either).
        let mut want = vec![e("task_result", "other", 1), e("task_result", "done", 2)];
        want.extend(upload(2));
        let replayed: Vec<_> = {
            outbox.requeue_all();
            sent(outbox.take_unsent(usize::MAX))
        };
        assert_eq!(replayed, want);
        runner.shutdown(Duration::from_secs(5)).await;
    }

    /// The announcements of checkpoints in the outbox: each one's id and count of pieces.
    fn announced(outbox: &Outbox) -> Vec<(CheckpointId, u32)> {
        outbox
            .snapshot()
            .into_iter()
            .filter_map(|(_, _, m)| match m.as_ref() {
                WorkerMsg::Checkpoint(c) => Some((c.checkpoint_id.clone(), c.chunks)),
                _ => None,
            })
            .collect()
    }

    /// A checkpoint cut for a slow link, then asked for again by an operator once the link was
    /// measured faster: the re-upload announces the same pieces. The coordinator refuses an
    /// announcement of a checkpoint it is receiving with another count of pieces, and the
    /// refusal used to drop the first upload's pieces with the re-upload's: the checkpoint
    /// never completed.
    #[tokio::test]
    async fn a_re_upload_repeats_the_first_uploads_pieces_though_the_link_was_measured_since() {
        let mut executors = Executors::default();
        executors.register("cp", Checkpoints);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(Runner::new(executors, outbox.clone(), 256 * 1024));
        runner.size_pieces_for(20_000.0);
        let mut a = assignment("t", 1, None);
        a.kind = "cp".into();
        a.config = serde_json::json!({ "size": 100_000 }).into();
        runner.assign(a);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while announced(&outbox).is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "no checkpoint");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first = announced(&outbox);
        assert_eq!(first[0].1, 5, "cut in pieces of 20 kB");
        runner.size_pieces_for(10e6);
        let req = CheckpointRequest {
            task_id: TaskId::parse("t").expect("id"),
            attempt: Attempt(1),
            checkpoint_id: None,
            timestamp: now(),
        };
        assert!(runner.checkpoint_request(&req).is_none(), "re-uploaded");
        while announced(&outbox).len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no re-upload");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(announced(&outbox), [first[0].clone(), first[0].clone()]);
        runner.shutdown(Duration::from_secs(5)).await;
    }

    /// A request for a `command` task that has no checkpoint yet is left to its executor,
    /// which looks at the directory and answers why none comes (here: the task wrote none),
    /// once: the session sends the executor's answer. Before, the runner answered first that
    /// the attempt had none yet, and `tether checkpoint --wait` reported that answer, not the
    /// executor's.
    #[tokio::test]
    async fn a_request_the_command_executor_answers_itself_gets_one_answer_the_executors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let executors = Executors::builtin();
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(
            Runner::new(executors, outbox.clone(), 64 * 1024)
                .with_checkpoint_root(dir.path().join("cps")),
        );
        let ready = dir.path().join("ready");
        let stop = dir.path().join("stop");
        let mut a = assignment("t", 1, None);
        a.kind = "command".into();
        a.config = serde_json::json!({
            "shell": r#"touch "$READY"; while [ ! -e "$STOP" ]; do sleep 0.02; done"#,
            "env": {"READY": ready, "STOP": stop},
            "checkpoint_poll_ms": 60_000,
        })
        .into();
        runner.assign(a);
        let task = TaskId::parse("t").expect("id");
        let answering = || {
            runner
                .table()
                .running
                .get(&task)
                .is_some_and(|r| r.shared.answers_requests.load(Ordering::Relaxed))
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !(ready.exists() && answering()) {
            assert!(tokio::time::Instant::now() < deadline, "never watched");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let req = CheckpointRequest {
            task_id: task.clone(),
            attempt: Attempt(1),
            checkpoint_id: None,
            timestamp: now(),
        };
        assert_eq!(
            runner.checkpoint_request(&req),
            None,
            "left to the executor"
        );
        tokio::time::timeout(Duration::from_secs(10), runner.replies().ready())
            .await
            .expect("the executor answered");
        let answers = runner.replies().take();
        let [WorkerMsg::CheckpointError(e)] = &answers[..] else {
            panic!("one checkpoint_error: {answers:?}");
        };
        assert_eq!((&e.task_id, &e.checkpoint_id), (&task, &None));
        assert!(
            e.error
                .starts_with("the task has written no checkpoint in ")
                && e.error
                    .contains(&dir.path().join("cps").join("t").display().to_string()),
            "{}",
            e.error
        );
        std::fs::write(&stop, "").expect("stop");
        runner.shutdown(Duration::from_secs(10)).await;
    }

    /// An operator's request to a task parked at a pause point, which has a checkpoint of its
    /// own, is answered at once that the task is paused, naming that checkpoint; the task is
    /// asked for one once resumed. Before, the runner only re-sent that checkpoint, which the
    /// coordinator held already: `tether checkpoint --wait` waited out its whole time.
    #[tokio::test]
    async fn a_request_to_a_parked_task_is_answered_that_it_is_paused() {
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(Runner::new(Executors::builtin(), outbox.clone(), 64 * 1024));
        let mut a = assignment("t", 1, None);
        a.kind = "sleep".into();
        a.config = serde_json::json!({"ms": 20, "steps": 100_000, "checkpoint_every": 1}).into();
        runner.assign(a);
        let task = TaskId::parse("t").expect("id");
        let shared = || runner.table().running.get(&task).map(|r| r.shared.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while shared().and_then(|s| s.latest()).is_none() {
            assert!(tokio::time::Instant::now() < deadline, "no checkpoint");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let control = TaskControl {
            task_id: task.clone(),
            attempt: Attempt(1),
            reason: String::new(),
            timestamp: now(),
        };
        runner.pause(&control);
        while !shared().is_some_and(|s| s.parked.load(Ordering::Relaxed)) {
            assert!(tokio::time::Instant::now() < deadline, "never parked");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let latest = shared().and_then(|s| s.latest()).expect("a checkpoint").id;
        let req = CheckpointRequest {
            task_id: task.clone(),
            attempt: Attempt(1),
            checkpoint_id: None,
            timestamp: now(),
        };
        let Some(WorkerMsg::CheckpointError(e)) = runner.checkpoint_request(&req) else {
            panic!("no answer to a request to a paused task");
        };
        assert_eq!((&e.task_id, &e.checkpoint_id), (&task, &None));
        assert_eq!(
            e.error,
            format!(
                "the task is paused: no checkpoint is made while it is; it is asked for one once \
                 it is resumed (its latest checkpoint is {latest})"
            )
        );
        assert!(
            shared().is_some_and(|s| s.checkpoint_requested.load(Ordering::Relaxed)),
            "asked for one once resumed"
        );
        // One naming a checkpoint is the coordinator's, for pieces it lacks: re-sent, paused
        // or not.
        let named = CheckpointRequest {
            checkpoint_id: Some(latest),
            ..req
        };
        let answer = runner.checkpoint_request(&named);
        assert!(answer.is_none(), "{answer:?}");
        runner.shutdown(Duration::from_secs(10)).await;
    }

    /// A result nested deeper than the other end decodes would never be acknowledged and
    /// would go again in every session: the attempt fails saying why, in a message that
    /// decodes. One at the limit goes as it is.
    #[tokio::test]
    async fn a_result_nested_too_deep_fails_its_attempt_in_a_message_that_decodes() {
        use tether_proto::msg::MAX_RESULT_DEPTH;
        let mut executors = Executors::default();
        executors.register("deep", Deep);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(Runner::new(executors, outbox.clone(), 64 * 1024));
        let tasks = [
            ("at-limit", MAX_RESULT_DEPTH, false),
            ("too-deep", MAX_RESULT_DEPTH + 1, false),
            ("failed-too-deep", 2 * MAX_RESULT_DEPTH, true),
        ];
        for (task, depth, fail) in tasks {
            let mut a = assignment(task, 1, None);
            a.kind = "deep".into();
            a.config = serde_json::json!({ "depth": depth, "fail": fail }).into();
            runner.assign(a);
        }
        runner.tracker.close();
        runner.tracker.wait().await;
        let mut results = HashMap::new();
        for (_, m) in outbox.take_unsent(100) {
            let text = tether_proto::codec::encode(m.as_ref());
            let decoded = tether_proto::codec::decode_worker(&text);
            let Ok(WorkerMsg::TaskResult(r)) = decoded else {
                panic!("{} does not decode: {decoded:?}", m.type_name());
            };
            results.insert(r.task_id.to_string(), r);
        }
        assert_eq!(results.len(), 3);
        assert_eq!(results["at-limit"].outcome, Outcome::Completed);
        for task in ["too-deep", "failed-too-deep"] {
            let r = &results[task];
            assert_eq!(r.outcome, Outcome::Failed, "{task}");
            assert_eq!(r.result, serde_json::json!({}));
            let error = r.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
            assert!(error.contains("nested deeper"), "{task}: {error}");
        }
    }

    /// A newer attempt of a task that still runs here (the coordinator requeued it while this
    /// worker was away, and handed it back) shares its checkpoint directory and process-group
    /// record with the older one, which gets a kill grace to end. The newer waits for it: it
    /// unpacks its checkpoint only once the older can write no more, and the older's end does
    /// not remove the newer's record (a crash would then leave the newer's group running).
    #[tokio::test]
    async fn a_newer_attempt_starts_once_the_older_one_of_its_task_ended() {
        use crate::executor::command::CommandExecutor;
        let root = tempfile::tempdir().expect("tempdir");
        let groups = root.path().join("groups");
        let (runner, outbox) = command_runner(
            CommandExecutor::default().with_kill_grace(Duration::from_secs(5)),
            |r| {
                r.with_checkpoint_root(root.path().to_owned())
                    .with_group_root(groups.clone())
            },
        );
        let command = |attempt: u32, shell: &str, checkpoint: Option<Vec<u8>>| {
            let config =
                serde_json::json!({ "shell": shell, "env": { "RECORD": groups.join("t") } });
            let mut a = command_assignment("t", attempt, config);
            a.checkpoint = checkpoint.map(|data| CheckpointBlob {
                checkpoint_id: CheckpointId::parse("c-1").expect("id"),
                attempt: Attempt(attempt - 1),
                data: Some(Blob(data)),
                size: None,
            });
            a
        };
        // The older attempt writes into its directory while it shuts down.
        runner.assign(command(
            1,
            r#"trap 'sleep 0.5; echo late > "$TETHER_CHECKPOINT_DIR/late"; exit 0' TERM
               touch "$TETHER_CHECKPOINT_DIR/ready"
               while :; do sleep 0.05; done"#,
            None,
        ));
        let ready = root.path().join("t").join("ready");
        crate::testutil::wait_for("attempt 1 to start", || ready.exists()).await;
        let saved = tempfile::tempdir().expect("tempdir");
        std::fs::write(saved.path().join("saved"), "1").expect("write");
        let checkpoint = crate::executor::packing::pack(saved.path()).expect("pack");
        // The newer, once the older surely ended: what its directory holds, and its record.
        runner.assign(command(
            2,
            r#"sleep 1.5
               ls "$TETHER_CHECKPOINT_DIR"
               echo "pgid $$"
               cat "$RECORD" || echo "no record""#,
            Some(checkpoint),
        ));
        let results = results_once_ended(&runner, &outbox).await;
        assert_eq!(results.len(), 1, "the superseded attempt reports nothing");
        assert_eq!(results[0].attempt, Attempt(2));
        let value = results[0].result.to_value().expect("JSON");
        let out = value["stdout_tail"].as_str().unwrap_or_default();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.first(),
            Some(&"saved"),
            "the checkpoint alone, nothing the older attempt wrote: {out}"
        );
        assert!(
            records_its_own_group(out),
            "the newer attempt's record is there: {out}"
        );
    }

    /// Ends `stopping` after its cancel; tells when each attempt started.
    struct SlowToStop {
        stopping: Duration,
        started: Arc<Mutex<Vec<(u32, tokio::time::Instant)>>>,
    }

    impl Executor for SlowToStop {
        fn execute(
            &self,
            input: TaskInput,
            ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            let (stopping, started) = (self.stopping, self.started.clone());
            Box::pin(async move {
                started
                    .lock()
                    .expect("lock")
                    .push((input.attempt.0, tokio::time::Instant::now()));
                ctx.cancelled().await;
                tokio::time::sleep(stopping).await;
                Err(ExecError::Cancelled)
            })
        }

        fn stop_grace(&self) -> Duration {
            self.stopping * 2
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_attempt_waits_for_the_older_as_long_as_its_executor_takes_to_stop() {
        let started = Arc::new(Mutex::new(Vec::new()));
        let stopping = PREDECESSOR_GRACE * 3;
        let mut executors = Executors::default();
        executors.register(
            "echo",
            SlowToStop {
                stopping,
                started: started.clone(),
            },
        );
        let runner = Arc::new(Runner::new(
            executors,
            Arc::new(Outbox::new(Limits::default())),
            64 * 1024,
        ));
        runner.assign(assignment("t", 1, None));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let superseded = tokio::time::Instant::now();
        runner.assign(assignment("t", 2, None));
        tokio::time::sleep(stopping * 2).await;
        let started = started.lock().expect("lock").clone();
        assert_eq!(started.len(), 2, "{started:?}");
        let waited = started[1].1 - superseded;
        assert!(
            waited >= stopping,
            "the newer started {waited:?} after the older was cancelled, which took {stopping:?}"
        );
        runner.shutdown(Duration::from_secs(1)).await;
    }

    /// Waits until stopped, and records whether the stop was its worker's.
    struct SaysHowStopped(Arc<Mutex<Vec<bool>>>);

    impl Executor for SaysHowStopped {
        fn execute(
            &self,
            _input: TaskInput,
            ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            let seen = self.0.clone();
            Box::pin(async move {
                ctx.cancelled().await;
                seen.lock().expect("lock").push(ctx.worker_stopping());
                Err(ExecError::Cancelled)
            })
        }
    }

    /// A task stopped by its worker's stop is told so (it may ship a last checkpoint for its
    /// next attempt elsewhere); one cancelled by the coordinator, even during the stop, is not.
    #[tokio::test]
    async fn a_task_knows_whether_its_worker_stopped_it() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut executors = Executors::default();
        executors.register("echo", SaysHowStopped(seen.clone()));
        let runner = Arc::new(Runner::new(
            executors,
            Arc::new(Outbox::new(Limits::default())),
            64 * 1024,
        ));
        runner.assign(assignment("cancelled", 1, None));
        runner.assign(assignment("stopped", 1, None));
        tokio::task::yield_now().await;
        runner.cancel(&TaskControl {
            task_id: TaskId::parse("cancelled").expect("id"),
            attempt: Attempt(1),
            reason: String::new(),
            timestamp: now(),
        });
        runner.shutdown(Duration::from_secs(5)).await;
        let mut seen = seen.lock().expect("lock").clone();
        seen.sort();
        assert_eq!(seen, [false, true]);
    }

    /// Asks for a checkpoint, drops the future that awaits it once its store began (as a
    /// command task's supervisor does when cancelled), and returns.
    struct DropsCheckpoint {
        store_began: Arc<tokio::sync::Notify>,
        returned: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Executor for DropsCheckpoint {
        fn execute(
            &self,
            _input: TaskInput,
            ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            let (began, returned) = (self.store_began.clone(), self.returned.clone());
            Box::pin(async move {
                let began = began.notified();
                tokio::select! {
                    _ = ctx.checkpoint(b"late".to_vec()) => panic!("the store was held back"),
                    () = began => {}
                }
                returned.store(true, Ordering::SeqCst);
                Ok(serde_json::json!({}))
            })
        }
    }

    /// A checkpoint store still running on the blocking pool when the future that awaited it
    /// was dropped lands before the task's end forgets its checkpoints, not after: a finished
    /// task leaves no checkpoint in the state directory to be restored at the next start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_whose_future_was_dropped_lands_before_the_finished_task_forgets_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sd, _) = crate::statedir::StateDir::open(
            dir.path(),
            &tether_proto::WorkerId::parse("w").expect("id"),
        )
        .expect("open");
        let store_began = Arc::new(tokio::sync::Notify::new());
        let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let landed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (began, store_sd, finish_sd) = (store_began.clone(), sd.clone(), sd.clone());
        let store_landed = landed.clone();
        let mut executors = Executors::default();
        executors.register(
            "echo",
            DropsCheckpoint {
                store_began: store_began.clone(),
                returned: returned.clone(),
            },
        );
        let runner = Arc::new(
            Runner::new(
                executors,
                Arc::new(Outbox::new(Limits::default())),
                64 * 1024,
            )
            .with_checkpoint_sink(Arc::new(move |task, cp| {
                // A slow store: it lands once the test lets it (bounded, not to hang).
                began.notify_one();
                let rx = released.lock().unwrap_or_else(|p| p.into_inner());
                let _ = rx.recv_timeout(Duration::from_secs(10));
                store_sd.store_checkpoint(task, cp).expect("store");
                store_landed.store(true, Ordering::SeqCst);
            }))
            .with_finished_hook(Arc::new(move |task, attempt| {
                finish_sd.task_finished(task, attempt).expect("finished");
            })),
        );
        runner.assign(assignment("t", 1, None));
        // The executor returned, its checkpoint's future dropped, the store still under way.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !returned.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the executor never returned"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        release.send(()).expect("release");
        runner.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), runner.tracker.wait())
            .await
            .expect("the task ended");
        // The store has landed (the blocking pool runs it to its end whatever the runner does).
        while !landed.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the store never landed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stored = sd
            .latest_checkpoint(&TaskId::parse("t").expect("id"))
            .expect("read");
        assert!(
            stored.is_none(),
            "the finished task left a checkpoint: {:?}",
            stored.map(|c| c.id)
        );
    }

    /// A runner with `executor` as its `command` executor (`build` adds its roots and limits),
    /// and its outbox.
    fn command_runner(
        executor: crate::executor::command::CommandExecutor,
        build: impl FnOnce(Runner) -> Runner,
    ) -> (Arc<Runner>, Arc<Outbox>) {
        let mut executors = Executors::default();
        executors.register("command", executor);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(build(Runner::new(executors, outbox.clone(), 64 * 1024)));
        (runner, outbox)
    }

    /// Attempt `attempt` of `command` task `task` with `config`.
    fn command_assignment(task: &str, attempt: u32, config: serde_json::Value) -> TaskAssignment {
        let mut a = assignment(task, attempt, None);
        a.kind = "command".into();
        a.config = config.into();
        a
    }

    /// Whether a script's output (`pgid $$`, then `cat` of its group record) shows the
    /// record of its own process group.
    fn records_its_own_group(out: &str) -> bool {
        let pgid = out
            .lines()
            .find_map(|l| l.strip_prefix("pgid "))
            .unwrap_or("?");
        out.lines().any(|l| l.starts_with(&format!("{pgid} ")))
    }

    /// The results in `outbox` once every task `runner` was given has ended, in order.
    async fn results_once_ended(runner: &Runner, outbox: &Outbox) -> Vec<TaskResult> {
        runner.tracker.close();
        tokio::time::timeout(Duration::from_secs(30), runner.tracker.wait())
            .await
            .expect("every task ended");
        outbox
            .take_unsent(usize::MAX)
            .into_iter()
            .filter_map(|(_, m)| match m.as_ref() {
                WorkerMsg::TaskResult(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// The results in `outbox`, unsent, by task.
    fn results(outbox: &Outbox) -> HashMap<String, TaskResult> {
        outbox
            .take_unsent(usize::MAX)
            .into_iter()
            .filter_map(|(_, m)| match m.as_ref() {
                WorkerMsg::TaskResult(r) => Some((r.task_id.to_string(), r.clone())),
                _ => None,
            })
            .collect()
    }

    /// Runs one `command` task `t` of `config` (with `timeout_ms`) on `executor`, by a runner
    /// whose messages take `max_frame`, to its end; its result, the one message it sent.
    async fn run_command(
        executor: crate::executor::command::CommandExecutor,
        max_frame: usize,
        timeout_ms: Option<u64>,
        config: serde_json::Value,
    ) -> TaskResult {
        let (runner, outbox) = command_runner(executor, |r| r.with_max_frame(max_frame));
        let mut a = command_assignment("t", 1, config);
        a.timeout_ms = timeout_ms;
        runner.assign(a);
        runner.tracker.close();
        tokio::time::timeout(Duration::from_secs(30), runner.tracker.wait())
            .await
            .expect("the attempt ended");
        let msgs = outbox.take_unsent(100);
        let [(_, msg)] = msgs.as_slice() else {
            panic!("one result: {msgs:?}");
        };
        let WorkerMsg::TaskResult(r) = msg.as_ref() else {
            panic!("not a result: {msg:?}");
        };
        r.clone()
    }

    /// An attempt this worker could not run for a fault of its own, not the task's, reports
    /// `failed` with `worker_fault`, for the coordinator to run the task again: its checkpoint
    /// directory could not be made (here the tasks' root is a file, as a broken disk refuses
    /// it, root or not), or its process not started for want of processes (`EAGAIN`, injected).
    /// A program that does not exist is the task's failure, final as before.
    #[tokio::test]
    async fn an_attempt_the_worker_could_not_run_reports_a_worker_fault() {
        let root = tempfile::tempdir().expect("tempdir");
        let not_a_dir = root.path().join("tasks");
        std::fs::write(&not_a_dir, b"a file").expect("write");
        let (runner, outbox) = command_runner(Default::default(), |r| {
            r.with_checkpoint_root(not_a_dir.clone())
        });
        runner.assign(command_assignment(
            "disk",
            1,
            serde_json::json!({"shell": "exit 0"}),
        ));
        let [r] = results_once_ended(&runner, &outbox)
            .await
            .try_into()
            .expect("one result");
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
        assert!(r.worker_fault, "{r:?}");
        let message = r.error.map(|e| e.message).unwrap_or_default();
        assert!(
            message.contains("cannot prepare checkpoint dir"),
            "{message}"
        );

        let busy = "/bin/tether-test-spawn-eagain";
        crate::executor::command::SPAWN_FAILS
            .lock()
            .expect("lock")
            .push((busy.into(), nix::errno::Errno::EAGAIN));
        let (runner, outbox) = command_runner(Default::default(), |r| r);
        runner.assign(command_assignment(
            "busy",
            1,
            serde_json::json!({"program": busy}),
        ));
        runner.assign(command_assignment(
            "missing",
            1,
            serde_json::json!({"program": "/nonexistent/tether-test-program"}),
        ));
        let results: HashMap<_, _> = results_once_ended(&runner, &outbox)
            .await
            .into_iter()
            .map(|r| (r.task_id.to_string(), r))
            .collect();
        let busy = &results["busy"];
        assert_eq!(
            (busy.outcome, busy.worker_fault),
            (Outcome::Failed, true),
            "{busy:?}"
        );
        let missing = &results["missing"];
        assert_eq!(
            (missing.outcome, missing.worker_fault),
            (Outcome::Failed, false),
            "{missing:?}"
        );
    }

    /// A process that left its task's group is killed when the task times out, like the group.
    #[tokio::test]
    async fn a_timed_out_command_ends_the_processes_that_left_its_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = r#"setsid sh -c 'echo $$ > "$D/pid.tmp"; mv "$D/pid.tmp" "$D/child.pid"; exec sleep 300' >/dev/null 2>&1 &
            sleep 30"#;
        let config = serde_json::json!({"shell": script, "env": {"D": dir.path()}});
        let executor = crate::executor::command::CommandExecutor::default()
            .with_kill_grace(Duration::from_millis(200));
        let r = run_command(
            executor,
            crate::config::DEFAULT_MAX_FRAME,
            Some(3000),
            config,
        )
        .await;
        assert_eq!(r.outcome, Outcome::TimedOut);
        let pid: u32 = std::fs::read_to_string(dir.path().join("child.pid"))
            .expect("the process started before the timeout")
            .trim()
            .parse()
            .expect("pid");
        let _escaped_guard = crate::testutil::KillOnDrop(pid);
        crate::testutil::wait_for("the escaped process to die", || {
            crate::testutil::is_dead(pid)
        })
        .await;
    }

    /// The process-group record of task `x` was the path of the checkpoint directory of task
    /// `x.group` (`tasks/x.group`): whichever of the two started second failed to start or lost
    /// its record. Records have a directory of their own now.
    #[tokio::test]
    async fn tasks_x_and_x_dot_group_both_run_and_clean_up() {
        use crate::executor::command::CommandExecutor;
        let root = tempfile::tempdir().expect("tempdir");
        let (tasks, groups) = (root.path().join("tasks"), root.path().join("groups"));
        let (runner, outbox) = command_runner(CommandExecutor::default(), |r| {
            r.with_checkpoint_root(tasks.clone())
                .with_group_root(groups.clone())
        });
        for task in ["x", "x.group"] {
            let a = command_assignment(
                task,
                1,
                serde_json::json!({
                    "shell": r#"touch "$TETHER_CHECKPOINT_DIR/ready"
                    while [ ! -e "$D/go" ]; do sleep 0.02; done
                    echo "pgid $$"; cat "$RECORD""#,
                    "env": { "D": root.path(), "RECORD": groups.join(task) },
                }),
            );
            runner.assign(a);
            let ready = tasks.join(task).join("ready");
            crate::testutil::wait_for("the task to start", || ready.exists()).await;
        }
        std::fs::write(root.path().join("go"), "").expect("go");
        let results = results_once_ended(&runner, &outbox).await;
        assert_eq!(results.len(), 2);
        for r in &results {
            assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
            let value = r.result.to_value().expect("JSON");
            let out = value["stdout_tail"].as_str().unwrap_or_default();
            assert!(
                records_its_own_group(out),
                "{}: its own record: {out}",
                r.task_id
            );
        }
        let left: Vec<_> = std::fs::read_dir(&groups)
            .expect("groups")
            .flatten()
            .collect();
        assert!(left.is_empty(), "records removed: {left:?}");
        assert!(!tasks.join("x").exists() && !tasks.join("x.group").exists());
    }

    /// A command that exits 0 before its deadline, whose executor is still ending the
    /// background process it left (which ignores SIGTERM) when the timer fires, completed:
    /// the executor's answer is the outcome, not the timer's.
    #[tokio::test]
    async fn a_command_that_exited_before_its_deadline_completes_though_its_cleanup_outlasts_it() {
        use crate::executor::command::CommandExecutor;
        let r = run_command(
            CommandExecutor::default().with_kill_grace(Duration::from_secs(2)),
            crate::config::DEFAULT_MAX_FRAME,
            Some(1000),
            serde_json::json!({ "shell": "trap '' TERM; sleep 5 & sleep 0.3; exit 0" }),
        )
        .await;
        assert_eq!(r.outcome, Outcome::Completed, "{r:?}");
        assert_eq!(r.result.to_value().expect("JSON")["exit_code"], 0);
        assert!(r.error.is_none(), "{r:?}");
    }

    /// A command stopped by its timeout reports what it wrote until then: a hung test gives
    /// its output to debug it by, not `{}`.
    #[tokio::test]
    async fn a_timed_out_command_reports_the_output_it_wrote_before_its_deadline() {
        let r = run_command(
            crate::executor::command::CommandExecutor::default(),
            crate::config::DEFAULT_MAX_FRAME,
            Some(500),
            serde_json::json!({ "shell": "echo started; sleep 30" }),
        )
        .await;
        assert_eq!(r.outcome, Outcome::TimedOut, "{r:?}");
        assert_eq!(
            r.result.to_value().expect("JSON")["stdout_tail"],
            "started\n"
        );
        assert_eq!(r.result.to_value().expect("JSON")["signal"], 15);
        assert_eq!(
            r.error.as_ref().map(|e| e.message.as_str()),
            Some("task timed out")
        );
    }

    /// A task that reported its result leaves no checkpoint directory behind (a long-lived
    /// worker would fill its disk with them); one the shutdown stopped keeps its own, for the
    /// next start.
    #[tokio::test]
    async fn a_finished_task_leaves_no_checkpoint_dir_and_a_stopped_one_keeps_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let (runner, outbox) = command_runner(Default::default(), |r| {
            r.with_checkpoint_root(root.path().to_owned())
        });
        let command = |task: &str, shell: &str| {
            command_assignment(task, 1, serde_json::json!({ "shell": shell }))
        };
        runner.assign(command(
            "finished",
            r#"echo x > "$TETHER_CHECKPOINT_DIR/f""#,
        ));
        runner.assign(command(
            "stopped",
            r#"echo x > "$TETHER_CHECKPOINT_DIR/f"; sleep 30"#,
        ));
        let (finished, stopped) = (root.path().join("finished"), root.path().join("stopped"));
        let reported = || {
            let pending = outbox.pending_results();
            pending.iter().any(|r| r.task_id.as_str() == "finished")
        };
        crate::testutil::wait_for(
            "the result of one and its directory gone, and the file of the other",
            || reported() && !finished.exists() && stopped.join("f").exists(),
        )
        .await;
        runner.shutdown(Duration::from_secs(10)).await;
        let results = results(&outbox);
        assert_eq!(results["finished"].outcome, Outcome::Completed);
        assert!(!results.contains_key("stopped"), "{results:?}");
        assert!(stopped.join("f").exists(), "kept for the next start");
    }

    /// Writes `attempt-<n>` into its checkpoint directory, waits to be stopped, then takes
    /// `config.linger_ms` to return (longer than its grace: a newer attempt of its task starts
    /// meanwhile); says which attempts returned.
    struct Lingers(Arc<Mutex<Vec<u32>>>);

    impl Executor for Lingers {
        fn execute(
            &self,
            input: TaskInput,
            ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            let returned = self.0.clone();
            Box::pin(async move {
                let dir = ctx.checkpoint_dir().expect("a checkpoint dir").to_owned();
                std::fs::create_dir_all(&dir).expect("dir");
                let mine = dir.join(format!("attempt-{}", input.attempt.0));
                std::fs::write(mine, "x").expect("write");
                ctx.cancelled().await;
                let linger = input.config["linger_ms"].as_u64().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(linger)).await;
                returned.lock().expect("lock").push(input.attempt.0);
                Err(ExecError::Cancelled)
            })
        }

        fn stop_grace(&self) -> Duration {
            Duration::from_millis(50)
        }
    }

    /// An attempt the coordinator cancelled at registration (a `cancel` directive: it moved
    /// the task on while this worker was away) leaves no checkpoint directory behind: it
    /// kept `tasks/<task>/` until the next start, however large. The directory a newer attempt
    /// of the task took over is not the older one's to remove, though the older ends after the
    /// newer started in it.
    #[tokio::test]
    async fn an_attempt_cancelled_by_a_directive_leaves_no_checkpoint_dir_but_not_its_successors() {
        let root = tempfile::tempdir().expect("tempdir");
        let returned = Arc::new(Mutex::new(Vec::new()));
        let mut executors = Executors::default();
        executors.register("echo", Lingers(returned.clone()));
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(
            Runner::new(executors, outbox.clone(), 64 * 1024)
                .with_checkpoint_root(root.path().to_owned()),
        );
        let cancel = |task: &str, attempt: u32| Directive {
            task_id: TaskId::parse(task).expect("id"),
            attempt: Attempt(attempt),
            action: DirectiveAction::Cancel,
            reason: "the task moved on".into(),
        };
        runner.assign(assignment("cancelled", 1, None));
        let cancelled = root.path().join("cancelled");
        crate::testutil::wait_for("the attempt to write", || {
            cancelled.join("attempt-1").exists()
        })
        .await;
        runner.apply_directives(&[cancel("cancelled", 1)]);
        crate::testutil::wait_for("the attempt to end", || runner.running_count() == 0).await;
        assert!(!cancelled.exists(), "its directory is removed");
        returned.lock().expect("lock").clear();

        let mut older = assignment("t", 1, None);
        older.config = serde_json::json!({ "linger_ms": 1000 }).into();
        runner.assign(older);
        let t = root.path().join("t");
        crate::testutil::wait_for("attempt 1 to write", || t.join("attempt-1").exists()).await;
        runner.assign(assignment("t", 2, None));
        crate::testutil::wait_for("attempt 2 to write", || t.join("attempt-2").exists()).await;
        assert!(
            returned.lock().expect("lock").is_empty(),
            "the older lingers"
        );
        crate::testutil::wait_for("attempt 1 to end", || runner.live_tasks() == 1).await;
        assert_eq!(*returned.lock().expect("lock"), [1]);
        assert!(
            t.join("attempt-2").exists(),
            "the older's end leaves the newer's directory"
        );
        runner.apply_directives(&[cancel("t", 2)]);
        crate::testutil::wait_for("attempt 2 to end", || runner.running_count() == 0).await;
        assert!(!t.exists(), "the newer's own end removes it");
        assert!(outbox.pending_results().is_empty(), "none reported");
    }

    /// Sees, as each result is journaled, whether its task's checkpoint directory is there.
    struct DirWitness {
        root: PathBuf,
        seen: Mutex<Vec<(String, bool)>>,
    }

    impl crate::outbox::Journal for DirWitness {
        fn write(
            &self,
            put: Option<crate::outbox::Put<'_>>,
            _removed: &[Seq],
        ) -> Result<(), crate::outbox::JournalError> {
            if let Some(put) = put
                && let WorkerMsg::TaskResult(r) = put.msg
            {
                let there = self.root.join(r.task_id.as_str()).exists();
                let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                seen.push((r.task_id.to_string(), there));
            }
            Ok(())
        }
    }

    /// A finished task's result is journaled before its checkpoint directory is removed: the
    /// other way round, a crash between the two lost the result (the attempt, reported lost,
    /// ran again: a command with side effects twice), where now it leaves only a directory.
    #[tokio::test]
    async fn a_finished_tasks_result_is_journaled_before_its_checkpoint_dir_is_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let witness = Arc::new(DirWitness {
            root: root.path().to_owned(),
            seen: Mutex::new(Vec::new()),
        });
        let mut executors = Executors::default();
        executors.register(
            "command",
            crate::executor::command::CommandExecutor::default(),
        );
        let outbox = Arc::new(Outbox::new(Limits::default()).with_journal(witness.clone()));
        let runner = Arc::new(
            Runner::new(executors, outbox.clone(), 64 * 1024)
                .with_checkpoint_root(root.path().to_owned()),
        );
        runner.assign(command_assignment(
            "t",
            1,
            serde_json::json!({ "shell": r#"echo x > "$TETHER_CHECKPOINT_DIR/f""# }),
        ));
        let results = results_once_ended(&runner, &outbox).await;
        assert_eq!(results.len(), 1, "{results:?}");
        assert_eq!(results[0].outcome, Outcome::Completed);
        let seen = witness
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        assert_eq!(
            seen,
            [("t".to_owned(), true)],
            "the directory as the result was journaled"
        );
        assert!(!root.path().join("t").exists(), "removed once it was");
    }

    /// A journal whose disk has no room for a result while `full` is set (a result is the
    /// large insert; anything else still fits).
    struct FullForResults {
        full: AtomicBool,
    }

    impl crate::outbox::Journal for FullForResults {
        fn write(
            &self,
            put: Option<crate::outbox::Put<'_>>,
            _: &[Seq],
        ) -> Result<(), crate::outbox::JournalError> {
            match put {
                Some(p) if p.class == Class::Result && self.full.load(Ordering::SeqCst) => Err(
                    crate::outbox::JournalError("database or disk is full".into()),
                ),
                _ => Ok(()),
            }
        }
    }

    /// A result the journal could not take ends its attempt (its end recorded, its directory
    /// removed) only once the result is acknowledged, or journaled after all at the next
    /// result, the disk having room again: ended before, a crash lost the result, and the
    /// attempt was not reported lost.
    #[tokio::test]
    async fn a_result_the_journal_did_not_take_ends_its_attempt_once_acknowledged_or_journaled() {
        let root = tempfile::tempdir().expect("tempdir");
        let journal = Arc::new(FullForResults {
            full: AtomicBool::new(true),
        });
        let mut executors = Executors::default();
        executors.register(
            "command",
            crate::executor::command::CommandExecutor::default(),
        );
        let outbox = Arc::new(Outbox::new(Limits::default()).with_journal(journal.clone()));
        let ended = Arc::new(Mutex::new(Vec::new()));
        let record = ended.clone();
        let runner = Arc::new(
            Runner::new(executors, outbox.clone(), 64 * 1024)
                .with_checkpoint_root(root.path().to_owned())
                .with_finished_hook(Arc::new(move |t, _| {
                    record.lock().expect("lock").push(t.to_string());
                })),
        );
        let writes = serde_json::json!({ "shell": r#"echo x > "$TETHER_CHECKPOINT_DIR/f""# });
        let idle = || async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while runner.live_tasks() > 0 {
                assert!(tokio::time::Instant::now() < deadline, "tasks still live");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let ended = || ended.lock().expect("lock").clone();
        let kept = |task: &str| root.path().join(task).join("f").exists();
        for task in ["t", "u"] {
            runner.assign(command_assignment(task, 1, writes.clone()));
            idle().await;
        }
        assert_eq!(outbox.journal_failures.load(Ordering::Relaxed), 2);
        assert!(ended().is_empty(), "{:?}", ended());
        assert!(kept("t") && kept("u"), "their directories are kept");
        // `u`'s result is acknowledged: the outbox holds it no more.
        let (_, seq, _) = outbox
            .snapshot()
            .into_iter()
            .find(|(_, _, m)| matches!(m.as_ref(), WorkerMsg::TaskResult(r) if r.task_id.as_str() == "u"))
            .expect("u's result");
        let acked = outbox.take_acked(seq).expect("held");
        runner.acknowledged(&acked, Disposition::Recorded);
        idle().await;
        assert_eq!(ended(), ["u"]);
        assert!(!root.path().join("u").exists() && kept("t"));
        // Room again: `v`'s result is journaled, and `t`'s with it.
        journal.full.store(false, Ordering::SeqCst);
        runner.assign(command_assignment("v", 1, writes));
        idle().await;
        assert_eq!(ended(), ["u", "t", "v"]);
        assert!(!root.path().join("t").exists() && !root.path().join("v").exists());
        assert_eq!(outbox.journal_failures.load(Ordering::Relaxed), 2);
    }

    /// Binary output grows up to six times as JSON: a tail of 1 MiB of zero bytes (6 MiB
    /// escaped) is cut from the front to fit a 2 MiB frame, marked truncated, and the attempt
    /// completes with its exit code, not replaced by a failure that the result did not fit.
    #[tokio::test]
    async fn binary_output_too_large_as_json_is_cut_to_fit_and_the_exit_code_kept() {
        let max_frame = 2 << 20;
        // Exactly tail_bytes in all: only the fit cuts it.
        let config = serde_json::json!({
            "shell": "head -c 1048572 /dev/zero; echo end",
            "tail_bytes": 1048576,
        });
        let r = run_command(
            crate::executor::command::CommandExecutor::default(),
            max_frame,
            None,
            config,
        )
        .await;
        assert_eq!(r.outcome, Outcome::Completed, "{:?}", r.error);
        assert_eq!(r.result.to_value().expect("JSON")["exit_code"], 0);
        assert_eq!(r.result.to_value().expect("JSON")["stdout_truncated"], true);
        let value = r.result.to_value().expect("JSON");
        let tail = value["stdout_tail"].as_str().unwrap_or_default();
        assert!(tail.ends_with("\0\0end\n"), "the end is kept");
        assert!(
            tail.len() > 200 * 1024,
            "cut no more than needed: {}",
            tail.len()
        );
        let frame = tether_proto::codec::encode(&WorkerMsg::TaskResult(r));
        assert!(frame.len() <= max_frame, "{} bytes", frame.len());
    }

    /// Told to stop, returns a result anyway: an attempt that finished as the worker began to
    /// stop.
    struct FinishesAnyway;

    impl Executor for FinishesAnyway {
        fn execute(
            &self,
            _input: TaskInput,
            ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            Box::pin(async move {
                ctx.cancelled().await;
                Ok(serde_json::json!("finished"))
            })
        }
    }

    /// A result an attempt produced while the worker shut down is queued and journaled like
    /// any other (the coordinator would otherwise run the task again), even when the outbox is
    /// full: no session reads the acks that would make room any more. An attempt the shutdown
    /// stopped reports nothing.
    #[tokio::test(start_paused = true)]
    async fn a_result_finished_while_the_worker_shuts_down_is_queued_and_journaled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let worker = tether_proto::WorkerId::parse("w").expect("id");
        let (sd, _) = StateDir::open(dir.path(), &worker).expect("state dir");
        let limits = Limits {
            max_entries: 1,
            max_bytes: usize::MAX,
        };
        let outbox = Arc::new(Outbox::new(limits).with_journal(sd.clone()));
        // Full: two notices over a bound of one, and nothing will ack them.
        for task in ["x", "y"] {
            let task = TaskId::parse(task).expect("id");
            push_notice(&outbox, &task, Attempt(1), Notice::Paused);
        }
        let mut executors = Executors::default();
        executors.register("finishes", FinishesAnyway);
        executors.register(
            "echo",
            SlowToStop {
                stopping: Duration::ZERO,
                started: Arc::default(),
            },
        );
        let runner = Arc::new(Runner::new(executors, outbox.clone(), 64 * 1024));
        let mut a = assignment("finished", 1, None);
        a.kind = "finishes".into();
        runner.assign(a);
        runner.assign(assignment("stopped", 1, None));
        tokio::time::sleep(Duration::from_millis(10)).await;
        runner.shutdown(Duration::from_secs(5)).await;
        assert_eq!(
            runner.live_tasks(),
            0,
            "nothing waits for room in the outbox"
        );

        let results = results(&outbox);
        assert_eq!(results.len(), 1, "{results:?}");
        assert_eq!(results["finished"].outcome, Outcome::Completed);
        assert_eq!(results["finished"].result, serde_json::json!("finished"));
        drop((runner, outbox, sd));
        let (_sd, restored) = StateDir::open(dir.path(), &worker).expect("reopened");
        let journaled: Vec<String> = restored
            .entries
            .iter()
            .filter_map(|(_, m)| match m {
                WorkerMsg::TaskResult(r) => Some(r.task_id.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(journaled, ["finished"]);
    }

    /// The end of an attempt is recorded in the state directory, and its checkpoints deleted
    /// there (a large one's every page read), on the blocking pool: not on the runtime thread
    /// the attempt ran on (here the test's own thread, its runtime's only one).
    #[tokio::test]
    async fn an_attempts_end_and_the_deletion_of_its_checkpoints_run_off_the_runtime_threads() {
        let on_this_thread = || {
            let me = std::thread::current().id();
            let threads = crate::statedir::FORGOT_ON.lock().expect("lock");
            threads.iter().filter(|t| **t == me).count()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let worker = tether_proto::WorkerId::parse("w").expect("id");
        let (sd, _) = StateDir::open(dir.path(), &worker).expect("state dir");
        let mut executors = Executors::default();
        executors.register("echo", Echo);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let (started, finished) = (sd.clone(), sd.clone());
        let runner = Runner::new(executors, outbox, 64 * 1024)
            .with_start_hook(Arc::new(move |t, a, seq| {
                started.task_started_as(t, a, seq).expect("recorded");
            }))
            .with_finished_hook(Arc::new(move |t, a| {
                finished.task_finished(t, a).expect("recorded");
            }));
        let runner = Arc::new(runner);
        let before = on_this_thread();
        runner.assign(assignment("t", 1, Some(("c-1", 1, "cp"))));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let owed = || {
            rusqlite::Connection::open(dir.path().join(crate::statedir::DB_FILE))
                .and_then(|c| {
                    c.query_row("SELECT count(*) FROM forget", [], |r| r.get::<_, i64>(0))
                })
                .expect("count")
        };
        while runner.live_tasks() > 0 || owed() != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the end not recorded"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            on_this_thread(),
            before,
            "checkpoints deleted on the runtime's thread"
        );
    }

    /// A start hook that notes what it was called with and on which thread, and records an
    /// attempt only once the test lets it go, if it holds it (`hold`, `release`).
    #[derive(Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<(Attempt, std::thread::ThreadId)>>>,
        recorded: Arc<Mutex<Vec<Attempt>>>,
        held: Arc<(Mutex<HashSet<Attempt>>, std::sync::Condvar)>,
    }

    impl Recorder {
        fn hook(&self) -> StartHook {
            let (calls, recorded, held) =
                (self.calls.clone(), self.recorded.clone(), self.held.clone());
            Arc::new(move |_, attempt, _| {
                let call = (attempt, std::thread::current().id());
                calls.lock().expect("lock").push(call);
                let (held, cv) = &*held;
                let mut h = held.lock().expect("lock");
                while h.contains(&attempt) {
                    h = cv.wait(h).expect("wait");
                }
                recorded.lock().expect("lock").push(attempt);
            })
        }

        fn hold(&self, attempt: u32) {
            self.held.0.lock().expect("lock").insert(Attempt(attempt));
        }

        fn release(&self, attempt: u32) {
            self.held.0.lock().expect("lock").remove(&Attempt(attempt));
            self.held.1.notify_all();
        }

        fn called(&self) -> usize {
            self.calls.lock().expect("lock").len()
        }

        fn recorded(&self) -> Vec<Attempt> {
            self.recorded.lock().expect("lock").clone()
        }
    }

    /// A test that fails lets go of what it held: the runtime waits for the blocking pool.
    impl Drop for Recorder {
        fn drop(&mut self) {
            self.held
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.held.1.notify_all();
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The start of an attempt is recorded on the blocking pool: not on the thread that calls
    /// `assign` (here the test's own, its runtime's only one), the session's.
    #[tokio::test]
    async fn an_attempts_start_is_recorded_off_the_runtime_threads() {
        let mut executors = Executors::default();
        executors.register("echo", Echo);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let recorder = Recorder::default();
        let runner = Runner::new(executors, outbox.clone(), 64 * 1024);
        let runner = runner.with_start_hook(recorder.hook());
        let runner = Arc::new(runner);
        runner.assign(assignment("t", 1, None));
        assert_eq!(results_once_ended(&runner, &outbox).await.len(), 1);
        let calls = recorder.calls.lock().expect("lock").clone();
        assert_eq!(calls.len(), 1, "recorded once");
        assert_ne!(
            calls[0].1,
            std::thread::current().id(),
            "the start was recorded on the runtime's thread"
        );
    }

    /// Sets `started` as it starts, and returns whether its attempt was recorded then.
    struct SeesRecord {
        started: Arc<AtomicBool>,
        recorded: Arc<Mutex<Vec<Attempt>>>,
    }

    impl Executor for SeesRecord {
        fn execute(
            &self,
            input: TaskInput,
            _ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            self.started.store(true, Ordering::SeqCst);
            let recorded = self.recorded.lock().expect("lock").contains(&input.attempt);
            Box::pin(async move { Ok(serde_json::json!(recorded)) })
        }
    }

    /// An attempt's executor starts only once its start is recorded (a crash from then on
    /// reports it lost), and the attempt is not reported running before either.
    #[tokio::test]
    async fn an_executor_starts_only_once_its_attempt_is_recorded_as_running() {
        let recorder = Recorder::default();
        recorder.hold(1);
        let started = Arc::new(AtomicBool::new(false));
        let mut executors = Executors::default();
        let sees = SeesRecord {
            started: started.clone(),
            recorded: recorder.recorded.clone(),
        };
        executors.register("sees", sees);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Runner::new(executors, outbox.clone(), 64 * 1024);
        let runner = Arc::new(runner.with_start_hook(recorder.hook()));
        let mut a = assignment("t", 1, None);
        a.kind = "sees".into();
        runner.assign(a);
        until("the start is not being recorded", || recorder.called() == 1).await;
        // The record is held: whatever the runtime runs meanwhile, the executor is not it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !started.load(Ordering::SeqCst),
            "the executor started before the record"
        );
        assert!(
            runner.active().is_empty(),
            "reported running before the record"
        );
        recorder.release(1);
        let results = results_once_ended(&runner, &outbox).await;
        assert_eq!(results.len(), 1);
        assert_eq!(
            results[0].result.to_value().expect("json"),
            serde_json::json!(true),
            "the executor started before its attempt was recorded"
        );
    }

    /// A newer attempt's start is recorded after the start of the older attempt it
    /// superseded, however long that takes: the running set holds one attempt a task, and the
    /// older's record landing last would leave the newer unrecorded once the older ended.
    #[tokio::test]
    async fn a_newer_attempts_start_is_recorded_after_the_older_ones() {
        let mut executors = Executors::default();
        executors.register("echo", Echo);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let recorder = Recorder::default();
        recorder.hold(1);
        let runner = Runner::new(executors, outbox.clone(), 64 * 1024);
        let runner = Arc::new(runner.with_start_hook(recorder.hook()));
        runner.assign(assignment("t", 1, None));
        until("attempt 1 is not being recorded", || recorder.called() == 1).await;
        runner.assign(assignment("t", 2, None));
        // Had attempt 2 not waited for attempt 1's record, its own would land now.
        tokio::time::sleep(Duration::from_millis(20)).await;
        recorder.release(1);
        results_once_ended(&runner, &outbox).await;
        assert_eq!(recorder.recorded(), vec![Attempt(1), Attempt(2)]);
    }

    impl Runner {
        /// With `local` as the checkpoints kept for lost tasks, read from memory.
        fn with_kept(self, local: Vec<(TaskId, StoredCheckpoint)>) -> Self {
            self.with_kept_of(local.into_iter().map(|(t, c)| (t, c, None)).collect())
        }

        /// [`Runner::with_kept`], each checkpoint written for the submission beside it.
        fn with_kept_of(self, local: Vec<(TaskId, StoredCheckpoint, Option<u64>)>) -> Self {
            let described = local.iter().map(|(t, c, submit_seq)| {
                let l = LocalCheckpoint {
                    id: c.id.clone(),
                    attempt: c.attempt,
                    bytes: c.data.len() as u64,
                    submit_seq: *submit_seq,
                };
                (t.clone(), l)
            });
            let described: Vec<_> = described.collect();
            let kept: HashMap<TaskId, StoredCheckpoint> =
                local.into_iter().map(|(t, c, _)| (t, c)).collect();
            self.with_local_checkpoints(described, Arc::new(move |t| Ok(kept.get(t).cloned())))
        }
    }

    /// `runner` recording its tasks' starts, checkpoints and ends in `sd`, each write asserted
    /// (the agent's `persist_runner` logs a failed one).
    fn recording(runner: Runner, sd: &Arc<StateDir>) -> Runner {
        let (started, storing, finished) = (sd.clone(), sd.clone(), sd.clone());
        runner
            .with_start_hook(Arc::new(move |t, a, seq| {
                started.task_started_as(t, a, seq).expect("recorded");
            }))
            .with_checkpoint_sink(Arc::new(move |t, cp| {
                storing.store_checkpoint(t, cp).expect("stored");
            }))
            .with_finished_hook(Arc::new(move |t, a| {
                finished.task_finished(t, a).expect("recorded");
            }))
    }

    fn stored(id: &str, attempt: u32, data: &str) -> StoredCheckpoint {
        StoredCheckpoint {
            id: CheckpointId::parse(id).expect("id"),
            attempt: Attempt(attempt),
            data: Arc::new(data.as_bytes().to_vec()),
            piece: 0,
        }
    }

    fn assignment(task: &str, attempt: u32, cp: Option<(&str, u32, &str)>) -> TaskAssignment {
        TaskAssignment {
            task_id: TaskId::parse(task).expect("id"),
            attempt: Attempt(attempt),
            kind: "echo".into(),
            config: serde_json::json!({}).into(),
            timeout_ms: None,
            checkpoint: cp.map(|(id, attempt, data)| CheckpointBlob {
                checkpoint_id: CheckpointId::parse(id).expect("id"),
                attempt: Attempt(attempt),
                data: Some(Blob(data.as_bytes().to_vec())),
                size: None,
            }),
            attempt_base: None,
            submit_seq: None,
            timestamp: now(),
        }
    }

    /// Runs each assignment and returns what each execution was started with, by task.
    async fn resumed_from(
        local: Vec<(TaskId, StoredCheckpoint)>,
        assignments: Vec<TaskAssignment>,
    ) -> HashMap<String, serde_json::Value> {
        let local = local.into_iter().map(|(t, c)| (t, c, None)).collect();
        resumed_from_kept(local, assignments).await
    }

    /// [`resumed_from`], each kept checkpoint written for the submission beside it.
    async fn resumed_from_kept(
        local: Vec<(TaskId, StoredCheckpoint, Option<u64>)>,
        assignments: Vec<TaskAssignment>,
    ) -> HashMap<String, serde_json::Value> {
        let mut executors = Executors::default();
        executors.register("echo", Echo);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner =
            Arc::new(Runner::new(executors, outbox.clone(), 64 * 1024).with_kept_of(local));
        for a in assignments {
            runner.assign(a);
        }
        runner.tracker.close();
        runner.tracker.wait().await;
        outbox
            .take_unsent(100)
            .into_iter()
            .filter_map(|(_, m)| match m.as_ref() {
                WorkerMsg::TaskResult(r) => {
                    Some((r.task_id.to_string(), r.result.to_value().expect("JSON")))
                }
                _ => None,
            })
            .collect()
    }

    /// A checkpoint the assignment names by its size is fetched before the executor runs.
    /// Refused as not leased, the attempt ends without a result; refused otherwise, it resumes
    /// from this worker's older checkpoint of the task.
    #[tokio::test]
    async fn a_named_checkpoint_is_fetched_and_a_refused_fetch_stops_or_falls_back() {
        let id = |s: &str| TaskId::parse(s).expect("id");
        let mut executors = Executors::default();
        executors.register("echo", Echo);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let local = vec![
            (id("fallback"), stored("f-old", 1, "local")),
            (id("same"), stored("s-2", 2, "mine")),
        ];
        let runner = Arc::new(Runner::new(executors, outbox.clone(), 64 * 1024).with_kept(local));
        let named = [
            ("fetched", "x-2"),
            ("gone", "g-2"),
            ("fallback", "f-2"),
            ("same", "s-2"),
        ];
        for (task, cp) in named {
            let mut a = assignment(task, 3, None);
            a.checkpoint = Some(CheckpointBlob {
                checkpoint_id: CheckpointId::parse(cp).expect("id"),
                attempt: Attempt(2),
                data: None,
                size: Some(3),
            });
            runner.assign(a);
        }
        // What the tasks sent: the fetches to answer, and a result already (the one that
        // resumed from its own copy).
        // (The local fallback is read on the blocking pool first: a wait with a deadline.)
        let (mut fetches, mut sent) = (Vec::new(), Vec::new());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fetches.len() < 3 && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
            for (_, m) in outbox.take_unsent(10) {
                match m.as_ref() {
                    WorkerMsg::CheckpointFetch(f) => fetches.push(f.clone()),
                    _ => sent.push(m),
                }
            }
        }
        assert_eq!(fetches.len(), 3, "all but the one held here: {fetches:?}");
        for f in fetches {
            outbox.ack(f.seq);
            let (data, code) = match f.task_id.as_str() {
                "fetched" => (Some(Blob(b"abc".to_vec())), None),
                "gone" => (None, Some(tether_proto::msg::ErrorCode::NotLeased)),
                _ => (None, Some(tether_proto::msg::ErrorCode::BadFrame)),
            };
            runner.checkpoint_piece(tether_proto::msg::CheckpointPiece {
                ack_seq: f.seq,
                task_id: f.task_id,
                checkpoint_id: f.checkpoint_id,
                offset: f.offset,
                error: code.map(|_| "refused".to_owned()),
                data,
                code,
                timestamp: now(),
            });
        }
        runner.tracker.close();
        runner.tracker.wait().await;
        sent.extend(outbox.take_unsent(100).into_iter().map(|(_, m)| m));
        let results: HashMap<String, serde_json::Value> = sent
            .iter()
            .filter_map(|m| match m.as_ref() {
                WorkerMsg::TaskResult(r) => {
                    Some((r.task_id.to_string(), r.result.to_value().expect("JSON")))
                }
                _ => None,
            })
            .collect();
        assert_eq!(results.len(), 3, "{results:?}");
        assert_eq!(results["fetched"], "abc");
        assert_eq!(results["same"], "mine", "not fetched: held here already");
        assert_eq!(results["fallback"], "local");
        assert_eq!(runner.running_count(), 0);
    }

    /// A coordinator too busy to serve a named checkpoint for longer than a few seconds
    /// (`rate_limited` six times in a row, over 20 s) delays the attempt, never has it start
    /// afresh: it resumes from that checkpoint once served. Started afresh (after five
    /// refusals, as it did), its first checkpoints pushed the one it should have resumed from
    /// out of the few the coordinator keeps.
    #[tokio::test(start_paused = true)]
    async fn a_named_checkpoint_refused_for_now_many_times_is_still_resumed_from() {
        let mut executors = Executors::default();
        executors.register("echo", Echo);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(Runner::new(executors, outbox.clone(), 64 * 1024));
        let mut a = assignment("t", 3, None);
        a.checkpoint = Some(CheckpointBlob {
            checkpoint_id: CheckpointId::parse("c-2").expect("id"),
            attempt: Attempt(2),
            data: None,
            size: Some(3),
        });
        runner.assign(a);
        let (mut refused, mut sent) = (0, Vec::new());
        let t0 = tokio::time::Instant::now();
        while runner.running_count() > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "the attempt never ended"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            for (_, m) in outbox.take_unsent(10) {
                let WorkerMsg::CheckpointFetch(f) = m.as_ref() else {
                    sent.push(m);
                    continue;
                };
                outbox.ack(f.seq);
                let busy = refused < 6;
                refused += usize::from(busy);
                runner.checkpoint_piece(tether_proto::msg::CheckpointPiece {
                    ack_seq: f.seq,
                    task_id: f.task_id.clone(),
                    checkpoint_id: f.checkpoint_id.clone(),
                    offset: f.offset,
                    error: busy.then(|| "busy".to_owned()),
                    data: (!busy).then(|| Blob(b"abc".to_vec())),
                    code: busy.then_some(tether_proto::msg::ErrorCode::RateLimited),
                    timestamp: now(),
                });
            }
        }
        assert_eq!(refused, 6);
        sent.extend(outbox.take_unsent(100).into_iter().map(|(_, m)| m));
        let results: Vec<_> = sent
            .iter()
            .filter_map(|m| match m.as_ref() {
                WorkerMsg::TaskResult(r) => Some(r.result.to_value().expect("JSON")),
                _ => None,
            })
            .collect();
        assert_eq!(results, ["abc"], "resumed from the fetched checkpoint");
    }

    /// The checkpoints of tasks lost with the previous process stay on disk: the state
    /// directory describes them, the runner knows them by id, and reads one (once) only when
    /// its task comes back here, resuming from it. Most never come back: holding their bytes
    /// from the start on, for the life of the process, cost the memory of them all.
    #[tokio::test]
    async fn a_lost_tasks_checkpoint_is_read_from_the_state_dir_only_when_the_task_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let worker = tether_proto::WorkerId::parse("w").expect("id");
        let id = |s: &str| TaskId::parse(s).expect("id");
        {
            let (sd, _) = StateDir::open(dir.path(), &worker).expect("open");
            for (task, data) in [("back", "5"), ("elsewhere", "big")] {
                sd.task_started(&id(task), Attempt(1)).expect("start");
                let cp = stored(&format!("c-{task}"), 1, data);
                sd.store_checkpoint(&id(task), &cp).expect("checkpoint");
            }
        }
        let (sd, restored) = StateDir::open(dir.path(), &worker).expect("reopen");
        let described: HashMap<_, _> = restored.checkpoints.iter().cloned().collect();
        assert_eq!(described.len(), 2, "{described:?}");
        assert_eq!(described[&id("elsewhere")].bytes, 3);
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let load: CheckpointLoader = {
            let (sd, reads) = (sd.clone(), reads.clone());
            Arc::new(move |task| {
                reads.fetch_add(1, Ordering::SeqCst);
                sd.latest_checkpoint(task).map_err(|e| e.to_string())
            })
        };
        let mut executors = Executors::default();
        executors.register("echo", Echo);
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(
            Runner::new(executors, outbox.clone(), 64 * 1024)
                .with_local_checkpoints(restored.checkpoints, load),
        );
        assert_eq!(reads.load(Ordering::SeqCst), 0, "nothing read at start");
        runner.assign(assignment("back", 2, None));
        let results = results_once_ended(&runner, &outbox).await;
        assert_eq!(results.len(), 1, "{results:?}");
        let resumed = results[0].result.to_value().expect("JSON");
        assert_eq!(resumed, "5", "resumed from the local checkpoint");
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "read once, for the task back"
        );
    }

    #[tokio::test]
    async fn a_lost_task_resumes_from_the_local_checkpoint_unless_the_coordinator_has_a_later_one()
    {
        let id = |s: &str| TaskId::parse(s).expect("id");
        let local = vec![
            (id("none"), stored("n-1-3", 1, "local")),
            (id("older"), stored("o-1-3", 1, "local")),
            (id("same"), stored("s-1-3", 1, "local")),
            (id("later"), stored("l-1-3", 1, "local")),
            (id("equal"), stored("e-1-3", 1, "local")),
            (id("reused"), stored("r-3-1", 3, "local")),
        ];
        let got = resumed_from(
            local,
            vec![
                assignment("none", 2, None),
                assignment("older", 3, Some(("o-0-9", 0, "remote"))),
                assignment("same", 2, Some(("s-1-2", 1, "remote"))),
                assignment("later", 3, Some(("l-2-1", 2, "remote"))),
                assignment("equal", 2, Some(("e-1-3", 1, "remote"))),
                assignment("fresh", 1, Some(("f-1-1", 1, "remote"))),
                assignment("reused", 1, None),
            ],
        )
        .await;
        let want = [
            ("none", "local"),
            ("older", "local"),
            ("same", "local"),
            ("later", "remote"),
            ("equal", "remote"),
            ("fresh", "remote"),
        ];
        for (task, from) in want {
            assert_eq!(got[task], serde_json::json!(from), "task {task}: {got:?}");
        }
        // A local checkpoint of a later attempt than the assignment's is another task's of
        // the same id (submitted again after retention removed the first): none is taken.
        assert_eq!(got["reused"], serde_json::Value::Null, "{got:?}");
    }

    /// A task submitted again under the id of one this worker lost, after retention removed
    /// the first, is not resumed from the first's checkpoint kept here: its assignment's
    /// `attempt_base` says that attempt was the removed task's. A checkpoint of an attempt
    /// after the base is this task's own, and resumed from as before.
    #[tokio::test]
    async fn a_task_submitted_again_under_a_lost_tasks_id_does_not_resume_from_its_checkpoint() {
        let id = |s: &str| TaskId::parse(s).expect("id");
        let local = vec![
            (id("resubmitted"), stored("r-2-1", 2, "old task")),
            (id("own"), stored("o-5-1", 5, "local")),
        ];
        let based = |task: &str, attempt: u32, base: u32| TaskAssignment {
            attempt_base: Some(Attempt(base)),
            ..assignment(task, attempt, None)
        };
        let got = resumed_from(local, vec![based("resubmitted", 4, 3), based("own", 6, 3)]).await;
        assert_eq!(got["resubmitted"], serde_json::Value::Null, "{got:?}");
        assert_eq!(got["own"], "local", "{got:?}");
    }

    /// A task submitted again under a lost task's id after the coordinator forgot the first
    /// (its retention, once more) has attempt 1 and no `attempt_base`: only its submission
    /// (`submit_seq`), not the one the kept checkpoint was written for, tells it from the
    /// first, and it starts afresh. Of the same submission, the kept checkpoint is its own; of
    /// a submission not known on either side, the attempts decide as before.
    #[tokio::test]
    async fn a_task_of_another_submission_under_a_lost_tasks_id_does_not_resume_from_its_checkpoint()
     {
        let id = |s: &str| TaskId::parse(s).expect("id");
        let local = vec![
            (id("again"), stored("a-1-1", 1, "old"), Some(7)),
            (id("same"), stored("s-1-1", 1, "mine"), Some(8)),
            (id("unsaid"), stored("u-1-1", 1, "kept"), Some(9)),
            (id("untold"), stored("t-1-1", 1, "kept"), None),
        ];
        let of = |task: &str, seq: Option<u64>| TaskAssignment {
            submit_seq: seq,
            ..assignment(task, 1, None)
        };
        let got = resumed_from_kept(
            local,
            vec![
                of("again", Some(12)),
                of("same", Some(8)),
                of("unsaid", None),
                of("untold", Some(13)),
            ],
        )
        .await;
        assert_eq!(got["again"], serde_json::Value::Null, "{got:?}");
        assert_eq!(got["same"], "mine", "{got:?}");
        assert_eq!(got["unsaid"], "kept", "{got:?}");
        assert_eq!(got["untold"], "kept", "{got:?}");
        // Without submissions, as the audit found it: the old checkpoint is resumed from.
        let sketch = vec![(id("T"), stored("x-1-1", 1, "old"))];
        let got = resumed_from(sketch, vec![assignment("T", 1, None)]).await;
        assert_eq!(got["T"], "old", "{got:?}");
    }

    /// Of two checkpoints of one attempt, both written here, the one stored later wins, though
    /// it is the coordinator's: a machine crash took the last commits of `checkpoints.db`
    /// (`synchronous=NORMAL`), the newer checkpoint's among them, after the coordinator had
    /// acknowledged its upload. Their ids say their order; ids that do not (an earlier
    /// worker's, as `same` above) leave the local one the newer.
    #[tokio::test]
    async fn of_one_attempts_checkpoints_the_one_stored_later_wins_though_the_coordinators() {
        let id = |s: &str| TaskId::parse(s).expect("id");
        let [first, second, third] = [1, 2, 3].map(crate::executor::checkpoint_id);
        let local = vec![
            (id("t"), stored(first.as_str(), 1, "older")),
            (id("ahead"), stored(third.as_str(), 1, "local")),
        ];
        let got = resumed_from(
            local,
            vec![
                assignment("t", 2, Some((second.as_str(), 1, "newer"))),
                assignment("ahead", 2, Some((second.as_str(), 1, "remote"))),
            ],
        )
        .await;
        assert_eq!(got["t"], "newer", "{got:?}");
        assert_eq!(got["ahead"], "local", "{got:?}");
    }

    /// A graceful stop records a stopped attempt as ended, forgetting its checkpoints here,
    /// once `worker_stopped` went out, and only if the coordinator holds the attempt's latest
    /// checkpoint complete: every piece acknowledged (`whole`), or the checkpoint its
    /// assignment named (`handed`), or none at all (`quiet`). One whose pieces were not all
    /// acknowledged (`part`: given up as its task stopped, or still unacknowledged when the
    /// flush ended) or whose announcement was refused (`refused`) stays recorded as running
    /// with its checkpoint: the next start reports it lost and holds the checkpoint for it.
    /// Recorded as ended, they were deleted, and the task resumed elsewhere from an older one.
    #[tokio::test]
    async fn a_stopped_attempts_checkpoint_the_coordinator_does_not_hold_is_kept_when_handed_back()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let worker = tether_proto::WorkerId::parse("w").expect("id");
        let (sd, _) = StateDir::open(dir.path(), &worker).expect("state dir");
        let mut executors = Executors::default();
        executors.register("cp", Checkpoints);
        executors.register(
            "echo",
            SlowToStop {
                stopping: Duration::ZERO,
                started: Arc::default(),
            },
        );
        let outbox = Arc::new(Outbox::new(Limits::default()));
        // Pieces of 4 bytes: a checkpoint of 10 goes in 3.
        let runner = Arc::new(recording(Runner::new(executors, outbox.clone(), 4), &sd));
        for task in ["whole", "part", "refused"] {
            let mut a = assignment(task, 1, None);
            a.kind = "cp".into();
            a.config = serde_json::json!({ "size": 10 }).into();
            runner.assign(a);
        }
        runner.assign(assignment("handed", 2, Some(("c-1", 1, "theirs"))));
        runner.assign(assignment("quiet", 1, None));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while outbox.len() < 3 * 4 || runner.active().len() < 5 {
            assert!(tokio::time::Instant::now() < deadline, "not all uploaded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The coordinator's acknowledgements, as the session hands them on.
        for (_, seq, msg) in outbox.snapshot() {
            let (task, piece) = match msg.as_ref() {
                WorkerMsg::Checkpoint(c) => (c.task_id.to_string(), None),
                WorkerMsg::CheckpointData(d) => (d.task_id.to_string(), Some(d.chunk)),
                _ => continue,
            };
            let disposition = match (task.as_str(), piece) {
                ("whole", _) | ("part", None | Some(0)) => Disposition::Recorded,
                ("refused", None) => Disposition::Rejected,
                _ => continue,
            };
            let acked = outbox.take_acked(seq).expect("held");
            runner.acknowledged(&acked, disposition);
        }
        runner.shutdown(Duration::from_secs(5)).await;
        assert_eq!(runner.live_tasks(), 0);
        runner.handed_back().await;
        drop((runner, outbox, sd));

        let (sd, restored) = StateDir::open(dir.path(), &worker).expect("reopened");
        let mut lost: Vec<(String, u32)> = restored
            .lost
            .iter()
            .map(|t| (t.task_id.to_string(), t.attempt.0))
            .collect();
        lost.sort();
        assert_eq!(lost, [("part".to_string(), 1), ("refused".to_string(), 1)]);
        let mut kept: Vec<(String, u32, u64)> = restored
            .checkpoints
            .iter()
            .map(|(t, cp)| (t.to_string(), cp.attempt.0, cp.bytes))
            .collect();
        kept.sort();
        assert_eq!(
            kept,
            [("part".to_string(), 1, 10), ("refused".to_string(), 1, 10)]
        );
        let part = sd
            .latest_checkpoint(&TaskId::parse("part").expect("id"))
            .expect("read")
            .expect("kept");
        assert_eq!(part.data.as_slice(), [7; 10]);
    }

    /// Told its worker stops, writes the checkpoint `b"late"` after `delay` (a large
    /// directory's pack), then returns.
    struct LateCheckpoint {
        delay: Duration,
    }

    impl Executor for LateCheckpoint {
        fn execute(
            &self,
            _input: TaskInput,
            ctx: TaskCtx,
        ) -> BoxFuture<'static, Result<serde_json::Value, ExecError>> {
            let delay = self.delay;
            Box::pin(async move {
                ctx.cancelled().await;
                tokio::time::sleep(delay).await;
                ctx.checkpoint(b"late".to_vec()).await;
                Err(ExecError::Cancelled)
            })
        }
    }

    /// A task whose stop outlasts the shutdown grace is not given up: it stores the checkpoint
    /// it wrote as it stopped after the grace, and once it ended (within the session's flush,
    /// which says `worker_stopped` only then) that checkpoint, not uploaded in full, is kept
    /// with the attempt recorded as running, as any stopped attempt's is.
    #[tokio::test]
    async fn a_checkpoint_stored_after_the_shutdown_grace_is_kept_when_handed_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let worker = tether_proto::WorkerId::parse("w").expect("id");
        let (sd, _) = StateDir::open(dir.path(), &worker).expect("state dir");
        let mut executors = Executors::default();
        executors.register(
            "late",
            LateCheckpoint {
                delay: Duration::from_millis(300),
            },
        );
        let outbox = Arc::new(Outbox::new(Limits::default()));
        let runner = Arc::new(recording(
            Runner::new(executors, outbox.clone(), 64 * 1024),
            &sd,
        ));
        let mut a = assignment("late", 1, None);
        a.kind = "late".into();
        runner.assign(a);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while runner.active().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "not started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        runner.shutdown(Duration::from_millis(20)).await;
        assert_eq!(runner.live_tasks(), 1, "the stop outlasts the grace");
        while runner.live_tasks() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "never ended");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(announced(&outbox).len(), 1, "its checkpoint queued");
        runner.handed_back().await;
        drop((runner, outbox, sd));

        let (sd, restored) = StateDir::open(dir.path(), &worker).expect("reopened");
        let task = TaskId::parse("late").expect("id");
        assert_eq!(restored.lost, [TaskRef::new(task.clone(), Attempt(1))]);
        let kept = sd.latest_checkpoint(&task).expect("read").expect("kept");
        assert_eq!(kept.data.as_slice(), b"late");
    }
}
