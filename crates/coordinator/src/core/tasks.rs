//! Dispatch, leases, requeue and the sweeper.
//!
//! Dispatch is pull-style: a worker gets only what it can start now (free slots), tasks in order
//! of priority then submission, one per worker per round so work spreads. It runs after any
//! event that may change the answer (submission, completion, registration, lost worker).

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tether_proto::msg::{CheckpointBlob, CoordMsg, TaskAssignment, TaskControl, now};
use tether_proto::task::Blob;
use tether_proto::{Attempt, Seq, TaskId, TaskStatus, WorkerId};

use super::{Core, Outgoing, SessionRef, queue};
use crate::metrics as m;
use crate::model::{AttemptRecord, CheckpointMeta, Desired, Lease, WorkerState};
use crate::store::{self, Batch, Mutation};

/// The largest checkpoint handed over in its assignment; a larger one the worker fetches in
/// pieces (`checkpoint_fetch`). The size of a worker's upload pieces: no frame of a resumed
/// task's hand-over is larger than a frame of its upload.
pub const INLINE_CHECKPOINT_BYTES: u64 = tether_proto::codec::CHECKPOINT_PIECE as u64;

/// The free-worker index is checked against the model on the first sweep and every this many
/// after it (a minute at the default sweep interval): a backstop, walking every worker.
pub(super) const FREE_INDEX_CHECK_EVERY: u64 = 60;
/// How often, while a worker is connected, the sweep writes that the coordinator is alive
/// (`Mutation::AliveAt`): after a crash, the workers it had connected show as last seen at most
/// this long before it died.
pub(super) const ALIVE_EVERY: Duration = Duration::from_secs(5);

/// The ids of tasks removed by retention, each with its last attempt, so that a task submitted
/// later under one of them numbers its attempts after it ([`crate::model::Task::attempt_base`]):
/// a worker may still hold an attempt of the removed task (a result in its outbox, an attempt it
/// remembers finishing and so ignores if assigned again), and the same `(task, attempt)` would
/// make it run nothing, or count its old result for the new task.
///
/// An entry is a hash of the id and its removal time, no copy of the id (the store keeps the
/// ids, in `removed_tasks`): two ids of one hash only make the later task's attempts start
/// higher than they had to. About 56 bytes an id, in the map and in the removal order.
///
/// An id removed longer than the retention ago is forgotten ([`Removed::forget_before`]), or
/// the entries would grow with every task ever removed (at 20,000 tasks a second, over a
/// gigabyte an hour); kept for a retention, they are a small part of what the retention keeps. By then no worker holds an attempt of it: the task had finished a retention before
/// its removal, and a worker that held an attempt and has not been back since (to send what
/// its outbox held, acknowledged `duplicate` or `stale`) was lost and unseen for longer than
/// the retention, and so is forgotten too: if it comes back, it registers as new.
#[derive(Default)]
pub(super) struct Removed {
    hasher: foldhash::quality::RandomState,
    /// The last attempt of each id's tasks removed, and the latest removal of it.
    last: std::collections::HashMap<u64, (Attempt, DateTime<Utc>), foldhash::quality::RandomState>,
    /// Removals in time order; one whose time no longer matches its id's entry was followed by
    /// a later removal of the id (or of another id of its hash).
    order: std::collections::VecDeque<(DateTime<Utc>, u64)>,
}

impl Removed {
    fn key(&self, id: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, id)
    }

    /// Remembers that a task of `id` was removed `at` after `last` attempts (`at` no earlier
    /// than the removals noted before).
    pub(super) fn note(&mut self, id: &str, last: Attempt, at: DateTime<Utc>) {
        let key = self.key(id);
        let kept = self.last.entry(key).or_insert((last, at));
        *kept = (kept.0.max(last), kept.1.max(at));
        self.order.push_back((at, key));
    }

    /// The last attempt of tasks of `id` removed so far (0 when none was).
    pub(super) fn last_attempt(&self, id: &str) -> Attempt {
        if self.last.is_empty() {
            return Attempt::default();
        }
        self.last
            .get(&self.key(id))
            .map(|e| e.0)
            .unwrap_or_default()
    }

    /// Forgets the ids removed before `cutoff`, last removed then; how many.
    pub(super) fn forget_before(&mut self, cutoff: DateTime<Utc>) -> usize {
        let mut forgot = 0;
        while let Some(&(at, key)) = self.order.front()
            && at < cutoff
        {
            self.order.pop_front();
            if self.last.get(&key).is_some_and(|e| e.1 == at) {
                self.last.remove(&key);
                forgot += 1;
            }
        }
        if forgot > 0 && self.last.capacity() > 4 * self.last.len().max(64) {
            self.last.shrink_to_fit();
            self.order.shrink_to_fit();
        }
        forgot
    }
}

