//! Commands behind the HTTP API. Replies are effects, so a client sees only committed state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tether_proto::msg::{CheckpointRequest, CoordMsg, TaskControl, now};
use tether_proto::{CheckpointId, TaskId, TaskSpec, TaskStatus, WorkerId};
use tokio::sync::oneshot;

use super::Core;
use crate::model::{Desired, Task, Worker};
use crate::store::{self, Batch, Mutation, ResultRow};

/// Why an API command failed; the HTTP layer maps each to a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// More tasks in one submission than `max_submit_batch`: refused whole, the same tasks
    /// may go in smaller parts.
    #[error("{0}")]
    TooMany(String),
    #[error("{0}")]
    Internal(String),
    /// The coordinator is stopping (or its core has gone): nothing was done, and the same
    /// request is safe to send again, to this coordinator once restarted or to another.
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// The store's commits wait for space in the data directory: the request was not asked
    /// of the core (or, a read, was given up), and may be sent again once there is room.
    #[error(
        "the coordinator's data directory is out of space: its answers wait for the commits ahead of them, which wait for room (see the coordinator's log); try again later"
    )]
    OutOfSpace,
}

type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// A control command on a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOp {
    Cancel,
    Pause,
    Resume,
    Checkpoint,
}

/// Fleet-wide figures.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Overview {
    pub tasks: BTreeMap<&'static str, u64>,
    pub queued: usize,
    /// Known workers by state.
    pub workers: BTreeMap<&'static str, u64>,
    pub workers_connected: usize,
    pub workers_known: usize,
    /// Known workers an operator drained (`tether drain`), whatever their state.
    pub workers_draining: usize,
    /// Mean of the connected workers' reported median heartbeat RTT, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_p50_ms_mean: Option<f64>,
    pub counters: BTreeMap<&'static str, u64>,
}

/// Which tasks a listing returns, and in what order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskQuery {
    pub status: Option<TaskStatus>,
    pub limit: usize,
    /// The newest `limit` tasks, newest first, instead of the oldest, oldest first.
    pub newest_first: bool,
    /// Only tasks changed at or after this time (their `updated_at`).
    pub updated_since: Option<DateTime<Utc>>,
    /// Keyset pagination: only tasks after the one with this `submit_seq` in the order asked
    /// (submitted after it, or before it when newest first). A page's last `submit_seq` asks
    /// for the next page; it stays valid when that task is gone (retention) and pages neither
    /// skip nor repeat a task as new ones arrive.
    pub after_seq: Option<u64>,
    /// Only the tasks with these ids (an id no task has is simply absent from the answer): the
    /// listing looks each up, not a pass over the table.
    pub ids: Option<BTreeSet<TaskId>>,
    /// Only the tasks submitted under this name (their spec's `name`, exactly).
    pub name: Option<String>,
}

impl TaskQuery {
    pub(super) fn admits(&self, t: &Task) -> bool {
        self.ids.as_ref().is_none_or(|ids| ids.contains(&t.task_id))
            && self.status.is_none_or(|s| t.status == s)
            && self
                .name
                .as_deref()
                .is_none_or(|n| t.spec.name.as_deref() == Some(n))
            && self.updated_since.is_none_or(|since| t.updated_at >= since)
            && self.after_seq.is_none_or(|a| match self.newest_first {
                false => t.submit_seq > a,
                true => t.submit_seq < a,
            })
    }
}

/// What a submission did: the id of each task asked for, in the order given, and which of
/// them were there already with the same spec (sent again, as after a lost reply): nothing
/// was made of those.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Submission {
    pub task_ids: Vec<TaskId>,
    /// Those of `task_ids` that were there already, in the same order.
    pub existing: Vec<TaskId>,
}

impl Submission {
    /// Whether any task was made (else every one was there already).
    pub fn made_any(&self) -> bool {
        self.existing.len() < self.task_ids.len()
    }
}

