//! Worker messages. Every message that carries a `seq` gets exactly one ack per receipt, after
//! the commit of what it changed. Results are keyed by (task, attempt): the first one of the
//! lease holder counts, a repeat is a duplicate, one from an older attempt is kept as stale and
//! never counted, one for a task the sender never held is rejected.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_proto::codec::MAX_CHECKPOINT_CHUNKS;
use tether_proto::msg::{
    Checkpoint, CheckpointData, CheckpointError, CheckpointFetch, CheckpointPiece, CoordMsg,
    Directive, DirectiveAction, Disposition, ErrorCode, PROTOCOL_VERSION, Registration,
    RegistrationAck, TaskNotice, TaskResult, TaskState, Telemetry, WorkerMsg, logged, now,
};
use tether_proto::{Attempt, TaskId, TaskStatus, WorkerId, encode};

use super::{
    Change, Core, InFlight, Outgoing, Partial, SUPERSEDED_REMEMBERED, SessionRef, Superseded, ack,
};
use crate::metrics as m;
use crate::model::{CheckpointMeta, Desired, Rest, WorkerState};
use crate::store::{self, Batch, Mutation};

/// How long a worker takes no new task after its first result that said it could not run
/// its attempt (`worker_fault`); each such result in a row doubles it, up to
/// [`WORKER_FAULT_REST_MAX`].
pub(crate) const WORKER_FAULT_REST: Duration = Duration::from_secs(5);
/// The longest rest after faults of a worker's own.
pub(crate) const WORKER_FAULT_REST_MAX: Duration = Duration::from_secs(300);

/// The most running tasks a registration's inventory may list; one listing more is refused
/// (4002, `error` `bad_frame`). Each becomes a directive in the `registration_ack`: unbounded,
/// a registration of a whole frame of them (hundreds of thousands) made an ack several times
/// larger than any frame the worker takes, and the core's work on it in proportion. A worker
/// runs as many tasks as it has slots; thousands at once on one worker is already far out.
pub(crate) const MAX_INVENTORY_RUNNING: usize = 4096;

/// The `reason` of a `cancel` directive for a task this worker held at that attempt once.
const MOVED_ON: &str = "the task moved on while this worker was away";
/// The `reason` of a `cancel` directive for any other task the inventory lists.
const NO_LEASE: &str = "this coordinator has no lease of that task for this worker";

/// Bytes a `registration_ack` takes besides its directives, at most: its other fields at their
/// largest (a 128-byte worker id, every number at its widest, every optional field present),
/// the integrity tag that may follow its text, and room to spare (the test
/// `the_largest_registration_ack_without_directives_fits_in_its_allowance` holds it).
pub(super) const ACK_FIELDS_BYTES: usize = 1024;

/// The most bytes the directive answering running task `task_id` at `attempt` can take in a
/// `registration_ack`, its separating comma included: `cancel` with the longer reason (ids and
/// integers need no escaping in JSON).
pub(super) fn largest_directive(task_id: &TaskId, attempt: Attempt) -> usize {
    // `{"task_id":"","attempt":,"action":"cancel","reason":""},`
    const SKELETON: usize = 56;
    let digits = attempt.0.checked_ilog10().map_or(1, |d| d as usize + 1);
    SKELETON + task_id.as_str().len() + digits + MOVED_ON.len().max(NO_LEASE.len())
}

/// The most bytes the `registration_ack` to registration `r` can take: each running task its
/// inventory lists is a directive in it, in the worst case a `cancel` with its reason.
fn largest_ack(r: &Registration) -> usize {
    r.inventory
        .running
        .iter()
        .map(|run| largest_directive(&run.task_id, run.attempt))
        .sum::<usize>()
        + ACK_FIELDS_BYTES
}

/// The most bytes of a worker's error text (its failed result's `error.message`) a task keeps
/// in its record, marker included: the record is in memory, cloned by every save, event and
/// listing, and the text may be as long as a frame (16 MiB). Longer text is cut on a character
/// boundary and ends with "… (cut: N bytes)". The stored result keeps the whole text.
pub(crate) const TASK_ERROR_BYTES: usize = 4096;

/// `message` as a task's record keeps it: whole if within [`TASK_ERROR_BYTES`], else its
/// start and a marker that says how many bytes were cut.
pub(crate) fn kept_error(message: &str) -> String {
    if message.len() <= TASK_ERROR_BYTES {
        return message.to_owned();
    }
    // The marker takes at most 37 bytes ("…" is 3, a u64 at most 20 digits).
    let mut end = TASK_ERROR_BYTES - 40;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut: {} bytes)", &message[..end], message.len() - end)
}

/// A `task_cancelled`, `task_paused` or `task_resumed` notice: its ack, name and the status it
/// reports.
struct NoticeKind {
    ack: fn(tether_proto::msg::Ack) -> CoordMsg,
    name: &'static str,
    status: Option<TaskStatus>,
}

impl NoticeKind {
    const CANCELLED: NoticeKind = NoticeKind {
        ack: CoordMsg::TaskCancelledAck,
        name: "task_cancelled",
        status: None,
    };
    const PAUSED: NoticeKind = NoticeKind {
        ack: CoordMsg::TaskPausedAck,
        name: "task_paused",
        status: Some(TaskStatus::Paused),
    };
    const RESUMED: NoticeKind = NoticeKind {
        ack: CoordMsg::TaskResumedAck,
        name: "task_resumed",
        status: Some(TaskStatus::Running),
    };
}

/// The outcome of reconciliation: directives for the ack, and leases whose assignment the
/// worker never received (sent again after the ack).
struct Reconciled {
    directives: Vec<Directive>,
    resend: Vec<TaskId>,
}

/// Whose message is this, relative to the task's lease.
#[derive(Debug, PartialEq, Eq)]
enum Standing {
    /// The sender holds the lease at this attempt.
    Holder,
    /// The sender held this attempt once; the task moved on (requeued, cancelled, finished).
    Stale,
    /// The sender never held this attempt, or the task does not exist.
    Stranger,
}

/// A session's `checkpoint_fetch`es being read or waiting for its socket, at most: the Rust
/// worker keeps 8 in flight over all its tasks, and a `sync_state` resend may double them.
pub(crate) const MAX_FETCHES_IN_FLIGHT: usize = 16;

/// Incomplete checkpoints of one attempt may declare at most this many times
/// `max_checkpoint_bytes` together.
const INCOMPLETE_CHECKPOINTS_PER_TASK: u64 = 2;

/// Unfinished checkpoint uploads (announced, not all pieces in) one attempt may have at once;
/// past it a new announcement is refused (`rejected` + `error` `bad_frame`). The byte bound
/// above does not hold back empty or small announcements that are never finished. A worker
/// uploads its checkpoints one after the other (each announcement follows the previous
/// checkpoint's pieces in its outbox), so it has one unfinished, a few when a session is lost
/// mid-upload or a `checkpoint_request` re-upload overlaps.
pub(crate) const UNFINISHED_CHECKPOINTS_PER_ATTEMPT: usize = 64;

/// A worker's record is saved for its telemetry at most this often. The statistics are kept
/// (and shown) from every `telemetry`, but they are monitoring data that the next report
/// replaces: a write of the record for each one was a commit per report, 333 a second from
/// 10,000 workers reporting every 30 s, 5 % of a core on the store thread of an otherwise idle
/// coordinator (docs/PERFORMANCE.md, thirteenth round). A restart shows statistics at most
/// this old until each worker's next report; a registration, like every other save of the
/// record, carries the latest.
pub(crate) const STATS_SAVE_EVERY: Duration = Duration::from_secs(300);

/// A worker's record is announced to event streams for new statistics at most this often: a
/// worker may report a thousand times a second, and each announcement is a copy of its
/// record for every stream to serialize.
pub(crate) const STATS_ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// The answer to fetch `f`: its bytes, or why not.
/// The most bytes one `checkpoint_piece` to a session carries: what a frame both ends take
/// holds once base64, and at most what a fetch may ask for.
fn fetch_largest(own_max_frame: usize, session_max_frame: usize) -> u64 {
    let limit = own_max_frame.min(session_max_frame);
    (tether_proto::codec::largest_blob(limit) as u64).min(tether_proto::codec::MAX_FETCH_LEN)
}

fn checkpoint_piece(f: CheckpointFetch, found: Result<Vec<u8>, (ErrorCode, String)>) -> CoordMsg {
    let (data, refusal) = match found {
        Ok(data) => (Some(tether_proto::task::Blob(data)), None),
        Err(refusal) => (None, Some(refusal)),
    };
    CoordMsg::CheckpointPiece(CheckpointPiece {
        ack_seq: f.seq,
        task_id: f.task_id,
        checkpoint_id: f.checkpoint_id,
        offset: f.offset,
        data,
        code: refusal.as_ref().map(|(code, _)| *code),
        error: refusal.map(|(_, error)| error),
        timestamp: now(),
    })
}

impl Core {
    fn standing(&self, worker: &WorkerId, task: &TaskId, attempt: Attempt) -> Standing {
        self.standing_and_id(worker, task, attempt).0
    }

