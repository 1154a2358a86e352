//! The core: one task owns the model (tasks, queue, leases, workers) and applies events one at a
//! time: session connects and disconnects, worker messages, API commands, sweeper ticks. Each
//! event produces durable mutations and effects (acks, assignments, replies); the store commits
//! the mutations in groups and only then runs the effects, so nothing is acknowledged before it
//! is durable.
//!
//! - `messages`: handlers of worker messages, with reconciliation at registration.
//! - `tasks`: dispatch, leases, requeue and the sweeper.
//! - `api`: the commands behind the HTTP API.

mod api;
mod listing;
pub mod mailbox;
mod messages;
pub mod queue;
mod runs;
mod tasks;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use tether_proto::msg::{Ack, CoordMsg, Disposition, Registration, WorkerMsg, now};
use tether_proto::{Attempt, CheckpointId, Seq, TaskId, WorkerId};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

pub use api::{Api, ApiError, ControlOp, Overview, Submission, TaskQuery};
pub(crate) use messages::registration_refusal;
pub use runs::{RunQuery, RunSummary, RunVerdict};

use crate::config::CoordinatorConfig;
use crate::model::{CheckpointMeta, IdMap, IdSet, Task, Worker, WorkerState};
use crate::store::{Batch, Handoff, Loaded, Mutation};

/// Events applied by the core in a batch before one group commit.
const MAX_EVENTS_PER_BATCH: usize = 1024;

/// Most messages an [`Event::Frame`] carries; a larger batch frame is handed over in several.
/// With the capacity of the core's queue, this bounds the messages waiting in it.
pub const FRAME_EVENT_MESSAGES: usize = 16;

/// What a session task sends on its socket.
#[derive(Debug)]
pub enum Outgoing {
    /// Boxed: a session's mailbox keeps the capacity of its largest backlog, and unboxed
    /// messages (168 bytes each) would make every slot of it that big.
    Msg(Box<CoordMsg>),
    /// The acknowledgement of a recorded message other than a result, to a session that agreed
    /// to compact acknowledgements: its sequence number only, which the session sends in its
    /// next `acks` (no message is built, boxed and taken apart again for it).
    Recorded(Seq),
    /// A close code and reason; boxed so that a slot of the mailbox is two words.
    Close(Box<(u16, String)>),
    /// A `checkpoint_piece`, with the count of its session's fetches in flight that it leaves
    /// once written (or dropped with the session).
    Piece(Box<(CoordMsg, InFlight)>),
}