/// API commands.
pub enum Api {
    Submit {
        specs: Vec<TaskSpec>,
        reply: Reply<Submission>,
    },
    Control {
        task: TaskId,
        op: ControlOp,
        reply: Reply<Task>,
    },
    GetTask {
        task: TaskId,
        reply: Reply<Task>,
    },
    ListTasks {
        query: TaskQuery,
        reply: Reply<Vec<Task>>,
    },
    ListWorkers {
        reply: Reply<Vec<Worker>>,
    },
    GetWorker {
        worker: WorkerId,
        reply: Reply<Worker>,
    },
    Results {
        task: TaskId,
        reply: Reply<Vec<ResultRow>>,
    },
    State {
        task: TaskId,
        reply: Reply<Option<store::StateRow>>,
    },
    Checkpoints {
        task: TaskId,
        reply: Reply<Vec<serde_json::Value>>,
    },
    CheckpointData {
        task: TaskId,
        checkpoint: CheckpointId,
        reply: Reply<Vec<u8>>,
    },
    Overview {
        reply: Reply<Overview>,
    },
    Runs {
        query: super::RunQuery,
        reply: Reply<Vec<super::RunSummary>>,
    },
    /// Drains a worker (`drain`: no new task goes to it, what it holds runs on) or puts it
    /// back (`!drain`); answered with the worker's record once saved.
    DrainWorker {
        worker: WorkerId,
        drain: bool,
        reply: Reply<Worker>,
    },
}

impl Api {
    /// Whether the command only reads: given up by its asker, it changes nothing.
    pub fn is_read(&self) -> bool {
        !matches!(
            self,
            Api::Submit { .. } | Api::Control { .. } | Api::DrainWorker { .. }
        )
    }
}

fn reply_after_commit<T: Send + 'static>(b: &mut Batch, reply: Reply<T>, v: Result<T, ApiError>) {
    b.effect(move |_| {
        let _ = reply.send(v);
    });
}

impl Core {
    pub(super) fn on_api(&mut self, api: Api, b: &mut Batch) {
        match api {
            Api::Submit { specs, reply } => {
                let r = self.submit(specs, b);
                reply_after_commit(b, reply, r);
            }
            Api::Control { task, op, reply } => {
                let r = self.control(&task, op, b);
                reply_after_commit(b, reply, r);
            }
            Api::GetTask { task, reply } => {
                let r = self.task(&task).cloned();
                reply_after_commit(b, reply, r);
            }
            Api::ListTasks { query, reply } => {
                let v = self.list_tasks(&query);
                reply_after_commit(b, reply, Ok(v));
            }
            Api::ListWorkers { reply } => {
                let mut v: Vec<Worker> = self.workers.values().map(|w| self.view(w)).collect();
                v.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
                reply_after_commit(b, reply, Ok(v));
            }
            Api::DrainWorker {
                worker,
                drain,
                reply,
            } => {
                let r = self.drain_worker(&worker, drain, b);
                reply_after_commit(b, reply, r);
            }
            Api::GetWorker { worker, reply } => {
                let r = self
                    .workers
                    .get(&worker)
                    .map(|w| self.view(w))
                    .ok_or_else(|| ApiError::NotFound(format!("no worker {worker}")));
                reply_after_commit(b, reply, r);
            }
            Api::Results { task, reply } => {
                if let Err(e) = self.task(&task) {
                    return reply_after_commit(b, reply, Err(e));
                }
                b.reads.push(Box::new(move |conn| {
                    let r = store::read_results(conn, &task).map_err(internal);
                    let _ = reply.send(r);
                }));
            }
            Api::State { task, reply } => {
                if let Err(e) = self.task(&task) {
                    return reply_after_commit(b, reply, Err(e));
                }
                let unfolded = self.unfolded.clone();
                b.reads.push(Box::new(move |conn| {
                    let r = store::read_state(conn, &unfolded, &task).map_err(internal);
                    let _ = reply.send(r);
                }));
            }
            Api::Checkpoints { task, reply } => {
                if let Err(e) = self.task(&task) {
                    return reply_after_commit(b, reply, Err(e));
                }
                b.reads.push(Box::new(move |conn| {
                    let r = store::read_checkpoints(conn, &task).map_err(internal).map(|v| {
                        v.into_iter()
                            .map(|(id, attempt, size, created_at)| {
                                serde_json::json!({"checkpoint_id": id, "attempt": attempt, "size": size, "created_at": created_at})
                            })
                            .collect()
                    });
                    let _ = reply.send(r);
                }));
            }
            Api::CheckpointData {
                task,
                checkpoint,
                reply,
            } => {
                if let Err(e) = self.task(&task) {
                    return reply_after_commit(b, reply, Err(e));
                }
                // Only a complete checkpoint of this task: another task's id is not found here.
                b.reads.push(Box::new(move |conn| {
                    let all = store::read_checkpoint_range(conn, &task, &checkpoint, 0, u64::MAX);
                    let r = match all {
                        Ok(Some(d)) => Ok(d),
                        Ok(None) => Err(ApiError::NotFound(format!(
                            "task {task} has no checkpoint {checkpoint}"
                        ))),
                        Err(e) => Err(internal(e)),
                    };
                    let _ = reply.send(r);
                }));
            }
            Api::Overview { reply } => {
                let o = self.overview();
                reply_after_commit(b, reply, Ok(o));
            }
            Api::Runs { query, reply } => {
                let runs = self.runs(&query);
                reply_after_commit(b, reply, Ok(runs));
            }
        }
    }