    /// The standing, and the task's id as the coordinator holds it (a copy of that one shares
    /// its text: maps keyed by it then compare keys by address).
    fn standing_and_id(
        &self,
        worker: &WorkerId,
        task: &TaskId,
        attempt: Attempt,
    ) -> (Standing, Option<&TaskId>) {
        let Some((id, t)) = self.tasks.get_key_value(task) else {
            return (Standing::Stranger, None);
        };
        if let Some(l) = &t.lease
            && &l.worker == worker
            && l.attempt == attempt
        {
            return (Standing::Holder, Some(id));
        }
        if t.attempts
            .iter()
            .any(|a| a.attempt == attempt && &a.worker == worker)
        {
            (Standing::Stale, Some(id))
        } else {
            (Standing::Stranger, Some(id))
        }
    }

    fn reject(
        &self,
        worker: &WorkerId,
        session: &SessionRef,
        msg_type: &str,
        seq: Option<tether_proto::Seq>,
        task: &TaskId,
        b: &mut Batch,
    ) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(worker = %worker, task = %task, r#type = msg_type, "message about a task this worker does not hold; rejected");
        b.send(
            session,
            CoordMsg::error(
                ErrorCode::NotLeased,
                format!("task {task} is not leased to worker {worker} at that attempt"),
                Some(msg_type.to_owned()),
                seq.map(|s| s.0),
            ),
        );
    }

    pub(super) fn on_message(
        &mut self,
        worker: &WorkerId,
        session: &SessionRef,
        msg: WorkerMsg,
        b: &mut Batch,
    ) {
        let registered = self
            .workers
            .get(worker)
            .is_some_and(|w| w.state == WorkerState::Connected);
        match msg {
            WorkerMsg::Registration(_) => self.refuse_repeated_registration(worker, session, b),
            WorkerMsg::Error(e) => {
                metrics::counter!(m::ERRORS, "code" => e.code.as_str(), "direction" => "received")
                    .increment(1);
                if self.peer_logs.admit() {
                    let offending = e.offending_type.as_deref().map(tether_proto::msg::logged);
                    tracing::warn!(worker = %worker, code = e.code.as_str(), error_message = ?e.logged(), ?offending, "worker reported an error");
                }
            }
            other if !registered => {
                b.send(
                    session,
                    CoordMsg::error(
                        ErrorCode::Unexpected,
                        "register first",
                        Some(other.type_name().to_owned()),
                        other.seq().map(|s| s.0),
                    ),
                );
            }
            WorkerMsg::Heartbeat(_) => {
                // Answered by the session itself; nothing for the model.
            }
            WorkerMsg::TaskResult(r) => self.on_result(worker, session, r, b),
            WorkerMsg::TaskState(s) => self.on_state(worker, session, s, b),
            WorkerMsg::Checkpoint(c) => self.on_checkpoint(worker, session, c, b),
            WorkerMsg::CheckpointData(d) => self.on_checkpoint_data(worker, session, d, b),
            WorkerMsg::CheckpointFetch(f) => self.on_checkpoint_fetch(worker, session, f, b),
            WorkerMsg::CheckpointError(e) => self.on_checkpoint_error(worker, e, b),
            WorkerMsg::StateError(e) => {
                if self.peer_logs.admit() {
                    let error = tether_proto::msg::logged(&e.error);
                    tracing::info!(worker = %worker, task = ?e.task_id, ?error, "worker could not serve a state request");
                }
            }
            WorkerMsg::TaskCancelled(n) => {
                self.on_notice(worker, session, n, NoticeKind::CANCELLED, b)
            }
            WorkerMsg::TaskPaused(n) => self.on_notice(worker, session, n, NoticeKind::PAUSED, b),
            WorkerMsg::TaskResumed(n) => self.on_notice(worker, session, n, NoticeKind::RESUMED, b),
            WorkerMsg::Telemetry(t) => self.on_telemetry(worker, session, t, b),
            WorkerMsg::WorkerStopping(_) => self.on_stopping(worker, b),
            WorkerMsg::WorkerStopped(_) => self.on_stopped(worker, b),
        }
    }

    /// `checkpoint_error`: the worker cannot provide a checkpoint (asked for by
    /// `checkpoint_request`, or one whose upload it abandoned). An unfinished upload of it by
    /// this worker for that task is dropped at once: its missing pieces will not come. The
    /// holder's reason is kept on its attempt's record (cut to
    /// [`tether_proto::msg::LOGGED_MESSAGE_CHARS`] characters), where `tether task` and
    /// `tether checkpoint --wait` read it: in memory only, written with the task's next save
    /// (an answer to a request changes nothing a restart needs).
    fn on_checkpoint_error(&mut self, worker: &WorkerId, e: CheckpointError, b: &mut Batch) {
        let attempt = self
            .tasks
            .get(&e.task_id)
            .and_then(|t| t.lease.as_ref())
            .filter(|l| &l.worker == worker)
            .map(|l| l.attempt);
        match attempt {
            None => {
                tracing::debug!(worker = %worker, task = %e.task_id, "checkpoint_error about a task this worker does not hold; ignored");
            }
            Some(attempt) => {
                if self.peer_logs.admit() {
                    let error = tether_proto::msg::logged(&e.error);
                    tracing::info!(worker = %worker, task = %e.task_id, checkpoint = ?e.checkpoint_id, ?error, "worker cannot provide a checkpoint");
                }
                if let Some(a) = self
                    .tasks
                    .get_mut(&e.task_id)
                    .and_then(|t| t.attempt_record(attempt))
                {
                    let end = e
                        .error
                        .char_indices()
                        .nth(tether_proto::msg::LOGGED_MESSAGE_CHARS)
                        .map_or(e.error.len(), |(i, _)| i);
                    a.checkpoint_error = Some(e.error[..end].to_owned());
                    a.checkpoint_error_at = Some(now());
                }
            }
        }
        let Some(id) = e.checkpoint_id else {
            return;
        };
        let theirs = self
            .partial
            .get(&id)
            .is_some_and(|p| &p.meta.worker == worker && p.meta.task_id == e.task_id);
        if theirs {
            self.partial.remove(&id);
            b.muts.push(Mutation::DeleteCheckpoint(id.clone()));
            tracing::info!(worker = %worker, task = %e.task_id, checkpoint = %id, "unfinished checkpoint upload dropped: the worker cannot finish it");
        }
    }

    /// `worker_stopping`: no new task goes to the worker; what it holds stays leased to it
    /// while it stops its tasks and sends what they leave.
    fn on_stopping(&mut self, worker: &WorkerId, b: &mut Batch) {
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if !w.stopping {
            // Its free slots read 0 from now on: the dispatcher passes it by.
            w.stopping = true;
            tracing::info!(worker = %worker, leases = w.leases.len(), "worker stopping: no new tasks go to it");
            self.save_worker(worker, b);
        }
    }

    /// `worker_stopped`: the worker stopped every task and has every result it made
    /// acknowledged, so no lease it still holds will report: they move now (resuming from
    /// their latest checkpoints), not after the grace period.
    fn on_stopped(&mut self, worker: &WorkerId, b: &mut Batch) {
        self.on_stopping(worker, b);
        let leases: Vec<TaskId> = self
            .workers
            .get(worker)
            .map(|w| w.leases.iter().cloned().collect())
            .unwrap_or_default();
        tracing::info!(worker = %worker, leases = leases.len(), "worker stopped: its leases move now");
        for task in leases {
            self.release_and_requeue_as(&task, "worker stopped", "stopped", b);
        }
    }