impl Core {
    /// Leases queued tasks to workers with free slots, by the plan of [`queue::plan`]: only
    /// workers that may have a free slot are visited, and each decision looks at the head of
    /// each requirement group instead of scanning the queue.
    pub(super) fn dispatch(&mut self, b: &mut Batch) {
        if self.queue.is_empty() || self.free.is_empty() {
            return;
        }
        let after = self.last_leased_to.take();
        let plan = queue::plan(
            &mut self.queue,
            &mut self.free,
            &self.workers,
            after.as_ref(),
        );
        self.last_leased_to = plan.last().map(|(_, w)| w.clone()).or(after);
        for ((_, _, task), worker) in plan {
            self.lease(&task, &worker, b);
        }
    }

    fn lease(&mut self, task_id: &TaskId, worker: &WorkerId, b: &mut Batch) {
        let Some(t) = self.tasks.get_mut(task_id) else {
            return;
        };
        let ts = now();
        // A queued task's updated_at is when it entered the queue (submission or requeue); only
        // a checkpoint completed after its lease ended moves it, shortening that one sample.
        metrics::histogram!(m::DISPATCH_LATENCY).record(m::secs_between(t.updated_at, ts));
        let attempt = t.attempt.next();
        t.attempt = attempt;
        t.status = TaskStatus::Running;
        t.updated_at = ts;
        t.lease = Some(Lease {
            worker: worker.clone(),
            attempt,
            since: ts,
            desired: Desired::Running,
        });
        t.lease_started = Some(tokio::time::Instant::now());
        if t.spec.timeout_ms.is_some() {
            self.timed_leases.insert(task_id.clone());
        }
        t.attempts.push(AttemptRecord {
            attempt,
            worker: worker.clone(),
            started_at: ts,
            ended_at: None,
            end: None,
            result_recorded: false,
            checkpoint_refused: None,
            checkpoint_error: None,
            checkpoint_error_at: None,
        });
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        w.leases.insert(task_id.clone());
        let session = w.session.clone();
        self.counters.assignments.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::ASSIGNMENTS).increment(1);
        tracing::debug!(task = %task_id, worker = %worker, attempt = %attempt, "leased");
        self.save_task(task_id, b);
        if let Some(s) = session {
            self.assign(task_id, &s, b);
        }
    }

    /// Sends the assignment of the task's current lease to `session`. An assignment over the
    /// worker's frame limit would end its session, and every registration after would send it
    /// again; so a task whose config this worker's frames cannot carry (dispatch passes such
    /// workers over; this one registered again with a smaller limit) goes back to the queue for
    /// another, and one the coordinator's own frames cannot carry (a limit lowered since it was
    /// submitted) fails.
    pub(super) fn assign(&mut self, task_id: &TaskId, session: &SessionRef, b: &mut Batch) {
        let Some(t) = self.tasks.get(task_id) else {
            return;
        };
        let limit = self.cfg.max_frame.min(session.max_frame);
        let config = t.spec.config.get().len();
        if tether_proto::codec::fits(config, limit) {
            return self.send_assignment(task_id, session, b);
        }
        let why = format!(
            "its config of {config} bytes does not fit in an assignment to worker {}, whose \
             frames carry at most {limit} bytes ({} of them for the message around it)",
            t.lease.as_ref().map_or("?", |l| l.worker.as_str()),
            tether_proto::codec::ENVELOPE_BYTES
        );
        if tether_proto::codec::fits(config, self.cfg.max_frame) {
            tracing::warn!(task = %task_id, "task requeued: {why}");
            return self.release_and_requeue(task_id, &why, b);
        }
        tracing::error!(task = %task_id, "task failed: {why}");
        self.finish_by_coordinator(task_id, TaskStatus::Failed, &why, b);
    }

    /// Sends the assignment of the task's current lease, with its latest checkpoint read from
    /// the store after the commit.
    pub(super) fn send_assignment(&self, task_id: &TaskId, session: &SessionRef, b: &mut Batch) {
        // The map's own copy of the id: the session remembers it and hands it back with what
        // the worker sends about the task (`ws::KnownIds`).
        let Some((task_id, t)) = self.tasks.get_key_value(task_id) else {
            return;
        };
        let Some(lease) = &t.lease else { return };
        let mut msg = TaskAssignment {
            task_id: task_id.clone(),
            attempt: lease.attempt,
            kind: t.spec.kind.clone(),
            config: t.spec.config.clone(),
            timeout_ms: t.spec.timeout_ms,
            checkpoint: None,
            // Given only when it says something: a worker may keep a checkpoint of a removed
            // task of this id, and must not resume this one from it.
            attempt_base: (!t.attempt_base.is_zero()).then_some(t.attempt_base),
            // Which submission this is, for a worker to tell its checkpoints from those of
            // a removed task of this id, once this coordinator forgot the removal too.
            submit_seq: Some(t.submit_seq),
            timestamp: now(),
        };
        let checkpoint = t.latest_checkpoint.clone();
        let pause = (lease.desired == Desired::Paused).then(|| {
            CoordMsg::PauseTask(TaskControl {
                task_id: msg.task_id.clone(),
                attempt: msg.attempt,
                reason: String::new(),
                timestamp: now(),
            })
        });
        // A small checkpoint travels in the assignment, read once its batch is committed, on
        // the writer's connection. A larger one (or one that would not fit in a frame both ends
        // take) is named with its size, and the worker fetches it in pieces (`checkpoint_fetch`):
        // a frame of many megabytes would hold up the session's heartbeats behind it. A worker
        // that does not fetch gets what fits inline and nothing else: a bigger one would end
        // its session at every resend of the assignment.
        let limit = self.cfg.max_frame.min(session.max_frame);
        let fits = |meta: &CheckpointMeta| fits_in_assignment(&msg, meta.size as usize, limit);
        let meta = match checkpoint {
            Some(meta)
                if fits(&meta)
                    && (meta.size <= INLINE_CHECKPOINT_BYTES || !session.checkpoint_fetch) =>
            {
                meta
            }
            other => {
                match other {
                    Some(meta) if session.checkpoint_fetch => {
                        tracing::debug!(task = %msg.task_id, checkpoint = %meta.checkpoint_id, bytes = meta.size, "the checkpoint goes by fetch");
                        msg.checkpoint = Some(CheckpointBlob {
                            checkpoint_id: meta.checkpoint_id,
                            attempt: meta.attempt,
                            data: None,
                            size: Some(meta.size),
                        });
                    }
                    Some(meta) => {
                        tracing::error!(task = %msg.task_id, checkpoint = %meta.checkpoint_id, bytes = meta.size, limit, "the checkpoint does not fit in an assignment to this worker, which does not fetch checkpoints; the task starts afresh");
                    }
                    None => {}
                }
                b.send(session, CoordMsg::TaskAssignment(msg));
                if let Some(pause) = pause {
                    b.send(session, pause);
                }
                return;
            }
        };
        let s = session.clone();
        b.effect(move |conn| {
            let whole = store::read_checkpoint_range(
                conn,
                &meta.task_id,
                &meta.checkpoint_id,
                0,
                u64::MAX,
            );
            match whole {
                Ok(Some(data)) => {
                    msg.checkpoint = Some(CheckpointBlob {
                        checkpoint_id: meta.checkpoint_id,
                        attempt: meta.attempt,
                        data: Some(Blob(data)),
                        size: None,
                    })
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "reading a checkpoint for an assignment failed; the task starts afresh")
                }
            }
            let msgs = [CoordMsg::TaskAssignment(msg)].into_iter().chain(pause);
            s.send_all(msgs.map(|m| Outgoing::Msg(Box::new(m))));
        });
    }

    /// Ends the current lease and queues the task again, or fails it when its attempts are
    /// used up.
    pub(super) fn release_and_requeue(&mut self, task_id: &TaskId, why: &str, b: &mut Batch) {
        self.release_and_requeue_as(task_id, why, LOST, b);
    }

    /// [`Self::release_and_requeue`], the attempt's end recorded as `end`.
    pub(super) fn release_and_requeue_as(
        &mut self,
        task_id: &TaskId,
        why: &str,
        end: &str,
        b: &mut Batch,
    ) {
        let Some(t) = self.tasks.get_mut(task_id) else {
            return;
        };
        let ts = now();
        // A task paused by request stays paused when it moves: it waits, out of the queue,
        // for a resume (a pause may free a shared resource; its next attempt must not take it).
        // The user's last word is the lease's desired state; the status follows the holder's
        // notices, and one late notice could say otherwise.
        let paused = match &t.lease {
            Some(lease) => lease.desired == Desired::Paused,
            None => t.status == TaskStatus::Paused,
        };
        self.end_lease(task_id, end, ts);
        let Some(t) = self.tasks.get_mut(task_id) else {
            return;
        };
        t.lease_started = None;
        t.updated_at = ts;
        let exhausted = t.attempts_started() >= t.max_attempts();
        self.drop_partials(task_id, None, b);
        let Some(t) = self.tasks.get_mut(task_id) else {
            return;
        };
        if exhausted {
            t.status = TaskStatus::Failed;
            metrics::counter!(m::TASKS_FINISHED, "status" => t.status.as_str()).increment(1);
            t.finished_at = Some(ts);
            t.error = Some(format!(
                "{why}; no attempts left ({} of {})",
                t.attempts_started(),
                t.max_attempts()
            ));
            tracing::warn!(task = %task_id, attempts = t.attempts_started(), "task failed: attempts exhausted");
        } else if paused {
            self.counters.requeued.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::REQUEUED).increment(1);
            tracing::info!(task = %task_id, next_attempt = t.attempt.0 + 1, resume = t.latest_checkpoint.is_some(), %why, "paused task released; it waits for a resume");
        } else {
            t.status = TaskStatus::Queued;
            self.queue
                .insert(&t.spec, (t.spec.priority, t.submit_seq, task_id.clone()));
            self.counters.requeued.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::REQUEUED).increment(1);
            tracing::info!(task = %task_id, next_attempt = t.attempt.0 + 1, resume = t.latest_checkpoint.is_some(), %why, "task requeued");
        }
        self.dispatch_needed = true;
        self.save_task(task_id, b);
    }

    /// Whether any worker has a registered session.
    pub(super) fn any_connected(&self) -> bool {
        self.workers
            .values()
            .any(|w| w.state == WorkerState::Connected)
    }

    /// Periodic: workers gone past the grace period lose their leases; leased tasks far past
    /// their timeout are timed out (the worker enforces timeouts; this is the backstop). Its
    /// cost is the workers that went and the tasks leased with a timeout, not the fleet: a
    /// walk of 10,000 idle workers every second was 3.5 % of an idle coordinator's samples.
    pub(super) fn sweep(&mut self, b: &mut Batch) {
        self.sweeps += 1;
        if self
            .alive_saved
            .is_none_or(|at| at.elapsed() >= ALIVE_EVERY)
            && self.any_connected()
        {
            // After a crash, when the workers connected then were last known to be there.
            b.muts.push(Mutation::AliveAt(now()));
            self.alive_saved = Some(tokio::time::Instant::now());
        }
        if self.sweeps % FREE_INDEX_CHECK_EVERY == 1 {
            self.check_free_index();
        }
        self.end_rests(b);
        self.release_overdue_held(b);
        let grace = self.cfg.lost_after;
        let mut lost = Vec::new();
        while let Some((at, _)) = self.disconnects.front() {
            if at.elapsed() < grace {
                break;
            }
            let Some((at, wid)) = self.disconnects.pop_front() else {
                break;
            };
            // A connection whose registration is refused leaves the worker as it was: the
            // grace period runs from the last registered session's end.
            let gone = self.workers.get(&wid).is_some_and(|w| {
                w.state == WorkerState::Disconnected && w.disconnected_mono == Some(at)
            });
            if gone {
                lost.push(wid);
            }
        }
        for wid in lost {
            let leases: Vec<TaskId> = self
                .workers
                .get(&wid)
                .map(|w| w.leases.iter().cloned().collect())
                .unwrap_or_default();
            tracing::warn!(worker = %wid, leases = leases.len(), grace_ms = grace.as_millis() as u64, "worker lost");
            self.counters.workers_lost.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::WORKERS_LOST).increment(1);
            for task in leases {
                self.release_and_requeue(&task, "worker lost", b);
            }
            if let Some(w) = self.workers.get_mut(&wid) {
                w.state = WorkerState::Lost;
            }
            self.save_worker(&wid, b);
        }
        let tasks = &self.tasks;
        let mut overdue = Vec::new();
        self.timed_leases.retain(|id| {
            let Some(t) = tasks.get(id) else {
                return false;
            };
            let (Some(ms), Some(started), Some(_)) = (t.spec.timeout_ms, t.lease_started, &t.lease)
            else {
                return false;
            };
            if started.elapsed() >= Duration::from_millis(ms) + grace {
                overdue.push(id.clone());
            }
            true
        });
        for task in overdue {
            self.finish_by_coordinator(
                &task,
                TaskStatus::TimedOut,
                "no result long after the task's timeout",
                b,
            );
        }
        if let Some(retention) = self.cfg.retention {
            let age = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
            if let Some(cutoff) = now().checked_sub_signed(age) {
                self.expire_finished_before(cutoff, b);
                self.expire_workers_lost_before(cutoff, b);
                if self.removed.forget_before(cutoff) > 0 {
                    b.muts.push(Mutation::ForgetRemoved { before: cutoff });
                }
            }
        }
    }

    /// Ends the rests of workers rested after a fault of their own whose time is up: they
    /// take tasks again.
    fn end_rests(&mut self, b: &mut Batch) {
        if self.resting.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let workers = &mut self.workers;
        let mut ended = Vec::new();
        self.resting.retain(|id| {
            let Some(w) = workers.get_mut(id) else {
                return false;
            };
            match &w.resting {
                Some(rest) if rest.ends > now => true,
                Some(_) => {
                    w.resting = None;
                    ended.push(id.clone());
                    false
                }
                // Cleared by a new process of the worker.
                None => false,
            }
        });
        for id in ended {
            tracing::info!(worker = %id, "the worker's rest after a fault of its own ended; it takes tasks again");
            self.free.insert(id.clone());
            self.dispatch_needed = true;
            self.save_worker(&id, b);
        }
    }

    /// Backstop of the free-worker index: every path that frees a slot puts the worker back,
    /// and once in a while the index is checked against the model anyway.
    fn check_free_index(&mut self) {
        let free = &mut self.free;
        for w in self.workers.values() {
            if w.free_slots() > 0 && !free.contains(&w.worker_id) {
                tracing::debug!(worker = %w.worker_id, "free-worker index caught up");
                free.insert(w.worker_id.clone());
                self.dispatch_needed = true;
            }
        }
    }

    /// Removes finished tasks that finished before `cutoff`, with their results, state and
    /// checkpoints. Walks the finished-time index, so the cost is the number removed.
    pub(super) fn expire_finished_before(&mut self, cutoff: DateTime<Utc>, b: &mut Batch) {
        let mut removed = 0u64;
        while let Some((at, id)) = self.finished.first().cloned() {
            if at >= cutoff {
                break;
            }
            self.finished.pop_first();
            // A task finishes once, but a record may be superseded (e.g. a stale index entry
            // after a re-save with a new time): only remove what is still finished at `at`.
            let finished_then = self
                .tasks
                .get(&id)
                .is_some_and(|t| t.status.is_terminal() && t.finished_at == Some(at));
            if !finished_then {
                continue;
            }
            if let Some(t) = self.tasks.remove(&id) {
                self.listing.remove(&t);
                let at = now();
                self.removed.note(id.as_str(), t.attempt, at);
                b.muts.push(Mutation::DeleteTask {
                    id: id.clone(),
                    last_attempt: t.attempt,
                    at,
                });
            }
            for kept in self.checkpoint_history.remove(&id).into_iter().flatten() {
                self.checkpoint_owner.remove(&kept);
            }
            for gone in self.superseded.remove(&id).into_iter().flat_map(|s| s.ids) {
                self.checkpoint_owner.remove(&gone);
            }
            // Its rows go with the task's (`DeleteTask`).
            self.partial.remove_ended(&id, None);
            let gone = id.clone();
            self.announce(b, || super::Change::TaskRemoved(gone));
            removed += 1;
        }
        if removed > 0 {
            // The newest removed may have held the highest number: keep the next one.
            b.muts.push(Mutation::NextSubmitSeq(self.next_submit_seq));
            self.counters
                .tasks_expired
                .fetch_add(removed, Ordering::Relaxed);
            metrics::counter!(m::TASKS_EXPIRED).increment(removed);
            tracing::info!(removed, %cutoff, "finished tasks past retention removed");
        }
    }

    /// Forgets workers that are lost, hold nothing, and were last seen before `cutoff`: the
    /// record of a machine gone for good does not stay in the list (and the store) forever. A
    /// worker that comes back later registers as new.
    pub(super) fn expire_workers_lost_before(&mut self, cutoff: DateTime<Utc>, b: &mut Batch) {
        let gone: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| {
                matches!(w.state, WorkerState::Lost | WorkerState::Stopped)
                    && w.session.is_none()
                    && w.leases.is_empty()
                    && w.last_seen < cutoff
            })
            .map(|w| w.worker_id.clone())
            .collect();
        if gone.is_empty() {
            return;
        }
        for id in &gone {
            self.workers.remove(id);
            self.free.remove(id);
            self.announce(b, || super::Change::WorkerRemoved(id.clone()));
            b.muts.push(Mutation::DeleteWorker(id.clone()));
        }
        self.counters
            .workers_expired
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        tracing::info!(removed = gone.len(), %cutoff, "lost workers past retention forgotten");
    }

    /// Ends a task in a terminal state decided here (cancel, timeout backstop) and tells the
    /// lease holder to stop.
    pub(super) fn finish_by_coordinator(
        &mut self,
        task_id: &TaskId,
        status: TaskStatus,
        why: &str,
        b: &mut Batch,
    ) {
        let Some(t) = self.tasks.get_mut(task_id) else {
            return;
        };
        let ts = now();
        self.queue
            .remove(&t.spec, &(t.spec.priority, t.submit_seq, task_id.clone()));
        t.status = status;
        metrics::counter!(m::TASKS_FINISHED, "status" => status.as_str()).increment(1);
        t.finished_at = Some(ts);
        t.updated_at = ts;
        t.error = Some(why.to_owned());
        t.lease_started = None;
        self.stop_lease(task_id, status.as_str(), why, ts, b);
        self.drop_partials(task_id, None, b);
        self.dispatch_needed = true;
        self.save_task(task_id, b);
    }

    /// Ends the task's lease, if it has one, as `end`, frees its worker and tells it to stop
    /// the attempt (`cancel_task` saying `why`; a worker away learns it when it registers
    /// again: its attempt is not the lease's). Returns the lease it ended.
    fn stop_lease(
        &mut self,
        task_id: &TaskId,
        end: &str,
        why: &str,
        ts: DateTime<Utc>,
        b: &mut Batch,
    ) -> Option<Lease> {
        let lease = self.end_lease(task_id, end, ts)?;
        if let Some(s) = self
            .workers
            .get(&lease.worker)
            .and_then(|w| w.session.as_ref())
        {
            b.send(
                s,
                CoordMsg::CancelTask(TaskControl {
                    task_id: task_id.clone(),
                    attempt: lease.attempt,
                    reason: why.to_owned(),
                    timestamp: ts,
                }),
            );
        }
        Some(lease)
    }

    /// Takes the task's lease, if any: its attempt ends as `end` at `ts` (unless it ended
    /// before), and its worker's slot frees. Returns the lease. What comes of the task is the
    /// caller's ([`Self::release_and_requeue_as`], [`Self::stop_lease`]).
    fn end_lease(&mut self, task_id: &TaskId, end: &str, ts: DateTime<Utc>) -> Option<Lease> {
        let t = self.tasks.get_mut(task_id)?;
        let lease = t.lease.take()?;
        if let Some(a) = t.attempts.iter_mut().find(|a| a.attempt == lease.attempt) {
            a.ended_at.get_or_insert(ts);
            a.end.get_or_insert_with(|| end.to_owned());
        }
        if let Some(w) = self.workers.get_mut(&lease.worker) {
            w.leases.remove(task_id);
            self.free.insert(lease.worker.clone());
        }
        Some(lease)
    }

    /// Gives the lease of a queued task back to `worker` at `attempt`: an attempt whose lease
    /// was lost with the worker (away past `lost_after`) but which the worker finished, as its
    /// registration says (`inventory.finished`: the result follows in its outbox replay). No
    /// other attempt has started (the task waits in the queue, its attempt number unchanged),
    /// so the finished work is counted when it comes, as the holder's, instead of run again;
    /// its checkpoints replayed before it are the holder's too. If the result never comes, the
    /// lease is lost again as any other. Returns whether the lease was given back.
    pub(super) fn restore_lease(
        &mut self,
        task_id: &TaskId,
        worker: &WorkerId,
        attempt: Attempt,
        b: &mut Batch,
    ) -> bool {
        let Some(t) = self.tasks.get_mut(task_id) else {
            return false;
        };
        let lost = |a: &AttemptRecord| {
            a.attempt == attempt && &a.worker == worker && a.end.as_deref() == Some(LOST)
        };
        if t.status != TaskStatus::Queued || t.lease.is_some() || t.attempt != attempt {
            return false;
        }
        let Some(a) = t.attempts.iter_mut().rev().find(|a| lost(a)) else {
            return false;
        };
        if !self
            .queue
            .remove(&t.spec, &(t.spec.priority, t.submit_seq, task_id.clone()))
        {
            return false;
        }
        a.ended_at = None;
        a.end = None;
        let since = a.started_at;
        t.status = TaskStatus::Running;
        t.updated_at = now();
        t.lease = Some(Lease {
            worker: worker.clone(),
            attempt,
            since,
            desired: Desired::Running,
        });
        t.lease_started = Some(tokio::time::Instant::now());
        if t.spec.timeout_ms.is_some() {
            self.timed_leases.insert(task_id.clone());
        }
        if let Some(w) = self.workers.get_mut(worker) {
            w.leases.insert(task_id.clone());
        }
        self.counters
            .leases_restored
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::LEASES_RESTORED).increment(1);
        tracing::info!(task = %task_id, worker = %worker, %attempt, "the worker whose lease was lost came back with the attempt finished: lease given back, the task is not run again");
        self.save_task(task_id, b);
        true
    }

    /// Ends the lease of the attempt that replaced `attempt`, lost earlier, whose finished
    /// result just came and is counted (first finished, first counted): the queued task
    /// leaves the queue, a running replacement is ended `superseded` and its worker told to
    /// stop it (one away learns it when it registers again: its attempt is not the lease's).
    pub(super) fn supersede_for(&mut self, task_id: &TaskId, attempt: Attempt, b: &mut Batch) {
        let Some(t) = self.tasks.get_mut(task_id) else {
            return;
        };
        let ts = now();
        self.queue
            .remove(&t.spec, &(t.spec.priority, t.submit_seq, task_id.clone()));
        t.lease_started = None;
        let why = format!(
            "attempt {attempt}, whose lease was lost, finished first: its result is counted"
        );
        let Some(lease) = self.stop_lease(task_id, SUPERSEDED, &why, ts, b) else {
            return;
        };
        tracing::info!(task = %task_id, attempt = %lease.attempt, worker = %lease.worker, %why, "attempt superseded");
        self.drop_partials(task_id, None, b);
        self.dispatch_needed = true;
    }
}