    /// The tasks `q` asks for, in its order, found by the listing's indexes: a page costs the
    /// core the tasks it returns, not a pass over the table.
    pub(super) fn list_tasks(&self, q: &TaskQuery) -> Vec<Task> {
        let admits = |id: &TaskId| self.tasks.get(id).is_some_and(|t| q.admits(t));
        let seq_of = |id: &TaskId| self.tasks.get(id).map(|t| t.submit_seq);
        self.listing
            .query(q, admits, seq_of)
            .iter()
            .filter_map(|id| self.tasks.get(id).cloned())
            .collect()
    }

    fn task(&self, id: &TaskId) -> Result<&Task, ApiError> {
        self.tasks
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("no task {id}")))
    }

    /// Makes a task of each spec, all or none. A spec whose `task_id` names a task there
    /// already is no new task: with the same spec ([`spec_difference`]) it is answered as one
    /// of the submission's tasks, among the `existing`, and nothing is made of it (whatever
    /// the task's status: an ended one is not run again); with another spec it refuses the
    /// whole submission, as does an id given twice in it. A new task whose spec names a
    /// `retry_of` is recorded on that task (its `retried_by`); the task must be here, ended,
    /// and not retried already (by another task, or twice in this submission), or the whole
    /// submission is refused: a task has at most one retry.
    fn submit(&mut self, specs: Vec<TaskSpec>, b: &mut Batch) -> Result<Submission, ApiError> {
        if specs.is_empty() {
            return Err(ApiError::Invalid("no tasks given".into()));
        }
        if specs.len() > self.cfg.max_submit_batch {
            return Err(ApiError::TooMany(format!(
                "{} tasks in one request; at most {} are accepted",
                specs.len(),
                self.cfg.max_submit_batch
            )));
        }
        let mut ids = Vec::with_capacity(specs.len());
        // Whether each is made (else it is there already, the same).
        let mut new = Vec::with_capacity(specs.len());
        let mut existing = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut retried = std::collections::HashSet::new();
        for (i, s) in specs.iter().enumerate() {
            s.validate()
                .map_err(|e| ApiError::Invalid(format!("task {i}: {e}")))?;
            // A config no assignment can carry would only fail at its first dispatch.
            let config = tether_proto::codec::json_len(&s.config);
            if !tether_proto::codec::fits(config, self.cfg.max_frame) {
                return Err(ApiError::Invalid(format!(
                    "task {i}: its config of {config} bytes does not fit in an assignment: frames \
                     carry at most {} bytes, {} of them for the message around it",
                    self.cfg.max_frame,
                    tether_proto::codec::ENVELOPE_BYTES
                )));
            }
            let id = s.task_id.clone().unwrap_or_else(TaskId::fresh);
            if !seen.insert(id.clone()) {
                return Err(ApiError::Conflict(format!(
                    "task {id} is given twice in this request; an id names one task"
                )));
            }
            if let Some(t) = self.tasks.get(&id) {
                if let Some(differs) = spec_difference(&t.spec, s) {
                    return Err(ApiError::Conflict(format!(
                        "task {id} already exists with a different spec: its {differs}; an id \
                         names one task, so submit this one under another id (the same spec \
                         sent again is answered with the task already there)"
                    )));
                }
                existing.push(id.clone());
            } else if let Some(of) = &s.retry_of {
                self.may_retry(i, of)?;
                if !retried.insert(of) {
                    return Err(ApiError::Conflict(format!(
                        "task {i}: task {of} is retried twice in this request; a task has one retry"
                    )));
                }
            }
            new.push(!self.tasks.contains_key(&id));
            ids.push(id);
        }
        let ts = now();
        for ((spec, id), _) in specs.into_iter().zip(&ids).zip(&new).filter(|(_, n)| **n) {
            let seq = self.next_submit_seq;
            self.next_submit_seq += 1;
            let base = self.removed.last_attempt(id.as_str());
            let t = Task {
                task_id: id.clone(),
                spec: Arc::new(TaskSpec {
                    task_id: Some(id.clone()),
                    ..spec
                }),
                status: TaskStatus::Queued,
                attempt: base,
                attempt_base: base,
                lease: None,
                submit_seq: seq,
                submitted_at: ts,
                updated_at: ts,
                finished_at: None,
                outcome: None,
                error: None,
                latest_checkpoint: None,
                attempts: Vec::new(),
                env_redacted: false,
                lease_started: None,
                retried_by: None,
            };
            self.queue
                .insert(&t.spec, (t.spec.priority, seq, id.clone()));
            b.muts.push(Mutation::InsertTask(Box::new(t.clone())));
            self.announce(b, || super::Change::Task(Box::new(t.clone())));
            let of = t.spec.retry_of.clone();
            self.listing.put(&t);
            self.tasks.insert(id.clone(), t);
            if let Some(of) = of {
                if let Some(old) = self.tasks.get_mut(&of) {
                    old.retried_by = Some(id.clone());
                    old.updated_at = ts;
                }
                self.save_task(&of, b);
            }
        }
        if let Some(first) = existing.first() {
            tracing::debug!(
                tasks = existing.len(),
                %first,
                "tasks submitted again with the same spec: answered with those there"
            );
        }
        if new.contains(&true) {
            self.dispatch_needed = true;
        }
        Ok(Submission {
            task_ids: ids,
            existing,
        })
    }

    /// Whether submission `i` may be a retry of task `of`: one here, ended, with no retry yet.
    fn may_retry(&self, i: usize, of: &TaskId) -> Result<(), ApiError> {
        let Some(t) = self.tasks.get(of) else {
            return Err(ApiError::Invalid(format!(
                "task {i}: retry_of names task {of}, which this coordinator does not have \
                 (never submitted, or removed after its retention)"
            )));
        };
        if !t.status.is_terminal() {
            return Err(ApiError::Conflict(format!(
                "task {i}: task {of} is {}; only an ended task is retried",
                t.status.as_str()
            )));
        }
        if let Some(by) = &t.retried_by {
            return Err(ApiError::Conflict(format!(
                "task {i}: task {of} was retried already, by task {by}; a task has one retry, \
                 so retry {by} if it is to run again"
            )));
        }
        Ok(())
    }

    /// Pauses (`want` paused) or resumes a task that no worker holds: a paused one waits out
    /// of the queue until it is resumed.
    fn hold_or_release(&mut self, id: &TaskId, want: Desired, b: &mut Batch) {
        if let Some(t) = self.tasks.get_mut(id) {
            let key = (t.spec.priority, t.submit_seq, id.clone());
            match (want, t.status) {
                (Desired::Paused, TaskStatus::Queued) => {
                    self.queue.remove(&t.spec, &key);
                    t.status = TaskStatus::Paused;
                }
                (Desired::Running, TaskStatus::Paused) => {
                    self.queue.insert(&t.spec, key);
                    t.status = TaskStatus::Queued;
                    self.dispatch_needed = true;
                }
                // Already as asked.
                _ => return,
            }
            t.updated_at = now();
            tracing::info!(task = %id, status = t.status.as_str(), "task held or released");
        }
        self.save_task(id, b);
    }

    /// Drains worker `id` or puts it back ([`Api::DrainWorker`]); the same again changes
    /// nothing. A worker put back is offered the queue at once.
    fn drain_worker(
        &mut self,
        id: &WorkerId,
        drain: bool,
        b: &mut Batch,
    ) -> Result<Worker, ApiError> {
        let w = self
            .workers
            .get_mut(id)
            .ok_or_else(|| ApiError::NotFound(format!("no worker {id}")))?;
        if let Some(s) = &w.session {
            s.seen.set_drained(drain);
        }
        if w.draining != drain {
            w.draining = drain;
            // Told at once, not at its next heartbeat's reply (a heartbeat interval later, up
            // to minutes on a large fleet): a reply that answers no heartbeat.
            if let Some(s) = &w.session {
                let told = tether_proto::msg::HeartbeatReply::drain_notice(drain);
                b.send(s, tether_proto::CoordMsg::Heartbeat(told));
            }
            match drain {
                true => {
                    tracing::info!(worker = %id, leases = w.leases.len(), "worker drained by request: no new task goes to it; what it holds runs on")
                }
                false => {
                    tracing::info!(worker = %id, "worker undrained by request: it takes tasks again");
                    self.free.insert(id.clone());
                    self.dispatch_needed = true;
                }
            }
            self.save_worker(id, b);
        }
        Ok(self.view(&self.workers[id]))
    }

    fn control(&mut self, id: &TaskId, op: ControlOp, b: &mut Batch) -> Result<Task, ApiError> {
        let t = self.task(id)?;
        let status = t.status;
        if status.is_terminal() {
            return Err(ApiError::Conflict(format!(
                "task {id} is already {}",
                status.as_str()
            )));
        }
        let lease = t.lease.clone();
        let session = lease
            .as_ref()
            .and_then(|l| self.workers.get(&l.worker))
            .and_then(|w| w.session.clone());
        let control = |reason: &str| {
            lease.as_ref().map(|l| TaskControl {
                task_id: id.clone(),
                attempt: l.attempt,
                reason: reason.to_owned(),
                timestamp: now(),
            })
        };
        match op {
            ControlOp::Cancel => {
                self.finish_by_coordinator(id, TaskStatus::Cancelled, "cancelled by request", b);
            }
            ControlOp::Pause | ControlOp::Resume => {
                let (want, msg): (Desired, fn(TaskControl) -> CoordMsg) = match op {
                    ControlOp::Pause => (Desired::Paused, CoordMsg::PauseTask),
                    _ => (Desired::Running, CoordMsg::ResumeTask),
                };
                let Some(c) = control("") else {
                    // Not on a worker: a queued task is held out of the queue (paused), a
                    // paused one goes back into it (queued).
                    self.hold_or_release(id, want, b);
                    return self.task(id).cloned();
                };
                if let Some(t) = self.tasks.get_mut(id) {
                    if let Some(l) = t.lease.as_mut() {
                        l.desired = want;
                    }
                    t.status = match want {
                        Desired::Paused => TaskStatus::Paused,
                        Desired::Running => TaskStatus::Running,
                    };
                    t.updated_at = now();
                }
                self.save_task(id, b);
                // A worker away now learns the desired state when it registers again.
                if let Some(s) = &session {
                    b.send(s, msg(c));
                }
            }
            ControlOp::Checkpoint => {
                let (Some(c), Some(s)) = (control(""), &session) else {
                    return Err(ApiError::Conflict(format!(
                        "task {id} is not running on a connected worker"
                    )));
                };
                b.send(
                    s,
                    CoordMsg::CheckpointRequest(CheckpointRequest {
                        task_id: c.task_id,
                        attempt: c.attempt,
                        checkpoint_id: None,
                        timestamp: now(),
                    }),
                );
            }
        }
        self.task(id).cloned()
    }

    fn overview(&self) -> Overview {
        let tasks: BTreeMap<&'static str, u64> = TaskStatus::ALL
            .iter()
            .map(|s| (s.as_str(), self.listing.count(*s)))
            .collect();
        let mut workers: BTreeMap<&'static str, u64> = crate::model::WorkerState::ALL
            .iter()
            .map(|s| (s.as_str(), 0))
            .collect();
        for w in self.workers.values() {
            *workers.entry(w.state.as_str()).or_default() += 1;
        }
        let c = &self.counters;
        let counters = [
            ("results_recorded", &c.results_recorded),
            ("results_duplicate", &c.results_duplicate),
            ("results_stale", &c.results_stale),
            ("results_cancelled", &c.results_cancelled),
            ("results_adopted", &c.results_adopted),
            ("results_retried", &c.results_retried),
            ("results_worker_fault", &c.results_worker_fault),
            ("leases_restored", &c.leases_restored),
            (
                "checkpoint_messages_duplicate",
                &c.checkpoint_messages_duplicate,
            ),
            ("checkpoint_bytes_served", &c.checkpoint_bytes_served),
            ("checkpoints_too_large", &c.checkpoints_too_large),
            ("rejected", &c.rejected),
            ("assignments", &c.assignments),
            ("requeued", &c.requeued),
            ("workers_lost", &c.workers_lost),
            ("sessions_replaced", &c.sessions_replaced),
            ("id_conflicts", &c.id_conflicts),
            ("messages_in", &c.messages_in),
            ("frames_in", &c.frames_in),
            ("batch_frames_in", &c.batch_frames_in),
            ("batch_frames_out", &c.batch_frames_out),
            ("compact_acked", &c.compact_acked),
            ("unknown_frames", &c.unknown_frames),
            ("malformed_frames", &c.malformed_frames),
            ("oversize_frames", &c.oversize_frames),
            ("registrations", &c.registrations),
            ("tasks_expired", &c.tasks_expired),
            ("workers_expired", &c.workers_expired),
            ("reconnections", &c.reconnections),
            ("auth_ok", &c.auth_ok),
            ("auth_failures", &c.auth_failures),
            ("api_auth_failures", &c.api_auth_failures),
            ("connections_refused", &c.connections_refused),
            ("connections_throttled", &c.connections_throttled),
            ("slow_handshakes", &c.slow_handshakes),
            ("idle_http_closed", &c.idle_http_closed),
            ("slow_http_closed", &c.slow_http_closed),
            ("rate_limited", &c.rate_limited),
            ("bytes_limited", &c.bytes_limited),
            ("pre_registration_overflows", &c.pre_registration_overflows),
            ("compressed_in_frames", &c.compressed_in_frames),
            ("compressed_in_wire_bytes", &c.compressed_in_wire_bytes),
            ("compressed_in_json_bytes", &c.compressed_in_json_bytes),
            ("compressed_out_frames", &c.compressed_out_frames),
            ("compressed_out_wire_bytes", &c.compressed_out_wire_bytes),
            ("compressed_out_json_bytes", &c.compressed_out_json_bytes),
            ("decompression_refused", &c.decompression_refused),
            ("mac_sessions", &c.mac_sessions),
            ("mac_failures", &c.mac_failures),
            ("keepalive_pings", &c.keepalive_pings),
            ("slow_writes", &c.slow_writes),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect();
        let rtts: Vec<f64> = self
            .workers
            .values()
            .filter(|w| w.state == crate::model::WorkerState::Connected)
            .filter_map(|w| w.stats.as_ref())
            .filter(|s| s.rtt_samples > 0)
            .map(|s| s.rtt_p50_ms)
            .collect();
        let rtt_p50_ms_mean =
            (!rtts.is_empty()).then(|| rtts.iter().sum::<f64>() / rtts.len() as f64);
        Overview {
            rtt_p50_ms_mean,
            tasks,
            queued: self.queue.len(),
            workers,
            workers_connected: self
                .workers
                .values()
                .filter(|w| w.state == crate::model::WorkerState::Connected)
                .count(),
            workers_known: self.workers.len(),
            workers_draining: self.workers.values().filter(|w| w.draining).count(),
            counters,
        }
    }
}