/// One of a session's fetches in flight; leaves the count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Enters `count`, unless it holds `max` already.
    pub(crate) fn enter(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(count.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Outgoing {
    pub fn close(code: u16, reason: impl Into<String>) -> Self {
        Outgoing::Close(Box::new((code, reason.into())))
    }
}

/// What a session and the core share besides messages.
#[derive(Debug, Default)]
pub struct Seen {
    /// When the session last heard from its worker: the time, to the millisecond, of the last
    /// frame it took as the worker's (with integrity on, a frame that verified), heartbeats
    /// included, which the session answers itself and never shows the core; 0 before any.
    /// Written by the session, read for the API's `last_seen`.
    last_ms: std::sync::atomic::AtomicI64,
    /// Whether the worker is drained, which the session's heartbeat replies say (`draining`).
    /// Written by the core at registration and at each drain and undrain.
    drained: std::sync::atomic::AtomicBool,
}

impl Seen {
    /// A frame came now.
    pub fn mark(&self) {
        self.last_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// The last frame's time, if any came since the session opened.
    pub fn get(&self) -> Option<DateTime<Utc>> {
        match self.last_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    /// The worker is drained (or not) from now on.
    pub fn set_drained(&self, drained: bool) {
        self.drained.store(drained, Ordering::Relaxed);
    }

    /// Whether the worker is drained, as the core last said.
    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }
}

/// The core's handle on a live session.
#[derive(Debug, Clone)]
pub struct SessionRef {
    pub id: u64,
    pub tx: mailbox::Sender<Outgoing>,
    /// Its last frame's time ([`Seen`]).
    pub seen: Arc<Seen>,
    /// Agreed at registration: recorded messages are acknowledged by sequence number
    /// ([`Outgoing::Recorded`]).
    pub compact_acks: bool,
    /// The largest frame the worker accepts, from its registration (a worker that does not
    /// say takes the protocol's default).
    pub max_frame: usize,
    /// From its registration: the worker fetches a checkpoint too large for an assignment
    /// (`checkpoint_fetch`); without it, such a checkpoint is left out.
    pub checkpoint_fetch: bool,
    /// The address the session's connection comes from (for the log), when known.
    pub peer: Option<std::net::SocketAddr>,
}

impl SessionRef {
    pub fn new(id: u64, tx: mailbox::Sender<Outgoing>) -> Self {
        Self {
            id,
            tx,
            seen: Arc::default(),
            compact_acks: false,
            max_frame: tether_proto::codec::DEFAULT_MAX_FRAME,
            checkpoint_fetch: false,
            peer: None,
        }
    }

    /// Queues `out` in order, in one turn of the mailbox (nothing when the session has ended).
    pub(crate) fn send_all(&self, out: impl IntoIterator<Item = Outgoing>) {
        let _ = self.tx.send_all(out);
    }
}

/// Inputs of the core.
// Frames dominate the traffic; boxing them would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// A session that has read its worker's registration (verified, with authentication on),
    /// with that registration, applied as the session's first message in the same step: no
    /// reader of the core's state sees the session without it. It replaces the worker's
    /// current session, if any (closed with 4009).
    Connected {
        worker: WorkerId,
        session: SessionRef,
        registration: Box<Registration>,
    },
    /// Messages of one frame, in order: at most [`FRAME_EVENT_MESSAGES`] an event. The
    /// session and the worker's record are looked up once for all of them.
    Frame {
        worker: WorkerId,
        session_id: u64,
        msgs: Vec<WorkerMsg>,
    },
    Disconnected {
        worker: WorkerId,
        session_id: u64,
    },
    Api(Api),
}

/// A committed change of the model, for live views (the dashboard's event stream).
#[derive(Debug, Clone)]
pub enum Change {
    Task(Box<Task>),
    Worker(Box<Worker>),
    /// A finished task removed by retention.
    TaskRemoved(TaskId),
    /// A lost worker forgotten by retention.
    WorkerRemoved(WorkerId),
}

/// Counters shared with the HTTP API and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub results_recorded: AtomicU64,
    pub results_duplicate: AtomicU64,
    pub results_stale: AtomicU64,
    /// Results of attempts a cancel ended: kept and answered `stale`, but counted apart, as
    /// they are no sign of a fault.
    pub results_cancelled: AtomicU64,
    /// Finished results of attempts whose lease was lost, counted because their task had no
    /// counted result yet (answered `recorded`; counted in `results_recorded` too).
    pub results_adopted: AtomicU64,
    /// Results that ended an attempt as its task's `retry_on` names while it had attempts to
    /// spare: kept with the attempt, not counted, and the task run again (answered `recorded`:
    /// the worker's part is done).
    pub results_retried: AtomicU64,
    /// Results of attempts the worker could not run for a fault of its own (`worker_fault`):
    /// kept with the attempt, not counted, and the task run again elsewhere (answered
    /// `recorded`).
    pub results_worker_fault: AtomicU64,
    /// Leases given back to a worker that came back with the lost attempt finished, before
    /// any other attempt started (`Core::restore_lease`).
    pub leases_restored: AtomicU64,
    /// `checkpoint` and `checkpoint_data` messages answered `duplicate`: replays of what was
    /// stored already.
    pub checkpoint_messages_duplicate: AtomicU64,
    /// Checkpoints refused as larger than `max_checkpoint_bytes` (announced alone: their
    /// pieces are never sent).
    pub checkpoints_too_large: AtomicU64,
    pub rejected: AtomicU64,
    pub assignments: AtomicU64,
    pub requeued: AtomicU64,
    pub workers_lost: AtomicU64,
    pub sessions_replaced: AtomicU64,
    /// Registrations refused as those of a process a newer process of the same worker id
    /// replaced: two live processes sharing an id.
    pub id_conflicts: AtomicU64,
    /// Worker messages the core handled (from current sessions; a batch frame counts its
    /// messages).
    pub messages_in: AtomicU64,
    /// Data frames received from workers (a batch frame counts once).
    pub frames_in: AtomicU64,
    /// Batch frames received (several messages in one frame).
    pub batch_frames_in: AtomicU64,
    /// Batch frames sent.
    pub batch_frames_out: AtomicU64,
    /// Messages acknowledged inside an `acks` rather than by an ack of their own.
    pub compact_acked: AtomicU64,
    pub unknown_frames: AtomicU64,
    pub malformed_frames: AtomicU64,
    pub oversize_frames: AtomicU64,
    pub registrations: AtomicU64,
    /// Finished tasks removed by the retention setting.
    pub tasks_expired: AtomicU64,
    /// Checkpoint bytes sent in `checkpoint_piece`s.
    pub checkpoint_bytes_served: AtomicU64,
    /// Lost workers forgotten by the retention setting.
    pub workers_expired: AtomicU64,
    /// Registrations of a worker that had a session before.
    pub reconnections: AtomicU64,
    /// Registrations whose signature verified.
    pub auth_ok: AtomicU64,
    /// Registrations refused by authentication (closed with 4001).
    pub auth_failures: AtomicU64,
    /// HTTP API requests refused for a missing, unknown or under-scoped token.
    pub api_auth_failures: AtomicU64,
    /// Connections closed at accept: too many open.
    pub connections_refused: AtomicU64,
    /// Connections closed at accept: too many new ones from that address.
    pub connections_throttled: AtomicU64,
    /// Connections closed because their request was not complete by the handshake deadline.
    pub slow_handshakes: AtomicU64,
    /// HTTP connections closed for moving no byte for `http_idle` between requests or while
    /// their answer was being written.
    pub idle_http_closed: AtomicU64,
    /// HTTP connections closed for taking their answer slower than `Limits::min_answer_rate`
    /// for about `http_idle` (moving bytes now and then, so never idle).
    pub slow_http_closed: AtomicU64,
    /// Worker frames that had to wait for the session's message rate.
    pub rate_limited: AtomicU64,
    /// Worker frames that had to wait for the session's byte rate (decoded bytes a second).
    pub bytes_limited: AtomicU64,
    /// WebSocket connections closed for reading more before their registration than their
    /// budget and the shared pool allow (`admission::PRE_REGISTRATION_BYTES`).
    pub pre_registration_overflows: AtomicU64,
    /// Compressed frames received, their wire bytes and their JSON bytes once inflated.
    pub compressed_in_frames: AtomicU64,
    pub compressed_in_wire_bytes: AtomicU64,
    pub compressed_in_json_bytes: AtomicU64,
    /// Compressed frames sent, their wire bytes and their JSON bytes before compression.
    pub compressed_out_frames: AtomicU64,
    pub compressed_out_wire_bytes: AtomicU64,
    pub compressed_out_json_bytes: AtomicU64,
    /// Compressed frames refused for inflating past `max_frame` (closed with 1009).
    pub decompression_refused: AtomicU64,
    /// Sessions whose frames carry integrity tags.
    pub mac_sessions: AtomicU64,
    /// Worker frames dropped because their integrity tag did not verify.
    pub mac_failures: AtomicU64,
    /// Pings sent to workers whose frame was still arriving a heartbeat interval after their
    /// last one (a long frame on a slow link): their sessions kept, not timed out.
    pub keepalive_pings: AtomicU64,
    /// Writes to workers that outlasted their session's liveness deadline while the connection
    /// kept taking bytes (a long frame into a slow link): their sessions kept, not ended
    /// "write failed".
    pub slow_writes: AtomicU64,
    /// Sessions open now (past their welcome): the fleet the heartbeat budget is shared by.
    pub sessions_open: AtomicU64,
    /// Queued tasks by priority, kept by the queue (`tether_queue_depth{priority}`).
    pub queued: Arc<queue::Depths>,
}

impl Counters {
    /// The counters of `/api/v1/overview` that count, between them, every result the
    /// coordinator stored a row of, each once: counted (`results_recorded`, adopted ones
    /// included), kept stale, of a cancelled attempt, run again on its end (`retry_on`), and
    /// of an attempt its worker could not run. A result answered `recorded` twice shows as
    /// their sum running ahead of the rows stored (a test's ground truth reads both).
    pub const RESULT_ROWS: [&'static str; 5] = [
        "results_recorded",
        "results_stale",
        "results_cancelled",
        "results_retried",
        "results_worker_fault",
    ];

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// A checkpoint whose pieces are arriving.
#[derive(Debug)]
struct Partial {
    meta: CheckpointMeta,
    received: BTreeSet<u32>,
    /// Bytes received so far; never more than the declared size.
    bytes: u64,
}

/// The checkpoints whose pieces are arriving, by id and by (task, attempt): a lease's end
/// looks at its task's uploads only, not every upload of the fleet, and an announcement finds
/// how many uploads its attempt has and how many bytes they declare without walking them.
/// Every operation costs the uploads it adds or removes, never the ones that stay: an attempt
/// with thousands of unfinished uploads (announced and never completed) makes no later
/// operation slower.
#[derive(Debug, Default)]
struct Uploads {
    by_id: IdMap<CheckpointId, Partial>,
    by_task: IdMap<TaskId, TaskUploads>,
}

/// The uploads of one task, by attempt: one attempt almost always (an ended attempt's are
/// dropped when the next one announces, or when its lease ends).
type TaskUploads = BTreeMap<Attempt, AttemptUploads>;

/// The uploads of one attempt of a task.
#[derive(Debug, Default)]
struct AttemptUploads {
    ids: IdSet<CheckpointId>,
    /// Bytes their announcements declare together.
    declared: u64,
}

impl Uploads {
    /// Whether an upload of `task`'s `attempt` is unfinished.
    fn unfinished(&self, task: &TaskId, attempt: Attempt) -> bool {
        self.by_task
            .get(task)
            .and_then(|t| t.get(&attempt))
            .is_some_and(|a| !a.ids.is_empty())
    }

    fn insert(&mut self, p: Partial) {
        let id = p.meta.checkpoint_id.clone();
        self.remove(&id);
        let at = self
            .by_task
            .entry(p.meta.task_id.clone())
            .or_default()
            .entry(p.meta.attempt)
            .or_default();
        at.ids.insert(id.clone());
        at.declared = at.declared.saturating_add(p.meta.size);
        self.by_id.insert(id, p);
    }

    fn remove(&mut self, id: &CheckpointId) -> Option<Partial> {
        let p = self.by_id.remove(id)?;
        self.unindex(&p.meta.task_id, p.meta.attempt, id, p.meta.size);
        Some(p)
    }

    fn unindex(&mut self, task: &TaskId, attempt: Attempt, id: &CheckpointId, size: u64) {
        let Some(attempts) = self.by_task.get_mut(task) else {
            return;
        };
        if let Some(at) = attempts.get_mut(&attempt)
            && at.ids.remove(id)
        {
            at.declared = at.declared.saturating_sub(size);
            if at.ids.is_empty() {
                attempts.remove(&attempt);
            }
        }
        if attempts.is_empty() {
            self.by_task.remove(task);
        }
    }

    /// Removes the uploads of `task` of every attempt but `live` (all of them for `None`),
    /// returning their ids: the cost is the number removed.
    fn remove_ended(&mut self, task: &TaskId, live: Option<Attempt>) -> Vec<CheckpointId> {
        let Some(attempts) = self.by_task.get_mut(task) else {
            return Vec::new();
        };
        let ended: Vec<Attempt> = attempts
            .keys()
            .copied()
            .filter(|&a| Some(a) != live)
            .collect();
        let mut ids = Vec::new();
        for a in ended {
            if let Some(at) = attempts.remove(&a) {
                ids.extend(at.ids);
            }
        }
        if attempts.is_empty() {
            self.by_task.remove(task);
        }
        for id in &ids {
            self.by_id.remove(id);
        }
        ids
    }

    /// How many uploads `attempt` of `task` has, and the bytes they declare together.
    fn of_attempt(&self, task: &TaskId, attempt: Attempt) -> (usize, u64) {
        self.by_task
            .get(task)
            .and_then(|m| m.get(&attempt))
            .map_or((0, 0), |at| (at.ids.len(), at.declared))
    }

    fn get(&self, id: &CheckpointId) -> Option<&Partial> {
        self.by_id.get(id)
    }

    fn get_mut(&mut self, id: &CheckpointId) -> Option<&mut Partial> {
        self.by_id.get_mut(id)
    }

    fn contains_key(&self, id: &CheckpointId) -> bool {
        self.by_id.contains_key(id)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_id.is_empty() && self.by_task.is_empty()
    }

    /// The tasks with uploads.
    fn tasks(&self) -> impl Iterator<Item = &TaskId> {
        self.by_task.keys()
    }
}

/// The complete checkpoints of a task that were pruned (their pieces deleted) while the
/// current lease ran, oldest first, at most [`SUPERSEDED_REMEMBERED`]: a replay of one of them
/// by the lease holder is a `duplicate`, never a new upload that would become the latest. Their
/// store rows stay (`complete = 2`, no pieces) until the lease ends, so a restarted coordinator
/// remembers them too.
#[derive(Debug)]
struct Superseded {
    /// The attempt whose lease pruned them.
    attempt: Attempt,
    ids: VecDeque<CheckpointId>,
}

/// Pruned checkpoints a lease remembers, at most. A worker replays what it sent and was not
/// acknowledged: the Rust worker has at most 64 messages (a checkpoint is at least two) in
/// flight when a session is lost, so a replayed checkpoint is a few completions old, far below
/// this; the bound keeps a worker that uploads without end from growing the memory and the
/// store of its lease without end.
pub(crate) const SUPERSEDED_REMEMBERED: usize = 1024;

/// The core's state.
pub struct Core {
    cfg: Arc<CoordinatorConfig>,
    tasks: IdMap<TaskId, Task>,
    queue: queue::Queue,
    workers: IdMap<WorkerId, Worker>,
    /// Workers that may have a free slot (see [`queue::plan`]).
    free: BTreeSet<WorkerId>,
    /// Workers resting after a fault of their own ([`crate::model::Worker::resting`]): the
    /// sweep ends their rests, walking these, not the fleet.
    resting: Vec<WorkerId>,
    /// The worker the last dispatch leased to: the next starts after it.
    last_leased_to: Option<WorkerId>,
    partial: Uploads,
    /// Tasks that died with a worker's previous process, held on their leases until the new
    /// process's replay is through ([`tasks::HeldDead`]); almost always empty.
    held_dead: IdMap<WorkerId, tasks::HeldDead>,
    /// Complete checkpoints per task, oldest first, for pruning.
    checkpoint_history: IdMap<TaskId, VecDeque<CheckpointId>>,
    /// Per task, the complete checkpoints its current lease pruned (see [`Superseded`]).
    superseded: IdMap<TaskId, Superseded>,
    /// The task of every complete checkpoint kept or remembered as superseded: an id is one
    /// task's (the store keys checkpoints and their pieces by id alone), and a lease holder's
    /// announcement of an id its task has complete is a replay.
    checkpoint_owner: IdMap<CheckpointId, TaskId>,
    /// Finished tasks by the time they finished, for retention.
    finished: BTreeSet<(DateTime<Utc>, TaskId)>,
    /// Ids of tasks removed by retention, with their last attempt.
    removed: tasks::Removed,
    /// The tasks by submission number, status and last change, for listings and counts.
    listing: listing::Listing,
    /// Workers without a registered session, in the order they lost it (since the start, for
    /// one known only by the leases the store held), with that instant: the sweep looks at
    /// those past the grace period only, instead of at every worker every second. An entry is
    /// stale (and dropped) once the worker's `disconnected_mono` no longer equals its instant.
    disconnects: VecDeque<(tokio::time::Instant, WorkerId)>,
    /// Leased tasks with a timeout, for the sweep's overdue check; entries of tasks no longer
    /// leased are dropped when the sweep comes to them.
    timed_leases: IdSet<TaskId>,
    /// Per session (by id), its `checkpoint_fetch`es read or being read and not yet written
    /// to its socket: bounded, so that a worker that fetches without reading cannot make the
    /// coordinator read and hold checkpoint bytes without end.
    fetching: std::collections::HashMap<u64, Arc<AtomicUsize>>,
    /// Sweeps so far: the free-worker index is checked against the model every
    /// [`tasks::FREE_INDEX_CHECK_EVERY`]th.
    sweeps: u64,
    /// When the sweep last wrote [`Mutation::AliveAt`].
    alive_saved: Option<tokio::time::Instant>,
    next_submit_seq: u64,
    dispatch_needed: bool,
    counters: Arc<Counters>,
    /// Where committed changes are announced, when anyone listens.
    changes: Option<broadcast::Sender<Change>>,
    /// The log lines of refused registrations said lately (shared with the sessions).
    refusals: Arc<crate::ratelimit::Refusals>,
    /// Task states the store's writer has not folded into the database yet (for reads).
    unfolded: Arc<crate::store::Unfolded>,
    /// Lines of what workers report (their errors, why they cannot serve a state or a
    /// checkpoint) logged this second.
    peer_logs: PeerLogs,
}

/// Lines of worker-supplied text the core logs in a second, across all workers: a worker
/// may send thousands of `error` frames a second within its message rate, and each would be a
/// line (megabytes, before its text was cut). Past it, lines are counted and one line says
/// how many went unlogged; the metrics count every report.
const PEER_LOGS_PER_SEC: u32 = 20;

#[derive(Debug, Default)]
struct PeerLogs {
    second: Option<tokio::time::Instant>,
    used: u32,
    dropped: u64,
}

impl PeerLogs {
    /// Whether one more line fits this second's budget.
    fn admit(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if self
            .second
            .is_none_or(|s| now.duration_since(s) >= std::time::Duration::from_secs(1))
        {
            if self.dropped > 0 {
                tracing::warn!(
                    unlogged = self.dropped,
                    per_sec = PEER_LOGS_PER_SEC,
                    "reports from workers not logged: over the log's budget (tether_errors_total counts them)"
                );
            }
            *self = PeerLogs {
                second: Some(now),
                ..PeerLogs::default()
            };
        }
        let admitted = self.used < PEER_LOGS_PER_SEC;
        match admitted {
            true => self.used += 1,
            false => self.dropped += 1,
        }
        admitted
    }
}

impl Core {
    /// Rebuilds the model from what the store loaded.
    pub fn new(cfg: Arc<CoordinatorConfig>, loaded: Loaded, counters: Arc<Counters>) -> Self {
        let mut core = Self {
            cfg,
            tasks: IdMap::with_capacity_and_hasher(loaded.tasks.len(), Default::default()),
            queue: queue::Queue::sharing(counters.queued.clone()),
            workers: IdMap::default(),
            free: BTreeSet::new(),
            resting: Vec::new(),
            last_leased_to: None,
            partial: Uploads::default(),
            held_dead: IdMap::default(),
            checkpoint_history: IdMap::default(),
            superseded: IdMap::default(),
            checkpoint_owner: IdMap::default(),
            finished: BTreeSet::new(),
            removed: tasks::Removed::default(),
            listing: listing::Listing::default(),
            disconnects: VecDeque::new(),
            fetching: Default::default(),
            timed_leases: IdSet::default(),
            sweeps: 0,
            alive_saved: None,
            next_submit_seq: 0,
            dispatch_needed: true,
            counters,
            refusals: Default::default(),
            changes: None,
            unfolded: loaded.unfolded,
            peer_logs: PeerLogs::default(),
        };
        core.next_submit_seq = loaded.next_submit_seq;
        for (id, last, at) in &loaded.removed {
            core.removed.note(id, *last, *at);
        }
        for w in loaded.workers {
            core.workers.insert(w.worker_id.clone(), w);
        }
        let (mut queued, mut leased) = (0usize, 0usize);
        for mut t in loaded.tasks {
            core.next_submit_seq = core.next_submit_seq.max(t.submit_seq + 1);
            match t.status {
                tether_proto::TaskStatus::Queued => {
                    queued += 1;
                    core.queue
                        .insert(&t.spec, (t.spec.priority, t.submit_seq, t.task_id.clone()));
                }
                s if !s.is_terminal() => {
                    if let Some(lease) = &t.lease {
                        leased += 1;
                        // The lease began at `since`, in an earlier run: the timeout backstop
                        // counts from there, or every restart would put it off a whole timeout.
                        let ran = (now() - lease.since).to_std().unwrap_or_default();
                        let started = tokio::time::Instant::now();
                        t.lease_started = Some(started.checked_sub(ran).unwrap_or(started));
                        if t.spec.timeout_ms.is_some() {
                            core.timed_leases.insert(t.task_id.clone());
                        }
                        let w = core
                            .workers
                            .entry(lease.worker.clone())
                            .or_insert_with(|| Worker::new(lease.worker.clone(), now()));
                        w.leases.insert(t.task_id.clone());
                    }
                }
                _ => {
                    if let Some(at) = t.finished_at {
                        core.finished.insert((at, t.task_id.clone()));
                    }
                }
            }
            core.listing.put(&t);
            core.tasks.insert(t.task_id.clone(), t);
        }
        for (task, id) in loaded.complete_checkpoints {
            core.checkpoint_owner.insert(id.clone(), task.clone());
            core.checkpoint_history
                .entry(task)
                .or_default()
                .push_back(id);
        }
        for (task, id, attempt) in loaded.superseded_checkpoints {
            core.checkpoint_owner.insert(id.clone(), task.clone());
            let s = core.superseded.entry(task).or_insert_with(|| Superseded {
                attempt,
                ids: VecDeque::new(),
            });
            // INVARIANT: a task's superseded rows are all of one attempt (the lease's that
            // pruned them); they go together when it ends.
            s.attempt = s.attempt.max(attempt);
            s.ids.push_back(id);
        }
        for (meta, received, bytes) in loaded.partial_checkpoints {
            core.partial.insert(Partial {
                meta,
                received: received.into_iter().collect(),
                bytes,
            });
        }
        let mut gone: Vec<_> = core
            .workers
            .values()
            .filter_map(|w| w.disconnected_mono.map(|t| (t, w.worker_id.clone())))
            .collect();
        gone.sort();
        core.disconnects.extend(gone);
        tracing::info!(
            tasks = core.tasks.len(),
            queued,
            leased,
            workers = core.workers.len(),
            "state recovered"
        );
        core
    }

    /// Notes its refusals' log lines in `refusals`, which the coordinator's sessions share.
    pub fn with_refusals(mut self, refusals: Arc<crate::ratelimit::Refusals>) -> Self {
        self.refusals = refusals;
        self
    }

    /// Announces committed changes of tasks and workers on `tx`.
    pub fn with_changes(mut self, tx: broadcast::Sender<Change>) -> Self {
        self.changes = Some(tx);
        self
    }

    /// Queues `change` to be announced after the commit, if anyone listens.
    fn announce(&self, b: &mut Batch, change: impl FnOnce() -> Change) {
        if let Some(tx) = self.changes.as_ref().filter(|tx| tx.receiver_count() > 0) {
            let (tx, change) = (tx.clone(), change());
            b.effect(move |_| {
                let _ = tx.send(change);
            });
        }
    }

    /// Applies events until `shutdown` or until every sender is gone.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut writer: Handoff,
        shutdown: CancellationToken,
    ) {
        // The first sweep one interval after the start, not at once: nothing is due then (a
        // worker is lost `lost_after` from the start at the earliest), and a sweep at once
        // raced the first events for the first batch.
        let period = self.cfg.sweep_interval;
        let mut sweep = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = Batch::default();
        self.drop_unleased_partials(&mut first);
        if !first.is_empty() && writer.pass(first).await.is_err() {
            tracing::error!("store writer is gone; core stops");
            return;
        }
        loop {
            let mut b = Batch::default();
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.apply(ev, &mut b),
                    None => break,
                },
                _ = sweep.tick() => self.sweep(&mut b),
                _ = shutdown.cancelled() => break,
            }
            for _ in 1..MAX_EVENTS_PER_BATCH {
                match events.try_recv() {
                    Ok(ev) => self.apply(ev, &mut b),
                    Err(_) => break,
                }
            }
            if self.dispatch_needed {
                self.dispatch_needed = false;
                self.dispatch(&mut b);
            }
            if !b.is_empty() && writer.pass(b).await.is_err() {
                tracing::error!("store writer is gone; core stops");
                break;
            }
        }
        // A clean stop: its workers' sessions were open until now, and each one's latest
        // statistics are saved (telemetry saves them at most every `STATS_SAVE_EVERY`: a restart
        // would show older ones). The writer commits what it is handed before it exits.
        let connected: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Connected)
            .map(|w| w.worker_id.clone())
            .collect();
        if !connected.is_empty() {
            let mut last = Batch::default();
            for id in &connected {
                if let Some(w) = self.workers.get_mut(id) {
                    w.fold_seen();
                }
                self.save_worker(id, &mut last);
            }
            last.muts.push(Mutation::AliveAt(now()));
            let _ = writer.pass(last).await;
        }
        // Sessions end when their senders drop with the model.
        for w in self.workers.values() {
            if let Some(s) = &w.session {
                let _ =
                    s.tx.send(Outgoing::close(1001, "coordinator shutting down"));
            }
        }
    }

    fn apply(&mut self, ev: Event, b: &mut Batch) {
        match ev {
            Event::Connected {
                worker,
                session,
                registration,
            } => {
                // Refused before it touches the worker: its live session, if any, stays. (The
                // session refuses one of another worker or protocol before the core, and this is
                // the core's own guard; only the core knows the processes a newer one replaced.)
                let refusal = registration_refusal(&worker, &registration)
                    .or_else(|| self.superseded_refusal(&worker, &registration.boot_id));
                if let Some(refusal) = refusal {
                    return self.refuse_registration(&worker, &session, refusal, b);
                }
                let session_id = session.id;
                self.on_connected(worker.clone(), session);
                // The session's one registration: one in a later frame is refused
                // (`on_message`), as with authentication on the session refuses it itself.
                if let Some(session) = self.current_session(&worker, session_id) {
                    self.counters.messages_in.fetch_add(1, Ordering::Relaxed);
                    self.on_registration(&worker, &session, *registration, b);
                }
            }
            Event::Disconnected { worker, session_id } => {
                self.fetching.remove(&session_id);
                self.on_disconnected(&worker, session_id, b)
            }
            Event::Frame {
                worker,
                session_id,
                msgs,
            } => {
                let current = self.current_session(&worker, session_id);
                // A frame of a replaced session is ignored: the newer session owns the worker.
                if let Some(session) = current {
                    self.counters
                        .messages_in
                        .fetch_add(msgs.len() as u64, Ordering::Relaxed);
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.last_seen = now();
                    }
                    // What the session agreed (acknowledgements by number, its frame limit)
                    // holds for the whole frame: only its registration, in `Event::Connected`,
                    // set it, and a registration in a frame is refused.
                    let top = msgs.iter().filter_map(WorkerMsg::seq).max();
                    for msg in msgs {
                        self.on_message(&worker, &session, msg, b);
                    }
                    if !self.held_dead.is_empty() {
                        self.replay_seen(&worker, top, b);
                    }
                }
            }
            Event::Api(api) => self.on_api(api, b),
        }
    }

    /// The session `session_id` of `worker`, if it is the worker's current one.
    fn current_session(&self, worker: &WorkerId, session_id: u64) -> Option<SessionRef> {
        self.workers
            .get(worker)
            .and_then(|w| w.session.as_ref())
            .filter(|s| s.id == session_id)
            .cloned()
    }

    fn on_connected(&mut self, worker: WorkerId, session: SessionRef) {
        // A worker first seen: its registration, accepted already, is applied in this step. It
        // was never disconnected (no reconnect to time).
        let w = self.workers.entry(worker.clone()).or_insert_with(|| {
            let mut w = Worker::new(worker.clone(), now());
            w.disconnected_at = None;
            w.disconnected_mono = None;
            w
        });
        // Kept through its reconnections and the coordinator's restarts: its heartbeat replies
        // say so from the first.
        session.seen.set_drained(w.draining);
        if let Some(old) = w.session.replace(session) {
            self.counters
                .sessions_replaced
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::SESSIONS_REPLACED).increment(1);
            tracing::info!(worker = %worker, old = old.id, "a newer connection replaces this worker's session");
            let _ = old.tx.send(Outgoing::close(
                4009,
                "replaced by a newer connection of this worker",
            ));
        }
        w.last_seen = now();
        w.sessions += 1;
    }

    fn on_disconnected(&mut self, worker: &WorkerId, session_id: u64, b: &mut Batch) {
        let owns = |w: &Worker| w.session.as_ref().map(|s| s.id) == Some(session_id);
        if self.held_dead.contains_key(worker) && self.workers.get(worker).is_some_and(owns) {
            // Dead: nothing waits for the worker to come back with them.
            self.release_held(worker, "its session ended before its replay was through", b);
        }
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        // INVARIANT: only the session that owns the worker may mark it disconnected; the late
        // close of a replaced session changes nothing.
        if w.session.as_ref().map(|s| s.id) != Some(session_id) {
            return;
        }
        w.fold_seen();
        w.session = None;
        w.disconnected_at = Some(now());
        let at = tokio::time::Instant::now();
        w.disconnected_mono = Some(at);
        if w.stopping && w.leases.is_empty() {
            // A graceful stop, done: nothing waits for a grace period, nothing was lost.
            w.state = WorkerState::Stopped;
            tracing::info!(worker = %worker, "worker stopped");
        } else {
            w.state = WorkerState::Disconnected;
            tracing::info!(worker = %worker, leases = w.leases.len(), "worker disconnected; its leases wait for the grace period");
            self.disconnects.push_back((at, worker.clone()));
        }
        self.save_worker(worker, b);
    }

    /// Acknowledges message `seq` (not a result) after the commit: by its sequence number alone
    /// when it was recorded and the session agreed to compact acknowledgements, else with the
    /// whole `ack`.
    fn send_ack(
        b: &mut Batch,
        session: &SessionRef,
        seq: Seq,
        disposition: Disposition,
        ack: impl FnOnce() -> CoordMsg,
    ) {
        if session.compact_acks && disposition == Disposition::Recorded {
            b.send_recorded(session, seq);
        } else {
            b.send(session, ack());
        }
    }

    fn save_task(&mut self, id: &TaskId, b: &mut Batch) {
        if let Some(t) = self.tasks.get(id) {
            if let (true, Some(at)) = (t.status.is_terminal(), t.finished_at) {
                self.finished.insert((at, id.clone()));
            }
            self.listing.put(t);
            b.muts.push(Mutation::PutTask(Box::new(t.clone())));
            self.announce(b, || Change::Task(Box::new(t.clone())));
        }
    }

    fn save_worker(&self, id: &WorkerId, b: &mut Batch) {
        if let Some(w) = self.workers.get(id) {
            b.muts.push(Mutation::PutWorker(Box::new(w.clone())));
            self.announce(b, || Change::Worker(Box::new(self.view(w))));
        }
    }

    /// `w` as the API and the event stream show it: its last frame folded into `last_seen`,
    /// and while it is disconnected, when its grace ends ([`Worker::lost_at`]), which a
    /// client cannot work out itself: it does not know `--lost-after`, and after a restart the
    /// grace runs from the coordinator's start, not from `disconnected_at`.
    pub(crate) fn view(&self, w: &Worker) -> Worker {
        let mut v = w.seen_now();
        if v.state == WorkerState::Disconnected
            && let Some(at) = v.disconnected_mono
        {
            // Past due (the next sweep declares it lost) it is now; a grace too long to say,
            // never.
            v.lost_at = at
                .checked_add(self.cfg.lost_after)
                .map(|end| end.saturating_duration_since(tokio::time::Instant::now()))
                .and_then(|left| chrono::TimeDelta::from_std(left).ok())
                .and_then(|left| now().checked_add_signed(left));
        }
        v
    }
}

/// Builds an ack of `kind` (e.g. `CoordMsg::TaskResultAck`).
pub(crate) fn ack(
    kind: fn(Ack) -> CoordMsg,
    seq: Seq,
    task_id: Option<TaskId>,
    checkpoint_id: Option<CheckpointId>,
    chunk: Option<u32>,
    disposition: Disposition,
    reason: Option<String>,
) -> CoordMsg {
    kind(Ack {
        ack_seq: seq,
        task_id,
        checkpoint_id,
        chunk,
        disposition,
        reason,
        timestamp: now(),
    })
}