/// How an attempt whose lease ended with its worker's loss (or its process's) ends.
pub(super) const LOST: &str = "lost";

/// How an attempt ends that a late-counted earlier attempt replaced ([`Core::supersede_for`]).
pub(super) const SUPERSEDED: &str = "superseded";

impl Core {
    /// Cuts the error text of a task as the store loaded it, as a recorded result's is cut
    /// (`messages::kept_error`: at most `TASK_ERROR_BYTES`, marker included): a task stored
    /// before that cut, or imported, may hold one as long as a frame, which every save, event
    /// and listing would copy. Its stored result keeps the whole text.
    pub(crate) fn cut_loaded_error(task: &mut crate::model::Task) {
        if let Some(error) = &mut task.error
            && error.len() > super::messages::TASK_ERROR_BYTES
        {
            *error = super::messages::kept_error(error);
        }
    }
}

/// Whether `msg` with a checkpoint of `bytes` (base64 in its JSON: 4 characters for 3 bytes)
/// fits in a frame of `limit`.
fn fits_in_assignment(msg: &TaskAssignment, bytes: usize, limit: usize) -> bool {
    let config = tether_proto::codec::json_len(&msg.config);
    tether_proto::codec::fits(config + tether_proto::codec::base64_len(bytes), limit)
}