/// How `new`, submitted under the id of a task whose spec is `kept`, differs from it: its
/// first field that does (in the spec's order), said for the refusal, e.g. "`priority` differs
/// (5 there, 1 here)"; `None` when it is the same spec. Compared as the coordinator keeps and
/// uses a spec, each field with its default filled in: `kind`, `name` and `timeout_ms` exactly
/// (no timeout is no timeout); `priority` with its default (absent is 5); `max_attempts` with
/// its default (absent is [`DEFAULT_MAX_ATTEMPTS`](tether_proto::task::DEFAULT_MAX_ATTEMPTS));
/// `config` as JSON, spacing and key order aside ([`JsonText`](tether_proto::msg::JsonText)'s
/// equality; its values are never quoted, as they may carry credentials); `requires` as a set
/// (order and repeats aside: a worker matches them so); `tags` as a map. The `task_id` is the
/// id both were found by.
fn spec_difference(kept: &TaskSpec, new: &TaskSpec) -> Option<String> {
    use tether_proto::task::DEFAULT_MAX_ATTEMPTS;
    // Destructured, so that a field added to the spec must be compared here to compile.
    let TaskSpec {
        task_id: _,
        kind,
        config,
        priority,
        requires,
        tags,
        timeout_ms,
        max_attempts,
        retry_on,
        name,
        retry_of,
    } = new;
    let values = |field: &str, there: &dyn std::fmt::Display, here: &dyn std::fmt::Display| {
        Some(format!("`{field}` differs ({there} there, {here} here)"))
    };
    fn set(v: &[String]) -> BTreeSet<&str> {
        v.iter().map(String::as_str).collect()
    }
    let timeout = |ms: Option<u64>| ms.map_or_else(|| "none".to_owned(), |ms| format!("{ms} ms"));
    if *kind != kept.kind {
        return values("kind", &kept.kind, kind);
    }
    if *config != kept.config {
        return Some("`config` differs".to_owned());
    }
    if *priority != kept.priority {
        return values("priority", &kept.priority, priority);
    }
    if set(requires) != set(&kept.requires) {
        return Some("`requires` differs".to_owned());
    }
    if *tags != kept.tags {
        return Some("`tags` differs".to_owned());
    }
    if *timeout_ms != kept.timeout_ms {
        return values(
            "timeout_ms",
            &timeout(kept.timeout_ms),
            &timeout(*timeout_ms),
        );
    }
    let attempts = |n: Option<u32>| n.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if attempts(*max_attempts) != attempts(kept.max_attempts) {
        let (there, here) = (attempts(kept.max_attempts), attempts(*max_attempts));
        return values("max_attempts", &there, &here);
    }
    if retry_on.iter().collect::<BTreeSet<_>>() != kept.retry_on.iter().collect::<BTreeSet<_>>() {
        return Some("`retry_on` differs".to_owned());
    }
    if *name != kept.name {
        return Some("`name` differs".to_owned());
    }
    if *retry_of != kept.retry_of {
        let of = |id: &Option<TaskId>| {
            id.as_ref()
                .map_or_else(|| "none".to_owned(), TaskId::to_string)
        };
        return values("retry_of", &of(&kept.retry_of), &of(retry_of));
    }
    None
}