    /// Refuses the registration of a process a newer process of `worker` replaced: two live
    /// processes share the id. Without it they replace each other's sessions in turn for ever,
    /// both running what the worker leases. The newer one keeps the id: it may be a restart
    /// that found the old session not yet closed, while the old process coming back proves
    /// it alive. Refused with 4003, it stops after its third refusal.
    ///
    /// Only while the newer one holds a live session: a newer process that is gone (stopped
    /// gracefully, crashed, or a client that registered under the id once and left) gave the
    /// id up, and the older one, alive, may have it back. Refused for good instead, one short
    /// connection under a worker's id made the genuine worker exit.
    pub(super) fn superseded_refusal(&self, worker: &WorkerId, boot_id: &str) -> Option<Refusal> {
        let w = self.workers.get(worker)?;
        if w.state != WorkerState::Connected
            || w.boot_id == boot_id
            || !w.superseded.iter().any(|b| b == boot_id)
        {
            return None;
        }
        self.counters.id_conflicts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::ID_CONFLICTS).increment(1);
        // Once a window per worker at WARN: the replaced process tries again without end.
        let said = self.refusals.note(worker.as_str(), REPLACED_AGAIN);
        if said.warn {
            tracing::warn!(worker = %worker, boot = ?logged(boot_id), holder = ?logged(&w.boot_id), repeats_at_debug = said.repeats, "a process this worker's newer process replaced registered again: two processes share this worker id; refused (give each its own id; its repeats within 10 min are logged at debug)");
        } else {
            tracing::debug!(worker = %worker, boot = ?logged(boot_id), holder = ?logged(&w.boot_id), repeat = said.repeats, "a replaced process of this worker registered again; refused");
        }
        // A close reason is at most 123 bytes: a boot id the worker made is 34. Escaped: the
        // reason is logged, and a boot id kept from before control characters were refused
        // could hold a newline.
        let holder: String = w
            .boot_id
            .chars()
            .flat_map(char::escape_debug)
            .take(40)
            .collect();
        Some(Refusal {
            code: 4003,
            kind: m::Refused::Replaced,
            reason: format!(
                "worker id taken by a newer process (boot {holder}); give each its own id"
            ),
            error: None,
        })
    }

    /// Tells `session` why its registration is refused, and closes it.
    pub(super) fn refuse_registration(
        &self,
        worker: &WorkerId,
        session: &SessionRef,
        refusal: Refusal,
        b: &mut Batch,
    ) {
        // Once a window per worker and kind at WARN, as the session says its own refusals.
        refusal.kind.count();
        let said = self.refusals.note(worker.as_str(), refusal.kind.as_str());
        if said.warn {
            tracing::warn!(worker = %worker, code = refusal.code, reason = %refusal.reason, repeats_at_debug = said.repeats, "registration refused (its repeats for this reason within 10 min are logged at debug)");
        } else {
            tracing::debug!(worker = %worker, code = refusal.code, reason = %refusal.reason, repeat = said.repeats, "registration refused again");
        }
        if let Some(e) = refusal.error {
            b.send(session, e);
        }
        b.close(session, refusal.code, refusal.reason);
    }

    /// A `registration` in a session that registered already (in its `Event::Connected`): the
    /// worker registers once a session, and again only on a new one. Answered `error`
    /// `unexpected` and ignored, as the session itself answers one on an authenticated session
    /// (`unauthorized`, its nonce used): nothing is reconciled again. Taken, each would send
    /// again every lease the inventory leaves out, its checkpoint read whole on the store
    /// writer's thread, and restart its timeout clock: a batch frame of such registrations
    /// stalled every commit, and one every so often kept a task past its timeout for ever.
    fn refuse_repeated_registration(
        &mut self,
        worker: &WorkerId,
        session: &SessionRef,
        b: &mut Batch,
    ) {
        if self.peer_logs.admit() {
            tracing::warn!(worker = %worker, session = session.id, "registration again in a registered session; refused");
        }
        b.send(
            session,
            CoordMsg::error(
                ErrorCode::Unexpected,
                "this session has registered already; reconnect to register again",
                Some("registration".to_owned()),
                None,
            ),
        );
    }

    pub(super) fn on_registration(
        &mut self,
        worker: &WorkerId,
        session: &SessionRef,
        r: Registration,
        b: &mut Batch,
    ) {
        if let Some(refusal) = registration_refusal(worker, &r) {
            return self.refuse_registration(worker, session, refusal, b);
        }
        self.counters.registrations.fetch_add(1, Ordering::Relaxed);
        let compression = self.cfg.compression
            && r.compression
                .iter()
                .any(|c| c == tether_proto::compress::ZSTD);
        let Reconciled { directives, resend } = self.reconcile(worker, &r, b);
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        w.capabilities = r.capabilities.into_iter().collect();
        w.tags = r.tags;
        w.slots = r.slots;
        w.executors = r.executors.into_iter().collect();
        // A process that said it is stopping and registers again has come back only to hand
        // back what it holds (it takes no assignment): it stays stopping. A new process of the
        // worker takes work.
        let same_process = w.boot_id == r.boot_id;
        if !w.boot_id.is_empty() && w.boot_id != r.boot_id {
            // A new process of this worker: the one it replaces, should it be alive and come
            // back, shares the id with it (superseded_refusal).
            tracing::info!(worker = %worker, boot = ?logged(&r.boot_id), previous = ?logged(&w.boot_id), "a new process of this worker registered");
            if w.superseded.len() == SUPERSEDED_KEPT {
                w.superseded.remove(0);
            }
            w.superseded.push(std::mem::take(&mut w.boot_id));
        }
        // A process that took the id back is no longer one that was replaced.
        w.superseded.retain(|b| *b != r.boot_id);
        w.boot_id = r.boot_id;
        w.stopping &= same_process;
        if !same_process {
            // A new process (its disk emptied, its limits raised) is tried again at once.
            w.resting = None;
            w.faults_in_row = 0;
        }
        // From the registration ack on, recorded messages are acknowledged by number.
        if let Some(s) = w.session.as_mut().filter(|s| s.id == session.id) {
            s.compact_acks = r.compact_acks;
            s.checkpoint_fetch = r.checkpoint_fetch;
            if let Some(n) = r.max_frame {
                s.max_frame = usize::try_from(n).unwrap_or(usize::MAX);
            }
        }
        if w.sessions > 1 {
            metrics::counter!(m::RECONNECTIONS).increment(1);
            self.counters.reconnections.fetch_add(1, Ordering::Relaxed);
            if let Some(since) = w.disconnected_mono {
                m::observe(m::RECONNECT_DURATION, since.elapsed());
            }
        }
        w.state = WorkerState::Connected;
        w.disconnected_at = None;
        w.disconnected_mono = None;
        // Saved now, with its statistics: the next telemetry need not save it again. A worker
        // with none yet has its first report saved, or a restart would show it with none for
        // up to `STATS_SAVE_EVERY`.
        w.stats_saved = w.stats.is_some().then(tokio::time::Instant::now);
        self.free.insert(worker.clone());
        self.save_worker(worker, b);
        tracing::info!(worker = %worker, session = session.id, peer = ?session.peer, directives = directives.len(), "worker registered");
        b.send(
            session,
            CoordMsg::RegistrationAck(RegistrationAck {
                worker_id: worker.clone(),
                session_id: session.id,
                directives,
                compression: compression.then(|| tether_proto::compress::ZSTD.to_owned()),
                batching: self.cfg.batching().filter(|_| r.batching),
                compact_acks: r.compact_acks,
                max_frame: Some(self.cfg.max_frame as u64),
                max_checkpoint: Some(self.cfg.max_checkpoint_bytes),
                message_rate: Some(tether_proto::msg::Rate {
                    per_sec: self.cfg.limits.messages_per_sec,
                    burst: self.cfg.limits.message_burst,
                }),
                byte_rate: Some(tether_proto::msg::Rate {
                    per_sec: self.cfg.limits.bytes_per_sec,
                    burst: self.cfg.limits.byte_burst,
                }),
                // A worker holding its leases keeps its reconnect delays well below it.
                lost_after_ms: Some(self.cfg.lost_after.as_millis() as u64),
                timestamp: now(),
            }),
        );
        // After the ack: assignments the worker never received, through the session as the
        // registration left it (its frame limit known).
        let current = self
            .workers
            .get(worker)
            .and_then(|w| w.session.clone())
            .filter(|s| s.id == session.id);
        for task_id in resend {
            self.restart_lease_clock(&task_id, b);
            self.assign(&task_id, current.as_ref().unwrap_or(session), b);
        }
        self.dispatch_needed = true;
    }

    /// The assignment of `task_id` goes again to its holder, which never got it: the worker's
    /// clock for the task starts then, so the timeout backstop counts from here (and from here
    /// after a restart), or it could end the task as overdue before the worker's own deadline.
    ///
    /// Once a lease only: a worker that registers again and again (each time on a new
    /// session, leaving the lease out) would otherwise put the backstop off for ever. While
    /// the lease's `since` is its attempt's start, its clock never restarted; once restarted,
    /// a later resend leaves it, and the backstop ends the task at most a timeout and grace
    /// period after the first resend, which itself came within those of the lease's start.
    /// A worker that lost the same assignment twice may then be ended before its own
    /// deadline of the second: the price of the bound.
    fn restart_lease_clock(&mut self, task_id: &TaskId, b: &mut Batch) {
        let Some(t) = self.tasks.get_mut(task_id) else {
            return;
        };
        let Some(lease) = t.lease.as_mut() else {
            return;
        };
        let restarted = t
            .attempts
            .iter()
            .rev()
            .find(|a| a.attempt == lease.attempt && a.worker == lease.worker)
            .is_none_or(|a| a.started_at != lease.since);
        if restarted {
            tracing::debug!(task = %task_id, attempt = %lease.attempt, "assignment sent again; its lease's clock restarted once already and keeps running");
            return;
        }
        lease.since = now();
        t.lease_started = Some(tokio::time::Instant::now());
        self.save_task(task_id, b);
    }

    /// Agrees with a (re)registering worker on the truth, in one exchange.
    ///
    /// - A running task this worker holds at that attempt: continue (or pause, if paused).
    /// - A running task it does not hold (moved on, finished, cancelled, unknown): cancel it.
    /// - A task it holds but reports lost with a previous process: requeue it now.
    /// - A task it holds but does not mention at all, registering from the process the lease
    ///   went to: it never got the assignment; send again.
    /// - The same from a new process (another boot id): the attempt ran, if at all, in the
    ///   process that is gone, so it ends lost and the task is requeued; the next attempt gets
    ///   its own number (resuming from the checkpoint), so the history shows the restart and
    ///   no two processes ever run one attempt.
    /// - Finished results it still holds need nothing here: they follow in the outbox replay,
    ///   and a result already recorded is acknowledged again without being recorded twice.
    fn reconcile(&mut self, worker: &WorkerId, r: &Registration, b: &mut Batch) -> Reconciled {
        // Held for a replay of an earlier session that did not come through: dead all the same.
        self.release_held(worker, "the worker registered again", b);
        let inv = &r.inventory;
        let mut directives = Vec::new();
        for run in &inv.running {
            let (action, reason) = match self.standing(worker, &run.task_id, run.attempt) {
                Standing::Holder => {
                    let desired = self
                        .tasks
                        .get(&run.task_id)
                        .and_then(|t| t.lease.as_ref())
                        .map(|l| l.desired);
                    match desired {
                        Some(Desired::Paused) => (DirectiveAction::Pause, String::new()),
                        _ => (DirectiveAction::Continue, String::new()),
                    }
                }
                Standing::Stale => (DirectiveAction::Cancel, MOVED_ON.to_owned()),
                Standing::Stranger => (DirectiveAction::Cancel, NO_LEASE.to_owned()),
            };
            directives.push(Directive {
                task_id: run.task_id.clone(),
                attempt: run.attempt,
                action,
                reason,
            });
        }
        // A finished attempt whose lease was lost while the worker was away, of a task that
        // waits in the queue: the lease goes back, so the result the replay brings next is
        // counted instead of the task run again.
        for done in &inv.finished {
            self.restore_lease(&done.task_id, worker, done.attempt, b);
        }
        let held: Vec<TaskId> = self
            .workers
            .get(worker)
            .map(|w| w.leases.iter().cloned().collect())
            .unwrap_or_default();
        let mut resend = Vec::new();
        let new_process = self
            .workers
            .get(worker)
            .is_some_and(|w| !w.boot_id.is_empty() && w.boot_id != r.boot_id);
        // Sets, not scans: a registration may name many tasks, and a worker hold many leases
        // (a scan of one for each of the other is their product, on the core's thread).
        let known: crate::model::IdSet<(&TaskId, Attempt)> = inv
            .running
            .iter()
            .chain(inv.finished.iter())
            .map(|x| (&x.task_id, x.attempt))
            .collect();
        let died: crate::model::IdSet<(&TaskId, Attempt)> =
            inv.lost.iter().map(|x| (&x.task_id, x.attempt)).collect();
        // Dead tasks wait for the replay that follows, when the worker says it holds one: a
        // checkpoint of theirs may come in it. Not weighed against `acked_seq`: results go
        // first, so a checkpoint may wait below a later message already acknowledged.
        let replay = inv.replay_through;
        let mut hold = Vec::new();
        for task_id in held {
            let Some(lease) = self.tasks.get(&task_id).and_then(|t| t.lease.clone()) else {
                continue;
            };
            if known.contains(&(&task_id, lease.attempt)) {
                continue;
            }
            if died.contains(&(&task_id, lease.attempt)) {
                if replay.is_some() {
                    tracing::info!(worker = %worker, task = %task_id, attempt = %lease.attempt, "task died with the worker's previous process; requeued once the replay of what that process sent is through");
                    hold.push((task_id, lease.attempt));
                } else {
                    tracing::info!(worker = %worker, task = %task_id, attempt = %lease.attempt, "task died with the worker's previous process; requeued");
                    self.release_and_requeue(&task_id, "died with the worker process", b);
                }
            } else if new_process {
                tracing::info!(worker = %worker, task = %task_id, attempt = %lease.attempt, "a new process of the worker does not know its lease; requeued");
                self.release_and_requeue(&task_id, "the worker's process was replaced", b);
            } else {
                tracing::info!(worker = %worker, task = %task_id, attempt = %lease.attempt, "worker does not know its lease; assignment sent again");
                resend.push(task_id);
            }
        }
        if let Some(through) = replay {
            self.hold_dead(worker, through, hold);
        }
        Reconciled { directives, resend }
    }

    fn on_result(&mut self, worker: &WorkerId, session: &SessionRef, r: TaskResult, b: &mut Batch) {
        let seq = r.seq;
        let task_id = r.task_id.clone();
        // The answer, and the `disposition` label it is counted under.
        let (disposition, label) = match self.standing(worker, &task_id, r.attempt) {
            Standing::Stranger => {
                self.reject(worker, session, "task_result", Some(seq), &task_id, b);
                (Disposition::Rejected, m::disposition(Disposition::Rejected))
            }
            standing => {
                let already = self
                    .tasks
                    .get_mut(&task_id)
                    .and_then(|t| t.attempt_record(r.attempt))
                    .is_some_and(|a| a.result_recorded);
                if already {
                    self.counters
                        .results_duplicate
                        .fetch_add(1, Ordering::Relaxed);
                    (
                        Disposition::Duplicate,
                        m::disposition(Disposition::Duplicate),
                    )
                } else if standing == Standing::Holder
                    && r.worker_fault
                    && r.outcome == tether_proto::Outcome::Failed
                {
                    self.requeue_worker_fault(worker, &r, b);
                    self.counters
                        .results_worker_fault
                        .fetch_add(1, Ordering::Relaxed);
                    (Disposition::Recorded, "worker_fault")
                } else if standing == Standing::Holder && self.retried_on(&r) {
                    self.requeue_retried(worker, &r, b);
                    self.counters
                        .results_retried
                        .fetch_add(1, Ordering::Relaxed);
                    (Disposition::Recorded, "retried")
                } else if standing == Standing::Stale && self.adoptable(worker, &r) {
                    self.supersede_for(&task_id, r.attempt, b);
                    self.record_result(worker, &r, false, b);
                    tracing::info!(worker = %worker, task = %task_id, attempt = %r.attempt, outcome = ?r.outcome, "late result of an attempt whose lease was lost counted: the task had no counted result");
                    self.counters
                        .results_recorded
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .results_adopted
                        .fetch_add(1, Ordering::Relaxed);
                    (Disposition::Recorded, "adopted")
                } else {
                    let stale = standing == Standing::Stale;
                    let cancelled = stale && self.attempt_cancelled(&task_id, r.attempt);
                    self.record_result(worker, &r, stale, b);
                    if cancelled {
                        // Kept and answered like a stale result, counted apart: a stale result
                        // is a sign of a fault (a lease lost), this one of a user's cancel.
                        self.counters
                            .results_cancelled
                            .fetch_add(1, Ordering::Relaxed);
                        (Disposition::Stale, "cancelled")
                    } else if stale {
                        self.counters.results_stale.fetch_add(1, Ordering::Relaxed);
                        (Disposition::Stale, m::disposition(Disposition::Stale))
                    } else {
                        if let Some(w) = self.workers.get_mut(worker) {
                            // It ran a task: its next fault rests it the shortest time again.
                            w.faults_in_row = 0;
                        }
                        self.counters
                            .results_recorded
                            .fetch_add(1, Ordering::Relaxed);
                        (Disposition::Recorded, m::disposition(Disposition::Recorded))
                    }
                }
            }
        };
        metrics::counter!(m::RESULTS, "disposition" => label).increment(1);
        let reason = self.ack_reason(disposition, &task_id, r.attempt);
        b.send(
            session,
            ack(
                CoordMsg::TaskResultAck,
                seq,
                Some(task_id),
                None,
                None,
                disposition,
                reason,
            ),
        );
    }

    /// The holder's result of an attempt it could not run, for a fault of the worker's own
    /// (its disk, its process limits) and not the task's (`worker_fault`): the lease ends (the
    /// attempt's end `worker_fault`) and the task is queued again, as for an attempt lost
    /// with its worker, or fails once its attempts are used up. The result is kept with the
    /// attempt, not counted, as a stale one is.
    fn requeue_worker_fault(&mut self, worker: &WorkerId, r: &TaskResult, b: &mut Batch) {
        let error = r.error.as_ref().map_or("", |e| e.message.as_str());
        let why = format!(
            "worker {worker} could not run the attempt: {:?}",
            tether_proto::msg::logged(error)
        );
        let rest = self.rest(worker, error, b);
        tracing::warn!(worker = %worker, task = %r.task_id, attempt = %r.attempt, error = ?tether_proto::msg::logged(error), rest_ms = rest.as_millis() as u64, "the worker could not run the attempt; the task runs again, and the worker takes no new task for a while");
        // The rest first: the requeued task must not go straight back to the same worker.
        self.release_and_requeue_as(&r.task_id, &why, "worker_fault", b);
        self.record_result(worker, r, true, b);
    }

    /// Whether the holder's result `r` runs its task again instead of ending it: an end the
    /// spec's `retry_on` names, with an attempt to spare (the last attempt's end is the
    /// task's, counted as any other).
    fn retried_on(&self, r: &TaskResult) -> bool {
        self.tasks.get(&r.task_id).is_some_and(|t| {
            t.spec.retries_on(r.outcome) && t.attempts_started() < t.max_attempts()
        })
    }

    /// The holder's result of an attempt that ended as its task's `retry_on` names: the lease
    /// ends (the attempt's end its outcome), the task is queued again for its next attempt
    /// (which resumes from its latest checkpoint, as after a lost one), and the result is kept
    /// with the attempt, not counted. The worker is not faulted: the task failed, not it.
    fn requeue_retried(&mut self, worker: &WorkerId, r: &TaskResult, b: &mut Batch) {
        let end = TaskStatus::from(r.outcome).as_str();
        let error = r.error.as_ref().map_or("", |e| e.message.as_str());
        tracing::info!(worker = %worker, task = %r.task_id, attempt = %r.attempt, end, error = ?tether_proto::msg::logged(error), "attempt ended as the task retries on: it runs again");
        let why = format!("attempt {} {end}, which the task retries on", r.attempt);
        self.release_and_requeue_as(&r.task_id, &why, end, b);
        self.record_result(worker, r, true, b);
        if let Some(w) = self.workers.get_mut(worker) {
            w.faults_in_row = 0;
        }
    }

    /// Rests `worker` after a fault of its own: it takes no new task for [`WORKER_FAULT_REST`],
    /// doubled for each such fault in a row up to [`WORKER_FAULT_REST_MAX`], so that a worker
    /// whose disk is full does not take every queued task's attempts in turn while other
    /// workers could run them. What it holds stays leased to it. Returns the rest.
    fn rest(&mut self, worker: &WorkerId, error: &str, b: &mut Batch) -> Duration {
        let Some(w) = self.workers.get_mut(worker) else {
            return Duration::ZERO;
        };
        w.faults_in_row = w.faults_in_row.saturating_add(1);
        let rest = WORKER_FAULT_REST
            .saturating_mul(1 << (w.faults_in_row - 1).min(16))
            .min(WORKER_FAULT_REST_MAX);
        if w.resting.is_none() {
            self.resting.push(worker.clone());
        }
        w.resting = Some(Box::new(Rest {
            until: now() + chrono::Duration::from_std(rest).unwrap_or(chrono::Duration::MAX),
            faults: w.faults_in_row,
            error: error
                .chars()
                .take(tether_proto::msg::LOGGED_MESSAGE_CHARS)
                .collect(),
            ends: tokio::time::Instant::now() + rest,
        }));
        self.free.remove(worker);
        self.save_worker(worker, b);
        rest
    }

    /// Whether `r`, from an attempt that is not the lease's, is counted all the same: the
    /// attempt's lease was lost with its worker (not ended by a cancel, a timeout or a fault
    /// of the worker's), it ran to an end of its own (completed, failed, timed out: not
    /// stopped), and its task has no counted result and was not ended by the coordinator.
    /// Finished work is not thrown away for a network's fault; the attempt that replaced it,
    /// queued or running, is superseded ([`Core::supersede_for`]). A task whose attempt ran
    /// already counted keeps that result; this one is kept stale. So is an end the task's
    /// `retry_on` names: it would have run the task again, and its next attempt is under way.
    fn adoptable(&self, worker: &WorkerId, r: &TaskResult) -> bool {
        use tether_proto::Outcome;
        if r.worker_fault
            || !matches!(
                r.outcome,
                Outcome::Completed | Outcome::Failed | Outcome::TimedOut
            )
        {
            return false;
        }
        self.tasks.get(&r.task_id).is_some_and(|t| {
            !t.status.is_terminal()
                && !t.spec.retries_on(r.outcome)
                && t.attempts.iter().any(|a| {
                    a.attempt == r.attempt
                        && &a.worker == worker
                        && a.end.as_deref() == Some(super::tasks::LOST)
                })
        })
    }

    /// Whether the coordinator ended `attempt` of `task` itself, sending `cancel_task`: a
    /// user's cancel (its record's end is `cancelled`) or the timeout backstop (`timed_out`).
    fn attempt_cancelled(&self, task: &TaskId, attempt: Attempt) -> bool {
        self.tasks.get(task).is_some_and(|t| {
            t.attempts.iter().any(|a| {
                a.attempt == attempt && matches!(a.end.as_deref(), Some("cancelled" | "timed_out"))
            })
        })
    }

    /// The `reason` of an ack with `disposition`: for `stale`, why `attempt` of `task` no
    /// longer counts (how it ended) and what became of the task, for the worker's log; none
    /// for the others (a refusal's why goes in its `error`).
    fn ack_reason(
        &self,
        disposition: Disposition,
        task: &TaskId,
        attempt: Attempt,
    ) -> Option<String> {
        if disposition != Disposition::Stale {
            return None;
        }
        let t = self.tasks.get(task)?;
        let end = t
            .attempts
            .iter()
            .find(|a| a.attempt == attempt)
            .and_then(|a| a.end.as_deref());
        let other;
        let why = match end {
            Some("cancelled") => "the task was cancelled",
            Some("timed_out") => "the task ran past its timeout and the coordinator ended it",
            Some(super::tasks::LOST) => {
                "the attempt's lease was lost with its worker (away past its grace, --lost-after, or its process replaced)"
            }
            Some("stopped") => "the worker stopped and handed the attempt back",
            Some("worker_fault") => {
                "the attempt failed for a fault of the worker's own and the task was queued again"
            }
            Some(super::tasks::SUPERSEDED) => {
                "a late result of an earlier attempt was counted instead"
            }
            Some(ended) => {
                other = format!("the attempt ended {ended}");
                &other
            }
            None => "the attempt no longer holds the task's lease",
        };
        let now = match &t.lease {
            Some(l) => format!("it runs as attempt {} on worker {}", l.attempt, l.worker),
            None if t.status.is_terminal() => format!("it ended {}", t.status.as_str()),
            None => format!("it is {}", t.status.as_str()),
        };
        Some(format!("attempt {attempt} no longer counts: {why}; {now}"))
    }

    fn record_result(&mut self, worker: &WorkerId, r: &TaskResult, stale: bool, b: &mut Batch) {
        let Some(t) = self.tasks.get_mut(&r.task_id) else {
            return;
        };
        let ts = now();
        let mut started = t.lease.as_ref().map(|l| l.since);
        if let Some(a) = t.attempt_record(r.attempt) {
            a.result_recorded = true;
            // A counted result's attempt ends with its outcome, one adopted after its lease
            // was lost too (`lost` was the coordinator's guess, the result the truth).
            if a.ended_at.is_none() || !stale {
                a.ended_at = Some(ts);
                a.end = Some(
                    tether_proto::TaskStatus::from(r.outcome)
                        .as_str()
                        .to_owned(),
                );
            }
            started.get_or_insert(a.started_at);
        }
        if !stale {
            if let Some(since) = started {
                let status = TaskStatus::from(r.outcome).as_str();
                metrics::histogram!(m::TASK_DURATION, "outcome" => status)
                    .record(m::secs_between(since, ts));
                metrics::counter!(m::TASKS_FINISHED, "status" => status).increment(1);
            }
            t.lease = None;
            t.status = r.outcome.into();
            t.outcome = Some(r.outcome);
            // Cut: the result stored below keeps it whole.
            t.error = r.error.as_ref().map(|e| kept_error(&e.message));
            t.finished_at = Some(ts);
            t.updated_at = ts;
            if let Some(w) = self.workers.get_mut(worker) {
                w.leases.remove(&r.task_id);
                self.free.insert(worker.clone());
            }
            self.dispatch_needed = true;
            self.drop_partials(&r.task_id, None, b);
            tracing::debug!(worker = %worker, task = %r.task_id, attempt = %r.attempt, outcome = ?r.outcome, "result recorded");
        } else {
            tracing::info!(worker = %worker, task = %r.task_id, attempt = %r.attempt, "stale result kept, not counted");
        }
        b.muts.push(Mutation::PutResult {
            task_id: r.task_id.clone(),
            attempt: r.attempt,
            worker: worker.clone(),
            outcome: r.outcome,
            stale,
            body: encode(r),
        });
        self.save_task(&r.task_id, b);
    }

    fn on_state(&mut self, worker: &WorkerId, session: &SessionRef, s: TaskState, b: &mut Batch) {
        let disposition = match self.standing_and_id(worker, &s.task_id, s.attempt) {
            (Standing::Holder, Some(id)) => {
                b.muts.push(Mutation::PutState {
                    task_id: id.clone(),
                    attempt: s.attempt,
                    // The text as received: no tree is built or serialised again.
                    state: s.state.clone(),
                });
                Disposition::Recorded
            }
            (Standing::Stale, _) => Disposition::Stale,
            // A stranger (a holder's task always has an id).
            _ => {
                self.reject(worker, session, "task_state", Some(s.seq), &s.task_id, b);
                Disposition::Rejected
            }
        };
        let reason = self.ack_reason(disposition, &s.task_id, s.attempt);
        Core::send_ack(b, session, s.seq, disposition, || {
            ack(
                CoordMsg::TaskStateAck,
                s.seq,
                Some(s.task_id),
                None,
                None,
                disposition,
                reason,
            )
        });
    }

    /// Why a new upload of the lease holder's attempt cannot start while its others are
    /// unfinished: more than [`UNFINISHED_CHECKPOINTS_PER_ATTEMPT`] of them, or more than
    /// [`INCOMPLETE_CHECKPOINTS_PER_TASK`] times `max_checkpoint_bytes` declared together.
    fn unfinished_refusal(&self, c: &Checkpoint) -> Option<String> {
        let (count, declared) = self.partial.of_attempt(&c.task_id, c.attempt);
        if count >= UNFINISHED_CHECKPOINTS_PER_ATTEMPT {
            return Some(format!(
                "attempt {} of task {} has {count} unfinished checkpoints, the most it may have; \
                 complete one first",
                c.attempt, c.task_id
            ));
        }
        let most = INCOMPLETE_CHECKPOINTS_PER_TASK * self.cfg.max_checkpoint_bytes;
        (declared.saturating_add(c.size) > most).then(|| {
            format!(
                "incomplete checkpoints of task {} would exceed {most} bytes; complete one first",
                c.task_id
            )
        })
    }

    /// Why the lease holder's announcement of a new checkpoint cannot be taken: its pieces
    /// could not add up to its size, or its id is another upload's.
    fn announce_refusal(&self, worker: &WorkerId, c: &Checkpoint) -> Option<String> {
        // Every piece but an empty checkpoint's single one carries a byte: more pieces than
        // bytes could never complete, and each would take a row.
        let most = c.size.clamp(1, MAX_CHECKPOINT_CHUNKS);
        if c.chunks == 0 || u64::from(c.chunks) > most {
            return Some(format!(
                "checkpoint {} of {} bytes announces {} pieces; it may have 1 to {most}",
                c.checkpoint_id, c.size, c.chunks
            ));
        }
        if let Some(owner) = self
            .checkpoint_owner
            .get(&c.checkpoint_id)
            .filter(|&owner| owner != &c.task_id)
        {
            return Some(format!(
                "checkpoint id {} is a checkpoint of task {owner}; ids are one task's",
                c.checkpoint_id
            ));
        }
        let p = self.partial.get(&c.checkpoint_id)?;
        let same = p.meta.task_id == c.task_id
            && p.meta.attempt == c.attempt
            && &p.meta.worker == worker
            && p.meta.size == c.size
            && p.meta.chunks == c.chunks;
        (!same).then(|| {
            format!(
                "checkpoint id {} is already being uploaded for task {} attempt {} ({} bytes in {} pieces)",
                c.checkpoint_id, p.meta.task_id, p.meta.attempt, p.meta.size, p.meta.chunks
            )
        })
    }

    /// Drops the unfinished checkpoints that no lease can complete any more, and the memory of
    /// superseded ones that no lease can replay, of every task: at start, for what a previous
    /// run left (an attempt that ended while it uploaded).
    pub(super) fn drop_unleased_partials(&mut self, b: &mut Batch) {
        let tasks: Vec<TaskId> = self
            .partial
            .tasks()
            .chain(self.superseded.keys())
            .cloned()
            .collect();
        for task in tasks {
            let live = self
                .tasks
                .get(&task)
                .and_then(|t| t.lease.as_ref())
                .map(|l| l.attempt);
            self.drop_partials(&task, live, b);
        }
    }

    /// Drops what no lease of `task` but `live` can use any more (everything, for `None`): the
    /// unfinished checkpoints of the other attempts, from memory and the store, and the
    /// superseded ones another attempt's lease remembered. Costs what it drops.
    pub(super) fn drop_partials(&mut self, task: &TaskId, live: Option<Attempt>, b: &mut Batch) {
        for id in self.partial.remove_ended(task, live) {
            tracing::debug!(task = %task, checkpoint = %id, "unfinished checkpoint of an ended attempt dropped");
            b.muts.push(Mutation::DeleteCheckpoint(id));
        }
        if self
            .superseded
            .get(task)
            .is_some_and(|s| Some(s.attempt) != live)
            && let Some(s) = self.superseded.remove(task)
        {
            for id in s.ids {
                self.checkpoint_owner.remove(&id);
            }
            b.muts.push(Mutation::ForgetSuperseded(task.clone()));
        }
    }

    fn on_checkpoint(
        &mut self,
        worker: &WorkerId,
        session: &SessionRef,
        c: Checkpoint,
        b: &mut Batch,
    ) {
        let disposition = match self.standing(worker, &c.task_id, c.attempt) {
            Standing::Holder if c.size > self.cfg.max_checkpoint_bytes => {
                // The attempt's record keeps the fact; what it means for a resume depends on
                // the checkpoints after it (`tether task` shows the latest kept).
                let refused = format!(
                    "checkpoint {} of {} bytes exceeds the limit of {}",
                    c.checkpoint_id, c.size, self.cfg.max_checkpoint_bytes
                );
                let error = format!("{refused}; a resume starts from an earlier checkpoint");
                tracing::warn!(worker = %worker, task = %c.task_id, attempt = %c.attempt, %error, "checkpoint refused");
                self.counters
                    .checkpoints_too_large
                    .fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::CHECKPOINTS_TOO_LARGE).increment(1);
                if let Some(a) = self
                    .tasks
                    .get_mut(&c.task_id)
                    .and_then(|t| t.attempt_record(c.attempt))
                {
                    a.checkpoint_refused = Some(refused);
                }
                self.save_task(&c.task_id, b);
                b.send(
                    session,
                    CoordMsg::error(
                        ErrorCode::BadFrame,
                        error,
                        Some("checkpoint".into()),
                        Some(c.seq.0),
                    ),
                );
                Disposition::Rejected
            }
            // Complete already, kept or superseded: a replay (acknowledgements lost with a
            // session), or a re-upload for `checkpoint_request`. Taken again, a superseded one
            // would become the latest and the newer ones would be pruned.
            Standing::Holder if self.checkpoint_owner.get(&c.checkpoint_id) == Some(&c.task_id) => {
                self.counters
                    .checkpoint_messages_duplicate
                    .fetch_add(1, Ordering::Relaxed);
                Disposition::Duplicate
            }
            Standing::Holder if let Some(error) = self.announce_refusal(worker, &c) => {
                b.send(
                    session,
                    CoordMsg::error(
                        ErrorCode::BadFrame,
                        error,
                        Some("checkpoint".into()),
                        Some(c.seq.0),
                    ),
                );
                Disposition::Rejected
            }
            Standing::Holder
                if !self.partial.contains_key(&c.checkpoint_id)
                    && let Some(error) = self.unfinished_refusal(&c) =>
            {
                // Announced but never completed checkpoints would otherwise pile up on disk
                // and in memory.
                b.send(
                    session,
                    CoordMsg::error(
                        ErrorCode::BadFrame,
                        error,
                        Some("checkpoint".into()),
                        Some(c.seq.0),
                    ),
                );
                Disposition::Rejected
            }
            Standing::Holder => {
                if !self.partial.contains_key(&c.checkpoint_id) {
                    self.drop_partials(&c.task_id, Some(c.attempt), b);
                    let meta = CheckpointMeta {
                        checkpoint_id: c.checkpoint_id.clone(),
                        task_id: c.task_id.clone(),
                        attempt: c.attempt,
                        worker: worker.clone(),
                        size: c.size,
                        chunks: c.chunks,
                        created_at: now(),
                    };
                    b.muts.push(Mutation::PutCheckpoint {
                        meta: meta.clone(),
                        complete: false,
                    });
                    self.partial.insert(Partial {
                        meta,
                        received: Default::default(),
                        bytes: 0,
                    });
                }
                Disposition::Recorded
            }
            Standing::Stale => Disposition::Stale,
            Standing::Stranger => {
                self.reject(worker, session, "checkpoint", Some(c.seq), &c.task_id, b);
                Disposition::Rejected
            }
        };
        let reason = self.ack_reason(disposition, &c.task_id, c.attempt);
        Core::send_ack(b, session, c.seq, disposition, || {
            ack(
                CoordMsg::CheckpointAck,
                c.seq,
                Some(c.task_id),
                Some(c.checkpoint_id),
                None,
                disposition,
                reason,
            )
        });
    }

    /// `checkpoint_fetch`: a range of the checkpoint that the lease holder's assignment named
    /// without its bytes. Read on the store's reader once the batch is committed (never on the
    /// core's thread) and sent as one `checkpoint_piece`; a fetch that cannot be served gets a
    /// piece saying why, which acknowledges it all the same.
    fn on_checkpoint_fetch(
        &mut self,
        worker: &WorkerId,
        session: &SessionRef,
        f: CheckpointFetch,
        b: &mut Batch,
    ) {
        let admitted = self.fetch_refusal(worker, &f).and_then(|()| {
            let count = self.fetching.entry(session.id).or_default();
            InFlight::enter(count, MAX_FETCHES_IN_FLIGHT).ok_or_else(|| {
                let error = format!(
                    "{MAX_FETCHES_IN_FLIGHT} fetches of this session are in flight; ask again \
                     once their pieces came"
                );
                (ErrorCode::RateLimited, error)
            })
        });
        let in_flight = match admitted {
            Ok(in_flight) => in_flight,
            Err((code, error)) => {
                tracing::warn!(worker = %worker, task = %f.task_id, checkpoint = %f.checkpoint_id, %error, "checkpoint fetch refused");
                b.send(session, checkpoint_piece(f, Err((code, error))));
                return;
            }
        };
        let s = session.clone();
        let counters = self.counters.clone();
        // A fetch queued under a larger frame limit (a restart lowered it since) is served the
        // first bytes of its range that a frame carries now; the worker asks for the rest.
        let len = f
            .len
            .min(fetch_largest(self.cfg.max_frame, session.max_frame));
        b.reads.push(Box::new(move |conn| {
            let range =
                store::read_checkpoint_range(conn, &f.task_id, &f.checkpoint_id, f.offset, len);
            let found = match range {
                Ok(Some(data)) => {
                    let n = data.len() as u64;
                    metrics::counter!(m::CHECKPOINT_BYTES_SERVED).increment(n);
                    counters
                        .checkpoint_bytes_served
                        .fetch_add(n, Ordering::Relaxed);
                    Ok(data)
                }
                // Removed since (the task was retried or forgotten): the fetch is out of date.
                Ok(None) => Err((
                    ErrorCode::BadFrame,
                    format!("checkpoint {} not found", f.checkpoint_id),
                )),
                Err(e) => {
                    tracing::error!(error = %e, checkpoint = %f.checkpoint_id, "reading a checkpoint for a fetch failed");
                    let error = format!("reading checkpoint {} failed: {e}", f.checkpoint_id);
                    Err((ErrorCode::Internal, error))
                }
            };
            let reply = checkpoint_piece(f, found);
            s.send_all([Outgoing::Piece(Box::new((reply, in_flight)))]);
        }));
    }

    /// Why a `checkpoint_fetch` cannot be served, with its code: `not_leased` when its sender
    /// does not hold the lease at its attempt, `bad_frame` when it asks for what is not there
    /// or more than a fetch may (what a frame does not carry is served shorter).
    fn fetch_refusal(
        &self,
        worker: &WorkerId,
        f: &CheckpointFetch,
    ) -> Result<(), (ErrorCode, String)> {
        if self.standing(worker, &f.task_id, f.attempt) != Standing::Holder {
            let error = format!(
                "task {} is not leased to worker {worker} at attempt {}",
                f.task_id, f.attempt
            );
            return Err((ErrorCode::NotLeased, error));
        }
        let latest = self
            .tasks
            .get(&f.task_id)
            .and_then(|t| t.latest_checkpoint.as_ref());
        let bad = match latest {
            Some(m) if m.checkpoint_id != f.checkpoint_id => Some(format!(
                "checkpoint {} is not the latest of task {}",
                f.checkpoint_id, f.task_id
            )),
            None => Some(format!("task {} has no checkpoint", f.task_id)),
            Some(_) if f.len == 0 || f.len > tether_proto::codec::MAX_FETCH_LEN => Some(format!(
                "a piece of {} bytes was asked for; a fetch asks for 1 to {}",
                f.len,
                tether_proto::codec::MAX_FETCH_LEN
            )),
            Some(m) if f.offset >= m.size => Some(format!(
                "offset {} is past the end of checkpoint {} ({} bytes)",
                f.offset, f.checkpoint_id, m.size
            )),
            Some(_) => None,
        };
        bad.map_or(Ok(()), |error| Err((ErrorCode::BadFrame, error)))
    }

    fn on_checkpoint_data(
        &mut self,
        worker: &WorkerId,
        session: &SessionRef,
        d: CheckpointData,
        b: &mut Batch,
    ) {
        let standing = self.standing(worker, &d.task_id, d.attempt);
        // Why a piece is not stored, said as the announcement's refusals are.
        let refuse = |b: &mut Batch, why: String| {
            b.send(
                session,
                CoordMsg::error(
                    ErrorCode::BadFrame,
                    why,
                    Some("checkpoint_data".into()),
                    Some(d.seq.0),
                ),
            );
            Disposition::Rejected
        };
        let disposition = match (standing, self.partial.get_mut(&d.checkpoint_id)) {
            // Only the lease holder completes a checkpoint: an ended attempt's pieces (a
            // worker back after its task moved on, replaying its outbox) must not make its
            // upload the task's latest over the new attempt's.
            (Standing::Stale, _) => Disposition::Stale,
            (Standing::Holder, Some(p))
                if &p.meta.worker == worker && p.meta.task_id == d.task_id =>
            {
                let len = d.data.0.len() as u64;
                let unfit = if d.chunk >= p.meta.chunks {
                    Some(format!(
                        "piece {} of checkpoint {}, announced in {} pieces",
                        d.chunk, d.checkpoint_id, p.meta.chunks
                    ))
                } else if d.attempt != p.meta.attempt {
                    Some(format!(
                        "piece of checkpoint {} from attempt {}, announced by attempt {}",
                        d.checkpoint_id, d.attempt, p.meta.attempt
                    ))
                } else if p.bytes + len > p.meta.size {
                    Some(format!(
                        "piece {} of checkpoint {} takes it to {} bytes, past the {} announced",
                        d.chunk,
                        d.checkpoint_id,
                        p.bytes + len,
                        p.meta.size
                    ))
                } else {
                    None
                };
                if let Some(why) = unfit {
                    refuse(b, format!("{why}; not stored"))
                } else if p.received.insert(d.chunk) {
                    p.bytes += len;
                    metrics::counter!(m::CHECKPOINT_BYTES).increment(len);
                    b.muts.push(Mutation::PutChunk {
                        checkpoint_id: d.checkpoint_id.clone(),
                        idx: d.chunk,
                        data: d.data.0,
                    });
                    if p.received.len() as u32 != p.meta.chunks {
                        Disposition::Recorded
                    } else if p.bytes == p.meta.size {
                        let meta = p.meta.clone();
                        self.partial.remove(&d.checkpoint_id);
                        self.complete_checkpoint(meta, b);
                        Disposition::Recorded
                    } else {
                        // Every piece came but not the declared size: never hand it to a
                        // resumed attempt.
                        let (got, want) = (p.bytes, p.meta.size);
                        self.partial.remove(&d.checkpoint_id);
                        b.muts
                            .push(Mutation::DeleteCheckpoint(d.checkpoint_id.clone()));
                        tracing::warn!(worker = %worker, task = %d.task_id, checkpoint = %d.checkpoint_id, got, want, "checkpoint pieces do not add up to its declared size; dropped");
                        refuse(
                            b,
                            format!(
                                "checkpoint {} has {got} bytes in its pieces, not the {want} declared; dropped",
                                d.checkpoint_id
                            ),
                        )
                    }
                } else {
                    self.counters
                        .checkpoint_messages_duplicate
                        .fetch_add(1, Ordering::Relaxed);
                    Disposition::Duplicate
                }
            }
            // Complete already (kept, or pruned and remembered): a replay.
            (Standing::Holder, None)
                if self.checkpoint_owner.get(&d.checkpoint_id) == Some(&d.task_id) =>
            {
                self.counters
                    .checkpoint_messages_duplicate
                    .fetch_add(1, Ordering::Relaxed);
                Disposition::Duplicate
            }
            // Its announcement was refused (or never came): the piece is not stored, and a
            // `duplicate` would say it was.
            (Standing::Holder, None) => refuse(
                b,
                format!(
                    "piece of checkpoint {}, which has no accepted announcement (refused, or never sent); not stored",
                    d.checkpoint_id
                ),
            ),
            // Another upload's id, or a stranger.
            (Standing::Holder | Standing::Stranger, _) => {
                self.reject(
                    worker,
                    session,
                    "checkpoint_data",
                    Some(d.seq),
                    &d.task_id,
                    b,
                );
                Disposition::Rejected
            }
        };
        let reason = self.ack_reason(disposition, &d.task_id, d.attempt);
        Core::send_ack(b, session, d.seq, disposition, || {
            ack(
                CoordMsg::CheckpointDataAck,
                d.seq,
                Some(d.task_id),
                Some(d.checkpoint_id),
                Some(d.chunk),
                disposition,
                reason,
            )
        });
    }

    fn complete_checkpoint(&mut self, meta: CheckpointMeta, b: &mut Batch) {
        b.muts.push(Mutation::PutCheckpoint {
            meta: meta.clone(),
            complete: true,
        });
        metrics::histogram!(m::CHECKPOINT_SIZE).record(meta.size as f64);
        let keep = self.cfg.checkpoints_kept.max(1);
        let Some(t) = self.tasks.get_mut(&meta.task_id) else {
            return;
        };
        tracing::debug!(task = %meta.task_id, checkpoint = %meta.checkpoint_id, size = meta.size, "checkpoint complete");
        t.latest_checkpoint = Some(Box::new(meta.clone()));
        t.updated_at = now();
        let task_id = meta.task_id.clone();
        self.save_task(&task_id, b);
        self.checkpoint_owner
            .insert(meta.checkpoint_id.clone(), task_id.clone());
        let hist = self.checkpoint_history.entry(task_id.clone()).or_default();
        hist.push_back(meta.checkpoint_id);
        // The oldest beyond `keep` lose their pieces; the lease remembers them (and their rows
        // stay) so that a replay of one is a duplicate, not the task's latest again.
        while hist.len() > keep {
            let Some(old) = hist.pop_front() else { break };
            b.muts.push(Mutation::SupersedeCheckpoint {
                checkpoint_id: old.clone(),
                attempt: meta.attempt,
            });
            let s = self
                .superseded
                .entry(task_id.clone())
                .or_insert_with(|| Superseded {
                    attempt: meta.attempt,
                    ids: VecDeque::new(),
                });
            s.attempt = meta.attempt;
            s.ids.push_back(old);
            while s.ids.len() > SUPERSEDED_REMEMBERED {
                let Some(forgotten) = s.ids.pop_front() else {
                    break;
                };
                self.checkpoint_owner.remove(&forgotten);
                b.muts.push(Mutation::DeleteCheckpoint(forgotten));
            }
        }
    }

    fn on_notice(
        &mut self,
        worker: &WorkerId,
        session: &SessionRef,
        n: TaskNotice,
        kind: NoticeKind,
        b: &mut Batch,
    ) {
        let NoticeKind {
            ack: kind,
            name,
            status,
        } = kind;
        let disposition = match self.standing(worker, &n.task_id, n.attempt) {
            Standing::Holder => {
                // A notice that contradicts the user's last pause or resume is a late one (a
                // `task_resumed` answering a resume that a pause has since followed, or one
                // replayed after a reconnect): the holder hears the desired state again, and
                // its next notice follows it.
                let wanted = |t: &crate::model::Task| {
                    let paused = t.lease.as_ref().map(|l| l.desired == Desired::Paused);
                    paused.is_none_or(|paused| paused == (status == Some(TaskStatus::Paused)))
                };
                if let (Some(status), Some(t)) = (status, self.tasks.get_mut(&n.task_id))
                    && !t.status.is_terminal()
                    && t.status != status
                    && wanted(t)
                {
                    t.status = status;
                    t.updated_at = now();
                    self.save_task(&n.task_id, b);
                }
                Disposition::Recorded
            }
            Standing::Stale => Disposition::Stale,
            Standing::Stranger => {
                self.reject(worker, session, name, Some(n.seq), &n.task_id, b);
                Disposition::Rejected
            }
        };
        let reason = self.ack_reason(disposition, &n.task_id, n.attempt);
        Core::send_ack(b, session, n.seq, disposition, || {
            ack(
                kind,
                n.seq,
                Some(n.task_id),
                None,
                None,
                disposition,
                reason,
            )
        });
    }

    fn on_telemetry(
        &mut self,
        worker: &WorkerId,
        session: &SessionRef,
        mut t: Telemetry,
        b: &mut Batch,
    ) {
        t.connection_stats.sanitize();
        if t.connection_stats.rtt_samples > 0 {
            metrics::histogram!(m::HEARTBEAT_RTT).record(t.connection_stats.rtt_p50_ms / 1e3);
        }
        // Saved (which announces it) at most every STATS_SAVE_EVERY, else announced at most
        // every STATS_ANNOUNCE_EVERY.
        let (save, announce) = self.workers.get_mut(worker).map_or((false, false), |w| {
            w.stats = Some(Box::new(crate::model::Reported {
                stats: t.connection_stats,
                reported_at: now(),
            }));
            let at = tokio::time::Instant::now();
            let due = |last: Option<tokio::time::Instant>, every| {
                last.is_none_or(|last| at.duration_since(last) >= every)
            };
            if due(w.stats_saved, STATS_SAVE_EVERY) {
                // A save announces the record too.
                w.stats_saved = Some(at);
                w.stats_announced = Some(at);
                (true, false)
            } else if due(w.stats_announced, STATS_ANNOUNCE_EVERY) {
                w.stats_announced = Some(at);
                (false, true)
            } else {
                (false, false)
            }
        });
        if save {
            self.save_worker(worker, b);
        } else if announce && let Some(w) = self.workers.get(worker) {
            self.announce(b, || Change::Worker(Box::new(self.view(w))));
        }
        Core::send_ack(b, session, t.seq, Disposition::Recorded, || {
            ack(
                CoordMsg::TelemetryAck,
                t.seq,
                None,
                None,
                None,
                Disposition::Recorded,
                None,
            )
        });
    }
}