/// Tasks that died with a worker's previous process, held on their leases until the new
/// process's replay of what the old one sent is through (`Inventory::replay_through`): a
/// checkpoint of theirs that no coordinator acknowledged comes in it, and their next attempt
/// resumes from it instead of from the start. Requeued once a message at or past that
/// sequence number came and no upload of theirs is unfinished; at the session's end; at the
/// worker's next registration; or at the deadline (the heartbeat timeout), so that a replay
/// that never comes through does not hold them.
#[derive(Debug)]
pub(super) struct HeldDead {
    through: Seq,
    /// A message at or past `through` came.
    seen: bool,
    until: tokio::time::Instant,
    tasks: Vec<(TaskId, Attempt)>,
}

impl Core {
    /// Holds `tasks`, dead with `worker`'s previous process, until its replay reaches `through`
    /// ([`HeldDead`]).
    pub(super) fn hold_dead(
        &mut self,
        worker: &WorkerId,
        through: Seq,
        tasks: Vec<(TaskId, Attempt)>,
    ) {
        if tasks.is_empty() {
            return;
        }
        let until = tokio::time::Instant::now() + self.cfg.heartbeat_timeout;
        self.held_dead.insert(
            worker.clone(),
            HeldDead {
                through,
                seen: false,
                until,
                tasks,
            },
        );
    }