fn internal(e: rusqlite::Error) -> ApiError {
    match e {
        // A record that cannot be read says which (store::stored_json).
        rusqlite::Error::FromSqlConversionFailure(_, _, why) => {
            ApiError::Internal(format!("store: {why}"))
        }
        e => ApiError::Internal(format!("store: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The spec the API reads from `v`, as a submission's body gives it.
    fn spec(v: &serde_json::Value) -> TaskSpec {
        serde_json::from_str(&v.to_string()).expect("a spec")
    }

    fn base() -> serde_json::Value {
        json!({
            "kind": "command",
            "config": {"program": "make", "args": ["bench"], "env": {"A": "1"}},
            "requires": ["cpu", "cuda"],
            "tags": {"os": "linux", "rack": "r1"},
        })
    }

    /// A spec sent again is the same spec with its defaults spelled out, its config laid out
    /// otherwise (spacing, key order) and its requirements in another order or repeated:
    /// the coordinator keeps and runs it the same.
    #[test]
    fn a_spec_is_the_same_with_defaults_spelled_out_and_its_json_laid_out_otherwise() {
        let kept = spec(&base());
        assert_eq!(spec_difference(&kept, &kept.clone()), None);
        let again: TaskSpec = serde_json::from_str(
            r#"{"kind": "command", "priority": 5, "max_attempts": 3,
                "config": {
                    "env": {"A": "1"},
                    "args": ["bench"],   "program": "make"
                },
                "requires": ["cuda", "cpu", "cuda"], "tags": {"rack": "r1", "os": "linux"}}"#,
        )
        .expect("a spec");
        assert_ne!(kept.config.get(), again.config.get(), "another text");
        assert_eq!(spec_difference(&kept, &again), None);
        assert_eq!(spec_difference(&again, &kept), None);
    }

    /// A spec under a kept task's id that differs in any field is said by the first field that
    /// does, with both values where they are short numbers or the kind (never the config's,
    /// which may carry credentials).
    #[test]
    fn a_spec_that_differs_is_said_by_its_first_field_that_does() {
        let kept = spec(&base());
        for (field, value, says) in [
            (
                "kind",
                json!("sleep"),
                "`kind` differs (command there, sleep here)",
            ),
            (
                "config",
                json!({"program": "make", "args": ["bench"], "env": {"A": "2"}}),
                "`config` differs",
            ),
            ("priority", json!(1), "`priority` differs (5 there, 1 here)"),
            ("requires", json!(["cpu"]), "`requires` differs"),
            ("tags", json!({"os": "linux"}), "`tags` differs"),
            (
                "timeout_ms",
                json!(60000),
                "`timeout_ms` differs (none there, 60000 ms here)",
            ),
            (
                "max_attempts",
                json!(4),
                "`max_attempts` differs (3 there, 4 here)",
            ),
            ("retry_on", json!(["failed"]), "`retry_on` differs"),
            ("name", json!("nightly"), "`name` differs"),
            (
                "retry_of",
                json!("t-1"),
                "`retry_of` differs (none there, t-1 here)",
            ),
        ] {
            let mut v = base();
            v[field] = value;
            let said = spec_difference(&kept, &spec(&v));
            assert_eq!(said.as_deref(), Some(says), "{field}");
        }
        // Two fields differ: the first in the spec's order is named.
        let mut v = base();
        v["priority"] = json!(0);
        v["name"] = json!("n");
        assert_eq!(
            spec_difference(&kept, &spec(&v)).as_deref(),
            Some("`priority` differs (5 there, 0 here)")
        );
    }
}