/// The kind a replaced process's registration is logged under (`ratelimit::Refusals`).
pub(crate) const REPLACED_AGAIN: &str = "registered again after replaced";

/// Processes replaced by a newer one remembered a worker (`Worker::superseded`).
const SUPERSEDED_KEPT: usize = 4;

/// Why a registration cannot be taken on a worker's endpoint, whoever sent it.
pub(crate) struct Refusal {
    /// The close code: 4003 for another worker's id, 4002 for another protocol.
    pub code: u16,
    /// What kind of refusal: it is counted by it, and its log lines are limited per worker and
    /// kind (`ratelimit::Refusals`), as `reason` may hold what the attempt made up (an id).
    pub kind: m::Refused,
    pub reason: String,
    /// The `error` sent before the close, if any.
    pub error: Option<CoordMsg>,
}

/// Checks registration `r` arriving on `worker`'s endpoint: it names that worker and speaks
/// this protocol. The session checks it before the core hears of the connection (a refused
/// registration never displaces the worker's session); the core checks it again.
pub(crate) fn registration_refusal(worker: &WorkerId, r: &Registration) -> Option<Refusal> {
    if &r.worker_id != worker {
        return Some(Refusal {
            code: 4003,
            kind: m::Refused::OtherWorker,
            reason: format!(
                "registration names worker {} but this endpoint is for {}",
                r.worker_id, worker
            ),
            error: None,
        });
    }
    if r.protocol_version != PROTOCOL_VERSION {
        return Some(Refusal {
            code: 4002,
            kind: m::Refused::IncompatibleProtocol,
            reason: "incompatible protocol".into(),
            error: Some(CoordMsg::error(
                ErrorCode::IncompatibleProtocol,
                format!(
                    "coordinator speaks protocol {PROTOCOL_VERSION}, worker {}",
                    r.protocol_version
                ),
                Some("registration".into()),
                None,
            )),
        });
    }
    // What it says of itself is kept, shown and sent to every event stream: within bounds.
    // Each running task it lists is a directive in the ack: bounded, the ack is too.
    let problem = r.label_problem().or_else(|| {
        (r.inventory.running.len() > MAX_INVENTORY_RUNNING).then(|| {
            format!(
                "inventory lists {} running tasks, more than the {MAX_INVENTORY_RUNNING} a registration may",
                r.inventory.running.len()
            )
        })
    });
    if let Some(problem) = problem {
        return Some(Refusal {
            code: 4002,
            kind: m::Refused::OutOfBounds,
            reason: "registration out of bounds".into(),
            error: Some(CoordMsg::error(
                ErrorCode::BadFrame,
                problem,
                Some("registration".into()),
                None,
            )),
        });
    }
    // Every peer takes frames of this much (a frame limit below it could carry no task).
    let least = tether_proto::settings::MIN_FRAME as u64;
    if let Some(max) = r.max_frame.filter(|&m| m < least) {
        return Some(Refusal {
            code: 4002,
            kind: m::Refused::FrameLimit,
            reason: "frame limit too small".into(),
            error: Some(CoordMsg::error(
                ErrorCode::IncompatibleProtocol,
                format!(
                    "registration's max_frame of {max} bytes is under the {least} every peer takes"
                ),
                Some("registration".into()),
                None,
            )),
        });
    }
    // The ack goes in one frame, which the worker takes only within its `max_frame`: one
    // larger was refused by the worker as oversize, which ended the session, and the worker
    // registered again into the same ack for ever. Bounded by the directives' largest form, so
    // it holds whatever the core decides for each task.
    let largest = largest_ack(r);
    let max = r
        .max_frame
        .unwrap_or(tether_proto::codec::DEFAULT_MAX_FRAME as u64);
    if max < largest as u64 {
        return Some(Refusal {
            code: 4002,
            kind: m::Refused::OutOfBounds,
            reason: "registration out of bounds".into(),
            error: Some(CoordMsg::error(
                ErrorCode::BadFrame,
                format!(
                    "the registration_ack to an inventory of {} running tasks may take {largest} bytes, more than the registration's max_frame of {max} bytes; register with a larger max_frame, or once fewer tasks run",
                    r.inventory.running.len()
                ),
                Some("registration".into()),
                None,
            )),
        });
    }
    None
}