    /// After a frame of `worker` whose highest sequence number is `top`: its held tasks are
    /// requeued once the replay is through and their uploads are finished.
    pub(super) fn replay_seen(&mut self, worker: &WorkerId, top: Option<Seq>, b: &mut Batch) {
        let Some(h) = self.held_dead.get_mut(worker) else {
            return;
        };
        h.seen |= top.is_some_and(|t| t >= h.through);
        let uploading = h
            .tasks
            .iter()
            .any(|(task, attempt)| self.partial.unfinished(task, *attempt));
        if h.seen && !uploading {
            self.release_held(worker, "its replay is through", b);
        }
    }

    /// Requeues the tasks held for `worker` ([`HeldDead`]) that are still its leases, in the
    /// attempts that died (a cancel meanwhile ended one otherwise).
    pub(super) fn release_held(&mut self, worker: &WorkerId, when: &str, b: &mut Batch) {
        let Some(h) = self.held_dead.remove(worker) else {
            return;
        };
        for (task, attempt) in h.tasks {
            let held = self
                .tasks
                .get(&task)
                .and_then(|t| t.lease.as_ref())
                .is_some_and(|l| l.worker == *worker && l.attempt == attempt);
            if held {
                tracing::info!(worker = %worker, task = %task, attempt = %attempt, when, "task died with the worker's previous process; requeued");
                self.release_and_requeue(&task, "died with the worker process", b);
            }
        }
    }

    /// The sweep's part: the held tasks whose replay did not come through in time.
    fn release_overdue_held(&mut self, b: &mut Batch) {
        if self.held_dead.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let due: Vec<WorkerId> = self
            .held_dead
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(w, _)| w.clone())
            .collect();
        for worker in due {
            self.release_held(&worker, "its replay did not come through in time", b);
        }
    }
}
